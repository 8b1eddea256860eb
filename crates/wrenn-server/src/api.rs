//! The E2B-compatible REST API (v1 and v2 routes the SDKs use) and the admin routes.
//!
//! Handlers only parse, authenticate and check input, then call [`ControlPlane`]. Every error,
//! extractor rejections included, leaves as an E2B error body through [`ApiError`].

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use wrenn_api::{
    ConnectSandbox, NetworkUpdate, NewApiKey, NewHost, NewSandbox, NewTeam, PauseSandbox,
    RefreshSandbox, ResumedSandbox, SandboxTimeout,
};
use wrenn_core::{HostId, PublicState, SandboxState, UnixMillis};

use crate::create::IdempotencyKey;
use crate::error::ApiError;
use crate::service::{ControlPlane, decode_cursor};
use crate::store::{SandboxFilter, TeamRecord, TemplateRecord};
use crate::{timing, tokens};

mod hosts;
mod snapshots;
mod templates;

type Cp = State<Arc<ControlPlane>>;

/// Largest page of a list.
const MAX_LIMIT: usize = 100;

pub(crate) fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/sandboxes", post(create_v1).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/network", put(update_network))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/logs", get(logs))
        .route("/templates/aliases/{alias}", get(template_alias))
        .route("/admin/teams", post(admin_create_team))
        .route("/admin/teams/{team}/api-keys", post(admin_create_key))
        .route("/admin/templates", post(admin_register_template))
        .route("/admin/hosts/{id}", delete(not_implemented))
        .route("/admin/hosts/{id}/secret", get(admin_host_secret))
        .merge(templates::routes())
        .merge(hosts::routes())
        .merge(snapshots::routes())
        .fallback(not_found)
        .with_state(cp)
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Not found".to_owned())
}

async fn not_implemented() -> Response {
    crate::error::error_response(StatusCode::NOT_IMPLEMENTED, "Not implemented".to_owned())
}

/// The team of the request's `X-API-KEY`.
pub(crate) struct AuthTeam(TeamRecord);

impl FromRequestParts<Arc<ControlPlane>> for AuthTeam {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get(wrenn_api::API_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("Missing X-API-KEY header".to_owned()))?;
        match cp.authenticate(key).await? {
            Some(team) => Ok(AuthTeam(team)),
            None => Err(ApiError::Unauthorized("Invalid API key".to_owned())),
        }
    }
}

/// A request carrying the configured admin token in `X-Admin-Token`.
pub(crate) struct Admin;

impl FromRequestParts<Arc<ControlPlane>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get("x-admin-token")
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        match &cp.config.admin_token {
            Some(want) if !given.is_empty() && tokens::constant_time_eq(want.as_bytes(), given) => {
                Ok(Admin)
            }
            _ => Err(ApiError::Unauthorized("Invalid admin token".to_owned())),
        }
    }
}

/// A JSON body, whatever its Content-Type (the JS SDK sends chunked bodies); an empty body is
/// the default value. Malformed bodies are a 400 in the E2B shape.
pub(crate) struct Body<T>(T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Body(parse_body(req, state).await?.unwrap_or_default()))
    }
}

/// Like [`Body`], but a body is required.
pub(crate) struct RequiredBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for RequiredBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        parse_body(req, state)
            .await?
            .map(RequiredBody)
            .ok_or_else(|| ApiError::BadRequest("Request body is required".to_owned()))
    }
}

async fn parse_body<T: DeserializeOwned, S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<Option<T>, ApiError> {
    let bytes = Bytes::from_request(req, state)
        .await
        .map_err(|e| ApiError::BadRequest(format!("Cannot read the request body: {e}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("Invalid request body: {e}")))
}

/// Sandbox create: v2 and v1 answer the same way (201 with a `Sandbox`), a retry with the
/// same `Idempotency-Key` too (the SDKs accept only 201 from a create).
/// Runs a lifecycle call to its end even when the client goes away (a request timeout, a
/// disconnect drops the handler): the agent finishes what it was asked (its operations are
/// detached too), so the record must follow, and a create is never left `creating`.
async fn detached<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(call)
        .await
        .map_err(|e| ApiError::Internal(format!("the operation's task failed: {e}")))?
}

async fn create(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    headers: HeaderMap,
    RequiredBody(body): RequiredBody<NewSandbox>,
) -> Result<Response, ApiError> {
    let key = match headers.get(IdempotencyKey::HEADER) {
        None => None,
        Some(v) => Some(IdempotencyKey::parse(v.to_str().unwrap_or("\u{fffd}"))?),
    };
    let created = detached(async move { cp.create(&team, body, key.as_ref()).await }).await?;
    let mut response = (StatusCode::CREATED, Json(created.sandbox)).into_response();
    if let Some(v) = created
        .timing
        .header_value()
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        response.headers_mut().insert(timing::HEADER, v);
    }
    Ok(response)
}

async fn create_v1(
    cp: Cp,
    team: AuthTeam,
    headers: HeaderMap,
    body: RequiredBody<NewSandbox>,
) -> Result<Response, ApiError> {
    create(cp, team, headers, body).await
}

async fn connect(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<ConnectSandbox>,
) -> Result<Response, ApiError> {
    let (sbx, resumed) = detached(async move { cp.connect(&team, &id, body).await }).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sbx)).into_response())
}

