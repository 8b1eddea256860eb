//! The control plane's operations on sandboxes, teams and hosts: what the REST handlers, the
//! reaper and the edge proxy call. Creates (placement, idempotency keys) are in `create`,
//! snapshots and forks in `snapshots` and `fork`, lifecycle settings and auto-resume in
//! `lifecycle`, reconciliation with the agents in `reconcile`.
//!
//! Operations on one sandbox are serialized by a per-sandbox lock inside this process, and
//! their state changes are compare-and-set in the store, so they are also safe between
//! replicas. The agent is asked to act only after the record says an operation is under way
//! (`creating`, `pausing`, `resuming`), and the record is moved on only after the agent
//! answered.
//!
//! Each sandbox operation runs in a span named after it with the field `sandbox_id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use base64::Engine as _;
use time::OffsetDateTime;
use wrenn_agent_proto::v1 as agent;
use wrenn_api::{
    ConnectSandbox, CreatedApiKey, ListedSandbox, PauseSandbox, Sandbox, SandboxDetail, SandboxLog,
    SandboxLogEntry, SandboxLogs, SandboxMetric, Team,
};
use wrenn_connect::{Code, ConnectError};
use wrenn_core::{HostId, SandboxId, SandboxState, TeamId, TemplateId, UnixMillis, backstop};

use crate::agents::{AgentClient, AgentConnector, Agents};
use crate::config::Config;
use crate::error::{ApiError, Chain};
use crate::lifecycle;
use crate::store::{
    Cursor, HostRecord, SandboxFilter, SandboxRecord, Store, StoreError, TeamRecord, TemplateRecord,
};
use crate::tokens;

