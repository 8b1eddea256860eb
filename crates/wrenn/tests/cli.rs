//! `wrenn sandbox ...` end to end: the real `wrenn` binary against a canned E2B-shaped REST
//! server (this test's fixture, which records what the CLI sent) and a real envd process (the
//! CLI's `--sandbox-url` points straight at it; envd ignores the routing headers but checks the
//! access token the fixture hands out).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const KEY: &str = "wrenn_test_key";
const TOKEN: &str = "envd-token-123";

/// One request the fixture received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    /// Decoded query pairs.
    query: HashMap<String, String>,
    api_key: Option<String>,
    headers: HeaderMap,
    body: Value,
}

/// The canned REST API, on its own runtime; stops when dropped.
struct Api {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

impl Api {
    fn start() -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let record = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let record = record.clone();
                async move {
                    let seen = Seen {
                        method,
                        path: uri.path().to_owned(),
                        query: parse_query(uri.query().unwrap_or("")),
                        api_key: headers
                            .get("x-api-key")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        headers,
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    };
                    record.lock().unwrap().push(seen.clone());
                    respond(&seen)
                }
            },
        );
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Api {
            url: format!("http://{addr}"),
            seen,
            _rt: rt,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

/// Form decoding (`+` is a space, `%XX` a byte).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn sandbox(id: &str, token: &str) -> Value {
    json!({"templateID": "base", "sandboxID": id, "clientID": "6532622b",
           "envdVersion": "0.6.4", "envdAccessToken": token})
}

fn listed(id: &str, state: &str) -> Value {
    json!({"templateID": "base", "sandboxID": id, "clientID": "6532622b",
           "startedAt": "2025-01-01T00:00:00Z", "endAt": "2025-01-01T00:05:00Z",
           "cpuCount": 2, "memoryMB": 512, "diskSizeMB": 1024, "state": state,
           "envdVersion": "0.6.4", "metadata": {"owner": "me"}})
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"code": status.as_u16(), "message": message})),
    )
        .into_response()
}

/// The canned answers. Known sandboxes: `sbx-1` (running), `sbx-p` (paused), `sbx-bad`
/// (running, but the fixture hands out a token envd rejects).
fn respond(req: &Seen) -> Response {
    if req.path.starts_with("/process.Process/") {
        // Standing in for the edge proxy: refuse, so the test sees what the CLI sent.
        return (
            StatusCode::BAD_GATEWAY,
            axum::Json(json!({"code": "unavailable", "message": "The sandbox was not found"})),
        )
            .into_response();
    }
    if req.api_key.as_deref() != Some(KEY) {
        return error(StatusCode::UNAUTHORIZED, "Invalid API key");
    }
    let known = |id: &str| ["sbx-1", "sbx-p", "sbx-bad"].contains(&id);
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["v2", "sandboxes"]) => {
            let mut s = sandbox("sbx-new", TOKEN);
            s["templateID"] = req.body["templateID"].clone();
            (StatusCode::CREATED, axum::Json(s)).into_response()
        }
        ("GET", ["v2", "sandboxes"]) => {
            let page: Vec<Value> = match req.query.get("nextToken").map(String::as_str) {
                None => vec![listed("sbx-1", "running"), listed("sbx-2", "running")],
                Some("page-2") => vec![listed("sbx-3", "running")],
                Some(_) => return error(StatusCode::BAD_REQUEST, "bad token"),
            };
            let mut resp = axum::Json(page).into_response();
            if !req.query.contains_key("nextToken") {
                resp.headers_mut()
                    .insert("x-next-token", "page-2".parse().unwrap());
            }
            resp
        }
        ("GET", ["sandboxes", id]) if known(id) => {
            let mut d = listed(id, if *id == "sbx-p" { "paused" } else { "running" });
            d["alias"] = json!("base-alias");
            axum::Json(d).into_response()
        }
        ("DELETE", ["sandboxes", id]) if known(id) => StatusCode::NO_CONTENT.into_response(),
        ("POST", ["sandboxes", id, "pause"]) if known(id) => {
            if *id == "sbx-p" {
                error(StatusCode::CONFLICT, "Sandbox \"sbx-p\" is already paused")
            } else {
                StatusCode::NO_CONTENT.into_response()
            }
        }
        ("POST", ["v2", "sandboxes", id, "connect"]) if known(id) => {
            let token = if *id == "sbx-bad" { "wrong" } else { TOKEN };
            let status = if *id == "sbx-p" {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(sandbox(id, token))).into_response()
        }
        (_, ["sandboxes", id, ..] | ["v2", "sandboxes", id, ..]) if !known(id) => error(
            StatusCode::NOT_FOUND,
            &format!("Sandbox \"{id}\" not found"),
        ),
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}

