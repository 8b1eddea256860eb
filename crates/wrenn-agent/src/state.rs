//! Recovery after the owning process crashed: finding again what an earlier agent left under
//! its VMs root, from each directory's record (`crate::record`) and the processes running.
//!
//! [`scan`] sorts every directory into: running and adoptable (the record says running, QEMU
//! alive with the recorded start time, so a recycled pid is never mistaken for our QEMU, and
//! answering QMP), paused (a pause cut short after its snapshot was complete is finished
//! first, a resume cut short undone: both leave a paused sandbox), kept (a record this agent
//! cannot read: a newer agent's, or a corrupt one next to files worth keeping; left alone and
//! reported), or garbage: what provably holds nothing, i.e. no record at all, a warm pool VM,
//! a create that never finished, a running record whose QEMU is gone or does not answer, a
//! corrupt record with no snapshot files and no QEMU. It also lists QEMU processes under the
//! root that nothing accounts for, and slot namespaces and host veths that no adoptable VM
//! uses. [`Scan::clean`] removes the garbage: kills stray QEMU (only after re-checking the
//! start time), deletes directories, orphan namespaces and veths.
//!
//! A scan judges a VM whose QMP does not answer as garbage, so it must not run while another
//! agent owns the same VMs root: take [`OwnerLock`] first (a `flock` on a file in the root,
//! released by the kernel when its holder dies, so a crash frees it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use wrenn_hostnet::{HOST_VETH_PREFIX, NETNS_PREFIX, Slot, SlotError};
use wrenn_qmp::Qmp;

use crate::record::{Phase, RecordError, SandboxRecord, VmProcess};

/// How long a QMP connection may take during a scan.
const QMP_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A paused snapshot's files: a directory with one of them is never garbage unless its record
/// says so.
const SNAPSHOT_FILES: [&str; 2] = ["state", "memory.diff"];

/// Why a scan step failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Slot handling failed.
    #[error(transparent)]
    Slot(#[from] SlotError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io { what, path, source }
}

/// Exclusive ownership of a VMs root, held for the agent's life.
#[derive(Debug)]
pub struct OwnerLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl OwnerLock {
    /// The lock file inside the VMs root.
    pub const FILE: &'static str = ".wrenn-agent.lock";

    /// Takes the lock on `vms_root` (created if missing) without waiting; `Ok(None)` when
    /// another live process holds it.
    pub fn try_acquire(vms_root: &Path) -> Result<Option<Self>, StateError> {
        std::fs::create_dir_all(vms_root).map_err(io_err("create", vms_root))?;
        let path = vms_root.join(Self::FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Self { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io_err("lock", &path)(e.into())),
        }
    }
}

/// A live process's start time (clock ticks after boot); `None` if it is gone or a zombie.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3 (state); field 22 is 19 further on.
    fields.nth(18)?.parse().ok()
}

/// A VM that survived its owner: QEMU runs and answers QMP.
#[derive(Debug)]
pub struct AdoptableVm {
    /// Its directory.
    pub dir: PathBuf,
    /// Its record (phase running).
    pub record: SandboxRecord,
    /// Its QEMU, as recorded.
    pub vm: VmProcess,
    /// A fresh QMP connection.
    pub qmp: Qmp,
    /// QEMU's run state at the scan (`running`, `paused`, ...).
    pub status: String,
}

impl AdoptableVm {
    /// Takes over the VM's slot namespace (still configured, the guest reachable through it).
    pub fn adopt_slot(&self) -> Result<Option<Slot>, StateError> {
        match self.vm.slot {
            Some(index) => Ok(Slot::adopt(index)?),
            None => Ok(None),
        }
    }

    /// Kills the adopted QEMU (after re-checking its identity) and removes its directory.
    pub async fn kill(self) -> Result<(), StateError> {
        drop(self.qmp);
        kill_qemu(&self.vm).await;
        remove_dir(&self.dir)
    }
}

/// A paused sandbox: no process, a complete snapshot on disk, its record saying paused.
#[derive(Debug, Clone)]
pub struct PausedVm {
    /// Its directory.
    pub dir: PathBuf,
}

