//! Sandboxes: a VM restored from a template, its network slot and its directory, with
//! create, pause, resume and kill.
//!
//! A sandbox's directory (`root`) holds its record (`sandbox.json`, written only through
//! [`crate::record`]: what the sandbox is and which phase it is in), its disk overlay
//! `rootfs.qcow2` for its whole life, QEMU's runtime files in `vm/` while it runs, and while
//! paused: `state` (device state only, from `xen-save-devices-state`: QEMU writes no RAM) and
//! `memory.diff` (the pages the sandbox changed against its template's memory file, found in
//! QEMU's page tables: see [`crate::memdiff`]), described by the [`PausedManifest`] in the
//! record. Resume maps the template's memory file privately again, writes the diff into it
//! before any guest code runs, loads the device state and continues. Pause thus writes only
//! what the sandbox changed and resume reads only that, and sandboxes keep sharing the
//! template's page cache.
//!
//! Each step that can fail is recorded first: `creating` before a cold create starts QEMU,
//! `pausing` once the snapshot files are complete and synced but before QEMU quits (a crash
//! from there on is finished into a pause by [`settle_interrupted`]), `resuming` before a
//! resume starts QEMU (it keeps the paused manifest: a crash mid-resume leaves a resumable
//! paused sandbox, whose files a resume leaves untouched until it succeeded).
//!
//! Every restore (create or resume) sends envd `/init` with the host's clock and fresh host
//! entropy, so clones of one snapshot do not share RNG state and the guest clock is current.
//! (That is the clone-safety mechanism: QEMU's `vmgenid` device is accepted by `microvm` but
//! never reaches the guest there, since microvm's ACPI tables carry no VMGENID SSDT, and the
//! guest kernel (Debian 6.1 cloud) is built without `CONFIG_VMGENID` anyway.)
//!
//! [`Sandbox::create_pooled`] takes a pre-started QEMU from the template's
//! [`crate::pool::WarmPool`] when one is waiting and restores cold otherwise; a warm sandbox
//! adopts the warm VM's directory, which already holds `rootfs.qcow2` and `vm/`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wrenn_hostnet::{Metadata, Slot, TAP_NAME};
use wrenn_image::ENVD_PORT;

use crate::envd::{EnvdClient, EnvdError};
use crate::memdiff::{DiffInfo, MemDiffError};
use crate::pool::{PoolError, RestoredWarm, SlotLease, SlotPool, WarmPool, restore_warm};
use crate::record::{Phase, RecordError, Recorder, VmProcess};
use crate::runtime::SandboxMeta;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::vm::{NetAttach, Vm, VmError, VmSpec, create_overlay};

mod checkpoint;
mod coldboot;
mod hot;
mod pause;
mod paused;

pub use checkpoint::{CHECKPOINT_DISK, Checkpoint};
pub use hot::WarmUpError;
pub use pause::PauseTimings;
pub use paused::{PausedSandbox, settle_interrupted};
use paused::{back_to_paused, remove_paused_files};

const DISK_FILE: &str = "rootfs.qcow2";
const VM_DIR: &str = "vm";
const STATE_FILE: &str = "state";
const DIFF_FILE: &str = "memory.diff";
/// Overlays a resumed guest writes to, on top of its paused disk (`rootfs-<n>.qcow2`): the
/// paused disk stays unchanged until the resume succeeded, and a pause commits the overlay
/// back into it.
const RUN_DISK_PREFIX: &str = "rootfs-";
/// Entropy sent with every `/init` (envd accepts 16..=4096 bytes).
const ENTROPY_BYTES: usize = 64;
/// How long QEMU may take to exit after `quit` (it flushes the disk overlay).
const QUIT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a sandbox is reached through: a network slot (or a pooled one).
pub trait SandboxNet: Send + Sync {
    /// The namespace and tap QEMU attaches to.
    fn attach(&self) -> NetAttach;
    /// Where the host reaches the guest's envd.
    fn envd_addr(&self) -> SocketAddr;
    /// The slot's index, recorded so that a restarted agent can take the slot over.
    fn slot_index(&self) -> Option<u32> {
        None
    }
    /// Publishes who is in the slot on its metadata endpoint (`None`: nobody), where envd
    /// reads the hash of the only token its `/init` accepts. A net without an endpoint (a bare
    /// [`Slot`]) publishes nothing.
    fn publish(&self, _doc: Option<Metadata>) {}
}

