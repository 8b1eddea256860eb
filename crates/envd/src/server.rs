//! The HTTP server: HTTP/1.1 and h2c on one port, with header-read and idle timeouts, and a
//! registry of connections so `/snapshot/prepare` can close the idle ones.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::state::Envd;

/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no request in flight for this long is closed. Longer than any proxy in
/// front of envd keeps idle connections, so the proxy closes first (as upstream envd does).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(640);

struct ConnEntry {
    in_flight: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

/// Every open client connection, with its count of requests in flight.
#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, ConnEntry>>,
}

impl Connections {
    fn register(&self) -> (u64, Arc<AtomicUsize>, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let close = Arc::new(Notify::new());
        self.open.lock().expect("connections lock").insert(
            id,
            ConnEntry {
                in_flight: in_flight.clone(),
                close: close.clone(),
            },
        );
        (id, in_flight, close)
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("connections lock").remove(&id);
    }

    /// Asks every connection without a request in flight to close; returns how many.
    ///
    /// Connections that are busy (including the one asking) finish their requests and stay.
    pub fn close_idle(&self) -> usize {
        let open = self.open.lock().expect("connections lock");
        let mut n = 0;
        for entry in open.values() {
            if entry.in_flight.load(Ordering::Acquire) == 0 {
                entry.close.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.open.lock().expect("connections lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Binds, prints `listening on <addr>` on stdout, and serves until SIGTERM or SIGINT.
pub async fn serve(envd: Arc<Envd>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(envd.config.listen)
        .await
        .with_context(|| format!("bind {}", envd.config.listen))?;
    let addr = listener.local_addr().context("read the bound address")?;
    let _ = envd.local_addr.set(addr);
    envd.ports.start();
    // Tests and the guest init read this line to learn the port.
    println!("listening on {addr}");
    tracing::info!(%addr, version = crate::ENVD_VERSION, "envd listening");

    let app = crate::app(envd.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
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
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(envd.clone(), app.clone(), stream, peer));
    }
    tracing::info!("shutting down");
    envd.ports.stop().await;
    Ok(())
}

async fn serve_connection(
    envd: Arc<Envd>,
    app: axum::Router,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) {
    let (id, in_flight, close) = envd.connections.register();
    let activity = Arc::new(Notify::new());

    let service = {
        let in_flight = in_flight.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let guard = InFlight::new(in_flight.clone(), activity.clone());
            let app = app.clone();
            async move {
                let resp = app
                    .oneshot(req.map(axum::body::Body::new))
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
        let idle = async {
            loop {
                tokio::select! {
                    _ = activity.notified() => continue,
                    _ = tokio::time::sleep(IDLE_TIMEOUT) => {
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
            _ = close.notified(), if !closing => {
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
    envd.connections.remove(id);
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
    inner: axum::body::Body,
    _guard: InFlight,
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
