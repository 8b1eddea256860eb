//! Forking a process as a request's user, in its own session, optionally on a PTY.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::handle::{Input, Kind, Outputs};
use super::pty;
use crate::user::User;

/// Everything needed to start one process.
pub(crate) struct Launch {
    pub(crate) cmd: String,
    pub(crate) args: Vec<String>,
    /// In order; a later value for the same name wins.
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: PathBuf,
    pub(crate) user: User,
    pub(crate) stdio: Streams,
    /// The `cgroup.procs` file the process joins before exec.
    pub(crate) cgroup: Option<PathBuf>,
}

/// How the process's standard streams are connected.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Streams {
    /// stdout and stderr pipes; stdin a pipe or `/dev/null`.
    Pipes { stdin: bool },
    /// All three on a new terminal of this size.
    Pty(pty::Size),
}

/// A started child and its I/O ends.
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) child: Child,
    pub(crate) input: Input,
    pub(crate) outputs: Outputs,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("open pty: {0}")]
    Pty(#[source] io::Error),
    #[error("open cgroup {}: {source}", path.display())]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("error starting process '{cmd}': {source}")]
    Exec { cmd: String, source: io::Error },
}

pub(crate) fn spawn(launch: Launch) -> Result<Spawned, SpawnError> {
    let exec_err = |source: io::Error| SpawnError::Exec {
        cmd: launch.cmd.clone(),
        source,
    };

    let mut command = Command::new(&launch.cmd);
    command.args(&launch.args).env_clear();
    for (k, v) in &launch.env {
        command.env(k, v);
    }

    let mut master = None;
    match launch.stdio {
        Streams::Pipes { stdin } => {
            command
                .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        Streams::Pty(size) => {
            let (m, slave) = pty::open(size).map_err(SpawnError::Pty)?;
            let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(SpawnError::Pty);
            command
                .stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            master = Some(m);
        }
    }

    // Opened before the fork, written in the child: joining needs no path lookups after fork,
    // and the fd is close-on-exec so the process never sees it.
    let cgroup = match &launch.cgroup {
        Some(path) => Some(std::fs::OpenOptions::new().write(true).open(path).map_err(
            |source| SpawnError::Cgroup {
                path: path.clone(),
                source,
            },
        )?),
        None => None,
    };

    let child_setup = ChildSetup {
        cwd: CString::new(launch.cwd.as_os_str().as_bytes()).map_err(|_| {
            exec_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cwd contains a NUL byte",
            ))
        })?,
        uid: launch.user.uid,
        gid: launch.user.gid,
        groups: launch.user.groups.clone(),
        cgroup_fd: cgroup.as_ref().map(|f| f.as_raw_fd()),
        controlling_tty: master.is_some(),
    };
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls on data prepared before the fork (see `ChildSetup::apply`); it allocates
    // nothing and takes no locks.
    unsafe {
        command.pre_exec(move || child_setup.apply());
    }

    let mut child = command.spawn().map_err(exec_err)?;
    // The child has its copies now; ours would keep the PTY open after the child exits.
    drop(command);
    drop(cgroup);
    let pid = child
        .id()
        .ok_or_else(|| exec_err(io::Error::other("the process exited before it got a pid")))?;

    let (input, outputs): (Input, Outputs) = match master {
        Some(master) => (
            Input::Pty(master.clone()),
            vec![(Kind::Pty, Box::new(master.reader()))],
        ),
        None => {
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| exec_err(io::Error::other("no stdout pipe")))?;
            let stderr = child
                .stderr
                .take()
                .ok_or_else(|| exec_err(io::Error::other("no stderr pipe")))?;
            let stdin = child.stdin.take();
            (
                Input::Pipe(tokio::sync::Mutex::new(stdin)),
                vec![
                    (Kind::Stdout, Box::new(stdout)),
                    (Kind::Stderr, Box::new(stderr)),
                ],
            )
        }
    };
    Ok(Spawned {
        pid,
        child,
        input,
        outputs,
    })
}

/// What the child does between fork and exec, prepared in the parent.
struct ChildSetup {
    cwd: CString,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    cgroup_fd: Option<i32>,
    controlling_tty: bool,
}

/// User code is killed before envd when memory runs out.
const OOM_SCORE_ADJ: &[u8] = b"100";

impl ChildSetup {
    /// Runs in the child after fork (stdio already on fds 0-2). Async-signal-safe only.
    fn apply(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on integers and on pointers to buffers that live as long
        // as `self` (the CString, the groups vector, static byte strings). In the child of a
        // fork, each is async-signal-safe.
        unsafe {
            // A new session: its own process group (signals reach the whole tree), and no
            // controlling terminal unless we give it one.
            check(libc::setsid())?;
            if self.controlling_tty {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if let Some(fd) = self.cgroup_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            // Best effort: without /proc the process keeps envd's score.
            let oom = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if oom >= 0 {
                let _ = libc::write(oom, OOM_SCORE_ADJ.as_ptr().cast(), OOM_SCORE_ADJ.len());
                libc::close(oom);
            }
            if libc::geteuid() == 0 {
                check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
                check(libc::setgid(self.gid))?;
                check(libc::setuid(self.uid))?;
            } else if libc::geteuid() != self.uid {
                // An unprivileged envd can only run processes as itself.
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            // After dropping privileges, so the user must be able to enter the directory.
            check(libc::chdir(self.cwd.as_ptr()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::io::AsyncReadExt;

    use super::*;

    fn nobody() -> User {
        User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: "/nonexistent".into(),
            shell: "/usr/sbin/nologin".into(),
            groups: vec![65534],
        }
    }

    /// A cgroup v2 hierarchy this test may create a group in (root only).
    fn cgroup2_mount() -> Option<&'static Path> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| root && p.join("cgroup.controllers").exists())
    }

    /// Removes the test cgroup even when an assertion fails.
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    #[tokio::test]
    async fn joins_the_cgroup_as_the_user_in_its_cwd() {
        let Some(mount) = cgroup2_mount() else {
            eprintln!("skipped: no writable cgroup v2 hierarchy");
            return;
        };
        let name = format!("wrenn-process-test-{}", std::process::id());
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).unwrap();
        let _remove = Remove(dir.clone());
        let spawned = spawn(Launch {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), "cat /proc/self/cgroup; id -u; pwd".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/tmp".into(),
            user: nobody(),
            stdio: Streams::Pipes { stdin: false },
            cgroup: Some(dir.join("cgroup.procs")),
        })
        .unwrap();
        let mut out = String::new();
        let (_, mut outputs) = (spawned.input, spawned.outputs);
        outputs.remove(0).1.read_to_string(&mut out).await.unwrap();
        let mut child = spawned.child;
        assert!(child.wait().await.unwrap().success());
        assert!(out.lines().any(|l| l == format!("0::/{name}")), "{out}");
        assert!(out.ends_with("65534\n/tmp\n"), "{out}");
    }

    #[tokio::test]
    async fn a_cgroup_that_cannot_be_opened_fails_the_start() {
        let err = spawn(Launch {
            cmd: "true".into(),
            args: vec![],
            env: vec![],
            cwd: "/".into(),
            user: nobody(),
            stdio: Streams::Pipes { stdin: false },
            cgroup: Some("/nonexistent-cgroup/cgroup.procs".into()),
        })
        .err()
        .expect("an error");
        assert!(matches!(err, SpawnError::Cgroup { .. }), "{err}");
    }
}
