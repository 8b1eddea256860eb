//! The jail lab against real QEMU guests: every QEMU runs as its own non-root uid with
//! seccomp mode 2, in its own cgroup with its limits set, in a mount namespace that holds none
//! of the agent's or another sandbox's files, with the template's memory file open read-only;
//! a guest that overwrites its RAM and disk (as root) leaves the template byte for byte as it
//! was and its overlay within its size; 1 GiB (or what fits in a minute) to the serial
//! console grows nothing on the host; a fork bomb and a memory hog in one sandbox leave its
//! envd answering and another sandbox's exec latency within 2x of its baseline; a paused and
//! resumed sandbox is jailed again; a disk larger than the template's is refused.
//!
//! One agent, one template, two sandboxes. Gated by `WRENN_VM_TESTS=1`. Slot indices
//! 5000..5200 are this test's own.

mod support;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{RunOpts, TestAgent, call, run_ok_with, run_with};
use wrenn_agent::jail::{self, Leaf};
use wrenn_agent::snapshot::Snapshot;
use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::*;
use wrenn_connect::{Client, Code};

const TEMPLATE: &str = "small";
const TOKEN: &str = "tok-jail";
/// The guest's RAM (the test template's).
const RAM: u64 = 512 << 20;
/// A memory hog in the guest: three reads of /dev/zero into buffers of 200 MiB at once, more
/// than its RAM (one buffer of that size is refused by the guest's overcommit check).
const HOG_ONCE: &str =
    "for i in 1 2 3; do dd if=/dev/zero of=/dev/null bs=200M count=1 2>&1 & done; wait; echo done";

fn opts() -> RunOpts<'static> {
    RunOpts {
        token: Some(TOKEN),
        ..Default::default()
    }
}

async fn create(
    c: &Client,
    id: &str,
    disk_size_mb: u64,
) -> Result<(), wrenn_connect::ConnectError> {
    let _: CreateResponse = call(
        c,
        paths::CREATE,
        CreateRequest {
            sandbox: Some(SandboxSpec {
                sandbox_id: id.into(),
                template_id: TEMPLATE.into(),
                envd_access_token: TOKEN.into(),
                disk_size_mb,
                ..Default::default()
            }),
        },
    )
    .await?;
    Ok(())
}

/// What the test reads about a running sandbox's QEMU.
#[derive(Debug, Clone)]
struct Qemu {
    pid: u32,
    uid: u32,
    slot: u32,
    leaf: Leaf,
    root: PathBuf,
    base: String,
}

fn qemu_of(agent: &wrenn_agent::Agent, id: &str) -> Qemu {
    agent
        .controller()
        .with_running(id, |sb| Qemu {
            pid: sb.vm().pid(),
            uid: sb.vm().uid(),
            slot: sb.net().slot().index(),
            leaf: sb.vm().cgroup().cloned().expect("a cgroup leaf"),
            root: sb.root().to_owned(),
            base: sb.envd().base_url(),
        })
        .expect("running")
}

fn status_field(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in status"))
        .trim()
        .to_owned()
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_owned()
}

/// The access mode (`O_RDONLY`, `O_WRONLY`, `O_RDWR`) of each of `pid`'s descriptors open
/// on the file `target` (same device and inode).
fn fd_modes(pid: u32, target: &Path) -> Vec<i32> {
    let want = std::fs::metadata(target).unwrap();
    let mut modes = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(m) = std::fs::metadata(e.path()) else {
            continue;
        };
        if m.dev() == want.dev() && m.ino() == want.ino() {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| i32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            modes.push(flags & libc::O_ACCMODE);
        }
    }
    modes
}

