//! The object store: every object as JSON under one cluster-wide,
//! monotonically increasing resourceVersion, with the change log that
//! watches resume from.
//!
//! One mutex guards objects, the version counter and the log, and every
//! change is broadcast while it is held, so a watcher that replays the log
//! and then follows the broadcast sees each change once, in order. The log
//! is bounded: a watch from a version older than what it keeps gets 410
//! Gone, as from a compacted etcd.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::resources::{ResourceType, Storage, of_storage};
use super::selector::{FieldSelector, LabelSelector};
use super::time::now_rfc3339;

/// An API error, answered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        let what = if rt.group.is_empty() {
            rt.plural.to_string()
        } else {
            format!("{}.{}", rt.plural, rt.group)
        };
        ApiError::new(404, "NotFound", format!("{what} \"{name}\" not found"))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(422, "Invalid", message)
    }

    /// The `Status` body.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub storage: Storage,
    pub namespace: String,
    pub kind: ChangeKind,
    pub object: Value,
}

/// Which objects a list or watch wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, namespace: &str, object: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }
}

/// A page of a list.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Value>,
    pub rv: u64,
    /// Where the next page starts, if there is one.
    pub cont: Option<String>,
    pub remaining: Option<u64>,
}

/// The start of a watch: what to send first, then the live changes.
#[derive(Debug)]
pub struct WatchStart {
    pub backlog: Vec<Arc<Change>>,
    pub live: broadcast::Receiver<Arc<Change>>,
}

/// Which part of an object a write replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Everything but `status` (for types with a status subresource).
    Main,
    /// Only `status`.
    Status,
}

type Key = (Storage, String, String);

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Arc<Change>>,
    /// Watches from versions below this get 410 Gone.
    oldest: u64,
    uids: u64,
}

/// The store. Cheap to share (`Arc`).
pub struct Store {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Arc<Change>>,
    log_capacity: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Store")
            .field("rv", &inner.rv)
            .field("objects", &inner.objects.len())
            .finish()
    }
}

fn meta_str<'a>(o: &'a Value, field: &str) -> Option<&'a str> {
    o.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn set_meta(o: &mut Value, field: &str, v: Value) {
    if !o.get("metadata").is_some_and(Value::is_object)
        && let Some(obj) = o.as_object_mut()
    {
        obj.insert("metadata".into(), json!({}));
    }
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(field.into(), v);
    }
}

/// A random suffix of `n` lowercase letters and digits.
pub fn suffix(n: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric)
        && name
            .as_bytes()
            .last()
            .is_some_and(u8::is_ascii_alphanumeric)
}

