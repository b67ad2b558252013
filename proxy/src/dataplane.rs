//! The request path: bounded body read, the few fields routing needs, and
//! the route lookup. Admission, forwarding and the observed response are
//! `crate::forward`'s; the PD two-stage flow for disaggregated models is
//! [`crate::pd`]'s. Neither imports this module.
//!
//! The request body goes upstream byte for byte as the client sent it; only
//! the PD flow rewrites it. Hop-by-hop headers are dropped both ways, and
//! only the pool chooses the upstream — never the Host header or an
//! absolute URI (no open proxy).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use scalecar_config::Limits;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::body::{ProxyBody, full};
use crate::error::{ApiError, error_response};
use crate::forward::{ForwardRequest, Forwarder, strip_hop_by_hop};
use crate::metrics::{ProxyMetrics, Rejection};
use crate::routes::{ModelRoute, RouteTable, Routes};
use crate::upstream::Upstream;

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
    #[serde(borrow)]
    pub stream_options: Option<&'a RawValue>,
}

impl RequestFields<'_> {
    /// About four characters a token, from the prompt's JSON text: known
    /// before the model server tokenizes it. Media are not their bytes: a
    /// base64 payload (an image's or a file's data URL, an audio clip's
    /// `input_audio.data`) is left out of the text, and each media part
    /// (inline or fetched) counts [`MEDIA_TOKENS`] — a 1 MB screenshot is
    /// a thousand-odd tokens to a vision model, not 250,000.
    pub fn prompt_tokens(&self) -> u64 {
        let (mut text, mut media) = (0usize, 0u64);
        for raw in [self.messages, self.prompt, self.input].iter().flatten() {
            let json = raw.get().as_bytes();
            let (inline, items) = media_in(json);
            text += json.len().saturating_sub(inline);
            media += items;
        }
        (text as u64)
            .div_ceil(4)
            .saturating_add(media.saturating_mul(MEDIA_TOKENS))
            .max(1)
    }
}

/// What one media part (an image, an audio clip, a file) is taken to cost
/// before the model server says: vision encoders give 256 (Gemma 3) to
/// ~1,600 (Llama 3.2 Vision, a tile) tokens an image, audio encoders ~25 a
/// second (40 s of speech here); the pool's calibration from usage
/// corrects the average.
pub const MEDIA_TOKENS: u64 = 1024;

/// How a media key's string value holds its payload.
#[derive(Clone, Copy)]
enum Payload {
    /// A URL: a `data:…;base64,` URL's payload is binary, a link is short.
    Url,
    /// Raw base64 (`input_audio.data`): all of it is binary.
    Base64,
}

struct MediaNeedles {
    /// `url` keys (image_url, audio_url, video_url).
    url: memchr::memmem::Finder<'static>,
    /// The end of `data` (input_audio) and `file_data` (file parts) keys:
    /// one search for both, told apart by what precedes it.
    data: memchr::memmem::Finder<'static>,
    base64: memchr::memmem::Finder<'static>,
}

static MEDIA: std::sync::LazyLock<MediaNeedles> = std::sync::LazyLock::new(|| MediaNeedles {
    url: memchr::memmem::Finder::new(b"\"url\""),
    data: memchr::memmem::Finder::new(b"data\""),
    base64: memchr::memmem::Finder::new(b";base64,"),
});

