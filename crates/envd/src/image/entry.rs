//! Creating one archive entry on disk: files, directories, symlinks, hard links, devices and
//! FIFOs, with the header's owner, mode (setuid, setgid and sticky kept) and mtime.
//!
//! This does not use the tar crate's `Entry::unpack`: it writes devices and FIFOs as regular
//! files, cannot put a non-directory where a directory is (or a directory where a file is),
//! fails on a hard link over an existing file, and does not set directory mtimes. The
//! process runs chrooted into the image, so paths here are the image's own.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Why one entry could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("bad header: {0}")]
    Header(&'static str),
    #[error("unexpected end of archive: {missing} of the file's {size} bytes missing")]
    Truncated { size: u64, missing: u64 },
}

/// Maps an I/O error to "what we were doing: the error".
pub(super) fn io(what: &'static str) -> impl FnOnce(io::Error) -> EntryError {
    move |source| EntryError::Io { what, source }
}

fn os(what: &'static str) -> impl FnOnce(nix::Error) -> EntryError {
    move |errno| EntryError::Io {
        what,
        source: errno.into(),
    }
}

/// What an entry creates.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Node {
    File,
    Dir,
    Symlink(PathBuf),
    /// The target, as the archive names it (relative to the image's root).
    HardLink(Vec<u8>),
    Device {
        kind: SFlag,
        dev: libc::dev_t,
    },
    Fifo,
    /// Archive bookkeeping (PAX global headers) that creates nothing.
    Nothing,
}

impl Node {
    pub(super) fn of(header: &tar::Header, link: Option<Vec<u8>>) -> Result<Node, EntryError> {
        use tar::EntryType as T;
        let kind = header.entry_type();
        Ok(match kind {
            T::Directory => Node::Dir,
            T::Symlink => match link {
                Some(target) if !target.is_empty() => {
                    Node::Symlink(PathBuf::from(std::ffi::OsStr::from_bytes(&target)))
                }
                _ => return Err(EntryError::Header("symlink without a target")),
            },
            T::Link => match link {
                Some(target) if !target.is_empty() => Node::HardLink(target),
                _ => return Err(EntryError::Header("hard link without a target")),
            },
            T::Char | T::Block => {
                let major = header.device_major().ok().flatten();
                let minor = header.device_minor().ok().flatten();
                let (Some(major), Some(minor)) = (major, minor) else {
                    return Err(EntryError::Header("device without device numbers"));
                };
                let kind = if kind == T::Char {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                Node::Device {
                    kind,
                    dev: nix::sys::stat::makedev(major.into(), minor.into()),
                }
            }
            T::Fifo => Node::Fifo,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => Node::Nothing,
            // POSIX: an unknown type flag is a regular file (so are contiguous and sparse ones).
            _ => Node::File,
        })
    }
}

/// Owner, mode and mtime from a header (and its PAX `mtime`, which has sub-second precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Permission bits with setuid, setgid and sticky.
    pub(super) mode: u32,
    pub(super) mtime: TimeSpec,
}

impl Meta {
    pub(super) fn of(
        header: &tar::Header,
        pax_mtime: Option<TimeSpec>,
    ) -> Result<Meta, EntryError> {
        let id = |v: io::Result<u64>, what| {
            v.ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or(EntryError::Header(what))
        };
        let mtime = match pax_mtime {
            Some(t) => t,
            None => header
                .mtime()
                .ok()
                .and_then(|t| i64::try_from(t).ok())
                .map(|t| TimeSpec::new(t, 0))
                .ok_or(EntryError::Header("bad mtime"))?,
        };
        Ok(Meta {
            uid: id(header.uid(), "bad uid")?,
            gid: id(header.gid(), "bad gid")?,
            mode: header.mode().map_err(|_| EntryError::Header("bad mode"))? & 0o7777,
            mtime,
        })
    }
}

