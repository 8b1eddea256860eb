//! The agent's traffic proxy against real HTTP servers on loopback standing in for guests
//! (no VM): per-request routing on a shared connection, streaming both ways, upgrades, and the
//! error answers the SDKs interpret.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use wrenn_agent::proxy::{self, Resolve, Route};

const WAIT: Duration = Duration::from_secs(10);

/// Routes `(sandbox, port)` to local servers; every sandbox's run ends when its token fires.
struct Map {
    routes: HashMap<(String, u16), SocketAddr>,
    runs: Runs,
}

type Runs = Arc<std::sync::Mutex<HashMap<String, CancellationToken>>>;

impl Resolve for Map {
    fn resolve(&self, sandbox_id: &str, port: u16) -> Option<Route> {
        let addr = *self.routes.get(&(sandbox_id.to_owned(), port))?;
        let ends = self.runs.lock().unwrap().get(sandbox_id)?.clone();
        (!ends.is_cancelled()).then_some(Route { addr, ends })
    }
}

/// A stand-in for a guest server, named so answers show where they came from.
#[derive(Clone)]
struct Backend {
    name: &'static str,
    /// `/stream` sends its second chunk only after this is notified.
    release: Arc<Notify>,
}

async fn who(State(b): State<Backend>, req: Request) -> String {
    let routed = req.headers().contains_key("e2b-sandbox-id")
        || req.headers().contains_key("e2b-sandbox-port");
    format!(
        "{} {} routing-headers={routed}",
        b.name,
        req.uri().path_and_query().map_or("", |p| p.as_str())
    )
}

async fn stream(State(b): State<Backend>) -> Body {
    let chunks = futures::stream::unfold(0, move |i| {
        let release = b.release.clone();
        async move {
            match i {
                0 => Some((Ok::<_, Infallible>(Bytes::from_static(b"first;")), 1)),
                1 => {
                    release.notified().await;
                    Some((Ok(Bytes::from_static(b"second")), 2))
                }
                _ => None,
            }
        }
    });
    Body::from_stream(chunks)
}

/// Reads the body as it streams and answers its length and SHA-256.
async fn upload(req: Request) -> String {
    let mut body = req.into_body().into_data_stream();
    let (mut len, mut hash) = (0usize, Sha256::new());
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len();
        hash.update(&chunk);
    }
    format!("{len} {}", hex::encode(hash.finalize()))
}

/// Answers each request chunk as it arrives (full duplex).
async fn echo(req: Request) -> Body {
    Body::from_stream(req.into_body().into_data_stream())
}

/// Accepts any upgrade and echoes bytes on the upgraded connection.
async fn ws(mut req: Request) -> Response {
    let Some(on) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    tokio::spawn(async move {
        let mut io = TokioIo::new(on.await.unwrap());
        let mut buf = [0u8; 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut headers = HeaderMap::new();
    headers.insert("connection", "upgrade".parse().unwrap());
    headers.insert("upgrade", "websocket".parse().unwrap());
    (StatusCode::SWITCHING_PROTOCOLS, headers).into_response()
}

async fn backend(name: &'static str) -> (SocketAddr, Arc<Notify>) {
    let release = Arc::new(Notify::new());
    let app = axum::Router::new()
        .route("/stream", axum::routing::get(stream))
        .route("/upload", axum::routing::post(upload))
        .route("/echo", axum::routing::post(echo))
        .route("/ws", axum::routing::get(ws))
        .fallback(who)
        .with_state(Backend {
            name,
            release: release.clone(),
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, release)
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

struct Setup {
    proxy: SocketAddr,
    release_a: Arc<Notify>,
    /// Fired: sandbox `a` is killed.
    kill_a: CancellationToken,
    /// The runs of every sandbox (a new token: `a` resumed).
    runs: Runs,
}

/// Backends: sandbox `a` on 49983 and 8080 (named `a` and `a8080`), `b` on 49983, and `c`
/// whose port 49983 is closed. The proxy is served the way the agent serves it.
async fn setup() -> Setup {
    let (a, release_a) = backend("a").await;
    let (a8080, _) = backend("a8080").await;
    let (b, _) = backend("b").await;
    let kill_a = CancellationToken::new();
    let map = Map {
        routes: HashMap::from([
            (("a".to_owned(), 49983), a),
            (("a".to_owned(), 8080), a8080),
            (("b".to_owned(), 49983), b),
            (("c".to_owned(), 49983), closed_port().await),
        ]),
        runs: Arc::new(std::sync::Mutex::new(
            ["b", "c"]
                .into_iter()
                .map(|id| (id.to_owned(), CancellationToken::new()))
                .chain([("a".to_owned(), kill_a.clone())])
                .collect(),
        )),
    };
    let runs = map.runs.clone();
    let app = proxy::router(Arc::new(map));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            let app = app.clone();
            tokio::spawn(wrenn_http::serve_connection(
                app,
                stream,
                peer,
                wrenn_http::ConnOptions {
                    header_read_timeout: Duration::from_secs(30),
                    idle_timeout: Duration::from_secs(60),
                },
                wrenn_http::InFlight::default(),
                std::future::pending(),
            ));
        }
    });
    Setup {
        proxy,
        release_a,
        kill_a,
        runs,
    }
}

type Sender = hyper::client::conn::http1::SendRequest<BoxBody<Bytes, Infallible>>;

/// One HTTP/1.1 connection to the proxy; every request on it shares the connection.
async fn connect(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: BoxBody<Bytes, Infallible>,
) -> hyper::Request<BoxBody<Bytes, Infallible>> {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "proxy");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).unwrap()
}

