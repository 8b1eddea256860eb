//! The jail every QEMU runs in, set up between fork and exec so that no guest instruction
//! runs outside it:
//!
//! - **Its own uid.** Each VM runs as `UID_BASE + slot` (gid the same), a reserved range with
//!   no passwd entries, dropped to with `setresgid`/`setresuid` (and no supplementary groups)
//!   before exec. Per slot rather than one shared VMM user: two QEMUs never share a uid, so a
//!   compromised one cannot signal, ptrace or read the files of another; slots are unique on
//!   the host while they exist, so uids are too, and a restarted agent knows an adopted VM's
//!   uid from its slot. QEMU's own `-run-with user=` is not used: QEMU installs its seccomp
//!   filter before it switches user, and `elevateprivileges=deny` then kills it at `setuid`.
//!   Dropping before exec keeps the whole `-sandbox on,obsolete=deny,elevateprivileges=deny,
//!   spawn=deny,resourcecontrol=deny`.
//! - **Descriptors instead of paths.** Everything QEMU needs privileges or other files for is
//!   opened by the agent, as root, and passed as a descriptor: the tap (`-netdev tap,fd=`,
//!   attached inside the slot's namespace by `wrenn-hostnet`), the QMP listening socket
//!   (`-chardev socket,fd=`; the socket file stays root-only), every layer of the disk chain
//!   (`-add-fd` and `-blockdev` nodes on `/dev/fdset/<n>`: the top read-write, the rest
//!   read-only, see [`disk`]), the device state a restore loads (`migrate-incoming
//!   file:/dev/fdset/<n>`), and `/dev/kvm` (`-accel kvm,device=/dev/fdset/<n>`).
//! - **Only its own files.** A mount namespace with an empty root ([`mounts`]): `/usr`, a few
//!   device nodes, the kernel and initramfs, the memory file and the VM's runtime directory,
//!   each at its host path. QEMU's `-run-with chroot=` needs `CAP_SYS_CHROOT`, which an
//!   unprivileged QEMU does not have.
//! - **Its own cgroup**, joined before exec, with limits from its machine ([`cgroup`]).
//!
//! Files QEMU must write by path after start (a template boot's shared memory file, a pause's
//! device state) are made by the agent and given to the VM's uid ([`Owned`]); when the VM is
//! gone they go back to root. The agent reads and writes guest RAM through
//! `/proc/<pid>/mem` as root (`CAP_SYS_PTRACE` passes the ptrace access check for any uid).

pub mod cgroup;
pub mod disk;
pub mod mounts;

use std::fs::File;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

pub use cgroup::{CgroupError, Cgroups, IoLimit, Leaf, Limits};
use mounts::MountPlan;

use crate::accel::Accel;
use crate::vm::VmSpec;

/// The first uid (and gid) of the range VMs run as: `UID_BASE + slot index`, below 2^31 and
/// above the ranges systemd hands to containers (524288..1879048191) and dynamic users.
pub const UID_BASE: u32 = 1_900_000_000;
/// QEMU's own memory besides guest RAM, under TCG: the translation cache (`tb-size=32`, 32
/// MiB) and what QEMU allocates (measured ~60 MiB RSS beyond guest RAM for a 512 MiB guest
/// whose RAM was filled; see ARCHITECTURE.md), with room to spare.
pub const TCG_OVERHEAD_MIB: u64 = 160;
/// The same under KVM (no translation cache).
pub const KVM_OVERHEAD_MIB: u64 = 96;
/// Tasks in a VM's cgroup: QEMU's main loop, vCPU and RCU threads and its block-I/O worker
/// pool (up to 64 threads), plus room.
pub const PIDS_BASE: u64 = 96;
/// Disk bandwidth per vCPU, each way.
pub const IO_BPS_PER_VCPU: u64 = 128 << 20;
/// Disk operations per second per vCPU, each way.
pub const IO_IOPS_PER_VCPU: u64 = 4000;

/// Descriptor numbers handed to QEMU start here (the tap is the first).
const FD_BASE: RawFd = 100;
/// The most descriptors one QEMU gets (disk chain, QMP, state, KVM).
const MAX_FDS: usize = 16;
/// Where the tap ends up in QEMU.
pub(crate) const TAP_FD: RawFd = FD_BASE;

