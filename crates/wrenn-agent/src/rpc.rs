//! The host agent's RPC service: `wrenn.agent.v1.AgentService` (proto/agent) over Connect,
//! backed by a slot pool, registered template snapshots, and the sandboxes this agent holds.
//!
//! Each sandbox's entry is taken out of the table ("busy") while a slow operation (create,
//! pause, resume, kill) runs on it, so operations on different sandboxes run concurrently and
//! a second operation on the same sandbox fails fast with `failed_precondition`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::{
    CreateRequest, CreateResponse, HostInfoRequest, HostInfoResponse, KillRequest, KillResponse,
    ListRequest, ListResponse, LogEntry, LogsRequest, MetricsRequest, PauseRequest, PauseResponse,
    ResumeRequest, ResumeResponse, SandboxState, SandboxStatus, SetTimeoutRequest,
    SetTimeoutResponse, SnapshotRequest, SnapshotResponse,
};
use wrenn_connect::{BoxStream, ConnectError, RpcRouter};

use crate::pool::{PoolError, SlotLease, SlotPool, WarmPool};
use crate::sandbox::{
    Deadlines, Failed, InitConfig, PauseError, PausedSandbox, Sandbox, SandboxError,
};
use crate::snapshot::Snapshot;

/// How often the backstop reaper looks for sandboxes past their deadline.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// The agent's record of a sandbox ([`Meta`]) inside its directory.
pub const META_FILE: &str = "agent-meta.json";

/// Why an RPC failed; mapped to a Connect code in [`RpcError::into_connect`] only.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No such sandbox.
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    /// No such template.
    #[error("template {0} not found")]
    TemplateNotFound(String),
    /// The sandbox ID is taken.
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    /// The sandbox is not in the state the call needs.
    #[error("sandbox {id} is {state}")]
    WrongState {
        /// The sandbox.
        id: String,
        /// What it is (running, paused, busy).
        state: &'static str,
    },
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// The host is full.
    #[error("host is at capacity ({0} sandboxes)")]
    Full(u32),
    /// No slot.
    #[error("slot: {0}")]
    Pool(#[from] PoolError),
    /// The runtime failed.
    #[error("{what}: {error}")]
    Sandbox {
        /// Which step.
        what: &'static str,
        /// Why.
        error: Box<SandboxError>,
    },
    /// Not implemented by this agent yet.
    #[error("{0} is not implemented by this agent yet")]
    Unimplemented(&'static str),
}

impl RpcError {
    /// The one place agent errors become Connect codes.
    pub fn into_connect(self) -> ConnectError {
        let msg = self.to_string();
        match self {
            Self::SandboxNotFound(_) | Self::TemplateNotFound(_) => ConnectError::not_found(msg),
            Self::AlreadyExists(_) => ConnectError::already_exists(msg),
            Self::WrongState { .. } => ConnectError::failed_precondition(msg),
            Self::Invalid(_) => ConnectError::invalid_argument(msg),
            Self::Full(_) | Self::Pool(_) => ConnectError::resource_exhausted(msg),
            Self::Sandbox { .. } => ConnectError::internal(msg),
            Self::Unimplemented(_) => ConnectError::unimplemented(msg),
        }
    }
}

/// A template this agent can start sandboxes from.
#[derive(Debug)]
struct Template {
    snapshot: Snapshot,
    warm: Option<WarmPool>,
    envd_version: String,
}

/// What the agent keeps about a sandbox besides its VM; also saved as [`META_FILE`] in the
/// sandbox's directory so that a restarted agent can list and resume its paused sandboxes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Meta {
    /// The sandbox (its directory may be named otherwise: a warm pool VM's).
    #[serde(default)]
    sandbox_id: String,
    template_id: String,
    vcpus: u32,
    memory_mb: u64,
    start_unix_ms: i64,
    backstop_unix_ms: i64,
    /// At the backstop, pause instead of kill.
    auto_pause: bool,
    envd_version: String,
}

#[derive(Debug)]
enum State {
    Running(Box<Sandbox<SlotLease>>),
    Paused(Box<PausedSandbox>),
    /// An operation holds the sandbox.
    Busy,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::Running(_) => "running",
            Self::Paused(_) => "paused",
            Self::Busy => "busy (another operation is in progress)",
        }
    }
}

#[derive(Debug)]
struct Entry {
    meta: Meta,
    state: State,
}

