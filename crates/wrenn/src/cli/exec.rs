//! `wrenn sandbox exec`: runs a command as the SDKs' `commands.run` does
//! (`/bin/bash -l -c <cmd>`), streams its output live, forwards piped stdin, and exits with the
//! command's exit code.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use wrenn_connect::BoxStream;
use wrenn_proto::process::{
    ProcessConfig, Signal, StartRequest, StartResponse, process_event::Event,
    process_event::data_event::Output, process_input,
};

use super::api::Api;
use super::config::Config;
use super::envd::{self, Envd};

/// Largest stdin chunk sent in one `SendInput`.
const STDIN_CHUNK: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub(super) struct ExecArgs {
    /// Sandbox ID.
    id: String,
    /// User to run as (`root`, `user`, ...; default: the sandbox's default user).
    #[arg(long, short)]
    user: Option<String>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = super::parse_kv)]
    envs: Vec<(String, String)>,
    /// The command. One argument is a shell command line (`'echo $HOME | wc -c'`); several are
    /// a program and its arguments, quoted for the shell.
    #[arg(
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<String>,
}

pub(super) async fn run(config: &Config, api: &Api, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let envd = Arc::new(Envd::connect(config, api, &args.id, args.user.as_deref()).await?);
    // A terminal on stdin means nobody is piping input: leave the process's stdin closed
    // rather than waiting on keystrokes that the command never asked for.
    let forward = !std::io::stdin().is_terminal();
    let req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), command_line(&args.cmd)],
            envs: args.envs.into_iter().collect(),
            cwd: args.cwd,
        }),
        pty: None,
        tag: None,
        stdin: Some(forward),
    };
    let mut events = envd.start(&req).await?;
    let pid = first_pid(&mut events).await?;
    if forward {
        tokio::spawn(forward_stdin(envd.clone(), pid));
    }

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupts = 0u32;
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    loop {
        let event = tokio::select! {
            ev = events.next() => ev,
            _ = interrupt.recv() => { interrupts += 1; stop(&envd, pid, interrupts).await; continue }
            _ = terminate.recv() => { interrupts += 1; stop(&envd, pid, interrupts).await; continue }
        };
        let event = match event {
            None => anyhow::bail!("the stream from the sandbox ended before the process did"),
            Some(Err(e)) => return Err(e).context("process output"),
            Some(Ok(resp)) => resp.event.and_then(|e| e.event),
        };
        let written = match event {
            Some(Event::Data(d)) => match d.output {
                Some(Output::Stdout(b) | Output::Pty(b)) => write(&mut out, &b).await,
                Some(Output::Stderr(b)) => write(&mut err, &b).await,
                None => Ok(()),
            },
            Some(Event::End(end)) => {
                let _ = out.flush().await;
                let _ = err.flush().await;
                return Ok(ExitCode::from(envd::exit_code(&end)));
            }
            Some(Event::Start(_) | Event::Keepalive(_)) | None => Ok(()),
        };
        if let Err(e) = written {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                // Our reader went away (`| head`): end the command the way a pipe would.
                let _ = envd.signal(pid, Signal::Sigterm).await;
                return Ok(ExitCode::from(128 + 13));
            }
            return Err(e).context("write output");
        }
    }
}

async fn write<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Ctrl-C (or SIGTERM) asks the process to terminate; a second one kills it. We keep reading
/// its output until it ends, so its exit code is ours.
async fn stop(envd: &Envd, pid: u32, count: u32) {
    let signal = if count == 1 {
        Signal::Sigterm
    } else {
        Signal::Sigkill
    };
    if let Err(e) = envd.signal(pid, signal).await {
        eprintln!("wrenn: could not signal the process: {e:#}");
    }
}

/// The pid from the stream's first message, which envd always makes `start`.
pub(super) async fn first_pid(events: &mut BoxStream<StartResponse>) -> anyhow::Result<u32> {
    match events.next().await {
        Some(Ok(resp)) => match resp.event.and_then(|e| e.event) {
            Some(Event::Start(s)) => Ok(s.pid),
            other => anyhow::bail!("expected a start event from envd, got {other:?}"),
        },
        Some(Err(e)) => Err(e).context("start the process"),
        None => anyhow::bail!("envd ended the stream before the process started"),
    }
}

/// Sends our stdin to the process until EOF, then closes its stdin. Input is sent in order,
/// one call at a time; failures end forwarding silently, since they mostly mean the process
/// exited (its exit is reported by the output stream).
async fn forward_stdin(envd: Arc<Envd>, pid: u32) {
    let mut chunks = read_stdin();
    while let Some(mut chunk) = chunks.recv().await {
        // Coalesce what has piled up while the previous call was in flight.
        while chunk.len() < STDIN_CHUNK {
            match chunks.try_recv() {
                Ok(more) => chunk.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if envd
            .send_input(pid, process_input::Input::Stdin(chunk))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = envd.close_stdin(pid).await;
}

/// Reads stdin on a plain thread (blocking reads never return on a quiet terminal, so they must
/// not sit on the runtime) and hands chunks over; the channel closes at EOF or on a read error.
pub(super) fn read_stdin() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}

/// The shell command line for `args`: one argument is taken as a command line, so shell syntax
/// works (`'ls | wc -l'`); several are quoted so each reaches the program as one argument.
fn command_line(args: &[String]) -> String {
    match args {
        [one] => one.clone(),
        many => many.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
    }
}

/// POSIX shell quoting: bare when only safe characters, otherwise single quotes.
fn quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%^".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(command_line(&v(&["echo $HOME | wc"])), "echo $HOME | wc");
        assert_eq!(
            command_line(&v(&["ls", "-la", "/a b", "it's", "", "$X"])),
            r"ls -la '/a b' 'it'\''s' '' '$X'"
        );
    }
}
