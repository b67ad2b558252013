//! scalecar-scaler: signals, scaling algorithms, behavior and the control
//! loop.
//!
//! Role: record what the proxy sees per pool into lock-free windowed
//! signals, and decide from them — through a registry of algorithms (KPA,
//! HPA, SLO, plugins) — how many replicas each scale target should have.
//!
//! Not here: HTTP proxying, config parsing (see `scalecar-config`), wall
//! clocks in decisions. The decision core is pure: time arrives as input.
//! Kubernetes is one effect behind the [`target::ScaleTarget`] trait, in
//! the `kube` module (feature `kube`, on by default): without it the crate
//! builds with no Kubernetes client at all.
//!
//! What an algorithm learnt outlives a leader: the leader saves it through
//! a [`memory::MemoryStore`] and its successor starts from it.
//!
//! Invariants: recording is atomics-only and allocation-free; replicas never
//! leave [min, max]; missing, stale or partial data never scales down, while
//! zero traffic is data and may.
//!
//! Memory: a pool's signals take a fixed ~3 MB (latency histograms of a
//! 60 s window in 64 slots) plus ~13 KB of counters, whatever the traffic;
//! see [`signals`].

pub mod algorithm;
pub mod balance;
pub mod behavior;
pub mod clock;
pub mod control;
#[cfg(feature = "kube")]
pub mod kube;
pub mod memory;
pub mod pd;
pub mod peer;
pub mod signals;
pub mod snapshot;
pub mod target;

pub use snapshot::{LatencySummary, WindowSnapshot, WindowValues};
