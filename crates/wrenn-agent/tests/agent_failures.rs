//! Failures that must lose nothing, against real QEMU guests:
//! - a resume whose `/init` is refused (401: a new token without the current one) and a resume
//!   whose envd does not answer in time (a restarted agent with a 1 ms health deadline) each
//!   leave the sandbox paused with its disk overlay, device state and memory diff byte for byte
//!   unchanged, its record paused with the same manifest, and no run overlay or QEMU left; a
//!   later resume succeeds with the guest's file intact;
//! - a pause onto a full filesystem (a small loop-mounted ext4 made here) fails with a clear
//!   error before the guest stops, and the sandbox keeps running; with room again it pauses
//!   and resumes.
//!
//! Gated by `WRENN_VM_TESTS=1`. Slot indices 3600..4000 are this test's own.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{RunOpts, files_under, qemu_pids_under, run_ok_with};
use wrenn_agent::Agent;
use wrenn_agent::controller::{ControlError, CreateArgs, Phase};
use wrenn_agent::pool::SlotPool;
use wrenn_agent::record::RECORD_FILE;
use wrenn_agent::runtime::{GuestInit, RuntimeError};
use wrenn_agent::sandbox::Deadlines;
use wrenn_agent::snapshot::Snapshot;
use wrenn_agent::state::PausedVm;

const TEMPLATE: &str = "small";
const TOKEN: &str = "token-of-the-sandbox";

fn deadlines(health: Duration) -> Deadlines {
    Deadlines {
        health,
        init: Duration::from_secs(30),
        prepare: Duration::from_secs(30),
        boot: Duration::from_secs(180),
    }
}

async fn agent(first: u32, root: &Path, template: &Snapshot, health: Duration) -> Agent {
    let slots = SlotPool::new(2, first, 4).await.expect("slot pool");
    let a = Agent::new("test-host", slots, root.to_owned(), 4, deadlines(health));
    a.register_template(TEMPLATE, template.clone(), None, "test-envd");
    a
}

fn create_args(id: &str) -> CreateArgs {
    CreateArgs {
        sandbox_id: id.into(),
        template_id: TEMPLATE.into(),
        init: GuestInit {
            access_token: Some(TOKEN.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn opts() -> RunOpts<'static> {
    RunOpts {
        token: Some(TOKEN),
        ..Default::default()
    }
}

/// SHA-256 of every file in a paused sandbox's directory, by name; for the record, its phase
/// (a failed resume records it paused again, with a new time).
fn hashes(dir: &Path) -> Vec<(String, String)> {
    use sha2::Digest as _;
    let mut out: Vec<(String, String)> = files_under(dir)
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            let bytes = std::fs::read(&p).unwrap();
            if name == RECORD_FILE {
                let record: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                return (name, record["phase"].to_string());
            }
            (name, hex::encode(sha2::Sha256::digest(bytes)))
        })
        .collect();
    out.sort();
    out
}

async fn assert_still_paused(agent: &Agent, dir: &Path, before: &[(String, String)]) {
    let s = agent.controller().get("sb-r").expect("still known");
    assert_eq!(s.phase, Phase::Paused);
    assert_eq!(s.busy, None);
    assert_eq!(hashes(dir), before, "paused files changed");
    assert!(qemu_pids_under(dir).is_empty(), "QEMU left running");
}

/// A loop-mounted ext4 of `mib` MiB, unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
}

impl SmallFs {
    fn new(work: &Path, mib: u32) -> Self {
        let img = work.join("small.img");
        let mnt = work.join("small");
        std::fs::create_dir_all(&mnt).unwrap();
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("truncate")
            .args(["-s", &format!("{mib}M")])
            .arg(&img));
        ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Self { mnt }
    }

    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        s.blocks_available() * s.fragment_size()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_resumes_and_full_disks_lose_nothing() {
    if !support::enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=debug");
    let first = 3_600 + (std::process::id() % 25) * 16;
    let work = support::work_dir("wrenn-agent-failures");
    let w = work.path().to_owned();
    let built = support::build_template(&w.join("images"), &w.join("template"), &w).await;
    let template = Snapshot::open(&built.dir).expect("open template");
    let sandboxes = w.join("sandboxes");
    std::fs::create_dir_all(&sandboxes).unwrap();

    failed_resumes(first, &sandboxes, &template).await;
    full_disk(first + 12, &w, &template).await;

    assert!(qemu_pids_under(&w).is_empty(), "QEMU left under {w:?}");
}

