//! `POST /init`: the host pushes env vars, the access token, its clock and defaults, at
//! template build and after every restore.
//!
//! Calls are serialized. Each one refreshes the sandbox identity from the metadata service
//! (when configured), is authorized by [`auth::authorize_init`], is ignored when its timestamp
//! is not newer than the last applied one (a replayed request), and ends by restarting what
//! `/snapshot/prepare` stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{HttpState, auth};
use crate::error::EnvdError;
use crate::state::{Envd, Identity};

/// The metadata service is link-local; anything slower than this is broken.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// The metadata document is a few hundred bytes.
const METADATA_MAX_BYTES: usize = 64 * 1024;
/// Set the guest clock when it is behind the host by more than this...
const CLOCK_BEHIND: time::Duration = time::Duration::milliseconds(50);
/// ...or ahead by more than this.
const CLOCK_AHEAD: time::Duration = time::Duration::seconds(5);

/// What `/init` remembers between calls.
#[derive(Debug, Default)]
pub(crate) struct InitState {
    /// The timestamp of the last applied request (the replay guard).
    last_applied: Option<OffsetDateTime>,
}

/// The request body; every field is optional. Fields of upstream's body that envd has no use
/// for (`hyperloopIP`, `volumeMounts`, ...) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    env_vars: Option<HashMap<String, String>>,
    access_token: Option<String>,
    timestamp: Option<String>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    /// Wrenn extension: base64 bytes of host entropy, sent after every restore so clones of
    /// one snapshot do not share RNG state (see `crate::rng`).
    entropy: Option<String>,
}

/// The metadata service's document (the fields envd uses).
#[derive(Debug, Deserialize)]
struct MetadataDoc {
    #[serde(rename = "instanceID")]
    instance_id: Option<String>,
    #[serde(rename = "envID")]
    env_id: Option<String>,
    #[serde(rename = "accessTokenHash")]
    access_token_hash: Option<String>,
}

pub(super) async fn init(State(st): State<Arc<HttpState>>, body: Bytes) -> Response {
    let mut resp = match handle(&st, &body).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    };
    let headers = resp.headers_mut();
    headers.insert(
        "x-envd-version",
        HeaderValue::from_static(crate::ENVD_VERSION),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

async fn handle(st: &HttpState, body: &[u8]) -> Result<(), EnvdError> {
    let req: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| EnvdError::InvalidArgument(format!("invalid /init body: {e}")))?
    };
    let timestamp = req
        .timestamp
        .as_deref()
        .map(|t| OffsetDateTime::parse(t, &Rfc3339))
        .transpose()
        .map_err(|e| EnvdError::InvalidArgument(format!("invalid timestamp: {e}")))?;

    let mut state = st.init.lock().await;
    let envd = &st.envd;
    if let Some(url) = envd.config.metadata_url.as_deref() {
        refresh_identity(envd, url).await;
    }
    let requested = req.access_token.as_deref().filter(|t| !t.is_empty());
    let current = envd.access_token();
    let hash = envd.identity().access_token_hash;
    if let Err(reason) = auth::authorize_init(current.as_deref(), hash.as_deref(), requested) {
        tracing::warn!(reason, "refused /init");
        return Err(EnvdError::Unauthenticated(reason.to_owned()));
    }

    // Reseed first, whatever else the request carries: a replayed /init still follows a
    // restore, and user code must not run on a cloned RNG state.
    if let Some(entropy) = req.entropy.as_deref() {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(entropy)
            .map_err(|e| EnvdError::InvalidArgument(format!("invalid entropy: {e}")))?;
        if envd.config.in_sandbox {
            crate::rng::reseed(&bytes)
                .map_err(|e| EnvdError::Internal(format!("reseed the RNG: {e:#}")))?;
        }
    }

    if let Some(ts) = timestamp {
        if state.last_applied.is_some_and(|last| ts <= last) {
            tracing::info!(%ts, "ignoring /init with an old timestamp");
            // The data is stale, but whatever prepare stopped must still restart.
            drop(state);
            crate::lifecycle::resume(envd);
            return Ok(());
        }
        state.last_applied = Some(ts);
        if envd.config.in_sandbox {
            sync_clock(ts);
        }
    }
    if let Some(vars) = req.env_vars {
        envd.set_env_vars(vars);
    }
    envd.set_access_token(requested.map(str::to_owned));
    envd.set_defaults(
        req.default_user.filter(|u| !u.is_empty()),
        req.default_workdir
            .filter(|w| !w.is_empty())
            .map(PathBuf::from),
    );
    drop(state);
    crate::lifecycle::resume(envd);
    Ok(())
}

/// Steps the guest clock to the host's when it is off: after a restore the guest clock
/// resumes at snapshot time, and TLS breaks with a clock in the past.
fn sync_clock(host: OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    if now >= host - CLOCK_BEHIND && now <= host + CLOCK_AHEAD {
        return;
    }
    let nanos = host.unix_timestamp_nanos();
    let ts = nix::sys::time::TimeSpec::new(
        (nanos.div_euclid(1_000_000_000)) as libc::time_t,
        (nanos.rem_euclid(1_000_000_000)) as libc::c_long,
    );
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        Ok(()) => tracing::info!(from = %now, to = %host, "set the guest clock"),
        Err(e) => tracing::warn!(error = %e, "could not set the guest clock"),
    }
}

/// Reads the metadata service and stores what it says. On failure the previous identity stays:
/// an unreachable service must not reopen the first-setup window.
async fn refresh_identity(envd: &Envd, url: &str) {
    match fetch_metadata(url).await {
        Ok(doc) => {
            let previous = envd.identity();
            let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
            envd.set_identity(Identity {
                sandbox_id: non_empty(doc.instance_id).or(previous.sandbox_id),
                template_id: non_empty(doc.env_id).or(previous.template_id),
                // A hash, once known, is never dropped for the same reason.
                access_token_hash: non_empty(doc.access_token_hash).or(previous.access_token_hash),
            });
        }
        Err(e) => tracing::warn!(%url, error = %e, "could not read the metadata service"),
    }
}

async fn fetch_metadata(url: &str) -> Result<MetadataDoc, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let req = http::Request::get(url)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| format!("bad metadata URL: {e}"))?;
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), METADATA_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| format!("read body: {e}"))?
            .to_bytes();
        serde_json::from_slice::<MetadataDoc>(&body).map_err(|e| format!("parse JSON: {e}"))
    };
    tokio::time::timeout(METADATA_TIMEOUT, fetch)
        .await
        .map_err(|_| "timed out".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_body() {
        let body = r#"{"envVars":{"A":"1"},"accessToken":"t","timestamp":"2025-01-02T03:04:05.123Z",
            "defaultUser":"user","defaultWorkdir":"/work","hyperloopIP":"192.0.2.1"}"#;
        let r: InitRequest = serde_json::from_str(body).unwrap();
        assert_eq!(r.env_vars.unwrap()["A"], "1");
        assert_eq!(r.access_token.as_deref(), Some("t"));
        assert!(OffsetDateTime::parse(&r.timestamp.unwrap(), &Rfc3339).is_ok());
        assert_eq!(r.default_workdir.as_deref(), Some("/work"));
    }
}
