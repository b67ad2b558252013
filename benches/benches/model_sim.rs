//! CPU cost of model-sim per emitted token event: one replica with a zero
//! cost model (steps back to back, so the run is CPU-bound), 64 concurrent
//! streams of 256 tokens each, read by a raw HTTP client. The time per
//! element is the cost of one token event end to end (engine step share,
//! SSE framing, hyper, the client's read), an upper bound for the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use scalecar_loadtest::sim::{ModelSim, SimConfig, Timing};

const STREAMS: usize = 64;
const TOKENS: u32 = 256;

fn token_events(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let timing = Timing {
        prefill_tokens_per_sec: 1e12,
        decode_base: Duration::ZERO,
        decode_per_seq: Duration::ZERO,
        decode_per_1k_kv: Duration::ZERO,
        ..Timing::default()
    };
    let sim = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ModelSim::spawn(
            SimConfig {
                model: "m".into(),
                timing,
                ..SimConfig::default()
            },
            listener,
        )
    });
    let url = format!("http://{}/v1/completions", sim.local_addr());
    let body = Bytes::from(format!(
        r#"{{"model":"m","prompt":"hello","stream":true,"max_tokens":{TOKENS}}}"#
    ));
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut group = c.benchmark_group("model_sim");
    group.throughput(Throughput::Elements(STREAMS as u64 * u64::from(TOKENS)));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("token_event", |b| {
        b.to_async(&rt).iter(|| async {
            let mut tasks = Vec::with_capacity(STREAMS);
            for _ in 0..STREAMS {
                let client = client.clone();
                let req = hyper::Request::post(url.as_str())
                    .body(Full::new(body.clone()))
                    .unwrap();
                tasks.push(tokio::spawn(async move {
                    let mut body = client.request(req).await.unwrap().into_body();
                    let mut bytes = 0usize;
                    while let Some(frame) = body.frame().await {
                        bytes += frame.unwrap().data_ref().map_or(0, |d| d.len());
                    }
                    bytes
                }));
            }
            for t in tasks {
                assert!(t.await.unwrap() > 0);
            }
        });
    });
    group.finish();
}

criterion_group!(benches, token_events);
criterion_main!(benches);
