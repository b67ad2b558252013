//! The API server failing under scalecar: it keeps serving and never
//! scales down blind, then recovers.

use super::*;

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
