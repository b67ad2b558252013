//! The body of every response the proxy returns.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;

use crate::observe::ObservedBody;

/// The body of every response: one the proxy made, or a model server's
/// observed on its way. An enum rather than a boxed trait object: no
/// allocation and no dynamic call per frame.
// The observed variant is large (its observation, connection and span);
// boxing it would cost an allocation per request on the hot path, while a
// response is moved only a few times.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ProxyBody {
    Full(Full<Bytes>),
    Observed(ObservedBody<Incoming>),
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ProxyBody::Observed(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as Self::Error),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Observed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Observed(b) => b.size_hint(),
        }
    }
}

/// A response body the proxy made itself.
pub(crate) fn full(body: impl Into<Bytes>) -> ProxyBody {
    ProxyBody::Full(Full::new(body.into()))
}