/// A real envd requiring [`TOKEN`]; killed when dropped.
struct Envd {
    child: Child,
    url: String,
}

impl Envd {
    fn start() -> Envd {
        let mut child = Command::new(envd_bin())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--no-cgroups",
                "--no-port-forward",
                "--access-token",
                TOKEN,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn envd");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("envd exited before listening").unwrap();
            if let Some(a) = line.strip_prefix("listening on ") {
                break a.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Envd {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// envd from this workspace's target directory (beside `wrenn`), built if missing.
fn envd_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let bin = PathBuf::from(env!("CARGO_BIN_EXE_wrenn")).with_file_name("envd");
            if !bin.exists() {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let ok = Command::new(cargo)
                    .args(["build", "-p", "envd"])
                    .status()
                    .expect("run cargo build -p envd")
                    .success();
                assert!(ok && bin.exists(), "build envd first: cargo build -p envd");
            }
            bin
        })
        .clone()
}

/// `wrenn sandbox <args>` with a clean environment: no E2B variables from the machine, and a
/// state directory of our own so `/var/lib/wrenn/api-key` is never read.
fn wrenn(state_dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wrenn"));
    cmd.arg("sandbox").args(args);
    for var in [
        "E2B_API_URL",
        "E2B_SANDBOX_URL",
        "E2B_API_KEY",
        "E2B_DOMAIN",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("WRENN_STATE_DIR", state_dir);
    cmd
}

/// Runs to completion with `stdin` piped in (or /dev/null).
fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn wrenn");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "wrenn {:?}: {:?}\nstdout: {}\nstderr: {}",
        cmd.get_args().collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `--api-url` and `--api-key` for the fixture.
fn api_flags(api: &Api) -> Vec<String> {
    vec![
        "--api-url".into(),
        api.url.clone(),
        "--api-key".into(),
        KEY.into(),
    ]
}

fn with<'a>(flags: &'a [String], args: &[&'a str]) -> Vec<&'a str> {
    // The connection flags go first: after `exec ... CMD` they would be the command's.
    flags
        .iter()
        .map(String::as_str)
        .chain(args.iter().copied())
        .collect()
}

#[test]
fn create_sends_the_sdk_body_and_prints_the_id() {
    let api = Api::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = api_flags(&api);
    let out = run(
        wrenn(
            dir.path(),
            &with(
                &flags,
                &[
                    "create",
                    "--template",
                    "py",
                    "--timeout",
                    "60",
                    "--env",
                    "A=1=2",
                    "-e",
                    "B=",
                    "--metadata",
                    "owner=me",
                    "--auto-pause",
                ],
            ),
        ),
        None,
    );
    assert!(out.status.success());
    assert_eq!(stdout(&out), "sbx-new\n");
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].path, "/v2/sandboxes");
    assert_eq!(seen[0].api_key.as_deref(), Some(KEY));
    assert_eq!(
        seen[0].body,
        json!({"templateID": "py", "timeout": 60, "autoPause": true,
               "metadata": {"owner": "me"}, "envVars": {"A": "1=2", "B": ""}})
    );

    // Defaults, and --json prints the whole response.
    let out = run(
        wrenn(dir.path(), &with(&flags, &["create", "--json"])),
        None,
    );
    assert!(out.status.success());
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["sandboxID"], "sbx-new");
    assert_eq!(v["envdAccessToken"], TOKEN);
    assert_eq!(
        api.seen()[1].body,
        json!({"templateID": "base", "metadata": {}, "envVars": {}})
    );
}

