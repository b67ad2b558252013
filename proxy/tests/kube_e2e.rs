//! scalecar in a cluster, end to end: a kube-sim whose pods are model-sims,
//! scalecar started from a `kubernetes:` config through a kubeconfig (the
//! real kube-rs client), requests through the real proxy, and the cluster
//! read back through the API — and through kubectl where users would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::{get, metric, pools, proxy, request, teardown};
use futures_util::StreamExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use scalecar_loadtest::kube_sim::{Fault, KubeSim, KubeSimConfig, Rule};
use scalecar_proxy::server::ProxyHandle;
use serde_json::{Value, json};

/// A kube-sim with its controllers, a client and a kubeconfig file.
struct Cluster {
    sim: KubeSim,
    client: kube::Client,
    kubeconfig: PathBuf,
}

impl Cluster {
    async fn start() -> Cluster {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = KubeSim::start(
            KubeSimConfig {
                controllers: true,
                ..KubeSimConfig::default()
            },
            listener,
        )
        .unwrap();
        let client = kube::Client::try_from(kube::Config::new(sim.url().parse().unwrap())).unwrap();
        let kubeconfig = std::env::temp_dir().join(format!(
            "scalecar-e2e-{}-{}.kubeconfig",
            std::process::id(),
            sim.addr().port()
        ));
        sim.write_kubeconfig(&kubeconfig).unwrap();
        Cluster {
            sim,
            client,
            kubeconfig,
        }
    }

    /// scalecar on this cluster, ticking every `tick`.
    async fn scalecar(&self, tick: &str, extra: &str) -> ProxyHandle {
        proxy(&format!(
            "scaler: {{ tick: {tick} }}\nlimits: {{ activation-timeout: 30s, queue-wait: 30s }}\nkubernetes:\n  kubeconfig: {}\n  namespaces: [default]\n  api-timeout: 2s\n{extra}",
            self.kubeconfig.display()
        ))
        .await
    }

    fn api(&self, group: &str, version: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            "default",
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            ),
        )
    }

    fn deployments(&self) -> Api<DynamicObject> {
        self.api("apps", "v1", "Deployment", "deployments")
    }

    async fn create(&self, api: &Api<DynamicObject>, object: Value) {
        let o: DynamicObject = serde_json::from_value(object).unwrap();
        api.create(&PostParams::default(), &o).await.unwrap();
    }

    async fn annotate(&self, api: &Api<DynamicObject>, name: &str, annotations: Value) {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap();
    }

    async fn replicas(&self, api: &Api<DynamicObject>, name: &str) -> u64 {
        let o = api.get(name).await.unwrap();
        o.data["spec"]["replicas"].as_u64().unwrap_or(1)
    }

    /// `kubectl` against this cluster.
    fn kubectl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes through a scale path (a PATCH whose URI contains `path`).
    fn writes(&self, path: &str) -> usize {
        self.sim
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.uri.contains(path))
            .count()
    }

    async fn stop(self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
        self.sim.shutdown().await;
    }
}

/// A workload of model-sim pods, as users write a vLLM Deployment.
fn workload(
    api_version: &str,
    kind: &str,
    name: &str,
    model: &str,
    replicas: u32,
    annotations: Value,
    extra_args: &[&str],
) -> Value {
    let mut args = vec!["--port", "8000", "--startup-delay", "300ms"];
    args.extend_from_slice(extra_args);
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "vllm", "image": "vllm/vllm-openai",
                        "command": ["vllm", "serve", model], "args": args,
                        "ports": [{"name": "http", "containerPort": 8000}]
                    }]
                }
            }
        }
    })
}

/// `spec.replicas` as stored, read past the API (and its faults).
fn stored_replicas(c: &Cluster, name: &str) -> u64 {
    let rt = scalecar_loadtest::kube_sim::resources::by_kind("apps/v1", "Deployment").unwrap();
    c.sim
        .store()
        .get(rt, "default", name)
        .ok()
        .and_then(|o| o.pointer("/spec/replicas").and_then(Value::as_u64))
        .unwrap_or(0)
}

