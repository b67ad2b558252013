//! The endpoint picker: scalecar inside a gateway users already run, as
//! the Gateway API Inference Extension defines it — Envoy's external
//! processing protocol (gRPC `envoy.service.ext_proc.v3.ExternalProcessor`)
//! in front of an `ORIGINAL_DST` cluster that sends each request where
//! header `x-gateway-destination-endpoint` says.
//!
//! One gRPC stream is one HTTP request, driven through the same
//! `crate::lifecycle` as scalecar's own proxy: the buffered request body
//! is parsed for its routing fields, the request is admitted to its pool
//! (queued, or held while the pool scales from zero, or refused), and the
//! lease's endpoint is the answer — in the header and, as the protocol
//! asks, in dynamic metadata under `envoy.lb`. When the gateway sends a
//! subset hint (`x-gateway-destination-endpoint-subset` in filter metadata
//! `envoy.lb.subset_hint`) only those endpoints are picked; none of them in
//! the pool is a 503. Refusals are `ImmediateResponse`s: 429 with
//! `Retry-After` for a full queue, 503 when nothing can serve, the OpenAI
//! error JSON as the body.
//!
//! The response comes back through the stream (`response_body_mode:
//! STREAMED` or `FULL_DUPLEX_STREAMED`): its status and every body chunk
//! feed the request's [`Observation`], so TTFT, ITL, tokens and outcomes
//! are the signals and metrics proxy mode records. A stream that ends
//! before the response did (the client went away and Envoy reset it) drops
//! the observation: a cancel, as in proxy mode.
//!
//! Both body modes the Inference Extension's gateways use are served, as
//! Envoy announces them with a stream's first message: `BUFFERED` request
//! bodies (one message; the pick answers it, headers answered at once) and
//! `FULL_DUPLEX_STREAMED` (Envoy streams headers and body without waiting:
//! the headers are answered with the pick once the body has ended, and the
//! body goes back to Envoy whole in a streamed response; in that mode
//! response chunks are sent back as they came, after being measured).
//!
//! What it does not do: disaggregated (prefill/decode) routes, which need
//! two upstream legs only proxy mode makes, are refused with a 501 naming
//! proxy mode; `STREAMED` request bodies are refused with a 500 naming the
//! setting (Envoy would route before the body, and so the model, is seen).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap as PbHeaderMap, HeaderValue as PbHeaderValue, HeaderValueOption, Metadata,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration, StreamedBodyResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use futures_util::Stream;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::accept::Acceptor;
use crate::dataplane::{DataPlane, parse_request};
use crate::error::ApiError;
use crate::lifecycle::{self, Arrival};
use crate::metrics::{Listener, Rejection};
use crate::observe::Observation;
use crate::pool::Among;
use crate::routes::ModelRoute;
use crate::server::drain;

/// The header (and `envoy.lb` metadata key) the pick is answered in.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The metadata key of the gateway's allowed endpoints.
pub const SUBSET: &str = "x-gateway-destination-endpoint-subset";
/// The filter-metadata namespace the subset hint comes in.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// The dynamic-metadata namespace the pick goes out in.
pub const LB_NAMESPACE: &str = "envoy.lb";

/// The `ExternalProcessor` service over a data plane's routes and pools.
#[derive(Debug, Clone)]
pub struct EndpointPicker {
    plane: Arc<DataPlane>,
}

