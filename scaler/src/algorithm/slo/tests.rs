use std::sync::Arc;

use super::hold::TOLERATED;
use super::*;
use crate::clock::ManualClock;
use crate::signals::{PoolSignals, SignalsConfig};
use crate::snapshot::{LatencySummary, WindowSnapshot, WindowValues};

fn policy() -> Policy {
    Policy {
        algorithm: "slo".into(),
        target: 4000.0,
        target_utilization: 1.0,
        slo_percentile: 90,
        ttft_target: Some(Duration::from_secs(1)),
        itl_target: Some(Duration::from_millis(40)),
        ..Policy::default()
    }
}

/// A window of `secs` with `demand` prompt tok/s arriving and, when
/// `measured` is given, one replica busy all along prefilling at it.
fn window(secs: u64, demand: f64, measured: Option<f64>, ttft_p90_ms: Option<u64>) -> WindowValues {
    WindowValues {
        duration: Duration::from_secs(secs),
        observed: Duration::from_secs(secs),
        prompt_tokens_per_sec: demand,
        prefilled_tokens_per_sec: measured.unwrap_or(0.0),
        prefill_busy: if measured.is_some() { 1.0 } else { 0.0 },
        ttft: LatencySummary {
            count: if ttft_p90_ms.is_some() { 100 } else { 0 },
            p90: ttft_p90_ms.map(Duration::from_millis),
            ..LatencySummary::default()
        },
        ..WindowValues::default()
    }
}

/// A minute at 6,000 prompt tok/s on replicas measured at 5,000, with
/// `met` of `eligible` feasible first tokens in time.
fn counted(eligible: u64, met: u64) -> WindowValues {
    let mut w = window(60, 6000.0, Some(5000.0), Some(300));
    w.slo_eligible = eligible;
    w.slo_met = met;
    w
}

fn snap(stable: WindowValues, panic: WindowValues) -> WindowSnapshot {
    WindowSnapshot {
        stable,
        panic,
        ..WindowSnapshot::default()
    }
}

fn decide_at(
    s: &mut Slo,
    p: &Policy,
    t: Duration,
    ready: u32,
    spec: u32,
    snap: &WindowSnapshot,
) -> Decision {
    decide_with_kv(s, p, t, (ready, spec), snap, None)
}

/// A unified pool's decision at `t` with `(ready, spec)` replicas and the
/// engines' KV cache size `kv`.
fn decide_with_kv(
    s: &mut Slo,
    p: &Policy,
    t: Duration,
    (ready, spec): (u32, u32),
    snap: &WindowSnapshot,
    kv: Option<u64>,
) -> Decision {
    s.decide(&DecisionInput {
        now: t,
        ready,
        spec,
        snapshot: snap,
        policy: p,
        role: Role::Unified,
        reachable: true,
        partial: false,
        cold_start: Some(Duration::from_secs(60)),
        kv_capacity: kv,
    })
}

fn decide(s: &mut Slo, p: &Policy, ready: u32, spec: u32, snap: &WindowSnapshot) -> Decision {
    decide_at(s, p, Duration::ZERO, ready, spec, snap)
}

#[test]
fn the_measured_rate_replaces_the_prior() {
    let p = policy();
    let mut s = Slo::new(&p);
    assert_eq!(s.capacity(), 4000.0);
    let w = window(60, 5000.0, Some(5600.0), Some(300));
    let d = decide(&mut s, &p, 1, 1, &snap(w, w));
    assert_eq!(s.capacity(), 5600.0);
    assert!(d.reason.contains("capacity 5600 measured"), "{}", d.reason);
}

#[test]
fn prompts_waiting_for_cache_do_not_lower_capacity() {
    // Two replicas of 40,000 tokens of KV each, measured at 5,000 tok/s.
    let p = policy();
    let mut s = Slo::new(&p);
    let kv = Some(40_000);
    let at = |k: u64| Duration::from_secs(100 + 2 * k);
    let fast = window(60, 6000.0, Some(5000.0), Some(300));
    decide_with_kv(&mut s, &p, at(0), (2, 2), &snap(fast, fast), kv);
    assert_eq!(s.capacity(), 5000.0);
    // 120,000 tokens in flight, more than both caches hold: prompts wait
    // for cache, and busy time shows 2,000 tok/s. The estimate holds.
    let mut stalled = window(60, 6000.0, Some(2000.0), Some(300));
    stalled.tokens = 120_000.0;
    let mut reason = String::new();
    for k in 1..60 {
        reason = decide_with_kv(&mut s, &p, at(k), (2, 2), &snap(stalled, stalled), kv).reason;
    }
    assert_eq!(s.capacity(), 5000.0);
    assert!(
        reason.contains("capacity 5000 measured, held while the KV caches are full"),
        "{reason}"
    );
    // Four replicas ready hold those tokens: 2,000 tok/s is then how fast
    // the engines prefill, and the estimate follows it within a minute.
    for k in 60..90 {
        decide_with_kv(&mut s, &p, at(k), (4, 4), &snap(stalled, stalled), kv);
    }
    assert!((s.capacity() - 2000.0).abs() < 200.0, "{}", s.capacity());
}

