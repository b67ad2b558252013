//! Per-pool windowed signals: what the proxy sees, recorded lock-free, read
//! as exact window averages.
//!
//! Time is cut into slots (1 s by default) in a ring as long as the
//! retention (the longest window the pool's policy uses). Each slot is
//! tagged with its slot number; the first writer of a new second resets the
//! slot it reuses, and readers only trust slots whose tag they expect, so a
//! stale slot is never counted: data older than a window counts as zero.
//!
//! Gauges (requests in flight, queued, tokens in flight) are recorded as
//! changes: per slot the net change Σδ and the "tail area" Σδ·(slot end − t).
//! With the current level this gives the exact area under the gauge's curve
//! for every slot, hence exact time-weighted averages — the arrival and
//! departure times themselves, not samples of the level.
//!
//! Latencies go into HdrHistogram-layout atomic counters in a second ring of
//! coarser slots (retention / 30, at least one slot).
//!
//! Memory per pool (rings are rounded up to powers of two): counters
//! 20 × 8 B per slot (128 slots for a 60 s retention: ~20 KB), allocated at
//! creation; a histogram's 2,944 × 4 B = 11.5 KiB of counters only at its
//! first sample ([`histogram::AtomicCounts`]), so an idle pool costs ~27 KB
//! and a busy one at most 64 slots × 4 × 11.5 KiB ≈ 3 MB more (64 slots of
//! 2 s for a 60 s retention; a 1 h window has 64 slots of 2 min, the same
//! bound). Recording allocates only a histogram slot's first sample, once
//! in the pool's life: the counters stay, reset in place.

pub mod histogram;

use histogram::Merged;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::clock::Clock;
use crate::snapshot::{Latencies, LatencySummary, WindowSnapshot, WindowValues};
use histogram::AtomicCounts;

/// How a pool's signals are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalsConfig {
    /// Slot length of counters and gauges.
    pub bucket: Duration,
    /// The longest window that will be asked for.
    pub retention: Duration,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        SignalsConfig {
            bucket: Duration::from_secs(1),
            retention: Duration::from_secs(60),
        }
    }
}

impl SignalsConfig {
    /// A config that keeps `window` (the policy's stable window).
    pub fn for_window(window: Duration) -> Self {
        SignalsConfig {
            retention: window.max(Duration::from_secs(1)),
            ..Self::default()
        }
    }
}

const RESETTING: u64 = u64::MAX;

/// Gauges, by index.
const IN_FLIGHT: usize = 0;
const QUEUED: usize = 1;
const PREFILL_TOKENS: usize = 2;
const DECODE_TOKENS: usize = 3;
/// Endpoints with at least one request waiting for its first token.
const PREFILL_BUSY: usize = 4;
/// Endpoints with at least one request decoding.
const DECODE_BUSY: usize = 5;
const GAUGES: usize = 6;

#[derive(Debug, Default)]
struct GaugeSlot {
    delta: AtomicI64,
    /// Σ δ · (slot end − t), in level·µs.
    tail: AtomicI64,
}

#[derive(Debug, Default)]
struct CounterSlot {
    /// Slot number + 1 (0: never used; RESETTING: being reset).
    epoch: AtomicU64,
    arrivals: AtomicU64,
    completions: AtomicU64,
    prompt_tokens: AtomicU64,
    /// Prompt tokens whose first token arrived (their prefill is done).
    prefilled_tokens: AtomicU64,
    /// First tokens of requests that could have met the TTFT target (their
    /// prompt alone fits it at the measured prefill rate), and of those,
    /// the ones that did.
    slo_eligible: AtomicU64,
    slo_met: AtomicU64,
    decode_tokens: AtomicU64,
    gauges: [GaugeSlot; GAUGES],
}

impl CounterSlot {
    fn reset(&self) {
        self.arrivals.store(0, Ordering::Relaxed);
        self.completions.store(0, Ordering::Relaxed);
        self.prompt_tokens.store(0, Ordering::Relaxed);
        self.prefilled_tokens.store(0, Ordering::Relaxed);
        self.slo_eligible.store(0, Ordering::Relaxed);
        self.slo_met.store(0, Ordering::Relaxed);
        self.decode_tokens.store(0, Ordering::Relaxed);
        for g in &self.gauges {
            g.delta.store(0, Ordering::Relaxed);
            g.tail.store(0, Ordering::Relaxed);
        }
    }
}

