//! The controllers: workloads (Deployments, StatefulSets, ReplicaSets and
//! the custom kinds) create and delete Pods; each Pod gets its own loopback
//! address and, when its container serves a model, an in-process model-sim
//! there; Pods turn Ready when `/health` answers, terminate gracefully while
//! model-sim drains; EndpointSlices follow readiness; workload status
//! follows the Pods.
//!
//! One task reconciles everything after every change (and every 100 ms for
//! readiness and drains). Each pass reads the store and writes only what
//! differs, so its own writes settle after one more pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::resources::{ResourceType, Storage, of_storage};
use super::selector::LabelSelector;
use super::store::{Part, Store, suffix};
use super::time::now_rfc3339;
use super::view::selector_of;
use crate::sim::{ModelSim, SimConfig, SimHandle, SimRole};

/// What the controller runs for a Pod's container.
#[derive(Debug)]
struct Runtime {
    ip: Ipv4Addr,
    /// The model-sim of a container that serves a model.
    sim: Option<SimHandle>,
    /// The real process of a container whose image is a run-image.
    process: Option<super::runner::Process>,
    port: u16,
    ready: bool,
    /// When termination began.
    terminating: Option<(Instant, Duration)>,
}

/// Pod addresses: 127.B.0.2, 127.B.0.3, … (all of 127/8 is local on
/// Linux), B from 1 to 254 chosen by the process id. One pool per
/// process, so kube-sims side by side in one process (parallel tests)
/// never hand out the same address, and two processes (a `scalecar demo`
/// while the tests run) do not either unless their ids share B — before,
/// both used 127.0.0.x and a test's Pod answered from the demo's
/// model-sim. An address is reused only after 65 534 fresh ones, so a new
/// Pod does not take the address of one just gone (whose clients may
/// still hold it).
#[derive(Debug)]
struct Addresses {
    /// The second octet; `None` until the first address is taken.
    block: Option<u8>,
    next: u32,
    free: std::collections::VecDeque<Ipv4Addr>,
}

/// Fresh addresses handed out before the oldest freed ones are reused.
const FRESH_ADDRESSES: u32 = 1 << 16;

static ADDRESSES: std::sync::Mutex<Addresses> = std::sync::Mutex::new(Addresses {
    block: None,
    next: 2,
    free: std::collections::VecDeque::new(),
});

impl Addresses {
    fn take(&mut self) -> Ipv4Addr {
        if self.next >= FRESH_ADDRESSES
            && let Some(ip) = self.free.pop_front()
        {
            return ip;
        }
        let block = *self.block.get_or_insert_with(|| {
            // 1..=254: never 127.0.x.x, where 127.0.0.1 lives.
            1 + (std::process::id() % 254) as u8
        });
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, block, 0, 0)) + self.next);
        self.next += 1;
        ip
    }

    fn give_back(&mut self, ip: Ipv4Addr) {
        self.free.push_back(ip);
    }

    fn shared() -> std::sync::MutexGuard<'static, Addresses> {
        ADDRESSES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A container's model-sim settings from its command and args, as a vLLM
