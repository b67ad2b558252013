//! Scaling algorithms and their registry.
//!
//! An algorithm turns a pool's window snapshot and its policy into a desired
//! replica count. It may keep state (KPA's panic mode, HPA's recommendation
//! history, SLO's learned capacity) but never reads a clock or does I/O:
//! time comes in the input, so every algorithm runs on virtual time in tests
//! and in `scalecar replay`.

pub mod capacity;
mod hpa;
mod keda;
mod kpa;
pub mod queueing;
mod slo;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use scalecar_config::{Policy, Role};

use crate::snapshot::WindowSnapshot;

pub use hpa::Hpa;
pub use keda::KedaPrometheus;
pub use kpa::Kpa;
pub use slo::Slo;

/// Everything an algorithm may look at for one decision.
#[derive(Debug, Clone, Copy)]
pub struct DecisionInput<'a> {
    /// Clock time of this decision (monotonic, virtual in tests).
    pub now: Duration,
    /// Pods ready to serve.
    pub ready: u32,
    /// The target's current `spec.replicas` (ready plus still starting).
    pub spec: u32,
    pub snapshot: &'a WindowSnapshot,
    pub policy: &'a Policy,
    /// The pool's role (SLO keeps TTFT for prefill and unified, ITL for
    /// decode).
    pub role: Role,
    /// The pool is routed to. An unreachable pool (no route sends it
    /// traffic) may drop to zero without the scale-down rate limit, as
    /// Knative does for unreachable revisions.
    pub reachable: bool,
    /// True when some gateway replica's signals are missing from the
    /// snapshot: the decision may scale up but never down.
    pub partial: bool,
    /// How long this workload's replicas took from created to ready, as
    /// observed (`None`: nothing observed yet).
    pub cold_start: Option<Duration>,
    /// Tokens one replica's KV cache holds, as its engine reports it
    /// (`None`: not reported). The policy's `kv-cache-tokens` wins.
    pub kv_capacity: Option<u64>,
}

/// What an algorithm decided, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The desired replica count; `None` means "no decision" (no or stale
    /// data): the caller holds the current count.
    pub desired: Option<u32>,
    /// Whether the algorithm is in panic mode.
    pub panic: bool,
    /// The stable-window value of the metric used (pool total).
    pub stable_value: f64,
    /// The panic-window value of the metric used (pool total).
    pub panic_value: f64,
    /// The per-replica target used.
    pub target: f64,
    /// In words, e.g. `ttft p90 1.2s over target 500ms (panic)`.
    pub reason: String,
}

impl Decision {
    /// No decision: nothing to scale on.
    pub fn none(reason: impl Into<String>) -> Decision {
        Decision {
            desired: None,
            panic: false,
            stable_value: 0.0,
            panic_value: 0.0,
            target: 0.0,
            reason: reason.into(),
        }
    }
}

/// A scaling algorithm with its state, for one target.
pub trait ScalingAlgorithm: Send + fmt::Debug {
    /// The registered name.
    fn name(&self) -> &str;
    fn decide(&mut self, input: &DecisionInput<'_>) -> Decision;
    /// The latency summaries `decide` reads for a pool in `role`; the
    /// others are left empty in its snapshots (they cost the most to
    /// compute). All, unless the algorithm says otherwise.
    fn latencies(&self, _role: Role) -> crate::snapshot::Latencies {
        crate::snapshot::Latencies::ALL
    }
    /// What this algorithm has learnt that a successor should start from
    /// (see [`crate::memory`]), as of clock time `now`, every time in it
    /// an age. `None`: nothing worth carrying (the default: KPA and the HPA
    /// start afresh on a new leader, as Knative's autoscaler and the
    /// kube-controller-manager do).
    fn remember(&self, _now: Duration) -> Option<serde_json::Value> {
        None
    }
    /// Starts from `memory` (what [`ScalingAlgorithm::remember`] gave, saved
    /// `elapsed` ago) at clock time `now`, in place of a fresh start.
    /// Called only on an algorithm that has not decided yet. An error
    /// leaves the algorithm as it was: fresh.
    fn recall(
        &mut self,
        _memory: &serde_json::Value,
        _now: Duration,
        _elapsed: Duration,
    ) -> Result<(), RecallError> {
        Err(RecallError::NotKept)
    }
}

/// Why an algorithm did not take a memory.
#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    #[error("this algorithm keeps no memory")]
    NotKept,
    #[error("not this algorithm's memory: {0}")]
    Shape(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Builds an algorithm for a target: its policy, the ready count at
/// creation, and the clock time.
pub type AlgorithmFactory =
    Arc<dyn Fn(&Policy, u32, Duration) -> Box<dyn ScalingAlgorithm> + Send + Sync>;

/// Why a registration or creation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("an algorithm named {0:?} is already registered")]
    Duplicate(String),
    #[error("algorithm {name:?} is not registered; registered: {known}")]
    Unknown { name: String, known: String },
}

/// Algorithms by name. The control loop and replay create every target's
/// algorithm through it, by the name the policy gives.
#[derive(Clone, Default)]
pub struct AlgorithmRegistry {
    factories: BTreeMap<String, AlgorithmFactory>,
}

impl fmt::Debug for AlgorithmRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.factories.keys()).finish()
    }
}

