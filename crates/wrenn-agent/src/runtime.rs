//! What the [`crate::controller::Controller`] drives: a runtime that makes, pauses, resumes and
//! kills sandboxes. [`crate::qemu::QemuRuntime`] is the real one; the controller's ring-2 tests
//! use a fake that steps through the same await points.
//!
//! A runtime owns no table: it hands back opaque handles (`Running`, `Paused`) that the
//! controller keeps, and every operation consumes its handle and either returns the next one or
//! hands the old one back on failure, so a failed operation leaves the sandbox as it was.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What the agent keeps about a sandbox besides its VM: identity, sizes and timers. The
/// runtime persists it with the sandbox (a restarted agent reads it back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMeta {
    /// The sandbox (a warm pool VM's directory may be named otherwise).
    #[serde(default)]
    pub sandbox_id: String,
    /// The template it was made from.
    pub template_id: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mb: u64,
    /// When it was created (Unix ms).
    pub start_unix_ms: i64,
    /// When the agent ends it on its own if the control plane has not (0: never).
    pub backstop_unix_ms: i64,
    /// At the backstop, pause instead of kill.
    pub auto_pause: bool,
    /// The envd version of its template.
    pub envd_version: String,
    /// Its egress policy (records of agents before egress existed: internet on).
    #[serde(default)]
    pub egress: Egress,
}

/// A sandbox's egress policy as the control plane sent it (validated there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    /// `false`: nothing outbound.
    pub allow_internet_access: bool,
    /// IPv4 addresses, CIDR blocks and domain names; an allow wins over a deny.
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
}

impl Default for Egress {
    fn default() -> Self {
        Self {
            allow_internet_access: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

impl Egress {
    /// The policy; one that does not parse (a record edited by hand) denies everything.
    pub fn policy(&self) -> wrenn_core::EgressPolicy {
        wrenn_core::EgressPolicy::parse(self.allow_internet_access, &self.allow_out, &self.deny_out)
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "unusable egress policy; denying all egress");
                wrenn_core::EgressPolicy::parse(false, &[], &[]).expect("an empty policy parses")
            })
    }
}

/// A template the runtime can start sandboxes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateInfo {
    /// vCPUs of its machine.
    pub vcpus: u32,
    /// Memory of its machine.
    pub memory_mb: u64,
    /// Its disk's virtual size, MiB (rounded up; 0: unknown), the most a sandbox's disk holds.
    pub disk_mb: u64,
    /// The envd version inside.
    pub envd_version: String,
}

/// What a create gives the new guest.
/// A snapshot as sandboxes start from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTaken {
    /// The template its memory is layered on.
    pub template_id: String,
    /// The source's machine.
    pub vcpus: u32,
    /// See `vcpus`.
    pub memory_mb: u64,
    /// envd's version in the guest.
    pub envd_version: String,
    /// What it stores itself.
    pub disk_bytes: u64,
    /// See `disk_bytes`.
    pub memory_bytes: u64,
    /// The snapshot its source started from, if any.
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct GuestInit {
    /// Environment variables for every process.
    pub env_vars: BTreeMap<String, String>,
    /// envd's access token (`None`: unsecured).
    pub access_token: Option<String>,
    /// A resume only: boot the paused disk cold even if the memory was kept (E2B's
    /// `on_resume: reboot`), losing processes and memory.
    pub reboot: bool,
}

/// What a pause keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PauseMode {
    /// Memory, processes and disk: the resume goes on where the guest stopped.
    #[default]
    Full,
    /// The disk only (synced first): the resume boots it cold.
    Filesystem,
}

