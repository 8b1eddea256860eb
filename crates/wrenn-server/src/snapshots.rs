//! Snapshots of sandboxes: taking one (`POST /sandboxes/{id}/snapshots`), listing them
//! (`GET /snapshots`), using one as a template (creates name it in `templateID`), deleting one
//! (`DELETE /templates/{id}`, as the SDKs do), and the sweep of leftovers.
//!
//! A snapshot is the source's memory, processes and disk, kept by the host that took it: the
//! agent pauses a running source for the capture and resumes it with the same ID, token and
//! deadlines, so the record of the source does not change (its lock is held meanwhile). The
//! snapshot's record is written before the agent is asked, which takes its name atomically
//! (unique per team) and leaves nothing the agent may have made unknown here.
//!
//! Names as the SDKs see them: a snapshot's `snapshotID` is `<id>:default`, or
//! `<team>/<name>:default` when it has a name (E2B's form: a template name with its namespace
//! and tag; there is one version per snapshot, so the tag is always `default`), and `names`
//! holds the latter. Any of `<id>`, `<name>`, with or without the tag and the team's own
//! namespace, refers to it.

use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use wrenn_agent_proto::v1 as agent;
use wrenn_api::{NewSnapshot, SnapshotInfo};
use wrenn_core::{SandboxId, SandboxState, SnapshotId, TeamId, UnixMillis};

use crate::agents::AgentClient;
use crate::create::{Launch, outcome_unknown};
use crate::error::{ApiError, Chain};
use crate::service::{ControlPlane, decode_cursor, encode_cursor, now, random_id};
use crate::store::{Cursor, SandboxRecord, SnapshotRecord, TeamRecord};

/// The one tag of every snapshot.
const TAG: &str = "default";

/// The longest reference to a snapshot: a team ID and a name (64 characters each at most),
/// with the separator and the tag.
const MAX_REF_LEN: usize = 64 + 1 + 64 + 1 + TAG.len();

/// How long a fork's own snapshot may live before the sweep deletes it: longer than any fork
/// (its capture, then up to 20 creates), so another control plane's fork still making its
/// children is never overtaken.
const FORK_SNAPSHOT_GRACE: Duration = Duration::from_secs(3600);

/// How a reference names a snapshot, once its tag and namespace are checked and removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotRef<'a> {
    /// Bare: an ID, else a name.
    IdOrName(&'a str),
    /// With the team's namespace: a name.
    Name(&'a str),
}

/// What `raw` refers to for `team`; `None` when it cannot be one of its snapshots (another
/// tag, another namespace).
fn parse_ref<'a>(team: &TeamId, raw: &'a str) -> Option<SnapshotRef<'a>> {
    if raw.len() > MAX_REF_LEN {
        return None;
    }
    let bare = match raw.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (tag == TAG).then_some(name)?,
        _ => raw,
    };
    match bare.split_once('/') {
        Some((ns, name)) => (ns == team.as_str() && !name.is_empty() && !name.contains('/'))
            .then_some(SnapshotRef::Name(name)),
        None => (!bare.is_empty()).then_some(SnapshotRef::IdOrName(bare)),
    }
}

/// The name a new snapshot is given as, checked: letters, digits, `-`, `_` and `.`, with or
/// without the team's namespace and the `default` tag.
fn snapshot_name(team: &TeamId, raw: &str) -> Result<String, ApiError> {
    let bad = |why: String| {
        ApiError::BadRequest(format!(
            "Invalid snapshot name {raw:?}: {why}; use letters, digits, '-', '_' and '.' \
             (snapshots have one version: no tag other than '{TAG}')"
        ))
    };
    let name = match parse_ref(team, raw) {
        Some(SnapshotRef::IdOrName(n) | SnapshotRef::Name(n)) => n,
        None => return Err(bad("another namespace or tag".to_owned())),
    };
    SnapshotId::parse(name).map_err(|e| bad(e.to_string()))?;
    Ok(name.to_owned())
}

/// What the SDKs get for a snapshot.
fn snapshot_info(s: &SnapshotRecord) -> SnapshotInfo {
    match &s.name {
        Some(name) => {
            let full = format!("{}/{name}:{TAG}", s.team_id);
            SnapshotInfo {
                snapshot_id: full.clone(),
                names: vec![full],
            }
        }
        None => SnapshotInfo {
            snapshot_id: format!("{}:{TAG}", s.id),
            names: Vec::new(),
        },
    }
}

