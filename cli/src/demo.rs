//! `scalecar demo`: the whole product in one process, on a laptop.
//!
//! An embedded kube-sim whose pods are model-sims (each ready after a cold
//! start), an annotated Deployment in it, scalecar discovering it through
//! a Kubernetes client exactly as in a cluster (workload watch, pod
//! discovery, `/scale`, Events), and an open-loop load (a burst by
//! default, or a real trace). A live line shows
//! what the scaler sees; at the end a report directory holds a summary, the
//! timeline as CSV and an SVG plot of load, TTFT p90 and replicas.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scalecar_config::{KubernetesConfig, Limits, PREFIX, Policy, Role};
use scalecar_loadtest::kube_sim::{KubeSim, KubeSimConfig};
use scalecar_loadtest::loadgen::{
    ArrivalPattern, RequestSize, StreamingClient, read_any_trace_file, run_plan, summarize,
    write_csv,
};
use scalecar_loadtest::plot::{TimelinePoint, write_timeline_csv, write_timeline_svg};
use scalecar_scaler::algorithm::AlgorithmRegistry;

use scalecar_proxy::gateway::GatewayBuilder;

const MODEL: &str = "llama-3-8b";
const NAMESPACE: &str = "default";

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (like 60s, 3m): {e}"))
}

/// Arguments of `scalecar demo`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "EXAMPLES\n  scalecar demo\n  scalecar demo --duration 60s --algorithm kpa --out report\n  scalecar demo --trace loadtest/data/azure-llm-2023-conv.csv --speedup 60 --duration 2m"
)]
pub struct DemoArgs {
    /// How long the load runs.
    #[arg(long, default_value = "3m", value_parser = duration)]
    pub duration: Duration,
    /// Load pattern (constant:R, poisson:R, step:A,B@T, burst:BASE,PEAK@START+LEN, sine:MEAN,AMP/PERIOD).
    /// Default: a burst from 1/6 to 1/2 of the run.
    #[arg(long, conflicts_with = "trace")]
    pub pattern: Option<ArrivalPattern>,
    /// Replay a trace instead of a pattern: an Azure LLM trace CSV or
    /// Mooncake's JSON lines.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Trace time compression.
    #[arg(long, default_value_t = 60.0)]
    pub speedup: f64,
    /// slo (the LLM default), kpa, hpa or keda-prometheus.
    #[arg(long, default_value = "slo")]
    pub algorithm: String,
    /// Report directory (default: a new scalecar-report-TIME here).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Cold start of a new replica.
    #[arg(long, default_value = "8s", value_parser = duration)]
    pub startup_delay: Duration,
    /// Most replicas.
    #[arg(long, default_value_t = 8)]
    pub max_replicas: u32,
    /// Requests one replica gets at once, the rest waiting at the proxy
    /// (0: no cap). A cap lets replicas that come up during a burst take
    /// the backlog, but set below what a replica really carries it turns
    /// the queue into errors: 32 on the conv trace gave 377 queue timeouts.
    #[arg(long, default_value_t = 0)]
    pub max_concurrency: u32,
    /// Stable window (default: a sixth of the run, 6s–60s).
    #[arg(long, value_parser = duration)]
    pub window: Option<Duration>,
    /// Decision interval.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub tick: Duration,
    /// Target per replica: for kpa and hpa the concurrency aimed for before
    /// the 70 % utilization (default 8); for slo the prior for a replica's
    /// prefill rate in prompt tok/s (default 4000) until it is measured.
    #[arg(long)]
    pub target: Option<f64>,
    /// Prompt tokens of synthetic requests.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: u32,
    /// Tokens generated per synthetic request.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: u32,
    /// No live line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error("writing the report: {0}")]
    Report(String),
}

/// Where the report went and what it says.
#[derive(Debug)]
pub struct DemoReport {
    pub dir: PathBuf,
    pub timeline: Vec<TimelinePoint>,
    pub requests: usize,
}

/// The demo's concurrency per replica for kpa and hpa (before 70 %).
const KPA_DEMO_TARGET: f64 = 8.0;

