//! The HTTP front: one app that serves the REST API and the edge proxy on the same port
//! (demuxed per request), and a server loop with header-read and idle timeouts.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
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
                    tracing::warn!(error = %crate::error::Chain(&e), "accept failed");
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
    let opts = wrenn_http::ConnOptions {
        header_read_timeout: HEADER_READ_TIMEOUT,
        idle_timeout: idle,
    };
    let in_flight = wrenn_http::InFlight::default();
    wrenn_http::serve_connection(app, stream, peer, opts, in_flight, async move {
        shutdown.cancelled().await
    })
    .await;
}
