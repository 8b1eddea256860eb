//! What an image is once fetched ([`Image`], [`Layer`], [`ImageConfig`]), and the JSON it is
//! described by: manifests, indexes (manifest lists) and image configs, in their OCI and Docker
//! spellings, shared by registry pulls and archives.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::{MAX_LAYERS, MAX_METADATA_BYTES, OciError};

/// A fetched image: every blob is in the store, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The manifest's digest, `sha256:<hex>`: the cache key for the unpacked image. For a
    /// `docker save` archive without an OCI manifest, see [`crate::read_archive`].
    pub digest: String,
    /// The normalised reference (`docker.io/library/ubuntu:latest`), or for an archive the name
    /// it carries (its first tag), else the archive's file name.
    pub reference: String,
    /// What the image says to run, and how.
    pub config: ImageConfig,
    /// The layers, lowest first.
    pub layers: Vec<Layer>,
}

/// One layer blob, in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:<hex>` of the blob as stored (compressed, if it is).
    pub digest: String,
    /// Where the blob is: [`crate::BlobStore::path`] of the digest.
    pub path: PathBuf,
    /// The blob's size in bytes.
    pub size: u64,
    /// How the tar inside is compressed.
    pub compression: Compression,
}

/// How a layer's tar is compressed: from its media type, checked against its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Compression {
    /// What the first bytes of a blob say it is; anything that is neither gzip nor zstd counts as
    /// a plain tar (whose own magic sits at offset 257, and an empty layer has none).
    pub(crate) fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// The parts of the image config a template build uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`, split at the first `=` (a bare name gets an empty value).
    pub env: Vec<(String, String)>,
    /// `WorkingDir`, when set and not empty.
    pub working_dir: Option<String>,
    /// `User`, when set and not empty.
    pub user: Option<String>,
    /// `Entrypoint` (empty when unset).
    pub entrypoint: Vec<String>,
    /// `Cmd` (empty when unset).
    pub cmd: Vec<String>,
}

/// A content descriptor, as manifests and indexes list them.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    pub(crate) architecture: String,
    pub(crate) os: String,
}

/// A parsed manifest: one image, or an index of several.
#[derive(Debug)]
pub(crate) enum Manifest {
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index(Vec<Descriptor>),
}

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What a registry is asked for: images and indexes in both spellings (never schema 1).
pub(crate) const MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Parses a manifest or an index. An OCI manifest may leave out `mediaType`; then its fields say
/// which it is.
pub(crate) fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest, OciError> {
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| OciError::bad_because(format!("{what} is not a manifest"), e))?;
    if raw.schema_version != Some(2) {
        return Err(OciError::bad(format!(
            "{what} has schema version {:?}; only version 2 manifests are supported",
            raw.schema_version
        )));
    }
    let kind = match raw.media_type.as_deref() {
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => "image",
        Some(OCI_INDEX | DOCKER_LIST) => "index",
        None if raw.manifests.is_some() => "index",
        None if raw.config.is_some() => "image",
        other => {
            return Err(OciError::bad(format!(
                "{what} has unsupported media type {other:?}"
            )));
        }
    };
    if kind == "index" {
        let manifests = raw
            .manifests
            .ok_or_else(|| OciError::bad(format!("{what} is an index without manifests")))?;
        return Ok(Manifest::Index(manifests));
    }
    let config = raw
        .config
        .ok_or_else(|| OciError::bad(format!("{what} has no config")))?;
    let layers = raw.layers.unwrap_or_default();
    check_config_type(&config, what)?;
    if layers.len() > MAX_LAYERS {
        return Err(OciError::Limit {
            what: format!("{what} has {} layers (at most {MAX_LAYERS})", layers.len()),
        });
    }
    if config.size > MAX_METADATA_BYTES {
        return Err(OciError::Limit {
            what: format!(
                "config of {} bytes in {what} (at most {MAX_METADATA_BYTES})",
                config.size
            ),
        });
    }
    Ok(Manifest::Image { config, layers })
}

/// Refuses artifacts that are not container images (Helm charts, signatures, WASM modules):
/// their "layers" are no file systems.
fn check_config_type(config: &Descriptor, what: &str) -> Result<(), OciError> {
    match config.media_type.as_deref() {
        None
        | Some("application/vnd.oci.image.config.v1+json")
        | Some("application/vnd.docker.container.image.v1+json") => Ok(()),
        Some(other) => Err(OciError::bad(format!(
            "{what} is not a container image (config media type {other})"
        ))),
    }
}

