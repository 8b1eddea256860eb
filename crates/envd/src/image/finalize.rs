//! `envd image finalize`: makes an unpacked image bootable as a Wrenn guest. The initramfs
//! `switch_root`s to `/.wrenn/init` when it exists, which is this envd in PID-1 mode
//! ([`crate::pid1`]), so the image needs no init, shell or envd of its own.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::accounts::{self, USER_HOME, USER_ID};
use super::{FinalizeArgs, ImageError, enter_root};

/// Why a finalize step failed: what it did, and on which path.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct FinalizeError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl FinalizeError {
    pub(super) fn io(what: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        FinalizeError {
            what,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// Where the guest's envd and init go: a directory of Wrenn's own, so no image file is
/// overwritten, and one the initramfs can test for.
const WRENN_DIR: &str = "/.wrenn";
const ENVD_PATH: &str = "/.wrenn/envd";
const INIT_PATH: &str = "/.wrenn/init";

const HOSTNAME: &str = "wrenn\n";
const HOSTS: &str =
    "127.0.0.1\tlocalhost\n127.0.1.1\twrenn\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// The guest's resolver is its gateway, where the host runs one resolver per slot.
const RESOLV_CONF: &str = "# Wrenn: the host's resolver for this sandbox, at its gateway.\nnameserver 169.254.0.22\noptions timeout:2 attempts:2\n";

/// Directories the guest's init mounts on or writes to, and their modes when created.
const BASE_DIRS: &[(&str, u32)] = &[
    ("/proc", 0o755),
    ("/sys", 0o755),
    ("/dev", 0o755),
    ("/tmp", 0o1777),
    ("/run", 0o755),
    ("/home", 0o755),
    ("/root", 0o700),
    ("/etc", 0o755),
];

pub(super) fn run(args: &FinalizeArgs) -> Result<String, ImageError> {
    // Before the chroot: after it there is no /proc, and the binary may not be in the image.
    let exe = File::open("/proc/self/exe").map_err(ImageError::OpenSelf)?;
    enter_root(&args.root)?;
    Ok(finalize(exe)?)
}

fn finalize(exe: File) -> Result<String, FinalizeError> {
    for &(dir, mode) in BASE_DIRS {
        ensure_dir(dir, mode)?;
    }
    // Sticky and world-writable whatever the image had: every user's programs need /tmp.
    set_mode("/tmp", 0o1777)?;
    let added = ensure_accounts()?;
    ensure_dir(USER_HOME, 0o755)?;
    std::os::unix::fs::chown(USER_HOME, Some(USER_ID), Some(USER_ID))
        .map_err(|e| FinalizeError::io("chown", USER_HOME, e))?;
    set_mode(USER_HOME, 0o755)?;
    replace_file("/etc/hostname", HOSTNAME)?;
    replace_file("/etc/hosts", HOSTS)?;
    replace_file("/etc/resolv.conf", RESOLV_CONF)?;
    let size = install_envd(exe)?;
    // The build VM may power off right after; what was written must be on the disk.
    nix::unistd::sync();
    let accounts = if added.is_empty() {
        "accounts already present".to_string()
    } else {
        format!("added {}", added.join(", "))
    };
    Ok(format!(
        "{accounts}; installed {ENVD_PATH} ({size} bytes) and {INIT_PATH} -> envd"
    ))
}

/// Appends root and user where missing; returns what was added, e.g. `/etc/passwd: user`.
fn ensure_accounts() -> Result<Vec<String>, FinalizeError> {
    let files = [
        (
            "/etc/passwd",
            accounts::passwd_lines(accounts::login_shell()),
            Some(0o644),
        ),
        ("/etc/group", accounts::group_lines(), Some(0o644)),
        ("/etc/shadow", accounts::shadow_lines(), None),
        ("/etc/gshadow", accounts::gshadow_lines(), None),
    ];
    let mut added = Vec::new();
    for (path, lines, create_mode) in files {
        let names = accounts::ensure_lines(path, &lines, create_mode)?;
        if !names.is_empty() {
            added.push(format!("{path}: {}", names.join(" ")));
        }
    }
    Ok(added)
}

/// Makes `path` a directory: kept if it is one (or a symlink to one), else whatever is there
/// is replaced by a new one with `mode`.
fn ensure_dir(path: &str, mode: u32) -> Result<(), FinalizeError> {
    if Path::new(path).is_dir() {
        return Ok(());
    }
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path).map_err(|e| FinalizeError::io("remove", path, e))?;
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| FinalizeError::io("create directory", path, e))?;
    set_mode(path, mode)
}

fn set_mode(path: &str, mode: u32) -> Result<(), FinalizeError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| FinalizeError::io("chmod", path, e))
}

/// Writes `path` as a plain 0644 file holding `content`. Renamed into place, so a symlink
/// there (many images have `/etc/resolv.conf -> ../run/...`) is replaced, never followed.
fn replace_file(path: &str, content: &str) -> Result<(), FinalizeError> {
    let tmp = format!("{path}.wrenn-new");
    let err = |what| move |e| FinalizeError::io(what, path, e);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(FinalizeError::io("remove", &tmp, e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| FinalizeError::io("create", &tmp, e))?;
    file.write_all(content.as_bytes()).map_err(err("write"))?;
    fs::rename(&tmp, path).map_err(err("replace"))
}

/// Replaces `/.wrenn` with a fresh one holding a copy of this envd and `init -> envd`.
/// Returns the binary's size.
fn install_envd(mut exe: File) -> Result<u64, FinalizeError> {
    match fs::symlink_metadata(WRENN_DIR) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(WRENN_DIR),
        Ok(_) => fs::remove_file(WRENN_DIR),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(|e| FinalizeError::io("remove", WRENN_DIR, e))?;
    fs::DirBuilder::new()
        .mode(0o755)
        .create(WRENN_DIR)
        .map_err(|e| FinalizeError::io("create directory", WRENN_DIR, e))?;
    std::os::unix::fs::lchown(WRENN_DIR, Some(0), Some(0))
        .map_err(|e| FinalizeError::io("chown", WRENN_DIR, e))?;
    let err = |what| move |e| FinalizeError::io(what, ENVD_PATH, e);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(ENVD_PATH)
        .map_err(err("create"))?;
    let size = io::copy(&mut exe, &mut out).map_err(err("copy envd to"))?;
    out.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(err("chmod"))?;
    // Relative: it names the envd beside it, wherever the disk is mounted.
    std::os::unix::fs::symlink("envd", INIT_PATH)
        .map_err(|e| FinalizeError::io("create symlink", INIT_PATH, e))?;
    Ok(size)
}
