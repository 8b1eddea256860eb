//! Typed identifiers: sandbox IDs in E2B's shape, and names for teams, templates, hosts and
//! snapshots.

use std::fmt;

/// Length of a generated sandbox ID.
pub const SANDBOX_ID_LEN: usize = 20;

/// Generated IDs use 32 symbols so that each random byte maps to one symbol without bias
/// (`byte % 32`); all of them are lowercase ASCII letters or digits, like E2B's IDs, so an ID is
/// a valid DNS label in `<port>-<id>.<domain>`.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Longest ID accepted from a client. Generated IDs are shorter; the bound keeps junk out of
/// logs and queries.
const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {MAX_ID_LEN} characters")]
    TooLong { kind: &'static str },
    #[error("{kind} contains the character {ch:?}")]
    BadChar { kind: &'static str, ch: char },
}

fn check(kind: &'static str, s: &str, allowed: impl Fn(char) -> bool) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind });
    }
    match s.chars().find(|c| !allowed(*c)) {
        Some(ch) => Err(IdError::BadChar { kind, ch }),
        None => Ok(()),
    }
}

fn lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A sandbox ID: lowercase letters and digits only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// Builds an ID from random bytes (the caller owns the randomness, so this stays pure).
    pub fn from_random(bytes: [u8; SANDBOX_ID_LEN]) -> Self {
        SandboxId(
            bytes
                .iter()
                .map(|b| ALPHABET[usize::from(b % 32)] as char)
                .collect(),
        )
    }

    /// Parses an ID as it appears in a URL path. E2B's API accepts the legacy composite form
    /// `<sandboxID>-<clientID>` and ignores the suffix; so do we.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let id = s.split_once('-').map_or(s, |(id, _client)| id);
        check("sandbox ID", id, lower_alnum)?;
        Ok(SandboxId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $allowed:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check($kind, s, $allowed)?;
                Ok($name(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

name_id!(
    /// A team: letters, digits, `-`, `_`, `.`.
    TeamId,
    "team ID",
    name_char
);
name_id!(
    /// A registered host agent.
    HostId,
    "host ID",
    name_char
);
name_id!(
    /// A template by ID or name. E2B names may carry a namespace and a tag
    /// (`team/name:tag`), so `/` and `:` are allowed too.
    TemplateId,
    "template ID",
    |c| name_char(c) || matches!(c, '/' | ':')
);
name_id!(
    /// A snapshot made from a sandbox; usable as a template ID.
    SnapshotId,
    "snapshot ID",
    name_char
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_sandbox_ids_are_lowercase_alnum_and_parse_back() {
        let id = SandboxId::from_random(std::array::from_fn(|i| (i * 37) as u8));
        assert_eq!(id.as_str().len(), SANDBOX_ID_LEN);
        assert!(id.as_str().chars().all(lower_alnum), "{id}");
        assert_eq!(SandboxId::parse(id.as_str()), Ok(id));
        // Every byte value maps to a symbol, without bias: 256 is a multiple of 32.
        let all: SandboxId = SandboxId::from_random([255; SANDBOX_ID_LEN]);
        assert_eq!(all.as_str(), "7".repeat(SANDBOX_ID_LEN));
    }

    #[test]
    fn sandbox_id_parsing() {
        let cases: &[(&str, Result<&str, IdError>)] = &[
            ("abc123", Ok("abc123")),
            ("abc123-6532622b", Ok("abc123")),
            ("", Err(IdError::Empty { kind: "sandbox ID" })),
            (
                "ABC",
                Err(IdError::BadChar {
                    kind: "sandbox ID",
                    ch: 'A',
                }),
            ),
            (
                "a/b",
                Err(IdError::BadChar {
                    kind: "sandbox ID",
                    ch: '/',
                }),
            ),
            (
                "a b",
                Err(IdError::BadChar {
                    kind: "sandbox ID",
                    ch: ' ',
                }),
            ),
        ];
        for (input, want) in cases {
            let got = SandboxId::parse(input);
            assert_eq!(
                got.as_ref().map(SandboxId::as_str),
                want.as_ref().map(|s| *s),
                "{input:?}"
            );
        }
        assert_eq!(
            SandboxId::parse(&"a".repeat(65)),
            Err(IdError::TooLong { kind: "sandbox ID" })
        );
    }

    #[test]
    fn template_ids_allow_namespaces_and_tags() {
        assert!(TemplateId::parse("team/my-tpl:v1").is_ok());
        assert!(TemplateId::parse("base").is_ok());
        assert!(TemplateId::parse("bad template").is_err());
        assert!(TeamId::parse("team/x").is_err());
    }
}
