//! Ring-2 harness: the real control plane (real SQLite file, real HTTP server on an ephemeral
//! loopback port, real reaper) with a TEST DOUBLE for the host agent. The double keeps sandboxes
//! in memory and its "proxy" is a small echo server; the end-to-end path with QEMU and envd is
//! tested elsewhere, later.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use wrenn_agent_proto::v1::*;
use wrenn_connect::ConnectError;
use wrenn_server::agents::{AgentClient, AgentConnector};
use wrenn_server::{Config, ControlPlane};

pub const ADMIN: &str = "admin-token-for-tests";
pub const SECRET: &[u8] = b"test-secret";
pub const DOMAIN: &str = "wrenn.test";

/// In-memory stand-in for a host agent (test double).
#[derive(Default)]
pub struct FakeAgent {
    pub sandboxes: Mutex<HashMap<String, (SandboxState, SandboxSpec)>>,
    pub calls: Mutex<Vec<String>>,
    pub proxy_url: Mutex<String>,
}

impl FakeAgent {
    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
    pub fn state(&self, id: &str) -> Option<SandboxState> {
        self.sandboxes.lock().unwrap().get(id).map(|(s, _)| *s)
    }
    pub fn spec(&self, id: &str) -> Option<SandboxSpec> {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|(_, s)| s.clone())
    }
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

fn status(id: &str, st: SandboxState) -> SandboxStatus {
    SandboxStatus {
        sandbox_id: id.into(),
        state: st as i32,
        ..Default::default()
    }
}

#[async_trait]
impl AgentClient for FakeAgent {
    async fn create(&self, req: CreateRequest) -> Result<CreateResponse, ConnectError> {
        let spec = req.sandbox.unwrap();
        self.log(format!("create {}", spec.sandbox_id));
        if spec.template_id == "broken" {
            return Err(ConnectError::internal("the VM did not boot"));
        }
        let id = spec.sandbox_id.clone();
        self.sandboxes
            .lock()
            .unwrap()
            .insert(id.clone(), (SandboxState::Running, spec));
        Ok(CreateResponse {
            sandbox: Some(status(&id, SandboxState::Running)),
        })
    }
    async fn list(&self, _: ListRequest) -> Result<ListResponse, ConnectError> {
        let s = self.sandboxes.lock().unwrap();
        Ok(ListResponse {
            sandboxes: s.iter().map(|(id, (st, _))| status(id, *st)).collect(),
        })
    }
    async fn kill(&self, req: KillRequest) -> Result<KillResponse, ConnectError> {
        self.log(format!("kill {}", req.sandbox_id));
        match self.sandboxes.lock().unwrap().remove(&req.sandbox_id) {
            Some(_) => Ok(KillResponse {}),
            None => Err(ConnectError::not_found("no such sandbox")),
        }
    }
    async fn pause(&self, req: PauseRequest) -> Result<PauseResponse, ConnectError> {
        self.log(format!("pause {}", req.sandbox_id));
        let mut s = self.sandboxes.lock().unwrap();
        match s.get_mut(&req.sandbox_id) {
            Some((st @ SandboxState::Running, _)) => {
                *st = SandboxState::Paused;
                Ok(PauseResponse {})
            }
            Some(_) => Err(ConnectError::failed_precondition("not running")),
            None => Err(ConnectError::not_found("no such sandbox")),
        }
    }
    async fn resume(&self, req: ResumeRequest) -> Result<ResumeResponse, ConnectError> {
        self.log(format!("resume {}", req.sandbox_id));
        let mut s = self.sandboxes.lock().unwrap();
        match s.get_mut(&req.sandbox_id) {
            Some((st @ SandboxState::Paused, spec)) => {
                *st = SandboxState::Running;
                spec.end_unix_ms = req.end_unix_ms;
                spec.envd_access_token = req.envd_access_token;
                Ok(ResumeResponse {
                    sandbox: Some(status(&req.sandbox_id, SandboxState::Running)),
                })
            }
            Some(_) => Err(ConnectError::failed_precondition("not paused")),
            None => Err(ConnectError::not_found("no such sandbox")),
        }
    }
    async fn set_timeout(
        &self,
        req: SetTimeoutRequest,
    ) -> Result<SetTimeoutResponse, ConnectError> {
        self.log(format!("set_timeout {}", req.sandbox_id));
        let mut s = self.sandboxes.lock().unwrap();
        let (_, spec) = s
            .get_mut(&req.sandbox_id)
            .ok_or_else(|| ConnectError::not_found("no such sandbox"))?;
        spec.end_unix_ms = req.end_unix_ms;
        spec.backstop_unix_ms = req.backstop_unix_ms;
        Ok(SetTimeoutResponse {})
    }
    async fn metrics(&self, req: MetricsRequest) -> Result<MetricsResponse, ConnectError> {
        Ok(MetricsResponse {
            samples: vec![MetricSample {
                timestamp_unix_ms: req.end_unix_ms,
                cpu_count: 2,
                cpu_used_pct: 12.5,
                mem_used: 100,
                mem_total: 512,
                mem_cache: 10,
                disk_used: 1,
                disk_total: 2,
            }],
        })
    }
    async fn logs(&self, req: LogsRequest) -> Result<Vec<LogEntry>, ConnectError> {
        Ok(vec![LogEntry {
            timestamp_unix_ms: 1_700_000_000_000,
            message: format!("hello from {}", req.sandbox_id),
            level: "info".into(),
            fields: Default::default(),
        }])
    }
    async fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotResponse, ConnectError> {
        self.log(format!("snapshot {}", req.sandbox_id));
        Ok(SnapshotResponse {
            snapshot_id: req.snapshot_id,
        })
    }
    async fn host_info(&self, _: HostInfoRequest) -> Result<HostInfoResponse, ConnectError> {
        Ok(HostInfoResponse {
            host_id: "h1".into(),
            version: "test".into(),
            vcpus_total: 64,
            memory_mb_total: 65536,
            proxy_url: self.proxy_url.lock().unwrap().clone(),
            template_envd_versions: [("base".to_string(), "0.6.4".to_string())].into(),
            ..Default::default()
        })
    }
}

