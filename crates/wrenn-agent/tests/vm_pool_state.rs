//! Slots, metadata, warm QEMU and crash recovery with real QEMU guests:
//! - the guest's envd reads its slot's metadata endpoint: `/init` with the right token succeeds,
//!   with a wrong one gets 401;
//! - the guest firewall: the guest reaches its metadata endpoint but not the host's addresses
//!   nor another slot's guest (each with a positive control from the host side);
//! - create time with and without pre-started QEMU (`-incoming defer`);
//! - crash recovery: a child process starts VMs, records them and exits without cleanup; a
//!   scan finds one adoptable (QMP reconnects, envd answers through the adopted slot), keeps
//!   a paused sandbox and leaves a newer agent's directory alone, and the rest is garbage;
//!   cleaning removes the stray QEMU, directories, namespaces and veths.
//!
//! Gated by `WRENN_VM_TESTS=1` (needs root, QEMU, the extracted kernel and a static envd).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{RunOpts, now_rfc3339, pid_alive, qemu_pids_under, run_with};
use wrenn_agent::accel::Accel;
use wrenn_agent::envd::{EnvdClient, EnvdError};
use wrenn_agent::pool::{SlotPool, WarmPool, restore_warm};
use wrenn_agent::record::{self, Phase, RECORD_FILE, Recorder, VmProcess};
use wrenn_agent::runtime::SandboxMeta;
use wrenn_agent::sandbox::{
    FileRecord, InitConfig, PausedManifest, RunningManifest, SandboxNet as _, TemplateRef,
};
use wrenn_agent::snapshot::{self, Snapshot};
use wrenn_agent::state::{self, ScanScope};
use wrenn_agent::vm::{Launch, Memory, Vm, VmSpec, create_overlay};
use wrenn_hostnet::{Metadata, Slot};
use wrenn_image::{ENVD_PORT, Kernel, SmallImageInputs};

const COLD_BOOT_DEADLINE: Duration = Duration::from_secs(90);
const RESTORE_DEADLINE: Duration = Duration::from_secs(15);
const CHILD_ENV: &str = "WRENN_ADOPT_CHILD";

/// envd calls of this file: root, with the access token when `/init` set one.
fn run_opts(token: Option<&str>) -> RunOpts<'_> {
    RunOpts {
        token,
        timeout: Duration::from_secs(60),
        ..RunOpts::default()
    }
}

/// `bash` probe: prints `open` if a TCP connection to host:port succeeds within 2 s.
fn probe(host: &str, port: u16) -> String {
    format!(
        "if timeout 2 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>/dev/null; then echo open; else echo closed; fi"
    )
}

fn host_ipv4() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            w.next()?.split('/').next().map(str::to_owned)
        })
        .find(|a| !a.starts_with("10.12."))
}

/// Kills every QEMU started under the work directory and deletes the test's slot range, even
/// when the test fails.
struct Guard {
    work: PathBuf,
    slots: std::ops::Range<u32>,
    pids: Vec<u32>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.pids.extend(qemu_pids_under(&self.work));
        for &pid in &self.pids {
            if pid_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for i in self.slots.clone() {
            let ns = format!("wrenn-slot-{i}");
            if Path::new("/run/netns").join(&ns).exists() {
                let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            }
        }
    }
}

struct Fixture {
    spec: VmSpec,
    snapshot: Snapshot,
}

