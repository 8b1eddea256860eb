//! Talking to a sandbox's envd through the edge proxy, as the SDKs do: every request to the
//! sandbox URL carries `E2b-Sandbox-Id`/`E2b-Sandbox-Port` (routing) and `X-Access-Token`
//! (the token from the connect response); `Authorization: Basic <user>:` picks the user.

use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use http::{HeaderName, HeaderValue};
use wrenn_connect::{BoxStream, Client};
use wrenn_proto::process::{
    CloseStdinRequest, CloseStdinResponse, ProcessInput, ProcessSelector, Pty, SendInputRequest,
    SendInputResponse, SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse,
    UpdateRequest, UpdateResponse, process_event::EndEvent, process_input, process_selector, pty,
};

use super::api::Api;
use super::config::Config;

/// envd's port, which the edge proxy routes to.
const ENVD_PORT: &str = "49983";
/// Seconds between keepalive messages asked of envd on quiet streams, as the SDKs ask: idle
/// proxies would otherwise close a silent `Start` stream.
const KEEPALIVE_SECS: &str = "50";
/// Bound on the small unary calls (input, resize, signals).
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one sandbox's envd.
pub(super) struct Envd {
    stream: Client,
    unary: Client,
}

impl Envd {
    /// Connects to sandbox `id` (resuming it if paused, as `Sandbox.connect` does) and
    /// prepares envd calls as `user` (envd's default user when `None`).
    pub(super) async fn connect(
        config: &Config,
        api: &Api,
        id: &str,
        user: Option<&str>,
    ) -> anyhow::Result<Envd> {
        let (sbx, _) = api.connect(id, None, false).await?;
        let token = sbx
            .get("envdAccessToken")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty());
        let mut headers = vec![
            ("e2b-sandbox-id", id.to_owned()),
            ("e2b-sandbox-port", ENVD_PORT.to_owned()),
        ];
        if let Some(t) = token {
            headers.push(("x-access-token", t.to_owned()));
        }
        if let Some(u) = user {
            headers.push(("authorization", basic_auth(u)));
        }
        let mut client = Client::new(&config.sandbox_url)
            .with_context(|| format!("sandbox URL {:?}", config.sandbox_url))?;
        for (name, value) in headers {
            let value = HeaderValue::from_str(&value)
                .with_context(|| format!("{name} {value:?} is not a valid header value"))?;
            client = client.with_header(HeaderName::from_static(name), value);
        }
        Ok(Envd {
            stream: client.clone().with_header(
                HeaderName::from_static(wrenn_connect::KEEPALIVE_HEADER),
                HeaderValue::from_static(KEEPALIVE_SECS),
            ),
            unary: client.with_timeout(UNARY_TIMEOUT),
        })
    }

    /// `process.Process/Start`: the event stream (start, data..., end).
    pub(super) async fn start(
        &self,
        req: &StartRequest,
    ) -> anyhow::Result<BoxStream<StartResponse>> {
        self.stream
            .server_stream("/process.Process/Start", req)
            .await
            .context("start the process")
    }

    pub(super) async fn send_input(
        &self,
        pid: u32,
        input: process_input::Input,
    ) -> anyhow::Result<()> {
        let req = SendInputRequest {
            process: Some(selector(pid)),
            input: Some(ProcessInput { input: Some(input) }),
        };
        self.unary
            .unary::<_, SendInputResponse>("/process.Process/SendInput", &req)
            .await
            .context("send input")?;
        Ok(())
    }

    pub(super) async fn close_stdin(&self, pid: u32) -> anyhow::Result<()> {
        let req = CloseStdinRequest {
            process: Some(selector(pid)),
        };
        self.unary
            .unary::<_, CloseStdinResponse>("/process.Process/CloseStdin", &req)
            .await
            .context("close stdin")?;
        Ok(())
    }

    pub(super) async fn resize(&self, pid: u32, size: pty::Size) -> anyhow::Result<()> {
        let req = UpdateRequest {
            process: Some(selector(pid)),
            pty: Some(Pty { size: Some(size) }),
        };
        self.unary
            .unary::<_, UpdateResponse>("/process.Process/Update", &req)
            .await
            .context("resize the terminal")?;
        Ok(())
    }

    pub(super) async fn signal(&self, pid: u32, signal: Signal) -> anyhow::Result<()> {
        let req = SendSignalRequest {
            process: Some(selector(pid)),
            signal: signal as i32,
        };
        self.unary
            .unary::<_, SendSignalResponse>("/process.Process/SendSignal", &req)
            .await
            .context("signal the process")?;
        Ok(())
    }
}

fn selector(pid: u32) -> ProcessSelector {
    ProcessSelector {
        selector: Some(process_selector::Selector::Pid(pid)),
    }
}

/// `Basic base64("<user>:")`: envd takes the user from the name; the password is empty.
fn basic_auth(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

/// Our exit code for a process's end: its own code, or 128 + the signal number like a shell
/// when a signal ended it (envd reports those as exit code -1 and Go's signal text).
pub(super) fn exit_code(end: &EndEvent) -> u8 {
    if end.exited {
        return u8::try_from(end.exit_code).unwrap_or(1);
    }
    const SIGNALS: [(&str, u8); 8] = [
        ("hangup", 1),
        ("interrupt", 2),
        ("quit", 3),
        ("aborted", 6),
        ("killed", 9),
        ("segmentation fault", 11),
        ("broken pipe", 13),
        ("terminated", 15),
    ];
    let name = end.status.strip_prefix("signal: ").unwrap_or_default();
    let name = name.trim_end_matches(" (core dumped)");
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(1, |(_, num)| 128 + num)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_matches_the_sdks() {
        assert_eq!(basic_auth("root"), "Basic cm9vdDo=");
        assert_eq!(basic_auth("user"), "Basic dXNlcjo=");
    }

    #[test]
    fn exit_codes() {
        let end = |exit_code, exited, status: &str| EndEvent {
            exit_code,
            exited,
            status: status.into(),
            error: None,
        };
        assert_eq!(exit_code(&end(0, true, "exit status 0")), 0);
        assert_eq!(exit_code(&end(42, true, "exit status 42")), 42);
        assert_eq!(exit_code(&end(-1, false, "signal: killed")), 137);
        assert_eq!(
            exit_code(&end(-1, false, "signal: segmentation fault (core dumped)")),
            139
        );
        assert_eq!(exit_code(&end(-1, false, "")), 1);
    }
}
