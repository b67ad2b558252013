//! Proxy mode's forwarding to a pool: after [`crate::lifecycle::admit`],
//! sending to the leased endpoint with a retry elsewhere while nothing
//! reached any model server, and the observed response. Shared by the
//! unified path and both legs of the PD flow; it knows nothing of routing.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use scalecar_config::Limits;

use crate::body::ProxyBody;
use crate::error::{ApiError, error_response};
use crate::lifecycle::{self, Arrival};
use crate::metrics::Outcome;
use crate::observe::{Observation, ObservedBody};
use crate::pool::Among;
use crate::routes::PoolEntry;
use crate::upstream::{PooledConnection, Upstream};

/// A request on its way to a pool: what the client sent (its body as
/// bytes, hop-by-hop headers stripped) and what the proxy learnt of it.
#[derive(Debug, Clone)]
pub(crate) struct ForwardRequest {
    /// Origin form, whatever form the client used.
    pub path: PathAndQuery,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Estimated before the model server tokenizes it.
    pub prompt_tokens: u64,
    pub streaming: bool,
    /// The proxy asked for the stream's usage chunk: the client's answer
    /// goes without it.
    pub strip_usage: bool,
    /// When the proxy got the request (TTFT counts from here).
    pub start: Instant,
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

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of eight
    // hashed removals.
    if !headers
        .keys()
        .any(|k| HOP_BY_HOP.iter().any(|h| k.as_str() == *h))
    {
        return;
    }
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

/// Why a request got no answer from the pool.
#[derive(Debug)]
pub(crate) struct SendError {
    /// `timeout` or `upstream_error`.
    pub outcome: Outcome,
    pub message: String,
}

impl SendError {
    /// 504 for a timeout, 502 otherwise, as OpenAI error JSON.
    pub fn response(&self) -> Response<ProxyBody> {
        let status = if self.outcome == Outcome::timeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        error_response(&ApiError::new(
            status,
            format!("upstream failed: {}", self.message),
            None,
        ))
    }
}

/// The request id header: the client's, or one the proxy made.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What a worker forwards with: its upstream connections and the limits.
#[derive(Debug)]
pub(crate) struct Forwarder {
    pub upstream: Arc<Upstream>,
    pub limits: Limits,
}

impl Forwarder {
    /// Sends the request to the observation's endpoint; when the
    /// connection cannot be made (nothing reached any model server, nothing
    /// reached the client), takes a slot on another endpoint and tries
    /// there, up to three endpoints in all. The observation keeps the
    /// request in flight throughout, so a client that goes away while this
    /// waits releases everything on Drop.
    pub(crate) async fn send(
        &self,
        entry: &PoolEntry,
        observation: &mut Observation,
        path: &PathAndQuery,
        headers: HeaderMap,
        body: Bytes,
        tokens: u64,
    ) -> Result<(Response<Incoming>, PooledConnection), SendError> {
        // (Separate arguments, not a ForwardRequest: the PD prefill leg
        // sends a body and headers of its own.)
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from(path.clone());
        *req.headers_mut() = headers;
        let mut attempts = 0;
        loop {
            attempts += 1;
            // The address and Host only: no reference count to bump on an
            // endpoint every worker shares.
            let Some((addr, host)) = observation
                .lease()
                .map(|l| (l.endpoint.addr, l.endpoint.host.clone()))
            else {
                return Err(SendError {
                    outcome: Outcome::upstream_error,
                    message: "no endpoint slot".into(),
                });
            };
            req.headers_mut().insert(header::HOST, host);
            let sent =
                tokio::time::timeout(self.limits.request_timeout, self.upstream.send(addr, req))
                    .await;
            let (error, back) = match sent {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(SendError {
                        outcome: Outcome::timeout,
                        message: format!(
                            "endpoint {addr}: no answer within {}",
                            humantime::format_duration(self.limits.request_timeout)
                        ),
                    });
                }
            };
            if let Some(l) = observation.lease() {
                entry.pool.record_failure(&l.endpoint);
            }
            match back {
                // With no other endpoint up, a retry could only wait for
                // this one: fail now rather than after the queue's deadline.
                Some(r)
                    if error.is_connect()
                        && attempts < 3
                        && entry.pool.has_other_available(addr) =>
                {
                    tracing::debug!(endpoint = %addr, %error, "connect failed; retrying elsewhere");
                    // Nothing reached the client: take a slot elsewhere
                    // (the queue's deadline, not the activation's).
                    match entry
                        .pool
                        .admit(tokens, Among::AllBut(addr), self.limits.queue_wait)
                        .await
                    {
                        Ok(next) => observation.move_to(next),
                        Err(_) => {
                            return Err(SendError {
                                outcome: Outcome::upstream_error,
                                message: error.to_string(),
                            });
                        }
                    }
                    req = r;
                }
                _ => {
                    return Err(SendError {
                        outcome: Outcome::upstream_error,
                        message: error.to_string(),
                    });
                }
            }
        }
    }

    /// The unified path: admit, send, observe.
    pub(crate) async fn forward(
        &self,
        entry: &Arc<PoolEntry>,
        request: ForwardRequest,
    ) -> Response<ProxyBody> {
        let ForwardRequest {
            path,
            headers,
            body,
            prompt_tokens,
            streaming,
            strip_usage,
            start,
        } = request;
        let pool = &entry.pool;
        let request_id = headers.get(X_REQUEST_ID).cloned();
        let mut observation = match lifecycle::admit(
            &self.limits,
            entry,
            Arrival {
                prompt_tokens,
                body_bytes: body.len(),
                start,
                streaming,
                among: Among::All,
            },
        )
        .await
        {
            Ok(o) => o,
            Err(refusal) => return refusal.response(),
        };
        observation.strip_usage(strip_usage);
        let span = tracing::Span::current();
        span.record("model", pool.model.as_str());
        span.record("role", pool.role.as_str());
        if let Some(l) = observation.lease() {
            span.record("endpoint", tracing::field::display(l.endpoint.addr));
        }
        match self
            .send(entry, &mut observation, &path, headers, body, prompt_tokens)
            .await
        {
            Ok((resp, conn)) => {
                observation.answered(resp.status());
                let (mut parts, upstream) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if observation.strips_usage() {
                    // Only an event stream has a usage chunk to cut (an
                    // error answer is JSON); cutting changes the length.
                    let events = parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("text/event-stream"));
                    observation.strip_usage(events);
                    if events {
                        parts.headers.remove(header::CONTENT_LENGTH);
                    }
                }
                let body =
                    ObservedBody::new(upstream, observation, conn, self.limits.stream_idle_timeout);
                Response::from_parts(parts, ProxyBody::Observed(body))
            }
            Err(e) => {
                // The request never got an answer: close its record.
                span.record("outcome", tracing::field::debug(e.outcome));
                observation.fail(e.outcome);
                tracing::warn!(
                    request_id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
                    model = %pool.model, role = %pool.role, outcome = ?e.outcome,
                    error = %e.message, "upstream failed"
                );
                e.response()
            }
        }
    }
}
