//! How the control plane reaches host agents: the [`AgentClient`] trait, its implementation
//! over our Connect client, and the registry of clients per host.
//!
//! An agent is reached at its RPC URL: `http://host:port` over the network, or `unix:/path`
//! for the root-only socket of the agent inside `wrenn up`. Every call carries the host's
//! secret (`Authorization: Bearer`, see [`crate::tokens::agent_secret`]), which an agent
//! reached over the network requires; on its Unix socket the socket's mode decides instead.
//!
//! Everything the control plane does to a VM goes through this trait, so the control plane can
//! run on another machine than its agents, and ring-2 tests can stand in a test double.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::{
    BuildTemplateEvent, BuildTemplateRequest, CreateRequest, CreateResponse, DeleteSnapshotRequest,
    DeleteSnapshotResponse, HostInfoRequest, HostInfoResponse, KillRequest, KillResponse,
    ListRequest, ListResponse, LogEntry, LogsRequest, MetricsRequest, MetricsResponse,
    PauseRequest, PauseResponse, ReleaseTemplateRequest, ReleaseTemplateResponse, ResumeRequest,
    ResumeResponse, SetTimeoutRequest, SetTimeoutResponse, SnapshotRequest, SnapshotResponse,
    UpdateNetworkRequest, UpdateNetworkResponse,
};
use wrenn_connect::{BoxStream, Client, ConnectError};

use crate::store::HostRecord;
use crate::tokens;

/// The longest a template build's event stream stays open.
const BUILD_STREAM_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// The agent RPC, one method per procedure of `wrenn.agent.v1.AgentService`.
#[async_trait]
pub trait AgentClient: Send + Sync {
    async fn create(&self, req: CreateRequest) -> Result<CreateResponse, ConnectError>;
    async fn list(&self, req: ListRequest) -> Result<ListResponse, ConnectError>;
    async fn kill(&self, req: KillRequest) -> Result<KillResponse, ConnectError>;
    async fn pause(&self, req: PauseRequest) -> Result<PauseResponse, ConnectError>;
    async fn resume(&self, req: ResumeRequest) -> Result<ResumeResponse, ConnectError>;
    async fn set_timeout(&self, req: SetTimeoutRequest)
    -> Result<SetTimeoutResponse, ConnectError>;
    async fn update_network(
        &self,
        req: UpdateNetworkRequest,
    ) -> Result<UpdateNetworkResponse, ConnectError>;
    async fn metrics(&self, req: MetricsRequest) -> Result<MetricsResponse, ConnectError>;
    /// The log lines up to now (`follow` is ignored here: the REST API returns a page).
    async fn logs(&self, req: LogsRequest) -> Result<Vec<LogEntry>, ConnectError>;
    /// Captures a running or paused sandbox as a snapshot; the sandbox ends as it was.
    async fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotResponse, ConnectError>;
    /// No more creates from the snapshot; the host removes its files once nothing is layered
    /// on it.
    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, ConnectError>;
    async fn host_info(&self, req: HostInfoRequest) -> Result<HostInfoResponse, ConnectError>;
    /// Starts a template build; its events until `done` or `failed`.
    async fn build_template(
        &self,
        req: BuildTemplateRequest,
    ) -> Result<BoxStream<BuildTemplateEvent>, ConnectError>;
    /// Releases a built template the control plane no longer starts sandboxes from.
    async fn release_template(
        &self,
        req: ReleaseTemplateRequest,
    ) -> Result<ReleaseTemplateResponse, ConnectError>;
}

/// Makes the client for a host (over the network in production; a test double in tests).
pub trait AgentConnector: Send + Sync {
    /// A client for the agent at `rpc_url` that presents `secret` (the host's agent secret).
    fn connect(&self, rpc_url: &str, secret: &str) -> Result<Arc<dyn AgentClient>, ConnectError>;
}

/// [`AgentClient`] over Connect (JSON codec, so agent traffic is readable in captures).
#[derive(Debug, Clone)]
pub struct ConnectAgentClient {
    /// Quick calls (everything but create/resume/pause/snapshot).
    quick: Client,
    /// Calls that start, restore or snapshot a VM; cold paths under TCG take seconds.
    slow: Client,
    /// Template builds: a stream as long as the build (steps may run for an hour each).
    builds: Client,
}

impl ConnectAgentClient {
    /// A client for the agent at `rpc_url` (`http://…` or `unix:/path`) that sends `secret`
    /// as `Authorization: Bearer` on every call.
    pub fn new(rpc_url: &str, secret: &str) -> Result<Self, ConnectError> {
        let bearer = http::HeaderValue::from_str(&format!("Bearer {secret}")).map_err(|_| {
            ConnectError::invalid_argument("the agent secret is not a header value")
        })?;
        let base = Client::new(rpc_url)
            .map_err(|e| ConnectError::invalid_argument(e.to_string()))?
            .with_header(http::header::AUTHORIZATION, bearer);
        Ok(ConnectAgentClient {
            quick: base.clone().with_timeout(Duration::from_secs(15)),
            slow: base.clone().with_timeout(Duration::from_secs(120)),
            builds: base.with_timeout(BUILD_STREAM_TIMEOUT),
        })
    }
}

