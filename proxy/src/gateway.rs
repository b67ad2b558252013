//! One way to assemble a gateway: pools from their sources (static config,
//! Kubernetes discovery, or any endpoint feed with a scale target — the
//! tests' local clusters), the route table built from them, the control
//! loop deciding for them, metrics and the admin server. `scalecar run`,
//! `scalecar demo` and the tests all go through [`GatewayBuilder`].
//!
//! The pool set is dynamic: discovery replaces its part whole, and every
//! change rebuilds the route table (swapped atomically under the serving
//! workers) and the control loop's target set (taken between ticks).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use scalecar_config::{KubernetesConfig, Limits, Policy, PoolConfig, Role};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::clock::{Clock, MonotonicClock};
use scalecar_scaler::control::{
    ControlLoop, DecisionObserver, Scaling, SystemWallClock, TargetSpec,
};
use scalecar_scaler::signals::{PoolSignals, SignalsConfig};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::dataplane::DataPlane;
use crate::decisions::DecisionRecorder;
use crate::metrics::ProxyMetrics;
use crate::pool::Pool;
use crate::routes::{ModelRoute, PoolEntry, RouteTable, Routes};
use crate::server::{self, ProxyHandle, StartError};

/// A pool and what the control loop knows of it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub entry: Arc<PoolEntry>,
    /// The other names routed to the same pool, each with its own
    /// per-request metrics; decided once, through `spec`.
    pub aliases: Vec<Arc<PoolEntry>>,
    pub spec: TargetSpec,
}

impl Member {
    /// Every name this pool serves, with the entry that routes it: the
    /// workload's own first.
    fn names(&self) -> impl Iterator<Item = (&str, &Arc<PoolEntry>)> {
        std::iter::once(&self.entry)
            .chain(&self.aliases)
            .map(|e| (e.model.as_str(), e))
    }
}

/// All pools of the gateway: the fixed ones (static config, feeds) and the
/// discovered ones, published as routes and control-loop targets.
#[derive(Debug)]
pub(crate) struct PoolSet {
    table: Arc<RouteTable>,
    fixed: Vec<Member>,
    discovered: Mutex<Vec<Member>>,
    targets: watch::Sender<Vec<TargetSpec>>,
    poke: Arc<Notify>,
}

impl PoolSet {
    /// Replaces the discovered pools and publishes.
    pub fn set_discovered(&self, members: Vec<Member>) {
        let Ok(mut d) = self.discovered.lock() else {
            return;
        };
        *d = members;
        self.publish(&d);
    }

