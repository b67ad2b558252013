//! `kpa`: Knative's KPA `Scale()` semantics.
//!
//! desired = ceil(observed / (target × utilization)) for the stable and the
//! panic window, each clamped to [floor(ready / max-scale-down-rate),
//! ceil(ready × max-scale-up-rate)] (ready counted as at least 1; no lower
//! clamp for an unreachable pool). Panic starts when panic-desired / ready
//! reaches the panic threshold and each tick over it extends it; in panic
//! the count is the larger of the stable and the panic count and never goes
//! down; panic ends a stable window after the last tick over the threshold.
//! A new decider starts in panic when more than one pod is ready (its
//! windows are empty and would scale down). Activation scale raises any
//! non-zero count; scale-down delay holds the maximum decision of a sliding
//! window (not for an unreachable pool, which takes no traffic).

use std::collections::VecDeque;
use std::time::Duration;

use scalecar_config::Policy;

use super::{Decision, DecisionInput, ScalingAlgorithm, show};

/// The KPA decider of one target.
#[derive(Debug)]
pub struct Kpa {
    /// When the last tick over the panic threshold was (None: not in panic).
    panic_since_last: Option<Duration>,
    max_panic_pods: u32,
    /// (time, decision) of the scale-down delay window, decisions falling
    /// from front to back so the front is the window's maximum.
    delay_window: VecDeque<(Duration, u32)>,
}

impl Kpa {
    pub fn new(_policy: &Policy, ready: u32, now: Duration) -> Self {
        Kpa {
            panic_since_last: (ready > 1).then_some(now),
            // Knative keeps the count it started at as the panic maximum.
            max_panic_pods: ready,
            delay_window: VecDeque::new(),
        }
    }

    pub fn in_panic(&self) -> bool {
        self.panic_since_last.is_some()
    }

    /// Records a decision and returns the maximum over the delay window.
    fn delayed(&mut self, now: Duration, delay: Duration, desired: u32) -> u32 {
        if delay.is_zero() {
            return desired;
        }
        while self
            .delay_window
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) >= delay)
        {
            self.delay_window.pop_front();
        }
        // Keep a falling sequence: a larger new value makes older smaller
        // ones irrelevant for the maximum.
        while self.delay_window.back().is_some_and(|(_, v)| *v <= desired) {
            self.delay_window.pop_back();
        }
        self.delay_window.push_back((now, desired));
        self.delay_window.front().map_or(desired, |(_, v)| *v)
    }
}

fn clamp(x: f64, lo: f64, hi: f64) -> f64 {
    x.max(lo).min(hi)
}

impl ScalingAlgorithm for Kpa {
    /// Load metrics only: no latency.
    fn latencies(&self, _role: scalecar_config::Role) -> crate::snapshot::Latencies {
        crate::snapshot::Latencies::NONE
    }

    fn name(&self) -> &str {
        "kpa"
    }

