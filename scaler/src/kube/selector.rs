//! Label selectors, in both shapes Kubernetes hands them out: the string of
//! a Scale's `status.selector` (`app=llama,tier in (a,b),!canary`) and the
//! `{matchLabels, matchExpressions}` object of a workload's `spec.selector`.
//! A selector that does not parse is an error naming the part that did
//! not, never a selector that matches everything.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector. The empty selector matches every object, as in
/// Kubernetes; callers that must not select everything check
/// [`LabelSelector::is_empty`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// Why a selector could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector {selector:?}: {message}")]
pub struct SelectorError {
    pub selector: String,
    pub message: String,
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Splits on commas that are not inside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl LabelSelector {
    /// Parses the string form of a selector.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let err = |message: String| SelectorError {
            selector: text.to_string(),
            message,
        };
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(LabelSelector { requirements });
        }
        for term in terms(text) {
            let term = term.trim();
            let key_ok = |k: &str| {
                if valid_key(k) {
                    Ok(k.to_string())
                } else {
                    Err(err(format!("{k:?} is not a label key")))
                }
            };
            let value_ok = |v: &str| {
                let v = v.trim();
                if valid_value(v) {
                    Ok(v.to_string())
                } else {
                    Err(err(format!("{v:?} is not a label value")))
                }
            };
            let set = |rest: &str| -> Result<Vec<String>, SelectorError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(format!("{term:?}: a set is written (a,b)")))?;
                inner.split(',').map(value_ok).collect()
            };
            let r = if let Some(k) = term.strip_prefix('!') {
                Requirement::DoesNotExist(key_ok(k.trim())?)
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(key_ok(k.trim())?, value_ok(v)?)
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Equals(key_ok(k.trim())?, value_ok(v)?)
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Equals(key_ok(k.trim())?, value_ok(v)?)
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                Requirement::NotIn(key_ok(k.trim())?, set(rest)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Requirement::In(key_ok(k.trim())?, set(rest)?)
            } else {
                Requirement::Exists(key_ok(term)?)
            };
            requirements.push(r);
        }
        Ok(LabelSelector { requirements })
    }

    /// Reads a `metav1.LabelSelector` object (`matchLabels`,
    /// `matchExpressions`).
    pub fn from_object(v: &Value) -> Result<Self, SelectorError> {
        let err = |message: String| SelectorError {
            selector: v.to_string(),
            message,
        };
        // Validated as the API server does (found by fuzzing: an `In`
        // without values was read as matching nothing, and printed as a
        // selector that parses back differently).
        let key = |k: &str| {
            if valid_key(k) {
                Ok(k.to_string())
            } else {
                Err(err(format!("{k:?} is not a label key")))
            }
        };
        let value = |k: &str, v: &Value| match v.as_str() {
            Some(s) if valid_value(s) => Ok(s.to_string()),
            Some(s) => Err(err(format!("{k}: {s:?} is not a label value"))),
            None => Err(err(format!("{k}: {v} is not a string"))),
        };
        let mut requirements = Vec::new();
        if let Some(labels) = v.get("matchLabels") {
            let labels = labels
                .as_object()
                .ok_or_else(|| err("matchLabels is not an object".into()))?;
            for (k, val) in labels {
                requirements.push(Requirement::Equals(
                    key(k)?,
                    value(&format!("matchLabels.{k}"), val)?,
                ));
            }
        }
        if let Some(exprs) = v.get("matchExpressions") {
            let exprs = exprs
                .as_array()
                .ok_or_else(|| err("matchExpressions is not a list".into()))?;
            for (i, e) in exprs.iter().enumerate() {
                let at = format!("matchExpressions[{i}]");
                let k = e
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err(format!("{at} has no key")))?;
                let k = key(k)?;
                let values: Vec<String> = match e.get("values") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| value(&format!("{at}.values"), x))
                        .collect::<Result<_, _>>()?,
                    Some(other) => return Err(err(format!("{at}.values: {other} is not a list"))),
                };
                let operator = e.get("operator").and_then(Value::as_str);
                let r = match operator {
                    Some("In" | "NotIn") if values.is_empty() => {
                        return Err(err(format!(
                            "{at}: operator {} needs at least one value",
                            operator.unwrap_or_default()
                        )));
                    }
                    Some("Exists" | "DoesNotExist") if !values.is_empty() => {
                        return Err(err(format!(
                            "{at}: operator {} takes no values",
                            operator.unwrap_or_default()
                        )));
                    }
                    Some("In") => Requirement::In(k, values),
                    Some("NotIn") => Requirement::NotIn(k, values),
                    Some("Exists") => Requirement::Exists(k),
                    Some("DoesNotExist") => Requirement::DoesNotExist(k),
                    other => {
                        return Err(err(format!(
                            "{at}: operator {other:?} of {k:?} is not In, NotIn, Exists or DoesNotExist"
                        )));
                    }
                };
                requirements.push(r);
            }
        }
        Ok(LabelSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_string_form_reads_every_operator() {
        let s = LabelSelector::parse("app=llama,tier in (a, b),!canary,zone,env!=dev,x notin (1)")
            .unwrap();
        let mut l = labels(&[("app", "llama"), ("tier", "b"), ("zone", "z1")]);
        assert!(s.matches(&l));
        l.insert("canary".into(), "yes".into());
        assert!(!s.matches(&l), "!canary");
        l.remove("canary");
        l.insert("env".into(), "dev".into());
        assert!(!s.matches(&l), "env!=dev");
        l.insert("env".into(), "prod".into());
        l.insert("x".into(), "1".into());
        assert!(!s.matches(&l), "x notin (1)");
        l.remove("x");
        l.insert("tier".into(), "c".into());
        assert!(!s.matches(&l), "tier in (a,b)");
        // Written back and read again, the same selector.
        assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn the_object_form_reads_labels_and_expressions() {
        let s = LabelSelector::from_object(&json!({
            "matchLabels": {"app": "llama"},
            "matchExpressions": [{"key": "role", "operator": "In", "values": ["decode"]},
                                 {"key": "old", "operator": "DoesNotExist"}]
        }))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "llama"), ("role", "decode")])));
        assert!(!s.matches(&labels(&[("app", "llama"), ("role", "prefill")])));
        assert!(!s.matches(&labels(&[
            ("app", "llama"),
            ("role", "decode"),
            ("old", "")
        ])));
    }

    #[test]
    fn bad_selectors_are_errors_naming_the_part() {
        for (text, part) in [
            ("app=ll ama", "ll ama"),
            ("tier in a,b", "a set"),
            ("=x", "\"\""),
        ] {
            let e = LabelSelector::parse(text).unwrap_err();
            assert!(e.to_string().contains(part), "{text}: {e}");
        }
        let e = LabelSelector::from_object(
            &json!({"matchExpressions": [{"key": "a", "operator": "Near"}]}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("Near"), "{e}");
        assert!(LabelSelector::parse("").unwrap().is_empty());
    }

    #[test]
    fn object_selectors_are_validated_as_the_api_server_does() {
        for (v, why) in [
            (
                json!({"matchExpressions": [{"key": "k", "operator": "In"}]}),
                "needs at least one value",
            ),
            (
                json!({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": []}]}),
                "needs at least one value",
            ),
            (
                json!({"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["a"]}]}),
                "takes no values",
            ),
            (
                json!({"matchExpressions": [{"key": "k", "operator": "In", "values": [1]}]}),
                "is not a string",
            ),
            (
                json!({"matchLabels": {"app": "a,b"}}),
                "is not a label value",
            ),
            (json!({"matchLabels": {"a b": "x"}}), "is not a label key"),
        ] {
            let e = LabelSelector::from_object(&v).unwrap_err();
            assert!(e.to_string().contains(why), "{v}: {e}");
        }
        let s = LabelSelector::from_object(&json!({
            "matchExpressions": [{"key": "k", "operator": "In", "values": ["a", ""]}]
        }))
        .unwrap();
        assert_eq!(LabelSelector::parse(&s.to_string()).unwrap(), s);
    }
}
