//! model-sim's HTTP surface: OpenAI completions (streaming and not),
//! `/v1/models`, `/health` and `/metrics`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Shared;
use super::engine::{Progress, Submission};
use super::request::{self, ApiError, Endpoint, ParsedRequest};

pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = crate::accept::AcceptRetry::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                retry.accepted("model-sim");
                stream
            }
            // Out of file descriptors and the like: back off, keep serving.
            Err(e) => {
                tokio::time::sleep(retry.failed("model-sim", &e)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

/// A response body: a whole buffer or a token stream.
#[derive(Debug)]
pub enum SimBody {
    Full(Option<Bytes>),
    Stream(Box<TokenStream>),
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Stream(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<SimBody> {
    let mut r = Response::new(SimBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn error(e: &ApiError) -> Response<SimBody> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    respond(status, "application/json", e.to_json())
}

fn unavailable(message: &str) -> Response<SimBody> {
    error(&ApiError {
        status: 503,
        message: message.into(),
        kind: "ServiceUnavailableError",
        param: None,
        code: None,
    })
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<SimBody> {
    let path = req.uri().path();
    let method = req.method().clone();
    match path {
        "/health" => match method {
            Method::GET | Method::HEAD if shared.is_ready() => {
                respond(StatusCode::OK, "text/plain", "")
            }
            Method::GET | Method::HEAD => unavailable("starting or draining"),
            _ => method_not_allowed(),
        },
        "/metrics" => match method {
            Method::GET => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                shared
                    .metrics
                    .render(&shared.config.model, shared.config.timing.kv_capacity),
            ),
            _ => method_not_allowed(),
        },
        "/v1/models" => match method {
            Method::GET => respond(
                StatusCode::OK,
                "application/json",
                serde_json::json!({
                    "object": "list",
                    "data": std::iter::once(&shared.config.model)
                        .chain(&shared.config.aliases)
                        .map(|id| serde_json::json!({
                            "id": id,
                            "object": "model",
                            "created": unix_now(),
                            "owned_by": "scalecar-model-sim",
                        }))
                        .collect::<Vec<_>>(),
                })
                .to_string(),
            ),
            _ => method_not_allowed(),
        },
        "/v1/chat/completions" | "/v1/completions" => {
            if method != Method::POST {
                return method_not_allowed();
            }
            let endpoint = if path == "/v1/chat/completions" {
                Endpoint::Chat
            } else {
                Endpoint::Completions
            };
            completion(req, endpoint, shared).await
        }
        _ => error(&ApiError {
            status: 404,
            message: format!("no route for {path}"),
            kind: "NotFoundError",
            param: None,
            code: None,
        }),
    }
}

fn method_not_allowed() -> Response<SimBody> {
    error(&ApiError {
        status: 405,
        message: "method not allowed".into(),
        kind: "invalid_request_error",
        param: None,
        code: None,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counts a request in flight until dropped (drain waits on it).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

async fn completion(
    req: Request<Incoming>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
) -> Response<SimBody> {
    if !shared.is_ready() {
        return unavailable("the model server is starting or draining");
    }
    let guard = InFlight::new(&shared);
    let limit = shared.config.max_body_bytes;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(&ApiError {
                status: 413,
                message: format!("request body is larger than {limit} bytes"),
                kind: "invalid_request_error",
                param: None,
                code: None,
            });
        }
        Err(e) => {
            return error(&ApiError::bad_request(
                format!("reading the request body: {e}"),
                None,
            ));
        }
    };
    let parsed = match request::parse(
        &body,
        endpoint,
        &|m| shared.config.serves(m),
        shared.config.default_max_tokens,
        shared.config.chars_per_token,
    ) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    let timing = &shared.config.timing;
    let need = u64::from(parsed.prompt_tokens) + u64::from(parsed.max_tokens);
    if need > timing.kv_capacity {
        return error(&ApiError::bad_request(
            format!(
                "this model's KV cache holds {} tokens; the request needs {need} ({} prompt + {} completion)",
                timing.kv_capacity, parsed.prompt_tokens, parsed.max_tokens
            ),
            Some("max_tokens"),
        ));
    }
    let arrived = Instant::now();
    // Disaggregated decode: the prompt's KV arrives from the prefill replica
    // first, then only decoding remains.
    if parsed.remote_prefill {
        tokio::time::sleep(timing.kv_transfer(parsed.prompt_tokens)).await;
    }
    let progress = Arc::new(Progress::new());
    let request_no = shared.request_counter.fetch_add(1, Ordering::Relaxed);
    let submission = Submission {
        prompt_tokens: parsed.prompt_tokens,
        max_tokens: parsed.max_tokens,
        prefilled: parsed.remote_prefill,
        arrived,
        progress: progress.clone(),
    };
    if shared.engine.send(submission).is_err() {
        return unavailable("the engine has stopped");
    }
    let text = TokenText::new(shared.config.seed, request_no);
    let header = ChunkHeader::new(endpoint, request_no, &shared.config.model);
    if parsed.stream {
        let stream = TokenStream {
            progress,
            text,
            header,
            endpoint,
            max_tokens: parsed.max_tokens,
            prompt_tokens: parsed.prompt_tokens,
            include_usage: parsed.include_usage,
            emitted: 0,
            done: false,
            _guard: guard,
        };
        let mut r = Response::new(SimBody::Stream(Box::new(stream)));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        return r;
    }
    // Non-streaming: wait for the whole generation. A dropped connection
    // drops this future; the guard below cancels the sequence.
    let cancel = CancelOnDrop(progress.clone());
    std::future::poll_fn(|cx| {
        progress.waker.register(cx.waker());
        if progress.finished.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    drop(cancel);
    let generated = progress.generated.load(Ordering::Acquire);
    if generated == 0 {
        return unavailable("the request was dropped by the engine");
    }
    let mut content = String::new();
    for i in 0..generated {
        content.push_str(text.word(i));
    }
    let body = complete_body(
        &shared, endpoint, &header.id, &parsed, generated, &content, request_no,
    );
    drop(guard);
    respond(StatusCode::OK, "application/json", body)
}

struct CancelOnDrop(Arc<Progress>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.0.finished.load(Ordering::Acquire) {
            self.0.cancelled.store(true, Ordering::Release);
        }
    }
}

fn complete_body(
    shared: &Shared,
    endpoint: Endpoint,
    id: &str,
    parsed: &ParsedRequest,
    generated: u32,
    content: &str,
    request_no: u64,
) -> String {
    let finish = if generated >= parsed.max_tokens {
        "length"
    } else {
        "abort"
    };
    let usage = serde_json::json!({
        "prompt_tokens": parsed.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": parsed.prompt_tokens + generated,
    });
    let mut body = match endpoint {
        Endpoint::Chat => serde_json::json!({
            "id": id,
            "object": "chat.completion",
            "created": unix_now(),
            "model": parsed.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": null,
                "finish_reason": finish,
            }],
            "usage": usage,
        }),
        Endpoint::Completions => serde_json::json!({
            "id": id,
            "object": "text_completion",
            "created": unix_now(),
            "model": parsed.model,
            "choices": [{"index": 0, "text": content, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }),
    };
    if parsed.remote_decode {
        // What a decode replica needs to pull this prompt's KV (vLLM's
        // NixlConnector fields).
        let blocks = parsed.prompt_tokens.div_ceil(16);
        body["kv_transfer_params"] = serde_json::json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": shared.engine_id,
            "remote_block_ids": (0..blocks.min(4096)).collect::<Vec<u32>>(),
            "remote_host": shared.addr.ip().to_string(),
            "remote_port": shared.addr.port(),
            "remote_request_id": format!("{}-{request_no}", shared.engine_id),
        });
    }
    body.to_string()
}

/// Deterministic token text: the word of token `i` of one request.
#[derive(Debug, Clone, Copy)]
struct TokenText {
    key: u64,
}

const WORDS: [&str; 32] = [
    " the",
    " model",
    " scales",
    " with",
    " load",
    " and",
    " tokens",
    " flow",
    " through",
    " a",
    " proxy",
    " that",
    " sees",
    " every",
    " burst",
    " first",
    " while",
    " queues",
    " grow",
    " slowly",
    " on",
    " busy",
    " GPUs",
    " so",
    " replicas",
    " rise",
    " early",
    " then",
    " fall",
    " when",
    " idle",
    ".",
];

impl TokenText {
    fn new(seed: u64, request_no: u64) -> Self {
        TokenText {
            key: splitmix(seed ^ request_no.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        }
    }

    fn word(&self, i: u32) -> &'static str {
        WORDS[(splitmix(self.key ^ u64::from(i)) % WORDS.len() as u64) as usize]
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The parts of every chunk that do not change within a request.
#[derive(Debug)]
struct ChunkHeader {
    id: String,
    /// `data: {"id":…,"choices":[{"index":0,` up to the token field.
    prefix: Bytes,
    model: String,
    created: u64,
    object: &'static str,
}

impl ChunkHeader {
    fn new(endpoint: Endpoint, request_no: u64, model: &str) -> Self {
        let (id, object) = match endpoint {
            Endpoint::Chat => (
                format!("chatcmpl-sim{request_no:016x}"),
                "chat.completion.chunk",
            ),
            Endpoint::Completions => (format!("cmpl-sim{request_no:016x}"), "text_completion"),
        };
        let created = unix_now();
        let model_json = serde_json::Value::from(model).to_string();
        let prefix = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model_json},\"choices\":[{{\"index\":0,"
        );
        ChunkHeader {
            id,
            prefix: Bytes::from(prefix),
            model: model_json,
            created,
            object,
        }
    }
}

/// A streaming response: SSE chunks as the engine generates tokens.
#[derive(Debug)]
pub struct TokenStream {
    progress: Arc<Progress>,
    text: TokenText,
    header: ChunkHeader,
    endpoint: Endpoint,
    max_tokens: u32,
    prompt_tokens: u32,
    include_usage: bool,
    emitted: u32,
    done: bool,
    _guard: InFlight,
}

impl TokenStream {
    fn push_token(&self, buf: &mut BytesMut, i: u32) {
        buf.put_slice(&self.header.prefix);
        let word = self.text.word(i);
        let last = i + 1 >= self.max_tokens;
        match self.endpoint {
            Endpoint::Chat if i == 0 => {
                buf.put_slice(b"\"delta\":{\"role\":\"assistant\",\"content\":\"");
            }
            Endpoint::Chat => buf.put_slice(b"\"delta\":{\"content\":\""),
            Endpoint::Completions => buf.put_slice(b"\"text\":\""),
        }
        buf.put_slice(word.as_bytes());
        match self.endpoint {
            Endpoint::Chat => buf.put_slice(b"\"},"),
            Endpoint::Completions => buf.put_slice(b"\","),
        }
        if last {
            buf.put_slice(b"\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n");
        } else {
            buf.put_slice(b"\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        }
    }

    fn push_tail(&self, buf: &mut BytesMut) {
        if self.include_usage {
            let usage = format!(
                "data: {{\"id\":\"{}\",\"object\":\"{}\",\"created\":{},\"model\":{},\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\n",
                self.header.id,
                self.header.object,
                self.header.created,
                self.header.model,
                self.prompt_tokens,
                self.emitted,
                self.prompt_tokens + self.emitted
            );
            buf.put_slice(usage.as_bytes());
        }
        buf.put_slice(b"data: [DONE]\n\n");
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let generated = self.progress.generated.load(Ordering::Acquire);
            if generated > self.emitted {
                let n = (generated - self.emitted) as usize;
                let mut buf = BytesMut::with_capacity(n * (self.header.prefix.len() + 96));
                for i in self.emitted..generated {
                    self.push_token(&mut buf, i);
                }
                self.emitted = generated;
                if self.progress.finished.load(Ordering::Acquire)
                    && self.progress.generated.load(Ordering::Acquire) == self.emitted
                {
                    self.push_tail(&mut buf);
                    self.done = true;
                }
                return Poll::Ready(Some(buf.freeze()));
            }
            if self.progress.finished.load(Ordering::Acquire) {
                self.done = true;
                if self.emitted == 0 {
                    // Dropped by the engine before any token: end without
                    // [DONE], as a broken stream.
                    return Poll::Ready(None);
                }
                let mut buf = BytesMut::with_capacity(256);
                self.push_tail(&mut buf);
                return Poll::Ready(Some(buf.freeze()));
            }
            // Register, then look again, so a wake between the check and
            // the registration is not lost.
            self.progress.waker.register(cx.waker());
            if self.progress.generated.load(Ordering::Acquire) == self.emitted
                && !self.progress.finished.load(Ordering::Acquire)
            {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        // The client went away (or the stream ended): free the sequence.
        if !self.progress.finished.load(Ordering::Acquire) {
            self.progress.cancelled.store(true, Ordering::Release);
        }
    }
}
