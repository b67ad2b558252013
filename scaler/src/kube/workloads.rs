//! Which workloads scalecar manages: every object of the watched kinds that
//! carries `scalecar.io/model`, its annotations parsed by the config crate.
//!
//! One kube-rs watcher per kind (default backoff, so a dropped watch or a
//! 410 re-lists without losing anything) sends each change — a re-list
//! whole, else one object — to the one reader that keeps the map, so an
//! event costs its object, not the set. An object whose
//! annotations do not parse is sent as invalid — never scaled, never
//! routed — and gets one Warning Event `InvalidAnnotation` naming the key,
//! the value and what is allowed (once per distinct error, not every
//! resync); a later valid edit sends it as valid.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use scalecar_config::{AnnotatedTarget, PREFIX, Policy};
use tokio::sync::mpsc;

use super::events::EventWriter;
use crate::target::TargetRef;

/// An annotated workload whose annotations parse: what to route and scale,
/// and what its object said at the last watch event (read by the scale
/// target instead of a GET per tick).
#[derive(Debug, Clone, PartialEq)]
pub struct Annotated {
    pub target: AnnotatedTarget,
    /// `spec.replicas` (`None`: unset, which Kubernetes defaults to 1).
    pub replicas: Option<u32>,
    /// `status.readyReplicas`, for kinds whose pods are not routed.
    pub ready_replicas: u32,
    pub resource_version: Option<String>,
    /// For Events about it.
    pub reference: ObjectReference,
}

/// One annotated workload, parsed or not.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    Valid(Box<Annotated>),
    /// Left alone until fixed: the errors, in words.
    Invalid(String),
}

/// The annotated workloads of the watched kinds, by coordinates.
pub type Workloads = BTreeMap<TargetRef, Workload>;

fn count(o: &DynamicObject, pointer: &str) -> Option<u32> {
    o.data
        .pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

impl Workload {
    /// What a watched object says: `None` without `scalecar.io/model` (not
    /// ours), else valid or invalid with the errors in words. Pure; fuzzed
    /// with arbitrary objects.
    pub fn from_object(
        o: &DynamicObject,
        resource: &ApiResource,
        algorithms: &[String],
    ) -> Option<Workload> {
        parse(o, resource, algorithms)
    }
}

fn parse(o: &DynamicObject, resource: &ApiResource, algorithms: &[String]) -> Option<Workload> {
    let annotations: BTreeMap<String, String> = o
        .annotations()
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !annotations.contains_key(&format!("{PREFIX}model")) {
        return None;
    }
    let target = match Policy::from_annotations(&annotations) {
        Ok(t) => t,
        Err(e) => return Some(Workload::Invalid(e.to_string())),
    };
    // An algorithm nobody registered is as wrong as a misspelt key: say so
    // on the object rather than fail at the first tick.
    let known: Vec<&str> = algorithms.iter().map(String::as_str).collect();
    if let Err(e) = target.policy.validate_algorithm(&known) {
        return Some(Workload::Invalid(format!("{PREFIX}algorithm: {e}")));
    }
    Some(Workload::Valid(Box::new(Annotated {
        target,
        replicas: count(o, "/spec/replicas"),
        ready_replicas: count(o, "/status/readyReplicas").unwrap_or(0),
        resource_version: o.resource_version(),
        reference: o.object_ref(resource),
    })))
}

/// The resource of `gvk` through discovery, tried until found (a custom
/// resource may be installed after scalecar starts; the API server may be
/// down), with a backoff up to 30 s; `None` once nobody listens.
async fn find_kind(
    client: &Client,
    gvk: &GroupVersionKind,
    tx: &mpsc::Sender<WorkloadChange>,
) -> Option<ApiResource> {
    let mut wait = std::time::Duration::from_millis(500);
    let mut reported = None;
    loop {
        let found = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            kube::discovery::oneshot::pinned_kind(client, gvk),
        )
        .await;
        let why = match found {
            Ok(Ok((resource, _))) => return Some(resource),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 10s".to_string(),
        };
        if reported.as_ref() != Some(&why) {
            tracing::warn!(group = %gvk.group, version = %gvk.version, kind = %gvk.kind, error = %why, "workload kind not found; retrying");
            reported = Some(why);
        }
        if tx.is_closed() {
            return None;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(30));
    }
}

