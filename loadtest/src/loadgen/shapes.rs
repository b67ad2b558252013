//! Seeded traffic shapes for scaling studies, beside the recorded traces:
//! each is a rate curve over time and a distribution of request sizes, and
//! the same name and seed always give the same arrivals.
//!
//! | shape | what | sizes | length |
//! |---|---|---|---|
//! | `long-context-bursts` | 1 req/s, with bursts of 4–8 req/s lasting 30–90 s every 2–6 min | prompts log-normal, median 7k, mean ≈ 12k, at most 120k tokens; outputs median 200 | 30 min |
//! | `diurnal` | one day: 0.9 req/s at 04:00 rising to 8.1 req/s at 16:00 (9 × between the quietest and the busiest hour), a smooth cosine | code-like prompts, median 1.5k, mean ≈ 2k; outputs median 25 | 24 h |
//! | `flash-crowd` | 2 req/s for 10 min, 12 req/s within 30 s, held 10 min, then decaying back (τ = 5 min) | chat-like prompts, median 800; outputs median 200 | 45 min |
//! | `slow-ramp` | 1 → 8 req/s linearly over 60 min, then 10 min at 8 | chat-like, as `flash-crowd` | 70 min |
//! | `long-context-steady` | 3.3 req/s ± 30 % in a 20-minute wave, no bursts: long-context conversations at a steady 40k prompt tok/s | as `long-context-bursts` | 60 min |
//!
//! Arrivals are Poisson around the curve (thinning at the curve's peak).
//! Lengths can be changed; the curve's own times (burst gaps, ramp, the
//! day) stay, so a shorter `diurnal` is the start of the day.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::Arrival;

/// A named traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    LongContextBursts,
    Diurnal,
    FlashCrowd,
    SlowRamp,
    LongContextSteady,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::LongContextBursts,
        Shape::Diurnal,
        Shape::FlashCrowd,
        Shape::SlowRamp,
        Shape::LongContextSteady,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::LongContextBursts => "long-context-bursts",
            Shape::Diurnal => "diurnal",
            Shape::FlashCrowd => "flash-crowd",
            Shape::SlowRamp => "slow-ramp",
            Shape::LongContextSteady => "long-context-steady",
        }
    }

    /// Mixed into the seed, so that two shapes with one seed do not share
    /// their random stream.
    fn salt(self) -> u64 {
        match self {
            Shape::LongContextBursts => 0x9e37_79b9_7f4a_7c15,
            Shape::Diurnal => 0xbf58_476d_1ce4_e5b9,
            Shape::FlashCrowd => 0x94d0_49bb_1331_11eb,
            Shape::SlowRamp => 0x2545_f491_4f6c_dd1d,
            Shape::LongContextSteady => 0xd6e8_feb8_6659_fd93,
        }
    }

    /// The shape's own length.
    pub fn default_length(self) -> Duration {
        Duration::from_secs(match self {
            Shape::LongContextBursts => 30 * 60,
            Shape::Diurnal => 24 * 3600,
            Shape::FlashCrowd => 45 * 60,
            Shape::SlowRamp => 70 * 60,
            Shape::LongContextSteady => 60 * 60,
        })
    }

    /// Request sizes: (prompt median, prompt σ of its log, prompt cap,
    /// output median, output σ).
    fn sizes(self) -> Sizes {
        match self {
            Shape::LongContextBursts | Shape::LongContextSteady => Sizes {
                prompt_median: 7000.0,
                prompt_sigma: 1.04,
                prompt_max: 120_000,
                output_median: 200.0,
                output_sigma: 0.8,
            },
            Shape::Diurnal => Sizes {
                prompt_median: 1500.0,
                prompt_sigma: 0.75,
                prompt_max: 16_000,
                output_median: 25.0,
                output_sigma: 0.9,
            },
            Shape::FlashCrowd | Shape::SlowRamp => Sizes {
                prompt_median: 800.0,
                prompt_sigma: 0.8,
                prompt_max: 8000,
                output_median: 200.0,
                output_sigma: 0.7,
            },
        }
    }

    /// Generates `length` of this shape (the shape's own length when
    /// `None`) from `seed`.
    pub fn generate(self, length: Option<Duration>, seed: u64) -> Vec<Arrival> {
        let length = length.unwrap_or(self.default_length());
        let mut rng = SmallRng::seed_from_u64(seed ^ self.salt());
        let curve = Curve::new(self, length, &mut rng);
        let sizes = self.sizes();
        let peak = curve.peak();
        let mut out = Vec::new();
        let mut t = 0.0f64;
        let end = length.as_secs_f64();
        if peak <= 0.0 {
            return out;
        }
        loop {
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() / peak;
            if t >= end {
                break;
            }
            if rng.random::<f64>() * peak > curve.rate(t) {
                continue;
            }
            let prompt = sizes.prompt(&mut rng);
            let output = sizes.output(&mut rng);
            out.push(Arrival {
                at: Duration::from_secs_f64(t),
                prompt_tokens: prompt,
                max_tokens: output,
            });
        }
        out
    }
}

