//! The policy keys: `scalecar.io/<key>` on a workload, `<key>` in files and
//! `--set`. Each key's value is parsed on its own, then the policy is
//! checked as a whole; every problem is reported, not only the first.
//!
//! HPA behavior keys (for `algorithm: hpa`): `hpa-tolerance` (0.1),
//! `hpa-scale-up-stabilization-window` (0s), `hpa-scale-down-stabilization-window`
//! (300s), `hpa-scale-up-policies` (`pods=4/15s, percent=100/15s`),
//! `hpa-scale-down-policies` (`percent=100/15s`), `hpa-scale-up-select-policy`
//! and `hpa-scale-down-select-policy` (`max`, `min` or `disabled`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{PolicyError, PolicyErrors, did_you_mean};
use crate::policy::{HpaRatePolicy, Metric, Policy, Role, ScheduleFloor, SelectPolicy, ShareBand};

/// The annotation prefix.
pub const PREFIX: &str = "scalecar.io/";

/// Keys that say what a workload serves rather than how it scales.
pub const IDENTITY_KEYS: [&str; 4] = ["model", "role", "port", "workload"];

/// Every policy key.
pub const POLICY_KEYS: [&str; 35] = [
    "algorithm",
    "metric",
    "target",
    "target-utilization-percentage",
    "ttft-target",
    "itl-target",
    "slo-percentile",
    "min-replicas",
    "max-replicas",
    "initial-scale",
    "activation-scale",
    "window",
    "panic-window-percentage",
    "panic-threshold-percentage",
    "max-scale-up-rate",
    "max-scale-down-rate",
    "scale-down-delay",
    "scale-to-zero-grace-period",
    "cold-start",
    "kv-cache-tokens",
    "max-concurrency",
    "group",
    "preferred-share",
    "schedule",
    "hpa-tolerance",
    "hpa-scale-up-stabilization-window",
    "hpa-scale-down-stabilization-window",
    "hpa-scale-up-policies",
    "hpa-scale-down-policies",
    "hpa-scale-up-select-policy",
    "hpa-scale-down-select-policy",
    // Reserved for the identity keys when allowed; listed for did-you-mean.
    "model",
    "role",
    "port",
    "workload",
];

/// Where keys come from, for messages and for which keys are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyContext {
    /// Workload annotations: keys carry the `scalecar.io/` prefix; model,
    /// role and port are allowed.
    Annotations,
    /// A pool in the config file: model and role are fields of the pool,
    /// not policy keys.
    Pool,
    /// A bare policy (`scalecar replay`): scaling keys only.
    Policy,
}

/// A workload's annotations, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct AnnotatedTarget {
    /// The first name of `scalecar.io/model`: the workload's own, which
    /// labels its decisions and its pool's gauges.
    pub model: String,
    /// The other names the same pods serve (LoRA adapters, aliases, the
    /// rest of a `--served-model-name` list), in the annotation's order:
    /// routed to the same pool and measured per name, while the workload
    /// is decided once on the sum.
    pub aliases: Vec<String>,
    pub role: Role,
    pub port: Option<u16>,
    /// `scalecar.io/workload` (`Kind/name`): on an `InferencePool`, the
    /// workload its pods belong to, when their owners cannot say (no pods
    /// yet, to scale from zero). Meaningless on a workload itself.
    pub workload: Option<WorkloadName>,
    pub policy: Policy,
}

/// A workload named by `Kind/name` in the annotated object's namespace;
/// the kind's API group is resolved against the kinds scalecar watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadName {
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

fn workload_name(v: &str) -> Result<WorkloadName, String> {
    let (kind, name) = v
        .trim()
        .split_once('/')
        .ok_or_else(|| "must be Kind/name (like Deployment/llama)".to_string())?;
    if !kind.starts_with(|c: char| c.is_ascii_alphabetic())
        || !kind.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(format!("{kind:?} is not a kind (like Deployment)"));
    }
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label) {
        return Err(format!("{name:?} is not an object name"));
    }
    Ok(WorkloadName {
        kind: kind.to_string(),
        name: name.to_string(),
    })
}

fn shown(ctx: KeyContext, key: &str) -> String {
    match ctx {
        KeyContext::Annotations => format!("{PREFIX}{key}"),
        KeyContext::Pool | KeyContext::Policy => key.to_string(),
    }
}