#[test]
fn a_backlog_does_not_lower_capacity_below_the_engines_rate() {
    // One replica prefilling 5,000 tok/s; 40 prompts of 1,000 tokens
    // arrive at once: the last gets its first token 8 s later, far over
    // the 1 s target. Recorded through the real signals.
    let clock = Arc::new(ManualClock::new(Duration::from_secs(100)));
    let signals = PoolSignals::new(SignalsConfig::default(), clock.clone());
    for _ in 0..40 {
        signals.arrival(1000);
        signals.dispatch(1000);
    }
    signals.prefill_busy(true);
    for i in 1..=40u64 {
        clock.set(Duration::from_secs(100) + Duration::from_millis(200 * i));
        signals.first_token(1000, Duration::from_millis(200 * i));
        signals.complete(1000, 1, true, None);
    }
    signals.prefill_busy(false);
    clock.set(Duration::from_secs(110));
    let p = policy();
    let mut s = Slo::new(&p);
    let snapshot = signals.snapshot(Duration::from_secs(60), Duration::from_secs(6));
    let measured = snapshot.stable.prefill_rate(Duration::from_secs(2));
    assert!(
        measured.is_some_and(|r| (r - 5000.0).abs() < 50.0),
        "{measured:?}"
    );
    assert!(snapshot.stable.ttft.p90 > Some(Duration::from_secs(5)));
    // Every decision for the next minute sees the backlog's misses.
    for k in 0..30u64 {
        decide_at(
            &mut s,
            &p,
            Duration::from_secs(110 + 2 * k),
            1,
            1,
            &snapshot,
        );
    }
    // Not below the engine's rate (the panic window's whole-second slots
    // may read a little above it).
    assert!((4950.0..5600.0).contains(&s.capacity()), "{}", s.capacity());
    // Misses may lower the plan, never collapse it.
    assert!(s.correction() >= 0.5, "{}", s.correction());
}

#[test]
fn a_burst_shorter_than_the_budget_adds_no_replica() {
    let mut p = policy();
    p.ttft_target = Some(Duration::from_secs(10));
    let mut s = Slo::new(&p);
    // 5,000 tok/s measured; 4,000 tok/s sustained, and in the last 6 s a
    // 2 s burst at 14,500 tok/s: 7,500 tok/s over the panic window. The
    // 45,000 tokens fit 60 % of 5,000 tok/s over the 6 s plus the 10 s
    // budget (48,000).
    let stable = window(60, 4000.0, Some(5000.0), Some(500));
    let panic = window(6, 7_500.0, Some(5000.0), Some(500));
    let d = decide(&mut s, &p, 1, 1, &snap(stable, panic));
    assert_eq!(d.desired, Some(1), "{}", d.reason);
    // Without the budget (1 s), the same burst needs two: 45,000 tokens
    // over 7 s, at 60 % of 5,000 tok/s, are 2.1 replicas (2 within the
    // tolerance).
    p.ttft_target = Some(Duration::from_secs(1));
    let mut s = Slo::new(&p);
    let d = decide(&mut s, &p, 1, 1, &snap(stable, panic));
    assert_eq!(d.desired, Some(2), "{}", d.reason);
    // Sustained at 13,000 tok/s: three replicas, whatever the budget.
    p.ttft_target = Some(Duration::from_secs(10));
    let mut s = Slo::new(&p);
    let sustained = window(60, 13_000.0, Some(5000.0), Some(500));
    let d = decide(&mut s, &p, 1, 1, &snap(sustained, panic));
    assert_eq!(d.desired, Some(3), "{}", d.reason);
}

#[test]
fn a_burst_that_outlasts_a_cold_start_is_sustained() {
    let mut p = policy();
    p.ttft_target = Some(Duration::from_secs(10));
    // 5,000 tok/s measured; 4,000 sustained, and a burst at 16,000 that
    // the 60 s stable window has not taken in (held there to isolate the
    // rule). The cold start is 60 s.
    let stable = window(60, 4000.0, Some(5000.0), Some(500));
    let burst = window(6, 16_000.0, Some(5000.0), Some(500));
    let quiet = window(6, 4000.0, Some(5000.0), Some(500));
    let start = Duration::from_secs(100);
    let at = |k: u64| start + Duration::from_secs(2 * k);
    let mut s = Slo::new(&p);
    // For its first minute (it began with the panic window, 6 s before
    // the first decision) the burst is the burst term's: its 96,000
    // tokens over 6 s + the 10 s budget at 85 % of 5,000 → 2.
    for k in 0..27 {
        let d = decide_at(&mut s, &p, at(k), 2, 2, &snap(stable, burst));
        assert_eq!(d.desired, Some(2), "t {}: {}", 2 * k, d.reason);
        assert!(!d.reason.contains("sustained"), "{}", d.reason);
    }
    // A minute on, replicas asked for now still find it: 16,000 tok/s
    // over the minute plus the budget is 2.7 replicas' work.
    let d = decide_at(&mut s, &p, at(27), 2, 2, &snap(stable, burst));
    assert_eq!(d.desired, Some(3), "{}", d.reason);
    assert!(
        d.reason
            .contains("a burst of 16000 for 60.0s (over a cold start): sustained"),
        "{}",
        d.reason
    );
    // A pause ends it: the next burst starts over.
    decide_at(&mut s, &p, at(28), 3, 3, &snap(stable, quiet));
    let d = decide_at(&mut s, &p, at(29), 3, 3, &snap(stable, burst));
    assert!(!d.reason.contains("sustained"), "{}", d.reason);
    // With a 20 s cold start the same burst is sustained after 20 s.
    let mut s = Slo::new(&p);
    let b = snap(stable, burst);
    let input = |k: u64| DecisionInput {
        now: at(k),
        ready: 2,
        spec: 2,
        snapshot: &b,
        policy: &p,
        role: Role::Unified,
        reachable: true,
        partial: false,
        cold_start: Some(Duration::from_secs(20)),
        kv_capacity: None,
    };
    for k in 0..7 {
        let d = s.decide(&input(k));
        assert!(!d.reason.contains("sustained"), "t {}: {}", 2 * k, d.reason);
    }
    let d = s.decide(&input(7));
    assert!(
        d.reason.contains("for 20.0s (over a cold start)"),
        "{}",
        d.reason
    );
}

