//! What the integration suites share (proxy's, and cli's by `#[path]`): real model-sim servers and
//! real proxies on 127.0.0.1:0 ports, waited on for readiness; plain HTTP
//! helpers; the metrics and pools as the admin server shows them; and the
//! teardown every test ends with.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use scalecar_config::ScalecarConfig;
use scalecar_loadtest::kube_sim::{KubeSim, KubeSimConfig};
use scalecar_loadtest::sim::{ModelSim, SimConfig, SimHandle};
use scalecar_proxy::server::ProxyHandle;
use serde_json::Value;

/// A kube-sim on a free port, a client of it, and a kubeconfig file for
/// it named after `suite`, this process and the port (suites run side by
/// side).
pub async fn kube_sim(config: KubeSimConfig, suite: &str) -> (KubeSim, kube::Client, PathBuf) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = KubeSim::start(config, listener).unwrap();
    let client = kube::Client::try_from(kube::Config::new(sim.url().parse().unwrap())).unwrap();
    let kubeconfig = std::env::temp_dir().join(format!(
        "scalecar-{suite}-{}-{}.kubeconfig",
        std::process::id(),
        sim.addr().port()
    ));
    sim.write_kubeconfig(&kubeconfig).unwrap();
    (sim, client, kubeconfig)
}

/// A workload of model-sim pods, as users write a vLLM Deployment.
pub fn workload(
    api_version: &str,
    kind: &str,
    name: &str,
    model: &str,
    replicas: u32,
    annotations: Value,
    extra_args: &[&str],
) -> Value {
    let mut args = vec!["--port", "8000", "--startup-delay", "300ms"];
    args.extend_from_slice(extra_args);
    serde_json::json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "vllm", "image": "vllm/vllm-openai",
                        "command": ["vllm", "serve", model], "args": args,
                        "ports": [{"name": "http", "containerPort": 8000}]
                    }]
                }
            }
        }
    })
}

/// Where a `scalecar run` child serves, from its log's `serving` line
/// (`proxy=… admin=…`), waiting at most `within`; `None` if it never says.
/// Its stderr is drained on a thread for the rest of its life (a full pipe
/// would stall it).
pub fn serving_addresses(
    stderr: std::process::ChildStderr,
    within: Duration,
) -> Option<(String, String)> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if !sent && line.contains("serving") {
                let field = |name: &str| {
                    line.split(&format!("{name}="))
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .map(str::to_string)
                };
                let _ = tx.send(field("proxy").zip(field("admin")));
                sent = true;
            }
        }
    });
    rx.recv_timeout(within).ok().flatten()
}

/// A model-sim on a free port, once its `/health` answers 200.
pub async fn sim(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = ModelSim::spawn(config, listener);
    let url = format!("http://{}/health", h.local_addr());
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&url).await.map(|(s, _)| s) != Ok(200) {
        assert!(Instant::now() < deadline, "model-sim never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h
}

/// A model-sim config serving `name`, seeded.
pub fn model(name: &str) -> SimConfig {
    SimConfig {
        model: name.into(),
        seed: 5,
        ..SimConfig::default()
    }
}

/// The proxy of a `scalecar run` config on free ports, once `/readyz`
/// answers 200.
pub async fn proxy(yaml: &str) -> ProxyHandle {
    let config = ScalecarConfig::from_yaml_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let p = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = scalecar_proxy::gateway::start(&config, p, a).await.unwrap();
    let url = format!("http://{}/readyz", h.admin_addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&url).await.map(|(s, _)| s) != Ok(200) {
        assert!(Instant::now() < deadline, "proxy never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h
}

/// One request on a fresh connection; the whole body.
pub async fn request_bytes(
    method: &str,
    url: &str,
    body: &str,
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

/// [`request_bytes`] with the body as text.
pub async fn request(
    method: &str,
    url: &str,
    body: &str,
) -> Result<(u16, http::HeaderMap, String), String> {
    request_bytes(method, url, body)
        .await
        .map(|(s, h, b)| (s, h, String::from_utf8_lossy(&b).into_owned()))
}

pub async fn get(url: &str) -> Result<(u16, String), String> {
    request("GET", url, "").await.map(|(s, _, b)| (s, b))
}

/// `/debug/pools`.
pub async fn pools(p: &ProxyHandle) -> Value {
    let (_, body) = get(&format!("http://{}/debug/pools", p.admin_addr))
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

/// The sum of the `/metrics` samples whose line starts with `prefix`.
pub async fn metric(p: &ProxyHandle, prefix: &str) -> f64 {
    let (_, text) = get(&format!("http://{}/metrics", p.admin_addr))
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `scalecar_requests_total` of model `m` in `role` that ended in `outcome`.
pub async fn outcome(p: &ProxyHandle, role: &str, outcome: &str) -> f64 {
    metric(
        p,
        &format!("scalecar_requests_total{{model=\"m\",role=\"{role}\",outcome=\"{outcome}\"}}"),
    )
    .await
}

/// The suites' shared teardown: once traffic stops, requests in flight,
/// requests queued and tokens in flight are exactly 0 — in the pools'
/// signals and in the exported gauges alike. Every test ends with it.
pub async fn teardown(p: &ProxyHandle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = pools(p).await;
        let sum = |key: &str| -> u64 {
            v["pools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[key].as_u64().unwrap())
                .sum()
        };
        let gauges = [
            metric(p, "scalecar_in_flight_requests{").await,
            metric(p, "scalecar_queued_requests{").await,
            metric(p, "scalecar_tokens_in_flight{").await,
        ];
        if sum("in_flight") == 0
            && sum("queued") == 0
            && sum("tokens_in_flight") == 0
            && gauges == [0.0; 3]
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in flight / queued / tokens never returned to 0: {v}, gauges {gauges:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Client-side TTFT of one raw streaming request.
pub async fn client_ttft(url: &str, body: &str) -> Duration {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    // Connect first: the proxy's clock starts when a request arrives, so
    // the client's must not include the TCP handshake and the accept (on a
    // busy machine they alone are over a millisecond).
    let models = url.replace("/chat/completions", "/models");
    let warm = client.get(models.parse().unwrap()).await.unwrap();
    warm.into_body().collect().await.unwrap();
    let req = hyper::Request::post(url)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let start = Instant::now();
    let mut body = client.request(req).await.unwrap().into_body();
    let mut first = None;
    while let Some(f) = body.frame().await {
        let f = f.unwrap();
        if first.is_none()
            && f.data_ref()
                .is_some_and(|d| d.windows(10).any(|w| w == b"\"content\":"))
        {
            first = Some(start.elapsed());
        }
    }
    first.expect("a content event")
}
