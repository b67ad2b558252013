//! The simulated cluster in virtual time: the trace's requests, the proxy's
//! admission queue and endpoint picking, and replicas running the model-sim
//! [`Engine`].
//!
//! Discrete events: an arrival, a replica's step ending, a replica becoming
//! ready. Between two events nothing changes, so an idle hour costs nothing
//! and a busy one costs one event per engine step. The proxy side follows
//! `Pool`: first come first served (a new arrival never overtakes the queue),
//! a bounded queue (full → rejected, 429), a queue deadline (→ 503), the
//! shared [`least_loaded`] pick by outstanding work, and the per-endpoint cap
//! `max-concurrency`. A removed replica drains: it takes nothing new and
//! stops costing once its last request is done.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use hdrhistogram::Histogram;
use scalecar_scaler::balance::least_loaded;
use scalecar_scaler::signals::histogram;

use super::requests::RequestTable;
use super::{Recorder, Settings};
use crate::loadgen::Arrival;
use crate::sim::engine::{Engine, EngineEvents, Ticket, TokenLatency};

/// A request as the engine holds it: its index in the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestId(pub u32);

impl Ticket for RequestId {}

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fate {
    /// Not finished yet.
    #[default]
    Pending,
    /// All its tokens.
    Done,
    /// The queue was full (429).
    Rejected,
    /// Its queue deadline passed (503).
    TimedOut,
    /// Larger than a replica's KV cache.
    TooLarge,
}

/// One request's progress and measurements (proxy-side: times from its
/// arrival at the proxy).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestState {
    pub ttft: Option<Duration>,
    pub e2e: Option<Duration>,
    pub generated: u32,
    pub fate: Fate,
    replica: u32,
}

#[derive(Debug, Clone)]
struct Replica {
    engine: Engine<RequestId>,
    created: Duration,
    ready_at: Duration,
    /// Removed: no new requests; gone once empty.
    draining: bool,
    gone: Option<Duration>,
    outstanding: u32,
    outstanding_tokens: u64,
    /// Prompt tokens of the outstanding requests before their first token:
    /// the prefill work a new prompt would queue behind.
    prefill_tokens: u64,
    /// Of the outstanding requests, those before their first token and
    /// those decoding (the proxy's busy counts per endpoint).
    prefilling: u32,
    decoding: u32,
    /// A step is in progress (its end is in the event queue).
    stepping: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A replica's step ends (replica index).
    StepEnd(u32),
    /// A replica finished its cold start.
    Ready(u32),
}

/// The world at one instant; `Clone` so the oracle can try futures.
#[derive(Debug, Clone)]
pub(crate) struct World<'t, R> {
    trace: &'t [Arrival],
    settings: &'t Settings,
    recorder: R,
    now: Duration,
    /// The next arrival to happen.
    next: usize,
    replicas: Vec<Replica>,
    /// Ready, not draining: where requests go (indices into `replicas`).
    endpoints: Vec<u32>,
    /// Waiting at the proxy, first come first served.
    queue: VecDeque<u32>,
    events: BinaryHeap<Reverse<(Duration, u64, Event)>>,
    /// Orders events of one instant by when they were scheduled.
    sequence: u64,
    rotation: u64,
    pub requests: RequestTable,
    /// Inter-token latencies, in the signals' histogram layout.
    /// (`None` where the recorder does not measure: the oracle's trials,
    /// which clone the world often.)
    pub itl: Option<Histogram<u64>>,
    /// Requests finished with all their tokens or failed.
    pub settled: usize,
    /// TTFTs since the caller last took them (for a timeline).
    pub recent_ttfts: Vec<Duration>,
}

impl<'t, R: Recorder> World<'t, R> {
    /// `initial` replicas, ready at time zero.
    pub fn new(trace: &'t [Arrival], settings: &'t Settings, recorder: R, initial: u32) -> Self {
        let measures = recorder.measures();
        let mut w = World {
            trace,
            settings,
            recorder,
            now: Duration::ZERO,
            next: 0,
            replicas: Vec::new(),
            endpoints: Vec::new(),
            queue: VecDeque::new(),
            events: BinaryHeap::new(),
            sequence: 0,
            rotation: 0,
            requests: RequestTable::new(trace.len()),
            itl: measures.then(histogram::empty),
            settled: 0,
            recent_ttfts: Vec::new(),
        };
        for _ in 0..initial {
            w.add_replica(Duration::ZERO, Duration::ZERO);
        }
        w.refresh_endpoints();
        w
    }