impl Launch {
    /// A sandbox from snapshot `s`, on its host, its record naming `template_id` as its
    /// template (the snapshot's ID for a create; a fork's children name their source's).
    pub(crate) fn snapshot(s: &SnapshotRecord, template_id: String) -> Launch {
        Launch {
            template_id,
            on_host: s.template_id.clone(),
            snapshot_id: Some(s.id.clone()),
            host: Some(s.host_id.clone()),
            vcpus: s.vcpus,
            memory_mb: s.memory_mb,
            disk_size_mb: s.disk_size_mb,
            envd_version: s.envd_version.clone(),
        }
    }
}

impl ControlPlane {
    /// `POST /sandboxes/{id}/snapshots`: a snapshot of a running or paused sandbox, which
    /// stays as it was.
    #[tracing::instrument(name = "snapshot", skip_all, fields(sandbox_id = %id))]
    pub async fn snapshot(
        &self,
        team: &TeamRecord,
        id: &str,
        body: NewSnapshot,
    ) -> Result<SnapshotInfo, ApiError> {
        if body.memory == Some(false) {
            return Err(ApiError::BadRequest(
                "Filesystem-only snapshots are not supported by this server: omit memory or \
                 set it to true"
                    .to_owned(),
            ));
        }
        let name = body
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .map(|n| snapshot_name(&team.id, n))
            .transpose()?;
        let rec = self.team_sandbox(&team.id, id).await?;
        let _guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        // Refused before the sandbox is paused for nothing; the insert checks it again.
        if let Some(n) = &name
            && self.store.snapshot_named(&team.id, n).await?.is_some()
        {
            return Err(name_taken(n));
        }
        let (snap, _snap_guard) = self.capture(&rec, name, false).await?;
        Ok(snapshot_info(&snap))
    }

