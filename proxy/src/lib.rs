//! scalecar-proxy: the data plane, the admin server and the `scalecar`
//! binary.
//!
//! Role: an OpenAI-compatible inference proxy that measures every request
//! and streamed token into the scaler's signals (TTFT, ITL, queue, tokens in
//! flight, per model and role); the assembly of a gateway (pools from static
//! config or Kubernetes discovery, the route table, the control loop); and
//! the commands users run (`run`, `demo`, `replay`, `status`).
//!
//! Not here: scaling decisions and the Kubernetes client pieces (see
//! `scalecar-scaler`), policy parsing (see `scalecar-config`).
//!
//! Invariants: the proxy adds no buffering to a stream (frames pass as they
//! come, TCP_NODELAY both ways); every admitted request releases its
//! endpoint slot and its in-flight and queued counts exactly once, on every
//! exit path (RAII leases and the observed body's Drop); the upstream is
//! chosen only from the pool, never from the client's Host or URI; a route
//! change (discovery) swaps the whole table, and a request keeps the pool it
//! found until it ends; no input panics. The data plane is built on hyper rather than Pingora: see
//! `docs/adr/0001-data-plane.md`.

pub mod admin;
pub mod body;
pub mod cluster;
pub mod dataplane;
pub mod decisions;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
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
pub mod replay;
pub mod routes;
pub mod server;
#[cfg(feature = "demo")]
pub mod simulate;
pub mod sse;
pub mod status;
pub mod upstream;
