use std::collections::BTreeMap;
use std::time::Duration;

use scalecar_config::{Policy, Role};
use scalecar_scaler::algorithm::AlgorithmRegistry;

use super::oracle::{OracleSettings, oracle};
use super::*;

fn policy(keys: &[(&str, &str)]) -> Policy {
    let keys: BTreeMap<String, String> = keys
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match Policy::from_keys(&keys, Role::Unified) {
        Ok(p) => p,
        Err(e) => panic!("test policy: {e}"),
    }
}

/// A GPU whose every request of 1 prompt token and 100 output tokens
/// takes one second: decode steps of exactly 10 ms whatever the batch,
/// prefill free, room for everything.
fn ten_ms_steps() -> Timing {
    Timing {
        prefill_tokens_per_sec: 1e12,
        prefill_chunk: 1 << 20,
        decode_base: Duration::from_millis(10),
        decode_per_seq: Duration::ZERO,
        decode_per_1k_kv: Duration::ZERO,
        max_num_seqs: 100_000,
        kv_capacity: 1 << 40,
        ..Timing::default()
    }
}

/// `rps` requests per second, evenly spaced, for `secs`.
fn constant(rps: u32, secs: u32, prompt_tokens: u32, max_tokens: u32) -> Vec<Arrival> {
    (0..rps * secs)
        .map(|i| Arrival {
            at: Duration::from_secs_f64(f64::from(i) / f64::from(rps)),
            prompt_tokens,
            max_tokens,
        })
        .collect()
}

#[tokio::test]
async fn a_constant_load_gets_the_analytic_replica_count() {
    // 35 req/s × 1 s each (100 tokens at 10 ms) = 35 in flight; a target
    // of 10 per replica at 100 % utilization is ⌈3.5⌉ = 4 replicas, for
    // kpa (stable window) and hpa (ready × current / target) alike.
    let trace = constant(35, 300, 1, 100);
    let mut settings = Settings::new(ten_ms_steps());
    settings.startup_delay = Duration::from_secs(10);
    let registry = AlgorithmRegistry::with_builtins();
    for algorithm in ["kpa", "hpa"] {
        let p = policy(&[
            ("algorithm", algorithm),
            ("target", "10"),
            ("target-utilization-percentage", "100"),
            ("window", "30s"),
            ("hpa-scale-down-stabilization-window", "30s"),
        ]);
        let run = match simulate(&trace, &settings, &p, &registry, |_| {}).await {
            Ok(r) => r,
            Err(e) => panic!("{algorithm}: {e}"),
        };
        let settled: Vec<u32> = run
            .timeline
            .iter()
            .filter(|p| p.t >= 150.0 && p.t < 300.0)
            .map(|p| p.desired)
            .collect();
        assert!(!settled.is_empty());
        assert!(
            settled.iter().all(|&n| n == 4),
            "{algorithm}: replicas over the last half {settled:?}"
        );
        let m = &run.measured;
        assert_eq!(m.requests, trace.len());
        assert_eq!(m.failed, 0);
        assert_eq!(m.ttft_attainment, 1.0, "{algorithm}");
        // Tokens every step: the ITL is the step (the histogram keeps two
        // significant digits).
        assert!(
            (m.itl_p90 - 0.010).abs() < 0.0002,
            "{algorithm}: itl p90 {}",
            m.itl_p90
        );
        assert!(run.scale_events >= 1, "{algorithm}: it scaled from 1");
    }
}