    pub fn now(&self) -> Duration {
        self.now
    }

    /// Replicas that exist and are not draining (what `spec.replicas` asks
    /// for once the scale is applied).
    pub fn replicas(&self) -> u32 {
        self.replicas
            .iter()
            .filter(|r| !r.draining && r.gone.is_none())
            .count() as u32
    }

    /// Replicas serving.
    pub fn ready(&self) -> u32 {
        self.endpoints.len() as u32
    }

    /// Requests that have arrived so far.
    pub fn arrived(&self) -> usize {
        self.next
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn in_flight(&self) -> u32 {
        self.replicas.iter().map(|r| r.outstanding).sum()
    }

    /// Every request has arrived and settled.
    pub fn finished(&self) -> bool {
        self.next >= self.trace.len() && self.settled >= self.trace.len()
    }

    /// Replica-seconds spent in `[from, until]`: every replica from its
    /// creation (its cold start holds the GPU too) until it is gone.
    pub fn replica_seconds(&self, from: Duration, until: Duration) -> f64 {
        self.replicas
            .iter()
            .map(|r| {
                let end = r.gone.unwrap_or(until).min(until);
                end.saturating_sub(r.created.max(from)).as_secs_f64()
            })
            .sum()
    }

    /// The most replicas that existed at once in `[from, until]`.
    pub fn peak_replicas(&self, from: Duration, until: Duration) -> u32 {
        let mut edges: Vec<(Duration, i32)> = Vec::new();
        for r in &self.replicas {
            if r.created > until || r.gone.is_some_and(|g| g <= from) {
                continue;
            }
            edges.push((r.created.max(from), 1));
            if let Some(g) = r.gone {
                edges.push((g, -1));
            }
        }
        // A replica gone at t and one created at t are not both counted.
        edges.sort_by_key(|&(t, d)| (t, d));
        let (mut now, mut peak) = (0i32, 0i32);
        for (_, d) in edges {
            now += d;
            peak = peak.max(now);
        }
        peak.max(0) as u32
    }

    fn add_replica(&mut self, created: Duration, ready_at: Duration) {
        let index = self.replicas.len() as u32;
        self.replicas.push(Replica {
            engine: Engine::new(self.settings.timing.clone()),
            created,
            ready_at,
            draining: false,
            gone: None,
            outstanding: 0,
            outstanding_tokens: 0,
            prefill_tokens: 0,
            prefilling: 0,
            decoding: 0,
            stepping: false,
        });
        if ready_at > self.now {
            self.schedule(ready_at, Event::Ready(index));
        }
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        self.sequence += 1;
        self.events.push(Reverse((at, self.sequence, event)));
    }

    fn refresh_endpoints(&mut self) {
        let now = self.now;
        self.endpoints = (0..self.replicas.len() as u32)
            .filter(|&i| {
                self.replicas
                    .get(i as usize)
                    .is_some_and(|r| !r.draining && r.gone.is_none() && r.ready_at <= now)
            })
            .collect();
    }

    /// Sets the replica count at `now`. New replicas start cold and are
    /// ready after the startup delay, or (`ahead`, as the oracle asks) were
    /// asked for a cold start ago and are ready now; either way they cost
    /// from the start of their cold start. Removed ones are the starting
    /// ones first (newest first), then the ready ones with the least
    /// outstanding work, which drain.
    pub fn set_replicas(&mut self, want: u32, ahead: bool) {
        let have = self.replicas();
        let startup = self.settings.startup_delay;
        if want > have {
            for _ in have..want {
                if ahead {
                    self.add_replica(self.now.saturating_sub(startup), self.now);
                } else {
                    self.add_replica(self.now, self.now + startup);
                }
            }
        } else {
            let mut surplus = have - want;
            let now = self.now;
            // Starting replicas first, newest first: they serve nothing yet.
            for i in (0..self.replicas.len()).rev() {
                if surplus == 0 {
                    break;
                }
                if let Some(r) = self.replicas.get_mut(i)
                    && !r.draining
                    && r.gone.is_none()
                    && r.ready_at > now
                {
                    r.draining = true;
                    r.gone = Some(now);
                    surplus -= 1;
                }
            }
            while surplus > 0 {
                let lightest = self
                    .endpoints
                    .iter()
                    .copied()
                    .filter(|&i| self.replicas.get(i as usize).is_some_and(|r| !r.draining))
                    .min_by_key(|&i| {
                        self.replicas
                            .get(i as usize)
                            .map_or((u64::MAX, u32::MAX), |r| {
                                (r.outstanding_tokens, r.outstanding)
                            })
                    });
                let Some(i) = lightest else { break };
                if let Some(r) = self.replicas.get_mut(i as usize) {
                    r.draining = true;
                    if r.outstanding == 0 && r.engine.is_idle() {
                        r.gone = Some(now);
                    }
                }
                surplus -= 1;
            }
        }
        self.refresh_endpoints();
        self.pump();
    }

    /// Processes every event up to and including `until`, then sets the
    /// clock to `until`.
    pub fn run_until(&mut self, until: Duration) {
        loop {
            let arrival = self.trace.get(self.next).map(|a| a.at);
            let event = self.events.peek().map(|Reverse((t, _, _))| *t);
            // Events of an instant go before its arrivals: a slot freed at t
            // is free for a request arriving at t.
            let take_event = match (event, arrival) {
                (Some(e), Some(a)) => e <= a,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let at = if take_event { event } else { arrival };
            let Some(at) = at.filter(|t| *t <= until) else {
                break;
            };
            self.now = self.now.max(at);
            self.recorder.set_now(self.now);
            self.expire();
            if take_event {
                if let Some(Reverse((_, _, e))) = self.events.pop() {
                    self.handle(e);
                }
            } else {
                let index = self.next;
                self.next += 1;
                self.arrive(index);
            }
        }
        self.now = self.now.max(until);
        self.recorder.set_now(self.now);
        self.expire();
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Ready(i) => {
                if let Some(r) = self.replicas.get(i as usize) {
                    self.recorder
                        .replica_ready(r.ready_at.saturating_sub(r.created));
                }
                self.refresh_endpoints();
                if self.endpoints.contains(&i) {
                    self.pump();
                }
            }
            Event::StepEnd(i) => self.end_step(i),
        }
    }

    fn arrive(&mut self, index: usize) {
        let Some(a) = self.trace.get(index) else {
            return;
        };
        self.recorder.arrival(u64::from(a.prompt_tokens));
        if self.queue.is_empty()
            && let Some(r) = self.slot()
        {
            self.dispatch(index as u32, r);
            return;
        }
        if self.queue.len() >= self.settings.queue_length {
            self.fail(index as u32, Fate::Rejected);
            return;
        }
        self.recorder.queue_enter();
        self.queue.push_back(index as u32);
    }

    /// A free slot by the proxy's rule, or none.
    fn slot(&mut self) -> Option<u32> {
        let cap = self.settings.max_concurrency.unwrap_or(u32::MAX);
        let n = self.endpoints.len();
        let k = self.rotation;
        self.rotation = self.rotation.wrapping_add(1);
        let (replicas, endpoints) = (&self.replicas, &self.endpoints);
        let work = |i: usize| {
            let r = replicas.get(*endpoints.get(i)? as usize)?;
            (r.outstanding < cap).then_some((r.prefill_tokens, r.outstanding_tokens))
        };
        let i = least_loaded(n, k, work)?;
        endpoints.get(i).copied()
    }

    /// Gives queued requests the free slots, head first.
    fn pump(&mut self) {
        while let Some(&front) = self.queue.front() {
            let Some(r) = self.slot() else { break };
            self.queue.pop_front();
            let waited = self
                .trace
                .get(front as usize)
                .map_or(Duration::ZERO, |a| self.now.saturating_sub(a.at));
            self.recorder.queue_leave(waited);
            self.dispatch(front, r);
        }
    }

    /// Fails queued requests whose deadline passed (the head first: the
    /// queue is in arrival order and every request has the same deadline).
    fn expire(&mut self) {
        while let Some(&front) = self.queue.front() {
            let at = self
                .trace
                .get(front as usize)
                .map_or(Duration::ZERO, |a| a.at);
            if self.now.saturating_sub(at) <= self.settings.queue_wait {
                break;
            }
            self.queue.pop_front();
            self.recorder.queue_leave(self.now.saturating_sub(at));
            self.fail(front, Fate::TimedOut);
        }
    }

    fn fail(&mut self, index: u32, fate: Fate) {
        if let Some(s) = self.requests.get_mut(index as usize) {
            s.fate = fate;
        }
        self.settled += 1;
    }

    fn dispatch(&mut self, index: u32, replica: u32) {
        let Some(a) = self.trace.get(index as usize) else {
            return;
        };
        self.recorder.dispatch(u64::from(a.prompt_tokens));
        if let Some(s) = self.requests.get_mut(index as usize) {
            s.replica = replica;
        }
        let now = self.now;
        let Some(r) = self.replicas.get_mut(replica as usize) else {
            return;
        };
        r.outstanding += 1;
        r.outstanding_tokens += u64::from(a.prompt_tokens);
        r.prefill_tokens += u64::from(a.prompt_tokens);
        r.prefilling += 1;
        if r.prefilling == 1 {
            self.recorder.prefill_busy(true);
        }
        r.engine
            .submit(RequestId(index), a.prompt_tokens, a.max_tokens, false, now);
        if !r.stepping {
            self.begin_step(replica);
        }
    }

    /// Runs `f` on a replica's engine with the events applied to the
    /// requests and the recorder, then settles the replica's outstanding
    /// counts; returns what `f` returned and how many requests left.
    fn with_engine<T>(
        &mut self,
        replica: u32,
        f: impl FnOnce(&mut Engine<RequestId>, Duration, &mut Sink<'_, R>) -> T,
    ) -> Option<(T, u32)> {
        let now = self.now;
        let mut sink = Sink {
            now,
            trace: self.trace,
            requests: &mut self.requests,
            recorder: &mut self.recorder,
            itl: &mut self.itl,
            settled: &mut self.settled,
            recent_ttfts: &mut self.recent_ttfts,
            freed: 0,
            freed_tokens: 0,
            added_tokens: 0,
            first_tokens: 0,
            freed_prefilling: 0,
            freed_decoding: 0,
            prefilled_tokens: 0,
        };
        let r = self.replicas.get_mut(replica as usize)?;
        let out = f(&mut r.engine, now, &mut sink);
        r.outstanding -= sink.freed.min(r.outstanding);
        r.outstanding_tokens =
            (r.outstanding_tokens + sink.added_tokens).saturating_sub(sink.freed_tokens);
        r.prefill_tokens = r.prefill_tokens.saturating_sub(sink.prefilled_tokens);
        // Every change of this step happened at one instant: only whether
        // the endpoint was and is busy matters to the signals.
        let (prefilling, decoding) = (r.prefilling, r.decoding);
        r.prefilling = r
            .prefilling
            .saturating_sub(sink.first_tokens + sink.freed_prefilling);
        r.decoding = (r.decoding + sink.first_tokens).saturating_sub(sink.freed_decoding);
        let recorder = sink.recorder;
        if (prefilling > 0) != (r.prefilling > 0) {
            recorder.prefill_busy(r.prefilling > 0);
        }
        if (decoding > 0) != (r.decoding > 0) {
            recorder.decode_busy(r.decoding > 0);
        }
        Some((out, sink.freed))
    }

    fn begin_step(&mut self, replica: u32) {
        let Some((step, freed)) =
            self.with_engine(replica, |engine, now, sink| engine.begin_step(now, sink))
        else {
            return;
        };
        let now = self.now;
        let Some(r) = self.replicas.get_mut(replica as usize) else {
            return;
        };
        match step {
            Some(d) => {
                r.stepping = true;
                // Never a zero-length step: virtual time must move.
                let end = now + d.max(Duration::from_nanos(1));
                self.schedule(end, Event::StepEnd(replica));
            }
            None => {
                r.stepping = false;
                if r.draining && r.outstanding == 0 && r.gone.is_none() {
                    r.gone = Some(now);
                }
            }
        }
        if freed > 0 {
            self.pump();
        }
    }

    fn end_step(&mut self, replica: u32) {
        let Some(((), freed)) =
            self.with_engine(replica, |engine, now, sink| engine.end_step(now, sink))
        else {
            return;
        };
        // The next step begins at once (as the engine task loops); freed
        // slots are offered to the queue first, so what they admit joins it.
        if freed > 0 {
            self.pump();
        }
        self.begin_step(replica);
    }
}

/// Engine events applied to the requests and the recorder.
struct Sink<'a, R> {
    now: Duration,
    trace: &'a [Arrival],
    requests: &'a mut RequestTable,
    recorder: &'a mut R,
    itl: &'a mut Option<Histogram<u64>>,
    settled: &'a mut usize,
    recent_ttfts: &'a mut Vec<Duration>,
    /// Slots freed this step and their outstanding tokens; tokens generated.
    freed: u32,
    freed_tokens: u64,
    added_tokens: u64,
    /// Requests that got their first token, and finished requests that
    /// had (not) got one.
    first_tokens: u32,
    freed_prefilling: u32,
    freed_decoding: u32,
    /// Prompt tokens of the requests that left prefill (a first token, or
    /// finished without one).
    prefilled_tokens: u64,
}

impl<R: Recorder> EngineEvents<RequestId> for Sink<'_, R> {
    fn admitted(&mut self, _: &RequestId, _: Duration) {}

