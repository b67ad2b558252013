//! The alert rules users install: they parse and fire as documented
//! (promtool's own rule tests with input series), and the PrometheusRule
//! in deploy/base carries exactly the plain rules file's groups.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

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
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
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
    let operator = read(deploy().join("base/prometheusrule.yaml"));
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
            "ScalecarPeersMissing"
        ]
    );
}
