//! `process.Process` against a real envd: streams, stdin, signals, PTYs, re-attach, users,
//! deadlines, keepalives, both codecs and bad input.

mod support;

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use prost::Message as _;
use serde_json::{Value, json};
use support::{Envd, Item, b64, basic, unb64};
use wrenn_proto::process as pb;

const T: Duration = Duration::from_secs(15);

/// Kills the process groups of everything a test started, even when the test fails.
#[derive(Default)]
struct Reaper(Vec<u32>);

impl Reaper {
    fn add(&mut self, pid: u32) -> u32 {
        self.0.push(pid);
        pid
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

/// What a process stream delivered.
#[derive(Debug, Default)]
struct Outcome {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    chunks: Vec<usize>,
    keepalives: usize,
    end: Option<Value>,
    end_stream: Value,
}

impl Outcome {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn end(&self) -> &Value {
        self.end.as_ref().expect("an end event")
    }
}

/// Applies one message to `o`; asserts the event shape.
fn absorb(o: &mut Outcome, msg: &Value) {
    let ev = &msg["event"];
    if let Some(s) = ev.get("start") {
        o.pid = s["pid"].as_u64().expect("pid") as u32;
    } else if let Some(d) = ev.get("data") {
        for (key, buf) in [
            ("stdout", &mut o.stdout),
            ("stderr", &mut o.stderr),
            ("pty", &mut o.pty),
        ] {
            if let Some(v) = d.get(key) {
                let bytes = unb64(v.as_str().expect("base64 string"));
                o.chunks.push(bytes.len());
                buf.extend_from_slice(&bytes);
            }
        }
    } else if ev.get("keepalive").is_some() {
        assert_eq!(ev["keepalive"], json!({}));
        o.keepalives += 1;
    } else if let Some(e) = ev.get("end") {
        o.end = Some(e.clone());
    } else {
        panic!("unexpected message {msg}");
    }
}

/// Reads a whole Start/Connect stream; checks that `start` comes first and `end` last.
async fn collect(stream: support::Stream) -> Outcome {
    collect_from(stream, true).await
}

/// Like [`collect`], for a stream whose `start` was already read.
async fn rest(stream: support::Stream) -> Outcome {
    collect_from(stream, false).await
}

async fn collect_from(stream: support::Stream, from_start: bool) -> Outcome {
    let (msgs, end_stream) = stream.collect(T).await;
    let mut o = Outcome {
        end_stream,
        ..Outcome::default()
    };
    if let (true, Some(first)) = (from_start, msgs.first()) {
        assert!(
            first["event"].get("start").is_some(),
            "first message must be start: {first}"
        );
    }
    for m in msgs.iter().skip(usize::from(from_start)) {
        assert!(m["event"].get("start").is_none(), "only one start: {m}");
    }
    for (i, m) in msgs.iter().enumerate() {
        absorb(&mut o, m);
        if m["event"].get("end").is_some() {
            assert_eq!(i, msgs.len() - 1, "end must be the last message");
        }
    }
    o
}

/// Reads until the output contains `needle` (or the stream ends).
async fn read_until(stream: &mut support::Stream, o: &mut Outcome, needle: &str) {
    let deadline = Instant::now() + T;
    loop {
        let all = [&o.stdout[..], &o.stderr[..], &o.pty[..]].concat();
        if String::from_utf8_lossy(&all).contains(needle) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.next_within(left).await {
            Some(Item::Message(m)) => absorb(o, &m),
            other => panic!("stream ended before {needle:?}: {other:?}; got {o:?}"),
        }
    }
}

fn sh(script: &str) -> Value {
    json!({"cmd": "/bin/sh", "args": ["-c", script]})
}

async fn start(envd: &Envd, body: Value, headers: &[(&str, &str)]) -> support::Stream {
    envd.stream("/process.Process/Start", body, headers).await
}

/// Starts a process and reads its `start` event.
async fn spawn(envd: &Envd, body: Value, headers: &[(&str, &str)]) -> (support::Stream, Outcome) {
    let mut s = start(envd, body, headers).await;
    let mut o = Outcome::default();
    match s.next_within(T).await {
        Some(Item::Message(m)) => absorb(&mut o, &m),
        other => panic!("expected start, got {other:?}"),
    }
    assert!(o.pid > 0);
    (s, o)
}

async fn run(envd: &Envd, script: &str, headers: &[(&str, &str)]) -> Outcome {
    collect(
        start(
            envd,
            json!({"process": sh(script), "stdin": false}),
            headers,
        )
        .await,
    )
    .await
}

async fn signal(envd: &Envd, pid: u32, sig: &str) -> (u16, Value) {
    envd.unary(
        "/process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": sig}),
        &[],
    )
    .await
}

