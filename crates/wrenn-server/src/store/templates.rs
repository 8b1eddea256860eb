//! Built templates: their builds (status, resources, reason), build logs, and tags.
//!
//! A build is written `waiting` when the SDK requests it, `building` once its steps arrive and
//! a host took it, then `ready` (in one transaction with its template, whose current version it
//! becomes, and its tags) or `error`. A running build's `updated_at` is its heartbeat: one that
//! stops beating (its control plane died) is failed by [`Store::fail_stale_builds`].
//!
//! A team's template may be shared with every team (`public`), which makes it usable by them
//! as the built-in templates (those with no team) are.

use sqlx::Row;
use sqlx::any::AnyRow;
use wrenn_core::{HostId, TeamId, UnixMillis};

use super::{
    Cursor, Result, Store, StoreError, TemplateRecord, parse_id, to_i64, u32_col, u64_col,
};

/// A template's record, whether it is shared, and when it was made and last changed.
const TEMPLATE_COLUMNS: &str = "id, team_id, envd_version, vcpus, memory_mb, disk_size_mb, name, \
    build_id, build_host_id, public, created_at, COALESCE(updated_at, created_at) AS changed";

const BUILD_COLUMNS: &str = "id, template_id, team_id, status, host_id, vcpus, memory_mb, \
    disk_size_mb, envd_version, tags, reason, created_at, updated_at";

/// The version of a built template that sandboxes start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentBuild {
    /// The build's ID, which is also the template's ID on its host.
    pub id: String,
    /// The host holding it.
    pub host_id: HostId,
}

/// A template build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    pub id: String,
    pub template_id: String,
    pub team_id: TeamId,
    /// `waiting`, `building`, `ready` or `error`.
    pub status: String,
    pub host_id: Option<HostId>,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    pub envd_version: String,
    /// Given to it once ready.
    pub tags: Vec<String>,
    /// JSON of the API's `BuildStatusReason`, once failed.
    pub reason: Option<String>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// One line of a build's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLogRecord {
    pub seq: i64,
    pub at: UnixMillis,
    pub level: String,
    pub message: String,
    pub step: Option<String>,
}

/// A tag of a template: a name for one of its builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub tag: String,
    pub build_id: String,
    pub created_at: UnixMillis,
}

/// A template with what its routes show beyond the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateEntry {
    pub template: TemplateRecord,
    /// Its team shared it with every team.
    pub shared: bool,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

impl TemplateEntry {
    /// Every team may use it: built in, or shared by its team.
    pub fn public(&self) -> bool {
        self.template.team_id.is_none() || self.shared
    }

    /// Whether `team` may use it: it is public or the team's own.
    pub fn visible_to(&self, team: &TeamId) -> bool {
        self.public() || self.template.team_id.as_ref() == Some(team)
    }
}

fn entry_from_row(r: &AnyRow) -> Result<TemplateEntry> {
    Ok(TemplateEntry {
        template: template_from_row(r)?,
        shared: r.try_get::<i64, _>("public")? != 0,
        created_at: UnixMillis(r.try_get("created_at")?),
        updated_at: UnixMillis(r.try_get("changed")?),
    })
}

fn template_from_row(r: &AnyRow) -> Result<TemplateRecord> {
    let id: String = r.try_get("id")?;
    let build = match (
        r.try_get::<Option<String>, _>("build_id")?,
        r.try_get::<Option<String>, _>("build_host_id")?,
    ) {
        (Some(b), Some(h)) => Some(CurrentBuild {
            id: b,
            host_id: parse_id("templates", &id, &h, HostId::parse)?,
        }),
        _ => None,
    };
    Ok(TemplateRecord {
        team_id: r
            .try_get::<Option<String>, _>("team_id")?
            .map(|t| parse_id("templates", &id, &t, TeamId::parse))
            .transpose()?,
        envd_version: r.try_get("envd_version")?,
        vcpus: u32_col(r, "vcpus")?,
        memory_mb: u64_col(r, "memory_mb")?,
        disk_size_mb: u64_col(r, "disk_size_mb")?,
        name: r.try_get("name")?,
        build,
        id,
    })
}

