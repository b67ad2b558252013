//! Building the proxy from its config and serving it: worker threads,
//! header limits and timeouts, active health checks of static endpoints, and
//! graceful shutdown (stop accepting, let streams finish within the grace
//! period, then close).
//!
//! The proxy listener is served by one single-threaded runtime per worker
//! (one per core by default), all accepting from the same socket: a
//! connection, its requests and their upstream connections stay on one
//! thread, so the request path has no cross-thread wake-ups. Pools, signals
//! and metrics are shared atomics. The admin server, health checks and the
//! control loop run on the caller's runtime.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use scalecar_config::{Role, ScalecarConfig};
use scalecar_scaler::clock::{Clock, MonotonicClock};
use scalecar_scaler::signals::{PoolSignals, SignalsConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use std::sync::atomic::AtomicU32;

use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::control::{ControlLoop, Scaling, SystemWallClock, TargetSpec};

use crate::admin::Admin;
use crate::dataplane::{DataPlane, ModelRoute, PoolEntry};
use crate::decisions::DecisionRecorder;
use crate::metrics::ProxyMetrics;
use crate::pool::Pool;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("pools[{index}].endpoints: {endpoint:?} does not resolve: {message}")]
    Resolve {
        index: usize,
        endpoint: String,
        message: String,
    },
    #[error("scaler: {0}")]
    Control(String),
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
    pub plane: Arc<DataPlane>,
    pub admin: Arc<Admin>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ProxyHandle {
    /// Stops accepting, waits for open requests up to the grace period,
    /// then returns.
    pub async fn shutdown(self) {
        self.admin.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn resolve(index: usize, endpoint: &str) -> Result<SocketAddr, StartError> {
    let err = |message: String| StartError::Resolve {
        index,
        endpoint: endpoint.to_string(),
        message,
    };
    let mut addrs = tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| err(e.to_string()))?;
    addrs.next().ok_or_else(|| err("no address".into()))
}

/// Builds the pools and routes of a config.
pub async fn build(
    config: &ScalecarConfig,
    clock: Arc<dyn Clock>,
    registry: &mut Registry,
) -> Result<Arc<DataPlane>, StartError> {
    let metrics = ProxyMetrics::register(registry);
    let mut by_model: HashMap<String, HashMap<Role, Arc<PoolEntry>>> = HashMap::new();
    for (i, p) in config.pools.iter().enumerate() {
        let mut addrs = Vec::new();
        for e in &p.endpoints {
            addrs.push(resolve(i, e).await?);
        }
        let signals = Arc::new(PoolSignals::new(
            SignalsConfig::for_window(p.policy.window),
            clock.clone(),
        ));
        let pool = Pool::new(
            p.model.clone(),
            p.role,
            addrs,
            signals,
            p.policy.max_concurrency,
            config.limits.queue_length,
        );
        pool.set_max_ejection_percent(config.limits.max_ejection_percent);
        let entry = Arc::new(PoolEntry {
            metrics: metrics.pool(&p.model, p.role),
            pool,
        });
        by_model
            .entry(p.model.clone())
            .or_default()
            .insert(p.role, entry);
    }
    let mut routes = HashMap::new();
    for (model, mut roles) in by_model {
        // The config was validated: a model is unified, or prefill + decode.
        let route = match (
            roles.remove(&Role::Unified),
            roles.remove(&Role::Prefill),
            roles.remove(&Role::Decode),
        ) {
            (Some(u), _, _) => ModelRoute::Unified(u),
            (None, Some(prefill), Some(decode)) => ModelRoute::Disaggregated { prefill, decode },
            (None, Some(only), None) | (None, None, Some(only)) => ModelRoute::Unified(only),
            (None, None, None) => continue,
        };
        routes.insert(model, route);
    }
    let mut plane = DataPlane::new(routes, config.limits.clone(), metrics);
    if let Some(n) = config.proxy.workers {
        plane = plane.with_workers(n);
    }
    Ok(Arc::new(plane))
}

/// Starts serving on the given listeners.
pub async fn start(
    config: &ScalecarConfig,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<ProxyHandle, StartError> {
    let mut registry = Registry::default();
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let plane = build(config, clock.clone(), &mut registry).await?;
    let decisions = Arc::new(DecisionRecorder::register(&mut registry));
    // Static pools have no scale target: the loop runs in advisory mode,
    // computing and exporting what it would do.
    let mut specs = Vec::new();
    let mut counts = Vec::new();
    for p in &config.pools {
        let Some(entry) = find(&plane, &p.model, p.role) else {
            continue;
        };
        let ready = Arc::new(AtomicU32::new(entry.pool.endpoints().len() as u32));
        counts.push((entry.pool.clone(), ready.clone()));
        specs.push(TargetSpec {
            name: format!("{}/{}", p.model, p.role),
            model: p.model.clone(),
            role: p.role,
            policy: p.policy.clone(),
            signals: entry.pool.signals.clone(),
            scaling: Scaling::Advisory { ready },
        });
    }
    let control = ControlLoop::new(
        specs,
        &AlgorithmRegistry::with_builtins(),
        clock,
        Arc::new(SystemWallClock),
        decisions,
        config.scaler.tick,
    )
    .map_err(|e| StartError::Control(e.to_string()))?;
    let mut handle = serve(plane, registry, proxy_listener, admin_listener)?;
    let mut stop = handle.shutdown.subscribe();
    handle.tasks.push(tokio::spawn(async move {
        let counting = async {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                for (pool, ready) in &counts {
                    let now = pool.now_ms();
                    let n = pool
                        .endpoints()
                        .iter()
                        .filter(|e| e.healthy.load(Ordering::Relaxed) && !e.is_ejected(now))
                        .count();
                    ready.store(n as u32, Ordering::Relaxed);
                }
            }
        };
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::select! {
            _ = control.run(stopped) => {}
            _ = counting => {}
        }
    }));
    Ok(handle)
}

fn find<'a>(plane: &'a DataPlane, model: &str, role: Role) -> Option<&'a PoolEntry> {
    match plane.routes().get(model)? {
        ModelRoute::Unified(e) if e.pool.role == role => Some(e),
        ModelRoute::Disaggregated { prefill, .. } if role == Role::Prefill => Some(prefill),
        ModelRoute::Disaggregated { decode, .. } if role == Role::Decode => Some(decode),
        _ => None,
    }
}

