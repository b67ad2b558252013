//! One generic [`ScaleTarget`] for any kind: through its `/scale`
//! subresource when discovery says it has one (Deployments, StatefulSets,
//! ReplicaSets, LeaderWorkerSets, custom resources that declare it), and by
//! a merge patch of `spec.replicas` when it has none.
//!
//! Reads come from what the workload watcher last saw ([`observe`]) and
//! the ready count from the pods routing found ([`set_ready`]); a GET only
//! before the first watch event and after a conflict. Writes carry the
//! resourceVersion of the last read, so a change made in between is a 409
//! Conflict for the control loop to re-read and re-decide, never a silent
//! overwrite. Every call is bounded by a timeout: kube-rs retries some
//! answers (503) on its own, and the loop must not stall on one target.
//!
//! [`observe`]: KubeScaleTarget::observe
//! [`set_ready`]: KubeScaleTarget::set_ready

use std::sync::Mutex;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, Scope, oneshot};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::selector::LabelSelector;
use crate::target::{BoxFuture, ScaleState, ScaleTarget, TargetError, TargetRef};

/// What is known of the object between reads.
#[derive(Debug, Default)]
struct Known {
    /// `spec.replicas` as last seen (watch, GET or our own write).
    spec: Option<u32>,
    /// resourceVersion of that sighting, sent with the next write.
    version: Option<String>,
    /// Ready pods, from discovery (`None`: the object's readyReplicas).
    ready: Option<u32>,
    /// The object's own readyReplicas.
    object_ready: u32,
    /// A write conflicted: the next read goes to the API server.
    stale: bool,
}

/// A scalable object in a cluster.
#[derive(Debug)]
pub struct KubeScaleTarget {
    target: TargetRef,
    api: Api<DynamicObject>,
    has_scale: bool,
    selector: LabelSelector,
    timeout: Duration,
    /// The workload watcher sees the object: reads come from it. An object
    /// nobody watches (an InferencePool's workload, not annotated itself)
    /// is read from the API server at each decision instead.
    watched: bool,
    known: Mutex<Known>,
}

fn error(target: &TargetRef, call: &'static str, e: kube::Error) -> TargetError {
    let target = target.to_string();
    match e {
        kube::Error::Api(s) if s.code == 409 => TargetError::Conflict {
            target,
            message: s.message,
        },
        kube::Error::Api(s) if s.code == 404 => TargetError::NotFound { target },
        other => TargetError::Api {
            target,
            call,
            source: std::sync::Arc::new(other),
        },
    }
}

