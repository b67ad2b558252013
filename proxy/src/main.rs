//! The `scalecar` binary: `run` (the proxy and scaler), `replay` (offline
//! decisions from recorded signals).

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "scalecar", version, about = "Gateway-embedded autoscaler for LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() {
    let cli = Cli::parse();
    match cli.command {}
}
