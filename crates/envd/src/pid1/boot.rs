//! What PID 1 sets up before starting envd: the mounts, directories and `/dev` symlinks that
//! the Debian template's bash init (`wrenn-image`'s `init_script`) makes, as a table.
//!
//! The network needs nothing here: the initramfs brought up `lo` and `eth0` in the same
//! network namespace before `switch_root`, and moved its `/dev` into the new root.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::mount::MsFlags;

/// One setup step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Mount unless `target` is already a mount point.
    Mount {
        source: &'static str,
        target: &'static str,
        fstype: &'static str,
        flags: MsFlags,
        data: &'static str,
    },
    /// Create the directory if missing, and give it `mode`.
    Mkdir { path: &'static str, mode: u32 },
    /// Create `link -> target` if nothing is at `link`.
    Symlink {
        target: &'static str,
        link: &'static str,
    },
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

const fn mount(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
) -> Step {
    Step::Mount {
        source,
        target,
        fstype,
        flags,
        data,
    }
}

/// In order: a mount point's directory exists before it is mounted on.
pub(super) const STEPS: &[Step] = &[
    mount("proc", "/proc", "proc", MsFlags::empty(), ""),
    mount("sysfs", "/sys", "sysfs", MsFlags::empty(), ""),
    mount("devtmpfs", "/dev", "devtmpfs", MsFlags::empty(), ""),
    Step::Mkdir {
        path: "/dev/pts",
        mode: 0o755,
    },
    Step::Mkdir {
        path: "/dev/shm",
        mode: 0o755,
    },
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::empty(),
        "gid=5,mode=620,ptmxmode=666",
    ),
    mount("tmpfs", "/dev/shm", "tmpfs", NOSUID_NODEV, "mode=1777"),
    mount("tmpfs", "/tmp", "tmpfs", NOSUID_NODEV, "mode=1777"),
    mount("tmpfs", "/run", "tmpfs", NOSUID_NODEV, "mode=755"),
    Step::Mkdir {
        path: "/run/lock",
        mode: 0o1777,
    },
    // envd puts its processes in cgroups of its own; nsdelegate lets it delegate safely.
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::empty(),
        "nsdelegate",
    ),
    // devtmpfs lacks these; shells' process substitution and many scripts need them.
    Step::Symlink {
        target: "/proc/self/fd",
        link: "/dev/fd",
    },
    Step::Symlink {
        target: "/proc/self/fd/0",
        link: "/dev/stdin",
    },
    Step::Symlink {
        target: "/proc/self/fd/1",
        link: "/dev/stdout",
    },
    Step::Symlink {
        target: "/proc/self/fd/2",
        link: "/dev/stderr",
    },
];

pub(super) const HOSTNAME: &str = "wrenn";

/// What a step did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Done {
    Did,
    /// Already so (mounted, or a path in place).
    Already,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum StepError {
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path}")]
    Path {
        what: &'static str,
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

pub(super) fn run(step: &Step) -> Result<Done, StepError> {
    match *step {
        Step::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => {
            let mount_err = |source: io::Error| StepError::Mount {
                fstype,
                target,
                source,
            };
            if is_mount_point(Path::new(target)).map_err(mount_err)? {
                return Ok(Done::Already);
            }
            let data = (!data.is_empty()).then_some(data);
            nix::mount::mount(Some(source), target, Some(fstype), flags, data)
                .map_err(|e| mount_err(e.into()))?;
            Ok(Done::Did)
        }
        Step::Mkdir { path, mode } => {
            let err = |what| move |source| StepError::Path { what, path, source };
            let done = match fs::create_dir(path) {
                Ok(()) => Done::Did,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Done::Already,
                Err(e) => return Err(err("create directory")(e)),
            };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err("chmod"))?;
            Ok(done)
        }
        Step::Symlink { target, link } => {
            if fs::symlink_metadata(link).is_ok() {
                return Ok(Done::Already);
            }
            std::os::unix::fs::symlink(target, link).map_err(|source| StepError::Path {
                what: "create symlink",
                path: link,
                source,
            })?;
            Ok(Done::Did)
        }
    }
}

