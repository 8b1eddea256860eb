//! Unit tests of the scan: every record phase, unreadable records and old agents' files, in
//! temporary directories and without QEMU (a live "QEMU" is this test process itself).

use super::*;
use crate::record::tests::{meta, paused_manifest};
use crate::record::{RECORD_FILE, Recorder};
use crate::sandbox::{InitConfig, PausedSandbox, RunningManifest};

/// A pid that is not running.
const GONE: u32 = u32::MAX - 1;

/// No slot namespaces or veths of the machine are considered.
fn no_slots() -> ScanScope {
    ScanScope {
        in_use: Vec::new(),
        slots: 0..0,
    }
}

fn vm(pid: u32, start_time: u64, dir: &Path) -> VmProcess {
    VmProcess {
        pid,
        start_time,
        qmp_socket: dir.join("vm/qmp.sock"),
        slot: Some(1),
    }
}

fn running_manifest() -> RunningManifest {
    let p = paused_manifest("rootfs.qcow2");
    RunningManifest {
        spec: p.spec,
        template: p.template,
        memory: "/templates/base/memory".into(),
        memory_base: p.memory_base,
        init: InitConfig::default(),
        disk: "rootfs.qcow2".into(),
        commit_into: None,
    }
}

/// Makes `root/name` with `phase` recorded (and the files named in `files`).
fn sandbox(root: &Path, name: &str, phase: Option<Phase>, files: &[&str]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in files {
        std::fs::write(dir.join(f), b"x").unwrap();
    }
    if let Some(phase) = phase {
        Recorder::new(&dir, Some(meta(name))).write(phase).unwrap();
    }
    dir
}

fn dirs<'a>(it: impl Iterator<Item = &'a PathBuf>) -> Vec<String> {
    let mut names: Vec<String> = it
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn every_phase_is_sorted_and_only_garbage_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    sandbox(root, "empty", None, &[]);
    let warm = root.join("warm");
    sandbox(
        root,
        "warm",
        Some(Phase::Warm {
            vm: vm(GONE, 1, &warm),
        }),
        &[],
    );
    sandbox(root, "creating", Some(Phase::Creating), &["rootfs.qcow2"]);
    let gone = Phase::Running {
        vm: vm(GONE, 1, root),
        running: running_manifest(),
    };
    sandbox(root, "running-gone", Some(gone), &["rootfs.qcow2"]);
    let paused = Phase::Paused {
        paused: paused_manifest("rootfs.qcow2"),
    };
    let snapshot = ["rootfs.qcow2", "state", "memory.diff"];
    sandbox(root, "paused", Some(paused), &snapshot);
    let pausing = Phase::Pausing {
        paused: paused_manifest("rootfs.qcow2"),
        vm: Some(vm(GONE, 1, root)),
        commit_into: None,
    };
    sandbox(root, "pausing", Some(pausing), &snapshot);
    let resuming = Phase::Resuming {
        paused: paused_manifest("rootfs.qcow2"),
        vm: None,
    };
    let resuming_dir = sandbox(root, "resuming", Some(resuming), &snapshot);
    std::fs::write(resuming_dir.join("rootfs-17.qcow2"), b"overlay").unwrap();
    // Records this agent cannot read.
    let newer = sandbox(root, "newer", None, &[]);
    std::fs::write(
        newer.join(RECORD_FILE),
        r#"{"version": 3, "phase": {"state": "hibernating"}}"#,
    )
    .unwrap();
    let corrupt = sandbox(root, "corrupt-with-snapshot", None, &snapshot);
    std::fs::write(corrupt.join(RECORD_FILE), r#"{"version": 2, "phase"#).unwrap();
    let empty_corrupt = sandbox(root, "corrupt-alone", None, &["rootfs.qcow2"]);
    std::fs::write(empty_corrupt.join(RECORD_FILE), b"").unwrap();

    let mut found = scan(root, &no_slots()).await;
    assert!(found.adoptable.is_empty());
    assert_eq!(
        dirs(found.paused.iter().map(|p| &p.dir)),
        ["paused", "pausing", "resuming"]
    );
    assert_eq!(
        dirs(found.garbage.iter().map(|g| &g.dir)),
        ["corrupt-alone", "creating", "empty", "running-gone", "warm"]
    );
    assert_eq!(
        dirs(found.kept.iter().map(|k| &k.dir)),
        ["corrupt-with-snapshot", "newer"]
    );
    let reason = |name: &str| {
        let k = found.kept.iter().find(|k| k.dir.ends_with(name)).unwrap();
        k.reason.clone()
    };
    assert!(
        reason("newer").contains("format version 3"),
        "{}",
        reason("newer")
    );
    assert!(reason("corrupt-with-snapshot").contains("corrupt"));
    assert!(found.stray_qemu.is_empty());

    // The interrupted pause and resume are paused now, on disk too.
    for name in ["pausing", "resuming"] {
        let p = PausedSandbox::open(&root.join(name)).unwrap();
        assert_eq!(p.meta(), Some(meta(name)));
    }
    assert!(!resuming_dir.join("rootfs-17.qcow2").exists());

    let cleaned = found.clean().await;
    assert!(cleaned.killed.is_empty());
    assert_eq!(cleaned.dirs.len(), 5);
    let again = scan(root, &no_slots()).await;
    assert_eq!(again.paused.len(), 3);
    assert_eq!(again.kept.len(), 2);
    assert!(again.garbage.is_empty(), "{:?}", again.garbage);
    // Left alone means untouched.
    assert!(
        std::fs::read_to_string(newer.join(RECORD_FILE))
            .unwrap()
            .contains("hibernating")
    );
}

#[tokio::test]
async fn a_live_qemu_that_does_not_answer_is_garbage_and_a_recycled_pid_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // This process stands in for QEMU: alive, with no QMP socket. (Never cleaned: that would
    // kill the test.)
    let me = std::process::id();
    let start = process_start_time(me).unwrap();
    let mute = Phase::Running {
        vm: vm(me, start, &root.join("mute")),
        running: running_manifest(),
    };
    sandbox(root, "mute", Some(mute), &[]);
    let reused = Phase::Running {
        vm: vm(me, start + 1, &root.join("reused")),
        running: running_manifest(),
    };
    sandbox(root, "reused", Some(reused), &[]);
    let found = scan(root, &no_slots()).await;
    assert!(found.adoptable.is_empty());
    let g = |name: &str| {
        found
            .garbage
            .iter()
            .find(|g| g.dir.ends_with(name))
            .unwrap()
    };
    assert!(g("mute").reason.contains("QMP"), "{}", g("mute").reason);
    assert_eq!(g("mute").vm.as_ref().map(|v| v.pid), Some(me));
    assert!(
        g("reused").reason.contains("gone"),
        "{}",
        g("reused").reason
    );
    assert!(g("reused").vm.is_none());
}

