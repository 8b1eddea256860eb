//! The host's template build service behind the `BuildTemplate` RPC: one build at a time in
//! the host's build slot, the context archives fetched from the control plane's signed URLs,
//! [`crate::build::build`] run, and the new template registered under its build ID.
//!
//! Built templates live in `<templates>/builds/<build ID>`, each with a [`BUILD_INFO`] file
//! naming the template directory its disk is layered on, so whoever removes unused templates
//! keeps those ([`parents_in_use`]). The layer cache is `<templates>/layers`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc::UnboundedSender;
use tracing::Instrument as _;
use wrenn_agent_proto::v1::{
    BuildDone, BuildFailed, BuildLog, BuildStepStarted, BuildTemplateEvent, BuildTemplateRequest,
    ImageSource, build_template_event::Event, image_source,
};
use wrenn_hostnet::Slot;

use crate::agent::Agent;
use crate::build::image::{self, ImageInfo, ImageLayer};
use crate::build::{
    self, BuildDirs, BuildError, BuildEvent, BuildRequest, Defaults, Parent, RawStep,
};
use crate::snapshot::Snapshot;

/// The file next to a built template that says what it was built from.
pub const BUILD_INFO: &str = "build.json";
/// Written into a built template's directory once the control plane released it; its mtime
/// is when.
const RELEASED: &str = "released";
/// The build service's scratch directory under the templates directory.
pub const WORK_DIR: &str = "bw";
/// Unpacked container images (`<key>/`), under the templates directory.
pub const IMAGES_DIR: &str = "images";
/// Image blobs as pulled (content-addressed), under the templates directory.
pub const BLOBS_DIR: &str = "blobs";
/// Bumped when what an unpacked image holds changes (its key includes it).
const IMAGE_FORMAT: &str = "1";
/// The layer cache is trimmed to this size, least recently used layers first.
const MAX_LAYER_CACHE_BYTES: u64 = 16 << 30;
/// Layers no build used for this long go whatever the cache's size.
const MAX_LAYER_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// Pulled image blobs are kept this long (a failed unpack's retry, images sharing layers).
const MAX_BLOB_AGE: Duration = Duration::from_secs(24 * 3600);
/// The largest context archive fetched for a build.
const MAX_ARCHIVE_BYTES: u64 = 8 << 30;
/// What a built template's steps run as when its parent says nothing (E2B's defaults).
pub(crate) const DEFAULT_USER: &str = "user";
const DEFAULT_WORKDIR: &str = "/home/user";

/// What a built template was built from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildInfo {
    /// Its ID (the control plane's build ID).
    pub build_id: String,
    /// The template it was built on.
    pub parent_template: String,
    /// That template's directory (its disk is the backing file of this one's).
    pub parent_dir: PathBuf,
    /// The envd version inside.
    pub envd_version: String,
}

/// The build service of one host.
#[derive(Debug)]
pub struct Builds {
    root: PathBuf,
    layers: PathBuf,
    work: PathBuf,
    images: PathBuf,
    blobs: PathBuf,
    /// Registries pulled from over plain HTTP, at any address.
    insecure: Vec<String>,
    slot: u32,
    /// How long a released template's files stay at least (see [`Builds::sweep`]).
    release_grace: Duration,
    one_at_a_time: tokio::sync::Mutex<()>,
    http: reqwest::Client,
}

