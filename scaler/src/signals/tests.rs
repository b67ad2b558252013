use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::clock::ManualClock;

fn pool(retention_s: u64) -> (Arc<ManualClock>, PoolSignals) {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(1000)));
    let config = SignalsConfig {
        bucket: Duration::from_secs(1),
        retention: Duration::from_secs(retention_s),
    };
    let signals = PoolSignals::new(config, clock.clone());
    (clock, signals)
}

const S: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

/// An idle pool holds no histogram counters; one that serves holds them
/// for the slots and kinds it recorded, and a window's quantiles read the
/// same with unwritten slots in it.
#[test]
fn histograms_exist_only_where_samples_were_recorded() {
    let (clock, p) = pool(60);
    assert_eq!(p.allocated_histograms(), 0);
    p.arrival(100);
    p.dispatch(100);
    clock.advance(S(10));
    let _ = p.snapshot(S(60), S(6));
    assert_eq!(p.allocated_histograms(), 0, "counters and gauges only");
    p.first_token(100, MS(250));
    assert_eq!(p.allocated_histograms(), 1);
    clock.advance(S(20));
    p.first_token(100, MS(750));
    p.inter_token(MS(20));
    assert_eq!(p.allocated_histograms(), 3);
    clock.advance(S(1));
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.ttft.count, 2);
    let p90 = s.stable.ttft.p90.unwrap();
    assert!((p90.as_secs_f64() - 0.75).abs() < 0.01, "{p90:?}");
}

/// A decision's snapshot computes only the latencies asked for; what it
/// computes equals the full snapshot's.
#[test]
fn a_snapshot_of_some_latencies_leaves_the_others_empty() {
    let (clock, p) = pool(60);
    for i in 0..50u64 {
        p.first_token(100, MS(100 + i * 10));
        p.inter_token(MS(20 + i));
        p.complete(100, 10, true, Some(S(2)));
        clock.advance(MS(500));
    }
    let all = p.snapshot(S(60), S(6));
    let ttft = p.snapshot_of(S(60), S(6), Latencies::TTFT);
    assert_eq!(ttft.stable.ttft, all.stable.ttft);
    assert_eq!(ttft.panic.ttft, all.panic.ttft);
    assert!(all.stable.itl.count > 0 && all.stable.e2e.count > 0);
    assert_eq!(ttft.stable.itl, LatencySummary::default());
    assert_eq!(ttft.stable.e2e, LatencySummary::default());
    // Everything else is the same window.
    let mut same = ttft;
    same.stable.itl = all.stable.itl;
    same.stable.e2e = all.stable.e2e;
    same.stable.queue_wait = all.stable.queue_wait;
    same.panic.itl = all.panic.itl;
    same.panic.e2e = all.panic.e2e;
    same.panic.queue_wait = all.panic.queue_wait;
    assert_eq!(same, all);
    let none = p.snapshot_of(S(60), S(6), Latencies::NONE);
    assert_eq!(none.stable.ttft, LatencySummary::default());
    assert_eq!(none.stable.concurrency, all.stable.concurrency);
}

#[test]
fn constant_concurrency_averages_exactly() {
    let (clock, p) = pool(60);
    for _ in 0..3 {
        p.dispatch(0);
    }
    clock.advance(S(60));
    let s = p.snapshot(S(60), S(6));
    assert!(
        (s.stable.concurrency - 3.0).abs() < 1e-9,
        "{}",
        s.stable.concurrency
    );
    assert!(
        (s.panic.concurrency - 3.0).abs() < 1e-9,
        "{}",
        s.panic.concurrency
    );
    assert_eq!(s.in_flight_now, 3);
}

#[test]
fn half_a_window_in_flight_is_half() {
    let (clock, p) = pool(60);
    clock.advance(S(30));
    p.dispatch(100);
    clock.advance(MS(29_500));
    p.complete(100, 0, false, None);
    clock.advance(MS(500));
    // On a slot boundary the 60 s window is 60 whole slots; the request was
    // in flight for 29.5 s of them.
    let s = p.snapshot(S(60), S(6));
    assert!(
        (s.stable.concurrency - 29.5 / 60.0).abs() < 1e-9,
        "{}",
        s.stable.concurrency
    );
    assert!(
        (s.stable.tokens - 100.0 * 29.5 / 60.0).abs() < 1e-6,
        "{}",
        s.stable.tokens
    );
    // Panic window: 6 whole slots, the request in flight for 5.5 s of them.
    assert!(
        (s.panic.concurrency - 5.5 / 6.0).abs() < 1e-9,
        "{}",
        s.panic.concurrency
    );
    assert_eq!(s.stable.completions, 1);
}

