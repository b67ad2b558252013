//! The fuzz harnesses on a fixed budget, in every `cargo test`: first every
//! file in `fuzz/corpus/<harness>/` (seeds, and each crash libFuzzer found,
//! kept as a regression), then proptest cases — structured inputs built
//! from the formats' own keys and tricky values, and raw bytes.
//! `SCALECAR_FUZZ_CASES` sets the cases per harness (default 1500).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use scalecar_fuzz::HARNESSES;

fn cases() -> u32 {
    std::env::var("SCALECAR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn harness(name: &str) -> fn(&[u8]) {
    HARNESSES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("a harness of that name")
}

/// Every corpus file through its harness; the count, so a test can tell
/// the corpus is there.
fn corpus(name: &str) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let f = harness(name);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let run = std::panic::catch_unwind(|| f(&data));
        assert!(run.is_ok(), "{} fails its harness", path.display());
        n += 1;
    }
    n
}

fn run(name: &str, structured: impl Strategy<Value = Vec<u8>>) {
    assert!(corpus(name) > 0, "no corpus for {name}");
    let f = harness(name);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let inputs = prop_oneof![
        3 => structured,
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ];
    runner
        .run(&inputs, |data| {
            f(&data);
            Ok(())
        })
        .unwrap();
}

/// Values that have broken parsers before, or might.
fn tricky() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("0".into()),
        Just("-1".into()),
        Just("1e309".into()),
        Just("NaN".into()),
        Just("inf".into()),
        Just("18446744073709551615s".into()),
        Just("99999999999999999999".into()),
        Just("0.000001".into()),
        Just("10s".into()),
        Just("2m".into()),
        Just("100%".into()),
        Just("kpa".into()),
        Just("slo".into()),
        Just("true".into()),
        Just(" 5 ".into()),
        Just("\u{0}".into()),
        Just("∞".into()),
        "[0-9]{1,25}(\\.[0-9]{1,5})?(ms|s|m|h|%)?",
        ".{0,12}",
    ]
}

fn policy_lines() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        4 => prop::sample::select(scalecar_config::POLICY_KEYS.to_vec()).prop_map(String::from),
        1 => "[a-z-]{1,20}",
    ];
    prop::collection::vec((key, tricky()), 0..12).prop_map(|kv| {
        let mut lines: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.push("model=m".into());
        lines.join("\n").into_bytes()
    })
}

#[test]
fn policy_keys() {
    run("policy_keys", policy_lines());
}

#[test]
fn config_file() {
    let limit = prop::sample::select(vec![
        "max-header-bytes",
        "max-body-bytes",
        "header-timeout",
        "body-timeout",
        "request-timeout",
        "connect-timeout",
        "queue-length",
        "queue-wait",
        "shutdown-grace",
        "activation-timeout",
        "health-check-interval",
        "upstream-idle-timeout",
        "max-ejection-percent",
    ]);
    let yaml = (
        prop::collection::vec((limit, tricky()), 0..6),
        tricky(),
        prop::collection::vec(tricky(), 0..3),
        prop::collection::vec(
            (
                prop::sample::select(scalecar_config::POLICY_KEYS.to_vec()),
                tricky(),
            ),
            0..4,
        ),
        tricky(),
    )
        .prop_map(|(limits, model, endpoints, policy, tick)| {
            let q = |s: &str| serde_json::to_string(s).unwrap();
            let limits: Vec<String> = limits.iter().map(|(k, v)| format!("{k}: {}", q(v))).collect();
            let endpoints: Vec<String> = endpoints.iter().map(|e| q(e)).collect();
            let policy: Vec<String> = policy.iter().map(|(k, v)| format!("{k}: {}", q(v))).collect();
            format!(
                "limits: {{ {} }}\nscaler: {{ tick: {} }}\npools:\n  - model: {}\n    endpoints: [{}]\n    policy: {{ {} }}\n",
                limits.join(", "),
                q(&tick),
                model,
                endpoints.join(", "),
                policy.join(", ")
            )
            .into_bytes()
        });
    run("config_file", yaml);
}

