//! One QEMU `microvm` process and its per-VM directory.
//!
//! A VM's runtime directory holds the QMP socket (made by the agent, root-only; QEMU gets the
//! listening descriptor) and QEMU's own log, and is where QEMU writes device state
//! ([`Vm::output_file`]). Killing the VM (or dropping it) kills QEMU and removes the directory.
//! Guest RAM is a `memory-backend-file`: shared (`share=on`, read-write) for a template boot,
//! so the memory file *is* the snapshot's RAM, and for restores a private mapping of the file
//! opened read-only (`readonly=on,rom=off,share=off`: QEMU opens it `O_RDONLY` and maps it
//! MAP_PRIVATE writable), so many VMs share one template file copy-on-write and none can
//! change it. The serial console is a ring in QEMU (`-chardev ringbuf`, [`CONSOLE_RING`]
//! bytes) that the agent drains over QMP ([`Vm::read_console`]): a guest flooding its console
//! overwrites its own older output and grows nothing on the host.
//!
//! Every QEMU runs jailed (see [`crate::jail`]): its own uid, QEMU's seccomp sandbox, its own
//! cgroup, a mount namespace with only its own files, and its disk, tap, QMP socket and
//! restore state passed as descriptors.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wrenn_qmp::{Qmp, QmpError};

use crate::accel::Accel;

/// The memory backend's id; a restore needs the same RAM block name as the saved VM.
const MEM_ID: &str = "wrenn-mem";
/// Every guest gets the same MAC, like the same IP: snapshots restore into any slot.
pub const GUEST_MAC: &str = "02:fc:00:00:00:05";
/// QEMU's QMP socket, in the per-VM directory.
const QMP_SOCKET: &str = "qmp.sock";
/// How long QEMU may take to answer on its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The serial console ring in QEMU, bytes (a power of two). What the agent has not read when
/// it fills is overwritten.
pub const CONSOLE_RING: u32 = 256 * 1024;
/// The chardev id of the console ring.
const CONSOLE_ID: &str = "console";
/// QEMU's seccomp filter: no obsolete syscalls, no set*id, no fork/exec, no affinity or
/// priority changes.
const SECCOMP: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
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
    /// QEMU could not be started or exited early.
    #[error("QEMU failed: {0}")]
    Qemu(String),
    /// `qemu-img` failed.
    #[error("qemu-img failed: {0}")]
    QemuImg(String),
    /// Talking to QEMU failed.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// The jail could not be set up.
    #[error("jail QEMU")]
    Jail(#[from] crate::jail::JailError),
}

impl VmError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }
}

/// What a VM is made of. A restore must use the spec its snapshot was taken with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// How guest code runs.
    pub accel: Accel,
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
}

impl VmSpec {
    /// The kernel command line for our initramfs.
    ///
    /// Under TCG the guest's TSC is the host's, but the kernel's quick PIT calibration fails
    /// whenever the host is busy, and `microvm` has no HPET/PM timer to fall back on: the boot
    /// then hangs with the clock stuck at 0. So the TSC frequency is given (`tsc_early_khz`,
    /// read from the host), or failing that a fixed loops-per-jiffy to skip the delay loop.
    pub fn default_cmdline(accel: Accel) -> String {
        let mut cmdline = String::from(
            "console=ttyS0 quiet panic=-1 reboot=t i8042.noaux i8042.nokbd i8042.nomux random.trust_cpu=on",
        );
        if accel == Accel::Tcg {
            // Without it the kernel finds the vCPUs' TSCs "unsynchronized" (TCG's vCPU threads
            // read the host TSC at different moments), falls back to jiffies, and the guest
            // clock then loses ticks whenever the host is busy: seconds per minute, which
            // breaks signed-URL expiry and file times. TCG's TSC is the host's, so it is stable.
            cmdline.push_str(" tsc=reliable clocksource=tsc");
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            match host_tsc_khz(&cpuinfo) {
                Some(khz) => cmdline.push_str(&format!(" tsc_early_khz={khz}")),
                None => cmdline.push_str(" lpj=250880"),
            }
        }
        cmdline
    }
}

