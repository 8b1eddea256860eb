//! Forwarding one request to another HTTP server, as a reverse proxy does: the body streams
//! both ways (never buffered), hop-by-hop headers (RFC 9110 §7.6.1) are dropped, and an
//! HTTP/1.1 upgrade (WebSocket) is spliced through once the target answers 101.
//!
//! Shared by the control plane's edge proxy and the host agent's proxy into sandboxes. Routing,
//! and the error bodies each of them answers, stay with the callers.
//!
//! [`forward_until`] ties the whole exchange to a cancellation token: when it fires, a request
//! still waiting for its answer fails, a response body still streaming ends with an error (the
//! client sees its connection or HTTP/2 stream reset, not a clean end) and a spliced upgrade is
//! closed. The agent fires it when a sandbox is killed or paused: a guest that is gone sends no
//! FIN or RST, so without it a proxied stream would hang until TCP gave up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::connect::{Connector, request_base};

/// The pooled HTTP/1.1 client that [`forward`] sends with (over TCP or a Unix socket).
pub type HttpClient = Client<Connector, Body>;

/// Idle pooled connections are closed after this long (below the idle timeouts of our own
/// servers, so the pool rarely picks a connection the other side is closing).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A pooled client for [`forward`]: TCP_NODELAY (proxied streams carry small messages), the
/// given connect timeout, and no response timeout (streams may last for hours).
pub fn client(connect_timeout: Duration) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(Connector::new(connect_timeout))
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// `base` plus the request's path is not a URI.
    #[error("bad target address {0:?}")]
    BadTarget(String),
    /// Nothing listens at the target (the connection was refused).
    #[error("connection refused: {0}")]
    Refused(#[source] hyper_util::client::legacy::Error),
    /// The target could not be reached otherwise (timeout, no route, ...).
    #[error("could not connect: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
    /// The target was reached but failed before sending a response.
    #[error("no response: {0}")]
    Failed(#[source] hyper_util::client::legacy::Error),
    /// The target accepted an upgrade that the client's connection cannot make (not HTTP/1.1).
    #[error("the client's connection cannot be upgraded")]
    NotUpgradable,
    /// The exchange was stopped (its token fired) before the target answered.
    #[error("stopped before the target answered")]
    Stopped,
}

/// Forwards `req` to `base` (`http://host:port`, optionally with a path prefix, or a Unix
/// socket `unix:/path`) plus the request's path and query, and returns the target's response
/// with its body streaming.
///
/// The caller sets any headers the target needs on `req` beforehand; `Host` is replaced by the
/// target's. When the target answers 101, the two upgraded connections are spliced together on
/// a spawned task and the 101 is returned (with its `Connection`/`Upgrade` headers).
pub async fn forward(
    client: &HttpClient,
    base: &str,
    req: Request<Body>,
) -> Result<Response<Body>, ForwardError> {
    forward_until(client, base, req, CancellationToken::new()).await
}

/// [`forward`], ended when `stop` fires: the answer is awaited, the response body streamed and
/// an upgraded connection spliced only until then.
pub async fn forward_until(
    client: &HttpClient,
    base: &str,
    req: Request<Body>,
    stop: CancellationToken,
) -> Result<Response<Body>, ForwardError> {
    let (mut parts, body) = req.into_parts();
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let upgrade = upgrade_protocol(&parts.headers);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let target = format!(
        "{}{}",
        request_base(base).map_err(|_| ForwardError::BadTarget(base.to_owned()))?,
        path
    );
    let uri: Uri = target
        .parse()
        .map_err(|_| ForwardError::BadTarget(base.to_owned()))?;

    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;

    let mut resp = tokio::select! {
        r = client.request(out) => r.map_err(classify_error)?,
        () = stop.cancelled() => return Err(ForwardError::Stopped),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let client_side = on_upgrade.ok_or(ForwardError::NotUpgradable)?;
        let target_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let splice = async {
                let (a, b) = tokio::try_join!(client_side, target_side)?;
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                tokio::io::copy_bidirectional(&mut a, &mut b).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            tokio::select! {
                r = splice => if let Err(e) = r {
                    tracing::debug!(%target, error = %e, "upgraded connection ended");
                },
                () = stop.cancelled() => tracing::debug!(%target, "upgraded connection stopped"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        Body::new(Until {
            inner: body,
            stop: Some(Box::pin(stop.cancelled_owned())),
        }),
    ))
}

/// A response body that fails once its token fires, whatever the target still sends.
struct Until<B> {
    inner: B,
    /// `None` once fired: the future is not polled again after it completed.
    stop: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<B> http_body::Body for Until<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(stop) = self.stop.as_mut() {
            if stop.as_mut().poll(cx).is_ready() {
                self.stop = None;
                return Poll::Ready(Some(Err("the forwarded exchange was stopped".into())));
            }
        } else {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.stop.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn classify_error(e: hyper_util::client::legacy::Error) -> ForwardError {
    if !e.is_connect() {
        return ForwardError::Failed(e);
    }
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return ForwardError::Refused(e);
            }
            break;
        }
        source = s.source();
    }
    ForwardError::Connect(e)
}

/// The protocol the client asks to upgrade to, if it asks (`Connection: upgrade`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Removes the headers that describe one hop, not the message (RFC 9110 §7.6.1): those listed
/// in `Connection` and the well-known ones.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-access-token", HeaderValue::from_static("t"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-access-token"));
    }

    #[test]
    fn upgrade_is_detected_in_a_connection_list() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade_protocol(&h),
            Some(HeaderValue::from_static("websocket"))
        );
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        assert_eq!(upgrade_protocol(&h), None);
    }
}
