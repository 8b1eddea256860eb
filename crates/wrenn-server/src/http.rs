//! The HTTP front: one app that serves the REST API and the edge proxy on the same port
//! (demuxed per request), and a server loop with header-read and idle timeouts.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::proxy::{Proxy, classify};
use crate::service::ControlPlane;

/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no request in flight for this long is closed. Longer than the SDKs'
/// own keep-alive expiry (300 s in Python), so the client closes first.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(330);

#[derive(Clone)]
struct Front {
    cp: Arc<ControlPlane>,
    api: axum::Router,
    proxy: Proxy,
}

/// The whole HTTP surface: sandbox traffic (by header, host name or signed URL) goes to the
/// edge proxy, everything else to the REST API.
pub fn app(cp: Arc<ControlPlane>) -> axum::Router {
    let front = Front {
        api: crate::api::router(cp.clone()),
        cp,
        proxy: Proxy::new(),
    };
    axum::Router::new().fallback(dispatch).with_state(front)
}

async fn dispatch(State(front): State<Front>, req: Request) -> Response {
    match classify(&req, front.cp.config.domain.as_deref()) {
        Some(route) => front.proxy.handle(front.cp.clone(), route, req).await,
        None => front.api.oneshot(req).await.unwrap_or_else(|e| match e {}),
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled. Connections get a header-read
/// timeout and are closed after [`IDLE_TIMEOUT`] without a request in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
) {
    serve_with_idle(listener, app, shutdown, IDLE_TIMEOUT).await;
}

/// [`serve`] with another idle timeout (tests).
pub async fn serve_with_idle(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
    idle: Duration,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            app.clone(),
            stream,
            peer,
            shutdown.clone(),
            idle,
        ));
    }
}

async fn serve_connection(
    app: axum::Router,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shutdown: CancellationToken,
    idle: Duration,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let activity = Arc::new(Notify::new());
    let service = {
        let (in_flight, activity) = (in_flight.clone(), activity.clone());
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let guard = InFlight::new(in_flight.clone(), activity.clone());
            let app = app.clone();
            async move {
                let resp = app
                    .oneshot(req.map(Body::new))
                    .await
                    .unwrap_or_else(|e| match e {});
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
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let idle_wait = async {
            loop {
                tokio::select! {
                    _ = activity.notified() => continue,
                    _ = tokio::time::sleep(idle) => {
                        if in_flight.load(Ordering::Acquire) == 0 { return; }
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
            _ = idle_wait, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Counts a request as in flight until its response body is dropped (streams included).
struct InFlight {
    count: Arc<AtomicUsize>,
    activity: Arc<Notify>,
}

impl InFlight {
    fn new(count: Arc<AtomicUsize>, activity: Arc<Notify>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        activity.notify_one();
        InFlight { count, activity }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.activity.notify_one();
    }
}

struct GuardedBody {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for GuardedBody {
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
