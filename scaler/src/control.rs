//! The control loop: every tick, for each target, snapshot its signals,
//! decide through the registry, coordinate PD groups, apply behavior, and
//! set replicas only when the count changes.
//!
//! Effects sit behind traits (`ScaleTarget`, `Clock`, `WallClock`,
//! `DecisionObserver`) so the same loop runs against Kubernetes, the local
//! cluster and virtual time in tests. A failing scale call never stops the
//! loop: the target backs off and keeps its last good state, and the data
//! plane keeps serving.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use scalecar_config::{Policy, Role};
use tokio::sync::Notify;

use crate::algorithm::{
    AlgorithmRegistry, Decision, DecisionInput, RegistryError, ScalingAlgorithm,
};
use crate::behavior::{self, BehaviorInput};
use crate::clock::Clock;
use crate::pd::{self, RoleProposal};
use crate::signals::PoolSignals;
use crate::snapshot::WindowSnapshot;
use crate::target::{ScaleState, ScaleTarget, TargetError};

/// Wall-clock time in Unix seconds, for schedule floors (UTC).
pub trait WallClock: Send + Sync + fmt::Debug {
    fn unix_secs(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn unix_secs(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// How a target's replicas are changed.
#[derive(Debug, Clone)]
pub enum Scaling {
    /// Through a scale target (Kubernetes, the local cluster).
    Managed(Arc<dyn ScaleTarget>),
    /// Nothing is patched (static endpoints): decisions are computed,
    /// exported and logged so users can watch before they let scalecar act.
    /// `ready` is the pool's current count of serving endpoints.
    Advisory { ready: Arc<AtomicU32> },
}

/// What the loop is told about one target.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    /// The `target` label: unique per loop.
    pub name: String,
    pub model: String,
    pub role: Role,
    pub policy: Policy,
    pub signals: Arc<PoolSignals>,
    pub scaling: Scaling,
}

/// The outcome of one decision for one target, as exported.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetStatus {
    pub name: String,
    pub model: String,
    pub role: Role,
    /// Clock time of the decision.
    pub at: Duration,
    pub advisory: bool,
    /// What the algorithm asked for (`None`: no decision).
    pub desired: Option<u32>,
    /// After PD coordination, schedule floors, scale-to-zero and bounds.
    pub applied: u32,
    /// `spec.replicas` before this decision.
    pub spec: u32,
    pub ready: u32,
    pub panic: bool,
    pub stable_value: f64,
    pub panic_value: f64,
    pub target: f64,
    pub reason: String,
    /// True when this decision changed (or, advisory, would change) the
    /// replica count.
    pub changed: bool,
}

/// Receives every decision (metrics, logs, events).
pub trait DecisionObserver: Send + Sync + fmt::Debug {
    fn decided(&self, status: &TargetStatus);
    fn scale_failed(&self, name: &str, error: &TargetError);
}

/// An observer that only logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogObserver;

impl DecisionObserver for LogObserver {
    fn decided(&self, s: &TargetStatus) {
        if s.changed {
            tracing::info!(
                target = %s.name, model = %s.model, role = %s.role, from = s.spec, to = s.applied,
                ready = s.ready, panic = s.panic, advisory = s.advisory, reason = %s.reason,
                "rescale"
            );
        } else {
            tracing::debug!(target = %s.name, replicas = s.applied, reason = %s.reason, "hold");
        }
    }

    fn scale_failed(&self, name: &str, error: &TargetError) {
        tracing::warn!(target = %name, %error, "scale failed; backing off");
    }
}

/// Why the loop could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("target {name}: {source}")]
    Algorithm { name: String, source: RegistryError },
    #[error("target name {0:?} is used twice")]
    DuplicateName(String),
}

struct Managed {
    spec: TargetSpec,
    algorithm: Box<dyn ScalingAlgorithm>,
    /// The algorithm was created before the first read of the target; it is
    /// created again then, with the real ready count (KPA starts in panic
    /// when more than one pod is ready).
    fresh: bool,
    /// Last state read from the target (the loop's belief when reads fail).
    last: Option<ScaleState>,
    /// No scale call before this clock time (after a failure).
    backoff_until: Duration,
    failures: u32,
}

