//! Latency histograms as plain atomic counters in HdrHistogram's bucket
//! layout (2 significant digits, 10 µs units, up to 1 h), so recording is
//! one `fetch_add` and a window's histograms turn into
//! `hdrhistogram::Histogram`s — with their quantiles, merging and V2 wire
//! format — without converting values.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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

/// Counters per chunk of the `touched` map.
const CHUNK: usize = 64;
const _: () = assert!(
    COUNTS_LEN.div_ceil(CHUNK) <= 64,
    "one bit per chunk in a u64"
);

/// One histogram's atomic counters, allocated at its first sample: most
/// slots of an idle pool (and of one serving a model nobody asks for) are
/// never written, and the counters are 11.5 KiB each. Once allocated they
/// stay (reset in place), so the hot path allocates at most once per slot
/// in the life of the pool, and afterwards reads one pointer.
///
/// `touched` has a bit per 64 counters that may be non-zero: reads and
/// resets visit those chunks only (latencies of one pool span a few), not
/// all 2,944 counters — what a tick over a thousand pools spends its time
/// on otherwise. A writer sets the bit before it counts, and only when it
/// is not set yet (a load, no write, in the common case).
#[derive(Debug, Default)]
pub struct AtomicCounts {
    counts: OnceLock<Box<[AtomicU32]>>,
    touched: AtomicU64,
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
        let index = index_of(units_of(d));
        if let Some(c) = counts.get(index) {
            let bit = 1u64 << (index / CHUNK);
            if self.touched.load(Ordering::Relaxed) & bit == 0 {
                self.touched.fetch_or(bit, Ordering::Release);
            }
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

    /// The chunks that may hold counts, as counter slices.
    fn touched_chunks(&self) -> impl Iterator<Item = (usize, &[AtomicU32])> {
        let counts: &[AtomicU32] = self.counts.get().map_or(&[], |c| c);
        let mut bits = self.touched.load(Ordering::Acquire);
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let chunk = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let start = chunk * CHUNK;
            counts
                .get(start..(start + CHUNK).min(counts.len()))
                .map(|c| (start, c))
        })
    }

    pub fn reset(&self) {
        for (_, chunk) in self.touched_chunks() {
            for c in chunk {
                c.store(0, Ordering::Relaxed);
            }
        }
        self.touched.store(0, Ordering::Release);
    }

    /// Whether any sample was ever recorded here (the counters exist).
    pub fn allocated(&self) -> bool {
        self.counts.get().is_some()
    }

    /// Adds these counts into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for (start, chunk) in self.touched_chunks() {
            for (i, c) in chunk.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    // Values are within bounds by construction; a failed
                    // record would only lose a sample, never panic.
                    let _ = h.record_n(value_of(start + i).max(1), u64::from(n));
                }
            }
        }
    }
}

/// The layout's equivalence ranges, from a histogram that is never
/// written (its methods depend on the layout, not on counts).
fn layout() -> &'static Histogram<u64> {
    static LAYOUT: OnceLock<Histogram<u64>> = OnceLock::new();
    LAYOUT.get_or_init(empty)
}

/// The highest value equivalent to `v` in this layout.
pub fn highest_equivalent(v: u64) -> u64 {
    layout().highest_equivalent(v)
}

/// One window's counts merged over its slots: only the chunks some slot
/// touched (a pool's latencies span a few of the 46), kept in order, and
/// summarized exactly as `hdrhistogram` would (same walk, same arithmetic)
/// without building a `Histogram` — a tick over a thousand pools made
/// eight of those per pool, 23 KiB each, and spent most of its time
/// faulting their pages in.
#[derive(Debug, Default)]
pub struct Merged {
    /// (chunk number, its counters), ascending by chunk.
    chunks: Vec<(usize, [u64; CHUNK])>,
    total: u64,
}

