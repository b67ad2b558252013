//! Pools: the endpoints serving one model in one role, their per-endpoint
//! load and health, and the admission of requests to them.
//!
//! The endpoint set is read-mostly and swapped whole (`ArcSwap`) when
//! discovery or the local cluster changes it. Per-endpoint counters are
//! atomics; a request holds its endpoint slot through an RAII [`Lease`], so
//! every exit path returns it exactly once and wakes one waiter.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use scalecar_config::Role;
use scalecar_scaler::balance::{least_loaded, splitmix};
use scalecar_scaler::signals::PoolSignals;
use tokio::sync::Notify;

/// One model-server endpoint and its load.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `Host` of requests to it, formatted once.
    pub host: http::HeaderValue,
    /// Requests sent and not finished.
    pub outstanding: AtomicU32,
    /// Prompt + generated tokens of those requests (the work they carry).
    pub outstanding_tokens: AtomicU64,
    /// Prompt tokens of those requests before their first token: the
    /// prefill a new prompt queues behind, what the pick compares first.
    pub prefill_tokens: AtomicU64,
    /// Of those, requests waiting for their first token, and requests
    /// decoding: the pool's signals count the endpoint busy prefilling
    /// (decoding) while these are above zero.
    prefilling: AtomicU32,
    decoding: AtomicU32,
    /// Passive ejection: no new requests before this (ms on the pool clock).
    ejected_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Active health checks' verdict, a [`Health`] (static endpoints start
    /// unknown; discovered ones are ready when they arrive).
    health: AtomicU8,
    /// Tokens of KV cache its engine reported on `/metrics` (0: none read).
    kv_capacity: AtomicU64,
}

