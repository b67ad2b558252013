//! Prometheus metrics of the data plane (`scalecar_` prefix, base units,
//! labels `model` and `role` only — closed sets from the config, never
//! per-request or per-pod values). Label handles are resolved once per pool
//! and outcome, so a request touches only atomics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use scalecar_config::Role;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// A 2xx/3xx answer delivered whole (or the client had all of it).
    ok,
    /// The model server answered 4xx: the request's fault, not the server's.
    client_error,
    /// The model server answered 5xx, could not be reached, or broke off.
    upstream_error,
    /// The client went away first.
    cancelled,
    /// No answer in time: the queue's deadline or the request timeout.
    timeout,
    /// Refused at admission: the queue was full.
    rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::ok,
        Outcome::client_error,
        Outcome::upstream_error,
        Outcome::cancelled,
        Outcome::timeout,
        Outcome::rejected,
    ];
}

/// Why a request was refused before it reached a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Rejection {
    bad_request,
    body_too_large,
    body_timeout,
    unknown_model,
    not_found,
}

/// A listening socket of the proxy process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Listener {
    proxy,
    ext_proc,
    admin,
}

impl Listener {
    /// As logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Listener::proxy => "proxy",
            Listener::ext_proc => "ext-proc",
            Listener::admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: Listener,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PoolLabels {
    pub model: String,
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    model: String,
    role: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    role: String,
    kind: TokenKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum TokenKind {
    prompt,
    generated,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectionLabels {
    reason: Rejection,
}

/// Bucket bounds in seconds: 5 ms … 2 min; ITL lives in the low end, TTFT
/// under load in the high.
const LATENCY_BUCKETS: [f64; 22] = [
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    10.0, 20.0, 40.0, 80.0, 120.0,
];

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Per bucket (not cumulative); the last is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A Prometheus histogram recorded with atomics only: prometheus-client's
/// own histogram takes a mutex per observation, too much for a per-token
/// path.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<LatencyCounts>,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.partition_point(|b| *b < secs);
        if let Some(c) = self.inner.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.sum_ns.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); LATENCY_BUCKETS.len() + 1];
        let mut count = 0;
        for (i, slot) in buckets.iter_mut().enumerate() {
            let n = self
                .inner
                .counts
                .get(i)
                .map_or(0, |c| c.load(Ordering::Relaxed));
            *slot = (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n);
            count += n;
        }
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Every data-plane metric family.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    requests: Family<OutcomeLabels, Counter>,
    rejected: Family<RejectionLabels, Counter>,
    ttft: Family<PoolLabels, LatencyHistogram>,
    itl: Family<PoolLabels, LatencyHistogram>,
    e2e: Family<PoolLabels, LatencyHistogram>,
    queue_wait: Family<PoolLabels, LatencyHistogram>,
    tokens: Family<TokenLabels, Counter>,
    in_flight: Family<PoolLabels, Gauge>,
    queued: Family<PoolLabels, Gauge>,
    tokens_in_flight: Family<PoolLabels, Gauge>,
    prompt_token_ratio: Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    ttft_target: Family<PoolLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    competing: Family<TargetLabel, Gauge>,
    accept_failures: Family<ListenerLabels, Counter>,
}

/// One scale target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

impl ProxyMetrics {
    pub fn register(reg: &mut Registry) -> Self {
        let m = ProxyMetrics {
            requests: Family::default(),
            rejected: Family::default(),
            ttft: Family::default(),
            itl: Family::default(),
            e2e: Family::default(),
            queue_wait: Family::default(),
            tokens: Family::default(),
            in_flight: Family::default(),
            queued: Family::default(),
            tokens_in_flight: Family::default(),
            prompt_token_ratio: Family::default(),
            ttft_target: Family::default(),
            competing: Family::default(),
            accept_failures: Family::default(),
        };
        reg.register(
            "scalecar_requests",
            "Requests that reached a pool, by outcome",
            m.requests.clone(),
        );
        reg.register(
            "scalecar_rejected_requests",
            "Requests refused before reaching a pool",
            m.rejected.clone(),
        );
        reg.register(
            "scalecar_ttft_seconds",
            "Time to first token as the proxy saw it",
            m.ttft.clone(),
        );
        reg.register(
            "scalecar_itl_seconds",
            "Time between streamed tokens",
            m.itl.clone(),
        );
        reg.register(
            "scalecar_e2e_seconds",
            "Whole request time at the proxy",
            m.e2e.clone(),
        );
        reg.register(
            "scalecar_queue_wait_seconds",
            "Time waiting in the proxy's admission queue",
            m.queue_wait.clone(),
        );
        reg.register(
            "scalecar_tokens",
            "Tokens by kind (prompt admitted, generated)",
            m.tokens.clone(),
        );
        reg.register(
            "scalecar_in_flight_requests",
            "Requests at an endpoint now, per pool (under its first model name)",
            m.in_flight.clone(),
        );
        reg.register(
            "scalecar_queued_requests",
            "Requests in the admission queue now, per pool (under its first model name)",
            m.queued.clone(),
        );
        reg.register(
            "scalecar_tokens_in_flight",
            "Prompt and generated tokens of requests in flight now, per pool (under its first model name)",
            m.tokens_in_flight.clone(),
        );
        reg.register(
            "scalecar_prompt_token_ratio",
            "The model server's prompt tokens per token the proxy estimated from the text, learned from answers' usage (1 until one carried it), per pool (under its first model name)",
            m.prompt_token_ratio.clone(),
        );
        reg.register(
            "scalecar_ttft_target_seconds",
            "The pool's TTFT target (ttft-target), where its policy sets one",
            m.ttft_target.clone(),
        );
        reg.register(
            "scalecar_competing_autoscaler",
            "1 while a HorizontalPodAutoscaler or KEDA ScaledObject also scales the target: scalecar decides but does not write",
            m.competing.clone(),
        );
        reg.register(
            "scalecar_accept_failures",
            "Failed accepts of a connection (out of file descriptors, mostly), by listener; each is retried after a backoff",
            m.accept_failures.clone(),
        );
        m
    }

