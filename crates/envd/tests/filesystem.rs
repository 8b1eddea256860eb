//! `filesystem.Filesystem` against the real envd process (run as root): every RPC in JSON, a
//! few in the binary proto codec, entry fields, permissions of non-root users and watches.

mod support;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::{Value, json};
use support::{Envd, Item, basic};

const FS: &str = "/filesystem.Filesystem";

/// A temporary directory anyone may enter (tempfile makes them 0700), removed on drop.
fn tmp() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("wrenn-fs-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

async fn call(envd: &Envd, method: &str, body: Value, user: &str) -> (u16, Value) {
    let auth = basic(user);
    envd.unary(
        &format!("{FS}/{method}"),
        body,
        &[("authorization", auth.as_str())],
    )
    .await
}

async fn ok(envd: &Envd, method: &str, body: Value) -> Value {
    let (status, v) = call(envd, method, body.clone(), "root").await;
    assert_eq!(status, 200, "{method} {body}: {v}");
    v
}

async fn err_code(envd: &Envd, method: &str, body: Value, user: &str) -> String {
    let (status, v) = call(envd, method, body.clone(), user).await;
    assert_ne!(status, 200, "{method} {body} as {user} should fail: {v}");
    v["code"].as_str().unwrap_or_default().to_owned()
}

fn setxattr(path: &Path, name: &str, value: &str) {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let c_name = CString::new(name).unwrap();
    // SAFETY: valid C strings and a live buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

const NOBODY: u32 = 65534;

#[tokio::test]
async fn stat_reports_every_entry_field() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let file = dir.path().join("file.txt");
    std::fs::write(&file, b"hello").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    chown(&file, NOBODY, 0);
    setxattr(&file, "user.e2b.owner", "me");
    setxattr(&file, "user.other", "hidden");

    let v = ok(&envd, "Stat", json!({"path": p(&file)})).await;
    let e = &v["entry"];
    assert_eq!(e["name"], "file.txt");
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["path"], p(&file));
    assert_eq!(e["size"], "5");
    assert_eq!(e["mode"], 0o640);
    assert_eq!(e["permissions"], "-rw-r-----");
    assert_eq!(e["owner"], "nobody");
    assert_eq!(e["group"], "root");
    assert_eq!(e["metadata"], json!({"owner": "me"}));
    assert!(e.get("symlinkTarget").is_none(), "{e}");
    assert!(e.get("isSymlink").is_none_or(|s| s == false), "{e}");
    let mtime = std::fs::metadata(&file).unwrap().mtime();
    let reported = e["modifiedTime"].as_str().expect("modifiedTime");
    let parsed =
        time::OffsetDateTime::parse(reported, &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert_eq!(parsed.unix_timestamp(), mtime);

    // A directory, owner by numeric id when the id has no name.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1755)).unwrap();
    chown(&sub, 4_000_123, 4_000_124);
    let e = ok(&envd, "Stat", json!({"path": p(&sub)})).await["entry"].clone();
    assert_eq!(e["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(e["permissions"], "dtrwxr-xr-x");
    assert_eq!(e["mode"], 0o755);
    assert_eq!(e["owner"], "4000123");
    assert_eq!(e["group"], "4000124");
    assert!(e.get("metadata").is_none_or(|m| m == &json!({})), "{e}");
}

#[tokio::test]
async fn stat_symlinks_report_their_target() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let target = dir.path().join("target.sh");
    std::fs::write(&target, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.path().join("link");
    symlink("target.sh", &link).unwrap();
    // A chain: link2 -> link -> target.sh; the target is fully resolved.
    let link2 = dir.path().join("link2");
    symlink(&link, &link2).unwrap();
    let dangling = dir.path().join("dangling");
    symlink("missing", &dangling).unwrap();
    let dir_link = dir.path().join("dirlink");
    symlink(dir.path(), &dir_link).unwrap();

    let real_target = std::fs::canonicalize(&target).unwrap();
    for l in [&link, &link2] {
        let e = ok(&envd, "Stat", json!({"path": p(l)})).await["entry"].clone();
        assert_eq!(e["isSymlink"], true, "{e}");
        assert_eq!(e["type"], "FILE_TYPE_FILE", "{e}");
        assert_eq!(e["mode"], 0o755, "{e}");
        assert_eq!(e["permissions"], "Lrwxrwxrwx", "{e}");
        assert_eq!(e["symlinkTarget"], p(&real_target), "{e}");
        assert_eq!(e["path"], p(l));
    }
    let e = ok(&envd, "Stat", json!({"path": p(&dangling)})).await["entry"].clone();
    assert_eq!(e["isSymlink"], true, "{e}");
    assert!(
        e.get("type").is_none_or(|t| t == "FILE_TYPE_UNSPECIFIED"),
        "{e}"
    );
    assert_eq!(e["symlinkTarget"], p(&dangling), "{e}");
    let e = ok(&envd, "Stat", json!({"path": p(&dir_link)})).await["entry"].clone();
    assert_eq!(e["type"], "FILE_TYPE_DIRECTORY", "{e}");
    assert_eq!(
        e["symlinkTarget"],
        p(&std::fs::canonicalize(dir.path()).unwrap())
    );
}

#[tokio::test]
async fn missing_paths_and_unknown_users() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let missing = p(&dir.path().join("missing"));
    assert_eq!(
        err_code(&envd, "Stat", json!({"path": missing}), "root").await,
        "not_found"
    );
    assert_eq!(
        err_code(&envd, "ListDir", json!({"path": missing}), "root").await,
        "not_found"
    );
    assert_eq!(
        err_code(
            &envd,
            "Move",
            json!({"source": missing, "destination": p(&dir.path().join("x"))}),
            "root"
        )
        .await,
        "not_found"
    );
    // Remove of a missing path is success.
    ok(&envd, "Remove", json!({"path": missing})).await;
    assert_eq!(
        err_code(&envd, "Stat", json!({"path": "/"}), "no-such-user-xyz").await,
        "unauthenticated"
    );
    // Malformed requests are invalid_argument, never a crash.
    let (status, v) = envd
        .unary(&format!("{FS}/Stat"), json!({"path": 5}), &[])
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("invalid_argument"))
    );
}