#[test]
fn configuration_from_env_and_key_file() {
    let api = Api::start();
    let dir = tempfile::tempdir().unwrap();
    // No key anywhere: the API's 401 message, plus how to provide one.
    let mut cmd = wrenn(dir.path(), &["info", "sbx-1"]);
    cmd.env("E2B_API_URL", &api.url);
    let out = run(cmd, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Invalid API key"), "{}", stderr(&out));
    assert!(stderr(&out).contains("E2B_API_KEY"), "{}", stderr(&out));

    // The key file `wrenn up` writes, under $WRENN_STATE_DIR.
    std::fs::write(dir.path().join("api-key"), format!("{KEY}\n")).unwrap();
    let mut cmd = wrenn(dir.path(), &["info", "sbx-1"]);
    cmd.env("E2B_API_URL", &api.url);
    let out = run(cmd, None);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("Sandbox ID:   sbx-1\n"), "{text}");
    assert!(text.contains("Alias:        base-alias\n"), "{text}");
    assert!(text.contains("State:        running\n"), "{text}");
    assert!(text.contains("Metadata:     owner=me\n"), "{text}");

    // E2B_API_KEY wins over the file.
    let mut cmd = wrenn(dir.path(), &["get", "sbx-1"]);
    cmd.env("E2B_API_URL", &api.url).env("E2B_API_KEY", "other");
    let out = run(cmd, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr(&out).contains("E2B_API_KEY"), "{}", stderr(&out));
    let keys: Vec<_> = api.seen().into_iter().map(|s| s.api_key).collect();
    assert_eq!(keys, [None, Some(KEY.to_owned()), Some("other".to_owned())]);
}

#[test]
fn list_follows_pagination_and_sends_filters() {
    let api = Api::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = api_flags(&api);
    let out = run(
        wrenn(
            dir.path(),
            &with(
                &flags,
                &[
                    "list",
                    "--state",
                    "running",
                    "--state",
                    "paused",
                    "--metadata",
                    "owner=me",
                    "--metadata",
                    "x=a b&c",
                    "--limit",
                    "2",
                ],
            ),
        ),
        None,
    );
    assert!(out.status.success());
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("SANDBOX ID"), "{text}");
    for (line, id) in lines[1..].iter().zip(["sbx-1", "sbx-2", "sbx-3"]) {
        assert!(line.starts_with(&format!("{id}  ")), "{text}");
        assert!(line.contains("running"), "{text}");
        assert!(line.ends_with("owner=me"), "{text}");
    }
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path, "/v2/sandboxes");
        assert_eq!(s.query["state"], "running,paused");
        assert_eq!(s.query["limit"], "2");
        // Double-encoded: decoding once gives the SDK's `k=v&k2=v2` form.
        assert_eq!(parse_query(&s.query["metadata"]).len(), 2);
        assert_eq!(parse_query(&s.query["metadata"])["x"], "a b&c");
        assert_eq!(parse_query(&s.query["metadata"])["owner"], "me");
    }
    assert!(!seen[0].query.contains_key("nextToken"));
    assert_eq!(seen[1].query["nextToken"], "page-2");

    let out = run(wrenn(dir.path(), &with(&flags, &["ls", "--json"])), None);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sbx-1", "sbx-2", "sbx-3"]);
    assert!(api.seen()[2].query.is_empty());
}

