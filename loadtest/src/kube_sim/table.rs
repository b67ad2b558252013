//! Server-side printing: the `meta.k8s.io/v1` Table `kubectl get` asks for,
//! with the columns the real server prints for the types scalecar users
//! look at (Pods with their IPs under `-o wide`, Deployments, Events, …)
//! and Name/Age for the rest.

use serde_json::{Value, json};

use super::resources::{ResourceType, Storage};
use super::time::{parse_rfc3339, unix_now};

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// Whether an Accept header asks for a Table.
pub fn wanted(accept: &str) -> bool {
    accept.contains("as=Table")
}

/// `5s`, `3m2s`, `4h10m`, `6d` — as kubectl's HumanDuration.
pub fn human(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        match secs % 60 {
            0 => format!("{m}m"),
            s => format!("{m}m{s}s"),
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        match h % 24 {
            0 => format!("{d}d"),
            r => format!("{d}d{r}h"),
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn age(ts: Option<&str>) -> String {
    match ts.and_then(parse_rfc3339) {
        Some(t) => human(unix_now().saturating_sub(t)),
        None => "<unknown>".into(),
    }
}

fn s<'a>(o: &'a Value, pointer: &str) -> &'a str {
    o.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn n(o: &Value, pointer: &str) -> u64 {
    o.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

/// (name, type, priority) of each column.
fn columns(rt: &ResourceType) -> Vec<(&'static str, &'static str, u8)> {
    let name = ("Name", "string", 0);
    let age = ("Age", "string", 0);
    match (rt.storage, rt.kind) {
        (Storage::Pods, _) => vec![
            name,
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            age,
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        (Storage::Deployments, _) => vec![
            name,
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        (Storage::StatefulSets, _) => vec![
            name,
            ("Ready", "string", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
        ],
        (Storage::Services, _) => vec![
            name,
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            age,
            ("Selector", "string", 1),
        ],
        (Storage::Events, _) => vec![
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        (Storage::Leases, _) => vec![name, ("Holder", "string", 0), age],
        (Storage::EndpointSlices, _) => vec![
            name,
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            age,
        ],
        (Storage::Namespaces, _) => vec![name, ("Status", "string", 0), age],
        (Storage::ModelServers | Storage::ModelBackends, _) => {
            vec![name, ("Ready", "string", 0), age]
        }
        _ => vec![name, age],
    }
}

fn containers(o: &Value, field: &str) -> String {
    o.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get(field).and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// The cells of one object (`o` as `rt` shows it).
fn cells(rt: &ResourceType, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let created = age(o
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str));
    match rt.storage {
        Storage::Pods => {
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            // As kubectl shows it: a container's waiting reason
            // (CreateContainerConfigError, ContainerCreating) over the phase.
            let waiting = statuses
                .iter()
                .find_map(|c| c.pointer("/state/waiting/reason").and_then(Value::as_str));
            let status = if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating".to_string()
            } else if let Some(reason) = waiting {
                reason.to_string()
            } else {
                or_none(s(o, "/status/phase").to_string())
            };
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!("0"),
                json!(created),
                json!(or_none(s(o, "/status/podIP").to_string())),
                json!(or_none(s(o, "/spec/nodeName").to_string())),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        Storage::Deployments => vec![
            name,
            json!(format!(
                "{}/{}",
                n(o, "/status/readyReplicas"),
                n(o, "/spec/replicas")
            )),
            json!(n(o, "/status/updatedReplicas")),
            json!(n(o, "/status/availableReplicas")),
            json!(created),
            json!(containers(o, "name")),
            json!(containers(o, "image")),
            json!(super::view::selector_of(o).to_query()),
        ],
        Storage::StatefulSets => vec![
            name,
            json!(format!(
                "{}/{}",
                n(o, "/status/readyReplicas"),
                n(o, "/spec/replicas")
            )),
            json!(created),
            json!(containers(o, "name")),
            json!(containers(o, "image")),
        ],
        Storage::Services => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            format!(
                                "{}/{}",
                                n(p, "/port"),
                                p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let selector = o
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let kind = match s(o, "/spec/type") {
                "" => "ClusterIP",
                t => t,
            };
            vec![
                name,
                json!(kind),
                json!(or_none(s(o, "/spec/clusterIP").to_string())),
                json!("<none>"),
                json!(or_none(ports.join(","))),
                json!(created),
                json!(or_none(selector)),
            ]
        }
        Storage::Events => {
            // Either view: core/v1 or events.k8s.io/v1 field names.
            let pick = |a: &str, b: &str| match s(o, a) {
                "" => s(o, b).to_string(),
                v => v.to_string(),
            };
            let last = ["/lastTimestamp", "/deprecatedLastTimestamp", "/eventTime"]
                .iter()
                .find_map(|p| {
                    o.pointer(p)
                        .and_then(Value::as_str)
                        .filter(|v| !v.is_empty())
                })
                .map(|t| age(Some(t)))
                .unwrap_or_else(|| created.clone());
            let object = format!(
                "{}/{}",
                pick("/involvedObject/kind", "/regarding/kind").to_lowercase(),
                pick("/involvedObject/name", "/regarding/name")
            );
            vec![
                json!(last),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(pick("/message", "/note")),
            ]
        }
        Storage::Leases => vec![
            name,
            json!(or_none(s(o, "/spec/holderIdentity").to_string())),
            json!(created),
        ],
        Storage::EndpointSlices => {
            let ports: Vec<String> = o
                .pointer("/ports")
                .and_then(Value::as_array)
                .map(|ps| ps.iter().map(|p| n(p, "/port").to_string()).collect())
                .unwrap_or_default();
            let addresses: Vec<String> = o
                .pointer("/endpoints")
                .and_then(Value::as_array)
                .map(|es| {
                    es.iter()
                        .filter_map(|e| {
                            e.pointer("/addresses/0")
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(or_none(ports.join(","))),
                json!(or_none(addresses.join(","))),
                json!(created),
            ]
        }
        Storage::Namespaces => vec![name, json!(s(o, "/status/phase")), json!(created)],
        Storage::ModelServers | Storage::ModelBackends => vec![
            name,
            json!(format!(
                "{}/{}",
                n(o, "/status/readyReplicas"),
                n(o, "/spec/replicas")
            )),
            json!(created),
        ],
        _ => vec![name, json!(created)],
    }
}

fn definitions(rt: &ResourceType) -> Vec<Value> {
    columns(rt)
        .into_iter()
        .map(|(name, kind, priority)| {
            json!({"name": name, "type": kind, "format": if name == "Name" { "name" } else { "" },
                   "description": "", "priority": priority})
        })
        .collect()
}

fn row(rt: &ResourceType, o: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells(rt, o)});
    match include {
        Include::None => {}
        Include::Metadata => {
            r["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                 "metadata": o.get("metadata").cloned().unwrap_or(json!({}))});
        }
        Include::Object => r["object"] = o.clone(),
    }
    r
}

/// A Table of `items` (each already as `rt` shows it).
pub fn table(rt: &ResourceType, items: &[Value], meta: Value, include: Include) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": definitions(rt),
        "rows": items.iter().map(|o| row(rt, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_sim::resources::find;

    #[test]
    fn human_durations_as_kubectl_prints_them() {
        for (secs, want) in [
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 120, "3h2m"),
            (10 * 3600, "10h"),
            (3 * 86_400 + 3600, "3d1h"),
            (30 * 86_400, "30d"),
            (800 * 86_400, "2y"),
        ] {
            assert_eq!(human(secs), want, "{secs}");
        }
    }

    #[test]
    fn pods_show_readiness_status_and_ip() {
        let pods = find("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c"}], "nodeName": "kube-sim"},
            "status": {"phase": "Running", "podIP": "127.0.0.2", "containerStatuses": [{"ready": true}]}});
        let t = table(pods, &[pod], json!({}), Include::Metadata);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "p");
        assert_eq!(cells[1], "1/1");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[5], "127.0.0.2");
        assert_eq!(t["columnDefinitions"][5]["priority"], 1);
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "p");
    }
}