impl fmt::Debug for Managed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("name", &self.spec.name)
            .field("algorithm", &self.algorithm)
            .field("last", &self.last)
            .finish()
    }
}

/// One decision before PD coordination and behavior.
struct Pending {
    state: ScaleState,
    snapshot: WindowSnapshot,
    decision: Decision,
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The control loop over a set of targets.
#[derive(Debug)]
pub struct ControlLoop {
    targets: Vec<Managed>,
    clock: Arc<dyn Clock>,
    wall: Arc<dyn WallClock>,
    observer: Arc<dyn DecisionObserver>,
    tick: Duration,
    poke: Arc<Notify>,
    registry: AlgorithmRegistry,
}

impl ControlLoop {
    /// Builds the loop; each target's algorithm is created through the
    /// registry by its policy's name (an unknown name is an error here, not a
    /// silent fallback).
    pub fn new(
        specs: Vec<TargetSpec>,
        registry: &AlgorithmRegistry,
        clock: Arc<dyn Clock>,
        wall: Arc<dyn WallClock>,
        observer: Arc<dyn DecisionObserver>,
        tick: Duration,
    ) -> Result<Self, ControlError> {
        let now = clock.now();
        let mut seen = std::collections::BTreeSet::new();
        let mut targets = Vec::with_capacity(specs.len());
        for spec in specs {
            if !seen.insert(spec.name.clone()) {
                return Err(ControlError::DuplicateName(spec.name));
            }
            let ready = match &spec.scaling {
                Scaling::Advisory { ready } => ready.load(Ordering::Relaxed),
                Scaling::Managed(_) => 0,
            };
            let algorithm = registry
                .create(&spec.policy, ready, now)
                .map_err(|source| ControlError::Algorithm {
                    name: spec.name.clone(),
                    source,
                })?;
            targets.push(Managed {
                spec,
                algorithm,
                fresh: true,
                last: None,
                backoff_until: Duration::ZERO,
                failures: 0,
            });
        }
        Ok(ControlLoop {
            targets,
            clock,
            wall,
            observer,
            tick,
            poke: Arc::new(Notify::new()),
            registry: registry.clone(),
        })
    }

    /// A handle that makes the loop decide at once (a request waiting on a
    /// pool at zero replicas).
    pub fn poke_handle(&self) -> Arc<Notify> {
        self.poke.clone()
    }

    /// Runs one tick for every target and returns their statuses.
    pub async fn tick_once(&mut self) -> Vec<TargetStatus> {
        let now = self.clock.now();
        let unix_secs = self.wall.unix_secs();
        let mut pending = Vec::with_capacity(self.targets.len());
        for t in &mut self.targets {
            let state = read_state(t, now, &*self.observer).await;
            if std::mem::take(&mut t.fresh)
                && let Ok(algorithm) = self.registry.create(&t.spec.policy, state.ready, now)
            {
                t.algorithm = algorithm;
            }
            let snapshot = t
                .spec
                .signals
                .snapshot(t.spec.policy.window, t.spec.policy.panic_window());
            let input = DecisionInput {
                now,
                ready: state.ready,
                spec: state.spec,
                snapshot: &snapshot,
                policy: &t.spec.policy,
                role: t.spec.role,
                reachable: true,
                partial: false,
            };
            let mut decision = t.algorithm.decide(&input);
            // Requests held at a pool with nothing asked for: scale from
            // zero at once (they are not in flight, so no load metric
            // shows them yet).
            if state.spec == 0 && snapshot.queued_now > 0 {
                let wake = t.spec.policy.activation_scale.max(1);
                if decision.desired.is_none_or(|d| d < wake) {
                    decision.desired = Some(wake);
                    decision.reason = format!(
                        "{} requests waiting at zero replicas → {wake}",
                        snapshot.queued_now
                    );
                }
            }
            pending.push(Pending {
                state,
                snapshot,
                decision,
            });
        }
        let coordinated = self.coordinate_groups(&pending);
        let mut statuses = Vec::with_capacity(pending.len());
        for ((t, p), desired) in self.targets.iter_mut().zip(pending).zip(coordinated) {
            let applied = behavior::apply(&BehaviorInput {
                desired,
                current: p.state.spec,
                policy: &t.spec.policy,
                now,
                unix_secs,
                last_activity: p.snapshot.last_activity,
                partial: false,
            });
            let mut reason = p.decision.reason.clone();
            if desired != p.decision.desired
                && let Some(d) = desired
            {
                reason.push_str(&format!("; group share → {d}"));
            }
            if let Some(why) = &applied.reason {
                reason.push_str("; ");
                reason.push_str(why);
            }
            let changed = applied.replicas != p.state.spec;
            let advisory = matches!(t.spec.scaling, Scaling::Advisory { .. });
            if changed && let Scaling::Managed(target) = &t.spec.scaling {
                let target = target.clone();
                apply_scale(t, &*target, applied.replicas, now, &*self.observer).await;
            }
            let status = TargetStatus {
                name: t.spec.name.clone(),
                model: t.spec.model.clone(),
                role: t.spec.role,
                at: now,
                advisory,
                desired: p.decision.desired,
                applied: applied.replicas,
                spec: p.state.spec,
                ready: p.state.ready,
                panic: p.decision.panic,
                stable_value: p.decision.stable_value,
                panic_value: p.decision.panic_value,
                target: p.decision.target,
                reason,
                changed,
            };
            self.observer.decided(&status);
            statuses.push(status);
        }
        statuses
    }

