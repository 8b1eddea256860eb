//! Snapshots against real QEMU guests: a running sandbox captured (and running again with its
//! state), two sandboxes started from the capture, each with the source's file and memory, their
//! own tokens and kernel RNG, and changes invisible to each other; a paused sandbox captured
//! and still paused; a resumed one captured in place (its run overlay and paused disk as one
//! layer); a snapshot outliving its source; a deleted snapshot kept while sandboxes
//! are layered on it, and removed once they are gone.
//!
//! Gated by `WRENN_VM_TESTS=1`. Slot indices 5440..5500 are this test's own.

mod support;

use std::time::Duration;

use support::{qemu_pids_under, run_ok_with, secured_create, vm_agent, with_token as opts};
use wrenn_agent::controller::Phase;
use wrenn_agent::runtime::GuestInit;
use wrenn_agent::snapshot::Snapshot;

const TEMPLATE: &str = "small";

/// Sixteen random bytes from the guest's kernel RNG, as hex.
const RNG: &str = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_copy_running_and_paused_sandboxes() {
    if !support::enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=debug");
    let first = 5_440 + (std::process::id() % 3) * 16;
    let work = support::work_dir("wrenn-agent-snapshots");
    let w = work.path().to_owned();
    let built = support::build_template(&w.join("images"), &w.join("template"), &w).await;
    let template = Snapshot::open(&built.dir).expect("open template");
    let sandboxes = w.join("sandboxes");
    std::fs::create_dir_all(&sandboxes).unwrap();
    let a = vm_agent(first, 6, &sandboxes, TEMPLATE, &template).await;
    let ctl = a.controller();
    let snaps = w.join("snapshots");

    ctl.create(secured_create("src", TEMPLATE, "t-src", None))
        .await
        .expect("create");
    let src = a.envd_base_url("src").unwrap();
    // A value only the guest's memory holds (tmpfs), and one on its disk.
    run_ok_with(
        &src,
        opts("t-src"),
        "echo on-disk > /root/f && sync && head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /tmp/mem",
    )
    .await;
    let secret = run_ok_with(&src, opts("t-src"), "cat /tmp/mem").await;

    let c = ctl.snapshot("src", "s1").await.expect("snapshot");
    let s1_memory = c.snapshot.memory_bytes;
    eprintln!(
        "snapshot of a running sandbox: stopped {:?}, disk {} B, memory {} B",
        c.paused_for, c.snapshot.disk_bytes, c.snapshot.memory_bytes
    );
    assert_eq!(c.snapshot.template_id, TEMPLATE);
    assert!(c.paused_for > Duration::ZERO);
    assert_eq!(ctl.get("src").unwrap().phase, Phase::Running);
    let src = a.envd_base_url("src").unwrap();
    assert_eq!(
        run_ok_with(&src, opts("t-src"), "cat /tmp/mem").await,
        secret
    );

    // Two sandboxes from it: the source's state, their own tokens, RNGs and changes.
    let mut rng = vec![run_ok_with(&src, opts("t-src"), RNG).await];
    for (id, token) in [("c1", "t-c1"), ("c2", "t-c2")] {
        let (st, _) = ctl
            .create(secured_create(id, TEMPLATE, token, Some("s1")))
            .await
            .expect("create from the snapshot");
        assert_eq!(st.meta.template_id, TEMPLATE);
        let base = a.envd_base_url(id).unwrap();
        assert_eq!(
            run_ok_with(&base, opts(token), "cat /root/f").await,
            "on-disk"
        );
        assert_eq!(
            run_ok_with(&base, opts(token), "cat /tmp/mem").await,
            secret
        );
        rng.push(run_ok_with(&base, opts(token), RNG).await);
    }
    rng.sort();
    rng.dedup();
    assert_eq!(rng.len(), 3, "every copy draws its own randomness: {rng:?}");
    let c1 = a.envd_base_url("c1").unwrap();
    let c2 = a.envd_base_url("c2").unwrap();
    run_ok_with(&c1, opts("t-c1"), "echo c1 > /root/f && sync").await;
    assert_eq!(
        run_ok_with(&c2, opts("t-c2"), "cat /root/f").await,
        "on-disk"
    );
    assert_eq!(
        run_ok_with(&src, opts("t-src"), "cat /root/f").await,
        "on-disk"
    );
    // A snapshot of a copy stores only the pages that changed since s1 (s1's are its base),
    // and a sandbox from it has both.
    let cc = ctl.snapshot("c1", "s1c").await.expect("snapshot of a copy");
    eprintln!(
        "snapshot of a copy: memory {} B (s1: {s1_memory} B), disk {} B",
        cc.snapshot.memory_bytes, cc.snapshot.disk_bytes
    );
    assert!(
        cc.snapshot.memory_bytes * 2 < s1_memory,
        "a copy's snapshot stores {} B of memory, its base s1 {s1_memory} B",
        cc.snapshot.memory_bytes
    );
    ctl.create(secured_create("c6", TEMPLATE, "t-c6", Some("s1c")))
        .await
        .expect("create from the copy's snapshot");
    let c6 = a.envd_base_url("c6").unwrap();
    assert_eq!(run_ok_with(&c6, opts("t-c6"), "cat /root/f").await, "c1");
    assert_eq!(run_ok_with(&c6, opts("t-c6"), "cat /tmp/mem").await, secret);
    ctl.kill("c6").await.unwrap();
    // A copy paused and resumed: its diff over s1, then s1, give its memory back.
    run_ok_with(&c2, opts("t-c2"), "echo c2-mem > /tmp/c2").await;
    ctl.pause("c2").await.expect("pause a copy");
    ctl.resume("c2", GuestInit::default(), 0)
        .await
        .expect("resume a copy");
    let c2 = a.envd_base_url("c2").unwrap();
    assert_eq!(
        run_ok_with(&c2, opts("t-c2"), "cat /tmp/mem /tmp/c2").await,
        format!("{secret}c2-mem")
    );

    // A copy's token is its own: the source's is refused there.
    let refused = reqwest::Client::new()
        .post(format!("{c1}/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("x-access-token", "t-src")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // A paused source: captured, still paused; the snapshot outlives it.
    ctl.pause("src").await.expect("pause");
    let c = ctl
        .snapshot("src", "s2")
        .await
        .expect("snapshot of a paused sandbox");
    assert_eq!(c.paused_for, Duration::ZERO);
    assert_eq!(ctl.get("src").unwrap().phase, Phase::Paused);
    // Resumed (its disk a run overlay on the paused disk), then captured in place: the
    // snapshot's one layer holds both.
    ctl.resume("src", GuestInit::default(), 0)
        .await
        .expect("resume");
    let src = a.envd_base_url("src").unwrap();
    run_ok_with(&src, opts("t-src"), "echo after-resume > /root/g && sync").await;
    ctl.snapshot("src", "s3")
        .await
        .expect("snapshot of a resumed sandbox");
    ctl.kill("src").await.unwrap();
    ctl.create(secured_create("c5", TEMPLATE, "t-c5", Some("s3")))
        .await
        .expect("create from the resumed source's snapshot");
    let c5 = a.envd_base_url("c5").unwrap();
    assert_eq!(
        run_ok_with(&c5, opts("t-c5"), "cat /root/f /root/g").await,
        "on-disk\nafter-resume"
    );
    ctl.kill("c5").await.unwrap();
    ctl.create(secured_create("c3", TEMPLATE, "t-c3", Some("s2")))
        .await
        .expect("create from the paused source's snapshot");
    let c3 = a.envd_base_url("c3").unwrap();
    assert_eq!(run_ok_with(&c3, opts("t-c3"), "cat /tmp/mem").await, secret);

    // Deleted: no more creates, files kept while c1 and c2 are layered on s1.
    assert!(a.delete_snapshot("s1").await);
    assert!(!a.delete_snapshot("s1").await, "a second delete finds none");
    assert!(
        ctl.create(secured_create("c4", TEMPLATE, "t-c4", Some("s1")))
            .await
            .is_err()
    );
    assert!(snaps.join("s1").exists(), "kept while sandboxes use it");
    for id in ["c1", "c2"] {
        ctl.kill(id).await.unwrap();
    }
    a.sweep_snapshots();
    assert!(snaps.join("s1").exists(), "kept while s1c is layered on it");
    assert!(a.delete_snapshot("s1c").await);
    a.sweep_snapshots();
    assert!(!snaps.join("s1").exists(), "removed once nothing uses it");
    assert!(!snaps.join("s1c").exists());
    assert!(snaps.join("s2").exists());
    ctl.kill("c3").await.unwrap();
    a.shutdown().await;
    assert!(qemu_pids_under(&w).is_empty(), "QEMU left under {w:?}");
}
