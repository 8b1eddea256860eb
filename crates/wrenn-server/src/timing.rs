//! Where a create's time went, as the standard `Server-Timing` response header
//! (<https://www.w3.org/TR/server-timing/>): the control plane's own steps (placement, the
//! agent call, the store write) and the steps the agent reported for its part.
//!
//! Clients (browsers' dev tools, `wrenn bench`) read it without any Wrenn-specific parsing.
//! A metric from the agent is passed on only when its name is a plain token and its duration
//! a real one, so whatever an agent sends can never break the header.

use std::time::Duration;

use wrenn_agent_proto::v1::Stage;

/// The response header.
pub(crate) const HEADER: &str = "server-timing";

/// Named durations in the order they happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ServerTiming {
    metrics: Vec<(String, f64)>,
}

impl ServerTiming {
    /// Appends a step of the control plane.
    pub(crate) fn push(&mut self, name: &str, took: Duration) {
        self.push_ms(name, took.as_secs_f64() * 1000.0);
    }

    /// Appends the steps an agent reported, skipping any that could not be a metric (a name
    /// that is not a plain token, a negative or non-finite duration).
    pub(crate) fn extend_from_agent(&mut self, stages: &[Stage]) {
        for s in stages {
            self.push_ms(&s.name, s.duration_ms);
        }
    }

    fn push_ms(&mut self, name: &str, ms: f64) {
        if name.is_empty() || !name.chars().all(is_token_char) || !ms.is_finite() || ms < 0.0 {
            return;
        }
        self.metrics.push((name.to_owned(), ms));
    }

    /// The header's value, e.g. `placement;dur=1.2, agent;dur=640.0`; `None` with nothing
    /// measured.
    pub(crate) fn header_value(&self) -> Option<String> {
        if self.metrics.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .metrics
            .iter()
            .map(|(name, ms)| format!("{name};dur={ms:.1}"))
            .collect();
        Some(parts.join(", "))
    }
}

/// A `token` character of RFC 9110 that is also safe to read back unquoted: letters, digits,
/// `-`, `_` and `.`.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, duration_ms: f64) -> Stage {
        Stage {
            name: name.to_owned(),
            duration_ms,
        }
    }

    #[test]
    fn header_lists_steps_in_order() {
        let mut t = ServerTiming::default();
        assert_eq!(t.header_value(), None);
        t.push("placement", Duration::from_micros(1_240));
        t.extend_from_agent(&[stage("restore", 20.04), stage("init", 3.0)]);
        t.push("store", Duration::from_millis(2));
        assert_eq!(
            t.header_value().as_deref(),
            Some("placement;dur=1.2, restore;dur=20.0, init;dur=3.0, store;dur=2.0")
        );
    }

    #[test]
    fn agent_metrics_that_are_not_tokens_or_durations_are_dropped() {
        let mut t = ServerTiming::default();
        t.extend_from_agent(&[
            stage("re-store_2.x", 1.0),
            stage("x, y;dur=9", 1.0),
            stage("", 1.0),
            stage(";,", 1.0),
            stage("nan", f64::NAN),
            stage("neg", -1.0),
            stage("inf", f64::INFINITY),
        ]);
        assert_eq!(t.header_value().as_deref(), Some("re-store_2.x;dur=1.0"));
    }
}