#[test]
fn a_sustained_rise_is_met_one_cold_start_ahead() {
    let p = policy();
    // Demand rises 55 tok/s every second for six minutes (0 → 19,800);
    // the cold start is 60 s: the trend says 23,100 by the time a replica
    // asked for now serves.
    let run = |rising: bool| {
        let mut s = Slo::new(&p);
        let mut last = None;
        for k in 0..=180u64 {
            let t = 2 * k;
            let demand = if rising { 55.0 * t as f64 } else { 19_800.0 };
            // No latency samples: the plan is the measured rate alone.
            let w = window(60, demand, Some(5000.0), None);
            last = Some(decide_at(
                &mut s,
                &p,
                Duration::from_secs(t),
                3,
                3,
                &snap(w, w),
            ));
        }
        last.unwrap()
    };
    let flat = run(false);
    let rising = run(true);
    // 19,800 × 60/61 / 5,000 = 3.9 → 4 without the trend; 23,100 → 4.5
    // → 5 with it.
    assert_eq!(flat.desired, Some(4), "{}", flat.reason);
    assert_eq!(rising.desired, Some(5), "{}", rising.reason);
    assert!(rising.reason.contains("rising 55/s"), "{}", rising.reason);
}

#[test]
fn recurring_bursts_keep_their_replicas_between_them() {
    let p = policy();
    let quiet = window(60, 1000.0, Some(5000.0), Some(300));
    let burst = window(6, 30_000.0, Some(5000.0), Some(300));
    let run = |bursts: &[u64], until: u64| {
        let mut s = Slo::new(&p);
        let mut out = Vec::new();
        for t in (0..=until).step_by(2) {
            let in_burst = bursts.iter().any(|b| (*b..b + 10).contains(&t));
            let panic = if in_burst { burst } else { quiet };
            let d = decide_at(
                &mut s,
                &p,
                Duration::from_secs(t),
                6,
                6,
                &snap(quiet, panic),
            );
            out.push((t, d));
        }
        out
    };
    let at = |run: &[(u64, Decision)], t: u64| {
        run.iter()
            .find(|(x, _)| *x == t)
            .map(|(_, d)| d.clone())
            .unwrap()
    };
    // Still at the burst's count at `held` (over `horizon` when given),
    // back to one replica at `released`.
    let held_then_let_go =
        |r: &[(u64, Decision)], held: u64, horizon: Option<&str>, released: u64| {
            let d = at(r, held);
            assert!(d.desired >= Some(5), "t {held}: {}", d.reason);
            if let Some(h) = horizon {
                assert!(d.reason.contains(h), "t {held}: {}", d.reason);
            }
            let d = at(r, released);
            assert_eq!(d.desired, Some(1), "t {released}: {}", d.reason);
        };
    // Bursts every 3 minutes: each burst's count is held for twice the
    // gap (6 minutes) after the last one, past the floor of five cold
    // starts (5 minutes). The gap: from the last decision of one burst
    // (8 s) to the first of the next (180 s).
    held_then_let_go(
        &run(&[0, 180, 360], 800),
        700,
        Some("held over 344.0s"),
        800,
    );
    // Bursts every 6 minutes: held for twice that gap, past the 10 minutes
    // the hold was once capped at (on long-context bursts, seed 3, a level
    // so released came back 2 minutes later: 94.9 % instead of 99.5 %),
    // and let go once twice the gap has passed.
    held_then_let_go(
        &run(&[0, 360, 720], 1500),
        1400,
        Some("held over 704.0s"),
        1500,
    );
    // A single burst is let go after five cold starts.
    held_then_let_go(&run(&[0], 400), 290, None, 400);
}

#[test]
fn a_miss_that_is_news_lowers_the_plan_by_a_bounded_step() {
    let p = policy();
    // 2 replicas measured at 5,000 tok/s carry 3,000 each and miss: the
    // plan was wrong. It is news once both have served the whole window
    // (60 s); then the correction steps down at most every 15 s.
    let w = window(60, 6000.0, Some(5000.0), Some(1500));
    let at = |s: &mut Slo, t: u64, ready: u32, spec: u32, w: WindowValues| {
        decide_at(s, &p, Duration::from_secs(t), ready, spec, &snap(w, w));
    };
    let mut s = Slo::new(&p);
    for t in (0..60).step_by(2) {
        at(&mut s, t, 2, 2, w);
    }
    assert_eq!(s.correction(), 1.0);
    at(&mut s, 60, 2, 2, w);
    assert!((s.correction() - 0.9).abs() < 1e-9, "{}", s.correction());
    at(&mut s, 62, 2, 2, w);
    assert!((s.correction() - 0.9).abs() < 1e-9, "{}", s.correction());
    for t in (64..2000).step_by(2) {
        at(&mut s, t, 2, 2, w);
    }
    // It stops once the plan says two replicas are too few: the misses
    // are explained, and the decision asks for a third.
    let c = s.correction();
    assert!((0.5..0.9).contains(&c), "{c}");
    let d = decide_at(&mut s, &p, Duration::from_secs(2000), 2, 2, &snap(w, w));
    assert_eq!(d.desired, Some(3), "{}", d.reason);
    assert_eq!(s.correction(), c, "a miss the plan explains is not news");
    // Met under load: it recovers, up to 1 and no further (the queueing
    // model already plans as close to the measured rate as the tail
    // allows).
    let ok = window(60, 6000.0, Some(5000.0), Some(300));
    for t in (2002..2100).step_by(2) {
        at(&mut s, t, 2, 2, ok);
    }
    assert!(s.correction() > c, "{}", s.correction());
    for t in (2100..3000).step_by(2) {
        at(&mut s, t, 2, 2, ok);
    }
    assert_eq!(s.correction(), 1.0);
    // Replicas still starting: a miss is not news.
    let mut s = Slo::new(&p);
    for t in (0..200).step_by(2) {
        at(&mut s, t, 2, 4, w);
    }
    assert_eq!(s.correction(), 1.0);
}