/// The compression a layer's media type names; foreign and non-distributable layers (fetched
/// from URLs outside the registry) and anything else are refused.
pub(crate) fn layer_compression(layer: &Descriptor) -> Result<Compression, OciError> {
    match layer.media_type.as_deref() {
        Some("application/vnd.oci.image.layer.v1.tar")
        | Some("application/vnd.docker.image.rootfs.diff.tar") => Ok(Compression::None),
        Some("application/vnd.oci.image.layer.v1.tar+gzip")
        | Some("application/vnd.docker.image.rootfs.diff.tar.gzip") => Ok(Compression::Gzip),
        Some("application/vnd.oci.image.layer.v1.tar+zstd") => Ok(Compression::Zstd),
        other => Err(OciError::bad(format!(
            "layer {} has unsupported media type {other:?}",
            layer.digest
        ))),
    }
}

/// The entry of an index to take: the first linux/amd64 one, else the first without a platform
/// (what `skopeo` and image layouts write for a single image). Attestations and other platforms
/// are passed over.
pub(crate) fn select_platform<'a>(
    manifests: &'a [Descriptor],
    what: &str,
) -> Result<&'a Descriptor, OciError> {
    let amd64 = manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(found) = amd64.or_else(|| manifests.iter().find(|m| m.platform.is_none())) {
        return Ok(found);
    }
    let offered: Vec<String> = manifests
        .iter()
        .filter_map(|m| m.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    Err(OciError::bad(format!(
        "{what} has no linux/amd64 image (it has {})",
        if offered.is_empty() {
            "none".to_owned()
        } else {
            offered.join(", ")
        }
    )))
}

/// The hex of a `sha256:<hex>` digest; other algorithms and malformed digests are refused (the
/// hex becomes a file name in the store, so it must be exactly 64 lowercase hex digits).
pub(crate) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then_some(hex)
}

/// [`digest_hex`], as an error naming what carried the digest.
pub(crate) fn check_digest(digest: &str, what: &str) -> Result<(), OciError> {
    match digest_hex(digest) {
        Some(_) => Ok(()),
        None => Err(OciError::bad(format!(
            "{what} has digest {digest:?}; only sha256 digests are supported"
        ))),
    }
}

/// `sha256:<hex>` of some bytes.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// An image config, parsed; `diff_ids` are the uncompressed layers' digests.
#[derive(Debug)]
pub(crate) struct ParsedConfig {
    pub(crate) config: ImageConfig,
    pub(crate) diff_ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RawRunConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Option<Vec<String>>,
}

/// Parses an image config and checks it is for linux/amd64 (when it says) and has as many
/// `diff_ids` as the manifest has layers.
pub(crate) fn parse_config(bytes: &[u8], layers: usize) -> Result<ParsedConfig, OciError> {
    let raw: RawConfig = serde_json::from_slice(bytes)
        .map_err(|e| OciError::bad_because("the image config is not valid JSON", e))?;
    let os = raw.os.as_deref().unwrap_or("linux");
    let arch = raw.architecture.as_deref().unwrap_or("amd64");
    if os != "linux" || arch != "amd64" {
        return Err(OciError::bad(format!(
            "the image is for {os}/{arch}; sandboxes run linux/amd64"
        )));
    }
    let diff_ids = raw.rootfs.and_then(|r| r.diff_ids);
    if let Some(ids) = &diff_ids
        && ids.len() != layers
    {
        return Err(OciError::bad(format!(
            "the image config lists {} layers, the manifest {layers}",
            ids.len()
        )));
    }
    let run = raw.config.unwrap_or(RawRunConfig {
        env: None,
        working_dir: None,
        user: None,
        entrypoint: None,
        cmd: None,
    });
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let env = run
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv, String::new()),
        })
        .collect();
    let config = ImageConfig {
        env,
        working_dir: non_empty(run.working_dir),
        user: non_empty(run.user),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
    };
    Ok(ParsedConfig { config, diff_ids })
}

