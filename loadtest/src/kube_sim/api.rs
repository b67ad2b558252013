//! The HTTP API: discovery, the REST verbs on every resource path, watches
//! as streams of JSON lines, the `/scale` and `/status` subresources, and
//! the request log and fault injection behind `/kube-sim/…`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::faults::{Fault, Faults};
use super::patch::{self, PatchError};
use super::resources::{self, RESOURCES, ResourceType, Storage};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, Change, ChangeKind, Filter, Part, Store};
use super::{table, view};

pub type Body = BoxBody<Bytes, Infallible>;

/// The largest request body taken.
const MAX_BODY: usize = 16 << 20;

/// One request, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub status: u16,
    pub micros: u64,
    /// When it arrived (this process's clock).
    pub at: Instant,
    /// The client's User-Agent (who asked).
    pub user_agent: String,
}

/// Everything a request needs.
#[derive(Debug)]
pub struct Api {
    pub store: Arc<Store>,
    pub faults: Arc<Faults>,
    pub addr: SocketAddr,
    log: Mutex<Vec<RequestRecord>>,
    /// Watches answered 410 Expired (a compacted version, or fallen behind).
    expired: std::sync::atomic::AtomicU64,
}

/// How many requests the log keeps (the oldest go first).
const LOG_KEEP: usize = 100_000;