    fn decide(&mut self, input: &DecisionInput<'_>) -> Decision {
        let p = input.policy;
        let snap = input.snapshot;
        if !snap.stable.has_data() {
            return Decision::none("no data to scale on yet");
        }
        let metric = p.metric;
        let stable = snap.stable.metric(metric);
        let panic_value = snap.panic.metric(metric);
        let target = p.target * p.target_utilization;
        let ready = f64::from(input.ready.max(1));
        let max_up = (p.max_scale_up_rate * ready).ceil();
        let max_down = if input.reachable {
            (ready / p.max_scale_down_rate).floor()
        } else {
            0.0
        };
        let dspc = (stable / target).ceil();
        let dppc = (panic_value / target).ceil();
        let mut desired_stable = clamp(dspc, max_down, max_up) as u32;
        let mut desired_panic = clamp(dppc, max_down, max_up) as u32;
        if p.activation_scale > 1 {
            if dspc > 0.0 {
                desired_stable = desired_stable.max(p.activation_scale);
            }
            if dppc > 0.0 {
                desired_panic = desired_panic.max(p.activation_scale);
            }
        }
        let threshold = p.panic_threshold_percentage / 100.0;
        let over = dppc / ready >= threshold;
        let now = input.now;
        if over {
            self.panic_since_last = Some(now);
        } else if let Some(last) = self.panic_since_last
            && now.saturating_sub(last) > p.window
        {
            self.panic_since_last = None;
            self.max_panic_pods = 0;
        }
        let mut desired = desired_stable;
        let in_panic = self.panic_since_last.is_some();
        if in_panic {
            // The stable window can see more than the panic window (a
            // burst that is fading): provision for the larger.
            self.max_panic_pods = self.max_panic_pods.max(desired.max(desired_panic));
            desired = self.max_panic_pods;
        }
        let undelayed = desired;
        if input.reachable {
            desired = self.delayed(now, p.scale_down_delay, desired);
        }
        let mut reason = format!(
            "{metric} {stable:.1} stable / {panic_value:.1} panic over target {target:.1} per pod with {} ready → {undelayed}",
            input.ready
        );
        if in_panic {
            reason.push_str(if over {
                " (panic)"
            } else {
                " (panic, holding)"
            });
        }
        if desired != undelayed {
            reason.push_str(&format!(
                "; scale-down delay {} holds {desired}",
                show(p.scale_down_delay)
            ));
        }
        Decision {
            desired: Some(desired),
            panic: in_panic,
            stable_value: stable,
            panic_value,
            target,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::testing::snapshot;
    use crate::snapshot::WindowSnapshot;
    use scalecar_config::{Metric, Role};

    fn policy() -> Policy {
        // Knative's test defaults: target 10 at 100 % utilization.
        Policy {
            target: 10.0,
            target_utilization: 1.0,
            ..Policy::default()
        }
    }

    fn decide(k: &mut Kpa, p: &Policy, t: u64, ready: u32, stable: f64, panic: f64) -> Decision {
        let snap = snapshot(p.metric, stable, panic, p);
        run(k, p, t, ready, &snap, true)
    }

    fn run(
        k: &mut Kpa,
        p: &Policy,
        t: u64,
        ready: u32,
        snap: &WindowSnapshot,
        reachable: bool,
    ) -> Decision {
        k.decide(&DecisionInput {
            now: Duration::from_secs(t),
            ready,
            spec: ready,
            snapshot: snap,
            policy: p,
            role: Role::Unified,
            reachable,
            partial: false,
            cold_start: None,
            kv_capacity: None,
        })
    }

    /// One call of Scale() in a Knative case.
    #[derive(Clone, Copy)]
    struct Step {
        /// Clock time, ms.
        t: u64,
        ready: u32,
        stable: f64,
        panic: f64,
        reachable: bool,
        /// Expected desired count (`None`: no decision).
        want: Option<u32>,
        /// Expected panic start/extension time after the call, ms (`Some(None)`: not
        /// in panic); unchecked when `None`.
        panic_at: Option<Option<u64>>,
    }

    const STEP: Step = Step {
        t: T0,
        ready: 1,
        stable: 0.0,
        panic: 0.0,
        reachable: true,
        want: None,
        panic_at: None,
    };

    /// Clock origin of the cases, ms: far enough from zero for "5 s ago".
    const T0: u64 = 1_000_000;

    struct Case {
        name: &'static str,
        /// Knative's TargetValue (utilization already applied).
        target: f64,
        metric: Metric,
        tweak: fn(&mut Policy),
        /// The ready count the decider is created with.
        start_ready: u32,
        /// A panic already under way: (start ms, max panic pods).
        preset: Option<(u64, u32)>,
        steps: Vec<Step>,
    }

    fn knative_policy(target: f64, metric: Metric) -> Policy {
        // newTestAutoscaler: panic threshold 2 (200 %), max scale up and
        // down rates 10, stable window 60 s; the target is pre-multiplied.
        Policy {
            metric,
            target,
            target_utilization: 1.0,
            panic_threshold_percentage: 200.0,
            max_scale_up_rate: 10.0,
            max_scale_down_rate: 10.0,
            window: Duration::from_secs(60),
            ..Policy::default()
        }
    }

    fn none(_: &mut Policy) {}

    fn case(name: &'static str, target: f64, steps: Vec<Step>) -> Case {
        Case {
            name,
            target,
            metric: Metric::Concurrency,
            tweak: none,
            start_ready: 1,
            preset: None,
            steps,
        }
    }

    fn step(t: u64, ready: u32, stable: f64, panic: f64, want: u32) -> Step {
        Step {
            t,
            ready,
            stable,
            panic,
            want: Some(want),
            ..STEP
        }
    }

    fn delay_policy(p: &mut Policy) {
        // TestAutoscalerScaleDownDelay: rates 10, threshold 100 (10,000 %),
        // delay 5 min.
        p.panic_threshold_percentage = 10_000.0;
        p.scale_down_delay = Duration::from_secs(300);
    }

    /// Knative's autoscaler tests (pkg/autoscaler/scaling/autoscaler_test.go),
    /// their inputs and expected outputs, through this decider. Every
    /// branch of Scale() is here: no data, stable up and down, rate clamps
    /// both ways, unreachable, zero ready, activation scale, panic start,
    /// extend and exit, stable above panic during panic, scale-down delay
    /// (simple, gradual, zero, unreachable) and starting in panic.
    #[test]
    fn knative_scale_cases() {
        let s = 1000u64; // ms per second
        let cases = vec![
            case(
                "StableModeIncreaseWithConcurrencyDefault",
                10.0,
                vec![step(T0, 1, 50.0, 10.0, 5), step(T0, 1, 100.0, 10.0, 10)],
            ),
            Case {
                metric: Metric::Rps,
                ..case(
                    "StableModeIncreaseWithRPS",
                    10.0,
                    vec![step(T0, 1, 50.0, 50.0, 5), step(T0, 1, 100.0, 99.0, 10)],
                )
            },
            case(
                "UnpanicAfterSlowIncrease",
                1.0,
                vec![
                    Step {
                        panic_at: Some(Some(T0)),
                        ..step(T0, 10, 11.0, 25.0, 25)
                    },
                    // Half a window later, +1 pod a tick: the start stays.
                    Step {
                        panic_at: Some(Some(T0)),
                        ..step(T0 + 30 * s, 40, 30.0, 41.0, 41)
                    },
                    // A window and a tick after the start: panic is over.
                    Step {
                        panic_at: Some(None),
                        ..step(T0 + 62 * s, 55, 50.0, 56.0, 50)
                    },
                ],
            ),
            case(
                "ExtendPanicWindow",
                1.0,
                vec![
                    Step {
                        panic_at: Some(Some(T0)),
                        ..step(T0, 10, 11.0, 25.0, 25)
                    },
                    Step {
                        panic_at: Some(Some(T0 + 30 * s)),
                        ..step(T0 + 30 * s, 40, 30.0, 80.0, 80)
                    },
                ],
            ),
            case(
                "StableModeDecrease",
                10.0,
                vec![step(T0, 8, 100.0, 100.0, 10), step(T0, 8, 50.0, 50.0, 5)],
            ),
            case(
                "StableModeNoTrafficScaleToZero",
                10.0,
                vec![step(T0, 1, 1.0, 0.0, 1), step(T0, 1, 0.0, 0.0, 0)],
            ),
            Case {
                tweak: |p| p.activation_scale = 2,
                ..case(
                    "ActivationScale",
                    10.0,
                    vec![step(T0, 1, 0.0, 0.0, 0), step(T0, 1, 1.0, 0.0, 2)],
                )
            },
            case(
                "PanicModeExponentialTrackAndStabilize",
                1.0,
                vec![
                    step(T0, 1, 6.0, 6.0, 6),
                    Step {
                        panic_at: Some(Some(T0 + s)),
                        ..step(T0 + s, 6, 36.0, 36.0, 36)
                    },
                    Step {
                        panic_at: Some(Some(T0 + 2 * s)),
                        ..step(T0 + 2 * s, 36, 216.0, 216.0, 216)
                    },
                    step(T0 + 2 * s, 216, 1296.0, 1296.0, 1296),
                    step(T0 + 3 * s, 1296, 1296.0, 1296.0, 1296),
                ],
            ),
            case(
                "AutoscalerNoDataAtZeroNoAutoscale",
                10.0,
                vec![step(T0, 1, 0.0, 0.0, 0)],
            ),
            case(
                "AutoscalerStableModeUnlimitedTBC",
                181.0,
                vec![step(T0, 1, 21.0, 26.0, 1)],
            ),
            case("Autoscaler0TBC", 10.0, vec![step(T0, 1, 50.0, 49.0, 5)]),
            case(
                "AutoscalerStableModeNoChange",
                10.0,
                vec![step(T0, 1, 50.0, 50.0, 5)],
            ),
            Case {
                start_ready: 5,
                preset: Some((T0 - 5 * s, 5)),
                ..case(
                    "AutoscalerPanicStableLargerThanPanic",
                    1.0,
                    vec![step(T0, 5, 50.0, 30.0, 50)],
                )
            },
            Case {
                start_ready: 5,
                preset: Some((T0 - 5 * s, 5)),
                ..case(
                    "AutoscalerPanicStableLessThanPanic",
                    1.0,
                    vec![step(T0, 5, 20.0, 30.0, 30)],
                )
            },
            case(
                "AutoscalerStableModeNoChangeAlreadyScaled",
                10.0,
                vec![step(T0, 5, 50.0, 50.0, 5)],
            ),
            Case {
                tweak: |p| p.max_scale_up_rate = 1.1,
                ..case(
                    "AutoscalerStableModeIncreaseWithSmallScaleUpRate",
                    1.0,
                    vec![step(T0, 2, 3.0, 3.1, 3)],
                )
            },
            Case {
                tweak: |p| p.max_scale_down_rate = 1.1,
                ..case(
                    "AutoscalerStableModeDecreaseWithSmallScaleDownRate",
                    10.0,
                    vec![step(T0, 100, 1.0, 1.0, 90)],
                )
            },
            Case {
                tweak: |p| p.max_scale_down_rate = 1.1,
                ..case(
                    "AutoscalerStableModeDecreaseNonReachable",
                    10.0,
                    vec![Step {
                        reachable: false,
                        ..step(T0, 100, 1.0, 1.0, 1)
                    }],
                )
            },
            case(
                "AutoscalerPanicModeDoublePodCount",
                10.0,
                vec![step(T0, 1, 50.0, 100.0, 10)],
            ),
            case(
                "PanicThenUnPanicScaleDown",
                10.0,
                vec![
                    step(T0, 1, 100.0, 100.0, 10),
                    step(T0 + s, 10, 100.0, 1000.0, 100),
                    // Traffic gone, still in panic: no scale down.
                    step(T0 + 31 * s, 10, 1.0, 1.0, 100),
                    // After the stable window: back to the stable count.
                    Step {
                        panic_at: Some(None),
                        ..step(T0 + 62 * s, 10, 1.0, 1.0, 1)
                    },
                ],
            ),
            case(
                "RateLimitScaleUp",
                10.0,
                vec![
                    step(T0, 1, 1000.0, 1001.0, 10),
                    step(T0, 10, 1000.0, 1001.0, 100),
                ],
            ),
            case(
                "RateLimitScaleDown",
                10.0,
                vec![step(T0, 100, 1.0, 1.0, 10), step(T0, 10, 1.0, 1.0, 1)],
            ),
            case(
                "UseOnePodAsMinimumIfEndpointsNotFound",
                10.0,
                vec![step(T0, 0, 1000.0, 888.0, 10)],
            ),
            Case {
                tweak: delay_policy,
                start_ready: 0,
                ..case(
                    "ScaleDownDelay",
                    10.0,
                    vec![
                        // simple
                        step(T0 + 2 * s, 0, 40.0, 40.0, 4),
                        step(T0 + 300 * s, 0, 0.0, 0.0, 4),
                        step(T0 + 302 * s, 0, 0.0, 0.0, 0),
                        // gradual
                        step(T0 + 540 * s, 0, 40.0, 40.0, 4),
                        step(T0 + 600 * s, 0, 30.0, 30.0, 4),
                        step(T0 + 660 * s, 0, 0.0, 0.0, 4),
                        step(T0 + 840 * s, 0, 0.0, 0.0, 3),
                        step(T0 + 900 * s, 0, 0.0, 0.0, 0),
                    ],
                )
            },
            Case {
                tweak: delay_policy,
                start_ready: 0,
                ..case(
                    "ScaleDownDelayNotReachable",
                    10.0,
                    vec![
                        step(T0 + 2 * s, 0, 40.0, 40.0, 4),
                        step(T0 + 60 * s, 0, 0.0, 0.0, 4),
                        Step {
                            reachable: false,
                            ..step(T0 + 62 * s, 0, 0.0, 0.0, 0)
                        },
                    ],
                )
            },
            Case {
                tweak: |p| {
                    delay_policy(p);
                    p.scale_down_delay = Duration::ZERO;
                },
                start_ready: 0,
                ..case(
                    "ScaleDownDelayZero",
                    10.0,
                    vec![step(T0, 0, 40.0, 40.0, 4), step(T0 + 500, 0, 20.0, 20.0, 2)],
                )
            },
        ];
        for c in cases {
            let mut p = knative_policy(c.target, c.metric);
            (c.tweak)(&mut p);
            let mut k = Kpa::new(&p, c.start_ready, Duration::from_millis(T0));
            if let Some((since, max)) = c.preset {
                k.panic_since_last = Some(Duration::from_millis(since));
                k.max_panic_pods = max;
            }
            for (i, st) in c.steps.iter().enumerate() {
                let snap = snapshot(p.metric, st.stable, st.panic, &p);
                let d = k.decide(&DecisionInput {
                    now: Duration::from_millis(st.t),
                    ready: st.ready,
                    spec: st.ready,
                    snapshot: &snap,
                    policy: &p,
                    role: Role::Unified,
                    reachable: st.reachable,
                    partial: false,
                    cold_start: None,
                    kv_capacity: None,
                });
                assert_eq!(d.desired, st.want, "{} step {i}: {}", c.name, d.reason);
                if let Some(at) = st.panic_at {
                    assert_eq!(
                        k.panic_since_last,
                        at.map(Duration::from_millis),
                        "{} step {i}: panic time",
                        c.name
                    );
                }
            }
        }
    }

    #[test]
    fn knative_no_data_is_no_decision_and_start_in_panic() {
        // TestAutoscalerNoDataNoAutoscale: no metrics, no scale.
        let p = knative_policy(10.0, Metric::Concurrency);
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        let d = run(&mut k, &p, 0, 1, &WindowSnapshot::default(), true);
        assert_eq!(d.desired, None);
        // TestStartInPanicMode: 0 or 1 ready → not in panic, max panic pods
        // the ready count; 2 → in panic holding 2.
        for ready in 0..2 {
            let k = Kpa::new(&p, ready, Duration::from_secs(5));
            assert!(!k.in_panic());
            assert_eq!(k.max_panic_pods, ready);
        }
        let k = Kpa::new(&p, 2, Duration::from_secs(5));
        assert_eq!(k.panic_since_last, Some(Duration::from_secs(5)));
        assert_eq!(k.max_panic_pods, 2);
    }

    #[test]
    fn the_issue_example_provisions_for_the_stable_count_in_panic() {
        // ready 1, target 10, stable 50, panic 20: panic (2/1 ≥ 200 %) and
        // the stable window asks for 5.
        let p = knative_policy(10.0, Metric::Concurrency);
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        let d = decide(&mut k, &p, 0, 1, 50.0, 20.0);
        assert!(d.panic);
        assert_eq!(d.desired, Some(5));
    }

    #[test]
    fn stable_scale_is_ceil_of_value_over_target() {
        let p = policy();
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(decide(&mut k, &p, 0, 1, 50.0, 50.0).desired, Some(5));
        assert_eq!(decide(&mut k, &p, 2, 5, 51.0, 51.0).desired, Some(6));
        // Utilization shrinks the target: 70 % of 10 → 7 per pod.
        let p = Policy {
            target_utilization: 0.7,
            ..policy()
        };
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(decide(&mut k, &p, 0, 1, 14.0, 14.0).desired, Some(2));
    }

    #[test]
    fn no_data_is_no_decision() {
        let p = policy();
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        let d = run(&mut k, &p, 0, 1, &WindowSnapshot::default(), true);
        assert_eq!(d.desired, None);
    }

    #[test]
    fn max_scale_up_rate_limits_growth() {
        // Knative: "scale up limited by max scale up rate".
        let p = Policy {
            max_scale_up_rate: 1.1,
            ..policy()
        };
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        // ready 10 → at most ceil(11) = 11 even though 100 are wanted.
        let d = decide(&mut k, &p, 0, 10, 1000.0, 1000.0);
        assert_eq!(d.desired, Some(11));
    }

    #[test]
    fn max_scale_down_rate_limits_shrinking() {
        // ready 10, rate 2 → no lower than 5.
        let p = policy();
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(decide(&mut k, &p, 0, 10, 1.0, 1.0).desired, Some(5));
        let p = Policy {
            max_scale_down_rate: 5.0,
            ..policy()
        };
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(decide(&mut k, &p, 0, 10, 1.0, 1.0).desired, Some(2));
    }

    #[test]
    fn unreachable_revision_scales_down_without_the_rate_limit() {
        let p = policy();
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        let snap = snapshot(Metric::Concurrency, 0.0, 0.0, &p);
        assert_eq!(run(&mut k, &p, 0, 10, &snap, false).desired, Some(0));
        assert_eq!(run(&mut k, &p, 2, 10, &snap, true).desired, Some(5));
    }

    #[test]
    fn panic_then_leaving_panic_after_the_stable_window() {
        let p = policy(); // window 60 s, threshold 200 %
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        // Stable 10 (1 pod), panic 25 → 3 desired in panic: 3/1 ≥ 2 → panic.
        let d = decide(&mut k, &p, 0, 1, 10.0, 25.0);
        assert!(d.panic);
        assert_eq!(d.desired, Some(3));
        assert!(d.reason.contains("(panic)"), "{}", d.reason);
        // Load falls: in panic the count never goes down.
        let d = decide(&mut k, &p, 10, 3, 5.0, 5.0);
        assert!(d.panic);
        assert_eq!(d.desired, Some(3));
        // A new peak raises it.
        let d = decide(&mut k, &p, 20, 3, 10.0, 70.0);
        assert_eq!(d.desired, Some(7));
        // 60 s after the last tick over the threshold (t=20): still panic at 80.
        let d = decide(&mut k, &p, 80, 7, 5.0, 5.0);
        assert!(d.panic);
        assert_eq!(d.desired, Some(7));
        // Past it: out of panic, back to the stable count (rate-limited: ≥ 3).
        let d = decide(&mut k, &p, 81, 7, 5.0, 5.0);
        assert!(!d.panic);
        assert_eq!(d.desired, Some(3));
    }

    #[test]
    fn a_new_decider_starts_in_panic_over_one_pod() {
        let p = policy();
        let mut k = Kpa::new(&p, 5, Duration::ZERO);
        assert!(k.in_panic());
        // Empty windows would scale down; panic holds the 5.
        let d = decide(&mut k, &p, 2, 5, 0.0, 0.0);
        assert_eq!(d.desired, Some(5));
        let k = Kpa::new(&p, 1, Duration::ZERO);
        assert!(!k.in_panic());
    }

    #[test]
    fn scale_down_delay_holds_the_window_maximum() {
        let p = Policy {
            scale_down_delay: Duration::from_secs(20),
            max_scale_down_rate: 1000.0,
            ..policy()
        };
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(decide(&mut k, &p, 0, 5, 50.0, 50.0).desired, Some(5));
        assert!(!k.in_panic());
        let d = decide(&mut k, &p, 10, 5, 20.0, 20.0);
        assert_eq!(d.desired, Some(5));
        assert!(d.reason.contains("scale-down delay"), "{}", d.reason);
        assert_eq!(decide(&mut k, &p, 19, 5, 20.0, 20.0).desired, Some(5));
        // 20 s after the 5: the window's max is now 2.
        assert_eq!(decide(&mut k, &p, 20, 5, 20.0, 20.0).desired, Some(2));
        // Up is never delayed.
        assert_eq!(decide(&mut k, &p, 22, 2, 90.0, 90.0).desired, Some(9));
    }

    #[test]
    fn activation_scale_raises_non_zero_counts() {
        let p = Policy {
            activation_scale: 3,
            ..policy()
        };
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(decide(&mut k, &p, 0, 1, 1.0, 1.0).desired, Some(3));
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(decide(&mut k, &p, 0, 1, 0.0, 0.0).desired, Some(0));
    }

    #[test]
    fn every_metric_is_used() {
        for (metric, stable) in [
            (Metric::Rps, 45.0),
            (Metric::Tokens, 45.0),
            (Metric::Queue, 45.0),
        ] {
            let p = Policy { metric, ..policy() };
            let mut k = Kpa::new(&p, 1, Duration::ZERO);
            assert_eq!(
                decide(&mut k, &p, 0, 4, stable, stable).desired,
                Some(5),
                "{metric}"
            );
        }
        // queue = in flight + queued.
        let p = Policy {
            metric: Metric::Queue,
            ..policy()
        };
        let mut snap = snapshot(Metric::Concurrency, 20.0, 20.0, &p);
        snap.stable.queue = 30.0;
        snap.panic.queue = 30.0;
        let mut k = Kpa::new(&p, 1, Duration::ZERO);
        assert_eq!(run(&mut k, &p, 0, 5, &snap, true).desired, Some(5));
    }
}
