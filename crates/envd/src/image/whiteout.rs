//! Entry names and OCI whiteouts (image-spec `layer.md`): which entries are whiteouts, and
//! deleting what they hide from lower layers without touching what this layer wrote.
//!
//! `D/.wh.NAME` deletes `D/NAME` (a file or a whole tree) from lower layers; `D/.wh..wh..opq`
//! deletes everything lower layers put in `D`. Neither ever hides an entry of its own layer,
//! wherever it sits in the stream, so the layer records what it wrote ([`Written`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// An archive name as a path relative to the image's root: empty and `.` components dropped,
/// a leading `/` ignored, and `..` taken lexically and clamped at the root (as the kernel
/// resolves `/..` after chroot), so no name points above the root even before chroot.
pub(super) fn normalise(raw: &[u8]) -> PathBuf {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    parts.iter().map(|p| OsStr::from_bytes(p)).collect()
}

/// What an entry is, by its (normalised) name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Class<'a> {
    /// An ordinary entry to create.
    Entry,
    /// `dir/.wh..wh..opq`: hide lower layers' children of `dir`.
    Opaque { dir: &'a Path },
    /// `dir/.wh.name`: hide `dir/name` from lower layers.
    Whiteout { dir: &'a Path, name: &'a OsStr },
    /// Whiteout machinery that is not a whiteout (aufs `.wh..wh.plnk` and the like, names under
    /// a `.wh.` directory, `.wh.` with nothing after it): neither created nor applied.
    Ignore,
}

pub(super) fn classify(rel: &Path) -> Class<'_> {
    let Some(name) = rel.file_name() else {
        return Class::Entry;
    };
    let dir = rel.parent().unwrap_or(Path::new(""));
    let under_whiteout = dir.components().any(|c| match c {
        Component::Normal(part) => part.as_bytes().starts_with(PREFIX.as_bytes()),
        _ => false,
    });
    if under_whiteout {
        return Class::Ignore;
    }
    let bytes = name.as_bytes();
    if bytes == OPAQUE.as_bytes() {
        return Class::Opaque { dir };
    }
    let Some(hidden) = bytes.strip_prefix(PREFIX.as_bytes()) else {
        return Class::Entry;
    };
    if hidden.is_empty()
        || hidden == b"."
        || hidden == b".."
        || hidden.starts_with(PREFIX.as_bytes())
    {
        return Class::Ignore;
    }
    Class::Whiteout {
        dir,
        name: OsStr::from_bytes(hidden),
    }
}

/// The paths this layer created (resolved, absolute inside the chroot), and every directory
/// above one of them, so whiteouts can spare them.
#[derive(Debug, Default)]
pub(super) struct Written {
    exact: HashSet<PathBuf>,
    /// Directories with something this layer wrote below them.
    ancestors: HashSet<PathBuf>,
}

impl Written {
    pub(super) fn record(&mut self, path: &Path) {
        self.exact.insert(path.to_path_buf());
        for dir in path.ancestors().skip(1) {
            // Every ancestor of a recorded one was recorded with it: stop at the first.
            if !self.ancestors.insert(dir.to_path_buf()) {
                break;
            }
        }
    }

    /// Deletes what lower layers have at `path`, keeping this layer's entries: a directory
    /// holding (or being) one of them is kept and pruned, anything else goes whole. Returns
    /// how many paths went.
    pub(super) fn remove_lower(&self, path: &Path) -> io::Result<u64> {
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            if self.exact.contains(path) || self.ancestors.contains(path) {
                return self.remove_lower_children(path);
            }
            // Does not follow symlinks inside the tree.
            fs::remove_dir_all(path)?;
            Ok(1)
        } else if self.exact.contains(path) {
            Ok(0)
        } else {
            fs::remove_file(path)?;
            Ok(1)
        }
    }

    /// Deletes what lower layers put in `dir` (an opaque directory), keeping this layer's.
    pub(super) fn remove_lower_children(&self, dir: &Path) -> io::Result<u64> {
        let children = match fs::read_dir(dir) {
            Ok(children) => children.collect::<io::Result<Vec<_>>>()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for child in children {
            removed += self.remove_lower(&child.path())?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_drops_dots_and_clamps_parent_dirs() {
        assert_eq!(normalise(b"./usr/bin/"), Path::new("usr/bin"));
        assert_eq!(normalise(b"/etc//passwd"), Path::new("etc/passwd"));
        assert_eq!(normalise(b"../escape"), Path::new("escape"));
        assert_eq!(normalise(b"a/../../../b/./c"), Path::new("b/c"));
        assert_eq!(normalise(b"./"), Path::new(""));
        assert_eq!(normalise(b".."), Path::new(""));
    }

    #[test]
    fn classifies_whiteouts() {
        let p = Path::new;
        assert_eq!(classify(p("etc/passwd")), Class::Entry);
        assert_eq!(classify(p("")), Class::Entry);
        assert_eq!(
            classify(p("opt/.wh.gone.txt")),
            Class::Whiteout {
                dir: p("opt"),
                name: OsStr::new("gone.txt")
            }
        );
        assert_eq!(
            classify(p(".wh.top")),
            Class::Whiteout {
                dir: p(""),
                name: OsStr::new("top")
            }
        );
        assert_eq!(
            classify(p("etc/opq/.wh..wh..opq")),
            Class::Opaque { dir: p("etc/opq") }
        );
        assert_eq!(classify(p(".wh..wh..opq")), Class::Opaque { dir: p("") });
        assert_eq!(classify(p(".wh..wh.plnk")), Class::Ignore);
        assert_eq!(classify(p(".wh..wh.plnk/123.456")), Class::Ignore);
        assert_eq!(classify(p("a/.wh.")), Class::Ignore);
        assert_eq!(classify(p("a/.wh..")), Class::Ignore);
        assert_eq!(classify(p("a/.wh...")), Class::Ignore);
        assert_eq!(classify(p("a/not.wh.x")), Class::Entry);
    }

    #[test]
    fn remove_lower_spares_this_layers_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("d");
        fs::create_dir_all(d.join("sub/deeper")).unwrap();
        for f in ["old", "new", "sub/old", "sub/new", "sub/deeper/old"] {
            fs::write(d.join(f), f).unwrap();
        }
        let mut written = Written::default();
        written.record(&d.join("new"));
        written.record(&d.join("sub/new"));
        assert_eq!(written.remove_lower_children(&d).unwrap(), 3);
        assert!(d.join("new").exists() && d.join("sub/new").exists());
        assert!(!d.join("old").exists() && !d.join("sub/old").exists());
        assert!(!d.join("sub/deeper").exists());
        // A whiteout of something this layer wrote does nothing.
        assert_eq!(written.remove_lower(&d.join("new")).unwrap(), 0);
        assert_eq!(written.remove_lower(&d.join("missing")).unwrap(), 0);
    }
}
