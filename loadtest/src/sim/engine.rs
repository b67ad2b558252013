//! The simulated GPU: a vLLM-like scheduler with continuous batching,
//! chunked prefill and a KV-cache capacity.
//!
//! [`Engine`] is the scheduler as a state machine on a clock it is given:
//! the model-sim's engine task drives it on tokio's clock ([`run`]) and the
//! virtual-time simulator drives it on its own, so both share one GPU model.
//! Each step prefills up to the chunk
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

/// Named cost models, for `scalecar simulate --gpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuProfile {
    /// Llama-3-8B on one H100 (model-sim's default).
    H100Llama8b,
    /// Llama-3-70B on two H100s (tensor parallel 2).
    H100x2Llama70b,
}

impl GpuProfile {
    pub const ALL: [GpuProfile; 2] = [GpuProfile::H100Llama8b, GpuProfile::H100x2Llama70b];

    pub fn name(self) -> &'static str {
        match self {
            GpuProfile::H100Llama8b => "h100-llama-8b",
            GpuProfile::H100x2Llama70b => "2xh100-llama-70b",
        }
    }

    pub fn timing(self) -> Timing {
        match self {
            GpuProfile::H100Llama8b => Timing::default(),
            GpuProfile::H100x2Llama70b => Timing::h100x2_llama_70b(),
        }
    }
}

impl std::str::FromStr for GpuProfile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GpuProfile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = GpuProfile::ALL.iter().map(|p| p.name()).collect();
                format!("{s:?} is not a GPU profile (one of {})", names.join(", "))
            })
    }
}

impl Timing {
    /// Llama-3-70B (bf16) on two H100s with tensor parallelism: ~140
    /// GFLOP per prompt token at ~40 % of 2 × 990 TFLOPS (≈5,600 tok/s
    /// prefill); a decode step reads 140 GB of weights at 2 × 3.35 TB/s
    /// (~25 ms with overheads); 320 KB of KV per token, ~12 GB left for it
    /// (40,000 tokens). Its replicas are KV-bound at a few dozen
    /// sequences, so the Azure traces need several of them at peak, while
    /// every prompt in them still fits a 1–2 s TTFT on one replica.
    pub fn h100x2_llama_70b() -> Self {
        Timing {
            prefill_tokens_per_sec: 5_600.0,
            prefill_chunk: 4_096,
            decode_base: Duration::from_micros(25_000),
            decode_per_seq: Duration::from_micros(180),
            decode_per_1k_kv: Duration::from_micros(50),
            max_num_seqs: 128,
            kv_capacity: 40_000,
            kv_transfer_base: Duration::from_millis(2),
            kv_transfer_per_1k: Duration::from_millis(12),
        }
    }

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

/// A request handed to the engine task of a model-sim replica.
#[derive(Debug)]
pub struct Submission {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// The prompt's KV arrived from a prefill replica: no prefill to do.
    pub prefilled: bool,
    pub arrived: Instant,
    pub progress: Arc<Progress>,
}

/// What the engine holds a request by: the model-sim's shared progress, or
/// the virtual-time simulator's request number.
pub trait Ticket {
    /// The client went away: drop the request at the next step.
    fn cancelled(&self) -> bool {
        false
    }
}

impl Ticket for Arc<Progress> {
    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// What the engine reports as it steps (times are the engine's own clock).
pub trait EngineEvents<T> {
    /// A request got its KV blocks and started, after `waited`.
    fn admitted(&mut self, ticket: &T, waited: Duration);
    /// Prompt tokens prefilled in a step.
    fn prefilled(&mut self, tokens: u32);
    /// A token was generated: the first (`ttft` since arrival) or a later
    /// one (`itl` since the one before).
    fn token(&mut self, ticket: &T, generated: u32, latency: TokenLatency);
    /// The request left the engine: all its tokens (`Some(e2e)`), or
    /// dropped (cancelled, or larger than the KV cache: `None`).
    fn finished(&mut self, ticket: &T, e2e: Option<Duration>);
}

/// The latency a token closes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenLatency {
    FirstToken(Duration),
    InterToken(Duration),
}

#[derive(Debug, Clone)]
struct Seq<T> {
    prompt_tokens: u32,
    prefilled: u32,
    generated: u32,
    max_tokens: u32,
    /// KV tokens reserved (prompt + max_tokens: vLLM grows blocks as it goes
    /// and preempts when full; reserving up front gives the same waiting
    /// behaviour without preemption).
    reserved: u64,
    arrived: Duration,
    last_token: Option<Duration>,
    ticket: T,
}

/// The scheduler of one replica as a state machine on a clock it is given
/// (the model-sim's tokio clock, or the simulator's virtual one): one model
/// of the GPU for both, so they cannot drift apart.
///
/// A step is `begin_step` (admit what fits, plan prefill chunks and decode,
/// return the step's duration) then `end_step` at that time (apply the
/// plan, emit tokens, free finished sequences). Requests submitted during a
/// step wait for the next, as in vLLM.
#[derive(Debug, Clone)]
pub struct Engine<T> {
    timing: Timing,
    waiting: VecDeque<Seq<T>>,
    running: Vec<Seq<T>>,
    kv_used: u64,
    /// The step in progress: (index in `running`, prefill chunk).
    plan: Vec<(usize, u32)>,
}

impl<T: Ticket> Engine<T> {
    pub fn new(timing: Timing) -> Self {
        Engine {
            timing,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_used: 0,
            plan: Vec::new(),
        }
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// Queues a request that arrived at `arrived`.
    pub fn submit(
        &mut self,
        ticket: T,
        prompt_tokens: u32,
        max_tokens: u32,
        prefilled: bool,
        arrived: Duration,
    ) {
        let max_tokens = max_tokens.max(1);
        self.waiting.push_back(Seq {
            prompt_tokens,
            prefilled: if prefilled { prompt_tokens } else { 0 },
            generated: 0,
            max_tokens,
            reserved: u64::from(prompt_tokens) + u64::from(max_tokens),
            arrived,
            last_token: None,
            ticket,
        });
    }

    /// Nothing waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn kv_used(&self) -> u64 {
        self.kv_used
    }

