//! `filesystem.Filesystem`: stat, list, make, move, remove and watch paths.
//!
//! Every request acts as a user (Basic auth name, else the default user) and runs its
//! filesystem work with that user's permissions ([`crate::creds`]): envd is root, but a user gets
//! `permission_denied` wherever the kernel would refuse them, and what they create is theirs.

mod entry;
mod ops;
mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use wrenn_connect::{BoxStream, ConnectError, RequestContext, RpcRouter};
use wrenn_proto::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, FilesystemEvent, GetWatcherEventsRequest,
    GetWatcherEventsResponse, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    MoveRequest, MoveResponse, RemoveRequest, RemoveResponse, RemoveWatcherRequest,
    RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest, WatchDirResponse,
    watch_dir_response,
};

use crate::creds::run_as;
use crate::error::EnvdError;
use crate::state::Envd;
use crate::user::{Names, User};
use watch::{DirWatcher, WatchOptions};

/// Keepalive cadence of `WatchDir` when the client sends no `Keepalive-Ping-Interval`.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// Events a `CreateWatcher` watcher holds until `GetWatcherEvents` drains them. Past this the
/// watcher stops with a terminal error instead of growing without bound.
const MAX_BUFFERED_EVENTS: usize = 16 * 1024;

/// Errors of the filesystem service.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FsError {
    #[error("{what} '{}': {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("directory already exists: {}", .0.display())]
    DirExists(PathBuf),
    #[error("path already exists but it is not a directory: {}", .0.display())]
    ExistsNotDir(PathBuf),
    #[error("path is not a directory: {}", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot watch path on network filesystem: {} (set allowNetworkMounts to watch it anyway)", .0.display())]
    NetworkMount(PathBuf),
    #[error("watcher with id {0} not found")]
    WatcherNotFound(String),
    #[error("{0}")]
    WatchLimit(String),
    #[error("{0}")]
    Overflow(String),
    #[error("{0}")]
    Internal(String),
}

impl FsError {
    pub(crate) fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        FsError::Io {
            what: what.to_owned(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A failure of the credential switch or the worker thread itself.
impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError::Internal(format!("filesystem worker: {e}"))
    }
}

impl From<FsError> for EnvdError {
    fn from(e: FsError) -> Self {
        match e {
            FsError::Io { what, path, source } => EnvdError::io(&what, &path, &source),
            FsError::DirExists(_) => EnvdError::AlreadyExists(e.to_string()),
            FsError::ExistsNotDir(_) | FsError::NotADirectory(_) | FsError::NetworkMount(_) => {
                EnvdError::InvalidArgument(e.to_string())
            }
            FsError::WatcherNotFound(_) => EnvdError::NotFound(e.to_string()),
            FsError::WatchLimit(m) | FsError::Overflow(m) => EnvdError::NotEnoughSpace(m),
            FsError::Internal(m) => EnvdError::Internal(m),
        }
    }
}

fn connect_error(e: impl Into<EnvdError>) -> ConnectError {
    let e: EnvdError = e.into();
    if matches!(e, EnvdError::Internal(_)) {
        tracing::error!(error = %e, "filesystem request failed");
    }
    e.into()
}

/// The user a request acts as and its resolved path.
fn user_and_path(
    envd: &Envd,
    ctx: &RequestContext,
    path: &str,
) -> Result<(User, PathBuf), ConnectError> {
    let name = crate::user::basic_auth_user(ctx.headers()).map_err(connect_error)?;
    let user = envd.user(name.as_deref()).map_err(connect_error)?;
    let path = resolve(envd, &user, path)?;
    Ok((user, path))
}

fn resolve(envd: &Envd, user: &User, path: &str) -> Result<PathBuf, ConnectError> {
    crate::paths::resolve(path, user, envd.defaults().workdir.as_deref()).map_err(connect_error)
}

/// Runs `f` as `user` and maps its error.
async fn as_user<T, F>(user: &User, f: F) -> Result<T, ConnectError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, FsError> + Send + 'static,
{
    run_as(user, f)
        .await
        .map_err(FsError::from)
        .and_then(|r| r)
        .map_err(connect_error)
}

/// Watchers created with `CreateWatcher`, polled with `GetWatcherEvents`.
#[derive(Default)]
pub struct Watchers {
    by_id: Mutex<HashMap<String, Arc<PolledWatcher>>>,
}

/// One `CreateWatcher` watcher: a task filling a buffer that `GetWatcherEvents` drains.
struct PolledWatcher {
    buffer: Mutex<Buffer>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct Buffer {
    events: Vec<FilesystemEvent>,
    /// Set when the watcher stopped; returned by every later `GetWatcherEvents`.
    error: Option<ConnectError>,
}

impl Watchers {
    fn insert(&self, id: String, w: Arc<PolledWatcher>) {
        self.by_id.lock().expect("watchers lock").insert(id, w);
    }

