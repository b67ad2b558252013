//! The cluster and processes the tests share: a kube-sim with a kubeconfig,
//! workloads, `scalecar run` replicas as real processes, and the polls
//! (each with a deadline) that read the cluster back.

use super::*;

/// A kube-sim with its controllers, a client and a kubeconfig file.
pub struct Cluster {
    pub sim: KubeSim,
    pub client: kube::Client,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let config = KubeSimConfig {
            controllers: true,
            ..KubeSimConfig::default()
        };
        let (sim, client, kubeconfig) = common::kube_sim(config, "e2e").await;
        Cluster {
            sim,
            client,
            kubeconfig,
        }
    }

    /// scalecar on this cluster, ticking every `tick`.
    pub async fn scalecar(&self, tick: &str, extra: &str) -> ProxyHandle {
        proxy(&format!(
            "scaler: {{ tick: {tick} }}\nlimits: {{ activation-timeout: 30s, queue-wait: 30s }}\nkubernetes:\n  kubeconfig: {}\n  namespaces: [default]\n  api-timeout: 2s\n{extra}",
            self.kubeconfig.display()
        ))
        .await
    }

    pub fn api(&self, group: &str, version: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            "default",
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            ),
        )
    }

    pub fn deployments(&self) -> Api<DynamicObject> {
        self.api("apps", "v1", "Deployment", "deployments")
    }

    /// The Deployments, with `name` created among them: one pod serving
    /// `model`, annotated with `annotations`.
    pub async fn deployment(
        &self,
        name: &str,
        model: &str,
        annotations: Value,
    ) -> Api<DynamicObject> {
        let d = self.deployments();
        self.create(
            &d,
            workload("apps/v1", "Deployment", name, model, 1, annotations, &[]),
        )
        .await;
        d
    }

    pub async fn create(&self, api: &Api<DynamicObject>, object: Value) {
        let o: DynamicObject = serde_json::from_value(object).unwrap();
        api.create(&PostParams::default(), &o).await.unwrap();
    }

    pub async fn annotate(&self, api: &Api<DynamicObject>, name: &str, annotations: Value) {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap();
    }

    pub async fn replicas(&self, api: &Api<DynamicObject>, name: &str) -> u64 {
        let o = api.get(name).await.unwrap();
        o.data["spec"]["replicas"].as_u64().unwrap_or(1)
    }

    /// `kubectl` against this cluster.
    pub fn kubectl(&self, args: &[&str]) -> String {
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

    /// The Warning Events of `default` once one says InvalidAnnotation
    /// (within 10 s), as kubectl lists them.
    pub async fn invalid_annotation_events(&self) -> String {
        eventually(
            "an InvalidAnnotation Warning",
            Duration::from_secs(10),
            || async {
                let out = self.kubectl(&[
                    "get",
                    "events",
                    "-n",
                    "default",
                    "--field-selector",
                    "type=Warning",
                ]);
                out.contains("InvalidAnnotation").then_some(out)
            },
        )
        .await
    }

    /// Writes through a scale path (a PATCH whose URI contains `path`).
    pub fn writes(&self, path: &str) -> usize {
        self.sim
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.uri.contains(path))
            .count()
    }

    pub async fn stop(self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
        self.sim.shutdown().await;
    }
}

/// `spec.replicas` as stored, read past the API (and its faults).
pub fn stored_replicas(c: &Cluster, name: &str) -> u64 {
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
pub async fn peak_replicas(c: &Cluster, d: &Api<DynamicObject>, name: &str, want: u64) -> u64 {
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until && peak < want {
        peak = peak.max(c.replicas(d, name).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

/// Polls `f` until it gives a value; fails naming `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
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
pub async fn endpoints(p: &ProxyHandle, model: &str, role: &str) -> Option<Vec<Value>> {
    let v = pools(p).await;
    v["pools"]
        .as_array()?
        .iter()
        .find(|x| x["model"] == model && x["role"] == role)
        .map(|x| x["endpoints"].as_array().cloned().unwrap_or_default())
}

pub fn openai(p: &ProxyHandle) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", p.proxy_addr))
            .with_api_key("none"),
    )
}

/// 16 streams of `prompt` to `model` at once; returns, once all have
/// answered, how long after they began the first write through
/// `/deployments/{deployment}/scale` came (within 10 s).
pub async fn burst_until_scaled(
    c: &Cluster,
    client: &Client<OpenAIConfig>,
    deployment: &str,
    model: &str,
    prompt: &str,
) -> Duration {
    let path = format!("/deployments/{deployment}/scale");
    let writes_before = c.writes(&path);
    let began = Instant::now();
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let (client, model, prompt) = (client.clone(), model.to_string(), prompt.to_string());
            tokio::spawn(async move { chat(&client, &model, &prompt, 120).await })
        })
        .collect();
    eventually(
        "a write through /scale",
        Duration::from_secs(10),
        || async { (c.writes(&path) > writes_before).then_some(()) },
    )
    .await;
    let scaled_after = began.elapsed();
    for b in burst {
        assert!(!b.await.unwrap().is_empty());
    }
    scaled_after
}

/// One streamed chat completion through `client`; the text.
pub async fn chat(
    client: &Client<OpenAIConfig>,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> String {
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
pub async fn served_by_pods(c: &Cluster, app: &str) -> BTreeMap<String, f64> {
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

/// Renders `dir` with kubectl and applies it to `c`, as a user installs it.
pub fn install(c: &Cluster, dir: &str) -> String {
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

/// A `scalecar run` process on this cluster, its admin address read from
/// its own log once it serves.
pub struct Replica {
    pub child: std::process::Child,
    pub proxy: String,
    pub admin: String,
    pub config: PathBuf,
}

impl Replica {
    pub fn start(c: &Cluster, index: usize, extra: &str) -> Replica {
        Self::start_with(c, index, extra, &[])
    }

    /// A replica with `election` as its leader-election settings and
    /// `env` added; its admin port listens on every loopback address, so a
    /// kube-sim Pod standing for it (127.0.0.x) reaches it.
    pub fn start_with(c: &Cluster, index: usize, election: &str, env: &[(&str, &str)]) -> Replica {
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
        (replica.proxy, replica.admin) = common::serving_addresses(stderr, Duration::from_secs(20))
            .expect("the replica logs where it serves");
        replica.admin = replica.admin.replace("0.0.0.0", "127.0.0.1");
        replica
    }

    /// (leading, holder) from its admin port.
    pub async fn leadership(&self) -> Option<(bool, String)> {
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

    /// An OpenAI client of this replica's proxy.
    pub fn openai(&self) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("http://{}/v1", self.proxy))
                .with_api_key("none"),
        )
    }

    pub fn kill(&mut self) {
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
pub async fn one_leader(replicas: &[&Replica], within: Duration) -> (usize, String) {
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
pub fn scale_writers(c: &Cluster, name: &str) -> Vec<String> {
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

/// When `holder` last renewed its Lease before `stalled`.
pub fn last_renewal(c: &Cluster, holder: &str, stalled: Instant) -> Instant {
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
