//! Peers: the leader decides on every replica's traffic, summed.

use super::*;

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
            let client = r.openai();
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
    let d = c.deployment("kept", "kept", json!({"scalecar.io/algorithm": "kpa", "scalecar.io/model": "kept", "scalecar.io/target": "2",
                   "scalecar.io/target-utilization-percentage": "100",
                   "scalecar.io/max-replicas": "10", "scalecar.io/window": "6s"})).await;
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
