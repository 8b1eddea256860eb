//! Issue 3's "done when", with real QEMU guests (TCG here) and real namespaces: a template
//! snapshot of the small image; three sandboxes created from it concurrently, each running a
//! command and getting a file through envd; a background process holding state in memory;
//! pause and resume (several times, into other slots) keeping the file, the process's memory
//! and a 64 MiB tmpfs file; clone safety (RNG) and the clock after resume; corrupt or
//! truncated snapshot files failing cleanly; and nothing left after kill.
//!
//! Gated by `WRENN_VM_TESTS=1` (needs root, QEMU, the kernel and a static envd: see
//! `.ci/install-runtime-deps.sh` and `scripts/build-guest-envd.sh`). No timing asserts except
//! the clock check the issue asks for.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{files_under, host_now, new_slot, pid_alive, run_ok, write_file};
use wrenn_agent::pool::{SlotPool, WarmPool};
use wrenn_agent::record::RECORD_FILE;
use wrenn_agent::sandbox::{Deadlines, Failed, InitConfig, PausedSandbox, Sandbox, SandboxError};
use wrenn_agent::snapshot::{Snapshot, SnapshotError};
use wrenn_hostnet::Slot;

fn deadlines() -> Deadlines {
    // Generous: a loaded 2-core machine under TCG.
    Deadlines {
        health: Duration::from_secs(60),
        init: Duration::from_secs(30),
        prepare: Duration::from_secs(30),
        boot: Duration::from_secs(180),
    }
}

fn init(name: &str) -> InitConfig {
    InitConfig {
        env_vars: [("WRENN_SANDBOX".to_owned(), name.to_owned())].into(),
        ..Default::default()
    }
}

async fn create(template: &Snapshot, root: PathBuf, name: &str) -> Sandbox<Slot> {
    let slot = new_slot().await;
    match Sandbox::create(template, slot, &root, init(name), None, &deadlines()).await {
        Ok((sb, t)) => {
            eprintln!(
                "{name}: created: QEMU running {:?}, envd healthy {:?}, /init done {:?}",
                t.restored, t.healthy, t.total
            );
            sb
        }
        Err(Failed { error, .. }) => panic!("create {name}: {error:?}"),
    }
}

/// The phase in a sandbox directory's record.
fn recorded_phase(dir: &Path) -> String {
    let record = wrenn_agent::record::read(dir).unwrap().expect("a record");
    record.phase.name().to_owned()
}

async fn pause(sb: Sandbox<Slot>) -> (PausedSandbox, Slot) {
    match sb.pause(&deadlines()).await {
        Ok((paused, slot, t)) => {
            eprintln!(
                "paused: prepare {:?}, saved {:?} ({} MiB dirty), total {:?}",
                t.prepared,
                t.saved,
                t.dirty_bytes >> 20,
                t.total
            );
            (paused, slot)
        }
        Err(e) => panic!("pause: {:?}", e.error()),
    }
}

async fn resume(paused: PausedSandbox, slot: Slot) -> Sandbox<Slot> {
    match paused.resume(slot, &deadlines()).await {
        Ok((sb, t)) => {
            eprintln!(
                "resumed: QEMU running {:?} (memory diff written), envd healthy {:?}, /init done {:?}",
                t.restored, t.healthy, t.total
            );
            sb
        }
        Err(Failed { error, .. }) => panic!("resume: {error:?}"),
    }
}

fn base<N: wrenn_agent::sandbox::SandboxNet>(sb: &Sandbox<N>) -> String {
    sb.envd().base_url()
}

