//! One context's Python worker: the process, in a process group of its own, its command
//! pipe, and a reader task that turns its event lines into [`Event`]s.
//!
//! The worker runs `driver.py`, embedded here and handed over on stdin (see its header), so
//! nothing is written to disk and `ps` shows a short command line.

use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use crate::wire::{Command, Event};

const DRIVER: &str = include_str!("driver.py");
/// Reads the driver (one JSON string) and runs it in a namespace of its own.
const BOOTSTRAP: &str = r#"import sys,json;exec(compile(json.loads(sys.stdin.buffer.readline()),"<wrenn-driver>","exec"),{"__name__":"wrenn_driver"})"#;
/// A longer event line (a huge figure or HTML table) is dropped rather than buffered.
const MAX_LINE: usize = 64 << 20;
/// Events read ahead of the client; more and the worker waits on its pipe.
const EVENT_QUEUE: usize = 16;
/// How much of the worker's stderr is kept for error messages.
const STDERR_TAIL: usize = 2048;

/// Why a worker could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("run {python}")]
    Spawn {
        python: String,
        #[source]
        source: io::Error,
    },
    #[error("write to the worker")]
    Write(#[source] io::Error),
    #[error("the worker exited before it was ready{0}")]
    ExitedEarly(String),
    #[error("the worker was not ready within {0:?}")]
    StartTimeout(Duration),
}

/// A running worker. Dropping it kills its whole process group: what user code started in
/// the context ends with it, as with a Jupyter kernel.
pub struct Worker {
    child: Child,
    pid: i32,
    stdin: ChildStdin,
    events: mpsc::Receiver<Event>,
    stderr_tail: Arc<Mutex<String>>,
    /// The group was killed and the leader reaped: its id may be reused, never signal it.
    reaped: bool,
    /// The sandbox's environment still has to be applied (before the first execution).
    pub needs_env: bool,
}

impl Worker {
    /// Starts a worker in `cwd` and waits until it is ready for commands.
    pub async fn start(
        python: &Path,
        cwd: &Path,
        timeout: Duration,
        label: &str,
    ) -> Result<Worker, WorkerError> {
        let mut child = tokio::process::Command::new(python)
            .args(["-u", "-c", BOOTSTRAP])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: SIGINT reaches the cell's subprocesses too (os.system would
            // otherwise sit out an interrupt), and a kill takes them all.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| WorkerError::Spawn {
                python: python.display().to_string(),
                source,
            })?;
        let (Some(pid), Some(stdin), Some(stdout), Some(stderr)) = (
            child.id(),
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
        ) else {
            // Spawned with all three piped and not yet waited for: always there.
            return Err(WorkerError::ExitedEarly(String::new()));
        };
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        tokio::spawn(log_stderr(stderr, stderr_tail.clone(), label.to_owned()));
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(read_events(stdout, tx, label.to_owned()));
        let mut worker = Worker {
            child,
            pid: pid as i32,
            stdin,
            events,
            stderr_tail,
            reaped: false,
            needs_env: false,
        };
        let driver = serde_json::to_string(DRIVER).unwrap_or_default();
        worker.write_line(driver).await?;
        tokio::time::timeout(timeout, worker.wait_ready())
            .await
            .map_err(|_| WorkerError::StartTimeout(timeout))??;
        tracing::debug!(context = label, pid, "worker ready");
        Ok(worker)
    }

    async fn wait_ready(&mut self) -> Result<(), WorkerError> {
        loop {
            match self.events.recv().await {
                Some(Event::Ready) => return Ok(()),
                Some(other) => tracing::warn!(?other, "worker event before ready"),
                None => {
                    let why = self.exit_description().await;
                    return Err(WorkerError::ExitedEarly(why));
                }
            }
        }
    }

    /// The process group (the worker's pid).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends one cell to run.
    pub async fn send(&mut self, command: &Command<'_>) -> Result<(), WorkerError> {
        let line = serde_json::to_string(command).map_err(|e| WorkerError::Write(e.into()))?;
        self.write_line(line).await
    }

    async fn write_line(&mut self, mut line: String) -> Result<(), WorkerError> {
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(WorkerError::Write)?;
        self.stdin.flush().await.map_err(WorkerError::Write)
    }

    /// The next event; `None` once the worker is gone.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The worker closed its event stream: it exited (or is exiting).
    pub fn is_gone(&self) -> bool {
        self.events.is_closed()
    }

    /// Drops events that came between cells (output of a thread the last cell left running):
    /// E2B does not deliver them either.
    pub fn drop_stale_events(&mut self) {
        while self.events.try_recv().is_ok() {}
    }

    /// SIGINT to the group: KeyboardInterrupt in the cell, as Jupyter's interrupt.
    pub fn interrupt(&self) {
        signal_group(self.pid, Signal::SIGINT);
    }

    /// Kills the group and says how the worker ended: `" (exit status 1; stderr: ...)"`.
    pub async fn exit_description(&mut self) -> String {
        let status = self.kill_and_reap().await;
        let tail = self
            .stderr_tail
            .lock()
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
        let mut parts = Vec::new();
        if let Some(status) = status {
            parts.push(status.to_string());
        }
        if !tail.is_empty() {
            parts.push(format!("stderr: {tail}"));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join("; "))
        }
    }

    async fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        if !self.reaped {
            // Kill before reaping: while the leader is unreaped its id cannot be reused.
            signal_group(self.pid, Signal::SIGKILL);
            self.reaped = true;
        }
        tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.reaped {
            signal_group(self.pid, Signal::SIGKILL);
        }
    }
}

