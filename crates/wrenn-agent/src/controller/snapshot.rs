//! The snapshot operation: a paused sandbox's files kept as a snapshot; a running one paused
//! for it and resumed (same ID, token and deadlines), so the capture reuses the pause and
//! resume that keep a sandbox whole whatever fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ControlError, Controller, Op, OpGuard, Slot};
use crate::runtime::{GuestInit, PauseFailure, ResumeFailure, Runtime, SnapshotTaken};

/// A snapshot taken, and how long its running source was stopped for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// What it holds.
    pub snapshot: SnapshotTaken,
    /// Zero for a source that was paused.
    pub paused_for: Duration,
}

impl<R: Runtime> Controller<R> {
    /// Snapshot `snapshot_id` of sandbox `id`, running or paused; it ends as it was. A
    /// failure leaves no snapshot; a running source that cannot be resumed afterwards stays
    /// paused (with its state: nothing is lost) and the call fails.
    pub async fn snapshot(
        self: &Arc<Self>,
        id: &str,
        snapshot_id: &str,
    ) -> Result<Captured, ControlError> {
        let (meta, slot) = self.take(id, Op::Snapshot, |s| {
            matches!(s, Slot::Running(_) | Slot::Paused(_))
        })?;
        let guard = OpGuard::new(self, id, Op::Snapshot);
        let ctl = self.clone();
        let snap = snapshot_id.to_owned();
        self.detach(id, Op::Snapshot, async move {
            let step = |what: &'static str| {
                move |source| ControlError::Runtime { what, source }
            };
            let (paused, started) = match slot {
                Slot::Paused(p) => (p, None),
                Slot::Running(sb) => {
                    let started = Instant::now();
                    match ctl.runtime.pause(&meta, sb).await {
                        Ok(p) => (p, Some(started)),
                        Err(PauseFailure::Running(source, sb)) => {
                            guard.finish(Some(Slot::Running(sb)), &meta);
                            return Err(step("pause for the snapshot")(source));
                        }
                        Err(PauseFailure::Lost(source)) => {
                            guard.finish(None, &meta);
                            return Err(ControlError::Lost {
                                what: "pause for the snapshot",
                                source,
                            });
                        }
                    }
                }
                Slot::Busy(_) => unreachable!("take checked the state"),
            };
            let taken = ctl.runtime.snapshot(&meta, &paused, &snap).await;
            let Some(started) = started else {
                guard.finish(Some(Slot::Paused(paused)), &meta);
                return taken.map_err(step("snapshot")).map(|snapshot| Captured {
                    snapshot,
                    paused_for: Duration::ZERO,
                });
            };
            match ctl.runtime.resume(&meta, paused, GuestInit::default()).await {
                Ok(sb) => {
                    let paused_for = started.elapsed();
                    tracing::info!(snapshot_id = %snap, ?paused_for, "snapshotted");
                    guard.finish(Some(Slot::Running(sb)), &meta);
                    taken
                        .map_err(step("snapshot"))
                        .map(|snapshot| Captured {
                            snapshot,
                            paused_for,
                        })
                }
                Err(ResumeFailure::Paused(source, p)) => {
                    tracing::warn!(error = %crate::error_chain(&source), "resume after the snapshot failed; paused");
                    guard.finish(Some(Slot::Paused(p)), &meta);
                    Err(step("resume after the snapshot")(source))
                }
                Err(ResumeFailure::Lost(source)) => {
                    guard.finish(None, &meta);
                    Err(ControlError::Lost {
                        what: "resume after the snapshot",
                        source,
                    })
                }
            }
        })
        .await
    }
}
