//! The shared store: where a paused sandbox's files go so that another host can resume it when
//! its own is gone (`wrenn agent --shared-store`: a directory every host mounts, or an
//! S3-compatible bucket `s3://bucket[/prefix]` with the standard `AWS_*` settings, e.g.
//! `AWS_ENDPOINT_URL` for a store other than AWS).
//!
//! A paused sandbox is its directory (record, device state, memory diff, disk layer), and the
//! store holds a copy of it under `paused/<sandbox ID>/`, written after the pause answered
//! (so a pause is no slower) and marked complete by an object `complete` written last: a copy
//! without it (a push cut short) is never fetched. The disk layer's backing chain names the
//! template's disk by absolute path, so a copy resumes only on a host that has the template at
//! the same path (a template cache shared by the agents, `--template-cache`); sandboxes made from
//! a snapshot (whose memory and disk are layered on the snapshot's files) are not pushed.
//! A copy goes when its sandbox is resumed or killed, wherever.
//!
//! Both go through the `object_store` crate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, WriteMultipart};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The record, pushed after the files it names.
const RECORD: &str = "sandbox.json";
/// Written last: the copy is complete.
const COMPLETE: &str = "complete";
/// Chunk size of uploads and reads.
const CHUNK: usize = 8 << 20;

/// Why a shared-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared store {0}")]
    Store(#[from] object_store::Error),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "unsupported shared store {0:?} (an absolute directory path or s3://bucket[/prefix] is)"
    )]
    Unsupported(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SharedError {
    let path = path.to_owned();
    move |source| SharedError::Io { what, path, source }
}

/// The shared store of paused sandboxes.
#[derive(Debug, Clone)]
pub struct SharedStore {
    store: Arc<dyn ObjectStore>,
    location: String,
}

impl SharedStore {
    /// Opens the store at `location`: a directory (made if missing, root-only: records hold
    /// envd access tokens), or `s3://bucket[/prefix]` configured from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
    /// `AWS_ALLOW_HTTP` for a plain-HTTP endpoint).
    pub fn open(location: &str) -> Result<Self, SharedError> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(SharedError::Unsupported(location.to_owned()));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()?;
            let store: Arc<dyn ObjectStore> = match prefix.trim_matches('/') {
                "" => Arc::new(s3),
                p => Arc::new(object_store::prefix::PrefixStore::new(s3, p)),
            };
            return Ok(SharedStore {
                store,
                location: location.to_owned(),
            });
        }
        let dir = location.strip_prefix("file://").unwrap_or(location);
        if dir.contains("://") || !dir.starts_with('/') {
            return Err(SharedError::Unsupported(location.to_owned()));
        }
        let dir = Path::new(dir);
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", dir))?;
        Ok(SharedStore {
            store: Arc::new(LocalFileSystem::new_with_prefix(dir)?),
            location: location.to_owned(),
        })
    }

    /// Where it is (for logs).
    pub fn location(&self) -> &str {
        &self.location
    }

    fn object(id: &str, name: &str) -> ObjPath {
        ObjPath::from(format!("paused/{id}/{name}"))
    }

    /// Copies paused sandbox `id`'s directory `dir` into the store: its files (not `vm/`),
    /// the record after them, then the completion mark (naming `host`, the host it came
    /// from, and the files). An older copy is replaced.
    pub async fn push_paused(&self, id: &str, dir: &Path, host: &str) -> Result<u64, SharedError> {
        self.delete_paused(id).await?;
        let mut names = Vec::new();
        let mut entries = tokio::fs::read_dir(dir).await.map_err(io("list", dir))?;
        while let Some(e) = entries.next_entry().await.map_err(io("list", dir))? {
            let kind = e.file_type().await.map_err(io("stat", &e.path()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if kind.is_file() && name != RECORD && !name.ends_with(".tmp") {
                names.push(name);
            }
        }
        names.sort();
        names.push(RECORD.to_owned());
        let mut bytes = 0;
        for name in &names {
            bytes += self
                .upload(&dir.join(name), &Self::object(id, name))
                .await?;
        }
        let mark = format!("host {host}\n{}", names.join("\n"));
        self.store
            .put(&Self::object(id, COMPLETE), mark.into())
            .await?;
        Ok(bytes)
    }

    async fn upload(&self, file: &Path, to: &ObjPath) -> Result<u64, SharedError> {
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(io("open", file))?;
        let mut w = WriteMultipart::new_with_chunk_size(self.store.put_multipart(to).await?, CHUNK);
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).await.map_err(io("read", file))?;
            if n == 0 {
                break;
            }
            w.wait_for_capacity(4).await?;
            w.write(&buf[..n]);
            total += n as u64;
        }
        w.finish().await?;
        Ok(total)
    }

    /// The completion mark of sandbox `id`'s copy: the host it came from and its files.
    async fn mark(&self, id: &str) -> Result<Option<(String, Vec<String>)>, SharedError> {
        let text = match self.store.get(&Self::object(id, COMPLETE)).await {
            Ok(r) => String::from_utf8_lossy(&r.bytes().await?).into_owned(),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut lines = text.lines();
        let host = lines
            .next()
            .and_then(|l| l.strip_prefix("host "))
            .unwrap_or_default()
            .to_owned();
        Ok(Some((
            host,
            lines.filter(|n| !n.is_empty()).map(str::to_owned).collect(),
        )))
    }

    /// The host a complete copy of sandbox `id` came from, if the store has one.
    pub async fn paused_from(&self, id: &str) -> Result<Option<String>, SharedError> {
        Ok(self.mark(id).await?.map(|(host, _)| host))
    }

    /// Writes the complete copy of sandbox `id` into the new directory `into` (which must not
    /// exist); `false` (and nothing made) when the store has no complete copy.
    pub async fn fetch_paused(&self, id: &str, into: &Path) -> Result<bool, SharedError> {
        let Some((_, names)) = self.mark(id).await? else {
            return Ok(false);
        };
        let tmp = into.with_extension("fetch.tmp");
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        tokio::fs::create_dir(&tmp)
            .await
            .map_err(io("create", &tmp))?;
        let got = self.download_all(id, &names, &tmp).await;
        if let Err(e) = got {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, into)
            .await
            .map_err(io("rename", into))?;
        Ok(true)
    }

    async fn download_all(
        &self,
        id: &str,
        names: &[String],
        dir: &Path,
    ) -> Result<(), SharedError> {
        use std::os::unix::fs::PermissionsExt as _;
        for name in names {
            let name = name.as_str();
            // Names come from our own pushes; refuse anything that would leave the directory.
            if name.contains('/') || name == "." || name == ".." {
                return Err(SharedError::Unsupported(format!(
                    "file name {name:?} in a copy"
                )));
            }
            let path = dir.join(name);
            let mut out = tokio::fs::File::create(&path)
                .await
                .map_err(io("create", &path))?;
            let mut stream = self.store.get(&Self::object(id, name)).await?.into_stream();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?).await.map_err(io("write", &path))?;
            }
            out.sync_all().await.map_err(io("sync", &path))?;
            // Root's alone, as every paused file is (the record holds the access token).
            tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .await
                .map_err(io("chmod", &path))?;
        }
        Ok(())
    }

    /// Removes the copy of sandbox `id` (none is fine).
    pub async fn delete_paused(&self, id: &str) -> Result<(), SharedError> {
        let prefix = ObjPath::from(format!("paused/{id}"));
        let found: Vec<ObjPath> = self
            .store
            .list(Some(&prefix))
            .filter_map(|m| async move { m.ok().map(|m| m.location) })
            .collect()
            .await;
        // The mark first: a half-deleted copy is never fetched.
        let (mark, rest): (Vec<_>, Vec<_>) = found
            .into_iter()
            .partition(|p| p.filename() == Some(COMPLETE));
        for p in mark.into_iter().chain(rest) {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Whether paused sandbox `dir` can resume on another host from a copy: it has no memory base
/// (it was not made from a snapshot) and its disk is layered on no file of this host's own.
fn movable(dir: &Path, local: &[PathBuf]) -> bool {
    let Ok(Some(rec)) = crate::record::read(dir) else {
        return false;
    };
    let crate::record::Phase::Paused { paused } = rec.phase else {
        return false;
    };
    paused.memory_base.is_empty() && !on_local_files(&dir.join(&paused.disk), local)
}

/// Whether a layer under the qcow2 disk `top` lies in one of `local` (this host's sandbox and
/// snapshot directories, which other hosts do not have); an unreadable chain counts as local.
fn on_local_files(top: &Path, local: &[PathBuf]) -> bool {
    match crate::jail::disk::chain(top) {
        Ok(layers) => layers[1..]
            .iter()
            .any(|l| local.iter().any(|root| l.path.starts_with(root))),
        Err(_) => true,
    }
}

/// After a pause: copies the sandbox into the agent's shared store in the background, if it has
/// one and the sandbox can resume elsewhere.
pub(crate) fn push_after_pause(agent: &Arc<crate::Agent>, id: &str) {
    let (agent, id) = (agent.clone(), id.to_owned());
    tokio::spawn(async move { push(&agent, &id).await });
}

/// Copies every sandbox of `ids` (paused, e.g. by [`crate::Agent::suspend`] before the agent
/// stops) into the shared store, one after the other, and waits for it.
pub async fn push_all(agent: &Arc<crate::Agent>, ids: &[String]) {
    for id in ids {
        push(agent, id).await;
    }
}

async fn push(agent: &Arc<crate::Agent>, id: &str) {
    let Some(store) = agent.shared_store().cloned() else {
        return;
    };
    let dir = agent.runtime().dir_of(id);
    let local = vec![
        agent.runtime().root().to_owned(),
        agent.runtime().snapshots_root(),
    ];
    let check = dir.clone();
    if !tokio::task::spawn_blocking(move || movable(&check, &local))
        .await
        .unwrap_or(false)
    {
        tracing::info!(sandbox_id = %id, "paused sandbox not copied to the shared store: it is layered on this host's snapshot files");
        return;
    }
    let started = std::time::Instant::now();
    match store.push_paused(id, &dir, agent.host_id()).await {
        Ok(bytes) => tracing::info!(
            sandbox_id = %id,
            mb = bytes >> 20,
            ms = started.elapsed().as_millis() as u64,
            "paused sandbox copied to the shared store"
        ),
        Err(e) => {
            tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&e), "copy a paused sandbox to the shared store")
        }
    }
}