#[test]
fn kill_pause_resume_and_errors() {
    let api = Api::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = api_flags(&api);
    let cli = |args: &[&str]| run(wrenn(dir.path(), &with(&flags, args)), None);

    let out = cli(&["kill", "sbx-1"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "killed sbx-1\n");
    let out = cli(&["kill", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: sandbox nope not found\n");

    let out = cli(&["pause", "sbx-1"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "paused sbx-1\n");
    let out = cli(&["pause", "sbx-p"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: Sandbox \"sbx-p\" is already paused (HTTP 409)\n"
    );

    let out = cli(&["resume", "sbx-p", "--timeout", "120"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "resumed sbx-p\n");
    let out = cli(&["resume", "sbx-1"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("already running"), "{}", stdout(&out));
    let out = cli(&["resume", "nope"]);
    assert_eq!(stderr(&out), "error: sandbox nope not found\n");
    // Dot segments would be normalized onto another route: refused locally.
    let out = cli(&["info", ".."]);
    assert_eq!(out.status.code(), Some(1));

    let calls: Vec<(String, String, Value)> = api
        .seen()
        .into_iter()
        .map(|s| (s.method.to_string(), s.path, s.body))
        .collect();
    let expect = |m: &str, p: &str, b: Value| (m.to_owned(), p.to_owned(), b);
    assert_eq!(
        calls,
        [
            expect("DELETE", "/sandboxes/sbx-1", Value::Null),
            expect("DELETE", "/sandboxes/nope", Value::Null),
            expect("POST", "/sandboxes/sbx-1/pause", json!({})),
            expect("POST", "/sandboxes/sbx-p/pause", json!({})),
            expect(
                "POST",
                "/v2/sandboxes/sbx-p/connect",
                json!({"timeout": 120})
            ),
            expect(
                "POST",
                "/v2/sandboxes/sbx-1/connect",
                json!({"timeout": 300})
            ),
            expect(
                "POST",
                "/v2/sandboxes/nope/connect",
                json!({"timeout": 300})
            ),
        ]
    );

    // Nothing listening: a clear transport error.
    let out = run(
        wrenn(
            dir.path(),
            &["list", "--api-url", "http://127.0.0.1:9", "--api-key", KEY],
        ),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the Wrenn API at http://127.0.0.1:9"),
        "{}",
        stderr(&out)
    );
}

/// `--api-url` (fixture), `--api-key` and `--sandbox-url` (envd).
fn exec_flags(api: &Api, envd: &Envd) -> Vec<String> {
    let mut f = api_flags(api);
    f.extend(["--sandbox-url".into(), envd.url.clone()]);
    f
}

#[test]
fn exec_streams_output_and_exits_with_the_code() {
    let api = Api::start();
    let envd = Envd::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = exec_flags(&api, &envd);
    let cli =
        |args: &[&str], stdin: Option<&[u8]>| run(wrenn(dir.path(), &with(&flags, args)), stdin);

    let out = cli(
        &["exec", "sbx-1", "--", "echo out; echo err >&2; exit 7"],
        None,
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    // The token comes from connect, as the SDK gets it.
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v2/sandboxes/sbx-1/connect");
    assert_eq!(seen[0].body, json!({}));

    // Environment, working directory, user.
    let out = cli(
        &[
            "exec",
            "sbx-1",
            "--cwd",
            "/tmp",
            "--env",
            "FOO=a b",
            "-e",
            "BAR=2",
            "--user",
            "root",
            "--",
            "echo \"$FOO-$BAR\"; pwd; whoami",
        ],
        None,
    );
    assert!(out.status.success());
    assert_eq!(stdout(&out), "a b-2\n/tmp\nroot\n");

    // Several arguments are quoted for the shell; a login shell runs them.
    let out = cli(
        &[
            "exec", "sbx-1", "printf", "[%s]", "a b", "it's", "$HOME", "",
        ],
        None,
    );
    assert!(out.status.success());
    assert_eq!(stdout(&out), "[a b][it's][$HOME][]");

    // Signals: 128 + the number, like a shell.
    let out = cli(&["exec", "sbx-1", "--", "kill -9 $$"], None);
    assert_eq!(out.status.code(), Some(137));

    // Output is streamed as it is produced, not at the end.
    let mut cmd = wrenn(
        dir.path(),
        &with(
            &flags,
            &["exec", "sbx-1", "--", "echo first; sleep 3; echo second"],
        ),
    );
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "first line after {:?}",
        started.elapsed()
    );
    assert!(child.wait().unwrap().success());

    // Ctrl-C terminates the remote command; its end is still reported.
    let mut cmd = wrenn(
        dir.path(),
        &with(
            &flags,
            &["exec", "sbx-1", "--", "echo ready; exec sleep 30"],
        ),
    );
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 15));

    // Unknown sandbox and a token envd rejects.
    let out = cli(&["exec", "nope", "--", "true"], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: sandbox nope not found\n");
    let out = cli(&["exec", "sbx-bad", "--", "true"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unauthenticated"), "{}", stderr(&out));
}

#[test]
fn envd_requests_carry_the_routing_headers() {
    let api = Api::start();
    let dir = tempfile::tempdir().unwrap();
    let mut flags = api_flags(&api);
    flags.extend(["--sandbox-url".into(), format!("{}/", api.url)]);
    let out = run(
        wrenn(
            dir.path(),
            &with(&flags, &["exec", "sbx-1", "--user", "user", "--", "true"]),
        ),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("The sandbox was not found"),
        "{}",
        stderr(&out)
    );
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    let start = &seen[1];
    assert_eq!(start.path, "/process.Process/Start");
    let h = |name: &str| start.headers.get(name).map(|v| v.to_str().unwrap());
    assert_eq!(h("e2b-sandbox-id"), Some("sbx-1"));
    assert_eq!(h("e2b-sandbox-port"), Some("49983"));
    assert_eq!(h("x-access-token"), Some(TOKEN));
    assert_eq!(h("authorization"), Some("Basic dXNlcjo="));
    assert_eq!(h("keepalive-ping-interval"), Some("50"));
    assert_eq!(h("content-type"), Some("application/connect+json"));
    // The API key never goes to the sandbox.
    assert_eq!(start.api_key, None);
}

#[test]
fn exec_forwards_piped_stdin() {
    let api = Api::start();
    let envd = Envd::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = exec_flags(&api, &envd);
    let cli =
        |args: &[&str], stdin: Option<&[u8]>| run(wrenn(dir.path(), &with(&flags, args)), stdin);

    let out = cli(
        &["exec", "sbx-1", "--", "tr a-z A-Z"],
        Some(b"hello\nworld\n"),
    );
    assert!(out.status.success());
    assert_eq!(stdout(&out), "HELLO\nWORLD\n");

    // Large input arrives whole and in order, then EOF (CloseStdin) ends the reader.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = cli(
        &["exec", "sbx-1", "--", "sha256sum | cut -c1-16"],
        Some(&big),
    );
    assert!(out.status.success());
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&big))[..16].to_owned()
    };
    assert_eq!(stdout(&out), format!("{want}\n"));

    // /dev/null: EOF at once, so `cat` ends.
    let out = cli(&["exec", "sbx-1", "--", "cat; echo done"], None);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "done\n");
}

/// A pseudo-terminal pair; the test drives the master side.
struct Pty {
    master: std::fs::File,
    slave: std::os::fd::OwnedFd,
}

fn openpty(cols: u16, rows: u16) -> Pty {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let p = nix::pty::openpty(Some(&ws), None).unwrap();
    Pty {
        master: std::fs::File::from(p.master),
        slave: p.slave,
    }
}

/// Collects everything the master side reads, on a thread.
fn collect(mut master: std::fs::File) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        // EIO once every slave descriptor is closed.
        while let Ok(n) = master.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn wait_for(buf: &Mutex<Vec<u8>>, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not seen in time; terminal shows {text:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("wrenn did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn terminal_runs_an_interactive_shell() {
    let api = Api::start();
    let envd = Envd::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = exec_flags(&api, &envd);
    let pty = openpty(100, 30);
    let before = nix::sys::termios::tcgetattr(&pty.slave).unwrap();

    let mut cmd = wrenn(
        dir.path(),
        &with(&flags, &["terminal", "sbx-1", "--user", "root"]),
    );
    cmd.stdin(pty.slave.try_clone().unwrap())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(Stdio::inherit())
        .env("TERM", "xterm");
    let mut child = cmd.spawn().expect("spawn wrenn terminal");
    drop(cmd);
    let mut input = pty.master.try_clone().unwrap();
    let screen = collect(pty.master.try_clone().unwrap());

    // Type only once the remote shell has drawn something (its prompt).
    let deadline = Instant::now() + Duration::from_secs(20);
    while screen.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no prompt from the remote shell");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Raw mode: our echo is off, the remote PTY echoes instead.
    let raw = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    assert!(
        !raw.local_flags.intersects(
            nix::sys::termios::LocalFlags::ECHO | nix::sys::termios::LocalFlags::ICANON
        )
    );

    input
        .write_all(b"echo hi-$((6*7)); echo \"$TERM\"\n")
        .unwrap();
    wait_for(&screen, "hi-42", Duration::from_secs(20));
    wait_for(&screen, "xterm\r\n", Duration::from_secs(5));
    input.write_all(b"stty size\n").unwrap();
    wait_for(&screen, "30 100", Duration::from_secs(10));

    // A resize of the local terminal reaches the remote PTY.
    let ws = nix::libc::winsize {
        ws_row: 50,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a live local; the fd is our open master.
    let rc = unsafe {
        nix::libc::ioctl(
            pty.master.as_raw_fd(),
            nix::libc::TIOCSWINSZ,
            &ws as *const nix::libc::winsize,
        )
    };
    assert_eq!(rc, 0);
    // The child has no controlling terminal, so the kernel sends it no SIGWINCH: we do.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    input.write_all(b"stty size\n").unwrap();
    wait_for(&screen, "50 132", Duration::from_secs(10));

    input.write_all(b"exit 3\n").unwrap();
    let status = wait_child(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(3));
    // The local terminal is back as it was.
    let after = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    assert_eq!(after.local_flags, before.local_flags);
    assert_eq!(after.input_flags, before.input_flags);
    assert_eq!(after.output_flags, before.output_flags);
}

#[test]
fn terminal_refuses_without_a_terminal() {
    let api = Api::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = api_flags(&api);
    let out = run(
        wrenn(dir.path(), &with(&flags, &["terminal", "sbx-1"])),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("needs a terminal"),
        "{}",
        stderr(&out)
    );
    assert!(api.seen().is_empty(), "nothing is asked of the API");
}