async fn list_pids(envd: &Envd) -> Vec<u64> {
    let (st, body) = envd.unary("/process.Process/List", json!({}), &[]).await;
    assert_eq!(st, 200, "{body}");
    body.get("processes")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|p| p["pid"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    // A zombie still accepts signal 0; check the state too.
    kill(Pid::from_raw(pid as i32), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Children of `parent` that are zombies.
fn zombies_of(parent: u32) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
            let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split(' ').collect();
            if f.len() > 1 && f[0] == "Z" && f[1] == parent.to_string() {
                out.push(stat);
            }
        }
    }
    out
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_error(v: &Value, code: &str, msg_part: &str) {
    let e = v.get("error").unwrap_or(v);
    assert_eq!(e["code"], code, "{v}");
    assert!(
        e["message"].as_str().unwrap_or("").contains(msg_part),
        "{v} should mention {msg_part:?}"
    );
}

#[tokio::test]
async fn streams_stdout_stderr_and_exit_codes() {
    let envd = Envd::start(&[]);
    let o = run(&envd, "echo out; echo err >&2; exit 3", &[]).await;
    assert_eq!(o.out(), "out\n");
    assert_eq!(o.stderr, b"err\n");
    assert_eq!(
        o.end(),
        &json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
    );
    assert_eq!(o.end_stream, json!({}));

    // A clean exit: zero values are omitted.
    let o = run(&envd, "true", &[]).await;
    assert_eq!(o.end(), &json!({"exited": true, "status": "exit status 0"}));

    // Output is read in chunks of at most 32 KiB and arrives complete.
    let o = run(&envd, "head -c 300000 /dev/zero", &[]).await;
    assert_eq!(o.stdout.len(), 300_000);
    assert!(o.chunks.iter().all(|c| *c <= 32 * 1024), "{:?}", o.chunks);

    // cmd and args are exec'd directly, without a shell.
    let o = collect(
        start(
            &envd,
            json!({"process": {"cmd": "echo", "args": ["$HOME", "a b"]}}),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(o.out(), "$HOME a b\n");
    // A process killed by a signal.
    let o = run(&envd, "kill -SEGV $$", &[]).await;
    assert_eq!(o.end()["status"], "signal: segmentation fault");
    assert_eq!(o.end()["exitCode"], -1);
    assert!(o.end().get("exited").is_none());

    // Every child was reaped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(zombies_of(envd.pid()), Vec::<String>::new());
}

#[tokio::test]
async fn background_descendant_does_not_hold_the_end() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();
    let began = Instant::now();
    let o = run(&envd, "sleep 30 & echo $!", &[]).await;
    reaper.add(o.pid);
    let bg: u32 = o.out().trim().parse().unwrap();
    reaper.add(bg);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "end came after {:?}",
        began.elapsed()
    );
    assert_eq!(o.end()["status"], "exit status 0");
    // The descendant keeps running (its output pipe is drained, not closed).
    assert!(alive(bg));
}

#[tokio::test]
async fn stdin_send_input_and_close_stdin() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();
    for stdin_field in [json!(true), Value::Null] {
        let mut body = json!({"process": {"cmd": "cat"}});
        if !stdin_field.is_null() {
            body["stdin"] = stdin_field;
        }
        let (mut s, mut o) = spawn(&envd, body, &[]).await;
        reaper.add(o.pid);
        let sel = json!({"pid": o.pid});
        let (st, b) = envd
            .unary(
                "/process.Process/SendInput",
                json!({"process": sel, "input": {"stdin": b64(b"hello\n")}}),
                &[],
            )
            .await;
        assert_eq!((st, &b), (200, &json!({})));
        read_until(&mut s, &mut o, "hello\n").await;
        // pty input to a process without a PTY is an error.
        let (st, b) = envd
            .unary(
                "/process.Process/SendInput",
                json!({"process": sel, "input": {"pty": b64(b"x")}}),
                &[],
            )
            .await;
        assert_eq!(st, 500);
        assert_error(&b, "internal", "tty not assigned");
        // Resizing a process without a PTY is an error.
        let (st, b) = envd
            .unary(
                "/process.Process/Update",
                json!({"process": sel, "pty": {"size": {"cols": 10, "rows": 10}}}),
                &[],
            )
            .await;
        assert_eq!(st, 500);
        assert_error(&b, "internal", "tty not assigned to process");
        // EOF on stdin: cat ends.
        let (st, _) = envd
            .unary("/process.Process/CloseStdin", json!({"process": sel}), &[])
            .await;
        assert_eq!(st, 200);
        let tail = rest(s).await;
        assert_eq!(tail.end()["status"], "exit status 0");
    }

    // stdin:false gives /dev/null: cat ends at once; stdin cannot be written.
    let (mut s, mut o) = spawn(
        &envd,
        json!({"process": sh("cat; echo cat-done; sleep 30"), "stdin": false}),
        &[],
    )
    .await;
    reaper.add(o.pid);
    read_until(&mut s, &mut o, "cat-done").await;
    let (st, b) = envd
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": o.pid}, "input": {"stdin": b64(b"x")}}),
            &[],
        )
        .await;
    assert_eq!(st, 500);
    assert_error(&b, "internal", "stdin not enabled or closed");
    assert_eq!(signal(&envd, o.pid, "SIGNAL_SIGKILL").await.0, 200);
}