fn log_from_row(r: &AnyRow) -> Result<BuildLogRecord> {
    Ok(BuildLogRecord {
        seq: r.try_get("seq")?,
        at: UnixMillis(r.try_get("at")?),
        level: r.try_get("level")?,
        message: r.try_get("message")?,
        step: r.try_get("step")?,
    })
}

fn build_from_row(r: &AnyRow) -> Result<BuildRecord> {
    let id: String = r.try_get("id")?;
    let tags: String = r.try_get("tags")?;
    Ok(BuildRecord {
        template_id: r.try_get("template_id")?,
        team_id: parse_id(
            "template_builds",
            &id,
            &r.try_get::<String, _>("team_id")?,
            TeamId::parse,
        )?,
        status: r.try_get("status")?,
        host_id: r
            .try_get::<Option<String>, _>("host_id")?
            .map(|h| parse_id("template_builds", &id, &h, HostId::parse))
            .transpose()?,
        vcpus: u32_col(r, "vcpus")?,
        memory_mb: u64_col(r, "memory_mb")?,
        disk_size_mb: u64_col(r, "disk_size_mb")?,
        envd_version: r.try_get("envd_version")?,
        tags: serde_json::from_str(&tags).map_err(|e| StoreError::Corrupt {
            table: "template_builds",
            id: id.clone(),
            what: format!("tags: {e}"),
        })?,
        reason: r.try_get("reason")?,
        created_at: UnixMillis(r.try_get("created_at")?),
        updated_at: UnixMillis(r.try_get("updated_at")?),
        id,
    })
}

