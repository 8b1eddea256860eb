//! Reading an uploaded image archive: a `docker save` tarball (`manifest.json`) or an OCI image
//! layout tarball (`oci-layout`, `index.json`, `blobs/sha256/…`).
//!
//! Entries come in any order (docker writes `manifest.json` last), so the archive is read in
//! passes: one over the headers to list it, then one per manifest level for the small JSON
//! blobs, then one copying the layers. Passes seek over entries they do not read. Nothing named
//! in the archive ever becomes a path on disk: only regular files' bytes are read, and they go
//! into the store under the digest computed while copying them. Entries with `..` or absolute
//! names, links, devices and directories are never read at all.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};

use serde::Deserialize;

use crate::image::{
    Descriptor, Manifest, check_digest, digest_hex, layer_compression, parse_config,
    parse_manifest, select_platform, sha256_digest, short,
};
use crate::store::{Stored, sniff_file};
use crate::{BlobStore, Compression, Image, Layer, MAX_LAYERS, MAX_METADATA_BYTES, OciError};

/// At most this many entries in an archive (an image of 128 layers has a few hundred).
const MAX_ENTRIES: usize = 10_000;

/// Indexes pointing at indexes are followed this deep, no deeper.
const MAX_INDEX_DEPTH: usize = 3;

/// Reads an image archive into `store`. Blocking: it copies every layer.
///
/// A docker-save archive that also carries an OCI layout (docker 25 and later) is read as the
/// layout. With several images, the first is taken. [`Image::digest`] is the manifest's digest
/// for a layout; a docker-save archive has no manifest blob, so its digest is the sha256 of
/// `{"config":"<digest>","layers":["<digest>",…]}` (compact JSON), which names the same content
/// whatever the archive's file names or tags.
pub fn read_archive(path: &Path, store: &BlobStore) -> Result<Image, OciError> {
    let archive = Archive::scan(path)?;
    if archive.has("oci-layout") && archive.has("index.json") {
        read_layout(&archive, store)
    } else if archive.has("manifest.json") {
        read_docker(&archive, store)
    } else {
        Err(OciError::bad(
            "the archive is neither a docker save archive (no manifest.json) nor an OCI image \
             layout (no oci-layout and index.json)",
        ))
    }
}

/// An archive's listing: every entry with a clean name.
struct Archive<'a> {
    path: &'a Path,
    /// Clean name → (size, whether it is a regular file).
    entries: HashMap<String, (u64, bool)>,
}

impl<'a> Archive<'a> {
    /// The first pass: headers only.
    fn scan(path: &'a Path) -> Result<Self, OciError> {
        let mut file = File::open(path).map_err(OciError::io("opening", path))?;
        let mut head = [0u8; 4];
        let n = file
            .read(&mut head)
            .map_err(OciError::io("reading", path))?;
        if Compression::sniff(&head[..n]) != Compression::None {
            return Err(OciError::bad(
                "the archive is compressed; give the plain tar (as docker save writes it)",
            ));
        }
        let mut entries = HashMap::new();
        let mut count = 0usize;
        let mut tar = tar::Archive::new(File::open(path).map_err(OciError::io("opening", path))?);
        for entry in tar.entries_with_seek().map_err(broken)? {
            let entry = entry.map_err(broken)?;
            count += 1;
            if count > MAX_ENTRIES {
                return Err(OciError::Limit {
                    what: format!("the archive has more than {MAX_ENTRIES} entries"),
                });
            }
            let Some(name) = entry.path().ok().as_deref().and_then(clean) else {
                continue;
            };
            let regular = entry.header().entry_type().is_file();
            if regular && entries.insert(name.clone(), (entry.size(), true)).is_some() {
                // Two entries of one name: which one a reader takes is ambiguous.
                return Err(OciError::bad(format!("the archive has {name} twice")));
            }
            entries.entry(name).or_insert((entry.size(), false));
        }
        Ok(Self { path, entries })
    }

