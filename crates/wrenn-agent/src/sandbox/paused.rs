//! Paused sandboxes: the directory of a sandbox whose record says `paused`, resumed into any
//! free slot; and the steps that finish a pause or undo a resume, also after a crash
//! ([`settle_interrupted`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{
    DIFF_FILE, Deadlines, Failed, FileRecord, InitConfig, MemoryLayer, OnFail, PausedManifest,
    RUN_DISK_PREFIX, STATE_FILE, Sandbox, SandboxError, SandboxNet, Timings, VM_DIR, blocking,
    identity, sync_file, unix_now_ms, warm_in_background,
};
use crate::envd::EnvdClient;
use crate::memdiff::DiffInfo;
use crate::record::{Phase, Recorder, VmProcess};
use crate::runtime::SandboxMeta;
use crate::snapshot::{RestoreFrom, Snapshot, check_file, check_memory_file, restore_vm};
use crate::vm::{Vm, VmError, create_overlay};

/// A paused sandbox on disk.
#[derive(Debug, Clone)]
pub struct PausedSandbox {
    root: PathBuf,
    /// As recorded.
    manifest: PausedManifest,
    /// What the next resume's `/init` gives the guest instead of the recorded one.
    init: Option<InitConfig>,
    /// The next resume boots the disk cold even though the memory was kept.
    reboot: bool,
    rec: Recorder,
}

impl PausedSandbox {
    pub(super) fn new(rec: Recorder, manifest: PausedManifest) -> Self {
        Self {
            root: rec.dir().to_owned(),
            manifest,
            init: None,
            reboot: false,
            rec,
        }
    }

    /// Opens a paused sandbox directory (for example after an agent restart): its record must
    /// say `paused`.
    pub fn open(root: &Path) -> Result<Self, SandboxError> {
        let invalid = |reason: String| SandboxError::Invalid {
            dir: root.to_owned(),
            reason,
        };
        let record = crate::record::read(root)?.ok_or_else(|| invalid("no record".into()))?;
        match &record.phase {
            Phase::Paused { paused } => Ok(Self::new(
                Recorder::from_record(root, &record),
                paused.clone(),
            )),
            other => Err(invalid(format!(
                "not paused: its record says {}",
                other.name()
            ))),
        }
    }

    /// The sandbox directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The manifest, as recorded.
    pub fn manifest(&self) -> &PausedManifest {
        &self.manifest
    }

    /// The agent's meta in the record.
    pub fn meta(&self) -> Option<SandboxMeta> {
        self.rec.meta()
    }

    /// The writer of its record (the runtime saves changed timers through it).
    pub fn recorder(&self) -> &Recorder {
        &self.rec
    }

    /// What the next resume's `/init` gives the guest.
    pub fn init(&self) -> &InitConfig {
        self.init.as_ref().unwrap_or(&self.manifest.init)
    }

    /// Replaces what the resume's `/init` gives the guest (a new access token or env vars from
    /// the resume request). In memory only: the record keeps the pause-time values until the
    /// resume succeeded.
    pub fn set_init(&mut self, init: InitConfig) {
        self.init = Some(init);
    }

    /// Makes the next resume boot the disk cold, discarding the kept memory (E2B's
    /// `on_resume: reboot`). In memory only, like [`PausedSandbox::set_init`].
    pub fn set_reboot(&mut self) {
        self.reboot = true;
    }

    /// Whether the next resume boots the disk cold: the pause kept no memory, or a reboot was
    /// asked for.
    pub fn boots_cold(&self) -> bool {
        self.reboot || self.manifest.memory().is_none()
    }

    /// Deletes the paused sandbox.
    pub fn remove(self) -> Result<(), SandboxError> {
        self.rec.retire();
        std::fs::remove_dir_all(&self.root).map_err(|e| VmError::io("remove", &self.root)(e).into())
    }