/// The control plane's shared state.
pub struct ControlPlane {
    pub(crate) config: Config,
    pub(crate) store: Store,
    agents: Agents,
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

type SandboxLock = Arc<tokio::sync::Mutex<()>>;

/// The current time.
pub(crate) fn now() -> UnixMillis {
    UnixMillis(
        i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(i64::MAX),
    )
}

pub(crate) fn to_datetime(t: UnixMillis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A new random ID: 20 lowercase letters and digits, like sandbox IDs.
pub(crate) fn random_id() -> String {
    SandboxId::from_random(rand::random()).as_str().to_owned()
}

/// Encodes a list cursor for the `x-next-token` header (opaque to clients).
pub(crate) fn encode_cursor(c: &Cursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{}", c.time, c.id))
}

pub(crate) fn decode_cursor(token: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::BadRequest("Invalid next token".to_owned());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (time, id) = raw.split_once(':').ok_or_else(bad)?;
    Ok(Cursor {
        time: time.parse().map_err(|_| bad())?,
        id: id.to_owned(),
    })
}

impl ControlPlane {
    /// Opens the store (running migrations) and sets up agent access.
    pub async fn open(
        config: Config,
        connector: Arc<dyn AgentConnector>,
    ) -> Result<Arc<Self>, StoreError> {
        let store = Store::open(&config.database_url).await?;
        let agents = Agents::new(connector, config.secret.clone());
        Ok(Arc::new(ControlPlane {
            config,
            store,
            agents,
            locks: Mutex::new(HashMap::new()),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn lock_of(&self, key: &str) -> SandboxLock {
        let mut locks = self.locks.lock().expect("locks");
        locks.retain(|_, w| w.strong_count() > 0);
        match locks.get(key).and_then(Weak::upgrade) {
            Some(m) => m,
            None => {
                let m = Arc::new(tokio::sync::Mutex::new(()));
                locks.insert(key.to_owned(), Arc::downgrade(&m));
                m
            }
        }
    }

    /// The sandbox's operation lock in this process, once every earlier operation finished.
    pub(crate) async fn lock(&self, id: &SandboxId) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock_of(id.as_str()).lock_owned().await
    }

    /// The sandbox's operation lock if no operation holds it now.
    pub(crate) fn try_lock(&self, id: &SandboxId) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.lock_of(id.as_str()).try_lock_owned().ok()
    }

    /// Snapshot `id`'s lock in this process: held while it is being made, used by a fork or
    /// deleted, so the sweep of leftover snapshots never takes one an operation still holds.
    /// (Its key cannot be a sandbox ID's: those have no `:`.)
    pub(crate) async fn lock_snapshot(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock_of(&format!("snapshot:{id}")).lock_owned().await
    }

    /// Snapshot `id`'s lock if no operation holds it now.
    pub(crate) fn try_lock_snapshot(&self, id: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.lock_of(&format!("snapshot:{id}"))
            .try_lock_owned()
            .ok()
    }

    pub(crate) fn access_token(&self, id: &str) -> String {
        tokens::envd_access_token(&self.config.secret, id)
    }

    /// The traffic access token of a sandbox whose ports are not public
    /// (`network.allowPublicTraffic: false`); `None` for one whose ports are.
    pub(crate) fn traffic_token(&self, rec: &SandboxRecord) -> Option<String> {
        let private = rec
            .network
            .as_ref()
            .and_then(|n| n.allow_public_traffic)
            .is_some_and(|public| !public);
        private.then(|| tokens::traffic_access_token(&self.config.secret, rec.id.as_str()))
    }

    // Teams, keys, templates and hosts.

    pub async fn create_team(&self, name: &str) -> Result<Team, ApiError> {
        let id = TeamId::parse(&random_id()).expect("generated IDs are valid");
        self.store
            .insert_team(
                &TeamRecord {
                    id: id.clone(),
                    name: name.to_owned(),
                },
                now(),
            )
            .await?;
        Ok(Team {
            team_id: id.to_string(),
            name: name.to_owned(),
        })
    }

    pub async fn create_api_key(
        &self,
        team_id: &str,
        name: &str,
    ) -> Result<CreatedApiKey, ApiError> {
        let team = self
            .store
            .get_team(team_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("Team \"{team_id}\" not found")))?;
        let key = tokens::new_api_key();
        let id = random_id();
        let mask = tokens::mask_api_key(&key);
        self.store
            .insert_api_key(
                &id,
                &team.id,
                &tokens::hash_api_key(&key),
                &mask,
                name,
                now(),
            )
            .await?;
        Ok(CreatedApiKey {
            id,
            team_id: team.id.to_string(),
            name: name.to_owned(),
            key,
            mask,
        })
    }

    /// The team that owns this API key.
    pub async fn authenticate(&self, key: &str) -> Result<Option<TeamRecord>, ApiError> {
        Ok(self
            .store
            .team_by_key_hash(&tokens::hash_api_key(key))
            .await?)
    }

    /// Registers (or updates) a template; template builds call this with envd's version.
    pub async fn register_template(&self, t: &TemplateRecord) -> Result<(), ApiError> {
        TemplateId::parse(&t.id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        Ok(self.store.upsert_template(t, now()).await?)
    }

    /// Registers (or updates) a host agent: asks it for its capacity and version, and records
    /// the templates it reports as public templates (unless already known).
    pub async fn register_host(
        &self,
        id: &str,
        rpc_url: &str,
        proxy_url: &str,
    ) -> Result<HostRecord, ApiError> {
        let id = HostId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let client = self
            .agents
            .connect(id.as_str(), rpc_url)
            .map_err(|e| ApiError::BadRequest(e.message))?;
        let info = client
            .host_info(agent::HostInfoRequest {})
            .await
            .map_err(|e| ApiError::agent(format!("register host {id}"), e))?;
        let host = HostRecord {
            id,
            rpc_url: rpc_url.to_owned(),
            proxy_url: if proxy_url.is_empty() {
                info.proxy_url.clone()
            } else {
                proxy_url.to_owned()
            },
            vcpus: info.vcpus_total,
            memory_mb: info.memory_mb_total,
            max_sandboxes: info.max_sandboxes,
            version: info.version.clone(),
            schedulable: true,
            heartbeat_at: None,
            lost_at: None,
            templates: None,
        };
        self.store.upsert_host(&host, now()).await?;
        for (tpl, envd_version) in &info.template_envd_versions {
            let anyone = TeamId::parse("-").expect("valid");
            if self.store.get_template(tpl, &anyone).await?.is_none() {
                self.register_template(&TemplateRecord {
                    id: tpl.clone(),
                    team_id: None,
                    envd_version: envd_version.clone(),
                    vcpus: 2,
                    memory_mb: 512,
                    disk_size_mb: 2048,
                    name: None,
                    build: None,
                })
                .await?;
            }
        }
        Ok(host)
    }

    /// The secret host `host_id`'s agent requires when it is reached over the network (see
    /// [`crate::tokens::agent_secret`]); the operator configures the agent with it.
    pub fn agent_secret(&self, host_id: &HostId) -> String {
        self.agents.secret_of(host_id.as_str())
    }

    pub(crate) fn client_for(&self, host: &HostRecord) -> Result<Arc<dyn AgentClient>, ApiError> {
        self.agents
            .client(host)
            .map_err(|e| ApiError::agent(format!("connect to host {}", host.id), e))
    }

    pub(crate) async fn host_of(
        &self,
        rec: &SandboxRecord,
    ) -> Result<(HostRecord, Arc<dyn AgentClient>), ApiError> {
        let host_id = rec.host_id.as_ref().ok_or_else(|| {
            ApiError::agent(
                "find the sandbox's host",
                ConnectError::failed_precondition("no host recorded"),
            )
        })?;
        let host = self.store.get_host(host_id).await?.ok_or_else(|| {
            ApiError::agent(
                "find the sandbox's host",
                ConnectError::failed_precondition(format!("host {host_id} is not registered")),
            )
        })?;
        let client = self.client_for(&host)?;
        Ok((host, client))
    }

    // Sandboxes.

    /// A live sandbox of this team. One still `creating` is not found: E2B creates are
    /// synchronous, so nobody has been told its ID yet (the create answers once it runs), and
    /// the SDKs treat 404 as "no such sandbox", which is the truth for a create that may still
    /// fail. Answering "running" would send a client to an envd that does not exist yet.
    pub(crate) async fn team_sandbox(
        &self,
        team: &TeamId,
        id: &str,
    ) -> Result<SandboxRecord, ApiError> {
        let sid = SandboxId::parse(id).map_err(|_| ApiError::sandbox_not_found(id))?;
        match self.store.get_sandbox(sid.as_str()).await? {
            Some(s)
                if s.team_id == *team
                    && !matches!(s.state, SandboxState::Killed | SandboxState::Creating) =>
            {
                Ok(s)
            }
            Some(s) if s.team_id == *team && s.state == SandboxState::Killed => {
                match self.store.sandbox_lost_at(&sid).await? {
                    Some(_) => Err(ApiError::NotFound(format!(
                        "Sandbox \"{id}\" was lost: its host {} stopped answering",
                        s.host_id.as_ref().map_or("-", |h| h.as_str())
                    ))),
                    None => Err(ApiError::sandbox_not_found(id)),
                }
            }
            _ => Err(ApiError::sandbox_not_found(id)),
        }
    }

    pub(crate) fn sandbox_response(&self, rec: &SandboxRecord) -> Sandbox {
        Sandbox {
            template_id: rec.template_id.clone(),
            sandbox_id: rec.id.to_string(),
            client_id: wrenn_api::CLIENT_ID.to_owned(),
            envd_version: rec.envd_version.clone(),
            alias: None,
            envd_access_token: Some(self.access_token(rec.id.as_str())),
            traffic_access_token: self.traffic_token(rec),
            domain: self.config.domain.clone(),
        }
    }

    /// `connect`: extends a running sandbox (`false`) or resumes a paused one (`true`).
    #[tracing::instrument(name = "connect", skip_all, fields(sandbox_id = %id))]
    pub async fn connect(
        &self,
        team: &TeamRecord,
        id: &str,
        body: ConnectSandbox,
    ) -> Result<(Sandbox, bool), ApiError> {
        let rec = self.team_sandbox(&team.id, id).await?;
        let _guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        match rec.state {
            SandboxState::Running => {
                let end = self
                    .config
                    .deadline
                    .extend(now(), rec.end_at, body.timeout)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                self.move_end(&rec, end).await?;
                Ok((self.sandbox_response(&rec), false))
            }
            SandboxState::Paused => {
                // `memory: false` (`on_resume: reboot`): boot the disk cold.
                let reboot = body.memory == Some(false);
                Ok((self.resume_locked(rec, body.timeout, reboot).await?, true))
            }
            _ => Err(ApiError::Conflict(format!(
                "Sandbox \"{id}\" is being paused or resumed, try again"
            ))),
        }
    }

    /// `POST /sandboxes/{id}/resume`: only for paused sandboxes.
    #[tracing::instrument(name = "resume", skip_all, fields(sandbox_id = %id))]
    pub async fn resume(
        &self,
        team: &TeamRecord,
        id: &str,
        timeout: Option<i64>,
    ) -> Result<Sandbox, ApiError> {
        let rec = self.team_sandbox(&team.id, id).await?;
        let _guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        match rec.state {
            SandboxState::Paused => self.resume_locked(rec, timeout, false).await,
            SandboxState::Running => Err(ApiError::Conflict(format!(
                "Sandbox \"{id}\" is already running"
            ))),
            _ => Err(ApiError::Conflict(format!(
                "Sandbox \"{id}\" is being paused or resumed, try again"
            ))),
        }
    }

    /// Resumes paused sandbox `rec`, whose lock the caller holds, with a new timeout (`None`:
    /// the default); `reboot`: by a cold boot of its disk even if its memory was kept (one
    /// paused filesystem-only always resumes so).
    pub(crate) async fn resume_locked(
        &self,
        rec: SandboxRecord,
        timeout: Option<i64>,
        reboot: bool,
    ) -> Result<Sandbox, ApiError> {
        let now = now();
        let end = self
            .config
            .deadline
            .end_at(now, timeout)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let (host, client) = self.host_of(&rec).await?;
        // Its host is gone or silent: another one takes it from the shared store, if its host
        // copied it there.
        let moving = self.host_health(&host) != crate::hosts::Health::Healthy;
        let (target, client) = if moving {
            let other = self
                .place(rec.vcpus, rec.memory_mb, None, Some(&rec.template_id))
                .await
                .map_err(|_| {
                    ApiError::NoCapacity(format!(
                        "Sandbox \"{}\" is paused on host {}, which is not answering, and no other host can take it",
                        rec.id, host.id
                    ))
                })?;
            let client = self.client_for(&other)?;
            (other, client)
        } else {
            (host.clone(), client)
        };
        if !self
            .store
            .transition(&rec.id, SandboxState::Paused, SandboxState::Resuming, now)
            .await?
        {
            return Err(ApiError::Conflict(format!(
                "Sandbox \"{}\" changed state, try again",
                rec.id
            )));
        }
        // A moving sandbox's record names its new host before that host is asked, so the
        // new host's reconciler sees a fresh `resuming` record and leaves the VM alone.
        if moving {
            self.store.move_resuming(&rec.id, &target.id).await?;
        }
        let res = client
            .resume(agent::ResumeRequest {
                sandbox_id: rec.id.to_string(),
                envd_access_token: self.access_token(rec.id.as_str()),
                end_unix_ms: end.0,
                backstop_unix_ms: backstop(end, self.config.backstop_grace_secs).0,
                env_vars: rec.env_vars.clone().into_iter().collect(),
                reboot,
                fetch: moving,
            })
            .await;
        if let Err(e) = res {
            if moving {
                self.store.move_resuming(&rec.id, &host.id).await?;
            }
            self.store
                .transition(
                    &rec.id,
                    SandboxState::Resuming,
                    SandboxState::Paused,
                    self::now(),
                )
                .await?;
            if moving && e.code == Code::NotFound {
                // Not "not found": it is paused, and resumes once its host is back.
                return Err(ApiError::NoCapacity(format!(
                    "Sandbox \"{}\" cannot be resumed now: its host {} is not answering and the shared store has no copy of it",
                    rec.id, host.id
                )));
            }
            return Err(ApiError::agent("resume sandbox", e));
        }
        if moving {
            tracing::info!(sandbox_id = %rec.id, from = %host.id, to = %target.id, "paused sandbox moved to another host");
        }
        self.store.resumed(&rec.id, now, end, self::now()).await?;
        tracing::info!(sandbox_id = %rec.id, host_id = %target.id, "sandbox resumed");
        Ok(self.sandbox_response(&rec))
    }

    async fn move_end(&self, rec: &SandboxRecord, end: UnixMillis) -> Result<(), ApiError> {
        let (_host, client) = self.host_of(rec).await?;
        client
            .set_timeout(agent::SetTimeoutRequest {
                sandbox_id: rec.id.to_string(),
                end_unix_ms: end.0,
                backstop_unix_ms: backstop(end, self.config.backstop_grace_secs).0,
            })
            .await
            .map_err(|e| ApiError::agent("set the sandbox's timeout", e))?;
        if !self
            .store
            .set_end_at(&rec.id, SandboxState::Running, end, now())
            .await?
        {
            return Err(ApiError::Conflict(format!(
                "Sandbox \"{}\" changed state, try again",
                rec.id
            )));
        }
        Ok(())
    }

    #[tracing::instrument(name = "set_timeout", skip_all, fields(sandbox_id = %id))]
    pub async fn set_timeout(
        &self,
        team: &TeamRecord,
        id: &str,
        secs: i64,
    ) -> Result<(), ApiError> {
        let end = self
            .config
            .deadline
            .set_timeout(now(), secs)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.update_end(team, id, |_| Ok(end)).await
    }

    #[tracing::instrument(name = "refresh", skip_all, fields(sandbox_id = %id))]
    pub async fn refresh(
        &self,
        team: &TeamRecord,
        id: &str,
        duration: Option<i64>,
    ) -> Result<(), ApiError> {
        let deadline = self.config.deadline;
        deadline
            .refresh(now(), now(), duration)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.update_end(team, id, |cur| {
            deadline
                .refresh(now(), cur, duration)
                .map_err(|e| ApiError::BadRequest(e.to_string()))
        })
        .await
    }

    async fn update_end(
        &self,
        team: &TeamRecord,
        id: &str,
        end: impl FnOnce(UnixMillis) -> Result<UnixMillis, ApiError>,
    ) -> Result<(), ApiError> {
        let rec = self.team_sandbox(&team.id, id).await?;
        let _guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        if rec.state != SandboxState::Running {
            // E2B keeps timeouts only for running sandboxes; a paused one is "not found" here.
            return Err(ApiError::NotFound(format!(
                "Sandbox \"{id}\" is not running"
            )));
        }
        let end = end(rec.end_at)?;
        self.move_end(&rec, end).await
    }

    #[tracing::instrument(name = "kill", skip_all, fields(sandbox_id = %id))]
    pub async fn kill(&self, team: &TeamRecord, id: &str) -> Result<(), ApiError> {
        let rec = self.team_sandbox(&team.id, id).await?;
        let _guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        self.kill_locked(&rec).await
    }

    async fn kill_locked(&self, rec: &SandboxRecord) -> Result<(), ApiError> {
        rec.state.apply(wrenn_core::Action::Kill).map_err(|_| {
            ApiError::Conflict(format!(
                "Sandbox \"{}\" is being paused or resumed, try again",
                rec.id
            ))
        })?;
        if rec.host_id.is_some() {
            let (_host, client) = self.host_of(rec).await?;
            match client
                .kill(agent::KillRequest {
                    sandbox_id: rec.id.to_string(),
                })
                .await
            {
                // Already gone on the host (e.g. its backstop fired): the record follows.
                Ok(_) => {}
                Err(e) if e.code == Code::NotFound => {}
                Err(e) => return Err(ApiError::agent("kill sandbox", e)),
            }
        }
        if !self
            .store
            .transition(&rec.id, rec.state, SandboxState::Killed, now())
            .await?
        {
            return Err(ApiError::Conflict(format!(
                "Sandbox \"{}\" changed state, try again",
                rec.id
            )));
        }
        tracing::info!(sandbox_id = %rec.id, "sandbox killed");
        Ok(())
    }

    #[tracing::instrument(name = "pause", skip_all, fields(sandbox_id = %id))]
    pub async fn pause(
        &self,
        team: &TeamRecord,
        id: &str,
        body: PauseSandbox,
    ) -> Result<(), ApiError> {
        let memory = lifecycle::pause_keeps_memory(&body);
        let rec = self.team_sandbox(&team.id, id).await?;
        let _guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        self.pause_locked(&rec, memory).await
    }

    /// Pauses running sandbox `rec`, whose lock the caller holds, with its memory or (`memory`
    /// false) only its disk; one already paused (or being paused) is a 409, which the SDKs
    /// read as "already paused".
    async fn pause_locked(&self, rec: &SandboxRecord, memory: bool) -> Result<(), ApiError> {
        match rec.state {
            SandboxState::Running => {}
            SandboxState::Paused | SandboxState::Pausing => {
                return Err(ApiError::Conflict(format!(
                    "Sandbox \"{}\" is already paused",
                    rec.id
                )));
            }
            _ => {
                return Err(ApiError::Conflict(format!(
                    "Sandbox \"{}\" is being resumed, try again",
                    rec.id
                )));
            }
        }
        let (_host, client) = self.host_of(rec).await?;
        if !self.store.start_pause(&rec.id, memory, now()).await? {
            return Err(ApiError::Conflict(format!(
                "Sandbox \"{}\" changed state, try again",
                rec.id
            )));
        }
        if let Err(e) = client
            .pause(agent::PauseRequest {
                sandbox_id: rec.id.to_string(),
                keep_memory: memory,
            })
            .await
        {
            self.store
                .transition(&rec.id, SandboxState::Pausing, SandboxState::Running, now())
                .await?;
            return Err(ApiError::agent("pause sandbox", e));
        }
        self.store
            .transition(&rec.id, SandboxState::Pausing, SandboxState::Paused, now())
            .await?;
        tracing::info!(sandbox_id = %rec.id, memory, "sandbox paused");
        Ok(())
    }

    /// The template named `alias`, if the team may see it.
    pub async fn template_alias(
        &self,
        team: &TeamRecord,
        alias: &str,
    ) -> Result<wrenn_api::TemplateAlias, ApiError> {
        match self.store.template_entry(alias).await? {
            Some(e) if e.visible_to(&team.id) => Ok(wrenn_api::TemplateAlias {
                public: e.public(),
                template_id: e.template.id,
            }),
            Some(_) => Err(ApiError::Forbidden(format!(
                "You don't have access to template '{alias}'"
            ))),
            None => Err(ApiError::NotFound(format!("Template '{alias}' not found"))),
        }
    }

    pub async fn detail(&self, team: &TeamRecord, id: &str) -> Result<SandboxDetail, ApiError> {
        let rec = self.team_sandbox(&team.id, id).await?;
        let state = rec
            .state
            .public()
            .ok_or_else(|| ApiError::sandbox_not_found(id))?;
        Ok(SandboxDetail {
            template_id: rec.template_id.clone(),
            alias: None,
            sandbox_id: rec.id.to_string(),
            client_id: wrenn_api::CLIENT_ID.to_owned(),
            started_at: to_datetime(rec.started_at),
            end_at: to_datetime(rec.end_at),
            envd_version: rec.envd_version.clone(),
            envd_access_token: Some(self.access_token(rec.id.as_str())),
            allow_internet_access: rec.allow_internet_access,
            domain: self.config.domain.clone(),
            cpu_count: rec.vcpus,
            memory_mb: rec.memory_mb,
            disk_size_mb: rec.disk_size_mb,
            metadata: Some(rec.metadata.clone().into_iter().collect()),
            state: state.as_str().to_owned(),
            lifecycle: Some(lifecycle::reported(&rec)),
            pause_mode: lifecycle::pause_mode(&rec),
            network: rec.network.clone(),
        })
    }

    /// One page of the team's sandboxes and the token of the next page.
    pub async fn list(
        &self,
        filter: &SandboxFilter,
    ) -> Result<(Vec<ListedSandbox>, Option<String>), ApiError> {
        let (page, more) = self.store.list_sandboxes(filter).await?;
        let next = if more {
            page.last().map(|s| {
                encode_cursor(&Cursor {
                    time: s.started_at.0,
                    id: s.id.to_string(),
                })
            })
        } else {
            None
        };
        let items = page
            .iter()
            .filter_map(|rec| {
                Some(ListedSandbox {
                    template_id: rec.template_id.clone(),
                    alias: None,
                    sandbox_id: rec.id.to_string(),
                    client_id: wrenn_api::CLIENT_ID.to_owned(),
                    started_at: to_datetime(rec.started_at),
                    end_at: to_datetime(rec.end_at),
                    cpu_count: rec.vcpus,
                    memory_mb: rec.memory_mb,
                    disk_size_mb: rec.disk_size_mb,
                    metadata: Some(rec.metadata.clone().into_iter().collect()),
                    state: rec.state.public()?.as_str().to_owned(),
                    envd_version: rec.envd_version.clone(),
                })
            })
            .collect();
        Ok((items, next))
    }

    /// Resource samples; a sandbox that is not running has none.
    pub async fn metrics(
        &self,
        team: &TeamRecord,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<SandboxMetric>, ApiError> {
        let rec = self.team_sandbox(&team.id, id).await?;
        // A paused sandbox's host keeps its earlier samples; mid-transition there is nothing.
        if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            return Ok(Vec::new());
        }
        let (_host, client) = self.host_of(&rec).await?;
        let resp = client
            .metrics(agent::MetricsRequest {
                sandbox_id: rec.id.to_string(),
                start_unix_ms: start.map_or(0, |s| s.saturating_mul(1000)),
                // `end` is in whole seconds: include all of that second.
                end_unix_ms: end.map_or(now().0, |s| s.saturating_mul(1000).saturating_add(999)),
            })
            .await
            .map_err(|e| ApiError::agent("read metrics", e))?;
        Ok(resp
            .samples
            .into_iter()
            .map(|m| SandboxMetric {
                timestamp: to_datetime(UnixMillis(m.timestamp_unix_ms)),
                timestamp_unix: m.timestamp_unix_ms / 1000,
                cpu_count: m.cpu_count,
                cpu_used_pct: m.cpu_used_pct,
                mem_used: m.mem_used,
                mem_total: m.mem_total,
                mem_cache: m.mem_cache,
                disk_used: m.disk_used,
                disk_total: m.disk_total,
            })
            .collect())
    }

    pub async fn logs(
        &self,
        team: &TeamRecord,
        id: &str,
        start_ms: Option<i64>,
        limit: u32,
    ) -> Result<SandboxLogs, ApiError> {
        let rec = self.team_sandbox(&team.id, id).await?;
        let entries = if matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            let (_host, client) = self.host_of(&rec).await?;
            client
                .logs(agent::LogsRequest {
                    sandbox_id: rec.id.to_string(),
                    start_unix_ms: start_ms.unwrap_or(0),
                    limit,
                    follow: false,
                })
                .await
                .map_err(|e| ApiError::agent("read logs", e))?
        } else {
            Vec::new()
        };
        Ok(SandboxLogs {
            logs: entries
                .iter()
                .map(|e| SandboxLog {
                    timestamp: to_datetime(UnixMillis(e.timestamp_unix_ms)),
                    line: e.message.clone(),
                })
                .collect(),
            log_entries: entries
                .into_iter()
                .map(|e| SandboxLogEntry {
                    timestamp: to_datetime(UnixMillis(e.timestamp_unix_ms)),
                    message: e.message,
                    level: if e.level.is_empty() {
                        "info".to_owned()
                    } else {
                        e.level
                    },
                    fields: e.fields.into_iter().collect(),
                })
                .collect(),
        })
    }

    // Reaper and proxy support (auto-resume is in `lifecycle`).

    /// Kills, or pauses when created with auto-pause, every running sandbox whose end has
    /// passed; returns how many it handled.
    pub async fn expire(&self) -> Result<usize, StoreError> {
        let t = now();
        let lease = UnixMillis(t.0.saturating_add(
            i64::try_from(self.config.expire_lease.as_millis()).unwrap_or(i64::MAX),
        ));
        let expired = self.store.claim_expired(t, lease, 100).await?;
        let mut handled = 0;
        for rec in expired {
            if self.expire_one(&rec.id).await? {
                handled += 1;
            }
        }
        Ok(handled)
    }

    #[tracing::instrument(name = "expire", skip_all, fields(sandbox_id = %id))]
    async fn expire_one(&self, id: &SandboxId) -> Result<bool, StoreError> {
        let _guard = self.lock(id).await;
        // Someone may have extended, paused or killed it meanwhile.
        let Some(rec) = self.store.get_sandbox(id.as_str()).await? else {
            return Ok(false);
        };
        if rec.state != SandboxState::Running || rec.end_at > now() {
            self.store.release_expiry(id).await?;
            return Ok(false);
        }
        let res = if rec.auto_pause {
            self.pause_locked(&rec, rec.auto_pause_memory).await
        } else {
            self.kill_locked(&rec).await
        };
        match res {
            Ok(()) => {
                tracing::info!(sandbox_id = %rec.id, paused = rec.auto_pause, "sandbox timed out");
                self.store.release_expiry(id).await?;
                Ok(true)
            }
            // The claim stays until its lease ends: then this or another control plane tries
            // again.
            Err(e) => {
                tracing::warn!(sandbox_id = %rec.id, error = %Chain(&e), "could not stop a timed-out sandbox");
                Ok(false)
            }
        }
    }

    /// The running sandbox whose access token produced this `/files` signature, if any. An
    /// expired signature still names its sandbox: envd refuses it with 401 ("expired"), which
    /// tells the client more than "sandbox not found" would.
    pub async fn find_by_signature(
        &self,
        path: &str,
        operation: &str,
        username: &str,
        signature: &str,
        expiration: Option<i64>,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        for rec in self.store.running().await? {
            let token = self.access_token(rec.id.as_str());
            let want = tokens::file_signature(path, operation, username, &token, expiration);
            if tokens::constant_time_eq(want.as_bytes(), signature.as_bytes()) {
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }
}