    /// Takes a snapshot of `rec`, whose lock the caller holds: the record first, then the
    /// agent, then the record ready with what the agent holds. Returned with the snapshot's
    /// lock, so the sweep leaves it alone while the caller still uses it.
    pub(crate) async fn capture(
        &self,
        rec: &SandboxRecord,
        name: Option<String>,
        internal: bool,
    ) -> Result<(SnapshotRecord, OwnedMutexGuard<()>), ApiError> {
        if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            return Err(ApiError::Conflict(format!(
                "Sandbox \"{}\" is being paused or resumed, try again",
                rec.id
            )));
        }
        let (host, client) = self.host_of(rec).await?;
        let mut snap = SnapshotRecord {
            id: random_id(),
            team_id: rec.team_id.clone(),
            name,
            sandbox_id: rec.id.to_string(),
            host_id: host.id.clone(),
            ready: false,
            internal,
            template_id: rec.template_id.clone(),
            vcpus: rec.vcpus,
            memory_mb: rec.memory_mb,
            disk_size_mb: rec.disk_size_mb,
            disk_bytes: 0,
            memory_bytes: 0,
            parent_snapshot_id: None,
            envd_version: rec.envd_version.clone(),
            created_at: now(),
        };
        let guard = self.lock_snapshot(&snap.id).await;
        if !self.store.insert_snapshot(&snap).await? {
            return Err(name_taken(snap.name.as_deref().unwrap_or(&snap.id)));
        }
        let taken = client
            .snapshot(agent::SnapshotRequest {
                sandbox_id: rec.id.to_string(),
                snapshot_id: snap.id.clone(),
            })
            .await;
        let taken = match taken {
            Ok(t) => t,
            Err(e) => {
                self.forget_snapshot(&snap, client.as_ref(), outcome_unknown(&e))
                    .await;
                return Err(ApiError::agent("snapshot sandbox", e));
            }
        };
        // What the agent left out (zero, empty) stays the source's.
        snap.ready = true;
        if !taken.template_id.is_empty() {
            snap.template_id = taken.template_id;
        }
        if taken.vcpus > 0 && taken.memory_mb > 0 {
            (snap.vcpus, snap.memory_mb) = (taken.vcpus, taken.memory_mb);
        }
        if !taken.envd_version.is_empty() {
            snap.envd_version = taken.envd_version;
        }
        snap.disk_bytes = taken.disk_bytes;
        snap.memory_bytes = taken.memory_bytes;
        snap.parent_snapshot_id = Some(taken.parent_snapshot_id).filter(|p| !p.is_empty());
        // If this fails, the record stays unready and the sweep deletes the agent's snapshot.
        self.store.finish_snapshot(&snap).await?;
        tracing::info!(
            sandbox_id = %rec.id,
            snapshot_id = %snap.id,
            internal,
            paused_ms = taken.paused_ms,
            disk_bytes = snap.disk_bytes,
            memory_bytes = snap.memory_bytes,
            "snapshot taken"
        );
        Ok((snap, guard))
    }

    /// Removes the record of a snapshot the agent did not make. If its outcome is unknown the
    /// agent deletes it first; when that fails too, the record stays for the sweep.
    async fn forget_snapshot(
        &self,
        snap: &SnapshotRecord,
        client: &dyn AgentClient,
        unknown: bool,
    ) {
        if unknown
            && let Err(e) = client
                .delete_snapshot(agent::DeleteSnapshotRequest {
                    snapshot_id: snap.id.clone(),
                })
                .await
        {
            tracing::warn!(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id, error = %Chain(&e), "delete a snapshot whose capture failed");
            return;
        }
        if let Err(e) = self.store.delete_snapshot(&snap.id).await {
            tracing::warn!(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id, error = %Chain(&e), "remove the record of a failed snapshot");
        }
    }

    /// The team's snapshot that `raw` (a create's `templateID`, a deleted template's ID)
    /// refers to, if any.
    pub(crate) async fn resolve_snapshot(
        &self,
        team: &TeamId,
        raw: &str,
    ) -> Result<Option<SnapshotRecord>, ApiError> {
        let found = match parse_ref(team, raw) {
            None => None,
            Some(SnapshotRef::Name(name)) => self.store.snapshot_named(team, name).await?,
            Some(SnapshotRef::IdOrName(s)) => match self.store.get_snapshot(s).await? {
                Some(snap) if snap.team_id == *team => Some(snap),
                _ => self.store.snapshot_named(team, s).await?,
            },
        };
        Ok(found.filter(|s| s.team_id == *team && s.listed()))
    }

    /// `GET /snapshots`: a page of the team's snapshots, newest first, and the token of the
    /// next page. An unknown sandbox or name is an empty page, not an error.
    pub async fn list_snapshots(
        &self,
        team: &TeamRecord,
        sandbox_id: Option<&str>,
        name: Option<&str>,
        next_token: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SnapshotInfo>, Option<String>), ApiError> {
        let after = next_token.map(decode_cursor).transpose()?;
        // The legacy `<id>-<clientID>` form names the sandbox too.
        let sandbox_id = match sandbox_id.map(SandboxId::parse) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => return Ok((Vec::new(), None)),
        };
        let name = match name.map(|n| parse_ref(&team.id, n)) {
            None => None,
            Some(Some(SnapshotRef::IdOrName(n) | SnapshotRef::Name(n))) => Some(n),
            Some(None) => return Ok((Vec::new(), None)),
        };
        let (page, more) = self
            .store
            .list_snapshots(
                &team.id,
                sandbox_id.as_ref().map(SandboxId::as_str),
                name,
                after.as_ref(),
                limit,
            )
            .await?;
        let next = page.last().filter(|_| more).map(|s| {
            encode_cursor(&Cursor {
                time: s.created_at.0,
                id: s.id.clone(),
            })
        });
        Ok((page.iter().map(snapshot_info).collect(), next))
    }

    /// `DELETE /templates/{id}`, which the SDKs also delete snapshots with: the team's own
    /// template of that ID or name, else the team's snapshot `id` refers to, else the
    /// template answers (403 for another team's, 404).
    pub async fn delete_template_or_snapshot(
        &self,
        team: &TeamRecord,
        id: &str,
    ) -> Result<(), ApiError> {
        let own_template = self
            .store
            .find_template(id)
            .await?
            .is_some_and(|t| t.team_id.as_ref() == Some(&team.id));
        if !own_template && let Some(snap) = self.resolve_snapshot(&team.id, id).await? {
            return self.delete_snapshot(snap).await;
        }
        self.delete_template(team, id).await
    }

    /// Deletes a snapshot: no more creates from it (its host removes its files once nothing
    /// is layered on it), and its record. Sandboxes made from it keep running and resumable.
    #[tracing::instrument(
        name = "delete_snapshot",
        skip_all,
        fields(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id)
    )]
    async fn delete_snapshot(&self, snap: SnapshotRecord) -> Result<(), ApiError> {
        let _guard = self.lock_snapshot(&snap.id).await;
        // Deleted meanwhile: this request finds nothing, as a later one would.
        if self.store.get_snapshot(&snap.id).await?.is_none() {
            return Err(ApiError::NotFound(format!(
                "Snapshot '{}' not found",
                snapshot_info(&snap).snapshot_id
            )));
        }
        self.drop_snapshot(&snap).await?;
        tracing::info!(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id, "snapshot deleted");
        Ok(())
    }

    /// Deletes snapshot `snap` on its host, then its record; its lock is the caller's. A host
    /// no longer registered has nothing to delete.
    pub(crate) async fn drop_snapshot(&self, snap: &SnapshotRecord) -> Result<(), ApiError> {
        match self.store.get_host(&snap.host_id).await? {
            Some(host) => {
                let known = self
                    .client_for(&host)?
                    .delete_snapshot(agent::DeleteSnapshotRequest {
                        snapshot_id: snap.id.clone(),
                    })
                    .await
                    .map_err(|e| ApiError::agent("delete snapshot", e))?
                    .known;
                if !known && snap.ready {
                    tracing::warn!(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id, host_id = %host.id, "the host did not have the snapshot");
                }
            }
            None => {
                tracing::warn!(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id, host_id = %snap.host_id, "the snapshot's host is not registered");
            }
        }
        self.store.delete_snapshot(&snap.id).await?;
        Ok(())
    }

    /// Deletes what operations left behind (a reconcile round): snapshots whose capture never
    /// got its answer (older than `grace`, longer than the agent call), and forks' own
    /// snapshots that their fork did not delete. How many.
    pub(crate) async fn sweep_snapshots(&self, grace: Duration) -> Result<usize, ApiError> {
        let before = |d: Duration| {
            UnixMillis(
                now()
                    .0
                    .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            )
        };
        let leftovers = self
            .store
            .leftover_snapshots(before(grace), before(FORK_SNAPSHOT_GRACE.max(grace)))
            .await?;
        let mut swept = 0;
        for snap in leftovers {
            // An operation of this process still holds it.
            let Some(_guard) = self.try_lock_snapshot(&snap.id) else {
                continue;
            };
            match self.drop_snapshot(&snap).await {
                Ok(()) => {
                    tracing::info!(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id, "deleted a leftover snapshot");
                    swept += 1;
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %snap.sandbox_id, snapshot_id = %snap.id, error = %Chain(&e), "delete a leftover snapshot")
                }
            }
        }
        Ok(swept)
    }
}