impl KubeScaleTarget {
    /// Finds `target`'s resource through discovery (its plural, scope and
    /// whether it has `/scale`) and its pods' selector: the Scale's
    /// `status.selector` where there is a Scale, else the object's
    /// `spec.selector` (or `status.selector`). A target without a selector
    /// is an error: it would select every pod of its namespace.
    pub async fn discover(
        client: Client,
        target: TargetRef,
        timeout: Duration,
    ) -> Result<Self, TargetError> {
        let (group, version) = match target.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), target.api_version.clone()),
        };
        let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &target.kind);
        let found = tokio::time::timeout(timeout, oneshot::pinned_kind(&client, &gvk)).await;
        let (resource, caps): (ApiResource, ApiCapabilities) = match found {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                return Err(TargetError::Unavailable {
                    target: target.to_string(),
                    message: format!("discovery: {e}"),
                });
            }
            Err(_) => {
                return Err(TargetError::Unavailable {
                    target: target.to_string(),
                    message: format!("discovery: no answer within {timeout:?}"),
                });
            }
        };
        let has_scale = caps.subresources.iter().any(|(r, _)| r.plural == "scale");
        let api = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(client, &target.namespace, &resource),
            Scope::Cluster => Api::all_with(client, &resource),
        };
        let mut t = KubeScaleTarget {
            target,
            api,
            has_scale,
            selector: LabelSelector::default(),
            timeout,
            watched: true,
            known: Mutex::new(Known::default()),
        };
        t.selector = t.read_selector().await?;
        Ok(t)
    }

    async fn read_selector(&self) -> Result<LabelSelector, TargetError> {
        let invalid = |message: String| TargetError::Unavailable {
            target: self.target.to_string(),
            message,
        };
        let selector = if self.has_scale {
            let scale = self
                .bounded("get scale", self.api.get_scale(&self.target.name))
                .await?;
            match scale.status.and_then(|s| s.selector) {
                Some(text) => LabelSelector::parse(&text).map_err(|e| invalid(e.to_string()))?,
                None => LabelSelector::default(),
            }
        } else {
            let o = self.bounded("get", self.api.get(&self.target.name)).await?;
            self.remember(&o);
            match (
                o.data.pointer("/spec/selector"),
                o.data.pointer("/status/selector"),
            ) {
                (Some(v), _) if v.is_object() => {
                    LabelSelector::from_object(v).map_err(|e| invalid(e.to_string()))?
                }
                (_, Some(Value::String(text))) => {
                    LabelSelector::parse(text).map_err(|e| invalid(e.to_string()))?
                }
                _ => LabelSelector::default(),
            }
        };
        if selector.is_empty() {
            return Err(invalid(
                "no pod selector (neither the Scale's status.selector nor spec.selector)".into(),
            ));
        }
        Ok(selector)
    }

    /// Reads the object from the API server (not the watch) and returns
    /// what it says now.
    pub async fn refresh(&self) -> Result<ScaleState, TargetError> {
        // A Scale carries no ready count: read the object.
        let o = self.bounded("get", self.api.get(&self.target.name)).await?;
        self.remember(&o);
        self.known().ok_or_else(|| TargetError::Unavailable {
            target: self.target.to_string(),
            message: "state lock poisoned".into(),
        })
    }

    /// No watch reports the object ([`observe`](Self::observe) is never
    /// called): each decision reads it, so a change made by someone else
    /// is seen at the next tick rather than only at a conflict.
    pub fn unwatched(mut self) -> Self {
        self.watched = false;
        self
    }

    /// The selector of its pods.
    pub fn selector(&self) -> &LabelSelector {
        &self.selector
    }

    /// What the workload watcher saw of the object: its `spec.replicas`
    /// (unset is 1, as Kubernetes defaults it), readyReplicas and
    /// resourceVersion.
    pub fn observe(&self, replicas: Option<u32>, ready: u32, version: Option<String>) {
        if let Ok(mut k) = self.known.lock() {
            k.spec = Some(replicas.unwrap_or(1));
            k.object_ready = ready;
            k.version = version;
            k.stale = false;
        }
    }

    /// How many of its pods serve (what the algorithm counts as ready).
    pub fn set_ready(&self, ready: u32) {
        if let Ok(mut k) = self.known.lock() {
            k.ready = Some(ready);
        }
    }

    fn known(&self) -> Option<ScaleState> {
        let k = self.known.lock().ok()?;
        if k.stale {
            return None;
        }
        Some(ScaleState {
            spec: k.spec?,
            ready: k.ready.unwrap_or(k.object_ready),
        })
    }

    /// Whether writes go through `/scale` (else a merge patch of the spec).
    pub fn has_scale_subresource(&self) -> bool {
        self.has_scale
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, TargetError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| error(&self.target, what, e)),
            Err(_) => Err(TargetError::Unavailable {
                target: self.target.to_string(),
                message: format!("{what}: no answer within {:?}", self.timeout),
            }),
        }
    }

    fn remember(&self, o: &DynamicObject) {
        if let Ok(mut k) = self.known.lock() {
            k.spec = Some(count(&o.data, "/spec/replicas").unwrap_or(1));
            k.object_ready = count(&o.data, "/status/readyReplicas").unwrap_or(0);
            k.version = o.resource_version();
            k.stale = false;
        }
    }

    fn wrote(&self, replicas: u32, version: Option<String>) {
        if let Ok(mut k) = self.known.lock() {
            k.spec = Some(replicas);
            k.version = version;
        }
    }
}

fn count(v: &Value, pointer: &str) -> Option<u32> {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

impl ScaleTarget for KubeScaleTarget {
    fn target_ref(&self) -> &TargetRef {
        &self.target
    }

    fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>> {
        Box::pin(async move {
            match self.known().filter(|_| self.watched) {
                Some(s) => Ok(s),
                None => self.refresh().await,
            }
        })
    }

    fn set_replicas(&self, replicas: u32) -> BoxFuture<'_, Result<(), TargetError>> {
        Box::pin(async move {
            let version = self.known.lock().ok().and_then(|k| k.version.clone());
            let mut body = json!({"spec": {"replicas": replicas}});
            if let Some(v) = version {
                // A precondition: someone else's write in between is a 409.
                body["metadata"] = json!({"resourceVersion": v});
            }
            let params = PatchParams::default();
            let written = if self.has_scale {
                self.bounded(
                    "patch scale",
                    self.api
                        .patch_scale(&self.target.name, &params, &Patch::Merge(&body)),
                )
                .await
                .map(|scale| scale.metadata.resource_version)
            } else {
                self.bounded(
                    "patch",
                    self.api
                        .patch(&self.target.name, &params, &Patch::Merge(&body)),
                )
                .await
                .map(|o| o.resource_version())
            };
            match written {
                Ok(version) => {
                    self.wrote(replicas, version);
                    Ok(())
                }
                Err(e) => {
                    if let (TargetError::Conflict { .. }, Ok(mut k)) = (&e, self.known.lock()) {
                        k.stale = true;
                    }
                    Err(e)
                }
            }
        })
    }
}
