//! `POST /files`: writes one or more uploaded files for the requesting user.
//!
//! Bodies are `multipart/form-data` (parts named `file`) or `application/octet-stream`,
//! optionally gzip-compressed (`Content-Encoding: gzip`). Everything streams from the socket
//! to disk; no upload is held in memory.
//!
//! As upstream envd does (and the SDKs' own suites expect), an upload is written by envd itself
//! (root), not under the user's credentials like the other filesystem calls: missing parent
//! directories are made (0755) and given to the user, and so is the file (an existing one
//! before it is truncated, a new one right after it is created). So a user may write anywhere,
//! e.g. `/0/x.txt`, and a watcher sees a new file as CREATE, CHMOD (the chown), WRITE. This
//! grants nothing the access token's holder lacks: it can run any command as root.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use async_compression::tokio::bufread::GzipDecoder;
use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, header};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio_util::io::{ReaderStream, StreamReader};

use super::{FilesQuery, HttpState, xattrs};
use crate::error::EnvdError;
use crate::user::User;

/// Size of the decompression output chunks and of the write buffer in front of the file.
const CHUNK: usize = 256 * 1024;

type BodyStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// One written file, as the SDKs expect it.
#[derive(Debug, Serialize)]
struct Entry {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<BTreeMap<String, String>>,
}

pub(super) async fn upload(State(st): State<Arc<HttpState>>, req: Request) -> Response {
    match handle(&st, req).await {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handle(st: &HttpState, req: Request) -> Result<Vec<Entry>, EnvdError> {
    let (parts, body) = req.into_parts();
    let q = FilesQuery::parse(&parts.uri)?;
    let user = st.envd.user(q.username.as_deref())?;
    let workdir = st.envd.defaults().workdir;
    let metadata = xattrs::from_headers(&parts.headers)?;
    let body = decoded_body(&parts.headers, body)?;
    let query_path = q.path.as_deref().filter(|p| !p.is_empty());

    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => {
            let boundary = multer::parse_boundary(content_type).map_err(|e| {
                EnvdError::InvalidArgument(format!("invalid multipart Content-Type: {e}"))
            })?;
            let mut multipart = multer::Multipart::new(body, boundary);
            let mut seen = HashSet::new();
            let mut entries = Vec::new();
            loop {
                let field = multipart
                    .next_field()
                    .await
                    .map_err(|e| EnvdError::InvalidArgument(format!("read multipart body: {e}")))?;
                let Some(field) = field else { break };
                if field.name() != Some("file") {
                    continue;
                }
                // The SDKs put the full destination path in the part's filename.
                let target = match query_path {
                    Some(p) => p.to_owned(),
                    None => field.file_name().unwrap_or("").to_owned(),
                };
                if target.is_empty() {
                    return Err(EnvdError::InvalidArgument(
                        "a 'file' part needs a filename when no path is given".into(),
                    ));
                }
                let path = crate::paths::resolve(&target, &user, workdir.as_deref())?;
                if !seen.insert(path.clone()) {
                    return Err(EnvdError::InvalidArgument(format!(
                        "cannot upload multiple files to the same path '{}'",
                        path.display()
                    )));
                }
                write_file(&user, &path, field, &metadata).await?;
                entries.push(entry(&path, &metadata));
            }
            if entries.is_empty() {
                return Err(EnvdError::InvalidArgument(
                    "no part named 'file' in the multipart body".into(),
                ));
            }
            Ok(entries)
        }
        "application/octet-stream" => {
            let target = query_path.ok_or_else(|| {
                EnvdError::InvalidArgument(
                    "the path query is required for application/octet-stream uploads".into(),
                )
            })?;
            let path = crate::paths::resolve(target, &user, workdir.as_deref())?;
            write_file(&user, &path, body, &metadata).await?;
            Ok(vec![entry(&path, &metadata)])
        }
        _ => Err(EnvdError::InvalidArgument(format!(
            "unsupported content type '{content_type}': use multipart/form-data or application/octet-stream"
        ))),
    }
}

fn entry(path: &Path, metadata: &BTreeMap<String, String>) -> Entry {
    Entry {
        path: path.display().to_string(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file",
        metadata: (!metadata.is_empty()).then(|| metadata.clone()),
    }
}

/// The request body as a stream of plain bytes, gunzipped when `Content-Encoding: gzip`.
fn decoded_body(headers: &HeaderMap, body: Body) -> Result<BodyStream, EnvdError> {
    let raw = body.into_data_stream().map_err(io::Error::other);
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => String::new(),
        Some(v) => v
            .to_str()
            .map_err(|_| EnvdError::InvalidArgument("invalid Content-Encoding header".into()))?
            .trim()
            .to_ascii_lowercase(),
    };
    match encoding.as_str() {
        "" | "identity" => Ok(Box::pin(raw)),
        "gzip" | "x-gzip" => {
            let mut decoder = GzipDecoder::new(StreamReader::new(raw));
            // `gzip -c a b` output (concatenated members) is valid gzip too.
            decoder.multiple_members(true);
            Ok(Box::pin(ReaderStream::with_capacity(decoder, CHUNK)))
        }
        other => Err(EnvdError::InvalidArgument(format!(
            "unsupported Content-Encoding '{other}', supported: gzip"
        ))),
    }
}

/// A failed step of opening the destination, with what was being done.
struct OpenError {
    what: &'static str,
    path: PathBuf,
    err: io::Error,
}

impl OpenError {
    fn at(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |err| OpenError { what, path, err }
    }

    fn into_envd(self) -> EnvdError {
        if self.err.raw_os_error() == Some(libc::EISDIR) {
            return EnvdError::InvalidArgument(format!(
                "path is a directory: {}",
                self.path.display()
            ));
        }
        if self.err.raw_os_error() == Some(libc::ENOTDIR) {
            return EnvdError::InvalidArgument(format!("path is a file: {}", self.path.display()));
        }
        EnvdError::io(self.what, &self.path, &self.err)
    }
}

/// Makes `path`'s missing parents and opens it truncated for writing, as upstream envd: made
/// directories and the file belong to `owner` (`None`: envd is not root, nothing to give).
fn open_for(path: &Path, owner: Option<(u32, u32)>) -> Result<std::fs::File, OpenError> {
    if let Some(parent) = path.parent() {
        ensure_dirs(parent, owner)?;
    }
    let chown = |p: &Path| match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(p, Some(uid), Some(gid)),
        None => Ok(()),
    };
    let existed = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(OpenError::at("write", path)(io::Error::from_raw_os_error(
                libc::EISDIR,
            )));
        }
        Ok(_) => {
            chown(path).map_err(OpenError::at("change the owner of", path))?;
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(OpenError::at("stat", path)(e)),
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o666)
        .open(path)
        .map_err(OpenError::at("open file for writing", path))?;
    if !existed && let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            .map_err(OpenError::at("change the owner of", path))?;
    }
    Ok(file)
}