/// The most replicas `name` was asked for while polled for up to 8 s,
/// stopping early once it reached `want`.
async fn peak_replicas(c: &Cluster, d: &Api<DynamicObject>, name: &str, want: u64) -> u64 {
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until && peak < want {
        peak = peak.max(c.replicas(d, name).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

/// Polls `f` until it gives a value; fails naming `what` after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The endpoints of `model`'s pool in `role`, as the admin server shows
/// them (`None`: no such pool).
async fn endpoints(p: &ProxyHandle, model: &str, role: &str) -> Option<Vec<Value>> {
    let v = pools(p).await;
    v["pools"]
        .as_array()?
        .iter()
        .find(|x| x["model"] == model && x["role"] == role)
        .map(|x| x["endpoints"].as_array().cloned().unwrap_or_default())
}

fn openai(p: &ProxyHandle) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", p.proxy_addr))
            .with_api_key("none"),
    )
}

/// One streamed chat completion through `client`; the text.
async fn chat(client: &Client<OpenAIConfig>, model: &str, prompt: &str, max_tokens: u32) -> String {
    let req = CreateChatCompletionRequestArgs::default()
        .model(model)
        .max_completion_tokens(max_tokens)
        .stream(true)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(prompt)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let mut s = client.chat().create_stream(req).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = s.next().await {
        for c in chunk.unwrap().choices {
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
        }
    }
    text
}

/// Prompt tokens each ready pod of `app` served (its model-sim's own
/// counter), by pod IP.
async fn served_by_pods(c: &Cluster, app: &str) -> BTreeMap<String, f64> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client.clone(), "default");
    let list = pods
        .list(&kube::api::ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for p in list.items {
        let Some(ip) = p.status.and_then(|s| s.pod_ip) else {
            continue;
        };
        let Ok((200, text)) = get(&format!("http://{ip}:8000/metrics")).await else {
            continue;
        };
        let n: f64 = text
            .lines()
            .filter(|l| l.starts_with("vllm:prompt_tokens"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        out.insert(ip, n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_annotated_deployment_is_routed_scaled_by_a_burst_and_back_to_min() {
    // Measured on an idle 2-core box: the pool 330–400 ms after the
    // annotation, the first write 100–200 ms after the burst began.
    const TICK: Duration = Duration::from_secs(1);
    let c = Cluster::start().await;
    let d = c.deployments();
    // Not annotated yet: nothing is routed.
    c.create(
        &d,
        workload("apps/v1", "Deployment", "llama", "m", 1, json!({}), &[]),
    )
    .await;
    let p = c.scalecar("1s", "").await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let (status, _, _) = request("POST", &url, body).await.unwrap();
    assert_eq!(status, 404, "an unannotated workload is not routed");

    // Annotated: a pool within a tick, its ready pod its endpoint.
    let annotated = Instant::now();
    c.annotate(
        &d,
        "llama",
        json!({"scalecar.io/algorithm": "kpa", "scalecar.io/model": "m", "scalecar.io/target": "2", "scalecar.io/min-replicas": "1",
               "scalecar.io/max-replicas": "4", "scalecar.io/window": "6s",
               "scalecar.io/panic-window-percentage": "34", "scalecar.io/scale-down-delay": "0s"}),
    )
    .await;
    eventually("a pool with the pod", Duration::from_secs(10), || async {
        endpoints(&p, "m", "unified").await.filter(|e| e.len() == 1)
    })
    .await;
    assert!(
        annotated.elapsed() < TICK,
        "the pool came {:?} after the annotation",
        annotated.elapsed()
    );

    // A burst: 16 streams at once on a pool sized for 2 a pod.
    let client = openai(&p);
    let writes_before = c.writes("/deployments/llama/scale");
    let burst_at = Instant::now();
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { chat(&client, "m", "why scale in the proxy?", 120).await })
        })
        .collect();
    eventually(
        "a write through /scale",
        Duration::from_secs(10),
        || async { (c.writes("/deployments/llama/scale") > writes_before).then_some(()) },
    )
    .await;
    let scaled_after = burst_at.elapsed();
    assert!(
        scaled_after <= 2 * TICK,
        "scaled {scaled_after:?} after the burst began: more than two ticks"
    );
    for b in burst {
        assert!(!b.await.unwrap().is_empty());
    }
    let up = c.replicas(&d, "llama").await;
    assert!((2..=4).contains(&up), "scaled to {up}");
    // The new pods come up and take traffic.
    eventually("every pod in the pool", Duration::from_secs(15), || async {
        endpoints(&p, "m", "unified")
            .await
            .filter(|e| e.len() as u64 == up)
    })
    .await;
    let wave: Vec<_> = (0..12)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { chat(&client, "m", "and again", 60).await })
        })
        .collect();
    for w in wave {
        w.await.unwrap();
    }
    let served = served_by_pods(&c, "llama").await;
    assert!(
        served.values().filter(|n| **n > 0.0).count() >= 2,
        "traffic reached only one pod: {served:?}"
    );

    // After the load: back to min-replicas.
    eventually("back to 1 replica", Duration::from_secs(40), || async {
        (c.replicas(&d, "llama").await == 1).then_some(())
    })
    .await;
    // Users see why, with kubectl.
    let events = eventually("rescale events", Duration::from_secs(5), || async {
        let out = c.kubectl(&["get", "events", "-n", "default"]);
        (out.matches("SuccessfulRescale").count() >= 2).then_some(out)
    })
    .await;
    assert!(events.contains("New size: 1; reason:"), "{events}");
    assert!(
        events.contains(&format!("New size: {up}; reason: concurrency")),
        "{events}"
    );
    assert!(
        metric(
            &p,
            "scalecar_scale_events_total{target=\"deployment/default/llama\",model=\"m\",role=\"unified\"}"
        )
        .await
            >= 2.0
    );
    // And scalecar status shows the same, from the admin port.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .args(["status", "--admin", &p.admin_addr.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Target:        deployment/default/llama",
        "Model:         m (unified)",
        "Scaling:       managed",
        "Algorithm:     kpa, metric concurrency",
        " ready, 1 spec, ",
        " → 1, ",
    ] {
        assert!(status.contains(want), "{want:?} missing from\n{status}");
    }
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_base_model_and_its_lora_adapters_are_one_workload_scaled_on_their_sum() {
    let c = Cluster::start().await;
    let d = c.deployments();
    // vLLM serving a base model and two adapters; the annotation names
    // all three. 2 requests a pod at 100 %.
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "base",
            "base",
            1,
            json!({"scalecar.io/algorithm": "kpa", "scalecar.io/model": "base, base-sql, base-chat",
                   "scalecar.io/target": "2", "scalecar.io/target-utilization-percentage": "100",
                   "scalecar.io/max-replicas": "10", "scalecar.io/window": "6s"}),
            &[
                "--enable-lora",
                "--lora-modules",
                "base-sql=/adapters/sql",
                "base-chat=/adapters/chat",
            ],
        ),
    )
    .await;
    let p = c.scalecar("500ms", "").await;
    // One pool, routed under every name.
    let pool = eventually("one pool with the pod", Duration::from_secs(10), || async {
        let v = pools(&p).await;
        let all = v["pools"].as_array()?.clone();
        let ready = all.len() == 1 && all[0]["endpoints"].as_array().is_some_and(|e| e.len() == 1);
        ready.then(|| all[0].clone())
    })
    .await;
    assert_eq!(pool["model"], "base");
    assert_eq!(pool["aliases"], json!(["base-chat", "base-sql"]));
    let client = openai(&p);
    for name in ["base", "base-sql", "base-chat"] {
        assert!(!chat(&client, name, "hello", 4).await.is_empty(), "{name}");
    }
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let other =
        r#"{"model":"base-math","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    let (status, _, _) = request("POST", &url, other).await.unwrap();
    assert_eq!(
        status, 404,
        "a name the annotation does not list is not routed"
    );

    // Measured per name: each adapter's requests under its own label;
    // the pool's gauges once, under the workload's first name.
    for name in ["base", "base-sql", "base-chat"] {
        let ok = metric(
            &p,
            &format!("scalecar_requests_total{{model=\"{name}\",role=\"unified\",outcome=\"ok\"}}"),
        )
        .await;
        assert_eq!(ok, 1.0, "{name}");
    }
    let (_, text) = get(&format!("http://{}/metrics", p.admin_addr))
        .await
        .unwrap();
    let gauges: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("scalecar_in_flight_requests{"))
        .collect();
    assert_eq!(gauges.len(), 1, "{gauges:?}");
    assert!(gauges[0].contains("model=\"base\""), "{gauges:?}");

    // Decided once, on the sum: 4 streams on each adapter and none on the
    // base need 4 pods; decided per name, each would ask for 2.
    let streams: Vec<_> = ["base-sql", "base-chat"]
        .into_iter()
        .flat_map(|name| {
            let client = client.clone();
            (0..4).map(move |_| {
                let client = client.clone();
                tokio::spawn(async move { chat(&client, name, "share the load", 400).await })
            })
        })
        .collect();
    let peak = peak_replicas(&c, &d, "base", 4).await;
    for s in streams {
        assert!(!s.await.unwrap().is_empty());
    }
    assert!(
        (4..=6).contains(&peak),
        "8 streams over two adapters scaled to {peak}, not 4"
    );
    let (_, targets) = get(&format!("http://{}/debug/targets", p.admin_addr))
        .await
        .unwrap();
    let targets: Value = serde_json::from_str(&targets).unwrap();
    let names: Vec<&str> = targets["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["deployment/default/base"],
        "one scale target: {targets}"
    );
    assert!(
        c.sim.requests().iter().all(|r| r.method != "PATCH"
            || !r.uri.contains("/scale")
            || r.uri.contains("/deployments/base/scale")),
        "only the workload's own /scale is written"
    );

    // An edit that drops an adapter stops routing it; the rest go on.
    c.annotate(&d, "base", json!({"scalecar.io/model": "base, base-sql"}))
        .await;
    let dropped =
        r#"{"model":"base-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    eventually(
        "base-chat no longer routed",
        Duration::from_secs(10),
        || async {
            let (status, _, _) = request("POST", &url, dropped).await.ok()?;
            (status == 404).then_some(())
        },
    )
    .await;
    assert!(!chat(&client, "base-sql", "still here", 4).await.is_empty());
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_kinds_scale_through_their_scale_subresource_or_their_spec() {
    let c = Cluster::start().await;
    let servers = c.api("serving.example.com", "v1", "ModelServer", "modelservers");
    let backends = c.api("serving.example.com", "v1", "ModelBackend", "modelbackends");
    // min-replicas 2 over 1 replica: the first tick scales both.
    let keys = |model: &str| json!({"scalecar.io/model": model, "scalecar.io/min-replicas": "2"});
    c.create(
        &servers,
        workload(
            "serving.example.com/v1",
            "ModelServer",
            "big",
            "big",
            1,
            keys("big"),
            &[],
        ),
    )
    .await;
    c.create(
        &backends,
        workload(
            "serving.example.com/v1",
            "ModelBackend",
            "small",
            "small",
            1,
            keys("small"),
            &[],
        ),
    )
    .await;
    let p = c
        .scalecar(
            "300ms",
            "  kinds:\n    - {group: serving.example.com, version: v1, kind: ModelServer}\n    - {group: serving.example.com, version: v1, kind: ModelBackend}\n",
        )
        .await;
    eventually("both scaled to 2", Duration::from_secs(15), || async {
        (c.replicas(&servers, "big").await == 2 && c.replicas(&backends, "small").await == 2)
            .then_some(())
    })
    .await;
    assert!(
        c.writes("/modelservers/big/scale") >= 1,
        "ModelServer through /scale"
    );
    assert_eq!(c.writes("/modelbackends/small/scale"), 0);
    assert!(
        c.writes("/modelbackends/small") >= 1,
        "ModelBackend through its spec"
    );
    // Both serve through the proxy once their pods are ready.
    for model in ["big", "small"] {
        eventually("two endpoints", Duration::from_secs(15), || async {
            endpoints(&p, model, "unified")
                .await
                .filter(|e| e.len() == 2)
        })
        .await;
        assert!(!chat(&openai(&p), model, "hello", 8).await.is_empty());
    }
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefill_decode_pair_is_one_route_and_long_prompts_scale_prefill_more() {
    let c = Cluster::start().await;
    let d = c.deployments();
    let keys = |role: &str| {
        json!({"scalecar.io/algorithm": "kpa", "scalecar.io/model": "pd", "scalecar.io/role": role, "scalecar.io/target": "1",
               "scalecar.io/max-replicas": "4", "scalecar.io/window": "6s",
               "scalecar.io/panic-window-percentage": "34"})
    };
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "pd-prefill",
            "pd",
            1,
            keys("prefill"),
            &["--role", "prefill"],
        ),
    )
    .await;
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "pd-decode",
            "pd",
            1,
            keys("decode"),
            &["--role", "decode"],
        ),
    )
    .await;
    let p = c.scalecar("500ms", "").await;
    for role in ["prefill", "decode"] {
        eventually("both pools", Duration::from_secs(10), || async {
            endpoints(&p, "pd", role).await.filter(|e| e.len() == 1)
        })
        .await;
    }
    // Long prompts, one token out: the prefill legs carry the work.
    let prompt = "lorem ipsum dolor sit amet ".repeat(2000);
    let client = openai(&p);
    let mut peak = (0, 0);
    let load: Vec<_> = (0..24)
        .map(|_| {
            let (client, prompt) = (client.clone(), prompt.clone());
            tokio::spawn(async move { chat(&client, "pd", &prompt, 1).await })
        })
        .collect();
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        peak.0 = peak.0.max(c.replicas(&d, "pd-prefill").await);
        peak.1 = peak.1.max(c.replicas(&d, "pd-decode").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for l in load {
        l.await.unwrap();
    }
    let ok = |role: &'static str| {
        let p = &p;
        async move {
            metric(
                p,
                &format!("scalecar_requests_total{{model=\"pd\",role=\"{role}\",outcome=\"ok\"}}"),
            )
            .await
        }
    };
    assert_eq!(
        ok("prefill").await,
        24.0,
        "every request took the prefill leg"
    );
    assert_eq!(ok("decode").await, 24.0, "and the decode leg");
    assert!(
        peak.0 > peak.1,
        "prefill peaked at {} replicas, decode at {}",
        peak.0,
        peak.1
    );
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_zero_replicas_is_held_until_a_pod_serves_it() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "sleepy",
            "sleepy",
            0,
            json!({"scalecar.io/model": "sleepy", "scalecar.io/min-replicas": "0"}),
            &[],
        ),
    )
    .await;
    let p = c.scalecar("2s", "").await;
    eventually("an empty pool", Duration::from_secs(10), || async {
        endpoints(&p, "sleepy", "unified")
            .await
            .filter(|e| e.is_empty())
    })
    .await;
    // The request waits at the proxy, which scales from zero at once (not
    // at the next tick) and answers once the pod is ready.
    let asked = Instant::now();
    let text = chat(&openai(&p), "sleepy", "wake up", 8).await;
    assert!(!text.is_empty());
    assert_eq!(c.replicas(&d, "sleepy").await, 1);
    assert!(c.writes("/deployments/sleepy/scale") >= 1);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        asked.elapsed()
    );
    assert_eq!(
        metric(
            &p,
            "scalecar_requests_total{model=\"sleepy\",role=\"unified\",outcome=\"ok\"}"
        )
        .await,
        1.0
    );
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_annotation_is_a_warning_event_and_left_alone_until_fixed() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "typo",
            "typo",
            1,
            json!({"scalecar.io/model": "typo", "scalecar.io/min-replicas": "2",
                   "scalecar.io/max-replicas": "lots"}),
            &[],
        ),
    )
    .await;
    let p = c.scalecar("300ms", "").await;
    let events = eventually("a warning event", Duration::from_secs(10), || async {
        let out = c.kubectl(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "type=Warning",
        ]);
        out.contains("InvalidAnnotation").then_some(out)
    })
    .await;
    assert!(events.contains("scalecar.io/max-replicas"), "{events}");
    // Left alone: not routed, not scaled (min-replicas 2 would scale it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.replicas(&d, "typo").await, 1);
    assert_eq!(c.writes("/deployments/typo/scale"), 0);
    assert!(endpoints(&p, "typo", "unified").await.is_none());
    // Fixed: routed and scaled to min-replicas.
    c.annotate(&d, "typo", json!({"scalecar.io/max-replicas": "3"}))
        .await;
    eventually("scaled to 2", Duration::from_secs(10), || async {
        (c.replicas(&d, "typo").await == 2).then_some(())
    })
    .await;
    assert!(!chat(&openai(&p), "typo", "fixed", 4).await.is_empty());
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_faults_never_stop_the_proxy_nor_scale_down_and_it_recovers() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "steady",
            "steady",
            2,
            json!({"scalecar.io/model": "steady", "scalecar.io/min-replicas": "1",
                   "scalecar.io/max-replicas": "3", "scalecar.io/target": "4",
                   "scalecar.io/window": "6s", "scalecar.io/scale-down-delay": "0s"}),
            &[],
        ),
    )
    .await;
    // Every write fails from the start: the idle pool wants 1 replica and
    // must not get there while no write succeeds.
    c.sim.faults().add(Rule {
        verb: Some("patch".into()),
        resource: None,
        rate: 1.0,
        fault: Fault::Error(500),
    });
    let p = c.scalecar("300ms", "").await;
    eventually("two endpoints", Duration::from_secs(10), || async {
        endpoints(&p, "steady", "unified")
            .await
            .filter(|e| e.len() == 2)
    })
    .await;
    let client = openai(&p);
    // And now reads are throttled or fail, and watches drop.
    for (verb, fault, rate) in [
        ("get", Fault::Error(429), 0.7),
        ("list", Fault::Error(503), 0.7),
        ("watch", Fault::Error(500), 0.7),
    ] {
        c.sim.faults().add(Rule {
            verb: Some(verb.into()),
            resource: None,
            rate,
            fault,
        });
    }
    c.sim
        .faults()
        .set_drop_watches_after(Some(Duration::from_millis(500)));
    let mut seen = Vec::new();
    // Idle through the faults: the loop would scale down to 1, but only a
    // write that succeeds may change anything — the proxy answers
    // throughout and the count stays in bounds.
    for _ in 0..10 {
        assert!(!chat(&client, "steady", "still there?", 4).await.is_empty());
        seen.push(stored_replicas(&c, "steady"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 30 s of refused connections: the proxy keeps serving what it knows.
    c.sim.faults().clear();
    c.sim.faults().refuse_for(Duration::from_secs(30));
    let refused_until = Instant::now() + Duration::from_secs(30);
    let load: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { chat(&client, "steady", "during the outage", 200).await })
        })
        .collect();
    while Instant::now() < refused_until {
        assert!(
            !chat(&client, "steady", "still serving?", 2)
                .await
                .is_empty()
        );
        seen.push(stored_replicas(&c, "steady"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for l in load {
        assert!(!l.await.unwrap().is_empty());
    }
    // Nothing changed while no write could succeed.
    assert!(
        seen.iter().all(|n| *n == 2),
        "replicas changed during the faults: {seen:?}"
    );
    // Recovery: the idle pool is scaled down to min once writes succeed.
    eventually(
        "scaled down after recovery",
        Duration::from_secs(40),
        || async { (c.replicas(&d, "steady").await == 1).then_some(()) },
    )
    .await;
    assert!(
        metric(
            &p,
            "scalecar_scale_errors_total{target=\"deployment/default/steady\",reason=\"unavailable\"}"
        )
        .await
            >= 1.0
    );
    // The failure is an Event too, once per distinct error, not per tick;
    // written during the outage, it lands once the writer's retry (at most
    // 10 s apart) meets the recovered API server.
    let items = eventually("a FailedRescale event", Duration::from_secs(20), || async {
        let failed = c.kubectl(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "reason=FailedRescale",
            "-o",
            "json",
        ]);
        let failed: Value = serde_json::from_str(&failed).ok()?;
        let items = failed["items"].as_array()?.clone();
        (!items.is_empty()).then_some(items)
    })
    .await;
    assert!(
        items.len() <= 6,
        "{} FailedRescale events for one outage",
        items.len()
    );
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminating_pod_gets_no_new_requests_and_finishes_its_streams() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "pair",
            "pair",
            2,
            json!({"scalecar.io/model": "pair", "scalecar.io/min-replicas": "2",
                   "scalecar.io/max-replicas": "2"}),
            &[],
        ),
    )
    .await;
    let p = c.scalecar("500ms", "").await;
    eventually("two endpoints", Duration::from_secs(10), || async {
        endpoints(&p, "pair", "unified")
            .await
            .filter(|e| e.len() == 2)
    })
    .await;
    // A long stream; find its pod.
    let client = openai(&p);
    let long = {
        let client = client.clone();
        tokio::spawn(async move { chat(&client, "pair", "a long answer please", 400).await })
    };
    let busy = eventually("the stream's endpoint", Duration::from_secs(5), || async {
        endpoints(&p, "pair", "unified").await.and_then(|e| {
            e.iter()
                .find(|x| x["outstanding"].as_u64() == Some(1))
                .map(|x| x["address"].as_str().unwrap().to_string())
        })
    })
    .await;
    let ip = busy.split(':').next().unwrap().to_string();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client.clone(), "default");
    let pod = pods
        .list(&kube::api::ListParams::default().labels("app=pair"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|x| x.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some(ip.as_str()))
        .unwrap();
    let name = pod.metadata.name.clone().unwrap();
    pods.delete(&name, &Default::default()).await.unwrap();
    // It leaves the pool while its stream goes on.
    eventually(
        "the pod out of the pool",
        Duration::from_secs(5),
        || async {
            endpoints(&p, "pair", "unified")
                .await
                .filter(|e| e.iter().all(|x| x["address"] != busy.as_str()))
        },
    )
    .await;
    assert!(
        !long.is_finished(),
        "the stream ended before the test could look"
    );
    let before = served_by_pods(&c, "pair").await.get(&ip).copied();
    for _ in 0..6 {
        chat(&client, "pair", "elsewhere", 2).await;
    }
    let after = served_by_pods(&c, "pair").await.get(&ip).copied();
    assert_eq!(before, after, "the Terminating pod got new requests");
    let text = long.await.unwrap();
    assert!(
        text.split_whitespace().count() > 100,
        "the stream was cut: {text}"
    );
    assert_eq!(
        metric(
            &p,
            "scalecar_requests_total{model=\"pair\",role=\"unified\",outcome=\"ok\"}"
        )
        .await,
        7.0
    );
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_annotation_removes_the_pool_and_stops_scaling() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "brief",
            "brief",
            1,
            json!({"scalecar.io/model": "brief", "scalecar.io/min-replicas": "1"}),
            &[],
        ),
    )
    .await;
    let p = c.scalecar("300ms", "").await;
    eventually("routed", Duration::from_secs(10), || async {
        endpoints(&p, "brief", "unified")
            .await
            .filter(|e| e.len() == 1)
    })
    .await;
    assert!(!chat(&openai(&p), "brief", "hi", 2).await.is_empty());
    // kubectl's way of removing an annotation.
    c.kubectl(&["annotate", "deployment", "brief", "scalecar.io/model-"]);
    eventually("the pool gone", Duration::from_secs(5), || async {
        endpoints(&p, "brief", "unified")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let (status, _, body) = request(
        "POST",
        &url,
        r#"{"model":"brief","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "{body}");
    // No longer scaled: someone else's count stays.
    c.kubectl(&["scale", "deployment", "brief", "--replicas=3"]);
    let writes = c.writes("/deployments/brief/scale");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.writes("/deployments/brief/scale"), writes);
    assert_eq!(c.replicas(&d, "brief").await, 3);
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

/// What an API request asks for, as RBAC sees it: (verb, group, resource
/// with subresource, namespace). `None` for discovery, which every
/// authenticated client may read.
fn rbac_request(method: &str, uri: &str) -> Option<(String, String, String, Option<String>)> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [] => return None,
        [r] => (*r, None, None),
        [r, n] => (*r, Some(*n), None),
        [r, n, s, ..] => (*r, Some(*n), Some(*s)),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, name) {
        ("GET", _) if watch => "watch",
        ("GET", Some(_)) => "get",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return None,
    };
    let resource = match sub {
        Some(s) => format!("{resource}/{s}"),
        None => resource.to_string(),
    };
    Some((verb.into(), group.into(), resource, namespace))
}

