//! `hpa`: the Kubernetes HPA replica formula and `behavior`, on scalecar's
//! signals.
//!
//! The metric is treated as an HPA per-pod average-value target:
//! desired = ceil(total / target), unless total / (target × current) is
//! within the tolerance of 1, when the current count stays. Then, as the
//! HPA controller does: stabilization (the lowest recommendation of the
//! scale-up window and the highest of the scale-down window bound the
//! result), and rate policies (Pods / Percent per period, counted from the
//! replicas at the start of each period, chosen by selectPolicy).

use std::collections::VecDeque;
use std::time::Duration;

use scalecar_config::{HpaRatePolicy, HpaRules, SelectPolicy};

use super::{Decision, DecisionInput, ScalingAlgorithm};

/// The HPA state of one target.
#[derive(Debug, Default)]
pub struct Hpa {
    /// (time, unstabilized recommendation).
    recommendations: VecDeque<(Duration, u32)>,
    /// (time, replicas added) and (time, replicas removed).
    scale_up_events: VecDeque<(Duration, u32)>,
    scale_down_events: VecDeque<(Duration, u32)>,
}

/// How many replicas the events inside `period` changed.
fn changed_within(events: &VecDeque<(Duration, u32)>, now: Duration, period: Duration) -> u32 {
    events
        .iter()
        .filter(|(t, _)| now.saturating_sub(*t) < period)
        .map(|(_, n)| *n)
        .sum()
}

impl Hpa {
    pub fn new() -> Self {
        Hpa::default()
    }

    fn stabilize(
        &mut self,
        now: Duration,
        current: u32,
        desired: u32,
        up: Duration,
        down: Duration,
    ) -> u32 {
        let mut up_rec = desired;
        let mut down_rec = desired;
        for (t, r) in &self.recommendations {
            let age = now.saturating_sub(*t);
            if age < up {
                up_rec = up_rec.min(*r);
            }
            if age < down {
                down_rec = down_rec.max(*r);
            }
        }
        let keep = up.max(down);
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) >= keep)
        {
            self.recommendations.pop_front();
        }
        self.recommendations.push_back((now, desired));
        current.max(up_rec).min(down_rec)
    }

    fn scale_up_limit(&self, now: Duration, current: u32, rules: &HpaRules) -> u32 {
        let (mut result, pick): (i64, fn(i64, i64) -> i64) = match rules.select_policy {
            SelectPolicy::Disabled => return current,
            SelectPolicy::Min => (i64::MAX, i64::min),
            SelectPolicy::Max => (i64::MIN, i64::max),
        };
        for policy in &rules.policies {
            let (period, proposed) = match *policy {
                HpaRatePolicy::Pods { value, period } => (period, value as i64),
                HpaRatePolicy::Percent { value, period } => (period, value as i64),
            };
            let start = i64::from(current)
                - i64::from(changed_within(&self.scale_up_events, now, period))
                + i64::from(changed_within(&self.scale_down_events, now, period));
            let proposed = match policy {
                HpaRatePolicy::Pods { .. } => start + proposed,
                // Rounded up so that a small pool can grow at all.
                HpaRatePolicy::Percent { .. } => {
                    (start as f64 * (1.0 + proposed as f64 / 100.0)).ceil() as i64
                }
            };
            result = pick(result, proposed);
        }
        result.clamp(0, i64::from(u32::MAX)) as u32
    }

    fn scale_down_limit(&self, now: Duration, current: u32, rules: &HpaRules) -> u32 {
        let (mut result, pick): (i64, fn(i64, i64) -> i64) = match rules.select_policy {
            SelectPolicy::Disabled => return current,
            SelectPolicy::Min => (i64::MIN, i64::max),
            SelectPolicy::Max => (i64::MAX, i64::min),
        };
        for policy in &rules.policies {
            let period = match *policy {
                HpaRatePolicy::Pods { period, .. } | HpaRatePolicy::Percent { period, .. } => {
                    period
                }
            };
            let start = i64::from(current)
                - i64::from(changed_within(&self.scale_up_events, now, period))
                + i64::from(changed_within(&self.scale_down_events, now, period));
            let proposed = match *policy {
                HpaRatePolicy::Pods { value, .. } => start - i64::from(value),
                HpaRatePolicy::Percent { value, .. } => {
                    (start as f64 * (1.0 - f64::from(value) / 100.0)) as i64
                }
            };
            result = pick(result, proposed);
        }
        result.clamp(0, i64::from(u32::MAX)) as u32
    }

    fn forget_events(&mut self, now: Duration, rules_up: &HpaRules, rules_down: &HpaRules) {
        let longest = |r: &HpaRules| {
            r.policies
                .iter()
                .map(|p| match *p {
                    HpaRatePolicy::Pods { period, .. } | HpaRatePolicy::Percent { period, .. } => {
                        period
                    }
                })
                .max()
                .unwrap_or(Duration::ZERO)
        };
        let keep = longest(rules_up).max(longest(rules_down));
        for events in [&mut self.scale_up_events, &mut self.scale_down_events] {
            while events
                .front()
                .is_some_and(|(t, _)| now.saturating_sub(*t) >= keep)
            {
                events.pop_front();
            }
        }
    }
}

