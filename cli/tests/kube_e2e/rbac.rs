//! The RBAC in `deploy/` against every call scalecar makes.

use super::*;

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
        "create configmaps",
        "patch configmaps",
    ] {
        let (verb, resource) = needed.split_once(' ').unwrap();
        assert!(
            calls
                .iter()
                .any(|((v, _, r, _), _)| v == verb && r == resource),
            "scalecar never did {needed}: {calls:#?}"
        );
    }
    // The leader's memory was kept beside the Lease (the last save at
    // shutdown, if no periodic one).
    let memory = c.kubectl(&[
        "-n",
        "scalecar",
        "get",
        "configmap",
        "scalecar-memory",
        "-o",
        "jsonpath={.data.memory\\.json}",
    ]);
    assert!(memory.contains(r#""version":1"#), "{memory}");
    for ((verb, group, resource, ns), uri) in &calls {
        // The Lease and the memory beside it.
        if resource == "leases" || resource == "configmaps" {
            assert!(
                allows(&leader_rules, verb, group, resource) && ns.as_deref() == Some("scalecar"),
                "{verb} {group}/{resource} ({uri}) is not granted by the Role scalecar-leader"
            );
            assert!(
                resource != "configmaps" || verb == "create" || uri.contains("/scalecar-memory"),
                "{uri}: only the memory ConfigMap is named in the Role"
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