impl EndpointPicker {
    pub fn new(plane: Arc<DataPlane>) -> Self {
        EndpointPicker { plane }
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for EndpointPicker {
    type ProcessStream = Outbound;

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Outbound>, tonic::Status> {
        let inbound = request.into_inner();
        let exchange = Exchange::new(self.plane.clone());
        // The answers are the exchange itself, polled by the connection's
        // task: no task or channel per request, and a stream Envoy resets
        // is dropped with whatever it was doing — a wait for a slot ends
        // at once, an open observation closes as a cancel.
        let out = futures_util::stream::unfold(Some((exchange, inbound)), |state| async move {
            let (mut exchange, mut inbound) = state?;
            let answer = exchange.next(&mut inbound).await?;
            let rest =
                (!exchange.done || !exchange.outbox.is_empty()).then_some((exchange, inbound));
            Some((Ok(answer), rest))
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

/// One request's exchange with the gateway.
struct Exchange {
    plane: Arc<DataPlane>,
    /// When its headers came (TTFT counts from here).
    start: Instant,
    subset: Option<Vec<SocketAddr>>,
    body: Vec<u8>,
    observation: Option<Observation>,
    /// Envoy sends asynchronously and wants no answer.
    observing_only: bool,
    /// The body modes Envoy announced: full duplex, or one message
    /// answered per message.
    modes: Modes,
    /// Answers owed after the one just given (full duplex: the body after
    /// the headers' answer, then the trailers').
    outbox: std::collections::VecDeque<ProcessingResponse>,
    /// Nothing more to do: the stream may close.
    done: bool,
}

/// Which body modes are full duplex (else: request `BUFFERED`, response
/// `STREAMED` or unmeasured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Modes {
    request_duplex: bool,
    response_duplex: bool,
}

impl Exchange {
    fn new(plane: Arc<DataPlane>) -> Self {
        Exchange {
            plane,
            start: Instant::now(),
            subset: None,
            body: Vec::new(),
            observation: None,
            observing_only: false,
            modes: Modes::default(),
            outbox: std::collections::VecDeque::new(),
            done: false,
        }
    }

    /// The next answer Envoy waits for; `None` once the stream is over
    /// (Envoy closed it, or it failed).
    async fn next(
        &mut self,
        inbound: &mut tonic::Streaming<ProcessingRequest>,
    ) -> Option<ProcessingResponse> {
        if let Some(owed) = self.outbox.pop_front() {
            return Some(owed);
        }
        loop {
            let message = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(status) => {
                    tracing::debug!(%status, "gateway stream ended with an error");
                    return None;
                }
            };
            let answer = self.on(message).await;
            match answer.filter(|_| !self.observing_only) {
                Some(a) => return Some(a),
                None if self.done => return None,
                None => {}
            }
        }
    }

    async fn on(&mut self, message: ProcessingRequest) -> Option<ProcessingResponse> {
        use processing_request::Request as In;
        use processing_response::Response as Out;
        self.observing_only = message.observability_mode;
        if let Some(config) = message.protocol_config {
            match modes(config) {
                Ok(m) => self.modes = m,
                Err(why) => {
                    self.done = true;
                    return Some(refuse(
                        &ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, why, None),
                        None,
                    ));
                }
            }
        }
        match message.request? {
            In::RequestHeaders(h) => {
                self.start = Instant::now();
                self.subset = match subset_hint(message.metadata_context.as_ref()) {
                    Ok(s) => s,
                    Err(e) => {
                        self.plane.metrics.rejected(Rejection::bad_request);
                        self.done = true;
                        return Some(refuse(&ApiError::bad_request(e, None), None));
                    }
                };
                if h.end_of_stream {
                    self.done = true;
                    return Some(self.without_body(h.headers.as_ref()));
                }
                if self.modes.request_duplex {
                    // Answered with the pick, once the body has ended.
                    return None;
                }
                Some(answer(Out::RequestHeaders(HeadersResponse {
                    response: Some(CommonResponse::default()),
                })))
            }
            In::RequestBody(b) => {
                let limit = self.plane.limits.max_body_bytes;
                if self.body.len().saturating_add(b.body.len()) > limit {
                    self.plane.metrics.rejected(Rejection::body_too_large);
                    self.done = true;
                    return Some(refuse(
                        &ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("request body is larger than {limit} bytes"),
                            None,
                        ),
                        None,
                    ));
                }
                self.body.extend_from_slice(&b.body);
                if !b.end_of_stream {
                    // Full duplex: nothing is owed until the pick.
                    return (!self.modes.request_duplex)
                        .then(|| answer(Out::RequestBody(BodyResponse::default())));
                }
                Some(self.pick_and_answer(false).await)
            }
            In::ResponseHeaders(h) => {
                if let (Some(o), Some(status)) =
                    (self.observation.as_mut(), status_of(h.headers.as_ref()))
                {
                    o.answered(status);
                }
                if h.end_of_stream {
                    self.end();
                }
                Some(answer(Out::ResponseHeaders(HeadersResponse::default())))
            }
            In::ResponseBody(b) => {
                if let Some(o) = self.observation.as_mut() {
                    o.frame(&b.body);
                }
                if b.end_of_stream {
                    self.end();
                }
                if !self.modes.response_duplex {
                    return Some(answer(Out::ResponseBody(BodyResponse::default())));
                }
                // Full duplex: the chunk goes on only as sent back.
                Some(answer(Out::ResponseBody(streamed(b.body, b.end_of_stream))))
            }
            In::RequestTrailers(_) if self.modes.request_duplex && self.done_reading_body() => {
                // A body that ended with trailers: the pick now, then the
                // body, then the trailers' answer.
                let first = self.pick_and_answer(true).await;
                if self.observation.is_some() {
                    self.outbox
                        .push_back(answer(Out::RequestTrailers(TrailersResponse::default())));
                }
                Some(first)
            }
            In::RequestTrailers(_) => {
                Some(answer(Out::RequestTrailers(TrailersResponse::default())))
            }
            In::ResponseTrailers(_) => {
                // Trailers come after the last body chunk.
                self.end();
                Some(answer(Out::ResponseTrailers(TrailersResponse::default())))
            }
        }
    }

    /// No pick yet: the request body is still being read.
    fn done_reading_body(&self) -> bool {
        self.observation.is_none() && !self.done
    }

    /// The pick as the body mode wants it answered: buffered, on the body
    /// message; full duplex, on the headers (owed since they came), the
    /// whole body sent back after it (`trailers` follow it or not).
    async fn pick_and_answer(&mut self, trailers: bool) -> ProcessingResponse {
        let addr = match self.pick().await {
            Ok(addr) => addr,
            Err(refusal) => return refusal,
        };
        if !self.modes.request_duplex {
            return picked(addr, Phase::Body);
        }
        let body = std::mem::take(&mut self.body);
        self.outbox
            .push_back(answer(processing_response::Response::RequestBody(
                streamed(body, !trailers),
            )));
        picked(addr, Phase::Headers)
    }

    /// The response ended cleanly.
    fn end(&mut self) {
        if let Some(o) = self.observation.take() {
            o.end();
        }
        self.done = true;
    }

    /// A request without a body: the model list, or a 400 (a completion
    /// is routed on its body, which Envoy sends only in a body mode).
    fn without_body(&self, headers: Option<&PbHeaderMap>) -> ProcessingResponse {
        let method = header(headers, ":method");
        let path = header(headers, ":path");
        let path = path.split('?').next().unwrap_or("");
        if method == "GET" && path == "/v1/models" {
            let body = self.plane.models_json();
            return immediate(StatusCode::OK, body, None, "the models served");
        }
        self.plane.metrics.rejected(Rejection::bad_request);
        refuse(
            &ApiError::bad_request(
                format!(
                    "{method} {path} has no body to route on (the gateway must send request bodies: request_body_mode BUFFERED or FULL_DUPLEX_STREAMED)"
                ),
                None,
            ),
            None,
        )
    }

    /// Routes the whole body and admits it: the endpoint, or why not.
    async fn pick(&mut self) -> Result<SocketAddr, ProcessingResponse> {
        self.done = true;
        let plane = self.plane.clone();
        let parsed = match parse_request(&self.body) {
            Ok(p) => p,
            Err(e) => {
                plane.metrics.rejected(Rejection::bad_request);
                return Err(refuse(&e, None));
            }
        };
        let Some(route) = plane.routes().get(parsed.model.as_ref()) else {
            plane.metrics.rejected(Rejection::unknown_model);
            return Err(refuse(&ApiError::model_not_found(&parsed.model), None));
        };
        let entry = match &route {
            ModelRoute::Unified(entry) => entry.clone(),
            ModelRoute::Disaggregated { .. } => {
                return Err(refuse(
                    &ApiError::new(
                        StatusCode::NOT_IMPLEMENTED,
                        format!(
                            "model {} is served by prefill and decode pools, which take two upstream legs: route it through scalecar's proxy listener",
                            parsed.model
                        ),
                        None,
                    ),
                    None,
                ));
            }
        };
        let among = match &self.subset {
            Some(set) => Among::Only(set),
            None => Among::All,
        };
        if !entry.pool.has_any(among) {
            return Err(refuse(
                &ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "none of the gateway's {} endpoints serves model {}",
                        self.subset.as_ref().map_or(0, Vec::len),
                        parsed.model
                    ),
                    None,
                ),
                Some("1"),
            ));
        }
        let arrival = Arrival {
            prompt_tokens: parsed.prompt_tokens,
            body_bytes: self.body.len(),
            start: self.start,
            streaming: parsed.streaming,
            among,
        };
        match lifecycle::admit(&plane.limits, &entry, arrival).await {
            Ok(observation) => {
                let Some(addr) = observation.lease().map(|l| l.endpoint.addr) else {
                    return Err(refuse(
                        &ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no endpoint slot", None),
                        Some("1"),
                    ));
                };
                self.observation = Some(observation);
                self.done = false;
                Ok(addr)
            }
            Err(refusal) => Err(refuse(
                &ApiError::new(refusal.status, refusal.message, None),
                Some(refusal.retry_after),
            )),
        }
    }
}

