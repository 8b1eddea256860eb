//! The template routes: builds as the SDKs' `Template` builder drives them, the signed
//! build-file links (the SDK uploads a `COPY` context with `PUT`, the building agent reads it
//! with `GET`), and the template list, one template with its builds, its update (`public`),
//! tags and deletion.

use std::sync::Arc;

use axum::body::Body as RawBody;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use futures::StreamExt as _;
use http::{HeaderMap, StatusCode};
use tokio::io::AsyncWriteExt as _;
use wrenn_api::{
    AssignTemplateTags, DeleteTemplateTags, TemplateBuildRequest, TemplateBuildStart,
    TemplateUpdateRequest,
};

use serde::Deserialize;

use super::{AuthTeam, Body, Cp, MAX_LIMIT, RequiredBody, query};
use crate::error::ApiError;
use crate::service::ControlPlane;

/// The largest context archive taken.
const MAX_ARCHIVE_BYTES: u64 = 8 << 30;

pub(super) fn routes() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route("/v3/templates", post(request_build))
        .route("/templates", get(list))
        .route(
            "/templates/{id}",
            get(get_template).patch(update_v1).delete(delete_template),
        )
        .route("/v2/templates/{id}", patch(update_v2))
        .route("/templates/{id}/files/{hash}", get(upload_link))
        .route("/v2/templates/{id}/builds/{build}", post(start_build))
        .route("/templates/{id}/builds/{build}/status", get(build_status))
        .route("/templates/{id}/builds/{build}/logs", get(build_logs))
        .route("/templates/{id}/tags", get(tags))
        .route("/templates/tags", post(assign_tags).delete(delete_tags))
        .route("/build-files/{team}/{hash}", put(put_file).get(get_file))
}

/// `.../status` query (as the SDKs page the log).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    logs_offset: Option<u64>,
    limit: Option<u64>,
    level: Option<String>,
}

/// `.../logs` query.
#[derive(Debug, Default, Deserialize)]
struct LogsQuery {
    cursor: Option<i64>,
    limit: Option<u64>,
    direction: Option<String>,
    level: Option<String>,
}

/// `GET /templates/{id}` query: the page of builds.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BuildsQuery {
    limit: Option<i64>,
    next_token: Option<String>,
}

/// A signed build-file link's query.
#[derive(Debug, Default, Deserialize)]
struct SignedQuery {
    expires: Option<i64>,
    signature: Option<String>,
}

/// Where clients reach this API: the configured URL, else the request's `Host`.
fn base_url(cp: &ControlPlane, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(url) = &cp.config.api_url {
        return Ok(url.clone());
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("Missing Host header".to_owned()))?;
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    Ok(format!("{scheme}://{host}"))
}

async fn request_build(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    RequiredBody(body): RequiredBody<TemplateBuildRequest>,
) -> Result<Response, ApiError> {
    let res = cp.request_build(&team, body).await?;
    Ok((StatusCode::ACCEPTED, Json(res)).into_response())
}

