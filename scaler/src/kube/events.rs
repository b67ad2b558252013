//! Rescale Events on the workloads, as the HPA writes them:
//! `SuccessfulRescale` (`New size: 8; reason: …`) for every decision that
//! changed a replica count, `FailedRescale` when a read or write of the
//! target fails. A decision observer wrapped around another one (metrics),
//! so the control loop knows nothing of Kubernetes.
//!
//! Events are written by one task from a bounded queue: the loop never
//! waits on the API server, and when the server is down the queue drops the
//! newest events rather than grow. A failure is evented once per distinct
//! error until the target scales again, not once per tick of backoff.
//!
//! [`EventWriter`] writes events.k8s.io/v1 Events itself rather than through
//! kube-rs's `Recorder`: the Recorder folds every Event with the same type,
//! reason and action on an object into one series that keeps the *first*
//! note, so "New size: 2" after "New size: 8" would show as a second
//! "New size: 8". Here the note is part of what makes two Events the same:
//! an identical one within the hour bumps its series, a different one is
//! a new Event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use tokio::sync::mpsc;

use crate::control::{DecisionObserver, TargetStatus};
use crate::target::TargetError;

/// How long an identical Event is counted in its series instead of written
/// anew.
const SERIES_TTL: Duration = Duration::from_secs(3600);

/// What makes two Events the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EventKey {
    uid: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    kind: Option<String>,
    reason: String,
    action: String,
    note: Option<String>,
    warning: bool,
}

/// Writes Events on objects, one series per distinct (object, reason,
/// action, note).
#[derive(Clone)]
pub struct EventWriter {
    client: Client,
    reporter: Reporter,
    series: Arc<tokio::sync::Mutex<HashMap<EventKey, (K8sEvent, Instant)>>>,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

impl EventWriter {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        EventWriter {
            client,
            reporter,
            series: Arc::default(),
        }
    }

