//! The QEMU runtime: the [`Runtime`] the controller drives on a real host. Sandboxes are
//! [`Sandbox`]es restored from registered template snapshots into slots of a [`SlotPool`]
//! (a pre-started QEMU from the template's [`WarmPool`] when one waits), paused to
//! [`PausedSandbox`] directories under `root`.
//!
//! The agent's [`SandboxMeta`] (identity and timers) goes into each sandbox's record
//! (`crate::record`) with its phase, through the sandbox's own record writer, so a restarted
//! agent reads both back from one file.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::hotpool::HotPool;
use crate::observe::Observer;
use crate::pool::{SlotLease, SlotPool, WarmPool};
use crate::record::Recorder;
use crate::runtime::{
    Egress, GuestInit, Held, PauseFailure, PauseMode, ResumeFailure, Runtime, RuntimeError,
    SandboxMeta, SnapshotTaken, Stages, TemplateInfo,
};
use crate::sandbox::{
    Deadlines, Failed, InitConfig, PauseError, PausedSandbox, Sandbox, SandboxError, Timings,
};
use crate::snapshot::Snapshot;

/// Room a pause keeps free beyond the memory diff (device state, manifests, filesystem slack).
const PAUSE_SPACE_MARGIN: u64 = 16 << 20;

/// A running sandbox of this runtime.
pub type Running = Box<Sandbox<SlotLease>>;
/// A paused sandbox of this runtime.
pub type Paused = Box<PausedSandbox>;

/// A template this runtime can start sandboxes from.
#[derive(Debug)]
struct Template {
    snapshot: Snapshot,
    /// Its disk's virtual size, MiB.
    disk_mb: u64,
    /// Environment variables its sandboxes start with (a built template's `ENV`s).
    envs: Vec<(String, String)>,
    warm: Option<WarmPool>,
    /// Sandboxes restored and warmed up ahead of time, given their identity by a create.
    hot: Option<HotPool>,
    envd_version: String,
}

