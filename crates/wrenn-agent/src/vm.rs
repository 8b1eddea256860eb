//! One QEMU `microvm` process and its per-VM directory.
//!
//! Everything a VM owns lives in its directory: the QMP socket, the serial console log,
//! QEMU's own log, and the qcow2 overlay of its root filesystem. Killing the VM (or dropping
//! it) kills QEMU and removes the directory. Guest RAM is a `memory-backend-file`: shared
//! (`share=on`) for a template boot, so the memory file *is* the snapshot's RAM, and private
//! (`share=off`, MAP_PRIVATE) for restores, so many VMs share one template file copy-on-write.

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
/// How long QEMU may take to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// Everything needed to start a QEMU process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The machine.
    pub spec: VmSpec,
    /// The per-VM directory; created, and removed when the VM ends.
    pub dir: PathBuf,
    /// The root disk (a qcow2 overlay, usually inside `dir`).
    pub disk: PathBuf,
    /// Guest RAM.
    pub memory: Memory,
    /// Network, if any.
    pub net: Option<NetAttach>,
    /// Start paused in `-incoming defer`, waiting for `migrate-incoming`.
    pub incoming: bool,
}

/// A running QEMU. Dropping it kills QEMU and removes its directory.
#[derive(Debug)]
pub struct Vm {
    dir: PathBuf,
    child: Option<tokio::process::Child>,
    qmp: Qmp,
    pid: u32,
    /// For a QEMU this process did not start (taken over after an agent restart): its start
    /// time (`/proc/<pid>/stat` field 22), so a kill never hits a recycled pid.
    adopted_start: Option<u64>,
}

impl Vm {
    /// Starts QEMU and connects to its QMP socket.
    pub async fn launch(launch: Launch) -> Result<Self, VmError> {
        let dir = &launch.dir;
        std::fs::create_dir_all(dir).map_err(VmError::io("create", dir))?;
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        // Its own process group: a Ctrl-C in the agent's terminal goes to the agent, which
        // then pauses or stops its VMs in order, instead of killing every QEMU at once.
        cmd.args(qemu_args(&launch))
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let log_path = dir.join("qemu.log");
        let log = std::fs::File::create(&log_path).map_err(VmError::io("create", &log_path))?;
        let log2 = log.try_clone().map_err(VmError::io("dup", &log_path))?;
        cmd.stdout(log).stderr(log2);
        if let Some(net) = &launch.net {
            wrenn_hostnet::enter_netns_on_exec(&mut cmd, &net.netns)
                .map_err(VmError::io("open", &net.netns))?;
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| VmError::Qemu(format!("spawn: {e}")))?;
        let pid = child.id().unwrap_or_default();
        let qmp = tokio::select! {
            qmp = Qmp::connect_retry(dir.join(QMP_SOCKET), QMP_CONNECT_TIMEOUT) => qmp,
            status = child.wait() => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let _ = std::fs::remove_dir_all(dir);
                return Err(VmError::Qemu(format!("exited at start ({status:?}): {}", log.trim())));
            }
        };
        let qmp = match qmp {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = std::fs::remove_dir_all(dir);
                return Err(e.into());
            }
        };
        let vm = Vm {
            dir: dir.clone(),
            child: Some(child),
            qmp,
            pid,
            adopted_start: None,
        };
        tracing::debug!(pid, dir = %vm.dir.display(), "QEMU started");
        Ok(vm)
    }

    /// Takes over a QEMU that an earlier agent started (found by `crate::state::scan`): `pid`
    /// with start time `start_time`, runtime directory `dir`, connected on `qmp`. It is killed
    /// and waited for like a child, by pid after re-checking its start time.
    pub fn adopt(dir: PathBuf, pid: u32, start_time: u64, qmp: Qmp) -> Self {
        Vm {
            dir,
            child: None,
            qmp,
            pid,
            adopted_start: Some(start_time),
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

    /// The guest's serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
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
            return self.wait_adopted(timeout).await;
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(_)) => {
                self.child = None;
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
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::io("remove", &self.dir)(e)),
        }
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn qemu_args(l: &Launch) -> Vec<String> {
    let s = &l.spec;
    let dir = &l.dir;
    let (mem_path, share) = match &l.memory {
        Memory::Shared(p) => (p, "on"),
        Memory::Private(p) => (p, "off"),
    };
    let mut args: Vec<String> = vec!["-name".into(), "wrenn".into()];
    // Option ROMs stay on (the default): the Debian bzImage boots through them.
    // `suppress-vmdesc=on` goes with `send-configuration=off` below: without it QEMU 10
    // aborts in its JSON writer at the end of a save (as Xen, which sets both).
    args.extend([
        "-M".into(),
        format!("microvm,memory-backend={MEM_ID},suppress-vmdesc=on"),
    ]);
    args.extend(s.accel.qemu_args());
    args.extend([
        "-m".into(),
        format!("{}M", s.memory_mib),
        "-smp".into(),
        s.vcpus.to_string(),
        "-object".into(),
        format!(
            "memory-backend-file,id={MEM_ID},size={}M,mem-path={},share={share}",
            s.memory_mib,
            mem_path.display()
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
        "-drive".into(),
        format!(
            "id=rootfs,file={},format=qcow2,if=none,discard=unmap",
            l.disk.display()
        ),
        "-device".into(),
        "virtio-blk-device,drive=rootfs,id=blk0".into(),
        "-chardev".into(),
        format!("file,id=console,path={}", dir.join("console.log").display()),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            dir.join(QMP_SOCKET).display()
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // Device-state-only saves (`xen-save-devices-state`, used by pause) carry no
        // configuration section, so no stream we write or read has one.
        "-global".into(),
        "migration.send-configuration=off".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
    ]);
    if let Some(net) = &l.net {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,id=nic0,mac={GUEST_MAC}"),
        ]);
    }
    if l.incoming {
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
