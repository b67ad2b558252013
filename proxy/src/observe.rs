//! The response body wrapper that measures a stream without buffering it,
//! and the record every dispatched request carries to its end.
//!
//! An [`Observation`] is made the moment a request is dispatched to an
//! endpoint (it records the dispatch itself) and closes the record exactly
//! once: at the end of the body, on an upstream error, or on Drop — the
//! client went away, even before any response header arrived. It is the one
//! RAII guard for in-flight requests and tokens on every path.
//!
//! Each data frame goes to the client as it came; on the way, its SSE events
//! are framed by [`crate::sse`] (no copy, no allocation per token) and
//! classified in place. The first generated-token event
//! (content, reasoning or tool-call delta) gives TTFT, the gaps ITL, `usage`
//! or the event count the tokens.

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

use crate::metrics::Outcome;
use crate::pool::Lease;
use crate::routes::PoolEntry;
use crate::upstream::PooledConnection;

pub use crate::sse::MAX_CARRIED_EVENT;
use crate::sse::SseFramer;

/// What a request carries from dispatch to the end of its response.
#[derive(Debug)]
pub struct Observation {
    entry: Arc<PoolEntry>,
    lease: Option<Lease>,
    start: Instant,
    prompt_tokens: u64,
    streaming: bool,
    first_seen: bool,
    /// Signals-clock reading of the last token event.
    last_token: Duration,
    generated: u64,
    usage_completion_tokens: Option<u64>,
    /// The client got the whole answer (`[DONE]`, or a `finish_reason`):
    /// closing without reading the last bytes is not a cancel.
    complete_seen: bool,
    /// How the request ends if its body ends cleanly (by status class).
    end_outcome: Outcome,
    sse: SseFramer,
    finished: bool,
}

impl Observation {
    /// Dispatches the request to `lease`'s endpoint at `now` (a reading of
    /// the pool's signals clock): from here on it is in flight until this
    /// observation finishes or drops. `start` is when the proxy received it.
    pub fn dispatch(
        entry: Arc<PoolEntry>,
        lease: Lease,
        now: Duration,
        start: Instant,
        prompt_tokens: u64,
        streaming: bool,
    ) -> Self {
        entry.pool.signals.dispatch_at(now, prompt_tokens);
        let mut lease = lease;
        if streaming {
            lease.prefilling();
        }
        Observation {
            entry,
            lease: Some(lease),
            start,
            prompt_tokens,
            streaming,
            first_seen: false,
            last_token: Duration::ZERO,
            generated: 0,
            usage_completion_tokens: None,
            complete_seen: false,
            end_outcome: Outcome::ok,
            sse: SseFramer::default(),
            finished: false,
        }
    }

