//! The controller: owns the table of this host's sandboxes and drives a [`Runtime`] through
//! create, pause, resume and kill, one operation per sandbox at a time.
//!
//! Every operation marks its entry busy, then runs in a task detached from its caller: a caller
//! that goes away (a `Connect-Timeout-Ms` expiry, a client disconnect) only stops waiting, and
//! the operation runs to its end. The task holds an [`OpGuard`]; if the task itself is dropped
//! halfway (the process shuts its runtime down, a panic), the guard's `Drop` settles the entry
//! from what the runtime says is left, so no entry stays busy and capacity comes back. A
//! second operation on a busy sandbox is refused at once with [`ControlError::Busy`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::runtime::{
    Egress, GuestInit, Held, PauseFailure, PauseMode, ResumeFailure, Runtime, RuntimeError,
    SandboxMeta, Stages, TemplateInfo,
};

/// How often the backstop reaper looks for sandboxes past their deadline.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Why a controller call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such sandbox.
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// No such template.
    #[error("template {0} not found")]
    TemplateNotFound(String),
    /// No such snapshot.
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    /// The sandbox ID is taken.
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    /// Another operation holds the sandbox.
    #[error("sandbox {id} is busy: {op} in progress")]
    Busy {
        /// The sandbox.
        id: String,
        /// What holds it.
        op: Op,
    },
    /// The sandbox is not in the state the call needs.
    #[error("sandbox {id} is {state}")]
    WrongState {
        /// The sandbox.
        id: String,
        /// What it is.
        state: &'static str,
    },
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// The host is full.
    #[error("host is at capacity ({0} sandboxes)")]
    Full(u32),
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The runtime failed; the sandbox is as it was before the call.
    #[error("{what} failed")]
    Runtime {
        /// Which operation.
        what: &'static str,
        /// Why.
        #[source]
        source: RuntimeError,
    },
    /// The runtime failed and the sandbox is gone.
    #[error("{what} failed and the sandbox was lost")]
    Lost {
        /// Which operation.
        what: &'static str,
        /// Why.
        #[source]
        source: RuntimeError,
    },
    /// The operation's task ended abnormally (a panic); the guard settled the entry.
    #[error("{0} ended abnormally")]
    Aborted(Op),
}

/// An operation that holds a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Being created.
    Create,
    /// Being paused.
    Pause,
    /// Being resumed.
    Resume,
    /// Being killed.
    Kill,
    /// Being snapshotted (a running one is paused and resumed meanwhile).
    Snapshot,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Create => "create",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Kill => "kill",
            Self::Snapshot => "snapshot",
        })
    }
}

/// What a sandbox is now, as the controller reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running (or being created, paused or killed: it still holds a VM).
    Running,
    /// Paused (or being resumed).
    Paused,
}

/// One sandbox as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Identity and timers.
    pub meta: SandboxMeta,
    /// Running or paused.
    pub phase: Phase,
    /// The operation holding it, if any.
    pub busy: Option<Op>,
}

/// A create request.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    /// The new sandbox's ID (the control plane chooses it).
    pub sandbox_id: String,
    /// Its template.
    pub template_id: String,
    /// When it started (Unix ms; 0: now).
    pub start_unix_ms: i64,
    /// The agent's own deadline (0: none).
    pub backstop_unix_ms: i64,
    /// At the backstop, pause instead of kill.
    pub auto_pause: bool,
    /// The disk size asked for, MiB (0: the template's). A sandbox's disk is its template's
    /// (the guest's file system is made to that size), so a larger one is refused rather than
    /// promised and not given.
    pub disk_size_mb: u64,
    /// What the guest gets at `/init`.
    pub init: GuestInit,
    /// Its egress policy.
    pub egress: Egress,
    /// Start from this snapshot instead of the template's boot state.
    pub snapshot_id: Option<String>,
}

/// What the table holds for one sandbox.
#[derive(Debug)]
enum Slot<R: Runtime> {
    Running(R::Running),
    Paused(R::Paused),
    Busy(Op),
}