impl SandboxNet for Slot {
    fn attach(&self) -> NetAttach {
        NetAttach {
            netns: self.netns_path(),
            tap: TAP_NAME.into(),
            slot: self.index(),
        }
    }

    fn envd_addr(&self) -> SocketAddr {
        self.guest_endpoint(ENVD_PORT)
    }

    fn slot_index(&self) -> Option<u32> {
        Some(self.index())
    }
}

/// What `/init` gives the guest besides the clock and entropy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Environment variables for every process.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// envd's access token (`X-Access-Token`), if the sandbox is secured.
    #[serde(default)]
    pub access_token: Option<String>,
    /// Default user for processes.
    #[serde(default)]
    pub default_user: Option<String>,
    /// Default working directory.
    #[serde(default)]
    pub default_workdir: Option<String>,
}

/// Deadlines of the lifecycle steps, each on its own so a slow step cannot starve the next.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From QEMU running to envd answering `/health`.
    pub health: Duration,
    /// For `/init`, after `/health` answered.
    pub init: Duration,
    /// For `/snapshot/prepare`.
    pub prepare: Duration,
    /// From QEMU running to envd answering `/health` when a paused disk is booted cold.
    pub boot: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        // A restored TCG guest answers in well under a second; these leave room for a loaded host.
        Self {
            health: Duration::from_secs(20),
            init: Duration::from_secs(10),
            prepare: Duration::from_secs(10),
            // A Debian guest boots in about 7 s under TCG on an idle host.
            boot: Duration::from_secs(120),
        }
    }
}

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Restoring the VM failed.
    #[error(transparent)]
    Restore(#[from] SnapshotError),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// envd failed at a lifecycle step.
    #[error("envd {step}")]
    Envd {
        /// `health`, `init` or `prepare`.
        step: &'static str,
        /// The cause.
        #[source]
        source: EnvdError,
    },
    /// QEMU refused a command.
    #[error("QMP {what}")]
    Qmp {
        /// The command.
        what: &'static str,
        /// The cause.
        #[source]
        source: wrenn_qmp::QmpError,
    },
    /// Saving or loading the memory diff failed.
    #[error(transparent)]
    Memory(#[from] MemDiffError),
    /// The paused state cannot be resumed.
    #[error("paused sandbox {dir}: {reason}")]
    Invalid {
        /// The sandbox directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The host could not provide entropy.
    #[error("getrandom")]
    Entropy(#[source] std::io::Error),
    /// No slot could be had for a cold create.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The sandbox's record could not be read or written.
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl SandboxError {
    fn envd(step: &'static str) -> impl FnOnce(EnvdError) -> Self {
        move |source| Self::Envd { step, source }
    }

    fn qmp(what: &'static str) -> impl FnOnce(wrenn_qmp::QmpError) -> Self {
        move |source| Self::Qmp { what, source }
    }
}

/// A create or resume that failed: everything it made is gone, and the slot is returned.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failed<N> {
    /// Why.
    #[source]
    pub error: SandboxError,
    /// The slot, free again.
    pub net: N,
}

/// A pause that failed.
#[derive(Debug)]
pub enum PauseError<N: SandboxNet> {
    /// Nothing was committed; the sandbox runs again.
    StillRunning {
        /// Why.
        error: SandboxError,
        /// The sandbox, running.
        sandbox: Box<Sandbox<N>>,
    },
    /// QEMU is gone and the pause is incomplete: the sandbox is lost (its directory removed).
    Lost {
        /// Why.
        error: SandboxError,
        /// The slot, free again.
        net: N,
    },
}

impl<N: SandboxNet> PauseError<N> {
    /// The cause.
    pub fn error(&self) -> &SandboxError {
        match self {
            Self::StillRunning { error, .. } | Self::Lost { error, .. } => error,
        }
    }
}

/// Which template a sandbox came from (paused state records it: its memory diff applies only
/// to that exact memory file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    /// The template snapshot directory.
    pub dir: PathBuf,
    /// Its device state's sha256: identifies the snapshot (a rebuilt template differs).
    pub state_sha256: String,
    /// When it was taken.
    pub created_unix: u64,
}

/// A recorded file: size and sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Name inside the sandbox directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256, hex.
    pub sha256: String,
}

/// A named snapshot's memory diff that a sandbox's memory is restored from before its own
/// (the base of [`crate::memdiff`]: its saves store only what differs from it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayer {
    /// The diff file, in the snapshot's directory (kept while anything is layered on it).
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its sha256, hex.
    pub sha256: String,
    /// How many pages it holds.
    pub pages: u64,
}