    /// The failed-accept counter of one listener, resolved once by its
    /// accept loop (so the series exists, at 0, while the listener does).
    pub fn accept_failures(&self, listener: Listener) -> Counter {
        self.accept_failures
            .get_or_create_owned(&ListenerLabels { listener })
    }

    /// Whether another autoscaler claims `target` (absent when none does).
    pub fn set_competing(&self, target: &str, competing: bool) {
        let labels = TargetLabel {
            target: target.to_string(),
        };
        if competing {
            self.competing.get_or_create(&labels).set(1);
        } else {
            self.competing.remove(&labels);
        }
    }

    /// The handles of one pool, resolved once.
    /// The pool's TTFT target (`ttft-target`), for alerts to compare the
    /// TTFT histogram with; absent when the policy sets none.
    pub fn set_ttft_target(&self, model: &str, role: Role, target: Option<std::time::Duration>) {
        let labels = PoolLabels {
            model: model.to_string(),
            role: role.as_str().to_string(),
        };
        match target {
            Some(t) => {
                self.ttft_target.get_or_create(&labels).set(t.as_secs_f64());
            }
            None => {
                self.ttft_target.remove(&labels);
            }
        }
    }

    /// The handles of a workload's pool, under its first model name: the
    /// per-request series and the pool's gauges.
    pub fn pool(&self, model: &str, role: Role) -> PoolMetrics {
        let labels = PoolLabels {
            model: model.to_string(),
            role: role.as_str().to_string(),
        };
        let gauges = PoolGauges {
            in_flight: self.in_flight.get_or_create_owned(&labels),
            queued: self.queued.get_or_create_owned(&labels),
            tokens_in_flight: self.tokens_in_flight.get_or_create_owned(&labels),
            prompt_token_ratio: self.prompt_token_ratio.get_or_create_owned(&labels),
        };
        PoolMetrics {
            gauges: Some(gauges),
            ..self.alias(model, role)
        }
    }

    /// The handles of another name the same pool serves (a LoRA adapter,
    /// an alias): its requests, latencies and tokens are its own; the
    /// pool's in-flight, queued and tokens-in-flight gauges are the
    /// workload's and appear once, under its first name, so a sum over
    /// models does not count one pool twice.
    pub fn alias(&self, model: &str, role: Role) -> PoolMetrics {
        let labels = PoolLabels {
            model: model.to_string(),
            role: role.as_str().to_string(),
        };
        let outcome = |o: Outcome| {
            self.requests.get_or_create_owned(&OutcomeLabels {
                model: labels.model.clone(),
                role: labels.role.clone(),
                outcome: o,
            })
        };
        let tokens = |kind| {
            self.tokens.get_or_create_owned(&TokenLabels {
                model: labels.model.clone(),
                role: labels.role.clone(),
                kind,
            })
        };
        PoolMetrics {
            outcomes: Outcome::ALL.map(outcome),
            ttft: self.ttft.get_or_create_owned(&labels),
            itl: self.itl.get_or_create_owned(&labels),
            e2e: self.e2e.get_or_create_owned(&labels),
            queue_wait: self.queue_wait.get_or_create_owned(&labels),
            prompt_tokens: tokens(TokenKind::prompt),
            generated_tokens: tokens(TokenKind::generated),
            gauges: None,
        }
    }

    pub fn rejected(&self, reason: Rejection) {
        self.rejected
            .get_or_create(&RejectionLabels { reason })
            .inc();
    }
}

/// One pool's metric handles.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    outcomes: [Counter; 6],
    pub ttft: LatencyHistogram,
    pub itl: LatencyHistogram,
    pub e2e: LatencyHistogram,
    pub queue_wait: LatencyHistogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    /// The pool's own gauges: on its first name's handles only.
    pub gauges: Option<PoolGauges>,
}

/// A pool's state gauges, set from its signals at each scrape.
#[derive(Debug, Clone)]
pub struct PoolGauges {
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub tokens_in_flight: Gauge,
    pub prompt_token_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl PoolMetrics {
    pub fn outcome(&self, o: Outcome) {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        if let Some(c) = self.outcomes.get(i) {
            c.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_histograms_encode_cumulative_buckets() {
        let mut reg = Registry::default();
        let m = ProxyMetrics::register(&mut reg);
        let p = m.pool("m", Role::Unified);
        p.ttft.observe(Duration::from_millis(3));
        p.ttft.observe(Duration::from_millis(90));
        p.ttft.observe(Duration::from_secs(500));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(
                "scalecar_ttft_seconds_bucket{le=\"0.005\",model=\"m\",role=\"unified\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "scalecar_ttft_seconds_bucket{le=\"0.1\",model=\"m\",role=\"unified\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "scalecar_ttft_seconds_bucket{le=\"+Inf\",model=\"m\",role=\"unified\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("scalecar_ttft_seconds_count{model=\"m\",role=\"unified\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("scalecar_ttft_seconds_sum{model=\"m\",role=\"unified\"} 500.093"),
            "{text}"
        );
    }
}
