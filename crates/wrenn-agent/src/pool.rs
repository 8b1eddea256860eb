//! Pools: network slots ([`SlotPool`]) and pre-started QEMU processes ([`WarmPool`]).
//!
//! **Slots.** Setting up a slot (namespace, tap, veth, firewall) takes tens of milliseconds,
//! most of it the one `nft` run, so a pool keeps some ready, each with its metadata endpoint
//! already listening. A [`SlotLease`] hands one out; [`SlotPool::release`] resets it (firewall
//! replaced, conntrack flushed, metadata cleared) and keeps it for the next sandbox. When no
//! slot is free one is created on demand. A lease dropped without `release` destroys its slot.
//!
//! **Warm QEMU.** QEMU's start-up is most of a restore. A [`WarmPool`] belongs to one template
//! snapshot and keeps QEMU processes already started with that snapshot's machine (kernel,
//! initramfs, cmdline, RAM size, memory backend id and the template's memory file, mapped
//! `share=off`), paused in `-S -incoming defer`, each in its own slot with its disk overlay
//! already created. QEMU opens the memory file at start, which is why the pool is per template.
//! [`WarmPool::take`] hands one out and wakes the background refill; [`restore_warm`] loads the
//! snapshot's device state into it and continues the guest.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use wrenn_core::{EgressPolicy, Ipv4Net};
use wrenn_hostnet::{
    EgressConfig, EgressServices, MAX_SLOTS, Metadata, MetadataError, MetadataServer, OnLearned,
    Slot, SlotError, SlotHandle, TAP_NAME,
};
use wrenn_qmp::QmpError;

use crate::record::{Phase, RecordError, Recorder, VmProcess};
use crate::snapshot::Snapshot;
use crate::vm::{Launch, Memory, NetAttach, Vm, VmError, create_overlay};

/// After a failed warm start the refill waits this long before trying again.
const REFILL_BACKOFF: Duration = Duration::from_secs(1);
/// After a take, the refill waits this long before starting a QEMU: starting one costs about
/// 100 ms of CPU, which on a small host would land on the restore that just took the VM.
pub const DEFAULT_REFILL_DELAY: Duration = Duration::from_millis(500);
/// `last_take_ms` of a pool nothing was taken from yet (its first fill does not wait).
const NEVER_TAKEN: u64 = u64::MAX;

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Creating or resetting a slot failed.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The slot's metadata endpoint failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// Starting QEMU failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing the VM's record failed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Every slot index is in use.
    #[error("no free slot index below {0}")]
    Exhausted(u32),
    /// Loading the snapshot into a warm QEMU failed; the VM was removed.
    #[error("loading {dir} into a warm QEMU failed; QEMU said: {qemu_log}")]
    Load {
        /// The snapshot.
        dir: PathBuf,
        /// The end of QEMU's log.
        qemu_log: String,
        /// The QMP error.
        #[source]
        source: QmpError,
    },
    /// A warm VM was offered a snapshot other than the one it was started for.
    #[error("warm VM was started for {expected}, not {got}")]
    WrongSnapshot {
        /// The pool's snapshot.
        expected: PathBuf,
        /// The one asked for.
        got: PathBuf,
    },
    /// A blocking task panicked.
    #[error("blocking worker: {0}")]
    Join(String),
}

/// One slot with its metadata endpoint.
#[derive(Debug)]
struct PoolSlot {
    // Field order: the endpoint stops before the namespace goes.
    metadata: MetadataServer,
    egress: Arc<SlotEgress>,
    slot: Slot,
}

impl PoolSlot {
    fn new(metadata: MetadataServer, slot: Slot) -> Self {
        Self {
            metadata,
            egress: Arc::default(),
            slot,
        }
    }
}

/// What the host allows guests beyond their own policies (the operator's settings).
#[derive(Debug, Clone, Default)]
pub struct EgressSettings {
    /// Whether guests have a way out at all (the host has an uplink). Without one (the
    /// default, as for a pool made without a host) every slot stays closed whatever the
    /// sandbox's policy says, so no guest packet is ever forwarded by a host that was not set
    /// up to route it.
    pub enabled: bool,
    /// Private, CGNAT or benchmark ranges guests may reach all the same.
    pub lifted: Vec<Ipv4Net>,
    /// Where the guests' resolver forwards queries (`None`: it answers SERVFAIL).
    pub dns_upstream: Option<std::net::SocketAddr>,
}