impl MemoryLayer {
    fn diff(&self) -> crate::memdiff::Layer {
        crate::memdiff::Layer {
            path: self.path.clone(),
            info: DiffInfo {
                pages: self.pages,
                bytes: self.bytes,
                sha256: self.sha256.clone(),
            },
        }
    }
}

/// A paused snapshot: everything needed to resume (in the record of a pausing, paused or
/// resuming sandbox), so a restarted agent can find paused sandboxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PausedManifest {
    /// The machine (must equal the template's).
    pub spec: VmSpec,
    /// The template.
    pub template: TemplateRef,
    /// The disk overlay (on the template's disk).
    pub disk: String,
    /// Device state (none, and no `memory_diff`: a filesystem-only pause, whose resume boots
    /// the disk cold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<FileRecord>,
    /// Changed guest pages (against the template with `memory_base` written over it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_diff: Option<FileRecord>,
    /// How many pages the diff holds.
    pub dirty_pages: u64,
    /// The snapshots' diffs written before `memory_diff`, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_base: Vec<MemoryLayer>,
    /// What `/init` gets on resume.
    pub init: InitConfig,
    /// When it was paused (seconds since the epoch).
    pub paused_unix: u64,
    /// The pausing QEMU.
    pub qemu_version: String,
}

impl PausedManifest {
    /// The device state and memory diff, if the pause kept the guest's memory.
    pub fn memory(&self) -> Option<(&FileRecord, &FileRecord)> {
        self.state.as_ref().zip(self.memory_diff.as_ref())
    }
}

/// What a restarted agent needs to take a running [`Sandbox`] over, besides its QEMU (in the
/// record of a running sandbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningManifest {
    /// The machine.
    pub spec: VmSpec,
    /// The template whose memory file the guest RAM maps.
    pub template: TemplateRef,
    /// That memory file.
    pub memory: PathBuf,
    /// The snapshots' diffs written over it before the guest ran, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_base: Vec<MemoryLayer>,
    /// What `/init` gave the guest (a pause keeps it for the resume).
    pub init: InitConfig,
    /// The disk image QEMU writes to (a file name in the sandbox directory).
    pub disk: String,
    /// The paused disk `disk` is an overlay on, to commit into at the next pause.
    #[serde(default)]
    pub commit_into: Option<String>,
}

/// A running sandbox. Dropping it kills QEMU (through [`Vm`]) but keeps its directory; use
/// [`Sandbox::kill`] to remove everything.
#[derive(Debug)]
pub struct Sandbox<N: SandboxNet> {
    root: PathBuf,
    vm: Vm,
    net: N,
    envd: EnvdClient,
    spec: VmSpec,
    template: TemplateRef,
    memory: PathBuf,
    /// The snapshots' diffs over `memory` the guest started from (saves leave out what still
    /// reads as they have it).
    memory_base: Vec<MemoryLayer>,
    init: InitConfig,
    /// The disk QEMU writes to (a file name in `root`).
    disk: String,
    /// After a resume: the paused disk `disk` is an overlay on.
    commit_into: Option<String>,
    /// The writer of its record.
    rec: Recorder,
}