/// user writes them (`vllm serve MODEL`, `--model`, `--served-model-name`
/// with one name or several, `--lora-modules NAME=PATH …`, `--port`) plus
/// model-sim's own flags (`--role`, `--startup-delay`, `--seed`). `None`:
/// the container serves no model.
pub fn sim_of(container: &Value) -> Option<(SimConfig, u16)> {
    // vLLM's flags that take every following word (nargs="+").
    const LISTS: [&str; 2] = ["served-model-name", "lora-modules"];
    let words: Vec<String> = ["command", "args"]
        .iter()
        .filter_map(|k| container.get(*k).and_then(Value::as_array))
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let mut flags: HashMap<String, Vec<String>> = HashMap::new();
    let mut positional = Vec::new();
    let mut i = 0;
    while let Some(w) = words.get(i) {
        if let Some(flag) = w.strip_prefix("--") {
            if let Some((k, v)) = flag.split_once('=') {
                flags.entry(k.to_string()).or_default().push(v.to_string());
            } else {
                let values = flags.entry(flag.to_string()).or_default();
                while let Some(v) = words.get(i + 1).filter(|v| !v.starts_with("--")) {
                    values.push(v.clone());
                    i += 1;
                    if !LISTS.contains(&flag) {
                        break;
                    }
                }
            }
        } else {
            positional.push(w.clone());
        }
        i += 1;
    }
    let first = |k: &str| flags.get(k).and_then(|v| v.first()).cloned();
    let mut names: Vec<String> = flags
        .get("served-model-name")
        .filter(|v| !v.is_empty())
        .cloned()
        .or_else(|| first("model").map(|m| vec![m]))
        .or_else(|| {
            positional
                .iter()
                .position(|w| w == "serve")
                .and_then(|at| positional.get(at + 1).cloned())
                .map(|m| vec![m])
        })?;
    // An adapter is served under its name: `NAME=PATH`, or vLLM's JSON
    // form `{"name": …, "path": …}`.
    for m in flags.get("lora-modules").into_iter().flatten() {
        let name = match serde_json::from_str::<Value>(m) {
            Ok(v) => v.get("name").and_then(Value::as_str).map(String::from),
            Err(_) => m.split_once('=').map(|(n, _)| n.to_string()),
        };
        if let Some(n) = name.filter(|n| !n.is_empty() && !names.contains(n)) {
            names.push(n);
        }
    }
    let mut names = names.into_iter();
    let served = names.next()?;
    let port = first("port").and_then(|p| p.parse().ok()).unwrap_or(8000);
    let mut config = SimConfig {
        model: served,
        aliases: names.collect(),
        ..SimConfig::default()
    };
    if let Some(r) = first("role") {
        config.role = match r.as_str() {
            "prefill" => SimRole::Prefill,
            "decode" => SimRole::Decode,
            _ => SimRole::Unified,
        };
    }
    if let Some(d) = first("startup-delay").and_then(|d| humantime::parse_duration(&d).ok()) {
        config.startup_delay = d;
    }
    if let Some(s) = first("seed").and_then(|s| s.parse().ok()) {
        config.seed = s;
    }
    Some((config, port))
}

