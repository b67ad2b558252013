//! scalecar-loadtest: model-sim, loadgen, kube-sim and the local cluster.
//!
//! Role: realistic, cheap stand-ins for what scalecar meets in production —
//! `model-sim` behaves like one vLLM replica (continuous batching, chunked
//! prefill, KV-cache capacity, disaggregated prefill/decode), `kube-sim`
//! like a Kubernetes API server whose Pods are model-sims, so the proxy,
//! the scaler, the demo and the load tests run on a laptop; `simulate`
//! replays whole traces against the real scaler in virtual time, on the
//! same engine model as model-sim.
//!
//! Not here: anything of the proxy (this crate never depends on
//! `scalecar-proxy`); end-to-end tests through the real proxy live there.

pub mod accept;
pub mod cluster;
pub mod kube_sim;
pub mod loadgen;
pub mod plot;
pub mod sim;
pub mod simulate;
