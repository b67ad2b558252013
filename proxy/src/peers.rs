//! The other gateway replicas, as the leader sees them: their addresses
//! (pods of the gateway's own selector, at their container port named
//! `admin`), and their windows, asked for every tick with the shared token:
//! one `POST /internal/snapshots` per peer for every pool at once, over a
//! connection kept from tick to tick (a peer older than that endpoint
//! answers 404 and is asked pool by pool at `/internal/snapshot`).
//!
//! Every peer is asked at once and waited for at most the peer timeout; a
//! peer that does not answer in time, refuses, or answers nonsense is left
//! out and the decision is marked partial (it may scale up, never down),
//! counted in `scalecar_peer_errors_total{reason}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use scalecar_scaler::control::{Gathered, PeerAsk, PeerSource};
use scalecar_scaler::peer::{PeerSnapshot, SnapshotAnswers, SnapshotAsk, SnapshotAsks};
use scalecar_scaler::target::BoxFuture;

/// The header and scheme peers authenticate with.
pub const TOKEN_ENV: &str = "SCALECAR_PEER_TOKEN";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `timeout`, `unreachable`, `refused` (not 200) or `invalid`.
    reason: &'static str,
}

/// The peers and how to ask them.
pub struct PeerSet {
    addrs: ArcSwap<Vec<SocketAddr>>,
    token: String,
    timeout: Duration,
    errors: Family<ErrorLabels, Counter>,
    /// Keeps one idle connection per peer between ticks.
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSet")
            .field("addrs", &self.addrs)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why a peer's batch answer could not be used; `Old`: it has no batch
/// endpoint, ask it pool by pool.
enum BatchError {
    Old,
    Failed(&'static str),
}

impl PeerSet {
    /// Registers `scalecar_peer_errors_total`, every reason at 0 (whether
    /// or not peers are configured: dashboards and alerts query it).
    pub fn register_errors(reg: &mut Registry) -> Family<ErrorLabels, Counter> {
        let errors: Family<ErrorLabels, Counter> = Family::default();
        for reason in ["timeout", "unreachable", "refused", "invalid"] {
            drop(errors.get_or_create(&ErrorLabels { reason }));
        }
        reg.register(
            "scalecar_peer_errors",
            "Peer window snapshots the leader could not use, by reason (timeout, unreachable, refused, invalid)",
            errors.clone(),
        );
        errors
    }

    pub fn new(
        errors: Family<ErrorLabels, Counter>,
        token: String,
        timeout: Duration,
    ) -> Arc<Self> {
        // Idle longer than a few ticks: the peer is gone or the set
        // changed; a new connection costs one round trip.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build_http();
        Arc::new(PeerSet {
            addrs: ArcSwap::from_pointee(Vec::new()),
            token,
            timeout,
            errors,
            client,
        })
    }

    /// The peers now (not this replica).
    pub fn set(&self, addrs: Vec<SocketAddr>) {
        self.addrs.store(Arc::new(addrs));
    }

    pub fn addrs(&self) -> Arc<Vec<SocketAddr>> {
        self.addrs.load_full()
    }

    fn failed(&self, reason: &'static str) {
        self.errors.get_or_create(&ErrorLabels { reason }).inc();
    }

    /// Every pool at once, from one peer.
    async fn ask_all(
        &self,
        peer: SocketAddr,
        asks: &[PeerAsk],
    ) -> Result<Vec<Option<PeerSnapshot>>, BatchError> {
        let body = SnapshotAsks {
            asks: asks
                .iter()
                .map(|a| SnapshotAsk {
                    model: a.model.clone(),
                    role: a.role.as_str().to_string(),
                    window_ms: u64::try_from(a.window.as_millis()).unwrap_or(u64::MAX),
                    panic_window_ms: u64::try_from(a.panic_window.as_millis()).unwrap_or(u64::MAX),
                    histograms: Some(a.latencies.names()),
                })
                .collect(),
        };
        let body = serde_json::to_vec(&body).map_err(|_| BatchError::Failed("invalid"))?;
        let req = http::Request::post(format!("http://{peer}/internal/snapshots"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| BatchError::Failed("invalid"))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|_| BatchError::Failed("unreachable"))?;
        match resp.status() {
            http::StatusCode::OK => {}
            http::StatusCode::NOT_FOUND | http::StatusCode::METHOD_NOT_ALLOWED => {
                return Err(BatchError::Old);
            }
            _ => return Err(BatchError::Failed("refused")),
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| BatchError::Failed("unreachable"))?
            .to_bytes();
        let answers: SnapshotAnswers =
            serde_json::from_slice(&body).map_err(|_| BatchError::Failed("invalid"))?;
        if answers.snapshots.len() != asks.len() {
            return Err(BatchError::Failed("invalid"));
        }
        Ok(answers.snapshots)
    }

