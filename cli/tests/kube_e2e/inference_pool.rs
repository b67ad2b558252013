//! InferencePools that name scalecar as their endpoint picker: their pods
//! are a pool, their annotations its model and policy, and the workload
//! that owns the pods is the one scaled.

use super::*;

/// An InferencePool in `default` over the pods labelled `app`, naming
/// `picker`, written to a file for kubectl.
fn inference_pool(name: &str, app: &str, picker: &str, annotations: Value) -> String {
    let pool = json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": picker, "port": {"number": 9002}, "failureMode": "FailClose"},
        },
    });
    let path = std::env::temp_dir().join(format!(
        "scalecar-infpool-{}-{name}.json",
        std::process::id()
    ));
    std::fs::write(&path, pool.to_string()).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inference_pool_naming_scalecar_is_routed_and_its_deployment_scaled() {
    let c = Cluster::start().await;
    let d = c.deployments();
    // The model servers, not annotated: the pool says what they serve.
    c.create(
        &d,
        workload("apps/v1", "Deployment", "llama", "m", 1, json!({}), &[]),
    )
    .await;
    let p = c.scalecar("1s", "  endpoint-picker: scalecar-epp\n").await;
    let ours = inference_pool(
        "llama",
        "llama",
        "scalecar-epp",
        json!({"scalecar.io/model": "m", "scalecar.io/algorithm": "kpa", "scalecar.io/target": "2",
               "scalecar.io/min-replicas": "1", "scalecar.io/max-replicas": "4", "scalecar.io/window": "6s",
               "scalecar.io/panic-window-percentage": "34", "scalecar.io/scale-down-delay": "0s"}),
    );
    // Another picker's pool over the same pods: not ours, not routed.
    let theirs = inference_pool(
        "theirs",
        "llama",
        "gie-epp",
        json!({"scalecar.io/model": "other"}),
    );
    // Ours but without a model: said on the pool, not routed.
    let nameless = inference_pool("nameless", "llama", "scalecar-epp", json!({}));
    for f in [&ours, &theirs, &nameless] {
        c.kubectl(&["apply", "--validate=false", "-f", f]);
    }
    eventually(
        "a pool with the Deployment's pod",
        Duration::from_secs(10),
        || async { endpoints(&p, "m", "unified").await.filter(|e| e.len() == 1) },
    )
    .await;
    let events = c.invalid_annotation_events().await;
    assert!(events.contains("scalecar.io/model is required"), "{events}");
    assert!(endpoints(&p, "other", "unified").await.is_none());
    // The port is the pool's target port; the pod is served through it.
    let client = openai(&p);
    assert!(!chat(&client, "m", "through the pool", 4).await.is_empty());

    // A burst scales the Deployment that owns the pods (found from their
    // ownerReferences), through /scale.
    burst_until_scaled(&c, &client, "llama", "m", "why pick in the gateway?").await;
    let up = c.replicas(&d, "llama").await;
    assert!((2..=4).contains(&up), "scaled to {up}");
    eventually(
        "the new pods in the pool",
        Duration::from_secs(15),
        || async {
            endpoints(&p, "m", "unified")
                .await
                .filter(|e| e.len() as u64 == up)
        },
    )
    .await;
    let (_, targets) = get(&format!("http://{}/debug/targets", p.admin_addr))
        .await
        .unwrap();
    assert!(
        targets.contains("deployment/default/llama"),
        "the decision is named after the workload scaled: {targets}"
    );

    // The selector moved to another Deployment's pods: the pool routes to
    // them and scales that one.
    c.create(
        &d,
        workload("apps/v1", "Deployment", "llama-b", "m", 1, json!({}), &[]),
    )
    .await;
    c.kubectl(&[
        "patch",
        "inferencepool",
        "llama",
        "-n",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"selector":{"matchLabels":{"app":"llama-b"}}}}"#,
    ]);
    eventually("the pool on llama-b", Duration::from_secs(10), || async {
        let (_, t) = get(&format!("http://{}/debug/targets", p.admin_addr))
            .await
            .ok()?;
        let on_b = t.contains("deployment/default/llama-b");
        let one = endpoints(&p, "m", "unified").await?.len() == 1;
        (on_b && one).then_some(())
    })
    .await;
    assert!(!chat(&client, "m", "moved", 4).await.is_empty());

    // Deleted: out of the routes.
    c.kubectl(&["delete", "inferencepool", "llama", "-n", "default"]);
    eventually("the pool gone", Duration::from_secs(10), || async {
        endpoints(&p, "m", "unified").await.is_none().then_some(())
    })
    .await;
    for f in [ours, theirs, nameless] {
        let _ = std::fs::remove_file(f);
    }
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_named_workload_scales_from_zero_and_yields_to_an_annotated_one() {
    let c = Cluster::start().await;
    let d = c.deployments();
    // No pods to ask: the annotation names the workload.
    c.create(
        &d,
        workload("apps/v1", "Deployment", "qwen", "q", 0, json!({}), &[]),
    )
    .await;
    let p = c.scalecar("1s", "  endpoint-picker: scalecar-epp\n").await;
    let pool = inference_pool(
        "qwen",
        "qwen",
        "scalecar-epp",
        json!({"scalecar.io/model": "q", "scalecar.io/workload": "Deployment/qwen",
               "scalecar.io/algorithm": "kpa", "scalecar.io/min-replicas": "0",
               "scalecar.io/max-replicas": "2"}),
    );
    c.kubectl(&["apply", "--validate=false", "-f", &pool]);
    eventually(
        "a pool with no endpoints",
        Duration::from_secs(10),
        || async { endpoints(&p, "q", "unified").await.filter(|e| e.is_empty()) },
    )
    .await;
    // A request held at admission wakes the Deployment from zero.
    let answer = chat(&openai(&p), "q", "wake up", 4).await;
    assert!(!answer.is_empty());
    assert!(c.replicas(&d, "qwen").await >= 1);

    // The Deployment annotated itself: it decides itself, the pool over it
    // is dropped (one writer per workload) and says why in the log; the
    // model is still served, now by the Deployment's own pool.
    c.annotate(
        &d,
        "qwen",
        json!({"scalecar.io/model": "q2", "scalecar.io/algorithm": "kpa", "scalecar.io/min-replicas": "1"}),
    )
    .await;
    eventually(
        "the Deployment's own pool, the pool's gone",
        Duration::from_secs(10),
        || async {
            let own = endpoints(&p, "q2", "unified").await;
            let pools = endpoints(&p, "q", "unified").await;
            (own.is_some() && pools.is_none()).then_some(())
        },
    )
    .await;
    let _ = std::fs::remove_file(pool);
    teardown(&p).await;
    p.shutdown().await;
    c.stop().await;
}
