//! Proxy overhead on loopback, direct vs through `scalecar run`: CPU per
//! request at saturation, added latency at 1,000 req/s, added TTFT on
//! streams, idle RSS. The proxy and model-sim run as their own processes
//! (release builds) so the proxy's CPU is read from /proc alone.
//!
//! Run with `scripts/bench-proxy` (it builds the binaries and passes their
//! paths). Under `cargo test` this only prints how to run it. With
//! `COMPARE_NGINX=1` the same measurements run through nginx (a plain
//! keep-alive reverse proxy, no body routing) for scale. With
//! `COMPARE_ENVOY=1` (Envoy from `$ENVOY` or PATH; scripts/install-envoy)
//! they also run through Envoy alone (a static cluster per route) and
//! through Envoy with scalecar as its endpoint picker (ext_proc, body
//! buffered, response streamed, `ORIGINAL_DST` on the picked header; with
//! `EPP_BODIES=full-duplex` both bodies `FULL_DUPLEX_STREAMED`, as the
//! Inference Extension's gateways configure it), the
//! picker's CPU read from scalecar's process. `BENCH_PARTS`
//! picks parts (`cpu,latency,ttft`; all by default); `SCALECAR_WORKERS`
//! sets the proxy's worker threads. `BENCH_PIN=1` gives the proxy under
//! test core 1 to itself (one worker) and puts the client and simulators on
//! core 0, which takes the scheduler's noise out of the CPU figure.
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

/// nginx's master, stopped with SIGTERM so that it takes its workers along.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `program`, on `cpu` when pinning.
fn command(program: &str, cpu: Option<&str>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, program]);
            c
        }
        None => Command::new(program),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU seconds of a process and its children (nginx's workers).
fn cpu_seconds(pid: u32) -> f64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .map(cpu_seconds)
        .sum::<f64>()
        + own_cpu_seconds(pid)
}

fn own_cpu_seconds(pid: u32) -> f64 {
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
    quantile(&mut v, 0.5)
}

fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1));
    v.get(i).copied().unwrap_or_default()
}

/// Envoy with four listeners: two plain routes to the simulators (Envoy
/// alone) and two through its ext_proc filter to scalecar's picker and an
/// `ORIGINAL_DST` cluster on the picked header, as the Gateway API
/// Inference Extension configures it.
fn envoy_config(listeners: [u16; 4], admin: u16, fast: u16, real: u16, picker: u16) -> String {
    let [alone_fast, alone_real, epp_fast, epp_real] = listeners;
    let (request, response, trailers) =
        if std::env::var("EPP_BODIES").is_ok_and(|m| m == "full-duplex") {
            ("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED", "SEND")
        } else {
            ("BUFFERED", "STREAMED", "SKIP")
        };
    let hcm = |name: &str, cluster: &str, ext_proc: bool| {
        let filter = if ext_proc {
            format!(
                r#"
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              failure_mode_allow: false
              message_timeout: 60s
              grpc_service: {{ envoy_grpc: {{ cluster_name: picker }}, timeout: 60s }}
              processing_mode: {{ request_header_mode: SEND, request_body_mode: {request}, response_header_mode: SEND, response_body_mode: {response}, request_trailer_mode: {trailers}, response_trailer_mode: {trailers} }}"#
            )
        } else {
            String::new()
        };
        format!(
            r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}, timeout: 0s }}
          http_filters:{filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
        )
    };
    let listener = |name: &str, port: u16, cluster: &str, ext_proc: bool| {
        format!(
            r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:{}"#,
            hcm(name, cluster, ext_proc)
        )
    };
    let stat = |name: &str, port: u16, h2: bool| {
        let proto = if h2 {
            r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#
        } else {
            ""
        };
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s{proto}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"#
        )
    };
    format!(
        r#"static_resources:
  listeners:{}{}{}{}
  clusters:{}{}{}
  - name: picked
    type: ORIGINAL_DST
    connect_timeout: 1s
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config: {{ use_http_header: true, http_header_name: x-gateway-destination-endpoint }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
"#,
        listener("alone_fast", alone_fast, "fast", false),
        listener("alone_real", alone_real, "real", false),
        listener("epp_fast", epp_fast, "picked", true),
        listener("epp_real", epp_real, "picked", true),
        stat("fast", fast, false),
        stat("real", real, false),
        stat("picker", picker, true),
    )
}