/// Frames messages as a client-streaming request body.
fn envelopes(msgs: &[Value]) -> Vec<u8> {
    msgs.iter()
        .flat_map(|m| support::envelope(0, m.to_string().as_bytes()))
        .collect()
}

/// Splits a response body into (flags, payload) envelopes.
fn split_envelopes(mut body: Bytes) -> Vec<(u8, Bytes)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let flags = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body.advance(5);
        out.push((flags, body.split_to(len)));
    }
    assert!(body.is_empty(), "trailing bytes");
    out
}

async fn stream_input(envd: &Envd, body: reqwest::Body) -> Vec<(u8, Value)> {
    let resp = envd
        .client
        .post(envd.url("/process.Process/StreamInput"))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    split_envelopes(body)
        .into_iter()
        .map(|(f, p)| (f, serde_json::from_slice(&p).unwrap()))
        .collect()
}

#[tokio::test]
async fn stream_input_feeds_stdin() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();
    let (mut s, mut o) = spawn(
        &envd,
        json!({"process": {"cmd": "cat"}, "stdin": true}),
        &[],
    )
    .await;
    reaper.add(o.pid);

    // Sent as a real stream: the first chunk reaches the process before the request ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let call = tokio::spawn({
        let url = envd.url("/process.Process/StreamInput");
        let client = envd.client.clone();
        async move {
            let resp = client
                .post(url)
                .header("content-type", "application/connect+json")
                .header("connect-protocol-version", "1")
                .body(body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap())
        }
    });
    let pid = o.pid;
    tx.send(Ok(envelopes(&[
        json!({"start": {"process": {"pid": pid}}}),
        json!({"data": {"input": {"stdin": b64(b"one\n")}}}),
    ])))
    .await
    .unwrap();
    read_until(&mut s, &mut o, "one\n").await;
    tx.send(Ok(envelopes(&[
        json!({"keepalive": {}}),
        json!({"data": {"input": {"stdin": b64(b"two\n")}}}),
    ])))
    .await
    .unwrap();
    drop(tx);
    let (st, resp) = call.await.unwrap();
    assert_eq!(st, 200);
    let frames = split_envelopes(resp);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!((frames[0].0, &frames[0].1[..]), (0, &b"{}"[..]));
    assert_eq!((frames[1].0, &frames[1].1[..]), (2, &b"{}"[..]));
    read_until(&mut s, &mut o, "one\ntwo\n").await;

    // The first message must select the process.
    let frames = stream_input(
        &envd,
        envelopes(&[json!({"data": {"input": {"stdin": b64(b"x")}}})]).into(),
    )
    .await;
    assert_eq!(frames.last().unwrap().0, 2);
    assert_error(
        &frames.last().unwrap().1,
        "invalid_argument",
        "first StreamInput message must be a start",
    );
    let frames = stream_input(
        &envd,
        envelopes(&[json!({"start": {"process": {"pid": 99_999_999u32}}})]).into(),
    )
    .await;
    assert_error(
        &frames.last().unwrap().1,
        "not_found",
        "process with pid 99999999 not found",
    );

    envd.unary(
        "/process.Process/CloseStdin",
        json!({"process": {"pid": pid}}),
        &[],
    )
    .await;
    assert_eq!(rest(s).await.end()["status"], "exit status 0");
}

