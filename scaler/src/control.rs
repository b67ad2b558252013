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

mod keeping;

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
    /// The policy's algorithm and metric.
    pub algorithm: String,
    pub metric: &'static str,
    /// Clock time of the decision.
    pub at: Duration,
    pub advisory: bool,
    /// What the algorithm asked for (`None`: no decision).
    pub desired: Option<u32>,
    /// The decision: the algorithm's count after PD coordination, schedule
    /// floors, scale-to-zero and bounds. Written to the target when it
    /// differs from `spec` (never, for an advisory target).
    pub applied: u32,
    /// `spec.replicas` before this decision.
    pub spec: u32,
    /// Made without some peer's data: never a scale-down.
    pub partial: bool,
    pub ready: u32,
    pub panic: bool,
    pub stable_value: f64,
    pub panic_value: f64,
    pub target: f64,
    /// A replica's measured service rates over the stable window: prompt
    /// tokens prefilled and tokens generated per second while it had
    /// such work (`None`: too little busy time to measure on).
    pub prefill_rate: Option<f64>,
    pub decode_rate: Option<f64>,
    /// Tokens one replica's KV cache holds: the policy's `kv-cache-tokens`,
    /// else what the engines reported (`None`: neither).
    pub kv_capacity: Option<u64>,
    /// The policy's bounds (`None`: no maximum).
    pub min_replicas: u32,
    pub max_replicas: Option<u32>,
    pub reason: String,
    /// True when the replica count really changed: the target accepted the
    /// new count, or (advisory) the advice differs from the last advice.
    /// Scale events and the info-level "rescale" log follow this, not every
    /// tick that disagrees with `spec`.
    pub changed: bool,
}

/// What the leader asks its peers for: one pool's windows.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAsk {
    pub model: String,
    pub role: Role,
    pub window: Duration,
    pub panic_window: Duration,
    /// The latency histograms the target's algorithm reads.
    pub latencies: crate::snapshot::Latencies,
}

/// The peers' answers for one ask.
#[derive(Debug, Clone, Default)]
pub struct Gathered {
    pub snapshots: Vec<crate::peer::PeerSnapshot>,
    /// A peer did not answer (in time, or sensibly): the decision is made
    /// on partial data, so it may scale up but never down.
    pub partial: bool,
}

/// The other gateway replicas' windows, gathered by the leader each tick.
pub trait PeerSource: Send + Sync + fmt::Debug {
    /// One answer per ask, in order; bounded in time by the source.
    fn gather(&self, asks: Vec<PeerAsk>) -> crate::target::BoxFuture<'_, Vec<Gathered>>;
}

/// Receives every decision (metrics, logs, events).
pub trait DecisionObserver: Send + Sync + fmt::Debug {
    fn decided(&self, status: &TargetStatus);
    fn scale_failed(&self, name: &str, error: &TargetError);
    /// Memory was loaded, saved or recalled (see [`crate::memory`]); the
    /// loop logs each itself.
    fn memory(&self, _event: crate::memory::MemoryEvent) {}
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
        tracing::warn!(target = %name, error = %error.chain(), "scale failed; backing off");
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
    /// The last count advised (advisory targets): a change is logged once,
    /// not every tick it stays unapplied.
    advised: Option<u32>,
    /// Memory to start the next created algorithm from, and when it was
    /// saved (Unix seconds).
    recall: Option<(crate::memory::TargetMemory, u64)>,
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

/// Endpoint-busy time a window needs before its service rates are shown.
const MEASURED_BUSY: Duration = Duration::from_secs(2);

/// One decision before PD coordination and behavior.
struct Pending {
    /// `None`: the target could not be read and nothing is known of it —
    /// nothing is decided or written this tick.
    state: Option<ScaleState>,
    snapshot: WindowSnapshot,
    decision: Decision,
    /// Some peer's data is missing.
    partial: bool,
}

/// The longest wait between tries of a failing target: one HPA sync
/// period, so an API server back from an outage sees the count written
/// within 15 s, while a target that keeps failing costs a call per 15 s.
const MAX_BACKOFF: Duration = Duration::from_secs(15);

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
    /// The target set, when it changes while running (discovery).
    updates: Option<tokio::sync::watch::Receiver<Vec<TargetSpec>>>,
    /// Whether this replica decides (leader election); `None`: always.
    leading: Option<tokio::sync::watch::Receiver<bool>>,
    /// Asked right before every write of a replica count: a tick that
    /// began as leader may have spent its API and peer timeouts since.
    write_guard: Option<Arc<dyn WriteGuard>>,
    /// The other replicas' windows, merged into every decision.
    peers: Option<Arc<dyn PeerSource>>,
    /// Where memory is kept between leaders.
    keeper: Option<keeping::Keeper>,
}

