//! scalecar-proxy: the data plane, the admin server and the `scalecar`
//! binary.
//!
//! Role: an OpenAI-compatible inference proxy that measures every request
//! and streamed token into the scaler's signals, and the commands users run
//! (`replay` now; `run` and `demo` with the data plane).
//!
//! Not here: scaling decisions (see `scalecar-scaler`), policy parsing (see
//! `scalecar-config`).

pub mod replay;
