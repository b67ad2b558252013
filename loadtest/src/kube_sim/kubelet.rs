//! What a kubelet checks before it starts a Pod's containers, where
//! installs fail: every ConfigMap and Secret the Pod names — in `env`
//! (`configMapKeyRef`, `secretKeyRef`), `envFrom` and `volumes` — exists
//! and has the keys asked for, unless the reference is `optional`. A
//! missing one keeps the Pod from starting, as a kubelet reports it:
//! env and envFrom → the container waits in `CreateContainerConfigError`
//! (Event `Failed`, "Error: secret "x" not found"); a volume → it stays
//! `ContainerCreating` (Event `FailedMount`). The kubelet retries, so a Pod
//! starts once what it lacks is created.

use serde_json::Value;

use super::resources::{Storage, of_storage};
use super::store::Store;

/// Why a Pod's containers cannot start yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The container's waiting reason.
    pub waiting: &'static str,
    /// The Event's reason.
    pub event: &'static str,
    /// The Event's note and the waiting message.
    pub message: String,
}

#[derive(Clone, Copy)]
enum Source {
    ConfigMap,
    Secret,
}

impl Source {
    fn storage(self) -> Storage {
        match self {
            Source::ConfigMap => Storage::ConfigMaps,
            Source::Secret => Storage::Secrets,
        }
    }

    /// As the kubelet names them in messages.
    fn lower(self) -> &'static str {
        match self {
            Source::ConfigMap => "configmap",
            Source::Secret => "secret",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Source::ConfigMap => "ConfigMap",
            Source::Secret => "Secret",
        }
    }
}

fn optional(reference: &Value) -> bool {
    reference.get("optional").and_then(Value::as_bool) == Some(true)
}

fn has_key(object: &Value, key: &str) -> bool {
    ["data", "stringData", "binaryData"]
        .iter()
        .any(|field| object.get(*field).and_then(|d| d.get(key)).is_some())
}

/// The first thing `pod` (in `ns`) names that `store` lacks.
pub fn missing(store: &Store, ns: &str, pod: &Value) -> Option<Blocked> {
    let lookup =
        |source: Source, name: &str| store.get(of_storage(source.storage()), ns, name).ok();
    let not_found = |source: Source, name: &str| format!("{} \"{name}\" not found", source.lower());
    let containers = ["/spec/initContainers", "/spec/containers"]
        .iter()
        .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
        .flatten();
    for c in containers {
        for env in c.get("env").and_then(Value::as_array).into_iter().flatten() {
            let Some(from) = env.get("valueFrom") else {
                continue;
            };
            for (field, source) in [
                ("configMapKeyRef", Source::ConfigMap),
                ("secretKeyRef", Source::Secret),
            ] {
                let Some(r) = from.get(field) else { continue };
                if optional(r) {
                    continue;
                }
                let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
                let key = r.get("key").and_then(Value::as_str).unwrap_or_default();
                let message = match lookup(source, name) {
                    None => not_found(source, name),
                    Some(o) if !has_key(&o, key) => {
                        format!("couldn't find key {key} in {} {ns}/{name}", source.kind())
                    }
                    Some(_) => continue,
                };
                return Some(config_error(message));
            }
        }
        for from in c
            .get("envFrom")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for (field, source) in [
                ("configMapRef", Source::ConfigMap),
                ("secretRef", Source::Secret),
            ] {
                let Some(r) = from.get(field) else { continue };
                let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
                if !optional(r) && lookup(source, name).is_none() {
                    return Some(config_error(not_found(source, name)));
                }
            }
        }
    }
    for volume in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let volume_name = volume
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        for (field, name_field, source) in [
            ("configMap", "name", Source::ConfigMap),
            ("secret", "secretName", Source::Secret),
        ] {
            let Some(r) = volume.get(field) else { continue };
            if optional(r) {
                continue;
            }
            let name = r
                .get(name_field)
                .and_then(Value::as_str)
                .unwrap_or_default();
            let problem = match lookup(source, name) {
                None => Some(not_found(source, name)),
                Some(o) => r
                    .get("items")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.get("key").and_then(Value::as_str))
                    .find(|k| !has_key(&o, k))
                    .map(|k| format!("configmap references non-existent config key: {k}")),
            };
            if let Some(p) = problem {
                return Some(Blocked {
                    waiting: "ContainerCreating",
                    event: "FailedMount",
                    message: format!("MountVolume.SetUp failed for volume \"{volume_name}\" : {p}"),
                });
            }
        }
    }
    None
}

fn config_error(message: String) -> Blocked {
    Blocked {
        waiting: "CreateContainerConfigError",
        event: "Failed",
        message: format!("Error: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec})
    }

    #[test]
    fn references_resolve_or_name_what_is_missing_as_a_kubelet_does() {
        let store = Store::new(16);
        let env = pod(json!({"containers": [{"name": "c", "env": [
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}}
        ]}]}));
        let b = missing(&store, "default", &env).unwrap();
        assert_eq!(b.waiting, "CreateContainerConfigError");
        assert_eq!(b.event, "Failed");
        assert_eq!(b.message, "Error: secret \"tok\" not found");
        store
            .create(
                of_storage(Storage::Secrets),
                "default",
                json!({"metadata": {"name": "tok"}, "data": {"other": "eA=="}}),
            )
            .unwrap();
        assert_eq!(
            missing(&store, "default", &env).unwrap().message,
            "Error: couldn't find key token in Secret default/tok"
        );
        store
            .create(
                of_storage(Storage::Secrets),
                "default",
                json!({"metadata": {"name": "tok2"}, "stringData": {"token": "x"}}),
            )
            .unwrap();
        let env2 = pod(json!({"containers": [{"name": "c", "env": [
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": "tok2", "key": "token"}}},
            {"name": "O", "valueFrom": {"configMapKeyRef": {"name": "none", "key": "k", "optional": true}}}
        ]}]}));
        assert_eq!(missing(&store, "default", &env2), None);

        let vol = pod(json!({"containers": [{"name": "c"}],
                             "volumes": [{"name": "config", "configMap": {"name": "cfg"}}]}));
        let b = missing(&store, "default", &vol).unwrap();
        assert_eq!((b.waiting, b.event), ("ContainerCreating", "FailedMount"));
        assert_eq!(
            b.message,
            "MountVolume.SetUp failed for volume \"config\" : configmap \"cfg\" not found"
        );
        let from = pod(
            json!({"containers": [{"name": "c", "envFrom": [{"configMapRef": {"name": "cfg"}}]}]}),
        );
        assert_eq!(
            missing(&store, "default", &from).unwrap().message,
            "Error: configmap \"cfg\" not found"
        );
        store
            .create(
                of_storage(Storage::ConfigMaps),
                "default",
                json!({"metadata": {"name": "cfg"}, "data": {"a": "1"}}),
            )
            .unwrap();
        assert_eq!(missing(&store, "default", &vol), None);
        assert_eq!(missing(&store, "default", &from), None);
        // Another namespace's objects are not this Pod's.
        assert!(missing(&store, "kube-system", &vol).is_some());
    }
}
