//! `process.Process`: start, attach to, feed and signal processes, with or without a PTY.
//!
//! Processes outlive the stream that started them: only a signal, their own exit or the
//! `Connect-Timeout-Ms` of `Start` ends them. Ended processes stay attachable (start + end replay)
//! for [`RETAIN_ENDED`].

mod handle;
mod pty;
mod spawn;
mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal as OsSignal;
use wrenn_connect::{BoxStream, ConnectError, RequestContext, RpcRouter};
use wrenn_proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector, SendInputRequest,
    SendInputResponse, SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse,
    StreamInputRequest, StreamInputResponse, UpdateRequest, UpdateResponse, process_event,
    process_input, process_selector, stream_input_request,
};

use crate::cgroups::Group;
use crate::error::EnvdError;
use crate::state::Envd;
use crate::user::User;
use handle::{Proc, Subscription};

/// How long an ended process can still be attached to with `Connect`.
const RETAIN_ENDED: Duration = Duration::from_secs(30);
/// Keepalive cadence when the client does not send `Keepalive-Ping-Interval`.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);
/// `PATH` for processes when envd itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What can go wrong in this service; converted into [`EnvdError`] at the API edge.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcessError {
    #[error("process with pid {0} not found")]
    PidNotFound(u32),
    #[error("process with tag {0} not found")]
    TagNotFound(String),
    #[error("invalid process selector: set pid or tag")]
    NoSelector,
    #[error("process config is required")]
    NoConfig,
    #[error("cwd '{}' does not exist", .0.display())]
    CwdMissing(PathBuf),
    #[error(transparent)]
    Spawn(#[from] spawn::SpawnError),
    #[error("invalid input: set stdin or pty")]
    NoInput,
    #[error("tty assigned to process — input should be written to the pty, not the stdin")]
    StdinToPty,
    #[error("tty not assigned to process — input should be written to the stdin, not the tty")]
    PtyToPipe,
    #[error("stdin not enabled or closed")]
    StdinClosed,
    #[error("cannot close stdin for PTY process — send Ctrl+D (0x04) instead")]
    CloseStdinPty,
    #[error("tty not assigned to process")]
    NoTty,
    #[error("error writing input to process '{pid}': {source}")]
    Input { pid: u32, source: std::io::Error },
    #[error("error resizing tty of process '{pid}': {source}")]
    Resize { pid: u32, source: std::io::Error },
    #[error("error sending signal to process '{pid}': {source}")]
    Signal { pid: u32, source: std::io::Error },
    #[error("invalid signal: {0} (only SIGNAL_SIGTERM and SIGNAL_SIGKILL are supported)")]
    UnsupportedSignal(i32),
    #[error("the first StreamInput message must be a start event selecting the process")]
    NoStreamStart,
    #[error("StreamInput got a second start event")]
    SecondStreamStart,
    #[error(transparent)]
    Envd(#[from] EnvdError),
}

impl From<ProcessError> for EnvdError {
    fn from(e: ProcessError) -> Self {
        use ProcessError as P;
        match e {
            P::Envd(e) => e,
            P::PidNotFound(_) | P::TagNotFound(_) => EnvdError::NotFound(e.to_string()),
            P::NoSelector
            | P::NoConfig
            | P::CwdMissing(_)
            | P::NoInput
            | P::NoStreamStart
            | P::SecondStreamStart => EnvdError::InvalidArgument(e.to_string()),
            // Upstream answers a process that cannot start with invalid_argument.
            P::Spawn(spawn::SpawnError::Exec { .. }) => EnvdError::InvalidArgument(e.to_string()),
            P::UnsupportedSignal(_) => EnvdError::Unimplemented(e.to_string()),
            P::Spawn(_)
            | P::StdinToPty
            | P::PtyToPipe
            | P::StdinClosed
            | P::CloseStdinPty
            | P::NoTty
            | P::Input { .. }
            | P::Resize { .. }
            | P::Signal { .. } => EnvdError::Internal(e.to_string()),
        }
    }
}

impl From<ProcessError> for ConnectError {
    fn from(e: ProcessError) -> Self {
        EnvdError::from(e).into()
    }
}

/// The live processes envd started (and recently ended ones, for re-attach).
#[derive(Default)]
pub struct Processes {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    live: BTreeMap<u32, Arc<Proc>>,
    ended: Vec<(Instant, Arc<Proc>)>,
}

impl Registry {
    fn prune(&mut self) {
        self.ended.retain(|(at, _)| at.elapsed() < RETAIN_ENDED);
    }
}

impl Processes {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, proc: Arc<Proc>) {
        self.lock().live.insert(proc.pid, proc);
    }

    /// Moves an ended process from the live set to the re-attach cache.
    fn retire(&self, proc: &Arc<Proc>) {
        let mut reg = self.lock();
        if reg
            .live
            .get(&proc.pid)
            .is_some_and(|p| Arc::ptr_eq(p, proc))
        {
            reg.live.remove(&proc.pid);
        }
        reg.prune();
        reg.ended.push((Instant::now(), proc.clone()));
    }

    fn prune(&self) {
        self.lock().prune();
    }

    fn live(&self) -> Vec<Arc<Proc>> {
        self.lock().live.values().cloned().collect()
    }

    /// The process `selector` names: a live one, or with `recent`, one that ended lately.
    fn find(
        &self,
        selector: Option<&ProcessSelector>,
        recent: bool,
    ) -> Result<Arc<Proc>, ProcessError> {
        let mut reg = self.lock();
        reg.prune();
        let ended = || reg.ended.iter().rev().map(|(_, p)| p).filter(|_| recent);
        match selector.and_then(|s| s.selector.as_ref()) {
            None => Err(ProcessError::NoSelector),
            Some(process_selector::Selector::Pid(pid)) => reg
                .live
                .get(pid)
                .or_else(|| ended().find(|p| p.pid == *pid))
                .cloned()
                .ok_or(ProcessError::PidNotFound(*pid)),
            Some(process_selector::Selector::Tag(tag)) => reg
                .live
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .or_else(|| ended().find(|p| p.tag.as_deref() == Some(tag.as_str())))
                .cloned()
                .ok_or_else(|| ProcessError::TagNotFound(tag.clone())),
        }
    }
}

