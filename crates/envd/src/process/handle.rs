//! One started process: its output fan-out, its input, its end, and the tasks that supervise it.
//!
//! Output goes through a broadcast channel: every attached stream (the `Start` caller, any
//! `Connect` callers) gets every chunk; with nobody attached the chunk is dropped, never buffered.
//! The readers wait (up to [`SLOW_SUBSCRIBER_WAIT`]) while the slowest attached stream is a full
//! buffer behind, so a slow client slows the process down instead of losing output, but one that
//! stops reading cannot stall the process for long.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{Notify, broadcast, oneshot, watch};
use wrenn_proto::process::{
    ProcessConfig, ProcessEvent,
    process_event::{self, DataEvent, EndEvent, data_event},
};

use super::ProcessError;
use super::pty;
use super::status;

/// Output chunks a stream may be behind before the readers wait for it.
const EVENT_BUFFER: usize = 64;
/// How long the readers wait for a stream that stopped reading before they let it lag.
const SLOW_SUBSCRIBER_WAIT: Duration = Duration::from_secs(10);
/// After the process exits, how long its pipes may stay quiet before the end is reported anyway
/// (a background descendant may hold them open)...
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// ...and how long output is forwarded after the exit at most.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Which output a reader forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Stdout,
    Stderr,
    Pty,
}

impl Kind {
    /// Read size per data event, as upstream envd chunks them.
    fn chunk(self) -> usize {
        match self {
            Kind::Stdout | Kind::Stderr => 32 * 1024,
            Kind::Pty => 16 * 1024,
        }
    }

    fn wrap(self, data: Bytes) -> data_event::Output {
        let data = data.to_vec();
        match self {
            Kind::Stdout => data_event::Output::Stdout(data),
            Kind::Stderr => data_event::Output::Stderr(data),
            Kind::Pty => data_event::Output::Pty(data),
        }
    }
}

/// What a process's subscribers receive.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    Data(Kind, Bytes),
    End(EndEvent),
}

/// Where input for the process goes.
pub(crate) enum Input {
    /// A stdin pipe; `None` once closed, or when the process got `/dev/null`.
    Pipe(tokio::sync::Mutex<Option<ChildStdin>>),
    Pty(pty::Master),
}

/// A process envd started.
pub(crate) struct Proc {
    pub(crate) pid: u32,
    pub(crate) config: ProcessConfig,
    pub(crate) tag: Option<String>,
    input: Input,
    events: broadcast::Sender<Event>,
    /// Woken whenever a subscriber takes an event, so waiting readers re-check the backlog.
    drained: Notify,
    /// Set (under this lock, together with the broadcast) when the end is known.
    end: Mutex<Option<EndEvent>>,
    /// True once the child has been reaped.
    exited: watch::Sender<bool>,
}

/// An attachment to a process's events.
pub(crate) enum Subscription {
    Live(broadcast::Receiver<Event>),
    Ended(EndEvent),
}

impl Proc {
    pub(crate) fn new(
        pid: u32,
        config: ProcessConfig,
        tag: Option<String>,
        input: Input,
    ) -> Arc<Proc> {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Arc::new(Proc {
            pid,
            config,
            tag,
            input,
            events,
            drained: Notify::new(),
            end: Mutex::new(None),
            exited: watch::Sender::new(false),
        })
    }

    fn end_slot(&self) -> MutexGuard<'_, Option<EndEvent>> {
        self.end.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True once the process's end has been published.
    pub(crate) fn has_ended(&self) -> bool {
        self.end_slot().is_some()
    }

    /// Attaches to the live events, or gets the end if the process already ended. Atomic with
    /// publishing the end, so a subscriber sees either the end event or the end result.
    pub(crate) fn subscribe(&self) -> Subscription {
        let slot = self.end_slot();
        match &*slot {
            Some(end) => Subscription::Ended(end.clone()),
            None => Subscription::Live(self.events.subscribe()),
        }
    }

    /// Resolves once the child has been reaped.
    pub(crate) async fn exited(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Waits while the slowest subscriber is a full buffer behind (bounded).
    async fn wait_for_room(&self) {
        let deadline = tokio::time::Instant::now() + SLOW_SUBSCRIBER_WAIT;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Register before checking, so a wake-up between check and wait is not lost.
            notified.as_mut().enable();
            if self.events.len() < EVENT_BUFFER {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    async fn publish(&self, kind: Kind, data: Bytes) {
        self.wait_for_room().await;
        // An error means nobody is attached: the output is discarded, as upstream does.
        let _ = self.events.send(Event::Data(kind, data));
    }

    async fn finish(&self, end: EndEvent) {
        self.wait_for_room().await;
        let mut slot = self.end_slot();
        *slot = Some(end.clone());
        let _ = self.events.send(Event::End(end));
    }

    /// Sends `signal` to the process's whole process group (it leads its own session).
    pub(crate) fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        if self.has_ended() {
            return Err(ProcessError::PidNotFound(self.pid));
        }
        let pgid = i32::try_from(self.pid).map_err(|_| ProcessError::PidNotFound(self.pid))?;
        match nix::sys::signal::killpg(Pid::from_raw(pgid), signal) {
            // The group is already gone; the end event is on its way.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(ProcessError::Signal {
                pid: self.pid,
                source: e.into(),
            }),
        }
    }

