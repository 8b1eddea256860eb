//! A template's hot pool: a few sandboxes restored and warmed up ahead of time (see
//! [`crate::sandbox`]'s `hot` module), which creates take and give their identity to.
//!
//! Refills run in the background, one sandbox at a time, with the QEMU in a cgroup of low CPU
//! weight until a create takes it (then normal weight), so refills yield to running
//! sandboxes. The pool keeps no more than its target, and shrinks while the host is short of
//! memory: it refills only while `MemAvailable` leaves room for another sandbox besides a
//! reserve, and drops a waiting one (every check) while it does not.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::pool::{SlotLease, SlotPool};
use crate::sandbox::{Deadlines, InitConfig, Sandbox};
use crate::snapshot::Snapshot;

/// CPU weight of a hot sandbox's QEMU while it waits (running sandboxes have 100).
const WAITING_WEIGHT: u32 = 10;
/// CPU weight once taken.
const RUNNING_WEIGHT: u32 = 100;
/// How often the pool checks the host's memory (and retries after a failed refill).
const CHECK: Duration = Duration::from_secs(5);
/// Memory a refill leaves the host besides the new sandbox's RAM.
const RESERVE_BYTES: u64 = 1 << 30;
/// How long the warm-up's steps may take each.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// Hot sandboxes of one template.
#[derive(Debug)]
pub struct HotPool {
    inner: Arc<Inner>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    snapshot: Snapshot,
    template_id: String,
    slots: SlotPool,
    vms_root: PathBuf,
    target: usize,
    /// The guest user the warm-up runs as (the template's default user).
    user: String,
    deadlines: Deadlines,
    ready: Mutex<VecDeque<Sandbox<SlotLease>>>,
    wake: Notify,
    filled: Notify,
    closed: AtomicBool,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sandbox<SlotLease>>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Numbers hot sandbox directories (`hot-<pid>-<n>`) across every pool of the process.
static NEXT_HOT: AtomicU64 = AtomicU64::new(0);

impl HotPool {
    /// Starts keeping `target` hot sandboxes of `snapshot` (template `template_id`), warmed
    /// up as `user`, in slots from `slots` and directories under `vms_root`.
    pub fn start(
        snapshot: Snapshot,
        template_id: &str,
        slots: SlotPool,
        vms_root: PathBuf,
        target: usize,
        user: &str,
        deadlines: Deadlines,
    ) -> Self {
        let inner = Arc::new(Inner {
            snapshot,
            template_id: template_id.to_owned(),
            slots,
            vms_root,
            target,
            user: user.to_owned(),
            deadlines,
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            filled: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let task = tokio::spawn(refill(inner.clone()));
        Self {
            inner,
            task: Some(task),
        }
    }

    /// The snapshot it serves.
    pub fn snapshot(&self) -> &Snapshot {
        &self.inner.snapshot
    }

    /// How many hot sandboxes are waiting.
    pub fn ready(&self) -> usize {
        self.inner.lock().len()
    }

    /// Takes a waiting sandbox if there is one (never waits), at normal CPU weight, and
    /// triggers a refill. The caller gives it its identity ([`Sandbox::assume`]).
    pub fn take(&self) -> Option<Sandbox<SlotLease>> {
        let sb = self.inner.lock().pop_front();
        self.inner.wake.notify_one();
        if let Some(sb) = &sb {
            set_weight(sb, RUNNING_WEIGHT);
        }
        sb
    }

    /// Waits until `target` sandboxes are waiting (or `timeout` passes); true if full.
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let target = self.inner.target;
        crate::pool::wait_until(&self.inner.filled, || self.ready() >= target, timeout).await
    }

    /// Stops refilling and kills every waiting sandbox (their directories go, their slots
    /// return to the pool).
    pub async fn shutdown(mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let waiting: Vec<_> = self.inner.lock().drain(..).collect();
        for sb in waiting {
            discard(&self.inner, sb).await;
        }
    }
}

impl Drop for HotPool {
    fn drop(&mut self) {
        // Without `shutdown`: the waiting QEMUs die with their `Vm`s, the leases delete their
        // slots, and their directories go here.
        self.inner.closed.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let waiting: Vec<_> = self.inner.lock().drain(..).collect();
        for sb in waiting {
            let root = sb.root().to_owned();
            drop(sb);
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn set_weight(sb: &Sandbox<SlotLease>, weight: u32) {
    if let Some(leaf) = sb.vm().cgroup()
        && let Err(e) = leaf.set_cpu_weight(weight)
    {
        tracing::debug!(error = %e, "set a hot sandbox's CPU weight");
    }
}

async fn discard(inner: &Inner, sb: Sandbox<SlotLease>) {
    let lease = sb.kill().await;
    inner.slots.release(lease).await;
}

/// Whether the host has room for another sandbox of `ram_bytes` besides the reserve.
fn memory_allows(ram_bytes: u64) -> bool {
    crate::agent::proc_kib("/proc/meminfo", "MemAvailable")
        .is_none_or(|kib| kib * 1024 >= ram_bytes + RESERVE_BYTES)
}

async fn refill(inner: Arc<Inner>) {
    let ram = u64::from(inner.snapshot.manifest.spec.memory_mib) << 20;
    loop {
        let woken = inner.wake.notified();
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let waiting = inner.lock().len();
        if !memory_allows(ram) {
            let dropped = inner.lock().pop_back();
            if let Some(sb) = dropped {
                tracing::info!(template_id = %inner.template_id, "hot pool: memory is short; a waiting sandbox dropped");
                discard(&inner, sb).await;
            }
        } else if waiting < inner.target {
            match start_one(&inner).await {
                Ok(sb) if inner.closed.load(Ordering::SeqCst) => {
                    discard(&inner, sb).await;
                    return;
                }
                Ok(sb) => {
                    inner.lock().push_back(sb);
                    inner.filled.notify_waiters();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(template_id = %inner.template_id, error = %e, "hot pool: could not make a sandbox")
                }
            }
        }
        inner.filled.notify_waiters();
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep(CHECK) => {}
        }
    }
}

/// Restores, lowers its CPU weight and warms up one sandbox; nothing is left on failure.
async fn start_one(inner: &Inner) -> Result<Sandbox<SlotLease>, String> {
    let n = NEXT_HOT.fetch_add(1, Ordering::Relaxed);
    let root = (inner.vms_root).join(format!("hot-{}-{n}", std::process::id()));
    // A token of its own until a create gives it the sandbox's.
    let mut token = [0u8; 16];
    rand_fill(&mut token);
    let init = InitConfig {
        access_token: Some(hex::encode(token)),
        ..Default::default()
    };
    let made = Sandbox::create_pooled(
        &inner.snapshot,
        None,
        &inner.slots,
        &root,
        init,
        None,
        &inner.deadlines,
    )
    .await;
    let (sb, _) = made.map_err(|e| crate::error_chain(&e))?;
    set_weight(&sb, WAITING_WEIGHT);
    if let Err(e) = sb.warm_up(&inner.user, WARM_UP_TIMEOUT).await {
        let why = crate::error_chain(&e);
        discard(inner, sb).await;
        return Err(why);
    }
    tracing::info!(template_id = %inner.template_id, root = %root.display(), "hot sandbox ready");
    Ok(sb)
}

fn rand_fill(buf: &mut [u8]) {
    use std::io::Read as _;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}
