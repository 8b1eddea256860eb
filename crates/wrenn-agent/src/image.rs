//! Guest images: the kernel, our initramfs, and ext4 root filesystems with envd.
//!
//! Every artifact is cached by the hash of its inputs under `<cache>/<kind>-<hash>/` and
//! carries a `manifest.json` recording the versions it was built from. A build writes into a
//! temporary directory and renames it into place, so a crashed build leaves no half artifact.

mod cpio;
pub mod debian;
mod initramfs;
mod rootfs;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use initramfs::{Initramfs, build_initramfs};
pub use rootfs::{ENVD_PORT, Rootfs, SmallImageInputs, build_small_rootfs};

/// Where the install script extracts Debian's cloud kernel (`WRENN_KERNEL_CACHE` overrides).
pub const DEFAULT_KERNEL_DIR: &str = "/var/cache/wrenn/kernel";
/// The virtio modules the initramfs loads, in dependency order ("unknown symbol" otherwise).
pub const VIRTIO_MODULES: [&str; 7] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

/// Why building or finding an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading or writing a file failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The extracted kernel is missing or incomplete.
    #[error("no usable guest kernel in {0} (run .ci/install-runtime-deps.sh)")]
    NoKernel(PathBuf),
    /// A kernel module the initramfs needs is missing.
    #[error("kernel module {0} not found")]
    MissingModule(String),
    /// An external tool failed.
    #[error("{tool} failed: {stderr}")]
    Tool {
        /// The command.
        tool: String,
        /// Its error output.
        stderr: String,
    },
    /// A manifest could not be written.
    #[error("manifest")]
    Manifest(#[from] serde_json::Error),
}

impl ImageError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }
}

/// Debian's cloud kernel, extracted (not installed) by the install script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The Debian package version, e.g. `6.1.192-2`.
    pub package_version: String,
}

impl Kernel {
    /// Finds the kernel in `dir` (`WRENN_KERNEL_CACHE` or [`DEFAULT_KERNEL_DIR`] when `None`).
    /// With several releases, the highest sorts last and wins.
    pub fn find(dir: Option<&Path>) -> Result<Self, ImageError> {
        let dir = match dir {
            Some(d) => d.to_owned(),
            None => std::env::var_os("WRENN_KERNEL_CACHE")
                .map_or_else(|| PathBuf::from(DEFAULT_KERNEL_DIR), PathBuf::from),
        };
        let no_kernel = || ImageError::NoKernel(dir.clone());
        let mut releases: Vec<String> = std::fs::read_dir(dir.join("lib/modules"))
            .map_err(|_| no_kernel())?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        releases.sort();
        let release = releases.pop().ok_or_else(no_kernel)?;
        let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
        if !vmlinuz.is_file() {
            return Err(no_kernel());
        }
        let package_version = std::fs::read_to_string(dir.join(".version"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Self {
            modules: dir.join("lib/modules").join(&release),
            vmlinuz,
            release,
            package_version,
        })
    }

    /// The path of module `name` (`.ko`, uncompressed as Debian ships them).
    pub fn module(&self, name: &str) -> Result<PathBuf, ImageError> {
        let file = format!("{name}.ko");
        find_file(&self.modules.join("kernel"), &file)
            .ok_or_else(|| ImageError::MissingModule(name.into()))
    }
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let ty = entry.file_type().ok()?;
        if ty.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

/// The default image cache (`WRENN_IMAGE_CACHE` overrides).
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("WRENN_IMAGE_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/wrenn/images"), PathBuf::from)
}

/// Accumulates the inputs of an artifact into its cache key.
#[derive(Default)]
pub(crate) struct CacheKey(Sha256);

impl CacheKey {
    pub(crate) fn text(&mut self, label: &str, value: &str) -> &mut Self {
        self.bytes(label, value.as_bytes())
    }

    pub(crate) fn bytes(&mut self, label: &str, value: &[u8]) -> &mut Self {
        // Length-prefixed so that concatenations cannot collide.
        for part in [label.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    pub(crate) fn file(&mut self, label: &str, path: &Path) -> Result<&mut Self, ImageError> {
        let data = std::fs::read(path).map_err(ImageError::io("read", path))?;
        Ok(self.bytes(label, &data))
    }

    pub(crate) fn finish(&self) -> String {
        hex::encode(&self.0.clone().finalize()[..12])
    }
}

/// Sha256 of a file, hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let data = std::fs::read(path).map_err(ImageError::io("read", path))?;
    Ok(hex::encode(Sha256::digest(&data)))
}

/// Returns `<cache>/<kind>-<key>` if it is complete; otherwise runs `build` in a fresh
/// temporary directory beside it and renames that into place.
pub(crate) fn cached(
    cache: &Path,
    kind: &str,
    key: &str,
    build: impl FnOnce(&Path) -> Result<(), ImageError>,
) -> Result<PathBuf, ImageError> {
    let dir = cache.join(format!("{kind}-{key}"));
    if dir.join("manifest.json").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).map_err(ImageError::io("create", cache))?;
    let tmp = cache.join(format!(".{kind}-{key}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(ImageError::io("create", &tmp))?;
    let result = build(&tmp).and_then(|()| match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(()),
        // Another builder won the race with identical content.
        Err(_) if dir.join("manifest.json").is_file() => Ok(()),
        Err(e) => Err(ImageError::io("rename", &dir)(e)),
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| dir)
}

pub(crate) fn write_manifest(dir: &Path, manifest: &impl Serialize) -> Result<(), ImageError> {
    let path = dir.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest)?;
    std::fs::write(&path, text).map_err(ImageError::io("write", &path))
}

/// Runs a tool, turning a failure into [`ImageError::Tool`].
pub(crate) fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let tool = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ImageError::Tool {
        tool: tool.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(ImageError::Tool { tool, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The installed version of a Debian package, or `unknown`.
pub(crate) fn deb_version(package: &str) -> String {
    run(Command::new("dpkg-query").args(["-W", "-f", "${Version}", package]))
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
