//! Persistence: the control plane's records in SQLite (default) or PostgreSQL.
//!
//! What is durable (here): teams, API-key hashes, templates (with the envd version each
//! carries), registered hosts, every sandbox record (state, host, timeout, metadata, env vars,
//! killed ones included as history), snapshots, and the idempotency keys of creates (24 hours).
//! A sandbox's record is written, `creating` and with its host, before its agent is asked for
//! the VM; a create that fails removes it again, so a record never outlives a VM that was never
//! made. A control plane can restart, or several can
//! run against one PostgreSQL database, without losing a sandbox.
//!
//! What is not stored and is rebuilt: envd access tokens (derived from the sandbox ID with the
//! server secret, see `tokens`), connections to agents, per-sandbox operation locks, and the
//! proxy's routing (read from the sandbox records on each request). The VMs themselves are the
//! agents' business; the store only says which host holds which sandbox.
//!
//! Hot queries: the sandbox by ID (every API call and every proxied request), the expired
//! running sandboxes (the reaper, every tick: index `sandboxes_state_end`), a team's list
//! (index `sandboxes_team_state`) and per-host usage (placement, also inside the conditional
//! insert of every create).
//!
//! One implementation serves both databases through sqlx's `Any` driver: the queries are the
//! same text, with `$N` placeholders (which SQLite accepts too), and the schema uses only TEXT
//! and BIGINT so both decode the same way. The cost is no compile-time query checking and no
//! native timestamp/JSON/bool columns; the gain is one set of queries and migrations, tested on
//! both backends, instead of two implementations that drift apart.
//! State changes are compare-and-set (`UPDATE ... WHERE state = $from`), so two control planes
//! (or two requests) cannot both start a pause of one sandbox. A create's record goes in only if
//! its host still has room counting every record that holds or is getting a VM there (one
//! statement; on PostgreSQL under a lock of the host's row), so concurrent creates cannot
//! overbook a host.

use std::collections::BTreeMap;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use wrenn_api::NetworkConfig;
use wrenn_core::{HostId, SandboxId, SandboxState, TeamId, UnixMillis};

mod hosts;
mod idempotency;
mod snapshots;
mod templates;

pub use hosts::{HeartbeatOutcome, HostRecord};
pub use idempotency::{IdempotencyClaim, IdempotencyRecord};
pub use snapshots::SnapshotRecord;
pub use templates::{BuildLogRecord, BuildRecord, CurrentBuild, TagRecord, TemplateEntry};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("running migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt record {table}/{id}: {what}")]
    Corrupt {
        table: &'static str,
        id: String,
        what: String,
    },
    #[error("unsupported database URL {0:?}: use sqlite://PATH, a file path, or postgres://...")]
    BadUrl(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamRecord {
    pub id: TeamId,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRecord {
    pub id: String,
    /// `None`: built in, every team's (a team's own may be shared too: [`TemplateEntry`]).
    pub team_id: Option<TeamId>,
    pub envd_version: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    /// A built template's name (its alias); `None` for host-provided templates.
    pub name: Option<String>,
    /// A built template's ready version; `None` for the others (the host knows them by ID),
    /// and for a built template whose first build is not ready yet.
    pub build: Option<CurrentBuild>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub team_id: TeamId,
    pub template_id: String,
    pub state: SandboxState,
    pub host_id: Option<HostId>,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    pub envd_version: String,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub started_at: UnixMillis,
    pub end_at: UnixMillis,
    /// At the timeout: paused (`true`) or killed.
    pub auto_pause: bool,
    /// Traffic through the edge proxy resumes it while it is paused (only with `auto_pause`).
    pub auto_resume: bool,
    /// A pause at the timeout keeps the memory (else only the disk).
    pub auto_pause_memory: bool,
    /// The pause under way or done keeps the memory (`pauseMode` `full`), or only the disk
    /// (`filesystem`: the resume boots it cold).
    pub paused_memory: bool,
    pub allow_internet_access: Option<bool>,
    /// When the record last changed (state or end); for a record in a transition, since when
    /// it has been in it.
    pub updated_at: UnixMillis,
    /// The `network` the client gave (egress lists already validated), as it reads back.
    pub network: Option<NetworkConfig>,
}

/// Resources a host has handed out, from the sandbox records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub sandboxes: u32,
}

/// Where a page of a list starts: after this `(time, id)` (a sandbox's `started_at`, a
/// snapshot's `created_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub time: i64,
    pub id: String,
}

