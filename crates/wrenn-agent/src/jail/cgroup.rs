//! Each QEMU's own cgroup leaf, with CPU, memory, pids and IO limits from its machine.
//!
//! **cgroup v2** (preferred): leaves live in `<mount>/wrenn/` directly under the hierarchy's
//! root (as Docker's cgroupfs driver does), so the agent itself stays wherever it is, outside
//! every leaf: a VM's memory hog is killed in its own leaf and cannot OOM the agent. The root
//! enables `cpu memory pids` (and `io` when the host has it) in its `cgroup.subtree_control`;
//! the real root is exempt from the "no internal processes" rule, but the root of a cgroup
//! namespace (a container) is not: if enabling there fails with `EBUSY`, the agent moves
//! itself into a leaf `wrenn-agent` of its own and tries again, and fails with a clear error if
//! other processes still sit there. `wrenn/` holds no process, so its `subtree_control` can
//! always be set. Limits: `cpu.max`, `memory.max` (`memory.swap.max` 0: guest RAM never goes
//! to swap behind the limit's back, `memory.oom.group` 1), `pids.max`, `io.max` on the block
//! device holding the VM's disk, else `io.weight` (a file system without one block device
//! under it, such as tmpfs or overlayfs, has nothing `io.max` can name).
//!
//! **cgroup v1** (hybrid hosts that bind `cpu`, `memory`, `pids` to v1 hierarchies, as the
//! development machine does): a leaf is one directory per hierarchy, nested under the agent's
//! own cgroup there (`<mount>/<own path>/wrenn/<leaf>`; v1 has no "no internal processes"
//! rule), with `cpu.cfs_quota_us`, `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`
//! where swap is accounted), `pids.max` and `blkio.throttle.*_device`. v1 charges buffered
//! writeback to the root, so the IO limit there binds reads and synchronous writes only.
//!
//! A host with neither fails at the first launch with [`CgroupError::Unavailable`]: the
//! operator was promised per-VM limits, and one guest starving the host is worse than a clear
//! refusal to start.
//!
//! Leaves are named after the slot the VM runs in (`slot-<index>`; slot indices are unique on
//! the machine while the slot exists) or `vm-<agent pid>-<n>` for a VM without a slot. QEMU
//! joins its leaf between fork and exec (by writing `0` to `cgroup.procs` through descriptors
//! opened before the fork), so no guest instruction runs outside it. A leaf is removed once
//! its QEMU is gone ([`Leaf::remove`]); [`Cgroups::sweep`] removes the empty leaves of a
//! crashed agent's slots at start (a leaf that still holds a process cannot be removed, so
//! sweeping never disturbs a live VM).

use std::io::Write as _;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// The directory under which leaves are made, in every hierarchy.
const PARENT: &str = "wrenn";
/// The agent's own leaf when a cgroup-namespace root must be emptied (v2 only).
const AGENT_LEAF: &str = "wrenn-agent";
/// The CPU quota period.
const CPU_PERIOD_US: u64 = 100_000;
/// Controllers a host must have.
const REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];

/// Why a cgroup could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host has no usable cgroup hierarchy for the required controllers.
    #[error(
        "no cgroup v2 hierarchy with the cpu, memory and pids controllers, and no cgroup v1 hierarchies for them: {0}"
    )]
    Unavailable(String),
    /// A cgroup file could not be written or read.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The v2 root of a cgroup namespace holds other processes, so controllers cannot be
    /// enabled below it.
    #[error(
        "cannot enable cgroup controllers in {0}: it holds processes other than this agent (run the agent in a cgroup of its own, e.g. a systemd unit with Delegate=yes)"
    )]
    Busy(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + use<> {
    let path = path.to_owned();
    move |source| CgroupError::Io { what, path, source }
}

/// The limits of one VM's leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per [`CPU_PERIOD_US`] (µs): vCPUs times the period.
    pub cpu_quota_us: u64,
    /// Memory (guest RAM plus QEMU's own overhead), bytes.
    pub memory_bytes: u64,
    /// Tasks (QEMU's threads).
    pub pids: u64,
    /// IO on the block device holding the disk (none on a file system without one).
    pub io: Option<IoLimit>,
}

/// An IO limit on one block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoLimit {
    /// The device (a whole disk, `major:minor`).
    pub device: (u32, u32),
    /// Bytes per second, each way.
    pub bps: u64,
    /// Operations per second, each way.
    pub iops: u64,
}

