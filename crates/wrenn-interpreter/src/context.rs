//! A context: one Python worker with its state, running one execution at a time.
//!
//! Executions queue on the worker's lock, in arrival order. An execution whose client goes
//! away is interrupted (SIGINT, as E2B interrupts the kernel); if it does not stop within
//! the grace period its worker is killed, and the next execution starts a fresh one, so no
//! client can wedge a context. Restart and delete kill a busy worker without waiting for
//! the lock; the execution running on it ends with an error saying so.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use axum::body::Bytes;
use nix::sys::signal::Signal;
use tokio::sync::{Mutex, MutexGuard, mpsc};
use tokio::time::Instant;

use crate::Settings;
use crate::envd::EnvdError;
use crate::error::chain;
use crate::wire::{Command, Event, ExecuteRequest};
use crate::worker::{Worker, WorkerError, signal_group};

/// Why the current worker is being killed, for the execution that loses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Restart,
    Delete,
}

pub struct Context {
    pub id: String,
    pub language: &'static str,
    pub cwd: PathBuf,
    settings: Arc<Settings>,
    /// `None` until started, and after the worker died or was killed.
    worker: Mutex<Option<Worker>>,
    /// Deleted: executions still queued for it do not start a new worker.
    closed: AtomicBool,
    /// The current worker's process group (0: none), reachable without the lock.
    pid: AtomicI32,
    ending: std::sync::Mutex<Option<Ending>>,
}

/// How an execution left its worker.
enum Outcome {
    /// The cell is over; the worker is ready for the next.
    Done,
    /// The worker is gone (crashed, or killed by restart or delete).
    Exited,
    /// The client left and the cell did not stop within the grace period.
    Abandoned,
}

impl Context {
    pub fn new(id: String, cwd: PathBuf, settings: Arc<Settings>) -> Context {
        Context {
            id,
            language: "python",
            cwd,
            settings,
            worker: Mutex::new(None),
            closed: AtomicBool::new(false),
            pid: AtomicI32::new(0),
            ending: std::sync::Mutex::new(None),
        }
    }

    /// Starts the worker now (contexts are ready when created, as E2B's kernels are).
    pub async fn start(&self) -> Result<(), WorkerError> {
        let mut slot = self.worker.lock().await;
        if slot.is_none() {
            *slot = Some(self.spawn().await?);
        }
        Ok(())
    }

    async fn spawn(&self) -> Result<Worker, WorkerError> {
        let s = &self.settings;
        let mut worker = Worker::start(&s.python, &self.cwd, s.start_timeout, &self.id).await?;
        worker.needs_env = s.envd_url.is_some();
        self.pid.store(worker.pid(), Ordering::SeqCst);
        Ok(worker)
    }

    fn clear(&self, slot: &mut MutexGuard<'_, Option<Worker>>) {
        self.pid.store(0, Ordering::SeqCst);
        **slot = None;
    }

    /// Kills the worker and starts a new one: the context's state is gone.
    pub async fn restart(&self) -> Result<(), WorkerError> {
        self.kill_busy(Ending::Restart);
        let mut slot = self.worker.lock().await;
        self.clear(&mut slot);
        self.set_ending(None);
        *slot = Some(self.spawn().await?);
        tracing::info!(context = self.id, "context restarted");
        Ok(())
    }

