//! The Kubernetes side of the scaler, on kube-rs: the generic scale target
//! and the watcher of annotated workloads; pod discovery, rescale Events and
//! the leader Lease join them. The decision core (signals, algorithms, behavior, the control
//! loop) never imports this module: it sees only the `ScaleTarget` trait.

mod scale;
mod workloads;

pub use scale::KubeScaleTarget;
pub use workloads::{Workload, Workloads, watch_workloads};
