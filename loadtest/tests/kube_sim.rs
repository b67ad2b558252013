//! kube-sim against the real clients: `kubectl` 1.32 through the
//! kubeconfig kube-sim writes, and kube-rs 5 (typed and dynamic APIs,
//! watcher + reflector, the scale subresource, the event recorder).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use scalecar_loadtest::kube_sim::{Fault, KubeSim, KubeSimConfig, Rule};
use serde_json::{Value, json};

async fn start(config: KubeSimConfig) -> (KubeSim, PathBuf) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = KubeSim::start(config, listener).unwrap();
    let path = std::env::temp_dir().join(format!(
        "kube-sim-{}-{}.yaml",
        std::process::id(),
        sim.addr().port()
    ));
    sim.write_kubeconfig(&path).unwrap();
    (sim, path)
}

/// `kubectl ARGS` with the kube-sim kubeconfig; stdout, or a panic with
/// stderr.
async fn kubectl(config: &PathBuf, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.env("KUBECONFIG", config)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl is installed on these machines");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut s = child.stdin.take().unwrap();
        s.write_all(input.as_bytes()).await.unwrap();
        drop(s);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kubectl finished")
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: llama
  labels: {app: llama}
spec:
  replicas: 1
  selector:
    matchLabels: {app: llama}
  template:
    metadata:
      labels: {app: llama}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: vllm
        image: vllm/vllm-openai:latest
        args: ["--model", "llama-3-8b", "--port", "8000", "--startup-delay", "300ms"]
        ports: [{name: http, containerPort: 8000}]
---
apiVersion: v1
kind: Service
metadata:
  name: llama
spec:
  selector: {app: llama}
  ports: [{name: http, port: 80, targetPort: 8000}]
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: scalecar-leader
spec:
  holderIdentity: gateway-0
  leaseDurationSeconds: 15
"#;

async fn pods_json(config: &PathBuf) -> Value {
    serde_json::from_str(&kubectl(config, &["get", "pods", "-o", "json"], None).await).unwrap()
}

fn ready_ips(pods: &Value) -> Vec<String> {
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .filter_map(|p| p["status"]["podIP"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_a_deployment_through_its_life() {
    let (sim, config) = start(KubeSimConfig::default()).await;
    let out = kubectl(
        &config,
        &["apply", "--validate=false", "-f", "-"],
        Some(DEPLOYMENT),
    )
    .await;
    assert!(out.contains("deployment.apps/llama created"), "{out}");
    assert!(
        out.contains("lease.coordination.k8s.io/scalecar-leader created"),
        "{out}"
    );
    // Applying the same file again changes nothing.
    let out = kubectl(
        &config,
        &["apply", "--validate=false", "-f", "-"],
        Some(DEPLOYMENT),
    )
    .await;
    assert!(
        out.contains("deployment.apps/llama unchanged")
            || out.contains("deployment.apps/llama configured"),
        "{out}"
    );
    let wide = kubectl(&config, &["get", "deploy,po", "-o", "wide"], None).await;
    assert!(wide.contains("llama"), "{wide}");

    // Scale: three pods, each Ready after its start-up delay, each on its
    // own address, each a model-sim answering there.
    kubectl(&config, &["scale", "deploy/llama", "--replicas=3"], None).await;
    eventually("3 ready pods", || {
        let config = config.clone();
        async move { ready_ips(&pods_json(&config).await).len() == 3 }
    })
    .await;
    let ips = ready_ips(&pods_json(&config).await);
    // kubectl prints the server's table: readiness, status and, wide, IPs.
    let wide = kubectl(&config, &["get", "po", "-o", "wide"], None).await;
    assert!(wide.contains("READY") && wide.contains("IP"), "{wide}");
    for ip in &ips {
        assert!(
            wide.lines()
                .any(|l| l.contains(ip.as_str()) && l.contains("1/1") && l.contains("Running")),
            "{ip} in\n{wide}"
        );
    }
    let mut distinct = ips.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{ips:?}");
    for ip in &ips {
        let mut s = tokio::net::TcpStream::connect(format!("{ip}:8000"))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.contains("llama-3-8b"), "{ip}: {body}");
    }
    let deploy: Value =
        serde_json::from_str(&kubectl(&config, &["get", "deploy/llama", "-o", "json"], None).await)
            .unwrap();
    assert_eq!(deploy["status"]["readyReplicas"], 3, "{deploy}");
    assert_eq!(deploy["metadata"]["generation"], 2);
    // The Service's EndpointSlice lists the ready pods.
    eventually("the EndpointSlice has 3 ready endpoints", || {
        let config = config.clone();
        async move {
            let s: Value = serde_json::from_str(
                &kubectl(
                    &config,
                    &[
                        "get",
                        "endpointslices",
                        "-l",
                        "kubernetes.io/service-name=llama",
                        "-o",
                        "json",
                    ],
                    None,
                )
                .await,
            )
            .unwrap();
            s["items"][0]["endpoints"].as_array().is_some_and(|e| {
                e.iter()
                    .filter(|e| e["conditions"]["ready"] == true)
                    .count()
                    == 3
            })
        }
    })
    .await;

    // Annotate and label, watched as it happens.
    let mut watch = tokio::process::Command::new("kubectl")
        .env("KUBECONFIG", &config)
        .args([
            "get",
            "deploy/llama",
            "--watch",
            "-o",
            "jsonpath={.metadata.annotations.scalecar\\.io/model}{\"\\n\"}",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    kubectl(
        &config,
        &["annotate", "deploy/llama", "scalecar.io/model=llama-3-8b"],
        None,
    )
    .await;
    kubectl(&config, &["label", "deploy/llama", "tier=gpu"], None).await;
    {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(l) = lines.next_line().await.unwrap() {
                if l.trim() == "llama-3-8b" {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the watch printed the change");
        assert!(seen);
    }
    drop(watch);
    let labels = kubectl(
        &config,
        &["get", "deploy", "-l", "tier=gpu", "-o", "name"],
        None,
    )
    .await;
    assert_eq!(labels.trim(), "deployment.apps/llama");

    // Events and leases.
    let events = kubectl(
        &config,
        &[
            "get",
            "events",
            "-o",
            "custom-columns=REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message",
        ],
        None,
    )
    .await;
    assert!(
        events.contains("ScalingReplicaSet") && events.contains("Scaled llama to 3"),
        "{events}"
    );
    let leases = kubectl(
        &config,
        &[
            "get",
            "lease",
            "-o",
            "custom-columns=NAME:.metadata.name,HOLDER:.spec.holderIdentity",
        ],
        None,
    )
    .await;
    assert!(
        leases.contains("scalecar-leader") && leases.contains("gateway-0"),
        "{leases}"
    );

    // Delete: the pods terminate (drain), then vanish.
    kubectl(&config, &["delete", "deploy/llama", "--wait=true"], None).await;
    eventually("no pods left", || {
        let config = config.clone();
        async move {
            pods_json(&config).await["items"]
                .as_array()
                .unwrap()
                .is_empty()
        }
    })
    .await;
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

async fn client(sim: &KubeSim) -> kube::Client {
    let config = kube::Config::new(sim.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_typed_api_patches_and_optimistic_concurrency() {
    // No controllers: nothing else writes the objects between our reads
    // and writes.
    let (sim, _) = start(KubeSimConfig {
        controllers: false,
        ..KubeSimConfig::default()
    })
    .await;
    let c = client(&sim).await;
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("a", 1))
        .await
        .unwrap();
    deploys
        .create(&PostParams::default(), &deployment("b", 2))
        .await
        .unwrap();
    let err = deploys
        .create(&PostParams::default(), &deployment("a", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err}"
    );
    let list = deploys
        .list(&ListParams::default().labels("app=b"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    // Pages.
    let page = deploys.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    let rest = deploys
        .list(
            &ListParams::default()
                .limit(1)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(rest.items[0].metadata.name.as_deref(), Some("b"));
    // Merge and strategic patches.
    let patched = deploys
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"scalecar.io/model": "a"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.metadata.annotations.unwrap()["scalecar.io/model"],
        "a"
    );
    let patched = deploys
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().replicas, Some(4));
    assert_eq!(patched.metadata.generation, Some(2));
    // Server-side apply of spec.replicas.
    let applied = deploys
        .patch("a", &PatchParams::apply("scalecar").force(), &Patch::Apply(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"}, "spec": {"replicas": 2}})))
        .await
        .unwrap();
    assert_eq!(applied.spec.as_ref().unwrap().replicas, Some(2));
    assert!(
        applied
            .metadata
            .managed_fields
            .unwrap()
            .iter()
            .any(|m| m.manager.as_deref() == Some("scalecar"))
    );
    // A stale update is a 409 Conflict.
    let current = deploys.get("a").await.unwrap();
    let mut first = current.clone();
    first.spec.as_mut().unwrap().replicas = Some(5);
    deploys
        .replace("a", &PostParams::default(), &first)
        .await
        .unwrap();
    let mut stale = current;
    stale.spec.as_mut().unwrap().replicas = Some(6);
    let err = deploys
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err}"
    );
    // The scale subresource of a Deployment.
    let scale = deploys.get_scale("a").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(5));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=a"));
    let err = deploys.get("nope").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err}"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_kinds_scale_and_fall_back() {
    let (sim, _) = start(KubeSimConfig::default()).await;
    let c = client(&sim).await;
    let with_scale = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("serving.example.com", "v1", "ModelServer"),
        "modelservers",
    );
    let servers: Api<DynamicObject> = Api::namespaced_with(c.clone(), "default", &with_scale);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "serving.example.com/v1", "kind": "ModelServer",
        "metadata": {"name": "qwen"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "qwen"}},
                 "template": {"metadata": {"labels": {"app": "qwen"}},
                              "spec": {"containers": [{"name": "c", "image": "x", "args": ["--model", "qwen"]}]}}}
    }))
    .unwrap();
    servers.create(&PostParams::default(), &obj).await.unwrap();
    let scale = servers.get_scale("qwen").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    servers
        .patch_scale(
            "qwen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    eventually("3 qwen pods ready", || {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels("app=qwen"))
                .await
                .unwrap()
                .items
                .iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
                .count()
                == 3
        }
    })
    .await;
    let scale = servers.get_scale("qwen").await.unwrap();
    assert_eq!(scale.status.unwrap().replicas, 3);
    // Without a scale subresource: 404, and spec.replicas is patched.
    let without = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("serving.example.com", "v1", "ModelBackend"),
        "modelbackends",
    );
    let backends: Api<DynamicObject> = Api::namespaced_with(c.clone(), "default", &without);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "serving.example.com/v1", "kind": "ModelBackend",
        "metadata": {"name": "tiny"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "tiny"}},
                 "template": {"metadata": {"labels": {"app": "tiny"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}
    }))
    .unwrap();
    backends.create(&PostParams::default(), &obj).await.unwrap();
    let err = backends.get_scale("tiny").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err}"
    );
    let patched = backends
        .patch(
            "tiny",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["replicas"], 2);
    eventually("2 tiny pods", || {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels("app=tiny"))
                .await
                .unwrap()
                .items
                .len()
                == 2
        }
    })
    .await;
    // Discovery finds both kinds, and which one has /scale.
    let discovery = kube::Discovery::new(c.clone()).run().await.unwrap();
    let group = discovery.get("serving.example.com").unwrap();
    let kinds: Vec<String> = group
        .recommended_resources()
        .into_iter()
        .map(|(r, _)| r.kind)
        .collect();
    assert!(
        kinds.contains(&"ModelServer".to_string()) && kinds.contains(&"ModelBackend".to_string()),
        "{kinds:?}"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_survives_dropped_watches_and_a_410() {
    // A short history, and watches cut every second.
    let (sim, _) = start(KubeSimConfig {
        history: 20,
        controllers: false,
        ..KubeSimConfig::default()
    })
    .await;
    sim.faults()
        .set_drop_watches_after(Some(Duration::from_secs(1)));
    let c = client(&sim).await;
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), "default");
    let (reader, writer) = reflector::store();
    let stream = watcher(deploys.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    let task = tokio::spawn(async move {
        use futures_util::StreamExt;
        futures_util::pin_mut!(stream);
        while stream.next().await.is_some() {}
    });
    for i in 0..5 {
        deploys
            .create(&PostParams::default(), &deployment(&format!("d{i}"), 1))
            .await
            .unwrap();
    }
    eventually("5 in the reflector", || {
        let n = reader.state().len();
        async move { n == 5 }
    })
    .await;
    // Watches fail for a while; meanwhile more changes than the history
    // keeps: the watcher's resume version is compacted away (410), and it
    // must list again.
    let lists_before = sim
        .requests()
        .iter()
        .filter(|r| r.uri.contains("/deployments") && !r.uri.contains("watch="))
        .count();
    sim.faults().add(Rule {
        verb: Some("watch".into()),
        resource: Some("deployments".into()),
        rate: 1.0,
        fault: Fault::Error(500),
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 5..40 {
        deploys
            .create(&PostParams::default(), &deployment(&format!("d{i}"), 1))
            .await
            .unwrap();
    }
    for i in 0..10 {
        deploys
            .delete(&format!("d{i}"), &Default::default())
            .await
            .unwrap();
    }
    sim.faults().clear();
    sim.faults()
        .set_drop_watches_after(Some(Duration::from_secs(1)));
    let want: Vec<String> = {
        let mut v: Vec<String> = deploys
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|d| d.metadata.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(want.len(), 30);
    eventually("the reflector equals the list", || {
        let mut got: Vec<String> = reader
            .state()
            .iter()
            .filter_map(|d| d.metadata.name.clone())
            .collect();
        got.sort();
        let ok = got == want;
        async move { ok }
    })
    .await;
    let requests = sim.requests();
    let lists_after = requests
        .iter()
        .filter(|r| r.uri.contains("/deployments") && !r.uri.contains("watch="))
        .count();
    assert!(
        sim.expired_watches() >= 1,
        "the watcher's resume version was never compacted away"
    );
    assert!(
        lists_after > lists_before,
        "the watcher listed again after the 410"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.uri.contains("watch=") && r.status == 500),
        "the injected watch failures were served"
    );
    task.abort();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_recorder_writes_what_kubectl_shows() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (sim, config) = start(KubeSimConfig::default()).await;
    let c = client(&sim).await;
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), "default");
    let d = deploys
        .create(&PostParams::default(), &deployment("llama", 1))
        .await
        .unwrap();
    let recorder = Recorder::new(
        c.clone(),
        Reporter {
            controller: "scalecar".into(),
            instance: Some("scalecar-0".into()),
        },
    );
    use kube::Resource;
    recorder
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: "SuccessfulRescale".into(),
                note: Some("New size: 3; reason: concurrency above target".into()),
                action: "Scale".into(),
                secondary: None,
            },
            &d.object_ref(&()),
        )
        .await
        .unwrap();
    let shown = kubectl(
        &config,
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=llama",
            "-o",
            "custom-columns=REASON:.reason,FROM:.source.component,MESSAGE:.message",
        ],
        None,
    )
    .await;
    assert!(
        shown.contains("SuccessfulRescale")
            && shown.contains("scalecar")
            && shown.contains("New size: 3"),
        "{shown}"
    );
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kustomize_base_renders_and_applies() {
    let (sim, config) = start(KubeSimConfig::default()).await;
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base");
    let rendered = kubectl(&config, &["kustomize", base.to_str().unwrap()], None).await;
    let out = kubectl(
        &config,
        &["apply", "--validate=false", "-f", "-"],
        Some(&rendered),
    )
    .await;
    for what in [
        "namespace/scalecar created",
        "serviceaccount/scalecar created",
        "clusterrole.rbac.authorization.k8s.io/scalecar created",
        "configmap/scalecar created",
        "deployment.apps/scalecar created",
        "poddisruptionbudget.policy/scalecar created",
        "service/scalecar-admin created",
    ] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }
    assert!(!out.contains("servicemonitor"), "{out}");
    // The gateway's pod runs (its container serves no model: ready at once).
    eventually("the gateway deployment is ready", || {
        let config = config.clone();
        async move {
            let d: Value = serde_json::from_str(
                &kubectl(
                    &config,
                    &["-n", "scalecar", "get", "deploy/scalecar", "-o", "json"],
                    None,
                )
                .await,
            )
            .unwrap();
            d["status"]["readyReplicas"] == 1
        }
    })
    .await;
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_injected_and_lifted() {
    let (sim, config) = start(KubeSimConfig {
        controllers: false,
        ..KubeSimConfig::default()
    })
    .await;
    let crds = kubectl(&config, &["get", "crd", "-o", "name"], None).await;
    assert!(crds.contains("modelservers.serving.example.com"), "{crds}");
    let c = client(&sim).await;
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("a", 1))
        .await
        .unwrap();
    // Through the admin API, as a test harness in another process would.
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let set = |body: &'static str| {
        let http = http.clone();
        let url = format!("{}/kube-sim/faults", sim.url());
        async move {
            let req = hyper::Request::post(url)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = http.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    set(r#"{"rules": [{"verb": "patch", "resource": "deployments", "error": 500}]}"#).await;
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        deploys.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        ),
    )
    .await
    .expect("answered")
    .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 500),
        "{err}"
    );
    deploys.get("a").await.unwrap();
    set(r#"{"rules": [{"verb": "get", "latency": "300ms"}], "refuseFor": "500ms"}"#).await;
    // Refused connections: a new connection is closed at once.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed, not hanging")
            .unwrap_or(0);
        assert_eq!(n, 0, "a refused connection answered");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t = Instant::now();
    deploys.get("a").await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "no latency added: {:?}",
        t.elapsed()
    );
    set(r#"{}"#).await;
    deploys
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    // The request log, for a harness in another process: who asked what,
    // and how long ago.
    let resp = http
        .get(format!("{}/kube-sim/requests", sim.url()).parse().unwrap())
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let log: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let patches: Vec<&Value> = log
        .iter()
        .filter(|r| {
            r["method"] == "PATCH"
                && r["uri"]
                    .as_str()
                    .is_some_and(|u| u.contains("/deployments/a"))
        })
        .collect();
    assert_eq!(patches.len(), 2, "{patches:?}");
    let (failed, last) = (patches[0], patches[1]);
    assert_eq!(
        (failed["status"].as_u64(), last["status"].as_u64()),
        (Some(500), Some(200))
    );
    assert!(last["user_agent"].is_string(), "{last}");
    assert!(
        failed["age_ms"].as_u64() >= Some(600) && last["age_ms"].as_u64() < Some(600),
        "ages: {failed} {last}"
    );
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badly_shaped_objects_get_errors_and_the_controllers_keep_going() {
    let (sim, _) = start(KubeSimConfig::default()).await;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let send = |method: &str, path: &str, ct: &str, body: &str| {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", sim.url()))
            .header("content-type", ct)
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let http = http.clone();
        async move { http.request(req).await.unwrap().status().as_u16() }
    };
    let deployments = "/apis/apps/v1/namespaces/default/deployments";
    // Server-side apply of something that is not an object: 400, no panic.
    assert_eq!(
        send(
            "PATCH",
            &format!("{deployments}/x"),
            "application/apply-patch+yaml",
            "[1, 2]"
        )
        .await,
        400
    );
    assert_eq!(
        send("POST", deployments, "application/json", "\"a string\"").await,
        400
    );
    assert_eq!(
        send("POST", deployments, "application/json", "{not json").await,
        400
    );
    // A workload whose template labels and spec are the wrong shape, and a
    // pod status a client wrote as a number: the controllers carry on.
    let odd = json!({"metadata": {"name": "odd"}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "odd"}},
        "template": {"metadata": {"labels": "oops"}, "spec": 5}}});
    assert_eq!(
        send("POST", deployments, "application/json", &odd.to_string()).await,
        201
    );
    let c = client(&sim).await;
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("fine", 2))
        .await
        .unwrap();
    eventually("the well-formed deployment's pods are ready", || {
        let deploys = deploys.clone();
        async move {
            deploys
                .get("fine")
                .await
                .ok()
                .and_then(|d| d.status)
                .and_then(|s| s.ready_replicas)
                == Some(2)
        }
    })
    .await;
    sim.shutdown().await;
}

