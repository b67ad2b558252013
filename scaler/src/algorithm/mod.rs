//! Scaling algorithms and their registry.
//!
//! An algorithm turns a pool's window snapshot and its policy into a desired
//! replica count. It may keep state (KPA's panic mode, HPA's recommendation
//! history) but never reads a clock or does I/O: time comes in the input, so
//! every algorithm runs on virtual time in tests and in `scalecar replay`.

use std::time::Duration;

use scalecar_config::Policy;

use crate::snapshot::WindowSnapshot;

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
    /// True when some gateway replica's signals are missing from the
    /// snapshot: the decision may scale up but never down.
    pub partial: bool,
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
