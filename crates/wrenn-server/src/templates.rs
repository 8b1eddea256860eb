//! Template builds as the SDKs' `Template` builder drives them, and templates' tags and
//! deletion (the list, one template's details and its sharing are `template_info`).
//!
//! A build is requested (`POST /v3/templates`: the team's template of that name, made if new,
//! and a `waiting` build), its `COPY` contexts uploaded to links signed by this control plane
//! (kept in [`Config::build_files`](crate::config::Config)), then started with its steps: the
//! host of its parent template takes it (`BuildTemplate`, streamed), and a task of this control
//! plane follows it, writing its log lines and heartbeat, until it is `ready` (the template's
//! new current version, with its tags) or `error`. The agent fetches the contexts through links
//! signed for reading. A build whose heartbeat stops (its control plane died) is failed by
//! [`ControlPlane::fail_stale_builds`].
//!
//! Versions: sandboxes start from the template's current build on the host that holds it; a
//! newer build, or deleting the template, leaves the sandboxes of older builds running and
//! resumable (their host keeps those templates).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use wrenn_agent_proto::v1::{self as agent, build_template_event::Event};
use wrenn_api::{
    AssignTemplateTags, AssignedTemplateTags, BuildLogEntry, BuildStatusReason, DeleteTemplateTags,
    TemplateBuildInfo, TemplateBuildLogs, TemplateBuildRequest, TemplateBuildRequested,
    TemplateBuildStart, TemplateBuildStatus, TemplateFileUpload, TemplateTag,
};
use wrenn_connect::BoxStream;
use wrenn_core::{HostId, TeamId, TemplateId, UnixMillis};

use crate::agents::AgentClient;
use crate::error::{ApiError, Chain};
use crate::service::{ControlPlane, now, to_datetime};
use crate::store::{BuildLogRecord, BuildRecord, HostRecord, TeamRecord, TemplateRecord};
use crate::tokens;

/// How long an upload or download link works.
const FILE_LINK_TTL_SECS: i64 = 3600;
/// How often a running build's heartbeat is written.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// The most log lines one status answer carries (as upstream).
const MAX_LOG_PAGE: u64 = 100;
/// The tag a build gets when the request names none.
const DEFAULT_TAG: &str = "default";
/// What the SDKs' `from_base_image()` asks for; Wrenn's `base` template is that image.
const BASE_IMAGES: [&str; 2] = ["e2bdev/base", "e2bdev/base:latest"];
/// The built-in template those images map to.
const BASE_TEMPLATE: &str = "base";

/// A `name:tag` reference split; the tag is `None` when not given.
fn split_tag(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once(':') {
        Some((n, t)) if !t.is_empty() && !t.contains('/') => (n, Some(t)),
        _ => (name, None),
    }
}

fn valid_tag(tag: &str) -> Result<(), ApiError> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then_some(())
        .ok_or_else(|| ApiError::BadRequest(format!("Invalid tag {tag:?}")))
}

fn valid_hash(hash: &str) -> Result<(), ApiError> {
    let ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some(())
        .ok_or_else(|| ApiError::BadRequest(format!("Invalid files hash {hash:?}")))
}

fn random_template_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..20)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A random UUID (version 4) as the SDKs parse build IDs.
fn random_build_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Which part of a build's log `build_logs` answers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LogPage<'a> {
    /// From (forward) or up to (backward) this time, Unix ms.
    pub(crate) cursor: Option<i64>,
    pub(crate) limit: Option<u64>,
    /// `forward` (default) or `backward`.
    pub(crate) direction: Option<&'a str>,
    /// The lowest level shown.
    pub(crate) level: Option<&'a str>,
}