impl AlgorithmRegistry {
    /// A registry with `kpa`, `hpa`, `slo` and the `keda-prometheus`
    /// baseline.
    pub fn with_builtins() -> Self {
        let mut r = AlgorithmRegistry::default();
        let builtins: [(&str, AlgorithmFactory); 4] = [
            (
                "kpa",
                Arc::new(|p: &Policy, ready, now| {
                    Box::new(Kpa::new(p, ready, now)) as Box<dyn ScalingAlgorithm>
                }),
            ),
            (
                "hpa",
                Arc::new(|_: &Policy, _, _| Box::new(Hpa::new()) as Box<dyn ScalingAlgorithm>),
            ),
            (
                "slo",
                Arc::new(|p: &Policy, _, _| Box::new(Slo::new(p)) as Box<dyn ScalingAlgorithm>),
            ),
            (
                "keda-prometheus",
                Arc::new(|_: &Policy, _, now| {
                    Box::new(KedaPrometheus::new(now)) as Box<dyn ScalingAlgorithm>
                }),
            ),
        ];
        for (name, factory) in builtins {
            // The names are distinct constants.
            let _ = r.register(name, factory);
        }
        r
    }

    /// Registers `name`; a name registered twice is an error.
    pub fn register(&mut self, name: &str, factory: AlgorithmFactory) -> Result<(), RegistryError> {
        if self.factories.contains_key(name) {
            return Err(RegistryError::Duplicate(name.to_string()));
        }
        self.factories.insert(name.to_string(), factory);
        Ok(())
    }

    pub fn names(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    /// Creates the algorithm the policy names.
    pub fn create(
        &self,
        policy: &Policy,
        ready: u32,
        now: Duration,
    ) -> Result<Box<dyn ScalingAlgorithm>, RegistryError> {
        match self.factories.get(&policy.algorithm) {
            Some(f) => Ok(f(policy, ready, now)),
            None => Err(RegistryError::Unknown {
                name: policy.algorithm.clone(),
                known: self.names().join(", "),
            }),
        }
    }
}

/// Formats a duration for reasons: `1.2s`, `350ms`.
pub(crate) fn show(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::snapshot::WindowValues;
    use scalecar_config::Metric;

    /// A snapshot whose stable and panic windows carry `stable` and `panic`
    /// as the pool total of `metric`.
    pub fn snapshot(metric: Metric, stable: f64, panic: f64, policy: &Policy) -> WindowSnapshot {
        let values = |v: f64, d: Duration| {
            let mut w = WindowValues {
                duration: d,
                observed: d,
                ..WindowValues::default()
            };
            match metric {
                Metric::Concurrency | Metric::Queue => w.concurrency = v,
                Metric::Rps => w.rps = v,
                Metric::Tokens => w.tokens = v,
            }
            w
        };
        WindowSnapshot {
            at: Duration::ZERO,
            stable: values(stable, policy.window),
            panic: values(panic, policy.panic_window()),
            in_flight_now: 0,
            queued_now: 0,
            last_activity: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(u32);

    impl ScalingAlgorithm for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn decide(&mut self, _: &DecisionInput<'_>) -> Decision {
            Decision {
                desired: Some(self.0),
                ..Decision::none("fixed")
            }
        }
    }

    #[test]
    fn registering_twice_is_an_error_and_dispatch_is_by_name() {
        let mut r = AlgorithmRegistry::with_builtins();
        assert_eq!(r.names(), vec!["hpa", "keda-prometheus", "kpa", "slo"]);
        let e = r.register(
            "kpa",
            Arc::new(|_: &Policy, _, _| Box::new(Fixed(1)) as Box<dyn ScalingAlgorithm>),
        );
        assert_eq!(e, Err(RegistryError::Duplicate("kpa".into())));
        r.register(
            "fixed",
            Arc::new(|_: &Policy, _, _| Box::new(Fixed(7)) as Box<dyn ScalingAlgorithm>),
        )
        .unwrap();
        let policy = Policy {
            algorithm: "fixed".into(),
            ..Policy::default()
        };
        let mut a = r.create(&policy, 1, Duration::ZERO).unwrap();
        assert_eq!(a.name(), "fixed");
        let snap = WindowSnapshot::default();
        let input = DecisionInput {
            now: Duration::ZERO,
            ready: 1,
            spec: 1,
            snapshot: &snap,
            policy: &policy,
            role: Role::Unified,
            reachable: true,
            partial: false,
            cold_start: None,
            kv_capacity: None,
        };
        assert_eq!(a.decide(&input).desired, Some(7));
        for name in ["kpa", "hpa", "slo", "keda-prometheus"] {
            let p = Policy {
                algorithm: name.into(),
                ..Policy::default()
            };
            assert_eq!(r.create(&p, 1, Duration::ZERO).unwrap().name(), name);
        }
        let p = Policy {
            algorithm: "nope".into(),
            ..Policy::default()
        };
        let e = r.create(&p, 1, Duration::ZERO).unwrap_err().to_string();
        assert_eq!(
            e,
            "algorithm \"nope\" is not registered; registered: fixed, hpa, keda-prometheus, kpa, slo"
        );
    }
}
