//! The blocking filesystem operations behind the unary RPCs.
//!
//! Each runs inside [`crate::creds::run_as`], so every syscall here is checked against the
//! requesting user's permissions and what it creates belongs to that user.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use wrenn_proto::filesystem::EntryInfo;

use super::FsError;
use super::entry::{entry_from_metadata, entry_info};
use crate::user::Names;

/// Mode of directories MakeDir and Move create (before the umask), as upstream.
const DIR_MODE: u32 = 0o755;

fn display(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub(crate) fn stat(path: &Path, names: &Names) -> Result<EntryInfo, FsError> {
    entry_info(path, &display(path), names).map_err(|e| FsError::io("stat", path, e))
}

pub(crate) fn make_dir(path: &Path, names: &Names) -> Result<EntryInfo, FsError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(FsError::DirExists(path.to_path_buf())),
        Ok(_) => return Err(FsError::ExistsNotDir(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(FsError::io("stat", path, e)),
    }
    create_dirs(path)?;
    stat(path, names)
}

/// `mkdir -p` as the current (switched) user, so new directories belong to them.
fn create_dirs(path: &Path) -> Result<(), FsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(|e| FsError::io("create directory", path, e))
}

pub(crate) fn rename(
    source: &Path,
    destination: &Path,
    names: &Names,
) -> Result<EntryInfo, FsError> {
    std::fs::symlink_metadata(source).map_err(|e| FsError::io("stat", source, e))?;
    if let Some(parent) = destination.parent() {
        create_dirs(parent)?;
    }
    std::fs::rename(source, destination).map_err(|e| FsError::Io {
        what: format!("move '{}' to", source.display()),
        path: destination.to_path_buf(),
        source: e,
    })?;
    stat(destination, names)
}

/// `rm -rf`: a missing path is success; a symlink is removed, never followed.
pub(crate) fn remove(path: &Path) -> Result<(), FsError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::io("remove", path, e)),
    };
    // std's remove_dir_all works relative to open directory handles and never follows
    // symlinks, so a concurrent swap of a directory for a link cannot redirect it.
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(FsError::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// One directory being listed: its real path, the path reported for it, its depth and the
/// names still to visit (sorted, as Go's WalkDir visits them).
struct Frame {
    dir: PathBuf,
    reported: PathBuf,
    level: u32,
    names: VecDeque<std::ffi::OsString>,
}

/// Lists `requested` down to `depth` levels (0 means 1). The requested path itself may be a
/// symlink to a directory; below it nothing is followed. Entry paths are reported under
/// `requested`, not under the resolved directory.
pub(crate) fn list_dir(
    requested: &Path,
    depth: u32,
    names: &Names,
) -> Result<Vec<EntryInfo>, FsError> {
    let depth = depth.max(1);
    let resolved =
        std::fs::canonicalize(requested).map_err(|e| FsError::io("resolve path", requested, e))?;
    let meta = std::fs::metadata(&resolved).map_err(|e| FsError::io("stat", requested, e))?;
    if !meta.is_dir() {
        return Err(FsError::NotADirectory(requested.to_path_buf()));
    }
    let root_names =
        read_names(&resolved).map_err(|e| FsError::io("read directory", requested, e))?;
    let mut out = Vec::new();
    // Depth-first, pre-order, with an explicit stack so deep trees cannot exhaust the thread's
    // stack.
    let mut stack = vec![Frame {
        dir: resolved,
        reported: requested.to_path_buf(),
        level: 1,
        names: root_names,
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.pop_front() else {
            stack.pop();
            continue;
        };
        let path = frame.dir.join(&name);
        let reported = frame.reported.join(&name);
        let level = frame.level;
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Vanished (or became unreachable) since the directory was read: skip it.
            Err(_) => continue,
        };
        out.push(entry_from_metadata(
            &path,
            &display(&reported),
            &meta,
            names,
        ));
        if meta.is_dir() && level < depth {
            // A subdirectory the user cannot read, or one that vanished, is listed but not
            // descended into.
            if let Ok(sub) = read_names(&path) {
                stack.push(Frame {
                    dir: path,
                    reported,
                    level: level + 1,
                    names: sub,
                });
            }
        }
    }
    Ok(out)
}

fn read_names(dir: &Path) -> std::io::Result<VecDeque<std::ffi::OsString>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names.into())
}
