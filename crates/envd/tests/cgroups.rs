//! Containment: a fork bomb and a memory hog started through `process.Process/Start` must not
//! take envd down.
//!
//! envd runs inside test cgroups created here (cgroup v1 `pids` + `memory` on hybrid hosts, or
//! one cgroup v2 group), with pids.max = 256 and a 512 MiB memory limit, so nothing this test
//! starts can run unbounded. Everything in the groups is SIGKILLed and the groups removed when
//! the test ends, pass or fail. Without usable controllers the test prints why and skips.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

const PIDS_MAX: u64 = 256;
const MEMORY_LIMIT: u64 = 512 * 1024 * 1024;

/// The test's cgroups; killed and removed on drop.
struct TestCgroups {
    /// Group directories, in creation order.
    dirs: Vec<PathBuf>,
    /// The group holding pids.current, and the file of memory limit hits.
    pids_dir: PathBuf,
    memory_events: (PathBuf, &'static str),
}

impl TestCgroups {
    /// Creates the groups, or says why they cannot be created.
    fn create() -> Result<TestCgroups, String> {
        let name = format!("wrenn-test-{:016x}", rand::random::<u64>());
        let v2 = Path::new("/sys/fs/cgroup");
        if let (Some(v1_pids), Some(v1_mem)) = (v1_current("pids"), v1_current("memory")) {
            let (v1_pids, v1_mem) = (v1_pids.as_path(), v1_mem.as_path());
            let mut cg = TestCgroups {
                dirs: Vec::new(),
                pids_dir: v1_pids.join(&name),
                memory_events: (v1_mem.join(&name).join("memory.failcnt"), ""),
            };
            cg.mkdir(&v1_pids.join(&name))?;
            write(&v1_pids.join(&name).join("pids.max"), &PIDS_MAX.to_string())?;
            cg.mkdir(&v1_mem.join(&name))?;
            write(
                &v1_mem.join(&name).join("memory.limit_in_bytes"),
                &MEMORY_LIMIT.to_string(),
            )?;
            return Ok(cg);
        }
        let controllers =
            std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "pids")
            && controllers.split_whitespace().any(|c| c == "memory")
        {
            let dir = v2.join(&name);
            let mut cg = TestCgroups {
                dirs: Vec::new(),
                pids_dir: dir.clone(),
                memory_events: (dir.join("memory.events"), "max"),
            };
            cg.mkdir(&dir)?;
            write(&dir.join("pids.max"), &PIDS_MAX.to_string())?;
            write(&dir.join("memory.max"), &MEMORY_LIMIT.to_string())?;
            write(&dir.join("memory.swap.max"), "0").ok();
            return Ok(cg);
        }
        Err("neither cgroup v1 pids+memory hierarchies nor a cgroup v2 root with pids and memory delegated".into())
    }

    fn mkdir(&mut self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        self.dirs.push(dir.to_owned());
        Ok(())
    }

    /// The shell prefix that moves the shell into every group before it execs envd.
    fn join_script(&self) -> String {
        self.dirs
            .iter()
            .map(|d| format!("echo $$ > {}/cgroup.procs && ", d.display()))
            .collect()
    }

    fn procs(&self) -> Vec<i32> {
        let mut all: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    fn pids_current(&self) -> u64 {
        read_u64(&self.pids_dir.join("pids.current"))
    }

    /// How often the memory limit was hit (v1 failcnt, v2 `max` events).
    fn memory_limit_hits(&self) -> u64 {
        let (file, key) = &self.memory_events;
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if key.is_empty() {
            text.trim().parse().unwrap_or(0)
        } else {
            text.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0)
        }
    }

    /// OOM kills inside the group (`oom_kill` of v1 `memory.oom_control` or v2 `memory.events`),
    /// if the kernel reports them.
    fn oom_kills(&self) -> Option<u64> {
        let dir = self.memory_events.0.parent()?;
        let file = if self.memory_events.1.is_empty() {
            "memory.oom_control"
        } else {
            "memory.events"
        };
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    }

