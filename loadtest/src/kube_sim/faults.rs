//! Fault injection: errors by verb and resource at a rate, added latency,
//! requests that never answer, watches dropped after a while, connections
//! refused for a while. Set by flags or `POST /kube-sim/faults`.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

/// What a request gets instead of (or before) its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This status (500, 503, 429 with Retry-After).
    Error(u16),
    /// Served after this delay.
    Latency(Duration),
    /// Never answered.
    Timeout,
}

/// One rule: requests of `verb` (or any) on `resource` (plural, or any)
/// get `fault` with probability `rate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub verb: Option<String>,
    pub resource: Option<String>,
    pub rate: f64,
    pub fault: Fault,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    drop_watches_after: Option<Duration>,
    refuse_until: Option<Instant>,
}

/// The faults in force.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(&self, rule: Rule) {
        self.lock().rules.push(rule);
    }

    pub fn clear(&self) {
        *self.lock() = State::default();
    }

    pub fn set_drop_watches_after(&self, d: Option<Duration>) {
        self.lock().drop_watches_after = d;
    }

    pub fn drop_watches_after(&self) -> Option<Duration> {
        self.lock().drop_watches_after
    }

    /// Refuse connections (close them at once) for `d`.
    pub fn refuse_for(&self, d: Duration) {
        self.lock().refuse_until = Some(Instant::now() + d);
    }

    pub fn refusing(&self) -> bool {
        self.lock().refuse_until.is_some_and(|t| Instant::now() < t)
    }

    /// The fault for one request, if a rule fires.
    pub fn pick(&self, verb: &str, resource: &str) -> Option<Fault> {
        let state = self.lock();
        let mut rng = rand::rng();
        state
            .rules
            .iter()
            .filter(|r| r.verb.as_deref().is_none_or(|v| v == verb))
            .filter(|r| r.resource.as_deref().is_none_or(|x| x == resource))
            .find(|r| rng.random_bool(r.rate.clamp(0.0, 1.0)))
            .map(|r| r.fault)
    }

    /// Replaces the faults from JSON: `{"rules": [{"verb": "patch",
    /// "resource": "deployments", "rate": 0.5, "error": 500 | "latency":
    /// "200ms" | "timeout": true}], "dropWatchesAfter": "10s",
    /// "refuseFor": "3s"}`.
    pub fn set(&self, v: &Value) -> Result<(), String> {
        let mut rules = Vec::new();
        for (i, r) in v
            .get("rules")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let s = |k: &str| r.get(k).and_then(Value::as_str).map(String::from);
            let fault = if let Some(code) = r.get("error").and_then(Value::as_u64) {
                match code {
                    429 | 500 | 503 => Fault::Error(code as u16),
                    _ => return Err(format!("rules[{i}].error: {code} is not 429, 500 or 503")),
                }
            } else if let Some(l) = s("latency") {
                Fault::Latency(
                    humantime::parse_duration(&l)
                        .map_err(|e| format!("rules[{i}].latency: {l:?}: {e}"))?,
                )
            } else if r.get("timeout").and_then(Value::as_bool) == Some(true) {
                Fault::Timeout
            } else {
                return Err(format!("rules[{i}]: needs error, latency or timeout"));
            };
            let rate = r.get("rate").and_then(Value::as_f64).unwrap_or(1.0);
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("rules[{i}].rate: {rate} is not in [0, 1]"));
            }
            rules.push(Rule {
                verb: s("verb"),
                resource: s("resource"),
                rate,
                fault,
            });
        }
        let duration = |k: &str| -> Result<Option<Duration>, String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(|d| humantime::parse_duration(d).map_err(|e| format!("{k}: {d:?}: {e}")))
                .transpose()
        };
        let drop = duration("dropWatchesAfter")?;
        let refuse = duration("refuseFor")?;
        let mut state = self.lock();
        state.rules = rules;
        state.drop_watches_after = drop;
        state.refuse_until = refuse.map(|d| Instant::now() + d);
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        let state = self.lock();
        let rules: Vec<Value> = state
            .rules
            .iter()
            .map(|r| {
                let fault = match r.fault {
                    Fault::Error(c) => json!({"error": c}),
                    Fault::Latency(d) => {
                        json!({"latency": humantime::format_duration(d).to_string()})
                    }
                    Fault::Timeout => json!({"timeout": true}),
                };
                json!({"verb": r.verb, "resource": r.resource, "rate": r.rate, "fault": fault})
            })
            .collect();
        json!({"rules": rules,
               "dropWatchesAfter": state.drop_watches_after.map(|d| humantime::format_duration(d).to_string()),
               "refusing": state.refuse_until.is_some_and(|t| Instant::now() < t)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_from_json_fire_by_verb_and_resource() {
        let f = Faults::default();
        f.set(
            &json!({"rules": [{"verb": "patch", "resource": "deployments", "error": 500}],
                      "dropWatchesAfter": "2s"}),
        )
        .unwrap();
        assert_eq!(f.pick("patch", "deployments"), Some(Fault::Error(500)));
        assert_eq!(f.pick("get", "deployments"), None);
        assert_eq!(f.pick("patch", "pods"), None);
        assert_eq!(f.drop_watches_after(), Some(Duration::from_secs(2)));
        assert!(f.set(&json!({"rules": [{"error": 404}]})).is_err());
        assert!(f.set(&json!({"rules": [{"latency": "soon"}]})).is_err());
        f.clear();
        assert_eq!(f.pick("patch", "deployments"), None);
    }
}
