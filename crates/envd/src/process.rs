//! `process.Process`: start, attach to, feed and signal processes, with or without a PTY.

use std::sync::Arc;

use crate::state::Envd;

/// The live processes envd started (and recently ended ones, for re-attach).
#[derive(Default)]
pub struct Processes {}

/// The Connect routes of `process.Process`.
pub fn router(envd: Arc<Envd>) -> axum::Router {
    let _ = envd;
    wrenn_connect::RpcRouter::new().into_router()
}
