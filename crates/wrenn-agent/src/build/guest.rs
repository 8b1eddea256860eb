//! The build's hands inside the build VM: commands through envd's `process.Process/Start`
//! (Connect, binary codec) and files through envd's `POST /files`. Nothing of a build step
//! runs on the host: archives are unpacked and files moved by commands in the guest.
//!
//! The guest controls every byte it sends back, so output is cut into lines of at most
//! [`MAX_LINE`] bytes as it streams and never collected whole.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use http::{HeaderName, HeaderValue};
use wrenn_connect::Client;
use wrenn_proto::process::{
    ProcessConfig, StartRequest, StartResponse, process_event::Event, process_event::data_event,
};

/// The longest log line kept from a step's output; the rest of a longer line is dropped.
pub(super) const MAX_LINE: usize = 4096;

/// Why a command or an upload in the build VM failed (not a command's own failure: that is
/// an exit code).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// envd refused or broke the call.
    #[error("envd in the build VM: {0}")]
    Rpc(#[source] wrenn_connect::ConnectError),
    /// The stream ended without the process's end event.
    #[error("the command's stream ended before the command did")]
    NoEnd,
    /// The step did not finish in time.
    #[error("the command did not finish within {0:?}")]
    Timeout(Duration),
    /// Writing or reading a file in the guest failed.
    #[error("file {path} in the guest")]
    File {
        /// The guest path.
        path: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a command runs: as whom, where, with what environment.
#[derive(Debug, Clone, Default)]
pub struct RunAs {
    /// The guest user (envd takes it from HTTP Basic auth).
    pub user: String,
    /// The working directory; `None`: the user's home.
    pub cwd: Option<String>,
    /// Environment variables on top of envd's.
    pub envs: Vec<(String, String)>,
}

/// A client for the build VM's envd.
#[derive(Debug, Clone)]
pub struct Guest {
    base: String,
    token: String,
    http: reqwest::Client,
    codec: wrenn_connect::Codec,
}

impl Guest {
    /// envd at `addr`, authenticating with `token` (what the build's `/init` set).
    pub fn new(addr: SocketAddr, token: String) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap_or_default();
        Self {
            base: format!("http://{addr}"),
            token,
            http,
            codec: wrenn_connect::Codec::Proto,
        }
    }

    /// Speaks Connect's JSON codec to envd, as the E2B SDKs do (the default is protobuf).
    pub fn with_json(mut self) -> Self {
        self.codec = wrenn_connect::Codec::Json;
        self
    }

    /// Runs `/bin/bash -l -c <cmd>` as `how`, handing each output line to `on_line`; returns
    /// the exit code (a command killed by a signal: 128 + the signal, as a shell reports it).
    pub async fn run(
        &self,
        cmd: &str,
        how: &RunAs,
        timeout: Duration,
        on_line: &mut (dyn FnMut(Stream, &str) + Send),
    ) -> Result<i32, GuestError> {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:", how.user));
        let header = |v: String| HeaderValue::try_from(v).map_err(|e| rpc_err(e.to_string()));
        let client = Client::new(&self.base)
            .map_err(|e| rpc_err(e.to_string()))?
            .with_codec(self.codec)
            .with_timeout(timeout)
            .with_header(
                HeaderName::from_static("authorization"),
                header(format!("Basic {auth}"))?,
            )
            .with_header(
                HeaderName::from_static("x-access-token"),
                header(self.token.clone())?,
            );
        let req = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into(), "-c".into(), cmd.into()],
                envs: how.envs.iter().cloned().collect(),
                cwd: how.cwd.clone(),
            }),
            pty: None,
            tag: None,
            stdin: Some(false),
        };
        let call = async {
            let mut stream = client
                .server_stream::<StartRequest, StartResponse>("/process.Process/Start", &req)
                .await
                .map_err(GuestError::Rpc)?;
            let mut lines = Lines::default();
            while let Some(msg) = stream.next().await {
                let msg = msg.map_err(GuestError::Rpc)?;
                match msg.event.and_then(|e| e.event) {
                    Some(Event::Data(d)) => match d.output {
                        Some(data_event::Output::Stdout(b)) => {
                            lines.push(Stream::Stdout, &b, on_line)
                        }
                        Some(data_event::Output::Stderr(b)) => {
                            lines.push(Stream::Stderr, &b, on_line)
                        }
                        _ => {}
                    },
                    Some(Event::End(end)) => {
                        lines.flush(on_line);
                        return Ok(exit_code(end.exit_code, &end.status));
                    }
                    _ => {}
                }
            }
            Err(GuestError::NoEnd)
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(GuestError::Timeout(timeout)),
        }
    }

    /// Streams the host file `file` into the guest at `path` (as root; envd makes the parents).
    pub async fn upload(&self, file: &Path, path: &str) -> Result<(), GuestError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| GuestError::File {
            path: path.to_owned(),
            source,
        };
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| err(e.into()))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        let resp = self
            .http
            .post(format!("{}/files", self.base))
            .query(&[("path", path), ("username", "root")])
            .header("content-type", "application/octet-stream")
            .header("x-access-token", &self.token)
            .body(body)
            .send()
            .await
            .map_err(|e| err(e.into()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = crate::envd::read_capped(resp, 4096)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            return Err(err(format!("status {status}: {}", body.trim()).into()));
        }
        Ok(())
    }
}