/// The host TSC frequency in kHz, when the CPU's TSC is constant (then `cpu MHz` is it).
fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let constant = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "constant_tsc"));
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split_once(':')?
        .1
        .trim()
        .parse()
        .ok()?;
    (constant && mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// How guest RAM is backed.
#[derive(Debug, Clone)]
pub enum Memory {
    /// `share=on`: guest writes land in the file (template boots; the file becomes the
    /// snapshot's RAM).
    Shared(PathBuf),
    /// `share=off`: the file is mapped copy-on-write (restores of a template).
    Private(PathBuf),
}

/// Where a VM's network goes.
#[derive(Debug, Clone)]
pub struct NetAttach {
    /// The namespace file QEMU is started in (`/run/netns/<name>`).
    pub netns: PathBuf,
    /// The tap inside it.
    pub tap: String,
    /// The slot's index: the VM's uid and cgroup follow from it.
    pub slot: u32,
}

/// Everything needed to start a QEMU process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The machine.
    pub spec: VmSpec,
    /// The per-VM directory; created, and removed when the VM ends.
    pub dir: PathBuf,
    /// The root disk (a qcow2 overlay; QEMU writes it, and reads its backing chain).
    pub disk: PathBuf,
    /// Guest RAM.
    pub memory: Memory,
    /// Network, if any.
    pub net: Option<NetAttach>,
    /// Start paused in `-incoming defer`, to load this device state
    /// ([`crate::snapshot::load_into`]).
    pub incoming: Option<PathBuf>,
    /// More disks after the root disk (an image build's blobs and target).
    pub extra_disks: Vec<ExtraDisk>,
}

/// A raw disk besides the root disk, found in the guest by its serial
/// (`/sys/block/vd*/serial`), not by its name: virtio-mmio devices are probed in no order
/// the guest can rely on.
#[derive(Debug, Clone)]
pub struct ExtraDisk {
    /// The raw file.
    pub path: PathBuf,
    /// QEMU gets a read-only descriptor and a read-only node.
    pub read_only: bool,
    /// Its virtio serial (at most 20 bytes, letters, digits and '-').
    pub serial: String,
}

/// A running QEMU. Dropping it kills QEMU and removes its directory.
#[derive(Debug)]
pub struct Vm {
    dir: PathBuf,
    child: Option<tokio::process::Child>,
    qmp: std::sync::Arc<Qmp>,
    pid: u32,
    /// For a QEMU this process did not start (taken over after an agent restart): its start
    /// time (`/proc/<pid>/stat` field 22), so a kill never hits a recycled pid.
    adopted_start: Option<u64>,
    /// Its uid, cgroup and lent files.
    jail: crate::jail::Running,
}

