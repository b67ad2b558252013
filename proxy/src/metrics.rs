//! Prometheus metrics of the data plane (`scalecar_` prefix, base units,
//! labels `model` and `role` only — closed sets from the config, never
//! per-request or per-pod values). Label handles are resolved once per pool
//! and outcome, so a request touches only atomics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use scalecar_config::Role;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    ok,
    upstream_error,
    cancelled,
    queue_full,
    queue_timeout,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::ok,
        Outcome::upstream_error,
        Outcome::cancelled,
        Outcome::queue_full,
        Outcome::queue_timeout,
    ];
}

/// Why a request was refused before it reached a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Rejection {
    bad_request,
    body_too_large,
    unknown_model,
    not_found,
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

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 5 ms … 2 min: ITL lives in the low end, TTFT under load in the high.
    [
        0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
        5.0, 10.0, 20.0, 40.0, 80.0, 120.0,
    ]
    .into_iter()
}

/// Every data-plane metric family.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    requests: Family<OutcomeLabels, Counter>,
    rejected: Family<RejectionLabels, Counter>,
    ttft: Family<PoolLabels, Histogram>,
    itl: Family<PoolLabels, Histogram>,
    e2e: Family<PoolLabels, Histogram>,
    queue_wait: Family<PoolLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    in_flight: Family<PoolLabels, Gauge>,
    queued: Family<PoolLabels, Gauge>,
    tokens_in_flight: Family<PoolLabels, Gauge>,
}

fn histograms() -> Family<PoolLabels, Histogram> {
    Family::new_with_constructor(|| Histogram::new(latency_buckets()))
}

impl ProxyMetrics {
    pub fn register(reg: &mut Registry) -> Self {
        let m = ProxyMetrics {
            requests: Family::default(),
            rejected: Family::default(),
            ttft: histograms(),
            itl: histograms(),
            e2e: histograms(),
            queue_wait: histograms(),
            tokens: Family::default(),
            in_flight: Family::default(),
            queued: Family::default(),
            tokens_in_flight: Family::default(),
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
            "Requests at an endpoint now",
            m.in_flight.clone(),
        );
        reg.register(
            "scalecar_queued_requests",
            "Requests in the admission queue now",
            m.queued.clone(),
        );
        reg.register(
            "scalecar_tokens_in_flight",
            "Prompt and generated tokens of requests in flight now",
            m.tokens_in_flight.clone(),
        );
        m
    }

    /// The handles of one pool, resolved once.
    pub fn pool(&self, model: &str, role: Role) -> PoolMetrics {
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
            in_flight: self.in_flight.get_or_create_owned(&labels),
            queued: self.queued.get_or_create_owned(&labels),
            tokens_in_flight: self.tokens_in_flight.get_or_create_owned(&labels),
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
    outcomes: [Counter; 5],
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_wait: Histogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub tokens_in_flight: Gauge,
}

impl PoolMetrics {
    pub fn outcome(&self, o: Outcome) {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        if let Some(c) = self.outcomes.get(i) {
            c.inc();
        }
    }
}