/// What the active health checks know of an endpoint. Only a healthy one
/// is sent requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet: a replica may still be loading its model.
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            0 => Health::Unknown,
            1 => Health::Healthy,
            _ => Health::Unhealthy,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Endpoint {
            addr,
            host: http::HeaderValue::from_str(&addr.to_string())
                .unwrap_or_else(|_| http::HeaderValue::from_static("localhost")),
            outstanding: AtomicU32::new(0),
            outstanding_tokens: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            prefilling: AtomicU32::new(0),
            decoding: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            health: AtomicU8::new(Health::Healthy as u8),
            kv_capacity: AtomicU64::new(0),
        })
    }

    /// The KV cache its engine reported (`None`: not read, or no size).
    pub fn kv_capacity(&self) -> Option<u64> {
        match self.kv_capacity.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    pub fn set_kv_capacity(&self, tokens: Option<u64>) {
        self.kv_capacity
            .store(tokens.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    pub fn is_healthy(&self) -> bool {
        self.health() == Health::Healthy
    }

    /// Sets the checks' verdict; returns the one before.
    pub fn set_health(&self, h: Health) -> Health {
        Health::from_u8(self.health.swap(h as u8, Ordering::AcqRel))
    }

    /// Healthy and not ejected; `now_ms` is read only for an endpoint that
    /// was ever ejected.
    fn available(&self, now_ms: impl FnOnce() -> u64) -> bool {
        if !self.is_healthy() {
            return false;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    /// Ejects for a backoff that doubles with consecutive ejections
    /// (250 ms … 30 s). Only [`Pool::record_failure`] decides to.
    fn eject(&self, now_ms: u64) {
        let n = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .min(7);
        let backoff = (250u64 << n).min(30_000);
        self.ejected_until_ms
            .store(now_ms + backoff, Ordering::Relaxed);
    }

    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Ejections in a row without a success since (the backoff's exponent).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

/// A pool of endpoints for one `(model, role)`.
pub struct Pool {
    pub model: String,
    pub role: Role,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    pub signals: Arc<PoolSignals>,
    /// Requests per endpoint at once (`max-concurrency`).
    pub max_concurrency: Option<u32>,
    /// Requests waiting for a slot, first come first served: only the
    /// head may take a freed slot, and a new arrival queues behind them.
    waiters: Mutex<VecDeque<Arc<Waiter>>>,
    queued: AtomicUsize,
    /// Request body bytes the queued requests hold, and the most they may
    /// (`limits.queue-bytes`): what bounds the memory a burst of large
    /// prompts can pin while it waits.
    queued_bytes: AtomicUsize,
    queue_bytes: AtomicUsize,
    /// Passive ejection's cap, in percent of the endpoints.
    max_ejection_percent: AtomicU32,
    pub queue_length: usize,
    epoch: Instant,
    /// Called when a request waits on a pool with no endpoint (scale from
    /// zero).
    on_empty: ArcSwap<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Actively health-checked (static endpoints): new endpoints start
    /// [`Health::Unknown`], and a pool with none healthy fails fast.
    health_checked: AtomicBool,
    /// Called when a request finds no healthy endpoint: an early re-check
    /// (the checker rate-limits it), so recovery needs no full interval.
    on_unhealthy: ArcSwap<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Pick rotations, one cache line per worker thread: each pool rotates
    /// on its own (a request that picks in two pools — a PD flow — must not
    /// lock both rotations into one parity), and no line is shared between
    /// workers on the request path.
    picks: Box<[PickCounter]>,
    /// Removed from the routes: waiters leave with [`AdmitError::Closed`].
    closed: AtomicBool,
    /// The model server's prompt tokens per estimated token, learned from
    /// its answers' usage.
    pub prompt_calibration: crate::prompt_calibration::PromptCalibration,
}

/// One worker's pick rotation in one pool, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PickCounter(AtomicU64);

/// Rotations per pool; threads beyond this share one (still correct).
const PICK_SLOTS: usize = 16;

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("model", &self.model)
            .field("role", &self.role)
            .field("endpoints", &self.endpoints.load().len())
            .finish_non_exhaustive()
    }
}

/// Why admission failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    /// The queue is full: 429.
    QueueFull,
    /// The deadline passed while queued: 503.
    Timeout,
    /// The pool was removed or replaced while the request waited: 503.
    Closed,
    /// Every endpoint failed its health checks: 503 at once, not after
    /// the queue's deadline (`queued`: it went down while this waited).
    NoHealthyEndpoint { queued: bool },
}

/// Whether a pool can take requests now, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// At least one endpoint is healthy.
    Ready,
    /// None healthy yet, some not checked yet: requests wait.
    Starting,
    /// Every endpoint failed its checks: requests get 503 at once.
    Down,
    /// No endpoint at all: requests wait for one (scale from zero).
    Empty,
}

impl Serving {
    pub fn as_str(self) -> &'static str {
        match self {
            Serving::Ready => "ready",
            Serving::Starting => "starting",
            Serving::Down => "no healthy endpoint",
            Serving::Empty => "scaled to zero",
        }
    }
}

/// One request in the admission queue.
#[derive(Debug, Default)]
struct Waiter {
    /// Told when this waiter is the head and a slot may be free.
    wake: Notify,
}

/// A held slot on one endpoint. Dropping it frees the slot and wakes one
/// waiter.
pub struct Lease {
    pool: Arc<Pool>,
    pub endpoint: Arc<Endpoint>,
    tokens: u64,
    /// Its prompt tokens while they count in the endpoint's
    /// `prefill_tokens`: until the first token, or the end of a request
    /// that shows none (a non-streaming answer).
    unprefilled: u64,
    /// `None`: not counted (a non-streaming answer has no first token to
    /// end its prefill by).
    phase: Option<Phase>,
}

/// Where a leased request is, for the endpoint's busy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefilling,
    Decoding,
}

impl Pool {
    /// Counts a request into (`+`) or out of (`-`) an endpoint's phase
    /// count; the first in and the last out tell the signals.
    fn phase_count(&self, e: &Endpoint, phase: Phase, enter: bool) {
        let count = match phase {
            Phase::Prefilling => &e.prefilling,
            Phase::Decoding => &e.decoding,
        };
        let edge = if enter {
            count.fetch_add(1, Ordering::AcqRel) == 0
        } else {
            count.fetch_sub(1, Ordering::AcqRel) == 1
        };
        if edge {
            match phase {
                Phase::Prefilling => self.signals.prefill_busy(enter),
                Phase::Decoding => self.signals.decode_busy(enter),
            }
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("endpoint", &self.endpoint.addr)
            .finish()
    }
}

impl Lease {
    /// Adds generated tokens to the endpoint's outstanding work.
    pub fn add_tokens(&mut self, n: u64) {
        self.endpoint
            .outstanding_tokens
            .fetch_add(n, Ordering::Relaxed);
        self.tokens += n;
    }

