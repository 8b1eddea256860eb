//! The host agent: a [`Controller`] of the [`QemuRuntime`], what this host reports about
//! itself, and taking over the sandboxes an earlier agent left on the host (running QEMUs and
//! paused directories). [`crate::rpc`] serves it as `AgentService`; [`crate::proxy`] routes
//! sandbox traffic through it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::controller::{Controller, check_id};
use crate::pool::{SlotLease, SlotPool, WarmPool};
use crate::qemu::QemuRuntime;
use crate::record::{Phase, Recorder};
use crate::runtime::{Runtime as _, SandboxMeta, TemplateInfo};
use crate::sandbox::{Deadlines, PausedSandbox, Sandbox};
use crate::snapshot::Snapshot;

/// The host agent.
#[derive(Debug)]
pub struct Agent {
    host_id: String,
    proxy_url: String,
    /// vCPUs offered per host core (sandboxes idle most of the time).
    cpu_overcommit: u32,
    ctl: Arc<Controller<QemuRuntime>>,
    /// Template builds (`None`: this agent builds none).
    builds: Option<Arc<crate::builds::Builds>>,
    /// Where paused sandboxes are copied for other hosts (`None`: they stay here only).
    shared: Option<crate::shared::SharedStore>,
}

/// What the host has and uses, for placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUsage {
    /// The host's ID.
    pub host_id: String,
    /// vCPUs offered (cores times the overcommit).
    pub vcpus_total: u32,
    /// vCPUs held by sandboxes with a VM.
    pub vcpus_used: u32,
    /// Host memory.
    pub memory_mb_total: u64,
    /// Memory held by sandboxes with a VM.
    pub memory_mb_used: u64,
    /// Memory the host has free now (`MemAvailable`).
    pub memory_mb_available: u64,
    /// Free space where the sandboxes live.
    pub disk_free_mb: u64,
    /// Sandboxes, paused ones included.
    pub sandboxes: u32,
    /// The most sandboxes with a VM at once.
    pub max_sandboxes: u32,
    /// This host's sandbox proxy.
    pub proxy_url: String,
    /// Templates and their envd versions.
    pub templates: Vec<(String, TemplateInfo)>,
}

impl Agent {
    /// An agent keeping sandbox directories under `root`, with slots from `slots`, and
    /// lifecycle `deadlines`.
    pub fn new(
        host_id: impl Into<String>,
        slots: SlotPool,
        root: PathBuf,
        max_sandboxes: u32,
        deadlines: Deadlines,
    ) -> Self {
        let runtime = QemuRuntime::new(slots, root, deadlines);
        Self {
            host_id: host_id.into(),
            proxy_url: String::new(),
            cpu_overcommit: 1,
            ctl: Controller::new(runtime, max_sandboxes),
            builds: None,
            shared: None,
        }
    }

    /// Copies paused sandboxes into `store` (and resumes ones it holds that this host does
    /// not), see [`crate::shared`].
    pub fn with_shared_store(mut self, store: crate::shared::SharedStore) -> Self {
        self.shared = Some(store);
        self
    }

    /// This host's ID.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The shared store of paused sandboxes, if any.
    pub fn shared_store(&self) -> Option<&crate::shared::SharedStore> {
        self.shared.as_ref()
    }

    /// Offers `ratio` vCPUs per host core to placement (HostInfo's `vcpus_total`).
    pub fn with_cpu_overcommit(mut self, ratio: u32) -> Self {
        self.cpu_overcommit = ratio.max(1);
        self
    }

    /// The URL of this host's sandbox proxy, reported by HostInfo.
    pub fn with_proxy_url(mut self, url: impl Into<String>) -> Self {
        self.proxy_url = url.into();
        self
    }

    /// Builds templates with `builds`, and makes the templates it built earlier startable.
    pub fn with_builds(self, builds: crate::builds::Builds) -> Self {
        for (snapshot, info) in builds.existing() {
            self.register_template(info.build_id, snapshot, None, info.envd_version);
        }
        Self {
            builds: Some(Arc::new(builds)),
            ..self
        }
    }