#[test]
fn request_body() {
    let value = prop_oneof![
        tricky().prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("7".to_string()),
        Just("\"\\u0000\\ud800\"".to_string()),
        // Media parts: data URLs whole, empty and cut short.
        tricky().prop_map(|s| format!(
            "[{{\"content\":[{{\"image_url\":{{\"url\":\"data:image/png;base64,{}\"}}}}]}}]",
            s.replace(['"', '\\'], "")
        )),
        Just("[{\"url\":\"data:;base64,\"},{\"url\" : \"data:x;base64,QUJD\"}]".to_string()),
        Just("[{\"url\":\"data:x;base64,QUJD".to_string()),
        // Audio and file parts: raw base64 of any length, whole and cut short.
        (tricky(), 0usize..1500).prop_map(|(s, n)| format!(
            "[{{\"input_audio\":{{\"data\":\"{}{}\"}}}},{{\"file_data\":\"data:x;base64,{}\"}}]",
            "A".repeat(n),
            s.replace(['"', '\\'], ""),
            s.replace(['"', '\\'], "")
        )),
        Just("[{\"input_audio\":{\"data\": \"QUJD".to_string()),
    ];
    let field = prop::sample::select(vec!["model", "stream", "messages", "prompt", "input", "x"]);
    let body =
        (prop::collection::vec((field, value), 0..6), any::<bool>()).prop_map(|(fields, array)| {
            let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            if array {
                format!("[{}]", inner.join(",")).into_bytes()
            } else {
                format!("{{{}}}", inner.join(",")).into_bytes()
            }
        });
    run("request_body", body);
}

