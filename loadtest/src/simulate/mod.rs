//! The virtual-time simulator behind `scalecar simulate`: a whole trace
//! against the real scaler in seconds of CPU.
//!
//! What is real: the pool's signals and windows (`PoolSignals` on a
//! [`ManualClock`]), the algorithm registry, behavior and the control
//! loop's tick (`ControlLoop::tick_once`), the proxy's endpoint pick
//! ([`least_loaded`](scalecar_scaler::balance::least_loaded)) and its admission
//! rules (FIFO queue, bound, deadline, per-endpoint cap), and the GPU model
//! of model-sim ([`Engine`]), stepped on the
//! simulator's clock. What is simulated: time, the network (zero latency)
//! and Kubernetes (a new replica serves exactly `startup_delay` after it
//! was asked for).
//!
//! Invariants: nothing here reads a wall clock or sleeps, so a run is a
//! function of its inputs (the same trace and policy give the same report);
//! every request ends in exactly one [`Fate`]; replica-seconds count each
//! replica from the moment it was asked for (its cold start holds a GPU)
//! until it is removed and drained.

pub mod oracle;
mod requests;
mod world;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use scalecar_config::{Policy, Role};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use scalecar_scaler::clock::ManualClock;
use scalecar_scaler::control::{
    ControlError, ControlLoop, DecisionObserver, Scaling, TargetSpec, WallClock,
};
use scalecar_scaler::signals::{self, PoolSignals, SignalsConfig};
use scalecar_scaler::target::{BoxFuture, ScaleState, ScaleTarget, TargetError, TargetRef};
use serde::Serialize;

use world::World;
pub use world::{Fate, RequestState};

use crate::loadgen::Arrival;
use crate::plot::TimelinePoint;
use crate::sim::engine::{Engine, EngineEvents, Timing, TokenLatency};

/// What the simulated cluster is made of.
#[derive(Debug, Clone)]
pub struct Settings {
    /// One replica's GPU model.
    pub timing: Timing,
    /// From asking for a replica to its first request.
    pub startup_delay: Duration,
    /// The control loop's interval.
    pub tick: Duration,
    /// A request meets the SLO when its TTFT (from its arrival at the
    /// proxy) is at most this.
    pub ttft_target: Duration,
    /// The proxy's queue bound (`limits.queue-length`) and deadline
    /// (`limits.queue-wait`).
    pub queue_length: usize,
    pub queue_wait: Duration,
    /// Requests one replica gets at once (`max-concurrency`).
    pub max_concurrency: Option<u32>,
    /// Replicas serving at time zero.
    pub initial_replicas: u32,
    /// The most replicas (the oracle searches up to here).
    pub max_replicas: u32,
    /// Replays the trace's last stretch of this length first, unmeasured,
    /// so the run starts as a running system does — with warm windows, a
    /// learned capacity and the replicas the load called for — rather than
    /// with `initial_replicas` facing the trace's first minute. The oracle
    /// then starts with the count it chooses.
    pub warmup: Duration,
    /// Hands the control loop to a new leader this often (every algorithm
    /// is created afresh, as after a restart or a failover); `None`: never.
    pub new_leader_every: Option<Duration>,
    /// With new leaders: each starts from the memory its predecessor last
    /// saved (every 30 s, as `memory-config-map` keeps it; a failover, so
    /// nothing is saved at the handover itself). `false`: each starts
    /// afresh, as with `memory-config-map: ""`.
    pub leader_memory: bool,
    /// Record the warm-up's decisions too (at negative times): what the
    /// run starts from — a level held, a capacity learnt — is decided there.
    pub warmup_decisions: bool,
}

impl Settings {
    /// The proxy's default limits with the given GPU model.
    pub fn new(timing: Timing) -> Self {
        let limits = scalecar_config::Limits::default();
        Settings {
            timing,
            startup_delay: Duration::from_secs(60),
            tick: Duration::from_secs(2),
            ttft_target: Duration::from_secs(1),
            queue_length: limits.queue_length,
            queue_wait: limits.queue_wait,
            max_concurrency: None,
            initial_replicas: 1,
            max_replicas: 64,
            warmup: Duration::ZERO,
            new_leader_every: None,
            leader_memory: true,
            warmup_decisions: false,
        }
    }
}

