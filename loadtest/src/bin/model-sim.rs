//! `model-sim`: one simulated vLLM replica (or several, one per port).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use scalecar_loadtest::sim::{ModelSim, SimConfig, SimRole, Timing};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (like 500ms, 30s): {e}"))
}

fn millis(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms >= 0.0 => Ok(Duration::from_secs_f64(ms / 1000.0)),
        _ => Err(format!("{s:?} is not a number of milliseconds ≥ 0")),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "model-sim",
    version,
    about = "A vLLM-like model server simulator: OpenAI API, continuous batching, chunked prefill, KV-cache limits, disaggregated prefill/decode",
    after_help = "EXAMPLE\n  model-sim --listen 127.0.0.1:8000 --model llama-3-8b --startup-delay 5s --seed 7 &\n  curl -N http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{\"model\":\"llama-3-8b\",\"stream\":true,\"max_tokens\":8,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
)]
struct Args {
    /// Address to serve on; repeat for several replicas in one process.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: Vec<SocketAddr>,
    /// Served model name.
    #[arg(long)]
    model: String,
    /// Another name served by the same engine (an alias, a LoRA adapter);
    /// repeat for several.
    #[arg(long = "alias")]
    aliases: Vec<String>,
    #[arg(long, value_enum, default_value = "unified")]
    role: SimRole,
    /// Cold start: /health answers 503 until this has passed.
    #[arg(long, default_value = "0s", value_parser = duration)]
    startup_delay: Duration,
    /// Seed of the token text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prefill throughput (prompt tokens per second).
    #[arg(long, default_value_t = 16_000.0)]
    prefill_tokens_per_sec: f64,
    /// Chunked-prefill budget (prompt tokens per step).
    #[arg(long, default_value_t = 8_192)]
    prefill_chunk: u32,
    /// Decode step: fixed cost, ms.
    #[arg(long, default_value = "6", value_parser = millis)]
    decode_base_ms: Duration,
    /// Decode step: cost per running sequence, ms.
    #[arg(long, default_value = "0.03", value_parser = millis)]
    decode_per_seq_ms: Duration,
    /// Decode step: cost per 1,000 resident KV tokens, ms.
    #[arg(long, default_value = "0.044", value_parser = millis)]
    decode_per_1k_kv_ms: Duration,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: u32,
    /// KV-cache capacity, tokens.
    #[arg(long, default_value_t = 400_000)]
    kv_capacity: u64,
    /// KV transfer to a decode replica: fixed part, ms.
    #[arg(long, default_value = "1", value_parser = millis)]
    kv_transfer_base_ms: Duration,
    /// KV transfer: per 1,000 prompt tokens, ms.
    #[arg(long, default_value = "5", value_parser = millis)]
    kv_transfer_per_1k_ms: Duration,
    /// Tokens generated when a request sets no max_tokens.
    #[arg(long, default_value_t = 128)]
    default_max_tokens: u32,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Characters of prompt text per token: the simulated tokenizer (4 is
    /// what the proxy estimates; gemma-3's tokenizer on English prose is
    /// nearer 7).
    #[arg(long, default_value_t = 4.0)]
    chars_per_token: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.prefill_tokens_per_sec.is_finite()
        || args.prefill_tokens_per_sec <= 0.0
        || args.prefill_chunk == 0
        || args.max_num_seqs == 0
    {
        anyhow::bail!(
            "--prefill-tokens-per-sec, --prefill-chunk and --max-num-seqs must be greater than 0"
        );
    }
    if !(1.0..=100.0).contains(&args.chars_per_token) {
        anyhow::bail!(
            "--chars-per-token {}: must be in [1, 100]",
            args.chars_per_token
        );
    }
    let timing = Timing {
        prefill_tokens_per_sec: args.prefill_tokens_per_sec,
        prefill_chunk: args.prefill_chunk,
        decode_base: args.decode_base_ms,
        decode_per_seq: args.decode_per_seq_ms,
        decode_per_1k_kv: args.decode_per_1k_kv_ms,
        max_num_seqs: args.max_num_seqs,
        kv_capacity: args.kv_capacity,
        kv_transfer_base: args.kv_transfer_base_ms,
        kv_transfer_per_1k: args.kv_transfer_per_1k_ms,
    };
    let mut handles = Vec::new();
    for (i, addr) in args.listen.iter().enumerate() {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let config = SimConfig {
            model: args.model.clone(),
            aliases: args.aliases.clone(),
            role: args.role,
            timing: timing.clone(),
            startup_delay: args.startup_delay,
            seed: args.seed.wrapping_add(i as u64),
            default_max_tokens: args.default_max_tokens,
            max_body_bytes: args.max_body_bytes,
            chars_per_token: args.chars_per_token,
        };
        let handle = ModelSim::spawn(config, listener);
        eprintln!(
            "model-sim: serving {} ({:?}) on http://{}",
            args.model,
            args.role,
            handle.local_addr()
        );
        handles.push(handle);
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    for h in &handles {
        h.shutdown();
    }
    Ok(())
}
