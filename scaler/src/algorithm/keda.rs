//! `keda-prometheus`: the autoscaler most LLM deployments run today, as a
//! baseline — KEDA's Prometheus scaler on the model servers' own queue
//! metric, applied by the HPA.
//!
//! The chain, with its default intervals:
//!
//! 1. Prometheus scrapes every model server every 15 s; the sample is the
//!    instantaneous `num_requests_running + num_requests_waiting` summed
//!    over the pods (the requests the servers hold: the proxy's in-flight
//!    count, which is the same requests seen from the other side).
//! 2. KEDA polls the query every 30 s and serves the latest result to the
//!    HPA as an external metric (`AverageValue` target = `target`, the
//!    scaler's `threshold`).
//! 3. The HPA syncs every 15 s: `ceil(value / target)` with its 10 %
//!    tolerance, its default behavior (scale-up max(4 pods, 100 %) per 15 s,
//!    a 300 s scale-down stabilization window) or the policy's `hpa-*`
//!    keys, through the same code as `hpa`.
//!
//! Between syncs the last recommendation stands. Nothing here is meant to
//! be chosen for a real workload: it exists so `scalecar simulate` can say
//! what measuring in the request path is worth.

use std::time::Duration;

use scalecar_config::{Metric, Policy};

use super::{Decision, DecisionInput, Hpa, ScalingAlgorithm};
use crate::snapshot::{WindowSnapshot, WindowValues};

/// Prometheus' scrape interval.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(15);
/// KEDA's polling interval.
pub const POLL_INTERVAL: Duration = Duration::from_secs(30);
/// The HPA controller's sync period.
pub const SYNC_PERIOD: Duration = Duration::from_secs(15);

/// The chain's state for one target.
#[derive(Debug)]
pub struct KedaPrometheus {
    hpa: Hpa,
    /// The latest scrape: (when, value).
    scraped: Option<(Duration, f64)>,
    next_scrape: Duration,
    /// What KEDA last read from Prometheus.
    polled: Option<f64>,
    next_poll: Duration,
    next_sync: Duration,
    /// The HPA's last decision, which stands between syncs.
    last: Option<Decision>,
}

impl KedaPrometheus {
    /// Starts at clock time `now`: the first scrape is due at once, the
    /// first poll and sync a little after (the three are not aligned in a
    /// cluster either).
    pub fn new(now: Duration) -> Self {
        KedaPrometheus {
            hpa: Hpa::new(),
            scraped: None,
            next_scrape: now,
            polled: None,
            next_poll: now + Duration::from_secs(10),
            next_sync: now + Duration::from_secs(5),
            last: None,
        }
    }
}

/// The next instant of a periodic event after `due` that is at or before
/// `now` (the period's later multiples).
fn advance(due: Duration, period: Duration, now: Duration) -> Duration {
    let mut next = due;
    while next <= now {
        next += period;
    }
    next
}

impl ScalingAlgorithm for KedaPrometheus {
    /// Load metrics only: no latency.
    fn latencies(&self, _role: scalecar_config::Role) -> crate::snapshot::Latencies {
        crate::snapshot::Latencies::NONE
    }

    fn name(&self) -> &str {
        "keda-prometheus"
    }

