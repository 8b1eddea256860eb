//! The content-addressed blob store: `<root>/sha256/<hex>`, each blob written to a temporary
//! file in `<root>/tmp`, hashed while it streams, checked, synced and renamed into place, so a
//! file under `sha256/` is always whole and always what its name says.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::image::{Compression, digest_hex, short};
use crate::{DEFAULT_MAX_IMAGE_BYTES, OciError};

/// Where verified blobs live. Cheap to make; directories are created on first write.
///
/// The store also carries the cap on one image's size, so pulls and archive reads share it.
///
/// Temporary files of a process that died mid-write stay in `<root>/tmp`; nothing reads them,
/// and whoever owns the store may empty that directory while no pull or archive read runs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    max_image_bytes: u64,
}

/// A blob written and verified: its digest, size and where it is.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) digest: String,
    pub(crate) size: u64,
    pub(crate) path: PathBuf,
}

impl BlobStore {
    /// A store rooted at `root`, taking images of up to [`DEFAULT_MAX_IMAGE_BYTES`].
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
        }
    }

    /// The same store, refusing images (config and layers together) larger than `max` bytes.
    pub fn with_max_image_bytes(self, max: u64) -> Self {
        Self {
            max_image_bytes: max,
            ..self
        }
    }

    /// The cap on one image's size.
    pub fn max_image_bytes(&self) -> u64 {
        self.max_image_bytes
    }

    /// Where the blob with this digest is (or would be); `None` for anything but a well-formed
    /// `sha256:<64 hex>` digest, so no caller's string can name a path outside the store.
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        digest_hex(digest).map(|hex| self.root.join("sha256").join(hex))
    }

    /// The blob, when the store already holds it at this size. Blobs are only ever renamed into
    /// place after their digest matched, so presence is verification; the size check catches a
    /// file damaged since.
    pub(crate) fn existing(&self, digest: &str, size: u64) -> Option<PathBuf> {
        let path = self.path(digest)?;
        let meta = std::fs::metadata(&path).ok()?;
        (meta.is_file() && meta.len() == size).then_some(path)
    }

    fn temp(&self) -> Result<(std::fs::File, tempfile::TempPath), OciError> {
        let dir = self.root.join("tmp");
        std::fs::create_dir_all(&dir).map_err(OciError::io("creating", &dir))?;
        std::fs::create_dir_all(self.root.join("sha256"))
            .map_err(OciError::io("creating", &self.root))?;
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&dir)
            .map_err(OciError::io("creating a temporary file in", &dir))?;
        Ok(file.into_parts())
    }

    /// Moves a verified temporary file to its name and syncs the directory, so the rename
    /// survives a crash as well as the data did.
    fn commit(&self, temp: tempfile::TempPath, digest: &str) -> Result<PathBuf, OciError> {
        let path = self
            .path(digest)
            .ok_or_else(|| OciError::bad(format!("unsupported digest {digest:?}")))?;
        temp.persist(&path)
            .map_err(|e| OciError::io("renaming a blob to", &path)(e.error))?;
        let dir = self.root.join("sha256");
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(OciError::io("syncing", &dir))?;
        Ok(path)
    }

    /// Copies `reader` into the store. With `expected`, the blob must have that digest (and then
    /// nothing is renamed when it does not); without, it is stored under whatever it hashes to.
    /// More than `max` bytes is an error.
    pub(crate) fn put_reader(
        &self,
        mut reader: impl Read,
        expected: Option<&str>,
        max: u64,
        what: &str,
    ) -> Result<Stored, OciError> {
        let (mut file, temp) = self.temp()?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| OciError::bad_because(format!("{what} cannot be read"), e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > max {
                return Err(OciError::Limit {
                    what: format!("{what} is larger than {max} bytes"),
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(OciError::io("writing", &temp))?;
        }
        file.sync_all().map_err(OciError::io("syncing", &temp))?;
        drop(file);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(mismatch(what, expected, &digest));
        }
        let path = self.commit(temp, &digest)?;
        Ok(Stored { digest, size, path })
    }

    /// Streams a blob of known digest and size into the store; a stream that ends short, runs
    /// long or hashes differently leaves nothing behind. `fail` turns a transfer error into ours.
    pub(crate) async fn put_stream<S>(
        &self,
        mut stream: S,
        digest: &str,
        size: u64,
        fail: &(dyn Fn(std::io::Error) -> OciError + Send + Sync),
    ) -> Result<PathBuf, OciError>
    where
        S: Stream<Item = std::io::Result<bytes::Bytes>> + Unpin,
    {
        let (file, temp) = self.temp()?;
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(fail)?;
            got += chunk.len() as u64;
            if got > size {
                return Err(OciError::bad(format!(
                    "blob {} is larger than its descriptor's {size} bytes",
                    short(digest)
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(OciError::io("writing", &temp))?;
        }
        if got != size {
            return Err(OciError::bad(format!(
                "blob {} has {got} bytes, its descriptor {size}",
                short(digest)
            )));
        }
        file.sync_all()
            .await
            .map_err(OciError::io("syncing", &temp))?;
        drop(file);
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(mismatch(
                &format!("blob {}", short(digest)),
                digest,
                &actual,
            ));
        }
        self.commit(temp, digest)
    }
}

fn mismatch(what: &str, expected: &str, actual: &str) -> OciError {
    OciError::bad(format!(
        "digest mismatch: {what} should be {expected} but is {actual}"
    ))
}

/// The compression a stored blob's first bytes show.
pub(crate) fn sniff_file(path: &Path) -> Result<Compression, OciError> {
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(OciError::io("opening", path))?;
    let mut filled = 0;
    while filled < head.len() {
        let n = file
            .read(&mut head[filled..])
            .map_err(OciError::io("reading", path))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(Compression::sniff(&head[..filled]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::sha256_digest;

    #[test]
    fn stores_verified_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_owned());
        let digest = sha256_digest(b"hello");
        let stored = store
            .put_reader(&b"hello"[..], Some(&digest), 100, "blob")
            .unwrap();
        assert_eq!(stored.path, store.path(&digest).unwrap());
        assert_eq!(std::fs::read(&stored.path).unwrap(), b"hello");
        assert_eq!(store.existing(&digest, 5), Some(stored.path.clone()));
        assert_eq!(store.existing(&digest, 6), None);

        let wrong = sha256_digest(b"other");
        let err = store
            .put_reader(&b"hello!"[..], Some(&wrong), 100, "blob")
            .unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert!(store.path(&wrong).unwrap().metadata().is_err());
        let err = store
            .put_reader(&b"hello"[..], None, 4, "blob")
            .unwrap_err();
        assert!(matches!(err, OciError::Limit { .. }), "{err}");
        // Neither failure left a temporary file.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn streams_are_checked_for_size_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().to_owned());
        let digest = sha256_digest(b"abcdef");
        let chunks = || {
            futures::stream::iter(vec![
                Ok(bytes::Bytes::from_static(b"abc")),
                Ok(bytes::Bytes::from_static(b"def")),
            ])
        };
        let fail = |e: std::io::Error| OciError::bad_because("transfer", e);
        let path = store.put_stream(chunks(), &digest, 6, &fail).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"abcdef");
        let other = sha256_digest(b"abcdeg");
        let err = store
            .put_stream(chunks(), &other, 6, &fail)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        let err = store
            .put_stream(chunks(), &digest, 5, &fail)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        let err = store
            .put_stream(chunks(), &digest, 7, &fail)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("has 6 bytes"), "{err}");
        assert!(store.path(&other).unwrap().metadata().is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
