//! The artifact cache: content keys, build-into-a-temporary-directory-then-rename, manifests.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::ImageError;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_their_parts() {
        let key = |parts: &[(&str, &str)]| {
            let mut k = CacheKey::default();
            for (label, value) in parts {
                k.text(label, value);
            }
            k.finish()
        };
        assert_eq!(key(&[("a", "bc")]), key(&[("a", "bc")]));
        assert_ne!(key(&[("a", "bc")]), key(&[("ab", "c")]));
        assert_eq!(key(&[("a", "b")]).len(), 24);
    }

    #[test]
    fn a_failed_build_leaves_nothing_and_a_good_one_is_found_again() {
        let cache = tempfile::tempdir().unwrap();
        let err = cached(cache.path(), "thing", "k1", |_| {
            Err(ImageError::MissingModule("x".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);

        let dir = cached(cache.path(), "thing", "k1", |tmp| {
            write_manifest(tmp, &serde_json::json!({"ok": true}))
        })
        .unwrap();
        assert_eq!(dir, cache.path().join("thing-k1"));
        let again = cached(cache.path(), "thing", "k1", |_| unreachable!("cached")).unwrap();
        assert_eq!(again, dir);
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
    }
}