    /// The request is sent and its first token will be seen (a stream):
    /// the endpoint has prefill work until then. Once.
    pub fn prefilling(&mut self) {
        if self.phase.is_none() {
            self.pool
                .phase_count(&self.endpoint, Phase::Prefilling, true);
            self.phase = Some(Phase::Prefilling);
        }
    }

    /// The request's first token arrived: the endpoint is done prefilling
    /// it and decodes it from now on. Once; later calls do nothing.
    pub fn first_token(&mut self) {
        self.prefilled();
        if self.phase == Some(Phase::Prefilling) {
            self.pool
                .phase_count(&self.endpoint, Phase::Prefilling, false);
            self.pool.phase_count(&self.endpoint, Phase::Decoding, true);
            self.phase = Some(Phase::Decoding);
        }
    }

    /// Takes the prompt out of the endpoint's prefill work (once).
    fn prefilled(&mut self) {
        if self.unprefilled > 0 {
            self.endpoint
                .prefill_tokens
                .fetch_sub(self.unprefilled, Ordering::Relaxed);
            self.unprefilled = 0;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.prefilled();
        if let Some(phase) = self.phase {
            self.pool.phase_count(&self.endpoint, phase, false);
        }
        // SeqCst pairs with the waiter's queue count and its look at
        // `outstanding` (see `Pool::admit`): either the waiter sees this
        // slot free, or this drop sees the waiter and wakes it. With no
        // waiter (the common case) the shared Notify is left untouched.
        self.endpoint.outstanding.fetch_sub(1, Ordering::SeqCst);
        self.endpoint
            .outstanding_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        if self.pool.queued.load(Ordering::SeqCst) > 0 {
            self.pool.wake_head();
        }
    }
}

/// Holds a request's place in the pool's queue (the line, the bound and
/// the signals) until dropped — admitted, timed out or cancelled alike.
struct Queued<'a> {
    pool: &'a Pool,
    waiter: Arc<Waiter>,
    since: Instant,
    /// Body bytes it holds against the pool's bound.
    bytes: usize,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        {
            let mut line = self.pool.line();
            let at = line.iter().position(|w| Arc::ptr_eq(w, &self.waiter));
            if let Some(i) = at {
                line.remove(i);
            }
            // The next in line may find a slot (another one freed, or the
            // one this waiter leaves unused).
            if at == Some(0)
                && let Some(next) = line.front()
            {
                next.wake.notify_one();
            }
        }
        self.pool.queued.fetch_sub(1, Ordering::AcqRel);
        self.pool
            .queued_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
        self.pool.signals.queue_leave(self.since.elapsed());
    }
}

