//! cgroup v2 layout that keeps envd alive whatever user code does.
//!
//! User code that eats all memory or forks without bound used to starve or OOM-kill envd
//! (E2B#339, infra#1580, infra#2073). So, under the cgroup v2 root:
//! - `envd/`: envd itself, with `memory.min`/`memory.low` protection and a high `cpu.weight`;
//!   envd also sets its own `oom_score_adj` to -1000;
//! - `user/` (commands) and `ptys/` (terminals): a hard `memory.max` (and `memory.high`) of
//!   total − min(total/8, 128 MiB), so the cgroup OOM killer fires inside the group before the
//!   global one, and a bounded `pids.max` so a fork bomb cannot take the last PIDs;
//! - the controllers enabled in the root's `cgroup.subtree_control`. A non-root cgroup with
//!   controllers enabled for its children cannot hold processes itself, which is why envd
//!   moves into `envd/` first.
//!
//! Where cgroup v2 with the memory and pids controllers is absent (plain processes, hosts on
//! cgroup v1) envd logs one warning and runs without groups: [`Cgroups::procs_path`] is `None`.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Where a spawned process goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Commands started without a PTY.
    User,
    /// Interactive terminals.
    Pty,
}

impl Group {
    fn dir(self) -> &'static str {
        match self {
            Group::User => "user",
            Group::Pty => "ptys",
        }
    }
}

const ENVD_DIR: &str = "envd";
const MIB: u64 = 1024 * 1024;
/// Memory envd always keeps (infra#1580: 50 MB min, 100 MB low).
const ENVD_MEMORY_MIN: u64 = 50 * MIB;
const ENVD_MEMORY_LOW: u64 = 100 * MIB;
/// What the workload groups leave to envd and the kernel, at most.
const RESERVE_MAX: u64 = 128 * MIB;

/// Why the layout could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy at {0} (no readable cgroup.controllers)")]
    NotV2(PathBuf),
    #[error("cgroup v2 at {root} lacks the controller(s): {missing}")]
    MissingControllers { root: PathBuf, missing: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the limits are computed from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Host {
    /// `MemTotal`, bytes.
    pub(crate) total_memory: u64,
    /// min(`kernel.threads-max`, `kernel.pid_max`): what `pids.max` counts against.
    pub(crate) max_tasks: u64,
    /// The process to move into `envd/`.
    pub(crate) pid: u32,
}

impl Host {
    /// This machine, as `/proc` describes it.
    fn current() -> Host {
        let total_memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| parse_mem_total(&m))
            .unwrap_or(512 * MIB);
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        let max_tasks = match (
            read("/proc/sys/kernel/threads-max"),
            read("/proc/sys/kernel/pid_max"),
        ) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => 4096,
        };
        Host {
            total_memory,
            max_tasks,
            pid: std::process::id(),
        }
    }
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The limits for a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `memory.max` and `memory.high` of `user/` and `ptys/`.
    pub(crate) workload_memory: u64,
    /// `pids.max` of each of `user/` and `ptys/`: together at most 3/4 of the kernel's tasks,
    /// so envd and the system keep the rest during a fork bomb.
    pub(crate) workload_pids: u64,
}

impl Limits {
    pub(crate) fn for_host(host: &Host) -> Limits {
        let reserve = (host.total_memory / 8).min(RESERVE_MAX);
        Limits {
            workload_memory: host.total_memory.saturating_sub(reserve).max(MIB),
            workload_pids: (host.max_tasks * 3 / 8).clamp(128, 32768),
        }
    }
}

/// envd's cgroups, or nothing where cgroup v2 is absent.
pub struct Cgroups {
    /// The cgroup v2 root the layout lives under; `None` when degraded.
    root: Option<PathBuf>,
}

impl Cgroups {
    pub fn setup(config: &Config) -> Self {
        let disabled = Cgroups { root: None };
        if config.no_cgroups {
            tracing::debug!("cgroups disabled by configuration");
            return disabled;
        }
        match apply(&config.cgroup_root, &Host::current()) {
            Ok(()) => {
                // Children raise theirs again before exec (the process module writes 100), so
                // the OOM killer picks user code, never envd.
                if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
                    tracing::warn!(error = %e, "cannot set envd's oom_score_adj");
                }
                tracing::info!(root = %config.cgroup_root.display(), "cgroups set up");
                Cgroups {
                    root: Some(config.cgroup_root.clone()),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cgroup v2 unusable; running without cgroups");
                disabled
            }
        }
    }

