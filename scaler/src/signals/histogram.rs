//! Latency histograms as plain atomic counters in HdrHistogram's bucket
//! layout (2 significant digits, 10 µs units, up to 1 h), so recording is
//! one `fetch_add` and a window's histograms turn into
//! `hdrhistogram::Histogram`s — with their quantiles, merging and V2 wire
//! format — without converting values.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// One unit of recorded latency.
pub const UNIT: Duration = Duration::from_micros(10);
/// The largest value tracked, in units (1 h); larger ones are clamped.
pub const HIGHEST: u64 = 360_000_000;
/// 2 significant digits: 2 × 10² rounded up to a power of two.
const SUB_BUCKET_COUNT: u64 = 256;
const SUB_BUCKET_HALF_MAGNITUDE: u32 = 7;
const SUB_BUCKET_HALF_COUNT: u64 = 128;
const SUB_BUCKET_MASK: u64 = SUB_BUCKET_COUNT - 1;
const LEADING_ZERO_COUNT_BASE: u32 = 64 - SUB_BUCKET_HALF_MAGNITUDE - 1;

/// Buckets needed to cover `HIGHEST` (HdrHistogram's own computation).
const fn bucket_count() -> u64 {
    let mut smallest_untrackable = SUB_BUCKET_COUNT;
    let mut buckets = 1;
    while smallest_untrackable <= HIGHEST {
        smallest_untrackable <<= 1;
        buckets += 1;
    }
    buckets
}

/// Counters per histogram.
pub const COUNTS_LEN: usize = ((bucket_count() + 1) * SUB_BUCKET_HALF_COUNT) as usize;

/// The counter index of a value in units.
pub fn index_of(units: u64) -> usize {
    let v = units.min(HIGHEST);
    let bucket = LEADING_ZERO_COUNT_BASE - (v | SUB_BUCKET_MASK).leading_zeros();
    let sub_bucket = v >> bucket;
    (((u64::from(bucket) + 1) << SUB_BUCKET_HALF_MAGNITUDE) + sub_bucket - SUB_BUCKET_HALF_COUNT)
        as usize
}

/// The lowest value (units) of a counter index.
pub fn value_of(index: usize) -> u64 {
    let index = index as u64;
    let mut bucket = (index >> SUB_BUCKET_HALF_MAGNITUDE) as i64 - 1;
    let mut sub_bucket = (index & (SUB_BUCKET_HALF_COUNT - 1)) + SUB_BUCKET_HALF_COUNT;
    if bucket < 0 {
        sub_bucket -= SUB_BUCKET_HALF_COUNT;
        bucket = 0;
    }
    sub_bucket << bucket
}

/// Units of a duration.
pub fn units_of(d: Duration) -> u64 {
    (d.as_nanos() / UNIT.as_nanos()) as u64
}

/// An empty histogram with this layout.
#[allow(clippy::expect_used)] // constant bounds, checked by the tests
pub fn empty() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST, 2).expect("constant histogram bounds are valid")
}

/// One histogram's atomic counters, allocated at its first sample: most
/// slots of an idle pool (and of one serving a model nobody asks for) are
/// never written, and the counters are 11.5 KiB each. Once allocated they
/// stay (reset in place), so the hot path allocates at most once per slot
/// in the life of the pool, and afterwards reads one pointer.
#[derive(Debug, Default)]
pub struct AtomicCounts {
    counts: OnceLock<Box<[AtomicU32]>>,
}

impl AtomicCounts {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn record(&self, d: Duration) {
        let counts = match self.counts.get() {
            Some(c) => c,
            None => self.allocate(),
        };
        if let Some(c) = counts.get(index_of(units_of(d))) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The first sample's path, kept out of line so the hot one stays a
    /// load and a branch.
    #[cold]
    #[inline(never)]
    fn allocate(&self) -> &[AtomicU32] {
        self.counts
            .get_or_init(|| (0..COUNTS_LEN).map(|_| AtomicU32::new(0)).collect())
    }

    pub fn reset(&self) {
        for c in self.counts.get().into_iter().flat_map(|c| c.iter()) {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Whether any sample was ever recorded here (the counters exist).
    pub fn allocated(&self) -> bool {
        self.counts.get().is_some()
    }

    /// Adds these counts into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        let Some(counts) = self.counts.get() else {
            return;
        };
        for (i, c) in counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                // Values are within bounds by construction; a failed record
                // would only lose a sample, never panic.
                let _ = h.record_n(value_of(i).max(1), u64::from(n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_hdrhistogram() {
        // Every index maps back to a value that lands in the same index, and
        // hdrhistogram agrees the value is equivalent to ours.
        let h = empty();
        for i in 0..COUNTS_LEN {
            let v = value_of(i);
            if v > HIGHEST {
                break;
            }
            assert_eq!(index_of(v), i, "value {v}");
            assert_eq!(h.lowest_equivalent(v), v, "index {i}");
        }
        for v in [0u64, 1, 255, 256, 257, 1000, 12_345, 99_999_999, HIGHEST] {
            assert_eq!(value_of(index_of(v)), h.lowest_equivalent(v), "{v}");
        }
    }

    #[test]
    fn quantiles_are_within_one_percent() {
        let counts = AtomicCounts::new();
        for ms in 1..=1000u64 {
            counts.record(Duration::from_millis(ms));
        }
        let mut h = empty();
        counts.add_to(&mut h);
        assert_eq!(h.len(), 1000);
        let p90 = h.value_at_quantile(0.9) as f64 * UNIT.as_secs_f64() * 1000.0;
        assert!((p90 - 900.0).abs() / 900.0 < 0.01, "{p90}");
    }

    #[test]
    fn counters_exist_only_once_recorded_and_survive_a_reset() {
        let counts = AtomicCounts::new();
        counts.reset();
        let mut h = empty();
        counts.add_to(&mut h);
        assert!(!counts.allocated() && h.is_empty());
        counts.record(Duration::from_millis(5));
        assert!(counts.allocated());
        counts.reset();
        counts.add_to(&mut h);
        assert!(counts.allocated() && h.is_empty());
        counts.record(Duration::from_millis(7));
        counts.add_to(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn huge_values_are_clamped_not_lost() {
        let counts = AtomicCounts::new();
        counts.record(Duration::from_secs(1_000_000));
        let mut h = empty();
        counts.add_to(&mut h);
        assert_eq!(h.len(), 1);
    }
}