fn allows(rules: &[Value], verb: &str, group: &str, resource: &str) -> bool {
    let has = |r: &Value, key: &str, want: &str| {
        r[key]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == want || v == "*"))
    };
    rules.iter().any(|r| {
        has(r, "verbs", verb) && has(r, "apiGroups", group) && has(r, "resources", resource)
    })
}

/// Renders `dir` with kubectl and applies it to `c`, as a user installs it.
fn install(c: &Cluster, dir: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir);
    let rendered = c.kubectl(&["kustomize", path.to_str().unwrap()]);
    let mut child = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["apply", "--validate=false", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rendered.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs scalecar on `c` over an annotated Deployment (min 2) and an
/// invalid one in `namespace`, until it scaled, routed and evented; then
/// every call it made must be allowed by `rules` (and, for a Role, stay in
/// its namespace).
async fn every_call_is_allowed(
    c: &Cluster,
    namespace: &str,
    watch: &str,
    rules: &[Value],
    role_scoped: bool,
) {
    // The leader Lease's rights are the Role scalecar-leader's, in the
    // gateway's own namespace.
    let leader: Value = serde_json::from_str(&c.kubectl(&[
        "-n",
        "scalecar",
        "get",
        "role",
        "scalecar-leader",
        "-o",
        "json",
    ]))
    .unwrap();
    let leader_rules = leader["rules"].as_array().unwrap().clone();
    let d = Api::<DynamicObject>::namespaced_with(
        c.client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apps", "v1", "Deployment"),
            "deployments",
        ),
    );
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "granted",
            "granted",
            1,
            json!({"scalecar.io/model": "granted", "scalecar.io/min-replicas": "2"}),
            &[],
        ),
    )
    .await;
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "wrong",
            "wrong",
            1,
            json!({"scalecar.io/model": "wrong", "scalecar.io/window": "forever"}),
            &[],
        ),
    )
    .await;
    let p = proxy(&format!(
        "scaler: {{ tick: 300ms }}\nkubernetes:\n  kubeconfig: {}\n  namespaces: {watch}\n  leader-election: {{ namespace: scalecar, lease-duration: 3s, renew-deadline: 2s, retry-period: 500ms }}\n",
        c.kubeconfig.display()
    ))
    .await;
    eventually("scaled to 2", Duration::from_secs(15), || async {
        (c.replicas(&d, "granted").await == 2).then_some(())
    })
    .await;
    eventually("two endpoints", Duration::from_secs(15), || async {
        endpoints(&p, "granted", "unified")
            .await
            .filter(|e| e.len() == 2)
    })
    .await;
    assert!(!chat(&openai(&p), "granted", "allowed?", 2).await.is_empty());
    eventually("both events", Duration::from_secs(10), || async {
        let out = c.kubectl(&["get", "events", "-n", namespace]);
        (out.contains("SuccessfulRescale") && out.contains("InvalidAnnotation")).then_some(())
    })
    .await;
    p.shutdown().await;
    let calls: Vec<_> = c
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.starts_with("scalecar/"))
        .filter_map(|r| rbac_request(&r.method, &r.uri).map(|x| (x, r.uri)))
        .collect();
    for needed in [
        "watch pods",
        "watch deployments",
        "patch deployments/scale",
        "create events",
        "update leases",
    ] {
        let (verb, resource) = needed.split_once(' ').unwrap();
        assert!(
            calls
                .iter()
                .any(|((v, _, r, _), _)| v == verb && r == resource),
            "scalecar never did {needed}: {calls:#?}"
        );
    }
    for ((verb, group, resource, ns), uri) in &calls {
        if resource == "leases" {
            assert!(
                allows(&leader_rules, verb, group, resource) && ns.as_deref() == Some("scalecar"),
                "{verb} {group}/{resource} ({uri}) is not granted by the Role scalecar-leader"
            );
            continue;
        }
        assert!(
            allows(rules, verb, group, resource),
            "{verb} {group}/{resource} ({uri}) is not granted by the RBAC in deploy/"
        );
        if role_scoped {
            assert_eq!(
                ns.as_deref(),
                Some(namespace),
                "{uri} leaves the Role's namespace"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rbac_in_deploy_grants_every_call_scalecar_makes() {
    // The default install: a ClusterRole, every namespace watched.
    let c = Cluster::start().await;
    let out = install(&c, "deploy");
    for what in [
        "clusterrole.rbac.authorization.k8s.io/scalecar created",
        "clusterrolebinding.rbac.authorization.k8s.io/scalecar created",
        "role.rbac.authorization.k8s.io/scalecar-leader created",
        "configmap/scalecar created",
    ] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }
    let role: Value =
        serde_json::from_str(&c.kubectl(&["get", "clusterrole", "scalecar", "-o", "json"]))
            .unwrap();
    let rules = role["rules"].as_array().unwrap().clone();
    for r in &rules {
        for key in ["verbs", "apiGroups", "resources"] {
            assert!(
                !r[key].as_array().unwrap().iter().any(|v| v == "*"),
                "a wildcard is not least privilege: {r}"
            );
        }
    }
    every_call_is_allowed(&c, "default", "[]", &rules, false).await;
    c.stop().await;

    // The namespaced overlay: a Role in `llm`, nothing cluster-wide.
    let c = Cluster::start().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "llm"}})).unwrap(),
        )
        .await
        .unwrap();
    let out = install(&c, "deploy/overlays/namespaced");
    assert!(
        out.contains("role.rbac.authorization.k8s.io/scalecar created"),
        "{out}"
    );
    assert!(!out.contains("clusterrole"), "{out}");
    let role: Value =
        serde_json::from_str(&c.kubectl(&["-n", "llm", "get", "role", "scalecar", "-o", "json"]))
            .unwrap();
    let rules = role["rules"].as_array().unwrap().clone();
    every_call_is_allowed(&c, "llm", "[llm]", &rules, true).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_mode_decides_and_events_but_writes_nothing_beside_static_pools() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "watched",
            "watched",
            1,
            json!({"scalecar.io/model": "watched", "scalecar.io/min-replicas": "2"}),
            &[],
        ),
    )
    .await;
    // A static pool beside the discovered one.
    let fixed = common::sim(common::model("fixed")).await;
    let p = c
        .scalecar(
            "300ms",
            &format!(
                "  managed: false\npools:\n  - model: fixed\n    endpoints: [\"{}\"]\n",
                fixed.local_addr()
            ),
        )
        .await;
    let events = eventually("an advised rescale", Duration::from_secs(10), || async {
        let out = c.kubectl(&["get", "events", "-n", "default"]);
        out.contains("RescaleAdvised").then_some(out)
    })
    .await;
    assert!(events.contains("Advised size: 2"), "{events}");
    assert!(!events.contains("SuccessfulRescale"), "{events}");
    assert_eq!(c.writes("/deployments/watched"), 0, "advisory mode wrote");
    assert_eq!(c.replicas(&d, "watched").await, 1);
    // Both models are served: the discovered pool and the static one.
    let client = openai(&p);
    assert!(!chat(&client, "watched", "hi", 2).await.is_empty());
    assert!(!chat(&client, "fixed", "hi", 2).await.is_empty());
    let v: Value = serde_json::from_str(
        &get(&format!("http://{}/debug/targets", p.admin_addr))
            .await
            .unwrap()
            .1,
    )
    .unwrap();
    let names: Vec<&str> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["deployment/default/watched", "fixed/unified"],
        "{v}"
    );
    assert!(
        v["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["advisory"] == true),
        "{v}"
    );
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

/// A `scalecar run` process on this cluster, its admin address read from
/// its own log once it serves.
struct Replica {
    child: std::process::Child,
    proxy: String,
    admin: String,
    config: PathBuf,
}

impl Replica {
    fn start(c: &Cluster, index: usize, extra: &str) -> Replica {
        Self::start_with(c, index, extra, &[])
    }

    /// A replica with `election` as its leader-election settings and
    /// `env` added; its admin port listens on every loopback address, so a
    /// kube-sim Pod standing for it (127.0.0.x) reaches it.
    fn start_with(c: &Cluster, index: usize, election: &str, env: &[(&str, &str)]) -> Replica {
        use std::io::BufRead as _;
        let config = c.kubeconfig.with_extension(format!("replica-{index}.yaml"));
        std::fs::write(
            &config,
            format!(
                "proxy: {{ listen: \"127.0.0.1:0\", workers: 1 }}\nadmin: {{ listen: \"0.0.0.0:0\" }}\nscaler: {{ tick: 300ms }}\nkubernetes:\n  kubeconfig: {}\n  namespaces: [default]\n  api-timeout: 1s\n  leader-election: {{ lease-duration: 3s, renew-deadline: 2s, retry-period: 500ms, namespace: default{election} }}\n",
                c.kubeconfig.display()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_scalecar"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("POD_NAME", format!("replica-{index}"))
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        // Killed on every way out, a failed start included.
        let mut replica = Replica {
            child,
            proxy: String::new(),
            admin: String::new(),
            config,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if !sent && line.contains("serving") {
                    let field = |name: &str| {
                        line.split(&format!("{name}="))
                            .nth(1)
                            .and_then(|r| r.split_whitespace().next())
                            .map(str::to_string)
                    };
                    let _ = tx.send(field("proxy").zip(field("admin")));
                    sent = true;
                }
            }
        });
        (replica.proxy, replica.admin) = rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .expect("the replica logs where it serves");
        replica.admin = replica.admin.replace("0.0.0.0", "127.0.0.1");
        replica
    }

    /// (leading, holder) from its admin port.
    async fn leadership(&self) -> Option<(bool, String)> {
        let (status, body) = get(&format!("http://{}/debug/targets", self.admin))
            .await
            .ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        Some((
            v["leader"]["leading"].as_bool()?,
            v["leader"]["holder"].as_str().unwrap_or("").to_string(),
        ))
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// The index of the one leader among `replicas`, once there is exactly one
/// and every live replica names it.
async fn one_leader(replicas: &[&Replica], within: Duration) -> (usize, String) {
    eventually("exactly one leader, known to all", within, || async {
        let mut leaders = Vec::new();
        let mut holders = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            let (leading, holder) = r.leadership().await?;
            if leading {
                leaders.push(i);
            }
            holders.push(holder);
        }
        let agreed = holders.windows(2).all(|w| w[0] == w[1]) && !holders[0].is_empty();
        (leaders.len() == 1 && agreed).then(|| (leaders[0], holders[0].clone()))
    })
    .await
}

/// The identities that wrote `name`'s scale, in order (from kube-sim's
/// request log and scalecar's User-Agent).
fn scale_writers(c: &Cluster, name: &str) -> Vec<String> {
    c.sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.uri.contains(&format!("/deployments/{name}/scale")))
        .filter_map(|r| {
            r.user_agent
                .split_once('(')
                .map(|(_, rest)| rest.trim_end_matches(')').to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_one_leader_and_a_killed_leader_is_replaced_without_overlap() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "shared",
            "shared",
            1,
            json!({"scalecar.io/model": "shared", "scalecar.io/min-replicas": "2"}),
            &[],
        ),
    )
    .await;
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::start(&c, i, "")).collect();
    let all: Vec<&Replica> = replicas.iter().collect();
    let (first, holder) = one_leader(&all, Duration::from_secs(15)).await;
    // Only the leader writes.
    eventually("scaled to 2", Duration::from_secs(10), || async {
        (c.replicas(&d, "shared").await == 2).then_some(())
    })
    .await;
    let writers = scale_writers(&c, "shared");
    assert!(!writers.is_empty());
    assert!(
        writers.iter().all(|w| *w == holder),
        "{writers:?} vs leader {holder}"
    );
    // A follower's status names the leader.
    let follower = (first + 1) % 3;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .args(["status", "--admin", &replicas[follower].admin])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!("Leader:        {holder} (this replica follows")),
        "{status}"
    );
    // Every replica serves, leader or not.
    for r in &replicas {
        let client = Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("http://{}/v1", r.proxy))
                .with_api_key("none"),
        );
        assert!(!chat(&client, "shared", "anyone", 2).await.is_empty());
    }
    // SIGKILL the leader: another takes over within the lease duration
    // (3 s) and a retry period.
    replicas[first].kill();
    let killed_at = Instant::now();
    let rest: Vec<&Replica> = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, r)| r)
        .collect();
    let (_, successor) = one_leader(&rest, Duration::from_secs(10)).await;
    let took = killed_at.elapsed();
    assert_ne!(successor, holder);
    assert!(
        took <= Duration::from_millis(3000 + 2 * 500 + 500),
        "the successor took over after {took:?}"
    );
    // The successor decides: a new floor is written by it, and by it alone.
    c.annotate(&d, "shared", json!({"scalecar.io/min-replicas": "3"}))
        .await;
    eventually("scaled to 3", Duration::from_secs(10), || async {
        (c.replicas(&d, "shared").await == 3).then_some(())
    })
    .await;
    let writers = scale_writers(&c, "shared");
    let switch = writers.iter().position(|w| *w != holder).unwrap();
    assert!(
        writers[..switch].iter().all(|w| *w == holder)
            && writers[switch..].iter().all(|w| *w == successor),
        "the writers overlapped: {writers:?}"
    );
    drop(replicas);
    c.stop().await;
}