/// Removes sandbox `id`'s copy in the background: after a resume here (any copy is stale
/// then), or after a kill here of a copy this host made (`own_only`: a host that comes back
/// holding a sandbox that moved on must not remove the copy its new host made).
pub(crate) fn forget(agent: &Arc<crate::Agent>, id: &str, own_only: bool) {
    let Some(store) = agent.shared_store().cloned() else {
        return;
    };
    let (id, host) = (id.to_owned(), agent.host_id().to_owned());
    tokio::spawn(async move {
        let res = async {
            if own_only
                && store
                    .paused_from(&id)
                    .await?
                    .is_some_and(|from| from != host)
            {
                return Ok(());
            }
            store.delete_paused(&id).await
        };
        if let Err(e) = res.await {
            tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&e), "remove a copy from the shared store");
        }
    });
}

/// Before resuming sandbox `id` that this host does not hold: takes the shared store's copy as
/// one of its paused sandboxes. `Ok(false)`: there is no copy (or no store).
pub(crate) async fn fetch_for_resume(
    agent: &Arc<crate::Agent>,
    id: &str,
) -> Result<bool, SharedError> {
    let Some(store) = agent.shared_store() else {
        return Ok(false);
    };
    let dir = agent.runtime().root().join(id);
    if dir.exists() {
        // A directory of that name that the controller does not know: never overwritten.
        return Err(SharedError::Io {
            what: "fetch into",
            path: dir.clone(),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    if !store.fetch_paused(id, &dir).await? {
        return Ok(false);
    }
    // Opening it checks its files' hashes: off the async workers.
    let (a, d) = (agent.clone(), dir.clone());
    let loaded =
        tokio::task::spawn_blocking(move || a.load_paused(&[crate::state::PausedVm { dir: d }]))
            .await
            .unwrap_or_default();
    if !loaded.iter().any(|l| l == id) {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Ok(false);
    }
    tracing::info!(sandbox_id = %id, "paused sandbox fetched from the shared store");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_paused_directory_goes_in_and_comes_out_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SharedStore::open(tmp.path().join("store").to_str().unwrap()).unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("vm")).unwrap();
        std::fs::write(src.join("sandbox.json"), b"{\"record\": 1}").unwrap();
        std::fs::write(src.join("state"), vec![7u8; 3 * CHUNK + 5]).unwrap();
        std::fs::write(src.join("memory.diff"), b"pages").unwrap();
        std::fs::write(src.join("vm/qmp.sock"), b"not copied").unwrap();

        assert_eq!(store.paused_from("sbx1").await.unwrap(), None);
        assert!(
            !store
                .fetch_paused("sbx1", &tmp.path().join("nothing"))
                .await
                .unwrap()
        );
        assert!(!tmp.path().join("nothing").exists());
        store.push_paused("sbx1", &src, "host-a").await.unwrap();
        assert_eq!(
            store.paused_from("sbx1").await.unwrap().as_deref(),
            Some("host-a")
        );

        let dst = tmp.path().join("dst");
        assert!(store.fetch_paused("sbx1", &dst).await.unwrap());
        for name in ["sandbox.json", "state", "memory.diff"] {
            assert_eq!(
                std::fs::read(dst.join(name)).unwrap(),
                std::fs::read(src.join(name)).unwrap(),
                "{name}"
            );
        }
        assert!(!dst.join("vm").exists());

        // A copy without its mark (a push cut short) is not there.
        store
            .store
            .delete(&SharedStore::object("sbx1", COMPLETE))
            .await
            .unwrap();
        assert_eq!(store.paused_from("sbx1").await.unwrap(), None);
        assert!(
            !store
                .fetch_paused("sbx1", &tmp.path().join("dst2"))
                .await
                .unwrap()
        );
        store.push_paused("sbx1", &src, "host-a").await.unwrap();
        store.delete_paused("sbx1").await.unwrap();
        assert_eq!(store.paused_from("sbx1").await.unwrap(), None);
        store.delete_paused("sbx1").await.unwrap();
        assert!(SharedStore::open("s3://").is_err());
        assert!(SharedStore::open("gs://bucket").is_err());
        assert!(SharedStore::open("relative/dir").is_err());
    }

    #[test]
    fn a_disk_layered_on_this_hosts_files_stays_here() {
        let tmp = tempfile::tempdir().unwrap();
        let (shared, local) = (tmp.path().join("shared"), tmp.path().join("local"));
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(&local).unwrap();
        let overlay = |backing: &Path, format: &str, path: &Path| {
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
                .arg(backing)
                .arg(path)
                .status()
        };
        let base = shared.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let Ok(status) = overlay(&base, "raw", &tmp.path().join("on-template.qcow2")) else {
            eprintln!("qemu-img not installed: skipped");
            return;
        };
        assert!(status.success());
        let snap = local.join("snapshot.qcow2");
        assert!(overlay(&base, "raw", &snap).unwrap().success());
        let child = tmp.path().join("on-snapshot.qcow2");
        assert!(overlay(&snap, "qcow2", &child).unwrap().success());
        let roots = [local.clone()];
        assert!(!on_local_files(
            &tmp.path().join("on-template.qcow2"),
            &roots
        ));
        assert!(on_local_files(&child, &roots));
        assert!(
            on_local_files(&tmp.path().join("missing"), &roots),
            "unreadable"
        );
    }

    /// The S3 path against a real S3-compatible server (moto's, from PyPI) started here, when
    /// `WRENN_TEST_MOTO_SERVER` names its `moto_server` (`scripts/test.sh` does).
    #[tokio::test]
    async fn the_same_through_an_s3_compatible_server() {
        let Ok(server) = std::env::var("WRENN_TEST_MOTO_SERVER") else {
            eprintln!("WRENN_TEST_MOTO_SERVER not set: S3 test skipped");
            return;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let moto = std::process::Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _moto = Kill(moto);
        let endpoint = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut up = false;
        for _ in 0..100 {
            if http
                .put(format!("{endpoint}/wrenn-test"))
                .send()
                .await
                .is_ok()
            {
                up = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(up, "moto_server did not start");
        // Configured in code rather than from the environment, which tests share.
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_bucket_name("wrenn-test")
            .build()
            .unwrap();
        let store = SharedStore {
            store: Arc::new(object_store::prefix::PrefixStore::new(s3, "copies")),
            location: "s3://wrenn-test/copies".into(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("sandbox.json"), b"{}").unwrap();
        // Larger than a multipart chunk: uploaded in parts.
        let big: Vec<u8> = (0..(2 * CHUNK + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(src.join("memory.diff"), &big).unwrap();
        store.push_paused("s1", &src, "host-a").await.unwrap();
        assert_eq!(
            store.paused_from("s1").await.unwrap().as_deref(),
            Some("host-a")
        );
        let dst = tmp.path().join("dst");
        assert!(store.fetch_paused("s1", &dst).await.unwrap());
        assert_eq!(std::fs::read(dst.join("memory.diff")).unwrap(), big);
        store.delete_paused("s1").await.unwrap();
        assert_eq!(store.paused_from("s1").await.unwrap(), None);
    }
}
