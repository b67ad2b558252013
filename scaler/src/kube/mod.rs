//! The Kubernetes side of the scaler, on kube-rs: the watcher of annotated
//! workloads, the generic scale target, pod discovery, rescale Events,
//! the leader Lease and the memory it hands on. The decision core (signals, algorithms,
//! behavior, the control loop) never imports this module: it sees only the
//! `ScaleTarget` and `DecisionObserver` traits.

mod competitors;
mod events;
mod lease;
mod memory;
mod pods;
mod scale;
mod selector;
mod workloads;

pub use competitors::{Claimed, Claims, watch_competitors};
pub use events::{EventWriter, RescaleEvents};
pub use lease::{LeaderElector, Leadership, LeaseTiming, WriteLease};
pub use memory::{ConfigMapMemory, MEMORY_KEY};
pub use pods::{
    Owner, PodChange, PodIndex, PodInfo, Pods, cold_starts_of, endpoints_of, watch_pods,
    workload_of,
};
pub use scale::KubeScaleTarget;
pub use selector::{LabelSelector, SelectorError};
pub use workloads::{
    Annotated, INFERENCE_POOL_GROUP, INFERENCE_POOL_KIND, Listed, PoolPods, Recognized, Workload,
    WorkloadChange, Workloads, watch_workloads,
};
