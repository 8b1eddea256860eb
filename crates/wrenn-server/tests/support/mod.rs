//! Ring-2 harness: the real control plane (real SQLite file, real HTTP server on an ephemeral
//! loopback port, real reaper) with a TEST DOUBLE for the host agent. The double keeps sandboxes
//! in memory and its "proxy" is a small echo server; the end-to-end path with QEMU and envd is
//! tested elsewhere, later.

#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
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

/// The agent's real refusal when another operation holds the sandbox.
pub fn busy_error(id: &str) -> ConnectError {
    ConnectError::failed_precondition(format!(
        "sandbox {id} is busy (another operation is in progress)"
    ))
}

pub const ADMIN: &str = "admin-token-for-tests";
pub const SECRET: &[u8] = b"test-secret";
pub const DOMAIN: &str = "wrenn.test";

/// The steps every Create of the double reports, as a real agent names them; `bad name`
/// and the negative one are what a real agent never sends, and must not reach the header.
pub const FAKE_CREATE_STAGES: &[(&str, f64)] = &[
    ("slot", 0.04),
    ("restore", 21.5),
    ("envd", 310.26),
    ("init", 4.0),
    ("bad name", 1.0),
    ("neg", -3.0),
];

/// In-memory stand-in for a host agent (test double).
pub struct FakeAgent {
    pub sandboxes: Mutex<HashMap<String, (SandboxState, SandboxSpec)>>,
    pub calls: Mutex<Vec<String>>,
    pub proxy_url: Mutex<String>,
    /// What HostInfo reports: vCPUs, memory (MiB), most sandboxes (0: no limit).
    pub capacity: Mutex<(u32, u64, u32)>,
    /// When set, a Create (after it listed its sandbox, as the real agent lists a sandbox
    /// being created) waits for a permit: a slow create.
    pub create_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// When set, a Pause (once logged, before it pauses anything) waits for a permit: a slow
    /// pause, during which the record is `pausing`.
    pub pause_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// When set, a Resume (once logged, before it resumes anything) waits for a permit.
    pub resume_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// The next Create fails with this.
    pub fail_next_create: Mutex<Option<ConnectError>>,
    /// Sandboxes another operation holds: pause, resume, kill and set_timeout refuse them.
    pub busy: Mutex<HashSet<String>>,
    /// The agent secrets clients were made with.
    pub secrets: Mutex<Vec<String>>,
    /// What the next BuildTemplate streams (`None`: it refuses, as an agent without builds).
    pub build_events: Mutex<Option<Vec<BuildTemplateEvent>>>,
    /// The BuildTemplate requests it got.
    pub builds: Mutex<Vec<BuildTemplateRequest>>,
    /// Built templates HostInfo reports besides `base`.
    pub built: Mutex<Vec<String>>,
    /// The templates ReleaseTemplate was called for.
    pub released: Mutex<Vec<String>>,
    /// The snapshots it holds: ID -> the spec of the sandbox it was taken of, as it was then.
    pub snapshots: Mutex<HashMap<String, SandboxSpec>>,
    /// The next Snapshot fails with this (after it checked the sandbox, before it captures).
    pub fail_next_snapshot: Mutex<Option<ConnectError>>,
    /// The agents of further hosts, by their RPC URL (register a host with that URL): every
    /// other URL reaches this one.
    pub others: Mutex<HashMap<String, Arc<FakeAgent>>>,
    /// Sandboxes a resume with `fetch` finds in "the shared store".
    pub fetchable: Mutex<HashSet<String>>,
}

impl Default for FakeAgent {
    fn default() -> Self {
        FakeAgent {
            sandboxes: Default::default(),
            calls: Default::default(),
            proxy_url: Default::default(),
            capacity: Mutex::new((64, 65536, 0)),
            create_gate: Default::default(),
            pause_gate: Default::default(),
            resume_gate: Default::default(),
            fail_next_create: Default::default(),
            busy: Default::default(),
            secrets: Default::default(),
            build_events: Default::default(),
            builds: Default::default(),
            built: Default::default(),
            released: Default::default(),
            snapshots: Default::default(),
            fail_next_snapshot: Default::default(),
            others: Default::default(),
            fetchable: Default::default(),
        }
    }
}

