//! The host's client for the envd lifecycle endpoints: `/health`, `/snapshot/prepare`, `/init`.
//!
//! A guest controls every byte envd answers, so no answer is read whole: bodies are read up to
//! [`MAX_BODY`] bytes ([`read_capped`]) and a longer one is an error, however long (or
//! endless) it is. `/health` and a successful `/snapshot/prepare` or `/init` are judged by
//! their status alone; their bodies are not read.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Per attempt while waiting for envd: a TCG guest answers in about 10 ms once it is up.
const HEALTH_ATTEMPT: Duration = Duration::from_millis(250);
/// Pause between attempts.
const HEALTH_RETRY: Duration = Duration::from_millis(5);
/// The most the host reads of any answer from a guest (envd's own are a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;
/// How much of an error answer goes into the error message.
const MAX_ERROR_TEXT: usize = 1024;

/// Why an answer's body could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is longer than the host reads.
    #[error("answer body longer than {limit} bytes (a guest controls it; not read further)")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// Reading it failed.
    #[error("read the answer body")]
    Read(#[source] reqwest::Error),
    /// It is not the JSON expected.
    #[error("answer body is not the expected JSON")]
    Json(#[source] serde_json::Error),
}

/// Reads `resp`'s body up to `limit` bytes; a longer body (by `Content-Length` or as it
/// streams) is [`BodyError::TooLong`], and the connection is dropped without reading on.
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLong { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLong { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Why talking to envd failed.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    /// envd did not answer `/health` in time.
    #[error("envd at {addr} not healthy within {after:?} (last: {last})")]
    NotHealthy {
        /// Where we asked.
        addr: SocketAddr,
        /// How long we waited.
        after: Duration,
        /// The last error seen.
        last: String,
    },
    /// A request failed.
    #[error("envd {path}")]
    Request {
        /// The endpoint.
        path: &'static str,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// envd answered with an error status.
    #[error("envd {path} answered {status}: {body}")]
    Status {
        /// The endpoint.
        path: &'static str,
        /// The status.
        status: u16,
        /// The body.
        body: String,
    },
}

/// A client for one guest's envd.
#[derive(Debug, Clone)]
pub struct EnvdClient {
    http: reqwest::Client,
    addr: SocketAddr,
    /// Sent as `X-Access-Token` once the guest has one (envd then requires it).
    access_token: Option<String>,
}

impl EnvdClient {
    /// A client for envd at `addr` (the slot's guest endpoint).
    pub fn new(addr: SocketAddr) -> Self {
        // Never through a proxy from the environment: guests are reached only via their slot.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default();
        Self {
            http,
            addr,
            access_token: None,
        }
    }

    /// The same client, authenticating with `token` (what `/init` gave the guest).
    pub fn with_access_token(mut self, token: Option<String>) -> Self {
        self.access_token = token;
        self
    }

    /// The base URL, `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Polls `GET /health` until it answers 2xx; returns how long that took.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<Duration, EnvdError> {
        let start = Instant::now();
        let url = format!("{}/health", self.base_url());
        let mut last = String::from("no attempt");
        while start.elapsed() < timeout {
            // No attempt may outlast the deadline itself.
            let attempt = HEALTH_ATTEMPT.min(timeout.saturating_sub(start.elapsed()));
            match self.http.get(&url).timeout(attempt).send().await {
                Ok(r) if r.status().is_success() => return Ok(start.elapsed()),
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = format!("{e:?}"),
            }
            tracing::trace!(elapsed = ?start.elapsed(), %last, "envd not healthy yet");
            tokio::time::sleep(HEALTH_RETRY).await;
        }
        Err(EnvdError::NotHealthy {
            addr: self.addr,
            after: timeout,
            last,
        })
    }

    /// `POST /snapshot/prepare`: envd quiesces and answers when ready to be frozen.
    pub async fn snapshot_prepare(&self, timeout: Duration) -> Result<(), EnvdError> {
        self.post("/snapshot/prepare", None, timeout).await
    }

    /// `POST /init` with `body` (clock, env vars, access token, ...).
    pub async fn init(&self, body: &serde_json::Value, timeout: Duration) -> Result<(), EnvdError> {
        self.post("/init", Some(body), timeout).await
    }

    async fn post(
        &self,
        path: &'static str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<(), EnvdError> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base_url()))
            .timeout(timeout);
        if let Some(body) = body {
            req = req.json(body);
        }
        if let Some(token) = &self.access_token {
            req = req.header("x-access-token", token);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| EnvdError::Request { path, source })?;
        let status = resp.status();
        if !status.is_success() {
            let body = match read_capped(resp, MAX_BODY).await {
                Ok(b) => {
                    let text = String::from_utf8_lossy(&b);
                    text.chars().take(MAX_ERROR_TEXT).collect()
                }
                Err(e) => format!("({})", crate::error_chain(&e)),
            };
            return Err(EnvdError::Status {
                path,
                status: status.as_u16(),
                body,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A fake envd on loopback answering every request with `status` and a body that never
    /// ends (chunked, 64 KiB chunks); counts the bytes it managed to send.
    pub(crate) async fn endless_server(status: u16) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = conn.read(&mut req).await;
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                    );
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                    while conn.write_all(chunk.as_bytes()).await.is_ok() {
                        counter.fetch_add(0x10000, Ordering::Relaxed);
                    }
                });
            }
        });
        (addr, sent)
    }

    /// RSS of this process, bytes.
    pub(crate) fn rss() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb << 10
    }

    #[tokio::test]
    async fn an_endless_error_body_is_cut_at_the_limit() {
        let (addr, sent) = endless_server(500).await;
        let before = rss();
        let client = EnvdClient::new(addr);
        let t = Instant::now();
        let e = client
            .init(&serde_json::json!({}), Duration::from_secs(20))
            .await
            .unwrap_err();
        let EnvdError::Status { status, body, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(*status, 500);
        assert!(body.contains("longer than 65536 bytes"), "{body}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // The server could fill the socket buffers, no more: the client stopped reading.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = sent.load(Ordering::Relaxed);
        assert!(n < 32 << 20, "{n} bytes went out before the client hung up");
        assert!(
            rss() < before + (32 << 20),
            "RSS grew by {}",
            rss() - before
        );
    }

    #[tokio::test]
    async fn read_capped_refuses_long_bodies_whole_or_streamed() {
        let (addr, _) = endless_server(200).await;
        let resp = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        let e = read_capped(resp, MAX_BODY).await.unwrap_err();
        assert!(matches!(e, BodyError::TooLong { limit: MAX_BODY }), "{e:?}");
        // A declared length over the limit is refused before any of it is read.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = conn.read(&mut req).await;
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\nxx")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let resp = reqwest::get(format!("http://{addr}/")).await.unwrap();
        let t = Instant::now();
        let e = read_capped(resp, MAX_BODY).await.unwrap_err();
        assert!(matches!(e, BodyError::TooLong { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