/// The host agent: owns the slots, the templates and the sandboxes, and serves
/// `AgentService` ([`Agent::router`]).
#[derive(Debug)]
pub struct Agent {
    host_id: String,
    slots: SlotPool,
    root: PathBuf,
    max_sandboxes: u32,
    proxy_url: String,
    /// vCPUs offered per host core (sandboxes idle most of the time).
    cpu_overcommit: u32,
    deadlines: Deadlines,
    templates: Mutex<HashMap<String, Arc<Template>>>,
    sandboxes: Mutex<HashMap<String, Entry>>,
    /// Samples and logs for `Metrics` and `Logs`.
    pub(crate) observe: crate::observe::Observer,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sandbox IDs become directory names: keep them to a safe alphabet.
fn check_id(id: &str) -> Result<(), RpcError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RpcError::Invalid(format!("bad sandbox id {id:?}")))
    }
}

impl Agent {
    /// An agent keeping sandbox directories under `root`, with slots from `slots`.
    pub fn new(
        host_id: impl Into<String>,
        slots: SlotPool,
        root: PathBuf,
        max_sandboxes: u32,
    ) -> Self {
        Self {
            host_id: host_id.into(),
            slots,
            root,
            max_sandboxes,
            proxy_url: String::new(),
            cpu_overcommit: 1,
            deadlines: Deadlines::default(),
            templates: Mutex::new(HashMap::new()),
            sandboxes: Mutex::new(HashMap::new()),
            observe: crate::observe::Observer::default(),
        }
    }

    /// Deadlines of the lifecycle steps (a loaded host wants longer ones).
    pub fn with_deadlines(mut self, deadlines: Deadlines) -> Self {
        self.deadlines = deadlines;
        self
    }

    /// Offers `ratio` vCPUs per host core to placement (HostInfo's `vcpus_total`).
    pub fn with_cpu_overcommit(mut self, ratio: u32) -> Self {
        self.cpu_overcommit = ratio.max(1);
        self
    }

    /// The URL of this host's sandbox proxy, reported by HostInfo.
    pub fn with_proxy_url(mut self, url: impl Into<String>) -> Self {
        self.proxy_url = url.into();
        self
    }

    /// Makes `snapshot` startable as `template_id` (replacing any earlier one).
    pub fn register_template(
        &self,
        template_id: impl Into<String>,
        snapshot: Snapshot,
        warm: Option<WarmPool>,
        envd_version: impl Into<String>,
    ) {
        let t = Template {
            snapshot,
            warm,
            envd_version: envd_version.into(),
        };
        lock(&self.templates).insert(template_id.into(), Arc::new(t));
    }

    /// The base URL of a running sandbox's envd (through its slot), for the sandbox proxy.
    pub fn envd_base_url(&self, id: &str) -> Option<String> {
        match &lock(&self.sandboxes).get(id)?.state {
            State::Running(sb) => Some(sb.envd().base_url()),
            State::Paused(_) | State::Busy => None,
        }
    }

    /// Where the host reaches `port` of a running sandbox (the proxy's route into the guest).
    pub fn guest_endpoint(&self, id: &str, port: u16) -> Option<std::net::SocketAddr> {
        match &lock(&self.sandboxes).get(id)?.state {
            State::Running(sb) => Some(sb.net().slot().guest_endpoint(port)),
            State::Paused(_) | State::Busy => None,
        }
    }