/// One change of the annotated workloads.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadChange {
    /// A (re-)list of one kind (`api_version`, `kind`) in one scope
    /// (`None`: every namespace): its annotated objects now, replacing all
    /// that was known of that kind there.
    Listed {
        api_version: String,
        kind: String,
        scope: Option<String>,
        workloads: Vec<(TargetRef, Workload)>,
    },
    /// An annotated object added or changed (its status included: the
    /// replica counts and resourceVersion are read from here).
    Applied(TargetRef, Workload),
    /// Deleted, or its `scalecar.io/model` taken away.
    Removed(TargetRef),
}

impl WorkloadChange {
    /// Applies the change to `workloads`, pushing the coordinates of every
    /// entry it added, changed or removed onto `touched`.
    pub fn apply(self, workloads: &mut Workloads, touched: &mut Vec<TargetRef>) {
        match self {
            WorkloadChange::Listed {
                api_version,
                kind,
                scope,
                workloads: listed,
            } => {
                let mut fresh: Workloads = listed.into_iter().collect();
                workloads.retain(|k, old| {
                    let ours = k.kind == kind
                        && k.api_version == api_version
                        && scope.as_ref().is_none_or(|ns| &k.namespace == ns);
                    if !ours {
                        return true;
                    }
                    match fresh.get(k) {
                        Some(new) if new == old => {
                            fresh.remove(k);
                            true
                        }
                        // Changed: touched once, when inserted below.
                        Some(_) => false,
                        None => {
                            touched.push(k.clone());
                            false
                        }
                    }
                });
                for (k, w) in fresh {
                    touched.push(k.clone());
                    workloads.insert(k, w);
                }
            }
            WorkloadChange::Applied(k, w) => {
                if workloads.get(&k) != Some(&w) {
                    touched.push(k.clone());
                    workloads.insert(k, w);
                }
            }
            WorkloadChange::Removed(k) => {
                if workloads.remove(&k).is_some() {
                    touched.push(k);
                }
            }
        }
    }
}

/// How many workload changes may wait for their reader before a watch
/// waits.
const CHANGES_QUEUED: usize = 1024;

/// Watches `kinds` (in `namespaces`, or all when empty) and sends every
/// change of the annotated workloads; `algorithms` are the registered
/// algorithm names. Runs until the receiver is dropped. Each kind and
/// scope's first list counts on `listed` once it is sent.
pub fn watch_workloads(
    client: Client,
    kinds: Vec<GroupVersionKind>,
    namespaces: &[String],
    algorithms: Vec<String>,
    reporter: Reporter,
    listed: Listed,
) -> mpsc::Receiver<WorkloadChange> {
    let (tx, rx) = mpsc::channel(CHANGES_QUEUED);
    let recorder = EventWriter::new(client.clone(), reporter);
    let algorithms = Arc::new(algorithms);
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    for (gvk, scope) in kinds
        .iter()
        .flat_map(|k| scopes.iter().map(move |s| (k.clone(), s.clone())))
    {
        let (tx, recorder) = (tx.clone(), recorder.clone());
        let algorithms = algorithms.clone();
        let client = client.clone();
        let listed = listed.clone();
        tokio::spawn(async move {
            let Some(resource) = find_kind(&client, &gvk, &tx).await else {
                // A kind the cluster does not serve is listed: empty.
                listed.one_done();
                return;
            };
            let mut first_list = true;
            let api: Api<DynamicObject> = match &scope {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            let api_version = resource.api_version.clone();
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|o| o.managed_fields_mut().clear())
                .boxed();
            // A re-list arrives as Init, InitApply…, InitDone: it replaces
            // this kind's entries at once, so nothing vanishes in between.
            let mut relist: Option<Vec<DynamicObject>> = None;
            // The invalid annotations already reported, by object: one
            // Warning Event per distinct error, not one per resync.
            let mut reported: BTreeMap<TargetRef, String> = BTreeMap::new();
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::warn!(kind = %resource.kind, error = %e, "workload watch failed; retrying");
                        continue;
                    }
                };
                let key = |o: &DynamicObject| TargetRef {
                    api_version: api_version.clone(),
                    kind: resource.kind.clone(),
                    namespace: o.namespace().unwrap_or_default(),
                    name: o.name_any(),
                };
                // Parsed, with an InvalidAnnotation Event the first time
                // an error is seen.
                let mut read = async |o: &DynamicObject| {
                    let k = key(o);
                    let w = parse(o, &resource, &algorithms);
                    match &w {
                        Some(Workload::Invalid(why)) if reported.get(&k) != Some(why) => {
                            reported.insert(k.clone(), why.clone());
                            let note: String = why.chars().take(1000).collect();
                            let event = Event {
                                type_: EventType::Warning,
                                reason: "InvalidAnnotation".into(),
                                note: Some(note),
                                action: "Parse".into(),
                                secondary: None,
                            };
                            if let Err(e) = recorder.publish(&event, &o.object_ref(&resource)).await
                            {
                                tracing::warn!(target = %k, error = %e, "writing the InvalidAnnotation event failed");
                            }
                            tracing::warn!(target = %k, %why, "invalid scalecar annotations: left alone");
                        }
                        Some(Workload::Invalid(_)) => {}
                        Some(Workload::Valid(_)) | None => {
                            reported.remove(&k);
                        }
                    }
                    (k, w)
                };
                let change = match ev {
                    watcher::Event::Init => {
                        relist = Some(Vec::new());
                        continue;
                    }
                    watcher::Event::InitApply(o) => {
                        relist.get_or_insert_with(Vec::new).push(o);
                        continue;
                    }
                    watcher::Event::InitDone => {
                        let mut workloads = Vec::new();
                        for o in relist.take().unwrap_or_default() {
                            if let (k, Some(w)) = read(&o).await {
                                workloads.push((k, w));
                            }
                        }
                        WorkloadChange::Listed {
                            api_version: api_version.clone(),
                            kind: resource.kind.clone(),
                            scope: scope.clone(),
                            workloads,
                        }
                    }
                    watcher::Event::Apply(o) => match read(&o).await {
                        (k, Some(w)) => WorkloadChange::Applied(k, w),
                        (k, None) => WorkloadChange::Removed(k),
                    },
                    watcher::Event::Delete(o) => {
                        let k = key(&o);
                        reported.remove(&k);
                        WorkloadChange::Removed(k)
                    }
                };
                let was_list = matches!(change, WorkloadChange::Listed { .. });
                if tx.send(change).await.is_err() {
                    return;
                }
                // Counted once sent: whoever sees the count can read the
                // list.
                if was_list && std::mem::take(&mut first_list) {
                    listed.one_done();
                }
            }
        });
    }
    rx
}

