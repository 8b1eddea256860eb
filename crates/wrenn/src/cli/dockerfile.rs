//! The Dockerfile subset `wrenn template build` understands, parsed into template builder
//! steps: `FROM`, `ARG`, `RUN`, `COPY`/`ADD` (local files only, `--chown`, `--chmod`), `ENV`,
//! `WORKDIR`, `USER`, and `CMD`/`ENTRYPOINT` as the start command. `EXPOSE`, `LABEL`,
//! `VOLUME`, `STOPSIGNAL` and `HEALTHCHECK` are accepted and ignored (with a warning); anything
//! else is an error naming its line. Pure: no I/O.

use std::collections::BTreeMap;

/// A parsed Dockerfile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Recipe {
    /// What `FROM` names (a template or an image).
    pub(super) from: String,
    pub(super) steps: Vec<Step>,
    /// `ENTRYPOINT` and `CMD` joined, as a shell command.
    pub(super) start_cmd: Option<String>,
    /// Instructions accepted but ignored, for the user to see.
    pub(super) warnings: Vec<String>,
}

/// One builder step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Run(String),
    Copy {
        /// A path in the context (file or directory).
        src: String,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
    },
    Env(Vec<(String, String)>),
    Workdir(String),
    User(String),
}

/// Why a Dockerfile cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Dockerfile line {line}: {reason}")]
pub(super) struct ParseError {
    pub(super) line: usize,
    pub(super) reason: String,
}

/// Parses `text`; `build_args` are the `--build-arg` values (they override `ARG` defaults).
pub(super) fn parse(
    text: &str,
    build_args: &BTreeMap<String, String>,
) -> Result<Recipe, ParseError> {
    let mut from = None;
    // Docker's defaults while building, E2B's for the sandboxes (unless the file sets them),
    // as the SDKs' own Dockerfile conversion does.
    let mut steps = vec![Step::User("root".into()), Step::Workdir("/".into())];
    let (mut user_set, mut workdir_set) = (false, false);
    let (mut entrypoint, mut cmd) = (None, None);
    let mut warnings = Vec::new();
    // ARG and ENV values, for `$VAR` in later instructions (RUN sees ARGs as environment).
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut args: Vec<(String, String)> = Vec::new();
    for (line, instr) in logical_lines(text) {
        let err = |reason: String| ParseError { line, reason };
        let (word, rest) = match instr.split_once(char::is_whitespace) {
            Some((w, r)) => (w.to_ascii_uppercase(), r.trim().to_owned()),
            None => (instr.to_ascii_uppercase(), String::new()),
        };
        if from.is_none() && !matches!(word.as_str(), "FROM" | "ARG") {
            return Err(err(format!("{word} before FROM")));
        }
        match word.as_str() {
            "FROM" => {
                if from.is_some() {
                    return Err(err(
                        "multi-stage builds (a second FROM) are not supported".into()
                    ));
                }
                let image = rest.split_whitespace().next().unwrap_or_default();
                if image.is_empty() || image.starts_with("--") {
                    return Err(err("FROM needs an image or template (no flags)".into()));
                }
                from = Some(expand(image, &vars));
            }
            "ARG" => {
                let (k, default) = match rest.split_once('=') {
                    Some((k, v)) => (k.trim().to_owned(), Some(unquote(v.trim()))),
                    None => (rest.trim().to_owned(), None),
                };
                if !valid_name(&k) {
                    return Err(err(format!("invalid ARG name {k:?}")));
                }
                let value = build_args.get(&k).cloned().or(default).unwrap_or_default();
                vars.insert(k.clone(), value.clone());
                args.push((k, value));
            }
            "RUN" => {
                let body = command(&rest).map_err(err)?;
                let exports: String = args
                    .iter()
                    .map(|(k, v)| format!("export {k}={}; ", quote(v)))
                    .collect();
                steps.push(Step::Run(format!("{exports}{body}")));
            }
            "COPY" | "ADD" => steps.extend(copy(&rest, &vars).map_err(err)?),
            "ENV" => {
                let pairs = env_pairs(&rest, &vars).map_err(err)?;
                vars.extend(pairs.iter().cloned());
                steps.push(Step::Env(pairs));
            }
            "WORKDIR" if !rest.is_empty() => {
                workdir_set = true;
                steps.push(Step::Workdir(expand(&rest, &vars)));
            }
            "USER" if !rest.is_empty() => {
                user_set = true;
                steps.push(Step::User(expand(&rest, &vars)));
            }
            "CMD" => cmd = Some(command(&rest).map_err(err)?),
            "ENTRYPOINT" => entrypoint = Some(command(&rest).map_err(err)?),
            "EXPOSE" | "LABEL" | "VOLUME" | "STOPSIGNAL" | "HEALTHCHECK" | "MAINTAINER" => {
                warnings.push(format!("line {line}: {word} is ignored"));
            }
            other => return Err(err(format!("{other} is not supported"))),
        }
    }
    let from = from.ok_or(ParseError {
        line: 0,
        reason: "no FROM".into(),
    })?;
    if !user_set {
        steps.push(Step::User("user".into()));
    }
    if !workdir_set {
        steps.push(Step::Workdir("/home/user".into()));
    }
    let start_cmd = match (entrypoint, cmd) {
        (Some(e), Some(c)) => Some(format!("{e} {c}")),
        (e, c) => e.or(c),
    };
    Ok(Recipe {
        from,
        steps,
        start_cmd,
        warnings,
    })
}

