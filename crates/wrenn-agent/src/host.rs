//! Bringing a host up: owning its sandboxes directory, recovering what an earlier agent left
//! there (running QEMUs taken over with their slots, paused sandboxes kept, an interrupted
//! pause finished, garbage removed, and the empty cgroups of its VMs), and starting the slot
//! pool and the [`Agent`] over it.
//! `wrenn up` (and later `wrenn agent`) only wire this to a template and the RPC port.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::Agent;
use wrenn_hostnet::{SlotError, Uplink};

use crate::pool::{EgressSettings, PoolError, SlotPool, WarmPool};
use crate::sandbox::Deadlines;
use crate::snapshot::Snapshot;
use crate::state::{OwnerLock, PausedVm, ScanScope, StateError};

/// How often released built templates are looked at for removal.
const TEMPLATE_SWEEP: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the host's addresses are compared with what the slots deny.
const HOST_ADDRESS_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// How a host is brought up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The host's ID, as the control plane knows it.
    pub host_id: String,
    /// The sandboxes directory (one owner at a time).
    pub vms_root: PathBuf,
    /// The slot indices this host may use; the first is kept for template builds.
    pub slots: Range<u32>,
    /// QEMU processes kept waiting per template.
    pub warm_pool: usize,
    /// Sandboxes kept restored and warmed up per template of `hot_templates`
    /// ([`crate::hotpool`]).
    pub hot_pool: usize,
    /// The templates that get a hot pool.
    pub hot_templates: Vec<String>,
    /// The most sandboxes with a VM at once.
    pub max_sandboxes: u32,
    /// vCPUs offered per host core.
    pub cpu_overcommit: u32,
    /// Deadlines of the lifecycle steps.
    pub deadlines: Deadlines,
    /// Where this host's sandbox proxy is reached (reported to the control plane).
    pub proxy_url: String,
    /// The interface guests' traffic leaves the host by (`None`: guests reach nothing
    /// outside the host).
    pub uplink: Option<String>,
    /// What the host allows every guest beyond its own policy (`enabled` follows `uplink`).
    pub egress: EgressSettings,
    /// Where templates are kept; with it the host builds templates (in the first slot) and
    /// keeps the ones it built in `builds/` under it (`None`: no builds).
    pub templates_dir: Option<PathBuf>,
    /// How long a released built template's files stay at least.
    pub template_release_grace: std::time::Duration,
    /// Registries (`host[:port]`) builds pull images from over plain HTTP, at any address.
    pub insecure_registries: Vec<String>,
    /// Where paused sandboxes are copied so that other hosts can resume them.
    pub shared_store: Option<crate::shared::SharedStore>,
}

