//! On-disk VM state, for recovery after the owning process crashes.
//!
//! Every VM directory holds a versioned JSON record ([`VmRecord`], file [`RECORD_FILE`]) with
//! what a new agent needs to find the VM again: the sandbox and template, the slot, QEMU's pid
//! *and its start time* (field 22 of `/proc/<pid>/stat`, so a recycled pid is never mistaken
//! for our QEMU), the QMP socket and the lifecycle state. Records are written atomically
//! (temporary file, fsync, rename).
//!
//! [`scan`] walks the VMs root after a crash and sorts every directory into: running and
//! adoptable (QEMU alive with the recorded start time and answering QMP), paused (the snapshot
//! is on disk, no QEMU), or garbage (anything else: no or unreadable record, QEMU dead or not
//! answering, a warm pool VM, a create or kill that never finished). It also lists slot
//! namespaces and host veths that no adoptable VM uses. [`Scan::clean`] removes the garbage:
//! kills stray QEMU (only after re-checking the start time), deletes directories, orphan
//! namespaces and veths.
//!
//! A scan judges a VM whose QMP does not answer as garbage, so it must not run while another
//! agent owns the same VMs root: take [`OwnerLock`] first (a `flock` on a file in the root,
//! released by the kernel when its holder dies, so a crash frees it).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wrenn_qmp::Qmp;

use crate::slot::{HOST_VETH_PREFIX, NETNS_PREFIX, Slot, SlotError};

/// The record's file name inside a VM directory.
pub const RECORD_FILE: &str = "wrenn-vm.json";
/// The record format version written by this code.
pub const RECORD_VERSION: u32 = 1;
/// How long a QMP connection may take during a scan.
const QMP_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a record could not be read or written.
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
    /// The record is not valid JSON of a known version.
    #[error("record {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The recorded process is gone (or its pid now belongs to another process).
    #[error("QEMU pid {0} is not running (or was reused)")]
    NotRunning(u32),
    /// Slot handling failed.
    #[error(transparent)]
    Slot(#[from] SlotError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io { what, path, source }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// A pre-started QEMU in a warm pool, waiting in `-incoming defer`; no sandbox yet.
    Warm,
    /// Being created (restore or `/init` not finished).
    Starting,
    /// Running a sandbox.
    Running,
    /// Being paused (snapshot being written).
    Pausing,
    /// Paused: QEMU is gone and the snapshot in [`VmRecord::snapshot`] is complete.
    Paused,
    /// Being killed.
    Stopping,
}

/// What a VM directory records about its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The sandbox, once one is assigned (warm pool VMs have none).
    pub sandbox_id: Option<String>,
    /// The template the VM was restored from.
    pub template_id: String,
    /// The network slot index (`wrenn-slot-<index>`).
    pub slot: Option<u32>,
    /// QEMU's pid (0 when there is no process, e.g. paused).
    pub qemu_pid: u32,
    /// QEMU's start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub qemu_start_time: u64,
    /// The QMP socket.
    pub qmp_socket: PathBuf,
    /// The lifecycle state.
    pub state: VmState,
    /// A paused VM's snapshot directory.
    pub snapshot: Option<PathBuf>,
    /// When the record was last written (seconds since the epoch).
    pub updated_unix: u64,
}

impl VmRecord {
    /// A record for the QEMU process `pid` whose runtime directory is `vm_dir` (QMP at
    /// `vm_dir/qmp.sock`). Fails if the process is not running. Save it in the VM's (sandbox's)
    /// root directory, the one that outlives QEMU.
    pub fn for_process(
        vm_dir: &Path,
        pid: u32,
        template_id: &str,
        slot: Option<u32>,
        state: VmState,
    ) -> Result<Self, StateError> {
        let start = process_start_time(pid).ok_or(StateError::NotRunning(pid))?;
        Ok(Self {
            version: RECORD_VERSION,
            sandbox_id: None,
            template_id: template_id.to_owned(),
            slot,
            qemu_pid: pid,
            qemu_start_time: start,
            qmp_socket: vm_dir.join("qmp.sock"),
            state,
            snapshot: None,
            updated_unix: unix_now(),
        })
    }

    /// Writes the record into `dir` atomically.
    pub fn save(&mut self, dir: &Path) -> Result<(), StateError> {
        use std::io::Write;
        self.updated_unix = unix_now();
        let path = dir.join(RECORD_FILE);
        let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| StateError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }

    /// Reads the record in `dir`.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(RECORD_FILE);
        let text = std::fs::read(&path).map_err(io_err("read", &path))?;
        let invalid = |reason: String| StateError::Invalid {
            path: path.clone(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(RECORD_VERSION) => {}
            other => return Err(invalid(format!("unknown version {other:?}"))),
        }
        serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
    }