#[test]
fn an_hour_far_within_its_goal_plans_hotter_until_it_spends_more() {
    let p = policy();
    // Goal 90 %. An hour at 99.5 % spends 5 % of its misses: served under
    // load (one replica, 6,000 tok/s), the correction climbs past 1 to its
    // ceiling — once the budget has seen the whole hour, not before.
    let at = |s: &mut Slo, t: u64, w: WindowValues| {
        decide_at(s, &p, Duration::from_secs(t), 1, 1, &snap(w, w)).reason
    };
    let mut s = Slo::new(&p);
    let mut reason = String::new();
    for t in (0..3600).step_by(2) {
        reason = at(&mut s, t, counted(1000, 995));
    }
    assert_eq!(
        s.correction(),
        1.0,
        "a fresh budget is not an underspent hour"
    );
    for t in (3600..3700).step_by(2) {
        reason = at(&mut s, t, counted(1000, 995));
    }
    assert!((s.correction() - 1.3).abs() < 1e-9, "{}", s.correction());
    assert!(reason.contains("× 1.30 ="), "{reason}");
    // Windows at 93 % (within the window's goal of 92 %) for long enough
    // to spend 35 % of the hour's misses: back at 1 at once, not above.
    let mut back = None;
    for t in (3700..9000).step_by(2) {
        at(&mut s, t, counted(1000, 930));
        if s.correction() <= 1.0 {
            back = Some(t);
            break;
        }
    }
    let back = back.expect("the correction stayed above 1");
    assert_eq!(s.correction(), 1.0);
    let used = s.budget.used(0.1).unwrap_or(0.0);
    assert!(
        (0.35..0.4).contains(&used),
        "back at {back} with {used} spent"
    );
}

#[test]
fn a_window_under_the_goal_is_news_only_once_the_hour_spent_half_its_misses() {
    let p = policy();
    // Goal 90 %: 10 % of feasible requests may miss, a window 8 %.
    let at = |s: &mut Slo, t: u64, w: WindowValues| {
        decide_at(s, &p, Duration::from_secs(t), 2, 2, &snap(w, w));
    };
    // Without an hour behind it, a window under the goal is news at once.
    let mut s = Slo::new(&p);
    for t in (0..120).step_by(2) {
        at(&mut s, t, counted(1000, 910));
    }
    assert!(s.correction() < 1.0, "{}", s.correction());
    // An hour at 99 % has spent a tenth of the budget: windows just under
    // the goal (91 %) are chance, and the plan holds for a while …
    let mut s = Slo::new(&p);
    for t in (0..3700).step_by(2) {
        at(&mut s, t, counted(1000, 990));
    }
    let before = s.correction();
    assert!(before > 1.0, "an underspent hour plans hotter: {before}");
    for t in (3700..4200).step_by(2) {
        at(&mut s, t, counted(1000, 910));
        assert!(s.correction() >= 1.0, "lowered at {t}: {}", s.correction());
    }
    // … until they have spent half of it: then they are news.
    let mut lowered = None;
    for t in (4200..12_000).step_by(2) {
        at(&mut s, t, counted(1000, 910));
        if s.correction() < 1.0 {
            lowered = Some(t);
            break;
        }
    }
    let lowered = lowered.expect("the correction never moved");
    assert!(lowered > 4200, "{lowered}");
    let used = s.budget.used(0.1).unwrap_or(0.0);
    assert!((0.5..0.55).contains(&used), "{used}");
}

#[test]
fn misses_still_in_the_window_step_again_only_once_the_hour_is_overspent() {
    let p = policy();
    // Goal 90 %: a window may miss 8 %.
    let under = counted(1000, 910);
    let clean = counted(100, 100);
    let fresh = counted(100, 80);
    let at = |s: &mut Slo, t: u64, panic: WindowValues| {
        decide_at(s, &p, Duration::from_secs(t), 2, 2, &snap(under, panic)).reason
    };
    // An hour at 91 % has spent 90 % of its misses: a window under the
    // goal whose panic window has none of its own is no news (within the
    // hour, before the budget has seen it whole, every one was: the
    // correction went down, and comes back once they are not) …
    let mut s = Slo::new(&p);
    let mut reason = String::new();
    for t in (0..3600).step_by(2) {
        reason = at(&mut s, t, clean);
    }
    assert!(s.correction() < 1.0, "{}", s.correction());
    for t in (3600..4000).step_by(2) {
        reason = at(&mut s, t, clean);
    }
    assert_eq!(s.correction(), 1.0);
    assert!(
        reason.contains("none new, and the last hour spent 90 % of its misses"),
        "{reason}"
    );
    // … new misses lower it one step, and the same misses, still in the
    // stable window, do not again at the next chances (its latest seconds
    // were served in time: it recovers).
    at(&mut s, 4000, fresh);
    assert!((s.correction() - 0.9).abs() < 1e-9, "{}", s.correction());
    let mut last = s.correction();
    for t in (4002..4060).step_by(2) {
        at(&mut s, t, clean);
        assert!(s.correction() >= last, "lowered again at {t}");
        last = s.correction();
    }
    // An hour at 85 % has overspent: every 15 s step lowers it.
    let overspent = counted(1000, 850);
    let mut s = Slo::new(&p);
    for t in (0..3600).step_by(2) {
        decide_at(
            &mut s,
            &p,
            Duration::from_secs(t),
            2,
            2,
            &snap(overspent, clean),
        );
    }
    let c = s.correction();
    assert!(c < 0.9, "{c}");
}

#[test]
fn consolidation_guards_scale_down() {
    let p = policy();
    let mut s = Slo::new(&p);
    // 5 replicas, need 3.7 (18,800 × 60/61 over 5,000): 4 would run over
    // 90 % each → hold 5 (past the floor over which a scaler keeps the
    // count it found).
    let w = window(60, 18_800.0, Some(5000.0), Some(300));
    decide_at(&mut s, &p, Duration::ZERO, 5, 5, &snap(w, w));
    let d = decide_at(&mut s, &p, Duration::from_secs(302), 5, 5, &snap(w, w));
    assert_eq!(d.desired, Some(5), "{}", d.reason);
    assert!(d.reason.contains("consolidation"), "{}", d.reason);
    // Need 2.0: down to what it needs with 10 % to spare (2.2 → 3), once
    // the count it found running has been held for the floor.
    let mut s = Slo::new(&p);
    let w = window(60, 10_200.0, Some(5000.0), Some(300));
    decide_at(&mut s, &p, Duration::ZERO, 5, 5, &snap(w, w));
    let d = decide_at(&mut s, &p, Duration::from_secs(302), 5, 5, &snap(w, w));
    assert_eq!(d.desired, Some(3), "{}", d.reason);
}