/// Signals a worker's process group by id (restart and delete reach a busy worker so).
pub fn signal_group(pid: i32, signal: Signal) {
    if pid <= 1 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(pid), signal) {
        // ESRCH: the group is already gone.
        tracing::debug!(pid, ?signal, error = %e, "signal worker group");
    }
}

/// Parses the worker's event lines until it closes its stdout.
async fn read_events(stdout: ChildStdout, tx: mpsc::Sender<Event>, label: String) {
    let mut reader = BufReader::with_capacity(64 << 10, stdout);
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line, MAX_LINE).await {
            Ok(Some(Line::Whole)) => {}
            Ok(Some(Line::TooLong)) => {
                tracing::warn!(
                    context = label,
                    "worker event over {MAX_LINE} bytes dropped"
                );
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(context = label, error = %e, "read worker events");
                break;
            }
        }
        match serde_json::from_slice::<Event>(&line) {
            Ok(event) => {
                if tx.send(event).await.is_err() {
                    break;
                }
            }
            Err(e) => tracing::warn!(context = label, error = %e, "bad worker event"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Line {
    Whole,
    /// Longer than the limit: skipped up to its newline, `line` left empty.
    TooLong,
}

/// Reads one `\n`-terminated line into `line` (without the newline), keeping at most `max`
/// bytes of it. `None` at end of input; a last line without newline is dropped (the worker
/// died while writing it).
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<Line>> {
    line.clear();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(None);
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        if !too_long && line.len() + chunk.len() > max {
            too_long = true;
            line.clear();
            line.shrink_to(64 << 10);
        }
        if !too_long {
            line.extend_from_slice(chunk);
        }
        let used = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(if too_long { Line::TooLong } else { Line::Whole }));
        }
    }
}

/// Logs the worker's own diagnostics, keeping the tail for error messages.
async fn log_stderr(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<String>>, label: String) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!(context = label, "worker: {line}");
        if let Ok(mut tail) = tail.lock() {
            tail.push_str(&line);
            tail.push('\n');
            if tail.len() > STDERR_TAIL {
                let mut cut = tail.len() - STDERR_TAIL;
                while !tail.is_char_boundary(cut) {
                    cut += 1;
                }
                tail.drain(..cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_and_capped() {
        let input: &[u8] = b"one\ntoo long line\nthree\npartial";
        let mut reader = BufReader::with_capacity(4, input);
        let mut line = Vec::new();
        let mut got = Vec::new();
        while let Some(kind) = read_line(&mut reader, &mut line, 8).await.unwrap() {
            got.push((kind, String::from_utf8(line.clone()).unwrap()));
        }
        assert_eq!(
            got,
            [
                (Line::Whole, "one".to_owned()),
                (Line::TooLong, String::new()),
                (Line::Whole, "three".to_owned()),
            ]
        );
    }
}