/// Which kind of hierarchy a host has.
#[derive(Debug, Clone)]
enum Backend {
    /// One unified hierarchy: leaves under `parent`; `io` says whether the io controller is on.
    V2 { parent: PathBuf, io: bool },
    /// One directory per controller (deduplicated by mount: `cpu,cpuacct` share one).
    V1 { parents: Vec<(String, PathBuf)> },
}

/// The host's cgroups, detected once per process ([`Cgroups::get`]).
#[derive(Debug)]
pub struct Cgroups {
    backend: Backend,
}

static CGROUPS: OnceLock<Result<Cgroups, String>> = OnceLock::new();

impl Cgroups {
    /// The host's cgroups, set up on first use (controllers enabled, the parent made).
    pub fn get() -> Result<&'static Cgroups, CgroupError> {
        CGROUPS
            .get_or_init(|| {
                let c = Self::detect().map_err(|e| crate::error_chain(&e))?;
                tracing::debug!(backend = ?c.backend, "cgroups for QEMU");
                Ok(c)
            })
            .as_ref()
            .map_err(|e| CgroupError::Unavailable(e.clone()))
    }

    /// `v2` or `v1`, for logs and tests.
    pub fn version(&self) -> u8 {
        match self.backend {
            Backend::V2 { .. } => 2,
            Backend::V1 { .. } => 1,
        }
    }

    fn detect() -> Result<Self, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io("read", Path::new("/proc/self/cgroup")))?;
        let mounts = parse_mounts(&mountinfo);
        let mut why = Vec::new();
        for m in mounts.iter().filter(|m| m.v2) {
            match v2_setup(&m.dir) {
                Ok(backend) => return Ok(Self { backend }),
                Err(e) => why.push(crate::error_chain(&e)),
            }
        }
        match v1_setup(&mounts, &own) {
            Ok(backend) => Ok(Self { backend }),
            Err(e) => {
                why.push(e);
                Err(CgroupError::Unavailable(why.join("; ")))
            }
        }
    }

    /// Makes leaf `name` (a stale empty one is replaced) with `limits`, ready for a process to
    /// join between fork and exec. A leaf that still holds processes is an error.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Leaf, CgroupError> {
        let dirs: Vec<PathBuf> = match &self.backend {
            Backend::V2 { parent, .. } => vec![parent.join(name)],
            Backend::V1 { parents } => parents.iter().map(|(_, p)| p.join(name)).collect(),
        };
        let leaf = Leaf { dirs };
        for d in &leaf.dirs {
            if d.exists() {
                // A stale leaf of a VM that is gone; rmdir fails while a process is in it.
                std::fs::remove_dir(d).map_err(io("remove the stale cgroup", d))?;
            }
            std::fs::create_dir(d).map_err(io("create", d))?;
        }
        let written = match &self.backend {
            Backend::V2 { io: has_io, .. } => v2_limits(&leaf.dirs[0], limits, *has_io),
            Backend::V1 { parents } => parents
                .iter()
                .zip(&leaf.dirs)
                .try_for_each(|((ctl, _), d)| v1_limits(ctl, d, limits)),
        };
        if let Err(e) = written {
            leaf.remove();
            return Err(e);
        }
        Ok(leaf)
    }

    /// The leaf `pid` is in, if it is one of ours (a QEMU taken over after a restart).
    pub fn leaf_of(&self, pid: u32) -> Option<Leaf> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let name = |path: &str| -> Option<String> {
            let (parent, name) = path.rsplit_once('/')?;
            (parent.ends_with(&format!("/{PARENT}")) || parent == format!("/{PARENT}"))
                .then(|| name.to_owned())
        };
        let leaf_name = text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
            let relevant = match &self.backend {
                Backend::V2 { .. } => ctls.is_empty(),
                Backend::V1 { .. } => ctls.split(',').any(|c| c == "memory"),
            };
            relevant.then(|| name(path)).flatten()
        })?;
        let dirs = match &self.backend {
            Backend::V2 { parent, .. } => vec![parent.join(&leaf_name)],
            Backend::V1 { parents } => parents.iter().map(|(_, p)| p.join(&leaf_name)).collect(),
        };
        Some(Leaf { dirs })
    }

    /// Removes the empty leaves whose names `pick` selects (those of a crashed agent's slots);
    /// returns how many went. A leaf with a process in it stays.
    pub fn sweep(&self, pick: impl Fn(&str) -> bool) -> usize {
        let parents: Vec<PathBuf> = match &self.backend {
            Backend::V2 { parent, .. } => vec![parent.clone()],
            Backend::V1 { parents } => parents.iter().map(|(_, p)| p.clone()).collect(),
        };
        let mut removed = 0;
        for p in parents {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && pick(&name) && std::fs::remove_dir(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// One VM's cgroup: a directory per hierarchy (one on v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    dirs: Vec<PathBuf>,
}

impl Leaf {
    /// Its directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Descriptors of its `cgroup.procs` files, to be written between fork and exec.
    pub(crate) fn procs_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(io("open", &p))
            })
            .collect()
    }

    /// Sets its CPU weight relative to its siblings' (`cpu.weight` on v2, 1..=10000, default
    /// 100; `cpu.shares` scaled to match on v1). Only the share of a contended CPU changes:
    /// its quota stays.
    pub fn set_cpu_weight(&self, weight: u32) -> Result<(), CgroupError> {
        let weight = weight.clamp(1, 10_000);
        for d in &self.dirs {
            let (file, value) = if d.join("cpu.weight").exists() {
                (d.join("cpu.weight"), weight.to_string())
            } else if d.join("cpu.shares").exists() {
                (
                    d.join("cpu.shares"),
                    (weight * 1024 / 100).max(2).to_string(),
                )
            } else {
                continue;
            };
            std::fs::write(&file, value).map_err(io("write", &file))?;
        }
        Ok(())
    }

    /// Removes it, waiting briefly for an exited process to leave it.
    pub fn remove(&self) {
        for d in &self.dirs {
            for attempt in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 49 => {
                        tracing::warn!(dir = %d.display(), error = %e, "cgroup leaf not removed");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

/// Moves the calling process into the leaves whose `cgroup.procs` descriptors are `fds`.
/// Only `write(2)`: callable between fork and exec.
pub(crate) fn join_on_exec(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: writes one byte from a static buffer to a descriptor opened before the fork.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    dir: PathBuf,
    /// The path inside the hierarchy that is mounted there (`/` unless bind-mounted).
    root: String,
    v2: bool,
    /// v1: the controllers bound to it.
    controllers: Vec<String>,
}

fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // id parent maj:min root mountpoint options [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let (root, dir, fstype) = (l[3], l[4], r[0]);
        match fstype {
            "cgroup2" => out.push(Mount {
                dir: PathBuf::from(unescape(dir)),
                root: root.to_owned(),
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => out.push(Mount {
                dir: PathBuf::from(unescape(dir)),
                root: root.to_owned(),
                v2: false,
                controllers: r[2].split(',').map(str::to_owned).collect(),
            }),
            _ => {}
        }
    }
    // The usual place first.
    out.sort_by_key(|m| m.dir != Path::new("/sys/fs/cgroup"));
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io("open", path))?;
    f.write_all(value.as_bytes()).map_err(io("write", path))
}

/// Enables the controllers in `<mount>/cgroup.subtree_control` and makes `<mount>/wrenn`.
fn v2_setup(mount: &Path) -> Result<Backend, CgroupError> {
    let available = read_words(&mount.join("cgroup.controllers"));
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| !available.iter().any(|a| a == c))
        .collect();
    if !missing.is_empty() {
        return Err(CgroupError::Unavailable(format!(
            "{} lacks {}",
            mount.display(),
            missing.join(", ")
        )));
    }
    let has_io = available.iter().any(|a| a == "io");
    let mut want: Vec<&str> = REQUIRED.to_vec();
    if has_io {
        want.push("io");
    }
    enable(mount, &want, true)?;
    let parent = mount.join(PARENT);
    std::fs::create_dir_all(&parent).map_err(io("create", &parent))?;
    enable(&parent, &want, false)?;
    Ok(Backend::V2 { parent, io: has_io })
}

/// Writes `+c` for every controller not yet in `dir/cgroup.subtree_control`. On `EBUSY` (a
/// cgroup-namespace root with processes in it) and with `move_self`, the agent moves itself
/// into a leaf of its own first.
fn enable(dir: &Path, controllers: &[&str], move_self: bool) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let on = read_words(&path);
    let add: Vec<String> = controllers
        .iter()
        .filter(|c| !on.iter().any(|o| o == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if add.is_empty() {
        return Ok(());
    }
    let line = add.join(" ");
    match write_file(&path, &line) {
        Err(CgroupError::Io { source, .. })
            if source.raw_os_error() == Some(libc::EBUSY) && move_self =>
        {
            let me = dir.join(AGENT_LEAF);
            std::fs::create_dir_all(&me).map_err(io("create", &me))?;
            write_file(&me.join("cgroup.procs"), "0")?;
            write_file(&path, &line).map_err(|_| CgroupError::Busy(dir.to_owned()))
        }
        other => other,
    }
}

/// Finds the v1 hierarchies of the controllers and makes `wrenn/` under the agent's own
/// cgroup in each.
fn v1_setup(mounts: &[Mount], own: &str) -> Result<Backend, String> {
    let mut parents: Vec<(String, PathBuf)> = Vec::new();
    let mut wanted: Vec<&str> = REQUIRED.to_vec();
    wanted.push("blkio");
    for ctl in wanted {
        let Some(m) = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctl))
        else {
            if ctl == "blkio" {
                continue;
            }
            return Err(format!("no cgroup v1 hierarchy for {ctl}"));
        };
        if parents.iter().any(|(_, p)| p.starts_with(&m.dir)) {
            continue;
        }
        let own_path = own
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctls, path) = (f.next()?, f.next()?, f.next()?);
                ctls.split(',').any(|c| c == ctl).then(|| path.to_owned())
            })
            .unwrap_or_else(|| "/".into());
        // A bind-mounted subtree (a container's view) shows paths relative to its root.
        let rel = own_path
            .strip_prefix(m.root.trim_end_matches('/'))
            .unwrap_or(&own_path)
            .trim_start_matches('/');
        let parent = m.dir.join(rel).join(PARENT);
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("create {}: {e}", parent.display()))?;
        parents.push((ctl.to_owned(), parent));
    }
    Ok(Backend::V1 { parents })
}