/// Sandboxes as QEMU microVMs in network slots.
#[derive(Debug)]
pub struct QemuRuntime {
    slots: SlotPool,
    root: PathBuf,
    deadlines: Deadlines,
    templates: Mutex<HashMap<String, Arc<Template>>>,
    /// Where each sandbox's directory is (a warm sandbox's is its warm VM's).
    dirs: Mutex<HashMap<String, PathBuf>>,
    /// Samples and logs for `Metrics` and `Logs`.
    pub(crate) observe: Observer,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn step(what: &'static str, e: SandboxError) -> RuntimeError {
    match e {
        SandboxError::Pool(p) => RuntimeError::Slots(Box::new(p)),
        e => RuntimeError::Step {
            step: what,
            source: Box::new(e),
        },
    }
}

impl QemuRuntime {
    /// A sandbox of `template`'s hot pool given `meta` and `init`, if one is waiting. One that
    /// fails to take its identity is killed, and the create restores one instead.
    async fn take_hot(
        &self,
        template: &Template,
        meta: &SandboxMeta,
        init: &InitConfig,
    ) -> Option<Sandbox<SlotLease>> {
        let mut sb = template.hot.as_ref()?.take()?;
        match sb.assume(meta.clone(), init.clone(), &self.deadlines).await {
            Ok(()) => Some(sb),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "a hot sandbox did not take its identity; restoring one");
                let lease = sb.kill().await;
                self.slots.release(lease).await;
                None
            }
        }
    }

    /// A runtime keeping sandbox directories under `root`, with slots from `slots`.
    pub fn new(slots: SlotPool, root: PathBuf, deadlines: Deadlines) -> Self {
        Self {
            slots,
            root,
            deadlines,
            templates: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            observe: Observer::default(),
        }
    }

    /// The slot pool.
    pub fn slots(&self) -> &SlotPool {
        &self.slots
    }

    /// Where sandbox directories are made.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where snapshots are kept: `snapshots/` next to the sandboxes directory.
    pub fn snapshots_root(&self) -> PathBuf {
        self.root.with_file_name("snapshots")
    }

    /// Makes `snapshot` startable as `template_id` (replacing any earlier one).
    pub fn register_template(
        &self,
        template_id: impl Into<String>,
        snapshot: Snapshot,
        warm: Option<WarmPool>,
        envd_version: impl Into<String>,
    ) {
        self.register_template_with(template_id, snapshot, warm, None, envd_version);
    }

    /// [`QemuRuntime::register_template`] with a hot pool too.
    pub fn register_template_with(
        &self,
        template_id: impl Into<String>,
        snapshot: Snapshot,
        warm: Option<WarmPool>,
        hot: Option<HotPool>,
        envd_version: impl Into<String>,
    ) {
        let disk_mb = crate::jail::disk::virtual_size(&snapshot.disk_path())
            .map_or(0, |b| b.div_ceil(1 << 20));
        // A built template's environment variables: every sandbox of it gets them (its own
        // `envs` on top), as E2B templates' `ENV`s.
        let envs = crate::build::Defaults::read(&snapshot.dir, Default::default()).envs;
        let t = Template {
            disk_mb,
            envs,
            snapshot,
            warm,
            hot,
            envd_version: envd_version.into(),
        };
        lock(&self.templates).insert(template_id.into(), Arc::new(t));
    }

    /// Stops starting sandboxes from template `id` (running and paused ones are not affected:
    /// resumes use their own manifest's template directory).
    pub fn unregister_template(&self, id: &str) {
        let gone = lock(&self.templates).remove(id);
        drop(gone);
    }

    /// The snapshot of template `id` and its envd version.
    pub fn template_snapshot(&self, id: &str) -> Option<(Snapshot, String)> {
        lock(&self.templates)
            .get(id)
            .map(|t| (t.snapshot.clone(), t.envd_version.clone()))
    }

    /// Drops every template (their warm pools' waiting QEMUs with them): no more creates.
    pub fn drop_templates(&self) {
        let templates = std::mem::take(&mut *lock(&self.templates));
        drop(templates);
    }

    /// Notes where a sandbox found on the host lives.
    pub(crate) fn track(&self, id: &str, dir: &Path) {
        lock(&self.dirs).insert(id.to_owned(), dir.to_owned());
    }

    /// Where sandbox `id` lives.
    pub(crate) fn dir_of(&self, id: &str) -> PathBuf {
        lock(&self.dirs)
            .get(id)
            .cloned()
            .unwrap_or_else(|| self.root.join(id))
    }

    /// Saves `meta` into the record `rec` writes, off the async workers when there are some.
    /// Failures are logged: the sandbox works without it, only a restarted agent would see
    /// the earlier timers.
    fn write_meta(&self, meta: &SandboxMeta, rec: &Recorder) {
        let (rec, meta) = (rec.clone(), meta.clone());
        let write = move || {
            if let Err(e) = rec.save_meta(meta) {
                tracing::warn!(error = %crate::error_chain(&e), dir = %rec.dir().display(), "could not save the sandbox's timers");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// Free space for a pause of `sb`: its memory diff can be as large as the QEMU process's
    /// anonymous memory (capped at the guest's RAM), and committing its run overlay as large
    /// as the overlay. A shortfall is refused before the guest stops.
    fn check_pause_space(&self, sb: &Running) -> Result<(), RuntimeError> {
        let ram = u64::from(sb.memory_mib()) << 20;
        let anon = anonymous_bytes(sb.vm().pid()).unwrap_or(ram).min(ram);
        let overlay = sb
            .pending_commit()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        let need = anon + overlay + PAUSE_SPACE_MARGIN;
        let free = free_bytes(sb.root()).unwrap_or(u64::MAX);
        if free < need {
            return Err(RuntimeError::NoSpace {
                dir: sb.root().display().to_string(),
                need_mib: need >> 20,
                free_mib: free >> 20,
            });
        }
        Ok(())
    }
}

/// `Anonymous` of `/proc/<pid>/smaps_rollup`: the guest pages QEMU copied from the template
/// (plus its own heap), an upper bound of the memory diff.
fn anonymous_bytes(pid: u32) -> Option<u64> {
    let kb = crate::agent::proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Anonymous")?;
    Some(kb << 10)
}

/// Bytes free for unprivileged writers on the filesystem holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() * s.fragment_size())
}

impl Runtime for QemuRuntime {
    type Running = Running;
    type Paused = Paused;

    fn template(&self, id: &str) -> Option<TemplateInfo> {
        lock(&self.templates).get(id).map(|t| info(t))
    }

    fn templates(&self) -> Vec<(String, TemplateInfo)> {
        lock(&self.templates)
            .iter()
            .map(|(id, t)| (id.clone(), info(t)))
            .collect()
    }

    async fn create(
        &self,
        meta: &SandboxMeta,
        init: GuestInit,
    ) -> Result<(Running, Stages), RuntimeError> {
        let id = meta.sandbox_id.as_str();
        let template = lock(&self.templates)
            .get(&meta.template_id)
            .cloned()
            .ok_or_else(|| RuntimeError::TemplateNotFound(meta.template_id.clone()))?;
        let mut env_vars: BTreeMap<String, String> = template.envs.iter().cloned().collect();
        env_vars.extend(init.env_vars);
        let init = InitConfig {
            env_vars,
            access_token: init.access_token,
            ..Default::default()
        };
        let token = init.access_token.clone();
        let start = std::time::Instant::now();
        if let Some(sb) = self.take_hot(&template, meta, &init).await {
            // A hot sandbox is already restored and warm: its create is the `/init` that gives
            // it its identity, then its egress.
            let mut stages = Stages::default();
            stages.push("hot", start.elapsed());
            let egress_start = std::time::Instant::now();
            if let Err(e) = open_egress(&sb, meta).await {
                let lease = sb.kill().await;
                self.slots.release(lease).await;
                return Err(e);
            }
            stages.push("egress", egress_start.elapsed());
            tracing::info!(total = ?start.elapsed(), "guest started from the hot pool");
            self.track(id, sb.root());
            self.observe
                .started(id, token, sb.vm().console(), "created")
                .await;
            return Ok((Box::new(sb), stages));
        }
        let (sb, t) = Sandbox::create_pooled(
            &template.snapshot,
            template.warm.as_ref(),
            &self.slots,
            &self.root.join(id),
            init,
            Some(meta.clone()),
            &self.deadlines,
        )
        .await
        .map_err(|e| step("restore the template", e))?;
        let egress_start = std::time::Instant::now();
        if let Err(e) = open_egress(&sb, meta).await {
            let lease = sb.kill().await;
            self.slots.release(lease).await;
            return Err(e);
        }
        let mut stages = create_stages(&t);
        stages.push("egress", egress_start.elapsed());
        tracing::info!(total = ?t.total, warm = t.warm, "guest started");
        self.track(id, sb.root());
        self.observe
            .started(id, token, sb.vm().console(), "created")
            .await;
        Ok((Box::new(sb), stages))
    }

    async fn pause(
        &self,
        meta: &SandboxMeta,
        sb: Running,
        mode: PauseMode,
    ) -> Result<Paused, PauseFailure<Running>> {
        let id = meta.sandbox_id.as_str();
        if let Err(e) = self.check_pause_space(&sb) {
            return Err(PauseFailure::Running(e, sb));
        }
        // The pause's records carry the meta as it is now.
        sb.recorder().set_meta(Some(meta.clone()));
        // The VM's console goes with it: read it first.
        self.observe.catch_up(id).await;
        let paused = match mode {
            PauseMode::Full => sb.pause(&self.deadlines).await,
            PauseMode::Filesystem => sb.pause_filesystem(&self.deadlines).await,
        };
        match paused {
            Ok((paused, lease, t)) => {
                tracing::info!(total = ?t.total, dirty = t.dirty_bytes, "snapshot written");
                self.observe.paused(id);
                self.slots.release(lease).await;
                Ok(Box::new(paused))
            }
            Err(PauseError::StillRunning { error, sandbox }) => {
                Err(PauseFailure::Running(step("pause", error), sandbox))
            }
            Err(PauseError::Lost { error, net }) => {
                self.slots.release(net).await;
                self.observe.forget(id);
                Err(PauseFailure::Lost(step("pause", error)))
            }
        }
    }

    async fn resume(
        &self,
        meta: &SandboxMeta,
        mut paused: Paused,
        init: GuestInit,
    ) -> Result<Running, ResumeFailure<Paused>> {
        let id = meta.sandbox_id.as_str();
        let lease = match self.slots.acquire().await {
            Ok(l) => l,
            Err(e) => {
                return Err(ResumeFailure::Paused(
                    RuntimeError::Slots(Box::new(e)),
                    paused,
                ));
            }
        };
        paused.recorder().set_meta(Some(meta.clone()));
        if init.reboot {
            paused.set_reboot();
        }
        let saved = paused.init().clone();
        if init.access_token.is_some() || !init.env_vars.is_empty() {
            let mut next = saved.clone();
            if init.access_token.is_some() {
                next.access_token = init.access_token;
            }
            next.env_vars.extend(init.env_vars);
            paused.set_init(next);
        }
        let root = paused.root().to_owned();
        let token = paused.init().access_token.clone();
        match (*paused).resume(lease, &self.deadlines).await {
            Ok((sb, t)) => {
                if let Err(error) = open_egress(&sb, meta).await {
                    // Its slot stays closed: the guest runs without egress rather than with
                    // more than its policy allows.
                    tracing::error!(error = %crate::error_chain(&error), "resumed without egress");
                }
                tracing::info!(total = ?t.total, "guest resumed");
                self.track(id, sb.root());
                self.observe
                    .started(id, token, sb.vm().console(), "resumed")
                    .await;
                Ok(Box::new(sb))
            }
            Err(Failed { error, net }) => {
                self.slots.release(net).await;
                let error = step("resume", error);
                // The paused files are untouched by a failed resume; they still verify
                // unless they were damaged before it.
                match PausedSandbox::open(&root) {
                    Ok(p) => Err(ResumeFailure::Paused(error, Box::new(p))),
                    Err(_) => Err(ResumeFailure::Lost(error)),
                }
            }
        }
    }

    async fn snapshot(
        &self,
        meta: &SandboxMeta,
        paused: &Paused,
        snapshot_id: &str,
    ) -> Result<SnapshotTaken, RuntimeError> {
        let root = self.snapshots_root();
        let (meta2, id) = (meta.clone(), snapshot_id.to_owned());
        // The paused handle stays with the controller; the snapshot reads its files.
        let paused = PausedSandbox::open(paused.root()).map_err(|e| step("snapshot", e))?;
        let info = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&root)
                .map_err(|e| crate::snapshots::SnapshotsError::Io {
                    what: "create",
                    path: root.clone(),
                    source: e,
                })
                .and_then(|()| crate::snapshots::take(&root, &id, &meta2, &paused))
        })
        .await
        .map_err(|e| RuntimeError::step("snapshot")(Box::new(e)))?
        .map_err(|e| RuntimeError::step("snapshot")(Box::new(e)))?;
        tracing::info!(snapshot_id = %info.id, disk_bytes = info.disk_bytes, memory_bytes = info.memory_bytes, "snapshot taken");
        Ok(taken(&info))
    }

    async fn snapshot_running(
        &self,
        meta: &SandboxMeta,
        sandbox: &Running,
        snapshot_id: &str,
    ) -> Result<(SnapshotTaken, std::time::Duration), RuntimeError> {
        let root = self.snapshots_root();
        std::fs::create_dir_all(&root).map_err(|e| RuntimeError::step("snapshot")(Box::new(e)))?;
        let (info, stopped) =
            crate::snapshots::take_running(&root, snapshot_id, meta, sandbox, &self.deadlines)
                .await
                .map_err(|e| RuntimeError::step("snapshot")(Box::new(e)))?;
        tracing::info!(snapshot_id = %info.id, ?stopped, disk_bytes = info.disk_bytes, memory_bytes = info.memory_bytes, "snapshot taken in place");
        Ok((taken(&info), stopped))
    }

    fn snapshot_info(&self, snapshot_id: &str) -> Option<SnapshotTaken> {
        crate::snapshots::open(&self.snapshots_root(), snapshot_id).map(|i| taken(&i))
    }

    async fn create_from_snapshot(
        &self,
        meta: &SandboxMeta,
        snapshot_id: &str,
        init: GuestInit,
    ) -> Result<(Running, Stages), RuntimeError> {
        let dir = self.root.join(&meta.sandbox_id);
        let paused = crate::snapshots::materialize(&self.snapshots_root(), snapshot_id, &dir, meta)
            .await
            .map_err(|e| RuntimeError::step("prepare from the snapshot")(Box::new(e)))?;
        self.track(&meta.sandbox_id, &dir);
        // Its steps are a resume's, which the runtime does not break down (yet).
        match self.resume(meta, Box::new(paused), init).await {
            Ok(sb) => Ok((sb, Stages::default())),
            Err(ResumeFailure::Paused(e, p)) => {
                // A sandbox that never ran leaves nothing.
                let _ = tokio::task::spawn_blocking(move || p.remove()).await;
                lock(&self.dirs).remove(&meta.sandbox_id);
                Err(e)
            }
            Err(ResumeFailure::Lost(e)) => {
                let _ = std::fs::remove_dir_all(&dir);
                lock(&self.dirs).remove(&meta.sandbox_id);
                Err(e)
            }
        }
    }

    async fn kill(&self, id: &str, sb: Running) {
        self.observe.forget(id);
        let lease = sb.kill().await;
        self.slots.release(lease).await;
        lock(&self.dirs).remove(id);
    }

    async fn remove(&self, id: &str, paused: Paused) {
        self.observe.forget(id);
        let root = paused.root().to_owned();
        let removed = tokio::task::spawn_blocking(move || paused.remove()).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!(root = %root.display(), "remove paused sandbox; retrying");
            let _ = std::fs::remove_dir_all(&root);
        }
        lock(&self.dirs).remove(id);
    }

    fn save_meta(&self, meta: &SandboxMeta, sandbox: Held<'_, Self>) {
        let rec = match sandbox {
            Held::Running(sb) => sb.recorder(),
            Held::Paused(p) => p.recorder(),
        };
        self.write_meta(meta, rec);
    }

    fn recover(&self, meta: &SandboxMeta) -> Option<Paused> {
        // The operation's QEMU went with its dropped future; a pause with a complete snapshot
        // is finished, a resume undone.
        let dir = self.dir_of(&meta.sandbox_id);
        match crate::sandbox::settle_interrupted(&dir) {
            Ok(p) => Some(Box::new(p)),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "nothing paused left");
                self.discard(meta);
                None
            }
        }
    }

    fn discard(&self, meta: &SandboxMeta) {
        self.observe.forget(&meta.sandbox_id);
        let dir = lock(&self.dirs).remove(&meta.sandbox_id);
        let dir = dir.unwrap_or_else(|| self.root.join(&meta.sandbox_id));
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, dir = %dir.display(), "remove what is left of a sandbox");
        }
    }

    fn endpoint(&self, sb: &Running, port: u16) -> SocketAddr {
        sb.net().slot().guest_endpoint(port)
    }

    fn set_egress(
        &self,
        sb: &Running,
        egress: &Egress,
    ) -> futures::future::BoxFuture<'static, Result<(), RuntimeError>> {
        let applier = sb.net().egress();
        let policy = egress.policy();
        Box::pin(async move {
            applier
                .apply(Some(&policy))
                .await
                .map_err(|e| RuntimeError::step("apply the egress policy")(Box::new(e)))
        })
    }
}