/// Why a build could not start or finish; sent as its `failed` event.
#[derive(Debug, thiserror::Error)]
enum ServiceError {
    #[error("invalid build request: {0}")]
    Invalid(String),
    #[error("template {0:?} is not on this host")]
    NoParent(String),
    #[error("fetch the context archive {hash}: {reason}")]
    Fetch { hash: String, reason: String },
    #[error(transparent)]
    Image(#[from] wrenn_oci::OciError),
    #[error("create the build slot")]
    Slot(#[source] wrenn_hostnet::SlotError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ServiceError {
    /// The step it belongs to (from 1), 0 for none (before the steps), one past the last
    /// for the start and ready commands and the snapshot.
    fn step(&self, steps: usize) -> u32 {
        let index = match self {
            Self::Build(BuildError::NotReady(_) | BuildError::Snapshot(_)) => steps + 1,
            Self::Build(BuildError::StepFailed { index, .. })
            | Self::Build(BuildError::MissingFiles { index, .. })
            | Self::Build(BuildError::Guest { index, .. }) => *index,
            Self::Build(BuildError::Step(
                build::StepError::Unknown { index, .. } | build::StepError::Args { index, .. },
            )) => *index,
            _ => 0,
        };
        u32::try_from(index).unwrap_or(0)
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_hash(h: &str) -> bool {
    !h.is_empty() && h.len() <= 128 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The template directories built templates under `templates` are layered on.
pub fn parents_in_use(templates: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(templates.join("builds"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| read_info(&e.path()))
        .map(|i| i.parent_dir)
        .collect()
}

fn read_info(dir: &Path) -> Option<BuildInfo> {
    let bytes = std::fs::read(dir.join(BUILD_INFO)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Builds {
    /// The build service keeping its templates under `templates` and building in slot
    /// `slot` (which no sandbox uses); a released template's files stay at least
    /// `release_grace` (longer than a create takes: one may have looked it up just before).
    pub fn new(templates: &Path, slot: u32, release_grace: Duration) -> Self {
        Self {
            root: templates.join("builds"),
            layers: templates.join("layers"),
            work: templates.join(WORK_DIR),
            images: templates.join(IMAGES_DIR),
            blobs: templates.join(BLOBS_DIR),
            insecure: Vec::new(),
            slot,
            release_grace,
            one_at_a_time: tokio::sync::Mutex::new(()),
            http: reqwest::Client::new(),
        }
    }

    /// Registries (`host[:port]`) to pull from over plain HTTP, at any address.
    pub fn with_insecure_registries(mut self, registries: Vec<String>) -> Self {
        self.insecure = registries;
        self
    }

    /// The complete built templates on disk that were not released; what an interrupted
    /// build left is removed.
    pub fn existing(&self) -> Vec<(Snapshot, BuildInfo)> {
        let _ = std::fs::remove_dir_all(&self.work);
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = entry.path();
            let info = read_info(&dir);
            match (info, Snapshot::open(&dir)) {
                (Some(_), Ok(_)) if dir.join(RELEASED).exists() => {}
                (Some(info), Ok(snap)) => found.push((snap, info)),
                _ => {
                    tracing::info!(dir = %dir.display(), "removing an unfinished template build");
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        found
    }

    /// Releases built template `id`: no more creates from it, and its files go at a sweep once
    /// nothing uses them. `false`: not a template this host built.
    pub fn release(&self, agent: &Agent, id: &str) -> bool {
        let dir = self.root.join(id);
        if !valid_id(id) || !dir.join(BUILD_INFO).exists() {
            return false;
        }
        agent.runtime().unregister_template(id);
        if !dir.join(RELEASED).exists()
            && let Err(e) = std::fs::write(dir.join(RELEASED), b"")
        {
            tracing::warn!(template = %id, error = %e, "mark a template released");
        }
        tracing::info!(template = %id, "built template released");
        true
    }

    /// Removes the released templates nothing uses: no sandbox of the agent (running or
    /// paused) was made from one, no kept template was built on one, and it was released more
    /// than the grace ago. Their IDs.
    pub fn sweep(&self, agent: &Agent) -> Vec<String> {
        let mut in_use: HashSet<String> = agent
            .controller()
            .list()
            .into_iter()
            .map(|s| s.meta.template_id)
            .collect();
        // A snapshot's memory is layered on its template's.
        in_use.extend(crate::snapshots::template_ids_in_use(
            &agent.runtime().snapshots_root(),
        ));
        let mut builds = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = entry.path();
            let Some(info) = read_info(&dir) else {
                continue;
            };
            let released = std::fs::metadata(dir.join(RELEASED))
                .and_then(|m| m.modified())
                .ok();
            builds.push((dir, info, released));
        }
        let mut keep: HashSet<PathBuf> = builds
            .iter()
            .filter(|(_, info, released)| {
                released.is_none_or(|at| at.elapsed().unwrap_or_default() < self.release_grace)
                    || in_use.contains(&info.build_id)
            })
            .map(|(dir, _, _)| dir.clone())
            .collect();
        // A kept template's parents stay (its disk is layered on theirs), transitively.
        loop {
            let parents: Vec<PathBuf> = builds
                .iter()
                .filter(|(dir, _, _)| keep.contains(dir))
                .map(|(_, info, _)| info.parent_dir.clone())
                .filter(|p| !keep.contains(p))
                .collect();
            if parents.is_empty() {
                break;
            }
            keep.extend(parents);
        }
        let images_in_use: HashSet<PathBuf> = builds
            .iter()
            .filter(|(dir, _, _)| keep.contains(dir))
            .map(|(_, info, _)| info.parent_dir.clone())
            .collect();
        self.trim_layers();
        self.trim_images(&images_in_use);
        let mut removed = Vec::new();
        for (dir, info, _) in builds {
            if keep.contains(&dir) {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(template = %info.build_id, "removed a released template");
                    removed.push(info.build_id);
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "remove a released template")
                }
            }
        }
        removed
    }

    /// Trims the layer cache: layers unused for [`MAX_LAYER_AGE`], then the least recently
    /// used until it is under [`MAX_LAYER_CACHE_BYTES`]. Only between builds (a running build
    /// boots on and writes layers); templates never need them (their disks are flattened).
    fn trim_layers(&self) {
        let Ok(_idle) = self.one_at_a_time.try_lock() else {
            return;
        };
        let mut layers: Vec<(PathBuf, std::time::SystemTime, u64)> =
            std::fs::read_dir(&self.layers)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((e.path(), m.modified().ok()?, m.len()))
                })
                .collect();
        layers.sort_by_key(|(_, used, _)| *used);
        let mut total: u64 = layers.iter().map(|(_, _, len)| len).sum();
        for (path, used, len) in layers {
            let old = used.elapsed().unwrap_or_default() > MAX_LAYER_AGE;
            if !old && total <= MAX_LAYER_CACHE_BYTES {
                break;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    total = total.saturating_sub(len);
                    tracing::debug!(layer = %path.display(), "removed a cached build layer");
                }
                Err(e) => {
                    tracing::warn!(layer = %path.display(), error = %e, "remove a cached layer")
                }
            }
        }
    }

    /// Removes unpacked images no kept template is built on and no build used for
    /// [`MAX_LAYER_AGE`], and pulled blobs older than [`MAX_BLOB_AGE`] (only an unpack reads
    /// them). Only between builds, like the layers.
    fn trim_images(&self, in_use: &HashSet<PathBuf>) {
        let Ok(_idle) = self.one_at_a_time.try_lock() else {
            return;
        };
        let old = |p: &Path, age: Duration| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > age)
        };
        for entry in std::fs::read_dir(&self.images)
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = entry.path();
            if in_use.contains(&dir) || !old(&dir, MAX_LAYER_AGE) {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(dir = %dir.display(), "removed an unused unpacked image"),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "remove an unpacked image")
                }
            }
        }
        let blobs = self.blobs.join("sha256");
        for entry in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
            if old(&entry.path(), MAX_BLOB_AGE) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Runs the build `req` asks for, sending its events to `tx`; the last one is `done` or
    /// `failed`. Waits for any build already running on this host.
    pub async fn run(
        &self,
        agent: &Arc<Agent>,
        req: BuildTemplateRequest,
        tx: UnboundedSender<BuildTemplateEvent>,
    ) {
        let _one = self.one_at_a_time.lock().await;
        let send = |event: Event| {
            let _ = tx.send(BuildTemplateEvent { event: Some(event) });
        };
        let span = tracing::info_span!("template_build", build_id = %req.build_id);
        match self.build(agent, &req, &send).instrument(span).await {
            Ok(done) => {
                tracing::info!(build_id = %req.build_id, parent = %req.parent_template_id, "template built");
                send(Event::Done(done));
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                tracing::warn!(build_id = %req.build_id, error = %message, "template build failed");
                send(Event::Failed(BuildFailed {
                    step: e.step(req.steps.len()),
                    message,
                }));
            }
        }
    }

