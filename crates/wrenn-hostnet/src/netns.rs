//! Entering network namespaces. A thread that calls `setns` stays in that namespace until it
//! ends, so it is never one of an async runtime's (or a blocking pool's) threads: either a
//! thread of its own that ends afterwards ([`in_netns`]) or a child process between fork and
//! exec ([`enter_netns_on_exec`]).

use std::path::Path;

use nix::sched::CloneFlags;

/// Runs `f` on a fresh thread that has entered the network namespace at `netns`, and waits for
/// it (so this blocks: call it from a blocking context). Sockets created there stay in that
/// namespace after the thread ends, so a listener made this way can be served from the
/// caller's runtime.
pub(crate) fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let ns = std::fs::File::open(netns)?;
    std::thread::Builder::new()
        .name("wrenn-netns".into())
        .spawn(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(f())
        })?
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}

/// Makes `cmd` start inside the network namespace at `netns` (`/run/netns/<name>`): the child
/// enters it between fork and exec, so no thread of the caller changes namespace.
pub fn enter_netns_on_exec(cmd: &mut tokio::process::Command, netns: &Path) -> std::io::Result<()> {
    // Opened here, before the fork (close-on-exec, so the program never inherits it).
    let ns = std::fs::File::open(netns)?;
    // SAFETY: the closure runs between fork and exec; it makes one syscall (setns) on an fd
    // opened before the fork, and neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    Ok(())
}
