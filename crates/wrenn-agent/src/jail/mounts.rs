//! The file system a jailed QEMU sees: a mount namespace whose root is an empty tmpfs holding
//! only the system files QEMU runs on (`/usr` and the merged-`/usr` links, read-only; a few
//! device nodes) and the VM's own files, each bind-mounted at the path it has on the host, so
//! every path on QEMU's command line means the same inside. Nothing of other sandboxes, the
//! agent's state or the rest of the host is reachable, whatever their permissions.
//!
//! [`MountPlan`] is built before the fork (all paths as C strings, every directory and mount
//! point listed), and [`MountPlan::enter`] runs between fork and exec with nothing but
//! syscalls: `unshare(CLONE_NEWNS)`, the root made private (nothing propagates back to the
//! host), a tmpfs on the jail directory, the binds, `pivot_root` into it, the old root
//! detached, and the new root remounted read-only.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

/// The (empty, root-owned) directory every jail's tmpfs is mounted on, in the child's own
/// mount namespace only.
pub const JAIL_DIR: &str = "/run/wrenn/jail";

/// Host paths QEMU needs to run at all.
const SYSTEM_DIRS: [&str; 1] = ["/usr"];
/// Top-level names that are links into `/usr` on merged-`/usr` systems (or directories).
const SYSTEM_LINKS: [&str; 6] = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
/// Device nodes QEMU (or glibc) may open.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];
/// Optional files: the loader's cache (without it the loader searches the default paths).
const OPTIONAL_FILES: [&str; 1] = ["/etc/ld.so.cache"];

#[derive(Debug)]
struct Bind {
    src: CString,
    dst: CString,
    readonly: bool,
    dev: bool,
}

/// A jail's mounts, ready for [`MountPlan::enter`].
#[derive(Debug)]
pub struct MountPlan {
    root: CString,
    /// Directories to make in the tmpfs, parents first.
    dirs: Vec<CString>,
    /// Empty files to make as mount points of file binds.
    files: Vec<CString>,
    /// (target, link) symbolic links to make.
    links: Vec<(CString, CString)>,
    binds: Vec<Bind>,
    /// Paths already planned (for dedup), host-side.
    planned: BTreeSet<PathBuf>,
    dir_set: BTreeSet<PathBuf>,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))
}

