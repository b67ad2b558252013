//! How many replicas a Poisson stream of prompts needs so that few wait
//! longer than a budget: Erlang C (M/M/n), each replica a server working
//! through prompt tokens at its measured rate.
//!
//! Why a queueing model rather than a fixed utilization: the headroom a
//! TTFT tail needs shrinks as a pool grows (random arrivals average out),
//! so one fixed share either starves a pool of two replicas or wastes a
//! third of a pool of ten. Erlang C gives both from the same three
//! measurements — offered load, service rate, wait budget. Arrivals
//! burstier than Poisson and prompts more varied than exponential are what
//! the slo controller's latency correction is for.

/// The probability that a request waits longer than `wait` seconds in an
/// M/M/n queue with `servers` replicas, `load` erlangs offered (arrival
/// rate / service rate of one replica) and `service_rate` requests per
/// second per replica. 1 when the load reaches the servers (the queue
/// grows without bound).
pub fn wait_tail(servers: u32, load: f64, service_rate: f64, wait: f64) -> f64 {
    if load <= 0.0 {
        return 0.0;
    }
    let n = f64::from(servers);
    if servers == 0 || load >= n {
        return 1.0;
    }
    let delayed = erlang_c(servers, load);
    (delayed * (-(n - load) * service_rate * wait.max(0.0)).exp()).clamp(0.0, 1.0)
}

/// Erlang C: the probability that an arrival waits at all, through the
/// Erlang B recursion (stable for any `servers`).
fn erlang_c(servers: u32, load: f64) -> f64 {
    let mut blocked = 1.0;
    for k in 1..=servers {
        blocked = load * blocked / (f64::from(k) + load * blocked);
    }
    let n = f64::from(servers);
    n * blocked / (n - load * (1.0 - blocked))
}

/// The replicas (a fraction, for hysteresis further on) that keep the
/// share of requests waiting longer than `wait` at or under `miss`, up to
/// `max`. Between the smallest count that meets it, `n`, and `n − 1` the
/// answer is interpolated on the logarithm of the tail, so that it moves
/// continuously with the load.
pub fn replicas_for_tail(load: f64, service_rate: f64, wait: f64, miss: f64, max: u32) -> f64 {
    if load <= 0.0 || !load.is_finite() || service_rate <= 0.0 {
        return 0.0;
    }
    let miss = miss.clamp(1e-12, 1.0);
    let first = (load.floor() as u32).saturating_add(1).min(max.max(1));
    let mut below = 1.0f64;
    for n in first..=max.max(first) {
        let tail = wait_tail(n, load, service_rate, wait);
        if tail <= miss {
            let (hi, lo) = (below.ln(), tail.max(1e-300).ln());
            let share = if hi > lo {
                ((hi - miss.ln()) / (hi - lo)).clamp(0.0, 1.0)
            } else {
                1.0
            };
            // Never under the load itself.
            return (f64::from(n) - 1.0 + share).max(load);
        }
        below = tail;
    }
    f64::from(max.max(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_waits_as_m_m_1_says() {
        // M/M/1: P(W > t) = ρ e^{-(μ-λ)t}.
        let (rho, mu, t): (f64, f64, f64) = (0.6, 2.0, 1.5);
        let expected = rho * (-(mu - rho * mu) * t).exp();
        assert!((wait_tail(1, rho, mu, t) - expected).abs() < 1e-12);
        assert_eq!(wait_tail(1, 1.0, mu, t), 1.0);
        assert_eq!(wait_tail(3, 0.0, mu, t), 0.0);
    }

    #[test]
    fn erlang_c_matches_a_known_value() {
        // Two servers, one erlang: C = 1/3.
        assert!((erlang_c(2, 1.0) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn bigger_pools_run_hotter_for_the_same_tail() {
        let utilization = |load: f64| load / replicas_for_tail(load, 2.0, 1.5, 0.005, 1024);
        let (small, large) = (utilization(1.0), utilization(40.0));
        assert!(small < 0.6, "{small}");
        assert!(large > 0.8, "{large}");
    }

    #[test]
    fn the_answer_meets_the_tail_and_one_fewer_does_not() {
        for load in [0.3, 1.0, 3.7, 12.0, 90.0] {
            let need = replicas_for_tail(load, 2.2, 1.5, 0.005, 1024);
            let n = need.ceil() as u32;
            assert!(wait_tail(n, load, 2.2, 1.5) <= 0.005, "{load}: {need}");
            if n > 1 && f64::from(n - 1) > load {
                assert!(wait_tail(n - 1, load, 2.2, 1.5) > 0.005, "{load}: {need}");
            }
        }
    }

    #[test]
    fn grows_with_the_load_and_stops_at_the_maximum() {
        let mut last = 0.0;
        for i in 1..200 {
            let need = replicas_for_tail(f64::from(i) * 0.1, 2.0, 1.0, 0.005, 1024);
            assert!(need >= last, "{i}: {need} < {last}");
            last = need;
        }
        assert_eq!(replicas_for_tail(500.0, 2.0, 1.0, 0.005, 64), 64.0);
        assert_eq!(replicas_for_tail(0.0, 2.0, 1.0, 0.005, 64), 0.0);
        assert_eq!(replicas_for_tail(f64::NAN, 2.0, 1.0, 0.005, 64), 0.0);
    }
}