/// The bytes of media payloads, and how many media parts, in a prompt's
/// JSON text. The keys of media parts (`url`, `file_data`, `data`) appear
/// unescaped in a prompt's JSON only as keys of its structure; in text
/// they are escaped and do not match. A `data` key counts only with a
/// string value of at least [`MIN_INLINE_AUDIO`] bytes (the messages'
/// own structure has no other such key; a short one is left as text).
/// Two SIMD searches, whatever the number of keys.
fn media_in(json: &[u8]) -> (usize, u64) {
    let (mut inline, mut items) = (0, 0);
    let after_space = |at: usize| {
        json.get(at..)
            .and_then(|rest| rest.iter().position(|b| !b.is_ascii_whitespace()))
            .map(|skip| at + skip)
    };
    // (where a key ends, how its value holds the payload)
    let urls = MEDIA
        .url
        .find_iter(json)
        .map(|at| (at + MEDIA.url.needle().len(), Payload::Url));
    let data = MEDIA.data.find_iter(json).filter_map(|at| {
        let end = at + MEDIA.data.needle().len();
        if at >= 1 && json.get(at - 1) == Some(&b'"') {
            Some((end, Payload::Base64))
        } else if at >= 6 && json.get(at - 6..at) == Some(b"\"file_".as_slice()) {
            Some((end, Payload::Url))
        } else {
            None
        }
    });
    for (key_end, payload) in urls.chain(data) {
        // A key: a colon follows (a "url" value would not have one).
        let Some(colon) = after_space(key_end).filter(|at| json.get(*at) == Some(&b':')) else {
            continue;
        };
        let string = after_space(colon + 1)
            .filter(|at| json.get(*at) == Some(&b'"'))
            .and_then(|at| json.get(at + 1..))
            .map(|string| {
                // A JSON string's end: the next quote (base64 and media
                // types hold no escapes); a value cut short ends with
                // the text.
                let end = memchr::memchr(b'"', string).unwrap_or(string.len());
                string.get(..end).unwrap_or(string)
            });
        match (payload, string) {
            (Payload::Url, Some(string)) => {
                items += 1;
                if string.starts_with(b"data:")
                    && let Some(at) = MEDIA.base64.find(string)
                {
                    inline += string.len() - at - MEDIA.base64.needle().len();
                }
            }
            (Payload::Url, None) => items += 1,
            (Payload::Base64, Some(string)) if string.len() >= MIN_INLINE_AUDIO => {
                items += 1;
                inline += string.len();
            }
            (Payload::Base64, _) => {}
        }
    }
    (inline, items)
}

/// The shortest `data` string taken for an audio clip: 1,000 base64
/// characters are 750 bytes, a few milliseconds of sound.
const MIN_INLINE_AUDIO: usize = 1000;

/// The data plane: routes, upstream connections, limits and metrics.
///
/// One per worker thread ([`DataPlane::for_worker`]): the routes, pools,
/// signals and metrics are shared; the upstream connections and the request
/// id counter are the worker's own.
pub struct DataPlane {
    routes: Arc<RouteTable>,
    forwarder: Forwarder,
    pub limits: Limits,
    pub metrics: ProxyMetrics,
    request_ids: AtomicU64,
    /// Tells this process's and this worker's request ids apart.
    id_prefix: String,
    instance: u64,
    /// Worker threads serving the proxy listener.
    pub workers: usize,
}

