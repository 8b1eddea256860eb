//! The snapshot and fork routes: `POST /sandboxes/{id}/snapshots`, `GET /snapshots` and
//! `POST /sandboxes/{id}/fork` (a snapshot is deleted through `DELETE /templates/{id}`, in
//! `api::templates`, as the SDKs do).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use wrenn_api::{ForkSandbox, NewSnapshot};

use super::{AuthTeam, Body, Cp, MAX_LIMIT, detached, query};
use crate::error::ApiError;
use crate::service::ControlPlane;

pub(super) fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/sandboxes/{id}/snapshots", post(create))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/snapshots", get(list))
}

/// 201 with the snapshot's `SnapshotInfo`.
async fn create(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<NewSnapshot>,
) -> Result<Response, ApiError> {
    let info = detached(async move { cp.snapshot(&team, &id, body).await }).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// 201 with one entry per fork (`{sandbox}` or `{error}`), whatever became of each.
async fn fork(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<ForkSandbox>,
) -> Result<Response, ApiError> {
    let forks = detached(async move { cp.fork(&team, &id, body).await }).await?;
    Ok((StatusCode::CREATED, Json(forks)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    name: Option<String>,
    limit: Option<i64>,
    next_token: Option<String>,
}

/// 200 with a page of `SnapshotInfo`; `x-next-token` only when another page follows.
async fn list(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let q: ListQuery = query(uri.query())?;
    let limit = match q.limit {
        None => MAX_LIMIT,
        Some(l) if (1..=MAX_LIMIT as i64).contains(&l) => l as usize,
        Some(l) => {
            return Err(ApiError::BadRequest(format!(
                "Invalid limit {l}: use 1 to {MAX_LIMIT}"
            )));
        }
    };
    fn given(s: &Option<String>) -> Option<&str> {
        s.as_deref().filter(|s| !s.is_empty())
    }
    let (items, next) = cp
        .list_snapshots(
            &team,
            given(&q.sandbox_id),
            given(&q.name),
            given(&q.next_token),
            limit,
        )
        .await?;
    Ok(super::paged(Json(items), next))
}