    /// PD coordination: targets sharing a `group` have their desired counts
    /// redistributed by their preferred shares (bypassed in panic inside
    /// `pd::coordinate`). Targets without a group keep theirs.
    fn coordinate_groups(&self, pending: &[Pending]) -> Vec<Option<u32>> {
        let mut out: Vec<Option<u32>> = pending.iter().map(|p| p.decision.desired).collect();
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, t) in self.targets.iter().enumerate() {
            if let Some(g) = &t.spec.policy.group {
                groups.entry(g.as_str()).or_default().push(i);
            }
        }
        for members in groups.values() {
            // A member without a decision holds the whole group.
            if members.len() < 2 || members.iter().any(|&i| out[i].is_none()) {
                continue;
            }
            let proposals: Vec<RoleProposal> = members
                .iter()
                .map(|&i| {
                    let policy = &self.targets[i].spec.policy;
                    RoleProposal {
                        role: self.targets[i].spec.role,
                        desired: out[i].unwrap_or(0),
                        min: policy.min_replicas,
                        max: policy.max_bound(),
                        band: policy.preferred_share,
                        panic: pending[i].decision.panic,
                    }
                })
                .collect();
            for (&i, n) in members.iter().zip(pd::coordinate(&proposals)) {
                out[i] = Some(n);
            }
        }
        out
    }

    /// Ticks until `shutdown` resolves; a poke ticks at once.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let poke = self.poke.clone();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => {}
                _ = poke.notified() => {}
            }
            self.tick_once().await;
        }
    }
}

async fn read_state(t: &mut Managed, now: Duration, observer: &dyn DecisionObserver) -> ScaleState {
    match &t.spec.scaling {
        Scaling::Advisory { ready } => {
            let r = ready.load(Ordering::Relaxed);
            // Advisory targets never change: spec is what serves.
            ScaleState { spec: r, ready: r }
        }
        Scaling::Managed(target) => match target.scale().await {
            Ok(s) => {
                t.last = Some(s);
                s
            }
            Err(e) => {
                observer.scale_failed(&t.spec.name, &e);
                note_failure(t, now);
                t.last.unwrap_or_default()
            }
        },
    }
}

fn note_failure(t: &mut Managed, now: Duration) {
    t.failures = t.failures.saturating_add(1);
    let backoff = Duration::from_millis(500)
        .saturating_mul(1u32 << t.failures.min(7))
        .min(MAX_BACKOFF);
    t.backoff_until = now + backoff;
}