impl fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataPlane")
            .field("models", &self.routes.snapshot().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

use crate::forward::X_REQUEST_ID;

impl DataPlane {
    /// A data plane served by one worker per core.
    pub fn new(routes: Routes, limits: Limits, metrics: ProxyMetrics) -> Self {
        Self::with_table(Arc::new(RouteTable::new(routes)), limits, metrics)
    }

    /// A data plane on a route table others may change while it serves.
    pub fn with_table(routes: Arc<RouteTable>, limits: Limits, metrics: ProxyMetrics) -> Self {
        let instance = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_parts(routes, limits, metrics, instance, None, workers)
    }

    fn with_parts(
        routes: Arc<RouteTable>,
        limits: Limits,
        metrics: ProxyMetrics,
        instance: u64,
        worker: Option<usize>,
        workers: usize,
    ) -> Self {
        let id_prefix = match worker {
            Some(w) => format!("scalecar-{:x}-{w}-", instance & 0xffff_ffff),
            None => format!("scalecar-{:x}-", instance & 0xffff_ffff),
        };
        DataPlane {
            forwarder: Forwarder {
                upstream: Upstream::new(limits.connect_timeout, limits.upstream_idle_timeout),
                limits: limits.clone(),
            },
            routes,
            limits,
            metrics,
            request_ids: AtomicU64::new(0),
            id_prefix,
            instance,
            workers,
        }
    }

    /// Sets how many worker threads serve the proxy listener (at least 1).
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Worker `index`'s data plane: the same routes, pools and metrics, its
    /// own upstream connections.
    pub fn for_worker(&self, index: usize) -> DataPlane {
        Self::with_parts(
            self.routes.clone(),
            self.limits.clone(),
            self.metrics.clone(),
            self.instance,
            Some(index),
            self.workers,
        )
    }

    /// The route table (shared by all workers).
    pub fn routes(&self) -> &Arc<RouteTable> {
        &self.routes
    }

    /// The entry serving `model` in `role`, for live views and tests.
    pub fn find(
        &self,
        model: &str,
        role: scalecar_config::Role,
    ) -> Option<Arc<crate::routes::PoolEntry>> {
        self.routes()
            .get(model)?
            .entries()
            .find(|e| e.pool.role == role)
            .cloned()
    }

    pub(crate) fn upstream(&self) -> &Arc<Upstream> {
        &self.forwarder.upstream
    }

    fn request_id(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers
            .get(X_REQUEST_ID)
            .filter(|v| !v.is_empty() && v.len() <= 200)
        {
            return v.clone();
        }
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.id_prefix.len() + 16);
        id.push_str(&self.id_prefix);
        push_hex(&mut id, n);
        HeaderValue::from_maybe_shared(Bytes::from(id))
            .unwrap_or_else(|_| HeaderValue::from_static("scalecar"))
    }

    /// Serves one client request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_id = self.request_id(req.headers());
        let route = match req.uri().path() {
            "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => Some(true),
            "/v1/models" => Some(false),
            _ => None,
        };
        let mut response = match (req.method(), route) {
            (&Method::POST, Some(true)) => {
                // Every log line about the request carries its id (a
                // debug-level span: free when debug logs are off).
                let span = tracing::debug_span!(
                    "request",
                    id = request_id.to_str().unwrap_or(""),
                    path = req.uri().path(),
                    model = tracing::field::Empty,
                    role = tracing::field::Empty,
                    endpoint = tracing::field::Empty,
                    outcome = tracing::field::Empty,
                );
                tracing::Instrument::instrument(
                    self.completion(req, start, request_id.clone()),
                    span,
                )
                .await
            }
            (&Method::GET, Some(false)) => self.models(),
            (_, Some(_)) => error_response(&ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                None,
            )),
            (_, None) => {
                self.metrics.rejected(Rejection::not_found);
                error_response(&ApiError::not_found(format!(
                    "no route for {}",
                    req.uri().path()
                )))
            }
        };
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        response
    }

    fn models(&self) -> Response<ProxyBody> {
        let mut r = Response::new(full(self.models_json()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    /// `GET /v1/models`'s answer: every routed name.
    pub(crate) fn models_json(&self) -> String {
        let routes = self.routes.snapshot();
        let mut names: Vec<&String> = routes.keys().collect();
        names.sort();
        let data: Vec<_> = names
            .into_iter()
            .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "scalecar"}))
            .collect();
        serde_json::json!({"object": "list", "data": data}).to_string()
    }

    async fn completion(
        &self,
        req: Request<Incoming>,
        start: Instant,
        request_id: HeaderValue,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let limit = self.limits.max_body_bytes;
        let timeout = self.limits.body_timeout;
        let read = tokio::time::timeout(timeout, read_body(body, limit)).await;
        let body = match read.unwrap_or(Err(BodyError::TimedOut)) {
            Ok(b) => b,
            Err(BodyError::TimedOut) => {
                // hyper closes the connection after this answer: the rest
                // of the body is never waited for.
                self.metrics.rejected(Rejection::body_timeout);
                return error_response(&ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {}",
                        humantime::format_duration(timeout)
                    ),
                    None,
                ));
            }
            Err(BodyError::TooLarge) => {
                self.metrics.rejected(Rejection::body_too_large);
                return error_response(&ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {limit} bytes"),
                    None,
                ));
            }
            Err(BodyError::Read(e)) => {
                self.metrics.rejected(Rejection::bad_request);
                return error_response(&ApiError::bad_request(
                    format!("reading the request body: {e}"),
                    None,
                ));
            }
        };
        let parsed = match parse_request(&body) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.rejected(Rejection::bad_request);
                return error_response(&e);
            }
        };
        let model = parsed.model;
        let Some(route) = self.routes.get(model.as_ref()) else {
            self.metrics.rejected(Rejection::unknown_model);
            return error_response(&ApiError::model_not_found(&model));
        };
        let prompt_tokens = parsed.prompt_tokens;
        let streaming = parsed.streaming;
        // A stream whose client set no stream options is asked for its
        // usage chunk (cut from the answer again): every stream then
        // teaches token counts and the prompt calibration.
        let strip_usage = streaming && !parsed.stream_options && self.limits.stream_usage;
        let body = if strip_usage {
            with_stream_usage(&body)
        } else {
            body
        };
        // Only the path and query go upstream (origin form), whatever form
        // the client used.
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        // The body is here already: an expectation was the proxy's to meet.
        headers.remove(header::EXPECT);
        headers.insert(X_REQUEST_ID, request_id);
        let request = ForwardRequest {
            path,
            headers,
            body,
            prompt_tokens,
            streaming,
            strip_usage,
            start,
        };
        match &route {
            ModelRoute::Unified(entry) => self.forwarder.forward(entry, request).await,
            ModelRoute::Disaggregated { prefill, decode } => {
                crate::pd::two_stage(&self.forwarder, prefill, decode, request).await
            }
        }
    }
}