    /// Writes `ev` on `object` (or counts it in its series).
    pub async fn publish(&self, ev: &Event, object: &ObjectReference) -> Result<(), kube::Error> {
        let key = EventKey {
            uid: object.uid.clone(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            kind: object.kind.clone(),
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
            warning: matches!(ev.type_, EventType::Warning),
        };
        let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let mut series = self.series.lock().await;
        series.retain(|_, (_, at)| at.elapsed() < SERIES_TTL);
        let now = MicroTime(Timestamp::now());
        if let Some((event, at)) = series.get_mut(&key) {
            let count = event.series.as_ref().map_or(2, |s| s.count + 1);
            event.series = Some(EventSeries {
                count,
                last_observed_time: now,
            });
            *at = Instant::now();
            let name = event.metadata.name.clone().unwrap_or_default();
            let patch = serde_json::json!({"series": event.series});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            return Ok(());
        }
        let controller = self.reporter.controller.clone();
        let event = K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(now.clone()),
            regarding: Some(object.clone()),
            related: ev.secondary.clone(),
            metadata: ObjectMeta {
                namespace: Some(namespace),
                name: Some(format!(
                    "{}.{:x}",
                    object.name.as_deref().unwrap_or(&controller),
                    now.0.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            reporting_controller: Some(controller),
            type_: Some(if key.warning { "Warning" } else { "Normal" }.into()),
            ..K8sEvent::default()
        };
        let created = api.create(&PostParams::default(), &event).await?;
        series.insert(key, (created, Instant::now()));
        Ok(())
    }
}

/// Events waiting to be written.
const QUEUE: usize = 256;

/// How long an Event is retried while the API server fails transiently
/// (250 ms … 10 s apart): longer than an outage a FailedRescale reports is
/// likely to last (client-go's recorder retries about as long: 12 × 10 s).
const EVENT_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Worth another try: the API server was unreachable, overloaded or failed
/// (a 4xx other than 429 would fail the same way again).
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// A [`DecisionObserver`] that also writes Events on the targets' objects.
#[derive(Debug)]
pub struct RescaleEvents {
    inner: Arc<dyn DecisionObserver>,
    /// The object of each target name.
    objects: RwLock<HashMap<String, ObjectReference>>,
    /// The last failure evented per target.
    failed: Mutex<HashMap<String, String>>,
    queue: mpsc::Sender<(ObjectReference, Event)>,
}

impl RescaleEvents {
    /// Starts the writer task (on the current runtime).
    pub fn new(client: Client, reporter: Reporter, inner: Arc<dyn DecisionObserver>) -> Arc<Self> {
        let (queue, mut rx) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        let recorder = EventWriter::new(client, reporter);
        tokio::spawn(async move {
            while let Some((object, event)) = rx.recv().await {
                // A FailedRescale is written while the API server is having
                // trouble: a transient failure is retried (it is emitted
                // once per distinct error, so a lost one stays lost).
                let mut delay = std::time::Duration::from_millis(250);
                let give_up = tokio::time::Instant::now() + EVENT_RETRY_FOR;
                for attempt in 1u32.. {
                    match recorder.publish(&event, &object).await {
                        Ok(()) => break,
                        Err(e) if tokio::time::Instant::now() < give_up && transient(&e) => {
                            tracing::debug!(reason = %event.reason, attempt, error = %e, "writing an event failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(std::time::Duration::from_secs(10));
                        }
                        Err(e) => {
                            tracing::warn!(reason = %event.reason, object = ?object.name, error = %e, "writing an event failed");
                            break;
                        }
                    }
                }
            }
        });
        Arc::new(RescaleEvents {
            inner,
            objects: RwLock::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            queue,
        })
    }

    /// Sets the object each target name stands for (targets not listed
    /// get no Events).
    pub fn set_objects(&self, objects: HashMap<String, ObjectReference>) {
        if let Ok(mut o) = self.objects.write() {
            *o = objects;
        }
    }

    /// Another autoscaler began (`Some(claimant)`) or stopped claiming
    /// target `name`: a Warning `CompetingAutoscaler`, or a Normal
    /// `CompetingAutoscalerGone`.
    pub fn competing(&self, name: &str, claimant: Option<&str>) {
        match claimant {
            Some(by) => self.emit(
                name,
                EventType::Warning,
                "CompetingAutoscaler",
                "Scale",
                format!(
                    "{by} also scales this workload: scalecar keeps routing and deciding but does not write its replicas while it exists"
                ),
            ),
            None => self.emit(
                name,
                EventType::Normal,
                "CompetingAutoscalerGone",
                "Scale",
                "no other autoscaler claims this workload any more: scalecar scales it".to_string(),
            ),
        }
    }

    fn emit(&self, name: &str, type_: EventType, reason: &str, action: &str, note: String) {
        let Some(object) = self.objects.read().ok().and_then(|o| o.get(name).cloned()) else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.into(),
            // The API server caps notes at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if self.queue.try_send((object, event)).is_err() {
            tracing::debug!(target = %name, reason, "event queue full; event dropped");
        }
    }
}

impl DecisionObserver for RescaleEvents {
    fn decided(&self, s: &TargetStatus) {
        self.inner.decided(s);
        if !s.changed {
            return;
        }
        if let Ok(mut f) = self.failed.lock() {
            f.remove(&s.name);
        }
        let (reason, words) = if s.advisory {
            ("RescaleAdvised", "Advised size")
        } else {
            ("SuccessfulRescale", "New size")
        };
        self.emit(
            &s.name,
            EventType::Normal,
            reason,
            "Scale",
            format!("{words}: {}; reason: {}", s.applied, s.reason),
        );
    }

    fn memory(&self, event: crate::memory::MemoryEvent) {
        self.inner.memory(event);
    }

    fn scale_failed(&self, name: &str, error: &TargetError) {
        self.inner.scale_failed(name, error);
        let message = error.chain();
        let first = self
            .failed
            .lock()
            .map(|mut f| f.insert(name.to_string(), message.clone()).as_ref() != Some(&message))
            .unwrap_or(true);
        if first {
            self.emit(name, EventType::Warning, "FailedRescale", "Scale", message);
        }
    }
}