impl FakeAgent {
    fn refuse_busy(&self, id: &str) -> Result<(), ConnectError> {
        if self.busy.lock().unwrap().contains(id) {
            return Err(busy_error(id));
        }
        Ok(())
    }
    /// A fake agent reporting this capacity.
    pub fn with_capacity(vcpus: u32, memory_mb: u64, max_sandboxes: u32) -> FakeAgent {
        let a = FakeAgent::default();
        *a.capacity.lock().unwrap() = (vcpus, memory_mb, max_sandboxes);
        a
    }
    /// Makes creates wait for [`FakeAgent::release_creates`].
    pub fn hold_creates(&self) {
        *self.create_gate.lock().unwrap() = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }
    pub fn release_creates(&self, n: usize) {
        if let Some(g) = &*self.create_gate.lock().unwrap() {
            g.add_permits(n);
        }
    }
    /// Makes pauses wait for [`FakeAgent::release_pauses`].
    pub fn hold_pauses(&self) {
        *self.pause_gate.lock().unwrap() = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }
    pub fn release_pauses(&self, n: usize) {
        if let Some(g) = &*self.pause_gate.lock().unwrap() {
            g.add_permits(n);
        }
    }
    /// Makes resumes wait for [`FakeAgent::release_resumes`].
    pub fn hold_resumes(&self) {
        *self.resume_gate.lock().unwrap() = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }
    pub fn release_resumes(&self, n: usize) {
        if let Some(g) = &*self.resume_gate.lock().unwrap() {
            g.add_permits(n);
        }
    }
    /// How many Create calls arrived.
    pub fn creates(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with("create "))
            .count()
    }
    /// Puts a running VM on the agent that no record knows.
    pub fn add_vm(&self, id: &str) {
        let spec = SandboxSpec {
            sandbox_id: id.into(),
            template_id: "base".into(),
            ..Default::default()
        };
        self.sandboxes
            .lock()
            .unwrap()
            .insert(id.into(), (SandboxState::Running, spec));
    }
    /// Sets a VM's state behind the control plane's back.
    pub fn set_state(&self, id: &str, st: SandboxState) {
        self.sandboxes.lock().unwrap().get_mut(id).unwrap().0 = st;
    }
    /// Makes a VM vanish without the control plane knowing.
    pub fn lose_vm(&self, id: &str) {
        self.sandboxes.lock().unwrap().remove(id);
    }
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
    /// The calls whose log line starts with `prefix` (e.g. `"snapshot "`).
    pub fn calls_of(&self, prefix: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }
    /// The snapshot IDs it holds.
    pub fn snapshot_ids(&self) -> Vec<String> {
        self.snapshots.lock().unwrap().keys().cloned().collect()
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
        if !spec.snapshot_id.is_empty()
            && !self
                .snapshots
                .lock()
                .unwrap()
                .contains_key(&spec.snapshot_id)
        {
            return Err(ConnectError::not_found(format!(
                "snapshot {} not found",
                spec.snapshot_id
            )));
        }
        if let Some(e) = self.fail_next_create.lock().unwrap().take() {
            // A deadline is an answer lost on the way: the VM was made all the same.
            if e.code == wrenn_connect::Code::DeadlineExceeded {
                let id = spec.sandbox_id.clone();
                self.sandboxes
                    .lock()
                    .unwrap()
                    .insert(id, (SandboxState::Running, spec));
            }
            return Err(e);
        }
        let id = spec.sandbox_id.clone();
        self.sandboxes
            .lock()
            .unwrap()
            .insert(id.clone(), (SandboxState::Running, spec));
        let gate = self.create_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
        Ok(CreateResponse {
            sandbox: Some(status(&id, SandboxState::Running)),
            stages: FAKE_CREATE_STAGES
                .iter()
                .map(|(name, duration_ms)| Stage {
                    name: (*name).to_owned(),
                    duration_ms: *duration_ms,
                })
                .collect(),
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
        self.refuse_busy(&req.sandbox_id)?;
        match self.sandboxes.lock().unwrap().remove(&req.sandbox_id) {
            Some(_) => Ok(KillResponse {}),
            None => Err(ConnectError::not_found("no such sandbox")),
        }
    }
    async fn pause(&self, req: PauseRequest) -> Result<PauseResponse, ConnectError> {
        let mode = if req.keep_memory { "" } else { " filesystem" };
        self.log(format!("pause {}{mode}", req.sandbox_id));
        self.refuse_busy(&req.sandbox_id)?;
        let gate = self.pause_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
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
        let how = match (req.reboot, req.fetch) {
            (true, _) => " reboot",
            (false, true) => " fetch",
            _ => "",
        };
        self.log(format!("resume {}{how}", req.sandbox_id));
        self.refuse_busy(&req.sandbox_id)?;
        let known = self.sandboxes.lock().unwrap().contains_key(&req.sandbox_id);
        if req.fetch && !known && self.fetchable.lock().unwrap().remove(&req.sandbox_id) {
            self.add_vm(&req.sandbox_id);
            self.set_state(&req.sandbox_id, SandboxState::Paused);
        }
        let gate = self.resume_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
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
    async fn update_network(
        &self,
        req: UpdateNetworkRequest,
    ) -> Result<UpdateNetworkResponse, ConnectError> {
        self.log(format!("update_network {}", req.sandbox_id));
        self.refuse_busy(&req.sandbox_id)?;
        let mut s = self.sandboxes.lock().unwrap();
        let (_, spec) = s
            .get_mut(&req.sandbox_id)
            .ok_or_else(|| ConnectError::not_found("no such sandbox"))?;
        spec.egress = req.egress;
        Ok(UpdateNetworkResponse {})
    }

    async fn set_timeout(
        &self,
        req: SetTimeoutRequest,
    ) -> Result<SetTimeoutResponse, ConnectError> {
        self.log(format!("set_timeout {}", req.sandbox_id));
        self.refuse_busy(&req.sandbox_id)?;
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
    /// As the agent: a running sandbox is paused and resumed (it ends running), a paused one
    /// stays paused; the snapshot's template is its source's.
    async fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotResponse, ConnectError> {
        self.log(format!("snapshot {} {}", req.sandbox_id, req.snapshot_id));
        self.refuse_busy(&req.sandbox_id)?;
        let (state, spec) = self
            .sandboxes
            .lock()
            .unwrap()
            .get(&req.sandbox_id)
            .cloned()
            .ok_or_else(|| ConnectError::not_found("no such sandbox"))?;
        if let Some(e) = self.fail_next_snapshot.lock().unwrap().take() {
            return Err(e);
        }
        self.snapshots
            .lock()
            .unwrap()
            .insert(req.snapshot_id.clone(), spec.clone());
        Ok(SnapshotResponse {
            snapshot_id: req.snapshot_id,
            template_id: spec.template_id,
            vcpus: spec.vcpus,
            memory_mb: spec.memory_mb,
            disk_bytes: 4096,
            memory_bytes: 8192,
            paused_ms: if state == SandboxState::Running { 7 } else { 0 },
            parent_snapshot_id: spec.snapshot_id,
            envd_version: "0.6.5".into(),
        })
    }
    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, ConnectError> {
        self.log(format!("delete_snapshot {}", req.snapshot_id));
        let known = self
            .snapshots
            .lock()
            .unwrap()
            .remove(&req.snapshot_id)
            .is_some();
        Ok(DeleteSnapshotResponse { known })
    }
    async fn host_info(&self, _: HostInfoRequest) -> Result<HostInfoResponse, ConnectError> {
        let (vcpus, memory_mb, max_sandboxes) = *self.capacity.lock().unwrap();
        Ok(HostInfoResponse {
            host_id: "h1".into(),
            version: "test".into(),
            vcpus_total: vcpus,
            memory_mb_total: memory_mb,
            max_sandboxes,
            proxy_url: self.proxy_url.lock().unwrap().clone(),
            template_envd_versions: std::iter::once("base".to_string())
                .chain(self.built.lock().unwrap().iter().cloned())
                .map(|t| (t, "0.6.4".to_string()))
                .collect(),
            ..Default::default()
        })
    }
    async fn build_template(
        &self,
        req: BuildTemplateRequest,
    ) -> Result<wrenn_connect::BoxStream<BuildTemplateEvent>, ConnectError> {
        self.log(format!("build {}", req.build_id));
        let events = self.build_events.lock().unwrap().take();
        self.builds.lock().unwrap().push(req);
        let events = events
            .ok_or_else(|| ConnectError::unimplemented("the fake agent builds no templates"))?;
        Ok(Box::pin(futures::stream::iter(events.into_iter().map(Ok))))
    }
    async fn release_template(
        &self,
        req: ReleaseTemplateRequest,
    ) -> Result<ReleaseTemplateResponse, ConnectError> {
        let known = {
            let mut built = self.built.lock().unwrap();
            let had = built.contains(&req.template_id);
            built.retain(|t| *t != req.template_id);
            had
        };
        self.released.lock().unwrap().push(req.template_id);
        Ok(ReleaseTemplateResponse { known })
    }
}

pub struct FakeConnector(pub Arc<FakeAgent>);

impl AgentConnector for FakeConnector {
    fn connect(&self, rpc_url: &str, secret: &str) -> Result<Arc<dyn AgentClient>, ConnectError> {
        self.0.secrets.lock().unwrap().push(secret.to_owned());
        if let Some(other) = self.0.others.lock().unwrap().get(rpc_url) {
            return Ok(other.clone());
        }
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
    let (sid, port, token, agent_auth) = (
        h("e2b-sandbox-id"),
        h("e2b-sandbox-port"),
        h("x-access-token"),
        h("proxy-authorization"),
    );
    let traffic_token = h("e2b-traffic-access-token");
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    axum::Json(serde_json::json!({
        "sandboxId": sid, "port": port, "token": token, "method": method, "uri": uri,
        "agentAuth": agent_auth, "trafficToken": traffic_token,
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
    /// Its database URL (or SQLite file path).
    pub db: String,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn start(db: &str, agent: Arc<FakeAgent>) -> Server {
        Server::start_with(db, agent, |_| {}).await
    }

    /// With the test settings changed by `tweak`. The reaper and the periodic reconciler run
    /// (every 200 ms) in every test, beside whatever the test does.
    pub async fn start_with(
        db: &str,
        agent: Arc<FakeAgent>,
        tweak: impl FnOnce(&mut Config),
    ) -> Server {
        let mut config = Config::new(db, SECRET.to_vec());
        config.admin_token = Some(ADMIN.into());
        config.domain = Some(DOMAIN.into());
        config.reaper_interval = Duration::from_millis(200);
        config.reconcile_interval = Duration::from_millis(200);
        config.settle_grace = Duration::from_secs(30);
        tweak(&mut config);
        let cp = ControlPlane::open(config, Arc::new(FakeConnector(agent.clone())))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let app = wrenn_server::app(cp.clone());
        let serve = tokio::spawn(wrenn_server::serve(listener, app, shutdown.clone()));
        let reaper = wrenn_server::reaper::spawn(cp.clone(), shutdown.clone());
        let reconciler = wrenn_server::reconcile::spawn(cp.clone(), shutdown.clone());
        let monitor = wrenn_server::hosts::spawn_monitor(cp.clone(), shutdown.clone());
        Server {
            url,
            cp,
            agent,
            db: db.to_owned(),
            shutdown,
            tasks: vec![serve, reaper, reconciler, monitor],
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

/// One `#[tokio::test]` per database for each test function (`async fn name(db: Db)`): a
/// SQLite file, and PostgreSQL when `WRENN_TEST_POSTGRES_URL` is set.
#[allow(unused_macros)]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Db::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                match super::Db::postgres() {
                    Some(db) => super::$name(db).await,
                    None => eprintln!("WRENN_TEST_POSTGRES_URL not set: PostgreSQL run skipped"),
                }
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both_databases;

/// Which database a stack runs on.
pub enum Db {
    Sqlite,
    /// A fresh database made for the stack (dropped by [`Stack::stop`]).
    Postgres {
        admin_url: String,
    },
}

impl Db {
    /// PostgreSQL when `WRENN_TEST_POSTGRES_URL` is set.
    pub fn postgres() -> Option<Db> {
        std::env::var("WRENN_TEST_POSTGRES_URL")
            .ok()
            .map(|admin_url| Db::Postgres { admin_url })
    }
}

/// `url` with its database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let base = match url[scheme_end..].find('/') {
        Some(i) => &url[..scheme_end + i],
        None => url,
    };
    format!("{base}/{name}")
}

async fn admin_sql(admin_url: &str, sql: &str) {
    use sqlx::Connection as _;
    let mut c = sqlx::PgConnection::connect(admin_url).await.unwrap();
    sqlx::query(sql).execute(&mut c).await.unwrap();
    c.close().await.unwrap();
}

/// A stack's own PostgreSQL database, dropped when this is dropped (a failing test too).
pub struct PgDb {
    admin_url: String,
    name: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop cannot await, and may run inside the test's runtime: a runtime of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(admin_sql(&admin, &sql));
        })
        .join();
    }
}

/// A control plane with one registered fake host, one team and its API key.
pub struct Stack {
    pub server: Server,
    pub key: String,
    pub team: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    /// A PostgreSQL stack's own database.
    pub pg: Option<PgDb>,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::with(Db::Sqlite, FakeAgent::default(), |_| {}).await
    }

    pub async fn with(db: Db, agent: FakeAgent, tweak: impl FnOnce(&mut Config)) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let (url, pg) = match db {
            Db::Sqlite => (
                dir.path().join("wrenn.db").to_str().unwrap().to_owned(),
                None,
            ),
            Db::Postgres { admin_url } => {
                let bytes: [u8; 20] = rand::random();
                let name = format!(
                    "wrenn_test_{}",
                    &wrenn_core::SandboxId::from_random(bytes).as_str()[..12]
                );
                admin_sql(&admin_url, &format!("CREATE DATABASE {name}")).await;
                let url = with_database(&admin_url, &name);
                (url, Some(PgDb { admin_url, name }))
            }
        };
        let agent = Arc::new(agent);
        *agent.proxy_url.lock().unwrap() = start_echo().await;
        let server = Server::start_with(&url, agent, tweak).await;
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
            pg,
        }
    }

    /// Stops the server and drops a PostgreSQL stack's database.
    pub async fn stop(self) {
        self.server.stop().await;
        drop(self.pg);
    }

    /// A second team of this stack, and its API key.
    pub async fn other_team(&self) -> (String, String) {
        let admin = |p: String| {
            self.http
                .post(format!("{}{p}", self.server.url))
                .header("x-admin-token", ADMIN)
        };
        let team: serde_json::Value = admin("/admin/teams".into())
            .json(&serde_json::json!({"name": "other"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let team = team["teamID"].as_str().unwrap().to_owned();
        let key: serde_json::Value = admin(format!("/admin/teams/{team}/api-keys"))
            .json(&serde_json::json!({"name": "k"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (team, key["key"].as_str().unwrap().to_owned())
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

/// Polls `ok` every 50 ms until it holds, for at most 10 s.
pub async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ok().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The wall clock as the store keeps it.
pub fn now_ms() -> wrenn_core::UnixMillis {
    wrenn_core::UnixMillis(
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap(),
    )
}
