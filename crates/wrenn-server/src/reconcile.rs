//! Reconciliation: bringing the records of a host in line with what its agent holds, at start,
//! at stop, and periodically (a background task), so records and VMs that disagree (after a
//! crash of either side, a lost answer, an agent's own backstop) are settled.
//!
//! What the agent reports wins, with two exceptions that keep operations in flight safe:
//! - a record that one of this process's operations holds (its lock) is left to that
//!   operation, and a record that changed after the agent was asked is left to the next round
//!   (the agent's answer may predate it);
//! - a record in a transition (`creating`, `pausing`, `resuming`) is settled only once it has
//!   been in it longer than the grace period, which is longer than the slowest agent call, so
//!   another control plane's operation in flight is not overtaken.
//!
//! A VM without a record is killed, but a VM whose record is `creating` has a record: the
//! record is written before the agent is asked, and the agent is listed before the records are
//! read, so a create in flight can never look like an orphan.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wrenn_agent_proto::v1 as agent;
use wrenn_core::{HostId, SandboxId, SandboxState, UnixMillis};

use crate::create::IDEMPOTENCY_TTL;
use crate::error::{ApiError, Chain};
use crate::service::{ControlPlane, now};

/// What [`ControlPlane::reconcile_host`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Records whose state was corrected (running or paused).
    pub changed: Vec<String>,
    /// Records of sandboxes the host no longer has, now killed.
    pub lost: Vec<String>,
    /// Records of creates that never made a VM (older than the grace period), removed.
    pub removed: Vec<String>,
    /// Sandboxes on the host without a live record, killed there.
    pub orphans: Vec<String>,
}

/// What happened to one record.
enum Settled {
    Unchanged,
    Changed,
    Lost,
    Removed,
    /// The record went away meanwhile (a failed create removed it).
    Gone,
}