#[test]
fn gauges_inside_a_partial_slot_are_exact() {
    let (clock, p) = pool(10);
    clock.advance(S(10));
    // 0.25 s into a slot, a request starts; 0.25 s later we look.
    clock.advance(MS(250));
    p.dispatch(0);
    clock.advance(MS(250));
    let s = p.snapshot(S(2), S(1));
    // Panic window = the current partial slot (0.5 s): in flight half of it.
    assert!(
        (s.panic.concurrency - 0.5).abs() < 1e-9,
        "{}",
        s.panic.concurrency
    );
    assert_eq!(s.panic.observed, MS(500));
    // Stable: one whole slot (idle) + the partial one: 0.25 / 1.5.
    assert!(
        (s.stable.concurrency - 0.25 / 1.5).abs() < 1e-9,
        "{}",
        s.stable.concurrency
    );
}

#[test]
fn data_older_than_the_window_counts_as_zero() {
    let (clock, p) = pool(60);
    for _ in 0..50 {
        p.arrival(10);
    }
    p.dispatch(0);
    p.complete(0, 0, false, None);
    clock.advance(S(61));
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.arrivals, 0);
    assert_eq!(s.stable.rps, 0.0);
    assert_eq!(s.stable.concurrency, 0.0);
    // Idle is data, not missing data.
    assert!(s.stable.has_data());
    assert_eq!(s.last_activity, Some(S(1000)));
}

#[test]
fn a_fresh_pool_has_no_data_then_idle_data() {
    let (clock, p) = pool(60);
    let s = p.snapshot(S(60), S(6));
    assert!(!s.stable.has_data());
    // Never busy: idle since the signals began watching, not forever.
    assert_eq!(s.last_activity, Some(S(1000)));
    clock.advance(S(3));
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.observed, S(3));
    assert_eq!(s.stable.concurrency, 0.0);
    assert_eq!(s.last_activity, Some(S(1000)));
}

#[test]
fn a_panic_window_shorter_than_a_slot_is_one_slot() {
    let (clock, p) = pool(60);
    clock.advance(S(10));
    p.dispatch(0);
    clock.advance(S(1));
    // 10 % of 6 s: 0.6 s, measured as the last whole slot.
    let s = p.snapshot(S(6), MS(600));
    assert_eq!(s.panic.duration, S(1));
    assert_eq!(s.panic.observed, S(1));
    assert!(
        (s.panic.concurrency - 1.0).abs() < 1e-9,
        "{}",
        s.panic.concurrency
    );
    p.complete(0, 0, false, None);
}

#[test]
fn rates_just_after_start_divide_by_at_least_a_slot() {
    let (clock, p) = pool(60);
    clock.advance(MS(10));
    for _ in 0..3 {
        p.arrival(100);
    }
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.observed, MS(10));
    // Three arrivals in the first 10 ms are 3 per second, not 300.
    assert!((s.stable.rps - 3.0).abs() < 1e-9, "{}", s.stable.rps);
    assert!((s.panic.rps - 3.0).abs() < 1e-9, "{}", s.panic.rps);
    assert!((s.stable.prompt_tokens_per_sec - 300.0).abs() < 1e-9);
}

#[test]
fn rates_and_tokens() {
    let (clock, p) = pool(60);
    clock.advance(S(60));
    for i in 0..120 {
        p.arrival(1000);
        if i % 2 == 0 {
            p.decode_tokens(3);
        }
        clock.advance(MS(500));
    }
    let s = p.snapshot(S(60), S(6));
    // 60 whole slots: all 120 arrivals fall inside.
    assert!((s.stable.rps - 2.0).abs() < 1e-9, "{}", s.stable.rps);
    assert!((s.stable.prompt_tokens_per_sec - 2000.0).abs() < 1e-6);
    assert!((s.stable.decode_tokens_per_sec - 3.0).abs() < 1e-6);
    assert!((s.panic.rps - 2.0).abs() < 1e-9, "{}", s.panic.rps);
}