    /// Whether the recorded QEMU is still this very process (alive, same start time).
    pub fn qemu_alive(&self) -> bool {
        self.qemu_pid != 0 && process_start_time(self.qemu_pid) == Some(self.qemu_start_time)
    }
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A VM that survived its owner: QEMU runs and answers QMP.
#[derive(Debug)]
pub struct AdoptableVm {
    /// Its directory.
    pub dir: PathBuf,
    /// Its record.
    pub record: VmRecord,
    /// A fresh QMP connection.
    pub qmp: Qmp,
    /// QEMU's run state at the scan (`running`, `paused`, ...).
    pub status: String,
}

impl AdoptableVm {
    /// Takes over the VM's slot namespace (still configured, the guest reachable through it).
    pub fn adopt_slot(&self) -> Result<Option<Slot>, StateError> {
        match self.record.slot {
            Some(index) => Ok(Slot::adopt(index)?),
            None => Ok(None),
        }
    }

    /// Kills the adopted QEMU (after re-checking its identity) and removes its directory.
    pub async fn kill(self) -> Result<(), StateError> {
        drop(self.qmp);
        kill_qemu(&self.record).await;
        remove_dir(&self.dir)
    }
}

/// A paused VM: no process, a complete snapshot on disk.
#[derive(Debug, Clone)]
pub struct PausedVm {
    /// Its directory.
    pub dir: PathBuf,
    /// Its record (`None`: a sandbox directory with a complete [`PAUSED_MARKER`] only).
    pub record: Option<VmRecord>,
}

/// A paused sandbox's manifest, written last by a pause (see `crate::sandbox`): its presence
/// means the pause completed.
pub const PAUSED_MARKER: &str = "paused.json";

/// A directory (and maybe a process) to remove.
#[derive(Debug, Clone)]
pub struct Garbage {
    /// The directory.
    pub dir: PathBuf,
    /// Its record, if one could be read.
    pub record: Option<VmRecord>,
    /// Why it is garbage.
    pub reason: String,
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Running VMs to adopt.
    pub adoptable: Vec<AdoptableVm>,
    /// Paused VMs whose snapshots can be resumed.
    pub paused: Vec<PausedVm>,
    /// Directories to remove (with any stray QEMU).
    pub garbage: Vec<Garbage>,
    /// QEMU processes running from a directory under the VMs root that no record accounts
    /// for (a crash between starting QEMU and writing its record): (pid, start time).
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
            slots: 0..crate::slot::MAX_SLOTS,
        }
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
    for dir in entries {
        classify(dir, &mut scan).await;
    }
    let accounted: Vec<u32> = scan
        .adoptable
        .iter()
        .map(|a| a.record.qemu_pid)
        .chain(scan.garbage.iter().filter_map(|g| {
            g.record
                .as_ref()
                .filter(|r| r.qemu_alive())
                .map(|r| r.qemu_pid)
        }))
        .collect();
    scan.stray_qemu = qemu_processes_under(vms_root)
        .into_iter()
        .filter(|(pid, _)| !accounted.contains(pid))
        .collect();
    let mut keep: Vec<u32> = scope.in_use.clone();
    keep.extend(scan.adoptable.iter().filter_map(|a| a.record.slot));
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

async fn classify(dir: PathBuf, scan: &mut Scan) {
    let garbage = |dir: PathBuf, record: Option<VmRecord>, reason: String| Garbage {
        dir,
        record,
        reason,
    };
    if dir.join(crate::sandbox::PAUSING_FILE).is_file() {
        // A pause cut after its snapshot was complete: finish it (a QEMU still there is
        // stopped, its disk flushed; it goes first).
        if let Ok(r) = VmRecord::load(&dir)
            && r.qemu_alive()
        {
            kill_qemu(&r).await;
        }
        let d = dir.clone();
        let finished =
            tokio::task::spawn_blocking(move || crate::sandbox::finish_interrupted_pause(&d)).await;
        match finished {
            Ok(Ok(())) => {
                tracing::info!(dir = %dir.display(), "interrupted pause finished");
                scan.paused.push(PausedVm { dir, record: None });
            }
            Ok(Err(e)) => {
                let reason = format!("interrupted pause: {}", crate::error_chain(&e));
                scan.garbage.push(garbage(dir, None, reason));
            }
            Err(e) => scan.garbage.push(garbage(dir, None, e.to_string())),
        }
        return;
    }
    let paused_marker = dir.join(PAUSED_MARKER).is_file();
    let record = match VmRecord::load(&dir) {
        Ok(r) => r,
        // A sandbox paused by code that writes no record: the marker is enough.
        Err(StateError::Io { source, .. })
            if paused_marker && source.kind() == std::io::ErrorKind::NotFound =>
        {
            scan.paused.push(PausedVm { dir, record: None });
            return;
        }
        Err(e) => {
            scan.garbage.push(garbage(dir, None, e.to_string()));
            return;
        }
    };
    match record.state {
        VmState::Paused => {
            let complete = paused_marker || record.snapshot.as_deref().is_some_and(Path::exists);
            if complete && !record.qemu_alive() {
                scan.paused.push(PausedVm {
                    dir,
                    record: Some(record),
                });
            } else {
                let reason = "paused without a snapshot (or with a QEMU still running)".into();
                scan.garbage.push(garbage(dir, Some(record), reason));
            }
        }
        VmState::Running if record.qemu_alive() => match probe_qmp(&record.qmp_socket).await {
            Ok((qmp, status)) => scan.adoptable.push(AdoptableVm {
                dir,
                record,
                qmp,
                status,
            }),
            Err(reason) => scan.garbage.push(garbage(dir, Some(record), reason)),
        },
        VmState::Running => {
            let reason = format!("QEMU {} is gone", record.qemu_pid);
            scan.garbage.push(garbage(dir, Some(record), reason));
        }
        state => {
            let reason = format!("left in state {state:?}");
            scan.garbage.push(garbage(dir, Some(record), reason));
        }
    }
}

/// QEMU processes whose command line names a path under `root`, with their start times.
fn qemu_processes_under(root: &Path) -> Vec<(u32, u64)> {
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
        let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
        let is_qemu = args.next().is_some_and(|a0| {
            a0.rsplit('/')
                .next()
                .unwrap_or("")
                .starts_with("qemu-system")
        });
        if is_qemu
            && args.any(|a| a.contains(&root))
            && let Some(start) = process_start_time(pid)
        {
            found.push((pid, start));
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
    /// deletes orphan namespaces and veths. Leaves adoptable and paused VMs alone.
    pub async fn clean(&mut self) -> Cleaned {
        let mut cleaned = Cleaned::default();
        for g in self.garbage.drain(..) {
            if let Some(record) = &g.record
                && kill_qemu(record).await
            {
                cleaned.killed.push(record.qemu_pid);
            }
            match remove_dir(&g.dir) {
                Ok(()) => cleaned.dirs.push(g.dir),
                Err(e) => tracing::warn!(error = %e, "could not remove a garbage VM directory"),
            }
        }
        for (pid, start) in self.stray_qemu.drain(..) {
            let record = VmRecord {
                version: RECORD_VERSION,
                sandbox_id: None,
                template_id: String::new(),
                slot: None,
                qemu_pid: pid,
                qemu_start_time: start,
                qmp_socket: PathBuf::new(),
                state: VmState::Stopping,
                snapshot: None,
                updated_unix: 0,
            };
            if kill_qemu(&record).await {
                cleaned.killed.push(pid);
            }
        }
        for name in self.orphan_netns.drain(..) {
            if ip(&["netns", "del", &name]) {
                cleaned.netns.push(name);
            }
        }
        for name in self.orphan_veths.drain(..) {
            // Usually gone with its namespace already (the peer's deletion takes both ends).
            if !Path::new("/sys/class/net").join(&name).exists() || ip(&["link", "del", &name]) {
                cleaned.veths.push(name);
            }
        }
        cleaned
    }
}

/// Kills the recorded QEMU if it is still that process; true if it was killed.
async fn kill_qemu(record: &VmRecord) -> bool {
    if !record.qemu_alive() {
        return false;
    }
    let pid = nix::unistd::Pid::from_raw(record.qemu_pid as i32);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_err() {
        return false;
    }
    // If it happens to be our child (tests), reap it; otherwise init does.
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    for _ in 0..200 {
        if !record.qemu_alive() {
            return true;
        }
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::warn!(pid = record.qemu_pid, "QEMU survived SIGKILL for a second");
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

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_and_not_of_nothing() {
        let me = std::process::id();
        let t = process_start_time(me).expect("own start time");
        assert_eq!(process_start_time(me), Some(t));
        assert_eq!(process_start_time(u32::MAX - 1), None);
    }

    #[test]
    fn one_owner_per_root() {
        let dir = tempfile::tempdir().unwrap();
        let first = OwnerLock::try_acquire(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(OwnerLock::try_acquire(dir.path()).unwrap().is_none());
        drop(first);
        assert!(OwnerLock::try_acquire(dir.path()).unwrap().is_some());
    }

    #[test]
    fn slot_names() {
        assert_eq!(slot_index("wrenn-slot-12", NETNS_PREFIX), Some(12));
        assert_eq!(slot_index("wrenn-slot-", NETNS_PREFIX), None);
        assert_eq!(slot_index("wrenn-slot-1x", NETNS_PREFIX), None);
        assert_eq!(slot_index("wrv7", HOST_VETH_PREFIX), Some(7));
        assert_eq!(slot_index("wrvx", HOST_VETH_PREFIX), None);
    }

    #[test]
    fn record_round_trip_and_version_check() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = VmRecord::for_process(
            dir.path(),
            std::process::id(),
            "tpl",
            Some(3),
            VmState::Running,
        )
        .unwrap();
        r.sandbox_id = Some("sbx".into());
        r.save(dir.path()).unwrap();
        let back = VmRecord::load(dir.path()).unwrap();
        assert_eq!(back, r);
        assert!(back.qemu_alive());
        let mut bad = serde_json::to_value(&r).unwrap();
        bad["version"] = 99.into();
        std::fs::write(dir.path().join(RECORD_FILE), bad.to_string()).unwrap();
        assert!(matches!(
            VmRecord::load(dir.path()),
            Err(StateError::Invalid { .. })
        ));
    }
}
