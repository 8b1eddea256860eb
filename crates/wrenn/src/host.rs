//! The host side of `wrenn up` and `wrenn agent`: their shared flags ([`HostArgs`]), and
//! starting a host: the agent's VMs root taken and recovered, its slot pool and agent, then the
//! host templates found or built (`base`, and `code-interpreter-v1` unless turned off) and
//! registered with their pools.
//!
//! Host templates are kept in the host's own `<state>/templates`, or in a template cache shared
//! by several agents (`--template-cache`: a directory every host mounts at the same path, so a
//! paused sandbox's disk chain reads the same on each). Templates are immutable once made and
//! keyed by their inputs; the cache is locked while one agent finds or builds them, so the
//! others wait and then open what it made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use wrenn_agent::accel::{Accel, AccelChoice};
use wrenn_agent::host::{Host, HostConfig};
use wrenn_agent::sandbox::Deadlines;
use wrenn_agent::snapshot::Snapshot;
use wrenn_agent::template::{self, TemplateInputs};
use wrenn_agent::vm::VmSpec;
use wrenn_hostnet::Slot;
use wrenn_image::{DebianImageInputs, Kernel};

use crate::progress::{ProgressMode, Renderer};

mod code_interpreter;
mod egress;

pub use code_interpreter::CODE_INTERPRETER_TEMPLATE;

/// The template every E2B SDK asks for by default.
pub const DEFAULT_TEMPLATE: &str = "base";

/// What a host is made of: guest parts, templates, pools, slots, egress.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
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
    /// Where host templates are found or built, shared by the agents of a cluster (mounted at
    /// the same path on every host); default: `<state>/templates`, this host's own.
    #[arg(long, env = "WRENN_TEMPLATE_CACHE")]
    pub template_cache: Option<PathBuf>,
    /// A directory shared by the hosts of a cluster where paused sandboxes are copied, so
    /// another host resumes them when theirs is gone (needs `--template-cache` there too).
    #[arg(long, env = "WRENN_SHARED_STORE")]
    pub shared_store: Option<String>,
}

/// A started host and the host templates it serves.
pub(crate) struct Started {
    pub host: Host,
    /// `(template ID, snapshot)`, `base` first.
    pub served: Vec<(&'static str, Snapshot)>,
}

/// Starts the host `host_id`, whose proxy is reached at `proxy_url`, in `state`: its agent,
/// pools and host templates (built on the first start: minutes under TCG).
pub(crate) async fn start(
    args: &HostArgs,
    accel: Accel,
    state: &Path,
    host_id: &str,
    proxy_url: &str,
) -> anyhow::Result<Started> {
    let vms_root = state.join("sandboxes");
    let templates = state.join("templates");
    std::fs::create_dir_all(&vms_root).with_context(|| format!("create {}", vms_root.display()))?;
    std::fs::create_dir_all(&templates)
        .with_context(|| format!("create {}", templates.display()))?;
    let (uplink, egress_settings) = egress::host_settings(args).await?;
    let host = Host::start(HostConfig {
        host_id: host_id.to_owned(),
        vms_root,
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
        proxy_url: proxy_url.to_owned(),
        uplink,
        egress: egress_settings,
        templates_dir: Some(templates.clone()),
        template_release_grace: Duration::from_secs(args.template_release_grace),
        insecure_registries: args.insecure_registries.clone(),
        shared_store: match &args.shared_store {
            Some(url) => Some(
                wrenn_agent::shared::SharedStore::open(url)
                    .with_context(|| format!("open the shared store {url}"))?,
            ),
            None => None,
        },
    })
    .await
    .map_err(|e| anyhow::anyhow!(wrenn_agent::error_chain(&e)))?;

    // The default template and the code interpreter's (built in the slot kept for builds),
    // registered with their pools.
    let parts = guest_parts(args, accel).await?;
    let cache = args
        .template_cache
        .clone()
        .unwrap_or_else(|| templates.clone());
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let lock = lock_dir(&cache).await?;
    let base = debian_image(args, &parts, Default::default()).await?;
    let inputs = template_inputs(args, &parts, &base);
    let snapshot = boot_template(&cache, DEFAULT_TEMPLATE, &inputs, host.build_slot()).await?;
    let interpreter = if args.no_code_interpreter {
        None
    } else {
        Some(code_interpreter::template(args, &parts, &cache, host.build_slot()).await?)
    };
    drop(lock);
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
    Ok(Started { host, served })
}

/// Host template `id` as the control plane records it.
pub(crate) fn host_template(id: &str, snapshot: &Snapshot) -> wrenn_api::HostTemplate {
    let m = &snapshot.manifest.spec;
    wrenn_api::HostTemplate {
        id: id.to_owned(),
        envd_version: wrenn_server::DEFAULT_ENVD_VERSION.to_owned(),
        vcpus: m.vcpus,
        memory_mb: u64::from(m.memory_mib),
        disk_size_mb: disk_size_mb(&snapshot.manifest.base_image),
    }
}

/// Holds an exclusive lock on `dir/.lock` (waited for off the async workers) until dropped.
async fn lock_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join(".lock");
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("lock {}", path.display()))
    })
    .await
    .context("lock thread")?
}

pub(crate) struct GuestParts {
    accel: Accel,
    kernel: Kernel,
    initramfs: PathBuf,
    /// The image cache.
    cache: PathBuf,
    envd: PathBuf,
}

/// Finds the kernel and envd, and finds or builds the initramfs.
async fn guest_parts(args: &HostArgs, accel: Accel) -> anyhow::Result<GuestParts> {
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
    args: &HostArgs,
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
    args: &HostArgs,
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

fn disk_size_mb(image: &Path) -> u64 {
    std::fs::metadata(image).map_or(0, |m| m.len() >> 20)
}