pub struct FakeConnector(pub Arc<FakeAgent>);

impl AgentConnector for FakeConnector {
    fn connect(&self, _rpc_url: &str) -> Result<Arc<dyn AgentClient>, ConnectError> {
        Ok(self.0.clone())
    }
}

/// The agent proxy stand-in: echoes what it got as JSON; upgrades echo bytes back.
async fn echo(mut req: Request) -> Response {
    if req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = hyper_util::rt::TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(axum::body::Body::empty())
            .unwrap();
    }
    let headers = req.headers().clone();
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (sid, port, token) = (
        h("e2b-sandbox-id"),
        h("e2b-sandbox-port"),
        h("x-access-token"),
    );
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    axum::Json(serde_json::json!({
        "sandboxId": sid, "port": port, "token": token, "method": method, "uri": uri,
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

pub async fn start_echo() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(echo);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A running control plane.
pub struct Server {
    pub url: String,
    pub cp: Arc<ControlPlane>,
    pub agent: Arc<FakeAgent>,
    pub db: PathBuf,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn start(db: &Path, agent: Arc<FakeAgent>) -> Server {
        let mut config = Config::new(db.to_str().unwrap(), SECRET.to_vec());
        config.admin_token = Some(ADMIN.into());
        config.domain = Some(DOMAIN.into());
        config.reaper_interval = Duration::from_millis(200);
        let cp = ControlPlane::open(config, Arc::new(FakeConnector(agent.clone())))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let app = wrenn_server::app(cp.clone());
        let serve = tokio::spawn(wrenn_server::serve(listener, app, shutdown.clone()));
        let reaper = wrenn_server::reaper::spawn(cp.clone(), shutdown.clone());
        Server {
            url,
            cp,
            agent,
            db: db.to_owned(),
            shutdown,
            tasks: vec![serve, reaper],
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.cp.store().close().await;
    }
}

/// A control plane with one registered fake host, one team and its API key.
pub struct Stack {
    pub server: Server,
    pub key: String,
    pub team: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let agent = Arc::new(FakeAgent::default());
        *agent.proxy_url.lock().unwrap() = start_echo().await;
        let server = Server::start(&dir.path().join("wrenn.db"), agent).await;
        let http = reqwest::Client::new();
        let admin = |p: &str| {
            http.post(format!("{}{p}", server.url))
                .header("x-admin-token", ADMIN)
        };
        let r = admin("/admin/hosts")
            .json(&serde_json::json!({"id": "h1", "rpcUrl": "http://127.0.0.1:1", "proxyUrl": ""}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let team: serde_json::Value = admin("/admin/teams")
            .json(&serde_json::json!({"name": "t"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let team = team["teamID"].as_str().unwrap().to_owned();
        let key: serde_json::Value = admin(&format!("/admin/teams/{team}/api-keys"))
            .json(&serde_json::json!({"name": "k"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key = key["key"].as_str().unwrap().to_owned();
        Stack {
            server,
            key,
            team,
            http,
            dir,
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.server.url))
            .header("x-api-key", &self.key)
    }

    pub async fn create(&self, body: serde_json::Value) -> serde_json::Value {
        let r = self
            .req(reqwest::Method::POST, "/v2/sandboxes")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    }
}

/// Status and JSON body (asserting the E2B error shape on errors).
pub async fn json(r: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v: serde_json::Value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    if status >= 400 {
        assert_eq!(v["code"], status, "error body {v}");
        assert!(v["message"].is_string(), "error body {v}");
    }
    (status, v)
}