/// Starts the periodic reconciler (every `reconcile_interval`); it stops when `shutdown` is
/// cancelled.
pub fn spawn(cp: Arc<ControlPlane>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The first round one interval from now, not at once: whoever starts the reconciler
        // has just reconciled (`wrenn up`), or has nothing in flight to settle yet, and a round
        // at once would race whatever the caller does next.
        let period = cp.config.reconcile_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            tokio::select! {
                () = cp.reconcile_all() => {}
                _ = shutdown.cancelled() => break,
            }
        }
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ControlPlane {
    /// One round of the periodic reconciler: every registered host, then the expired
    /// idempotency keys, the template builds whose heartbeat stopped, the snapshots operations
    /// left behind, and the built versions nothing names any more. Failures are logged; the next round tries again.
    pub async fn reconcile_all(&self) {
        let hosts = match self.store.list_hosts().await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %Chain(&e), "reconciler could not read the hosts");
                return;
            }
        };
        for host in &hosts {
            // A silent host would only time out; a lost one is reconciled when it is back.
            if self.host_health(host) != crate::hosts::Health::Healthy {
                continue;
            }
            match self.reconcile_host(host.id.as_str()).await {
                Ok(done) if done != Reconciled::default() => tracing::info!(
                    host_id = %host.id,
                    changed = done.changed.len(),
                    lost = done.lost.len(),
                    removed = done.removed.len(),
                    orphans = done.orphans.len(),
                    "sandbox records reconciled with the agent"
                ),
                Ok(_) => {}
                // An unreachable host is not the control plane's failure.
                Err(e) => {
                    tracing::warn!(host_id = %host.id, error = %Chain(&e), "reconcile host")
                }
            }
        }
        let expired = UnixMillis(now().0.saturating_sub(millis(IDEMPOTENCY_TTL)));
        if let Err(e) = self.store.purge_idempotency_keys(expired).await {
            tracing::warn!(error = %Chain(&e), "purge expired idempotency keys");
        }
        if let Err(e) = self.fail_stale_builds(self.config.settle_grace).await {
            tracing::warn!(error = %Chain(&e), "fail interrupted template builds");
        }
        if let Err(e) = self.sweep_snapshots(self.config.settle_grace).await {
            tracing::warn!(error = %Chain(&e), "delete leftover snapshots");
        }
        for host in &hosts {
            if self.host_health(host) != crate::hosts::Health::Healthy {
                continue;
            }
            if let Err(e) = self.release_unused_versions(host).await {
                tracing::warn!(host_id = %host.id, error = %Chain(&e), "release unused template versions");
            }
        }
    }

    /// Brings our records of `host` in line with what its agent holds: a sandbox the agent
    /// runs or keeps paused takes that state; one the agent does not know is killed (its VM is
    /// gone), or removed if it was still being created; one the agent holds that we do not know
    /// (or think killed) is killed on the agent. Records in a transition are settled only after
    /// the configured grace period.
    pub async fn reconcile_host(&self, host_id: &str) -> Result<Reconciled, ApiError> {
        self.reconcile_host_with_grace(host_id, self.config.settle_grace)
            .await
    }

    /// [`Self::reconcile_host`] with another grace period: zero when no operation can be in
    /// flight anywhere (`wrenn up` at start, before it serves, and at stop).
    #[tracing::instrument(name = "reconcile", skip_all, fields(host_id = %host_id))]
    pub async fn reconcile_host_with_grace(
        &self,
        host_id: &str,
        grace: Duration,
    ) -> Result<Reconciled, ApiError> {
        let hid = HostId::parse(host_id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let host = self
            .store
            .get_host(&hid)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("Host \"{host_id}\" not found")))?;
        let client = self.client_for(&host)?;
        // Listed before the records are read: see the module comment.
        let listed_at = now();
        let listed = client
            .list(agent::ListRequest {})
            .await
            .map_err(|e| ApiError::agent(format!("list sandboxes of host {hid}"), e))?;
        let mut on_agent: HashMap<String, agent::SandboxState> = listed
            .sandboxes
            .iter()
            .map(|s| {
                let st = agent::SandboxState::try_from(s.state)
                    .unwrap_or(agent::SandboxState::Unspecified);
                (s.sandbox_id.clone(), st)
            })
            .collect();
        let mut done = Reconciled::default();
        for rec in self.store.live_on_host(&hid).await? {
            let id = rec.id.to_string();
            let there = on_agent.remove(&id);
            match self.settle(&rec.id, there, listed_at, grace).await? {
                Settled::Unchanged => {}
                Settled::Changed => done.changed.push(id),
                Settled::Lost => done.lost.push(id),
                Settled::Removed => done.removed.push(id),
                Settled::Gone => {
                    if let Some(st) = there {
                        on_agent.insert(id, st);
                    }
                }
            }
        }
        for id in on_agent.into_keys() {
            tracing::warn!(sandbox_id = %id, host_id = %hid, "sandbox on the host without a record; killing it");
            if let Err(e) = client
                .kill(agent::KillRequest {
                    sandbox_id: id.clone(),
                })
                .await
            {
                tracing::warn!(sandbox_id = %id, error = %Chain(&e), "kill a sandbox without a record");
            }
            done.orphans.push(id);
        }
        Ok(done)
    }

    /// Settles one record from what the agent reported (`None`: not on the agent).
    #[tracing::instrument(name = "settle", skip_all, fields(sandbox_id = %id))]
    async fn settle(
        &self,
        id: &SandboxId,
        on_agent: Option<agent::SandboxState>,
        listed_at: UnixMillis,
        grace: Duration,
    ) -> Result<Settled, ApiError> {
        // An operation of this process holds it and settles the record itself.
        let Some(_guard) = self.try_lock(id) else {
            return Ok(Settled::Unchanged);
        };
        let Some(rec) = self.store.get_sandbox(id.as_str()).await? else {
            return Ok(Settled::Gone);
        };
        if rec.state == SandboxState::Killed || rec.updated_at >= listed_at {
            return Ok(Settled::Unchanged);
        }
        let in_transition = matches!(
            rec.state,
            SandboxState::Creating | SandboxState::Pausing | SandboxState::Resuming
        );
        if in_transition && now().0.saturating_sub(rec.updated_at.0) < millis(grace) {
            return Ok(Settled::Unchanged);
        }
        let want = match on_agent {
            Some(agent::SandboxState::Paused) => SandboxState::Paused,
            Some(_) => SandboxState::Running,
            None if rec.state == SandboxState::Creating => {
                // Its create never made a VM and nobody was told of it.
                if !self.store.delete_creating(id).await? {
                    return Ok(Settled::Unchanged);
                }
                tracing::info!(sandbox_id = %id, "removed the record of a create that never finished");
                return Ok(Settled::Removed);
            }
            None => SandboxState::Killed,
        };
        if rec.state == want || !self.store.transition(id, rec.state, want, now()).await? {
            return Ok(Settled::Unchanged);
        }
        tracing::info!(sandbox_id = %id, from = %rec.state, to = %want, "reconciled");
        Ok(if want == SandboxState::Killed {
            Settled::Lost
        } else {
            Settled::Changed
        })
    }
}
