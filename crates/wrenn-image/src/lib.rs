//! Guest images: the kernel, our initramfs, and ext4 root filesystems with envd.
//!
//! Every artifact is cached by the hash of its inputs under `<cache>/<kind>-<hash>/` and
//! carries a `manifest.json` recording the versions it was built from. A build writes into a
//! temporary directory and renames it into place, so a crashed build leaves no half artifact.
//!
//! Builds are blocking (they run `mkfs.ext4`, `debootstrap` and friends): call them from a
//! blocking thread. The long one, the Debian template, reports what it is doing as
//! [`Progress`] events to a callback; showing them (a spinner, log lines, nothing) is the
//! caller's business, so this crate never writes to the terminal.

mod cache;
mod cpio;
mod debian;
mod initramfs;
mod kernel;
mod progress;
mod rootfs;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use cache::default_cache_dir;
pub use debian::{
    CODE_INTERPRETER_PACKAGES, DebianExtras, DebianImageInputs, DebianManifest, DebianRootfs,
    ExtraFile, INTERPRETER_PATH, Package, TOOLS, build_debian_rootfs,
};
pub use initramfs::{Initramfs, InitramfsManifest, build_initramfs};
pub use kernel::Kernel;
pub use progress::Progress;
pub use rootfs::{Component, Rootfs, RootfsManifest, SmallImageInputs, build_small_rootfs};

/// The port envd listens on in every guest these images boot: their init starts envd with
/// `--listen 0.0.0.0:<ENVD_PORT>`, so whoever talks to a guest's envd takes the port from here.
/// It is also the port the E2B SDKs assume.
pub const ENVD_PORT: u16 = 49983;

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
