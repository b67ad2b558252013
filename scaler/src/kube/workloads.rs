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
//!
//! An `InferencePool` (Gateway API Inference Extension) is one more kind
//! here when scalecar is an endpoint picker: ours when its
//! `spec.endpointPickerRef` names our Service, its pods those its
//! `selector` picks on its first `targetPorts` number, its model and
//! policy its `scalecar.io/*` annotations. Which workload it scales is
//! found later, from the annotation `scalecar.io/workload` or its pods'
//! owners.

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
use super::selector::LabelSelector;
use crate::target::TargetRef;

/// The Inference Extension's pool kind.
pub const INFERENCE_POOL_GROUP: &str = "inference.networking.k8s.io";
pub const INFERENCE_POOL_KIND: &str = "InferencePool";

/// What makes an object ours, besides `scalecar.io/model`.
#[derive(Debug, Clone, Default)]
pub struct Recognized {
    /// The registered algorithm names (another is an invalid annotation).
    pub algorithms: Vec<String>,
    /// The Service name an `InferencePool`'s `endpointPickerRef` must name
    /// to be ours (`None`: no pool is).
    pub endpoint_picker: Option<String>,
}

/// What an `InferencePool` this scalecar picks for says of its pods.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolPods {
    /// `spec.selector`.
    pub selector: LabelSelector,
    /// `spec.targetPorts[0].number`: where its model servers listen.
    pub port: u16,
}

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
    /// Set for an `InferencePool`: the pods it names (the workload to
    /// scale is found from them or `target.workload`).
    pub pool: Option<PoolPods>,
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
        recognized: &Recognized,
    ) -> Option<Workload> {
        parse(o, resource, recognized)
    }
}

fn is_inference_pool(resource: &ApiResource) -> bool {
    resource.group == INFERENCE_POOL_GROUP && resource.kind == INFERENCE_POOL_KIND
}

/// An InferencePool's `endpointPickerRef` names `picker` (a Service of the
/// pool's namespace: the ref's group is core and its kind Service, either
/// spelled out or left to their defaults).
fn picks_for(o: &DynamicObject, picker: &str) -> bool {
    let Some(r) = o.data.pointer("/spec/endpointPickerRef") else {
        return false;
    };
    let field = |k: &str| r.get(k).and_then(serde_json::Value::as_str);
    field("name") == Some(picker)
        && field("group").is_none_or(str::is_empty)
        && field("kind").is_none_or(|k| k == "Service")
}

/// The pods an InferencePool names, or what is wrong with it.
fn pool_pods(o: &DynamicObject) -> Result<PoolPods, String> {
    let selector = match o.data.pointer("/spec/selector") {
        Some(v) if v.is_object() => {
            LabelSelector::from_object(v).map_err(|e| format!("spec.selector: {e}"))?
        }
        _ => return Err("spec.selector is required".into()),
    };
    if selector.is_empty() {
        return Err("spec.selector is empty: it would select every pod of the namespace".into());
    }
    let number = o
        .data
        .pointer("/spec/targetPorts/0/number")
        .ok_or("spec.targetPorts[0].number is required")?;
    let port = number
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("spec.targetPorts[0].number: {number} is not a port"))?;
    Ok(PoolPods { selector, port })
}