impl Vm {
    /// Starts QEMU, jailed, and connects to its QMP socket.
    pub async fn launch(launch: Launch) -> Result<Self, VmError> {
        let dir = &launch.dir;
        std::fs::create_dir_all(dir).map_err(VmError::io("create", dir))?;
        let (mut cmd, jail) = match command(&launch) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        };
        let log_path = dir.join("qemu.log");
        let spawned = cmd.spawn();
        // The parent's copies of the descriptors QEMU got (the QMP listener above all: with
        // it gone, a QEMU that died at start refuses connections).
        drop(cmd);
        let mut jail = jail;
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                jail.release();
                let _ = std::fs::remove_dir_all(dir);
                return Err(VmError::Qemu(format!("spawn: {e}")));
            }
        };
        let pid = child.id().unwrap_or_default();
        let qmp = tokio::select! {
            qmp = Qmp::connect_retry(dir.join(QMP_SOCKET), QMP_CONNECT_TIMEOUT) => qmp,
            status = child.wait() => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                jail.release();
                let _ = std::fs::remove_dir_all(dir);
                return Err(VmError::Qemu(format!("exited at start ({status:?}): {}", log.trim())));
            }
        };
        let qmp = match qmp {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                jail.release();
                let _ = std::fs::remove_dir_all(dir);
                return Err(e.into());
            }
        };
        let vm = Vm {
            dir: dir.clone(),
            child: Some(child),
            qmp: std::sync::Arc::new(qmp),
            pid,
            adopted_start: None,
            jail,
        };
        tracing::debug!(pid, uid = vm.jail.uid, dir = %vm.dir.display(), "QEMU started");
        Ok(vm)
    }

    /// Takes over a QEMU that an earlier agent started (found by `crate::state::scan`): `pid`
    /// with start time `start_time`, runtime directory `dir`, connected on `qmp`. It is killed
    /// and waited for like a child, by pid after re-checking its start time.
    pub fn adopt(dir: PathBuf, pid: u32, start_time: u64, qmp: Qmp) -> Self {
        Vm {
            dir,
            child: None,
            qmp: std::sync::Arc::new(qmp),
            pid,
            adopted_start: Some(start_time),
            jail: crate::jail::Running::of_adopted(pid),
        }
    }

    /// Whether an adopted QEMU is still the process we adopted.
    fn adopted_alive(&self) -> bool {
        self.adopted_start
            .is_some_and(|t| crate::state::process_start_time(self.pid) == Some(t))
    }

    /// SIGKILLs an adopted QEMU (if it is still ours) and waits up to `timeout` for it to go.
    async fn kill_adopted(&self, timeout: Duration) {
        if !self.adopted_alive() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.wait_adopted(timeout).await;
    }

    /// Polls until an adopted QEMU has exited (it is not our child: no wait(2)).
    async fn wait_adopted(&self, timeout: Duration) -> Result<(), VmError> {
        let start = std::time::Instant::now();
        while self.adopted_alive() {
            if start.elapsed() > timeout {
                return Err(VmError::Qemu(format!("did not exit within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The QMP connection.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The per-VM directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The QMP socket (in the per-VM directory).
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }

    /// The uid QEMU runs as.
    pub fn uid(&self) -> u32 {
        self.jail.uid
    }

    /// Its cgroup leaf, while it runs.
    pub fn cgroup(&self) -> Option<&crate::jail::Leaf> {
        self.jail.leaf.as_ref()
    }

    /// The QMP URI of the device state this VM was started to load.
    pub(crate) fn incoming_uri(&self) -> Option<String> {
        self.jail.incoming.as_ref().map(|set| format!("file:{set}"))
    }

    /// A new empty file `name` in the runtime directory (which QEMU sees) that QEMU may write
    /// by path (device state); back with root, mode `mode`, when the returned value is
    /// dropped.
    pub fn output_file(&self, name: &str, mode: u32) -> Result<crate::jail::Owned, VmError> {
        Ok(crate::jail::Owned::give(
            &self.dir.join(name),
            self.jail.uid,
            mode,
        )?)
    }

    /// A reader of the guest's serial console that outlives this borrow (the observer keeps
    /// one per running sandbox).
    pub fn console(&self) -> Console {
        Console(self.qmp.clone())
    }

    /// Takes what the guest wrote to its serial console since the last read (at most the
    /// newest [`CONSOLE_RING`] bytes: the ring overwrites older ones).
    pub async fn read_console(&self) -> Result<Vec<u8>, QmpError> {
        self.console().read().await
    }

    /// The end of the console as text, for error messages (it takes what it reads).
    pub async fn console_text(&self) -> String {
        match self.read_console().await {
            Ok(b) => String::from_utf8_lossy(&b[b.len().saturating_sub(3000)..]).into_owned(),
            Err(e) => format!("(console unreadable: {e})"),
        }
    }

    /// The last part of QEMU's own log (its errors), trimmed.
    pub fn qemu_log(&self) -> String {
        let bytes = std::fs::read(self.dir.join("qemu.log")).unwrap_or_default();
        let tail = &bytes[bytes.len().saturating_sub(2000)..];
        String::from_utf8_lossy(tail).trim().to_owned()
    }

    /// Waits up to `timeout` for QEMU to exit by itself (after `quit`). The directory stays.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<(), VmError> {
        let Some(child) = self.child.as_mut() else {
            self.wait_adopted(timeout).await?;
            self.jail.release();
            return Ok(());
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(_)) => {
                self.child = None;
                self.jail.release();
                Ok(())
            }
            Ok(Err(e)) => Err(VmError::Qemu(format!("wait: {e}"))),
            Err(_) => Err(VmError::Qemu(format!("did not exit within {timeout:?}"))),
        }
    }

    /// Kills QEMU, reaps it, and removes the directory.
    pub async fn kill(mut self) -> Result<(), VmError> {
        self.kill_adopted(Duration::from_secs(10)).await;
        self.adopted_start = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            child
                .wait()
                .await
                .map_err(|e| VmError::Qemu(format!("wait: {e}")))?;
        }
        // QEMU is gone (an adopted one that survived SIGKILL keeps its cgroup: the removal
        // fails while it is in it).
        self.jail.release();
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::io("remove", &self.dir)(e)),
        }
    }
}

