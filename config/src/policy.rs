//! The typed scaling policy of one scale target, with Knative's defaults.
//!
//! A `Policy` is built once, from annotations or a file, and validated as a
//! whole; everything downstream trusts it and never re-checks.

use std::time::Duration;

/// The role a pool of model servers plays for its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Role {
    /// One server does prefill and decode.
    #[default]
    Unified,
    /// The prefill half of a disaggregated model.
    Prefill,
    /// The decode half of a disaggregated model.
    Decode,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Unified, Role::Prefill, Role::Decode];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unified => "unified",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The signal an algorithm scales on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Metric {
    /// Average requests in flight plus requests waiting in the proxy's
    /// queue (time-weighted), per replica — as Knative counts the requests
    /// its queue-proxy and activator hold.
    #[default]
    Concurrency,
    /// Requests arriving per second, per replica.
    Rps,
    /// Tokens in flight (prompt tokens admitted + decode KV footprint), per replica.
    Tokens,
    /// Requests in flight plus requests queued at the proxy, per replica:
    /// the same sum as `concurrency`, under the name that says so.
    Queue,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Concurrency => "concurrency",
            Metric::Rps => "rps",
            Metric::Tokens => "tokens",
            Metric::Queue => "queue",
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HPA `selectPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectPolicy {
    /// The policy allowing the largest change (HPA default).
    #[default]
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No change in this direction at all.
    Disabled,
}

/// One HPA scaling policy: at most `value` pods, or `value` percent of the
/// replicas at the start of the period, per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HpaRatePolicy {
    Pods { value: u32, period: Duration },
    Percent { value: u32, period: Duration },
}

/// HPA `behavior` for one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct HpaRules {
    pub stabilization_window: Duration,
    pub policies: Vec<HpaRatePolicy>,
    pub select_policy: SelectPolicy,
}

/// HPA `behavior`, defaults as Kubernetes: scale up with no stabilization,
/// max(4 pods, 100 %) per 15 s; scale down after a 300 s stabilization
/// window, 100 % per 15 s.
#[derive(Debug, Clone, PartialEq)]
pub struct HpaBehavior {
    pub scale_up: HpaRules,
    pub scale_down: HpaRules,
    /// Ratio tolerance around 1.0 inside which nothing changes (0.1).
    pub tolerance: f64,
}

impl Default for HpaBehavior {
    fn default() -> Self {
        HpaBehavior {
            scale_up: HpaRules {
                stabilization_window: Duration::ZERO,
                policies: vec![
                    HpaRatePolicy::Pods {
                        value: 4,
                        period: Duration::from_secs(15),
                    },
                    HpaRatePolicy::Percent {
                        value: 100,
                        period: Duration::from_secs(15),
                    },
                ],
                select_policy: SelectPolicy::Max,
            },
            scale_down: HpaRules {
                stabilization_window: Duration::from_secs(300),
                policies: vec![HpaRatePolicy::Percent {
                    value: 100,
                    period: Duration::from_secs(15),
                }],
                select_policy: SelectPolicy::Max,
            },
            tolerance: 0.1,
        }
    }
}

/// A preferred share of a PD group's replicas for one role, in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShareBand {
    pub min_percent: f64,
    pub max_percent: f64,
}

/// One field of a cron expression: the set of allowed values as a bitmask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CronField(pub u64);

impl CronField {
    pub fn contains(self, v: u32) -> bool {
        v < 64 && self.0 & (1u64 << v) != 0
    }
}

/// A five-field cron expression (minute hour day-of-month month day-of-week),
/// evaluated in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    pub minute: CronField,
    pub hour: CronField,
    pub day_of_month: CronField,
    pub month: CronField,
    pub day_of_week: CronField,
    /// The text as the user wrote it, for messages.
    pub source: String,
}

/// A schedule floor: from each time `cron` fires, for `duration`, the
/// minimum replica count is at least `min_replicas`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleFloor {
    pub cron: Cron,
    pub duration: Duration,
    pub min_replicas: u32,
}

/// The algorithm of a policy that names none: `slo`, the LLM default (a
/// TTFT target, measured capacity, sizing for the cold start). Knative's
/// `kpa` and the HPA's formula stay one key away.
pub const DEFAULT_ALGORITHM: &str = "slo";

/// `ttft-target` and `itl-target` when `slo` runs without them.
pub const DEFAULT_TTFT_TARGET: Duration = Duration::from_secs(2);
pub const DEFAULT_ITL_TARGET: Duration = Duration::from_millis(50);

/// `slo`'s prior for one replica's prefill rate (prompt tokens per second)
/// when `target` is not set: a mid-sized model on one GPU. The proxy's
/// measurement replaces it at the first busy seconds.
pub const SLO_PRIOR_CAPACITY: f64 = 4000.0;

/// `slo`'s `target-utilization-percentage` when not set: the most of a
/// replica's measured prefill rate it plans to use. Below it, a queueing
/// model sets the headroom random arrivals need for the TTFT target (a
/// small pool runs far cooler); the ceiling is what long prompts colliding
/// in bursts need on top (on the long-context bursts, 75 % kept 96.7 % of
/// requests in time, 65 % 99.7 %).
pub const SLO_UTILIZATION: f64 = 0.65;

/// The scaling policy of one scale target. Field docs give each annotation
/// key (with the `scalecar.io/` prefix on workloads, without it in files).
///
/// `Policy::default()` is Knative's KPA with its defaults, the base that
/// code and tests build on; a policy parsed from keys (annotations, the
/// config file, `--set`) that names no algorithm is `slo` with the LLM
/// defaults instead ([`DEFAULT_ALGORITHM`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `algorithm`: the registered algorithm name (`slo` when parsed from
    /// keys that name none; `kpa` in `Policy::default()`).
    pub algorithm: String,
    /// `metric` (`concurrency`).
    pub metric: Metric,
    /// `target`: the per-replica value of `metric` to hold. The default
    /// depends on the metric: concurrency 100, rps 200, tokens 100 000,
    /// queue 100 (Knative's container-concurrency-target-default is 100).
    pub target: f64,
    /// Whether `target` was set by a key (false: the algorithm's default,
    /// which `slo` may replace with what it learns of a replica).
    pub target_given: bool,
    /// `target-utilization-percentage` (70) as a fraction (0.7).
    pub target_utilization: f64,
    /// `ttft-target`: the TTFT the `slo` algorithm keeps prefill and
    /// unified pools under (2 s for `slo` when not set).
    pub ttft_target: Option<Duration>,
    /// `itl-target`: the ITL the `slo` algorithm keeps decode pools under
    /// (50 ms for `slo` when not set).
    pub itl_target: Option<Duration>,
    /// `slo-percentile` (99): which latency percentile `slo` keeps under
    /// the target — 50, 90 or 99 (99: "99 % of requests within the
    /// target").
    pub slo_percentile: u32,
    /// `min-replicas` (1: LLM servers take minutes to start, so zero is an
    /// explicit choice).
    pub min_replicas: u32,
    /// `max-replicas` (unbounded when absent).
    pub max_replicas: Option<u32>,
    /// `initial-scale` (1).
    pub initial_scale: u32,
    /// `activation-scale` (1): the least count when scaling up from zero.
    pub activation_scale: u32,
    /// `window`: the stable window (60 s).
    pub window: Duration,
    /// `panic-window-percentage` (10): the panic window as a percentage of
    /// the stable window.
    pub panic_window_percentage: f64,
    /// `panic-threshold-percentage` (200).
    pub panic_threshold_percentage: f64,
    /// `max-scale-up-rate` (1000).
    pub max_scale_up_rate: f64,
    /// `max-scale-down-rate` (2).
    pub max_scale_down_rate: f64,
    /// `scale-down-delay` (0 s).
    pub scale_down_delay: Duration,
    /// `scale-to-zero-grace-period` (30 s).
    pub scale_to_zero_grace_period: Duration,
    /// `cold-start`: from asking for a replica to its serving. Unset, `slo`
    /// uses what the pod watch observed (created → Ready), else 60 s.
    pub cold_start: Option<Duration>,
    /// `kv-cache-tokens`: tokens one replica's KV cache holds. Unset, `slo`
    /// uses what the engines report on their `/metrics`, else no KV term.
    pub kv_cache_tokens: Option<u32>,
    /// `max-concurrency`: requests per pod the proxy lets through at once
    /// (unlimited when absent). Also the default `target` of the
    /// concurrency and queue metrics when `target` is not set (Knative's
    /// containerConcurrency).
    pub max_concurrency: Option<u32>,
    /// `group`: the PD group this target belongs to.
    pub group: Option<String>,
    /// `preferred-share`: e.g. `20-50` (percent of the group's replicas).
    pub preferred_share: Option<ShareBand>,
    /// `schedule`: schedule floors.
    pub schedule: Vec<ScheduleFloor>,
    /// `hpa-*` keys: HPA behavior, used by the `hpa` algorithm.
    pub hpa: HpaBehavior,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            algorithm: "kpa".to_string(),
            metric: Metric::Concurrency,
            target: 100.0,
            target_given: false,
            target_utilization: 0.7,
            ttft_target: None,
            itl_target: None,
            slo_percentile: 99,
            min_replicas: 1,
            max_replicas: None,
            initial_scale: 1,
            activation_scale: 1,
            window: Duration::from_secs(60),
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_down_delay: Duration::ZERO,
            scale_to_zero_grace_period: Duration::from_secs(30),
            cold_start: None,
            kv_cache_tokens: None,
            max_concurrency: None,
            group: None,
            preferred_share: None,
            schedule: Vec::new(),
            hpa: HpaBehavior::default(),
        }
    }
}

impl Policy {
    /// The panic window: `panic-window-percentage` of the stable window.
    /// Every combination Knative accepts is valid here; a window shorter
    /// than the signals' bucket is measured as one bucket by the signals.
    pub fn panic_window(&self) -> Duration {
        self.window.mul_f64(self.panic_window_percentage / 100.0)
    }

    /// The upper bound on replicas (`u32::MAX` when unbounded).
    pub fn max_bound(&self) -> u32 {
        self.max_replicas.unwrap_or(u32::MAX)
    }
}
