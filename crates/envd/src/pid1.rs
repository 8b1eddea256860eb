//! PID-1 mode: envd as the init of a guest made from a container image.
//!
//! The initramfs `switch_root`s to `/.wrenn/init` (a symlink to `/.wrenn/envd`, laid down by
//! `envd image finalize`) when it exists, so such an image needs no init or shell of its own.
//! Invoked as `init`, envd does what the Debian template's bash init does: mounts the API
//! filesystems ([`boot`]), sets the hostname, then keeps `/.wrenn/envd` running, reaps every
//! process that reparents to it, and powers the VM off on SIGTERM or SIGINT.
//!
//! PID 1 must never exit or panic (the kernel panics): every failure is logged to
//! `/dev/console` and the loop goes on. Plain blocking code, no async runtime.

mod boot;

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::error::error_chain;

/// The envd that runs the sandbox, beside `/.wrenn/init`.
pub const ENVD_PATH: &str = "/.wrenn/envd";
/// envd's default listen address (`Config::listen`), spelled out as the bash init does.
const LISTEN: &str = "0.0.0.0:49983";
const METADATA_URL: &str = "http://169.254.169.254/";
/// The environment's PATH for envd and so for every process it starts.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Whether argv[0] says this is PID-1 mode (`/.wrenn/init`, or any path ending in `init`).
pub fn invoked_as_init(argv0: Option<&OsStr>) -> bool {
    argv0.and_then(|a| Path::new(a).file_name()) == Some(OsStr::new("init"))
}

/// Runs PID-1 mode; returns only to refuse when this is not PID 1.
pub fn main() -> ExitCode {
    let pid = std::process::id();
    if pid != 1 {
        // A user running /.wrenn/init by hand gets this, not a remount of their /proc.
        eprintln!(
            "wrenn-init: not PID 1 (pid {pid}): this is the guest's init, which the initramfs \
             starts; run {ENVD_PATH} to run envd"
        );
        return ExitCode::FAILURE;
    }
    std::panic::set_hook(Box::new(|info| log(&format!("panic: {info}"))));
    if catch_unwind(boot).is_err() {
        log("setup panicked; starting envd anyway");
    }
    supervise()
}

/// Writes `wrenn-init: msg` to the console (else stderr). Never fails, never panics.
fn log(msg: &str) {
    let line = format!("wrenn-init: {msg}\n");
    let console = OpenOptions::new()
        .write(true)
        // PID 1 must not take the console as its controlling terminal (a ^C would reach it).
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/console");
    if let Ok(mut console) = console
        && console.write_all(line.as_bytes()).is_ok()
    {
        return;
    }
    let _ = io::stderr().write_all(line.as_bytes());
}

/// Mounts and the hostname; each failure is logged and the rest still run.
fn boot() {
    for step in boot::STEPS {
        if let Err(e) = boot::run(step) {
            log(&error_chain(&e));
        }
    }
    if let Err(e) = nix::unistd::sethostname(boot::HOSTNAME) {
        log(&format!("set the hostname: {e}"));
    }
}

/// Keeps envd running and reaps children, forever.
fn supervise() -> ! {
    let signals = open_signals();
    let mut supervisor = Supervisor {
        envd: None,
        start_at: Some(Instant::now()),
    };
    loop {
        let step = catch_unwind(AssertUnwindSafe(|| supervisor.step(signals.as_ref())));
        if step.is_err() {
            // The panic hook logged it; do not spin if it keeps happening.
            std::thread::sleep(RESTART_DELAY);
        }
    }
}

/// SIGCHLD, SIGTERM and SIGINT as a file descriptor: the loop polls it rather than running
/// code in a signal handler. `None` (logged) if that fails; children are still reaped, by
/// polling.
fn open_signals() -> Option<SignalFd> {
    let mut mask = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        mask.add(signal);
    }
    // Children do not inherit the mask: std's Command clears it before exec.
    if let Err(e) = mask.thread_block() {
        log(&format!("block signals: {e}; SIGTERM will not power off"));
        return None;
    }
    match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(fd) => Some(fd),
        Err(e) => {
            log(&format!("signalfd: {e}; SIGTERM will not power off"));
            let _ = mask.thread_unblock();
            None
        }
    }
}

struct Supervisor {
    envd: Option<Pid>,
    /// When to start envd next (`None` while it runs).
    start_at: Option<Instant>,
}

