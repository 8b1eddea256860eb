//! Template builds: a parent template's disk, steps run inside a build microVM through envd,
//! each disk-changing step's result a cached copy-on-write layer, then an optional start
//! command, a ready check, and a snapshot of the running VM as a new template.
//!
//! Nothing of a build runs on the host: the context archives the SDK uploaded are handed to
//! the guest as files and unpacked there, so no untrusted archive is extracted on the host
//! and no symlink in it is ever followed out of a layer root by a host process.
//!
//! The build VM boots cold (the parent template's disk, or the last cached layer a rebuild
//! still matches, under a fresh overlay), jailed like every VM, in the host's build slot.
//! The template it makes keeps one disk layer of its own on its parent's disk (the build's
//! layers flattened), so templates never depend on the layer cache.

mod guest;
pub mod image;
pub(crate) mod layers;
mod steps;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wrenn_hostnet::{Slot, TAP_NAME};
use wrenn_image::ENVD_PORT;

pub use guest::{Guest, GuestError, RunAs, Stream};
pub use steps::{Context, RawStep, Step, StepError};

use crate::envd::EnvdClient;
use crate::snapshot::{self, Snapshot, SnapshotError};
use crate::vm::{Launch, Memory, NetAttach, Vm, VmError, VmSpec, create_overlay};
use layers::LiveDisk;
use steps::{layer_key, shell_quote};