fn empty() -> BoxBody<Bytes, Infallible> {
    Empty::new().boxed()
}

async fn send(
    s: &mut Sender,
    req: hyper::Request<BoxBody<Bytes, Infallible>>,
) -> (StatusCode, String) {
    s.ready().await.unwrap();
    let resp = tokio::time::timeout(WAIT, s.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn routes_each_request_on_a_shared_connection() {
    let s = setup().await;
    let mut c = connect(s.proxy).await;
    for (id, port, want) in [
        ("a", None, "a"),
        ("b", None, "b"),
        ("a", Some("49983"), "a"),
        ("a", Some("8080"), "a8080"),
        ("b", Some("49983"), "b"),
        ("a", None, "a"),
    ] {
        let mut headers = vec![("E2b-Sandbox-Id", id)];
        if let Some(port) = port {
            headers.push(("E2b-Sandbox-Port", port));
        }
        let (status, body) = send(&mut c, request("GET", "/p/q?x=1", &headers, empty())).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, format!("{want} /p/q?x=1 routing-headers=false"));
    }
}

#[tokio::test]
async fn response_streams_incrementally() {
    let s = setup().await;
    let mut c = connect(s.proxy).await;
    let req = request("GET", "/stream", &[("E2b-Sandbox-Id", "a")], empty());
    let resp = tokio::time::timeout(WAIT, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The backend holds its second chunk until told: the first must already be here.
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first chunk arrives while the backend is still sending")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"first;");
    s.release_a.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(&rest[..], b"second");
}

#[tokio::test]
async fn killing_a_sandbox_ends_its_streams_at_once() {
    let s = setup().await;
    let mut c = connect(s.proxy).await;
    let mut ws = TcpStream::connect(s.proxy).await.unwrap();
    let head = upgrade(&mut ws).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let req = request("GET", "/stream", &[("E2b-Sandbox-Id", "a")], empty());
    let resp = tokio::time::timeout(WAIT, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first;");
    // Another sandbox's stream on its own connection is not touched.
    let mut other = connect(s.proxy).await;
    let (status, _) = send(
        &mut other,
        request("GET", "/x", &[("E2b-Sandbox-Id", "b")], empty()),
    )
    .await;
    assert_eq!(status, 200);

    // The backend never sends its second chunk, and a dead guest would never close: only the
    // kill can end the stream, and it must end it as a failure, not a clean end.
    s.kill_a.cancel();
    let ended = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the stream outlived the sandbox");
    assert!(
        !matches!(ended, None | Some(Ok(_))),
        "a killed sandbox's stream must fail: {ended:?}"
    );
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, ws.read(&mut buf))
        .await
        .expect("the upgraded connection outlived the sandbox");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // New requests answer what the SDKs read as "not running"; other sandboxes still work.
    let mut c = connect(s.proxy).await;
    let (status, body) = send(
        &mut c,
        request("GET", "/x", &[("E2b-Sandbox-Id", "a")], empty()),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("was not found"), "{body}");
    let (status, _) = send(
        &mut other,
        request("GET", "/x", &[("E2b-Sandbox-Id", "b")], empty()),
    )
    .await;
    assert_eq!(status, 200);

    // Resumed: a new run at the same address takes new requests, on connections of its own.
    s.runs
        .lock()
        .unwrap()
        .insert("a".to_owned(), CancellationToken::new());
    let (status, body) = send(
        &mut c,
        request("GET", "/x", &[("E2b-Sandbox-Id", "a")], empty()),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "a /x routing-headers=false")
    );
}

#[tokio::test]
async fn large_upload_streams_intact() {
    let s = setup().await;
    let mut c = connect(s.proxy).await;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 320; // 20 MiB
    let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
    let mut want = Sha256::new();
    for i in 0..CHUNKS {
        want.update(chunk(i));
    }
    let frames = futures::stream::iter(0..CHUNKS).map(move |i| Ok(Frame::data(chunk(i))));
    let body = BodyExt::boxed(StreamBody::new(frames));
    let (status, got) = send(
        &mut c,
        request("POST", "/upload", &[("E2b-Sandbox-Id", "b")], body),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got,
        format!("{} {}", CHUNK * CHUNKS, hex::encode(want.finalize()))
    );
}

#[tokio::test]
async fn request_and_response_stream_at_once() {
    let s = setup().await;
    let mut c = connect(s.proxy).await;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let req = request(
        "POST",
        "/echo",
        &[("E2b-Sandbox-Id", "a")],
        BodyExt::boxed(StreamBody::new(frames)),
    );
    tx.send(Bytes::from_static(b"one")).await.unwrap();
    let resp = tokio::time::timeout(WAIT, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Each message comes back before the next is sent: neither direction is buffered.
    for (i, msg) in [&b"one"[..], b"two", b"three"].into_iter().enumerate() {
        if i > 0 {
            tx.send(Bytes::from_static(msg)).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("echo arrives while the request is still open")
                .unwrap()
                .unwrap();
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, msg);
    }
    drop(tx);
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());
}

/// Asks for a WebSocket upgrade to sandbox `a` and returns the answer's head, lower case.
async fn upgrade(tcp: &mut TcpStream) -> String {
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: proxy\r\nE2b-Sandbox-Id: a\r\n\
          Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "proxy closed before answering");
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

#[tokio::test]
async fn websocket_upgrade_is_spliced_through() {
    let s = setup().await;
    let mut tcp = TcpStream::connect(s.proxy).await.unwrap();
    let head = upgrade(&mut tcp).await;
    let mut buf = vec![0u8; 4096];
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping over the upgraded stream"[..], b"and again"] {
        tcp.write_all(msg).await.unwrap();
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "upgraded stream closed early");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, msg);
    }
}