/// `body` (a JSON object without `stream_options`) asking for the usage
/// chunk: `"stream_options":{"include_usage":true}` first in the object.
/// One copy of the body; nothing else in it moves.
pub(crate) fn with_stream_usage(body: &Bytes) -> Bytes {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let Some(open) = body.iter().position(|b| *b == b'{') else {
        return body.clone();
    };
    let mut out = bytes::BytesMut::with_capacity(body.len() + FIELD.len());
    out.extend_from_slice(body.get(..=open).unwrap_or_default());
    out.extend_from_slice(FIELD);
    out.extend_from_slice(body.get(open + 1..).unwrap_or_default());
    out.freeze()
}

/// What routing takes from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest<'a> {
    /// Borrowed from the body unless the name has escapes.
    pub model: std::borrow::Cow<'a, str>,
    /// Estimated from the prompt's JSON text (see `RequestFields`).
    pub prompt_tokens: u64,
    pub streaming: bool,
    /// The client set `stream_options` (then its body is forwarded as is).
    pub stream_options: bool,
}

/// Reads the routing fields of a request body, or says (as a 400) what is
/// wrong with it. Pure: no I/O, no metrics; fuzzed.
pub fn parse_request(body: &[u8]) -> Result<ParsedRequest<'_>, ApiError> {
    // serde reads a struct from an array too (fields by position): only
    // an object is a request body.
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first.is_some_and(|b| b != b'{') {
        let got = match first {
            Some(b'[') => "an array",
            Some(b'"') => "a string",
            Some(b'0'..=b'9' | b'-') => "a number",
            Some(b't' | b'f') => "a boolean",
            Some(b'n') => "null",
            _ => "something else",
        };
        return Err(ApiError::bad_request(
            format!("request body must be a JSON object (got {got})"),
            None,
        ));
    }
    // JSON is UTF-8; serde skips unknown fields' strings without checking
    // them, so a body could otherwise be routed that no model server can
    // read (found by fuzzing).
    let body = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(
            format!(
                "request body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
            None,
        )
    })?;
    let fields: RequestFields<'_> = serde_json::from_str(body).map_err(|e| {
        ApiError::bad_request(
            format!("request body is not a valid JSON object: {e}"),
            None,
        )
    })?;
    let model = match fields.model.map(|m| {
        serde_json::from_str::<&str>(m.get())
            .map(std::borrow::Cow::Borrowed)
            .or_else(|_| serde_json::from_str::<String>(m.get()).map(std::borrow::Cow::Owned))
    }) {
        Some(Ok(m)) if !m.is_empty() => m,
        Some(_) => {
            return Err(ApiError::bad_request(
                "model must be a non-empty string",
                Some("model"),
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "you must provide a model parameter",
                Some("model"),
            ));
        }
    };
    Ok(ParsedRequest {
        model,
        prompt_tokens: fields.prompt_tokens(),
        streaming: fields.stream.unwrap_or(false),
        stream_options: fields.stream_options.is_some(),
    })
}

enum BodyError {
    TooLarge,
    TimedOut,
    Read(hyper::Error),
}

/// The request body, whole, if it is at most `limit` bytes. A declared
/// length over the limit is refused before reading; a body that arrives in
/// one frame (most do) is kept without a copy.
async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    use http_body::Body as _;
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge);
    }
    let mut whole: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers carry nothing routing needs
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(BodyError::TooLarge);
        }
        match (&mut joined, whole.take()) {
            (Some(j), _) => j.extend_from_slice(&data),
            (None, None) => whole = Some(data),
            (None, Some(first)) => {
                let mut j = bytes::BytesMut::with_capacity(first.len() + data.len());
                j.extend_from_slice(&first);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
        }
    }
    Ok(match joined {
        Some(j) => j.freeze(),
        None => whole.unwrap_or_default(),
    })
}

