//! The routes the E2B code-interpreter SDKs call, as E2B's server answers them:
//! `GET /health`, `POST /execute` (a stream of JSON lines, see [`crate::wire`]),
//! `POST|GET /contexts`, `POST /contexts/{id}/restart`, `DELETE /contexts/{id}`.
//!
//! `X-Access-Token` is not checked here (the sandbox's traffic proxy gates who reaches the
//! port, as E2B's does); it is passed on to envd when a worker fetches the sandbox's
//! environment. CORS is open, as E2B's server has it, for the JS SDK in a browser.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::registry::{Registry, info};
use crate::wire::{ContextInfo, CreateContextRequest, Event, ExecuteRequest};

/// A cell may carry data (E2B's server sets no limit; axum's default is 2 MiB).
const MAX_EXECUTE_BODY: usize = 64 << 20;
/// Lines an execution may have ready before the client reads them.
const STREAM_QUEUE: usize = 32;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    keepalive: Duration,
}

pub fn router(registry: Arc<Registry>, keepalive: Duration) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/execute",
            post(execute).layer(DefaultBodyLimit::max(MAX_EXECUTE_BODY)),
        )
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}/restart", post(restart_context))
        .route("/contexts/{id}", delete(remove_context))
        .with_state(AppState {
            registry,
            keepalive,
        })
        .layer(axum::middleware::from_fn(cors))
}

/// E2B's template waits for this before the snapshot; answered once the default context's
/// worker is ready.
async fn health() -> Json<&'static str> {
    Json("OK")
}

async fn execute(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ExecuteRequest = parse_body(&body)?;
    let ctx = st
        .registry
        .for_execution(req.context_id.as_deref(), req.language.as_deref())
        .await?;
    let token = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    tokio::spawn(ctx.execute(req, token, tx));
    // Headers go out now, before a queued execution gets its turn: the SDKs' request
    // timeout runs until they arrive.
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines(rx, st.keepalive)),
    )
        .into_response())
}

/// The execution's lines, a keepalive after every `keepalive` of silence (a client that
/// left is only noticed on a write), and `end_of_execution` last.
fn lines(
    rx: mpsc::Receiver<Bytes>,
    keepalive: Duration,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        let line = match tokio::time::timeout(keepalive, rx.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => return Some((Ok(Event::EndOfExecution.to_line()), None)),
            Err(_) => Event::Keepalive.to_line(),
        };
        Some((Ok(line), Some(rx)))
    })
}

async fn create_context(
    State(st): State<AppState>,
    body: Bytes,
) -> Result<Json<ContextInfo>, ApiError> {
    let req: CreateContextRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateContextRequest::default()
    } else {
        parse_body(&body)?
    };
    let ctx = st
        .registry
        .create(req.language.as_deref(), req.cwd.as_deref())
        .await?;
    Ok(Json(info(&ctx)))
}

async fn list_contexts(State(st): State<AppState>) -> Json<Vec<ContextInfo>> {
    Json(st.registry.list())
}

/// E2B answers `null` (FastAPI's rendering of a handler returning nothing).
async fn restart_context(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<()>, ApiError> {
    let ctx = st.registry.get(&id).ok_or(ApiError::ContextNotFound(id))?;
    ctx.restart().await.map_err(ApiError::Start)?;
    Ok(Json(()))
}

async fn remove_context(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<()>, ApiError> {
    st.registry.remove(&id).await?;
    Ok(Json(()))
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadBody(e.to_string()))
}

/// Any origin, any method, the headers asked for: what Starlette's CORS middleware answers
/// with `allow_origins=["*"]`.
async fn cors(req: Request, next: Next) -> Response {
    let any = HeaderValue::from_static("*");
    if req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let allow_headers = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| any.clone());
        return (
            StatusCode::OK,
            [
                (header::ACCESS_CONTROL_ALLOW_ORIGIN, any),
                (
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
                ),
                (header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers),
                (
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static("600"),
                ),
            ],
        )
            .into_response();
    }
    let mut res = next.run(req).await;
    res.headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, any);
    res
}
