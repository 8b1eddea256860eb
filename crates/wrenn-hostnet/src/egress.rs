//! A slot's egress services, which make domain rules work ([`EgressServices`]): a DNS
//! resolver and a filtering proxy, both listening inside the slot's namespace at the guest's
//! gateway ([`EGRESS_IP`]), where the slot firewall redirects the guest's DNS queries (all of
//! them, to port 53) and, when its policy has domain rules, its new TCP connections
//! to ports 80 and 443 (to [`PROXY_PORT`]).
//!
//! - The resolver (`resolver`) answers REFUSED for names the policy does not resolve, forwards
//!   the rest upstream from the host's namespace, and learns the addresses in the answers;
//!   those of names the policy allows are reported through the `on_learned` callback, for the
//!   firewall to let through on other ports.
//! - The proxy (`proxy`) judges each connection by its destination and the name in its TLS
//!   SNI or HTTP `Host` (believed only for an address the name resolves to), then resets it
//!   or relays it, unchanged, from a socket inside the slot's namespace.
//!
//! The listening sockets and the proxy's outgoing sockets are made on a thread that lives in
//! the slot's namespace (`nsthread`); everything is served from the caller's tokio runtime,
//! whose threads stay in the host's namespace (so the upstream resolver is asked from there).

mod learned;
mod nsthread;
mod proxy;
mod resolver;
mod sniff;
mod upstream;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument as _;
use wrenn_core::EgressPolicy;

use learned::{Learned, Lookups, answer_addresses, clamp_ttl};
use nsthread::NsThread;
use upstream::Upstream;

use crate::firewall::{DNS_PORT, PROXY_PORT};

/// Where the services listen inside the slot: the tap's address, the guest's gateway.
pub const EGRESS_IP: Ipv4Addr = crate::slot::TAP_IP;
/// DNS queries (UDP and TCP, and the proxy's own lookups) in flight at once per slot.
const MAX_DNS_IN_FLIGHT: usize = 64;

/// Called with addresses (and how long they stay valid: the answer's TTL, clamped to 30 s ..
/// 1 h) that a name the policy allows resolved to. It runs on a runtime task: it must not
/// block.
pub type OnLearned = Arc<dyn Fn(&[(Ipv4Addr, Duration)]) + Send + Sync>;

/// Settings of a slot's egress services.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Where guests' queries are forwarded, asked from the host's namespace.
    pub upstream_dns: SocketAddr,
    /// How long upstream may take to answer one query before the guest gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// How long a proxied connection's first bytes (up to the name) may take; after that it
    /// is judged by its address alone.
    pub first_bytes_timeout: Duration,
    /// How long connecting to a proxied connection's destination may take.
    pub connect_timeout: Duration,
}

