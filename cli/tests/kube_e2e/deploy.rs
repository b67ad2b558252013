//! What `deploy/` and the Dockerfile ship, rendered and applied.

use super::*;

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
        docker.contains("--no-default-features -p scalecar-cli --bin scalecar"),
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