#[test]
fn a_need_just_over_a_count_is_met_by_it() {
    let p = policy();
    // (demand over 5,000 tok/s a replica, spread over the window and the
    // 1 s budget) → what is asked for, from one replica.
    for (demand, need, asked) in [
        (15_750.0, 3.10_f64, 3),
        (16_270.0, 3.20, 4),
        (5_590.0, 1.10, 1),
        (500.0, 0.10, 1),
    ] {
        let w = window(60, demand, Some(5000.0), Some(300));
        let d = decide(&mut Slo::new(&p), &p, 1, 1, &snap(w, w));
        assert!(
            d.reason.contains(&format!("need {need:.1}")),
            "{need}: {}",
            d.reason
        );
        assert_eq!(d.desired, Some(asked), "{}", d.reason);
        assert_eq!(
            d.reason.contains("within the tolerance"),
            asked < need.ceil() as u32,
            "{}",
            d.reason
        );
    }
    // The KV floor is never rounded down: 3.125 replicas of cache are 4
    // (tokens_in_flight_are_planned_within_the_kv_cache).
    let d = decide_kv(
        &mut Slo::new(&p),
        &p,
        1,
        &kv_bound(100_000.0, 100_000.0),
        Some(40_000),
    );
    assert_eq!(d.desired, Some(4), "{}", d.reason);
}

#[test]
fn a_miss_now_never_scales_down() {
    let p = policy();
    let mut s = Slo::new(&p);
    let w = window(60, 1000.0, Some(5000.0), Some(3000));
    let d = decide(&mut s, &p, 4, 4, &snap(w, w));
    assert_eq!(d.desired, Some(4), "{}", d.reason);
}

#[test]
fn a_backlog_older_than_the_replicas_does_not_keep_them() {
    let p = policy();
    // 20 replicas where 1.2 are needed; half the window's feasible
    // requests missed.
    let mut w = window(60, 6000.0, Some(5000.0), Some(3000));
    w.slo_eligible = 100;
    w.slo_met = 50;
    let at = |s: &mut Slo, t: u64, p99: u64, w: &mut WindowValues| {
        w.ttft.p99 = Some(Duration::from_secs(p99));
        decide_at(s, &p, Duration::from_secs(t), 20, 20, &snap(*w, *w))
    };
    // All 20 ready since 0 (the count the scaler found, held for its
    // floor). At 302 s the window's p99 waited 310 s: requests that queued
    // before the replicas came, in the engines that took them. What runs
    // was never shown too few, and the need lets replicas go.
    let mut s = Slo::new(&p);
    let _ = at(&mut s, 0, 5, &mut w);
    let d = at(&mut s, 302, 310, &mut w);
    assert!(d.desired.is_some_and(|n| n < 20), "{}", d.reason);
    assert!(d.reason.ends_with(BACKLOG_BEFORE_READY), "{}", d.reason);
    // Misses that waited less than the replicas have been ready came
    // while they were all there: no scale-down.
    let mut s = Slo::new(&p);
    let _ = at(&mut s, 0, 5, &mut w);
    let d = at(&mut s, 302, 5, &mut w);
    assert_eq!(d.desired, Some(20), "{}", d.reason);
    assert!(
        d.reason.ends_with("; target missed: no scale-down"),
        "{}",
        d.reason
    );
}

/// A decode pool's decision on two replicas holding `tokens` in flight,
/// ITL well within its target, engines reporting `kv` tokens of cache.
fn decide_decode(p: &Policy, tokens: f64, kv: Option<u64>) -> Decision {
    let mut w = WindowValues {
        duration: Duration::from_secs(60),
        observed: Duration::from_secs(60),
        tokens,
        ..WindowValues::default()
    };
    w.itl = LatencySummary {
        count: 500,
        p90: Some(Duration::from_millis(20)),
        ..LatencySummary::default()
    };
    Slo::new(p).decide(&DecisionInput {
        now: Duration::ZERO,
        ready: 2,
        spec: 2,
        snapshot: &snap(w, w),
        policy: p,
        role: Role::Decode,
        reachable: true,
        partial: false,
        cold_start: None,
        kv_capacity: kv,
    })
}

#[test]
fn decode_pools_size_tokens_in_flight_on_the_prior() {
    let mut p = policy();
    p.target = 10_000.0;
    let d = decide_decode(&p, 25_000.0, None);
    assert_eq!(d.desired, Some(3), "{}", d.reason);
    assert!(
        d.reason.starts_with("itl p90 20ms within target 40ms"),
        "{}",
        d.reason
    );
}

#[test]
fn no_data_no_decision_and_idle_asks_for_zero() {
    let p = policy();
    let mut s = Slo::new(&p);
    let d = decide(&mut s, &p, 3, 3, &WindowSnapshot::default());
    assert_eq!(d.desired, None);
    // Idle: the three it found running are kept for the hold's floor (it
    // does not know why they run), then let go to zero.
    let idle = window(60, 0.0, None, None);
    let at = |s: &mut Slo, t: u64| {
        decide_at(s, &p, Duration::from_secs(t), 3, 3, &snap(idle, idle)).desired
    };
    let mut s = Slo::new(&p);
    assert_eq!(at(&mut s, 0), Some(3));
    assert_eq!(at(&mut s, 298), Some(3));
    assert_eq!(at(&mut s, 302), Some(0));
}

