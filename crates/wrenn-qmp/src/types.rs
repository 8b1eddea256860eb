//! Typed QMP arguments and replies for the commands the runtime uses.

use serde::{Deserialize, Serialize};

/// An asynchronous QMP event, e.g. `STOP`, `RESUME`, `MIGRATION`, `SHUTDOWN`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// The event name.
    #[serde(rename = "event")]
    pub name: String,
    /// Event-specific data (`null` when absent).
    #[serde(default)]
    pub data: serde_json::Value,
    /// When QEMU emitted it.
    pub timestamp: Timestamp,
}

/// QMP's event timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// The reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state, e.g. `running`, `paused`, `inmigrate`, `postmigrate`, `prelaunch`.
    pub status: String,
}

/// A migration capability (`migrate-set-capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigrationCapability {
    /// Do not copy RAM blocks backed by shared memory: the memory file already holds them.
    XIgnoreShared,
    /// Emit MIGRATION events on every status change.
    Events,
    /// Allow migration while the VM is paused without re-running it.
    PauseBeforeSwitchover,
    /// Use fixed offsets for RAM pages in a `file:` stream.
    MappedRam,
}

/// The status of a migration (`query-migrate`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has been started.
    None,
    /// Set up, not yet transferring.
    Setup,
    /// Transferring.
    Active,
    /// Finished successfully.
    Completed,
    /// Failed; see `error-desc`.
    Failed,
    /// Cancelled by a command.
    Cancelled,
    /// Being cancelled.
    Cancelling,
    /// Any state this client does not model (postcopy, device, wait-unplug, ...).
    #[serde(other)]
    Other,
}

impl MigrationStatus {
    /// Whether no further change is expected.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// The reply of `query-migrate` (the fields the runtime reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Absent before any migration was started.
    pub status: Option<MigrationStatus>,
    /// Total time of a finished migration, in milliseconds.
    pub total_time: Option<u64>,
    /// Downtime of a finished migration, in milliseconds.
    pub downtime: Option<u64>,
    /// Why a migration failed.
    pub error_desc: Option<String>,
}
