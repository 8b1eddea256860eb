//! A typed async client for QEMU's machine protocol (QMP) on a unix socket.
//!
//! QMP is newline-delimited JSON: the server greets, the client negotiates with
//! `qmp_capabilities`, then sends `{"execute", "arguments", "id"}` commands and reads
//! `{"return"|"error", "id"}` replies interleaved with asynchronous `{"event"}` messages.
//! [`Qmp`] matches replies to commands by id, so commands may be issued concurrently, and
//! fans events out to subscribers. It knows nothing about sandboxes.

mod client;
mod error;
mod types;

pub use client::Qmp;
pub use error::QmpError;
pub use types::{
    Event, MigrationCapability, MigrationInfo, MigrationStatus, StatusInfo, Timestamp,
};