/// The demo's policy as the `scalecar.io/` annotations of its Deployment
/// (keys without the prefix), checked by parsing them as scalecar will.
fn policy_keys(
    args: &DemoArgs,
    window: Duration,
) -> Result<(BTreeMap<String, String>, Policy), DemoError> {
    let mut keys = BTreeMap::new();
    keys.insert("algorithm".to_string(), args.algorithm.clone());
    // slo measures a replica's capacity; its prior stays the default
    // unless given.
    let target = args
        .target
        .or((args.algorithm != "slo").then_some(KPA_DEMO_TARGET));
    if let Some(t) = target {
        keys.insert("target".to_string(), t.to_string());
    }
    keys.insert("window".to_string(), format!("{}ms", window.as_millis()));
    // A panic window of at least 2 s: the signals' slots are 1 s.
    let panic_pct = (200_000.0 / window.as_millis() as f64).clamp(10.0, 100.0);
    keys.insert(
        "panic-window-percentage".to_string(),
        format!("{panic_pct:.1}"),
    );
    keys.insert("min-replicas".to_string(), "1".into());
    keys.insert("max-replicas".to_string(), args.max_replicas.to_string());
    if args.max_concurrency > 0 {
        keys.insert(
            "max-concurrency".to_string(),
            args.max_concurrency.to_string(),
        );
    }
    keys.insert("ttft-target".to_string(), "1s".into());
    // HPA's default 5 min scale-down stabilization would outlast the demo.
    keys.insert(
        "hpa-scale-down-stabilization-window".to_string(),
        format!("{}ms", window.as_millis()),
    );
    let p = Policy::from_keys(&keys, Role::Unified)
        .map_err(|e| DemoError::Setup(format!("demo policy: {e}")))?;
    p.validate_algorithm(&AlgorithmRegistry::with_builtins().names())
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    Ok((keys, p))
}

#[cfg(test)]
fn policy(args: &DemoArgs, window: Duration) -> Result<Policy, DemoError> {
    policy_keys(args, window).map(|(_, p)| p)
}

/// The demo's Deployment: one replica of a model-sim that starts like
/// `vllm serve`, annotated for scalecar.
fn deployment(keys: &BTreeMap<String, String>, startup_delay: Duration) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(format!("{PREFIX}model"), MODEL.into());
    for (k, v) in keys {
        annotations.insert(format!("{PREFIX}{k}"), v.clone().into());
    }
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": MODEL, "namespace": NAMESPACE, "annotations": annotations},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": MODEL}},
            "template": {
                "metadata": {"labels": {"app": MODEL}},
                "spec": {"containers": [{
                    "name": "vllm",
                    "image": "vllm/vllm-openai:latest",
                    "command": ["vllm", "serve", MODEL],
                    "args": ["--port", "8000", "--seed", "1",
                             "--startup-delay", humantime::format_duration(startup_delay).to_string()],
                    "ports": [{"name": "http", "containerPort": 8000}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}}
                }]}
            }
        }
    })
}