#[test]
fn a_refused_arrival_leaves_its_window() {
    let (clock, p) = pool(60);
    clock.advance(S(10));
    for _ in 0..10 {
        p.arrival(500);
        clock.advance(S(1));
    }
    // A 120k-token prompt the model server refused at once.
    let at = p.now();
    p.arrival_at(at, 120_000);
    let burst = p.snapshot(S(60), S(6));
    assert!(burst.panic.prompt_tokens_per_sec > 20_000.0);
    clock.advance(MS(300));
    p.retract_arrival(at, 120_000);
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.arrivals, 10);
    let tokens = |v: &WindowValues| v.prompt_tokens_per_sec * v.observed.as_secs_f64();
    assert!(
        (tokens(&s.stable) - 5_000.0).abs() < 1e-6,
        "{}",
        tokens(&s.stable)
    );
    // Retracting more than its slot counted never wraps around, nor
    // reaches into other slots.
    p.retract_arrival(at, u64::MAX);
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.arrivals, 10);
    assert!(
        (tokens(&s.stable) - 5_000.0).abs() < 1e-6,
        "{}",
        tokens(&s.stable)
    );
    // An arrival whose slot was reused for a later bucket is not reached:
    // the newer data stays.
    let old = p.now();
    p.arrival_at(old, 100);
    // The ring's length in slots later, the same slot holds a newer bucket.
    clock.advance(S(p.counters.len() as u64));
    p.arrival(700);
    let before = p.snapshot(S(60), S(6));
    assert_eq!(before.stable.arrivals, 1);
    p.retract_arrival(old, 100);
    assert_eq!(p.snapshot(S(60), S(6)), before);
}

#[test]
fn queue_and_token_gauges() {
    let (clock, p) = pool(10);
    clock.advance(S(10));
    p.arrival(400);
    p.queue_enter();
    clock.advance(S(1));
    p.queue_leave(S(1));
    p.dispatch(400);
    clock.advance(S(1));
    p.first_token(400, MS(800));
    p.decode_tokens(10);
    clock.advance(S(1));
    assert_eq!(p.tokens_in_flight(), 410);
    p.complete(400, 10, true, Some(S(2)));
    clock.advance(S(1));
    let s = p.snapshot(S(5), S(5));
    // Over 5 whole slots: queue 1 s, prefill 400 for 1 s, decode 410 for 1 s.
    assert!(
        (s.stable.queue - 1.0 / 5.0).abs() < 1e-9,
        "{}",
        s.stable.queue
    );
    assert!(
        (s.stable.tokens - 810.0 / 5.0).abs() < 1e-9,
        "{}",
        s.stable.tokens
    );
    assert_eq!(p.in_flight() + p.queued() + p.tokens_in_flight(), 0);
    assert_eq!(s.stable.ttft.count, 1);
    let p90 = s.stable.ttft.p90.unwrap().as_secs_f64();
    assert!((p90 - 0.8).abs() < 0.008, "{p90}");
    assert_eq!(s.stable.queue_wait.count, 1);
    assert_eq!(s.stable.e2e.count, 1);
}

#[test]
fn latency_quantiles_are_within_one_percent() {
    let (clock, p) = pool(60);
    clock.advance(S(5));
    for ms in 1..=1000 {
        p.inter_token(MS(ms));
    }
    let s = p.snapshot(S(60), S(6));
    let q = |d: Option<Duration>| d.unwrap().as_secs_f64() * 1000.0;
    assert_eq!(s.stable.itl.count, 1000);
    assert!((q(s.stable.itl.p50) - 500.0).abs() / 500.0 < 0.01);
    assert!((q(s.stable.itl.p99) - 990.0).abs() / 990.0 < 0.01);
    let hists = p.window_histograms(S(60));
    assert_eq!(hists[1].len(), 1000);
}

