//! `envd image`: turns a container image's layers into a bootable Wrenn root, inside a build VM.
//!
//! The host never extracts untrusted layers itself. A build VM gets the layer blobs and an
//! empty disk mounted at some directory, runs `envd image unpack --root DIR` once per layer
//! (in order, the layer tar on stdin), then `envd image finalize --root DIR`. Both `chroot`
//! into DIR first, so every path and every symlink in the image (absolute ones included)
//! resolves inside the image and never in the build VM's own root.
//!
//! Errors are one line on stderr, `envd image <command>: <what>: <cause>`, and exit status 1.

mod accounts;
mod decompress;
mod entry;
mod finalize;
mod unpack;
mod whiteout;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use decompress::{Compression, DecompressError};
pub use entry::EntryError;
pub use finalize::FinalizeError;

/// `envd image …`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "envd image",
    bin_name = "envd image",
    version = crate::ENVD_VERSION,
    about = "Build a Wrenn root from container image layers (run as root, in a build VM)"
)]
pub struct ImageCli {
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// The image subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Apply one OCI layer (a tar on stdin) onto the root, whiteouts included.
    Unpack(UnpackArgs),
    /// Make an unpacked root bootable: accounts, network files, `/.wrenn/init`.
    Finalize(FinalizeArgs),
}

/// `envd image unpack`.
#[derive(Debug, clap::Args)]
pub struct UnpackArgs {
    /// The image's root directory (the mounted disk).
    #[arg(long)]
    pub root: PathBuf,
    /// How the layer on stdin is compressed; `auto` looks at its first bytes.
    #[arg(long, value_enum, default_value_t = Compression::Auto)]
    pub compression: Compression,
}

/// `envd image finalize`.
#[derive(Debug, clap::Args)]
pub struct FinalizeArgs {
    /// The image's root directory (the mounted disk).
    #[arg(long)]
    pub root: PathBuf,
}

/// Why an image command failed. Each message is one step; the cause follows as its source.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("chroot into {}", path.display())]
    Chroot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open the running envd (/proc/self/exe)")]
    OpenSelf(#[source] io::Error),
    #[error(transparent)]
    Decompress(#[from] DecompressError),
    /// Reading the next header failed (a corrupt or truncated archive).
    #[error("read the archive{}", after_entry(.after))]
    Archive {
        after: Option<String>,
        #[source]
        source: io::Error,
    },
    /// Applying one entry failed; `path` is its name in the archive.
    #[error("{path}")]
    Entry {
        path: String,
        #[source]
        source: EntryError,
    },
    #[error("set directory times")]
    DirTimes(#[source] EntryError),
    #[error(transparent)]
    Finalize(#[from] FinalizeError),
}

fn after_entry(after: &Option<String>) -> String {
    match after {
        Some(path) => format!(" after {path}"),
        None => String::new(),
    }
}

/// Runs `envd image …` (`args` starts at `image`, which clap takes as the program name).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    use clap::Parser;
    let cli = ImageCli::parse_from(args);
    let (name, result) = match &cli.command {
        ImageCommand::Unpack(args) => ("unpack", unpack::run(args)),
        ImageCommand::Finalize(args) => ("finalize", finalize::run(args)),
    };
    match result {
        Ok(summary) => {
            println!("envd image {name}: {summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("envd image {name}: {}", crate::error::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Makes `root` this process's `/` and working directory, and clears the umask so modes from
/// the archive land exactly. After this no path can reach the build VM's own files.
fn enter_root(root: &Path) -> Result<(), ImageError> {
    let chroot_err = |e: nix::Error| ImageError::Chroot {
        path: root.to_path_buf(),
        source: e.into(),
    };
    nix::unistd::chroot(root).map_err(chroot_err)?;
    nix::unistd::chdir("/").map_err(chroot_err)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unpack_and_finalize() {
        use clap::Parser;
        let cli = ImageCli::parse_from(["image", "unpack", "--root", "/mnt/image"]);
        match cli.command {
            ImageCommand::Unpack(a) => {
                assert_eq!(a.root, Path::new("/mnt/image"));
                assert_eq!(a.compression, Compression::Auto);
            }
            other => panic!("{other:?}"),
        }
        let cli = ImageCli::parse_from(["image", "unpack", "--root", "r", "--compression", "zstd"]);
        assert!(matches!(
            cli.command,
            ImageCommand::Unpack(UnpackArgs {
                compression: Compression::Zstd,
                ..
            })
        ));
        let cli = ImageCli::parse_from(["image", "finalize", "--root", "r"]);
        assert!(matches!(cli.command, ImageCommand::Finalize(_)));
    }
}