/// Runs the demo until the load ends or `stop` resolves, then writes the
/// report.
pub async fn run(
    args: DemoArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<DemoReport, DemoError> {
    let window = args.window.unwrap_or_else(|| {
        (args.duration / 6).clamp(Duration::from_secs(6), Duration::from_secs(60))
    });
    let (keys, policy) = policy_keys(&args, window)?;
    let setup = |what: &str, e: &dyn std::fmt::Display| DemoError::Setup(format!("{what}: {e}"));
    let bind = || async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| setup("binding 127.0.0.1", &e))
    };

    // An embedded cluster: kube-sim, its controllers running model-sim pods.
    let sim = KubeSim::start(
        KubeSimConfig {
            controllers: true,
            ..KubeSimConfig::default()
        },
        bind().await?,
    )
    .map_err(|e| setup("starting kube-sim", &e))?;
    let kube_client =
        kube::Client::try_from(scalecar_proxy::cluster::identified(kube::Config::new(
            sim.url()
                .parse()
                .map_err(|e| setup("kube-sim address", &e))?,
        )))
        .map_err(|e| setup("Kubernetes client", &e))?;
    let deployments: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        kube_client.clone(),
        NAMESPACE,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("apps", "v1", "Deployment"),
            "deployments",
        ),
    );
    let object: kube::api::DynamicObject =
        serde_json::from_value(deployment(&keys, args.startup_delay))
            .map_err(|e| setup("demo Deployment", &e))?;
    deployments
        .create(&kube::api::PostParams::default(), &object)
        .await
        .map_err(|e| setup("creating the demo Deployment", &e))?;

    // scalecar, discovering it as in a cluster.
    let builder = GatewayBuilder::new(Limits::default(), args.tick).kubernetes(
        kube_client.clone(),
        KubernetesConfig {
            namespaces: vec![NAMESPACE.to_string()],
            ..KubernetesConfig::default()
        },
    );
    let decisions = builder.decisions();
    let proxy = builder
        .start(bind().await?, bind().await?)
        .map_err(|e| setup("starting scalecar", &e))?;
    // Load starts once the first pod serves through the proxy.
    let ready_by = Instant::now() + args.startup_delay + Duration::from_secs(30);
    loop {
        if proxy
            .plane
            .find(MODEL, Role::Unified)
            .is_some_and(|e| !e.pool.endpoints().is_empty())
        {
            break;
        }
        if Instant::now() > ready_by {
            return Err(DemoError::Setup(
                "the demo Deployment's pod never became ready behind the proxy".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The load.
    let plan = match &args.trace {
        Some(path) => {
            let mut plan = read_any_trace_file(path, args.speedup)
                .map_err(|e| DemoError::Setup(e.to_string()))?
                .arrivals;
            plan.retain(|a| a.at < args.duration);
            plan
        }
        None => {
            let pattern = args.pattern.unwrap_or_else(|| {
                let d = args.duration;
                let text = format!(
                    "burst:2,32@{}ms+{}ms",
                    (d / 6).as_millis(),
                    (d / 3).as_millis()
                );
                text.parse().unwrap_or(ArrivalPattern {
                    shape: scalecar_loadtest::loadgen::RateShape::Constant { rps: 4.0 },
                    poisson: false,
                })
            });
            pattern.plan(
                args.duration,
                RequestSize {
                    prompt_tokens: args.prompt_tokens,
                    max_tokens: args.max_tokens,
                },
                7,
            )
        }
    };
    let base = format!("http://{}", proxy.proxy_addr);
    let client = StreamingClient::new(&base, MODEL, Duration::from_secs(120))
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    if !args.quiet {
        eprintln!(
            "scalecar demo: {} requests over {} against {MODEL} ({}), proxy {base}, admin http://{}\n  try: curl -s http://{}/debug/pools",
            plan.len(),
            humantime::format_duration(args.duration),
            args.algorithm,
            proxy.admin_addr,
            proxy.admin_addr
        );
    }

    // The timeline and the live line, sampled every tick.
    let started = Instant::now();
    let timeline = Arc::new(std::sync::Mutex::new(Vec::<TimelinePoint>::new()));
    let sampler = {
        let (timeline, decisions, plane, policy) = (
            timeline.clone(),
            decisions.clone(),
            proxy.plane.clone(),
            policy.clone(),
        );
        let quiet = args.quiet;
        let tick = args.tick;
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let mut every = tokio::time::interval(tick);
            let mut lines = 0u64;
            loop {
                every.tick().await;
                // The pool as discovery has it now (rebuilt if edited).
                let Some(entry) = plane.find(MODEL, Role::Unified) else {
                    continue;
                };
                let snap = entry
                    .pool
                    .signals
                    .snapshot(policy.window, policy.panic_window());
                let status = decisions.latest().into_iter().next();
                let point = TimelinePoint {
                    t: started.elapsed().as_secs_f64(),
                    rps: snap.panic.rps,
                    ttft_p90_ms: snap
                        .panic
                        .ttft
                        .p90
                        .or(snap.stable.ttft.p90)
                        .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                    queue: snap.queued_now as f64,
                    in_flight: snap.in_flight_now as f64,
                    desired: status.as_ref().map_or(1, |s| s.applied),
                    ready: status.as_ref().map_or(1, |s| s.ready),
                    panic: status.as_ref().is_some_and(|s| s.panic),
                };
                if !quiet {
                    let line = format!(
                        "t={:>5.0}s  rps {:>5.1}  ttft p90 {:>6.0} ms  in flight {:>3}  queued {:>3}  replicas {}/{} desired/ready{}",
                        point.t,
                        point.rps,
                        point.ttft_p90_ms,
                        point.in_flight,
                        point.queue,
                        point.desired,
                        point.ready,
                        if point.panic { "  PANIC" } else { "" }
                    );
                    if tty {
                        eprint!("\r\x1b[2K{line}");
                    } else if lines.is_multiple_of(5) {
                        eprintln!("{line}");
                    }
                    lines += 1;
                }
                if let Ok(mut t) = timeline.lock() {
                    t.push(point);
                }
            }
        })
    };
    let (records, elapsed) = run_plan(&client, &plan, 10_000, None, stop).await;
    sampler.abort();
    if !args.quiet {
        eprintln!();
    }
    let timeline = timeline.lock().map(|t| t.clone()).unwrap_or_default();
    let summary = summarize(&records, elapsed, Some(Duration::from_secs(1)));

    // The report.
    let dir = args.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("scalecar-report-{secs}"))
    });
    std::fs::create_dir_all(&dir)
        .map_err(|e| DemoError::Report(format!("{}: {e}", dir.display())))?;
    let report_err = |e: &dyn std::fmt::Display| DemoError::Report(e.to_string());
    write_timeline_csv(&timeline, &dir.join("timeline.csv")).map_err(|e| report_err(&e))?;
    let title = format!("scalecar demo: {} on {MODEL}", args.algorithm);
    write_timeline_svg(&timeline, &title, &dir.join("timeline.svg")).map_err(|e| report_err(&e))?;
    let requests_csv = dir.join("requests.csv");
    let file = std::fs::File::create(&requests_csv)
        .map_err(|e| DemoError::Report(format!("{}: {e}", requests_csv.display())))?;
    write_csv(&records, std::io::BufWriter::new(file)).map_err(|e| report_err(&e))?;
    let json = serde_json::to_string_pretty(&summary).map_err(|e| report_err(&e))?;
    std::fs::write(dir.join("summary.json"), &json).map_err(|e| report_err(&e))?;
    let events = rescale_events(&kube_client).await;
    let md = markdown(&args, &policy, &summary, &timeline, &events);
    std::fs::write(dir.join("summary.md"), md).map_err(|e| report_err(&e))?;
    proxy.shutdown().await;
    sim.shutdown().await;
    Ok(DemoReport {
        dir,
        timeline,
        requests: records.len(),
    })
}

