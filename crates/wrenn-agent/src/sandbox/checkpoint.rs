//! A running sandbox captured in place, for a snapshot: its vCPUs stopped for the capture and
//! continued after, in the same QEMU (its connections through the proxy stay open).
//!
//! While the guest is stopped QEMU has drained and flushed its disk, so the disk files read
//! the same as the guest's view. The capture is the pause's files (device state, the pages
//! that differ from the template), written into the snapshot's directory, and the sandbox's
//! disk as one layer on the first layer outside its directory (the template's disk, or the
//! disk of the snapshot it started from): a copy of its overlay, or, after a resume (a run
//! overlay on its paused disk), both flattened with the safe rebase templates use.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    DIFF_FILE, Deadlines, PausedManifest, STATE_FILE, Sandbox, SandboxError, SandboxNet, blocking,
    sync_file,
};
use crate::vm::VmError;

/// The snapshot's disk layer.
pub const CHECKPOINT_DISK: &str = "rootfs.qcow2";

/// A capture: its manifest (files in the snapshot's directory) and how long the guest was
/// stopped.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// As a paused sandbox's, naming the files in the directory it was written to.
    pub manifest: PausedManifest,
    /// From `stop` to `cont`.
    pub stopped: Duration,
}

impl<N: SandboxNet> Sandbox<N> {
    /// Captures the sandbox into `dest` (an empty directory); it runs on afterwards whatever
    /// happened (`cont`, then `/init` with fresh entropy). On failure `dest` holds nothing of
    /// it.
    pub async fn checkpoint(
        &self,
        dest: &Path,
        deadlines: &Deadlines,
    ) -> Result<Checkpoint, SandboxError> {
        let envd = (self.envd.clone()).with_access_token(self.init.access_token.clone());
        if let Err(e) = envd.snapshot_prepare(deadlines.prepare).await {
            let _ = self.reinit(deadlines).await;
            return Err(SandboxError::envd("prepare")(e));
        }
        let stopped_at = Instant::now();
        let captured = self.capture(dest).await;
        let resumed = self.vm.qmp().cont().await;
        let stopped = stopped_at.elapsed();
        let reinit = self.reinit(deadlines).await;
        let fail = |e: SandboxError| {
            let d = dest.to_owned();
            async move {
                blocking(move || {
                    for f in [STATE_FILE, DIFF_FILE, CHECKPOINT_DISK, "memory.diff.tmp"] {
                        let _ = std::fs::remove_file(d.join(f));
                    }
                })
                .await;
                Err(e)
            }
        };
        let manifest = match captured {
            Ok(m) => m,
            Err(e) => return fail(e).await,
        };
        if let Err(e) = resumed {
            return fail(SandboxError::qmp("cont")(e)).await;
        }
        if let Err(e) = reinit {
            return fail(e).await;
        }
        Ok(Checkpoint { manifest, stopped })
    }

    /// Stops the vCPUs and writes the device state, the memory diff (as a pause does) and the
    /// disk layer into `dest`, synced.
    async fn capture(&self, dest: &Path) -> Result<PausedManifest, SandboxError> {
        let diff = self.save_into(dest).await?;
        self.copy_disk(dest).await?;
        self.manifest_in(dest, CHECKPOINT_DISK.into(), &diff).await
    }

    /// The disk as one layer in `dest` on the first layer outside the sandbox's directory.
    async fn copy_disk(&self, dest: &Path) -> Result<(), SandboxError> {
        let top = self.root.join(&self.disk);
        let chain = crate::jail::disk::chain(&top).map_err(|e| SandboxError::Invalid {
            dir: self.root.clone(),
            reason: e.to_string(),
        })?;
        let own: Vec<PathBuf> = chain
            .iter()
            .take_while(|l| l.path.starts_with(&self.root))
            .map(|l| l.path.clone())
            .collect();
        let base = chain
            .get(own.len())
            .map(|l| l.path.clone())
            .ok_or_else(|| SandboxError::Invalid {
                dir: self.root.clone(),
                reason: "its disk has no layer outside its directory".into(),
            })?;
        let out = dest.join(CHECKPOINT_DISK);
        if own.len() == 1 {
            let (t, o) = (top.clone(), out.clone());
            blocking(move || std::fs::copy(&t, &o).map_err(VmError::io("copy", &t)))
                .await
                .map(|_| ())?;
        } else {
            crate::build::layers::flatten(&top, &base, &out).await?;
        }
        let o = out.clone();
        blocking(move || sync_file(&o)).await?;
        Ok(())
    }
}
