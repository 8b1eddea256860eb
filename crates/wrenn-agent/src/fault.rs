//! Fault injection for crash tests: `WRENN_FAULT=<point>` makes the agent process kill itself
//! with SIGKILL when it reaches that named point of an operation (`create:restored`,
//! `pause:saved`, ...), so a test can restart it and check what recovery makes of the host.
//! Unset (always, outside those tests), [`point`] is one relaxed load.

use std::sync::LazyLock;

/// The environment variable naming the point to die at.
pub(crate) const FAULT_ENV: &str = "WRENN_FAULT";

static FAULT: LazyLock<Option<String>> =
    LazyLock::new(|| std::env::var(FAULT_ENV).ok().filter(|v| !v.is_empty()));

/// Dies here (SIGKILL, no cleanup at all) if `WRENN_FAULT` names this point.
pub(crate) fn point(name: &str) {
    if FAULT.as_deref() == Some(name) {
        eprintln!("{FAULT_ENV}={name}: killing the agent process here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
