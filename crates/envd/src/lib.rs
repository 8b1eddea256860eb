//! envd: the E2B-compatible daemon that runs inside every sandbox.
//!
//! It serves, on one port (49983 by default), over HTTP/1.1 and h2c:
//! - the Connect services `process.Process` and `filesystem.Filesystem` ([`process`],
//!   [`filesystem`]);
//! - the HTTP API: `/health`, `/init`, `/files`, `/envs`, `/metrics`, `/snapshot/prepare`
//!   ([`http`]).
//!
//! Around them it keeps guest-local listeners reachable from outside ([`ports`]), keeps itself
//! alive with cgroups ([`cgroups`]) and quiesces for snapshots ([`lifecycle`]).
//! It runs the same as a plain process (tests, development) and as the guest's main service.
//!
//! The same binary has two more roles: `envd image …` builds a Wrenn root from container image
//! layers inside a build VM ([`image`]), and invoked as `init` it is PID 1 of such a guest
//! ([`pid1`]).

pub mod cgroups;
pub mod config;
mod creds;
pub mod error;
pub mod filesystem;
pub mod http;
pub mod image;
pub mod lifecycle;
pub mod paths;
pub mod pid1;
pub mod ports;
pub mod process;
pub mod rng;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod user;

use std::sync::Arc;

pub use config::Config;
pub use state::Envd;

/// The version of upstream envd whose SDK-visible features this envd implements.
///
/// The SDKs gate features on it (see `e2b-sdk-clients.md` section 5); 0.6.4 enables every path.
pub const ENVD_VERSION: &str = "0.6.4";

/// Builds the whole HTTP application for a running envd.
pub fn app(envd: Arc<Envd>) -> axum::Router {
    axum::Router::new()
        .merge(process::router(envd.clone()))
        .merge(filesystem::router(envd.clone()))
        .merge(http::router(envd.clone()))
        .layer(axum::middleware::from_fn_with_state(
            envd,
            http::auth::require_access_token,
        ))
}

/// Runs envd until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let envd = Envd::start(config).await?;
    server::serve(envd).await
}