    /// Starts a step at `now`: drops cancelled requests, admits FIFO while
    /// the sequence limit and the KV cache allow, and plans chunked prefill
    /// in arrival order with decode for the rest. Returns how long the step
    /// takes, or `None` when there is nothing to do.
    pub fn begin_step(
        &mut self,
        now: Duration,
        events: &mut impl EngineEvents<T>,
    ) -> Option<Duration> {
        self.waiting.retain(|s| {
            let keep = !s.ticket.cancelled();
            if !keep {
                events.finished(&s.ticket, None);
            }
            keep
        });
        let mut freed = 0;
        self.running.retain(|s| {
            let keep = !s.ticket.cancelled();
            if !keep {
                freed += s.reserved;
                events.finished(&s.ticket, None);
            }
            keep
        });
        self.kv_used -= freed;
        let timing = &self.timing;
        // A request that can never fit is failed rather than blocking the
        // queue.
        while let Some(front) = self.waiting.front() {
            if front.reserved > timing.kv_capacity {
                if let Some(s) = self.waiting.pop_front() {
                    events.finished(&s.ticket, None);
                }
                continue;
            }
            if self.running.len() as u32 >= timing.max_num_seqs
                || self.kv_used + front.reserved > timing.kv_capacity
            {
                break;
            }
            let Some(s) = self.waiting.pop_front() else {
                break;
            };
            events.admitted(&s.ticket, now.saturating_sub(s.arrived));
            self.kv_used += s.reserved;
            self.running.push(s);
        }
        self.plan.clear();
        if self.running.is_empty() {
            // Waiting on capacity nothing running will free cannot happen (a
            // lone request always fits), but never spin.
            return (!self.waiting.is_empty()).then_some(timing.decode_base);
        }
        let mut budget = timing.prefill_chunk;
        let mut prefill_total = 0u32;
        let mut decoding = 0u32;
        let mut completing_prefill = 0u32;
        let mut resident = 0u64;
        for (i, s) in self.running.iter().enumerate() {
            resident += u64::from(s.prefilled + s.generated);
            if s.prefilled < s.prompt_tokens {
                let chunk = (s.prompt_tokens - s.prefilled).min(budget);
                if chunk > 0 {
                    self.plan.push((i, chunk));
                    budget -= chunk;
                    prefill_total += chunk;
                    if s.prefilled + chunk >= s.prompt_tokens {
                        completing_prefill += 1;
                    }
                }
            } else {
                decoding += 1;
            }
        }
        Some(timing.step_time(prefill_total, decoding + completing_prefill, resident))
    }

