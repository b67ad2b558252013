//! Accepting connections when accepting fails.
//!
//! An accept fails mostly when the process is out of file descriptors
//! (`EMFILE`): every connection in flight holds one, so a burst of clients
//! can reach the limit. The listener must not end then — connections close
//! and descriptors come back — but retrying every few milliseconds and
//! logging each failure turned one overload into a log flood (a warning
//! every 10 ms per listener in `scalecar demo --trace flash-crowd.jsonl
//! --speedup 30`) and a busy loop.
//!
//! A connection reset before it was accepted is one client's, not the
//! listener's: it is skipped at once, neither counted nor logged above
//! debug. For the rest, each listener backs off (10 ms doubling to 500 ms,
//! back to 10 ms after the next accepted connection), logs its first
//! failure at once and then at most one line per [`REPORT_EVERY`] with the
//! number of failures since the line before, and counts every failure in
//! `scalecar_accept_failures_total{listener}` — the number to alert on
//! (`ScalecarAcceptFailures`).

use std::io;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{Listener, ProxyMetrics};

/// The wait after a first failed accept, and the longest wait.
const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_millis(500);
/// At most one log line per listener this often after its first failure.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// What to log about a failed or a recovered accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// A failure, logged: `earlier` failures since the line before went
    /// unlogged.
    Failed { earlier: u64 },
    /// Accepting again after failures, `unlogged` of them not reported yet.
    Recovered { unlogged: u64 },
}

/// One listener's failed accepts: the backoff and the log's rate limit.
/// Pure (time is given), so its rules are tested without descriptors to
/// exhaust.
#[derive(Debug, Default)]
pub struct AcceptFailures {
    /// Failures since the last accepted connection: the backoff's exponent.
    streak: u32,
    /// Failures since the last log line.
    unlogged: u64,
    /// When the last line was logged.
    logged: Option<Instant>,
}

impl AcceptFailures {
    /// An accept failed at `now`: how long to wait before the next, and
    /// whether to log it.
    pub fn failed(&mut self, now: Instant) -> (Duration, Option<Report>) {
        self.streak = self.streak.saturating_add(1);
        let doublings = (self.streak - 1).min(16);
        let delay = FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY);
        let report = if self.due(now) {
            let earlier = std::mem::take(&mut self.unlogged);
            self.logged = Some(now);
            Some(Report::Failed { earlier })
        } else {
            self.unlogged += 1;
            None
        };
        (delay, report)
    }

    /// A connection was accepted at `now`: the backoff starts over, and
    /// failures not logged yet are reported once a line is due (a listener
    /// that alternates between failing and accepting, as one does at the
    /// descriptor limit, still logs at most one line per period).
    pub fn accepted(&mut self, now: Instant) -> Option<Report> {
        self.streak = 0;
        (self.unlogged > 0 && self.due(now)).then(|| {
            self.logged = Some(now);
            Report::Recovered {
                unlogged: std::mem::take(&mut self.unlogged),
            }
        })
    }

    fn due(&self, now: Instant) -> bool {
        self.logged
            .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_EVERY)
    }
}

/// Accepts connections on a listener until told to stop, surviving failed
/// accepts (see the module's note).
#[derive(Debug)]
pub struct Acceptor<'a> {
    listener: &'a TcpListener,
    stop: &'a mut watch::Receiver<bool>,
    /// Which listener, in logs and the metric's label.
    what: &'static str,
    failures_total: Counter,
    failures: AcceptFailures,
}

impl<'a> Acceptor<'a> {
    /// `which` names the listener in logs and in the failure counter of
    /// `metrics` (resolved here, once).
    pub fn new(
        listener: &'a TcpListener,
        stop: &'a mut watch::Receiver<bool>,
        which: Listener,
        metrics: &ProxyMetrics,
    ) -> Self {
        Acceptor {
            listener,
            stop,
            what: which.name(),
            failures_total: metrics.accept_failures(which),
            failures: AcceptFailures::default(),
        }
    }

