//! Scale targets: what the control loop reads replica counts from and sets
//! them on.
//!
//! A handler is registered per `(apiVersion, kind)`, as Kubernetes' scale
//! subresource is per resource; the local cluster of the demo registers its
//! own kind. Registering a pair twice is an error, never a silent override:
//! two handlers fighting over one workload would flap its replicas.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future: the loop ticks every few seconds, so one allocation per
/// call costs nothing and keeps the trait object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which workload: the Kubernetes coordinates of a scalable object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetRef {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {}/{}",
            self.api_version, self.kind, self.namespace, self.name
        )
    }
}

/// What the scale subresource says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScaleState {
    /// `spec.replicas`: what was asked for.
    pub spec: u32,
    /// `status.readyReplicas`: what serves.
    pub ready: u32,
}

/// Why reading or setting a scale failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    /// Someone else changed the object since it was read (HTTP 409): re-read
    /// and try again.
    #[error("{target}: conflict: {message}")]
    Conflict { target: String, message: String },
    /// The object is gone.
    #[error("{target}: not found")]
    NotFound { target: String },
    /// Anything else (network, API server down, permissions): back off and
    /// keep serving.
    #[error("{target}: {message}")]
    Unavailable { target: String, message: String },
    /// An API call failed; the client's error is kept whole as the source.
    #[error("{target}: {call}")]
    Api {
        target: String,
        call: &'static str,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl TargetError {
    /// The message and every source, for logs and Events.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }

    /// A closed set, for the `reason` label of
    /// `scalecar_scale_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            TargetError::Conflict { .. } => "conflict",
            TargetError::NotFound { .. } => "not_found",
            TargetError::Unavailable { .. } | TargetError::Api { .. } => "unavailable",
        }
    }
}

/// One scalable workload.
pub trait ScaleTarget: Send + Sync + fmt::Debug {
    /// Its coordinates, for logs, events and metrics.
    fn target_ref(&self) -> &TargetRef;
    /// Reads spec and ready replicas.
    fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>>;
    /// Sets `spec.replicas`.
    fn set_replicas(&self, replicas: u32) -> BoxFuture<'_, Result<(), TargetError>>;
}

/// Builds the handler of one workload of a registered `(apiVersion, kind)`.
pub type TargetFactory =
    Arc<dyn Fn(&TargetRef) -> Result<Arc<dyn ScaleTarget>, TargetError> + Send + Sync>;

/// Why a registration or a lookup failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetRegistryError {
    #[error("a scale target handler for {api_version} {kind} is already registered")]
    Duplicate { api_version: String, kind: String },
    #[error("no scale target handler for {api_version} {kind} (registered: {known})")]
    Unknown {
        api_version: String,
        kind: String,
        known: String,
    },
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// Scale target handlers by `(apiVersion, kind)`.
#[derive(Default, Clone)]
pub struct TargetRegistry {
    handlers: BTreeMap<(String, String), TargetFactory>,
}

impl fmt::Debug for TargetRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl TargetRegistry {
    /// Registers the handler for `(api_version, kind)`; a second
    /// registration of the same pair is an error.
    pub fn register(
        &mut self,
        api_version: &str,
        kind: &str,
        factory: TargetFactory,
    ) -> Result<(), TargetRegistryError> {
        let key = (api_version.to_string(), kind.to_string());
        if self.handlers.contains_key(&key) {
            return Err(TargetRegistryError::Duplicate {
                api_version: key.0,
                kind: key.1,
            });
        }
        self.handlers.insert(key, factory);
        Ok(())
    }

    /// The handler of one workload.
    pub fn resolve(&self, target: &TargetRef) -> Result<Arc<dyn ScaleTarget>, TargetRegistryError> {
        let key = (target.api_version.clone(), target.kind.clone());
        let Some(factory) = self.handlers.get(&key) else {
            let known: Vec<String> = self
                .handlers
                .keys()
                .map(|(a, k)| format!("{a} {k}"))
                .collect();
            return Err(TargetRegistryError::Unknown {
                api_version: key.0,
                kind: key.1,
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        };
        Ok(factory(target)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug)]
    struct Fixed {
        target: TargetRef,
        state: Mutex<ScaleState>,
    }

    impl ScaleTarget for Fixed {
        fn target_ref(&self) -> &TargetRef {
            &self.target
        }
        fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>> {
            let s = *self.state.lock().unwrap();
            Box::pin(async move { Ok(s) })
        }
        fn set_replicas(&self, replicas: u32) -> BoxFuture<'_, Result<(), TargetError>> {
            self.state.lock().unwrap().spec = replicas;
            Box::pin(async { Ok(()) })
        }
    }

    fn deployment(name: &str) -> TargetRef {
        TargetRef {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn factory() -> TargetFactory {
        Arc::new(|t: &TargetRef| {
            Ok(Arc::new(Fixed {
                target: t.clone(),
                state: Mutex::new(ScaleState { spec: 1, ready: 1 }),
            }) as Arc<dyn ScaleTarget>)
        })
    }

    #[test]
    fn registering_a_pair_twice_is_an_error() {
        let mut reg = TargetRegistry::default();
        reg.register("apps/v1", "Deployment", factory()).unwrap();
        reg.register("apps/v1", "StatefulSet", factory()).unwrap();
        let err = reg
            .register("apps/v1", "Deployment", factory())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a scale target handler for apps/v1 Deployment is already registered"
        );
    }

    #[test]
    fn resolve_dispatches_by_api_version_and_kind() {
        let mut reg = TargetRegistry::default();
        reg.register("apps/v1", "Deployment", factory()).unwrap();
        let t = reg.resolve(&deployment("llama")).unwrap();
        assert_eq!(t.target_ref().name, "llama");
        let mut other = deployment("x");
        other.kind = "ReplicaSet".into();
        let err = reg.resolve(&other).unwrap_err().to_string();
        assert!(
            err.contains("no scale target handler for apps/v1 ReplicaSet"),
            "{err}"
        );
        assert!(err.contains("registered: apps/v1 Deployment"), "{err}");
    }

    #[tokio::test]
    async fn a_target_reads_and_sets() {
        let mut reg = TargetRegistry::default();
        reg.register("apps/v1", "Deployment", factory()).unwrap();
        let t = reg.resolve(&deployment("llama")).unwrap();
        t.set_replicas(4).await.unwrap();
        assert_eq!(t.scale().await.unwrap(), ScaleState { spec: 4, ready: 1 });
    }
}