/// The serial console ring of a VM, read over its QMP connection.
#[derive(Debug, Clone)]
pub struct Console(std::sync::Arc<Qmp>);

impl Console {
    /// The console of the VM that `qmp` talks to.
    pub fn over(qmp: std::sync::Arc<Qmp>) -> Self {
        Self(qmp)
    }

    /// Takes what the guest wrote since the last read (see [`Vm::read_console`]).
    pub async fn read(&self) -> Result<Vec<u8>, QmpError> {
        self.0.ringbuf_read(CONSOLE_ID, CONSOLE_RING).await
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.adopted_alive() {
            // Not our child: no reaping; the kernel's init does that.
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Reap synchronously so no zombie or still-running QEMU outlives the VM value.
            if let Some(pid) = child.id() {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            }
        }
        self.jail.release();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The QEMU command for `l`, jailed: the jail's descriptors and steps are registered on it.
fn command(l: &Launch) -> Result<(tokio::process::Command, crate::jail::Running), VmError> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = &l.dir;
    let socket = dir.join(QMP_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener =
        std::os::unix::net::UnixListener::bind(&socket).map_err(VmError::io("bind", &socket))?;
    // Only root (the agent) connects; QEMU has the listening descriptor.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(VmError::io("chmod", &socket))?;
    let (mem_path, shared) = match &l.memory {
        Memory::Shared(p) => (p.as_path(), true),
        Memory::Private(p) => (p.as_path(), false),
    };
    let prepared = crate::jail::Prepared::new(crate::jail::JailSpec {
        spec: &l.spec,
        slot: l.net.as_ref().map(|n| n.slot),
        vm_dir: dir,
        disk: &l.disk,
        memory: (mem_path, shared),
        incoming: l.incoming.as_deref(),
        extra_disks: &l.extra_disks,
        qmp: listener.into(),
    })?;
    let mut cmd = tokio::process::Command::new(qemu_binary());
    // The same argv[0] wherever the binary is: the crash scan looks for `qemu-system*`.
    cmd.arg0("qemu-system-x86_64");
    let mut args = qemu_args(l);
    args.extend(prepared.args.iter().cloned());
    // Its own process group: a Ctrl-C in the agent's terminal goes to the agent, which
    // then pauses or stops its VMs in order, instead of killing every QEMU at once.
    cmd.args(args)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let log_path = dir.join("qemu.log");
    let log = std::fs::File::create(&log_path).map_err(VmError::io("create", &log_path))?;
    let log2 = log.try_clone().map_err(VmError::io("dup", &log_path))?;
    cmd.stdout(log).stderr(log2);
    let net = l.net.as_ref().map(|n| (n.netns.as_path(), n.tap.as_str()));
    let jail = prepared.install(&mut cmd, net)?;
    Ok((cmd, jail))
}

/// The QEMU binary, found on `PATH` now (inside the jail only `/usr` is left to search).
fn qemu_binary() -> PathBuf {
    let name = "qemu-system-x86_64";
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The arguments that do not name passed descriptors (those come from the jail).
fn qemu_args(l: &Launch) -> Vec<String> {
    let s = &l.spec;
    let mem = match &l.memory {
        Memory::Shared(p) => format!("mem-path={},share=on", p.display()),
        // QEMU >= 8.2: open O_RDONLY, map MAP_PRIVATE read-write (rom=off): guest writes are
        // copy-on-write pages of the process, never the file's.
        Memory::Private(p) => format!("mem-path={},share=off,readonly=on,rom=off", p.display()),
    };
    // The runtime directory on the command line (as the guest name): the crash scan finds a
    // QEMU by a path under the sandboxes directory, and no other argument is one now.
    let name = format!(
        "guest=wrenn:{}",
        l.dir.display().to_string().replace(',', ",,")
    );
    let mut args: Vec<String> = vec!["-name".into(), name];
    // Option ROMs stay on (the default): the Debian bzImage boots through them.
    // `suppress-vmdesc=on` goes with `send-configuration=off` below: without it QEMU 10
    // aborts in its JSON writer at the end of a save (as Xen, which sets both).
    args.extend([
        "-M".into(),
        format!("microvm,memory-backend={MEM_ID},suppress-vmdesc=on"),
    ]);
    args.extend([
        "-m".into(),
        format!("{}M", s.memory_mib),
        "-smp".into(),
        s.vcpus.to_string(),
        "-object".into(),
        format!(
            "memory-backend-file,id={MEM_ID},size={}M,{mem}",
            s.memory_mib
        ),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        s.kernel.display().to_string(),
        "-initrd".into(),
        s.initramfs.display().to_string(),
        "-append".into(),
        s.cmdline.clone(),
        "-device".into(),
        "virtio-blk-device,drive=rootfs,id=blk0".into(),
        "-chardev".into(),
        format!("ringbuf,id={CONSOLE_ID},size={CONSOLE_RING}"),
        "-serial".into(),
        format!("chardev:{CONSOLE_ID}"),
        // Device-state-only saves (`xen-save-devices-state`, used by pause) carry no
        // configuration section, so no stream we write or read has one.
        "-global".into(),
        "migration.send-configuration=off".into(),
        "-sandbox".into(),
        SECCOMP.into(),
    ]);
    if l.net.is_some() {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net0,fd={}", crate::jail::TAP_FD),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,id=nic0,mac={GUEST_MAC}"),
        ]);
    }
    if l.incoming.is_some() {
        args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    }
    args
}

