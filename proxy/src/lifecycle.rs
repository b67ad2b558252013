//! One request's life, shared by every front end (scalecar's own proxy,
//! and the gateway's endpoint picker), in phases:
//!
//! 1. **route** — the body's routing fields ([`crate::dataplane`]'s
//!    `RequestFields`: model, stream, the prompt's size) pick a pool entry
//!    from the route table;
//! 2. **arrive and admit** — [`admit`]: the arrival is counted at once
//!    (demand is never read from completions), then the request takes a
//!    slot on an endpoint — now, or after waiting in the pool's queue (the
//!    activation timeout while the pool has no endpoint: scale from zero) —
//!    or is refused with a [`Refusal`] the front end renders its own way;
//! 3. **pick** — the slot's [`crate::pool::Lease`] names the endpoint;
//! 4. **observe** — the returned [`Observation`] takes the answer's status
//!    and its body's bytes (SSE accounting: first token, tokens, usage);
//! 5. **finish** — the observation closes the record exactly once: end,
//!    failure, or Drop (a client, or a gateway stream, that went away).
//!
//! Front ends differ only in how bytes reach the endpoint and the client;
//! admission, picking and observation are these, once.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use scalecar_config::Limits;

use crate::body::ProxyBody;
use crate::error::{ApiError, error_response};
use crate::metrics::Outcome;
use crate::observe::Observation;
use crate::pool::{AdmitError, Among};
use crate::routes::PoolEntry;

/// What admission needs to know of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival<'a> {
    /// Estimated from the prompt's text, before the model server tokenizes
    /// it (admission scales it by the pool's learned calibration).
    pub prompt_tokens: u64,
    /// The body's size (the queue bounds the bytes it holds).
    pub body_bytes: usize,
    /// When the front end got the request (TTFT counts from here).
    pub start: Instant,
    pub streaming: bool,
    /// The endpoints it may take (a gateway's subset hint narrows them).
    pub among: Among<'a>,
}

/// Why a request was turned away before any endpoint saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub outcome: Outcome,
    pub status: StatusCode,
    pub message: &'static str,
    /// Seconds, for `Retry-After`.
    pub retry_after: &'static str,
}

impl Refusal {
    fn of(e: AdmitError) -> Refusal {
        let (outcome, status, message, retry_after) = match e {
            AdmitError::QueueFull => (
                Outcome::rejected,
                StatusCode::TOO_MANY_REQUESTS,
                "the model's queue is full (requests or queued body bytes)",
                "1",
            ),
            AdmitError::Timeout => (
                Outcome::timeout,
                StatusCode::SERVICE_UNAVAILABLE,
                "no capacity for the model before the deadline",
                "2",
            ),
            AdmitError::NoHealthyEndpoint { .. } => (
                Outcome::upstream_error,
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy endpoint for the model: every one failed its health checks",
                "1",
            ),
            AdmitError::Closed => (
                Outcome::rejected,
                StatusCode::SERVICE_UNAVAILABLE,
                "the model's pool was removed or replaced while the request waited",
                "1",
            ),
        };
        Refusal {
            outcome,
            status,
            message,
            retry_after,
        }
    }

    /// As an OpenAI error answer with `Retry-After`.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut r = error_response(&ApiError::new(self.status, self.message, None));
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(self.retry_after),
        );
        r
    }
}

/// Arrives at `entry`'s pool and admits: the dispatched request's
/// [`Observation`], holding its endpoint slot, or why it was refused (the
/// refusal is already counted in the outcomes).
pub(crate) async fn admit(
    limits: &Limits,
    entry: &Arc<PoolEntry>,
    arrival: Arrival<'_>,
) -> Result<Observation, Refusal> {
    let pool = &entry.pool;
    // In the model server's tokens, as far as its answers have taught.
    let prompt = pool.prompt_calibration.size(arrival.prompt_tokens);
    let tokens = prompt.tokens;
    // One clock reading serves arrival and, when a slot is free at once,
    // dispatch.
    let now = pool.signals.now();
    pool.signals.arrival_at(now, tokens);
    entry.metrics.prompt_tokens.inc_by(tokens);
    let dispatch = |lease, at| {
        Observation::dispatch(
            entry.clone(),
            lease,
            (now, at),
            arrival.start,
            prompt,
            arrival.streaming,
        )
    };
    // The common case, a free slot now: no wait to time.
    if let Some(lease) = pool.try_admit(tokens, arrival.among) {
        entry.metrics.queue_wait.observe(std::time::Duration::ZERO);
        return Ok(dispatch(lease, now));
    }
    let deadline = if pool.endpoints().is_empty() {
        limits.activation_timeout.max(limits.queue_wait)
    } else {
        limits.queue_wait
    };
    let waited = Instant::now();
    let result = pool
        .admit_holding(tokens, arrival.body_bytes, arrival.among, deadline)
        .await;
    // Only a request that entered the queue waited: a full queue (429) or
    // a pool with no healthy endpoint (503) turns it away at once, and a
    // zero there would drag the quantiles down exactly when waits are
    // longest.
    if !matches!(
        result,
        Err(AdmitError::QueueFull | AdmitError::NoHealthyEndpoint { queued: false })
    ) {
        entry.metrics.queue_wait.observe(waited.elapsed());
    }
    match result {
        Ok(lease) => Ok(dispatch(lease, pool.signals.now())),
        Err(e) => {
            let refusal = Refusal::of(e);
            entry.metrics.outcome(refusal.outcome);
            Err(refusal)
        }
    }
}
