//! The accounts every Wrenn guest has: `root`, and `user` (uid and gid 1000, home
//! `/home/user`), which envd runs processes as by default. Lines are appended to the image's
//! `/etc/passwd`, `/etc/group` (and `/etc/shadow`, `/etc/gshadow` when it has them) only for
//! the names missing there; a line the image has is never rewritten.
//!
//! An image whose uid 1000 already has another name (`ubuntu`, `node`) gets `user` as a second
//! name for it: the kernel only knows numbers, so both see the same files.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::finalize::FinalizeError;

/// `user`'s uid and gid.
pub(super) const USER_ID: u32 = 1000;
pub(super) const USER_HOME: &str = "/home/user";

/// `/etc/passwd` lines, for a login shell `shell`.
pub(super) fn passwd_lines(shell: &str) -> Vec<String> {
    vec![
        format!("root:x:0:0:root:/root:{shell}"),
        format!("user:x:{USER_ID}:{USER_ID}:user:{USER_HOME}:{shell}"),
    ]
}

pub(super) fn group_lines() -> Vec<String> {
    vec!["root:x:0:".into(), format!("user:x:{USER_ID}:")]
}

/// Locked (`!`): `user` has no password; envd starts its processes without a login.
pub(super) fn shadow_lines() -> Vec<String> {
    vec!["user:!::0:99999:7:::".into()]
}

pub(super) fn gshadow_lines() -> Vec<String> {
    vec!["user:!::".into()]
}

/// `/bin/bash` when the image has it, else `/bin/sh`.
pub(super) fn login_shell() -> &'static str {
    if Path::new("/bin/bash").is_file() {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

/// What to append to a file holding `existing` so it has a line for each name in `wanted`
/// (a line's name is its first `:` field); `None` when it has them all.
pub(super) fn to_append(existing: &str, wanted: &[String]) -> Option<String> {
    let names: HashSet<&str> = existing
        .lines()
        .filter_map(|line| line.split(':').next())
        .map(str::trim)
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|line| !names.contains(line.split(':').next().unwrap_or_default()))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        text.push('\n');
    }
    for line in missing {
        text.push_str(line);
        text.push('\n');
    }
    Some(text)
}

/// Appends the missing `wanted` lines to `path`. A missing file is created with `create_mode`,
/// or, when that is `None` (shadow files), left missing. Returns the names added.
pub(super) fn ensure_lines(
    path: &str,
    wanted: &[String],
    create_mode: Option<u32>,
) -> Result<Vec<String>, FinalizeError> {
    let err = |what| move |source| FinalizeError::io(what, path, source);
    let existing = match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create_mode.is_some() => String::new(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err("read")(e)),
    };
    let Some(text) = to_append(&existing, wanted) else {
        return Ok(Vec::new());
    };
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(create_mode.unwrap_or(0o600))
        .open(path)
        .map_err(err("open"))?;
    file.write_all(text.as_bytes()).map_err(err("append to"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|name| !name.is_empty())
        .map(String::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_only_missing_names() {
        let wanted = passwd_lines("/bin/sh");
        let existing = "root:x:0:0:root:/root:/bin/ash\nnobody:x:65534:65534::/:/sbin/nologin";
        assert_eq!(
            to_append(existing, &wanted).unwrap(),
            "\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
        );
        assert_eq!(
            to_append("", &group_lines()).unwrap(),
            "root:x:0:\nuser:x:1000:\n"
        );
        let complete = format!("{}\n{}\n", wanted[0], wanted[1]);
        assert_eq!(to_append(&complete, &wanted), None);
        // Names match whole fields: `username` is not `user`.
        assert!(to_append("root:x:0:\nusername:x:1001:\n", &group_lines()).is_some());
    }

    #[test]
    fn ensure_lines_creates_appends_and_leaves_shadow_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let passwd = tmp.path().join("passwd");
        let passwd = passwd.to_str().unwrap();
        let added = ensure_lines(passwd, &passwd_lines("/bin/sh"), Some(0o644)).unwrap();
        assert_eq!(added, ["root", "user"]);
        assert!(
            ensure_lines(passwd, &passwd_lines("/bin/sh"), Some(0o644))
                .unwrap()
                .is_empty()
        );
        assert_eq!(fs::read_to_string(passwd).unwrap().lines().count(), 2);
        let shadow = tmp.path().join("shadow");
        let shadow = shadow.to_str().unwrap();
        assert!(
            ensure_lines(shadow, &shadow_lines(), None)
                .unwrap()
                .is_empty()
        );
        assert!(!Path::new(shadow).exists());
    }
}