#[tokio::test]
async fn signals_reach_the_process_group() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();

    let (s, o) = spawn(
        &envd,
        json!({"process": {"cmd": "sleep", "args": ["60"]}}),
        &[],
    )
    .await;
    reaper.add(o.pid);
    assert_eq!(
        signal(&envd, o.pid, "SIGNAL_SIGTERM").await,
        (200, json!({}))
    );
    let end = rest(s).await;
    assert_eq!(
        end.end(),
        &json!({"exitCode": -1, "status": "signal: terminated", "error": "signal: terminated"})
    );

    // SIGKILL reaches descendants too: the whole process group.
    let (mut s, mut o) = spawn(
        &envd,
        json!({"process": sh("sleep 60 & echo $!; wait"), "stdin": false}),
        &[],
    )
    .await;
    reaper.add(o.pid);
    read_until(&mut s, &mut o, "\n").await;
    let child: u32 = o.out().trim().parse().unwrap();
    assert!(alive(child));
    // Unsupported signals.
    let (st, b) = signal(&envd, o.pid, "SIGNAL_UNSPECIFIED").await;
    assert_eq!(st, 501);
    assert_error(&b, "unimplemented", "invalid signal");
    // SIGINT (2) is not in the JSON enum, but the binary codec carries any number.
    let sigint = pb::SendSignalRequest {
        process: Some(pb::ProcessSelector {
            selector: Some(pb::process_selector::Selector::Pid(o.pid)),
        }),
        signal: 2,
    };
    let (st, _): (_, pb::SendSignalResponse) = proto_unary(&envd, "SendSignal", &sigint).await;
    assert_eq!(st, 501);
    assert!(alive(o.pid));
    assert_eq!(signal(&envd, o.pid, "SIGNAL_SIGKILL").await.0, 200);
    let tail = rest(s).await;
    assert_eq!(tail.end()["status"], "signal: killed");
    eventually("the grandchild to die", || !alive(child)).await;
    // Ended processes leave the list and cannot be signalled.
    assert!(!list_pids(&envd).await.contains(&(o.pid as u64)));
    let (st, b) = signal(&envd, o.pid, "SIGNAL_SIGKILL").await;
    assert_eq!(st, 404);
    assert_error(
        &b,
        "not_found",
        &format!("process with pid {} not found", o.pid),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(zombies_of(envd.pid()), Vec::<String>::new());
}

#[tokio::test]
async fn pty_output_input_and_resize() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();
    let script = "stty size; [ -t 0 ] && echo is-tty; exec 3</dev/tty && echo ctty-ok; read x; echo got:$x; stty size";
    let body = json!({"process": sh(script), "pty": {"size": {"cols": 80, "rows": 24}}});
    let (mut s, mut o) = spawn(&envd, body, &[]).await;
    reaper.add(o.pid);
    let sel = json!({"pid": o.pid});
    read_until(&mut s, &mut o, "ctty-ok").await;
    let text = String::from_utf8_lossy(&o.pty).into_owned();
    assert!(text.contains("24 80\r\n"), "{text:?}");
    assert!(text.contains("is-tty"), "{text:?}");
    assert!(o.stdout.is_empty() && o.stderr.is_empty());

    // stdin input and CloseStdin are for pipes only.
    let (st, b) = envd
        .unary(
            "/process.Process/SendInput",
            json!({"process": sel, "input": {"stdin": b64(b"x")}}),
            &[],
        )
        .await;
    assert_eq!(st, 500);
    assert_error(&b, "internal", "tty assigned to process");
    let (st, b) = envd
        .unary("/process.Process/CloseStdin", json!({"process": sel}), &[])
        .await;
    assert_eq!(st, 500);
    assert_error(&b, "internal", "Ctrl+D");

    let (st, b) = envd
        .unary(
            "/process.Process/Update",
            json!({"process": sel, "pty": {"size": {"cols": 100, "rows": 30}}}),
            &[],
        )
        .await;
    assert_eq!((st, &b), (200, &json!({})));
    let (st, _) = envd
        .unary(
            "/process.Process/SendInput",
            json!({"process": sel, "input": {"pty": b64(b"hi\n")}}),
            &[],
        )
        .await;
    assert_eq!(st, 200);
    let tail = rest(s).await;
    let text = String::from_utf8_lossy(&tail.pty).into_owned();
    // The terminal echoes the input, then the shell reports the new size.
    assert!(text.contains("got:hi\r\n30 100\r\n"), "{text:?}");
    assert!(tail.chunks.iter().all(|c| *c <= 16 * 1024));
    assert_eq!(tail.end()["status"], "exit status 0");
}

