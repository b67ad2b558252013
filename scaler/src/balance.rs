//! Which endpoint a request goes to: one implementation for the proxy's
//! pools and the virtual-time simulator, so the simulator balances load as
//! the proxy does.
//!
//! The least outstanding work of all endpoints that can take the request,
//! scanned from a rotating start so that, among equals, idle endpoints
//! take turns. What "work" is, is the caller's key; both callers compare
//! the prompt tokens not yet prefilled first, then the tokens in flight: a
//! new prompt's time to first token is the prefill queued ahead of it on
//! its engine, while tokens in flight are mostly decoding sequences' KV,
//! which delay it little.
//!
//! Why every endpoint and not two sampled ones (power of two choices): the
//! counts are this process's own, exact at the moment of the pick, so the
//! herding that sampling guards against with stale load reports does not
//! arise, and prompt sizes are heavy-tailed — one 50k-token prompt holds
//! its engine for seconds, and a sample of two finds both candidates
//! prefilling more often than a short prompt's budget allows. Measured with
//! `scalecar simulate` (the cheapest constant count meeting 99 % of
//! feasible requests within the target): long-context conversations on a
//! 70B at 2 s needed 55 replicas by tokens in flight with two choices, 43
//! by prefill first with two choices, 23 over every endpoint; the Azure
//! conversation trace 7, 5 and 4. A scan costs two relaxed atomic loads per
//! endpoint: 92 ns for a pool of 64, 380 ns for 256 (`benches/pick`).

/// The endpoint in `0..n` with the least work, `None` when `work` rules
/// every one out (it returns `None` for an endpoint that cannot take the
/// request: unhealthy, ejected, at its cap). The scan starts at `k mod n`
/// and the first of equals wins, so idle endpoints take turns as `k`
/// rotates.
pub fn least_loaded<K: Ord>(n: usize, k: u64, work: impl Fn(usize) -> Option<K>) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let start = (k % n as u64) as usize;
    let mut best: Option<(usize, K)> = None;
    for i in (start..n).chain(0..start) {
        let Some(w) = work(i) else { continue };
        if best.as_ref().is_none_or(|(_, b)| w < *b) {
            best = Some((i, w));
        }
    }
    best.map(|(i, _)| i)
}

/// A 64-bit mixer (splitmix64's finalizer): seeds rotations apart.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_work_wins_and_ruled_out_endpoints_are_skipped() {
        // (prompt tokens not yet prefilled, tokens in flight)
        let loads = [(500, 2), (0, 900), (0, 100), (100, 0)];
        for k in 0..16u64 {
            assert_eq!(least_loaded(4, k, |i| Some(loads[i])), Some(2), "k={k}");
            // Endpoint 2 at its cap: the next least.
            let without_2 = |i: usize| (i != 2).then(|| loads[i]);
            assert_eq!(least_loaded(4, k, without_2), Some(1), "k={k}");
        }
        assert_eq!(least_loaded(4, 3, |_| None::<(u64, u64)>), None);
        assert_eq!(least_loaded(0, 7, |_| Some((0u64, 0u64))), None);
    }

    #[test]
    fn idle_endpoints_take_turns() {
        let firsts: Vec<Option<usize>> = (0..6u64)
            .map(|k| least_loaded(3, k, |_| Some((0u64, 0u64))))
            .collect();
        let turns = [0, 1, 2, 0, 1, 2].map(Some);
        assert_eq!(firsts, turns);
        // Equals after the start still lose to the first of them.
        assert_eq!(least_loaded(4, 2, |i| Some(u64::from(i == 2))), Some(3));
    }
}
