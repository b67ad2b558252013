//! The request path: bounded body read, the few fields routing needs, pool
//! lookup, admission, endpoint choice, forwarding with retry while nothing
//! reached the client, and the observed response. The PD two-stage flow for
//! disaggregated models lives in [`crate::pd`].
//!
//! The request body goes upstream byte for byte as the client sent it; only
//! the PD flow rewrites it. Hop-by-hop headers are dropped both ways, and
//! only the pool chooses the upstream — never the Host header or an
//! absolute URI (no open proxy).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use scalecar_config::{Limits, Role};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiError, error_response};
use crate::metrics::{Outcome, PoolMetrics, ProxyMetrics, Rejection};
use crate::observe::{Observation, ObservedBody};
use crate::pool::{AdmitError, Lease, Pool};

/// The body type of every response.
pub type ProxyBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A pool with its metric handles.
#[derive(Debug, Clone)]
pub struct PoolEntry {
    pub pool: Arc<Pool>,
    pub metrics: PoolMetrics,
}

/// Where a model's requests go.
#[derive(Debug, Clone)]
pub enum ModelRoute {
    Unified(PoolEntry),
    Disaggregated {
        prefill: PoolEntry,
        decode: PoolEntry,
    },
}

/// The fields of a request body that routing and signals need.
#[derive(Debug, Deserialize)]
pub(crate) struct RequestFields<'a> {
    #[serde(borrow)]
    pub model: Option<&'a RawValue>,
    pub stream: Option<bool>,
    #[serde(borrow)]
    pub messages: Option<&'a RawValue>,
    #[serde(borrow)]
    pub prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    pub input: Option<&'a RawValue>,
}

impl RequestFields<'_> {
    /// About four characters a token, from the prompt's JSON text: known
    /// before the model server tokenizes it.
    pub fn prompt_tokens(&self) -> u64 {
        let len = [self.messages, self.prompt, self.input]
            .iter()
            .flatten()
            .map(|r| r.get().len())
            .sum::<usize>();
        (len as u64).div_ceil(4).max(1)
    }
}

/// The data plane: routes, upstream client, limits and metrics.
pub struct DataPlane {
    routes: HashMap<String, ModelRoute>,
    client: Client<HttpConnector, Full<Bytes>>,
    pub limits: Limits,
    pub metrics: ProxyMetrics,
    request_ids: AtomicU64,
    instance: u64,
}