#[tokio::test]
async fn an_older_agents_paused_sandbox_is_converted_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sb-old");
    std::fs::create_dir_all(&dir).unwrap();
    let mut old = serde_json::to_value(paused_manifest("rootfs.qcow2")).unwrap();
    old["version"] = 1.into();
    std::fs::write(dir.join("paused.json"), old.to_string()).unwrap();
    std::fs::write(
        dir.join("agent-meta.json"),
        serde_json::to_vec(&meta("sb-old")).unwrap(),
    )
    .unwrap();
    let found = scan(tmp.path(), &no_slots()).await;
    assert_eq!(found.paused.len(), 1, "{found:?}");
    assert!(!dir.join("paused.json").exists() && dir.join(RECORD_FILE).is_file());
    let p = PausedSandbox::open(&dir).unwrap();
    assert_eq!(p.meta(), Some(meta("sb-old")));
}

#[test]
fn start_time_of_self_and_not_of_nothing() {
    let me = std::process::id();
    let t = process_start_time(me).expect("own start time");
    assert_eq!(process_start_time(me), Some(t));
    assert_eq!(process_start_time(GONE), None);
}

#[test]
fn one_owner_per_root() {
    let dir = tempfile::tempdir().unwrap();
    let first = OwnerLock::try_acquire(dir.path()).unwrap();
    assert!(first.is_some());
    assert!(OwnerLock::try_acquire(dir.path()).unwrap().is_none());
    drop(first);
    assert!(OwnerLock::try_acquire(dir.path()).unwrap().is_some());
}

#[test]
fn slot_names() {
    assert_eq!(slot_index("wrenn-slot-12", NETNS_PREFIX), Some(12));
    assert_eq!(slot_index("wrenn-slot-", NETNS_PREFIX), None);
    assert_eq!(slot_index("wrenn-slot-1x", NETNS_PREFIX), None);
    assert_eq!(slot_index("wrv7", HOST_VETH_PREFIX), Some(7));
    assert_eq!(slot_index("wrvx", HOST_VETH_PREFIX), None);
}
