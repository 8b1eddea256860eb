//! `envd image unpack`: applies one OCI layer (a tar, maybe compressed, on stdin) onto the
//! image's root, from inside a chroot into it.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::sys::time::TimeSpec;

use super::entry::{self, EntryError, Meta, Node, io};
use super::whiteout::{self, Class, Written};
use super::{ImageError, UnpackArgs, decompress, enter_root};

/// Applies the layer on stdin; returns the summary line.
pub(super) fn run(args: &UnpackArgs) -> Result<String, ImageError> {
    // stdin is open already, so the chroot changes nothing for it; detecting the compression
    // first means an unreadable stdin fails before the root is touched.
    let input = decompress::open(io::stdin().lock(), args.compression)?;
    enter_root(&args.root)?;
    let mut archive = tar::Archive::new(input);
    let mut layer = Layer::default();
    let entries = archive.entries().map_err(|source| ImageError::Archive {
        after: None,
        source,
    })?;
    let mut last: Option<String> = None;
    for entry in entries {
        let mut entry = entry.map_err(|source| ImageError::Archive {
            after: last.take(),
            source,
        })?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        layer
            .apply(&mut entry)
            .map_err(|source| ImageError::Entry {
                path: name.clone(),
                source,
            })?;
        last = Some(name);
    }
    // Read to the end: gzip checks its CRC only there, and the writer must not see EPIPE.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|source| ImageError::Archive {
        after: last.take(),
        source,
    })?;
    layer.finish().map_err(ImageError::DirTimes)?;
    Ok(layer.summary())
}

/// One layer being applied: what it wrote (for whiteouts), its directories' mtimes, counts.
struct Layer {
    written: Written,
    /// Set when the layer is done; the last entry for a directory wins.
    dir_mtimes: HashMap<PathBuf, TimeSpec>,
    buf: Vec<u8>,
    entries: u64,
    bytes: u64,
    whiteouts: u64,
    removed: u64,
    xattrs_failed: u64,
}

impl Default for Layer {
    fn default() -> Self {
        Layer {
            written: Written::default(),
            dir_mtimes: HashMap::new(),
            buf: vec![0; 1 << 20],
            entries: 0,
            bytes: 0,
            whiteouts: 0,
            removed: 0,
            xattrs_failed: 0,
        }
    }
}

impl Layer {
    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), EntryError> {
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        // Typed before classified: a PAX global header's name is no path in the image.
        if entry.header().entry_type().is_pax_global_extensions() {
            return Ok(());
        }
        self.entries += 1;
        let rel = whiteout::normalise(&entry.path_bytes());
        match whiteout::classify(&rel) {
            Class::Entry => match Node::of(entry.header(), link)? {
                Node::Nothing => Ok(()),
                // Pre-POSIX tars mark directories only by the trailing slash.
                Node::File if entry.path_bytes().ends_with(b"/") => {
                    self.create(entry, &rel, Node::Dir)
                }
                node => self.create(entry, &rel, node),
            },
            Class::Opaque { dir } => {
                let dir = resolve_dir(dir)?;
                self.whiteouts += 1;
                self.removed += self
                    .written
                    .remove_lower_children(&dir)
                    .map_err(io("apply the opaque whiteout"))?;
                Ok(())
            }
            Class::Whiteout { dir, name } => {
                let dir = resolve_dir(dir)?;
                self.whiteouts += 1;
                self.removed += self
                    .written
                    .remove_lower(&dir.join(name))
                    .map_err(io("apply the whiteout"))?;
                Ok(())
            }
            Class::Ignore => Ok(()),
        }
    }

    /// Creates an ordinary entry at `rel` (normalised, relative to the root).
    fn create<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        node: Node,
    ) -> Result<(), EntryError> {
        let pax = entry::Pax::of(entry);
        let meta = Meta::of(entry.header(), pax.mtime)?;
        let Some(name) = rel.file_name() else {
            // `./`: the root itself. Only a directory entry means anything there.
            if node == Node::Dir {
                entry::set_owner_and_mode(Path::new("/"), &meta)?;
                self.dir_mtimes.insert(PathBuf::from("/"), meta.mtime);
            }
            return Ok(());
        };
        // The parent with symlinks resolved (inside the chroot), so what this layer wrote is
        // recorded where it really is; the last component stays as named (never followed).
        let dst = resolve_dir(rel.parent().unwrap_or(Path::new("")))?.join(name);
        match node {
            Node::HardLink(target) => {
                let target = Path::new("/").join(whiteout::normalise(&target));
                if target == dst || target == Path::new("/").join(rel) {
                    return Ok(());
                }
                entry::make_room(&dst, false)?;
                entry::make_hard_link(&target, &dst)?;
            }
            node => {
                let existed = entry::make_room(&dst, node == Node::Dir)?;
                self.make(entry, &dst, node, &meta, existed)?;
                self.xattrs_failed += entry::set_xattrs(&dst, &pax.xattrs);
            }
        }
        self.written.record(&dst);
        Ok(())
    }

    fn make<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        dst: &Path,
        node: Node,
        meta: &Meta,
        existed: bool,
    ) -> Result<(), EntryError> {
        match node {
            Node::File => {
                let size = entry.size();
                entry::write_file(entry, size, dst, meta, &mut self.buf)?;
                self.bytes += size;
                entry::set_mtime(dst, meta.mtime)
            }
            Node::Dir => {
                entry::make_dir(dst, meta, existed)?;
                self.dir_mtimes.insert(dst.to_path_buf(), meta.mtime);
                Ok(())
            }
            Node::Symlink(target) => entry::make_symlink(&target, dst, meta),
            Node::Device { kind, dev } => entry::make_node(dst, kind, dev, meta),
            Node::Fifo => entry::make_node(dst, nix::sys::stat::SFlag::S_IFIFO, 0, meta),
            Node::HardLink(_) | Node::Nothing => Ok(()),
        }
    }

    /// Sets the directories' mtimes, now that nothing is created in them any more.
    fn finish(&mut self) -> Result<(), EntryError> {
        for (dir, mtime) in &self.dir_mtimes {
            // A later entry or whiteout of this layer may have replaced or removed it.
            match std::fs::symlink_metadata(dir) {
                Ok(meta) if meta.is_dir() => entry::set_mtime(dir, *mtime)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let mut line = format!(
            "{} entries, {} bytes of file data, {} whiteouts applied ({} paths removed)",
            self.entries, self.bytes, self.whiteouts, self.removed
        );
        if self.xattrs_failed > 0 {
            line.push_str(&format!(
                ", {} extended attributes not set",
                self.xattrs_failed
            ));
        }
        line
    }
}

/// `rel` (a directory relative to the root) as a real path: missing directories created (root,
/// 0755), symlinks resolved. All inside the chroot, so an absolute symlink such as
/// `/lib -> /usr/lib` resolves to the image's `/usr/lib`.
fn resolve_dir(rel: &Path) -> Result<PathBuf, EntryError> {
    let dir = Path::new("/").join(rel);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(io("create the parent directories"))?;
    std::fs::canonicalize(&dir).map_err(io("resolve the parent directory"))
}
