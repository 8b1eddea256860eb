//! Root filesystems: ext4 images made with `mkfs.ext4 -d` (no mount, no loop device).
//!
//! The small test image holds busybox, bash (the SDKs run `/bin/bash -l -c`), envd, and a
//! busybox `init` that mounts the API filesystems and keeps envd running as the main service
//! (busybox init also reaps orphans, which PID 1 must do).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::cache::{CacheKey, cached, sha256_file, write_manifest};
use crate::{ENVD_PORT, ImageError, deb_version, run};

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000:user:/home/user:/bin/bash\n";
const GROUP: &str = "root:x:0:\nuser:x:1000:\n";
const SHADOW: &str = "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n";
const PROFILE: &str = "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n";
fn inittab() -> String {
    format!(
        "::sysinit:/etc/wrenn/rc\n\
         ::respawn:/usr/bin/envd --in-sandbox --listen 0.0.0.0:{ENVD_PORT} --metadata-url http://169.254.169.254/\n\
         ::ctrlaltdel:/bin/busybox reboot -f\n"
    )
}
/// Mounts what envd needs before it starts (it creates cgroups and PTYs, and serves /tmp).
const RC: &str = r#"#!/bin/sh
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
hostname wrenn
"#;

/// Inputs of the small test image.
#[derive(Debug, Clone)]
pub struct SmallImageInputs {
    /// A static busybox (Debian `busybox-static`: `/bin/busybox`).
    pub busybox: PathBuf,
    /// A static bash (Debian `bash-static`: `/bin/bash-static`).
    pub bash: PathBuf,
    /// The static envd binary.
    pub envd: PathBuf,
}

impl SmallImageInputs {
    /// The Debian paths for busybox and bash, with the given envd.
    pub fn debian(envd: PathBuf) -> Self {
        Self {
            busybox: "/bin/busybox".into(),
            bash: "/bin/bash-static".into(),
            envd,
        }
    }
}

/// A built root filesystem image.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// The raw ext4 image; read-only once built (sandboxes write to qcow2 overlays).
    pub path: PathBuf,
    /// What it was built from.
    pub manifest: RootfsManifest,
}

/// What a root filesystem was built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsManifest {
    /// The content key (also in the directory name).
    pub key: String,
    /// Which image this is (`small`).
    pub kind: String,
    /// Versions of the packages and binaries that went in.
    pub components: Vec<Component>,
    /// Image size in bytes.
    pub size: u64,
    /// `mkfs.ext4` (e2fsprogs) version.
    pub e2fsprogs_version: String,
}

/// One input of an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Component {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Sha256 of the binary, when it is one file.
    pub sha256: Option<String>,
}

/// Builds (or finds in `cache`) the small test image.
pub fn build_small_rootfs(cache: &Path, inputs: &SmallImageInputs) -> Result<Rootfs, ImageError> {
    let mut key = CacheKey::default();
    key.text("format", "small-rootfs-v1")
        .text("passwd", PASSWD)
        .text("group", GROUP)
        .text("inittab", &inittab())
        .text("rc", RC)
        .text("profile", PROFILE)
        .file("busybox", &inputs.busybox)?
        .file("bash", &inputs.bash)?
        .file("envd", &inputs.envd)?;
    let key = key.finish();
    let dir = cached(cache, "rootfs-small", &key, |tmp| {
        let staging = tmp.join("root");
        stage_small(&staging, inputs)?;
        let image = tmp.join("rootfs.ext4");
        let size = make_ext4(&staging, &image, 64 << 20)?;
        std::fs::remove_dir_all(&staging).map_err(ImageError::io("remove", &staging))?;
        let envd_version = run(Command::new(&inputs.envd).arg("--version"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let manifest = RootfsManifest {
            key: key.clone(),
            kind: "small".into(),
            components: vec![
                Component {
                    name: "busybox-static".into(),
                    version: deb_version("busybox-static"),
                    sha256: Some(sha256_file(&inputs.busybox)?),
                },
                Component {
                    name: "bash-static".into(),
                    version: deb_version("bash-static"),
                    sha256: Some(sha256_file(&inputs.bash)?),
                },
                Component {
                    name: "envd".into(),
                    version: envd_version,
                    sha256: Some(sha256_file(&inputs.envd)?),
                },
            ],
            size,
            e2fsprogs_version: deb_version("e2fsprogs"),
        };
        write_manifest(tmp, &manifest)
    })?;
    let manifest_path = dir.join("manifest.json");
    let text =
        std::fs::read_to_string(&manifest_path).map_err(ImageError::io("read", &manifest_path))?;
    Ok(Rootfs {
        path: dir.join("rootfs.ext4"),
        manifest: serde_json::from_str(&text)?,
    })
}

fn stage_small(root: &Path, inputs: &SmallImageInputs) -> Result<(), ImageError> {
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "etc/wrenn",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "home/user",
        "var/tmp",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(ImageError::io("create", &p))?;
    }
    set_mode(&root.join("tmp"), 0o1777)?;
    set_mode(&root.join("var/tmp"), 0o1777)?;
    set_mode(&root.join("root"), 0o700)?;
    let home = root.join("home/user");
    std::os::unix::fs::chown(&home, Some(1000), Some(1000))
        .map_err(ImageError::io("chown", &home))?;

    copy_exec(&inputs.busybox, &root.join("bin/busybox"))?;
    copy_exec(&inputs.bash, &root.join("bin/bash"))?;
    copy_exec(&inputs.envd, &root.join("usr/bin/envd"))?;
    // Every busybox applet, except where a real binary (bash) is already installed.
    let applets = run(Command::new(&inputs.busybox).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        symlink("/bin/busybox", &link).map_err(ImageError::io("symlink", &link))?;
    }
    let inittab = inittab();
    for (path, text, mode) in [
        ("etc/passwd", PASSWD, 0o644),
        ("etc/group", GROUP, 0o644),
        ("etc/shadow", SHADOW, 0o640),
        ("etc/profile", PROFILE, 0o644),
        ("etc/inittab", inittab.as_str(), 0o644),
        ("etc/hostname", "wrenn\n", 0o644),
        ("etc/wrenn/rc", RC, 0o755),
    ] {
        let p = root.join(path);
        std::fs::write(&p, text).map_err(ImageError::io("write", &p))?;
        set_mode(&p, mode)?;
    }
    Ok(())
}

fn copy_exec(from: &Path, to: &Path) -> Result<(), ImageError> {
    std::fs::copy(from, to).map_err(ImageError::io("copy", from))?;
    set_mode(to, 0o755)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(ImageError::io("chmod", path))
}

pub(crate) fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = path.symlink_metadata() else {
        return 0;
    };
    if meta.is_dir() {
        let children = std::fs::read_dir(path).into_iter().flatten().flatten();
        4096 + children.map(|e| tree_size(&e.path())).sum::<u64>()
    } else {
        meta.len().div_ceil(4096) * 4096
    }
}

/// Makes an ext4 image of `dir` with `free` bytes to spare; returns the image size.
pub(crate) fn make_ext4(dir: &Path, image: &Path, free: u64) -> Result<u64, ImageError> {
    // Metadata (inode tables, journal) needs room beyond the data: a quarter plus a fixed part.
    let size = (tree_size(dir) * 5 / 4 + free + (32 << 20)).div_ceil(1 << 20) << 20;
    let file = std::fs::File::create(image).map_err(ImageError::io("create", image))?;
    file.set_len(size).map_err(ImageError::io("size", image))?;
    drop(file);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "wrenn-root", "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(image))?;
    Ok(size)
}
