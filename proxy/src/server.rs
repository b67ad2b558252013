//! Building the proxy from its config and serving it: worker threads,
//! header limits and timeouts, active health checks of static endpoints, and
//! graceful shutdown (stop accepting, let streams finish within the grace
//! period, then close).
//!
//! The proxy listener is served by one single-threaded runtime per worker
//! (one per core by default), all accepting from the same socket: a
//! connection, its requests and their upstream connections stay on one
//! thread, so the request path has no cross-thread wake-ups. Pools, signals
//! and metrics are shared atomics. The admin server, health checks, the
//! control loop and discovery run on the caller's runtime. Assembling the
//! pools and the loop is [`crate::gateway`]'s; the Kubernetes client and
//! this replica's identity are [`crate::cluster`]'s.

use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;

use scalecar_scaler::control::ControlError;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::accept::Acceptor;
use crate::admin::Admin;
use crate::dataplane::DataPlane;
use crate::decisions::DecisionRecorder;
use crate::metrics::Listener;
use crate::pool::{Health, Pool};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("pools[{index}].endpoints: {endpoint:?} does not resolve: {message}")]
    Resolve {
        index: usize,
        endpoint: String,
        message: String,
    },
    #[error("scaler")]
    Control(#[source] ControlError),
    #[error("kubernetes.kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config or in-cluster); set kubernetes.kubeconfig"
    )]
    KubeConfigInfer(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("Kubernetes client")]
    KubeClient(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "kubernetes.leader-election.peer-selector needs the shared peer token: set {env} or kubernetes.leader-election.peer-token-secret"
    )]
    PeerToken { env: &'static str },
    #[error("kubernetes.leader-election.peer-token-secret: {0}")]
    PeerTokenSecret(#[from] crate::peer_token::TokenSecretError),
    #[error("kubernetes.leader-election.peer-selector")]
    PeerSelector(#[source] scalecar_scaler::kube::SelectorError),
    #[error("{what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the ext-proc server: {0}")]
    ExtProc(std::io::Error),
    #[error("starting proxy worker {index}: {source}")]
    Worker {
        index: usize,
        source: std::io::Error,
    },
}

/// A running proxy and its admin server.
#[derive(Debug)]
pub struct ProxyHandle {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The endpoint picker's gRPC address, when `ext-proc:` is served.
    pub ext_proc_addr: Option<SocketAddr>,
    pub plane: Arc<DataPlane>,
    pub admin: Arc<Admin>,
    shutdown: watch::Sender<bool>,
    /// Set while the proxy still serves but is on its way out: HTTP/1
    /// responses then close their connection.
    draining: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    /// The admin server outlives the drain: `/readyz` answers 503 and the
    /// last metrics can be scraped until the streams are done.
    admin_stop: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
}

impl ProxyHandle {
    /// Turns true when shutdown starts.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Runs `task` beside the proxy; shutdown waits for it (it should end
    /// when [`ProxyHandle::stopped`] turns true).
    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// What SIGTERM does: `/readyz` turns 503 and for `delay` the proxy
    /// keeps accepting and serving — Service endpoints and load balancers
    /// take a few seconds to stop sending — with HTTP/1 responses asking
    /// kept-alive clients to re-dial; then [`ProxyHandle::shutdown`].
    pub async fn terminate(self, delay: Duration) {
        self.admin.ready.store(false, Ordering::Release);
        if !delay.is_zero() {
            self.draining.store(true, Ordering::Release);
            tracing::info!(?delay, "not ready; serving until endpoints drop this pod");
            tokio::time::sleep(delay).await;
        }
        self.shutdown().await;
    }

    /// Stops accepting, waits for open requests up to the grace period,
    /// then stops the admin server and returns. `/readyz` is 503 from the
    /// start.
    pub async fn shutdown(self) {
        self.admin.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.admin_stop.send(true);
        let _ = self.admin_task.await;
    }
}

/// What the admin server serves besides the data plane.
#[derive(Debug)]
pub struct AdminParts {
    pub registry: Registry,
    /// The control loop's decisions, when a loop runs.
    pub decisions: Option<Arc<DecisionRecorder>>,
    /// The token peers present for `/internal/snapshot`.
    pub peer_token: Option<String>,
    /// False until discovery has listed the cluster (`/readyz` 503).
    pub routes_known: Arc<AtomicBool>,
}

/// Serves an already built data plane: `plane.workers` threads on the
/// proxy listener, the admin server and health checks on this runtime.
/// `checked` pools get active health checks (static endpoints).
pub fn serve(
    plane: Arc<DataPlane>,
    parts: AdminParts,
    checked: Vec<Arc<Pool>>,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<ProxyHandle, StartError> {
    let AdminParts {
        mut registry,
        decisions,
        peer_token,
        routes_known,
    } = parts;
    let peer_answers: Counter = Counter::default();
    registry.register(
        "scalecar_peer_snapshot_answers",
        "Snapshot requests from the leader answered (one per leader tick: every pool at once)",
        peer_answers.clone(),
    );
    let proxy_addr = proxy_listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let admin_addr = admin_listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let draining = Arc::new(AtomicBool::new(false));
    // Before any request: checked endpoints start unknown, and a request
    // that finds none healthy asks for an early check.
    let early = Arc::new(tokio::sync::Notify::new());
    for pool in &checked {
        let early = early.clone();
        pool.health_checked(Arc::new(move || early.notify_one()));
    }
    let admin = Arc::new(Admin {
        plane: plane.clone(),
        registry,
        decisions,
        peer_token,
        peer_answers,
        ready: Default::default(),
        routes_known,
    });
    let mut tasks = Vec::new();
    let worker_error = |index| move |source| StartError::Worker { index, source };
    let listener = proxy_listener.into_std().map_err(worker_error(0))?;
    for index in 0..plane.workers {
        let listener = listener.try_clone().map_err(worker_error(index))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(worker_error(index))?;
        let worker = Arc::new(plane.for_worker(index));
        let stop = shutdown_rx.clone();
        let draining = draining.clone();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("scalecar-worker-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let upstream = worker.upstream().clone();
                    tokio::spawn(async move {
                        let mut every = tokio::time::interval(upstream.sweep_interval());
                        loop {
                            every.tick().await;
                            upstream.sweep();
                        }
                    });
                    match TcpListener::from_std(listener) {
                        Ok(l) => serve_proxy(worker, l, stop, draining).await,
                        Err(e) => tracing::error!(worker = index, error = %e, "proxy listener"),
                    }
                });
                let _ = done.send(());
            })
            .map_err(worker_error(index))?;
        tasks.push(tokio::spawn(async move {
            let _ = finished.await;
        }));
    }
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(serve_admin(admin.clone(), admin_listener, admin_stop_rx));
    tasks.push(tokio::spawn(crate::engine_metrics::read_engines(
        plane.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(health_checks(
        plane.clone(),
        checked,
        early,
        shutdown_rx,
    )));
    admin.ready.store(true, Ordering::Release);
    Ok(ProxyHandle {
        proxy_addr,
        admin_addr,
        ext_proc_addr: None,
        plane,
        admin,
        shutdown,
        draining,
        tasks,
        admin_stop,
        admin_task,
    })
}

async fn serve_proxy(
    plane: Arc<DataPlane>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    draining: Arc<AtomicBool>,
) {
    let graceful = GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(plane.limits.header_timeout)
        .max_buf_size(plane.limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(plane.limits.max_header_bytes).unwrap_or(u32::MAX))
        // A client that stops answering pings is gone: its streams end.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(plane.limits.header_timeout)
        .max_concurrent_streams(H2_MAX_STREAMS);
    let mut acceptor = Acceptor::new(&listener, &mut stop, Listener::proxy, &plane.metrics);
    while let Some(stream) = acceptor.next().await {
        let plane = plane.clone();
        let header_timeout = plane.limits.header_timeout;
        let draining = draining.clone();
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let plane = plane.clone();
            let draining = draining.clone();
            async move {
                let http1 = req.version() < hyper::Version::HTTP_2;
                let mut response = plane.handle(req).await;
                if http1 && draining.load(Ordering::Acquire) {
                    response.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        });
        let watcher = graceful.watcher();
        let (http1, http2) = (http1.clone(), http2.clone());
        tokio::spawn(async move {
            // The protocol is told by the first bytes, which must come
            // within the header timeout like the rest of a request head.
            let protocol = match tokio::time::timeout(header_timeout, sniff(&stream)).await {
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None) | Err(_)) | Err(_) => return,
            };
            let io = TokioIo::new(stream);
            let ended = match protocol {
                Protocol::Http1 => watcher.watch(http1.serve_connection(io, service)).await,
                Protocol::Http2 => watcher.watch(http2.serve_connection(io, service)).await,
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    drain(graceful, plane.limits.shutdown_grace).await;
}

/// Lets the connections `graceful` watches finish their open streams
/// within `grace`, then gives up on them.
pub(crate) async fn drain(graceful: GracefulShutdown, grace: Duration) {
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "streams still open after the shutdown grace period; closing"
        );
    }
}

/// Streams at once on one HTTP/2 connection (a gateway multiplexes many
/// clients' requests over few connections).
const H2_MAX_STREAMS: u32 = 1024;

/// What a client connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// h2c with prior knowledge, as gateways (Envoy, Istio) talk to
    /// upstreams.
    Http2,
}

/// The client preface every HTTP/2 connection opens with (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/2 from HTTP/1.1 by peeking at the first bytes (nothing is
/// consumed); `None` if the client closed first.
async fn sniff(stream: &tokio::net::TcpStream) -> std::io::Result<Option<Protocol>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        let seen = buf.get(..n).unwrap_or_default();
        if n == 0 {
            return Ok(None);
        }
        if !H2_PREFACE.starts_with(seen) {
            return Ok(Some(Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        // Part of the preface so far (rare: it is one write): peek
        // returns at once while bytes wait, so wait a little for more.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn serve_admin(admin: Arc<Admin>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut acceptor = Acceptor::new(&listener, &mut stop, Listener::admin, &admin.plane.metrics);
    while let Some(stream) = acceptor.next().await {
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| admin.clone().handle(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Active health checks of static endpoints: `GET /health` of every
/// endpoint at once, every `limits.health-check-interval` (5 s), and early
/// when a request finds a pool with no healthy endpoint (at most every
/// [`EARLY_CHECK_GAP`]). A new endpoint serves after its first good check;
/// one that served is taken out after two failures in a row (one blip is
/// not an outage); one good check brings it back and wakes the queue.
async fn health_checks(
    plane: Arc<DataPlane>,
    checked: Vec<Arc<Pool>>,
    early: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    if checked.is_empty() {
        return;
    }
    let mut failures: HashMap<SocketAddr, u32> = HashMap::new();
    let mut tick = tokio::time::interval(plane.limits.health_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        let asked = tokio::select! {
            _ = tick.tick() => false,
            _ = early.notified() => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        if asked {
            // Rate-limited: a flood of requests to a dead pool costs one
            // check per gap, not one per request.
            tokio::select! {
                _ = tokio::time::sleep_until(last + EARLY_CHECK_GAP) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        last = tokio::time::Instant::now();
        // The checks' own keep-alive connections (this runtime's pool):
        // drop those that closed, e.g. of endpoints gone.
        plane.upstream().sweep();
        let endpoints: Vec<(Arc<Pool>, Arc<crate::pool::Endpoint>)> = checked
            .iter()
            .flat_map(|p| {
                p.endpoints()
                    .iter()
                    .map(|e| (p.clone(), e.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let checks = endpoints.iter().map(|(_, ep)| check(&plane, ep));
        let results = futures_util::future::join_all(checks).await;
        for ((pool, ep), ok) in endpoints.iter().zip(results) {
            let n = failures.entry(ep.addr).or_insert(0);
            *n = if ok { 0 } else { *n + 1 };
            let next = match (ok, ep.health(), *n) {
                (true, _, _) => Health::Healthy,
                (false, Health::Healthy, 1) => Health::Healthy,
                (false, _, _) => Health::Unhealthy,
            };
            let before = ep.set_health(next);
            if before != next {
                tracing::info!(endpoint = %ep.addr, model = %pool.model, health = next.as_str(), "endpoint health changed");
                if next == Health::Healthy {
                    pool.endpoint_recovered();
                }
            }
        }
        // Endpoints that left the pools are forgotten.
        failures.retain(|a, _| endpoints.iter().any(|(_, e)| e.addr == *a));
    }
}

/// The shortest gap between two health checks asked for by requests.
const EARLY_CHECK_GAP: Duration = Duration::from_millis(200);

/// One `GET /health`: a 2xx within 2 s.
async fn check(plane: &DataPlane, ep: &crate::pool::Endpoint) -> bool {
    let Ok(req) = http::Request::get("/health")
        .header(http::header::HOST, ep.host.clone())
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    let check = async {
        let (resp, conn) = plane.upstream().send(ep.addr, req).await.ok()?;
        let ok = resp.status().is_success();
        resp.into_body().collect().await.ok()?;
        conn.release();
        Some(ok)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(true))
    )
}
