//! Directory watching over inotify, shared by `WatchDir` (a stream) and the
//! `CreateWatcher`/`GetWatcherEvents`/`RemoveWatcher` trio (a buffer).
//!
//! One inotify instance per watcher; dropping the [`DirWatcher`] closes it and with it every
//! kernel watch. Event mapping follows upstream envd (fsnotify): CREATE for `IN_CREATE` and
//! `IN_MOVED_TO`, RENAME for `IN_MOVED_FROM`/`IN_MOVE_SELF`, CHMOD for `IN_ATTRIB`, WRITE for
//! `IN_MODIFY`, REMOVE for `IN_DELETE`/`IN_DELETE_SELF`, in that order when one inotify event
//! carries several. Names are relative to the watched directory.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use wrenn_proto::filesystem::{EventType, FilesystemEvent};

use super::FsError;
use super::entry::entry_info;
use crate::creds::{Creds, run_as};
use crate::user::{Names, User};

/// Filesystem magic numbers (linux/magic.h) of network and FUSE filesystems, on which inotify
/// misses changes made elsewhere.
const NETWORK_MAGICS: [u32; 5] = [
    0x6969,      // NFS
    0xFF53_4D42, // CIFS
    0x517B,      // SMB
    0xFE53_4D42, // SMB2
    0x6573_5546, // FUSE
];

/// Bytes of kernel events read at once; one event is at most 16 + NAME_MAX + 1 bytes.
const READ_BUFFER: usize = 16 * 1024;

/// What a watch asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchOptions {
    pub(crate) recursive: bool,
    pub(crate) include_entry: bool,
    pub(crate) allow_network_mounts: bool,
}

fn dir_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::ONLYDIR
}

type Dirs = HashMap<i32, (WatchDescriptor, PathBuf)>;

/// What [`add_tree`] did: the watches it added (with their directories relative to the root)
/// and every entry it saw.
type Tree = (Vec<(WatchDescriptor, PathBuf)>, Vec<PathBuf>);

/// A live watch of one directory (and, if recursive, everything below it).
pub(crate) struct DirWatcher {
    root: PathBuf,
    options: WatchOptions,
    creds: Creds,
    names: Names,
    stream: EventStream<Vec<u8>>,
    watches: Watches,
    /// Watch descriptor id -> the descriptor and its directory relative to `root` ("" for the
    /// root).
    dirs: Dirs,
    root_wd: i32,
    pending: VecDeque<FilesystemEvent>,
}

impl DirWatcher {
    /// Checks `root` (exists, is a directory, not a network mount unless allowed) and starts
    /// watching it as `user`.
    pub(crate) async fn start(
        root: PathBuf,
        options: WatchOptions,
        user: &User,
    ) -> Result<DirWatcher, FsError> {
        let creds = Creds::of(user);
        let setup_root = root.clone();
        let (inotify, dirs, root_wd) = run_as(user, move || setup(&setup_root, options)).await??;
        // The stream registers with the tokio reactor, so it is made here, not on the
        // blocking thread.
        let stream = inotify
            .into_event_stream(vec![0u8; READ_BUFFER])
            .map_err(|e| FsError::Internal(format!("inotify stream: {e}")))?;
        let watches = stream.watches();
        Ok(DirWatcher {
            root,
            options,
            creds,
            names: Names::load(),
            stream,
            watches,
            dirs,
            root_wd,
            pending: VecDeque::new(),
        })
    }

