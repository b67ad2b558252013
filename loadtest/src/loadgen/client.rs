//! A streaming OpenAI client that measures what a user feels: time to first
//! content token, the gaps between tokens, and the whole request.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::arrivals::Arrival;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// Could not connect or send.
    Connect,
    /// 429 Too Many Requests (the proxy's full queue).
    Throttled,
    /// 503 and other 5xx answers.
    ServerError,
    /// Other 4xx answers.
    ClientError,
    /// The response started but broke before `[DONE]`.
    Stream,
    /// No answer within the request timeout.
    Timeout,
    /// Not sent: too many requests outstanding at the client.
    Dropped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Connect => "connect",
            Outcome::Throttled => "throttled",
            Outcome::ServerError => "server_error",
            Outcome::ClientError => "client_error",
            Outcome::Stream => "stream",
            Outcome::Timeout => "timeout",
            Outcome::Dropped => "dropped",
        }
    }
}

/// What one request saw.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Planned send time, from the start of the run.
    pub at: Duration,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub ttft: Option<Duration>,
    pub e2e: Duration,
    /// Content events received.
    pub tokens: u32,
    /// Gaps between consecutive content events.
    pub itl_sum: Duration,
    pub itl_max: Duration,
    /// `usage.completion_tokens` when the server sent it.
    pub usage_completion_tokens: Option<u32>,
}

/// A reusable client for one base URL and model.
#[derive(Debug, Clone)]
pub struct StreamingClient {
    client: Client<HttpConnector, Full<Bytes>>,
    url: hyper::Uri,
    model: String,
    timeout: Duration,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("url {url:?}: {reason}")]
pub struct ClientError {
    pub url: String,
    pub reason: String,
}

/// A prompt that model servers (and model-sim) estimate at about
/// `tokens` tokens: four characters per token.
pub fn prompt_of(tokens: u32) -> String {
    const WORDS: [&str; 8] = [
        "the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "slept ",
    ];
    let target = tokens as usize * 4;
    let mut s = String::with_capacity(target + 8);
    let mut i = 0;
    while s.len() < target {
        s.push_str(WORDS[i % WORDS.len()]);
        i += 1;
    }
    s.truncate(target);
    s
}

