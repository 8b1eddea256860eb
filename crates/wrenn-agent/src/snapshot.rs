//! Template snapshots and restores from them.
//!
//! A template VM boots with its RAM in `<template>/memory` (`share=on`). To snapshot it:
//! stop, migrate device state with `x-ignore-shared` to `<template>/state` (RAM is not copied:
//! the memory file already holds it), quit, and keep the VM's disk overlay as
//! `<template>/rootfs.qcow2`. A restore maps the memory file privately (`share=off`: lazy,
//! copy-on-write, shared page cache), gives the new VM an overlay on the template's disk,
//! loads the device state with `migrate-incoming` and continues.
//!
//! `snapshot.json` carries a format version ([`SNAPSHOT_FORMAT`]) and the device state's size
//! and sha256, checked by [`Snapshot::open`] before QEMU sees the file; the memory file is only
//! size-checked (hashing 512 MiB would cost more than the restore). The lower half of a restore
//! (`restore_vm`) is shared with sandbox resume (`crate::sandbox`), which writes the
//! sandbox's changed pages into the new QEMU before its device state loads.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wrenn_qmp::{MigrationCapability, QmpError};

use crate::vm::{Launch, Memory, NetAttach, Vm, VmError, VmSpec, create_overlay, qemu_version};

const MEMORY_FILE: &str = "memory";
const STATE_FILE: &str = "state";
/// The template's disk in its directory.
pub const DISK_FILE: &str = "rootfs.qcow2";
const MANIFEST_FILE: &str = "snapshot.json";
/// How long saving or loading device state may take (it is ~100 KB; this is generous).
pub(crate) const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);
/// The on-disk format of snapshots this code writes and reads. 2: QEMU runs with
/// `migration.send-configuration=off` (device-state-only files, see `crate::sandbox`), and the
/// manifest records the device state's hash.
pub const SNAPSHOT_FORMAT: u32 = 2;

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
    /// The memory diff could not be applied.
    #[error(transparent)]
    Memory(#[from] crate::memdiff::MemDiffError),
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
    /// [`SNAPSHOT_FORMAT`] when written; missing in older snapshots (refused).
    #[serde(default)]
    pub version: u32,
    /// The machine (kernel, initramfs, cmdline, RAM, vCPUs, accelerator).
    pub spec: VmSpec,
    /// The base image the disk overlay sits on.
    pub base_image: PathBuf,
    /// `qemu-system-x86_64 --version` of the saving QEMU.
    pub qemu_version: String,
    /// Size of the device state in bytes.
    pub state_bytes: u64,
    /// sha256 of the device state, hex.
    #[serde(default)]
    pub state_sha256: String,
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
    // QEMU (jailed) writes into its runtime directory; the file is root's again once written.
    let out = vm.output_file(STATE_FILE, 0o644)?;
    let qmp = vm.qmp();
    qmp.stop().await.map_err(VmError::from)?;
    qmp.migrate_set_capabilities(&[(MigrationCapability::XIgnoreShared, true)])
        .await
        .map_err(VmError::from)?;
    qmp.migrate(&format!("file:{}", out.path().display()))
        .await
        .map_err(VmError::from)?;
    qmp.wait_migration(Duration::from_millis(2), MIGRATION_TIMEOUT)
        .await
        .map_err(VmError::from)?;
    qmp.quit().await.map_err(VmError::from)?;
    vm.wait_exit(Duration::from_secs(10)).await?;
    move_file(out.path(), &state)?;
    drop(out);
    // QEMU has exited and flushed the overlay: it becomes the template's disk, readable (not
    // writable) by every VM that restores from it.
    let kept = template_dir.join(DISK_FILE);
    std::fs::rename(disk, &kept).map_err(VmError::io("keep disk", disk))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o644))
            .map_err(VmError::io("chmod", &kept))?;
    }
    vm.kill().await?;
    let state_bytes = std::fs::metadata(&state)
        .map_err(VmError::io("stat", &state))?
        .len();
    let state_sha256 = sha256_file(&state).map_err(VmError::io("hash", &state))?;
    let manifest = SnapshotManifest {
        version: SNAPSHOT_FORMAT,
        state_sha256,
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
    /// Opens a snapshot directory and checks what can be checked cheaply: the manifest's
    /// format, the files' presence and sizes, and the device state's hash. (The memory file is
    /// only size-checked: hashing it would cost more than the restore.)
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let invalid = |reason: String| SnapshotError::Invalid {
            dir: dir.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE))
            .map_err(|e| invalid(format!("{MANIFEST_FILE}: {e}")))?;
        let manifest: SnapshotManifest =
            serde_json::from_str(&text).map_err(|e| invalid(format!("{MANIFEST_FILE}: {e}")))?;
        if manifest.version != SNAPSHOT_FORMAT {
            return Err(invalid(format!(
                "format version {} (this agent reads {SNAPSHOT_FORMAT}); rebuild the template",
                manifest.version
            )));
        }
        for f in [MEMORY_FILE, STATE_FILE, DISK_FILE] {
            if !dir.join(f).is_file() {
                return Err(invalid(format!("{f} missing")));
            }
        }
        check_memory_file(&dir.join(MEMORY_FILE), &manifest.spec).map_err(invalid)?;
        check_file(
            &dir.join(STATE_FILE),
            manifest.state_bytes,
            &manifest.state_sha256,
        )
        .map_err(invalid)?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// The template's memory file (mapped privately by every restore).
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// The template's device state (a migration stream saved with `x-ignore-shared`).
    pub(crate) fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The template's disk, which sandbox overlays sit on.
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }

    /// Restores a new VM from this snapshot into `vm_dir`, attached to `net`, and lets it run.
    /// Its disk overlay is created inside `vm_dir`. On failure nothing is left behind (the VM
    /// and its directory are removed).
    pub async fn restore(
        &self,
        vm_dir: &Path,
        net: Option<NetAttach>,
    ) -> Result<Vm, SnapshotError> {
        std::fs::create_dir_all(vm_dir).map_err(VmError::io("create", vm_dir))?;
        let disk = vm_dir.join("rootfs.qcow2");
        if let Err(e) = create_overlay(&self.disk_path(), "qcow2", &disk).await {
            let _ = std::fs::remove_dir_all(vm_dir);
            return Err(e.into());
        }
        self.restore_with_disk(vm_dir, &disk, net).await
    }

    /// Like [`Snapshot::restore`], with a disk overlay the caller made (on
    /// [`Snapshot::disk_path`]) and keeps: it is not removed with `vm_dir`.
    pub async fn restore_with_disk(
        &self,
        vm_dir: &Path,
        disk: &Path,
        net: Option<NetAttach>,
    ) -> Result<Vm, SnapshotError> {
        restore_vm(RestoreFrom {
            snapshot_dir: &self.dir,
            spec: &self.manifest.spec,
            memory: &self.memory_path(),
            state: &self.state_path(),
            ignore_shared: true,
            before_load: None,
            vm_dir,
            disk,
            net,
        })
        .await
    }
}

