//! Forwards the guest's external address to listeners bound only to loopback.
//!
//! Every second a scanner reads `/proc/net/tcp` and `/proc/net/tcp6` (never `/proc/<pid>/fd`
//! of other processes) and finds LISTEN sockets bound to 127.0.0.0/8, `::1` or
//! `::ffff:127.x.y.z`. For each one it binds `<forward address>:<port>` and pipes accepted
//! connections to the loopback listener with tokio; no process per port. Forwarders are keyed
//! by socket inode, so a listener that is closed and reopened on the same port gets a fresh
//! forwarder, and an entry is deleted as soon as its listener is missing from a scan (the
//! stale-entry bug of e2b infra#3514).
//!
//! Policy: listeners bound to `0.0.0.0`/`::` are already reachable and are left alone; listeners
//! bound to loopback become reachable from outside the guest through the forward address, as
//! upstream envd does (a server the user thought private is exposed to whoever holds the
//! sandbox's traffic token). envd's own sockets and listeners on the forward address itself
//! are skipped.
//!
//! Start/stop go through one lifecycle: each run owns a cancellation token (forwarders get
//! child tokens) and a task tracker; [`PortForwarder::stop`] cancels and waits for every task,
//! and a new run first waits for the previous one to end, so a port is never bound twice.

mod forward;
mod proc_net;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use proc_net::Listener;

/// How often the socket tables are read.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Concurrent forwarded connections across all ports (each holds two 8 KiB buffers).
const MAX_CONNECTIONS: usize = 4096;
const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// The port subsystem: a scanner of `/proc/net/tcp{,6}` and in-process forwarders.
pub struct PortForwarder {
    /// `None` when forwarding is disabled.
    external: Option<IpAddr>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    current: Option<Run>,
    /// The tracker of the last stopped run; its tasks may still be winding down.
    previous: Option<TaskTracker>,
}

struct Run {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl PortForwarder {
    pub fn new(config: &Config) -> Self {
        PortForwarder {
            external: (!config.no_port_forward).then_some(config.forward_address),
            state: Mutex::new(State::default()),
        }
    }
}

impl PortForwarder {
    /// Starts scanning (no-op when disabled or already running).
    ///
    /// Must be called inside the tokio runtime; outside it, logs and does nothing.
    pub fn start(&self) {
        let Some(external) = self.external else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("port forwarder started outside the async runtime; not forwarding");
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.current.is_some() {
            return;
        }
        let run = Run {
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let previous = state.previous.take();
        let shared = forward::Shared {
            tracker: run.tracker.clone(),
            run: run.token.clone(),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        };
        run.tracker
            .spawn_on(scan_loop(external, previous, shared), &handle);
        tracing::info!(%external, "port forwarder started");
        state.current = Some(run);
    }

    /// Stops scanning and every forwarder and forwarded connection; returns when they are gone.
    pub async fn stop(&self) {
        let tracker = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match state.current.take() {
                Some(run) => {
                    run.token.cancel();
                    run.tracker.close();
                    state.previous = Some(run.tracker.clone());
                    run.tracker
                }
                // Already stopped; a concurrent stop may still be waiting, so wait too.
                None => match &state.previous {
                    Some(t) => t.clone(),
                    None => return,
                },
            }
        };
        tracker.wait().await;
        tracing::info!("port forwarder stopped");
    }

    /// Whether a run is active (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .is_some()
    }
}

/// A forwarder for one listener inode.
struct Active {
    port: u16,
    token: CancellationToken,
    task: JoinHandle<()>,
}

async fn scan_loop(external: IpAddr, previous: Option<TaskTracker>, shared: forward::Shared) {
    // Stop before start: the previous run's forwarders must have released their ports.
    if let Some(p) = previous {
        p.wait().await;
    }
    let mut scanner = Scanner {
        external,
        shared,
        active: HashMap::new(),
        own: HashSet::new(),
        failed: HashSet::new(),
    };
    let mut tick = tokio::time::interval(SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = scanner.shared.run.cancelled() => break,
            _ = tick.tick() => {}
        }
        match tokio::task::spawn_blocking(read_tables).await {
            Ok(listeners) => scanner.reconcile(listeners).await,
            Err(e) => tracing::warn!(error = %e, "socket table scan failed"),
        }
    }
    // The forwarders' tokens are children of the run token and are cancelled already; the
    // tracker waits for them.
}

