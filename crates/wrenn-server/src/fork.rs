//! Forks (`POST /sandboxes/{id}/fork`): one snapshot of a running or paused sandbox, then
//! `count` new sandboxes from it, each succeeding or failing on its own.
//!
//! The snapshot is the fork's own (internal: never listed, not usable by name). The source
//! ends as it was (a running one is paused for the capture and resumed with its ID, token
//! and deadlines; a paused one stays paused) and its lock is held only for the capture. The
//! children are created as sandboxes from a snapshot are, on the snapshot's host, a few at a
//! time; then the snapshot is deleted on the agent, which keeps its files while the children
//! are layered on it. A fork that does not get to delete it leaves it to the sweep.
//!
//! Each child is a sandbox of its own (ID, envd and traffic tokens, record, the given timeout)
//! that inherits what the source was created with besides its timeout: metadata, env vars,
//! lifecycle (auto-pause, auto-resume) and network settings. Its record names the source's
//! template: the snapshot it came from is gone once the fork answers.

use futures::StreamExt as _;
use wrenn_api::{AutoResume, ForkResult, ForkSandbox, NewSandbox};
use wrenn_core::SandboxId;

use crate::create::Launch;
use crate::error::{ApiError, Chain};
use crate::service::{ControlPlane, now};
use crate::store::{SandboxRecord, TeamRecord};

/// The most forks one request makes (the SDKs' own limit).
const MAX_FORKS: i64 = 20;

/// How many children are being created at once: restores are heavy for a host, and every
/// child's create must finish within the agent call's deadline.
const PARALLEL_CREATES: usize = 4;

/// The create request a child is made with: the source's settings, the fork's timeout.
fn child_request(source: &SandboxRecord, timeout: Option<i64>) -> NewSandbox {
    NewSandbox {
        template_id: source.template_id.clone(),
        timeout,
        auto_pause: Some(source.auto_pause),
        auto_pause_memory: source.auto_pause.then_some(source.auto_pause_memory),
        auto_resume: Some(AutoResume {
            enabled: source.auto_resume,
        }),
        allow_internet_access: source.allow_internet_access,
        metadata: Some(source.metadata.clone().into_iter().collect()),
        env_vars: Some(source.env_vars.clone().into_iter().collect()),
        network: source.network.clone(),
        ..Default::default()
    }
}

impl ControlPlane {
    /// Forks sandbox `id` into `count` (default 1) new sandboxes; one entry per fork, in
    /// order, a sandbox or the error that stopped it.
    #[tracing::instrument(name = "fork", skip_all, fields(sandbox_id = %id))]
    pub async fn fork(
        &self,
        team: &TeamRecord,
        id: &str,
        body: ForkSandbox,
    ) -> Result<Vec<ForkResult>, ApiError> {
        let count = body.count.unwrap_or(1);
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(ApiError::BadRequest(format!(
                "count must be an integer between 1 and {MAX_FORKS}"
            )));
        }
        self.config
            .deadline
            .end_at(now(), body.timeout)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let rec = self.team_sandbox(&team.id, id).await?;
        let source_guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        let (snap, snap_guard) = self.capture(&rec, None, true).await?;
        drop(source_guard);
        let launch = Launch::snapshot(&snap, rec.template_id.clone());
        let request = child_request(&rec, body.timeout);
        let forks: Vec<ForkResult> = futures::stream::iter(0..count)
            .map(|_| self.fork_child(team, &rec.id, &launch, &request))
            .buffered(PARALLEL_CREATES)
            .collect()
            .await;
        // Its children keep its files on the host; a failure leaves it to the sweep.
        if let Err(e) = self.drop_snapshot(&snap).await {
            tracing::warn!(sandbox_id = %rec.id, snapshot_id = %snap.id, error = %Chain(&e), "delete a fork's snapshot");
        }
        drop(snap_guard);
        let made = forks.iter().filter(|f| f.sandbox.is_some()).count();
        tracing::info!(sandbox_id = %rec.id, count, made, "sandbox forked");
        Ok(forks)
    }

    /// One child of a fork: a create from the fork's snapshot.
    #[tracing::instrument(
        name = "create",
        skip_all,
        fields(sandbox_id = tracing::field::Empty, fork_of = %source)
    )]
    async fn fork_child(
        &self,
        team: &TeamRecord,
        source: &SandboxId,
        launch: &Launch,
        request: &NewSandbox,
    ) -> ForkResult {
        let id = SandboxId::from_random(rand::random());
        let _guard = self.lock(&id).await;
        match self.create_locked(team, id, launch, request).await {
            Ok(created) => ForkResult {
                sandbox: Some(created.sandbox),
                error: None,
            },
            Err(e) => ForkResult {
                sandbox: None,
                error: Some(e.into_body()),
            },
        }
    }
}
