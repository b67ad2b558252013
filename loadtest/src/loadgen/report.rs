//! The summary of a load run (JSON) and its per-request log (CSV).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use super::client::{Outcome, RequestRecord};

/// Quantiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Quantiles {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Quantiles {
    /// Nearest-rank quantiles of `values` (milliseconds).
    pub fn of(mut values: Vec<f64>) -> Quantiles {
        if values.is_empty() {
            return Quantiles::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let rank = |q: f64| values[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Quantiles {
            count: n,
            mean_ms: values.iter().sum::<f64>() / n as f64,
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: values[n - 1],
        }
    }
}

/// The JSON summary of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub errors: BTreeMap<&'static str, usize>,
    /// Wall time of the run, seconds.
    pub duration_s: f64,
    pub achieved_rps: f64,
    pub ttft: Quantiles,
    /// Mean inter-token latency per request.
    pub itl: Quantiles,
    pub e2e: Quantiles,
    pub output_tokens: u64,
    /// The TTFT target of the SLO, milliseconds.
    pub ttft_slo_ms: Option<f64>,
    /// Share of all requests that succeeded with TTFT within the SLO
    /// (errors count as misses).
    pub slo_attainment: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Summarizes the records of a run that took `elapsed`.
pub fn summarize(
    records: &[RequestRecord],
    elapsed: Duration,
    ttft_slo: Option<Duration>,
) -> Summary {
    let mut errors = BTreeMap::new();
    for r in records.iter().filter(|r| r.outcome != Outcome::Ok) {
        *errors.entry(r.outcome.as_str()).or_insert(0) += 1;
    }
    let ok: Vec<_> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Ok)
        .collect();
    let ttft = Quantiles::of(ok.iter().filter_map(|r| r.ttft.map(ms)).collect());
    let itl = Quantiles::of(
        ok.iter()
            .filter(|r| r.tokens > 1)
            .map(|r| ms(r.itl_sum) / f64::from(r.tokens - 1))
            .collect(),
    );
    let e2e = Quantiles::of(ok.iter().map(|r| ms(r.e2e)).collect());
    let slo_attainment = ttft_slo.map(|slo| {
        if records.is_empty() {
            return 1.0;
        }
        let met = ok
            .iter()
            .filter(|r| r.ttft.is_some_and(|t| t <= slo))
            .count();
        met as f64 / records.len() as f64
    });
    let secs = elapsed.as_secs_f64();
    Summary {
        requests: records.len(),
        ok: ok.len(),
        errors,
        duration_s: secs,
        achieved_rps: if secs > 0.0 {
            records.len() as f64 / secs
        } else {
            0.0
        },
        ttft,
        itl,
        e2e,
        output_tokens: ok.iter().map(|r| u64::from(r.tokens)).sum(),
        ttft_slo_ms: ttft_slo.map(ms),
        slo_attainment,
    }
}

/// Writes one CSV row per request, in send order.
pub fn write_csv(records: &[RequestRecord], mut out: impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "at_s,prompt_tokens,max_tokens,outcome,status,ttft_ms,e2e_ms,tokens,mean_itl_ms,max_itl_ms,usage_completion_tokens"
    )?;
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_default();
    for r in records {
        let mean_itl = (r.tokens > 1).then(|| ms(r.itl_sum) / f64::from(r.tokens - 1));
        writeln!(
            out,
            "{:.6},{},{},{},{},{},{:.3},{},{},{:.3},{}",
            r.at.as_secs_f64(),
            r.prompt_tokens,
            r.max_tokens,
            r.outcome.as_str(),
            r.status.map(|s| s.to_string()).unwrap_or_default(),
            opt(r.ttft.map(ms)),
            ms(r.e2e),
            r.tokens,
            opt(mean_itl),
            ms(r.itl_max),
            r.usage_completion_tokens
                .map(|n| n.to_string())
                .unwrap_or_default(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: Outcome, ttft_ms: u64, tokens: u32) -> RequestRecord {
        RequestRecord {
            at: Duration::ZERO,
            prompt_tokens: 10,
            max_tokens: tokens,
            outcome,
            status: Some(200),
            ttft: (outcome == Outcome::Ok).then(|| Duration::from_millis(ttft_ms)),
            e2e: Duration::from_millis(ttft_ms + 10 * u64::from(tokens)),
            tokens,
            itl_sum: Duration::from_millis(10 * u64::from(tokens.saturating_sub(1))),
            itl_max: Duration::from_millis(10),
            usage_completion_tokens: Some(tokens),
        }
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let q = Quantiles::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (q.p50_ms, q.p90_ms, q.p99_ms, q.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Quantiles::of(vec![]).count, 0);
    }

    #[test]
    fn summary_counts_errors_as_slo_misses() {
        let records = vec![
            record(Outcome::Ok, 100, 5),
            record(Outcome::Ok, 900, 5),
            record(Outcome::Throttled, 0, 0),
            record(Outcome::Ok, 200, 5),
        ];
        let s = summarize(
            &records,
            Duration::from_secs(2),
            Some(Duration::from_millis(500)),
        );
        assert_eq!(s.requests, 4);
        assert_eq!(s.ok, 3);
        assert_eq!(s.errors.get("throttled"), Some(&1));
        assert_eq!(s.slo_attainment, Some(0.5));
        assert_eq!(s.output_tokens, 15);
        assert!((s.itl.mean_ms - 10.0).abs() < 1e-9);
        assert_eq!(s.achieved_rps, 2.0);
    }

    #[test]
    fn csv_has_a_row_per_request() {
        let records = vec![record(Outcome::Ok, 100, 3), record(Outcome::Timeout, 0, 0)];
        let mut out = Vec::new();
        write_csv(&records, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains(",ok,200,100.000,"), "{}", lines[1]);
        assert!(lines[2].contains(",timeout,"), "{}", lines[2]);
    }
}