impl Supervisor {
    fn step(&mut self, signals: Option<&SignalFd>) {
        self.start_if_due();
        let timeout = poll_timeout(self.start_at, Instant::now());
        match signals {
            Some(fd) => wait_for_signals(fd, timeout),
            None => std::thread::sleep(Duration::from_millis(100)),
        }
        self.reap();
    }

    fn start_if_due(&mut self) {
        match self.start_at {
            Some(at) if self.envd.is_none() && Instant::now() >= at => {}
            _ => return,
        }
        let spawned = Command::new(ENVD_PATH)
            .args(["--in-sandbox", "--listen", LISTEN])
            .args(["--metadata-url", METADATA_URL])
            .env("PATH", PATH)
            .spawn();
        match spawned {
            // Dropping the Child neither waits nor kills; `reap` collects it.
            Ok(child) => {
                self.envd = Some(Pid::from_raw(child.id() as i32));
                self.start_at = None;
            }
            Err(e) => {
                log(&format!("start {ENVD_PATH}: {e}; retrying"));
                self.start_at = Some(Instant::now() + RESTART_DELAY);
            }
        }
    }

    /// Collects every exited child; envd's exit schedules its restart.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    if let Some(code) = exit_code(&status)
                        && status.pid().is_some()
                        && status.pid() == self.envd
                    {
                        log(&format!("envd exited with status {code}, restarting"));
                        self.envd = None;
                        self.start_at = Some(Instant::now() + RESTART_DELAY);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log(&format!("waitpid: {e}"));
                    return;
                }
            }
        }
    }
}

/// Waits up to `timeout` for a signal; SIGTERM or SIGINT powers off, SIGCHLD just wakes.
fn wait_for_signals(fd: &SignalFd, timeout: PollTimeout) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => {
            log(&format!("poll: {e}"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    while let Ok(Some(info)) = fd.read_signal() {
        let signo = info.ssi_signo as i32;
        if signo == libc::SIGTERM || signo == libc::SIGINT {
            power_off();
        }
    }
}

/// How long to sleep until `start_at`; forever (until a signal) when nothing is due.
fn poll_timeout(start_at: Option<Instant>, now: Instant) -> PollTimeout {
    match start_at {
        None => PollTimeout::NONE,
        Some(at) => {
            let wait = at.saturating_duration_since(now);
            // Rounded up: a wake a millisecond early would only loop once more.
            let millis = wait.as_micros().div_ceil(1000);
            PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// A child's exit as the shell reports it: its code, or 128 + the signal that killed it.
/// `None` for a status that is no exit.
fn exit_code(status: &WaitStatus) -> Option<i32> {
    match *status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

/// Flushes the disk and powers off; QEMU runs with `-no-reboot`, so that ends the VM.
fn power_off() {
    log("shutting down");
    nix::unistd::sync();
    // Returns only on failure.
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    log(&format!("power off: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_argv0s_file_name() {
        assert!(invoked_as_init(Some(OsStr::new("/.wrenn/init"))));
        assert!(invoked_as_init(Some(OsStr::new("init"))));
        assert!(!invoked_as_init(Some(OsStr::new("/usr/bin/envd"))));
        assert!(!invoked_as_init(Some(OsStr::new("/sbin/init.d"))));
        assert!(!invoked_as_init(None));
    }

    #[test]
    fn listens_where_envd_listens_by_default() {
        use clap::Parser;
        let config = crate::Config::parse_from(["envd"]);
        assert_eq!(config.listen.to_string(), LISTEN);
    }

    #[test]
    fn exit_codes_as_the_shell_reports_them() {
        let pid = Pid::from_raw(42);
        assert_eq!(exit_code(&WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(&WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(exit_code(&WaitStatus::StillAlive), None);
    }

    #[test]
    fn poll_timeouts() {
        let now = Instant::now();
        assert_eq!(poll_timeout(None, now), PollTimeout::NONE);
        assert_eq!(poll_timeout(Some(now), now), PollTimeout::ZERO);
        let t = poll_timeout(Some(now + Duration::from_micros(1500)), now);
        assert_eq!(i32::from(t), 2);
        assert_eq!(
            i32::from(poll_timeout(Some(now - Duration::from_secs(1)), now)),
            0
        );
    }
}