    fn has(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|&(_, regular)| regular)
    }

    /// The size of a regular entry named by the image.
    fn size(&self, name: &str) -> Result<u64, OciError> {
        match self.entries.get(name) {
            Some(&(size, true)) => Ok(size),
            Some(_) => Err(OciError::bad(format!(
                "{name} in the archive is not a regular file (links are not followed)"
            ))),
            None => Err(OciError::bad(format!("the archive has no {name}"))),
        }
    }

    /// One pass calling `f` with each wanted regular entry's name and reader.
    fn each(
        &self,
        wanted: &HashSet<String>,
        mut f: impl FnMut(&str, &mut dyn Read) -> Result<(), OciError>,
    ) -> Result<(), OciError> {
        let file = File::open(self.path).map_err(OciError::io("opening", self.path))?;
        let mut tar = tar::Archive::new(file);
        for entry in tar.entries_with_seek().map_err(broken)? {
            let mut entry = entry.map_err(broken)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let Some(name) = entry.path().ok().as_deref().and_then(clean) else {
                continue;
            };
            if wanted.contains(&name) {
                f(&name, &mut entry)?;
            }
        }
        Ok(())
    }

    /// A small entry's bytes (a manifest, an index, a config).
    fn read_small(&self, name: &str) -> Result<Vec<u8>, OciError> {
        let size = self.size(name)?;
        if size > MAX_METADATA_BYTES {
            return Err(OciError::Limit {
                what: format!("{name} has {size} bytes (at most {MAX_METADATA_BYTES})"),
            });
        }
        let mut out = None;
        self.each(&HashSet::from([name.to_owned()]), |_, r| {
            let mut buf = Vec::with_capacity(size as usize);
            r.take(size)
                .read_to_end(&mut buf)
                .map_err(|e| OciError::bad_because(format!("{name} cannot be read"), e))?;
            out = Some(buf);
            Ok(())
        })?;
        out.ok_or_else(|| OciError::bad(format!("the archive has no {name}")))
    }

    /// A small blob named by a descriptor, checked against its digest and size.
    fn read_blob(&self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
        let name = blob_name(&desc.digest, what)?;
        let bytes = self.read_small(&name)?;
        let digest = sha256_digest(&bytes);
        if digest != desc.digest || bytes.len() as u64 != desc.size {
            return Err(OciError::bad(format!(
                "digest mismatch: {what} should be {} ({} bytes) but is {digest} ({} bytes)",
                desc.digest,
                desc.size,
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Copies the named entries into the store, each checked against its expected digest when
    /// there is one; names whose expected blob the store holds already at that size are skipped.
    /// `config` bytes count towards the store's cap with them.
    fn copy(
        &self,
        wanted: &HashMap<String, Option<String>>,
        config: u64,
        store: &BlobStore,
    ) -> Result<HashMap<String, Stored>, OciError> {
        let mut total = config;
        let mut todo = HashSet::new();
        let mut done = HashMap::new();
        for (name, expected) in wanted {
            let size = self.size(name)?;
            total = total.saturating_add(size);
            let found = expected.as_deref().and_then(|d| store.existing(d, size));
            match (found, expected) {
                (Some(path), Some(digest)) => {
                    let digest = digest.clone();
                    done.insert(name.clone(), Stored { digest, size, path });
                }
                _ => {
                    todo.insert(name.clone());
                }
            }
        }
        let max = store.max_image_bytes();
        if total > max {
            return Err(OciError::Limit {
                what: format!("the config and layers have {total} bytes (at most {max})"),
            });
        }
        self.each(&todo, |name, reader| {
            let size = self.size(name)?;
            let expected = wanted.get(name).and_then(|e| e.as_deref());
            let stored = store.put_reader(reader, expected, size, name)?;
            done.insert(name.to_owned(), stored);
            Ok(())
        })?;
        Ok(done)
    }
}

fn broken(e: std::io::Error) -> OciError {
    OciError::bad_because("the archive is not a readable tar", e)
}

/// An entry's name as a clean relative path (`./a//b` is `a/b`); `None` for names that leave
/// the archive's root (`..`, absolute) or are not UTF-8, which are never read.
fn clean(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Where a layout keeps a blob: `blobs/sha256/<hex>`.
fn blob_name(digest: &str, what: &str) -> Result<String, OciError> {
    check_digest(digest, what)?;
    Ok(format!("blobs/sha256/{}", &digest["sha256:".len()..]))
}

/// The layers of a manifest, copied, with their compressions checked.
fn copy_layers(
    archive: &Archive<'_>,
    store: &BlobStore,
    config: u64,
    names: &[String],
    expected: &[Option<String>],
    declared: &[Option<Compression>],
) -> Result<Vec<Layer>, OciError> {
    let wanted = names
        .iter()
        .cloned()
        .zip(expected.iter().cloned())
        .collect();
    let stored = archive.copy(&wanted, config, store)?;
    let mut layers = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let blob = &stored[name];
        let sniffed = sniff_file(&blob.path)?;
        if let Some(declared) = declared[i]
            && declared != sniffed
        {
            return Err(OciError::bad(format!(
                "layer {} {} is {sniffed:?} by its first bytes but {declared:?} by its media type",
                i + 1,
                short(&blob.digest)
            )));
        }
        layers.push(Layer {
            digest: blob.digest.clone(),
            path: blob.path.clone(),
            size: blob.size,
            compression: sniffed,
        });
    }
    Ok(layers)
}

/// The archive's file name, for an image that names itself nowhere.
fn file_name(archive: &Archive<'_>) -> String {
    archive
        .path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn read_layout(archive: &Archive<'_>, store: &BlobStore) -> Result<Image, OciError> {
    let layout: serde_json::Value = serde_json::from_slice(&archive.read_small("oci-layout")?)
        .map_err(|e| OciError::bad_because("oci-layout is not JSON", e))?;
    if layout.get("imageLayoutVersion").is_none() {
        return Err(OciError::bad("oci-layout has no imageLayoutVersion"));
    }
    let Manifest::Index(entries) =
        parse_manifest(&archive.read_small("index.json")?, "index.json")?
    else {
        return Err(OciError::bad("index.json is not an index"));
    };
    if entries.is_empty() {
        return Err(OciError::bad("the archive's index.json lists no image"));
    }
    let mut desc = select_platform(&entries, "index.json")?.clone();
    let reference = [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ]
    .iter()
    .find_map(|k| desc.annotations.get(*k).cloned())
    .unwrap_or_else(|| file_name(archive));
    for _ in 0..MAX_INDEX_DEPTH {
        let what = format!("manifest {}", short(&desc.digest));
        let bytes = archive.read_blob(&desc, &what)?;
        match parse_manifest(&bytes, &what)? {
            Manifest::Index(entries) => desc = select_platform(&entries, &what)?.clone(),
            Manifest::Image { config, layers } => {
                return layout_image(archive, store, desc.digest, reference, config, layers);
            }
        }
    }
    Err(OciError::bad(format!(
        "indexes nested more than {MAX_INDEX_DEPTH} deep"
    )))
}

fn layout_image(
    archive: &Archive<'_>,
    store: &BlobStore,
    digest: String,
    reference: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
) -> Result<Image, OciError> {
    let config_bytes = archive.read_blob(&config, "the image config")?;
    let parsed = parse_config(&config_bytes, layers.len())?;
    store.put_reader(
        &config_bytes[..],
        Some(&config.digest),
        MAX_METADATA_BYTES,
        "config",
    )?;
    let mut names = Vec::new();
    let mut expected = Vec::new();
    let mut declared = Vec::new();
    for layer in &layers {
        names.push(blob_name(&layer.digest, "a layer")?);
        expected.push(Some(layer.digest.clone()));
        declared.push(Some(layer_compression(layer)?));
    }
    let out = copy_layers(archive, store, config.size, &names, &expected, &declared)?;
    for (layer, desc) in out.iter().zip(&layers) {
        if layer.size != desc.size {
            return Err(OciError::bad(format!(
                "layer {} has {} bytes, its descriptor {}",
                short(&desc.digest),
                layer.size,
                desc.size
            )));
        }
    }
    Ok(Image {
        digest,
        reference,
        config: parsed.config,
        layers: out,
    })
}

/// One image of a docker-save `manifest.json`.
#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a docker-save file name promises: `blobs/sha256/<hex>` (docker 25 and later), or
/// `<hex>.json` for configs and `<hex>.tar` for layers (older docker; skopeo's docker-archive,
/// whose `<id>/layer.tar` are links to those). Layer directories (`<id>/layer.tar`) promise none.
fn named_digest(name: &str) -> Option<String> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))
        .or_else(|| name.strip_suffix(".tar"))?;
    let digest = format!("sha256:{hex}");
    digest_hex(&digest).is_some().then_some(digest)
}

fn read_docker(archive: &Archive<'_>, store: &BlobStore) -> Result<Image, OciError> {
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&archive.read_small("manifest.json")?)
            .map_err(|e| OciError::bad_because("manifest.json is not a docker save manifest", e))?;
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| OciError::bad("the archive's manifest.json lists no image"))?;
    if entry.layers.len() > MAX_LAYERS {
        return Err(OciError::Limit {
            what: format!("{} layers (at most {MAX_LAYERS})", entry.layers.len()),
        });
    }
    let config_name = clean(Path::new(&entry.config))
        .ok_or_else(|| OciError::bad(format!("bad config name {:?}", entry.config)))?;
    let config_bytes = archive.read_small(&config_name)?;
    let config = store.put_reader(
        &config_bytes[..],
        named_digest(&config_name).as_deref(),
        MAX_METADATA_BYTES,
        &config_name,
    )?;
    let parsed = parse_config(&config_bytes, entry.layers.len())?;
    let names = entry
        .layers
        .iter()
        .map(|l| clean(Path::new(l)).ok_or_else(|| OciError::bad(format!("bad layer name {l:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let expected: Vec<_> = names.iter().map(|n| named_digest(n)).collect();
    let declared = vec![None; names.len()];
    let layers = copy_layers(archive, store, config.size, &names, &expected, &declared)?;
    check_diff_ids(&layers, parsed.diff_ids.as_deref())?;
    let reference = entry
        .repo_tags
        .and_then(|tags| tags.into_iter().next())
        .unwrap_or_else(|| file_name(archive));
    Ok(Image {
        digest: docker_digest(&config.digest, &layers),
        reference,
        config: parsed.config,
        layers,
    })
}

/// An uncompressed docker-save layer is its own diff ID: the config (whose digest its name may
/// promise) vouches for layers whose names promise nothing.
fn check_diff_ids(layers: &[Layer], diff_ids: Option<&[String]>) -> Result<(), OciError> {
    let Some(ids) = diff_ids else {
        return Ok(());
    };
    for (i, (layer, id)) in layers.iter().zip(ids).enumerate() {
        if layer.compression == Compression::None && &layer.digest != id {
            return Err(OciError::bad(format!(
                "digest mismatch: layer {} is {} but the config's diff ID is {id}",
                i + 1,
                layer.digest
            )));
        }
    }
    Ok(())
}

fn docker_digest(config: &str, layers: &[Layer]) -> String {
    let json = serde_json::json!({
        "config": config,
        "layers": layers.iter().map(|l| l.digest.as_str()).collect::<Vec<_>>(),
    });
    sha256_digest(json.to_string().as_bytes())
}

#[cfg(test)]
mod tests;