impl Guest {
    /// Writes `data` to `path` in the guest as `user` (envd's `POST /files`).
    pub async fn write_file(
        &self,
        path: &str,
        user: &str,
        data: Vec<u8>,
    ) -> Result<(), GuestError> {
        let req = (self.http.post(format!("{}/files", self.base)))
            .query(&[("path", path), ("username", user)])
            .header("content-type", "application/octet-stream")
            .body(data);
        self.file_call(path, req).await.map(|_| ())
    }

    /// Reads `path` in the guest as `user` (envd's `GET /files`), up to 1 MiB.
    pub async fn read_file(&self, path: &str, user: &str) -> Result<Vec<u8>, GuestError> {
        let req = (self.http.get(format!("{}/files", self.base)))
            .query(&[("path", path), ("username", user)]);
        self.file_call(path, req).await
    }

    async fn file_call(
        &self,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, GuestError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| GuestError::File {
            path: path.to_owned(),
            source,
        };
        let resp = (req.header("x-access-token", &self.token).send())
            .await
            .map_err(|e| err(e.into()))?;
        let status = resp.status();
        let body = crate::envd::read_capped(resp, 1 << 20)
            .await
            .map_err(|e| err(e.into()))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(err(format!("status {status}: {}", text.trim()).into()));
        }
        Ok(body)
    }
}

fn rpc_err(msg: String) -> GuestError {
    GuestError::Rpc(wrenn_connect::ConnectError::internal(msg))
}

/// envd reports a signal death as exit code -1 and a status like `signal: killed`.
fn exit_code(code: i32, status: &str) -> i32 {
    if code >= 0 {
        return code;
    }
    let signal = match status
        .strip_prefix("signal: ")
        .map(|s| s.trim_end_matches(" (core dumped)"))
    {
        Some("killed") => 9,
        Some("terminated") => 15,
        Some("interrupt") => 2,
        Some("segmentation fault") => 11,
        Some("aborted") => 6,
        _ => 0,
    };
    if signal == 0 { 1 } else { 128 + signal }
}

/// Splits two byte streams into lines, each capped at [`MAX_LINE`] bytes.
#[derive(Default)]
struct Lines {
    out: Vec<u8>,
    err: Vec<u8>,
}

impl Lines {
    fn push(
        &mut self,
        which: Stream,
        mut bytes: &[u8],
        on_line: &mut (dyn FnMut(Stream, &str) + Send),
    ) {
        let buf = match which {
            Stream::Stdout => &mut self.out,
            Stream::Stderr => &mut self.err,
        };
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            extend_capped(buf, &bytes[..nl]);
            on_line(which, String::from_utf8_lossy(buf).trim_end_matches('\r'));
            buf.clear();
            bytes = &bytes[nl + 1..];
        }
        extend_capped(buf, bytes);
    }

    fn flush(&mut self, on_line: &mut (dyn FnMut(Stream, &str) + Send)) {
        for (which, buf) in [
            (Stream::Stdout, &mut self.out),
            (Stream::Stderr, &mut self.err),
        ] {
            if !buf.is_empty() {
                on_line(which, &String::from_utf8_lossy(buf));
                buf.clear();
            }
        }
    }
}

fn extend_capped(buf: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_LINE.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks_and_capped() {
        let mut got = Vec::new();
        let mut on = |s: Stream, l: &str| got.push((s, l.to_owned()));
        let mut lines = Lines::default();
        lines.push(Stream::Stdout, b"hel", &mut on);
        lines.push(Stream::Stderr, b"oops\n", &mut on);
        lines.push(Stream::Stdout, b"lo\r\nworld", &mut on);
        let long = vec![b'x'; MAX_LINE * 2];
        lines.push(Stream::Stderr, &long, &mut on);
        lines.flush(&mut on);
        assert_eq!(got[0], (Stream::Stderr, "oops".to_owned()));
        assert_eq!(got[1], (Stream::Stdout, "hello".to_owned()));
        assert_eq!(got[2], (Stream::Stdout, "world".to_owned()));
        assert_eq!(got[3].1.len(), MAX_LINE);
    }

    #[test]
    fn signal_deaths_read_as_a_shell_reports_them() {
        assert_eq!(exit_code(3, "exit status 3"), 3);
        assert_eq!(exit_code(-1, "signal: killed"), 137);
        assert_eq!(exit_code(-1, "something"), 1);
    }
}