fn push_hex(out: &mut String, mut n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        out.push(char::from(b));
    }
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
    fn hex_ids() {
        for n in [0u64, 9, 10, 255, 0xdead_beef, u64::MAX] {
            let mut s = String::new();
            push_hex(&mut s, n);
            assert_eq!(s, format!("{n:x}"));
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_is_refused() {
        // An unknown field's string is skipped by serde without a UTF-8
        // check: the whole body is checked first.
        let body = b"{\"model\":\"m\",\"x\":\"\x8f\x8f\"}";
        let e = parse_request(body).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.message,
            "request body is not UTF-8 (invalid byte at offset 18)"
        );
        assert_eq!(parse_request(br#"{"model":"m"}"#).unwrap().model, "m");
    }

    #[test]
    fn prompt_tokens_are_estimated_from_the_prompt_json() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}]}"#;
        let f: RequestFields<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(f.prompt_tokens(), 18);
        let f: RequestFields<'_> = serde_json::from_slice(br#"{"model":"m"}"#).unwrap();
        assert_eq!(f.prompt_tokens(), 1);
    }

    #[test]
    fn an_image_is_counted_as_an_image_not_as_its_bytes() {
        let text = "describe this picture in detail please";
        let picture = "QUJD".repeat(250_000); // a megabyte of base64
        let body = |parts: String| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":[{parts}]}}]}}"#)
        };
        let text_part = format!(r#"{{"type":"text","text":"{text}"}}"#);
        let tokens = |b: String| {
            let f: RequestFields<'_> = serde_json::from_slice(b.as_bytes()).unwrap();
            f.prompt_tokens()
        };
        let alone = tokens(body(text_part.clone()));
        let inline = tokens(body(format!(
            r#"{text_part},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{picture}"}}}}"#
        )));
        let fetched = tokens(body(format!(
            r#"{text_part},{{"type":"image_url","image_url":{{"url":"https://example.com/cat.png"}}}}"#
        )));
        // The image's part costs its JSON around the payload and one image.
        assert!(
            (MEDIA_TOKENS..MEDIA_TOKENS + 40).contains(&(inline - alone)),
            "{alone} → {inline}"
        );
        assert!(
            (MEDIA_TOKENS..MEDIA_TOKENS + 40).contains(&(fetched - alone)),
            "{alone} → {fetched}"
        );
        // Text that talks about URLs and pastes base64 is text.
        let pasted =
            format!(r#"{{"type":"text","text":"a JSON \"url\": field; data:x;base64,{picture}"}}"#);
        assert!(tokens(body(pasted)) > 250_000);
        // A data URL without its closing quote (cut short) still ends.
        assert_eq!(media_in(b"\"url\": \"data:image/png;base64,AAAA"), (4, 1));
        assert_eq!(media_in(b"\"url\":"), (0, 1));
        assert_eq!(media_in(b"\"url\":7"), (0, 1));
    }

    #[test]
    fn audio_and_files_are_counted_as_media_not_as_their_bytes() {
        let clip = "UklG".repeat(100_000); // 300 kB of base64 audio
        let body = |parts: &str| {
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"transcribe"}}{parts}]}}]}}"#
            )
        };
        let tokens = |b: String| {
            let f: RequestFields<'_> = serde_json::from_slice(b.as_bytes()).unwrap();
            f.prompt_tokens()
        };
        let alone = tokens(body(""));
        let audio = tokens(body(&format!(
            r#",{{"type":"input_audio","input_audio":{{"data":"{clip}","format":"wav"}}}}"#
        )));
        let file = tokens(body(&format!(
            r#",{{"type":"file","file":{{"filename":"a.pdf","file_data":"data:application/pdf;base64,{clip}"}}}}"#
        )));
        for (what, n) in [("audio", audio), ("file", file)] {
            assert!(
                (MEDIA_TOKENS..MEDIA_TOKENS + 40).contains(&(n - alone)),
                "{what}: {alone} → {n}"
            );
        }
        // A short `data` string is not a clip (the JSON around it is text),
        // and a clip cut short still ends.
        assert_eq!(media_in(br#"{"data":"abc"}"#), (0, 0));
        let cut = format!(r#""data": "{}"#, "A".repeat(MIN_INLINE_AUDIO));
        assert_eq!(media_in(cut.as_bytes()), (MIN_INLINE_AUDIO, 1));
        // An escaped key in text is text.
        let pasted = format!(r#"{{"text":"\"data\":\"{clip}\""}}"#);
        assert_eq!(media_in(pasted.as_bytes()), (0, 0));
    }
}
