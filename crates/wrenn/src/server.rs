//! `wrenn server`: the control plane and the edge proxy without a host of their own, for a
//! cluster of `wrenn agent`s. Several replicas can serve one PostgreSQL database: they keep no
//! state of their own beyond the database, which also holds the cluster's settings (the server
//! secret every envd access token derives from, the agents' join token and the admin token;
//! made by the first replica to start, read by the others), so any replica answers any request
//! and routes any sandbox's traffic to its host.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wrenn_server::agents::ConnectConnector;
use wrenn_server::store::Store;
use wrenn_server::{Config, ControlPlane};

use crate::up::{
    StopSignals, create_private_dir, default_api_key, init_tracing, random_hex, redact,
    sandbox_domain, write_private,
};

/// `wrenn server` arguments.
///
/// Replicas share the database and, for template builds with `COPY` steps, `--build-files`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Where the API, sandbox traffic and the agents' joins and heartbeats are served.
    #[arg(long, env = "WRENN_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: SocketAddr,
    /// The URL printed for clients (default: `http://<listen>`).
    #[arg(long, env = "WRENN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// This replica's files: the default API key, the SDK environment, uploaded build contexts.
    #[arg(long, env = "WRENN_STATE_DIR", default_value = "/var/lib/wrenn-server")]
    pub state_dir: PathBuf,
    /// Where uploaded template build contexts are kept (default `<state>/build-files`): a
    /// directory every replica mounts, so a build can start through any of them.
    #[arg(long, env = "WRENN_BUILD_FILES")]
    pub build_files: Option<PathBuf>,
    /// `postgres://...` (needed for several replicas); default: SQLite in the state directory.
    #[arg(long, env = "WRENN_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The domain of sandbox host names `<port>-<sandboxID>.<domain>` (see `wrenn up`).
    #[arg(long, env = "WRENN_DOMAIN")]
    pub domain: Option<String>,
    /// Seconds between reconciliations of the sandbox records with each agent.
    #[arg(long, default_value_t = 30)]
    pub reconcile_interval: u64,
    /// Seconds between an agent's heartbeats (told to each agent when it joins).
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_interval: f64,
    /// Seconds without a heartbeat after which an agent is unhealthy: nothing new goes there.
    #[arg(long, default_value_t = 15.0)]
    pub host_unhealthy_after: f64,
    /// Seconds without a heartbeat after which an agent is lost: its running sandboxes are
    /// written off (reported as lost); paused ones stay paused.
    #[arg(long, default_value_t = 60.0)]
    pub host_lost_after: f64,
    /// Seconds a record may stay mid-operation before the reconciler settles it from its agent.
    #[arg(long, default_value_t = 180.0, hide = true)]
    pub settle_grace: f64,
    /// Seconds one replica owns a timed-out sandbox it is stopping before another may.
    #[arg(long, default_value_t = 60.0, hide = true)]
    pub expire_lease: f64,
}

/// Runs until interrupted.
pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(server(args))?;
    Ok(ExitCode::SUCCESS)
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{s} is not a number of seconds"))
}

/// The cluster's settings, from the database (made by the first replica).
struct ClusterSettings {
    secret: Vec<u8>,
    join_token: String,
    admin_token: String,
}

async fn cluster_settings(database_url: &str) -> anyhow::Result<ClusterSettings> {
    let store = Store::open(database_url)
        .await
        .with_context(|| format!("open the database {}", redact(database_url)))?;
    let read = async {
        Ok::<_, wrenn_server::store::StoreError>(ClusterSettings {
            secret: store
                .setting_or_init("server_secret", &random_hex(32))
                .await?
                .into_bytes(),
            join_token: store.setting_or_init("join_token", &random_hex(24)).await?,
            admin_token: store
                .setting_or_init("admin_token", &random_hex(32))
                .await?,
        })
    };
    let settings = read.await.context("read the cluster settings")?;
    store.close().await;
    Ok(settings)
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let state = args.state_dir.clone();
    create_private_dir(&state)?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", state.join("wrenn.db").display()));
    let settings = cluster_settings(&database_url).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr()?;
    let url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let mut config = Config::new(database_url.clone(), settings.secret);
    config.admin_token = Some(settings.admin_token.clone());
    config.join_token = Some(settings.join_token.clone());
    config.domain = sandbox_domain(args.domain.as_deref(), addr);
    config.api_url = Some(url.clone());
    config.build_files = Some(
        args.build_files
            .clone()
            .unwrap_or_else(|| state.join("build-files")),
    );
    config.reconcile_interval = Duration::from_secs(args.reconcile_interval.max(1));
    config.heartbeat_interval = secs(args.heartbeat_interval)?;
    config.host_unhealthy_after = secs(args.host_unhealthy_after)?;
    config.host_lost_after = secs(args.host_lost_after)?;
    config.settle_grace = secs(args.settle_grace)?;
    config.expire_lease = secs(args.expire_lease)?;
    let cp = ControlPlane::open(config, std::sync::Arc::new(ConnectConnector))
        .await
        .with_context(|| format!("open the database {}", redact(&database_url)))?;
    let api_key = default_api_key(&cp, &state.join("api-key")).await?;

    let shutdown = CancellationToken::new();
    let reaper = wrenn_server::reaper::spawn(cp.clone(), shutdown.child_token());
    let reconciler = wrenn_server::reconcile::spawn(cp.clone(), shutdown.child_token());
    let monitor = wrenn_server::hosts::spawn_monitor(cp.clone(), shutdown.child_token());
    let stop = StopSignals::install().context("install signal handlers")?;
    let env = format!(
        "export E2B_API_URL={url}\nexport E2B_SANDBOX_URL={url}\nexport E2B_API_KEY={api_key}\n"
    );
    write_private(&state.join("env"), env.as_bytes())?;
    write_private(
        &state.join("join-token"),
        format!("{}\n", settings.join_token).as_bytes(),
    )?;
    write_private(
        &state.join("admin-token"),
        format!("{}\n", settings.admin_token).as_bytes(),
    )?;
    let served = tokio::spawn(wrenn_server::serve(
        listener,
        wrenn_server::app(cp.clone()),
        shutdown.child_token(),
    ));
    println!(
        "Wrenn control plane serving at {url} ({db}).\n\
         Join hosts with:\n  wrenn agent --server {url} --join-token $(cat {token}) --advertise-url http://<host>:5007\n\
         For the E2B SDKs:\n{env}",
        db = if database_url.starts_with("postgres") {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        token = state.join("join-token").display(),
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    stop.wait().await;
    tracing::info!("stopping");
    shutdown.cancel();
    let _ = served.await;
    let _ = reaper.await;
    let _ = reconciler.await;
    let _ = monitor.await;
    cp.store().close().await;
    Ok(())
}
