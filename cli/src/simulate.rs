//! `scalecar simulate`: a whole trace against one algorithm in virtual
//! time, next to the oracle's schedule, in seconds of CPU.
//!
//! The policy comes from the same keys as the annotations (`--policy`,
//! `--set`), the cluster from flags; the JSON summary on stdout is a
//! function of those inputs alone (no wall clock), so two runs print the
//! same bytes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use scalecar_config::{Limits, Policy, Role};
use scalecar_loadtest::loadgen::{Shape, read_any_trace_file};
use scalecar_loadtest::plot::{write_replicas_svg, write_timeline_csv, write_timeline_svg};
use scalecar_loadtest::sim::GpuProfile;
use scalecar_loadtest::simulate::oracle::{Oracle, OracleSettings, oracle};
use scalecar_loadtest::simulate::{Run, Settings, simulate};
use scalecar_scaler::algorithm::AlgorithmRegistry;
use serde::Serialize;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (like 60s, 1m): {e}"))
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The longest trace simulated: a month (1.3 million ticks at 2 s). A
/// published week of requests (Azure 2024's run a few seconds past 7 days)
/// fits; timestamps in the wrong unit (seconds read as milliseconds) do
/// not.
const MAX_TRACE: Duration = Duration::from_secs(31 * 24 * 3600);

fn profile(s: &str) -> Result<GpuProfile, String> {
    s.parse()
}

fn shape(s: &str) -> Result<Shape, String> {
    s.parse()
}

/// Arguments of `scalecar simulate`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = SIMULATE_HELP)]
pub struct SimulateArgs {
    /// The trace: an Azure LLM CSV (TIMESTAMP,ContextTokens,GeneratedTokens)
    /// or JSON lines ({"timestamp": ms, "input_length", "output_length"}).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "shape",
        conflicts_with = "shape"
    )]
    pub trace: Option<PathBuf>,
    /// A generated traffic shape instead of a trace file: long-context-bursts,
    /// diurnal, flash-crowd, slow-ramp or long-context-steady (seeded by
    /// --seed).
    #[arg(long, value_name = "NAME", value_parser = shape)]
    pub shape: Option<Shape>,
    /// The shape's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The shape's length (its own when absent: 30 min to 24 h).
    #[arg(long, value_parser = duration)]
    pub length: Option<Duration>,
    /// slo (the LLM default), kpa, hpa or keda-prometheus (any registered
    /// algorithm).
    #[arg(long, default_value = "slo")]
    pub algorithm: String,
    /// Policy file (YAML): annotation keys without `scalecar.io/`.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// One policy key, `key=value`; repeatable; applied over `--policy`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// From asking for a replica to its first request.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub startup_delay: Duration,
    /// A request meets the SLO when its TTFT is at most this (also the
    /// policy's `ttft-target` unless set there).
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub ttft_target: Duration,
    /// Most replicas (the policy's `max-replicas` unless set there).
    #[arg(long, default_value_t = 64)]
    pub max_replicas: u32,
    /// One replica's cost model: 2xh100-llama-70b or h100-llama-8b.
    #[arg(long, default_value = "2xh100-llama-70b", value_parser = profile)]
    pub gpu: GpuProfile,
    /// The control loop's interval.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub tick: Duration,
    /// Trace time compression (2: twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Replay the trace's last stretch of this length first, unmeasured,
    /// so the run starts warm (windows, learned capacity, replicas) as a
    /// running system does — as the constant count and the oracle, which
    /// start with the counts they choose, always do. 0: start cold, with
    /// `initial-scale` replicas facing the trace's first minute (the
    /// oracle then starts there too).
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub warmup: Duration,
    /// Hand the control loop to a new leader this often, from the
    /// measured start (a failover of scalecar's Lease, or a restart): each
    /// algorithm is created afresh and starts from the memory its
    /// predecessor last saved (every 30 s, as `memory-config-map` keeps
    /// it). Off unless given.
    #[arg(long, value_parser = duration)]
    pub new_leader_every: Option<Duration>,
    /// With `--new-leader-every`: each new leader starts afresh, without
    /// its predecessor's memory (as with `memory-config-map: ""`).
    #[arg(long, requires = "new_leader_every")]
    pub no_leader_memory: bool,
    /// decisions.jsonl also holds the warm-up's ticks, at negative times:
    /// the level a run starts with was decided there.
    #[arg(long)]
    pub warmup_decisions: bool,
    /// The oracle's schedule changes at most this often (it also searches
    /// at 3 and 6 times this, and keeps the cheapest schedule).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub oracle_interval: Duration,
    /// Skip the oracle (its search costs several runs).
    #[arg(long)]
    pub no_oracle: bool,
    /// Report directory: summary.json, timeline.csv, timeline.svg,
    /// decisions.jsonl (every tick's decision and its reason), oracle.csv,
    /// replicas.svg (ready replicas next to the oracle's).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