/// The body modes Envoy announced (with a stream's first message), or why
/// the picker cannot work with them (answered as a 500 naming the setting): the pick needs the
/// whole request body before Envoy routes (`BUFFERED`, or
/// `FULL_DUPLEX_STREAMED`, where the headers wait for the pick). A
/// response not streamed through the picker is served but not measured
/// (warned once).
fn modes(config: ProtocolConfiguration) -> Result<Modes, String> {
    static UNMEASURED: std::sync::Once = std::sync::Once::new();
    let request = BodySendMode::try_from(config.request_body_mode).ok();
    let request_duplex = match request {
        Some(BodySendMode::Buffered) => false,
        Some(BodySendMode::FullDuplexStreamed) => true,
        other => {
            let got = other.map_or("an unknown mode", |m| m.as_str_name());
            return Err(format!(
                "the gateway's ext_proc filter sends request bodies as {got}: scalecar's endpoint picker needs processing_mode.request_body_mode BUFFERED or FULL_DUPLEX_STREAMED"
            ));
        }
    };
    let response = BodySendMode::try_from(config.response_body_mode).ok();
    let response_duplex = match response {
        Some(BodySendMode::Streamed) => false,
        Some(BodySendMode::FullDuplexStreamed) => true,
        other => {
            UNMEASURED.call_once(|| {
                tracing::warn!(
                    response_body_mode = other.map_or("unknown", |m| m.as_str_name()),
                    "ext_proc responses are not streamed through the picker: TTFT, tokens and outcomes go unmeasured (set processing_mode.response_body_mode STREAMED or FULL_DUPLEX_STREAMED)"
                );
            });
            false
        }
    };
    Ok(Modes {
        request_duplex,
        response_duplex,
    })
}