/// As a kubelet: a Pod whose Secret is missing does not start — its
/// container waits in CreateContainerConfigError with the kubelet's Event —
/// and starts once the Secret is created; a missing ConfigMap volume keeps
/// it in ContainerCreating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_wait_for_the_secrets_and_config_maps_they_name() {
    let (sim, config) = start(KubeSimConfig::default()).await;
    let app = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: needs-token}
spec:
  replicas: 1
  selector: {matchLabels: {app: needs-token}}
  template:
    metadata: {labels: {app: needs-token}}
    spec:
      containers:
        - name: app
          image: example/app:1
          env:
            - name: TOKEN
              valueFrom: {secretKeyRef: {name: app-token, key: token}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: needs-config}
spec:
  replicas: 1
  selector: {matchLabels: {app: needs-config}}
  template:
    metadata: {labels: {app: needs-config}}
    spec:
      containers: [{name: app, image: example/app:1}]
      volumes: [{name: config, configMap: {name: app-config}}]
"#;
    kubectl(
        &config,
        &["apply", "--validate=false", "-f", "-"],
        Some(app),
    )
    .await;
    let status = |label: &'static str| {
        let config = config.clone();
        async move {
            kubectl(
                &config,
                &["get", "pods", "-l", label, "--no-headers", "-o", "custom-columns=S:.status.containerStatuses[0].state.waiting.reason,R:.status.conditions[?(@.type==\"Ready\")].status"],
                None,
            )
            .await
        }
    };
    eventually("the pod waits for its Secret", || {
        let s = status("app=needs-token");
        async move { s.await.contains("CreateContainerConfigError") }
    })
    .await;
    eventually("the pod waits for its volume", || {
        let s = status("app=needs-config");
        async move { s.await.contains("ContainerCreating") }
    })
    .await;
    // kubectl shows it as users know it, and the kubelet's Events say why.
    let pods = kubectl(&config, &["get", "pods", "-l", "app=needs-token"], None).await;
    assert!(
        pods.contains("CreateContainerConfigError") && pods.contains("0/1"),
        "{pods}"
    );
    let events = kubectl(
        &config,
        &[
            "get",
            "events",
            "-o",
            "custom-columns=T:.type,R:.reason,M:.message",
            "--no-headers",
        ],
        None,
    )
    .await;
    assert!(
        events.contains("Warning   Failed   Error: secret \"app-token\" not found")
            || (events.contains("Failed")
                && events.contains("Error: secret \"app-token\" not found")),
        "{events}"
    );
    assert!(
        events.contains("FailedMount") && events.contains("configmap \"app-config\" not found"),
        "{events}"
    );
    let deploy = kubectl(
        &config,
        &[
            "get",
            "deploy/needs-token",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
        None,
    )
    .await;
    assert!(deploy.is_empty() || deploy == "0", "ready: {deploy}");
    // Created (kubectl create renders, apply sends JSON): the kubelet
    // retries and the pods start.
    for what in [
        &[
            "create",
            "secret",
            "generic",
            "app-token",
            "--from-literal=token=s3cret",
        ][..],
        &["create", "configmap", "app-config", "--from-literal=a=1"][..],
    ] {
        let mut args = what.to_vec();
        args.extend(["--dry-run=client", "-o", "yaml"]);
        let object = kubectl(&config, &args, None).await;
        kubectl(
            &config,
            &["apply", "--validate=false", "-f", "-"],
            Some(&object),
        )
        .await;
    }
    for label in ["app=needs-token", "app=needs-config"] {
        eventually("the pod starts once what it names exists", || {
            let s = status(label);
            async move {
                let s = s.await;
                s.contains("True") && !s.contains("Error") && !s.contains("Creating")
            }
        })
        .await;
    }
    let _ = std::fs::remove_file(&config);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_pools_are_served_as_the_inference_extension_defines_them() {
    let (_sim, config) = start(KubeSimConfig::default()).await;
    let pool = r#"apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: llama
  annotations: { scalecar.io/model: llama-3-8b }
spec:
  selector: { matchLabels: { app: llama } }
  targetPorts: [{ number: 8000 }]
  endpointPickerRef: { name: scalecar, port: { number: 9002 } }
"#;
    let out = kubectl(
        &config,
        &["apply", "--validate=false", "-f", "-"],
        Some(pool),
    )
    .await;
    assert!(
        out.contains("inferencepool.inference.networking.k8s.io/llama created"),
        "{out}"
    );
    // Discovery lists the kind, and its short name resolves.
    let resources = kubectl(
        &config,
        &["api-resources", "--api-group=inference.networking.k8s.io"],
        None,
    )
    .await;
    assert!(
        resources.contains("inferencepools") && resources.contains("infpool"),
        "{resources}"
    );
    let got = kubectl(
        &config,
        &[
            "get",
            "infpool",
            "llama",
            "-o",
            "jsonpath={.spec.endpointPickerRef.name} {.spec.targetPorts[0].number}",
        ],
        None,
    )
    .await;
    assert_eq!(got.trim(), "scalecar 8000");
}
