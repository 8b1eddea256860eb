//! File metadata for `POST /files`: `X-Metadata-<key>` request headers stored as the
//! extended attributes `user.e2b.<key>`.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;

use http::HeaderMap;

use crate::error::EnvdError;

const HEADER_PREFIX: &str = "x-metadata-";
pub(crate) const XATTR_PREFIX: &str = "user.e2b.";
/// Linux limits an attribute name to 255 bytes; the key gets what the prefix leaves.
const MAX_KEY: usize = 255 - XATTR_PREFIX.len();
/// The sum of prefix, key and value over all entries (what fits one ext4 xattr block).
const MAX_TOTAL: usize = 4096;

/// The metadata a request carries, validated. Keys are lowercase (header names are).
pub(crate) fn from_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, EnvdError> {
    let mut out = BTreeMap::new();
    let mut total = 0;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if key.is_empty() || key.len() > MAX_KEY || !key.bytes().all(printable) {
            return Err(EnvdError::InvalidArgument(format!(
                "invalid metadata key '{key}': 1 to {MAX_KEY} printable ASCII characters"
            )));
        }
        if !value.as_bytes().iter().copied().all(printable) {
            return Err(EnvdError::InvalidArgument(format!(
                "invalid metadata value for '{key}': printable ASCII only"
            )));
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        total += XATTR_PREFIX.len() + key.len() + value.len();
        out.insert(key, value);
    }
    if total > MAX_TOTAL {
        return Err(EnvdError::InvalidArgument(format!(
            "metadata too large: {total} bytes, at most {MAX_TOTAL}"
        )));
    }
    Ok(out)
}

fn printable(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// Makes `file`'s `user.e2b.*` attributes exactly `metadata`.
pub(crate) fn replace(file: &std::fs::File, metadata: &BTreeMap<String, String>) -> io::Result<()> {
    let existing = match list(file) {
        Ok(names) => names,
        // Nothing can be stored here, so there is nothing to clear either.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) && metadata.is_empty() => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in existing {
        let Ok(text) = name.to_str() else { continue };
        let Some(key) = text.strip_prefix(XATTR_PREFIX) else {
            continue;
        };
        if metadata.contains_key(key) {
            continue;
        }
        // SAFETY: `name` is a NUL-terminated string and the fd is open for the call.
        let rc = unsafe { libc::fremovexattr(file.as_raw_fd(), name.as_ptr()) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(e);
            }
        }
    }
    for (key, value) in metadata {
        let name = CString::new(format!("{XATTR_PREFIX}{key}")).map_err(io::Error::other)?;
        // SAFETY: `name` is NUL-terminated, `value` is valid for `value.len()` bytes, and the fd
        // is open for the call.
        let rc = unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The names of all extended attributes of `file`.
fn list(file: &std::fs::File) -> io::Result<Vec<CString>> {
    let fd = file.as_raw_fd();
    loop {
        // SAFETY: a null buffer with size 0 asks only for the needed size.
        let size = unsafe { libc::flistxattr(fd, std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let got = unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            // The list grew between the two calls: ask again.
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split_inclusive(|b| *b == 0)
            .filter_map(|n| CStr::from_bytes_with_nul(n).ok().map(CStr::to_owned))
            .collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn validates_metadata_headers() {
        let m = from_headers(&headers(&[
            ("X-Metadata-Owner", "me"),
            ("content-type", "x"),
        ]))
        .unwrap();
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            vec![("owner".to_owned(), "me".to_owned())]
        );
        assert!(
            from_headers(&headers(&[(
                &format!("x-metadata-{}", "k".repeat(247)),
                "v"
            )]))
            .is_err()
        );
        assert!(
            from_headers(&headers(&[(
                &format!("x-metadata-{}", "k".repeat(246)),
                "v"
            )]))
            .is_ok()
        );
        assert!(from_headers(&headers(&[("x-metadata-a", &"v".repeat(4100))])).is_err());
        let mut h = HeaderMap::new();
        h.insert(
            "x-metadata-a",
            http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert!(from_headers(&h).is_err());
    }

    #[test]
    fn replaces_the_set() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut m = BTreeMap::new();
        m.insert("a".to_owned(), "1".to_owned());
        m.insert("b".to_owned(), "2".to_owned());
        if replace(f.as_file(), &m).is_err() {
            return; // No user xattrs on this filesystem.
        }
        m.remove("a");
        replace(f.as_file(), &m).unwrap();
        let names: Vec<_> = list(f.as_file())
            .unwrap()
            .into_iter()
            .map(|n| n.into_string().unwrap())
            .collect();
        assert!(names.contains(&"user.e2b.b".to_owned()));
        assert!(!names.contains(&"user.e2b.a".to_owned()));
    }
}
