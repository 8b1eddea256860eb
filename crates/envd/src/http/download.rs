//! `GET /files`: streams one file to the client, read as the requesting user.
//!
//! The body is streamed from disk (never loaded whole), gzip-compressed on the fly when the
//! client accepts gzip, and a single `Range` is honoured (identity only, as upstream).

use std::io::SeekFrom;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use async_compression::Level;
use async_compression::tokio::bufread::GzipEncoder;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use tokio::io::{AsyncReadExt, AsyncSeekExt, BufReader};
use tokio_util::io::ReaderStream;

use super::{FilesQuery, HttpState, files_target};
use crate::error::{EnvdError, json_error};

/// Read size per chunk sent to the client.
const CHUNK: usize = 64 * 1024;

pub(super) async fn download(
    State(st): State<Arc<HttpState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match serve(&st, &uri, &headers).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn serve(st: &HttpState, uri: &Uri, headers: &HeaderMap) -> Result<Response, EnvdError> {
    let q = FilesQuery::parse(uri)?;
    let (user, path) = files_target(&st.envd, &q)?;
    let open_path = path.clone();
    let (file, meta) = crate::creds::run_as(&user, move || {
        // O_NONBLOCK so a FIFO cannot hang the open; it has no effect on regular files.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&open_path)?;
        let m = f.metadata()?;
        Ok::<_, std::io::Error>((f, m))
    })
    .await
    .and_then(|r| r)
    .map_err(|e| EnvdError::io("open file", &path, &e))?;
    if meta.is_dir() {
        return Err(EnvdError::InvalidArgument(format!(
            "path '{}' is a directory",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(EnvdError::InvalidArgument(format!(
            "path '{}' is not a regular file",
            path.display()
        )));
    }
    let len = meta.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let content_type = mime_guess::from_path(&path)
        .first_raw()
        .unwrap_or("application/octet-stream");

    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_DISPOSITION, content_disposition(&name))
        .header(header::VARY, "Accept-Encoding")
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(date) = meta.modified().ok().and_then(http_date) {
        resp = resp.header(header::LAST_MODIFIED, date);
    }
    let mut file = tokio::fs::File::from_std(file);

    // A range request is served uncompressed, whatever Accept-Encoding says.
    if let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        match parse_range(range, len) {
            Range::Bytes(start, end) => {
                file.seek(SeekFrom::Start(start))
                    .await
                    .map_err(|e| EnvdError::io("seek file", &path, &e))?;
                let n = end - start + 1;
                let body = Body::from_stream(ReaderStream::with_capacity(file.take(n), CHUNK));
                return Ok(finish(
                    resp.status(StatusCode::PARTIAL_CONTENT)
                        .header(header::ACCEPT_RANGES, "bytes")
                        .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                        .header(header::CONTENT_LENGTH, n),
                    body,
                ));
            }
            Range::Unsatisfiable => {
                let mut r = json_error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "requested range not satisfiable",
                );
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(r);
            }
            Range::Ignore => {}
        }
    }

    match choose_encoding(
        headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    ) {
        Some(Encoding::Gzip) => {
            let gz =
                GzipEncoder::with_quality(BufReader::with_capacity(CHUNK, file), Level::Fastest);
            let body = Body::from_stream(ReaderStream::with_capacity(gz, CHUNK));
            Ok(finish(
                resp.status(StatusCode::OK)
                    .header(header::CONTENT_ENCODING, "gzip"),
                body,
            ))
        }
        Some(Encoding::Identity) => {
            let body = Body::from_stream(ReaderStream::with_capacity(file, CHUNK));
            Ok(finish(
                resp.status(StatusCode::OK)
                    .header(header::ACCEPT_RANGES, "bytes")
                    .header(header::CONTENT_LENGTH, len),
                body,
            ))
        }
        None => Ok(json_error(
            StatusCode::NOT_ACCEPTABLE,
            "no acceptable encoding found, supported: [gzip]",
        )),
    }
}

fn finish(builder: http::response::Builder, body: Body) -> Response {
    builder
        .body(body)
        .unwrap_or_else(|e| EnvdError::Internal(format!("build response: {e}")).into_response())
}

/// `inline; filename="<name>"`, or the RFC 5987 form when the name is not plain ASCII.
fn content_disposition(name: &str) -> String {
    let plain = name
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        return format!("inline; filename=\"{name}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("inline; filename*=UTF-8''{encoded}")
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(t: std::time::SystemTime) -> Option<String> {
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from(t).format(&fmt).ok()
}

#[derive(Debug, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

/// Picks the response encoding from `Accept-Encoding` as upstream envd does: the first
/// acceptable coding in order of preference, where `*` means identity unless identity is
/// refused. `None` when neither gzip nor identity is acceptable (406).
fn choose_encoding(accept: Option<&str>) -> Option<Encoding> {
    let accept = accept.unwrap_or("").trim();
    if accept.is_empty() {
        return Some(Encoding::Identity);
    }
    let mut codings: Vec<(String, f32)> = accept
        .split(',')
        .map(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="))
                })
                .find_map(|v| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (coding, q)
        })
        .collect();
    let identity_q = codings
        .iter()
        .find(|(c, _)| c == "identity")
        .map(|(_, q)| *q);
    let star_q = codings.iter().find(|(c, _)| c == "*").map(|(_, q)| *q);
    let identity_refused = identity_q == Some(0.0) || (star_q == Some(0.0) && identity_q.is_none());
    // Stable: equal preferences keep the client's order.
    codings.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (coding, q) in &codings {
        if *q <= 0.0 {
            continue;
        }
        match coding.as_str() {
            "identity" => return Some(Encoding::Identity),
            "*" if identity_refused => return Some(Encoding::Gzip),
            "*" => return Some(Encoding::Identity),
            "gzip" | "x-gzip" => return Some(Encoding::Gzip),
            _ => {}
        }
    }
    (!identity_refused).then_some(Encoding::Identity)
}

#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// Inclusive byte range.
    Bytes(u64, u64),
    Unsatisfiable,
    /// Not a single byte range we serve: answer the whole file.
    Ignore,
}