struct Reader<'a> {
    ctx: KeyContext,
    keys: &'a BTreeMap<String, String>,
    errors: PolicyErrors,
}

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.keys.get(key).map(|v| v.trim())
    }

    fn fail(&mut self, key: &str, value: &str, problem: impl std::fmt::Display) {
        let e = PolicyError::value(&shown(self.ctx, key), value, problem);
        self.errors.push(e);
    }

    fn parse<T>(&mut self, key: &str, f: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let value = self.get(key)?.to_string();
        match f(&value) {
            Ok(v) => Some(v),
            Err(problem) => {
                self.fail(key, &value, problem);
                None
            }
        }
    }

    fn u32_in(&mut self, key: &str, lo: u32, hi: u32) -> Option<u32> {
        self.parse(key, |v| {
            // Read wider than u32, so that a number too large is told its
            // range rather than that it is no number.
            let n: u64 = v.parse().map_err(|_| "is not an integer ≥ 0".to_string())?;
            u32::try_from(n)
                .ok()
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| format!("must be in [{lo}, {hi}]"))
        })
    }

    fn f64_where(&mut self, key: &str, ok: impl Fn(f64) -> bool, allowed: &str) -> Option<f64> {
        self.parse(key, |v| {
            let x: f64 = v.parse().map_err(|_| "is not a number".to_string())?;
            if !x.is_finite() || !ok(x) {
                return Err(format!("must be {allowed}"));
            }
            Ok(x)
        })
    }

    fn duration_in(&mut self, key: &str, lo: Duration, hi: Duration) -> Option<Duration> {
        self.parse(key, |v| {
            let d = humantime::parse_duration(v)
                .map_err(|_| "is not a duration (like 500ms, 60s, 5m)".to_string())?;
            if d < lo || d > hi {
                return Err(format!(
                    "must be between {} and {}",
                    humantime::format_duration(lo),
                    humantime::format_duration(hi)
                ));
            }
            Ok(d)
        })
    }
}

fn parse_hpa_policies(v: &str) -> Result<Vec<HpaRatePolicy>, String> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad =
            || format!("entry {part:?} is not pods=N/PERIOD or percent=N/PERIOD (e.g. pods=4/15s)");
        let (kind, rest) = part.split_once('=').ok_or_else(bad)?;
        let (value, period) = rest.split_once('/').ok_or_else(bad)?;
        let value: u32 = value.trim().parse().map_err(|_| bad())?;
        let period = humantime::parse_duration(period.trim()).map_err(|_| bad())?;
        if value == 0 || period.is_zero() || period > Duration::from_secs(1800) {
            return Err(format!(
                "entry {part:?}: value must be > 0 and the period in (0s, 30m] as in Kubernetes"
            ));
        }
        out.push(match kind.trim() {
            "pods" => HpaRatePolicy::Pods { value, period },
            "percent" => HpaRatePolicy::Percent { value, period },
            _ => return Err(bad()),
        });
    }
    if out.is_empty() {
        return Err("lists no policy".into());
    }
    Ok(out)
}

fn parse_select(v: &str) -> Result<SelectPolicy, String> {
    match v.to_ascii_lowercase().as_str() {
        "max" => Ok(SelectPolicy::Max),
        "min" => Ok(SelectPolicy::Min),
        "disabled" => Ok(SelectPolicy::Disabled),
        _ => Err("must be max, min or disabled".into()),
    }
}

fn parse_share(v: &str) -> Result<ShareBand, String> {
    let bad = || "is not a percent band like 20-50".to_string();
    let (a, b) = v.split_once('-').ok_or_else(bad)?;
    let min: f64 = a.trim().trim_end_matches('%').parse().map_err(|_| bad())?;
    let max: f64 = b.trim().trim_end_matches('%').parse().map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&min) || !(0.0..=100.0).contains(&max) {
        return Err("must be within 0-100".into());
    }
    if min > max {
        return Err(format!("has min {min} greater than max {max}"));
    }
    Ok(ShareBand {
        min_percent: min,
        max_percent: max,
    })
}

/// `scalecar.io/model`: one served model name, or several separated by
/// commas (a base model and its LoRA adapters, aliases) that the same pods
/// serve. The first, then the rest in order.
fn served_names(v: &str) -> Result<(String, Vec<String>), String> {
    let mut names: Vec<String> = Vec::new();
    for name in v.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(if v.trim().is_empty() {
                "must not be empty".to_string()
            } else {
                "has an empty name: separate names with single commas".to_string()
            });
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{name:?} holds whitespace: separate several names with commas"
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!("names {name:?} twice"));
        }
        names.push(name.to_string());
    }
    let mut names = names.into_iter();
    let first = names.next().unwrap_or_default();
    Ok((first, names.collect()))
}

fn parse_role(v: &str) -> Result<Role, String> {
    Role::ALL
        .into_iter()
        .find(|r| r.as_str() == v)
        .ok_or_else(|| "must be unified, prefill or decode".to_string())
}

fn check_unknown(ctx: KeyContext, keys: &BTreeMap<String, String>, errors: &mut PolicyErrors) {
    for key in keys.keys() {
        let identity = IDENTITY_KEYS.contains(&key.as_str());
        let known = POLICY_KEYS.contains(&key.as_str());
        if known && (!identity || ctx == KeyContext::Annotations) {
            continue;
        }
        let message = if identity {
            format!(
                "{} is not a policy key here (it is set by the pool, not its policy)",
                shown(ctx, key)
            )
        } else {
            let candidates = POLICY_KEYS
                .iter()
                .copied()
                .filter(|k| ctx == KeyContext::Annotations || !IDENTITY_KEYS.contains(k));
            match did_you_mean(key, candidates) {
                Some(s) => format!(
                    "unknown key {}: did you mean {}?",
                    shown(ctx, key),
                    shown(ctx, s)
                ),
                None => format!("unknown key {}", shown(ctx, key)),
            }
        };
        errors.push(PolicyError::combination(&shown(ctx, key), message));
    }
}

