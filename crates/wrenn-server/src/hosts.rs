//! Hosts on other machines: agents join with the cluster's join token, heartbeat with their
//! host's secret, and are judged by their silence. A joined host is *healthy* while its
//! heartbeats come, *unhealthy* (nothing new placed on it) once silent for
//! `host_unhealthy_after`, and *lost* once silent for `host_lost_after`: then one control plane
//! (the database decides which) writes its running sandboxes off, and the API says so. Health
//! is computed from the host's record, never stored, so replicas need not agree on anything but
//! the database. A lost host that speaks again is found: the next heartbeat clears it, and its
//! records are reconciled at once (what was written off is killed on it, paused sandboxes are
//! kept).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wrenn_api::{Heartbeat, HostJoin, HostJoined, HostStatus, HostTemplate};
use wrenn_core::{HostId, UnixMillis};

use crate::error::{ApiError, Chain};
use crate::service::{ControlPlane, now};
use crate::store::{HostRecord, TemplateRecord};
use crate::tokens;

/// What the control plane makes of a host's heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
    Lost,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Lost => "lost",
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The health of `h` at `now`: unhealthy once silent for `unhealthy`, lost once written off
/// (which the monitor does when it has been silent for the lost window). A host without
/// heartbeats (the agent inside `wrenn up`) is always healthy.
pub fn health(h: &HostRecord, now: UnixMillis, unhealthy: Duration) -> Health {
    let Some(beat) = h.heartbeat_at else {
        return Health::Healthy;
    };
    let silent = now.0.saturating_sub(beat.0);
    // Lost once written off (at most a monitor tick after the lost window), so a host reported
    // lost has its sandboxes reported lost too.
    if h.lost_at.is_some() {
        Health::Lost
    } else if silent >= millis(unhealthy) {
        Health::Unhealthy
    } else {
        Health::Healthy
    }
}

/// Starts the host monitor: every heartbeat interval, hosts silent past the lost window are
/// written off. It stops when `shutdown` is cancelled.
pub fn spawn_monitor(
    cp: Arc<ControlPlane>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cp.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            if let Err(e) = cp.write_off_silent_hosts().await {
                tracing::error!(error = %Chain(&e), "host monitor could not read the hosts");
            }
        }
    })
}

impl ControlPlane {
    /// The health of `h` now.
    pub fn host_health(&self, h: &HostRecord) -> Health {
        health(h, now(), self.config.host_unhealthy_after)
    }

