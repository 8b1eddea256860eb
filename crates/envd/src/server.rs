//! The HTTP server: HTTP/1.1 and h2c on one port, with header-read and idle timeouts, and a
//! registry of connections so `/snapshot/prepare` can close the idle ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Notify;
use wrenn_http::InFlight;

use crate::state::Envd;

/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no request in flight for this long is closed. Longer than any proxy in
/// front of envd keeps idle connections, so the proxy closes first (as upstream envd does).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(640);

struct ConnEntry {
    in_flight: InFlight,
    close: Arc<Notify>,
}

/// Every open client connection, with its count of requests in flight.
#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, ConnEntry>>,
}

impl Connections {
    fn register(&self) -> (u64, InFlight, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::default();
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
            if entry.in_flight.get() == 0 {
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
    let opts = wrenn_http::ConnOptions {
        header_read_timeout: HEADER_READ_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
    };
    wrenn_http::serve_connection(app, stream, peer, opts, in_flight, async move {
        close.notified().await
    })
    .await;
    envd.connections.remove(id);
}