fn meta<'a>(o: &'a Value, k: &str) -> &'a str {
    o.get("metadata")
        .and_then(|m| m.get(k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn owner_uid(pod: &Value) -> Option<&str> {
    pod.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
}

fn terminating(o: &Value) -> bool {
    o.pointer("/metadata/deletionTimestamp").is_some()
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

/// A short stable hash of a pod template (Deployments' pod-template-hash).
fn template_hash(template: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut h);
    let n = h.finish();
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|i| char::from(CHARS[((n >> (i * 6)) % CHARS.len() as u64) as usize]))
        .collect()
}

/// The controllers of one kube-sim.
#[derive(Debug)]
pub struct Controller {
    store: Arc<Store>,
    pods: HashMap<(String, String), Runtime>,
    /// Pods that cannot start yet, and why (reported once per reason).
    blocked: HashMap<(String, String), String>,
    /// Images run as real processes, and the kubeconfig they get.
    run_images: Vec<super::runner::RunImage>,
    kubeconfig: Option<std::path::PathBuf>,
}

const WORKLOADS: [Storage; 5] = [
    Storage::Deployments,
    Storage::StatefulSets,
    Storage::ReplicaSets,
    Storage::ModelServers,
    Storage::ModelBackends,
];

impl Controller {
    pub fn new(store: Arc<Store>) -> Self {
        Controller {
            store,
            pods: HashMap::new(),
            blocked: HashMap::new(),
            run_images: Vec::new(),
            kubeconfig: None,
        }
    }

    /// Pods of these images run the real binaries, with `kubeconfig`.
    pub fn run_images(
        mut self,
        images: Vec<super::runner::RunImage>,
        kubeconfig: std::path::PathBuf,
    ) -> Self {
        self.run_images = images;
        self.kubeconfig = Some(kubeconfig);
        self
    }

    /// Reconciles after every change and every 100 ms until `stop`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = changes.recv() => {
                    // Take what else is pending: one pass covers them all.
                    while changes.try_recv().is_ok() {}
                }
                _ = tick.tick() => {}
            }
            self.pass().await;
        }
        for (_, rt) in self.pods.drain() {
            if let Some(sim) = rt.sim {
                sim.shutdown();
            }
        }
    }

    /// One reconcile of everything.
    pub async fn pass(&mut self) {
        let pods = self.store.all(Storage::Pods);
        // Pods by owner, once a pass: a workload looks at its own pods, not
        // at every pod (10,000 pods under 1,000 workloads).
        let mut by_owner: HashMap<&str, Vec<&Value>> = HashMap::new();
        for p in &pods {
            if let Some(uid) = owner_uid(p) {
                by_owner.entry(uid).or_default().push(p);
            }
        }
        let mut live_owners: HashSet<String> = HashSet::new();
        for storage in WORKLOADS {
            let rt = of_storage(storage);
            for w in self.store.all(storage) {
                live_owners.insert(meta(&w, "uid").to_string());
                if !terminating(&w) {
                    let owned = by_owner.get(meta(&w, "uid")).map_or(&[][..], Vec::as_slice);
                    self.workload(rt, &w, owned);
                }
            }
        }
        for pod in &pods {
            // Pods of a workload that is gone are garbage-collected.
            if let Some(uid) = owner_uid(pod)
                && !live_owners.contains(uid)
                && !terminating(pod)
            {
                let _ = self.store.delete(
                    of_storage(Storage::Pods),
                    meta(pod, "namespace"),
                    meta(pod, "name"),
                    Some(pod_grace(pod)),
                );
            }
        }
        let pods = self.store.all(Storage::Pods);
        let mut seen = HashSet::new();
        for pod in &pods {
            let key = (
                meta(pod, "namespace").to_string(),
                meta(pod, "name").to_string(),
            );
            seen.insert(key.clone());
            self.pod(key, pod).await;
        }
        // Runtimes of pods removed by anyone.
        let gone: Vec<_> = self
            .pods
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        self.blocked.retain(|k, _| seen.contains(k));
        for k in gone {
            if let Some(rt) = self.pods.remove(&k) {
                if let Some(sim) = rt.sim {
                    sim.shutdown();
                }
                Addresses::shared().give_back(rt.ip);
            }
        }
        self.endpoint_slices();
    }

    /// Reconciles one workload; `owned` are the pods whose controller
    /// owner is it.
    fn workload(&mut self, rt: &ResourceType, w: &Value, owned: &[&Value]) {
        let ns = meta(w, "namespace");
        let name = meta(w, "name");
        let desired = w
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize;
        let mut owned: Vec<&Value> = owned
            .iter()
            .copied()
            .filter(|p| meta(p, "namespace") == ns)
            .collect();
        owned.sort_by_key(|p| meta(p, "name").to_string());
        let live: Vec<&Value> = owned.iter().copied().filter(|p| !terminating(p)).collect();
        let pod_rt = of_storage(Storage::Pods);
        let template = w.pointer("/spec/template").cloned().unwrap_or(json!({}));
        if rt.storage == Storage::Deployments && self.roll(rt, w, &template, desired, &live) {
            self.workload_status(rt, w, &live);
            return;
        }
        if live.len() != desired {
            let (verb, n) = if live.len() < desired {
                ("Created", desired - live.len())
            } else {
                ("Deleted", live.len() - desired)
            };
            let (reason, message) = if rt.storage == Storage::Deployments {
                (
                    "ScalingReplicaSet",
                    format!("Scaled {} to {desired} pods ({verb} {n})", name),
                )
            } else {
                (
                    if verb == "Created" {
                        "SuccessfulCreate"
                    } else {
                        "SuccessfulDelete"
                    },
                    format!("{verb} {n} pods; {desired} desired"),
                )
            };
            record_event(&self.store, rt, w, reason, &message);
        }
        if live.len() < desired {
            let hash = template_hash(&template);
            let taken: HashSet<&str> = owned.iter().map(|p| meta(p, "name")).collect();
            let mut ordinal = 0usize;
            for _ in live.len()..desired {
                let pod_name = if rt.storage == Storage::StatefulSets {
                    while taken.contains(format!("{name}-{ordinal}").as_str()) {
                        ordinal += 1;
                    }
                    ordinal += 1;
                    format!("{name}-{}", ordinal - 1)
                } else if rt.storage == Storage::Deployments {
                    format!("{name}-{hash}-{}", suffix(5))
                } else {
                    format!("{name}-{}", suffix(5))
                };
                let pod = pod_from_template(rt, w, &template, &pod_name, &hash);
                if let Err(e) = self.store.create(pod_rt, ns, pod) {
                    tracing::warn!(workload = %name, error = %e, "creating a pod failed");
                }
            }
        } else if live.len() > desired {
            // A StatefulSet removes its highest ordinals; others the
            // not-ready first, then the newest.
            let mut victims = live.clone();
            let ordinal = |p: &Value| {
                meta(p, "name")
                    .rsplit('-')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if rt.storage == Storage::StatefulSets {
                victims.sort_by_key(|p| std::cmp::Reverse(ordinal(p)));
            } else {
                victims.sort_by(|a, b| {
                    pod_ready(a)
                        .cmp(&pod_ready(b))
                        .then_with(|| {
                            meta(b, "creationTimestamp").cmp(meta(a, "creationTimestamp"))
                        })
                        .then_with(|| meta(b, "name").cmp(meta(a, "name")))
                });
            }
            for p in victims.into_iter().take(live.len() - desired) {
                let _ = self
                    .store
                    .delete(pod_rt, ns, meta(p, "name"), Some(pod_grace(p)));
            }
        }
        self.workload_status(rt, w, &live);
    }

    /// A Deployment whose Pods are not all of its current template rolls,
    /// as the Deployment controller does with its default strategy: new
    /// Pods up to `maxSurge` above the count, old ones deleted while the
    /// Ready count stays at least `maxUnavailable` under it (25 % each,
    /// rounded up and down; at least one surge). Returns whether it rolled.
    fn roll(
        &self,
        rt: &ResourceType,
        w: &Value,
        template: &Value,
        desired: usize,
        live: &[&Value],
    ) -> bool {
        let hash = template_hash(template);
        let (current, old): (Vec<&Value>, Vec<&Value>) = live.iter().partition(|p| {
            p.pointer("/metadata/labels/pod-template-hash")
                .and_then(Value::as_str)
                == Some(hash.as_str())
        });
        if old.is_empty() {
            return false;
        }
        let ns = meta(w, "namespace");
        let name = meta(w, "name");
        let pod_rt = of_storage(Storage::Pods);
        let quarter = |key: &str, round_up: bool| -> usize {
            let v = w.pointer(&format!("/spec/strategy/rollingUpdate/{key}"));
            match v {
                Some(Value::Number(n)) => n.as_u64().unwrap_or(0) as usize,
                Some(Value::String(s)) if s.ends_with('%') => {
                    let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(25.0);
                    let x = desired as f64 * pct / 100.0;
                    (if round_up { x.ceil() } else { x.floor() }) as usize
                }
                _ => {
                    let x = desired as f64 * 0.25;
                    (if round_up { x.ceil() } else { x.floor() }) as usize
                }
            }
        };
        let max_unavailable = quarter("maxUnavailable", false);
        let max_surge = quarter("maxSurge", true).max(usize::from(max_unavailable == 0));
        let mut total = live.len();
        let mut created = 0;
        let mut fresh = current.len();
        while fresh < desired && total < desired + max_surge {
            let pod = pod_from_template(
                rt,
                w,
                template,
                &format!("{name}-{hash}-{}", suffix(5)),
                &hash,
            );
            if let Err(e) = self.store.create(pod_rt, ns, pod) {
                tracing::warn!(workload = %name, error = %e, "creating a pod failed");
                break;
            }
            total += 1;
            fresh += 1;
            created += 1;
        }
        let mut ready = live.iter().filter(|p| pod_ready(p)).count();
        let floor = desired.saturating_sub(max_unavailable);
        let mut deleted = 0;
        // Old Pods that serve nothing go first; the others only while the
        // Ready count stays at the floor.
        let mut victims = old.clone();
        victims.sort_by_key(|p| pod_ready(p));
        for p in victims {
            let was_ready = pod_ready(p);
            if was_ready && ready.saturating_sub(1) < floor {
                break;
            }
            let _ = self
                .store
                .delete(pod_rt, ns, meta(p, "name"), Some(pod_grace(p)));
            deleted += 1;
            if was_ready {
                ready -= 1;
            }
        }
        if created + deleted > 0 {
            record_event(
                &self.store,
                rt,
                w,
                "ScalingReplicaSet",
                &format!("Rolling {name} to {hash}: {created} new, {deleted} old removed"),
            );
        }
        true
    }

    /// Writes the workload's status from its live Pods.
    fn workload_status(&self, rt: &ResourceType, w: &Value, live: &[&Value]) {
        let ns = meta(w, "namespace");
        let name = meta(w, "name");
        let ready = live.iter().filter(|p| pod_ready(p)).count();
        let replicas = live.len();
        let generation = w
            .pointer("/metadata/generation")
            .cloned()
            .unwrap_or(json!(1));
        let selector = selector_of(w).to_query();
        let _ = self.store.modify(rt, ns, name, Part::Status, |o| {
            let mut status = o
                .get("status")
                .filter(|s| s.is_object())
                .cloned()
                .unwrap_or(json!({}));
            status["replicas"] = json!(replicas);
            status["readyReplicas"] = json!(ready);
            status["availableReplicas"] = json!(ready);
            status["updatedReplicas"] = json!(replicas);
            status["observedGeneration"] = generation;
            if rt.storage == Storage::StatefulSets {
                status["currentReplicas"] = json!(replicas);
            }
            if matches!(rt.storage, Storage::ModelServers | Storage::ModelBackends) {
                status["selector"] = json!(selector);
            }
            if let Some(s) = status.as_object_mut() {
                // Kubernetes leaves zero counts out (omitempty).
                for k in [
                    "replicas",
                    "readyReplicas",
                    "availableReplicas",
                    "updatedReplicas",
                    "currentReplicas",
                ] {
                    if s.get(k) == Some(&json!(0)) {
                        s.remove(k);
                    }
                }
            }
            o["status"] = status;
            Ok(())
        });
    }

    async fn pod(&mut self, key: (String, String), pod: &Value) {
        let pod_rt = of_storage(Storage::Pods);
        let (ns, name) = (&key.0, &key.1);
        if !self.pods.contains_key(&key) {
            if terminating(pod) {
                self.blocked.remove(&key);
                let _ = self.store.delete(pod_rt, ns, name, None);
                return;
            }
            // As a kubelet: nothing starts until the ConfigMaps and
            // Secrets the Pod names are there (checked again every pass).
            if let Some(b) = super::kubelet::missing(&self.store, ns, pod) {
                if self.blocked.get(&key) != Some(&b.message) {
                    block(&self.store, ns, name, pod, &b);
                    self.blocked.insert(key, b.message);
                }
                return;
            }
            self.blocked.remove(&key);
            let ip = Addresses::shared().take();
            let container = pod
                .pointer("/spec/containers/0")
                .cloned()
                .unwrap_or(json!({}));
            let (sim, port) = match sim_of(&container) {
                Some((config, port)) => {
                    match tokio::net::TcpListener::bind(SocketAddr::from((ip, port))).await {
                        Ok(l) => (Some(ModelSim::spawn(config, l)), port),
                        Err(e) => {
                            tracing::warn!(pod = %name, %ip, port, error = %e, "cannot listen for the pod's model-sim");
                            (None, port)
                        }
                    }
                }
                None => (None, 0),
            };
            let process = match (
                super::runner::matching(&self.run_images, &container),
                &self.kubeconfig,
            ) {
                (Some(run), Some(kubeconfig)) => {
                    match super::runner::Process::spawn(&self.store, ns, pod, ip, run, kubeconfig) {
                        Ok(p) => Some(p),
                        Err(message) => {
                            Addresses::shared().give_back(ip);
                            let b = super::kubelet::Blocked {
                                waiting: "RunContainerError",
                                event: "Failed",
                                message: format!("Error: {message}"),
                            };
                            if self.blocked.get(&key) != Some(&b.message) {
                                block(&self.store, ns, name, pod, &b);
                                self.blocked.insert(key, b.message);
                            }
                            return;
                        }
                    }
                }
                _ => None,
            };
            // A container that serves no model and runs nothing is ready at
            // once; the others when their probe answers.
            let ready = sim.is_none() && process.is_none();
            self.pods.insert(
                key.clone(),
                Runtime {
                    ip,
                    sim,
                    process,
                    port,
                    ready,
                    terminating: None,
                },
            );
            let containers: Vec<Value> = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map(|cs| {
                    cs.iter()
                        .map(|c| {
                            json!({"name": c.get("name").cloned().unwrap_or(json!("main")),
                                   "image": c.get("image").cloned().unwrap_or(json!("")),
                                   "imageID": "", "containerID": format!("kube-sim://{ns}/{name}"),
                                   "ready": false, "started": true, "restartCount": 0,
                                   "state": {"running": {"startedAt": now_rfc3339()}}})
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = self.store.modify(pod_rt, ns, name, Part::Status, |o| {
                o["status"] = json!({
                    "phase": "Running",
                    "podIP": ip.to_string(),
                    "podIPs": [{"ip": ip.to_string()}],
                    "hostIP": "127.0.0.1",
                    "startTime": now_rfc3339(),
                    "qosClass": "BestEffort",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": now_rfc3339()},
                        {"type": "ContainersReady", "status": "False", "lastTransitionTime": now_rfc3339()},
                        {"type": "Ready", "status": "False", "lastTransitionTime": now_rfc3339()},
                    ],
                    "containerStatuses": containers,
                });
                Ok(())
            });
        }
        let Some(rt) = self.pods.get_mut(&key) else {
            return;
        };
        if terminating(pod) {
            let (since, grace) = *rt
                .terminating
                .get_or_insert((Instant::now(), Duration::from_secs(pod_grace(pod))));
            let drained = match (&rt.sim, &mut rt.process) {
                (Some(sim), _) => {
                    sim.drain();
                    sim.is_drained()
                }
                (None, Some(p)) => {
                    p.terminate();
                    p.exited()
                }
                (None, None) => true,
            };
            if drained || since.elapsed() >= grace {
                if let Some(sim) = rt.sim.take() {
                    sim.shutdown();
                }
                if let Some(mut p) = rt.process.take() {
                    p.kill();
                }
                let _ = self.store.delete(pod_rt, ns, name, None);
                if let Some(rt) = self.pods.remove(&key) {
                    Addresses::shared().give_back(rt.ip);
                }
                return;
            }
            if rt.ready {
                rt.ready = false;
                set_ready(&self.store, ns, name, false);
            }
            return;
        }
        if let Some(p) = &mut rt.process {
            // A kubelet probes for as long as the container runs.
            let now_ready = p.ready().await;
            if rt.ready && !now_ready && p.exited() {
                tracing::warn!(pod = %name, namespace = %ns, last = %p.last_words(), "pod's process exited");
            }
            rt.ready = now_ready;
        } else if !rt.ready && rt.sim.is_some() && health(SocketAddr::from((rt.ip, rt.port))).await
        {
            rt.ready = true;
        }
        if rt.ready != pod_ready(pod) {
            set_ready(&self.store, ns, name, rt.ready);
        }
    }

    fn endpoint_slices(&self) {
        let slice_rt = of_storage(Storage::EndpointSlices);
        let pods = self.store.all(Storage::Pods);
        let mut wanted: BTreeMap<(String, String), Value> = BTreeMap::new();
        for svc in self.store.all(Storage::Services) {
            let Some(sel) = svc.pointer("/spec/selector").and_then(Value::as_object) else {
                continue;
            };
            if sel.is_empty() {
                continue;
            }
            let ns = meta(&svc, "namespace");
            let name = meta(&svc, "name");
            let selector = LabelSelector::from_match_labels(sel);
            let endpoints: Vec<Value> = pods
                .iter()
                .filter(|p| meta(p, "namespace") == ns && selector.matches(p))
                .filter_map(|p| {
                    let ip = p.pointer("/status/podIP")?.as_str()?;
                    let ready = pod_ready(p) && !terminating(p);
                    Some(json!({
                        "addresses": [ip],
                        "conditions": {"ready": ready, "serving": ready, "terminating": terminating(p)},
                        "nodeName": "kube-sim",
                        "targetRef": {"kind": "Pod", "name": meta(p, "name"), "namespace": ns, "uid": meta(p, "uid")},
                    }))
                })
                .collect();
            let ports: Vec<Value> = svc
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let port = p
                                .get("targetPort")
                                .and_then(Value::as_u64)
                                .or_else(|| p.get("port").and_then(Value::as_u64))
                                .unwrap_or(0);
                            json!({"name": p.get("name").cloned().unwrap_or(json!("")), "port": port,
                                   "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP"))})
                        })
                        .collect()
                })
                .unwrap_or_default();
            let slice_name = format!("{name}-kubesim");
            wanted.insert(
                (ns.to_string(), slice_name.clone()),
                json!({
                    "metadata": {"name": slice_name,
                                 "labels": {"kubernetes.io/service-name": name,
                                            "endpointslice.kubernetes.io/managed-by": "kube-sim"},
                                 "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                                      "uid": meta(&svc, "uid"), "controller": true}]},
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": ports,
                }),
            );
        }
        let existing = self.store.all(Storage::EndpointSlices);
        for s in &existing {
            let key = (
                meta(s, "namespace").to_string(),
                meta(s, "name").to_string(),
            );
            let managed = s.pointer("/metadata/labels/endpointslice.kubernetes.io~1managed-by")
                == Some(&json!("kube-sim"));
            if managed && !wanted.contains_key(&key) {
                let _ = self.store.delete(slice_rt, &key.0, &key.1, None);
            }
        }
        for ((ns, name), slice) in wanted {
            let exists = existing
                .iter()
                .any(|s| meta(s, "namespace") == ns && meta(s, "name") == name);
            if exists {
                let _ = self.store.modify(slice_rt, &ns, &name, Part::Main, |o| {
                    o["endpoints"] = slice["endpoints"].clone();
                    o["ports"] = slice["ports"].clone();
                    Ok(())
                });
            } else {
                let _ = self.store.create(slice_rt, &ns, slice);
            }
        }
    }
}

