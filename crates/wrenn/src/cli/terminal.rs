//! `wrenn sandbox terminal`: an interactive shell on a PTY in the sandbox, as the SDKs'
//! `pty.create` does. The local terminal goes into raw mode so every keystroke (Ctrl-C too)
//! reaches the remote shell; it is restored however the session ends.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};
use wrenn_proto::process::{
    ProcessConfig, Pty, Signal, StartRequest, process_event::Event,
    process_event::data_event::Output, process_input, pty,
};

use super::api::Api;
use super::config::Config;
use super::envd::{self, Envd};
use super::exec::{first_pid, read_stdin};

/// Largest batch of keystrokes sent in one `SendInput`.
const INPUT_BATCH: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub(super) struct TerminalArgs {
    /// Sandbox ID.
    id: String,
    /// User to log in as (`root`, `user`, ...; default: the sandbox's default user).
    #[arg(long, short)]
    user: Option<String>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
}

pub(super) async fn run(
    config: &Config,
    api: &Api,
    args: TerminalArgs,
) -> anyhow::Result<ExitCode> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "`wrenn sandbox terminal` needs a terminal on stdin; \
             use `wrenn sandbox exec ID -- CMD` with pipes"
        );
    }
    let envd = Arc::new(Envd::connect(config, api, &args.id, args.user.as_deref()).await?);
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty() && t != "dumb")
        .unwrap_or_else(|| "xterm-256color".to_owned());
    // What the SDKs' `pty.create` sets.
    let envs = [
        ("TERM", term.as_str()),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "C.UTF-8"),
    ];
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-i".into(), "-l".into()],
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            cwd: args.cwd,
        }),
        pty: Some(Pty {
            size: Some(window_size()),
        }),
        tag: None,
        stdin: None,
    };
    let mut events = envd.start(&req).await?;
    let pid = first_pid(&mut events).await?;

    let _raw = RawMode::enter().context("put the terminal in raw mode")?;
    tokio::spawn(forward_keys(envd.clone(), pid));
    let mut winch = signal(SignalKind::window_change())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut out = tokio::io::stdout();
    loop {
        let event = tokio::select! {
            ev = events.next() => ev,
            _ = winch.recv() => {
                // A failed resize only garbles the layout; the session goes on.
                let _ = envd.resize(pid, window_size()).await;
                continue;
            }
            _ = hangup.recv() => return Ok(end_session(&envd, pid, 128 + 1).await),
            _ = terminate.recv() => return Ok(end_session(&envd, pid, 128 + 15).await),
        };
        let event = match event {
            None => anyhow::bail!("the stream from the sandbox ended before the shell did"),
            Some(Err(e)) => return Err(e).context("terminal output"),
            Some(Ok(resp)) => resp.event.and_then(|e| e.event),
        };
        match event {
            Some(Event::Data(d)) => {
                if let Some(Output::Pty(b) | Output::Stdout(b) | Output::Stderr(b)) = d.output {
                    let written = async {
                        out.write_all(&b).await?;
                        out.flush().await
                    };
                    if written.await.is_err() {
                        // Our terminal is gone: nobody can use the shell any more.
                        return Ok(end_session(&envd, pid, 128 + 1).await);
                    }
                }
            }
            Some(Event::End(end)) => {
                let _ = out.flush().await;
                return Ok(ExitCode::from(envd::exit_code(&end)));
            }
            Some(Event::Start(_) | Event::Keepalive(_)) | None => {}
        }
    }
}

/// Kills the remote shell (an interactive bash ignores SIGTERM) when we leave without it.
async fn end_session(envd: &Envd, pid: u32, code: u8) -> ExitCode {
    let _ = envd.signal(pid, Signal::Sigkill).await;
    ExitCode::from(code)
}

/// Keystrokes to the PTY, in order. When our terminal hangs up, the shell is killed.
async fn forward_keys(envd: Arc<Envd>, pid: u32) {
    let mut keys = read_stdin();
    while let Some(mut chunk) = keys.recv().await {
        while chunk.len() < INPUT_BATCH {
            match keys.try_recv() {
                Ok(more) => chunk.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if envd
            .send_input(pid, process_input::Input::Pty(chunk))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = envd.signal(pid, Signal::Sigkill).await;
}

/// The local terminal's size (stdin's), 80x24 if it cannot be read.
fn window_size() -> pty::Size {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at a live,
    // properly aligned local; fd 0 is only read from.
    let rc = unsafe {
        nix::libc::ioctl(
            nix::libc::STDIN_FILENO,
            nix::libc::TIOCGWINSZ,
            &mut ws as *mut nix::libc::winsize,
        )
    };
    if rc != 0 || ws.ws_col == 0 || ws.ws_row == 0 {
        return pty::Size { cols: 80, rows: 24 };
    }
    pty::Size {
        cols: ws.ws_col.into(),
        rows: ws.ws_row.into(),
    }
}

/// Raw mode on stdin for as long as this lives. Restored on drop (normal return, error,
/// unwinding panic) and, before the panic message is printed, by a panic hook.
struct RawMode {
    original: Termios,
}

impl RawMode {
    fn enter() -> nix::Result<RawMode> {
        let stdin = std::io::stdin();
        let original = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = original.clone();
        termios::cfmakeraw(&mut raw);
        // The hook must be `Sync`, which `Termios` is not; libc's plain struct is.
        let hook_original = nix::libc::termios::from(original.clone());
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore(&Termios::from(hook_original));
            previous(info);
        }));
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { original })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore(&self.original);
    }
}

fn restore(original: &Termios) {
    // TCSADRAIN: let the shell's last output reach the screen in raw mode first.
    let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, original);
}
