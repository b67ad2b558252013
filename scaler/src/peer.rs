//! Window snapshots that merge across gateway replicas: each replica sees
//! only its share of the traffic, the leader decides on the sum.
//!
//! What merges exactly is what is sent: per window the replica's
//! time-weighted averages and rates (the pool's total is their sum), its
//! counts, and its latency histograms whole, as HdrHistogram V2 — never
//! quantiles, which cannot be merged (the p90 of two p90s is nobody's p90).
//! A snapshot that does not decode is an error naming what was wrong; it
//! never panics and never counts as zero.

use std::io::Cursor;
use std::time::Duration;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::signals::{PoolSignals, WindowsWithHistograms, histogram, summary};
use crate::snapshot::{WindowSnapshot, WindowValues};

/// One pool's windows, as the leader asks a peer for them. A tick asks
/// each peer once for every pool (`POST /internal/snapshots`, a JSON
/// [`SnapshotAsks`]), over a connection kept from tick to tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAsk {
    pub model: String,
    /// `unified`, `prefill` or `decode`.
    pub role: String,
    pub window_ms: u64,
    pub panic_window_ms: u64,
    /// The latency histograms the decision reads (`ttft`, `itl`, `e2e`,
    /// `queue_wait`); the rest come back empty. Absent (an older leader):
    /// all four.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histograms: Option<Vec<String>>,
}

impl SnapshotAsk {
    /// The latencies asked for.
    pub fn latencies(&self) -> crate::snapshot::Latencies {
        match &self.histograms {
            Some(names) => crate::snapshot::Latencies::from_names(names.iter().map(String::as_str)),
            None => crate::snapshot::Latencies::ALL,
        }
    }
}

/// The body of `POST /internal/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAsks {
    pub asks: Vec<SnapshotAsk>,
}

/// The answer: one entry per ask, in order; `None` where the peer has no
/// such pool (yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotAnswers {
    pub snapshots: Vec<Option<PeerSnapshot>>,
}

/// One window of one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerWindow {
    pub duration_ms: u64,
    pub observed_ms: u64,
    pub concurrency: f64,
    pub rps: f64,
    pub queue: f64,
    pub tokens: f64,
    pub prompt_tokens_per_sec: f64,
    pub decode_tokens_per_sec: f64,
    /// Absent from peers older than the measured capacity: zero.
    #[serde(default)]
    pub prefilled_tokens_per_sec: f64,
    #[serde(default)]
    pub prefill_busy: f64,
    #[serde(default)]
    pub decode_busy: f64,
    #[serde(default)]
    pub slo_eligible: u64,
    #[serde(default)]
    pub slo_met: u64,
    pub arrivals: u64,
    pub completions: u64,
    /// TTFT, ITL, end-to-end and queue wait, each an HdrHistogram V2, or
    /// empty where the leader did not ask for it.
    pub histograms: [Vec<u8>; 4],
}

/// One replica's view of one pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerSnapshot {
    pub stable: PeerWindow,
    pub panic: PeerWindow,
    pub in_flight_now: u64,
    pub queued_now: u64,
    /// How long the pool has been idle at this replica (`None`: unknown).
    pub idle_ms: Option<u64>,
}

/// Why a peer's snapshot cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("{window} window: histogram {index} is not an HdrHistogram V2: {message}")]
    Histogram {
        window: &'static str,
        index: usize,
        message: String,
    },
    #[error("{window} window: {what} is not a finite, non-negative number")]
    Value {
        window: &'static str,
        what: &'static str,
    },
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PeerSnapshot {
    /// This replica's view of the pool behind `signals`: both windows
    /// with the histograms in `latencies` (the others sent empty).
    pub fn of(
        signals: &PoolSignals,
        stable: Duration,
        panic: Duration,
        latencies: crate::snapshot::Latencies,
    ) -> Self {
        PeerSnapshot::from(signals.windows_with_histograms(stable, panic, latencies))
    }

    /// [`Self::of`] with every histogram.
    pub fn all(signals: &PoolSignals, stable: Duration, panic: Duration) -> Self {
        Self::of(signals, stable, panic, crate::snapshot::Latencies::ALL)
    }
}

