//! Container images as build parents: an image's layers, fetched and verified on the host,
//! unpacked inside a VM into a disk of their own, which then boots as a Wrenn guest.
//!
//! The host never reads a layer as a file tree. It concatenates the layer blobs into a raw
//! disk (each at a 4 KiB boundary), makes an empty ext4 disk, and boots a VM from the base
//! template with both attached (read-only and read-write). In the guest, envd unpacks each
//! layer chrooted into the new file system, applying the image's whiteouts
//! (`envd image unpack`), then makes it bootable (`envd image finalize`: a `user` account,
//! the resolver, envd itself as `/.wrenn/init`, which the initramfs prefers). Symlinks in an
//! image resolve inside it, and nothing of it touches the host's file system.
//!
//! An unpacked image is a directory `rootfs.ext4` (the raw file system), `rootfs.qcow2`
//! (an empty overlay on it, relative, the disk builds layer on) and [`IMAGE_INFO`].

use std::io::{Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wrenn_hostnet::{Slot, TAP_NAME};

use super::{BuildError, Defaults, Parent, Report, boot, log, rand_bytes, root};
use crate::snapshot::{self, Snapshot};
use crate::vm::{ExtraDisk, Launch, Memory, NetAttach, Vm, VmSpec, create_overlay};

/// What an unpacked image's directory says about it.
pub const IMAGE_INFO: &str = "image.json";
/// Its file system, raw.
const RAW_DISK: &str = "rootfs.ext4";
/// The serials the guest finds the two disks by.
const BLOBS_SERIAL: &str = "wrenn-blobs";
const TARGET_SERIAL: &str = "wrenn-image";
/// Where the new file system is mounted in the unpack VM.
const MOUNT: &str = "/mnt/image";
/// The longest one layer may take to unpack.
const LAYER_TIMEOUT: Duration = Duration::from_secs(3600);
/// The file system's room beyond the compressed layers: the layers' content (compressed
/// four times over, generously) plus free space for the template's steps and sandboxes. The
/// file is sparse; unused room costs nothing.
const FREE_SPACE: u64 = 2 << 30;
const EXPANSION: u64 = 4;

/// One layer to unpack, in order.
#[derive(Debug, Clone)]
pub struct ImageLayer {
    /// The verified blob on the host.
    pub path: PathBuf,
    /// `gzip`, `zstd` or `none` (what `envd image unpack --compression` takes).
    pub compression: &'static str,
}

/// What an unpacked image was made from, and what its templates start with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// As the build asked for it (a registry reference, or `archive:<sha256>`).
    pub reference: String,
    /// The manifest's digest.
    pub digest: String,
    /// The image config's user, workdir and env, as template defaults.
    pub defaults: Defaults,
}

/// An unpacked image as a build's parent: its disk, on `base`'s machine.
pub fn parent(dir: &Path, base: &Snapshot, key: &str) -> Parent {
    Parent {
        dir: dir.to_owned(),
        disk: dir.join(snapshot::DISK_FILE),
        spec: base.manifest.spec.clone(),
        key: format!("image:{key}"),
    }
}