/// Everything the lab checks of one jailed QEMU.
fn assert_jailed(q: &Qemu, template: &Snapshot, other_root: Option<&Path>) {
    let pid = q.pid;
    // Its own uid and gid, all four of each (real, effective, saved, filesystem), from the
    // slot's range; no groups, no capabilities, seccomp filtering, no new privileges.
    assert_eq!(q.uid, jail::UID_BASE + q.slot);
    for f in ["Uid", "Gid"] {
        let ids: Vec<u32> = status_field(pid, f)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(ids, [q.uid; 4], "{f} of QEMU {pid}");
    }
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "Seccomp"), "2", "QEMU {pid} seccomp mode");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");

    // Its own cgroup, with the limits of a 1-vCPU 512 MiB guest read back; the agent (this
    // process) is not in it.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let me = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let name = format!("slot-{}", q.slot);
    assert!(cg.contains(&format!("/wrenn/{name}")), "QEMU cgroups: {cg}");
    assert!(!me.contains(&name), "the agent is in the VM's cgroup: {me}");
    let mem_limit = (512 + jail::TCG_OVERHEAD_MIB) << 20;
    let mut seen = Vec::new();
    for d in q.leaf.dirs() {
        let procs = read_trim(&d.join("cgroup.procs"));
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{}: {procs}",
            d.display()
        );
        let has = |f: &str| d.join(f).exists();
        if has("cpu.max") {
            assert_eq!(read_trim(&d.join("cpu.max")), "100000 100000");
            seen.push("cpu");
        }
        if has("cpu.cfs_quota_us") {
            assert_eq!(read_trim(&d.join("cpu.cfs_quota_us")), "100000");
            assert_eq!(read_trim(&d.join("cpu.cfs_period_us")), "100000");
            seen.push("cpu");
        }
        if has("memory.max") {
            assert_eq!(read_trim(&d.join("memory.max")), mem_limit.to_string());
            seen.push("memory");
        }
        if has("memory.limit_in_bytes") {
            assert_eq!(
                read_trim(&d.join("memory.limit_in_bytes")),
                mem_limit.to_string()
            );
            seen.push("memory");
        }
        if has("pids.max") {
            assert_eq!(
                read_trim(&d.join("pids.max")),
                (jail::PIDS_BASE + 2).to_string()
            );
            seen.push("pids");
        }
        let disk = wrenn_agent::jail::cgroup::disk_of(&q.root);
        if let Some((maj, min)) = disk {
            if has("io.max") {
                let io = read_trim(&d.join("io.max"));
                assert!(
                    io.starts_with(&format!("{maj}:{min} rbps=")),
                    "io.max: {io}"
                );
                seen.push("io");
            }
            if has("blkio.throttle.write_bps_device") {
                let w = read_trim(&d.join("blkio.throttle.write_bps_device"));
                assert_eq!(w, format!("{maj}:{min} {}", jail::IO_BPS_PER_VCPU));
                let r = read_trim(&d.join("blkio.throttle.read_iops_device"));
                assert_eq!(r, format!("{maj}:{min} {}", jail::IO_IOPS_PER_VCPU));
                seen.push("io");
            }
        }
    }
    for c in ["cpu", "memory", "pids"] {
        assert!(
            seen.contains(&c),
            "no {c} limit found in {:?}",
            q.leaf.dirs()
        );
    }

    // The template's memory file is open read-only (and mapped private and writable); the
    // disk overlay read-write, the template's disk read-only, both as descriptors.
    assert_eq!(
        fd_modes(pid, &template.memory_path()),
        [libc::O_RDONLY],
        "memory file descriptors of QEMU {pid}"
    );
    // (The fd set's descriptor, and QEMU's own copy of it.)
    let tdisk = fd_modes(pid, &template.disk_path());
    assert!(
        !tdisk.is_empty() && tdisk.iter().all(|m| *m == libc::O_RDONLY),
        "template disk descriptors: {tdisk:?}"
    );
    // After a resume the guest writes a run overlay `rootfs-<ms>.qcow2`.
    let disk = std::fs::read_dir(&q.root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("rootfs-") && n.ends_with(".qcow2")
        })
        .unwrap_or_else(|| q.root.join("rootfs.qcow2"));
    let top = fd_modes(pid, &disk);
    assert!(
        !top.is_empty() && top.iter().all(|m| *m == libc::O_RDWR),
        "{} descriptors: {top:?}",
        disk.display()
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let ino = std::fs::metadata(template.memory_path()).unwrap().ino();
    assert!(
        maps.lines()
            .any(|l| l.contains(" rw-p 00000000 ") && l.contains(&format!(" {ino} "))),
        "no private writable mapping of the memory file"
    );

    // Only its own files: its root holds /usr (a positive control that the probe looks into
    // the jail), the kernel and the memory file, and not the agent's record with the access
    // token, another sandbox's directory, the host's secrets or the disk by path.
    let jail_root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| jail_root.join(p.strip_prefix("/").unwrap());
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "QEMU shares the agent's mount namespace"
    );
    assert!(inside(Path::new("/usr/bin")).is_dir());
    assert!(inside(&template.manifest.spec.kernel).is_file());
    assert!(inside(&template.memory_path()).is_file());
    for hidden in [
        q.root.join("sandbox.json"),
        q.root.join("rootfs.qcow2"),
        template.disk_path(),
        template.dir.join("state"),
        PathBuf::from("/etc/shadow"),
        PathBuf::from("/root"),
        PathBuf::from("/proc/1"),
    ] {
        assert!(
            hidden.exists(),
            "positive control: {} exists",
            hidden.display()
        );
        assert!(
            !inside(&hidden).exists(),
            "{} is reachable from QEMU {pid}",
            hidden.display()
        );
    }
    if let Some(other) = other_root {
        assert!(
            other.is_dir(),
            "positive control: {} exists",
            other.display()
        );
        assert!(
            !inside(other).exists(),
            "another sandbox's directory is reachable from QEMU {pid}"
        );
    }
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(p)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn hashes(template: &Snapshot) -> Vec<(PathBuf, String)> {
    [
        template.memory_path(),
        template.disk_path(),
        template.dir.join("state"),
        template.manifest.base_image.clone(),
    ]
    .into_iter()
    .map(|p| {
        let h = sha256_file(&p).unwrap();
        (p, h)
    })
    .collect()
}

