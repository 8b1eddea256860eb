//! Snapshot lifecycle: quiesce on `/snapshot/prepare`, restart on `/init`.

use std::sync::Arc;

use crate::error::EnvdError;
use crate::state::Envd;

/// Tracks whether envd is prepared for a snapshot.
#[derive(Default)]
pub struct Lifecycle {}

/// Stops continuous work (port scanner and forwarders), closes idle keep-alive connections,
/// syncs filesystems; returns once quiescent.
pub async fn prepare(envd: &Arc<Envd>) -> Result<(), EnvdError> {
    envd.ports.stop().await;
    envd.connections.close_idle();
    Ok(())
}

/// Restarts what [`prepare`] stopped. Called by `/init` (after every restore).
pub fn resume(envd: &Arc<Envd>) {
    envd.ports.start();
}