/// Serializes egress changes of one slot with its release: each lease of the slot is a new
/// generation, and a change for an earlier one is dropped, so a policy update that loses the
/// race with a pause never opens the slot for whoever gets it next.
#[derive(Debug, Default)]
struct SlotEgress {
    generation: AtomicU64,
    /// The slot's resolver and filtering proxy, started with the first policy that needs them
    /// and kept (reset) for the slot's next sandbox.
    services: tokio::sync::Mutex<Option<EgressServices>>,
}

/// The policy of a slot nobody holds: nothing out, no names resolved.
fn closed_policy() -> EgressPolicy {
    EgressPolicy::parse(false, &[], &[]).expect("an empty policy parses")
}

/// Changes the egress of the slot a sandbox held when it was made; a no-op once the slot was
/// released (the sandbox paused or gone).
#[derive(Debug, Clone)]
pub struct EgressApplier {
    slot: SlotHandle,
    state: Arc<SlotEgress>,
    generation: u64,
    settings: Arc<EgressSettings>,
}

impl EgressApplier {
    /// Gives the slot `policy` (`None` closes egress).
    pub async fn apply(&self, policy: Option<&EgressPolicy>) -> Result<(), SlotError> {
        let mut services = self.state.services.lock().await;
        if self.state.generation.load(Ordering::Acquire) != self.generation {
            return Ok(());
        }
        let policy = policy.filter(|_| self.settings.enabled);
        // The firewall first: it forgets the learned addresses, which the services then report
        // again for the names the new policy allows.
        self.slot.set_egress(policy, &self.settings.lifted).await?;
        let policy = Arc::new(policy.cloned().unwrap_or_else(closed_policy));
        match (&*services, self.settings.dns_upstream) {
            (Some(svc), _) => svc.set_policy(policy),
            (None, Some(upstream)) if self.settings.enabled => {
                let handle = self.slot.clone();
                let on_learned: OnLearned = Arc::new(
                    move |learned: &[(std::net::Ipv4Addr, Duration)]| {
                        let (handle, learned) = (handle.clone(), learned.to_vec());
                        tokio::spawn(async move {
                            if let Err(e) = handle.learn(&learned).await {
                                tracing::warn!(error = %crate::error_chain(&e), "could not let a guest reach a name's addresses");
                            }
                        });
                    },
                );
                let started = EgressServices::start(
                    &self.slot.netns_path(),
                    EgressConfig::new(upstream),
                    policy,
                    on_learned,
                )
                .await;
                match started {
                    Ok(svc) => *services = Some(svc),
                    // The guest has no DNS and no name-based egress; addresses still work.
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "slot resolver did not start")
                    }
                }
            }
            (None, _) => {}
        }
        Ok(())
    }
}

#[derive(Debug)]
struct SlotsInner {
    free: Mutex<Vec<PoolSlot>>,
    /// Every index handed out or free in the pool (guards against double use).
    used: Mutex<BTreeSet<u32>>,
    first_index: u32,
    end_index: u32,
    keep: usize,
    egress: std::sync::RwLock<Arc<EgressSettings>>,
}

impl SlotsInner {
    fn alloc_index(&self) -> Result<u32, PoolError> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let index = (self.first_index..self.end_index)
            .find(|i| !used.contains(i))
            .ok_or(PoolError::Exhausted(self.end_index))?;
        used.insert(index);
        Ok(index)
    }

    fn free_index(&self, index: u32) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
    }

    /// Creates slot `index` with its endpoint; frees the index on failure.
    async fn create(self: &Arc<Self>, index: u32) -> Result<PoolSlot, PoolError> {
        let made = async {
            let slot = Slot::create(index).await?;
            let metadata = MetadataServer::start(&slot.netns_path()).await?;
            Ok(PoolSlot::new(metadata, slot))
        }
        .await;
        if made.is_err() {
            self.free_index(index);
        }
        made
    }

    /// Deletes a slot off the runtime's threads and frees its index.
    async fn destroy(self: &Arc<Self>, entry: PoolSlot) {
        let index = entry.slot.index();
        let _ = tokio::task::spawn_blocking(move || drop(entry)).await;
        self.free_index(index);
    }
}

