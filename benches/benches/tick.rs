//! One control-loop tick over many targets (#23: 1,000 targets within
//! 50 ms of CPU per tick): every target's windows snapshotted, decided and
//! reported, half `slo` and half `kpa`, each pool with a minute of traffic
//! (requests, first tokens, tokens, latencies in every histogram slot).
//! Advisory targets, so the tick's cost is the loop's own, not an API
//! server's. Also: the memory a leader saves every 30 s (see
//! `scalecar_scaler::memory`) for the same targets after half an hour of
//! ticks — built, and written as the document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, criterion_group, criterion_main};
use scalecar_config::{Policy, Role};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::clock::ManualClock;
use scalecar_scaler::control::{
    ControlLoop, DecisionObserver, Scaling, TargetSpec, TargetStatus, WallClock,
};
use scalecar_scaler::signals::{PoolSignals, SignalsConfig};
use scalecar_scaler::target::TargetError;

#[derive(Debug)]
struct Quiet;

impl DecisionObserver for Quiet {
    fn decided(&self, s: &TargetStatus) {
        std::hint::black_box(s);
    }
    fn scale_failed(&self, _: &str, _: &TargetError) {}
}

#[derive(Debug)]
struct Wall;

impl WallClock for Wall {
    fn unix_secs(&self) -> u64 {
        1_700_000_000
    }
}

fn loop_of(n: usize) -> (ControlLoop, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(1_000)));
    let specs: Vec<TargetSpec> = (0..n)
        .map(|i| {
            let policy = Policy {
                algorithm: if i % 2 == 0 { "slo" } else { "kpa" }.into(),
                ttft_target: Some(Duration::from_secs(2)),
                ..Policy::default()
            };
            let signals = Arc::new(PoolSignals::new(
                SignalsConfig::for_window(policy.window),
                clock.clone(),
            ));
            TargetSpec {
                name: format!("deployment/llm/model-{i}"),
                model: format!("model-{i}"),
                role: Role::Unified,
                policy,
                signals,
                scaling: Scaling::Advisory {
                    ready: Arc::new(AtomicU32::new(2)),
                },
            }
        })
        .collect();
    let pools: Vec<Arc<PoolSignals>> = specs.iter().map(|s| s.signals.clone()).collect();
    // A minute of traffic: two requests a second per pool.
    for _ in 0..60 {
        for p in &pools {
            for _ in 0..2 {
                p.arrival(800);
                p.dispatch(800);
                p.first_token(800, Duration::from_millis(300));
                p.decode_tokens(100);
                p.inter_token(Duration::from_millis(20));
                p.complete(800, 100, true, Some(Duration::from_secs(2)));
            }
        }
        clock.advance(Duration::from_secs(1));
    }
    let l = ControlLoop::new(
        specs,
        &AlgorithmRegistry::with_builtins(),
        clock.clone(),
        Arc::new(Wall),
        Arc::new(Quiet),
        Duration::from_secs(2),
    )
    .unwrap();
    (l, clock)
}

/// A current-thread runtime and benchmark group `name` of `samples`
/// samples over 5 s.
fn runtime_and_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    samples: usize,
) -> (tokio::runtime::Runtime, BenchmarkGroup<'a, WallTime>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group(name);
    g.sample_size(samples);
    g.measurement_time(Duration::from_secs(5));
    (rt, g)
}

fn tick(c: &mut Criterion) {
    let (rt, mut g) = runtime_and_group(c, "tick", 20);
    for n in [100, 1_000] {
        let (mut l, _) = loop_of(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| rt.block_on(l.tick_once()))
        });
    }
    g.finish();
}

fn memory(c: &mut Criterion) {
    let (rt, mut g) = runtime_and_group(c, "memory", 10);
    for n in [100, 1_000] {
        let (mut l, clock) = loop_of(n);
        // Half an hour of 2 s ticks: every slo target's needs are full.
        for _ in 0..900 {
            rt.block_on(l.tick_once());
            clock.advance(Duration::from_secs(2));
        }
        let (text, left_out) = l.memories().to_json_fitting("bench").unwrap();
        eprintln!(
            "memory of {n} targets ({} slo): {} bytes, {} left out",
            n / 2,
            text.len(),
            left_out.len()
        );
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| l.memories().to_json_fitting("bench").unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, tick, memory);
criterion_main!(benches);