impl Pool {
    pub fn new(
        model: String,
        role: Role,
        endpoints: Vec<SocketAddr>,
        signals: Arc<PoolSignals>,
        max_concurrency: Option<u32>,
        queue_length: usize,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            model,
            role,
            endpoints: ArcSwap::from_pointee(endpoints.into_iter().map(Endpoint::new).collect()),
            signals,
            max_concurrency,
            waiters: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            queue_bytes: AtomicUsize::new(usize::MAX),
            max_ejection_percent: AtomicU32::new(50),
            queue_length,
            epoch: Instant::now(),
            on_empty: ArcSwap::from_pointee(None),
            health_checked: AtomicBool::new(false),
            on_unhealthy: ArcSwap::from_pointee(None),
            closed: AtomicBool::new(false),
            prompt_calibration: Default::default(),
            picks: (0..PICK_SLOTS)
                .map(|i| PickCounter(AtomicU64::new(splitmix(i as u64 ^ seed()))))
                .collect(),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sets passive ejection's cap (`limits.max-ejection-percent`).
    /// The most request body bytes queued requests may hold at once.
    pub fn set_queue_bytes(&self, bytes: usize) {
        self.queue_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Request body bytes the queued requests hold now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    pub fn set_max_ejection_percent(&self, percent: u32) {
        self.max_ejection_percent
            .store(percent.min(100), Ordering::Relaxed);
    }

    /// A connection failure, a 5xx or a broken body from `e`: eject it for a
    /// backoff. Failures of requests already in flight when it was ejected
    /// (one burst) count once; no more than `max-ejection-percent` of the
    /// endpoints are ejected at once, and never the last one.
    pub fn record_failure(&self, e: &Endpoint) {
        // The checks confirm an outage sooner than the next interval.
        self.ask_for_check();
        let now = self.now_ms();
        if e.is_ejected(now) {
            return;
        }
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        let ejected = endpoints.iter().filter(|x| x.is_ejected(now)).count();
        let percent = self.max_ejection_percent.load(Ordering::Relaxed) as usize;
        let allowed = (n * percent / 100).min(n.saturating_sub(1));
        if ejected < allowed {
            e.eject(now);
        } else {
            tracing::debug!(endpoint = %e.addr, ejected, of = n, "failure not ejected: at max-ejection-percent");
        }
    }

    fn line(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Waiter>>> {
        // Pushes and removals only: a poisoned lock is still consistent.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the head of the queue a slot may be free.
    fn wake_head(&self) {
        if let Some(head) = self.line().front() {
            head.wake.notify_one();
        }
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Marks the pool actively health-checked: its endpoints (now and
    /// later) serve only after a good check. `on_unhealthy` asks for an
    /// early check.
    pub fn health_checked(&self, on_unhealthy: Arc<dyn Fn() + Send + Sync>) {
        self.health_checked.store(true, Ordering::Release);
        for e in self.endpoints.load().iter() {
            e.set_health(Health::Unknown);
        }
        self.on_unhealthy.store(Arc::new(Some(on_unhealthy)));
    }

    pub fn is_health_checked(&self) -> bool {
        self.health_checked.load(Ordering::Acquire)
    }

    /// Whether an endpoint other than `addr` could take a request now
    /// (healthy, not ejected; caps aside): a retry elsewhere is worth a wait.
    pub fn has_other_available(&self, addr: SocketAddr) -> bool {
        let now = std::cell::OnceCell::new();
        let now = || *now.get_or_init(|| self.now_ms());
        self.endpoints
            .load()
            .iter()
            .any(|e| e.addr != addr && e.available(now))
    }

    /// Whether the pool can take requests now.
    pub fn serving(&self) -> Serving {
        let endpoints = self.endpoints.load();
        if endpoints.is_empty() {
            return Serving::Empty;
        }
        let mut unknown = false;
        for e in endpoints.iter() {
            match e.health() {
                Health::Healthy => return Serving::Ready,
                Health::Unknown => unknown = true,
                Health::Unhealthy => {}
            }
        }
        if unknown {
            Serving::Starting
        } else {
            Serving::Down
        }
    }

    /// The checks found `e` healthy again (or for the first time): the
    /// head of the queue may take it.
    pub fn endpoint_recovered(&self) {
        self.wake_head();
    }

    fn ask_for_check(&self) {
        if let Some(f) = self.on_unhealthy.load().as_ref() {
            f();
        }
    }

    /// Replaces the endpoint set, keeping the state of endpoints that stay.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let current = self.endpoints.load();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                current
                    .iter()
                    .find(|e| e.addr == *a)
                    .cloned()
                    .unwrap_or_else(|| {
                        let e = Endpoint::new(*a);
                        if self.is_health_checked() {
                            e.set_health(Health::Unknown);
                        }
                        e
                    })
            })
            .collect();
        self.endpoints.store(Arc::new(next));
        // New endpoints can take waiters: the head takes a slot and wakes
        // the next, each within the caps.
        self.wake_head();
    }

    /// Keeps the endpoint set equal to what `ready` says (a local cluster's
    /// or discovery's ready endpoints) until its sender is gone.
    pub fn follow(
        self: &Arc<Self>,
        mut ready: tokio::sync::watch::Receiver<Vec<SocketAddr>>,
    ) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                let addrs = ready.borrow_and_update().clone();
                pool.set_endpoints(&addrs);
                if ready.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Takes the pool out of service: every waiting request leaves with
    /// [`AdmitError::Closed`] (its route is gone); requests holding slots
    /// finish as they would.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for w in self.line().iter() {
            w.wake.notify_one();
        }
    }

    /// Sets what to call when a request waits on an empty pool.
    pub fn on_empty(&self, f: Arc<dyn Fn() + Send + Sync>) {
        self.on_empty.store(Arc::new(Some(f)));
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// A slot now, if one is free and nobody waits for one (first come,
    /// first served: a new arrival never takes a slot freed for the queue).
    pub fn try_admit(self: &Arc<Self>, tokens: u64, among: Among<'_>) -> Option<Lease> {
        if self.queued.load(Ordering::SeqCst) > 0 {
            return None;
        }
        self.take_slot(tokens, among)
    }

    /// Whether any endpoint of the pool is one `among` allows (healthy or
    /// not): a gateway's subset naming none of them can never be served.
    pub fn has_any(&self, among: Among<'_>) -> bool {
        self.endpoints.load().iter().any(|e| among.allows(e.addr))
    }

    /// The least outstanding work (prompt tokens not yet prefilled, then
    /// tokens in flight) of the available endpoints under their cap that
    /// `among` allows (a retry goes elsewhere; a gateway's subset hint
    /// narrows the pick); see [`least_loaded`]. Takes the slot atomically:
    /// an endpoint that reached its cap since it was read is passed over
    /// at the next look (at most one look per endpoint).
    fn take_slot(self: &Arc<Self>, tokens: u64, among: Among<'_>) -> Option<Lease> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        let now = std::cell::OnceCell::new();
        let now = || *now.get_or_init(|| self.now_ms());
        let cap = self.max_concurrency.unwrap_or(u32::MAX);
        let work = |i: usize| {
            let e = endpoints.get(i)?;
            let eligible = e.available(now)
                && among.allows(e.addr)
                && e.outstanding.load(Ordering::SeqCst) < cap;
            eligible.then(|| {
                (
                    e.prefill_tokens.load(Ordering::Relaxed),
                    e.outstanding_tokens.load(Ordering::Relaxed),
                )
            })
        };
        let k = self.next_pick();
        for _ in 0..n {
            let e = endpoints.get(least_loaded(n, k, work)?)?;
            // Take the slot only if still under the cap.
            let taken = e
                .outstanding
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                    (o < cap).then_some(o + 1)
                })
                .is_ok();
            if taken {
                e.outstanding_tokens.fetch_add(tokens, Ordering::Relaxed);
                e.prefill_tokens.fetch_add(tokens, Ordering::Relaxed);
                return Some(Lease {
                    pool: self.clone(),
                    endpoint: e.clone(),
                    tokens,
                    unprefilled: tokens,
                    phase: None,
                });
            }
        }
        None
    }

