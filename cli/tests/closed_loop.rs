//! The closed loop end to end: the real control loop scaling a local
//! cluster of model-sim replicas behind the real proxy (no Kubernetes: the
//! loop and the proxy alone), and `scalecar demo` — on its embedded
//! kube-sim — as users run it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use scalecar_config::{Limits, Policy, Role};
use scalecar_loadtest::cluster::LocalPool;
use scalecar_loadtest::sim::SimConfig;
use scalecar_proxy::decisions::DecisionRecorder;
use scalecar_proxy::gateway::GatewayBuilder;
use scalecar_proxy::pool::Pool;
use scalecar_proxy::server::ProxyHandle;
use scalecar_scaler::control::Scaling;
use scalecar_scaler::target::ScaleTarget;

struct Loop {
    proxy: ProxyHandle,
    cluster: Arc<LocalPool>,
    pool: Arc<Pool>,
    decisions: Arc<DecisionRecorder>,
}

async fn closed_loop(keys: &[(&str, &str)], initial: u32, tick: Duration) -> Loop {
    let keys: BTreeMap<String, String> = keys
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let policy = Policy::from_keys(&keys, Role::Unified).unwrap();
    let template = SimConfig {
        model: "m".into(),
        startup_delay: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let cluster = LocalPool::start("m", template, initial).await.unwrap();
    let builder = GatewayBuilder::new(Limits::default(), tick).pool(
        "m",
        "m",
        Role::Unified,
        policy,
        cluster.endpoints(),
        Scaling::Managed(cluster.clone()),
    );
    let decisions = builder.decisions();
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let proxy = builder
        .start(bind().await.unwrap(), bind().await.unwrap())
        .unwrap();
    let pool = proxy.plane.find("m", Role::Unified).unwrap().pool.clone();
    Loop {
        proxy,
        cluster,
        pool,
        decisions,
    }
}

async fn stream(addr: std::net::SocketAddr, max_tokens: u32) -> Result<u16, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body =
        format!(r#"{{"model":"m","prompt":"hello","stream":true,"max_tokens":{max_tokens}}}"#);
    let req = hyper::Request::post(format!("http://{addr}/v1/completions"))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_up_within_two_ticks_and_idle_returns_to_min() {
    let tick = Duration::from_millis(500);
    let l = closed_loop(
        &[
            ("algorithm", "kpa"),
            ("target", "4"),
            ("window", "6s"),
            ("panic-window-percentage", "34"),
            ("min-replicas", "1"),
            ("max-replicas", "5"),
        ],
        1,
        tick,
    )
    .await;
    until("the first replica", Duration::from_secs(5), || {
        !l.pool.endpoints().is_empty()
    })
    .await;
    // Let the loop decide a few times on the idle pool first.
    until("three idle decisions", Duration::from_secs(10), || {
        l.decisions.ticks() >= 3
    })
    .await;
    let ticks_before = l.decisions.ticks();
    let burst: Vec<_> = (0..24)
        .map(|_| tokio::spawn(stream(l.proxy.proxy_addr, 400)))
        .collect();
    until("a scale-up", Duration::from_secs(10), || {
        l.decisions.latest().first().is_some_and(|s| s.applied > 1)
    })
    .await;
    let ticks = l.decisions.ticks() - ticks_before;
    assert!(ticks <= 2, "scaled up after {ticks} ticks");
    assert!(
        l.decisions.latest()[0].panic,
        "panic is reported: {:?}",
        l.decisions.latest()
    );
    until("replicas ready", Duration::from_secs(10), || {
        l.pool.endpoints().len() > 1
    })
    .await;
    for b in burst {
        assert_eq!(b.await.unwrap().unwrap(), 200);
    }
    // Idle: back to min.
    until("scale back to min", Duration::from_secs(40), || {
        l.decisions
            .latest()
            .first()
            .is_some_and(|s| s.applied == 1 && !s.panic)
    })
    .await;
    let state = l.cluster.scale().await.unwrap();
    assert_eq!(state.spec, 1);
    assert_eq!(l.pool.signals.in_flight(), 0);
    assert_eq!(l.pool.signals.queued(), 0);
    assert_eq!(l.pool.signals.tokens_in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_an_idle_pool_at_zero_scales_it_from_zero() {
    let l = closed_loop(
        &[
            ("algorithm", "kpa"),
            ("min-replicas", "0"),
            ("window", "6s"),
            ("panic-window-percentage", "34"),
        ],
        0,
        Duration::from_secs(2),
    )
    .await;
    assert!(l.pool.endpoints().is_empty());
    assert_eq!(l.cluster.scale().await.unwrap().spec, 0);
    // Held until a replica is ready (cold start 300 ms), then served.
    let start = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), stream(l.proxy.proxy_addr, 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "served before any replica could be ready"
    );
    let changes = l.decisions.changes();
    assert_eq!(
        changes.first().map(|c| (c.spec, c.applied)),
        Some((0, 1)),
        "{changes:?}"
    );
    // The held request is load (concurrency counts the queue): the poke's
    // tick asks for a replica on it at once.
    assert!(changes[0].desired >= Some(1), "{changes:?}");
    assert_eq!(l.cluster.scale().await.unwrap().spec, 1);
    assert_eq!(l.pool.signals.in_flight() + l.pool.signals.queued(), 0);
}

#[test]
fn scalecar_demo_writes_a_report_whose_replicas_follow_the_load() {
    let dir = std::env::temp_dir().join(format!("scalecar-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .args([
            "demo",
            "--duration",
            "60s",
            "--quiet",
            "--startup-delay",
            "4s",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "summary.md",
        "summary.json",
        "timeline.svg",
        "timeline.csv",
        "requests.csv",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let svg = std::fs::read_to_string(dir.join("timeline.svg")).unwrap();
    assert!(svg.matches("<polyline").count() >= 6);
    // The plotted series: (t, desired, ready).
    let csv = std::fs::read_to_string(dir.join("timeline.csv")).unwrap();
    let rows: Vec<(f64, u32, u32)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].parse().unwrap(),
                f[5].parse().unwrap(),
                f[6].parse().unwrap(),
            )
        })
        .collect();
    // The default burst runs from 10 s to 30 s.
    let before = rows
        .iter()
        .filter(|r| r.0 < 9.0)
        .map(|r| r.1)
        .max()
        .unwrap();
    let during = rows
        .iter()
        .filter(|r| (10.0..32.0).contains(&r.0))
        .map(|r| r.1)
        .max()
        .unwrap();
    let ready_during = rows
        .iter()
        .filter(|r| (10.0..34.0).contains(&r.0))
        .map(|r| r.2)
        .max()
        .unwrap();
    // Released once the burst has been gone for its hold (five cold starts
    // after the last need of the burst's count), before the run ends.
    let at_end = rows
        .iter()
        .filter(|r| r.0 > 50.0)
        .map(|r| r.1)
        .min()
        .unwrap();
    assert_eq!(before, 1, "{csv}");
    assert!(
        during > before,
        "replicas did not rise with the burst:\n{csv}"
    );
    assert!(ready_during > 1, "no new replica became ready:\n{csv}");
    assert!(
        at_end < during,
        "replicas did not fall after the burst:\n{csv}"
    );
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(md.contains("| requests | ok |"));
    // The run went through Kubernetes: scalecar's Events on the demo
    // Deployment, one per change, up with the burst and down after it.
    let events: Vec<&str> = md
        .lines()
        .filter(|l| l.contains("| Normal | SuccessfulRescale | New size: "))
        .collect();
    assert!(events.len() >= 2, "{md}");
    let size = |l: &str| -> u32 {
        l.split("New size: ")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        size(events[0]) > 1,
        "the first rescale is the burst's: {md}"
    );
    let last = rows.last().unwrap().1;
    assert_eq!(
        size(events[events.len() - 1]),
        last,
        "the last one ends it: {md}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
