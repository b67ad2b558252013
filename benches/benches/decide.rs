//! One scaling decision per algorithm (target ≤ 5 µs), as the control loop
//! makes it every tick per target.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use scalecar_config::{Policy, Role};
use scalecar_scaler::algorithm::{AlgorithmRegistry, DecisionInput};
use scalecar_scaler::snapshot::{LatencySummary, WindowSnapshot, WindowValues};

fn snapshot() -> WindowSnapshot {
    let lat = LatencySummary {
        count: 500,
        mean: Some(Duration::from_millis(300)),
        p50: Some(Duration::from_millis(250)),
        p90: Some(Duration::from_millis(450)),
        p99: Some(Duration::from_millis(900)),
    };
    let w = |d| WindowValues {
        duration: d,
        observed: d,
        concurrency: 42.0,
        rps: 12.0,
        queue: 3.0,
        tokens: 80_000.0,
        prompt_tokens_per_sec: 20_000.0,
        decode_tokens_per_sec: 3_000.0,
        prefilled_tokens_per_sec: 19_000.0,
        prefill_busy: 3.5,
        decode_busy: 4.0,
        slo_eligible: 700,
        slo_met: 690,
        arrivals: 720,
        completions: 700,
        ttft: lat,
        itl: lat,
        e2e: lat,
        queue_wait: lat,
    };
    WindowSnapshot {
        at: Duration::from_secs(100),
        stable: w(Duration::from_secs(60)),
        panic: w(Duration::from_secs(6)),
        in_flight_now: 40,
        queued_now: 2,
        last_activity: Some(Duration::from_secs(100)),
    }
}

fn decide(c: &mut Criterion) {
    let registry = AlgorithmRegistry::with_builtins();
    let snap = snapshot();
    let mut g = c.benchmark_group("decide");
    g.measurement_time(Duration::from_secs(3));
    for name in ["kpa", "hpa", "slo"] {
        let policy = Policy {
            algorithm: name.into(),
            target: 10.0,
            ttft_target: Some(Duration::from_millis(500)),
            max_replicas: Some(50),
            ..Policy::default()
        };
        let mut algorithm = registry.create(&policy, 4, Duration::ZERO).unwrap();
        let mut t = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                t += 2;
                let input = DecisionInput {
                    now: Duration::from_secs(t),
                    ready: 4,
                    spec: 4,
                    snapshot: &snap,
                    policy: &policy,
                    role: Role::Unified,
                    reachable: true,
                    partial: false,
                    cold_start: None,
                    kv_capacity: None,
                };
                black_box(algorithm.decide(black_box(&input)))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
