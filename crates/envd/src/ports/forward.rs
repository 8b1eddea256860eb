//! One forwarder: accepts on the external address and pipes each connection to the loopback
//! listener it stands for, in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a forwarded connection may take to reach the loopback listener. The target is
/// local, so anything slower means its accept queue is full or it is gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the external side of a forwarder.
///
/// `SO_REUSEADDR` so a port whose previous forwarder just closed (connections in TIME_WAIT)
/// can be bound again at once, as socat's `reuseaddr` did upstream.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// What a forwarder's connections share.
#[derive(Clone)]
pub(crate) struct Shared {
    /// Tracks every task of the current run, so stopping can wait for all of them.
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the whole port subsystem stops. Connections hang off this token rather
    /// than the forwarder's, so a server that closes its listener keeps the connections it
    /// already accepted.
    pub(crate) run: CancellationToken,
    /// Bounds concurrent forwarded connections (two buffers each) across all ports.
    pub(crate) connections: Arc<Semaphore>,
}

/// Accepts on `listener` until `token` is cancelled, piping each connection to `target`.
pub(crate) async fn run(
    listener: TcpListener,
    target: SocketAddr,
    token: CancellationToken,
    shared: Shared,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            a = listener.accept() => a,
        };
        let inbound = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::debug!(%target, error = %e, "forwarder accept failed");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            tracing::warn!(%target, "too many forwarded connections; dropping one");
            continue;
        };
        let run = shared.run.clone();
        shared.tracker.spawn(async move {
            pipe(inbound, target, run).await;
            drop(permit);
        });
    }
}

async fn pipe(mut inbound: TcpStream, target: SocketAddr, stop: CancellationToken) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target));
    let mut outbound = tokio::select! {
        _ = stop.cancelled() => return,
        c = connect => match c {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%target, error = %e, "forwarded connection refused by the local listener");
                return;
            }
            Err(_) => {
                tracing::debug!(%target, "forwarded connection timed out reaching the local listener");
                return;
            }
        },
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = stop.cancelled() => {}
        r = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {
            if let Err(e) = r {
                tracing::trace!(%target, error = %e, "forwarded connection ended with an error");
            }
        }
    }
}
