//! wrenn-interpreter: the in-guest server behind the E2B code-interpreter SDKs
//! (`Sandbox.run_code`, `create_code_context`, ...), on port 49999 as E2B's is.
//!
//! Each context is one long-lived Python process running `driver.py`, talking to this
//! server over its stdin and stdout in JSON lines; its globals are the context's state.
//! A default context is started before the server answers `/health`, so a template's
//! memory snapshot holds it ready.
//!
//! - [`http`]: the routes and the streamed `/execute` body
//! - [`wire`]: the JSON the SDKs send and read, and the worker's events
//! - [`registry`]: the contexts and the default one
//! - [`context`]: one context: queued executions, interrupts, restart
//! - [`worker`]: the Python process and its pipes
//! - [`envd`]: the sandbox's environment variables from envd
//! - [`error`]: the one place errors become HTTP statuses

pub mod config;
pub mod context;
pub mod envd;
pub mod error;
pub mod http;
pub mod registry;
pub mod wire;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;

use crate::registry::Registry;

/// What contexts need from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub python: PathBuf,
    pub default_cwd: PathBuf,
    pub envd_url: Option<String>,
    pub interrupt_grace: Duration,
    pub start_timeout: Duration,
}

impl Settings {
    fn from_config(config: &Config) -> Settings {
        Settings {
            python: config.python.clone(),
            default_cwd: config.default_cwd.clone(),
            envd_url: Some(config.envd_url.clone()).filter(|u| !u.is_empty()),
            interrupt_grace: config.interrupt_grace,
            start_timeout: config.start_timeout,
        }
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {0}")]
    Bind(std::net::SocketAddr, #[source] std::io::Error),
    #[error("serve HTTP")]
    Serve(#[source] std::io::Error),
}

/// Listens on `config.listen` and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServeError::Bind(config.listen, e))?;
    serve(listener, config, stop_signal()).await
}

/// Starts the default context, then serves on `listener` until `stop` resolves; then kills
/// every worker.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let registry = Arc::new(Registry::new(Arc::new(Settings::from_config(&config))));
    if let Err(e) = registry.default_context().await {
        // Served anyway: the first execution tries again and reports why it fails.
        tracing::error!(error = error::chain(&e), "default context");
    }
    let app = http::router(registry.clone(), config.keepalive);
    tracing::info!(listen = %config.listen, "serving");
    let closing = registry.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.await;
            // Running executions end now (with an error line) instead of holding the
            // graceful shutdown up.
            closing.close_all().await;
        })
        .await
        .map_err(ServeError::Serve)?;
    registry.close_all().await;
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("no signal handlers: stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
}

/// Logging: plain text to stderr, level from `RUST_LOG` (default `info`, `debug` with -v).
pub fn init_logging(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