/// Sets replicas: a conflict re-reads and retries once; other errors back
/// off, keeping the last good state.
async fn apply_scale(
    t: &mut Managed,
    target: &dyn ScaleTarget,
    replicas: u32,
    now: Duration,
    observer: &dyn DecisionObserver,
) {
    if now < t.backoff_until {
        return;
    }
    let mut result = target.set_replicas(replicas).await;
    if let Err(TargetError::Conflict { .. }) = &result {
        if let Ok(s) = target.scale().await {
            t.last = Some(s);
        }
        result = target.set_replicas(replicas).await;
    }
    match result {
        Ok(()) => {
            t.failures = 0;
            if let Some(last) = &mut t.last {
                last.spec = replicas;
            }
        }
        Err(e) => {
            observer.scale_failed(&t.spec.name, &e);
            note_failure(t, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::signals::SignalsConfig;
    use crate::target::{BoxFuture, TargetRef};
    use std::sync::Mutex;

    /// A scale target that becomes ready at once, and can be made to fail.
    #[derive(Debug)]
    struct Instant {
        target: TargetRef,
        state: Mutex<ScaleState>,
        fail: Mutex<Option<TargetError>>,
        sets: Mutex<Vec<u32>>,
    }

    impl Instant {
        fn new(replicas: u32) -> Arc<Self> {
            Arc::new(Instant {
                target: TargetRef {
                    api_version: "test/v1".into(),
                    kind: "Pool".into(),
                    namespace: "t".into(),
                    name: "p".into(),
                },
                state: Mutex::new(ScaleState {
                    spec: replicas,
                    ready: replicas,
                }),
                fail: Mutex::new(None),
                sets: Mutex::new(Vec::new()),
            })
        }
    }

    impl ScaleTarget for Instant {
        fn target_ref(&self) -> &TargetRef {
            &self.target
        }
        fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>> {
            let s = *self.state.lock().unwrap();
            Box::pin(async move { Ok(s) })
        }
        fn set_replicas(&self, n: u32) -> BoxFuture<'_, Result<(), TargetError>> {
            let fail = self.fail.lock().unwrap().clone();
            if fail.is_none() {
                *self.state.lock().unwrap() = ScaleState { spec: n, ready: n };
                self.sets.lock().unwrap().push(n);
            }
            Box::pin(async move { fail.map_or(Ok(()), Err) })
        }
    }

    #[derive(Debug, Default)]
    struct Recorder {
        statuses: Mutex<Vec<TargetStatus>>,
        failures: Mutex<Vec<String>>,
    }

    impl DecisionObserver for Recorder {
        fn decided(&self, s: &TargetStatus) {
            self.statuses.lock().unwrap().push(s.clone());
        }
        fn scale_failed(&self, name: &str, e: &TargetError) {
            self.failures.lock().unwrap().push(format!("{name}: {e}"));
        }
    }

    #[derive(Debug)]
    struct Epoch;

    impl WallClock for Epoch {
        fn unix_secs(&self) -> u64 {
            0
        }
    }

    fn setup(
        scaling: Scaling,
        policy: Policy,
    ) -> (
        Arc<ManualClock>,
        Arc<PoolSignals>,
        Arc<Recorder>,
        ControlLoop,
    ) {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(100)));
        let signals = Arc::new(PoolSignals::new(
            SignalsConfig::for_window(policy.window),
            clock.clone(),
        ));
        let recorder = Arc::new(Recorder::default());
        let spec = TargetSpec {
            name: "llama".into(),
            model: "llama".into(),
            role: Role::Unified,
            policy,
            signals: signals.clone(),
            scaling,
        };
        let l = ControlLoop::new(
            vec![spec],
            &AlgorithmRegistry::with_builtins(),
            clock.clone(),
            Arc::new(Epoch),
            recorder.clone(),
            Duration::from_secs(2),
        )
        .unwrap();
        (clock, signals, recorder, l)
    }

    fn policy() -> Policy {
        Policy {
            target: 2.0,
            target_utilization: 1.0,
            window: Duration::from_secs(10),
            min_replicas: 1,
            max_replicas: Some(10),
            ..Policy::default()
        }
    }

    #[tokio::test]
    async fn a_burst_scales_up_and_idle_scales_down() {
        let target = Instant::new(1);
        let (clock, signals, recorder, mut l) = setup(Scaling::Managed(target.clone()), policy());
        for _ in 0..12 {
            signals.dispatch(0);
        }
        clock.advance(Duration::from_secs(2));
        let s = l.tick_once().await;
        assert!(s[0].panic, "{:?}", s[0]);
        assert_eq!(s[0].applied, 6);
        assert!(s[0].changed);
        assert_eq!(*target.sets.lock().unwrap(), vec![6]);
        for _ in 0..12 {
            signals.complete(0, 0, false, None);
        }
        // Idle: panic ends a window after the last tick over the threshold,
        // then the count falls, rate-limited, to min.
        for _ in 0..20 {
            clock.advance(Duration::from_secs(2));
            l.tick_once().await;
        }
        let last = recorder.statuses.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.applied, 1, "{last:?}");
        assert_eq!(signals.in_flight(), 0);
    }

    #[tokio::test]
    async fn advisory_targets_are_never_patched() {
        let ready = Arc::new(AtomicU32::new(2));
        let (clock, signals, _, mut l) = setup(
            Scaling::Advisory {
                ready: ready.clone(),
            },
            policy(),
        );
        for _ in 0..12 {
            signals.dispatch(0);
        }
        clock.advance(Duration::from_secs(2));
        let s = l.tick_once().await;
        assert!(s[0].advisory && s[0].changed);
        assert_eq!((s[0].spec, s[0].applied), (2, 6));
        assert_eq!(ready.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn scale_errors_back_off_and_keep_serving() {
        let target = Instant::new(1);
        *target.fail.lock().unwrap() = Some(TargetError::Unavailable {
            target: "p".into(),
            message: "api server down".into(),
        });
        let (clock, signals, recorder, mut l) = setup(Scaling::Managed(target.clone()), policy());
        for _ in 0..12 {
            signals.dispatch(0);
        }
        clock.advance(Duration::from_secs(2));
        l.tick_once().await;
        assert_eq!(recorder.failures.lock().unwrap().len(), 1);
        // Within the back-off no call is made.
        clock.advance(Duration::from_millis(500));
        l.tick_once().await;
        assert_eq!(recorder.failures.lock().unwrap().len(), 1);
        *target.fail.lock().unwrap() = None;
        clock.advance(Duration::from_secs(2));
        l.tick_once().await;
        assert_eq!(*target.sets.lock().unwrap(), vec![6]);
    }

    #[tokio::test]
    async fn requests_waiting_at_zero_wake_the_pool() {
        let target = Instant::new(0);
        let policy = Policy {
            min_replicas: 0,
            ..policy()
        };
        let (clock, signals, _, mut l) = setup(Scaling::Managed(target.clone()), policy);
        clock.advance(Duration::from_secs(2));
        assert_eq!(l.tick_once().await[0].applied, 0);
        signals.queue_enter();
        clock.advance(Duration::from_millis(100));
        let s = l.tick_once().await;
        assert_eq!(s[0].applied, 1, "{:?}", s[0]);
        assert!(
            s[0].reason.contains("waiting at zero replicas"),
            "{}",
            s[0].reason
        );
        signals.queue_leave(Duration::from_millis(100));
    }

    #[test]
    fn an_unknown_algorithm_is_an_error_not_a_fallback() {
        let clock = Arc::new(ManualClock::new(Duration::ZERO));
        let spec = TargetSpec {
            name: "x".into(),
            model: "x".into(),
            role: Role::Unified,
            policy: Policy {
                algorithm: "magic".into(),
                ..Policy::default()
            },
            signals: Arc::new(PoolSignals::new(SignalsConfig::default(), clock.clone())),
            scaling: Scaling::Advisory {
                ready: Arc::new(AtomicU32::new(1)),
            },
        };
        let err = ControlLoop::new(
            vec![spec],
            &AlgorithmRegistry::with_builtins(),
            clock,
            Arc::new(Epoch),
            Arc::new(LogObserver),
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("algorithm \"magic\" is not registered"),
            "{err}"
        );
    }
}