/// Why a host could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The slot range leaves no slot for sandboxes.
    #[error("the slot range {0:?} needs at least 2 indices")]
    SlotRange(Range<u32>),
    /// The sandboxes directory could not be locked.
    #[error("lock the sandboxes directory")]
    Lock(#[source] StateError),
    /// Another process owns the sandboxes directory.
    #[error("another wrenn process owns {0} (is `wrenn up` already running?)")]
    Owned(PathBuf),
    /// The slot pool could not be made.
    #[error("create network slots")]
    Slots(#[source] PoolError),
    /// The uplink rules could not be installed.
    #[error("set up the uplink")]
    Uplink(#[source] SlotError),
    /// The host cannot give each QEMU its own cgroup (see `crate::jail::cgroup`).
    #[error("jail QEMU")]
    Cgroups(#[source] crate::jail::CgroupError),
}

/// How long a start waits for the sandboxes directory's lock: an owner killed a moment ago
/// may have left a child between fork and exec (a QEMU being jailed) that holds the lock's
/// descriptor until it execs.
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn acquire_owner(vms_root: &Path) -> Result<OwnerLock, HostError> {
    let deadline = tokio::time::Instant::now() + OWNER_WAIT;
    loop {
        if let Some(lock) = OwnerLock::try_acquire(vms_root).map_err(HostError::Lock)? {
            return Ok(lock);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HostError::Owned(vms_root.to_owned()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A host that is up: its agent, its slot pool and what recovery found.
#[derive(Debug)]
pub struct Host {
    agent: Arc<Agent>,
    slots: SlotPool,
    config: HostConfig,
    paused: Vec<PausedVm>,
    _uplink: Uplink,
    _owner: OwnerLock,
}

impl Host {
    /// Locks the sandboxes directory, scans it (taking over running QEMUs of a run that
    /// ended without a clean stop, keeping paused sandboxes, removing what provably holds
    /// nothing), and starts the slot pool and the agent with what it found.
    pub async fn start(config: HostConfig) -> Result<Self, HostError> {
        let range = config.slots.clone();
        if range.len() < 2 {
            return Err(HostError::SlotRange(range));
        }
        let owner = acquire_owner(&config.vms_root).await?;
        let mut scan = crate::state::scan(
            &config.vms_root,
            &ScanScope {
                in_use: Vec::new(),
                slots: range.clone(),
            },
        )
        .await;
        let mut running = Vec::new();
        for vm in std::mem::take(&mut scan.adoptable) {
            match vm.adopt_slot() {
                Ok(Some(slot)) if range.contains(&slot.index()) && slot.index() != range.start => {
                    running.push((vm, slot));
                }
                other => {
                    tracing::warn!(dir = %vm.dir.display(), "running VM without a usable slot; stopping it");
                    drop(other);
                    if let Err(e) = vm.kill().await {
                        tracing::warn!(error = %crate::error_chain(&e), "stop an earlier VM");
                    }
                }
            }
        }
        let cleaned = scan.clean().await;
        // The cgroups of a crashed agent's VMs (a taken-over QEMU's leaf is not empty and
        // stays). This is also where a host without usable cgroups fails, before any VM.
        let leaves = crate::jail::sweep_leaves(range.clone()).map_err(HostError::Cgroups)?;
        if leaves > 0 {
            tracing::info!(leaves, "removed the cgroups of VMs of an earlier run");
        }
        if !cleaned.dirs.is_empty() || !cleaned.killed.is_empty() {
            tracing::info!(
                dirs = cleaned.dirs.len(),
                qemu = cleaned.killed.len(),
                netns = cleaned.netns.len(),
                "cleaned up after an earlier run"
            );
        }
        let uplink = Uplink::install(
            config.uplink.as_deref(),
            range.start,
            range.end - range.start,
        )
        .await
        .map_err(HostError::Uplink)?;
        let pool_first = range.start + 1;
        let (vms, adopted_slots): (Vec<_>, Vec<_>) = running.into_iter().unzip();
        let (slots, leases) = SlotPool::with_adopted(
            config.warm_pool + 2,
            pool_first,
            range.end - pool_first,
            adopted_slots,
        )
        .await
        .map_err(HostError::Slots)?;
        // Dropped with the pool: the task ends once the pool is gone.
        drop(slots.watch_host_addresses(HOST_ADDRESS_CHECK));
        slots.configure_egress(EgressSettings {
            enabled: config.uplink.is_some(),
            ..config.egress.clone()
        });
        let mut agent = Agent::new(
            config.host_id.clone(),
            slots.clone(),
            config.vms_root.clone(),
            config.max_sandboxes,
            config.deadlines,
        )
        .with_proxy_url(config.proxy_url.clone())
        .with_cpu_overcommit(config.cpu_overcommit);
        if let Some(dir) = &config.templates_dir {
            agent = agent.with_builds(
                crate::builds::Builds::new(dir, range.start, config.template_release_grace)
                    .with_insecure_registries(config.insecure_registries.clone()),
            );
        }
        if let Some(store) = &config.shared_store {
            agent = agent.with_shared_store(store.clone());
        }
        let agent = Arc::new(agent);
        crate::builds::spawn_sweeper(Arc::downgrade(&agent), TEMPLATE_SWEEP);
        let loaded = agent.load_paused(&scan.paused);
        let taken = agent
            .adopt_running(vms.into_iter().zip(leases).collect())
            .await;
        if !taken.is_empty() {
            tracing::info!(
                count = taken.len(),
                "running sandboxes taken over from the earlier run"
            );
        }
        if !loaded.is_empty() {
            tracing::info!(
                count = loaded.len(),
                "paused sandboxes kept from the earlier run"
            );
        }
        Ok(Self {
            agent,
            slots,
            config,
            paused: scan.paused,
            _uplink: uplink,
            _owner: owner,
        })
    }

    /// The agent.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// The slot index kept for template builds (outside the pool).
    pub fn build_slot(&self) -> u32 {
        self.config.slots.start
    }

    /// The paused sandboxes found at start (whose templates must be kept).
    pub fn paused_found(&self) -> &[PausedVm] {
        &self.paused
    }

    /// The sandboxes directory.
    pub fn vms_root(&self) -> &Path {
        &self.config.vms_root
    }

    /// Makes `snapshot` startable as `template_id`, with a warm pool of the configured size
    /// and, for the templates configured to, a hot pool.
    pub fn add_template(&self, template_id: &str, snapshot: Snapshot, envd_version: &str) {
        let hot = (self.config.hot_pool > 0
            && self.config.hot_templates.iter().any(|t| t == template_id))
        .then(|| {
            // The warm-up runs as the user the template's sandboxes run commands as.
            let defaults = crate::build::Defaults::read(&snapshot.dir, Default::default());
            crate::hotpool::HotPool::start(
                snapshot.clone(),
                template_id,
                self.slots.clone(),
                self.config.vms_root.clone(),
                self.config.hot_pool,
                defaults
                    .user
                    .as_deref()
                    .unwrap_or(crate::builds::DEFAULT_USER),
                self.config.deadlines,
            )
        });
        let warm = (self.config.warm_pool > 0).then(|| {
            WarmPool::start(
                snapshot.clone(),
                template_id,
                self.slots.clone(),
                self.config.vms_root.clone(),
                self.config.warm_pool,
            )
        });
        self.agent
            .register_template_with(template_id, snapshot, warm, hot, envd_version);
    }
}
