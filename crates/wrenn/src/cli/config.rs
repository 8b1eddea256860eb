//! Where the CLI finds Wrenn: flags, then the E2B SDK environment variables (clap reads those),
//! then the API key file `wrenn up` writes.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::ConnArgs;

/// What `wrenn up` listens on unless told otherwise.
const DEFAULT_API_URL: &str = "http://127.0.0.1:3000";
/// `wrenn up`'s default state directory; the API key is `<dir>/api-key`.
const DEFAULT_STATE_DIR: &str = "/var/lib/wrenn";

/// The resolved connection settings.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) api_url: String,
    pub(super) sandbox_url: String,
    pub(super) api_key: Option<String>,
    pub(super) json: bool,
}

impl Config {
    pub(super) fn resolve(args: &ConnArgs) -> anyhow::Result<Config> {
        let api_url = nonempty(args.api_url.as_deref())
            .unwrap_or(DEFAULT_API_URL)
            .trim_end_matches('/')
            .to_owned();
        let sandbox_url = nonempty(args.sandbox_url.as_deref())
            .map(|u| u.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| api_url.clone());
        let api_key = match nonempty(args.api_key.as_deref()) {
            Some(k) => Some(k.to_owned()),
            None => read_key_file(&key_file())?,
        };
        Ok(Config {
            api_url,
            sandbox_url,
            api_key,
            json: args.json,
        })
    }
}

fn nonempty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// `$WRENN_STATE_DIR/api-key`, or the default state directory's.
fn key_file() -> PathBuf {
    let dir = std::env::var_os("WRENN_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    dir.join("api-key")
}

/// The key in `path`; `None` when there is no such file (the API then answers 401, which says
/// what is missing). A file we cannot read is an error: silently ignoring it would hide why.
fn read_key_file(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(nonempty(Some(&s)).map(str::to_owned)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read the API key from {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_contents_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api-key");
        assert_eq!(read_key_file(&p).unwrap(), None);
        std::fs::write(&p, "wrenn_abc\n").unwrap();
        assert_eq!(read_key_file(&p).unwrap().as_deref(), Some("wrenn_abc"));
        std::fs::write(&p, "  \n").unwrap();
        assert_eq!(read_key_file(&p).unwrap(), None);
    }
}
