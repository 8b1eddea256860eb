//! Named snapshots: a sandbox's memory and disk kept under their own ID, from which any number
//! of sandboxes start (fork is a snapshot and its children).
//!
//! A snapshot is a paused sandbox's files, kept apart: `<snapshots>/<id>/` holds the device
//! state and memory diff (hard links to the paused files, which are never written in place),
//! a copy of the paused disk layer (`rootfs.qcow2`, layered on the template's disk or on the
//! disk of the snapshot the source started from, so it stores only the source's own disk
//! changes), and [`INFO_FILE`]. A sandbox starts from it as a paused sandbox made for it: the
//! state linked into its new directory, the snapshot's memory diffs as its memory base (see
//! [`crate::memdiff`]: a snapshot of it stores only the pages that changed since) with an
//! empty diff of its own, a disk overlay on the snapshot's disk, then the ordinary resume
//! (fresh `/init`: its own token, clock and entropy). A base diff lives in its snapshot's
//! directory, which the disk chain keeps while anything is layered on it.
//!
//! A deleted snapshot takes no more creates; its files go once no sandbox (running or paused)
//! and no other snapshot has its disk in their chain ([`sweep`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::SandboxMeta;
use crate::sandbox::{
    Deadlines, FileRecord, MemoryLayer, PausedManifest, PausedSandbox, Sandbox, SandboxNet,
};

/// What a snapshot's directory says about it.
pub const INFO_FILE: &str = "snapshot.json";
/// Written once the snapshot was deleted.
const RELEASED: &str = "released";
/// The snapshot's disk layer.
const DISK: &str = "rootfs.qcow2";
/// A staging directory this old belongs to no capture in progress.
const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(3600);

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its ID.
    pub id: String,
    /// The sandbox it was taken of.
    pub source_sandbox_id: String,
    /// The source's meta then (template, size, envd, egress).
    pub meta: SandboxMeta,
    /// The paused state, its files in the snapshot's directory.
    pub manifest: PausedManifest,
    /// The snapshot the source started from (this one's disk is layered on its disk).
    pub parent: Option<String>,
    /// When it was taken.
    pub created_unix_ms: i64,
    /// What it stores itself.
    pub disk_bytes: u64,
    /// See `disk_bytes`.
    pub memory_bytes: u64,
}

