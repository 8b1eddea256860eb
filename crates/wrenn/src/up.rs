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
use wrenn_agent::accel::{Accel, AccelChoice};
use wrenn_agent::host::{Host, HostConfig};
use wrenn_agent::sandbox::Deadlines;
use wrenn_agent::template::{self, TemplateInputs};
use wrenn_agent::vm::VmSpec;
use wrenn_hostnet::Slot;
use wrenn_image::{DebianImageInputs, Kernel};
use wrenn_server::agents::ConnectConnector;
use wrenn_server::store::TemplateRecord;
use wrenn_server::{Config, ControlPlane};

use crate::progress::{ProgressMode, Renderer};

mod code_interpreter;
mod egress;

pub use code_interpreter::CODE_INTERPRETER_TEMPLATE;

/// The template every E2B SDK asks for by default.
pub const DEFAULT_TEMPLATE: &str = "base";
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
    /// The static guest envd (default: next to this binary's build, see `scripts/setup.sh`).
    #[arg(long, env = "WRENN_GUEST_ENVD")]
    pub envd: Option<PathBuf>,
    /// The static guest code-interpreter server (default: next to the guest envd).
    #[arg(long, env = "WRENN_GUEST_INTERPRETER")]
    pub interpreter: Option<PathBuf>,
    /// Do not make the `code-interpreter-v1` template (its first build takes minutes under
    /// TCG); the code-interpreter SDKs then find no template.
    #[arg(long, env = "WRENN_NO_CODE_INTERPRETER")]
    pub no_code_interpreter: bool,
    /// The extracted guest kernel (default `/var/cache/wrenn/kernel`).
    #[arg(long, env = "WRENN_KERNEL_CACHE")]
    pub kernel_dir: Option<PathBuf>,
    /// Cache of built images (default `/var/cache/wrenn/images`).
    #[arg(long, env = "WRENN_IMAGE_CACHE")]
    pub image_cache: Option<PathBuf>,
    /// vCPUs of the default template.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// RAM of the default template, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u32,
    /// Pre-started QEMU processes kept ready for creates.
    #[arg(long, default_value_t = 1)]
    pub warm_pool: usize,
    /// Sandboxes kept restored and warmed up per hot template, taken by creates (0: none).
    #[arg(long, default_value_t = 2)]
    pub hot_pool: usize,
    /// A template that gets a hot pool (repeatable).
    #[arg(long = "hot-template", default_value = "base")]
    pub hot_templates: Vec<String>,
    /// vCPUs offered to sandboxes per host core (most sandboxes are idle most of the time).
    #[arg(long, default_value_t = 8)]
    pub cpu_overcommit: u32,
    /// Seconds between reconciliations of the sandbox records with the agent.
    #[arg(long, default_value_t = 30)]
    pub reconcile_interval: u64,
    /// Seconds a built template version no longer named (superseded and untagged, or
    /// deleted) keeps its files at least; they go once no sandbox uses them. Longer than any
    /// create takes.
    #[arg(long, default_value_t = 120, hide = true)]
    pub template_release_grace: u64,
    /// A container registry (`HOST[:PORT]`) template builds may pull images from over plain
    /// HTTP, and even at a private or loopback address (repeatable). Others are pulled over
    /// HTTPS, and only from public addresses.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Most running sandboxes on this host (paused ones are only files).
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: u32,
    /// First network slot index this agent owns (it owns `--slots` from there).
    #[arg(long, default_value_t = 30720)]
    pub first_slot: u32,
    /// How many slot indices this agent owns.
    #[arg(long, default_value_t = 2048)]
    pub slots: u32,
    /// The domain of sandbox host names `<port>-<sandboxID>.<domain>`: the edge proxy routes
    /// them, and the SDKs' `get_host(port)` answers them. Default when listening on loopback
    /// or all addresses: `localhost:<port>` (curl and browsers resolve `*.localhost` to
    /// loopback).
    #[arg(long, env = "WRENN_DOMAIN")]
    pub domain: Option<String>,
    /// How guests run: `auto` (KVM where it can run guests, else TCG), `kvm` (fail without
    /// it) or `tcg`. QEMU does not treat TCG as a security boundary.
    #[arg(long, env = "WRENN_ACCEL", default_value = "auto")]
    pub accel: AccelChoice,
    /// Progress display of the template build: auto, spinner, plain or quiet.
    #[arg(long, default_value = "auto")]
    pub progress: String,
    /// The interface guests reach the internet by, NAT'd to its address (default: the one
    /// of the host's default route; `none`: guests reach nothing outside this host).
    #[arg(long, env = "WRENN_UPLINK")]
    pub uplink: Option<String>,
    /// Where the guests' resolver forwards DNS queries, `ADDR[:PORT]` (default: the first
    /// IPv4 nameserver of /etc/resolv.conf).
    #[arg(long, env = "WRENN_DNS_UPSTREAM")]
    pub dns_upstream: Option<String>,
    /// A private, CGNAT or benchmark range guests may reach all the same (repeatable), e.g.
    /// a LAN service. The host's own addresses and networks stay out of reach.
    #[arg(long = "egress-allow-range", value_name = "CIDR")]
    pub egress_allow_ranges: Vec<String>,
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

