//! Tidy checks over the workspace sources.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "node_modules" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&workspace_root().join("crates"), &mut files);
    files
}

/// Every module starts with a `//!` line saying what it is for.
#[test]
fn every_module_has_a_doc_header() {
    let missing: Vec<_> = sources()
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            !first.starts_with("//!") && !first.starts_with("#![")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a `//!` header: {missing:#?}"
    );
}

/// Modules are `foo.rs` + `foo/`, never `foo/mod.rs` (test support directories excepted).
#[test]
fn no_mod_rs() {
    let bad: Vec<_> = sources()
        .into_iter()
        .filter(|p| p.file_name().unwrap() == "mod.rs" && !p.to_string_lossy().contains("/tests/"))
        .collect();
    assert!(bad.is_empty(), "mod.rs files: {bad:#?}");
}

/// Crate dependency directions from ARCHITECTURE.md.
#[test]
fn dependency_directions() {
    // (crate, internal crates it must never depend on)
    let rules: &[(&str, &[&str])] = &[
        (
            "wrenn-proto",
            &[
                "envd",
                "wrenn-connect",
                "wrenn-agent",
                "wrenn-server",
                "wrenn-qmp",
            ],
        ),
        (
            "wrenn-connect",
            &["envd", "wrenn-agent", "wrenn-server", "wrenn-qmp"],
        ),
        (
            "envd",
            &[
                "wrenn-agent",
                "wrenn-server",
                "wrenn-qmp",
                "wrenn-hostnet",
                "wrenn-core",
                "wrenn-api",
            ],
        ),
        (
            "wrenn-core",
            &[
                "envd",
                "wrenn-agent",
                "wrenn-server",
                "wrenn-qmp",
                "wrenn-connect",
                "wrenn-api",
            ],
        ),
        (
            "wrenn-qmp",
            &["envd", "wrenn-agent", "wrenn-server", "wrenn-core"],
        ),
        // The control plane reaches hosts only over the agent RPC, so it can run elsewhere.
        (
            "wrenn-server",
            &[
                "envd",
                "wrenn-agent",
                "wrenn-qmp",
                "wrenn-hostnet",
                "wrenn-image",
            ],
        ),
        // The guest's code interpreter stands alone: it reaches envd over HTTP only.
        (
            "wrenn-interpreter",
            &[
                "envd",
                "wrenn-agent",
                "wrenn-server",
                "wrenn-qmp",
                "wrenn-hostnet",
                "wrenn-core",
                "wrenn-api",
                "wrenn-image",
            ],
        ),
        // Host building blocks know nothing of the agent that wires them, nor of the guest.
        (
            "wrenn-hostnet",
            &["envd", "wrenn-agent", "wrenn-server", "wrenn-image"],
        ),
        // Image sources only fetch and verify: the caller decides the policy and unpacks.
        (
            "wrenn-oci",
            &[
                "envd",
                "wrenn-agent",
                "wrenn-server",
                "wrenn-qmp",
                "wrenn-hostnet",
                "wrenn-image",
                "indicatif",
            ],
        ),
        // Image builds report progress as events; drawing it is the caller's concern.
        (
            "wrenn-image",
            &[
                "envd",
                "wrenn-agent",
                "wrenn-server",
                "wrenn-hostnet",
                "indicatif",
                "console",
                "crossterm",
                "termion",
                "ratatui",
            ],
        ),
    ];
    let root = workspace_root();
    let mut bad = Vec::new();
    for (krate, forbidden) in rules {
        let manifest = root.join("crates").join(krate).join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        for dep in *forbidden {
            let uses = text.lines().any(|l| {
                let l = l.trim_start();
                l.starts_with(&format!("{dep} "))
                    || l.starts_with(&format!("{dep}."))
                    || l.starts_with(&format!("{dep}="))
            });
            if uses {
                bad.push(format!("{krate} depends on {dep}"));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

/// The packages `krate` depends on, directly or not, from `Cargo.lock` (every target and
/// feature, so this over-approximates: it errs on the side of a failure).
fn lock_closure(krate: &str) -> std::collections::BTreeSet<String> {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap();
    let mut deps: std::collections::HashMap<String, Vec<String>> = Default::default();
    for block in lock.split("[[package]]").skip(1) {
        let Some(name) = block
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_owned())
        else {
            continue;
        };
        let list = block
            .split_once("dependencies = [")
            .map(|(_, rest)| rest.split(']').next().unwrap_or(""))
            .unwrap_or("");
        // Entries are `"name"` or `"name version"` (with a source when names clash).
        let names = list
            .split(',')
            .filter_map(|e| e.trim().trim_matches('"').split(' ').next())
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        deps.entry(name).or_default().extend(names);
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![krate.to_owned()];
    while let Some(next) = todo.pop() {
        for dep in deps.get(&next).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    seen
}

/// Image builds report progress as events; no terminal crate may sneak in, not even through
/// another dependency.
#[test]
fn image_builds_draw_nothing() {
    let closure = lock_closure("wrenn-image");
    assert!(closure.contains("serde"), "wrenn-image not in Cargo.lock?");
    let terminal: Vec<_> = ["indicatif", "console", "crossterm", "termion", "ratatui"]
        .into_iter()
        .filter(|t| closure.contains(*t))
        .collect();
    assert!(terminal.is_empty(), "wrenn-image pulls in {terminal:?}");
}