impl<R: Runtime> Slot<R> {
    fn name(&self) -> &'static str {
        match self {
            Self::Running(_) => "running",
            Self::Paused(_) => "paused",
            Self::Busy(_) => "busy",
        }
    }
}

#[derive(Debug)]
struct Entry<R: Runtime> {
    meta: SandboxMeta,
    slot: Slot<R>,
    /// Fired when the sandbox stops running (a pause or kill takes it, or it is removed): the
    /// proxy ends every connection into it then, which a guest that is gone never would.
    traffic: CancellationToken,
}

impl<R: Runtime> Entry<R> {
    fn new(meta: SandboxMeta, slot: Slot<R>) -> Self {
        Self {
            meta,
            slot,
            traffic: CancellationToken::new(),
        }
    }

    /// Ends the traffic of the sandbox's current run; a later run gets a new token.
    fn end_traffic(&mut self) {
        std::mem::take(&mut self.traffic).cancel();
    }
}

/// Owns the sandbox table and drives `R`.
#[derive(Debug)]
pub struct Controller<R: Runtime> {
    runtime: R,
    max_sandboxes: u32,
    table: Mutex<HashMap<String, Entry<R>>>,
    closing: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Sandbox IDs become directory names: keep them to a safe alphabet.
pub fn check_id(id: &str) -> Result<(), ControlError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!("bad sandbox id {id:?}")))
    }
}

/// Settles an entry if its operation's task is dropped before it finished.
struct OpGuard<R: Runtime> {
    ctl: Arc<Controller<R>>,
    id: String,
    op: Op,
    armed: bool,
}

impl<R: Runtime> OpGuard<R> {
    fn new(ctl: &Arc<Controller<R>>, id: &str, op: Op) -> Self {
        Self {
            ctl: ctl.clone(),
            id: id.to_owned(),
            op,
            armed: true,
        }
    }

    /// The operation ended: `slot` is the entry's new state (`None`: the sandbox is gone).
    /// `saved` is the meta the runtime saved with it: a timer changed meanwhile is saved now.
    fn finish(mut self, slot: Option<Slot<R>>, saved: &SandboxMeta) {
        self.armed = false;
        self.ctl.settle(&self.id, slot, Some(saved));
    }
}

impl<R: Runtime> Drop for OpGuard<R> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let meta = lock(&self.ctl.table).get(&self.id).map(|e| e.meta.clone());
        let left = match (self.op, meta) {
            // A create never got far enough to leave a paused sandbox; a kill wanted none.
            (Op::Create | Op::Kill, Some(meta)) => {
                self.ctl.runtime.discard(&meta);
                None
            }
            (Op::Pause | Op::Resume | Op::Snapshot, Some(meta)) => {
                self.ctl.runtime.recover(&meta).map(Slot::Paused)
            }
            (_, None) => None,
        };
        tracing::warn!(sandbox_id = %self.id, op = %self.op, kept = left.is_some(), "operation dropped halfway; entry settled");
        self.ctl.settle(&self.id, left, None);
    }
}

impl<R: Runtime> Controller<R> {
    /// A controller of `runtime` allowing `max_sandboxes` sandboxes that hold a VM.
    pub fn new(runtime: R, max_sandboxes: u32) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            max_sandboxes,
            table: Mutex::new(HashMap::new()),
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The runtime.
    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    /// The most sandboxes holding a VM at once.
    pub fn max_sandboxes(&self) -> u32 {
        self.max_sandboxes
    }

    fn settle(&self, id: &str, slot: Option<Slot<R>>, saved: Option<&SandboxMeta>) {
        let mut table = lock(&self.table);
        match slot {
            Some(slot) => {
                if let Some(e) = table.get_mut(id) {
                    e.slot = slot;
                    let held = match &e.slot {
                        Slot::Running(sb) => Some(Held::Running(sb)),
                        Slot::Paused(p) => Some(Held::Paused(p)),
                        Slot::Busy(_) => None,
                    };
                    if let (Some(held), Some(saved)) = (held, saved)
                        && *saved != e.meta
                    {
                        self.runtime.save_meta(&e.meta, held);
                    }
                }
            }
            None => {
                if let Some(mut e) = table.remove(id) {
                    e.end_traffic();
                }
            }
        }
    }

