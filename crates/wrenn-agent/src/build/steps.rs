//! A template build's steps as the E2B template builder sends them (`type`, `args`,
//! `filesHash`, `force`), what each means, and the cache keys of their layers.
//!
//! `ENV`, `WORKDIR` and `USER` change the context later steps run in (and the template's
//! defaults); `RUN` and `COPY` change the disk and end in a layer. A layer's key hashes its
//! parent's key, the step and the context it ran in, so a changed step (or context) changes
//! its key and every key after it.

use sha2::{Digest, Sha256};

/// Why a step is not one we can run.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// An instruction we do not know.
    #[error("step {index}: unknown instruction {kind:?}")]
    Unknown {
        /// Which step (from 1).
        index: usize,
        /// Its `type`.
        kind: String,
    },
    /// Arguments that do not fit the instruction.
    #[error("step {index} ({kind}): {reason}")]
    Args {
        /// Which step (from 1).
        index: usize,
        /// Its `type`.
        kind: String,
        /// What is wrong.
        reason: String,
    },
}

/// One step as it arrives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawStep {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR`, `USER` (case-insensitive).
    pub kind: String,
    /// The instruction's arguments.
    pub args: Vec<String>,
    /// For `COPY`: the hash naming the uploaded context archive.
    pub files_hash: Option<String>,
    /// Rebuild this step (and so every later one) even if its layer is cached.
    pub force: bool,
}

/// A step understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A shell command, as `user` (else the context's).
    Run {
        /// The command line.
        cmd: String,
        /// Its user.
        user: Option<String>,
    },
    /// Files from an uploaded archive to `dest`.
    Copy {
        /// The archive's hash.
        files_hash: String,
        /// The source path (relative to the context) the SDK packed.
        src: String,
        /// Where in the guest.
        dest: String,
        /// Owner of what is copied (else the context's user).
        user: Option<String>,
        /// Octal mode, if given.
        mode: Option<u32>,
    },
    /// Environment variables for later steps and the template's sandboxes.
    Env(Vec<(String, String)>),
    /// The working directory for later steps and the template's sandboxes (made if missing).
    Workdir(String),
    /// The user for later steps and the template's sandboxes.
    User(String),
}

impl Step {
    /// Parses step `index` (from 1).
    pub fn parse(index: usize, raw: &RawStep) -> Result<Self, StepError> {
        let kind = raw.kind.to_ascii_uppercase();
        let bad = |reason: &str| StepError::Args {
            index,
            kind: kind.clone(),
            reason: reason.to_owned(),
        };
        let arg = |i: usize| raw.args.get(i).filter(|s| !s.is_empty()).cloned();
        match kind.as_str() {
            "RUN" => Ok(Step::Run {
                cmd: arg(0).ok_or_else(|| bad("needs a command"))?,
                user: arg(1),
            }),
            "COPY" => {
                let files_hash = raw
                    .files_hash
                    .clone()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad("needs filesHash (the uploaded context)"))?;
                if !files_hash.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(bad("filesHash must be hex"));
                }
                let mode = match arg(3) {
                    Some(m) => Some(
                        u32::from_str_radix(m.trim_start_matches("0o"), 8)
                            .ok()
                            .filter(|m| *m <= 0o7777)
                            .ok_or_else(|| bad("mode must be octal"))?,
                    ),
                    None => None,
                };
                Ok(Step::Copy {
                    files_hash,
                    src: arg(0).ok_or_else(|| bad("needs a source"))?,
                    dest: arg(1).ok_or_else(|| bad("needs a destination"))?,
                    user: arg(2),
                    mode,
                })
            }
            "ENV" => {
                if raw.args.is_empty() || !raw.args.len().is_multiple_of(2) {
                    return Err(bad("needs name and value pairs"));
                }
                let pairs = raw
                    .args
                    .chunks(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect::<Vec<_>>();
                if pairs.iter().any(|(k, _)| !valid_env_name(k)) {
                    return Err(bad("invalid variable name"));
                }
                Ok(Step::Env(pairs))
            }
            "WORKDIR" => Ok(Step::Workdir(arg(0).ok_or_else(|| bad("needs a path"))?)),
            "USER" => {
                let user = arg(0).ok_or_else(|| bad("needs a user"))?;
                if !valid_user(&user) {
                    return Err(bad("invalid user name"));
                }
                Ok(Step::User(user))
            }
            _ => Err(StepError::Unknown { index, kind }),
        }
    }

    /// Whether the step ends in a disk layer.
    pub fn makes_layer(&self) -> bool {
        matches!(
            self,
            Step::Run { .. } | Step::Copy { .. } | Step::Workdir(_)
        )
    }

    /// A one-line description for the log.
    pub fn describe(&self) -> String {
        match self {
            Step::Run { cmd, .. } => format!("RUN {cmd}"),
            Step::Copy { src, dest, .. } => format!("COPY {src} {dest}"),
            Step::Env(p) => {
                let p: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("ENV {}", p.join(" "))
            }
            Step::Workdir(w) => format!("WORKDIR {w}"),
            Step::User(u) => format!("USER {u}"),
        }
    }
}

