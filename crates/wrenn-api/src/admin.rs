//! Admin bodies: teams, API keys and host agents. Not part of E2B's API; only our admin path
//! (authenticated by the admin token) uses them, so they deny unknown fields.

use serde::{Deserialize, Serialize};

/// `POST /admin/teams`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub name: String,
}

/// `POST /admin/teams/{teamID}/api-keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    #[serde(default)]
    pub name: String,
}

/// The raw key is returned once, here; only its hash is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedApiKey {
    pub id: String,
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub name: String,
    pub key: String,
    /// What the key starts with, for display (`e2b_ab12…`).
    pub mask: String,
}

/// `GET /admin/hosts/{id}/secret`: the secret that host's agent requires of the control plane
/// over the network (`Authorization` / `Proxy-Authorization: Bearer <secret>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSecret {
    #[serde(rename = "hostID")]
    pub host_id: String,
    pub secret: String,
}

/// `POST /admin/hosts`: register (or update) a host agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewHost {
    pub id: String,
    /// Base URL of the agent's RPC server, e.g. `http://10.0.0.5:5008`, or its Unix socket
    /// `unix:/path` on the control plane's own machine.
    pub rpc_url: String,
    /// Base URL of the agent's sandbox traffic proxy (same forms).
    pub proxy_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    pub id: String,
    pub rpc_url: String,
    pub proxy_url: String,
    pub vcpus: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    pub version: String,
}