    /// The template build service, if this agent builds templates.
    pub fn builds(&self) -> Option<&Arc<crate::builds::Builds>> {
        self.builds.as_ref()
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller<QemuRuntime>> {
        &self.ctl
    }

    pub(crate) fn runtime(&self) -> &QemuRuntime {
        self.ctl.runtime()
    }

    /// Makes `snapshot` startable as `template_id` (replacing any earlier one).
    pub fn register_template(
        &self,
        template_id: impl Into<String>,
        snapshot: Snapshot,
        warm: Option<WarmPool>,
        envd_version: impl Into<String>,
    ) {
        self.runtime()
            .register_template(template_id, snapshot, warm, envd_version);
    }

    /// [`Agent::register_template`] with a hot pool too.
    pub fn register_template_with(
        &self,
        template_id: impl Into<String>,
        snapshot: Snapshot,
        warm: Option<WarmPool>,
        hot: Option<crate::hotpool::HotPool>,
        envd_version: impl Into<String>,
    ) {
        (self.runtime()).register_template_with(template_id, snapshot, warm, hot, envd_version);
    }

    /// The base URL of a running sandbox's envd (through its slot).
    pub fn envd_base_url(&self, id: &str) -> Option<String> {
        self.ctl.with_running(id, |sb| sb.envd().base_url())
    }

    /// Where the host reaches `port` of a running sandbox (the proxy's route into the guest).
    pub fn guest_endpoint(
        &self,
        id: &str,
        port: u16,
    ) -> Option<(std::net::SocketAddr, tokio_util::sync::CancellationToken)> {
        self.ctl
            .with_running_traffic(id, |sb| self.runtime().endpoint(sb, port))
    }

    /// Deletes snapshot `id` (no more creates from it) and removes the deleted snapshots
    /// nothing is layered on any more. `false`: not a snapshot of this host.
    pub async fn delete_snapshot(&self, id: &str) -> bool {
        let root = self.runtime().snapshots_root();
        let sandboxes = self.runtime().root().to_owned();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let known = crate::snapshots::release(&root, &id);
            crate::snapshots::sweep(&root, &sandboxes);
            known
        })
        .await
        .unwrap_or(false)
    }

    /// Removes the deleted snapshots nothing is layered on any more. Blocking.
    pub fn sweep_snapshots(&self) {
        crate::snapshots::sweep(&self.runtime().snapshots_root(), self.runtime().root());
    }

    /// What the host has and uses.
    pub fn usage(&self) -> HostUsage {
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let (vcpus_used, memory_mb_used, sandboxes) = self.ctl.usage();
        HostUsage {
            host_id: self.host_id.clone(),
            vcpus_total: cores.saturating_mul(self.cpu_overcommit),
            vcpus_used,
            memory_mb_total: mem_total_mb(),
            memory_mb_used,
            memory_mb_available: proc_kib("/proc/meminfo", "MemAvailable")
                .map_or(0, |kb| kb / 1024),
            disk_free_mb: crate::qemu::free_bytes(self.runtime().root()).map_or(0, |b| b >> 20),
            sandboxes,
            max_sandboxes: self.ctl.max_sandboxes(),
            proxy_url: self.proxy_url.clone(),
            templates: self.runtime().templates(),
        }
    }

    /// Kills every sandbox (paused ones deleted too) and frees the pool's slots.
    pub async fn shutdown(&self) {
        // No more creates; the warm pools' waiting QEMUs (and any being started) go with
        // their templates.
        self.runtime().drop_templates();
        self.ctl.shutdown().await;
        self.runtime().slots().shutdown().await;
    }

    /// For a restart: pauses every running sandbox (so it stays resumable from disk, with its
    /// memory), keeps paused ones, and frees the pool's slots. A sandbox that cannot be paused
    /// is killed. Returns the IDs paused.
    pub async fn suspend(&self) -> Vec<String> {
        // No more creates; the warm pools' waiting QEMUs go with their templates.
        self.runtime().drop_templates();
        let paused = self.ctl.suspend().await;
        self.runtime().slots().shutdown().await;
        paused
    }

    /// Takes over running sandboxes whose QEMU outlived an earlier agent (found by
    /// [`crate::state::scan`], each with its slot taken over by [`SlotPool::with_adopted`]).
    /// One that cannot be taken over (no agent meta in its record, envd not answering) is
    /// stopped and removed. Returns the IDs taken.
    pub async fn adopt_running(
        &self,
        found: Vec<(crate::state::AdoptableVm, SlotLease)>,
    ) -> Vec<String> {
        let mut adopted = Vec::new();
        for (vm, lease) in found {
            let dir = vm.dir.clone();
            match self.adopt_one(vm, lease).await {
                Ok(id) => adopted.push(id),
                Err(reason) => {
                    tracing::warn!(dir = %dir.display(), %reason, "running VM not taken over; removed");
                    let _ =
                        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
                }
            }
        }
        adopted
    }

    async fn adopt_one(
        &self,
        found: crate::state::AdoptableVm,
        lease: SlotLease,
    ) -> Result<String, String> {
        let slots = self.runtime().slots();
        let crate::state::AdoptableVm {
            dir,
            record,
            vm: process,
            qmp,
            status,
        } = found;
        let meta = record
            .meta
            .clone()
            .filter(|m| check_id(&m.sandbox_id).is_ok());
        let vm = crate::vm::Vm::adopt(process.dir(), process.pid, process.start_time, qmp);
        let (Some(meta), Phase::Running { running, .. }) = (meta, record.phase.clone()) else {
            let _ = vm.kill().await;
            slots.release(lease).await;
            return Err("no agent meta in its running record".into());
        };
        let id = meta.sandbox_id.clone();
        if status != "running" {
            // Stopped by a pause that had not yet written its snapshot: the guest is intact,
            // let it run on.
            if let Err(e) = vm.qmp().cont().await {
                let _ = vm.kill().await;
                slots.release(lease).await;
                return Err(format!("cont: {e}"));
            }
        }
        let rec = Recorder::from_record(&dir, &record);
        let sb = Sandbox::adopt_running(rec, vm, lease, running);
        if let Err(e) = sb.envd().wait_healthy(Duration::from_secs(10)).await {
            let lease = sb.kill().await;
            slots.release(lease).await;
            return Err(format!("envd: {}", crate::error_chain(&e)));
        }
        // The slot kept its rules, but its resolver and proxy were the earlier agent's.
        if let Err(e) = sb.net().egress().apply(Some(&meta.egress.policy())).await {
            tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&e), "egress policy not applied again");
        }
        let token = sb.access_token().map(str::to_owned);
        let console = sb.vm().console();
        let dir = sb.root().to_owned();
        if let Err(sb) = self.ctl.insert_running(meta, Box::new(sb)) {
            let lease = sb.kill().await;
            slots.release(lease).await;
            return Err(format!("sandbox {id} is also on disk paused"));
        }
        self.runtime().track(&id, &dir);
        self.runtime()
            .observe
            .started(&id, token, console, "adopted after an agent restart")
            .await;
        tracing::info!(sandbox_id = %id, "running sandbox taken over");
        Ok(id)
    }

    /// Takes over paused sandboxes found on disk by [`crate::state::scan`] after a restart.
    /// Sandboxes whose files do not verify are left out (and reported); returns the IDs taken.
    pub fn load_paused(&self, found: &[crate::state::PausedVm]) -> Vec<String> {
        let mut loaded = Vec::new();
        for p in found {
            if p.dir.parent() != Some(self.runtime().root()) {
                tracing::warn!(dir = %p.dir.display(), "paused sandbox outside the agent's root");
                continue;
            }
            let paused = match PausedSandbox::open(&p.dir) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(dir = %p.dir.display(), error = %crate::error_chain(&e), "paused sandbox cannot be loaded");
                    continue;
                }
            };
            let Some(meta) = paused_meta(p, &paused) else {
                tracing::warn!(dir = %p.dir.display(), "paused sandbox without a usable ID");
                continue;
            };
            // Its next record carries the meta (one made up here for an older agent's).
            paused.recorder().set_meta(Some(meta.clone()));
            let id = meta.sandbox_id.clone();
            if self.ctl.insert_paused(meta, Box::new(paused)).is_ok() {
                self.runtime().track(&id, &p.dir);
                loaded.push(id);
            }
        }
        loaded
    }
}