/// A file in root's home that is removed even if the test fails.
struct HomeFile(PathBuf);
impl Drop for HomeFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn relative_paths_resolve_against_the_users_home() {
    let envd = Envd::start(&["--default-workdir", "/tmp"]);
    let name = format!("wrenn-fs-rel-{}", std::process::id());
    let home = PathBuf::from("/root");
    let _cleanup = HomeFile(home.join(&name));
    let e = ok(&envd, "MakeDir", json!({"path": name})).await["entry"].clone();
    assert_eq!(e["path"], p(&home.join(&name)));
    assert!(home.join(&name).is_dir());
    let e = ok(&envd, "Stat", json!({"path": format!("~/{name}")})).await["entry"].clone();
    assert_eq!(e["path"], p(&home.join(&name)));
    ok(
        &envd,
        "Remove",
        json!({"path": format!("{name}/../{name}")}),
    )
    .await;
    assert!(!home.join(&name).exists());
}

#[tokio::test]
async fn make_dir_creates_parents_owned_by_the_user() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let deep = dir.path().join("a/b/c");
    let e = ok(&envd, "MakeDir", json!({"path": p(&deep)})).await["entry"].clone();
    assert_eq!(e["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(e["name"], "c");
    assert_eq!(e["path"], p(&deep));
    assert!(deep.is_dir());
    assert_eq!(
        err_code(&envd, "MakeDir", json!({"path": p(&deep)}), "root").await,
        "already_exists"
    );
    let file = dir.path().join("f");
    std::fs::write(&file, b"").unwrap();
    assert_eq!(
        err_code(&envd, "MakeDir", json!({"path": p(&file)}), "root").await,
        "invalid_argument"
    );

    // As nobody: every created directory belongs to nobody.
    let (status, v) = call(
        &envd,
        "MakeDir",
        json!({"path": p(&dir.path().join("n1/n2"))}),
        "nobody",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["entry"]["owner"], "nobody");
    for d in ["n1", "n1/n2"] {
        let m = std::fs::metadata(dir.path().join(d)).unwrap();
        assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY), "{d}");
        assert_eq!(m.mode() & 0o777, 0o755, "{d}");
    }
}