/// A Normal event about `w`, as the real controllers write them.
fn record_event(store: &Store, rt: &ResourceType, w: &Value, reason: &str, message: &str) {
    let events = super::resources::by_kind("events.k8s.io/v1", "Event")
        .unwrap_or_else(|| of_storage(Storage::Events));
    let now = now_rfc3339();
    let micro = format!("{}.000000Z", now.trim_end_matches('Z'));
    let event = json!({
        "metadata": {"generateName": format!("{}.", meta(w, "name"))},
        "eventTime": micro,
        "reportingController": "kube-sim/controller",
        "reportingInstance": "kube-sim",
        "action": "Scale",
        "reason": reason,
        "note": message,
        "type": "Normal",
        "regarding": {"apiVersion": rt.api_version(), "kind": rt.kind, "name": meta(w, "name"),
                      "namespace": meta(w, "namespace"), "uid": meta(w, "uid")},
    });
    if let Err(e) = store.create(events, meta(w, "namespace"), event) {
        tracing::debug!(error = %e, "recording an event failed");
    }
}

/// A Pod the kubelet cannot start: Pending, its containers waiting with
/// the reason, and the Warning Event a kubelet writes.
fn block(store: &Store, ns: &str, name: &str, pod: &Value, b: &super::kubelet::Blocked) {
    let pod_rt = of_storage(Storage::Pods);
    let containers: Vec<Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"name": c.get("name").cloned().unwrap_or(json!("main")),
                   "image": c.get("image").cloned().unwrap_or(json!("")),
                   "imageID": "", "ready": false, "started": false, "restartCount": 0,
                   "state": {"waiting": {"reason": b.waiting, "message": b.message}}})
        })
        .collect();
    let _ = store.modify(pod_rt, ns, name, Part::Status, |o| {
        o["status"] = json!({
            "phase": "Pending",
            "hostIP": "127.0.0.1",
            "startTime": now_rfc3339(),
            "qosClass": "BestEffort",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now_rfc3339()},
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now_rfc3339()},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now_rfc3339()},
            ],
            "containerStatuses": containers,
        });
        Ok(())
    });
    let events = super::resources::by_kind("events.k8s.io/v1", "Event")
        .unwrap_or_else(|| of_storage(Storage::Events));
    let now = now_rfc3339();
    let event = json!({
        "metadata": {"generateName": format!("{name}.")},
        "eventTime": format!("{}.000000Z", now.trim_end_matches('Z')),
        "reportingController": "kubelet",
        "reportingInstance": "kube-sim",
        "action": "Start",
        "reason": b.event,
        "note": b.message,
        "type": "Warning",
        "regarding": {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns,
                      "uid": meta(pod, "uid")},
    });
    if let Err(e) = store.create(events, ns, event) {
        tracing::debug!(error = %e, "recording an event failed");
    }
    tracing::info!(pod = %name, namespace = %ns, reason = b.waiting, message = %b.message, "pod cannot start");
}

