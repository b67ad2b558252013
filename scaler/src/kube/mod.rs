//! The Kubernetes side of the scaler, on kube-rs: here the generic scale
//! target; the workload watcher, pod discovery, Events and the leader Lease
//! join it. The decision core (signals, algorithms, behavior, the control
//! loop) never imports this module: it sees only the `ScaleTarget` trait.

mod scale;

pub use scale::KubeScaleTarget;