const SIMULATE_HELP: &str = "\
OUTPUT
  A JSON summary on stdout: requests, ttft_attainment (TTFT ≤ target, failed
  requests count as misses), infeasible (requests no count could serve in
  time: over the KV cache, or slower than the target alone on an idle
  replica), feasible_ttft_attainment (over the others: the goal is 99 %), ttft_p50/p90/p99 and itl_p90 (seconds),
  replica_seconds (cold starts included, up to the last arrival),
  oracle_replica_seconds, ratio_to_oracle, reactive_oracle_* (the oracle's
  schedule without foresight), constant_* (the smallest constant count that
  meets the goal), scale_events, max_replicas_used.
  Progress and timing go to stderr.

EXAMPLE
  scalecar simulate --trace loadtest/data/azure-llm-2023-conv.csv --algorithm slo \\
    --ttft-target 1s --startup-delay 60s --out sim-report
  scalecar simulate --shape diurnal --gpu 2xh100-llama-70b --ttft-target 2s --algorithm slo";

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateCliError {
    #[error("policy: {0}")]
    Policy(String),
    #[error("trace {path}: {message}")]
    Trace { path: String, message: String },
    #[error("{0}")]
    Run(#[from] scalecar_loadtest::simulate::SimulateError),
    #[error("writing the report: {0}")]
    Report(String),
    #[error("--{flag}: {message}")]
    Flag {
        flag: &'static str,
        message: &'static str,
    },
}

/// What the summary calls the trace: its path, or the shape and seed.
fn trace_name(args: &SimulateArgs) -> String {
    match (&args.trace, args.shape) {
        (Some(path), _) => path.display().to_string(),
        (None, Some(shape)) => format!("{} (seed {})", shape.name(), args.seed),
        (None, None) => String::new(),
    }
}

/// The policy: simulate's defaults (algorithm, TTFT target, max
/// replicas), then `--policy`, then `--set`; validated.
pub fn load_policy(
    args: &SimulateArgs,
    registry: &AlgorithmRegistry,
) -> Result<Policy, SimulateCliError> {
    let mut keys = BTreeMap::new();
    keys.insert("algorithm".to_string(), args.algorithm.clone());
    keys.insert(
        "ttft-target".to_string(),
        format!("{}ms", args.ttft_target.as_millis()),
    );
    keys.insert("max-replicas".to_string(), args.max_replicas.to_string());
    let keys = crate::replay::policy_keys_from_args(keys, args.policy.as_deref(), &args.set)
        .map_err(SimulateCliError::Policy)?;
    let policy = Policy::from_keys(&keys, Role::Unified)
        .map_err(|e| SimulateCliError::Policy(e.to_string()))?;
    policy
        .validate_algorithm(&registry.names())
        .map_err(|e| SimulateCliError::Policy(e.to_string()))?;
    Ok(policy)
}

/// The summary printed on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub trace: String,
    pub algorithm: String,
    pub gpu: &'static str,
    pub startup_delay_s: f64,
    pub ttft_target_s: f64,
    pub warmup_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_leader_every_s: Option<f64>,
    /// With new leaders: whether each started from its predecessor's memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_memory: Option<bool>,
    pub requests: usize,
    pub ttft_attainment: f64,
    pub infeasible: usize,
    pub feasible_ttft_attainment: f64,
    pub ttft_p50: f64,
    pub ttft_p90: f64,
    pub ttft_p99: f64,
    pub itl_p90: f64,
    pub replica_seconds: f64,
    pub oracle_replica_seconds: Option<f64>,
    pub ratio_to_oracle: Option<f64>,
    pub oracle_ttft_attainment: Option<f64>,
    pub oracle_feasible_ttft_attainment: Option<f64>,
    pub oracle_scale_events: Option<u32>,
    /// The oracle's schedule followed without foresight (each rise asked
    /// for when its interval begins): what knowing the future is worth.
    pub reactive_oracle_ttft_attainment: Option<f64>,
    pub reactive_oracle_feasible_ttft_attainment: Option<f64>,
    pub reactive_oracle_replica_seconds: Option<f64>,
    /// The smallest constant count that meets the goal: the cost of not
    /// scaling at all.
    pub constant_replicas: Option<u32>,
    pub constant_replica_seconds: Option<f64>,
    pub constant_ttft_attainment: Option<f64>,
    pub constant_feasible_ttft_attainment: Option<f64>,
    pub scale_events: u32,
    pub scale_events_per_hour: f64,
    pub max_replicas_used: u32,
    pub failed: usize,
    /// Virtual seconds from the first arrival to the last.
    pub trace_seconds: f64,
}

