//! Pausing a running sandbox: with its memory (device state and the pages it changed, resumed
//! as it was) or filesystem-only (its disk, synced; the resume boots it cold).

use std::path::Path;
use std::time::{Duration, Instant};

use super::paused::commit_paused;
use super::{
    DIFF_FILE, Deadlines, FileRecord, MemoryLayer, PauseError, PausedManifest, PausedSandbox,
    QUIT_TIMEOUT, STATE_FILE, Sandbox, SandboxError, SandboxNet, VM_DIR, blocking, sync_file,
    unix_now,
};
use crate::memdiff::DiffInfo;
use crate::record::{Phase, VmProcess};
use crate::snapshot::sha256_file;
use crate::vm::{VmError, qemu_version};

/// How long the steps of a pause took.
#[derive(Debug, Clone, Copy, Default)]
pub struct PauseTimings {
    /// `/snapshot/prepare` returned.
    pub prepared: Duration,
    /// Device state and memory diff written and synced.
    pub saved: Duration,
    /// QEMU gone, manifest written.
    pub total: Duration,
    /// The changed guest memory written.
    pub dirty_bytes: u64,
}

impl<N: SandboxNet> Sandbox<N> {
    /// Pauses: envd quiesces, the vCPUs stop (QEMU flushes the disk), the device state and
    /// the changed pages are written and synced, the record says `pausing` (the snapshot is
    /// complete), QEMU exits and the slot is returned; the record then says `paused`, and a
    /// resumed sandbox's run overlay is committed into its paused disk. A failure before the
    /// `pausing` record leaves the sandbox running; from there on the snapshot is complete and
    /// the pause is finished whatever fails.
    pub async fn pause(
        self,
        deadlines: &Deadlines,
    ) -> Result<(PausedSandbox, N, PauseTimings), PauseError<N>> {
        self.pause_as(deadlines, true).await
    }

    /// Pauses keeping only the disk: as [`Sandbox::pause`], but with no device state or memory
    /// written (the guest's filesystems synced by envd, its disk drained by `stop`), so the
    /// resume boots the disk cold. Running processes and unsynced writes are not kept.
    pub async fn pause_filesystem(
        self,
        deadlines: &Deadlines,
    ) -> Result<(PausedSandbox, N, PauseTimings), PauseError<N>> {
        self.pause_as(deadlines, false).await
    }

    async fn pause_as(
        self,
        deadlines: &Deadlines,
        keep_memory: bool,
    ) -> Result<(PausedSandbox, N, PauseTimings), PauseError<N>> {
        let start = Instant::now();
        // envd requires the sandbox's access token once `/init` has set one.
        let envd = (self.envd.clone()).with_access_token(self.init.access_token.clone());
        if let Err(e) = envd.snapshot_prepare(deadlines.prepare).await {
            // envd may have stopped some of its work: /init restarts it.
            let _ = self.reinit(deadlines).await;
            return Err(PauseError::StillRunning {
                error: SandboxError::envd("prepare")(e),
                sandbox: Box::new(self),
            });
        }
        let prepared = start.elapsed();
        let saved = async {
            let (diff, manifest) = if keep_memory {
                let diff = self.save_into(&self.root).await?;
                let m = (self.manifest_in(&self.root, self.disk.clone(), &diff)).await?;
                (diff, m)
            } else {
                // QEMU drains and flushes the disk when the vCPUs stop.
                let qmp = self.vm.qmp();
                qmp.stop().await.map_err(SandboxError::qmp("stop"))?;
                let none = DiffInfo {
                    pages: 0,
                    bytes: 0,
                    sha256: String::new(),
                };
                (none, self.filesystem_manifest().await)
            };
            let pausing = Phase::Pausing {
                paused: manifest.clone(),
                vm: VmProcess::of(&self.vm, self.net.slot_index()).ok(),
                commit_into: self.commit_into.clone(),
            };
            let rec = self.rec.clone();
            blocking(move || rec.write(pausing)).await?;
            crate::fault::point("pause:saved");
            Ok::<_, SandboxError>((diff, manifest))
        }
        .await;
        let (diff, manifest) = match saved {
            Ok(x) => x,
            Err(error) => {
                let root = self.root.clone();
                blocking(move || {
                    for f in ["memory.diff.tmp", STATE_FILE, DIFF_FILE] {
                        let _ = std::fs::remove_file(root.join(f));
                    }
                    let _ = std::fs::remove_file(root.join(VM_DIR).join("state.tmp"));
                })
                .await;
                if let Err(e) = self.vm.qmp().cont().await {
                    tracing::warn!(error = %crate::error_chain(&e), "cont after a failed pause");
                }
                let _ = self.reinit(deadlines).await;
                return Err(PauseError::StillRunning {
                    error,
                    sandbox: Box::new(self),
                });
            }
        };
        let saved_at = start.elapsed();
        let Sandbox {
            root,
            mut vm,
            net,
            disk,
            commit_into,
            rec,
            ..
        } = self;
        // The snapshot is complete: from here the pause is finished whatever QEMU does.
        let quit = async {
            vm.qmp().quit().await.map_err(SandboxError::qmp("quit"))?;
            vm.wait_exit(QUIT_TIMEOUT).await?;
            Ok::<_, SandboxError>(())
        }
        .await;
        if let Err(e) = quit {
            tracing::warn!(error = %e, "QEMU did not quit after the snapshot; killed");
        }
        let _ = vm.kill().await;
        net.publish(None);
        crate::fault::point("pause:quit");
        let rec2 = rec.clone();
        let committed =
            blocking(move || commit_paused(&rec2, manifest, &disk, commit_into.as_deref())).await;
        match committed {
            Ok(manifest) => {
                let timings = PauseTimings {
                    prepared,
                    saved: saved_at,
                    total: start.elapsed(),
                    dirty_bytes: diff.pages * crate::memdiff::PAGE,
                };
                tracing::debug!(?timings, "paused");
                Ok((PausedSandbox::new(rec, manifest), net, timings))
            }
            Err(error) => {
                rec.retire();
                let _ = std::fs::remove_dir_all(&root);
                Err(PauseError::Lost { error, net })
            }
        }
    }