/// One Event on the demo Deployment, as `kubectl get events` shows it.
#[derive(Debug, Clone)]
pub struct EventLine {
    pub time: String,
    pub type_: String,
    pub reason: String,
    pub note: String,
}

/// scalecar's Events in the demo namespace, oldest first.
async fn rescale_events(client: &kube::Client) -> Vec<EventLine> {
    use k8s_openapi::api::events::v1::Event;
    let api: kube::Api<Event> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let Ok(list) = api.list(&kube::api::ListParams::default()).await else {
        return Vec::new();
    };
    let mut out: Vec<EventLine> = list
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("scalecar"))
        .map(|e| EventLine {
            time: e.event_time.map(|t| t.0.to_string()).unwrap_or_default(),
            type_: e.type_.unwrap_or_default(),
            reason: e.reason.unwrap_or_default(),
            note: e.note.unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| a.time.cmp(&b.time));
    out
}

fn markdown(
    args: &DemoArgs,
    policy: &Policy,
    s: &scalecar_loadtest::loadgen::Summary,
    timeline: &[TimelinePoint],
    events: &[EventLine],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# scalecar demo report\n");
    let aim = if policy.algorithm == "slo" {
        format!(
            "TTFT p{} within {}, capacity measured in the path (prior {} prompt tok/s per replica, at most {:.0} % of it planned)",
            policy.slo_percentile,
            policy.ttft_target.map_or_else(
                || "—".to_string(),
                |t| humantime::format_duration(t).to_string()
            ),
            policy.target,
            policy.target_utilization * 100.0
        )
    } else {
        format!(
            "metric {} with target {} per replica at {:.0} % utilization",
            policy.metric,
            policy.target,
            policy.target_utilization * 100.0
        )
    };
    let _ = writeln!(
        md,
        "Algorithm **{}**, {aim}, window {}, panic window {}, replicas 1–{}, cold start {}.\n",
        policy.algorithm,
        humantime::format_duration(policy.window),
        humantime::format_duration(policy.panic_window()),
        args.max_replicas,
        humantime::format_duration(args.startup_delay),
    );
    let load = match &args.trace {
        Some(t) => format!("trace `{}` at {}×", t.display(), args.speedup),
        None => match &args.pattern {
            Some(p) => format!("{p:?}"),
            None => "a burst from 1/6 to 1/2 of the run (2 → 32 req/s)".to_string(),
        },
    };
    let _ = writeln!(
        md,
        "## Load\n\n{load} for {}.\n",
        humantime::format_duration(args.duration)
    );
    let _ = writeln!(
        md,
        "| requests | ok | errors | achieved req/s | TTFT p50 | TTFT p90 | TTFT p99 | ITL mean | within 1 s TTFT |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let errors: usize = s.errors.values().sum();
    let _ = writeln!(
        md,
        "| {} | {} | {} | {:.1} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} % |\n",
        s.requests,
        s.ok,
        errors,
        s.achieved_rps,
        s.ttft.p50_ms,
        s.ttft.p90_ms,
        s.ttft.p99_ms,
        s.itl.mean_ms,
        s.slo_attainment.unwrap_or(0.0) * 100.0
    );
    let peak = timeline.iter().map(|p| p.ready).max().unwrap_or(0);
    let replica_seconds: f64 = timeline
        .windows(2)
        .map(|w| f64::from(w[0].ready) * (w[1].t - w[0].t))
        .sum();
    let panic_ticks = timeline.iter().filter(|p| p.panic).count();
    let _ = writeln!(
        md,
        "## Replicas\n\nPeak ready {peak}; {replica_seconds:.0} replica-seconds in all; panic for {panic_ticks} samples.\n"
    );
    let _ = writeln!(
        md,
        "| t (s) | desired | ready | arrivals/s | TTFT p90 | panic |\n| --- | --- | --- | --- | --- | --- |"
    );
    let mut last = None;
    for p in timeline {
        if last != Some((p.desired, p.panic)) {
            let _ = writeln!(
                md,
                "| {:.0} | {} | {} | {:.1} | {:.0} ms | {} |",
                p.t,
                p.desired,
                p.ready,
                p.rps,
                p.ttft_p90_ms,
                if p.panic { "yes" } else { "" }
            );
            last = Some((p.desired, p.panic));
        }
    }
    let _ = writeln!(
        md,
        "\n## Events\n\nWritten by scalecar on `deployment/{MODEL}` in the embedded kube-sim (`kubectl get events`):\n\n| time | type | reason | message |\n| --- | --- | --- | --- |"
    );
    for e in events {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            e.time,
            e.type_,
            e.reason,
            e.note.replace('|', "\\|")
        );
    }
    let _ = writeln!(
        md,
        "\n![timeline](timeline.svg)\n\nFiles: `timeline.svg`, `timeline.csv` (one row per tick), `requests.csv` (one row per \
         request), `summary.json`."
    );
    md
}

