//! model-sim: one simulated vLLM replica on one GPU, as a library so that one
//! process can host many (the local cluster, load tests).
//!
//! Each replica is an HTTP server on its own listener and an engine task
//! (see [`engine`]); nothing is global, so replicas never share state.

pub mod engine;
pub mod metrics;
mod request;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use engine::{GpuProfile, Timing};
pub use metrics::SimMetrics;

/// The role a replica plays (vLLM's disaggregated serving).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SimRole {
    #[default]
    Unified,
    Prefill,
    Decode,
}

/// Everything one replica is.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The served model name.
    pub model: String,
    /// Other names served by the same engine: the rest of a
    /// `--served-model-name` list, LoRA adapters (`--lora-modules NAME=…`).
    pub aliases: Vec<String>,
    pub role: SimRole,
    pub timing: Timing,
    /// Cold start: not ready (503 on /health) until this has passed.
    pub startup_delay: Duration,
    /// Seeds the token text.
    pub seed: u64,
    /// Tokens generated when a request gives no max_tokens.
    pub default_max_tokens: u32,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Characters of prompt text per token: the simulated tokenizer (4,
    /// the proxy's own estimate; gemma-3's tokenizer on English prose is
    /// nearer 7).
    pub chars_per_token: f64,
}

impl SimConfig {
    /// Whether a request naming `model` is served here.
    pub fn serves(&self, model: &str) -> bool {
        self.model == model || self.aliases.iter().any(|a| a == model)
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "llama-3-8b".into(),
            aliases: Vec::new(),
            role: SimRole::Unified,
            timing: Timing::default(),
            startup_delay: Duration::ZERO,
            seed: 0,
            default_max_tokens: 128,
            max_body_bytes: 32 << 20,
            chars_per_token: 4.0,
        }
    }
}

/// State shared by a replica's server tasks.
#[derive(Debug)]
struct Shared {
    config: SimConfig,
    addr: SocketAddr,
    ready_at: Instant,
    draining: AtomicBool,
    in_flight: AtomicU64,
    request_counter: AtomicU64,
    engine: mpsc::UnboundedSender<engine::Submission>,
    metrics: Arc<SimMetrics>,
    /// Identifies this engine in kv_transfer_params.
    engine_id: String,
}

impl Shared {
    fn is_ready(&self) -> bool {
        Instant::now() >= self.ready_at && !self.draining.load(Ordering::Acquire)
    }
}

/// A running replica. Dropping the handle shuts it down.
#[derive(Debug)]
pub struct SimHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

/// The model-sim server.
#[derive(Debug)]
pub struct ModelSim;

impl ModelSim {
    /// Starts a replica serving on `listener`.
    pub fn spawn(config: SimConfig, listener: TcpListener) -> SimHandle {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (engine_tx, engine_rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(SimMetrics::default());
        let shared = Arc::new(Shared {
            ready_at: Instant::now() + config.startup_delay,
            engine_id: format!("model-sim-{}-{}", addr.port(), config.seed),
            config,
            addr,
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            request_counter: AtomicU64::new(0),
            engine: engine_tx,
            metrics: metrics.clone(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let timing = shared.config.timing.clone();
        let mut engine_stop = shutdown_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = engine::run(timing, engine_rx, metrics) => {}
                _ = engine_stop.wait_for(|stop| *stop) => {}
            }
        });
        tokio::spawn(server::accept_loop(listener, shared.clone(), shutdown_rx));
        SimHandle { shared, shutdown }
    }
}

impl SimHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Past its start-up delay and not draining.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Stops taking new requests (503); requests in flight finish.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }

    /// Draining and nothing left in flight; the server is then shut down.
    pub fn is_drained(&self) -> bool {
        let drained = self.shared.draining.load(Ordering::Acquire)
            && self.shared.in_flight.load(Ordering::Acquire) == 0;
        if drained {
            self.shutdown();
        }
        drained
    }

    /// Requests being served (streams still open included).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Stops the server and the engine at once; open streams end.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn metrics(&self) -> &SimMetrics {
        &self.shared.metrics
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
