//! Sandbox creates: placement that counts creates still in flight, the record written before
//! the agent is asked, and `Idempotency-Key`.
//!
//! A create starts from a template, or from a snapshot (`templateID` naming one: see
//! `snapshots`), which only its host holds; forks create their children here too.
//!
//! A create's record goes into the store `creating`, with the host it was placed on, before the
//! agent's Create is called, and only if that host still has room counting every other record
//! that holds or is getting a VM there (`Store::insert_placed`). So a burst of concurrent
//! creates fills a host exactly to its capacity and the rest get 503, as sequential creates do.
//! When the agent refuses or fails, the record is removed again: nothing stays half-created,
//! and a VM the agent may still finish (timeout) is killed, now or by the reconciler.
//!
//! With an idempotency key, the key is claimed (stored, naming the new sandbox's ID) under that
//! sandbox's lock before anything is placed. A second request with the key finds the claim and
//! waits for that create (in this process, on the same lock; from another control plane, by
//! polling its record) and answers with the same sandbox. A failed create gives its key up, so
//! a retry creates afresh, as if it were the first.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wrenn_agent_proto::v1 as agent;
use wrenn_api::{NewSandbox, Sandbox};
use wrenn_connect::{Code, ConnectError};
use wrenn_core::{
    HostCapacity, HostId, PlacementRequest, SandboxId, SandboxState, TeamId, TemplateId,
    UnixMillis, backstop, pick_host_sampled,
};

use crate::error::{ApiError, Chain};
use crate::lifecycle::Lifecycle;
use crate::network;
use crate::service::{ControlPlane, now};
use crate::store::{
    HostRecord, IdempotencyClaim, IdempotencyRecord, SandboxRecord, TeamRecord, TemplateRecord,
};
use crate::timing::ServerTiming;

/// How long an idempotency key names its sandbox.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Placement rounds of one create. Each lost round means another create took the room, so the
/// bound is only against a pathological race, never reached by a burst.
const PLACE_ATTEMPTS: usize = 32;

/// Rounds of a keyed create: each one creates, answers with the sandbox of the request holding
/// the key, or finds that request failed (its key free again).
const KEYED_ATTEMPTS: usize = 8;

/// How often a keyed create polls a create of another control plane.
const KEYED_POLL: Duration = Duration::from_millis(50);

