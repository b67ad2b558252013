//! `scalecar status`: what the scaler is doing, per target, in the shape
//! of `kubectl describe` — read from a running gateway's admin server
//! (`/debug/targets`), so it works wherever the admin port is reachable
//! (`kubectl port-forward svc/scalecar-admin 9090`).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Arguments of `scalecar status`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "EXAMPLES\n  scalecar status\n  kubectl -n scalecar port-forward svc/scalecar-admin 9090 & scalecar status --admin 127.0.0.1:9090\n  scalecar status --json"
)]
pub struct StatusArgs {
    /// The gateway's admin address (host:port).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin: String,
    /// Print the admin server's JSON as it is.
    #[arg(long)]
    pub json: bool,
}

/// Why the status could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("connecting to the admin server at {admin}")]
    Connect {
        admin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("asking {admin} for /debug/targets")]
    Http {
        admin: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{admin} answered {status} for /debug/targets (is it a scalecar admin port?)")]
    Status { admin: String, status: u16 },
    #[error("{admin}/debug/targets is not the JSON scalecar serves")]
    Json {
        admin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no answer from {admin} within 5s")]
    Timeout { admin: String },
}

/// Reads `/debug/targets` from `admin`.
pub async fn fetch(admin: &str) -> Result<Value, StatusError> {
    let ask = async {
        let stream = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|source| StatusError::Connect {
                admin: admin.to_string(),
                source,
            })?;
        let http = |source| StatusError::Http {
            admin: admin.to_string(),
            source,
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let req = http::Request::get("/debug/targets")
            .header(http::header::HOST, admin)
            .body(Empty::<Bytes>::new())
            .map_err(|_| StatusError::Status {
                admin: admin.to_string(),
                status: 0,
            })?;
        let resp = send.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        if status != 200 {
            return Err(StatusError::Status {
                admin: admin.to_string(),
                status,
            });
        }
        serde_json::from_slice(&body).map_err(|source| StatusError::Json {
            admin: admin.to_string(),
            source,
        })
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| StatusError::Timeout {
            admin: admin.to_string(),
        })?
}

fn ago(at_unix: f64, now_unix: f64) -> String {
    let secs = (now_unix - at_unix).max(0.0);
    let d = Duration::from_secs(secs.round() as u64);
    format!("{} ago", humantime::format_duration(d))
}

/// The targets, described.
pub fn render(v: &Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let targets = v["targets"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let leader = &v["leader"];
    if !leader.is_null() {
        let holder = leader["holder"].as_str().unwrap_or("unknown");
        let line = if leader["leading"].as_bool() == Some(true) {
            format!("Leader:        this replica ({holder})\n\n")
        } else {
            format!(
                "Leader:        {holder} (this replica follows: it records, the leader decides)\n\n"
            )
        };
        out.push_str(&line);
    }
    // What this replica's leaderships loaded, recalled and saved (see
    // `memory-config-map`); nothing while it never led.
    let m = |k: &str| v["memory"][k].as_u64().unwrap_or(0);
    if ["loaded", "empty", "saved", "failed"]
        .iter()
        .any(|k| m(k) > 0)
    {
        let failed = match m("failed") {
            0 => String::new(),
            n => format!("; {n} failed (see the log: memory not saved / not loaded)"),
        };
        out.push_str(&format!(
            "Memory:        {} recalled, {} refused at {} leaderships; saved {} times{failed}\n\n",
            m("recalled"),
            m("refused"),
            m("loaded") + m("empty"),
            m("saved"),
        ));
    }
    if targets.is_empty() {
        out.push_str("No scale targets (no pools yet, or no decision made yet).\n");
        return out;
    }
    for (i, t) in targets.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
        let n = |k: &str| t[k].as_f64().unwrap_or(0.0);
        let count = |k: &str| {
            t[k].as_u64()
                .map_or_else(|| "—".to_string(), |x| x.to_string())
        };
        let _ = writeln!(out, "Target:        {}", s("name"));
        let _ = writeln!(out, "Model:         {} ({})", s("model"), s("role"));
        let mode = if t["advisory"].as_bool() == Some(true) {
            "advisory: decisions are shown, nothing is patched"
        } else {
            "managed"
        };
        let _ = writeln!(out, "Scaling:       {mode}");
        let _ = writeln!(
            out,
            "Algorithm:     {}, metric {}",
            s("algorithm"),
            s("metric")
        );
        let _ = writeln!(
            out,
            "Replicas:      {} ready, {} spec, {} desired by the algorithm, {} decided",
            count("ready"),
            count("spec"),
            count("desired"),
            count("applied")
        );
        let _ = writeln!(
            out,
            "Metric:        {:.1} stable / {:.1} panic against a target of {:.1} per replica{}",
            n("stable_value"),
            n("panic_value"),
            n("target"),
            if t["panic"].as_bool() == Some(true) {
                "  (PANIC)"
            } else {
                ""
            }
        );
        // A replica's capacity, as far as it is known: the rates measured
        // in the path and the KV cache the engines (or the policy) state.
        let mut capacity = Vec::new();
        if let Some(r) = t["prefill_rate"].as_f64() {
            capacity.push(format!("prefills {r:.0} prompt tok/s"));
        }
        if let Some(r) = t["decode_rate"].as_f64() {
            capacity.push(format!("generates {r:.0} tok/s"));
        }
        if let Some(kv) = t["kv_cache_tokens"].as_u64() {
            capacity.push(format!("holds {kv} tokens of KV cache"));
        }
        if !capacity.is_empty() {
            let _ = writeln!(out, "Per replica:   {}", capacity.join(", "));
        }
        if t["partial"].as_bool() == Some(true) {
            let _ = writeln!(
                out,
                "Data:          PARTIAL: a peer did not answer; no scale-down until it does"
            );
        }
        let _ = writeln!(
            out,
            "Last decision: {} ({})",
            s("reason"),
            ago(n("decided_unix"), now)
        );
        match t.get("last_rescale").filter(|l| !l.is_null()) {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "Last rescale:  {} → {}, {}: {}",
                    l["from"].as_u64().unwrap_or(0),
                    l["to"].as_u64().unwrap_or(0),
                    ago(l["at_unix"].as_f64().unwrap_or(0.0), now),
                    l["reason"].as_str().unwrap_or("")
                );
            }
            None => {
                let _ = writeln!(out, "Last rescale:  none since start");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn targets_render_like_describe() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let v = json!({"targets": [{
            "name": "deployment/llm/llama", "model": "llama", "role": "unified",
            "algorithm": "kpa", "metric": "concurrency", "advisory": false,
            "ready": 2, "spec": 3, "desired": 3, "applied": 3, "panic": true,
            "stable_value": 10.0, "panic_value": 20.5, "target": 7.0,
            "prefill_rate": 5612.4, "decode_rate": null, "kv_cache_tokens": 40000,
            "reason": "concurrency … → 3", "decided_unix": now - 1.0,
            "last_rescale": {"at_unix": now - 12.0, "from": 2, "to": 3, "reason": "burst"}
        }]});
        let text = render(&v);
        for want in [
            "Target:        deployment/llm/llama",
            "Model:         llama (unified)",
            "Replicas:      2 ready, 3 spec, 3 desired by the algorithm, 3 decided",
            "10.0 stable / 20.5 panic against a target of 7.0 per replica  (PANIC)",
            "Last rescale:  2 → 3, 12s ago: burst",
            "Per replica:   prefills 5612 prompt tok/s, holds 40000 tokens of KV cache\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(
            !text.contains("Memory:"),
            "never led, nothing to say:\n{text}"
        );
        let led = json!({
            "memory": {"loaded": 1, "empty": 0, "saved": 7, "failed": 1, "recalled": 2, "refused": 1},
            "targets": [],
        });
        let text = render(&led);
        assert!(
            text.contains(
                "Memory:        2 recalled, 1 refused at 1 leaderships; saved 7 times; 1 failed"
            ),
            "{text}"
        );
        // Nothing known: no line.
        let bare = json!({"targets": [{"name": "t", "reason": "r"}]});
        assert!(!render(&bare).contains("Per replica"));
        assert!(render(&json!({"targets": []})).starts_with("No scale targets"));
    }
}