    /// The next connection (TCP_NODELAY set), or `None` once `stop` turns
    /// true.
    pub async fn next(&mut self) -> Option<TcpStream> {
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = self.stop.wait_for(|s| *s) => return None,
            };
            match accepted {
                Ok((stream, _)) => {
                    if let Some(Report::Recovered { unlogged }) =
                        self.failures.accepted(Instant::now())
                    {
                        tracing::info!(
                            listener = self.what,
                            unlogged,
                            "accepting connections again"
                        );
                    }
                    let _ = stream.set_nodelay(true);
                    return Some(stream);
                }
                // One client's connection gone before it was accepted
                // (reset during the handshake): nothing is wrong with the
                // listener, and the next accept is due at once.
                Err(e) if of_one_connection(&e) => {
                    tracing::debug!(listener = self.what, error = %e, "a connection ended before it was accepted");
                }
                Err(e) => {
                    self.failures_total.inc();
                    let (delay, report) = self.failures.failed(Instant::now());
                    if let Some(Report::Failed { earlier }) = report {
                        tracing::warn!(
                            listener = self.what,
                            error = %e,
                            earlier,
                            retry_in = ?delay,
                            "accept failed (out of file descriptors?); retrying, and logging again at most every {}s",
                            REPORT_EVERY.as_secs()
                        );
                    }
                    // A stop while backing off is not missed.
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.wait_for(|s| *s) => return None,
                    }
                }
            }
        }
    }
}

/// Whether a failed accept concerns one client's connection rather than
/// the listener (the process's descriptors, memory).
fn of_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_reset_before_accept_is_not_a_listener_failure() {
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
        ] {
            assert!(of_one_connection(&io::Error::from(kind)));
        }
        // EMFILE, ENFILE, ENOMEM, ENOBUFS: the listener's, retried after a
        // backoff and counted.
        for errno in [24, 23, 12, 105] {
            assert!(!of_one_connection(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[test]
    fn the_wait_doubles_to_its_cap_and_starts_over_after_an_accept() {
        let t0 = Instant::now();
        let mut f = AcceptFailures::default();
        let waits: Vec<u64> = (0..9).map(|_| f.failed(t0).0.as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 500, 500, 500]);
        f.accepted(t0);
        assert_eq!(f.failed(t0).0, FIRST_DELAY);
        // However many failures in a row, the wait stays at the cap.
        let last = (0..100_000).map(|_| f.failed(t0).0).last();
        assert_eq!(last, Some(MAX_DELAY));
    }

    #[test]
    fn the_first_failure_is_logged_then_one_line_a_period_with_the_count() {
        let t0 = Instant::now();
        let mut f = AcceptFailures::default();
        assert_eq!(f.failed(t0).1, Some(Report::Failed { earlier: 0 }));
        let mut logged = 0;
        // 10 ms apart for 25 s: the first line, and one at 10 s and 20 s.
        let mut counted = 0;
        for i in 1..2500u64 {
            if let Some(Report::Failed { earlier }) = f.failed(t0 + Duration::from_millis(10 * i)).1
            {
                logged += 1;
                counted += earlier;
            }
        }
        assert_eq!(logged, 2);
        // Every failure but the ones logged is counted in some line, or
        // still waiting for the next.
        assert_eq!(counted + f.unlogged + 3, 2500);
    }

    #[test]
    fn failing_and_accepting_in_turn_still_logs_once_a_period() {
        let t0 = Instant::now();
        let mut f = AcceptFailures::default();
        let mut lines = 0;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(5 * i);
            if f.failed(now).1.is_some() {
                lines += 1;
            }
            if f.accepted(now + Duration::from_millis(1)).is_some() {
                lines += 1;
            }
        }
        // 5 s of alternating: the first failure only.
        assert_eq!(lines, 1);
        // Past the period, the next accept reports what went unlogged.
        let later = t0 + REPORT_EVERY + Duration::from_secs(1);
        assert_eq!(f.accepted(later), Some(Report::Recovered { unlogged: 999 }));
        assert_eq!(f.accepted(later), None);
    }
}