/// Creates a qcow2 overlay at `path` on `backing` (`raw` or `qcow2`).
pub async fn create_overlay(
    backing: &Path,
    backing_format: &str,
    path: &Path,
) -> Result<(), VmError> {
    let backing = std::path::absolute(backing).map_err(VmError::io("resolve", backing))?;
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", backing_format, "-b"])
        .arg(&backing)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| VmError::QemuImg(e.to_string()))?;
    if !out.status.success() {
        return Err(VmError::QemuImg(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// The QEMU version string, for manifests.
pub async fn qemu_version() -> String {
    let out = tokio::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .await;
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_khz_needs_a_constant_tsc() {
        let info = "flags : fpu constant_tsc\ncpu MHz\t\t: 2445.406\n";
        assert_eq!(host_tsc_khz(info), Some(2_445_406));
        assert_eq!(host_tsc_khz("flags : fpu\ncpu MHz : 2445.406\n"), None);
        assert_eq!(host_tsc_khz("flags : constant_tsc\n"), None);
    }

    #[test]
    fn tcg_cmdline_fixes_the_clock() {
        let c = VmSpec::default_cmdline(Accel::Tcg);
        assert!(c.contains("tsc_early_khz=") || c.contains("lpj="), "{c}");
        assert!(!VmSpec::default_cmdline(Accel::Kvm).contains("lpj="));
    }
}