/// Latency histograms, by index.
const TTFT: usize = 0;
const ITL: usize = 1;
const E2E: usize = 2;
const QUEUE_WAIT: usize = 3;
const LATENCIES: usize = 4;

#[derive(Debug, Default)]
struct HistSlot {
    epoch: AtomicU64,
    latencies: [AtomicCounts; LATENCIES],
}

impl HistSlot {
    fn reset(&self) {
        for h in &self.latencies {
            h.reset();
        }
    }
}

trait Epoch {
    fn epoch(&self) -> &AtomicU64;
    fn clear(&self);
}

impl Epoch for CounterSlot {
    fn epoch(&self) -> &AtomicU64 {
        &self.epoch
    }
    fn clear(&self) {
        self.reset();
    }
}

impl Epoch for HistSlot {
    fn epoch(&self) -> &AtomicU64 {
        &self.epoch
    }
    fn clear(&self) {
        self.reset();
    }
}

/// The slot of `number` in `ring`, reset first if it still holds an older
/// slot's data. A writer late with an old timestamp whose slot was already
/// reused records into the newer slot (off by one slot, never lost).
fn slot<S: Epoch>(ring: &[S], number: u64) -> Option<&S> {
    // Ring lengths are powers of two: a mask, not a division.
    let s = ring.get((number & (ring.len() as u64 - 1)) as usize)?;
    let want = number + 1;
    loop {
        let e = s.epoch().load(Ordering::Acquire);
        if e == RESETTING {
            std::hint::spin_loop();
            continue;
        }
        if e >= want {
            return Some(s);
        }
        if s.epoch()
            .compare_exchange(e, RESETTING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            s.clear();
            s.epoch().store(want, Ordering::Release);
            return Some(s);
        }
    }
}

/// The slot of `number` in `ring` if the ring still holds that bucket
/// there; never resets one (for reads, and for taking back what was
/// recorded).
fn kept<S: Epoch>(ring: &[S], number: u64) -> Option<&S> {
    ring.get((number & (ring.len() as u64 - 1)) as usize)
        .filter(|s| s.epoch().load(Ordering::Acquire) == number + 1)
}

/// One window's values with its latency histograms (TTFT, ITL,
/// end-to-end, queue wait; `None`: not asked for, or empty).
pub type WindowWithHistograms = (WindowValues, [Option<Histogram<u64>>; LATENCIES]);

/// Both windows of a pool ending now, histograms whole
/// ([`PoolSignals::windows_with_histograms`]).
#[derive(Debug, Clone)]
pub struct WindowsWithHistograms {
    pub stable: WindowWithHistograms,
    pub panic: WindowWithHistograms,
    pub in_flight_now: u64,
    pub queued_now: u64,
    /// How long the pool has been idle (`None`: unknown).
    pub idle: Option<Duration>,
}