impl std::str::FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Shape::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Shape::ALL.iter().map(|x| x.name()).collect();
                format!("{s:?} is not a traffic shape (one of {})", names.join(", "))
            })
    }
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    prompt_median: f64,
    prompt_sigma: f64,
    prompt_max: u32,
    output_median: f64,
    output_sigma: f64,
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn log_normal(rng: &mut SmallRng, median: f64, sigma: f64, max: u32) -> u32 {
    let x = median * (sigma * normal(rng)).exp();
    x.round().clamp(1.0, f64::from(max)) as u32
}

impl Sizes {
    fn prompt(&self, rng: &mut SmallRng) -> u32 {
        log_normal(rng, self.prompt_median, self.prompt_sigma, self.prompt_max)
    }

    fn output(&self, rng: &mut SmallRng) -> u32 {
        log_normal(rng, self.output_median, self.output_sigma, 4096)
    }
}

/// A shape's rate over time, requests per second.
#[derive(Debug, Clone)]
enum Curve {
    /// A base rate and bursts (start, length, rate), in seconds.
    Bursts {
        base: f64,
        bursts: Vec<(f64, f64, f64)>,
    },
    Diurnal {
        low: f64,
        high: f64,
    },
    Flash {
        base: f64,
        crowd: f64,
    },
    Ramp {
        from: f64,
        to: f64,
        over: f64,
    },
    /// `mean` × (1 + `swing` · sin(2π t / `period`)).
    Wave {
        mean: f64,
        swing: f64,
        period: f64,
    },
}

impl Curve {
    fn new(shape: Shape, length: Duration, rng: &mut SmallRng) -> Curve {
        match shape {
            Shape::LongContextBursts => {
                let mut bursts = Vec::new();
                let mut t = rng.random_range(30.0..120.0);
                while t < length.as_secs_f64() {
                    let len = rng.random_range(30.0..90.0);
                    let rate = rng.random_range(4.0..8.0);
                    bursts.push((t, len, rate));
                    t += len + rng.random_range(120.0..360.0);
                }
                Curve::Bursts { base: 1.0, bursts }
            }
            Shape::Diurnal => Curve::Diurnal {
                low: 0.9,
                high: 8.1,
            },
            Shape::FlashCrowd => Curve::Flash {
                base: 2.0,
                crowd: 12.0,
            },
            Shape::SlowRamp => Curve::Ramp {
                from: 1.0,
                to: 8.0,
                over: 3600.0,
            },
            Shape::LongContextSteady => Curve::Wave {
                mean: 3.3,
                swing: 0.3,
                period: 1200.0,
            },
        }
    }

    fn rate(&self, t: f64) -> f64 {
        match self {
            Curve::Bursts { base, bursts } => bursts
                .iter()
                .find(|(start, len, _)| t >= *start && t < start + len)
                .map_or(*base, |(_, _, r)| *r),
            Curve::Diurnal { low, high } => {
                // Quietest at 04:00, busiest at 16:00.
                let hour = t / 3600.0;
                let phase = (hour - 4.0) / 24.0 * std::f64::consts::TAU;
                low + (high - low) * (1.0 - phase.cos()) / 2.0
            }
            Curve::Flash { base, crowd } => {
                let (rise, hold) = (600.0, 1200.0);
                if t < rise {
                    *base
                } else if t < rise + 30.0 {
                    base + (crowd - base) * (t - rise) / 30.0
                } else if t < hold + 30.0 {
                    *crowd
                } else {
                    base + (crowd - base) * (-(t - hold - 30.0) / 300.0).exp()
                }
            }
            Curve::Ramp { from, to, over } => from + (to - from) * (t / over).min(1.0),
            Curve::Wave {
                mean,
                swing,
                period,
            } => mean * (1.0 + swing * (std::f64::consts::TAU * t / period).sin()),
        }
    }

    fn peak(&self) -> f64 {
        match self {
            Curve::Bursts { base, bursts } => bursts.iter().map(|b| b.2).fold(*base, f64::max),
            Curve::Diurnal { high, .. } => *high,
            Curve::Flash { base, crowd } => base.max(*crowd),
            Curve::Ramp { from, to, .. } => from.max(*to),
            Curve::Wave { mean, swing, .. } => mean * (1.0 + swing.abs()),
        }
    }
}

