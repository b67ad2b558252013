//! The install exactly as README's Install section says it — `kubectl apply
//! -k deploy/` (rendered by the real kubectl's kustomize, applied with
//! `--validate=false` as kube-sim needs) and nothing created by hand — on a
//! kube-sim as strict as a kubelet (Pods wait for the ConfigMaps and Secrets
//! they name) whose scalecar Pods run the real `scalecar` binary
//! (`--run-image`): Ready means the binary started on the rendered config,
//! env and args and answers `/readyz`. Then it routes a request through
//! the Pod's own address and scales an annotated Deployment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../proxy/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::get;
use scalecar_loadtest::kube_sim::runner::RunImage;
use scalecar_loadtest::kube_sim::{KubeSim, KubeSimConfig};

/// A kube-sim whose scalecar image runs this build's binary.
struct Cluster {
    sim: KubeSim,
    kubeconfig: PathBuf,
}

impl Cluster {
    async fn start() -> Cluster {
        let config = KubeSimConfig {
            run_images: vec![RunImage {
                image: "ghcr.io/scalecar/scalecar".into(),
                binary: PathBuf::from(env!("CARGO_BIN_EXE_scalecar")),
            }],
            ..KubeSimConfig::default()
        };
        let (sim, _, kubeconfig) = common::kube_sim(config, "install").await;
        Cluster { sim, kubeconfig }
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write as _;
        let mut child = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -k DIR`, as README says (kustomize by kubectl).
    fn apply(&self, dir: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        let rendered = self.kubectl(&["kustomize", path.to_str().unwrap()], None);
        self.kubectl(&["apply", "--validate=false", "-f", "-"], Some(&rendered))
    }

    /// The Pod IPs of `n` Ready gateway Pods matching `selector`, once
    /// there are (Ready: the real binary answers /readyz).
    async fn ready_gateways(&self, selector: &str, n: usize) -> Vec<String> {
        eventually(
            &format!("{n} gateway pod(s) Ready"),
            Duration::from_secs(30),
            || async {
                let lines = self.kubectl(
                    &[
                        "-n",
                        "scalecar",
                        "get",
                        "pods",
                        "-l",
                        selector,
                        "-o",
                        "jsonpath={range .items[*]}{.status.podIP} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
                    ],
                    None,
                );
                let ready: Vec<String> = lines
                    .lines()
                    .filter_map(|l| l.split_once(' '))
                    .filter(|(_, r)| *r == "True")
                    .map(|(ip, _)| ip.to_string())
                    .collect();
                (ready.len() == n).then_some(ready)
            },
        )
        .await
    }

    async fn stop(self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
        self.sim.shutdown().await;
    }
}

/// One chat completion for the example's model through the gateway Pod
/// at `ip`, with the OpenAI SDK; it must answer.
async fn ask_llama(ip: &str, question: &str) {
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{ip}:8080/v1"))
            .with_api_key("unused"),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model("llama-3-8b")
        .max_completion_tokens(8u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(question)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let answer = client.chat().create(request).await.unwrap();
    assert!(!answer.choices.is_empty());
}

async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_install_starts_the_real_gateway_which_routes_and_scales() {
    let c = Cluster::start().await;
    // The model servers to try it with, then the install.
    c.apply("deploy/example");
    let out = c.apply("deploy");
    assert!(out.contains("deployment.apps/scalecar created"), "{out}");
    // Ready: the real binary answers /readyz on its Pod's admin port.
    let ip = c
        .ready_gateways("app.kubernetes.io/name=scalecar", 1)
        .await
        .remove(0);
    let (status, _) = get(&format!("http://{ip}:9090/readyz")).await.unwrap();
    assert_eq!(status, 200);
    // The peer token it made for itself, as nobody was asked to.
    let token = c.kubectl(
        &[
            "-n",
            "scalecar",
            "get",
            "secret",
            "scalecar-peer-token",
            "-o",
            "jsonpath={.data.token}",
        ],
        None,
    );
    assert!(!token.is_empty());
    // Discovery routes the example's model to its ready pod.
    eventually("llama-3-8b routed", Duration::from_secs(20), || async {
        let (_, body) = get(&format!("http://{ip}:9090/debug/pools")).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["pools"].as_array()?.iter().find(|p| {
            p["model"] == "llama-3-8b" && p["endpoints"].as_array().is_some_and(|e| !e.is_empty())
        })?;
        Some(())
    })
    .await;
    ask_llama(&ip, "installed?").await;
    // It scales: a new floor on the annotated Deployment is written through
    // /scale by scalecar (its User-Agent), and evented.
    c.kubectl(
        &[
            "-n",
            "llm",
            "annotate",
            "--overwrite",
            "deploy/llama-3-8b",
            "scalecar.io/min-replicas=2",
        ],
        None,
    );
    eventually(
        "llama-3-8b scaled to 2",
        Duration::from_secs(20),
        || async {
            let n = c.kubectl(
                &[
                    "-n",
                    "llm",
                    "get",
                    "deploy/llama-3-8b",
                    "-o",
                    "jsonpath={.spec.replicas}",
                ],
                None,
            );
            (n.trim() == "2").then_some(())
        },
    )
    .await;
    assert!(
        c.sim.requests().iter().any(|r| r.method == "PATCH"
            && r.uri.contains("/deployments/llama-3-8b/scale")
            && r.user_agent.starts_with("scalecar/")),
        "the scale write was not scalecar's"
    );
    let events = c.kubectl(
        &[
            "-n",
            "llm",
            "get",
            "events",
            "-o",
            "custom-columns=R:.reason,M:.message",
            "--no-headers",
        ],
        None,
    );
    assert!(events.contains("SuccessfulRescale"), "{events}");
    c.rbac_is_what_the_gateway_uses().await;
    c.stop().await;
}

/// One API call as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: String,
    group: String,
    /// `deployments` or `deployments/scale`.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl Call {
    /// `None` for discovery (`/api`, `/apis/GROUP/VERSION`): every
    /// authenticated client may read it.
    fn parse(method: &str, uri: &str) -> Option<Call> {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", _version, rest @ ..] => (String::new(), rest),
            ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        let (resource, name) = match rest {
            [] => return None,
            [res] => (res.to_string(), None),
            [res, name] => (res.to_string(), Some(name.to_string())),
            [res, name, sub, ..] => (format!("{res}/{sub}"), Some(name.to_string())),
        };
        let watch = query
            .split('&')
            .any(|q| q == "watch=true" || q == "watch=1");
        let verb = match (method, &name) {
            ("GET", Some(_)) => "get",
            ("GET", None) if watch => "watch",
            ("GET", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => return None,
        };
        Some(Call {
            verb: verb.into(),
            group,
            resource,
            namespace,
            name,
        })
    }
}

impl Cluster {
    /// Every call the gateway made is allowed by the installed Roles and
    /// ClusterRoles, and every verb they grant was used — least privilege,
    /// read from the cluster rather than from the YAML.
    async fn rbac_is_what_the_gateway_uses(&self) {
        // The leader renews its Lease (an update) every retry period: a
        // scenario that finishes within one after the Lease was taken has
        // not made that call yet.
        eventually("a Lease renewal", Duration::from_secs(10), || async {
            self.sim
                .requests()
                .iter()
                .any(|r| {
                    r.method == "PUT"
                        && r.uri.contains("/leases/")
                        && r.user_agent.starts_with("scalecar/")
                })
                .then_some(())
        })
        .await;
        let calls: std::collections::BTreeSet<Call> = self
            .sim
            .requests()
            .iter()
            .filter(|r| r.user_agent.starts_with("scalecar/"))
            .filter_map(|r| Call::parse(&r.method, &r.uri))
            .map(|mut c| {
                // A create names no object; a collection call none either.
                if c.verb == "create" {
                    c.name = None;
                }
                c
            })
            .collect();
        assert!(calls.len() > 8, "{calls:?}");
        let roles: serde_json::Value = serde_json::from_str(
            &self.kubectl(&["get", "clusterroles,roles", "-A", "-o", "json"], None),
        )
        .unwrap();
        // (namespace or None for cluster-wide, rule)
        let mut rules = Vec::new();
        for role in roles["items"].as_array().unwrap() {
            let ns = role["metadata"]["namespace"].as_str().map(str::to_string);
            for rule in role["rules"].as_array().into_iter().flatten() {
                rules.push((ns.clone(), rule.clone()));
            }
        }
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let allows = |call: &Call, ns: &Option<String>, rule: &serde_json::Value| {
            ns.as_ref()
                .is_none_or(|n| call.namespace.as_ref() == Some(n))
                && strings(&rule["apiGroups"]).contains(&call.group)
                && strings(&rule["resources"]).contains(&call.resource)
                && strings(&rule["verbs"]).contains(&call.verb)
                && (rule["resourceNames"].is_null()
                    || call
                        .name
                        .as_ref()
                        .is_some_and(|n| strings(&rule["resourceNames"]).contains(n)))
        };
        for call in &calls {
            assert!(
                rules.iter().any(|(ns, rule)| allows(call, ns, rule)),
                "the gateway made {call:?}, which no installed rule allows"
            );
        }
        // Conversely: each granted (group, resource, verb) was used, but for
        // what this scenario cannot exercise.
        let unexercised = [
            // The object itself is read when the watch has not delivered it
            // yet or a write met a 409 (scaler::kube::scale::refresh).
            ("apps", "deployments", "get"),
            ("apps", "statefulsets", "get"),
            // Same calls as deployments; the example has no StatefulSet.
            ("apps", "statefulsets", "list"),
            ("apps", "statefulsets", "watch"),
            ("apps", "statefulsets/scale", "get"),
            ("apps", "statefulsets/scale", "patch"),
            // An Event repeated within its series' life is counted on the
            // first (scaler::kube::events); here no note repeats.
            ("events.k8s.io", "events", "patch"),
        ];
        for (_, rule) in &rules {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        if unexercised.contains(&(group.as_str(), resource.as_str(), verb.as_str()))
                        {
                            continue;
                        }
                        assert!(
                            calls.iter().any(|c| c.group == group
                                && c.resource == resource
                                && c.verb == verb),
                            "granted but never used: {verb} {group}/{resource}; used: {calls:?}"
                        );
                    }
                }
            }
        }
    }
}

/// `scalecar_leader` from one gateway pod's `/metrics`.
async fn leader_gauge(ip: &str) -> Option<f64> {
    let (_, text) = get(&format!("http://{ip}:9090/metrics")).await.ok()?;
    text.lines()
        .find(|l| l.starts_with("scalecar_leader "))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_overlay_runs_three_real_gateways_one_of_which_leads() {
    let c = Cluster::start().await;
    c.apply("deploy/example");
    c.apply("deploy/overlays/ha");
    let ips = c.ready_gateways("app.kubernetes.io/name=scalecar", 3).await;
    // One Lease, one leader among the three real processes; the others
    // export no decision series.
    eventually("exactly one leader", Duration::from_secs(20), || async {
        let mut leaders = 0.0;
        for ip in &ips {
            leaders += leader_gauge(ip).await?;
        }
        (leaders == 1.0).then_some(())
    })
    .await;
    // The leader decides on the example's targets; the followers export
    // none of it.
    eventually(
        "decisions at the leader only",
        Duration::from_secs(20),
        || async {
            for ip in &ips {
                let (_, text) = get(&format!("http://{ip}:9090/metrics")).await.ok()?;
                let leads = text.contains("\nscalecar_leader 1");
                let decides = text.contains("scalecar_desired_replicas{");
                assert!(!decides || leads, "{ip}: decision series on a follower");
                if leads && !decides {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    c.stop().await;
}

/// How stale a load balancer's view of the Service's endpoints is.
const ENDPOINT_LAG: Duration = Duration::from_secs(2);

/// The Ready addresses of Service `scalecar`, as kube-proxy would pick
/// from its EndpointSlices.
async fn service_endpoints(client: &kube::Client) -> Vec<String> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), "scalecar");
    let Ok(list) = slices
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=scalecar"))
        .await
    else {
        return Vec::new();
    };
    list.items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_the_gateway_under_streaming_load_fails_no_request() {
    use futures_util::StreamExt as _;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let c = Cluster::start().await;
    c.apply("deploy/example");
    c.apply("deploy");
    let client = kube::Client::try_from(kube::Config::new(c.sim.url().parse().unwrap())).unwrap();
    let first = eventually(
        "the gateway in its Service",
        Duration::from_secs(30),
        || async {
            let eps = service_endpoints(&client).await;
            (eps.len() == 1).then(|| eps[0].clone())
        },
    )
    .await;
    // Ready means routes known: the example's model is served at once.
    let (status, body) = get(&format!("http://{first}:9090/debug/pools"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("llama-3-8b"), "{body}");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served = Arc::new(Mutex::new(std::collections::BTreeSet::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..4usize {
        let (stop, ok, failures, served, client) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            served.clone(),
            client.clone(),
        );
        workers.push(tokio::spawn(async move {
            // One kept-alive OpenAI client per gateway address, as an
            // application behind a Service holds connections.
            let mut clients: std::collections::HashMap<String, Client<OpenAIConfig>> =
                Default::default();
            let mut n = w;
            // Endpoints reach load balancers seconds after they change
            // (kube-proxy's sync, a cloud LB's health checks): each worker
            // refreshes its view every 2 s, as such a balancer would.
            let mut eps = Vec::new();
            let mut refreshed: Option<Instant> = None;
            while !stop.load(Ordering::Acquire) {
                if refreshed.is_none_or(|t| t.elapsed() >= ENDPOINT_LAG) || eps.is_empty() {
                    eps = service_endpoints(&client).await;
                    refreshed = Some(Instant::now());
                }
                if eps.is_empty() {
                    failures.lock().unwrap().push("no ready endpoint".into());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                n += 1;
                let ip = eps[n % eps.len()].clone();
                let openai = clients.entry(ip.clone()).or_insert_with(|| {
                    Client::with_config(
                        OpenAIConfig::new()
                            .with_api_base(format!("http://{ip}:8080/v1"))
                            .with_api_key("unused"),
                    )
                });
                let request = CreateChatCompletionRequestArgs::default()
                    .model("llama-3-8b")
                    .max_completion_tokens(60u32)
                    .stream(true)
                    .messages([ChatCompletionRequestUserMessageArgs::default()
                        .content("roll on")
                        .build()
                        .unwrap()
                        .into()])
                    .build()
                    .unwrap();
                let outcome = async {
                    let mut s = openai
                        .chat()
                        .create_stream(request)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut chunks = 0;
                    while let Some(chunk) = s.next().await {
                        chunk.map_err(|e| format!("after {chunks} chunks: {e}"))?;
                        chunks += 1;
                    }
                    Ok::<usize, String>(chunks)
                }
                .await;
                match outcome {
                    Ok(chunks) if chunks > 0 => {
                        ok.fetch_add(1, Ordering::AcqRel);
                        served.lock().unwrap().insert(ip);
                    }
                    Ok(_) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{ip}: an empty stream")),
                    Err(e) => failures.lock().unwrap().push(format!("{ip}: {e}")),
                }
            }
        }));
    }
    eventually("streams flowing", Duration::from_secs(20), || async {
        (ok.load(Ordering::Acquire) >= 8).then_some(())
    })
    .await;
    c.kubectl(
        &["-n", "scalecar", "rollout", "restart", "deploy/scalecar"],
        None,
    );
    // The new pod takes over; the old one drains and is gone.
    let second = eventually("the gateway replaced", Duration::from_secs(60), || async {
        let eps = service_endpoints(&client).await;
        let pods = c.kubectl(
            &[
                "-n",
                "scalecar",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=scalecar",
                "-o",
                "name",
            ],
            None,
        );
        (eps.len() == 1 && eps[0] != first && pods.lines().count() == 1).then(|| eps[0].clone())
    })
    .await;
    let before = ok.load(Ordering::Acquire);
    eventually(
        "streams through the new gateway",
        Duration::from_secs(20),
        || async { (ok.load(Ordering::Acquire) >= before + 8).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let served = served.lock().unwrap().clone();
    assert!(
        served.contains(&first) && served.contains(&second),
        "served by {served:?}, old {first}, new {second}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_another_autoscaler_claims_is_left_to_it() {
    let c = Cluster::start().await;
    c.apply("deploy/example");
    c.apply("deploy");
    let ip = c
        .ready_gateways("app.kubernetes.io/name=scalecar", 1)
        .await
        .remove(0);
    // An HPA on the llama Deployment, and KEDA on qwen's prefill.
    c.kubectl(
        &["apply", "--validate=false", "-f", "-"],
        Some(
            r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: llama-cpu, namespace: llm}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: llama-3-8b}
  minReplicas: 1
  maxReplicas: 4
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: qwen-prefill, namespace: llm}
spec:
  scaleTargetRef: {name: qwen-prefill}
  triggers: [{type: prometheus, metadata: {query: "sum(vllm:num_requests_waiting)", threshold: "4"}}]
"#,
        ),
    );
    let metrics = || async {
        get(&format!("http://{ip}:9090/metrics"))
            .await
            .map(|(_, t)| t)
            .unwrap_or_default()
    };
    eventually("both claims seen", Duration::from_secs(20), || async {
        let m = metrics().await;
        (m.contains("scalecar_competing_autoscaler{target=\"deployment/llm/llama-3-8b\"} 1")
            && m.contains(
                "scalecar_competing_autoscaler{target=\"deployment/llm/qwen-prefill\"} 1",
            ))
        .then_some(())
    })
    .await;
    let events = c.kubectl(
        &[
            "-n",
            "llm",
            "get",
            "events",
            "-o",
            "custom-columns=T:.type,R:.reason,O:.involvedObject.name,M:.message",
            "--no-headers",
        ],
        None,
    );
    assert!(
        events.lines().any(|l| l.contains("Warning")
            && l.contains("CompetingAutoscaler")
            && l.contains("llama-3-8b")
            && l.contains("HorizontalPodAutoscaler llm/llama-cpu")),
        "{events}"
    );
    assert!(events.contains("ScaledObject llm/qwen-prefill"), "{events}");
    // A new floor would be written, but the HPA owns the count: scalecar
    // decides (its reason says the floor) and writes nothing.
    let writes = || {
        c.sim
            .requests()
            .iter()
            .filter(|r| {
                r.method == "PATCH"
                    && r.uri.contains("/deployments/llama-3-8b/scale")
                    && r.user_agent.starts_with("scalecar/")
            })
            .count()
    };
    let before = writes();
    c.kubectl(
        &[
            "-n",
            "llm",
            "annotate",
            "--overwrite",
            "deploy/llama-3-8b",
            "scalecar.io/min-replicas=3",
        ],
        None,
    );
    eventually(
        "a decision for the new floor",
        Duration::from_secs(20),
        || async {
            let (_, body) = get(&format!("http://{ip}:9090/debug/targets")).await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["targets"].as_array()?.iter().find(|t| {
                t["name"] == "deployment/llm/llama-3-8b"
                    && t["applied"] == 3
                    && t["advisory"] == true
            })?;
            Some(())
        },
    )
    .await;
    assert_eq!(writes(), before, "scalecar wrote a workload an HPA scales");
    // The HPA gone: scalecar takes the workload back and writes the floor.
    c.kubectl(&["-n", "llm", "delete", "hpa", "llama-cpu"], None);
    eventually(
        "llama-3-8b scaled to 3 once the HPA is gone",
        Duration::from_secs(20),
        || async {
            let n = c.kubectl(
                &[
                    "-n",
                    "llm",
                    "get",
                    "deploy/llama-3-8b",
                    "-o",
                    "jsonpath={.spec.replicas}",
                ],
                None,
            );
            (n.trim() == "3").then_some(())
        },
    )
    .await;
    assert!(writes() > before);
    assert!(
        !metrics()
            .await
            .contains("scalecar_competing_autoscaler{target=\"deployment/llm/llama-3-8b\"}")
    );
    c.stop().await;
}

/// `helm ARGS` (`$HELM`, as scripts/test sets it, else `helm` on PATH).
fn helm(args: &[&str]) -> String {
    let bin = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let out = std::process::Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/install-helm puts one in target/tools)"));
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_defaults_install_the_real_gateway_which_routes_and_scales() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/scalecar");
    let chart = chart.to_str().unwrap();
    // Without the Prometheus Operator's CRDs: nothing of it is rendered.
    let plain = helm(&["template", "scalecar", chart, "-n", "scalecar"]);
    assert!(!plain.contains("monitoring.coreos.com"), "{plain}");
    // With them, both objects, carrying the release label asked for.
    let monitored = helm(&[
        "template",
        "scalecar",
        chart,
        "-n",
        "scalecar",
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
        "--api-versions",
        "monitoring.coreos.com/v1/PrometheusRule",
        "--set",
        "serviceMonitor.labels.release=kube-prometheus-stack",
        "--set",
        "prometheusRule.labels.release=kube-prometheus-stack",
    ]);
    for kind in ["kind: ServiceMonitor", "kind: PrometheusRule"] {
        assert!(monitored.contains(kind), "{kind} missing");
    }
    assert_eq!(
        monitored.matches("release: kube-prometheus-stack").count(),
        2
    );
    // Rendered twice, the same objects (GitOps syncs see no change).
    assert_eq!(
        plain,
        helm(&["template", "scalecar", chart, "-n", "scalecar"])
    );
    // The values users of other charts reach for.
    let digest = format!("sha256:{}", "a".repeat(64));
    let custom = helm(&[
        "template",
        "scalecar",
        chart,
        "-n",
        "team-a",
        "--set",
        "fullnameOverride=gw",
        "--set",
        &format!("image.digest={digest}"),
        "--set",
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/gw",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "podDisruptionBudget.minAvailable=1",
        "--set",
        "priorityClassName=critical",
        "--set",
        "podLabels.team=a",
        "--set",
        "extraArgs={--log-level,debug}",
    ]);
    for want in [
        // Cluster-scoped names carry the namespace.
        "name: gw-team-a\n",
        &format!("ghcr.io/scalecar/scalecar@{digest}"),
        "eks.amazonaws.com/role-arn: arn:aws:iam::1:role/gw",
        "kind: NetworkPolicy",
        "minAvailable: 1",
        "priorityClassName: critical",
        "team: a",
        "- \"--log-level\"",
        "lease-name: gw",
    ] {
        assert!(custom.contains(want), "{want} missing from:\n{custom}");
    }
    assert!(!custom.contains("maxUnavailable"), "minAvailable wins");

    // helm install --create-namespace, as the chart's README says it.
    let c = Cluster::start().await;
    c.apply("deploy/example");
    c.kubectl(
        &["apply", "--validate=false", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: scalecar}\n"),
    );
    c.kubectl(
        &["apply", "--validate=false", "-n", "scalecar", "-f", "-"],
        Some(&plain),
    );
    let ip = c
        .ready_gateways("app.kubernetes.io/instance=scalecar", 1)
        .await
        .remove(0);
    ask_llama(&ip, "charted?").await;
    c.kubectl(
        &[
            "-n",
            "llm",
            "annotate",
            "--overwrite",
            "deploy/llama-3-8b",
            "scalecar.io/min-replicas=2",
        ],
        None,
    );
    eventually(
        "llama-3-8b scaled to 2 by the chart's gateway",
        Duration::from_secs(20),
        || async {
            let n = c.kubectl(
                &[
                    "-n",
                    "llm",
                    "get",
                    "deploy/llama-3-8b",
                    "-o",
                    "jsonpath={.spec.replicas}",
                ],
                None,
            );
            (n.trim() == "2").then_some(())
        },
    )
    .await;
    c.rbac_is_what_the_gateway_uses().await;
    c.stop().await;
}

/// An older install's RBAC without the rights on HorizontalPodAutoscalers
/// (every list of them answers 403): other autoscalers go undetected, but
/// the gateway still turns Ready and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_not_allowed_to_watch_hpas_still_serves() {
    use scalecar_loadtest::kube_sim::{Fault, Rule};
    let c = Cluster::start().await;
    c.sim.faults().add(Rule {
        verb: None,
        resource: Some("horizontalpodautoscalers".into()),
        rate: 1.0,
        fault: Fault::Error(403),
    });
    c.apply("deploy/example");
    c.apply("deploy");
    let ip = c
        .ready_gateways("app.kubernetes.io/name=scalecar", 1)
        .await
        .remove(0);
    let (_, body) = get(&format!("http://{ip}:9090/debug/pools")).await.unwrap();
    assert!(body.contains("llama-3-8b"), "{body}");
    assert!(
        c.sim
            .requests()
            .iter()
            .any(|r| r.uri.contains("horizontalpodautoscalers") && r.status == 403),
        "the HPA list was never refused"
    );
    c.stop().await;
}

/// The endpoint scalecar's picker at `ip` chooses for one chat request for
/// `model`, asked as Envoy's ext_proc filter asks (headers, then the
/// buffered body) over gRPC; the reply's `x-gateway-destination-endpoint`.
async fn picked_endpoint(ip: &str, model: &str) -> Result<String, String> {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProcessingRequest, processing_request, processing_response,
    };
    let mut client = ExternalProcessorClient::connect(format!("http://{ip}:9002"))
        .await
        .map_err(|e| e.to_string())?;
    let header = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    let headers = ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":method", "POST"),
                    header(":path", "/v1/chat/completions"),
                    header("content-type", "application/json"),
                ],
            }),
            ..HttpHeaders::default()
        })),
        ..ProcessingRequest::default()
    };
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"which pod?"}}],"max_tokens":4}}"#
    );
    let body = ProcessingRequest {
        request: Some(processing_request::Request::RequestBody(HttpBody {
            body: body.into_bytes(),
            end_of_stream: true,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    };
    let mut answers = client
        .process(futures_util::stream::iter([headers, body]))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    while let Some(answer) = answers.message().await.map_err(|e| e.to_string())? {
        match answer.response {
            Some(processing_response::Response::RequestBody(b)) => {
                let set = b
                    .response
                    .and_then(|c| c.header_mutation)
                    .map(|m| m.set_headers)
                    .unwrap_or_default();
                return set
                    .into_iter()
                    .filter_map(|h| h.header)
                    .find(|h| h.key == "x-gateway-destination-endpoint")
                    .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())
                    .ok_or_else(|| "no destination header in the body's answer".into());
            }
            Some(processing_response::Response::ImmediateResponse(i)) => {
                return Err(format!(
                    "refused: {:?} {}",
                    i.status,
                    String::from_utf8_lossy(&i.body)
                ));
            }
            _ => {}
        }
    }
    Err("the picker ended the exchange without a pick".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_api_overlay_picks_for_an_inference_pool_and_scales_its_deployment() {
    let c = Cluster::start().await;
    // The example as README says: a Deployment nobody annotated, an
    // InferencePool over it naming scalecar-epp, a Gateway and its route.
    c.apply("deploy/example/gateway-api");
    c.apply("deploy/overlays/gateway-api");
    let ip = c
        .ready_gateways("app.kubernetes.io/name=scalecar", 1)
        .await
        .remove(0);
    // The pool's pod, on the pool's target port.
    let pod_ip = eventually("the qwen pod Ready", Duration::from_secs(20), || async {
        let out = c.kubectl(
            &[
                "-n",
                "llm",
                "get",
                "pods",
                "-l",
                "app=qwen3-8b",
                "-o",
                "jsonpath={.items[0].status.podIP}",
            ],
            None,
        );
        (!out.trim().is_empty()).then(|| out.trim().to_string())
    })
    .await;
    // Picked by the real binary's ext_proc listener, as Envoy would ask.
    let pick = eventually("a pick for qwen3-8b", Duration::from_secs(20), || async {
        picked_endpoint(&ip, "qwen3-8b").await.ok()
    })
    .await;
    assert_eq!(pick, format!("{pod_ip}:8000"));
    // A model no pool serves is refused with the OpenAI error, not picked.
    let e = picked_endpoint(&ip, "llama-3-8b").await.unwrap_err();
    assert!(
        e.contains("NotFound") && e.contains("model_not_found"),
        "{e}"
    );
    // It scales the Deployment found from the pool's annotation: a new
    // floor on the pool is written to the Deployment through /scale.
    c.kubectl(
        &[
            "-n",
            "llm",
            "annotate",
            "--overwrite",
            "inferencepool/qwen3-8b",
            "scalecar.io/min-replicas=2",
        ],
        None,
    );
    eventually("qwen3-8b scaled to 2", Duration::from_secs(20), || async {
        let n = c.kubectl(
            &[
                "-n",
                "llm",
                "get",
                "deploy/qwen3-8b",
                "-o",
                "jsonpath={.spec.replicas}",
            ],
            None,
        );
        (n.trim() == "2").then_some(())
    })
    .await;
    c.rbac_is_what_the_gateway_uses().await;
    c.stop().await;
}