/// Where the simulated proxy reports what it sees (the pool's signals, or
/// nothing for the oracle's trial runs). Times come through `set_now`
/// before the calls they apply to.
pub trait Recorder {
    /// Whether this run's latencies are kept (ITL histogram): not for the
    /// oracle's trials.
    fn measures(&self) -> bool {
        true
    }
    fn set_now(&mut self, _now: Duration) {}
    fn arrival(&mut self, _prompt_tokens: u64) {}
    fn queue_enter(&mut self) {}
    fn queue_leave(&mut self, _waited: Duration) {}
    fn dispatch(&mut self, _prompt_tokens: u64) {}
    fn first_token(&mut self, _prompt_tokens: u64, _ttft: Duration) {}
    fn inter_token(&mut self, _itl: Duration) {}
    fn decode_tokens(&mut self, _n: u64) {}
    /// A replica started (`true`) or stopped having requests before their
    /// first token, as the proxy counts per endpoint.
    fn prefill_busy(&mut self, _busy: bool) {}
    /// The same for requests decoding.
    fn decode_busy(&mut self, _busy: bool) {}
    /// A replica became ready `_took` after it was asked for (what the pod
    /// watch sees as created → Ready).
    fn replica_ready(&mut self, _took: Duration) {}
    fn complete(
        &mut self,
        _prompt_tokens: u64,
        _generated: u64,
        _first_token_seen: bool,
        _e2e: Option<Duration>,
    ) {
    }
}

/// Records nothing: the oracle's runs, which no scaler watches.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecorder;

impl Recorder for NoRecorder {
    fn measures(&self) -> bool {
        false
    }
}

/// Records into a pool's signals, as the proxy's request path does, on the
/// simulator's clock.
#[derive(Debug, Clone)]
pub struct SignalsRecorder {
    clock: Arc<ManualClock>,
    signals: Arc<PoolSignals>,
}

impl Recorder for SignalsRecorder {
    fn set_now(&mut self, now: Duration) {
        self.clock.set(now);
    }
    fn arrival(&mut self, prompt_tokens: u64) {
        self.signals.arrival(prompt_tokens);
    }
    fn queue_enter(&mut self) {
        self.signals.queue_enter();
    }
    fn queue_leave(&mut self, waited: Duration) {
        self.signals.queue_leave(waited);
    }
    fn dispatch(&mut self, prompt_tokens: u64) {
        self.signals.dispatch(prompt_tokens);
    }
    fn first_token(&mut self, prompt_tokens: u64, ttft: Duration) {
        self.signals.first_token(prompt_tokens, ttft);
    }
    fn inter_token(&mut self, itl: Duration) {
        self.signals.inter_token(itl);
    }
    fn decode_tokens(&mut self, n: u64) {
        self.signals.decode_tokens(n);
    }
    fn prefill_busy(&mut self, busy: bool) {
        self.signals.prefill_busy(busy);
    }
    fn decode_busy(&mut self, busy: bool) {
        self.signals.decode_busy(busy);
    }
    fn replica_ready(&mut self, took: Duration) {
        self.signals.observe_cold_start(took);
    }
    fn complete(
        &mut self,
        prompt: u64,
        generated: u64,
        first_token_seen: bool,
        e2e: Option<Duration>,
    ) {
        self.signals
            .complete(prompt, generated, first_token_seen, e2e);
    }
}

/// The simulated workload's scale subresource: the loop writes `spec`,
/// the simulator reads it each tick and reports `ready` back.
#[derive(Debug)]
struct SimTarget {
    target: TargetRef,
    spec: AtomicU32,
    ready: AtomicU32,
}

impl ScaleTarget for SimTarget {
    fn target_ref(&self) -> &TargetRef {
        &self.target
    }

    fn scale(&self) -> BoxFuture<'_, Result<ScaleState, TargetError>> {
        let state = ScaleState {
            spec: self.spec.load(Ordering::Acquire),
            ready: self.ready.load(Ordering::Acquire),
        };
        Box::pin(async move { Ok(state) })
    }

    fn set_replicas(&self, replicas: u32) -> BoxFuture<'_, Result<(), TargetError>> {
        self.spec.store(replicas, Ordering::Release);
        Box::pin(async { Ok(()) })
    }
}

/// The loop's statuses come back from `tick_once`; nothing else listens.
#[derive(Debug)]
struct Silent;

impl DecisionObserver for Silent {
    fn decided(&self, _: &scalecar_scaler::control::TargetStatus) {}
    fn scale_failed(&self, _: &str, _: &TargetError) {}
}

/// Schedule floors see the Unix epoch plus virtual time: a trace carries no
/// calendar.
#[derive(Debug)]
struct VirtualWall(Arc<ManualClock>);