#[test]
fn sse_frames() {
    let event = prop_oneof![
        Just("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}".to_string()),
        Just("data:[DONE]".to_string()),
        Just(": keep-alive".to_string()),
        Just("event: x\ndata: y".to_string()),
        Just("data: a\r\ndata: b".to_string()),
        ".{0,20}",
    ];
    let sep = prop::sample::select(vec!["\n\n", "\r\n\r\n", "\r\r", "\n\r\n", "\r\n\n", "\n"]);
    let stream =
        (any::<u8>(), prop::collection::vec((event, sep), 0..10)).prop_map(|(seed, parts)| {
            let mut out = vec![seed];
            for (e, s) in parts {
                out.extend_from_slice(e.as_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            out
        });
    run("sse_frames", stream);
}

#[test]
fn engine_metrics() {
    let value = prop_oneof![
        (0u64..1_000_000).prop_map(|n| n.to_string()),
        Just("None".to_string()),
        Just("-1".to_string()),
        Just("1e300".to_string()),
        Just("18446744073709551616".to_string()),
        Just("a}b\\\"c".to_string()),
        ".{0,6}",
    ];
    let label = (
        prop::sample::select(vec!["block_size", "num_gpu_blocks", "model_name", "x"]),
        value.clone(),
    )
        .prop_map(|(k, v)| format!("{k}=\"{v}\""));
    let line = prop_oneof![
        prop::collection::vec(label, 0..4)
            .prop_map(|ls| format!("vllm:cache_config_info{{{}}} 1.0", ls.join(","))),
        value.prop_map(|v| format!("sglang:max_total_num_tokens {v}")),
        Just("# TYPE vllm:cache_config_info gauge".to_string()),
        ".{0,30}",
    ];
    let page = prop::collection::vec(line, 0..6).prop_map(|ls| ls.join("\n").into_bytes());
    run("engine_metrics", page);
}

#[test]
fn trace_file() {
    let stamp = prop_oneof![
        (0u32..86_400, 0u32..1_000_000).prop_map(|(s, f)| format!(
            "2024-05-10 {:02}:{:02}:{:02}.{f:06}",
            s / 3600,
            s / 60 % 60,
            s % 60
        )),
        Just("2024-05-10 00:00:00.009930+00:00".to_string()),
        Just("2024-05-10T23:59:59Z".to_string()),
        Just("2024-05-10 01:00:00-14:00".to_string()),
        Just("9999-12-31 23:59:60.999999999+23:59".to_string()),
        Just("0000-01-01 00:00:00".to_string()),
        ".{0,12}",
    ];
    let number = prop_oneof![
        (0u32..200_000).prop_map(|n| n.to_string()),
        Just("4294967296".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("1e300".to_string()),
        Just("18446744073709551615".to_string()),
        Just("\"7\"".to_string()),
    ];
    let csv =
        prop::collection::vec((stamp, number.clone(), number.clone()), 0..6).prop_map(|rows| {
            let mut out = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\n");
            for (t, c, g) in rows {
                out.push_str(&format!("{t},{c},{g}\n"));
            }
            out.into_bytes()
        });
    let jsonl =
        prop::collection::vec((number.clone(), number.clone(), number), 0..6).prop_map(|rows| {
            let mut out = String::new();
            for (t, i, o) in rows {
                out.push_str(&format!(
                    "{{\"timestamp\": {t}, \"input_length\": {i}, \"output_length\": {o}}}\n"
                ));
            }
            out.into_bytes()
        });
    let first = any::<u8>();
    let trace = (first, prop_oneof![csv, jsonl]).prop_map(|(f, mut body)| {
        body.insert(0, f);
        body
    });
    run("trace_file", trace);
}

#[test]
fn replay_input() {
    let number = prop_oneof![
        (0u32..100_000).prop_map(|n| n.to_string()),
        Just("1e300".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("\"5\"".to_string()),
        Just("null".to_string()),
        Just("18446744073709551616".to_string()),
    ];
    let key = prop::sample::select(vec![
        "concurrency",
        "rps",
        "queue",
        "tokens",
        "ttft_ms",
        "itl_ms",
        "stable",
        "panic",
        "x",
    ]);
    let line = (
        number.clone(),
        number,
        prop::collection::vec((key, (0u32..1000)), 0..3),
    );
    let input = prop::collection::vec(line, 0..8).prop_map(|lines| {
        let mut t = 0u64;
        lines
            .into_iter()
            .map(|(dt, ready, fields)| {
                t += 1;
                let extra: String = fields
                    .iter()
                    .map(|(k, v)| format!(",\"{k}\":{v}"))
                    .collect();
                let t_field = if dt.len() > 4 { dt } else { t.to_string() };
                format!("{{\"t\":{t_field},\"ready\":{ready}{extra}}}\n")
            })
            .collect::<String>()
            .into_bytes()
    });
    run("replay_input", input);
}

#[test]
fn kube_objects() {
    let annotation = (
        prop::sample::select(scalecar_config::POLICY_KEYS.to_vec()),
        tricky(),
    );
    let workload =
        (prop::collection::vec(annotation, 0..5), tricky()).prop_map(|(ann, replicas)| {
            let mut map = serde_json::Map::new();
            map.insert("scalecar.io/model".into(), "m".into());
            for (k, v) in ann {
                map.insert(format!("scalecar.io/{k}"), v.into());
            }
            let mut out = vec![0u8];
            out.extend(
                serde_json::json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "d", "namespace": "n", "annotations": map},
                    "spec": {"replicas": replicas.parse::<i64>().unwrap_or(-1)},
                })
                .to_string()
                .into_bytes(),
            );
            out
        });
    let selector = prop::collection::vec(
        prop_oneof![
            "[a-z]{1,5}=[a-z0-9]{0,5}",
            "[a-z]{1,5}!=[a-z]{1,3}",
            "![a-z]{1,5}",
            "[a-z]{1,5} (in|notin) \\(([a-z]{1,3}, ?){0,2}[a-z]{0,3}\\)",
            ".{0,6}",
        ],
        0..4,
    )
    .prop_map(|parts| {
        let mut out = vec![2u8];
        out.extend(parts.join(",").into_bytes());
        out
    });
    run("kube_objects", prop_oneof![workload, selector]);
}