/// A pool of network slots. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct SlotPool {
    inner: Arc<SlotsInner>,
}

/// A slot handed out by a [`SlotPool`]. Give it back with [`SlotPool::release`]; dropped
/// otherwise, the slot is deleted.
#[derive(Debug)]
pub struct SlotLease {
    entry: Option<PoolSlot>,
    pool: Weak<SlotsInner>,
}

impl SlotPool {
    /// Creates `size` slots numbered from `first_index` (indices up to `first_index + span`
    /// are used for slots made on demand when the pool runs dry). Released slots beyond `size`
    /// are deleted. Must run inside a tokio runtime (the metadata endpoints).
    pub async fn new(size: usize, first_index: u32, span: u32) -> Result<Self, PoolError> {
        Ok(Self::with_adopted(size, first_index, span, Vec::new())
            .await?
            .0)
    }

    /// [`SlotPool::new`], taking over `adopted` slots (left configured by an earlier agent,
    /// with a running VM in them) as leases; their indices are never handed out twice.
    pub async fn with_adopted(
        size: usize,
        first_index: u32,
        span: u32,
        adopted: Vec<Slot>,
    ) -> Result<(Self, Vec<SlotLease>), PoolError> {
        let end_index = first_index.saturating_add(span).min(MAX_SLOTS);
        let pool = Self {
            inner: Arc::new(SlotsInner {
                free: Mutex::new(Vec::with_capacity(size)),
                used: Mutex::new(BTreeSet::new()),
                first_index,
                end_index,
                keep: size,
                egress: Default::default(),
            }),
        };
        {
            let mut used = pool.inner.used.lock().unwrap_or_else(|p| p.into_inner());
            used.extend(adopted.iter().map(Slot::index));
        }
        let mut leases = Vec::with_capacity(adopted.len());
        for slot in adopted {
            let metadata = MetadataServer::start(&slot.netns_path()).await?;
            leases.push(SlotLease {
                entry: Some(PoolSlot::new(metadata, slot)),
                pool: Arc::downgrade(&pool.inner),
            });
        }
        for _ in 0..size {
            let index = pool.inner.alloc_index()?;
            let entry = pool.inner.create(index).await?;
            pool.lock_free().push(entry);
        }
        Ok((pool, leases))
    }

    fn lock_free(&self) -> std::sync::MutexGuard<'_, Vec<PoolSlot>> {
        self.inner.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many slots are ready.
    pub fn available(&self) -> usize {
        self.lock_free().len()
    }

    /// Indices of all slots this pool owns (free or leased), for [`crate::state::scan`].
    pub fn indices(&self) -> Vec<u32> {
        let used = self.inner.used.lock().unwrap_or_else(|p| p.into_inner());
        used.iter().copied().collect()
    }

    /// Hands out a ready slot, or creates one when none is free.
    pub async fn acquire(&self) -> Result<SlotLease, PoolError> {
        let ready = self.lock_free().pop();
        let entry = match ready {
            Some(e) => e,
            None => {
                let index = self.inner.alloc_index()?;
                tracing::debug!(index, "slot pool empty: creating a slot on demand");
                self.inner.create(index).await?
            }
        };
        Ok(SlotLease {
            entry: Some(entry),
            pool: Arc::downgrade(&self.inner),
        })
    }

