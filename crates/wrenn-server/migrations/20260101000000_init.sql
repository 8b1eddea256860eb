-- Wrenn control-plane schema. Portable between SQLite and PostgreSQL on purpose: only TEXT and
-- BIGINT columns (times are Unix milliseconds, booleans 0/1, JSON as TEXT), because the store
-- runs the same queries on both through sqlx's Any driver.

CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    -- Lowercase hex SHA-256 of the whole key; the key itself is never stored.
    key_hash TEXT NOT NULL UNIQUE,
    -- The first characters of the key, for display.
    mask TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    -- NULL: usable by every team.
    team_id TEXT,
    envd_version TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    rpc_url TEXT NOT NULL,
    proxy_url TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    max_sandboxes BIGINT NOT NULL,
    version TEXT NOT NULL,
    schedulable BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    template_id TEXT NOT NULL,
    state TEXT NOT NULL,
    host_id TEXT,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    envd_version TEXT NOT NULL,
    metadata TEXT NOT NULL,
    env_vars TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    end_at BIGINT NOT NULL,
    auto_pause BIGINT NOT NULL,
    -- NULL: not specified by the client.
    allow_internet_access BIGINT,
    updated_at BIGINT NOT NULL
);

CREATE INDEX sandboxes_team_state ON sandboxes (team_id, state, started_at);
CREATE INDEX sandboxes_state_end ON sandboxes (state, end_at);

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    sandbox_id TEXT NOT NULL,
    name TEXT NOT NULL,
    base_template_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX snapshots_team ON snapshots (team_id, created_at);
