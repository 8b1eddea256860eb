//! Runtime benchmark with real QEMU guests: create-from-template latency (restore until envd
//! answers, and until `/init` returns), pause and resume latency with a stated amount of dirty
//! guest memory, host memory (PSS) per idle sandbox, and, for the record, the pause strategies
//! that were not chosen (QEMU `mapped-ram` and plain migration of a privately mapped sandbox,
//! and copying the template memory file per sandbox).
//!
//! Gated by `WRENN_VM_TESTS=1`, like the VM tests; otherwise it says why and exits 0.
//! Run: `WRENN_VM_TESTS=1 cargo bench -p wrenn-agent --bench runtime`.
//! `WRENN_BENCH_CREATES` (default 20) sets the number of creates.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{new_slot, run_ok};
use wrenn_agent::accel::Accel;
use wrenn_agent::pool::{SlotPool, WarmPool};
use wrenn_agent::sandbox::{Deadlines, Failed, InitConfig, Sandbox};
use wrenn_agent::snapshot::Snapshot;
use wrenn_hostnet::Slot;
use wrenn_qmp::MigrationCapability;

const DIRTY_MIB: u32 = 64;

fn deadlines() -> Deadlines {
    Deadlines {
        health: Duration::from_secs(60),
        init: Duration::from_secs(30),
        prepare: Duration::from_secs(30),
        boot: Duration::from_secs(180),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (p50, p99, min, max) in ms; p99 is the nearest rank.
fn stats(samples: &[Duration]) -> (f64, f64, f64, f64) {
    let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(50.0), rank(99.0), v[0], v[v.len() - 1])
}

fn report(name: &str, samples: &[Duration]) {
    let (p50, p99, min, max) = stats(samples);
    println!(
        "{name:<48} n={:<3} p50={p50:>8.1} ms  p99={p99:>8.1} ms  (min {min:.1}, max {max:.1})",
        samples.len()
    );
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Pss:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{model}, {cores} cores, load {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

async fn create(
    template: &Snapshot,
    root: &Path,
) -> (Sandbox<Slot>, wrenn_agent::sandbox::Timings) {
    match Sandbox::create(
        template,
        new_slot().await,
        root,
        InitConfig::default(),
        None,
        &deadlines(),
    )
    .await
    {
        Ok(x) => x,
        Err(Failed { error, .. }) => panic!("create: {error:?}"),
    }
}

async fn dirty(sb: &Sandbox<Slot>, mib: u32) {
    run_ok(
        &sb.envd().base_url(),
        &format!(
            "mkdir -p /mnt/t && mount -t tmpfs -o size={}m tmpfs /mnt/t && dd if=/dev/urandom of=/mnt/t/blob bs=1048576 count={mib} 2>&1",
            mib + 16
        ),
    )
    .await;
}

fn main() {
    if std::env::var("WRENN_VM_TESTS").as_deref() != Ok("1") {
        println!(
            "runtime benchmark skipped: set WRENN_VM_TESTS=1 (needs root, QEMU, the guest kernel and a static envd)"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let creates: usize = std::env::var("WRENN_BENCH_CREATES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let work = tempfile::Builder::new()
        .prefix("wrenn-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path().to_owned();
    let accel = Accel::detect().unwrap();
    println!("machine: {}", machine());
    println!("accelerator: {accel}; guest: 512 MiB, 1 vCPU, small image (busybox + bash + envd)");
    let t = Instant::now();
    let template = support::build_template(&w.join("images"), &w.join("template"), &w).await;
    println!(
        "template image build + cold boot + snapshot: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let template = Snapshot::open(&template.dir).unwrap();

    // Create latency, one at a time; each sandbox is killed right after.
    let (mut restored, mut healthy, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..creates {
        let (sb, t) = create(&template, &w.join(format!("sb-{i}"))).await;
        restored.push(t.restored);
        healthy.push(t.healthy);
        total.push(t.total);
        drop(sb.kill().await);
    }
    report("create: QEMU running (restore)", &restored);
    report("create: envd /health answers", &healthy);
    report("create: /init done (ready)", &total);

    // Create latency through `Sandbox::create_pooled`, on pooled slots: cold (no warm pool)
    // and from a warm pool of one pre-started QEMU (waiting for it to refill before each
    // create, so every create finds one; the refill itself is not timed).
    let slots = SlotPool::new(2, support::pool_first_slot(), 4)
        .await
        .unwrap();
    let vms = w.join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let pool = WarmPool::start(template.clone(), "bench", slots.clone(), vms.clone(), 1);
    pool.set_refill_delay(Duration::ZERO);
    for warm in [false, true] {
        let (mut restored, mut total, mut warm_hits) = (Vec::new(), Vec::new(), 0);
        for i in 0..creates {
            if warm {
                assert!(
                    pool.wait_full(Duration::from_secs(120)).await,
                    "warm pool did not fill"
                );
            }
            let (sb, t) = match Sandbox::create_pooled(
                &template,
                warm.then_some(&pool),
                &slots,
                &w.join(format!("pooled-{warm}-{i}")),
                InitConfig::default(),
                None,
                &deadlines(),
            )
            .await
            {
                Ok(x) => x,
                Err(e) => panic!("create_pooled: {e:?}"),
            };
            warm_hits += usize::from(t.warm);
            restored.push(t.restored);
            total.push(t.total);
            // Let the guest finish its first request so the kill is not part of the next create.
            run_ok(&sb.envd().base_url(), "true").await;
            slots.release(sb.kill().await).await;
        }
        let label = if warm { "warm pool" } else { "no warm pool" };
        report(&format!("pooled create ({label}): QEMU running"), &restored);
        report(
            &format!("pooled create ({label}): /init done, {warm_hits}/{creates} warm"),
            &total,
        );
    }
    pool.shutdown().await;
    slots.shutdown().await;

    // PSS of idle sandboxes.
    let mut idle = Vec::new();
    for i in 0..3 {
        idle.push(create(&template, &w.join(format!("idle-{i}"))).await.0);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pss: Vec<u64> = idle.iter().map(|s| pss_kib(s.vm().pid())).collect();
    println!(
        "PSS per idle sandbox (QEMU, 3 running, 5 s idle): {:?} MiB",
        pss.iter().map(|k| k / 1024).collect::<Vec<_>>()
    );
    for sb in idle {
        drop(sb.kill().await);
    }

    // Pause/resume with a fresh sandbox (only what boot-to-idle touched is dirty) and with
    // 64 MiB written into a guest tmpfs.
    for (label, mib) in [("fresh", 0), ("64 MiB written", DIRTY_MIB)] {
        let (mut sb, _) = create(&template, &w.join(format!("pr-{mib}"))).await;
        if mib > 0 {
            dirty(&sb, mib).await;
        }
        let (mut pauses, mut resumes, mut dirty_mib) = (Vec::new(), Vec::new(), 0);
        let (mut saved, mut restored, mut healthy) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let (paused, slot, t) = match sb.pause(&deadlines()).await {
                Ok(x) => x,
                Err(e) => panic!("pause: {:?}", e.error()),
            };
            pauses.push(t.total);
            saved.push(t.saved - t.prepared);
            dirty_mib = t.dirty_bytes >> 20;
            let (s, rt) = match paused.resume(slot, &deadlines()).await {
                Ok(x) => x,
                Err(Failed { error, .. }) => panic!("resume: {error:?}"),
            };
            resumes.push(rt.total);
            restored.push(rt.restored);
            healthy.push(rt.healthy);
            sb = s;
        }
        report(&format!("pause ({label}; diff {dirty_mib} MiB)"), &pauses);
        report("  of which: stop + device state + diff, synced", &saved);
        report(&format!("resume to /init done ({label})"), &resumes);
        report("  of which: QEMU running (diff written, loaded)", &restored);
        report("  of which: envd /health answers", &healthy);
        drop(sb.kill().await);
    }

    // The strategies not chosen, each on a new sandbox with 64 MiB written.
    for (label, mapped) in [("mapped-ram", true), ("plain, unthrottled", false)] {
        let (sb, _) = create(&template, &w.join(format!("alt-{mapped}"))).await;
        dirty(&sb, DIRTY_MIB).await;
        let qmp = sb.vm().qmp();
        qmp.stop().await.unwrap();
        let out = w.join(format!("alt-{mapped}.mig"));
        qmp.migrate_set_capabilities(&[(MigrationCapability::MappedRam, mapped)])
            .await
            .unwrap();
        qmp.execute_raw(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 100_000 })),
        )
        .await
        .unwrap();
        let t = Instant::now();
        qmp.migrate(&format!("file:{}", out.display()))
            .await
            .unwrap();
        qmp.wait_migration(Duration::from_millis(2), Duration::from_secs(300))
            .await
            .unwrap();
        let took = t.elapsed();
        let meta = std::fs::metadata(&out).unwrap();
        use std::os::unix::fs::MetadataExt;
        println!(
            "alternative: migrate {label:<20} {:>8.1} ms, file {} MiB, allocated {} MiB (not synced)",
            ms(took),
            meta.len() >> 20,
            (meta.blocks() * 512) >> 20
        );
        std::fs::remove_file(&out).unwrap();
        drop(sb.kill().await);
    }
    let copy = w.join("memory-copy");
    let t = Instant::now();
    let ok = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(template.memory_path())
        .arg(&copy)
        .status()
        .unwrap()
        .success();
    let took = t.elapsed();
    let reflink = std::process::Command::new("cp")
        .args(["--reflink=always"])
        .arg(template.memory_path())
        .arg(w.join("memory-reflink"))
        .output()
        .unwrap()
        .status
        .success();
    println!(
        "alternative: per-sandbox copy of the template memory file (share=on restores): {:.1} ms (ok={ok}); reflink supported here: {reflink}",
        ms(took)
    );
    println!("(every per-sandbox copy also ends page-cache sharing between sandboxes)");
    drop(work);
}