impl ScalingAlgorithm for Hpa {
    /// Load metrics only: no latency.
    fn latencies(&self, _role: scalecar_config::Role) -> crate::snapshot::Latencies {
        crate::snapshot::Latencies::NONE
    }

    fn name(&self) -> &str {
        "hpa"
    }

    fn decide(&mut self, input: &DecisionInput<'_>) -> Decision {
        let p = input.policy;
        let snap = input.snapshot;
        if !snap.stable.has_data() {
            return Decision::none("no data to scale on yet");
        }
        let behavior = &p.hpa;
        let now = input.now;
        let current = input.spec;
        let total = snap.stable.metric(p.metric);
        let target = p.target * p.target_utilization;
        let ratio = if current == 0 {
            f64::INFINITY
        } else {
            total / (target * f64::from(current))
        };
        let raw = if current > 0 && (ratio - 1.0).abs() <= behavior.tolerance {
            current
        } else {
            (total / target).ceil().min(f64::from(u32::MAX)) as u32
        };
        let stabilized = self.stabilize(
            now,
            current,
            raw,
            behavior.scale_up.stabilization_window,
            behavior.scale_down.stabilization_window,
        );
        self.forget_events(now, &behavior.scale_up, &behavior.scale_down);
        let min = p.min_replicas;
        let max = p.max_bound();
        let mut why = String::new();
        let desired = if stabilized > current {
            let limit = self
                .scale_up_limit(now, current, &behavior.scale_up)
                .max(current);
            let allowed = max.min(limit);
            if stabilized > allowed {
                why = format!("; scale-up limited to {allowed} by policy");
                allowed
            } else {
                stabilized
            }
        } else if stabilized < current {
            let limit = self
                .scale_down_limit(now, current, &behavior.scale_down)
                .min(current);
            let allowed = min.max(limit);
            if stabilized < allowed {
                why = format!("; scale-down limited to {allowed} by policy");
                allowed
            } else {
                stabilized
            }
        } else {
            stabilized
        };
        if desired > current {
            self.scale_up_events.push_back((now, desired - current));
        } else if desired < current {
            self.scale_down_events.push_back((now, current - desired));
        }
        let metric = p.metric;
        let reason = format!(
            "{metric} {total:.1} for target {target:.1} per pod (ratio {ratio:.2}) → {raw}, stabilized {stabilized}{why}"
        );
        Decision {
            desired: Some(desired),
            panic: false,
            stable_value: total,
            panic_value: snap.panic.metric(metric),
            target,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::testing::snapshot;
    use scalecar_config::{HpaBehavior, Policy, Role};

    fn policy(behavior: HpaBehavior) -> Policy {
        Policy {
            algorithm: "hpa".into(),
            target: 10.0,
            target_utilization: 1.0,
            max_replicas: Some(100),
            hpa: behavior,
            ..Policy::default()
        }
    }

    fn decide(h: &mut Hpa, p: &Policy, t: u64, current: u32, total: f64) -> u32 {
        let snap = snapshot(p.metric, total, total, p);
        h.decide(&DecisionInput {
            now: Duration::from_secs(t),
            ready: current,
            spec: current,
            snapshot: &snap,
            policy: p,
            role: Role::Unified,
            reachable: true,
            partial: false,
            cold_start: None,
            kv_capacity: None,
        })
        .desired
        .unwrap()
    }

    fn rules(window: u64, policies: Vec<HpaRatePolicy>, select: SelectPolicy) -> HpaRules {
        HpaRules {
            stabilization_window: Duration::from_secs(window),
            policies,
            select_policy: select,
        }
    }

    fn free() -> HpaRules {
        rules(
            0,
            vec![HpaRatePolicy::Percent {
                value: 10_000,
                period: Duration::from_secs(1),
            }],
            SelectPolicy::Max,
        )
    }

    #[test]
    fn replica_formula_with_tolerance() {
        let p = policy(HpaBehavior {
            scale_up: free(),
            scale_down: free(),
            tolerance: 0.1,
        });
        let mut h = Hpa::new();
        // 4 pods at 10.5 each: ratio 1.05 within tolerance → 4.
        assert_eq!(decide(&mut h, &p, 0, 4, 42.0), 4);
        // 4 pods at 12 each: ratio 1.2 → ceil(48/10) = 5.
        assert_eq!(decide(&mut h, &p, 1, 4, 48.0), 5);
        assert_eq!(decide(&mut h, &p, 2, 5, 12.0), 2);
    }

    #[test]
    fn default_behavior_scales_up_by_max_of_4_pods_or_100_percent() {
        let p = policy(HpaBehavior::default());
        let mut h = Hpa::new();
        // From 1: max(1 + 4, 1 × 2) = 5.
        assert_eq!(decide(&mut h, &p, 0, 1, 1000.0), 5);
        // Within the same 15 s period the period started at 1: still 5.
        assert_eq!(decide(&mut h, &p, 5, 5, 1000.0), 5);
        // A new period from 5: max(9, 10) = 10.
        assert_eq!(decide(&mut h, &p, 15, 5, 1000.0), 10);
    }

    #[test]
    fn select_min_picks_the_smallest_change() {
        let up = rules(
            0,
            vec![
                HpaRatePolicy::Pods {
                    value: 4,
                    period: Duration::from_secs(60),
                },
                HpaRatePolicy::Percent {
                    value: 100,
                    period: Duration::from_secs(60),
                },
            ],
            SelectPolicy::Min,
        );
        let p = policy(HpaBehavior {
            scale_up: up,
            scale_down: free(),
            tolerance: 0.1,
        });
        let mut h = Hpa::new();
        // From 10: min(14, 20) = 14.
        assert_eq!(decide(&mut h, &p, 0, 10, 1000.0), 14);
    }

    #[test]
    fn disabled_direction_never_moves() {
        let down = rules(
            0,
            vec![HpaRatePolicy::Pods {
                value: 1,
                period: Duration::from_secs(15),
            }],
            SelectPolicy::Disabled,
        );
        let p = policy(HpaBehavior {
            scale_up: free(),
            scale_down: down,
            tolerance: 0.1,
        });
        let mut h = Hpa::new();
        assert_eq!(decide(&mut h, &p, 0, 8, 10.0), 8);
        assert_eq!(decide(&mut h, &p, 1, 8, 500.0), 50);
    }

    #[test]
    fn scale_down_pods_policy_over_its_period() {
        let down = rules(
            0,
            vec![HpaRatePolicy::Pods {
                value: 2,
                period: Duration::from_secs(60),
            }],
            SelectPolicy::Max,
        );
        let p = policy(HpaBehavior {
            scale_up: free(),
            scale_down: down,
            tolerance: 0.1,
        });
        let mut h = Hpa::new();
        assert_eq!(decide(&mut h, &p, 0, 10, 10.0), 8);
        // 2 already removed in this 60 s period: no more.
        assert_eq!(decide(&mut h, &p, 30, 8, 10.0), 8);
        assert_eq!(decide(&mut h, &p, 60, 8, 10.0), 6);
    }

    #[test]
    fn scale_down_percent_policy() {
        let down = rules(
            0,
            vec![HpaRatePolicy::Percent {
                value: 50,
                period: Duration::from_secs(60),
            }],
            SelectPolicy::Max,
        );
        let p = policy(HpaBehavior {
            scale_up: free(),
            scale_down: down,
            tolerance: 0.1,
        });
        let mut h = Hpa::new();
        assert_eq!(decide(&mut h, &p, 0, 10, 10.0), 5);
    }

    #[test]
    fn scale_down_stabilization_takes_the_window_maximum() {
        let down = rules(
            300,
            vec![HpaRatePolicy::Percent {
                value: 100,
                period: Duration::from_secs(15),
            }],
            SelectPolicy::Max,
        );
        let p = policy(HpaBehavior {
            scale_up: free(),
            scale_down: down,
            tolerance: 0.1,
        });
        let mut h = Hpa::new();
        assert_eq!(decide(&mut h, &p, 0, 10, 100.0), 10);
        // Load drops: the recommendation 10 from t=0 holds for 300 s.
        assert_eq!(decide(&mut h, &p, 100, 10, 30.0), 10);
        assert_eq!(decide(&mut h, &p, 299, 10, 30.0), 10);
        assert_eq!(decide(&mut h, &p, 301, 10, 30.0), 3);
    }

    #[test]
    fn scale_up_stabilization_takes_the_window_minimum() {
        let up = rules(
            60,
            vec![HpaRatePolicy::Percent {
                value: 1000,
                period: Duration::from_secs(15),
            }],
            SelectPolicy::Max,
        );
        let p = policy(HpaBehavior {
            scale_up: up,
            scale_down: free(),
            tolerance: 0.1,
        });
        let mut h = Hpa::new();
        assert_eq!(decide(&mut h, &p, 0, 2, 20.0), 2);
        // A spike is not trusted until it lasted the window.
        assert_eq!(decide(&mut h, &p, 30, 2, 80.0), 2);
        assert_eq!(decide(&mut h, &p, 61, 2, 80.0), 8);
    }
}