impl Store {
    /// A store with `default` and `kube-system` namespaces, keeping the last
    /// `log_capacity` changes for watches to resume from.
    pub fn new(log_capacity: usize) -> Arc<Store> {
        let (changes, _) = broadcast::channel(log_capacity.clamp(1024, 1 << 16));
        let store = Arc::new(Store {
            inner: Mutex::new(Inner {
                rv: 0,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                oldest: 0,
                uids: 0,
            }),
            changes,
            log_capacity: log_capacity.max(1),
        });
        // The custom kinds, as the CustomResourceDefinitions a real cluster
        // would have for them (`kubectl get crd` lists them).
        let crds = of_storage(Storage::CustomResourceDefinitions);
        for (kind, plural, short, scale) in [
            ("ModelServer", "modelservers", "ms", true),
            ("ModelBackend", "modelbackends", "mb", false),
        ] {
            let mut subresources = json!({"status": {}});
            if scale {
                subresources["scale"] = json!({"specReplicasPath": ".spec.replicas",
                    "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.selector"});
            }
            let group = super::resources::CUSTOM_GROUP;
            let _ = store.create(
                crds,
                "",
                json!({"metadata": {"name": format!("{plural}.{group}")},
                       "spec": {"group": group, "scope": "Namespaced",
                                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                                          "shortNames": [short], "listKind": format!("{kind}List")},
                                "versions": [{"name": "v1", "served": true, "storage": true,
                                              "subresources": subresources,
                                              "schema": {"openAPIV3Schema": {"type": "object",
                                                  "x-kubernetes-preserve-unknown-fields": true}}}]}}),
            );
        }
        let ns = of_storage(Storage::Namespaces);
        for name in ["default", "kube-system", "kube-public"] {
            let _ = store.create(
                ns,
                "",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                       "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
            );
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Writers never leave the maps half-changed across a panic point.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// How many objects are held.
    pub fn len(&self) -> usize {
        self.lock().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn record(&self, inner: &mut Inner, change: Change) {
        let change = Arc::new(change);
        inner.log.push_back(change.clone());
        while inner.log.len() > self.log_capacity {
            if let Some(old) = inner.log.pop_front() {
                inner.oldest = old.rv;
            }
        }
        // No receiver is fine: nobody watches.
        let _ = self.changes.send(change);
    }

    fn key(rt: &ResourceType, namespace: &str, name: &str) -> Key {
        let ns = if rt.namespaced { namespace } else { "" };
        (rt.storage, ns.to_string(), name.to_string())
    }

    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&Self::key(rt, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Objects of a storage matching `filter`, by namespace and name, a page
    /// of at most `limit` after `cont`.
    pub fn list(
        &self,
        storage: Storage,
        filter: &Filter,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> Result<Page, ApiError> {
        let after: Option<(String, String)> = match cont {
            Some(c) if !c.is_empty() => {
                let (ns, name) = c.split_once('/').ok_or_else(|| {
                    ApiError::bad_request(format!("continue token {c:?} is not valid"))
                })?;
                Some((ns.to_string(), name.to_string()))
            }
            _ => None,
        };
        let inner = self.lock();
        let mut items = Vec::new();
        let mut cont = None;
        let mut remaining = 0u64;
        let range = inner
            .objects
            .range((storage, String::new(), String::new())..)
            .take_while(|((s, _, _), _)| *s == storage)
            .filter(|((_, ns, name), _)| {
                after
                    .as_ref()
                    .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
            });
        for ((_, ns, name), o) in range {
            if !filter.matches(ns, o) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                if cont.is_none() {
                    cont = Some(format!("{ns}/{name}"));
                }
                remaining += 1;
                continue;
            }
            items.push(o.clone());
        }
        // A continue token names the last item returned.
        let cont = cont.and(items.last().map(|o| {
            format!(
                "{}/{}",
                meta_str(o, "namespace").unwrap_or(""),
                meta_str(o, "name").unwrap_or("")
            )
        }));
        Ok(Page {
            items,
            rv: inner.rv,
            remaining: cont.as_ref().map(|_| remaining),
            cont,
        })
    }

    /// Creates an object (name or generateName; namespace must exist).
    pub fn create(
        &self,
        rt: &ResourceType,
        namespace: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        let mut inner = self.lock();
        if rt.namespaced
            && !inner.objects.contains_key(&(
                Storage::Namespaces,
                String::new(),
                namespace.to_string(),
            ))
        {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
            ));
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(g)) if !g.is_empty() => format!("{g}{}", suffix(5)),
            _ => {
                return Err(ApiError::invalid(format!(
                    "{} must have metadata.name or metadata.generateName",
                    rt.kind
                )));
            }
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(format!(
                "{} \"{name}\" is invalid: metadata.name: must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                rt.kind
            )));
        }
        let key = Self::key(rt, namespace, &name);
        if inner.objects.contains_key(&key) {
            let what = if rt.group.is_empty() {
                rt.plural.to_string()
            } else {
                format!("{}.{}", rt.plural, rt.group)
            };
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{what} \"{name}\" already exists"),
            ));
        }
        inner.rv += 1;
        inner.uids += 1;
        let rv = inner.rv;
        let uid = format!("00000000-0000-4000-8000-{:012x}", inner.uids);
        let now = now_rfc3339();
        if let Some(o) = obj.as_object_mut() {
            o.insert("apiVersion".into(), json!(rt.api_version()));
            o.insert("kind".into(), json!(rt.kind));
        }
        set_meta(&mut obj, "name", json!(name));
        if rt.namespaced {
            set_meta(&mut obj, "namespace", json!(namespace));
        } else if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("namespace");
        }
        set_meta(&mut obj, "uid", json!(uid));
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        set_meta(&mut obj, "creationTimestamp", json!(now));
        if obj.get("spec").is_some() {
            set_meta(&mut obj, "generation", json!(1));
        }
        if obj.pointer("/metadata/managedFields").is_none() {
            set_meta(
                &mut obj,
                "managedFields",
                json!([{"manager": "kube-sim", "operation": "Update", "apiVersion": rt.api_version(),
                        "time": now, "fieldsType": "FieldsV1", "fieldsV1": {}}]),
            );
        }
        inner.objects.insert(key.clone(), obj.clone());
        self.record(
            &mut inner,
            Change {
                rv,
                storage: rt.storage,
                namespace: key.1,
                kind: ChangeKind::Added,
                object: obj.clone(),
            },
        );
        Ok(obj)
    }

    /// Read, change with `f`, write back: the one path of every update,
    /// patch and controller write. `f` sees the current object; a
    /// resourceVersion it leaves that differs from the current one is a
    /// 409 Conflict (optimistic concurrency). `part` keeps the other part.
    pub fn modify(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        part: Part,
        f: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = Self::key(rt, namespace, name);
        let current = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let mut next = current.clone();
        f(&mut next)?;
        if !next.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        let current_rv = meta_str(&current, "resourceVersion").unwrap_or("");
        match meta_str(&next, "resourceVersion") {
            Some(rv) if !rv.is_empty() && rv != current_rv => {
                let what = if rt.group.is_empty() {
                    rt.plural.to_string()
                } else {
                    format!("{}.{}", rt.plural, rt.group)
                };
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {what} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                ));
            }
            _ => {}
        }
        if meta_str(&next, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&next, "name").unwrap_or("")
            )));
        }
        // What the write may not change.
        if let (Some(n), Some(c)) = (next.as_object_mut(), current.as_object()) {
            n.insert("apiVersion".into(), json!(rt.api_version()));
            n.insert("kind".into(), json!(rt.kind));
            for (field, keep) in [
                ("status", part == Part::Main && rt.status),
                ("spec", part == Part::Status),
            ] {
                if keep {
                    match c.get(field) {
                        Some(v) => n.insert(field.into(), v.clone()),
                        None => n.remove(field),
                    };
                }
            }
            if part == Part::Status
                && let (Some(nm), Some(cm)) = (n.get_mut("metadata"), c.get("metadata"))
            {
                *nm = cm.clone();
            }
        }
        for field in [
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "deletionTimestamp",
            "generation",
        ] {
            match current.get("metadata").and_then(|m| m.get(field)) {
                Some(v) => set_meta(&mut next, field, v.clone()),
                None => {
                    if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove(field);
                    }
                }
            }
        }
        if current.get("spec") != next.get("spec") && next.get("spec").is_some() {
            let g = current
                .pointer("/metadata/generation")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            set_meta(&mut next, "generation", json!(g + 1));
        }
        // Nothing changed: no new version, no event (as the real server).
        let mut unchanged = next.clone();
        set_meta(&mut unchanged, "resourceVersion", json!(current_rv));
        if unchanged == current {
            return Ok(current);
        }
        inner.rv += 1;
        let rv = inner.rv;
        set_meta(&mut next, "resourceVersion", json!(rv.to_string()));
        inner.objects.insert(key.clone(), next.clone());
        self.record(
            &mut inner,
            Change {
                rv,
                storage: rt.storage,
                namespace: key.1,
                kind: ChangeKind::Modified,
                object: next.clone(),
            },
        );
        Ok(next)
    }

    /// Deletes an object now, or (`graceful`) marks it terminating for the
    /// controller to finish: deletionTimestamp set, the object stays.
    pub fn delete(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        graceful: Option<u64>,
    ) -> Result<Value, ApiError> {
        if let Some(grace) = graceful {
            let mut inner = self.lock();
            let key = Self::key(rt, namespace, name);
            let mut obj = inner
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(rt, name))?;
            if obj.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(obj);
            }
            inner.rv += 1;
            let rv = inner.rv;
            set_meta(&mut obj, "deletionTimestamp", json!(now_rfc3339()));
            set_meta(&mut obj, "deletionGracePeriodSeconds", json!(grace));
            set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
            inner.objects.insert(key.clone(), obj.clone());
            self.record(
                &mut inner,
                Change {
                    rv,
                    storage: rt.storage,
                    namespace: key.1,
                    kind: ChangeKind::Modified,
                    object: obj.clone(),
                },
            );
            return Ok(obj);
        }
        let mut inner = self.lock();
        let key = Self::key(rt, namespace, name);
        let mut obj = inner
            .objects
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        inner.rv += 1;
        let rv = inner.rv;
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        self.record(
            &mut inner,
            Change {
                rv,
                storage: rt.storage,
                namespace: key.1,
                kind: ChangeKind::Deleted,
                object: obj.clone(),
            },
        );
        Ok(obj)
    }

    /// Starts a watch of `storage` from `from` (`None`: the current state
    /// as ADDED events, then what follows). A version older than the log
    /// keeps is 410 Gone.
    pub fn watch(
        &self,
        storage: Storage,
        filter: &Filter,
        from: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let inner = self.lock();
        let live = self.changes.subscribe();
        let backlog = match from {
            None => inner
                .objects
                .range((storage, String::new(), String::new())..)
                .take_while(|((s, _, _), _)| *s == storage)
                .filter(|((_, ns, _), o)| filter.matches(ns, o))
                .map(|((s, ns, _), o)| {
                    Arc::new(Change {
                        rv: meta_str(o, "resourceVersion")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                        storage: *s,
                        namespace: ns.clone(),
                        kind: ChangeKind::Added,
                        object: o.clone(),
                    })
                })
                .collect(),
            Some(rv) => {
                if rv < inner.oldest {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", inner.oldest + 1),
                    ));
                }
                inner
                    .log
                    .iter()
                    .filter(|c| {
                        c.rv > rv && c.storage == storage && filter.matches(&c.namespace, &c.object)
                    })
                    .cloned()
                    .collect()
            }
        };
        Ok(WatchStart { backlog, live })
    }

    /// Every object of a storage (for controllers).
    pub fn all(&self, storage: Storage) -> Vec<Value> {
        self.lock()
            .objects
            .range((storage, String::new(), String::new())..)
            .take_while(|((s, _, _), _)| *s == storage)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Changes broadcast from now on (for controllers).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_sim::resources::find;

    fn deploy(name: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": {"replicas": 1}})
    }

    #[test]
    fn versions_conflicts_and_generations() {
        let s = Store::new(100);
        let rt = find("apps", "v1", "deployments").unwrap();
        let a = s.create(rt, "default", deploy("a")).unwrap();
        assert_eq!(a["metadata"]["generation"], 1);
        assert_eq!(
            s.create(rt, "default", deploy("a")).unwrap_err().reason,
            "AlreadyExists"
        );
        assert_eq!(s.create(rt, "nowhere", deploy("b")).unwrap_err().code, 404);
        let rv = a["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let b = s
            .modify(rt, "default", "a", Part::Main, |o| {
                o["spec"]["replicas"] = json!(3);
                Ok(())
            })
            .unwrap();
        assert_eq!(b["metadata"]["generation"], 2);
        assert_ne!(b["metadata"]["resourceVersion"], rv.as_str());
        // A write carrying the old version is a conflict.
        let e = s
            .modify(rt, "default", "a", Part::Main, |o| {
                o["metadata"]["resourceVersion"] = json!(rv);
                o["spec"]["replicas"] = json!(5);
                Ok(())
            })
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        // A status write changes status only and not the generation.
        let c = s
            .modify(rt, "default", "a", Part::Status, |o| {
                o["status"] = json!({"replicas": 3});
                o["spec"]["replicas"] = json!(9);
                Ok(())
            })
            .unwrap();
        assert_eq!(
            (
                c["spec"]["replicas"].clone(),
                c["status"]["replicas"].clone()
            ),
            (json!(3), json!(3))
        );
        assert_eq!(c["metadata"]["generation"], 2);
    }

    #[test]
    fn lists_page_and_filter() {
        let s = Store::new(100);
        let rt = find("apps", "v1", "deployments").unwrap();
        for n in ["a", "b", "c", "d", "e"] {
            s.create(rt, "default", deploy(n)).unwrap();
        }
        let f = Filter::default();
        let p1 = s.list(rt.storage, &f, Some(2), None).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.remaining, Some(3));
        let p2 = s.list(rt.storage, &f, Some(2), p1.cont.as_deref()).unwrap();
        let p3 = s.list(rt.storage, &f, Some(2), p2.cont.as_deref()).unwrap();
        assert_eq!(p3.items.len(), 1);
        assert!(p3.cont.is_none());
        let names: Vec<_> = [p1, p2, p3]
            .iter()
            .flat_map(|p| p.items.iter().map(|o| o["metadata"]["name"].clone()))
            .collect();
        assert_eq!(names, vec!["a", "b", "c", "d", "e"]);
        let f = Filter {
            labels: LabelSelector::parse("app in (b,d)").unwrap(),
            ..Filter::default()
        };
        assert_eq!(s.list(rt.storage, &f, None, None).unwrap().items.len(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Create(u8),
        Update(u8, u8),
        Delete(u8),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..6).prop_map(Op::Create),
            (0u8..6, any::<u8>()).prop_map(|(n, v)| Op::Update(n, v)),
            (0u8..6).prop_map(Op::Delete),
        ]
    }

    proptest::proptest! {
        /// Any interleaving of creates, updates and deletes: a watch from
        /// the start (or from any version on the way), replayed, equals the
        /// final list — nothing lost, nothing reordered.
        #[test]
        fn replayed_watches_equal_the_final_list(ops in proptest::collection::vec(op(), 1..80), cut in 0usize..80) {
            let s = Store::new(1000);
            let rt = find("", "v1", "configmaps").unwrap();
            let mut from_start = s.watch(rt.storage, &Filter::default(), None).unwrap();
            let mut mid: Option<(BTreeMap<String, Value>, WatchStart)> = None;
            for (i, op) in ops.iter().enumerate() {
                if i == cut {
                    // A second watcher joins half way: list, then watch from the list's version.
                    let page = s.list(rt.storage, &Filter::default(), None, None).unwrap();
                    let seen = page.items.iter().map(|o| (o["metadata"]["name"].as_str().unwrap().to_string(), o.clone())).collect();
                    mid = Some((seen, s.watch(rt.storage, &Filter::default(), Some(page.rv)).unwrap()));
                }
                let name = |n: &u8| format!("c{n}");
                let _ = match op {
                    Op::Create(n) => s.create(rt, "default", json!({"metadata": {"name": name(n)}, "data": {"v": "0"}})).map(|_| ()),
                    Op::Update(n, v) => s.modify(rt, "default", &name(n), Part::Main, |o| { o["data"]["v"] = json!(v.to_string()); Ok(()) }).map(|_| ()),
                    Op::Delete(n) => s.delete(rt, "default", &name(n), None).map(|_| ()),
                };
            }
            // As the API's watch does: the backlog, then live changes past it.
            let replay = |mut seen: BTreeMap<String, Value>, w: &mut WatchStart| {
                let mut apply = |c: &Change| {
                    let name = c.object["metadata"]["name"].as_str().unwrap().to_string();
                    match c.kind {
                        ChangeKind::Deleted => { seen.remove(&name); }
                        _ => { seen.insert(name, c.object.clone()); }
                    }
                };
                let mut last = 0u64;
                for c in std::mem::take(&mut w.backlog) {
                    last = last.max(c.rv);
                    apply(&c);
                }
                while let Ok(c) = w.live.try_recv() {
                    if c.storage == Storage::ConfigMaps && c.rv > last {
                        last = c.rv;
                        apply(&c);
                    }
                }
                seen
            };
            let want: BTreeMap<String, Value> = s
                .list(rt.storage, &Filter::default(), None, None)
                .unwrap()
                .items
                .into_iter()
                .map(|o| (o["metadata"]["name"].as_str().unwrap().to_string(), o))
                .collect();
            proptest::prop_assert_eq!(&replay(BTreeMap::new(), &mut from_start), &want);
            if let Some((seen, mut w)) = mid {
                proptest::prop_assert_eq!(&replay(seen, &mut w), &want);
            }
        }
    }

    #[test]
    fn watches_resume_and_old_versions_are_gone() {
        let s = Store::new(4);
        let rt = find("", "v1", "configmaps").unwrap();
        let start = s.resource_version();
        for i in 0..3 {
            s.create(
                rt,
                "default",
                json!({"metadata": {"name": format!("c{i}")}}),
            )
            .unwrap();
        }
        let w = s
            .watch(rt.storage, &Filter::default(), Some(start))
            .unwrap();
        assert_eq!(w.backlog.len(), 3);
        for i in 3..10 {
            s.create(
                rt,
                "default",
                json!({"metadata": {"name": format!("c{i}")}}),
            )
            .unwrap();
        }
        let e = s
            .watch(rt.storage, &Filter::default(), Some(start))
            .unwrap_err();
        assert_eq!((e.code, e.reason), (410, "Expired"));
        let w = s.watch(rt.storage, &Filter::default(), None).unwrap();
        assert_eq!(w.backlog.len(), 10);
    }
}