    pub(crate) async fn write_stdin(&self, data: &[u8]) -> Result<(), ProcessError> {
        let Input::Pipe(stdin) = &self.input else {
            return Err(ProcessError::StdinToPty);
        };
        let mut stdin = stdin.lock().await;
        let pipe = stdin.as_mut().ok_or(ProcessError::StdinClosed)?;
        let written = async {
            pipe.write_all(data).await?;
            pipe.flush().await
        };
        written.await.map_err(|source| ProcessError::Input {
            pid: self.pid,
            source,
        })
    }

    pub(crate) async fn write_pty(&self, data: &[u8]) -> Result<(), ProcessError> {
        let Input::Pty(master) = &self.input else {
            return Err(ProcessError::PtyToPipe);
        };
        master
            .write_all(data)
            .await
            .map_err(|source| ProcessError::Input {
                pid: self.pid,
                source,
            })
    }

    /// Closes stdin so the process reads end of file. Closing twice is fine.
    pub(crate) async fn close_stdin(&self) -> Result<(), ProcessError> {
        let Input::Pipe(stdin) = &self.input else {
            return Err(ProcessError::CloseStdinPty);
        };
        drop(stdin.lock().await.take());
        Ok(())
    }

    pub(crate) fn resize(&self, size: pty::Size) -> Result<(), ProcessError> {
        let Input::Pty(master) = &self.input else {
            return Err(ProcessError::NoTty);
        };
        master.resize(size).map_err(|source| ProcessError::Resize {
            pid: self.pid,
            source,
        })
    }
}

/// Output sources of a spawned process.
pub(crate) type Outputs = Vec<(Kind, Box<dyn AsyncRead + Send + Unpin>)>;

/// Starts the tasks that forward `outputs`, reap `child` and publish the end; `on_end` runs
/// after the end is published.
pub(crate) fn supervise(
    proc: Arc<Proc>,
    mut child: Child,
    outputs: Outputs,
    on_end: impl FnOnce(&Arc<Proc>) + Send + 'static,
) {
    let mut pumps = Vec::with_capacity(outputs.len());
    for (kind, src) in outputs {
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(pump(proc.clone(), kind, src, done_tx));
        pumps.push(done_rx);
    }
    tokio::spawn(async move {
        let end = match child.wait().await {
            Ok(st) => status::end_event(st),
            Err(e) => {
                tracing::error!(pid = proc.pid, error = %e, "waiting for process failed");
                status::wait_failed(&e)
            }
        };
        proc.exited.send_replace(true);
        for done in pumps {
            let _ = done.await;
        }
        if let Input::Pipe(stdin) = &proc.input {
            drop(stdin.lock().await.take());
        }
        tracing::info!(pid = proc.pid, status = %end.status, "process ended");
        proc.finish(end).await;
        on_end(&proc);
    });
}

/// Forwards one output of `proc` to its subscribers until end of file, or until the process has
/// exited and the output stays quiet; `done` is dropped then.
async fn pump(
    proc: Arc<Proc>,
    kind: Kind,
    mut src: Box<dyn AsyncRead + Send + Unpin>,
    done: oneshot::Sender<()>,
) {
    let mut buf = vec![0u8; kind.chunk()];
    let mut exited = proc.exited.subscribe();
    let mut drain_until = None;
    loop {
        let read = match drain_until {
            Some(until) => {
                let limit = tokio::time::Instant::now() + DRAIN_IDLE;
                match tokio::time::timeout_at(limit.min(until), src.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
            None => tokio::select! {
                r = src.read(&mut buf) => r,
                _ = exited.wait_for(|e| *e) => {
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_MAX);
                    continue;
                }
            },
        };
        match read {
            Ok(0) => return,
            Ok(n) => proc.publish(kind, Bytes::copy_from_slice(&buf[..n])).await,
            Err(e) => {
                tracing::debug!(pid = proc.pid, ?kind, error = %e, "reading process output failed");
                return;
            }
        }
    }
    // The process is gone but a descendant holds the output open. Report the end now, and keep
    // reading (discarding) so the descendant neither dies of SIGPIPE nor blocks on a full pipe.
    tracing::debug!(
        pid = proc.pid,
        ?kind,
        "output still open after exit; discarding the rest"
    );
    drop(done);
    drop(proc);
    while let Ok(n) = src.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// The events a subscriber sends: `start`, then live data, then `end`.
pub(crate) fn events(
    proc: Arc<Proc>,
    sub: Subscription,
) -> impl Stream<Item = ProcessEvent> + Send + 'static {
    let start = event(process_event::Event::Start(process_event::StartEvent {
        pid: proc.pid,
    }));
    let rest = match sub {
        Subscription::Ended(end) => {
            futures::stream::once(async move { event(process_event::Event::End(end)) }).boxed()
        }
        Subscription::Live(rx) => futures::stream::unfold(Some((rx, proc)), |state| async move {
            let (mut rx, proc) = state?;
            loop {
                match rx.recv().await {
                    Ok(Event::Data(kind, data)) => {
                        proc.drained.notify_waiters();
                        let data = DataEvent {
                            output: Some(kind.wrap(data)),
                        };
                        return Some((event(process_event::Event::Data(data)), Some((rx, proc))));
                    }
                    Ok(Event::End(end)) => {
                        return Some((event(process_event::Event::End(end)), None));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            pid = proc.pid,
                            skipped = n,
                            "a process stream fell behind; output skipped"
                        );
                        proc.drained.notify_waiters();
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let end = proc.end_slot().clone()?;
                        return Some((event(process_event::Event::End(end)), None));
                    }
                }
            }
        })
        .boxed(),
    };
    futures::stream::once(async move { start }).chain(rest)
}

fn event(e: process_event::Event) -> ProcessEvent {
    ProcessEvent { event: Some(e) }
}
