//! `scalecar simulate` as users run it: the real binary on trace files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scalecar-simulate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The first `n` requests of the Azure conv trace (about a minute and a half).
fn azure_head(dir: &Path, n: usize) -> PathBuf {
    let full =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/data/azure-llm-2023-conv.csv");
    let text = std::fs::read_to_string(full).unwrap();
    let head: Vec<&str> = text.lines().take(n + 1).collect();
    let path = dir.join("head.csv");
    std::fs::write(&path, head.join("\n") + "\n").unwrap();
    path
}

fn simulate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .arg("simulate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `simulate` of `trace` with `args`, its report into `out`: it must
/// succeed.
fn simulate_into(trace: &Path, out: &Path, args: &[&str]) {
    let mut all = vec![
        "--trace",
        trace.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let (code, _, stderr) = simulate(&all);
    assert_eq!(code, 0, "{args:?}: {stderr}");
}

#[test]
fn a_trace_gives_a_summary_a_report_and_the_same_bytes_twice() {
    let dir = temp_dir("report");
    let trace = azure_head(&dir, 400);
    let out = dir.join("report");
    let args = [
        "--trace",
        trace.to_str().unwrap(),
        "--algorithm",
        "kpa",
        "--set",
        "target=4",
        "--startup-delay",
        "20s",
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = simulate(&args);
    assert_eq!(code, 0, "{stderr}");
    let s: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(s["requests"], 400);
    assert_eq!(s["algorithm"], "kpa");
    let attainment = s["ttft_attainment"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&attainment), "{s}");
    let p50 = s["ttft_p50"].as_f64().unwrap();
    let p99 = s["ttft_p99"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p99, "{s}");
    assert!(s["itl_p90"].as_f64().unwrap() > 0.0, "{s}");
    let rs = s["replica_seconds"].as_f64().unwrap();
    let oracle = s["oracle_replica_seconds"].as_f64().unwrap();
    // At least one replica over the whole span, never more than 64.
    let span = s["trace_seconds"].as_f64().unwrap();
    assert!(rs >= span - 1e-6 && rs <= 64.0 * span, "{s}");
    assert!(oracle > 0.0, "{s}");
    let ratio = s["ratio_to_oracle"].as_f64().unwrap();
    assert!((ratio - rs / oracle).abs() < 0.001, "{s}");
    assert!(s["max_replicas_used"].as_u64().unwrap() >= 1);
    // The yardsticks: the constant count meets the goal and costs no less
    // than the oracle (one of the schedules the oracle chose from); the
    // oracle's schedule without foresight is a measured run too.
    let n = s["constant_replicas"].as_u64().unwrap();
    assert!((1..=64).contains(&n), "{s}");
    assert!(
        s["constant_ttft_attainment"].as_f64().unwrap() >= 0.99,
        "{s}"
    );
    let constant = s["constant_replica_seconds"].as_f64().unwrap();
    assert!(constant >= oracle - 1e-6, "{s}");
    assert!((constant - n as f64 * span).abs() <= 0.1 + 1e-6, "{s}");
    let reactive = s["reactive_oracle_ttft_attainment"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&reactive), "{s}");
    assert!(
        s["reactive_oracle_replica_seconds"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    for file in [
        "summary.json",
        "timeline.csv",
        "timeline.svg",
        "replicas.svg",
        "decisions.jsonl",
        "oracle.csv",
    ] {
        let meta = std::fs::metadata(out.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(meta.len() > 0, "{file} is empty");
    }
    let decisions = std::fs::read_to_string(out.join("decisions.jsonl")).unwrap();
    let decided: Vec<Value> = decisions
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One per tick, and kpa's reasons once there is data.
    assert!(decided.len() >= (span / 2.0) as usize, "{}", decided.len());
    assert!(
        decided
            .iter()
            .any(|d| d["reason"].as_str().unwrap().contains("concurrency")),
        "{decisions}"
    );
    // Virtual time only: the same input prints the same bytes.
    let (_, again, _) = simulate(&args);
    assert_eq!(stdout, again);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_lines_traces_are_read_too() {
    let dir = temp_dir("jsonl");
    let lines: Vec<String> = (0..120)
        .map(|i| {
            format!(
                r#"{{"timestamp": {}, "input_length": {}, "output_length": {}}}"#,
                i * 250,
                200 + 37 * i,
                20 + i % 50
            )
        })
        .collect();
    let trace = dir.join("trace.jsonl");
    std::fs::write(&trace, lines.join("\n") + "\n").unwrap();
    let (code, stdout, stderr) = simulate(&[
        "--trace",
        trace.to_str().unwrap(),
        "--algorithm",
        "slo",
        "--set",
        "target=3000",
        "--no-oracle",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let s: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(s["requests"], 120);
    assert!(s["oracle_replica_seconds"].is_null());
    assert!(s["constant_replicas"].is_null());
    assert!(s["reactive_oracle_ttft_attainment"].is_null());
    // 30 s of trace: 119 gaps of 250 ms.
    assert!(
        (s["trace_seconds"].as_f64().unwrap() - 29.75).abs() < 1e-6,
        "{s}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_trace_written_as_azure_2024_runs_as_the_same_requests() {
    // The 2024 files' timestamps carry a zone (`+00:00`); a row out of time
    // order is replayed in order, and said so.
    let dir = temp_dir("zones");
    let plain = azure_head(&dir, 60);
    let text = std::fs::read_to_string(&plain).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for line in lines.iter_mut().skip(1) {
        let (stamp, rest) = line.split_once(',').unwrap();
        *line = format!("{}+00:00,{rest}", &stamp[..26]);
    }
    // Two rows swapped: each of them lands after a later one.
    lines.swap(20, 40);
    let zoned = dir.join("zoned.csv");
    std::fs::write(&zoned, lines.join("\n") + "\n").unwrap();
    let run = |path: &Path| {
        let (code, stdout, stderr) = simulate(&[
            "--trace",
            path.to_str().unwrap(),
            "--algorithm",
            "slo",
            "--no-oracle",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let s: Value = serde_json::from_str(&stdout).unwrap();
        (s, stderr)
    };
    let (a, quiet) = run(&plain);
    let (b, told) = run(&zoned);
    assert!(!quiet.contains("time order"), "{quiet}");
    assert!(
        told.contains("zoned.csv: 2 rows earlier than the row before them"),
        "{told}"
    );
    for key in [
        "requests",
        "trace_seconds",
        "replica_seconds",
        "ttft_attainment",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(a["requests"], 60);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_exits_2_and_says_what_was_wrong() {
    let dir = temp_dir("bad");
    let trace = dir.join("bad.csv");
    std::fs::write(
        &trace,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47,many,44\n",
    )
    .unwrap();
    let (code, stdout, stderr) = simulate(&["--trace", trace.to_str().unwrap(), "--no-oracle"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("bad.csv") && stderr.contains("line 3"),
        "{stderr}"
    );

    let good = azure_head(&dir, 10);
    let (code, _, stderr) = simulate(&["--trace", good.to_str().unwrap(), "--set", "tagret=4"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("policy") && stderr.contains("tagret"),
        "{stderr}"
    );

    let (code, _, stderr) = simulate(&["--trace", good.to_str().unwrap(), "--gpu", "a100"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a GPU profile"), "{stderr}");

    // A cold start of 584 years overflowed an instant; a tick of 0 never ends.
    for (flag, value, needle) in [
        (
            "--startup-delay",
            "18446744073709551615s",
            "--startup-delay: must be at most 24h",
        ),
        ("--tick", "0s", "--tick: must be longer than 0"),
        ("--warmup", "30d", "--warmup: must be at most 24h"),
        (
            "--new-leader-every",
            "0s",
            "--new-leader-every: must be longer than 0",
        ),
    ] {
        let (code, _, stderr) = simulate(&["--trace", good.to_str().unwrap(), flag, value]);
        assert_eq!(code, 2, "{flag} {value}: {stderr}");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
    }

    // Forgetting needs new leaders to forget with.
    let (code, _, stderr) = simulate(&["--trace", good.to_str().unwrap(), "--no-leader-memory"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--new-leader-every"), "{stderr}");

    // Timestamps in seconds read as milliseconds' worth of years.
    let far = dir.join("far.jsonl");
    std::fs::write(
        &far,
        "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 5}\n{\"timestamp\": 1700000000000, \"input_length\": 10, \"output_length\": 5}\n",
    )
    .unwrap();
    let (code, _, stderr) = simulate(&["--trace", far.to_str().unwrap(), "--no-oracle"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("more than the 31 days"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_generated_shape_runs_and_infeasible_requests_are_counted_apart() {
    // Long-context bursts on the 70B replica with a 1 s target: a prompt
    // of more than ~5,600 tokens cannot prefill in time alone, and one
    // over the 40,000-token KV cache never gets a first token.
    let args = [
        "--shape",
        "long-context-bursts",
        "--seed",
        "3",
        "--length",
        "5m",
        "--gpu",
        "2xh100-llama-70b",
        "--ttft-target",
        "1s",
        "--no-oracle",
    ];
    let (code, stdout, stderr) = simulate(&args);
    assert_eq!(code, 0, "{stderr}");
    let s: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(s["trace"], "long-context-bursts (seed 3)");
    // slo is the default.
    assert_eq!(s["algorithm"], "slo");
    let requests = s["requests"].as_u64().unwrap();
    let infeasible = s["infeasible"].as_u64().unwrap();
    assert!(infeasible > requests / 4 && infeasible < requests, "{s}");
    // An infeasible request never meets the target: attainment over the
    // feasible ones is the plain one scaled up by exactly their share.
    let all = s["ttft_attainment"].as_f64().unwrap();
    let feasible = s["feasible_ttft_attainment"].as_f64().unwrap();
    let scaled = all * requests as f64 / (requests - infeasible) as f64;
    assert!((feasible - scaled).abs() < 1e-4, "{s}");
    // Seeded: the same seed, the same bytes; another seed, another trace.
    let (_, again, _) = simulate(&args);
    assert_eq!(stdout, again);
    let mut other = args;
    other[3] = "4";
    let (_, other_out, _) = simulate(&other);
    assert_ne!(stdout, other_out);
    // A trace and a shape, or neither: exit 2 with the reason.
    let (code, _, stderr) = simulate(&["--shape", "diurnal", "--trace", "x.csv"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let (code, _, stderr) = simulate(&["--no-oracle"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--trace"), "{stderr}");
    let (code, _, stderr) = simulate(&["--shape", "sawtooth"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a traffic shape"), "{stderr}");
}

#[test]
fn new_leaders_start_from_memory_unless_told_to_forget() {
    let dir = temp_dir("leaders");
    let trace = azure_head(&dir, 200);
    let summary = |extra: &[&str]| -> Value {
        let out = dir.join(format!("out-{}", extra.len()));
        let mut args = vec!["--algorithm", "slo", "--no-oracle", "--warmup", "0s"];
        args.extend_from_slice(extra);
        simulate_into(&trace, &out, &args);
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
    };
    let plain = summary(&[]);
    assert!(plain.get("leader_memory").is_none(), "{plain}");
    let kept = summary(&["--new-leader-every", "20s"]);
    assert_eq!(kept["new_leader_every_s"], 20.0, "{kept}");
    assert_eq!(kept["leader_memory"], true, "{kept}");
    let forgot = summary(&["--new-leader-every", "20s", "--no-leader-memory"]);
    assert_eq!(forgot["leader_memory"], false, "{forgot}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_warm_up_decisions_are_recorded_when_asked_at_negative_times() {
    let dir = temp_dir("warmup-decisions");
    let trace = azure_head(&dir, 400);
    let decisions = |name: &str, extra: &[&str]| -> Vec<Value> {
        let out = dir.join(name);
        let mut args = vec!["--warmup", "60s", "--no-oracle"];
        args.extend_from_slice(extra);
        simulate_into(&trace, &out, &args);
        std::fs::read_to_string(out.join("decisions.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let t = |d: &Value| d["t"].as_f64().unwrap();
    let measured = decisions("measured", &[]);
    let all = decisions("all", &["--warmup-decisions"]);
    assert!(measured.iter().all(|d| t(d) >= 0.0), "{measured:?}");
    // The warm-up's ticks come first, from a minute before the start.
    let first = t(&all[0]);
    assert!((-60.0..-50.0).contains(&first), "{first}");
    assert!(all.windows(2).all(|w| t(&w[0]) < t(&w[1])));
    // Recording them changes nothing that is measured.
    let after: Vec<&Value> = all.iter().filter(|d| t(d) >= 0.0).collect();
    assert_eq!(after.len(), measured.len());
    assert!(after.iter().zip(&measured).all(|(a, m)| *a == m));
    std::fs::remove_dir_all(&dir).unwrap();
}
