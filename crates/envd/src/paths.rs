//! Resolving request paths the way upstream envd does.
//!
//! Empty: the default workdir (or the home directory); `~` and `~/x`: under the user's home;
//! relative: joined to the user's home (not the workdir); absolute: kept. The result is
//! lexically cleaned (`.` and `..` removed) but symlinks are not resolved.

use std::path::{Component, Path, PathBuf};

use crate::error::EnvdError;
use crate::user::User;

pub fn resolve(
    path: &str,
    user: &User,
    default_workdir: Option<&Path>,
) -> Result<PathBuf, EnvdError> {
    if path.contains('\0') {
        return Err(EnvdError::InvalidArgument(
            "path contains a NUL byte".into(),
        ));
    }
    let joined = if path.is_empty() {
        default_workdir.map_or_else(|| user.home.clone(), Path::to_path_buf)
    } else if path == "~" {
        user.home.clone()
    } else if let Some(rest) = path.strip_prefix("~/") {
        user.home.join(rest)
    } else if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        user.home.join(path)
    };
    Ok(clean(&joined))
}

/// Lexical cleaning: drops `.`, applies `..` (never above `/`).
pub fn clean(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn resolves_like_upstream() {
        let u = user();
        let r = |p: &str, w: Option<&str>| resolve(p, &u, w.map(Path::new)).unwrap();
        assert_eq!(r("", None), PathBuf::from("/home/user"));
        assert_eq!(r("", Some("/work")), PathBuf::from("/work"));
        assert_eq!(r("~", None), PathBuf::from("/home/user"));
        assert_eq!(r("~/a/b", None), PathBuf::from("/home/user/a/b"));
        assert_eq!(
            r("rel.txt", Some("/work")),
            PathBuf::from("/home/user/rel.txt")
        );
        assert_eq!(r("/tmp/../etc/./x", None), PathBuf::from("/etc/x"));
        assert_eq!(r("/../../", None), PathBuf::from("/"));
        assert!(resolve("a\0b", &u, None).is_err());
    }
}
