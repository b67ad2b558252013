//! What latency teaches the plan: each stable window's verdict against the
//! goal, the error budget of the last hour, and the correction they move.
//!
//! The correction multiplies the measured capacity. Only misses that are
//! news lower it — the plan said the replicas were enough, all of them
//! served the whole window, and the hour has spent enough of its budget
//! that they are not chance — so a backlog's misses never collapse it. It
//! climbs back under served load, and above 1 only while the last hour —
//! seen whole — is underspent.

use std::time::Duration;

use super::super::{DecisionInput, show};
use super::Reading;

/// Fewer latency samples than this in a window teach nothing.
const MIN_SAMPLES: u64 = 5;
/// The share of the goal's allowed misses one window may have (and the
/// tail the queueing model plans for). At 0.5, conv ran at 99.6 % for
/// 1.13 × its cheapest constant count; at 0.8 at 1.10 ×, and the untuned
/// settings met the goal on 11 of 12 (10 at 0.5).
const GOAL_SHARE: f64 = 0.8;
/// The latency correction's floor, its step down and how often it may
/// step down.
const MIN_CORRECTION: f64 = 0.5;
const CORRECTION_STEP: f64 = 0.9;
const CORRECTION_EVERY: Duration = Duration::from_secs(15);
/// The correction's recovery per decision while the goal is met under
/// load, up to 1, or up to [`MAX_CORRECTION`] while the hour is
/// underspent.
const RECOVERY: f64 = 1.01;
/// How far above 1 the correction may climb, and the share of the goal's
/// allowed misses under which the last hour counts as underspent. Measured
/// on the 44-run set (docs/evaluation.md): without the gate a climb to 1.2
/// or 1.3 cost the long-context bursts 3–7 points and code 1; gated at 25 %
/// the diurnal day 0.75 ×, at 35 % 0.71 ×, at 50 % 0.71 × but code at 5 s
/// fell to 98.5 %. At 35 % nothing else moved but the ramp on the 8B
/// (1.14 → 1.05 ×) and the long-context bursts (1.018 → 1.006 ×), and
/// those two only while a budget of 500 requests counted as an hour: since
/// it needs the whole hour (see [`BUDGET_EVIDENCE`]) only the diurnal day,
/// of the traces here, runs long enough to use it.
const MAX_CORRECTION: f64 = 1.3;
/// Under this share of its allowed misses spent, the last hour is
/// underspent (see [`MAX_CORRECTION`]).
const UNDERSPENT: f64 = 0.35;
/// The error budget's memory.
const BUDGET_HORIZON: Duration = Duration::from_secs(3600);
/// The share of the allowed misses spent from which a window under the
/// goal is news.
const SPENDING: f64 = 0.5;
/// The share spent from which misses still in the stable window lower the
/// correction at every step; below it, only while new ones come (the
/// panic window has its own). At every step, one cluster lowered it four
/// times (1 → 0.66) and the level that asked for was held for minutes
/// after it was back at 1.
const REPEATING: f64 = 1.0;
/// Fewer feasible requests than this in the budget say nothing yet; nor
/// does a budget that has not yet seen a whole [`BUDGET_HORIZON`]. Until
/// then the gates above stay shut — every window under the goal is news,
/// the correction stays at or under 1 — as on a budget a backlog overspent.
/// A fresh budget is not an underspent hour (see the module's notes): on
/// the untuned settings started at their constant count, the hour's
/// evidence took the 70B's long-context runs at 2 s from 97.1 / 97.8 % to
/// 99.4 / 99.2 %; started from one replica, whose backlog overspends the
/// budget anyway, nothing moved.
const BUDGET_EVIDENCE: f64 = 500.0;

/// How many of the feasible requests of the recent past missed the
/// target, decayed over [`BUDGET_HORIZON`]: how much of the goal's error
/// budget is left to spend.
#[derive(Debug, Default)]
pub(super) struct ErrorBudget {
    eligible: f64,
    missed: f64,
    /// The first and the last observation.
    since: Option<Duration>,
    last: Option<Duration>,
}

impl ErrorBudget {
    /// Adds a stable window's counts (`eligible`, `met` over `window`) as
    /// seen `now`: each decision adds the share of the window new since
    /// the last one.
    fn observe(&mut self, now: Duration, window: Duration, eligible: u64, met: u64) {
        let dt = self
            .last
            .map_or(window, |t| now.saturating_sub(t))
            .min(window);
        self.last = Some(now);
        self.since.get_or_insert(now);
        let decay = (-dt.as_secs_f64() / BUDGET_HORIZON.as_secs_f64()).exp();
        let share = if window.is_zero() {
            0.0
        } else {
            dt.as_secs_f64() / window.as_secs_f64()
        };
        self.eligible = self.eligible * decay + eligible as f64 * share;
        self.missed = self.missed * decay + eligible.saturating_sub(met) as f64 * share;
    }