/// What later steps run in; at the end, the template's defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Context {
    /// The user commands run as.
    pub user: String,
    /// The working directory; `None`: the user's home.
    pub workdir: Option<String>,
    /// Environment variables, in the order set (a later value replaces an earlier one).
    pub envs: Vec<(String, String)>,
}

impl Context {
    /// The context a build starts in: its parent's defaults.
    pub fn new(user: String, workdir: Option<String>, envs: Vec<(String, String)>) -> Self {
        Self {
            user,
            workdir,
            envs,
        }
    }

    /// Applies a context step (the others leave it alone).
    pub fn apply(&mut self, step: &Step) {
        match step {
            Step::Env(pairs) => {
                for (k, v) in pairs {
                    self.envs.retain(|(old, _)| old != k);
                    self.envs.push((k.clone(), v.clone()));
                }
            }
            Step::Workdir(w) => self.workdir = Some(w.clone()),
            Step::User(u) => self.user = u.clone(),
            _ => {}
        }
    }
}

/// The key of the layer `step` makes on the layer keyed `parent`, run in `ctx` (files by
/// their content hash, which the SDK computed and the archive's upload was checked against).
pub(super) fn layer_key(parent: &str, step: &Step, ctx: &Context) -> String {
    let mut h = Sha256::new();
    h.update(b"wrenn-layer-v1\0");
    h.update(parent.as_bytes());
    h.update([0]);
    h.update(format!("{step:?}").as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(ctx).unwrap_or_default());
    hex::encode(h.finalize())
}

fn valid_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A user name we pass to `useradd`/`chown` and envd: the POSIX portable set.
pub(crate) fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && !u.starts_with('-')
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `s` quoted for a POSIX shell.
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: &str, args: &[&str]) -> RawStep {
        RawStep {
            kind: kind.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn steps_parse_and_bad_ones_are_refused() {
        assert_eq!(
            Step::parse(1, &raw("run", &["echo hi", "user"])).unwrap(),
            Step::Run {
                cmd: "echo hi".into(),
                user: Some("user".into())
            }
        );
        assert!(Step::parse(1, &raw("ENV", &["A"])).is_err());
        assert!(Step::parse(1, &raw("ENV", &["1A", "x"])).is_err());
        assert!(Step::parse(1, &raw("USER", &["-rf"])).is_err());
        assert!(matches!(
            Step::parse(2, &raw("ADD", &["x"])),
            Err(StepError::Unknown { index: 2, .. })
        ));
        let mut copy = raw("COPY", &["a.txt", "/app/", "user", "0755"]);
        assert!(Step::parse(1, &copy).is_err(), "no filesHash");
        copy.files_hash = Some("abc123".into());
        assert!(matches!(
            Step::parse(1, &copy).unwrap(),
            Step::Copy {
                mode: Some(0o755),
                ..
            }
        ));
        copy.files_hash = Some("../x".into());
        assert!(Step::parse(1, &copy).is_err());
    }

    #[test]
    fn a_changed_step_or_context_changes_the_key() {
        let ctx = Context::new("root".into(), None, vec![]);
        let run = |c: &str| Step::Run {
            cmd: c.into(),
            user: None,
        };
        let k = layer_key("p", &run("a"), &ctx);
        assert_eq!(k, layer_key("p", &run("a"), &ctx));
        assert_ne!(k, layer_key("p", &run("b"), &ctx));
        assert_ne!(k, layer_key("q", &run("a"), &ctx));
        let mut other = ctx.clone();
        other.apply(&Step::Env(vec![("A".into(), "1".into())]));
        assert_ne!(k, layer_key("p", &run("a"), &other));
        other.apply(&Step::Env(vec![("A".into(), "2".into())]));
        assert_eq!(other.envs, vec![("A".to_owned(), "2".to_owned())]);
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