/// A digest cut short for people: `sha256:0123456789ab…`.
pub(crate) fn short(digest: &str) -> String {
    let cut = digest
        .char_indices()
        .nth(19)
        .map_or(digest.len(), |(i, _)| i);
    if cut < digest.len() {
        format!("{}…", &digest[..cut])
    } else {
        digest.to_owned()
    }
}

/// A size for people: `12.3 MiB`.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(media: Option<&str>, platform: Option<(&str, &str)>) -> Descriptor {
        Descriptor {
            media_type: media.map(str::to_owned),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            platform: platform.map(|(os, arch)| Platform {
                os: os.into(),
                architecture: arch.into(),
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn index_picks_linux_amd64_or_fails() {
        let mut list = vec![
            desc(Some(OCI_MANIFEST), Some(("linux", "arm64"))),
            desc(Some(OCI_MANIFEST), Some(("linux", "amd64"))),
        ];
        list[1].digest = format!("sha256:{}", "b".repeat(64));
        assert_eq!(select_platform(&list, "x").unwrap().digest, list[1].digest);
        let err = select_platform(&list[..1], "the index").unwrap_err();
        assert!(
            err.to_string()
                .contains("no linux/amd64 image (it has linux/arm64)"),
            "{err}"
        );
        // A layout's single untagged entry is the image.
        assert!(select_platform(&[desc(Some(OCI_MANIFEST), None)], "x").is_ok());
    }

    #[test]
    fn manifests_are_classified_and_checked() {
        let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},"layers":[]}"#;
        assert!(matches!(
            parse_manifest(manifest, "m").unwrap(),
            Manifest::Image { .. }
        ));
        let schema1 = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert!(
            parse_manifest(schema1, "m")
                .unwrap_err()
                .to_string()
                .contains("schema version")
        );
        let helm = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"sha256:00","size":2},"layers":[]}"#;
        assert!(
            parse_manifest(helm, "m")
                .unwrap_err()
                .to_string()
                .contains("not a container image")
        );
        assert!(matches!(
            parse_manifest(b"{not json", "m").unwrap_err(),
            OciError::BadImage {
                source: Some(_),
                ..
            }
        ));
        let layer = format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{}","size":1}}"#,
            "a".repeat(64)
        );
        let many = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha256:00","size":2}},"layers":[{}]}}"#,
            vec![layer; MAX_LAYERS + 1].join(",")
        );
        assert!(matches!(
            parse_manifest(many.as_bytes(), "m").unwrap_err(),
            OciError::Limit { .. }
        ));
    }

    #[test]
    fn config_fields_and_platform() {
        let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","A=b=c","BARE"],"WorkingDir":"/app","User":"","Entrypoint":null,"Cmd":["sh","-c","x"]},"rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#;
        let parsed = parse_config(config, 1).unwrap();
        assert_eq!(
            parsed.config,
            ImageConfig {
                env: vec![
                    ("PATH".into(), "/usr/bin".into()),
                    ("A".into(), "b=c".into()),
                    ("BARE".into(), String::new()),
                ],
                working_dir: Some("/app".into()),
                user: None,
                entrypoint: vec![],
                cmd: vec!["sh".into(), "-c".into(), "x".into()],
            }
        );
        assert!(parse_config(config, 2).is_err(), "layer count mismatch");
        let arm = br#"{"architecture":"arm64","os":"linux"}"#;
        assert!(
            parse_config(arm, 0)
                .unwrap_err()
                .to_string()
                .contains("linux/arm64")
        );
    }

    #[test]
    fn compression_from_magic_and_media_type() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"etc/"), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);
        let foreign = desc(
            Some("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
            None,
        );
        assert!(layer_compression(&foreign).is_err());
    }

    #[test]
    fn digests_and_display() {
        assert!(digest_hex(&format!("sha256:{}", "0f".repeat(32))).is_some());
        assert!(digest_hex("sha256:../../etc/passwd").is_none());
        assert!(digest_hex(&format!("sha512:{}", "0".repeat(128))).is_none());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert_eq!(
            short(&format!("sha256:{}", "a".repeat(64))),
            "sha256:aaaaaaaaaaaa…"
        );
        assert_eq!(human(12_900_000), "12.3 MiB");
        assert_eq!(human(10), "10 B");
    }
}
