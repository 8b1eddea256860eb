-- Snapshots of sandboxes: memory, processes and disk, kept by the host that took them, which
-- sandboxes are created from (by ID or name, as a template) and forks start from.
--
-- Replaces the `snapshots` table of the first schema. Nothing ever wrote it: its rows were
-- written only after the agent's Snapshot answered, and no agent before this one implemented
-- Snapshot. So it is dropped, not converted (its rows would lack the host and sizes anyway).
DROP TABLE snapshots;

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams (id),
    -- NULL: unnamed, reached by its ID only. Unique per team when set (NULLs never collide,
    -- in SQLite and PostgreSQL alike).
    name TEXT,
    -- The sandbox it was taken of (which may be gone since).
    sandbox_id TEXT NOT NULL,
    -- The host holding it: sandboxes made from it are placed there only.
    host_id TEXT NOT NULL,
    -- 0 while the agent is being asked (written first, so a snapshot the agent may have made
    -- is never unknown here), 1 once it answered. Only ready snapshots are listed or used.
    ready BIGINT NOT NULL,
    -- 1: a fork's own snapshot, never listed or usable by name, deleted once its children are
    -- made.
    internal BIGINT NOT NULL,
    -- The host's template its memory is layered on (what the agent is asked for on a create).
    template_id TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    -- The source sandbox's disk size, which its sandboxes get.
    disk_size_mb BIGINT NOT NULL,
    -- What the snapshot's own files take on the host: its disk layer and memory pages.
    disk_bytes BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    -- The snapshot its source was created from, if any (this one is layered on it).
    parent_snapshot_id TEXT,
    envd_version TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE UNIQUE INDEX snapshots_team_name ON snapshots (team_id, name);
-- A team's list, newest first.
CREATE INDEX snapshots_team_created ON snapshots (team_id, created_at);
