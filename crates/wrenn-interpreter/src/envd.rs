//! The sandbox's environment variables, from envd's `GET /envs`.
//!
//! This server and its default context start before the template's memory snapshot, long
//! before a sandbox's `envs` reach envd through `/init`; so, as E2B's server does, every
//! worker asks envd once, before its first execution, with the client's `X-Access-Token`.
//!
//! One HTTP/1.0 request over loopback: a 1.0 answer is never chunked and ends with the
//! connection, which keeps this a few lines instead of an HTTP client dependency.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// envd's answers are small; anything bigger is not envd.
const MAX_ANSWER: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(3);

/// Why the environment could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error("envd URL '{0}' is not http://host:port")]
    BadUrl(String),
    #[error("connect to envd at {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("talk to envd")]
    Io(#[source] std::io::Error),
    #[error("envd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("envd answered {0}")]
    Status(String),
    #[error("envd's /envs is not a JSON object of strings")]
    Body(#[source] serde_json::Error),
}

/// `GET <base>/envs`.
pub async fn fetch_envs(
    base: &str,
    access_token: Option<&str>,
) -> Result<BTreeMap<String, String>, EnvdError> {
    tokio::time::timeout(TIMEOUT, fetch(base, access_token))
        .await
        .map_err(|_| EnvdError::Timeout(TIMEOUT))?
}

async fn fetch(
    base: &str,
    access_token: Option<&str>,
) -> Result<BTreeMap<String, String>, EnvdError> {
    let authority = base
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/') && !a.contains(['\r', '\n']))
        .ok_or_else(|| EnvdError::BadUrl(base.into()))?;
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| EnvdError::Connect(authority.into(), e))?;
    let mut request = format!("GET /envs HTTP/1.0\r\nHost: {authority}\r\n");
    // A token with a line break would forge headers; envd would refuse it anyway.
    if let Some(token) = access_token.filter(|t| !t.contains(['\r', '\n'])) {
        request.push_str(&format!("X-Access-Token: {token}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(EnvdError::Io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .await
        .map_err(EnvdError::Io)?;
    parse_answer(&answer)
}

fn parse_answer(answer: &[u8]) -> Result<BTreeMap<String, String>, EnvdError> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| EnvdError::Status("no complete header".into()))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.lines().next().unwrap_or("");
    if status.split(' ').nth(1) != Some("200") {
        return Err(EnvdError::Status(status.into()));
    }
    serde_json::from_slice(&answer[split + 4..]).map_err(EnvdError::Body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"A\":\"1\"}";
        assert_eq!(
            parse_answer(ok).unwrap().get("A").map(String::as_str),
            Some("1")
        );
        let denied = b"HTTP/1.0 401 Unauthorized\r\n\r\n{}";
        assert!(matches!(parse_answer(denied), Err(EnvdError::Status(_))));
    }

    #[tokio::test]
    async fn urls_other_than_plain_http_are_refused() {
        for url in ["https://x:1", "http://", "http://a/b", "x"] {
            assert!(matches!(
                fetch_envs(url, None).await,
                Err(EnvdError::BadUrl(_))
            ));
        }
    }
}