/// Reads the background process's state: (pid, value), after deleting its file and letting it
/// write again from memory.
async fn bg_state(base: &str) -> (String, String) {
    let out = run_ok(
        base,
        "rm -f /tmp/state; for i in $(seq 1 60); do [ -s /tmp/state ] && break; sleep 0.5; done; echo \"$(cat /tmp/bgpid) $(cat /tmp/state)\"",
    )
    .await;
    let (pid, value) = out.split_once(' ').expect("pid and value");
    (pid.to_owned(), value.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_create_pause_resume_clone_corrupt_and_cleanup() {
    if !support::enabled() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("wrenn_agent=debug")
        .try_init();
    let work = tempfile::Builder::new()
        .prefix("wrenn-sandbox-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path().to_owned();
    let t = Instant::now();
    let template = support::build_template(&w.join("images"), &w.join("template"), &w).await;
    eprintln!("template built and snapshotted in {:?}", t.elapsed());
    let template = Snapshot::open(&template.dir).expect("open template");
    let sandboxes = w.join("sandboxes");

    // Three sandboxes from one template, concurrently.
    let (a, b, c) = tokio::join!(
        create(&template, sandboxes.join("a"), "a"),
        create(&template, sandboxes.join("b"), "b"),
        create(&template, sandboxes.join("c"), "c"),
    );
    for (sb, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        assert_eq!(recorded_phase(sb.root()), "running");
        let out = run_ok(&base(sb), "echo \"$WRENN_SANDBOX $(id -un)\"").await;
        assert_eq!(out, format!("{name} root"));
        write_file(
            &base(sb),
            "/root/hello.txt",
            format!("hello {name}").as_bytes(),
        )
        .await;
        assert_eq!(
            run_ok(&base(sb), "cat /root/hello.txt").await,
            format!("hello {name}")
        );
    }

    // Clone safety: every sandbox from one snapshot has its own RNG state.
    let rng =
        "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ra, rb, rc) = (
        run_ok(&base(&a), rng).await,
        run_ok(&base(&b), rng).await,
        run_ok(&base(&c), rng).await,
    );
    eprintln!("rng a: {ra:?}\nrng b: {rb:?}\nrng c: {rc:?}");
    let lines = |s: &str| s.lines().map(str::to_owned).collect::<Vec<_>>();
    let (la, lb, lc) = (lines(&ra), lines(&rb), lines(&rc));
    assert_eq!(la.len(), 2, "{ra}");
    for (x, y) in [(&la, &lb), (&la, &lc), (&lb, &lc)] {
        assert_ne!(
            x[0], y[0],
            "same /proc/sys/kernel/random/uuid in two clones"
        );
        assert_ne!(x[1], y[1], "same /dev/urandom bytes in two clones");
    }

    // Create through a warm pool: the waiting QEMU is taken, and with none waiting the same
    // call restores cold.
    warm_pool_creates(&template, &w, &sandboxes, &la).await;

    // A background process holding its state in memory, and 64 MiB of tmpfs data.
    run_ok(
        &base(&a),
        "setsid bash -c 'x=$RANDOM$RANDOM$RANDOM; echo $$ > /tmp/bgpid; while :; do echo $x > /tmp/state; sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
    )
    .await;
    let before = bg_state(&base(&a)).await;
    run_ok(
        &base(&a),
        "mkdir -p /mnt/t && mount -t tmpfs -o size=100m tmpfs /mnt/t && dd if=/dev/urandom of=/mnt/t/blob bs=1048576 count=64 2>&1",
    )
    .await;
    let blob_sum = run_ok(&base(&a), "sha256sum /mnt/t/blob | cut -d' ' -f1").await;
    eprintln!("background process before pause: {before:?}; blob {blob_sum}");

    // Pause and resume several times, into a different slot each time.
    let mut a = a;
    for cycle in 0..3 {
        let a_root = a.root().to_owned();
        let a_pid = a.vm().pid();
        let (handle, slot) = pause(a).await;
        drop(handle);
        assert!(!pid_alive(a_pid), "paused sandbox's QEMU still running");
        assert!(
            !a_root.join("vm").exists(),
            "paused sandbox kept its runtime dir"
        );
        assert_eq!(recorded_phase(&a_root), "paused");
        // A restarted agent finds it from the directory alone.
        let paused = PausedSandbox::open(&a_root).expect("reopen paused");
        assert!(paused.manifest().dirty_pages > 0);
        if cycle == 1 {
            // Clock: sleep while paused; /init sets the guest clock on resume. (busybox `date`
            // has no %N: bash's $EPOCHREALTIME is the wall clock with microseconds.)
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        drop(slot); // any free slot will do
        let slot = new_slot().await;
        a = resume(paused, slot).await;
        if cycle == 1 {
            let h0 = host_now();
            let guest: f64 = run_ok(&base(&a), "echo $EPOCHREALTIME")
                .await
                .parse()
                .unwrap();
            let h1 = host_now();
            eprintln!(
                "clock after resume: guest {guest:.3}, host {h0:.3}..{h1:.3} (request took {:.3} s)",
                h1 - h0
            );
            assert!(
                guest >= h0 - 1.0 && guest <= h1 + 1.0,
                "guest clock {guest} not within 1 s of host [{h0}, {h1}]"
            );
        }
        assert_eq!(run_ok(&base(&a), "cat /root/hello.txt").await, "hello a");
        let after = bg_state(&base(&a)).await;
        assert_eq!(
            after, before,
            "background process state after resume {cycle}"
        );
        assert_eq!(
            run_ok(&base(&a), "sha256sum /mnt/t/blob | cut -d' ' -f1").await,
            blob_sum,
            "tmpfs data after resume {cycle}"
        );
        let out = run_ok(
            &base(&a),
            "echo $WRENN_SANDBOX; echo resumed > /root/r.txt; cat /root/r.txt",
        )
        .await;
        assert_eq!(out, "a\nresumed");
    }

    // Two resumes of copies of one paused state get different RNG state too.
    let (paused, slot) = pause(a).await;
    let a_root = paused.root().to_owned();
    let copy_root = sandboxes.join("a-copy");
    let cp = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(&a_root)
        .arg(&copy_root)
        .status()
        .unwrap();
    assert!(cp.success());
    let copy = PausedSandbox::open(&copy_root).unwrap();
    let (a, a2) = tokio::join!(resume(paused, slot), resume(copy, new_slot().await));
    let (r1, r2) = (run_ok(&base(&a), rng).await, run_ok(&base(&a2), rng).await);
    assert_ne!(lines(&r1)[0], lines(&r2)[0], "resumed copies share uuid");
    assert_ne!(lines(&r1)[1], lines(&r2)[1], "resumed copies share urandom");
    let s = a2.kill().await;
    drop(s);

    // Corrupt or truncated files: a clear error, no QEMU, no runtime dir, the slot back.
    let (paused, slot) = pause(a).await;
    let a_root = paused.root().to_owned();
    let mut slot = slot;
    type Mutate = fn(&Path);
    let cases: [(&str, Mutate); 5] = [
        ("truncated device state", |d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("state"))
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len / 2).unwrap();
        }),
        ("flipped byte in the device state", |d| {
            flip(&d.join("state"), 200)
        }),
        ("truncated memory diff", |d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("memory.diff"))
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len - 4096).unwrap();
        }),
        ("flipped byte in the memory diff", |d| {
            flip(&d.join("memory.diff"), 100_000)
        }),
        ("garbage record", |d| {
            std::fs::write(d.join(RECORD_FILE), b"{\"version\":2,").unwrap()
        }),
    ];
    for (what, mutate) in cases {
        let bad = sandboxes.join("bad");
        let _ = std::fs::remove_dir_all(&bad);
        assert!(
            std::process::Command::new("cp")
                .args(["-a", "--sparse=always"])
                .arg(&a_root)
                .arg(&bad)
                .status()
                .unwrap()
                .success()
        );
        mutate(&bad);
        let err = match PausedSandbox::open(&bad) {
            Err(e) => e,
            Ok(p) => match p.resume(slot, &deadlines()).await {
                Ok(_) => panic!("{what}: resume succeeded"),
                Err(Failed { error, net }) => {
                    slot = net;
                    error
                }
            },
        };
        eprintln!("{what}: {err}");
        assert!(
            matches!(
                err,
                SandboxError::Invalid { .. } | SandboxError::Restore(_) | SandboxError::Record(_)
            ),
            "{what}: {err:?}"
        );
        assert!(!bad.join("vm").exists(), "{what}: runtime dir left");
        assert!(
            support::qemu_pids_under(&bad).is_empty(),
            "{what}: QEMU left"
        );
        std::fs::remove_dir_all(&bad).unwrap();
    }
    // A state that passes our checks but that QEMU rejects (manifest hash updated too).
    {
        let bad = sandboxes.join("bad-qemu");
        assert!(
            std::process::Command::new("cp")
                .args(["-a", "--sparse=always"])
                .arg(&a_root)
                .arg(&bad)
                .status()
                .unwrap()
                .success()
        );
        let state = bad.join("state");
        let mut bytes = std::fs::read(&state).unwrap();
        let n = bytes.len();
        bytes.truncate(n / 3);
        std::fs::write(&state, &bytes).unwrap();
        let mut r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bad.join(RECORD_FILE)).unwrap()).unwrap();
        let m = &mut r["phase"]["paused"];
        m["state"]["bytes"] = bytes.len().into();
        m["state"]["sha256"] = sha256_hex(&bytes).into();
        std::fs::write(bad.join(RECORD_FILE), r.to_string()).unwrap();
        let p = PausedSandbox::open(&bad).unwrap();
        match p.resume(slot, &deadlines()).await {
            Ok(_) => panic!("resume from a truncated state succeeded"),
            Err(Failed { error, net }) => {
                eprintln!("state QEMU rejects: {error}");
                assert!(
                    matches!(error, SandboxError::Restore(SnapshotError::Load { .. })),
                    "{error:?}"
                );
                slot = net;
            }
        }
        assert!(!bad.join("vm").exists());
        assert!(support::qemu_pids_under(&bad).is_empty());
        std::fs::remove_dir_all(&bad).unwrap();
    }
    // A truncated template memory file: the template refuses to open.
    {
        let bad_t = w.join("bad-template");
        std::fs::create_dir_all(&bad_t).unwrap();
        for f in ["state", "rootfs.qcow2", "snapshot.json"] {
            std::fs::hard_link(template.dir.join(f), bad_t.join(f)).unwrap();
        }
        let mem = std::fs::File::create(bad_t.join("memory")).unwrap();
        mem.set_len((512 << 20) - 4096).unwrap();
        let err = Snapshot::open(&bad_t).expect_err("truncated memory file");
        eprintln!("truncated template memory: {err}");
        assert!(matches!(err, SnapshotError::Invalid { .. }));
        std::fs::remove_dir_all(&bad_t).unwrap();
    }
    // The slot is still good: the original paused state resumes into it.
    let a = resume(paused, slot).await;
    assert_eq!(run_ok(&base(&a), "cat /root/r.txt").await, "resumed");

    // Kill all: no QEMU, namespace, veth, nft rule or file left.
    let names: Vec<(String, String)> = [&a, &b, &c]
        .iter()
        .map(|s| (s.net().netns().to_owned(), s.net().host_veth().to_owned()))
        .collect();
    for sb in [a, b, c] {
        let root = sb.root().to_owned();
        let slot = sb.kill().await;
        assert!(!root.exists(), "{} left", root.display());
        drop(slot);
    }
    assert!(
        support::qemu_pids_under(&w).is_empty(),
        "QEMU processes left"
    );
    let netns = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let ruleset = String::from_utf8(
        std::process::Command::new("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for (ns, veth) in &names {
        assert!(
            !netns
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "namespace {ns} left"
        );
        assert!(
            !Path::new("/sys/class/net").join(veth).exists(),
            "{veth} left"
        );
        assert!(!ruleset.contains(veth.as_str()), "nft rule for {veth} left");
    }
    std::fs::remove_dir_all(&template.dir).unwrap();
    std::fs::remove_dir_all(w.join("images")).unwrap();
    let left = files_under(&w);
    assert!(left.is_empty(), "files left: {left:?}");
    work.close().unwrap();
}