/// The signals of one pool.
#[derive(Debug)]
pub struct PoolSignals {
    clock: Arc<dyn Clock>,
    bucket_us: u64,
    hist_slot_us: u64,
    retention: Duration,
    /// Clock time of creation, µs.
    start_us: u64,
    counters: Box<[CounterSlot]>,
    hists: Box<[HistSlot]>,
    levels: [AtomicI64; GAUGES],
    /// Clock time of the last arrival + 1, µs (0: never).
    last_arrival_us: AtomicU64,
    /// The replicas' observed cold start (created → ready), ms; 0: none
    /// observed.
    cold_start_ms: AtomicU64,
    /// The pool's TTFT target (µs; 0: none) and a replica's measured
    /// prefill rate (f64 bits; 0: not measured yet), set by the control
    /// loop: what a first token is judged by for the SLO counts.
    ttft_target_us: AtomicU64,
    prefill_rate_bits: AtomicU64,
    /// Tokens one replica's KV cache holds, as its engine reports it
    /// (0: not reported).
    kv_capacity: AtomicU64,
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl PoolSignals {
    pub fn new(config: SignalsConfig, clock: Arc<dyn Clock>) -> Self {
        let bucket_us = micros(config.bucket).max(1000);
        let retention_us = micros(config.retention).max(bucket_us);
        // + the current slot + the two prepared ahead + one spare.
        let slots = (retention_us.div_ceil(bucket_us) + 4).next_power_of_two();
        let hist_slot_us = (retention_us / 30).max(bucket_us).div_ceil(bucket_us) * bucket_us;
        let hist_slots = (retention_us.div_ceil(hist_slot_us) + 4).next_power_of_two();
        let start_us = micros(clock.now());
        PoolSignals {
            clock,
            bucket_us,
            hist_slot_us,
            retention: Duration::from_micros(retention_us),
            start_us,
            counters: (0..slots).map(|_| CounterSlot::default()).collect(),
            hists: (0..hist_slots).map(|_| HistSlot::default()).collect(),
            levels: Default::default(),
            last_arrival_us: AtomicU64::new(0),
            cold_start_ms: AtomicU64::new(0),
            ttft_target_us: AtomicU64::new(0),
            prefill_rate_bits: AtomicU64::new(0),
            kv_capacity: AtomicU64::new(0),
        }
    }

    /// What first tokens are judged by: the pool's TTFT target, and a
    /// replica's measured prefill rate (`None` keeps the last one). A
    /// request is eligible when its prompt alone fits the target at that
    /// rate (every request, before a rate is known).
    pub fn set_slo_reference(&self, ttft_target: Option<Duration>, prefill_rate: Option<f64>) {
        self.ttft_target_us
            .store(ttft_target.map_or(0, micros), Ordering::Relaxed);
        if let Some(r) = prefill_rate.filter(|r| r.is_finite() && *r > 0.0) {
            self.prefill_rate_bits.store(r.to_bits(), Ordering::Relaxed);
        }
    }

    /// One replica of the pool took `d` from created to ready. The pool's
    /// cold start follows the latest ones (each moves it a quarter of the
    /// way), so a changed image or node pool is learned in a few pods.
    pub fn observe_cold_start(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .cold_start_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(if old == 0 { ms } else { old - old / 4 + ms / 4 })
            });
    }

    /// The observed cold start, if any replica was seen starting.
    pub fn cold_start(&self) -> Option<Duration> {
        match self.cold_start_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The KV cache of one replica, in tokens, as the engines report it
    /// (the smallest a replica of the pool reported; `None` when none
    /// did). The latest report replaces the last.
    pub fn set_kv_capacity(&self, tokens: Option<u64>) {
        self.kv_capacity
            .store(tokens.unwrap_or(0), Ordering::Release);
    }

    /// The KV cache of one replica, in tokens, if an engine reported it.
    pub fn kv_capacity(&self) -> Option<u64> {
        match self.kv_capacity.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    fn now_us(&self) -> u64 {
        micros(self.clock.now())
    }

    fn counter_slot(&self, now_us: u64) -> Option<&CounterSlot> {
        slot(&self.counters, now_us / self.bucket_us)
    }

    fn gauge(&self, now: u64, g: usize, delta: i64) {
        if delta == 0 {
            return;
        }
        if let Some(level) = self.levels.get(g) {
            level.fetch_add(delta, Ordering::AcqRel);
        }
        let end = (now / self.bucket_us + 1) * self.bucket_us;
        if let Some(s) = self.counter_slot(now).and_then(|s| s.gauges.get(g)) {
            s.delta.fetch_add(delta, Ordering::Relaxed);
            s.tail
                .fetch_add(delta.saturating_mul((end - now) as i64), Ordering::Relaxed);
        }
    }

    fn latency(&self, now: u64, h: usize, d: Duration) {
        if let Some(s) = slot(&self.hists, now / self.hist_slot_us).and_then(|s| s.latencies.get(h))
        {
            s.record(d);
        }
    }

    fn tokens(n: u64) -> i64 {
        i64::try_from(n).unwrap_or(i64::MAX)
    }

    /// A request reached the pool (before any queueing): counts toward the
    /// arrival rate and the prompt tokens admitted.
    pub fn arrival(&self, prompt_tokens: u64) {
        self.arrival_at(self.clock.now(), prompt_tokens);
    }

    /// [`Self::arrival`] at `now`, a reading of [`Self::now`].
    pub fn arrival_at(&self, now: Duration, prompt_tokens: u64) {
        let now = micros(now);
        if let Some(s) = self.counter_slot(now) {
            s.arrivals.fetch_add(1, Ordering::Relaxed);
            s.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        }
        self.last_arrival_us.fetch_max(now + 1, Ordering::AcqRel);
    }

    /// A request recorded by [`Self::arrival_at`] at `at` was no work: the
    /// model server refused it outright (a prompt over its context, a
    /// malformed request). Its arrival and prompt tokens leave the window
    /// they were counted in — one refused 100k-token prompt is otherwise a
    /// burst of prompt work to scale for — if that slot is still kept.
    pub fn retract_arrival(&self, at: Duration, prompt_tokens: u64) {
        // Only the slot the arrival went to: one reused for a later bucket
        // (the arrival aged out of the retention) is left alone.
        let Some(s) = kept(&self.counters, micros(at) / self.bucket_us) else {
            return;
        };
        let less = |c: &AtomicU64, n: u64| {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        };
        less(&s.arrivals, 1);
        less(&s.prompt_tokens, prompt_tokens);
    }

    pub fn queue_enter(&self) {
        self.gauge(self.now_us(), QUEUED, 1);
    }

    pub fn queue_leave(&self, waited: Duration) {
        let now = self.now_us();
        self.gauge(now, QUEUED, -1);
        self.latency(now, QUEUE_WAIT, waited);
    }

    /// Sent to an endpoint: in flight, with its prompt tokens in prefill.
    pub fn dispatch(&self, prompt_tokens: u64) {
        self.dispatch_at(self.clock.now(), prompt_tokens);
    }

    /// [`Self::dispatch`] at `now`, a reading of [`Self::now`].
    pub fn dispatch_at(&self, now: Duration, prompt_tokens: u64) {
        let now = micros(now);
        self.gauge(now, IN_FLIGHT, 1);
        self.gauge(now, PREFILL_TOKENS, Self::tokens(prompt_tokens));
    }

    /// The first token: its prompt tokens move from prefill to decode.
    pub fn first_token(&self, prompt_tokens: u64, ttft: Duration) {
        let now = self.now_us();
        let n = Self::tokens(prompt_tokens);
        self.gauge(now, PREFILL_TOKENS, -n);
        self.gauge(now, DECODE_TOKENS, n);
        let target_us = self.ttft_target_us.load(Ordering::Relaxed);
        if let Some(s) = self.counter_slot(now) {
            s.prefilled_tokens
                .fetch_add(prompt_tokens, Ordering::Relaxed);
            if target_us > 0 {
                let rate = f64::from_bits(self.prefill_rate_bits.load(Ordering::Relaxed));
                let alone_us = if rate > 0.0 {
                    prompt_tokens as f64 / rate * 1e6
                } else {
                    0.0
                };
                if alone_us <= target_us as f64 {
                    s.slo_eligible.fetch_add(1, Ordering::Relaxed);
                    if micros(ttft) <= target_us {
                        s.slo_met.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.latency(now, TTFT, ttft);
    }

    /// One more (`busy`) or one fewer endpoint has a request waiting for
    /// its first token. The caller counts per endpoint and reports only
    /// the 0 → 1 and 1 → 0 transitions: the time-weighted average of this
    /// gauge is the endpoints' busy prefilling time, and prompt tokens
    /// prefilled over it are a replica's measured prefill rate.
    pub fn prefill_busy(&self, busy: bool) {
        self.gauge(self.now_us(), PREFILL_BUSY, if busy { 1 } else { -1 });
    }

    /// As [`Self::prefill_busy`], for endpoints with a request decoding.
    pub fn decode_busy(&self, busy: bool) {
        self.gauge(self.now_us(), DECODE_BUSY, if busy { 1 } else { -1 });
    }

    /// The pool's clock: a caller that already read it for a latency passes
    /// the reading to the `*_at` methods instead of reading it twice.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// `n` tokens generated.
    pub fn decode_tokens(&self, n: u64) {
        self.decode_tokens_at(self.clock.now(), n);
    }

    /// [`Self::decode_tokens`] at `now`, a reading of [`Self::now`].
    pub fn decode_tokens_at(&self, now: Duration, n: u64) {
        let now = micros(now);
        self.gauge(now, DECODE_TOKENS, Self::tokens(n));
        if let Some(s) = self.counter_slot(now) {
            s.decode_tokens.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn inter_token(&self, itl: Duration) {
        self.latency(self.now_us(), ITL, itl);
    }

    /// [`Self::inter_token`] at `now`, a reading of [`Self::now`].
    pub fn inter_token_at(&self, now: Duration, itl: Duration) {
        self.latency(micros(now), ITL, itl);
    }

    /// The request left its endpoint (done, failed or cancelled): it leaves
    /// the in-flight count and its tokens leave whichever gauge holds them.
    pub fn complete(
        &self,
        prompt_tokens: u64,
        generated_tokens: u64,
        first_token_seen: bool,
        e2e: Option<Duration>,
    ) {
        let now = self.now_us();
        self.gauge(now, IN_FLIGHT, -1);
        if first_token_seen {
            self.gauge(
                now,
                DECODE_TOKENS,
                -Self::tokens(prompt_tokens.saturating_add(generated_tokens)),
            );
        } else {
            self.gauge(now, PREFILL_TOKENS, -Self::tokens(prompt_tokens));
            // Tokens counted as generated without a first token (never
            // happens through the proxy) still leave decode.
            self.gauge(now, DECODE_TOKENS, -Self::tokens(generated_tokens));
        }
        if let Some(s) = self.counter_slot(now) {
            s.completions.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(d) = e2e {
            self.latency(now, E2E, d);
        }
    }

    fn level(&self, g: usize) -> u64 {
        self.levels
            .get(g)
            .map_or(0, |l| l.load(Ordering::Acquire).max(0) as u64)
    }

    pub fn in_flight(&self) -> u64 {
        self.level(IN_FLIGHT)
    }

    pub fn queued(&self) -> u64 {
        self.level(QUEUED)
    }

    pub fn tokens_in_flight(&self) -> u64 {
        self.level(PREFILL_TOKENS) + self.level(DECODE_TOKENS)
    }

    /// The longest window this pool keeps.
    /// Latency histograms whose counters exist: those that ever had a
    /// sample (a pool's memory beyond its fixed ~27 KB is 11.5 KiB each).
    pub fn allocated_histograms(&self) -> usize {
        self.hists
            .iter()
            .flat_map(|s| s.latencies.iter())
            .filter(|h| h.allocated())
            .count()
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The stable and panic windows ending now. Windows longer than the
    /// retention are cut to it.
    pub fn snapshot(&self, stable: Duration, panic: Duration) -> WindowSnapshot {
        self.snapshot_of(stable, panic, Latencies::ALL)
    }

    /// [`Self::snapshot`] with only the latency summaries in `latencies`
    /// (the others empty): what a decision reads, at a fraction of the cost.
    pub fn snapshot_of(
        &self,
        stable: Duration,
        panic: Duration,
        latencies: Latencies,
    ) -> WindowSnapshot {
        let (now, in_flight, queued, last_activity) = self.now_state();
        WindowSnapshot {
            at: Duration::from_micros(now),
            stable: self.window_parts(now, stable, latencies).0,
            panic: self.window_parts(now, panic, latencies).0,
            in_flight_now: in_flight,
            queued_now: queued,
            last_activity,
        }
    }

    /// The clock now (µs), requests in flight and queued, and when the
    /// pool was last active: what every snapshot reads besides its windows.
    fn now_state(&self) -> (u64, u64, u64, Option<Duration>) {
        let now = self.now_us();
        // Prepare the next slots so writers rarely pay for a reset.
        for ahead in 1..=2 {
            let _ = slot(&self.counters, now / self.bucket_us + ahead);
            let _ = slot(&self.hists, now / self.hist_slot_us + ahead);
        }
        let in_flight = self.in_flight();
        let queued = self.queued();
        let last_arrival = self.last_arrival_us.load(Ordering::Acquire);
        let last_activity = if in_flight > 0 || queued > 0 {
            Some(Duration::from_micros(now))
        } else if last_arrival > 0 {
            Some(Duration::from_micros(last_arrival - 1))
        } else {
            // Nothing seen since these signals began: idle for as long as
            // they have watched, not forever (a restarted gateway must wait
            // out the grace period before it scales anything to zero).
            Some(Duration::from_micros(self.start_us))
        };
        (now, in_flight, queued, last_activity)
    }

    /// A window's values and its latency histograms (TTFT, ITL, end-to-end,
    /// queue wait) — what a peer snapshot carries.
    fn window_parts(
        &self,
        now: u64,
        length: Duration,
        latencies: Latencies,
    ) -> (WindowValues, [Merged; LATENCIES]) {
        let b = self.bucket_us;
        // A window shorter than a slot (Knative allows a 0.6 s panic
        // window) is measured as one slot: the finest this ring can see.
        let length = length.max(Duration::from_micros(b)).min(self.retention);
        let current = now / b;
        // The current partial slot, then as many whole slots before it as
        // fit: the window covers (length − bucket, length].
        let partial = now - current * b;
        let whole = micros(length).saturating_sub(partial) / b;
        let first = current.saturating_sub(whole).max(self.start_us / b);
        // Levels at the end of each slot, walking back from now.
        let mut level_end: [i64; GAUGES] = std::array::from_fn(|g| self.level(g) as i64);
        let mut area = [0i128; GAUGES];
        let (mut arrivals, mut completions, mut prompt, mut decode) = (0u64, 0u64, 0u64, 0u64);
        let (mut prefilled, mut eligible, mut met) = (0u64, 0u64, 0u64);
        let mut covered = 0u64;
        let mut number = current + 1;
        while number > first {
            number -= 1;
            let slot_start = number * b;
            let start = slot_start.max(self.start_us);
            let end = if number == current {
                now
            } else {
                slot_start + b
            };
            let span = end.saturating_sub(start);
            covered += span;
            let fresh = kept(&self.counters, number);
            for g in 0..GAUGES {
                let (delta, tail) = fresh.and_then(|s| s.gauges.get(g)).map_or((0, 0), |x| {
                    (
                        x.delta.load(Ordering::Relaxed),
                        x.tail.load(Ordering::Relaxed),
                    )
                });
                let level_start = level_end[g] - delta;
                // Changes after `end` (only in the current slot) did not
                // happen yet within [start, end): take their tail back out.
                let not_yet = i128::from(delta) * i128::from(slot_start + b - end);
                area[g] +=
                    i128::from(level_start.max(0)) * i128::from(span) + i128::from(tail) - not_yet;
                level_end[g] = level_start;
            }
            if let Some(s) = fresh {
                arrivals += s.arrivals.load(Ordering::Relaxed);
                completions += s.completions.load(Ordering::Relaxed);
                prompt += s.prompt_tokens.load(Ordering::Relaxed);
                prefilled += s.prefilled_tokens.load(Ordering::Relaxed);
                eligible += s.slo_eligible.load(Ordering::Relaxed);
                met += s.slo_met.load(Ordering::Relaxed);
                decode += s.decode_tokens.load(Ordering::Relaxed);
            }
        }
        // Rates over a barely observed window (just after start) divide by
        // at least one slot: three requests in the first 10 ms are not 300
        // requests per second.
        let secs = covered.max(b) as f64 / 1e6;
        let avg = |g: usize| {
            if covered == 0 {
                0.0
            } else {
                (area[g] as f64 / covered as f64).max(0.0)
            }
        };
        let rate = |n: u64| if covered == 0 { 0.0 } else { n as f64 / secs };
        let mut hists: [Merged; LATENCIES] = Default::default();
        self.merge_histograms(now, length, latencies, &mut hists);
        let [ttft, itl, e2e, queue_wait] = hists.each_ref().map(merged_summary);
        let values = WindowValues {
            duration: length,
            observed: Duration::from_micros(covered),
            concurrency: avg(IN_FLIGHT),
            rps: rate(arrivals),
            queue: avg(QUEUED),
            tokens: avg(PREFILL_TOKENS) + avg(DECODE_TOKENS),
            prompt_tokens_per_sec: rate(prompt),
            decode_tokens_per_sec: rate(decode),
            prefilled_tokens_per_sec: rate(prefilled),
            prefill_busy: avg(PREFILL_BUSY),
            decode_busy: avg(DECODE_BUSY),
            slo_eligible: eligible,
            slo_met: met,
            arrivals,
            completions,
            ttft,
            itl,
            e2e,
            queue_wait,
        };
        (values, hists)
    }

    /// The stable and panic windows ending now with the latency
    /// histograms in `latencies`, whole (the others, and empty ones,
    /// `None`): what a gateway replica sends the leader, which merges
    /// histograms rather than quantiles. With 1,000 pools the histograms
    /// not asked for were most of the bytes and the CPU.
    pub fn windows_with_histograms(
        &self,
        stable: Duration,
        panic: Duration,
        latencies: Latencies,
    ) -> WindowsWithHistograms {
        // Each window once: its values and the histograms asked for.
        let (now, in_flight, queued, last_activity) = self.now_state();
        let (s, s_hists) = self.window_parts(now, stable, latencies);
        let (p, p_hists) = self.window_parts(now, panic, latencies);
        let wanted = latencies.as_array();
        let histograms = |hists: &[Merged; LATENCIES]| -> [Option<Histogram<u64>>; LATENCIES] {
            // An empty one travels as nothing, like one not asked for:
            // an idle pool costs neither side a histogram.
            std::array::from_fn(|i| {
                wanted
                    .get(i)
                    .copied()
                    .unwrap_or(false)
                    .then(|| {
                        hists
                            .get(i)
                            .filter(|m| !m.is_empty())
                            .map(Merged::to_histogram)
                    })
                    .flatten()
            })
        };
        WindowsWithHistograms {
            stable: (s, histograms(&s_hists)),
            panic: (p, histograms(&p_hists)),
            in_flight_now: in_flight,
            queued_now: queued,
            idle: last_activity.map(|t| Duration::from_micros(now).saturating_sub(t)),
        }
    }

    fn merge_histograms(
        &self,
        now: u64,
        length: Duration,
        latencies: Latencies,
        into: &mut [Merged; LATENCIES],
    ) {
        let wanted = latencies.as_array();
        let h = self.hist_slot_us;
        let current = now / h;
        let partial = now - current * h;
        let whole = micros(length).saturating_sub(partial).div_ceil(h);
        let first = current.saturating_sub(whole).max(self.start_us / h);
        for number in first..=current {
            let Some(s) = kept(&self.hists, number) else {
                continue;
            };
            for ((counts, merged), wanted) in s.latencies.iter().zip(into.iter_mut()).zip(wanted) {
                if wanted {
                    merged.add(counts);
                }
            }
        }
    }

    /// The window's latency histograms (TTFT, ITL, end-to-end, queue wait),
    /// for merging across gateway replicas.
    pub fn window_histograms(&self, length: Duration) -> [Histogram<u64>; 4] {
        let mut hists: [Merged; LATENCIES] = Default::default();
        self.merge_histograms(
            self.now_us(),
            length.min(self.retention),
            Latencies::ALL,
            &mut hists,
        );
        hists.each_ref().map(Merged::to_histogram)
    }
}

fn to_duration(units: u64) -> Duration {
    histogram::UNIT * u32::try_from(units).unwrap_or(u32::MAX)
}

/// [`summary`] of a window's merged counts, without a `Histogram`.
fn merged_summary(m: &Merged) -> LatencySummary {
    if m.is_empty() {
        return LatencySummary::default();
    }
    let layout = |v: u64| to_duration(histogram::highest_equivalent(v));
    LatencySummary {
        count: m.len(),
        mean: Some(Duration::from_secs_f64(
            m.mean() * histogram::UNIT.as_secs_f64(),
        )),
        p50: Some(layout(m.value_at_quantile(0.5))),
        p90: Some(layout(m.value_at_quantile(0.9))),
        p99: Some(layout(m.value_at_quantile(0.99))),
    }
}

/// Quantiles of a histogram in [`histogram::UNIT`]s.
pub fn summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    let q = |p: f64| Some(to_duration(h.highest_equivalent(h.value_at_quantile(p))));
    LatencySummary {
        count: h.len(),
        mean: Some(Duration::from_secs_f64(
            h.mean() * histogram::UNIT.as_secs_f64(),
        )),
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
    }
}

#[cfg(test)]
mod tests;
