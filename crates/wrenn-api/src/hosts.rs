//! What a host agent sends the control plane (`wrenn agent` → `wrenn server`): its join and its
//! heartbeats. Not part of E2B's API; only agents send these, so unknown fields are refused.

use serde::{Deserialize, Serialize};

/// `POST /hosts/join` with `Authorization: Bearer <join token>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostJoin {
    /// The host's ID, unique in the cluster (e.g. its host name).
    pub host_id: String,
    /// Where the control plane reaches the agent's RPC and sandbox proxy (`http://addr:port`).
    pub url: String,
}

/// The answer to a join: the secret the agent requires on every request it serves (and
/// presents on its heartbeats), and how often to send them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostJoined {
    pub host_id: String,
    pub secret: String,
    pub heartbeat_interval_ms: u64,
}

/// A template an agent holds, as its sandboxes are made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostTemplate {
    pub id: String,
    pub envd_version: String,
    pub vcpus: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
}

/// `POST /hosts/{id}/heartbeat` with `Authorization: Bearer <the host's secret>`: what the host
/// has now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Heartbeat {
    /// vCPUs it offers to sandboxes (cores times its overcommit).
    pub vcpus: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Memory the host has free now (`MemAvailable`).
    #[serde(rename = "memoryAvailableMB")]
    pub memory_available_mb: u64,
    /// Free space where its sandboxes live.
    #[serde(rename = "diskFreeMB")]
    pub disk_free_mb: u64,
    pub max_sandboxes: u32,
    /// Sandboxes it runs now.
    pub sandboxes: u32,
    pub version: String,
    pub templates: Vec<HostTemplate>,
    /// The agent is stopping: place nothing more on it.
    #[serde(default)]
    pub stopping: bool,
}

/// A host as `GET /admin/hosts` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    pub id: String,
    pub url: String,
    /// `healthy`, `unhealthy` (no heartbeat for a while: placed on no more) or `lost` (its
    /// running sandboxes were written off).
    pub health: String,
    pub schedulable: bool,
    pub vcpus: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    pub sandboxes: u32,
    pub templates: Vec<String>,
    /// Unix ms of its last heartbeat (none for the agent inside `wrenn up`).
    pub heartbeat_at: Option<i64>,
}