/// Instructions with their first line number: continuations (`\` at the end) joined,
/// comments and blank lines dropped.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && cur.is_none()) {
            continue;
        }
        let (start, mut acc) = cur.take().unwrap_or((i + 1, String::new()));
        let continued = trimmed.ends_with('\\');
        if !acc.is_empty() && !trimmed.is_empty() {
            acc.push(' ');
        }
        acc.push_str(trimmed.trim_end_matches('\\').trim_end());
        if continued {
            cur = Some((start, acc));
        } else if !acc.is_empty() {
            out.push((start, acc));
        }
    }
    if let Some((start, acc)) = cur.filter(|(_, a)| !a.is_empty()) {
        out.push((start, acc));
    }
    out
}

/// A shell command from the shell form (`RUN a && b`) or the exec form (`["a", "b"]`).
fn command(rest: &str) -> Result<String, String> {
    if rest.is_empty() {
        return Err("a command is required".into());
    }
    if rest.starts_with('[') {
        let argv: Vec<String> =
            serde_json::from_str(rest).map_err(|e| format!("bad exec form {rest}: {e}"))?;
        if argv.is_empty() {
            return Err("an empty exec form".into());
        }
        return Ok(argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "));
    }
    Ok(rest.to_owned())
}

fn copy(rest: &str, vars: &BTreeMap<String, String>) -> Result<Vec<Step>, String> {
    let mut words: Vec<String> = if rest.trim_start().starts_with('[') {
        serde_json::from_str(rest).map_err(|e| format!("bad COPY form {rest}: {e}"))?
    } else {
        rest.split_whitespace().map(str::to_owned).collect()
    };
    let (mut chown, mut chmod) = (None, None);
    while words.first().is_some_and(|w| w.starts_with("--")) {
        let flag = words.remove(0);
        match flag.split_once('=') {
            Some(("--chown", v)) => chown = Some(expand(v, vars)),
            Some(("--chmod", v)) => chmod = Some(v.to_owned()),
            _ => return Err(format!("COPY flag {flag} is not supported")),
        }
    }
    if words.len() < 2 {
        return Err("COPY needs a source and a destination".into());
    }
    let dest = expand(&words.pop().expect("two or more"), vars);
    // More than one source copies into a directory.
    let dest = if words.len() > 1 && !dest.ends_with('/') {
        format!("{dest}/")
    } else {
        dest
    };
    words
        .into_iter()
        .map(|src| {
            let src = expand(&src, vars);
            if src.contains("://") {
                return Err(format!("remote sources ({src}) are not supported"));
            }
            Ok(Step::Copy {
                src,
                dest: dest.clone(),
                chown: chown.clone(),
                chmod: chmod.clone(),
            })
        })
        .collect()
}

/// `ENV K=V K2="v 2"` or the old `ENV K value with spaces`.
fn env_pairs(rest: &str, vars: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    let first = rest.split_whitespace().next().unwrap_or_default();
    if !first.contains('=') {
        let (k, v) = rest
            .split_once(char::is_whitespace)
            .ok_or("ENV needs a name and a value")?;
        return Ok(vec![(k.to_owned(), expand(v.trim(), vars))]);
    }
    let mut out = Vec::new();
    for word in split_words(rest)? {
        let (k, v) = word
            .split_once('=')
            .ok_or_else(|| format!("ENV {word}: expected NAME=value"))?;
        if !valid_name(k) {
            return Err(format!("invalid ENV name {k:?}"));
        }
        out.push((k.to_owned(), expand(v, vars)));
    }
    Ok(out)
}

/// Splits at whitespace outside double or single quotes, removing the quotes.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => (quote, any) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (Some('"') | None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if quote.is_some() {
        return Err("an unterminated quote".into());
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

fn unquote(v: &str) -> String {
    split_words(v)
        .ok()
        .and_then(|w| w.into_iter().next())
        .unwrap_or_default()
}

fn valid_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `$VAR` and `${VAR}` replaced by ARG and ENV values (unknown ones by nothing, as Docker).
fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(vars.get(name).map_or("", String::as_str));
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Single-quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Recipe, ParseError> {
        parse(text, &BTreeMap::new())
    }

    #[test]
    fn a_dockerfile_becomes_builder_steps() {
        let r = parse(
            "# comment\nARG VERSION=1\nFROM base\nARG NAME\nENV APP_HOME=/srv/app GREETING=\"hi there\"\n\
             WORKDIR $APP_HOME\nCOPY --chown=user --chmod=0755 app/ run.sh ${APP_HOME}\n\
             RUN apt-get update && \\\n    echo $VERSION\nUSER user\nEXPOSE 8080\n\
             ENTRYPOINT [\"python3\", \"-m\"]\nCMD [\"http.server\", \"8080\"]\n",
            &BTreeMap::from([("NAME".to_owned(), "x y".to_owned())]),
        )
        .unwrap();
        assert_eq!(r.from, "base");
        assert_eq!(
            r.steps,
            vec![
                Step::User("root".into()),
                Step::Workdir("/".into()),
                Step::Env(vec![
                    ("APP_HOME".into(), "/srv/app".into()),
                    ("GREETING".into(), "hi there".into())
                ]),
                Step::Workdir("/srv/app".into()),
                Step::Copy {
                    src: "app/".into(),
                    dest: "/srv/app/".into(),
                    chown: Some("user".into()),
                    chmod: Some("0755".into()),
                },
                Step::Copy {
                    src: "run.sh".into(),
                    dest: "/srv/app/".into(),
                    chown: Some("user".into()),
                    chmod: Some("0755".into()),
                },
                Step::Run(
                    "export VERSION=1; export NAME='x y'; apt-get update && echo $VERSION".into()
                ),
                Step::User("user".into()),
            ]
        );
        assert_eq!(r.start_cmd.as_deref(), Some("python3 -m http.server 8080"));
        assert_eq!(r.warnings, ["line 11: EXPOSE is ignored"]);
    }

    #[test]
    fn unsupported_input_names_its_line() {
        assert_eq!(p("RUN x").unwrap_err().line, 1);
        assert_eq!(p("FROM a\nFROM b").unwrap_err().line, 2);
        let e = p("FROM a\n\nONBUILD RUN x").unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (3, "ONBUILD is not supported"));
        assert!(
            p("FROM a\nCOPY https://x/y /y")
                .unwrap_err()
                .reason
                .contains("remote")
        );
        assert!(p("FROM a\nCOPY --from=b /x /y").is_err());
        assert!(p("FROM a\nENV 1X=2").is_err());
        assert!(p("").is_err());
    }

    #[test]
    fn old_env_form_and_shell_cmd() {
        let r = p("FROM base\nENV PATH_X some value\nCMD node server.js").unwrap();
        assert_eq!(
            r.steps,
            vec![
                Step::User("root".into()),
                Step::Workdir("/".into()),
                Step::Env(vec![("PATH_X".into(), "some value".into())]),
                Step::User("user".into()),
                Step::Workdir("/home/user".into()),
            ]
        );
        assert_eq!(r.start_cmd.as_deref(), Some("node server.js"));
    }
}