    /// The share of the allowed misses spent; `None` without evidence yet.
    pub(super) fn used(&self, allowed: f64) -> Option<f64> {
        let seen = match (self.since, self.last) {
            (Some(since), Some(last)) => last.saturating_sub(since),
            _ => Duration::ZERO,
        };
        (seen >= BUDGET_HORIZON && self.eligible >= BUDGET_EVIDENCE && allowed > 0.0)
            .then(|| self.missed / self.eligible / allowed)
    }
}

/// The budget as remembered: its decayed counts, and the hour of
/// evidence behind them as ages.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct BudgetMemory {
    eligible: f64,
    missed: f64,
    /// Seconds before the save of the first observation (only whether a
    /// whole hour was seen matters) and of the last.
    since_age: Option<f64>,
    last_age: Option<f64>,
}

impl ErrorBudget {
    pub(super) fn remember(&self, now: Duration) -> BudgetMemory {
        let age = |t: Duration| crate::memory::age_of(now, t);
        BudgetMemory {
            eligible: self.eligible,
            missed: self.missed,
            since_age: self.since.map(age),
            last_age: self.last.map(age),
        }
    }

    /// The budget `m` remembered, decayed over the `elapsed` seconds
    /// since it was saved (nobody observed them).
    pub(super) fn recalled(
        m: &BudgetMemory,
        elapsed: f64,
        at: &impl Fn(f64) -> Option<Duration>,
    ) -> Result<ErrorBudget, String> {
        let count = |x: f64| x.is_finite() && x >= 0.0;
        if !count(m.eligible) || !count(m.missed) || m.missed > m.eligible * 1.000_001 + 1e-9 {
            return Err(format!(
                "error budget {} missed of {} is not a count",
                m.missed, m.eligible
            ));
        }
        let time = |age: Option<f64>| match age {
            Some(a) => at(a)
                .map(Some)
                .ok_or_else(|| format!("error budget age {a} is not an age")),
            None => Ok(None),
        };
        let decay = (-elapsed.max(0.0) / BUDGET_HORIZON.as_secs_f64()).exp();
        Ok(ErrorBudget {
            eligible: m.eligible * decay,
            missed: m.missed * decay,
            since: time(m.since_age)?,
            last: time(m.last_age)?,
        })
    }
}

/// The correction as remembered.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct CorrectionMemory {
    value: f64,
    /// Seconds before the save of its last step down.
    lowered_age: Option<f64>,
}

impl Correction {
    pub(super) fn remember(&self, now: Duration) -> CorrectionMemory {
        CorrectionMemory {
            value: self.value,
            lowered_age: self.last_lowered.map(|t| crate::memory::age_of(now, t)),
        }
    }

    pub(super) fn recalled(
        m: &CorrectionMemory,
        at: &impl Fn(f64) -> Option<Duration>,
    ) -> Result<Correction, String> {
        if !(m.value.is_finite() && (MIN_CORRECTION..=MAX_CORRECTION).contains(&m.value)) {
            return Err(format!(
                "correction {} is outside [{MIN_CORRECTION}, {MAX_CORRECTION}]",
                m.value
            ));
        }
        let last_lowered = match m.lowered_age {
            Some(a) => Some(at(a).ok_or_else(|| format!("correction age {a} is not an age"))?),
            None => None,
        };
        Ok(Correction {
            value: m.value,
            last_lowered,
        })
    }
}

/// The latency correction: a factor on the measured capacity, between
/// [`MIN_CORRECTION`] and [`MAX_CORRECTION`].
#[derive(Debug)]
pub(super) struct Correction {
    value: f64,
    last_lowered: Option<Duration>,
}

impl Correction {
    pub(super) fn new() -> Self {
        Correction {
            value: 1.0,
            last_lowered: None,
        }
    }

    pub(super) fn value(&self) -> f64 {
        self.value
    }

    /// Moves the correction on one latency observation: `news` (misses
    /// the plan should have prevented) lowers it; anything else served
    /// under load (`busy`) brings it back — including a window whose misses
    /// are old or by chance: its latest seconds were served in time — up
    /// to `ceiling`, and never leaves it above `ceiling`.
    pub(super) fn correct(
        &mut self,
        now: Duration,
        news: bool,
        within_plan: bool,
        busy: bool,
        ceiling: f64,
    ) {
        if news {
            let due = self
                .last_lowered
                .is_none_or(|t| now.saturating_sub(t) >= CORRECTION_EVERY);
            if within_plan && due {
                self.value = (self.value * CORRECTION_STEP).max(MIN_CORRECTION);
                self.last_lowered = Some(now);
            }
        } else if busy {
            self.value *= RECOVERY;
        }
        self.value = self.value.min(ceiling);
    }
}