/// One proxy under test: where its two routes are and its process.
struct UnderTest {
    name: &'static str,
    pid: u32,
    /// Another process whose CPU the path costs (Envoy, beside its
    /// picker).
    also: Option<(&'static str, u32)>,
    /// `http://host:port` of the route to the zero-cost simulator (model
    /// `m`).
    fast: String,
    /// Of the route to the realistic simulator (model `r`).
    real: String,
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
    let pin = std::env::var_os("BENCH_PIN").is_some();
    let (proxy_cpu, rest_cpu) = if pin {
        (Some("1"), Some("0"))
    } else {
        (None, None)
    };
    if pin {
        let me = std::process::id().to_string();
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", "0", &me])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "BENCH_PIN needs taskset and two cores");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("scalecar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // A zero-cost upstream (no simulated GPU time) and a realistic one.
    let fast_port = free_port();
    let real_port = free_port();
    let sim = |port: u16, model: &str, extra: &[&str]| {
        Proc(
            command(&model_sim, rest_cpu)
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
    let envoy_compare = std::env::var_os("COMPARE_ENVOY").is_some();
    let epp_port = free_port();
    let ext_proc = if envoy_compare {
        format!("ext-proc: {{ listen: \"127.0.0.1:{epp_port}\" }}\n")
    } else {
        String::new()
    };
    let config = dir.join("scalecar.yaml");
    let workers = std::env::var("SCALECAR_WORKERS")
        .ok()
        .or(pin.then(|| "1".to_string()))
        .map(|w| format!(", workers: {w}"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "proxy: {{ listen: \"127.0.0.1:{proxy_port}\"{workers} }}\nadmin: {{ listen: \"127.0.0.1:{admin_port}\" }}\n{ext_proc}pools:\n  - model: m\n    endpoints: [\"127.0.0.1:{fast_port}\"]\n  - model: r\n    endpoints: [\"127.0.0.1:{real_port}\"]\n"
        ),
    )
    .unwrap();
    let proxy = Proc(
        command(&scalecar, proxy_cpu)
            .args(["run", "--config", config.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
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
    let mut under_test = vec![UnderTest {
        name: "scalecar",
        pid: proxy.0.id(),
        also: None,
        fast: format!("http://127.0.0.1:{proxy_port}"),
        real: format!("http://127.0.0.1:{proxy_port}"),
    }];
    let _nginx = std::env::var_os("COMPARE_NGINX").map(|_| {
        let (fast, real) = (free_port(), free_port());
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes {nginx_workers};\npid {dir}/nginx.pid;\nerror_log stderr error;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  tcp_nodelay on;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  upstream fast {{ server 127.0.0.1:{fast_port}; keepalive 512; }}\n  upstream real {{ server 127.0.0.1:{real_port}; keepalive 64; }}\n  server {{ listen 127.0.0.1:{fast}; location / {{ proxy_pass http://fast; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }}\n  server {{ listen 127.0.0.1:{real}; location / {{ proxy_pass http://real; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }}\n}}\n",
                dir = dir.display(),
                nginx_workers = if pin { "1" } else { "auto" },
            ),
        )
        .unwrap();
        let p = Nginx(
            command("nginx", proxy_cpu)
                .args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()])
                .spawn()
                .expect("COMPARE_NGINX needs nginx on PATH"),
        );
        rt.block_on(wait_http(
            &client,
            &format!("http://127.0.0.1:{fast}/v1/models"),
        ));
        under_test.push(UnderTest {
            name: "nginx",
            pid: p.0.id(),
            also: None,
            fast: format!("http://127.0.0.1:{fast}"),
            real: format!("http://127.0.0.1:{real}"),
        });
        p
    });
    let _envoy = envoy_compare.then(|| {
        let ports = [free_port(), free_port(), free_port(), free_port()];
        let admin = free_port();
        let conf = dir.join("envoy.yaml");
        std::fs::write(
            &conf,
            envoy_config(ports, admin, fast_port, real_port, epp_port),
        )
        .unwrap();
        let bin = std::env::var("ENVOY").unwrap_or_else(|_| "envoy".into());
        let concurrency = if pin { "1" } else { "2" };
        let p = Proc(
            command(&bin, proxy_cpu)
                .args(["-c", conf.to_str().unwrap(), "--disable-hot-restart"])
                .args(["--log-level", "error", "--concurrency", concurrency])
                .stderr(Stdio::null())
                .spawn()
                .expect("COMPARE_ENVOY needs envoy ($ENVOY or PATH; scripts/install-envoy)"),
        );
        rt.block_on(wait_http(
            &client,
            &format!("http://127.0.0.1:{admin}/ready"),
        ));
        let [alone_fast, alone_real, epp_fast, epp_real] = ports;
        rt.block_on(wait_http(
            &client,
            &format!("http://127.0.0.1:{alone_fast}/v1/models"),
        ));
        under_test.push(UnderTest {
            name: "envoy",
            pid: p.0.id(),
            also: None,
            fast: format!("http://127.0.0.1:{alone_fast}"),
            real: format!("http://127.0.0.1:{alone_real}"),
        });
        under_test.push(UnderTest {
            name: "envoy + scalecar picker",
            pid: proxy.0.id(),
            also: Some(("envoy", p.0.id())),
            fast: format!("http://127.0.0.1:{epp_fast}"),
            real: format!("http://127.0.0.1:{epp_real}"),
        });
        p
    });
    // Past the control loop's first ticks: idle, but everything touched.
    std::thread::sleep(Duration::from_secs(5));
    for t in &under_test {
        println!(
            "{}: idle RSS {:.1} MiB",
            t.name,
            rss_kib(t.pid) as f64 / 1024.0
        );
    }

    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "cpu,latency,ttft".into());
    let part = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let small = Bytes::from(r#"{"model":"m","prompt":"hello","max_tokens":1}"#);
    let direct_url = format!("http://127.0.0.1:{fast_port}/v1/completions");

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
    if part("cpu") {
        let n_direct = run_closed(direct_url.clone(), 5);
        println!(
            "saturation direct: {n_direct} requests in 5 s ({:.0} req/s)",
            n_direct as f64 / 5.0
        );
    }
    // The client and the simulator share the cores with the proxy, so one
    // round is noisy: five rounds of 3 s, the median.
    for t in under_test.iter().filter(|_| part("cpu")) {
        let fast_url = format!("{}/v1/completions", t.fast);
        run_closed(fast_url.clone(), 1);
        let also_cpu = || t.also.map_or(0.0, |(_, pid)| cpu_seconds(pid));
        let mut rounds: Vec<(f64, f64, f64)> = (0..5)
            .map(|_| {
                let (cpu0, also0) = (cpu_seconds(t.pid), also_cpu());
                let n = run_closed(fast_url.clone(), 3);
                let cpu = cpu_seconds(t.pid) - cpu0;
                let also = also_cpu() - also0;
                (cpu * 1e6 / n as f64, n as f64 / 3.0, also * 1e6 / n as f64)
            })
            .collect();
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let all: Vec<String> = rounds.iter().map(|r| format!("{:.1}", r.0)).collect();
        let (per_request, rate, also) = rounds[rounds.len() / 2];
        let also = t
            .also
            .map(|(name, _)| format!("; {name} {also:.1} µs per request"))
            .unwrap_or_default();
        println!(
            "{}: saturation {rate:.0} req/s, CPU {per_request:.1} µs per request (median of 5 rounds: {}){also}",
            t.name,
            all.join(", ")
        );
    }

    // 2. Added latency at 1,000 req/s, open loop: direct and proxied
    //    requests alternate on one schedule (each path at 1,000 req/s), so
    //    both see the same machine at the same moments.
    let open_loop = |direct_url: String, proxy_url: String| {
        let client = client.clone();
        let body = small.clone();
        rt.block_on(async move {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..10_000u64 {
                tokio::time::sleep_until(tokio::time::Instant::from_std(
                    start + Duration::from_micros(i * 500),
                ))
                .await;
                let url = if i % 2 == 0 { &direct_url } else { &proxy_url };
                let (client, body, url) = (client.clone(), body.clone(), url.clone());
                tasks.push(tokio::spawn(
                    async move { post(&client, &url, &body).await.0 },
                ));
            }
            let (mut direct, mut via) = (Vec::new(), Vec::new());
            for (i, t) in tasks.into_iter().enumerate() {
                let d = t.await.unwrap();
                if i % 2 == 0 {
                    direct.push(d)
                } else {
                    via.push(d)
                }
            }
            (
                (quantile(&mut direct, 0.5), quantile(&mut direct, 0.99)),
                (quantile(&mut via, 0.5), quantile(&mut via, 0.99)),
            )
        })
    };
    for t in under_test.iter().filter(|_| part("latency")) {
        let ((d50, d99), (v50, v99)) =
            open_loop(direct_url.clone(), format!("{}/v1/completions", t.fast));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{}: latency at 1,000 req/s: p50 direct {:.3} ms, proxied {:.3} ms, added {:.3} ms; p99 direct {:.3} ms, proxied {:.3} ms, added {:.3} ms",
            t.name,
            ms(d50),
            ms(v50),
            ms(v50) - ms(d50),
            ms(d99),
            ms(v99),
            ms(v99) - ms(d99)
        );
    }

    // 3. Added TTFT on streams from the realistic simulator (500-token
    //    prompts, ~38 ms to the first token), one stream at a time, direct
    //    and proxied alternating: first with the proxy otherwise idle (it
    //    sleeps between tokens, so every token pays the wake-up of an idle
    //    thread and cold caches), then while it also serves 1,000 small
    //    requests a second, as a proxy in service does.
    let body = Bytes::from(format!(
        r#"{{"model":"r","stream":true,"max_tokens":4,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(2000)
    ));
    let direct_stream = format!("http://127.0.0.1:{real_port}/v1/chat/completions");
    for t in under_test.iter().filter(|_| part("ttft")) {
        for busy in [false, true] {
            let (client, body, small) = (client.clone(), body.clone(), small.clone());
            let direct_url = direct_stream.clone();
            let proxy_url = format!("{}/v1/chat/completions", t.real);
            let background = format!("{}/v1/completions", t.fast);
            let (direct, via) = rt.block_on(async move {
                let load = busy.then(|| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let mut every = tokio::time::interval(Duration::from_millis(1));
                        loop {
                            every.tick().await;
                            let (client, url, body) =
                                (client.clone(), background.clone(), small.clone());
                            tokio::spawn(async move { post(&client, &url, &body).await });
                        }
                    })
                });
                let (mut direct, mut via) = (Vec::new(), Vec::new());
                for _ in 0..300 {
                    direct.push(post(&client, &direct_url, &body).await.1.unwrap());
                    via.push(post(&client, &proxy_url, &body).await.1.unwrap());
                }
                if let Some(l) = load {
                    l.abort();
                }
                (p50(direct), p50(via))
            });
            println!(
                "{}: TTFT p50 one stream at a time{}: direct {:.3} ms, proxied {:.3} ms, added {:.3} ms",
                t.name,
                if busy {
                    ", proxy at 1,000 req/s"
                } else {
                    ", proxy idle"
                },
                direct.as_secs_f64() * 1e3,
                via.as_secs_f64() * 1e3,
                (via.as_secs_f64() - direct.as_secs_f64()) * 1e3
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
