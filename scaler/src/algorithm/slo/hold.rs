//! How long a replica count is kept, and the whole count to ask for.
//!
//! Each count reached is held after its last need for the longest of a
//! floor (five cold starts, the stable window, `scale-down-delay`) and
//! twice the longest gap seen between two needs of it in the last half
//! hour, at most 15 minutes: bursts that recur every few minutes keep
//! their replicas across the gaps, since a replica let go in a gap is
//! back only a cold start after the next burst began. A scaler that
//! starts (a restart, a new leader) counts the replicas it finds as
//! needed at its first decision, so it lets none go before the floor. The
//! whole count then takes a need a little over it as served (the
//! tolerance), never goes under the KV floor, and goes down only past
//! consolidation.

use std::collections::VecDeque;
use std::time::Duration;

use super::record;

/// Headroom kept when consolidating.
const CONSOLIDATION_MARGIN: f64 = 0.9;
/// How far (in replicas) a need may exceed a whole count and still be
/// served by it (the decision's reason says so, with this value).
/// Measured on `scripts/evaluate` (docs/evaluation.md): 0.1 and 0.15 each
/// made code and the diurnal day cheaper; at 0.25 conv lost 0.1 points
/// and, without the KV floor kept whole, conv at 3 s fell to 97.8 %.
const UP_TOLERANCE: f64 = 0.15;
pub(super) const TOLERATED: &str = "; within the tolerance of 0.15 of a replica";
/// How far back needs are remembered, and the longest any level is held.
const LOOKBACK: Duration = Duration::from_secs(30 * 60);
/// At 10 minutes, long-context bursts 6 minutes apart (seed 3 of the
/// shape) had a level let go 12 minutes after its need, and the burst came
/// back while its replicas were starting (94.9 % of feasible requests in
/// time; 99.5 % at 15 minutes, for 3 % more replica-seconds).
const LONGEST_HOLD: Duration = Duration::from_secs(15 * 60);
/// A level is held for the longest gap between its needs times this (gaps
/// between bursts vary; on the Azure code trace 1.25 let a level go a
/// minute before its burst came back).
const GAP_MARGIN: f64 = 2.0;
/// Every level is held at least this many cold starts after its last need:
/// a replica released and asked for again soon costs a cold start and the
/// misses while it starts (5 minutes for a 60 s cold start).
pub const HOLD_COLD_STARTS: u32 = 5;
/// The most needs a memory keeps exactly (see [`Hold::remember`]).
const MAX_NEEDS_KEPT: usize = 300;
/// A remembered run at one whole count keeps a need this often: a gap
/// this long between needs of a level is held for twice that, a minute —
/// no longer than the hold's floor (the stable window, 60 s by default,
/// and five cold starts) — and a steady half hour is 60 points, not 900.
const WITHIN_A_RUN: Duration = Duration::from_secs(30);
/// How often the per-level table is rebuilt from every remembered
/// decision.
const LEVELS_REBUILT_EVERY: Duration = Duration::from_secs(15);
/// Levels looked at (replica counts) at most, besides `max-replicas`: the
/// hold walks levels × remembered decisions.
pub(super) const MAX_LEVELS: u32 = 1024;

/// The needs of the look-back and, per replica count, when each was last
/// needed and its longest gap.
#[derive(Debug, Default)]
pub(super) struct Hold {
    /// (time, replicas needed) of every decision over the look-back.
    pub(super) needs: VecDeque<(Duration, f64)>,
    levels: Levels,
    /// The count found running at the first decision, and when (see
    /// [`Hold::found`]).
    found: Option<(Duration, u32)>,
}