    fn decide(&mut self, input: &DecisionInput<'_>) -> Decision {
        let now = input.now;
        let snap = input.snapshot;
        if now >= self.next_scrape {
            // A gauge is scraped as it is at that instant.
            self.scraped = Some((now, snap.in_flight_now as f64));
            self.next_scrape = advance(self.next_scrape, SCRAPE_INTERVAL, now);
        }
        if now >= self.next_poll {
            self.polled = self.scraped.map(|(_, v)| v);
            self.next_poll = advance(self.next_poll, POLL_INTERVAL, now);
        }
        if now < self.next_sync {
            return self
                .last
                .clone()
                .unwrap_or_else(|| Decision::none("no HPA sync yet"));
        }
        self.next_sync = advance(self.next_sync, SYNC_PERIOD, now);
        let Some(value) = self.polled else {
            return Decision::none("KEDA has not polled a scraped value yet");
        };
        // KEDA's threshold is an AverageValue per pod: no utilization.
        let policy = Policy {
            metric: Metric::Concurrency,
            target_utilization: 1.0,
            ..input.policy.clone()
        };
        let window = WindowValues {
            duration: input.policy.window,
            observed: input.policy.window,
            concurrency: value,
            ..WindowValues::default()
        };
        let metric_snapshot = WindowSnapshot {
            stable: window,
            panic: window,
            ..*snap
        };
        let mut decision = self.hpa.decide(&DecisionInput {
            snapshot: &metric_snapshot,
            policy: &policy,
            ..*input
        });
        decision.reason = format!(
            "KEDA's last poll of Prometheus: {value:.0} requests running + waiting on the servers; {}",
            decision.reason
        );
        self.last = Some(decision.clone());
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scalecar_config::Role;

    fn at(k: &mut KedaPrometheus, p: &Policy, t: u64, spec: u32, in_flight: u64) -> Option<u32> {
        let snap = WindowSnapshot {
            stable: WindowValues {
                duration: Duration::from_secs(60),
                observed: Duration::from_secs(60),
                ..WindowValues::default()
            },
            in_flight_now: in_flight,
            ..WindowSnapshot::default()
        };
        k.decide(&DecisionInput {
            now: Duration::from_secs(t),
            ready: spec,
            spec,
            snapshot: &snap,
            policy: p,
            role: Role::Unified,
            reachable: true,
            partial: false,
            cold_start: None,
            kv_capacity: None,
        })
        .desired
    }

    /// KEDA's threshold 10 per pod.
    fn threshold_10() -> Policy {
        Policy {
            algorithm: "keda-prometheus".into(),
            target: 10.0,
            ..Policy::default()
        }
    }

    #[test]
    fn a_burst_is_seen_through_scrape_poll_and_sync() {
        let p = threshold_10();
        let mut k = KedaPrometheus::new(Duration::ZERO);
        // Quiet: 10 running on 1 pod. Scraped at 0, polled at 10, synced
        // at 20: 1 replica.
        for t in (0..=20).step_by(2) {
            at(&mut k, &p, t, 1, 10);
        }
        assert_eq!(at(&mut k, &p, 22, 1, 10), Some(1));
        // A burst from t = 24: 80 requests held. The scrape at 30 sees
        // it, the poll at 40 reads it, the sync at 50 acts: nothing moves
        // before, though the burst is 26 s old by then.
        for t in (24..50).step_by(2) {
            assert_eq!(at(&mut k, &p, t, 1, 80), Some(1), "t = {t}");
        }
        // HPA's scale-up limit: max(4 pods, 100 %) per 15 s from 1 → 5.
        assert_eq!(at(&mut k, &p, 50, 1, 80), Some(5));
        // Held between syncs.
        assert_eq!(at(&mut k, &p, 52, 5, 80), Some(5));
    }

    #[test]
    fn the_scale_down_waits_for_the_stabilization_window() {
        let p = threshold_10();
        let mut k = KedaPrometheus::new(Duration::ZERO);
        for t in (0..=60).step_by(2) {
            at(&mut k, &p, t, 4, 40);
        }
        assert_eq!(at(&mut k, &p, 62, 4, 40), Some(4));
        // Load gone at 64: the HPA keeps the highest recommendation of the
        // last 300 s.
        for t in (64..360).step_by(2) {
            assert_eq!(at(&mut k, &p, t, 4, 0), Some(4), "t = {t}");
        }
        let mut down = None;
        for t in (360..420).step_by(2) {
            down = down.or(at(&mut k, &p, t, 4, 0).filter(|&d| d < 4));
        }
        // Down to min-replicas (1) once the window has passed.
        assert_eq!(down, Some(1));
    }
}