    fn get(&self, id: &str) -> Result<Arc<PolledWatcher>, ConnectError> {
        self.by_id
            .lock()
            .expect("watchers lock")
            .get(id)
            .cloned()
            .ok_or_else(|| connect_error(FsError::WatcherNotFound(id.to_owned())))
    }

    fn remove(&self, id: &str) -> Result<(), ConnectError> {
        let w = self
            .by_id
            .lock()
            .expect("watchers lock")
            .remove(id)
            .ok_or_else(|| connect_error(FsError::WatcherNotFound(id.to_owned())))?;
        if let Some(task) = w.task.lock().expect("watcher task lock").take() {
            // Aborting drops the DirWatcher, which closes its inotify instance.
            task.abort();
        }
        Ok(())
    }
}

impl Drop for PolledWatcher {
    fn drop(&mut self) {
        if let Ok(mut t) = self.task.lock()
            && let Some(task) = t.take()
        {
            task.abort();
        }
    }
}

/// `"w"` followed by 20 lowercase alphanumerics, as upstream's watcher ids.
fn watcher_id() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(21);
    id.push('w');
    for _ in 0..20 {
        id.push(CHARS[rng.random_range(0..CHARS.len())] as char);
    }
    id
}

/// Moves events from `watcher` into `polled` until the watcher fails or the buffer overflows.
async fn fill_buffer(mut watcher: DirWatcher, polled: std::sync::Weak<PolledWatcher>) {
    loop {
        let next = watcher.next().await;
        let Some(polled) = polled.upgrade() else {
            return;
        };
        let mut buf = polled.buffer.lock().expect("watcher buffer lock");
        match next {
            Ok(event) if buf.events.len() < MAX_BUFFERED_EVENTS => buf.events.push(event),
            Ok(_) => {
                buf.events.clear();
                buf.error = Some(ConnectError::resource_exhausted(format!(
                    "watcher buffer overflowed: more than {MAX_BUFFERED_EVENTS} events were not \
                     collected with GetWatcherEvents; the watcher stopped"
                )));
                return;
            }
            Err(e) => {
                buf.error = Some(connect_error(e));
                return;
            }
        }
    }
}

/// The Connect routes of `filesystem.Filesystem`.
pub fn router(envd: Arc<Envd>) -> axum::Router {
    let e = envd;
    RpcRouter::new()
        .unary("/filesystem.Filesystem/Stat", {
            let envd = e.clone();
            move |ctx, req: StatRequest| {
                let envd = envd.clone();
                async move {
                    let (user, path) = user_and_path(&envd, &ctx, &req.path)?;
                    let entry = as_user(&user, move || ops::stat(&path, &Names::load())).await?;
                    Ok(StatResponse { entry: Some(entry) })
                }
            }
        })
        .unary("/filesystem.Filesystem/MakeDir", {
            let envd = e.clone();
            move |ctx, req: MakeDirRequest| {
                let envd = envd.clone();
                async move {
                    let (user, path) = user_and_path(&envd, &ctx, &req.path)?;
                    let entry =
                        as_user(&user, move || ops::make_dir(&path, &Names::load())).await?;
                    Ok(MakeDirResponse { entry: Some(entry) })
                }
            }
        })
        .unary("/filesystem.Filesystem/Move", {
            let envd = e.clone();
            move |ctx, req: MoveRequest| {
                let envd = envd.clone();
                async move {
                    let (user, source) = user_and_path(&envd, &ctx, &req.source)?;
                    let destination = resolve(&envd, &user, &req.destination)?;
                    let entry = as_user(&user, move || {
                        ops::rename(&source, &destination, &Names::load())
                    })
                    .await?;
                    Ok(MoveResponse { entry: Some(entry) })
                }
            }
        })
        .unary("/filesystem.Filesystem/ListDir", {
            let envd = e.clone();
            move |ctx, req: ListDirRequest| {
                let envd = envd.clone();
                async move {
                    let (user, path) = user_and_path(&envd, &ctx, &req.path)?;
                    let entries = as_user(&user, move || {
                        ops::list_dir(&path, req.depth, &Names::load())
                    })
                    .await?;
                    Ok(ListDirResponse { entries })
                }
            }
        })
        .unary("/filesystem.Filesystem/Remove", {
            let envd = e.clone();
            move |ctx, req: RemoveRequest| {
                let envd = envd.clone();
                async move {
                    let (user, path) = user_and_path(&envd, &ctx, &req.path)?;
                    as_user(&user, move || ops::remove(&path)).await?;
                    Ok(RemoveResponse {})
                }
            }
        })
        .server_stream("/filesystem.Filesystem/WatchDir", {
            let envd = e.clone();
            move |ctx, req: WatchDirRequest| {
                let envd = envd.clone();
                async move { watch_dir(&envd, ctx, req).await }
            }
        })
        .unary("/filesystem.Filesystem/CreateWatcher", {
            let envd = e.clone();
            move |ctx, req: CreateWatcherRequest| {
                let envd = envd.clone();
                async move {
                    let (user, path) = user_and_path(&envd, &ctx, &req.path)?;
                    let options = WatchOptions {
                        recursive: req.recursive,
                        include_entry: req.include_entry,
                        allow_network_mounts: req.allow_network_mounts,
                    };
                    let watcher = DirWatcher::start(path, options, &user)
                        .await
                        .map_err(connect_error)?;
                    let polled = Arc::new(PolledWatcher {
                        buffer: Mutex::default(),
                        task: Mutex::new(None),
                    });
                    let task = tokio::spawn(fill_buffer(watcher, Arc::downgrade(&polled)));
                    *polled.task.lock().expect("watcher task lock") = Some(task.abort_handle());
                    let id = watcher_id();
                    envd.watchers.insert(id.clone(), polled);
                    Ok(CreateWatcherResponse { watcher_id: id })
                }
            }
        })
        .unary("/filesystem.Filesystem/GetWatcherEvents", {
            let envd = e.clone();
            move |_ctx, req: GetWatcherEventsRequest| {
                let envd = envd.clone();
                async move {
                    let polled = envd.watchers.get(&req.watcher_id)?;
                    let mut buf = polled.buffer.lock().expect("watcher buffer lock");
                    if let Some(err) = &buf.error {
                        return Err(err.clone());
                    }
                    Ok(GetWatcherEventsResponse {
                        events: std::mem::take(&mut buf.events),
                    })
                }
            }
        })
        .unary("/filesystem.Filesystem/RemoveWatcher", {
            let envd = e.clone();
            move |_ctx, req: RemoveWatcherRequest| {
                let envd = envd.clone();
                async move {
                    envd.watchers.remove(&req.watcher_id)?;
                    Ok(RemoveWatcherResponse {})
                }
            }
        })
        .into_router()
}

fn watch_response(event: watch_dir_response::Event) -> WatchDirResponse {
    WatchDirResponse { event: Some(event) }
}

async fn watch_dir(
    envd: &Envd,
    ctx: RequestContext,
    req: WatchDirRequest,
) -> Result<BoxStream<WatchDirResponse>, ConnectError> {
    let (user, path) = user_and_path(envd, &ctx, &req.path)?;
    let options = WatchOptions {
        recursive: req.recursive,
        include_entry: req.include_entry,
        allow_network_mounts: req.allow_network_mounts,
    };
    let watcher = DirWatcher::start(path, options, &user)
        .await
        .map_err(connect_error)?;
    // Ends after the first error (sent as the end-of-stream error). Dropping the stream
    // (client gone, deadline) drops the watcher and its inotify instance.
    let events = futures::stream::unfold(Some(watcher), |state| async move {
        let mut watcher = state?;
        match watcher.next().await {
            Ok(event) => Some((
                Ok(watch_response(watch_dir_response::Event::Filesystem(event))),
                Some(watcher),
            )),
            Err(e) => Some((Err(connect_error(e)), None)),
        }
    });
    let interval = ctx.keepalive_interval(DEFAULT_KEEPALIVE);
    let events = wrenn_connect::with_keepalive(events, interval, || {
        Ok(watch_response(watch_dir_response::Event::Keepalive(
            watch_dir_response::KeepAlive {},
        )))
    });
    let start = futures::stream::once(async {
        Ok(watch_response(watch_dir_response::Event::Start(
            watch_dir_response::StartEvent {},
        )))
    });
    Ok(Box::pin(start.chain(events)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_ids_look_like_upstream() {
        let id = watcher_id();
        assert_eq!(id.len(), 21);
        assert!(id.starts_with('w'));
        assert!(
            id[1..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(watcher_id(), id);
    }
}