async fn upload_link(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    headers: HeaderMap,
    Path((id, hash)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let base = base_url(&cp, &headers)?;
    let res = cp.file_upload_link(&team, &id, &hash, &base).await?;
    Ok((StatusCode::CREATED, Json(res)).into_response())
}

async fn start_build(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    headers: HeaderMap,
    Path((id, build)): Path<(String, String)>,
    Body(body): Body<TemplateBuildStart>,
) -> Result<StatusCode, ApiError> {
    let base = base_url(&cp, &headers)?;
    cp.start_build(&team, &id, &build, body, &base).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn build_status(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path((id, build)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q: StatusQuery = query(raw.as_deref())?;
    let res = cp
        .build_status(
            &team,
            &id,
            &build,
            q.logs_offset.unwrap_or(0),
            q.limit,
            q.level.as_deref(),
        )
        .await?;
    Ok(Json(res).into_response())
}

async fn build_logs(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path((id, build)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q: LogsQuery = query(raw.as_deref())?;
    let page = crate::templates::LogPage {
        cursor: q.cursor,
        limit: q.limit,
        direction: q.direction.as_deref(),
        level: q.level.as_deref(),
    };
    Ok(Json(cp.build_logs(&team, &id, &build, page).await?).into_response())
}

async fn list(State(cp): Cp, AuthTeam(team): AuthTeam) -> Result<Response, ApiError> {
    Ok(Json(cp.list_templates(&team).await?).into_response())
}

/// 200 with the template and a page of its builds; `x-next-token` only when another page
/// follows.
async fn get_template(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q: BuildsQuery = query(raw.as_deref())?;
    let limit = match q.limit {
        None => MAX_LIMIT,
        Some(l) if (1..=MAX_LIMIT as i64).contains(&l) => l as usize,
        Some(l) => {
            return Err(ApiError::BadRequest(format!(
                "Invalid limit {l}: use 1 to {MAX_LIMIT}"
            )));
        }
    };
    let token = q.next_token.as_deref().filter(|t| !t.is_empty());
    let (tpl, next) = cp.template_with_builds(&team, &id, token, limit).await?;
    Ok(super::paged(Json(tpl), next))
}

/// The deprecated v1 update: 200 with no body.
async fn update_v1(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<TemplateUpdateRequest>,
) -> Result<StatusCode, ApiError> {
    cp.update_template(&team, &id, body).await?;
    Ok(StatusCode::OK)
}

/// 200 with the template's names.
async fn update_v2(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<TemplateUpdateRequest>,
) -> Result<Response, ApiError> {
    Ok(Json(cp.update_template(&team, &id, body).await?).into_response())
}

/// A template, or a snapshot: the SDKs delete snapshots here (204; unknown: 404).
async fn delete_template(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    cp.delete_template_or_snapshot(&team, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn tags(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(cp.template_tags(&team, &id).await?).into_response())
}

async fn assign_tags(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    RequiredBody(body): RequiredBody<AssignTemplateTags>,
) -> Result<Response, ApiError> {
    let res = cp.assign_tags(&team, body).await?;
    Ok((StatusCode::CREATED, Json(res)).into_response())
}

async fn delete_tags(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    RequiredBody(body): RequiredBody<DeleteTemplateTags>,
) -> Result<StatusCode, ApiError> {
    cp.delete_tags(&team, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The archive a signed link names, after its signature is checked.
fn signed_path(
    cp: &ControlPlane,
    method: &str,
    team: &str,
    hash: &str,
    raw: Option<String>,
) -> Result<std::path::PathBuf, ApiError> {
    let q: SignedQuery = query(raw.as_deref())?;
    let expires = q
        .expires
        .ok_or_else(|| ApiError::Unauthorized("Missing expires".to_owned()))?;
    let signature = q
        .signature
        .ok_or_else(|| ApiError::Unauthorized("Missing signature".to_owned()))?;
    cp.check_file_link(method, team, hash, expires, &signature)
}

/// `PUT` of a context archive (the SDK, with an upload link): streamed to a temporary file,
/// then renamed into place, so a half-uploaded archive is never taken for a whole one.
async fn put_file(
    State(cp): Cp,
    Path((team, hash)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    body: RawBody,
) -> Result<StatusCode, ApiError> {
    let path = signed_path(&cp, "PUT", &team, &hash, raw)?;
    let io = |e: std::io::Error| ApiError::Internal(format!("store the upload: {e}"));
    let dir = path.parent().expect("a file in a team directory");
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let part = dir.join(format!(".{hash}.{:016x}.part", rand::random::<u64>()));
    let res = async {
        let mut file = tokio::fs::File::create(&part).await.map_err(io)?;
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("Cannot read the upload: {e}")))?;
            total += chunk.len() as u64;
            if total > MAX_ARCHIVE_BYTES {
                return Err(ApiError::BadRequest(format!(
                    "The archive is larger than {MAX_ARCHIVE_BYTES} bytes"
                )));
            }
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        tokio::fs::rename(&part, &path).await.map_err(io)
    }
    .await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    res.map(|()| StatusCode::OK)
}

/// `GET` of a context archive (the building agent, with a download link).
async fn get_file(
    State(cp): Cp,
    Path((team, hash)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let path = signed_path(&cp, "GET", &team, &hash, raw)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::NotFound(format!("No archive {hash}")))?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [(http::header::CONTENT_TYPE, "application/gzip")],
        RawBody::from_stream(stream),
    )
        .into_response())
}
