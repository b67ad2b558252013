//! scalecar-proxy: the data plane, the endpoint picker and the admin server,
//! as a library.
//!
//! Role: an OpenAI-compatible inference proxy that measures every request
//! and streamed token into the scaler's signals (TTFT, ITL, queue, tokens in
//! flight, per model and role) and reads what only the engines know (their
//! KV cache size, from their own `/metrics`); the same admission and measurement behind
//! Envoy's ext_proc (the Inference Extension's endpoint picker); and the
//! assembly of a gateway (pools from static config, Kubernetes discovery or
//! InferencePools, the route table, the control loop).
//!
//! Not here: scaling decisions and the Kubernetes client pieces (see
//! `scalecar-scaler`), policy parsing (see `scalecar-config`), the commands
//! users run (`scalecar run`, `status`, `replay`, `demo`, `simulate`: the
//! `scalecar-cli` crate).
//!
//! Invariants: the proxy adds no buffering to a stream (frames pass as they
//! come, TCP_NODELAY both ways); every admitted request releases its
//! endpoint slot and its in-flight and queued counts exactly once, on every
//! exit path (RAII leases and the observed body's Drop); the upstream is
//! chosen only from the pool, never from the client's Host or URI; a route
//! change (discovery) swaps the whole table, and a request keeps the pool it
//! found until it ends; no input panics. The data plane is built on hyper rather than Pingora: see
//! `docs/adr/0001-data-plane.md`.

pub mod accept;
pub mod admin;
pub mod body;
pub mod cluster;
pub mod dataplane;
pub mod decisions;
pub mod discovery;
pub mod engine_metrics;
pub mod error;
pub mod ext_proc;
pub(crate) mod forward;
pub mod gateway;
pub(crate) mod lifecycle;
pub mod metrics;
pub mod observe;
pub mod pd;
pub mod peer_token;
pub mod peers;
pub mod pool;
pub mod pool_set;
pub mod prompt_calibration;
pub mod routes;
pub mod server;
pub mod sse;
pub mod upstream;

/// `0.1.0 (commit abc123def456)`: what `scalecar --version` says (the
/// commit from `SCALECAR_COMMIT` or git at build time, see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SCALECAR_COMMIT"),
    ")"
);
