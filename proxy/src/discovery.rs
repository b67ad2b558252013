//! Kubernetes discovery: annotated workloads become pools, their ready pods
//! the pools' endpoints, and the workloads themselves the control loop's
//! scale targets.
//!
//! Event driven: a change of the workloads or of the pods reconciles at
//! once, so a new workload is routed within the watch latency and a pod
//! that turns unready or Terminating leaves its pool before it stops. A
//! workload whose scale target cannot be found yet (API down, a custom
//! resource whose controller has not set its selector) is tried again
//! every few seconds; the proxy serves the rest meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use kube::api::GroupVersionKind;
use scalecar_config::{AnnotatedTarget, KubernetesConfig, Limits};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::clock::Clock;
use scalecar_scaler::control::{Scaling, TargetSpec};
use scalecar_scaler::kube::{
    Annotated, Claimed, Claims, KubeScaleTarget, Listed, PodIndex, PodInfo, Pods, RescaleEvents,
    Workload, Workloads, cold_starts_of, endpoints_of, watch_competitors, watch_pods,
    watch_workloads,
};
use scalecar_scaler::signals::{PoolSignals, SignalsConfig};
use scalecar_scaler::target::{ScaleTarget, TargetRef};
use tokio::sync::watch;

use crate::metrics::ProxyMetrics;
use crate::pool::Pool;
use crate::pool_set::{Member, PoolSet};
use crate::routes::PoolEntry;

/// The `target` label and control-loop name of a workload:
/// `deployment/llm/llama-3-8b`.
pub fn target_name(r: &TargetRef) -> String {
    format!("{}/{}/{}", r.kind.to_ascii_lowercase(), r.namespace, r.name)
}

/// One discovered workload.
struct Found {
    target: AnnotatedTarget,
    scale: Arc<KubeScaleTarget>,
    entry: Arc<PoolEntry>,
    /// The same pool under the workload's other model names.
    aliases: Vec<Arc<PoolEntry>>,
    spec: TargetSpec,
    /// Serving pods (the advisory loop's ready and spec count).
    ready: Arc<AtomicU32>,
    /// Serving pods without a port to reach them were reported.
    portless_reported: bool,
    /// Pods whose cold start the pool's signals have seen.
    cold_started: HashSet<String>,
    /// Another autoscaler that claims the workload: scalecar does not
    /// write it meanwhile.
    competing: Option<String>,
}

/// The reconciler.
pub(crate) struct Discovery {
    client: kube::Client,
    config: KubernetesConfig,
    set: Arc<PoolSet>,
    metrics: ProxyMetrics,
    limits: Limits,
    clock: Arc<dyn Clock>,
    events: Arc<RescaleEvents>,
    found: BTreeMap<TargetRef, Found>,
    /// Workloads whose scale target could not be found, and why (logged
    /// once per distinct reason).
    failed: BTreeMap<TargetRef, String>,
    /// Set once the cluster is listed (see [`Discovery::known_routes`]).
    routes_known: Option<Arc<AtomicBool>>,
}

/// How often discovery looks whether every watch has listed, until they
/// have.
const LISTED_POLL: Duration = Duration::from_millis(50);

/// How often a workload whose discovery failed is tried again.
const RETRY: Duration = Duration::from_secs(2);

impl Discovery {
    pub fn new(
        client: kube::Client,
        config: KubernetesConfig,
        set: Arc<PoolSet>,
        metrics: ProxyMetrics,
        limits: Limits,
        clock: Arc<dyn Clock>,
        events: Arc<RescaleEvents>,
    ) -> Self {
        Discovery {
            client,
            config,
            set,
            metrics,
            limits,
            clock,
            events,
            found: BTreeMap::new(),
            failed: BTreeMap::new(),
            routes_known: None,
        }
    }

    /// Set once every watch has delivered its first list and the routes
    /// were built from it.
    pub fn known_routes(mut self, known: Arc<AtomicBool>) -> Self {
        self.routes_known = Some(known);
        self
    }