    /// Kills every sandbox (paused ones deleted too) and frees the pool's slots.
    pub async fn shutdown(&self) {
        let ids: Vec<String> = lock(&self.sandboxes).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.kill(&id).await {
                tracing::warn!(sandbox = %id, error = %e, "shutdown kill");
            }
        }
        self.slots.shutdown().await;
    }

    /// For a restart: pauses every running sandbox (so it stays resumable from disk, with its
    /// memory), keeps paused ones, and frees the pool's slots. A sandbox that cannot be paused
    /// is killed. Returns the IDs paused.
    pub async fn suspend(&self) -> Vec<String> {
        // No more creates; the warm pools' waiting QEMUs go with their templates.
        let templates = std::mem::take(&mut *lock(&self.templates));
        drop(templates);
        let running: Vec<String> = lock(&self.sandboxes)
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Running(_)))
            .map(|(id, _)| id.clone())
            .collect();
        let mut paused = Vec::new();
        for id in running {
            match self.pause(&id).await {
                Ok(()) => {
                    self.save_meta(&id);
                    paused.push(id);
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "could not pause at shutdown; killing");
                    if let Err(e) = self.kill(&id).await {
                        tracing::warn!(sandbox = %id, error = %e, "shutdown kill");
                    }
                }
            }
        }
        self.slots.shutdown().await;
        paused
    }

    /// The Connect router for `AgentService`; also starts the backstop reaper (which ends when
    /// the agent is dropped).
    pub fn router(self: Arc<Self>) -> axum::Router {
        tokio::spawn(reaper(Arc::downgrade(&self)));
        tokio::spawn(crate::observe::sampler(Arc::downgrade(&self)));
        let a = self;
        let (a1, a2, a3, a4, a5, a6, a7) = (
            a.clone(),
            a.clone(),
            a.clone(),
            a.clone(),
            a.clone(),
            a.clone(),
            a.clone(),
        );
        RpcRouter::new()
            .unary(paths::CREATE, move |_ctx, req: CreateRequest| {
                let a = a1.clone();
                async move { a.create(req).await.map_err(RpcError::into_connect) }
            })
            .unary(paths::LIST, move |_ctx, _req: ListRequest| {
                let a = a2.clone();
                async move { Ok::<_, ConnectError>(a.list()) }
            })
            .unary(paths::KILL, move |_ctx, req: KillRequest| {
                let a = a3.clone();
                async move {
                    a.kill(&req.sandbox_id)
                        .await
                        .map(|()| KillResponse {})
                        .map_err(RpcError::into_connect)
                }
            })
            .unary(paths::PAUSE, move |_ctx, req: PauseRequest| {
                let a = a4.clone();
                async move {
                    a.pause(&req.sandbox_id)
                        .await
                        .map(|()| PauseResponse {})
                        .map_err(RpcError::into_connect)
                }
            })
            .unary(paths::RESUME, move |_ctx, req: ResumeRequest| {
                let a = a5.clone();
                async move { a.resume(req).await.map_err(RpcError::into_connect) }
            })
            .unary(paths::SET_TIMEOUT, move |_ctx, req: SetTimeoutRequest| {
                let a = a6.clone();
                async move { a.set_timeout(&req).map_err(RpcError::into_connect) }
            })
            .unary(paths::HOST_INFO, move |_ctx, _req: HostInfoRequest| {
                let a = a7.clone();
                async move { Ok::<_, ConnectError>(a.host_info()) }
            })
            .unary(paths::METRICS, {
                let a = a.clone();
                move |_ctx, req: MetricsRequest| {
                    let a = a.clone();
                    async move { a.metrics(&req).await.map_err(RpcError::into_connect) }
                }
            })
            .server_stream(paths::LOGS, {
                let a = a.clone();
                move |_ctx, req: LogsRequest| {
                    let a = a.clone();
                    async move {
                        let entries = a.logs(&req).map_err(RpcError::into_connect)?;
                        let stream = futures::stream::iter(entries.into_iter().map(Ok));
                        Ok::<_, ConnectError>(Box::pin(stream) as BoxStream<LogEntry>)
                    }
                }
            })
            .unary(paths::SNAPSHOT, |_ctx, _req: SnapshotRequest| async {
                Err::<SnapshotResponse, _>(RpcError::Unimplemented("Snapshot").into_connect())
            })
            .into_router()
    }

    fn status(id: &str, e: &Entry) -> SandboxStatus {
        let state = match e.state {
            State::Paused(_) => SandboxState::Paused,
            // A busy sandbox is mid-operation; it was running or is about to be.
            State::Running(_) | State::Busy => SandboxState::Running,
        };
        SandboxStatus {
            sandbox_id: id.to_owned(),
            template_id: e.meta.template_id.clone(),
            state: state as i32,
            vcpus: e.meta.vcpus,
            memory_mb: e.meta.memory_mb,
            start_unix_ms: e.meta.start_unix_ms,
            backstop_unix_ms: e.meta.backstop_unix_ms,
            envd_version: e.meta.envd_version.clone(),
        }
    }

    fn status_of(&self, id: &str) -> Option<SandboxStatus> {
        lock(&self.sandboxes).get(id).map(|e| Self::status(id, e))
    }

    /// Takes the sandbox's state out (leaving it busy) when `want` accepts it.
    fn take(&self, id: &str, want: fn(&State) -> bool) -> Result<State, RpcError> {
        let mut map = lock(&self.sandboxes);
        let e = map
            .get_mut(id)
            .ok_or_else(|| RpcError::SandboxNotFound(id.to_owned()))?;
        if !want(&e.state) {
            return Err(RpcError::WrongState {
                id: id.to_owned(),
                state: e.state.name(),
            });
        }
        Ok(std::mem::replace(&mut e.state, State::Busy))
    }

    fn put(&self, id: &str, state: State) {
        if let Some(e) = lock(&self.sandboxes).get_mut(id) {
            e.state = state;
        }
    }

    /// For [`crate::observe`]: `id`'s envd and console if it is running, `None` if it is
    /// paused or busy.
    pub(crate) fn observe_target(
        &self,
        id: &str,
    ) -> Result<Option<crate::observe::Target>, RpcError> {
        let map = lock(&self.sandboxes);
        let e = map
            .get(id)
            .ok_or_else(|| RpcError::SandboxNotFound(id.to_owned()))?;
        Ok(match &e.state {
            State::Running(sb) => Some(crate::observe::Target::of(id, sb)),
            State::Paused(_) | State::Busy => None,
        })
    }

    /// For the sampler: every sandbox ID, and the running sandboxes' envd and console.
    pub(crate) fn observe_targets(
        &self,
    ) -> (
        std::collections::HashSet<String>,
        Vec<crate::observe::Target>,
    ) {
        let map = lock(&self.sandboxes);
        let running = map
            .iter()
            .filter_map(|(id, e)| match &e.state {
                State::Running(sb) => Some(crate::observe::Target::of(id, sb)),
                State::Paused(_) | State::Busy => None,
            })
            .collect();
        (map.keys().cloned().collect(), running)
    }

    fn forget(&self, id: &str) {
        lock(&self.sandboxes).remove(id);
        self.observe.forget(id);
    }

    /// Writes the sandbox's [`Meta`] into its directory (atomically); failures are logged:
    /// the sandbox works without it, only a restarted agent would see defaults.
    fn save_meta(&self, id: &str) {
        let found = lock(&self.sandboxes).get(id).and_then(|e| {
            let dir = match &e.state {
                State::Running(sb) => sb.root().to_owned(),
                State::Paused(p) => p.root().to_owned(),
                State::Busy => return None,
            };
            Some((e.meta.clone(), dir))
        });
        let Some((meta, dir)) = found else {
            return;
        };
        let written = serde_json::to_vec_pretty(&meta)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                crate::sandbox::write_private(&dir.join(META_FILE), &text, false)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!(sandbox = %id, error = %e, "could not save the sandbox's agent record");
        }
    }

    /// Takes over running sandboxes whose QEMU outlived an earlier agent (found by
    /// [`crate::state::scan`], each with its slot taken over by [`SlotPool::with_adopted`]).
    /// One that cannot be taken over (no agent record, no `running.json`, envd not answering)
    /// is stopped and removed. Returns the IDs taken.
    pub async fn adopt_running(
        &self,
        found: Vec<(crate::state::AdoptableVm, SlotLease)>,
    ) -> Vec<String> {
        let mut adopted = Vec::new();
        for (vm, lease) in found {
            let dir = vm.dir.clone();
            match self.adopt_one(vm, lease).await {
                Ok(id) => adopted.push(id),
                Err(reason) => {
                    tracing::warn!(dir = %dir.display(), %reason, "running VM not taken over; removed");
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        adopted
    }

    async fn adopt_one(
        &self,
        found: crate::state::AdoptableVm,
        lease: SlotLease,
    ) -> Result<String, String> {
        let meta = std::fs::read(found.dir.join(META_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
            .filter(|m| check_id(&m.sandbox_id).is_ok());
        let r = &found.record;
        let vm_dir = r
            .qmp_socket
            .parent()
            .map(std::path::Path::to_owned)
            .unwrap_or_default();
        let vm = crate::vm::Vm::adopt(vm_dir, r.qemu_pid, r.qemu_start_time, found.qmp);
        let Some(meta) = meta else {
            let _ = vm.kill().await;
            self.slots.release(lease).await;
            return Err("no agent record".into());
        };
        let id = meta.sandbox_id.clone();
        if found.status != "running" {
            // Stopped mid-pause by the crash: the guest is intact, let it run on.
            if let Err(e) = vm.qmp().cont().await {
                let _ = vm.kill().await;
                self.slots.release(lease).await;
                return Err(format!("cont: {e}"));
            }
        }
        let manifest = match crate::sandbox::RunningManifest::read(&found.dir) {
            Ok(m) => m,
            Err(e) => {
                let _ = vm.kill().await;
                self.slots.release(lease).await;
                return Err(e.to_string());
            }
        };
        let sb = Sandbox::adopt_running(found.dir.clone(), vm, lease, manifest);
        if let Err(e) = sb.envd().wait_healthy(Duration::from_secs(10)).await {
            let lease = sb.kill().await;
            self.slots.release(lease).await;
            return Err(format!("envd: {e}"));
        }
        let token = sb.access_token().map(str::to_owned);
        self.observe.started(
            &id,
            token,
            sb.vm().console_log(),
            "adopted after an agent restart",
        );
        let duplicate = lock(&self.sandboxes).contains_key(&id);
        if duplicate {
            let lease = sb.kill().await;
            self.slots.release(lease).await;
            return Err(format!("sandbox {id} is also on disk paused"));
        }
        lock(&self.sandboxes).insert(
            id.clone(),
            Entry {
                meta,
                state: State::Running(Box::new(sb)),
            },
        );
        tracing::info!(sandbox = %id, "running sandbox taken over");
        Ok(id)
    }

    /// Takes over paused sandboxes found on disk by [`crate::state::scan`] after a restart.
    /// Sandboxes whose files do not verify are left out (and reported); returns the IDs taken.
    pub fn load_paused(&self, found: &[crate::state::PausedVm]) -> Vec<String> {
        let mut loaded = Vec::new();
        for p in found {
            if p.dir.parent() != Some(self.root.as_path()) {
                tracing::warn!(dir = %p.dir.display(), "paused sandbox outside the agent's root");
                continue;
            }
            let paused = match PausedSandbox::open(&p.dir) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(dir = %p.dir.display(), error = %e, "paused sandbox cannot be loaded");
                    continue;
                }
            };
            let saved = std::fs::read(p.dir.join(META_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
            // The ID is in the agent's record; a directory without one is named after it.
            let id = match &saved {
                Some(m) if !m.sandbox_id.is_empty() => m.sandbox_id.clone(),
                _ => p
                    .dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned(),
            };
            if check_id(&id).is_err() {
                tracing::warn!(dir = %p.dir.display(), "paused sandbox without a usable ID");
                continue;
            }
            let meta = saved.unwrap_or_else(|| {
                let m = paused.manifest();
                Meta {
                    sandbox_id: id.clone(),
                    template_id: p
                        .record
                        .as_ref()
                        .map(|r| r.template_id.clone())
                        .unwrap_or_default(),
                    vcpus: m.spec.vcpus,
                    memory_mb: u64::from(m.spec.memory_mib),
                    start_unix_ms: i64::try_from(m.paused_unix)
                        .unwrap_or(0)
                        .saturating_mul(1000),
                    backstop_unix_ms: 0,
                    auto_pause: false,
                    envd_version: String::new(),
                }
            });
            let mut map = lock(&self.sandboxes);
            if map.contains_key(&id) {
                continue;
            }
            map.insert(
                id.clone(),
                Entry {
                    meta,
                    state: State::Paused(Box::new(paused)),
                },
            );
            loaded.push(id);
        }
        loaded
    }

    async fn create(&self, req: CreateRequest) -> Result<CreateResponse, RpcError> {
        let spec = req
            .sandbox
            .ok_or_else(|| RpcError::Invalid("missing sandbox spec".into()))?;
        check_id(&spec.sandbox_id)?;
        let template = lock(&self.templates)
            .get(&spec.template_id)
            .cloned()
            .ok_or_else(|| RpcError::TemplateNotFound(spec.template_id.clone()))?;
        let id = spec.sandbox_id.clone();
        let m = &template.snapshot.manifest.spec;
        let meta = Meta {
            sandbox_id: spec.sandbox_id.clone(),
            template_id: spec.template_id.clone(),
            vcpus: m.vcpus,
            memory_mb: u64::from(m.memory_mib),
            start_unix_ms: if spec.start_unix_ms > 0 {
                spec.start_unix_ms
            } else {
                now_ms()
            },
            backstop_unix_ms: spec.backstop_unix_ms,
            auto_pause: spec.auto_pause,
            envd_version: template.envd_version.clone(),
        };
        {
            let mut map = lock(&self.sandboxes);
            if map.contains_key(&id) {
                return Err(RpcError::AlreadyExists(id));
            }
            // Paused sandboxes are files on disk, not VMs: they do not count.
            let live = map
                .values()
                .filter(|e| !matches!(e.state, State::Paused(_)))
                .count();
            if u32::try_from(live).unwrap_or(u32::MAX) >= self.max_sandboxes {
                return Err(RpcError::Full(self.max_sandboxes));
            }
            map.insert(
                id.clone(),
                Entry {
                    meta,
                    state: State::Busy,
                },
            );
        }
        let init = InitConfig {
            env_vars: spec.env_vars.into_iter().collect(),
            access_token: Some(spec.envd_access_token).filter(|t| !t.is_empty()),
            ..Default::default()
        };
        let token = init.access_token.clone();
        let created = Sandbox::create_pooled(
            &template.snapshot,
            template.warm.as_ref(),
            &self.slots,
            &self.root.join(&id),
            init,
            &self.deadlines,
        )
        .await;
        match created {
            Ok((sb, t)) => {
                tracing::info!(sandbox = %id, total = ?t.total, warm = t.warm, "created");
                let console = sb.vm().console_log();
                self.observe.started(&id, token, console, "created");
                self.put(&id, State::Running(Box::new(sb)));
                self.save_meta(&id);
                let sandbox = self.status_of(&id);
                Ok(CreateResponse { sandbox })
            }
            Err(error) => {
                self.forget(&id);
                Err(RpcError::Sandbox {
                    what: "create",
                    error: Box::new(error),
                })
            }
        }
    }

    fn list(&self) -> ListResponse {
        let map = lock(&self.sandboxes);
        let mut sandboxes: Vec<SandboxStatus> =
            map.iter().map(|(id, e)| Self::status(id, e)).collect();
        sandboxes.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        ListResponse { sandboxes }
    }

    async fn kill(&self, id: &str) -> Result<(), RpcError> {
        let state = self.take(id, |s| !matches!(s, State::Busy))?;
        match state {
            State::Running(sb) => {
                let lease = sb.kill().await;
                self.slots.release(lease).await;
            }
            State::Paused(p) => {
                let root = p.root().to_owned();
                if let Err(e) = p.remove() {
                    tracing::warn!(sandbox = %id, error = %e, "remove paused sandbox");
                    let _ = std::fs::remove_dir_all(root);
                }
            }
            State::Busy => {}
        }
        self.forget(id);
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<(), RpcError> {
        let State::Running(sb) = self.take(id, |s| matches!(s, State::Running(_)))? else {
            return Err(RpcError::WrongState {
                id: id.to_owned(),
                state: "busy",
            });
        };
        // The VM's console goes with it: read it first.
        self.observe.catch_up(id);
        match sb.pause(&self.deadlines).await {
            Ok((paused, lease, t)) => {
                tracing::info!(sandbox = %id, total = ?t.total, "paused");
                self.observe.paused(id);
                self.slots.release(lease).await;
                self.put(id, State::Paused(Box::new(paused)));
                Ok(())
            }
            Err(PauseError::StillRunning { error, sandbox }) => {
                self.put(id, State::Running(sandbox));
                Err(RpcError::Sandbox {
                    what: "pause",
                    error: Box::new(error),
                })
            }
            Err(PauseError::Lost { error, net }) => {
                self.slots.release(net).await;
                self.forget(id);
                Err(RpcError::Sandbox {
                    what: "pause (sandbox lost)",
                    error: Box::new(error),
                })
            }
        }
    }

    async fn resume(&self, req: ResumeRequest) -> Result<ResumeResponse, RpcError> {
        let id = req.sandbox_id.as_str();
        let State::Paused(paused) = self.take(id, |s| matches!(s, State::Paused(_)))? else {
            return Err(RpcError::WrongState {
                id: id.to_owned(),
                state: "busy",
            });
        };
        let lease = match self.slots.acquire().await {
            Ok(l) => l,
            Err(e) => {
                self.put(id, State::Paused(paused));
                return Err(e.into());
            }
        };
        let mut paused = paused;
        if !req.envd_access_token.is_empty() || !req.env_vars.is_empty() {
            let mut init = paused.manifest().init.clone();
            if !req.envd_access_token.is_empty() {
                init.access_token = Some(req.envd_access_token.clone());
            }
            init.env_vars.extend(req.env_vars.clone());
            paused.set_init(init);
        }
        let keep = paused.clone();
        match (*paused).resume(lease, &self.deadlines).await {
            Ok((sb, t)) => {
                tracing::info!(sandbox = %id, total = ?t.total, "resumed");
                let token = keep.manifest().init.access_token.clone();
                self.observe
                    .started(id, token, sb.vm().console_log(), "resumed");
                if let Some(e) = lock(&self.sandboxes).get_mut(id) {
                    e.state = State::Running(Box::new(sb));
                    if req.backstop_unix_ms > 0 {
                        e.meta.backstop_unix_ms = req.backstop_unix_ms;
                    }
                }
                self.save_meta(id);
                Ok(ResumeResponse {
                    sandbox: self.status_of(id),
                })
            }
            Err(Failed { error, net }) => {
                self.slots.release(net).await;
                // Still resumable if its files still verify (the guest never ran).
                match PausedSandbox::open(keep.root()) {
                    Ok(p) => self.put(id, State::Paused(Box::new(p))),
                    Err(_) => self.forget(id),
                }
                Err(RpcError::Sandbox {
                    what: "resume",
                    error: Box::new(error),
                })
            }
        }
    }

    fn set_timeout(&self, req: &SetTimeoutRequest) -> Result<SetTimeoutResponse, RpcError> {
        let mut map = lock(&self.sandboxes);
        let e = map
            .get_mut(&req.sandbox_id)
            .ok_or_else(|| RpcError::SandboxNotFound(req.sandbox_id.clone()))?;
        e.meta.backstop_unix_ms = req.backstop_unix_ms;
        drop(map);
        self.save_meta(&req.sandbox_id);
        Ok(SetTimeoutResponse {})
    }

    fn host_info(&self) -> HostInfoResponse {
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let vcpus_total = cores.saturating_mul(self.cpu_overcommit.max(1));
        let (mut vcpus_used, mut memory_mb_used, mut sandboxes) = (0u32, 0u64, 0u32);
        for e in lock(&self.sandboxes).values() {
            sandboxes += 1;
            if !matches!(e.state, State::Paused(_)) {
                vcpus_used += e.meta.vcpus;
                memory_mb_used += e.meta.memory_mb;
            }
        }
        let template_envd_versions = lock(&self.templates)
            .iter()
            .map(|(id, t)| (id.clone(), t.envd_version.clone()))
            .collect();
        HostInfoResponse {
            host_id: self.host_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            vcpus_total,
            vcpus_used,
            memory_mb_total: mem_total_mb(),
            memory_mb_used,
            sandboxes,
            max_sandboxes: self.max_sandboxes,
            proxy_url: self.proxy_url.clone(),
            template_envd_versions,
        }
    }

    /// Sandboxes whose backstop passed (and that no operation holds), with whether to pause
    /// (auto_pause and running) rather than kill them.
    fn overdue(&self, now: i64) -> Vec<(String, bool)> {
        lock(&self.sandboxes)
            .iter()
            .filter(|(_, e)| {
                e.meta.backstop_unix_ms > 0
                    && e.meta.backstop_unix_ms <= now
                    && !matches!(e.state, State::Busy)
            })
            .map(|(id, e)| {
                let pause = e.meta.auto_pause && matches!(e.state, State::Running(_));
                (id.clone(), pause)
            })
            .collect()
    }

    /// Acts on one sandbox past its backstop.
    async fn expire(&self, id: &str, pause: bool) -> Result<(), RpcError> {
        if !pause {
            return self.kill(id).await;
        }
        self.pause(id).await?;
        // Paused: nothing runs any more, so the backstop has done its job.
        if let Some(e) = lock(&self.sandboxes).get_mut(id) {
            e.meta.backstop_unix_ms = 0;
        }
        self.save_meta(id);
        Ok(())
    }
}

/// Kills (or, with auto_pause, pauses) sandboxes past their backstop: the control plane should have acted first, so this
/// only guards against it being gone.
async fn reaper(agent: Weak<Agent>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(agent) = agent.upgrade() else {
            return;
        };
        for (id, pause) in agent.overdue(now_ms()) {
            tracing::warn!(sandbox = %id, pause, "backstop deadline passed");
            if let Err(e) = agent.expire(&id, pause).await {
                tracing::warn!(sandbox = %id, error = %e, "backstop");
            }
        }
    }
}

/// Host memory in MiB (`MemTotal` of /proc/meminfo), 0 if unknown.
fn mem_total_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
