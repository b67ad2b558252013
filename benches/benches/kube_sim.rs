//! kube-sim at cluster size: 1,000 Deployments with 10,000 Pods held (no
//! controllers, so no model-sims), then list and watch latency over HTTP.
//! Prints the resident memory the objects take.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use scalecar_loadtest::kube_sim::resources::find;
use scalecar_loadtest::kube_sim::{KubeSim, KubeSimConfig};
use serde_json::json;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * 4096.0 / (1024.0 * 1024.0))
}

fn load(sim: &KubeSim, deployments: usize, pods_each: usize) {
    let deploy = find("apps", "v1", "deployments").unwrap();
    let pod = find("", "v1", "pods").unwrap();
    let store = sim.store();
    for d in 0..deployments {
        let name = format!("model-{d}");
        let created = store
            .create(
                deploy,
                "default",
                json!({"metadata": {"name": name, "labels": {"app": name},
                                    "annotations": {"scalecar.io/model": name, "scalecar.io/max-replicas": "16"}},
                       "spec": {"replicas": pods_each, "selector": {"matchLabels": {"app": name}},
                                "template": {"metadata": {"labels": {"app": name}},
                                             "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.9",
                                                                      "args": ["--model", name, "--port", "8000"]}]}}}}),
            )
            .unwrap();
        let uid = created["metadata"]["uid"].clone();
        for p in 0..pods_each {
            let ip = 2 + d * pods_each + p;
            store
                .create(
                    pod,
                    "default",
                    json!({"metadata": {"name": format!("{name}-{p}"), "labels": {"app": name},
                                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                             "name": name, "uid": uid, "controller": true}]},
                           "spec": {"nodeName": "kube-sim", "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.9",
                                                                          "args": ["--model", name, "--port", "8000"]}]},
                           "status": {"phase": "Running", "podIP": format!("127.{}.{}.{}", ip >> 16 & 255, ip >> 8 & 255, ip & 255),
                                      "conditions": [{"type": "Ready", "status": "True"}],
                                      "containerStatuses": [{"name": "vllm", "ready": true, "restartCount": 0}]}}),
                )
                .unwrap();
        }
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let before = rss_mib();
    let sim = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        KubeSim::start(
            KubeSimConfig {
                history: 10_000,
                controllers: false,
                ..KubeSimConfig::default()
            },
            listener,
        )
        .unwrap()
    });
    let start = Instant::now();
    load(&sim, 1_000, 10);
    eprintln!(
        "kube-sim: 1,000 Deployments + 10,000 Pods created in {:.2} s; RSS {:.1} MiB before, {:.1} MiB after ({} objects)",
        start.elapsed().as_secs_f64(),
        before,
        rss_mib(),
        sim.store().len()
    );
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let base = sim.url();
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{base}{path}");
        async move {
            let resp = client.get(url.parse().unwrap()).await.unwrap();
            assert!(resp.status().is_success());
            resp.into_body().collect().await.unwrap().to_bytes().len()
        }
    };
    let mut g = c.benchmark_group("kube_sim");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("list_10000_pods", |b| {
        b.to_async(&rt)
            .iter(|| get("/api/v1/namespaces/default/pods".into()))
    });
    g.bench_function("list_1000_deployments", |b| {
        b.to_async(&rt)
            .iter(|| get("/apis/apps/v1/namespaces/default/deployments".into()))
    });
    g.bench_function("list_pods_by_label", |b| {
        b.to_async(&rt)
            .iter(|| get("/api/v1/namespaces/default/pods?labelSelector=app%3Dmodel-500".into()))
    });
    g.bench_function("list_pods_page_of_500", |b| {
        b.to_async(&rt)
            .iter(|| get("/api/v1/namespaces/default/pods?limit=500".into()))
    });
    g.bench_function("get_pod", |b| {
        b.to_async(&rt)
            .iter(|| get("/api/v1/namespaces/default/pods/model-500-3".into()))
    });
    // Watch latency: a label patch on one pod until the watcher of all
    // 10,000 pods reads the MODIFIED event.
    // Every patch must change something (a no-op write is no event): one
    // counter across all of criterion's rounds.
    let changes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    g.bench_function("watch_latency_patch_to_event", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let client = client.clone();
            let base = base.clone();
            let changes = changes.clone();
            async move {
                let watcher = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
                let rv = serde_json::from_slice::<serde_json::Value>(
                    &client
                        .get(
                            format!("{base}/api/v1/namespaces/default/pods?limit=1")
                                .parse()
                                .unwrap(),
                        )
                        .await
                        .unwrap()
                        .into_body()
                        .collect()
                        .await
                        .unwrap()
                        .to_bytes(),
                )
                .unwrap()["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let mut stream = watcher
                    .get(
                        format!(
                            "{base}/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}"
                        )
                        .parse()
                        .unwrap(),
                    )
                    .await
                    .unwrap()
                    .into_body();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let i = changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let patch = hyper::Request::patch(format!(
                        "{base}/api/v1/namespaces/default/pods/model-{}-0",
                        i % 1000
                    ))
                    .header("content-type", "application/merge-patch+json")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"metadata":{{"labels":{{"bench":"{i}"}}}}}}"#
                    ))))
                    .unwrap();
                    let t = Instant::now();
                    let resp = client.request(patch).await.unwrap();
                    resp.into_body().collect().await.unwrap();
                    // Read until this change's line has arrived.
                    let want = format!("\"bench\":\"{i}\"");
                    let mut seen = Vec::new();
                    while !String::from_utf8_lossy(&seen).contains(&want) {
                        let f = stream.frame().await.unwrap().unwrap();
                        if let Some(d) = f.data_ref() {
                            seen.extend_from_slice(d);
                        }
                    }
                    total += t.elapsed();
                }
                total
            }
        })
    });
    g.finish();
    eprintln!("kube-sim: RSS {:.1} MiB at the end", rss_mib());
}

criterion_group!(benches, bench);
criterion_main!(benches);