/// A directory (and maybe a process) to remove.
#[derive(Debug, Clone)]
pub struct Garbage {
    /// The directory.
    pub dir: PathBuf,
    /// Its recorded QEMU, if any (killed if still that process).
    pub vm: Option<VmProcess>,
    /// Why it is garbage.
    pub reason: String,
}

/// A directory left alone: its record could not be used, and it may hold something.
#[derive(Debug, Clone)]
pub struct Kept {
    /// The directory.
    pub dir: PathBuf,
    /// Why it was not used.
    pub reason: String,
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Running VMs to adopt.
    pub adoptable: Vec<AdoptableVm>,
    /// Paused VMs whose snapshots can be resumed.
    pub paused: Vec<PausedVm>,
    /// Directories to remove (with any recorded QEMU).
    pub garbage: Vec<Garbage>,
    /// Directories left alone, with their QEMU if any: a newer agent's record, a corrupt one
    /// next to snapshot files or a running QEMU, a pause that could not be finished.
    pub kept: Vec<Kept>,
    /// QEMU processes running from a directory under the VMs root that no record accounts
    /// for (a crash between starting QEMU and recording it): (pid, start time).
    pub stray_qemu: Vec<(u32, u64)>,
    /// Slot namespaces no adoptable VM uses.
    pub orphan_netns: Vec<String>,
    /// Host veth ends of slots no adoptable VM uses.
    pub orphan_veths: Vec<String>,
}

/// What [`Scan::clean`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    /// QEMU processes killed.
    pub killed: Vec<u32>,
    /// Directories removed.
    pub dirs: Vec<PathBuf>,
    /// Namespaces deleted.
    pub netns: Vec<String>,
    /// Veths deleted.
    pub veths: Vec<String>,
}

/// Which slots a scan may call orphans.
#[derive(Debug, Clone)]
pub struct ScanScope {
    /// Slots a live agent owns (a pool's free slots, say): never orphans. After a crash, empty.
    pub in_use: Vec<u32>,
    /// Only slot indices in this range are considered (an agent owns one range; tests use a
    /// range of their own so they never touch other slots on the machine).
    pub slots: std::ops::Range<u32>,
}

impl Default for ScanScope {
    fn default() -> Self {
        Self {
            in_use: Vec::new(),
            slots: 0..wrenn_hostnet::MAX_SLOTS,
        }
    }
}

/// A QEMU process found under the VMs root.
#[derive(Debug, Clone)]
struct Qemu {
    pid: u32,
    start_time: u64,
    /// Its command line, arguments joined by spaces.
    cmdline: String,
}

impl Qemu {
    /// Whether its command line names a path in `dir`.
    fn runs_from(&self, dir: &Path) -> bool {
        self.cmdline.contains(&format!("{}/", dir.display()))
    }
}

