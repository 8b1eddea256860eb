//! The REST side of envd: `/health`, `/init`, `/files`, `/envs`, `/metrics`,
//! `/snapshot/prepare`.
//!
//! Every error body is `{"code": <status>, "message": "..."}`, produced by
//! [`EnvdError`](crate::error::EnvdError)'s `IntoResponse`.

pub mod auth;
mod download;
mod init;
mod metrics;
mod upload;
mod xattrs;

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::Deserialize;

use crate::error::EnvdError;
use crate::state::Envd;

/// What the REST handlers share: envd's state plus what only these endpoints keep.
pub(crate) struct HttpState {
    envd: Arc<Envd>,
    /// Serializes `/init` and remembers the newest timestamp applied (the replay guard).
    init: tokio::sync::Mutex<init::InitState>,
    /// The CPU counters of the previous `/metrics` call.
    cpu: std::sync::Mutex<Option<metrics::CpuSample>>,
}

pub fn router(envd: Arc<Envd>) -> axum::Router {
    let state = Arc::new(HttpState {
        envd,
        init: tokio::sync::Mutex::new(init::InitState::default()),
        // The first /metrics call then measures since envd started.
        cpu: std::sync::Mutex::new(metrics::CpuSample::read().ok()),
    });
    axum::Router::new()
        .route("/health", get(health))
        .route("/init", post(init::init))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics::metrics))
        .route("/files", get(download::download).post(upload::upload))
        .route("/snapshot/prepare", post(snapshot_prepare))
        .with_state(state)
}

async fn health() -> Response {
    (
        StatusCode::NO_CONTENT,
        [(http::header::CACHE_CONTROL, "no-store")],
    )
        .into_response()
}

async fn envs(State(st): State<Arc<HttpState>>) -> Response {
    let vars: std::collections::BTreeMap<_, _> = st.envd.env_vars().into_iter().collect();
    ([(http::header::CACHE_CONTROL, "no-store")], Json(vars)).into_response()
}

/// Quiesces envd before the host pauses the VM; answers only once that is done.
async fn snapshot_prepare(State(st): State<Arc<HttpState>>) -> Result<StatusCode, EnvdError> {
    crate::lifecycle::prepare(&st.envd).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The query of `GET /files` and `POST /files`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct FilesQuery {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    pub signature_expiration: Option<String>,
}

impl FilesQuery {
    /// Parses the query of `uri`, with errors in the JSON error shape (axum's own `Query`
    /// rejection would answer plain text).
    pub(crate) fn parse(uri: &http::Uri) -> Result<FilesQuery, EnvdError> {
        axum::extract::Query::<FilesQuery>::try_from_uri(uri)
            .map(|q| q.0)
            .map_err(|e| EnvdError::InvalidArgument(format!("invalid query: {}", e.body_text())))
    }
}

/// The user a `/files` request acts as, and its resolved path.
fn files_target(
    envd: &Envd,
    q: &FilesQuery,
) -> Result<(crate::user::User, std::path::PathBuf), EnvdError> {
    let user = envd.user(q.username.as_deref())?;
    let workdir = envd.defaults().workdir;
    let path = crate::paths::resolve(q.path.as_deref().unwrap_or(""), &user, workdir.as_deref())?;
    Ok((user, path))
}