/// Keeps the descriptor numbers QEMU's descriptors are moved to (`FD_BASE` up to the scratch
/// range) taken in this process by close-on-exec placeholders, so no descriptor of the agent
/// ever gets one. Without them, an agent holding more than a hundred descriptors (many
/// sandboxes, a fork of eight) could have the pipe `std` spawns a child with land on one: the
/// child's `dup2` would replace it, and a later failing step would report into a passed
/// descriptor (fork N=8 aborted with `output.write(&bytes).is_ok()`). Once per process, before
/// the first QEMU; a number some descriptor holds already is left to it.
fn reserve_fd_numbers() {
    static RESERVED: std::sync::Once = std::sync::Once::new();
    RESERVED.call_once(|| {
        let Ok(null) = File::open("/dev/null") else {
            tracing::warn!("open /dev/null: descriptor numbers for QEMU not reserved");
            return;
        };
        for n in FD_BASE..=FD_BASE + MAX_FDS as RawFd {
            // SAFETY: F_GETFD only asks whether `n` is open; dup3 onto a number that is not
            // open makes a new descriptor this process never closes (nothing else owns it).
            unsafe {
                if libc::fcntl(n, libc::F_GETFD) < 0
                    && libc::dup3(null.as_raw_fd(), n, libc::O_CLOEXEC) < 0
                {
                    tracing::warn!(fd = n, "reserve a descriptor number for QEMU");
                }
            }
        }
    });
}

/// Why a VM could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Its cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Its disk chain could not be read.
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
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
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError + use<> {
    let path = path.to_owned();
    move |source| JailError::Io { what, path, source }
}

/// The uid (and gid) a VM in `slot` runs as; VMs without a slot share the one past the slots.
pub fn uid_for(slot: Option<u32>) -> u32 {
    UID_BASE + slot.unwrap_or(wrenn_hostnet::MAX_SLOTS)
}

/// The cgroup leaf name of a VM in `slot` (see [`cgroup`]).
pub fn leaf_name(slot: Option<u32>) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    match slot {
        Some(i) => format!("slot-{i}"),
        None => {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("vm-{}-{n}", std::process::id())
        }
    }
}

/// The limits of a VM's cgroup: all its vCPUs' worth of CPU, guest RAM plus QEMU's overhead,
/// QEMU's threads, and disk bandwidth per vCPU on the device holding `disk`.
pub fn limits_for(spec: &VmSpec, disk: &Path) -> Limits {
    let vcpus = u64::from(spec.vcpus.max(1));
    let overhead = match spec.accel {
        Accel::Tcg => TCG_OVERHEAD_MIB,
        Accel::Kvm => KVM_OVERHEAD_MIB,
    };
    Limits {
        cpu_quota_us: vcpus * 100_000,
        memory_bytes: (u64::from(spec.memory_mib) + overhead) << 20,
        pids: PIDS_BASE + 2 * vcpus,
        io: cgroup::disk_of(disk).map(|device| IoLimit {
            device,
            bps: IO_BPS_PER_VCPU * vcpus,
            iops: IO_IOPS_PER_VCPU * vcpus,
        }),
    }
}

/// Sweeps the empty cgroup leaves of `slots` (a crashed agent's) at start. Without usable
/// cgroups this is the clear error the first launch would give.
pub fn sweep_leaves(slots: std::ops::Range<u32>) -> Result<usize, CgroupError> {
    let c = Cgroups::get()?;
    Ok(c.sweep(|name| {
        name.strip_prefix("slot-")
            .and_then(|i| i.parse::<u32>().ok())
            .is_some_and(|i| slots.contains(&i))
    }))
}

/// A file given to a VM's uid to write, given back to root when dropped (through the
/// descriptor: a rename in between does not matter).
#[derive(Debug)]
pub struct Owned {
    file: File,
    path: PathBuf,
    /// Its mode once back with root.
    mode: u32,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.restore();
    }
}

