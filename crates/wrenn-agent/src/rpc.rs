//! The host agent's RPC service: `wrenn.agent.v1.AgentService` (proto/agent) over Connect.
//! A thin translator: requests become [`Controller`](crate::controller::Controller) calls,
//! and [`ControlError`]s become Connect errors in [`into_connect`], the one place that maps
//! them, with their whole cause chain in the message.

use std::sync::Arc;

use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::{
    BuildTemplateEvent, BuildTemplateRequest, CreateRequest, CreateResponse, DeleteSnapshotRequest,
    DeleteSnapshotResponse, HostInfoRequest, HostInfoResponse, KillRequest, KillResponse,
    ListRequest, ListResponse, LogEntry, LogsRequest, MetricsRequest, PauseRequest, PauseResponse,
    ReleaseTemplateRequest, ReleaseTemplateResponse, ResumeRequest, ResumeResponse, SandboxState,
    SandboxStatus, SetTimeoutRequest, SetTimeoutResponse, SnapshotRequest, SnapshotResponse, Stage,
    UpdateNetworkRequest, UpdateNetworkResponse,
};
use wrenn_connect::{BoxStream, Code, ConnectError, RpcRouter};

use crate::agent::Agent;
use crate::controller::{ControlError, CreateArgs, Phase, Status};
use crate::runtime::{Egress, GuestInit, PauseMode, RuntimeError, Stages};

/// The one place agent errors become Connect codes. A busy sandbox is `aborted` (HTTP 409 in
/// Connect's mapping): retry later; a sandbox in the wrong state is `failed_precondition`.
pub fn into_connect(e: ControlError) -> ConnectError {
    let msg = crate::error_chain(&e);
    match e {
        ControlError::NotFound(_)
        | ControlError::TemplateNotFound(_)
        | ControlError::SnapshotNotFound(_) => ConnectError::not_found(msg),
        ControlError::AlreadyExists(_) => ConnectError::already_exists(msg),
        ControlError::Busy { .. } => ConnectError::new(Code::Aborted, msg),
        ControlError::WrongState { .. } => ConnectError::failed_precondition(msg),
        ControlError::Invalid(_) => ConnectError::invalid_argument(msg),
        ControlError::Full(_) => ConnectError::resource_exhausted(msg),
        ControlError::ShuttingDown => ConnectError::new(Code::Unavailable, msg),
        ControlError::Runtime { source, .. } | ControlError::Lost { source, .. } => match source {
            RuntimeError::TemplateNotFound(_) => ConnectError::not_found(msg),
            RuntimeError::NoSpace { .. } | RuntimeError::Slots(_) => {
                ConnectError::resource_exhausted(msg)
            }
            RuntimeError::Step { .. } => ConnectError::internal(msg),
        },
        ControlError::Aborted(_) => ConnectError::internal(msg),
    }
}

fn status(s: Status) -> SandboxStatus {
    let state = match s.phase {
        Phase::Running => SandboxState::Running,
        Phase::Paused => SandboxState::Paused,
    };
    let m = s.meta;
    SandboxStatus {
        sandbox_id: m.sandbox_id,
        template_id: m.template_id,
        state: state as i32,
        vcpus: m.vcpus,
        memory_mb: m.memory_mb,
        start_unix_ms: m.start_unix_ms,
        backstop_unix_ms: m.backstop_unix_ms,
        envd_version: m.envd_version,
    }
}

fn host_info(agent: &Agent) -> HostInfoResponse {
    let u = agent.usage();
    HostInfoResponse {
        host_id: u.host_id,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        vcpus_total: u.vcpus_total,
        vcpus_used: u.vcpus_used,
        memory_mb_total: u.memory_mb_total,
        memory_mb_used: u.memory_mb_used,
        sandboxes: u.sandboxes,
        max_sandboxes: u.max_sandboxes,
        proxy_url: u.proxy_url,
        template_envd_versions: u
            .templates
            .into_iter()
            .map(|(id, t)| (id, t.envd_version))
            .collect(),
    }
}

