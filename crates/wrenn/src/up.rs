//! `wrenn up`: the control plane, one host agent and the proxy in one process, on embedded
//! SQLite unless a database URL is given.
//!
//! Start-up order matters: the agent first takes the VMs root (an exclusive lock), scans it
//! and cleans what a previous run left behind (stray QEMU, orphan slots) *before* it creates
//! slots, so nothing it creates is mistaken for garbage; then the default template is found or
//! built (a cold boot of the Debian image, minutes on the very first run); then the agent
//! takes back the paused sandboxes it found, and the control plane reconciles its records with
//! what the agent holds. On Ctrl-C or SIGTERM the agent pauses every running sandbox to disk,
//! so a restart loses nothing and `connect` resumes them.
//!
//! The agent's RPC and traffic proxy listen on a Unix socket only root can open
//! (`<state>/run/agent.sock`, see `wrenn_agent::surface`); the public port serves the E2B REST
//! API and the sandbox traffic (the edge proxy) together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;
use wrenn_agent::accel::Accel;
use wrenn_server::agents::ConnectConnector;
use wrenn_server::store::TemplateRecord;
use wrenn_server::{Config, ControlPlane};

use crate::host;
pub use crate::host::{CODE_INTERPRETER_TEMPLATE, DEFAULT_TEMPLATE};
/// The host ID of the agent inside `wrenn up`.
const LOCAL_HOST: &str = "local";

/// `wrenn up` arguments.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the API and sandbox traffic are served.
    #[arg(long, env = "WRENN_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// The URL printed for clients (default: `http://<listen>`).
    #[arg(long, env = "WRENN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// State: database, secrets, templates, sandboxes.
    #[arg(long, env = "WRENN_STATE_DIR", default_value = "/var/lib/wrenn")]
    pub state_dir: PathBuf,
    /// `postgres://...` to use PostgreSQL; default: SQLite in the state directory.
    #[arg(long, env = "WRENN_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Seconds between reconciliations of the sandbox records with the agent.
    #[arg(long, default_value_t = 30)]
    pub reconcile_interval: u64,
    /// The domain of sandbox host names `<port>-<sandboxID>.<domain>`: the edge proxy routes
    /// them, and the SDKs' `get_host(port)` answers them. Default when listening on loopback
    /// or all addresses: `localhost:<port>` (curl and browsers resolve `*.localhost` to
    /// loopback).
    #[arg(long, env = "WRENN_DOMAIN")]
    pub domain: Option<String>,
    #[command(flatten)]
    pub host: crate::host::HostArgs,
}