/// A full-duplex body chunk sent back to Envoy (which forwards only what
/// it is sent).
fn streamed(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..StreamedBodyResponse::default()
                    },
                )),
            }),
            ..CommonResponse::default()
        }),
    }
}

/// Which request message the pick answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Buffered: the body message.
    Body,
    /// Full duplex: the headers, held until the body ended.
    Headers,
}

fn answer(response: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..ProcessingResponse::default()
    }
}

/// The pick: the header (with the route cache cleared, so the gateway
/// routes on it) and the same value in `envoy.lb` dynamic metadata, as the
/// answer to `phase`'s message.
fn picked(addr: SocketAddr, phase: Phase) -> ProcessingResponse {
    let value = addr.to_string();
    let lb = Struct {
        fields: [(DESTINATION.to_string(), string_value(&value))].into(),
    };
    let metadata = Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(lb)),
            },
        )]
        .into(),
    };
    let common = Some(CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers: vec![set_header(DESTINATION, &value)],
            remove_headers: Vec::new(),
        }),
        clear_route_cache: true,
        ..CommonResponse::default()
    });
    let response = match phase {
        Phase::Body => {
            processing_response::Response::RequestBody(BodyResponse { response: common })
        }
        Phase::Headers => {
            processing_response::Response::RequestHeaders(HeadersResponse { response: common })
        }
    };
    ProcessingResponse {
        response: Some(response),
        dynamic_metadata: Some(metadata),
        ..ProcessingResponse::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn set_header(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(PbHeaderValue {
            key: name.to_string(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// An OpenAI error answered by the gateway itself.
fn refuse(e: &ApiError, retry_after: Option<&str>) -> ProcessingResponse {
    immediate(e.status, e.to_json(), retry_after, &e.message)
}

fn immediate(
    status: StatusCode,
    body: String,
    retry_after: Option<&str>,
    details: &str,
) -> ProcessingResponse {
    let mut headers = vec![set_header("content-type", "application/json")];
    if let Some(r) = retry_after {
        headers.push(set_header("retry-after", r));
    }
    answer(processing_response::Response::ImmediateResponse(
        ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status.as_u16()),
            }),
            headers: Some(HeaderMutation {
                set_headers: headers,
                remove_headers: Vec::new(),
            }),
            body: body.into_bytes(),
            grpc_status: None,
            // Envoy logs it; no spaces or odd bytes break its access log.
            details: details
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .take(128)
                .collect(),
        },
    ))
}

/// A header's value as text (Envoy sends `raw_value`; older ones
/// `value`), empty when absent or not UTF-8.
fn header<'a>(headers: Option<&'a PbHeaderMap>, name: &str) -> &'a str {
    headers
        .into_iter()
        .flat_map(|h| &h.headers)
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map_or("", |h| {
            if h.raw_value.is_empty() {
                h.value.as_str()
            } else {
                std::str::from_utf8(&h.raw_value).unwrap_or("")
            }
        })
}

