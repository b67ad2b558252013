//! The `scalecar` binary: `replay` (offline decisions from recorded
//! signals); `run` and `demo` follow with the data plane.

use std::io::{BufReader, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use scalecar_proxy::replay::{self, ReplayArgs};
use scalecar_scaler::algorithm::AlgorithmRegistry;

#[derive(Debug, Parser)]
#[command(
    name = "scalecar",
    version,
    about = "Gateway-embedded autoscaler for LLM inference",
    after_help = "EXAMPLE\n  echo '{\"t\":0,\"ready\":1,\"stable\":30,\"panic\":30}' | scalecar replay --set target=10"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay recorded signals through an algorithm, offline and deterministic.
    Replay(ReplayArgs),
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
    }
}