/// `path` made absolute without touching the file system: `.` dropped, `..` rejected (a path
/// that climbs could name something other than what QEMU resolves).
fn lexical(path: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::other(format!(
                    "{}: `..` in a jailed path",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

impl MountPlan {
    /// A plan with the system files QEMU needs.
    pub fn new() -> io::Result<Self> {
        let mut plan = Self {
            root: cstr(Path::new(JAIL_DIR))?,
            dirs: Vec::new(),
            files: Vec::new(),
            links: Vec::new(),
            binds: Vec::new(),
            planned: BTreeSet::new(),
            dir_set: BTreeSet::new(),
        };
        for d in SYSTEM_DIRS {
            plan.add(Path::new(d), true, false, true)?;
        }
        for l in SYSTEM_LINKS {
            let p = Path::new(l);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p)?;
                    plan.links.push((cstr(&target)?, plan.inside(p)?));
                }
                Ok(m) if m.is_dir() => plan.add(p, true, false, true)?,
                _ => {}
            }
        }
        for d in DEVICES {
            if Path::new(d).exists() {
                plan.add(Path::new(d), false, true, false)?;
            }
        }
        for f in OPTIONAL_FILES {
            if Path::new(f).is_file() {
                plan.add(Path::new(f), true, false, false)?;
            }
        }
        Ok(plan)
    }

    /// Makes `path` (a file or directory) visible at the same path, read-only.
    pub fn read_only(&mut self, path: &Path) -> io::Result<()> {
        let dir = std::fs::metadata(path)?.is_dir();
        self.add(path, true, false, dir)
    }

    /// Makes `path` (a file or directory) visible at the same path, writable as its
    /// permissions allow.
    pub fn writable(&mut self, path: &Path) -> io::Result<()> {
        let dir = std::fs::metadata(path)?.is_dir();
        self.add(path, false, false, dir)
    }

    /// The jail-side path of host path `p`.
    fn inside(&self, p: &Path) -> io::Result<CString> {
        let rel = p.strip_prefix("/").unwrap_or(p);
        cstr(&Path::new(JAIL_DIR).join(rel))
    }

    fn add(&mut self, path: &Path, readonly: bool, dev: bool, is_dir: bool) -> io::Result<()> {
        let path = lexical(path)?;
        if !self.planned.insert(path.clone()) {
            return Ok(());
        }
        let parent_dirs: Vec<PathBuf> = path.ancestors().skip(1).map(Path::to_owned).collect();
        for a in parent_dirs.into_iter().rev() {
            if a != Path::new("/") && self.dir_set.insert(a.clone()) {
                self.dirs.push(self.inside(&a)?);
            }
        }
        let dst = self.inside(&path)?;
        if is_dir {
            if self.dir_set.insert(path.clone()) {
                self.dirs.push(dst.clone());
            }
        } else {
            self.files.push(dst.clone());
        }
        self.binds.push(Bind {
            src: cstr(&path)?,
            dst,
            readonly,
            dev,
        });
        // Parents are bound before what lies inside them (a file bound inside a bound
        // directory then resolves to the host file, at the same path, inside that bind).
        self.binds
            .sort_by_key(|b| b.src.as_bytes().iter().filter(|c| **c == b'/').count());
        Ok(())
    }

    /// Enters a new mount namespace whose root holds only what the plan lists. Only syscalls
    /// on memory prepared before the fork: callable between fork and exec, as root.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: every pointer passed below is a NUL-terminated string owned by `self`, or a
        // static literal, alive for the whole call; the syscalls share no other memory.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=1m,nr_inodes=4096,mode=0755".as_ptr().cast(),
            ))?;
            for d in &self.dirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST
                {
                    return Err(io::Error::last_os_error());
                }
            }
            for f in &self.files {
                let fd = libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                check(fd)?;
                libc::close(fd);
            }
            for (target, link) in &self.links {
                check(libc::symlink(target.as_ptr(), link.as_ptr()))?;
            }
            for b in &self.binds {
                check(libc::mount(
                    b.src.as_ptr(),
                    b.dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
                if b.readonly {
                    flags |= libc::MS_RDONLY;
                }
                if !b.dev {
                    flags |= libc::MS_NODEV;
                }
                check(libc::mount(
                    std::ptr::null(),
                    b.dst.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ))?;
            }
            check(libc::chdir(self.root.as_ptr()))?;
            // pivot_root(".", "."): the old root is stacked under the new one, then detached.
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
        }
        Ok(())
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parents_once_and_at_host_paths() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("tpl/memory");
        std::fs::create_dir_all(a.parent().unwrap()).unwrap();
        std::fs::write(&a, b"x").unwrap();
        let mut plan = MountPlan::new().unwrap();
        plan.read_only(&a).unwrap();
        plan.read_only(&a).unwrap();
        plan.writable(&d.path().join("tpl")).unwrap();
        let inside = |p: &Path| plan.inside(p).unwrap();
        assert_eq!(
            plan.binds
                .iter()
                .filter(|b| b.src == cstr(&a).unwrap())
                .count(),
            1
        );
        assert!(plan.files.contains(&inside(&a)));
        let tpl = inside(&d.path().join("tpl"));
        assert_eq!(plan.dirs.iter().filter(|x| **x == tpl).count(), 1);
        // Parents come before children.
        let pos = |c: &CString| plan.dirs.iter().position(|x| x == c).unwrap();
        assert!(pos(&inside(d.path())) < pos(&tpl));
        assert!(
            plan.binds
                .iter()
                .any(|b| b.src.as_bytes() == b"/usr" && b.readonly)
        );
        assert!(lexical(Path::new("/a/../etc/shadow")).is_err());
    }
}