/// Why a snapshot could not be taken or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotsError {
    /// Not a usable snapshot ID.
    #[error("snapshot ID {0:?} (letters, digits, '-' and '_', at most 64)")]
    BadId(String),
    /// There is one of that ID already.
    #[error("snapshot {0} exists")]
    Exists(String),
    /// No such snapshot (or it was deleted).
    #[error("snapshot {0} not found")]
    NotFound(String),
    /// The source's disk cannot be copied as one layer.
    #[error("the sandbox's disk {0} has an uncommitted layer; pause and resume it first")]
    Layered(PathBuf),
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Capturing the running sandbox failed (it runs on).
    #[error("capture the running sandbox")]
    Capture(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Making the new sandbox's disk or record failed.
    #[error("prepare the sandbox from the snapshot")]
    Prepare(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotsError {
    let path = path.to_owned();
    move |source| SnapshotsError::Io { what, path, source }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Snapshot `id`'s directory under `root` (which must not exist yet) and a fresh, empty
/// staging directory its files are written into before it is renamed there.
fn staging_for(root: &Path, id: &str) -> Result<(PathBuf, PathBuf), SnapshotsError> {
    if !valid_id(id) {
        return Err(SnapshotsError::BadId(id.to_owned()));
    }
    let dir = root.join(id);
    if dir.exists() {
        return Err(SnapshotsError::Exists(id.to_owned()));
    }
    let staging = root.join(format!(".{id}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
    Ok((dir, staging))
}

/// Snapshot `id` of `paused` (sandbox `meta`) under `root`. Blocking.
pub fn take(
    root: &Path,
    id: &str,
    meta: &SandboxMeta,
    paused: &PausedSandbox,
) -> Result<SnapshotInfo, SnapshotsError> {
    let (dir, staging) = staging_for(root, id)?;
    let res = fill(root, &staging, id, meta, paused);
    match res {
        Ok(info) => {
            std::fs::rename(&staging, &dir).map_err(io("rename", &staging))?;
            Ok(info)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn fill(
    root: &Path,
    staging: &Path,
    id: &str,
    meta: &SandboxMeta,
    paused: &PausedSandbox,
) -> Result<SnapshotInfo, SnapshotsError> {
    let m = paused.manifest();
    let src = paused.root();
    if let Some((state, diff)) = m.memory() {
        for file in [&state.file, &diff.file] {
            link_or_copy(&src.join(file), &staging.join(file))?;
        }
    }
    // The disk layer is copied: a later resume of the source commits into its paused disk.
    let disk = src.join(&m.disk);
    let chain =
        crate::jail::disk::chain(&disk).map_err(|e| SnapshotsError::Prepare(Box::new(e)))?;
    if chain.iter().skip(1).any(|l| l.path.starts_with(src)) {
        return Err(SnapshotsError::Layered(disk));
    }
    let copy = staging.join(DISK);
    std::fs::copy(&disk, &copy).map_err(io("copy", &disk))?;
    let mut manifest = m.clone();
    manifest.disk = DISK.into();
    describe(root, staging, id, meta, manifest)
}

/// Syncs the snapshot files `staging` holds and writes its info file; blocking.
fn describe(
    root: &Path,
    staging: &Path,
    id: &str,
    meta: &SandboxMeta,
    manifest: PausedManifest,
) -> Result<SnapshotInfo, SnapshotsError> {
    let copy = staging.join(DISK);
    let chain =
        crate::jail::disk::chain(&copy).map_err(|e| SnapshotsError::Prepare(Box::new(e)))?;
    let parent = chain.iter().skip(1).find_map(|l| {
        let rel = l.path.strip_prefix(root).ok()?;
        Some(
            rel.components()
                .next()?
                .as_os_str()
                .to_string_lossy()
                .into_owned(),
        )
    });
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut files = vec![DISK];
    if let Some((state, diff)) = manifest.memory() {
        files.extend([state.file.as_str(), diff.file.as_str()]);
    }
    for f in files {
        let p = staging.join(f);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", &p))?;
    }
    let memory_bytes = (manifest.memory()).map_or(0, |(_, diff)| size(&staging.join(&diff.file)));
    let info = SnapshotInfo {
        id: id.to_owned(),
        source_sandbox_id: meta.sandbox_id.clone(),
        meta: meta.clone(),
        manifest,
        parent,
        created_unix_ms: crate::controller::now_ms(),
        disk_bytes: size(&copy),
        memory_bytes,
    };
    let path = staging.join(INFO_FILE);
    let text = serde_json::to_vec_pretty(&info).unwrap_or_default();
    std::fs::write(&path, text).map_err(io("write", &path))?;
    Ok(info)
}

/// Snapshot `id` of running sandbox `sandbox` (`meta`) under `root`, captured in place: the
/// guest stopped meanwhile, running on afterwards. Returns how long it was stopped.
pub async fn take_running<N: SandboxNet>(
    root: &Path,
    id: &str,
    meta: &SandboxMeta,
    sandbox: &Sandbox<N>,
    deadlines: &Deadlines,
) -> Result<(SnapshotInfo, std::time::Duration), SnapshotsError> {
    let (dir, staging) = staging_for(root, id)?;
    let res = async {
        let c = sandbox
            .checkpoint(&staging, deadlines)
            .await
            .map_err(|e| SnapshotsError::Capture(Box::new(e)))?;
        let (r, s, i, m) = (
            root.to_owned(),
            staging.clone(),
            id.to_owned(),
            meta.clone(),
        );
        let info = tokio::task::spawn_blocking(move || describe(&r, &s, &i, &m, c.manifest))
            .await
            .map_err(|e| SnapshotsError::Prepare(Box::new(e)))??;
        std::fs::rename(&staging, &dir).map_err(io("rename", &staging))?;
        Ok((info, c.stopped))
    }
    .await;
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    res
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), SnapshotsError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(io("copy", from))
}

/// Snapshot `id` under `root`, unless it is missing or deleted.
pub fn open(root: &Path, id: &str) -> Option<SnapshotInfo> {
    if !valid_id(id) {
        return None;
    }
    let dir = root.join(id);
    if dir.join(RELEASED).exists() {
        return None;
    }
    serde_json::from_slice(&std::fs::read(dir.join(INFO_FILE)).ok()?).ok()
}

/// Makes `dir` (which must not exist) a paused sandbox `meta` of snapshot `id`: its state and
/// diff linked, a disk overlay on the snapshot's disk, the record `paused`. On failure `dir`
/// is gone.
pub async fn materialize(
    root: &Path,
    id: &str,
    dir: &Path,
    meta: &SandboxMeta,
) -> Result<PausedSandbox, SnapshotsError> {
    let info = open(root, id).ok_or_else(|| SnapshotsError::NotFound(id.to_owned()))?;
    let snap = root.join(id);
    if dir.exists() {
        return Err(SnapshotsError::Exists(dir.display().to_string()));
    }
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let res = async {
        let m = &info.manifest;
        crate::vm::create_overlay(&snap.join(DISK), "qcow2", &dir.join(DISK))
            .await
            .map_err(|e| SnapshotsError::Prepare(Box::new(e)))?;
        let mut manifest = m.clone();
        manifest.disk = DISK.into();
        // A snapshot without memory (of a filesystem-only pause) starts by a cold boot.
        if let Some((state, diff)) = m.memory() {
            link_or_copy(&snap.join(&state.file), &dir.join(&state.file))?;
            // The snapshot's memory is the new sandbox's base, and its own diff starts empty:
            // its saves (a pause, or a snapshot of it) store only what changed since.
            manifest.memory_base.push(MemoryLayer {
                path: snap.join(&diff.file),
                bytes: diff.bytes,
                sha256: diff.sha256.clone(),
                pages: m.dirty_pages,
            });
            let ram = u64::from(m.spec.memory_mib) << 20;
            let empty = crate::memdiff::save_empty(ram, &dir.join(&diff.file))
                .map_err(|e| SnapshotsError::Prepare(Box::new(e)))?;
            manifest.memory_diff = Some(FileRecord {
                file: diff.file.clone(),
                bytes: empty.bytes,
                sha256: empty.sha256,
            });
            manifest.dirty_pages = empty.pages;
        }
        let rec = crate::record::Recorder::new(dir, Some(meta.clone()));
        rec.write(crate::record::Phase::Paused { paused: manifest })
            .map_err(|e| SnapshotsError::Prepare(Box::new(e)))?;
        PausedSandbox::open(dir).map_err(|e| SnapshotsError::Prepare(Box::new(e)))
    }
    .await;
    if res.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    res
}

/// Deletes snapshot `id`: no more creates from it. `false`: there is none.
pub fn release(root: &Path, id: &str) -> bool {
    if open(root, id).is_none() {
        return false;
    }
    let path = root.join(id).join(RELEASED);
    if let Err(e) = std::fs::write(&path, b"") {
        tracing::warn!(snapshot = %id, error = %e, "mark a snapshot deleted");
        return false;
    }
    true
}

/// Every disk file the `*.qcow2` files directly in `dir` are layered on (themselves included).
fn chains_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "qcow2")
            && let Ok(chain) = crate::jail::disk::chain(&p)
        {
            out.extend(chain.into_iter().map(|l| l.path));
        }
    }
    out
}

/// Removes the deleted snapshots no sandbox under `sandboxes` and no remaining snapshot is
/// layered on (repeatedly: a removed one may have held its parent); their IDs. Blocking.
pub fn sweep(root: &Path, sandboxes: &Path) -> Vec<String> {
    let mut sandbox_layers: HashSet<PathBuf> = HashSet::new();
    for e in std::fs::read_dir(sandboxes).into_iter().flatten().flatten() {
        sandbox_layers.extend(chains_in(&e.path()));
    }
    // A capture cut short (its operation dropped) leaves its staging directory.
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_STAGING);
        if e.file_name().to_string_lossy().ends_with(".staging") && stale {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    let mut removed = Vec::new();
    loop {
        let mut used = sandbox_layers.clone();
        for dir in &snaps {
            let own = dir.join(DISK);
            used.extend(chains_in(dir).into_iter().filter(|p| *p != own));
        }
        let (gone, kept): (Vec<PathBuf>, Vec<PathBuf>) = snaps
            .into_iter()
            .partition(|dir| dir.join(RELEASED).exists() && !used.contains(&dir.join(DISK)));
        snaps = kept;
        if gone.is_empty() {
            break;
        }
        for dir in gone {
            let id = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(snapshot = %id, "removed a deleted snapshot");
                    removed.push(id);
                }
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "remove a snapshot"),
            }
        }
    }
    removed
}

/// The template directories the snapshots under `root` are made on (kept while they are).
pub fn templates_in_use(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join(INFO_FILE)).ok()?;
            let info: SnapshotInfo = serde_json::from_slice(&bytes).ok()?;
            Some(info.manifest.template.dir)
        })
        .collect()
}

