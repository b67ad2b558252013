//! Pod discovery: the pods of the watched namespaces, reduced to what
//! routing needs (labels, IP, readiness, whether they are going away, the
//! port named `http`), sent as changes — a (re-)list, one pod applied, one
//! deleted — to one owner that keeps them in a [`PodIndex`]. Nothing copies
//! the set per event: with 10,000 pods a pod event costs the pod, not the
//! cluster.
//!
//! A pod is serving only while it is Ready, has an IP and carries no
//! deletionTimestamp: a Terminating pod leaves the pools at the first
//! watch event that shows it, before its containers stop, so it gets no new
//! requests while the open ones finish on it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use super::selector::LabelSelector;

/// What routing knows of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<IpAddr>,
    pub ready: bool,
    /// It has a deletionTimestamp.
    pub terminating: bool,
    /// The first container port named `http`.
    pub http_port: Option<u16>,
    /// The first container port named `admin` (a gateway replica's).
    pub admin_port: Option<u16>,
    /// From created to Ready, for a Ready pod whose Ready condition came
    /// within `LONGEST_COLD_START` of its creation (a later one is a pod
    /// that was unready again, not a cold start).
    pub cold_start: Option<std::time::Duration>,
    /// Its controller (the ownerReference with `controller: true`).
    pub owner: Option<Owner>,
}

/// A pod's controller, as its ownerReference names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

/// Longer from created to Ready than this is not taken for a cold start.
pub const LONGEST_COLD_START: std::time::Duration = std::time::Duration::from_secs(3600);

impl PodInfo {
    pub fn from_pod(p: &Pod) -> PodInfo {
        let status = p.status.as_ref();
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let ready_condition = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"));
        let ready = ready_condition.is_some();
        let cold_start = ready_condition
            .and_then(|c| c.last_transition_time.as_ref())
            .zip(p.metadata.creation_timestamp.as_ref())
            .and_then(|(ready_at, created)| {
                let d = ready_at.0.duration_since(created.0);
                std::time::Duration::try_from(d).ok()
            })
            .filter(|d| *d <= LONGEST_COLD_START);
        let named = |name: &str| {
            p.spec.as_ref().and_then(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|port| port.name.as_deref() == Some(name))
                    .and_then(|port| u16::try_from(port.container_port).ok())
            })
        };
        let (http_port, admin_port) = (named("http"), named("admin"));
        let owner = p
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| Owner {
                api_version: o.api_version.clone(),
                kind: o.kind.clone(),
                name: o.name.clone(),
            });
        PodInfo {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            labels: p.labels().clone(),
            ip,
            ready,
            terminating: p.metadata.deletion_timestamp.is_some(),
            http_port,
            admin_port,
            cold_start,
            owner,
        }
    }

    /// The workload that scales it: its controller, or for a ReplicaSet a
    /// Deployment made (its name is the Deployment's and the pod's
    /// `pod-template-hash`), that Deployment.
    pub fn workload(&self) -> Option<Owner> {
        let o = self.owner.as_ref()?;
        if o.kind == "ReplicaSet"
            && o.api_version == "apps/v1"
            && let Some(hash) = self.labels.get("pod-template-hash")
            && let Some(deployment) = o
                .name
                .strip_suffix(hash.as_str())
                .and_then(|n| n.strip_suffix('-'))
                .filter(|n| !n.is_empty())
        {
            return Some(Owner {
                api_version: o.api_version.clone(),
                kind: "Deployment".into(),
                name: deployment.to_string(),
            });
        }
        Some(o.clone())
    }

    /// Ready, addressed and not going away.
    pub fn serving(&self) -> bool {
        self.ready && !self.terminating && self.ip.is_some()
    }

    /// Where it serves, on `port` or its `http` port.
    pub fn endpoint(&self, port: Option<u16>) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.ip?, port.or(self.http_port)?))
    }
}

/// The known pods by (namespace, name).
pub type Pods = BTreeMap<(String, String), PodInfo>;

