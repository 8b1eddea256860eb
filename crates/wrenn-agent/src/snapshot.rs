//! Template snapshots and restores from them.
//!
//! A template VM boots with its RAM in `<template>/memory` (`share=on`). To snapshot it:
//! stop, migrate device state with `x-ignore-shared` to `<template>/state` (RAM is not copied:
//! the memory file already holds it), quit, and keep the VM's disk overlay as
//! `<template>/rootfs.qcow2`. A restore maps the memory file privately (`share=off`: lazy,
//! copy-on-write, shared page cache), gives the new VM an overlay on the template's disk,
//! loads the device state with `migrate-incoming` and continues.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wrenn_qmp::{MigrationCapability, QmpError};

use crate::vm::{Launch, Memory, NetAttach, Vm, VmError, VmSpec, create_overlay, qemu_version};

const MEMORY_FILE: &str = "memory";
const STATE_FILE: &str = "state";
const DISK_FILE: &str = "rootfs.qcow2";
const MANIFEST_FILE: &str = "snapshot.json";
/// How long saving or loading device state may take (it is ~100 KB; this is generous).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a snapshot or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM side failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the device state failed (a corrupt or truncated snapshot, or a mismatched
    /// machine). The VM was removed.
    #[error("restoring {dir} failed; QEMU said: {qemu_log}")]
    Load {
        /// The snapshot.
        dir: PathBuf,
        /// The end of QEMU's own log.
        qemu_log: String,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// The snapshot directory is unusable.
    #[error("snapshot {dir}: {reason}")]
    Invalid {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What a snapshot was taken from; a restore uses the same machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// The machine (kernel, initramfs, cmdline, RAM, vCPUs, accelerator).
    pub spec: VmSpec,
    /// The base image the disk overlay sits on.
    pub base_image: PathBuf,
    /// `qemu-system-x86_64 --version` of the saving QEMU.
    pub qemu_version: String,
    /// Size of the device state in bytes.
    pub state_bytes: u64,
    /// When it was taken (seconds since the epoch).
    pub created_unix: u64,
}

/// A template snapshot on disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SnapshotManifest,
}

/// Where a template VM's RAM must live so that [`snapshot_template`] can keep it.
pub fn template_memory_path(template_dir: &Path) -> PathBuf {
    template_dir.join(MEMORY_FILE)
}

/// Snapshots a template VM launched with `Memory::Shared(template_memory_path(dir))`. The
/// caller has already quiesced envd (`/snapshot/prepare`). Consumes the VM: QEMU exits.
pub async fn snapshot_template(
    mut vm: Vm,
    spec: &VmSpec,
    disk: &Path,
    base_image: &Path,
    template_dir: &Path,
) -> Result<Snapshot, SnapshotError> {
    let state = template_dir.join(STATE_FILE);
    let qmp = vm.qmp();
    qmp.stop().await.map_err(VmError::from)?;
    qmp.migrate_set_capabilities(&[(MigrationCapability::XIgnoreShared, true)])
        .await
        .map_err(VmError::from)?;
    qmp.migrate(&format!("file:{}", state.display()))
        .await
        .map_err(VmError::from)?;
    qmp.wait_migration(Duration::from_millis(2), MIGRATION_TIMEOUT)
        .await
        .map_err(VmError::from)?;
    qmp.quit().await.map_err(VmError::from)?;
    vm.wait_exit(Duration::from_secs(10)).await?;
    // QEMU has exited and flushed the overlay: it becomes the template's disk.
    let kept = template_dir.join(DISK_FILE);
    std::fs::rename(disk, &kept).map_err(VmError::io("keep disk", disk))?;
    vm.kill().await?;
    let state_bytes = std::fs::metadata(&state)
        .map_err(VmError::io("stat", &state))?
        .len();
    let manifest = SnapshotManifest {
        spec: spec.clone(),
        base_image: base_image.to_owned(),
        qemu_version: qemu_version().await,
        state_bytes,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let path = template_dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| SnapshotError::Invalid {
        dir: template_dir.to_owned(),
        reason: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(VmError::io("write", &path))?;
    Ok(Snapshot {
        dir: template_dir.to_owned(),
        manifest,
    })
}

impl Snapshot {
    /// Opens a snapshot directory.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let invalid = |reason: String| SnapshotError::Invalid {
            dir: dir.to_owned(),
            reason,
        };
        let text =
            std::fs::read_to_string(dir.join(MANIFEST_FILE)).map_err(|e| invalid(e.to_string()))?;
        let manifest: SnapshotManifest =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        for f in [MEMORY_FILE, STATE_FILE, DISK_FILE] {
            if !dir.join(f).is_file() {
                return Err(invalid(format!("{f} missing")));
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// Restores a new VM from this snapshot into `vm_dir`, attached to `net`, and lets it run.
    /// On failure nothing is left behind (the VM and its directory are removed).
    pub async fn restore(
        &self,
        vm_dir: &Path,
        net: Option<NetAttach>,
    ) -> Result<Vm, SnapshotError> {
        let start = std::time::Instant::now();
        std::fs::create_dir_all(vm_dir).map_err(VmError::io("create", vm_dir))?;
        let disk = vm_dir.join("rootfs.qcow2");
        if let Err(e) = create_overlay(&self.dir.join(DISK_FILE), "qcow2", &disk).await {
            let _ = std::fs::remove_dir_all(vm_dir);
            return Err(e.into());
        }
        tracing::debug!(overlay = ?start.elapsed(), "restore: overlay created");
        let vm = Vm::launch(Launch {
            spec: self.manifest.spec.clone(),
            dir: vm_dir.to_owned(),
            disk,
            memory: Memory::Private(self.dir.join(MEMORY_FILE)),
            net,
            incoming: true,
        })
        .await?;
        let launched = start.elapsed();
        if let Err(source) = self.load_into(&vm).await {
            // QEMU usually exits on a bad stream; its log says why.
            let mut vm = vm;
            let _ = vm.wait_exit(Duration::from_secs(1)).await;
            let qemu_log = vm.qemu_log();
            let _ = vm.kill().await;
            return Err(SnapshotError::Load {
                dir: self.dir.clone(),
                qemu_log,
                source,
            });
        }
        tracing::debug!(?launched, total = ?start.elapsed(), "restored");
        Ok(vm)
    }

    /// Loads the device state into a VM waiting in `-incoming defer`, then continues it.
    async fn load_into(&self, vm: &Vm) -> Result<(), QmpError> {
        let qmp = vm.qmp();
        let state = self.dir.join(STATE_FILE);
        qmp.migrate_set_capabilities(&[(MigrationCapability::XIgnoreShared, true)])
            .await?;
        qmp.migrate_incoming(&format!("file:{}", state.display()))
            .await?;
        qmp.wait_migration(Duration::from_millis(1), MIGRATION_TIMEOUT)
            .await?;
        qmp.cont().await
    }
}
