//! Reference docs that cannot drift: `docs/metrics.md` names exactly the
//! metrics the code registers (with the suffix Prometheus exposition adds
//! to counters and info metrics), each with its type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Registered name → the type its registration implies (from the value
/// registered: a Counter family, a Histogram, an Info, else a gauge).
fn registered() -> BTreeMap<String, &'static str> {
    let mut files = Vec::new();
    for dir in ["proxy/src", "scaler/src"] {
        sources(&root().join(dir), &mut files);
    }
    let mut out = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".register(") {
            let call = &rest[at..];
            let end = call.find(");").unwrap_or(call.len());
            let args = &call[..end];
            rest = &call[end.min(call.len())..];
            let Some(q) = args.find("\"scalecar_") else {
                continue;
            };
            let name: String = args[q + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // The handle registered is the argument's last word.
            let handle = args
                .rsplit(',')
                .map(str::trim)
                .find(|p| !p.is_empty())
                .unwrap_or_default();
            let kind = if handle.contains("info") || name == "scalecar_build" {
                "info"
            } else {
                let field = handle
                    .trim()
                    .trim_end_matches(".clone()")
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                // Counters are the fields and families declared as such.
                if text.contains(&format!("{field}: Counter")) {
                    "counter"
                } else if text.contains(&format!("{field}: Family<")) {
                    let decl = text
                        .split(&format!("{field}: Family<"))
                        .nth(1)
                        .unwrap_or_default();
                    let decl = decl.split('>').next().unwrap_or_default();
                    if decl.contains("Counter") {
                        "counter"
                    } else if decl.contains("Histogram") {
                        "histogram"
                    } else {
                        "gauge"
                    }
                } else {
                    "gauge"
                }
            };
            out.insert(name, kind);
        }
    }
    out
}

/// (exposed name, type) rows of the docs' tables.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("| `scalecar_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect()
}

#[test]
fn docs_metrics_md_names_every_registered_metric_and_nothing_else() {
    let code = registered();
    assert!(code.len() >= 25, "found only {code:?}");
    let docs = documented();
    let mut expected = BTreeMap::new();
    for (name, kind) in &code {
        // Exposition suffixes: counters `_total`, info metrics `_info`.
        let (exposed, kind) = match *kind {
            "counter" => (format!("{name}_total"), "counter"),
            "info" => (format!("{name}_info"), "gauge"),
            k => (name.clone(), k),
        };
        expected.insert(exposed, kind.to_string());
    }
    let missing: Vec<_> = expected.keys().filter(|k| !docs.contains_key(*k)).collect();
    let stale: Vec<_> = docs.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "registered, not in docs/metrics.md: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "in docs/metrics.md, not registered: {stale:?}"
    );
    for (name, kind) in &expected {
        assert_eq!(&docs[name], kind, "{name}: documented type");
    }
}