fn v2_limits(dir: &Path, l: &Limits, has_io: bool) -> Result<(), CgroupError> {
    write_file(
        &dir.join("cpu.max"),
        &format!("{} {CPU_PERIOD_US}", l.cpu_quota_us),
    )?;
    write_file(&dir.join("memory.max"), &l.memory_bytes.to_string())?;
    // Not every kernel accounts swap; without swap there is nothing to limit.
    let swap = dir.join("memory.swap.max");
    if swap.exists() {
        write_file(&swap, "0")?;
    }
    write_file(&dir.join("memory.oom.group"), "1")?;
    write_file(&dir.join("pids.max"), &l.pids.to_string())?;
    if !has_io {
        return Ok(());
    }
    let max_set = l.io.is_some_and(|io| {
        let (maj, min) = io.device;
        let line = format!(
            "{maj}:{min} rbps={b} wbps={b} riops={i} wiops={i}",
            b = io.bps,
            i = io.iops
        );
        match write_file(&dir.join("io.max"), &line) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "io.max refused for the disk's device; io.weight only");
                false
            }
        }
    });
    if !max_set {
        // Proportional only (and only with a scheduler or iocost that honours it).
        let _ = write_file(&dir.join("io.weight"), "default 100");
    }
    Ok(())
}

fn v1_limits(ctl: &str, dir: &Path, l: &Limits) -> Result<(), CgroupError> {
    match ctl {
        "cpu" => {
            write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write_file(&dir.join("cpu.cfs_quota_us"), &l.cpu_quota_us.to_string())
        }
        "memory" => {
            write_file(
                &dir.join("memory.limit_in_bytes"),
                &l.memory_bytes.to_string(),
            )?;
            // Only where swap is accounted (after limit_in_bytes: memsw may not be lower).
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                let _ = write_file(&memsw, &l.memory_bytes.to_string());
            }
            Ok(())
        }
        "pids" => write_file(&dir.join("pids.max"), &l.pids.to_string()),
        "blkio" => {
            let Some(io) = l.io else {
                return Ok(());
            };
            let (maj, min) = io.device;
            let mut refused = None;
            for (file, v) in [
                ("blkio.throttle.read_bps_device", io.bps),
                ("blkio.throttle.write_bps_device", io.bps),
                ("blkio.throttle.read_iops_device", io.iops),
                ("blkio.throttle.write_iops_device", io.iops),
            ] {
                if let Err(e) = write_file(&dir.join(file), &format!("{maj}:{min} {v}")) {
                    refused = Some(e);
                }
            }
            if let Some(e) = refused {
                tracing::warn!(error = %crate::error_chain(&e), "blkio throttle refused for the disk's device; weight only");
                let _ = write_file(&dir.join("blkio.bfq.weight"), "100");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The whole disk (`major:minor`) holding the file system `path` is on, if there is one block
/// device under it.
pub fn disk_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    if maj == 0 {
        // tmpfs, overlayfs, btrfs subvolumes...: no single block device.
        return None;
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    if !sys.exists() {
        return None;
    }
    if sys.join("partition").exists() {
        // io.max and blkio throttling take whole disks.
        let parent = std::fs::read_to_string(sys.join("../dev")).ok()?;
        let (a, b) = parent.trim().split_once(':')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    Some((maj, min))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_and_unified_mounts() {
        let info = "\
29 23 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
30 29 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
31 29 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 29 0:29 /process_api /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
40 23 0:30 / /sys/fs/cgroup/with\\040space rw - cgroup2 none rw";
        let m = parse_mounts(info);
        assert_eq!(m.len(), 4);
        assert!(m[0].v2 && m[0].dir == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].controllers, ["rw", "cpu", "cpuacct"]);
        assert_eq!(m[2].root, "/process_api");
        assert_eq!(m[3].dir, Path::new("/sys/fs/cgroup/with space"));
    }

    /// A fake v2 root in a temporary directory: the files the kernel would offer.
    fn fake_v2(dir: &Path, controllers: &str) {
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
    }

    #[test]
    fn v2_enables_controllers_and_writes_limits() {
        let root = tempfile::tempdir().unwrap();
        fake_v2(root.path(), "cpuset cpu io memory pids\n");
        // The kernel makes a new cgroup's files; the fake one needs them made.
        std::fs::create_dir(root.path().join(PARENT)).unwrap();
        std::fs::write(root.path().join(PARENT).join("cgroup.subtree_control"), "").unwrap();
        let Backend::V2 { parent, io } = v2_setup(root.path()).unwrap() else {
            panic!("not v2");
        };
        assert!(io);
        assert_eq!(parent, root.path().join(PARENT));
        // A real kernel keeps one line; the fake file keeps what was written.
        let enabled = std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(enabled, "+cpu +memory +pids +io");
        let below = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap();
        assert_eq!(below, "+cpu +memory +pids +io");
        let leaf = parent.join("slot-7");
        std::fs::create_dir_all(&leaf).unwrap();
        for f in [
            "cpu.max",
            "memory.max",
            "memory.swap.max",
            "memory.oom.group",
            "pids.max",
            "io.max",
        ] {
            std::fs::write(leaf.join(f), "").unwrap();
        }
        let limits = Limits {
            cpu_quota_us: 200_000,
            memory_bytes: 640 << 20,
            pids: 130,
            io: Some(IoLimit {
                device: (254, 0),
                bps: 1 << 27,
                iops: 2000,
            }),
        };
        v2_limits(&leaf, &limits, true).unwrap();
        let read = |f: &str| std::fs::read_to_string(leaf.join(f)).unwrap();
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(read("memory.max"), (640u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("pids.max"), "130");
        assert_eq!(
            read("io.max"),
            "254:0 rbps=134217728 wbps=134217728 riops=2000 wiops=2000"
        );
    }

    #[test]
    fn v2_without_a_required_controller_is_unavailable() {
        let root = tempfile::tempdir().unwrap();
        fake_v2(root.path(), "hugetlb\n");
        let e = v2_setup(root.path()).unwrap_err();
        assert!(
            e.to_string().contains("cpu") || crate::error_chain(&e).contains("cpu, memory, pids"),
            "{}",
            crate::error_chain(&e)
        );
    }

    #[test]
    fn v1_nests_under_the_agents_own_cgroup() {
        let base = tempfile::tempdir().unwrap();
        let (cpu, mem) = (base.path().join("cpu,cpuacct"), base.path().join("memory"));
        let pids = base.path().join("pids");
        for d in [&cpu, &mem, &pids] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mounts = vec![
            Mount {
                dir: cpu.clone(),
                root: "/".into(),
                v2: false,
                controllers: vec!["rw".into(), "cpu".into(), "cpuacct".into()],
            },
            Mount {
                dir: mem.clone(),
                root: "/".into(),
                v2: false,
                controllers: vec!["memory".into()],
            },
            Mount {
                dir: pids.clone(),
                root: "/".into(),
                v2: false,
                controllers: vec!["pids".into()],
            },
        ];
        let own = "4:memory:/box/1\n3:cpu,cpuacct:/\n2:pids:/\n0::/\n";
        let Backend::V1 { parents } = v1_setup(&mounts, own).unwrap() else {
            panic!("not v1");
        };
        assert_eq!(
            parents,
            [
                ("cpu".to_owned(), cpu.join(PARENT)),
                ("memory".to_owned(), mem.join("box/1").join(PARENT)),
                ("pids".to_owned(), pids.join(PARENT)),
            ]
        );
        let none = v1_setup(&mounts[..1], own).unwrap_err();
        assert!(none.contains("memory"), "{none}");
    }
}