    /// Takes a slot back: resets it and keeps it if the pool is below its size, else deletes
    /// it. A slot that fails to reset is deleted.
    pub async fn release(&self, mut lease: SlotLease) {
        let Some(entry) = lease.entry.take() else {
            return;
        };
        entry.metadata.set(None);
        {
            // Appliers of this lease are void from here on; `reset` closes egress.
            let services = entry.egress.services.lock().await;
            entry.egress.generation.fetch_add(1, Ordering::AcqRel);
            if let Some(svc) = &*services {
                svc.reset(Arc::new(closed_policy()));
            }
        }
        let keep = self.lock_free().len() < self.inner.keep;
        if !keep {
            self.inner.destroy(entry).await;
            return;
        }
        match entry.slot.reset().await {
            Ok(()) => {
                // Decided again under the lock: concurrent releases all saw room above.
                let extra = {
                    let mut free = self.lock_free();
                    if free.len() < self.inner.keep {
                        free.push(entry);
                        None
                    } else {
                        Some(entry)
                    }
                };
                if let Some(entry) = extra {
                    self.inner.destroy(entry).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), index = entry.slot.index(), "slot reset failed; deleting it");
                self.inner.destroy(entry).await;
            }
        }
    }

    /// Sets what the host allows every guest beyond its own policy; applies to policies set
    /// from now on.
    pub fn configure_egress(&self, settings: EgressSettings) {
        *self.inner.egress.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
    }

    /// Opens a slot outside the pool (the build slot) to the internet as a sandbox with the
    /// default policy sees it, with the same host settings: the always-denied ranges stay
    /// denied, and its resolver forwards to the host's upstream. The services must be kept
    /// while the slot is used. Nothing is opened on a host without an uplink.
    pub async fn open_egress(&self, slot: &Slot) -> Result<Option<EgressServices>, SlotError> {
        let settings = self
            .inner
            .egress
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !settings.enabled {
            return Ok(None);
        }
        let policy = EgressPolicy::parse(true, &[], &[]).expect("an empty policy parses");
        slot.set_egress(Some(&policy), &settings.lifted).await?;
        let Some(upstream) = settings.dns_upstream else {
            return Ok(None);
        };
        // An open policy: the resolver has no names to report for the firewall.
        let on_learned: OnLearned = Arc::new(|_: &[(std::net::Ipv4Addr, Duration)]| {});
        match EgressServices::start(
            &slot.netns_path(),
            EgressConfig::new(upstream),
            Arc::new(policy),
            on_learned,
        )
        .await
        {
            Ok(svc) => Ok(Some(svc)),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "build slot resolver did not start");
                Ok(None)
            }
        }
    }

    /// Keeps every slot's copy of the host's addresses and connected networks current: looks
    /// every `every` and rewrites the slots' sets when they changed (a new address, a new
    /// interface). Ends when the pool is gone.
    pub fn watch_host_addresses(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut last = wrenn_hostnet::host_addresses().await.ok();
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = pool.upgrade() else { return };
                let now = match wrenn_hostnet::host_addresses().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the host's addresses");
                        continue;
                    }
                };
                if last.as_ref() == Some(&now) {
                    continue;
                }
                tracing::info!("host addresses changed; updating every slot's guard");
                let indices: Vec<u32> = inner
                    .used
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .copied()
                    .collect();
                drop(inner);
                let mut all_done = true;
                for index in indices {
                    let done = match SlotHandle::new(index) {
                        Ok(h) => h.refresh_host().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = done {
                        // Tried again next round; a slot deleted meanwhile is not listed then.
                        tracing::debug!(index, error = %crate::error_chain(&e), "slot guard not updated");
                        all_done = false;
                    }
                }
                if all_done {
                    last = Some(now);
                }
            }
        })
    }

    /// Deletes every free slot. Leased slots go when they are released or dropped.
    pub async fn shutdown(&self) {
        let free: Vec<PoolSlot> = std::mem::take(&mut *self.lock_free());
        for entry in free {
            self.inner.destroy(entry).await;
        }
    }
}

impl SlotLease {
    /// The slot.
    pub fn slot(&self) -> &Slot {
        // Only `release` takes the entry, and it consumes the lease.
        &self.entry.as_ref().expect("lease holds its slot").slot
    }

    /// Changes this lease's slot's egress, for as long as the lease lasts.
    pub fn egress(&self) -> EgressApplier {
        let e = self.entry.as_ref().expect("lease holds its slot");
        let settings = self
            .pool
            .upgrade()
            .map(|p| p.egress.read().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        EgressApplier {
            slot: e.slot.handle(),
            state: e.egress.clone(),
            generation: e.egress.generation.load(Ordering::Acquire),
            settings,
        }
    }

    /// Publishes the sandbox now in this slot on its metadata endpoint (`None`: nobody).
    pub fn set_metadata(&self, doc: Option<Metadata>) {
        if let Some(e) = &self.entry {
            e.metadata.set(doc);
        }
    }

    /// What the metadata endpoint serves now.
    pub fn metadata(&self) -> Option<Metadata> {
        self.entry.as_ref().and_then(|e| e.metadata.current())
    }

    /// Where QEMU attaches its network.
    pub fn net_attach(&self) -> NetAttach {
        NetAttach {
            netns: self.slot().netns_path(),
            tap: TAP_NAME.into(),
            slot: self.slot().index(),
        }
    }
}

impl crate::sandbox::SandboxNet for SlotLease {
    fn attach(&self) -> NetAttach {
        self.net_attach()
    }