impl Merged {
    pub fn add(&mut self, c: &AtomicCounts) {
        for (start, counts) in c.touched_chunks() {
            let number = start / CHUNK;
            let at = match self.chunks.binary_search_by_key(&number, |(n, _)| *n) {
                Ok(at) => at,
                Err(at) => {
                    self.chunks.insert(at, (number, [0; CHUNK]));
                    at
                }
            };
            if let Some((_, into)) = self.chunks.get_mut(at) {
                for (into, x) in into.iter_mut().zip(counts) {
                    let n = u64::from(x.load(Ordering::Relaxed));
                    *into += n;
                    self.total += n;
                }
            }
        }
    }

    /// (counter index, count) of every non-zero counter, ascending.
    fn recorded(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.chunks.iter().flat_map(|(number, counts)| {
            counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(move |(i, n)| (number * CHUNK + i, *n))
        })
    }

    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// `hdrhistogram`'s `value_at_quantile` (then its highest equivalent).
    pub fn value_at_quantile(&self, quantile: f64) -> u64 {
        let quantile = quantile.min(1.0);
        let at = ((quantile * self.total as f64).ceil() as u64).max(1);
        let mut sum = 0u64;
        for (i, n) in self.recorded() {
            sum += n;
            if sum >= at {
                let v = value_of(i);
                return if quantile == 0.0 {
                    layout().lowest_equivalent(v)
                } else {
                    layout().highest_equivalent(v)
                };
            }
        }
        0
    }

    /// `hdrhistogram`'s `mean`: each value at the middle of its range.
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.recorded().fold(0.0_f64, |sum, (i, n)| {
            sum + layout().median_equivalent(value_of(i)) as f64 * n as f64 / self.total as f64
        })
    }

    /// As a `Histogram` (what peers are sent).
    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = empty();
        for (i, n) in self.recorded() {
            // Within bounds by construction; a failed record would only
            // lose a sample, never panic.
            let _ = h.record_n(value_of(i).max(1), n);
        }
        h
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

    /// Samples all over the range, in every chunk: what is read back is
    /// what was recorded, and a reset leaves nothing behind.
    #[test]
    fn every_chunk_is_read_and_reset() {
        let counts = AtomicCounts::new();
        let mut expected = empty();
        for i in (0..COUNTS_LEN).step_by(7) {
            let v = value_of(i).clamp(1, HIGHEST);
            counts.record(UNIT * u32::try_from(v).unwrap());
            expected.record(v).unwrap();
        }
        let mut h = empty();
        counts.add_to(&mut h);
        assert_eq!(h.len(), expected.len());
        for q in [0.01, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(h.value_at_quantile(q), expected.value_at_quantile(q), "{q}");
        }
        counts.reset();
        let mut after = empty();
        counts.add_to(&mut after);
        assert!(after.is_empty());
        assert!(
            counts
                .counts
                .get()
                .unwrap()
                .iter()
                .all(|c| c.load(Ordering::Relaxed) == 0)
        );
    }

    proptest::proptest! {
        /// A window merged from slots summarizes exactly as the
        /// `Histogram` the same samples make.
        #[test]
        fn merged_summaries_are_hdrhistograms(
            slots in proptest::collection::vec(
                proptest::collection::vec(0u64..HIGHEST * 2, 0..60), 1..6),
            q in 0.0f64..=1.0,
        ) {
            let mut merged = Merged::default();
            let mut h = empty();
            for samples in &slots {
                let counts = AtomicCounts::new();
                for &v in samples {
                    counts.record(UNIT * u32::try_from(v).unwrap());
                }
                counts.add_to(&mut h);
                merged.add(&counts);
            }
            proptest::prop_assert_eq!(merged.len(), h.len());
            for q in [q, 0.0, 0.5, 0.9, 0.99, 1.0] {
                proptest::prop_assert_eq!(merged.value_at_quantile(q), h.value_at_quantile(q), "q {}", q);
            }
            proptest::prop_assert_eq!(merged.mean().to_bits(), h.mean().to_bits());
            proptest::prop_assert_eq!(merged.to_histogram(), h);
        }
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