fn status_of(headers: Option<&PbHeaderMap>) -> Option<StatusCode> {
    header(headers, ":status")
        .parse::<u16>()
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
}

/// The endpoints the gateway allows, from filter metadata
/// `envoy.lb.subset_hint` → `x-gateway-destination-endpoint-subset`: a
/// list of `ip:port` strings (or one comma-separated string). `None` when
/// there is no hint; an error naming the entry that is not an address.
fn subset_hint(metadata: Option<&Metadata>) -> Result<Option<Vec<SocketAddr>>, String> {
    let Some(value) = metadata
        .and_then(|m| m.filter_metadata.get(SUBSET_NAMESPACE))
        .and_then(|s| s.fields.get(SUBSET))
    else {
        return Ok(None);
    };
    let mut texts: Vec<&str> = Vec::new();
    match &value.kind {
        Some(Kind::ListValue(list)) => {
            for v in &list.values {
                match &v.kind {
                    Some(Kind::StringValue(s)) => texts.push(s),
                    _ => {
                        return Err(format!(
                            "{SUBSET_NAMESPACE}.{SUBSET}: every entry must be an \"ip:port\" string"
                        ));
                    }
                }
            }
        }
        Some(Kind::StringValue(s)) => {
            texts.extend(s.split(',').map(str::trim).filter(|s| !s.is_empty()))
        }
        _ => {
            return Err(format!(
                "{SUBSET_NAMESPACE}.{SUBSET} must be a list of \"ip:port\" strings"
            ));
        }
    }
    texts
        .into_iter()
        .map(|t| {
            t.parse::<SocketAddr>()
                .map_err(|_| format!("{SUBSET_NAMESPACE}.{SUBSET}: {t:?} is not an ip:port"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Serves the endpoint picker on a thread of its own with a
/// single-threaded runtime, as each proxy worker is: Envoy multiplexes its
/// requests on a few HTTP/2 connections, and with the connection and its
/// streams' tasks on one thread no wake-up crosses threads (on a shared
/// multi-threaded runtime those wake-ups were most of the picker's CPU).
/// The returned future ends when the thread does.
pub fn spawn(
    plane: Arc<DataPlane>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let listener = listener.into_std()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("scalecar-ext-proc".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(plane, l, stop).await,
                    Err(e) => tracing::error!(error = %e, "ext-proc listener"),
                }
            });
            let _ = done.send(());
        })?;
    Ok(async move {
        let _ = finished.await;
    })
}

/// Serves the endpoint picker on `listener` (HTTP/2, gRPC) until `stop`
/// turns true, then lets open streams finish within the shutdown grace.
pub async fn serve(plane: Arc<DataPlane>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let grace = plane.limits.shutdown_grace;
    let metrics = plane.metrics.clone();
    let service = ExternalProcessorServer::new(EndpointPicker::new(plane));
    let graceful = GracefulShutdown::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // A gateway that stops answering pings is gone: its streams end.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let mut acceptor = Acceptor::new(&listener, &mut stop, Listener::ext_proc, &metrics);
    while let Some(stream) = acceptor.next().await {
        let connection = http2.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service.clone()),
        );
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "gateway connection ended with an error");
            }
        });
    }
    drop(listener);
    drain(graceful, grace).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    fn hint(value: Kind) -> Metadata {
        let inner = Struct {
            fields: [(SUBSET.to_string(), Value { kind: Some(value) })].into(),
        };
        Metadata {
            filter_metadata: [(SUBSET_NAMESPACE.to_string(), inner)].into(),
            ..Metadata::default()
        }
    }

    #[test]
    fn the_subset_hint_is_a_list_or_a_comma_separated_string() {
        assert_eq!(subset_hint(None), Ok(None));
        assert_eq!(subset_hint(Some(&Metadata::default())), Ok(None));
        let list = Kind::ListValue(ListValue {
            values: vec![string_value("10.0.0.1:8000"), string_value("10.0.0.2:8000")],
        });
        let want: Vec<SocketAddr> = vec![
            "10.0.0.1:8000".parse().unwrap(),
            "10.0.0.2:8000".parse().unwrap(),
        ];
        assert_eq!(subset_hint(Some(&hint(list))), Ok(Some(want.clone())));
        let text = Kind::StringValue("10.0.0.1:8000, 10.0.0.2:8000".into());
        assert_eq!(subset_hint(Some(&hint(text))), Ok(Some(want)));
        // What is not an address is named; other kinds are refused.
        let bad = Kind::StringValue("10.0.0.1".into());
        let e = subset_hint(Some(&hint(bad))).unwrap_err();
        assert!(e.contains("\"10.0.0.1\" is not an ip:port"), "{e}");
        let number = Kind::ListValue(ListValue {
            values: vec![Value {
                kind: Some(Kind::NumberValue(1.0)),
            }],
        });
        assert!(subset_hint(Some(&hint(number))).is_err());
        assert!(subset_hint(Some(&hint(Kind::BoolValue(true)))).is_err());
    }

    #[test]
    fn the_pick_is_a_header_and_envoy_lb_metadata() {
        // Full duplex: on the held headers' answer.
        let r = picked("10.1.2.3:8000".parse().unwrap(), Phase::Headers);
        assert!(matches!(
            r.response,
            Some(processing_response::Response::RequestHeaders(_))
        ));
        let r = picked("10.1.2.3:8000".parse().unwrap(), Phase::Body);
        let Some(processing_response::Response::RequestBody(body)) = &r.response else {
            panic!("{r:?}");
        };
        let common = body.response.as_ref().unwrap();
        assert!(common.clear_route_cache);
        let set = &common.header_mutation.as_ref().unwrap().set_headers;
        let h = set[0].header.as_ref().unwrap();
        assert_eq!(
            (h.key.as_str(), h.raw_value.as_slice()),
            (DESTINATION, &b"10.1.2.3:8000"[..])
        );
        let lb = &r.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE];
        let Some(Kind::StructValue(lb)) = &lb.kind else {
            panic!("{lb:?}");
        };
        assert_eq!(
            lb.fields[DESTINATION].kind,
            Some(Kind::StringValue("10.1.2.3:8000".into()))
        );
    }

    #[test]
    fn refusals_carry_status_json_and_retry_after() {
        let r = refuse(
            &ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the model's queue is full",
                None,
            ),
            Some("1"),
        );
        let Some(processing_response::Response::ImmediateResponse(i)) = &r.response else {
            panic!("{r:?}");
        };
        assert_eq!(i.status.as_ref().unwrap().code, 429);
        let body: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(body["error"]["message"], "the model's queue is full");
        let headers: Vec<(&str, &[u8])> = i
            .headers
            .as_ref()
            .unwrap()
            .set_headers
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (h.key.as_str(), h.raw_value.as_slice())
            })
            .collect();
        assert!(headers.contains(&("retry-after", &b"1"[..])));
        assert!(headers.contains(&("content-type", &b"application/json"[..])));
        assert!(
            i.details
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        );
    }

    #[test]
    fn a_mode_the_picker_cannot_work_with_is_a_500_naming_the_setting() {
        let config = |request: BodySendMode, response: BodySendMode| ProtocolConfiguration {
            request_body_mode: request as i32,
            response_body_mode: response as i32,
            ..ProtocolConfiguration::default()
        };
        let duplex = BodySendMode::FullDuplexStreamed;
        let m = |request, response| modes(config(request, response)).unwrap();
        assert_eq!(
            m(BodySendMode::Buffered, BodySendMode::Streamed),
            Modes::default()
        );
        assert_eq!(
            m(duplex, duplex),
            Modes {
                request_duplex: true,
                response_duplex: true
            }
        );
        assert_eq!(
            m(BodySendMode::Buffered, duplex),
            Modes {
                request_duplex: false,
                response_duplex: true
            }
        );
        // Served, not measured: a warning, not a refusal.
        assert_eq!(
            m(BodySendMode::Buffered, BodySendMode::None),
            Modes::default()
        );
        for bad in [
            BodySendMode::None,
            BodySendMode::Streamed,
            BodySendMode::BufferedPartial,
        ] {
            let text = modes(config(bad, BodySendMode::Streamed)).unwrap_err();
            assert!(text.contains(bad.as_str_name()), "{text}");
            assert!(
                text.contains("request_body_mode BUFFERED or FULL_DUPLEX_STREAMED"),
                "{text}"
            );
        }
    }

    #[test]
    fn headers_are_read_from_raw_value_or_value() {
        let map = PbHeaderMap {
            headers: vec![
                PbHeaderValue {
                    key: ":status".into(),
                    value: String::new(),
                    raw_value: b"503".to_vec(),
                },
                PbHeaderValue {
                    key: ":method".into(),
                    value: "GET".into(),
                    raw_value: Vec::new(),
                },
            ],
        };
        assert_eq!(status_of(Some(&map)), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(header(Some(&map), ":METHOD"), "GET");
        assert_eq!(header(Some(&map), ":path"), "");
        assert_eq!(status_of(None), None);
    }
}
