//! The response body wrapper: each frame goes to the client as it came
//! and through the request's [`Observation`] on the way; the body also
//! holds the upstream connection (back to its pool at a clean end, closed
//! otherwise) and an idle timer (a model server silent mid-response ends
//! it as a timeout).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::Observation;
use crate::metrics::Outcome;
use crate::upstream::PooledConnection;

/// A response body observed on its way to the client. It also holds the
/// upstream connection the body is read from, which goes back to its pool
/// at the end of the body (and is closed if the body is dropped before).
#[derive(Debug)]
pub struct ObservedBody<B> {
    inner: B,
    observation: Option<Observation>,
    connection: Option<PooledConnection>,
    idle: IdleTimer,
    /// The request's span (disabled, and free, unless debug logs are on):
    /// lines about the body carry the request's id too.
    span: tracing::Span,
    /// The last frame went out (stripping may send one after the upstream
    /// body ended).
    done: bool,
    /// Trailers that came while stripping still held data: sent next.
    trailers: Option<http::HeaderMap>,
}

impl<B: Body> ObservedBody<B> {
    pub fn new(
        inner: B,
        observation: Observation,
        connection: PooledConnection,
        idle_limit: Duration,
    ) -> Self {
        let mut body = ObservedBody {
            inner,
            observation: Some(observation),
            connection: Some(connection),
            idle: IdleTimer::new(idle_limit),
            span: tracing::Span::current(),
            done: false,
            trailers: None,
        };
        // An empty body is never polled: it ends here.
        if body.inner.is_end_stream() {
            body.end();
        }
        body
    }

    /// The upstream body ended cleanly: one completion record, and the
    /// connection back to the pool.
    fn end(&mut self) {
        if let Some(c) = self.connection.take() {
            c.release();
        }
        if let Some(o) = self.observation.take() {
            self.span
                .record("outcome", tracing::field::debug(o.end_outcome()));
            o.end();
        }
    }
}

/// Why an observed body failed.
#[derive(Debug)]
pub enum ObservedError<E> {
    /// The model server's body broke off.
    Upstream(E),
    /// No byte from the model server for `stream-idle-timeout`.
    Idle(Duration),
}

impl<E: std::fmt::Display> std::fmt::Display for ObservedError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObservedError::Upstream(e) => write!(f, "upstream body: {e}"),
            ObservedError::Idle(d) => write!(
                f,
                "no byte from the model server for {}",
                humantime::format_duration(*d)
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ObservedError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ObservedError::Upstream(e) => Some(e),
            ObservedError::Idle(_) => None,
        }
    }
}

/// `limits.stream-idle-timeout`: how long the model server may be silent
/// mid-response. Armed when the body first waits and re-armed only when
/// it fires (from the last data), never per frame.
#[derive(Debug)]
struct IdleTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    last_data: tokio::time::Instant,
}

impl IdleTimer {
    fn new(limit: Duration) -> Self {
        IdleTimer {
            sleep: None,
            limit,
            last_data: tokio::time::Instant::now(),
        }
    }

    /// Data came now.
    fn data(&mut self) {
        self.last_data = tokio::time::Instant::now();
    }

    /// Whether the limit has passed since the last data; arms (or
    /// re-arms) the timer otherwise. Called only when the body waits.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let (limit, last) = (self.limit, self.last_data);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(last + limit)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            // Fired: data may have come since it was armed.
            let deadline = self.last_data + limit;
            if deadline <= tokio::time::Instant::now() {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = ObservedError<B::Error>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        // Loops only while stripping holds a whole frame back.
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.idle.data();
                    let ended = this.inner.is_end_stream();
                    let frame = match (frame.into_data(), this.observation.as_mut()) {
                        (Ok(data), Some(o)) if o.strips_usage() => {
                            let mut out = o.frame_stripping(&data);
                            if ended {
                                out = join(out, o.finish_stripping());
                            }
                            if out.is_empty() && !ended {
                                continue;
                            }
                            Frame::data(out)
                        }
                        (Ok(data), Some(o)) => {
                            o.frame(&data);
                            Frame::data(data)
                        }
                        (Ok(data), None) => Frame::data(data),
                        (Err(other), Some(o)) if o.strips_usage() => {
                            // Trailers end the body: what stripping held
                            // goes first.
                            let rest = o.finish_stripping();
                            match other.into_trailers() {
                                Ok(t) if !rest.is_empty() => {
                                    this.trailers = Some(t);
                                    Frame::data(rest)
                                }
                                Ok(t) => Frame::trailers(t),
                                Err(other) => other,
                            }
                        }
                        (Err(other), _) => other,
                    };
                    // A sized body's last frame: the server will not poll
                    // for the end, so it is recorded now.
                    if ended {
                        this.end();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    this.connection = None;
                    if let Some(o) = this.observation.take() {
                        this.span
                            .record("outcome", tracing::field::debug(Outcome::upstream_error));
                        tracing::debug!(parent: &this.span, error = %e, "upstream body failed mid-response");
                        if let Some(l) = o.lease() {
                            o.entry.pool.record_failure(&l.endpoint);
                        }
                        o.fail(Outcome::upstream_error);
                    }
                    Poll::Ready(Some(Err(ObservedError::Upstream(e))))
                }
                Poll::Ready(None) => {
                    // What stripping still held (an unterminated last
                    // event) goes out before the end.
                    let rest = this
                        .observation
                        .as_mut()
                        .filter(|o| o.strips_usage())
                        .map(|o| o.finish_stripping())
                        .unwrap_or_default();
                    this.end();
                    this.done = true;
                    if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(rest))))
                    }
                }
                Poll::Pending => {
                    if this.observation.is_none() || !this.idle.expired(cx) {
                        return Poll::Pending;
                    }
                    // Hung after its headers: the connection is closed (the
                    // server sees the cancel), the client's response fails.
                    this.connection = None;
                    if let Some(o) = this.observation.take() {
                        this.span
                            .record("outcome", tracing::field::debug(Outcome::timeout));
                        tracing::warn!(parent: &this.span, model = %o.entry.pool.model, idle = ?this.idle.limit, "model server silent mid-response; ending it");
                        if let Some(l) = o.lease() {
                            o.entry.pool.record_failure(&l.endpoint);
                        }
                        o.fail(Outcome::timeout);
                    }
                    Poll::Ready(Some(Err(ObservedError::Idle(this.idle.limit))))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.inner.is_end_stream() && self.observation.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        // Stripping changes the length: only a bound is known then.
        match &self.observation {
            Some(o) if o.strips_usage() => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

/// `a` then `b`, copying only when both have bytes.
fn join(a: Bytes, b: Bytes) -> Bytes {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a,
        (true, false) => b,
        (false, false) => {
            let mut out = bytes::BytesMut::with_capacity(a.len() + b.len());
            out.extend_from_slice(&a);
            out.extend_from_slice(&b);
            out.freeze()
        }
    }
}
