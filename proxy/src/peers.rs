//! The other gateway replicas, as the leader sees them: their addresses
//! (pods of the gateway's own selector, at their container port named
//! `admin`), and their windows, asked for every tick from
//! `/internal/snapshot` with the shared token.
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
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use scalecar_scaler::control::{Gathered, PeerAsk, PeerSource};
use scalecar_scaler::peer::PeerSnapshot;
use scalecar_scaler::target::BoxFuture;

/// The header and scheme peers authenticate with.
pub const TOKEN_ENV: &str = "SCALECAR_PEER_TOKEN";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `timeout`, `unreachable`, `refused` (not 200) or `invalid`.
    reason: &'static str,
}

/// The peers and how to ask them.
#[derive(Debug)]
pub struct PeerSet {
    addrs: ArcSwap<Vec<SocketAddr>>,
    token: String,
    timeout: Duration,
    errors: Family<ErrorLabels, Counter>,
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
        Arc::new(PeerSet {
            addrs: ArcSwap::from_pointee(Vec::new()),
            token,
            timeout,
            errors,
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
            // Every peer, every pool, all at once: the slowest bounds the
            // wait, at the peer timeout.
            let calls = peers.iter().flat_map(|&peer| {
                asks.iter()
                    .enumerate()
                    .map(move |(i, ask)| async move { (i, peer, self.ask(peer, ask).await) })
            });
            for (i, peer, answer) in futures_util::future::join_all(calls).await {
                let Some(g) = out.get_mut(i) else { continue };
                match answer {
                    Ok(s) => g.snapshots.push(s),
                    Err(reason) => {
                        tracing::debug!(%peer, reason, "peer left out of this decision");
                        self.failed(reason);
                        g.partial = true;
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
