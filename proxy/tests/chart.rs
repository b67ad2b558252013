//! The Helm chart: its values validate against its schema, the schema
//! refuses bad values, every `.Values` path a template reads exists in both,
//! the chart (schema plus templates/validate.yaml, as `helm` applies them)
//! refuses exactly the values whose rendered config the binary refuses, and
//! the dashboard and rules it ships are the ones in deploy/. Installs are in
//! install.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/scalecar")
}

fn yaml(path: PathBuf) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
        .unwrap()
}

fn errors(values: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    validator
        .iter_errors(values)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn the_default_values_validate_and_bad_ones_do_not() {
    let values = yaml(chart().join("values.yaml"));
    assert_eq!(errors(&values), Vec::<String>::new());
    for (path, bad) in [
        ("/replicaCount", json!(0)),
        ("/image/pullPolicy", json!("Sometimes")),
        ("/leaderElection/leaseDuration", json!("15 seconds")),
        ("/kubernetes/namespaces", json!(["Not_A_Namespace"])),
        ("/admin/port", json!(70000)),
        // The binary refuses a zero duration; so does the schema.
        ("/limits/queueWait", json!("0s")),
        ("/limits/shutdownGraceSeconds", json!(0)),
        // Non-root cannot bind under 1024 (the Service port may be 80).
        ("/containerPorts/http", json!(80)),
        ("/image/digest", json!("latest")),
        ("/fullnameOverride", json!("Not_A_Name")),
        ("/extraArgs", json!([1])),
        ("/podDisruptionBudget/maxUnavailable", json!("half")),
    ] {
        let mut v = values.clone();
        *v.pointer_mut(path).unwrap() = bad.clone();
        assert!(!errors(&v).is_empty(), "{path} = {bad} was accepted");
    }
    let mut v = values.clone();
    v["replicas"] = json!(3); // a misspelt key
    assert!(!errors(&v).is_empty(), "an unknown key was accepted");
    // As a subchart: the parent's `global` and a Service on port 80.
    let mut v = values.clone();
    v["global"] = json!({"imageRegistry": "mirror.example"});
    v["service"]["port"] = json!(80);
    v["limits"]["shutdownDelaySeconds"] = json!(0);
    assert_eq!(errors(&v), Vec::<String>::new());
}

/// `helm template` of `chart` with `values` on top of its defaults; the
/// rendered scalecar.yaml, or helm's error.
fn render_config(chart: &Path, values: &Value, dir: &Path) -> Result<String, String> {
    let file = dir.join("override.json");
    std::fs::write(&file, values.to_string()).unwrap();
    let bin = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let out = std::process::Command::new(&bin)
        .args(["template", "scalecar"])
        .arg(chart)
        .arg("-f")
        .arg(&file)
        .args(["--show-only", "templates/configmap.yaml"])
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/install-helm puts one in target/tools)"));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let map: Value = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    Ok(map["data"]["scalecar.yaml"].as_str().unwrap().to_string())
}

/// `{"a": {"b": v}}` from `a.b`.
fn nested(path: &str, v: Value) -> Value {
    path.rsplit('.').fold(v, |inner, key| json!({ key: inner }))
}

