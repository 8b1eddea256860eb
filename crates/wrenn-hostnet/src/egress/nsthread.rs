//! A thread of a slot's egress services that lives inside the slot's network namespace and
//! makes sockets there: the listeners, and a socket for each connection the proxy makes on a
//! guest's behalf, so that connection leaves through the slot's own firewall and NAT like the
//! guest's traffic does. Sockets belong to the namespace they were made in for good; the
//! agent's runtime drives them afterwards without ever entering a namespace itself.
//!
//! The thread only runs short jobs (a `socket`/`bind` or two) and ends once the last handle
//! to it is dropped.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::mpsc;

use crate::netns;

/// A job the thread runs.
type Job = Box<dyn FnOnce() + Send>;

/// A handle to the thread; cheap to share (`Sync`).
#[derive(Debug)]
pub(crate) struct NsThread {
    jobs: mpsc::Sender<Job>,
}

impl NsThread {
    /// Starts the thread and has it enter the namespace at `netns`.
    pub(crate) async fn start(netns: &Path) -> io::Result<Self> {
        let ns = File::open(netns)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, entered) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("wrenn-egress-ns".into())
            // Its jobs are a few syscalls; the default 2 MiB per slot would be waste.
            .stack_size(128 * 1024)
            .spawn(move || {
                let result = netns::enter(&ns);
                drop(ns);
                let ok = result.is_ok();
                let _ = ready.send(result);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })?;
        entered
            .await
            .map_err(|_| io::Error::other("egress namespace thread died"))??;
        Ok(Self { jobs })
    }

    /// Runs `f` on the thread (inside the namespace) and returns what it returned.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("egress namespace thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("egress namespace thread dropped a job"))
    }

    /// A fresh, unconnected IPv4 TCP socket in the namespace.
    pub(crate) async fn tcp_socket(&self) -> io::Result<tokio::net::TcpSocket> {
        // `TcpSocket::new_v4` is only `socket(2)`: it needs no runtime, so it can run here.
        self.run(tokio::net::TcpSocket::new_v4).await?
    }
}