impl WallClock for VirtualWall {
    fn unix_secs(&self) -> u64 {
        use scalecar_scaler::clock::Clock;
        self.0.now().as_secs()
    }
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("the trace has no requests")]
    EmptyTrace,
    #[error("the scaler: {0}")]
    Control(#[from] ControlError),
}

/// What one run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Measured {
    pub requests: usize,
    /// Requests with a TTFT within the target, over all requests (a
    /// rejected or timed-out request is a miss).
    pub ttft_attainment: f64,
    /// Requests no replica count could serve in time: larger than a
    /// replica's KV cache, or slower than the target alone on an idle
    /// replica.
    pub infeasible: usize,
    /// Requests with a TTFT within the target, over the feasible ones:
    /// what a scaler can be held to.
    pub feasible_ttft_attainment: f64,
    /// TTFT quantiles of the requests that got a first token, seconds.
    pub ttft_p50: f64,
    pub ttft_p90: f64,
    pub ttft_p99: f64,
    /// ITL p90 over every token after the first, seconds.
    pub itl_p90: f64,
    /// Replicas × seconds from time zero to the last arrival, cold starts
    /// included.
    pub replica_seconds: f64,
    pub max_replicas_used: u32,
    /// Requests that got no answer: queue full, queue deadline, too large.
    pub failed: usize,
}

impl Measured {
    /// Over the requests from `first` on and the time `span`; `feasible`
    /// says, by trace index, which requests some count could serve in time.
    fn of<R: Recorder>(
        world: &World<'_, R>,
        target: Duration,
        first: usize,
        span: (Duration, Duration),
        feasible: &[bool],
    ) -> Self {
        let measured = || world.requests.iter_from(first);
        let mut ttfts: Vec<Duration> = measured().filter_map(|r| r.ttft).collect();
        ttfts.sort_unstable();
        let met = ttfts.iter().filter(|t| **t <= target).count();
        let requests = world.requests.len().saturating_sub(first);
        let feasible = feasible.get(first..).unwrap_or(&[]);
        let infeasible = feasible.iter().filter(|f| !**f).count();
        let feasible_met = measured()
            .zip(feasible)
            .filter(|(r, f)| **f && r.ttft.is_some_and(|t| t <= target))
            .count();
        let share = |n: usize, of: usize| if of == 0 { 1.0 } else { n as f64 / of as f64 };
        let q = |p: f64| {
            let i = ((ttfts.len() as f64 * p).ceil() as usize).clamp(1, ttfts.len().max(1)) - 1;
            ttfts.get(i).map_or(0.0, Duration::as_secs_f64)
        };
        let itl = world
            .itl
            .as_ref()
            .map_or_else(Default::default, signals::summary);
        Measured {
            requests,
            ttft_attainment: share(met, requests),
            infeasible,
            feasible_ttft_attainment: share(feasible_met, requests.saturating_sub(infeasible)),
            ttft_p50: q(0.5),
            ttft_p90: q(0.9),
            ttft_p99: q(0.99),
            itl_p90: itl.p90.map_or(0.0, |d| d.as_secs_f64()),
            replica_seconds: world.replica_seconds(span.0, span.1),
            max_replicas_used: world.peak_replicas(span.0, span.1),
            failed: measured()
                .filter(|r| matches!(r.fate, Fate::Rejected | Fate::TimedOut | Fate::TooLarge))
                .count(),
        }
    }
}

/// Which requests of `trace` some replica count could serve within the
/// target: those whose TTFT alone on an idle replica is within it (one
/// larger than the KV cache never gets a first token).
pub fn feasibility(trace: &[Arrival], settings: &Settings) -> Vec<bool> {
    let mut known: std::collections::HashMap<(u32, u32), bool> = std::collections::HashMap::new();
    trace
        .iter()
        .map(|a| {
            *known
                .entry((a.prompt_tokens, a.max_tokens))
                .or_insert_with(|| {
                    alone_ttft(&settings.timing, a.prompt_tokens, a.max_tokens)
                        .is_some_and(|t| t <= settings.ttft_target)
                })
        })
        .collect()
}

