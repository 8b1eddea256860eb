//! `wrenn agent`: one host of a cluster, run by a `wrenn server` control plane (one or several
//! replicas) on another machine.
//!
//! It joins a control plane with the cluster's join token (`POST /hosts/join`), which answers
//! this host's secret; then it starts the host (the same as `wrenn up`'s: slots, pools, host
//! templates, found in a shared template cache when one is given) and serves its RPC and
//! sandbox proxy on a TCP port where every request needs that secret. It heartbeats what it has
//! (`POST /hosts/{id}/heartbeat`) to whichever replica answers, and joins again when a control
//! plane no longer knows it. On SIGTERM it tells the control plane it is stopping (nothing new
//! is placed on it), pauses every running sandbox to disk (and copies each to the shared store,
//! if it has one), and has the control plane reconcile its records before it stops serving, so a restart loses nothing and the control plane never
//! writes off a sandbox that is only paused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;
use wrenn_agent::Agent;
use wrenn_agent::accel::Accel;
use wrenn_agent::surface::AgentSecret;
use wrenn_api::{Heartbeat, HostJoin, HostJoined, HostTemplate};

use crate::host::{self, HostArgs};
use crate::up::{StopSignals, create_private_dir, init_tracing};

/// `wrenn agent` arguments.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The control plane: the URL of a `wrenn server`, or of each replica, comma-separated
    /// (heartbeats go to the first that answers).
    #[arg(long, env = "WRENN_SERVER", value_delimiter = ',', required = true)]
    pub server: Vec<String>,
    /// The cluster's join token (`wrenn server` writes it to `<state>/join-token`).
    #[arg(long, env = "WRENN_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
    /// This host's ID in the cluster (default: the machine's host name).
    #[arg(long, env = "WRENN_HOST_ID")]
    pub host_id: Option<String>,
    /// Where the agent's RPC and sandbox proxy listen.
    #[arg(long, env = "WRENN_AGENT_LISTEN", default_value = "0.0.0.0:5007")]
    pub listen: SocketAddr,
    /// The URL control planes reach this agent at (default `http://<listen>`; required when
    /// listening on all addresses).
    #[arg(long, env = "WRENN_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// State: sandboxes, templates, snapshots.
    #[arg(long, env = "WRENN_STATE_DIR", default_value = "/var/lib/wrenn-agent")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub host: HostArgs,
}

