//! The proxy's endpoint pick: the least outstanding work over every
//! endpoint of a pool, two relaxed atomic loads each, as `Pool::take_slot`
//! reads them — at pool sizes from a few replicas to far beyond one pool.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use scalecar_scaler::balance::{least_loaded, splitmix};

/// One endpoint's counts, each on its own cache line as in the proxy
/// (every endpoint is its own allocation).
#[repr(align(64))]
struct Counts {
    prefill_tokens: AtomicU64,
    outstanding_tokens: AtomicU64,
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick/least_loaded");
    for n in [4usize, 16, 64, 256] {
        let endpoints: Vec<Counts> = (0..n as u64)
            .map(|i| Counts {
                prefill_tokens: AtomicU64::new(splitmix(i) % 3 * 1_000),
                outstanding_tokens: AtomicU64::new(splitmix(i ^ 7) % 50_000),
            })
            .collect();
        let mut k = 0u64;
        g.bench_with_input(BenchmarkId::from_parameter(n), &endpoints, |b, eps| {
            b.iter(|| {
                k = k.wrapping_add(1);
                least_loaded(eps.len(), k, |i| {
                    let e = eps.get(i)?;
                    Some((
                        e.prefill_tokens.load(Ordering::Relaxed),
                        e.outstanding_tokens.load(Ordering::Relaxed),
                    ))
                })
            });
            black_box(&k);
        });
    }
    g.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
