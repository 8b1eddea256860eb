//! The sandbox record: one versioned file, [`RECORD_FILE`], in every sandbox directory, saying
//! what the directory is ([`SandboxRecord`]: the agent's [`SandboxMeta`] and the [`Phase`],
//! with the QEMU process, the running sandbox's state or its paused manifest). A restarted
//! agent reads it to decide what to adopt, keep, finish or remove (`crate::state::scan`).
//!
//! This module is the only code that writes the file, through a [`Recorder`]: one per sandbox
//! directory, shared by whatever holds the sandbox, so that a late rewrite (new timers) can
//! never put back an older phase. Writes are intent-first: the callers record a phase before
//! the step that can fail (`creating` before QEMU starts, `pausing` once the snapshot is
//! complete but before QEMU quits, `resuming` before the resumed QEMU starts). Each write
//! replaces the file atomically (temporary file, rename), mode 0600 since it holds the envd
//! access token. Phases that carry a paused snapshot are synced (file and directory): losing
//! them would lose the sandbox. The others are not: they only have to survive the agent,
//! and their VM dies with the host anyway.
//!
//! Directories written by older agents (separate `agent-meta.json`, `running.json`,
//! `wrenn-vm.json`, `pausing.json`, `paused.json`) are converted when read (`legacy`).

mod legacy;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::runtime::SandboxMeta;
use crate::sandbox::{PausedManifest, RunningManifest};
use crate::vm::Vm;

/// The record's file name inside a sandbox directory.
pub const RECORD_FILE: &str = "sandbox.json";
/// The record format this code writes and reads. (1 was `wrenn-vm.json`'s, of the files
/// this one replaces.)
pub const RECORD_VERSION: u32 = 2;
const TMP_FILE: &str = ".sandbox.json.tmp";

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a record (truncated, not JSON, fields missing).
    #[error("record {path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The record has a format this agent does not know (a newer agent's, most likely).
    #[error("record {path} has format version {found}; this agent reads version {RECORD_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u64,
    },
    /// An older agent's files that do not make a record.
    #[error("old records in {dir}: {reason}")]
    Legacy {
        /// The sandbox directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The QEMU to record is not running.
    #[error("QEMU pid {0} is not running")]
    NotRunning(u32),
    /// The record could not be encoded.
    #[error("encode the record")]
    Encode(#[source] serde_json::Error),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecordError {
    let path = path.to_owned();
    move |source| RecordError::Io { what, path, source }
}

/// What a sandbox directory holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The agent's record of the sandbox (`None` for a warm pool VM, which has no sandbox yet,
    /// and for sandboxes made without an agent, as tests do).
    pub meta: Option<SandboxMeta>,
    /// Where it is in its life.
    pub phase: Phase,
    /// When the record was written (Unix ms).
    pub updated_unix_ms: u64,
}

/// Where a sandbox directory is in its life, with what that phase needs to go on after a
/// crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    /// A pre-started QEMU of a warm pool, waiting in `-incoming defer`; no sandbox yet.
    Warm {
        /// The waiting QEMU.
        vm: VmProcess,
    },
    /// Being created: the QEMU, if it got started, has not run `/init` yet.
    Creating,
    /// Running a sandbox.
    Running {
        /// Its QEMU.
        vm: VmProcess,
        /// What a restarted agent needs to take it over.
        running: RunningManifest,
    },
    /// The snapshot files are complete and synced; QEMU may still be there (stopped). A
    /// restarted agent finishes the pause.
    Pausing {
        /// The snapshot.
        paused: PausedManifest,
        /// The QEMU, to be gone before the disk is touched.
        #[serde(default)]
        vm: Option<VmProcess>,
        /// The paused disk the snapshot's disk (a resumed guest's run overlay) is to be
        /// committed into.
        #[serde(default)]
        commit_into: Option<String>,
    },
    /// Paused: no QEMU, the snapshot complete.
    Paused {
        /// The snapshot.
        paused: PausedManifest,
    },
    /// Being resumed. The paused files stay untouched until the resume succeeded, so a crash
    /// here leaves the sandbox paused.
    Resuming {
        /// The snapshot being resumed.
        paused: PausedManifest,
        /// The resumed QEMU, once started.
        #[serde(default)]
        vm: Option<VmProcess>,
    },
}

impl Phase {
    /// The phase's name, as in the file.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Warm { .. } => "warm",
            Self::Creating => "creating",
            Self::Running { .. } => "running",
            Self::Pausing { .. } => "pausing",
            Self::Paused { .. } => "paused",
            Self::Resuming { .. } => "resuming",
        }
    }

    /// Whether losing the record in a host crash would lose a paused snapshot.
    fn durable(&self) -> bool {
        matches!(
            self,
            Self::Pausing { .. } | Self::Paused { .. } | Self::Resuming { .. }
        )
    }
}

/// A QEMU process as recorded: enough to find it again, and never to mistake another process
/// that got its pid for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// Its QMP socket.
    pub qmp_socket: PathBuf,
    /// Its network slot's index (`wrenn-slot-<index>`).
    pub slot: Option<u32>,
}

