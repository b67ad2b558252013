//! The generic Kubernetes scale target against kube-sim: through `/scale`
//! where a kind has it, by patching `spec.replicas` where it has not, a
//! write after someone else's is a 409, and a stuck API server costs one
//! timeout, not the loop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use scalecar_loadtest::kube_sim::{Fault, KubeSim, KubeSimConfig, Rule};
use scalecar_scaler::kube::KubeScaleTarget;
use scalecar_scaler::target::{ScaleTarget, TargetError, TargetRef};
use serde_json::json;

async fn kube_sim() -> (KubeSim, kube::Client) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = KubeSim::start(KubeSimConfig::default(), listener).unwrap();
    let client = kube::Client::try_from(kube::Config::new(sim.url().parse().unwrap())).unwrap();
    (sim, client)
}

fn workload(api_version: &str, kind: &str, name: &str) -> serde_json::Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}},
                                 "spec": {"containers": [{"name": "c", "image": "x", "args": ["--model", name]}]}}}})
}

fn target(api_version: &str, kind: &str, name: &str) -> TargetRef {
    TargetRef {
        api_version: api_version.into(),
        kind: kind.into(),
        namespace: "default".into(),
        name: name.into(),
    }
}

async fn create(sim: &KubeSim, plural_path: &str, body: serde_json::Value) {
    let (status, answer) = http(
        sim,
        "POST",
        plural_path,
        "application/json",
        body.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
}

async fn ready(t: &KubeScaleTarget, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = t.refresh().await.unwrap();
        if s.spec == n && s.ready == n {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} ready: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_scale_through_their_scale_subresource() {
    let (sim, client) = kube_sim().await;
    create(
        &sim,
        "/apis/apps/v1/namespaces/default/deployments",
        workload("apps/v1", "Deployment", "llama"),
    )
    .await;
    let t = KubeScaleTarget::discover(
        client,
        target("apps/v1", "Deployment", "llama"),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(t.has_scale_subresource());
    ready(&t, 1).await;
    t.set_replicas(3).await.unwrap();
    ready(&t, 3).await;
    assert!(
        sim.requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.uri.contains("/deployments/llama/scale")),
        "written through /scale"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_without_scale_gets_its_spec_patched() {
    let (sim, client) = kube_sim().await;
    create(
        &sim,
        "/apis/serving.example.com/v1/namespaces/default/modelbackends",
        workload("serving.example.com/v1", "ModelBackend", "tiny"),
    )
    .await;
    let t = KubeScaleTarget::discover(
        client,
        target("serving.example.com/v1", "ModelBackend", "tiny"),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(!t.has_scale_subresource());
    ready(&t, 1).await;
    t.set_replicas(2).await.unwrap();
    ready(&t, 2).await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_someone_elses_is_a_conflict_and_a_stuck_server_a_timeout() {
    let (sim, client) = kube_sim().await;
    create(
        &sim,
        "/apis/apps/v1/namespaces/default/deployments",
        workload("apps/v1", "Deployment", "llama"),
    )
    .await;
    let t = KubeScaleTarget::discover(
        client.clone(),
        target("apps/v1", "Deployment", "llama"),
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    ready(&t, 1).await;
    // Someone else scales after our read.
    let other = KubeScaleTarget::discover(
        client,
        target("apps/v1", "Deployment", "llama"),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    other.scale().await.unwrap();
    other.set_replicas(4).await.unwrap();
    let err = t.set_replicas(2).await.unwrap_err();
    assert!(matches!(err, TargetError::Conflict { .. }), "{err}");
    // Re-read, then the write goes through — as the control loop does it:
    // the pods' status updates (4 starting) also move the resourceVersion,
    // so a write may meet another conflict and is tried again on a re-read.
    let mut attempts = 0;
    loop {
        attempts += 1;
        // After a conflict the read goes to the API server, not the cache.
        t.scale().await.unwrap();
        match t.set_replicas(2).await {
            Ok(()) => break,
            Err(TargetError::Conflict { .. }) if attempts < 20 => continue,
            Err(e) => panic!("after {attempts} attempts: {e}"),
        }
    }
    // An API server that never answers: one bounded failure.
    sim.faults().add(Rule {
        verb: Some("get".into()),
        resource: Some("deployments".into()),
        rate: 1.0,
        fault: Fault::Timeout,
    });
    let started = Instant::now();
    let err = t.refresh().await.unwrap_err();
    assert!(matches!(err, TargetError::Unavailable { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    sim.shutdown().await;
}

async fn http(
    sim: &KubeSim,
    method: &str,
    path: &str,
    content_type: &str,
    body: String,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", sim.url()))
        .header("content-type", content_type)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// Applies the watch's changes to `w` until `f` holds of it.
async fn wait_for(
    rx: &mut tokio::sync::mpsc::Receiver<scalecar_scaler::kube::WorkloadChange>,
    w: &mut scalecar_scaler::kube::Workloads,
    f: impl Fn(&scalecar_scaler::kube::Workloads) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut touched = Vec::new();
    loop {
        if f(w) {
            return;
        }
        assert!(Instant::now() < deadline, "never: {w:?}");
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            c.apply(w, &mut touched);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotated_workloads_are_found_and_invalid_ones_get_a_warning() {
    use scalecar_scaler::kube::{Workload, watch_workloads};
    let (sim, client) = kube_sim().await;
    let annotated = |name: &str, annotations: serde_json::Value| {
        let mut w = workload("apps/v1", "Deployment", name);
        w["metadata"]["annotations"] = annotations;
        w
    };
    let deployments = "/apis/apps/v1/namespaces/default/deployments";
    create(
        &sim,
        deployments,
        annotated(
            "llama",
            json!({"scalecar.io/model": "llama-3-8b", "scalecar.io/max-replicas": "4"}),
        ),
    )
    .await;
    create(
        &sim,
        deployments,
        annotated(
            "bad",
            json!({"scalecar.io/model": "qwen", "scalecar.io/max-replicas": "lots"}),
        ),
    )
    .await;
    create(
        &sim,
        deployments,
        workload("apps/v1", "Deployment", "plain"),
    )
    .await;
    let listed = scalecar_scaler::kube::Listed::default();
    let mut rx = watch_workloads(
        client,
        vec![kube::api::GroupVersionKind::gvk("apps", "v1", "Deployment")],
        &["default".to_string()],
        scalecar_scaler::kube::Recognized {
            algorithms: vec!["kpa".to_string(), "hpa".to_string(), "slo".to_string()],
            endpoint_picker: None,
        },
        kube::runtime::events::Reporter {
            controller: "scalecar".into(),
            instance: Some("test".into()),
        },
        listed.clone(),
    );
    let key = |name: &str| target("apps/v1", "Deployment", name);
    let mut w = scalecar_scaler::kube::Workloads::new();
    wait_for(&mut rx, &mut w, |w| w.len() == 2).await;
    // The one watch counts its first list once it is published (and only
    // that one).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while listed.count() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the list was never counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(listed.count(), 1);
    {
        match w.get(&key("llama")) {
            Some(Workload::Valid(t)) => {
                assert_eq!(t.target.model, "llama-3-8b");
                assert_eq!(t.target.policy.max_replicas, Some(4));
            }
            other => panic!("llama: {other:?}"),
        }
        match w.get(&key("bad")) {
            Some(Workload::Invalid(why)) => assert!(
                why.contains("scalecar.io/max-replicas") && why.contains("lots"),
                "{why}"
            ),
            other => panic!("bad: {other:?}"),
        }
        assert!(!w.contains_key(&key("plain")));
    }
    // The invalid one got a Warning Event naming key and value.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, events) = http(
            &sim,
            "GET",
            "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dbad",
            "application/json",
            String::new(),
        )
        .await;
        let found = events["items"].as_array().unwrap().iter().any(|e| {
            e["reason"] == "InvalidAnnotation"
                && e["type"] == "Warning"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("scalecar.io/max-replicas"))
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no InvalidAnnotation event: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fixed: valid within a moment. Deleted: gone.
    let (status, _) = http(
        &sim,
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/bad",
        "application/merge-patch+json",
        json!({"metadata": {"annotations": {"scalecar.io/max-replicas": "3"}}}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    wait_for(&mut rx, &mut w, |w| matches!(w.get(&key("bad")), Some(Workload::Valid(t)) if t.target.policy.max_replicas == Some(3))).await;
    let (status, _) = http(
        &sim,
        "DELETE",
        "/apis/apps/v1/namespaces/default/deployments/llama",
        "application/json",
        String::new(),
    )
    .await;
    assert_eq!(status, 200);
    wait_for(&mut rx, &mut w, |w| {
        !w.contains_key(&key("llama")) && w.len() == 1
    })
    .await;
    sim.shutdown().await;
}
