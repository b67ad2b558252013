//! Memory between leaders (see [`crate::memory`]) in a ConfigMap beside the
//! Lease, under one key. A ConfigMap rather than the Lease itself: every
//! Lease write carries the resourceVersion it read, and the leader's
//! renewals would then race its own memory writes. The leader is the only
//! writer (a replica past its renew deadline does not save), so a merge
//! patch of the one key is enough; the first save creates the object.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::memory::{MemoryError, MemoryStore};
use crate::target::BoxFuture;

/// The key the document is kept under.
pub const MEMORY_KEY: &str = "memory.json";

/// A ConfigMap that keeps the leader's memory.
#[derive(Debug, Clone)]
pub struct ConfigMapMemory {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    /// Bound on each call.
    timeout: Duration,
}

impl ConfigMapMemory {
    pub fn new(client: Client, namespace: &str, name: &str, timeout: Duration) -> Self {
        ConfigMapMemory {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            timeout,
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> MemoryError {
        MemoryError::Store {
            place: self.place(),
            message: format!("{what}: {e}"),
        }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, MemoryError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| self.failed(what, format!("no answer within {:?}", self.timeout)))
    }

    async fn write(&self, document: String) -> Result<(), MemoryError> {
        let patch = Patch::Merge(serde_json::json!({ "data": { MEMORY_KEY: &document } }));
        let params = PatchParams::default();
        match self
            .bounded("patch", self.api.patch(&self.name, &params, &patch))
            .await?
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(self.failed("patch", e)),
        }
        let object = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "scalecar".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(MEMORY_KEY.to_string(), document.clone())])),
            ..ConfigMap::default()
        };
        match self
            .bounded("create", self.api.create(&PostParams::default(), &object))
            .await?
        {
            Ok(_) => Ok(()),
            // Created meanwhile (by a predecessor's last save): patch it.
            Err(kube::Error::Api(s)) if s.code == 409 => self
                .bounded("patch", self.api.patch(&self.name, &params, &patch))
                .await?
                .map(|_| ())
                .map_err(|e| self.failed("patch", e)),
            Err(e) => Err(self.failed("create", e)),
        }
    }
}

impl MemoryStore for ConfigMapMemory {
    fn place(&self) -> String {
        format!("configmap {}/{}", self.namespace, self.name)
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<String>, MemoryError>> {
        Box::pin(async move {
            let found = self
                .bounded("get", self.api.get_opt(&self.name))
                .await?
                .map_err(|e| self.failed("get", e))?;
            Ok(found
                .and_then(|c| c.data)
                .and_then(|mut d| d.remove(MEMORY_KEY)))
        })
    }

    fn save(&self, document: String) -> BoxFuture<'_, Result<(), MemoryError>> {
        Box::pin(self.write(document))
    }
}
