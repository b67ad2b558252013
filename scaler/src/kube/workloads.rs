//! Which workloads scalecar manages: every object of the watched kinds that
//! carries `scalecar.io/model`, its annotations parsed by the config crate.
//!
//! One kube-rs watcher per kind (default backoff, so a dropped watch or a
//! 410 re-lists without losing anything) keeps a map by object; every
//! change publishes the whole set on a `watch` channel. An object whose
//! annotations do not parse is published as invalid — never scaled, never
//! routed — and gets one Warning Event `InvalidAnnotation` naming the key,
//! the value and what is allowed (once per distinct error, not every
//! resync); a later valid edit publishes it as valid.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use scalecar_config::{AnnotatedTarget, PREFIX, Policy};
use tokio::sync::{Mutex, watch};

use crate::target::TargetRef;

/// One annotated workload, parsed or not.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    Valid(Box<AnnotatedTarget>),
    /// Left alone until fixed: the errors, in words.
    Invalid(String),
}

/// The annotated workloads of the watched kinds, by coordinates.
pub type Workloads = BTreeMap<TargetRef, Workload>;

fn parse(o: &DynamicObject) -> Option<Workload> {
    let annotations: BTreeMap<String, String> = o
        .annotations()
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !annotations.contains_key(&format!("{PREFIX}model")) {
        return None;
    }
    Some(match Policy::from_annotations(&annotations) {
        Ok(t) => Workload::Valid(Box::new(t)),
        Err(e) => Workload::Invalid(e.to_string()),
    })
}

/// Watches `kinds` (in `namespace`, or all) and publishes the annotated
/// workloads. Runs until the receiver is dropped.
pub fn watch_workloads(
    client: Client,
    kinds: Vec<(GroupVersionKind, String)>,
    namespace: Option<String>,
    reporter: Reporter,
) -> watch::Receiver<Workloads> {
    let (tx, rx) = watch::channel(Workloads::new());
    let state = Arc::new(Mutex::new((
        Workloads::new(),
        BTreeMap::<TargetRef, String>::new(),
    )));
    let recorder = Recorder::new(client.clone(), reporter);
    for (gvk, plural) in kinds {
        let resource = ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let (tx, state, recorder) = (tx.clone(), state.clone(), recorder.clone());
        let api_version = resource.api_version.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            // A re-list arrives as Init, InitApply…, InitDone: it replaces
            // this kind's entries at once, so nothing vanishes in between.
            let mut relist: Option<Vec<DynamicObject>> = None;
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::warn!(kind = %resource.kind, error = %e, "workload watch failed; retrying");
                        continue;
                    }
                };
                let (upserts, deletes, restart) = match ev {
                    watcher::Event::Init => {
                        relist = Some(Vec::new());
                        continue;
                    }
                    watcher::Event::InitApply(o) => {
                        relist.get_or_insert_with(Vec::new).push(o);
                        continue;
                    }
                    watcher::Event::InitDone => (relist.take().unwrap_or_default(), vec![], true),
                    watcher::Event::Apply(o) => (vec![o], vec![], false),
                    watcher::Event::Delete(o) => (vec![], vec![o], false),
                };
                let key = |o: &DynamicObject| TargetRef {
                    api_version: api_version.clone(),
                    kind: resource.kind.clone(),
                    namespace: o.namespace().unwrap_or_default(),
                    name: o.name_any(),
                };
                let mut guard = state.lock().await;
                let (workloads, reported) = &mut *guard;
                if restart {
                    // A re-list: what is not listed again is gone.
                    workloads
                        .retain(|k, _| k.kind != resource.kind || k.api_version != api_version);
                }
                for o in &deletes {
                    workloads.remove(&key(o));
                }
                for o in &upserts {
                    let k = key(o);
                    match parse(o) {
                        None => {
                            workloads.remove(&k);
                        }
                        Some(w) => {
                            if let Workload::Invalid(why) = &w
                                && reported.get(&k) != Some(why)
                            {
                                reported.insert(k.clone(), why.clone());
                                let note: String = why.chars().take(1000).collect();
                                let event = Event {
                                    type_: EventType::Warning,
                                    reason: "InvalidAnnotation".into(),
                                    note: Some(note),
                                    action: "Parse".into(),
                                    secondary: None,
                                };
                                if let Err(e) =
                                    recorder.publish(&event, &o.object_ref(&resource)).await
                                {
                                    tracing::warn!(target = %k, error = %e, "writing the InvalidAnnotation event failed");
                                }
                                tracing::warn!(target = %k, %why, "invalid scalecar annotations: left alone");
                            } else if matches!(w, Workload::Valid(_)) {
                                reported.remove(&k);
                            }
                            workloads.insert(k, w);
                        }
                    }
                }
                if tx.send(workloads.clone()).is_err() {
                    return;
                }
            }
        });
    }
    rx
}
