//! Hosts: registration (the agent inside `wrenn up`, or `POST /admin/hosts`), the joins and
//! heartbeats of agents on other machines, and writing off the sandboxes of a host that went
//! silent. Health itself (healthy, unhealthy, lost) is computed from these columns by
//! `crate::hosts`, never stored, so every replica agrees without telling each other.

use sqlx::Row;
use sqlx::any::AnyRow;
use wrenn_api::Heartbeat;
use wrenn_core::{HostId, SandboxId, UnixMillis};

use super::{Backend, OCCUPYING, Result, Store, parse_id, to_i64, u32_col, u64_col};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub id: HostId,
    pub rpc_url: String,
    pub proxy_url: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub max_sandboxes: u32,
    pub version: String,
    pub schedulable: bool,
    /// Its last heartbeat; `None` for a host that does not send them (the agent inside
    /// `wrenn up`, or one registered by `POST /admin/hosts`), which is always healthy.
    pub heartbeat_at: Option<UnixMillis>,
    /// When its running sandboxes were written off; cleared by its next heartbeat.
    pub lost_at: Option<UnixMillis>,
    /// The template IDs it holds; `None`: every host template (the agent inside `wrenn up`).
    pub templates: Option<Vec<String>>,
}

impl HostRecord {
    /// Whether the host holds host template `id` (built templates and snapshots are placed by
    /// the host their record names instead).
    pub fn holds(&self, template: &str) -> bool {
        self.templates
            .as_ref()
            .is_none_or(|t| t.iter().any(|id| id == template))
    }
}

const HOST_COLUMNS: &str = "id, rpc_url, proxy_url, vcpus, memory_mb, max_sandboxes, version, \
    schedulable, heartbeat_at, lost_at, templates";

