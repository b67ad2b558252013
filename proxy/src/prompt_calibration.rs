//! Prompt sizes in the model server's tokens.
//!
//! A prompt's size is needed the moment its request arrives — for the
//! signals, routing by tokens outstanding and the queue — before any
//! tokenizer has seen it, so the proxy estimates it from the prompt's text
//! (about four characters a token). A real tokenizer disagrees: gemma-3's
//! made 1.72 × fewer tokens of English prose than that estimate (measured
//! through llama.cpp's llama-server, docs/real-server.md). The model server
//! says afterwards what its tokenizer counted (`usage.prompt_tokens`), so per
//! pool — one model, one tokenizer — the ratio of the two is learned from
//! every answer that carries usage and applied to each new estimate. The
//! prompt tokens of the signals, the metrics and the policy's targets are
//! then the server's, as a user reads them in its own metrics and sets
//! targets from its benchmarks.
//!
//! Lock-free: one atomic word read per request, one compare-and-swap per
//! answer with usage. Without usage (a stream whose client did not ask for
//! it, a server that never sends it) the ratio stays 1: the estimate.

use std::sync::atomic::{AtomicU64, Ordering};

/// Prompts estimated under this many tokens teach nothing: the chat
/// template's own tokens and the JSON around the messages dominate them.
const MIN_ESTIMATE: u64 = 32;
/// A sample moves the ratio by at most this share, so that one odd request
/// (an image whose base64 the estimate counted as text) cannot swing it.
const MAX_WEIGHT: f64 = 0.125;
/// A sample of this many estimated tokens gets the full weight; smaller
/// ones proportionally less (big prompts are the work that matters).
const FULL_WEIGHT_TOKENS: f64 = 2048.0;
/// Server tokens per estimated token stay within these.
const BOUNDS: (f64, f64) = (0.05, 20.0);

/// One prompt's size: the proxy's estimate from its text, and that in the
/// model server's tokens as far as the pool has learned them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptSize {
    pub estimated: u64,
    pub tokens: u64,
}

/// The learned ratio of a pool's model-server prompt tokens to the proxy's
/// estimate.
#[derive(Debug)]
pub struct PromptCalibration {
    /// f64 bits of the ratio; 0: nothing learned yet (the ratio is 1).
    ratio_bits: AtomicU64,
}

impl Default for PromptCalibration {
    fn default() -> Self {
        PromptCalibration {
            ratio_bits: AtomicU64::new(0),
        }
    }
}

impl PromptCalibration {
    /// The learned ratio, `None` before any answer taught one.
    pub fn ratio(&self) -> Option<f64> {
        match self.ratio_bits.load(Ordering::Relaxed) {
            0 => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    /// `estimate` (the proxy's count from the prompt's text) in the model
    /// server's tokens; at least 1 for a non-empty estimate.
    pub fn apply(&self, estimate: u64) -> u64 {
        match self.ratio() {
            None => estimate,
            Some(r) => ((estimate as f64 * r).round() as u64).max(u64::from(estimate > 0)),
        }
    }

    /// The size of a prompt estimated at `estimate`.
    pub fn size(&self, estimate: u64) -> PromptSize {
        PromptSize {
            estimated: estimate,
            tokens: self.apply(estimate),
        }
    }

    /// The model server counted `counted` prompt tokens for a prompt the
    /// proxy estimated at `estimate`.
    pub fn learn(&self, estimate: u64, counted: u64) {
        if estimate < MIN_ESTIMATE || counted == 0 {
            return;
        }
        let sample = (counted as f64 / estimate as f64).clamp(BOUNDS.0, BOUNDS.1);
        let weight = (estimate as f64 / FULL_WEIGHT_TOKENS).min(1.0) * MAX_WEIGHT;
        let _ = self
            .ratio_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let next = if bits == 0 {
                    // The first answer replaces the estimate's implicit 1.
                    sample
                } else {
                    let r = f64::from_bits(bits);
                    r + (sample - r) * weight
                };
                Some(next.clamp(BOUNDS.0, BOUNDS.1).to_bits())
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_stands_until_an_answer_says_otherwise() {
        let c = PromptCalibration::default();
        assert_eq!(c.ratio(), None);
        assert_eq!(c.apply(1000), 1000);
        assert_eq!(c.apply(0), 0);
        // Too small to teach anything, or no count.
        c.learn(10, 40);
        c.learn(1000, 0);
        assert_eq!(c.ratio(), None);
        c.learn(1000, 580);
        assert_eq!(c.ratio(), Some(0.58));
        assert_eq!(c.apply(1000), 580);
        assert_eq!(c.apply(1), 1, "a prompt is never calibrated away");
    }

    #[test]
    fn converges_on_the_servers_tokenizer_and_follows_a_change() {
        let c = PromptCalibration::default();
        for _ in 0..60 {
            c.learn(2400, 1400);
        }
        let r = c.ratio().unwrap_or_default();
        assert!((r - 1400.0 / 2400.0).abs() < 1e-9, "{r}");
        // A new model behind the same name tokenizes denser.
        for _ in 0..60 {
            c.learn(2400, 2200);
        }
        let r = c.ratio().unwrap_or_default();
        assert!((r - 2200.0 / 2400.0).abs() < 0.01, "{r}");
    }

    #[test]
    fn one_odd_request_moves_it_little() {
        let c = PromptCalibration::default();
        for _ in 0..40 {
            c.learn(500, 300);
        }
        // An image's base64, estimated as 250k tokens of text, counted as
        // a few hundred by the server.
        c.learn(250_000, 600);
        let r = c.ratio().unwrap_or_default();
        assert!(r > 0.6 * 0.85, "{r}");
        // Absurd answers stay bounded.
        for _ in 0..200 {
            c.learn(5_000, u64::MAX);
        }
        let r = c.ratio().unwrap_or_default();
        assert!(r <= BOUNDS.1 && r > BOUNDS.1 - 1e-6, "{r}");
    }
}
