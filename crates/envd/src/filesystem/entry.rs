//! `EntryInfo`: what envd reports about one path.
//!
//! Built from `lstat` as upstream envd does; for a symlink the type and permission bits are the
//! target's, `isSymlink` is set and `symlinkTarget` is the fully resolved target.

use std::ffi::CString;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use wrenn_proto::Timestamp;
use wrenn_proto::filesystem::{EntryInfo, FileType};

use crate::user::Names;

/// The xattr namespace whose entries are reported as `metadata` (prefix stripped).
const METADATA_PREFIX: &[u8] = b"user.e2b.";

/// The entry for `path` (not followed), reported under the name `reported_path`.
pub(crate) fn entry_info(
    path: &Path,
    reported_path: &str,
    names: &Names,
) -> std::io::Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok(entry_from_metadata(path, reported_path, &meta, names))
}

/// The entry for `path` whose `lstat` is `meta`.
pub(crate) fn entry_from_metadata(
    path: &Path,
    reported_path: &str,
    meta: &Metadata,
    names: &Names,
) -> EntryInfo {
    let is_symlink = meta.file_type().is_symlink();
    let (file_type, perm, symlink_target) = if is_symlink {
        // The link path itself when the target cannot be resolved (missing, loop, no access).
        let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        match std::fs::metadata(&target) {
            Ok(t) => (file_type(&t), t.mode() & 0o777, Some(target)),
            Err(_) => (FileType::Unspecified, 0, Some(target)),
        }
    } else {
        (file_type(meta), meta.mode() & 0o777, None)
    };
    let modified_time = (meta.mtime() != 0 || meta.mtime_nsec() != 0).then(|| Timestamp {
        seconds: meta.mtime(),
        nanos: meta.mtime_nsec() as i32,
    });
    EntryInfo {
        name: base_name(path),
        r#type: file_type as i32,
        path: reported_path.to_owned(),
        size: meta.size() as i64,
        mode: perm,
        permissions: mode_string(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_time,
        symlink_target: symlink_target.map(|t| t.to_string_lossy().into_owned()),
        metadata: read_metadata(path),
        is_symlink,
    }
}

fn file_type(meta: &Metadata) -> FileType {
    let t = meta.file_type();
    if t.is_file() {
        FileType::File
    } else if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Unspecified
    }
}

/// The last path component; `/` for the root, as Go's `filepath.Base`.
pub(crate) fn base_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned())
}

/// A `st_mode` rendered like Go's `os.FileMode.String()`: type letters (or `-`) then `rwx`
/// triplets. Go shows setuid/setgid/sticky as type letters (`u`, `g`, `t`), not in the triplets.
pub(crate) fn mode_string(st_mode: u32) -> String {
    let fmt = st_mode & libc::S_IFMT;
    let mut s = String::with_capacity(12);
    // Go's order: "dalTLDpSugct?"; only the ones a Linux stat can produce are checked.
    if fmt == libc::S_IFDIR {
        s.push('d');
    }
    if fmt == libc::S_IFLNK {
        s.push('L');
    }
    if fmt == libc::S_IFBLK || fmt == libc::S_IFCHR {
        s.push('D');
    }
    if fmt == libc::S_IFIFO {
        s.push('p');
    }
    if fmt == libc::S_IFSOCK {
        s.push('S');
    }
    if st_mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if st_mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if fmt == libc::S_IFCHR {
        s.push('c');
    }
    if st_mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    let known = [
        libc::S_IFREG,
        libc::S_IFDIR,
        libc::S_IFLNK,
        libc::S_IFBLK,
        libc::S_IFCHR,
        libc::S_IFIFO,
        libc::S_IFSOCK,
    ];
    if !known.contains(&fmt) {
        s.push('?');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if st_mode & (1 << (8 - i)) != 0 {
            c
        } else {
            '-'
        });
    }
    s
}

/// `user.e2b.*` xattrs of `path` (symlinks followed, as upstream). Best effort: a filesystem
/// without xattrs, a file the user may not read, or a non-UTF-8 entry yields no metadata
/// rather than failing the whole listing.
fn read_metadata(path: &Path) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let Some(list) = xattr_call(|buf, len| {
        // SAFETY: `cpath` is a valid C string; `buf`/`len` describe a writable buffer (or are
        // null/0 to ask for the size).
        unsafe { libc::listxattr(cpath.as_ptr(), buf.cast(), len) }
    }) else {
        return out;
    };
    for name in list
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(METADATA_PREFIX))
    {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let Some(value) = xattr_call(|buf, len| {
            // SAFETY: both strings are valid C strings; `buf`/`len` as above.
            unsafe { libc::getxattr(cpath.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        }) else {
            continue;
        };
        let key = &name[METADATA_PREFIX.len()..];
        if let (Ok(k), Ok(v)) = (std::str::from_utf8(key), String::from_utf8(value)) {
            out.insert(k.to_owned(), v);
        }
    }
    out
}

/// Calls a size-then-fill xattr function, retrying if the value grew in between.
fn xattr_call(mut call: impl FnMut(*mut u8, usize) -> isize) -> Option<Vec<u8>> {
    for _ in 0..4 {
        let size = call(std::ptr::null_mut(), 0);
        if size <= 0 {
            return if size == 0 { Some(Vec::new()) } else { None };
        }
        let mut buf = vec![0u8; size as usize];
        let n = call(buf.as_mut_ptr(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings_match_go() {
        assert_eq!(mode_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(mode_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(
            mode_string(libc::S_IFDIR | libc::S_ISVTX | 0o777),
            "dtrwxrwxrwx"
        );
        assert_eq!(
            mode_string(libc::S_IFREG | libc::S_ISUID | 0o755),
            "urwxr-xr-x"
        );
        assert_eq!(mode_string(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
        assert_eq!(mode_string(libc::S_IFIFO | 0o600), "prw-------");
        assert_eq!(mode_string(libc::S_IFSOCK | 0o755), "Srwxr-xr-x");
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name(Path::new("/")), "/");
        assert_eq!(base_name(Path::new("/a/b.txt")), "b.txt");
    }
}
