//! Prefill/decode coordination for a group (one prefill pool, one decode
//! pool of the same model).
//!
//! Each role is first decided on its own signals; then, if roles prefer a
//! share of the group's replicas (e.g. prefill 20–50 %), the group's total
//! is redistributed so every share lands in its band where the total
//! allows, with largest-remainder rounding, within each role's min and max,
//! and without changing the total. In panic nothing is redistributed: a
//! burst needs what each role asked for, now.

use scalecar_config::{Role, ShareBand};

/// One role's own decision and limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoleProposal {
    pub role: Role,
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    pub band: Option<ShareBand>,
    pub panic: bool,
}

/// The redistributed counts, in the order given. Keeps the total whenever
/// the roles' bounds allow it (the sum of mins ≤ total ≤ the sum of maxes).
pub fn coordinate(proposals: &[RoleProposal]) -> Vec<u32> {
    let own: Vec<u32> = proposals
        .iter()
        .map(|p| p.desired.clamp(p.min, p.max.max(p.min)))
        .collect();
    if proposals.len() < 2
        || proposals.iter().any(|p| p.panic)
        || proposals.iter().all(|p| p.band.is_none())
    {
        return own;
    }
    let total: u64 = proposals.iter().map(|p| u64::from(p.desired)).sum();
    let total_f = total as f64;
    // Each role's share: its own proposal's share, clamped into its band.
    let mut shares: Vec<f64> = proposals
        .iter()
        .map(|p| {
            let share = if total == 0 {
                0.0
            } else {
                f64::from(p.desired) / total_f * 100.0
            };
            match p.band {
                Some(b) => share.clamp(b.min_percent, b.max_percent),
                None => share,
            }
        })
        .collect();
    // Renormalize the shares to 100 % (bands can over- or under-fill).
    let sum: f64 = shares.iter().sum();
    if sum > 0.0 {
        for s in &mut shares {
            *s *= 100.0 / sum;
        }
    }
    // Largest remainder: floors first, then the biggest fractions get +1.
    let exact: Vec<f64> = shares.iter().map(|s| s / 100.0 * total_f).collect();
    let mut counts: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut left = total.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..exact.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for &i in order.iter().cycle().take(order.len() * 2) {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    // Respect each role's bounds, moving the difference to roles with room.
    let mut out: Vec<u32> = counts
        .iter()
        .map(|&c| c.min(u64::from(u32::MAX)) as u32)
        .collect();
    for _ in 0..proposals.len() * 4 {
        let mut moved = false;
        for i in 0..out.len() {
            let (min, max) = (proposals[i].min, proposals[i].max.max(proposals[i].min));
            if out[i] < min {
                let need = min - out[i];
                out[i] = min;
                take_from(&mut out, proposals, i, need);
                moved = true;
            } else if out[i] > max {
                let extra = out[i] - max;
                out[i] = max;
                give_to(&mut out, proposals, i, extra);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    out
}

fn take_from(out: &mut [u32], proposals: &[RoleProposal], skip: usize, mut need: u32) {
    for j in 0..out.len() {
        if j == skip || need == 0 {
            continue;
        }
        let room = out[j].saturating_sub(proposals[j].min);
        let n = room.min(need);
        out[j] -= n;
        need -= n;
    }
}

fn give_to(out: &mut [u32], proposals: &[RoleProposal], skip: usize, mut extra: u32) {
    for j in 0..out.len() {
        if j == skip || extra == 0 {
            continue;
        }
        let room = proposals[j]
            .max
            .max(proposals[j].min)
            .saturating_sub(out[j]);
        let n = room.min(extra);
        out[j] += n;
        extra -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn role(role: Role, desired: u32, band: Option<(f64, f64)>) -> RoleProposal {
        RoleProposal {
            role,
            desired,
            min: 0,
            max: 1000,
            band: band.map(|(a, b)| ShareBand {
                min_percent: a,
                max_percent: b,
            }),
            panic: false,
        }
    }

    #[test]
    fn shares_move_into_their_bands_keeping_the_total() {
        // Prefill asked 1 of 10 (10 %); its band is 20–50 %.
        let out = coordinate(&[
            role(Role::Prefill, 1, Some((20.0, 50.0))),
            role(Role::Decode, 9, None),
        ]);
        assert_eq!(out.iter().sum::<u32>(), 10);
        assert_eq!(out, vec![2, 8]);
        // Inside the band: unchanged.
        let out = coordinate(&[
            role(Role::Prefill, 3, Some((20.0, 50.0))),
            role(Role::Decode, 7, None),
        ]);
        assert_eq!(out, vec![3, 7]);
    }

    #[test]
    fn largest_remainder_rounding() {
        // Prefill 20 % of 7 = 1.4, decode 5.6 → 1 and 6.
        let out = coordinate(&[
            role(Role::Prefill, 0, Some((20.0, 20.0))),
            role(Role::Decode, 7, Some((80.0, 80.0))),
        ]);
        assert_eq!(out, vec![1, 6]);
    }

    #[test]
    fn bypassed_in_panic_and_without_bands() {
        let mut p = role(Role::Prefill, 1, Some((40.0, 50.0)));
        p.panic = true;
        assert_eq!(coordinate(&[p, role(Role::Decode, 9, None)]), vec![1, 9]);
        assert_eq!(
            coordinate(&[role(Role::Prefill, 1, None), role(Role::Decode, 9, None)]),
            vec![1, 9]
        );
    }

    #[test]
    fn bounds_win_over_bands() {
        let mut p = role(Role::Prefill, 1, Some((50.0, 50.0)));
        p.max = 2;
        let out = coordinate(&[p, role(Role::Decode, 9, None)]);
        assert_eq!(out, vec![2, 8]);
    }

    proptest! {
        #[test]
        fn keeps_total_and_bounds(
            d in prop::collection::vec((0u32..50, 0u32..5, 0u32..60, prop::option::of((0.0f64..60.0, 0.0f64..40.0))), 2..3),
        ) {
            let proposals: Vec<RoleProposal> = d.iter().enumerate().map(|(i, &(desired, min, span, band))| RoleProposal {
                role: if i == 0 { Role::Prefill } else { Role::Decode },
                desired,
                min,
                max: min + span,
                band: band.map(|(a, w)| ShareBand { min_percent: a, max_percent: (a + w).min(100.0) }),
                panic: false,
            }).collect();
            let out = coordinate(&proposals);
            for (o, p) in out.iter().zip(&proposals) {
                prop_assert!(*o >= p.min && *o <= p.max.max(p.min), "{o} not in [{}, {}]", p.min, p.max);
            }
            let total: u32 = proposals.iter().map(|p| p.desired).sum();
            let min_sum: u32 = proposals.iter().map(|p| p.min).sum();
            let max_sum: u32 = proposals.iter().map(|p| p.max.max(p.min)).sum();
            if proposals.iter().any(|p| p.band.is_some()) && total >= min_sum && total <= max_sum {
                prop_assert_eq!(out.iter().sum::<u32>(), total);
            }
        }
    }
}