impl From<WindowsWithHistograms> for PeerSnapshot {
    fn from(w: WindowsWithHistograms) -> Self {
        PeerSnapshot {
            stable: PeerWindow::new(&w.stable.0, &w.stable.1),
            panic: PeerWindow::new(&w.panic.0, &w.panic.1),
            in_flight_now: w.in_flight_now,
            queued_now: w.queued_now,
            idle_ms: w.idle.map(ms),
        }
    }
}

impl PeerWindow {
    /// `hists`: `None` for a latency the leader did not ask for, sent as
    /// an empty buffer.
    pub fn new(v: &WindowValues, hists: &[Option<Histogram<u64>>; 4]) -> Self {
        let histograms = hists.each_ref().map(|h| {
            let mut out = Vec::new();
            if let Some(h) = h {
                // Serializing into a Vec cannot fail for a valid histogram.
                let _ = V2Serializer::new().serialize(h, &mut out);
            }
            out
        });
        PeerWindow {
            duration_ms: ms(v.duration),
            observed_ms: ms(v.observed),
            concurrency: v.concurrency,
            rps: v.rps,
            queue: v.queue,
            tokens: v.tokens,
            prompt_tokens_per_sec: v.prompt_tokens_per_sec,
            decode_tokens_per_sec: v.decode_tokens_per_sec,
            prefilled_tokens_per_sec: v.prefilled_tokens_per_sec,
            prefill_busy: v.prefill_busy,
            decode_busy: v.decode_busy,
            slo_eligible: v.slo_eligible,
            slo_met: v.slo_met,
            arrivals: v.arrivals,
            completions: v.completions,
            histograms,
        }
    }
}

/// Sums of one window across replicas. A histogram is allocated only
/// once a replica sent one: with 1,000 pools, allocating all four for each
/// window was most of a leader's tick.
struct Sum {
    v: WindowValues,
    hists: [Option<Histogram<u64>>; 4],
}

impl Sum {
    fn new() -> Self {
        Sum {
            v: WindowValues::default(),
            hists: Default::default(),
        }
    }

    fn add(&mut self, w: &PeerWindow, window: &'static str) -> Result<(), MergeError> {
        for (what, x) in [
            ("concurrency", w.concurrency),
            ("rps", w.rps),
            ("queue", w.queue),
            ("tokens", w.tokens),
            ("prompt_tokens_per_sec", w.prompt_tokens_per_sec),
            ("decode_tokens_per_sec", w.decode_tokens_per_sec),
            ("prefilled_tokens_per_sec", w.prefilled_tokens_per_sec),
            ("prefill_busy", w.prefill_busy),
            ("decode_busy", w.decode_busy),
        ] {
            if !x.is_finite() || x < 0.0 {
                return Err(MergeError::Value { window, what });
            }
        }
        let mut decoded: [Option<Histogram<u64>>; 4] = Default::default();
        for (index, (bytes, slot)) in w.histograms.iter().zip(decoded.iter_mut()).enumerate() {
            // Not asked for: nothing to add.
            if bytes.is_empty() {
                continue;
            }
            let h: Histogram<u64> = Deserializer::new()
                .deserialize(&mut Cursor::new(bytes))
                .map_err(|e| MergeError::Histogram {
                    window,
                    index,
                    message: format!("{e:?}"),
                })?;
            *slot = Some(h);
        }
        // Everything decoded: only now is anything added (all or nothing).
        for (slot, h) in self.hists.iter_mut().zip(decoded) {
            let Some(h) = h else { continue };
            let into = slot.get_or_insert_with(histogram::empty);
            // Values beyond the receiving range are clamped into it, never
            // dropped (a latency over an hour is still one sample).
            for v in h.iter_recorded() {
                let value = v.value_iterated_to().min(into.high());
                let _ = into.record_n(value, v.count_at_value());
            }
        }
        let s = &mut self.v;
        s.duration = s.duration.max(Duration::from_millis(w.duration_ms));
        s.observed = s.observed.max(Duration::from_millis(w.observed_ms));
        s.concurrency += w.concurrency;
        s.rps += w.rps;
        s.queue += w.queue;
        s.tokens += w.tokens;
        s.prompt_tokens_per_sec += w.prompt_tokens_per_sec;
        s.decode_tokens_per_sec += w.decode_tokens_per_sec;
        s.prefilled_tokens_per_sec += w.prefilled_tokens_per_sec;
        // Gateway replicas share the model servers: each sees an endpoint
        // busy while its own requests wait there, and those spans overlap
        // under load. The busiest replica's view is the closest to the
        // union (summing would count one busy endpoint once per gateway
        // and divide the measured rate by their number).
        s.prefill_busy = s.prefill_busy.max(w.prefill_busy);
        s.decode_busy = s.decode_busy.max(w.decode_busy);
        s.slo_eligible = s.slo_eligible.saturating_add(w.slo_eligible);
        s.slo_met = s.slo_met.saturating_add(w.slo_met);
        s.arrivals = s.arrivals.saturating_add(w.arrivals);
        s.completions = s.completions.saturating_add(w.completions);
        Ok(())
    }