impl Hold {
    /// At the first decision: the count found running (`spec`) is kept
    /// for the floor. A scaler that starts — a restart, a new leader, a
    /// target just annotated — knows what runs but not why: the last one
    /// may have been holding it for bursts that recur. It lets it go only
    /// once it has seen that long a stretch of the traffic itself (a new
    /// leader every 10 minutes took code to 87.5 % and the long-context
    /// bursts to 85.0 %, each one scaling down at once what its predecessor
    /// held). So too after recalling its predecessor's memory, which is up
    /// to 30 s older than what runs: a count reached since the last save is
    /// known only by the replicas running (without this, code with a new
    /// leader every 10 minutes fell to 94.6 %). Not a need: counted as one,
    /// it was held for twice the gaps the memory knew of its level, a
    /// quarter of an hour at each new leader (code 1.27 × its constant).
    pub(super) fn found(&mut self, now: Duration, spec: u32) {
        if self.found.is_none() {
            self.found = Some((now, spec));
        }
    }

    /// Records `need` and returns the count to hold and the horizon it is
    /// held over. Each level (replica count) is held for the longest gap
    /// seen between two needs of it in the look-back (× 2, at most 15
    /// minutes), and at least `floor`: a level that recurs every few
    /// minutes is kept across its gaps, one that came once is let go after
    /// `floor`.
    pub(super) fn hold(
        &mut self,
        now: Duration,
        need: f64,
        floor: Duration,
        max: u32,
    ) -> (f64, Duration) {
        record(&mut self.needs, now, LOOKBACK, need);
        let peak = self.needs.iter().map(|(_, n)| *n).fold(0.0, f64::max);
        let top = peak.ceil().min(f64::from(MAX_LEVELS.min(max))) as u32;
        // Per level: the last time it was needed and the longest gap
        // between two needs of it. Walking every level of every remembered
        // decision costs levels × decisions (≈ 100 µs at 50 levels and
        // half an hour of 2 s ticks), so the table is rebuilt every 15 s
        // and extended by each new decision in between; gaps that aged out
        // of the look-back leave at the next rebuild.
        let rebuild = self.levels.top != top
            || self
                .levels
                .built
                .is_none_or(|b| now.saturating_sub(b) >= LEVELS_REBUILT_EVERY);
        if rebuild {
            self.levels = Levels::of(&self.needs, top, now);
        } else {
            self.levels.add(now, need);
        }
        let (last, gap) = (&self.levels.last, &self.levels.gap);
        let mut held = need;
        let mut horizon = floor;
        if let Some((at, n)) = self.found
            && now.saturating_sub(at) <= floor
        {
            held = held.max(f64::from(n));
        }
        for level in (1..=top as usize).rev() {
            let (Some(Some(at)), Some(g)) = (last.get(level), gap.get(level)) else {
                continue;
            };
            let keep = g.mul_f64(GAP_MARGIN).min(LONGEST_HOLD).max(floor);
            if now.saturating_sub(*at) <= keep {
                // The level's own need, not more (the top level may be a
                // fraction of a replica).
                let level_need = self
                    .needs
                    .iter()
                    .filter(|(t, n)| *t >= *at && n.ceil() as usize >= level)
                    .map(|(_, n)| *n)
                    .fold(0.0, f64::max);
                held = held.max(level_need.min(level as f64));
                horizon = keep;
                break;
            }
        }
        (held, horizon)
    }
}

/// The needs as remembered, `[age, need]`: the first and the last
/// decision of each run at one whole count, and within a run one every
/// [`WITHIN_A_RUN`], carrying the highest need it stands for. When each
/// level was reached and left — what the hold's gaps are read from — is
/// kept to the decision; half an hour of 2 s decisions is 900 points, and
/// a few runs of minutes each keep well under 100.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HoldMemory {
    needs: Vec<(f64, f64)>,
}