    fn envd_addr(&self) -> std::net::SocketAddr {
        self.slot().guest_endpoint(wrenn_image::ENVD_PORT)
    }

    fn slot_index(&self) -> Option<u32> {
        Some(self.slot().index())
    }

    fn publish(&self, doc: Option<Metadata>) {
        self.set_metadata(doc);
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            let index = entry.slot.index();
            drop(entry);
            if let Some(pool) = self.pool.upgrade() {
                pool.free_index(index);
            }
        }
    }
}

/// A QEMU started for a snapshot and waiting in `-incoming defer`, with its slot.
///
/// Its directory follows the sandbox layout (see `crate::sandbox`): `root/rootfs.qcow2` (the
/// disk overlay on the template's disk, kept for the sandbox's life), `root/vm/` (QEMU's
/// runtime files; removed with the [`Vm`]) and `root/sandbox.json` (its record, phase `warm`).
#[derive(Debug)]
pub struct WarmVm {
    /// The paused QEMU (`inmigrate`).
    pub vm: Vm,
    /// Its slot (the tap is already open in QEMU).
    pub slot: SlotLease,
    /// The directory holding the disk overlay, `vm/` and the record.
    pub root: PathBuf,
    /// The snapshot it was started for.
    pub snapshot_dir: PathBuf,
    /// That snapshot's creation time: a template re-taken in the same directory is another
    /// snapshot, and its memory file must not be mixed with the old device state.
    pub snapshot_created: u64,
}

impl WarmVm {
    /// The disk overlay (`root/rootfs.qcow2`).
    pub fn disk(&self) -> PathBuf {
        self.root.join(WARM_DISK)
    }
}

/// A warm VM after [`restore_warm`]: the guest runs.
#[derive(Debug)]
pub struct RestoredWarm {
    /// The running QEMU.
    pub vm: Vm,
    /// Its slot.
    pub slot: SlotLease,
    /// Its directory (see [`WarmVm`]).
    pub root: PathBuf,
}

const WARM_DISK: &str = "rootfs.qcow2";
const WARM_VM_DIR: &str = "vm";

/// Starts a QEMU for `snapshot` in `slot`, paused and waiting for its device state, in the new
/// directory `root` (layout in [`WarmVm`]; the record says `warm`). On failure the
/// directory is removed and the lease dropped (its slot deleted).
pub async fn launch_warm(
    snapshot: &Snapshot,
    template_id: &str,
    slot: SlotLease,
    root: &Path,
) -> Result<WarmVm, PoolError> {
    std::fs::create_dir_all(root).map_err(VmError::io("create", root))?;
    let guard = RemoveOnDrop(Some(root.to_owned()));
    let disk = root.join(WARM_DISK);
    let vm_dir = root.join(WARM_VM_DIR);
    let result = async {
        create_overlay(&snapshot.disk_path(), "qcow2", &disk).await?;
        let vm = Vm::launch(Launch {
            spec: snapshot.manifest.spec.clone(),
            dir: vm_dir.clone(),
            disk,
            memory: Memory::Private(snapshot.memory_path()),
            net: Some(slot.net_attach()),
            incoming: Some(snapshot.state_path()),
            extra_disks: vec![],
        })
        .await?;
        let warm = Phase::Warm {
            vm: VmProcess::of(&vm, Some(slot.slot().index()))?,
        };
        let rec = Recorder::new(root, None);
        tokio::task::spawn_blocking(move || rec.write(warm))
            .await
            .map_err(|e| PoolError::Join(e.to_string()))??;
        tracing::debug!(template_id, pid = vm.pid(), "warm QEMU waiting");
        Ok::<_, PoolError>(vm)
    }
    .await;
    let vm = result?;
    guard.disarm();
    Ok(WarmVm {
        vm,
        slot,
        root: root.to_owned(),
        snapshot_dir: snapshot.dir.clone(),
        snapshot_created: snapshot.manifest.created_unix,
    })
}