    async fn build(
        &self,
        agent: &Arc<Agent>,
        req: &BuildTemplateRequest,
        send: &(dyn Fn(Event) + Send + Sync),
    ) -> Result<BuildDone, ServiceError> {
        if !valid_id(&req.build_id) {
            return Err(ServiceError::Invalid(format!(
                "build ID {:?} (letters, digits, '-' and '_', at most 64)",
                req.build_id
            )));
        }
        let out = self.root.join(&req.build_id);
        if out.exists() || agent.runtime().template_snapshot(&req.build_id).is_some() {
            return Err(ServiceError::Invalid(format!(
                "template {:?} already exists",
                req.build_id
            )));
        }
        let (parent, envd_version) = agent
            .runtime()
            .template_snapshot(&req.parent_template_id)
            .ok_or_else(|| ServiceError::NoParent(req.parent_template_id.clone()))?;
        // One build at a time, so one scratch directory; a short path, because the build VM's
        // QMP socket lives under it and Unix socket paths are short (108 bytes).
        let work = self.work.clone();
        let _ = std::fs::remove_dir_all(&work);
        let files_dir = work.join("files");
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| ServiceError::Io { what, path, source }
        };
        std::fs::create_dir_all(&self.root).map_err(io("create", &self.root))?;
        std::fs::create_dir_all(&files_dir).map_err(io("create", &files_dir))?;
        let res = self
            .build_in(agent, req, (parent, &envd_version), send)
            .await;
        let _ = std::fs::remove_dir_all(&work);
        let (snapshot, parent_dir, parent_template) = res?;
        let info = BuildInfo {
            build_id: req.build_id.clone(),
            parent_template,
            parent_dir,
            envd_version: envd_version.clone(),
        };
        let path = out.join(BUILD_INFO);
        let text = serde_json::to_vec_pretty(&info).unwrap_or_default();
        if let Err(source) = std::fs::write(&path, text) {
            let _ = std::fs::remove_dir_all(&out);
            return Err(ServiceError::Io {
                what: "write",
                path,
                source,
            });
        }
        let disk_mb = crate::jail::disk::virtual_size(&snapshot.disk_path())
            .map_or(0, |b| b.div_ceil(1 << 20));
        let done = BuildDone {
            envd_version: envd_version.clone(),
            vcpus: snapshot.manifest.spec.vcpus,
            memory_mb: u64::from(snapshot.manifest.spec.memory_mib),
            disk_size_mb: disk_mb,
        };
        agent.register_template(req.build_id.clone(), snapshot, None, envd_version);
        Ok(done)
    }

    /// Builds in the build slot; returns the template, the directory its disk is layered on
    /// and what that is (a template's ID, or `image:<reference>`).
    async fn build_in(
        &self,
        agent: &Agent,
        req: &BuildTemplateRequest,
        (base, envd_version): (Snapshot, &str),
        send: &(dyn Fn(Event) + Send + Sync),
    ) -> Result<(Snapshot, PathBuf, String), ServiceError> {
        let (work, out) = (&self.work, &self.root.join(&req.build_id));
        let files = self.fetch_files(req).await?;
        let info = |message: String| {
            send(Event::Log(BuildLog {
                timestamp_unix_ms: crate::controller::now_ms(),
                level: "info".into(),
                message,
                step: 0,
            }))
        };
        let report = |e: BuildEvent| send(event_of(e));
        // Before the slot: a source that cannot be fetched fails the build at once.
        let image = match &req.image {
            Some(source) => Some(self.fetch_image(source, &report).await?),
            None => None,
        };
        let slot = Slot::create(self.slot).await.map_err(ServiceError::Slot)?;
        // Steps reach the internet as a sandbox does by default (package installs); the
        // always-denied ranges stay denied.
        let services = match agent.runtime().slots().open_egress(&slot).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || drop(slot)).await;
                return Err(ServiceError::Slot(e));
            }
        };
        let res = async {
            let (parent, parent_defaults, parent_name) = match image {
                Some((fetched, reference)) => {
                    let (dir, image) = self
                        .unpacked(fetched, reference, &base, &slot, &report)
                        .await?;
                    let key = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                    let parent = image::parent(&dir, &base, &key.unwrap_or_default());
                    (parent, image.defaults, format!("image:{}", image.reference))
                }
                None => {
                    let defaults = Defaults::read(
                        &base.dir,
                        Defaults {
                            user: Some(DEFAULT_USER.into()),
                            workdir: Some(DEFAULT_WORKDIR.into()),
                            ..Defaults::default()
                        },
                    );
                    (
                        Parent::template(&base),
                        defaults,
                        req.parent_template_id.clone(),
                    )
                }
            };
            let build_req = build_request(req, parent, parent_defaults, files);
            // `image:<reference>` is what build.json records; the log says it in words.
            let shown = match parent_name.strip_prefix("image:") {
                Some(reference) => format!("image {reference}"),
                None => format!("template {parent_name}"),
            };
            info(format!(
                "building on {shown} (envd {envd_version}): {} vCPU, {} MiB",
                build_req.vcpus, build_req.memory_mib
            ));
            let dirs = BuildDirs {
                layers: self.layers.clone(),
                work: work.join("b"),
                out: out.clone(),
            };
            let snapshot = build::build(&build_req, &dirs, &slot, &report).await?;
            Ok((snapshot, build_req.parent.dir.clone(), parent_name))
        }
        .await;
        drop(services);
        // Removing a slot's namespace blocks; not on an async worker.
        let _ = tokio::task::spawn_blocking(move || drop(slot)).await;
        res
    }

    /// The context archives the steps name, fetched into the scratch directory.
    async fn fetch_files(
        &self,
        req: &BuildTemplateRequest,
    ) -> Result<HashMap<String, PathBuf>, ServiceError> {
        let mut files = HashMap::new();
        for f in &req.files {
            if !valid_hash(&f.hash) {
                return Err(ServiceError::Invalid(format!("files hash {:?}", f.hash)));
            }
            let path = self.work.join("files").join(format!("{}.tar.gz", f.hash));
            self.fetch(&f.url, &path)
                .await
                .map_err(|reason| ServiceError::Fetch {
                    hash: f.hash.clone(),
                    reason,
                })?;
            files.insert(f.hash.clone(), path);
        }
        Ok(files)
    }

    /// The image `source` names, its blobs pulled or read from its archive into the store,
    /// and how to name it.
    async fn fetch_image(
        &self,
        source: &ImageSource,
        report: build::Report<'_>,
    ) -> Result<(wrenn_oci::Image, String), ServiceError> {
        let say = |message: String| {
            report(BuildEvent::Log {
                level: "info",
                message,
                step: None,
            })
        };
        let store = wrenn_oci::BlobStore::new(self.blobs.clone());
        let (image, reference) = match &source.source {
            Some(image_source::Source::Registry(r)) => {
                say(format!("pulling {}", r.reference));
                let creds = (!r.username.is_empty()).then(|| wrenn_oci::Credentials {
                    username: r.username.clone(),
                    password: r.password.clone(),
                });
                let policy = wrenn_oci::PullPolicy {
                    insecure: self.insecure.clone(),
                    allow_address: Arc::new(wrenn_hostnet::is_public),
                };
                let progress = |line: String| say(line);
                let image =
                    wrenn_oci::pull(&r.reference, creds.as_ref(), &policy, &store, &progress)
                        .await?;
                (image, r.reference.clone())
            }
            Some(image_source::Source::Archive(f)) => {
                if !valid_hash(&f.hash) {
                    return Err(ServiceError::Invalid(format!("image hash {:?}", f.hash)));
                }
                let path = self
                    .work
                    .join("files")
                    .join(format!("{}.image.tar", f.hash));
                self.fetch(&f.url, &path)
                    .await
                    .map_err(|reason| ServiceError::Fetch {
                        hash: f.hash.clone(),
                        reason,
                    })?;
                let s = store.clone();
                let image = tokio::task::spawn_blocking(move || wrenn_oci::read_archive(&path, &s))
                    .await
                    .map_err(|e| ServiceError::Invalid(format!("read the image archive: {e}")))??;
                (image, format!("archive:{}", f.hash))
            }
            None => {
                return Err(ServiceError::Invalid(
                    "an image source without a source".into(),
                ));
            }
        };
        Ok((image, reference))
    }

    /// The unpacked `image` (unpacked now in a VM booted from `base`, unless an earlier build
    /// unpacked the same image on the same base): its directory and what it says of itself.
    async fn unpacked(
        &self,
        image: wrenn_oci::Image,
        reference: String,
        base: &Snapshot,
        slot: &Slot,
        report: build::Report<'_>,
    ) -> Result<(PathBuf, ImageInfo), ServiceError> {
        let say = |message: String| {
            report(BuildEvent::Log {
                level: "info",
                message,
                step: None,
            })
        };
        let key = image_key(&image.digest, base);
        let dir = self.images.join(&key);
        if let Some(info) = image::open(&dir) {
            say(format!(
                "reusing the unpacked image {reference} ({})",
                image.digest
            ));
            // Its mtime says when a build last used it (see `trim_layers`).
            let _ = std::fs::File::open(&dir)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok((dir, info));
        }
        let info = ImageInfo {
            reference,
            digest: image.digest.clone(),
            defaults: image_defaults(&image.config),
        };
        let layers: Vec<ImageLayer> = image
            .layers
            .iter()
            .map(|l| ImageLayer {
                path: l.path.clone(),
                compression: match l.compression {
                    wrenn_oci::Compression::Gzip => "gzip",
                    wrenn_oci::Compression::Zstd => "zstd",
                    wrenn_oci::Compression::None => "none",
                },
            })
            .collect();
        std::fs::create_dir_all(&self.images).map_err(|source| ServiceError::Io {
            what: "create",
            path: self.images.clone(),
            source,
        })?;
        image::unpack(
            base,
            &layers,
            &info,
            &self.work.join("unpack"),
            &dir,
            slot,
            report,
        )
        .await?;
        Ok((dir, info))
    }

    /// Fetches `url` into `path`, at most [`MAX_ARCHIVE_BYTES`].
    async fn fetch(&self, url: &str, path: &Path) -> Result<(), String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| crate::error_chain(&e))?;
        if !resp.status().is_success() {
            return Err(format!("the control plane answered {}", resp.status()));
        }
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| e.to_string())?;
        let mut body = resp.bytes_stream();
        let mut total = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| crate::error_chain(&e))?;
            total += chunk.len() as u64;
            if total > MAX_ARCHIVE_BYTES {
                return Err(format!("larger than {MAX_ARCHIVE_BYTES} bytes"));
            }
            file.write_all(&chunk).await.map_err(|e| e.to_string())?;
        }
        file.flush().await.map_err(|e| e.to_string())
    }
}