    /// Admits a request: a slot at once, or a wait in the bounded queue
    /// until it is the head of the line and a slot frees, or `deadline`
    /// passes. The waiter is in the line before it looks, so a freed slot
    /// is never missed (see `Lease::drop`).
    pub async fn admit(
        self: &Arc<Self>,
        tokens: u64,
        among: Among<'_>,
        deadline: Duration,
    ) -> Result<Lease, AdmitError> {
        self.admit_holding(tokens, 0, among, deadline).await
    }

    /// [`Pool::admit`] for a request that holds `bytes` of body while it
    /// waits: it queues only while the queued bodies stay within the
    /// pool's bound (else 429, as a full queue).
    pub async fn admit_holding(
        self: &Arc<Self>,
        tokens: u64,
        bytes: usize,
        among: Among<'_>,
        deadline: Duration,
    ) -> Result<Lease, AdmitError> {
        if let Some(l) = self.try_admit(tokens, among) {
            return Ok(l);
        }
        match self.serving() {
            Serving::Ready | Serving::Empty => {}
            Serving::Starting => self.ask_for_check(),
            Serving::Down => {
                // Waiting would only hold a queue slot until the deadline;
                // the re-check lets the next request in once one is back.
                self.ask_for_check();
                return Err(AdmitError::NoHealthyEndpoint { queued: false });
            }
        }
        // Queue, within the bound.
        let admitted = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < self.queue_length).then_some(q + 1)
            })
            .is_ok();
        if !admitted {
            return Err(AdmitError::QueueFull);
        }
        let limit = self.queue_bytes.load(Ordering::Relaxed);
        let within = self
            .queued_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                b.checked_add(bytes).filter(|n| *n <= limit)
            })
            .is_ok();
        if !within {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(AdmitError::QueueFull);
        }
        self.signals.queue_enter();
        let waiter = Arc::new(Waiter::default());
        self.line().push_back(waiter.clone());
        let _queued = Queued {
            pool: self,
            waiter: waiter.clone(),
            since: Instant::now(),
            bytes,
        };
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = waiter.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.closed.load(Ordering::SeqCst) {
                return Err(AdmitError::Closed);
            }
            let head = self.line().front().is_some_and(|w| Arc::ptr_eq(w, &waiter));
            if head && let Some(l) = self.take_slot(tokens, among) {
                return Ok(l);
            }
            match self.serving() {
                Serving::Empty => {
                    if let Some(f) = self.on_empty.load().as_ref() {
                        f();
                    }
                }
                Serving::Down => return Err(AdmitError::NoHealthyEndpoint { queued: true }),
                Serving::Ready | Serving::Starting => {}
            }
            // Ejections expire without a notification: look again soon.
            let recheck = tokio::time::Instant::now() + Duration::from_millis(250);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(recheck.min(until)) => {}
            }
            if tokio::time::Instant::now() >= until {
                let head = self.line().front().is_some_and(|w| Arc::ptr_eq(w, &waiter));
                return head
                    .then(|| self.take_slot(tokens, among))
                    .flatten()
                    .ok_or(AdmitError::Timeout);
            }
        }
    }
}