impl Owned {
    /// Creates (or truncates) `path` for `uid` with mode 0600; mode `mode` once given back.
    pub fn give(path: &Path, uid: u32, mode: u32) -> Result<Self, JailError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io("create", path))?;
        std::os::unix::fs::fchown(&file, Some(uid), Some(uid)).map_err(io("chown", path))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod", path))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            mode,
        })
    }

    /// Gives `path` (which QEMU opens read-write by path) to `uid`, keeping its content.
    pub fn lend(path: &Path, uid: u32, mode: u32) -> Result<Self, JailError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open", path))?;
        std::os::unix::fs::fchown(&file, Some(uid), Some(uid)).map_err(io("chown", path))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod", path))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            mode,
        })
    }

    /// Its path (where it was made).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Back to root, with its final mode (also when dropped).
    fn restore(&self) {
        let back = std::os::unix::fs::fchown(&self.file, Some(0), Some(0)).and_then(|()| {
            self.file
                .set_permissions(std::fs::Permissions::from_mode(self.mode))
        });
        if let Err(e) = back {
            tracing::warn!(path = %self.path.display(), error = %e, "could not give a VM's file back to root");
        }
    }
}

/// Descriptors to hand QEMU at fixed numbers, and the arguments naming them.
#[derive(Debug, Default)]
pub(crate) struct Fds {
    fds: Vec<(OwnedFd, RawFd)>,
    next_set: u32,
}

impl Fds {
    /// Hands `fd` to QEMU at the next number; returns that number.
    pub(crate) fn pass(&mut self, fd: OwnedFd) -> RawFd {
        // The tap takes FD_BASE.
        let target = FD_BASE + 1 + self.fds.len() as RawFd;
        self.fds.push((fd, target));
        target
    }

    /// Hands `file` to QEMU in a new fd set (`-add-fd`); returns the set's path
    /// `/dev/fdset/<n>`, which QEMU opens as it would open a file.
    pub(crate) fn fdset(&mut self, file: File, args: &mut Vec<String>) -> String {
        self.next_set += 1;
        let set = self.next_set;
        let fd = self.pass(OwnedFd::from(file));
        args.extend(["-add-fd".into(), format!("fd={fd},set={set}")]);
        format!("/dev/fdset/{set}")
    }