/// Sweeps `agent`'s released templates every `every` until the agent is gone.
pub fn spawn_sweeper(agent: Weak<Agent>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(agent) = agent.upgrade() else { break };
            // Directory walks and removals: off the async workers.
            let _ = tokio::task::spawn_blocking(move || {
                agent.sweep_snapshots();
                if let Some(builds) = agent.builds().cloned() {
                    builds.sweep(&agent);
                }
            })
            .await;
        }
    });
}

/// The build the request asks for, on `parent`.
fn build_request(
    req: &BuildTemplateRequest,
    parent: Parent,
    parent_defaults: Defaults,
    files: HashMap<String, PathBuf>,
) -> BuildRequest {
    let spec = &parent.spec;
    BuildRequest {
        vcpus: if req.vcpus == 0 {
            spec.vcpus
        } else {
            req.vcpus
        },
        memory_mib: match u32::try_from(req.memory_mb) {
            Ok(0) | Err(_) => spec.memory_mib,
            Ok(m) => m,
        },
        parent,
        parent_defaults,
        steps: req
            .steps
            .iter()
            .map(|s| RawStep {
                kind: s.kind.clone(),
                args: s.args.clone(),
                files_hash: Some(s.files_hash.clone()).filter(|h| !h.is_empty()),
                force: s.force,
            })
            .collect(),
        start_cmd: Some(req.start_cmd.clone()).filter(|c| !c.is_empty()),
        ready_cmd: Some(req.ready_cmd.clone()).filter(|c| !c.is_empty()),
        skip_cache: req.skip_cache,
        files,
    }
}