    /// The paused manifest of a filesystem-only pause: the disk and what a cold boot needs.
    async fn filesystem_manifest(&self) -> PausedManifest {
        PausedManifest {
            spec: self.spec.clone(),
            template: self.template.clone(),
            disk: self.disk.clone(),
            state: None,
            memory_diff: None,
            dirty_pages: 0,
            memory_base: Vec::new(),
            init: self.init.clone(),
            paused_unix: unix_now(),
            qemu_version: qemu_version().await,
        }
    }

    /// The paused manifest for the files [`Sandbox::save_into`] wrote into `dir`, with
    /// `disk` (a file name in `dir`) as its disk.
    pub(super) async fn manifest_in(
        &self,
        dir: &Path,
        disk: String,
        diff: &DiffInfo,
    ) -> Result<PausedManifest, SandboxError> {
        let state = dir.join(STATE_FILE);
        let state2 = state.clone();
        let (state_bytes, state_sha) = blocking(move || {
            let bytes = std::fs::metadata(&state2)
                .map_err(VmError::io("stat", &state2))?
                .len();
            let sha = sha256_file(&state2).map_err(VmError::io("hash", &state2))?;
            Ok::<_, VmError>((bytes, sha))
        })
        .await?;
        Ok(PausedManifest {
            spec: self.spec.clone(),
            template: self.template.clone(),
            disk,
            state: Some(FileRecord {
                file: STATE_FILE.into(),
                bytes: state_bytes,
                sha256: state_sha,
            }),
            memory_diff: Some(FileRecord {
                file: DIFF_FILE.into(),
                bytes: diff.bytes,
                sha256: diff.sha256.clone(),
            }),
            dirty_pages: diff.pages,
            memory_base: self.memory_base.clone(),
            init: self.init.clone(),
            paused_unix: unix_now(),
            qemu_version: qemu_version().await,
        })
    }

    /// Stops the vCPUs (QEMU drains and flushes the disk) and writes the device state and
    /// the memory diff into `dir` (the sandbox's own, or a snapshot's), synced, under their
    /// final names.
    pub(super) async fn save_into(&self, dir: &Path) -> Result<DiffInfo, SandboxError> {
        let diff_tmp = dir.join("memory.diff.tmp");
        // QEMU (jailed) writes the device state into its runtime directory, in a file lent to
        // its uid until the save returned.
        let out = self.vm.output_file("state.tmp", 0o600)?;
        let state_tmp = out.path().to_owned();
        let qmp = self.vm.qmp();
        qmp.stop().await.map_err(SandboxError::qmp("stop"))?;
        // Devices only: RAM is the template's file plus the diff written below.
        qmp.execute_raw(
            "xen-save-devices-state",
            Some(serde_json::json!({ "filename": &state_tmp, "live": false })),
        )
        .await
        .map_err(SandboxError::qmp("xen-save-devices-state"))?;
        drop(out);
        let pid = self.vm.pid();
        let memory = self.memory.clone();
        let ram = u64::from(self.spec.memory_mib) << 20;
        let root = dir.to_owned();
        let base: Vec<_> = self.memory_base.iter().map(MemoryLayer::diff).collect();
        blocking(move || {
            let diff = crate::memdiff::save(pid, &memory, ram, &base, &diff_tmp)?;
            sync_file(&state_tmp)?;
            crate::snapshot::move_file(&state_tmp, &root.join(STATE_FILE))?;
            std::fs::rename(&diff_tmp, root.join(DIFF_FILE))
                .map_err(VmError::io("rename", &diff_tmp))?;
            Ok::<_, SandboxError>(diff)
        })
        .await
    }
}
