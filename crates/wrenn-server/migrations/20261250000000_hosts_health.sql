-- Many hosts. A host that joined over the network (`wrenn agent`) heartbeats: `heartbeat_at`
-- is its last (Unix ms; NULL for the agent inside `wrenn up`, which is never silent), `lost_at`
-- when the control plane wrote its running sandboxes off, `templates` the JSON list of the
-- template IDs it holds (NULL: the host provides every host template, as `wrenn up`'s does),
-- `memory_available_mb` and `disk_free_mb` what it reported last.
ALTER TABLE hosts ADD COLUMN heartbeat_at BIGINT;
ALTER TABLE hosts ADD COLUMN lost_at BIGINT;
ALTER TABLE hosts ADD COLUMN templates TEXT;
ALTER TABLE hosts ADD COLUMN memory_available_mb BIGINT;
ALTER TABLE hosts ADD COLUMN disk_free_mb BIGINT;
-- A sandbox written off with its host: when (Unix ms). Killed records keep it, so the API can
-- say the sandbox was lost rather than only "not found".
ALTER TABLE sandboxes ADD COLUMN lost_at BIGINT;
-- The reaper's lease on an expired sandbox (Unix ms until which one control plane handles its
-- timeout), so replicas on one database handle each timeout once, and another takes it over
-- when the one holding the lease died.
ALTER TABLE sandboxes ADD COLUMN expire_lease_until BIGINT;
-- Cluster-wide settings every replica reads: the server secret and the agents' join token.
CREATE TABLE cluster_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