#[test]
fn a_scaler_that_starts_keeps_what_it_found_for_the_floor() {
    let p = policy();
    // Need 2.0 (10,200 × 60/61 over 5,000) where 5 run: a scaler that has
    // just started (a restart, a new leader) holds the 5 for five cold
    // starts, then consolidates to what it needs with 10 % to spare (3).
    let w = window(60, 10_200.0, Some(5000.0), Some(300));
    let mut s = Slo::new(&p);
    for t in (0..300).step_by(2) {
        let d = decide_at(&mut s, &p, Duration::from_secs(t), 5, 5, &snap(w, w));
        assert_eq!(d.desired, Some(5), "at {t}: {}", d.reason);
    }
    let d = decide_at(&mut s, &p, Duration::from_secs(302), 5, 5, &snap(w, w));
    assert_eq!(d.desired, Some(3), "{}", d.reason);
    // What it found is a floor for that long, not a ceiling: more work
    // asks for more at once.
    let mut s = Slo::new(&p);
    let busy = window(60, 40_000.0, Some(5000.0), Some(300));
    let d = decide_at(&mut s, &p, Duration::ZERO, 5, 5, &snap(busy, busy));
    assert!(d.desired > Some(5), "{}", d.reason);
}

#[test]
fn the_signals_judge_only_prompts_that_fit_the_target_alone() {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(10)));
    let signals = PoolSignals::new(SignalsConfig::default(), clock.clone());
    // Target 1 s, a replica prefills 5,000 tok/s: a 4,000-token prompt
    // can make it, a 9,000-token one cannot.
    signals.set_slo_reference(Some(Duration::from_secs(1)), Some(5000.0));
    for (prompt, ttft_ms) in [(4000, 900), (4000, 1500), (9000, 1900), (100, 50)] {
        signals.arrival(prompt);
        signals.dispatch(prompt);
        signals.first_token(prompt, Duration::from_millis(ttft_ms));
    }
    // No measured rate given: the last one stands.
    signals.set_slo_reference(Some(Duration::from_secs(1)), None);
    signals.first_token(9000, Duration::from_millis(1900));
    clock.set(Duration::from_secs(11));
    let w = signals.snapshot(Duration::from_secs(60), Duration::from_secs(6));
    assert_eq!((w.stable.slo_eligible, w.stable.slo_met), (3, 2));
    assert_eq!(w.stable.slo_attainment(), Some((2.0 / 3.0, 3)));
    // No target: nothing is judged.
    signals.set_slo_reference(None, Some(5000.0));
    signals.first_token(100, Duration::from_millis(50));
    let w = signals.snapshot(Duration::from_secs(60), Duration::from_secs(6));
    assert_eq!(w.stable.slo_eligible, 3);
}

#[test]
fn feasible_attainment_is_what_the_plan_answers_to() {
    let p = policy();
    let with = |eligible: u64, met: u64, p90_ms: u64| {
        let mut w = window(60, 6000.0, Some(5000.0), Some(p90_ms));
        w.slo_eligible = eligible;
        w.slo_met = met;
        w
    };
    // p90 is far over the target (long prompts that no count serves in
    // time), but 99 % of the feasible requests met it: no miss (the goal
    // for a 90th percentile is 92 % in a window).
    let mut s = Slo::new(&p);
    let w = with(1000, 990, 3000);
    let d = decide(&mut s, &p, 2, 2, &snap(w, w));
    assert!(
        d.reason
            .starts_with("ttft within 1.0s for 99.0 % of 1000 feasible requests (meets"),
        "{}",
        d.reason
    );
    // 91 % of them: under the goal, no scale-down.
    let w = with(1000, 910, 300);
    let d = decide(&mut s, &p, 5, 5, &snap(w, w));
    assert!(d.reason.contains("(under the 90% goal)"), "{}", d.reason);
    assert_eq!(d.desired, Some(5), "{}", d.reason);
}

#[test]
fn random_arrivals_are_noise_a_burst_is_not() {
    let p = policy();
    // 8 req/s of 2,000-token prompts: over 6 s, 48 arrivals; 3 σ of the
    // work (cv 1) is ≈ 29,400 tokens, ≈ 4,900 tok/s above the 16,000.
    let with_rate = |panic: f64| {
        let mut stable = window(60, 16_000.0, Some(5000.0), Some(300));
        stable.rps = 8.0;
        let burst = window(6, panic, Some(5000.0), Some(300));
        snap(stable, burst)
    };
    // Within 3 σ: the decision is the stable window's alone, as if the
    // panic window had seen exactly the stable rate.
    let mut s = Slo::new(&p);
    let calm = decide(&mut s, &p, 4, 4, &with_rate(16_000.0));
    let mut s = Slo::new(&p);
    let d = decide(&mut s, &p, 4, 4, &with_rate(20_000.0));
    assert_eq!(d.desired, calm.desired, "{}", d.reason);
    assert!(calm.desired < Some(9), "{}", calm.reason);
    let mut s = Slo::new(&p);
    let d = decide(&mut s, &p, 4, 4, &with_rate(42_000.0));
    // A burst: 42,000 × 6/7 over 60 % of 5,000 = 12.
    assert_eq!(d.desired, Some(12), "{}", d.reason);
}