    fn publish(&self, discovered: &[Member]) {
        let members: Vec<&Member> = self.fixed.iter().chain(discovered).collect();
        // model → role → (member index, entry routing that name).
        let mut by_model: BTreeMap<&str, BTreeMap<Role, (usize, &Arc<PoolEntry>)>> =
            BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            for (name, entry) in m.names() {
                let roles = by_model.entry(name).or_default();
                if let Some((first, _)) = roles.get(&m.spec.role) {
                    tracing::warn!(
                        model = %name, role = %m.spec.role,
                        kept = %members.get(*first).map_or("", |f| f.spec.name.as_str()),
                        ignored = %m.spec.name, "two pools serve one model in one role; the first is kept"
                    );
                    continue;
                }
                roles.insert(m.spec.role, (i, entry));
            }
            // A request waiting on an empty pool makes the loop decide at
            // once (scale from zero).
            let poke = self.poke.clone();
            m.entry.pool.on_empty(Arc::new(move || poke.notify_one()));
        }
        let mut routes = Routes::new();
        // A member is decided once however many names route to it.
        let mut decided = vec![false; members.len()];
        for (model, mut roles) in by_model {
            let route = match (
                roles.remove(&Role::Unified),
                roles.remove(&Role::Prefill),
                roles.remove(&Role::Decode),
            ) {
                (Some(u), p, d) => {
                    if let Some((x, _)) = p.or(d) {
                        tracing::warn!(
                            %model, ignored = %members.get(x).map_or("", |m| m.spec.name.as_str()),
                            "a model served unified has no prefill or decode pools"
                        );
                    }
                    vec![u]
                }
                (None, Some(p), Some(d)) => vec![p, d],
                (None, Some(only), None) | (None, None, Some(only)) => vec![only],
                (None, None, None) => continue,
            };
            let r = match route.as_slice() {
                [(_, p), (_, d)] => ModelRoute::Disaggregated {
                    prefill: Arc::clone(p),
                    decode: Arc::clone(d),
                },
                [(_, u), ..] => ModelRoute::Unified(Arc::clone(u)),
                [] => continue,
            };
            for (i, _) in &route {
                if let Some(d) = decided.get_mut(*i) {
                    *d = true;
                }
            }
            routes.insert(model.to_string(), r);
        }
        let specs = members
            .iter()
            .zip(&decided)
            .filter(|(_, d)| **d)
            .map(|(m, _)| m.spec.clone())
            .collect();
        self.table.store(routes);
        self.targets.send_replace(specs);
    }
}

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
        }
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
                crate::discovery::reporter(),
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
        if let Some((client, config)) = &self.kubernetes
            && let Some(le) = &config.leader_election
        {
            let (leading_tx, leading_rx) = watch::channel(false);
            control.lead_with(leading_rx);
            if let Some((set, _)) = &peers {
                control.with_peers(set.clone());
            }
            self.decisions.set_leadership(false, None);
            let namespace = server::lease_namespace(le);
            let elector = scalecar_scaler::kube::LeaderElector::new(
                client.clone(),
                &namespace,
                &le.lease_name,
                crate::discovery::identity(),
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
            let (tx, mut rx) = watch::channel(scalecar_scaler::kube::Leadership::default());
            handle.spawn(elector.run(tx, stopped.clone()));
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
                _ = control.run(stopped) => {}
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

/// The model route serving `model` in `role`, for tests and live views.
pub fn find(plane: &DataPlane, model: &str, role: Role) -> Option<Arc<PoolEntry>> {
    plane
        .routes()
        .get(model)?
        .entries()
        .find(|e| e.pool.role == role)
        .cloned()
}

/// Entries by (model, role), for tests and views.
pub fn entries_by_model(plane: &DataPlane) -> HashMap<(String, Role), Arc<PoolEntry>> {
    plane
        .routes()
        .entries()
        .into_iter()
        .map(|e| ((e.pool.model.clone(), e.pool.role), e))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use scalecar_scaler::clock::MonotonicClock;

    fn member(metrics: &ProxyMetrics, name: &str, model: &str, aliases: &[&str]) -> Member {
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        let signals = Arc::new(PoolSignals::new(
            SignalsConfig::for_window(Duration::from_secs(60)),
            clock,
        ));
        let pool = Pool::new(
            model.to_string(),
            Role::Unified,
            Vec::new(),
            signals.clone(),
            None,
            8,
        );
        let alias = |n: &&str| {
            Arc::new(PoolEntry {
                model: n.to_string(),
                metrics: metrics.alias(n, Role::Unified),
                pool: pool.clone(),
            })
        };
        Member {
            aliases: aliases.iter().map(alias).collect(),
            entry: Arc::new(PoolEntry {
                model: model.to_string(),
                metrics: metrics.pool(model, Role::Unified),
                pool: pool.clone(),
            }),
            spec: TargetSpec {
                name: name.to_string(),
                model: model.to_string(),
                role: Role::Unified,
                policy: Policy::default(),
                signals,
                scaling: Scaling::Advisory {
                    ready: Arc::new(AtomicU32::new(0)),
                },
            },
        }
    }

    #[test]
    fn every_name_routes_to_its_pool_and_each_pool_is_one_target() {
        let metrics = ProxyMetrics::register(&mut Registry::default());
        let (targets, rx) = watch::channel(Vec::new());
        let set = PoolSet {
            table: Arc::new(RouteTable::default()),
            fixed: Vec::new(),
            discovered: Mutex::new(Vec::new()),
            targets,
            poke: Arc::new(Notify::new()),
        };
        set.set_discovered(vec![
            member(&metrics, "a", "a", &["a-lora", "shared"]),
            // Its alias "a" is the first workload's name: the first keeps it.
            member(&metrics, "b", "b", &["a", "shared", "b-lora"]),
            // Its own name taken, it is still reached (and decided)
            // through its alias.
            member(&metrics, "c", "a", &["c-only"]),
            // Nothing of it left to route: not decided.
            member(&metrics, "d", "b", &["a-lora"]),
        ]);
        let routes = set.table.snapshot();
        let served_by = |name: &str| match routes.get(name) {
            Some(ModelRoute::Unified(e)) => {
                assert_eq!(e.model, name, "the entry is the name's own");
                e.pool.model.clone()
            }
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(served_by("a"), "a");
        assert_eq!(served_by("a-lora"), "a");
        assert_eq!(served_by("shared"), "a");
        assert_eq!(served_by("b"), "b");
        assert_eq!(served_by("b-lora"), "b");
        assert_eq!(served_by("c-only"), "a");
        assert_eq!(routes.len(), 6);
        let mut decided: Vec<String> = rx.borrow().iter().map(|s| s.name.clone()).collect();
        decided.sort();
        assert_eq!(decided, ["a", "b", "c"]);
        // Each pool once, by its own name where that is routed.
        let entries: Vec<(String, String)> = set
            .table
            .entries()
            .iter()
            .map(|e| (e.pool.model.clone(), e.model.clone()))
            .collect();
        assert_eq!(
            entries,
            [
                ("a".to_string(), "a".to_string()),
                ("a".to_string(), "c-only".to_string()),
                ("b".to_string(), "b".to_string()),
            ]
        );
        let names = set.table.names_by_pool();
        let of = |e: &Arc<PoolEntry>| names.get(&Arc::as_ptr(&e.pool)).cloned().unwrap();
        let all = set.table.entries();
        assert_eq!(of(&all[0]), ["a", "a-lora", "shared"]);
        assert_eq!(of(&all[1]), ["c-only"]);
        assert_eq!(of(&all[2]), ["b", "b-lora"]);
    }
}
