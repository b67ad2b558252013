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

mod body;
mod events;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::metrics::Outcome;
use crate::pool::Lease;
use crate::prompt_calibration::PromptSize;
use crate::routes::PoolEntry;

pub use crate::sse::MAX_CARRIED_EVENT;
use crate::sse::{EventSpan, SseFramer};
pub use body::{ObservedBody, ObservedError};
use bytes::{Bytes, BytesMut};
use events::{Event, JsonUsageScan, Usage, classify};

/// What a request carries from dispatch to the end of its response.
#[derive(Debug)]
pub struct Observation {
    entry: Arc<PoolEntry>,
    lease: Option<Lease>,
    start: Instant,
    /// Signals-clock reading of its arrival (as recorded there).
    arrived: Duration,
    /// The model server refused it (a 4xx other than 429): no work.
    refused: bool,
    /// In the model server's tokens as far as the pool has learned them;
    /// `estimated_prompt` is the proxy's own count from the text.
    prompt_tokens: u64,
    estimated_prompt: u64,
    streaming: bool,
    first_seen: bool,
    /// Signals-clock reading of the last token event.
    last_token: Duration,
    generated: u64,
    usage_completion_tokens: Option<u64>,
    usage_prompt_tokens: Option<u64>,
    /// The client got the whole answer (`[DONE]`, or a `finish_reason`):
    /// closing without reading the last bytes is not a cancel.
    complete_seen: bool,
    /// How the request ends if its body ends cleanly (by status class).
    end_outcome: Outcome,
    sse: SseFramer,
    /// A whole JSON answer's usage, read across its frames.
    json: JsonUsageScan,
    /// The proxy asked the model server for the usage chunk the client did
    /// not ask for: it is cut from the stream ([`Self::frame_stripping`]).
    strip_usage: bool,
    /// While stripping: the bytes of the event under way, held from the
    /// client until the event is complete (never half a usage chunk sent).
    held: BytesMut,
    finished: bool,
}

