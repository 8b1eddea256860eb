//! Where a client connects: TCP for `http://host:port`, or a Unix socket for `unix:/path`.
//!
//! A host agent inside `wrenn up` listens on a Unix socket only root can open, so the control
//! plane's clients (the agent RPC, the edge proxy) must speak HTTP over one. The socket is
//! named by a URL `unix:/abs/path/to.sock` (no request path prefix). Internally that becomes
//! the URI authority `unix://<hex of the path>` (the form hyperlocal uses), so one pooled
//! client keys its connections per socket like it does per host; [`Connector`] decodes it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// The URI scheme of Unix socket targets inside the client.
const UNIX_SCHEME: &str = "unix";

/// A base URL that is neither `http://…` nor `unix:/abs/path`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is neither http://host[:port][/prefix] nor unix:/absolute/socket/path")]
pub struct BadBaseUrl(pub String);

/// Turns a base URL as configured (`http://host:port[/prefix]` or `unix:/path`) into the base
/// that request URIs are made from: `http` ones unchanged (without a trailing `/`), Unix
/// socket ones as `unix://<hex of the path>`.
pub fn request_base(url: &str) -> Result<String, BadBaseUrl> {
    if let Some(path) = unix_path(url) {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(BadBaseUrl(url.to_owned()));
        }
        return Ok(format!(
            "{UNIX_SCHEME}://{}",
            hex_encode(path.trim_end_matches('/').as_bytes())
        ));
    }
    let uri: Uri = url.parse().map_err(|_| BadBaseUrl(url.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(BadBaseUrl(url.to_owned()));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The socket path of a `unix:` URL (`unix:/p` or `unix:///p`), if it is one.
pub fn unix_path(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("unix:")?;
    // `unix:///p` is the same socket as `unix:/p`.
    Some(rest.strip_prefix("//").unwrap_or(rest))
}

/// Whether `url` names a Unix socket (whose access the file system decides).
pub fn is_unix(url: &str) -> bool {
    unix_path(url).is_some()
}

/// Connects to `http://` URIs over TCP and `unix://<hex path>` ones over a Unix socket.
#[derive(Debug, Clone)]
pub struct Connector {
    http: HttpConnector,
}

impl Connector {
    /// TCP_NODELAY (proxied streams carry small messages) and the given TCP connect timeout.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        Self { http }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if uri.scheme_str() == Some(UNIX_SCHEME) {
            return Box::pin(async move {
                let path = socket_of(&uri)?;
                let stream = UnixStream::connect(&path).await?;
                Ok(TokioIo::new(Stream::Unix(stream)))
            });
        }
        let connecting = tower::Service::call(&mut self.http, uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(TokioIo::new(Stream::Tcp(io.into_inner())))
        })
    }
}

/// The socket path a `unix://<hex>` URI names.
fn socket_of(uri: &Uri) -> Result<PathBuf, BoxError> {
    let host = uri.host().ok_or("a unix:// URI without a socket")?;
    let bytes = hex_decode(host).ok_or("a unix:// URI whose socket is not hex")?;
    let path: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(bytes);
    Ok(PathBuf::from(path))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A connection made by [`Connector`].
#[derive(Debug)]
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Self::Tcp(s) => s.connected(),
            Self::Unix(s) => s.connected(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            request_base("http://127.0.0.1:5/").unwrap(),
            "http://127.0.0.1:5"
        );
        assert_eq!(
            request_base("http://h:5/prefix").unwrap(),
            "http://h:5/prefix"
        );
        let unix = request_base("unix:/run/wrenn/agent.sock").unwrap();
        assert_eq!(request_base("unix:///run/wrenn/agent.sock/").unwrap(), unix);
        let uri: Uri = format!("{unix}/wrenn.agent.v1.AgentService/List")
            .parse()
            .unwrap();
        assert_eq!(
            socket_of(&uri).unwrap(),
            PathBuf::from("/run/wrenn/agent.sock")
        );
        assert_eq!(uri.path(), "/wrenn.agent.v1.AgentService/List");
        for bad in [
            "unix:relative.sock",
            "unix:",
            "https://h",
            "ftp://h",
            "h:5",
            "unix:/",
        ] {
            assert!(request_base(bad).is_err(), "{bad}");
        }
        assert!(is_unix("unix:/a") && !is_unix("http://a"));
    }

    #[tokio::test]
    async fn speaks_http_over_a_unix_socket() {
        use http_body_util::BodyExt as _;
        let dir = tempfile_dir();
        let path = dir.join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(req.uri().to_string())),
                    ))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, http_body_util::Empty<bytes::Bytes>>(Connector::new(Duration::from_secs(
                1,
            )));
        let base = request_base(&format!("unix:{}", path.display())).unwrap();
        let resp = client
            .get(format!("{base}/a?b=c").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"/a?b=c");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wrenn-http-unix-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
