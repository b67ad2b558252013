//! The simulated GPU: a vLLM-like scheduler with continuous batching,
//! chunked prefill and a KV-cache capacity.
//!
//! One task per replica runs steps. Each step prefills up to the chunk
//! budget (FIFO over running sequences) and decodes one token for every
//! sequence past its prefill; its duration follows the cost model in
//! [`Timing`]. Requests that do not fit the KV cache or the sequence limit
//! wait, as in vLLM, so TTFT grows under load the way it does on a GPU.
//!
//! Streams read progress from a shared [`Progress`] (atomics and a waker),
//! so emitting a token costs an atomic add and a wake, never an allocation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::metrics::SimMetrics;

/// The cost model of one replica (defaults: Llama-3-8B on one H100).
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Prefill throughput, prompt tokens per second.
    pub prefill_tokens_per_sec: f64,
    /// Chunked-prefill budget: prompt tokens per step.
    pub prefill_chunk: u32,
    /// Fixed cost of a decode step.
    pub decode_base: Duration,
    /// Added per running sequence in a decode step.
    pub decode_per_seq: Duration,
    /// Added per 1,000 KV tokens resident.
    pub decode_per_1k_kv: Duration,
    /// Most sequences running at once.
    pub max_num_seqs: u32,
    /// KV-cache capacity in tokens.
    pub kv_capacity: u64,
    /// KV transfer to a decode replica: fixed part.
    pub kv_transfer_base: Duration,
    /// KV transfer: per 1,000 prompt tokens.
    pub kv_transfer_per_1k: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            prefill_tokens_per_sec: 16_000.0,
            prefill_chunk: 8_192,
            decode_base: Duration::from_micros(6_000),
            decode_per_seq: Duration::from_micros(30),
            decode_per_1k_kv: Duration::from_micros(44),
            max_num_seqs: 256,
            kv_capacity: 400_000,
            kv_transfer_base: Duration::from_millis(1),
            kv_transfer_per_1k: Duration::from_millis(5),
        }
    }
}

impl Timing {
    /// How long a step with `prefill` prompt tokens and `decoding`
    /// sequences over `kv_tokens` resident tokens takes.
    pub fn step_time(&self, prefill: u32, decoding: u32, kv_tokens: u64) -> Duration {
        let mut t = Duration::from_secs_f64(f64::from(prefill) / self.prefill_tokens_per_sec);
        if decoding > 0 {
            t += self.decode_base
                + self.decode_per_seq * decoding
                + self.decode_per_1k_kv.mul_f64(kv_tokens as f64 / 1000.0);
        }
        t
    }

    /// The KV transfer delay of a prompt to a decode replica.
    pub fn kv_transfer(&self, prompt_tokens: u32) -> Duration {
        self.kv_transfer_base
            + self
                .kv_transfer_per_1k
                .mul_f64(f64::from(prompt_tokens) / 1000.0)
    }
}

