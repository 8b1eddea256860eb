//! Container images as template sources: an OCI or Docker image, pulled from a registry or read
//! from a `docker save` / OCI image-layout tarball, becomes a verified, content-addressed set of
//! blobs plus the image's config.
//!
//! The host only fetches and verifies: it never unpacks a layer (a build VM does that later), so
//! nothing here interprets layer contents beyond their first bytes (the compression). Every blob
//! lands in a [`BlobStore`] under the sha256 computed while it was written, and only after that
//! digest matched the one the image named; a blob already in the store is reused.
//!
//! [`pull`] is async (registry traffic); [`read_archive`] blocks (callers use `spawn_blocking`).

mod archive;
mod image;
mod registry;
mod store;

use std::net::IpAddr;
use std::path::PathBuf;

pub use archive::read_archive;
pub use image::{Compression, Image, ImageConfig, Layer};
pub use registry::{Credentials, PullPolicy, pull};
pub use store::BlobStore;

/// At most this many layers in one image: more is no image a build should start from.
pub const MAX_LAYERS: usize = 128;

/// The default cap on one image's size (config and layers as stored): 32 GiB. See
/// [`BlobStore::with_max_image_bytes`].
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 32 << 30;

/// At most this many bytes in a manifest, an index or an image config (all are read into memory).
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

/// A cause carried in a variant's `source`, whatever library raised it.
pub(crate) type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why an image could not be had. The text names what failed; the cause is in `source()`.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference is not of the form `[registry/]repository[:tag][@digest]`.
    #[error("invalid image reference {reference:?}")]
    BadReference {
        /// What was given.
        reference: String,
        /// Why it does not parse.
        #[source]
        source: Cause,
    },
    /// The registry resolves to an address the policy refuses, and the operator has not listed it.
    #[error(
        "registry {registry} resolves to {address}, an address this host does not pull from \
         (private, loopback or link-local); an operator can allow it with \
         --insecure-registry {registry}"
    )]
    Denied {
        /// The registry, `host[:port]`.
        registry: String,
        /// The first refused address.
        address: IpAddr,
    },
    /// The registry's name does not resolve, or no connection to it could be made in time.
    #[error("registry {registry} cannot be reached")]
    Unreachable {
        /// The registry, `host[:port]`.
        registry: String,
        /// What the resolver or the connection said.
        #[source]
        source: Cause,
    },
    /// The registry has no such repository or tag (or digest).
    #[error("image {reference} not found (no such repository, tag or digest)")]
    NotFound {
        /// The normalised reference.
        reference: String,
        /// The registry's answer.
        #[source]
        source: Cause,
    },
    /// The registry refused the credentials, or wants some and none were given.
    #[error("registry {registry} refused access (credentials missing or wrong)")]
    Unauthorized {
        /// The registry, `host[:port]`.
        registry: String,
        /// The registry's answer.
        #[source]
        source: Cause,
    },
    /// The image is malformed or not one we can use: bad JSON, an unsupported media type, a blob
    /// whose digest or size differs from its descriptor, no linux/amd64 variant, a broken archive.
    #[error("bad image: {what}")]
    BadImage {
        /// What is wrong, and where.
        what: String,
        /// The parser's or the library's word, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The image exceeds a limit: too many layers, too large a manifest, config or total.
    #[error("image too large: {what}")]
    Limit {
        /// Which limit, and by how much.
        what: String,
    },
    /// The registry failed in another way (a server error, a transfer cut short, a protocol
    /// violation).
    #[error("registry {registry} failed")]
    Registry {
        /// The registry, `host[:port]`.
        registry: String,
        /// What failed.
        #[source]
        source: Cause,
    },
    /// Reading or writing a local file failed.
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
}

impl OciError {
    pub(crate) fn bad(what: impl Into<String>) -> Self {
        Self::BadImage {
            what: what.into(),
            source: None,
        }
    }

    pub(crate) fn bad_because(what: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::BadImage {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }
}
