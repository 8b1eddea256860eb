//! Serving an axum app on one accepted connection: HTTP/1.1 and h2c (auto-detected), upgrades
//! (WebSocket), a header-read timeout, an idle timeout that only counts time with no request in
//! flight (a streaming response counts as in flight until its body is dropped), and a graceful
//! close on request.
//!
//! Every HTTP server of Wrenn (envd, the control plane, the agent) serves connections through
//! [`serve_connection`], so hung or idle peers cannot hold tasks forever. Its proxies forward
//! requests with [`forward`].
//!
//! An HTTP/1.1 response given before its request's body was read to the end (a refusal of an
//! upload, say) carries `Connection: close`: the server cannot reuse that connection, and
//! without the header a pooling client (our proxies) would send its next request on a
//! connection the server is closing, and lose it.

#![forbid(unsafe_code)]

pub mod connect;
pub mod forward;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;
use tower::ServiceExt;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// A client must send its request headers within this time.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// Requests in flight on one connection; shared with whoever wants to close idle connections.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Serves `app` on `stream` (TCP, or a Unix socket) until the peer closes, the connection
/// stays idle for `opts.idle_timeout`, or `close` completes; the last two close gracefully
/// (requests in flight finish first). `peer` only names the peer in logs.
pub async fn serve_connection<S>(
    app: axum::Router,
    stream: S,
    peer: impl std::fmt::Display,
    opts: ConnOptions,
    in_flight: InFlight,
    close: impl Future<Output = ()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Notify::new());
    let service = {
        let (in_flight, activity) = (in_flight.clone(), activity.clone());
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let guard = Guard::new(in_flight.clone(), activity.clone());
            let app = app.clone();
            async move {
                let http1 = req.version() < http::Version::HTTP_2;
                let (parts, incoming) = req.into_parts();
                let read = Arc::new(AtomicBool::new(incoming.is_end_stream()));
                let body = ReadToEnd {
                    inner: incoming,
                    read: read.clone(),
                };
                let mut resp = app
                    .oneshot(hyper::Request::from_parts(
                        parts,
                        axum::body::Body::new(body),
                    ))
                    .await
                    .unwrap_or_else(|e| match e {});
                if http1
                    && !read.load(Ordering::Acquire)
                    && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
                {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp.map(|body| GuardedBody {
                    inner: body,
                    _guard: guard,
                }))
            }
        })
    };

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::pin!(close);

    let mut closing = false;
    loop {
        let idle = async {
            loop {
                tokio::select! {
                    _ = activity.notified() => continue,
                    _ = tokio::time::sleep(opts.idle_timeout) => {
                        if in_flight.get() == 0 { return; }
                    }
                }
            }
        };
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = &mut close, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle, if !closing => {
                tracing::debug!(%peer, "closing idle connection");
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Counts a request as in flight until its response body is dropped (streams included).
struct Guard {
    count: InFlight,
    activity: Arc<Notify>,
}

impl Guard {
    fn new(count: InFlight, activity: Arc<Notify>) -> Self {
        count.0.fetch_add(1, Ordering::AcqRel);
        activity.notify_one();
        Guard { count, activity }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.count.0.fetch_sub(1, Ordering::AcqRel);
        self.activity.notify_one();
    }
}

/// A request body that records when it has been read to its end.
struct ReadToEnd {
    inner: hyper::body::Incoming,
    read: Arc<AtomicBool>,
}

impl Body for ReadToEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct GuardedBody {
    inner: axum::body::Body,
    _guard: Guard,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve_one(opts: ConnOptions) -> (SocketAddr, InFlight, Arc<Notify>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let in_flight = InFlight::default();
        let close = Arc::new(Notify::new());
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            // Refuses without reading the body, as an auth check does.
            .route(
                "/refuse",
                axum::routing::post(|| async { http::StatusCode::UNAUTHORIZED }),
            )
            .route(
                "/read",
                axum::routing::post(|body: Bytes| async move { format!("{}", body.len()) }),
            );
        let (f, c) = (in_flight.clone(), close.clone());
        tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            serve_connection(
                app,
                stream,
                peer,
                opts,
                f,
                async move { c.notified().await },
            )
            .await;
        });
        (addr, in_flight, close)
    }

    async fn get(stream: &mut tokio::net::TcpStream) -> String {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    async fn closed(stream: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0))
        )
    }

    async fn post(stream: &mut tokio::net::TcpStream, path: &str) -> String {
        let body = vec![b'x'; 1000];
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        // Small enough to sit in the server's buffer: a close then resets nothing.
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_lowercase()
    }

    #[tokio::test]
    async fn a_response_that_leaves_the_body_unread_says_the_connection_closes() {
        let opts = ConnOptions {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
        };
        let (addr, _, _close) = serve_one(opts).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let read = post(&mut s, "/read").await;
        assert!(read.starts_with("http/1.1 200"), "{read}");
        assert!(!read.contains("connection: close"), "{read}");
        // Still the same connection: a refusal that leaves the body unread says it closes.
        let refused = post(&mut s, "/refuse").await;
        assert!(refused.starts_with("http/1.1 401"), "{refused}");
        assert!(refused.contains("connection: close"), "{refused}");
        assert!(closed(&mut s).await, "the connection must then close");
    }

    #[tokio::test]
    async fn idle_connections_close_and_close_requests_are_honoured() {
        let opts = ConnOptions {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_millis(300),
        };
        let (addr, in_flight, _close) = serve_one(opts).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut s).await.ends_with("ok"));
        assert_eq!(in_flight.get(), 0);
        assert!(
            closed(&mut s).await,
            "an idle keep-alive connection is closed"
        );

        let opts = ConnOptions {
            idle_timeout: Duration::from_secs(600),
            ..opts
        };
        let (addr, _, close) = serve_one(opts).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut s).await.ends_with("ok"));
        close.notify_one();
        assert!(
            closed(&mut s).await,
            "a close request closes an idle connection"
        );
    }

    #[tokio::test]
    async fn slow_headers_time_out() {
        let opts = ConnOptions {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_secs(600),
        };
        let (addr, _, _close) = serve_one(opts).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(
            closed(&mut s).await,
            "a client that never finishes its headers is dropped"
        );
    }
}
