//! The `scalecar` binary: `run` (the gateway), `status`, `replay`
//! (offline decisions from recorded signals) and, with the `demo` feature,
//! `demo` and `simulate`.

use std::io::{BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
#[cfg(feature = "demo")]
use scalecar_cli::demo::DemoArgs;
use scalecar_cli::replay::{self, ReplayArgs};
#[cfg(feature = "demo")]
use scalecar_cli::simulate::SimulateArgs;
use scalecar_cli::status::{self, StatusArgs};
use scalecar_config::ScalecarConfig;
use scalecar_scaler::algorithm::AlgorithmRegistry;

#[derive(Debug, Parser)]
#[command(
    name = "scalecar",
    version = scalecar_proxy::VERSION,
    about = "Gateway-embedded autoscaler for LLM inference",
    after_help = "EXAMPLES\n  scalecar demo --duration 60s\n  scalecar run --config scalecar.yaml\n  scalecar status --admin 127.0.0.1:9090\n  echo '{\"t\":0,\"ready\":1,\"stable\":30,\"panic\":30}' | scalecar replay --set target=10"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "EXAMPLE\n  scalecar run --config scalecar.yaml   (the file's shape is in the README)\n  scalecar run --config scalecar.yaml --log-format json"
)]
struct RunArgs {
    /// The config file (YAML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Log lines as text, or one JSON object per line (for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy and its admin server.
    Run(RunArgs),
    /// Replay recorded signals through an algorithm, offline and deterministic.
    Replay(ReplayArgs),
    /// The closed loop on an embedded cluster of simulated model servers, with a live view and a report.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// A whole trace against one algorithm in virtual time, with the oracle's cost to compare.
    #[cfg(feature = "demo")]
    Simulate(SimulateArgs),
    /// What a running gateway's scaler is doing, per target (from its admin port).
    Status(StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Replay(args) => {
            let registry = AlgorithmRegistry::with_builtins();
            let result = replay::load_policy(&args, &registry).and_then(|policy| {
                let stdin = std::io::stdin().lock();
                let mut stdout = std::io::stdout().lock();
                replay::run(
                    policy,
                    args.role,
                    args.tick,
                    &registry,
                    BufReader::new(stdin),
                    &mut stdout,
                )
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "scalecar replay: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run(args) => run(args),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo(args),
        #[cfg(feature = "demo")]
        Command::Simulate(args) => simulate(args),
        Command::Status(args) => show_status(args),
    }
}

/// An error and its sources, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn show_status(args: StatusArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(status::fetch(&args.admin)) {
        Ok(v) => {
            let text = if args.json {
                format!("{v:#}\n")
            } else {
                status::render(&v)
            };
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar status: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "demo")]
fn demo(args: DemoArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: `kubectl logs` and log shippers get
        // plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Ctrl-C stops the load; the report is still written.
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match runtime.block_on(scalecar_cli::demo::run(args, stop)) {
        Ok(report) => {
            scalecar_cli::demo::announce(&report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar demo: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(feature = "demo")]
fn simulate(args: SimulateArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(1000)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>8} [{bar:40}] {percent}%")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let result = runtime.block_on(scalecar_cli::simulate::run(&args, |what, done| {
        bar.set_message(what.to_string());
        bar.set_position((done.clamp(0.0, 1.0) * 1000.0) as u64);
    }));
    bar.finish_and_clear();
    match result {
        Ok(outcome) => {
            let _ = writeln!(
                std::io::stderr(),
                "scalecar simulate: {} requests over {:.0} s simulated in {:.2} s",
                outcome.summary.requests,
                outcome.summary.trace_seconds,
                started.elapsed().as_secs_f64()
            );
            match scalecar_cli::simulate::print(&outcome.summary) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "scalecar simulate: stdout: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar simulate: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        // Colours on a terminal only: `kubectl logs` and log shippers get
        // plain text.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    // A config error exits 2 before any port is bound.
    let config = match ScalecarConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar: config error:\n{e}");
            return ExitCode::from(2);
        }
    };
    let names = AlgorithmRegistry::with_builtins();
    let names = names.names();
    let unknown: Vec<String> = config
        .pools
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            p.policy
                .validate_algorithm(&names)
                .err()
                .map(|e| format!("pools[{i}].policy: {e}"))
        })
        .collect();
    if !unknown.is_empty() {
        let _ = writeln!(
            std::io::stderr(),
            "scalecar: config error:\n{}",
            unknown.join("\n")
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "scalecar: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let bind = |addr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("binding {addr}: {e}"))
        };
        let listeners = async {
            Ok::<_, String>((
                bind(config.proxy.listen).await?,
                bind(config.admin.listen).await?,
            ))
        };
        let (proxy, admin) = match listeners.await {
            Ok(l) => l,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "scalecar: {e}");
                return ExitCode::FAILURE;
            }
        };
        let handle = match scalecar_proxy::gateway::start(&config, proxy, admin).await {
            Ok(h) => h,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "scalecar: {}", chain(&e));
                return ExitCode::from(2);
            }
        };
        match handle.ext_proc_addr {
            Some(e) => tracing::info!(proxy = %handle.proxy_addr, admin = %handle.admin_addr, ext_proc = %e, "serving"),
            None => tracing::info!(proxy = %handle.proxy_addr, admin = %handle.admin_addr, "serving"),
        }
        wait_for_signal().await;
        tracing::info!(
            delay = ?config.limits.shutdown_delay,
            grace = ?config.limits.shutdown_grace,
            "shutting down"
        );
        tokio::select! {
            _ = handle.terminate(config.limits.shutdown_delay) => ExitCode::SUCCESS,
            // An operator who asks twice means now.
            _ = wait_for_signal() => {
                tracing::warn!("second signal: exiting without waiting for open requests");
                ExitCode::from(130)
            }
        }
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