    /// Ends the step begun last, at `end`.
    pub fn end_step(&mut self, end: Duration, events: &mut impl EngineEvents<T>) {
        for &(i, chunk) in &self.plan {
            if let Some(s) = self.running.get_mut(i) {
                s.prefilled += chunk;
                events.prefilled(chunk);
            }
        }
        self.plan.clear();
        // Every sequence past its prefill emits one token.
        for s in self.running.iter_mut() {
            if s.prefilled < s.prompt_tokens || s.generated >= s.max_tokens {
                continue;
            }
            s.generated += 1;
            let latency = match s.last_token {
                None => TokenLatency::FirstToken(end.saturating_sub(s.arrived)),
                Some(prev) => TokenLatency::InterToken(end.saturating_sub(prev)),
            };
            s.last_token = Some(end);
            events.token(&s.ticket, s.generated, latency);
        }
        let mut freed = 0;
        self.running.retain(|s| {
            let done = s.generated >= s.max_tokens;
            if done {
                freed += s.reserved;
                events.finished(&s.ticket, Some(end.saturating_sub(s.arrived)));
            }
            !done
        });
        self.kv_used -= freed;
    }
}

/// model-sim's events: the shared progress its streams read, and its
/// Prometheus metrics.
struct Reporter<'a> {
    metrics: &'a SimMetrics,
}

impl EngineEvents<Arc<Progress>> for Reporter<'_> {
    fn admitted(&mut self, _: &Arc<Progress>, waited: Duration) {
        self.metrics.queue_time.observe(waited.as_secs_f64());
    }

    fn prefilled(&mut self, tokens: u32) {
        self.metrics
            .prompt_tokens
            .fetch_add(u64::from(tokens), Ordering::Relaxed);
    }

    fn token(&mut self, p: &Arc<Progress>, generated: u32, latency: TokenLatency) {
        match latency {
            TokenLatency::FirstToken(ttft) => {
                p.ttft_ns
                    .store(ttft.as_nanos().max(1) as u64, Ordering::Release);
                self.metrics.ttft.observe(ttft.as_secs_f64());
            }
            TokenLatency::InterToken(itl) => self.metrics.itl.observe(itl.as_secs_f64()),
        }
        self.metrics
            .generation_tokens
            .fetch_add(1, Ordering::Relaxed);
        p.generated.store(generated, Ordering::Release);
        p.waker.wake();
    }

    fn finished(&mut self, p: &Arc<Progress>, e2e: Option<Duration>) {
        if let Some(e2e) = e2e {
            self.metrics.e2e.observe(e2e.as_secs_f64());
            self.metrics
                .requests_finished
                .fetch_add(1, Ordering::Relaxed);
        }
        p.finished.store(true, Ordering::Release);
        p.waker.wake();
    }
}

/// The engine task of one model-sim replica, on tokio's clock. Runs until
/// every sender is gone.
pub async fn run(
    timing: Timing,
    mut submissions: mpsc::UnboundedReceiver<Submission>,
    metrics: Arc<SimMetrics>,
) {
    let epoch = Instant::now();
    let since = |t: Instant| t.saturating_duration_since(epoch);
    let capacity = timing.kv_capacity;
    let mut engine: Engine<Arc<Progress>> = Engine::new(timing);
    let mut events = Reporter { metrics: &metrics };
    let submit = |engine: &mut Engine<Arc<Progress>>, s: Submission| {
        engine.submit(
            s.progress,
            s.prompt_tokens,
            s.max_tokens,
            s.prefilled,
            since(s.arrived),
        );
    };
    let publish = |engine: &Engine<Arc<Progress>>| {
        metrics.set_state(
            engine.running() as u64,
            engine.waiting() as u64,
            engine.kv_used(),
            capacity,
        );
    };
    loop {
        // Idle: sleep until work arrives.
        if engine.is_idle() {
            match submissions.recv().await {
                Some(s) => submit(&mut engine, s),
                None => return,
            }
        }
        while let Ok(s) = submissions.try_recv() {
            submit(&mut engine, s);
        }
        let start = Instant::now();
        let step = engine.begin_step(since(start), &mut events);
        publish(&engine);
        let Some(step) = step else { continue };
        if step.is_zero() {
            // A zero-cost model (benchmarks of what sits in front of it):
            // the timer would round the step up to its 1 ms tick.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep_until(start + step).await;
        }
        engine.end_step(since(Instant::now()), &mut events);
        publish(&engine);
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