#[tokio::test]
async fn reattach_after_the_first_client_left() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();
    let script = "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.1; done";
    let (mut s, mut o) = spawn(
        &envd,
        json!({"process": sh(script), "stdin": false, "tag": "ticker"}),
        &[],
    )
    .await;
    let pid = reaper.add(o.pid);
    read_until(&mut s, &mut o, "tick1\n").await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Still running and listed, with its config and tag.
    assert!(alive(pid));
    let (_, listed) = envd.unary("/process.Process/List", json!({}), &[]).await;
    let info = listed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .expect("listed")
        .clone();
    assert_eq!(info["tag"], "ticker");
    assert_eq!(
        info["config"],
        json!({"cmd": "/bin/sh", "args": ["-c", script]})
    );

    for selector in [json!({"pid": pid}), json!({"tag": "ticker"})] {
        let mut c = envd
            .stream(
                "/process.Process/Connect",
                json!({"process": selector}),
                &[],
            )
            .await;
        let mut co = Outcome::default();
        let first = c.next_within(T).await;
        assert_eq!(
            first,
            Some(Item::Message(json!({"event": {"start": {"pid": pid}}})))
        );
        co.pid = pid;
        read_until(&mut c, &mut co, "\n").await;
        // Only output produced after attaching: a later tick, never the first ones.
        let text = String::from_utf8_lossy(&co.stdout).into_owned();
        assert!(
            !text.starts_with("tick0\n") && !text.starts_with("tick1\n"),
            "{text:?}"
        );
    }

    // Two attached streams both get the end.
    let a = envd
        .stream(
            "/process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await;
    let b = envd
        .stream(
            "/process.Process/Connect",
            json!({"process": {"tag": "ticker"}}),
            &[],
        )
        .await;
    assert_eq!(signal(&envd, pid, "SIGNAL_SIGKILL").await.0, 200);
    for st in [a, b] {
        let o = collect(st).await;
        assert_eq!(o.pid, pid);
        assert_eq!(o.end()["status"], "signal: killed");
    }

    // Within 30 s of the end, Connect replays start and end.
    let o = collect(
        envd.stream(
            "/process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(o.pid, pid);
    assert_eq!(o.end()["status"], "signal: killed");
    assert!(o.stdout.is_empty());
    let o = collect(
        envd.stream(
            "/process.Process/Connect",
            json!({"process": {"tag": "ticker"}}),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(o.end()["status"], "signal: killed");
    let (_, e) = envd
        .stream(
            "/process.Process/Connect",
            json!({"process": {"tag": "nope"}}),
            &[],
        )
        .await
        .collect(T)
        .await;
    assert_error(&e, "not_found", "process with tag nope not found");
}

#[tokio::test]
async fn runs_as_the_requested_user_with_login_env() {
    let envd = Envd::start(&[]);
    let script = "id -u; id -g; id -G; echo $HOME $USER $LOGNAME $SHELL; pwd; cat /proc/self/oom_score_adj; \
                  echo $$ $(cut -d' ' -f6 /proc/$$/stat)";
    let auth = basic("nobody");
    let o = collect(
        start(
            &envd,
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", script], "cwd": "/tmp"}}),
            &[("authorization", &auth)],
        )
        .await,
    )
    .await;
    let out = o.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..6],
        [
            "65534",
            "65534",
            "65534",
            "/nonexistent nobody nobody /usr/sbin/nologin",
            "/tmp",
            "100"
        ],
        "{out}"
    );
    // The process leads its own session.
    assert_eq!(lines[6], format!("{} {}", o.pid, o.pid));

    // Without Authorization: the default user (root), in its home.
    let o = run(&envd, "id -u; pwd; echo $USER", &[]).await;
    assert_eq!(o.out(), "0\n/root\nroot\n");

    // An unknown user is unauthenticated.
    let bad = basic("no-such-user-xyz");
    let (msgs, e) = start(
        &envd,
        json!({"process": sh("true")}),
        &[("authorization", &bad)],
    )
    .await
    .collect(T)
    .await;
    assert!(msgs.is_empty());
    assert_error(&e, "unauthenticated", "no-such-user-xyz");
    // A user who cannot enter the cwd cannot start there.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let body = json!({"process": {"cmd": "pwd", "cwd": dir.path().to_str().unwrap()}});
    let (_, e) = start(&envd, body, &[("authorization", &auth)])
        .await
        .collect(T)
        .await;
    assert_error(&e, "invalid_argument", "Permission denied");
}

#[tokio::test]
async fn cwd_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().to_str().unwrap().to_owned();
    let envd = Envd::start(&["--default-workdir", &workdir]);
    // Request envs come last and win; the global E2B_SANDBOX is there.
    let body = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "pwd; echo $FOO $HOME $E2B_SANDBOX; echo $PATH"],
        "envs": {"FOO": "bar", "HOME": "/elsewhere", "PATH": "/custom:/usr/bin:/bin"}}});
    let o = collect(start(&envd, body, &[]).await).await;
    assert_eq!(
        o.out(),
        format!("{workdir}\nbar /elsewhere false\n/custom:/usr/bin:/bin\n")
    );

    // The environment is built from scratch, not inherited from envd.
    let o = run(&envd, "env | cut -d= -f1 | sort | tr '\\n' ' '", &[]).await;
    for var in ["HOME", "LOGNAME", "PATH", "SHELL", "USER", "E2B_SANDBOX"] {
        assert!(
            o.out().split(' ').any(|v| v == var),
            "{var} missing from {}",
            o.out()
        );
    }
    assert!(!o.out().contains("CARGO"), "{}", o.out());

    // `~` and relative paths resolve against the home; a missing cwd is rejected.
    let o = collect(start(&envd, json!({"process": {"cmd": "pwd", "cwd": "~"}}), &[]).await).await;
    assert_eq!(o.out(), "/root\n");
    let (msgs, e) = start(
        &envd,
        json!({"process": {"cmd": "pwd", "cwd": "/no/such/dir"}}),
        &[],
    )
    .await
    .collect(T)
    .await;
    assert!(msgs.is_empty());
    assert_error(&e, "invalid_argument", "cwd '/no/such/dir' does not exist");
    let (_, e) = start(
        &envd,
        json!({"process": {"cmd": "pwd", "cwd": "no-such-rel"}}),
        &[],
    )
    .await
    .collect(T)
    .await;
    assert_error(
        &e,
        "invalid_argument",
        "cwd '/root/no-such-rel' does not exist",
    );
}