    /// The `cgroup.procs` file a new process of `group` must join, if cgroups are in use.
    ///
    /// The process module opens it before fork and writes `0` to it in the child before exec,
    /// so the process (and all it forks) starts inside the group.
    pub fn procs_path(&self, group: Group) -> Option<PathBuf> {
        Some(self.root.as_ref()?.join(group.dir()).join("cgroup.procs"))
    }

    /// The directory of `group`, if cgroups are in use (for `cgroup.kill`, `pids.current`, ...).
    pub fn group_dir(&self, group: Group) -> Option<PathBuf> {
        Some(self.root.as_ref()?.join(group.dir()))
    }
}

/// Creates the layout under `root` and moves `host.pid` into `envd/`.
///
/// Memory and pids settings are required (they are the point); CPU and IO weights are
/// best-effort because those controllers may be missing.
pub(crate) fn apply(root: &Path, host: &Host) -> Result<(), CgroupError> {
    let controllers_file = root.join("cgroup.controllers");
    let available: HashSet<String> = match std::fs::read_to_string(&controllers_file) {
        Ok(s) => s.split_whitespace().map(str::to_owned).collect(),
        Err(_) => return Err(CgroupError::NotV2(root.to_owned())),
    };
    let missing: Vec<&str> = ["memory", "pids"]
        .into_iter()
        .filter(|c| !available.contains(*c))
        .collect();
    if !missing.is_empty() {
        return Err(CgroupError::MissingControllers {
            root: root.to_owned(),
            missing: missing.join(" "),
        });
    }
    let limits = Limits::for_host(host);

    for dir in [ENVD_DIR, Group::User.dir(), Group::Pty.dir()] {
        let path = root.join(dir);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(CgroupError::Io {
                    what: "create cgroup",
                    path,
                    source: e,
                });
            }
        }
    }
    // Out of the root before enabling controllers for its children.
    write(
        root,
        &format!("{ENVD_DIR}/cgroup.procs"),
        &host.pid.to_string(),
    )?;

    for c in ["memory", "pids"] {
        write(root, "cgroup.subtree_control", &format!("+{c}"))?;
    }
    for c in ["cpu", "io"] {
        if available.contains(c) {
            best_effort(root, "cgroup.subtree_control", &format!("+{c}"));
        }
    }

    write(
        root,
        &format!("{ENVD_DIR}/memory.min"),
        &ENVD_MEMORY_MIN.to_string(),
    )?;
    write(
        root,
        &format!("{ENVD_DIR}/memory.low"),
        &ENVD_MEMORY_LOW.to_string(),
    )?;
    best_effort(root, &format!("{ENVD_DIR}/cpu.weight"), "1000");

    for (group, cpu, io) in [(Group::User, "50", "10"), (Group::Pty, "200", "50")] {
        let d = group.dir();
        write(
            root,
            &format!("{d}/memory.max"),
            &limits.workload_memory.to_string(),
        )?;
        write(
            root,
            &format!("{d}/memory.high"),
            &limits.workload_memory.to_string(),
        )?;
        write(
            root,
            &format!("{d}/pids.max"),
            &limits.workload_pids.to_string(),
        )?;
        best_effort(root, &format!("{d}/cpu.weight"), cpu);
        best_effort(root, &format!("{d}/io.weight"), &format!("default {io}"));
    }
    Ok(())
}

/// One write of `value` to a control file (cgroupfs takes each write as one command).
fn write(root: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = root.join(file);
    std::fs::write(&path, value).map_err(|e| CgroupError::Io {
        what: "write",
        path,
        source: e,
    })
}