async fn resume(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<ResumedSandbox>,
) -> Result<Response, ApiError> {
    let sbx = detached(async move { cp.resume(&team, &id, body.timeout).await }).await?;
    Ok((StatusCode::CREATED, Json(sbx)).into_response())
}

async fn kill(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    detached(async move { cp.kill(&team, &id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<PauseSandbox>,
) -> Result<StatusCode, ApiError> {
    detached(async move { cp.pause(&team, &id, body).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    RequiredBody(body): RequiredBody<SandboxTimeout>,
) -> Result<StatusCode, ApiError> {
    cp.set_timeout(&team, &id, body.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /sandboxes/{id}/network` (the SDK's `update_network`): 204.
async fn update_network(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    RequiredBody(body): RequiredBody<NetworkUpdate>,
) -> Result<StatusCode, ApiError> {
    detached(async move { cp.update_network(&team, &id, body).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    Body(body): Body<RefreshSandbox>,
) -> Result<StatusCode, ApiError> {
    cp.refresh(&team, &id, body.duration).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What `Template.exists` asks: 200 for a template the team may use, 403 for another team's
/// (it exists), 404 for none. A template's name is its ID.
async fn template_alias(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(alias): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(cp.template_alias(&team, &alias).await?).into_response())
}

async fn get_sandbox(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(cp.detail(&team, &id).await?).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    started_after: Option<String>,
    template: Option<String>,
    order: Option<String>,
    limit: Option<i64>,
    next_token: Option<String>,
}

/// Query strings are parsed by hand so a bad one is an E2B 400, not axum's text rejection.
fn query<T: DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded_from(raw.unwrap_or(""))
}

fn serde_urlencoded_from<T: DeserializeOwned>(raw: &str) -> Result<T, ApiError> {
    Query::<T>::try_from_uri(
        &format!("/?{raw}")
            .parse()
            .map_err(|_| ApiError::BadRequest("Invalid query string".to_owned()))?,
    )
    .map(|q| q.0)
    .map_err(|e| ApiError::BadRequest(format!("Invalid query: {}", e.body_text())))
}

fn list_filter(
    team: &TeamRecord,
    q: ListQuery,
    default_states: &[SandboxState],
) -> Result<SandboxFilter, ApiError> {
    let states = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => default_states.to_vec(),
        Some(s) => s
            .split(',')
            .map(|one| match PublicState::parse(one.trim()) {
                // A state shows transitions as the state they started from.
                Some(PublicState::Running) => Ok([SandboxState::Running, SandboxState::Pausing]),
                Some(PublicState::Paused) => Ok([SandboxState::Paused, SandboxState::Resuming]),
                None => Err(ApiError::BadRequest(format!(
                    "Invalid state {one:?}: use running or paused"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect(),
    };
    // `metadata` is itself a urlencoded `k=v&k2=v2` string, whose keys and values the SDKs
    // percent-encode once more first (Python `quote`, JS `encodeURIComponent`): a value with
    // `:` or `/` only matches once both layers are undone.
    let metadata = q
        .metadata
        .as_deref()
        .map(|m| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            form_urlencoded::parse(m.as_bytes())
                .map(|(k, v)| (decode(&k), decode(&v)))
                .collect()
        })
        .unwrap_or_default();
    let started_after = q
        .started_after
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            OffsetDateTime::parse(s, &Rfc3339)
                .map(|t| {
                    UnixMillis(
                        i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
                    )
                })
                .map_err(|_| {
                    ApiError::BadRequest(format!("Invalid startedAfter {s:?}: use RFC 3339"))
                })
        })
        .transpose()?;
    let descending = match q.order.as_deref() {
        None | Some("") | Some("desc") => true,
        Some("asc") => false,
        Some(o) => {
            return Err(ApiError::BadRequest(format!(
                "Invalid order {o:?}: use asc or desc"
            )));
        }
    };
    let limit = match q.limit {
        None => MAX_LIMIT,
        Some(l) if (1..=MAX_LIMIT as i64).contains(&l) => l as usize,
        Some(l) => {
            return Err(ApiError::BadRequest(format!(
                "Invalid limit {l}: use 1 to {MAX_LIMIT}"
            )));
        }
    };
    let after = q
        .next_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(decode_cursor)
        .transpose()?;
    Ok(SandboxFilter {
        team_id: team.id.clone(),
        states,
        template_id: q.template.filter(|t| !t.is_empty()),
        started_after,
        metadata,
        descending,
        after,
        limit,
    })
}

async fn list(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let q: ListQuery = query(uri.query())?;
    let filter = list_filter(
        &team,
        q,
        &[
            SandboxState::Running,
            SandboxState::Pausing,
            SandboxState::Paused,
            SandboxState::Resuming,
        ],
    )?;
    let (items, next) = cp.list(&filter).await?;
    Ok(paged(Json(items), next))
}

/// A page of a listing, with `X-Next-Token` when another page follows.
pub(crate) fn paged(body: impl IntoResponse, next: Option<String>) -> Response {
    let mut resp = body.into_response();
    if let Some(next) = next {
        resp.headers_mut().insert(
            wrenn_api::NEXT_TOKEN_HEADER,
            HeaderValue::from_str(&next).expect("base64 is a valid header"),
        );
    }
    resp
}

/// v1 list: running sandboxes only, no pagination (as E2B's deprecated route).
async fn list_v1(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let q: ListQuery = query(uri.query())?;
    let q = ListQuery {
        metadata: q.metadata,
        ..Default::default()
    };
    let mut filter = list_filter(&team, q, &[SandboxState::Running, SandboxState::Pausing])?;
    let mut all = Vec::new();
    loop {
        let (items, next) = cp.list(&filter).await?;
        all.extend(items);
        match next {
            Some(t) => filter.after = Some(decode_cursor(&t)?),
            None => break,
        }
    }
    Ok(Json(all).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

async fn metrics(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let q: MetricsQuery = query(uri.query())?;
    Ok(Json(cp.metrics(&team, &id, q.start, q.end).await?).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct LogsQuery {
    start: Option<i64>,
    limit: Option<u32>,
}

async fn logs(
    State(cp): Cp,
    AuthTeam(team): AuthTeam,
    Path(id): Path<String>,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let q: LogsQuery = query(uri.query())?;
    let limit = q.limit.unwrap_or(1000).min(1000);
    Ok(Json(cp.logs(&team, &id, q.start, limit).await?).into_response())
}

// Admin.

async fn admin_create_team(
    State(cp): Cp,
    _: Admin,
    RequiredBody(body): RequiredBody<NewTeam>,
) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(cp.create_team(&body.name).await?)).into_response())
}

async fn admin_create_key(
    State(cp): Cp,
    _: Admin,
    Path(team): Path<String>,
    Body(body): Body<NewApiKey>,
) -> Result<Response, ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(cp.create_api_key(&team, &body.name).await?),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewTemplate {
    id: String,
    #[serde(rename = "teamID")]
    team_id: Option<String>,
    envd_version: String,
    #[serde(default)]
    cpu_count: Option<u32>,
    #[serde(default, rename = "memoryMB")]
    memory_mb: Option<u64>,
    #[serde(default, rename = "diskSizeMB")]
    disk_size_mb: Option<u64>,
}

async fn admin_register_template(
    State(cp): Cp,
    _: Admin,
    RequiredBody(t): RequiredBody<NewTemplate>,
) -> Result<StatusCode, ApiError> {
    let team_id = t
        .team_id
        .map(|id| wrenn_core::TeamId::parse(&id).map_err(|e| ApiError::BadRequest(e.to_string())))
        .transpose()?;
    cp.register_template(&TemplateRecord {
        id: t.id,
        team_id,
        envd_version: t.envd_version,
        vcpus: t.cpu_count.unwrap_or(2),
        memory_mb: t.memory_mb.unwrap_or(512),
        disk_size_mb: t.disk_size_mb.unwrap_or(2048),
        name: None,
        build: None,
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The secret the agent of host `id` must be started with when the control plane reaches it
/// over the network (before it is registered: registration already calls it).
async fn admin_host_secret(
    State(cp): Cp,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<wrenn_api::AgentSecret>, ApiError> {
    let host_id = HostId::parse(&id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(Json(wrenn_api::AgentSecret {
        secret: cp.agent_secret(&host_id),
        host_id: id,
    }))
}

pub(super) async fn admin_register_host(
    State(cp): Cp,
    _: Admin,
    RequiredBody(h): RequiredBody<NewHost>,
) -> Result<Response, ApiError> {
    let host = cp.register_host(&h.id, &h.rpc_url, &h.proxy_url).await?;
    let out = wrenn_api::Host {
        id: host.id.to_string(),
        rpc_url: host.rpc_url,
        proxy_url: host.proxy_url,
        vcpus: host.vcpus,
        memory_mb: host.memory_mb,
        version: host.version,
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}