    /// Checks everything that can be checked before starting QEMU.
    fn verify(&self) -> Result<Snapshot, SandboxError> {
        let m = &self.manifest;
        let invalid = |reason: String| SandboxError::Invalid {
            dir: self.root.clone(),
            reason,
        };
        let template = Snapshot::open(&m.template.dir)?;
        if template.manifest.state_sha256 != m.template.state_sha256
            || template.manifest.created_unix != m.template.created_unix
        {
            return Err(invalid(format!(
                "template {} changed since the pause",
                m.template.dir.display()
            )));
        }
        if template.manifest.spec != m.spec {
            return Err(invalid("machine differs from the template's".into()));
        }
        check_memory_file(&template.memory_path(), &m.spec).map_err(invalid)?;
        if m.state.is_some() != m.memory_diff.is_some() {
            return Err(invalid(
                "a device state without memory, or memory without one".into(),
            ));
        }
        // A cold boot reads only the disk.
        let kept = m.memory().filter(|_| !self.boots_cold());
        if let Some((state, diff)) = kept {
            for rec in [state, diff] {
                if rec.file.contains('/') {
                    return Err(invalid(format!("bad file name {}", rec.file)));
                }
            }
            check_file(&self.root.join(&state.file), state.bytes, &state.sha256)
                .map_err(invalid)?;
        }
        for layer in m.memory_base.iter().filter(|_| kept.is_some()) {
            let len = std::fs::metadata(&layer.path).map(|md| md.len());
            if len.ok() != Some(layer.bytes) {
                return Err(invalid(format!(
                    "the snapshot memory {} it starts from is missing or changed",
                    layer.path.display()
                )));
            }
        }
        // The diffs' hashes are checked while they are applied (one read instead of two).
        if m.disk.contains('/') {
            return Err(invalid(format!("bad disk name {}", m.disk)));
        }
        let disk = self.root.join(&m.disk);
        let mut magic = [0u8; 4];
        let ok = std::fs::File::open(&disk)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0));
        if ok.is_err() || &magic != b"QFI\xfb" {
            return Err(invalid(format!("{} is missing or not qcow2", m.disk)));
        }
        Ok(template)
    }

    /// Resumes into `net` (any free slot): restores the device state and the changed pages
    /// over a private mapping of the template's memory, with the guest writing to a new
    /// overlay on the paused disk, then runs `/init` (clock, fresh entropy). On failure QEMU,
    /// the overlay and the runtime directory are gone, `net` is returned, and the paused state
    /// is exactly as it was: resumable again.
    pub async fn resume<N: SandboxNet>(
        self,
        net: N,
        deadlines: &Deadlines,
    ) -> Result<(Sandbox<N>, Timings), Failed<N>> {
        let start = Instant::now();
        let me = self.clone();
        let checked = blocking(move || {
            let template = me.verify()?;
            remove_stale_overlays(&me.root, &me.manifest.disk);
            Ok::<_, SandboxError>(template)
        })
        .await;
        let template = match checked {
            Ok(t) => t,
            Err(error) => return Err(Failed { error, net }),
        };
        let run_disk = format!("{RUN_DISK_PREFIX}{}.qcow2", unix_now_ms());
        // Before the guest runs: the resumed envd checks `/init` against this hash (it also
        // knows its current token, but a slot serves whoever is in it now).
        net.publish(Some(identity(
            self.rec.meta().as_ref(),
            &self.root,
            &template.dir,
            self.init(),
        )));
        let cold = self.boots_cold();
        let vm = match self.manifest.memory().filter(|_| !cold) {
            Some((state, diff)) => self.restore(&template, state, diff, &run_disk, &net).await,
            None => self.boot_cold(&template, &run_disk, &net).await,
        };
        let vm = match vm {
            Ok(vm) => vm,
            Err(error) => {
                net.publish(None);
                return Err(Failed { error, net });
            }
        };
        let restored = start.elapsed();
        let m = &self.manifest;
        let memory = template.memory_path();
        warm_in_background(memory.clone());
        // A cold-booted guest's RAM is a private mapping of the template's memory with nothing
        // written over it: its next pause diffs against the template alone.
        let memory_base = if cold {
            Vec::new()
        } else {
            m.memory_base.clone()
        };
        let sandbox = Sandbox {
            root: self.root.clone(),
            vm,
            envd: EnvdClient::new(net.envd_addr()),
            net,
            spec: m.spec.clone(),
            template: m.template.clone(),
            memory,
            memory_base,
            init: self.init().clone(),
            disk: run_disk,
            commit_into: Some(m.disk.clone()),
            rec: self.rec.clone(),
        };
        if !cold {
            return (sandbox.start_guest(start, restored, deadlines, OnFail::KeepPaused)).await;
        }
        let booting = Deadlines {
            health: deadlines.boot,
            ..*deadlines
        };
        let (sandbox, timings) = sandbox
            .start_guest(start, restored, &booting, OnFail::KeepPaused)
            .await?;
        sandbox.start_template_command(deadlines).await;
        Ok((sandbox, timings))
    }

    /// Starts QEMU on a new run overlay `run_disk` on the paused disk with the paused state
    /// loaded (the device state, the memory base and the diff).
    async fn restore<N: SandboxNet>(
        &self,
        template: &Snapshot,
        state: &FileRecord,
        diff: &FileRecord,
        run_disk: &str,
        net: &N,
    ) -> Result<Vm, SandboxError> {
        let m = &self.manifest;
        let ram = u64::from(m.spec.memory_mib) << 20;
        let memory = template.memory_path();
        // The base first, oldest first, then the sandbox's own diff over it.
        let mut diffs: Vec<_> = m.memory_base.iter().map(MemoryLayer::diff).collect();
        diffs.push(crate::memdiff::Layer {
            path: self.root.join(&diff.file),
            info: DiffInfo {
                pages: m.dirty_pages,
                bytes: diff.bytes,
                sha256: diff.sha256.clone(),
            },
        });
        let state = self.root.join(&state.file);
        self.start_qemu(run_disk, net, |run_path| async move {
            let mem2 = memory.clone();
            let vm = restore_vm(RestoreFrom {
                snapshot_dir: &self.root,
                spec: &m.spec,
                memory: &memory,
                state: &state,
                ignore_shared: false,
                before_load: Some(Box::new(move |pid| {
                    diffs
                        .iter()
                        .try_for_each(|d| crate::memdiff::apply(pid, &mem2, ram, &d.path, &d.info))
                })),
                vm_dir: &self.root.join(VM_DIR),
                disk: &run_path,
                net: Some(net.attach()),
            })
            .await?;
            Ok(vm)
        })
        .await
    }

    /// Records the resume, creates the run overlay `run_disk` on the paused disk and starts
    /// QEMU on it with `start`. On failure the overlay is gone and the record says paused
    /// again.
    pub(super) async fn start_qemu<N, F, Fut>(
        &self,
        run_disk: &str,
        net: &N,
        start: F,
    ) -> Result<Vm, SandboxError>
    where
        N: SandboxNet,
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<Vm, SandboxError>>,
    {
        let m = &self.manifest;
        let run_path = self.root.join(run_disk);
        // Intent first: from here a crash leaves a sandbox that is still paused.
        let (rec, paused) = (self.rec.clone(), m.clone());
        blocking(move || rec.write(Phase::Resuming { paused, vm: None })).await?;
        let undo = |run_path: PathBuf, rec: Recorder| {
            blocking(move || {
                let _ = std::fs::remove_file(&run_path);
                if let Err(e) = back_to_paused(&rec) {
                    tracing::warn!(error = %crate::error_chain(&e), "record the sandbox paused again");
                }
            })
        };
        if let Err(e) = create_overlay(&self.root.join(&m.disk), "qcow2", &run_path).await {
            undo(run_path, self.rec.clone()).await;
            return Err(e.into());
        }
        let vm = match start(run_path.clone()).await {
            Ok(vm) => vm,
            Err(e) => {
                undo(run_path, self.rec.clone()).await;
                return Err(e);
            }
        };
        // So that a restarted agent stops this QEMU before it keeps the sandbox paused (one it
        // does not find recorded it stops as a stray).
        if let Ok(p) = VmProcess::of(&vm, net.slot_index()) {
            let (rec, paused) = (self.rec.clone(), m.clone());
            let vm = Some(p);
            if let Err(e) = blocking(move || rec.write(Phase::Resuming { paused, vm })).await {
                tracing::warn!(error = %crate::error_chain(&e), "record the resumed QEMU");
            }
        }
        Ok(vm)
    }
}