/// The TTFT of a request alone on an idle replica (`None`: it never gets
/// a first token, being larger than the KV cache).
pub(crate) fn alone_ttft(timing: &Timing, prompt_tokens: u32, max_tokens: u32) -> Option<Duration> {
    struct FirstToken(Option<Duration>);
    impl EngineEvents<world::RequestId> for FirstToken {
        fn admitted(&mut self, _: &world::RequestId, _: Duration) {}
        fn prefilled(&mut self, _: u32) {}
        fn token(&mut self, _: &world::RequestId, _: u32, latency: TokenLatency) {
            if let TokenLatency::FirstToken(t) = latency {
                self.0 = Some(t);
            }
        }
        fn finished(&mut self, _: &world::RequestId, _: Option<Duration>) {}
    }
    let mut engine = Engine::new(timing.clone());
    engine.submit(
        world::RequestId(0),
        prompt_tokens,
        max_tokens,
        false,
        Duration::ZERO,
    );
    let mut first = FirstToken(None);
    let mut now = Duration::ZERO;
    // Every step prefills a chunk or emits the token: this ends.
    while first.0.is_none() {
        let step = engine.begin_step(now, &mut first)?;
        now += step;
        engine.end_step(now, &mut first);
    }
    first.0
}

/// One algorithm's run over a trace.
#[derive(Debug, Clone)]
pub struct Run {
    pub measured: Measured,
    /// Ticks where the replica count changed.
    pub scale_events: u32,
    /// One point per tick.
    pub timeline: Vec<TimelinePoint>,
    /// Virtual time when the last request settled.
    pub ended: Duration,
    /// Every request's measurements, in trace order.
    pub requests: Vec<RequestState>,
    /// The scaler's decision at every tick, with its reason.
    pub decisions: Vec<Decided>,
}

/// One tick's decision, as the report's `decisions.jsonl` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decided {
    pub t: f64,
    pub ready: u32,
    pub desired: Option<u32>,
    pub applied: u32,
    pub panic: bool,
    pub reason: String,
}

/// The time replica-seconds are counted to: the last arrival (every run
/// of a trace is charged over the same span).
pub fn horizon(trace: &[Arrival]) -> Duration {
    trace.last().map_or(Duration::ZERO, |a| a.at)
}

/// The trace with its last `warmup` replayed before it: the warm-up
/// requests first, then the trace shifted by the warm-up. Returns the
/// combined arrivals and how many of them are warm-up.
pub fn with_warmup(trace: &[Arrival], warmup: Duration) -> (Vec<Arrival>, usize) {
    if warmup.is_zero() {
        return (trace.to_vec(), 0);
    }
    let last = horizon(trace);
    let from = last.saturating_sub(warmup);
    let lead = last - from;
    let mut out: Vec<Arrival> = trace
        .iter()
        .filter(|a| a.at >= from)
        .map(|a| Arrival {
            at: a.at - from,
            ..*a
        })
        .collect();
    let warm = out.len();
    out.extend(trace.iter().map(|a| Arrival {
        at: a.at + lead + Duration::from_nanos(1),
        ..*a
    }));
    (out, warm)
}

/// A point of the timeline: the last tick's arrivals and first tokens, and
/// the world now.
fn timeline_point<R: Recorder>(
    world: &mut World<'_, R>,
    tick: Duration,
    arrivals: usize,
    desired: u32,
    panic: bool,
) -> TimelinePoint {
    let ttfts = &mut world.recent_ttfts;
    ttfts.sort_unstable();
    let p90 = ttfts
        .get((ttfts.len() * 9).div_ceil(10).saturating_sub(1))
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    ttfts.clear();
    TimelinePoint {
        t: world.now().as_secs_f64(),
        rps: arrivals as f64 / tick.as_secs_f64().max(1e-9),
        ttft_p90_ms: p90,
        queue: world.queued() as f64,
        in_flight: f64::from(world.in_flight()),
        desired,
        ready: world.ready(),
        panic,
    }
}

