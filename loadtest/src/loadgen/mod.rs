//! loadgen: open-loop load against an OpenAI-compatible endpoint, from a
//! synthetic pattern or a real trace, measured by the client itself.
//!
//! Open loop means each request leaves at its planned time whether or not
//! earlier ones finished; the only brake is `max_outstanding`, past which a
//! request is recorded as dropped rather than delayed (a delayed request
//! would silently change the load shape).

pub mod arrivals;
pub mod client;
pub mod report;
pub mod shapes;
pub mod trace;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use arrivals::{Arrival, ArrivalPattern, RateShape, RequestSize};
pub use client::{Outcome, RequestRecord, StreamingClient};
pub use report::{Summary, summarize, write_csv};
pub use shapes::Shape;
pub use trace::{Trace, TraceError, read_any_trace_file, read_jsonl_trace, read_trace};

/// Called once per finished request (for progress and live views).
pub type OnRecord = Arc<dyn Fn(&RequestRecord) + Send + Sync>;

/// Runs a plan to the end (or until `stop` resolves) and returns every
/// request's record in planned order, with the wall time the run took.
pub async fn run_plan(
    client: &StreamingClient,
    plan: &[Arrival],
    max_outstanding: usize,
    on_record: Option<OnRecord>,
    stop: impl std::future::Future<Output = ()>,
) -> (Vec<RequestRecord>, Duration) {
    let start = Instant::now();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut records = Vec::with_capacity(plan.len());
    tokio::pin!(stop);
    let mut stopped = false;
    for (index, arrival) in plan.iter().enumerate() {
        let deadline = tokio::time::Instant::from_std(start + arrival.at);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = &mut stop => { stopped = true; }
        }
        if stopped {
            break;
        }
        // Collect what finished meanwhile, so memory stays bounded.
        while let Some(done) = tasks.try_join_next() {
            if let Ok(pair) = done {
                records.push(pair);
            }
        }
        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
            let rec = dropped(arrival);
            if let Some(f) = &on_record {
                f(&rec);
            }
            records.push((index, rec));
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let client = client.clone();
        let arrival = *arrival;
        let outstanding = outstanding.clone();
        let on_record = on_record.clone();
        tasks.spawn(async move {
            let rec = client.send(&arrival).await;
            outstanding.fetch_sub(1, Ordering::Relaxed);
            if let Some(f) = &on_record {
                f(&rec);
            }
            (index, rec)
        });
    }
    if stopped {
        tasks.abort_all();
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(pair) = done {
            records.push(pair);
        }
    }
    records.sort_by_key(|(i, _)| *i);
    (
        records.into_iter().map(|(_, r)| r).collect(),
        start.elapsed(),
    )
}

fn dropped(a: &Arrival) -> RequestRecord {
    RequestRecord {
        at: a.at,
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        outcome: Outcome::Dropped,
        status: None,
        ttft: None,
        e2e: Duration::ZERO,
        tokens: 0,
        itl_sum: Duration::ZERO,
        itl_max: Duration::ZERO,
        usage_completion_tokens: None,
    }
}