fn parse(o: &DynamicObject, resource: &ApiResource, recognized: &Recognized) -> Option<Workload> {
    let pool = is_inference_pool(resource);
    if pool
        && !recognized
            .endpoint_picker
            .as_deref()
            .is_some_and(|p| picks_for(o, p))
    {
        // Another picker's pool.
        return None;
    }
    let annotations: BTreeMap<String, String> = o
        .annotations()
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !annotations.contains_key(&format!("{PREFIX}model")) {
        // A pool that names us but not its model cannot be routed: say so
        // on it rather than ignore it.
        return pool.then(|| {
            Workload::Invalid(format!(
                "{PREFIX}model is required on an InferencePool this scalecar picks for (the model name its requests carry)"
            ))
        });
    }
    let target = match Policy::from_annotations(&annotations) {
        Ok(t) => t,
        Err(e) => return Some(Workload::Invalid(e.to_string())),
    };
    // An algorithm nobody registered is as wrong as a misspelt key: say so
    // on the object rather than fail at the first tick.
    let known: Vec<&str> = recognized.algorithms.iter().map(String::as_str).collect();
    if let Err(e) = target.policy.validate_algorithm(&known) {
        return Some(Workload::Invalid(format!("{PREFIX}algorithm: {e}")));
    }
    let pool = if pool {
        match pool_pods(o) {
            Ok(p) => Some(p),
            Err(e) => return Some(Workload::Invalid(format!("InferencePool {e}"))),
        }
    } else if let Some(w) = &target.workload {
        return Some(Workload::Invalid(format!(
            "{PREFIX}workload ({w}) names the workload an InferencePool scales; on a {} it has no meaning",
            resource.kind
        )));
    } else {
        None
    };
    Some(Workload::Valid(Box::new(Annotated {
        pool,
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
/// `absent` is called once, at the first answer that the cluster does not
/// serve the kind (as opposed to no answer): the kind has no objects yet,
/// and readiness need not wait for its CRD.
async fn find_kind(
    client: &Client,
    gvk: &GroupVersionKind,
    tx: &mpsc::Sender<WorkloadChange>,
    mut absent: impl FnMut(),
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
            Ok(Err(e)) => {
                if not_served(&e) {
                    absent();
                }
                e.to_string()
            }
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

/// The API server answered that it does not serve the kind (its group,
/// version or kind unknown), rather than failing to answer.
fn not_served(e: &kube::Error) -> bool {
    use kube::error::DiscoveryError as D;
    match e {
        kube::Error::Api(s) => s.code == 404,
        kube::Error::Discovery(
            D::MissingKind(_) | D::MissingApiGroup(_) | D::MissingResource(_),
        ) => true,
        _ => false,
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
/// change of the annotated workloads (and of the InferencePools that
/// `recognized` names our picker in). Runs until the receiver is dropped. Each kind and
/// scope's first list counts on `listed` once it is sent.
pub fn watch_workloads(
    client: Client,
    kinds: Vec<GroupVersionKind>,
    namespaces: &[String],
    recognized: Recognized,
    reporter: Reporter,
    listed: Listed,
) -> mpsc::Receiver<WorkloadChange> {
    let (tx, rx) = mpsc::channel(CHANGES_QUEUED);
    let recorder = EventWriter::new(client.clone(), reporter);
    let recognized = Arc::new(recognized);
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
        let recognized = recognized.clone();
        let client = client.clone();
        let listed = listed.clone();
        tokio::spawn(async move {
            // A kind the cluster does not serve (yet) is listed: empty.
            let mut first_list = true;
            let absent = || {
                if std::mem::take(&mut first_list) {
                    listed.one_done();
                }
            };
            let Some(resource) = find_kind(&client, &gvk, &tx, absent).await else {
                if std::mem::take(&mut first_list) {
                    listed.one_done();
                }
                return;
            };
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
                    let w = parse(o, &resource, &recognized);
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

    fn object(
        kind_api: (&str, &str),
        annotations: serde_json::Value,
        spec: serde_json::Value,
    ) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": kind_api.0, "kind": kind_api.1,
            "metadata": {"name": "llama", "namespace": "llm", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn pool_resource() -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(
            INFERENCE_POOL_GROUP,
            "v1",
            INFERENCE_POOL_KIND,
        ))
    }

    fn recognized(picker: Option<&str>) -> Recognized {
        Recognized {
            algorithms: vec!["slo".into(), "kpa".into()],
            endpoint_picker: picker.map(str::to_string),
        }
    }

    #[test]
    fn an_inference_pool_is_ours_only_when_its_picker_is() {
        let spec = serde_json::json!({
            "selector": {"matchLabels": {"app": "llama"}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "scalecar-epp", "port": {"number": 9002}},
        });
        let pool = object(
            ("inference.networking.k8s.io/v1", "InferencePool"),
            serde_json::json!({"scalecar.io/model": "llama-3-8b", "scalecar.io/workload": "Deployment/llama"}),
            spec.clone(),
        );
        let Some(Workload::Valid(a)) =
            parse(&pool, &pool_resource(), &recognized(Some("scalecar-epp")))
        else {
            panic!("a pool naming our picker is ours");
        };
        let pods = a.pool.as_ref().unwrap();
        assert_eq!(pods.port, 8000);
        assert_eq!(pods.selector, LabelSelector::parse("app=llama").unwrap());
        assert_eq!(
            a.target.workload.as_ref().unwrap().to_string(),
            "Deployment/llama"
        );
        // Another picker's, or no picker configured: not ours, annotated or not.
        assert_eq!(
            parse(&pool, &pool_resource(), &recognized(Some("other-epp"))),
            None
        );
        assert_eq!(parse(&pool, &pool_resource(), &recognized(None)), None);
        let mut foreign = spec.clone();
        foreign["endpointPickerRef"]["kind"] = "Gateway".into();
        let pool_of = |annotations, spec| {
            parse(
                &object(
                    ("inference.networking.k8s.io/v1", "InferencePool"),
                    annotations,
                    spec,
                ),
                &pool_resource(),
                &recognized(Some("scalecar-epp")),
            )
        };
        assert_eq!(
            pool_of(serde_json::json!({"scalecar.io/model": "m"}), foreign),
            None
        );
        // Ours but unusable: said, not ignored.
        let invalid = |annotations, spec| match pool_of(annotations, spec) {
            Some(Workload::Invalid(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(
            invalid(serde_json::json!({}), spec.clone()).contains("scalecar.io/model is required")
        );
        let mut no_port = spec.clone();
        no_port["targetPorts"] = serde_json::json!([]);
        assert!(
            invalid(serde_json::json!({"scalecar.io/model": "m"}), no_port)
                .contains("targetPorts[0].number")
        );
        let mut no_selector = spec.clone();
        no_selector["selector"] = serde_json::json!({"matchLabels": {}});
        assert!(
            invalid(serde_json::json!({"scalecar.io/model": "m"}), no_selector)
                .contains("spec.selector")
        );
        for (bad, said) in [
            (serde_json::json!(70000), "70000"),
            (serde_json::json!(-1), "-1"),
            (serde_json::json!("http"), "\"http\""),
        ] {
            let mut bad_port = spec.clone();
            bad_port["targetPorts"][0]["number"] = bad;
            let why = invalid(serde_json::json!({"scalecar.io/model": "m"}), bad_port);
            assert!(why.contains(&format!("{said} is not a port")), "{why}");
        }
        // The workload key on a workload itself is a mistake.
        let deployment = object(
            ("apps/v1", "Deployment"),
            serde_json::json!({"scalecar.io/model": "m", "scalecar.io/workload": "Deployment/x"}),
            serde_json::json!({"replicas": 1}),
        );
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"));
        match parse(&deployment, &resource, &recognized(Some("scalecar-epp"))) {
            Some(Workload::Invalid(why)) => assert!(why.contains("scalecar.io/workload"), "{why}"),
            other => panic!("{other:?}"),
        }
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