fn name_taken(name: &str) -> ApiError {
    ApiError::Conflict(format!("A snapshot named '{name}' already exists"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_lose_their_tag_and_own_namespace() {
        let team = TeamId::parse("t1").unwrap();
        let cases: &[(&str, Option<SnapshotRef<'_>>)] = &[
            ("abc", Some(SnapshotRef::IdOrName("abc"))),
            ("abc:default", Some(SnapshotRef::IdOrName("abc"))),
            ("t1/snap", Some(SnapshotRef::Name("snap"))),
            ("t1/snap:default", Some(SnapshotRef::Name("snap"))),
            ("abc:v2", None),
            ("abc:", None),
            ("t2/snap:default", None),
            ("t1/a/b", None),
            ("t1/", None),
            (":default", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_ref(&team, raw), *want, "{raw}");
        }
    }

    #[test]
    fn names_are_checked_and_answered_with_namespace_and_tag() {
        let team = TeamId::parse("t1").unwrap();
        assert_eq!(snapshot_name(&team, "my-snap").unwrap(), "my-snap");
        assert_eq!(
            snapshot_name(&team, "t1/my-snap:default").unwrap(),
            "my-snap"
        );
        for bad in ["a b", "x:v2", "t2/x", "a/b/c", "é"] {
            assert!(snapshot_name(&team, bad).is_err(), "{bad}");
        }
        let mut s = SnapshotRecord {
            id: "abc".into(),
            team_id: team.clone(),
            name: None,
            sandbox_id: "sbx".into(),
            host_id: wrenn_core::HostId::parse("h1").unwrap(),
            ready: true,
            internal: false,
            template_id: "base".into(),
            vcpus: 1,
            memory_mb: 128,
            disk_size_mb: 512,
            disk_bytes: 0,
            memory_bytes: 0,
            parent_snapshot_id: None,
            envd_version: "0.6.4".into(),
            created_at: UnixMillis(0),
        };
        assert_eq!(
            snapshot_info(&s),
            SnapshotInfo {
                snapshot_id: "abc:default".into(),
                names: vec![],
            }
        );
        s.name = Some("snap".into());
        assert_eq!(
            snapshot_info(&s),
            SnapshotInfo {
                snapshot_id: "t1/snap:default".into(),
                names: vec!["t1/snap:default".into()],
            }
        );
        // What it answers refers back to it.
        assert_eq!(
            parse_ref(&team, "t1/snap:default"),
            Some(SnapshotRef::Name("snap"))
        );
    }
}