#[tokio::test]
async fn move_creates_destination_parents() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let src = dir.path().join("src.txt");
    std::fs::write(&src, b"data").unwrap();
    let dst = dir.path().join("x/y/dst.txt");
    let e = ok(
        &envd,
        "Move",
        json!({"source": p(&src), "destination": p(&dst)}),
    )
    .await["entry"]
        .clone();
    assert_eq!(e["name"], "dst.txt");
    assert_eq!(e["path"], p(&dst));
    assert_eq!(e["size"], "4");
    assert!(!src.exists());
    assert_eq!(std::fs::read(&dst).unwrap(), b"data");

    // As nobody, new parents are nobody's.
    let src2 = dir.path().join("nobody.txt");
    std::fs::write(&src2, b"").unwrap();
    chown(&src2, NOBODY, NOBODY);
    let dst2 = dir.path().join("np/moved.txt");
    let (status, v) = call(
        &envd,
        "Move",
        json!({"source": p(&src2), "destination": p(&dst2)}),
        "nobody",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        std::fs::metadata(dir.path().join("np")).unwrap().uid(),
        NOBODY
    );
}

#[tokio::test]
async fn remove_is_recursive_and_does_not_follow_links() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/f"), b"x").unwrap();
    let keep = dir.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("precious"), b"x").unwrap();
    symlink(&keep, tree.join("a/link")).unwrap();
    ok(&envd, "Remove", json!({"path": p(&tree)})).await;
    assert!(!tree.exists());
    assert!(keep.join("precious").exists());
    let link = dir.path().join("link");
    symlink(&keep, &link).unwrap();
    ok(&envd, "Remove", json!({"path": p(&link)})).await;
    assert!(std::fs::symlink_metadata(&link).is_err());
    assert!(keep.join("precious").exists());
}

