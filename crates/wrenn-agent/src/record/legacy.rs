//! Sandbox directories of older agents, which kept up to five files where [`RECORD_FILE`]
//! is now one: `agent-meta.json` (the meta), `running.json` and `wrenn-vm.json` (a running
//! sandbox and its QEMU, or a warm pool VM), `pausing.json` (a complete snapshot whose pause
//! did not finish) and `paused.json` (a paused sandbox). [`migrate`] reads them into a
//! [`SandboxRecord`], writes that (synced) and removes them. Nothing else reads them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{Phase, RECORD_FILE, RECORD_VERSION, RecordError, SandboxRecord, VmProcess};
use crate::runtime::SandboxMeta;
use crate::sandbox::{PausedManifest, RunningManifest};

const META: &str = "agent-meta.json";
const RUNNING: &str = "running.json";
const VM: &str = "wrenn-vm.json";
const PAUSING: &str = "pausing.json";
const PAUSED: &str = "paused.json";
const FILES: [&str; 5] = [META, RUNNING, VM, PAUSING, PAUSED];
/// The only version any of those files was written with.
const OLD_VERSION: u64 = 1;

/// `wrenn-vm.json`, the fields still of use.
#[derive(Debug, Deserialize)]
struct OldVm {
    version: u64,
    slot: Option<u32>,
    qemu_pid: u32,
    qemu_start_time: u64,
    qmp_socket: PathBuf,
    state: String,
}

impl OldVm {
    fn process(&self) -> VmProcess {
        VmProcess {
            pid: self.qemu_pid,
            start_time: self.qemu_start_time,
            qmp_socket: self.qmp_socket.clone(),
            slot: self.slot,
        }
    }
}

/// Converts `dir`'s old files, if it has any (`Ok(None)`: none, so no record at all).
pub(super) fn migrate(dir: &Path) -> Result<Option<SandboxRecord>, RecordError> {
    if !FILES.iter().any(|f| dir.join(f).is_file()) {
        return Ok(None);
    }
    let record = convert(dir)?;
    // Synced whatever the phase: the old files go next, and this is done once.
    super::replace(dir, &record, true)?;
    for f in FILES {
        let _ = std::fs::remove_file(dir.join(f));
    }
    tracing::info!(dir = %dir.display(), phase = record.phase.name(), "older agent's records converted to {RECORD_FILE}");
    Ok(Some(record))
}

fn convert(dir: &Path) -> Result<SandboxRecord, RecordError> {
    // Older agents ignored an unreadable meta file too (the sandbox then had default timers).
    let meta = read::<SandboxMeta>(dir, META).ok().flatten();
    let vm = read::<OldVm>(dir, VM)?;
    if let Some(v) = &vm {
        check_version(dir, VM, v.version)?;
    }
    let running = versioned::<RunningManifest>(dir, RUNNING);
    let phase = if let Some(paused) = versioned::<PausedManifest>(dir, PAUSING)? {
        // Its running record (if still there) names the disk to commit the overlay into.
        let commit_into = running.ok().flatten().and_then(|r| r.commit_into);
        Phase::Pausing {
            paused,
            vm: vm.as_ref().map(OldVm::process),
            commit_into,
        }
    } else if let (Some(running), Some(v)) =
        (running?, vm.as_ref().filter(|v| v.state == "running"))
    {
        // Before a paused.json: a resume that wrote its running records but had not yet
        // removed the paused files.
        Phase::Running {
            vm: v.process(),
            running,
        }
    } else if let Some(paused) = versioned::<PausedManifest>(dir, PAUSED)? {
        Phase::Paused { paused }
    } else if let Some(v) = vm.as_ref().filter(|v| v.state == "warm") {
        Phase::Warm { vm: v.process() }
    } else {
        // A create (or kill) that never finished: garbage, whatever QEMU is left is a stray.
        Phase::Creating
    };
    Ok(SandboxRecord {
        version: RECORD_VERSION,
        meta,
        phase,
        updated_unix_ms: super::now_ms(),
    })
}

fn read<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>, RecordError> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(super::io_err("read", &path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| legacy(dir, format!("{name}: {e}")))
}