/// A run and its oracle.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub run: Run,
    pub oracle: Option<Oracle>,
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Runs the simulation and, unless told not to, the oracle.
pub async fn run(
    args: &SimulateArgs,
    mut progress: impl FnMut(&str, f64),
) -> Result<Outcome, SimulateCliError> {
    if !(args.speedup.is_finite() && args.speedup > 0.0) {
        return Err(SimulateCliError::Flag {
            flag: "speedup",
            message: "must be a number greater than 0",
        });
    }
    // Bounded so that no instant arithmetic can overflow and no run ticks
    // for years of virtual time.
    for (flag, d, max, message) in [
        (
            "tick",
            args.tick,
            HOUR,
            "must be longer than 0 and at most 1h",
        ),
        (
            "startup-delay",
            args.startup_delay,
            DAY,
            "must be at most 24h",
        ),
        ("warmup", args.warmup, DAY, "must be at most 24h"),
        (
            "oracle-interval",
            args.oracle_interval,
            HOUR,
            "must be at most 1h",
        ),
    ] {
        if d > max || (flag == "tick" && d.is_zero()) {
            return Err(SimulateCliError::Flag { flag, message });
        }
    }
    if args
        .new_leader_every
        .is_some_and(|d| d.is_zero() || d > DAY)
    {
        return Err(SimulateCliError::Flag {
            flag: "new-leader-every",
            message: "must be longer than 0 and at most 24h",
        });
    }
    let registry = AlgorithmRegistry::with_builtins();
    let policy = load_policy(args, &registry)?;
    let name = trace_name(args);
    let trace = match (&args.trace, args.shape) {
        (Some(path), _) => {
            let trace =
                read_any_trace_file(path, args.speedup).map_err(|e| SimulateCliError::Trace {
                    path: name.clone(),
                    message: e.to_string(),
                })?;
            if trace.reordered > 0 {
                let _ = writeln!(
                    std::io::stderr(),
                    "scalecar simulate: {name}: {} rows earlier than the row before them, replayed in time order",
                    trace.reordered
                );
            }
            trace.arrivals
        }
        (None, Some(shape)) => {
            if args.length.is_some_and(|l| l > MAX_TRACE) {
                return Err(SimulateCliError::Flag {
                    flag: "length",
                    message: "must be at most 31 days",
                });
            }
            let mut arrivals = shape.generate(args.length, args.seed);
            for a in &mut arrivals {
                a.at = a.at.div_f64(args.speedup);
            }
            arrivals
        }
        (None, None) => {
            return Err(SimulateCliError::Flag {
                flag: "trace",
                message: "or --shape is needed",
            });
        }
    };
    let limits = Limits::default();
    let settings = Settings {
        timing: args.gpu.timing(),
        startup_delay: args.startup_delay,
        tick: args.tick,
        ttft_target: args.ttft_target,
        queue_length: limits.queue_length,
        queue_wait: limits.queue_wait,
        max_concurrency: policy.max_concurrency,
        initial_replicas: policy.initial_scale.max(policy.min_replicas).max(1),
        max_replicas: policy.max_replicas.unwrap_or(args.max_replicas).max(1),
        warmup: args.warmup,
        new_leader_every: args.new_leader_every,
        leader_memory: !args.no_leader_memory,
        warmup_decisions: args.warmup_decisions,
    };
    let horizon = scalecar_loadtest::simulate::horizon(&trace);
    if horizon > MAX_TRACE {
        return Err(SimulateCliError::Trace {
            path: name.clone(),
            message: format!(
                "spans {}, more than the 31 days simulate takes (timestamps in the wrong unit?)",
                humantime::format_duration(Duration::from_secs(horizon.as_secs()))
            ),
        });
    }
    let span = horizon.as_secs_f64();
    let run = simulate(&trace, &settings, &policy, &registry, |t| {
        progress(&args.algorithm, t.as_secs_f64() / span.max(1.0));
    })
    .await?;
    let oracle = (!args.no_oracle).then(|| {
        progress("oracle", 0.0);
        oracle(
            &trace,
            &settings,
            OracleSettings {
                interval: args.oracle_interval,
                goal: 0.99,
                min_replicas: policy.min_replicas.max(1),
                ..OracleSettings::default()
            },
        )
    });
    let m = &run.measured;
    let reactive = oracle.as_ref().and_then(|o| o.reactive.as_ref());
    let constant = oracle.as_ref().and_then(|o| o.constant.as_ref());
    let hours = (span / 3600.0).max(1.0 / 3600.0);
    let summary = Summary {
        trace: name,
        algorithm: args.algorithm.clone(),
        gpu: args.gpu.name(),
        startup_delay_s: args.startup_delay.as_secs_f64(),
        ttft_target_s: args.ttft_target.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        new_leader_every_s: args.new_leader_every.map(|d| d.as_secs_f64()),
        leader_memory: args.new_leader_every.map(|_| !args.no_leader_memory),
        requests: m.requests,
        ttft_attainment: round(m.ttft_attainment, 5),
        infeasible: m.infeasible,
        feasible_ttft_attainment: round(m.feasible_ttft_attainment, 5),
        ttft_p50: round(m.ttft_p50, 4),
        ttft_p90: round(m.ttft_p90, 4),
        ttft_p99: round(m.ttft_p99, 4),
        itl_p90: round(m.itl_p90, 4),
        replica_seconds: round(m.replica_seconds, 1),
        oracle_replica_seconds: oracle
            .as_ref()
            .map(|o| round(o.measured.replica_seconds, 1)),
        ratio_to_oracle: oracle
            .as_ref()
            .filter(|o| o.measured.replica_seconds > 0.0)
            .map(|o| round(m.replica_seconds / o.measured.replica_seconds, 3)),
        oracle_ttft_attainment: oracle
            .as_ref()
            .map(|o| round(o.measured.ttft_attainment, 5)),
        oracle_feasible_ttft_attainment: oracle
            .as_ref()
            .map(|o| round(o.measured.feasible_ttft_attainment, 5)),
        oracle_scale_events: oracle.as_ref().map(|o| o.scale_events),
        reactive_oracle_ttft_attainment: reactive.map(|m| round(m.ttft_attainment, 5)),
        reactive_oracle_feasible_ttft_attainment: reactive
            .map(|m| round(m.feasible_ttft_attainment, 5)),
        reactive_oracle_replica_seconds: reactive.map(|m| round(m.replica_seconds, 1)),
        constant_replicas: constant.map(|(n, _)| *n),
        constant_replica_seconds: constant.map(|(_, m)| round(m.replica_seconds, 1)),
        constant_ttft_attainment: constant.map(|(_, m)| round(m.ttft_attainment, 5)),
        constant_feasible_ttft_attainment: constant
            .map(|(_, m)| round(m.feasible_ttft_attainment, 5)),
        scale_events: run.scale_events,
        scale_events_per_hour: round(f64::from(run.scale_events) / hours, 1),
        max_replicas_used: m.max_replicas_used,
        failed: m.failed,
        trace_seconds: round(span, 3),
    };
    if let Some(dir) = &args.out {
        write_report(dir, &summary, &run, oracle.as_ref())?;
    }
    Ok(Outcome {
        summary,
        run,
        oracle,
    })
}