fn names_and_paths(v: &Value) -> Vec<(String, String)> {
    v["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_owned(),
                        e["path"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn list_dir_depth_symlinks_and_errors() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::write(root.join("top.txt"), b"top").unwrap();
    std::fs::write(root.join("a/one.txt"), b"1").unwrap();
    std::fs::write(root.join("a/b/two.txt"), b"2").unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), b"s").unwrap();
    symlink(&outside, root.join("zlink")).unwrap();
    let r = p(&root);

    for depth in [json!(null), json!(0), json!(1)] {
        let mut body = json!({"path": r});
        if !depth.is_null() {
            body["depth"] = depth;
        }
        let v = ok(&envd, "ListDir", body).await;
        let got = names_and_paths(&v);
        assert_eq!(
            got,
            vec![
                ("a".into(), format!("{r}/a")),
                ("top.txt".into(), format!("{r}/top.txt")),
                ("zlink".into(), format!("{r}/zlink")),
            ]
        );
        let link = &v["entries"][2];
        assert_eq!(link["isSymlink"], true);
        assert_eq!(link["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(
            link["symlinkTarget"],
            p(&std::fs::canonicalize(&outside).unwrap())
        );
        let top = &v["entries"][1];
        assert_eq!(
            (top["type"].as_str(), top["size"].as_str()),
            (Some("FILE_TYPE_FILE"), Some("3"))
        );
        assert_eq!(top["owner"], "root");
        assert!(top["permissions"].as_str().unwrap().starts_with('-'));
    }

    let v = ok(&envd, "ListDir", json!({"path": r, "depth": 2})).await;
    let paths: Vec<String> = names_and_paths(&v).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        paths,
        [
            format!("{r}/a"),
            format!("{r}/a/b"),
            format!("{r}/a/one.txt"),
            format!("{r}/top.txt"),
            format!("{r}/zlink")
        ]
    );
    // Deep: everything, and the symlinked directory inside is not followed.
    let v = ok(&envd, "ListDir", json!({"path": r, "depth": 10})).await;
    let paths: Vec<String> = names_and_paths(&v).into_iter().map(|(_, p)| p).collect();
    assert!(
        paths.contains(&format!("{r}/a/b/c")) && paths.contains(&format!("{r}/a/b/two.txt")),
        "{paths:?}"
    );
    assert!(!paths.iter().any(|p| p.contains("secret")), "{paths:?}");

    // The requested path may itself be a symlink: followed, and paths stay under the link.
    let link_root = dir.path().join("rootlink");
    symlink(&root, &link_root).unwrap();
    let v = ok(&envd, "ListDir", json!({"path": p(&link_root)})).await;
    assert_eq!(
        names_and_paths(&v)[0],
        ("a".to_owned(), format!("{}/a", p(&link_root)))
    );

    // Errors.
    assert_eq!(
        err_code(
            &envd,
            "ListDir",
            json!({"path": format!("{r}/top.txt")}),
            "root"
        )
        .await,
        "invalid_argument"
    );
    let (l1, l2) = (dir.path().join("loop1"), dir.path().join("loop2"));
    symlink(&l2, &l1).unwrap();
    symlink(&l1, &l2).unwrap();
    assert_eq!(
        err_code(&envd, "ListDir", json!({"path": p(&l1)}), "root").await,
        "failed_precondition"
    );
    assert_eq!(
        err_code(
            &envd,
            "ListDir",
            json!({"path": format!("{r}/nope")}),
            "root"
        )
        .await,
        "not_found"
    );
}

/// A directory only root can enter, with a file inside.
fn root_only(dir: &Path) -> PathBuf {
    let secret = dir.join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("file"), b"s").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    secret
}

#[tokio::test]
async fn non_root_users_get_permission_denied() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let secret = root_only(dir.path());
    let file = p(&secret.join("file"));
    let s = p(&secret);
    let denied = "permission_denied";
    assert_eq!(
        err_code(&envd, "Stat", json!({"path": file}), "nobody").await,
        denied
    );
    assert_eq!(
        err_code(&envd, "ListDir", json!({"path": s}), "nobody").await,
        denied
    );
    assert_eq!(
        err_code(
            &envd,
            "MakeDir",
            json!({"path": format!("{s}/new")}),
            "nobody"
        )
        .await,
        denied
    );
    assert_eq!(
        err_code(&envd, "Remove", json!({"path": file}), "nobody").await,
        denied
    );
    assert_eq!(
        err_code(&envd, "Remove", json!({"path": s}), "nobody").await,
        denied
    );
    assert_eq!(
        err_code(
            &envd,
            "Move",
            json!({"source": file, "destination": p(&dir.path().join("stolen"))}),
            "nobody"
        )
        .await,
        denied
    );
    assert_eq!(
        err_code(&envd, "CreateWatcher", json!({"path": s}), "nobody").await,
        denied
    );
    let auth = basic("nobody");
    let stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": s}),
            &[("authorization", auth.as_str())],
        )
        .await;
    let (msgs, end) = stream.collect(Duration::from_secs(5)).await;
    assert!(msgs.is_empty(), "{msgs:?}");
    assert_eq!(end["error"]["code"], denied);
    // /root itself is 0700.
    if std::fs::metadata("/root").unwrap().mode() & 0o007 == 0 {
        assert_eq!(
            err_code(&envd, "ListDir", json!({"path": "/root"}), "nobody").await,
            denied
        );
    }
    // Nothing changed, and root still can do it all (the switch is per request).
    assert!(secret.join("file").exists());
    assert!(!dir.path().join("stolen").exists());
    let v = ok(&envd, "ListDir", json!({"path": s})).await;
    assert_eq!(names_and_paths(&v).len(), 1);
    // A world-writable sticky directory: nobody may not remove root's file in it.
    let sticky = dir.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(sticky.join("roots"), b"").unwrap();
    assert_eq!(
        err_code(
            &envd,
            "Remove",
            json!({"path": p(&sticky.join("roots"))}),
            "nobody"
        )
        .await,
        denied
    );
    assert!(sticky.join("roots").exists());
}