/// The `Idempotency-Key` of a create: 1 to 255 lowercase ASCII letters, digits or hyphens, the
/// rule the E2B SDKs check before they send one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The request header.
    pub const HEADER: &'static str = "idempotency-key";

    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let ok = (1..=255).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(ApiError::BadRequest(
                "Invalid Idempotency-Key: use 1 to 255 lowercase letters, digits or hyphens"
                    .to_owned(),
            ));
        }
        Ok(IdempotencyKey(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn no_capacity() -> ApiError {
    ApiError::NoCapacity("No host has capacity for a new sandbox, try again later".to_owned())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Claims older than this have expired.
fn expired_before(now: UnixMillis) -> UnixMillis {
    UnixMillis(now.0.saturating_sub(millis(IDEMPOTENCY_TTL)))
}

/// SHA-256 of the request in canonical JSON (keys sorted), so the same request hashes the same
/// whatever order its maps were sent or parsed in. What changes nothing is left out: empty maps
/// are absent ones (the SDKs send `envVars: {}`, plain clients often nothing), and `secure` is
/// ignored anyway.
fn request_hash(body: &NewSandbox) -> String {
    let mut body = body.clone();
    body.secure = None;
    body.metadata = body.metadata.filter(|m| !m.is_empty());
    body.env_vars = body.env_vars.filter(|m| !m.is_empty());
    let value = serde_json::to_value(&body).expect("a NewSandbox always serializes");
    let mut text = String::new();
    canonical_json(&value, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// What a sandbox starts from: a template's boot state, or a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Launch {
    /// What the record (and `templateID` in answers) names as the sandbox's template.
    pub(crate) template_id: String,
    /// The template the agent is asked for: a built template's version, a snapshot's template.
    pub(crate) on_host: String,
    /// Set: the agent starts the sandbox from this snapshot (its memory, processes and disk).
    pub(crate) snapshot_id: Option<String>,
    /// Set: only this host holds what the sandbox starts from.
    pub(crate) host: Option<HostId>,
    pub(crate) vcpus: u32,
    pub(crate) memory_mb: u64,
    pub(crate) disk_size_mb: u64,
    /// Empty: the configured default.
    pub(crate) envd_version: String,
}

impl Launch {
    pub(crate) fn template(t: &TemplateRecord) -> Launch {
        Launch {
            template_id: t.id.clone(),
            // A built template's version is on the host that built it, under its build's ID.
            on_host: t.build.as_ref().map_or(&t.id, |b| &b.id).clone(),
            snapshot_id: None,
            host: t.build.as_ref().map(|b| b.host_id.clone()),
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
            envd_version: t.envd_version.clone(),
        }
    }
}

/// Whether a failed agent call that makes something (a VM, a snapshot) leaves its outcome
/// unknown: the agent may still make it.
pub(crate) fn outcome_unknown(e: &ConnectError) -> bool {
    matches!(
        e.code,
        Code::DeadlineExceeded | Code::Unavailable | Code::Unknown | Code::Canceled
    )
}

/// A create's answer, and where its time went.
#[derive(Debug)]
pub(crate) struct Created {
    pub(crate) sandbox: Sandbox,
    /// Empty for a retry answered with an earlier create's sandbox, but for `total`.
    pub(crate) timing: ServerTiming,
}

impl ControlPlane {
    /// Creates a sandbox (201 on the API); with `key`, a retry of an earlier create with the
    /// same key and request answers with that create's sandbox instead.
    #[tracing::instrument(
        name = "create",
        skip_all,
        fields(sandbox_id = tracing::field::Empty, team_id = %team.id)
    )]
    pub(crate) async fn create(
        &self,
        team: &TeamRecord,
        body: NewSandbox,
        key: Option<&IdempotencyKey>,
    ) -> Result<Created, ApiError> {
        let start = Instant::now();
        // Bad input is refused before anything is claimed or placed.
        self.config
            .deadline
            .end_at(now(), body.timeout)
            .map_err(bad_request)?;
        Lifecycle::of(&body)?;
        let launch = self.launch_of(&team.id, &body.template_id).await?;
        let mut created = match key {
            None => {
                let id = SandboxId::from_random(rand::random());
                let _guard = self.lock(&id).await;
                self.create_locked(team, id, &launch, &body).await
            }
            Some(key) => self.create_keyed(team, &launch, &body, key).await,
        }?;
        created.timing.push("total", start.elapsed());
        Ok(created)
    }

    /// What `templateID` names for `team`: a template (by ID, name or `name:tag`), else one
    /// of the team's snapshots (by ID or name, with or without namespace and tag).
    async fn launch_of(&self, team: &TeamId, name: &str) -> Result<Launch, ApiError> {
        // Checked only as a template's: a snapshot's namespaced name may be longer.
        let as_template = TemplateId::parse(name);
        if as_template.is_ok()
            && let Some(tpl) = self.resolve_template(team, name).await?
        {
            if tpl.name.is_some() && tpl.build.is_none() {
                return Err(ApiError::BadRequest(format!(
                    "Template \"{name}\" has no finished build yet"
                )));
            }
            return Ok(Launch::template(&tpl));
        }
        if let Some(snap) = self.resolve_snapshot(team, name).await? {
            return Ok(Launch::snapshot(&snap, snap.id.clone()));
        }
        as_template.map_err(bad_request)?;
        Err(ApiError::NotFound(format!("Template \"{name}\" not found")))
    }

    async fn create_keyed(
        &self,
        team: &TeamRecord,
        launch: &Launch,
        body: &NewSandbox,
        key: &IdempotencyKey,
    ) -> Result<Created, ApiError> {
        let hash = request_hash(body);
        for _ in 0..KEYED_ATTEMPTS {
            let id = SandboxId::from_random(rand::random());
            // Held from the claim to the end of the create: that is what a second request with
            // this key waits on.
            let guard = self.lock(&id).await;
            let now = now();
            let claim = self
                .store
                .claim_idempotency_key(&team.id, key.as_str(), &id, &hash, now, expired_before(now))
                .await?;
            let held = match claim {
                IdempotencyClaim::Claimed => {
                    let res = self.create_locked(team, id.clone(), launch, body).await;
                    if res.is_err()
                        && let Err(e) = self
                            .store
                            .release_idempotency_key(&team.id, key.as_str(), &id)
                            .await
                    {
                        // Kept, it would make retries wait; it expires with the other keys.
                        tracing::warn!(sandbox_id = %id, error = %Chain(&e), "give up the idempotency key of a failed create");
                    }
                    return res;
                }
                IdempotencyClaim::Released => continue,
                IdempotencyClaim::Taken(held) => held,
            };
            drop(guard);
            if held.request_hash != hash {
                return Err(ApiError::Unprocessable(
                    "This Idempotency-Key was used for a different create request; use a new key"
                        .to_owned(),
                ));
            }
            if let Some(sandbox) = self.await_keyed(team, key, &held).await? {
                return Ok(Created {
                    sandbox,
                    timing: ServerTiming::default(),
                });
            }
        }
        Err(in_progress())
    }

    /// Waits for the create that holds `key` (sandbox `held.sandbox_id`) and answers with its
    /// sandbox; `None` when that create failed, so the key is free for this request.
    async fn await_keyed(
        &self,
        team: &TeamRecord,
        key: &IdempotencyKey,
        held: &IdempotencyRecord,
    ) -> Result<Option<Sandbox>, ApiError> {
        let id = &held.sandbox_id;
        tracing::Span::current().record("sandbox_id", tracing::field::display(id));
        let give_up = tokio::time::Instant::now() + self.config.idempotency_wait;
        loop {
            // A create in this process holds the sandbox's lock until its record is settled.
            drop(self.lock(id).await);
            match self.store.get_sandbox(id.as_str()).await? {
                // Whatever became of it since (paused, killed): the key names this sandbox.
                Some(rec) if rec.state != SandboxState::Creating => {
                    tracing::info!(sandbox_id = %id, "create repeated with its idempotency key");
                    return Ok(Some(self.sandbox_response(&rec)));
                }
                // Another control plane is creating it.
                Some(_) => {}
                None => match self.store.idempotency_key(&team.id, key.as_str()).await? {
                    Some(now_held) if now_held.sandbox_id == *id => {
                        // Claimed but not placed yet, or its control plane died in between:
                        // after the grace period the claim is given up.
                        if now().0.saturating_sub(now_held.created_at.0)
                            > millis(self.config.settle_grace)
                        {
                            self.store
                                .release_idempotency_key(&team.id, key.as_str(), id)
                                .await?;
                            return Ok(None);
                        }
                    }
                    // Given up (its create failed) or replaced: this request may create.
                    _ => return Ok(None),
                },
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(in_progress());
            }
            tokio::time::sleep(KEYED_POLL).await;
        }
    }

    /// Makes sandbox `id`, whose lock the caller holds: the record goes in `creating` on a host
    /// with room, then the agent is asked, then the record follows its answer.
    pub(crate) async fn create_locked(
        &self,
        team: &TeamRecord,
        id: SandboxId,
        launch: &Launch,
        body: &NewSandbox,
    ) -> Result<Created, ApiError> {
        tracing::Span::current().record("sandbox_id", tracing::field::display(&id));
        let now = now();
        let end = self
            .config
            .deadline
            .end_at(now, body.timeout)
            .map_err(bad_request)?;
        let network = network::validate(body.allow_internet_access, body.network.as_ref())?;
        let lifecycle = Lifecycle::of(body)?;
        let mut rec = SandboxRecord {
            id,
            team_id: team.id.clone(),
            template_id: launch.template_id.clone(),
            state: SandboxState::Creating,
            host_id: None,
            vcpus: launch.vcpus,
            memory_mb: launch.memory_mb,
            disk_size_mb: launch.disk_size_mb,
            envd_version: if launch.envd_version.is_empty() {
                self.config.default_envd_version.clone()
            } else {
                launch.envd_version.clone()
            },
            metadata: body
                .metadata
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            env_vars: body
                .env_vars
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            started_at: now,
            end_at: end,
            auto_pause: lifecycle.auto_pause,
            auto_resume: lifecycle.auto_resume,
            auto_pause_memory: lifecycle.auto_pause_memory,
            paused_memory: true,
            allow_internet_access: body.allow_internet_access,
            updated_at: now,
            network,
        };
        let mut timing = ServerTiming::default();
        let step = Instant::now();
        let host = self.place_and_insert(&mut rec, launch).await?;
        timing.push("placement", step.elapsed());
        let step = Instant::now();
        match self.start_vm(&rec, &host, launch).await {
            Ok(stages) => {
                // The agent's own steps first: `agent` is the whole call, theirs included.
                timing.extend_from_agent(&stages);
                timing.push("agent", step.elapsed());
            }
            Err(e) => {
                self.forget_create(&rec).await;
                return Err(e);
            }
        }
        let step = Instant::now();
        self.finish_create(&rec, &host).await?;
        timing.push("store", step.elapsed());
        tracing::info!(sandbox_id = %rec.id, host_id = %host.id, template = %rec.template_id, "sandbox created");
        Ok(Created {
            sandbox: self.sandbox_response(&rec),
            timing,
        })
    }

    /// The most-free registered host that fits the request, counting creates in flight.
    /// A host for a sandbox of `vcpus` and `memory_mb`: `only` that one if set (it holds what
    /// the sandbox starts from), else a healthy host that holds host template `template`, the
    /// best of a few drawn at random (`Config::placement_candidates`).
    pub(crate) async fn place(
        &self,
        vcpus: u32,
        memory_mb: u64,
        only: Option<&HostId>,
        template: Option<&str>,
    ) -> Result<HostRecord, ApiError> {
        let mut hosts = self.store.list_hosts().await?;
        hosts.retain(|h| {
            only.is_none_or(|o| *o == h.id)
                && (only.is_some() || template.is_none_or(|t| h.holds(t)))
                && self.host_health(h) == crate::hosts::Health::Healthy
        });
        let usage = self.store.host_usage().await?;
        let caps: Vec<HostCapacity> = hosts
            .iter()
            .map(|h| {
                let u = usage.get(h.id.as_str()).copied().unwrap_or_default();
                HostCapacity {
                    id: h.id.clone(),
                    vcpus_total: h.vcpus,
                    vcpus_used: u.vcpus,
                    memory_mb_total: h.memory_mb,
                    memory_mb_used: u.memory_mb,
                    sandboxes: u.sandboxes,
                    max_sandboxes: h.max_sandboxes,
                    schedulable: h.schedulable,
                }
            })
            .collect();
        let chosen = pick_host_sampled(
            &caps,
            PlacementRequest { vcpus, memory_mb },
            self.config.placement_candidates,
            rand::random(),
        )
        .ok_or_else(no_capacity)?;
        Ok(hosts
            .into_iter()
            .find(|h| h.id == chosen.id)
            .expect("picked from this list"))
    }

    /// Places `rec` and writes it, `creating`, where it was placed. The usage read by
    /// [`Self::place`] may be stale by the time the record goes in; the insert checks the room
    /// again atomically, and a create that lost the race places again.
    async fn place_and_insert(
        &self,
        rec: &mut SandboxRecord,
        launch: &Launch,
    ) -> Result<HostRecord, ApiError> {
        let only = launch.host.as_ref();
        for _ in 0..PLACE_ATTEMPTS {
            let template = only.is_none().then_some(launch.on_host.as_str());
            let host = self.place(rec.vcpus, rec.memory_mb, only, template).await?;
            rec.host_id = Some(host.id.clone());
            if self.store.insert_placed(rec).await? {
                return Ok(host);
            }
            tracing::debug!(sandbox_id = %rec.id, host_id = %host.id, "host filled up meanwhile; placing again");
        }
        Err(no_capacity())
    }

    /// Asks the host's agent for the VM; answers the steps the agent reported.
    async fn start_vm(
        &self,
        rec: &SandboxRecord,
        host: &HostRecord,
        launch: &Launch,
    ) -> Result<Vec<agent::Stage>, ApiError> {
        let client = self.client_for(host)?;
        let spec = agent::SandboxSpec {
            sandbox_id: rec.id.to_string(),
            template_id: launch.on_host.clone(),
            vcpus: rec.vcpus,
            memory_mb: rec.memory_mb,
            disk_size_mb: rec.disk_size_mb,
            env_vars: rec.env_vars.clone().into_iter().collect(),
            metadata: rec.metadata.clone().into_iter().collect(),
            envd_access_token: self.access_token(rec.id.as_str()),
            start_unix_ms: rec.started_at.0,
            end_unix_ms: rec.end_at.0,
            backstop_unix_ms: backstop(rec.end_at, self.config.backstop_grace_secs).0,
            auto_pause: rec.auto_pause,
            egress: Some(network::agent_egress(
                rec.allow_internet_access,
                rec.network.as_ref(),
            )),
            team_id: rec.team_id.to_string(),
            snapshot_id: launch.snapshot_id.clone().unwrap_or_default(),
        };
        match client
            .create(agent::CreateRequest {
                sandbox: Some(spec),
            })
            .await
        {
            Ok(answer) => Ok(answer.stages),
            Err(e) => {
                if outcome_unknown(&e) {
                    self.kill_quietly(rec, host).await;
                }
                Err(ApiError::agent("create sandbox", e))
            }
        }
    }

    /// Moves the record on to `running` once the agent made the VM.
    async fn finish_create(&self, rec: &SandboxRecord, host: &HostRecord) -> Result<(), ApiError> {
        let moved = self
            .store
            .transition(
                &rec.id,
                SandboxState::Creating,
                SandboxState::Running,
                now(),
            )
            .await;
        match moved {
            Ok(true) => Ok(()),
            Ok(false) => {
                // The reconciler settled the record first: the agent took longer than the
                // grace period. If it made the record running, the create stands.
                let now_rec = self.store.get_sandbox(rec.id.as_str()).await?;
                if now_rec.is_some_and(|r| r.state == SandboxState::Running) {
                    return Ok(());
                }
                self.kill_quietly(rec, host).await;
                Err(ApiError::Internal(
                    "The sandbox was given up while its host was creating it, try again".to_owned(),
                ))
            }
            Err(e) => {
                // No record says the VM runs, so nobody would stop it: stop it now.
                self.kill_quietly(rec, host).await;
                self.forget_create(rec).await;
                Err(e.into())
            }
        }
    }

    /// Removes the record of a create that did not happen. If that fails too, the record stays
    /// `creating` and the reconciler removes it after the grace period.
    async fn forget_create(&self, rec: &SandboxRecord) {
        if let Err(e) = self.store.delete_creating(&rec.id).await {
            tracing::warn!(sandbox_id = %rec.id, error = %Chain(&e), "remove the record of a failed create");
        }
    }

    /// Best-effort kill of a VM whose create is being given up; the reconciler kills whatever
    /// this misses (a VM without a record).
    async fn kill_quietly(&self, rec: &SandboxRecord, host: &HostRecord) {
        let Ok(client) = self.client_for(host) else {
            return;
        };
        match client
            .kill(agent::KillRequest {
                sandbox_id: rec.id.to_string(),
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.code == Code::NotFound => {}
            Err(e) => {
                tracing::info!(sandbox_id = %rec.id, error = %Chain(&e), "kill after a failed create")
            }
        }
    }
}

fn in_progress() -> ApiError {
    ApiError::Conflict(
        "A create with this Idempotency-Key is still in progress, try again later".to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_follow_the_sdk_rule() {
        for ok in ["a", "0", "-", "abc-123", &"k".repeat(255)] {
            assert_eq!(IdempotencyKey::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "ABC", "a_b", "a b", "a.b", "é", "a\n", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_hash_ignores_map_order_and_what_changes_nothing() {
        let body = |pairs: &[(&str, &str)], timeout| NewSandbox {
            template_id: "base".into(),
            timeout,
            metadata: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let a = body(&[("a", "1"), ("b", "2"), ("c", "3")], Some(60));
        let b = body(&[("c", "3"), ("a", "1"), ("b", "2")], Some(60));
        assert_eq!(request_hash(&a), request_hash(&b));
        assert_ne!(
            request_hash(&a),
            request_hash(&body(&[("a", "1")], Some(60)))
        );
        assert_ne!(
            request_hash(&a),
            request_hash(&body(&[("a", "1"), ("b", "2"), ("c", "3")], Some(61)))
        );
        // An empty map is no map; `secure` changes nothing.
        let bare = NewSandbox {
            template_id: "base".into(),
            ..Default::default()
        };
        let sdk = NewSandbox {
            env_vars: Some(Default::default()),
            metadata: Some(Default::default()),
            secure: Some(true),
            ..bare.clone()
        };
        assert_eq!(request_hash(&bare), request_hash(&sdk));
    }
}
