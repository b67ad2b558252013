//! scalecar-cli: the `scalecar` binary's commands, each a module a test or
//! a fuzz harness can drive without a process.
//!
//! Role: `run` assembles a gateway from a config file (the proxy crate does
//! the work); `status` reads a running gateway's admin port; `replay` feeds
//! recorded signals through an algorithm offline; `demo` (the closed loop on
//! an embedded kube-sim) and `simulate` (a trace in virtual time against the
//! oracle) are behind the default `demo` feature, which the production image
//! leaves out.
//!
//! Not here: the data plane, discovery and the control loop
//! (`scalecar-proxy`, `scalecar-scaler`), the simulators themselves
//! (`scalecar-loadtest`).
//!
//! Invariants: a command's input errors are reported in words with exit
//! code 2, never a panic; `replay` and `simulate` are deterministic (virtual
//! time, seeded).

#[cfg(feature = "demo")]
pub mod demo;
pub mod replay;
#[cfg(feature = "demo")]
pub mod simulate;
pub mod status;