    /// One peer's answers for `asks`, in order, within the peer timeout.
    async fn ask_peer(
        &self,
        peer: SocketAddr,
        asks: &[PeerAsk],
    ) -> Vec<Result<PeerSnapshot, &'static str>> {
        let call = async {
            match self.ask_all(peer, asks).await {
                Ok(answers) => answers.into_iter().map(|a| a.ok_or("refused")).collect(),
                Err(BatchError::Failed(reason)) => vec![Err(reason); asks.len()],
                Err(BatchError::Old) => {
                    futures_util::future::join_all(asks.iter().map(|a| self.ask(peer, a))).await
                }
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| vec![Err("timeout"); asks.len()])
    }

    /// One pool's windows, at the endpoint peers had before the batch one.
    async fn ask(&self, peer: SocketAddr, ask: &PeerAsk) -> Result<PeerSnapshot, &'static str> {
        let path = format!(
            "/internal/snapshot?model={}&role={}&window_ms={}&panic_window_ms={}",
            form_urlencoded::byte_serialize(ask.model.as_bytes()).collect::<String>(),
            ask.role.as_str(),
            ask.window.as_millis(),
            ask.panic_window.as_millis()
        );
        let call = async {
            let stream = tokio::net::TcpStream::connect(peer)
                .await
                .map_err(|_| "unreachable")?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|_| "unreachable")?;
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header(http::header::HOST, peer.to_string())
                .header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", self.token),
                )
                .body(Empty::<Bytes>::new())
                .map_err(|_| "invalid")?;
            let resp = send.send_request(req).await.map_err(|_| "unreachable")?;
            if resp.status() != http::StatusCode::OK {
                return Err("refused");
            }
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|_| "unreachable")?
                .to_bytes();
            serde_json::from_slice::<PeerSnapshot>(&body).map_err(|_| "invalid")
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| "timeout")?
    }
}

impl PeerSource for PeerSet {
    fn gather(&self, asks: Vec<PeerAsk>) -> BoxFuture<'_, Vec<Gathered>> {
        Box::pin(async move {
            let peers = self.addrs();
            let mut out: Vec<Gathered> = asks.iter().map(|_| Gathered::default()).collect();
            if asks.is_empty() {
                return out;
            }
            // Every peer at once, each for every pool: the slowest bounds
            // the wait, at the peer timeout.
            let asks = &asks;
            let calls = peers
                .iter()
                .map(|&peer| async move { (peer, self.ask_peer(peer, asks).await) });
            for (peer, answers) in futures_util::future::join_all(calls).await {
                for (g, answer) in out.iter_mut().zip(answers) {
                    match answer {
                        Ok(s) => g.snapshots.push(s),
                        Err(reason) => {
                            tracing::debug!(%peer, reason, "peer left out of this decision");
                            self.failed(reason);
                            g.partial = true;
                        }
                    }
                }
            }
            out
        })
    }
}