fn rss(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        << 10
}

/// Bytes of every file under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    support::files_under(dir)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Memory use of a leaf now and at its peak (v1 or v2 files).
fn memory_use(leaf: &Leaf) -> (u64, u64) {
    for d in leaf.dirs() {
        if d.join("memory.current").exists() {
            let peak = std::fs::read_to_string(d.join("memory.peak")).unwrap_or_default();
            return (
                read_trim(&d.join("memory.current")).parse().unwrap(),
                peak.trim().parse().unwrap_or(0),
            );
        }
        if d.join("memory.usage_in_bytes").exists() {
            return (
                read_trim(&d.join("memory.usage_in_bytes")).parse().unwrap(),
                read_trim(&d.join("memory.max_usage_in_bytes"))
                    .parse()
                    .unwrap(),
            );
        }
    }
    panic!("no memory controller in {:?}", leaf.dirs());
}

/// b's exec latency with a stopped and with a running, `n` pairs interleaved so that the
/// machine's other load (builds of other work trees on 2 cores) affects both alike: medians
/// of (a stopped, a running).
async fn paired(b: &str, a_pid: u32, n: usize) -> (Duration, Duration) {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(a_pid as i32);
    let (mut idle, mut loaded) = (Vec::new(), Vec::new());
    for _ in 0..n {
        kill(pid, Signal::SIGSTOP).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        run_ok_with(b, opts(), "true").await;
        idle.push(t.elapsed());
        kill(pid, Signal::SIGCONT).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        run_ok_with(b, opts(), "true").await;
        loaded.push(t.elapsed());
    }
    idle.sort();
    loaded.sort();
    (idle[n / 2], loaded[n / 2])
}