async fn create(agent: Arc<Agent>, req: CreateRequest) -> Result<CreateResponse, ControlError> {
    let spec = req
        .sandbox
        .ok_or_else(|| ControlError::Invalid("missing sandbox spec".into()))?;
    let args = CreateArgs {
        sandbox_id: spec.sandbox_id,
        template_id: spec.template_id,
        start_unix_ms: spec.start_unix_ms,
        backstop_unix_ms: spec.backstop_unix_ms,
        auto_pause: spec.auto_pause,
        egress: spec.egress.map(egress_of).unwrap_or_default(),
        disk_size_mb: spec.disk_size_mb,
        init: GuestInit {
            env_vars: spec.env_vars.into_iter().collect(),
            access_token: Some(spec.envd_access_token).filter(|t| !t.is_empty()),
            reboot: false,
        },
        snapshot_id: Some(spec.snapshot_id).filter(|s| !s.is_empty()),
    };
    let (s, stages) = agent.controller().create(args).await?;
    Ok(CreateResponse {
        sandbox: Some(status(s)),
        stages: stages_of(&stages),
    })
}

fn stages_of(stages: &Stages) -> Vec<Stage> {
    stages
        .0
        .iter()
        .map(|(name, took)| Stage {
            name: (*name).to_owned(),
            duration_ms: took.as_secs_f64() * 1000.0,
        })
        .collect()
}

fn egress_of(e: wrenn_agent_proto::v1::Egress) -> Egress {
    Egress {
        allow_internet_access: e.allow_internet_access,
        allow_out: e.allow_out,
        deny_out: e.deny_out,
    }
}

async fn snapshot(
    agent: Arc<Agent>,
    req: SnapshotRequest,
) -> Result<SnapshotResponse, ControlError> {
    let c = agent
        .controller()
        .snapshot(&req.sandbox_id, &req.snapshot_id)
        .await?;
    let s = c.snapshot;
    Ok(SnapshotResponse {
        snapshot_id: req.snapshot_id,
        template_id: s.template_id,
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        disk_bytes: s.disk_bytes,
        memory_bytes: s.memory_bytes,
        paused_ms: u32::try_from(c.paused_for.as_millis()).unwrap_or(u32::MAX),
        parent_snapshot_id: s.parent.unwrap_or_default(),
        envd_version: s.envd_version,
    })
}

async fn resume(agent: Arc<Agent>, req: ResumeRequest) -> Result<ResumeResponse, ControlError> {
    if req.fetch && agent.controller().get(&req.sandbox_id).is_none() {
        crate::controller::check_id(&req.sandbox_id)?;
        let fetched = crate::shared::fetch_for_resume(&agent, &req.sandbox_id)
            .await
            .map_err(|e| {
                ControlError::Invalid(format!(
                    "fetch from the shared store: {}",
                    crate::error_chain(&e)
                ))
            })?;
        if !fetched {
            return Err(ControlError::NotFound(req.sandbox_id));
        }
    }
    let init = GuestInit {
        env_vars: req.env_vars.into_iter().collect(),
        access_token: Some(req.envd_access_token).filter(|t| !t.is_empty()),
        reboot: req.reboot,
    };
    let s = agent
        .controller()
        .resume(&req.sandbox_id, init, req.backstop_unix_ms)
        .await?;
    // Running again: any copy in the shared store is out of date.
    crate::shared::forget(&agent, &req.sandbox_id, false);
    Ok(ResumeResponse {
        sandbox: Some(status(s)),
    })
}

/// Starts a template build, detached: it finishes (and its template is registered) even if
/// the caller goes away; the stream carries its events while the caller listens.
fn build_template(
    agent: Arc<Agent>,
    req: BuildTemplateRequest,
) -> Result<BoxStream<BuildTemplateEvent>, ConnectError> {
    let Some(builds) = agent.builds().cloned() else {
        return Err(ConnectError::unimplemented(
            "this agent does not build templates",
        ));
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { builds.run(&agent, req, tx).await });
    let stream = tokio_stream_of(rx);
    Ok(stream)
}

fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<BuildTemplateEvent>,
) -> BoxStream<BuildTemplateEvent> {
    Box::pin(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|m| m.map(Ok))
    }))
}

