//! A VM's disk chain, read from the qcow2 headers: the overlay QEMU writes, then each backing
//! file down to the base image. The agent opens every layer itself (the top read-write, the
//! rest read-only) and hands QEMU the descriptors, so QEMU, jailed, never opens a disk by path
//! and no layer needs to be readable by its uid.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// Chains are short (run overlay, paused disk, template disk, base image); a longer one is a
/// loop or a hostile header.
const MAX_DEPTH: usize = 8;
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// The header extension naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// One layer of a disk chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The file.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// Why a disk chain could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A layer could not be read.
    #[error("read {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// A header is not what a qcow2 layer of ours looks like.
    #[error("disk layer {path}: {reason}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The virtual size of qcow2 image `path` (what the guest sees), bytes.
pub fn virtual_size(path: &Path) -> Result<u64, DiskError> {
    let ioe = |e| DiskError::Io(path.to_owned(), e);
    let f = File::open(path).map_err(ioe)?;
    let mut h = [0u8; 32];
    f.read_exact_at(&mut h, 0).map_err(ioe)?;
    if h[..4] != QCOW2_MAGIC {
        return Err(DiskError::Bad {
            path: path.to_owned(),
            reason: "not qcow2".into(),
        });
    }
    Ok(u64::from_be_bytes([
        h[24], h[25], h[26], h[27], h[28], h[29], h[30], h[31],
    ]))
}

/// The chain from `top` (a qcow2 overlay) down to its base, top first.
pub fn chain(top: &Path) -> Result<Vec<Layer>, DiskError> {
    let mut layers = vec![Layer {
        path: top.to_owned(),
        format: "qcow2".into(),
    }];
    while let Some(next) = backing(layers.last().map(|l| l.path.as_path()).unwrap_or(top))? {
        if layers.iter().any(|l| l.path == next.path) || layers.len() >= MAX_DEPTH {
            return Err(DiskError::Bad {
                path: next.path,
                reason: format!("backing chain loops or is deeper than {MAX_DEPTH}"),
            });
        }
        let raw = next.format == "raw";
        layers.push(next);
        if raw {
            break;
        }
    }
    Ok(layers)
}

/// The backing layer of the qcow2 file `path`, if it has one.
fn backing(path: &Path) -> Result<Option<Layer>, DiskError> {
    let ioe = |e| DiskError::Io(path.to_owned(), e);
    let bad = |reason: &str| DiskError::Bad {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let f = File::open(path).map_err(ioe)?;
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0).map_err(ioe)?;
    if h[..4] != QCOW2_MAGIC {
        return Err(bad("not qcow2"));
    }
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let be64 = |o: usize| (u64::from(be32(o)) << 32) | u64::from(be32(o + 4));
    let version = be32(4);
    let (name_off, name_len) = (be64(8), be32(16));
    if name_off == 0 || name_len == 0 {
        return Ok(None);
    }
    if name_len > 1023 {
        return Err(bad("backing file name too long"));
    }
    let mut name = vec![0u8; name_len as usize];
    f.read_exact_at(&mut name, name_off).map_err(ioe)?;
    let name = String::from_utf8(name).map_err(|_| bad("backing file name is not UTF-8"))?;
    let rel = PathBuf::from(&name);
    let backing = if rel.is_absolute() {
        rel
    } else {
        path.parent().unwrap_or(Path::new("/")).join(rel)
    };
    // Extensions follow the header (72 bytes in v2, `header_length` in v3).
    let mut off = if version >= 3 {
        u64::from(be32(100))
    } else {
        72
    };
    let mut format = None;
    for _ in 0..64 {
        let mut ext = [0u8; 8];
        if off >= name_off || f.read_exact_at(&mut ext, off).is_err() {
            break;
        }
        let kind = u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]);
        let len = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
        if kind == 0 {
            break;
        }
        if kind == EXT_BACKING_FORMAT && len < 32 {
            let mut v = vec![0u8; len as usize];
            f.read_exact_at(&mut v, off + 8).map_err(ioe)?;
            format = Some(String::from_utf8_lossy(&v).into_owned());
        }
        off += 8 + u64::from(len).div_ceil(8) * 8;
    }
    let format = match format {
        Some(f) => f,
        // No format recorded: what the file looks like.
        None => {
            let mut magic = [0u8; 4];
            let qcow = File::open(&backing)
                .and_then(|b| b.read_exact_at(&mut magic, 0))
                .is_ok()
                && magic == QCOW2_MAGIC;
            if qcow { "qcow2" } else { "raw" }.to_owned()
        }
    };
    if format != "qcow2" && format != "raw" {
        return Err(bad(&format!("backing format {format} is not qcow2 or raw")));
    }
    Ok(Some(Layer {
        path: backing,
        format,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let ok = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "qemu-img {args:?}");
    }

    #[test]
    fn reads_the_chain_of_overlays() {
        if std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no qemu-img");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n).display().to_string();
        std::fs::write(d.path().join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &p("base.raw"),
            &p("mid.qcow2"),
        ]);
        // Relative backing names resolve against the overlay's directory.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            &p("top.qcow2"),
        ]);
        let c = chain(&d.path().join("top.qcow2")).unwrap();
        let got: Vec<(String, &str)> = c
            .iter()
            .map(|l| {
                (
                    l.path.file_name().unwrap().to_string_lossy().into_owned(),
                    l.format.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("top.qcow2".into(), "qcow2"),
                ("mid.qcow2".into(), "qcow2"),
                ("base.raw".into(), "raw")
            ]
        );
        assert!(
            chain(&d.path().join("base.raw")).is_err(),
            "raw is not an overlay"
        );
        assert_eq!(virtual_size(&d.path().join("top.qcow2")).unwrap(), 1 << 20);
    }
}