/// Removes run overlays other than `keep` (of resumes that never finished).
fn remove_stale_overlays(root: &Path, keep: &str) {
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(RUN_DISK_PREFIX) && name.ends_with(".qcow2") && name != keep {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes a paused state's files (after a resume: the record says running).
pub(super) fn remove_paused_files(root: &Path) {
    for f in [STATE_FILE, DIFF_FILE] {
        let _ = std::fs::remove_file(root.join(f));
    }
}

/// After a resume that failed (its QEMU gone): the record says paused again, with the manifest
/// it had before.
pub(super) fn back_to_paused(rec: &Recorder) -> Result<(), SandboxError> {
    if let Some(Phase::Resuming { paused, .. }) = rec.phase() {
        rec.write(Phase::Paused { paused })?;
    }
    Ok(())
}

/// Turns a complete snapshot (recorded `pausing`, QEMU gone) into a paused sandbox: the disk
/// is synced, the record says `paused`; then a run overlay is committed into the paused disk
/// it sits on. A failed commit keeps the overlay (the manifest names it; the chain reads the
/// same), so it loses nothing.
pub(super) fn commit_paused(
    rec: &Recorder,
    mut manifest: PausedManifest,
    disk: &str,
    commit_into: Option<&str>,
) -> Result<PausedManifest, SandboxError> {
    let root = rec.dir();
    sync_file(&root.join(disk))?;
    rec.write(Phase::Paused {
        paused: manifest.clone(),
    })?;
    if let Some(base) = commit_into {
        match commit_overlay(&root.join(disk), &root.join(base)) {
            Ok(()) => {
                let mut flat = manifest.clone();
                flat.disk = base.to_owned();
                rec.write(Phase::Paused {
                    paused: flat.clone(),
                })?;
                let _ = std::fs::remove_file(root.join(disk));
                manifest = flat;
            }
            Err(e) => {
                tracing::warn!(error = %e, root = %root.display(), "commit of the run overlay failed; the paused disk keeps it as a layer");
            }
        }
    }
    Ok(manifest)
}

/// `qemu-img commit`: writes an overlay's clusters into its backing file (the top stays valid
/// throughout, so a failure halfway still reads the same through the chain).
fn commit_overlay(top: &Path, base: &Path) -> Result<(), VmError> {
    let out = std::process::Command::new("qemu-img")
        .args(["commit", "-q", "-d"])
        .arg(top)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| VmError::QemuImg(e.to_string()))?;
    if !out.status.success() {
        return Err(VmError::QemuImg(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    sync_file(base)
}

/// A sandbox whose pause or resume was cut short (its record says `pausing` or `resuming`; its
/// QEMU must be gone): the pause is finished, or the resume undone (its run overlay and
/// runtime directory removed). Either way the sandbox is then paused; one already paused is
/// opened as it is. Used by the start-up scan and after an operation was dropped halfway.
pub fn settle_interrupted(root: &Path) -> Result<PausedSandbox, SandboxError> {
    let record = crate::record::read(root)?.ok_or_else(|| SandboxError::Invalid {
        dir: root.to_owned(),
        reason: "no record".into(),
    })?;
    let rec = Recorder::from_record(root, &record);
    let manifest = match record.phase {
        Phase::Pausing {
            paused,
            commit_into,
            ..
        } => {
            let disk = paused.disk.clone();
            commit_paused(&rec, paused, &disk, commit_into.as_deref())?
        }
        Phase::Resuming { paused, .. } => {
            remove_stale_overlays(root, &paused.disk);
            let _ = std::fs::remove_dir_all(root.join(VM_DIR));
            rec.write(Phase::Paused {
                paused: paused.clone(),
            })?;
            paused
        }
        Phase::Paused { paused } => paused,
        other => {
            return Err(SandboxError::Invalid {
                dir: root.to_owned(),
                reason: format!("not paused: its record says {}", other.name()),
            });
        }
    };
    Ok(PausedSandbox::new(rec, manifest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{meta, paused_manifest};

    fn record(dir: &Path, phase: Phase) {
        Recorder::new(dir, Some(meta("sb"))).write(phase).unwrap();
    }

    #[test]
    fn an_interrupted_pause_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rootfs.qcow2"), b"disk").unwrap();
        record(
            dir.path(),
            Phase::Pausing {
                paused: paused_manifest("rootfs.qcow2"),
                vm: None,
                commit_into: None,
            },
        );
        let p = settle_interrupted(dir.path()).unwrap();
        assert_eq!(p.manifest(), &paused_manifest("rootfs.qcow2"));
        assert_eq!(p.meta(), Some(meta("sb")));
        let again = PausedSandbox::open(dir.path()).unwrap();
        assert_eq!(again.manifest(), p.manifest());
    }

    #[test]
    fn an_interrupted_resume_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["rootfs.qcow2", "rootfs-5.qcow2", "state", "memory.diff"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::fs::create_dir(d.join(VM_DIR)).unwrap();
        record(
            d,
            Phase::Resuming {
                paused: paused_manifest("rootfs.qcow2"),
                vm: None,
            },
        );
        assert!(PausedSandbox::open(d).is_err(), "resuming is not paused");
        settle_interrupted(d).unwrap();
        assert!(!d.join("rootfs-5.qcow2").exists() && !d.join(VM_DIR).exists());
        for f in ["rootfs.qcow2", "state", "memory.diff"] {
            assert!(d.join(f).exists(), "{f} removed");
        }
        let p = PausedSandbox::open(d).unwrap();
        assert_eq!(p.manifest(), &paused_manifest("rootfs.qcow2"));
    }

    #[test]
    fn a_running_sandbox_is_not_settled_into_a_paused_one() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), Phase::Creating);
        let e = settle_interrupted(dir.path()).unwrap_err();
        assert!(e.to_string().contains("creating"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(settle_interrupted(empty.path()).is_err());
    }

    #[test]
    fn a_failed_resume_records_the_same_manifest_again() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::new(dir.path(), None);
        let paused = paused_manifest("rootfs.qcow2");
        rec.write(Phase::Resuming {
            paused: paused.clone(),
            vm: None,
        })
        .unwrap();
        back_to_paused(&rec).unwrap();
        let r = crate::record::read(dir.path()).unwrap().unwrap();
        assert_eq!(r.phase, Phase::Paused { paused });
    }
}
