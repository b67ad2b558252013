//! `scalecar replay`: scaling decisions from recorded signals, offline.
//!
//! Deterministic and free of network and wall clock: JSON lines come in on
//! stdin, one decision per line (window values) or per tick (samples) goes
//! out on stdout. The same registry, windows and behavior as the live loop
//! run here, on a virtual clock, so a trace replayed twice gives the same
//! output byte for byte.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use scalecar_config::{Metric, Policy, PolicyErrors, Role};
use scalecar_scaler::algorithm::{AlgorithmRegistry, DecisionInput, ScalingAlgorithm};
use scalecar_scaler::behavior::{self, BehaviorInput};
use scalecar_scaler::clock::ManualClock;
use scalecar_scaler::signals::{PoolSignals, SignalsConfig};
use scalecar_scaler::{WindowSnapshot, WindowValues};
use serde::Serialize;
use serde_json::{Map, Value};

/// Arguments of `scalecar replay`.
#[derive(Debug, clap::Args)]
#[command(after_help = REPLAY_HELP)]
pub struct ReplayArgs {
    /// Policy file (YAML): the annotation keys without the `scalecar.io/`
    /// prefix, e.g. `algorithm: kpa`, `target: 10`.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// One policy key, `key=value`; repeatable; applied over `--policy`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Decision interval for sample input.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub tick: Duration,
    /// The role of the replayed pool (chooses TTFT or ITL for `slo`).
    #[arg(long, default_value = "unified", value_parser = parse_role)]
    pub role: Role,
}

const REPLAY_HELP: &str = "\
INPUT (JSON lines on stdin; `t` in seconds, never decreasing; every line of one kind)

  Window values: only the algorithm runs, once per line, at that line's t.
    {\"t\": 12.0, \"ready\": 5, \"stable\": 50.0, \"panic\": 30.0}
  `stable` and `panic` are the pool totals of the policy's metric over the
  stable and the panic window.

  Per-second samples: they go through the real windows; a decision is made
  every --tick. A sample holds from its t until the next line.
    {\"t\": 12.0, \"ready\": 5, \"concurrency\": 12.5, \"rps\": 3.0, \"queue\": 0,
     \"tokens\": 4096, \"ttft_ms\": [350, 420], \"itl_ms\": [20, 22]}
  Besides `t` and `ready`, a sample carries at least one of the others;
  any left out means 0 / no samples.

  The decider is created at the first line, with that line's ready count.

OUTPUT (JSON lines on stdout)
  {\"t\", \"ready\", \"desired\", \"applied\", \"panic\", \"stable\", \"panic_value\", \"target\", \"reason\"}
  `desired` is the algorithm's count (null: no decision); `applied` the count
  after schedule floors, scale-to-zero and the min/max bounds.

Bad input (malformed line, t going backwards or past 1e9 s, samples more
than a day apart, unknown key) stops with the line number on stderr and
exit code 2.

EXAMPLE
  printf '%s\\n' '{\"t\":0,\"ready\":1,\"stable\":10,\"panic\":10}' \\
                 '{\"t\":2,\"ready\":1,\"stable\":10,\"panic\":80}' \\
    | scalecar replay --set algorithm=kpa --set target=10 --set target-utilization-percentage=100";

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (like 500ms, 2s, 1m): {e}"))
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::ALL
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not a role (unified, prefill or decode)"))
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("policy: {0}")]
    Policy(String),
    #[error("line {line}: {message}")]
    Input { line: usize, message: String },
    #[error("reading stdin: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing stdout: {0}")]
    Write(#[source] std::io::Error),
}

fn policy_error(e: PolicyErrors) -> ReplayError {
    ReplayError::Policy(e.to_string())
}

/// The policy keys of `--policy FILE` (YAML, annotation keys without the
/// prefix) with each `--set key=value` applied over them, on top of
/// `base`. Shared by `replay` and `simulate`; the error names the file or
/// the flag.
pub fn policy_keys_from_args(
    mut base: BTreeMap<String, String>,
    file: Option<&std::path::Path>,
    set: &[String],
) -> Result<BTreeMap<String, String>, String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let keys = scalecar_config::policy_keys_from_yaml_str(&text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        base.extend(keys);
    }
    for kv in set {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(format!(
                "--set {kv:?} is not key=value (e.g. --set target=10)"
            ));
        };
        base.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(base)
}

/// Builds the policy from `--policy` and `--set`, validated, with the
/// algorithm checked against the registry.
pub fn load_policy(args: &ReplayArgs, registry: &AlgorithmRegistry) -> Result<Policy, ReplayError> {
    let keys = policy_keys_from_args(BTreeMap::new(), args.policy.as_deref(), &args.set)
        .map_err(ReplayError::Policy)?;
    let policy = Policy::from_keys(&keys, args.role).map_err(policy_error)?;
    policy
        .validate_algorithm(&registry.names())
        .map_err(|e| ReplayError::Policy(e.to_string()))?;
    Ok(policy)
}

/// One output line.
#[derive(Debug, Serialize)]
struct OutputLine<'a> {
    t: f64,
    ready: u32,
    desired: Option<u32>,
    applied: u32,
    panic: bool,
    stable: f64,
    panic_value: f64,
    target: f64,
    reason: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Window,
    Samples,
}