impl fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataPlane")
            .field("models", &self.routes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

pub(crate) fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

impl DataPlane {
    pub fn new(routes: HashMap<String, ModelRoute>, limits: Limits, metrics: ProxyMetrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        let instance = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        DataPlane {
            routes,
            client,
            limits,
            metrics,
            request_ids: AtomicU64::new(0),
            instance,
        }
    }

    pub fn routes(&self) -> &HashMap<String, ModelRoute> {
        &self.routes
    }

    pub(crate) fn client(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.client
    }

    fn request_id(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers
            .get("x-request-id")
            .filter(|v| !v.is_empty() && v.len() <= 200)
        {
            return v.clone();
        }
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("scalecar-{:x}-{n:x}", self.instance & 0xffff_ffff))
            .unwrap_or_else(|_| HeaderValue::from_static("scalecar"))
    }

    /// Serves one client request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let request_id = self.request_id(req.headers());
        let mut response = match (method, path.as_str()) {
            (Method::POST, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") => {
                self.completion(req, start, request_id.clone()).await
            }
            (Method::GET, "/v1/models") => self.models(),
            (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models") => {
                error_response(&ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed",
                    None,
                ))
            }
            _ => {
                self.metrics.rejected(Rejection::not_found);
                error_response(&ApiError::not_found(format!("no route for {path}")))
            }
        };
        response.headers_mut().insert("x-request-id", request_id);
        response
    }

    fn models(&self) -> Response<ProxyBody> {
        let mut names: Vec<&String> = self.routes.keys().collect();
        names.sort();
        let data: Vec<_> = names
            .into_iter()
            .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "scalecar"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data}).to_string();
        let mut r = Response::new(full(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    async fn completion(
        &self,
        req: Request<Incoming>,
        start: Instant,
        request_id: HeaderValue,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let limit = self.limits.max_body_bytes;
        let body = match Limited::new(body, limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                self.metrics.rejected(Rejection::body_too_large);
                return error_response(&ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {limit} bytes"),
                    None,
                ));
            }
            Err(e) => {
                self.metrics.rejected(Rejection::bad_request);
                return error_response(&ApiError::bad_request(
                    format!("reading the request body: {e}"),
                    None,
                ));
            }
        };
        let fields: RequestFields<'_> = match serde_json::from_slice(&body) {
            Ok(f) => f,
            Err(e) => {
                self.metrics.rejected(Rejection::bad_request);
                return error_response(&ApiError::bad_request(
                    format!("request body is not a valid JSON object: {e}"),
                    None,
                ));
            }
        };
        let model: String = match fields
            .model
            .map(|m| serde_json::from_str::<String>(m.get()))
        {
            Some(Ok(m)) if !m.is_empty() => m,
            Some(_) => {
                self.metrics.rejected(Rejection::bad_request);
                return error_response(&ApiError::bad_request(
                    "model must be a non-empty string",
                    Some("model"),
                ));
            }
            None => {
                self.metrics.rejected(Rejection::bad_request);
                return error_response(&ApiError::bad_request(
                    "you must provide a model parameter",
                    Some("model"),
                ));
            }
        };
        let Some(route) = self.routes.get(&model) else {
            self.metrics.rejected(Rejection::unknown_model);
            return error_response(&ApiError::model_not_found(&model));
        };
        let prompt_tokens = fields.prompt_tokens();
        let streaming = fields.stream.unwrap_or(false);
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| parts.uri.path().to_string());
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.insert("x-request-id", request_id);
        match route {
            ModelRoute::Unified(entry) => {
                self.forward(entry, &path, headers, body, prompt_tokens, streaming, start)
                    .await
            }
            ModelRoute::Disaggregated { prefill, decode } => {
                crate::pd::two_stage(
                    self,
                    prefill,
                    decode,
                    &path,
                    headers,
                    body,
                    prompt_tokens,
                    streaming,
                    start,
                )
                .await
            }
        }
    }

    /// Admits to `entry`'s pool, with the activation timeout when the pool
    /// has no endpoint yet (scale from zero).
    pub(crate) async fn admit(
        &self,
        entry: &PoolEntry,
        tokens: u64,
        avoid: Option<std::net::SocketAddr>,
    ) -> Result<Lease, Response<ProxyBody>> {
        let empty = entry.pool.endpoints().is_empty();
        let deadline = if empty {
            self.limits.activation_timeout.max(self.limits.queue_wait)
        } else {
            self.limits.queue_wait
        };
        let waited = Instant::now();
        let result = entry.pool.admit(tokens, avoid, deadline).await;
        entry.metrics.queue_wait.observe(waited.elapsed());
        result.map_err(|e| {
            let (outcome, status, message, retry) = match e {
                AdmitError::QueueFull => (
                    Outcome::queue_full,
                    StatusCode::TOO_MANY_REQUESTS,
                    "the model's queue is full",
                    "1",
                ),
                AdmitError::Timeout => (
                    Outcome::queue_timeout,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no capacity for the model before the deadline",
                    "2",
                ),
            };
            entry.metrics.outcome(outcome);
            let mut r = error_response(&ApiError::new(status, message, None));
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(retry));
            r
        })
    }

    /// Sends `body` to an endpoint of the lease's pool, retrying once on
    /// another endpoint when the connection fails before any answer.
    pub(crate) async fn send(
        &self,
        entry: &PoolEntry,
        mut lease: Lease,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
        tokens: u64,
    ) -> Result<(Response<Incoming>, Lease), (Lease, String)> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let addr = lease.endpoint.addr;
            let uri: Uri = match format!("http://{addr}{path}").parse() {
                Ok(u) => u,
                Err(e) => return Err((lease, format!("upstream URI: {e}"))),
            };
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri;
            *req.headers_mut() = headers.clone();
            req.headers_mut().remove(header::HOST);
            req.headers_mut().remove(header::CONTENT_LENGTH);
            let result =
                tokio::time::timeout(self.limits.request_timeout, self.client.request(req)).await;
            match result {
                Ok(Ok(resp)) => return Ok((resp, lease)),
                Ok(Err(e)) if e.is_connect() && attempts < 3 => {
                    lease.endpoint.record_failure(entry.pool.now_ms());
                    tracing::debug!(endpoint = %addr, error = %e, "connect failed; retrying elsewhere");
                    // Nothing reached the client: take a slot elsewhere.
                    let next = match self.admit(entry, tokens, Some(addr)).await {
                        Ok(l) => l,
                        Err(_) => return Err((lease, format!("endpoint {addr}: {e}"))),
                    };
                    lease = next;
                }
                Ok(Err(e)) => {
                    lease.endpoint.record_failure(entry.pool.now_ms());
                    return Err((lease, format!("endpoint {addr}: {e}")));
                }
                Err(_) => {
                    return Err((
                        lease,
                        format!(
                            "endpoint {addr}: no answer within {:?}",
                            self.limits.request_timeout
                        ),
                    ));
                }
            }
        }
    }

    /// The unified path: admit, send, observe.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn forward(
        &self,
        entry: &PoolEntry,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
        prompt_tokens: u64,
        streaming: bool,
        start: Instant,
    ) -> Response<ProxyBody> {
        let pool = &entry.pool;
        pool.signals.arrival(prompt_tokens);
        entry.metrics.prompt_tokens.inc_by(prompt_tokens);
        let lease = match self.admit(entry, prompt_tokens, None).await {
            Ok(l) => l,
            Err(r) => return r,
        };
        pool.signals.dispatch(prompt_tokens);
        match self
            .send(entry, lease, path, &headers, &body, prompt_tokens)
            .await
        {
            Ok((resp, lease)) => {
                let observation = Observation::new(
                    pool.clone(),
                    entry.metrics.clone(),
                    lease,
                    start,
                    prompt_tokens,
                    streaming,
                );
                let (mut parts, upstream) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = ObservedBody::new(upstream, observation)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .boxed_unsync();
                Response::from_parts(parts, body)
            }
            Err((lease, message)) => {
                // The request never got an answer: close its record.
                let observation = Observation::new(
                    pool.clone(),
                    entry.metrics.clone(),
                    lease,
                    start,
                    prompt_tokens,
                    streaming,
                );
                observation.fail();
                tracing::warn!(model = %pool.model, role = %pool.role, %message, "upstream failed");
                error_response(&ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("upstream failed: {message}"),
                    None,
                ))
            }
        }
    }
}

/// The role a pool entry serves, for logs.
pub fn role_of(entry: &PoolEntry) -> Role {
    entry.pool.role
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }

    #[test]
    fn prompt_tokens_are_estimated_from_the_prompt_json() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}]}"#;
        let f: RequestFields<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(f.prompt_tokens(), 18);
        let f: RequestFields<'_> = serde_json::from_slice(br#"{"model":"m"}"#).unwrap();
        assert_eq!(f.prompt_tokens(), 1);
    }
}