/// The Connect routes of `process.Process`.
pub fn router(envd: Arc<Envd>) -> axum::Router {
    RpcRouter::new()
        .unary("/process.Process/List", with(&envd, list))
        .server_stream("/process.Process/Connect", with(&envd, connect))
        .server_stream("/process.Process/Start", with(&envd, start))
        .unary("/process.Process/Update", with(&envd, update))
        .client_stream("/process.Process/StreamInput", with(&envd, stream_input))
        .unary("/process.Process/SendInput", with(&envd, send_input))
        .unary("/process.Process/SendSignal", with(&envd, send_signal))
        .unary("/process.Process/CloseStdin", with(&envd, close_stdin))
        .into_router()
}

/// Binds a handler to the shared state.
fn with<Req, Fut>(
    envd: &Arc<Envd>,
    f: impl Fn(Arc<Envd>, RequestContext, Req) -> Fut + Clone + Send + Sync + 'static,
) -> impl Fn(RequestContext, Req) -> Fut + Clone + Send + Sync + 'static {
    let envd = envd.clone();
    move |ctx, req| f(envd.clone(), ctx, req)
}

async fn list(
    envd: Arc<Envd>,
    _ctx: RequestContext,
    _req: ListRequest,
) -> Result<ListResponse, ConnectError> {
    let processes = envd
        .processes
        .live()
        .into_iter()
        .map(|p| ProcessInfo {
            config: Some(p.config.clone()),
            pid: p.pid,
            tag: p.tag.clone(),
        })
        .collect();
    Ok(ListResponse { processes })
}

async fn start(
    envd: Arc<Envd>,
    ctx: RequestContext,
    req: StartRequest,
) -> Result<BoxStream<StartResponse>, ConnectError> {
    let requested = crate::user::basic_auth_user(ctx.headers())?;
    let user = envd.user(requested.as_deref())?;
    let config = req.process.ok_or(ProcessError::NoConfig)?;
    let workdir = envd.defaults().workdir;
    let cwd = crate::paths::resolve(
        config.cwd.as_deref().unwrap_or(""),
        &user,
        workdir.as_deref(),
    )?;
    if matches!(std::fs::metadata(&cwd), Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
        return Err(ProcessError::CwdMissing(cwd).into());
    }

    let mut env = login_env(&user);
    env.extend(envd.global_env());
    let mut own: Vec<_> = config
        .envs
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    own.sort();
    env.extend(own);

    let (streams, group) = match req.pty {
        Some(p) => (
            spawn::Streams::Pty(pty::Size::from_proto(p.size)),
            Group::Pty,
        ),
        // An absent `stdin` means a pipe, for SDKs older than the field.
        None => (
            spawn::Streams::Pipes {
                stdin: req.stdin.unwrap_or(true),
            },
            Group::User,
        ),
    };
    let spawned = spawn::spawn(spawn::Launch {
        cmd: config.cmd.clone(),
        args: config.args.clone(),
        env,
        cwd,
        user,
        stdio: streams,
        cgroup: envd.cgroups.procs_path(group),
    })
    .map_err(ProcessError::from)?;
    tracing::info!(pid = spawned.pid, cmd = %config.cmd, tag = ?req.tag, "process started");

    let proc = Proc::new(spawned.pid, config, req.tag, spawned.input);
    // Subscribe before the output readers start, so the caller sees all output.
    let sub = proc.subscribe();
    envd.processes.insert(proc.clone());
    let registry = envd.clone();
    handle::supervise(proc.clone(), spawned.child, spawned.outputs, move |p| {
        registry.processes.retire(p);
        tokio::spawn(async move {
            tokio::time::sleep(RETAIN_ENDED).await;
            registry.processes.prune();
        });
    });

    // The call's deadline is the process's lifetime (the layer ends the stream itself).
    if let Some(limit) = ctx.timeout() {
        let proc = proc.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(limit) => {
                    tracing::info!(pid = proc.pid, ?limit, "process deadline passed; killing it");
                    if let Err(e) = proc.signal(OsSignal::SIGKILL) {
                        tracing::debug!(pid = proc.pid, error = %e, "killing at deadline");
                    }
                }
                () = proc.exited() => {}
            }
        });
    }
    Ok(respond(&ctx, proc, sub, |event| StartResponse {
        event: Some(event),
    }))
}