    /// The next event. An error is terminal: the watcher stops delivering after it.
    pub(crate) async fn next(&mut self) -> Result<FilesystemEvent, FsError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let event = match self.stream.next().await {
                Some(Ok(e)) => e,
                Some(Err(e)) => return Err(FsError::Internal(format!("read inotify events: {e}"))),
                None => return Err(FsError::Internal("inotify closed unexpectedly".into())),
            };
            self.handle(event.wd.get_watch_descriptor_id(), event.mask, event.name)
                .await?;
        }
    }

    async fn handle(
        &mut self,
        wd: i32,
        mask: EventMask,
        name: Option<OsString>,
    ) -> Result<(), FsError> {
        if mask.contains(EventMask::Q_OVERFLOW) {
            return Err(FsError::Overflow(
                "inotify event queue overflowed: events were lost; watch again".into(),
            ));
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&wd);
            return Ok(());
        }
        let Some((_, dir)) = self.dirs.get(&wd) else {
            // A watch we already dropped (moved-away subtree); its last events are stale.
            return Ok(());
        };
        let rel = match &name {
            Some(n) => dir.join(n),
            // Events about a watched subdirectory itself are also reported by its parent
            // under the subdirectory's name; only the root's own events are kept (as ".").
            None if wd == self.root_wd => PathBuf::from("."),
            None => return Ok(()),
        };

        let is_dir = mask.contains(EventMask::ISDIR);
        let mut new_dir_entries = Vec::new();
        if self.options.recursive && is_dir && name.is_some() {
            if mask.intersects(EventMask::MOVED_FROM | EventMask::DELETE) {
                self.forget_subtree(&rel);
            }
            if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                new_dir_entries = self.watch_subtree(&rel).await?;
            }
        }

        let kinds = [
            (EventMask::CREATE | EventMask::MOVED_TO, EventType::Create),
            (
                EventMask::MOVED_FROM | EventMask::MOVE_SELF,
                EventType::Rename,
            ),
            (EventMask::ATTRIB, EventType::Chmod),
            (EventMask::MODIFY, EventType::Write),
            (
                EventMask::DELETE | EventMask::DELETE_SELF,
                EventType::Remove,
            ),
        ];
        for (bits, kind) in kinds {
            if mask.intersects(bits) {
                let event = self.event(&rel, kind).await;
                self.pending.push_back(event);
            }
        }
        // What appeared inside a new directory before its watch existed.
        for entry_rel in new_dir_entries {
            let event = self.event(&entry_rel, EventType::Create).await;
            self.pending.push_back(event);
        }
        Ok(())
    }

    async fn event(&self, rel: &Path, kind: EventType) -> FilesystemEvent {
        let with_entry = self.options.include_entry
            && matches!(
                kind,
                EventType::Create | EventType::Write | EventType::Chmod
            );
        let entry = if with_entry {
            let full = if rel == Path::new(".") {
                self.root.clone()
            } else {
                self.root.join(rel)
            };
            let names = self.names.clone();
            let creds = self.creds.clone();
            tokio::task::spawn_blocking(move || {
                creds
                    .run(|| entry_info(&full, &full.to_string_lossy(), &names).ok())
                    .ok()
                    .flatten()
            })
            .await
            .ok()
            .flatten()
        } else {
            None
        };
        FilesystemEvent {
            name: rel.to_string_lossy().into_owned(),
            r#type: kind as i32,
            entry,
        }
    }

    /// Adds watches for the new directory `rel` and everything under it; returns the entries
    /// found inside it (relative to the root), which were created before the watch existed.
    async fn watch_subtree(&mut self, rel: &Path) -> Result<Vec<PathBuf>, FsError> {
        let watches = self.watches.clone();
        let root = self.root.clone();
        let rel = rel.to_path_buf();
        let (added, found) = tokio::task::spawn_blocking({
            let creds = self.creds.clone();
            move || creds.run(|| add_tree(watches, &root, &rel, true))
        })
        .await
        .map_err(|e| FsError::Internal(format!("filesystem worker failed: {e}")))???;
        self.dirs.extend(
            added
                .into_iter()
                .map(|(wd, rel)| (wd.get_watch_descriptor_id(), (wd, rel))),
        );
        Ok(found)
    }

    /// Drops the watches of `rel` and below: after a move their paths would be wrong.
    fn forget_subtree(&mut self, rel: &Path) {
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, (_, d))| d.starts_with(rel))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some((wd, _)) = self.dirs.remove(&id) {
                // The descriptor may already be gone (deleted directory); nothing to do then.
                let _ = self.watches.remove(wd);
            }
        }
    }
}

