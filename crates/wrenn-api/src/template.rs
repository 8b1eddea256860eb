//! Template builds: the routes the SDKs' `Template` builder drives (`POST /v3/templates`,
//! `GET /templates/{id}/files/{hash}`, `POST /v2/templates/{id}/builds/{buildID}`, the build's
//! `/status`), the template list, one template with its builds (`GET /templates/{id}`), its
//! update (`PATCH /templates/{id}`, `PATCH /v2/templates/{id}`) and tags.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// `POST /v3/templates`: a new build of the template `name` (made if the team has none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildRequest {
    /// The template's name (its alias), optionally `name:tag`.
    #[serde(default)]
    pub name: Option<String>,
    /// Older SDKs send the name here.
    #[serde(default)]
    pub alias: Option<String>,
    /// Tags the build gets once it is ready (default: `default`).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub cpu_count: Option<u32>,
    #[serde(default, rename = "memoryMB")]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub min_free_disk_mb: Option<u64>,
}

/// The answer to [`TemplateBuildRequest`] (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateBuildRequested {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// `GET /templates/{id}/files/{hash}`: where to upload a `COPY`'s context archive (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateFileUpload {
    /// The archive is already stored; no upload needed.
    pub present: bool,
    /// Where to `PUT` it (only when not present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// One step of [`TemplateBuildStart`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStep {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub files_hash: Option<String>,
    #[serde(default)]
    pub force: Option<bool>,
}

/// `POST /v2/templates/{id}/builds/{buildID}`: what to build (202, no body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildStart {
    /// An OCI image to start from.
    #[serde(default)]
    pub from_image: Option<String>,
    /// A template to start from.
    #[serde(default)]
    pub from_template: Option<String>,
    /// Registry credentials for `from_image`.
    #[serde(default)]
    pub from_image_registry: Option<serde_json::Value>,
    /// Wrenn's own: the hash of an image archive (`docker save` or an OCI layout, as a tar)
    /// uploaded through the files link, to start from (what `wrenn template build --image`
    /// sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image_archive: Option<String>,
    /// Rebuild every step.
    #[serde(default)]
    pub force: Option<bool>,
    #[serde(default)]
    pub steps: Option<Vec<TemplateStep>>,
    #[serde(default)]
    pub start_cmd: Option<String>,
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

/// A build's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateBuildStatus {
    /// Requested; its steps have not arrived yet.
    Waiting,
    Building,
    Ready,
    Error,
}

impl TemplateBuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Building => "building",
            Self::Ready => "ready",
            Self::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => Self::Waiting,
            "building" => Self::Building,
            "ready" => Self::Ready,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// One line of a build's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub message: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The step (from 1), `base` or `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Why a build failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    pub message: String,
    /// The step that failed (from 1), `base` or `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_entries: Vec<BuildLogEntry>,
}

/// `GET /templates/{id}/builds/{buildID}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: TemplateBuildStatus,
    /// The log lines from `logsOffset` on (at most `limit`), as text.
    pub logs: Vec<String>,
    /// The same lines with their time and level.
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// `GET /templates/{id}/builds/{buildID}/logs`: a page of a build's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateBuildLogs {
    pub logs: Vec<BuildLogEntry>,
}

/// One template of `GET /templates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateListed {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Always null: Wrenn has no user accounts.
    pub created_by: Option<serde_json::Value>,
    /// Always null: not tracked.
    pub last_spawned_at: Option<String>,
    pub spawn_count: u64,
    pub build_count: u64,
    pub envd_version: String,
    pub build_status: TemplateBuildStatus,
}

/// One build of [`TemplateWithBuilds`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuild {
    /// A UUID (the SDKs parse it as one).
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: TemplateBuildStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Only once `ready` or `error`: the SDKs parse it as a time when present, so a build
    /// still running has none rather than a null.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub envd_version: String,
}

/// `GET /templates/{id}`: the template as `GET /templates` lists it, with a page of its
/// builds, newest first (`x-next-token` names the next page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateWithBuilds {
    #[serde(flatten)]
    pub template: TemplateListed,
    pub builds: Vec<TemplateBuild>,
}

/// `PATCH /templates/{id}` and `PATCH /v2/templates/{id}`: what to change (absent: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateUpdateRequest {
    /// Whether every team may use it, or only its own.
    #[serde(default)]
    pub public: Option<bool>,
}

/// The answer to [`TemplateUpdateRequest`] on `PATCH /v2/templates/{id}` (200; v1 has no body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateUpdateResponse {
    pub names: Vec<String>,
}

/// One tag of `GET /templates/{id}/tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(rename = "createdAt", with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// `POST /templates/tags`: give the build `target` (`name:tag`) more tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignTemplateTags {
    pub target: String,
    pub tags: Vec<String>,
}

/// The answer to [`AssignTemplateTags`] (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedTemplateTags {
    pub tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// `DELETE /templates/tags`: remove tags of template `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteTemplateTags {
    pub name: String,
    pub tags: Vec<String>,
}
