//! The REST API (`/health`, `/init`, `/envs`, `/metrics`, `/files`, `/snapshot/prepare`) and
//! access-token auth, against the real envd binary.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256, Sha512};
use support::Envd;

const UNAUTHORIZED: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";
/// `nobody` exists on every Linux system; tests that need a non-root user use it.
const NOBODY_UID: u32 = 65534;

fn sha512_hex(s: &str) -> String {
    hex::encode(Sha512::digest(s.as_bytes()))
}

/// The SDKs' signed-URL formula, computed independently of envd, percent-encoded for a query
/// (standard base64 has `+`, which a query would read as a space).
fn sign(path: &str, op: &str, user: &str, token: &str, exp: Option<i64>) -> String {
    let mut text = format!("{path}:{op}:{user}:{token}");
    if let Some(e) = exp {
        text += &format!(":{e}");
    }
    q(&format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(text.as_bytes()))
    ))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn q(s: &str) -> String {
    // Minimal percent-encoding for query values (paths with '/' stay readable).
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A temp dir every user may write into (the non-root tests write as `nobody`).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn getxattr(path: &Path, name: &str) -> Option<String> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a writable buffer of the given length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(String::from_utf8(buf).unwrap())
}

async fn json_body(resp: reqwest::Response) -> Value {
    let bytes = resp.bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(&bytes)))
}

async fn init(envd: &Envd, body: Value) -> (u16, Value) {
    let resp = envd
        .client
        .post(envd.url("/init"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["x-envd-version"], "0.6.4");
    let bytes = resp.bytes().await.unwrap();
    (
        status,
        if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        },
    )
}

