//! Connections to model servers: HTTP/1.1 keep-alive connections, pooled
//! per endpoint address.
//!
//! Each proxy worker thread owns one [`Upstream`], so a request, its
//! upstream connection and that connection's task all run on one thread:
//! no cross-thread wake-ups on the request path, and the idle lists' lock is
//! never contended (it is held for a push or a pop, never across `.await`).
//!
//! A connection is taken before the request is built, so a failed connect
//! hands the request's parts back untouched for a retry elsewhere. A pooled
//! connection goes back to its idle list when the response body has been
//! read to its end; a response dropped early (client gone, timeout) closes
//! the connection, which is how the model server learns to stop generating.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Sender = http1::SendRequest<Full<Bytes>>;

/// Why a request got no response from an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be made: safe to try another endpoint.
    #[error("endpoint {addr}: connect: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("endpoint {addr}: connect: no answer within {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("endpoint {addr}: HTTP/1.1 handshake: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The request was (or may have been) sent; no answer came.
    #[error("endpoint {addr}: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Nothing reached the endpoint: another may be tried.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Handshake { .. }
        )
    }
}

struct Idle {
    sender: Sender,
    /// The sweep generation it went idle in.
    since: u64,
}

/// How often [`Upstream::sweep`] should run, and how many sweeps a
/// connection may sit idle through (90 s in all).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(15);
const IDLE_SWEEPS: u64 = 6;

/// Keep-alive connections of one worker, by endpoint.
pub struct Upstream {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    max_idle_per_endpoint: usize,
    /// Sweeps so far: idle ages are counted in sweeps, so the request path
    /// reads no clock.
    generation: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Upstream {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
            max_idle_per_endpoint: 1024,
            generation: AtomicU64::new(0),
        })
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        // A panic while holding the lock cannot leave the lists torn (push
        // and pop only), so a poisoned lock is still good.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A ready idle connection to `addr`, newest first; stale ones found on
    /// the way are dropped.
    fn checkout(&self, addr: SocketAddr) -> Option<Sender> {
        let mut idle = self.lock();
        let list = idle.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if c.sender.is_ready() {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&self, addr: SocketAddr, sender: Sender) {
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle_per_endpoint {
            list.push(Idle {
                sender,
                since: self.generation.load(Ordering::Relaxed),
            });
        }
    }

    /// Drops closed connections, those idle through [`IDLE_SWEEPS`] sweeps,
    /// and endpoints with none left. Run every [`SWEEP_INTERVAL`].
    pub fn sweep(&self) {
        let now = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && now - c.since < IDLE_SWEEPS);
            !list.is_empty()
        });
    }

    /// Opens a new connection to `addr`; its task runs on the caller's
    /// runtime.
    async fn open(&self, addr: SocketAddr) -> Result<Sender, UpstreamError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
                Err(_) => {
                    return Err(UpstreamError::ConnectTimeout {
                        addr,
                        after: self.connect_timeout,
                    });
                }
            };
        // Tokens must not wait for Nagle.
        stream
            .set_nodelay(true)
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` set) to `addr` on a pooled
    /// connection or a new one. A pooled connection that turns out closed
    /// before the request went out is replaced by a new one, once.
    ///
    /// On a connect failure the request comes back for a retry elsewhere.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, PooledConnection), (UpstreamError, Option<Request<Full<Bytes>>>)>
    {
        let mut req = req;
        let mut pooled = self.checkout(addr);
        loop {
            let reused = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(s) => s,
                None => match self.open(addr).await {
                    Ok(s) => s,
                    Err(e) => return Err((e, Some(req))),
                },
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let conn = PooledConnection {
                        sender,
                        addr,
                        upstream: self.clone(),
                    };
                    return Ok((resp, conn));
                }
                Err(mut e) => match e.take_message() {
                    // It never left: the kept-alive connection had closed.
                    Some(back) if reused => req = back,
                    back => {
                        return Err((
                            UpstreamError::Request {
                                addr,
                                source: e.into_error(),
                            },
                            back,
                        ));
                    }
                },
            }
        }
    }
}

/// The connection a response is read from; back to the idle list once the
/// body has ended ([`PooledConnection::release`]), closed if dropped before.
pub struct PooledConnection {
    sender: Sender,
    addr: SocketAddr,
    upstream: Arc<Upstream>,
}

impl std::fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledConnection")
            .field("addr", &self.addr)
            .finish()
    }
}

impl PooledConnection {
    /// The response was read to its end: keep the connection for the next
    /// request. The connection's task usually has it ready by now; when it
    /// has not, a small task waits for it.
    pub fn release(self) {
        let PooledConnection {
            mut sender,
            addr,
            upstream,
        } = self;
        if sender.is_ready() {
            upstream.checkin(addr, sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    upstream.checkin(addr, sender);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1.1 server counting its accepted connections.
    async fn server(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: SocketAddr) -> Request<Full<Bytes>> {
        Request::builder()
            .uri("/x")
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// One request read to its end, its connection released.
    async fn round_trip(up: &Arc<Upstream>, addr: SocketAddr) -> Bytes {
        let (resp, conn) = up.send(addr, get(addr)).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        conn.release();
        body
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_reused() {
        let (addr, accepted) = server(true).await;
        let up = Upstream::new(Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(&round_trip(&up, addr).await[..], b"ok");
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(up.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_dropped_response_closes_its_connection() {
        let (addr, accepted) = server(true).await;
        let up = Upstream::new(Duration::from_secs(1));
        let (resp, conn) = up.send(addr, get(addr)).await.unwrap();
        drop((resp, conn));
        round_trip(&up, addr).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_gives_the_request_back() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let up = Upstream::new(Duration::from_secs(1));
        let (err, back) = up.send(addr, get(addr)).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().contains(&addr.to_string()));
        assert_eq!(back.unwrap().uri().path(), "/x");
    }

    #[tokio::test]
    async fn connections_idle_through_six_sweeps_are_dropped() {
        let (addr, accepted) = server(true).await;
        let up = Upstream::new(Duration::from_secs(1));
        round_trip(&up, addr).await;
        for _ in 0..IDLE_SWEEPS - 1 {
            up.sweep();
        }
        assert_eq!(up.idle_count(), 1);
        up.sweep();
        assert_eq!(up.idle_count(), 0);
        round_trip(&up, addr).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn closed_connections_are_not_reused_and_are_swept() {
        // The server closes each connection after its response.
        let (addr, accepted) = server(false).await;
        let up = Upstream::new(Duration::from_secs(1));
        for _ in 0..3 {
            round_trip(&up, addr).await;
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
        // Wait for the connection tasks to see the close, then sweep.
        while up.lock().values().flatten().any(|c| !c.sender.is_closed()) {
            tokio::task::yield_now().await;
        }
        up.sweep();
        assert_eq!(up.idle_count(), 0);
    }
}
