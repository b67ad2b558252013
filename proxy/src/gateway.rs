//! One way to assemble a gateway: pools from their sources (static config,
//! Kubernetes discovery, or any endpoint feed with a scale target — the
//! tests' local clusters), the route table built from them, the control
//! loop deciding for them, metrics and the admin server. `scalecar run`,
//! `scalecar demo` and the tests all go through [`GatewayBuilder`].
//!
//! The pool set is dynamic: discovery replaces its part whole, and every
//! change rebuilds the route table (swapped atomically under the serving
//! workers) and the control loop's target set (taken between ticks).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use scalecar_config::{KubernetesConfig, Limits, Policy, PoolConfig, Role, ScalecarConfig};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::clock::{Clock, MonotonicClock};
use scalecar_scaler::control::{
    ControlLoop, DecisionObserver, Scaling, SystemWallClock, TargetSpec,
};
use scalecar_scaler::signals::{PoolSignals, SignalsConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dataplane::DataPlane;
use crate::decisions::DecisionRecorder;
use crate::metrics::ProxyMetrics;
use crate::pool::Pool;
use crate::pool_set::{Member, PoolSet};
use crate::routes::{PoolEntry, RouteTable};
use crate::server::{self, ProxyHandle, StartError};

/// Builds a gateway.
pub struct GatewayBuilder {
    limits: Limits,
    workers: Option<usize>,
    tick: Duration,
    clock: Arc<dyn Clock>,
    registry: Registry,
    metrics: ProxyMetrics,
    decisions: Arc<DecisionRecorder>,
    peer_errors: prometheus_client::metrics::family::Family<
        crate::peers::ErrorLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    fixed: Vec<Member>,
    /// Static endpoints: actively health-checked, ready counted for the
    /// advisory loop.
    checked: Vec<(Arc<Pool>, Arc<AtomicU32>)>,
    kubernetes: Option<(kube::Client, KubernetesConfig)>,
    /// The peers' shared token, when not from `SCALECAR_PEER_TOKEN`.
    peer_token: Option<String>,
    /// The endpoint picker's gRPC listener (`ext-proc:`).
    ext_proc: Option<TcpListener>,
}

impl std::fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("pools", &self.fixed.len())
            .field("kubernetes", &self.kubernetes.is_some())
            .finish_non_exhaustive()
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

impl GatewayBuilder {
    pub fn new(limits: Limits, tick: Duration) -> Self {
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::register(&mut registry);
        let decisions = Arc::new(DecisionRecorder::register(&mut registry));
        let peer_errors = crate::peers::PeerSet::register_errors(&mut registry);
        registry.register(
            "scalecar_build",
            "The version and commit this binary was built from",
            prometheus_client::metrics::info::Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("SCALECAR_COMMIT")),
            ]),
        );
        GatewayBuilder {
            limits,
            workers: None,
            tick,
            clock: Arc::new(MonotonicClock::new()),
            registry,
            metrics,
            decisions,
            peer_errors,
            fixed: Vec::new(),
            checked: Vec::new(),
            kubernetes: None,
            peer_token: None,
            ext_proc: None,
        }
    }

    /// Also serves the endpoint picker (Envoy ext_proc) on `listener`.
    pub fn ext_proc(mut self, listener: TcpListener) -> Self {
        self.ext_proc = Some(listener);
        self
    }

    /// Worker threads of the proxy listener (default: one per core).
    pub fn workers(mut self, workers: Option<usize>) -> Self {
        self.workers = workers;
        self
    }

    /// The decisions recorded (metrics, latest status per target).
    pub fn decisions(&self) -> Arc<DecisionRecorder> {
        self.decisions.clone()
    }

    fn entry(
        &self,
        model: &str,
        role: Role,
        policy: &Policy,
        addrs: Vec<SocketAddr>,
    ) -> Arc<PoolEntry> {
        let signals = Arc::new(PoolSignals::new(
            SignalsConfig::for_window(policy.window),
            self.clock.clone(),
        ));
        let pool = Pool::new(
            model.to_string(),
            role,
            addrs,
            signals,
            policy.max_concurrency,
            self.limits.queue_length,
        );
        pool.set_max_ejection_percent(self.limits.max_ejection_percent);
        pool.set_queue_bytes(self.limits.queue_bytes);
        self.metrics
            .set_ttft_target(model, role, policy.ttft_target);
        Arc::new(PoolEntry {
            model: model.to_string(),
            metrics: self.metrics.pool(model, role),
            pool,
        })
    }

    /// Static pools: their endpoints resolved now, health-checked, and
    /// decided in advisory mode (nothing to patch).
    pub async fn static_pools(mut self, pools: &[PoolConfig]) -> Result<Self, StartError> {
        for (i, p) in pools.iter().enumerate() {
            let mut addrs = Vec::new();
            for e in &p.endpoints {
                addrs.push(resolve(i, e).await?);
            }
            let ready = Arc::new(AtomicU32::new(addrs.len() as u32));
            let entry = self.entry(&p.model, p.role, &p.policy, addrs);
            self.checked.push((entry.pool.clone(), ready.clone()));
            let spec = TargetSpec {
                name: format!("{}/{}", p.model, p.role),
                model: p.model.clone(),
                role: p.role,
                policy: p.policy.clone(),
                signals: entry.pool.signals.clone(),
                scaling: Scaling::Advisory { ready },
            };
            self.fixed.push(Member {
                entry,
                aliases: Vec::new(),
                spec,
            });
        }
        Ok(self)
    }

    /// A pool whose endpoints follow `endpoints` and whose replicas are
    /// set through `scaling` (a local cluster of model servers).
    pub fn pool(
        mut self,
        name: &str,
        model: &str,
        role: Role,
        policy: Policy,
        endpoints: watch::Receiver<Vec<SocketAddr>>,
        scaling: Scaling,
    ) -> Self {
        let entry = self.entry(model, role, &policy, Vec::new());
        entry.pool.follow(endpoints);
        let spec = TargetSpec {
            name: name.to_string(),
            model: model.to_string(),
            role,
            policy,
            signals: entry.pool.signals.clone(),
            scaling,
        };
        self.fixed.push(Member {
            entry,
            aliases: Vec::new(),
            spec,
        });
        self
    }

    /// Discovers annotated workloads and their pods through `client`.
    pub fn kubernetes(mut self, client: kube::Client, config: KubernetesConfig) -> Self {
        self.kubernetes = Some((client, config));
        self
    }

    /// The peers' shared token (else `SCALECAR_PEER_TOKEN`).
    pub fn peer_token(mut self, token: String) -> Self {
        self.peer_token = Some(token);
        self
    }

    /// Builds everything and serves on the listeners until the handle is
    /// shut down.
    pub fn start(
        self,
        proxy_listener: TcpListener,
        admin_listener: TcpListener,
    ) -> Result<ProxyHandle, StartError> {
        let peer_token = self.peer_token.clone().or_else(|| {
            std::env::var(crate::peers::TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())
        });
        // Peers: the leader decides on the sum of every replica's windows.
        let peers = match self
            .kubernetes
            .as_ref()
            .and_then(|(_, k)| k.leader_election.as_ref())
            .and_then(|le| le.peer_selector.clone().map(|sel| (sel, le.peer_timeout)))
        {
            Some((selector, timeout)) => {
                let selector = scalecar_scaler::kube::LabelSelector::parse(&selector)
                    .map_err(StartError::PeerSelector)?;
                let token = peer_token.clone().ok_or(StartError::PeerToken {
                    env: crate::peers::TOKEN_ENV,
                })?;
                Some((
                    crate::peers::PeerSet::new(self.peer_errors.clone(), token, timeout),
                    selector,
                ))
            }
            None => None,
        };
        let table = Arc::new(RouteTable::default());
        let mut plane =
            DataPlane::with_table(table.clone(), self.limits.clone(), self.metrics.clone());
        if let Some(n) = self.workers {
            plane = plane.with_workers(n);
        }
        let plane = Arc::new(plane);
        let recorder: Arc<dyn DecisionObserver> = self.decisions.clone();
        let events = self.kubernetes.as_ref().map(|(client, _)| {
            scalecar_scaler::kube::RescaleEvents::new(
                client.clone(),
                crate::cluster::reporter(),
                recorder.clone(),
            )
        });
        let observer: Arc<dyn DecisionObserver> = match &events {
            Some(e) => e.clone(),
            None => recorder,
        };
        let mut control = ControlLoop::new(
            Vec::new(),
            &AlgorithmRegistry::with_builtins(),
            self.clock.clone(),
            Arc::new(SystemWallClock),
            observer,
            self.tick,
        )
        .map_err(StartError::Control)?;
        let (targets, updates) = watch::channel(Vec::new());
        let set = Arc::new(PoolSet {
            table,
            fixed: self.fixed,
            discovered: Mutex::new(Vec::new()),
            targets,
            poke: control.poke_handle(),
        });
        set.publish(&[]);
        control.follow(updates);
        let checked: Vec<Arc<Pool>> = self.checked.iter().map(|(p, _)| p.clone()).collect();
        // With discovery, routes are known once the cluster is listed:
        // until then /readyz says so (a new gateway replica in a rollout
        // would otherwise answer 404 for models it has not seen yet).
        let routes_known = Arc::new(AtomicBool::new(self.kubernetes.is_none()));
        let mut handle = server::serve(
            plane,
            server::AdminParts {
                registry: self.registry,
                decisions: Some(self.decisions.clone()),
                peer_token,
                routes_known: routes_known.clone(),
            },
            checked,
            proxy_listener,
            admin_listener,
        )?;
        let stopped = handle.stopped();
        // True (or dropped) once the control loop has stopped.
        let (loop_done_tx, loop_done) = watch::channel(false);
        if let Some(listener) = self.ext_proc {
            handle.ext_proc_addr = listener.local_addr().ok();
            let plane = handle.plane.clone();
            let serving = crate::ext_proc::spawn(plane, listener, stopped.clone())
                .map_err(StartError::ExtProc)?;
            handle.spawn(serving);
        }
        if let Some((client, config)) = &self.kubernetes
            && let Some(le) = &config.leader_election
        {
            let (leading_tx, leading_rx) = watch::channel(false);
            control.lead_with(leading_rx);
            if let Some((set, _)) = &peers {
                control.with_peers(set.clone());
            }
            self.decisions.set_leadership(false, None);
            let namespace = crate::cluster::lease_namespace(le);
            let elector = scalecar_scaler::kube::LeaderElector::new(
                client.clone(),
                &namespace,
                &le.lease_name,
                crate::cluster::identity(),
                scalecar_scaler::kube::LeaseTiming {
                    duration: le.lease_duration,
                    renew_deadline: le.renew_deadline,
                    retry_period: le.retry_period,
                },
            );
            if let Some((set, selector)) = peers {
                handle.spawn(follow_peers(
                    client.clone(),
                    namespace.clone(),
                    selector,
                    set,
                    stopped.clone(),
                ));
            }
            control.guard_writes(
                self.decisions
                    .count_refusals(Arc::new(elector.write_lease())),
            );
            if let Some(name) = &le.memory_config_map {
                control.remember_in(
                    Arc::new(scalecar_scaler::kube::ConfigMapMemory::new(
                        client.clone(),
                        &namespace,
                        name,
                        config.api_timeout,
                    )),
                    crate::cluster::identity(),
                );
            }
            let (tx, mut rx) = watch::channel(scalecar_scaler::kube::Leadership::default());
            // The elector steps down (and releases the Lease) only once the
            // control loop has stopped: its last act as leader is saving the
            // memory, which needs the Lease still held.
            handle.spawn(elector.run(tx, loop_done.clone()));
            let decisions = self.decisions.clone();
            handle.spawn(async move {
                loop {
                    let l = rx.borrow_and_update().clone();
                    decisions.set_leadership(l.leading, l.holder);
                    leading_tx.send_replace(l.leading);
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        if let (Some((client, config)), Some(events)) = (self.kubernetes, events) {
            let discovery = crate::discovery::Discovery::new(
                client,
                config,
                set.clone(),
                self.metrics,
                self.limits,
                self.clock,
                events,
            )
            .known_routes(routes_known);
            handle.spawn(discovery.run(stopped.clone()));
        }
        let counts = self.checked;
        let mut stop = stopped;
        handle.spawn(async move {
            // Static endpoints serve while healthy and not ejected: that is
            // their ready count for the advisory loop (a few loads per
            // endpoint; often enough that the loop's ticks see the first
            // health checks).
            let counting = async {
                let mut every = tokio::time::interval(Duration::from_millis(250));
                loop {
                    every.tick().await;
                    for (pool, ready) in &counts {
                        let now = pool.now_ms();
                        let n = pool
                            .endpoints()
                            .iter()
                            .filter(|e| e.is_healthy() && !e.is_ejected(now))
                            .count();
                        ready.store(n as u32, Ordering::Relaxed);
                    }
                }
            };
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = control.run(stopped) => {
                    loop_done_tx.send_replace(true);
                }
                _ = counting => {}
            }
            // The set lives as long as the loop.
            drop(set);
        });
        Ok(handle)
    }
}

/// Keeps `set` equal to the serving gateway pods of `selector` in
/// `namespace` (their container port named `admin`), this replica's own
/// pod (`POD_NAME`) left out.
async fn follow_peers(
    client: kube::Client,
    namespace: String,
    selector: scalecar_scaler::kube::LabelSelector,
    set: Arc<crate::peers::PeerSet>,
    mut stop: watch::Receiver<bool>,
) {
    let me = std::env::var("POD_NAME").unwrap_or_default();
    // Only the gateway's own pods are watched: a cluster of thousands of
    // model-server pods is not this watch's to hold.
    let mut changes = scalecar_scaler::kube::watch_pods(
        client,
        std::slice::from_ref(&namespace),
        (!selector.is_empty()).then(|| selector.to_string()),
        scalecar_scaler::kube::Listed::default(),
    );
    let mut pods = scalecar_scaler::kube::PodIndex::default();
    let mut touched = Vec::new();
    loop {
        let mut addrs: Vec<SocketAddr> = pods
            .pods()
            .values()
            .filter(|p| p.namespace == namespace && p.name != me && p.serving())
            .filter(|p| selector.matches(&p.labels))
            .filter_map(|p| Some(SocketAddr::new(p.ip?, p.admin_port?)))
            .collect();
        addrs.sort();
        if *set.addrs() != addrs {
            tracing::info!(peers = ?addrs, "gateway peers");
            set.set(addrs);
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            c = changes.recv() => match c {
                Some(c) => pods.apply(c, &mut touched),
                None => return,
            },
        }
        while let Ok(c) = changes.try_recv() {
            pods.apply(c, &mut touched);
        }
        touched.clear();
    }
}

/// Builds the gateway of a config and serves it: static pools, and
/// Kubernetes discovery when `kubernetes:` is set.
pub async fn start(
    config: &ScalecarConfig,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<ProxyHandle, StartError> {
    let mut builder = GatewayBuilder::new(config.limits.clone(), config.scaler.tick)
        .workers(config.proxy.workers)
        .static_pools(&config.pools)
        .await?;
    if let Some(k) = &config.kubernetes {
        let client = crate::cluster::kube_client(k).await?;
        if let Some(token) = crate::cluster::shared_peer_token(&client, k).await? {
            builder = builder.peer_token(token);
        }
        builder = builder.kubernetes(client, k.clone());
    }
    if let Some(e) = &config.ext_proc {
        let listener = TcpListener::bind(e.listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "ext-proc.listen",
                addr: e.listen,
                source,
            })?;
        builder = builder.ext_proc(listener);
    }
    builder.start(proxy_listener, admin_listener)
}