impl StreamingClient {
    /// `base` is like `http://127.0.0.1:8080` (requests go to
    /// `/v1/chat/completions` under it).
    pub fn new(base: &str, model: &str, timeout: Duration) -> Result<Self, ClientError> {
        let url: hyper::Uri = format!("{}/v1/chat/completions", base.trim_end_matches('/'))
            .parse()
            .map_err(|e| ClientError {
                url: base.to_string(),
                reason: format!("not a URL: {e}"),
            })?;
        if url.scheme_str() != Some("http") {
            return Err(ClientError {
                url: base.to_string(),
                reason: "only http:// is supported".into(),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(StreamingClient {
            client,
            url,
            model: model.to_string(),
            timeout,
        })
    }

    fn body(&self, a: &Arrival) -> Bytes {
        let body = serde_json::json!({
            "model": self.model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": a.max_tokens,
            "messages": [{"role": "user", "content": prompt_of(a.prompt_tokens)}],
        });
        Bytes::from(body.to_string())
    }

    /// Sends one streaming chat completion and measures it.
    pub async fn send(&self, a: &Arrival) -> RequestRecord {
        let start = Instant::now();
        let mut rec = RequestRecord {
            at: a.at,
            prompt_tokens: a.prompt_tokens,
            max_tokens: a.max_tokens,
            outcome: Outcome::Ok,
            status: None,
            ttft: None,
            e2e: Duration::ZERO,
            tokens: 0,
            itl_sum: Duration::ZERO,
            itl_max: Duration::ZERO,
            usage_completion_tokens: None,
        };
        let result = tokio::time::timeout(self.timeout, self.exchange(a, start, &mut rec)).await;
        if result.is_err() {
            rec.outcome = Outcome::Timeout;
        }
        rec.e2e = start.elapsed();
        rec
    }

    async fn exchange(&self, a: &Arrival, start: Instant, rec: &mut RequestRecord) {
        let request = Request::post(self.url.clone())
            .header("content-type", "application/json")
            .body(Full::new(self.body(a)));
        let Ok(request) = request else {
            rec.outcome = Outcome::ClientError;
            return;
        };
        let response = match self.client.request(request).await {
            Ok(r) => r,
            Err(_) => {
                rec.outcome = Outcome::Connect;
                return;
            }
        };
        let status = response.status();
        rec.status = Some(status.as_u16());
        if !status.is_success() {
            rec.outcome = match status.as_u16() {
                429 => Outcome::Throttled,
                500..=599 => Outcome::ServerError,
                _ => Outcome::ClientError,
            };
            return;
        }
        let mut body = response.into_body();
        let mut parser = SseLines::default();
        let mut last_token: Option<Instant> = None;
        let mut done = false;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                rec.outcome = Outcome::Stream;
                return;
            };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let now = Instant::now();
            parser.feed(data, |event| match classify(event) {
                Event::Content => {
                    if rec.ttft.is_none() {
                        rec.ttft = Some(now - start);
                    }
                    if let Some(prev) = last_token {
                        let gap = now - prev;
                        rec.itl_sum += gap;
                        rec.itl_max = rec.itl_max.max(gap);
                    }
                    last_token = Some(now);
                    rec.tokens += 1;
                }
                Event::Usage(n) => rec.usage_completion_tokens = n,
                Event::Done => done = true,
                Event::Other => {}
            });
        }
        if !done {
            rec.outcome = Outcome::Stream;
        }
    }
}

enum Event {
    Content,
    Usage(Option<u32>),
    Done,
    Other,
}

fn classify(data: &[u8]) -> Event {
    if data == b"[DONE]" {
        return Event::Done;
    }
    let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
    if has(b"\"choices\":[]") || has(b"\"choices\": []") {
        let n = serde_json::from_slice::<serde_json::Value>(data)
            .ok()
            .and_then(|v| v.get("usage")?.get("completion_tokens")?.as_u64())
            .and_then(|n| u32::try_from(n).ok());
        return Event::Usage(n);
    }
    if has(b"\"content\":\"")
        || has(b"\"content\": \"")
        || has(b"\"text\":\"")
        || has(b"\"text\": \"")
    {
        // An empty content string (the role-only first chunk) is not a token.
        if has(b"\"content\":\"\"") || has(b"\"content\": \"\"") {
            return Event::Other;
        }
        return Event::Content;
    }
    Event::Other
}

/// Splits an SSE byte stream into `data:` payloads across chunk boundaries.
#[derive(Debug, Default)]
struct SseLines {
    partial: Vec<u8>,
}

impl SseLines {
    fn feed(&mut self, chunk: &[u8], mut on_data: impl FnMut(&[u8])) {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            rest = &tail[1..];
            let line: &[u8] = if self.partial.is_empty() {
                line
            } else {
                self.partial.extend_from_slice(line);
                &self.partial
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(data) = line.strip_prefix(b"data:") {
                let data = data.strip_prefix(b" ").unwrap_or(data);
                on_data(data);
            }
            self.partial.clear();
        }
        self.partial.extend_from_slice(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_has_four_chars_per_token() {
        assert_eq!(prompt_of(0), "");
        assert_eq!(prompt_of(2000).len(), 8000);
    }

    #[test]
    fn sse_lines_survive_any_split() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut p = SseLines::default();
            let mut seen = Vec::new();
            let (a, b) = stream.split_at(cut);
            for part in [a, b] {
                p.feed(part, |d| seen.push(d.to_vec()));
            }
            assert_eq!(seen.len(), 3, "cut at {cut}");
            assert!(matches!(classify(&seen[0]), Event::Content));
            assert!(matches!(classify(&seen[1]), Event::Usage(Some(1))));
            assert!(matches!(classify(&seen[2]), Event::Done));
        }
    }

    #[test]
    fn role_only_chunk_is_not_a_token() {
        let role = br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        assert!(matches!(classify(role), Event::Other));
    }
}