/// Gives a sandbox that just got its slot (created or resumed) its egress policy; the slot was
/// closed until now.
async fn open_egress(sb: &Sandbox<SlotLease>, meta: &SandboxMeta) -> Result<(), RuntimeError> {
    sb.net()
        .egress()
        .apply(Some(&meta.egress.policy()))
        .await
        .map_err(|e| RuntimeError::step("apply the egress policy")(Box::new(e)))
}

/// A create's steps from its cumulative timings: the slot (or pre-started QEMU), the restore
/// (a cold QEMU's start, the disk overlay, device state loaded, `cont`), envd's first
/// `/health` answer and `/init`.
fn create_stages(t: &Timings) -> Stages {
    let mut s = Stages::default();
    s.push("slot", t.slot);
    s.push("restore", t.restored.saturating_sub(t.slot));
    s.push("envd", t.healthy.saturating_sub(t.restored));
    s.push("init", t.total.saturating_sub(t.healthy));
    s
}

fn info(t: &Template) -> TemplateInfo {
    let m = &t.snapshot.manifest.spec;
    TemplateInfo {
        vcpus: m.vcpus,
        memory_mb: u64::from(m.memory_mib),
        disk_mb: t.disk_mb,
        envd_version: t.envd_version.clone(),
    }
}

/// A snapshot as the controller sees it.
fn taken(info: &crate::snapshots::SnapshotInfo) -> SnapshotTaken {
    SnapshotTaken {
        template_id: info.meta.template_id.clone(),
        vcpus: info.meta.vcpus,
        memory_mb: info.meta.memory_mb,
        envd_version: info.meta.envd_version.clone(),
        disk_bytes: info.disk_bytes,
        memory_bytes: info.memory_bytes,
        parent: info.parent.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn create_stages_split_the_cumulative_timings() {
        let ms = Duration::from_millis;
        let t = Timings {
            slot: ms(2),
            restored: ms(30),
            healthy: ms(200),
            total: ms(260),
            warm: false,
        };
        assert_eq!(
            create_stages(&t).0,
            [
                ("slot", ms(2)),
                ("restore", ms(28)),
                ("envd", ms(170)),
                ("init", ms(60))
            ]
        );
    }
}
