//! The admin server: `/healthz`, `/readyz`, `/metrics` (OpenMetrics text),
//! `/debug/pools` (JSON: endpoints, in flight, queue, window snapshot) and
//! `/debug/targets` (JSON: each scale target's latest decision and last
//! rescale, what `scalecar status` prints).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use scalecar_scaler::peer::PeerSnapshot;
use serde_json::{Value, json};

use crate::body::{ProxyBody, full};
use crate::dataplane::DataPlane;
use crate::pool::Serving;
use crate::routes::PoolEntry;

/// The largest asks body a peer accepts (a thousand pools' asks are about
/// 100 KB).
const MAX_ASKS_BYTES: usize = 4 << 20;

/// What the admin server shows.
#[derive(Debug)]
pub struct Admin {
    pub plane: Arc<DataPlane>,
    pub registry: Registry,
    /// The control loop's decisions, when a loop runs.
    pub decisions: Option<Arc<crate::decisions::DecisionRecorder>>,
    /// The token peers present for `/internal/snapshot` (`None`: the
    /// endpoint refuses everyone).
    pub peer_token: Option<String>,
    /// Snapshot requests answered to the leader
    /// (`scalecar_peer_snapshot_answers_total`).
    pub peer_answers: prometheus_client::metrics::counter::Counter,
    /// Set once the proxy listener is serving; cleared at shutdown.
    pub ready: AtomicBool,
    /// False until discovery has listed every watched kind and the pods:
    /// before that a model may be unknown only because it was not seen yet.
    pub routes_known: std::sync::Arc<AtomicBool>,
}

fn entries(plane: &DataPlane) -> Vec<std::sync::Arc<PoolEntry>> {
    plane.routes().entries()
}

fn json_text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_secs_f64() * 1000.0))
}