impl Store {
    /// Makes the team's built template `id` named `name` (no version yet); `false` if the name
    /// is taken meanwhile.
    pub async fn insert_named_template(
        &self,
        id: &str,
        team: &TeamId,
        name: &str,
        now: UnixMillis,
    ) -> Result<bool> {
        let res = sqlx::query(
            "INSERT INTO templates (id, team_id, envd_version, vcpus, memory_mb, disk_size_mb, created_at, name, updated_at) \
             VALUES ($1, $2, '', 0, 0, 0, $3, $4, $3) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(team.as_str())
        .bind(now.0)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// A template by ID, else by name, whoever owns it.
    pub async fn template_entry(&self, id: &str) -> Result<Option<TemplateEntry>> {
        for col in ["id", "name"] {
            let row = sqlx::query(&format!(
                "SELECT {TEMPLATE_COLUMNS} FROM templates WHERE {col} = $1"
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(r) = row {
                return entry_from_row(&r).map(Some);
            }
        }
        Ok(None)
    }

    /// The templates `team` may use (its own, the built-in ones and those other teams
    /// shared), oldest first.
    pub async fn list_templates(&self, team: &TeamId) -> Result<Vec<TemplateEntry>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates \
             WHERE team_id IS NULL OR team_id = $1 OR public = 1 ORDER BY created_at, id"
        ))
        .bind(team.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Shares the team template `id` with every team, or stops; `false` if there is no such
    /// template of a team (a built-in one is every team's whatever this says).
    pub async fn set_template_public(
        &self,
        id: &str,
        public: bool,
        now: UnixMillis,
    ) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE templates SET public = $2, updated_at = $3 WHERE id = $1 AND team_id IS NOT NULL",
        )
        .bind(id)
        .bind(i64::from(public))
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Deletes template `id` with its builds, their logs and its tags (the hosts' files are
    /// theirs to collect).
    pub async fn delete_template(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM template_build_logs WHERE build_id IN \
             (SELECT id FROM template_builds WHERE template_id = $1)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        for table in ["template_builds", "template_tags"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE template_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let gone = sqlx::query("DELETE FROM templates WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(gone == 1)
    }

    pub async fn insert_build(&self, b: &BuildRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO template_builds ({BUILD_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(&b.id)
        .bind(&b.template_id)
        .bind(b.team_id.as_str())
        .bind(&b.status)
        .bind(b.host_id.as_ref().map(|h| h.as_str().to_owned()))
        .bind(i64::from(b.vcpus))
        .bind(to_i64(b.memory_mb))
        .bind(to_i64(b.disk_size_mb))
        .bind(&b.envd_version)
        .bind(serde_json::to_string(&b.tags).unwrap_or_else(|_| "[]".into()))
        .bind(&b.reason)
        .bind(b.created_at.0)
        .bind(b.updated_at.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_build(&self, id: &str) -> Result<Option<BuildRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    /// How many builds template `id` has had.
    pub async fn count_builds(&self, template_id: &str) -> Result<u64> {
        let n: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM template_builds WHERE template_id = $1")
                .bind(template_id)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// A page of template `id`'s builds, newest first, after `after` (the last of the page
    /// before); whether more follow.
    pub async fn list_builds(
        &self,
        template_id: &str,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<(Vec<BuildRecord>, bool)> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds WHERE template_id = $1 \
             AND ($2 = 0 OR created_at < $3 OR (created_at = $3 AND id < $4)) \
             ORDER BY created_at DESC, id DESC LIMIT $5"
        ))
        .bind(template_id)
        .bind(i64::from(after.is_some()))
        .bind(after.map_or(0, |c| c.time))
        .bind(after.map_or("", |c| c.id.as_str()))
        .bind(to_i64(limit as u64 + 1))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .iter()
            .map(build_from_row)
            .collect::<Result<Vec<_>>>()?;
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// The newest build of template `id`.
    pub async fn latest_build(&self, template_id: &str) -> Result<Option<BuildRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds WHERE template_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT 1"
        ))
        .bind(template_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    /// Moves a `waiting` build to `building` on `host`; `false` if it was not waiting.
    pub async fn start_build(&self, id: &str, host: &HostId, now: UnixMillis) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE template_builds SET status = 'building', host_id = $2, updated_at = $3 \
             WHERE id = $1 AND status = 'waiting'",
        )
        .bind(id)
        .bind(host.as_str())
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// A running build is alive (its heartbeat).
    pub async fn touch_build(&self, id: &str, now: UnixMillis) -> Result<()> {
        sqlx::query(
            "UPDATE template_builds SET updated_at = $2 WHERE id = $1 AND status = 'building'",
        )
        .bind(id)
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails a build that is not finished, with `reason` (JSON); `false` if it was finished.
    pub async fn fail_build(&self, id: &str, reason: &str, now: UnixMillis) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE template_builds SET status = 'error', reason = $2, updated_at = $3 \
             WHERE id = $1 AND status IN ('waiting', 'building')",
        )
        .bind(id)
        .bind(reason)
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// The `building` builds whose heartbeat stopped before `before`.
    pub async fn stale_builds(&self, before: UnixMillis) -> Result<Vec<BuildRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds WHERE status = 'building' AND updated_at < $1"
        ))
        .bind(before.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(build_from_row).collect()
    }

    /// A build is ready: it becomes its template's current version, with its resources, and
    /// takes its tags; one transaction. `false` if it was not building (failed meanwhile).
    pub async fn finish_build(&self, b: &BuildRecord, now: UnixMillis) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE template_builds SET status = 'ready', vcpus = $2, memory_mb = $3, \
             disk_size_mb = $4, envd_version = $5, updated_at = $6 \
             WHERE id = $1 AND status = 'building'",
        )
        .bind(&b.id)
        .bind(i64::from(b.vcpus))
        .bind(to_i64(b.memory_mb))
        .bind(to_i64(b.disk_size_mb))
        .bind(&b.envd_version)
        .bind(now.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved != 1 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE templates SET build_id = $2, build_host_id = $3, envd_version = $4, vcpus = $5, \
             memory_mb = $6, disk_size_mb = $7, updated_at = $8 WHERE id = $1",
        )
        .bind(&b.template_id)
        .bind(&b.id)
        .bind(b.host_id.as_ref().map(|h| h.as_str().to_owned()))
        .bind(&b.envd_version)
        .bind(i64::from(b.vcpus))
        .bind(to_i64(b.memory_mb))
        .bind(to_i64(b.disk_size_mb))
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        for tag in &b.tags {
            upsert_tag(&mut tx, &b.template_id, tag, &b.id, now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Appends lines to a build's log (their `seq` set by the one writer, the build's task).
    pub async fn append_build_logs(&self, build: &str, lines: &[BuildLogRecord]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for l in lines {
            sqlx::query(
                "INSERT INTO template_build_logs (build_id, seq, at, level, message, step) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(build)
            .bind(l.seq)
            .bind(l.at.0)
            .bind(&l.level)
            .bind(&l.message)
            .bind(&l.step)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A build's log lines from the `offset`th on (0: the first), at most `limit`.
    pub async fn build_logs(
        &self,
        build: &str,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<BuildLogRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, level, message, step FROM template_build_logs WHERE build_id = $1 \
             ORDER BY seq LIMIT $2 OFFSET $3",
        )
        .bind(build)
        .bind(to_i64(limit))
        .bind(to_i64(offset))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(log_from_row).collect()
    }

    /// Whether sandboxes may still start from `build`: it is its template's current version
    /// or a tag names it.
    pub async fn build_wanted(&self, build: &str) -> Result<bool> {
        let row = sqlx::query(
            "SELECT id FROM templates WHERE build_id = $1 \
             UNION ALL SELECT build_id FROM template_tags WHERE build_id = $1 LIMIT 1",
        )
        .bind(build)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// At most `limit` of a build's log lines from time `cursor` on (forward, oldest first)
    /// or up to it (backward, newest first).
    pub async fn build_logs_by_time(
        &self,
        build: &str,
        cursor: Option<UnixMillis>,
        limit: u64,
        backward: bool,
    ) -> Result<Vec<BuildLogRecord>> {
        let (cmp, order, from) = if backward {
            ("<=", "DESC", cursor.map_or(i64::MAX, |c| c.0))
        } else {
            (">=", "ASC", cursor.map_or(i64::MIN, |c| c.0))
        };
        let rows = sqlx::query(&format!(
            "SELECT seq, at, level, message, step FROM template_build_logs \
             WHERE build_id = $1 AND at {cmp} $2 ORDER BY at {order}, seq {order} LIMIT $3"
        ))
        .bind(build)
        .bind(from)
        .bind(to_i64(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(log_from_row).collect()
    }

    /// Points `tag` of template `template_id` at `build`.
    pub async fn set_tag(
        &self,
        template_id: &str,
        tag: &str,
        build: &str,
        now: UnixMillis,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        upsert_tag(&mut tx, template_id, tag, build, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes tags; how many there were.
    pub async fn delete_tags(&self, template_id: &str, tags: &[String]) -> Result<u64> {
        let mut gone = 0;
        for tag in tags {
            gone += sqlx::query("DELETE FROM template_tags WHERE template_id = $1 AND tag = $2")
                .bind(template_id)
                .bind(tag)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(gone)
    }

    pub async fn tags(&self, template_id: &str) -> Result<Vec<TagRecord>> {
        let rows = sqlx::query(
            "SELECT tag, build_id, created_at FROM template_tags WHERE template_id = $1 ORDER BY tag",
        )
        .bind(template_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TagRecord {
                    tag: r.try_get("tag")?,
                    build_id: r.try_get("build_id")?,
                    created_at: UnixMillis(r.try_get("created_at")?),
                })
            })
            .collect()
    }
}

async fn upsert_tag(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    template_id: &str,
    tag: &str,
    build: &str,
    now: UnixMillis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO template_tags (template_id, tag, build_id, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id, \
         created_at = excluded.created_at",
    )
    .bind(template_id)
    .bind(tag)
    .bind(build)
    .bind(now.0)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