fn parse_range(header: &str, len: u64) -> Range {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Range::Ignore;
    };
    if spec.contains(',') {
        return Range::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last `b` bytes.
        return match b.parse::<u64>() {
            Ok(0) => Range::Unsatisfiable,
            Ok(_) if len == 0 => Range::Unsatisfiable,
            Ok(n) => Range::Bytes(len.saturating_sub(n), len - 1),
            Err(_) => Range::Ignore,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return Range::Ignore;
    };
    if start >= len {
        return Range::Unsatisfiable;
    }
    let end = if b.is_empty() {
        len - 1
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(len - 1),
            _ => return Range::Ignore,
        }
    };
    Range::Bytes(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_encoding() {
        assert_eq!(choose_encoding(None), Some(Encoding::Identity));
        assert_eq!(choose_encoding(Some("gzip")), Some(Encoding::Gzip));
        assert_eq!(
            choose_encoding(Some("gzip, deflate, br")),
            Some(Encoding::Gzip)
        );
        assert_eq!(
            choose_encoding(Some("br;q=1, gzip;q=0")),
            Some(Encoding::Identity)
        );
        assert_eq!(choose_encoding(Some("*")), Some(Encoding::Identity));
        assert_eq!(
            choose_encoding(Some("identity;q=0, *")),
            Some(Encoding::Gzip)
        );
        assert_eq!(
            choose_encoding(Some("identity;q=0.1, gzip;q=0.9")),
            Some(Encoding::Gzip)
        );
        assert_eq!(
            choose_encoding(Some("identity, gzip")),
            Some(Encoding::Identity)
        );
        assert_eq!(choose_encoding(Some("br")), Some(Encoding::Identity));
        assert_eq!(
            choose_encoding(Some("*;q=0, identity")),
            Some(Encoding::Identity)
        );
        assert_eq!(choose_encoding(Some("br, identity;q=0")), None);
        assert_eq!(choose_encoding(Some("*;q=0")), None);
        assert_eq!(choose_encoding(Some("identity")), Some(Encoding::Identity));
    }

    #[test]
    fn parses_ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Range::Bytes(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Range::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Range::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-200", 100), Range::Bytes(0, 99));
        assert_eq!(parse_range("bytes=50-500", 100), Range::Bytes(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Range::Ignore);
        assert_eq!(parse_range("items=0-1", 100), Range::Ignore);
        assert_eq!(parse_range("bytes=5-1", 100), Range::Ignore);
    }

    #[test]
    fn formats_headers() {
        assert_eq!(content_disposition("a.txt"), "inline; filename=\"a.txt\"");
        assert_eq!(
            content_disposition("ä b"),
            "inline; filename*=UTF-8''%C3%A4%20b"
        );
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(784111777);
        assert_eq!(http_date(t).unwrap(), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
