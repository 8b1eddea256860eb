//! Errors of the QMP client.

use std::time::Duration;

/// Why a QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to or talking on the socket failed.
    #[error("QMP socket I/O")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not QMP.
    #[error("malformed QMP message: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The reply did not have the shape the typed helper expected.
    #[error("unexpected reply to {command}")]
    Decode {
        /// The command whose reply did not decode.
        command: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The connection closed (QEMU exited or closed the monitor).
    #[error("QMP connection closed")]
    Disconnected,
    /// An operation did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A migration ended in a state other than `completed`.
    #[error("migration ended as {status}: {desc}")]
    MigrationFailed {
        /// The final status.
        status: String,
        /// QEMU's error description, if any.
        desc: String,
    },
}