/// Removes a directory when dropped, unless disarmed: a warm VM's launch that fails, or whose
/// future is dropped halfway (its pool shut down during a refill), leaves nothing behind.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Loads `snapshot`'s device state into a warm VM and continues the guest: the second half of
/// [`Snapshot::restore`], without QEMU's start-up. On failure the VM is killed, its directory
/// removed and its slot deleted (dropped).
pub async fn restore_warm(snapshot: &Snapshot, warm: WarmVm) -> Result<RestoredWarm, PoolError> {
    if warm.snapshot_dir != snapshot.dir || warm.snapshot_created != snapshot.manifest.created_unix
    {
        let got = snapshot.dir.clone();
        let expected = warm.snapshot_dir.clone();
        let _ = warm.vm.kill().await;
        let _ = std::fs::remove_dir_all(&warm.root);
        return Err(PoolError::WrongSnapshot { expected, got });
    }
    let WarmVm { vm, slot, root, .. } = warm;
    // Template snapshots are saved with `x-ignore-shared` (RAM is the memory file).
    let loaded = crate::snapshot::load_into(&vm, true).await;
    if let Err(source) = loaded {
        let mut vm = vm;
        let _ = vm.wait_exit(Duration::from_secs(1)).await;
        let qemu_log = vm.qemu_log();
        let _ = vm.kill().await;
        let _ = std::fs::remove_dir_all(&root);
        return Err(PoolError::Load {
            dir: snapshot.dir.clone(),
            qemu_log,
            source,
        });
    }
    Ok(RestoredWarm { vm, slot, root })
}

#[derive(Debug)]
struct WarmInner {
    snapshot: Snapshot,
    template_id: String,
    slots: SlotPool,
    vms_root: PathBuf,
    target: usize,
    ready: Mutex<VecDeque<WarmVm>>,
    /// Wakes the refill task (after a take, or to stop).
    wake: Notify,
    /// Signalled by the refill task whenever it finishes a round.
    filled: Notify,
    closed: AtomicBool,
    refill_delay_ms: AtomicU64,
    /// When the last take happened (ms since `epoch`): a refill waits the delay after it.
    last_take_ms: AtomicU64,
    epoch: std::time::Instant,
}