/// Prints where the report is.
pub fn announce(report: &DemoReport) {
    let _ = writeln!(
        std::io::stdout(),
        "scalecar demo: {} requests; report in {}/ (summary.md, timeline.svg)",
        report.requests,
        report.dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn target_of(args: &[&str]) -> f64 {
        let cli = Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"));
        policy(&cli.demo, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"))
            .target
    }

    #[test]
    fn the_target_defaults_to_what_the_algorithm_measures() {
        // slo by default, with its prior for a replica's prefill rate.
        assert_eq!(target_of(&[]), scalecar_config::SLO_PRIOR_CAPACITY);
        assert_eq!(target_of(&["--algorithm", "hpa"]), 8.0);
        assert_eq!(target_of(&["--algorithm", "kpa"]), KPA_DEMO_TARGET);
        assert_eq!(target_of(&["--algorithm", "slo", "--target", "900"]), 900.0);
    }

    #[test]
    fn a_concurrency_cap_reaches_the_policy_only_when_asked_for() {
        let cli = Cli::try_parse_from(["demo"]).unwrap_or_else(|e| panic!("{e}"));
        let p = policy(&cli.demo, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.max_concurrency, None);
        let cli = Cli::try_parse_from(["demo", "--max-concurrency", "48"])
            .unwrap_or_else(|e| panic!("{e}"));
        let p = policy(&cli.demo, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.max_concurrency, Some(48));
    }
}
