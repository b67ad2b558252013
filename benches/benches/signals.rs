//! The hot path of the signals: recording one event (target ≤ 25 ns) and
//! taking a window snapshot (every tick, per pool).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use scalecar_scaler::clock::MonotonicClock;
use scalecar_scaler::signals::{PoolSignals, SignalsConfig};

fn signals(c: &mut Criterion) {
    let p = PoolSignals::new(SignalsConfig::default(), Arc::new(MonotonicClock::new()));
    let mut g = c.benchmark_group("signals");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("arrival", |b| b.iter(|| p.arrival(black_box(512))));
    g.bench_function("inter_token", |b| {
        b.iter(|| p.inter_token(black_box(Duration::from_micros(6_200))))
    });
    g.bench_function("decode_tokens", |b| {
        b.iter(|| p.decode_tokens(black_box(1)))
    });
    // The proxy reads the clock once per token for the ITL and hands the
    // reading over: the recording itself.
    let now = p.now();
    g.bench_function("token_at", |b| {
        b.iter(|| {
            p.decode_tokens_at(black_box(now), 1);
            p.inter_token_at(black_box(now), Duration::from_micros(6_200));
        })
    });
    g.bench_function("clock_read", |b| b.iter(|| black_box(p.now())));
    g.bench_function("dispatch_complete_pair", |b| {
        b.iter(|| {
            p.dispatch(black_box(512));
            p.complete(black_box(512), 0, false, None);
        })
    });
    // A full window of data, then the snapshot the control loop takes.
    for _ in 0..10_000 {
        p.inter_token(Duration::from_millis(7));
        p.first_token(0, Duration::from_millis(300));
    }
    g.bench_function("snapshot_60s_6s", |b| {
        b.iter(|| black_box(p.snapshot(Duration::from_secs(60), Duration::from_secs(6))))
    });
    g.finish();
}

criterion_group!(benches, signals);
criterion_main!(benches);