async fn failed_resumes(first: u32, sandboxes: &Path, template: &Snapshot) {
    let a = agent(first, sandboxes, template, Duration::from_secs(60)).await;
    let ctl = a.controller();
    ctl.create(create_args("sb-r")).await.expect("create");
    let base = a.envd_base_url("sb-r").unwrap();
    // The guest cuts itself off from its metadata endpoint, so on resume its envd knows only
    // the token hash published at create (of no token) and refuses any other token: a resume
    // that fails at `/init`, after the guest runs again.
    run_ok_with(
        &base,
        opts(),
        "echo kept > /root/f && sync && busybox ip route add blackhole 169.254.169.254/32",
    )
    .await;
    ctl.pause("sb-r").await.expect("pause");
    let dir = sandboxes.join("sb-r");
    let before = hashes(&dir);
    assert!(
        before.iter().any(|(n, _)| n == "rootfs.qcow2"),
        "{before:?}"
    );
    assert!(
        before
            .iter()
            .any(|(n, phase)| n == RECORD_FILE && phase.contains(r#""state":"paused""#)),
        "{before:?}"
    );

    // `/init` refuses a token whose hash it was never shown.
    let init = GuestInit {
        access_token: Some("some-other-token".into()),
        ..Default::default()
    };
    let err = ctl
        .resume("sb-r", init, 0)
        .await
        .expect_err("resume must fail");
    let msg = wrenn_agent::error_chain(&err);
    assert!(matches!(err, ControlError::Runtime { .. }), "{msg}");
    assert!(msg.contains("init"), "{msg}");
    assert_still_paused(&a, &dir, &before).await;

    // A restarted agent whose envd deadline passes before the guest answers.
    a.suspend().await;
    drop(a);
    let found = [PausedVm { dir: dir.clone() }];
    let slow = agent(first + 4, sandboxes, template, Duration::from_millis(1)).await;
    assert_eq!(slow.load_paused(&found), vec!["sb-r".to_owned()]);
    let err = slow
        .controller()
        .resume("sb-r", GuestInit::default(), 0)
        .await
        .expect_err("resume must miss its deadline");
    let msg = wrenn_agent::error_chain(&err);
    assert!(msg.contains("health"), "{msg}");
    assert_still_paused(&slow, &dir, &before).await;
    slow.suspend().await;
    drop(slow);

    // And a later resume works, with the guest's file.
    let a = agent(first + 8, sandboxes, template, Duration::from_secs(60)).await;
    assert_eq!(a.load_paused(&found), vec!["sb-r".to_owned()]);
    a.controller()
        .resume("sb-r", GuestInit::default(), 0)
        .await
        .expect("resume");
    let base = a.envd_base_url("sb-r").unwrap();
    assert_eq!(run_ok_with(&base, opts(), "cat /root/f").await, "kept");
    a.controller().kill("sb-r").await.unwrap();
    assert!(!dir.exists(), "kill left {dir:?}");
    a.shutdown().await;
}

async fn full_disk(first: u32, work: &Path, template: &Snapshot) {
    let fs = SmallFs::new(work, 320);
    let root = fs.mnt.join("sandboxes");
    std::fs::create_dir_all(&root).unwrap();
    let a = agent(first, &root, template, Duration::from_secs(60)).await;
    let ctl = a.controller();
    ctl.create(create_args("sb-d")).await.expect("create");
    let base = a.envd_base_url("sb-d").unwrap();
    run_ok_with(&base, opts(), "echo alive > /root/f").await;

    // Leave a few MiB: far less than the guest's changed memory.
    let filler = fs.mnt.join("filler");
    let fill = fs.free().saturating_sub(4 << 20);
    let ok = Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&filler)
        .status()
        .unwrap();
    assert!(ok.success());
    let err = ctl.pause("sb-d").await.expect_err("pause onto a full disk");
    let msg = wrenn_agent::error_chain(&err);
    assert!(
        matches!(
            err,
            ControlError::Runtime {
                source: RuntimeError::NoSpace { .. },
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("not enough free space"), "{msg}");
    assert_eq!(ctl.get("sb-d").unwrap().phase, Phase::Running);
    assert_eq!(run_ok_with(&base, opts(), "cat /root/f").await, "alive");

    // With room again it pauses and resumes.
    std::fs::remove_file(&filler).unwrap();
    ctl.pause("sb-d").await.expect("pause with room");
    ctl.resume("sb-d", GuestInit::default(), 0)
        .await
        .expect("resume");
    let base = a.envd_base_url("sb-d").unwrap();
    assert_eq!(run_ok_with(&base, opts(), "cat /root/f").await, "alive");
    ctl.kill("sb-d").await.unwrap();
    a.shutdown().await;
    drop(fs);
}