/// A hook run on the launched QEMU (pid) before its device state loads.
pub(crate) type BeforeLoad =
    Box<dyn FnOnce(u32) -> Result<(), crate::memdiff::MemDiffError> + Send + 'static>;

/// Where a restore comes from.
pub(crate) struct RestoreFrom<'a> {
    /// For error messages.
    pub snapshot_dir: &'a Path,
    pub spec: &'a VmSpec,
    /// The memory file, mapped privately.
    pub memory: &'a Path,
    /// The device state (a QEMU migration stream).
    pub state: &'a Path,
    /// The stream was saved with `x-ignore-shared`.
    pub ignore_shared: bool,
    /// Run (on a blocking thread) after QEMU started and before the state loads.
    pub before_load: Option<BeforeLoad>,
    pub vm_dir: &'a Path,
    pub disk: &'a Path,
    pub net: Option<NetAttach>,
}

/// Starts QEMU in `-incoming defer` on a private mapping of the memory file, runs the hook,
/// loads the device state and continues. On failure QEMU is killed and `vm_dir` removed.
pub(crate) async fn restore_vm(from: RestoreFrom<'_>) -> Result<Vm, SnapshotError> {
    let start = std::time::Instant::now();
    let vm = Vm::launch(Launch {
        spec: from.spec.clone(),
        dir: from.vm_dir.to_owned(),
        disk: from.disk.to_owned(),
        memory: Memory::Private(from.memory.to_owned()),
        net: from.net,
        incoming: Some(from.state.to_owned()),
        extra_disks: vec![],
    })
    .await?;
    let launched = start.elapsed();
    if let Some(hook) = from.before_load {
        let pid = vm.pid();
        let done = tokio::task::spawn_blocking(move || hook(pid))
            .await
            .unwrap_or_else(|e| {
                Err(crate::memdiff::MemDiffError::Io {
                    what: "join the memory writer",
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        if let Err(e) = done {
            let _ = vm.kill().await;
            return Err(SnapshotError::Memory(e));
        }
    }
    let hooked = start.elapsed();
    if let Err(source) = load_into(&vm, from.ignore_shared).await {
        // QEMU usually exits on a bad stream; its log says why.
        let mut vm = vm;
        let _ = vm.wait_exit(Duration::from_secs(1)).await;
        let qemu_log = vm.qemu_log();
        let _ = vm.kill().await;
        return Err(SnapshotError::Load {
            dir: from.snapshot_dir.to_owned(),
            qemu_log,
            source,
        });
    }
    tracing::debug!(?launched, ?hooked, total = ?start.elapsed(), "restored");
    Ok(vm)
}

/// Loads the device state a VM was launched with (`Launch::incoming`, passed as a
/// descriptor) into it while it waits in `-incoming defer`, then continues it. The one place
/// that does so: cold restores, resumes and warm-pool restores (`crate::pool`) all use it.
pub(crate) async fn load_into(vm: &Vm, ignore_shared: bool) -> Result<(), QmpError> {
    let qmp = vm.qmp();
    let uri = vm
        .incoming_uri()
        .ok_or_else(|| QmpError::Protocol("the VM was not started to load a state".into()))?;
    if ignore_shared {
        qmp.migrate_set_capabilities(&[(MigrationCapability::XIgnoreShared, true)])
            .await?;
    }
    qmp.migrate_incoming(&uri).await?;
    qmp.wait_migration(Duration::from_millis(1), MIGRATION_TIMEOUT)
        .await?;
    qmp.cont().await
}

/// The memory file must be exactly the machine's RAM size: QEMU would otherwise grow it or
/// fail late.
pub(crate) fn check_memory_file(path: &Path, spec: &VmSpec) -> Result<(), String> {
    let want = u64::from(spec.memory_mib) << 20;
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len != want {
        return Err(format!(
            "{} is {len} bytes, the machine has {want} bytes of RAM (truncated?)",
            path.display()
        ));
    }
    Ok(())
}

/// Checks a file's size and sha256 against a manifest.
pub(crate) fn check_file(path: &Path, bytes: u64, sha256: &str) -> Result<(), String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len != bytes {
        return Err(format!(
            "{} is {len} bytes, the manifest says {bytes} (truncated?)",
            path.display()
        ));
    }
    let got = sha256_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if got != sha256 {
        return Err(format!(
            "{} does not match its sha256 in the manifest (corrupt)",
            path.display()
        ));
    }
    Ok(())
}

/// Moves a file, copying when `to` is on another file system.
pub(crate) fn move_file(from: &Path, to: &Path) -> Result<(), VmError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(VmError::io("copy", from))?;
            std::fs::remove_file(from).map_err(VmError::io("remove", from))
        }
        Err(e) => Err(VmError::io("rename", from)(e)),
    }
}

/// The sha256 of a file, hex.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