/// Reads an unpacked image's [`IMAGE_INFO`]; `None` when `dir` is not a complete one.
pub fn open(dir: &Path) -> Option<ImageInfo> {
    if !dir.join(snapshot::DISK_FILE).is_file() || !dir.join(RAW_DISK).is_file() {
        return None;
    }
    let bytes = std::fs::read(dir.join(IMAGE_INFO)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Unpacks `layers` into a new image directory `out` (made only when complete), in a VM
/// booted from `base` in `slot`; `work` is scratch space (removed by the caller).
pub async fn unpack(
    base: &Snapshot,
    layers: &[ImageLayer],
    info: &ImageInfo,
    work: &Path,
    out: &Path,
    slot: &Slot,
    report: Report<'_>,
) -> Result<(), BuildError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Io { what, path, source }
    };
    let started = Instant::now();
    let staging = out.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
    std::fs::create_dir_all(work).map_err(io("create", work))?;
    let res = async {
        let blobs = work.join("blobs.raw");
        let (offsets, compressed) = {
            let (blobs, layers) = (blobs.clone(), layers.to_vec());
            tokio::task::spawn_blocking(move || concatenate(&layers, &blobs))
                .await
                .map_err(|e| BuildError::Io {
                    what: "concatenate the layers into",
                    path: work.to_owned(),
                    source: std::io::Error::other(e),
                })??
        };
        let target = staging.join(RAW_DISK);
        make_empty_ext4(&target, compressed * EXPANSION + FREE_SPACE).await?;
        run_unpack_vm(
            base,
            layers,
            &offsets,
            (&blobs, &target),
            work,
            slot,
            report,
        )
        .await?;
        finish(&staging, info).await
    }
    .await;
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::rename(&staging, out).map_err(io("rename", &staging))?;
    log(
        report,
        None,
        "info",
        format!(
            "image {} unpacked in {:.1} s",
            info.reference,
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// Writes the layers one after another into `blobs`, each at a 4 KiB boundary (and the file
/// a whole number of them); returns each layer's offset and length, and the total.
fn concatenate(layers: &[ImageLayer], blobs: &Path) -> Result<(Vec<(u64, u64)>, u64), BuildError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Io { what, path, source }
    };
    let mut out = std::fs::File::create(blobs).map_err(io("create", blobs))?;
    let mut offsets = Vec::with_capacity(layers.len());
    let mut at = 0u64;
    for layer in layers {
        let mut f = std::fs::File::open(&layer.path).map_err(io("open", &layer.path))?;
        out.seek(std::io::SeekFrom::Start(at))
            .map_err(io("seek", blobs))?;
        let len = std::io::copy(&mut f, &mut out).map_err(io("copy into", blobs))?;
        offsets.push((at, len));
        at = (at + len).div_ceil(4096) * 4096;
    }
    out.set_len(at.max(4096)).map_err(io("size", blobs))?;
    out.flush().map_err(io("write", blobs))?;
    Ok((offsets, at))
}

/// An empty ext4 file system of `size` bytes (sparse) at `path`. Nothing of the image is in
/// it yet, so making it on the host reads nothing untrusted.
async fn make_empty_ext4(path: &Path, size: u64) -> Result<(), BuildError> {
    let size = size.div_ceil(1 << 20) << 20;
    let file = std::fs::File::create(path).map_err(|source| BuildError::Io {
        what: "create",
        path: path.to_owned(),
        source,
    })?;
    file.set_len(size).map_err(|source| BuildError::Io {
        what: "size",
        path: path.to_owned(),
        source,
    })?;
    drop(file);
    let out = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "wrenn-root", "-E", "root_owner=0:0"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| BuildError::Io {
            what: "run mkfs.ext4 for",
            path: path.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(BuildError::Io {
            what: "mkfs.ext4",
            path: path.to_owned(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        });
    }
    Ok(())
}

/// Boots the unpack VM on `base`'s disk with the blobs and the target attached, unpacks each
/// layer and finalizes the image, then stops the VM.
async fn run_unpack_vm(
    base: &Snapshot,
    layers: &[ImageLayer],
    offsets: &[(u64, u64)],
    (blobs, target): (&Path, &Path),
    work: &Path,
    slot: &Slot,
    report: Report<'_>,
) -> Result<(), BuildError> {
    let disk = work.join("unpack.qcow2");
    create_overlay(&base.disk_path(), "qcow2", &disk).await?;
    let spec = VmSpec {
        // Unpacking streams; the page cache is what memory buys here.
        memory_mib: base.manifest.spec.memory_mib.max(1024),
        ..base.manifest.spec.clone()
    };
    let vm = Vm::launch(Launch {
        spec,
        dir: work.join("vm"),
        disk,
        memory: Memory::Shared(work.join("unpack.mem")),
        net: Some(NetAttach {
            netns: slot.netns_path(),
            tap: TAP_NAME.into(),
            slot: slot.index(),
        }),
        incoming: None,
        extra_disks: vec![
            ExtraDisk {
                path: blobs.to_owned(),
                read_only: true,
                serial: BLOBS_SERIAL.into(),
            },
            ExtraDisk {
                path: target.to_owned(),
                read_only: false,
                serial: TARGET_SERIAL.into(),
            },
        ],
    })
    .await?;
    let token = hex::encode(rand_bytes());
    let res = async {
        let guest = boot(&vm, slot, &token).await?;
        let run = |cmd: String, what: String| {
            let guest = guest.clone();
            async move {
                let mut lines = Vec::new();
                let code = guest
                    .run(&cmd, &root(), LAYER_TIMEOUT, &mut |_, l: &str| {
                        lines.push(l.to_owned())
                    })
                    .await
                    .map_err(|source| BuildError::Guest { index: 0, source })?;
                if code != 0 {
                    return Err(BuildError::Image(format!(
                        "{what} failed (exit code {code}): {}",
                        lines.join("\n")
                    )));
                }
                Ok(lines)
            }
        };
        run(mount_script(), "mounting the image's disk".into()).await?;
        for (i, (layer, (off, len))) in layers.iter().zip(offsets).enumerate() {
            log(
                report,
                None,
                "info",
                format!(
                    "unpacking layer {}/{} ({:.1} MiB, {})",
                    i + 1,
                    layers.len(),
                    *len as f64 / f64::from(1 << 20),
                    layer.compression
                ),
            );
            let lines = run(
                layer_script(*off, *len, layer.compression),
                format!("unpacking layer {}", i + 1),
            )
            .await?;
            for l in lines {
                log(report, None, "info", l);
            }
        }
        run(finalize_script(), "making the image bootable".into()).await?;
        Ok(())
    }
    .await;
    // Unmounted and synced (or failed): nothing in the guest is left to flush.
    let _ = vm.kill().await;
    res
}

/// Finds the two disks by serial and mounts the target.
fn mount_script() -> String {
    format!(
        r#"set -euo pipefail
disk() {{ for b in /sys/block/vd*; do [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && {{ echo "/dev/${{b##*/}}"; return 0; }}; done; echo "no disk with serial $1" >&2; return 1; }}
t=$(disk {TARGET_SERIAL}); b=$(disk {BLOBS_SERIAL})
mkdir -p {MOUNT}
mount -t ext4 -o noatime "$t" {MOUNT}
ln -sf "$b" /run/wrenn-blobs"#
    )
}

/// Streams one layer's bytes from the blobs disk into `envd image unpack`.
fn layer_script(offset: u64, len: u64, compression: &str) -> String {
    format!(
        "set -euo pipefail\n\
         dd if=/run/wrenn-blobs iflag=skip_bytes,count_bytes skip={offset} count={len} bs=1M \
         status=none | /usr/bin/envd image unpack --root {MOUNT} --compression {compression}"
    )
}

fn finalize_script() -> String {
    format!("set -euo pipefail\n/usr/bin/envd image finalize --root {MOUNT}\nsync\numount {MOUNT}")
}

/// The overlay builds layer on (relative, so the directory can move) and the info file; the
/// files root's and read-only to every VM, as a template's.
async fn finish(staging: &Path, info: &ImageInfo) -> Result<(), BuildError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", RAW_DISK])
        .arg(snapshot::DISK_FILE)
        .current_dir(staging)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| crate::vm::VmError::QemuImg(e.to_string()))?;
    if !out.status.success() {
        return Err(crate::vm::VmError::QemuImg(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
        .into());
    }
    let path = staging.join(IMAGE_INFO);
    let text = serde_json::to_vec_pretty(info).unwrap_or_default();
    std::fs::write(&path, text).map_err(|source| BuildError::Io {
        what: "write",
        path: path.clone(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt as _;
    for name in [RAW_DISK, snapshot::DISK_FILE, IMAGE_INFO] {
        let p = staging.join(name);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).map_err(|source| {
            BuildError::Io {
                what: "chmod",
                path: p.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_concatenated_at_4k_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, vec![1u8; 5000]).unwrap();
        std::fs::write(&b, vec![2u8; 10]).unwrap();
        let layers = [
            ImageLayer {
                path: a,
                compression: "gzip",
            },
            ImageLayer {
                path: b,
                compression: "none",
            },
        ];
        let out = d.path().join("blobs.raw");
        let (offsets, total) = concatenate(&layers, &out).unwrap();
        assert_eq!(offsets, vec![(0, 5000), (8192, 10)]);
        assert_eq!(total, 12288);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len(), 12288);
        assert!(bytes[..5000].iter().all(|&x| x == 1));
        assert!(bytes[5000..8192].iter().all(|&x| x == 0));
        assert!(bytes[8192..8202].iter().all(|&x| x == 2));
    }

    #[test]
    fn the_layer_script_reads_exactly_its_bytes() {
        let s = layer_script(8192, 10, "gzip");
        assert!(s.contains("skip=8192 count=10"));
        assert!(s.contains("--compression gzip"));
        assert!(s.contains("pipefail"));
    }
}
