//! OS users and groups, read from `/etc/passwd` and `/etc/group`.
//!
//! envd is a static glibc binary, where NSS lookups (`getpwnam`) may not work; the guest's
//! accounts live in these files, so we read them directly.

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine;
use http::HeaderMap;

use crate::error::EnvdError;

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// An OS account a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Supplementary groups, including the primary one.
    pub groups: Vec<u32>,
}

impl User {
    /// Looks `name` up; an unknown name is `Unauthenticated`, as upstream envd answers.
    pub fn lookup(name: &str) -> Result<User, EnvdError> {
        let passwd = std::fs::read_to_string(PASSWD)
            .map_err(|e| EnvdError::Internal(format!("read {PASSWD}: {e}")))?;
        let group = std::fs::read_to_string(GROUP).unwrap_or_default();
        find_user(&passwd, &group, name)
            .ok_or_else(|| EnvdError::Unauthenticated(format!("invalid username: '{name}'")))
    }
}

fn find_user(passwd: &str, group: &str, name: &str) -> Option<User> {
    let line = passwd.lines().find(|l| l.split(':').next() == Some(name))?;
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 {
        return None;
    }
    let uid = f[2].parse().ok()?;
    let gid = f[3].parse().ok()?;
    let mut groups = vec![gid];
    for g in group.lines() {
        let gf: Vec<&str> = g.split(':').collect();
        if gf.len() >= 4
            && gf[3].split(',').any(|m| m == name)
            && let Ok(id) = gf[2].parse::<u32>()
            && !groups.contains(&id)
        {
            groups.push(id);
        }
    }
    Some(User {
        name: name.to_owned(),
        uid,
        gid,
        home: PathBuf::from(if f[5].is_empty() { "/" } else { f[5] }),
        shell: f[6].to_owned(),
        groups,
    })
}

/// uid/gid to name tables, loaded once per request that reports owners (ListDir, Stat).
#[derive(Debug, Default, Clone)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    pub fn load() -> Self {
        let parse = |path: &str| -> HashMap<u32, String> {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, name.to_owned()))
                })
                .collect()
        };
        Names {
            users: parse(PASSWD),
            groups: parse(GROUP),
        }
    }

    /// The user name, or the number as text when unknown (as upstream does).
    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

/// The user named by `Authorization: Basic base64("<user>:")`, if the header is present.
pub fn basic_auth_user(headers: &HeaderMap) -> Result<Option<String>, EnvdError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || {
        EnvdError::Unauthenticated(
            "invalid Authorization header: expected Basic base64(\"user:\")".into(),
        )
    };
    let value = value.to_str().map_err(|_| bad())?;
    let encoded = value.strip_prefix("Basic ").ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let name = decoded.split(':').next().unwrap_or("");
    Ok(if name.is_empty() {
        None
    } else {
        Some(name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";
    const GR: &str = "root:x:0:\nuser:x:1000:\nsudo:x:27:user,other\n";

    #[test]
    fn finds_users_and_their_groups() {
        let u = find_user(PW, GR, "user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.home, PathBuf::from("/home/user"));
        assert_eq!(u.groups, vec![1000, 27]);
        assert!(find_user(PW, GR, "nobody-here").is_none());
        assert!(find_user(PW, GR, "use").is_none());
    }

    #[test]
    fn parses_basic_auth() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_auth_user(&h).unwrap(), None);
        h.insert(
            http::header::AUTHORIZATION,
            "Basic cm9vdDo=".parse().unwrap(),
        );
        assert_eq!(basic_auth_user(&h).unwrap().as_deref(), Some("root"));
        h.insert(http::header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(basic_auth_user(&h).is_err());
    }
}