    /// SIGKILLs everything in the groups until they are empty (a fork bomb keeps forking while
    /// it is being killed, so one pass is not enough).
    fn kill_all(&self) -> Duration {
        let start = Instant::now();
        for d in &self.dirs {
            // cgroup v2 kills the whole group atomically where it can.
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
        }
        while start.elapsed() < Duration::from_secs(30) {
            let procs = self.procs();
            if procs.is_empty() {
                break;
            }
            for p in procs {
                // SAFETY: kill(2) with a pid read from the test's own cgroup and a constant signal.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        let took = self.kill_all();
        eprintln!("test cgroups emptied in {took:?}");
        for d in self.dirs.iter().rev() {
            // Exited tasks leave the group asynchronously; retry briefly.
            let mut removed = false;
            for _ in 0..200 {
                if std::fs::remove_dir(d).is_ok() {
                    removed = true;
                    break;
                }
                self.kill_all();
                std::thread::sleep(Duration::from_millis(25));
            }
            if !removed {
                eprintln!("WARNING: could not remove {}", d.display());
            }
        }
    }
}

/// The cgroup v1 directory of `controller` this process is in, if that hierarchy is mounted.
/// Test groups go below it, so whatever limits the test runs under still apply.
fn v1_current(controller: &str) -> Option<PathBuf> {
    let mount = Path::new("/sys/fs/cgroup").join(controller);
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.trim_start_matches('/').to_owned())
    })?;
    let dir = mount.join(path);
    dir.join("cgroup.procs").exists().then_some(dir)
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("write {}: {e}", path.display()))
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Starts `script` with bash through the process service and returns the open response stream
/// after its start event (the process lives while the stream is open or not; envd owns it).
async fn start(envd: &support::Envd, script: &str) -> support::Stream {
    let mut s = envd
        .stream(
            "/process.Process/Start",
            json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}}),
            &[],
        )
        .await;
    match s.next_within(Duration::from_secs(10)).await {
        Some(support::Item::Message(m)) => {
            assert!(
                m["event"]["start"]["pid"].as_u64().is_some(),
                "expected a start event, got {m}"
            );
        }
        other => panic!("Start of {script:?} did not start: {other:?}"),
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_and_memory_hog_leave_envd_responsive() {
    let cgroups = match TestCgroups::create() {
        Ok(c) => c,
        Err(reason) => {
            eprintln!("SKIPPED fork_bomb_and_memory_hog_leave_envd_responsive: {reason}");
            return;
        }
    };
    let script = format!("{}exec \"$0\" \"$@\"", cgroups.join_script());
    let envd = support::start_envd_via(
        "/bin/sh",
        &[
            "-c",
            &script,
            support::envd_bin(),
            "--listen",
            "127.0.0.1:0",
            "--no-cgroups",
            "--no-port-forward",
        ],
    );
    assert!(
        cgroups.procs().contains(&(envd.pid() as i32)),
        "envd runs inside the test cgroups"
    );

    // The hog first: once the bomb holds every PID, nothing more can be started.
    let _hog = start(&envd, "while :; do tail /dev/zero; done").await;
    let _bomb = start(&envd, ":(){ :|:& };:").await;

    // Wait until both limits are actually being hit.
    let t = Instant::now();
    while cgroups.pids_current() < PIDS_MAX - 8 || cgroups.memory_limit_hits() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "limits not reached: pids.current {} memory limit hits {}",
            cgroups.pids_current(),
            cgroups.memory_limit_hits()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "limits reached after {:?}: pids.current {}, memory limit hits {}",
        t.elapsed(),
        cgroups.pids_current(),
        cgroups.memory_limit_hits()
    );

    // envd keeps answering, every time, quickly (D1/D2: p99 < 2 s).
    let mut latencies = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            envd.client.get(envd.url("/health")).send(),
        )
        .await
        .unwrap_or_else(|_| panic!("/health #{i} timed out under the fork bomb"))
        .unwrap_or_else(|e| panic!("/health #{i} failed under the fork bomb: {e}"));
        assert_eq!(resp.status().as_u16(), 204, "/health #{i}");
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    eprintln!(
        "/health under fork bomb + memory hog: p50 {p50:?}, max {max:?}; pids.current {}, memory limit hits {}",
        cgroups.pids_current(),
        cgroups.memory_limit_hits()
    );
    assert!(max < Duration::from_secs(2), "/health took {max:?}");
    if let Some(kills) = cgroups.oom_kills() {
        eprintln!("OOM kills inside the test memory group: {kills}");
        assert!(kills > 0, "the memory hog was never OOM-killed");
    }
    // Still envd: the OOM killer took the hog, not the daemon.
    assert!(
        cgroups.procs().contains(&(envd.pid() as i32)),
        "envd survived"
    );

    drop(cgroups);
}
