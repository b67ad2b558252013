//! What happens to an algorithm's count before it is applied, in this
//! order: schedule floors raise it, scale to zero waits for its grace
//! period (and needs min 0), then the min/max bounds. Missing data and
//! partial data never lower the current count.

use std::time::Duration;

use scalecar_config::Policy;

/// Inputs of [`apply`].
#[derive(Debug, Clone, Copy)]
pub struct BehaviorInput<'a> {
    /// The algorithm's count (`None`: no decision, hold).
    pub desired: Option<u32>,
    /// The current `spec.replicas`.
    pub current: u32,
    pub policy: &'a Policy,
    /// Clock time (the same clock as `last_activity`).
    pub now: Duration,
    /// Wall-clock time, for schedule floors (UTC).
    pub unix_secs: u64,
    /// Last traffic at the pool, or when watching began if none was seen
    /// since (`None`: unknown, so never scale to zero).
    pub last_activity: Option<Duration>,
    /// Some gateway replica's signals are missing: never scale down.
    pub partial: bool,
}

/// The count to apply and what changed the algorithm's count, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub replicas: u32,
    pub reason: Option<String>,
}

/// Applies schedule floors, scale-to-zero and bounds. Pure.
pub fn apply(input: &BehaviorInput<'_>) -> Applied {
    let p = input.policy;
    let mut notes: Vec<String> = Vec::new();
    let mut n = match input.desired {
        Some(d) => d,
        None => {
            notes.push("no decision: holding".into());
            input.current
        }
    };
    // Schedule floors.
    if let Some(floor) = p
        .schedule
        .iter()
        .filter(|f| f.active_at(input.unix_secs))
        .max_by_key(|f| f.min_replicas)
        && floor.min_replicas > n
    {
        n = floor.min_replicas;
        notes.push(format!(
            "schedule floor {} ({})",
            floor.min_replicas, floor.cron.source
        ));
    }
    // Scale to zero.
    if n == 0 && input.current > 0 {
        let idle_for = input.last_activity.map(|t| input.now.saturating_sub(t));
        let grace = p.scale_to_zero_grace_period;
        if p.min_replicas > 0 {
            // The bounds below raise it; nothing to say here.
        } else {
            match idle_for {
                Some(idle) if idle >= grace => {}
                Some(idle) => {
                    n = 1;
                    notes.push(format!(
                        "scale to zero after {} idle ({} so far)",
                        humantime::format_duration(grace),
                        humantime::format_duration(Duration::from_secs(idle.as_secs()))
                    ));
                }
                None => {
                    n = 1;
                    notes.push("scale to zero only after observed idleness".into());
                }
            }
        }
    }
    // Bounds.
    let max = p.max_bound();
    if n < p.min_replicas {
        n = p.min_replicas;
        notes.push(format!("min-replicas {}", p.min_replicas));
    } else if n > max {
        n = max;
        notes.push(format!("max-replicas {max}"));
    }
    // Missing or partial data never scales down.
    if (input.partial || input.desired.is_none()) && n < input.current {
        n = input.current.min(max);
        if input.partial {
            notes.push("partial data: not scaling down".into());
        }
    }
    Applied {
        replicas: n,
        reason: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use scalecar_config::ScheduleFloor;

    fn input(p: &Policy, desired: Option<u32>, current: u32) -> BehaviorInput<'_> {
        BehaviorInput {
            desired,
            current,
            policy: p,
            now: Duration::from_secs(1000),
            unix_secs: 0,
            last_activity: Some(Duration::from_secs(900)),
            partial: false,
        }
    }

    #[test]
    fn bounds_apply_last() {
        let p = Policy {
            min_replicas: 2,
            max_replicas: Some(5),
            ..Policy::default()
        };
        assert_eq!(apply(&input(&p, Some(9), 3)).replicas, 5);
        assert_eq!(apply(&input(&p, Some(1), 3)).replicas, 2);
        assert_eq!(
            apply(&input(&p, Some(4), 3)),
            Applied {
                replicas: 4,
                reason: None
            }
        );
    }

    #[test]
    fn no_decision_holds_and_partial_never_scales_down() {
        let p = Policy::default();
        let a = apply(&input(&p, None, 4));
        assert_eq!(a.replicas, 4);
        assert!(a.reason.unwrap().contains("no decision"));
        let mut i = input(&p, Some(2), 4);
        i.partial = true;
        assert_eq!(apply(&i).replicas, 4);
        i.desired = Some(6);
        assert_eq!(apply(&i).replicas, 6);
    }

    #[test]
    fn scale_to_zero_waits_for_the_grace_period_and_min_zero() {
        let p = Policy {
            min_replicas: 0,
            scale_to_zero_grace_period: Duration::from_secs(30),
            ..Policy::default()
        };
        let mut i = input(&p, Some(0), 2);
        i.last_activity = Some(Duration::from_secs(980));
        let a = apply(&i);
        assert_eq!(a.replicas, 1);
        assert!(
            a.reason
                .unwrap()
                .contains("scale to zero after 30s idle (20s so far)")
        );
        i.last_activity = Some(Duration::from_secs(970));
        assert_eq!(apply(&i).replicas, 0);
        // Idleness never observed (unknown) is not idleness.
        i.last_activity = None;
        assert_eq!(apply(&i).replicas, 1);
        // min 1: never zero.
        let p1 = Policy {
            min_replicas: 1,
            ..p.clone()
        };
        let mut i = input(&p1, Some(0), 2);
        i.last_activity = None;
        assert_eq!(apply(&i).replicas, 1);
    }

    #[test]
    fn schedule_floors_raise_the_count() {
        let floor = ScheduleFloor::parse("0 9 * * * for 10h min 4").unwrap();
        let p = Policy {
            schedule: vec![floor],
            ..Policy::default()
        };
        let mut i = input(&p, Some(1), 1);
        i.unix_secs = 10 * 3600; // 10:00 UTC, 1970-01-01
        let a = apply(&i);
        assert_eq!(a.replicas, 4);
        assert!(a.reason.unwrap().contains("schedule floor 4 (0 9 * * *)"));
        i.unix_secs = 20 * 3600;
        assert_eq!(apply(&i).replicas, 1);
    }

    proptest! {
        #[test]
        fn applied_is_always_within_bounds(
            desired in prop::option::of(0u32..200),
            current in 0u32..200,
            min in 0u32..20,
            extra in 0u32..50,
            unbounded in any::<bool>(),
            partial in any::<bool>(),
            idle in prop::option::of(0u64..100),
            floor in 0u32..80,
            hour in 0u64..24,
        ) {
            let max = (!unbounded).then_some(min + extra.max(1));
            let schedule = vec![ScheduleFloor::parse(&format!("0 6 * * * for 12h min {floor}")).unwrap()];
            let p = Policy { min_replicas: min, max_replicas: max, schedule, ..Policy::default() };
            let i = BehaviorInput {
                desired,
                current,
                policy: &p,
                now: Duration::from_secs(1000),
                unix_secs: hour * 3600,
                last_activity: idle.map(|s| Duration::from_secs(1000 - s)),
                partial,
            };
            let a = apply(&i);
            prop_assert!(a.replicas >= min);
            prop_assert!(a.replicas <= p.max_bound());
        }
    }
}