    /// Registers the child's first step: every descriptor moved to its number (first above
    /// all the numbers, then down to each: a source can sit on another's number), open
    /// across exec.
    pub(crate) fn install(self, cmd: &mut tokio::process::Command) -> Result<(), JailError> {
        if self.fds.len() > MAX_FDS {
            return Err(JailError::Io {
                what: "pass descriptors to",
                path: PathBuf::from("qemu"),
                source: std::io::Error::other(format!("more than {MAX_FDS}")),
            });
        }
        let fds = self.fds;
        let mut scratch: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let above = FD_BASE + MAX_FDS as RawFd + 1;
        // SAFETY: the closure runs between fork and exec and makes only fcntl and dup2 calls
        // on descriptors it owns; it writes into a fixed array and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for (i, (fd, _)) in fds.iter().enumerate() {
                    let t = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above);
                    if t < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    scratch[i] = t;
                }
                for (i, (_, target)) in fds.iter().enumerate() {
                    if libc::dup2(scratch[i], *target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// The child's last step: into the cgroup, into the mount namespace, down to the VM's uid.
pub(crate) fn install_enter(
    cmd: &mut tokio::process::Command,
    procs: Vec<OwnedFd>,
    mounts: MountPlan,
    uid: u32,
) {
    let procs_raw: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs between fork and exec: writes on descriptors opened before the
    // fork, the mount plan's syscalls on strings made before the fork, and setgroups,
    // setresgid and setresuid on plain integers; nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &procs;
            cgroup::join_on_exec(&procs_raw)?;
            mounts.enter()?;
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Opens `path` for QEMU: read-write or read-only, close-on-exec (the jail moves it).
pub(crate) fn open_for_qemu(path: &Path, write: bool) -> Result<File, JailError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(io("open", path))
}

/// The `-blockdev` graph of the disk chain at `top` on descriptors (top node `rootfs`).
pub(crate) fn disk_args(
    top: &Path,
    fds: &mut Fds,
    args: &mut Vec<String>,
) -> Result<(), JailError> {
    let layers = disk::chain(top)?;
    let mut nodes = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let write = i == 0;
        let file = open_for_qemu(&layer.path, write)?;
        let set = fds.fdset(file, args);
        nodes.push((i, layer.format.clone(), set, write));
    }
    // Bottom up: a node's backing must exist before it.
    for (i, format, set, write) in nodes.iter().rev() {
        let ro = if *write { "off" } else { "on" };
        let discard = if *write { ",discard=unmap" } else { "" };
        args.extend([
            "-blockdev".into(),
            format!("driver=file,node-name=layer{i}-file,filename={set},read-only={ro}{discard}"),
        ]);
        let name = if *i == 0 {
            "rootfs".to_owned()
        } else {
            format!("layer{i}")
        };
        let backing = if *i + 1 < layers.len() {
            format!(",backing=layer{}", i + 1)
        } else {
            String::new()
        };
        args.extend([
            "-blockdev".into(),
            format!(
                "driver={format},node-name={name},file=layer{i}-file,read-only={ro}{discard}{backing}"
            ),
        ]);
    }
    Ok(())
}

/// The `-blockdev` nodes and devices of raw disks besides the root disk, on descriptors.
fn extra_disk_args(
    disks: &[crate::vm::ExtraDisk],
    fds: &mut Fds,
    args: &mut Vec<String>,
) -> Result<(), JailError> {
    for (i, d) in disks.iter().enumerate() {
        let valid = !d.serial.is_empty()
            && d.serial.len() <= 20
            && d.serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(JailError::Io {
                what: "attach (bad serial)",
                path: d.path.clone(),
                source: std::io::Error::other(format!("serial {:?}", d.serial)),
            });
        }
        let set = fds.fdset(open_for_qemu(&d.path, !d.read_only)?, args);
        let ro = if d.read_only { "on" } else { "off" };
        args.extend([
            "-blockdev".into(),
            format!("driver=file,node-name=extra{i}-file,filename={set},read-only={ro}"),
            "-blockdev".into(),
            format!("driver=raw,node-name=extra{i},file=extra{i}-file,read-only={ro}"),
            "-device".into(),
            format!(
                "virtio-blk-device,drive=extra{i},id=xblk{i},serial={}",
                d.serial
            ),
        ]);
    }
    Ok(())
}

/// Everything a launch needs in the jail, prepared before the fork.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The VM's uid (and gid).
    pub uid: u32,
    /// Its cgroup's name and limits (made last, in [`Prepared::install`]).
    leaf_name: String,
    limits: Limits,
    /// Files lent to it.
    pub owned: Vec<Owned>,
    /// Arguments naming the passed descriptors (disk, state, KVM, QMP).
    pub args: Vec<String>,
    /// The fd set of the device state to load, if any.
    pub incoming: Option<String>,
    fds: Fds,
    mounts: MountPlan,
}

/// What to jail.
pub(crate) struct JailSpec<'a> {
    pub spec: &'a VmSpec,
    pub slot: Option<u32>,
    pub vm_dir: &'a Path,
    pub disk: &'a Path,
    /// The memory file, and whether QEMU writes it (`share=on`).
    pub memory: (&'a Path, bool),
    pub incoming: Option<&'a Path>,
    /// Raw disks after the root disk.
    pub extra_disks: &'a [crate::vm::ExtraDisk],
    /// The QMP listening socket.
    pub qmp: OwnedFd,
}