    fn finish(self) -> WindowValues {
        let [ttft, itl, e2e, queue_wait] = self
            .hists
            .each_ref()
            .map(|h| h.as_ref().map(summary).unwrap_or_default());
        WindowValues {
            ttft,
            itl,
            e2e,
            queue_wait,
            ..self.v
        }
    }
}

/// The pool's snapshot over all `replicas` (the leader's own included), at
/// clock time `at`. Averages and rates add up, counts add up, histograms
/// are merged before quantiles are read; the pool was last active when the
/// least idle replica saw it.
pub fn merge(replicas: &[PeerSnapshot], at: Duration) -> Result<WindowSnapshot, MergeError> {
    let (mut stable, mut panic) = (Sum::new(), Sum::new());
    let (mut in_flight, mut queued) = (0u64, 0u64);
    let mut idle: Option<u64> = None;
    for r in replicas {
        stable.add(&r.stable, "stable")?;
        panic.add(&r.panic, "panic")?;
        in_flight = in_flight.saturating_add(r.in_flight_now);
        queued = queued.saturating_add(r.queued_now);
        if let Some(i) = r.idle_ms {
            idle = Some(idle.map_or(i, |x| x.min(i)));
        }
    }
    Ok(WindowSnapshot {
        at,
        stable: stable.finish(),
        panic: panic.finish(),
        in_flight_now: in_flight,
        queued_now: queued,
        last_activity: idle.map(|i| at.saturating_sub(Duration::from_millis(i))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::signals::{PoolSignals, SignalsConfig};
    use proptest::prelude::*;
    use std::sync::Arc;

    #[derive(Debug, Clone)]
    enum Ev {
        /// A request at replica `r`: arrives, is dispatched, gets its first
        /// token after `ttft` ms, generates `n` tokens, completes.
        Request {
            r: usize,
            prompt: u64,
            ttft: u64,
            n: u64,
        },
        Advance(u64),
    }

    fn events() -> impl Strategy<Value = (usize, Vec<Ev>)> {
        (1usize..=4).prop_flat_map(|k| {
            let ev = prop_oneof![
                (0..k, 1u64..4000, 1u64..3000, 0u64..50)
                    .prop_map(|(r, prompt, ttft, n)| Ev::Request { r, prompt, ttft, n }),
                (1u64..1500).prop_map(Ev::Advance),
            ];
            (Just(k), proptest::collection::vec(ev, 1..80))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Merging K replicas' snapshots equals the snapshot of all their
        /// events recorded in one place: counts exactly, averages and rates
        /// to rounding, quantiles exactly (the histograms add up bucket by
        /// bucket).
        #[test]
        fn merging_k_snapshots_is_recording_in_one_place((k, evs) in events()) {
            let clock = Arc::new(ManualClock::new(Duration::from_secs(100)));
            let config = SignalsConfig::for_window(Duration::from_secs(30));
            let replicas: Vec<PoolSignals> = (0..k).map(|_| PoolSignals::new(config, clock.clone())).collect();
            let all = PoolSignals::new(config, clock.clone());
            let mut open: Vec<(usize, u64, u64)> = Vec::new();
            for ev in &evs {
                match *ev {
                    Ev::Request { r, prompt, ttft, n } => {
                        for s in [&replicas[r], &all] {
                            s.arrival(prompt);
                            s.dispatch(prompt);
                            s.first_token(prompt, Duration::from_millis(ttft));
                            s.decode_tokens(n);
                        }
                        open.push((r, prompt, n));
                        // Up to three requests stay open across time, at
                        // any of the replicas; the oldest finishes first.
                        if open.len() > 3 {
                            let (r, prompt, n) = open.remove(0);
                            for s in [&replicas[r], &all] {
                                s.complete(prompt, n, true, Some(Duration::from_millis(ttft + n)));
                            }
                        }
                    }
                    Ev::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                }
            }
            let (stable, panic) = (Duration::from_secs(30), Duration::from_secs(6));
            let parts: Vec<PeerSnapshot> = replicas.iter().map(|s| PeerSnapshot::all(s, stable, panic)).collect();
            // Through JSON, as peers send them.
            let wire = serde_json::to_string(&parts).unwrap();
            let parts: Vec<PeerSnapshot> = serde_json::from_str(&wire).unwrap();
            let merged = merge(&parts, clock.now()).unwrap();
            let whole = all.snapshot(stable, panic);
            for (m, w) in [(&merged.stable, &whole.stable), (&merged.panic, &whole.panic)] {
                prop_assert_eq!(m.arrivals, w.arrivals);
                prop_assert_eq!(m.completions, w.completions);
                for (a, b) in [
                    (m.concurrency, w.concurrency),
                    (m.rps, w.rps),
                    (m.tokens, w.tokens),
                    (m.prompt_tokens_per_sec, w.prompt_tokens_per_sec),
                    (m.decode_tokens_per_sec, w.decode_tokens_per_sec),
                ] {
                    prop_assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{} vs {}", a, b);
                }
                prop_assert_eq!(m.ttft, w.ttft);
                prop_assert_eq!(m.e2e, w.e2e);
            }
            prop_assert_eq!(merged.in_flight_now, whole.in_flight_now);
            prop_assert_eq!(merged.queued_now, whole.queued_now);
            // Asked for TTFT alone (slo's prefill decision): the same TTFT,
            // the same values, the other histograms not sent at all.
            let ttft = crate::snapshot::Latencies::TTFT;
            let parts: Vec<PeerSnapshot> = replicas.iter().map(|s| PeerSnapshot::of(s, stable, panic, ttft)).collect();
            for p in &parts {
                prop_assert!(p.stable.histograms[1..].iter().all(Vec::is_empty));
            }
            let wire = serde_json::to_string(&parts).unwrap();
            let parts: Vec<PeerSnapshot> = serde_json::from_str(&wire).unwrap();
            let only = merge(&parts, clock.now()).unwrap();
            prop_assert_eq!(only.stable.ttft, whole.stable.ttft);
            prop_assert_eq!(only.panic.ttft, whole.panic.ttft);
            prop_assert_eq!(only.stable.arrivals, whole.stable.arrivals);
            prop_assert_eq!(only.stable.e2e.count, 0);
        }
    }

    #[test]
    fn an_ask_names_the_histograms_it_wants_and_an_old_leader_gets_all() {
        let ask: SnapshotAsk = serde_json::from_str(
            r#"{"model": "m", "role": "unified", "window_ms": 60000, "panic_window_ms": 6000,
                "histograms": ["itl", "queue_wait", "later"]}"#,
        )
        .unwrap();
        assert_eq!(
            ask.latencies().as_array(),
            [false, true, false, true],
            "known names taken, unknown ones left out"
        );
        let old: SnapshotAsk = serde_json::from_str(
            r#"{"model": "m", "role": "unified", "window_ms": 60000, "panic_window_ms": 6000}"#,
        )
        .unwrap();
        assert_eq!(old.latencies(), crate::snapshot::Latencies::ALL);
        assert_eq!(
            crate::snapshot::Latencies::from_names(
                crate::snapshot::Latencies::ITL
                    .names()
                    .iter()
                    .map(String::as_str)
            ),
            crate::snapshot::Latencies::ITL
        );
    }

    #[test]
    fn a_snapshot_that_does_not_decode_is_an_error_not_zero() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(10)));
        let s = PoolSignals::new(SignalsConfig::default(), clock.clone());
        s.arrival(10);
        let mut bad = PeerSnapshot::all(&s, Duration::from_secs(60), Duration::from_secs(6));
        bad.panic.histograms[1] = vec![1, 2, 3];
        let e = merge(&[bad.clone()], clock.now()).unwrap_err();
        assert!(e.to_string().contains("panic window: histogram 1"), "{e}");
        bad.panic.histograms[1] = bad.stable.histograms[1].clone();
        bad.stable.rps = f64::NAN;
        let e = merge(&[bad], clock.now()).unwrap_err();
        assert!(e.to_string().contains("rps"), "{e}");
    }
}