/// A manifest with a `version` field of its own (the record's now covers it).
fn versioned<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>, RecordError> {
    let Some(mut value) = read::<serde_json::Value>(dir, name)? else {
        return Ok(None);
    };
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    check_version(dir, name, version.unwrap_or(0))?;
    // The first running.json had no disk field: the disk was always this one.
    if name == RUNNING && value.get("disk").is_none() {
        value["disk"] = "rootfs.qcow2".into();
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| legacy(dir, format!("{name}: {e}")))
}

fn check_version(dir: &Path, name: &str, version: u64) -> Result<(), RecordError> {
    if version == OLD_VERSION {
        Ok(())
    } else {
        Err(legacy(dir, format!("{name} has format version {version}")))
    }
}

fn legacy(dir: &Path, reason: String) -> RecordError {
    RecordError::Legacy {
        dir: dir.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::super::read as read_record;
    use super::*;

    // Literal files as older agents wrote them.
    const OLD_META: &str = r#"{
  "sandbox_id": "sb-old",
  "template_id": "base",
  "vcpus": 1,
  "memory_mb": 512,
  "start_unix_ms": 1700000000000,
  "backstop_unix_ms": 1700000600000,
  "auto_pause": true,
  "envd_version": "0.1.0"
}"#;
    const OLD_PAUSED: &str = r#"{
  "version": 1,
  "spec": {
    "accel": "tcg",
    "kernel": "/var/lib/wrenn/images/vmlinuz",
    "initramfs": "/var/lib/wrenn/images/initramfs.img",
    "cmdline": "console=ttyS0 quiet panic=-1",
    "memory_mib": 512,
    "vcpus": 1
  },
  "template": {
    "dir": "/var/lib/wrenn/templates/base",
    "state_sha256": "aa11",
    "created_unix": 1700000000
  },
  "disk": "rootfs-1700000050000.qcow2",
  "state": { "file": "state", "bytes": 123, "sha256": "bb22" },
  "memory_diff": { "file": "memory.diff", "bytes": 4096, "sha256": "cc33" },
  "dirty_pages": 1,
  "init": {
    "env_vars": { "A": "1" },
    "access_token": "tok",
    "default_user": null,
    "default_workdir": null
  },
  "paused_unix": 1700000100,
  "qemu_version": "QEMU emulator version 8.2.0"
}"#;
    const OLD_RUNNING: &str = r#"{
  "version": 1,
  "spec": {
    "accel": "tcg",
    "kernel": "/var/lib/wrenn/images/vmlinuz",
    "initramfs": "/var/lib/wrenn/images/initramfs.img",
    "cmdline": "console=ttyS0 quiet panic=-1",
    "memory_mib": 512,
    "vcpus": 1
  },
  "template": {
    "dir": "/var/lib/wrenn/templates/base",
    "state_sha256": "aa11",
    "created_unix": 1700000000
  },
  "memory": "/var/lib/wrenn/templates/base/memory",
  "init": { "env_vars": {}, "access_token": "tok", "default_user": null, "default_workdir": null },
  "disk": "rootfs-1700000050000.qcow2",
  "commit_into": "rootfs.qcow2"
}"#;
    const OLD_VM_RUNNING: &str = r#"{
  "version": 1,
  "sandbox_id": null,
  "template_id": "/var/lib/wrenn/templates/base",
  "slot": 12,
  "qemu_pid": 4242,
  "qemu_start_time": 987654,
  "qmp_socket": "/var/lib/wrenn/sandboxes/sb-old/vm/qmp.sock",
  "state": "running",
  "snapshot": null,
  "updated_unix": 1700000060
}"#;
    const OLD_VM_WARM: &str = r#"{
  "version": 1,
  "sandbox_id": null,
  "template_id": "base",
  "slot": 5,
  "qemu_pid": 4343,
  "qemu_start_time": 111,
  "qmp_socket": "/var/lib/wrenn/sandboxes/warm-1-0/vm/qmp.sock",
  "state": "warm",
  "snapshot": null,
  "updated_unix": 1700000070
}"#;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    /// Reads `files` as a directory, checks the old files are gone and the record is there.
    fn converted(files: &[(&str, &str)]) -> SandboxRecord {
        let dir = dir_with(files);
        let record = read_record(dir.path()).unwrap().expect("a record");
        for f in FILES {
            assert!(!dir.path().join(f).exists(), "{f} left");
        }
        assert_eq!(read_record(dir.path()).unwrap().as_ref(), Some(&record));
        record
    }

    #[test]
    fn paused() {
        let r = converted(&[(PAUSED, OLD_PAUSED), (META, OLD_META)]);
        let meta = r.meta.expect("meta");
        assert_eq!(
            (meta.sandbox_id.as_str(), meta.auto_pause),
            ("sb-old", true)
        );
        let Phase::Paused { paused } = r.phase else {
            panic!("{:?}", r.phase)
        };
        assert_eq!(paused.disk, "rootfs-1700000050000.qcow2");
        assert_eq!(paused.init.access_token.as_deref(), Some("tok"));
        assert_eq!(paused.memory_diff.as_ref().unwrap().bytes, 4096);
    }

    #[test]
    fn running() {
        let r = converted(&[
            (RUNNING, OLD_RUNNING),
            (VM, OLD_VM_RUNNING),
            (META, OLD_META),
        ]);
        assert_eq!(r.meta.unwrap().sandbox_id, "sb-old");
        let Phase::Running { vm, running } = r.phase else {
            panic!("{:?}", r.phase)
        };
        assert_eq!((vm.pid, vm.start_time, vm.slot), (4242, 987654, Some(12)));
        assert_eq!(vm.dir(), Path::new("/var/lib/wrenn/sandboxes/sb-old/vm"));
        assert_eq!(running.commit_into.as_deref(), Some("rootfs.qcow2"));
    }

    #[test]
    fn a_resume_that_had_not_removed_the_paused_files_is_running() {
        let r = converted(&[
            (PAUSED, OLD_PAUSED),
            (RUNNING, OLD_RUNNING),
            (VM, OLD_VM_RUNNING),
        ]);
        assert!(matches!(r.phase, Phase::Running { .. }), "{:?}", r.phase);
        assert_eq!(r.meta, None);
    }

    #[test]
    fn the_first_running_json_had_no_disk() {
        let first = r#"{
  "version": 1,
  "spec": { "accel": "kvm", "kernel": "/k", "initramfs": "/i", "cmdline": "", "memory_mib": 256, "vcpus": 2 },
  "template": { "dir": "/t", "state_sha256": "aa11", "created_unix": 1 },
  "memory": "/t/memory",
  "init": { "env_vars": {}, "access_token": null, "default_user": null, "default_workdir": null }
}"#;
        let r = converted(&[(RUNNING, first), (VM, OLD_VM_RUNNING)]);
        let Phase::Running { running, .. } = r.phase else {
            panic!("{:?}", r.phase)
        };
        assert_eq!(
            (running.disk.as_str(), running.commit_into),
            ("rootfs.qcow2", None)
        );
    }

    #[test]
    fn pausing() {
        let r = converted(&[
            (PAUSING, OLD_PAUSED),
            (RUNNING, OLD_RUNNING),
            (VM, OLD_VM_RUNNING),
            (META, OLD_META),
        ]);
        let Phase::Pausing {
            paused,
            vm,
            commit_into,
        } = r.phase
        else {
            panic!("{:?}", r.phase)
        };
        assert_eq!(paused.dirty_pages, 1);
        assert_eq!(vm.map(|v| v.pid), Some(4242));
        assert_eq!(commit_into.as_deref(), Some("rootfs.qcow2"));
    }

    #[test]
    fn warm() {
        let r = converted(&[(VM, OLD_VM_WARM)]);
        assert_eq!(r.meta, None);
        assert!(
            matches!(
                r.phase,
                Phase::Warm {
                    vm: VmProcess {
                        pid: 4343,
                        slot: Some(5),
                        ..
                    }
                }
            ),
            "{:?}",
            r.phase
        );
    }

    #[test]
    fn an_unfinished_create_and_no_files_at_all() {
        let r = converted(&[(META, OLD_META)]);
        assert_eq!(r.phase, Phase::Creating);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(read_record(empty.path()).unwrap(), None);
    }

    #[test]
    fn unknown_old_versions_are_refused_and_kept() {
        let newer = OLD_PAUSED.replace(r#""version": 1"#, r#""version": 7"#);
        let dir = dir_with(&[(PAUSED, &newer), (META, OLD_META)]);
        let e = read_record(dir.path()).unwrap_err();
        assert!(matches!(e, RecordError::Legacy { .. }), "{e:?}");
        assert!(e.to_string().contains("format version 7"), "{e}");
        assert!(dir.path().join(PAUSED).is_file());
        assert!(!dir.path().join(RECORD_FILE).exists());
    }
}