#[test]
fn headroom_shrinks_as_the_pool_grows() {
    // 2,000-token prompts at 5,000 tok/s per replica, 1 s TTFT: the
    // queueing model keeps waits past 0.6 s rare. One replica's worth of
    // work needs about two of them; forty replicas' worth, far fewer than
    // twice forty — and never more busy than the utilization allows.
    let p = Policy {
        target_utilization: 0.9,
        max_replicas: Some(200),
        ..policy()
    };
    let desired = |replicas_of_work: f64| {
        let demand = 5000.0 * replicas_of_work * 61.0 / 60.0;
        let mut w = window(60, demand, Some(5000.0), Some(300));
        w.rps = demand / 2000.0;
        let mut s = Slo::new(&p);
        let d = decide(&mut s, &p, 1, 1, &snap(w, w));
        assert!(d.reason.contains("keep waits over 600ms"), "{}", d.reason);
        f64::from(d.desired.unwrap_or(0))
    };
    let small = 1.0 / desired(1.0);
    let large = 40.0 / desired(40.0);
    assert!(small <= 0.5, "one replica of work at {small:.2} busy");
    assert!((0.8..=0.9).contains(&large), "forty at {large:.2} busy");
    // The ceiling binds when the tail alone would run hotter.
    let p = Policy {
        target_utilization: 0.5,
        ..p
    };
    let demand = 5000.0 * 40.0 * 61.0 / 60.0;
    let mut w = window(60, demand, Some(5000.0), Some(300));
    w.rps = demand / 2000.0;
    let d = decide(&mut Slo::new(&p), &p, 1, 1, &snap(w, w));
    assert_eq!(d.desired, Some(80), "{}", d.reason);
}

/// A window where prompts are few and short but sequences stay long: the
/// prefill rate asks for one replica, the tokens held for more.
fn kv_bound(tokens_stable: f64, tokens_panic: f64) -> WindowSnapshot {
    let mut stable = window(60, 500.0, Some(5000.0), Some(300));
    stable.rps = 1.0;
    stable.tokens = tokens_stable;
    let mut panic = window(6, 500.0, Some(5000.0), Some(300));
    panic.rps = 1.0;
    panic.tokens = tokens_panic;
    snap(stable, panic)
}

fn decide_kv(
    s: &mut Slo,
    p: &Policy,
    ready: u32,
    snap: &WindowSnapshot,
    kv: Option<u64>,
) -> Decision {
    decide_with_kv(s, p, Duration::ZERO, (ready, ready), snap, kv)
}

#[test]
fn tokens_in_flight_are_planned_within_the_kv_cache() {
    let p = policy();
    // 100,000 tokens held against a 40,000-token cache at 80 %: 3.125.
    let snap = kv_bound(100_000.0, 100_000.0);
    let d = decide_kv(&mut Slo::new(&p), &p, 1, &snap, Some(40_000));
    assert_eq!(d.desired, Some(4), "{}", d.reason);
    assert!(
        d.reason
            .contains("KV 40000 tokens per replica, 100000 in flight need 3.1 (at 80 %)"),
        "{}",
        d.reason
    );
    // Without a reported cache the prompt rate alone sizes the pool.
    let d = decide_kv(&mut Slo::new(&p), &p, 1, &snap, None);
    assert_eq!(d.desired, Some(1), "{}", d.reason);
    assert!(!d.reason.contains("KV"), "{}", d.reason);
    // A large cache holds the same tokens on one replica.
    let d = decide_kv(&mut Slo::new(&p), &p, 1, &snap, Some(400_000));
    assert_eq!(d.desired, Some(1), "{}", d.reason);
}

#[test]
fn the_kv_term_reads_the_peak_of_the_two_windows() {
    let p = policy();
    // The stable window averages a burst of sequences away; the panic
    // window holds 70,000 tokens now, which 32,000 tokens of cache per
    // replica (80 %) hold on three replicas, not two.
    let snap = kv_bound(30_000.0, 70_000.0);
    let d = decide_kv(&mut Slo::new(&p), &p, 1, &snap, Some(32_000));
    assert_eq!(d.desired, Some(3), "{}", d.reason);
    let snap = kv_bound(70_000.0, 30_000.0);
    let d = decide_kv(&mut Slo::new(&p), &p, 1, &snap, Some(32_000));
    assert_eq!(d.desired, Some(3), "{}", d.reason);
}

#[test]
fn a_decode_pool_without_a_target_plans_on_the_kv_cache() {
    // 130,000 tokens held, engines of 100,000 tokens of KV: the panic
    // window's tokens planned at 85 % of it, two replicas — not 39 on the
    // default prior of 4,000 tokens a replica.
    let decide = |p: &Policy, kv: Option<u64>| decide_decode(p, 130_000.0, kv);
    let defaulted = Policy {
        target: 4000.0,
        target_given: false,
        ..policy()
    };
    let d = decide(&defaulted, Some(100_000));
    assert_eq!(d.desired, Some(2), "{}", d.reason);
    assert!(
        d.reason.contains("capacity 100000 KV cache"),
        "{}",
        d.reason
    );
    // Nothing reported: the prior.
    let d = decide(&defaulted, None);
    assert_eq!(d.desired, Some(39), "{}", d.reason);
    // A target the user set wins over the cache (the KV floor stays).
    let given = Policy {
        target: 10_000.0,
        target_given: true,
        ..policy()
    };
    let d = decide(&given, Some(100_000));
    assert_eq!(d.desired, Some(16), "{}", d.reason);
}

#[test]
fn the_count_asked_for_follows_its_rules_in_order() {
    // (held, KV floor, spec, target missed) → (count, note)
    let cases = [
        // Within the tolerance of a whole count, and just past it.
        ((3.10, 0.0, 3, false), (3, TOLERATED)),
        ((3.20, 0.0, 3, false), (4, "")),
        // The KV floor is whole: no tolerance under it.
        ((3.10, 3.125, 3, false), (4, "")),
        // A positive need never rounds to zero; none asks for none.
        ((0.1, 0.0, 0, false), (1, "")),
        ((0.0, 0.0, 2, false), (0, "")),
        // Missing the target now: never fewer than run.
        ((2.0, 0.0, 5, true), (5, "; target missed: no scale-down")),
        // Down only when the need fits one fewer with a tenth to spare.
        (
            (4.6, 0.0, 6, false),
            (
                6,
                "; consolidation: the need does not fit one replica fewer",
            ),
        ),
        ((4.4, 0.0, 6, false), (5, "")),
        // And never below the need over the margin (4.05 / 0.9 > 4).
        ((4.05, 0.0, 6, false), (5, "")),
    ];
    for ((held, kv, spec, over), want) in cases {
        assert_eq!(
            replicas_for(held, kv, spec, over),
            want,
            "held {held}, kv {kv}, spec {spec}, missed {over}"
        );
    }
}