/// Parses the policy keys of `keys` (without prefix) for a pool of `role`.
fn parse_policy(
    ctx: KeyContext,
    keys: &BTreeMap<String, String>,
    role: Role,
) -> (Policy, PolicyErrors) {
    let mut r = Reader {
        ctx,
        keys,
        errors: PolicyErrors::default(),
    };
    check_unknown(ctx, keys, &mut r.errors);
    let mut p = Policy {
        algorithm: crate::policy::DEFAULT_ALGORITHM.to_string(),
        ..Policy::default()
    };
    if let Some(v) = r.parse("algorithm", |v| {
        if !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Ok(v.to_string())
        } else {
            Err("is not an algorithm name (lowercase letters, digits and '-')".into())
        }
    }) {
        p.algorithm = v;
    }
    if let Some(m) = r.parse("metric", |v| match v {
        "concurrency" => Ok(Metric::Concurrency),
        "rps" => Ok(Metric::Rps),
        "tokens" => Ok(Metric::Tokens),
        "queue" => Ok(Metric::Queue),
        _ => Err("must be concurrency, rps, tokens or queue".into()),
    }) {
        p.metric = m;
    }
    p.target = match p.metric {
        Metric::Concurrency | Metric::Queue => 100.0,
        Metric::Rps => 200.0,
        Metric::Tokens => 100_000.0,
    };
    let explicit_target = r.f64_where("target", |x| x > 0.0, "a number greater than 0");
    if let Some(u) = r.f64_where(
        "target-utilization-percentage",
        |x| (1.0..=100.0).contains(&x),
        "in [1, 100]",
    ) {
        p.target_utilization = u / 100.0;
    } else if p.algorithm == "slo" {
        p.target_utilization = crate::policy::SLO_UTILIZATION;
    }
    let hour = Duration::from_secs(3600);
    p.ttft_target = r.duration_in("ttft-target", Duration::from_millis(1), hour);
    p.itl_target = r.duration_in(
        "itl-target",
        Duration::from_micros(100),
        Duration::from_secs(60),
    );
    if p.algorithm == "slo" {
        // The LLM default needs no latency key to start from: TTFT for
        // prefill and unified pools, ITL for decode pools.
        match role {
            Role::Decode => {
                p.itl_target = p.itl_target.or(Some(crate::policy::DEFAULT_ITL_TARGET));
            }
            Role::Unified | Role::Prefill => {
                p.ttft_target = p.ttft_target.or(Some(crate::policy::DEFAULT_TTFT_TARGET));
            }
        }
    }
    if let Some(q) = r.parse("slo-percentile", |v| match v.trim() {
        "50" => Ok(50),
        "90" => Ok(90),
        "99" => Ok(99),
        _ => Err("must be 50, 90 or 99".to_string()),
    }) {
        p.slo_percentile = q;
    }
    if let Some(n) = r.u32_in("min-replicas", 0, 100_000) {
        p.min_replicas = n;
    }
    p.max_replicas = r.u32_in("max-replicas", 1, 100_000);
    if let Some(n) = r.u32_in("initial-scale", 0, 100_000) {
        p.initial_scale = n;
    }
    if let Some(n) = r.u32_in("activation-scale", 1, 100_000) {
        p.activation_scale = n;
    }
    if let Some(w) = r.duration_in("window", Duration::from_secs(6), hour) {
        p.window = w;
    }
    if let Some(x) = r.f64_where(
        "panic-window-percentage",
        |x| (1.0..=100.0).contains(&x),
        "in [1, 100]",
    ) {
        p.panic_window_percentage = x;
    }
    if let Some(x) = r.f64_where(
        "panic-threshold-percentage",
        |x| (110.0..=1000.0).contains(&x),
        "in [110, 1000]",
    ) {
        p.panic_threshold_percentage = x;
    }
    if let Some(x) = r.f64_where("max-scale-up-rate", |x| x > 1.0, "greater than 1") {
        p.max_scale_up_rate = x;
    }
    if let Some(x) = r.f64_where("max-scale-down-rate", |x| x > 1.0, "greater than 1") {
        p.max_scale_down_rate = x;
    }
    if let Some(d) = r.duration_in("scale-down-delay", Duration::ZERO, hour) {
        p.scale_down_delay = d;
    }
    if let Some(d) = r.duration_in("scale-to-zero-grace-period", Duration::ZERO, hour) {
        p.scale_to_zero_grace_period = d;
    }
    p.cold_start = r.duration_in("cold-start", Duration::from_secs(1), hour);
    p.kv_cache_tokens = r.u32_in("kv-cache-tokens", 1, u32::MAX);
    p.max_concurrency = r.u32_in("max-concurrency", 1, 1_000_000);
    // As Knative's containerConcurrency: a per-pod cap on requests is also
    // the default per-pod concurrency target (before utilization), so a
    // pool whose cap queues requests scales out instead of holding.
    p.target_given = explicit_target.is_some();
    match (explicit_target, p.max_concurrency, p.metric) {
        (Some(t), _, _) => p.target = t,
        // slo's target is its prior for a replica's prefill rate, in prompt
        // tokens per second, until the proxy has measured one.
        (None, _, _) if p.algorithm == "slo" => p.target = crate::policy::SLO_PRIOR_CAPACITY,
        (None, Some(cap), Metric::Concurrency | Metric::Queue) => p.target = f64::from(cap),
        (None, _, _) => {}
    }
    p.group = r.parse("group", |v| {
        if !v.is_empty()
            && v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            Ok(v.to_string())
        } else {
            Err("is not a group name (letters, digits, '-', '_', '.'; at most 63)".into())
        }
    });
    p.preferred_share = r.parse("preferred-share", parse_share);
    if let Some(s) = r.parse("schedule", ScheduleFloor::parse_list) {
        p.schedule = s;
    }
    if let Some(t) = r.f64_where("hpa-tolerance", |x| (0.0..1.0).contains(&x), "in [0, 1)") {
        p.hpa.tolerance = t;
    }
    if let Some(d) = r.duration_in("hpa-scale-up-stabilization-window", Duration::ZERO, hour) {
        p.hpa.scale_up.stabilization_window = d;
    }
    if let Some(d) = r.duration_in("hpa-scale-down-stabilization-window", Duration::ZERO, hour) {
        p.hpa.scale_down.stabilization_window = d;
    }
    if let Some(v) = r.parse("hpa-scale-up-policies", parse_hpa_policies) {
        p.hpa.scale_up.policies = v;
    }
    if let Some(v) = r.parse("hpa-scale-down-policies", parse_hpa_policies) {
        p.hpa.scale_down.policies = v;
    }
    if let Some(v) = r.parse("hpa-scale-up-select-policy", parse_select) {
        p.hpa.scale_up.select_policy = v;
    }
    if let Some(v) = r.parse("hpa-scale-down-select-policy", parse_select) {
        p.hpa.scale_down.select_policy = v;
    }
    // The whole.
    let mut errors = r.errors;
    let name = |k: &str| shown(ctx, k);
    if let Some(max) = p.max_replicas {
        if p.min_replicas > max {
            errors.push(PolicyError::combination(
                &name("min-replicas"),
                format!(
                    "{} {} is greater than {} {max}",
                    name("min-replicas"),
                    p.min_replicas,
                    name("max-replicas")
                ),
            ));
        }
        if p.activation_scale > max {
            errors.push(PolicyError::combination(
                &name("activation-scale"),
                format!(
                    "{} {} is greater than {} {max}",
                    name("activation-scale"),
                    p.activation_scale,
                    name("max-replicas")
                ),
            ));
        }
        for f in &p.schedule {
            if f.min_replicas > max {
                errors.push(PolicyError::combination(
                    &name("schedule"),
                    format!(
                        "{} entry {:?} asks for min {} above {} {max}",
                        name("schedule"),
                        f.cron.source,
                        f.min_replicas,
                        name("max-replicas")
                    ),
                ));
            }
        }
    }
    (p, errors)
}