async fn connect(
    envd: Arc<Envd>,
    ctx: RequestContext,
    req: ConnectRequest,
) -> Result<BoxStream<ConnectResponse>, ConnectError> {
    let proc = envd.processes.find(req.process.as_ref(), true)?;
    let sub = proc.subscribe();
    Ok(respond(&ctx, proc, sub, |event| ConnectResponse {
        event: Some(event),
    }))
}

/// The response stream of `Start`/`Connect`: the process's events with keepalives.
fn respond<T: Send + 'static>(
    ctx: &RequestContext,
    proc: Arc<Proc>,
    sub: Subscription,
    wrap: fn(ProcessEvent) -> T,
) -> BoxStream<T> {
    let interval = ctx.keepalive_interval(DEFAULT_KEEPALIVE);
    let keepalive = || ProcessEvent {
        event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})),
    };
    let events = wrenn_connect::with_keepalive(handle::events(proc, sub), interval, keepalive);
    Box::pin(events.map(move |e| Ok(wrap(e))))
}

async fn update(
    envd: Arc<Envd>,
    _ctx: RequestContext,
    req: UpdateRequest,
) -> Result<UpdateResponse, ConnectError> {
    let proc = envd.processes.find(req.process.as_ref(), false)?;
    if let Some(p) = req.pty {
        proc.resize(pty::Size::from_proto(p.size))?;
    }
    Ok(UpdateResponse {})
}

async fn send_input(
    envd: Arc<Envd>,
    _ctx: RequestContext,
    req: SendInputRequest,
) -> Result<SendInputResponse, ConnectError> {
    let proc = envd.processes.find(req.process.as_ref(), false)?;
    write_input(&proc, req.input).await?;
    Ok(SendInputResponse {})
}

async fn stream_input(
    envd: Arc<Envd>,
    _ctx: RequestContext,
    mut messages: BoxStream<StreamInputRequest>,
) -> Result<StreamInputResponse, ConnectError> {
    let first = messages.next().await.transpose()?.and_then(|m| m.event);
    let Some(stream_input_request::Event::Start(start)) = first else {
        return Err(ProcessError::NoStreamStart.into());
    };
    let proc = envd.processes.find(start.process.as_ref(), false)?;
    while let Some(msg) = messages.next().await {
        match msg?.event {
            Some(stream_input_request::Event::Data(d)) => write_input(&proc, d.input).await?,
            Some(stream_input_request::Event::Start(_)) => {
                return Err(ProcessError::SecondStreamStart.into());
            }
            Some(stream_input_request::Event::Keepalive(_)) | None => {}
        }
    }
    Ok(StreamInputResponse {})
}

async fn write_input(proc: &Proc, input: Option<ProcessInput>) -> Result<(), ProcessError> {
    match input.and_then(|i| i.input) {
        Some(process_input::Input::Stdin(data)) => proc.write_stdin(&data).await,
        Some(process_input::Input::Pty(data)) => proc.write_pty(&data).await,
        None => Err(ProcessError::NoInput),
    }
}

async fn send_signal(
    envd: Arc<Envd>,
    _ctx: RequestContext,
    req: SendSignalRequest,
) -> Result<SendSignalResponse, ConnectError> {
    let proc = envd.processes.find(req.process.as_ref(), false)?;
    let signal = match Signal::try_from(req.signal) {
        Ok(Signal::Sigkill) => OsSignal::SIGKILL,
        Ok(Signal::Sigterm) => OsSignal::SIGTERM,
        Ok(Signal::Unspecified) | Err(_) => {
            return Err(ProcessError::UnsupportedSignal(req.signal).into());
        }
    };
    proc.signal(signal)?;
    Ok(SendSignalResponse {})
}

async fn close_stdin(
    envd: Arc<Envd>,
    _ctx: RequestContext,
    req: CloseStdinRequest,
) -> Result<CloseStdinResponse, ConnectError> {
    let proc = envd.processes.find(req.process.as_ref(), false)?;
    proc.close_stdin().await?;
    Ok(CloseStdinResponse {})
}

/// The variables a login would set, before the global and the request's own.
fn login_env(user: &User) -> Vec<(String, String)> {
    let path = std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    let mut env = vec![
        ("PATH".to_owned(), path),
        ("HOME".to_owned(), user.home.to_string_lossy().into_owned()),
        ("USER".to_owned(), user.name.clone()),
        ("LOGNAME".to_owned(), user.name.clone()),
    ];
    if !user.shell.is_empty() {
        env.push(("SHELL".to_owned(), user.shell.clone()));
    }
    env
}
