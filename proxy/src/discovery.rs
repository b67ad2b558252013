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
//!
//! With `kubernetes.endpoint-picker` set, the `InferencePool`s that name
//! that Service as their picker are pools too: their selector and target
//! port say which pods serve, their annotations the model and policy, and
//! the workload they scale is the one `scalecar.io/workload` names or the
//! one that owns their pods. A workload annotated itself decides itself: a
//! pool over it is refused (one writer per workload).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::GroupVersionKind;
use scalecar_config::{AnnotatedTarget, KubernetesConfig, Limits};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::clock::Clock;
use scalecar_scaler::control::{Scaling, TargetSpec};
use scalecar_scaler::kube::{
    Annotated, Claimed, Claims, INFERENCE_POOL_GROUP, INFERENCE_POOL_KIND, KubeScaleTarget,
    LabelSelector, Listed, PodIndex, PodInfo, Pods, PoolPods, Recognized, RescaleEvents, Workload,
    Workloads, cold_starts_of, endpoints_of, watch_competitors, watch_pods, watch_workloads,
    workload_of,
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

/// One discovered workload, or InferencePool and the workload it scales.
struct Found {
    target: AnnotatedTarget,
    /// The InferencePool's pods, as last seen; `None` for a workload.
    pool: Option<PoolPods>,
    /// What is scaled: the annotated workload, or the pool's.
    workload: TargetRef,
    /// The workload's control-loop name and `target` label.
    name: String,
    /// For Events about the workload.
    reference: ObjectReference,
    /// Which pods serve: the workload's (its scale selector) or the pool's.
    selector: LabelSelector,
    /// Where they serve: `scalecar.io/port`, the pool's target port, or
    /// (`None`) each pod's port named `http`.
    port: Option<u16>,
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

/// The `apps/v1` kinds `scalecar.io/workload` may name besides
/// `kubernetes.kinds`.
const APPS_KINDS: [&str; 3] = ["Deployment", "StatefulSet", "ReplicaSet"];

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
        if self.config.endpoint_picker.is_some() {
            kinds.push(GroupVersionKind::gvk(
                INFERENCE_POOL_GROUP,
                "v1",
                INFERENCE_POOL_KIND,
            ));
        }
        let recognized = Recognized {
            algorithms: AlgorithmRegistry::with_builtins()
                .names()
                .into_iter()
                .map(str::to_string)
                .collect(),
            endpoint_picker: self.config.endpoint_picker.clone(),
        };
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
            recognized,
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
        // A pool that could not tell its workload may learn it from a pod.
        dirty.extend(
            self.failed
                .keys()
                .filter(|r| is_pool(r) && touched.iter().any(|p| p.namespace == r.namespace))
                .cloned(),
        );
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
                .any(|p| p.namespace == r.namespace && f.selector.matches(&p.labels))
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
                .iter()
                .filter(|(_, f)| {
                    let w = &f.workload;
                    changed
                        .iter()
                        .any(|c| c.namespace == w.namespace && c.kind == w.kind && c.name == w.name)
                })
                .map(|(r, _)| r.clone()),
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

    /// Brings the `dirty` workloads and pools (emptied) up to date: gone
    /// ones out, new or edited ones in, their endpoints, cold starts and
    /// claimants refreshed. The routes and the loop's targets are
    /// republished only when the set of pools changed.
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
                changed |= self.remove(&r, "no longer annotated");
                continue;
            };
            changed |= self.upsert(&r, a, workloads, pods).await;
            let Some(f) = self.found.get_mut(&r) else {
                continue;
            };
            let (addrs, portless) = endpoints_of(pods, &r.namespace, &f.selector, f.port);
            if portless > 0 && !f.portless_reported {
                tracing::warn!(
                    target = %f.name, pods = portless,
                    "ready pods without a port: set scalecar.io/port or name a container port http"
                );
            }
            f.portless_reported = portless > 0;
            // Each ready pod's created → Ready once: what slo plans a
            // replica's cold start by.
            let mut present = HashSet::new();
            for (name, took) in cold_starts_of(pods, &r.namespace, &f.selector) {
                if !f.cold_started.contains(name) {
                    f.entry.pool.signals.observe_cold_start(took);
                }
                present.insert(name.to_string());
            }
            f.cold_started = present;
            let current = f.entry.pool.endpoints();
            if current.len() != addrs.len() || current.iter().zip(&addrs).any(|(e, a)| e.addr != *a)
            {
                tracing::debug!(target = %f.name, endpoints = ?addrs, "pool endpoints");
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
                    namespace: f.workload.namespace.clone(),
                    kind: f.workload.kind.clone(),
                    name: f.workload.name.clone(),
                })
                .cloned();
            if claimant != f.competing {
                let name = f.name.clone();
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
            let objects: HashMap<String, _> = self
                .found
                .values()
                .map(|f| (f.name.clone(), f.reference.clone()))
                .collect();
            self.events.set_objects(objects);
        }
        for (name, claimant) in competing_changed {
            self.events.competing(&name, claimant.as_deref());
        }
    }

    /// Takes `r`'s pool out of the routes and the loop; true when there was
    /// one.
    fn remove(&mut self, r: &TargetRef, why: &str) -> bool {
        let Some(f) = self.found.remove(r) else {
            return false;
        };
        tracing::info!(target = %f.name, source = %r, model = %f.target.model, "{why}; pool removed");
        f.entry.pool.close();
        true
    }

    /// Records why `r` cannot be served yet (logged once per reason); it is
    /// tried again every [`RETRY`].
    fn fail(&mut self, r: &TargetRef, why: String) {
        if self.failed.get(r) != Some(&why) {
            tracing::warn!(source = %r, error = %why, "not served yet; retrying");
            self.failed.insert(r.clone(), why);
        }
    }

    /// The workload an InferencePool scales: the one its annotation names,
    /// else the one that owns its pods; never one that is annotated itself
    /// or that another pool already scales.
    fn pool_workload(
        &self,
        r: &TargetRef,
        a: &Annotated,
        pods_spec: &PoolPods,
        workloads: &Workloads,
        pods: &Pods,
    ) -> Result<TargetRef, String> {
        let workload = match &a.target.workload {
            Some(w) => {
                let api_version = self.api_version_of(&w.kind).ok_or_else(|| {
                    format!(
                        "scalecar.io/workload: {w}: {} is not a kind scalecar watches (Deployment, StatefulSet, ReplicaSet or one under kubernetes.kinds)",
                        w.kind
                    )
                })?;
                let kind = self.kind_named(&w.kind).unwrap_or(&w.kind).to_string();
                TargetRef {
                    api_version,
                    kind,
                    namespace: r.namespace.clone(),
                    name: w.name.clone(),
                }
            }
            None => match workload_of(pods, &r.namespace, &pods_spec.selector)? {
                Some(owner) => TargetRef {
                    api_version: owner.api_version,
                    kind: owner.kind,
                    namespace: r.namespace.clone(),
                    name: owner.name,
                },
                None => {
                    return Err(
                        "it selects no pods yet and has no scalecar.io/workload: the workload it scales is unknown"
                            .into(),
                    );
                }
            },
        };
        if matches!(workloads.get(&workload), Some(Workload::Valid(_))) {
            return Err(format!(
                "{} is annotated itself and decides itself",
                target_name(&workload)
            ));
        }
        if let Some((other, _)) = self
            .found
            .iter()
            .find(|(k, f)| *k != r && f.workload == workload)
        {
            return Err(format!(
                "{} already scales {}",
                other,
                target_name(&workload)
            ));
        }
        Ok(workload)
    }

    /// The kind as spelt by the API, for a name in any case.
    fn kind_named(&self, kind: &str) -> Option<&str> {
        APPS_KINDS
            .into_iter()
            .chain(self.config.kinds.iter().map(|k| k.kind.as_str()))
            .find(|k| k.eq_ignore_ascii_case(kind))
    }

    fn api_version_of(&self, kind: &str) -> Option<String> {
        let kind = self.kind_named(kind)?;
        if APPS_KINDS.contains(&kind) {
            return Some("apps/v1".into());
        }
        self.config
            .kinds
            .iter()
            .find(|k| k.kind == kind)
            .map(|k| match k.group.as_str() {
                "" => k.version.clone(),
                g => format!("{g}/{}", k.version),
            })
    }

    /// Brings one valid workload's or pool's entry up to date; true when
    /// the pool set changed.
    async fn upsert(
        &mut self,
        r: &TargetRef,
        a: &Annotated,
        workloads: &Workloads,
        pods: &Pods,
    ) -> bool {
        let mut changed = false;
        if a.pool.is_none() {
            // A workload annotated itself takes over from a pool over it.
            let over: Vec<TargetRef> = self
                .found
                .iter()
                .filter(|(k, f)| *k != r && f.workload == *r)
                .map(|(k, _)| k.clone())
                .collect();
            for k in over {
                changed |= self.remove(&k, "its workload is annotated itself");
                self.fail(
                    &k,
                    format!("{} is annotated itself and decides itself", target_name(r)),
                );
            }
        }
        if let Some(f) = self.found.get(r) {
            if a.pool.is_none() {
                f.scale
                    .observe(a.replicas, a.ready_replicas, a.resource_version.clone());
            }
            if f.target == a.target && f.pool == a.pool {
                return changed;
            }
            // The workload scaled may be another one: named differently,
            // or (unnamed) owning the pods of a changed selector.
            let selector_of = |p: &Option<PoolPods>| p.as_ref().map(|p| p.selector.clone());
            let owners_moved =
                a.target.workload.is_none() && selector_of(&f.pool) != selector_of(&a.pool);
            if f.target.workload != a.target.workload || owners_moved {
                // Found again from the start.
                self.remove(r, "the workload it scales may have changed");
                changed = true;
            } else {
                // An edit of the annotations: a new pool on the same scale
                // target; requests waiting on the old one are told to retry.
                let (entry, aliases, spec) =
                    self.build(f.name.clone(), &a.target, &f.scale, &f.ready, Some(f));
                tracing::info!(target = %f.name, source = %r, model = %a.target.model, aliases = ?a.target.aliases, role = %a.target.role, "annotations changed; pool rebuilt");
                if let Some(f) = self.found.get_mut(r) {
                    f.entry.pool.close();
                    f.entry = entry;
                    f.aliases = aliases;
                    f.spec = spec;
                    f.target = a.target.clone();
                    if let Some(p) = &a.pool {
                        f.selector = p.selector.clone();
                        f.port = a.target.port.or(Some(p.port));
                    }
                    f.pool = a.pool.clone();
                }
                return true;
            }
        }
        let workload = match &a.pool {
            None => r.clone(),
            Some(p) => match self.pool_workload(r, a, p, workloads, pods) {
                Ok(w) => w,
                Err(why) => {
                    self.fail(r, why);
                    return changed;
                }
            },
        };
        let name = target_name(&workload);
        let scale = match KubeScaleTarget::discover(
            self.client.clone(),
            workload.clone(),
            self.config.api_timeout,
        )
        .await
        {
            Ok(t) if a.pool.is_some() => Arc::new(t.unwatched()),
            Ok(t) => Arc::new(t),
            Err(e) => {
                self.fail(r, format!("scale target {name}: {e}"));
                return changed;
            }
        };
        self.failed.remove(r);
        let (selector, port, reference) = match &a.pool {
            None => {
                scale.observe(a.replicas, a.ready_replicas, a.resource_version.clone());
                (scale.selector().clone(), a.target.port, a.reference.clone())
            }
            Some(p) => (
                p.selector.clone(),
                a.target.port.or(Some(p.port)),
                ObjectReference {
                    api_version: Some(workload.api_version.clone()),
                    kind: Some(workload.kind.clone()),
                    namespace: Some(workload.namespace.clone()),
                    name: Some(workload.name.clone()),
                    ..ObjectReference::default()
                },
            ),
        };
        let ready = Arc::new(AtomicU32::new(0));
        let (entry, aliases, spec) = self.build(name.clone(), &a.target, &scale, &ready, None);
        tracing::info!(
            target = %name, source = %r, model = %a.target.model, aliases = ?a.target.aliases, role = %a.target.role,
            selector = %selector, through_scale = scale.has_scale_subresource(),
            "workload discovered; pool added"
        );
        self.found.insert(
            r.clone(),
            Found {
                target: a.target.clone(),
                pool: a.pool.clone(),
                workload,
                name,
                reference,
                selector,
                port,
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

/// An InferencePool's coordinates (not a workload's).
fn is_pool(r: &TargetRef) -> bool {
    r.kind == INFERENCE_POOL_KIND && r.api_version.starts_with(INFERENCE_POOL_GROUP)
}
