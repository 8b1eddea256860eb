//! The routes agents on other machines call (`POST /hosts/join`, `POST /hosts/{id}/heartbeat`)
//! and the operator's view of the hosts (`GET /admin/hosts`). Agents present a bearer token:
//! the cluster's join token to join, then their host's secret.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderMap, StatusCode};
use wrenn_api::{Heartbeat, HostJoin};

use super::{Admin, Cp, RequiredBody};
use crate::error::ApiError;
use crate::service::ControlPlane;

pub(super) fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/hosts/join", post(join))
        .route("/hosts/{id}/heartbeat", post(heartbeat))
        .route("/admin/hosts", get(list).post(super::admin_register_host))
}

/// The bearer token of `Authorization`, or a 401.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("Missing bearer token".to_owned()))
}

async fn join(
    State(cp): Cp,
    headers: HeaderMap,
    RequiredBody(body): RequiredBody<HostJoin>,
) -> Result<Response, ApiError> {
    let joined = cp.join_host(bearer(&headers)?, &body).await?;
    Ok((StatusCode::OK, Json(joined)).into_response())
}

async fn heartbeat(
    State(cp): Cp,
    Path(id): Path<String>,
    headers: HeaderMap,
    RequiredBody(body): RequiredBody<Heartbeat>,
) -> Result<Response, ApiError> {
    cp.host_heartbeat(&id, bearer(&headers)?, &body).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list(State(cp): Cp, _: Admin) -> Result<Response, ApiError> {
    Ok(Json(cp.host_statuses().await?).into_response())
}