/// Field by field: a value the chart takes renders a config the binary
/// takes, and one the binary refuses the chart refuses at install, not as a
/// pod exiting with code 2. Where the chart is deliberately stricter, the
/// case says why.
#[test]
fn the_chart_refuses_what_the_binary_refuses() {
    let dir = std::env::temp_dir().join(format!("scalecar-chart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The same chart without its checks: what reaches the binary unchecked.
    let bare = dir.join("bare");
    std::fs::create_dir_all(bare.join("templates")).unwrap();
    for entry in walk(&chart()) {
        let rel = entry.strip_prefix(chart()).unwrap();
        if rel == Path::new("values.schema.json") || rel == Path::new("templates/validate.yaml") {
            continue;
        }
        let to = bare.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    let durations = [
        "scalerTick",
        "limits.queueWait",
        "limits.headerTimeout",
        "limits.bodyTimeout",
        "limits.requestTimeout",
        "limits.streamIdleTimeout",
        "limits.connectTimeout",
        "limits.activationTimeout",
        "limits.upstreamIdleTimeout",
        "kubernetes.apiTimeout",
        "peers.timeout",
    ];
    let mut cases: Vec<(String, Value)> = Vec::new();
    for d in durations {
        for v in [
            "1s", "750ms", "0s", "0ms", "24h", "25h", "1441m", "-1s", "soon",
        ] {
            cases.push((d.into(), json!(v)));
        }
    }
    for (path, values) in [
        (
            "workers",
            vec![json!(0), json!(4), json!(1024), json!(1025), json!(-1)],
        ),
        ("limits.queueLength", vec![json!(0), json!(10), json!(-1)]),
        (
            "limits.queueBytes",
            vec![json!(1024), json!(1023), json!(1 << 30)],
        ),
        (
            "limits.maxBodyBytes",
            vec![json!(1024), json!(100), json!("1Mi")],
        ),
        (
            "limits.shutdownDelaySeconds",
            vec![json!(0), json!(30), json!(-5)],
        ),
        ("limits.shutdownGraceSeconds", vec![json!(1), json!(0)]),
        (
            "kubernetes.namespaces",
            vec![
                json!(["llm", "a-b"]),
                json!(["LLM"]),
                json!(["-x"]),
                json!([""]),
            ],
        ),
        (
            "kubernetes.kinds",
            vec![
                json!([{"group": "leaderworkerset.x-k8s.io", "version": "v1", "kind": "LeaderWorkerSet", "plural": "leaderworkersets"}]),
                json!([{"group": "x_y", "version": "v1", "kind": "Model", "plural": "models"}]),
                json!([{"group": "x", "version": " ", "kind": "Model", "plural": "models"}]),
                json!([{"group": "x", "version": "v1", "kind": "model", "plural": "models"}]),
            ],
        ),
        ("kubernetes.managed", vec![json!(false), json!("maybe")]),
        (
            "leaderElection",
            vec![
                json!({"leaseDuration": "30s", "renewDeadline": "20s", "retryPeriod": "5s"}),
                json!({"leaseDuration": "15s", "renewDeadline": "15s", "retryPeriod": "2s"}),
                json!({"leaseDuration": "15s", "renewDeadline": "20s", "retryPeriod": "2s"}),
                json!({"leaseDuration": "15s", "renewDeadline": "10s", "retryPeriod": "10s"}),
                json!({"leaseDuration": "1m", "renewDeadline": "59s", "retryPeriod": "58000ms"}),
            ],
        ),
        (
            "peers.tokenSecret",
            vec![
                json!("my-token"),
                json!("a.b-c"),
                json!("Token"),
                json!("a_b"),
            ],
        ),
        ("fullnameOverride", vec![json!("gw"), json!("-gw")]),
        (
            "containerPorts.http",
            vec![json!(8000), json!(65535), json!(65536)],
        ),
        (
            "endpointPicker",
            vec![
                json!({"enabled": true, "port": 9002}),
                json!({"enabled": false}),
            ],
        ),
        ("containerPorts.extProc", vec![json!(9003)]),
    ] {
        for v in values {
            cases.push((path.into(), v));
        }
    }
    // Deliberately stricter than the binary: the chart takes one unit per
    // duration so templates/validate.yaml can compare them, no leading zero
    // (sprig reads 010 as octal), and ports a non-root process can bind.
    let stricter = [
        ("limits.queueWait", json!("1m30s")),
        ("limits.queueWait", json!("010s")),
        ("scalerTick", json!("2 s")),
        // A Lease may be named a.b; the Services of that name may not.
        ("fullnameOverride", json!("gw.x")),
        // YAML 1.1's yes: the binary reads a boolean; the chart wants one.
        ("kubernetes.managed", json!("yes")),
        ("containerPorts.http", json!(80)),
        ("containerPorts.extProc", json!(80)),
        ("endpointPicker.enabled", json!("yes")),
    ];
    let (mut taken, mut refused) = (0, 0);
    for (path, v) in &cases {
        let values = nested(path, v.clone());
        let chart_says = render_config(&chart(), &values, &dir);
        let binary_says = render_config(&bare, &values, &dir).and_then(|text| {
            scalecar_config::ScalecarConfig::from_yaml_str(&text).map_err(|e| e.to_string())
        });
        match (&chart_says, &binary_says) {
            (Ok(_), Ok(_)) => taken += 1,
            (Err(_), Err(_)) => refused += 1,
            (Ok(_), Err(e)) => panic!("{path} = {v}: the chart takes it, the binary refuses: {e}"),
            (Err(e), Ok(_)) => panic!("{path} = {v}: the binary takes it, the chart refuses: {e}"),
        }
    }
    assert!(
        taken >= 30 && refused >= 50,
        "{taken} taken, {refused} refused"
    );
    for (path, v) in stricter {
        let values = nested(path, v.clone());
        assert!(
            render_config(&chart(), &values, &dir).is_err(),
            "{path} = {v}"
        );
        let text = render_config(&bare, &values, &dir).unwrap();
        assert!(
            scalecar_config::ScalecarConfig::from_yaml_str(&text).is_ok(),
            "{path} = {v}: the binary refuses it too; take it out of the stricter list"
        );
    }
    // The chart's own rule: a grace shorter than the gateway's shutdown.
    let grace =
        |g: Value| render_config(&chart(), &json!({"terminationGracePeriodSeconds": g}), &dir);
    assert!(grace(json!(35)).is_ok());
    let short = grace(json!(34)).unwrap_err();
    assert!(short.contains("kubelet would kill streams"), "{short}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Every `.Values.a.b` a template reads.
fn value_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(".Values.") {
        let path: String = rest[at + 8..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
            .collect();
        rest = &rest[at + 8 + path.len()..];
        out.push(
            path.trim_end_matches('.')
                .split('.')
                .map(str::to_string)
                .collect(),
        );
    }
    out
}

#[test]
fn every_value_a_template_reads_is_in_values_and_schema() {
    let values = yaml(chart().join("values.yaml"));
    let schema = schema();
    let mut seen = 0;
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for p in value_paths(&text) {
            seen += 1;
            let mut v = &values;
            let mut s = &schema;
            for key in &p {
                v = v.get(key).unwrap_or_else(|| {
                    panic!(
                        "{}: .Values.{} not in values.yaml",
                        path.display(),
                        p.join(".")
                    )
                });
                s = s["properties"].get(key).unwrap_or_else(|| {
                    panic!(
                        "{}: .Values.{} not in the schema",
                        path.display(),
                        p.join(".")
                    )
                });
            }
        }
    }
    assert!(seen > 20, "only {seen} .Values reads found");
}

#[test]
fn the_chart_ships_the_dashboard_and_rules_of_deploy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(
        read(chart().join("dashboards/scalecar.json")),
        read(root.join("deploy/grafana/scalecar-dashboard.json")),
        "copy deploy/grafana/scalecar-dashboard.json into the chart"
    );
    assert_eq!(
        read(chart().join("rules/scalecar-rules.yml")),
        read(root.join("deploy/prometheus/scalecar-rules.yml")),
        "copy deploy/prometheus/scalecar-rules.yml into the chart"
    );
    let meta = yaml(chart().join("Chart.yaml"));
    assert_eq!(meta["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["apiVersion"], "v2");
}
