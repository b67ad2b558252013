//! Fuzz harnesses: one function per input boundary, each taking arbitrary
//! bytes. A harness panics only when it finds a bug — a panic in the code
//! under test, or a broken invariant it checks (an error without a
//! message, a result that depends on how a stream was split).
//!
//! The same functions run under libFuzzer (`fuzz/libfuzzer`, `scripts/fuzz`)
//! with coverage feedback for long runs, and under proptest in `cargo test`
//! for a fixed budget (`fuzz/tests/budget.rs`), over the seeds and every
//! crash found so far in `fuzz/corpus/<harness>/`.
//!
//! Not here: the HTTP layer itself (hyper's), and anything needing a
//! runtime — each harness is synchronous and pure.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness's failure is a panic

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use scalecar_config::{Policy, Role, ScalecarConfig};
use scalecar_proxy::sse::{MAX_CARRIED_EVENT, SseFramer};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::kube::{LabelSelector, PodInfo, Workload};

/// A harness: arbitrary bytes in, a panic only on a bug.
pub type Harness = fn(&[u8]);

/// Every harness by name, as `scripts/fuzz` and the corpus folders name
/// them.
pub const HARNESSES: [(&str, Harness); 8] = [
    ("policy_keys", policy_keys),
    ("config_file", config_file),
    ("request_body", request_body),
    ("sse_frames", sse_frames),
    ("replay_input", replay_input),
    ("kube_objects", kube_objects),
    ("engine_metrics", engine_metrics),
    ("trace_file", trace_file),
];

/// A trace for `simulate`, `loadgen` and `demo`, read as an Azure CSV and
/// as JSON lines: either an error with a message, or arrivals from 0 that
/// never go back in time.
pub fn trace_file(data: &[u8]) {
    use scalecar_loadtest::loadgen::{Trace, read_jsonl_trace, read_trace};
    let speedup = f64::from(data.first().copied().unwrap_or(1).max(1)) / 16.0;
    for read in [read_trace, read_jsonl_trace] {
        match read(data, "t", speedup) {
            Ok(Trace { arrivals, .. }) => {
                assert_eq!(arrivals.first().map(|a| a.at), Some(Duration::ZERO));
                assert!(
                    arrivals.windows(2).all(|w| w[0].at <= w[1].at),
                    "out of order"
                );
                assert!(arrivals.iter().all(|a| a.max_tokens >= 1));
            }
            Err(e) => assert!(!e.to_string().is_empty(), "an error without a message"),
        }
    }
}

/// A model server's `/metrics` page, read for its KV cache size. Lines are
/// read on their own: the page's size is the smallest of its lines' sizes,
/// and no size is 0.
pub fn engine_metrics(data: &[u8]) {
    let page = String::from_utf8_lossy(data);
    let whole = scalecar_proxy::engine_metrics::kv_capacity(&page);
    let by_line = page
        .lines()
        .filter_map(scalecar_proxy::engine_metrics::kv_capacity)
        .min();
    assert_eq!(whole, by_line, "the page's size is not its lines'");
    assert_ne!(whole, Some(0));
}

/// `key=value` lines as policy keys (a file's `policy:` map, `--set`) and,
/// with the `scalecar.io/` prefix, as a workload's annotations.
pub fn policy_keys(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let keys: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for role in Role::ALL {
        if let Err(e) = Policy::from_keys(&keys, role) {
            assert!(!e.to_string().is_empty(), "an error without a message");
        }
    }
    let annotations: BTreeMap<String, String> = keys
        .iter()
        .map(|(k, v)| (format!("{}{k}", scalecar_config::PREFIX), v.clone()))
        .collect();
    match Policy::from_annotations(&annotations) {
        Ok(t) => {
            assert!(!t.model.is_empty(), "a target without a model: {keys:?}");
            let _ = t.policy.validate_algorithm(&["kpa", "hpa", "slo"]);
        }
        Err(e) => assert!(!e.to_string().is_empty(), "an error without a message"),
    }
}

/// A `scalecar run --config` file.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ScalecarConfig::from_yaml_str(text) {
        Ok(c) => {
            // What validation promises the rest of the proxy.
            for d in [
                c.limits.header_timeout,
                c.limits.body_timeout,
                c.limits.request_timeout,
                c.limits.queue_wait,
                c.limits.shutdown_grace,
                c.scaler.tick,
            ] {
                assert!(!d.is_zero() && d <= Duration::from_secs(86_400), "{d:?}");
            }
            for p in &c.pools {
                assert!(!p.model.is_empty() && !p.endpoints.is_empty(), "{p:?}");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty(), "an error without a message"),
    }
}

/// A request body on its way to routing: a 400 with a message, or the
/// routing fields — which must agree with a full JSON parse.
pub fn request_body(data: &[u8]) {
    match scalecar_proxy::dataplane::parse_request(data) {
        Ok(r) => {
            assert!(!r.model.is_empty());
            assert!(r.prompt_tokens >= 1);
            let text = std::str::from_utf8(data).expect("routed a body that is not UTF-8");
            serde_json::from_str::<serde::de::IgnoredAny>(text)
                .expect("routed a body that is not JSON");
            match serde_json::from_str::<serde_json::Value>(text) {
                // Duplicate keys: last wins in both parses.
                Ok(v) => assert_eq!(
                    v.get("model").and_then(|m| m.as_str()),
                    Some(r.model.as_ref())
                ),
                // A lone surrogate escape (`"\ud800"`) or a number past
                // f64 (`1e999`) is JSON by the grammar (RFC 8259 §6, §8.2;
                // Python servers read both) but serde's Value holds
                // neither: fine in a field passed through.
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("hex escape") || e.contains("number out of range"),
                        "{e}: {text}"
                    );
                }
            }
        }
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400);
            assert!(!e.message.is_empty());
        }
    }
}

