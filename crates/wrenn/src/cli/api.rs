//! The REST API client: the E2B v2 routes the SDKs use, responses kept as JSON values so a
//! newer server's extra fields pass through `--json` untouched.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use super::config::Config;

/// How long one API call may take: create and resume boot or restore a VM, which under
/// emulation takes tens of seconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Guards against a server that hands out cursors forever.
const MAX_PAGES: usize = 10_000;

/// Why an API call failed. The message is what the user sees.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("{message}{hint}")]
    Unauthorized { message: String, hint: &'static str },
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
    #[error("cannot reach the Wrenn API at {url}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected response from {url}: {what}")]
    BadResponse { url: String, what: String },
}

/// A client of one Wrenn API.
#[derive(Debug, Clone)]
pub(super) struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Api {
    pub(super) fn new(config: &Config) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("wrenn-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Api {
            http,
            base: config.api_url.clone(),
            key: config.api_key.clone(),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => req.header(wrenn_api::API_KEY_HEADER, k),
            None => req,
        }
    }

    /// Sends `req`; a non-2xx answer becomes an [`ApiError`] (`id` names the sandbox for 404s).
    async fn send(&self, req: RequestBuilder, id: Option<&str>) -> Result<Response, ApiError> {
        let resp = req.send().await.map_err(|source| ApiError::Transport {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        let message = match serde_json::from_slice::<wrenn_api::Error>(&body) {
            Ok(e) => e.message,
            Err(_) if body.is_empty() => status.canonical_reason().unwrap_or("").to_owned(),
            Err(_) => String::from_utf8_lossy(&body).trim().to_owned(),
        };
        Err(match (status, id) {
            (StatusCode::NOT_FOUND, Some(id)) => ApiError::SandboxNotFound(id.to_owned()),
            (StatusCode::UNAUTHORIZED, _) => ApiError::Unauthorized {
                message,
                hint: if self.key.is_none() {
                    " (no API key: pass --api-key or set E2B_API_KEY; `wrenn up` writes one to \
                     /var/lib/wrenn/api-key)"
                } else {
                    ""
                },
            },
            _ => ApiError::Status {
                status: status.as_u16(),
                message,
            },
        })
    }

    async fn json(&self, resp: Response) -> Result<Value, ApiError> {
        resp.json().await.map_err(|e| ApiError::BadResponse {
            url: self.base.clone(),
            what: e.to_string(),
        })
    }

    /// `POST /v2/sandboxes`.
    pub(super) async fn create(&self, body: &wrenn_api::NewSandbox) -> Result<Value, ApiError> {
        let resp = self
            .send(self.request(Method::POST, "/v2/sandboxes").json(body), None)
            .await?;
        self.json(resp).await
    }

    /// `GET /v2/sandboxes`, every page (`x-next-token`).
    pub(super) async fn list(
        &self,
        states: &[String],
        metadata: &[(String, String)],
        limit: Option<u32>,
    ) -> Result<Vec<Value>, ApiError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if !states.is_empty() {
            query.push(("state", states.join(",")));
        }
        if !metadata.is_empty() {
            // The metadata filter is itself a urlencoded `k=v&k2=v2` string, encoded again as
            // a query value (as the SDKs send it).
            let inner: Vec<String> = metadata
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            query.push(("metadata", inner.join("&")));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut req = self.request(Method::GET, "/v2/sandboxes").query(&query);
            if let Some(t) = &token {
                req = req.query(&[("nextToken", t)]);
            }
            let resp = self.send(req, None).await?;
            let next = resp
                .headers()
                .get(wrenn_api::NEXT_TOKEN_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            match self.json(resp).await? {
                Value::Array(items) => all.extend(items),
                other => {
                    return Err(ApiError::BadResponse {
                        url: self.base.clone(),
                        what: format!("expected a list of sandboxes, got {other}"),
                    });
                }
            }
            if next.is_none() || next == token {
                return Ok(all);
            }
            token = next;
        }
        Ok(all)
    }

    /// `DELETE /sandboxes/{id}`.
    pub(super) async fn kill(&self, id: &str) -> Result<(), ApiError> {
        let path = format!("/sandboxes/{}", segment(id)?);
        self.send(self.request(Method::DELETE, &path), Some(id))
            .await?;
        Ok(())
    }

    /// `POST /sandboxes/{id}/pause`, with the memory or (`memory` false) only the disk.
    pub(super) async fn pause(&self, id: &str, memory: bool) -> Result<(), ApiError> {
        let path = format!("/sandboxes/{}/pause", segment(id)?);
        let body = wrenn_api::PauseSandbox {
            memory: (!memory).then_some(false),
            ..Default::default()
        };
        self.send(self.request(Method::POST, &path).json(&body), Some(id))
            .await?;
        Ok(())
    }

    /// `POST /sandboxes/{id}/fork`: the per-copy results (`{sandbox}` or `{error}`).
    pub(super) async fn fork(
        &self,
        id: &str,
        count: u32,
        timeout: Option<i64>,
    ) -> Result<Vec<Value>, ApiError> {
        let path = format!("/sandboxes/{}/fork", segment(id)?);
        let mut body = serde_json::json!({ "count": count });
        if let Some(t) = timeout {
            body["timeout"] = t.into();
        }
        let resp = self
            .send(self.request(Method::POST, &path).json(&body), Some(id))
            .await?;
        let v: Value = resp.json().await.map_err(|source| ApiError::Transport {
            url: self.base.clone(),
            source,
        })?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `POST /v2/sandboxes/{id}/connect`: resumes a paused sandbox, extends a running one's
    /// timeout when one is given; `reboot`: a paused one by a cold boot of its disk. Returns
    /// the sandbox and whether it was resumed.
    pub(super) async fn connect(
        &self,
        id: &str,
        timeout: Option<i64>,
        reboot: bool,
    ) -> Result<(Value, bool), ApiError> {
        let path = format!("/v2/sandboxes/{}/connect", segment(id)?);
        let body = wrenn_api::ConnectSandbox {
            timeout,
            memory: reboot.then_some(false),
        };
        let resp = self
            .send(self.request(Method::POST, &path).json(&body), Some(id))
            .await?;
        let resumed = resp.status() == StatusCode::CREATED;
        Ok((self.json(resp).await?, resumed))
    }

    /// `GET /sandboxes/{id}`.
    pub(super) async fn info(&self, id: &str) -> Result<Value, ApiError> {
        let path = format!("/sandboxes/{}", segment(id)?);
        let resp = self
            .send(self.request(Method::GET, &path), Some(id))
            .await?;
        self.json(resp).await
    }
}

impl Api {
    /// Any route: `body` as JSON, the answer as JSON (`null` when empty).
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = self.send(req, None).await?;
        let bytes = resp.bytes().await.map_err(|source| ApiError::Transport {
            url: self.base.clone(),
            source,
        })?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadResponse {
            url: self.base.clone(),
            what: e.to_string(),
        })
    }

    /// `PUT`s `body` to an upload link the API gave (no API key: the link is signed).
    pub(super) async fn upload(&self, url: &str, body: Vec<u8>) -> Result<(), ApiError> {
        self.send(self.http.put(url).body(body), None).await?;
        Ok(())
    }

    /// `PUT`s file `path` to an upload link, streamed (image archives are large).
    pub(super) async fn upload_file(
        &self,
        url: &str,
        path: &std::path::Path,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("open {}", path.display()))?;
        let len = file.metadata().await?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let req = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        self.send(req, None).await?;
        Ok(())
    }

    /// Whether `name` is a template this key may use (`GET /templates/aliases/{name}`).
    pub(super) async fn template_exists(&self, name: &str) -> Result<bool, ApiError> {
        let path = format!("/templates/aliases/{}", segment(name)?);
        match self.send(self.request(Method::GET, &path), None).await {
            Ok(_) => Ok(true),
            Err(ApiError::Status { status: 404, .. }) => Ok(false),
            Err(ApiError::Status { status: 403, .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }
}

/// An ID as one path segment. `.` and `..` would be resolved away by URL normalization and
/// reach another route, so they (and the empty ID) are answered locally as not found.
pub(super) fn segment(id: &str) -> Result<String, ApiError> {
    if id.is_empty() || id.bytes().all(|b| b == b'.') {
        return Err(ApiError::SandboxNotFound(format!("{id:?}")));
    }
    Ok(encode(id))
}

/// Percent-encodes everything but RFC 3986 unreserved characters: safe as a path segment and
/// as a form value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode("abc-1_2.3~"), "abc-1_2.3~");
        assert_eq!(encode("a b/&=é"), "a%20b%2F%26%3D%C3%A9");
        assert_eq!(encode(".."), "..");
    }
}