#[test]
fn histograms_forget_old_slots() {
    let (clock, p) = pool(60);
    p.first_token(0, S(5));
    clock.advance(S(200));
    p.first_token(0, MS(100));
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.ttft.count, 1);
    assert!(s.stable.ttft.p99.unwrap() < MS(102));
}

#[test]
fn windows_longer_than_retention_are_cut() {
    let (clock, p) = pool(10);
    p.dispatch(0);
    clock.advance(S(100));
    let s = p.snapshot(S(3600), S(6));
    assert_eq!(s.stable.duration, S(10));
    assert!(s.stable.observed <= S(10));
    assert!((s.stable.concurrency - 1.0).abs() < 1e-9);
}

#[test]
fn concurrent_recording_loses_nothing() {
    let clock = Arc::new(ManualClock::new(S(0)));
    let p = Arc::new(PoolSignals::new(SignalsConfig::default(), clock.clone()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            let clock = clock.clone();
            std::thread::spawn(move || {
                for i in 0..10_000u64 {
                    p.arrival(1);
                    p.dispatch(2);
                    p.inter_token(MS(5));
                    p.complete(2, 0, false, None);
                    if i % 1000 == 0 {
                        clock.advance(MS(100));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(p.in_flight(), 0);
    assert_eq!(p.tokens_in_flight(), 0);
    let s = p.snapshot(S(60), S(6));
    assert_eq!(s.stable.arrivals, 40_000);
    assert_eq!(s.stable.completions, 40_000);
    assert_eq!(s.stable.itl.count, 40_000);
}

#[derive(Debug, Clone)]
enum Event {
    Arrive,
    Start,
    Finish,
    Wait(u64),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::Arrive),
        Just(Event::Start),
        Just(Event::Finish),
        (1u64..5_000).prop_map(Event::Wait)
    ]
}

proptest! {
    /// A window never counts data older than itself: the snapshot equals a
    /// brute-force reference computed from the events inside the window.
    #[test]
    fn window_matches_a_reference(events in prop::collection::vec(event(), 1..200), window_s in 2u64..20) {
        let (clock, p) = pool(30);
        let origin = clock.now();
        let mut t_ms = 0u64;
        let mut level = 0i64;
        let mut changes: Vec<(u64, i64)> = Vec::new(); // (ms, new level)
        let mut arrivals: Vec<u64> = Vec::new();
        for e in events {
            match e {
                Event::Arrive => { p.arrival(1); arrivals.push(t_ms); }
                Event::Start => { p.dispatch(0); level += 1; changes.push((t_ms, level)); }
                Event::Finish if level > 0 => { p.complete(0, 0, false, None); level -= 1; changes.push((t_ms, level)); }
                Event::Finish => {}
                Event::Wait(ms) => { clock.advance(MS(ms)); t_ms += ms; }
            }
        }
        let s = p.snapshot(S(window_s), S(1));
        // The covered span: whole seconds before the current one, plus the
        // current partial second; never before the start.
        let now_ms = t_ms + 1000 * 1000; // the clock starts at 1000 s
        let partial = now_ms % 1000;
        let whole = (window_s * 1000 - partial) / 1000;
        let from = (now_ms - partial).saturating_sub(whole * 1000).max(1000 * 1000) - 1000 * 1000;
        let to = t_ms;
        prop_assert_eq!(s.stable.observed, MS(to - from));
        let expect_arrivals = arrivals.iter().filter(|&&a| a >= from).count() as u64;
        prop_assert_eq!(s.stable.arrivals, expect_arrivals);
        // Area under the level curve over [from, to).
        let mut area = 0i64;
        let mut cur = 0i64;
        let mut last = 0u64;
        for &(at, l) in &changes {
            let a = last.max(from);
            let b = at.min(to);
            if b > a { area += cur * (b - a) as i64; }
            cur = l;
            last = at;
        }
        let a = last.max(from);
        if to > a { area += cur * (to - a) as i64; }
        if to > from {
            let expect = area as f64 / (to - from) as f64;
            prop_assert!((s.stable.concurrency - expect).abs() < 1e-6, "{} vs {}", s.stable.concurrency, expect);
        }
        let _ = origin;
    }
}