/// An SSE stream cut into frames at arbitrary points: the first byte seeds
/// the cuts. The payloads must not depend on the cuts.
pub fn sse_frames(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = payloads(stream, &[stream.len()]);
    // Cut points from the seed: every k-th byte, and a few single cuts.
    let step = usize::from(seed % 17) + 1;
    let every: Vec<usize> = (step..stream.len()).step_by(step).collect();
    let split = payloads(stream, &every);
    if stream.len() < MAX_CARRIED_EVENT {
        assert_eq!(whole, split, "cut every {step} bytes");
    }
    let one = [usize::from(seed) % (stream.len() + 1)];
    let single = payloads(stream, &one);
    if stream.len() < MAX_CARRIED_EVENT {
        assert_eq!(whole, single, "cut at {}", one[0]);
        // Where each event ends (what cutting one out relies on) does not
        // depend on the split either, and a known start is where the
        // previous event ended.
        let whole = spans(stream, &[stream.len()]);
        assert_eq!(
            whole,
            spans(stream, &every),
            "spans, cut every {step} bytes"
        );
        assert_eq!(whole, spans(stream, &one), "spans, cut at {}", one[0]);
    }
}

/// Each payload with the absolute end of its event, fed in pieces cut at
/// `cuts`; checks that a reported start is the previous event's end.
fn spans(stream: &[u8], cuts: &[usize]) -> Vec<(Vec<u8>, usize)> {
    let mut framer = SseFramer::default();
    let mut out = Vec::new();
    let mut from = 0;
    let mut last_end = 0;
    for &cut in cuts.iter().chain([&stream.len()]) {
        let cut = cut.clamp(from, stream.len());
        let offset = from;
        framer.feed_events(
            stream.get(from..cut).unwrap_or_default(),
            &mut |d: &[u8], span: scalecar_proxy::sse::EventSpan| {
                // Events without data (comments) lie between: a start is
                // never before the last reported end (one event's second
                // data line repeats its span).
                if let Some(start) = span.start
                    && offset + span.end != last_end
                {
                    assert!(
                        offset + start >= last_end,
                        "a span starts inside the one before"
                    );
                }
                last_end = offset + span.end;
                out.push((d.to_vec(), offset + span.end));
            },
        );
        from = cut;
    }
    out
}

fn payloads(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut framer = SseFramer::default();
    let mut out = Vec::new();
    let mut push = |d: &[u8]| out.push(d.to_vec());
    let mut from = 0;
    for &cut in cuts {
        let cut = cut.min(stream.len());
        framer.feed(stream.get(from..cut).unwrap_or_default(), &mut push);
        from = cut;
    }
    framer.feed(stream.get(from..).unwrap_or_default(), &mut push);
    framer.finish(&mut push);
    assert!(framer.carried_capacity() <= MAX_CARRIED_EVENT);
    out
}

/// `scalecar replay` input (JSON lines of window values or samples).
pub fn replay_input(data: &[u8]) {
    let registry = AlgorithmRegistry::with_builtins();
    let policy = Policy::from_keys(&BTreeMap::new(), Role::Unified).expect("default policy");
    let mut out = Vec::new();
    // A long tick keeps a day-long gap (the most a sample may jump) cheap.
    let result = scalecar_cli::replay::run(
        policy,
        Role::Unified,
        Duration::from_secs(300),
        &registry,
        data,
        &mut out,
    );
    if let Err(e) = result {
        assert!(!e.to_string().is_empty(), "an error without a message");
    }
    // Every decision is one JSON object per line.
    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("a decision line");
        assert!(v.is_object());
    }
}

/// What the API server sends: the first byte picks the decoder, the rest is
/// its input — a workload (annotations), a pod, a label selector as text
/// (must round-trip through its display) or as an object.
pub fn kube_objects(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    match pick % 4 {
        0 => {
            let Ok(o) = serde_json::from_slice::<DynamicObject>(rest) else {
                return;
            };
            // A workload, or an InferencePool naming our picker.
            let gvk = if pick & 4 == 0 {
                GroupVersionKind::gvk("apps", "v1", "Deployment")
            } else {
                GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool")
            };
            let resource = ApiResource::from_gvk(&gvk);
            let recognized = scalecar_scaler::kube::Recognized {
                algorithms: vec!["kpa".to_string(), "hpa".to_string()],
                endpoint_picker: Some("scalecar-epp".to_string()),
            };
            if let Some(Workload::Invalid(why)) = Workload::from_object(&o, &resource, &recognized)
            {
                assert!(!why.is_empty());
            }
        }
        1 => {
            let Ok(p) = serde_json::from_slice::<k8s_openapi::api::core::v1::Pod>(rest) else {
                return;
            };
            let info = PodInfo::from_pod(&p);
            let _ = info.serving();
            let _ = info.endpoint(Some(8000));
            let _ = info.endpoint(None);
        }
        2 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(s) = LabelSelector::parse(&text) {
                let again = LabelSelector::parse(&s.to_string())
                    .unwrap_or_else(|e| panic!("{s} does not parse back: {e}"));
                assert_eq!(again, s, "{text:?}");
            }
        }
        _ => {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) else {
                return;
            };
            if let Ok(s) = LabelSelector::from_object(&v) {
                assert_eq!(LabelSelector::parse(&s.to_string()).ok(), Some(s));
            }
        }
    }
}