/// The longest a build VM may take to boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The longest one step may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the ready command may keep failing after the start command started.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Between ready checks.
const READY_INTERVAL: Duration = Duration::from_millis(500);
/// Where context archives go in the guest.
const GUEST_FILES: &str = "/tmp/.wrenn-build";
/// The template defaults file kept with every built template.
pub const DEFAULTS_FILE: &str = "defaults.json";

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A step is not one we can run.
    #[error(transparent)]
    Step(#[from] StepError),
    /// A `COPY` names a context archive that was never uploaded.
    #[error("step {index}: the files of `{step}` were not uploaded (hash {hash})")]
    MissingFiles {
        /// Which step (from 1).
        index: usize,
        /// The step.
        step: String,
        /// Its filesHash.
        hash: String,
    },
    /// A step's command failed.
    #[error("step {index} `{step}` failed with exit code {code}")]
    StepFailed {
        /// Which step (from 1).
        index: usize,
        /// The step.
        step: String,
        /// Its exit code.
        code: i32,
    },
    /// A container image could not be unpacked or made bootable.
    #[error("{0}")]
    Image(String),
    /// The start command ended, or the ready command never succeeded.
    #[error("the start command {0}")]
    NotReady(String),
    /// Talking to the guest failed.
    #[error("step {index}: {source}")]
    Guest {
        /// Which step (0: before the steps).
        index: usize,
        /// The cause.
        #[source]
        source: GuestError,
    },
    /// The build VM did not boot.
    #[error("the build VM did not come up: {error}\nconsole:\n{console}")]
    Boot {
        /// The last error.
        error: String,
        /// The end of its console.
        console: String,
    },
    /// QEMU or a disk operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Snapshotting failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a build starts from: a template's disk, or an unpacked container image's.
#[derive(Debug, Clone)]
pub struct Parent {
    /// The directory holding `disk` (kept as long as templates built on it are).
    pub dir: PathBuf,
    /// The qcow2 disk the build's layers go on.
    pub disk: PathBuf,
    /// The machine the build VM (and the template's sandboxes) run: kernel, initramfs,
    /// command line.
    pub spec: VmSpec,
    /// What the layer cache keys its first layer by: the parent's identity and content.
    pub key: String,
}

impl Parent {
    /// A template as a parent.
    pub fn template(t: &Snapshot) -> Self {
        Self {
            dir: t.dir.clone(),
            disk: t.dir.join(snapshot::DISK_FILE),
            spec: t.manifest.spec.clone(),
            key: format!("{}:{}", t.dir.display(), t.manifest.state_sha256),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// What it starts from.
    pub parent: Parent,
    /// Its defaults (what its sandboxes run as).
    pub parent_defaults: Defaults,
    /// vCPUs and RAM of the build VM and of the template's sandboxes.
    pub vcpus: u32,
    /// See `vcpus`.
    pub memory_mib: u32,
    /// The steps.
    pub steps: Vec<RawStep>,
    /// Run after the steps and kept running in the snapshot.
    pub start_cmd: Option<String>,
    /// Must succeed before the snapshot is taken (default: nothing to wait for).
    pub ready_cmd: Option<String>,
    /// Rebuild every step.
    pub skip_cache: bool,
    /// Context archives by hash (host paths, gzip'd tar as the SDK packs them).
    pub files: HashMap<String, PathBuf>,
}

/// The defaults a template's sandboxes start with.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Defaults {
    /// envd's default user.
    pub user: Option<String>,
    /// envd's default working directory.
    pub workdir: Option<String>,
    /// Environment variables every sandbox of the template has (its own `envs` on top).
    #[serde(default)]
    pub envs: Vec<(String, String)>,
    /// The start command running in the snapshot, if any: started again when a sandbox's disk
    /// is booted cold.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// What told the build the start command was ready (polled again after a cold boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
}

impl Defaults {
    /// Reads `dir`'s defaults file; a template without one (the built-in ones) has
    /// `fallback`'s.
    pub fn read(dir: &Path, fallback: Defaults) -> Defaults {
        std::fs::read(dir.join(DEFAULTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(fallback)
    }
}

/// What a build reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// A log line.
    Log {
        /// `info`, `warn` or `error`.
        level: &'static str,
        /// The line.
        message: String,
        /// The step it belongs to (from 1), if any.
        step: Option<usize>,
    },
    /// A step starts (`cached`: its layer is reused).
    Step {
        /// Which (from 1).
        index: usize,
        /// Of how many.
        total: usize,
        /// Reused from the cache.
        cached: bool,
    },
}

/// Where a build keeps things.
#[derive(Debug, Clone)]
pub struct BuildDirs {
    /// The layer cache (`<key>.qcow2`).
    pub layers: PathBuf,
    /// Scratch space for this build (removed after).
    pub work: PathBuf,
    /// Where the template goes (must not exist; made only when complete).
    pub out: PathBuf,
}

pub type Report<'a> = &'a (dyn Fn(BuildEvent) + Send + Sync);

fn log(report: Report<'_>, step: Option<usize>, level: &'static str, message: String) {
    report(BuildEvent::Log {
        level,
        message,
        step,
    });
}

/// Builds the template `req` describes in `slot`; on success it is a complete template in
/// `dirs.out` (with its [`DEFAULTS_FILE`]). A failed build leaves nothing in `dirs.out`; the
/// layers of the steps that succeeded stay cached.
pub async fn build(
    req: &BuildRequest,
    dirs: &BuildDirs,
    slot: &Slot,
    report: Report<'_>,
) -> Result<Snapshot, BuildError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Io { what, path, source }
    };
    let steps = req
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| Step::parse(i + 1, s))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, s) in steps.iter().enumerate() {
        if let Step::Copy { files_hash, .. } = s
            && !req.files.contains_key(files_hash)
        {
            return Err(BuildError::MissingFiles {
                index: i + 1,
                step: s.describe(),
                hash: files_hash.clone(),
            });
        }
    }
    std::fs::create_dir_all(&dirs.layers).map_err(io("create", &dirs.layers))?;
    let _ = std::fs::remove_dir_all(&dirs.work);
    std::fs::create_dir_all(&dirs.work).map_err(io("create", &dirs.work))?;
    let staging = dirs.out.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
    let res = run(req, &steps, dirs, &staging, slot, report).await;
    let _ = std::fs::remove_dir_all(&dirs.work);
    match res {
        Ok(defaults) => {
            let path = staging.join(DEFAULTS_FILE);
            let text = serde_json::to_vec_pretty(&defaults).unwrap_or_default();
            std::fs::write(&path, text).map_err(io("write", &path))?;
            std::fs::rename(&staging, &dirs.out).map_err(io("rename", &staging))?;
            Ok(Snapshot::open(&dirs.out)?)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// The plan: which steps are cached, and the base the VM boots on.
struct Plan {
    /// Per step: its layer's key (for layer-making steps) and context after it.
    keys: Vec<Option<String>>,
    /// Steps before this index are reused.
    first_run: usize,
    /// The disk the build VM boots on.
    base: PathBuf,
    /// The context at `first_run`.
    ctx: Context,
}

fn plan(req: &BuildRequest, steps: &[Step], layers: &Path, report: Report<'_>) -> Plan {
    let parent_disk = req.parent.disk.clone();
    let defaults = &req.parent_defaults;
    let mut ctx = Context::new(
        defaults.user.clone().unwrap_or_else(|| "root".into()),
        defaults.workdir.clone(),
        defaults.envs.clone(),
    );
    let mut parent_key = req.parent.key.clone();
    let mut keys = Vec::with_capacity(steps.len());
    let (mut first_run, mut base, mut base_ctx) = (0, parent_disk, ctx.clone());
    let mut hit = !req.skip_cache;
    for (i, (step, raw)) in steps.iter().zip(&req.steps).enumerate() {
        hit &= !raw.force;
        if step.makes_layer() {
            let key = layer_key(&parent_key, step, &ctx);
            let path = layers.join(format!("{key}.qcow2"));
            hit &= path.exists();
            if hit {
                // Its mtime says when a build last used it (the layer cache's collection
                // removes the least recently used first).
                let _ = std::fs::File::open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                first_run = i + 1;
                base = path;
                ctx.apply(step);
                base_ctx = ctx.clone();
            } else {
                ctx.apply(step);
            }
            parent_key = key.clone();
            keys.push(Some(key));
        } else {
            ctx.apply(step);
            if hit {
                first_run = i + 1;
                base_ctx = ctx.clone();
            }
            keys.push(None);
        }
    }
    if first_run > 0 {
        log(
            report,
            None,
            "info",
            format!("reusing cached layers of steps 1-{first_run}"),
        );
    }
    Plan {
        keys,
        first_run,
        base,
        ctx: base_ctx,
    }
}

async fn run(
    req: &BuildRequest,
    steps: &[Step],
    dirs: &BuildDirs,
    staging: &Path,
    slot: &Slot,
    report: Report<'_>,
) -> Result<Defaults, BuildError> {
    let started = Instant::now();
    let plan = plan(req, steps, &dirs.layers, report);
    let spec = VmSpec {
        memory_mib: req.memory_mib,
        vcpus: req.vcpus,
        ..req.parent.spec.clone()
    };
    let disk = dirs.work.join("top0.qcow2");
    create_overlay(&plan.base, "qcow2", &disk).await?;
    let size = crate::jail::disk::virtual_size(&disk)
        .map_err(crate::jail::JailError::from)
        .map_err(VmError::from)?;
    let vm = Vm::launch(Launch {
        spec: spec.clone(),
        dir: dirs.work.join("vm"),
        disk: disk.clone(),
        memory: Memory::Shared(snapshot::template_memory_path(staging)),
        net: Some(NetAttach {
            netns: slot.netns_path(),
            tap: TAP_NAME.into(),
            slot: slot.index(),
        }),
        incoming: None,
        extra_disks: vec![],
    })
    .await?;
    let token = hex::encode(rand_bytes());
    let guest = match boot(&vm, slot, &token).await {
        Ok(g) => g,
        Err(e) => {
            let _ = vm.kill().await;
            return Err(e);
        }
    };
    log(
        report,
        None,
        "info",
        format!("build VM up in {:.1} s", started.elapsed().as_secs_f64()),
    );
    let mut live = LiveDisk::new(disk, size);
    let mut ctx = plan.ctx.clone();
    let total = steps.len();
    for (i, step) in steps.iter().enumerate() {
        let index = i + 1;
        let cached = i < plan.first_run;
        report(BuildEvent::Step {
            index,
            total,
            cached,
        });
        log(
            report,
            Some(index),
            "info",
            format!(
                "[{index}/{total}] {}{}",
                step.describe(),
                if cached { " (cached)" } else { "" }
            ),
        );
        if cached {
            continue;
        }
        if let Err(e) = run_step(&guest, step, index, &ctx, req, report).await {
            let _ = vm.kill().await;
            return Err(e);
        }
        ctx.apply(step);
        if let Some(key) = &plan.keys[i] {
            let sync = guest
                .run("sync", &root(), STEP_TIMEOUT, &mut |_, _| {})
                .await;
            let frozen = match sync {
                Ok(_) => live
                    .freeze(&vm, &dirs.layers.join(format!("{key}.qcow2")))
                    .await
                    .map_err(BuildError::from),
                Err(source) => Err(BuildError::Guest { index, source }),
            };
            if let Err(e) = frozen {
                let _ = vm.kill().await;
                return Err(e);
            }
        }
    }
    let defaults = Defaults {
        user: Some(ctx.user.clone()),
        workdir: ctx.workdir.clone(),
        envs: ctx.envs.clone(),
        start_cmd: req.start_cmd.clone(),
        ready_cmd: req.ready_cmd.clone(),
    };
    if let Err(e) = start_and_wait(&guest, req, &ctx, report).await {
        let _ = vm.kill().await;
        return Err(e);
    }
    let envd =
        EnvdClient::new(slot.guest_endpoint(ENVD_PORT)).with_access_token(Some(token.clone()));
    let mut init = serde_json::Map::new();
    // envd refuses an /init that would change its token without the host's say-so; a
    // sandbox of the template gets its own token through the metadata endpoint.
    init.insert("accessToken".into(), token.into());
    init.insert("defaultUser".into(), ctx.user.clone().into());
    if let Some(w) = &ctx.workdir {
        init.insert("defaultWorkdir".into(), w.clone().into());
    }
    let prepared = async {
        envd.init(&init.into(), Duration::from_secs(30)).await?;
        envd.snapshot_prepare(Duration::from_secs(30)).await
    }
    .await;
    if let Err(e) = prepared {
        let _ = vm.kill().await;
        return Err(BuildError::Boot {
            error: format!("quiesce the build VM: {e}"),
            console: String::new(),
        });
    }
    let top = live.top().to_owned();
    let parent_disk = req.parent.disk.clone();
    snapshot::snapshot_template(vm, &spec, &top, &parent_disk, staging).await?;
    // The template's disk: its build's layers (and the start command's writes) as one layer
    // on the parent's disk.
    let kept = staging.join(snapshot::DISK_FILE);
    let flat = staging.join("rootfs.flat.qcow2");
    layers::flatten(&kept, &parent_disk, &flat).await?;
    std::fs::rename(&flat, &kept).map_err(|source| BuildError::Io {
        what: "rename",
        path: flat.clone(),
        source,
    })?;
    log(
        report,
        None,
        "info",
        format!(
            "template snapshotted after {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(defaults)
}

fn root() -> RunAs {
    RunAs {
        user: "root".into(),
        cwd: Some("/".into()),
        envs: vec![],
    }
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    let _ = getrandom(&mut b);
    b
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Waits for envd in the build VM and gives it the build's access token.
async fn boot(vm: &Vm, slot: &Slot, token: &str) -> Result<Guest, BuildError> {
    let envd = EnvdClient::new(slot.guest_endpoint(ENVD_PORT));
    let up = async {
        envd.wait_healthy(BOOT_TIMEOUT).await?;
        envd.init(
            &serde_json::json!({ "accessToken": token }),
            Duration::from_secs(30),
        )
        .await
    }
    .await;
    if let Err(e) = up {
        return Err(BuildError::Boot {
            error: e.to_string(),
            console: vm.console_text().await,
        });
    }
    Ok(Guest::new(slot.guest_endpoint(ENVD_PORT), token.to_owned()))
}

fn run_as(ctx: &Context, user: Option<&String>) -> RunAs {
    RunAs {
        user: user.cloned().unwrap_or_else(|| ctx.user.clone()),
        cwd: ctx.workdir.clone(),
        envs: ctx.envs.clone(),
    }
}

async fn run_step(
    guest: &Guest,
    step: &Step,
    index: usize,
    ctx: &Context,
    req: &BuildRequest,
    report: Report<'_>,
) -> Result<(), BuildError> {
    let (cmd, how) = match step {
        Step::Run { cmd, user } => (cmd.clone(), run_as(ctx, user.as_ref())),
        Step::Copy {
            files_hash,
            src,
            dest,
            user,
            mode,
        } => {
            let archive = format!("{GUEST_FILES}/{files_hash}.tar.gz");
            guest
                .upload(&req.files[files_hash], &archive)
                .await
                .map_err(|source| BuildError::Guest { index, source })?;
            let owner = user.clone().unwrap_or_else(|| ctx.user.clone());
            (copy_script(&archive, src, dest, &owner, *mode, ctx), root())
        }
        Step::Workdir(dir) => {
            let d = shell_quote(dir);
            let u = shell_quote(&ctx.user);
            (format!("mkdir -p {d} && chown {u}: {d}"), root())
        }
        Step::Env(_) | Step::User(_) => return Ok(()),
    };
    let mut on_line = |s: Stream, line: &str| {
        let level = if s == Stream::Stderr { "warn" } else { "info" };
        log(report, Some(index), level, line.to_owned());
    };
    let code = guest
        .run(&cmd, &how, STEP_TIMEOUT, &mut on_line)
        .await
        .map_err(|source| BuildError::Guest { index, source })?;
    if code != 0 {
        return Err(BuildError::StepFailed {
            index,
            step: step.describe(),
            code,
        });
    }
    Ok(())
}

/// The guest-side `COPY`: the archive (paths relative to the context, as the SDK packed them)
/// is unpacked into a scratch directory by root in the guest, `src` in it is copied to `dest`
/// (into it when `dest` ends in `/` or is a directory), then given to `owner` (and `mode`).
fn copy_script(
    archive: &str,
    src: &str,
    dest: &str,
    owner: &str,
    mode: Option<u32>,
    ctx: &Context,
) -> String {
    let dest = if dest.starts_with('/') {
        dest.to_owned()
    } else {
        let base = ctx.workdir.clone().unwrap_or_else(|| "/".into());
        format!("{}/{dest}", base.trim_end_matches('/'))
    };
    let chmod = mode.map_or(String::new(), |m| format!(" && chmod -R {m:o} \"$t\""));
    format!(
        r#"set -e; x=$(mktemp -d); tar -xzf {archive} -C "$x"; rm -f {archive}
s={src}; d={dest}
cd "$x"
shopt -s nullglob dotglob
matches=( $s )
[ ${{#matches[@]}} -gt 0 ] || {{ echo "COPY: nothing matches $s" >&2; exit 1; }}
if [ ${{#matches[@]}} -gt 1 ] || [[ "$d" == */ ]] || [ -d "$d" ]; then
  mkdir -p "$d"
  for m in "${{matches[@]}}"; do
    if [ -d "$m" ] && [ ${{#matches[@]}} -eq 1 ] && [[ "$d" != */ ]]; then cp -a "$m"/. "$d"/; t="$d"; else cp -a "$m" "$d"/; t="$d/$(basename "$m")"; fi
    chown -R {owner}: "$t"{chmod}
  done
else
  mkdir -p "$(dirname "$d")"
  if [ -d "${{matches[0]}}" ]; then mkdir -p "$d"; cp -a "${{matches[0]}}"/. "$d"/; else cp -a "${{matches[0]}}" "$d"; fi
  t="$d"; chown -R {owner}: "$t"{chmod}
fi
cd /; rm -rf "$x""#,
        archive = shell_quote(archive),
        src = shell_quote(src),
        dest = shell_quote(&dest),
        owner = shell_quote(owner),
    )
}

/// Starts the start command (it keeps running: envd outlives the call) and runs the ready
/// command until it succeeds.
async fn start_and_wait(
    guest: &Guest,
    req: &BuildRequest,
    ctx: &Context,
    report: Report<'_>,
) -> Result<(), BuildError> {
    let Some(start) = &req.start_cmd else {
        return Ok(());
    };
    log(report, None, "info", format!("start command: {start}"));
    let how = run_as(ctx, None);
    let (tx, mut ended) = tokio::sync::oneshot::channel();
    let starter = {
        let (guest, start, how) = (guest.clone(), start.clone(), how.clone());
        let (ltx, mut lrx) = tokio::sync::mpsc::unbounded_channel::<(Stream, String)>();
        let task = tokio::spawn(async move {
            let mut on = |s: Stream, l: &str| {
                let _ = ltx.send((s, l.to_owned()));
            };
            let r = guest.run(&start, &how, STEP_TIMEOUT, &mut on).await;
            let _ = tx.send(r);
        });
        (task, std::iter::from_fn(move || lrx.try_recv().ok()))
    };
    let (task, mut lines) = starter;
    let ready = req.ready_cmd.clone().unwrap_or_else(|| "true".into());
    let deadline = Instant::now() + READY_TIMEOUT;
    let result = loop {
        for (s, l) in lines.by_ref() {
            let level = if s == Stream::Stderr { "warn" } else { "info" };
            log(report, None, level, l);
        }
        if let Ok(r) = ended.try_recv() {
            break Err(BuildError::NotReady(match r {
                Ok(code) => format!("`{start}` exited with code {code} before it was ready"),
                Err(e) => format!("`{start}` failed: {e}"),
            }));
        }
        match guest
            .run(&ready, &how, Duration::from_secs(60), &mut |_, _| {})
            .await
        {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => {
                break Err(BuildError::Guest {
                    index: 0,
                    source: e,
                });
            }
        }
        if Instant::now() > deadline {
            break Err(BuildError::NotReady(format!(
                "was not ready within {READY_TIMEOUT:?}: `{ready}` kept failing"
            )));
        }
        tokio::time::sleep(READY_INTERVAL).await;
    };
    // Dropping the call leaves the process running in the guest.
    task.abort();
    if result.is_ok() {
        log(report, None, "info", format!("ready: `{ready}` succeeded"));
    }
    result
}