fn full(body: impl Into<Bytes>) -> Body {
    BoxBody::new(Full::new(body.into()))
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Where a resource path points.
#[derive(Debug)]
enum Target {
    Collection {
        rt: &'static ResourceType,
        namespace: Option<String>,
    },
    Object {
        rt: &'static ResourceType,
        namespace: String,
        name: String,
        sub: Option<String>,
    },
}

fn resolve(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if resources::find(group, version, plural).is_some_and(|r| r.namespaced) =>
        {
            (Some(ns.to_string()), [&[*plural][..], tail].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, tail) = rest.split_first()?;
    let rt = resources::find(group, version, plural)?;
    match (tail, &namespace) {
        ([], _) => Some(Target::Collection { rt, namespace }),
        ([name, sub @ ..], _) if sub.len() <= 1 => {
            if rt.namespaced && namespace.is_none() {
                return None;
            }
            Some(Target::Object {
                rt,
                namespace: namespace.unwrap_or_default(),
                name: name.to_string(),
                sub: sub.first().map(|s| s.to_string()),
            })
        }
        _ => None,
    }
}

impl Api {
    pub fn new(store: Arc<Store>, faults: Arc<Faults>, addr: SocketAddr) -> Self {
        Api {
            store,
            faults,
            addr,
            log: Mutex::new(Vec::new()),
            expired: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Watches answered 410 Expired so far.
    pub fn expired_watches(&self) -> u64 {
        self.expired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The requests served so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn note(&self, r: RequestRecord) {
        tracing::debug!(method = %r.method, uri = %r.uri, status = r.status, micros = r.micros, "request");
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() >= LOG_KEEP {
            log.drain(..LOG_KEEP / 10);
        }
        log.push(r);
    }

    /// Serves one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let user_agent = req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let response = self.route(req).await;
        self.note(RequestRecord {
            method,
            uri,
            user_agent,
            status: response.status().as_u16(),
            micros: start.elapsed().as_micros() as u64,
            at: start,
        });
        response
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segments.as_slice() {
            ["healthz"] | ["readyz"] | ["livez"] => return Response::new(full("ok")),
            ["version"] => {
                return json_response(
                    200,
                    &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-kube-sim",
                            "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                            "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"}),
                );
            }
            ["kube-sim", "faults"] => return self.faults_admin(req).await,
            ["kube-sim", "requests"] => {
                let log: Vec<Value> = self
                    .requests()
                    .into_iter()
                    .map(|r| {
                        // How long ago, so a client can take a window of
                        // the log without sharing this process's clock.
                        let age_ms = r.at.elapsed().as_millis() as u64;
                        json!({"method": r.method, "uri": r.uri, "status": r.status, "micros": r.micros,
                               "user_agent": r.user_agent, "age_ms": age_ms})
                    })
                    .collect();
                return json_response(200, &Value::Array(log));
            }
            ["api"] => {
                return json_response(
                    200,
                    &json!({"kind": "APIVersions", "versions": ["v1"],
                            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.addr.to_string()}]}),
                );
            }
            ["apis"] => return json_response(200, &group_list()),
            ["api", "v1"] => return json_response(200, &resource_list("", "v1")),
            ["apis", g] => {
                return match group(g) {
                    Some(v) => json_response(200, &v),
                    None => error(&ApiError::new(
                        404,
                        "NotFound",
                        format!("the server could not find the requested resource (group {g})"),
                    )),
                };
            }
            ["apis", g, v]
                if resources::RESOURCES
                    .iter()
                    .any(|r| r.group == *g && r.version == *v) =>
            {
                return json_response(200, &resource_list(g, v));
            }
            _ => {}
        }
        let target = match segments.as_slice() {
            ["api", "v1", rest @ ..] => resolve("", "v1", rest),
            ["apis", g, v, rest @ ..] => resolve(g, v, rest),
            _ => None,
        };
        let Some(target) = target else {
            return error(&ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        };
        let verb = verb_of(req.method(), &target, &query(req.uri()));
        let resource = match &target {
            Target::Collection { rt, .. } | Target::Object { rt, .. } => rt.plural,
        };
        match self.faults.pick(verb, resource) {
            Some(Fault::Error(code)) => {
                let (reason, message) = match code {
                    429 => ("TooManyRequests", "injected: too many requests"),
                    503 => ("ServiceUnavailable", "injected: unavailable"),
                    _ => ("InternalError", "injected: internal error"),
                };
                let mut r = error(&ApiError::new(code, reason, message));
                if code == 429 {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                }
                return r;
            }
            Some(Fault::Timeout) => {
                // Never answers: the client's own timeout ends it.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return error(&ApiError::new(504, "Timeout", "injected: timeout"));
            }
            Some(Fault::Latency(d)) => tokio::time::sleep(d).await,
            None => {}
        }
        match self.serve(req, target).await {
            Ok(r) => r,
            Err(e) => error(&e),
        }
    }

    async fn faults_admin(&self, req: Request<Incoming>) -> Response<Body> {
        match *req.method() {
            Method::GET => json_response(200, &self.faults.to_json()),
            Method::DELETE => {
                self.faults.clear();
                json_response(200, &self.faults.to_json())
            }
            Method::POST | Method::PUT => {
                let body = match read_json(req.into_body()).await {
                    Ok(v) => v,
                    Err(e) => return error(&e),
                };
                match self.faults.set(&body) {
                    Ok(()) => json_response(200, &self.faults.to_json()),
                    Err(m) => error(&ApiError::bad_request(m)),
                }
            }
            _ => error(&ApiError::new(
                405,
                "MethodNotAllowed",
                "GET, POST or DELETE",
            )),
        }
    }

    async fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        target: Target,
    ) -> Result<Response<Body>, ApiError> {
        let q = query(req.uri());
        let method = req.method().clone();
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let field_manager = q.get("fieldManager").cloned();
        let as_table = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(table::wanted);
        let include = table::Include::parse(q.get("includeObject").map(String::as_str));
        if content_type.contains("protobuf")
            && matches!(method, Method::POST | Method::PUT | Method::PATCH)
        {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "kube-sim speaks JSON only, not protobuf: send application/json (kubectl apply -f works; kubectl create <kind> sends protobuf)",
            ));
        }
        match target {
            Target::Collection { rt, namespace } => match method {
                Method::GET => {
                    let filter = filter(rt, namespace.clone(), &q)?;
                    if q.get("watch").is_some_and(|w| w == "1" || w == "true") {
                        return self.watch(rt, filter, &q, as_table.then_some(include));
                    }
                    let limit = q
                        .get("limit")
                        .and_then(|l| l.parse().ok())
                        .filter(|l| *l > 0);
                    let page = self.store.list(
                        rt.storage,
                        &filter,
                        limit,
                        q.get("continue").map(String::as_str),
                    )?;
                    let mut meta = json!({"resourceVersion": page.rv.to_string()});
                    if let Some(c) = page.cont {
                        meta["continue"] = json!(c);
                        meta["remainingItemCount"] = json!(page.remaining.unwrap_or(0));
                    }
                    let items: Vec<Value> =
                        page.items.into_iter().map(|o| view::out(rt, o)).collect();
                    if as_table {
                        return Ok(json_response(200, &table::table(rt, &items, meta, include)));
                    }
                    Ok(json_response(
                        200,
                        &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                                "metadata": meta, "items": items}),
                    ))
                }
                Method::POST => {
                    let ns = namespace.unwrap_or_default();
                    let body = view::into(rt, read_json(req.into_body()).await?);
                    check_kind(rt, &body)?;
                    if q.contains_key("dryRun") {
                        return Ok(json_response(201, &view::out(rt, body)));
                    }
                    let created = self.store.create(rt, &ns, body)?;
                    Ok(json_response(201, &view::out(rt, created)))
                }
                Method::DELETE => {
                    let filter = filter(rt, namespace, &q)?;
                    let page = self.store.list(rt.storage, &filter, None, None)?;
                    for o in &page.items {
                        let ns = o
                            .pointer("/metadata/namespace")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        let name = o
                            .pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        let _ = self.store.delete(rt, ns, name, grace(rt, o, &q, None));
                    }
                    Ok(json_response(
                        200,
                        &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                                "metadata": {"resourceVersion": self.store.resource_version().to_string()},
                                "items": page.items.into_iter().map(|o| view::out(rt, o)).collect::<Vec<_>>()}),
                    ))
                }
                _ => Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    format!("{method} is not allowed on a collection"),
                )),
            },
            Target::Object {
                rt,
                namespace,
                name,
                sub,
            } => {
                let sub = sub.as_deref();
                match (method, sub) {
                    (_, Some(s)) if s != "status" && s != "scale" => Err(ApiError::new(
                        404,
                        "NotFound",
                        format!("{} has no subresource {s}", rt.plural),
                    )),
                    (_, Some("scale")) if !rt.scale => Err(ApiError::new(
                        404,
                        "NotFound",
                        format!(
                            "the server could not find the requested resource: {} has no scale subresource",
                            rt.plural
                        ),
                    )),
                    (_, Some("status")) if !rt.status => Err(ApiError::new(
                        404,
                        "NotFound",
                        format!("{} has no status subresource", rt.plural),
                    )),
                    (Method::GET, Some("scale")) => {
                        let o = self.store.get(rt, &namespace, &name)?;
                        Ok(json_response(200, &view::scale_of(&o)))
                    }
                    (Method::GET, _) => {
                        let o = view::out(rt, self.store.get(rt, &namespace, &name)?);
                        if as_table && sub.is_none() {
                            let meta = json!({"resourceVersion": o.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!(""))});
                            return Ok(json_response(200, &table::table(rt, &[o], meta, include)));
                        }
                        Ok(json_response(200, &o))
                    }
                    (Method::PUT, Some("scale")) => {
                        let body = read_json(req.into_body()).await?;
                        let o = self.set_scale(rt, &namespace, &name, |_| Ok(body))?;
                        Ok(json_response(200, &view::scale_of(&o)))
                    }
                    (Method::PATCH, Some("scale")) => {
                        let body = read_json_or_yaml(req.into_body(), &content_type).await?;
                        let o = self.set_scale(rt, &namespace, &name, |scale| {
                            let mut s = scale;
                            apply_patch(&content_type, &mut s, &body)?;
                            Ok(s)
                        })?;
                        Ok(json_response(200, &view::scale_of(&o)))
                    }
                    (Method::PUT, sub) => {
                        let part = if sub == Some("status") {
                            Part::Status
                        } else {
                            Part::Main
                        };
                        let body = view::into(rt, read_json(req.into_body()).await?);
                        check_kind(rt, &body)?;
                        let o = self.store.modify(rt, &namespace, &name, part, |o| {
                            *o = body;
                            Ok(())
                        })?;
                        Ok(json_response(200, &view::out(rt, o)))
                    }
                    (Method::PATCH, sub) => {
                        let part = if sub == Some("status") {
                            Part::Status
                        } else {
                            Part::Main
                        };
                        let body = read_json_or_yaml(req.into_body(), &content_type).await?;
                        let apply = content_type.starts_with("application/apply-patch");
                        if apply && sub.is_none() && self.store.get(rt, &namespace, &name).is_err()
                        {
                            // Server-side apply creates what is not there.
                            let mut fresh = body.clone();
                            let Some(fields) = fresh.as_object_mut() else {
                                return Err(ApiError::bad_request(
                                    "the applied configuration is not an object",
                                ));
                            };
                            let meta = fields.entry("metadata").or_insert_with(|| json!({}));
                            if !meta.is_object() {
                                *meta = json!({});
                            }
                            if let Some(m) = meta.as_object_mut() {
                                m.insert("name".into(), json!(name));
                            }
                            let created =
                                self.store.create(rt, &namespace, view::into(rt, fresh))?;
                            return Ok(json_response(201, &view::out(rt, created)));
                        }
                        let o = self.store.modify(rt, &namespace, &name, part, |o| {
                            let mut shown = view::out(rt, o.clone());
                            apply_patch(&content_type, &mut shown, &body)?;
                            if apply {
                                note_manager(
                                    &mut shown,
                                    field_manager.as_deref().unwrap_or("unknown"),
                                    rt,
                                );
                            }
                            *o = view::into(rt, shown);
                            Ok(())
                        })?;
                        Ok(json_response(200, &view::out(rt, o)))
                    }
                    (Method::DELETE, None) => {
                        let body = read_json(req.into_body()).await.ok();
                        let current = self.store.get(rt, &namespace, &name)?;
                        if let Some(want) = body
                            .as_ref()
                            .and_then(|b| b.pointer("/preconditions/resourceVersion"))
                            .and_then(Value::as_str)
                            && current
                                .pointer("/metadata/resourceVersion")
                                .and_then(Value::as_str)
                                != Some(want)
                        {
                            return Err(ApiError::new(
                                409,
                                "Conflict",
                                format!(
                                    "Precondition failed: ResourceVersion in precondition: {want}, in object: {}",
                                    current
                                        .pointer("/metadata/resourceVersion")
                                        .and_then(Value::as_str)
                                        .unwrap_or("")
                                ),
                            ));
                        }
                        let o = self.store.delete(
                            rt,
                            &namespace,
                            &name,
                            grace(rt, &current, &q, body.as_ref()),
                        )?;
                        Ok(json_response(200, &view::out(rt, o)))
                    }
                    (m, _) => Err(ApiError::new(
                        405,
                        "MethodNotAllowed",
                        format!("{m} is not allowed here"),
                    )),
                }
            }
        }
    }

    /// Reads the Scale of an object, lets `f` produce the new one, and sets
    /// `spec.replicas` from it (its resourceVersion, if any, must match).
    fn set_scale(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        f: impl FnOnce(Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        self.store.modify(rt, namespace, name, Part::Main, |o| {
            let scale = f(view::scale_of(o))?;
            let replicas = scale
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .ok_or_else(|| ApiError::invalid("Scale.spec.replicas must be an integer"))?;
            if replicas < 0 {
                return Err(ApiError::invalid(format!(
                    "Scale.spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                )));
            }
            if let Some(rv) = scale.pointer("/metadata/resourceVersion").and_then(Value::as_str)
                && !rv.is_empty()
            {
                o["metadata"]["resourceVersion"] = json!(rv);
            }
            if !o.get("spec").is_some_and(Value::is_object) {
                o["spec"] = json!({});
            }
            o["spec"]["replicas"] = json!(replicas);
            Ok(())
        })
    }

    fn watch(
        self: &Arc<Self>,
        rt: &'static ResourceType,
        filter: Filter,
        q: &HashMap<String, String>,
        as_table: Option<table::Include>,
    ) -> Result<Response<Body>, ApiError> {
        if q.get("sendInitialEvents").is_some_and(|v| v == "true") {
            return Err(ApiError::invalid(
                "sendInitialEvents is not supported by kube-sim: list, then watch from the list's resourceVersion",
            ));
        }
        let from = match q.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {v:?} is not a resource version"))
            })?),
        };
        let bookmarks = q
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true" || v == "1");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs);
        let drop_after = self.faults.drop_watches_after();
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        match self.store.watch(rt.storage, &filter, from) {
            Err(e) if e.code == 410 => {
                self.expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // As the real server: a 200 stream whose one event is the error.
                let line = json!({"type": "ERROR", "object": e.status()}).to_string() + "\n";
                let _ = tx.try_send(Bytes::from(line));
            }
            Err(e) => return Err(e),
            Ok(start) => {
                let store = self.store.clone();
                tokio::spawn(async move {
                    let deadline = [timeout, drop_after].into_iter().flatten().min();
                    let ended = async {
                        match deadline {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::pin!(ended);
                    let mut last = from.unwrap_or(0);
                    for c in start.backlog {
                        last = last.max(c.rv);
                        if tx.send(line(rt, &c, as_table)).await.is_err() {
                            return;
                        }
                    }
                    let mut live = start.live;
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    tick.tick().await;
                    loop {
                        tokio::select! {
                            _ = &mut ended => return,
                            _ = tx.closed() => return,
                            _ = tick.tick(), if bookmarks => {
                                let rv = store.resource_version().max(last);
                                let b = json!({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version(),
                                    "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}}});
                                if tx.send(Bytes::from(b.to_string() + "\n")).await.is_err() { return; }
                            }
                            got = live.recv() => match got {
                                Ok(c) => {
                                    if c.storage != rt.storage || c.rv <= last || !filter.matches(&c.namespace, &c.object) {
                                        continue;
                                    }
                                    last = c.rv;
                                    if tx.send(line(rt, &c, as_table)).await.is_err() { return; }
                                }
                                Err(broadcast::error::RecvError::Lagged(_)) => {
                                    let e = ApiError::new(410, "Expired", "the watch fell behind: list again");
                                    let _ = tx.send(Bytes::from(json!({"type": "ERROR", "object": e.status()}).to_string() + "\n")).await;
                                    return;
                                }
                                Err(broadcast::error::RecvError::Closed) => return,
                            }
                        }
                    }
                });
            }
        }
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok(r)
    }
}

fn line(rt: &ResourceType, c: &Change, as_table: Option<table::Include>) -> Bytes {
    let kind = c.kind.as_str();
    let mut object = view::out(rt, c.object.clone());
    if let Some(include) = as_table {
        let meta = json!({"resourceVersion": c.rv.to_string()});
        object = table::table(rt, &[object], meta, include);
    }
    Bytes::from(json!({"type": kind, "object": object}).to_string() + "\n")
}

fn verb_of(method: &Method, target: &Target, q: &HashMap<String, String>) -> &'static str {
    match (method, target) {
        (&Method::GET, Target::Collection { .. }) if q.get("watch").is_some() => "watch",
        (&Method::GET, Target::Collection { .. }) => "list",
        (&Method::GET, _) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "other",
    }
}

fn filter(
    rt: &ResourceType,
    namespace: Option<String>,
    q: &HashMap<String, String>,
) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace,
        labels: q
            .get("labelSelector")
            .map(|s| LabelSelector::parse(s))
            .transpose()
            .map_err(ApiError::bad_request)?
            .unwrap_or_default(),
        fields: q
            .get("fieldSelector")
            .map(|s| FieldSelector::parse(s))
            .transpose()
            .map_err(ApiError::bad_request)?
            .unwrap_or_default()
            .renamed(|p| view::stored_path(rt, p)),
    })
}