    /// Kills the worker for good (the context has left the registry).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.kill_busy(Ending::Delete);
        let mut slot = self.worker.lock().await;
        self.clear(&mut slot);
    }

    fn kill_busy(&self, why: Ending) {
        self.set_ending(Some(why));
        signal_group(self.pid.load(Ordering::SeqCst), Signal::SIGKILL);
    }

    fn set_ending(&self, why: Option<Ending>) {
        if let Ok(mut ending) = self.ending.lock() {
            *ending = why;
        }
    }

    fn ending(&self) -> Option<Ending> {
        self.ending.lock().ok().and_then(|e| *e)
    }

    /// Runs one execution, its events into `out` (the response body). Meant to be spawned:
    /// it outlives the request when the client goes away, until the worker is ready again.
    pub async fn execute(
        self: Arc<Self>,
        req: ExecuteRequest,
        access_token: Option<String>,
        out: mpsc::Sender<Bytes>,
    ) {
        // Queued behind another execution: give up if the client leaves meanwhile.
        let mut slot = tokio::select! {
            slot = self.worker.lock() => slot,
            () = out.closed() => return,
        };
        if let Err(event) = self.ensure_worker(&mut slot).await {
            let _ = out.send(event.to_line()).await;
            return;
        }
        let Some(worker) = slot.as_mut() else { return };
        let env = self.sandbox_env(worker, access_token.as_deref()).await;
        worker.drop_stale_events();
        let command = Command {
            code: &req.code,
            env_vars: req.env_vars.as_ref(),
            env: env.as_ref(),
        };
        let outcome = match worker.send(&command).await {
            Ok(()) => self.pump(worker, &out).await,
            Err(_) => Outcome::Exited,
        };
        match outcome {
            Outcome::Done => {}
            Outcome::Exited => {
                let why = worker.exit_description().await;
                let _ = out.send(self.lost_worker_event(&why).to_line()).await;
                self.clear(&mut slot);
            }
            Outcome::Abandoned => {
                tracing::warn!(
                    context = self.id,
                    "interrupted execution did not stop in time: worker killed, state lost"
                );
                self.clear(&mut slot);
            }
        }
    }

    /// A live worker in `slot`: the one there, or a new one if there is none or it died
    /// between executions (as Jupyter restarts a dead kernel). The error line otherwise.
    async fn ensure_worker(&self, slot: &mut MutexGuard<'_, Option<Worker>>) -> Result<(), Event> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.lost_worker_event(""));
        }
        if let Some(worker) = slot.as_mut().filter(|w| w.is_gone()) {
            let why = worker.exit_description().await;
            tracing::warn!(context = self.id, "worker exited between executions{why}");
            self.clear(slot);
        }
        if slot.is_none() {
            let worker = self.spawn().await.map_err(|e| {
                tracing::error!(context = self.id, error = chain(&e), "start worker");
                Event::error("InterpreterError", &chain(&e), "")
            })?;
            **slot = Some(worker);
        }
        Ok(())
    }

    /// The sandbox's environment, once per worker; retried next time if envd is not there.
    async fn sandbox_env(
        &self,
        worker: &mut Worker,
        token: Option<&str>,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        let url = self
            .settings
            .envd_url
            .as_deref()
            .filter(|_| worker.needs_env)?;
        match crate::envd::fetch_envs(url, token).await {
            Ok(env) => {
                worker.needs_env = false;
                Some(env)
            }
            Err(e) => {
                // envd's answer will not change; a connection may work next time.
                if !matches!(e, EnvdError::Connect(..) | EnvdError::Timeout(_)) {
                    worker.needs_env = false;
                }
                tracing::warn!(context = self.id, error = chain(&e), "sandbox environment");
                None
            }
        }
    }

    /// Forwards the cell's events until it is done, interrupting it if the client leaves.
    async fn pump(&self, worker: &mut Worker, out: &mpsc::Sender<Bytes>) -> Outcome {
        // Until the cell's first event, anything else is left over from before it.
        let mut started = false;
        let mut client_gone = false;
        let mut deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                event = worker.next_event() => match event {
                    None => return Outcome::Exited,
                    Some(Event::Done) => return Outcome::Done,
                    Some(Event::Ready) => {}
                    Some(event) => {
                        started |= matches!(event, Event::NumberOfExecutions { .. });
                        if started && !client_gone && out.send(event.to_line()).await.is_err() {
                            client_gone = true;
                        }
                    }
                },
                () = out.closed(), if !client_gone => client_gone = true,
                () = sleep_until(deadline), if deadline.is_some() => return Outcome::Abandoned,
            }
            // Before the cell's count the worker may not be listening for SIGINT yet (it
            // would be lost); it is from the count on.
            if client_gone && started && deadline.is_none() {
                tracing::info!(context = self.id, "client left mid-execution: interrupting");
                worker.interrupt();
                deadline = Some(Instant::now() + self.settings.interrupt_grace);
            }
        }
    }

    fn lost_worker_event(&self, why: &str) -> Event {
        match self.ending() {
            // E2B's words for a kernel restart and for a context closed under an execution.
            Some(Ending::Restart) => Event::error("ContextRestarting", "Context was restarted", ""),
            Some(Ending::Delete) => Event::error(
                "UnexpectedEndOfExecution",
                "Connection to the execution was closed before the execution was finished",
                "",
            ),
            None => {
                tracing::warn!(context = self.id, "worker exited mid-execution{why}");
                Event::error(
                    "ContextRestarting",
                    "Context was restarted",
                    format!(
                        "The context's Python process exited during this execution{why}; \
                         the next execution starts a new one, without the old state.\n"
                    ),
                )
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