/// When `holder` last renewed its Lease before `stalled`.
fn last_renewal(c: &Cluster, holder: &str, stalled: Instant) -> Instant {
    c.sim
        .requests()
        .into_iter()
        .filter(|r| {
            r.uri.contains("/leases/")
                && r.method == "PUT"
                && r.status == 200
                && r.user_agent.contains(holder)
                && r.at < stalled
        })
        .map(|r| r.at)
        .max()
        .expect("the leader renewed before the stall")
}

/// A stalled API server (Lease calls never answered) while a write is due
/// every tick: writes go on while the Lease is still good and none leaves
/// later than the last renewal plus the renew deadline. (Here the
/// elector's own timing keeps it too — its attempts time out each retry
/// period; what the write-time check adds, for a tick that outlasts the
/// deadline, is the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_leaves_after_the_renew_deadline_when_the_api_stalls() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "busy",
            "busy",
            1,
            json!({"scalecar.io/model": "busy", "scalecar.io/min-replicas": "2"}),
            &[],
        ),
    )
    .await;
    let replicas = [Replica::start(&c, 0, "")];
    let all: Vec<&Replica> = replicas.iter().collect();
    let (leader, holder) = one_leader(&all, Duration::from_secs(15)).await;
    assert_eq!(leader, 0);
    eventually("scaled to 2", Duration::from_secs(10), || async {
        (c.replicas(&d, "busy").await == 2).then_some(())
    })
    .await;
    // Someone else sets the count to 1 every 100 ms: every tick (300 ms)
    // has the floor of 2 to write back.
    let toggling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let toggler = {
        let (toggling, d) = (toggling.clone(), c.deployments());
        tokio::spawn(async move {
            while toggling.load(std::sync::atomic::Ordering::Acquire) {
                let _ = d
                    .patch(
                        "busy",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"replicas": 1}})),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let writes = |c: &Cluster| -> Vec<Instant> {
        c.sim
            .requests()
            .into_iter()
            .filter(|r| {
                r.method == "PATCH"
                    && r.uri.contains("/deployments/busy/scale")
                    && r.user_agent.contains(&holder)
            })
            .map(|r| r.at)
            .collect()
    };
    eventually("writes flowing", Duration::from_secs(10), || async {
        (writes(&c).len() >= 3).then_some(())
    })
    .await;
    // The API server stops answering Lease calls.
    c.sim.faults().add(Rule {
        verb: None,
        resource: Some("leases".into()),
        rate: 1.0,
        fault: Fault::Timeout,
    });
    let stalled = Instant::now();
    eventually("the leader steps down", Duration::from_secs(8), || async {
        let (leading, _) = replicas[0].leadership().await?;
        (!leading).then_some(())
    })
    .await;
    // Past the step-down, the toggled count stays where the other writer
    // put it: nobody writes the floor back any more.
    eventually(
        "the floor left unwritten",
        Duration::from_secs(5),
        || async { (c.replicas(&d, "busy").await == 1).then_some(()) },
    )
    .await;
    toggling.store(false, std::sync::atomic::Ordering::Release);
    toggler.await.unwrap();
    // The last renewal that got through, and every write after it.
    let renewed = last_renewal(&c, &holder, stalled);
    let deadline = renewed + Duration::from_secs(2);
    let late: Vec<Duration> = writes(&c)
        .into_iter()
        .filter(|t| *t >= deadline)
        .map(|t| t - deadline)
        .collect();
    assert!(
        late.is_empty(),
        "writes after the renew deadline, by {late:?}"
    );
    // It wrote while it still held the Lease (the check is not a freeze).
    assert!(writes(&c).iter().any(|t| *t > renewed));
    c.sim.faults().clear();
    drop(replicas);
    c.stop().await;
}

