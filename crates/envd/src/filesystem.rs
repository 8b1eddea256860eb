//! `filesystem.Filesystem`: stat, list, make, move, remove and watch paths.

use std::sync::Arc;

use crate::state::Envd;

/// Watchers created with `CreateWatcher`, polled with `GetWatcherEvents`.
#[derive(Default)]
pub struct Watchers {}

/// The Connect routes of `filesystem.Filesystem`.
pub fn router(envd: Arc<Envd>) -> axum::Router {
    let _ = envd;
    wrenn_connect::RpcRouter::new().into_router()
}