/// How many of a set of watches have delivered their first complete
/// list: a gateway is ready to route only once it knows the cluster.
#[derive(Debug, Clone, Default)]
pub struct Listed(Arc<std::sync::atomic::AtomicUsize>);

impl Listed {
    pub fn one_done(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(kind: &str, ns: &str, name: &str) -> TargetRef {
        TargetRef {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn invalid(why: &str) -> Workload {
        Workload::Invalid(why.into())
    }

    #[test]
    fn a_change_touches_only_the_objects_it_changes() {
        let mut workloads = Workloads::new();
        let mut touched = Vec::new();
        let listed = |scope: &str, items: Vec<(TargetRef, Workload)>| WorkloadChange::Listed {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            scope: Some(scope.into()),
            workloads: items,
        };
        listed(
            "a",
            vec![
                (at("Deployment", "a", "x"), invalid("1")),
                (at("Deployment", "a", "y"), invalid("1")),
            ],
        )
        .apply(&mut workloads, &mut touched);
        WorkloadChange::Applied(at("StatefulSet", "a", "s"), invalid("1"))
            .apply(&mut workloads, &mut touched);
        assert_eq!(touched.len(), 3);
        touched.clear();
        // The same object again: nothing.
        WorkloadChange::Applied(at("Deployment", "a", "x"), invalid("1"))
            .apply(&mut workloads, &mut touched);
        assert!(touched.is_empty());
        // A re-list of the Deployments in "a": y changed, x gone; the
        // StatefulSet is another kind's and stays.
        listed("a", vec![(at("Deployment", "a", "y"), invalid("2"))])
            .apply(&mut workloads, &mut touched);
        touched.sort();
        assert_eq!(
            touched,
            [at("Deployment", "a", "x"), at("Deployment", "a", "y")]
        );
        assert_eq!(workloads.len(), 2);
        assert_eq!(
            workloads.get(&at("Deployment", "a", "y")),
            Some(&invalid("2"))
        );
        touched.clear();
        WorkloadChange::Removed(at("StatefulSet", "a", "s")).apply(&mut workloads, &mut touched);
        WorkloadChange::Removed(at("StatefulSet", "a", "s")).apply(&mut workloads, &mut touched);
        assert_eq!(touched.len(), 1);
        assert_eq!(workloads.len(), 1);
    }
}