#[tokio::test]
async fn deadline_kills_the_process() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();
    let began = Instant::now();
    let mut s = start(
        &envd,
        json!({"process": {"cmd": "sleep", "args": ["60"]}}),
        &[("connect-timeout-ms", "1000")],
    )
    .await;
    let mut o = Outcome::default();
    loop {
        match s.next_within(T).await {
            Some(Item::Message(m)) => absorb(&mut o, &m),
            Some(Item::End(e)) => {
                assert_error(&e, "deadline_exceeded", "");
                break;
            }
            None => panic!("no end-of-stream"),
        }
    }
    let pid = reaper.add(o.pid);
    assert!(began.elapsed() >= Duration::from_millis(900));
    eventually("the process to be killed", || !alive(pid)).await;
    assert!(began.elapsed() < Duration::from_secs(10));
    let o = collect(
        envd.stream(
            "/process.Process/Connect",
            json!({"process": {"pid": pid}}),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(o.end()["status"], "signal: killed");

    // Dropping the client stream does not kill a process without a deadline.
    let (s, o) = spawn(
        &envd,
        json!({"process": {"cmd": "sleep", "args": ["60"]}}),
        &[],
    )
    .await;
    let pid = reaper.add(o.pid);
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid));
    assert!(list_pids(&envd).await.contains(&(pid as u64)));
}

