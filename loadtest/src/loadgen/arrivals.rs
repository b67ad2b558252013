//! Open-loop arrival schedules: when each request is sent, whatever the
//! server does. A closed loop (send the next when one finishes) would slow
//! down exactly when the server struggles and hide the burst a scaler must
//! see.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One planned request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// Offset from the start of the run.
    pub at: Duration,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
}

/// Request rate over time, in requests per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateShape {
    /// `constant:R`
    Constant { rps: f64 },
    /// `step:A,B@T`: A until T, then B.
    Step {
        before: f64,
        after: f64,
        at: Duration,
    },
    /// `burst:BASE,PEAK@START+LEN`: PEAK during [START, START+LEN), BASE otherwise.
    Burst {
        base: f64,
        peak: f64,
        start: Duration,
        length: Duration,
    },
    /// `sine:MEAN,AMPLITUDE/PERIOD`: MEAN + AMPLITUDE·sin(2πt/PERIOD), never below 0.
    Sinusoid {
        mean: f64,
        amplitude: f64,
        period: Duration,
    },
}

impl RateShape {
    /// The rate at offset `t`.
    pub fn rate_at(&self, t: Duration) -> f64 {
        match *self {
            RateShape::Constant { rps } => rps,
            RateShape::Step { before, after, at } => {
                if t < at {
                    before
                } else {
                    after
                }
            }
            RateShape::Burst {
                base,
                peak,
                start,
                length,
            } => {
                if t >= start && t < start + length {
                    peak
                } else {
                    base
                }
            }
            RateShape::Sinusoid {
                mean,
                amplitude,
                period,
            } => {
                let phase = t.as_secs_f64() / period.as_secs_f64() * std::f64::consts::TAU;
                (mean + amplitude * phase.sin()).max(0.0)
            }
        }
    }

    /// An upper bound of the rate, for thinning.
    fn peak(&self) -> f64 {
        match *self {
            RateShape::Constant { rps } => rps,
            RateShape::Step { before, after, .. } => before.max(after),
            RateShape::Burst { base, peak, .. } => base.max(peak),
            RateShape::Sinusoid {
                mean, amplitude, ..
            } => mean + amplitude.abs(),
        }
    }
}

/// A rate shape and how arrivals fall within it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArrivalPattern {
    pub shape: RateShape,
    /// Poisson arrivals (exponential gaps) rather than evenly spaced ones.
    pub poisson: bool,
}

/// Why a pattern did not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "pattern {input:?}: {reason} (expected one of constant:R, poisson:R, step:A,B@T, burst:BASE,PEAK@START+LEN, sine:MEAN,AMP/PERIOD; rates in req/s, times like 30s)"
)]
pub struct PatternError {
    pub input: String,
    pub reason: String,
}

fn rate(s: &str, input: &str) -> Result<f64, PatternError> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(PatternError {
            input: input.into(),
            reason: format!("{s:?} is not a rate ≥ 0"),
        }),
    }
}

fn duration(s: &str, input: &str) -> Result<Duration, PatternError> {
    humantime::parse_duration(s.trim()).map_err(|e| PatternError {
        input: input.into(),
        reason: format!("{s:?} is not a duration: {e}"),
    })
}

fn split2<'a>(
    s: &'a str,
    sep: char,
    input: &str,
    what: &str,
) -> Result<(&'a str, &'a str), PatternError> {
    s.split_once(sep).ok_or_else(|| PatternError {
        input: input.into(),
        reason: format!("missing {what}"),
    })
}

impl std::str::FromStr for ArrivalPattern {
    type Err = PatternError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (kind, args) = split2(input, ':', input, "':' after the pattern name")?;
        let shape = match kind.trim() {
            "constant" | "poisson" => RateShape::Constant {
                rps: rate(args, input)?,
            },
            "step" => {
                let (rates, at) = split2(args, '@', input, "'@T' (when the step happens)")?;
                let (a, b) = split2(rates, ',', input, "two rates 'A,B'")?;
                RateShape::Step {
                    before: rate(a, input)?,
                    after: rate(b, input)?,
                    at: duration(at, input)?,
                }
            }
            "burst" => {
                let (rates, when) = split2(args, '@', input, "'@START+LEN'")?;
                let (base, peak) = split2(rates, ',', input, "two rates 'BASE,PEAK'")?;
                let (start, length) = split2(when, '+', input, "'START+LEN'")?;
                RateShape::Burst {
                    base: rate(base, input)?,
                    peak: rate(peak, input)?,
                    start: duration(start, input)?,
                    length: duration(length, input)?,
                }
            }
            "sine" => {
                let (rates, period) = split2(args, '/', input, "'/PERIOD'")?;
                let (mean, amplitude) = split2(rates, ',', input, "'MEAN,AMP'")?;
                let period = duration(period, input)?;
                if period.is_zero() {
                    return Err(PatternError {
                        input: input.into(),
                        reason: "period must be > 0".into(),
                    });
                }
                RateShape::Sinusoid {
                    mean: rate(mean, input)?,
                    amplitude: rate(amplitude, input)?,
                    period,
                }
            }
            other => {
                return Err(PatternError {
                    input: input.into(),
                    reason: format!("unknown pattern {other:?}"),
                });
            }
        };
        Ok(ArrivalPattern {
            shape,
            poisson: kind.trim() == "poisson",
        })
    }
}

/// Request sizes for synthetic patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSize {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
}