/// Replays `trace` (sorted by arrival) against the scaler with `policy`:
/// requests flow through the simulated proxy into replicas; every `tick`
/// the real control loop decides on the real signals and the simulated
/// Deployment follows, new replicas serving after the startup delay.
///
/// `on_tick` sees the virtual time of every tick (for progress).
pub async fn simulate(
    trace: &[Arrival],
    settings: &Settings,
    policy: &Policy,
    registry: &AlgorithmRegistry,
    mut on_tick: impl FnMut(Duration),
) -> Result<Run, SimulateError> {
    if trace.is_empty() {
        return Err(SimulateError::EmptyTrace);
    }
    let (combined, warm) = with_warmup(trace, settings.warmup);
    let trace = &combined[..];
    // Measured from the real trace's first instant.
    let start = trace.get(warm).map_or(Duration::ZERO, |a| {
        a.at.saturating_sub(Duration::from_nanos(1))
    });
    let last = horizon(trace);
    let clock = Arc::new(ManualClock::new(Duration::ZERO));
    let signals = Arc::new(PoolSignals::new(
        SignalsConfig::for_window(policy.window),
        clock.clone(),
    ));
    // As the proxy's read of the engines' `/metrics` would find it (vLLM's
    // `cache_config_info`, which model-sim exports too).
    signals.set_kv_capacity(Some(settings.timing.kv_capacity));
    let initial = settings.initial_replicas;
    let target = Arc::new(SimTarget {
        target: TargetRef {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            namespace: "simulated".into(),
            name: "model".into(),
        },
        spec: AtomicU32::new(initial),
        ready: AtomicU32::new(initial),
    });
    let mut control = ControlLoop::new(
        vec![TargetSpec {
            name: "model".into(),
            model: "model".into(),
            role: Role::Unified,
            policy: policy.clone(),
            signals: signals.clone(),
            scaling: Scaling::Managed(target.clone()),
        }],
        registry,
        clock.clone(),
        Arc::new(VirtualWall(clock.clone())),
        Arc::new(Silent),
        settings.tick,
    )?;
    let recorder = SignalsRecorder {
        clock: clock.clone(),
        signals,
    };
    let handing_over = settings.new_leader_every.filter(|e| !e.is_zero());
    if handing_over.is_some() && settings.leader_memory {
        control.remember_in(
            Arc::new(scalecar_scaler::memory::InProcessMemory::default()),
            "simulated",
        );
        // The first leader finds no memory (and may then save).
        let _ = control.load_memory().await;
    }
    let mut last_saved: Option<Duration> = None;
    let mut world = World::new(trace, settings, recorder, initial);
    let tick = settings.tick.max(Duration::from_millis(1));
    // Requests never outlive their queue deadline plus a long generation;
    // a day past the last arrival means something never settles.
    let give_up = last + Duration::from_secs(86_400);
    let mut timeline = Vec::new();
    let mut scale_events = 0;
    let mut decisions = Vec::new();
    let mut arrived = 0;
    let mut t = Duration::ZERO;
    loop {
        world.run_until(t);
        target.ready.store(world.ready(), Ordering::Release);
        // Handovers counted from the measured start: the warm-up's leader
        // is the first.
        if let Some(every) = handing_over
            && t >= start + every
            && (t - start).as_nanos() % every.as_nanos() < tick.as_nanos()
        {
            control.new_leader();
            // An in-process store neither fails nor holds a document too
            // large; a load error would only mean a fresh start.
            let _ = control.load_memory().await;
        }
        let statuses = control.tick_once().await;
        if handing_over.is_some()
            && settings.leader_memory
            && last_saved.is_none_or(|s| t.saturating_sub(s) >= scalecar_scaler::memory::SAVE_EVERY)
        {
            let _ = control.save_memory().await;
            last_saved = Some(t);
        }
        let status = statuses.first();
        let measuring = t >= start;
        if measuring && status.is_some_and(|s| s.changed) {
            scale_events += 1;
        }
        if let Some(s) = status.filter(|_| measuring || settings.warmup_decisions) {
            decisions.push(Decided {
                // From the measured start: the warm-up's are negative.
                t: t.as_secs_f64() - start.as_secs_f64(),
                ready: s.ready,
                desired: s.desired,
                applied: s.applied,
                panic: s.panic,
                reason: s.reason.clone(),
            });
        }
        let spec = target.spec.load(Ordering::Acquire);
        if spec != world.replicas() {
            world.set_replicas(spec, false);
        }
        let arrivals = world.arrived() - arrived;
        let panic = status.is_some_and(|s| s.panic);
        let mut point = timeline_point(&mut world, tick, arrivals, spec, panic);
        if measuring {
            point.t -= start.as_secs_f64();
            timeline.push(point);
        }
        arrived = world.arrived();
        // Latencies are measured from the trace's start.
        if !measuring
            && t + tick >= start
            && let Some(h) = world.itl.as_mut()
        {
            h.reset();
        }
        on_tick(t.saturating_sub(start));
        if (world.finished() && t >= last) || t > give_up {
            break;
        }
        t += tick;
    }
    let feasible = feasibility(trace, settings);
    let measured = Measured::of(&world, settings.ttft_target, warm, (start, last), &feasible);
    let requests = world.requests.to_vec_from(warm);
    Ok(Run {
        measured,
        scale_events,
        timeline,
        ended: t.saturating_sub(start),
        requests,
        decisions,
    })
}

#[cfg(test)]
mod tests;