/// `Sandbox::create_pooled` with a warm pool of one: the first create loads the snapshot into
/// the pre-started QEMU (in its directory), the next one (refill held back) restores cold.
/// Both answer commands and get their own RNG state (`other_rng`: another clone's).
async fn warm_pool_creates(template: &Snapshot, w: &Path, sandboxes: &Path, other_rng: &[String]) {
    let slots = SlotPool::new(1, support::pool_first_slot(), 4)
        .await
        .expect("slot pool");
    let vms = w.join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let pool = WarmPool::start(template.clone(), "tpl-small", slots.clone(), vms.clone(), 1);
    assert!(
        pool.wait_full(Duration::from_secs(120)).await,
        "warm pool did not fill"
    );
    // No refill during the test: the second create must find the pool empty.
    pool.set_refill_delay(Duration::from_secs(3600));
    let waiting: Vec<PathBuf> = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let warm_pid = support::qemu_pids_under(&waiting[0]);
    assert_eq!(warm_pid.len(), 1, "one waiting QEMU");

    let cold_root = sandboxes.join("pooled-cold");
    let create = |name: &'static str| {
        let (pool, slots, cold_root) = (&pool, &slots, &cold_root);
        async move {
            match Sandbox::create_pooled(
                template,
                Some(pool),
                slots,
                cold_root,
                init(name),
                None,
                &deadlines(),
            )
            .await
            {
                Ok((sb, t)) => {
                    eprintln!(
                        "{name}: created (warm={}): QEMU running {:?}, envd healthy {:?}, /init done {:?}",
                        t.warm, t.restored, t.healthy, t.total
                    );
                    (sb, t)
                }
                Err(e) => panic!("create_pooled {name}: {e:?}"),
            }
        }
    };
    let (warm, tw) = create("warm").await;
    assert!(tw.warm, "the waiting QEMU was not used");
    assert_eq!(
        warm.root(),
        waiting[0].as_path(),
        "warm sandbox lives in the warm VM's dir"
    );
    assert_eq!(
        warm.vm().pid(),
        warm_pid[0],
        "the pre-started QEMU runs the sandbox"
    );
    assert!(warm.root().join("rootfs.qcow2").is_file());
    // The warm VM's record is replaced by the sandbox's.
    assert_eq!(recorded_phase(warm.root()), "running");
    assert_eq!(pool.ready(), 0);
    let (cold, tc) = create("pooled-cold").await;
    assert!(!tc.warm, "pool was empty: the create must be cold");
    assert_eq!(cold.root(), cold_root.as_path());

    let rng =
        "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let mut seen = vec![other_rng.to_vec()];
    for (sb, name) in [(&warm, "warm"), (&cold, "pooled-cold")] {
        let out = run_ok(&base(sb), "echo \"$WRENN_SANDBOX $(id -un)\"").await;
        assert_eq!(out, format!("{name} root"));
        let r: Vec<String> = run_ok(&base(sb), rng)
            .await
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(r.len(), 2);
        for s in &seen {
            assert_ne!(s[0], r[0], "{name}: uuid shared with another clone");
            assert_ne!(s[1], r[1], "{name}: urandom shared with another clone");
        }
        seen.push(r);
    }

    for sb in [warm, cold] {
        let root = sb.root().to_owned();
        slots.release(sb.kill().await).await;
        assert!(!root.exists(), "{} left", root.display());
    }
    pool.shutdown().await;
    slots.shutdown().await;
    assert!(support::qemu_pids_under(&vms).is_empty(), "warm QEMU left");
    let left = files_under(&vms);
    assert!(left.is_empty(), "files left: {left:?}");
    std::fs::remove_dir(&vms).unwrap();
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = (at as usize).min(bytes.len() - 1);
    bytes[i] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