/// Which endpoints of a pool a request may take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Among<'a> {
    #[default]
    All,
    /// Any but this one: a retry after a failed connect goes elsewhere.
    AllBut(SocketAddr),
    /// Only these: the subset a gateway allows (Envoy's
    /// `x-gateway-destination-endpoint-subset`).
    Only(&'a [SocketAddr]),
}

impl Among<'_> {
    pub fn allows(self, addr: SocketAddr) -> bool {
        match self {
            Among::All => true,
            Among::AllBut(a) => a != addr,
            Among::Only(set) => set.contains(&addr),
        }
    }
}

thread_local! {
    /// This thread's slot in every pool's pick rotations.
    static PICK_SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % PICK_SLOTS
    };
}

/// A per-process seed, so rotations do not all start at endpoint 0.
fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8)
}

impl Pool {
    fn next_pick(&self) -> u64 {
        let slot = PICK_SLOT.with(|s| *s);
        self.picks
            .get(slot)
            .map_or(0, |c| c.0.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scalecar_scaler::clock::MonotonicClock;
    use scalecar_scaler::signals::SignalsConfig;

    fn pool(n: usize, cap: Option<u32>, queue: usize) -> Arc<Pool> {
        let addrs = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)))
            .collect();
        let signals = Arc::new(PoolSignals::new(
            SignalsConfig::default(),
            Arc::new(MonotonicClock::new()),
        ));
        Pool::new("m".into(), Role::Unified, addrs, signals, cap, queue)
    }

    #[tokio::test]
    async fn least_outstanding_work_spreads_load() {
        let p = pool(4, None, 10);
        let mut leases = Vec::new();
        for _ in 0..8 {
            leases.push(
                p.admit(100, Among::All, Duration::from_secs(1))
                    .await
                    .unwrap(),
            );
        }
        for e in p.endpoints().iter() {
            let o = e.outstanding.load(Ordering::Relaxed);
            assert!((1..=3).contains(&o), "{} has {o}", e.addr);
        }
        drop(leases);
        assert!(
            p.endpoints()
                .iter()
                .all(|e| e.outstanding.load(Ordering::Relaxed) == 0)
        );
        assert!(
            p.endpoints()
                .iter()
                .all(|e| e.outstanding_tokens.load(Ordering::Relaxed) == 0)
        );
    }

    #[tokio::test]
    async fn prompts_go_where_no_prefill_waits_rather_than_where_fewer_tokens_are() {
        let p = pool(2, None, 10);
        let share = |p: &Arc<Pool>, addr: SocketAddr| {
            let mut picked = 0;
            for _ in 0..200 {
                let l = p.try_admit(1_000, Among::All).unwrap();
                picked += u32::from(l.endpoint.addr == addr);
                // The picked endpoint's prefill work rises by the prompt
                // while it is leased, and falls with the lease.
                assert!(l.endpoint.prefill_tokens.load(Ordering::Relaxed) >= 1_000);
            }
            f64::from(picked) / 200.0
        };
        let eps = p.endpoints();
        let (x, y) = (eps[0].clone(), eps[1].clone());
        // x prefills a 50k-token prompt; y decodes sequences holding 100k.
        let mut long = p.try_admit(50_000, Among::AllBut(y.addr)).unwrap();
        let mut decoding = p.try_admit(100_000, Among::AllBut(x.addr)).unwrap();
        decoding.prefilling();
        decoding.first_token();
        assert_eq!(y.prefill_tokens.load(Ordering::Relaxed), 0);
        assert_eq!(x.prefill_tokens.load(Ordering::Relaxed), 50_000);
        let to_y = share(&p, y.addr);
        assert_eq!(
            to_y, 1.0,
            "prompts that went to the endpoint without prefill"
        );
        // Its first token: x only decodes now, and holds fewer tokens.
        long.prefilling();
        long.first_token();
        long.first_token();
        assert_eq!(x.prefill_tokens.load(Ordering::Relaxed), 0);
        let to_x = share(&p, x.addr);
        assert_eq!(to_x, 1.0, "prompts that went to the lighter endpoint");
        drop((long, decoding));
        // A request dropped before its first token gives its prompt back.
        let cancelled = p.try_admit(7_000, Among::All).unwrap();
        drop(cancelled);
        for e in eps.iter() {
            assert_eq!(e.prefill_tokens.load(Ordering::Relaxed), 0, "{}", e.addr);
            assert_eq!(
                e.outstanding_tokens.load(Ordering::Relaxed),
                0,
                "{}",
                e.addr
            );
            assert_eq!(e.outstanding.load(Ordering::Relaxed), 0, "{}", e.addr);
        }
    }

    #[tokio::test]
    async fn queued_bodies_stay_within_the_pools_byte_bound() {
        // One slot, a queue of ten, at most 1,000 body bytes queued.
        let p = pool(1, Some(1), 10);
        p.set_queue_bytes(1000);
        let first = p
            .admit(0, Among::All, Duration::from_secs(1))
            .await
            .unwrap();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move {
                p.admit_holding(0, 600, Among::All, Duration::from_secs(5))
                    .await
                    .is_ok()
            })
        };
        while p.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(p.queued_bytes(), 600);
        // 600 + 500 would pass the bound: refused at once, as a full queue,
        // though the queue has room for nine more.
        assert_eq!(
            p.admit_holding(0, 500, Among::All, Duration::from_secs(1))
                .await
                .unwrap_err(),
            AdmitError::QueueFull
        );
        assert_eq!((p.queued(), p.queued_bytes()), (1, 600));
        // 400 fits; it waits behind the first and gives up at its deadline,
        // returning its bytes.
        assert_eq!(
            p.admit_holding(0, 400, Among::All, Duration::from_millis(50))
                .await
                .unwrap_err(),
            AdmitError::Timeout
        );
        assert_eq!(p.queued_bytes(), 600);
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!((p.queued(), p.queued_bytes()), (0, 0));
    }

    #[tokio::test]
    async fn the_cap_queues_and_a_freed_slot_admits() {
        let p = pool(1, Some(1), 1);
        let first = p
            .admit(0, Among::All, Duration::from_secs(1))
            .await
            .unwrap();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move {
                p.admit(0, Among::All, Duration::from_secs(5))
                    .await
                    .map(|l| l.endpoint.addr)
            })
        };
        while p.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // The queue (length 1) is full now.
        assert_eq!(
            p.admit(0, Among::All, Duration::from_secs(1))
                .await
                .unwrap_err(),
            AdmitError::QueueFull
        );
        assert_eq!(p.signals.queued(), 1);
        drop(first);
        assert!(waiter.await.unwrap().is_ok());
        assert_eq!(p.queued(), 0);
        assert_eq!(p.signals.queued(), 0);
    }

    #[tokio::test]
    async fn the_deadline_expires() {
        let p = pool(1, Some(1), 4);
        let _held = p
            .admit(0, Among::All, Duration::from_secs(1))
            .await
            .unwrap();
        let e = p
            .admit(0, Among::All, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e, AdmitError::Timeout);
        assert_eq!(p.queued(), 0);
    }

    #[tokio::test]
    async fn an_empty_pool_pokes_and_new_endpoints_admit() {
        let p = pool(0, Some(1), 8);
        let poked = Arc::new(AtomicU32::new(0));
        let counter = poked.clone();
        p.on_empty(Arc::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    p.admit(0, Among::All, Duration::from_secs(5))
                        .await
                        .map(|l| (l.endpoint.addr, l))
                })
            })
            .collect();
        while p.queued() < 3 {
            tokio::task::yield_now().await;
        }
        assert!(poked.load(Ordering::Relaxed) >= 1);
        // Three endpoints with cap 1 arrive: the three waiters spread over them.
        p.set_endpoints(&[
            SocketAddr::from(([127, 0, 0, 1], 1)),
            SocketAddr::from(([127, 0, 0, 1], 2)),
            SocketAddr::from(([127, 0, 0, 1], 3)),
        ]);
        let mut addrs = Vec::new();
        let mut leases = Vec::new();
        for w in waiters {
            let (a, l) = w.await.unwrap().unwrap();
            addrs.push(a);
            leases.push(l);
        }
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 3);
    }

    #[tokio::test]
    async fn the_queue_is_first_come_first_served() {
        let p = pool(1, Some(1), 8);
        let held = p
            .admit(0, Among::All, Duration::from_secs(1))
            .await
            .unwrap();
        let first = {
            let p = p.clone();
            tokio::spawn(
                async move { p.admit(0, Among::All, Duration::from_secs(5)).await.is_ok() },
            )
        };
        while p.queued() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        // The freed slot is the waiter's: a new arrival does not take it.
        assert!(p.try_admit(0, Among::All).is_none());
        assert!(first.await.unwrap());
        assert_eq!(p.queued(), 0);
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let p = pool(1, Some(1), 8);
        let held = p
            .admit(0, Among::All, Duration::from_secs(1))
            .await
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (q, order) = (p.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let l = q
                    .admit(0, Among::All, Duration::from_secs(5))
                    .await
                    .unwrap();
                order.lock().unwrap().push(i);
                tokio::task::yield_now().await;
                drop(l);
            }));
            while p.queued() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn ejection_counts_a_burst_once_and_keeps_half_the_pool() {
        let p = pool(4, None, 4);
        let eps = p.endpoints();
        // Five requests in flight on endpoint 0 fail together: one ejection
        // (250 ms), not a backoff doubled five times.
        for _ in 0..5 {
            p.record_failure(&eps[0]);
        }
        assert!(eps[0].is_ejected(p.now_ms()));
        assert_eq!(eps[0].consecutive_failures.load(Ordering::Relaxed), 1);
        // 50 % of 4: a second endpoint may go, a third may not.
        p.record_failure(&eps[1]);
        p.record_failure(&eps[2]);
        let now = p.now_ms();
        assert!(eps[1].is_ejected(now));
        assert!(!eps[2].is_ejected(now));
        // Never the last endpoint, even at 100 %.
        let one = pool(1, None, 4);
        one.set_max_ejection_percent(100);
        let e = one.endpoints();
        one.record_failure(&e[0]);
        assert!(!e[0].is_ejected(one.now_ms()));
    }

    #[tokio::test]
    async fn ejected_and_avoided_endpoints_are_skipped() {
        let p = pool(2, None, 4);
        let eps = p.endpoints();
        p.record_failure(&eps[0]);
        for _ in 0..4 {
            let l = p
                .admit(0, Among::All, Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(l.endpoint.addr, eps[1].addr);
        }
        let p = pool(2, None, 4);
        let eps = p.endpoints();
        let l = p
            .admit(0, Among::AllBut(eps[0].addr), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(l.endpoint.addr, eps[1].addr);
    }
}
