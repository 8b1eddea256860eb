//! Snapshot lifecycle against the real envd: `/snapshot/prepare` stops the port subsystem and
//! drops idle keep-alive connections before answering; `/init` brings forwarding back; the
//! cycle repeats.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Not the address tests/ports.rs uses, in case both ever run at once.
const FORWARD: &str = "127.0.0.3";

fn forward_addr(port: u16) -> SocketAddr {
    SocketAddr::new(FORWARD.parse().unwrap(), port)
}

async fn reachable(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

async fn wait_reachable(addr: SocketAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    while !reachable(addr).await {
        assert!(
            start.elapsed() < limit,
            "{addr} not forwarded within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

struct Abort(tokio::task::JoinHandle<()>);
impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn echo(listener: TcpListener) -> Abort {
    Abort(tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    }))
}

/// Writes `msg` and reads the same number of bytes back.
async fn ping(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(buf, msg);
}

/// An HTTP/1.1 keep-alive connection to envd that has served one request and is now idle.
async fn idle_keepalive(envd: &support::Envd) -> TcpStream {
    let mut s = TcpStream::connect(envd.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: envd\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "envd closed a fresh keep-alive connection");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// Whether the peer closes `s` (EOF or reset) within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn post(envd: &support::Envd, path: &str, body: &str) -> u16 {
    envd.client
        .post(envd.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_quiesces_and_init_resumes() {
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = echo(listener);
    wait_reachable(forward_addr(port), Duration::from_secs(3)).await;

    // The first /init of a fresh envd (no prepare before it) leaves forwarding as it is.
    assert_eq!(post(&envd, "/init", "{}").await, 204);
    assert!(reachable(forward_addr(port)).await);

    for cycle in 0..3 {
        let mut idle = idle_keepalive(&envd).await;
        let mut forwarded = TcpStream::connect(forward_addr(port)).await.unwrap();
        ping(&mut forwarded, b"before").await;

        let t = Instant::now();
        assert_eq!(
            post(&envd, "/snapshot/prepare", "").await,
            204,
            "cycle {cycle}: prepare"
        );
        let prepare_took = t.elapsed();
        if cycle == 2 {
            // A repeated prepare (the agent retrying) is harmless.
            assert_eq!(
                post(&envd, "/snapshot/prepare", "").await,
                204,
                "cycle {cycle}: second prepare"
            );
        }

        // Stopped before the answer: the forward address refuses at once.
        assert!(
            !reachable(forward_addr(port)).await,
            "cycle {cycle}: forwarder still up after prepare"
        );
        assert!(
            closed_within(&mut forwarded, Duration::from_secs(2)).await,
            "cycle {cycle}: forwarded connection kept"
        );
        assert!(
            closed_within(&mut idle, Duration::from_secs(2)).await,
            "cycle {cycle}: idle keep-alive connection kept"
        );

        // Nothing rescans while prepared.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !reachable(forward_addr(port)).await,
            "cycle {cycle}: forwarding came back without /init"
        );
        let health = envd.client.get(envd.url("/health")).send().await.unwrap();
        assert_eq!(
            health.status().as_u16(),
            204,
            "cycle {cycle}: envd serves while prepared"
        );

        assert_eq!(post(&envd, "/init", "{}").await, 204, "cycle {cycle}: init");
        let back = wait_reachable(forward_addr(port), Duration::from_secs(3)).await;
        let mut s = TcpStream::connect(forward_addr(port)).await.unwrap();
        ping(&mut s, b"after").await;
        eprintln!(
            "cycle {cycle}: prepare answered in {prepare_took:?}; forwarding back {back:?} after /init"
        );
    }
}