/// Classifies every directory under `vms_root`, and lists the slot namespaces and veths in
/// `scope` that no adoptable VM uses.
pub async fn scan(vms_root: &Path, scope: &ScanScope) -> Scan {
    let mut scan = Scan::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(vms_root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    let qemus = qemu_processes_under(vms_root);
    for dir in entries {
        classify(dir, &qemus, &mut scan).await;
    }
    for k in &scan.kept {
        tracing::warn!(dir = %k.dir.display(), reason = %k.reason, "sandbox directory left alone");
    }
    let accounted: Vec<u32> = scan
        .adoptable
        .iter()
        .map(|a| a.vm.pid)
        .chain(
            scan.garbage
                .iter()
                .filter_map(|g| g.vm.as_ref().filter(|v| v.alive()).map(|v| v.pid)),
        )
        .collect();
    scan.stray_qemu = qemus
        .iter()
        .filter(|q| !accounted.contains(&q.pid))
        .filter(|q| !scan.kept.iter().any(|k| q.runs_from(&k.dir)))
        .filter(|q| process_start_time(q.pid) == Some(q.start_time))
        .map(|q| (q.pid, q.start_time))
        .collect();
    let mut keep: Vec<u32> = scope.in_use.clone();
    keep.extend(scan.adoptable.iter().filter_map(|a| a.vm.slot));
    // Paused VMs keep no slot: a resume restores into any free one.
    for name in list_names(Path::new("/run/netns")) {
        if let Some(index) = slot_index(&name, NETNS_PREFIX)
            && scope.slots.contains(&index)
            && !keep.contains(&index)
        {
            scan.orphan_netns.push(name);
        }
    }
    for name in list_names(Path::new("/sys/class/net")) {
        if let Some(index) = slot_index(&name, HOST_VETH_PREFIX)
            && scope.slots.contains(&index)
            && !keep.contains(&index)
        {
            scan.orphan_veths.push(name);
        }
    }
    scan
}

async fn classify(dir: PathBuf, qemus: &[Qemu], scan: &mut Scan) {
    let d = dir.clone();
    let read = tokio::task::spawn_blocking(move || crate::record::read(&d)).await;
    let record = match read {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            let reason = "no record".to_owned();
            scan.garbage.push(Garbage {
                dir,
                vm: None,
                reason,
            });
            return;
        }
        Ok(Err(e)) => return unreadable(dir, &e, qemus, scan),
        Err(e) => {
            let reason = format!("reading the record: {e}");
            scan.kept.push(Kept { dir, reason });
            return;
        }
    };
    let garbage = |dir: PathBuf, vm: Option<VmProcess>, reason: String| Garbage { dir, vm, reason };
    match record.phase.clone() {
        Phase::Warm { vm } => scan
            .garbage
            .push(garbage(dir, Some(vm), "a warm pool VM".into())),
        Phase::Creating => {
            // Its QEMU, if one got started, is not recorded: it is killed as a stray.
            let reason = "a create that never finished".into();
            scan.garbage.push(garbage(dir, None, reason));
        }
        Phase::Running { vm, .. } if vm.alive() => match probe_qmp(&vm.qmp_socket).await {
            Ok((qmp, status)) => scan.adoptable.push(AdoptableVm {
                dir,
                record,
                vm,
                qmp,
                status,
            }),
            Err(reason) => scan.garbage.push(garbage(dir, Some(vm), reason)),
        },
        Phase::Running { vm, .. } => {
            let reason = format!("QEMU {} is gone", vm.pid);
            scan.garbage.push(garbage(dir, None, reason));
        }
        Phase::Pausing { vm, .. } | Phase::Resuming { vm, .. } => {
            settle(dir, vm, record.phase.name(), scan).await;
        }
        Phase::Paused { .. } => scan.paused.push(PausedVm { dir }),
    }
}

/// A pause cut short after its snapshot was complete is finished, a resume cut short undone:
/// its QEMU (stopped, or not yet past `/init`) goes first, as the disk must be free.
async fn settle(dir: PathBuf, vm: Option<VmProcess>, phase: &str, scan: &mut Scan) {
    if let Some(vm) = &vm {
        kill_qemu(vm).await;
    }
    let d = dir.clone();
    let settled = tokio::task::spawn_blocking(move || crate::sandbox::settle_interrupted(&d)).await;
    match settled {
        Ok(Ok(_)) => {
            tracing::info!(dir = %dir.display(), phase, "interrupted operation settled: paused");
            scan.paused.push(PausedVm { dir });
        }
        Ok(Err(e)) => {
            let reason = format!("interrupted while {phase}: {}", crate::error_chain(&e));
            scan.kept.push(Kept { dir, reason });
        }
        Err(e) => {
            let reason = format!("interrupted while {phase}: {e}");
            scan.kept.push(Kept { dir, reason });
        }
    }
}

/// A record this agent cannot use. A newer version is always left alone; anything else only
/// when the directory could hold something: snapshot files, or a QEMU running from it.
fn unreadable(dir: PathBuf, e: &RecordError, qemus: &[Qemu], scan: &mut Scan) {
    let reason = crate::error_chain(e);
    let worth_keeping = matches!(e, RecordError::Version { .. })
        || SNAPSHOT_FILES.iter().any(|f| dir.join(f).exists())
        || qemus.iter().any(|q| q.runs_from(&dir));
    if worth_keeping {
        scan.kept.push(Kept { dir, reason });
    } else {
        scan.garbage.push(Garbage {
            dir,
            vm: None,
            reason,
        });
    }
}

