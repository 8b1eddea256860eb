//! Snapshot lifecycle: quiesce on `/snapshot/prepare`, restart on `/init`.
//!
//! Before the agent freezes the VM, envd stops its continuous work (the port scanner and
//! forwarders), closes idle keep-alive connections and syncs filesystems, so nothing runs,
//! allocates or holds a lock across the freeze. After restore the agent calls `/init`, which
//! calls [`resume`]; it restarts only what [`prepare`] stopped, so the `/init` of a fresh
//! start (no prepare before it) changes nothing. Cycles can repeat any number of times.

use std::sync::{Arc, Mutex};

use crate::error::EnvdError;
use crate::state::Envd;

/// Where envd is in the snapshot cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    /// Normal operation.
    #[default]
    Running,
    /// `prepare` ran (or is running); continuous work is stopped until `resume`.
    Prepared,
}

/// Tracks whether envd is prepared for a snapshot.
#[derive(Default)]
pub struct Lifecycle {
    state: Mutex<State>,
}

impl Lifecycle {
    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the state; returns the previous one.
    fn set(&self, s: State) -> State {
        std::mem::replace(
            &mut *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            s,
        )
    }
}

/// Stops continuous work (port scanner and forwarders), closes idle keep-alive connections,
/// syncs filesystems; returns once quiescent.
///
/// The state flips to `Prepared` first, so a `resume` that races with a slow prepare still
/// restarts what this stops (the port subsystem waits for the old run before a new one binds).
pub async fn prepare(envd: &Arc<Envd>) -> Result<(), EnvdError> {
    envd.lifecycle.set(State::Prepared);
    envd.ports.stop().await;
    let closed = envd.connections.close_idle();
    // sync(2) can take long with dirty pages; keep it off the async workers.
    tokio::task::spawn_blocking(nix::unistd::sync)
        .await
        .map_err(|e| EnvdError::Internal(format!("sync filesystems: {e}")))?;
    tracing::info!(closed_idle_connections = closed, "prepared for snapshot");
    Ok(())
}

/// Restarts what [`prepare`] stopped. Called by `/init` (after every restore).
pub fn resume(envd: &Arc<Envd>) {
    if envd.lifecycle.set(State::Running) == State::Prepared {
        envd.ports.start();
        tracing::info!("resumed after snapshot");
    }
}