fn write_report(
    dir: &std::path::Path,
    summary: &Summary,
    run: &Run,
    oracle: Option<&Oracle>,
) -> Result<(), SimulateCliError> {
    let report = |e: &dyn std::fmt::Display| SimulateCliError::Report(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| report(&format!("{}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(summary).map_err(|e| report(&e))?;
    let path = dir.join("summary.json");
    std::fs::write(&path, json + "\n").map_err(|e| report(&format!("{}: {e}", path.display())))?;
    write_timeline_csv(&run.timeline, &dir.join("timeline.csv")).map_err(|e| report(&e))?;
    let mut lines = String::new();
    for d in &run.decisions {
        lines.push_str(&serde_json::to_string(d).map_err(|e| report(&e))?);
        lines.push('\n');
    }
    let path = dir.join("decisions.jsonl");
    std::fs::write(&path, lines).map_err(|e| report(&format!("{}: {e}", path.display())))?;
    let title = format!(
        "scalecar simulate: {} on {} ({} requests, startup {}s)",
        summary.algorithm, summary.trace, summary.requests, summary.startup_delay_s
    );
    write_timeline_svg(&run.timeline, &title, &dir.join("timeline.svg")).map_err(|e| report(&e))?;
    if let Some(o) = oracle {
        let mut csv = String::from("t,replicas\n");
        for (at, n) in &o.schedule {
            csv.push_str(&format!("{:.3},{n}\n", at.as_secs_f64()));
        }
        let path = dir.join("oracle.csv");
        std::fs::write(&path, csv).map_err(|e| report(&format!("{}: {e}", path.display())))?;
    }
    let mut series = vec![(
        summary.algorithm.as_str(),
        run.timeline
            .iter()
            .map(|p| (p.t, p.ready))
            .collect::<Vec<_>>(),
    )];
    if let Some(o) = oracle {
        series.push((
            "oracle",
            o.schedule
                .iter()
                .map(|(t, n)| (t.as_secs_f64(), *n))
                .collect(),
        ));
    }
    let title = format!(
        "ready replicas: {} vs the oracle ({})",
        summary.algorithm, summary.trace
    );
    write_replicas_svg(&series, &title, &dir.join("replicas.svg")).map_err(|e| report(&e))?;
    Ok(())
}

/// Prints the summary as one JSON object.
pub fn print(summary: &Summary) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(summary).map_err(std::io::Error::other)?;
    writeln!(std::io::stdout(), "{json}")
}
