//! The REST side of envd: `/health`, `/init`, `/files`, `/envs`, `/metrics`,
//! `/snapshot/prepare`.

pub mod auth;

use std::sync::Arc;

use axum::routing::get;
use http::StatusCode;

use crate::state::Envd;

pub fn router(envd: Arc<Envd>) -> axum::Router {
    axum::Router::new().route("/health", get(health)).with_state(envd)
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}