impl ArrivalPattern {
    /// Plans the arrivals of a run of `length`. Evenly spaced arrivals put
    /// the k-th request where the integral of the rate reaches k; Poisson
    /// ones thin a homogeneous process at the peak rate (Lewis–Shedler), so
    /// both follow the shape exactly on average. Deterministic for a seed.
    pub fn plan(&self, length: Duration, size: RequestSize, seed: u64) -> Vec<Arrival> {
        let mut out = Vec::new();
        let arrival = |at| Arrival {
            at,
            prompt_tokens: size.prompt_tokens,
            max_tokens: size.max_tokens,
        };
        if self.poisson {
            let peak = self.shape.peak();
            if peak <= 0.0 {
                return out;
            }
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut t = 0.0f64;
            loop {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                t += -u.ln() / peak;
                if t >= length.as_secs_f64() {
                    break;
                }
                let at = Duration::from_secs_f64(t);
                if rng.random::<f64>() * peak <= self.shape.rate_at(at) {
                    out.push(arrival(at));
                }
            }
        } else {
            // Integrate the rate in 1 ms steps: the k-th request (from 0)
            // leaves in the step where the area passes k. Exact for the
            // piecewise shapes, within 1 ms for the sinusoid.
            const STEP_NS: u64 = 1_000_000;
            let steps = (length.as_nanos() / u128::from(STEP_NS)) as u64;
            let mut area = 0.0f64;
            let mut next = 0.0f64;
            for i in 0..steps {
                let t = Duration::from_nanos(i * STEP_NS);
                let after = area + self.shape.rate_at(t) * 1e-3;
                // The tolerance keeps float drift from adding a request at
                // the very end of a run.
                while next < after - 1e-9 {
                    out.push(arrival(t));
                    next += 1.0;
                }
                area = after;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: RequestSize = RequestSize {
        prompt_tokens: 100,
        max_tokens: 10,
    };

    #[test]
    fn parses_every_pattern() {
        let p: ArrivalPattern = "constant:5".parse().unwrap();
        assert_eq!(
            p,
            ArrivalPattern {
                shape: RateShape::Constant { rps: 5.0 },
                poisson: false
            }
        );
        let p: ArrivalPattern = "poisson:2.5".parse().unwrap();
        assert!(p.poisson);
        let p: ArrivalPattern = "step:1,10@30s".parse().unwrap();
        assert_eq!(
            p.shape,
            RateShape::Step {
                before: 1.0,
                after: 10.0,
                at: Duration::from_secs(30)
            }
        );
        let p: ArrivalPattern = "burst:2,40@20s+30s".parse().unwrap();
        assert_eq!(
            p.shape,
            RateShape::Burst {
                base: 2.0,
                peak: 40.0,
                start: Duration::from_secs(20),
                length: Duration::from_secs(30)
            }
        );
        let p: ArrivalPattern = "sine:10,8/60s".parse().unwrap();
        assert!(matches!(p.shape, RateShape::Sinusoid { .. }));
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        for (input, needle) in [
            ("constant", "':'"),
            ("constant:-1", "not a rate"),
            ("step:1@3s", "two rates"),
            ("burst:1,2@3s", "START+LEN"),
            ("sine:1,2/0s", "period"),
            ("zigzag:1", "unknown pattern"),
            ("step:1,2@soon", "not a duration"),
        ] {
            let err = input.parse::<ArrivalPattern>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn constant_rate_is_evenly_spaced() {
        let p: ArrivalPattern = "constant:10".parse().unwrap();
        let a = p.plan(Duration::from_secs(3), SIZE, 1);
        assert_eq!(a.len(), 30);
        let gap = a[11].at - a[10].at;
        assert!((gap.as_secs_f64() - 0.1).abs() < 0.002, "{gap:?}");
    }

    #[test]
    fn burst_concentrates_arrivals_in_its_window() {
        let p: ArrivalPattern = "burst:1,20@10s+5s".parse().unwrap();
        let a = p.plan(Duration::from_secs(30), SIZE, 1);
        let inside = a
            .iter()
            .filter(|x| x.at >= Duration::from_secs(10) && x.at < Duration::from_secs(15))
            .count();
        assert_eq!(inside, 100);
        assert_eq!(a.len(), 125);
    }

    #[test]
    fn poisson_matches_its_rate_and_is_reproducible() {
        let p: ArrivalPattern = "poisson:50".parse().unwrap();
        let a = p.plan(Duration::from_secs(100), SIZE, 7);
        let b = p.plan(Duration::from_secs(100), SIZE, 7);
        assert_eq!(a, b);
        // 5000 expected, sd ≈ 71.
        assert!((4700..5300).contains(&a.len()), "{}", a.len());
        let c = p.plan(Duration::from_secs(100), SIZE, 8);
        assert_ne!(a, c);
    }

    #[test]
    fn sinusoid_follows_its_shape() {
        let p: ArrivalPattern = "sine:10,10/20s".parse().unwrap();
        let a = p.plan(Duration::from_secs(20), SIZE, 1);
        // First half (sin > 0) carries ~ 10·10 + 10·20/π ≈ 163.7, second ~ 36.3.
        let first = a.iter().filter(|x| x.at < Duration::from_secs(10)).count();
        assert!((160..=167).contains(&first), "{first}");
        assert!((197..=201).contains(&a.len()), "{}", a.len());
    }
}