/// The stable window's latency against the target, and whether a miss
/// is news the correction should learn from.
pub(super) struct Verdict {
    /// The share of feasible requests a window is held to.
    pub(super) goal: f64,
    /// (share within the target, feasible requests), TTFT pools only.
    attained: Option<(f64, u64)>,
    /// The window's latency at the policy's percentile.
    observed: Option<Duration>,
    /// The window is under its goal.
    pub(super) over: bool,
    /// The share of its misses the last hour (decayed) has spent.
    budget_used: Option<f64>,
    /// At least half of them: a window under the goal is not chance.
    spending: bool,
    /// All of them: old misses are news too.
    repeating: bool,
    /// Misses of its own in the panic window.
    fresh: bool,
}

impl Verdict {
    /// The stable window's latency against the target; records the
    /// window in `budget`.
    pub(super) fn judge(
        budget: &mut ErrorBudget,
        input: &DecisionInput<'_>,
        reading: &Reading,
        target: Duration,
    ) -> Verdict {
        let (p, snap) = (input.policy, input.snapshot);
        let latency = reading.latency;
        let observed = match p.slo_percentile {
            50 => latency.p50,
            99 => latency.p99,
            _ => latency.p90,
        }
        .filter(|_| latency.count >= MIN_SAMPLES);
        // TTFT is judged on the requests a scaler can be held to: those
        // whose prompt alone fits the target at the measured rate. A long
        // prompt that no count of replicas serves in time is not a reason
        // to add one (on a day of code-like prompts, the p99 was such
        // prompts and kept the plan at its floor).
        // Windows with misses come in clusters: each is held to 80 % of
        // the misses the goal allows, so that the whole run meets it.
        let allowed = 1.0 - f64::from(p.slo_percentile) / 100.0;
        let goal = 1.0 - allowed * GOAL_SHARE;
        let attained = if reading.decode {
            None
        } else {
            snap.stable
                .slo_attainment()
                .filter(|(_, n)| *n >= MIN_SAMPLES)
        };
        if !reading.decode {
            budget.observe(
                input.now,
                snap.stable.duration,
                snap.stable.slo_eligible,
                snap.stable.slo_met,
            );
        }
        let over = match attained {
            Some((share, _)) => share < goal,
            None => observed.is_some_and(|l| l > target),
        };
        // A window under the goal is news only while the recent past has
        // spent at least half the goal's misses: a day running well within
        // it has windows under the goal by chance alone. Until it has spent
        // them all, only new misses are news.
        let budget_used = budget.used(allowed);
        Verdict {
            goal,
            attained,
            observed,
            over,
            budget_used,
            spending: budget_used.is_none_or(|u| u >= SPENDING),
            repeating: budget_used.is_none_or(|u| u >= REPEATING),
            // Misses of its own in the panic window: new ones, not those
            // the stable window still holds.
            fresh: snap.panic.slo_eligible > snap.panic.slo_met,
        }
    }

    /// How high the correction may stand: above 1 only while the last
    /// hour has spent less than [`UNDERSPENT`] of its misses.
    pub(super) fn ceiling(&self) -> f64 {
        if self.budget_used.is_some_and(|u| u < UNDERSPENT) {
            MAX_CORRECTION
        } else {
            1.0
        }
    }

    pub(super) fn judged(&self) -> bool {
        self.attained.is_some() || self.observed.is_some()
    }

    /// Misses the plan should have prevented.
    pub(super) fn news(&self) -> bool {
        self.over && self.spending && (self.repeating || self.fresh)
    }

    pub(super) fn text(&self, what: &str, target: Duration, percentile: u32) -> String {
        match (self.attained, self.observed) {
            (Some((share, n)), _) => format!(
                "{what} within {} for {:.1} % of {n} feasible requests ({} the {percentile}% goal{})",
                show(target),
                share * 100.0,
                if self.over { "under" } else { "meets" },
                match self.budget_used {
                    Some(u) if self.over && !self.spending => format!(
                        "; by chance: the last hour spent {:.0} % of its misses",
                        u * 100.0
                    ),
                    Some(u) if self.over && !self.repeating && !self.fresh => format!(
                        "; none new, and the last hour spent {:.0} % of its misses",
                        u * 100.0
                    ),
                    _ => String::new(),
                },
            ),
            (None, Some(l)) => format!(
                "{what} p{percentile} {} {} target {}",
                show(l),
                if self.over { "over" } else { "within" },
                show(target)
            ),
            (None, None) => format!("{what} target {} (too few samples)", show(target)),
        }
    }
}
