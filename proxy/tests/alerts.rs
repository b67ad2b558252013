//! What users observe with: the alert rules parse and fire as documented
//! (promtool's own rule tests with input series), the PrometheusRule in
//! deploy/base carries exactly the plain rules file's groups, and — against
//! a real Prometheus server scraping a live scalecar under load — every
//! dashboard query and every metric an alert names returns data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{get, model, proxy, sim};
use scalecar_loadtest::loadgen::{ArrivalPattern, RequestSize, StreamingClient, run_plan};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .expect("promtool is needed: install Debian's `prometheus` package (scripts/test does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_rules_pass_promtools_checks_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "scalecar-rules.yml"]);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "scalecar-rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_prometheus_rule_carries_the_same_groups() {
    let read = |p: PathBuf| -> serde_json::Value {
        serde_saphyr::from_str(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let plain = read(deploy().join("prometheus/scalecar-rules.yml"));
    let operator = read(deploy().join("components/prometheus-operator/prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"]["groups"], plain["groups"]);
    let alerts: Vec<&str> = plain["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        [
            "ScalecarTTFTAboveTarget",
            "ScalecarScaleErrors",
            "ScalecarAtMaxWhileQueueing",
            "ScalecarNoLeader",
            "ScalecarPeersMissing",
            "ScalecarAcceptFailures",
            "ScalecarAbsent"
        ]
    );
    // Each alert says what happened and links its runbook, which exists.
    let runbooks = std::fs::read_to_string(deploy().join("../docs/runbooks.md")).unwrap();
    for rule in plain["groups"][0]["rules"].as_array().unwrap() {
        let alert = rule["alert"].as_str().unwrap();
        let a = &rule["annotations"];
        assert!(
            a["description"].as_str().is_some_and(|d| d.len() > 40),
            "{alert}"
        );
        let url = a["runbook_url"].as_str().unwrap_or_default();
        let anchor = alert.to_lowercase();
        assert_eq!(
            url,
            format!("https://github.com/scalecar/scalecar/blob/main/docs/runbooks.md#{anchor}"),
            "{alert}"
        );
        assert!(
            runbooks.contains(&format!("\n## {alert}\n")),
            "docs/runbooks.md has no section for {alert}"
        );
    }
}

/// A Prometheus server scraping `target` every second, on a free port.
struct Prometheus {
    child: std::process::Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn prometheus(target: &str) -> Prometheus {
    let dir = std::env::temp_dir().join(format!("scalecar-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: scalecar\n    static_configs: [{{ targets: [\"{target}\"] }}]\n"
        ),
    )
    .unwrap();
    // Prometheus takes no port 0: a port the kernel just handed out.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus is needed: install Debian's `prometheus` package (scripts/test does)");
    let p = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("{}/-/ready", p.url)).await.map(|(s, _)| s) != Ok(200) {
        assert!(Instant::now() < deadline, "prometheus never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p
}

/// The instant query's result vector (status checked).
async fn query(p: &Prometheus, expr: &str) -> Vec<Value> {
    let url = format!(
        "{}/api/v1/query?query={}",
        p.url,
        form_urlencoded::byte_serialize(expr.as_bytes()).collect::<String>()
    );
    let (status, body) = get(&url).await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(status, 200, "{expr}: {body}");
    assert_eq!(v["status"], "success", "{expr}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn dashboard_expr(e: &str) -> String {
    e.replace("$namespace", ".*")
        .replace("$model", ".*")
        .replace("$role", ".*")
        .replace("$__rate_interval", "30s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_metric_returns_data_from_a_real_prometheus() {
    let s = sim(model("m")).await;
    let p = proxy(&format!(
        "scaler: {{ tick: 500ms }}\npools: [{{ model: m, endpoints: [\"{}\"], policy: {{ ttft-target: 1s, max-replicas: 8 }} }}]\n",
        s.local_addr()
    ))
    .await;
    let prom = prometheus(&p.admin_addr.to_string()).await;
    // loadgen's open-loop load: Poisson arrivals at 8 req/s for 12 s.
    let client = StreamingClient::new(
        &format!("http://{}", p.proxy_addr),
        "m",
        Duration::from_secs(30),
    )
    .unwrap();
    let pattern: ArrivalPattern = "poisson:8".parse().unwrap();
    let plan = pattern.plan(
        Duration::from_secs(12),
        RequestSize {
            prompt_tokens: 256,
            max_tokens: 24,
        },
        3,
    );
    let (records, _) = run_plan(&client, &plan, 64, None, std::future::pending()).await;
    assert!(records.len() >= 60, "{} requests", records.len());
    assert!(
        records
            .iter()
            .all(|r| r.outcome == scalecar_loadtest::loadgen::Outcome::Ok),
        "every request ok"
    );
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/scalecar-dashboard.json")).unwrap(),
    )
    .unwrap();
    // What Grafana needs to import it.
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "model", "role"]);
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = dashboard_expr(target["expr"].as_str().unwrap());
            let result = query(&prom, &expr).await;
            assert!(
                !result.is_empty(),
                "panel {:?}: {expr} returned no data",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} queries");
    // Template variables: the metric they read the labels of exists.
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            let selector = q
                .trim_start_matches("label_values(")
                .rsplit_once(',')
                .map(|(sel, _)| sel.to_string())
                .unwrap();
            let result = query(&prom, &dashboard_expr(&selector)).await;
            assert!(!result.is_empty(), "variable {}: {selector}", v["name"]);
        }
    }
    // Every alert: the expression evaluates, and every metric it names
    // has series (a typo in a metric name would silence it forever).
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(deploy().join("prometheus/scalecar-rules.yml")).unwrap(),
    )
    .unwrap();
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        query(&prom, expr).await;
        let mut rest = expr;
        while let Some(at) = rest.find("scalecar_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let result = query(&prom, &format!("count({name})")).await;
            assert!(
                !result.is_empty(),
                "alert {}: {name} has no series",
                rule["alert"]
            );
        }
    }
    common::teardown(&p).await;
}