    /// A retry moved the request to `next` before anything reached the
    /// client: the old slot is freed, the new one counts as prefilling.
    pub fn move_to(&mut self, mut next: Lease) {
        if self.streaming && !self.first_seen {
            next.prefilling();
        }
        self.lease = Some(next);
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The upstream answered with `status`: a 4xx ends as `client_error`
    /// and says nothing of the endpoint; a 5xx ends as `upstream_error` and
    /// counts toward the endpoint's ejection.
    pub fn answered(&mut self, status: StatusCode) {
        if status.is_server_error() {
            self.end_outcome = Outcome::upstream_error;
            if let Some(l) = &self.lease {
                self.entry.pool.record_failure(&l.endpoint);
            }
        } else if status.is_client_error() {
            self.end_outcome = Outcome::client_error;
        }
    }

    /// One generated token seen now (a content, reasoning or tool-call
    /// event; or a prefill leg's single token).
    pub fn token(&mut self) {
        let signals = &self.entry.pool.signals;
        let metrics = &self.entry.metrics;
        let now = signals.now();
        if self.first_seen {
            let itl = now.saturating_sub(self.last_token);
            signals.inter_token_at(now, itl);
            metrics.itl.observe(itl);
        } else {
            self.first_seen = true;
            let ttft = self.start.elapsed();
            signals.first_token(self.prompt_tokens, ttft);
            metrics.ttft.observe(ttft);
            if let Some(l) = &mut self.lease {
                l.first_token();
            }
        }
        self.last_token = now;
        self.generated += 1;
        signals.decode_tokens_at(now, 1);
        if let Some(l) = &mut self.lease {
            l.add_tokens(1);
        }
    }

    fn event(&mut self, data: &[u8]) {
        match classify(data) {
            Event::Token { finished } => {
                self.token();
                self.complete_seen |= finished;
            }
            Event::Usage(n) => self.usage_completion_tokens = n.or(self.usage_completion_tokens),
            Event::Finished => self.complete_seen = true,
            Event::Other => {}
        }
    }

    /// Feeds one frame of the body.
    pub(crate) fn frame(&mut self, chunk: &[u8]) {
        if !self.streaming {
            // A whole JSON answer: only its usage matters.
            if let Some(n) = completion_tokens(chunk) {
                self.usage_completion_tokens = Some(n);
            }
            return;
        }
        // Taken out for the call (a move, no allocation): the payloads
        // go to this observation.
        let mut sse = std::mem::take(&mut self.sse);
        sse.feed(chunk, &mut |data: &[u8]| self.event(data));
        self.sse = sse;
    }

    /// Closes the record with `outcome`.
    pub fn fail(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    /// Closes the record of a clean end of the response.
    /// How the record closes if the body ends cleanly (ok, or the model
    /// server's 4xx).
    pub fn end_outcome(&self) -> Outcome {
        self.end_outcome
    }

    pub fn end(mut self) {
        let outcome = self.end_outcome;
        self.finish(outcome);
    }

    /// Closes the record once.
    fn finish(&mut self, outcome: Outcome) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.streaming {
            let mut sse = std::mem::take(&mut self.sse);
            sse.finish(&mut |data: &[u8]| self.event(data));
        }
        let e2e = self.start.elapsed();
        let e2e_sample = (outcome == Outcome::ok).then_some(e2e);
        let metrics = &self.entry.metrics;
        self.entry.pool.signals.complete(
            self.prompt_tokens,
            self.generated,
            self.first_seen,
            e2e_sample,
        );
        if let Some(d) = e2e_sample {
            metrics.e2e.observe(d);
        }
        metrics.outcome(outcome);
        let generated = self.usage_completion_tokens.unwrap_or(self.generated);
        metrics.generated_tokens.inc_by(generated);
        if let Some(l) = &self.lease
            && outcome == Outcome::ok
        {
            l.endpoint.record_success();
        }
        // Frees the endpoint slot and wakes a waiter.
        self.lease = None;
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        // A client that had the whole answer and closed without reading the
        // last bytes (the openai SDK does) got what it asked for.
        let outcome = if self.complete_seen {
            self.end_outcome
        } else {
            Outcome::cancelled
        };
        self.finish(outcome);
    }
}

enum Event {
    /// A generated token; `finished` if the event also carries a
    /// `finish_reason`.
    Token {
        finished: bool,
    },
    Usage(Option<u64>),
    /// `[DONE]` or a `finish_reason` without a token.
    Finished,
    Other,
}

/// The needles, each searcher built once (building one per search cost as
/// much as the search).
struct Needles {
    completion_tokens: Finder<'static>,
    empty_choices: [Finder<'static>; 2],
    /// String fields whose non-empty value is a generated token: content
    /// (chat), text (completions), reasoning_content / reasoning (vLLM's
    /// reasoning parsers).
    token_strings: [Finder<'static>; 8],
    tool_calls: [Finder<'static>; 2],
    finish_reason: [Finder<'static>; 2],
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    completion_tokens: Finder::new(b"\"completion_tokens\":"),
    empty_choices: [
        Finder::new(b"\"choices\":[]"),
        Finder::new(b"\"choices\": []"),
    ],
    token_strings: [
        Finder::new(b"\"content\":\""),
        Finder::new(b"\"content\": \""),
        Finder::new(b"\"text\":\""),
        Finder::new(b"\"text\": \""),
        Finder::new(b"\"reasoning_content\":\""),
        Finder::new(b"\"reasoning_content\": \""),
        Finder::new(b"\"reasoning\":\""),
        Finder::new(b"\"reasoning\": \""),
    ],
    tool_calls: [
        Finder::new(b"\"tool_calls\":[{"),
        Finder::new(b"\"tool_calls\": [{"),
    ],
    finish_reason: [
        Finder::new(b"\"finish_reason\":\""),
        Finder::new(b"\"finish_reason\": \""),
    ],
});

/// The number after `"completion_tokens":`.
fn completion_tokens(hay: &[u8]) -> Option<u64> {
    let key = &NEEDLES.completion_tokens;
    let at = key.find(hay)? + key.needle().len();
    let digits = hay
        .get(at..)?
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// A token event carries a non-empty content, text or reasoning string, or
/// a tool-call delta; a usage event has `"choices":[]`.
fn classify(data: &[u8]) -> Event {
    if data == b"[DONE]" {
        return Event::Finished;
    }
    let needles = &*NEEDLES;
    if needles.empty_choices.iter().any(|f| f.find(data).is_some()) {
        return Event::Usage(completion_tokens(data));
    }
    let finished = needles.finish_reason.iter().any(|f| f.find(data).is_some());
    let string_token = needles.token_strings.iter().any(|key| {
        key.find(data).is_some_and(|at| {
            data.get(at + key.needle().len())
                .is_some_and(|b| *b != b'"')
        })
    });
    if string_token || needles.tool_calls.iter().any(|f| f.find(data).is_some()) {
        return Event::Token { finished };
    }
    if finished {
        Event::Finished
    } else {
        Event::Other
    }
}

/// A response body observed on its way to the client. It also holds the
/// upstream connection the body is read from, which goes back to its pool
/// at the end of the body (and is closed if the body is dropped before).
#[derive(Debug)]
pub struct ObservedBody<B> {
    inner: B,
    observation: Option<Observation>,
    connection: Option<PooledConnection>,
    /// `limits.stream-idle-timeout`: armed when the body first waits, and
    /// re-armed only when it fires (not per frame) from `last_data`.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    idle_limit: Duration,
    last_data: tokio::time::Instant,
    /// The request's span (disabled, and free, unless debug logs are on):
    /// lines about the body carry the request's id too.
    span: tracing::Span,
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
            idle: None,
            idle_limit,
            last_data: tokio::time::Instant::now(),
            span: tracing::Span::current(),
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

impl<B: Body + Unpin> ObservedBody<B> {
    /// Whether the model server has been silent for the idle limit; arms
    /// (or re-arms) the timer otherwise. Called only when the body waits.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.idle_limit;
        let last = self.last_data;
        let sleep = self
            .idle
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_data = tokio::time::Instant::now();
                if let (Some(data), Some(o)) = (frame.data_ref(), this.observation.as_mut()) {
                    o.frame(data);
                }
                // A sized body's last frame: the server will not poll for
                // the end, so it is recorded now.
                if this.inner.is_end_stream() {
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
                this.end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.observation.is_none() || !this.idle_expired(cx) {
                    return Poll::Pending;
                }
                // Hung after its headers: the connection is closed (the
                // server sees the cancel), the client's response fails.
                this.connection = None;
                if let Some(o) = this.observation.take() {
                    this.span
                        .record("outcome", tracing::field::debug(Outcome::timeout));
                    tracing::warn!(parent: &this.span, model = %o.entry.pool.model, idle = ?this.idle_limit, "model server silent mid-response; ending it");
                    if let Some(l) = o.lease() {
                        o.entry.pool.record_failure(&l.endpoint);
                    }
                    o.fail(Outcome::timeout);
                }
                Poll::Ready(Some(Err(ObservedError::Idle(this.idle_limit))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ProxyMetrics;
    use crate::pool::Pool;
    use scalecar_config::Role;
    use scalecar_scaler::clock::MonotonicClock;
    use scalecar_scaler::signals::{PoolSignals, SignalsConfig};

    fn observation() -> Observation {
        let signals = Arc::new(PoolSignals::new(
            SignalsConfig::default(),
            Arc::new(MonotonicClock::new()),
        ));
        let pool = Pool::new(
            "m".into(),
            Role::Unified,
            vec![std::net::SocketAddr::from(([127, 0, 0, 1], 9))],
            signals,
            None,
            4,
        );
        let lease = pool.try_admit(10, crate::pool::Among::All).unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        let metrics = ProxyMetrics::register(&mut reg).pool("m", Role::Unified);
        let entry = Arc::new(PoolEntry {
            model: "m".into(),
            pool,
            metrics,
        });
        let now = entry.pool.signals.now();
        Observation::dispatch(entry, lease, now, Instant::now(), 10, true)
    }

    #[test]
    fn the_carried_event_is_bounded() {
        let mut o = observation();
        let piece = vec![b'x'; 64 << 10];
        o.frame(b"data: ");
        for _ in 0..16 {
            o.frame(&piece);
            assert!(
                o.sse.carried_capacity() <= MAX_CARRIED_EVENT,
                "{}",
                o.sse.carried_capacity()
            );
        }
        // The monster's end, then a normal event: observed again.
        o.frame(b"\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n");
        assert_eq!(o.generated, 0);
        o.frame(b"\n");
        assert_eq!(o.generated, 1);
        o.end();
    }

    #[test]
    fn separators_of_every_kind_and_split_anywhere() {
        let event =
            |c: &str| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{c}\"}}}}]}}");
        let stream = format!(
            "{}\n\n{}\r\n\r\n{}\r\r{}\n\r\n: comment\n\ndata: [DONE]\n\n",
            event("a"),
            event("b"),
            event("c"),
            event("d")
        );
        // Every split point of the stream into two frames sees 4 tokens,
        // each as soon as its event ended.
        for cut in 0..=stream.len() {
            let mut o = observation();
            let (x, y) = stream.as_bytes().split_at(cut);
            o.frame(x);
            o.frame(y);
            assert_eq!(o.generated, 4, "cut at {cut}");
            assert!(o.complete_seen, "cut at {cut}");
            assert_eq!(o.sse.carried(), 0, "cut at {cut}");
            o.end();
        }
    }

    #[test]
    fn events_are_classified() {
        assert!(matches!(
            classify(br#"{"choices":[{"delta":{"content":" hi"}}]}"#),
            Event::Token { finished: false }
        ));
        assert!(matches!(
            classify(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            Event::Other
        ));
        assert!(matches!(
            classify(br#"{"choices":[{"text":"x","index":0}]}"#),
            Event::Token { finished: false }
        ));
        assert!(matches!(
            classify(
                br#"{"choices":[{"delta":{"reasoning_content":"Let"},"finish_reason":null}]}"#
            ),
            Event::Token { finished: false }
        ));
        assert!(matches!(
            classify(br#"{"choices":[{"delta":{"reasoning":" me"}}]}"#),
            Event::Token { finished: false }
        ));
        assert!(matches!(
            classify(
                br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"a"}}]}}]}"#
            ),
            Event::Token { finished: false }
        ));
        assert!(matches!(
            classify(br#"{"choices":[{"delta":{"content":"."},"finish_reason":"stop"}]}"#),
            Event::Token { finished: true }
        ));
        assert!(matches!(
            classify(br#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#),
            Event::Finished
        ));
        assert!(matches!(
            classify(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":12}}"#),
            Event::Usage(Some(12))
        ));
        assert!(matches!(classify(b"[DONE]"), Event::Finished));
        assert_eq!(completion_tokens(b"\"completion_tokens\": 42}"), Some(42));
        assert_eq!(completion_tokens(b"\"completion_tokens\":x"), None);
        assert_eq!(
            completion_tokens(b"\"completion_tokens\":99999999999999999999999"),
            None
        );
    }
}