    /// Takes `id`'s handle out, leaving it busy with `op`, if `want` accepts its state.
    fn take(
        &self,
        id: &str,
        op: Op,
        want: fn(&Slot<R>) -> bool,
    ) -> Result<(SandboxMeta, Slot<R>), ControlError> {
        Self::take_in(&mut lock(&self.table), id, op, want)
    }

    /// [`Controller::take`] with the table already locked.
    fn take_in(
        table: &mut HashMap<String, Entry<R>>,
        id: &str,
        op: Op,
        want: fn(&Slot<R>) -> bool,
    ) -> Result<(SandboxMeta, Slot<R>), ControlError> {
        let e = table
            .get_mut(id)
            .ok_or_else(|| ControlError::NotFound(id.to_owned()))?;
        if let Slot::Busy(holder) = e.slot {
            return Err(ControlError::Busy {
                id: id.to_owned(),
                op: holder,
            });
        }
        if !want(&e.slot) {
            return Err(ControlError::WrongState {
                id: id.to_owned(),
                state: e.slot.name(),
            });
        }
        let slot = std::mem::replace(&mut e.slot, Slot::Busy(op));
        if matches!(slot, Slot::Running(_)) && op != Op::Snapshot {
            // Pause and kill: the guest stops answering now. A snapshot captures it in place,
            // so its connections stay open (new ones wait for the end of the capture).
            e.end_traffic();
        }
        Ok((e.meta.clone(), slot))
    }