fn init_tracing() {
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
    let accel = Accel::choose(args.accel)?;
    let state = args.state_dir.clone();
    create_private_dir(&state)?;
    let vms_root = state.join("sandboxes");
    let templates = state.join("templates");
    std::fs::create_dir_all(&vms_root).with_context(|| format!("create {}", vms_root.display()))?;
    std::fs::create_dir_all(&templates)
        .with_context(|| format!("create {}", templates.display()))?;
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
    // pool and the agent; guests' way out.
    let (uplink, egress_settings) = egress::host_settings(&args).await?;
    let socket = state.join("run").join("agent.sock");
    let internal = wrenn_agent::surface::bind_unix(&socket)
        .with_context(|| format!("bind the agent's socket {}", socket.display()))?;
    let internal_url = format!("unix:{}", socket.display());
    tracing::info!(url = %internal_url, "agent RPC and sandbox proxy listening (root-only Unix socket)");
    let host = Host::start(HostConfig {
        host_id: LOCAL_HOST.to_owned(),
        vms_root: vms_root.clone(),
        slots: args.first_slot..args.first_slot.saturating_add(args.slots),
        warm_pool: args.warm_pool,
        hot_pool: args.hot_pool,
        hot_templates: args.hot_templates.clone(),
        max_sandboxes: args.max_sandboxes,
        cpu_overcommit: args.cpu_overcommit,
        deadlines: Deadlines {
            health: Duration::from_secs(60),
            init: Duration::from_secs(30),
            prepare: Duration::from_secs(30),
            boot: Duration::from_secs(180),
        },
        proxy_url: internal_url.clone(),
        uplink: uplink.clone(),
        egress: egress_settings,
        templates_dir: Some(templates.clone()),
        template_release_grace: Duration::from_secs(args.template_release_grace),
        insecure_registries: args.insecure_registries.clone(),
    })
    .await
    .map_err(|e| anyhow::anyhow!(wrenn_agent::error_chain(&e)))?;
    let agent = host.agent().clone();

    // 2. The default template and the code interpreter's (built in the slot kept for builds),
    // registered with their pools.
    let parts = guest_parts(&args, accel).await?;
    let base = debian_image(&args, &parts, Default::default()).await?;
    let inputs = template_inputs(&args, &parts, &base);
    let snapshot = boot_template(&templates, DEFAULT_TEMPLATE, &inputs, host.build_slot()).await?;
    let interpreter = if args.no_code_interpreter {
        None
    } else {
        Some(code_interpreter::template(&args, &parts, &templates, host.build_slot()).await?)
    };
    let envd_version = wrenn_server::DEFAULT_ENVD_VERSION.to_owned();
    let mut current = vec![snapshot.dir.as_path()];
    if let Some(ci) = &interpreter {
        current.extend([ci.snapshot.dir.as_path(), ci.parent.as_path()]);
    }
    remove_unused_templates(
        &templates,
        &state.join("snapshots"),
        &current,
        host.paused_found(),
    );
    let mut served = vec![(DEFAULT_TEMPLATE, snapshot.clone())];
    if let Some(ci) = interpreter {
        served.push((CODE_INTERPRETER_TEMPLATE, ci.snapshot));
    }
    for (id, snap) in &served {
        host.add_template(id, snap.clone(), &envd_version);
    }
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
    let envd_version = wrenn_server::DEFAULT_ENVD_VERSION.to_owned();
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
        let m = &snapshot.manifest.spec;
        cp.register_template(&TemplateRecord {
            id: (*id).to_owned(),
            team_id: None,
            envd_version: envd_version.clone(),
            vcpus: m.vcpus,
            memory_mb: u64::from(m.memory_mib),
            disk_size_mb: disk_size_mb(&snapshot.manifest.base_image),
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
fn sandbox_domain(configured: Option<&str>, listen: SocketAddr) -> Option<String> {
    if let Some(d) = configured.map(str::trim).filter(|d| !d.is_empty()) {
        return Some(d.trim_end_matches('.').to_owned());
    }
    let ip = listen.ip();
    (ip.is_loopback() || ip.is_unspecified()).then(|| format!("localhost:{}", listen.port()))
}

/// What every template of `wrenn up` boots with beside its root filesystem.
pub(crate) struct GuestParts {
    accel: Accel,
    kernel: Kernel,
    initramfs: PathBuf,
    /// The image cache.
    cache: PathBuf,
    envd: PathBuf,
}

/// Finds the kernel and envd, and finds or builds the initramfs.
async fn guest_parts(args: &UpArgs, accel: Accel) -> anyhow::Result<GuestParts> {
    let kernel = Kernel::find(args.kernel_dir.as_deref())
        .context("find the guest kernel (scripts/setup.sh installs it)")?;
    let envd = match &args.envd {
        Some(p) => p.clone(),
        None => default_guest_binary("envd")?,
    };
    let cache = args
        .image_cache
        .clone()
        .unwrap_or_else(wrenn_image::default_cache_dir);
    let initramfs = {
        let (cache, kernel) = (cache.clone(), kernel.clone());
        tokio::task::spawn_blocking(move || {
            wrenn_image::build_initramfs(&cache, &kernel, Path::new("/bin/busybox"))
                .context("build the initramfs")
        })
        .await
        .context("image build thread")??
    };
    Ok(GuestParts {
        accel,
        kernel,
        initramfs: initramfs.path,
        cache,
        envd,
    })
}

/// Finds or builds a Debian image (`extras`: a variant's additions).
async fn debian_image(
    args: &UpArgs,
    parts: &GuestParts,
    extras: wrenn_image::DebianExtras,
) -> anyhow::Result<wrenn_image::DebianRootfs> {
    let mut progress = Renderer::new(ProgressMode::from_arg(&args.progress));
    let cache = parts.cache.clone();
    let inputs = DebianImageInputs {
        extras,
        ..DebianImageInputs::new(parts.envd.clone())
    };
    tokio::task::spawn_blocking(move || {
        wrenn_image::build_debian_rootfs(&cache, &inputs, &mut |p| progress.show(p))
            .context("build the Debian template image")
    })
    .await
    .context("image build thread")?
}

/// The cold-boot template inputs of `rootfs` with `wrenn up`'s machine and E2B's defaults.
fn template_inputs(
    args: &UpArgs,
    parts: &GuestParts,
    rootfs: &wrenn_image::DebianRootfs,
) -> TemplateInputs {
    TemplateInputs {
        spec: VmSpec {
            accel: parts.accel,
            kernel: parts.kernel.vmlinuz.clone(),
            initramfs: parts.initramfs.clone(),
            cmdline: VmSpec::default_cmdline(parts.accel),
            memory_mib: args.memory_mib,
            vcpus: args.vcpus,
        },
        rootfs: rootfs.rootfs.path.clone(),
        rootfs_key: rootfs.rootfs.manifest.key.clone(),
        default_user: Some("user".to_owned()),
        default_workdir: Some("/home/user".to_owned()),
    }
}

/// Opens the cold-boot template `name` of `inputs`, or builds it in the build slot.
async fn boot_template(
    templates: &Path,
    name: &str,
    inputs: &TemplateInputs,
    build_slot: u32,
) -> anyhow::Result<wrenn_agent::snapshot::Snapshot> {
    let slot = Slot::create(build_slot)
        .await
        .context("create the template build slot")?;
    let started = std::time::Instant::now();
    let built =
        template::build_or_open(templates, name, inputs, &slot, Duration::from_secs(180)).await;
    // Removing a slot's namespace blocks; not on an async worker.
    tokio::task::spawn_blocking(move || drop(slot))
        .await
        .context("slot thread")?;
    let (snapshot, fresh) = built.with_context(|| format!("build the template `{name}`"))?;
    if fresh {
        eprintln!(
            "Built template `{name}` in {:.1} s ({}).",
            started.elapsed().as_secs_f64(),
            inputs.spec.accel
        );
    }
    Ok(snapshot)
}

/// Deletes template directories that are neither current templates, the base of a paused
/// sandbox or a snapshot (a memory diff applies only to its own template) nor the parent of a
/// built template.
fn remove_unused_templates(
    templates: &Path,
    snapshots: &Path,
    current: &[&Path],
    paused: &[wrenn_agent::state::PausedVm],
) {
    let mut used: Vec<PathBuf> = paused
        .iter()
        .filter_map(|p| wrenn_agent::sandbox::PausedSandbox::open(&p.dir).ok())
        .map(|p| p.manifest().template.dir.clone())
        .collect();
    // Built templates' disks are layered on their parents'.
    used.extend(wrenn_agent::builds::parents_in_use(templates));
    // Snapshots' memory and disks are layered on their templates'.
    used.extend(wrenn_agent::snapshots::templates_in_use(snapshots));
    for entry in std::fs::read_dir(templates).into_iter().flatten().flatten() {
        let dir = entry.path();
        let name = entry.file_name();
        // The build service's own directories (built templates, layer cache, scratch,
        // unpacked images and their blobs).
        let builds = [
            "builds",
            "layers",
            wrenn_agent::builds::WORK_DIR,
            wrenn_agent::builds::IMAGES_DIR,
            wrenn_agent::builds::BLOBS_DIR,
        ]
        .map(std::ffi::OsStr::new);
        if current.contains(&dir.as_path())
            || used.contains(&dir)
            || !dir.is_dir()
            || builds.contains(&name.as_os_str())
        {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(dir = %dir.display(), "removed an unused template"),
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "remove unused template"),
        }
    }
}

/// A static guest binary (`envd`, `wrenn-interpreter`) that `scripts/build-guest-envd.sh`
/// builds: next to the `target/` this binary was built into, else installed in
/// `/usr/local/lib/wrenn`.
fn default_guest_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the wrenn binary")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("x86_64-unknown-linux-gnu/guest").join(name))
        .chain(std::iter::once(
            Path::new("/usr/local/lib/wrenn").join(name),
        ))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no guest {name} found (looked at {}); run scripts/build-guest-envd.sh or pass its flag",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The default team's API key: the one in `path` if the database knows it, else a new team
/// and key (written to `path`, readable by root only).
async fn default_api_key(cp: &ControlPlane, path: &Path) -> anyhow::Result<String> {
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

fn disk_size_mb(image: &Path) -> u64 {
    std::fs::metadata(image).map_or(0, |m| m.len() >> 20)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Writes a file only root can read, atomically.
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
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

fn random_hex(bytes: usize) -> String {
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

fn read_or_create_token(path: &Path) -> anyhow::Result<String> {
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
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
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