impl Hold {
    pub(super) fn remember(&self, now: Duration) -> HoldMemory {
        let level = |n: f64| n.ceil();
        let mut kept: Vec<(Duration, f64)> = Vec::new();
        // The highest need since the last point kept (same whole count).
        let mut highest = 0.0_f64;
        let mut points = self.needs.iter().peekable();
        while let Some(&(t, n)) = points.next() {
            highest = highest.max(n);
            let last_of_run = points
                .peek()
                .is_none_or(|(_, next)| level(*next) != level(n));
            let keep = match kept.last() {
                None => true,
                Some(&(at, kept_need)) => {
                    level(kept_need) != level(n)
                        || last_of_run
                        || t.saturating_sub(at) >= WITHIN_A_RUN
                }
            };
            if keep {
                kept.push((t, highest));
                highest = 0.0;
            }
        }
        if kept.len() > MAX_NEEDS_KEPT {
            // A need that crosses a whole count every few decisions: the
            // highest of each stretch instead (when a level was reached is
            // then known to within the stretch).
            let stretch = |t: &Duration| t.as_secs() / super::THINNED.as_secs().max(1);
            let mut coarse: Vec<(Duration, f64)> = Vec::new();
            for (t, n) in kept {
                match coarse.last_mut() {
                    Some((at, m)) if stretch(at) == stretch(&t) => {
                        if n >= *m {
                            *at = t;
                            *m = n;
                        }
                    }
                    _ => coarse.push((t, n)),
                }
            }
            kept = coarse;
        }
        HoldMemory {
            needs: kept
                .into_iter()
                // Rounded up: a count reached stays reached.
                .map(|(t, n)| (crate::memory::age_of(now, t), (n * 100.0).ceil() / 100.0))
                .collect(),
        }
    }

    pub(super) fn recalled(
        m: &HoldMemory,
        at: &impl Fn(f64) -> Option<Duration>,
    ) -> Result<Hold, String> {
        Ok(Hold {
            needs: super::recalled_series(&m.needs, at, "need")?,
            // Rebuilt from the needs at the next decision.
            levels: Levels::default(),
            found: None,
        })
    }
}

/// Per replica count (index 1..=top): when it was last needed, and the
/// longest gap between two needs of it, over the remembered decisions.
#[derive(Debug, Default)]
struct Levels {
    top: u32,
    last: Vec<Option<Duration>>,
    gap: Vec<Duration>,
    /// When the table was last rebuilt from every remembered decision.
    built: Option<Duration>,
}

impl Levels {
    fn of(needs: &VecDeque<(Duration, f64)>, top: u32, now: Duration) -> Levels {
        let mut l = Levels {
            top,
            last: vec![None; top as usize + 1],
            gap: vec![Duration::ZERO; top as usize + 1],
            built: Some(now),
        };
        for (t, n) in needs {
            l.add(*t, *n);
        }
        l
    }

    /// A decision at `t` needed `need` replicas.
    fn add(&mut self, t: Duration, need: f64) {
        let reached = (need.ceil().max(0.0) as u32).min(self.top) as usize;
        for level in 1..=reached {
            if let (Some(l), Some(g)) = (self.last.get_mut(level), self.gap.get_mut(level)) {
                if let Some(previous) = *l {
                    *g = (*g).max(t.saturating_sub(previous));
                }
                *l = Some(t);
            }
        }
    }
}

/// The whole count to ask for: `held` less the tolerance, never under the
/// KV floor; and scaling down only past consolidation and never while the
/// target is missed. The note says which rule decided.
pub(super) fn replicas_for(held: f64, kv_need: f64, spec: u32, over: bool) -> (u32, &'static str) {
    let whole = |x: f64| x.ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
    let tolerated = if held > 1.0 {
        (held - UP_TOLERANCE).max(1.0)
    } else {
        held
    };
    let mut desired = whole(tolerated.max(kv_need) - 1e-9);
    let mut note = "";
    if over && desired < spec {
        // The target is missed now: never ask for less than what runs.
        desired = spec;
        note = "; target missed: no scale-down";
    }
    if desired < spec {
        let fits = spec > 1 && held <= f64::from(spec - 1) * CONSOLIDATION_MARGIN;
        if !fits && held > 0.0 {
            desired = spec;
            note = "; consolidation: the need does not fit one replica fewer";
        } else {
            desired = desired.max(whole(held / CONSOLIDATION_MARGIN - 1e-9));
        }
    }
    if note.is_empty() && desired < whole(held - 1e-9) {
        note = TOLERATED;
    }
    (desired, note)
}