#[tokio::test]
async fn keepalives_fill_quiet_streams() {
    let envd = Envd::start(&[]);
    let o = collect(
        start(
            &envd,
            json!({"process": sh("sleep 2.5; echo done")}),
            &[("keepalive-ping-interval", "1")],
        )
        .await,
    )
    .await;
    assert!(o.keepalives >= 1, "{o:?}");
    assert_eq!(o.out(), "done\n");
    // Without the header the default is 90 s: none in a short run.
    let o = run(&envd, "sleep 1.2", &[]).await;
    assert_eq!(o.keepalives, 0);
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let envd = Envd::start(&[]);
    let missing = json!({"pid": 99_999_999u32});
    for (rpc, body) in [
        (
            "SendInput",
            json!({"process": missing, "input": {"stdin": b64(b"x")}}),
        ),
        (
            "SendSignal",
            json!({"process": missing, "signal": "SIGNAL_SIGKILL"}),
        ),
        ("CloseStdin", json!({"process": missing})),
        (
            "Update",
            json!({"process": missing, "pty": {"size": {"cols": 1, "rows": 1}}}),
        ),
    ] {
        let (st, b) = envd
            .unary(&format!("/process.Process/{rpc}"), body, &[])
            .await;
        assert_eq!(st, 404, "{rpc}: {b}");
        assert_error(&b, "not_found", "process with pid 99999999 not found");
    }
    let (_, e) = envd
        .stream("/process.Process/Connect", json!({"process": missing}), &[])
        .await
        .collect(T)
        .await;
    assert_error(&e, "not_found", "process with pid 99999999 not found");

    // No selector.
    let (st, b) = envd
        .unary("/process.Process/CloseStdin", json!({}), &[])
        .await;
    assert_eq!(st, 400);
    assert_error(&b, "invalid_argument", "selector");
    let (_, e) = envd
        .stream("/process.Process/Connect", json!({"process": {}}), &[])
        .await
        .collect(T)
        .await;
    assert_error(&e, "invalid_argument", "selector");

    // Malformed JSON, unary and streaming.
    let resp = envd
        .client
        .post(envd.url("/process.Process/List"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = envd
        .client
        .post(envd.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .body(support::envelope(0, b"{\"process\": 5}"))
        .send()
        .await
        .unwrap();
    let frames = split_envelopes(resp.bytes().await.unwrap());
    assert_eq!(frames.len(), 1);
    assert_error(
        &serde_json::from_slice(&frames[0].1).unwrap(),
        "invalid_argument",
        "",
    );
    let (st, b) = envd
        .unary(
            "/process.Process/SendSignal",
            json!({"process": {"pid": 1}, "signal": "SIGNAL_NOPE"}),
            &[],
        )
        .await;
    assert_eq!(st, 400, "{b}");

    // No process config, a command that does not exist, NUL bytes.
    let (_, e) = start(&envd, json!({}), &[]).await.collect(T).await;
    assert_error(&e, "invalid_argument", "process config is required");
    let (_, e) = start(&envd, json!({"process": {"cmd": "/no/such/binary"}}), &[])
        .await
        .collect(T)
        .await;
    assert_error(
        &e,
        "invalid_argument",
        "error starting process '/no/such/binary'",
    );
    let (_, e) = start(
        &envd,
        json!({"process": {"cmd": "echo", "args": ["a\u{0}b"]}}),
        &[],
    )
    .await
    .collect(T)
    .await;
    assert_error(&e, "invalid_argument", "");
    let (_, e) = start(
        &envd,
        json!({"process": {"cmd": "true"}, "pty": {"size": {"cols": 4294967295u32, "rows": 0}}}),
        &[],
    )
    .await
    .collect(T)
    .await;
    assert_eq!(e, json!({}), "an oversized PTY is clamped, not an error");
    // SendInput without input.
    let (st, b) = envd
        .unary(
            "/process.Process/SendInput",
            json!({"process": {"pid": 1}}),
            &[],
        )
        .await;
    assert_eq!(st, 404, "{b}");

    // envd is still healthy and has no leftover processes.
    assert_eq!(list_pids(&envd).await, Vec::<u64>::new());
}

/// Proto-codec helpers.
async fn proto_unary<Req: prost::Message, Resp: prost::Message + Default>(
    envd: &Envd,
    rpc: &str,
    req: &Req,
) -> (u16, Resp) {
    let resp = envd
        .client
        .post(envd.url(&format!("/process.Process/{rpc}")))
        .header("content-type", "application/proto")
        .header("connect-protocol-version", "1")
        .body(req.encode_to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        if status == 200 {
            "application/proto"
        } else {
            "application/json"
        }
    );
    let body = resp.bytes().await.unwrap();
    (
        status,
        if status == 200 {
            Resp::decode(body).unwrap()
        } else {
            Resp::default()
        },
    )
}

#[tokio::test]
async fn binary_proto_codec() {
    let envd = Envd::start(&[]);
    let mut reaper = Reaper::default();
    let req = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), "echo ready; exec sleep 60".into()],
            ..Default::default()
        }),
        tag: Some("proto".into()),
        stdin: Some(false),
        ..Default::default()
    };
    let mut resp = envd
        .client
        .post(envd.url("/process.Process/Start"))
        .header("content-type", "application/connect+proto")
        .header("connect-protocol-version", "1")
        .body(support::envelope(0, &req.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/connect+proto");
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    let mut end_stream = None;
    let mut killed = false;
    while end_stream.is_none() {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            let flags = buf[0];
            buf.advance(5);
            let payload = buf.split_to(len).freeze();
            if flags & 2 != 0 {
                end_stream = Some(serde_json::from_slice::<Value>(&payload).unwrap());
            } else {
                events.push(
                    pb::StartResponse::decode(payload)
                        .unwrap()
                        .event
                        .unwrap()
                        .event
                        .unwrap(),
                );
            }
        }
        let pid = match events.first() {
            Some(pb::process_event::Event::Start(s)) => s.pid,
            Some(other) => panic!("first event {other:?}"),
            None => 0,
        };
        if pid != 0 && !killed && events.len() >= 2 {
            reaper.add(pid);
            // List and SendSignal in the binary codec too.
            let (st, list): (_, pb::ListResponse) =
                proto_unary(&envd, "List", &pb::ListRequest {}).await;
            assert_eq!(st, 200);
            let info = list
                .processes
                .iter()
                .find(|p| p.pid == pid)
                .expect("listed");
            assert_eq!(info.tag.as_deref(), Some("proto"));
            assert_eq!(
                info.config.as_ref().unwrap().args[1],
                "echo ready; exec sleep 60"
            );
            let sig = pb::SendSignalRequest {
                process: Some(pb::ProcessSelector {
                    selector: Some(pb::process_selector::Selector::Pid(pid)),
                }),
                signal: pb::Signal::Sigkill as i32,
            };
            let (st, _): (_, pb::SendSignalResponse) = proto_unary(&envd, "SendSignal", &sig).await;
            assert_eq!(st, 200);
            killed = true;
        }
        if end_stream.is_none() {
            let chunk = tokio::time::timeout(T, resp.chunk())
                .await
                .unwrap()
                .unwrap()
                .expect("more of the stream");
            buf.extend_from_slice(&chunk);
        }
    }
    assert_eq!(end_stream, Some(json!({})));
    assert_eq!(
        events[1],
        pb::process_event::Event::Data(pb::process_event::DataEvent {
            output: Some(pb::process_event::data_event::Output::Stdout(
                b"ready\n".to_vec()
            ))
        })
    );
    // exit_code is sint32 on the wire: -1 must survive the zigzag encoding.
    assert_eq!(
        events.last().unwrap(),
        &pb::process_event::Event::End(pb::process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: Some("signal: killed".into()),
        })
    );
    // Errors in the proto codec are still JSON bodies with the right status.
    let sig = pb::SendSignalRequest {
        process: Some(pb::ProcessSelector {
            selector: Some(pb::process_selector::Selector::Tag("none".into())),
        }),
        signal: pb::Signal::Sigterm as i32,
    };
    let (st, _): (_, pb::SendSignalResponse) = proto_unary(&envd, "SendSignal", &sig).await;
    assert_eq!(st, 404);
}