/// The serving endpoints among `pods` that `selector` picks in `namespace`,
/// sorted; and how many selected pods serve but have no port to reach them
/// on (neither `port` nor a container port named `http`).
pub fn endpoints_of(
    pods: &Pods,
    namespace: &str,
    selector: &LabelSelector,
    port: Option<u16>,
) -> (Vec<SocketAddr>, usize) {
    let mut out = Vec::new();
    let mut portless = 0;
    // Keys sort by namespace first: only this namespace's pods are looked at.
    let from = (namespace.to_string(), String::new());
    for p in pods
        .range(from..)
        .map(|(_, p)| p)
        .take_while(|p| p.namespace == namespace)
    {
        if !p.serving() || !selector.matches(&p.labels) {
            continue;
        }
        match p.endpoint(port) {
            Some(e) => out.push(e),
            None => portless += 1,
        }
    }
    out.sort();
    (out, portless)
}

/// The one workload the pods `selector` picks in `namespace` belong to
/// (see [`PodInfo::workload`]): `Ok(None)` when it picks none, an error in
/// words when they belong to none or to several.
pub fn workload_of(
    pods: &Pods,
    namespace: &str,
    selector: &LabelSelector,
) -> Result<Option<Owner>, String> {
    let from = (namespace.to_string(), String::new());
    let mut found: std::collections::BTreeSet<Owner> = std::collections::BTreeSet::new();
    for p in pods
        .range(from..)
        .map(|(_, p)| p)
        .take_while(|p| p.namespace == namespace)
        .filter(|p| selector.matches(&p.labels))
    {
        match p.workload() {
            Some(w) => {
                found.insert(w);
            }
            None => return Err(format!("pod {} has no controller", p.name)),
        }
    }
    let mut it = found.iter();
    match (it.next(), it.next()) {
        (None, _) => Ok(None),
        (Some(one), None) => Ok(Some(one.clone())),
        (Some(_), Some(_)) => Err(format!(
            "its pods belong to several workloads ({})",
            found
                .iter()
                .map(|o| format!("{}/{}", o.kind, o.name))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The cold starts of the Ready pods `selector` picks in `namespace`, by
/// pod name.
pub fn cold_starts_of<'a>(
    pods: &'a Pods,
    namespace: &str,
    selector: &'a LabelSelector,
) -> impl Iterator<Item = (&'a str, std::time::Duration)> + 'a {
    let from = (namespace.to_string(), String::new());
    let namespace = namespace.to_string();
    pods.range(from..)
        .map(|(_, p)| p)
        .take_while(move |p| p.namespace == namespace)
        .filter(move |p| p.serving() && selector.matches(&p.labels))
        .filter_map(|p| Some((p.name.as_str(), p.cold_start?)))
}

/// One change of the watched pods, in the order the API server gave them.
#[derive(Debug, Clone, PartialEq)]
pub enum PodChange {
    /// A (re-)list of one scope (`None`: every namespace): what it holds
    /// now, replacing all that was known there.
    Listed {
        scope: Option<String>,
        pods: Vec<PodInfo>,
    },
    /// A pod added or changed.
    Applied(PodInfo),
    /// A pod gone.
    Deleted { namespace: String, name: String },
}

/// The pods known, kept by the one task that applies [`PodChange`]s.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: Pods,
}

impl PodIndex {
    pub fn pods(&self) -> &Pods {
        &self.pods
    }

    /// Applies `change`, pushing onto `touched` each pod whose routing
    /// view changed, as it was and as it is (so whoever selected either
    /// version looks again). A status heartbeat that changes nothing
    /// routing sees touches nothing.
    pub fn apply(&mut self, change: PodChange, touched: &mut Vec<PodInfo>) {
        match change {
            PodChange::Listed { scope, pods } => {
                let in_scope = |p: &PodInfo| scope.as_ref().is_none_or(|ns| &p.namespace == ns);
                let mut fresh: Pods = pods
                    .into_iter()
                    .filter(|p| in_scope(p))
                    .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                    .collect();
                // What the list no longer holds is gone; what it holds
                // differently changed.
                self.pods.retain(|key, old| {
                    if !in_scope(old) {
                        return true;
                    }
                    match fresh.get(key) {
                        Some(new) if new == old => {
                            fresh.remove(key);
                            true
                        }
                        _ => {
                            touched.push(old.clone());
                            false
                        }
                    }
                });
                for (key, p) in fresh {
                    touched.push(p.clone());
                    self.pods.insert(key, p);
                }
            }
            PodChange::Applied(p) => {
                let key = (p.namespace.clone(), p.name.clone());
                match self.pods.get(&key) {
                    Some(old) if *old == p => {}
                    Some(old) => {
                        touched.push(old.clone());
                        touched.push(p.clone());
                        self.pods.insert(key, p);
                    }
                    None => {
                        touched.push(p.clone());
                        self.pods.insert(key, p);
                    }
                }
            }
            PodChange::Deleted { namespace, name } => {
                if let Some(old) = self.pods.remove(&(namespace, name)) {
                    touched.push(old);
                }
            }
        }
    }
}

/// How many pod changes may wait for their reader before the watch waits.
const CHANGES_QUEUED: usize = 4096;

/// Watches the pods of `namespaces` (empty: all), only those `labels`
/// selects when given (a label selector in the API's syntax), and sends
/// every change. Runs until the receiver is dropped; a failed watch
/// re-lists with kube-rs's default backoff, and a re-list arrives as one
/// [`PodChange::Listed`]. Each scope's first list counts on `listed` once
/// it is sent.
pub fn watch_pods(
    client: Client,
    namespaces: &[String],
    labels: Option<String>,
    listed: super::Listed,
) -> mpsc::Receiver<PodChange> {
    let (tx, rx) = mpsc::channel(CHANGES_QUEUED);
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    for scope in scopes {
        let api: Api<Pod> = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let config = match &labels {
            Some(l) => watcher::Config::default().labels(l),
            None => watcher::Config::default(),
        };
        let tx = tx.clone();
        let listed_count = listed.clone();
        tokio::spawn(async move {
            let mut first_list = true;
            let mut events = watcher(api, config).default_backoff().boxed();
            let mut relist: Option<Vec<PodInfo>> = None;
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::warn!(namespace = ?scope, error = %e, "pod watch failed; retrying");
                        continue;
                    }
                };
                let change = match ev {
                    watcher::Event::Init => {
                        relist = Some(Vec::new());
                        continue;
                    }
                    watcher::Event::InitApply(p) => {
                        relist
                            .get_or_insert_with(Vec::new)
                            .push(PodInfo::from_pod(&p));
                        continue;
                    }
                    watcher::Event::InitDone => PodChange::Listed {
                        scope: scope.clone(),
                        pods: relist.take().unwrap_or_default(),
                    },
                    watcher::Event::Apply(p) => PodChange::Applied(PodInfo::from_pod(&p)),
                    watcher::Event::Delete(p) => PodChange::Deleted {
                        namespace: p.namespace().unwrap_or_default(),
                        name: p.name_any(),
                    },
                };
                let was_list = matches!(change, PodChange::Listed { .. });
                if tx.send(change).await.is_err() {
                    return;
                }
                // Counted once sent: whoever sees the count can read the list.
                if was_list && std::mem::take(&mut first_list) {
                    listed_count.one_done();
                }
            }
        });
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, app: &str, ip: &str, ready: bool, terminating: bool) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            ip: ip.parse().ok(),
            ready,
            terminating,
            http_port: Some(8000),
            admin_port: None,
            cold_start: None,
            owner: None,
        }
    }

    #[test]
    fn a_pools_workload_is_its_pods_one_owner() {
        let owned = |name: &str, app: &str, hash: Option<&str>, owner: Option<(&str, &str)>| {
            let mut object = serde_json::json!({
                "metadata": {"name": name, "namespace": "llm",
                             "labels": {"app": app}},
            });
            if let Some(h) = hash {
                object["metadata"]["labels"]["pod-template-hash"] = h.into();
            }
            if let Some((kind, owner)) = owner {
                object["metadata"]["ownerReferences"] = serde_json::json!([
                    {"apiVersion": "v1", "kind": "Node", "name": "not-the-controller", "uid": "0"},
                    {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "1", "controller": true}]);
            }
            let p = PodInfo::from_pod(&serde_json::from_value(object).unwrap());
            ((p.namespace.clone(), p.name.clone()), p)
        };
        let sel = LabelSelector::parse("app=llama").unwrap();
        let name = |o: Option<Owner>| o.map(|o| format!("{} {}/{}", o.api_version, o.kind, o.name));
        // Two ReplicaSets of one Deployment (a rollout): the Deployment.
        let pods: Pods = [
            owned(
                "a",
                "llama",
                Some("5d8f7c"),
                Some(("ReplicaSet", "llama-8b-5d8f7c")),
            ),
            owned(
                "b",
                "llama",
                Some("7b9c2d"),
                Some(("ReplicaSet", "llama-8b-7b9c2d")),
            ),
            owned("c", "other", None, Some(("StatefulSet", "qwen"))),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            name(workload_of(&pods, "llm", &sel).unwrap()),
            Some("apps/v1 Deployment/llama-8b".into())
        );
        assert_eq!(workload_of(&pods, "other-namespace", &sel), Ok(None));
        // A StatefulSet's pods: the StatefulSet; a bare ReplicaSet (its name
        // does not end in the hash): the ReplicaSet.
        let qwen = LabelSelector::parse("app=other").unwrap();
        assert_eq!(
            name(workload_of(&pods, "llm", &qwen).unwrap()),
            Some("apps/v1 StatefulSet/qwen".into())
        );
        let bare: Pods = [owned(
            "a",
            "llama",
            Some("x1"),
            Some(("ReplicaSet", "plain")),
        )]
        .into_iter()
        .collect();
        assert_eq!(
            name(workload_of(&bare, "llm", &sel).unwrap()),
            Some("apps/v1 ReplicaSet/plain".into())
        );
        // Two workloads behind one pool, or a pod nobody controls: an error.
        let mixed: Pods = [
            owned("a", "llama", None, Some(("StatefulSet", "one"))),
            owned("b", "llama", None, Some(("StatefulSet", "two"))),
        ]
        .into_iter()
        .collect();
        let e = workload_of(&mixed, "llm", &sel).unwrap_err();
        assert!(e.contains("StatefulSet/one, StatefulSet/two"), "{e}");
        let orphan: Pods = [owned("lonely", "llama", None, None)].into_iter().collect();
        assert!(
            workload_of(&orphan, "llm", &sel)
                .unwrap_err()
                .contains("pod lonely has no controller")
        );
    }

    #[test]
    fn a_pods_cold_start_is_created_to_ready() {
        let object = |created: &str, ready: &str, status: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "a", "creationTimestamp": created},
                "status": {"podIP": "10.0.0.1", "conditions": [
                    {"type": "Ready", "status": status, "lastTransitionTime": ready}]}
            }))
            .unwrap()
        };
        let p = PodInfo::from_pod(&object(
            "2026-12-01T10:00:00Z",
            "2026-12-01T10:01:32Z",
            "True",
        ));
        assert_eq!(p.cold_start, Some(std::time::Duration::from_secs(92)));
        // Not ready: no cold start yet.
        let p = PodInfo::from_pod(&object(
            "2026-12-01T10:00:00Z",
            "2026-12-01T10:01:32Z",
            "False",
        ));
        assert_eq!(p.cold_start, None);
        // Ready again days later: a restart, not a cold start.
        let p = PodInfo::from_pod(&object(
            "2026-12-01T10:00:00Z",
            "2026-12-03T10:00:00Z",
            "True",
        ));
        assert_eq!(p.cold_start, None);
        // A clock that puts Ready before creation: nothing.
        let p = PodInfo::from_pod(&object(
            "2026-12-01T10:00:00Z",
            "2026-12-01T09:59:00Z",
            "True",
        ));
        assert_eq!(p.cold_start, None);
        let pods: Pods = [(("a".to_string(), "p".to_string()), {
            let mut p = PodInfo::from_pod(&object(
                "2026-12-01T10:00:00Z",
                "2026-12-01T10:00:45Z",
                "True",
            ));
            p.labels = BTreeMap::from([("app".to_string(), "llama".to_string())]);
            p
        })]
        .into_iter()
        .collect();
        let sel = LabelSelector::parse("app=llama").unwrap();
        let seen: Vec<_> = cold_starts_of(&pods, "a", &sel).collect();
        assert_eq!(seen, vec![("p", std::time::Duration::from_secs(45))]);
        assert_eq!(cold_starts_of(&pods, "b", &sel).count(), 0);
    }

    #[test]
    fn the_index_touches_only_what_routing_sees_change() {
        let mut index = PodIndex::default();
        let mut touched = Vec::new();
        index.apply(
            PodChange::Listed {
                scope: Some("a".into()),
                pods: vec![
                    pod("a", "p1", "llama", "10.0.0.1", true, false),
                    pod("a", "p2", "llama", "10.0.0.2", false, false),
                ],
            },
            &mut touched,
        );
        index.apply(
            PodChange::Listed {
                scope: Some("b".into()),
                pods: vec![pod("b", "p9", "qwen", "10.0.1.9", true, false)],
            },
            &mut touched,
        );
        assert_eq!(touched.len(), 3);
        assert_eq!(index.pods().len(), 3);
        // A heartbeat: the same pod again touches nothing.
        touched.clear();
        index.apply(
            PodChange::Applied(pod("a", "p1", "llama", "10.0.0.1", true, false)),
            &mut touched,
        );
        assert!(touched.is_empty());
        // Ready now: the pod as it was and as it is.
        index.apply(
            PodChange::Applied(pod("a", "p2", "llama", "10.0.0.2", true, false)),
            &mut touched,
        );
        assert_eq!(
            touched.iter().map(|p| p.ready).collect::<Vec<_>>(),
            [false, true]
        );
        // A re-list of "a" without p1 and with p2 unchanged: p1 gone, and
        // the other namespace untouched.
        touched.clear();
        index.apply(
            PodChange::Listed {
                scope: Some("a".into()),
                pods: vec![pod("a", "p2", "llama", "10.0.0.2", true, false)],
            },
            &mut touched,
        );
        assert_eq!(
            touched.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["p1"]
        );
        let names: Vec<&str> = index.pods().values().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["p2", "p9"]);
        touched.clear();
        index.apply(
            PodChange::Deleted {
                namespace: "b".into(),
                name: "p9".into(),
            },
            &mut touched,
        );
        index.apply(
            PodChange::Deleted {
                namespace: "b".into(),
                name: "p9".into(),
            },
            &mut touched,
        );
        assert_eq!(touched.len(), 1, "a second delete touches nothing");
        assert_eq!(index.pods().len(), 1);
    }

    #[test]
    fn only_ready_addressed_pods_that_stay_are_endpoints() {
        let pods: Pods = [
            pod("a", "p1", "llama", "10.0.0.1", true, false),
            pod("a", "p2", "llama", "10.0.0.2", false, false),
            pod("a", "p3", "llama", "10.0.0.3", true, true),
            pod("a", "p4", "llama", "", true, false),
            pod("b", "p5", "llama", "10.0.0.5", true, false),
            pod("a", "p6", "other", "10.0.0.6", true, false),
        ]
        .into_iter()
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
        let sel = LabelSelector::parse("app=llama").unwrap();
        let (eps, portless) = endpoints_of(&pods, "a", &sel, None);
        assert_eq!(eps, vec!["10.0.0.1:8000".parse().unwrap()]);
        assert_eq!(portless, 0);
        let (eps, _) = endpoints_of(&pods, "a", &sel, Some(9000));
        assert_eq!(eps, vec!["10.0.0.1:9000".parse().unwrap()]);
        let mut no_port = pods.clone();
        for p in no_port.values_mut() {
            p.http_port = None;
        }
        assert_eq!(endpoints_of(&no_port, "a", &sel, None), (vec![], 1));
    }
}