#[async_trait]
impl AgentClient for ConnectAgentClient {
    async fn create(&self, req: CreateRequest) -> Result<CreateResponse, ConnectError> {
        self.slow.unary(paths::CREATE, &req).await
    }
    async fn list(&self, req: ListRequest) -> Result<ListResponse, ConnectError> {
        self.quick.unary(paths::LIST, &req).await
    }
    async fn kill(&self, req: KillRequest) -> Result<KillResponse, ConnectError> {
        self.quick.unary(paths::KILL, &req).await
    }
    async fn pause(&self, req: PauseRequest) -> Result<PauseResponse, ConnectError> {
        self.slow.unary(paths::PAUSE, &req).await
    }
    async fn resume(&self, req: ResumeRequest) -> Result<ResumeResponse, ConnectError> {
        self.slow.unary(paths::RESUME, &req).await
    }
    async fn set_timeout(
        &self,
        req: SetTimeoutRequest,
    ) -> Result<SetTimeoutResponse, ConnectError> {
        self.quick.unary(paths::SET_TIMEOUT, &req).await
    }
    async fn update_network(
        &self,
        req: UpdateNetworkRequest,
    ) -> Result<UpdateNetworkResponse, ConnectError> {
        self.quick.unary(paths::UPDATE_NETWORK, &req).await
    }
    async fn metrics(&self, req: MetricsRequest) -> Result<MetricsResponse, ConnectError> {
        self.quick.unary(paths::METRICS, &req).await
    }
    async fn logs(&self, mut req: LogsRequest) -> Result<Vec<LogEntry>, ConnectError> {
        req.follow = false;
        let stream = self
            .quick
            .server_stream::<_, LogEntry>(paths::LOGS, &req)
            .await?;
        stream.try_collect().await
    }
    async fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotResponse, ConnectError> {
        self.slow.unary(paths::SNAPSHOT, &req).await
    }
    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, ConnectError> {
        self.quick.unary(paths::DELETE_SNAPSHOT, &req).await
    }
    async fn host_info(&self, req: HostInfoRequest) -> Result<HostInfoResponse, ConnectError> {
        self.quick.unary(paths::HOST_INFO, &req).await
    }
    async fn build_template(
        &self,
        req: BuildTemplateRequest,
    ) -> Result<BoxStream<BuildTemplateEvent>, ConnectError> {
        self.builds.server_stream(paths::BUILD_TEMPLATE, &req).await
    }
    async fn release_template(
        &self,
        req: ReleaseTemplateRequest,
    ) -> Result<ReleaseTemplateResponse, ConnectError> {
        self.quick.unary(paths::RELEASE_TEMPLATE, &req).await
    }
}

/// The default connector: Connect over plain HTTP.
#[derive(Debug, Default)]
pub struct ConnectConnector;

impl AgentConnector for ConnectConnector {
    fn connect(&self, rpc_url: &str, secret: &str) -> Result<Arc<dyn AgentClient>, ConnectError> {
        Ok(Arc::new(ConnectAgentClient::new(rpc_url, secret)?))
    }
}

type CachedClient = (String, Arc<dyn AgentClient>);

/// One client per host, made on first use and kept (its connection pool with it).
pub struct Agents {
    connector: Arc<dyn AgentConnector>,
    /// The server secret, which the agents' secrets derive from.
    secret: Vec<u8>,
    /// Host ID -> (RPC URL the client was made for, client).
    clients: Mutex<HashMap<String, CachedClient>>,
}

impl Agents {
    pub fn new(connector: Arc<dyn AgentConnector>, secret: Vec<u8>) -> Self {
        Agents {
            connector,
            secret,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `host`; a new one if the host's RPC URL changed.
    pub fn client(&self, host: &HostRecord) -> Result<Arc<dyn AgentClient>, ConnectError> {
        let mut clients = self.clients.lock().expect("agents lock");
        if let Some((url, c)) = clients.get(host.id.as_str())
            && *url == host.rpc_url
        {
            return Ok(c.clone());
        }
        let c = self
            .connector
            .connect(&host.rpc_url, &self.secret_of(host.id.as_str()))?;
        clients.insert(
            host.id.as_str().to_owned(),
            (host.rpc_url.clone(), c.clone()),
        );
        Ok(c)
    }

    /// A client for host `host_id`, not registered yet (registration asks it for its info).
    pub fn connect(
        &self,
        host_id: &str,
        rpc_url: &str,
    ) -> Result<Arc<dyn AgentClient>, ConnectError> {
        self.connector.connect(rpc_url, &self.secret_of(host_id))
    }

    /// The secret host `host_id`'s agent requires.
    pub fn secret_of(&self, host_id: &str) -> String {
        tokens::agent_secret(&self.secret, host_id)
    }
}
