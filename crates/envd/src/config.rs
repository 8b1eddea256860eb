//! envd's configuration, parsed once from flags and environment before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

/// How envd runs. Every flag has an `ENVD_*` environment variable too.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "envd", version = crate::ENVD_VERSION, about = "The Wrenn in-guest daemon")]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "ENVD_LISTEN", default_value = "0.0.0.0:49983")]
    pub listen: SocketAddr,

    /// Default user for processes and files before `/init` sets one.
    #[arg(long, env = "ENVD_DEFAULT_USER", default_value = "root")]
    pub default_user: String,

    /// Default working directory (relative paths still resolve against the user's home).
    #[arg(long, env = "ENVD_DEFAULT_WORKDIR")]
    pub default_workdir: Option<PathBuf>,

    /// An access token required from the start (tests, development). In a sandbox the token
    /// comes through `/init`, authorized by the hash the metadata service publishes.
    #[arg(long, env = "ENVD_ACCESS_TOKEN")]
    pub access_token: Option<String>,

    /// Lowercase hex SHA-512 of the only token `/init` may set when no metadata service is
    /// reachable (tests, development).
    #[arg(long, env = "ENVD_ACCESS_TOKEN_HASH")]
    pub access_token_hash: Option<String>,

    /// Base URL of the host's metadata service (the MMDS role). Unset: do not poll.
    #[arg(long, env = "ENVD_METADATA_URL")]
    pub metadata_url: Option<String>,

    /// Root of the cgroup v2 hierarchy.
    #[arg(long, env = "ENVD_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// Do not use cgroups at all.
    #[arg(long, env = "ENVD_NO_CGROUPS")]
    pub no_cgroups: bool,

    /// Disable the port forwarder (it binds the guest's external addresses).
    #[arg(long, env = "ENVD_NO_PORT_FORWARD")]
    pub no_port_forward: bool,

    /// The guest's external address: loopback-only listeners are forwarded from it.
    #[arg(long, env = "ENVD_FORWARD_ADDRESS", default_value = "169.254.0.21")]
    pub forward_address: std::net::IpAddr,

    /// Run as the guest's service: set `E2B_SANDBOX=true` for processes.
    #[arg(long, env = "ENVD_IN_SANDBOX")]
    pub in_sandbox: bool,

    /// Verbose logs.
    #[arg(short, long)]
    pub verbose: bool,
}

impl Config {
    /// A configuration for tests: loopback on an ephemeral port, no cgroups, no forwarder.
    pub fn for_tests() -> Self {
        use clap::Parser;
        Config::parse_from([
            "envd",
            "--listen",
            "127.0.0.1:0",
            "--no-cgroups",
            "--no-port-forward",
        ])
    }
}