/// A sandbox list query.
#[derive(Debug, Clone)]
pub struct SandboxFilter {
    pub team_id: TeamId,
    pub states: Vec<SandboxState>,
    pub template_id: Option<String>,
    pub started_after: Option<UnixMillis>,
    /// Every pair must match the sandbox's metadata.
    pub metadata: Vec<(String, String)>,
    pub descending: bool,
    pub after: Option<Cursor>,
    pub limit: usize,
}

const SANDBOX_COLUMNS: &str = "id, team_id, template_id, state, host_id, vcpus, memory_mb, \
    disk_size_mb, envd_version, metadata, env_vars, started_at, end_at, auto_pause, \
    allow_internet_access, updated_at, network, auto_resume, auto_pause_memory, paused_memory";

/// The states whose sandboxes hold (or are getting) a VM on their host, as SQL; the same set as
/// `SandboxState::occupies_host`.
const OCCUPYING: &str = "('creating', 'running', 'pausing', 'resuming')";

impl Store {
    /// Connects and runs the embedded migrations. `url` is `postgres://...`,
    /// `sqlite://PATH[?...]`, or a plain file path for SQLite (created if missing).
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (url, backend) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (url.to_owned(), Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            let sep = if url.contains('?') { '&' } else { '?' };
            let url = if url.contains("mode=") {
                url.to_owned()
            } else {
                format!("{url}{sep}mode=rwc")
            };
            (url, Backend::Sqlite)
        } else if url.contains("://") {
            return Err(StoreError::BadUrl(url.to_owned()));
        } else {
            (format!("sqlite://{url}?mode=rwc"), Backend::Sqlite)
        };
        let mut options = AnyPoolOptions::new();
        options = match backend {
            // One writer at a time in SQLite anyway; WAL lets readers run beside it and
            // busy_timeout makes writers wait for each other instead of failing.
            Backend::Sqlite => options.max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            }),
            Backend::Postgres => options.max_connections(16),
        };
        let pool = options.connect(&url).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // Teams and keys.

    pub async fn insert_team(&self, team: &TeamRecord, now: UnixMillis) -> Result<()> {
        sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(team.id.as_str())
            .bind(&team.name)
            .bind(now.0)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_team(&self, id: &str) -> Result<Option<TeamRecord>> {
        let row = sqlx::query("SELECT id, name FROM teams WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| team_from_row(&r)).transpose()
    }

    pub async fn insert_api_key(
        &self,
        id: &str,
        team: &TeamId,
        key_hash: &str,
        mask: &str,
        name: &str,
        now: UnixMillis,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, key_hash, mask, name, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(team.as_str())
        .bind(key_hash)
        .bind(mask)
        .bind(name)
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The team owning the key with this hash.
    pub async fn team_by_key_hash(&self, key_hash: &str) -> Result<Option<TeamRecord>> {
        let row = sqlx::query(
            "SELECT t.id, t.name FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| team_from_row(&r)).transpose()
    }

    // Templates.

    pub async fn upsert_template(&self, t: &TemplateRecord, now: UnixMillis) -> Result<()> {
        sqlx::query(
            "INSERT INTO templates (id, team_id, envd_version, vcpus, memory_mb, disk_size_mb, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET team_id = excluded.team_id, envd_version = excluded.envd_version, \
             vcpus = excluded.vcpus, memory_mb = excluded.memory_mb, disk_size_mb = excluded.disk_size_mb",
        )
        .bind(&t.id)
        .bind(t.team_id.as_ref().map(|t| t.as_str().to_owned()))
        .bind(&t.envd_version)
        .bind(i64::from(t.vcpus))
        .bind(to_i64(t.memory_mb))
        .bind(to_i64(t.disk_size_mb))
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A template the team may use: a public one or its own.
    pub async fn get_template(&self, id: &str, team: &TeamId) -> Result<Option<TemplateRecord>> {
        Ok(self
            .template_entry(id)
            .await?
            .filter(|e| e.visible_to(team))
            .map(|e| e.template))
    }

    /// A template by ID or name, whoever owns it.
    pub async fn find_template(&self, id: &str) -> Result<Option<TemplateRecord>> {
        Ok(self.template_entry(id).await?.map(|e| e.template))
    }

    /// What each host has handed out to sandboxes that hold a VM.
    pub async fn host_usage(&self) -> Result<BTreeMap<String, HostUsage>> {
        let rows = sqlx::query(&format!(
            "SELECT host_id, CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus, \
             CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) AS memory_mb, \
             COUNT(*) AS n FROM sandboxes WHERE host_id IS NOT NULL AND state IN {OCCUPYING} \
             GROUP BY host_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut out = BTreeMap::new();
        for r in rows {
            let host: String = r.try_get("host_id")?;
            // SUM over BIGINT is NUMERIC in PostgreSQL, which the Any driver cannot decode: the
            // query casts it back to BIGINT.
            out.insert(
                host,
                HostUsage {
                    vcpus: u32::try_from(r.try_get::<i64, _>("vcpus")?).unwrap_or(u32::MAX),
                    memory_mb: u64::try_from(r.try_get::<i64, _>("memory_mb")?).unwrap_or(0),
                    sandboxes: u32::try_from(r.try_get::<i64, _>("n")?).unwrap_or(u32::MAX),
                },
            );
        }
        Ok(out)
    }

    // Sandboxes.

    /// Inserts a record as it is, wherever it says it is (imports and tests; creates go through
    /// [`Store::insert_placed`]).
    pub async fn insert_sandbox(&self, s: &SandboxRecord) -> Result<()> {
        bind_sandbox(
            sqlx::query(&format!(
                "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)"
            )),
            s,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Inserts the record of a sandbox placed on `s.host_id` if that host still takes it: it is
    /// schedulable, and its sandboxes, vCPUs and memory, counting every record that holds or is
    /// getting a VM there, leave room (the rule `wrenn_core::pick_host` applies). `false`:
    /// another create took the room first.
    ///
    /// The check and the insert are one statement. SQLite runs writing statements one at a time,
    /// so that alone is atomic; PostgreSQL's READ COMMITTED lets two such statements miss each
    /// other's rows, so there the host's row is locked first (`FOR UPDATE`, until commit), and
    /// the statement, run after the lock is granted, sees every create committed before.
    pub async fn insert_placed(&self, s: &SandboxRecord) -> Result<bool> {
        let sql = format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20 \
             FROM hosts h WHERE h.id = $5 AND h.schedulable <> 0 \
             AND (h.max_sandboxes = 0 OR h.max_sandboxes > \
                  (SELECT COUNT(*) FROM sandboxes o WHERE o.host_id = h.id AND o.state IN {OCCUPYING})) \
             AND h.vcpus >= $6 + \
                  (SELECT COALESCE(SUM(o.vcpus), 0) FROM sandboxes o WHERE o.host_id = h.id AND o.state IN {OCCUPYING}) \
             AND h.memory_mb >= $7 + \
                  (SELECT COALESCE(SUM(o.memory_mb), 0) FROM sandboxes o WHERE o.host_id = h.id AND o.state IN {OCCUPYING})"
        );
        let Some(host) = &s.host_id else {
            return Ok(false);
        };
        let done = match self.backend {
            Backend::Sqlite => bind_sandbox(sqlx::query(&sql), s)
                .execute(&self.pool)
                .await?
                .rows_affected(),
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT id FROM hosts WHERE id = $1 FOR UPDATE")
                    .bind(host.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                let n = bind_sandbox(sqlx::query(&sql), s)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                n
            }
        };
        Ok(done == 1)
    }

    /// Removes the record of a create that did not happen (only while it is `creating`), with
    /// the idempotency keys that name it, so a retry with the same key creates afresh.
    pub async fn delete_creating(&self, id: &SandboxId) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM sandboxes WHERE id = $1 AND state = 'creating'")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 1 {
            sqlx::query("DELETE FROM idempotency_keys WHERE sandbox_id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// How many sandboxes are not killed (`wrenn up` refuses to make a new server secret over
    /// them: their envd tokens derive from the old one).
    pub async fn live_sandbox_count(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sandboxes WHERE state <> 'killed'")
            .fetch_one(&self.pool)
            .await?;
        u64_col(&row, "n")
    }

    /// A sandbox of any team (for the proxy and the reaper); killed ones too.
    pub async fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(sandbox_from_row).transpose()
    }

    /// Moves a sandbox from `from` to `to`; `false` if it was not in `from` (someone else
    /// changed it first).
    pub async fn transition(
        &self,
        id: &SandboxId,
        from: SandboxState,
        to: SandboxState,
        now: UnixMillis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = $1, updated_at = $2 WHERE id = $3 AND state = $4",
        )
        .bind(to.as_str())
        .bind(now.0)
        .bind(id.as_str())
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Starts a pause of a running sandbox that keeps its memory or (`memory` false) only its
    /// disk; `false`: it was not running.
    pub async fn start_pause(&self, id: &SandboxId, memory: bool, now: UnixMillis) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'pausing', paused_memory = $1, updated_at = $2 \
             WHERE id = $3 AND state = 'running'",
        )
        .bind(i64::from(memory))
        .bind(now.0)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Finishes a resume: running again with a new start and end.
    pub async fn resumed(
        &self,
        id: &SandboxId,
        started_at: UnixMillis,
        end_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'running', started_at = $1, end_at = $2, updated_at = $3 \
             WHERE id = $4 AND state = 'resuming'",
        )
        .bind(started_at.0)
        .bind(end_at.0)
        .bind(now.0)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets the end of a sandbox that is still in `state`.
    pub async fn set_end_at(
        &self,
        id: &SandboxId,
        state: SandboxState,
        end_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sandboxes SET end_at = $1, updated_at = $2 WHERE id = $3 AND state = $4",
        )
        .bind(end_at.0)
        .bind(now.0)
        .bind(id.as_str())
        .bind(state.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces the network settings of a sandbox that is running or paused. Not `updated_at`:
    /// that dates state changes, which the reconciler reads.
    pub async fn set_network(
        &self,
        id: &SandboxId,
        allow_internet_access: Option<bool>,
        network: &NetworkConfig,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE sandboxes SET allow_internet_access = $1, network = $2 \
             WHERE id = $3 AND state IN ('running', 'paused')",
        )
        .bind(allow_internet_access.map(i64::from))
        .bind(serde_json::to_string(network).expect("a network config always serializes"))
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims up to `limit` running sandboxes whose end has passed, oldest end first, for this
    /// control plane until `lease_until`: one another control plane claimed (its lease not
    /// over) is skipped, so replicas on one database handle each timeout once, and one whose
    /// claimer died is claimed again when its lease ends. On PostgreSQL rows another replica is
    /// claiming right now are skipped (`SKIP LOCKED`) instead of waited for.
    pub async fn claim_expired(
        &self,
        now: UnixMillis,
        lease_until: UnixMillis,
        limit: i64,
    ) -> Result<Vec<SandboxRecord>> {
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(&format!(
            "UPDATE sandboxes SET expire_lease_until = $2 WHERE id IN \
             (SELECT id FROM sandboxes WHERE state = 'running' AND end_at <= $1 \
              AND (expire_lease_until IS NULL OR expire_lease_until <= $1) \
              ORDER BY end_at LIMIT $3{lock}) \
             RETURNING {SANDBOX_COLUMNS}"
        ))
        .bind(now.0)
        .bind(lease_until.0)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<SandboxRecord> =
            rows.iter().map(sandbox_from_row).collect::<Result<_>>()?;
        out.sort_by_key(|s| s.end_at);
        Ok(out)
    }

    /// Ends this control plane's claim on a sandbox's timeout (handled, or no longer due).
    pub async fn release_expiry(&self, id: &SandboxId) -> Result<()> {
        sqlx::query("UPDATE sandboxes SET expire_lease_until = NULL WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The sandboxes a host holds or is getting by our records (everything but killed).
    pub async fn live_on_host(&self, host: &HostId) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE host_id = $1 AND state <> 'killed'"
        ))
        .bind(host.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Every running sandbox (the proxy's search for the owner of a signed URL).
    pub async fn running(&self) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = 'running'"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// One page of a team's sandboxes, and whether more follow.
    ///
    /// Metadata is matched here, not in SQL, because SQLite and PostgreSQL have no common JSON
    /// syntax; rows are scanned in order until the page is full, so pagination stays exact.
    pub async fn list_sandboxes(&self, f: &SandboxFilter) -> Result<(Vec<SandboxRecord>, bool)> {
        use futures::TryStreamExt;

        let mut sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE team_id = $1");
        let mut n = 1;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        let states: Vec<String> = f.states.iter().map(|_| next()).collect();
        sql.push_str(&format!(" AND state IN ({})", states.join(", ")));
        if f.template_id.is_some() {
            sql.push_str(&format!(" AND template_id = {}", next()));
        }
        if f.started_after.is_some() {
            // "Started at or after": the SDKs pass a sandbox's own `startedAt` to find it.
            sql.push_str(&format!(" AND started_at >= {}", next()));
        }
        let (cmp, order) = if f.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if f.after.is_some() {
            let (a, b, c) = (next(), next(), next());
            sql.push_str(&format!(
                " AND (started_at {cmp} {a} OR (started_at = {b} AND id {cmp} {c}))"
            ));
        }
        sql.push_str(&format!(" ORDER BY started_at {order}, id {order}"));

        let mut q = sqlx::query(&sql).bind(f.team_id.as_str());
        for s in &f.states {
            q = q.bind(s.as_str());
        }
        if let Some(t) = &f.template_id {
            q = q.bind(t.as_str());
        }
        if let Some(t) = f.started_after {
            q = q.bind(t.0);
        }
        if let Some(c) = &f.after {
            q = q.bind(c.time).bind(c.time).bind(c.id.as_str());
        }
        let mut rows = q.fetch(&self.pool);
        let mut out = Vec::new();
        while let Some(row) = rows.try_next().await? {
            let s = sandbox_from_row(&row)?;
            if !f.metadata.iter().all(|(k, v)| s.metadata.get(k) == Some(v)) {
                continue;
            }
            if out.len() == f.limit {
                return Ok((out, true));
            }
            out.push(s);
        }
        Ok((out, false))
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds `s` as `$1..$20` in the order of [`SANDBOX_COLUMNS`].
fn bind_sandbox<'q>(q: AnyQuery<'q>, s: &'q SandboxRecord) -> AnyQuery<'q> {
    q.bind(s.id.as_str())
        .bind(s.team_id.as_str())
        .bind(&s.template_id)
        .bind(s.state.as_str())
        .bind(s.host_id.as_ref().map(|h| h.as_str().to_owned()))
        .bind(i64::from(s.vcpus))
        .bind(to_i64(s.memory_mb))
        .bind(to_i64(s.disk_size_mb))
        .bind(&s.envd_version)
        .bind(to_json(&s.metadata))
        .bind(to_json(&s.env_vars))
        .bind(s.started_at.0)
        .bind(s.end_at.0)
        .bind(i64::from(s.auto_pause))
        .bind(s.allow_internet_access.map(i64::from))
        .bind(s.updated_at.0)
        .bind(
            s.network
                .as_ref()
                .map(|n| serde_json::to_string(n).expect("a network config always serializes")),
        )
        .bind(i64::from(s.auto_resume))
        .bind(i64::from(s.auto_pause_memory))
        .bind(i64::from(s.paused_memory))
}

fn to_json(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).expect("a string map always serializes")
}

fn u32_col(r: &AnyRow, col: &str) -> Result<u32> {
    Ok(u32::try_from(r.try_get::<i64, _>(col)?).unwrap_or(0))
}

fn u64_col(r: &AnyRow, col: &str) -> Result<u64> {
    Ok(u64::try_from(r.try_get::<i64, _>(col)?).unwrap_or(0))
}

fn parse_id<T, E: std::fmt::Display>(
    table: &'static str,
    id: &str,
    value: &str,
    parse: impl FnOnce(&str) -> std::result::Result<T, E>,
) -> Result<T> {
    parse(value).map_err(|e| StoreError::Corrupt {
        table,
        id: id.to_owned(),
        what: e.to_string(),
    })
}

fn team_from_row(r: &AnyRow) -> Result<TeamRecord> {
    let id: String = r.try_get("id")?;
    Ok(TeamRecord {
        id: parse_id("teams", &id, &id, TeamId::parse)?,
        name: r.try_get("name")?,
    })
}

fn sandbox_from_row(r: &AnyRow) -> Result<SandboxRecord> {
    let id: String = r.try_get("id")?;
    let corrupt = |what: String| StoreError::Corrupt {
        table: "sandboxes",
        id: id.clone(),
        what,
    };
    let state: String = r.try_get("state")?;
    let json = |col: &str| -> Result<BTreeMap<String, String>> {
        let text: String = r.try_get(col)?;
        serde_json::from_str(&text).map_err(|e| corrupt(format!("{col}: {e}")))
    };
    Ok(SandboxRecord {
        team_id: parse_id(
            "sandboxes",
            &id,
            &r.try_get::<String, _>("team_id")?,
            TeamId::parse,
        )?,
        template_id: r.try_get("template_id")?,
        state: SandboxState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        host_id: r
            .try_get::<Option<String>, _>("host_id")?
            .map(|h| parse_id("sandboxes", &id, &h, HostId::parse))
            .transpose()?,
        vcpus: u32_col(r, "vcpus")?,
        memory_mb: u64_col(r, "memory_mb")?,
        disk_size_mb: u64_col(r, "disk_size_mb")?,
        envd_version: r.try_get("envd_version")?,
        metadata: json("metadata")?,
        env_vars: json("env_vars")?,
        started_at: UnixMillis(r.try_get("started_at")?),
        end_at: UnixMillis(r.try_get("end_at")?),
        auto_pause: r.try_get::<i64, _>("auto_pause")? != 0,
        auto_resume: r.try_get::<i64, _>("auto_resume")? != 0,
        auto_pause_memory: r.try_get::<i64, _>("auto_pause_memory")? != 0,
        paused_memory: r.try_get::<i64, _>("paused_memory")? != 0,
        allow_internet_access: r
            .try_get::<Option<i64>, _>("allow_internet_access")?
            .map(|v| v != 0),
        updated_at: UnixMillis(r.try_get("updated_at")?),
        network: r
            .try_get::<Option<String>, _>("network")?
            .map(|t| serde_json::from_str(&t).map_err(|e| corrupt(format!("network: {e}"))))
            .transpose()?,
        id: parse_id("sandboxes", &id, &id, SandboxId::parse)?,
    })
}
