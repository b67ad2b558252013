//! The patch types the API server takes: JSON merge patch (RFC 7386), JSON
//! patch (RFC 6902), strategic merge patch (merge patch with lists of
//! objects merged by key, and the directives kubectl sends), and
//! server-side apply (here: the applied configuration merged in).

use serde_json::{Map, Value};

/// Why a patch could not be applied: a 422 (or 400 for a malformed one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

/// RFC 7386: objects merge, `null` deletes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The key lists of objects merge by, as Kubernetes' strategic merge
/// declares them for the fields kubectl touches.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let key = match field {
        "conditions" => "type",
        "ports" if items.iter().any(|i| i.get("containerPort").is_some()) => "containerPort",
        "ports" => "port",
        "volumeMounts" => "mountPath",
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets" => "name",
        _ => return None,
    };
    items.iter().all(|i| i.get(key).is_some()).then_some(key)
}

/// A strategic merge patch: a merge patch where known lists of objects merge
/// by their key (`$patch: delete` removes an item), and kubectl's ordering
/// and retain directives are honoured or dropped.
pub fn strategic(target: &mut Value, patch: &Value) {
    strategic_in(target, patch, "");
}

fn strategic_in(target: &mut Value, patch: &Value, field: &str) {
    match patch {
        Value::Object(p) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut clean = p.clone();
                clean.remove("$patch");
                *target = Value::Object(clean);
                return;
            }
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let Value::Object(t) = target else { return };
            for (k, v) in p {
                if k.starts_with('$') {
                    continue; // $setElementOrder/…, $retainKeys, $patch
                }
                if v.is_null() {
                    t.remove(k);
                    continue;
                }
                if v.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.remove(k);
                    continue;
                }
                strategic_in(t.entry(k.clone()).or_insert(Value::Null), v, k);
            }
        }
        Value::Array(items) => {
            let key = merge_key(field, items);
            match (key, target.as_array_mut()) {
                (Some(key), Some(current)) => {
                    for item in items {
                        let id = item.get(key);
                        let at = current.iter().position(|c| c.get(key) == id);
                        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                        match (at, delete) {
                            (Some(i), true) => {
                                current.remove(i);
                            }
                            (Some(i), false) => {
                                if let Some(c) = current.get_mut(i) {
                                    strategic_in(c, item, "");
                                }
                            }
                            (None, true) => {}
                            (None, false) => {
                                let mut fresh = Value::Null;
                                strategic_in(&mut fresh, item, "");
                                current.push(fresh);
                            }
                        }
                    }
                }
                _ => *target = patch.clone(),
            }
        }
        other => *target = other.clone(),
    }
}

/// One JSON pointer's tokens (RFC 6901).
fn pointer(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PatchError(format!("path {path:?} does not start with /")));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn parent<'a>(root: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut at = root;
    for t in tokens {
        at = match at {
            Value::Object(o) => o
                .get_mut(t)
                .ok_or_else(|| PatchError(format!("path element {t:?} not found")))?,
            Value::Array(a) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| PatchError(format!("{t:?} is not an array index")))?;
                a.get_mut(i)
                    .ok_or_else(|| PatchError(format!("index {i} is out of range")))?
            }
            _ => return Err(PatchError(format!("path element {t:?} not found"))),
        };
    }
    Ok(at)
}