const COMMON_KEYS: [&str; 2] = ["t", "ready"];
/// The largest `t` taken, in seconds: a bound that keeps every duration
/// and instant arithmetic far from overflow.
const MAX_T: f64 = 1e9;
/// The longest gap between two samples, seconds.
const MAX_SAMPLE_GAP: f64 = 86_400.0;
const WINDOW_KEYS: [&str; 2] = ["stable", "panic"];
const SAMPLE_KEYS: [&str; 6] = ["concurrency", "rps", "queue", "tokens", "ttft_ms", "itl_ms"];

/// A parsed input line.
#[derive(Debug, Clone, Default)]
struct InputLine {
    t: f64,
    ready: u32,
    stable: f64,
    panic: f64,
    concurrency: f64,
    rps: f64,
    queue: f64,
    tokens: f64,
    ttft_ms: Vec<f64>,
    itl_ms: Vec<f64>,
}

fn input_error(line: usize, message: impl Into<String>) -> ReplayError {
    ReplayError::Input {
        line,
        message: message.into(),
    }
}

fn number(obj: &Map<String, Value>, key: &str, line: usize) -> Result<f64, ReplayError> {
    match obj.get(key) {
        None => Ok(0.0),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(input_error(
                line,
                format!("\"{key}\": {v} is not a number ≥ 0"),
            )),
        },
    }
}

fn millis_list(obj: &Map<String, Value>, key: &str, line: usize) -> Result<Vec<f64>, ReplayError> {
    let Some(v) = obj.get(key) else {
        return Ok(Vec::new());
    };
    let bad = || {
        input_error(
            line,
            format!("\"{key}\": {v} is not a list of milliseconds ≥ 0"),
        )
    };
    let items = v.as_array().ok_or_else(bad)?;
    items
        .iter()
        .map(|x| {
            x.as_f64()
                .filter(|ms| ms.is_finite() && *ms >= 0.0 && *ms < 3.6e6)
                .ok_or_else(bad)
        })
        .collect()
}