impl Policy {
    /// Parses policy keys without the prefix (a file's `policy:` map or
    /// `scalecar replay --set`), for a pool of `role`.
    pub fn from_keys(keys: &BTreeMap<String, String>, role: Role) -> Result<Policy, PolicyErrors> {
        let (p, errors) = parse_policy(KeyContext::Policy, keys, role);
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }

    /// Parses a pool's `policy:` keys (model and role are the pool's own
    /// fields there).
    pub fn from_pool_keys(
        keys: &BTreeMap<String, String>,
        role: Role,
    ) -> Result<Policy, PolicyErrors> {
        let (p, errors) = parse_policy(KeyContext::Pool, keys, role);
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }

    /// Parses a workload's annotations: every `scalecar.io/` key; others
    /// are not ours and are ignored.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<AnnotatedTarget, PolicyErrors> {
        let keys: BTreeMap<String, String> = annotations
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(PREFIX).map(|k| (k.to_string(), v.clone())))
            .collect();
        let mut errors = PolicyErrors::default();
        let (model, aliases) = match keys.get("model") {
            Some(v) => match served_names(v) {
                Ok((first, rest)) => (first, rest),
                Err(problem) => {
                    errors.push(PolicyError::value(&format!("{PREFIX}model"), v, problem));
                    (String::new(), Vec::new())
                }
            },
            None => {
                errors.push(PolicyError::combination(
                    &format!("{PREFIX}model"),
                    format!("{PREFIX}model is required (the served model name)"),
                ));
                (String::new(), Vec::new())
            }
        };
        let role = match keys.get("role") {
            Some(v) => parse_role(v.trim()).unwrap_or_else(|problem| {
                errors.push(PolicyError::value(&format!("{PREFIX}role"), v, problem));
                Role::Unified
            }),
            None => Role::Unified,
        };
        let port = keys
            .get("port")
            .and_then(|v| match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    errors.push(PolicyError::value(
                        &format!("{PREFIX}port"),
                        v,
                        "must be a port in [1, 65535]",
                    ));
                    None
                }
            });
        let workload = keys.get("workload").and_then(|v| match workload_name(v) {
            Ok(w) => Some(w),
            Err(problem) => {
                errors.push(PolicyError::value(&format!("{PREFIX}workload"), v, problem));
                None
            }
        });
        let (policy, policy_errors) = parse_policy(KeyContext::Annotations, &keys, role);
        errors.0.extend(policy_errors.0);
        if errors.is_empty() {
            Ok(AnnotatedTarget {
                model,
                aliases,
                role,
                port,
                workload,
                policy,
            })
        } else {
            Err(errors)
        }
    }

    /// Checks the algorithm name against the registered ones.
    pub fn validate_algorithm(&self, known: &[&str]) -> Result<(), PolicyError> {
        if known.contains(&self.algorithm.as_str()) {
            return Ok(());
        }
        let hint = did_you_mean(&self.algorithm, known.iter().copied())
            .map(|s| format!(" (did you mean {s}?)"))
            .unwrap_or_default();
        Err(PolicyError::combination(
            "algorithm",
            format!(
                "algorithm {:?} is not registered{hint}; registered: {}",
                self.algorithm,
                known.join(", ")
            ),
        ))
    }
}

