//! The response body wrapper that measures a stream without buffering it.
//!
//! Each data frame goes to the client as it came; on the way, SSE events are
//! classified in place (an event split across frames is carried in a buffer
//! reused for the whole request, so no allocation per token). The first
//! content event gives TTFT, the gaps ITL, `usage` or the event count the
//! tokens. End of stream, an upstream error, or Drop (the client went away)
//! closes the record — exactly once, whichever comes first.

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

use crate::dataplane::PoolEntry;
use crate::metrics::Outcome;
use crate::pool::Lease;
use crate::upstream::PooledConnection;

/// What a request carries through its response.
#[derive(Debug)]
pub struct Observation {
    entry: Arc<PoolEntry>,
    lease: Option<Lease>,
    start: Instant,
    prompt_tokens: u64,
    streaming: bool,
    first_seen: bool,
    /// Signals-clock reading of the last content event.
    last_token: Duration,
    generated: u64,
    usage_completion_tokens: Option<u64>,
    carry: Vec<u8>,
    finished: bool,
}

impl Observation {
    /// `start` is when the proxy received the request; the request was
    /// dispatched (`signals.dispatch`) already.
    pub fn new(
        entry: Arc<PoolEntry>,
        lease: Lease,
        start: Instant,
        prompt_tokens: u64,
        streaming: bool,
    ) -> Self {
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
            carry: Vec::new(),
            finished: false,
        }
    }

    fn content_event(&mut self) {
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
            Event::Content => self.content_event(),
            Event::Usage(n) => self.usage_completion_tokens = n.or(self.usage_completion_tokens),
            Event::Other => {}
        }
    }

    /// Feeds one frame of the body.
    fn frame(&mut self, chunk: &[u8]) {
        if !self.streaming {
            // A whole JSON answer: only its usage matters.
            if let Some(n) = completion_tokens(chunk) {
                self.usage_completion_tokens = Some(n);
            }
            return;
        }
        let mut rest = chunk;
        if !self.carry.is_empty() {
            match find_event_end(rest) {
                Some(end) => {
                    let mut carry = std::mem::take(&mut self.carry);
                    carry.extend_from_slice(&rest[..end]);
                    self.events_in(&carry);
                    carry.clear();
                    self.carry = carry;
                    rest = &rest[end + 2..];
                }
                None => {
                    self.carry.extend_from_slice(rest);
                    return;
                }
            }
        }
        while let Some(end) = find_event_end(rest) {
            let (event, tail) = rest.split_at(end);
            self.events_in(event);
            rest = &tail[2..];
        }
        self.carry.extend_from_slice(rest);
    }

    /// The `data:` lines of one SSE event.
    fn events_in(&mut self, event: &[u8]) {
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(data) = line.strip_prefix(b"data:") {
                let data = data.strip_prefix(b" ").unwrap_or(data);
                self.event(data);
            }
        }
    }

    /// Closes the record of a request that got no answer.
    pub fn fail(mut self) {
        self.finish(Outcome::upstream_error);
    }

    /// Closes the record once.
    fn finish(&mut self, outcome: Outcome) {
        if self.finished {
            return;
        }
        self.finished = true;
        if !self.carry.is_empty() && self.streaming {
            let carry = std::mem::take(&mut self.carry);
            self.events_in(&carry);
        }
        let e2e = self.start.elapsed();
        let generated_count = if self.streaming { self.generated } else { 0 };
        let e2e_sample = (outcome == Outcome::ok).then_some(e2e);
        let metrics = &self.entry.metrics;
        self.entry.pool.signals.complete(
            self.prompt_tokens,
            generated_count,
            self.first_seen,
            e2e_sample,
        );
        if let Some(d) = e2e_sample {
            metrics.e2e.observe(d);
        }
        metrics.outcome(outcome);
        let generated = self.usage_completion_tokens.unwrap_or(self.generated);
        metrics.generated_tokens.inc_by(generated);
        match &self.lease {
            Some(l) if outcome == Outcome::ok => l.endpoint.record_success(),
            _ => {}
        }
        // Frees the endpoint slot and wakes a waiter.
        self.lease = None;
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        self.finish(Outcome::cancelled);
    }
}

enum Event {
    Content,
    Usage(Option<u64>),
    Other,
}

/// The needles, each searcher built once (building one per search cost as
/// much as the search).
struct Needles {
    event_end: Finder<'static>,
    completion_tokens: Finder<'static>,
    empty_choices: [Finder<'static>; 2],
    content: [Finder<'static>; 4],
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    event_end: Finder::new(b"\n\n"),
    completion_tokens: Finder::new(b"\"completion_tokens\":"),
    empty_choices: [
        Finder::new(b"\"choices\":[]"),
        Finder::new(b"\"choices\": []"),
    ],
    content: [
        Finder::new(b"\"content\":\""),
        Finder::new(b"\"content\": \""),
        Finder::new(b"\"text\":\""),
        Finder::new(b"\"text\": \""),
    ],
});

fn find_event_end(hay: &[u8]) -> Option<usize> {
    NEEDLES.event_end.find(hay)
}

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

/// A content event carries a non-empty `content` (chat) or `text`
/// (completions) string; a usage event has `"choices":[]`.
fn classify(data: &[u8]) -> Event {
    if data == b"[DONE]" {
        return Event::Other;
    }
    let needles = &*NEEDLES;
    if needles.empty_choices.iter().any(|f| f.find(data).is_some()) {
        return Event::Usage(completion_tokens(data));
    }
    for key in &needles.content {
        if let Some(at) = key.find(data)
            && data
                .get(at + key.needle().len())
                .is_some_and(|b| *b != b'"')
        {
            return Event::Content;
        }
    }
    Event::Other
}

/// A response body observed on its way to the client. It also holds the
/// upstream connection the body is read from, which goes back to its pool
/// at the end of the body (and is closed if the body is dropped before).
#[derive(Debug)]
pub struct ObservedBody<B> {
    inner: B,
    observation: Option<Observation>,
    connection: Option<PooledConnection>,
}

impl<B: Body> ObservedBody<B> {
    pub fn new(inner: B, observation: Observation, connection: PooledConnection) -> Self {
        let mut body = ObservedBody {
            inner,
            observation: Some(observation),
            connection: Some(connection),
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
        if let Some(mut o) = self.observation.take() {
            o.finish(Outcome::ok);
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
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
                if let Some(mut o) = this.observation.take() {
                    tracing::debug!(error = %e, "upstream body failed mid-response");
                    o.finish(Outcome::upstream_error);
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
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

    #[test]
    fn events_are_classified() {
        assert!(matches!(
            classify(br#"{"choices":[{"delta":{"content":" hi"}}]}"#),
            Event::Content
        ));
        assert!(matches!(
            classify(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            Event::Other
        ));
        assert!(matches!(
            classify(br#"{"choices":[{"text":"x","index":0}]}"#),
            Event::Content
        ));
        assert!(matches!(
            classify(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":12}}"#),
            Event::Usage(Some(12))
        ));
        assert!(matches!(classify(b"[DONE]"), Event::Other));
        assert_eq!(completion_tokens(b"\"completion_tokens\": 42}"), Some(42));
        assert_eq!(completion_tokens(b"\"completion_tokens\":x"), None);
        assert_eq!(
            completion_tokens(b"\"completion_tokens\":99999999999999999999999"),
            None
        );
    }
}