/// What a failed start of the guest removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnFail {
    /// A create: the whole directory.
    RemoveAll,
    /// A resume: only the run overlay; the paused state stays as it was.
    KeepPaused,
}

/// How long the steps of a create or resume took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Until a slot (or a pre-started QEMU, which has one) was in hand.
    pub slot: Duration,
    /// Until QEMU ran the guest (for resume: including writing the memory diff).
    pub restored: Duration,
    /// Until envd answered `/health`.
    pub healthy: Duration,
    /// Until `/init` returned (the total).
    pub total: Duration,
    /// The guest was loaded into a pre-started QEMU from a [`WarmPool`].
    pub warm: bool,
}

impl<N: SandboxNet> Sandbox<N> {
    /// Creates a sandbox in `root` (which must not exist) by restoring `template` into `net`,
    /// then waits for envd and runs `/init`; `meta` goes into its record. On failure nothing
    /// is left and `net` is returned.
    pub async fn create(
        template: &Snapshot,
        net: N,
        root: &Path,
        init: InitConfig,
        meta: Option<SandboxMeta>,
        deadlines: &Deadlines,
    ) -> Result<(Self, Timings), Failed<N>> {
        let start = Instant::now();
        if root.exists() {
            return Err(Failed {
                error: SandboxError::Invalid {
                    dir: root.to_owned(),
                    reason: "already exists".into(),
                },
                net,
            });
        }
        // Before the guest runs a single instruction: from its first `/init` on, envd only
        // accepts the token whose hash the slot publishes.
        net.publish(Some(identity(meta.as_ref(), root, &template.dir, &init)));
        let rec = Recorder::new(root, meta);
        let made = async {
            let (r, dir) = (rec.clone(), root.to_owned());
            blocking(move || {
                std::fs::create_dir_all(&dir).map_err(VmError::io("create", &dir))?;
                r.write(Phase::Creating)?;
                Ok::<_, SandboxError>(())
            })
            .await?;
            let disk = root.join(DISK_FILE);
            create_overlay(&template.disk_path(), "qcow2", &disk).await?;
            let vm = template
                .restore_with_disk(&root.join(VM_DIR), &disk, Some(net.attach()))
                .await?;
            Ok::<_, SandboxError>(vm)
        }
        .await;
        let vm = match made {
            Ok(vm) => vm,
            Err(error) => {
                let _ = std::fs::remove_dir_all(root);
                net.publish(None);
                return Err(Failed { error, net });
            }
        };
        let restored = start.elapsed();
        Self::adopt(template, rec, vm, net, init)
            .start_guest(start, restored, deadlines, OnFail::RemoveAll)
            .await
    }

    /// A sandbox around a QEMU already running `template`'s guest, in the directory of `rec`
    /// (which holds the disk overlay `rootfs.qcow2` and the runtime directory `vm/`).
    fn adopt(template: &Snapshot, rec: Recorder, vm: Vm, net: N, init: InitConfig) -> Self {
        warm_in_background(template.memory_path());
        Sandbox {
            root: rec.dir().to_owned(),
            vm,
            envd: EnvdClient::new(net.envd_addr()),
            net,
            spec: template.manifest.spec.clone(),
            template: TemplateRef {
                dir: template.dir.clone(),
                state_sha256: template.manifest.state_sha256.clone(),
                created_unix: template.manifest.created_unix,
            },
            memory: template.memory_path(),
            memory_base: Vec::new(),
            init,
            disk: DISK_FILE.into(),
            commit_into: None,
            rec,
        }
    }

