//! Port forwarding against the real envd: loopback-only listeners become reachable at the
//! forward address (127.0.0.2 here: all of 127/8 is local on Linux) and stop being reachable
//! when they close.
//!
//! Only one envd with forwarding on may run at a time (each one sees every loopback listener
//! of the host, including other forwarders'), so the forwarding checks share one test.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const FORWARD: &str = "127.0.0.2";

fn forward_addr(port: u16) -> SocketAddr {
    SocketAddr::new(FORWARD.parse().unwrap(), port)
}

/// Whether a TCP connect to `addr` succeeds.
async fn reachable(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Polls until `addr`'s reachability is `want`; returns how long it took, or panics after `limit`.
async fn wait_reachable(addr: SocketAddr, want: bool, limit: Duration, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        if reachable(addr).await == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: {addr} still {} after {limit:?}",
            if want { "refused" } else { "reachable" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo server on `listener`; dropping the handle closes the listener and its connections.
fn echo(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// Sends `data` through `addr` to an echo server, half-closes, and reads everything back.
async fn round_trip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(addr)
        .await
        .expect("connect through the forwarder");
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    writer.await.unwrap();
    back
}

struct Abort(tokio::task::JoinHandle<()>);
impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_loopback_listeners_and_follows_their_lifetime() {
    let envd = support::Envd::start_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-cgroups",
            "--forward-address",
            FORWARD,
        ],
        &[],
    );

    // IPv4 loopback listener: reachable at the forward address within a scan or two.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Abort(echo(listener));
    let took = wait_reachable(
        forward_addr(port),
        true,
        Duration::from_secs(3),
        "v4 listener",
    )
    .await;
    eprintln!("v4 listener forwarded after {took:?}");

    // Data both ways, with half-close, and many connections at once.
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert!(
        round_trip(forward_addr(port), &payload).await == payload,
        "4 MiB echoed intact"
    );
    let mut set = tokio::task::JoinSet::new();
    for i in 0..32u8 {
        set.spawn(async move { round_trip(forward_addr(port), &[i; 1000]).await == vec![i; 1000] });
    }
    while let Some(ok) = set.join_next().await {
        assert!(ok.unwrap(), "concurrent connection echoed");
    }

    // envd's own API port is never forwarded, though it listens on loopback too.
    assert!(
        !reachable(forward_addr(envd.addr.port())).await,
        "envd's own port must not be forwarded"
    );

    // The server closes: the forwarder goes away.
    drop(server);
    let took = wait_reachable(
        forward_addr(port),
        false,
        Duration::from_secs(3),
        "closed listener",
    )
    .await;
    eprintln!("forwarder removed {took:?} after the listener closed");

    // Churn (D6): the same port reopened over and over is forwarded again each time.
    let mut worst = Duration::ZERO;
    for round in 0..8 {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let server = Abort(echo(listener));
        let took = wait_reachable(
            forward_addr(port),
            true,
            Duration::from_secs(2),
            "reopened listener",
        )
        .await;
        worst = worst.max(took);
        assert_eq!(
            round_trip(forward_addr(port), b"again").await,
            b"again",
            "round {round}"
        );
        drop(server);
        wait_reachable(
            forward_addr(port),
            false,
            Duration::from_secs(3),
            "closed again",
        )
        .await;
    }
    eprintln!("reopened listener forwarded within {worst:?} (worst of 8)");

    // IPv6 loopback (and where the kernel has it).
    if let Ok(l6) = TcpListener::bind("[::1]:0").await {
        let port6 = l6.local_addr().unwrap().port();
        let _server6 = Abort(echo(l6));
        wait_reachable(
            forward_addr(port6),
            true,
            Duration::from_secs(3),
            "::1 listener",
        )
        .await;
        assert_eq!(round_trip(forward_addr(port6), b"six").await, b"six");
    } else {
        eprintln!("no IPv6 loopback here; ::1 case skipped");
    }

    // A listener on another loopback address is forwarded to that address.
    let l = TcpListener::bind("127.0.0.7:0").await.unwrap();
    let port7 = l.local_addr().unwrap().port();
    let _server7 = Abort(echo(l));
    wait_reachable(
        forward_addr(port7),
        true,
        Duration::from_secs(3),
        "127.0.0.7 listener",
    )
    .await;
    assert_eq!(round_trip(forward_addr(port7), b"seven").await, b"seven");

    // envd is still healthy after all of it.
    let resp = envd.client.get(envd.url("/health")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
}

#[tokio::test]
async fn no_port_forward_forwards_nothing() {
    let forward: IpAddr = "127.0.0.5".parse().unwrap();
    let _envd = support::Envd::start_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-cgroups",
            "--no-port-forward",
            "--forward-address",
            "127.0.0.5",
        ],
        &[],
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = Abort(echo(listener));
    // Three scan intervals.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(
        !reachable(SocketAddr::new(forward, port)).await,
        "forwarding is off"
    );
}
