-- Template builds (the E2B template builder). A built template has a name (its alias, unique
-- across teams) and, once a build of it is ready, that build as its current version: the ID
-- the host holding it starts sandboxes from, and that host.
ALTER TABLE templates ADD COLUMN name TEXT;
ALTER TABLE templates ADD COLUMN build_id TEXT;
ALTER TABLE templates ADD COLUMN build_host_id TEXT;
ALTER TABLE templates ADD COLUMN updated_at BIGINT;
CREATE UNIQUE INDEX templates_name ON templates (name);

CREATE TABLE template_builds (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    -- waiting, building, ready or error.
    status TEXT NOT NULL,
    -- The host building (or holding) it; NULL before it starts.
    host_id TEXT,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_size_mb BIGINT NOT NULL,
    envd_version TEXT NOT NULL,
    -- JSON list of the tags it gets once ready.
    tags TEXT NOT NULL,
    -- JSON of the API's BuildStatusReason once failed.
    reason TEXT,
    created_at BIGINT NOT NULL,
    -- Also the heartbeat of a running build.
    updated_at BIGINT NOT NULL
);

CREATE INDEX template_builds_template ON template_builds (template_id, created_at);
CREATE INDEX template_builds_status ON template_builds (status, updated_at);

CREATE TABLE template_build_logs (
    build_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    -- The step (from 1), 'base' or 'finalize'; NULL: none.
    step TEXT,
    PRIMARY KEY (build_id, seq)
);

CREATE TABLE template_tags (
    template_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    build_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (template_id, tag)
);