/// The grace period of a delete: pods terminate gracefully (query, then
/// DeleteOptions, then the pod's own setting, then 30 s); others go now.
fn grace(
    rt: &ResourceType,
    o: &Value,
    q: &HashMap<String, String>,
    body: Option<&Value>,
) -> Option<u64> {
    if rt.storage != Storage::Pods {
        return None;
    }
    let asked = q
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse::<u64>().ok())
        .or_else(|| {
            body.and_then(|b| b.get("gracePeriodSeconds"))
                .and_then(Value::as_u64)
        });
    let g = asked
        .or_else(|| {
            o.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
        })
        .unwrap_or(30);
    (g > 0).then_some(g)
}

fn check_kind(rt: &ResourceType, body: &Value) -> Result<(), ApiError> {
    match body.get("kind").and_then(Value::as_str) {
        Some(k) if k != rt.kind => Err(ApiError::bad_request(format!(
            "the kind of the body ({k}) does not match the resource ({})",
            rt.kind
        ))),
        _ => Ok(()),
    }
}

fn note_manager(o: &mut Value, manager: &str, rt: &ResourceType) {
    let entry = json!({"manager": manager, "operation": "Apply", "apiVersion": rt.api_version(),
                       "time": super::time::now_rfc3339(), "fieldsType": "FieldsV1", "fieldsV1": {}});
    match o
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    {
        Some(list) => {
            list.retain(|e| e.get("manager").and_then(Value::as_str) != Some(manager));
            list.push(entry);
        }
        None => {
            if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("managedFields".into(), json!([entry]));
            }
        }
    }
}