/// Whether `header` carries `token` (compared in constant time: the
/// token guards the windows of every pool).
pub fn authorized(header: Option<&http::HeaderValue>, token: &str) -> bool {
    let Some(given) = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    if token.is_empty() || given.len() != token.len() {
        return false;
    }
    given
        .bytes()
        .zip(token.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use scalecar_config::Role;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// What a fake peer saw.
    #[derive(Debug, Default)]
    struct Seen {
        connections: AtomicUsize,
        batches: AtomicUsize,
        singles: AtomicUsize,
    }

    fn snapshot() -> PeerSnapshot {
        let clock = Arc::new(scalecar_scaler::clock::MonotonicClock::new());
        let p = scalecar_scaler::signals::PoolSignals::new(
            scalecar_scaler::signals::SignalsConfig::default(),
            clock,
        );
        p.arrival(10);
        p.first_token(10, Duration::from_millis(40));
        scalecar_scaler::peer::PeerSnapshot::all(
            &p,
            Duration::from_secs(60),
            Duration::from_secs(6),
        )
    }

    /// A peer on 127.0.0.1:0: with `batch`, it serves
    /// `/internal/snapshots` (no pool named `absent`); without, only the
    /// single-pool endpoint, as peers before it did.
    async fn peer(batch: bool) -> (SocketAddr, Arc<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let s = s.clone();
                            async move {
                                let ok = |body: String| {
                                    Ok::<_, std::convert::Infallible>(http::Response::new(
                                        Full::new(Bytes::from(body)),
                                    ))
                                };
                                let status = |code: u16| {
                                    let mut r = http::Response::new(Full::new(Bytes::new()));
                                    *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
                                    Ok(r)
                                };
                                if !authorized(
                                    req.headers().get(http::header::AUTHORIZATION),
                                    "t0ken",
                                ) {
                                    return status(403);
                                }
                                match (req.method().as_str(), req.uri().path()) {
                                    ("POST", "/internal/snapshots") if batch => {
                                        s.batches.fetch_add(1, Ordering::SeqCst);
                                        let body =
                                            req.into_body().collect().await.unwrap().to_bytes();
                                        let asks: SnapshotAsks =
                                            serde_json::from_slice(&body).unwrap();
                                        // Only what the decision reads is asked for.
                                        let only_ttft = asks.asks.iter().all(|a| {
                                            a.histograms.as_deref()
                                                == Some(&["ttft".to_string()][..])
                                        });
                                        if !only_ttft {
                                            return status(400);
                                        }
                                        let snapshots = asks
                                            .asks
                                            .iter()
                                            .map(|a| (a.model != "absent").then(snapshot))
                                            .collect();
                                        ok(serde_json::to_string(&SnapshotAnswers { snapshots })
                                            .unwrap())
                                    }
                                    ("GET", "/internal/snapshot") => {
                                        s.singles.fetch_add(1, Ordering::SeqCst);
                                        ok(serde_json::to_string(&snapshot()).unwrap())
                                    }
                                    _ => status(404),
                                }
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    fn asks(models: &[&str]) -> Vec<PeerAsk> {
        models
            .iter()
            .map(|m| PeerAsk {
                model: (*m).into(),
                role: Role::Unified,
                window: Duration::from_secs(60),
                panic_window: Duration::from_secs(6),
                latencies: scalecar_scaler::snapshot::Latencies::TTFT,
            })
            .collect()
    }

    fn set(peers: Vec<SocketAddr>) -> Arc<PeerSet> {
        let errors = PeerSet::register_errors(&mut Registry::default());
        let s = PeerSet::new(errors, "t0ken".into(), Duration::from_secs(2));
        s.set(peers);
        s
    }

    /// Three ticks over three pools and two peers: one request per peer per
    /// tick, on one connection per peer.
    #[tokio::test]
    async fn each_peer_is_asked_once_a_tick_on_a_kept_connection() {
        let (a, seen_a) = peer(true).await;
        let (b, seen_b) = peer(true).await;
        let peers = set(vec![a, b]);
        for _ in 0..3 {
            let g = peers.gather(asks(&["m1", "m2", "m3"])).await;
            assert_eq!(g.len(), 3);
            for pool in &g {
                assert_eq!(pool.snapshots.len(), 2);
                assert!(!pool.partial);
            }
        }
        for seen in [seen_a, seen_b] {
            assert_eq!(seen.batches.load(Ordering::SeqCst), 3);
            assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
            assert_eq!(seen.singles.load(Ordering::SeqCst), 0);
        }
    }

    /// A pool a peer does not have makes that pool's decision partial, not
    /// the others'; a peer without the batch endpoint is asked pool by pool.
    #[tokio::test]
    async fn a_missing_pool_is_partial_and_an_old_peer_is_asked_per_pool() {
        let (new, _) = peer(true).await;
        let g = set(vec![new]).gather(asks(&["m1", "absent"])).await;
        assert!(!g[0].partial && g[0].snapshots.len() == 1);
        assert!(g[1].partial && g[1].snapshots.is_empty());
        let (old, seen) = peer(false).await;
        let g = set(vec![old]).gather(asks(&["m1", "m2"])).await;
        assert!(g.iter().all(|p| !p.partial && p.snapshots.len() == 1));
        assert_eq!(seen.singles.load(Ordering::SeqCst), 2);
        // An unreachable peer: every pool partial.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let g = set(vec![gone]).gather(asks(&["m1", "m2"])).await;
        assert!(g.iter().all(|p| p.partial));
    }

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert!(authorized(Some(&v("Bearer s3cret")), "s3cret"));
        assert!(!authorized(Some(&v("Bearer s3cre")), "s3cret"));
        assert!(!authorized(Some(&v("Bearer s3creT")), "s3cret"));
        assert!(!authorized(Some(&v("s3cret")), "s3cret"));
        assert!(!authorized(None, "s3cret"));
        // No token configured: nobody is.
        assert!(!authorized(Some(&v("Bearer ")), ""));
    }
}
