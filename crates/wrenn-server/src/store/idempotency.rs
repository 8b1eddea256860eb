//! Idempotency keys of creates: which sandbox a team's `Idempotency-Key` names, for 24 hours.
//!
//! A key is claimed (inserted) before its sandbox's record exists, under the sandbox's lock,
//! so a concurrent request with the same key finds the claim and waits for that create instead
//! of making a second sandbox; a create that fails gives its key up again.

use sqlx::Row;
use wrenn_core::{SandboxId, TeamId, UnixMillis};

use super::{Result, Store, parse_id};

/// An idempotency key of a create, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub sandbox_id: SandboxId,
    pub request_hash: String,
    pub created_at: UnixMillis,
}

/// What [`Store::claim_idempotency_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The key is ours now: go on and create the sandbox.
    Claimed,
    /// An earlier request holds the key.
    Taken(IdempotencyRecord),
    /// The holder gave the key up between our insert and our read: claim again.
    Released,
}

impl Store {
    /// Takes `key` for `sandbox` unless a request of the same team took it after `expired_before`
    /// (an older claim is expired and replaced).
    pub async fn claim_idempotency_key(
        &self,
        team: &TeamId,
        key: &str,
        sandbox: &SandboxId,
        request_hash: &str,
        now: UnixMillis,
        expired_before: UnixMillis,
    ) -> Result<IdempotencyClaim> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE team_id = $1 AND idempotency_key = $2 AND created_at < $3",
        )
        .bind(team.as_str())
        .bind(key)
        .bind(expired_before.0)
        .execute(&self.pool)
        .await?;
        let done = sqlx::query(
            "INSERT INTO idempotency_keys (team_id, idempotency_key, sandbox_id, request_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (team_id, idempotency_key) DO NOTHING",
        )
        .bind(team.as_str())
        .bind(key)
        .bind(sandbox.as_str())
        .bind(request_hash)
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(IdempotencyClaim::Claimed);
        }
        Ok(match self.idempotency_key(team, key).await? {
            Some(held) => IdempotencyClaim::Taken(held),
            None => IdempotencyClaim::Released,
        })
    }

    /// The claim on `key` of `team`, expired or not.
    pub async fn idempotency_key(
        &self,
        team: &TeamId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>> {
        let row = sqlx::query(
            "SELECT sandbox_id, request_hash, created_at FROM idempotency_keys \
             WHERE team_id = $1 AND idempotency_key = $2",
        )
        .bind(team.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let id: String = r.try_get("sandbox_id")?;
            Ok(IdempotencyRecord {
                sandbox_id: parse_id("idempotency_keys", key, &id, SandboxId::parse)?,
                request_hash: r.try_get("request_hash")?,
                created_at: UnixMillis(r.try_get("created_at")?),
            })
        })
        .transpose()
    }

    /// Gives `key` up if it still names `sandbox` (its create failed).
    pub async fn release_idempotency_key(
        &self,
        team: &TeamId,
        key: &str,
        sandbox: &SandboxId,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE team_id = $1 AND idempotency_key = $2 AND sandbox_id = $3",
        )
        .bind(team.as_str())
        .bind(key)
        .bind(sandbox.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the keys claimed before `expired_before`; returns how many.
    pub async fn purge_idempotency_keys(&self, expired_before: UnixMillis) -> Result<u64> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(expired_before.0)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