/// Runs until interrupted.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    if !nix::unistd::geteuid().is_root() {
        bail!("wrenn agent needs root (network namespaces, taps and nftables for the sandboxes)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(agent(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let accel = Accel::choose(args.host.accel)?;
    let state = args.state_dir.clone();
    create_private_dir(&state)?;
    let host_id = match &args.host_id {
        Some(id) => id.clone(),
        None => nix::unistd::gethostname()
            .context("read the host name")?
            .to_string_lossy()
            .into_owned(),
    };
    let url = advertise_url(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let servers = Servers::new(&args.server, &args.join_token)?;
    let joined = servers.join(&host_id, &url).await;
    tracing::info!(host_id = %joined.host_id, url = %url, "joined the control plane");
    let secret = AgentSecret::new(joined.secret.clone())
        .context("the control plane answered an empty host secret")?;

    let host::Started { host, served } =
        host::start(&args.host, accel, &state, &host_id, &url).await?;
    let agent = host.agent().clone();
    let templates: Vec<HostTemplate> = served
        .iter()
        .map(|(id, snap)| host::host_template(id, snap))
        .collect();
    let stop_serving = CancellationToken::new();
    let server = tokio::spawn(wrenn_agent::surface::serve_tcp(
        listener,
        agent.clone(),
        secret,
        stop_serving.clone(),
    ));
    let stop = StopSignals::install().context("install signal handlers")?;
    let reporter = Reporter {
        servers,
        host_id,
        url,
        agent: agent.clone(),
        templates,
        secret: joined.secret,
        interval: Duration::from_millis(joined.heartbeat_interval_ms.max(100)),
        preferred: 0,
    };
    let stop_beating = CancellationToken::new();
    let beats = tokio::spawn(reporter.clone().run(stop_beating.clone()));
    println!(
        "wrenn agent {} serving at {}",
        reporter.host_id, reporter.url
    );

    stop.wait().await;
    tracing::info!("stopping: pausing running sandboxes");
    stop_beating.cancel();
    let _ = beats.await;
    let mut reporter = reporter;
    // Nothing new placed here, then everything paused, then the records brought in line
    // while the RPC still answers.
    reporter.beat(true).await;
    let paused = agent.suspend().await;
    // Copied for other hosts too, so they stay resumable while this one is down.
    wrenn_agent::shared::push_all(&agent, &paused).await;
    reporter.beat(true).await;
    stop_serving.cancel();
    let _ = server.await;
    tracing::info!(paused = paused.len(), "stopped");
    Ok(())
}

fn advertise_url(args: &AgentArgs) -> anyhow::Result<String> {
    if let Some(u) = &args.advertise_url {
        return Ok(u.trim_end_matches('/').to_owned());
    }
    if args.listen.ip().is_unspecified() {
        bail!(
            "--advertise-url is needed when listening on all addresses ({}): the URL control \
             planes reach this agent at",
            args.listen
        );
    }
    Ok(format!("http://{}", args.listen))
}

/// The control plane's replicas, tried in turn.
#[derive(Clone)]
struct Servers {
    urls: Vec<String>,
    join_token: String,
    http: reqwest::Client,
}

impl Servers {
    fn new(urls: &[String], join_token: &str) -> anyhow::Result<Self> {
        if join_token.trim().is_empty() {
            bail!("the join token is empty");
        }
        Ok(Servers {
            urls: urls
                .iter()
                .map(|u| u.trim().trim_end_matches('/').to_owned())
                .filter(|u| !u.is_empty())
                .collect(),
            join_token: join_token.trim().to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .context("HTTP client")?,
        })
    }

    /// Joins through the first replica that answers, retrying until one does (a refusal is
    /// final: a wrong token does not become right).
    async fn join(&self, host_id: &str, url: &str) -> HostJoined {
        let body = HostJoin {
            host_id: host_id.to_owned(),
            url: url.to_owned(),
        };
        let mut wait = Duration::from_millis(500);
        loop {
            for server in &self.urls {
                let res = self
                    .http
                    .post(format!("{server}/hosts/join"))
                    .bearer_auth(&self.join_token)
                    .json(&body)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => match r.json::<HostJoined>().await {
                        Ok(j) => return j,
                        Err(e) => tracing::warn!(server, error = %e, "join: bad answer"),
                    },
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        tracing::error!(server, %status, body = %text, "the control plane refused the join");
                        if status == reqwest::StatusCode::UNAUTHORIZED
                            || status == reqwest::StatusCode::BAD_REQUEST
                        {
                            eprintln!(
                                "error: the control plane refused the join ({status}): {text}"
                            );
                            std::process::exit(2);
                        }
                    }
                    Err(e) => tracing::warn!(server, error = %e, "join: no answer"),
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }
}

/// Sends the heartbeats.
#[derive(Clone)]
struct Reporter {
    servers: Servers,
    host_id: String,
    url: String,
    agent: Arc<Agent>,
    templates: Vec<HostTemplate>,
    secret: String,
    interval: Duration,
    /// The replica that took the last heartbeat.
    preferred: usize,
}

impl Reporter {
    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            tokio::select! {
                () = self.beat(false) => {}
                () = stop.cancelled() => break,
            }
        }
    }

    fn heartbeat(&self, stopping: bool) -> Heartbeat {
        let u = self.agent.usage();
        Heartbeat {
            vcpus: u.vcpus_total,
            memory_mb: u.memory_mb_total,
            memory_available_mb: u.memory_mb_available,
            disk_free_mb: u.disk_free_mb,
            max_sandboxes: u.max_sandboxes,
            sandboxes: u.sandboxes,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            templates: self.templates.clone(),
            stopping,
        }
    }

    /// One heartbeat, to the first replica that takes it, starting with the one that took the
    /// last (a dead replica costs one failed attempt, not one per beat); a control plane that
    /// does not know this host (or its secret) any more gets a new join first.
    async fn beat(&mut self, stopping: bool) {
        let body = self.heartbeat(stopping);
        let n = self.servers.urls.len();
        for k in 0..n {
            let at = (self.preferred + k) % n;
            let server = &self.servers.urls[at];
            let res = self
                .servers
                .http
                .post(format!("{server}/hosts/{}/heartbeat", self.host_id))
                .bearer_auth(&self.secret)
                .json(&body)
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => {
                    self.preferred = at;
                    return;
                }
                Ok(r)
                    if r.status() == reqwest::StatusCode::NOT_FOUND
                        || r.status() == reqwest::StatusCode::UNAUTHORIZED =>
                {
                    tracing::warn!(server, status = %r.status(), "the control plane does not know this host; joining again");
                    let joined = self.servers.join(&self.host_id, &self.url).await;
                    if joined.secret != self.secret {
                        tracing::error!(
                            "the control plane answered another secret for this host; restart the agent to serve it"
                        );
                    }
                    return;
                }
                Ok(r) => tracing::warn!(server, status = %r.status(), "heartbeat refused"),
                Err(e) => tracing::warn!(server, error = %e, "heartbeat: no answer"),
            }
        }
        tracing::error!("no control plane took the heartbeat");
    }
}