    /// Runs `work` detached from the caller, under a span carrying `sandbox_id`, and waits for
    /// it (a caller that stops waiting leaves it running).
    async fn detach<T, F>(&self, id: &str, op: Op, work: F) -> Result<T, ControlError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ControlError>> + Send + 'static,
    {
        let span = tracing::info_span!("sandbox_op", sandbox_id = %id, op = %op);
        match tokio::spawn(work.instrument(span)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(sandbox_id = %id, op = %op, error = %e, "operation task failed");
                Err(ControlError::Aborted(op))
            }
        }
    }

    /// Creates a sandbox; also says how long the runtime's steps took.
    pub async fn create(
        self: &Arc<Self>,
        args: CreateArgs,
    ) -> Result<(Status, Stages), ControlError> {
        check_id(&args.sandbox_id)?;
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ControlError::ShuttingDown);
        }
        let (template, template_id) = match &args.snapshot_id {
            Some(snap) => {
                let s = self
                    .runtime
                    .snapshot_info(snap)
                    .ok_or_else(|| ControlError::SnapshotNotFound(snap.clone()))?;
                let info = TemplateInfo {
                    vcpus: s.vcpus,
                    memory_mb: s.memory_mb,
                    disk_mb: 0,
                    envd_version: s.envd_version,
                };
                (info, s.template_id)
            }
            None => (
                self.runtime
                    .template(&args.template_id)
                    .ok_or_else(|| ControlError::TemplateNotFound(args.template_id.clone()))?,
                args.template_id.clone(),
            ),
        };
        if template.disk_mb > 0 && args.disk_size_mb > template.disk_mb {
            return Err(ControlError::Invalid(format!(
                "disk_size_mb {} is larger than template {}'s disk ({} MiB): a sandbox's disk is its template's",
                args.disk_size_mb, args.template_id, template.disk_mb
            )));
        }
        let id = args.sandbox_id.clone();
        let meta = SandboxMeta {
            sandbox_id: id.clone(),
            template_id,
            vcpus: template.vcpus,
            memory_mb: template.memory_mb,
            start_unix_ms: if args.start_unix_ms > 0 {
                args.start_unix_ms
            } else {
                now_ms()
            },
            backstop_unix_ms: args.backstop_unix_ms,
            auto_pause: args.auto_pause,
            envd_version: template.envd_version,
            egress: args.egress,
        };
        {
            let mut table = lock(&self.table);
            if table.contains_key(&id) {
                return Err(ControlError::AlreadyExists(id));
            }
            // Paused sandboxes are files on disk, not VMs: they do not count.
            let live = table
                .values()
                .filter(|e| !matches!(e.slot, Slot::Paused(_)))
                .count();
            if u32::try_from(live).unwrap_or(u32::MAX) >= self.max_sandboxes {
                return Err(ControlError::Full(self.max_sandboxes));
            }
            table.insert(id.clone(), Entry::new(meta.clone(), Slot::Busy(Op::Create)));
        }
        let guard = OpGuard::new(self, &id, Op::Create);
        let ctl = self.clone();
        let owned = id.clone();
        let snapshot = args.snapshot_id.clone();
        self.detach(&owned, Op::Create, async move {
            let made = match &snapshot {
                Some(snap) => {
                    ctl.runtime
                        .create_from_snapshot(&meta, snap, args.init)
                        .await
                }
                None => ctl.runtime.create(&meta, args.init).await,
            };
            match made {
                Ok((sb, stages)) => {
                    tracing::info!("created");
                    guard.finish(Some(Slot::Running(sb)), &meta);
                    Ok((ctl.status_of(&id, Phase::Running, meta), stages))
                }
                Err(source) => {
                    tracing::warn!(error = %crate::error_chain(&source), "create failed");
                    guard.finish(None, &meta);
                    Err(ControlError::Runtime {
                        what: "create",
                        source,
                    })
                }
            }
        })
        .await
    }

    fn status_of(&self, id: &str, phase: Phase, meta: SandboxMeta) -> Status {
        lock(&self.table)
            .get(id)
            .map(Self::status)
            .unwrap_or(Status {
                meta,
                phase,
                busy: None,
            })
    }

    fn status(e: &Entry<R>) -> Status {
        let (phase, busy) = match e.slot {
            Slot::Running(_) => (Phase::Running, None),
            Slot::Paused(_) => (Phase::Paused, None),
            Slot::Busy(op @ Op::Resume) => (Phase::Paused, Some(op)),
            Slot::Busy(op) => (Phase::Running, Some(op)),
        };
        Status {
            meta: e.meta.clone(),
            phase,
            busy,
        }
    }

    /// Every sandbox, by ID.
    pub fn list(&self) -> Vec<Status> {
        let table = lock(&self.table);
        let mut all: Vec<Status> = table.values().map(Self::status).collect();
        all.sort_by(|a, b| a.meta.sandbox_id.cmp(&b.meta.sandbox_id));
        all
    }

    /// One sandbox.
    pub fn get(&self, id: &str) -> Option<Status> {
        lock(&self.table).get(id).map(Self::status)
    }

    /// Kills a sandbox (a paused one's files are removed).
    pub async fn kill(self: &Arc<Self>, id: &str) -> Result<(), ControlError> {
        let (meta, slot) = self.take(id, Op::Kill, |_| true)?;
        let guard = OpGuard::new(self, id, Op::Kill);
        let ctl = self.clone();
        let owned = id.to_owned();
        self.detach(id, Op::Kill, async move {
            match slot {
                Slot::Running(sb) => ctl.runtime.kill(&owned, sb).await,
                Slot::Paused(p) => ctl.runtime.remove(&owned, p).await,
                Slot::Busy(_) => {}
            }
            tracing::info!("killed");
            guard.finish(None, &meta);
            Ok(())
        })
        .await
    }

    /// Pauses a running sandbox with its memory.
    pub async fn pause(self: &Arc<Self>, id: &str) -> Result<(), ControlError> {
        self.pause_as(id, PauseMode::Full).await
    }

    /// Pauses a running sandbox, keeping what `mode` says.
    pub async fn pause_as(self: &Arc<Self>, id: &str, mode: PauseMode) -> Result<(), ControlError> {
        let (meta, slot) = self.take(id, Op::Pause, |s| matches!(s, Slot::Running(_)))?;
        let Slot::Running(sb) = slot else {
            unreachable!("take checked the state");
        };
        let guard = OpGuard::new(self, id, Op::Pause);
        let ctl = self.clone();
        self.detach(id, Op::Pause, async move {
            match ctl.runtime.pause(&meta, sb, mode).await {
                Ok(p) => {
                    tracing::info!("paused");
                    guard.finish(Some(Slot::Paused(p)), &meta);
                    Ok(())
                }
                Err(PauseFailure::Running(source, sb)) => {
                    tracing::warn!(error = %crate::error_chain(&source), "pause failed; still running");
                    guard.finish(Some(Slot::Running(sb)), &meta);
                    Err(ControlError::Runtime {
                        what: "pause",
                        source,
                    })
                }
                Err(PauseFailure::Lost(source)) => {
                    tracing::error!(error = %crate::error_chain(&source), "pause failed; sandbox lost");
                    guard.finish(None, &meta);
                    Err(ControlError::Lost {
                        what: "pause",
                        source,
                    })
                }
            }
        })
        .await
    }

    /// Resumes a paused sandbox; `backstop_unix_ms` > 0 replaces its backstop.
    pub async fn resume(
        self: &Arc<Self>,
        id: &str,
        init: GuestInit,
        backstop_unix_ms: i64,
    ) -> Result<Status, ControlError> {
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ControlError::ShuttingDown);
        }
        let (mut meta, p) = {
            // Room and state are checked under one lock: two resumes cannot both take the last.
            let mut table = lock(&self.table);
            let live = table
                .values()
                .filter(|e| !matches!(e.slot, Slot::Paused(_)))
                .count();
            let full = u32::try_from(live).unwrap_or(u32::MAX) >= self.max_sandboxes;
            if full && matches!(table.get(id).map(|e| &e.slot), Some(Slot::Paused(_))) {
                return Err(ControlError::Full(self.max_sandboxes));
            }
            Self::take_in(&mut table, id, Op::Resume, |s| matches!(s, Slot::Paused(_)))?
        };
        let Slot::Paused(p) = p else {
            unreachable!("take checked the state");
        };
        if backstop_unix_ms > 0 {
            meta.backstop_unix_ms = backstop_unix_ms;
        }
        let guard = OpGuard::new(self, id, Op::Resume);
        let ctl = self.clone();
        let owned = id.to_owned();
        self.detach(id, Op::Resume, async move {
            match ctl.runtime.resume(&meta, p, init).await {
                Ok(sb) => {
                    tracing::info!("resumed");
                    if backstop_unix_ms > 0
                        && let Some(e) = lock(&ctl.table).get_mut(&owned)
                    {
                        e.meta.backstop_unix_ms = backstop_unix_ms;
                    }
                    guard.finish(Some(Slot::Running(sb)), &meta);
                    Ok(ctl.status_of(&owned, Phase::Running, meta))
                }
                Err(ResumeFailure::Paused(source, p)) => {
                    tracing::warn!(error = %crate::error_chain(&source), "resume failed; still paused");
                    guard.finish(Some(Slot::Paused(p)), &meta);
                    Err(ControlError::Runtime {
                        what: "resume",
                        source,
                    })
                }
                Err(ResumeFailure::Lost(source)) => {
                    tracing::error!(error = %crate::error_chain(&source), "resume failed; paused state unusable");
                    guard.finish(None, &meta);
                    Err(ControlError::Lost {
                        what: "resume",
                        source,
                    })
                }
            }
        })
        .await
    }

    /// Sets the agent's own deadline for the sandbox (0: none).
    pub fn set_timeout(&self, id: &str, backstop_unix_ms: i64) -> Result<(), ControlError> {
        let mut table = lock(&self.table);
        let e = table
            .get_mut(id)
            .ok_or_else(|| ControlError::NotFound(id.to_owned()))?;
        e.meta.backstop_unix_ms = backstop_unix_ms;
        let held = match &e.slot {
            Slot::Running(sb) => Some(Held::Running(sb)),
            Slot::Paused(p) => Some(Held::Paused(p)),
            // The operation holding it saves the record when it ends, with this meta.
            Slot::Busy(_) => None,
        };
        if let Some(held) = held {
            self.runtime.save_meta(&e.meta, held);
        }
        Ok(())
    }

    /// Replaces a sandbox's egress policy: saved with it, and applied to its slot when it is
    /// running (a paused one gets it when it resumes). Refused while another operation holds
    /// the sandbox, like every operation.
    pub async fn update_network(&self, id: &str, egress: Egress) -> Result<(), ControlError> {
        let apply = {
            let mut table = lock(&self.table);
            let e = table
                .get_mut(id)
                .ok_or_else(|| ControlError::NotFound(id.to_owned()))?;
            let previous = std::mem::replace(&mut e.meta.egress, egress.clone());
            match &e.slot {
                Slot::Busy(op) => {
                    e.meta.egress = previous;
                    return Err(ControlError::Busy {
                        id: id.to_owned(),
                        op: *op,
                    });
                }
                Slot::Running(sb) => {
                    self.runtime.save_meta(&e.meta, Held::Running(sb));
                    Some((self.runtime.set_egress(sb, &egress), previous))
                }
                Slot::Paused(p) => {
                    self.runtime.save_meta(&e.meta, Held::Paused(p));
                    None
                }
            }
        };
        if let Some((apply, previous)) = apply
            && let Err(source) = apply.await
        {
            // The slot kept its rules (one transaction that failed): so does the record.
            let mut table = lock(&self.table);
            if let Some(e) = table.get_mut(id).filter(|e| e.meta.egress == egress) {
                e.meta.egress = previous;
                if let Slot::Running(sb) = &e.slot {
                    self.runtime.save_meta(&e.meta, Held::Running(sb));
                }
            }
            return Err(ControlError::Runtime {
                what: "update network",
                source,
            });
        }
        tracing::info!(sandbox_id = %id, "egress policy replaced");
        Ok(())
    }

    /// Puts a sandbox found on the host (a restarted agent's) into the table.
    pub fn insert_running(&self, meta: SandboxMeta, sb: R::Running) -> Result<(), R::Running> {
        self.insert(meta, Slot::Running(sb)).map_err(|s| match s {
            Slot::Running(sb) => sb,
            _ => unreachable!("inserted a running slot"),
        })
    }

    /// Puts a paused sandbox found on disk into the table.
    pub fn insert_paused(&self, meta: SandboxMeta, p: R::Paused) -> Result<(), R::Paused> {
        self.insert(meta, Slot::Paused(p)).map_err(|s| match s {
            Slot::Paused(p) => p,
            _ => unreachable!("inserted a paused slot"),
        })
    }

    fn insert(&self, meta: SandboxMeta, slot: Slot<R>) -> Result<(), Slot<R>> {
        let mut table = lock(&self.table);
        if table.contains_key(&meta.sandbox_id) {
            return Err(slot);
        }
        table.insert(meta.sandbox_id.clone(), Entry::new(meta, slot));
        Ok(())
    }

    /// Calls `f` with a running sandbox's handle (`None`: not running, or busy).
    pub fn with_running<T>(&self, id: &str, f: impl FnOnce(&R::Running) -> T) -> Option<T> {
        match &lock(&self.table).get(id)?.slot {
            Slot::Running(sb) => Some(f(sb)),
            Slot::Paused(_) | Slot::Busy(_) => None,
        }
    }

    /// [`Controller::with_running`], with the token that fires when this run of the sandbox
    /// ends (paused, killed, removed).
    pub fn with_running_traffic<T>(
        &self,
        id: &str,
        f: impl FnOnce(&R::Running) -> T,
    ) -> Option<(T, CancellationToken)> {
        let table = lock(&self.table);
        let e = table.get(id)?;
        match &e.slot {
            Slot::Running(sb) => Some((f(sb), e.traffic.clone())),
            Slot::Paused(_) | Slot::Busy(_) => None,
        }
    }

    /// `f` of every running sandbox, with the IDs of all sandboxes.
    pub fn map_running<T>(
        &self,
        mut f: impl FnMut(&str, &R::Running) -> T,
    ) -> (Vec<String>, Vec<T>) {
        let table = lock(&self.table);
        let out = table
            .iter()
            .filter_map(|(id, e)| match &e.slot {
                Slot::Running(sb) => Some(f(id, sb)),
                _ => None,
            })
            .collect();
        (table.keys().cloned().collect(), out)
    }

    /// vCPUs and memory held by sandboxes with a VM, and how many sandboxes there are.
    pub fn usage(&self) -> (u32, u64, u32) {
        let (mut vcpus, mut memory, mut count) = (0u32, 0u64, 0u32);
        for e in lock(&self.table).values() {
            count += 1;
            if !matches!(e.slot, Slot::Paused(_)) {
                vcpus += e.meta.vcpus;
                memory += e.meta.memory_mb;
            }
        }
        (vcpus, memory, count)
    }

    /// For a restart: refuses new creates and resumes, waits for operations in flight, pauses
    /// every running sandbox (one that cannot be paused is killed) and keeps paused ones.
    /// Returns the IDs paused.
    pub async fn suspend(self: &Arc<Self>) -> Vec<String> {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wait_idle(Duration::from_secs(120)).await;
        let running: Vec<String> = lock(&self.table)
            .iter()
            .filter(|(_, e)| matches!(e.slot, Slot::Running(_)))
            .map(|(id, _)| id.clone())
            .collect();
        let mut paused = Vec::new();
        for id in running {
            match self.pause(&id).await {
                Ok(()) => paused.push(id),
                Err(e) => {
                    tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&e), "could not pause at shutdown; killing");
                    if let Err(e) = self.kill(&id).await {
                        tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&e), "shutdown kill");
                    }
                }
            }
        }
        paused
    }

    /// Kills every sandbox (paused ones deleted too).
    pub async fn shutdown(self: &Arc<Self>) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wait_idle(Duration::from_secs(120)).await;
        let ids: Vec<String> = lock(&self.table).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.kill(&id).await {
                tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&e), "shutdown kill");
            }
        }
    }

    /// Waits until no entry is busy (or `limit` passes).
    async fn wait_idle(&self, limit: Duration) {
        let until = tokio::time::Instant::now() + limit;
        while lock(&self.table)
            .values()
            .any(|e| matches!(e.slot, Slot::Busy(_)))
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sandboxes whose backstop passed (and that no operation holds), with whether to pause
    /// (auto_pause and running) rather than kill them.
    /// Running sandboxes past their backstop, with whether to pause them (auto-pause) rather
    /// than kill them. Paused ones are never overdue: nothing of theirs runs, and a sandbox
    /// the control plane paused (at its timeout, or on request) keeps its old backstop, which
    /// must not delete it a minute later.
    fn overdue(&self, now: i64) -> Vec<(String, bool)> {
        lock(&self.table)
            .iter()
            .filter(|(_, e)| {
                e.meta.backstop_unix_ms > 0
                    && e.meta.backstop_unix_ms <= now
                    && matches!(e.slot, Slot::Running(_))
            })
            .map(|(id, e)| (id.clone(), e.meta.auto_pause))
            .collect()
    }

    /// Acts on one sandbox past its backstop.
    async fn expire(self: &Arc<Self>, id: &str, pause: bool) -> Result<(), ControlError> {
        if !pause {
            return self.kill(id).await;
        }
        self.pause(id).await?;
        // Paused: nothing runs any more, so the backstop has done its job.
        self.set_timeout(id, 0)
    }

    /// Starts the backstop reaper: kills (or, with auto_pause, pauses) sandboxes past their
    /// backstop. The control plane should have acted first, so this only guards against it
    /// being gone. Ends when the controller is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(reaper(weak))
    }
}

async fn reaper<R: Runtime>(ctl: Weak<Controller<R>>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ctl) = ctl.upgrade() else {
            return;
        };
        for (id, pause) in ctl.overdue(now_ms()) {
            tracing::warn!(sandbox_id = %id, pause, "backstop deadline passed");
            if let Err(e) = ctl.expire(&id, pause).await {
                tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&e), "backstop");
            }
        }
    }
}

mod snapshot;
#[cfg(test)]
mod tests;
