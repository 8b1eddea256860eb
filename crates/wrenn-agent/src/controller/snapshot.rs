//! The snapshot operation: a paused sandbox's files kept as a snapshot; a running one
//! captured in place (its guest stopped for the capture, then continued in the same QEMU).

use std::sync::Arc;
use std::time::Duration;

use super::{ControlError, Controller, Op, OpGuard, Slot};
use crate::runtime::{Runtime, SnapshotTaken};

/// A snapshot taken, and how long its running source was stopped for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// What it holds.
    pub snapshot: SnapshotTaken,
    /// Zero for a source that was paused.
    pub paused_for: Duration,
}

impl<R: Runtime> Controller<R> {
    /// Snapshot `snapshot_id` of sandbox `id`, running or paused; it ends as it was (running
    /// or paused) whatever happens. A failure leaves no snapshot.
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
            let step = |what: &'static str| move |source| ControlError::Runtime { what, source };
            match slot {
                Slot::Paused(p) => {
                    let taken = ctl.runtime.snapshot(&meta, &p, &snap).await;
                    guard.finish(Some(Slot::Paused(p)), &meta);
                    taken.map_err(step("snapshot")).map(|snapshot| Captured {
                        snapshot,
                        paused_for: Duration::ZERO,
                    })
                }
                Slot::Running(sb) => {
                    // In place: the guest is stopped for the capture and runs on after it,
                    // in the same QEMU, whatever failed.
                    let taken = ctl.runtime.snapshot_running(&meta, &sb, &snap).await;
                    guard.finish(Some(Slot::Running(sb)), &meta);
                    let (snapshot, paused_for) = taken.map_err(step("snapshot"))?;
                    tracing::info!(snapshot_id = %snap, ?paused_for, "snapshotted");
                    Ok(Captured {
                        snapshot,
                        paused_for,
                    })
                }
                Slot::Busy(_) => unreachable!("take checked the state"),
            }
        })
        .await
    }
}
