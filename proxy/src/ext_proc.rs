//! The endpoint picker: scalecar inside a gateway users already run, as
//! the Gateway API Inference Extension defines it — Envoy's external
//! processing protocol (gRPC `envoy.service.ext_proc.v3.ExternalProcessor`)
//! in front of an `ORIGINAL_DST` cluster that sends each request where
//! header `x-gateway-destination-endpoint` says.
//!
//! One gRPC stream is one HTTP request, driven through the same
//! [`crate::lifecycle`] as scalecar's own proxy: the buffered request body
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
//! STREAMED`): its status and every body chunk feed the request's
//! [`Observation`], so TTFT, ITL, tokens and outcomes are the signals and
//! metrics proxy mode records. A stream that ends before the response did
//! (the client went away and Envoy reset it) drops the observation: a
//! cancel, as in proxy mode.
//!
//! What it does not do: disaggregated (prefill/decode) routes, which need
//! two upstream legs only proxy mode makes, are refused with a 501 naming
//! proxy mode; request bodies must be buffered (`request_body_mode:
//! BUFFERED`), since the pick needs the whole body before Envoy routes.

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
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration, TrailersResponse,
    processing_request, processing_response,
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

use crate::dataplane::{DataPlane, parse_request};
use crate::error::ApiError;
use crate::lifecycle::{self, Arrival};
use crate::metrics::Rejection;
use crate::observe::Observation;
use crate::pool::Among;
use crate::routes::ModelRoute;
use crate::server::{accept_until_stopped, drain};

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
            let rest = (!exchange.done).then_some((exchange, inbound));
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
    /// Nothing more to do: the stream may close.
    done: bool,
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
            done: false,
        }
    }

    /// The next answer Envoy waits for; `None` once the stream is over
    /// (Envoy closed it, or it failed).
    async fn next(
        &mut self,
        inbound: &mut tonic::Streaming<ProcessingRequest>,
    ) -> Option<ProcessingResponse> {
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
        if let Some(refusal) = message.protocol_config.and_then(misconfigured) {
            self.done = true;
            return Some(refusal);
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
                    return Some(answer(Out::RequestBody(BodyResponse::default())));
                }
                Some(self.pick().await)
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
                Some(answer(Out::ResponseBody(BodyResponse::default())))
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
                    "{method} {path} has no body to route on (the gateway must send request bodies: request_body_mode BUFFERED)"
                ),
                None,
            ),
            None,
        )
    }

    /// Routes the whole body and admits it: the endpoint, or why not.
    async fn pick(&mut self) -> ProcessingResponse {
        self.done = true;
        let plane = self.plane.clone();
        let parsed = match parse_request(&self.body) {
            Ok(p) => p,
            Err(e) => {
                plane.metrics.rejected(Rejection::bad_request);
                return refuse(&e, None);
            }
        };
        let Some(route) = plane.routes().get(parsed.model.as_ref()) else {
            plane.metrics.rejected(Rejection::unknown_model);
            return refuse(&ApiError::model_not_found(&parsed.model), None);
        };
        let entry = match &route {
            ModelRoute::Unified(entry) => entry.clone(),
            ModelRoute::Disaggregated { .. } => {
                return refuse(
                    &ApiError::new(
                        StatusCode::NOT_IMPLEMENTED,
                        format!(
                            "model {} is served by prefill and decode pools, which take two upstream legs: route it through scalecar's proxy listener",
                            parsed.model
                        ),
                        None,
                    ),
                    None,
                );
            }
        };
        let among = match &self.subset {
            Some(set) => Among::Only(set),
            None => Among::All,
        };
        if !entry.pool.has_any(among) {
            return refuse(
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
            );
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
                    return refuse(
                        &ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no endpoint slot", None),
                        Some("1"),
                    );
                };
                self.observation = Some(observation);
                self.done = false;
                picked(addr)
            }
            Err(refusal) => refuse(
                &ApiError::new(refusal.status, refusal.message, None),
                Some(refusal.retry_after),
            ),
        }
    }
}

/// A processing mode the picker cannot work with, as a 500 naming the
/// setting (Envoy sends its modes with a stream's first message). The
/// pick needs the whole request body before Envoy routes; a response
/// not streamed through the picker is served but not measured (warned
/// once).
fn misconfigured(config: ProtocolConfiguration) -> Option<ProcessingResponse> {
    static UNMEASURED: std::sync::Once = std::sync::Once::new();
    let request = BodySendMode::try_from(config.request_body_mode).ok();
    if request != Some(BodySendMode::Buffered) {
        let got = request.map_or("an unknown mode", |m| m.as_str_name());
        return Some(refuse(
            &ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "the gateway's ext_proc filter sends request bodies as {got}: scalecar's endpoint picker needs processing_mode.request_body_mode BUFFERED"
                ),
                None,
            ),
            None,
        ));
    }
    let response = BodySendMode::try_from(config.response_body_mode).ok();
    if response != Some(BodySendMode::Streamed) {
        UNMEASURED.call_once(|| {
            tracing::warn!(
                response_body_mode = response.map_or("unknown", |m| m.as_str_name()),
                "ext_proc responses are not streamed through the picker: TTFT, tokens and outcomes go unmeasured (set processing_mode.response_body_mode STREAMED)"
            );
        });
    }
    None
}

fn answer(response: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..ProcessingResponse::default()
    }
}

/// The pick: the header (with the route cache cleared, so the gateway
/// routes on it) and the same value in `envoy.lb` dynamic metadata.
fn picked(addr: SocketAddr) -> ProcessingResponse {
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
    ProcessingResponse {
        response: Some(processing_response::Response::RequestBody(BodyResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers: vec![set_header(DESTINATION, &value)],
                    remove_headers: Vec::new(),
                }),
                clear_route_cache: true,
                ..CommonResponse::default()
            }),
        })),
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
    let service = ExternalProcessorServer::new(EndpointPicker::new(plane));
    let graceful = GracefulShutdown::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // A gateway that stops answering pings is gone: its streams end.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    while let Some(stream) = accept_until_stopped(&listener, &mut stop, "ext-proc").await {
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
        let r = picked("10.1.2.3:8000".parse().unwrap());
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
        assert!(misconfigured(config(BodySendMode::Buffered, BodySendMode::Streamed)).is_none());
        // Served, not measured: a warning, not a refusal.
        assert!(misconfigured(config(BodySendMode::Buffered, BodySendMode::None)).is_none());
        for bad in [
            BodySendMode::None,
            BodySendMode::Streamed,
            BodySendMode::BufferedPartial,
        ] {
            let r = misconfigured(config(bad, BodySendMode::Streamed)).unwrap();
            let Some(processing_response::Response::ImmediateResponse(i)) = &r.response else {
                panic!("{r:?}");
            };
            assert_eq!(i.status.as_ref().unwrap().code, 500);
            let text = String::from_utf8_lossy(&i.body);
            assert!(text.contains(bad.as_str_name()), "{text}");
            assert!(text.contains("request_body_mode BUFFERED"), "{text}");
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