impl Admin {
    /// `/readyz`: 503 before serving and while draining; 503 too when no
    /// pool can take a request (every static pool without a healthy
    /// endpoint). Otherwise 200, naming the pools that cannot serve — a
    /// load balancer probing this keeps a gateway that serves some models.
    fn readiness(&self) -> (StatusCode, String) {
        if !self.ready.load(Ordering::Acquire) {
            return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into());
        }
        if !self.routes_known.load(Ordering::Acquire) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: discovery has not listed the cluster yet\n".into(),
            );
        }
        let mut serving = 0usize;
        let mut not = Vec::new();
        let entries = entries(&self.plane);
        for e in &entries {
            let p = &e.pool;
            match p.serving() {
                Serving::Ready => serving += 1,
                // A discovered pool at zero scales up on the first request.
                Serving::Empty if !p.is_health_checked() => serving += 1,
                state => not.push(format!("{}/{}: {}\n", p.model, p.role, state.as_str())),
            }
        }
        let status = if serving > 0 || entries.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut body = String::from(if status == StatusCode::OK {
            "ready\n"
        } else {
            "not ready: no pool can serve\n"
        });
        for line in not {
            body.push_str(&line);
        }
        (status, body)
    }

    /// One pool's windows for the leader: `?model=&role=&window_ms=&panic_window_ms=`,
    /// with `Authorization: Bearer <token>`.
    /// One pool's windows (peers before `/internal/snapshots`).
    fn internal_snapshot(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        let error = |status: StatusCode, message: &str| {
            json_text(status, json!({"error": message}).to_string())
        };
        let token = self.peer_token.as_deref().unwrap_or("");
        if !crate::peers::authorized(req.headers().get(http::header::AUTHORIZATION), token) {
            return error(
                StatusCode::FORBIDDEN,
                "peers only: send Authorization: Bearer <the shared peer token>",
            );
        }
        let mut model = None;
        let mut role = None;
        let mut window = None;
        let mut panic = None;
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "model" => model = Some(v.into_owned()),
                "role" => {
                    role = scalecar_config::Role::ALL
                        .into_iter()
                        .find(|r| r.as_str() == v)
                }
                "window_ms" => window = v.parse::<u64>().ok().map(Duration::from_millis),
                "panic_window_ms" => panic = v.parse::<u64>().ok().map(Duration::from_millis),
                _ => {}
            }
        }
        let (Some(model), Some(role), Some(window), Some(panic)) = (model, role, window, panic)
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "model, role (unified, prefill, decode), window_ms and panic_window_ms are required",
            );
        };
        match self.plane.find(&model, role) {
            Some(e) => {
                self.peer_answers.inc();
                json_text(
                    StatusCode::OK,
                    serde_json::to_string(&PeerSnapshot::all(&e.pool.signals, window, panic))
                        .unwrap_or_default(),
                )
            }
            None => error(StatusCode::NOT_FOUND, "no such pool here"),
        }
    }

    /// Every pool the leader asks for at once (one request per peer per
    /// tick): a JSON `SnapshotAsks` in, `SnapshotAnswers` out.
    async fn internal_snapshots(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        use http_body_util::BodyExt as _;
        let error = |status: StatusCode, message: String| {
            json_text(status, json!({"error": message}).to_string())
        };
        let token = self.peer_token.as_deref().unwrap_or("");
        if !crate::peers::authorized(req.headers().get(http::header::AUTHORIZATION), token) {
            return error(
                StatusCode::FORBIDDEN,
                "peers only: send Authorization: Bearer <the shared peer token>".into(),
            );
        }
        let body = match http_body_util::Limited::new(req.into_body(), MAX_ASKS_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("asks: {e} (at most {MAX_ASKS_BYTES} bytes)"),
                );
            }
        };
        let asks: scalecar_scaler::peer::SnapshotAsks = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "asks: not a JSON {{\"asks\": [{{model, role, window_ms, panic_window_ms}}]}}: {e}"
                    ),
                );
            }
        };
        let snapshots = asks
            .asks
            .iter()
            .map(|a| {
                let role = scalecar_config::Role::ALL
                    .into_iter()
                    .find(|r| r.as_str() == a.role)?;
                let e = self.plane.find(&a.model, role)?;
                Some(PeerSnapshot::of(
                    &e.pool.signals,
                    Duration::from_millis(a.window_ms),
                    Duration::from_millis(a.panic_window_ms),
                    a.latencies(),
                ))
            })
            .collect();
        self.peer_answers.inc();
        json_text(
            StatusCode::OK,
            serde_json::to_string(&scalecar_scaler::peer::SnapshotAnswers { snapshots })
                .unwrap_or_default(),
        )
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let text = |status: StatusCode, ct: &'static str, body: String| {
            let mut r = Response::new(full(body));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            r
        };
        if req.method() == Method::POST && req.uri().path() == "/internal/snapshots" {
            return Ok(self.internal_snapshots(req).await);
        }
        if req.method() != Method::GET {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n".into(),
            ));
        }
        Ok(match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                let (status, body) = self.readiness();
                text(status, "text/plain", body)
            }
            "/metrics" => {
                for e in entries(&self.plane) {
                    let s = &e.pool.signals;
                    if let Some(g) = &e.metrics.gauges {
                        g.in_flight.set(s.in_flight() as i64);
                        g.queued.set(s.queued() as i64);
                        g.tokens_in_flight.set(s.tokens_in_flight() as i64);
                        g.prompt_token_ratio
                            .set(e.pool.prompt_calibration.ratio().unwrap_or(1.0));
                    }
                }
                let openmetrics = req
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) if openmetrics => text(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body,
                    ),
                    Ok(()) => text(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        to_prometheus_text(&body),
                    ),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("encoding metrics: {e}\n"),
                    ),
                }
            }
            "/debug/pools" => text(
                StatusCode::OK,
                "application/json",
                self.debug_pools().to_string(),
            ),
            "/internal/snapshot" => self.internal_snapshot(&req),
            "/debug/targets" => text(
                StatusCode::OK,
                "application/json",
                self.decisions
                    .as_ref()
                    .map_or_else(|| json!({"targets": []}), |d| d.targets_json())
                    .to_string(),
            ),
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        })
    }

    fn debug_pools(&self) -> Value {
        let names = self.plane.routes().names_by_pool();
        let pools: Vec<Value> = entries(&self.plane)
            .into_iter()
            .map(|e| {
                let p = &e.pool;
                // The other names routed here (LoRA adapters, aliases).
                let aliases: Vec<&String> = names
                    .get(&Arc::as_ptr(p))
                    .into_iter()
                    .flatten()
                    .filter(|n| **n != p.model)
                    .collect();
                let now = p.now_ms();
                let endpoints: Vec<Value> = p
                    .endpoints()
                    .iter()
                    .map(|ep| {
                        json!({
                            "address": ep.addr.to_string(),
                            "outstanding": ep.outstanding.load(Ordering::Relaxed),
                            "outstanding_tokens": ep.outstanding_tokens.load(Ordering::Relaxed),
                            "prefill_tokens": ep.prefill_tokens.load(Ordering::Relaxed),
                            "healthy": ep.is_healthy(),
                            "health": ep.health().as_str(),
                            "ejected": ep.is_ejected(now),
                            "consecutive_failures": ep.consecutive_failures(),
                            "kv_cache_tokens": ep.kv_capacity(),
                        })
                    })
                    .collect();
                let retention = p.signals.retention();
                let snap = p.signals.snapshot(retention, (retention / 10).max(Duration::from_secs(1)));
                let window = |w: &scalecar_scaler::WindowValues| {
                    json!({
                        "seconds": w.duration.as_secs_f64(),
                        "observed_seconds": w.observed.as_secs_f64(),
                        "concurrency": w.concurrency,
                        "rps": w.rps,
                        "queue": w.queue,
                        "tokens": w.tokens,
                        "prompt_tokens_per_sec": w.prompt_tokens_per_sec,
                        "decode_tokens_per_sec": w.decode_tokens_per_sec,
                        "arrivals": w.arrivals,
                        "completions": w.completions,
                        "ttft_ms": {"count": w.ttft.count, "mean": ms(w.ttft.mean), "p50": ms(w.ttft.p50), "p90": ms(w.ttft.p90), "p99": ms(w.ttft.p99)},
                        "itl_ms": {"count": w.itl.count, "mean": ms(w.itl.mean), "p50": ms(w.itl.p50), "p90": ms(w.itl.p90), "p99": ms(w.itl.p99)},
                        "queue_wait_ms": {"count": w.queue_wait.count, "p90": ms(w.queue_wait.p90)},
                    })
                };
                json!({
                    "model": p.model,
                    "aliases": aliases,
                    "role": p.role.as_str(),
                    "max_concurrency": p.max_concurrency,
                    "in_flight": p.signals.in_flight(),
                    "queued": p.signals.queued(),
                    "tokens_in_flight": p.signals.tokens_in_flight(),
                    "prompt_token_ratio": p.prompt_calibration.ratio(),
                    "endpoints": endpoints,
                    "stable": window(&snap.stable),
                    "panic": window(&snap.panic),
                })
            })
            .collect();
        json!({ "pools": pools })
    }
}

/// OpenMetrics text to the Prometheus text format (0.0.4), for scrapers
/// and tools that do not negotiate OpenMetrics: counter families are named
/// with their `_total` suffix there, and there is no `# EOF` or `# UNIT`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                // The Prometheus text format has no info type: a gauge
                // named with its `_info` sample, always 1.
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                k => (name.to_string(), k),
            };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.split_once(' '))
                    .map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_metrics_are_gauges_named_info() {
        let om = "# HELP b Build.\n# TYPE b info\nb_info{version=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP b_info Build.\n# TYPE b_info gauge\nb_info{version=\"1\"} 1\n"
        );
    }

    #[test]
    fn counters_get_their_total_names() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 1\n# HELP g G.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 1\n# HELP g G.\n# TYPE g gauge\ng 2\n"
        );
    }
}