    /// Watches and reconciles until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut kinds = vec![
            GroupVersionKind::gvk("apps", "v1", "Deployment"),
            GroupVersionKind::gvk("apps", "v1", "StatefulSet"),
        ];
        for k in &self.config.kinds {
            let gvk = GroupVersionKind::gvk(&k.group, &k.version, &k.kind);
            if !kinds.contains(&gvk) {
                kinds.push(gvk);
            }
        }
        let algorithms = AlgorithmRegistry::with_builtins()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        let listed = Listed::default();
        let scopes = self.config.namespaces.len().max(1);
        // One list per kind and namespace, the pods' per namespace, and
        // the other autoscalers' (HPAs, ScaledObjects) per namespace.
        let expected = kinds.len() * scopes + scopes + 2 * scopes;
        let mut claims =
            watch_competitors(self.client.clone(), &self.config.namespaces, listed.clone());
        let mut workload_changes = watch_workloads(
            self.client.clone(),
            kinds,
            &self.config.namespaces,
            algorithms,
            crate::cluster::reporter(),
            listed.clone(),
        );
        let mut pod_changes = watch_pods(
            self.client.clone(),
            &self.config.namespaces,
            None,
            listed.clone(),
        );
        let mut workloads = Workloads::new();
        let mut pods = PodIndex::default();
        let mut known_claims: Arc<Claims> = Arc::default();
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What changed since the last reconcile: workloads by coordinates,
        // pods as they were and are.
        let mut dirty: Vec<TargetRef> = Vec::new();
        let mut touched: Vec<PodInfo> = Vec::new();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                c = workload_changes.recv() => match c {
                    Some(c) => c.apply(&mut workloads, &mut dirty),
                    None => return,
                },
                c = pod_changes.recv() => match c {
                    Some(c) => pods.apply(c, &mut touched),
                    None => return,
                },
                r = claims.changed() => if r.is_err() { return },
                _ = retry.tick(), if !self.failed.is_empty() => {
                    dirty.extend(self.failed.keys().cloned());
                }
                // A watch counts its list just after sending it: look
                // again shortly until every one has.
                _ = tokio::time::sleep(LISTED_POLL), if self.routes_known.as_ref().is_some_and(|k| !k.load(Ordering::Acquire)) => {}
            }
            // Read before draining: a count that says all are listed
            // promises that the lists are in the channels.
            let all_listed = listed.count() >= expected;
            while let Ok(c) = workload_changes.try_recv() {
                c.apply(&mut workloads, &mut dirty);
            }
            while let Ok(c) = pod_changes.try_recv() {
                pods.apply(c, &mut touched);
            }
            // Each change publishes a new map: compared by address.
            let now = claims.borrow_and_update().clone();
            if !Arc::ptr_eq(&now, &known_claims) {
                self.claims_changed(&known_claims, &now, &mut dirty);
                known_claims = now;
            }
            self.pods_changed(&touched, &mut dirty);
            touched.clear();
            self.reconcile(&mut dirty, &workloads, pods.pods(), &known_claims)
                .await;
            if all_listed
                && let Some(known) = &self.routes_known
                && !known.swap(true, Ordering::AcqRel)
            {
                tracing::info!(
                    workloads = workloads.len(),
                    "discovery listed the cluster: ready"
                );
            }
        }
    }

    /// Marks the found workloads that a changed pod (as it was or as it
    /// is) is selected by; a change of many pods (a re-list) marks every
    /// workload of their namespaces rather than matching each.
    fn pods_changed(&self, touched: &[PodInfo], dirty: &mut Vec<TargetRef>) {
        if touched.is_empty() {
            return;
        }
        if touched.len() > self.found.len().max(16) {
            let namespaces: HashSet<&str> = touched.iter().map(|p| p.namespace.as_str()).collect();
            dirty.extend(
                self.found
                    .keys()
                    .filter(|r| namespaces.contains(r.namespace.as_str()))
                    .cloned(),
            );
            return;
        }
        for (r, f) in &self.found {
            if touched
                .iter()
                .any(|p| p.namespace == r.namespace && f.scale.selector().matches(&p.labels))
            {
                dirty.push(r.clone());
            }
        }
    }

    /// Marks the found workloads whose claimant changed.
    fn claims_changed(&self, before: &Claims, now: &Claims, dirty: &mut Vec<TargetRef>) {
        let changed: HashSet<&Claimed> = before
            .iter()
            .filter(|(c, by)| now.get(*c) != Some(*by))
            .chain(now.iter().filter(|(c, by)| before.get(*c) != Some(*by)))
            .map(|(c, _)| c)
            .collect();
        if changed.is_empty() {
            return;
        }
        dirty.extend(
            self.found
                .keys()
                .filter(|r| {
                    changed
                        .iter()
                        .any(|c| c.namespace == r.namespace && c.kind == r.kind && c.name == r.name)
                })
                .cloned(),
        );
    }

    fn build(
        &self,
        name: String,
        target: &AnnotatedTarget,
        scale: &Arc<KubeScaleTarget>,
        ready: &Arc<AtomicU32>,
        previous: Option<&Found>,
    ) -> (Arc<PoolEntry>, Vec<Arc<PoolEntry>>, TargetSpec) {
        let policy = &target.policy;
        // The windows carry over an edit that keeps model, role and window.
        let signals = previous
            .filter(|f| {
                f.target.model == target.model
                    && f.target.role == target.role
                    && f.target.policy.window == policy.window
            })
            .map(|f| f.entry.pool.signals.clone())
            .unwrap_or_else(|| {
                Arc::new(PoolSignals::new(
                    SignalsConfig::for_window(policy.window),
                    self.clock.clone(),
                ))
            });
        let endpoints: Vec<SocketAddr> = previous
            .map(|f| f.entry.pool.endpoints().iter().map(|e| e.addr).collect())
            .unwrap_or_default();
        let pool = Pool::new(
            target.model.clone(),
            target.role,
            endpoints,
            signals.clone(),
            policy.max_concurrency,
            self.limits.queue_length,
        );
        pool.set_max_ejection_percent(self.limits.max_ejection_percent);
        pool.set_queue_bytes(self.limits.queue_bytes);
        for name in std::iter::once(&target.model).chain(&target.aliases) {
            self.metrics
                .set_ttft_target(name, target.role, policy.ttft_target);
        }
        // Every other name the pods serve routes to the same pool (one
        // admission queue, one set of endpoint slots, one decision) and
        // is measured under its own name.
        let aliases = target
            .aliases
            .iter()
            .map(|name| {
                Arc::new(PoolEntry {
                    model: name.clone(),
                    metrics: self.metrics.alias(name, target.role),
                    pool: pool.clone(),
                })
            })
            .collect();
        let entry = Arc::new(PoolEntry {
            model: target.model.clone(),
            metrics: self.metrics.pool(&target.model, target.role),
            pool,
        });
        // A workload another autoscaler claims stays unwritten across an
        // edit of its annotations.
        let claimed = previous.is_some_and(|f| f.competing.is_some());
        let scaling = if self.config.managed && !claimed {
            Scaling::Managed(scale.clone() as Arc<dyn ScaleTarget>)
        } else {
            Scaling::Advisory {
                ready: ready.clone(),
            }
        };
        let spec = TargetSpec {
            name,
            model: target.model.clone(),
            role: target.role,
            policy: policy.clone(),
            signals,
            scaling,
        };
        (entry, aliases, spec)
    }

    /// Brings the `dirty` workloads (emptied) up to date: gone ones out,
    /// new or edited ones in, their endpoints, cold starts and claimants
    /// refreshed. The routes and the loop's targets are republished only
    /// when the set of pools changed.
    async fn reconcile(
        &mut self,
        dirty: &mut Vec<TargetRef>,
        workloads: &Workloads,
        pods: &Pods,
        claims: &Claims,
    ) {
        if dirty.is_empty() {
            return;
        }
        dirty.sort();
        dirty.dedup();
        let mut changed = false;
        let mut competing_changed = Vec::new();
        for r in dirty.drain(..) {
            let Some(Workload::Valid(a)) = workloads.get(&r) else {
                // Gone, or no longer valid: out of the routes and the loop.
                self.failed.remove(&r);
                if let Some(f) = self.found.remove(&r) {
                    tracing::info!(target = %target_name(&r), model = %f.target.model, "workload no longer annotated; pool removed");
                    f.entry.pool.close();
                    changed = true;
                }
                continue;
            };
            changed |= self.upsert(&r, a).await;
            let Some(f) = self.found.get_mut(&r) else {
                continue;
            };
            let (addrs, portless) =
                endpoints_of(pods, &r.namespace, f.scale.selector(), f.target.port);
            if portless > 0 && !f.portless_reported {
                tracing::warn!(
                    target = %target_name(&r), pods = portless,
                    "ready pods without a port: set scalecar.io/port or name a container port http"
                );
            }
            f.portless_reported = portless > 0;
            // Each ready pod's created → Ready once: what slo plans a
            // replica's cold start by.
            let mut present = HashSet::new();
            for (name, took) in cold_starts_of(pods, &r.namespace, f.scale.selector()) {
                if !f.cold_started.contains(name) {
                    f.entry.pool.signals.observe_cold_start(took);
                }
                present.insert(name.to_string());
            }
            f.cold_started = present;
            let current = f.entry.pool.endpoints();
            if current.len() != addrs.len() || current.iter().zip(&addrs).any(|(e, a)| e.addr != *a)
            {
                tracing::debug!(target = %target_name(&r), endpoints = ?addrs, "pool endpoints");
                f.entry.pool.set_endpoints(&addrs);
            }
            let n = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
            f.scale.set_ready(n);
            f.ready.store(n, Ordering::Relaxed);
            // Another autoscaler on the same workload: two writers would
            // undo each other's counts; it keeps the workload, scalecar
            // routes and decides but writes nothing meanwhile.
            let claimant = claims
                .get(&Claimed {
                    namespace: r.namespace.clone(),
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                })
                .cloned();
            if claimant != f.competing {
                let name = target_name(&r);
                match &claimant {
                    Some(by) => {
                        tracing::warn!(target = %name, claimant = %by, "another autoscaler scales this workload; not writing it")
                    }
                    None => {
                        tracing::info!(target = %name, "no other autoscaler claims this workload any more; scaling it")
                    }
                }
                self.metrics.set_competing(&name, claimant.is_some());
                f.competing = claimant;
                if self.config.managed {
                    f.spec.scaling = match &f.competing {
                        Some(_) => Scaling::Advisory {
                            ready: f.ready.clone(),
                        },
                        None => Scaling::Managed(f.scale.clone() as Arc<dyn ScaleTarget>),
                    };
                    changed = true;
                }
                competing_changed.push((name, f.competing.clone()));
            }
        }
        if changed {
            let members = self
                .found
                .values()
                .map(|f| Member {
                    entry: f.entry.clone(),
                    aliases: f.aliases.clone(),
                    spec: f.spec.clone(),
                })
                .collect();
            self.set.set_discovered(members);
            let objects: HashMap<String, _> = workloads
                .iter()
                .filter_map(|(r, w)| match w {
                    Workload::Valid(a) if self.found.contains_key(r) => {
                        Some((target_name(r), a.reference.clone()))
                    }
                    _ => None,
                })
                .collect();
            self.events.set_objects(objects);
        }
        for (name, claimant) in competing_changed {
            self.events.competing(&name, claimant.as_deref());
        }
    }

    /// Brings one valid workload's pool up to date; true when the pool set
    /// changed.
    async fn upsert(&mut self, r: &TargetRef, a: &Annotated) -> bool {
        let name = target_name(r);
        if let Some(f) = self.found.get(r) {
            f.scale
                .observe(a.replicas, a.ready_replicas, a.resource_version.clone());
            if f.target == a.target {
                return false;
            }
            // An edit of the annotations: a new pool on the same scale
            // target; requests waiting on the old one are told to retry.
            let (entry, aliases, spec) =
                self.build(name.clone(), &a.target, &f.scale, &f.ready, Some(f));
            tracing::info!(target = %name, model = %a.target.model, aliases = ?a.target.aliases, role = %a.target.role, "annotations changed; pool rebuilt");
            if let Some(f) = self.found.get_mut(r) {
                f.entry.pool.close();
                f.entry = entry;
                f.aliases = aliases;
                f.spec = spec;
                f.target = a.target.clone();
            }
            return true;
        }
        let scale = match KubeScaleTarget::discover(
            self.client.clone(),
            r.clone(),
            self.config.api_timeout,
        )
        .await
        {
            Ok(t) => Arc::new(t),
            Err(e) => {
                let why = e.to_string();
                if self.failed.get(r) != Some(&why) {
                    tracing::warn!(target = %name, error = %why, "scale target not found yet; retrying");
                    self.failed.insert(r.clone(), why);
                }
                return false;
            }
        };
        self.failed.remove(r);
        scale.observe(a.replicas, a.ready_replicas, a.resource_version.clone());
        let ready = Arc::new(AtomicU32::new(0));
        let (entry, aliases, spec) = self.build(name.clone(), &a.target, &scale, &ready, None);
        tracing::info!(
            target = %name, model = %a.target.model, aliases = ?a.target.aliases, role = %a.target.role,
            selector = %scale.selector(), through_scale = scale.has_scale_subresource(),
            "workload discovered; pool added"
        );
        self.found.insert(
            r.clone(),
            Found {
                target: a.target.clone(),
                scale,
                entry,
                aliases,
                spec,
                ready,
                portless_reported: false,
                cold_started: HashSet::new(),
                competing: None,
            },
        );
        true
    }
}
