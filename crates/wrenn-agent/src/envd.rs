//! The host's client for the envd lifecycle endpoints: `/health`, `/snapshot/prepare`, `/init`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Per attempt while waiting for envd: a TCG guest answers in about 10 ms once it is up.
const HEALTH_ATTEMPT: Duration = Duration::from_millis(250);
/// Pause between attempts.
const HEALTH_RETRY: Duration = Duration::from_millis(5);

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
            let body = resp.text().await.unwrap_or_default();
            return Err(EnvdError::Status {
                path,
                status: status.as_u16(),
                body,
            });
        }
        Ok(())
    }
}