impl EgressConfig {
    /// The defaults (3 s upstream, 5 s first bytes, 10 s connect) with `upstream_dns`.
    pub fn new(upstream_dns: SocketAddr) -> Self {
        Self {
            upstream_dns,
            upstream_timeout: Duration::from_secs(3),
            first_bytes_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the egress services could not start.
#[derive(Debug, thiserror::Error)]
pub enum EgressServicesError {
    /// Entering the namespace, binding or registering a socket failed.
    #[error("egress services in {netns}: {what}")]
    Start {
        /// The namespace file.
        netns: String,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A slot's running resolver and proxy. Dropping it stops both: every task is aborted, which
/// closes their sockets (listeners and proxied connections alike).
pub struct EgressServices {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EgressServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressServices")
            .field("netns", &self.shared.netns)
            .field("upstream", &self.shared.upstream.addr)
            .finish_non_exhaustive()
    }
}

/// What the services' tasks share.
pub(crate) struct Shared {
    netns: String,
    pub(crate) cfg: EgressConfig,
    policy: RwLock<Arc<EgressPolicy>>,
    pub(crate) learned: Mutex<Learned>,
    pub(crate) lookups: Mutex<Lookups>,
    pub(crate) dns_inflight: Arc<Semaphore>,
    pub(crate) upstream: Upstream,
    on_learned: OnLearned,
    pub(crate) conns: proxy::Registry,
    pub(crate) ns: NsThread,
}

impl EgressServices {
    /// Starts the resolver (UDP and TCP) and the proxy inside the namespace at `netns`
    /// (`/run/netns/<name>`, which must have [`EGRESS_IP`] on an interface), under `policy`.
    /// On an error nothing is left running.
    pub async fn start(
        netns: &Path,
        cfg: EgressConfig,
        policy: Arc<EgressPolicy>,
        on_learned: OnLearned,
    ) -> Result<Self, EgressServicesError> {
        let name = netns.file_name().map_or_else(
            || netns.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let err = |what: &'static str| {
            let netns = netns.display().to_string();
            move |source| EgressServicesError::Start {
                netns,
                what,
                source,
            }
        };
        let ns = NsThread::start(netns)
            .await
            .map_err(err("enter the namespace"))?;
        let (udp, dns_tcp, proxy_tcp) = ns
            .run(bind_all)
            .await
            .map_err(err("run the namespace thread"))?
            .map_err(err("bind"))?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(err("register"))?;
        let dns_tcp = TcpListener::from_std(dns_tcp).map_err(err("register"))?;
        let proxy_tcp = TcpListener::from_std(proxy_tcp).map_err(err("register"))?;
        let shared = Arc::new(Shared {
            netns: name.clone(),
            upstream: Upstream {
                addr: cfg.upstream_dns,
                timeout: cfg.upstream_timeout,
            },
            cfg,
            policy: RwLock::new(policy),
            learned: Mutex::default(),
            lookups: Mutex::default(),
            dns_inflight: Arc::new(Semaphore::new(MAX_DNS_IN_FLIGHT)),
            on_learned,
            conns: proxy::Registry::default(),
            ns,
        });
        let span = tracing::info_span!("egress", netns = %name);
        let tasks = vec![
            tokio::spawn(resolver::serve_udp(udp, shared.clone()).instrument(span.clone())),
            tokio::spawn(resolver::serve_tcp(dns_tcp, shared.clone()).instrument(span.clone())),
            tokio::spawn(proxy::serve(proxy_tcp, shared.clone()).instrument(span)),
        ];
        tracing::debug!(netns = %name, upstream = %shared.upstream.addr, "egress services started");
        Ok(Self { shared, tasks })
    }

    /// Replaces the policy. Proxied connections the new one denies are reset at once, and
    /// `on_learned` is called (before this returns) with every unexpired learned address of
    /// a name the new policy allows, so a caller that emptied its address set before calling
    /// this has it complete again.
    pub fn set_policy(&self, policy: Arc<EgressPolicy>) {
        let s = &self.shared;
        *s.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
        let closed = s.conns.reevaluate(&policy, &s.learned, &s.lookups);
        if closed > 0 {
            tracing::info!(netns = %s.netns, closed, "egress: a new policy closed proxied connections");
        }
        let allowed = self.allowed_addresses();
        if !allowed.is_empty() {
            (s.on_learned)(&allowed);
        }
    }

    /// Readies the services for the next sandbox in the slot: `policy` in force, every
    /// proxied connection reset, and nothing learned kept (no `on_learned` call follows).
    pub fn reset(&self, policy: Arc<EgressPolicy>) {
        let s = &self.shared;
        *s.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
        lock(&s.learned).clear();
        *lock(&s.lookups) = Lookups::default();
        let closed = s.conns.close_all();
        tracing::debug!(netns = %s.netns, closed, "egress services reset");
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<EgressPolicy> {
        self.shared.policy()
    }

    /// Every unexpired learned address of a name the current policy allows, with the time it
    /// has left (what `on_learned` reported and still holds).
    pub fn allowed_addresses(&self) -> Vec<(Ipv4Addr, Duration)> {
        let policy = self.shared.policy();
        lock(&self.shared.learned).allowed(&policy, Instant::now())
    }

    /// How many connections the proxy is relaying or judging.
    pub fn proxied_connections(&self) -> usize {
        self.shared.conns.len()
    }
}

impl Drop for EgressServices {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Shared {
    pub(crate) fn policy(&self) -> Arc<EgressPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Learns the addresses `answer` gives `name`; reports them if `policy` allows the name.
    pub(crate) fn learn(&self, policy: &EgressPolicy, name: &str, answer: &Message) {
        let addrs: Vec<(Ipv4Addr, Duration)> = answer_addresses(answer, name)
            .into_iter()
            .map(|(ip, ttl)| (ip, clamp_ttl(ttl)))
            .collect();
        if addrs.is_empty() {
            return;
        }
        let changed = lock(&self.learned).record(name, &addrs, Instant::now());
        if policy.allows_name(name) && !changed.is_empty() {
            tracing::debug!(name, addrs = ?changed, "egress resolver: learned");
            (self.on_learned)(&changed);
        }
    }
}

/// The three listening sockets, made on the namespace thread.
fn bind_all() -> std::io::Result<(
    std::net::UdpSocket,
    std::net::TcpListener,
    std::net::TcpListener,
)> {
    let udp = std::net::UdpSocket::bind((EGRESS_IP, DNS_PORT))?;
    let dns = std::net::TcpListener::bind((EGRESS_IP, DNS_PORT))?;
    let proxy = std::net::TcpListener::bind((EGRESS_IP, PROXY_PORT))?;
    for fd in [
        udp.set_nonblocking(true),
        dns.set_nonblocking(true),
        proxy.set_nonblocking(true),
    ] {
        fd?;
    }
    Ok((udp, dns, proxy))
}

/// Serves `listener` until the task is aborted (which drops every connection): each accepted
/// connection gets its own task running `handle`, at most `max` at once (an accept waits for
/// one to end). Finished tasks are reaped while waiting, so a long-lived listener's set does
/// not grow with every connection it ever had. `what` names the service in logs.
pub(crate) async fn serve_bounded<F, Fut>(
    listener: TcpListener,
    max: usize,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max));
    let mut tasks = JoinSet::new();
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let accepted = loop {
            tokio::select! {
                accepted = listener.accept() => break accepted,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = handle(stream, peer);
        tasks.spawn(
            async move {
                let _permit = permit;
                conn.await;
            }
            .in_current_span(),
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error with its causes, for one log field.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
