//! A replica's capacity, measured: the prompt tokens one replica prefills
//! per second while it has prefill work (see
//! [`WindowValues::prefill_rate`](crate::snapshot::WindowValues::prefill_rate)),
//! smoothed over time.
//!
//! The measurement is what a busy replica got through, whatever the mix of
//! decoding, KV pressure and prompt sizes made of it, so a backlog cannot
//! pull it below the engine's real rate: queued work only keeps the
//! replica busy, and the rate is tokens done over that busy time (except
//! while prompts wait for KV cache rather than prefill: the slo controller
//! does not feed it while the replicas' caches are full). It moves
//! toward each new measurement with a time constant (faster up than down),
//! each measurement weighing no more than the span it was read over — after
//! a gap (an idle pool, caches full) one short window's reading is one short
//! window's evidence, not the sum of the time nothing was measured — stays
//! inside bounds around the prior so that no run of bad samples can run it
//! away, and holds when there is nothing to measure (an idle pool teaches
//! nothing about its replicas).

use std::time::Duration;

/// How fast the estimate follows a higher measurement.
const RISE: Duration = Duration::from_secs(10);
/// How fast it follows a lower one: a slower engine is learned within a
/// minute (three time constants leave 5 % of the gap).
const FALL: Duration = Duration::from_secs(20);
/// The estimate stays within the prior divided or multiplied by this.
const BOUND: f64 = 50.0;

/// The smoothed, bounded measured rate of one pool's replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityEstimate {
    value: f64,
    prior: f64,
    /// Clock time of the last measurement taken.
    last: Option<Duration>,
    measurements: u64,
}

impl CapacityEstimate {
    /// Starts at `prior` (per replica, > 0).
    pub fn new(prior: f64) -> Self {
        let prior = if prior.is_finite() && prior > 0.0 {
            prior
        } else {
            1.0
        };
        CapacityEstimate {
            value: prior,
            prior,
            last: None,
            measurements: 0,
        }
    }

    /// The current estimate, per replica.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Whether anything was measured yet (else the value is the prior).
    pub fn measured(&self) -> bool {
        self.measurements > 0
    }

    /// Takes a measurement at `now`, read over the last `span` (`None`:
    /// nothing to measure on; the estimate holds). The first measurement
    /// replaces the prior; each later one weighs the time since the last,
    /// but never more than its own span: 38 s of caches full, then one 6 s
    /// window still partly waiting for KV, took the long-context bursts'
    /// estimate from 15,400 to 8,300 prompt tok/s in one step, and the
    /// need that asked for was held for 15 minutes.
    pub fn observe(&mut self, now: Duration, rate: Option<f64>, span: Duration) {
        let Some(rate) = rate.filter(|r| r.is_finite() && *r > 0.0) else {
            return;
        };
        let rate = rate.clamp(self.prior / BOUND, self.prior * BOUND);
        let elapsed = self.last.map_or(Duration::MAX, |l| now.saturating_sub(l));
        self.last = Some(now);
        self.measurements += 1;
        if self.measurements == 1 {
            self.value = rate;
            return;
        }
        let tau = if rate > self.value { RISE } else { FALL };
        let evidence = elapsed.min(span);
        let weight = 1.0 - (-evidence.as_secs_f64() / tau.as_secs_f64()).exp();
        self.value += (rate - self.value) * weight;
    }
}

/// A [`CapacityEstimate`] as remembered for a successor (see
/// [`crate::memory`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CapacityMemory {
    value: f64,
    prior: f64,
    measurements: u64,
    /// Seconds before the save of the last measurement.
    last_age: Option<f64>,
}

impl CapacityEstimate {
    /// What a successor needs to go on, as of `now`.
    pub fn remember(&self, now: Duration) -> CapacityMemory {
        CapacityMemory {
            value: self.value,
            prior: self.prior,
            measurements: self.measurements,
            last_age: self.last.map(|t| crate::memory::age_of(now, t)),
        }
    }

