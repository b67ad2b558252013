//! scalecar-config: the policy and config-file schema of scalecar.
//!
//! Role: turn what users write — `scalecar.io/*` annotations on a workload,
//! or the same keys without the prefix in a YAML file — into a typed,
//! validated [`Policy`] with Knative's defaults filled in, and read the
//! config file of `scalecar run`.
//!
//! Not here: any network, any Kubernetes client, any clock. This crate is
//! pure so that the proxy, the scaler and `scalecar replay` share one
//! definition of what a valid policy is.
//!
//! Invariants: a `Policy` that comes out of a parser is valid (min ≤ max,
//! rates and percentages in range, durations within bounds); every
//! rejection names the key, the value and what is allowed, and all of an
//! input's problems are reported at once; no input panics.

mod cron;
mod error;
mod file;
mod keys;
mod policy;

pub use cron::MAX_FLOOR_DURATION;
pub use error::{PolicyError, PolicyErrors};
pub use file::{
    AdminConfig, ConfigError, ExtProcConfig, KindConfig, KubernetesConfig, LeaderElectionConfig,
    Limits, PoolConfig, ProxyConfig, Scalar, ScalecarConfig, ScalerConfig,
    policy_keys_from_yaml_str,
};
pub use keys::{AnnotatedTarget, KeyContext, POLICY_KEYS, PREFIX, WorkloadName, validate_group};
pub use policy::{
    Cron, CronField, DEFAULT_ALGORITHM, DEFAULT_ITL_TARGET, DEFAULT_TTFT_TARGET, HpaBehavior,
    HpaRatePolicy, HpaRules, Metric, Policy, Role, SLO_PRIOR_CAPACITY, SLO_UTILIZATION,
    ScheduleFloor, SelectPolicy, ShareBand,
};