/// An unpacked image's key: the image (its manifest's digest), the base template its VM and
/// its envd came from, and what unpacking makes of it.
fn image_key(digest: &str, base: &Snapshot) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [
        digest,
        &base.dir.to_string_lossy(),
        &base.manifest.state_sha256,
        IMAGE_FORMAT,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

/// What a template built on an image starts with: E2B's `user` (sandboxes run as it, as
/// from E2B's own base; a `USER` step changes it), the image's working directory (else the
/// user's home), and its environment.
fn image_defaults(config: &wrenn_oci::ImageConfig) -> Defaults {
    Defaults {
        user: Some(DEFAULT_USER.into()),
        workdir: Some(
            config
                .working_dir
                .clone()
                .filter(|w| w.starts_with('/'))
                .unwrap_or_else(|| DEFAULT_WORKDIR.into()),
        ),
        envs: config.env.clone(),
        start_cmd: None,
        ready_cmd: None,
    }
}

fn event_of(e: BuildEvent) -> Event {
    match e {
        BuildEvent::Log {
            level,
            message,
            step,
        } => Event::Log(BuildLog {
            timestamp_unix_ms: crate::controller::now_ms(),
            level: level.into(),
            message,
            step: step.and_then(|s| u32::try_from(s).ok()).unwrap_or(0),
        }),
        BuildEvent::Step {
            index,
            total,
            cached,
        } => Event::Step(BuildStepStarted {
            index: u32::try_from(index).unwrap_or(0),
            total: u32::try_from(total).unwrap_or(0),
            cached,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_hashes_cannot_name_other_paths() {
        assert!(valid_id("3f2c1a9e-0b7d-4c55-9d1e-1a2b3c4d5e6f"));
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(valid_hash(&"ab".repeat(32)));
        for bad in ["", "../../etc", "abc/def", "zz"] {
            assert!(!valid_hash(bad), "{bad:?}");
        }
    }

    #[test]
    fn layers_unused_for_two_weeks_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let builds = Builds::new(dir.path(), 0, Duration::ZERO);
        std::fs::create_dir_all(&builds.layers).unwrap();
        let (old, recent) = (
            builds.layers.join("old.qcow2"),
            builds.layers.join("new.qcow2"),
        );
        for p in [&old, &recent] {
            std::fs::write(p, b"layer").unwrap();
        }
        let long_ago = std::time::SystemTime::now() - MAX_LAYER_AGE - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        builds.trim_layers();
        assert!(!old.exists() && recent.exists());
    }

    #[test]
    fn parents_in_use_reads_build_info() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("builds").join("b1");
        std::fs::create_dir_all(&b).unwrap();
        let info = BuildInfo {
            build_id: "b1".into(),
            parent_template: "base".into(),
            parent_dir: dir.path().join("abc"),
            envd_version: "0.2.0".into(),
        };
        std::fs::write(b.join(BUILD_INFO), serde_json::to_vec(&info).unwrap()).unwrap();
        std::fs::create_dir_all(dir.path().join("builds").join("junk")).unwrap();
        assert_eq!(parents_in_use(dir.path()), vec![dir.path().join("abc")]);
    }
}