fn get_at(root: &Value, tokens: &[String]) -> Result<Value, PatchError> {
    let mut at = root;
    for t in tokens {
        at = match at {
            Value::Object(o) => o.get(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| PatchError(format!("path element {t:?} not found")))?;
    }
    Ok(at.clone())
}

fn add_at(root: &mut Value, tokens: &[String], value: Value) -> Result<(), PatchError> {
    let Some((last, head)) = tokens.split_last() else {
        *root = value;
        return Ok(());
    };
    match parent(root, head)? {
        Value::Object(o) => {
            o.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| PatchError(format!("{last:?} is not an array index")))?
            };
            if i > a.len() {
                return Err(PatchError(format!("index {i} is out of range")));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(PatchError(format!("cannot add {last:?} to a scalar"))),
    }
}

fn remove_at(root: &mut Value, tokens: &[String]) -> Result<Value, PatchError> {
    let Some((last, head)) = tokens.split_last() else {
        return Err(PatchError("cannot remove the whole document".into()));
    };
    match parent(root, head)? {
        Value::Object(o) => o
            .remove(last)
            .ok_or_else(|| PatchError(format!("path element {last:?} not found"))),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| PatchError(format!("{last:?} is not an array index")))?;
            if i >= a.len() {
                return Err(PatchError(format!("index {i} is out of range")));
            }
            Ok(a.remove(i))
        }
        _ => Err(PatchError(format!("path element {last:?} not found"))),
    }
}

/// RFC 6902: add, remove, replace, move, copy, test — all or nothing.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let Value::Array(ops) = ops else {
        return Err(PatchError("a JSON patch is an array of operations".into()));
    };
    let mut doc = target.clone();
    for (i, op) in ops.iter().enumerate() {
        let field = |name: &str| -> Result<&str, PatchError> {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| PatchError(format!("operation {i}: {name} is missing")))
        };
        let path = pointer(field("path")?)?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError(format!("operation {i}: value is missing")))
        };
        match field("op")? {
            "add" => add_at(&mut doc, &path, value()?)?,
            "remove" => {
                remove_at(&mut doc, &path)?;
            }
            "replace" => {
                remove_at(&mut doc, &path)?;
                add_at(&mut doc, &path, value()?)?;
            }
            "move" => {
                let from = pointer(field("from")?)?;
                let v = remove_at(&mut doc, &from)?;
                add_at(&mut doc, &path, v)?;
            }
            "copy" => {
                let from = pointer(field("from")?)?;
                let v = get_at(&doc, &from)?;
                add_at(&mut doc, &path, v)?;
            }
            "test" => {
                if get_at(&doc, &path)? != value()? {
                    return Err(PatchError(format!("operation {i}: test failed")));
                }
            }
            other => {
                return Err(PatchError(format!(
                    "operation {i}: {other:?} is not an operation"
                )));
            }
        }
    }
    *target = doc;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}));
    }

    #[test]
    fn strategic_patch_merges_containers_by_name_and_drops_directives() {
        let mut t = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}
        ]}, "metadata": {"labels": {"k": "v"}}});
        strategic(
            &mut t,
            &json!({
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                "spec": {"containers": [{"name": "b", "image": "y:2"}, {"name": "c", "$patch": "delete"}]},
                "metadata": {"labels": {"k": null, "n": "m"}}
            }),
        );
        assert_eq!(
            t,
            json!({"spec": {"containers": [
                {"name": "a", "image": "x:1"}, {"name": "b", "image": "y:2"}
            ]}, "metadata": {"labels": {"n": "m"}}})
        );
        strategic(
            &mut t,
            &json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]}}),
        );
        assert_eq!(t["spec"]["containers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn json_patch_is_all_or_nothing() {
        let mut t = json!({"spec": {"replicas": 1}, "l": [1, 2]});
        json_patch(
            &mut t,
            &json!([
                {"op": "replace", "path": "/spec/replicas", "value": 3},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "add", "path": "/a~1b", "value": true},
                {"op": "test", "path": "/spec/replicas", "value": 3}
            ]),
        )
        .unwrap();
        assert_eq!(
            t,
            json!({"spec": {"replicas": 3}, "l": [1, 2, 3], "a/b": true})
        );
        let before = t.clone();
        let e = json_patch(
            &mut t,
            &json!([
                {"op": "remove", "path": "/l/0"},
                {"op": "test", "path": "/spec/replicas", "value": 9}
            ]),
        )
        .unwrap_err();
        assert!(e.0.contains("test failed"));
        assert_eq!(t, before);
        assert!(json_patch(&mut t, &json!({"op": "add"})).is_err());
        assert!(json_patch(&mut t, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