impl Prepared {
    /// Makes the cgroup, opens the descriptors, lends the files and plans the mounts.
    pub(crate) fn new(j: JailSpec<'_>) -> Result<Self, JailError> {
        reserve_fd_numbers();
        let uid = uid_for(j.slot);
        // Fails early on a host without usable cgroups.
        Cgroups::get()?;
        let mut fds = Fds::default();
        let mut args = Vec::new();
        let qmp_fd = fds.pass(j.qmp);
        args.extend([
            "-chardev".into(),
            format!("socket,id=qmp,fd={qmp_fd},server=on,wait=off"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        disk_args(j.disk, &mut fds, &mut args)?;
        extra_disk_args(j.extra_disks, &mut fds, &mut args)?;
        let incoming = match j.incoming {
            Some(state) => Some(fds.fdset(open_for_qemu(state, false)?, &mut args)),
            None => None,
        };
        if j.spec.accel == Accel::Kvm {
            let kvm = open_for_qemu(Path::new("/dev/kvm"), true)?;
            let set = fds.fdset(kvm, &mut args);
            args.extend([
                "-accel".into(),
                format!("kvm,device={set}"),
                "-cpu".into(),
                "host".into(),
            ]);
        } else {
            args.extend(j.spec.accel.qemu_args());
        }
        let mut owned = Vec::new();
        let (memory, shared) = j.memory;
        if shared {
            // The template's RAM: QEMU writes it by path; readable by every VM once back.
            owned.push(Owned::lend(memory, uid, 0o644)?);
        }
        std::fs::create_dir_all(mounts::JAIL_DIR)
            .map_err(io("create", Path::new(mounts::JAIL_DIR)))?;
        let plan = |e| JailError::Io {
            what: "plan the jail's mounts for",
            path: j.vm_dir.to_owned(),
            source: e,
        };
        let mut mounts = MountPlan::new().map_err(plan)?;
        for p in [&j.spec.kernel, &j.spec.initramfs] {
            mounts.read_only(p).map_err(plan)?;
        }
        if shared {
            mounts.writable(memory).map_err(plan)?;
        } else {
            mounts.read_only(memory).map_err(plan)?;
        }
        // Files QEMU writes later (device state) are lent inside it.
        mounts.writable(j.vm_dir).map_err(plan)?;
        Ok(Self {
            uid,
            leaf_name: leaf_name(j.slot),
            limits: limits_for(j.spec, j.disk),
            owned,
            args,
            incoming,
            fds,
            mounts,
        })
    }

    /// Registers the child's steps on `cmd`: descriptors first, then (through
    /// `wrenn-hostnet`) the slot's namespace and tap on [`TAP_FD`] when `net` is given, then
    /// cgroup, mounts and uid. The cgroup is made last, so nothing failing here leaves one.
    /// Returns what the running VM keeps.
    pub(crate) fn install(
        self,
        cmd: &mut tokio::process::Command,
        net: Option<(&Path, &str)>,
    ) -> Result<Running, JailError> {
        self.fds.install(cmd)?;
        if let Some((netns, tap)) = net {
            wrenn_hostnet::enter_netns_with_tap_on_exec(cmd, netns, tap, TAP_FD)
                .map_err(io("open the tap in", netns))?;
        }
        let leaf = Cgroups::get()?.create(&self.leaf_name, &self.limits)?;
        let procs = match leaf.procs_files() {
            Ok(p) => p,
            Err(e) => {
                leaf.remove();
                return Err(e.into());
            }
        };
        install_enter(cmd, procs, self.mounts, self.uid);
        Ok(Running {
            uid: self.uid,
            leaf: Some(leaf),
            owned: self.owned,
            incoming: self.incoming,
        })
    }
}

/// What a running VM keeps of its jail.
#[derive(Debug, Default)]
pub struct Running {
    /// Its uid (and gid).
    pub uid: u32,
    /// Its cgroup (removed when it is gone).
    pub leaf: Option<Leaf>,
    /// Files lent to it.
    pub owned: Vec<Owned>,
    /// The fd set of the device state it loads.
    pub incoming: Option<String>,
}

impl Running {
    /// The jail of a QEMU an earlier agent started: its uid and cgroup as the kernel says.
    pub fn of_adopted(pid: u32) -> Self {
        let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0);
        Self {
            uid,
            leaf: Cgroups::get().ok().and_then(|c| c.leaf_of(pid)),
            owned: Vec::new(),
            incoming: None,
        }
    }

    /// The VM is gone: its files go back to root, its cgroup is removed.
    pub fn release(&mut self) {
        self.owned.clear();
        if let Some(leaf) = self.leaf.take() {
            leaf.remove();
        }
    }
}