struct Scanner {
    external: IpAddr,
    shared: forward::Shared,
    active: HashMap<u64, Active>,
    /// Inodes of envd's own listening sockets (its API server), never forwarded.
    own: HashSet<u64>,
    /// Inodes whose external bind failed; logged once, retried every scan.
    failed: HashSet<u64>,
}

impl Scanner {
    async fn reconcile(&mut self, listeners: Vec<Listener>) {
        let candidates: Vec<Listener> = listeners
            .into_iter()
            .filter(|l| {
                proc_net::is_loopback(l.addr) && proc_net::canonical(l.addr) != self.external
            })
            .collect();
        let present: HashSet<u64> = candidates.iter().map(|l| l.inode).collect();

        // Remove first and wait, so a reopened listener's port is free to bind again.
        let gone: Vec<u64> = self
            .active
            .keys()
            .copied()
            .filter(|i| !present.contains(i))
            .collect();
        for inode in gone {
            if let Some(a) = self.active.remove(&inode) {
                a.token.cancel();
                let _ = a.task.await;
                tracing::info!(port = a.port, inode, "listener gone; forwarder stopped");
            }
        }
        self.own.retain(|i| present.contains(i));
        self.failed.retain(|i| present.contains(i));

        let new: Vec<Listener> = candidates
            .into_iter()
            .filter(|l| !self.active.contains_key(&l.inode) && !self.own.contains(&l.inode))
            .collect();
        if new.is_empty() {
            return;
        }
        // Only when something new appears: which of these sockets are envd's own?
        if let Ok(own) = tokio::task::spawn_blocking(own_socket_inodes).await {
            self.own
                .extend(new.iter().map(|l| l.inode).filter(|i| own.contains(i)));
        }
        for l in new {
            if self.own.contains(&l.inode) {
                continue;
            }
            // 127.0.0.1:P and ::1:P can both listen; one external port forwards to the first.
            if self.active.values().any(|a| a.port == l.port) {
                continue;
            }
            self.add(l);
        }
    }

    fn add(&mut self, l: Listener) {
        let external = SocketAddr::new(self.external, l.port);
        let target = SocketAddr::new(proc_net::canonical(l.addr), l.port);
        match forward::bind(external) {
            Ok(listener) => {
                self.failed.remove(&l.inode);
                let token = self.shared.run.child_token();
                let task = self.shared.tracker.spawn(forward::run(
                    listener,
                    target,
                    token.clone(),
                    self.shared.clone(),
                ));
                tracing::info!(%external, %target, inode = l.inode, "forwarding");
                self.active.insert(
                    l.inode,
                    Active {
                        port: l.port,
                        token,
                        task,
                    },
                );
            }
            Err(e) => {
                if self.failed.insert(l.inode) {
                    tracing::warn!(%external, %target, error = %e, "cannot bind the forward address; will retry");
                }
            }
        }
    }
}

fn read_tables() -> Vec<Listener> {
    let mut out = Vec::new();
    for path in TABLES {
        match std::fs::read_to_string(path) {
            Ok(text) => out.extend(proc_net::parse_listeners(&text)),
            // tcp6 is absent when the kernel has no IPv6.
            Err(e) => tracing::trace!(path, error = %e, "socket table unreadable"),
        }
    }
    out
}

/// Socket inodes among envd's own file descriptors (`socket:[N]` links in `/proc/self/fd`).
fn own_socket_inodes() -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let s = target.to_str()?;
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_socket_inodes_sees_our_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let inode = read_tables()
            .into_iter()
            .find(|x| x.port == port)
            .unwrap()
            .inode;
        assert!(own_socket_inodes().contains(&inode));
    }

    #[tokio::test]
    async fn disabled_forwarder_never_runs() {
        let cfg = Config::for_tests();
        let f = PortForwarder::new(&cfg);
        f.start();
        assert!(!f.is_running());
        f.stop().await;
    }

    #[tokio::test]
    async fn start_stop_restart() {
        use clap::Parser;
        let cfg = Config::parse_from(["envd", "--no-cgroups", "--forward-address", "127.0.0.9"]);
        let f = PortForwarder::new(&cfg);
        for _ in 0..3 {
            f.start();
            f.start();
            assert!(f.is_running());
            f.stop().await;
            assert!(!f.is_running());
            f.stop().await;
        }
    }
}