impl Observation {
    /// Dispatches the request to `lease`'s endpoint: `at` is when it was
    /// recorded as arriving and now, readings of the pool's signals clock.
    /// From here on it is in flight until this observation finishes or
    /// drops. `start` is when the proxy received it;
    /// `prompt` is the prompt's size as estimated from its text and as
    /// calibrated to the pool's model server.
    pub fn dispatch(
        entry: Arc<PoolEntry>,
        lease: Lease,
        at: (Duration, Duration),
        start: Instant,
        prompt: PromptSize,
        streaming: bool,
    ) -> Self {
        let (arrived, now) = at;
        entry.pool.signals.dispatch_at(now, prompt.tokens);
        let mut lease = lease;
        if streaming {
            lease.prefilling();
        }
        Observation {
            entry,
            lease: Some(lease),
            start,
            arrived,
            refused: false,
            prompt_tokens: prompt.tokens,
            estimated_prompt: prompt.estimated,
            streaming,
            first_seen: false,
            last_token: Duration::ZERO,
            generated: 0,
            usage_completion_tokens: None,
            usage_prompt_tokens: None,
            complete_seen: false,
            end_outcome: Outcome::ok,
            sse: SseFramer::default(),
            json: JsonUsageScan::default(),
            strip_usage: false,
            held: BytesMut::new(),
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
            // 429 is the server out of room: demand, not a bad request.
            self.refused = status != StatusCode::TOO_MANY_REQUESTS;
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

    /// Records one event's payload; whether it was the usage chunk.
    fn event(&mut self, data: &[u8]) -> bool {
        let last = match classify(data) {
            Event::Token { finished } => {
                self.token();
                finished
            }
            Event::Usage(u) => {
                self.usage(u);
                return true;
            }
            Event::Finished => true,
            Event::Other => false,
        };
        if last {
            self.complete_seen = true;
            // Some servers put usage in the chunk that finishes (llama.cpp
            // before it learned include_usage, always): read only there,
            // not per token. Not cut: it carries the finish.
            if data != b"[DONE]" {
                self.usage(Usage::of(data));
            }
        }
        false
    }

    /// What an answer's usage counted, where it said.
    fn usage(&mut self, u: Usage) {
        self.usage_completion_tokens = u.completion.or(self.usage_completion_tokens);
        self.usage_prompt_tokens = u.prompt.or(self.usage_prompt_tokens);
    }

    /// Feeds one frame of the body.
    pub(crate) fn frame(&mut self, chunk: &[u8]) {
        if !self.streaming {
            // A whole JSON answer: only its usage matters.
            let usage = self.json.feed(chunk);
            self.usage(usage);
            return;
        }
        // Taken out for the call (a move, no allocation): the payloads
        // go to this observation.
        let mut sse = std::mem::take(&mut self.sse);
        sse.feed(chunk, &mut |data: &[u8]| {
            self.event(data);
        });
        self.sse = sse;
    }

    /// Cuts the usage chunk out of this stream from now on (the proxy asked
    /// for it; the client did not).
    pub(crate) fn strip_usage(&mut self, on: bool) {
        self.strip_usage = on && self.streaming;
    }

    pub(crate) fn strips_usage(&self) -> bool {
        self.strip_usage
    }

    /// Feeds one frame of a stream whose usage chunk is not the client's,
    /// and returns what the client gets now: the complete events so far
    /// without the usage chunk. An event not yet complete is held until it
    /// is; a frame of whole events (the usual) passes without a copy.
    pub(crate) fn frame_stripping(&mut self, chunk: &Bytes) -> Bytes {
        let mut sse = std::mem::take(&mut self.sse);
        let held = std::mem::take(&mut self.held);
        // Positions below are in `held ++ chunk`.
        let offset = held.len();
        // An event that began in earlier frames began this far into
        // `held` (after an over-long event passed through unread, `held`
        // may also keep that event's last bytes).
        let carried_from = offset.saturating_sub(sse.carried());
        let mut out: Option<BytesMut> = None;
        let mut kept = 0;
        let mut last_end = 0;
        sse.feed_events(chunk, &mut |data: &[u8], span: EventSpan| {
            let start = span.start.map_or(carried_from, |s| offset + s);
            let end = offset + span.end;
            if self.event(data) && start >= kept {
                let o = out.get_or_insert_with(|| BytesMut::with_capacity(offset + chunk.len()));
                append_range(o, &held, chunk, kept..start);
                kept = end;
            }
            last_end = end;
        });
        // An event too long to carry is passed through as it comes.
        let decided = if sse.skipping() {
            offset + chunk.len()
        } else {
            last_end
        };
        self.sse = sse;
        let now = match out {
            None if offset == 0 => chunk.slice(..decided.min(chunk.len())),
            None => {
                let mut o = BytesMut::with_capacity(decided);
                append_range(&mut o, &held, chunk, 0..decided);
                o.freeze()
            }
            Some(mut o) => {
                append_range(&mut o, &held, chunk, kept..decided);
                o.freeze()
            }
        };
        let mut rest = held;
        if decided >= offset {
            rest.clear();
            rest.extend_from_slice(chunk.get(decided - offset..).unwrap_or_default());
        } else {
            let _ = rest.split_to(decided);
            rest.extend_from_slice(chunk);
        }
        self.held = rest;
        now
    }

    /// The stream ended: what is still held goes to the client, unless it
    /// was the (unterminated) usage chunk.
    pub(crate) fn finish_stripping(&mut self) -> Bytes {
        let mut sse = std::mem::take(&mut self.sse);
        let mut usage = false;
        sse.finish(&mut |data: &[u8]| usage |= self.event(data));
        let mut held = std::mem::take(&mut self.held);
        if usage {
            // Its span may open with the LF of the CRLF before it.
            held.truncate(usize::from(held.first() == Some(&b'\n')));
        }
        held.freeze()
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
            sse.finish(&mut |data: &[u8]| {
                self.event(data);
            });
        }
        let e2e = self.start.elapsed();
        let e2e_sample = (outcome == Outcome::ok).then_some(e2e);
        let metrics = &self.entry.metrics;
        if self.refused && !self.first_seen {
            // Refused outright (a prompt over the context, a malformed
            // request): it was never work to scale for.
            self.entry
                .pool
                .signals
                .retract_arrival(self.arrived, self.prompt_tokens);
        }
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
        if let (Some(counted), Outcome::ok) = (self.usage_prompt_tokens, outcome) {
            self.entry
                .pool
                .prompt_calibration
                .learn(self.estimated_prompt, counted);
        }
        if let Some(l) = &self.lease
            && outcome == Outcome::ok
        {
            l.endpoint.record_success();
        }
        // Frees the endpoint slot and wakes a waiter.
        self.lease = None;
    }
}

/// Appends `range` of `held ++ chunk` to `out`.
fn append_range(out: &mut BytesMut, held: &[u8], chunk: &[u8], range: std::ops::Range<usize>) {
    let split = held.len();
    if range.start < split {
        out.extend_from_slice(
            held.get(range.start..range.end.min(split))
                .unwrap_or_default(),
        );
    }
    if range.end > split {
        let from = range.start.max(split) - split;
        out.extend_from_slice(chunk.get(from..range.end - split).unwrap_or_default());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ProxyMetrics;
    use crate::pool::Pool;
    use scalecar_config::Role;
    use scalecar_scaler::clock::MonotonicClock;
    use scalecar_scaler::signals::{PoolSignals, SignalsConfig};

    fn observation() -> Observation {
        observation_of(true)
    }

    fn observation_of(streaming: bool) -> Observation {
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
        let prompt = PromptSize {
            estimated: 10,
            tokens: 10,
        };
        Observation::dispatch(entry, lease, (now, now), Instant::now(), prompt, streaming)
    }

    #[test]
    fn the_usage_chunk_the_client_did_not_ask_for_is_cut_wherever_frames_split() {
        let token = |c: &str| {
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{c}\"}}}}],\"usage\":null}}")
        };
        let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":31,"completion_tokens":2}}"#;
        for sep in ["\n\n", "\r\n\r\n", "\r\r"] {
            let events = [
                token("a"),
                token("b"),
                usage.to_string(),
                "data: [DONE]".into(),
            ];
            let with: String = events.iter().map(|e| format!("{e}{sep}")).collect();
            let without: String = events
                .iter()
                .filter(|e| e.as_str() != usage)
                .map(|e| format!("{e}{sep}"))
                .collect();
            let run = |frames: Vec<&[u8]>| {
                let mut o = observation();
                o.strip_usage(true);
                let mut out = Vec::new();
                for f in frames {
                    out.extend_from_slice(&o.frame_stripping(&Bytes::copy_from_slice(f)));
                }
                out.extend_from_slice(&o.finish_stripping());
                let seen = (o.generated, o.usage_prompt_tokens, o.complete_seen);
                o.end();
                (String::from_utf8(out).unwrap(), seen)
            };
            let want = (without.clone(), (2, Some(31), true));
            for cut in 0..=with.len() {
                let (x, y) = with.as_bytes().split_at(cut);
                assert_eq!(run(vec![x, y]), want, "{sep:?} cut at {cut}");
            }
            for size in 1..with.len() {
                assert_eq!(
                    run(with.as_bytes().chunks(size).collect()),
                    want,
                    "{sep:?} frames of {size}"
                );
            }
            // Unterminated at the end: held bytes still reach the client,
            // a usage chunk left unterminated does not.
            let cut_short = &with[..with.len() - sep.len()];
            assert_eq!(
                run(vec![cut_short.as_bytes()]).0,
                without[..without.len() - sep.len()]
            );
            let usage_last = format!("{}{sep}{usage}", token("a"));
            assert_eq!(
                run(vec![usage_last.as_bytes()]).0,
                format!("{}{sep}", token("a"))
            );
        }
    }

    #[test]
    fn usage_in_the_finishing_chunk_is_read_and_left_in_place() {
        // llama-server (2025 builds) ends with choices and usage in one chunk.
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}],",
            "\"usage\":{\"completion_tokens\":1,\"prompt_tokens\":85,\"total_tokens\":86}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut o = observation();
        o.strip_usage(true);
        let out = o.frame_stripping(&Bytes::from_static(stream.as_bytes()));
        assert_eq!(out, stream.as_bytes(), "nothing cut");
        assert_eq!(o.usage_prompt_tokens, Some(85));
        assert_eq!(o.usage_completion_tokens, Some(1));
        assert_eq!(o.generated, 1);
        o.end();
    }

    #[test]
    fn an_over_long_event_passes_and_the_usage_chunk_after_it_is_still_cut() {
        let long = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(crate::sse::MAX_CARRIED_EVENT + 10)
        );
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4}}\n\n";
        let stream = format!("{long}{usage}data: [DONE]\n\n");
        let want = format!("{long}data: [DONE]\n\n");
        let usage_at = long.len();
        // Frames of 100 kB, and cuts inside the long event's end and inside
        // the usage chunk.
        for cuts in [
            vec![],
            vec![usage_at - 3, usage_at + 9],
            vec![100_000, 200_000, usage_at - 1, usage_at + 30],
        ] {
            let mut o = observation();
            o.strip_usage(true);
            let mut out = Vec::new();
            let mut from = 0;
            for cut in cuts.iter().copied().chain([stream.len()]) {
                let piece = Bytes::copy_from_slice(&stream.as_bytes()[from..cut]);
                out.extend_from_slice(&o.frame_stripping(&piece));
                from = cut;
            }
            out.extend_from_slice(&o.finish_stripping());
            assert_eq!(out.len(), want.len(), "cuts {cuts:?}");
            assert!(out == want.as_bytes(), "cuts {cuts:?}");
            assert_eq!(o.usage_prompt_tokens, Some(4), "cuts {cuts:?}");
            o.end();
        }
    }

    #[test]
    fn a_json_answers_usage_is_read_wherever_its_frames_split_it() {
        let answer = br#"{"id":"x","choices":[{"message":{"content":"the \"prompt_tokens\": 5 of it"}}],"usage":{"prompt_tokens": 1234,"prompt_tokens_details":{"cached_tokens":9},"completion_tokens":567,"total_tokens":1801}}"#;
        let read = |frames: &[&[u8]]| {
            let mut o = observation_of(false);
            for f in frames {
                o.frame(f);
            }
            let got = (o.usage_prompt_tokens, o.usage_completion_tokens);
            o.end();
            got
        };
        let want = (Some(1234), Some(567));
        for cut in 0..=answer.len() {
            let (x, y) = answer.split_at(cut);
            assert_eq!(read(&[x, y]), want, "cut at {cut}");
        }
        // A byte a frame, and frames of every size up to the answer's.
        let bytes: Vec<&[u8]> = answer.chunks(1).collect();
        assert_eq!(read(&bytes), want);
        for size in 2..answer.len() {
            let frames: Vec<&[u8]> = answer.chunks(size).collect();
            assert_eq!(read(&frames), want, "frames of {size}");
        }
        // A number cut by the end of the body is not a count.
        assert_eq!(
            read(&[br#"{"usage":{"completion_tokens":56"#]),
            (None, None)
        );
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
            Event::Usage(Usage {
                completion: Some(12),
                prompt: Some(3)
            })
        ));
        assert!(matches!(classify(b"[DONE]"), Event::Finished));
        let completion = |hay: &[u8]| Usage::of(hay).completion;
        assert_eq!(completion(b"\"completion_tokens\": 42}"), Some(42));
        assert_eq!(completion(b"\"completion_tokens\":x"), None);
        assert_eq!(
            completion(b"\"completion_tokens\":99999999999999999999999"),
            None
        );
        // The details object is not the count; a count inside generated
        // text is escaped and not read.
        assert_eq!(
            Usage::of(
                br#"{"usage":{"prompt_tokens_details":{"cached_tokens":5},"prompt_tokens":812}}"#
            )
            .prompt,
            Some(812)
        );
        assert_eq!(
            Usage::of(br#"{"content":"say \"prompt_tokens\": 7"}"#).prompt,
            None
        );
    }
}
