//! How stored objects look through each resource type: core/v1 Events are
//! a second view of events.k8s.io/v1 Events (stored in the latter's form),
//! and a scalable object's `/scale` is an autoscaling/v1 Scale.

use serde_json::{Value, json};

use super::resources::{ResourceType, Storage};
use super::selector::LabelSelector;

fn is_core_event(rt: &ResourceType) -> bool {
    rt.storage == Storage::Events && rt.group.is_empty()
}

/// The stored object as `rt` shows it.
pub fn out(rt: &ResourceType, stored: Value) -> Value {
    if !is_core_event(rt) {
        return stored;
    }
    let g = |k: &str| stored.get(k).cloned().unwrap_or(Value::Null);
    let event_time = g("eventTime");
    let count = stored
        .get("deprecatedCount")
        .and_then(Value::as_u64)
        .or_else(|| stored.pointer("/series/count").and_then(Value::as_u64))
        .unwrap_or(1);
    let time = |deprecated: &str, fallback: Value| {
        stored
            .get(deprecated)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(fallback)
    };
    let first = time("deprecatedFirstTimestamp", event_time.clone());
    let last = time(
        "deprecatedLastTimestamp",
        stored
            .pointer("/series/lastObservedTime")
            .cloned()
            .unwrap_or_else(|| event_time.clone()),
    );
    let component = stored
        .pointer("/deprecatedSource/component")
        .cloned()
        .unwrap_or_else(|| g("reportingController"));
    let mut core = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": g("metadata"),
        "involvedObject": g("regarding"),
        "reason": g("reason"),
        "message": g("note"),
        "type": g("type"),
        "action": g("action"),
        "related": g("related"),
        "eventTime": event_time,
        "series": g("series"),
        "reportingComponent": g("reportingController"),
        "reportingInstance": g("reportingInstance"),
        "source": {"component": component},
        "firstTimestamp": first,
        "lastTimestamp": last,
        "count": count,
    });
    if let Some(o) = core.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    core
}

/// A field path of `rt`'s view, as stored (core/v1 Event fields are
/// events.k8s.io/v1 fields underneath).
pub fn stored_path(rt: &ResourceType, path: &str) -> Option<String> {
    if !is_core_event(rt) {
        return None;
    }
    let renames = [
        ("involvedObject.", "regarding."),
        ("message", "note"),
        ("source.component", "reportingController"),
        ("reportingComponent", "reportingController"),
    ];
    renames
        .iter()
        .find_map(|(from, to)| path.strip_prefix(from).map(|rest| format!("{to}{rest}")))
}

/// An object written through `rt`, in its stored form.
pub fn into(rt: &ResourceType, shown: Value) -> Value {
    if !is_core_event(rt) {
        return shown;
    }
    let g = |k: &str| shown.get(k).cloned().unwrap_or(Value::Null);
    let event_time = match g("eventTime") {
        Value::Null => g("firstTimestamp"),
        t => t,
    };
    let mut stored = json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": g("metadata"),
        "regarding": g("involvedObject"),
        "reason": g("reason"),
        "note": g("message"),
        "type": g("type"),
        "action": g("action"),
        "related": g("related"),
        "eventTime": event_time,
        "series": g("series"),
        "reportingController": match g("reportingComponent") {
            Value::Null => shown.pointer("/source/component").cloned().unwrap_or(Value::Null),
            c => c,
        },
        "reportingInstance": g("reportingInstance"),
        "deprecatedSource": g("source"),
        "deprecatedFirstTimestamp": g("firstTimestamp"),
        "deprecatedLastTimestamp": g("lastTimestamp"),
        "deprecatedCount": g("count"),
    });
    if let Some(o) = stored.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    stored
}

/// The label selector of a workload (`spec.selector.matchLabels`, or a
/// custom kind's `status.selector` string).
pub fn selector_of(o: &Value) -> LabelSelector {
    if let Some(m) = o
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
    {
        return LabelSelector::from_match_labels(m);
    }
    o.pointer("/status/selector")
        .and_then(Value::as_str)
        .and_then(|s| LabelSelector::parse(s).ok())
        .unwrap_or_default()
}

/// The autoscaling/v1 Scale of a scalable object.
pub fn scale_of(o: &Value) -> Value {
    let m = |k: &str| {
        o.pointer(&format!("/metadata/{k}"))
            .cloned()
            .unwrap_or(Value::Null)
    };
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": m("name"), "namespace": m("namespace"), "uid": m("uid"),
                     "resourceVersion": m("resourceVersion"), "creationTimestamp": m("creationTimestamp")},
        "spec": {"replicas": o.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1)},
        "status": {"replicas": o.pointer("/status/replicas").and_then(Value::as_u64).unwrap_or(0),
                   "selector": selector_of(o).to_query()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_sim::resources::find;

    #[test]
    fn core_events_are_a_view_of_events_k8s_io() {
        let core = find("", "v1", "events").unwrap();
        let stored = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "regarding": {"kind": "Deployment", "name": "llama"}, "reason": "SuccessfulRescale",
            "note": "New size: 3", "type": "Normal", "reportingController": "scalecar",
            "reportingInstance": "scalecar-0", "eventTime": "2026-11-30T22:15:55.000000Z", "action": "Scale"});
        let shown = out(core, stored.clone());
        assert_eq!(shown["involvedObject"]["name"], "llama");
        assert_eq!(shown["message"], "New size: 3");
        assert_eq!(shown["source"]["component"], "scalecar");
        assert_eq!(shown["count"], 1);
        assert_eq!(shown["lastTimestamp"], stored["eventTime"]);
        let back = into(core, shown);
        assert_eq!(back["regarding"], stored["regarding"]);
        assert_eq!(back["note"], stored["note"]);
        let events = find("events.k8s.io", "v1", "events").unwrap();
        assert_eq!(out(events, stored.clone()), stored);
    }

    #[test]
    fn scale_carries_the_selector_as_a_string() {
        let d = json!({"metadata": {"name": "d", "namespace": "n", "resourceVersion": "7"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "llm"}}}, "status": {"replicas": 2}});
        let s = scale_of(&d);
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["status"]["replicas"], 2);
        assert_eq!(s["status"]["selector"], "app=llm");
        assert_eq!(s["metadata"]["resourceVersion"], "7");
    }
}
