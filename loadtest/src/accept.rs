//! Retrying a listener's failed accepts, for model-sim and kube-sim.
//!
//! An accept fails mostly when the process is out of file descriptors:
//! the listener must live on (connections close, descriptors come back),
//! but retrying every few milliseconds and warning each time floods the
//! log of the process the stand-ins run in (the demo, a load test). So:
//! back off from 10 ms doubling to 1 s, warn on the first failure of a
//! run of them, and say once, with the count, when accepting works again.
//! (The proxy's own listeners count and rate-limit theirs for alerting;
//! these are test stand-ins and only need to stay quiet and alive.)

use std::time::Duration;

const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// One listener's current run of failed accepts.
#[derive(Debug, Default)]
pub struct AcceptRetry {
    failures: u32,
}

impl AcceptRetry {
    /// An accept failed: how long to wait before the next. The first of a
    /// run is logged as a warning naming `server`.
    pub fn failed(&mut self, server: &str, error: &std::io::Error) -> Duration {
        if self.failures == 0 {
            tracing::warn!(server, %error, "accept failed; retrying quietly until it works again");
        }
        self.failures = self.failures.saturating_add(1);
        Self::delay(self.failures)
    }

    /// A connection was accepted: a run of failures, if any, ends here.
    pub fn accepted(&mut self, server: &str) {
        if self.failures > 0 {
            tracing::info!(
                server,
                failures = self.failures,
                "accepting connections again"
            );
            self.failures = 0;
        }
    }

    /// The wait after the `n`th failure in a row (n ≥ 1).
    fn delay(n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(16);
        FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_to_a_second_and_starts_over_after_an_accept() {
        let mut retry = AcceptRetry::default();
        let error = std::io::Error::from_raw_os_error(24);
        let waits: Vec<_> = (0..9).map(|_| retry.failed("test", &error)).collect();
        assert_eq!(waits[0], Duration::from_millis(10));
        assert_eq!(waits[1], Duration::from_millis(20));
        assert_eq!(waits[6], Duration::from_millis(640));
        assert_eq!(waits[7], Duration::from_secs(1));
        assert_eq!(waits[8], Duration::from_secs(1));
        assert_eq!(retry.failures, 9);
        retry.accepted("test");
        assert_eq!(retry.failures, 0);
        assert_eq!(retry.failed("test", &error), Duration::from_millis(10));
        // Thousands in a row neither overflow nor wait longer.
        for _ in 0..100_000 {
            assert!(retry.failed("test", &error) <= MAX_DELAY);
        }
    }
}
