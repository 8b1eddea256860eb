//! The interpreter's configuration, parsed once from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the interpreter runs. Every flag has a `WRENN_INTERPRETER_*` environment variable too.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "wrenn-interpreter",
    version,
    about = "E2B code-interpreter compatible server: one Python process per context"
)]
pub struct Config {
    /// Address to listen on (the SDKs reach port 49999).
    #[arg(
        long,
        env = "WRENN_INTERPRETER_LISTEN",
        default_value = "0.0.0.0:49999"
    )]
    pub listen: SocketAddr,

    /// The Python that runs the cells (looked up in PATH unless a path).
    #[arg(long, env = "WRENN_INTERPRETER_PYTHON", default_value = "python3")]
    pub python: PathBuf,

    /// Working directory of contexts created without one; when it does not exist, `$HOME`,
    /// then `/`.
    #[arg(
        long,
        env = "WRENN_INTERPRETER_DEFAULT_CWD",
        default_value = "/home/user"
    )]
    pub default_cwd: PathBuf,

    /// envd, whose `/envs` (the sandbox's environment variables, set after this server
    /// started) each context applies before its first execution. Empty: do not ask.
    #[arg(
        long,
        env = "WRENN_INTERPRETER_ENVD_URL",
        default_value = "http://127.0.0.1:49983"
    )]
    pub envd_url: String,

    /// Seconds an interrupted execution (its client went away) may take to stop before its
    /// worker is killed and the context starts over with empty state.
    #[arg(long, env = "WRENN_INTERPRETER_INTERRUPT_GRACE", default_value = "10", value_parser = seconds)]
    pub interrupt_grace: Duration,

    /// Seconds of silence after which an execution's stream carries a keepalive line (so a
    /// client that went away is noticed).
    #[arg(long, env = "WRENN_INTERPRETER_KEEPALIVE", default_value = "5", value_parser = seconds)]
    pub keepalive: Duration,

    /// Seconds a new worker may take to start.
    #[arg(long, env = "WRENN_INTERPRETER_START_TIMEOUT", default_value = "30", value_parser = seconds)]
    pub start_timeout: Duration,

    /// Verbose logs.
    #[arg(short, long)]
    pub verbose: bool,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

impl Config {
    /// The defaults, as if started without flags (tests change what they need).
    pub fn defaults() -> Config {
        <Config as clap::Parser>::parse_from(["wrenn-interpreter"])
    }
}