impl Store {
    /// Registers a host, or updates its address and capacity (heartbeat columns untouched).
    pub async fn upsert_host(&self, h: &HostRecord, now: UnixMillis) -> Result<()> {
        sqlx::query(
            "INSERT INTO hosts (id, rpc_url, proxy_url, vcpus, memory_mb, max_sandboxes, version, schedulable, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (id) DO UPDATE SET rpc_url = excluded.rpc_url, proxy_url = excluded.proxy_url, \
             vcpus = excluded.vcpus, memory_mb = excluded.memory_mb, max_sandboxes = excluded.max_sandboxes, \
             version = excluded.version, schedulable = excluded.schedulable, updated_at = excluded.updated_at",
        )
        .bind(h.id.as_str())
        .bind(&h.rpc_url)
        .bind(&h.proxy_url)
        .bind(i64::from(h.vcpus))
        .bind(to_i64(h.memory_mb))
        .bind(i64::from(h.max_sandboxes))
        .bind(&h.version)
        .bind(i64::from(h.schedulable))
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A host joining over the network at `url`: known from now on and judged by its silence
    /// from now (the join counts as its first sign of life), but placed on only after its first
    /// heartbeat has said what it has (until then it offers nothing). A host that joins again
    /// (restarted, or at a new address) keeps its record, sandboxes and health.
    pub async fn join_host(&self, id: &HostId, url: &str, now: UnixMillis) -> Result<()> {
        sqlx::query(
            "INSERT INTO hosts (id, rpc_url, proxy_url, vcpus, memory_mb, max_sandboxes, version, schedulable, updated_at, templates, heartbeat_at) \
             VALUES ($1, $2, $2, 0, 0, 0, '', 0, $3, '[]', $3) \
             ON CONFLICT (id) DO UPDATE SET rpc_url = excluded.rpc_url, proxy_url = excluded.proxy_url, \
             updated_at = excluded.updated_at",
        )
        .bind(id.as_str())
        .bind(url)
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a heartbeat of a joined host: what it has now, and that it is alive (a lost host
    /// is found again). `None`: no such host (it never joined).
    pub async fn heartbeat(
        &self,
        id: &HostId,
        hb: &Heartbeat,
        now: UnixMillis,
    ) -> Result<Option<HeartbeatOutcome>> {
        let mut tx = self.pool.begin().await?;
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        let Some(row) = sqlx::query(&format!("SELECT lost_at FROM hosts WHERE id = $1{lock}"))
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let was_lost: Option<i64> = row.try_get("lost_at")?;
        let templates: Vec<&str> = hb.templates.iter().map(|t| t.id.as_str()).collect();
        sqlx::query(
            "UPDATE hosts SET vcpus = $2, memory_mb = $3, max_sandboxes = $4, version = $5, \
             schedulable = $6, templates = $7, heartbeat_at = $8, lost_at = NULL, \
             memory_available_mb = $9, disk_free_mb = $10, updated_at = $8 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(i64::from(hb.vcpus))
        .bind(to_i64(hb.memory_mb))
        .bind(i64::from(hb.max_sandboxes))
        .bind(&hb.version)
        .bind(i64::from(!hb.stopping))
        .bind(serde_json::to_string(&templates).expect("strings serialize"))
        .bind(now.0)
        .bind(to_i64(hb.memory_available_mb))
        .bind(to_i64(hb.disk_free_mb))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(HeartbeatOutcome {
            was_lost: was_lost.map(UnixMillis),
        }))
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostRecord>> {
        let rows = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(host_from_row).collect()
    }

    pub async fn get_host(&self, id: &HostId) -> Result<Option<HostRecord>> {
        let row = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(host_from_row).transpose()
    }

    /// Writes off host `id` if it is still silent (no heartbeat since `silent_since`) and not
    /// written off yet: marks it lost and every sandbox that holds or was getting a VM there
    /// killed (`lost_at` set). Paused sandboxes are only files and stay paused. Answers the
    /// sandboxes written off; `None` when the host spoke up meanwhile or another control plane
    /// wrote it off first (one transaction, so that happens once).
    pub async fn write_off_host(
        &self,
        id: &HostId,
        silent_since: UnixMillis,
        now: UnixMillis,
    ) -> Result<Option<Vec<SandboxId>>> {
        let mut tx = self.pool.begin().await?;
        let marked = sqlx::query(
            "UPDATE hosts SET lost_at = $2 WHERE id = $1 AND lost_at IS NULL \
             AND heartbeat_at IS NOT NULL AND heartbeat_at < $3",
        )
        .bind(id.as_str())
        .bind(now.0)
        .bind(silent_since.0)
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() != 1 {
            return Ok(None);
        }
        let rows = sqlx::query(&format!(
            "UPDATE sandboxes SET state = 'killed', lost_at = $2, updated_at = $2 \
             WHERE host_id = $1 AND state IN {OCCUPYING} RETURNING id"
        ))
        .bind(id.as_str())
        .bind(now.0)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get("id")?;
            ids.push(parse_id("sandboxes", &id, &id, SandboxId::parse)?);
        }
        Ok(Some(ids))
    }

    /// Sandbox `id`, being resumed, now lives on `host` (it moved there from the shared store).
    pub async fn move_resuming(&self, id: &SandboxId, host: &HostId) -> Result<bool> {
        let done =
            sqlx::query("UPDATE sandboxes SET host_id = $2 WHERE id = $1 AND state = 'resuming'")
                .bind(id.as_str())
                .bind(host.as_str())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// When sandbox `id` was written off with its host, if it was.
    pub async fn sandbox_lost_at(&self, id: &SandboxId) -> Result<Option<UnixMillis>> {
        let row = sqlx::query("SELECT lost_at FROM sandboxes WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<Option<i64>, _>("lost_at")?.map(UnixMillis),
            None => None,
        })
    }

    /// A cluster-wide setting: its stored value, or `init` stored now if it has none (the
    /// first replica to start decides; the others read it).
    pub async fn setting_or_init(&self, name: &str, init: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO cluster_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(init)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM cluster_settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatOutcome {
    /// When the host had been written off, if it had: it is back.
    pub was_lost: Option<UnixMillis>,
}

fn host_from_row(r: &AnyRow) -> Result<HostRecord> {
    let id: String = r.try_get("id")?;
    let templates: Option<String> = r.try_get("templates")?;
    let templates = match templates {
        Some(t) => Some(
            serde_json::from_str(&t).map_err(|e| super::StoreError::Corrupt {
                table: "hosts",
                id: id.clone(),
                what: format!("templates: {e}"),
            })?,
        ),
        None => None,
    };
    Ok(HostRecord {
        id: parse_id("hosts", &id, &id, HostId::parse)?,
        rpc_url: r.try_get("rpc_url")?,
        proxy_url: r.try_get("proxy_url")?,
        vcpus: u32_col(r, "vcpus")?,
        memory_mb: u64_col(r, "memory_mb")?,
        max_sandboxes: u32_col(r, "max_sandboxes")?,
        version: r.try_get("version")?,
        schedulable: r.try_get::<i64, _>("schedulable")? != 0,
        heartbeat_at: r.try_get::<Option<i64>, _>("heartbeat_at")?.map(UnixMillis),
        lost_at: r.try_get::<Option<i64>, _>("lost_at")?.map(UnixMillis),
        templates,
    })
}