/// Whether `path` is a mount point: on another device than its parent, or the root itself
/// (same inode as its parent). Enough here: every mount above is a new filesystem, never a
/// bind mount of the same one.
pub(super) fn is_mount_point(path: &Path) -> io::Result<bool> {
    let here = fs::metadata(path)?;
    let parent = fs::metadata(path.join(".."))?;
    Ok(is_mount_point_by_ids(
        (here.dev(), here.ino()),
        (parent.dev(), parent.ino()),
    ))
}

fn is_mount_point_by_ids(here: (u64, u64), parent: (u64, u64)) -> bool {
    here.0 != parent.0 || here.1 == parent.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(wanted: impl Fn(&Step) -> bool) -> usize {
        STEPS.iter().position(wanted).expect("step in the table")
    }

    fn mount_of(target: &str) -> usize {
        position(|s| matches!(s, Step::Mount { target: t, .. } if *t == target))
    }

    #[test]
    fn the_table_mounts_what_the_bash_init_mounts() {
        let mounts: Vec<(&str, &str, &str)> = STEPS
            .iter()
            .filter_map(|s| match s {
                Step::Mount {
                    target,
                    fstype,
                    data,
                    ..
                } => Some((*target, *fstype, *data)),
                _ => None,
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("/proc", "proc", ""),
                ("/sys", "sysfs", ""),
                ("/dev", "devtmpfs", ""),
                ("/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
                ("/dev/shm", "tmpfs", "mode=1777"),
                ("/tmp", "tmpfs", "mode=1777"),
                ("/run", "tmpfs", "mode=755"),
                ("/sys/fs/cgroup", "cgroup2", "nsdelegate"),
            ]
        );
        for target in ["/dev/shm", "/tmp", "/run"] {
            let Step::Mount { flags, .. } = STEPS[mount_of(target)] else {
                unreachable!()
            };
            assert_eq!(flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "{target}");
        }
    }

    #[test]
    fn each_path_comes_after_what_it_lives_on() {
        let mkdir = |p: &str| position(|s| matches!(s, Step::Mkdir { path, .. } if *path == p));
        let symlink = |p: &str| position(|s| matches!(s, Step::Symlink { link, .. } if *link == p));
        assert!(mount_of("/dev") < mkdir("/dev/pts") && mkdir("/dev/pts") < mount_of("/dev/pts"));
        assert!(mount_of("/dev") < mkdir("/dev/shm") && mkdir("/dev/shm") < mount_of("/dev/shm"));
        assert!(mount_of("/run") < mkdir("/run/lock"));
        assert!(mount_of("/sys") < mount_of("/sys/fs/cgroup"));
        for link in ["/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr"] {
            assert!(mount_of("/dev") < symlink(link), "{link}");
        }
        assert!(matches!(
            STEPS[mkdir("/run/lock")],
            Step::Mkdir { mode: 0o1777, .. }
        ));
    }

    #[test]
    fn mount_points() {
        assert!(is_mount_point_by_ids((1, 2), (3, 2)));
        assert!(is_mount_point_by_ids((1, 2), (1, 2)));
        assert!(!is_mount_point_by_ids((1, 5), (1, 2)));
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        assert!(!is_mount_point(&tmp.path().join("d")).unwrap());
    }

    #[test]
    fn mkdir_and_symlink_steps_are_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: &'static str = tmp.path().join("lock").to_str().unwrap().to_owned().leak();
        let link: &'static str = tmp.path().join("fd").to_str().unwrap().to_owned().leak();
        let mkdir = Step::Mkdir {
            path: dir,
            mode: 0o1777,
        };
        assert_eq!(run(&mkdir).unwrap(), Done::Did);
        assert_eq!(run(&mkdir).unwrap(), Done::Already);
        assert_eq!(fs::metadata(dir).unwrap().mode() & 0o7777, 0o1777);
        let symlink = Step::Symlink {
            target: "/proc/self/fd",
            link,
        };
        assert_eq!(run(&symlink).unwrap(), Done::Did);
        assert_eq!(run(&symlink).unwrap(), Done::Already);
        assert_eq!(fs::read_link(link).unwrap(), Path::new("/proc/self/fd"));
    }
}