/// What an entry's PAX records add that the tar crate does not apply itself (it applies
/// `path`, `linkpath`, `size`, `uid` and `gid`).
#[derive(Debug, Default)]
pub(super) struct Pax {
    pub(super) mtime: Option<TimeSpec>,
    /// `SCHILY.xattr.*`: how tar and buildkit carry extended attributes, e.g.
    /// `security.capability` on `ping`.
    pub(super) xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Pax {
    pub(super) fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Pax {
        const XATTR: &[u8] = b"SCHILY.xattr.";
        let mut pax = Pax::default();
        let Ok(Some(records)) = entry.pax_extensions() else {
            return pax;
        };
        for record in records.filter_map(Result::ok) {
            let key = record.key_bytes();
            if key == b"mtime" {
                pax.mtime = parse_pax_time(record.value_bytes());
            } else if let Some(name) = key.strip_prefix(XATTR) {
                let name = std::ffi::OsStr::from_bytes(name).to_os_string();
                pax.xattrs.push((name, record.value_bytes().to_vec()));
            }
        }
        pax
    }
}

/// A PAX time, `[-]seconds[.fraction]`; `None` if malformed.
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    // Nanoseconds: the first nine digits, right-padded.
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: i64 = digits.parse().ok()?;
    Some(match (negative, nanos) {
        (false, _) => TimeSpec::new(secs, nanos),
        (true, 0) => TimeSpec::new(-secs, 0),
        (true, _) => TimeSpec::new(-secs - 1, 1_000_000_000 - nanos),
    })
}

/// Makes room at `dst` for a new entry: a directory onto a directory keeps it (true), anything
/// else removes what is there (a directory with all it holds, a symlink itself, never its
/// target).
pub(super) fn make_room(dst: &Path, is_dir: bool) -> Result<bool, EntryError> {
    let existing = match fs::symlink_metadata(dst) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("inspect the existing path")(e)),
    };
    if existing.is_dir() {
        if is_dir {
            return Ok(true);
        }
        fs::remove_dir_all(dst).map_err(io("remove the directory in the way"))?;
    } else {
        fs::remove_file(dst).map_err(io("remove the file in the way"))?;
    }
    Ok(false)
}

/// Writes a regular file of `size` bytes from `data`; `buf` is the copy buffer.
pub(super) fn write_file(
    data: &mut impl Read,
    size: u64,
    dst: &Path,
    meta: &Meta,
    buf: &mut [u8],
) -> Result<(), EntryError> {
    // O_EXCL and O_NOFOLLOW: `make_room` cleared the path; never write through a symlink.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .map_err(io("create the file"))?;
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match data.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(EntryError::Truncated {
                    size,
                    missing: left,
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("read the archive")(e)),
        };
        file.write_all(&buf[..n]).map_err(io("write the file"))?;
        left -= n as u64;
    }
    // Owner before mode: chown clears setuid and setgid.
    std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(io("chown"))?;
    file.set_permissions(fs::Permissions::from_mode(meta.mode))
        .map_err(io("chmod"))?;
    Ok(())
}

/// Creates the directory (unless `existed`) and gives it the header's owner and mode. Its
/// mtime is set once the layer is done: creating its children would change it again.
pub(super) fn make_dir(dst: &Path, meta: &Meta, existed: bool) -> Result<(), EntryError> {
    if !existed {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dst)
            .map_err(io("create the directory"))?;
    }
    set_owner_and_mode(dst, meta)
}

pub(super) fn make_symlink(target: &Path, dst: &Path, meta: &Meta) -> Result<(), EntryError> {
    // Stored as the archive has it: absolute targets resolve inside the image once it is `/`.
    std::os::unix::fs::symlink(target, dst).map_err(io("create the symlink"))?;
    // A symlink's mode means nothing on Linux; its owner does (lchown: the link itself).
    std::os::unix::fs::lchown(dst, Some(meta.uid), Some(meta.gid)).map_err(io("chown"))?;
    set_mtime(dst, meta.mtime)
}

/// Links `dst` to `target` (an absolute path inside the image). A hard link is the target's
/// inode, so its owner, mode and mtime are the target's.
pub(super) fn make_hard_link(target: &Path, dst: &Path) -> Result<(), EntryError> {
    // std's hard_link is linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the
    // symlink itself, as tar does.
    fs::hard_link(target, dst).map_err(io("create the hard link"))
}

pub(super) fn make_node(
    dst: &Path,
    kind: SFlag,
    dev: libc::dev_t,
    meta: &Meta,
) -> Result<(), EntryError> {
    let perm = Mode::from_bits_truncate(meta.mode & 0o777);
    nix::sys::stat::mknod(dst, kind, perm, dev).map_err(os("mknod"))?;
    set_owner_and_mode(dst, meta)?;
    set_mtime(dst, meta.mtime)
}

/// lchown then chmod (chown clears setuid and setgid). `dst` was just created or checked, and
/// is not a symlink, so chmod, which follows symlinks, changes `dst` itself.
pub(super) fn set_owner_and_mode(dst: &Path, meta: &Meta) -> Result<(), EntryError> {
    std::os::unix::fs::lchown(dst, Some(meta.uid), Some(meta.gid)).map_err(io("chown"))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode)).map_err(io("chmod"))
}