/// The Connect router for `AgentService`; also starts the backstop reaper and the metrics
/// sampler (which end when the agent is dropped).
pub fn router(agent: Arc<Agent>) -> axum::Router {
    agent.controller().spawn_reaper();
    tokio::spawn(crate::observe::sampler(Arc::downgrade(&agent)));
    let a = agent;
    RpcRouter::new()
        .unary(paths::CREATE, {
            let a = a.clone();
            move |_ctx, req: CreateRequest| {
                let a = a.clone();
                async move { create(a, req).await.map_err(into_connect) }
            }
        })
        .unary(paths::LIST, {
            let a = a.clone();
            move |_ctx, _req: ListRequest| {
                let sandboxes = a.controller().list().into_iter().map(status).collect();
                async move { Ok::<_, ConnectError>(ListResponse { sandboxes }) }
            }
        })
        .unary(paths::KILL, {
            let a = a.clone();
            move |_ctx, req: KillRequest| {
                let a = a.clone();
                async move {
                    a.controller()
                        .kill(&req.sandbox_id)
                        .await
                        .map_err(into_connect)?;
                    crate::shared::forget(&a, &req.sandbox_id, true);
                    Ok(KillResponse {})
                }
            }
        })
        .unary(paths::PAUSE, {
            let a = a.clone();
            move |_ctx, req: PauseRequest| {
                let a = a.clone();
                async move {
                    let mode = if req.keep_memory {
                        PauseMode::Full
                    } else {
                        PauseMode::Filesystem
                    };
                    a.controller()
                        .pause_as(&req.sandbox_id, mode)
                        .await
                        .map_err(into_connect)?;
                    crate::shared::push_after_pause(&a, &req.sandbox_id);
                    Ok(PauseResponse {})
                }
            }
        })
        .unary(paths::RESUME, {
            let a = a.clone();
            move |_ctx, req: ResumeRequest| {
                let a = a.clone();
                async move { resume(a, req).await.map_err(into_connect) }
            }
        })
        .unary(paths::SET_TIMEOUT, {
            let a = a.clone();
            move |_ctx, req: SetTimeoutRequest| {
                let r = a
                    .controller()
                    .set_timeout(&req.sandbox_id, req.backstop_unix_ms)
                    .map(|()| SetTimeoutResponse {})
                    .map_err(into_connect);
                async move { r }
            }
        })
        .unary(paths::UPDATE_NETWORK, {
            let a = a.clone();
            move |_ctx, req: UpdateNetworkRequest| {
                let a = a.clone();
                async move {
                    // No policy in the request is none at all: internet on, no lists.
                    let egress = req.egress.map(egress_of).unwrap_or_default();
                    a.controller()
                        .update_network(&req.sandbox_id, egress)
                        .await
                        .map(|()| UpdateNetworkResponse {})
                        .map_err(into_connect)
                }
            }
        })
        .unary(paths::HOST_INFO, {
            let a = a.clone();
            move |_ctx, _req: HostInfoRequest| {
                let info = host_info(&a);
                async move { Ok::<_, ConnectError>(info) }
            }
        })
        .unary(paths::METRICS, {
            let a = a.clone();
            move |_ctx, req: MetricsRequest| {
                let a = a.clone();
                async move { a.metrics(&req).await.map_err(into_connect) }
            }
        })
        .server_stream(paths::LOGS, {
            let a = a.clone();
            move |_ctx, req: LogsRequest| {
                let a = a.clone();
                async move {
                    let entries = a.logs(&req).await;
                    let stream =
                        futures::stream::iter(entries.map_err(into_connect)?.into_iter().map(Ok));
                    Ok::<_, ConnectError>(Box::pin(stream) as BoxStream<LogEntry>)
                }
            }
        })
        .server_stream(paths::BUILD_TEMPLATE, {
            let a = a.clone();
            move |_ctx, req: BuildTemplateRequest| {
                let a = a.clone();
                async move { build_template(a, req) }
            }
        })
        .unary(paths::RELEASE_TEMPLATE, {
            let a = a.clone();
            move |_ctx, req: ReleaseTemplateRequest| {
                let known = a.builds().is_some_and(|b| b.release(&a, &req.template_id));
                async move { Ok::<_, ConnectError>(ReleaseTemplateResponse { known }) }
            }
        })
        .unary(paths::SNAPSHOT, {
            let a = a.clone();
            move |_ctx, req: SnapshotRequest| {
                let a = a.clone();
                async move { snapshot(a, req).await.map_err(into_connect) }
            }
        })
        .unary(paths::DELETE_SNAPSHOT, {
            let a = a.clone();
            move |_ctx, req: DeleteSnapshotRequest| {
                let a = a.clone();
                async move {
                    let known = a.delete_snapshot(&req.snapshot_id).await;
                    Ok::<_, ConnectError>(DeleteSnapshotResponse { known })
                }
            }
        })
        .into_router()
}
