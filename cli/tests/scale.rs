//! Many models on one gateway (#23): `SCALE_WORKLOADS` annotated
//! Deployments (100 by default, the CI size; the README's figures are this
//! test at 1,000), each one model-sim pod on kube-sim, and one real
//! `scalecar run` process discovering them all. What must hold at any size:
//! every model routed; a request to each served; once listed, the
//! gateway's API traffic follows the watches — no re-list, no per-tick read
//! of any scale target while nothing changes; and a burst on one model
//! written through `/scale` within a few ticks. It prints what a bench
//! reports: RSS, CPU per tick, API calls per second, the burst's time to
//! its write (`SCALECAR_BIN=target/release/scalecar SCALE_WORKLOADS=1000
//! cargo test -p scalecar-proxy --test scale -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../proxy/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::get;
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use scalecar_loadtest::kube_sim::KubeSimConfig;
use serde_json::{Value, json};

/// `scalecar run` as its own process (its RSS and CPU are its own).
struct Gateway {
    child: std::process::Child,
    proxy: String,
    admin: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(config: &PathBuf) -> Gateway {
        // SCALECAR_BIN: a release build, for the figures a bench reports.
        let bin = std::env::var("SCALECAR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_scalecar").to_string());
        let mut child = std::process::Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,scalecar=info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (proxy, admin) = common::serving_addresses(stderr, Duration::from_secs(30))
            .expect("the gateway logs where it serves");
        Gateway {
            child,
            proxy,
            admin,
        }
    }

    /// (RSS in KiB, CPU time so far) from /proc.
    fn usage(&self) -> (u64, Duration) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command's closing parenthesis; utime and stime
        // are the 14th and 15th of the whole line.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on Linux.
        (rss, Duration::from_millis(ticks * 10))
    }
}

/// What one API request was, as RBAC would name its verb.
fn verb(method: &str, uri: &str) -> &'static str {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let watch = query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1");
    let collection = [
        "/deployments",
        "/statefulsets",
        "/pods",
        "/horizontalpodautoscalers",
        "/scaledobjects",
        "/leases",
        "/events",
    ]
    .iter()
    .any(|c| path.ends_with(c));
    match method {
        "GET" if watch => "watch",
        "GET" if collection => "list",
        "GET" => "get",
        "PATCH" => "patch",
        "POST" => "create",
        "PUT" => "update",
        _ => "other",
    }
}

