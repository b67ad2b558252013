//! One generic [`ScaleTarget`] for any kind: through its `/scale`
//! subresource when discovery says it has one (Deployments, StatefulSets,
//! ReplicaSets, LeaderWorkerSets, custom resources that declare it), and by
//! a merge patch of `spec.replicas` when it has none.
//!
//! Reads take `spec.replicas` and `status.readyReplicas` from the object
//! itself (a Scale carries no ready count). Writes carry the
//! resourceVersion of the last read, so a change made in between is a 409
//! Conflict for the control loop to re-read and re-decide, never a silent
//! overwrite. Every call is bounded by a timeout: kube-rs retries some
//! answers (503) on its own, and the loop must not stall on one target.

use std::sync::Mutex;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, Scope, oneshot};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::target::{BoxFuture, ScaleState, ScaleTarget, TargetError, TargetRef};

/// A scalable object in a cluster.
#[derive(Debug)]
pub struct KubeScaleTarget {
    target: TargetRef,
    api: Api<DynamicObject>,
    has_scale: bool,
    timeout: Duration,
    /// resourceVersion of the last read, sent with the next write.
    last_version: Mutex<Option<String>>,
}

fn error(target: &TargetRef, e: kube::Error) -> TargetError {
    let target = target.to_string();
    match e {
        kube::Error::Api(s) if s.code == 409 => TargetError::Conflict {
            target,
            message: s.message,
        },
        kube::Error::Api(s) if s.code == 404 => TargetError::NotFound { target },
        other => TargetError::Unavailable {
            target,
            message: other.to_string(),
        },
    }
}

impl KubeScaleTarget {
    /// Finds `target`'s resource through discovery (its plural, scope and
    /// whether it has `/scale`).
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
        Ok(KubeScaleTarget {
            target,
            api,
            has_scale,
            timeout,
            last_version: Mutex::new(None),
        })
    }

    /// Whether writes go through `/scale` (else a merge patch of the spec).
    pub fn has_scale_subresource(&self) -> bool {
        self.has_scale
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, TargetError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| error(&self.target, e)),
            Err(_) => Err(TargetError::Unavailable {
                target: self.target.to_string(),
                message: format!("{what}: no answer within {:?}", self.timeout),
            }),
        }
    }

    fn remember(&self, version: Option<String>) {
        if let Ok(mut v) = self.last_version.lock() {
            *v = version;
        }
    }
}

fn count(v: &Value, pointer: &str) -> u32 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

impl ScaleTarget for KubeScaleTarget {
    fn target_ref(&self) -> &TargetRef {
        &self.target
    }

    fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>> {
        Box::pin(async move {
            let o = self.bounded("get", self.api.get(&self.target.name)).await?;
            self.remember(o.resource_version());
            // A Scale carries no ready count: read it from the object.
            let spec = count(&o.data, "/spec/replicas");
            let ready = if o.data.pointer("/status/readyReplicas").is_some() {
                count(&o.data, "/status/readyReplicas")
            } else {
                0
            };
            Ok(ScaleState { spec, ready })
        })
    }

    fn set_replicas(&self, replicas: u32) -> BoxFuture<'_, Result<(), TargetError>> {
        Box::pin(async move {
            let version = self.last_version.lock().ok().and_then(|v| v.clone());
            let mut body = json!({"spec": {"replicas": replicas}});
            if let Some(v) = version {
                // A precondition: someone else's write in between is a 409.
                body["metadata"] = json!({"resourceVersion": v});
            }
            let params = PatchParams::default();
            if self.has_scale {
                self.bounded(
                    "patch scale",
                    self.api
                        .patch_scale(&self.target.name, &params, &Patch::Merge(&body)),
                )
                .await?;
            } else {
                self.bounded(
                    "patch",
                    self.api
                        .patch(&self.target.name, &params, &Patch::Merge(&body)),
                )
                .await?;
            }
            Ok(())
        })
    }
}
