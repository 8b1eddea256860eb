//! Snapshot lifecycle: quiesce on `/snapshot/prepare`, restart on `/init`.

/// Tracks whether envd is prepared for a snapshot.
#[derive(Default)]
pub struct Lifecycle {}