fn parse_line(text: &str, line: usize) -> Result<(InputKind, InputLine), ReplayError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| input_error(line, format!("not a JSON object: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(input_error(line, "not a JSON object"));
    };
    let mut kind = None;
    for key in obj.keys() {
        let k = key.as_str();
        let this = if WINDOW_KEYS.contains(&k) {
            Some(InputKind::Window)
        } else if SAMPLE_KEYS.contains(&k) {
            Some(InputKind::Samples)
        } else if COMMON_KEYS.contains(&k) {
            None
        } else {
            return Err(input_error(
                line,
                format!(
                    "unknown key {k:?} (window values take t, ready, stable, panic; samples take t, ready, {})",
                    SAMPLE_KEYS.join(", ")
                ),
            ));
        };
        match (kind, this) {
            (Some(a), Some(b)) if a != b => {
                return Err(input_error(
                    line,
                    "mixes window values (stable, panic) with samples",
                ));
            }
            (None, Some(b)) => kind = Some(b),
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| {
        input_error(
            line,
            "neither window values (stable, panic) nor samples (concurrency, rps, …)",
        )
    })?;
    let t = match obj.get("t").and_then(Value::as_f64) {
        Some(t) if t.is_finite() && t > MAX_T => {
            return Err(input_error(
                line,
                format!(
                    "\"t\": {t:e} is more than {MAX_T:e} seconds (about 31 years): is it in milliseconds?"
                ),
            ));
        }
        Some(t) if t.is_finite() && t >= 0.0 => t,
        Some(_) | None => {
            return Err(input_error(
                line,
                "\"t\" (seconds ≥ 0) is missing or not a number",
            ));
        }
    };
    let ready = match obj.get("ready").and_then(Value::as_u64) {
        Some(r) => u32::try_from(r)
            .map_err(|_| input_error(line, format!("\"ready\": {r} is too large")))?,
        None => {
            return Err(input_error(
                line,
                "\"ready\" (a whole number ≥ 0) is missing or not one",
            ));
        }
    };
    if kind == InputKind::Window {
        for key in WINDOW_KEYS {
            if !obj.contains_key(key) {
                return Err(input_error(line, format!("window values need \"{key}\"")));
            }
        }
    }
    Ok((
        kind,
        InputLine {
            t,
            ready,
            stable: number(&obj, "stable", line)?,
            panic: number(&obj, "panic", line)?,
            concurrency: number(&obj, "concurrency", line)?,
            rps: number(&obj, "rps", line)?,
            queue: number(&obj, "queue", line)?,
            tokens: number(&obj, "tokens", line)?,
            ttft_ms: millis_list(&obj, "ttft_ms", line)?,
            itl_ms: millis_list(&obj, "itl_ms", line)?,
        },
    ))
}

fn secs(t: f64) -> Duration {
    Duration::from_secs_f64(t)
}

/// Window values for one line: the policy's metric set to the given pool
/// total, the window fully observed.
fn window_values(metric: Metric, value: f64, duration: Duration) -> WindowValues {
    let mut v = WindowValues {
        duration,
        observed: duration,
        ..WindowValues::default()
    };
    match metric {
        Metric::Concurrency | Metric::Queue => v.concurrency = value,
        Metric::Rps => v.rps = value,
        Metric::Tokens => v.tokens = value,
    }
    v
}

/// The replayed target: the algorithm, the behavior after it, and the
/// replica count it would have set.
struct Replayed {
    algorithm: Box<dyn ScalingAlgorithm>,
    policy: Policy,
    role: Role,
    spec: u32,
}

impl Replayed {
    fn decide(
        &mut self,
        now: Duration,
        ready: u32,
        snapshot: &WindowSnapshot,
        out: &mut impl Write,
    ) -> Result<(), ReplayError> {
        let input = DecisionInput {
            now,
            ready,
            spec: self.spec,
            snapshot,
            policy: &self.policy,
            role: self.role,
            reachable: true,
            partial: false,
            cold_start: None,
            // Recorded windows carry no engine's report: only the key.
            kv_capacity: self.policy.kv_cache_tokens.map(u64::from),
        };
        let decision = self.algorithm.decide(&input);
        let applied = behavior::apply(&BehaviorInput {
            desired: decision.desired,
            current: self.spec,
            policy: &self.policy,
            now,
            unix_secs: now.as_secs(),
            last_activity: snapshot.last_activity,
            partial: false,
        });
        self.spec = applied.replicas;
        let reason = match &applied.reason {
            Some(why) => format!("{}; {why}", decision.reason),
            None => decision.reason.clone(),
        };
        let line = OutputLine {
            t: now.as_secs_f64(),
            ready,
            desired: decision.desired,
            applied: applied.replicas,
            panic: decision.panic,
            stable: decision.stable_value,
            panic_value: decision.panic_value,
            target: decision.target,
            reason: &reason,
        };
        serde_json::to_writer(&mut *out, &line).map_err(|e| ReplayError::Write(e.into()))?;
        out.write_all(b"\n").map_err(ReplayError::Write)
    }
}

/// A change a sample makes at some instant of its second.
#[derive(Debug, Clone, Copy)]
enum SampleEvent {
    Arrival,
    InFlight(u64),
    Queued(u64),
}

/// Drives `PoolSignals` on a manual clock so that each sample's gauges hold
/// their values over its second, exactly as the proxy would have recorded
/// them. The clock only moves forward: events inside a sample's second wait
/// in `pending` until a tick or the next sample reaches them.
struct SampleFeeder {
    signals: PoolSignals,
    clock: Arc<ManualClock>,
    in_flight: u64,
    queued: u64,
    /// Tokens carried by the in-flight level (see `set_tokens`).
    tokens: u64,
    /// Fractional arrivals carried to the next second.
    arrival_debt: f64,
    /// Events later than the clock, in time order.
    pending: Vec<(Duration, SampleEvent)>,
}

impl SampleFeeder {
    fn new(start: Duration, window: Duration) -> Self {
        let clock = Arc::new(ManualClock::new(start));
        let signals = PoolSignals::new(SignalsConfig::for_window(window), clock.clone());
        SampleFeeder {
            signals,
            clock,
            in_flight: 0,
            queued: 0,
            tokens: 0,
            arrival_debt: 0.0,
            pending: Vec::new(),
        }
    }

    fn set_in_flight(&mut self, level: u64) {
        while self.in_flight < level {
            self.signals.dispatch(0);
            self.in_flight += 1;
        }
        while self.in_flight > level {
            self.signals.complete(0, 0, false, None);
            self.in_flight -= 1;
        }
    }

    fn set_queued(&mut self, level: u64) {
        while self.queued < level {
            self.signals.queue_enter();
            self.queued += 1;
        }
        while self.queued > level {
            self.signals.queue_leave(Duration::ZERO);
            self.queued -= 1;
        }
    }

    /// Swaps the token level in one instant: a carrier request dispatched
    /// with the new tokens and one completed with the old, so the in-flight
    /// area is untouched.
    fn set_tokens(&mut self, tokens: u64) {
        if tokens != self.tokens {
            self.signals.dispatch(tokens);
            self.signals.complete(self.tokens, 0, false, None);
            self.tokens = tokens;
        }
    }

    /// Applies every pending event up to `t`, then moves the clock to `t`.
    fn advance_to(&mut self, t: Duration) {
        let due = self.pending.partition_point(|(at, _)| *at <= t);
        let events: Vec<_> = self.pending.drain(..due).collect();
        for (at, event) in events {
            self.clock.set(at);
            match event {
                SampleEvent::Arrival => self.signals.arrival(0),
                SampleEvent::InFlight(level) => self.set_in_flight(level),
                SampleEvent::Queued(level) => self.set_queued(level),
            }
        }
        self.clock.set(t);
    }

    /// Records one sample at `t`, holding over [t, t + 1 s) or until the next
    /// sample: the ceiling of a gauge first, its floor after the fraction;
    /// arrivals spread evenly over the second.
    fn record(&mut self, s: &InputLine) {
        let t = secs(s.t);
        self.advance_to(t);
        // A newer sample replaces what is left of the previous one.
        self.pending.clear();
        self.set_tokens(s.tokens.round() as u64);
        for ms in &s.ttft_ms {
            self.signals
                .first_token(0, Duration::from_secs_f64(ms / 1000.0));
        }
        for ms in &s.itl_ms {
            self.signals
                .inter_token(Duration::from_secs_f64(ms / 1000.0));
        }
        self.set_in_flight(s.concurrency.ceil() as u64);
        self.set_queued(s.queue.ceil() as u64);
        if s.concurrency.fract() > 0.0 {
            let at = t + secs(s.concurrency.fract());
            self.pending
                .push((at, SampleEvent::InFlight(s.concurrency.floor() as u64)));
        }
        if s.queue.fract() > 0.0 {
            let at = t + secs(s.queue.fract());
            self.pending
                .push((at, SampleEvent::Queued(s.queue.floor() as u64)));
        }
        let want = s.rps + self.arrival_debt;
        let n = want.floor();
        self.arrival_debt = want - n;
        let n = n as u64;
        for i in 0..n {
            let at = t + secs(i as f64 / n as f64);
            self.pending.push((at, SampleEvent::Arrival));
        }
        self.pending.sort_by_key(|(at, _)| *at);
        // Arrivals due at t itself happen now.
        self.advance_to(t);
    }

    fn snapshot(&mut self, at: Duration, policy: &Policy) -> WindowSnapshot {
        self.advance_to(at);
        self.signals.snapshot(policy.window, policy.panic_window())
    }
}

/// Runs a replay over `input`, writing decisions to `out`.
pub fn run(
    policy: Policy,
    role: Role,
    tick: Duration,
    registry: &AlgorithmRegistry,
    input: impl BufRead,
    out: &mut impl Write,
) -> Result<(), ReplayError> {
    if tick.is_zero() {
        return Err(ReplayError::Policy("--tick must be greater than 0".into()));
    }
    let mut replayed: Option<Replayed> = None;
    let mut kind: Option<InputKind> = None;
    let mut feeder: Option<SampleFeeder> = None;
    let mut last_t = 0.0f64;
    let mut next_tick = Duration::ZERO;
    let mut ready = 0u32;
    let mut last_activity: Option<Duration> = None;
    let mut first_t = Duration::ZERO;

    for (index, text) in input.lines().enumerate() {
        let line = index + 1;
        let text = text.map_err(ReplayError::Read)?;
        if text.trim().is_empty() {
            continue;
        }
        let (this_kind, sample) = parse_line(&text, line)?;
        match kind {
            None => kind = Some(this_kind),
            Some(k) if k != this_kind => {
                return Err(input_error(
                    line,
                    "mixes window values and samples with earlier lines",
                ));
            }
            Some(_) => {}
        }
        if replayed.is_some() && sample.t < last_t {
            return Err(input_error(
                line,
                format!("t {} goes back from {}", sample.t, last_t),
            ));
        }
        // Samples are decided every tick across a gap: one longer than a
        // day is a unit mistake (t in milliseconds), not a quiet spell.
        if replayed.is_some()
            && this_kind == InputKind::Samples
            && sample.t - last_t > MAX_SAMPLE_GAP
        {
            return Err(input_error(
                line,
                format!(
                    "t jumps {:e} s from {} (more than a day between samples, a decision every tick): is t in milliseconds?",
                    sample.t - last_t,
                    last_t
                ),
            ));
        }
        last_t = sample.t;
        let now = secs(sample.t);
        let target = match &mut replayed {
            Some(r) => r,
            None => {
                let algorithm = registry
                    .create(&policy, sample.ready, now)
                    .map_err(|e| ReplayError::Policy(e.to_string()))?;
                next_tick = now;
                first_t = now;
                replayed.insert(Replayed {
                    algorithm,
                    policy: policy.clone(),
                    role,
                    spec: sample.ready,
                })
            }
        };
        match this_kind {
            InputKind::Window => {
                ready = sample.ready;
                if sample.stable > 0.0 || sample.panic > 0.0 {
                    last_activity = Some(now);
                }
                let snapshot = WindowSnapshot {
                    at: now,
                    stable: window_values(
                        target.policy.metric,
                        sample.stable,
                        target.policy.window,
                    ),
                    panic: window_values(
                        target.policy.metric,
                        sample.panic,
                        target.policy.panic_window(),
                    ),
                    in_flight_now: 0,
                    queued_now: 0,
                    last_activity: last_activity.or(Some(first_t)),
                };
                target.decide(now, sample.ready, &snapshot, out)?;
            }
            InputKind::Samples => {
                let feeder =
                    feeder.get_or_insert_with(|| SampleFeeder::new(now, target.policy.window));
                // Decide at every tick up to this sample, on what came before
                // (a tick at the sample's own t sees its ready count, not its
                // load, which starts at t).
                while next_tick <= now {
                    if next_tick == now {
                        ready = sample.ready;
                    }
                    let snapshot = feeder.snapshot(next_tick, &target.policy);
                    target.decide(next_tick, ready, &snapshot, out)?;
                    next_tick += tick;
                }
                ready = sample.ready;
                feeder.record(&sample);
            }
        }
    }
    // The last sample holds for its second: decide through its end.
    if let (Some(target), Some(feeder)) = (&mut replayed, &mut feeder) {
        let end = secs(last_t) + Duration::from_secs(1);
        while next_tick <= end {
            let snapshot = feeder.snapshot(next_tick, &target.policy);
            target.decide(next_tick, ready, &snapshot, out)?;
            next_tick += tick;
        }
    }
    out.flush().map_err(ReplayError::Write)
}
