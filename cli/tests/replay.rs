//! `scalecar replay` as users run it: the real binary, stdin and stdout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

fn replay(args: &[&str], input: &str) -> (i32, Vec<Value>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .arg("replay")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        lines,
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn window_values_run_the_algorithm_per_line() {
    let input = r#"{"t": 0, "ready": 1, "stable": 10, "panic": 10}
{"t": 2, "ready": 1, "stable": 10, "panic": 80}
{"t": 4, "ready": 8, "stable": 5, "panic": 5}
{"t": 70, "ready": 8, "stable": 5, "panic": 5}
"#;
    let (code, out, err) = replay(
        &[
            "--set",
            "algorithm=kpa",
            "--set",
            "target=10",
            "--set",
            "target-utilization-percentage=100",
        ],
        input,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), 4);
    for line in &out {
        for key in [
            "t",
            "ready",
            "desired",
            "applied",
            "panic",
            "stable",
            "panic_value",
            "target",
            "reason",
        ] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
    }
    assert_eq!(out[0]["desired"], 1);
    assert_eq!(
        (out[1]["desired"].as_u64(), out[1]["panic"].as_bool()),
        (Some(8), Some(true))
    );
    assert!(out[1]["reason"].as_str().unwrap().contains("(panic)"));
    // In panic the count holds; a stable window after the last panic tick
    // it falls, by at most half of the ready pods.
    assert_eq!(out[2]["desired"], 8);
    assert_eq!(
        (out[3]["desired"].as_u64(), out[3]["panic"].as_bool()),
        (Some(4), Some(false))
    );
}

#[test]
fn samples_go_through_the_real_windows_every_tick() {
    let mut input = String::new();
    for t in 0..20 {
        let c = if (5..10).contains(&t) { 40.0 } else { 2.0 };
        input.push_str(&format!("{{\"t\": {t}, \"ready\": 1, \"concurrency\": {c}, \"rps\": 3, \"ttft_ms\": [350, 420]}}\n"));
    }
    let dir = std::env::temp_dir().join(format!("scalecar-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "algorithm: kpa\ntarget: 10\ntarget-utilization-percentage: 100\nwindow: 10s\n",
    )
    .unwrap();
    let (code, out, err) = replay(
        &["--policy", policy.to_str().unwrap(), "--tick", "2s"],
        &input,
    );
    assert_eq!(code, 0, "{err}");
    // Ticks at 0, 2, …, 20 (the last sample holds for its second).
    let ts: Vec<f64> = out.iter().map(|l| l["t"].as_f64().unwrap()).collect();
    assert_eq!(ts, (0..=10).map(|i| f64::from(i * 2)).collect::<Vec<_>>());
    assert!(
        out[0]["desired"].is_null(),
        "no data at the first tick: {}",
        out[0]
    );
    // The burst (40 in flight from t=5) is seen at the tick of t=6 through
    // the panic window (1 s): ceil(40 / 10) = 4.
    assert_eq!(out[3]["desired"], 4, "{}", out[3]);
    assert_eq!(out[3]["panic"], true);
    // The exact time-weighted stable average at t=8: 5 s at 2, 3 s at 40, over 8 s.
    let stable = out[4]["stable"].as_f64().unwrap();
    assert!(
        (stable - (5.0 * 2.0 + 3.0 * 40.0) / 8.0).abs() < 1e-9,
        "{stable}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn identical_input_gives_identical_output() {
    let input = "{\"t\": 0, \"ready\": 2, \"concurrency\": 7.5, \"rps\": 2.5, \"queue\": 1.5, \"tokens\": 3000}\n\
                 {\"t\": 1, \"ready\": 2, \"concurrency\": 9, \"itl_ms\": [20]}\n";
    let a = replay(&["--set", "metric=tokens", "--set", "target=1000"], input);
    let b = replay(&["--set", "metric=tokens", "--set", "target=1000"], input);
    assert_eq!(a.0, 0, "{}", a.2);
    assert_eq!(a.1, b.1);
}

#[test]
fn bad_input_names_the_line_and_exits_2() {
    for (input, needle) in [
        (
            "{\"t\": 0, \"ready\": 1, \"stable\": 1, \"panic\": 1}\nnot json\n",
            "line 2: not a JSON object",
        ),
        (
            "{\"t\": 3, \"ready\": 1, \"stable\": 1, \"panic\": 1}\n{\"t\": 2, \"ready\": 1, \"stable\": 1, \"panic\": 1}\n",
            "line 2: t 2 goes back from 3",
        ),
        (
            "{\"t\": 0, \"ready\": 1, \"stable\": 1, \"panic\": 1, \"colour\": 2}\n",
            "line 1: unknown key \"colour\"",
        ),
        (
            "{\"t\": 0, \"ready\": 1, \"stable\": 1, \"concurrency\": 1}\n",
            "line 1: mixes window values",
        ),
        (
            "{\"t\": 0, \"ready\": 1, \"stable\": 1}\n",
            "line 1: window values need \"panic\"",
        ),
        (
            "{\"t\": 0, \"ready\": -1, \"stable\": 1, \"panic\": 1}\n",
            "line 1: \"ready\"",
        ),
        (
            "{\"t\": 0, \"ready\": 1, \"concurrency\": -4}\n",
            "line 1: \"concurrency\": -4 is not a number",
        ),
        (
            "{\"t\": 0, \"ready\": 1, \"ttft_ms\": [\"x\"]}\n",
            "line 1: \"ttft_ms\"",
        ),
        (
            "{\"t\": 0, \"ready\": 1, \"stable\": 1, \"panic\": 1}\n{\"t\": 1, \"ready\": 1, \"rps\": 1}\n",
            "line 2: mixes window values and samples",
        ),
        // Was a panic (exit 101): a duration out of range.
        (
            "{\"t\": 1e300, \"ready\": 1, \"stable\": 1, \"panic\": 1}\n",
            "line 1: \"t\": 1e300 is more than 1e9 seconds",
        ),
        (
            "{\"t\": 0, \"ready\": 1}\n",
            "line 1: neither window values",
        ),
        // Was hours of CPU: a decision every tick across the gap.
        (
            "{\"t\": 0, \"ready\": 1, \"rps\": 1}\n{\"t\": 9000000, \"ready\": 1, \"rps\": 1}\n",
            "line 2: t jumps 9e6 s from 0 (more than a day between samples",
        ),
    ] {
        let (code, _, err) = replay(&[], input);
        assert_eq!(code, 2, "{input}");
        assert!(err.contains(needle), "{input:?}: {err}");
    }
    let (code, _, err) = replay(&["--set", "max-replica=3"], "");
    assert_eq!(code, 2);
    assert!(err.contains("did you mean max-replicas?"), "{err}");
    let (code, _, err) = replay(&["--set", "algorithm=magic"], "");
    assert_eq!(code, 2);
    assert!(
        err.contains("algorithm \"magic\" is not registered"),
        "{err}"
    );
    let (code, _, err) = replay(&["--policy", "/nonexistent/policy.yaml"], "");
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/policy.yaml"), "{err}");
}

#[test]
fn help_explains_both_formats_with_an_example() {
    let out = Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .args(["replay", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "Window values",
        "Per-second samples",
        "EXAMPLE",
        "scalecar replay --set",
    ] {
        assert!(text.contains(needle), "{needle} not in --help:\n{text}");
    }
}