impl VmProcess {
    /// The record of `vm` in slot `slot`; fails if its QEMU is not running.
    pub fn of(vm: &Vm, slot: Option<u32>) -> Result<Self, RecordError> {
        let pid = vm.pid();
        let start_time =
            crate::state::process_start_time(pid).ok_or(RecordError::NotRunning(pid))?;
        Ok(Self {
            pid,
            start_time,
            qmp_socket: vm.qmp_socket(),
            slot,
        })
    }

    /// Whether the recorded QEMU is still this very process (alive, same start time).
    pub fn alive(&self) -> bool {
        self.pid != 0 && crate::state::process_start_time(self.pid) == Some(self.start_time)
    }

    /// QEMU's runtime directory (the QMP socket's).
    pub fn dir(&self) -> PathBuf {
        self.qmp_socket
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default()
    }
}

/// Reads `dir`'s record; `Ok(None)` when there is none at all. A directory of an older agent
/// is converted (its record rewritten as [`RECORD_FILE`], the old files removed).
pub fn read(dir: &Path) -> Result<Option<SandboxRecord>, RecordError> {
    let path = dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse(&path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => legacy::migrate(dir),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Checks the version before the rest, so a newer format is reported as such and not as
/// corrupt.
fn parse(path: &Path, bytes: &[u8]) -> Result<SandboxRecord, RecordError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u64,
    }
    let corrupt = |source| RecordError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let v: Versioned = serde_json::from_slice(bytes).map_err(corrupt)?;
    if v.version != u64::from(RECORD_VERSION) {
        return Err(RecordError::Version {
            path: path.to_owned(),
            found: v.version,
        });
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}

/// Replaces `dir`'s record. `durable`: the file and the directory are synced before this
/// returns.
fn replace(dir: &Path, record: &SandboxRecord, durable: bool) -> Result<(), RecordError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = serde_json::to_vec_pretty(record).map_err(RecordError::Encode)?;
    let tmp = dir.join(TMP_FILE);
    // A leftover of a crash may have another mode; `mode` applies only to a new file.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))
        .and_then(|mut f| {
            f.write_all(&text).map_err(io_err("write", &tmp))?;
            if durable {
                f.sync_all().map_err(io_err("sync", &tmp))?;
            }
            Ok(())
        })
        .and_then(|()| {
            std::fs::rename(&tmp, dir.join(RECORD_FILE)).map_err(io_err("rename", &tmp))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if durable {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", dir))?;
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The one writer of a sandbox directory's record. Clones share it: whoever holds the sandbox
/// (running, then paused, then running again) writes through the same one, and every write
/// carries the latest meta and the latest phase. Its methods do blocking file work: call them
/// from a blocking thread.
#[derive(Debug, Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    meta: Option<SandboxMeta>,
    /// The phase in the file (`None`: nothing written yet).
    phase: Option<Phase>,
    /// The directory is being removed: nothing more is written.
    retired: bool,
}

impl Recorder {
    /// A writer for `dir`, which holds no record yet.
    pub fn new(dir: &Path, meta: Option<SandboxMeta>) -> Self {
        Self::with(dir, meta, None)
    }

    /// A writer going on from `record`, read from `dir`.
    pub fn from_record(dir: &Path, record: &SandboxRecord) -> Self {
        Self::with(dir, record.meta.clone(), Some(record.phase.clone()))
    }

    fn with(dir: &Path, meta: Option<SandboxMeta>, phase: Option<Phase>) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                current: Mutex::new(Current {
                    meta,
                    phase,
                    retired: false,
                }),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.inner.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The meta the next write carries.
    pub fn meta(&self) -> Option<SandboxMeta> {
        self.lock().meta.clone()
    }

    /// The phase last written.
    pub fn phase(&self) -> Option<Phase> {
        self.lock().phase.clone()
    }

    /// Replaces the meta in memory only: the next write carries it.
    pub fn set_meta(&self, meta: Option<SandboxMeta>) {
        self.lock().meta = meta;
    }

    /// Records `phase` (with the current meta).
    pub fn write(&self, phase: Phase) -> Result<(), RecordError> {
        let mut cur = self.lock();
        if cur.retired {
            return Ok(());
        }
        self.store(&cur.meta, &phase)?;
        cur.phase = Some(phase);
        Ok(())
    }

    /// Replaces the meta and rewrites the record in its current phase (nothing is written
    /// when no phase has been yet).
    pub fn save_meta(&self, meta: SandboxMeta) -> Result<(), RecordError> {
        let mut cur = self.lock();
        cur.meta = Some(meta);
        match (&cur.phase, cur.retired) {
            (Some(phase), false) => self.store(&cur.meta, phase),
            _ => Ok(()),
        }
    }

    /// Stops all writing: the directory is about to be removed, and a late rewrite must not
    /// put a file back into it.
    pub fn retire(&self) {
        self.lock().retired = true;
    }

    fn store(&self, meta: &Option<SandboxMeta>, phase: &Phase) -> Result<(), RecordError> {
        let record = SandboxRecord {
            version: RECORD_VERSION,
            meta: meta.clone(),
            phase: phase.clone(),
            updated_unix_ms: now_ms(),
        };
        replace(&self.inner.dir, &record, phase.durable())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sandbox::{FileRecord, InitConfig, TemplateRef};

    pub(crate) fn meta(id: &str) -> SandboxMeta {
        SandboxMeta {
            sandbox_id: id.into(),
            template_id: "base".into(),
            vcpus: 1,
            memory_mb: 512,
            start_unix_ms: 1_700_000_000_000,
            backstop_unix_ms: 0,
            auto_pause: false,
            envd_version: "0.1.0".into(),
            egress: Default::default(),
        }
    }

    pub(crate) fn paused_manifest(disk: &str) -> PausedManifest {
        let file = |name: &str| FileRecord {
            file: name.into(),
            bytes: 4,
            sha256: "00".repeat(32),
        };
        PausedManifest {
            spec: crate::vm::VmSpec {
                accel: crate::accel::Accel::Tcg,
                kernel: "/k".into(),
                initramfs: "/i".into(),
                cmdline: "console=ttyS0".into(),
                memory_mib: 512,
                vcpus: 1,
            },
            template: TemplateRef {
                dir: "/templates/base".into(),
                state_sha256: "11".repeat(32),
                created_unix: 1_700_000_000,
            },
            disk: disk.into(),
            state: Some(file("state")),
            memory_diff: Some(file("memory.diff")),
            dirty_pages: 1,
            memory_base: vec![crate::sandbox::MemoryLayer {
                path: "/snapshots/s1/memory.diff".into(),
                bytes: 4096 + 48,
                sha256: "22".repeat(32),
                pages: 1,
            }],
            init: InitConfig {
                access_token: Some("secret".into()),
                ..Default::default()
            },
            paused_unix: 1_700_000_100,
            qemu_version: "QEMU emulator version 8.2.0".into(),
        }
    }

    #[test]
    fn written_records_read_back_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::new(dir.path(), Some(meta("sb-1")));
        assert_eq!(read(dir.path()).unwrap(), None);
        rec.write(Phase::Creating).unwrap();
        let back = read(dir.path()).unwrap().unwrap();
        assert_eq!(
            (back.version, back.meta, back.phase),
            (RECORD_VERSION, Some(meta("sb-1")), Phase::Creating)
        );
        rec.write(Phase::Paused {
            paused: paused_manifest("rootfs.qcow2"),
        })
        .unwrap();
        let mode = std::fs::metadata(dir.path().join(RECORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = read(dir.path()).unwrap().unwrap();
        assert!(matches!(back.phase, Phase::Paused { .. }));
        assert!(!dir.path().join(TMP_FILE).exists());
    }

    #[test]
    fn a_meta_rewrite_keeps_the_latest_phase_and_nothing_follows_retire() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::new(dir.path(), None);
        // Nothing written yet: nothing to rewrite.
        rec.save_meta(meta("sb-2")).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let paused = Phase::Paused {
            paused: paused_manifest("rootfs.qcow2"),
        };
        rec.clone().write(paused.clone()).unwrap();
        let mut later = meta("sb-2");
        later.backstop_unix_ms = 42;
        rec.save_meta(later.clone()).unwrap();
        let back = read(dir.path()).unwrap().unwrap();
        assert_eq!((back.meta, back.phase), (Some(later), paused));
        rec.retire();
        rec.write(Phase::Creating).unwrap();
        std::fs::remove_file(dir.path().join(RECORD_FILE)).unwrap();
        rec.save_meta(meta("sb-2")).unwrap();
        assert!(!dir.path().join(RECORD_FILE).exists());
    }

    #[test]
    fn newer_versions_and_corrupt_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RECORD_FILE);
        std::fs::write(
            &path,
            r#"{"version": 3, "phase": {"state": "hibernating"}}"#,
        )
        .unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(matches!(e, RecordError::Version { found: 3, .. }), "{e:?}");
        assert!(e.to_string().contains("reads version 2"), "{e}");
        std::fs::write(&path, br#"{"version": 2, "phase": {"state": "runn"#).unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(matches!(e, RecordError::Corrupt { .. }), "{e:?}");
        std::fs::write(
            &path,
            br#"{"version": 2, "meta": null, "phase": {"state": "creating"}}"#,
        )
        .unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(matches!(e, RecordError::Corrupt { .. }), "{e:?}");
    }

    #[test]
    fn the_format_is_stable() {
        let record = SandboxRecord {
            version: RECORD_VERSION,
            meta: None,
            phase: Phase::Warm {
                vm: VmProcess {
                    pid: 7,
                    start_time: 8,
                    qmp_socket: "/v/vm/qmp.sock".into(),
                    slot: Some(3),
                },
            },
            updated_unix_ms: 9,
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 2,
                "meta": null,
                "phase": {
                    "state": "warm",
                    "vm": {"pid": 7, "start_time": 8, "qmp_socket": "/v/vm/qmp.sock", "slot": 3}
                },
                "updated_unix_ms": 9
            })
        );
        assert_eq!(
            serde_json::from_value::<SandboxRecord>(json).unwrap(),
            record
        );
    }
}
