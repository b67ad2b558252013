//! Label selectors (`app=x,tier in (a,b),!canary`) and field selectors
//! (`metadata.name=x,status.phase!=Running`), parsed once per request.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
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
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn set(values: &str) -> Result<Vec<String>, String> {
    let inner = values
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| format!("{values:?} is not a (value, …) set"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for t in terms(s) {
            let r = if let Some(key) = t.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = t.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==") {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once('=') {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set(v)?)
            } else if let Some((k, v)) = t.split_once(" in ") {
                Requirement::In(k.trim().into(), set(v)?)
            } else if t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                Requirement::Exists(t.to_string())
            } else {
                return Err(format!("unable to parse requirement {t:?}"));
            };
            reqs.push(r);
        }
        Ok(LabelSelector(reqs))
    }

    /// From a `matchLabels` map (a workload's selector).
    pub fn from_match_labels(labels: &serde_json::Map<String, Value>) -> Self {
        LabelSelector(
            labels
                .iter()
                .map(|(k, v)| Requirement::Equals(k.clone(), v.as_str().unwrap_or("").into()))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }

    /// `k=v,…` for equality-only selectors (a Scale's `status.selector`).
    pub fn to_query(&self) -> String {
        self.0
            .iter()
            .filter_map(|r| match r {
                Requirement::Equals(k, v) => Some(format!("{k}={v}")),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A parsed field selector: dotted paths equal (or not) to a string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for t in terms(s) {
            let (k, eq, v) = if let Some((k, v)) = t.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = t.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = t.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector {t:?}: need field=value"));
            };
            out.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    /// The same selector on paths renamed by `map` (a field of a view to
    /// the field it is stored as).
    pub fn renamed(mut self, map: impl Fn(&str) -> Option<String>) -> Self {
        for (path, _, _) in &mut self.0 {
            if let Some(p) = map(path) {
                *path = p;
            }
        }
        self
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            let got = match object.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_of_every_form() {
        let o = json!({"metadata": {"labels": {"app": "llm", "tier": "gpu"}}});
        for (s, want) in [
            ("", true),
            ("app=llm", true),
            ("app==llm,tier=gpu", true),
            ("app!=llm", false),
            ("tier in (cpu, gpu)", true),
            ("tier notin (gpu)", false),
            ("app", true),
            ("!canary", true),
            ("canary", false),
            ("app=llm,tier in (cpu)", false),
        ] {
            assert_eq!(LabelSelector::parse(s).unwrap().matches(&o), want, "{s}");
        }
        assert!(LabelSelector::parse("tier in cpu").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
    }

    #[test]
    fn field_selectors_read_dotted_paths() {
        let o =
            json!({"metadata": {"name": "x", "namespace": "d"}, "status": {"phase": "Running"}});
        assert!(FieldSelector::parse("metadata.name=x").unwrap().matches(&o));
        assert!(
            FieldSelector::parse("status.phase!=Pending,metadata.namespace=d")
                .unwrap()
                .matches(&o)
        );
        assert!(!FieldSelector::parse("metadata.name=y").unwrap().matches(&o));
        assert!(FieldSelector::parse("spec.nodeName=").unwrap().matches(&o));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