/// Whether a host's template name is one of our build IDs (a UUID), not a host-provided
/// template or a snapshot.
fn is_build_id(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The step name the SDKs map to a stack trace: the step's number, `base` before the steps
/// and `finalize` after them.
fn step_name(step: u32, steps: usize) -> Option<String> {
    match step {
        0 => None,
        s if s as usize > steps => Some("finalize".to_owned()),
        s => Some(s.to_string()),
    }
}

fn reason_json(message: &str, step: Option<String>) -> String {
    serde_json::to_string(&BuildStatusReason {
        message: message.to_owned(),
        step,
        log_entries: Vec::new(),
    })
    .unwrap_or_default()
}

pub(crate) fn status_of(b: &BuildRecord) -> TemplateBuildStatus {
    TemplateBuildStatus::parse(&b.status).unwrap_or(TemplateBuildStatus::Error)
}

fn log_entry(l: &BuildLogRecord) -> BuildLogEntry {
    BuildLogEntry {
        timestamp: to_datetime(l.at),
        message: l.message.clone(),
        level: l.level.clone(),
        step: l.step.clone(),
    }
}

impl ControlPlane {
    /// The template a sandbox create (or a build's `fromTemplate`) names for `team`: by ID or
    /// name, and with `name:tag` the version that tag points at.
    pub(crate) async fn resolve_template(
        &self,
        team: &TeamId,
        name: &str,
    ) -> Result<Option<TemplateRecord>, ApiError> {
        if let Some(t) = self.store.get_template(name, team).await? {
            return Ok(Some(t));
        }
        let (base, Some(tag)) = split_tag(name) else {
            return Ok(None);
        };
        let Some(mut t) = self.store.get_template(base, team).await? else {
            return Ok(None);
        };
        let Some(tagged) = self
            .store
            .tags(&t.id)
            .await?
            .into_iter()
            .find(|r| r.tag == tag)
        else {
            return Ok(None);
        };
        if t.build.as_ref().is_some_and(|b| b.id == tagged.build_id) {
            return Ok(Some(t));
        }
        let Some(b) = self.store.get_build(&tagged.build_id).await? else {
            return Ok(None);
        };
        let Some(host_id) = b.host_id.clone() else {
            return Ok(None);
        };
        t.build = Some(crate::store::CurrentBuild { id: b.id, host_id });
        t.vcpus = b.vcpus;
        t.memory_mb = b.memory_mb;
        t.disk_size_mb = b.disk_size_mb;
        t.envd_version = b.envd_version;
        Ok(Some(t))
    }

    /// `POST /v3/templates`: a new `waiting` build of the team's template `name` (made if the
    /// team has none of that name).
    pub async fn request_build(
        &self,
        team: &TeamRecord,
        body: TemplateBuildRequest,
    ) -> Result<TemplateBuildRequested, ApiError> {
        let full = body
            .name
            .or(body.alias)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::BadRequest("name is required".to_owned()))?;
        let (name, tag) = split_tag(&full);
        TemplateId::parse(name).map_err(|e| ApiError::BadRequest(format!("name: {e}")))?;
        let mut tags = body.tags.unwrap_or_default();
        tags.extend(tag.map(str::to_owned));
        if tags.is_empty() {
            tags.push(DEFAULT_TAG.to_owned());
        }
        tags.dedup();
        for t in &tags {
            valid_tag(t)?;
        }
        // Not given: the parent template's (0 tells the host so).
        let vcpus = body.cpu_count.unwrap_or(0);
        let memory_mb = body.memory_mb.unwrap_or(0);
        if body.cpu_count.is_some_and(|c| !(1..=64).contains(&c))
            || body
                .memory_mb
                .is_some_and(|m| !(128..=262_144).contains(&m))
        {
            return Err(ApiError::BadRequest(
                "cpuCount must be 1-64 and memoryMB 128-262144".to_owned(),
            ));
        }
        let tpl = self.named_template(team, name).await?;
        let now = now();
        let build = BuildRecord {
            id: random_build_id(),
            template_id: tpl.id.clone(),
            team_id: team.id.clone(),
            status: TemplateBuildStatus::Waiting.as_str().to_owned(),
            host_id: None,
            vcpus,
            memory_mb,
            disk_size_mb: 0,
            envd_version: String::new(),
            tags: tags.clone(),
            reason: None,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_build(&build).await?;
        tracing::info!(template_id = %tpl.id, build_id = %build.id, name, "template build requested");
        Ok(TemplateBuildRequested {
            template_id: tpl.id,
            build_id: build.id,
            public: false,
            names: vec![name.to_owned()],
            aliases: vec![name.to_owned()],
            tags,
        })
    }

    /// The team's template called `name`, made if there is none; another team's or a public
    /// one of that name is a conflict.
    async fn named_template(
        &self,
        team: &TeamRecord,
        name: &str,
    ) -> Result<TemplateRecord, ApiError> {
        for _ in 0..2 {
            if let Some(t) = self.store.find_template(name).await? {
                if t.team_id.as_ref() == Some(&team.id) && t.name.is_some() {
                    return Ok(t);
                }
                return Err(ApiError::Conflict(format!(
                    "The template name '{name}' is already taken"
                )));
            }
            let id = random_template_id();
            if self
                .store
                .insert_named_template(&id, &team.id, name, now())
                .await?
            {
                return self
                    .store
                    .find_template(&id)
                    .await?
                    .ok_or_else(|| ApiError::Internal("template vanished".to_owned()));
            }
        }
        Err(ApiError::Conflict(format!(
            "The template name '{name}' is already taken"
        )))
    }

    /// A template of the team's own, by ID or name.
    async fn own_template(&self, team: &TeamRecord, id: &str) -> Result<TemplateRecord, ApiError> {
        match self.store.find_template(id).await? {
            Some(t) if t.team_id.as_ref() == Some(&team.id) => Ok(t),
            Some(_) => Err(ApiError::Forbidden(format!(
                "You don't have access to template '{id}'"
            ))),
            None => Err(ApiError::NotFound(format!("Template '{id}' not found"))),
        }
    }

    async fn own_build(
        &self,
        team: &TeamRecord,
        template_id: &str,
        build_id: &str,
    ) -> Result<BuildRecord, ApiError> {
        let tpl = self.own_template(team, template_id).await?;
        match self.store.get_build(build_id).await? {
            Some(b) if b.template_id == tpl.id => Ok(b),
            _ => Err(ApiError::NotFound(format!(
                "Build '{build_id}' of template '{template_id}' not found"
            ))),
        }
    }

    fn files_dir(&self) -> Result<&std::path::Path, ApiError> {
        self.config
            .build_files
            .as_deref()
            .ok_or_else(|| ApiError::BadRequest("This server takes no build files".to_owned()))
    }

    /// Where the team's context archive `hash` is kept.
    pub(crate) fn file_path(&self, team: &str, hash: &str) -> Result<PathBuf, ApiError> {
        valid_hash(hash)?;
        TeamId::parse(team).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        Ok(self
            .files_dir()?
            .join(team)
            .join(format!("{}.tar.gz", hash.to_ascii_lowercase())))
    }

    fn file_link(&self, base: &str, method: &str, team: &TeamId, hash: &str) -> String {
        let expires = now().0 / 1000 + FILE_LINK_TTL_SECS;
        let sig =
            tokens::build_file_signature(&self.config.secret, method, team.as_str(), hash, expires);
        format!(
            "{}/build-files/{}/{hash}?expires={expires}&signature={sig}",
            base.trim_end_matches('/'),
            team.as_str()
        )
    }

    /// Checks a signed build-file link; the archive's path.
    pub(crate) fn check_file_link(
        &self,
        method: &str,
        team: &str,
        hash: &str,
        expires: i64,
        signature: &str,
    ) -> Result<PathBuf, ApiError> {
        let path = self.file_path(team, hash)?;
        let want = tokens::build_file_signature(&self.config.secret, method, team, hash, expires);
        if !tokens::constant_time_eq(want.as_bytes(), signature.as_bytes()) {
            return Err(ApiError::Unauthorized("Invalid signature".to_owned()));
        }
        if expires < now().0 / 1000 {
            return Err(ApiError::Unauthorized("The link has expired".to_owned()));
        }
        Ok(path)
    }

    /// `GET /templates/{id}/files/{hash}`: whether the archive is stored, else where to put it.
    pub async fn file_upload_link(
        &self,
        team: &TeamRecord,
        template_id: &str,
        hash: &str,
        base: &str,
    ) -> Result<TemplateFileUpload, ApiError> {
        self.own_template(team, template_id).await?;
        let path = self.file_path(team.id.as_str(), hash)?;
        if path.exists() {
            return Ok(TemplateFileUpload {
                present: true,
                url: None,
            });
        }
        Ok(TemplateFileUpload {
            present: false,
            url: Some(self.file_link(base, "PUT", &team.id, hash)),
        })
    }

    /// The template a build starts from, the host to build on, and the container image it
    /// unpacks first, if any (then the template is the base its unpack VM boots).
    async fn build_parent(
        &self,
        team: &TeamRecord,
        body: &TemplateBuildStart,
        base: &str,
    ) -> Result<(String, Option<HostId>, Option<agent::ImageSource>), ApiError> {
        let image = self.image_source(team, body, base)?;
        let name = match (&body.from_template, &body.from_image) {
            (Some(t), _) if image.is_none() => t.clone(),
            _ => BASE_TEMPLATE.to_owned(),
        };
        let tpl = self
            .resolve_template(&team.id, &name)
            .await?
            .ok_or_else(|| ApiError::BadRequest(format!("Template '{name}' not found")))?;
        Ok(match tpl.build {
            Some(b) => (b.id, Some(b.host_id), image),
            None if tpl.name.is_some() => {
                return Err(ApiError::BadRequest(format!(
                    "Template '{name}' has no finished build yet"
                )));
            }
            None => (tpl.id, None, image),
        })
    }

    /// The container image a build starts from: `fromImage` (but not the SDK's base image,
    /// which is our `base`) with `fromImageRegistry` credentials, or an uploaded archive.
    fn image_source(
        &self,
        team: &TeamRecord,
        body: &TemplateBuildStart,
        base: &str,
    ) -> Result<Option<agent::ImageSource>, ApiError> {
        use agent::image_source::Source;
        if let Some(hash) = &body.from_image_archive {
            if body.from_template.is_some() || body.from_image.is_some() {
                return Err(ApiError::BadRequest(
                    "fromImageArchive cannot be combined with fromImage or fromTemplate".into(),
                ));
            }
            let path = self.file_path(team.id.as_str(), hash)?;
            if !path.exists() {
                return Err(ApiError::BadRequest(format!(
                    "The image archive was not uploaded (hash {hash})"
                )));
            }
            return Ok(Some(agent::ImageSource {
                source: Some(Source::Archive(agent::BuildFile {
                    hash: hash.clone(),
                    url: self.file_link(base, "GET", &team.id, hash),
                })),
            }));
        }
        let Some(image) = body.from_image.as_deref() else {
            return Ok(None);
        };
        if body.from_template.is_some() || BASE_IMAGES.contains(&image) {
            return Ok(None);
        }
        if image.is_empty() || image.len() > 512 || image.chars().any(char::is_whitespace) {
            return Err(ApiError::BadRequest(format!(
                "'{image}' is not an image reference (registry/repository:tag)"
            )));
        }
        let (username, password) = match &body.from_image_registry {
            None => (String::new(), String::new()),
            Some(r) => registry_credentials(r)?,
        };
        Ok(Some(agent::ImageSource {
            source: Some(Source::Registry(agent::RegistryImage {
                reference: image.to_owned(),
                username,
                password,
            })),
        }))
    }

    /// `POST /v2/templates/{id}/builds/{buildID}`: starts a waiting build with its steps.
    pub async fn start_build(
        self: &Arc<Self>,
        team: &TeamRecord,
        template_id: &str,
        build_id: &str,
        body: TemplateBuildStart,
        base: &str,
    ) -> Result<(), ApiError> {
        let build = self.own_build(team, template_id, build_id).await?;
        if status_of(&build) != TemplateBuildStatus::Waiting {
            return Err(ApiError::Conflict(format!(
                "Build '{build_id}' was already started"
            )));
        }
        let steps = body.steps.clone().unwrap_or_default();
        let mut files = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let Some(hash) = s.files_hash.as_deref() else {
                continue;
            };
            let path = self.file_path(team.id.as_str(), hash)?;
            if !path.exists() {
                return Err(ApiError::BadRequest(format!(
                    "The files of step {} were not uploaded (hash {hash})",
                    i + 1
                )));
            }
            if !files.iter().any(|f: &agent::BuildFile| f.hash == hash) {
                files.push(agent::BuildFile {
                    hash: hash.to_owned(),
                    url: self.file_link(base, "GET", &team.id, hash),
                });
            }
        }
        let (parent, host, image) = self.build_parent(team, &body, base).await?;
        let host = self
            .place(
                0,
                0,
                host.as_ref(),
                host.is_none().then_some(parent.as_str()),
            )
            .await
            .map_err(|_| ApiError::NoCapacity("No host can build templates now".to_owned()))?;
        let client = self.client_for(&host)?;
        if !self.store.start_build(&build.id, &host.id, now()).await? {
            return Err(ApiError::Conflict(format!(
                "Build '{build_id}' was already started"
            )));
        }
        let req = agent::BuildTemplateRequest {
            build_id: build.id.clone(),
            parent_template_id: parent,
            vcpus: build.vcpus,
            memory_mb: build.memory_mb,
            steps: steps
                .into_iter()
                .map(|s| agent::BuildStep {
                    kind: s.kind,
                    args: s.args.unwrap_or_default(),
                    files_hash: s.files_hash.unwrap_or_default(),
                    force: s.force.unwrap_or(false),
                })
                .collect(),
            start_cmd: body.start_cmd.unwrap_or_default(),
            ready_cmd: body.ready_cmd.unwrap_or_default(),
            skip_cache: body.force.unwrap_or(false),
            files,
            image,
        };
        let build = BuildRecord {
            host_id: Some(host.id.clone()),
            ..build
        };
        tracing::info!(build_id = %build.id, host_id = %host.id, parent = %req.parent_template_id, "template build started");
        // Detached: the build goes on whatever becomes of this request.
        tokio::spawn(self.clone().run_build(build, client, req));
        Ok(())
    }

    async fn run_build(
        self: Arc<Self>,
        mut build: BuildRecord,
        client: Arc<dyn AgentClient>,
        req: agent::BuildTemplateRequest,
    ) {
        let steps = req.steps.len();
        let mut seq = 0;
        let outcome = match client.build_template(req).await {
            Ok(stream) => self.follow_build(&build, stream, steps, &mut seq).await,
            Err(e) => Err((
                format!("the host agent refused the build: {}", e.message),
                None,
            )),
        };
        let now = now();
        match outcome {
            Ok(done) => {
                build.vcpus = done.vcpus;
                build.memory_mb = done.memory_mb;
                build.disk_size_mb = done.disk_size_mb;
                build.envd_version = done.envd_version;
                match self.store.finish_build(&build, now).await {
                    Ok(true) => {
                        tracing::info!(build_id = %build.id, template_id = %build.template_id, "template build ready");
                    }
                    Ok(false) => {
                        tracing::warn!(build_id = %build.id, "template build finished after it was failed");
                    }
                    Err(e) => {
                        tracing::error!(build_id = %build.id, error = %Chain(&e), "record a finished build");
                    }
                }
            }
            Err((message, step)) => {
                let line = BuildLogRecord {
                    seq,
                    at: now,
                    level: "error".to_owned(),
                    message: format!("Build failed: {message}"),
                    step: step.clone(),
                };
                let _ = self.store.append_build_logs(&build.id, &[line]).await;
                tracing::warn!(build_id = %build.id, error = %message, "template build failed");
                if let Err(e) = self
                    .store
                    .fail_build(&build.id, &reason_json(&message, step), now)
                    .await
                {
                    tracing::error!(build_id = %build.id, error = %Chain(&e), "record a failed build");
                }
            }
        }
    }

    /// Writes a build's events to its log until it ends; its result.
    async fn follow_build(
        &self,
        build: &BuildRecord,
        stream: BoxStream<agent::BuildTemplateEvent>,
        steps: usize,
        seq: &mut i64,
    ) -> Result<agent::BuildDone, (String, Option<String>)> {
        let mut chunks = stream.ready_chunks(256);
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            let events = tokio::select! {
                _ = beat.tick() => {
                    if let Err(e) = self.store.touch_build(&build.id, now()).await {
                        tracing::warn!(build_id = %build.id, error = %Chain(&e), "build heartbeat");
                    }
                    continue;
                }
                next = chunks.next() => match next {
                    Some(events) => events,
                    None => {
                        return Err(("the host agent ended the build without a result".to_owned(), None));
                    }
                },
            };
            let mut lines = Vec::new();
            let mut end = None;
            for ev in events {
                match ev.map(|e| e.event) {
                    Ok(Some(Event::Log(l))) => {
                        lines.push(BuildLogRecord {
                            seq: *seq,
                            at: UnixMillis(l.timestamp_unix_ms),
                            level: l.level,
                            message: l.message,
                            step: step_name(l.step, steps),
                        });
                        *seq += 1;
                    }
                    Ok(Some(Event::Step(_)) | None) => {}
                    Ok(Some(Event::Done(d))) => end = Some(Ok(d)),
                    Ok(Some(Event::Failed(f))) => {
                        end = Some(Err((f.message, step_name(f.step, steps))))
                    }
                    Err(e) => {
                        end = Some(Err((
                            format!("lost the host agent during the build: {}", e.message),
                            None,
                        )));
                    }
                }
            }
            if let Err(e) = self.store.append_build_logs(&build.id, &lines).await {
                tracing::warn!(build_id = %build.id, error = %Chain(&e), "write build log lines");
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Fails the builds whose heartbeat stopped more than `grace` ago (their control plane
    /// died); how many.
    pub async fn fail_stale_builds(&self, grace: Duration) -> Result<usize, ApiError> {
        let now = now();
        let before = UnixMillis(
            now.0
                .saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX)),
        );
        let stale = self.store.stale_builds(before).await?;
        let reason = reason_json(
            "the build was interrupted (its control plane stopped)",
            None,
        );
        let mut failed = 0;
        for b in stale {
            if self.store.fail_build(&b.id, &reason, now).await? {
                tracing::warn!(build_id = %b.id, "failed an interrupted template build");
                failed += 1;
            }
        }
        Ok(failed)
    }

    /// Releases the built versions `host` holds that nothing names any more (superseded and
    /// untagged, or of a deleted template); the host removes their files once no sandbox uses
    /// them. How many were released.
    pub(crate) async fn release_unused_versions(
        &self,
        host: &HostRecord,
    ) -> Result<usize, ApiError> {
        let client = self.client_for(host)?;
        let info = client
            .host_info(agent::HostInfoRequest {})
            .await
            .map_err(|e| ApiError::agent(format!("host info of {}", host.id), e))?;
        let mut released = 0;
        for id in info
            .template_envd_versions
            .keys()
            .filter(|k| is_build_id(k))
        {
            let wanted = match self.store.get_build(id).await? {
                // Its template was deleted.
                None => false,
                // Not recorded as ready yet: its build may be finishing right now.
                Some(b) if status_of(&b) != TemplateBuildStatus::Ready => true,
                Some(b) => self.store.build_wanted(&b.id).await?,
            };
            if wanted {
                continue;
            }
            client
                .release_template(agent::ReleaseTemplateRequest {
                    template_id: id.clone(),
                })
                .await
                .map_err(|e| ApiError::agent(format!("release template {id}"), e))?;
            tracing::info!(build_id = %id, host_id = %host.id, "released an unused template version");
            released += 1;
        }
        Ok(released)
    }

    /// `GET /templates/{id}/builds/{buildID}/status`.
    pub async fn build_status(
        &self,
        team: &TeamRecord,
        template_id: &str,
        build_id: &str,
        offset: u64,
        limit: Option<u64>,
        level: Option<&str>,
    ) -> Result<TemplateBuildInfo, ApiError> {
        let b = self.own_build(team, template_id, build_id).await?;
        let limit = limit.unwrap_or(MAX_LOG_PAGE).min(MAX_LOG_PAGE);
        let lines = self.store.build_logs(&b.id, offset, limit).await?;
        let entries: Vec<BuildLogEntry> = lines
            .iter()
            .filter(|l| level.is_none_or(|min| level_rank(&l.level) >= level_rank(min)))
            .map(log_entry)
            .collect();
        let reason = b
            .reason
            .as_deref()
            .and_then(|r| serde_json::from_str::<BuildStatusReason>(r).ok());
        Ok(TemplateBuildInfo {
            template_id: b.template_id.clone(),
            build_id: b.id.clone(),
            status: status_of(&b),
            logs: entries.iter().map(|e| e.message.clone()).collect(),
            log_entries: entries,
            reason,
        })
    }

    /// `GET /templates/{id}/builds/{buildID}/logs`: a page of the log by time (`cursor`, Unix
    /// ms), forward or backward, at least `level`.
    pub(crate) async fn build_logs(
        &self,
        team: &TeamRecord,
        template_id: &str,
        build_id: &str,
        page: LogPage<'_>,
    ) -> Result<TemplateBuildLogs, ApiError> {
        let b = self.own_build(team, template_id, build_id).await?;
        let backward = match page.direction {
            None | Some("forward") => false,
            Some("backward") => true,
            Some(d) => return Err(ApiError::BadRequest(format!("Invalid direction {d:?}"))),
        };
        let limit = page.limit.unwrap_or(MAX_LOG_PAGE).min(MAX_LOG_PAGE);
        let lines = self
            .store
            .build_logs_by_time(&b.id, page.cursor.map(UnixMillis), limit, backward)
            .await?;
        Ok(TemplateBuildLogs {
            logs: lines
                .iter()
                .filter(|l| {
                    page.level
                        .is_none_or(|min| level_rank(&l.level) >= level_rank(min))
                })
                .map(log_entry)
                .collect(),
        })
    }

    /// `DELETE /templates/{id}`: the team's template, its builds and tags. Its sandboxes keep
    /// running and stay resumable.
    pub async fn delete_template(&self, team: &TeamRecord, id: &str) -> Result<(), ApiError> {
        let t = self.own_template(team, id).await?;
        self.store.delete_template(&t.id).await?;
        tracing::info!(template_id = %t.id, "template deleted");
        Ok(())
    }

    /// `GET /templates/{id}/tags`.
    pub async fn template_tags(
        &self,
        team: &TeamRecord,
        id: &str,
    ) -> Result<Vec<TemplateTag>, ApiError> {
        let t = self.own_template(team, id).await?;
        Ok(self
            .store
            .tags(&t.id)
            .await?
            .into_iter()
            .map(|r| TemplateTag {
                tag: r.tag,
                build_id: r.build_id,
                created_at: to_datetime(r.created_at),
            })
            .collect())
    }

    /// `POST /templates/tags`: points more tags at the build `target` (`name:tag`, or `name`
    /// for its current build) names.
    pub async fn assign_tags(
        &self,
        team: &TeamRecord,
        body: AssignTemplateTags,
    ) -> Result<AssignedTemplateTags, ApiError> {
        let (name, _) = split_tag(&body.target);
        let own = self.own_template(team, name).await?;
        let target = self
            .resolve_template(&team.id, &body.target)
            .await?
            .filter(|t| t.id == own.id)
            .and_then(|t| t.build)
            .ok_or_else(|| ApiError::NotFound(format!("'{}' names no build", body.target)))?;
        if body.tags.is_empty() {
            return Err(ApiError::BadRequest("tags must not be empty".to_owned()));
        }
        for tag in &body.tags {
            valid_tag(tag)?;
            self.store.set_tag(&own.id, tag, &target.id, now()).await?;
        }
        Ok(AssignedTemplateTags {
            tags: body.tags,
            build_id: target.id,
        })
    }

    /// `DELETE /templates/tags`.
    pub async fn delete_tags(
        &self,
        team: &TeamRecord,
        body: DeleteTemplateTags,
    ) -> Result<(), ApiError> {
        let t = self.own_template(team, split_tag(&body.name).0).await?;
        if self.store.delete_tags(&t.id, &body.tags).await? == 0 && !body.tags.is_empty() {
            return Err(ApiError::NotFound("No such tags".to_owned()));
        }
        Ok(())
    }
}

fn level_rank(level: &str) -> u8 {
    match level {
        "debug" => 0,
        "info" => 1,
        "warn" => 2,
        "error" => 3,
        _ => 1,
    }
}

/// `fromImageRegistry` as E2B's SDKs send it: `{type: "registry", username, password}`;
/// the cloud registries' types need their SDKs' token exchanges, which this server lacks.
fn registry_credentials(r: &serde_json::Value) -> Result<(String, String), ApiError> {
    let kind = r.get("type").and_then(|t| t.as_str()).unwrap_or("registry");
    if kind != "registry" {
        return Err(ApiError::BadRequest(format!(
            "Registry credentials of type '{kind}' are not supported by this server: use \
             type 'registry' with a username and password"
        )));
    }
    let field = |name: &str| {
        r.get(name)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("fromImageRegistry needs a non-empty {name}"))
            })
    };
    Ok((field("username")?, field("password")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_their_tag() {
        assert_eq!(split_tag("app"), ("app", None));
        assert_eq!(split_tag("app:v2"), ("app", Some("v2")));
        assert_eq!(split_tag("team/app:v2"), ("team/app", Some("v2")));
        assert_eq!(split_tag("app:"), ("app:", None));
    }

    #[test]
    fn build_ids_are_v4_uuids() {
        let id = random_build_id();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!("89ab".contains(&parts[3][..1]));
    }

    #[test]
    fn only_uuids_are_build_ids() {
        assert!(is_build_id(&random_build_id()));
        for other in [
            "base",
            "abc",
            &"a".repeat(36),
            "3f2c1a9e-0b7d-4c55-9d1e-1a2b3c4d5e6g",
        ] {
            assert!(!is_build_id(other), "{other}");
        }
    }

    #[test]
    fn failed_steps_name_what_the_sdks_map() {
        assert_eq!(step_name(0, 3), None);
        assert_eq!(step_name(2, 3).as_deref(), Some("2"));
        assert_eq!(step_name(4, 3).as_deref(), Some("finalize"));
    }
}