    /// Waits for envd and runs `/init`; on failure kills the VM and removes what `on_fail` says.
    async fn start_guest(
        self,
        start: Instant,
        restored: Duration,
        deadlines: &Deadlines,
        on_fail: OnFail,
    ) -> Result<(Self, Timings), Failed<N>> {
        let (restored_point, running_point) = match on_fail {
            OnFail::RemoveAll => ("create:restored", "create:running"),
            OnFail::KeepPaused => ("resume:restored", "resume:running"),
        };
        crate::fault::point(restored_point);
        let result = async {
            self.envd
                .wait_healthy(deadlines.health)
                .await
                .map_err(SandboxError::envd("health"))?;
            let healthy = start.elapsed();
            let body = init_body(&self.init)?;
            self.envd
                .init(&body, deadlines.init)
                .await
                .map_err(SandboxError::envd("init"))?;
            Ok::<_, SandboxError>(healthy)
        }
        .await;
        let result = match result {
            Ok(healthy) => self.record_running().await.map(|()| healthy),
            Err(e) => Err(e),
        };
        if result.is_ok() {
            crate::fault::point(running_point);
        }
        if result.is_ok() && on_fail == OnFail::KeepPaused {
            // Recorded as running: the paused state is history.
            let root = self.root.clone();
            blocking(move || remove_paused_files(&root)).await;
        }
        match result {
            Ok(healthy) => Ok((
                self,
                Timings {
                    slot: Duration::ZERO,
                    restored,
                    healthy,
                    total: start.elapsed(),
                    warm: false,
                },
            )),
            Err(error) => {
                let console = self.vm.console_text().await;
                tracing::warn!(root = %self.root.display(), %console, "guest did not start");
                let net = match on_fail {
                    OnFail::RemoveAll => self.kill().await,
                    OnFail::KeepPaused => self.stop_keeping_paused().await,
                };
                Err(Failed { error, net })
            }
        }
    }

    /// After a failed resume: kills QEMU, removes its run overlay and records the sandbox
    /// paused again; the paused files are untouched.
    async fn stop_keeping_paused(self) -> N {
        let Sandbox {
            root,
            vm,
            net,
            disk,
            rec,
            ..
        } = self;
        if let Err(e) = vm.kill().await {
            tracing::warn!(error = %crate::error_chain(&e), "kill");
        }
        net.publish(None);
        blocking(move || {
            let _ = std::fs::remove_file(root.join(disk));
            if let Err(e) = back_to_paused(&rec) {
                // Still `resuming`, with the paused manifest: a restarted agent keeps it too.
                tracing::warn!(error = %crate::error_chain(&e), "record the sandbox paused again");
            }
        })
        .await;
        net
    }

    /// Records the sandbox running, so that a restarted agent finds this QEMU
    /// (`crate::state::scan`) and can take it over ([`Sandbox::adopt_running`]).
    async fn record_running(&self) -> Result<(), SandboxError> {
        let manifest = RunningManifest {
            spec: self.spec.clone(),
            template: self.template.clone(),
            memory: self.memory.clone(),
            memory_base: self.memory_base.clone(),
            init: self.init.clone(),
            disk: self.disk.clone(),
            commit_into: self.commit_into.clone(),
        };
        let vm = VmProcess::of(&self.vm, self.net.slot_index())?;
        let rec = self.rec.clone();
        blocking(move || {
            rec.write(Phase::Running {
                vm,
                running: manifest,
            })
        })
        .await
        .map_err(Into::into)
    }

    /// Takes over a sandbox whose QEMU outlived an earlier agent: `vm` adopted from the
    /// running record `rec` goes on from, `net` its slot, `m` the record's running state.
    pub fn adopt_running(rec: Recorder, vm: Vm, net: N, m: RunningManifest) -> Self {
        warm_in_background(m.memory.clone());
        let root = rec.dir().to_owned();
        // A crash between a resume's running record and its removal of the paused files
        // leaves them: the guest has run since, so they are stale.
        remove_paused_files(&root);
        // A new agent's endpoints start empty; the guest keeps checking `/init` against it.
        net.publish(Some(identity(
            rec.meta().as_ref(),
            &root,
            &m.template.dir,
            &m.init,
        )));
        Sandbox {
            root,
            vm,
            envd: EnvdClient::new(net.envd_addr()),
            net,
            spec: m.spec,
            template: m.template,
            memory: m.memory,
            memory_base: m.memory_base,
            init: m.init,
            disk: m.disk,
            commit_into: m.commit_into,
            rec,
        }
    }

