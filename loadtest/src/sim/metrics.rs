//! model-sim's `/metrics`, with vLLM's metric names, types and buckets and
//! the label `model_name`, so dashboards and scrapers written for vLLM work
//! against it unchanged.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A Prometheus histogram with fixed buckets, recorded with atomics.
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last is +Inf.
    counts: Box<[AtomicU64]>,
    /// Sum in nanoseconds.
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one value in seconds.
    pub fn observe(&self, seconds: f64) {
        let i = self.bounds.partition_point(|b| *b < seconds);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str, model: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"{b:?}\",model_name=\"{model}\"}} {cumulative}"
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"+Inf\",model_name=\"{model}\"}} {cumulative}"
                    );
                }
            }
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{model_name=\"{model}\"}} {sum:?}");
        let _ = writeln!(out, "{name}_count{{model_name=\"{model}\"}} {cumulative}");
    }
}

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The metrics of one replica.
#[derive(Debug)]
pub struct SimMetrics {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// KV usage in parts per million (an atomic float would need a CAS loop).
    pub kv_usage_ppm: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub requests_finished: AtomicU64,
    pub ttft: AtomicHistogram,
    pub itl: AtomicHistogram,
    pub e2e: AtomicHistogram,
    pub queue_time: AtomicHistogram,
}

impl Default for SimMetrics {
    fn default() -> Self {
        SimMetrics {
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            kv_usage_ppm: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            requests_finished: AtomicU64::new(0),
            ttft: AtomicHistogram::new(TTFT_BUCKETS),
            itl: AtomicHistogram::new(ITL_BUCKETS),
            e2e: AtomicHistogram::new(REQUEST_BUCKETS),
            queue_time: AtomicHistogram::new(REQUEST_BUCKETS),
        }
    }
}

/// Tokens per KV block, as vLLM's default.
const KV_BLOCK: u64 = 16;

impl SimMetrics {
    pub fn set_state(&self, running: u64, waiting: u64, kv_used: u64, kv_capacity: u64) {
        self.running.store(running, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
        let ppm = kv_used
            .saturating_mul(1_000_000)
            .checked_div(kv_capacity)
            .unwrap_or(0);
        self.kv_usage_ppm.store(ppm, Ordering::Relaxed);
    }

    /// The Prometheus text exposition. `model` is escaped by the caller's
    /// validation (model names are plain identifiers on the command line).
    ///
    /// `kv_capacity` (tokens) is given as vLLM's `cache_config_info` does:
    /// 16-token blocks, `num_gpu_blocks` of them, among other settings.
    pub fn render(&self, model: &str, kv_capacity: u64) -> String {
        let model = escape_label(model);
        let model = model.as_str();
        let mut out = String::with_capacity(8192);
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
        );
        let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
        let _ = writeln!(
            out,
            "vllm:cache_config_info{{block_size=\"{KV_BLOCK}\",cache_dtype=\"auto\",enable_prefix_caching=\"False\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"{}\"}} 1.0",
            kv_capacity / KV_BLOCK
        );
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name}{{model_name=\"{model}\"}} {value}");
        };
        gauge(
            &mut out,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            self.running.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            self.waiting.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            format!(
                "{:?}",
                self.kv_usage_ppm.load(Ordering::Relaxed) as f64 / 1e6
            ),
        );
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            // Text format 0.0.4: HELP and TYPE carry the full `_total` name.
            let _ = writeln!(out, "# HELP {name}_total {help}");
            let _ = writeln!(out, "# TYPE {name}_total counter");
            let _ = writeln!(out, "{name}_total{{model_name=\"{model}\"}} {value}");
        };
        counter(
            &mut out,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        self.ttft.render(
            &mut out,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            model,
        );
        self.itl.render(
            &mut out,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            model,
        );
        self.e2e.render(
            &mut out,
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            model,
        );
        self.queue_time.render(
            &mut out,
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            model,
        );
        out
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = AtomicHistogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help", "m");
        assert!(
            out.contains("x_bucket{le=\"0.1\",model_name=\"m\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{le=\"1.0\",model_name=\"m\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{le=\"+Inf\",model_name=\"m\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_count{model_name=\"m\"} 4\n"), "{out}");
        assert!(out.contains("x_sum{model_name=\"m\"} 6.05"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = SimMetrics::default();
        assert!(m.render("a\"b", 40_000).contains("model_name=\"a\\\"b\""));
    }
}
