//! cgroup v2 layout that keeps envd alive whatever user code does.

use std::path::PathBuf;

use crate::config::Config;

/// Where a spawned process goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Commands started without a PTY.
    User,
    /// Interactive terminals.
    Pty,
}

/// envd's cgroups, or nothing where cgroup v2 is absent.
pub struct Cgroups {}

impl Cgroups {
    pub fn setup(config: &Config) -> Self {
        let _ = config;
        Cgroups {}
    }

    /// The `cgroup.procs` file a new process of `group` must join, if cgroups are in use.
    ///
    /// The process module opens it before fork and writes `0` to it in the child before exec,
    /// so the process (and all it forks) starts inside the group.
    pub fn procs_path(&self, group: Group) -> Option<PathBuf> {
        let _ = group;
        None
    }
}
