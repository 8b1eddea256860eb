-- Idempotency keys of sandbox creates (`Idempotency-Key`): a retried create with the same key
-- from the same team returns the sandbox the first one made. Portable between SQLite and
-- PostgreSQL like the rest of the schema (TEXT and BIGINT only).

CREATE TABLE idempotency_keys (
    team_id TEXT NOT NULL REFERENCES teams (id),
    idempotency_key TEXT NOT NULL,
    -- The sandbox the first request made (or is making: its record may still be `creating`,
    -- or not written yet for a moment).
    sandbox_id TEXT NOT NULL,
    -- Lowercase hex SHA-256 of the request body in canonical JSON: a key reused for another
    -- request is refused instead of answering with an unrelated sandbox.
    request_hash TEXT NOT NULL,
    -- Unix milliseconds; keys older than 24 hours are expired and may be used again.
    created_at BIGINT NOT NULL,
    PRIMARY KEY (team_id, idempotency_key)
);

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
CREATE INDEX idempotency_keys_sandbox ON idempotency_keys (sandbox_id);