    /// The writer of its record (the runtime saves changed timers through it).
    pub fn recorder(&self) -> &Recorder {
        &self.rec
    }

    /// The sandbox directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The access token `/init` gave the guest.
    pub fn access_token(&self) -> Option<&str> {
        self.init.access_token.as_deref()
    }

    /// The envd client.
    pub fn envd(&self) -> &EnvdClient {
        &self.envd
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The slot.
    pub fn net(&self) -> &N {
        &self.net
    }

    /// The memory size of the machine.
    pub fn memory_mib(&self) -> u32 {
        self.spec.memory_mib
    }

    /// The run overlay a pause will commit into the paused disk, if any.
    pub fn pending_commit(&self) -> Option<PathBuf> {
        self.commit_into
            .as_ref()
            .map(|_| self.root.join(&self.disk))
    }

    /// Kills QEMU, removes the sandbox directory, and returns the slot.
    pub async fn kill(self) -> N {
        let Sandbox {
            root, vm, net, rec, ..
        } = self;
        rec.retire();
        if let Err(e) = vm.kill().await {
            tracing::warn!(error = %crate::error_chain(&e), "kill");
        }
        net.publish(None);
        crate::fault::point("kill:stopped");
        blocking(move || {
            if let Err(e) = std::fs::remove_dir_all(&root)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, root = %root.display(), "remove sandbox directory");
            }
        })
        .await;
        net
    }

    /// `/init` again with fresh entropy (after an aborted pause).
    async fn reinit(&self, deadlines: &Deadlines) -> Result<(), SandboxError> {
        let body = init_body(&self.init)?;
        self.envd
            .init(&body, deadlines.init)
            .await
            .map_err(SandboxError::envd("init"))
    }
}

impl Sandbox<SlotLease> {
    /// Creates a sandbox from `template`, in a pre-started QEMU from `warm` when it has one
    /// waiting for this very snapshot (never waits for one), else by a cold restore into a
    /// slot from `slots` in `cold_root` (which must not exist). `meta` goes into its record.
    ///
    /// A warm sandbox lives in its warm VM's directory (under the pool's VMs root; see
    /// [`Sandbox::root`]), which already holds `rootfs.qcow2` and `vm/`. A warm VM that fails
    /// to load is discarded and the create falls back to a cold restore. On failure nothing is
    /// left and the slot is back in `slots`.
    pub async fn create_pooled(
        template: &Snapshot,
        warm: Option<&WarmPool>,
        slots: &SlotPool,
        cold_root: &Path,
        init: InitConfig,
        meta: Option<SandboxMeta>,
        deadlines: &Deadlines,
    ) -> Result<(Self, Timings), SandboxError> {
        let start = Instant::now();
        // A pool for another snapshot (or a re-taken template in the same directory) would
        // hand out a QEMU mapping the wrong memory file: do not take from it.
        let same = |p: &&WarmPool| {
            let s = p.snapshot();
            s.dir == template.dir && s.manifest.created_unix == template.manifest.created_unix
        };
        if let Some(vm) = warm.filter(same).and_then(WarmPool::take) {
            let took_slot = start.elapsed();
            // The warm QEMU waits in `-incoming defer`: its guest has not run yet.
            vm.slot.publish(Some(identity(
                meta.as_ref(),
                &vm.root,
                &template.dir,
                &init,
            )));
            match restore_warm(template, vm).await {
                Ok(RestoredWarm { vm, slot, root }) => {
                    let restored = start.elapsed();
                    // The record says `warm` until the guest runs its `/init`: a crash before
                    // makes it garbage, as a cold create's `creating` would be.
                    let sandbox = Self::adopt(template, Recorder::new(&root, meta), vm, slot, init);
                    return match sandbox
                        .start_guest(start, restored, deadlines, OnFail::RemoveAll)
                        .await
                    {
                        Ok((sb, t)) => Ok((
                            sb,
                            Timings {
                                slot: took_slot,
                                warm: true,
                                ..t
                            },
                        )),
                        Err(Failed { error, net }) => {
                            slots.release(net).await;
                            Err(error)
                        }
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "warm QEMU failed to load; restoring cold");
                }
            }
        }
        let lease = slots.acquire().await?;
        // Timings count from this call's start (slot, failed warm attempt included).
        let before = start.elapsed();
        match Sandbox::create(template, lease, cold_root, init, meta, deadlines).await {
            Ok((sb, t)) => Ok((
                sb,
                Timings {
                    slot: before,
                    restored: before + t.restored,
                    healthy: before + t.healthy,
                    total: before + t.total,
                    warm: false,
                },
            )),
            Err(Failed { error, net }) => {
                slots.release(net).await;
                Err(error)
            }
        }
    }
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn sync_file(path: &Path) -> Result<(), VmError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(VmError::io("sync", path))
}

