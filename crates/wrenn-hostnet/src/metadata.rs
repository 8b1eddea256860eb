//! The per-slot metadata endpoint (the role Firecracker's MMDS plays).
//!
//! Each slot gets a tiny HTTP server listening on [`METADATA_IP`]`:`[`METADATA_PORT`] *inside*
//! the slot's network namespace (the address sits on the namespace's loopback). Only that
//! namespace can reach it: other slots have their own namespace and their own listener at the
//! same address, the host has no route into it, and the slot firewall lets only the guest's
//! address in from the tap. It serves one JSON document for the sandbox currently in the slot:
//! `{"instanceID", "envID", "accessTokenHash"}`; envd reads it on `/init` and only accepts the
//! token whose SHA-512 matches. With no sandbox assigned it answers 404.
//!
//! The listening socket is created on a thread that entered the namespace (`setns`); the socket
//! stays in that namespace and is then served from the agent's tokio runtime.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::netns::in_netns_async;
use crate::slot::{GUEST_IP, METADATA_IP, METADATA_PORT};

/// A request's headers must arrive within this (a hung guest must not hold a task).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once per slot; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 8;

/// Why the metadata endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// Entering the namespace or binding the socket failed.
    #[error("metadata endpoint in {netns}: {what}")]
    Bind {
        /// The namespace file.
        netns: String,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The document a guest reads. Field names are the ones envd (and E2B's envd) expect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The sandbox id.
    #[serde(rename = "instanceID")]
    pub instance_id: String,
    /// The template id.
    #[serde(rename = "envID")]
    pub env_id: String,
    /// Lowercase hex SHA-512 of the sandbox's envd access token (of `""` without one).
    #[serde(rename = "accessTokenHash")]
    pub access_token_hash: String,
}

impl Metadata {
    /// The document for a sandbox; the token itself never leaves the host, only its hash.
    pub fn new(sandbox_id: &str, template_id: &str, access_token: Option<&str>) -> Self {
        Self {
            instance_id: sandbox_id.to_owned(),
            env_id: template_id.to_owned(),
            access_token_hash: token_hash(access_token.unwrap_or("")),
        }
    }
}

/// Lowercase hex SHA-512 of `token`.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha512::digest(token.as_bytes()))
}

/// A running metadata endpoint. Dropping it stops serving (the socket closes).
#[derive(Debug)]
pub struct MetadataServer {
    doc: Arc<RwLock<Option<Metadata>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MetadataServer {
    /// Starts serving inside the namespace at `netns` (`/run/netns/<name>`), with no sandbox
    /// assigned. The socket is made on a thread of its own that enters the namespace; it is
    /// served on the caller's tokio runtime.
    pub async fn start(netns: &Path) -> Result<Self, MetadataError> {
        let err = |what: &'static str| {
            let netns = netns.display().to_string();
            move |source| MetadataError::Bind {
                netns,
                what,
                source,
            }
        };
        let std_listener = in_netns_async(netns, || {
            let l = std::net::TcpListener::bind((METADATA_IP, METADATA_PORT))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .await
        .map_err(err("enter namespace"))?
        .map_err(err("bind"))?;
        let listener = TcpListener::from_std(std_listener).map_err(err("register"))?;
        let doc = Arc::new(RwLock::new(None));
        let task = tokio::spawn(serve(listener, doc.clone()));
        Ok(Self { doc, task })
    }

    /// Publishes the document for the sandbox now in the slot (`None`: the slot is free).
    pub fn set(&self, doc: Option<Metadata>) {
        *self.doc.write().unwrap_or_else(|p| p.into_inner()) = doc;
    }

    /// The document currently served.
    pub fn current(&self) -> Option<Metadata> {
        self.doc.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, doc: Arc<RwLock<Option<Metadata>>>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "metadata endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !allowed_peer(peer) {
            // The firewall already stops these; this is the second lock on the door.
            tracing::warn!(%peer, "metadata endpoint: refused a connection");
            continue;
        }
        let body = doc.read().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = answer(stream, body.as_ref()).await {
                tracing::debug!(%peer, error = %e, "metadata endpoint: request failed");
            }
        });
    }
}

/// The guest, or the namespace itself (the agent's own checks, and tests).
fn allowed_peer(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(ip) => ip == GUEST_IP || ip == METADATA_IP || ip == Ipv4Addr::LOCALHOST,
        IpAddr::V6(_) => false,
    }
}

/// Reads one request head and answers it; the connection then closes.
async fn answer(mut stream: TcpStream, doc: Option<&Metadata>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > MAX_HEAD {
                return Err(std::io::Error::other("request head too large"));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(HEADER_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let method = head.split(|b| *b == b' ').next().unwrap_or_default();
    let (status, body) = match (method, doc) {
        (b"GET", Some(doc)) => (
            "200 OK",
            serde_json::to_string(doc).map_err(std::io::Error::other)?,
        ),
        (b"GET", None) => (
            "404 Not Found",
            r#"{"message":"no sandbox in this slot"}"#.into(),
        ),
        _ => ("405 Method Not Allowed", r#"{"message":"GET only"}"#.into()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(HEADER_TIMEOUT, stream.write_all(resp.as_bytes()))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_the_token_like_envd() {
        let m = Metadata::new("sbx", "tpl", None);
        // SHA-512 of the empty string.
        assert!(
            m.access_token_hash
                .starts_with("cf83e1357eefb8bdf1542850d66d8007")
        );
        let json = serde_json::to_value(Metadata::new("sbx", "tpl", Some("t"))).unwrap();
        assert_eq!(json["instanceID"], "sbx");
        assert_eq!(json["envID"], "tpl");
        assert_eq!(json["accessTokenHash"].as_str().unwrap().len(), 128);
    }

    #[test]
    fn only_the_guest_and_the_namespace_may_ask() {
        assert!(allowed_peer(SocketAddr::from((GUEST_IP, 1234))));
        assert!(allowed_peer(SocketAddr::from((METADATA_IP, 1234))));
        assert!(!allowed_peer(SocketAddr::from(([10, 12, 0, 1], 1234))));
    }
}
