//! Network namespaces: making, entering and deleting them.
//!
//! A thread that calls `setns` or `unshare` stays in that namespace until it ends, so it is
//! never one of an async runtime's (or a blocking pool's) threads: work that enters a
//! namespace runs on a thread of its own that ends afterwards ([`on_own_thread`],
//! [`in_netns_async`]), or in a child process between fork and exec ([`enter_netns_on_exec`]).
//!
//! Namespaces are named the way `ip netns` names them (a bind mount of the namespace on
//! `/run/netns/<name>`), so `ip netns exec` and every tool that knows that convention work on
//! them. `rtnetlink` has helpers for this too, but its `NetworkNamespace::add` forks the whole
//! (multi-threaded) process and waits for the child on the calling async task; unsharing on a
//! thread of our own needs neither.

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;

/// Where named namespaces are mounted.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// The bind-mounted file of namespace `name`.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs the future `work` makes on a thread of its own, with a single-threaded runtime for its
/// netlink connections, and blocks until it is done. The thread ends afterwards, so `work` may
/// enter namespaces.
pub(crate) fn on_own_thread<T, F>(work: impl FnOnce() -> F + Send + 'static) -> io::Result<T>
where
    F: Future<Output = T>,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name("wrenn-netns".into())
        .spawn(move || run_to_completion(work))?
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// [`on_own_thread`], awaited instead of blocking the caller's thread. Dropping the future
/// does not stop `work`; its result is then dropped on that thread.
pub(crate) async fn on_own_thread_async<T, F>(
    work: impl FnOnce() -> F + Send + 'static,
) -> io::Result<T>
where
    F: Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wrenn-netns".into())
        .spawn(move || {
            let _ = tx.send(run_to_completion(work));
        })?;
    rx.await
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// Runs `work` on this (fresh) thread, then returns the thread to the namespace it started
/// in before handing the result over: what the caller drops of it (a `Slot` nobody waited for,
/// say) is then dropped in the caller's namespace.
fn run_to_completion<T, F: Future<Output = T>>(work: impl FnOnce() -> F) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let out = runtime.block_on(async { work().await });
    drop(runtime);
    enter(&home)?;
    Ok(out)
}

/// Runs `f` on a fresh thread that has entered the namespace at `netns`. Sockets made there
/// stay in that namespace after the thread ends, so a listener made this way can be served
/// from any runtime.
pub(crate) async fn in_netns_async<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(netns)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wrenn-netns".into())
        .spawn(move || {
            let _ = tx.send(enter(&ns).map(|()| f()));
        })?;
    rx.await
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// Moves the calling thread into the namespace `ns` refers to. Only on threads of our own.
pub(crate) fn enter(ns: &File) -> io::Result<()> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Creates namespace `name` as `ip netns add` does and leaves the calling thread in it;
/// returns the namespace, open. Only on threads of our own (see [`on_own_thread`]). On an
/// error nothing is left under [`NETNS_DIR`].
pub(crate) fn create_and_enter(name: &str) -> io::Result<File> {
    share_netns_dir()?;
    let path = netns_path(name);
    // The mount point: an empty file, mode 0 like `ip netns add` makes it.
    drop(nix::fcntl::open(
        &path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_EXCL,
        Mode::empty(),
    )?);
    let made = nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .and_then(|()| {
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .map_err(io::Error::from)
        .and_then(|()| File::open(&path));
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made
}

/// Makes [`NETNS_DIR`] a shared mount (bind-mounting it on itself first if it is none), as
/// `ip netns add` does, so namespace mounts propagate between mount namespaces and unmounting
/// one everywhere frees the namespace sooner.
fn share_netns_dir() -> io::Result<()> {
    match std::fs::create_dir(NETNS_DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let share = || {
        nix::mount::mount(
            Some(""),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match share() {
        Ok(()) => Ok(()),
        // Not a mount point yet.
        Err(nix::errno::Errno::EINVAL) => {
            nix::mount::mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            Ok(share()?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes the name of namespace `name` as `ip netns del` does (the namespace itself goes
/// when nothing uses it any more). No such namespace is no error.
pub(crate) fn delete_netns_now(name: &str) -> io::Result<()> {
    let path = netns_path(name);
    // Not mounted (a half-made namespace) is fine: the file still goes.
    let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes `cmd` start inside the network namespace at `netns` (`/run/netns/<name>`): the child
/// enters it between fork and exec, so no thread of the caller changes namespace.
pub fn enter_netns_on_exec(cmd: &mut tokio::process::Command, netns: &Path) -> io::Result<()> {
    // Opened here, before the fork (close-on-exec, so the program never inherits it).
    let ns = File::open(netns)?;
    // SAFETY: the closure runs between fork and exec; it makes one syscall (setns) on an fd
    // opened before the fork, and neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
        });
    }
    Ok(())
}

/// Like [`enter_netns_on_exec`], and then attaches to the tap `tap` inside the namespace and
/// leaves it open on descriptor `fd` for the program (QEMU's `-netdev tap,fd=<fd>`), so the
/// program needs no privilege to reach its network. The child opens `/dev/net/tun` itself,
/// after entering the namespace: a tap is looked up by name in the caller's namespace.
pub fn enter_netns_with_tap_on_exec(
    cmd: &mut tokio::process::Command,
    netns: &Path,
    tap: &str,
    fd: std::os::fd::RawFd,
) -> io::Result<()> {
    let ns = File::open(netns)?;
    let req = crate::tap::attach_request(tap)?;
    // SAFETY: the closure runs between fork and exec; it makes only syscalls (setns, open,
    // ioctl, dup2, close) on descriptors and a request prepared before the fork, and neither
    // allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            crate::tap::attach_to_fd(&req, fd)
        });
    }
    Ok(())
}