async fn proto_call(envd: &Envd, method: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let resp = envd
        .client
        .post(envd.url(&format!("{FS}/{method}")))
        .header("content-type", "application/proto")
        .header("connect-protocol-version", "1")
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn binary_proto_codec() {
    use wrenn_proto::filesystem as fs;
    let envd = Envd::start(&[]);
    let dir = tmp();
    let file = dir.path().join("f.bin");
    std::fs::write(&file, b"12345678").unwrap();

    let (status, body) = proto_call(
        &envd,
        "Stat",
        fs::StatRequest { path: p(&file) }.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let entry = fs::StatResponse::decode(body.as_slice())
        .unwrap()
        .entry
        .unwrap();
    assert_eq!(entry.size, 8);
    assert_eq!(entry.r#type, fs::FileType::File as i32);
    assert_eq!(entry.path, p(&file));

    let new_dir = dir.path().join("made");
    let (status, body) = proto_call(
        &envd,
        "MakeDir",
        fs::MakeDirRequest { path: p(&new_dir) }.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        fs::MakeDirResponse::decode(body.as_slice())
            .unwrap()
            .entry
            .unwrap()
            .name,
        "made"
    );

    let (status, body) = proto_call(
        &envd,
        "ListDir",
        fs::ListDirRequest {
            path: p(dir.path()),
            depth: 1,
        }
        .encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let entries = fs::ListDirResponse::decode(body.as_slice())
        .unwrap()
        .entries;
    let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["f.bin", "made"]);
    assert_eq!(entries[1].r#type, fs::FileType::Directory as i32);

    // Errors travel as JSON in the Connect unary protocol.
    let (status, body) = proto_call(
        &envd,
        "Stat",
        fs::StatRequest {
            path: p(&dir.path().join("nope")),
        }
        .encode_to_vec(),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["code"],
        "not_found"
    );

    // A path that is not UTF-8: field 1, length-delimited, with an invalid byte.
    let bad = vec![0x0a, 4, b'/', b't', 0xff, b'x'];
    for method in ["Stat", "ListDir", "MakeDir"] {
        let (status, body) = proto_call(&envd, method, bad.clone()).await;
        assert_eq!(status, 400, "{method}");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["code"],
            "invalid_argument",
            "{method}"
        );
    }
}

/// The next `filesystem` event of a WatchDir stream, skipping keepalives.
async fn next_fs_event(stream: &mut support::Stream) -> Value {
    loop {
        match stream.next_within(Duration::from_secs(10)).await {
            Some(Item::Message(m)) if m.get("keepalive").is_some() => continue,
            Some(Item::Message(m)) => return m["filesystem"].clone(),
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Collects events until `want` (name, type) pairs have all been seen, in order.
async fn expect_events(stream: &mut support::Stream, want: &[(&str, &str)]) -> Vec<Value> {
    let mut seen = Vec::new();
    let mut idx = 0;
    while idx < want.len() {
        let e = next_fs_event(stream).await;
        if e["name"] == want[idx].0 && e["type"] == want[idx].1 {
            idx += 1;
        }
        seen.push(e);
    }
    seen
}

#[tokio::test]
async fn watch_dir_streams_events() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let auth = basic("root");
    let mut stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": p(dir.path()), "includeEntry": true}),
            &[("authorization", auth.as_str())],
        )
        .await;
    assert_eq!(
        stream.next_within(Duration::from_secs(5)).await,
        Some(Item::Message(json!({"start": {}})))
    );

    std::fs::write(dir.path().join("a.txt"), b"hello").unwrap();
    let seen = expect_events(
        &mut stream,
        &[
            ("a.txt", "EVENT_TYPE_CREATE"),
            ("a.txt", "EVENT_TYPE_WRITE"),
        ],
    )
    .await;
    let create = seen
        .iter()
        .find(|e| e["type"] == "EVENT_TYPE_CREATE")
        .unwrap();
    assert_eq!(create["entry"]["name"], "a.txt");
    assert_eq!(create["entry"]["path"], p(&dir.path().join("a.txt")));

    std::fs::set_permissions(
        dir.path().join("a.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let seen = expect_events(&mut stream, &[("a.txt", "EVENT_TYPE_CHMOD")]).await;
    assert_eq!(seen.last().unwrap()["entry"]["mode"], 0o600);

    std::fs::rename(dir.path().join("a.txt"), dir.path().join("b.txt")).unwrap();
    let seen = expect_events(
        &mut stream,
        &[
            ("a.txt", "EVENT_TYPE_RENAME"),
            ("b.txt", "EVENT_TYPE_CREATE"),
        ],
    )
    .await;
    assert!(
        seen.iter()
            .find(|e| e["type"] == "EVENT_TYPE_RENAME")
            .unwrap()
            .get("entry")
            .is_none()
    );

    std::fs::remove_file(dir.path().join("b.txt")).unwrap();
    let seen = expect_events(&mut stream, &[("b.txt", "EVENT_TYPE_REMOVE")]).await;
    assert!(seen.last().unwrap().get("entry").is_none());

    // Not recursive: events inside a subdirectory are not reported, the subdirectory is.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    expect_events(&mut stream, &[("sub", "EVENT_TYPE_CREATE")]).await;
    std::fs::write(dir.path().join("sub/inner"), b"").unwrap();
    std::fs::write(dir.path().join("marker"), b"").unwrap();
    let seen = expect_events(&mut stream, &[("marker", "EVENT_TYPE_CREATE")]).await;
    assert!(
        !seen
            .iter()
            .any(|e| e["name"].as_str().unwrap().contains("inner")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn watch_dir_recursive_and_keepalive() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    std::fs::create_dir(dir.path().join("existing")).unwrap();
    let auth = basic("root");
    let mut stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": p(dir.path()), "recursive": true}),
            &[
                ("authorization", auth.as_str()),
                ("keepalive-ping-interval", "1"),
            ],
        )
        .await;
    assert_eq!(
        stream.next_within(Duration::from_secs(5)).await,
        Some(Item::Message(json!({"start": {}})))
    );
    // Quiet: a keepalive arrives at the requested cadence.
    let started = Instant::now();
    assert_eq!(
        stream.next_within(Duration::from_secs(5)).await,
        Some(Item::Message(json!({"keepalive": {}})))
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    std::fs::write(dir.path().join("existing/f1"), b"x").unwrap();
    expect_events(&mut stream, &[("existing/f1", "EVENT_TYPE_CREATE")]).await;
    // A new directory is watched too, including what appears in it immediately.
    std::fs::create_dir_all(dir.path().join("n/m/o")).unwrap();
    std::fs::write(dir.path().join("n/m/o/deep.txt"), b"x").unwrap();
    expect_events(
        &mut stream,
        &[
            ("n", "EVENT_TYPE_CREATE"),
            ("n/m/o/deep.txt", "EVENT_TYPE_CREATE"),
        ],
    )
    .await;
    // A moved-in directory is watched under its new name.
    let elsewhere = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
    std::fs::create_dir(elsewhere.path().join("moved")).unwrap();
    std::fs::rename(elsewhere.path().join("moved"), dir.path().join("moved")).unwrap();
    expect_events(&mut stream, &[("moved", "EVENT_TYPE_CREATE")]).await;
    std::fs::write(dir.path().join("moved/in.txt"), b"x").unwrap();
    expect_events(&mut stream, &[("moved/in.txt", "EVENT_TYPE_CREATE")]).await;
    std::fs::remove_dir_all(dir.path().join("n")).unwrap();
    expect_events(
        &mut stream,
        &[
            ("n/m/o/deep.txt", "EVENT_TYPE_REMOVE"),
            ("n", "EVENT_TYPE_REMOVE"),
        ],
    )
    .await;
}

#[tokio::test]
async fn watch_errors() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let auth = basic("root");
    for (path, code) in [
        (p(&dir.path().join("missing")), "not_found"),
        (p(&file), "invalid_argument"),
    ] {
        let stream = envd
            .stream(
                &format!("{FS}/WatchDir"),
                json!({"path": path}),
                &[("authorization", auth.as_str())],
            )
            .await;
        let (msgs, end) = stream.collect(Duration::from_secs(5)).await;
        assert!(msgs.is_empty());
        assert_eq!(end["error"]["code"], code, "{path}");
        assert_eq!(
            err_code(&envd, "CreateWatcher", json!({"path": path}), "root").await,
            code
        );
    }
    assert_eq!(
        err_code(
            &envd,
            "GetWatcherEvents",
            json!({"watcherId": "wnope"}),
            "root"
        )
        .await,
        "not_found"
    );
    assert_eq!(
        err_code(
            &envd,
            "RemoveWatcher",
            json!({"watcherId": "wnope"}),
            "root"
        )
        .await,
        "not_found"
    );
}

/// Polls GetWatcherEvents until `want` have all been seen in order.
async fn poll_until(envd: &Envd, id: &str, want: &[(&str, &str)]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<Value> = Vec::new();
    loop {
        let v = ok(envd, "GetWatcherEvents", json!({"watcherId": id})).await;
        seen.extend(v["events"].as_array().cloned().unwrap_or_default());
        let mut idx = 0;
        for e in &seen {
            if idx < want.len() && e["name"] == want[idx].0 && e["type"] == want[idx].1 {
                idx += 1;
            }
        }
        if idx == want.len() {
            return seen;
        }
        assert!(Instant::now() < deadline, "wanted {want:?}, saw {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn polled_watchers() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let v = ok(
        &envd,
        "CreateWatcher",
        json!({"path": p(dir.path()), "recursive": true, "includeEntry": true}),
    )
    .await;
    let id = v["watcherId"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 21);
    assert!(
        id.starts_with('w')
            && id[1..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "{id}"
    );
    // Nothing happened yet: an empty list.
    let v = ok(&envd, "GetWatcherEvents", json!({"watcherId": id})).await;
    assert!(v.get("events").is_none_or(|e| e == &json!([])), "{v}");

    std::fs::write(dir.path().join("x.txt"), b"1").unwrap();
    std::fs::rename(dir.path().join("x.txt"), dir.path().join("y.txt")).unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/z.txt"), b"1").unwrap();
    std::fs::remove_file(dir.path().join("y.txt")).unwrap();
    let seen = poll_until(
        &envd,
        &id,
        &[
            ("x.txt", "EVENT_TYPE_CREATE"),
            ("x.txt", "EVENT_TYPE_WRITE"),
            ("x.txt", "EVENT_TYPE_RENAME"),
            ("y.txt", "EVENT_TYPE_CREATE"),
            ("d", "EVENT_TYPE_CREATE"),
            ("d/z.txt", "EVENT_TYPE_CREATE"),
            ("y.txt", "EVENT_TYPE_REMOVE"),
        ],
    )
    .await;
    let create = seen.iter().find(|e| e["name"] == "d/z.txt").unwrap();
    assert_eq!(create["entry"]["path"], p(&dir.path().join("d/z.txt")));
    // Drained: the next poll is empty.
    let v = ok(&envd, "GetWatcherEvents", json!({"watcherId": id})).await;
    assert!(v.get("events").is_none_or(|e| e == &json!([])), "{v}");

    ok(&envd, "RemoveWatcher", json!({"watcherId": id})).await;
    assert_eq!(
        err_code(&envd, "GetWatcherEvents", json!({"watcherId": id}), "root").await,
        "not_found"
    );
    assert_eq!(
        err_code(&envd, "RemoveWatcher", json!({"watcherId": id}), "root").await,
        "not_found"
    );
}

/// Waits up to 5 s for `envd` to hold `n` inotify instances.
async fn wait_for_inotify_fds(envd: &Envd, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while inotify_fds(envd.pid()) != n {
        assert!(
            Instant::now() < deadline,
            "{} inotify instances, not {n}",
            inotify_fds(envd.pid())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Open inotify instances of a process.
fn inotify_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains("inotify"))
        .count()
}

#[tokio::test]
async fn watches_release_their_inotify_instances() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    assert_eq!(inotify_fds(envd.pid()), 0);
    let v = ok(&envd, "CreateWatcher", json!({"path": p(dir.path())})).await;
    assert_eq!(inotify_fds(envd.pid()), 1);
    ok(&envd, "RemoveWatcher", json!({"watcherId": v["watcherId"]})).await;
    // The watcher's task closes its instance as it ends, a moment after the answer.
    wait_for_inotify_fds(&envd, 0).await;
    let auth = basic("root");
    let mut stream = envd
        .stream(
            &format!("{FS}/WatchDir"),
            json!({"path": p(dir.path())}),
            &[("authorization", auth.as_str())],
        )
        .await;
    assert!(matches!(
        stream.next_within(Duration::from_secs(5)).await,
        Some(Item::Message(_))
    ));
    assert_eq!(inotify_fds(envd.pid()), 1);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while inotify_fds(envd.pid()) != 0 {
        assert!(
            Instant::now() < deadline,
            "inotify instance leaked after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn watches_as_a_user_only_see_what_they_may_read() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let secret = root_only(dir.path());
    let v = call(
        &envd,
        "CreateWatcher",
        json!({"path": p(dir.path()), "recursive": true}),
        "nobody",
    )
    .await;
    assert_eq!(v.0, 200, "{}", v.1);
    let id = v.1["watcherId"].as_str().unwrap().to_owned();
    std::fs::write(secret.join("hidden"), b"").unwrap();
    std::fs::write(dir.path().join("visible"), b"").unwrap();
    let seen = poll_until(&envd, &id, &[("visible", "EVENT_TYPE_CREATE")]).await;
    assert!(
        !seen.iter().any(|e| e["name"] == "secret/hidden"),
        "{seen:?}"
    );
    ok(&envd, "RemoveWatcher", json!({"watcherId": id})).await;
}

#[tokio::test]
async fn undrained_watchers_stop_with_a_terminal_error() {
    let envd = Envd::start(&[]);
    let dir = tmp();
    let v = ok(&envd, "CreateWatcher", json!({"path": p(dir.path())})).await;
    let id = v["watcherId"].as_str().unwrap().to_owned();
    // More events than a watcher buffers (16 Ki), never collected.
    let started = Instant::now();
    for i in 0..17_000 {
        std::fs::File::create(dir.path().join(format!("f{i}"))).unwrap();
    }
    println!("created 17000 files in {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        let (status, v) = call(&envd, "GetWatcherEvents", json!({"watcherId": id}), "root").await;
        if status != 200 {
            break v["code"].as_str().unwrap().to_owned();
        }
        // A poll that caught the buffer before it overflowed drains it; keep going.
        assert!(
            Instant::now() < deadline,
            "the watcher never reported overflow"
        );
        for i in 0..17_000 {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
    };
    assert_eq!(code, "resource_exhausted");
    // Terminal: every later poll reports it too, until the watcher is removed.
    assert_eq!(
        err_code(&envd, "GetWatcherEvents", json!({"watcherId": id}), "root").await,
        code
    );
    ok(&envd, "RemoveWatcher", json!({"watcherId": id})).await;
}