/// Whether `a` and `b` scale the same thing the same way: then the running
/// state (the algorithm's windows, backoff) carries over.
fn same_target(a: &TargetSpec, b: &TargetSpec) -> bool {
    let scaling = match (&a.scaling, &b.scaling) {
        (Scaling::Managed(x), Scaling::Managed(y)) => Arc::ptr_eq(x, y),
        (Scaling::Advisory { ready: x }, Scaling::Advisory { ready: y }) => Arc::ptr_eq(x, y),
        _ => false,
    };
    scaling
        && a.model == b.model
        && a.role == b.role
        && a.policy == b.policy
        && Arc::ptr_eq(&a.signals, &b.signals)
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
        let mut control = ControlLoop {
            targets: Vec::new(),
            clock,
            wall,
            observer,
            tick,
            poke: Arc::new(Notify::new()),
            registry: registry.clone(),
            updates: None,
            leading: None,
            write_guard: None,
            peers: None,
            keeper: None,
        };
        if let Some(e) = control.set_targets(specs).into_iter().next() {
            return Err(e);
        }
        Ok(control)
    }

    /// Replaces the target set. A target whose name, scale target, signals
    /// and policy stay the same keeps its running state; a changed one
    /// starts afresh; one that is gone is no longer decided. Targets that
    /// cannot be built (an unknown algorithm, a name used twice) are left
    /// out and returned as errors; the others are taken.
    pub fn set_targets(&mut self, specs: Vec<TargetSpec>) -> Vec<ControlError> {
        let now = self.clock.now();
        let mut old: BTreeMap<String, Managed> = std::mem::take(&mut self.targets)
            .into_iter()
            .map(|t| (t.spec.name.clone(), t))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut errors = Vec::new();
        for spec in specs {
            if !seen.insert(spec.name.clone()) {
                errors.push(ControlError::DuplicateName(spec.name));
                continue;
            }
            if let Some(t) = old
                .remove(&spec.name)
                .filter(|t| same_target(&t.spec, &spec))
            {
                self.targets.push(t);
                continue;
            }
            let ready = match &spec.scaling {
                Scaling::Advisory { ready } => ready.load(Ordering::Relaxed),
                Scaling::Managed(_) => 0,
            };
            match self.registry.create(&spec.policy, ready, now) {
                Ok(algorithm) => self.targets.push(Managed {
                    recall: self.keeper.as_mut().and_then(|k| k.waiting(&spec.name)),
                    spec,
                    algorithm,
                    fresh: true,
                    last: None,
                    backoff_until: Duration::ZERO,
                    failures: 0,
                    advised: None,
                }),
                Err(source) => errors.push(ControlError::Algorithm {
                    name: spec.name.clone(),
                    source,
                }),
            }
        }
        errors
    }

    /// Takes the target set from `updates` from now on (the set it holds
    /// now, then every change).
    pub fn follow(&mut self, mut updates: tokio::sync::watch::Receiver<Vec<TargetSpec>>) {
        let specs = updates.borrow_and_update().clone();
        self.apply_update(specs);
        self.updates = Some(updates);
    }

    fn apply_update(&mut self, specs: Vec<TargetSpec>) {
        for e in self.set_targets(specs) {
            tracing::warn!(error = %e, "target left out of the control loop");
        }
    }

    /// Decides only while `leading` says so (a replica that is not the
    /// leader neither decides, writes nor events; it keeps recording). A
    /// new leader creates each algorithm afresh on the windows it has, and
    /// from the last leader's memory when it keeps one
    /// ([`ControlLoop::remember_in`]).
    pub fn lead_with(&mut self, leading: tokio::sync::watch::Receiver<bool>) {
        self.leading = Some(leading);
    }

    /// Asks `guard` right before every write of a replica count; a write
    /// it refuses is not made (the decision says so).
    pub fn guard_writes(&mut self, guard: Arc<dyn WriteGuard>) {
        self.write_guard = Some(guard);
    }

    /// Leadership (re)gained: what each algorithm remembered from before
    /// is stale, so each is created afresh at the next tick on the windows
    /// this replica has — from the memory the last leader saved, when
    /// [`ControlLoop::load_memory`] found one (`run` loads it here).
    pub fn new_leader(&mut self) {
        if let Some(k) = &mut self.keeper {
            k.new_leadership();
        }
        for t in &mut self.targets {
            t.fresh = true;
            t.advised = None;
            t.last = None;
        }
    }

    /// Decides on the sum of this replica's windows and its peers'.
    pub fn with_peers(&mut self, peers: Arc<dyn PeerSource>) {
        self.peers = Some(peers);
    }

    /// The names of the targets decided each tick.
    pub fn target_names(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.spec.name.clone()).collect()
    }

    /// A handle that makes the loop decide at once (a request waiting on a
    /// pool at zero replicas).
    pub fn poke_handle(&self) -> Arc<Notify> {
        self.poke.clone()
    }

    /// Runs one tick for every target and returns their statuses.
    pub async fn tick_once(&mut self) -> Vec<TargetStatus> {
        let mut gathered = match &self.peers {
            Some(peers) => {
                let asks = self
                    .targets
                    .iter()
                    .map(|t| PeerAsk {
                        model: t.spec.model.clone(),
                        role: t.spec.role,
                        window: t.spec.policy.window,
                        panic_window: t.spec.policy.panic_window(),
                        latencies: t.algorithm.latencies(t.spec.role),
                    })
                    .collect();
                peers.gather(asks).await
            }
            None => Vec::new(),
        }
        .into_iter();
        let now = self.clock.now();
        let unix_secs = self.wall.unix_secs();
        let mut pending = Vec::with_capacity(self.targets.len());
        for t in &mut self.targets {
            let (window, panic_window) = (t.spec.policy.window, t.spec.policy.panic_window());
            let (snapshot, partial) = match gathered.next() {
                None => (
                    t.spec.signals.snapshot_of(
                        window,
                        panic_window,
                        t.algorithm.latencies(t.spec.role),
                    ),
                    false,
                ),
                Some(g) => {
                    let mut parts = vec![crate::peer::PeerSnapshot::of(
                        &t.spec.signals,
                        window,
                        panic_window,
                        t.algorithm.latencies(t.spec.role),
                    )];
                    parts.extend(g.snapshots);
                    match crate::peer::merge(&parts, now) {
                        Ok(s) => (s, g.partial),
                        Err(e) => {
                            tracing::warn!(target = %t.spec.name, error = %e, "peer snapshots do not merge; deciding on this replica's alone, as partial");
                            (
                                t.spec.signals.snapshot_of(
                                    window,
                                    panic_window,
                                    t.algorithm.latencies(t.spec.role),
                                ),
                                true,
                            )
                        }
                    }
                }
            };
            // First tokens from now on are judged by this tick's measured
            // rate (the SLO counts slo keeps its target on).
            t.spec.signals.set_slo_reference(
                t.spec.policy.ttft_target,
                snapshot.stable.prefill_rate(MEASURED_BUSY),
            );
            let Some(state) = read_state(t, now, &*self.observer).await else {
                // A failed read changes nothing: no decision on a guessed
                // ready count, and the decider keeps waiting for a real one.
                pending.push(Pending {
                    state: None,
                    snapshot,
                    decision: Decision::none("scale target unreadable: holding"),
                    partial,
                });
                continue;
            };
            if std::mem::take(&mut t.fresh)
                && let Ok(algorithm) = self.registry.create(&t.spec.policy, state.ready, now)
            {
                t.algorithm = algorithm;
                keeping::recall(t, now, unix_secs, &*self.observer);
            }
            let decision = decide(t, state, &snapshot, now, partial);
            pending.push(Pending {
                state: Some(state),
                snapshot,
                decision,
                partial,
            });
        }
        let coordinated = self.coordinate_groups(&pending);
        let mut statuses = Vec::with_capacity(pending.len());
        for ((t, p), desired) in self.targets.iter_mut().zip(pending).zip(coordinated) {
            let advisory = matches!(t.spec.scaling, Scaling::Advisory { .. });
            let Some(mut state) = p.state else {
                let held = t.last.map_or(0, |s| s.spec);
                let status = TargetStatus {
                    name: t.spec.name.clone(),
                    model: t.spec.model.clone(),
                    role: t.spec.role,
                    algorithm: t.spec.policy.algorithm.clone(),
                    metric: t.spec.policy.metric.as_str(),
                    at: now,
                    advisory,
                    desired: None,
                    applied: held,
                    spec: held,
                    partial: p.partial,
                    ready: t.last.map_or(0, |s| s.ready),
                    panic: false,
                    stable_value: 0.0,
                    panic_value: 0.0,
                    target: 0.0,
                    prefill_rate: p.snapshot.stable.prefill_rate(MEASURED_BUSY),
                    decode_rate: p.snapshot.stable.decode_rate(MEASURED_BUSY),
                    kv_capacity: t.kv_capacity(),
                    min_replicas: t.spec.policy.min_replicas,
                    max_replicas: t.spec.policy.max_replicas,
                    reason: p.decision.reason,
                    changed: false,
                };
                self.observer.decided(&status);
                statuses.push(status);
                continue;
            };
            let mut decision = p.decision;
            let snapshot = p.snapshot;
            let partial = p.partial;
            let mut desired = desired;
            let mut applied = behave(t, desired, state.spec, &snapshot, now, unix_secs, partial);
            let mut changed = false;
            let mut refused = false;
            let guard = self.write_guard.clone();
            match &t.spec.scaling {
                Scaling::Managed(target) if applied.replicas != state.spec => {
                    let target = target.clone();
                    match apply_scale(
                        t,
                        &*target,
                        applied.replicas,
                        now,
                        &*self.observer,
                        guard.as_deref(),
                    )
                    .await
                    {
                        Applied::Done => changed = true,
                        Applied::Failed => {}
                        Applied::Refused => refused = true,
                        Applied::Conflict(fresh) => {
                            // Someone else changed the target: decide again on
                            // what it is now. A grouped target keeps the
                            // group's share from this tick.
                            // The tick's snapshot (peers' included) is
                            // milliseconds old: decide on it again.
                            state = fresh;
                            if t.spec.policy.group.is_none() {
                                decision = decide(t, state, &snapshot, now, partial);
                                desired = decision.desired;
                            }
                            applied =
                                behave(t, desired, state.spec, &snapshot, now, unix_secs, partial);
                            if applied.replicas != state.spec {
                                match apply_scale(
                                    t,
                                    &*target,
                                    applied.replicas,
                                    now,
                                    &*self.observer,
                                    guard.as_deref(),
                                )
                                .await
                                {
                                    Applied::Done => changed = true,
                                    Applied::Refused => refused = true,
                                    Applied::Failed | Applied::Conflict(_) => {}
                                }
                            }
                        }
                    }
                }
                Scaling::Managed(_) => {}
                Scaling::Advisory { .. } => {
                    changed = applied.replicas != state.spec && t.advised != Some(applied.replicas);
                    t.advised = Some(applied.replicas);
                }
            }
            let mut reason = decision.reason.clone();
            if desired != decision.desired
                && let Some(d) = desired
            {
                reason.push_str(&format!("; group share → {d}"));
            }
            if let Some(why) = &applied.reason {
                reason.push_str("; ");
                reason.push_str(why);
            }
            if refused {
                reason.push_str("; not written: no longer the leader");
            }
            let status = TargetStatus {
                name: t.spec.name.clone(),
                model: t.spec.model.clone(),
                role: t.spec.role,
                algorithm: t.spec.policy.algorithm.clone(),
                metric: t.spec.policy.metric.as_str(),
                at: now,
                advisory,
                desired: decision.desired,
                applied: applied.replicas,
                spec: state.spec,
                partial,
                ready: state.ready,
                panic: decision.panic,
                stable_value: decision.stable_value,
                panic_value: decision.panic_value,
                target: decision.target,
                prefill_rate: p.snapshot.stable.prefill_rate(MEASURED_BUSY),
                decode_rate: p.snapshot.stable.decode_rate(MEASURED_BUSY),
                kv_capacity: t.kv_capacity(),
                min_replicas: t.spec.policy.min_replicas,
                max_replicas: t.spec.policy.max_replicas,
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
            // A member without a decision: no redistribution this tick
            // (it holds; the others follow their own decisions).
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
        let mut updates = self.updates.take();
        let leading = self.leading.take();
        // Leadership gained (the first time too) loads the memory; a loop
        // without election leads from the start.
        let mut led = false;
        if leading.is_none() {
            self.load_on_leading().await;
            led = true;
        }
        let mut ticks: u64 = 0;
        tokio::pin!(shutdown);
        loop {
            let changed = async {
                match updates.as_mut() {
                    Some(u) => u.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    if led && leading.as_ref().is_none_or(|l| *l.borrow()) {
                        self.save_before_stopping().await;
                    }
                    return;
                }
                _ = interval.tick() => {}
                _ = poke.notified() => {}
                open = changed => {
                    // A new target set is taken at once and decided at the
                    // next tick, so ticks stay evenly spaced.
                    match (open, updates.as_mut()) {
                        (true, Some(u)) => {
                            let specs = u.borrow_and_update().clone();
                            self.apply_update(specs);
                        }
                        _ => updates = None,
                    }
                    continue;
                }
            }
            if let Some(l) = &leading {
                let now_leading = *l.borrow();
                if !now_leading {
                    led = false;
                    continue;
                }
                if !led {
                    self.new_leader();
                    self.load_on_leading().await;
                    led = true;
                }
            }
            ticks += 1;
            // Lines of one tick's decisions share its span (debug level).
            tracing::Instrument::instrument(
                self.tick_once(),
                tracing::debug_span!("tick", n = ticks),
            )
            .await;
            self.keep_memory().await;
        }
    }
}

impl Managed {
    /// Tokens one replica's KV cache holds: the policy's key wins over
    /// what the engines reported.
    fn kv_capacity(&self) -> Option<u64> {
        self.spec
            .policy
            .kv_cache_tokens
            .map(u64::from)
            .or_else(|| self.spec.signals.kv_capacity())
    }
}

/// The algorithm's decision for `t` in `state`, with scale from zero.
fn decide(
    t: &mut Managed,
    state: ScaleState,
    snapshot: &WindowSnapshot,
    now: Duration,
    partial: bool,
) -> Decision {
    let input = DecisionInput {
        now,
        ready: state.ready,
        spec: state.spec,
        snapshot,
        policy: &t.spec.policy,
        role: t.spec.role,
        reachable: true,
        partial,
        cold_start: t.spec.signals.cold_start(),
        kv_capacity: t.kv_capacity(),
    };
    let mut decision = t.algorithm.decide(&input);
    // Requests held at a pool with nothing asked for: scale from zero at
    // once (they are not in flight, so no load metric shows them yet).
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
    decision
}

/// Behavior (schedule floors, scale to zero, bounds) on a decision.
fn behave(
    t: &Managed,
    desired: Option<u32>,
    current: u32,
    snapshot: &WindowSnapshot,
    now: Duration,
    unix_secs: u64,
    partial: bool,
) -> behavior::Applied {
    behavior::apply(&BehaviorInput {
        desired,
        current,
        policy: &t.spec.policy,
        now,
        unix_secs,
        last_activity: snapshot.last_activity,
        partial,
    })
}

/// The target's state, or `None` when it cannot be read and was never read
/// (a last good state stands in for a failed read: the data plane and the
/// loop keep going on what was known).
async fn read_state(
    t: &mut Managed,
    now: Duration,
    observer: &dyn DecisionObserver,
) -> Option<ScaleState> {
    match &t.spec.scaling {
        Scaling::Advisory { ready } => {
            let r = ready.load(Ordering::Relaxed);
            // Advisory targets never change: spec is what serves.
            Some(ScaleState { spec: r, ready: r })
        }
        Scaling::Managed(target) => match target.scale().await {
            Ok(s) => {
                t.last = Some(s);
                Some(s)
            }
            Err(e) => {
                observer.scale_failed(&t.spec.name, &e);
                note_failure(t, now);
                None
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

/// Whether this replica may write now (leader election: its Lease was
/// renewed within the renew deadline).
pub trait WriteGuard: Send + Sync + std::fmt::Debug {
    fn may_write(&self) -> bool;
}

/// How a write of the replica count went.
enum Applied {
    Done,
    /// Not written: the guard refused (leadership lost during the tick).
    Refused,
    /// Not written (backing off, or an error already reported).
    Failed,
    /// The target changed under us (409): here is what it is now.
    Conflict(ScaleState),
}

/// Sets replicas. A conflict re-reads the target for the caller to decide
/// again; other errors back off, keeping the last good state.
async fn apply_scale(
    t: &mut Managed,
    target: &dyn ScaleTarget,
    replicas: u32,
    now: Duration,
    observer: &dyn DecisionObserver,
    guard: Option<&dyn WriteGuard>,
) -> Applied {
    if now < t.backoff_until {
        return Applied::Failed;
    }
    if guard.is_some_and(|g| !g.may_write()) {
        return Applied::Refused;
    }
    match target.set_replicas(replicas).await {
        Ok(()) => {
            t.failures = 0;
            if let Some(last) = &mut t.last {
                last.spec = replicas;
            }
            Applied::Done
        }
        Err(TargetError::Conflict { .. }) => match target.scale().await {
            Ok(s) => {
                t.last = Some(s);
                Applied::Conflict(s)
            }
            Err(e) => {
                observer.scale_failed(&t.spec.name, &e);
                note_failure(t, now);
                Applied::Failed
            }
        },
        Err(e) => {
            observer.scale_failed(&t.spec.name, &e);
            note_failure(t, now);
            Applied::Failed
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
        /// Reads to fail before reads work again.
        failing_reads: Mutex<u32>,
        /// On the next write: answer 409, someone else having set this.
        conflict_with: Mutex<Option<ScaleState>>,
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
                failing_reads: Mutex::new(0),
                conflict_with: Mutex::new(None),
            })
        }
    }

    impl ScaleTarget for Instant {
        fn target_ref(&self) -> &TargetRef {
            &self.target
        }
        fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>> {
            let s = *self.state.lock().unwrap();
            let mut failing = self.failing_reads.lock().unwrap();
            let result = if *failing > 0 {
                *failing -= 1;
                Err(TargetError::Unavailable {
                    target: "p".into(),
                    message: "api server down".into(),
                })
            } else {
                Ok(s)
            };
            Box::pin(async move { result })
        }
        fn set_replicas(&self, n: u32) -> BoxFuture<'_, Result<(), TargetError>> {
            if let Some(theirs) = self.conflict_with.lock().unwrap().take() {
                *self.state.lock().unwrap() = theirs;
                return Box::pin(async move {
                    Err(TargetError::Conflict {
                        target: "p".into(),
                        message: "the object has been modified".into(),
                    })
                });
            }
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
        memory: Mutex<Vec<crate::memory::MemoryEvent>>,
    }

    impl DecisionObserver for Recorder {
        fn decided(&self, s: &TargetStatus) {
            self.statuses.lock().unwrap().push(s.clone());
        }
        fn scale_failed(&self, name: &str, e: &TargetError) {
            self.failures.lock().unwrap().push(format!("{name}: {e}"));
        }
        fn memory(&self, e: crate::memory::MemoryEvent) {
            self.memory.lock().unwrap().push(e);
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

    /// slo with a 5,000 prompt tok/s prior and a 2 s TTFT target.
    fn slo_policy() -> Policy {
        Policy {
            algorithm: "slo".into(),
            target: 5000.0,
            ttft_target: Some(Duration::from_secs(2)),
            ..policy()
        }
    }

    /// A write guard a test turns on and off.
    #[derive(Debug, Default)]
    struct Switch(std::sync::atomic::AtomicBool);

    impl WriteGuard for Switch {
        fn may_write(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn the_engines_kv_cache_reaches_slo_and_the_key_overrides_it() {
        let slo = |kv_key: Option<u32>| Policy {
            kv_cache_tokens: kv_key,
            ..slo_policy()
        };
        for (key, reported, shown) in [
            (None, Some(40_000), Some("KV 40000 tokens per replica")),
            (
                Some(10_000),
                Some(40_000),
                Some("KV 10000 tokens per replica"),
            ),
            (None, None, None),
        ] {
            let (clock, signals, _, mut l) = setup(Scaling::Managed(Instant::new(1)), slo(key));
            signals.set_kv_capacity(reported);
            for _ in 0..30 {
                signals.arrival(1000);
                signals.dispatch(1000);
            }
            clock.advance(Duration::from_secs(2));
            let s = l.tick_once().await;
            match shown {
                Some(text) => assert!(s[0].reason.contains(text), "{}", s[0].reason),
                None => assert!(!s[0].reason.contains("KV"), "{}", s[0].reason),
            }
        }
    }

    /// A wall clock a test sets.
    #[derive(Debug, Default)]
    struct Wall(std::sync::atomic::AtomicU64);

    impl WallClock for Wall {
        fn unix_secs(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn a_successor_starts_from_the_memory_its_predecessor_saved() {
        use crate::memory::{InProcessMemory, MemoryEvent};
        let slo = slo_policy();
        let store = Arc::new(InProcessMemory::default());
        let wall = Arc::new(Wall::default());
        wall.0.store(1_800_000_000, Ordering::SeqCst);
        // A leader sees 100,000 prompt tokens arrive in a few seconds and
        // scales up; then it saves.
        let target = Instant::new(1);
        let (clock, signals, _, mut a) = setup(Scaling::Managed(target.clone()), slo.clone());
        a.wall = wall.clone();
        a.remember_in(store.clone(), "gw-a");
        assert_eq!(a.load_memory().await.unwrap(), 0, "nothing saved yet");
        for _ in 0..50 {
            signals.arrival(2000);
        }
        clock.advance(Duration::from_secs(2));
        let held = a.tick_once().await[0].applied;
        assert!(held >= 4, "the burst asked for {held}");
        assert_eq!(a.save_memory().await.unwrap(), 1);
        let saved = store.document().unwrap();
        assert!(saved.contains(r#""holder":"gw-a""#), "{saved}");
        // Successors in new processes (clocks of their own), over the
        // same Deployment, a trickle of traffic each, 20 s after the save.
        wall.0.fetch_add(20, Ordering::SeqCst);
        let successor = |policy: Policy| {
            let (store, wall, target) = (store.clone(), wall.clone(), target.clone());
            async move {
                let (clock, signals, recorder, mut b) = setup(Scaling::Managed(target), policy);
                b.wall = wall;
                b.remember_in(store, "gw-b");
                b.new_leader();
                let loaded = b.load_memory().await.unwrap();
                signals.arrival(100);
                clock.advance(Duration::from_secs(2));
                let s = b.tick_once().await;
                let events = recorder.memory.lock().unwrap().clone();
                (loaded, s[0].clone(), events)
            }
        };
        // Someone scaled the Deployment back to one meanwhile: what a
        // fresh start finds, and keeps, is one replica; only the memory
        // knows the burst needed more.
        *target.state.lock().unwrap() = ScaleState { spec: 1, ready: 1 };
        let (loaded, s, events) = successor(slo.clone()).await;
        assert_eq!(loaded, 1);
        assert_eq!(events, vec![MemoryEvent::Loaded, MemoryEvent::Recalled]);
        assert_eq!(
            s.applied, held,
            "the recalled hold keeps the burst's count: {}",
            s.reason
        );
        // Learnt under another policy: not taken; the trickle needs one
        // replica.
        *target.state.lock().unwrap() = ScaleState { spec: 1, ready: 1 };
        let other = Policy {
            ttft_target: Some(Duration::from_secs(3)),
            ..slo.clone()
        };
        let (_, s, events) = successor(other).await;
        assert_eq!(events, vec![MemoryEvent::Loaded, MemoryEvent::Refused]);
        assert_eq!(s.applied, 1, "{}", s.reason);
        // Saved more than an hour ago: not taken either.
        *target.state.lock().unwrap() = ScaleState { spec: 1, ready: 1 };
        wall.0.fetch_add(3600, Ordering::SeqCst);
        let (_, s, events) = successor(slo).await;
        assert_eq!(events, vec![MemoryEvent::Loaded, MemoryEvent::Refused]);
        assert_eq!(s.applied, 1, "{}", s.reason);
    }

    #[tokio::test]
    async fn memory_is_saved_only_while_this_replica_may_write() {
        let store = Arc::new(crate::memory::InProcessMemory::default());
        let slo = Policy {
            algorithm: "slo".into(),
            ..policy()
        };
        let (clock, signals, recorder, mut l) = setup(Scaling::Managed(Instant::new(1)), slo);
        l.remember_in(store.clone(), "gw");
        let guard = Arc::new(Switch::default());
        l.guard_writes(guard.clone());
        signals.arrival(100);
        clock.advance(Duration::from_secs(2));
        l.tick_once().await;
        // Not before this leadership has read the store.
        guard.0.store(true, Ordering::SeqCst);
        assert_eq!(l.save_memory().await.unwrap(), 0);
        assert_eq!(l.load_memory().await.unwrap(), 0);
        // Nor while it may not write.
        guard.0.store(false, Ordering::SeqCst);
        assert_eq!(l.save_memory().await.unwrap(), 0);
        assert!(store.document().is_none());
        guard.0.store(true, Ordering::SeqCst);
        assert_eq!(l.save_memory().await.unwrap(), 1);
        assert!(store.document().is_some());
        use crate::memory::MemoryEvent::{Empty, Saved};
        assert_eq!(*recorder.memory.lock().unwrap(), vec![Empty, Saved]);
    }

    #[tokio::test]
    async fn nothing_to_remember_is_written_once_per_leadership() {
        use crate::memory::MemoryEvent::{Empty, Saved};
        // kpa keeps no memory: the first periodic save writes an empty
        // document, the next ones nothing.
        let store = Arc::new(crate::memory::InProcessMemory::default());
        let (clock, _, recorder, mut l) = setup(Scaling::Managed(Instant::new(1)), policy());
        l.remember_in(store.clone(), "gw");
        l.load_memory().await.unwrap();
        let saves = |r: &Recorder| {
            r.memory
                .lock()
                .unwrap()
                .iter()
                .filter(|e| **e == Saved)
                .count()
        };
        for round in 0..3 {
            clock.advance(crate::memory::SAVE_EVERY);
            l.tick_once().await;
            l.keep_memory().await;
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert_eq!(saves(&recorder), 1, "round {round}");
        }
        assert!(store.document().unwrap().contains("\"targets\":{}"));
        // A new leadership writes once again.
        l.new_leader();
        l.load_memory().await.unwrap();
        clock.advance(crate::memory::SAVE_EVERY);
        l.tick_once().await;
        l.keep_memory().await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(saves(&recorder), 2);
        assert_eq!(recorder.memory.lock().unwrap()[0], Empty);
    }

    /// A store that answers reads with an error until told otherwise.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: crate::memory::InProcessMemory,
        failing: std::sync::atomic::AtomicBool,
    }

    impl crate::memory::MemoryStore for Flaky {
        fn place(&self) -> String {
            "flaky".into()
        }
        fn load(&self) -> BoxFuture<'_, Result<Option<String>, crate::memory::MemoryError>> {
            if self.failing.load(Ordering::SeqCst) {
                return Box::pin(async {
                    Err(crate::memory::MemoryError::Store {
                        place: "flaky".into(),
                        message: "timed out".into(),
                    })
                });
            }
            self.inner.load()
        }
        fn save(&self, d: String) -> BoxFuture<'_, Result<(), crate::memory::MemoryError>> {
            self.inner.save(d)
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_be_read_is_not_overwritten_and_a_late_read_is_recalled() {
        use crate::memory::MemoryEvent::{Failed, Loaded, Recalled};
        let slo = slo_policy();
        let store = Arc::new(Flaky::default());
        // A leader learns a burst's count and saves it.
        let target = Instant::new(1);
        let (clock, signals, _, mut a) = setup(Scaling::Managed(target.clone()), slo.clone());
        a.remember_in(store.clone(), "gw-a");
        a.load_memory().await.unwrap();
        for _ in 0..50 {
            signals.arrival(2000);
        }
        clock.advance(Duration::from_secs(2));
        let held = a.tick_once().await[0].applied;
        assert!(held >= 4, "{held}");
        a.save_memory().await.unwrap();
        let saved = store.inner.document();
        // Its successor cannot read the store at first: it starts afresh
        // and saves nothing over what it could not read.
        *target.state.lock().unwrap() = ScaleState { spec: 1, ready: 1 };
        store.failing.store(true, Ordering::SeqCst);
        let (clock, signals, recorder, mut b) = setup(Scaling::Managed(target.clone()), slo);
        b.remember_in(store.clone(), "gw-b");
        b.new_leader();
        assert!(b.load_memory().await.is_err());
        signals.arrival(100);
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.tick_once().await[0].applied, 1);
        assert_eq!(b.save_memory().await.unwrap(), 0);
        assert_eq!(store.inner.document(), saved);
        // Read later, the memory takes over the target at its next tick.
        store.failing.store(false, Ordering::SeqCst);
        assert_eq!(b.load_memory().await.unwrap(), 1);
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.tick_once().await[0].applied, held);
        assert_eq!(
            *recorder.memory.lock().unwrap(),
            vec![Failed, Loaded, Recalled]
        );
        // A document read but of no use here (another version's, or
        // damaged) is overwritten, as a fresh start's memory.
        crate::memory::MemoryStore::save(&store.inner, "{\"version\": 9}".into())
            .await
            .unwrap();
        b.new_leader();
        let e = b.load_memory().await.unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
        clock.advance(Duration::from_secs(2));
        b.tick_once().await;
        assert_eq!(b.save_memory().await.unwrap(), 1);
        assert!(
            store
                .inner
                .document()
                .unwrap()
                .contains("\"holder\":\"gw-b\"")
        );
    }

    #[tokio::test]
    async fn a_refused_write_is_not_made_and_the_decision_says_so() {
        let target = Instant::new(1);
        let (clock, signals, _, mut l) = setup(Scaling::Managed(target.clone()), policy());
        let guard = Arc::new(Switch::default());
        l.guard_writes(guard.clone());
        for _ in 0..12 {
            signals.dispatch(0);
        }
        clock.advance(Duration::from_secs(2));
        let s = l.tick_once().await;
        assert_eq!(s[0].applied, 6);
        assert!(!s[0].changed, "{:?}", s[0]);
        assert!(
            s[0].reason.contains("not written: no longer the leader"),
            "{}",
            s[0].reason
        );
        assert!(target.sets.lock().unwrap().is_empty());
        // Allowed again: the same decision is written.
        guard.0.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(2));
        let s = l.tick_once().await;
        assert!(s[0].changed, "{:?}", s[0]);
        assert_eq!(*target.sets.lock().unwrap(), vec![6]);
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
            // A metric that does not count queued requests: only the wake
            // path sees them.
            metric: scalecar_config::Metric::Tokens,
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

    #[tokio::test]
    async fn a_failed_read_changes_nothing() {
        let target = Instant::new(5);
        *target.failing_reads.lock().unwrap() = 1;
        let (clock, _signals, recorder, mut l) = setup(Scaling::Managed(target.clone()), policy());
        clock.advance(Duration::from_secs(2));
        let s = l.tick_once().await;
        assert_eq!(s[0].desired, None, "{:?}", s[0]);
        assert!(!s[0].changed);
        assert!(target.sets.lock().unwrap().is_empty());
        assert_eq!(recorder.failures.lock().unwrap().len(), 1);
        // The first good read creates the decider with the real ready
        // count (5: it starts in panic and holds on empty windows).
        for _ in 0..3 {
            clock.advance(Duration::from_secs(2));
            let s = l.tick_once().await;
            assert_eq!(s[0].applied, 5, "{:?}", s[0]);
        }
        assert!(target.sets.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn scale_to_zero_waits_for_observed_idleness_after_a_restart() {
        let target = Instant::new(1);
        let policy = Policy {
            min_replicas: 0,
            scale_to_zero_grace_period: Duration::from_secs(10),
            ..policy()
        };
        let (clock, _signals, _, mut l) = setup(Scaling::Managed(target.clone()), policy);
        // The gateway just started: no traffic seen, but only 2 s watched.
        clock.advance(Duration::from_secs(2));
        let s = l.tick_once().await;
        assert_eq!(s[0].applied, 1, "{:?}", s[0]);
        assert!(target.sets.lock().unwrap().is_empty());
        // Idle for the whole grace period: now to zero.
        for _ in 0..5 {
            clock.advance(Duration::from_secs(2));
            l.tick_once().await;
        }
        assert_eq!(*target.sets.lock().unwrap(), vec![0]);
    }

    #[tokio::test]
    async fn a_conflict_re_reads_and_decides_again() {
        let target = Instant::new(1);
        let policy = Policy {
            // At most ×2 a tick: from 1 ready the decision is 2.
            max_scale_up_rate: 2.0,
            ..policy()
        };
        let (clock, signals, recorder, mut l) = setup(Scaling::Managed(target.clone()), policy);
        for _ in 0..12 {
            signals.dispatch(0);
        }
        // Someone else scaled to 4 meanwhile: the write of 2 gets a 409.
        *target.conflict_with.lock().unwrap() = Some(ScaleState { spec: 4, ready: 4 });
        clock.advance(Duration::from_secs(2));
        let s = l.tick_once().await;
        // Decided again from 4 ready: 6 (the load's count), never back to 2.
        assert_eq!(*target.sets.lock().unwrap(), vec![6]);
        assert_eq!((s[0].spec, s[0].applied, s[0].ready), (4, 6, 4));
        assert!(s[0].changed);
        assert!(recorder.failures.lock().unwrap().is_empty());
        for _ in 0..12 {
            signals.complete(0, 0, false, None);
        }
    }

    #[tokio::test]
    async fn queued_requests_are_load_and_the_cap_is_the_target() {
        // max-concurrency 4, no target: the target is 4 (× 70 %); 4 in
        // flight and 4 queued behind them are 8 of load → 3 replicas.
        let mut keys = BTreeMap::new();
        keys.insert("algorithm".to_string(), "kpa".to_string());
        keys.insert("max-concurrency".to_string(), "4".to_string());
        keys.insert("window".to_string(), "10s".to_string());
        let policy = Policy::from_keys(&keys, Role::Unified).unwrap();
        assert_eq!(policy.target, 4.0);
        let target = Instant::new(1);
        let (clock, signals, _, mut l) = setup(Scaling::Managed(target.clone()), policy);
        for _ in 0..4 {
            signals.dispatch(0);
            signals.queue_enter();
        }
        for _ in 0..5 {
            clock.advance(Duration::from_secs(2));
            l.tick_once().await;
        }
        assert_eq!(target.state.lock().unwrap().spec, 3);
        for _ in 0..4 {
            signals.complete(0, 0, false, None);
            signals.queue_leave(Duration::ZERO);
        }
    }

    #[tokio::test]
    async fn advisory_changes_are_reported_once() {
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
        assert!(l.tick_once().await[0].changed);
        for _ in 0..3 {
            clock.advance(Duration::from_secs(2));
            let s = l.tick_once().await;
            assert_eq!(s[0].applied, 6);
            assert!(!s[0].changed, "{:?}", s[0]);
        }
        for _ in 0..12 {
            signals.complete(0, 0, false, None);
        }
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
