//! Running filesystem work with the permissions of the requesting user.
//!
//! envd runs as root, but every filesystem RPC and `/files` transfer must succeed or fail
//! exactly as it would for the user it acts as. On Linux the credentials the kernel checks for file access are the
//! filesystem uid/gid and the supplementary groups, and all three are per-thread at the syscall
//! level. So the work runs on a blocking thread that takes on the user's fsuid, fsgid and groups
//! for the duration of the closure and then returns to root before the thread goes back to the
//! pool. The kernel then does every check (search permission along the path, sticky
//! directories, ACLs, xattr access), and new files and directories are owned by the user
//! without a separate chown.
//!
//! Two details matter:
//! - glibc's `setgroups()` changes the groups of *every* thread (it broadcasts the change), so
//!   the raw syscall is used instead, which changes only the calling thread.
//! - Moving fsuid away from 0 drops the file capabilities (`CAP_DAC_OVERRIDE`, ...) from the
//!   thread's effective set; moving it back to 0 restores them. `CAP_SETUID`/`CAP_SETGID`
//!   are untouched, so switching back always works for a root envd.
//!
//! When envd is not root (development runs), no switch is possible or needed: the work runs
//! with envd's own credentials.

use std::io;

use crate::user::User;

/// Runs `f` on a blocking thread with the filesystem credentials of `user`.
pub(crate) async fn run_as<T, F>(user: &User, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let creds = Creds::of(user);
    tokio::task::spawn_blocking(move || creds.run(f))
        .await
        .map_err(|e| io::Error::other(format!("filesystem worker failed: {e}")))?
}

/// The credentials one piece of work runs with.
#[derive(Debug, Clone)]
pub(crate) struct Creds {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

impl Creds {
    pub(crate) fn of(user: &User) -> Self {
        Creds {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
        }
    }

    /// Runs `f` on the current thread with these credentials; the thread must be one that can
    /// be dedicated to `f` for its duration (a blocking-pool thread).
    pub(crate) fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 || self.uid == 0 {
            // Root needs no switch; a non-root envd cannot switch and acts as itself.
            return Ok(f());
        }
        let guard = SwitchGuard::switch(self)?;
        let out = f();
        drop(guard);
        Ok(out)
    }
}

/// While alive, the current thread has the user's fs credentials; dropping it restores root's.
struct SwitchGuard {
    saved_groups: Vec<libc::gid_t>,
}

impl SwitchGuard {
    fn switch(creds: &Creds) -> io::Result<SwitchGuard> {
        let saved_groups = thread_groups()?;
        let guard = SwitchGuard { saved_groups };
        // From here on, any failure drops `guard`, which restores root's credentials.
        set_thread_groups(&creds.groups)?;
        set_fsgid(creds.gid)?;
        set_fsuid(creds.uid)?;
        Ok(guard)
    }
}

impl Drop for SwitchGuard {
    fn drop(&mut self) {
        let restored = set_fsuid(0)
            .and_then(|()| set_fsgid(0))
            .and_then(|()| set_thread_groups(&self.saved_groups));
        if let Err(e) = restored {
            // A pool thread left with a user's credentials would run later work (of any
            // subsystem) with the wrong permissions. That cannot be allowed to happen, and it
            // cannot happen for a root process, so stop rather than continue.
            tracing::error!(error = %e, "cannot restore root filesystem credentials; aborting");
            std::process::abort();
        }
    }
}

fn set_fsuid(uid: u32) -> io::Result<()> {
    // SAFETY: setfsuid only changes the calling thread's fsuid; any value is accepted.
    unsafe { libc::setfsuid(uid) };
    // setfsuid reports no errors; a second call with an invalid id (-1) changes nothing and
    // returns the current value, which tells whether the first call took effect.
    // SAFETY: as above; -1 is never a valid id, so this call only reads.
    let now = unsafe { libc::setfsuid(u32::MAX) } as u32;
    if now == uid {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "setfsuid({uid}) did not take effect"
        )))
    }
}

fn set_fsgid(gid: u32) -> io::Result<()> {
    // SAFETY: setfsgid only changes the calling thread's fsgid; any value is accepted.
    unsafe { libc::setfsgid(gid) };
    // SAFETY: -1 is never a valid id, so this call only reads the current fsgid.
    let now = unsafe { libc::setfsgid(u32::MAX) } as u32;
    if now == gid {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "setfsgid({gid}) did not take effect"
        )))
    }
}

/// The calling thread's supplementary groups.
fn thread_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a zero size with a null pointer only asks for the count.
    let n = unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<libc::gid_t>()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: the buffer has room for exactly `groups.len()` ids.
    let n = unsafe { libc::syscall(libc::SYS_getgroups, groups.len(), groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

/// Sets the calling thread's supplementary groups only (the raw syscall, not glibc's
/// process-wide wrapper).
fn set_thread_groups(groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t, which the kernel only reads.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