/// Median wall time of `n` runs of `true` in the sandbox at `base`.
async fn exec_median(base: &str, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        run_ok_with(base, opts(), "true").await;
        times.push(t.elapsed());
    }
    times.sort();
    times[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jail_lab() {
    if !support::enabled() {
        return;
    }
    let started = Instant::now();
    // 8 indices: the agent's pool (4), then the warm pool's (4).
    let first = 5_000 + (std::process::id() % 25) * 8;
    let TestAgent {
        work,
        sandboxes,
        agent,
        client: c,
        server,
    } = support::start_agent("wrenn-jail-lab", TEMPLATE, first, 2, 4).await;
    let template = Snapshot::open(&work.path().join("template")).unwrap();
    let before = hashes(&template);
    let mode = std::fs::metadata(template.memory_path()).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o644, "template memory file mode");
    assert_eq!(std::fs::metadata(template.memory_path()).unwrap().uid(), 0);
    eprintln!("[{:?}] template ready", started.elapsed());

    // A disk larger than the template's cannot be had; the template's size can.
    let disk_mb = jail::disk::virtual_size(&template.disk_path())
        .unwrap()
        .div_ceil(1 << 20);
    let e = create(&c, "sb-jail-big", disk_mb + 1).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e:?}");
    assert!(e.message.contains("larger than"), "{}", e.message);
    assert!(!sandboxes.join("sb-jail-big").exists());

    create(&c, "sb-jail-a", disk_mb).await.expect("create a");
    create(&c, "sb-jail-b", 0).await.expect("create b");
    let a = qemu_of(&agent, "sb-jail-a");
    let b = qemu_of(&agent, "sb-jail-b");
    assert_ne!(a.uid, b.uid, "two QEMUs share a uid");
    assert_jailed(&a, &template, Some(&b.root));
    assert_jailed(&b, &template, Some(&a.root));
    // Same uid for a different process is not possible: the two cannot signal each other.
    eprintln!(
        "[{:?}] both sandboxes jailed: {a:?} {b:?}",
        started.elapsed()
    );

    // Baseline: b's exec latency with a idle.
    let _ = exec_median(&b.base, 3).await;
    let baseline = exec_median(&b.base, 9).await;
    eprintln!(
        "[{:?}] b exec median, a idle: {baseline:?}",
        started.elapsed()
    );

    // As root in a: fill free guest RAM (a tmpfs filled with non-zero pages) and the free disk.
    let (_, peak_before) = memory_use(&a.leaf);
    let t = Instant::now();
    let fill = "mkdir -p /mnt/ram && mount -t tmpfs -o size=100% tmpfs /mnt/ram && \
        free=$(awk '/MemAvailable/ {print int($2/1024) - 40}' /proc/meminfo) && \
        yes \"$(head -c 4095 </dev/zero | tr '\\0' 'W')\" | head -c $((free * 1048576)) >/mnt/ram/fill; \
        echo $(( $(stat -c %s /mnt/ram/fill) >> 20 ))";
    // Filling ~450 MiB under TCG near the memory limit takes minutes on a busy host.
    let slow = RunOpts {
        timeout: Duration::from_secs(420),
        ..opts()
    };
    let filled = run_ok_with(&a.base, slow, fill).await;
    let (now, peak) = memory_use(&a.leaf);
    let qemu_rss = rss(a.pid);
    eprintln!(
        "[{:?}] a filled {filled} MiB of guest RAM in {:?}: QEMU RSS {} MiB, cgroup {} MiB now, peak {} MiB (before {} MiB), limit {} MiB",
        started.elapsed(),
        t.elapsed(),
        qemu_rss >> 20,
        now >> 20,
        peak >> 20,
        peak_before >> 20,
        (RAM >> 20) + jail::TCG_OVERHEAD_MIB,
    );
    assert!(filled.parse::<u64>().unwrap() > 300, "{filled}");
    assert!(peak <= RAM + (jail::TCG_OVERHEAD_MIB << 20));
    run_ok_with(&a.base, opts(), "rm -f /mnt/ram/fill && umount /mnt/ram").await;
    // The memory hog: one allocation of most of the guest's RAM, filled by the kernel (the
    // guest's OOM killer ends it).
    let (out, code) = run_with(&a.base, opts(), HOG_ONCE).await;
    eprintln!("memory hog: {out} ({code})");
    run_ok_with(&a.base, opts(), "echo alive").await;
    let overlay = a.root.join("rootfs.qcow2");
    let virtual_size = jail::disk::virtual_size(&overlay).unwrap();
    let t = Instant::now();
    let (out, _) = run_with(
        &a.base,
        opts(),
        "dd if=/dev/zero of=/fill bs=1M 2>&1 | tail -1; sync; df -k / | tail -1",
    )
    .await;
    let overlay_size = std::fs::metadata(&overlay).unwrap().len();
    eprintln!(
        "[{:?}] a filled its disk in {:?}: {out}; overlay {} MiB for a {} MiB disk",
        started.elapsed(),
        t.elapsed(),
        overlay_size >> 20,
        virtual_size >> 20
    );
    assert!(
        overlay_size <= virtual_size + (16 << 20),
        "overlay {overlay_size} beyond virtual size {virtual_size}"
    );
    run_ok_with(&a.base, opts(), "rm -f /fill && sync").await;
    assert_eq!(hashes(&template), before, "the template changed");
    assert_eq!(fd_modes(a.pid, &template.memory_path()), [libc::O_RDONLY]);
    eprintln!("[{:?}] template unchanged", started.elapsed());

    // The console flood: as much of 1 GiB as fits in ~55 s to the serial console.
    let agent_rss = rss(std::process::id());
    let (qemu_rss, dir_bytes) = (rss(a.pid), bytes_under(&a.root));
    let t = Instant::now();
    let flood = "end=$((SECONDS+55)); n=0; \
        while [ $SECONDS -lt $end ] && [ $n -lt 1024 ]; do \
        yes 'wrenn console flood 0123456789abcdefghijklmnopqrstuvwxyz' | head -c 1048576 >/dev/ttyS0; \
        n=$((n+1)); done; echo $n";
    let mib: u64 = run_ok_with(&a.base, opts(), flood).await.parse().unwrap();
    let took = t.elapsed();
    // Let the sampler drain the ring at least once more.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let logs: Vec<LogEntry> = {
        use futures::TryStreamExt as _;
        let req = LogsRequest {
            sandbox_id: "sb-jail-a".into(),
            start_unix_ms: 0,
            limit: 1000,
            follow: false,
        };
        c.server_stream::<_, LogEntry>(paths::LOGS, &req)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    let (agent_after, qemu_after, dir_after) =
        (rss(std::process::id()), rss(a.pid), bytes_under(&a.root));
    eprintln!(
        "[{:?}] console flood: {mib} MiB in {took:?} ({:.1} MiB/s); agent RSS {} -> {} MiB, QEMU RSS {} -> {} MiB, sandbox files {} -> {} bytes, {} log entries",
        started.elapsed(),
        mib as f64 / took.as_secs_f64(),
        agent_rss >> 20,
        agent_after >> 20,
        qemu_rss >> 20,
        qemu_after >> 20,
        dir_bytes,
        dir_after,
        logs.len()
    );
    assert!(mib >= 1, "nothing reached the console");
    assert!(
        logs.iter()
            .any(|e| e.message.contains("wrenn console flood")),
        "the flood is not in the logs"
    );
    assert!(logs.len() <= 1000);
    assert!(
        agent_after < agent_rss + (64 << 20),
        "the agent grew by {} MiB",
        (agent_after - agent_rss) >> 20
    );
    assert!(qemu_after < qemu_rss + (32 << 20), "QEMU grew");
    assert!(dir_after < dir_bytes + (1 << 20), "sandbox files grew");
    run_ok_with(&a.base, opts(), "echo alive").await;

    // A fork bomb, then a memory hog, in a: its envd answers, b's latency stays within 2x.
    let t = Instant::now();
    run_ok_with(
        &a.base,
        opts(),
        "nohup /bin/bash -c ':(){ :|:& };:' >/dev/null 2>&1 & echo started",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (bomb_idle, bombed) = paired(&b.base, a.pid, 9).await;
    let a_alive = support::run_with(
        &a.base,
        RunOpts {
            timeout: Duration::from_secs(60),
            ..opts()
        },
        "echo alive",
    )
    .await;
    eprintln!(
        "[{:?}] fork bomb in a: b exec median {bombed:?}, with a stopped {bomb_idle:?} (a idle at the start: {baseline:?}); a answered {a_alive:?} after {:?}",
        started.elapsed(),
        t.elapsed()
    );
    assert_eq!(a_alive.0.trim(), "alive");
    let hog = format!(
        "nohup /bin/bash -c 'while true; do {HOG_ONCE}; done' >/dev/null 2>&1 & echo started"
    );
    run_ok_with(&a.base, opts(), &hog).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (hog_idle, hogged) = paired(&b.base, a.pid, 9).await;
    let health =
        wrenn_agent::envd::EnvdClient::new(a.base.trim_start_matches("http://").parse().unwrap())
            .wait_healthy(Duration::from_secs(30))
            .await;
    let (_, peak) = memory_use(&a.leaf);
    eprintln!(
        "[{:?}] memory hog in a: b exec median {hogged:?}, with a stopped {hog_idle:?}; a /health {health:?}; a's cgroup peak {} MiB",
        started.elapsed(),
        peak >> 20
    );
    assert!(health.is_ok(), "a's envd stopped answering: {health:?}");
    assert!(support::pid_alive(a.pid), "a's QEMU died");
    assert!(
        bombed <= bomb_idle * 2 && hogged <= hog_idle * 2,
        "b's exec latency beyond 2x: fork bomb {bombed:?} (a stopped {bomb_idle:?}), memory hog {hogged:?} (a stopped {hog_idle:?})"
    );
    let _: KillResponse = call(
        &c,
        paths::KILL,
        KillRequest {
            sandbox_id: "sb-jail-a".into(),
        },
    )
    .await
    .expect("kill a");
    assert!(!support::pid_alive(a.pid));
    assert!(
        a.leaf.dirs().iter().all(|d| !d.exists()),
        "a's cgroup outlived it"
    );

    // A warm pool VM (started in `-incoming defer` before any create) is jailed too, and so is
    // the sandbox made from it.
    let warm_slots = wrenn_agent::pool::SlotPool::new(1, first + 4, 4)
        .await
        .expect("warm slots");
    let warm = wrenn_agent::pool::WarmPool::start(
        template.clone(),
        TEMPLATE,
        warm_slots.clone(),
        sandboxes.clone(),
        1,
    );
    assert!(warm.wait_full(Duration::from_secs(60)).await, "no warm VM");
    agent.register_template(TEMPLATE, template.clone(), Some(warm), "test-envd");
    create(&c, "sb-jail-c", 0).await.expect("create c");
    let w = qemu_of(&agent, "sb-jail-c");
    let dir = w.root.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        dir.starts_with("warm-"),
        "c did not come from the warm pool: {dir}"
    );
    assert_jailed(&w, &template, Some(&b.root));
    run_ok_with(&w.base, opts(), "echo warm").await;
    let _: KillResponse = call(
        &c,
        paths::KILL,
        KillRequest {
            sandbox_id: "sb-jail-c".into(),
        },
    )
    .await
    .expect("kill c");
    assert!(w.leaf.dirs().iter().all(|d| !d.exists()));
    // Without the pool again: its refilled VM goes (with its slot, its cgroup).
    agent.register_template(TEMPLATE, template.clone(), None, "test-envd");
    eprintln!("[{:?}] a warm pool sandbox was jailed", started.elapsed());

    // b paused: nothing of it belongs to a VM uid any more; resumed: jailed again.
    let _: PauseResponse = call(
        &c,
        paths::PAUSE,
        PauseRequest {
            sandbox_id: "sb-jail-b".into(),
            keep_memory: true,
        },
    )
    .await
    .expect("pause b");
    for f in support::files_under(&b.root) {
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{} not root's", f.display());
    }
    assert!(b.leaf.dirs().iter().all(|d| !d.exists()));
    let _: ResumeResponse = call(
        &c,
        paths::RESUME,
        ResumeRequest {
            sandbox_id: "sb-jail-b".into(),
            envd_access_token: TOKEN.into(),
            ..Default::default()
        },
    )
    .await
    .expect("resume b");
    let b2 = qemu_of(&agent, "sb-jail-b");
    assert_ne!(b2.pid, b.pid);
    assert_jailed(&b2, &template, None);
    run_ok_with(&b2.base, opts(), "echo resumed").await;
    assert_eq!(hashes(&template), before, "the template changed");
    eprintln!("[{:?}] b paused and resumed, jailed", started.elapsed());

    // The start-up sweep removes an empty leaf a crashed agent left in its slot range, and
    // not the leaf of a running QEMU.
    let cgroups = jail::Cgroups::get().unwrap();
    let stale = cgroups
        .create(
            &format!("slot-{}", first + 3),
            &jail::Limits {
                cpu_quota_us: 100_000,
                memory_bytes: 64 << 20,
                pids: 8,
                io: None,
            },
        )
        .unwrap();
    assert!(stale.dirs().iter().all(|d| d.exists()));
    let swept = jail::sweep_leaves(first..first + 8).unwrap();
    assert!(stale.dirs().iter().all(|d| !d.exists()), "stale leaf kept");
    assert!(
        b2.leaf.dirs().iter().all(|d| d.exists()),
        "a live VM's leaf swept"
    );
    assert!(swept >= 1);

    server.abort();
    agent.shutdown().await;
    drop(agent);
    warm_slots.shutdown().await;
    assert!(b2.leaf.dirs().iter().all(|d| !d.exists()));
    let left = support::files_under(&sandboxes);
    assert!(left.is_empty(), "left in the sandboxes directory: {left:?}");
    assert!(
        support::qemu_pids_under(work.path()).is_empty(),
        "QEMU left"
    );
    std::fs::remove_dir_all(work.path().join("template")).unwrap();
    work.close().unwrap();
    eprintln!("jail lab done in {:?}", started.elapsed());
}