/// `mkdir -p` where every directory made (0755) is given to `owner`; an existing component
/// that is not a directory fails.
fn ensure_dirs(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), OpenError> {
    let mut chain: Vec<&Path> = dir.ancestors().collect();
    chain.reverse();
    for d in chain {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(OpenError::at("create directory", d)(
                    io::Error::from_raw_os_error(libc::ENOTDIR),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(OpenError::at("stat", d)(e)),
        }
        match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => {}
            // Made meanwhile by someone else, who may not have given it away yet: do it too.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(OpenError::at("create directory", d)(e)),
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(OpenError::at("change the owner of", d))?;
        }
    }
    Ok(())
}

/// Creates `path`'s parents and the file for `user`, then streams `data` into it and sets its
/// metadata. A failed upload leaves what was written so far, as upstream envd does.
async fn write_file<S, E>(
    user: &User,
    path: &Path,
    data: S,
    metadata: &BTreeMap<String, String>,
) -> Result<(), EnvdError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let target = path.to_owned();
    let owner = nix::unistd::geteuid()
        .is_root()
        .then_some((user.uid, user.gid));
    let file = tokio::task::spawn_blocking(move || open_for(&target, owner))
        .await
        .map_err(|e| EnvdError::Internal(format!("filesystem worker failed: {e}")))?
        .map_err(OpenError::into_envd)?;

    let mut out = tokio::io::BufWriter::with_capacity(CHUNK, tokio::fs::File::from_std(file));
    let mut data = std::pin::pin!(data);
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| {
            EnvdError::InvalidArgument(format!("read the upload for '{}': {e}", path.display()))
        })?;
        out.write_all(&chunk)
            .await
            .map_err(|e| EnvdError::io("write file", path, &e))?;
    }
    out.flush()
        .await
        .map_err(|e| EnvdError::io("write file", path, &e))?;

    let file = out.into_inner().into_std().await;
    let md = metadata.clone();
    tokio::task::spawn_blocking(move || xattrs::replace(&file, &md))
        .await
        .map_err(|e| EnvdError::Internal(format!("metadata worker failed: {e}")))?
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                EnvdError::FailedPrecondition(format!(
                    "the filesystem of '{}' does not support metadata (extended attributes)",
                    path.display()
                ))
            } else {
                EnvdError::io("set metadata on", path, &e)
            }
        })
}