/// The template IDs the snapshots under `root` are made on.
pub fn template_ids_in_use(root: &Path) -> HashSet<String> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join(INFO_FILE)).ok()?;
            let info: SnapshotInfo = serde_json::from_slice(&bytes).ok()?;
            Some(info.meta.template_id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_name_other_paths() {
        assert!(valid_id("snap-1_a"));
        for bad in ["", "..", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(open(Path::new("/nonexistent"), "../etc").is_none());
    }

    fn qemu_img(args: &[&str]) -> bool {
        std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }

    fn overlay(backing: &Path, format: &str, path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let (b, p) = (backing.display().to_string(), path.display().to_string());
        assert!(qemu_img(&[
            "create", "-q", "-f", "qcow2", "-F", format, "-b", &b, &p
        ]));
    }

    #[test]
    fn deleted_snapshots_go_only_once_nothing_is_layered_on_them() {
        if !qemu_img(&["--version"]) {
            eprintln!("skipped: no qemu-img");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (root, sandboxes) = (d.path().join("snapshots"), d.path().join("sandboxes"));
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        // s1 on the template's disk, s2 (of a child of s1) on s1's, a sandbox on s2's.
        overlay(&base, "raw", &root.join("s1").join(DISK));
        overlay(
            &root.join("s1").join(DISK),
            "qcow2",
            &root.join("s2").join(DISK),
        );
        overlay(
            &root.join("s2").join(DISK),
            "qcow2",
            &sandboxes.join("sb").join(DISK),
        );
        for id in ["s1", "s2"] {
            std::fs::write(root.join(id).join(INFO_FILE), b"{}").unwrap();
        }
        // Deleted, but s2 has a sandbox on it and s1 has s2.
        std::fs::write(root.join("s1").join(RELEASED), b"").unwrap();
        assert!(sweep(&root, &sandboxes).is_empty());
        std::fs::write(root.join("s2").join(RELEASED), b"").unwrap();
        assert!(sweep(&root, &sandboxes).is_empty());
        assert!(root.join("s1").exists() && root.join("s2").exists());
        // The sandbox goes: s2, then the s1 it held.
        std::fs::remove_dir_all(sandboxes.join("sb")).unwrap();
        let mut removed = sweep(&root, &sandboxes);
        removed.sort();
        assert_eq!(removed, ["s1", "s2"]);
        assert!(!root.join("s1").exists() && !root.join("s2").exists());
    }
}
