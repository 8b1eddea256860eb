//! Debian's cloud kernel, as the install script extracts it (not installs it): the bzImage and
//! its modules, of which the initramfs carries the virtio ones.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ImageError;

/// Where the install script extracts Debian's cloud kernel (`WRENN_KERNEL_CACHE` overrides).
pub(crate) const DEFAULT_KERNEL_DIR: &str = "/var/cache/wrenn/kernel";
/// The virtio modules the initramfs loads, in dependency order ("unknown symbol" otherwise).
pub(crate) const VIRTIO_MODULES: [&str; 7] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

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
    /// Finds the kernel in `dir` (`WRENN_KERNEL_CACHE`, else `/var/cache/wrenn/kernel`, when
    /// `None`).
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
