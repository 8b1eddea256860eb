//! Template snapshots made from a root filesystem image: boot the image cold in a slot, wait
//! for envd, quiesce it (`/snapshot/prepare`) and snapshot the VM. Sandboxes are restores of
//! the result.
//!
//! A template is cached in a directory named after the hash of everything that shapes the
//! snapshot (the machine spec, the image's content key and the QEMU version), so a second
//! start finds it at once and any change of inputs builds a new one next to the old. Builds
//! happen in a temporary directory that is renamed into place only when complete, so a crash
//! mid-build never leaves a directory that looks like a template.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wrenn_hostnet::{Slot, TAP_NAME};
use wrenn_image::ENVD_PORT;

use crate::envd::EnvdClient;
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::vm::{Launch, Memory, NetAttach, Vm, VmError, VmSpec, create_overlay};

/// Why a template could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Starting or stopping the build VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// envd in the build VM did not come up; the console's end says why.
    #[error(
        "envd in the template VM did not answer within {timeout:?}: {error}\nconsole:\n{console}"
    )]
    Boot {
        /// How long we waited.
        timeout: Duration,
        /// The last error.
        error: String,
        /// The end of the guest console.
        console: String,
    },
    /// Snapshotting failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a template is made of.
#[derive(Debug, Clone)]
pub struct TemplateInputs {
    /// The machine (kernel, initramfs, command line, RAM, vCPUs, accelerator).
    pub spec: VmSpec,
    /// The raw root filesystem image (the template disk is an overlay on it).
    pub rootfs: PathBuf,
    /// The image's content key (from its manifest): part of the cache key.
    pub rootfs_key: String,
    /// envd's default user and working directory, baked into the snapshot (sandboxes are
    /// restores of it, so they inherit both, as E2B templates do).
    pub default_user: Option<String>,
    /// See `default_user`.
    pub default_workdir: Option<String>,
}

impl TemplateInputs {
    /// The cache key: sha256 over the spec, the image key and the QEMU version, hex.
    pub fn key(&self, qemu_version: &str) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.spec).unwrap_or_default());
        h.update([0]);
        h.update(self.rootfs.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(self.rootfs_key.as_bytes());
        h.update([0]);
        h.update(qemu_version.as_bytes());
        for v in [&self.default_user, &self.default_workdir] {
            h.update([0]);
            h.update(v.as_deref().unwrap_or("").as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// Opens the template `name` for `inputs` under `dir` if it was built before, else builds it
/// by booting the image in `slot`. Returns the snapshot and whether it was built now.
pub async fn build_or_open(
    dir: &Path,
    name: &str,
    inputs: &TemplateInputs,
    slot: &Slot,
    boot_timeout: Duration,
) -> Result<(Snapshot, bool), TemplateError> {
    let qemu = crate::vm::qemu_version().await;
    let key = inputs.key(&qemu);
    let final_dir = dir.join(format!("{name}-{}", &key[..16]));
    if let Ok(s) = Snapshot::open(&final_dir) {
        return Ok((s, false));
    }
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| TemplateError::Io { what, path, source }
    };
    if final_dir.exists() {
        // Left by an older format or a damaged disk: rebuild.
        tracing::warn!(dir = %final_dir.display(), "template does not open; rebuilding it");
        std::fs::remove_dir_all(&final_dir).map_err(io("remove", &final_dir))?;
    }
    let work = dir.join(format!(".build-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io("create", &work))?;
    let built = build(&work, &final_dir, inputs, slot, boot_timeout).await;
    let _ = std::fs::remove_dir_all(&work);
    built.map(|s| (s, true))
}

async fn build(
    work: &Path,
    final_dir: &Path,
    inputs: &TemplateInputs,
    slot: &Slot,
    boot_timeout: Duration,
) -> Result<Snapshot, TemplateError> {
    let start = Instant::now();
    // The snapshot is written straight into a staging directory next to its final place,
    // then renamed: the template's disk is referenced by path from sandbox overlays, so it
    // must be complete before the directory appears.
    let staging = final_dir.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|source| TemplateError::Io {
        what: "create",
        path: staging.clone(),
        source,
    })?;
    let boot_dir = work.join("boot");
    let disk = work.join("rootfs.qcow2");
    create_overlay(&inputs.rootfs, "raw", &disk).await?;
    let vm = Vm::launch(Launch {
        spec: inputs.spec.clone(),
        dir: boot_dir,
        disk: disk.clone(),
        memory: Memory::Shared(snapshot::template_memory_path(&staging)),
        net: Some(NetAttach {
            netns: slot.netns_path(),
            tap: TAP_NAME.into(),
            slot: slot.index(),
        }),
        incoming: None,
        extra_disks: vec![],
    })
    .await?;
    let envd = EnvdClient::new(slot.guest_endpoint(ENVD_PORT));
    if let Err(e) = envd.wait_healthy(boot_timeout).await {
        let console = vm.console_text().await;
        let _ = vm.kill().await;
        let _ = std::fs::remove_dir_all(&staging);
        return Err(TemplateError::Boot {
            timeout: boot_timeout,
            error: e.to_string(),
            console,
        });
    }
    let booted = start.elapsed();
    let mut defaults = serde_json::Map::new();
    if let Some(u) = &inputs.default_user {
        defaults.insert("defaultUser".into(), u.clone().into());
    }
    if let Some(w) = &inputs.default_workdir {
        defaults.insert("defaultWorkdir".into(), w.clone().into());
    }
    if !defaults.is_empty()
        && let Err(e) = envd.init(&defaults.into(), Duration::from_secs(30)).await
    {
        let _ = vm.kill().await;
        let _ = std::fs::remove_dir_all(&staging);
        return Err(TemplateError::Boot {
            timeout: Duration::from_secs(30),
            error: format!("/init with the template defaults: {e}"),
            console: String::new(),
        });
    }
    if let Err(e) = envd.snapshot_prepare(Duration::from_secs(30)).await {
        let _ = vm.kill().await;
        let _ = std::fs::remove_dir_all(&staging);
        return Err(TemplateError::Boot {
            timeout: Duration::from_secs(30),
            error: format!("/snapshot/prepare: {e}"),
            console: String::new(),
        });
    }
    let snap = snapshot::snapshot_template(vm, &inputs.spec, &disk, &inputs.rootfs, &staging).await;
    if let Err(e) = snap {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.into());
    }
    std::fs::rename(&staging, final_dir).map_err(|source| TemplateError::Io {
        what: "rename",
        path: staging.clone(),
        source,
    })?;
    let snap = Snapshot::open(final_dir)?;
    tracing::info!(
        dir = %final_dir.display(),
        booted = ?booted,
        total = ?start.elapsed(),
        "template built"
    );
    Ok(snap)
}
