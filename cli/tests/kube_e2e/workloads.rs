//! Annotated workloads: routed, scaled through their scale subresource (or
//! spec), served by their pods, and left alone when removed or invalid.

use super::*;

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
    let scaled_after =
        burst_until_scaled(&c, &client, "llama", "m", "why scale in the proxy?").await;
    assert!(
        scaled_after <= 2 * TICK,
        "scaled {scaled_after:?} after the burst began: more than two ticks"
    );
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
            || !r
                .uri
                .split('?')
                .next()
                .is_some_and(|p| p.ends_with("/scale"))
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
    let d = c
        .deployment(
            "typo",
            "typo",
            json!({"scalecar.io/model": "typo", "scalecar.io/min-replicas": "2",
                   "scalecar.io/max-replicas": "lots"}),
        )
        .await;
    let p = c.scalecar("300ms", "").await;
    let events = c.invalid_annotation_events().await;
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
    let d = c
        .deployment(
            "brief",
            "brief",
            json!({"scalecar.io/model": "brief", "scalecar.io/min-replicas": "1"}),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_mode_decides_and_events_but_writes_nothing_beside_static_pools() {
    let c = Cluster::start().await;
    let d = c
        .deployment(
            "watched",
            "watched",
            json!({"scalecar.io/model": "watched", "scalecar.io/min-replicas": "2"}),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_the_cluster_does_not_serve_does_not_hold_readiness() {
    // A custom kind whose CRD is not installed (yet), and InferencePools
    // watched: ready once the rest is listed, and the annotated
    // Deployment routed meanwhile.
    let c = Cluster::start().await;
    c.deployment("llama", "m", json!({"scalecar.io/model": "m"}))
        .await;
    let p = c
        .scalecar(
            "1s",
            "  kinds: [{group: later.example.com, version: v1, kind: NotYet}]\n  endpoint-picker: scalecar-epp\n",
        )
        .await;
    eventually("the Deployment routed", Duration::from_secs(10), || async {
        endpoints(&p, "m", "unified").await.filter(|e| e.len() == 1)
    })
    .await;
    assert!(!chat(&openai(&p), "m", "ready?", 4).await.is_empty());
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}