/// Sets atime and mtime of `dst` itself (a symlink's own, not its target's).
pub(super) fn set_mtime(dst: &Path, mtime: TimeSpec) -> Result<(), EntryError> {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &mtime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(os("set the mtime"))
}

/// Sets extended attributes on `dst` (not following a symlink), after chown, which would clear
/// `security.capability`. Best effort: the disk may not take a namespace (`trusted.*` and
/// `security.selinux` depend on the kernel), and a missing attribute rarely stops an image
/// from running, so a failure is counted, not fatal. Returns how many were not set.
pub(super) fn set_xattrs(dst: &Path, xattrs: &[(OsString, Vec<u8>)]) -> u64 {
    let failed = xattrs
        .iter()
        .filter(|(name, value)| xattr::set(dst, name, value).is_err())
        .count();
    failed as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mode(0o104755);
        h.set_mtime(1_600_000_000);
        h
    }

    #[test]
    fn meta_keeps_special_bits_and_drops_the_type_bits() {
        let meta = Meta::of(&header(tar::EntryType::Regular), None).unwrap();
        assert_eq!(
            meta,
            Meta {
                uid: 1000,
                gid: 100,
                mode: 0o4755,
                mtime: TimeSpec::new(1_600_000_000, 0)
            }
        );
        let pax = Some(TimeSpec::new(5, 6));
        assert_eq!(
            Meta::of(&header(tar::EntryType::Regular), pax)
                .unwrap()
                .mtime,
            TimeSpec::new(5, 6)
        );
    }

    #[test]
    fn pax_times() {
        let t = |v: &str| parse_pax_time(v.as_bytes()).map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(
            t("1796287584.807070017"),
            Some((1_796_287_584, 807_070_017))
        );
        assert_eq!(t("12"), Some((12, 0)));
        assert_eq!(t("12.5"), Some((12, 500_000_000)));
        assert_eq!(t("1.0000000019"), Some((1, 1)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t(""), None);
        assert_eq!(t("x.1"), None);
        assert_eq!(t("1.x"), None);
    }

    #[test]
    fn node_kinds() {
        use tar::EntryType as T;
        assert_eq!(Node::of(&header(T::Regular), None).unwrap(), Node::File);
        assert_eq!(Node::of(&header(T::Directory), None).unwrap(), Node::Dir);
        assert_eq!(Node::of(&header(T::Fifo), None).unwrap(), Node::Fifo);
        assert_eq!(
            Node::of(&header(T::Symlink), Some(b"/usr/bin".to_vec())).unwrap(),
            Node::Symlink("/usr/bin".into())
        );
        assert!(Node::of(&header(T::Symlink), Some(Vec::new())).is_err());
        assert!(Node::of(&header(T::Link), None).is_err());
        let mut dev = header(T::Char);
        dev.set_device_major(1).unwrap();
        dev.set_device_minor(3).unwrap();
        assert_eq!(
            Node::of(&dev, None).unwrap(),
            Node::Device {
                kind: SFlag::S_IFCHR,
                dev: nix::sys::stat::makedev(1, 3)
            }
        );
        assert_eq!(
            Node::of(&header(T::XGlobalHeader), None).unwrap(),
            Node::Nothing
        );
    }

    #[test]
    fn make_room_replaces_all_but_a_directory_onto_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dir");
        fs::create_dir_all(dir.join("child")).unwrap();
        assert!(make_room(&dir, true).unwrap());
        assert!(dir.join("child").exists());
        assert!(!make_room(&dir, false).unwrap());
        assert!(!dir.exists());
        // A symlink goes, its target stays.
        let target = tmp.path().join("target");
        fs::write(&target, "t").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(!make_room(&link, false).unwrap());
        assert!(fs::symlink_metadata(&link).is_err() && target.exists());
        assert!(!make_room(&tmp.path().join("none"), true).unwrap());
    }

    #[test]
    fn write_file_reports_a_short_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let meta = Meta::of(&header(tar::EntryType::Regular), None).unwrap();
        let mut buf = [0; 4];
        let err =
            write_file(&mut &b"abc"[..], 10, &tmp.path().join("f"), &meta, &mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                EntryError::Truncated {
                    size: 10,
                    missing: 7
                }
            ),
            "{err:?}"
        );
    }
}