#[test]
fn a_successor_that_recalls_the_memory_decides_as_its_predecessor_would() {
    let p = policy();
    // An hour and more of 6,000 tok/s served at 99.5 % on replicas
    // measured at 5,000, with 10 s bursts of 30,000 every 3 minutes: the
    // correction has climbed above 1, the bursts' count is held between
    // them, the capacity is measured.
    let quiet = counted(1000, 995);
    let burst = window(6, 30_000.0, Some(5000.0), Some(300));
    let input = |t: u64| {
        let panic = if t % 180 < 10 { burst } else { quiet };
        snap(quiet, panic)
    };
    // Each decision is applied at once: the next sees it running.
    let step = |s: &mut Slo, clock: u64, t: u64, running: &mut u32| {
        let d = decide_at(
            s,
            &p,
            Duration::from_secs(clock),
            *running,
            *running,
            &input(t),
        );
        *running = d.desired.unwrap_or(*running);
        d
    };
    let mut old = Slo::new(&p);
    let mut running = 1;
    for t in (0..=3790).step_by(2) {
        step(&mut old, t, t, &mut running);
    }
    assert!(old.correction() > 1.05, "{}", old.correction());
    // The memory as stored: JSON text, small.
    let text = serde_json::to_string(&old.remember(Duration::from_secs(3790)).unwrap()).unwrap();
    assert!(text.len() < 8 * 1024, "{} bytes", text.len());
    let memory: serde_json::Value = serde_json::from_str(&text).unwrap();
    // A successor in a process whose clock started 5 s ago takes it over
    // at once (no time lost between the save and the recall); a fresh
    // one starts from nothing.
    let mut new = Slo::new(&p);
    new.recall(&memory, Duration::from_secs(5), Duration::ZERO)
        .unwrap();
    // (JSON keeps floats to within a unit in the last place.)
    assert!((new.capacity() - old.capacity()).abs() < 1e-9);
    assert!((new.correction() - old.correction()).abs() < 1e-12);
    let mut fresh = Slo::new(&p);
    let (mut a, mut b, mut c) = (running, running, running);
    let mut fresh_differed = false;
    for t in (3792..=5000).step_by(2) {
        let clock = t - 3790 + 5;
        let d_old = step(&mut old, t, t, &mut a);
        let d_new = step(&mut new, clock, t, &mut b);
        let d_fresh = step(&mut fresh, clock, t, &mut c);
        assert_eq!(
            d_new.desired, d_old.desired,
            "t {t}: recalled {} / predecessor {}",
            d_new.reason, d_old.reason
        );
        fresh_differed |= d_fresh.desired != d_old.desired;
    }
    assert!((new.correction() - old.correction()).abs() < 1e-9);
    assert!(
        fresh_differed,
        "a fresh start decided the same: the test shows nothing"
    );
}

#[test]
fn a_memory_that_is_not_sound_is_refused_whole() {
    let p = policy();
    let mut old = Slo::new(&p);
    let w = window(60, 6000.0, Some(5000.0), Some(300));
    for t in (0..120).step_by(2) {
        decide_at(&mut old, &p, Duration::from_secs(t), 2, 2, &snap(w, w));
    }
    let good = old.remember(Duration::from_secs(120)).unwrap();
    let mut bad = good.clone();
    bad["correction"]["value"] = serde_json::json!(7.0);
    let mut s = Slo::new(&p);
    let e = s.recall(&bad, Duration::ZERO, Duration::ZERO).unwrap_err();
    assert!(
        e.to_string().contains("correction 7 is outside [0.5, 1.3]"),
        "{e}"
    );
    assert_eq!(s.capacity(), 4000.0, "nothing of it was taken");
    let mut bad = good.clone();
    bad["hold"]["needs"] = serde_json::json!([[-3.0, 2.0]]);
    let e = s.recall(&bad, Duration::ZERO, Duration::ZERO).unwrap_err();
    assert!(e.to_string().contains("need age -3 is not an age"), "{e}");
    let e = s
        .recall(
            &serde_json::json!({"kpa": true}),
            Duration::ZERO,
            Duration::ZERO,
        )
        .unwrap_err();
    assert!(
        e.to_string().starts_with("not this algorithm's memory"),
        "{e}"
    );
    s.recall(&good, Duration::ZERO, Duration::ZERO).unwrap();
    assert_eq!(s.capacity(), 5000.0);
}

#[test]
fn a_memory_stays_small_however_the_need_wanders() {
    // Half an hour of a need that crosses a whole count at every other
    // decision: the memory keeps the highest of each 10 s, not 900 points.
    let p = policy();
    let mut s = Slo::new(&p);
    for t in (0..1800u64).step_by(2) {
        let demand = if (t / 2) % 2 == 0 { 7_600.0 } else { 8_400.0 };
        let w = window(60, demand, Some(4000.0), Some(300));
        decide_at(&mut s, &p, Duration::from_secs(t), 2, 2, &snap(w, w));
    }
    let crossings = s
        .hold
        .needs
        .iter()
        .zip(s.hold.needs.iter().skip(1))
        .filter(|((_, a), (_, b))| a.ceil() != b.ceil())
        .count();
    assert!(
        crossings > 400,
        "the need crossed a count {crossings} times"
    );
    let m = s.remember(Duration::from_secs(1800)).unwrap();
    let needs = m["hold"]["needs"].as_array().unwrap().len();
    assert!((150..=200).contains(&needs), "{needs} needs kept");
    let bytes = serde_json::to_string(&m).unwrap().len();
    assert!(bytes < 8 * 1024, "{bytes} bytes");
}