/// A request's progress, shared by the engine (writer) and its response
/// (reader).
#[derive(Debug)]
pub struct Progress {
    /// Tokens generated so far.
    pub generated: AtomicU32,
    /// All tokens generated (or the request failed).
    pub finished: AtomicBool,
    /// The client went away: the engine frees the sequence at its next step.
    pub cancelled: AtomicBool,
    /// Nanoseconds from arrival to the first token (0 until then).
    pub ttft_ns: AtomicU64,
    pub waker: AtomicWaker,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            generated: AtomicU32::new(0),
            finished: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            ttft_ns: AtomicU64::new(0),
            waker: AtomicWaker::new(),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// A request handed to the engine.
#[derive(Debug)]
pub struct Submission {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// The prompt's KV arrived from a prefill replica: no prefill to do.
    pub prefilled: bool,
    pub arrived: Instant,
    pub progress: Arc<Progress>,
}

struct Seq {
    prompt_tokens: u32,
    prefilled: u32,
    generated: u32,
    max_tokens: u32,
    /// KV tokens reserved (prompt + max_tokens: vLLM grows blocks as it goes
    /// and preempts when full; reserving up front gives the same waiting
    /// behaviour without preemption).
    reserved: u64,
    arrived: Instant,
    last_token: Option<Instant>,
    progress: Arc<Progress>,
}

impl Seq {
    fn finish(&self) {
        self.progress.finished.store(true, Ordering::Release);
        self.progress.waker.wake();
    }
}

/// The engine of one replica. Runs until every sender is gone.
pub async fn run(
    timing: Timing,
    mut submissions: mpsc::UnboundedReceiver<Submission>,
    metrics: Arc<SimMetrics>,
) {
    let mut waiting: VecDeque<Seq> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut kv_used: u64 = 0;
    loop {
        // Idle: sleep until work arrives.
        if waiting.is_empty() && running.is_empty() {
            match submissions.recv().await {
                Some(s) => waiting.push_back(seq_of(s)),
                None => return,
            }
        }
        while let Ok(s) = submissions.try_recv() {
            waiting.push_back(seq_of(s));
        }
        // Requests whose client left are dropped wherever they are.
        waiting.retain(|s| {
            let keep = !s.progress.cancelled.load(Ordering::Acquire);
            if !keep {
                s.finish();
            }
            keep
        });
        running.retain(|s| {
            let keep = !s.progress.cancelled.load(Ordering::Acquire);
            if !keep {
                kv_used -= s.reserved;
                s.finish();
            }
            keep
        });
        let now = Instant::now();
        // Admit FIFO while the sequence limit and the KV cache allow; a
        // request that can never fit is failed rather than blocking the queue.
        while let Some(front) = waiting.front() {
            if front.reserved > timing.kv_capacity {
                if let Some(s) = waiting.pop_front() {
                    s.finish();
                }
                continue;
            }
            if running.len() as u32 >= timing.max_num_seqs
                || kv_used + front.reserved > timing.kv_capacity
            {
                break;
            }
            let Some(s) = waiting.pop_front() else { break };
            metrics.queue_time.observe((now - s.arrived).as_secs_f64());
            kv_used += s.reserved;
            running.push(s);
        }
        metrics.set_state(
            running.len() as u64,
            waiting.len() as u64,
            kv_used,
            timing.kv_capacity,
        );
        if running.is_empty() {
            // Everything waiting is blocked on capacity that nothing running
            // will free: cannot happen (a lone request always fits), but
            // never spin.
            if waiting.is_empty() {
                continue;
            }
            tokio::time::sleep(timing.decode_base).await;
            continue;
        }
        // Plan the step: chunked prefill in arrival order, decode for the rest.
        let mut budget = timing.prefill_chunk;
        let mut prefill_total = 0u32;
        let mut decoding = 0u32;
        let mut plan: Vec<(usize, u32)> = Vec::new();
        for (i, s) in running.iter().enumerate() {
            if s.prefilled < s.prompt_tokens {
                let chunk = (s.prompt_tokens - s.prefilled).min(budget);
                if chunk > 0 {
                    plan.push((i, chunk));
                    budget -= chunk;
                    prefill_total += chunk;
                }
            } else {
                decoding += 1;
            }
        }
        let resident: u64 = running
            .iter()
            .map(|s| u64::from(s.prefilled + s.generated))
            .sum();
        let completing_prefill = plan
            .iter()
            .filter(|(i, c)| {
                running
                    .get(*i)
                    .is_some_and(|s| s.prefilled + c >= s.prompt_tokens)
            })
            .count() as u32;
        let step = timing.step_time(prefill_total, decoding + completing_prefill, resident);
        if step.is_zero() {
            // A zero-cost model (benchmarks of what sits in front of it):
            // the timer would round the step up to its 1 ms tick.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep_until(now + step).await;
        }
        let end = Instant::now();
        for (i, chunk) in plan {
            if let Some(s) = running.get_mut(i) {
                s.prefilled += chunk;
                metrics
                    .prompt_tokens
                    .fetch_add(u64::from(chunk), Ordering::Relaxed);
            }
        }
        // Every sequence past its prefill emits one token.
        let mut emitted = 0u64;
        for s in running.iter_mut() {
            if s.prefilled < s.prompt_tokens || s.generated >= s.max_tokens {
                continue;
            }
            s.generated += 1;
            emitted += 1;
            match s.last_token {
                None => {
                    let ttft = end - s.arrived;
                    s.progress
                        .ttft_ns
                        .store(ttft.as_nanos().max(1) as u64, Ordering::Release);
                    metrics.ttft.observe(ttft.as_secs_f64());
                }
                Some(prev) => metrics.itl.observe((end - prev).as_secs_f64()),
            }
            s.last_token = Some(end);
            s.progress.generated.store(s.generated, Ordering::Release);
            s.progress.waker.wake();
        }
        metrics
            .generation_tokens
            .fetch_add(emitted, Ordering::Relaxed);
        running.retain(|s| {
            let done = s.generated >= s.max_tokens;
            if done {
                kv_used -= s.reserved;
                metrics.e2e.observe((end - s.arrived).as_secs_f64());
                metrics.requests_finished.fetch_add(1, Ordering::Relaxed);
                s.finish();
            }
            !done
        });
        metrics.set_state(
            running.len() as u64,
            waiting.len() as u64,
            kv_used,
            timing.kv_capacity,
        );
    }
}

fn seq_of(s: Submission) -> Seq {
    let max_tokens = s.max_tokens.max(1);
    Seq {
        prompt_tokens: s.prompt_tokens,
        prefilled: if s.prefilled { s.prompt_tokens } else { 0 },
        generated: 0,
        max_tokens,
        reserved: u64::from(s.prompt_tokens) + u64::from(max_tokens),
        arrived: s.arrived,
        last_token: None,
        progress: s.progress,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_time_follows_the_cost_model() {
        let t = Timing::default();
        // 2,000 prompt tokens alone: 125 ms of prefill, no decode.
        assert_eq!(t.step_time(2000, 0, 0), Duration::from_millis(125));
        // A decode step of 100 sequences over 200k KV tokens:
        // 6 + 3 + 8.8 ms.
        let d = t.step_time(0, 100, 200_000);
        assert!((d.as_secs_f64() - 0.0178).abs() < 1e-9, "{d:?}");
        assert_eq!(t.kv_transfer(2000), Duration::from_millis(11));
    }
}