/// QEMU processes whose command line names a path under `root`.
fn qemu_processes_under(root: &Path) -> Vec<Qemu> {
    let root = format!("{}/", root.display().to_string().trim_end_matches('/'));
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_qemu = args.first().is_some_and(|a0| {
            a0.rsplit('/')
                .next()
                .unwrap_or("")
                .starts_with("qemu-system")
        });
        if is_qemu
            && args.iter().skip(1).any(|a| a.contains(&root))
            && let Some(start_time) = process_start_time(pid)
        {
            found.push(Qemu {
                pid,
                start_time,
                cmdline: args.join(" "),
            });
        }
    }
    found
}

/// Connects to QMP and asks for the run state; an error string on failure.
async fn probe_qmp(socket: &Path) -> Result<(Qmp, String), String> {
    let probe = async {
        let qmp = Qmp::connect(socket)
            .await
            .map_err(|e| format!("QMP: {e}"))?;
        let status = qmp
            .query_status()
            .await
            .map_err(|e| format!("query-status: {e}"))?;
        Ok((qmp, status.status))
    };
    tokio::time::timeout(QMP_PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err("QMP did not answer".into()))
}

impl Scan {
    /// Removes the garbage: kills stray QEMU (identity re-checked), removes directories, and
    /// deletes orphan namespaces and veths. Leaves adoptable, paused and kept VMs alone.
    pub async fn clean(&mut self) -> Cleaned {
        let mut cleaned = Cleaned::default();
        // Strays first: some run from a garbage directory about to go.
        for (pid, start_time) in self.stray_qemu.drain(..) {
            let vm = VmProcess {
                pid,
                start_time,
                qmp_socket: PathBuf::new(),
                slot: None,
            };
            if kill_qemu(&vm).await {
                cleaned.killed.push(pid);
            }
        }
        for g in self.garbage.drain(..) {
            if let Some(vm) = &g.vm
                && kill_qemu(vm).await
            {
                cleaned.killed.push(vm.pid);
            }
            match remove_dir(&g.dir) {
                Ok(()) => cleaned.dirs.push(g.dir),
                Err(e) => tracing::warn!(error = %e, "could not remove a garbage VM directory"),
            }
        }
        for name in self.orphan_netns.drain(..) {
            if wrenn_hostnet::delete_netns(&name).await.is_ok() {
                cleaned.netns.push(name);
            }
        }
        for name in self.orphan_veths.drain(..) {
            // Usually gone with its namespace already (the peer's deletion takes both ends).
            if !Path::new("/sys/class/net").join(&name).exists()
                || wrenn_hostnet::delete_link(&name).await.is_ok()
            {
                cleaned.veths.push(name);
            }
        }
        cleaned
    }
}

/// Kills the recorded QEMU if it is still that process, and removes its cgroup; true if it
/// was killed.
async fn kill_qemu(vm: &VmProcess) -> bool {
    if !vm.alive() {
        return false;
    }
    let leaf = crate::jail::Cgroups::get()
        .ok()
        .and_then(|c| c.leaf_of(vm.pid));
    let killed = kill_and_wait(vm).await;
    if let Some(leaf) = leaf
        && killed
        && !vm.alive()
    {
        let _ = tokio::task::spawn_blocking(move || leaf.remove()).await;
    }
    killed
}

async fn kill_and_wait(vm: &VmProcess) -> bool {
    let pid = nix::unistd::Pid::from_raw(vm.pid as i32);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_err() {
        return false;
    }
    // If it happens to be our child (tests), reap it; otherwise init does.
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    for _ in 0..200 {
        if !vm.alive() {
            return true;
        }
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::warn!(pid = vm.pid, "QEMU survived SIGKILL for a second");
    true
}

fn remove_dir(dir: &Path) -> Result<(), StateError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", dir)(e)),
    }
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// `wrenn-slot-12` -> 12 for prefix `wrenn-slot-`; `None` for other names.
fn slot_index(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

#[cfg(test)]
mod tests;
