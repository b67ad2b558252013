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
//!
//! Kept-alive connections go stale: uvicorn (vLLM, SGLang) closes them after
//! 5 s idle, and llama.cpp's server closes each one right after a stream
//! while advertising keep-alive. So idle connections are reused only for
//! `limits.upstream-idle-timeout` (4 s), and a request that fails on a
//! reused connection before any response byte came back is sent once more
//! on a fresh connection — it is the connection that failed, not the
//! endpoint.

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

/// Keep-alive connections of one worker, by endpoint.
///
/// Idle ages are counted in sweeps ([`Upstream::sweep_interval`], a quarter
/// of the idle timeout, at most 1 s), so the request path reads no clock:
/// a connection idle through `idle_sweeps` sweeps is not reused, which
/// keeps its idle time at most the timeout.
pub struct Upstream {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    sweep_interval: Duration,
    idle_sweeps: u64,
    generation: AtomicU64,
    max_idle_per_endpoint: usize,
    /// Requests resent on a fresh connection after a reused one failed.
    resent: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        let sweep_interval =
            (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let idle_sweeps =
            (idle_timeout.as_micros() / sweep_interval.as_micros().max(1)).max(1) as u64;
        Arc::new(Upstream {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
            sweep_interval,
            idle_sweeps,
            generation: AtomicU64::new(0),
            max_idle_per_endpoint: 1024,
            resent: AtomicU64::new(0),
        })
    }

    /// How often [`Upstream::sweep`] must run.
    pub fn sweep_interval(&self) -> Duration {
        self.sweep_interval
    }

    /// Requests sent once more on a fresh connection because the reused
    /// one had closed.
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
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

    /// A ready idle connection to `addr`, newest first; closed ones found
    /// on the way are dropped, and once one is too old so are all older.
    fn checkout(&self, addr: SocketAddr) -> Option<Sender> {
        let mut idle = self.lock();
        let list = idle.get_mut(&addr)?;
        let now = self.generation.load(Ordering::Relaxed);
        while let Some(c) = list.pop() {
            if now - c.since >= self.idle_sweeps {
                list.clear();
                return None;
            }
            if c.sender.is_ready() {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&self, addr: SocketAddr, sender: Sender) {
        let since = self.generation.load(Ordering::Relaxed);
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle_per_endpoint {
            list.push(Idle { sender, since });
        }
    }

    /// Ages idle connections by one sweep; drops closed and expired ones,
    /// and endpoints with none left. Run every [`Upstream::sweep_interval`].
    pub fn sweep(&self) {
        let now = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let max = self.idle_sweeps;
        self.lock().retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && now - c.since < max);
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
    /// connection or a new one. A pooled connection that fails before any
    /// response byte arrived (it had closed, whether or not the request
    /// left) is replaced by a new one, once.
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
            // A copy to send again if the kept-alive connection turns out
            // closed after the request went out (the body is a shared
            // `Bytes`; the copy is of the head only).
            let spare = reused.then(|| duplicate(&req));
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let conn = PooledConnection {
                        sender,
                        addr,
                        upstream: self.clone(),
                    };
                    return Ok((resp, conn));
                }
                Err(mut e) => {
                    let back = e.take_message();
                    match back.or(spare) {
                        Some(again) if reused => {
                            tracing::debug!(endpoint = %addr, error = %e.error(), "kept-alive connection had closed; sending on a fresh one");
                            self.resent.fetch_add(1, Ordering::Relaxed);
                            req = again;
                        }
                        back => {
                            return Err((
                                UpstreamError::Request {
                                    addr,
                                    source: e.into_error(),
                                },
                                back,
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// The same request again (head cloned, body shared).
fn duplicate(req: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut r = Request::new(req.body().clone());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
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
        let up = Upstream::new(Duration::from_secs(1), Duration::from_secs(4));
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
        let up = Upstream::new(Duration::from_secs(1), Duration::from_secs(4));
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
        let up = Upstream::new(Duration::from_secs(1), Duration::from_secs(4));
        let (err, back) = up.send(addr, get(addr)).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().contains(&addr.to_string()));
        assert_eq!(back.unwrap().uri().path(), "/x");
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_not_reused() {
        let (addr, accepted) = server(true).await;
        // 4 s: swept every second, reused through three sweeps, not four.
        let up = Upstream::new(Duration::from_secs(1), Duration::from_secs(4));
        assert_eq!(up.sweep_interval(), Duration::from_secs(1));
        round_trip(&up, addr).await;
        round_trip(&up, addr).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        for _ in 0..3 {
            up.sweep();
        }
        round_trip(&up, addr).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        for _ in 0..4 {
            up.sweep();
        }
        assert_eq!(up.idle_count(), 0);
        round_trip(&up, addr).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    /// A server that closes every connection after one response, while
    /// saying keep-alive (as llama.cpp's server does).
    async fn closing_server() -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\nok")
                        .await;
                    // Closes without a word, like the real one — here
                    // only once the next request has arrived, so the race
                    // the real server wins now and then is lost every time.
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        (addr, served)
    }

    #[tokio::test]
    async fn a_reused_connection_that_closed_is_replaced_without_an_error() {
        let (addr, served) = closing_server().await;
        let up = Upstream::new(Duration::from_secs(1), Duration::from_secs(4));
        for i in 0..1000 {
            let (resp, conn) = up
                .send(addr, get(addr))
                .await
                .unwrap_or_else(|(e, _)| panic!("request {i}: {e}"));
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            conn.release();
        }
        assert_eq!(served.load(Ordering::Relaxed), 1000);
        assert!(up.resent() >= 999, "{}", up.resent());
    }

    #[tokio::test]
    async fn closed_connections_are_not_reused_and_are_swept() {
        // The server closes each connection after its response.
        let (addr, accepted) = server(false).await;
        let up = Upstream::new(Duration::from_secs(1), Duration::from_secs(4));
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
