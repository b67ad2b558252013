//! Other autoscalers' claims on workloads: HorizontalPodAutoscalers
//! (`autoscaling/v2`) and KEDA ScaledObjects (`keda.sh/v1alpha1`, when the
//! cluster serves them) whose `scaleTargetRef` names a workload. Two
//! controllers writing one replica count fight — each undoes the other
//! every few seconds — so a claimed workload is left to its claimant (KEDA
//! refuses the same conflict between two ScaledObjects).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::{Mutex, watch};

use super::Listed;

/// A workload, as a `scaleTargetRef` names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claimed {
    pub namespace: String,
    pub kind: String,
    pub name: String,
}

/// Claimed workloads and who claims them (`HorizontalPodAutoscaler
/// llm/llama`), the first claimant by name when several do.
pub type Claims = BTreeMap<Claimed, String>;

/// One claimant object → the workload it claims.
type Sources = BTreeMap<(String, String, String), Claimed>;

fn publish(sources: &Sources, tx: &watch::Sender<Arc<Claims>>) {
    let mut claims = Claims::new();
    for ((kind, ns, name), claimed) in sources {
        claims
            .entry(claimed.clone())
            .or_insert_with(|| format!("{kind} {ns}/{name}"));
    }
    tx.send_if_modified(|c| {
        if **c == claims {
            false
        } else {
            *c = Arc::new(claims);
            true
        }
    });
}

/// Watches HorizontalPodAutoscalers and ScaledObjects in `namespaces`
/// (empty: all); each watch counts its first list on `listed` (a cluster
/// without KEDA counts its ScaledObjects as listed, empty).
pub fn watch_competitors(
    client: Client,
    namespaces: &[String],
    listed: Listed,
) -> watch::Receiver<Arc<Claims>> {
    let (tx, rx) = watch::channel(Arc::new(Claims::new()));
    let tx = Arc::new(tx);
    let sources: Arc<Mutex<Sources>> = Arc::default();
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    for scope in scopes {
        let hpa_scope = scope.clone();
        let (hpa_tx, hpa_sources, hpa_listed, hpa_client) =
            (tx.clone(), sources.clone(), listed.clone(), client.clone());
        tokio::spawn(async move {
            let (scope, tx, sources, listed, client) =
                (hpa_scope, hpa_tx, hpa_sources, hpa_listed, hpa_client);
            let hpas: Api<HorizontalPodAutoscaler> = match &scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let claim = |h: &HorizontalPodAutoscaler| {
                let r = &h.spec.as_ref()?.scale_target_ref;
                Some(Claimed {
                    namespace: h.namespace().unwrap_or_default(),
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                })
            };
            follow(
                watcher(hpas, watcher::Config::default()),
                "HorizontalPodAutoscaler",
                claim,
                sources,
                tx,
                listed,
            )
            .await;
        });
        let (tx, sources, listed, client) =
            (tx.clone(), sources.clone(), listed.clone(), client.clone());
        tokio::spawn(async move {
            let gvk = GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject");
            let Ok((resource, _)) = kube::discovery::pinned_kind(&client, &gvk).await else {
                // No KEDA here: nothing to list.
                listed.one_done();
                return;
            };
            let objects: Api<DynamicObject> = match &scope {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            let claim = |o: &DynamicObject| {
                let r = o.data.get("spec")?.get("scaleTargetRef")?;
                Some(Claimed {
                    namespace: o.namespace().unwrap_or_default(),
                    // KEDA's default kind.
                    kind: r
                        .get("kind")
                        .and_then(|k| k.as_str())
                        .unwrap_or("Deployment")
                        .to_string(),
                    name: r.get("name")?.as_str()?.to_string(),
                })
            };
            follow(
                watcher(objects, watcher::Config::default()),
                "ScaledObject",
                claim,
                sources,
                tx,
                listed,
            )
            .await;
        });
    }
    rx
}

/// Whether a watch failed for want of the right to list.
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

/// Applies one claimant kind's watch events to `sources` and publishes.
async fn follow<K, S>(
    events: S,
    kind: &'static str,
    claim: impl Fn(&K) -> Option<Claimed>,
    sources: Arc<Mutex<Sources>>,
    tx: Arc<watch::Sender<Arc<Claims>>>,
    listed: Listed,
) where
    K: kube::Resource + Clone + std::fmt::Debug + Send + 'static,
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut events = events.default_backoff().boxed();
    let mut relist: Option<Vec<K>> = None;
    let mut first = true;
    let key = |o: &K| {
        (
            kind.to_string(),
            o.meta().namespace.clone().unwrap_or_default(),
            o.meta().name.clone().unwrap_or_default(),
        )
    };
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                // Without the right to list them (an older install's RBAC),
                // other autoscalers go undetected: said once, and the
                // gateway is not kept from serving for it.
                if first && forbidden(&e) {
                    tracing::warn!(%kind, error = %e, "not allowed to watch; other autoscalers on the same workloads go undetected (add get/list/watch to the RBAC)");
                    first = false;
                    listed.one_done();
                } else {
                    tracing::warn!(%kind, error = %e, "autoscaler watch failed; retrying");
                }
                continue;
            }
        };
        let mut s = sources.lock().await;
        match ev {
            watcher::Event::Init => {
                relist = Some(Vec::new());
                continue;
            }
            watcher::Event::InitApply(o) => {
                relist.get_or_insert_with(Vec::new).push(o);
                continue;
            }
            watcher::Event::InitDone => {
                let listed_now = relist.take().unwrap_or_default();
                s.retain(|(k, _, _), _| k != kind);
                for o in &listed_now {
                    if let Some(c) = claim(o) {
                        s.insert(key(o), c);
                    }
                }
            }
            watcher::Event::Apply(o) => match claim(&o) {
                Some(c) => {
                    s.insert(key(&o), c);
                }
                None => {
                    s.remove(&key(&o));
                }
            },
            watcher::Event::Delete(o) => {
                s.remove(&key(&o));
            }
        }
        publish(&s, &tx);
        drop(s);
        if first && relist.is_none() {
            first = false;
            listed.one_done();
        }
    }
}