async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_over_many_workloads_stays_watch_driven() {
    let n: usize = std::env::var("SCALE_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let config = KubeSimConfig {
        controllers: true,
        ..KubeSimConfig::default()
    };
    let (sim, client, kubeconfig) = common::kube_sim(config, "scale").await;
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("apps", "v1", "Deployment"),
            "deployments",
        ),
    );
    for i in 0..n {
        let name = format!("model-{i}");
        // model-0 scales on concurrency (kpa, 1 per pod): the burst below.
        let annotations = if i == 0 {
            json!({"scalecar.io/model": name, "scalecar.io/algorithm": "kpa",
                   "scalecar.io/target": "1", "scalecar.io/window": "6s",
                   "scalecar.io/max-replicas": "4"})
        } else {
            json!({"scalecar.io/model": name})
        };
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{
                        "name": "vllm", "image": "vllm/vllm-openai",
                        "command": ["vllm", "serve", name],
                        "args": ["--port", "8000"],
                        "ports": [{"name": "http", "containerPort": 8000}]
                    }]}
                }
            }
        }))
        .unwrap();
        deployments
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }
    let config = kubeconfig.with_extension("yaml");
    std::fs::write(
        &config,
        format!(
            "proxy: {{ listen: \"127.0.0.1:0\", workers: 1 }}\nadmin: {{ listen: \"127.0.0.1:0\" }}\nscaler: {{ tick: 500ms }}\nkubernetes:\n  kubeconfig: {}\n  namespaces: [default]\n  leader-election: {{ namespace: default }}\n",
            kubeconfig.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let gw = Gateway::start(&config);
    let routed = eventually("every model routed", Duration::from_secs(120), || async {
        let (_, body) = get(&format!("http://{}/debug/pools", gw.admin))
            .await
            .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let ready = v["pools"]
            .as_array()?
            .iter()
            .filter(|p| p["endpoints"].as_array().is_some_and(|e| !e.is_empty()))
            .count();
        (ready == n).then_some(started.elapsed())
    })
    .await;
    // Load over every model: one chat completion each.
    let openai = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", gw.proxy))
            .with_api_key("none"),
    );
    let ask = |model: String, tokens: u32| {
        let openai = openai.clone();
        async move {
            let req = CreateChatCompletionRequestArgs::default()
                .model(model)
                .max_completion_tokens(tokens)
                .messages([ChatCompletionRequestUserMessageArgs::default()
                    .content("how many?")
                    .build()
                    .unwrap()
                    .into()])
                .build()
                .unwrap();
            openai.chat().create(req).await
        }
    };
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let answers =
            futures_util::future::join_all(chunk.iter().map(|i| ask(format!("model-{i}"), 4)))
                .await;
        for a in answers {
            a.unwrap();
        }
    }
    // A quiet window of ten ticks: what the gateway asks of the API server
    // and what its ticks cost.
    let agent =
        |r: &scalecar_loadtest::kube_sim::RequestRecord| r.user_agent.starts_with("scalecar/");
    let decided = || async {
        let (_, body) = get(&format!("http://{}/debug/targets", gw.admin))
            .await
            .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["targets"]
            .as_array()?
            .iter()
            .find(|t| t["model"] == "model-1")?["decided_unix"]
            .as_f64()
    };
    let t0 = eventually("a decision on model-1", Duration::from_secs(10), decided).await;
    let (_, cpu_before) = gw.usage();
    let from = Instant::now();
    // Ten ticks later, by the gateway's own decisions (asked once a second:
    // the answer lists every target, and asking costs the gateway CPU).
    let mut t1 = t0;
    while t1 < t0 + 5.0 {
        assert!(
            from.elapsed() < Duration::from_secs(20),
            "never: ten more ticks"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        t1 = decided().await.unwrap_or(t1);
    }
    let window = from.elapsed();
    let (rss, cpu_after) = gw.usage();
    let ticks = ((t1 - t0) / 0.5).round().max(1.0) as u32;
    let quiet: Vec<&'static str> = sim
        .requests()
        .iter()
        .filter(|r| agent(r) && r.at >= from)
        .map(|r| verb(&r.method, &r.uri))
        .collect();
    let count = |v: &str| quiet.iter().filter(|x| **x == v).count();
    let per_tick = (cpu_after - cpu_before) / ticks;
    println!(
        "{n} workloads: routed in {routed:.1?}; RSS {:.1} MiB; CPU {per_tick:?} per 500 ms tick (proxy idle); \
         API calls in {window:?} quiet: {} ({} list, {} get, {} watch, {} lease update/get)",
        rss as f64 / 1024.0,
        quiet.len(),
        count("list"),
        count("get"),
        count("watch"),
        count("update"),
    );
    assert_eq!(
        count("list"),
        0,
        "re-lists while nothing changed: {quiet:?}"
    );
    assert_eq!(count("patch"), 0, "writes while nothing changed");
    // Only the Lease is read by name: never a scale target per tick.
    assert!(
        count("get") <= (window.as_secs() as usize + 1) * 2,
        "{} gets in {window:?}",
        count("get")
    );
    // A burst on model-0 (kpa, target 1 per pod): written through /scale
    // within a few ticks of the requests arriving.
    let burst = Instant::now();
    let streams: Vec<_> = (0..8)
        .map(|_| tokio::spawn(ask("model-0".into(), 64)))
        .collect();
    let written = eventually("model-0 scaled up", Duration::from_secs(10), || async {
        sim.requests()
            .iter()
            .find(|r| {
                agent(r)
                    && r.method == "PATCH"
                    && r.uri.contains("/deployments/model-0/scale")
                    && r.at >= burst
            })
            .map(|r| r.at - burst)
    })
    .await;
    println!("burst on model-0 to its /scale write: {written:.1?}");
    for s in streams {
        s.await.unwrap().unwrap();
    }
    drop(gw);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&kubeconfig);
    sim.shutdown().await;
}
