//! The initramfs: busybox, the virtio modules, and an init that configures the guest network,
//! mounts the root filesystem from `/dev/vda` and `switch_root`s to its `/sbin/init` (or, on a
//! root made from a container image, to envd's `/.wrenn/init`).

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheKey, cached, sha256_file, write_manifest};
use crate::cpio::Cpio;
use crate::kernel::VIRTIO_MODULES;
use crate::{ImageError, Kernel, deb_version};

/// The guest's address inside every slot, and its gateway (the slot's tap). They must match
/// the host side of a slot (`wrenn-hostnet`): a snapshot restores into any slot because every
/// slot looks like this from inside.
const GUEST_CIDR: &str = "169.254.0.21/30";
const GUEST_GATEWAY: &str = "169.254.0.22";

/// The init script. Runs as PID 1 from the initramfs; any failure powers the VM off (QEMU runs
/// with `-no-reboot`), so the host sees the VM exit instead of waiting on a hung guest.
fn init_script() -> String {
    let modules = VIRTIO_MODULES.join(" ");
    format!(
        r#"#!/bin/busybox sh
# Wrenn initramfs init.
export PATH=/bin
fail() {{ echo "wrenn-init: $*"; busybox reboot -f; }}
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev
# Dependency order: a module loaded before its dependencies fails with "unknown symbol".
for m in {modules}; do
    busybox insmod /lib/modules/$m.ko || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 1000 ] && fail "no /dev/vda"
    busybox usleep 5000
done
busybox ip link set lo up
busybox ip link set eth0 up || fail "no eth0"
busybox ip addr add {GUEST_CIDR} dev eth0 || fail "eth0 address"
busybox ip route add default via {GUEST_GATEWAY} || fail "default route"
busybox mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "mount /dev/vda"
busybox mount --move /dev /newroot/dev || fail "move /dev"
busybox umount /sys /proc
# A root made from a container image has envd's own init at /.wrenn/init (such images carry
# no init of ours, and often no shell one could run in).
init=/sbin/init
[ -e /newroot/.wrenn/init ] && init=/.wrenn/init
exec busybox switch_root /newroot $init
"#
    )
}

/// A built initramfs.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The gzip'd newc archive.
    pub path: PathBuf,
    /// What it was built from.
    pub manifest: InitramfsManifest,
}

/// What an initramfs was built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitramfsManifest {
    /// The content key (also in the directory name).
    pub key: String,
    /// The kernel whose modules it carries.
    pub kernel: Kernel,
    /// Debian `busybox-static` version.
    pub busybox_version: String,
    /// Sha256 of the busybox binary.
    pub busybox_sha256: String,
    /// The modules, in load order.
    pub modules: Vec<String>,
    /// Sha256 of the archive.
    pub sha256: String,
}

/// Builds (or finds in `cache`) the initramfs for `kernel` with `busybox` (a static binary).
pub fn build_initramfs(
    cache: &Path,
    kernel: &Kernel,
    busybox: &Path,
) -> Result<Initramfs, ImageError> {
    let script = init_script();
    let modules = VIRTIO_MODULES
        .iter()
        .map(|m| kernel.module(m).map(|p| (*m, p)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut key = CacheKey::default();
    key.text("format", "initramfs-v1")
        .text("init", &script)
        .file("busybox", busybox)?;
    for (name, path) in &modules {
        key.file(name, path)?;
    }
    let key = key.finish();
    let dir = cached(cache, "initramfs", &key, |tmp| {
        let mut cpio = Cpio::default();
        for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
            cpio.dir(d);
        }
        let read = |p: &Path| std::fs::read(p).map_err(ImageError::io("read", p));
        cpio.file("bin/busybox", 0o755, &read(busybox)?);
        cpio.symlink("bin/sh", "busybox");
        cpio.file("init", 0o755, script.as_bytes());
        for (name, path) in &modules {
            cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &read(path)?);
        }
        let out = tmp.join("initramfs.img");
        let file = std::fs::File::create(&out).map_err(ImageError::io("create", &out))?;
        // Level 1: decompression cost under TCG matters more than a few hundred KB.
        let mut gz = GzEncoder::new(file, Compression::fast());
        gz.write_all(&cpio.finish())
            .and_then(|()| gz.finish().map(drop))
            .map_err(ImageError::io("write", &out))?;
        let manifest = InitramfsManifest {
            key: key.clone(),
            kernel: kernel.clone(),
            busybox_version: deb_version("busybox-static"),
            busybox_sha256: sha256_file(busybox)?,
            modules: VIRTIO_MODULES.iter().map(|m| m.to_string()).collect(),
            sha256: sha256_file(&out)?,
        };
        write_manifest(tmp, &manifest)
    })?;
    let manifest_path = dir.join("manifest.json");
    let text =
        std::fs::read_to_string(&manifest_path).map_err(ImageError::io("read", &manifest_path))?;
    Ok(Initramfs {
        path: dir.join("initramfs.img"),
        manifest: serde_json::from_str(&text)?,
    })
}