/// A tick that began while the Lease was good and outlasted the renew
/// deadline — waiting on a peer that answers only after the API server
/// stalled and the leader stepped down — writes nothing: the Lease check
/// right before the write refuses it, and says so in
/// `scalecar_writes_refused_total`. Without that check the floor below
/// would be written back seconds after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_outlasts_the_renew_deadline_writes_nothing() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "late",
            "late",
            1,
            json!({"scalecar.io/model": "late", "scalecar.io/min-replicas": "2"}),
            &[],
        ),
    )
    .await;
    // A peer that refuses (503) every snapshot request, at once or, while
    // `hold` is set, only once `release` turns true.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (asked_tx, mut asked) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let peer = {
        let hold = hold.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (hold, asked_tx, mut release) =
                    (hold.clone(), asked_tx.clone(), release.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    if hold.load(std::sync::atomic::Ordering::Acquire) {
                        let _ = asked_tx.send(());
                        let _ = release.wait_for(|r| *r).await;
                    }
                    let _ = conn
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        })
    };
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "slow-peer", "labels": {"app": "gateway"}},
            "spec": {"containers": [{"name": "scalecar", "image": "scalecar",
                                     "ports": [{"name": "admin", "containerPort": port}]}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let replicas = [Replica::start_with(
        &c,
        0,
        ", peer-selector: \"app=gateway\", peer-timeout: 20s, peer-token-secret: late-peer-token",
        &[],
    )];
    let all: Vec<&Replica> = replicas.iter().collect();
    let (_, holder) = one_leader(&all, Duration::from_secs(15)).await;
    eventually("scaled to 2", Duration::from_secs(10), || async {
        (c.replicas(&d, "late").await == 2).then_some(())
    })
    .await;
    // A leading tick is now waiting on the peer.
    hold.store(true, std::sync::atomic::Ordering::Release);
    tokio::time::timeout(Duration::from_secs(10), asked.recv())
        .await
        .expect("the leader asks its peer")
        .unwrap();
    // Someone else lowers the count (a write of the floor is due when the
    // tick goes on) and the API server stops answering Lease calls.
    d.patch(
        "late",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .unwrap();
    c.sim.faults().add(Rule {
        verb: None,
        resource: Some("leases".into()),
        rate: 1.0,
        fault: Fault::Timeout,
    });
    let stalled = Instant::now();
    eventually("the leader steps down", Duration::from_secs(8), || async {
        let (leading, _) = replicas[0].leadership().await?;
        (!leading).then_some(())
    })
    .await;
    // Only now does the tick go on, past the deadline.
    release_tx.send_replace(true);
    eventually(
        "the late write refused",
        Duration::from_secs(10),
        || async {
            let (_, text) = get(&format!("http://{}/metrics", replicas[0].admin))
                .await
                .ok()?;
            text.lines()
                .any(|l| l.starts_with("scalecar_writes_refused_total ") && !l.ends_with(" 0"))
                .then_some(())
        },
    )
    .await;
    let renewed = last_renewal(&c, &holder, stalled);
    let late: Vec<Instant> = c
        .sim
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "PATCH"
                && r.uri.contains("/deployments/late/scale")
                && r.user_agent.contains(&holder)
                && r.at >= renewed + Duration::from_secs(2)
        })
        .map(|r| r.at)
        .collect();
    assert!(
        late.is_empty(),
        "{} writes after the renew deadline",
        late.len()
    );
    assert_eq!(c.replicas(&d, "late").await, 1);
    c.sim.faults().clear();
    peer.abort();
    drop(replicas);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_steps_down_and_stops_writing() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "alone",
            "alone",
            1,
            json!({"scalecar.io/model": "alone", "scalecar.io/min-replicas": "2"}),
            &[],
        ),
    )
    .await;
    let replicas = [Replica::start(&c, 0, ""), Replica::start(&c, 1, "")];
    let all: Vec<&Replica> = replicas.iter().collect();
    let (leader, _) = one_leader(&all, Duration::from_secs(15)).await;
    eventually("scaled to 2", Duration::from_secs(10), || async {
        (c.replicas(&d, "alone").await == 2).then_some(())
    })
    .await;
    // The Lease's API fails for everyone: within the renew deadline (2 s)
    // and a retry period the leader steps down; nobody leads.
    c.sim.faults().add(Rule {
        verb: None,
        resource: Some("leases".into()),
        rate: 1.0,
        fault: Fault::Error(500),
    });
    let failing = Instant::now();
    eventually("the leader steps down", Duration::from_secs(6), || async {
        let (leading, _) = replicas[leader].leadership().await?;
        (!leading).then_some(())
    })
    .await;
    assert!(
        failing.elapsed() <= Duration::from_millis(2000 + 2 * 500 + 500),
        "stepped down after {:?}",
        failing.elapsed()
    );
    // And writes nothing more, even when there is something to write.
    let writes = c.writes("/deployments/alone/scale");
    c.annotate(&d, "alone", json!({"scalecar.io/min-replicas": "3"}))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.writes("/deployments/alone/scale"),
        writes,
        "a follower wrote"
    );
    for r in &replicas {
        assert_eq!(r.leadership().await.map(|l| l.0), Some(false));
    }
    // The Lease back: a leader again, and the new floor is written.
    c.sim.faults().clear();
    one_leader(&all, Duration::from_secs(10)).await;
    eventually("scaled to 3", Duration::from_secs(10), || async {
        (c.replicas(&d, "alone").await == 3).then_some(())
    })
    .await;
    drop(replicas);
    c.stop().await;
}