fn best_effort(root: &Path, file: &str, value: &str) {
    if let Err(e) = write(root, file, value) {
        tracing::debug!(error = %e, "optional cgroup setting not applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * MIB;

    fn host(total: u64) -> Host {
        Host {
            total_memory: total,
            max_tasks: 4096,
            pid: 4242,
        }
    }

    /// A directory tree shaped like a cgroup v2 root with `controllers` available.
    fn fake_root(controllers: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
        dir
    }

    fn read(root: &Path, file: &str) -> String {
        std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    #[test]
    fn limits_follow_memory_size() {
        // Small guests keep 1/8, large ones 128 MiB.
        assert_eq!(
            Limits::for_host(&host(512 * MIB)).workload_memory,
            448 * MIB
        );
        assert_eq!(
            Limits::for_host(&host(8 * GIB)).workload_memory,
            8 * GIB - 128 * MIB
        );
        assert_eq!(Limits::for_host(&host(4 * GIB)).workload_pids, 1536);
        let tiny = Host {
            total_memory: 64 * MIB,
            max_tasks: 100,
            pid: 1,
        };
        assert_eq!(Limits::for_host(&tiny).workload_pids, 128);
        let huge = Host {
            total_memory: 64 * GIB,
            max_tasks: 4_000_000,
            pid: 1,
        };
        assert_eq!(Limits::for_host(&huge).workload_pids, 32768);
    }

    #[test]
    fn parses_meminfo() {
        let m = "MemTotal:        2028108 kB\nMemFree:          123 kB\n";
        assert_eq!(parse_mem_total(m), Some(2028108 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
    }

    #[test]
    fn applies_the_layout() {
        let root = fake_root("cpuset cpu io memory hugetlb pids rdma misc\n");
        let r = root.path();
        apply(r, &host(GIB)).unwrap();
        assert_eq!(read(r, "envd/cgroup.procs"), "4242");
        assert_eq!(read(r, "envd/memory.min"), (50 * MIB).to_string());
        assert_eq!(read(r, "envd/memory.low"), (100 * MIB).to_string());
        assert_eq!(read(r, "envd/cpu.weight"), "1000");
        for d in ["user", "ptys"] {
            assert_eq!(
                read(r, &format!("{d}/memory.max")),
                (GIB - 128 * MIB).to_string()
            );
            assert_eq!(
                read(r, &format!("{d}/memory.high")),
                (GIB - 128 * MIB).to_string()
            );
            assert_eq!(read(r, &format!("{d}/pids.max")), "1536");
        }
        assert_eq!(read(r, "user/cpu.weight"), "50");
        assert_eq!(read(r, "ptys/cpu.weight"), "200");
        assert_eq!(read(r, "ptys/io.weight"), "default 50");
        // Each controller is its own write; a plain file keeps the last one.
        assert_eq!(read(r, "cgroup.subtree_control"), "+io");
        // A second run (envd restarted) finds the groups in place and succeeds.
        apply(r, &host(GIB)).unwrap();
    }

    #[test]
    fn procs_paths_point_into_the_groups() {
        let root = fake_root("memory pids");
        let cg = Cgroups {
            root: Some(root.path().to_owned()),
        };
        assert_eq!(
            cg.procs_path(Group::User),
            Some(root.path().join("user/cgroup.procs"))
        );
        assert_eq!(
            cg.procs_path(Group::Pty),
            Some(root.path().join("ptys/cgroup.procs"))
        );
    }

    #[test]
    fn degrades_without_v2() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            apply(dir.path(), &host(GIB)),
            Err(CgroupError::NotV2(_))
        ));
        // A v2 mount without controllers (a v1 hybrid host's "unified" tree).
        let root = fake_root("");
        match apply(root.path(), &host(GIB)) {
            Err(CgroupError::MissingControllers { missing, .. }) => {
                assert_eq!(missing, "memory pids")
            }
            other => panic!("expected MissingControllers, got {other:?}"),
        }
        assert!(
            !root.path().join("envd").exists(),
            "nothing created when degrading"
        );
    }

    #[test]
    fn setup_degrades_on_this_kind_of_host() {
        use clap::Parser;
        let root = fake_root("");
        let cfg = Config::parse_from(["envd", "--cgroup-root", root.path().to_str().unwrap()]);
        let cg = Cgroups::setup(&cfg);
        assert_eq!(cg.procs_path(Group::User), None);
        let cfg = Config::for_tests();
        assert_eq!(Cgroups::setup(&cfg).procs_path(Group::Pty), None);
    }

    #[test]
    fn write_errors_name_the_file() {
        let root = fake_root("memory pids");
        // envd/ as a file: creating the group fails.
        std::fs::write(root.path().join("envd"), "").unwrap();
        let e = apply(root.path(), &host(GIB)).unwrap_err();
        assert!(e.to_string().contains("envd"), "{e}");
    }
}