impl WarmInner {
    /// How long a refill must still wait: the delay after the last take, read now (a take
    /// during an earlier wait, or a delay changed meanwhile, counts).
    fn refill_wait(&self) -> Duration {
        let last = self.last_take_ms.load(Ordering::Relaxed);
        if last == NEVER_TAKEN {
            return Duration::ZERO;
        }
        let delay = self.refill_delay_ms.load(Ordering::Relaxed);
        let since = (self.epoch.elapsed().as_millis() as u64).saturating_sub(last);
        Duration::from_millis(delay.saturating_sub(since))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<WarmVm>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Pre-started QEMU processes for one template snapshot, refilled in the background.
#[derive(Debug)]
pub struct WarmPool {
    inner: Arc<WarmInner>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl WarmPool {
    /// Starts a pool keeping `target` QEMU processes ready for `snapshot`, each in a slot from
    /// `slots`, with directories under `vms_root` (`warm-<pid>-<n>`). Filling starts at once,
    /// in the background.
    pub fn start(
        snapshot: Snapshot,
        template_id: &str,
        slots: SlotPool,
        vms_root: PathBuf,
        target: usize,
    ) -> Self {
        let inner = Arc::new(WarmInner {
            snapshot,
            template_id: template_id.to_owned(),
            slots,
            vms_root,
            target,
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            filled: Notify::new(),
            closed: AtomicBool::new(false),
            refill_delay_ms: AtomicU64::new(DEFAULT_REFILL_DELAY.as_millis() as u64),
            last_take_ms: AtomicU64::new(NEVER_TAKEN),
            epoch: std::time::Instant::now(),
        });
        let task = tokio::spawn(refill(inner.clone()));
        Self {
            inner,
            task: Some(task),
        }
    }

    /// Sets how long the refill waits after a take before starting a new QEMU.
    pub fn set_refill_delay(&self, delay: Duration) {
        self.inner
            .refill_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// The snapshot this pool serves.
    pub fn snapshot(&self) -> &Snapshot {
        &self.inner.snapshot
    }

    /// How many QEMU processes are waiting.
    pub fn ready(&self) -> usize {
        self.inner.lock().len()
    }

    /// Takes a waiting QEMU if there is one (never waits), and triggers a refill.
    pub fn take(&self) -> Option<WarmVm> {
        let vm = self.inner.lock().pop_front();
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        self.inner.last_take_ms.store(now, Ordering::Relaxed);
        self.inner.wake.notify_one();
        vm
    }

    /// Waits until `target` processes are waiting (or `timeout` passes); true if full.
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let target = self.inner.target;
        wait_until(&self.inner.filled, || self.ready() >= target, timeout).await
    }

    /// Stops refilling, kills every waiting QEMU and returns their slots.
    pub async fn shutdown(mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let waiting: Vec<WarmVm> = self.inner.lock().drain(..).collect();
        for w in waiting {
            discard(&self.inner.slots, w).await;
        }
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        // Without `shutdown`: stop the refill; the waiting VMs die here (Vm's Drop kills QEMU
        // and removes `vm/`, the leases delete their slots).
        self.inner.closed.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let waiting: Vec<WarmVm> = self.inner.lock().drain(..).collect();
        for w in waiting {
            let root = w.root.clone();
            drop(w);
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

async fn refill(inner: Arc<WarmInner>) {
    loop {
        let woken = inner.wake.notified();
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if inner.lock().len() < inner.target {
            let wait = inner.refill_wait();
            if !wait.is_zero() {
                // Woken early (a stale wake-up), or a take came during the last wait.
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = async {
                        while !inner.closed.load(Ordering::SeqCst) {
                            inner.wake.notified().await;
                        }
                    } => {}
                }
                continue;
            }
            match start_one(&inner).await {
                Ok(w) => {
                    if inner.closed.load(Ordering::SeqCst) {
                        discard(&inner.slots, w).await;
                        return;
                    }
                    inner.lock().push_back(w);
                    inner.filled.notify_waiters();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "warm pool: could not start a QEMU");
                    tokio::time::sleep(REFILL_BACKOFF).await;
                    continue;
                }
            }
        }
        inner.filled.notify_waiters();
        woken.await;
        let delay = Duration::from_millis(inner.refill_delay_ms.load(Ordering::Relaxed));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            // A shutdown does not wait out the delay.
            () = async {
                while !inner.closed.load(Ordering::SeqCst) {
                    inner.wake.notified().await;
                }
            } => {}
        }
    }
}

/// Waits until `done` holds, checking it whenever `changed` is signalled (or `timeout`
/// passes); whether it holds.
pub(crate) async fn wait_until(
    changed: &Notify,
    done: impl Fn() -> bool,
    timeout: Duration,
) -> bool {
    let until = async {
        loop {
            let notified = changed.notified();
            if done() {
                return;
            }
            notified.await;
        }
    };
    tokio::time::timeout(timeout, until).await.is_ok()
}

/// Kills a waiting QEMU, removes its directory and returns its slot to the pool.
pub async fn discard(slots: &SlotPool, warm: WarmVm) {
    let _ = warm.vm.kill().await;
    let _ = std::fs::remove_dir_all(&warm.root);
    slots.release(warm.slot).await;
}

/// Numbers warm VM directories: one counter for the process, not per pool, so the pools of
/// two templates never make the same directory (each would remove the other's VM).
static NEXT_WARM: AtomicU64 = AtomicU64::new(0);

async fn start_one(inner: &WarmInner) -> Result<WarmVm, PoolError> {
    let n = NEXT_WARM.fetch_add(1, Ordering::Relaxed);
    let dir = inner
        .vms_root
        .join(format!("warm-{}-{n}", std::process::id()));
    let lease = inner.slots.acquire().await?;
    launch_warm(&inner.snapshot, &inner.template_id, lease, &dir).await
}
