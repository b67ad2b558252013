//! What the control loop decided, made visible: Prometheus metrics per
//! target (desired, spec and ready replicas, panic, the values and target
//! the algorithm used, scale events and errors), a log line per change, and
//! the latest status of each target for live views.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use scalecar_scaler::control::{DecisionObserver, LogObserver, TargetStatus, WriteGuard};
use scalecar_scaler::target::TargetError;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabels {
    target: String,
    /// The target's model and role, so its series join the pool's
    /// (`on (model, role)`) in queries and alerts.
    model: String,
    role: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MemoryLabels {
    /// `loaded`, `empty`, `saved`, `failed`, `recalled`, `refused`.
    event: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    target: String,
    /// `conflict`, `not_found` or `unavailable`.
    reason: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Records every decision.
#[derive(Debug)]
pub struct DecisionRecorder {
    desired: Family<TargetLabels, Gauge>,
    spec: Family<TargetLabels, Gauge>,
    ready: Family<TargetLabels, Gauge>,
    panic: Family<TargetLabels, Gauge>,
    stable_value: Family<TargetLabels, FloatGauge>,
    panic_value: Family<TargetLabels, FloatGauge>,
    target_value: Family<TargetLabels, FloatGauge>,
    prefill_rate: Family<TargetLabels, FloatGauge>,
    decode_rate: Family<TargetLabels, FloatGauge>,
    kv_cache: Family<TargetLabels, Gauge>,
    min: Family<TargetLabels, Gauge>,
    max: Family<TargetLabels, Gauge>,
    scale_events: Family<TargetLabels, Counter>,
    scale_errors: Family<ErrorLabels, Counter>,
    /// What happened to the leader's memory (loads, saves, recalls).
    memory: Family<MemoryLabels, Counter>,
    /// Each target's latest decision and when it was made (Unix seconds).
    latest: Mutex<BTreeMap<String, (TargetStatus, f64)>>,
    /// 1 while this replica decides.
    leader: Gauge,
    /// Writes the Lease check refused (shared with [`CountedGuard`]).
    writes_refused: Counter,
    /// (leading, the holder last seen).
    leadership: Mutex<(bool, Option<String>)>,
    /// Each target's last change and when.
    last_change: Mutex<BTreeMap<String, (TargetStatus, f64)>>,
    /// The last changes (bounded), newest last.
    changes: Mutex<std::collections::VecDeque<TargetStatus>>,
    decisions: AtomicU64,
    /// Each target's series, resolved at its first decision as leader.
    series: Mutex<std::collections::HashMap<String, TargetSeries>>,
}

/// One target's decision series: a label lookup hashes three strings
/// under a lock, and a dozen a target each tick added up at 1,000 targets.
#[derive(Debug, Clone)]
struct TargetSeries {
    desired: Gauge,
    spec: Gauge,
    ready: Gauge,
    panic: Gauge,
    stable_value: FloatGauge,
    panic_value: FloatGauge,
    target_value: FloatGauge,
    min: Gauge,
    /// Created once measured (a rate is shown from its first value on).
    prefill_rate: Option<FloatGauge>,
    decode_rate: Option<FloatGauge>,
    /// Created once the KV cache is known.
    kv_cache: Option<Gauge>,
    /// The ceiling's series while the policy sets one (removed when unset).
    max: Option<Gauge>,
}

/// A write guard whose refusals are counted: each one is a tick that
/// outlasted the renew deadline, which an operator should see.
#[derive(Debug)]
struct CountedGuard {
    inner: Arc<dyn WriteGuard>,
    refused: Counter,
}

impl WriteGuard for CountedGuard {
    fn may_write(&self) -> bool {
        let may = self.inner.may_write();
        if !may {
            self.refused.inc();
        }
        may
    }
}

/// How many changes [`DecisionRecorder::changes`] keeps.
const KEPT_CHANGES: usize = 256;

impl DecisionRecorder {
    pub fn register(reg: &mut Registry) -> Self {
        let r = DecisionRecorder {
            desired: Family::default(),
            spec: Family::default(),
            ready: Family::default(),
            panic: Family::default(),
            stable_value: Family::default(),
            panic_value: Family::default(),
            target_value: Family::default(),
            prefill_rate: Family::default(),
            decode_rate: Family::default(),
            kv_cache: Family::default(),
            min: Family::default(),
            max: Family::default(),
            scale_events: Family::default(),
            scale_errors: Family::default(),
            memory: Family::default(),
            writes_refused: Counter::default(),
            latest: Mutex::new(BTreeMap::new()),
            leader: Gauge::default(),
            leadership: Mutex::new((true, None)),
            last_change: Mutex::new(BTreeMap::new()),
            changes: Mutex::new(std::collections::VecDeque::new()),
            series: Mutex::new(std::collections::HashMap::new()),
            decisions: AtomicU64::new(0),
        };
        reg.register(
            "scalecar_desired_replicas",
            "Replicas the algorithm asks for, before bounds and behavior (the current count when it has no decision)",
            r.desired.clone(),
        );
        reg.register(
            "scalecar_spec_replicas",
            "Replicas the target asks for (spec.replicas) after this decision",
            r.spec.clone(),
        );
        reg.register(
            "scalecar_ready_replicas",
            "Replicas ready to serve",
            r.ready.clone(),
        );
        reg.register(
            "scalecar_panic_mode",
            "1 while the algorithm is in panic mode",
            r.panic.clone(),
        );
        reg.register(
            "scalecar_stable_value",
            "The algorithm's metric over the stable window (pool total)",
            r.stable_value.clone(),
        );
        reg.register(
            "scalecar_panic_value",
            "The algorithm's metric over the panic window (pool total)",
            r.panic_value.clone(),
        );
        reg.register(
            "scalecar_target_value",
            "The per-replica target the algorithm used",
            r.target_value.clone(),
        );
        reg.register(
            "scalecar_replica_prefill_rate",
            "Prompt tokens one replica prefilled per second while it had prompts waiting for their first token, over the stable window (absent until measured)",
            r.prefill_rate.clone(),
        );
        reg.register(
            "scalecar_replica_decode_rate",
            "Tokens one replica generated per second while it had sequences decoding, over the stable window (absent until measured)",
            r.decode_rate.clone(),
        );
        reg.register(
            "scalecar_replica_kv_cache_tokens",
            "Tokens one replica's KV cache holds: the policy's kv-cache-tokens, else the smallest an engine of the pool reported on its /metrics (absent until known)",
            r.kv_cache.clone(),
        );
        reg.register(
            "scalecar_min_replicas",
            "The target's min-replicas",
            r.min.clone(),
        );
        reg.register(
            "scalecar_max_replicas",
            "The target's max-replicas (absent when unbounded)",
            r.max.clone(),
        );
        reg.register(
            "scalecar_scale_events",
            "Decisions that changed the replica count",
            r.scale_events.clone(),
        );
        reg.register(
            "scalecar_leader",
            "1 while this replica is the leader: it decides, patches and writes Events",
            r.leader.clone(),
        );
        r.leader.set(1);
        reg.register(
            "scalecar_writes_refused",
            "Scale writes not made because this replica's Lease lapsed during the tick (a tick longer than the renew deadline: slow peers or API server)",
            r.writes_refused.clone(),
        );
        reg.register(
            "scalecar_scale_errors",
            "Failed reads or writes of the scale target, by reason (conflict, not_found, unavailable)",
            r.scale_errors.clone(),
        );
        reg.register(
            "scalecar_memory_events",
            "What happened to the memory leaders hand on: documents loaded (or none there yet), saved, failed to load or save; targets that started from it (recalled) or not (refused: too old, another policy)",
            r.memory.clone(),
        );
        for e in scalecar_scaler::memory::MemoryEvent::ALL {
            drop(r.memory.get_or_create(&MemoryLabels { event: e.as_str() }));
        }
        r
    }

    /// `inner`, counting what it refuses in `scalecar_writes_refused_total`.
    pub fn count_refusals(&self, inner: Arc<dyn WriteGuard>) -> Arc<dyn WriteGuard> {
        Arc::new(CountedGuard {
            inner,
            refused: self.writes_refused.clone(),
        })
    }

    /// Decisions made so far (one per target per tick).
    pub fn ticks(&self) -> u64 {
        self.decisions.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The last decisions that changed a replica count, oldest first.
    pub fn changes(&self) -> Vec<TargetStatus> {
        self.changes
            .lock()
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The latest status of every target.
    pub fn latest(&self) -> Vec<TargetStatus> {
        self.latest
            .lock()
            .map(|m| m.values().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default()
    }

    /// Who decides: this replica (`leading`) and the Lease holder last seen.
    /// A replica that does not lead exports no decision series: after a
    /// leader change only the new leader's remain, so `max(...)` shows no
    /// ghost of the old one and `on (target)` joins stay one-to-one.
    pub fn set_leadership(&self, leading: bool, holder: Option<String>) {
        self.leader.set(i64::from(leading));
        if let Ok(mut l) = self.leadership.lock() {
            *l = (leading, holder);
        }
        if !leading {
            for f in [&self.desired, &self.spec, &self.ready, &self.panic] {
                f.clear();
            }
            for f in [
                &self.stable_value,
                &self.panic_value,
                &self.target_value,
                &self.prefill_rate,
                &self.decode_rate,
            ] {
                f.clear();
            }
            self.min.clear();
            self.max.clear();
            if let Ok(mut m) = self.latest.lock() {
                m.clear();
            }
            // The handles left the families: resolved again on leading.
            if let Ok(mut m) = self.series.lock() {
                m.clear();
            }
        }
    }

    fn leading(&self) -> bool {
        self.leadership.lock().map(|l| l.0).unwrap_or(false)
    }

    /// Every target's latest decision and last rescale, as `/debug/targets`
    /// serves them to `scalecar status`.
    pub fn targets_json(&self) -> serde_json::Value {
        let latest = self.latest.lock().map(|m| m.clone()).unwrap_or_default();
        let changes = self
            .last_change
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let targets: Vec<serde_json::Value> = latest
            .iter()
            .map(|(name, (s, at))| {
                let last = changes.get(name).map(|(c, at)| {
                    serde_json::json!({"at_unix": at, "from": c.spec, "to": c.applied, "reason": c.reason})
                });
                serde_json::json!({
                    "name": name,
                    "model": s.model,
                    "role": s.role.as_str(),
                    "algorithm": s.algorithm,
                    "metric": s.metric,
                    "advisory": s.advisory,
                    "ready": s.ready,
                    "desired": s.desired,
                    "applied": s.applied,
                    "spec": if s.changed && !s.advisory { s.applied } else { s.spec },
                    "panic": s.panic,
                    "partial": s.partial,
                    "stable_value": s.stable_value,
                    "panic_value": s.panic_value,
                    "target": s.target,
                    "prefill_rate": s.prefill_rate,
                    "decode_rate": s.decode_rate,
                    "kv_cache_tokens": s.kv_capacity,
                    "reason": s.reason,
                    "decided_unix": at,
                    "last_rescale": last,
                })
            })
            .collect();
        let (leading, holder) = self
            .leadership
            .lock()
            .map(|l| l.clone())
            .unwrap_or((false, None));
        let memory: serde_json::Map<String, serde_json::Value> =
            scalecar_scaler::memory::MemoryEvent::ALL
                .iter()
                .map(|e| {
                    let n = self
                        .memory
                        .get_or_create(&MemoryLabels { event: e.as_str() })
                        .get();
                    (e.as_str().to_string(), serde_json::Value::from(n))
                })
                .collect();
        serde_json::json!({
            "leader": {"leading": leading, "holder": holder},
            "memory": memory,
            "targets": targets,
        })
    }
}

impl DecisionObserver for DecisionRecorder {
    fn decided(&self, s: &TargetStatus) {
        // A tick that ends after leadership was lost: its decision is
        // logged, not exported.
        if !self.leading() {
            LogObserver.decided(s);
            return;
        }
        let l = TargetLabels {
            target: s.name.clone(),
            model: s.model.clone(),
            role: s.role.as_str(),
        };
        let first = self
            .latest
            .lock()
            .map(|m| !m.contains_key(&s.name))
            .unwrap_or(false);
        if first {
            // Error counters exist from a target's first decision, at 0:
            // rate() and alerts see a series before anything fails.
            for reason in ["conflict", "not_found", "unavailable"] {
                drop(self.scale_errors.get_or_create(&ErrorLabels {
                    target: s.name.clone(),
                    reason,
                }));
            }
            drop(self.scale_events.get_or_create(&l));
        }
        // What the target asks for now: the new count once it took it.
        let spec = if s.changed && !s.advisory {
            s.applied
        } else {
            s.spec
        };
        if let Ok(mut all) = self.series.lock() {
            let t = all.entry(s.name.clone()).or_insert_with(|| TargetSeries {
                desired: self.desired.get_or_create_owned(&l),
                spec: self.spec.get_or_create_owned(&l),
                ready: self.ready.get_or_create_owned(&l),
                panic: self.panic.get_or_create_owned(&l),
                stable_value: self.stable_value.get_or_create_owned(&l),
                panic_value: self.panic_value.get_or_create_owned(&l),
                target_value: self.target_value.get_or_create_owned(&l),
                min: self.min.get_or_create_owned(&l),
                prefill_rate: None,
                decode_rate: None,
                kv_cache: None,
                max: None,
            });
            t.desired.set(i64::from(s.desired.unwrap_or(s.spec)));
            t.spec.set(i64::from(spec));
            t.ready.set(i64::from(s.ready));
            t.panic.set(i64::from(s.panic));
            t.stable_value.set(s.stable_value);
            t.panic_value.set(s.panic_value);
            t.target_value.set(s.target);
            // A rate is shown while it is measured; the last one stands
            // when the pool goes quiet (nothing new was learned).
            if let Some(r) = s.prefill_rate {
                t.prefill_rate
                    .get_or_insert_with(|| self.prefill_rate.get_or_create_owned(&l))
                    .set(r);
            }
            if let Some(r) = s.decode_rate {
                t.decode_rate
                    .get_or_insert_with(|| self.decode_rate.get_or_create_owned(&l))
                    .set(r);
            }
            if let Some(kv) = s.kv_capacity {
                t.kv_cache
                    .get_or_insert_with(|| self.kv_cache.get_or_create_owned(&l))
                    .set(i64::try_from(kv).unwrap_or(i64::MAX));
            }
            t.min.set(i64::from(s.min_replicas));
            match s.max_replicas {
                Some(m) => {
                    t.max
                        .get_or_insert_with(|| self.max.get_or_create_owned(&l))
                        .set(i64::from(m));
                }
                None => {
                    if t.max.take().is_some() {
                        self.max.remove(&l);
                    }
                }
            }
        }
        if s.changed {
            self.scale_events.get_or_create(&l).inc();
            if let Ok(mut c) = self.changes.lock() {
                if c.len() == KEPT_CHANGES {
                    c.pop_front();
                }
                c.push_back(s.clone());
            }
        }
        LogObserver.decided(s);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if s.changed
            && let Ok(mut m) = self.last_change.lock()
        {
            m.insert(s.name.clone(), (s.clone(), now));
        }
        if let Ok(mut m) = self.latest.lock() {
            m.insert(s.name.clone(), (s.clone(), now));
        }
        self.decisions
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn scale_failed(&self, name: &str, error: &TargetError) {
        self.scale_errors
            .get_or_create(&ErrorLabels {
                target: name.to_string(),
                reason: error.reason(),
            })
            .inc();
        LogObserver.scale_failed(name, error);
    }

    fn memory(&self, event: scalecar_scaler::memory::MemoryEvent) {
        self.memory
            .get_or_create(&MemoryLabels {
                event: event.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scalecar_config::Role;
    use std::time::Duration;

    fn status(desired: Option<u32>, applied: u32, spec: u32, changed: bool) -> TargetStatus {
        TargetStatus {
            name: "t".into(),
            model: "m".into(),
            role: Role::Unified,
            algorithm: "kpa".into(),
            metric: "concurrency",
            at: Duration::ZERO,
            advisory: false,
            desired,
            applied,
            spec,
            partial: false,
            ready: spec,
            panic: false,
            stable_value: 0.0,
            panic_value: 0.0,
            target: 1.0,
            prefill_rate: None,
            decode_rate: None,
            kv_capacity: None,
            min_replicas: 1,
            max_replicas: Some(10),
            reason: String::new(),
            changed,
        }
    }

    fn exposition(reg: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, reg).unwrap();
        text
    }

    #[test]
    fn a_replica_that_stops_leading_exports_no_decision_series() {
        let mut reg = Registry::default();
        let r = DecisionRecorder::register(&mut reg);
        r.decided(&status(Some(3), 3, 2, true));
        let text = exposition(&reg);
        for series in [
            "scalecar_desired_replicas{",
            "scalecar_spec_replicas{",
            "scalecar_max_replicas{target=\"t\",model=\"m\",role=\"unified\"} 10",
            "scalecar_min_replicas{target=\"t\",model=\"m\",role=\"unified\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        r.set_leadership(false, Some("other".into()));
        // A tick that ends after the loss changes nothing either.
        r.decided(&status(Some(4), 4, 3, true));
        let text = exposition(&reg);
        for gone in [
            "scalecar_desired_replicas{",
            "scalecar_spec_replicas{",
            "scalecar_ready_replicas{",
            "scalecar_max_replicas{",
            "scalecar_target_value{",
        ] {
            assert!(!text.contains(gone), "{gone} still exported:\n{text}");
        }
        assert!(text.contains("scalecar_leader 0"), "{text}");
        assert_eq!(r.latest().len(), 0);
        // Leading again: series come back with the next decision.
        r.set_leadership(true, None);
        r.decided(&status(Some(4), 4, 3, true));
        assert!(
            exposition(&reg)
                .contains("scalecar_desired_replicas{target=\"t\",model=\"m\",role=\"unified\"} 4")
        );
    }

    #[test]
    fn desired_is_the_decision_and_events_count_real_changes() {
        let mut reg = Registry::default();
        let r = DecisionRecorder::register(&mut reg);
        // The algorithm wants 0, min-replicas holds 1, nothing changes.
        r.decided(&status(Some(0), 1, 1, false));
        let text = exposition(&reg);
        assert!(
            text.contains("scalecar_desired_replicas{target=\"t\",model=\"m\",role=\"unified\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("scalecar_spec_replicas{target=\"t\",model=\"m\",role=\"unified\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains(
                "scalecar_scale_events_total{target=\"t\",model=\"m\",role=\"unified\"} 1"
            ),
            "{text}"
        );
        // A real change from 1 to 6: spec follows, one event.
        r.decided(&status(Some(6), 6, 1, true));
        let text = exposition(&reg);
        assert!(
            text.contains("scalecar_desired_replicas{target=\"t\",model=\"m\",role=\"unified\"} 6"),
            "{text}"
        );
        assert!(
            text.contains("scalecar_spec_replicas{target=\"t\",model=\"m\",role=\"unified\"} 6"),
            "{text}"
        );
        assert!(
            text.contains(
                "scalecar_scale_events_total{target=\"t\",model=\"m\",role=\"unified\"} 1"
            ),
            "{text}"
        );
        // No decision: desired shows the count held.
        r.decided(&status(None, 6, 6, false));
        let text = exposition(&reg);
        assert!(
            text.contains("scalecar_desired_replicas{target=\"t\",model=\"m\",role=\"unified\"} 6"),
            "{text}"
        );
        assert_eq!(r.changes().len(), 1);
    }
}