    /// The estimate `m` remembered, its ages turned into clock times by
    /// `at`; `Err` names what is out of bounds.
    pub fn recalled(
        m: &CapacityMemory,
        at: &impl Fn(f64) -> Option<Duration>,
    ) -> Result<CapacityEstimate, String> {
        let good = |x: f64| x.is_finite() && x > 0.0;
        if !good(m.prior) || !good(m.value) {
            return Err(format!(
                "capacity {} (prior {}) is not a rate",
                m.value, m.prior
            ));
        }
        if m.value < m.prior / BOUND * 0.999 || m.value > m.prior * BOUND * 1.001 {
            return Err(format!(
                "capacity {} is outside the bounds around its prior {}",
                m.value, m.prior
            ));
        }
        let last = match m.last_age {
            Some(age) => Some(at(age).ok_or_else(|| format!("capacity age {age} is not an age"))?),
            None => None,
        };
        Ok(CapacityEstimate {
            value: m.value,
            prior: m.prior,
            last,
            measurements: m.measurements,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic window's span, over which the readings below are taken.
    const PANIC: Duration = Duration::from_secs(6);

    fn every_2s(e: &mut CapacityEstimate, from: u64, to: u64, rate: Option<f64>) {
        for t in (from..to).step_by(2) {
            e.observe(Duration::from_secs(t), rate, PANIC);
        }
    }

    #[test]
    fn starts_at_the_prior_and_the_first_measurement_replaces_it() {
        let mut e = CapacityEstimate::new(4000.0);
        assert_eq!(e.value(), 4000.0);
        assert!(!e.measured());
        e.observe(Duration::ZERO, None, PANIC);
        assert_eq!(e.value(), 4000.0);
        e.observe(Duration::ZERO, Some(5600.0), PANIC);
        assert_eq!(e.value(), 5600.0);
        assert!(e.measured());
    }

    #[test]
    fn a_slower_engine_is_learned_within_a_minute() {
        let mut e = CapacityEstimate::new(4000.0);
        every_2s(&mut e, 0, 60, Some(10_000.0));
        assert!((e.value() - 10_000.0).abs() < 1.0, "{}", e.value());
        // The engine is replaced by one at half the rate.
        every_2s(&mut e, 60, 120, Some(5_000.0));
        let left = (e.value() - 5_000.0) / 5_000.0;
        assert!(left < 0.06, "{} after a minute", e.value());
        // Idle afterwards: nothing measured, nothing forgotten.
        every_2s(&mut e, 120, 3600, None);
        assert!((e.value() - 5_000.0).abs() < 300.0, "{}", e.value());
    }

    #[test]
    fn a_reading_after_a_gap_weighs_only_its_own_window() {
        let mut e = CapacityEstimate::new(4000.0);
        every_2s(&mut e, 0, 120, Some(16_000.0));
        // 42 s with nothing measured (caches full), then one 6 s window
        // at half the rate: 6 s of evidence, not 42 s.
        e.observe(Duration::from_secs(160), Some(8_000.0), PANIC);
        let kept = 16_000.0 - 8_000.0 * (1.0 - (-6.0_f64 / 20.0).exp());
        assert!((e.value() - kept).abs() < 1.0, "{}", e.value());
        // A stable window's reading over a minute weighs its minute.
        let mut e = CapacityEstimate::new(4000.0);
        every_2s(&mut e, 0, 120, Some(16_000.0));
        e.observe(
            Duration::from_secs(300),
            Some(8_000.0),
            Duration::from_secs(60),
        );
        assert!(e.value() < 8_500.0, "{}", e.value());
    }

    #[test]
    fn bounds_hold_against_absurd_measurements() {
        let mut e = CapacityEstimate::new(1000.0);
        every_2s(&mut e, 0, 600, Some(1e-3));
        assert!((e.value() - 20.0).abs() < 1e-6, "{}", e.value());
        every_2s(&mut e, 600, 1200, Some(1e12));
        assert!((e.value() - 50_000.0).abs() < 1e-6, "{}", e.value());
        e.observe(Duration::from_secs(1300), Some(f64::NAN), PANIC);
        assert!(e.value().is_finite());
        assert_eq!(CapacityEstimate::new(f64::NAN).value(), 1.0);
    }
}
