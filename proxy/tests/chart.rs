//! The Helm chart without a helm binary (none can be installed here): its
//! values validate against its schema, the schema refuses bad values, every
//! `.Values` path a template reads exists in both, and the dashboard and
//! rules it ships are the ones in deploy/.
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
