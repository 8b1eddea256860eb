//! The `code-interpreter-v1` template, the one `e2b_code_interpreter.Sandbox.create()` and
//! `@e2b/code-interpreter` ask for by default.
//!
//! Made in two cached stages, each keyed by its inputs, so a second start finds both at once:
//! the Debian image's code-interpreter variant (numpy, pandas, matplotlib from Debian, the
//! static `wrenn-interpreter` at `/usr/local/bin`) booted cold into a template of its own
//! (`code-interpreter-v1-boot-<key>`), then a template build on it (one step: a warm-up
//! import) whose start command is the interpreter's server, so every sandbox is a restore
//! with the server and its default context already running (no Python start-up per create,
//! which under TCG costs seconds).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use wrenn_agent::accel::Accel;
use wrenn_agent::build::{self, BuildDirs, BuildEvent, BuildRequest, Defaults, RawStep};
use wrenn_agent::snapshot::Snapshot;
use wrenn_hostnet::Slot;

use super::{GuestParts, HostArgs, boot_template, debian_image, default_guest_binary};

/// The template ID the code-interpreter SDKs default to.
pub const CODE_INTERPRETER_TEMPLATE: &str = "code-interpreter-v1";
/// The cold-boot template under it (never registered: only its disk and memory are built on).
const BOOT_NAME: &str = "code-interpreter-v1-boot";
/// The server, as the SDKs expect it: port 49999, cells in `/home/user`, the sandbox's env
/// vars from the guest's own envd.
const START_CMD: &str = "/usr/local/bin/wrenn-interpreter --listen 0.0.0.0:49999 \
     --python python3 --default-cwd /home/user --envd-url http://127.0.0.1:49983";
/// Run once before the server starts: matplotlib builds its font cache in `~/.cache` on its
/// first import (seconds under TCG, in every sandbox if not done here), and the libraries'
/// files stay in the guest's page cache, which the snapshot keeps.
const WARM_UP: &str = "python3 -c 'import matplotlib.pyplot, pandas'";
/// Answers once the server listens, which it does after its default context is up. `-f` so
/// an error status does not count as ready.
const READY_CMD: &str = "curl -sf localhost:49999/health";
/// What its sandboxes run as, as in E2B's template.
const USER: &str = "user";
/// See [`USER`].
const WORKDIR: &str = "/home/user";
/// Under TCG the guest CPU is QEMU's `qemu64`, an AMD family-15 model: OpenBLAS (numpy's
/// BLAS in Debian) then picks its Opteron kernels, which use an instruction TCG does not
/// emulate, and the first `numpy.dot` (every matplotlib draw) dies of SIGILL. Its SSE3
/// (Prescott) kernels run there; under KVM (`-cpu host`) it detects the real CPU.
const TCG_ENVS: [(&str, &str); 1] = [("OPENBLAS_CORETYPE", "Prescott")];

/// The built template and the directories it depends on (kept by `remove_unused_templates`).
pub(crate) struct CodeInterpreter {
    /// What sandboxes restore.
    pub snapshot: Snapshot,
    /// The cold-boot template its disk is layered on.
    pub parent: PathBuf,
}

/// Finds or builds the template (minutes under TCG on the first start).
pub(crate) async fn template(
    args: &HostArgs,
    parts: &GuestParts,
    templates: &Path,
    build_slot: u32,
) -> anyhow::Result<CodeInterpreter> {
    let interpreter = match &args.interpreter {
        Some(p) => p.clone(),
        None => default_guest_binary("wrenn-interpreter")?,
    };
    let extras = wrenn_image::DebianExtras::code_interpreter(interpreter);
    let rootfs = debian_image(args, parts, extras)
        .await
        .context("build the code-interpreter image")?;
    let inputs = super::template_inputs(args, parts, &rootfs);
    let parent = boot_template(templates, BOOT_NAME, &inputs, build_slot).await?;
    let envs = envs(parts.accel);
    let out = templates.join(format!(
        "{CODE_INTERPRETER_TEMPLATE}-{}",
        &key(&parent, &envs)[..16]
    ));
    if let Ok(snapshot) = Snapshot::open(&out) {
        return Ok(CodeInterpreter {
            snapshot,
            parent: parent.dir,
        });
    }
    if out.exists() {
        tracing::warn!(dir = %out.display(), "template does not open; rebuilding it");
        std::fs::remove_dir_all(&out).with_context(|| format!("remove {}", out.display()))?;
    }
    let started = Instant::now();
    let snapshot = build_on(&parent, envs, templates, &out, build_slot).await?;
    eprintln!(
        "Built template `{CODE_INTERPRETER_TEMPLATE}` in {:.1} s ({}).",
        started.elapsed().as_secs_f64(),
        parts.accel
    );
    Ok(CodeInterpreter {
        snapshot,
        parent: parent.dir,
    })
}

/// The environment every process of the template gets (its defaults' envs).
fn envs(accel: Accel) -> Vec<(String, String)> {
    match accel {
        Accel::Tcg => TCG_ENVS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        Accel::Kvm => Vec::new(),
    }
}

/// The snapshot's cache key: its parent (directory and memory state) and what the build runs.
fn key(parent: &Snapshot, envs: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in envs {
        h.update(format!("{k}={v}").as_bytes());
        h.update([0]);
    }
    for part in [
        parent.dir.to_string_lossy().as_ref(),
        &parent.manifest.state_sha256,
        WARM_UP,
        START_CMD,
        READY_CMD,
        USER,
        WORKDIR,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Starts the server in a build VM on `parent` and snapshots it into `out`.
async fn build_on(
    parent: &Snapshot,
    envs: Vec<(String, String)>,
    templates: &Path,
    out: &Path,
    build_slot: u32,
) -> anyhow::Result<Snapshot> {
    let spec = &parent.manifest.spec;
    let req = BuildRequest {
        parent: build::Parent::template(parent),
        parent_defaults: Defaults {
            user: Some(USER.into()),
            workdir: Some(WORKDIR.into()),
            envs,
            ..Defaults::default()
        },
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        steps: vec![RawStep {
            kind: "RUN".into(),
            args: vec![WARM_UP.into()],
            files_hash: None,
            force: false,
        }],
        start_cmd: Some(START_CMD.into()),
        ready_cmd: Some(READY_CMD.into()),
        skip_cache: false,
        files: Default::default(),
    };
    let dirs = BuildDirs {
        // The build service's layer cache (this build makes no layer of its own).
        layers: templates.join("layers"),
        work: templates.join(format!(
            ".build-{CODE_INTERPRETER_TEMPLATE}-{}",
            std::process::id()
        )),
        out: out.to_owned(),
    };
    let slot = Slot::create(build_slot)
        .await
        .context("create the template build slot")?;
    let report = |e: BuildEvent| {
        if let BuildEvent::Log { level, message, .. } = e {
            tracing::info!(template = CODE_INTERPRETER_TEMPLATE, level, "{message}");
        }
    };
    let built = build::build(&req, &dirs, &slot, &report).await;
    // Removing a slot's namespace blocks; not on an async worker.
    tokio::task::spawn_blocking(move || drop(slot))
        .await
        .context("slot thread")?;
    built.with_context(|| format!("build the template `{CODE_INTERPRETER_TEMPLATE}`"))
}
