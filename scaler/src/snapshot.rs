//! What the signals hand to an algorithm: the values of the stable and the
//! panic window of one pool at one instant. Plain data, cheap to copy, and
//! the unit exchanged between recorder, algorithms, replay and peers.

use std::time::Duration;

use scalecar_config::Metric;

/// Which latency summaries a snapshot computes. Each is a merge of up to
/// 64 histogram slots, the bulk of a snapshot's cost (memory-bound with a
/// thousand pools): a decision asks only for those its algorithm reads,
/// and the others stay empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies {
    pub ttft: bool,
    pub itl: bool,
    pub e2e: bool,
    pub queue_wait: bool,
}

impl Latencies {
    pub const ALL: Latencies = Latencies {
        ttft: true,
        itl: true,
        e2e: true,
        queue_wait: true,
    };
    pub const NONE: Latencies = Latencies {
        ttft: false,
        itl: false,
        e2e: false,
        queue_wait: false,
    };
    pub const TTFT: Latencies = Latencies {
        ttft: true,
        ..Latencies::NONE
    };
    pub const ITL: Latencies = Latencies {
        itl: true,
        ..Latencies::NONE
    };

    /// In the signals' histogram order: TTFT, ITL, end-to-end, queue wait.
    pub fn as_array(self) -> [bool; 4] {
        [self.ttft, self.itl, self.e2e, self.queue_wait]
    }

    /// The names on the wire, in the signals' histogram order.
    pub const NAMES: [&'static str; 4] = ["ttft", "itl", "e2e", "queue_wait"];

    /// The names of the latencies set.
    pub fn names(self) -> Vec<String> {
        Self::NAMES
            .iter()
            .zip(self.as_array())
            .filter(|(_, on)| *on)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// The latencies named; names it does not know are left out.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Latencies {
        let mut l = Latencies::NONE;
        for n in names {
            match n {
                "ttft" => l.ttft = true,
                "itl" => l.itl = true,
                "e2e" => l.e2e = true,
                "queue_wait" => l.queue_wait = true,
                _ => {}
            }
        }
        l
    }
}

/// Latency quantiles of one window. `None` where the window saw no sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: Option<Duration>,
    pub p50: Option<Duration>,
    pub p90: Option<Duration>,
    pub p99: Option<Duration>,
}

/// The values of one window (stable or panic). Gauges are exact
/// time-weighted averages over the window; rates are per second.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowValues {
    /// The window's length.
    pub duration: Duration,
    /// How much of the window the recorder has actually covered (shorter
    /// than `duration` just after start). Zero means no data at all.
    pub observed: Duration,
    /// Average requests in flight (admitted to an endpoint, not finished).
    pub concurrency: f64,
    /// Arrivals per second (measured at admission, never from completions).
    pub rps: f64,
    /// Average requests waiting in the proxy's queue.
    pub queue: f64,
    /// Average tokens in flight: prompt tokens of requests before their first
    /// token plus prompt + generated tokens of requests in decode.
    pub tokens: f64,
    /// Prompt tokens admitted per second.
    pub prompt_tokens_per_sec: f64,
    /// Generated (decode) tokens per second.
    pub decode_tokens_per_sec: f64,
    /// Prompt tokens whose first token arrived, per second: prefill work
    /// done (admitted prompt tokens are work asked for).
    pub prefilled_tokens_per_sec: f64,
    /// Average endpoints with at least one request waiting for its first
    /// token (busy prefilling, or with prefill work queued inside).
    pub prefill_busy: f64,
    /// Average endpoints with at least one request decoding.
    pub decode_busy: f64,
    /// First tokens of requests whose prompt alone fits the TTFT target at
    /// a replica's measured prefill rate (those a scaler can be held to),
    /// and of those, the ones within the target.
    pub slo_eligible: u64,
    pub slo_met: u64,
    pub arrivals: u64,
    pub completions: u64,
    pub ttft: LatencySummary,
    pub itl: LatencySummary,
    pub e2e: LatencySummary,
    pub queue_wait: LatencySummary,
}

impl WindowValues {
    /// The window's value of `metric`, summed over the pool (not per replica).
    pub fn metric(&self, metric: Metric) -> f64 {
        match metric {
            // Requests held in the proxy's queue are load waiting for a
            // replica, as Knative's activator and queue-proxy count theirs.
            Metric::Concurrency | Metric::Queue => self.concurrency + self.queue,
            Metric::Rps => self.rps,
            Metric::Tokens => self.tokens,
        }
    }

    /// Prompt tokens one replica prefilled per second while it had prefill
    /// work: a replica's measured prefill rate, `None` with less than
    /// `min_busy` of endpoint-busy time in the window to measure it on.
    /// A backlog does not lower it: queued work keeps the endpoint busy
    /// and the rate is what it got through meanwhile.
    pub fn prefill_rate(&self, min_busy: Duration) -> Option<f64> {
        let busy_secs = self.prefill_busy * self.observed.as_secs_f64();
        (busy_secs >= min_busy.as_secs_f64()
            && busy_secs > 0.0
            && self.prefilled_tokens_per_sec > 0.0)
            .then(|| self.prefilled_tokens_per_sec / self.prefill_busy)
    }

    /// Tokens one replica generated per second while it had sequences
    /// decoding, as [`Self::prefill_rate`].
    pub fn decode_rate(&self, min_busy: Duration) -> Option<f64> {
        let busy_secs = self.decode_busy * self.observed.as_secs_f64();
        (busy_secs >= min_busy.as_secs_f64() && busy_secs > 0.0 && self.decode_tokens_per_sec > 0.0)
            .then(|| self.decode_tokens_per_sec / self.decode_busy)
    }

    /// The share of eligible first tokens within the TTFT target, with
    /// how many were judged (`None`: none).
    pub fn slo_attainment(&self) -> Option<(f64, u64)> {
        (self.slo_eligible > 0).then(|| {
            (
                self.slo_met.min(self.slo_eligible) as f64 / self.slo_eligible as f64,
                self.slo_eligible,
            )
        })
    }

    /// Whether the recorder covered any of this window.
    pub fn has_data(&self) -> bool {
        !self.observed.is_zero()
    }
}

/// A pool's signals at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowSnapshot {
    /// Clock time the snapshot was taken at.
    pub at: Duration,
    pub stable: WindowValues,
    pub panic: WindowValues,
    /// Requests in flight right now.
    pub in_flight_now: u64,
    /// Requests queued at the proxy right now.
    pub queued_now: u64,
    /// Clock time of the last arrival or of the last moment a request was in
    /// flight or queued — or, if the pool saw no traffic at all, when its
    /// signals began watching: idleness is only ever what was observed.
    /// Scale to zero counts its grace period from here; `None` (unknown)
    /// never scales to zero.
    pub last_activity: Option<Duration>,
}
