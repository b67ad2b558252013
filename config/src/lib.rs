//! scalecar-config: the policy and config-file schema of scalecar.
//!
//! Role: turn what users write — `scalecar.io/*` annotations on a workload,
//! or the same keys without the prefix in a YAML file — into a typed,
//! validated [`Policy`] with Knative's defaults filled in.
//!
//! Not here: any network, any Kubernetes client, any clock. This crate is
//! pure so that the proxy, the scaler and `scalecar replay` share one
//! definition of what a valid policy is.
//!
//! Invariants: a `Policy` that exists is valid (min ≤ max, rates and
//! percentages in range, durations within bounds); every rejection names the
//! key, the value and what is allowed; no input panics.

mod policy;

pub use policy::{
    Cron, CronField, HpaBehavior, HpaRatePolicy, HpaRules, Metric, Policy, Role, ScheduleFloor,
    SelectPolicy, ShareBand,
};
