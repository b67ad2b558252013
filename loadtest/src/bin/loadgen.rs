//! `loadgen`: open-loop load against an OpenAI-compatible endpoint.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use scalecar_loadtest::loadgen::shapes::write_jsonl;
use scalecar_loadtest::loadgen::{
    ArrivalPattern, RequestSize, Shape, StreamingClient, read_any_trace_file, run_plan, summarize,
    write_csv,
};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Open-loop load (synthetic or a real trace) against an OpenAI-compatible endpoint",
    after_help = "EXAMPLE\n  loadgen --url http://127.0.0.1:8000 --model llama-3-8b --pattern burst:2,20@10s+20s --duration 60s --ttft-slo 500ms\n  loadgen --url http://127.0.0.1:8080 --model llama-3-8b --trace loadtest/data/azure-llm-2023-conv.csv --speedup 60\n  loadgen --shape flash-crowd --seed 2 --write-trace flash.jsonl"
)]
struct Args {
    /// Base URL of the endpoint (requests go to /v1/chat/completions).
    #[arg(long, required_unless_present = "write_trace")]
    url: Option<String>,
    /// Model name sent in each request.
    #[arg(long, required_unless_present = "write_trace")]
    model: Option<String>,
    /// A generated traffic shape (long-context-bursts, diurnal, flash-crowd,
    /// slow-ramp, long-context-steady) instead of a pattern: its own request sizes and length
    /// (--length to change it), seeded by --seed.
    #[arg(long, conflicts_with_all = ["trace"], value_parser = |s: &str| s.parse::<Shape>())]
    shape: Option<Shape>,
    /// The shape's length.
    #[arg(long, value_parser = humantime::parse_duration)]
    length: Option<Duration>,
    /// Write the planned arrivals as a JSON-lines trace (timestamp ms,
    /// input_length, output_length) to this file and exit without sending.
    #[arg(long, value_name = "FILE")]
    write_trace: Option<PathBuf>,
    /// Arrival pattern: constant:R, poisson:R, step:A,B@T, burst:BASE,PEAK@START+LEN, sine:MEAN,AMP/PERIOD.
    #[arg(long, default_value = "poisson:5", conflicts_with = "trace")]
    pattern: ArrivalPattern,
    /// How long a synthetic pattern runs.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Replay a trace instead of a pattern: an Azure LLM trace CSV
    /// (TIMESTAMP,ContextTokens,GeneratedTokens) or JSON lines as Mooncake
    /// publishes them (timestamp ms, input_length, output_length).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Trace time compression: 60 plays an hour in a minute.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Prompt tokens of synthetic requests.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: u32,
    /// max_tokens of synthetic requests.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Seed for Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// TTFT target for the SLO attainment figure.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttft_slo: Option<Duration>,
    /// Per-request timeout.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Requests outstanding at once before new ones are dropped.
    #[arg(long, default_value_t = 10_000)]
    max_outstanding: usize,
    /// Write one CSV row per request here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the JSON summary here as well as to stdout.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar on stderr.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = match (&args.trace, args.shape) {
        (Some(path), _) => {
            let trace = read_any_trace_file(path, args.speedup)?;
            if trace.reordered > 0 {
                eprintln!(
                    "loadgen: {}: {} rows earlier than the row before them, replayed in time order",
                    path.display(),
                    trace.reordered
                );
            }
            trace.arrivals
        }
        (None, Some(shape)) => shape.generate(args.length, args.seed),
        (None, None) => args.pattern.plan(
            args.duration,
            RequestSize {
                prompt_tokens: args.prompt_tokens,
                max_tokens: args.max_tokens,
            },
            args.seed,
        ),
    };
    if let Some(path) = &args.write_trace {
        let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        write_jsonl(&plan, &mut out).with_context(|| format!("{}", path.display()))?;
        out.flush().with_context(|| format!("{}", path.display()))?;
        return Ok(());
    }
    let (Some(url), Some(model)) = (&args.url, &args.model) else {
        anyhow::bail!("--url and --model are needed to send requests");
    };
    let client = StreamingClient::new(url, model, args.timeout)?;
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(plan.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} done, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = bar.clone();
    let on_record = Arc::new(move |r: &scalecar_loadtest::loadgen::RequestRecord| {
        progress.inc(1);
        if r.outcome != scalecar_loadtest::loadgen::Outcome::Ok {
            progress.set_message(format!("last error: {}", r.outcome.as_str()));
        }
    });
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let (records, elapsed) =
        run_plan(&client, &plan, args.max_outstanding, Some(on_record), stop).await;
    bar.finish_and_clear();
    let summary = summarize(&records, elapsed, args.ttft_slo);
    let json = serde_json::to_string_pretty(&summary)?;
    if let Some(path) = &args.csv {
        let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
        write_csv(&records, std::io::BufWriter::new(file))
            .with_context(|| format!("{}", path.display()))?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("{}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}")?;
    Ok(())
}