/// Validates the root and creates the inotify instance with its initial watches. Runs as the
/// user on a blocking thread.
fn setup(root: &Path, options: WatchOptions) -> Result<(Inotify, Dirs, i32), FsError> {
    let meta = std::fs::metadata(root).map_err(|e| FsError::io("stat", root, e))?;
    if !meta.is_dir() {
        return Err(FsError::NotADirectory(root.to_path_buf()));
    }
    if !options.allow_network_mounts && is_network_mount(root)? {
        return Err(FsError::NetworkMount(root.to_path_buf()));
    }
    let inotify = Inotify::init().map_err(|e| match e.raw_os_error() {
        Some(libc::EMFILE) => FsError::WatchLimit(
            "too many inotify instances (fs.inotify.max_user_instances); remove unused watchers"
                .into(),
        ),
        _ => FsError::Internal(format!("create inotify instance: {e}")),
    })?;
    let mut watches = inotify.watches();
    let root_wd = watches
        .add(root, dir_mask())
        .map_err(|e| add_watch_error(root, e))?;
    let root_id = root_wd.get_watch_descriptor_id();
    let mut dirs = Dirs::from([(root_id, (root_wd, PathBuf::new()))]);
    if options.recursive {
        let (added, _) = add_tree(watches, root, Path::new(""), false)?;
        dirs.extend(
            added
                .into_iter()
                .map(|(wd, rel)| (wd.get_watch_descriptor_id(), (wd, rel))),
        );
    }
    Ok((inotify, dirs, root_id))
}

/// Watches every directory under `root/rel` (not following symlinks), including `rel` itself
/// when `include_self`. Directories that vanish or that the user cannot read are skipped.
/// Returns the watches added and every entry seen (relative to `root`).
fn add_tree(
    mut watches: Watches,
    root: &Path,
    rel: &Path,
    include_self: bool,
) -> Result<Tree, FsError> {
    let mut added = Vec::new();
    let mut found = Vec::new();
    let mut todo = vec![(rel.to_path_buf(), include_self)];
    while let Some((dir_rel, add_self)) = todo.pop() {
        let dir = root.join(&dir_rel);
        if add_self {
            match watches.add(&dir, dir_mask() | WatchMask::DONT_FOLLOW) {
                Ok(wd) => added.push((wd, dir_rel.clone())),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    return Err(add_watch_error(&dir, e));
                }
                Err(_) => continue,
            }
        }
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            let child_rel = dir_rel.join(entry.file_name());
            // file_type() does not follow symlinks, so links to directories are not descended.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push((child_rel.clone(), true));
            }
            found.push(child_rel);
        }
    }
    Ok((added, found))
}

fn add_watch_error(path: &Path, e: std::io::Error) -> FsError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => FsError::WatchLimit(format!(
            "inotify watch limit reached (fs.inotify.max_user_watches) while watching '{}'",
            path.display()
        )),
        _ => FsError::io("watch", path, e),
    }
}

fn is_network_mount(path: &Path) -> Result<bool, FsError> {
    let fs = nix::sys::statfs::statfs(path)
        .map_err(|e| FsError::io("statfs", path, std::io::Error::from_raw_os_error(e as i32)))?;
    Ok(is_network_magic(fs.filesystem_type().0 as u32))
}

fn is_network_magic(magic: u32) -> bool {
    NETWORK_MAGICS.contains(&magic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_magics() {
        assert!(is_network_magic(0x6969));
        assert!(is_network_magic(0xFF53_4D42));
        assert!(is_network_magic(0x6573_5546));
        assert!(!is_network_magic(0xEF53)); // ext4
        assert!(!is_network_magic(0x0102_1994)); // tmpfs
    }
}