/// What the slot's metadata endpoint says about the sandbox in it: its ID (the directory's
/// name without a meta), its template (the template directory's name without one) and the
/// SHA-512 of its envd access token (of `""` without a token: envd then accepts only an
/// `/init` that sets none).
pub(crate) fn identity(
    meta: Option<&SandboxMeta>,
    root: &Path,
    template: &Path,
    init: &InitConfig,
) -> Metadata {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let (sandbox_id, template_id) = match meta {
        Some(m) if !m.sandbox_id.is_empty() => (m.sandbox_id.clone(), m.template_id.clone()),
        _ => (name(root), name(template)),
    };
    Metadata::new(&sandbox_id, &template_id, init.access_token.as_deref())
}

/// The `/init` body: host clock, fresh host entropy, and the sandbox's config.
fn init_body(init: &InitConfig) -> Result<serde_json::Value, SandboxError> {
    use base64::Engine as _;
    let mut entropy = [0u8; ENTROPY_BYTES];
    getrandom(&mut entropy).map_err(SandboxError::Entropy)?;
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| SandboxError::Invalid {
            dir: PathBuf::new(),
            reason: format!("format the clock: {e}"),
        })?;
    let mut body = serde_json::json!({
        "timestamp": timestamp,
        "envVars": init.env_vars,
        "entropy": base64::engine::general_purpose::STANDARD.encode(entropy),
    });
    for (key, value) in [
        ("accessToken", &init.access_token),
        ("defaultUser", &init.default_user),
        ("defaultWorkdir", &init.default_workdir),
    ] {
        if let Some(v) = value {
            body[key] = serde_json::Value::String(v.clone());
        }
    }
    Ok(body)
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`, blocking until it is seeded).
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Memory files being warmed right now (one warm-up per file at a time).
static WARMING: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

/// Asks the kernel to read a template memory file into the page cache, on a blocking thread,
/// so a restored guest takes fewer faults that go to disk. Never awaited by a create.
fn warm_in_background(path: PathBuf) {
    {
        let mut warming = WARMING.lock().unwrap_or_else(|e| e.into_inner());
        if !warming.insert(path.clone()) {
            return;
        }
    }
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let result = std::fs::File::open(&path).and_then(|f| {
            nix::fcntl::posix_fadvise(
                &f,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            )
            .map_err(std::io::Error::from)
        });
        match result {
            Ok(()) => {
                tracing::debug!(path = %path.display(), took = ?start.elapsed(), "memory file warm-up issued")
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "memory file warm-up failed")
            }
        }
        WARMING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&path);
    });
}

fn unix_now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