async fn envs(envd: &Envd, token: Option<&str>) -> (u16, Value) {
    let mut req = envd.client.get(envd.url("/envs"));
    if let Some(t) = token {
        req = req.header("x-access-token", t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, json_body(resp).await)
}

/// Uploads `data` raw to `path` (query), with extra headers.
async fn put_raw(
    envd: &Envd,
    query: &str,
    data: Vec<u8>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = envd
        .client
        .post(envd.url(&format!("/files?{query}")))
        .header("content-type", "application/octet-stream")
        .body(data);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn get_file(envd: &Envd, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = envd.client.get(envd.url(&format!("/files?{query}")));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn health_is_open_and_uncached() {
    let envd = Envd::start(&["--access-token", "secret"]);
    let resp = envd.client.get(envd.url("/health")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(resp.headers()["cache-control"], "no-store");
}

#[tokio::test]
async fn init_sets_env_vars_and_defaults() {
    let envd = Envd::start(&[]);
    let dir = open_tempdir();
    let workdir = dir.path().to_str().unwrap();

    let (status, _) = init(&envd, json!({"envVars": {"A": "1", "B": "two"}})).await;
    assert_eq!(status, 204);
    assert_eq!(
        envs(&envd, None).await,
        (200, json!({"A": "1", "B": "two"}))
    );
    // envVars replaces the whole set; a body without it leaves the set alone.
    assert_eq!(init(&envd, json!({"envVars": {"C": "3"}})).await.0, 204);
    assert_eq!(envs(&envd, None).await.1, json!({"C": "3"}));
    assert_eq!(init(&envd, json!({})).await.0, 204);
    assert_eq!(envs(&envd, None).await.1, json!({"C": "3"}));

    // Default user and workdir: an upload without username belongs to the new default user,
    // and an empty download path points at the workdir (a directory: 400 naming it).
    assert_eq!(
        init(
            &envd,
            json!({"defaultUser": "nobody", "defaultWorkdir": workdir})
        )
        .await
        .0,
        204
    );
    let target = dir.path().join("by-default-user.txt");
    let resp = put_raw(
        &envd,
        &format!("path={}", q(target.to_str().unwrap())),
        b"x".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(std::fs::metadata(&target).unwrap().uid(), NOBODY_UID);
    let resp = get_file(&envd, "path=", &[]).await;
    assert_eq!(resp.status().as_u16(), 400);
    let body = json_body(resp).await;
    assert_eq!(
        body,
        json!({"code": 400, "message": format!("path '{workdir}' is a directory")})
    );

    // Bad JSON: 400 with a JSON error body; an empty body is an empty request.
    let resp = envd
        .client
        .post(envd.url("/init"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(json_body(resp).await["code"], 400);
    let resp = envd.client.post(envd.url("/init")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
}

#[tokio::test]
async fn init_token_change_needs_the_current_token() {
    let envd = Envd::start(&["--access-token", "tok-1"]);
    // Without proof nothing changes: neither a new token nor clearing it.
    let (status, body) = init(
        &envd,
        json!({"accessToken": "mine-now", "envVars": {"X": "1"}}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], 401);
    assert!(
        body["message"].as_str().unwrap().contains("does not match"),
        "{body}"
    );
    assert_eq!(init(&envd, json!({"envVars": {"X": "1"}})).await.0, 401);
    assert_eq!(envs(&envd, None).await.0, 401);
    assert_eq!(envs(&envd, Some("mine-now")).await.0, 401);
    assert_eq!(envs(&envd, Some("tok-1")).await, (200, json!({})));

    // The holder of the current token may re-initialize.
    assert_eq!(
        init(
            &envd,
            json!({"accessToken": "tok-1", "envVars": {"X": "1"}})
        )
        .await
        .0,
        204
    );
    assert_eq!(envs(&envd, Some("tok-1")).await, (200, json!({"X": "1"})));
}

#[tokio::test]
async fn init_token_must_match_the_configured_hash() {
    let envd = Envd::start(&["--access-token-hash", &sha512_hex("good")]);
    // No token yet, but a hash is configured: no first-caller claim.
    let (status, _) = init(&envd, json!({"accessToken": "bad", "envVars": {"X": "1"}})).await;
    assert_eq!(status, 401);
    assert_eq!(init(&envd, json!({"envVars": {"X": "1"}})).await.0, 401);
    assert_eq!(
        envs(&envd, None).await,
        (200, json!({})),
        "nothing changed, still open"
    );

    assert_eq!(init(&envd, json!({"accessToken": "good"})).await.0, 204);
    assert_eq!(envs(&envd, None).await.0, 401);
    assert_eq!(envs(&envd, Some("good")).await.0, 200);
}

#[tokio::test]
async fn init_first_setup_then_protected() {
    let envd = Envd::start(&[]);
    // Nothing set and no hash: first setup (template build) may set a token...
    assert_eq!(init(&envd, json!({"accessToken": "first"})).await.0, 204);
    assert_eq!(envs(&envd, None).await.0, 401);
    // ...and after that nobody can take over without it.
    assert_eq!(init(&envd, json!({"accessToken": "second"})).await.0, 401);
    assert_eq!(envs(&envd, Some("first")).await.0, 200);
    assert_eq!(envs(&envd, Some("second")).await.0, 401);
}

#[tokio::test]
async fn init_ignores_replayed_timestamps() {
    let envd = Envd::start(&[]);
    let t = |s: &str| format!("2030-01-01T00:00:{s}Z");
    assert_eq!(
        init(
            &envd,
            json!({"timestamp": t("10"), "envVars": {"V": "new"}})
        )
        .await
        .0,
        204
    );
    assert_eq!(
        init(
            &envd,
            json!({"timestamp": t("05"), "envVars": {"V": "old"}})
        )
        .await
        .0,
        204
    );
    assert_eq!(envs(&envd, None).await.1, json!({"V": "new"}));
    assert_eq!(
        init(
            &envd,
            json!({"timestamp": t("10"), "envVars": {"V": "same"}})
        )
        .await
        .0,
        204
    );
    assert_eq!(envs(&envd, None).await.1, json!({"V": "new"}));
    assert_eq!(
        init(
            &envd,
            json!({"timestamp": "2030-01-01T00:00:11.5+00:00", "envVars": {"V": "newer"}})
        )
        .await
        .0,
        204
    );
    assert_eq!(envs(&envd, None).await.1, json!({"V": "newer"}));
    assert_eq!(init(&envd, json!({"timestamp": "yesterday"})).await.0, 400);
}

/// A one-route metadata service on loopback; returns its URL and the Accept headers it saw.
async fn metadata_service(doc: Value) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).to_lowercase();
            let accept = text
                .lines()
                .find_map(|l| l.strip_prefix("accept:"))
                .unwrap_or("")
                .trim()
                .to_owned();
            seen2.lock().unwrap().push(accept);
            let body = doc.to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        }
    });
    (format!("http://{addr}/"), seen)
}

#[tokio::test]
async fn init_uses_the_metadata_service_hash() {
    let doc = json!({"instanceID": "sbx-1", "envID": "tpl-1", "accessTokenHash": sha512_hex("meta-token")});
    let (url, seen) = metadata_service(doc).await;
    let envd = Envd::start(&["--metadata-url", &url]);
    assert_eq!(init(&envd, json!({"accessToken": "guess"})).await.0, 401);
    assert_eq!(envs(&envd, None).await.0, 200, "still no token");
    assert_eq!(
        init(
            &envd,
            json!({"accessToken": "meta-token", "envVars": {"K": "v"}})
        )
        .await
        .0,
        204
    );
    assert_eq!(envs(&envd, None).await.0, 401);
    assert_eq!(
        envs(&envd, Some("meta-token")).await,
        (200, json!({"K": "v"}))
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.len() >= 2,
        "envd reads the metadata service on every /init: {seen:?}"
    );
    assert!(seen.iter().all(|a| a == "application/json"), "{seen:?}");
}

#[tokio::test]
async fn metrics_report_usage() {
    let envd = Envd::start(&[]);
    let resp = envd.client.get(envd.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let m = json_body(resp).await;
    for key in [
        "ts",
        "cpu_count",
        "mem_total",
        "mem_used",
        "mem_cache",
        "mem_total_mib",
        "mem_used_mib",
        "disk_used",
        "disk_total",
    ] {
        assert!(m[key].is_u64(), "{key} in {m}");
    }
    assert!((m["ts"].as_i64().unwrap() - now()).abs() < 60);
    assert!(m["cpu_count"].as_u64().unwrap() >= 1);
    let pct = m["cpu_used_pct"]
        .as_f64()
        .expect("cpu_used_pct is a number");
    assert!((0.0..=100.0).contains(&pct));
    assert!(m["mem_used"].as_u64().unwrap() < m["mem_total"].as_u64().unwrap());
    assert_eq!(
        m["mem_total_mib"].as_u64().unwrap(),
        m["mem_total"].as_u64().unwrap() / (1024 * 1024)
    );
    assert!(m["disk_used"].as_u64().unwrap() > 0);
    assert!(m["disk_used"].as_u64().unwrap() <= m["disk_total"].as_u64().unwrap());
}

#[tokio::test]
async fn upload_multipart_and_download() {
    let envd = Envd::start(&[]);
    let dir = open_tempdir();
    let dest = dir.path().join("sub/dir/hello.txt");
    let dest_s = dest.to_str().unwrap();

    // One part, destination in the query; parents are created.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"hello world".to_vec()).file_name("ignored.txt"),
    );
    let resp = envd
        .client
        .post(envd.url(&format!("/files?path={}", q(dest_s))))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        json_body(resp).await,
        json!([{"path": dest_s, "name": "hello.txt", "type": "file"}])
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"hello world");
    assert_eq!(
        std::fs::metadata(&dest).unwrap().mode() & 0o777,
        0o644,
        "0666 minus umask 022"
    );

    // Download, identity.
    let resp = get_file(&envd, &format!("path={}", q(dest_s)), &[]).await;
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-length"], "11");
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(h["content-disposition"], "inline; filename=\"hello.txt\"");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"hello world");

    // Download, gzip.
    let resp = get_file(
        &envd,
        &format!("path={}", q(dest_s)),
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(gunzip(&resp.bytes().await.unwrap()), b"hello world");

    // A range.
    let resp = get_file(
        &envd,
        &format!("path={}", q(dest_s)),
        &[("range", "bytes=6-")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(resp.headers()["content-range"], "bytes 6-10/11");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"world");

    // Unknown extension: octet-stream.
    let bin = dir.path().join("blob.zzzunknown");
    std::fs::write(&bin, b"\x00\x01").unwrap();
    let resp = get_file(&envd, &format!("path={}", q(bin.to_str().unwrap())), &[]).await;
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
}

#[tokio::test]
async fn upload_many_files_by_filename() {
    let envd = Envd::start(&[]);
    let dir = open_tempdir();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("nested/deeper/b.bin");
    // A relative filename resolves against the user's home (root's here); clean it up after.
    let rel = format!("wrenn-http-test-{}/rel.txt", std::process::id());
    let home_dir = Path::new("/root").join(rel.split('/').next().unwrap());
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&home_dir);

    let part = |data: &[u8], name: &str| {
        reqwest::multipart::Part::bytes(data.to_vec()).file_name(name.to_owned())
    };
    let form = reqwest::multipart::Form::new()
        .part("file", part(b"A", a.to_str().unwrap()))
        .text("other", "ignored")
        .part("file", part(b"B", b.to_str().unwrap()))
        .part("file", part(b"R", &rel));
    let resp = envd
        .client
        .post(envd.url("/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = json_body(resp).await;
    let paths: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    let rel_abs = format!("/root/{rel}");
    assert_eq!(
        paths,
        vec![a.to_str().unwrap(), b.to_str().unwrap(), rel_abs.as_str()]
    );
    assert_eq!(std::fs::read(&a).unwrap(), b"A");
    assert_eq!(std::fs::read(&b).unwrap(), b"B");
    assert_eq!(std::fs::read(&rel_abs).unwrap(), b"R");

    // Two parts for one path: 400.
    let form = reqwest::multipart::Form::new()
        .part("file", part(b"1", a.to_str().unwrap()))
        .part(
            "file",
            part(
                b"2",
                &format!("{}/../a.txt", dir.path().join("nested").display()),
            ),
        );
    let resp = envd
        .client
        .post(envd.url("/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(
        json_body(resp).await["message"]
            .as_str()
            .unwrap()
            .contains("same path")
    );

    // No part named `file`: 400.
    let form = reqwest::multipart::Form::new().text("other", "x");
    let resp = envd
        .client
        .post(envd.url("/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn upload_octet_stream_gzip_and_metadata() {
    let envd = Envd::start(&[]);
    let dir = open_tempdir();
    let f = dir.path().join("raw.txt");
    let fq = format!("path={}", q(f.to_str().unwrap()));

    // Raw body, with metadata.
    let resp = put_raw(
        &envd,
        &fq,
        b"raw data".to_vec(),
        &[("x-metadata-Owner", "me"), ("x-metadata-kind", "a b")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    let body = json_body(resp).await;
    assert_eq!(body[0]["metadata"], json!({"owner": "me", "kind": "a b"}));
    assert_eq!(std::fs::read(&f).unwrap(), b"raw data");
    assert_eq!(getxattr(&f, "user.e2b.owner").as_deref(), Some("me"));
    assert_eq!(getxattr(&f, "user.e2b.kind").as_deref(), Some("a b"));

    // Gzip-compressed raw body; the new upload replaces the metadata set.
    let data = b"compressed ".repeat(1000);
    let resp = put_raw(
        &envd,
        &fq,
        gzip(&data),
        &[("content-encoding", "gzip"), ("x-metadata-kind", "z")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(std::fs::read(&f).unwrap(), data);
    assert_eq!(getxattr(&f, "user.e2b.owner"), None);
    assert_eq!(getxattr(&f, "user.e2b.kind").as_deref(), Some("z"));

    // Gzip-compressed multipart body.
    let g = dir.path().join("gz-multipart.txt");
    let form_body = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\nfrom gzip multipart\r\n--XyZ--\r\n",
        g.display()
    );
    let resp = envd
        .client
        .post(envd.url("/files"))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .header("content-encoding", "gzip")
        .body(gzip(form_body.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(std::fs::read(&g).unwrap(), b"from gzip multipart");

    // Refusals: other encodings, octet-stream without path, other content types, bad metadata,
    // corrupt gzip.
    let resp = put_raw(&envd, &fq, b"x".to_vec(), &[("content-encoding", "br")]).await;
    assert_eq!(resp.status().as_u16(), 400);
    let resp = put_raw(&envd, "", b"x".to_vec(), &[]).await;
    assert_eq!(resp.status().as_u16(), 400);
    let resp = envd
        .client
        .post(envd.url(&format!("/files?{fq}")))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body = json_body(resp).await;
    assert_eq!(body["code"], 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unsupported content type")
    );
    let long_key = format!("x-metadata-{}", "k".repeat(250));
    let resp = put_raw(&envd, &fq, b"x".to_vec(), &[(&long_key, "v")]).await;
    assert_eq!(resp.status().as_u16(), 400);
    let resp = put_raw(
        &envd,
        &fq,
        b"not gzip at all".to_vec(),
        &[("content-encoding", "gzip")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn files_act_as_the_requested_user() {
    let envd = Envd::start(&[]);
    let dir = open_tempdir();

    // Written as nobody: the file and the parents it creates belong to nobody.
    let f = dir.path().join("by-nobody/inner/file.txt");
    let resp = put_raw(
        &envd,
        &format!("path={}&username=nobody", q(f.to_str().unwrap())),
        b"n".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), NOBODY_UID);
    let parent = std::fs::metadata(dir.path().join("by-nobody")).unwrap();
    assert_eq!((parent.uid(), parent.mode() & 0o777), (NOBODY_UID, 0o755));

    // An upload is written by envd and given to the user, as upstream envd does: into a
    // root-owned 0755 directory, and below directories that do not exist yet (`/0/x.txt`).
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = closed.join("new/deeper/x.txt");
    let resp = put_raw(
        &envd,
        &format!("path={}&username=nobody", q(target.to_str().unwrap())),
        b"n".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(std::fs::read(&target).unwrap(), b"n");
    for made in [
        target.as_path(),
        target.parent().unwrap(),
        &closed.join("new"),
    ] {
        assert_eq!(
            std::fs::metadata(made).unwrap().uid(),
            NOBODY_UID,
            "{}",
            made.display()
        );
    }
    assert_eq!(
        std::fs::metadata(&closed).unwrap().uid(),
        0,
        "an existing parent keeps its owner"
    );
    // An existing root-owned file is given to the uploader too, then truncated.
    let existing = closed.join("root-owned.txt");
    std::fs::write(&existing, b"old content, longer").unwrap();
    let resp = put_raw(
        &envd,
        &format!("path={}&username=nobody", q(existing.to_str().unwrap())),
        b"new".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(std::fs::read(&existing).unwrap(), b"new");
    assert_eq!(std::fs::metadata(&existing).unwrap().uid(), NOBODY_UID);
    // A directory in the way is the caller's mistake; nothing is changed.
    let resp = put_raw(
        &envd,
        &format!("path={}&username=nobody", q(closed.to_str().unwrap())),
        b"n".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 400);
    let resp = put_raw(
        &envd,
        &format!(
            "path={}&username=nobody",
            q(&format!("{}/under-a-file", existing.display()))
        ),
        b"n".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(std::fs::read(&existing).unwrap(), b"new");
    assert_eq!(std::fs::metadata(&closed).unwrap().uid(), 0);

    // Reads still run with the user's permissions: nobody cannot read a root-only file.
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, b"root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sq = format!("path={}", q(secret.to_str().unwrap()));
    let resp = get_file(&envd, &format!("{sq}&username=nobody"), &[]).await;
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(json_body(resp).await["code"], 403);
    let resp = get_file(&envd, &format!("{sq}&username=root"), &[]).await;
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"root only");

    // Unknown user: 401.
    let resp = get_file(&envd, &format!("{sq}&username=no-such-user-here"), &[]).await;
    assert_eq!(resp.status().as_u16(), 401);
    let resp = put_raw(
        &envd,
        &format!("{sq}&username=no-such-user-here"),
        b"n".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn download_errors() {
    let envd = Envd::start(&[]);
    let dir = open_tempdir();
    let missing = dir.path().join("missing.txt");
    let resp = get_file(
        &envd,
        &format!("path={}", q(missing.to_str().unwrap())),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(
        json_body(resp).await,
        json!({"code": 404, "message": format!("path '{}' does not exist", missing.display())})
    );
    let resp = get_file(
        &envd,
        &format!("path={}", q(dir.path().to_str().unwrap())),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 400);
    assert!(
        json_body(resp).await["message"]
            .as_str()
            .unwrap()
            .contains("is a directory")
    );
    let f = dir.path().join("f.txt");
    std::fs::write(&f, b"x").unwrap();
    let resp = get_file(
        &envd,
        &format!("path={}", q(f.to_str().unwrap())),
        &[("accept-encoding", "br, identity;q=0")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 406);
}

#[tokio::test]
async fn access_token_guards_every_endpoint() {
    let envd = Envd::start(&["--access-token", "tok"]);
    let wrong = [("x-access-token", "nope")];
    let right = [("x-access-token", "tok")];

    // Connect RPC.
    let (status, body) = envd.unary("/process.Process/List", json!({}), &[]).await;
    assert_eq!(
        (status, body),
        (401, json!({"code": 401, "message": UNAUTHORIZED}))
    );
    assert_eq!(
        envd.unary("/process.Process/List", json!({}), &wrong)
            .await
            .0,
        401
    );
    assert_ne!(
        envd.unary("/process.Process/List", json!({}), &right)
            .await
            .0,
        401
    );

    // REST.
    for path in ["/envs", "/metrics"] {
        let resp = envd.client.get(envd.url(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path}");
        assert_eq!(json_body(resp).await["message"], UNAUTHORIZED);
        let resp = envd
            .client
            .get(envd.url(path))
            .header("x-access-token", "nope")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path}");
        let resp = envd
            .client
            .get(envd.url(path))
            .header("x-access-token", "tok")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    let resp = envd
        .client
        .post(envd.url("/snapshot/prepare"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // /files with the header.
    let dir = open_tempdir();
    let f = dir.path().join("t.txt");
    let fq = format!("path={}", q(f.to_str().unwrap()));
    assert_eq!(
        put_raw(&envd, &fq, b"t".to_vec(), &[])
            .await
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        put_raw(&envd, &fq, b"t".to_vec(), &wrong)
            .await
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        put_raw(&envd, &fq, b"t".to_vec(), &right)
            .await
            .status()
            .as_u16(),
        200
    );
    assert_eq!(get_file(&envd, &fq, &[]).await.status().as_u16(), 401);
    assert_eq!(get_file(&envd, &fq, &right).await.status().as_u16(), 200);
}

#[tokio::test]
async fn signed_urls() {
    let token = "sig-token";
    let envd = Envd::start(&["--access-token", token]);
    let dir = open_tempdir();
    let f = dir.path().join("signed.txt");
    let p = f.to_str().unwrap();

    // Write with a write signature (for user nobody: the username is part of what is signed).
    let wsig = sign(p, "write", "nobody", token, None);
    let resp = put_raw(
        &envd,
        &format!("path={}&username=nobody&signature={wsig}", q(p)),
        b"signed".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), NOBODY_UID);
    // The same signature with another user, or for reading, is refused.
    let resp = put_raw(
        &envd,
        &format!("path={}&signature={wsig}", q(p)),
        b"x".to_vec(),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        get_file(
            &envd,
            &format!("path={}&username=nobody&signature={wsig}", q(p)),
            &[]
        )
        .await
        .status()
        .as_u16(),
        401
    );

    // Read with a read signature; with a future expiry; expired; wrong.
    let rsig = sign(p, "read", "", token, None);
    let resp = get_file(&envd, &format!("path={}&signature={rsig}", q(p)), &[]).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"signed");
    let exp = now() + 300;
    let esig = sign(p, "read", "", token, Some(exp));
    let resp = get_file(
        &envd,
        &format!("path={}&signature={esig}&signature_expiration={exp}", q(p)),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    // The expiry is signed: changing it breaks the signature.
    let resp = get_file(
        &envd,
        &format!(
            "path={}&signature={esig}&signature_expiration={}",
            q(p),
            exp + 1
        ),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401);
    let old = now() - 10;
    let osig = sign(p, "read", "", token, Some(old));
    let resp = get_file(
        &envd,
        &format!("path={}&signature={osig}&signature_expiration={old}", q(p)),
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        json_body(resp).await,
        json!({"code": 401, "message": "signature is already expired"})
    );
    let bad = sign(p, "read", "", "other-token", None);
    assert_eq!(
        get_file(&envd, &format!("path={}&signature={bad}", q(p)), &[])
            .await
            .status()
            .as_u16(),
        401
    );
    let other = sign("/etc/shadow", "read", "", token, None);
    assert_eq!(
        get_file(&envd, &format!("path={}&signature={other}", q(p)), &[])
            .await
            .status()
            .as_u16(),
        401
    );

    // A present but wrong header fails even next to a valid signature.
    let resp = get_file(
        &envd,
        &format!("path={}&signature={rsig}", q(p)),
        &[("x-access-token", "wrong")],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 401);
    // Signatures only open /files.
    let resp = envd
        .client
        .get(envd.url(&format!("/envs?path={}&signature={rsig}", q(p))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn snapshot_prepare_answers_204() {
    let envd = Envd::start(&["--access-token", "tok"]);
    let resp = envd
        .client
        .post(envd.url("/snapshot/prepare"))
        .header("x-access-token", "tok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    // /init afterwards resumes.
    assert_eq!(init(&envd, json!({"accessToken": "tok"})).await.0, 204);
    assert_eq!(
        envd.client
            .get(envd.url("/health"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        204
    );
}

/// Peak resident memory of a process, in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test]
async fn hundred_megabyte_round_trip() {
    const SIZE: usize = 100 * 1024 * 1024;
    let envd = Envd::start(&[]);
    let dir = open_tempdir();
    let f = dir.path().join("big.bin");
    let fq = format!("path={}", q(f.to_str().unwrap()));

    // Pseudo-random, incompressible content.
    let mut data = vec![0u8; SIZE];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want = hex::encode(Sha256::digest(&data));

    // Stream the upload in 1 MiB pieces, as an SDK streaming a file would.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(1024 * 1024).map(|c| Ok(c.to_vec())).collect();
    drop(data);
    let started = Instant::now();
    let resp = envd
        .client
        .post(envd.url(&format!("/files?{fq}")))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let upload = started.elapsed();
    assert_eq!(std::fs::metadata(&f).unwrap().len(), SIZE as u64);

    let started = Instant::now();
    let mut resp = get_file(&envd, &fq, &[]).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-length"], SIZE.to_string());
    let mut hasher = Sha256::new();
    let mut got = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len();
        hasher.update(&chunk);
    }
    let download = started.elapsed();
    assert_eq!(got, SIZE);
    assert_eq!(hex::encode(hasher.finalize()), want);

    // envd streamed: its peak memory stayed far below the file size.
    let peak = vm_hwm(envd.pid());
    eprintln!(
        "100 MiB: upload {upload:?}, download {download:?}, envd peak RSS {} MiB",
        peak / (1024 * 1024)
    );
    assert!(peak < 64 * 1024 * 1024, "envd peak RSS {peak} bytes");
    assert!(upload < Duration::from_secs(60) && download < Duration::from_secs(60));
}

/// A 1 MiB tmpfs, unmounted when dropped; `None` where mounting is not allowed.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount() -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn full_disk_answers_507() {
    let Some(fs) = SmallFs::mount() else {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    };
    let envd = Envd::start(&[]);
    let f = fs.0.path().join("too-big.bin");
    let resp = put_raw(
        &envd,
        &format!("path={}", q(f.to_str().unwrap())),
        vec![7u8; 3 * 1024 * 1024],
        &[],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 507);
    assert_eq!(
        json_body(resp).await,
        json!({"code": 507, "message": "not enough disk space available"})
    );
}