/// Builds the small image and a template snapshot, booted in a slot from `slots`.
async fn template(work: &Path, slots: &SlotPool) -> Fixture {
    let accel = Accel::detect().unwrap();
    let envd = support::envd_binary();
    assert!(envd.is_file(), "no static envd at {}", envd.display());
    let cache = work.join("images");
    let kernel = Kernel::find(None).expect("guest kernel");
    let initramfs =
        wrenn_image::build_initramfs(&cache, &kernel, Path::new("/bin/busybox")).unwrap();
    let rootfs = wrenn_image::build_small_rootfs(&cache, &SmallImageInputs::debian(envd)).unwrap();
    let spec = support::vm_spec(accel, &kernel, &initramfs.path);
    let template_dir = work.join("template");
    std::fs::create_dir_all(&template_dir).unwrap();
    let boot_dir = work.join("boot");
    std::fs::create_dir_all(&boot_dir).unwrap();
    let disk = boot_dir.join("rootfs.qcow2");
    create_overlay(&rootfs.path, "raw", &disk).await.unwrap();
    let lease = slots.acquire().await.unwrap();
    let t = Instant::now();
    let vm = Vm::launch(Launch {
        spec: spec.clone(),
        dir: boot_dir.clone(),
        disk: disk.clone(),
        memory: Memory::Shared(snapshot::template_memory_path(&template_dir)),
        net: Some(lease.net_attach()),
        incoming: None,
        extra_disks: vec![],
    })
    .await
    .unwrap();
    let client = EnvdClient::new(lease.slot().guest_endpoint(ENVD_PORT));
    if let Err(e) = client.wait_healthy(COLD_BOOT_DEADLINE).await {
        panic!("cold boot: {e}\n{}", vm.console_text().await);
    }
    eprintln!("template cold boot: {:?}", t.elapsed());
    client
        .snapshot_prepare(Duration::from_secs(10))
        .await
        .unwrap();
    let snap = snapshot::snapshot_template(vm, &spec, &disk, &rootfs.path, &template_dir)
        .await
        .unwrap();
    slots.release(lease).await;
    Fixture {
        spec,
        snapshot: snap,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_firewall_warm_pool_and_adoption() {
    if std::env::var_os(CHILD_ENV).is_some() || !support::enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=debug");
    let work = support::work_dir("wrenn-pool-test");
    let work_path = work.path().to_owned();
    // Test slot ranges: vm_template 4000..8000, the sandbox tests 8000..30400, slot_pool
    // 30400..30800, this file 30800..32600.
    let first = 30_800 + (std::process::id() % 150) * 12;
    let span = 12;
    let mut guard = Guard {
        work: work_path.clone(),
        slots: first..first + span,
        pids: Vec::new(),
    };
    let slots = SlotPool::new(2, first, 8).await.expect("slot pool");
    let fx = template(&work_path, &slots).await;
    let snap = Snapshot::open(&fx.snapshot.dir).unwrap();
    assert_eq!(snap.manifest.spec, fx.spec);
    let vms = work_path.join("vms");

    // --- Metadata through a real guest, and the firewall. ---
    let a = slots.acquire().await.unwrap();
    a.set_metadata(Some(Metadata::new(
        "sbx-a",
        "tpl-small",
        Some("right-token"),
    )));
    let t = Instant::now();
    let vm_a = snap
        .restore(&vms.join("a"), Some(a.net_attach()))
        .await
        .expect("restore a");
    guard.pids.push(vm_a.pid());
    let client_a = EnvdClient::new(a.slot().guest_endpoint(ENVD_PORT));
    if let Err(e) = client_a.wait_healthy(RESTORE_DEADLINE).await {
        panic!("a: {e}\n{}", vm_a.console_text().await);
    }
    let cold_create = t.elapsed();
    let wrong = client_a
        .init(
            &serde_json::json!({ "accessToken": "wrong-token", "timestamp": now_rfc3339() }),
            Duration::from_secs(10),
        )
        .await
        .expect_err("/init with a wrong token");
    assert!(
        matches!(wrong, EnvdError::Status { status: 401, .. }),
        "wrong token: {wrong}"
    );
    client_a
        .init(
            &serde_json::json!({ "accessToken": "right-token", "timestamp": now_rfc3339() }),
            Duration::from_secs(10),
        )
        .await
        .expect("/init with the published token");
    eprintln!("metadata: /init wrong token -> 401, right token -> 204");

    // A second guest in another slot, and a host listener (ours) to aim at.
    let b = slots.acquire().await.unwrap();
    b.set_metadata(Some(Metadata::new("sbx-b", "tpl-small", None)));
    let vm_b = snap
        .restore(&vms.join("b"), Some(b.net_attach()))
        .await
        .expect("restore b");
    guard.pids.push(vm_b.pid());
    let client_b = EnvdClient::new(b.slot().guest_endpoint(ENVD_PORT));
    client_b.wait_healthy(RESTORE_DEADLINE).await.unwrap();
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let a_host_ip = a.slot().guest_endpoint(0).ip().to_string(); // a's namespace side
    let a_gateway_host = {
        // The host end of a's veth: the namespace address minus one.
        let ip: std::net::Ipv4Addr = a_host_ip.parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string()
    };
    let b_envd = b.slot().guest_endpoint(ENVD_PORT);
    let mut script = String::new();
    script.push_str(&format!("echo meta:$({})\n", probe("169.254.169.254", 80)));
    script.push_str(
        "exec 3<>/dev/tcp/169.254.169.254/80; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; echo doc:$(tail -n1 <&3)\n",
    );
    script.push_str(&format!(
        "echo hostveth:$({})\n",
        probe(&a_gateway_host, port)
    ));
    if let Some(h) = host_ipv4() {
        script.push_str(&format!("echo hostip:$({})\n", probe(&h, port)));
    }
    script.push_str(&format!(
        "echo otherslot:$({})\n",
        probe(&b_envd.ip().to_string(), b_envd.port())
    ));
    script.push_str(&format!("echo tapaddr:$({})\n", probe("169.254.0.22", 22)));
    let (out, _) = run_with(&client_a.base_url(), run_opts(Some("right-token")), &script).await;
    eprintln!("guest probes:\n{out}");
    assert!(out.contains("meta:open"), "{out}");
    assert!(out.contains("\"instanceID\":\"sbx-a\""), "{out}");
    assert!(out.contains("hostveth:closed"), "{out}");
    assert!(!out.contains("hostip:open"), "{out}");
    assert!(out.contains("otherslot:closed"), "{out}");
    assert!(out.contains("tapaddr:closed"), "{out}");
    // Positive controls: the same targets answer from the host. (Not from the slot's
    // namespace: what the slot itself sends out, its filtering proxy's upstream, meets the
    // same guard.)
    let host_probe = |host: &str, port: u16| {
        Command::new("bash")
            .arg("-c")
            .arg(probe(host, port))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap()
    };
    assert_eq!(host_probe(&a_gateway_host, port), "open");
    if let Some(h) = host_ipv4() {
        assert_eq!(host_probe(&h, port), "open");
    }
    // And the slot's guard is what stopped the guest: its counters moved.
    let chain = Command::new("ip")
        .args(["netns", "exec", a.slot().netns()])
        .args(["nft", "list", "chain", "inet", "wrenn", "guard"])
        .output()
        .unwrap();
    let chain = String::from_utf8_lossy(&chain.stdout).into_owned();
    let packets = |set: &str| -> u64 {
        chain
            .lines()
            .find(|l| l.contains(&format!("ip daddr @{set} ")))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // The other slot's address is in the slot network (fixed); the host's are its own.
    assert!(packets("fixed") > 0, "{chain}");
    assert!(packets("host_addrs") + packets("connected") > 0, "{chain}");
    assert!(
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{b_envd}/health"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    drop(listener);
    vm_b.kill().await.unwrap();
    slots.release(b).await;
    vm_a.kill().await.unwrap();
    slots.release(a).await;

    // --- Create time without and with pre-started QEMU. ---
    let rounds = 8;
    let mut cold = Vec::new();
    for i in 0..rounds {
        let lease = slots.acquire().await.unwrap();
        let t = Instant::now();
        let vm = snap
            .restore(&vms.join(format!("cold-{i}")), Some(lease.net_attach()))
            .await
            .unwrap();
        let running = t.elapsed();
        EnvdClient::new(lease.slot().guest_endpoint(ENVD_PORT))
            .wait_healthy(RESTORE_DEADLINE)
            .await
            .unwrap();
        cold.push((running, t.elapsed()));
        vm.kill().await.unwrap();
        slots.release(lease).await;
    }
    let warm_pool = WarmPool::start(snap.clone(), "tpl-small", slots.clone(), vms.clone(), 2);
    assert!(
        warm_pool.wait_full(Duration::from_secs(60)).await,
        "warm pool did not fill"
    );
    let pss: Vec<String> = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .filter_map(|e| match record::read(&e.path()).ok()??.phase {
            Phase::Warm { vm } => Some(vm.pid),
            _ => None,
        })
        .map(|pid| {
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            let field = |name: &str| {
                rollup
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("?")
                    .to_owned()
            };
            format!(
                "Pss {} kB (anon {} kB, file {} kB)",
                field("Pss:"),
                field("Pss_Anon:"),
                field("Pss_File:")
            )
        })
        .collect();
    eprintln!("PSS of each waiting warm QEMU: {pss:?}");
    let mut warm = Vec::new();
    for _ in 0..rounds {
        assert!(warm_pool.wait_full(Duration::from_secs(60)).await);
        let t = Instant::now();
        let w = warm_pool.take().expect("a warm QEMU");
        let wrenn_agent::pool::RestoredWarm {
            vm,
            slot: lease,
            root,
        } = restore_warm(&snap, w)
            .await
            .expect("restore into warm QEMU");
        let running = t.elapsed();
        if let Err(e) = EnvdClient::new(lease.slot().guest_endpoint(ENVD_PORT))
            .wait_healthy(RESTORE_DEADLINE)
            .await
        {
            panic!("warm restore: {e}\n{}", vm.console_text().await);
        }
        warm.push((running, t.elapsed()));
        vm.kill().await.unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        slots.release(lease).await;
    }
    let show = |v: &[(Duration, Duration)]| {
        let ms = |d: &Duration| d.as_millis();
        let mut running: Vec<u128> = v.iter().map(|(r, _)| ms(r)).collect();
        let mut health: Vec<u128> = v.iter().map(|(_, h)| ms(h)).collect();
        running.sort();
        health.sort();
        format!(
            "to QEMU running p50 {} ms max {} ms, to envd /health p50 {} ms max {} ms (all: {:?})",
            running[running.len() / 2],
            running[running.len() - 1],
            health[health.len() / 2],
            health[health.len() - 1],
            health
        )
    };
    eprintln!("create without pool: {}", show(&cold));
    eprintln!("create with warm QEMU: {}", show(&warm));
    eprintln!("first create (restore + metadata slot) to /health: {cold_create:?}");
    warm_pool.shutdown().await;

    // --- Crash recovery. ---
    let crash_root = work_path.join("crash");
    std::fs::create_dir_all(&crash_root).unwrap();
    let child_slot = first + 9;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "adoption_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            serde_json::json!({
                "snapshot": snap.dir, "root": crash_root, "slot": child_slot,
            })
            .to_string(),
        )
        .output()
        .unwrap();
    let child_out =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{child_out}");
    assert!(child_out.contains("CHILD READY"), "{child_out}");
    let child_pid = |name: &str| -> u32 {
        child_out
            .lines()
            .find_map(|l| l.split(&format!("PID {name} ")).nth(1))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the child's {name} QEMU pid"))
    };
    let (live, stray, unrecorded) = (
        child_pid("live"),
        child_pid("stray"),
        child_pid("unrecorded"),
    );
    let rec_live = record::read(&crash_root.join("live")).unwrap().unwrap();
    let Phase::Running {
        vm: live_vm,
        running,
    } = rec_live.phase.clone()
    else {
        panic!("live: {rec_live:?}")
    };
    assert_eq!(live_vm.pid, live);
    let rec_stray = record::read(&crash_root.join("stray")).unwrap().unwrap();
    assert_eq!(rec_stray.phase, Phase::Creating);
    guard.pids.extend([live, stray, unrecorded]);
    assert!(
        live_vm.alive() && pid_alive(stray) && pid_alive(unrecorded),
        "QEMU died with its owner"
    );
    // More garbage: a directory without a record, and a record of a dead process.
    std::fs::create_dir_all(crash_root.join("norecord")).unwrap();
    let reused = crash_root.join("reused");
    std::fs::create_dir_all(&reused).unwrap();
    let mut dead = live_vm.clone();
    dead.start_time += 1; // same pid, different start time: pid reuse
    Recorder::new(&reused, Some(meta("sbx-dead")))
        .write(Phase::Running { vm: dead, running })
        .unwrap();
    // A sandbox whose pause completed, and a newer agent's directory: both kept.
    let paused = crash_root.join("paused");
    std::fs::create_dir_all(&paused).unwrap();
    Recorder::new(&paused, Some(meta("sbx-paused")))
        .write(Phase::Paused {
            paused: paused_manifest(&snap),
        })
        .unwrap();
    let newer = crash_root.join("newer");
    std::fs::create_dir_all(&newer).unwrap();
    std::fs::write(newer.join(RECORD_FILE), r#"{"version": 99}"#).unwrap();

    // The crashed owner's lock went with it.
    let _owner = state::OwnerLock::try_acquire(&crash_root)
        .unwrap()
        .expect("lock of a dead owner is free");
    let scope = ScanScope {
        in_use: slots.indices(),
        slots: first..first + span,
    };
    let t = Instant::now();
    let mut found = state::scan(&crash_root, &scope).await;
    eprintln!(
        "scan in {:?}: adoptable {:?}, garbage {:?}, orphan netns {:?}",
        t.elapsed(),
        found.adoptable.iter().map(|a| &a.dir).collect::<Vec<_>>(),
        found
            .garbage
            .iter()
            .map(|g| (&g.dir, &g.reason))
            .collect::<Vec<_>>(),
        found.orphan_netns
    );
    assert_eq!(found.adoptable.len(), 1);
    assert_eq!(found.adoptable[0].dir, crash_root.join("live"));
    assert_eq!(found.adoptable[0].status, "running");
    // norecord, reused, stray, unrecorded.
    assert_eq!(found.garbage.len(), 4);
    // Neither QEMU is recorded: `stray`'s create wrote its intent before starting it.
    let mut strays: Vec<u32> = found.stray_qemu.iter().map(|(p, _)| *p).collect();
    strays.sort();
    let mut expected = vec![stray, unrecorded];
    expected.sort();
    assert_eq!(strays, expected);
    assert_eq!(found.paused.len(), 1);
    assert_eq!(found.paused[0].dir, paused);
    assert_eq!(found.kept.len(), 1);
    assert_eq!(found.kept[0].dir, newer);
    assert_eq!(
        found.orphan_netns,
        vec![
            format!("wrenn-slot-{}", child_slot + 1),
            format!("wrenn-slot-{}", child_slot + 2)
        ]
    );
    let adopted = found.adoptable.remove(0);
    let slot = adopted.adopt_slot().unwrap().expect("the live VM's slot");
    assert_eq!(slot.index(), child_slot);
    let client = EnvdClient::new(slot.guest_endpoint(ENVD_PORT));
    client
        .wait_healthy(Duration::from_secs(5))
        .await
        .expect("adopted envd answers");
    let (o, code) = run_with(&client.base_url(), run_opts(None), "echo adopted").await;
    assert_eq!((o.trim(), code), ("adopted", 0));
    assert!(adopted.qmp.query_status().await.unwrap().running);

    let cleaned = found.clean().await;
    eprintln!("cleaned: {cleaned:?}");
    let mut killed = cleaned.killed.clone();
    killed.sort();
    assert_eq!(killed, expected);
    assert!(!pid_alive(stray), "stray QEMU survived");
    assert!(!pid_alive(unrecorded), "unrecorded QEMU survived");
    assert!(pid_alive(live), "clean killed the adopted VM");
    assert_eq!(cleaned.dirs.len(), 4);
    for i in [child_slot + 1, child_slot + 2] {
        assert!(
            !Path::new("/run/netns")
                .join(format!("wrenn-slot-{i}"))
                .exists()
        );
        assert!(!Path::new("/sys/class/net").join(format!("wrv{i}")).exists());
    }
    adopted.kill().await.unwrap();
    assert!(!pid_alive(live));
    drop(slot);
    // Nothing of the crashed owner is left.
    let again = state::scan(&crash_root, &scope).await;
    assert_eq!(again.paused.len(), 1, "clean must keep paused sandboxes");
    assert_eq!(
        again.kept.len(),
        1,
        "clean must leave a newer agent's directory"
    );
    assert!(
        again.adoptable.is_empty()
            && again.garbage.is_empty()
            && again.orphan_netns.is_empty()
            && again.orphan_veths.is_empty(),
        "{again:?}"
    );
    slots.shutdown().await;
    for i in first..first + span {
        assert!(
            !Path::new("/run/netns")
                .join(format!("wrenn-slot-{i}"))
                .exists(),
            "slot {i} left"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&vms)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "VM dirs left: {left:?}");
    assert!(
        qemu_pids_under(&work_path).is_empty(),
        "QEMU left: {:?}",
        qemu_pids_under(&work_path)
    );
    drop(guard);
    work.close().unwrap();
}

fn meta(id: &str) -> SandboxMeta {
    SandboxMeta {
        sandbox_id: id.into(),
        template_id: "tpl-small".into(),
        vcpus: 1,
        memory_mb: 512,
        start_unix_ms: 0,
        backstop_unix_ms: 0,
        auto_pause: false,
        envd_version: "test".into(),
        egress: Default::default(),
    }
}

fn template_ref(snap: &Snapshot) -> TemplateRef {
    TemplateRef {
        dir: snap.dir.clone(),
        state_sha256: snap.manifest.state_sha256.clone(),
        created_unix: snap.manifest.created_unix,
    }
}

fn running_manifest(snap: &Snapshot) -> RunningManifest {
    RunningManifest {
        spec: snap.manifest.spec.clone(),
        template: template_ref(snap),
        memory: snap.memory_path(),
        memory_base: Vec::new(),
        init: InitConfig::default(),
        disk: "rootfs.qcow2".into(),
        commit_into: None,
    }
}

/// A paused manifest (its files are never read: the scan only sorts directories).
fn paused_manifest(snap: &Snapshot) -> PausedManifest {
    let file = |name: &str| FileRecord {
        file: name.into(),
        bytes: 0,
        sha256: String::new(),
    };
    PausedManifest {
        spec: snap.manifest.spec.clone(),
        template: template_ref(snap),
        disk: "rootfs.qcow2".into(),
        state: Some(file("state")),
        memory_diff: Some(file("memory.diff")),
        dirty_pages: 0,
        memory_base: Vec::new(),
        init: InitConfig::default(),
        paused_unix: 0,
        qemu_version: String::new(),
    }
}

/// Run only as the child of the test above: restores three VMs from the snapshot, records
/// them (one running, one as a create that was interrupted, one not at all) and exits without
/// any cleanup, as a crashed agent would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_child() {
    let Some(args) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let args: serde_json::Value = serde_json::from_str(args.to_str().unwrap()).unwrap();
    let snap = Snapshot::open(Path::new(args["snapshot"].as_str().unwrap())).unwrap();
    let root = PathBuf::from(args["root"].as_str().unwrap());
    let first = args["slot"].as_u64().unwrap() as u32;
    let lock = state::OwnerLock::try_acquire(&root)
        .unwrap()
        .expect("the root is free");
    std::mem::forget(lock);
    // The third VM's directory has no record at all (made by an older agent, say).
    for (i, name) in ["live", "stray", "unrecorded"].into_iter().enumerate() {
        let slot = Slot::create(first + i as u32).await.unwrap();
        let dir = root.join(name);
        let rec = Recorder::new(&dir, Some(meta(&format!("sbx-{name}"))));
        std::fs::create_dir_all(&dir).unwrap();
        if name == "stray" {
            rec.write(Phase::Creating).unwrap();
        }
        let vm = snap.restore(&dir, Some(slot.attach())).await.unwrap();
        if name == "live" {
            EnvdClient::new(slot.guest_endpoint(ENVD_PORT))
                .wait_healthy(RESTORE_DEADLINE)
                .await
                .unwrap();
            let running = Phase::Running {
                vm: VmProcess::of(&vm, Some(slot.index())).unwrap(),
                running: running_manifest(&snap),
            };
            rec.write(running).unwrap();
        }
        println!("PID {name} {}", vm.pid());
        // A crash: no destructor runs.
        std::mem::forget(vm);
        std::mem::forget(slot);
    }
    println!("CHILD READY");
    std::process::exit(0);
}