/// Runs until interrupted.
pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    if !nix::unistd::geteuid().is_root() {
        bail!("wrenn up needs root (network namespaces, taps and nftables for the sandboxes)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(up(args))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WRENN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,hyper=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    // The accelerator first: `--accel kvm` on a host without KVM fails before anything is made.
    let accel = Accel::choose(args.host.accel)?;
    let state = args.state_dir.clone();
    create_private_dir(&state)?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", state.join("wrenn.db").display()));
    let secret_file = state.join("secret");
    if !secret_file.exists() {
        refuse_new_secret_over_sandboxes(&state, &database_url).await?;
    }
    let secret = read_or_create_secret(&secret_file)?;
    let admin_token = read_or_create_token(&state.join("admin-token"))?;

    // 1. The host: own the VMs root, take over or clean what an earlier run left, the slot
    // pool and the agent; guests' way out; the host templates with their pools.
    let socket = state.join("run").join("agent.sock");
    let internal = wrenn_agent::surface::bind_unix(&socket)
        .with_context(|| format!("bind the agent's socket {}", socket.display()))?;
    let internal_url = format!("unix:{}", socket.display());
    tracing::info!(url = %internal_url, "agent RPC and sandbox proxy listening (root-only Unix socket)");
    let host::Started { host, served } =
        host::start(&args.host, accel, &state, LOCAL_HOST, &internal_url).await?;
    let snapshot = served[0].1.clone();
    let agent = host.agent().clone();
    let shutdown = CancellationToken::new();
    // Its own token: at shutdown the agent must still answer the control plane's reconcile
    // after the public port has closed.
    let agent_stop = CancellationToken::new();
    let agent_server = tokio::spawn(wrenn_agent::surface::serve_unix(
        internal,
        agent.clone(),
        agent_stop.clone(),
    ));

    // 3. The control plane, its records reconciled with the agent. The public port is bound
    // first: the sandbox domain the control plane hands out names its port.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr()?;
    let domain = sandbox_domain(args.domain.as_deref(), addr);
    let url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let cp = control_plane(
        &args,
        ControlPlaneSite {
            domain: domain.clone(),
            api_url: url.clone(),
            build_files: state.join("build-files"),
        },
        &database_url,
        secret,
        admin_token,
        &served,
        &internal_url,
    )
    .await?;
    let api_key = default_api_key(&cp, &state.join("api-key")).await?;
    let reaper = wrenn_server::reaper::spawn(cp.clone(), shutdown.child_token());
    let reconciler = wrenn_server::reconcile::spawn(cp.clone(), shutdown.child_token());

    // 4. The public port (bound in step 3).
    // Handlers first: a supervisor may send SIGTERM the moment it reads the lines below.
    let stop = StopSignals::install().context("install signal handlers")?;
    let env = format!(
        "export E2B_API_URL={url}\nexport E2B_SANDBOX_URL={url}\nexport E2B_API_KEY={api_key}\n"
    );
    write_private(&state.join("env"), env.as_bytes())?;
    let server = tokio::spawn(wrenn_server::serve(
        listener,
        wrenn_server::app(cp.clone()),
        shutdown.child_token(),
    ));
    let db = if database_url.starts_with("postgres") {
        "PostgreSQL".to_owned()
    } else {
        format!("SQLite {}", state.join("wrenn.db").display())
    };
    println!(
        "{}",
        banner(
            &url,
            snapshot.manifest.spec.accel,
            &template_list(&served),
            &db,
            domain.as_deref(),
            &state,
            &env
        )
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    stop.wait().await;
    tracing::info!("stopping: pausing running sandboxes");
    // New requests stop at once; running sandboxes are paused to disk, then the records follow.
    shutdown.cancel();
    let _ = server.await;
    let _ = reaper.await;
    let _ = reconciler.await;
    let paused = agent.suspend().await;
    if let Err(e) = cp
        .reconcile_host_with_grace(LOCAL_HOST, Duration::ZERO)
        .await
    {
        // The agent's RPC port may already be gone; the next start reconciles again.
        tracing::warn!(error = %wrenn_agent::error_chain(&e), "reconcile at shutdown");
    }
    agent_stop.cancel();
    let _ = agent_server.await;
    tracing::info!(paused = paused.len(), "stopped");
    cp.store().close().await;
    Ok(())
}

/// Opens the store, registers the local agent and the default template, and settles records
/// left mid-operation by an earlier run.
/// Where the control plane is reached and keeps its files.
struct ControlPlaneSite {
    /// The sandbox domain (see `sandbox_domain`).
    domain: Option<String>,
    /// The URL of the public port.
    api_url: String,
    /// Uploaded template build contexts.
    build_files: PathBuf,
}

async fn control_plane(
    args: &UpArgs,
    site: ControlPlaneSite,
    database_url: &str,
    secret: Vec<u8>,
    admin_token: String,
    templates: &[(&str, wrenn_agent::snapshot::Snapshot)],
    internal_url: &str,
) -> anyhow::Result<Arc<ControlPlane>> {
    let mut config = Config::new(database_url.to_owned(), secret);
    config.admin_token = Some(admin_token);
    config.reconcile_interval = Duration::from_secs(args.reconcile_interval.max(1));
    config.domain = site.domain;
    config.api_url = Some(site.api_url);
    config.build_files = Some(site.build_files);
    let cp = ControlPlane::open(config, Arc::new(ConnectConnector))
        .await
        .with_context(|| format!("open the database {}", redact(database_url)))?;
    cp.register_host(LOCAL_HOST, internal_url, internal_url)
        .await
        .map_err(|e| anyhow::anyhow!("register the local agent: {e}"))?;
    for (id, snapshot) in templates {
        let t = host::host_template(id, snapshot);
        cp.register_template(&TemplateRecord {
            id: t.id,
            team_id: None,
            envd_version: t.envd_version,
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
            name: None,
            build: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("register the template {id}: {e}"))?;
    }
    // Nothing is in flight before the port opens (this is the only control plane of its
    // database), so records left mid-operation by a crash are settled now, without a grace;
    // a template build that was running then ended with that run's agent.
    cp.fail_stale_builds(Duration::ZERO)
        .await
        .map_err(|e| anyhow::anyhow!("fail interrupted template builds: {e}"))?;
    let rec = cp
        .reconcile_host_with_grace(LOCAL_HOST, Duration::ZERO)
        .await
        .map_err(|e| anyhow::anyhow!("reconcile sandbox records: {e}"))?;
    if rec != Default::default() {
        tracing::info!(
            changed = rec.changed.len(),
            lost = rec.lost.len(),
            removed = rec.removed.len(),
            orphans = rec.orphans.len(),
            "sandbox records reconciled with the agent"
        );
    }
    Ok(cp)
}

/// The banner's list of templates, e.g. "templates `base`, `code-interpreter-v1`".
fn template_list(served: &[(&str, wrenn_agent::snapshot::Snapshot)]) -> String {
    let names: Vec<String> = served.iter().map(|(id, _)| format!("`{id}`")).collect();
    let noun = if names.len() == 1 {
        "template"
    } else {
        "templates"
    };
    format!("{noun} {}", names.join(", "))
}

/// What `wrenn up` prints once it serves; the SDK environment comes last (scripts read up to
/// `E2B_API_KEY`).
fn banner(
    url: &str,
    accel: Accel,
    templates: &str,
    db: &str,
    domain: Option<&str>,
    state: &Path,
    env: &str,
) -> String {
    let mut out = format!("Wrenn is up on {url} ({accel}, {templates}, {db}).\n");
    if accel == Accel::Tcg {
        tracing::warn!("{}", wrenn_agent::accel::TCG_WARNING);
        out.push_str(&format!("Warning: {}\n", wrenn_agent::accel::TCG_WARNING));
    }
    match domain {
        Some(d) => out.push_str(&format!(
            "Sandbox ports are served at http://<port>-<sandboxID>.{d} (the SDKs' get_host).\n"
        )),
        None => out.push_str("Sandbox ports have no host names: pass --domain for get_host.\n"),
    }
    out.push_str(&format!(
        "Use the E2B SDKs or `wrenn sandbox` with (also in {}):\n\n{env}",
        state.join("env").display()
    ));
    out
}

/// The domain of sandbox host names: `--domain`, else `localhost:<port>` when the public port
/// is reachable on loopback (curl and browsers resolve `*.localhost` there), else none (the
/// SDKs then fall back to their own `E2B_DOMAIN`).
pub(crate) fn sandbox_domain(configured: Option<&str>, listen: SocketAddr) -> Option<String> {
    if let Some(d) = configured.map(str::trim).filter(|d| !d.is_empty()) {
        return Some(d.trim_end_matches('.').to_owned());
    }
    let ip = listen.ip();
    (ip.is_loopback() || ip.is_unspecified()).then(|| format!("localhost:{}", listen.port()))
}

/// What every template of `wrenn up` boots with beside its root filesystem.
/// The default team's API key: the one in `path` if the database knows it, else a new team
/// and key (written to `path`, readable by root only).
pub(crate) async fn default_api_key(cp: &ControlPlane, path: &Path) -> anyhow::Result<String> {
    if let Ok(key) = std::fs::read_to_string(path) {
        let key = key.trim().to_owned();
        if !key.is_empty()
            && cp
                .authenticate(&key)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .is_some()
        {
            return Ok(key);
        }
    }
    let team = cp
        .create_team("default")
        .await
        .map_err(|e| anyhow::anyhow!("create the default team: {e}"))?;
    let key = cp
        .create_api_key(&team.team_id, "wrenn up")
        .await
        .map_err(|e| anyhow::anyhow!("create an API key: {e}"))?;
    write_private(path, format!("{}\n", key.key).as_bytes())?;
    Ok(key.key)
}

pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

pub(crate) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Writes a file only root can read, atomically.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

/// Stops `wrenn up` before it makes a new server secret over sandboxes made with the old one
/// (called when `<state>/secret` is missing). Their envd access tokens are HMACs of the secret,
/// and a running or paused guest keeps the token it was given: a new secret would lock every
/// client out of them for good. Sandboxes are the live records of the database and the
/// directories in `sandboxes/`; the agent's lock file and warm-pool VMs (no identity yet) do
/// not count, nor do killed records (nobody can reach those anyway).
async fn refuse_new_secret_over_sandboxes(state: &Path, database_url: &str) -> anyhow::Result<()> {
    let vms_root = state.join("sandboxes");
    let mut found: Vec<String> = std::fs::read_dir(&vms_root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !n.starts_with("warm-"))
        .map(|n| format!("{}", vms_root.join(n).display()))
        .collect();
    found.sort();
    let sqlite_file = database_url
        .strip_prefix("sqlite://")
        .map(|rest| Path::new(rest.split('?').next().unwrap_or(rest)));
    // Opening a SQLite file that does not exist would create it: there are no records then.
    if sqlite_file.is_none_or(Path::exists) {
        let store = wrenn_server::store::Store::open(database_url)
            .await
            .with_context(|| format!("open the database {}", redact(database_url)))?;
        let live = store.live_sandbox_count().await;
        store.close().await;
        match live.context("count the sandbox records")? {
            0 => {}
            n => found.push(format!("{n} sandbox records in {}", redact(database_url))),
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let secret = state.join("secret");
    bail!(
        "the server secret {secret} is missing, but sandboxes made with it exist:\n  {list}\n\
         Their envd access tokens derive from that secret, so a new one would lock clients out \
         of them. Restore {secret} from a backup and start again; or, to give those sandboxes \
         up, remove them deliberately (the sandboxes directory {vms} and the database's \
         sandbox records) and start again.",
        secret = secret.display(),
        list = found.join("\n  "),
        vms = vms_root.display(),
    )
}

fn read_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(read_or_create_token(path)?.into_bytes())
}

pub(crate) fn read_or_create_token(path: &Path) -> anyhow::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path)
        && !s.trim().is_empty()
    {
        return Ok(s.trim().to_owned());
    }
    let token = random_hex(32);
    write_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
pub(crate) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    pub(crate) async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use wrenn_core::{HostId, SandboxId, SandboxState, TeamId, UnixMillis};
    use wrenn_server::store::{SandboxRecord, Store, TeamRecord};

    use super::*;

    fn url(state: &Path) -> String {
        format!("sqlite://{}", state.join("wrenn.db").display())
    }

    async fn add_sandbox(state: &Path, sandbox_state: SandboxState) {
        let store = Store::open(&url(state)).await.unwrap();
        let team = TeamId::parse("t").unwrap();
        let _ = store
            .insert_team(
                &TeamRecord {
                    id: team.clone(),
                    name: "t".into(),
                },
                UnixMillis(0),
            )
            .await;
        let rec = SandboxRecord {
            id: SandboxId::from_random(rand::random()),
            team_id: team,
            template_id: "base".into(),
            state: sandbox_state,
            host_id: Some(HostId::parse(LOCAL_HOST).unwrap()),
            vcpus: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            envd_version: "0.6.4".into(),
            metadata: Default::default(),
            env_vars: Default::default(),
            started_at: UnixMillis(0),
            end_at: UnixMillis(1),
            auto_pause: false,
            auto_resume: false,
            auto_pause_memory: true,
            paused_memory: true,
            allow_internet_access: None,
            updated_at: UnixMillis(0),
            network: None,
        };
        store.insert_sandbox(&rec).await.unwrap();
        store.close().await;
    }

    #[test]
    fn sandbox_domain_is_configured_or_loopback() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            sandbox_domain(None, at("127.0.0.1:3000")).as_deref(),
            Some("localhost:3000")
        );
        assert_eq!(
            sandbox_domain(None, at("0.0.0.0:41")).as_deref(),
            Some("localhost:41")
        );
        assert_eq!(
            sandbox_domain(None, at("[::1]:5")).as_deref(),
            Some("localhost:5")
        );
        assert_eq!(sandbox_domain(None, at("192.0.2.7:3000")), None);
        assert_eq!(
            sandbox_domain(Some("sbx.example.test."), at("192.0.2.7:3000")).as_deref(),
            Some("sbx.example.test")
        );
        assert_eq!(
            sandbox_domain(Some(" "), at("127.0.0.1:9")).as_deref(),
            Some("localhost:9")
        );
    }

    #[test]
    fn the_banner_says_when_tcg_is_no_boundary() {
        let env = "export E2B_API_KEY=k\n";
        let tcg = banner(
            "u",
            Accel::Tcg,
            "template `base`",
            "db",
            Some("localhost:3"),
            Path::new("/s"),
            env,
        );
        assert!(
            tcg.contains("does not treat TCG as a security boundary"),
            "{tcg}"
        );
        assert!(
            tcg.contains("http://<port>-<sandboxID>.localhost:3"),
            "{tcg}"
        );
        assert!(tcg.ends_with(env), "the environment must come last: {tcg}");
        let kvm = banner(
            "u",
            Accel::Kvm,
            "template `base`",
            "db",
            None,
            Path::new("/s"),
            env,
        );
        assert!(!kvm.contains("TCG"), "{kvm}");
        assert!(kvm.contains("--domain"), "{kvm}");
    }

    #[tokio::test]
    async fn a_new_secret_is_refused_only_over_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        // A fresh state directory: a secret may be made, and no database appears.
        refuse_new_secret_over_sandboxes(state, &url(state))
            .await
            .unwrap();
        assert!(!state.join("wrenn.db").exists());
        // The agent's lock file and warm VMs are no sandboxes; killed records are history.
        std::fs::create_dir_all(state.join("sandboxes/warm-12-0")).unwrap();
        std::fs::write(state.join("sandboxes/.wrenn-agent.lock"), "").unwrap();
        add_sandbox(state, SandboxState::Killed).await;
        refuse_new_secret_over_sandboxes(state, &url(state))
            .await
            .unwrap();

        // A live record.
        add_sandbox(state, SandboxState::Paused).await;
        let err = refuse_new_secret_over_sandboxes(state, &url(state))
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("1 sandbox records"), "{msg}");
        assert!(msg.contains("Restore"), "{msg}");

        // A sandbox directory alone (its records lost or in another database).
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("sandboxes/abc123")).unwrap();
        let err = refuse_new_secret_over_sandboxes(other.path(), &url(other.path()))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("sandboxes/abc123"), "{err:#}");
    }
}