/// Checks the members of one PD group: one prefill and one decode pool, no
/// unified pool, and preferred-share bands whose minimums fit in 100 %.
pub fn validate_group(group: &str, members: &[(Role, &Policy)]) -> Result<(), PolicyError> {
    let key = format!("group {group}");
    let count = |role| members.iter().filter(|(r, _)| *r == role).count();
    if count(Role::Unified) > 0 {
        return Err(PolicyError::combination(
            &key,
            format!("group {group}: a unified pool cannot be in a PD group"),
        ));
    }
    for role in [Role::Prefill, Role::Decode] {
        match count(role) {
            1 => {}
            0 => {
                return Err(PolicyError::combination(
                    &key,
                    format!("group {group} has no {role} pool"),
                ));
            }
            n => {
                return Err(PolicyError::combination(
                    &key,
                    format!("group {group} has {n} {role} pools; one is allowed"),
                ));
            }
        }
    }
    let sum: f64 = members
        .iter()
        .filter_map(|(_, p)| p.preferred_share)
        .map(|b| b.min_percent)
        .sum();
    if sum > 100.0 {
        return Err(PolicyError::combination(
            &key,
            format!(
                "group {group}: the preferred-share minimums add up to {sum} %, more than 100 %"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/annotations.md is the reference users read: its keys are the
    /// parser's, and its examples behave as it says.
    #[test]
    fn the_annotation_reference_matches_the_parser() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/annotations.md");
        let text = std::fs::read_to_string(path).unwrap();
        let cell = |c: &str| c.trim().trim_matches('`').to_string();
        let rows: Vec<Vec<String>> = text
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.split('|').map(cell).collect())
            .collect();
        let documented: std::collections::BTreeSet<&str> =
            rows.iter().map(|r| r[1].as_str()).collect();
        let known: std::collections::BTreeSet<&str> = POLICY_KEYS
            .iter()
            .chain(IDENTITY_KEYS.iter())
            .copied()
            .collect();
        assert_eq!(documented, known, "docs/annotations.md keys");
        let parse = |key: &str, value: &str| {
            let mut a = BTreeMap::from([(format!("{PREFIX}model"), "m".to_string())]);
            a.insert(format!("{PREFIX}{key}"), value.to_string());
            Policy::from_annotations(&a)
        };
        for r in &rows {
            let (key, accepted, refused) = (&r[1], &r[4], &r[5]);
            if let Err(e) = parse(key, accepted) {
                panic!("{key}: {accepted:?} is documented as accepted: {e}");
            }
            match parse(key, refused) {
                Ok(_) => panic!("{key}: {refused:?} is documented as refused"),
                Err(e) => assert!(
                    e.to_string().contains(&format!("{PREFIX}{key}")),
                    "{key}: the error names another key: {e}"
                ),
            }
        }
    }

    /// docs/migration.md: every scalecar key its tables name is a key the
    /// parser knows (with its example value, where one is given, accepted),
    /// and every annotated example parses.
    #[test]
    fn the_migration_guide_names_real_keys_and_its_examples_parse() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/migration.md");
        let text = std::fs::read_to_string(path).unwrap();
        let known: std::collections::BTreeSet<&str> = POLICY_KEYS
            .iter()
            .chain(IDENTITY_KEYS.iter())
            .copied()
            .collect();
        let mut checked = 0;
        for row in text.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let ours = cells.get(1).copied().unwrap_or_default();
            // `key`, `key: value`, or `key`, `key`, …
            for item in ours.split('`').skip(1).step_by(2) {
                let (key, value) = match item.split_once(": ") {
                    Some((k, v)) => (k.trim(), Some(v.trim())),
                    None => (item.trim(), None),
                };
                assert!(
                    known.contains(key),
                    "{key} (in {row:?}) is not a scalecar key"
                );
                // `N` stands for the number in the source's row.
                if let Some(v) = value.filter(|v| *v != "N") {
                    let mut a = BTreeMap::from([
                        (format!("{PREFIX}model"), "m".to_string()),
                        (format!("{PREFIX}{key}"), v.to_string()),
                    ]);
                    if key.starts_with("hpa-") {
                        a.insert(format!("{PREFIX}algorithm"), "hpa".into());
                    }
                    if let Err(e) = Policy::from_annotations(&a) {
                        panic!("{key}: {v} (in {row:?}): {e}");
                    }
                }
                checked += 1;
            }
        }
        assert!(checked >= 30, "only {checked} keys in the tables");
        let mut examples = 0;
        for block in text.split("```yaml").skip(1) {
            let block = block.split("```").next().unwrap_or_default();
            let annotations: BTreeMap<String, String> = block
                .lines()
                .filter_map(|l| l.trim().split_once(": "))
                .filter(|(k, _)| k.starts_with(PREFIX))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            if annotations.is_empty() {
                continue;
            }
            examples += 1;
            if let Err(e) = Policy::from_annotations(&annotations) {
                panic!("the example {annotations:?}: {e}");
            }
        }
        assert_eq!(examples, 3, "one annotated example per source");
    }

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `pairs` for kpa, whose Knative defaults these tests check.
    fn kpa_keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut k = keys(pairs);
        k.insert("algorithm".into(), "kpa".into());
        k
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
            .collect()
    }

    fn error_of(pairs: &[(&str, &str)]) -> String {
        let mut a = annotations(pairs);
        a.entry(format!("{PREFIX}model"))
            .or_insert_with(|| "m".into());
        Policy::from_annotations(&a).unwrap_err().to_string()
    }

    #[test]
    fn model_names_a_list_the_first_the_workloads_own() {
        let t = Policy::from_annotations(&annotations(&[(
            "model",
            " llama-3-8b , llama-3-8b-sql-lora,meta-llama/Llama-3-8B ",
        )]))
        .unwrap();
        assert_eq!(t.model, "llama-3-8b");
        assert_eq!(t.aliases, ["llama-3-8b-sql-lora", "meta-llama/Llama-3-8B"]);
        let one = Policy::from_annotations(&annotations(&[("model", "llama")])).unwrap();
        assert!(one.aliases.is_empty());
        for (value, says) in [
            ("", "must not be empty"),
            ("  ", "must not be empty"),
            ("a,,b", "has an empty name"),
            ("a,", "has an empty name"),
            (
                "a b",
                "\"a b\" holds whitespace: separate several names with commas",
            ),
            ("a,b,a", "names \"a\" twice"),
        ] {
            let e = Policy::from_annotations(&annotations(&[("model", value)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("scalecar.io/model") && e.contains(says),
                "{value:?}: {e}"
            );
        }
    }

    #[test]
    fn the_workload_an_inference_pool_scales_is_kind_slash_name() {
        let t = Policy::from_annotations(&annotations(&[
            ("model", "llama"),
            ("workload", "Deployment/llama-8b"),
        ]))
        .unwrap();
        assert_eq!(
            t.workload,
            Some(WorkloadName {
                kind: "Deployment".into(),
                name: "llama-8b".into()
            })
        );
        for (value, want) in [
            ("llama", "must be Kind/name"),
            ("Deploy-ment/x", "is not a kind"),
            ("Deployment/Llama", "is not an object name"),
            ("Deployment/", "is not an object name"),
        ] {
            let e = Policy::from_annotations(&annotations(&[("model", "m"), ("workload", value)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("scalecar.io/workload") && e.contains(want),
                "{value}: {e}"
            );
        }
    }

    #[test]
    fn the_default_is_slo_with_llm_defaults_and_kpa_keeps_knatives() {
        let t = Policy::from_annotations(&annotations(&[("model", "llama")])).unwrap();
        assert_eq!(t.model, "llama");
        assert_eq!(t.role, Role::Unified);
        assert_eq!(
            t.policy,
            Policy {
                algorithm: "slo".into(),
                target: crate::policy::SLO_PRIOR_CAPACITY,
                target_utilization: crate::policy::SLO_UTILIZATION,
                ttft_target: Some(Duration::from_secs(2)),
                ..Policy::default()
            }
        );
        // A decode pool needs no key either.
        let t = Policy::from_annotations(&annotations(&[("model", "llama"), ("role", "decode")]))
            .unwrap();
        assert_eq!(t.policy.itl_target, Some(Duration::from_millis(50)));
        assert_eq!(t.policy.ttft_target, None);
        // Its target is the default (slo may take the engines' KV cache
        // instead) until a key sets one.
        assert!(!t.policy.target_given);
        let t = Policy::from_annotations(&annotations(&[
            ("model", "llama"),
            ("role", "decode"),
            ("target", "120000"),
        ]))
        .unwrap();
        assert!(t.policy.target_given);
        assert_eq!(t.policy.target, 120_000.0);
        // An explicit target wins over the LLM defaults.
        let t = Policy::from_annotations(&annotations(&[
            ("model", "llama"),
            ("ttft-target", "700ms"),
            ("target-utilization-percentage", "80"),
        ]))
        .unwrap();
        assert_eq!(t.policy.ttft_target, Some(Duration::from_millis(700)));
        assert_eq!(t.policy.target_utilization, 0.8);
        // kpa named: Knative's defaults, exactly.
        let t = Policy::from_annotations(&annotations(&[("model", "llama"), ("algorithm", "kpa")]))
            .unwrap();
        assert_eq!(t.policy, Policy::default());
        assert_eq!(t.policy.panic_window(), Duration::from_secs(6));
    }

    #[test]
    fn every_key_parses() {
        let t = Policy::from_annotations(&annotations(&[
            ("model", "llama"),
            ("role", "prefill"),
            ("port", "8000"),
            ("algorithm", "slo"),
            ("metric", "tokens"),
            ("target", "5000"),
            ("target-utilization-percentage", "80"),
            ("ttft-target", "500ms"),
            ("itl-target", "50ms"),
            ("slo-percentile", "99"),
            ("min-replicas", "0"),
            ("max-replicas", "20"),
            ("initial-scale", "2"),
            ("activation-scale", "3"),
            ("window", "2m"),
            ("panic-window-percentage", "5"),
            ("panic-threshold-percentage", "300"),
            ("max-scale-up-rate", "4"),
            ("max-scale-down-rate", "1.5"),
            ("scale-down-delay", "30s"),
            ("scale-to-zero-grace-period", "1m"),
            ("max-concurrency", "64"),
            ("group", "llama-pd"),
            ("preferred-share", "20-50"),
            ("schedule", "0 9 * * 1-5 for 10h min 4"),
            ("hpa-tolerance", "0.05"),
            ("hpa-scale-up-stabilization-window", "10s"),
            ("hpa-scale-down-stabilization-window", "2m"),
            ("hpa-scale-up-policies", "pods=2/30s, percent=50/60s"),
            ("hpa-scale-down-policies", "pods=1/60s"),
            ("hpa-scale-up-select-policy", "min"),
            ("hpa-scale-down-select-policy", "disabled"),
        ]))
        .unwrap();
        let p = &t.policy;
        assert_eq!(p.slo_percentile, 99);
        assert_eq!((t.role, t.port), (Role::Prefill, Some(8000)));
        assert_eq!(
            (p.algorithm.as_str(), p.metric, p.target),
            ("slo", Metric::Tokens, 5000.0)
        );
        assert!((p.target_utilization - 0.8).abs() < 1e-12);
        assert_eq!(p.ttft_target, Some(Duration::from_millis(500)));
        assert_eq!(p.itl_target, Some(Duration::from_millis(50)));
        assert_eq!(
            (
                p.min_replicas,
                p.max_replicas,
                p.initial_scale,
                p.activation_scale
            ),
            (0, Some(20), 2, 3)
        );
        assert_eq!(p.window, Duration::from_secs(120));
        assert_eq!(p.panic_window(), Duration::from_secs(6));
        assert_eq!(
            (
                p.panic_threshold_percentage,
                p.max_scale_up_rate,
                p.max_scale_down_rate
            ),
            (300.0, 4.0, 1.5)
        );
        assert_eq!(
            (p.scale_down_delay, p.scale_to_zero_grace_period),
            (Duration::from_secs(30), Duration::from_secs(60))
        );
        assert_eq!(p.max_concurrency, Some(64));
        assert_eq!(p.group.as_deref(), Some("llama-pd"));
        assert_eq!(
            p.preferred_share,
            Some(ShareBand {
                min_percent: 20.0,
                max_percent: 50.0
            })
        );
        assert_eq!(p.schedule.len(), 1);
        assert_eq!(p.hpa.tolerance, 0.05);
        assert_eq!(p.hpa.scale_up.stabilization_window, Duration::from_secs(10));
        assert_eq!(
            p.hpa.scale_down.stabilization_window,
            Duration::from_secs(120)
        );
        assert_eq!(
            p.hpa.scale_up.policies,
            vec![
                HpaRatePolicy::Pods {
                    value: 2,
                    period: Duration::from_secs(30)
                },
                HpaRatePolicy::Percent {
                    value: 50,
                    period: Duration::from_secs(60)
                }
            ]
        );
        assert_eq!(p.hpa.scale_up.select_policy, SelectPolicy::Min);
        assert_eq!(p.hpa.scale_down.select_policy, SelectPolicy::Disabled);
    }

    #[test]
    fn target_default_follows_the_metric() {
        let p = Policy::from_keys(&kpa_keys(&[("metric", "rps")]), Role::Unified).unwrap();
        assert_eq!(p.target, 200.0);
        let p = Policy::from_keys(&kpa_keys(&[("metric", "tokens")]), Role::Unified).unwrap();
        assert_eq!(p.target, 100_000.0);
    }

    #[test]
    fn max_concurrency_is_the_default_concurrency_target() {
        let p = Policy::from_keys(&kpa_keys(&[("max-concurrency", "4")]), Role::Unified).unwrap();
        assert_eq!(p.target, 4.0);
        let p = Policy::from_keys(
            &kpa_keys(&[("max-concurrency", "4"), ("metric", "queue")]),
            Role::Unified,
        )
        .unwrap();
        assert_eq!(p.target, 4.0);
        // An explicit target wins; other metrics keep their own default.
        let p = Policy::from_keys(
            &kpa_keys(&[("max-concurrency", "4"), ("target", "9")]),
            Role::Unified,
        )
        .unwrap();
        assert_eq!(p.target, 9.0);
        let p = Policy::from_keys(
            &kpa_keys(&[("max-concurrency", "4"), ("metric", "rps")]),
            Role::Unified,
        )
        .unwrap();
        assert_eq!(p.target, 200.0);
    }

    #[test]
    fn knative_short_windows_are_accepted() {
        // 10 % of 6 s is a 0.6 s panic window: Knative takes it, so do we.
        let t =
            Policy::from_annotations(&annotations(&[("model", "m"), ("window", "6s")])).unwrap();
        assert_eq!(t.policy.panic_window(), Duration::from_millis(600));
        let t = Policy::from_annotations(&annotations(&[
            ("model", "m"),
            ("window", "6s"),
            ("panic-window-percentage", "1"),
        ]))
        .unwrap();
        assert_eq!(t.policy.panic_window(), Duration::from_millis(60));
    }

    #[test]
    fn rejections_name_key_value_and_what_is_allowed() {
        for (pairs, want) in [
            (
                vec![("max-replicas", "abc")],
                "scalecar.io/max-replicas: \"abc\" is not an integer",
            ),
            (
                vec![("kv-cache-tokens", "99999999999")],
                "scalecar.io/kv-cache-tokens: \"99999999999\" must be in [1, 4294967295]",
            ),
            (
                vec![("min-replicas", "5"), ("max-replicas", "3")],
                "scalecar.io/min-replicas 5 is greater than scalecar.io/max-replicas 3",
            ),
            (
                vec![("panic-threshold-percentage", "50")],
                "scalecar.io/panic-threshold-percentage: \"50\" must be in [110, 1000]",
            ),
            (
                vec![("window", "5s")],
                "scalecar.io/window: \"5s\" must be between 6s and 1h",
            ),
            (
                vec![("slo-percentile", "95")],
                "scalecar.io/slo-percentile: \"95\" must be 50, 90 or 99",
            ),
            (
                vec![("window", "soon")],
                "scalecar.io/window: \"soon\" is not a duration",
            ),
            (
                vec![("max-scale-up-rate", "1")],
                "scalecar.io/max-scale-up-rate: \"1\" must be greater than 1",
            ),
            (
                vec![("max-scale-down-rate", "0.5")],
                "scalecar.io/max-scale-down-rate: \"0.5\" must be greater than 1",
            ),
            (
                vec![("target", "0")],
                "scalecar.io/target: \"0\" must be a number greater than 0",
            ),
            (
                vec![("target", "NaN")],
                "scalecar.io/target: \"NaN\" must be",
            ),
            (
                vec![("target-utilization-percentage", "150")],
                "must be in [1, 100]",
            ),
            (
                vec![("metric", "gpu")],
                "scalecar.io/metric: \"gpu\" must be concurrency, rps, tokens or queue",
            ),
            (
                vec![("role", "both")],
                "scalecar.io/role: \"both\" must be unified, prefill or decode",
            ),
            (
                vec![("port", "70000")],
                "scalecar.io/port: \"70000\" must be a port in [1, 65535]",
            ),
            (
                vec![("preferred-share", "60-20")],
                "scalecar.io/preferred-share: \"60-20\" has min 60 greater than max 20",
            ),
            (vec![("preferred-share", "10-120")], "must be within 0-100"),
            (
                vec![("schedule", "0 9 * * 1-5 for 10h")],
                "scalecar.io/schedule: ",
            ),
            (vec![("algorithm", "KPA!")], "is not an algorithm name"),
            (
                vec![("activation-scale", "5"), ("max-replicas", "2")],
                "activation-scale 5 is greater than scalecar.io/max-replicas 2",
            ),
            (
                vec![("hpa-scale-up-policies", "pods=4")],
                "is not pods=N/PERIOD",
            ),
            (
                vec![("hpa-scale-down-select-policy", "most")],
                "must be max, min or disabled",
            ),
            (
                vec![("max-replica", "3")],
                "unknown key scalecar.io/max-replica: did you mean scalecar.io/max-replicas?",
            ),
        ] {
            let err = error_of(&pairs);
            assert!(err.contains(want), "{pairs:?}: {err}");
        }
        let err = Policy::from_annotations(&annotations(&[("target", "3")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("scalecar.io/model is required"), "{err}");
    }

    #[test]
    fn every_error_is_reported() {
        let err = error_of(&[("max-replicas", "x"), ("window", "y"), ("bogus", "1")]);
        assert_eq!(err.lines().count(), 3, "{err}");
    }

    #[test]
    fn identity_keys_are_not_policy_keys_in_files() {
        let err = Policy::from_keys(&keys(&[("model", "x")]), Role::Unified)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model is not a policy key here"), "{err}");
        let err = Policy::from_keys(&keys(&[("tagret", "3")]), Role::Unified)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "unknown key tagret: did you mean target?");
    }

    #[test]
    fn other_annotations_are_ignored() {
        let mut a = annotations(&[("model", "m")]);
        a.insert("deployment.kubernetes.io/revision".into(), "3".into());
        assert!(Policy::from_annotations(&a).is_ok());
    }

    #[test]
    fn algorithm_must_be_registered() {
        let p = Policy {
            algorithm: "kap".into(),
            ..Policy::default()
        };
        let e = p
            .validate_algorithm(&["kpa", "hpa", "slo"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "algorithm \"kap\" is not registered (did you mean kpa?); registered: kpa, hpa, slo"
        );
        assert!(Policy::default().validate_algorithm(&["kpa"]).is_ok());
    }

    #[test]
    fn groups_are_validated() {
        let band = |a, b| Policy {
            preferred_share: Some(ShareBand {
                min_percent: a,
                max_percent: b,
            }),
            ..Policy::default()
        };
        let (p, d) = (band(20.0, 50.0), band(50.0, 80.0));
        assert!(validate_group("g", &[(Role::Prefill, &p), (Role::Decode, &d)]).is_ok());
        let (p, d) = (band(60.0, 70.0), band(50.0, 80.0));
        let e = validate_group("g", &[(Role::Prefill, &p), (Role::Decode, &d)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("add up to 110 %"), "{e}");
        let e = validate_group("g", &[(Role::Prefill, &p)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no decode pool"), "{e}");
        let e = validate_group("g", &[(Role::Unified, &p), (Role::Decode, &d)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unified pool cannot"), "{e}");
    }
}
