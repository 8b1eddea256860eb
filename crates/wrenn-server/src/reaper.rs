//! The reaper: kills expired sandboxes, or pauses those created with auto-pause, every tick
//! until cancelled.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::Chain;
use crate::service::ControlPlane;

/// Starts the reaper; it stops when `shutdown` is cancelled.
pub fn spawn(cp: Arc<ControlPlane>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cp.config.reaper_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            // A pause can take seconds; shutdown waits for the current sandbox, not the batch.
            tokio::select! {
                res = cp.expire() => if let Err(e) = res {
                    tracing::error!(error = %Chain(&e), "reaper could not read expired sandboxes");
                },
                _ = shutdown.cancelled() => break,
            }
        }
    })
}