/// Three replicas that know each other as peers: each behind a kube-sim
/// Pod (label app=gateway, its admin port named `admin`) whose address
/// reaches the replica's admin port.
async fn peered_replicas(c: &Cluster, n: usize) -> Vec<Replica> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client.clone(), "default");
    let mut replicas = Vec::new();
    for i in 0..n {
        // The shared token from a Secret the first replica creates.
        let r = Replica::start_with(
            c,
            i,
            ", peer-selector: \"app=gateway\", peer-timeout: 300ms, peer-token-secret: gateway-peer-token",
            &[],
        );
        let port: u16 = r.admin.rsplit(':').next().unwrap().parse().unwrap();
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": format!("replica-{i}"), "labels": {"app": "gateway"}},
                "spec": {"containers": [{"name": "scalecar", "image": "scalecar",
                                         "ports": [{"name": "admin", "containerPort": port}]}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        replicas.push(r);
    }
    replicas
}

/// Until every replica routes `model` to a ready pod.
async fn routed_everywhere(replicas: &[Replica], model: &str) {
    for r in replicas {
        eventually(
            "the model routed at every replica",
            Duration::from_secs(10),
            || async {
                let (_, body) = get(&format!("http://{}/debug/pools", r.admin)).await.ok()?;
                let v: Value = serde_json::from_str(&body).ok()?;
                v["pools"].as_array()?.iter().find(|p| {
                    p["model"] == model && p["endpoints"].as_array().is_some_and(|e| !e.is_empty())
                })?;
                Some(())
            },
        )
        .await;
    }
}

/// `n` streams through each replica's proxy at once.
fn load(
    replicas: &[Replica],
    model: &str,
    each: usize,
    tokens: u32,
) -> Vec<tokio::task::JoinHandle<String>> {
    replicas
        .iter()
        .flat_map(|r| {
            let client = Client::with_config(
                OpenAIConfig::new()
                    .with_api_base(format!("http://{}/v1", r.proxy))
                    .with_api_key("none"),
            );
            let model = model.to_string();
            (0..each).map(move |_| {
                let (client, model) = (client.clone(), model.clone());
                tokio::spawn(async move { chat(&client, &model, "share the load", tokens).await })
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_decides_on_every_replicas_traffic_summed() {
    let c = Cluster::start().await;
    let d = c.deployments();
    // 2 requests a pod at 100 %: 12 in flight need 6 pods; each replica
    // alone sees 4, which would ask for 2.
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "summed",
            "summed",
            1,
            json!({"scalecar.io/algorithm": "kpa", "scalecar.io/model": "summed", "scalecar.io/target": "2",
                   "scalecar.io/target-utilization-percentage": "100",
                   "scalecar.io/max-replicas": "10", "scalecar.io/window": "6s"}),
            &[],
        ),
    )
    .await;
    let replicas = peered_replicas(&c, 3).await;
    let all: Vec<&Replica> = replicas.iter().collect();
    one_leader(&all, Duration::from_secs(15)).await;
    // The token nobody made by hand: one Secret, 64 random hex digits,
    // that every replica read (their windows are summed below).
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(c.client.clone(), "default");
    let token = secrets
        .get("gateway-peer-token")
        .await
        .unwrap()
        .data
        .unwrap()["token"]
        .clone();
    let token = String::from_utf8(token.0).unwrap();
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token}"
    );
    // The internal endpoint is the peers' only: no token, no windows.
    let (status, _) = get(&format!(
        "http://{}/internal/snapshot?model=summed&role=unified&window_ms=6000&panic_window_ms=2000",
        replicas[0].admin
    ))
    .await
    .unwrap();
    assert_eq!(status, 403);
    for r in &replicas {
        let (status, _, _) = request("GET", &format!("http://{}/internal/snapshot", r.proxy), "")
            .await
            .unwrap();
        assert_eq!(status, 404, "the proxy port must not serve it");
    }
    routed_everywhere(&replicas, "summed").await;
    let streams = load(&replicas, "summed", 4, 400);
    let peak = peak_replicas(&c, &d, "summed", 6).await;
    for s in streams {
        assert!(!s.await.unwrap().is_empty());
    }
    assert!(
        (6..=8).contains(&peak),
        "12 streams over 3 replicas scaled to {peak}, not 6"
    );
    drop(replicas);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_does_not_answer_makes_decisions_partial_and_blocks_scale_down() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "held",
            "held",
            3,
            json!({"scalecar.io/model": "held", "scalecar.io/min-replicas": "1",
                   "scalecar.io/window": "6s", "scalecar.io/scale-down-delay": "0s"}),
            &[],
        ),
    )
    .await;
    let replicas = peered_replicas(&c, 2).await;
    let all: Vec<&Replica> = replicas.iter().collect();
    let (leader, _) = one_leader(&all, Duration::from_secs(15)).await;
    let follower = 1 - leader;
    // The follower stops answering (SIGSTOP: its port accepts, nothing
    // answers) before the idle pool could be scaled down.
    let pid = replicas[follower].child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let targets = |r: &Replica| {
        let admin = r.admin.clone();
        async move {
            let (_, body) = get(&format!("http://{admin}/debug/targets")).await.ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            v["targets"].as_array()?.first().cloned()
        }
    };
    eventually("a partial decision", Duration::from_secs(10), || async {
        targets(&replicas[leader])
            .await
            .filter(|t| t["partial"] == true)
    })
    .await;
    // KPA leaves its start-up panic after the 6 s window and would scale
    // the idle pool down: partial data holds it.
    let t = eventually(
        "a scale-down held back",
        Duration::from_secs(15),
        || async {
            targets(&replicas[leader]).await.filter(|t| {
                t["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("partial data"))
            })
        },
    )
    .await;
    assert!(t["desired"].as_u64() < Some(3), "{t}");
    assert_eq!(t["applied"], 3, "{t}");
    let (_, metrics) = get(&format!("http://{}/metrics", replicas[leader].admin))
        .await
        .unwrap();
    let timeouts: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("scalecar_peer_errors_total{reason=\"timeout\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(timeouts >= 1.0, "no peer timeout counted:\n{metrics}");
    // scalecar status says so, and names the leader.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .args(["status", "--admin", &replicas[leader].admin])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("Leader:        this replica (replica-"),
        "{status}"
    );
    assert!(status.contains("PARTIAL"), "{status}");
    assert_eq!(
        c.replicas(&d, "held").await,
        3,
        "scaled down on partial data"
    );
    // It answers again: whole data, and the idle pool goes down.
    assert!(
        std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    eventually(
        "scaled down once whole",
        Duration::from_secs(20),
        || async { (c.replicas(&d, "held").await < 3).then_some(()) },
    )
    .await;
    let t = targets(&replicas[leader]).await.unwrap();
    assert_eq!(t["partial"], false, "{t}");
    drop(replicas);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_decides_at_once_on_the_survivors_full_windows() {
    let c = Cluster::start().await;
    let d = c.deployments();
    c.create(
        &d,
        workload(
            "apps/v1",
            "Deployment",
            "kept",
            "kept",
            1,
            json!({"scalecar.io/algorithm": "kpa", "scalecar.io/model": "kept", "scalecar.io/target": "2",
                   "scalecar.io/target-utilization-percentage": "100",
                   "scalecar.io/max-replicas": "10", "scalecar.io/window": "6s"}),
            &[],
        ),
    )
    .await;
    let mut replicas = peered_replicas(&c, 3).await;
    let all: Vec<&Replica> = replicas.iter().collect();
    let (leader, old) = one_leader(&all, Duration::from_secs(15)).await;
    // Long streams, 4 through each replica: 12 in flight.
    routed_everywhere(&replicas, "kept").await;
    let streams = load(&replicas, "kept", 4, 1500);
    eventually("scaled for 12 streams", Duration::from_secs(10), || async {
        (c.replicas(&d, "kept").await >= 6).then_some(())
    })
    .await;
    // Once the leader's merged stable window holds all 12 streams, kill
    // it (its 4 streams go with it): 8 remain, at the two survivors.
    eventually(
        "the stable window full",
        Duration::from_secs(15),
        || async {
            let (_, body) = get(&format!("http://{}/debug/targets", replicas[leader].admin))
                .await
                .ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            (v["targets"][0]["stable_value"].as_f64()? >= 11.5).then_some(())
        },
    )
    .await;
    replicas[leader].kill();
    let rest: Vec<&Replica> = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, r)| r)
        .collect();
    let (successor, holder) = one_leader(&rest, Duration::from_secs(10)).await;
    assert_ne!(holder, old);
    // Its first decision: both survivors' full windows (8 in flight),
    // not its own 4, and no forgetting down to a half-empty window.
    let first = eventually(
        "the new leader's first decision",
        Duration::from_secs(5),
        || async {
            let (_, body) = get(&format!("http://{}/debug/targets", rest[successor].admin))
                .await
                .ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            v["targets"].as_array()?.first().cloned()
        },
    )
    .await;
    let stable = first["stable_value"].as_f64().unwrap();
    assert!(
        (7.0..=9.0).contains(&stable),
        "the new leader's stable concurrency is {stable}, not the survivors' 8: {first}"
    );
    assert!(first["desired"].as_u64().unwrap() >= 4, "{first}");
    // The dead replica's Pod is still listed (no kubelet here to fail its
    // probes): it does not answer, so the data is partial — until the Pod
    // goes, as it would in a cluster.
    assert_eq!(first["partial"], true, "{first}");
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client.clone(), "default");
    pods.delete(&format!("replica-{leader}"), &Default::default())
        .await
        .unwrap();
    eventually("whole data again", Duration::from_secs(40), || async {
        let (_, body) = get(&format!("http://{}/debug/targets", rest[successor].admin))
            .await
            .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["targets"][0]["partial"] == false).then_some(())
    })
    .await;
    for s in streams {
        // The killed replica's streams end with errors; the rest finish.
        let _ = s.await;
    }
    drop(replicas);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kustomization_renders_and_applies_and_the_example_is_served() {
    let c = Cluster::start().await;
    // The example first: it creates the namespace the namespaced overlay
    // serves.
    let out = install(&c, "deploy/example");
    for what in [
        "namespace/llm created",
        "deployment.apps/llama-3-8b created",
        "deployment.apps/qwen-prefill created",
        "deployment.apps/qwen-decode created",
    ] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }
    let out = install(&c, "deploy");
    assert!(out.contains("deployment.apps/scalecar created"), "{out}");
    assert!(
        out.contains("configmap/scalecar-dashboard created"),
        "{out}"
    );
    // Nothing of the Prometheus Operator's unless asked for: a cluster
    // without its CRDs takes the default install.
    assert!(!out.contains("monitoring.coreos.com"), "{out}");
    let out = install(&c, "deploy/overlays/monitored");
    for what in [
        "servicemonitor.monitoring.coreos.com/scalecar created",
        "prometheusrule.monitoring.coreos.com/scalecar created",
    ] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }
    assert!(
        install(&c, "deploy/overlays/namespaced")
            .contains("role.rbac.authorization.k8s.io/scalecar created")
    );
    let out = install(&c, "deploy/overlays/ha");
    assert!(out.contains("deployment.apps/scalecar configured"), "{out}");
    // The HA gateway runs three pods (kube-sim runs them as plain
    // containers: ready at once).
    let gateway = Api::<DynamicObject>::namespaced_with(
        c.client.clone(),
        "scalecar",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apps", "v1", "Deployment"),
            "deployments",
        ),
    );
    eventually(
        "three gateway pods ready",
        Duration::from_secs(15),
        || async {
            let d = gateway.get("scalecar").await.ok()?;
            (d.data["status"]["readyReplicas"] == 3).then_some(())
        },
    )
    .await;
    // scalecar over the example: its annotations parse, the unified model
    // and the PD pair are routed.
    let p = proxy(&format!(
        "scaler: {{ tick: 500ms }}\nkubernetes:\n  kubeconfig: {}\n  namespaces: [llm]\n",
        c.kubeconfig.display()
    ))
    .await;
    for (model, role) in [
        ("llama-3-8b", "unified"),
        ("qwen", "prefill"),
        ("qwen", "decode"),
    ] {
        eventually("the example routed", Duration::from_secs(15), || async {
            endpoints(&p, model, role).await.filter(|e| e.len() == 1)
        })
        .await;
    }
    let warnings = c.kubectl(&[
        "get",
        "events",
        "-n",
        "llm",
        "--field-selector",
        "type=Warning",
    ]);
    assert!(!warnings.contains("InvalidAnnotation"), "{warnings}");
    assert!(!chat(&openai(&p), "llama-3-8b", "hello", 4).await.is_empty());
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