/// The agent's meta of a paused sandbox found on disk; one without (an older agent's) gets
/// one from its directory name and manifest.
fn paused_meta(p: &crate::state::PausedVm, paused: &PausedSandbox) -> Option<SandboxMeta> {
    let saved = paused.meta();
    let id = match &saved {
        Some(m) if !m.sandbox_id.is_empty() => m.sandbox_id.clone(),
        _ => p.dir.file_name()?.to_str()?.to_owned(),
    };
    check_id(&id).ok()?;
    Some(match saved {
        Some(m) => SandboxMeta {
            sandbox_id: id,
            ..m
        },
        None => {
            let m = paused.manifest();
            SandboxMeta {
                sandbox_id: id,
                template_id: String::new(),
                vcpus: m.spec.vcpus,
                memory_mb: u64::from(m.spec.memory_mib),
                start_unix_ms: i64::try_from(m.paused_unix)
                    .unwrap_or(0)
                    .saturating_mul(1000),
                backstop_unix_ms: 0,
                auto_pause: false,
                envd_version: String::new(),
                // A paused sandbox without its meta: it resumes closed.
                egress: crate::runtime::Egress {
                    allow_internet_access: false,
                    ..Default::default()
                },
            }
        }
    })
}

/// Host memory in MiB (`MemTotal` of /proc/meminfo), 0 if unknown.
fn mem_total_mb() -> u64 {
    proc_kib("/proc/meminfo", "MemTotal").map_or(0, |kb| kb / 1024)
}

/// The `field: N kB` line of a `/proc` file (`meminfo`, `smaps_rollup`), in KiB.
pub(crate) fn proc_kib(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_fields_are_read_by_their_whole_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        std::fs::write(
            &path,
            "MemTotal:  2048 kB\nMemAvailable:    1024 kB\nSwap: x kB\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        assert_eq!(super::proc_kib(p, "MemTotal"), Some(2048));
        assert_eq!(super::proc_kib(p, "MemAvailable"), Some(1024));
        assert_eq!(super::proc_kib(p, "Mem"), None);
        assert_eq!(super::proc_kib(p, "Swap"), None);
        assert_eq!(super::proc_kib("/nonexistent", "MemTotal"), None);
    }
}
