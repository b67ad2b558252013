//! Proxy overhead on loopback, direct vs through `scalecar run`: CPU per
//! request at saturation, added latency at 1,000 req/s, added TTFT on
//! streams, idle RSS. The proxy and model-sim run as their own processes
//! (release builds) so the proxy's CPU is read from /proc alone.
//!
//! Run with `scripts/bench-proxy` (it builds the binaries and passes their
//! paths). Under `cargo test` this only prints how to run it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn wait_http(client: &HttpClient, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = hyper::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(r) = client.request(req).await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post(client: &HttpClient, url: &str, body: &Bytes) -> (Duration, Option<Duration>) {
    let start = Instant::now();
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let mut b = client.request(req).await.unwrap().into_body();
    let mut first = None;
    while let Some(f) = b.frame().await {
        if first.is_none()
            && f.unwrap()
                .data_ref()
                .is_some_and(|d| d.windows(10).any(|w| w == b"\"content\":"))
        {
            first = Some(start.elapsed());
        }
    }
    (start.elapsed(), first)
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("proxy overhead benchmark: run scripts/bench-proxy");
        return;
    }
    let scalecar =
        std::env::var("SCALECAR_BIN").expect("SCALECAR_BIN (scripts/bench-proxy sets it)");
    let model_sim =
        std::env::var("MODEL_SIM_BIN").expect("MODEL_SIM_BIN (scripts/bench-proxy sets it)");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("scalecar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // A fast upstream (no simulated GPU time) and a realistic one.
    let fast_port = free_port();
    let real_port = free_port();
    let sim = |port: u16, model: &str, extra: &[&str]| {
        Proc(
            Command::new(&model_sim)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--model", model])
                .args(extra)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _fast = sim(
        fast_port,
        "m",
        &[
            "--decode-base-ms",
            "0",
            "--decode-per-seq-ms",
            "0",
            "--decode-per-1k-kv-ms",
            "0",
            "--prefill-tokens-per-sec",
            "1e12",
        ],
    );
    let _real = sim(real_port, "r", &[]);
    let (proxy_port, admin_port) = (free_port(), free_port());
    let config = dir.join("scalecar.yaml");
    std::fs::write(
        &config,
        format!(
            "proxy: {{ listen: \"127.0.0.1:{proxy_port}\" }}\nadmin: {{ listen: \"127.0.0.1:{admin_port}\" }}\npools:\n  - model: m\n    endpoints: [\"127.0.0.1:{fast_port}\"]\n  - model: r\n    endpoints: [\"127.0.0.1:{real_port}\"]\n"
        ),
    )
    .unwrap();
    let proxy = Proc(
        Command::new(&scalecar)
            .args(["run", "--config", config.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = proxy.0.id();
    let client: HttpClient = {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(512)
            .build(c)
    };
    rt.block_on(async {
        wait_http(&client, &format!("http://127.0.0.1:{fast_port}/health")).await;
        wait_http(&client, &format!("http://127.0.0.1:{real_port}/health")).await;
        wait_http(&client, &format!("http://127.0.0.1:{admin_port}/readyz")).await;
    });
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "idle RSS of the proxy: {:.1} MiB",
        rss_kib(pid) as f64 / 1024.0
    );

    let small = Bytes::from(r#"{"model":"m","prompt":"hello","max_tokens":1}"#);
    let direct_url = format!("http://127.0.0.1:{fast_port}/v1/completions");
    let proxy_url = format!("http://127.0.0.1:{proxy_port}/v1/completions");

    // 1. CPU per request at saturation: 64 connections in a closed loop.
    let run_closed = |url: String, secs: u64| {
        let client = client.clone();
        let body = small.clone();
        rt.block_on(async move {
            let done = Arc::new(AtomicU64::new(0));
            let until = Instant::now() + Duration::from_secs(secs);
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let (client, body, url, done) =
                        (client.clone(), body.clone(), url.clone(), done.clone());
                    tokio::spawn(async move {
                        while Instant::now() < until {
                            post(&client, &url, &body).await;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            done.load(Ordering::Relaxed)
        })
    };
    run_closed(proxy_url.clone(), 1);
    let cpu0 = cpu_seconds(pid);
    let n = run_closed(proxy_url.clone(), 5);
    let cpu = cpu_seconds(pid) - cpu0;
    println!(
        "saturation through the proxy: {n} requests in 5 s ({:.0} req/s), proxy CPU {:.2} s → {:.1} µs per request",
        n as f64 / 5.0,
        cpu,
        cpu * 1e6 / n as f64
    );
    let n_direct = run_closed(direct_url.clone(), 5);
    println!(
        "saturation direct: {n_direct} requests in 5 s ({:.0} req/s)",
        n_direct as f64 / 5.0
    );

    // 2. Added latency at 1,000 req/s, open loop, 5 s each.
    let open_loop = |url: String| {
        let client = client.clone();
        let body = small.clone();
        rt.block_on(async move {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..5000u64 {
                tokio::time::sleep_until(tokio::time::Instant::from_std(
                    start + Duration::from_micros(i * 1000),
                ))
                .await;
                let (client, body, url) = (client.clone(), body.clone(), url.clone());
                tasks.push(tokio::spawn(
                    async move { post(&client, &url, &body).await.0 },
                ));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.push(t.await.unwrap());
            }
            p50(lat)
        })
    };
    let direct = open_loop(direct_url.clone());
    let via = open_loop(proxy_url.clone());
    println!(
        "latency p50 at 1,000 req/s: direct {:.3} ms, through the proxy {:.3} ms, added {:.3} ms",
        direct.as_secs_f64() * 1e3,
        via.as_secs_f64() * 1e3,
        (via.as_secs_f64() - direct.as_secs_f64()) * 1e3
    );

    // 3. Added TTFT on streams against the realistic simulator, one at a time.
    let stream_body = |model: &str| {
        Bytes::from(format!(
            r#"{{"model":"{model}","stream":true,"max_tokens":4,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "a".repeat(2000)
        ))
    };
    let ttfts = |url: String, body: Bytes| {
        let client = client.clone();
        rt.block_on(async move {
            let mut v = Vec::new();
            for _ in 0..100 {
                v.push(post(&client, &url, &body).await.1.unwrap());
            }
            p50(v)
        })
    };
    let direct_ttft = ttfts(
        format!("http://127.0.0.1:{real_port}/v1/chat/completions"),
        stream_body("r"),
    );
    let proxied_ttft = ttfts(
        format!("http://127.0.0.1:{proxy_port}/v1/chat/completions"),
        stream_body("r"),
    );
    println!(
        "TTFT p50 on streams (500-token prompt): direct {:.3} ms, through the proxy {:.3} ms, added {:.3} ms",
        direct_ttft.as_secs_f64() * 1e3,
        proxied_ttft.as_secs_f64() * 1e3,
        (proxied_ttft.as_secs_f64() - direct_ttft.as_secs_f64()) * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
}
