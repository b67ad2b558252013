//! Injectable time: the signals and the control loop read time only through
//! [`Clock`], so tests and `scalecar replay` run on virtual time.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic clock.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since this clock's epoch.
    fn now(&self) -> Duration;
}

/// The process's monotonic clock, from its creation.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            start: Instant::now(),
        }
    }

    /// The `Instant` this clock counts from (to convert request timestamps).
    pub fn start(&self) -> Instant {
        self.start
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A clock moved by hand (tests, replay). It never goes back: `set` to an
/// earlier time is ignored, because every consumer assumes monotonic time.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Duration) -> Self {
        ManualClock {
            nanos: AtomicU64::new(start.as_nanos() as u64),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(by.as_nanos() as u64, Ordering::AcqRel);
    }

    pub fn set(&self, to: Duration) {
        self.nanos.fetch_max(to.as_nanos() as u64, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_forward_only() {
        let c = ManualClock::new(Duration::from_secs(5));
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now(), Duration::from_millis(6500));
        c.set(Duration::from_secs(1));
        assert_eq!(c.now(), Duration::from_millis(6500));
        c.set(Duration::from_secs(10));
        assert_eq!(c.now(), Duration::from_secs(10));
    }

    #[test]
    fn monotonic_clock_advances() {
        let c = MonotonicClock::new();
        let a = c.now();
        assert!(c.now() >= a);
    }
}