#[tokio::test]
async fn errors_the_sdks_understand() {
    let s = setup().await;
    let mut c = connect(s.proxy).await;

    let (status, body) = send(
        &mut c,
        request("GET", "/health", &[("E2b-Sandbox-Id", "nosuch")], empty()),
    )
    .await;
    assert_eq!(status, 502);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "code": 502,
            "message": "The sandbox nosuch was not found",
            "sandboxId": "nosuch"
        })
    );
    // A port the sandbox has no route for is "not found" too (the resolver decides).
    let (status, body) = send(
        &mut c,
        request(
            "GET",
            "/",
            &[("E2b-Sandbox-Id", "b"), ("E2b-Sandbox-Port", "8080")],
            empty(),
        ),
    )
    .await;
    assert_eq!(status, 502);
    assert!(body.contains("was not found"), "{body}");

    let (status, body) = send(&mut c, request("GET", "/health", &[], empty())).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("E2b-Sandbox-Id"), "{body}");
    let (status, _) = send(
        &mut c,
        request(
            "GET",
            "/",
            &[("E2b-Sandbox-Id", "a"), ("E2b-Sandbox-Port", "nope")],
            empty(),
        ),
    )
    .await;
    assert_eq!(status, 400);

    let (status, body) = send(
        &mut c,
        request("GET", "/health", &[("E2b-Sandbox-Id", "c")], empty()),
    )
    .await;
    assert_eq!(status, 502);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["sandboxId"], "c");
    assert_eq!(v["port"], 49983);
    assert!(
        v["message"].as_str().unwrap().contains("port is not open"),
        "{body}"
    );

    // The connection survived all of that and still routes.
    let (status, body) = send(
        &mut c,
        request("GET", "/ok", &[("E2b-Sandbox-Id", "a")], empty()),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.starts_with("a /ok"), "{body}");
}