    fn prefilled(&mut self, _: u32) {}

    fn token(&mut self, id: &RequestId, generated: u32, latency: TokenLatency) {
        let Some(a) = self.trace.get(id.0 as usize) else {
            return;
        };
        let Some(s) = self.requests.get_mut(id.0 as usize) else {
            return;
        };
        match latency {
            TokenLatency::FirstToken(_) => {
                // The proxy measures from the request's arrival at the
                // proxy: its queue time is part of its TTFT.
                let ttft = self.now.saturating_sub(a.at);
                s.ttft = Some(ttft);
                self.first_tokens += 1;
                self.prefilled_tokens += u64::from(a.prompt_tokens);
                self.recent_ttfts.push(ttft);
                self.recorder.first_token(u64::from(a.prompt_tokens), ttft);
            }
            TokenLatency::InterToken(itl) => {
                self.recorder.inter_token(itl);
                if let Some(h) = self.itl.as_mut() {
                    let _ = h.record(histogram::units_of(itl).max(1));
                }
            }
        }
        self.recorder.decode_tokens(1);
        s.generated = generated;
        // The proxy's lease grows with every token (Lease::add_tokens).
        self.added_tokens += 1;
    }

    fn finished(&mut self, id: &RequestId, e2e: Option<Duration>) {
        let Some(a) = self.trace.get(id.0 as usize) else {
            return;
        };
        let Some(s) = self.requests.get_mut(id.0 as usize) else {
            return;
        };
        let proxy_e2e = e2e.map(|_| self.now.saturating_sub(a.at));
        self.recorder.complete(
            u64::from(a.prompt_tokens),
            u64::from(s.generated),
            s.ttft.is_some(),
            proxy_e2e,
        );
        s.e2e = proxy_e2e;
        s.fate = if e2e.is_some() {
            Fate::Done
        } else {
            Fate::TooLarge
        };
        *self.settled += 1;
        self.freed += 1;
        if s.ttft.is_some() {
            self.freed_decoding += 1;
        } else {
            self.freed_prefilling += 1;
            self.prefilled_tokens += u64::from(a.prompt_tokens);
        }
        self.freed_tokens += u64::from(a.prompt_tokens) + u64::from(s.generated);
    }
}