#[tokio::test]
async fn replica_seconds_count_cold_starts_and_stop_at_the_horizon() {
    // One replica throughout, never scaled (min = max = 1): it costs the
    // whole span, and nothing more.
    let trace = constant(2, 120, 1, 100);
    let settings = Settings::new(ten_ms_steps());
    let p = policy(&[("min-replicas", "1"), ("max-replicas", "1")]);
    let registry = AlgorithmRegistry::with_builtins();
    let run = match simulate(&trace, &settings, &p, &registry, |_| {}).await {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let span = horizon(&trace).as_secs_f64();
    assert!((run.measured.replica_seconds - span).abs() < 1e-6);
    assert_eq!(run.scale_events, 0);
    assert_eq!(run.measured.max_replicas_used, 1);
}

/// A deterministic xorshift64 sequence from `seed`: varied prompts and
/// outputs, the same every run.
fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Deterministic bursty load: a base rate with two bursts, prompts and
/// outputs varying request to request.
fn bursty(secs: u32) -> Vec<Arrival> {
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::new();
    let mut t = 0.0f64;
    while t < f64::from(secs) {
        let rate = if (100.0..160.0).contains(&t) || (280.0..310.0).contains(&t) {
            14.0
        } else {
            3.0
        };
        out.push(Arrival {
            at: Duration::from_secs_f64(t),
            prompt_tokens: 200 + (next() % 1800) as u32,
            max_tokens: 20 + (next() % 200) as u32,
        });
        t += 1.0 / rate;
    }
    out
}

#[tokio::test]
async fn the_oracle_is_never_above_an_algorithm_at_the_same_attainment() {
    let trace = bursty(420);
    let mut settings = Settings::new(Timing::h100x2_llama_70b());
    settings.startup_delay = Duration::from_secs(30);
    settings.max_replicas = 16;
    let registry = AlgorithmRegistry::with_builtins();
    let runs = [
        ("kpa", "4", 0),
        ("kpa", "12", 0),
        ("hpa", "6", 0),
        ("slo", "3000", 0),
        // Warm starts (the trace's last two minutes first): attainments
        // near the top, where the oracle's search is hardest.
        ("kpa", "4", 120),
        ("hpa", "4", 120),
        ("slo", "2000", 120),
    ];
    for (algorithm, target, warmup) in runs {
        settings.warmup = Duration::from_secs(warmup);
        let p = policy(&[
            ("algorithm", algorithm),
            ("target", target),
            ("ttft-target", "1s"),
            ("max-replicas", "16"),
            ("window", "30s"),
            ("hpa-scale-down-stabilization-window", "30s"),
        ]);
        let run = match simulate(&trace, &settings, &p, &registry, |_| {}).await {
            Ok(r) => r,
            Err(e) => panic!("{algorithm}: {e}"),
        };
        let m = &run.measured;
        let o = oracle(
            &trace,
            &settings,
            OracleSettings {
                goal: m.ttft_attainment,
                ..OracleSettings::default()
            },
        );
        eprintln!(
            "{algorithm} {target} (warm-up {warmup} s): attainment {:.4} at {:.0} replica-s; oracle {:.4} at {:.0}",
            m.ttft_attainment,
            m.replica_seconds,
            o.measured.ttft_attainment,
            o.measured.replica_seconds
        );
        assert!(
            o.measured.ttft_attainment >= m.ttft_attainment,
            "{algorithm} {target}: oracle attainment {} below the algorithm's {}",
            o.measured.ttft_attainment,
            m.ttft_attainment
        );
        assert!(
            o.measured.replica_seconds <= m.replica_seconds,
            "{algorithm} {target}: oracle {} replica-seconds above the algorithm's {} at attainment {}",
            o.measured.replica_seconds,
            m.replica_seconds,
            m.ttft_attainment
        );
    }
}

/// 2 req/s for ten minutes with 20 s spikes of 16 req/s at 150, 330 and
/// 480 s; prompts and outputs vary as in `bursty`.
fn spikes() -> Vec<Arrival> {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    let mut t = 0.0f64;
    while t < 600.0 {
        let spike = [150.0, 330.0, 480.0]
            .iter()
            .any(|s| (*s..s + 20.0).contains(&t));
        out.push(Arrival {
            at: Duration::from_secs_f64(t),
            prompt_tokens: 200 + (next() % 1800) as u32,
            max_tokens: 20 + (next() % 200) as u32,
        });
        t += if spike { 1.0 / 16.0 } else { 0.5 };
    }
    out
}

#[tokio::test]
async fn the_yardsticks_show_what_foresight_and_scaling_are_worth() {
    // Three 20 s bursts at 8× the base rate, far apart: the oracle has
    // their replicas ready at their first request and holds nothing
    // between them; the same counts asked for when a burst arrives come a
    // cold start (60 s) too late.
    let trace = spikes();
    let mut settings = Settings::new(Timing::h100x2_llama_70b());
    settings.startup_delay = Duration::from_secs(60);
    settings.max_replicas = 16;
    let o = oracle(&trace, &settings, OracleSettings::default());
    let attained = o.measured.ttft_attainment;
    assert!(attained >= 0.99, "oracle attainment {attained}");
    let Some(reactive) = &o.reactive else {
        panic!("no reactive replay")
    };
    eprintln!(
        "oracle {attained:.4} at {:.0} replica-s; reactive {:.4} at {:.0}",
        o.measured.replica_seconds, reactive.ttft_attainment, reactive.replica_seconds
    );
    assert!(
        reactive.ttft_attainment < attained - 0.05,
        "without foresight {} vs {attained}",
        reactive.ttft_attainment
    );
    let Some((n, constant)) = &o.constant else {
        panic!("no constant count meets the goal within 16")
    };
    assert!(
        constant.ttft_attainment >= 0.99,
        "{}",
        constant.ttft_attainment
    );
    assert!(o.measured.replica_seconds <= constant.replica_seconds);
    // n is the smallest such count: one fewer, never scaled, misses.
    assert!(*n > 1, "one replica carries the bursts: a useless trace");
    let fewer = (n - 1).to_string();
    let p = policy(&[
        ("ttft-target", "1s"),
        ("min-replicas", &fewer),
        ("max-replicas", &fewer),
    ]);
    settings.initial_replicas = n - 1;
    let registry = AlgorithmRegistry::with_builtins();
    let run = match simulate(&trace, &settings, &p, &registry, |_| {}).await {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(run.scale_events, 0);
    assert!(
        run.measured.ttft_attainment < 0.99,
        "{} constant replicas attain {}",
        n - 1,
        run.measured.ttft_attainment
    );
}

/// 1 → 8 req/s over fifteen minutes, exponential gaps, heavy-tailed prompts
/// (200 tokens plus 6,000 × the cube of a uniform: most short, a few long)
/// and varied outputs: a load a schedule follows upward in small steps.
fn ramp() -> Vec<Arrival> {
    let mut next = xorshift(0x94d0_49bb_1331_11eb);
    let mut uniform = || (next() % 1_000_000) as f64 / 1_000_000.0;
    let mut out = Vec::new();
    let mut t = 0.0f64;
    while t < 900.0 {
        out.push(Arrival {
            at: Duration::from_secs_f64(t),
            prompt_tokens: 200 + (uniform().powi(3) * 6000.0) as u32,
            max_tokens: 20 + (uniform() * 200.0) as u32,
        });
        let rate = 1.0 + 7.0 * t / 900.0;
        t += -(1.0 - uniform()).ln() / rate;
    }
    out
}

#[test]
fn the_oracle_keeps_the_cheapest_interval_length() {
    // At 10 s the greedy search chases the few long prompts of each ten
    // seconds and ends no cheaper than a constant count; at 60 s it
    // follows the ramp. Searching both and keeping the cheaper is never
    // dearer than either alone. (With light-tailed prompts and the pick
    // by prefill work, the 10 s search was the cheaper one.)
    let trace = ramp();
    let mut settings = Settings::new(Timing::h100x2_llama_70b());
    settings.startup_delay = Duration::from_secs(60);
    settings.max_replicas = 16;
    let alone = |secs: u64| {
        oracle(
            &trace,
            &settings,
            OracleSettings {
                interval: Duration::from_secs(secs),
                interval_multiples: &[1],
                ..OracleSettings::default()
            },
        )
    };
    let (short, long) = (alone(10), alone(60));
    let both = oracle(
        &trace,
        &settings,
        OracleSettings {
            interval: Duration::from_secs(10),
            interval_multiples: &[1, 6],
            ..OracleSettings::default()
        },
    );
    let rs = |o: &super::oracle::Oracle| o.measured.replica_seconds;
    eprintln!(
        "10 s: {:.0} ({} changes), 60 s: {:.0} ({} changes), both: {:.0}",
        rs(&short),
        short.scale_events,
        rs(&long),
        long.scale_events,
        rs(&both)
    );
    assert!(both.measured.feasible_ttft_attainment >= 0.99);
    assert!(rs(&both) <= rs(&short).min(rs(&long)) + 1e-6);
    // On this load the longer interval is the cheaper one: the oracle is
    // not the 10 s search's.
    assert!(rs(&long) < rs(&short), "{} vs {}", rs(&long), rs(&short));
    assert!(rs(&both) < rs(&short));
}

#[tokio::test]
async fn short_prompts_go_to_the_replica_that_only_decodes() {
    // Two replicas. The first prefills a 30k-token prompt and then decodes
    // it for seconds (30k tokens in flight); at 3 s a 16k-token prompt
    // starts its second of prefill on the other (fewer tokens in flight).
    // Short prompts arriving during that second meet a 300 ms target only
    // on the first replica: by tokens in flight alone the pick sent them
    // behind the long prefill whenever both replicas were its candidates.
    let mut trace = vec![
        Arrival {
            at: Duration::ZERO,
            prompt_tokens: 30_000,
            max_tokens: 2_000,
        },
        Arrival {
            at: Duration::from_secs(3),
            prompt_tokens: 16_000,
            max_tokens: 10,
        },
    ];
    trace.extend((0..40).map(|i| Arrival {
        at: Duration::from_millis(3_050 + 20 * i),
        prompt_tokens: 200,
        max_tokens: 10,
    }));
    let mut settings = Settings::new(Timing::default());
    settings.ttft_target = Duration::from_millis(300);
    settings.initial_replicas = 2;
    let p = policy(&[("min-replicas", "2"), ("max-replicas", "2")]);
    let registry = AlgorithmRegistry::with_builtins();
    let run = match simulate(&trace, &settings, &p, &registry, |_| {}).await {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let m = &run.measured;
    // The two long prompts cannot prefill in 300 ms on any replica.
    assert_eq!(m.infeasible, 2);
    assert!(
        m.feasible_ttft_attainment > 0.6,
        "short prompts in time: {}",
        m.feasible_ttft_attainment
    );
}

#[tokio::test]
async fn a_new_leader_keeps_what_it_finds_running_for_the_hold() {
    // A minute of heavy prompts raises the pool; then a trickle for 14
    // minutes. One leader lets the burst's replicas go once its hold is
    // over; handed to a new leader every 40 s, each one keeps what it finds
    // for its hold's floor (here the 60 s window: five 10 s cold starts
    // are less), so none ever lets go.
    let mut trace = constant(20, 60, 2_000, 50);
    trace.extend(constant(1, 840, 200, 50).into_iter().map(|a| Arrival {
        at: a.at + Duration::from_secs(60),
        ..a
    }));
    let mut settings = Settings::new(Timing::default());
    settings.startup_delay = Duration::from_secs(10);
    let p = policy(&[("algorithm", "slo"), ("ttft-target", "1s")]);
    let registry = AlgorithmRegistry::with_builtins();
    let mut ends = Vec::new();
    // Without the memory a leader hands on (`memory-config-map: ""`).
    settings.leader_memory = false;
    for every in [None, Some(Duration::from_secs(40))] {
        settings.new_leader_every = every;
        let run = match simulate(&trace, &settings, &p, &registry, |_| {}).await {
            Ok(r) => r,
            Err(e) => panic!("{every:?}: {e}"),
        };
        let peak = run.timeline.iter().map(|p| p.desired).max().unwrap_or(0);
        let end = run
            .timeline
            .iter()
            .rev()
            .find(|p| p.t < 890.0)
            .map_or(0, |p| p.desired);
        assert!(peak > 1, "{every:?}: the burst raised the pool: {peak}");
        ends.push((peak, end));
    }
    let ((peak, alone), (handed_peak, handed)) = (ends[0], ends[1]);
    assert!(alone < peak, "one leader lets go: {alone} of {peak}");
    assert_eq!(handed, handed_peak, "new leaders every 40 s keep it");
}

#[tokio::test]
async fn a_new_leader_with_its_predecessors_memory_serves_as_one_leader_would() {
    // Bursts of heavy prompts every 3 minutes over a trickle, for 20
    // minutes. One leader holds the bursts' count between them; new
    // leaders every 100 s, each starting from the memory saved up to 30 s
    // before, serve the same share in time at about the same cost.
    // Starting afresh, each keeps what it finds only for its hold's floor
    // (60 s here), lets the count go between bursts, and the next burst
    // finds too few replicas.
    let mut trace = Vec::new();
    for k in 0..5u64 {
        trace.extend(constant(20, 20, 2_000, 50).into_iter().map(|a| Arrival {
            at: a.at + Duration::from_secs(180 * k),
            ..a
        }));
    }
    trace.extend(constant(1, 1200, 200, 50));
    trace.sort_by_key(|a| a.at);
    let mut settings = Settings::new(Timing::default());
    settings.startup_delay = Duration::from_secs(10);
    let p = policy(&[("algorithm", "slo"), ("ttft-target", "1s")]);
    let registry = AlgorithmRegistry::with_builtins();
    let mut runs = Vec::new();
    for (every, memory) in [
        (None, true),
        (Some(Duration::from_secs(100)), true),
        (Some(Duration::from_secs(100)), false),
    ] {
        settings.new_leader_every = every;
        settings.leader_memory = memory;
        match simulate(&trace, &settings, &p, &registry, |_| {}).await {
            Ok(r) => runs.push(r.measured),
            Err(e) => panic!("{every:?}: {e}"),
        }
    }
    let (one, remembered, forgetful) = (&runs[0], &runs[1], &runs[2]);
    let shown = |m: &Measured| {
        format!(
            "{:.1} % at {:.0} replica-s",
            m.feasible_ttft_attainment * 100.0,
            m.replica_seconds
        )
    };
    assert!(
        (remembered.feasible_ttft_attainment - one.feasible_ttft_attainment).abs() < 0.005
            && (remembered.replica_seconds / one.replica_seconds - 1.0).abs() < 0.05,
        "with memory {} against one leader's {}",
        shown(remembered),
        shown(one)
    );
    assert!(
        forgetful.feasible_ttft_attainment < one.feasible_ttft_attainment - 0.1,
        "afresh {} against one leader's {}: the test shows nothing",
        shown(forgetful),
        shown(one)
    );
}