/// Serves an already built data plane: `plane.workers` threads on the
/// proxy listener, the admin server and health checks on this runtime.
pub fn serve(
    plane: Arc<DataPlane>,
    registry: Registry,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<ProxyHandle, StartError> {
    let proxy_addr = proxy_listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let admin_addr = admin_listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let admin = Arc::new(Admin {
        plane: plane.clone(),
        registry,
        ready: Default::default(),
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
                        Ok(l) => serve_proxy(worker, l, stop).await,
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
    tasks.push(tokio::spawn(serve_admin(
        admin.clone(),
        admin_listener,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(health_checks(plane.clone(), shutdown_rx)));
    admin.ready.store(true, Ordering::Release);
    Ok(ProxyHandle {
        proxy_addr,
        admin_addr,
        plane,
        admin,
        shutdown,
        tasks,
    })
}

async fn serve_proxy(
    plane: Arc<DataPlane>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(plane.limits.header_timeout)
        .max_buf_size(plane.limits.max_header_bytes.max(8192))
        .keep_alive(true);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let plane = plane.clone();
        let service = service_fn(move |req| {
            let plane = plane.clone();
            async move { Ok::<_, Infallible>(plane.handle(req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = plane.limits.shutdown_grace;
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

async fn serve_admin(admin: Arc<Admin>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
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

/// Active health checks of static endpoints: `GET /health` every
/// `limits.health-check-interval` (5 s); two
/// failures in a row take an endpoint out, one success brings it back.
async fn health_checks(plane: Arc<DataPlane>, mut stop: watch::Receiver<bool>) {
    let mut failures: HashMap<SocketAddr, u32> = HashMap::new();
    let mut tick = tokio::time::interval(plane.limits.health_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // The checks' own keep-alive connections (this runtime's pool):
        // drop those that closed, e.g. of endpoints gone.
        plane.upstream().sweep();
        let mut endpoints = Vec::new();
        for route in plane.routes().values() {
            match route {
                ModelRoute::Unified(e) => endpoints.extend(e.pool.endpoints().iter().cloned()),
                ModelRoute::Disaggregated { prefill, decode } => {
                    endpoints.extend(prefill.pool.endpoints().iter().cloned());
                    endpoints.extend(decode.pool.endpoints().iter().cloned());
                }
            }
        }
        for ep in endpoints {
            let Ok(req) = http::Request::get("/health")
                .header(http::header::HOST, ep.host.clone())
                .body(Full::new(Bytes::new()))
            else {
                continue;
            };
            let check = async {
                let (resp, conn) = plane.upstream().send(ep.addr, req).await.ok()?;
                let ok = resp.status().is_success();
                resp.into_body().collect().await.ok()?;
                conn.release();
                Some(ok)
            };
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), check).await,
                Ok(Some(true))
            );
            let n = failures.entry(ep.addr).or_insert(0);
            *n = if ok { 0 } else { *n + 1 };
            let healthy = *n < 2;
            if ep.healthy.swap(healthy, Ordering::AcqRel) != healthy {
                tracing::info!(endpoint = %ep.addr, healthy, "endpoint health changed");
            }
        }
    }
}