/// Why a runtime operation failed. The controller passes it on whole (with its sources).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such template.
    #[error("template {0} not found")]
    TemplateNotFound(String),
    /// Not enough free disk space for the operation; nothing was changed.
    #[error("not enough free space in {dir}: {need_mib} MiB needed, {free_mib} MiB free")]
    NoSpace {
        /// Where.
        dir: String,
        /// What the operation could need.
        need_mib: u64,
        /// What is free.
        free_mib: u64,
    },
    /// No network slot is free.
    #[error("no network slot")]
    Slots(#[source] Box<crate::pool::PoolError>),
    /// A step of the operation failed.
    #[error("{step}")]
    Step {
        /// Which step.
        step: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RuntimeError {
    /// A failed step, with its cause.
    pub fn step(
        step: &'static str,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        move |source| Self::Step { step, source }
    }
}

/// A pause that failed: the sandbox runs on (its handle back), or was lost.
#[derive(Debug)]
pub enum PauseFailure<R> {
    /// The guest runs again, unchanged.
    Running(RuntimeError, R),
    /// The VM is gone and no complete snapshot was left.
    Lost(RuntimeError),
}

/// A resume that failed: the sandbox stays paused (its handle back, files unchanged), or its
/// paused state no longer verifies.
#[derive(Debug)]
pub enum ResumeFailure<P> {
    /// Still paused and resumable.
    Paused(RuntimeError, P),
    /// The paused state cannot be resumed.
    Lost(RuntimeError),
}

/// The controller's view of a sandbox's host side. Every method runs inside a task the
/// controller detached from its caller, so a vanished caller never stops one halfway; a
/// method's future may still be dropped at any await point when the process shuts down, and
/// then [`Runtime::recover`] says what is left.
pub trait Runtime: Send + Sync + 'static {
    /// A running sandbox.
    type Running: std::fmt::Debug + Send + Sync + 'static;
    /// A paused sandbox.
    type Paused: std::fmt::Debug + Send + Sync + 'static;

    /// The template `id`, if this runtime can start it.
    fn template(&self, id: &str) -> Option<TemplateInfo>;

    /// Every template, for host info.
    fn templates(&self) -> Vec<(String, TemplateInfo)>;

    /// Makes a running sandbox, and says how long its steps took; on failure nothing is left.
    fn create(
        &self,
        meta: &SandboxMeta,
        init: GuestInit,
    ) -> impl Future<Output = Result<(Self::Running, Stages), RuntimeError>> + Send;

    /// Pauses: the guest's memory and disk go to files.
    fn pause(
        &self,
        meta: &SandboxMeta,
        sandbox: Self::Running,
        mode: PauseMode,
    ) -> impl Future<Output = Result<Self::Paused, PauseFailure<Self::Running>>> + Send;

    /// Resumes, optionally with a new access token and more env vars.
    fn resume(
        &self,
        meta: &SandboxMeta,
        paused: Self::Paused,
        init: GuestInit,
    ) -> impl Future<Output = Result<Self::Running, ResumeFailure<Self::Paused>>> + Send;

    /// Stops a running sandbox and removes everything it had.
    /// Snapshot `snapshot_id` of a paused sandbox, which stays paused.
    fn snapshot(
        &self,
        meta: &SandboxMeta,
        paused: &Self::Paused,
        snapshot_id: &str,
    ) -> impl Future<Output = Result<SnapshotTaken, RuntimeError>> + Send;

    /// Snapshot `snapshot_id` of a running sandbox, captured in place: its guest stopped
    /// for the capture and continued after (whatever failed: it keeps running). Returns how
    /// long it was stopped.
    fn snapshot_running(
        &self,
        meta: &SandboxMeta,
        sandbox: &Self::Running,
        snapshot_id: &str,
    ) -> impl Future<Output = Result<(SnapshotTaken, std::time::Duration), RuntimeError>> + Send;

    /// A snapshot sandboxes can start from now.
    fn snapshot_info(&self, snapshot_id: &str) -> Option<SnapshotTaken>;

    /// A new sandbox `meta` from snapshot `snapshot_id` (its state, processes and files), with
    /// its own `/init`, and how long its steps took.
    fn create_from_snapshot(
        &self,
        meta: &SandboxMeta,
        snapshot_id: &str,
        init: GuestInit,
    ) -> impl Future<Output = Result<(Self::Running, Stages), RuntimeError>> + Send;

    fn kill(&self, id: &str, sandbox: Self::Running) -> impl Future<Output = ()> + Send;

    /// Removes a paused sandbox's files.
    fn remove(&self, id: &str, paused: Self::Paused) -> impl Future<Output = ()> + Send;

    /// Saves `meta` with the sandbox (after a change of its timers).
    fn save_meta(&self, meta: &SandboxMeta, sandbox: Held<'_, Self>);

    /// After an operation on `id` was dropped halfway (process shutdown, panic): the paused
    /// sandbox left on the host, if a complete one is there. Otherwise the runtime removes what
    /// is left of it and answers `None`.
    fn recover(&self, meta: &SandboxMeta) -> Option<Self::Paused>;

    /// After a create or kill of `id` was dropped halfway: removes whatever is left of it.
    fn discard(&self, meta: &SandboxMeta);

    /// Where the host reaches `port` of a running sandbox.
    fn endpoint(&self, sandbox: &Self::Running, port: u16) -> SocketAddr;

    /// Gives a running sandbox the egress policy `egress`. Called with the controller's table
    /// locked, so it only captures what it needs; the returned future does the work (and is a
    /// no-op if the sandbox left its slot meanwhile).
    fn set_egress(
        &self,
        sandbox: &Self::Running,
        egress: &Egress,
    ) -> futures::future::BoxFuture<'static, Result<(), RuntimeError>>;
}

/// How long the steps of an operation on the host took, in order: what the control plane
/// passes on in its `Server-Timing` header. Names are short tokens (`slot`, `restore`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stages(pub Vec<(&'static str, std::time::Duration)>);

impl Stages {
    /// Appends a step.
    pub fn push(&mut self, name: &'static str, took: std::time::Duration) {
        self.0.push((name, took));
    }
}

/// A sandbox handle lent to the runtime.
#[derive(Debug)]
pub enum Held<'a, R: Runtime + ?Sized> {
    /// Running.
    Running(&'a R::Running),
    /// Paused.
    Paused(&'a R::Paused),
}
