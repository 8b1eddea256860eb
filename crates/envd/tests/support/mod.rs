//! Test harness: runs the real envd binary as a process and talks Connect and HTTP to it.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use serde_json::Value;

/// A running envd; killed when dropped.
pub struct Envd {
    child: Child,
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
}

impl Envd {
    /// envd on loopback with no cgroups and no port forwarder, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Envd {
        Self::start_with(
            &[
                "--listen",
                "127.0.0.1:0",
                "--no-cgroups",
                "--no-port-forward",
            ],
            extra,
        )
    }

    /// envd with exactly `base_args` then `extra`.
    pub fn start_with(base_args: &[&str], extra: &[&str]) -> Envd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_envd"))
            .args(base_args)
            .args(extra)
            .env_remove("ENVD_ACCESS_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn envd");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("envd exited before listening")
                .expect("read stdout");
            if let Some(a) = line.strip_prefix("listening on ") {
                break a.trim().parse().expect("address");
            }
        };
        // Keep draining stdout so envd never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Envd {
            child,
            base: format!("http://{addr}"),
            addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A unary Connect call with the JSON codec. Returns (HTTP status, JSON body).
    pub async fn unary(
        &self,
        procedure: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .client
            .post(self.url(procedure))
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, json)
    }

    /// Opens a server-streaming Connect call with the JSON codec.
    pub async fn stream(&self, procedure: &str, body: Value, headers: &[(&str, &str)]) -> Stream {
        let mut req = self
            .client
            .post(self.url(procedure))
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1")
            .body(envelope(0, body.to_string().as_bytes()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status().as_u16(), 200, "streams answer 200");
        Stream {
            resp,
            buf: BytesMut::new(),
        }
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Frames one Connect envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// One received stream item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Message(Value),
    /// The end-of-stream message: `{}` or `{"error": {...}}`.
    End(Value),
}

/// A server stream being read.
pub struct Stream {
    resp: reqwest::Response,
    buf: BytesMut,
}

impl Stream {
    /// The next envelope, or `None` when the body ended. Panics after `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Item> {
        tokio::time::timeout(timeout, self.next())
            .await
            .expect("stream item in time")
    }

    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload: Bytes = self.buf.split_to(len).freeze();
                    let v: Value = serde_json::from_slice(&payload).expect("JSON envelope");
                    return Some(if flags & 0x02 != 0 {
                        Item::End(v)
                    } else {
                        Item::Message(v)
                    });
                }
            }
            match self.resp.chunk().await.expect("read stream") {
                Some(c) => self.buf.extend_from_slice(&c),
                None => return None,
            }
        }
    }

    /// Reads until the end-of-stream message; returns the messages and the end message.
    pub async fn collect(mut self, timeout: Duration) -> (Vec<Value>, Value) {
        let mut msgs = Vec::new();
        loop {
            match self.next_within(timeout).await {
                Some(Item::Message(m)) => msgs.push(m),
                Some(Item::End(e)) => return (msgs, e),
                None => panic!("stream closed without an end-of-stream message; got {msgs:?}"),
            }
        }
    }
}

/// `Authorization` header value for `user`.
pub fn basic(user: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

/// Base64 of bytes, as proto3 JSON encodes `bytes`.
pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

/// The path of the envd binary under test.
pub fn envd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_envd")
}

/// envd started through `program args` (e.g. `sh -c '...; exec "$0" "$@"' <envd_bin()> ...`),
/// which must end by exec-ing envd so the child process is envd itself.
pub fn start_envd_via(program: &str, args: &[&str]) -> Envd {
    let mut child = Command::new(program)
        .args(args)
        .env_remove("ENVD_ACCESS_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn envd");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("envd exited before listening")
            .expect("read stdout");
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.trim().parse().expect("address");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Envd {
        child,
        base: format!("http://{addr}"),
        addr,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    }
}
