//! Filesystem-only pauses and cold boots against real QEMU guests: a sandbox paused keeping
//! only its disk writes no device state or memory, and its resume boots the disk (a new
//! kernel boot: new boot ID, the disk's files kept, processes and memory gone, the template's
//! start command running again); a full pause of the cold-booted guest resumes with its
//! memory (its RAM is still a private mapping of the template's file); a fully paused
//! sandbox asked to reboot boots cold; a snapshot of a filesystem-only pause starts sandboxes
//! by a cold boot.
//!
//! Gated by `WRENN_VM_TESTS=1`. Slot indices 5520..5570 are this test's own.

mod support;

use support::{qemu_pids_under, run_ok_with, secured_create, vm_agent, with_token as opts};
use wrenn_agent::controller::Phase;
use wrenn_agent::runtime::{GuestInit, PauseMode};
use wrenn_agent::sandbox::PausedSandbox;
use wrenn_agent::snapshot::Snapshot;

const TEMPLATE: &str = "small";
const BOOT_ID: &str = "cat /proc/sys/kernel/random/boot_id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_pauses_boot_the_disk_cold() {
    if !support::enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=debug");
    let first = 5_520 + (std::process::id() % 3) * 16;
    let work = support::work_dir("wrenn-agent-coldboot");
    let w = work.path().to_owned();
    let built = support::build_template(&w.join("images"), &w.join("template"), &w).await;
    // A start command, as a built template records it: started again after every cold boot.
    std::fs::write(
        built.dir.join("defaults.json"),
        serde_json::json!({
            "user": "root",
            "start_cmd": "echo started >> /tmp/started; exec sleep 100000",
            "ready_cmd": "test -s /tmp/started",
        })
        .to_string(),
    )
    .unwrap();
    let template = Snapshot::open(&built.dir).expect("open template");
    let sandboxes = w.join("sandboxes");
    std::fs::create_dir_all(&sandboxes).unwrap();
    let a = vm_agent(first, 4, &sandboxes, TEMPLATE, &template).await;
    let ctl = a.controller();

    ctl.create(secured_create("a", TEMPLATE, "t-a", None))
        .await
        .expect("create");
    let url = || a.envd_base_url("a").unwrap();
    run_ok_with(
        &url(),
        opts("t-a"),
        "echo on-disk > /root/f && echo in-memory > /tmp/mem && sync",
    )
    .await;
    let boot0 = run_ok_with(&url(), opts("t-a"), BOOT_ID).await;

    // Filesystem-only: no device state or memory written.
    ctl.pause_as("a", PauseMode::Filesystem)
        .await
        .expect("filesystem pause");
    assert_eq!(ctl.get("a").unwrap().phase, Phase::Paused);
    let dir = sandboxes.join("a");
    let paused = PausedSandbox::open(&dir).expect("paused record");
    assert!(paused.manifest().memory().is_none(), "no memory recorded");
    assert!(paused.boots_cold());
    for f in ["state", "memory.diff"] {
        assert!(!dir.join(f).exists(), "{f} written by a filesystem pause");
    }

    // Its resume is a boot: the disk's files, not the memory; the start command again.
    ctl.resume("a", GuestInit::default(), 0)
        .await
        .expect("resume by a cold boot");
    let boot1 = run_ok_with(&url(), opts("t-a"), BOOT_ID).await;
    assert_ne!(boot0, boot1, "a cold boot is a new kernel boot");
    assert_eq!(
        run_ok_with(&url(), opts("t-a"), "cat /root/f").await,
        "on-disk"
    );
    assert_eq!(
        run_ok_with(
            &url(),
            opts("t-a"),
            "test -e /tmp/mem && echo kept || echo gone"
        )
        .await,
        "gone"
    );
    assert_eq!(
        run_ok_with(&url(), opts("t-a"), "cat /tmp/started").await,
        "started"
    );

    // A full pause of the cold-booted guest keeps its memory and its boot.
    run_ok_with(&url(), opts("t-a"), "echo again > /tmp/mem2").await;
    ctl.pause("a").await.expect("full pause");
    ctl.resume("a", GuestInit::default(), 0)
        .await
        .expect("resume with memory");
    assert_eq!(run_ok_with(&url(), opts("t-a"), BOOT_ID).await, boot1);
    assert_eq!(
        run_ok_with(&url(), opts("t-a"), "cat /tmp/mem2").await,
        "again"
    );

    // A full pause resumed with `reboot`: cold, memory gone, disk kept.
    ctl.pause("a").await.expect("full pause");
    let reboot = GuestInit {
        reboot: true,
        ..Default::default()
    };
    ctl.resume("a", reboot, 0)
        .await
        .expect("resume by a reboot");
    let boot2 = run_ok_with(&url(), opts("t-a"), BOOT_ID).await;
    assert_ne!(boot2, boot1);
    assert_eq!(
        run_ok_with(
            &url(),
            opts("t-a"),
            "test -e /tmp/mem2 && echo kept || echo gone"
        )
        .await,
        "gone"
    );
    assert_eq!(
        run_ok_with(&url(), opts("t-a"), "cat /root/f").await,
        "on-disk"
    );

    // A snapshot of a filesystem-only pause: sandboxes from it boot its disk.
    run_ok_with(
        &url(),
        opts("t-a"),
        "echo for-the-snapshot > /root/g && sync",
    )
    .await;
    ctl.pause_as("a", PauseMode::Filesystem)
        .await
        .expect("filesystem pause");
    let taken = ctl.snapshot("a", "fs1").await.expect("snapshot");
    assert_eq!(taken.snapshot.memory_bytes, 0);
    ctl.create(secured_create("b", TEMPLATE, "t-b", Some("fs1")))
        .await
        .expect("create from a filesystem snapshot");
    let b = a.envd_base_url("b").unwrap();
    assert_eq!(
        run_ok_with(&b, opts("t-b"), "cat /root/f /root/g").await,
        "on-disk\nfor-the-snapshot"
    );
    assert_ne!(run_ok_with(&b, opts("t-b"), BOOT_ID).await, boot2);

    for id in ["a", "b"] {
        ctl.kill(id).await.unwrap();
    }
    a.shutdown().await;
    assert!(qemu_pids_under(&w).is_empty(), "QEMU left under {w:?}");
}