/// The image runs the binary the manifests expect, as the user they run it
/// as. (No Docker engine here: the Dockerfile is read, not built.)
#[test]
fn the_dockerfile_builds_the_production_binary_and_runs_it_as_non_root() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let lines: Vec<&str> = docker
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let runtime = stages.last().unwrap();
    assert!(
        runtime.contains("distroless") && runtime.contains("nonroot"),
        "{runtime}"
    );
    assert!(
        docker.contains("--no-default-features -p scalecar-proxy --bin scalecar"),
        "the production build leaves the demo out"
    );
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let runtime_stage = &lines[last_from..];
    assert!(
        runtime_stage.contains(&"USER 65532:65532"),
        "{runtime_stage:?}"
    );
    assert!(
        runtime_stage.contains(&"ENTRYPOINT [\"/usr/local/bin/scalecar\"]"),
        "{runtime_stage:?}"
    );
    assert!(
        runtime_stage
            .iter()
            .any(|l| l.starts_with("COPY --from=") && l.ends_with(" /usr/local/bin/scalecar")),
        "{runtime_stage:?}"
    );
    // deploy/ runs it with that uid and the binary's subcommand as args.
    let deployment = std::fs::read_to_string(root.join("deploy/base/deployment.yaml")).unwrap();
    assert!(deployment.contains("runAsUser: 65532"));
    assert!(deployment.contains("readOnlyRootFilesystem: true"));
    assert!(deployment.contains(r#"args: ["run", "--config", "/etc/scalecar/scalecar.yaml"]"#));
}