    /// `POST /hosts/join`: an agent with the join token becomes host `host_id` at `url`, and
    /// gets the secret it must require on every request (and present on its heartbeats).
    pub async fn join_host(&self, token: &str, join: &HostJoin) -> Result<HostJoined, ApiError> {
        let valid = self
            .config
            .join_token
            .as_ref()
            .is_some_and(|want| tokens::constant_time_eq(want.as_bytes(), token.as_bytes()));
        if !valid {
            return Err(ApiError::Unauthorized("Invalid join token".to_owned()));
        }
        let id = HostId::parse(&join.host_id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if !(join.url.starts_with("http://") || join.url.starts_with("https://")) {
            return Err(ApiError::BadRequest(format!(
                "the agent's URL {:?} is not http:// or https://",
                join.url
            )));
        }
        self.store.join_host(&id, &join.url, now()).await?;
        tracing::info!(host_id = %id, url = %join.url, "host joined");
        Ok(HostJoined {
            secret: self.agent_secret(&id),
            host_id: id.to_string(),
            heartbeat_interval_ms: u64::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
        })
    }

    /// `POST /hosts/{id}/heartbeat`, authenticated with the host's secret: records what it has
    /// and registers the host templates it holds that the control plane does not know yet.
    pub async fn host_heartbeat(
        self: &Arc<Self>,
        id: &str,
        bearer: &str,
        hb: &Heartbeat,
    ) -> Result<(), ApiError> {
        let unknown = || ApiError::Unauthorized("Invalid host secret".to_owned());
        let id = HostId::parse(id).map_err(|_| unknown())?;
        let want = self.agent_secret(&id);
        if !tokens::constant_time_eq(want.as_bytes(), bearer.as_bytes()) {
            return Err(unknown());
        }
        let outcome = self
            .store
            .heartbeat(&id, hb, now())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("host {id} has not joined")))?;
        for t in &hb.templates {
            self.register_host_template(t).await?;
        }
        if hb.stopping {
            // The agent pauses its sandboxes before it stops and asks again after: the records
            // follow it now, while it still answers, so none is written off as lost later.
            match self.reconcile_host(id.as_str()).await {
                Ok(done) => {
                    tracing::info!(host_id = %id, changed = done.changed.len(), "host stopping; records reconciled")
                }
                Err(e) => {
                    tracing::warn!(host_id = %id, error = %Chain(&e), "reconcile a stopping host")
                }
            }
            return Ok(());
        }
        if let Some(lost_at) = outcome.was_lost {
            tracing::warn!(host_id = %id, lost_at = lost_at.0, "a lost host is back; reconciling it");
            let cp = self.clone();
            tokio::spawn(async move {
                match cp.reconcile_host(id.as_str()).await {
                    Ok(done) => tracing::info!(
                        host_id = %id,
                        killed = done.orphans.len(),
                        changed = done.changed.len(),
                        "reconciled a host that was lost"
                    ),
                    Err(e) => {
                        tracing::warn!(host_id = %id, error = %Chain(&e), "reconcile a host that was lost")
                    }
                }
            });
        }
        Ok(())
    }

    /// Registers host template `t` unless a template of its ID is known.
    async fn register_host_template(&self, t: &HostTemplate) -> Result<(), ApiError> {
        if self.store.find_template(&t.id).await?.is_some() {
            return Ok(());
        }
        self.register_template(&TemplateRecord {
            id: t.id.clone(),
            team_id: None,
            envd_version: t.envd_version.clone(),
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
            name: None,
            build: None,
        })
        .await
    }

    /// Writes off every host silent past the lost window (once, whichever replica gets there
    /// first): its running sandboxes are killed in the records, with the time they were lost.
    pub async fn write_off_silent_hosts(&self) -> Result<usize, ApiError> {
        let t = now();
        let silent_since = UnixMillis(t.0.saturating_sub(millis(self.config.host_lost_after)));
        let mut lost = 0;
        for h in self.store.list_hosts().await? {
            let silent = h.heartbeat_at.is_some_and(|b| b.0 < silent_since.0);
            if !silent || h.lost_at.is_some() {
                continue;
            }
            if let Some(ids) = self.store.write_off_host(&h.id, silent_since, t).await? {
                lost += 1;
                tracing::error!(
                    host_id = %h.id,
                    sandboxes = ids.len(),
                    "host lost: no heartbeat; its running sandboxes are written off"
                );
                for id in ids {
                    tracing::warn!(sandbox_id = %id, host_id = %h.id, "sandbox lost with its host");
                }
            }
        }
        Ok(lost)
    }

    /// `GET /admin/hosts`.
    pub async fn host_statuses(&self) -> Result<Vec<HostStatus>, ApiError> {
        let usage = self.store.host_usage().await?;
        Ok(self
            .store
            .list_hosts()
            .await?
            .into_iter()
            .map(|h| HostStatus {
                health: self.host_health(&h).as_str().to_owned(),
                sandboxes: usage.get(h.id.as_str()).map_or(0, |u| u.sandboxes),
                id: h.id.to_string(),
                url: h.rpc_url,
                schedulable: h.schedulable,
                vcpus: h.vcpus,
                memory_mb: h.memory_mb,
                templates: h.templates.unwrap_or_default(),
                heartbeat_at: h.heartbeat_at.map(|t| t.0),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(beat: Option<i64>, lost: Option<i64>) -> HostRecord {
        HostRecord {
            id: HostId::parse("h1").unwrap(),
            rpc_url: "http://127.0.0.1:5000".into(),
            proxy_url: "http://127.0.0.1:5000".into(),
            vcpus: 8,
            memory_mb: 1024,
            max_sandboxes: 0,
            version: String::new(),
            schedulable: true,
            heartbeat_at: beat.map(UnixMillis),
            lost_at: lost.map(UnixMillis),
            templates: None,
        }
    }

    #[test]
    fn health_follows_the_silence() {
        let u = Duration::from_secs(15);
        let at = |ms| UnixMillis(ms);
        assert_eq!(health(&host(None, None), at(1 << 40), u), Health::Healthy);
        assert_eq!(health(&host(Some(0), None), at(14_999), u), Health::Healthy);
        assert_eq!(
            health(&host(Some(0), None), at(15_000), u),
            Health::Unhealthy
        );
        // Silent for long, but lost only once written off (with its sandboxes).
        assert_eq!(
            health(&host(Some(0), None), at(600_000), u),
            Health::Unhealthy
        );
        assert_eq!(health(&host(Some(0), Some(1)), at(1), u), Health::Lost);
    }
}
