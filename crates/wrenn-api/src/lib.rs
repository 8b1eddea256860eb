//! Wire types of the E2B-compatible REST API, exactly as the official SDKs send and read them
//! (`e2b` 2.x for Python and JS; see `e2b-sdk-clients.md` §3.1 and the upstream OpenAPI spec).
//!
//! Field names follow the wire, which mixes conventions: `templateID`, `envVars`, but
//! `allow_internet_access` in snake case. Request types accept unknown fields on purpose: the
//! SDKs add new optional fields over time (`network`, `mcp`, `iam`, `volumeMounts`, ...), and a
//! newer SDK must still work against us. That is the one deliberate exception to our rule of
//! `deny_unknown_fields` on external input. Optional response fields are omitted when empty,
//! which every SDK version accepts.

#![forbid(unsafe_code)]

mod admin;
mod hosts;
mod sandbox;
mod template;

pub use admin::{AgentSecret, CreatedApiKey, Host, NewApiKey, NewHost, NewTeam, Team};
pub use hosts::{Heartbeat, HostJoin, HostJoined, HostStatus, HostTemplate};
pub use sandbox::{
    AutoResume, ConnectSandbox, Error, ForkResult, ForkSandbox, Lifecycle, ListedSandbox,
    NetworkConfig, NetworkUpdate, NewSandbox, NewSnapshot, PauseSandbox, RefreshSandbox,
    ResumedSandbox, Sandbox, SandboxDetail, SandboxLog, SandboxLogEntry, SandboxLogs,
    SandboxMetric, SandboxTimeout, SnapshotInfo, TemplateAlias,
};
pub use template::{
    AssignTemplateTags, AssignedTemplateTags, BuildLogEntry, BuildStatusReason, DeleteTemplateTags,
    TemplateBuild, TemplateBuildInfo, TemplateBuildLogs, TemplateBuildRequest,
    TemplateBuildRequested, TemplateBuildStart, TemplateBuildStatus, TemplateFileUpload,
    TemplateListed, TemplateStep, TemplateTag, TemplateUpdateRequest, TemplateUpdateResponse,
    TemplateWithBuilds,
};

/// `clientID` in every sandbox response: a constant kept for backward compatibility, the same
/// value E2B's API returns.
pub const CLIENT_ID: &str = "6532622b";

/// Response header carrying the pagination cursor of list endpoints.
pub const NEXT_TOKEN_HEADER: &str = "x-next-token";

/// Request header with the API key.
pub const API_KEY_HEADER: &str = "x-api-key";