/// Writes `arrivals` as a JSON-lines trace (`timestamp` ms, `input_length`,
/// `output_length`), the format `read_jsonl_trace` reads.
pub fn write_jsonl(arrivals: &[Arrival], mut out: impl std::io::Write) -> std::io::Result<()> {
    for a in arrivals {
        writeln!(
            out,
            "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": {}}}",
            a.at.as_millis(),
            a.prompt_tokens,
            a.max_tokens
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_between(a: &[Arrival], from: f64, to: f64) -> f64 {
        a.iter()
            .filter(|x| (from..to).contains(&x.at.as_secs_f64()))
            .count() as f64
            / (to - from)
    }

    #[test]
    fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
        for shape in Shape::ALL {
            let len = Some(Duration::from_secs(1800));
            let a = shape.generate(len, 7);
            assert_eq!(a, shape.generate(len, 7), "{}", shape.name());
            assert_ne!(a, shape.generate(len, 8), "{}", shape.name());
            assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
            assert!(a.iter().all(|x| x.at < Duration::from_secs(1800)));
        }
    }

    #[test]
    fn diurnal_is_nine_times_busier_at_its_peak_hour() {
        let a = Shape::Diurnal.generate(None, 1);
        let quiet = rate_between(&a, 3.5 * 3600.0, 4.5 * 3600.0);
        let busy = rate_between(&a, 15.5 * 3600.0, 16.5 * 3600.0);
        assert!((0.8..1.1).contains(&quiet), "{quiet}");
        assert!((7.6..8.6).contains(&busy), "{busy}");
        let mean = a.iter().map(|x| f64::from(x.prompt_tokens)).sum::<f64>() / a.len() as f64;
        assert!((1700.0..2300.0).contains(&mean), "{mean}");
    }

    #[test]
    fn long_context_bursts_have_long_prompts_and_bursts() {
        let a = Shape::LongContextBursts.generate(None, 1);
        let mut prompts: Vec<u32> = a.iter().map(|x| x.prompt_tokens).collect();
        prompts.sort_unstable();
        let median = prompts[prompts.len() / 2];
        let mean = prompts.iter().map(|&p| f64::from(p)).sum::<f64>() / prompts.len() as f64;
        assert!((6000..8000).contains(&median), "{median}");
        assert!((10_000.0..14_000.0).contains(&mean), "{mean}");
        assert!(prompts.iter().all(|&p| p <= 120_000));
        // Some 10 s stretch is at least four times the base rate.
        let busiest = (0..180)
            .map(|i| rate_between(&a, i as f64 * 10.0, i as f64 * 10.0 + 10.0))
            .fold(0.0, f64::max);
        assert!(busiest >= 4.0, "{busiest}");
    }

    #[test]
    fn long_context_steady_has_long_prompts_and_a_wave_but_no_bursts() {
        let a = Shape::LongContextSteady.generate(None, 1);
        let mean_rate = a.len() as f64 / 3600.0;
        assert!((3.0..3.6).contains(&mean_rate), "{mean_rate}");
        let mean = a.iter().map(|x| f64::from(x.prompt_tokens)).sum::<f64>() / a.len() as f64;
        assert!((10_000.0..14_000.0).contains(&mean), "{mean}");
        // The wave's crest (t = 300 s) against its trough (900 s): 1.3 / 0.7.
        let (crest, trough) = (
            rate_between(&a, 180.0, 420.0),
            rate_between(&a, 780.0, 1020.0),
        );
        assert!(crest > 1.4 * trough, "{crest} vs {trough}");
        // No 10 s stretch near twice the crest: nothing like a burst.
        let busiest = (0..360)
            .map(|i| rate_between(&a, i as f64 * 10.0, i as f64 * 10.0 + 10.0))
            .fold(0.0, f64::max);
        assert!(busiest < 9.0, "{busiest}");
    }

    #[test]
    fn flash_crowd_and_ramp_follow_their_curves() {
        let a = Shape::FlashCrowd.generate(None, 3);
        let before = rate_between(&a, 0.0, 600.0);
        let during = rate_between(&a, 700.0, 1200.0);
        let after = rate_between(&a, 2400.0, 2700.0);
        assert!((1.7..2.3).contains(&before), "{before}");
        assert!((11.0..13.0).contains(&during), "{during}");
        assert!(after < 3.5, "{after}");
        let r = Shape::SlowRamp.generate(None, 3);
        let early = rate_between(&r, 0.0, 600.0);
        let late = rate_between(&r, 3600.0, 4200.0);
        assert!((1.2..1.9).contains(&early), "{early}");
        assert!((7.3..8.7).contains(&late), "{late}");
    }

    #[test]
    fn a_written_trace_reads_back() {
        let a = Shape::SlowRamp.generate(Some(Duration::from_secs(120)), 5);
        let mut bytes = Vec::new();
        write_jsonl(&a, &mut bytes).unwrap();
        let back = super::super::read_jsonl_trace(&bytes[..], "mem", 1.0)
            .unwrap()
            .arrivals;
        assert_eq!(back.len(), a.len());
        let first = a[0].at.as_millis() as u64;
        for (x, y) in a.iter().zip(&back) {
            assert_eq!(
                (x.prompt_tokens, x.max_tokens.max(1)),
                (y.prompt_tokens, y.max_tokens)
            );
            let want = x.at.as_millis() as u64 - first;
            assert_eq!(y.at.as_millis() as u64, want);
        }
    }

    #[test]
    fn unknown_names_are_refused_with_the_list() {
        let e = "sawtooth".parse::<Shape>().unwrap_err();
        assert!(
            e.contains("long-context-bursts, diurnal, flash-crowd, slow-ramp, long-context-steady"),
            "{e}"
        );
    }
}