fn pod_grace(pod: &Value) -> u64 {
    pod.pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_u64)
        .or_else(|| {
            pod.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
        })
        .unwrap_or(30)
}

fn set_ready(store: &Store, ns: &str, name: &str, ready: bool) {
    let pod_rt = of_storage(Storage::Pods);
    let flag = if ready { "True" } else { "False" };
    let _ = store.modify(pod_rt, ns, name, Part::Status, |o| {
        if let Some(cs) = o
            .pointer_mut("/status/conditions")
            .and_then(Value::as_array_mut)
        {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                if matches!(
                    c.get("type").and_then(Value::as_str),
                    Some("Ready" | "ContainersReady")
                ) {
                    c.insert("status".into(), json!(flag));
                    c.insert("lastTransitionTime".into(), json!(now_rfc3339()));
                }
            }
        }
        if let Some(cs) = o
            .pointer_mut("/status/containerStatuses")
            .and_then(Value::as_array_mut)
        {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                c.insert("ready".into(), json!(ready));
            }
        }
        Ok(())
    });
}

/// `GET /health` answers 200 within 200 ms.
async fn health(addr: SocketAddr) -> bool {
    http_ok(addr, "/health").await
}

/// `GET path` answers 200 within 200 ms (a kubelet's httpGet probe).
pub(super) async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: pod\r\nconnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf.get(..n)?.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_millis(200), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A Pod of workload `w` (of type `rt`) from its `template`, named
/// `pod_name`; Deployments' Pods carry the template's hash.
fn pod_from_template(
    rt: &ResourceType,
    w: &Value,
    template: &Value,
    pod_name: &str,
    hash: &str,
) -> Value {
    // Anything a client wrote may be the wrong shape: only objects are
    // extended.
    let mut labels = template
        .pointer("/metadata/labels")
        .filter(|l| l.is_object())
        .cloned()
        .unwrap_or(json!({}));
    if rt.storage == Storage::Deployments {
        labels["pod-template-hash"] = json!(hash);
    }
    let mut spec = template
        .get("spec")
        .filter(|s| s.is_object())
        .cloned()
        .unwrap_or(json!({}));
    spec["nodeName"] = json!("kube-sim");
    json!({
        "metadata": {
            "name": pod_name,
            "labels": labels,
            "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
            "ownerReferences": [{"apiVersion": rt.api_version(), "kind": rt.kind, "name": meta(w, "name"),
                                 "uid": meta(w, "uid"), "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": spec,
        "status": {"phase": "Pending", "qosClass": "BestEffort",
                   "conditions": [{"type": "PodScheduled", "status": "True",
                                   "lastTransitionTime": now_rfc3339()}]},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_args_as_vllm_users_write_them() {
        let (c, port) =
            sim_of(&json!({"args": ["--model", "meta-llama/Llama-3-8B", "--port", "8001"]}))
                .unwrap();
        assert_eq!((c.model.as_str(), port), ("meta-llama/Llama-3-8B", 8001));
        let (c, port) = sim_of(&json!({"command": ["vllm", "serve", "qwen"],
            "args": ["--served-model-name=q", "--role", "decode", "--startup-delay", "2s"]}))
        .unwrap();
        assert_eq!(
            (c.model.as_str(), port, c.role),
            ("q", 8000, SimRole::Decode)
        );
        assert_eq!(c.startup_delay, Duration::from_secs(2));
        let (c, _) = sim_of(&json!({"command": ["vllm", "serve", "qwen"]})).unwrap();
        assert_eq!(c.model, "qwen");
        assert!(sim_of(&json!({"image": "nginx", "args": ["-g", "daemon off;"]})).is_none());
    }

    #[test]
    fn several_served_names_and_lora_adapters_are_aliases() {
        let (c, port) = sim_of(&json!({
            "command": ["vllm", "serve", "meta-llama/Llama-3-8B"],
            "args": ["--served-model-name", "llama", "llama-3", "--enable-lora",
                     "--lora-modules", "sql=/a/sql", "{\"name\": \"chat\", \"path\": \"/a/chat\"}",
                     "llama=/dup", "--port", "8002"]
        }))
        .unwrap();
        assert_eq!(port, 8002);
        assert_eq!(c.model, "llama");
        assert_eq!(c.aliases, ["llama-3", "sql", "chat"]);
        assert!(c.serves("sql") && c.serves("llama") && !c.serves("meta-llama/Llama-3-8B"));
        // A flag of one value still takes one word.
        let (c, _) = sim_of(&json!({"args": ["--model", "m", "serve"]})).unwrap();
        assert!(c.aliases.is_empty());
    }

    #[test]
    fn addresses_are_distinct_and_reused_only_when_fresh_ones_run_out() {
        let mut a = Addresses {
            block: Some(0),
            next: 2,
            free: std::collections::VecDeque::new(),
        };
        let x = a.take();
        let y = a.take();
        assert_eq!(
            (x, y),
            (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3))
        );
        a.give_back(x);
        assert_eq!(a.take(), Ipv4Addr::new(127, 0, 0, 4), "fresh first");
        let mut far = Addresses {
            block: Some(9),
            next: 300,
            free: std::collections::VecDeque::new(),
        };
        assert_eq!(far.take(), Ipv4Addr::new(127, 9, 1, 44));
        // A process's own block, never 127.0.x.x.
        let mut own = Addresses {
            block: None,
            next: 2,
            free: std::collections::VecDeque::new(),
        };
        let ip = own.take().octets();
        assert_eq!((ip[0], ip[2], ip[3]), (127, 0, 2));
        assert!((1..=254).contains(&ip[1]), "{ip:?}");
        let mut full = Addresses {
            block: Some(0),
            next: FRESH_ADDRESSES,
            free: std::collections::VecDeque::from([x, y]),
        };
        assert_eq!((full.take(), full.take()), (x, y), "oldest freed first");
    }
}