fn apply_patch(content_type: &str, target: &mut Value, body: &Value) -> Result<(), ApiError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    match ct {
        "application/merge-patch+json"
        | "application/apply-patch+yaml"
        | "application/apply-patch+json" => {
            patch::merge(target, body);
            Ok(())
        }
        "application/strategic-merge-patch+json" => {
            patch::strategic(target, body);
            Ok(())
        }
        "application/json-patch+json" => {
            patch::json_patch(target, body).map_err(|PatchError(m)| ApiError::invalid(m))
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({other}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
            ),
        )),
    }
}

async fn read_bytes(body: Incoming) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    limited.collect().await.map(|b| b.to_bytes()).map_err(|e| {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("reading the body: {e}"),
        )
    })
}

async fn read_json(body: Incoming) -> Result<Value, ApiError> {
    let bytes = read_bytes(body).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

/// JSON, or YAML for server-side apply.
async fn read_json_or_yaml(body: Incoming, content_type: &str) -> Result<Value, ApiError> {
    let bytes = read_bytes(body).await?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Ok(v),
        Err(e) if content_type.contains("yaml") => {
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
            serde_saphyr::from_str::<Value>(text).map_err(|y| {
                ApiError::bad_request(format!("the body is neither JSON ({e}) nor YAML ({y})"))
            })
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

fn group_list() -> Value {
    let groups: Vec<Value> = resources::groups().into_iter().filter_map(group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group(name: &str) -> Option<Value> {
    let version = RESOURCES.iter().find(|r| r.group == name)?.version;
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": [gv.clone()], "preferredVersion": gv}),
    )
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut out = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        out.push(
            json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                        "kind": r.kind, "verbs": r.verbs(), "shortNames": r.short_names}),
        );
        if r.status {
            out.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
        if r.scale {
            out.push(json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced,
                            "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out})
}

impl ChangeKind {
    /// Used by tests replaying a watch.
    pub fn parse(s: &str) -> Option<ChangeKind> {
        match s {
            "ADDED" => Some(ChangeKind::Added),
            "MODIFIED" => Some(ChangeKind::Modified),
            "DELETED" => Some(ChangeKind::Deleted),
            _ => None,
        }
    }
}
