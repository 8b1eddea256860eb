//! Forwards the guest's external address to listeners bound only to loopback.

use crate::config::Config;

/// The port subsystem: a scanner of `/proc/net/tcp{,6}` and in-process forwarders.
pub struct PortForwarder {}

impl PortForwarder {
    pub fn new(config: &Config) -> Self {
        let _ = config;
        PortForwarder {}
    }
}

impl PortForwarder {
    /// Starts scanning (no-op when disabled or already running).
    pub fn start(&self) {}

    /// Stops scanning and every forwarder; returns when they are gone.
    pub async fn stop(&self) {}
}
