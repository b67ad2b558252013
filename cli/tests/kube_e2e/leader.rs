//! Leader election: one writer, a replaced leader without overlap, no
//! write after the renew deadline.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_one_leader_and_a_killed_leader_is_replaced_without_overlap() {
    let c = Cluster::start().await;
    let d = c
        .deployment(
            "shared",
            "shared",
            json!({"scalecar.io/model": "shared", "scalecar.io/min-replicas": "2"}),
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
        let client = r.openai();
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

/// A stalled API server (Lease calls never answered) while a write is due
/// every tick: writes go on while the Lease is still good and none leaves
/// later than the last renewal plus the renew deadline. (Here the
/// elector's own timing keeps it too — its attempts time out each retry
/// period; what the write-time check adds, for a tick that outlasts the
/// deadline, is the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_leaves_after_the_renew_deadline_when_the_api_stalls() {
    let c = Cluster::start().await;
    let d = c
        .deployment(
            "busy",
            "busy",
            json!({"scalecar.io/model": "busy", "scalecar.io/min-replicas": "2"}),
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
    let d = c
        .deployment(
            "late",
            "late",
            json!({"scalecar.io/model": "late", "scalecar.io/min-replicas": "2"}),
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
    let d = c
        .deployment(
            "alone",
            "alone",
            json!({"scalecar.io/model": "alone", "scalecar.io/min-replicas": "2"}),
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

/// The memory the leader keeps in `scalecar-memory`, when there is one.
async fn memory(c: &Cluster) -> Option<Value> {
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(c.client.clone(), "default");
    let map = maps.get_opt("scalecar-memory").await.ok()??;
    serde_json::from_str(map.data?.get("memory.json")?).ok()
}

/// A rolling update: the leader saves at once (the periodic save's first),
/// then stops (SIGTERM) and saves what its slo learnt since — the next
/// periodic save is 30 s away, so only the last one can hold it — before
/// it gives the Lease up; the replica started next leads, reads it, starts
/// each target from it, and keeps it in its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_starts_from_what_the_last_one_learnt() {
    let c = Cluster::start().await;
    c.deployment(
        "learnt",
        "learnt",
        json!({"scalecar.io/model": "learnt", "scalecar.io/algorithm": "slo",
                   "scalecar.io/ttft-target": "2s"}),
    )
    .await;
    let mut replicas = vec![Replica::start(&c, 0, "")];
    let (_, first) = one_leader(&[&replicas[0]], Duration::from_secs(15)).await;
    // The periodic save begins at once (then every 30 s), beside the loop.
    eventually("a first save", Duration::from_secs(10), || async {
        let m = memory(&c).await?;
        (m["holder"] == first.as_str()).then_some(())
    })
    .await;
    let client = replicas[0].openai();
    eventually("the model routed", Duration::from_secs(15), || async {
        let (_, body) = get(&format!("http://{}/v1/models", replicas[0].proxy))
            .await
            .ok()?;
        body.contains("\"learnt\"").then_some(())
    })
    .await;
    for _ in 0..4 {
        assert!(!chat(&client, "learnt", "remember this", 4).await.is_empty());
    }
    // Its needs are in the decisions by now: a slo decision each 300 ms.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let pid = replicas[0].child.id().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let stopping = Instant::now();
    replicas[0].child.wait().unwrap();
    // Saved at its stop, under its name, while it still held the Lease:
    // its last memory write comes before it gives the Lease up.
    let by_first = |r: &&scalecar_loadtest::kube_sim::RequestRecord| {
        r.user_agent.contains(&first) && r.at >= stopping
    };
    let requests = c.sim.requests();
    // When the first replica last sent `method` to a path containing `path`.
    let last = |method: &str, path: &str| {
        requests
            .iter()
            .filter(by_first)
            .filter(|r| r.method == method && r.uri.contains(path))
            .map(|r| r.at)
            .max()
    };
    let saved_at =
        last("PATCH", "/configmaps/scalecar-memory").expect("a memory write after SIGTERM");
    let released_at = last("PUT", "/leases/").expect("the Lease given up");
    assert!(
        saved_at < released_at,
        "the memory was written after the Lease was given up"
    );
    let saved = memory(&c).await.expect("the leader saved its memory");
    assert_eq!(saved["holder"], first.as_str(), "{saved}");
    let (name, target) = saved["targets"]
        .as_object()
        .and_then(|t| t.iter().find(|(k, _)| k.contains("learnt")))
        .expect("the target's memory");
    assert_eq!(target["algorithm"], "slo", "{name}: {target}");
    assert!(
        target["state"]["hold"]["needs"]
            .as_array()
            .is_some_and(|n| !n.is_empty()),
        "{target}"
    );
    // The next replica (a rolling update's) leads, recalls it, and saves it
    // as its own.
    replicas.push(Replica::start(&c, 1, ""));
    let (_, second) = one_leader(&[&replicas[1]], Duration::from_secs(10)).await;
    assert_ne!(second, first);
    eventually("the memory recalled", Duration::from_secs(10), || async {
        let (_, text) = get(&format!("http://{}/metrics", replicas[1].admin))
            .await
            .ok()?;
        let count = |event: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "scalecar_memory_events_total{{event=\"{event}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        (count("loaded")? == 1 && count("recalled")? == 1 && count("refused")? == 0).then_some(())
    })
    .await;
    // And says so to whoever asks.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .args(["status", "--admin", &replicas[1].admin])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("Memory:        1 recalled, 0 refused at 1 leaderships"),
        "{status}"
    );
    eventually(
        "saved by the new leader",
        Duration::from_secs(10),
        || async {
            let m = memory(&c).await?;
            (m["holder"] == second.as_str() && m["targets"].get(name.as_str()).is_some())
                .then_some(())
        },
    )
    .await;
    drop(replicas);
    c.stop().await;
}
