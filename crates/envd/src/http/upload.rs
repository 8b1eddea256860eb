//! `POST /files`: writes one or more uploaded files as the requesting user.
//!
//! Bodies are `multipart/form-data` (parts named `file`) or `application/octet-stream`,
//! optionally gzip-compressed (`Content-Encoding: gzip`). Everything streams from the socket
//! to disk; no upload is held in memory.

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

impl From<io::Error> for OpenError {
    fn from(err: io::Error) -> Self {
        OpenError {
            what: "act as the requested user for",
            path: PathBuf::new(),
            err,
        }
    }
}

/// Creates `path`'s parents and the file as `user`, then streams `data` into it and sets its
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
    let file = crate::creds::run_as(user, move || {
        if let Some(parent) = target.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|err| OpenError {
                    what: "create directory",
                    path: parent.to_owned(),
                    err,
                })?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&target)
            .map_err(|err| OpenError {
                what: "open file for writing",
                path: target.clone(),
                err,
            })
    })
    .await
    .map_err(OpenError::from)
    .and_then(|r| r)
    .map_err(|e| {
        let p = if e.path.as_os_str().is_empty() {
            path
        } else {
            &e.path
        };
        EnvdError::io(e.what, p, &e.err)
    })?;

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
