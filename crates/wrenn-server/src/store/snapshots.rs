//! Snapshots of sandboxes: what the host that took each holds, its name, and whether the
//! agent has answered for it yet.
//!
//! A snapshot's record is written (not ready) before its agent is asked, with its name, so a
//! name is taken atomically (the unique index) before any VM is paused, and a snapshot the
//! agent may have made is never unknown here: a record that never became ready is deleted on
//! the agent and removed by the control plane's sweep. Only ready snapshots that are not a
//! fork's own are listed or used by name.

use sqlx::Row;
use sqlx::any::AnyRow;
use wrenn_core::{HostId, TeamId, UnixMillis};

use super::{Cursor, Result, Store, parse_id, to_i64, u32_col, u64_col};

const SNAPSHOT_COLUMNS: &str = "id, team_id, name, sandbox_id, host_id, ready, internal, \
    template_id, vcpus, memory_mb, disk_size_mb, disk_bytes, memory_bytes, parent_snapshot_id, \
    envd_version, created_at";

/// What a listed snapshot is: ready and not a fork's own.
const LISTED: &str = "ready = 1 AND internal = 0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Its ID on the agent too.
    pub id: String,
    pub team_id: TeamId,
    /// `None`: unnamed. Unique per team.
    pub name: Option<String>,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// The host holding its files.
    pub host_id: HostId,
    /// The agent answered for it (before that, the other fields below are the source's).
    pub ready: bool,
    /// A fork's own snapshot: never listed, deleted once the fork made its children.
    pub internal: bool,
    /// The host's template its memory is layered on.
    pub template_id: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    pub parent_snapshot_id: Option<String>,
    pub envd_version: String,
    pub created_at: UnixMillis,
}

impl SnapshotRecord {
    /// Whether the team sees it (lists it, creates from it, deletes it).
    pub fn listed(&self) -> bool {
        self.ready && !self.internal
    }
}

fn snapshot_from_row(r: &AnyRow) -> Result<SnapshotRecord> {
    let id: String = r.try_get("id")?;
    Ok(SnapshotRecord {
        team_id: parse_id(
            "snapshots",
            &id,
            &r.try_get::<String, _>("team_id")?,
            TeamId::parse,
        )?,
        name: r.try_get("name")?,
        sandbox_id: r.try_get("sandbox_id")?,
        host_id: parse_id(
            "snapshots",
            &id,
            &r.try_get::<String, _>("host_id")?,
            HostId::parse,
        )?,
        ready: r.try_get::<i64, _>("ready")? != 0,
        internal: r.try_get::<i64, _>("internal")? != 0,
        template_id: r.try_get("template_id")?,
        vcpus: u32_col(r, "vcpus")?,
        memory_mb: u64_col(r, "memory_mb")?,
        disk_size_mb: u64_col(r, "disk_size_mb")?,
        disk_bytes: u64_col(r, "disk_bytes")?,
        memory_bytes: u64_col(r, "memory_bytes")?,
        parent_snapshot_id: r.try_get("parent_snapshot_id")?,
        envd_version: r.try_get("envd_version")?,
        created_at: UnixMillis(r.try_get("created_at")?),
        id,
    })
}

impl Store {
    /// Writes a new snapshot's record; `false` if the team already has a snapshot of that name
    /// (or, never in practice, that ID).
    pub async fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<bool> {
        let done = sqlx::query(&format!(
            "INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
             ON CONFLICT DO NOTHING"
        ))
        .bind(&s.id)
        .bind(s.team_id.as_str())
        .bind(&s.name)
        .bind(&s.sandbox_id)
        .bind(s.host_id.as_str())
        .bind(i64::from(s.ready))
        .bind(i64::from(s.internal))
        .bind(&s.template_id)
        .bind(i64::from(s.vcpus))
        .bind(to_i64(s.memory_mb))
        .bind(to_i64(s.disk_size_mb))
        .bind(to_i64(s.disk_bytes))
        .bind(to_i64(s.memory_bytes))
        .bind(&s.parent_snapshot_id)
        .bind(&s.envd_version)
        .bind(s.created_at.0)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The agent made snapshot `s.id`: what it holds, and ready. `false` if its record is gone
    /// or was ready already.
    pub async fn finish_snapshot(&self, s: &SnapshotRecord) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE snapshots SET ready = 1, template_id = $2, vcpus = $3, memory_mb = $4, \
             disk_bytes = $5, memory_bytes = $6, parent_snapshot_id = $7, envd_version = $8 \
             WHERE id = $1 AND ready = 0",
        )
        .bind(&s.id)
        .bind(&s.template_id)
        .bind(i64::from(s.vcpus))
        .bind(to_i64(s.memory_mb))
        .bind(to_i64(s.disk_bytes))
        .bind(to_i64(s.memory_bytes))
        .bind(&s.parent_snapshot_id)
        .bind(&s.envd_version)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A snapshot by ID, of any team and state.
    pub async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(snapshot_from_row).transpose()
    }

    /// The team's snapshot called `name`, in any state.
    pub async fn snapshot_named(
        &self,
        team: &TeamId,
        name: &str,
    ) -> Result<Option<SnapshotRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE team_id = $1 AND name = $2"
        ))
        .bind(team.as_str())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(snapshot_from_row).transpose()
    }

    /// Whether a team other than `team` has a snapshot (in any state) whose ID or name is one
    /// of `refs`.
    pub async fn snapshot_known_elsewhere(&self, team: &TeamId, refs: &[&str]) -> Result<bool> {
        for r in refs {
            let row = sqlx::query(
                "SELECT id FROM snapshots WHERE team_id <> $1 AND (id = $2 OR name = $2) LIMIT 1",
            )
            .bind(team.as_str())
            .bind(*r)
            .fetch_optional(&self.pool)
            .await?;
            if row.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes a snapshot's record; `false` if there was none.
    pub async fn delete_snapshot(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM snapshots WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One page of a team's listed snapshots (newest first), and whether more follow;
    /// `sandbox_id` and `name` narrow it when given.
    pub async fn list_snapshots(
        &self,
        team: &TeamId,
        sandbox_id: Option<&str>,
        name: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<(Vec<SnapshotRecord>, bool)> {
        let rows = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots \
             WHERE team_id = $1 AND {LISTED} AND ($2 = '' OR sandbox_id = $2) \
             AND ($3 = '' OR name = $3) \
             AND ($4 = 0 OR created_at < $5 OR (created_at = $5 AND id < $6)) \
             ORDER BY created_at DESC, id DESC LIMIT $7"
        ))
        .bind(team.as_str())
        .bind(sandbox_id.unwrap_or(""))
        .bind(name.unwrap_or(""))
        .bind(i64::from(after.is_some()))
        .bind(after.map_or(0, |c| c.time))
        .bind(after.map_or("", |c| c.id.as_str()))
        .bind(to_i64(limit as u64 + 1))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .iter()
            .map(snapshot_from_row)
            .collect::<Result<Vec<_>>>()?;
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// Snapshots left over by an operation that did not finish: not ready and made before
    /// `unready_before` (a snapshot whose agent call ended without an answer), or a fork's own
    /// made before `internal_before` (a fork that did not get to delete it).
    pub async fn leftover_snapshots(
        &self,
        unready_before: UnixMillis,
        internal_before: UnixMillis,
    ) -> Result<Vec<SnapshotRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots \
             WHERE (ready = 0 AND created_at < $1) OR (internal = 1 AND created_at < $2) \
             ORDER BY created_at"
        ))
        .bind(unready_before.0)
        .bind(internal_before.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(snapshot_from_row).collect()
    }
}
