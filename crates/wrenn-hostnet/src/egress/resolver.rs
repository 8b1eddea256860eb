//! The slot's DNS resolver at [`EGRESS_IP`](super::EGRESS_IP):53, UDP and TCP, where the slot
//! firewall redirects every DNS query of the guest.
//!
//! A query for a name the policy does not resolve (internet off, or everything denied and the
//! name not allowed) is answered REFUSED without anything leaving the host, so a locked-down
//! guest cannot tunnel data out through DNS. Others are forwarded upstream (see
//! [`super::upstream`]) and the answer relayed with the guest's ID, truncation and all;
//! SERVFAIL when upstream fails or is too slow. The A records an answer gives a name are
//! learned (see [`super::learned`]), and reported when the policy allows the name.
//!
//! Everything a guest controls is bounded: queries in flight, TCP connections, message sizes
//! and how long a TCP connection may idle.

use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use super::learned::normalize;
use super::upstream::{MAX_UDP_PAYLOAD, Transport, UpstreamError};
use super::{Shared, serve_bounded};

/// Largest query accepted (real ones are well under 512 bytes).
const MAX_QUERY: usize = 4096;
/// TCP connections served at once per slot; more wait in the kernel's backlog.
const MAX_TCP_CONNECTIONS: usize = 16;
/// A TCP connection with no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// A query's bytes, once its length arrived, must follow within this.
const TCP_READ: Duration = Duration::from_secs(2);

/// Serves UDP queries until the task is aborted (which drops every query task with it).
pub(crate) async fn serve_udp(sock: UdpSocket, shared: Arc<Shared>) {
    let sock = Arc::new(sock);
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (n, peer) = tokio::select! {
            got = sock.recv_from(&mut buf) => match got {
                Ok(got) => got,
                Err(error) => {
                    tracing::warn!(%error, "egress resolver: UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        if n > MAX_QUERY {
            continue;
        }
        // A guest that floods queries loses the surplus, as it would on a real network.
        let Ok(permit) = shared.dns_inflight.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "egress resolver: too many queries in flight; dropped one");
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, shared) = (sock.clone(), shared.clone());
        tasks.spawn(
            async move {
                let _permit = permit;
                if let Some(answer) = answer(&shared, &query, Transport::Udp).await
                    && let Err(error) = sock.send_to(&answer, peer).await
                {
                    tracing::debug!(%peer, %error, "egress resolver: could not answer");
                }
            }
            .in_current_span(),
        );
    }
}

/// Serves TCP connections until the task is aborted.
pub(crate) async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    serve_bounded(
        listener,
        MAX_TCP_CONNECTIONS,
        "egress resolver",
        move |stream, peer| {
            let shared = shared.clone();
            async move {
                if let Err(error) = serve_connection(stream, &shared).await {
                    tracing::debug!(%peer, %error, "egress resolver: TCP connection ended");
                }
            }
        },
    )
    .await;
}

/// Answers the queries of one TCP connection in turn, until it closes, idles or misbehaves.
async fn serve_connection(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Err(_) => return Ok(()), // idle: close
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(len) => usize::from(len?),
        };
        if len == 0 || len > MAX_QUERY {
            return Err(std::io::Error::other(format!("query of {len} bytes")));
        }
        let mut query = vec![0u8; len];
        tokio::time::timeout(TCP_READ, stream.read_exact(&mut query))
            .await
            .map_err(|_| timed_out())??;
        let permit = tokio::time::timeout(TCP_READ, shared.dns_inflight.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(std::io::Error::other)?;
        let reply = answer(shared, &query, Transport::Tcp).await;
        drop(permit);
        let Some(reply) = reply else { continue };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return Err(std::io::Error::other("answer too long for TCP"));
        };
        let mut framed = reply_len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        tokio::time::timeout(TCP_IDLE, stream.write_all(&framed))
            .await
            .map_err(|_| timed_out())??;
    }
}

/// The answer to one query message; `None` when it deserves none (not a query at all).
pub(crate) async fn answer(shared: &Shared, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let query = match Message::from_vec(bytes) {
        Ok(q) => q,
        // With at least a header, the guest can be told; without, it cannot be answered.
        Err(_) if bytes.len() >= 12 && bytes[2] & 0x80 == 0 => {
            return reply(&refusal(
                u16::from_be_bytes([bytes[0], bytes[1]]),
                ResponseCode::FormErr,
            ));
        }
        Err(_) => return None,
    };
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let code = if query.metadata.op_code != OpCode::Query {
        ResponseCode::NotImp
    } else if query.queries.len() != 1 {
        ResponseCode::FormErr
    } else {
        return forward(shared, &query, transport).await;
    };
    reply(&error_answer(&query, code))
}

/// Forwards a well-formed query (or refuses it) and relays the answer.
async fn forward(shared: &Shared, query: &Message, transport: Transport) -> Option<Vec<u8>> {
    let name = normalize(query.queries[0].name());
    if !shared.policy().resolves(&name) {
        tracing::debug!(%name, "egress resolver: refused");
        return reply(&error_answer(query, ResponseCode::Refused));
    }
    let answer = match shared.upstream.forward(query, transport).await {
        Ok(answer) => answer,
        Err(error) => {
            match &error {
                UpstreamError::Timeout => {
                    tracing::debug!(%name, "egress resolver: upstream timed out")
                }
                _ => {
                    tracing::debug!(%name, error = %crate::egress::chain(&error), "egress resolver: upstream failed")
                }
            }
            return reply(&error_answer(query, ResponseCode::ServFail));
        }
    };
    // The policy may have changed while upstream thought.
    let policy = shared.policy();
    if !policy.resolves(&name) {
        return reply(&error_answer(query, ResponseCode::Refused));
    }
    shared.learn(&policy, &name, &answer.message);
    let mut raw = answer.raw;
    raw[..2].copy_from_slice(&query.metadata.id.to_be_bytes());
    if transport == Transport::Udp && raw.len() > udp_limit(query) {
        // Upstream ignored the size we asked for: the guest gets TC and asks again over TCP.
        let mut cut = answer.message.truncate();
        cut.metadata.id = query.metadata.id;
        return reply(&cut);
    }
    Some(raw)
}

/// The largest UDP answer the guest said it takes.
fn udp_limit(query: &Message) -> usize {
    query
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload().max(512)))
}

/// An answer with `code` and no records, echoing the query's question and flags.
fn error_answer(query: &Message, code: ResponseCode) -> Message {
    let mut m = refusal(query.metadata.id, code);
    m.metadata.op_code = query.metadata.op_code;
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.checking_disabled = query.metadata.checking_disabled;
    m.add_queries(query.queries.iter().take(1).cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// A bare answer with `code`.
fn refusal(id: u16, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(id, OpCode::Query, code);
    m.metadata.recursion_available = true;
    m
}

fn reply(m: &Message) -> Option<Vec<u8>> {
    match m.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            tracing::warn!(%error, "egress resolver: could not encode an answer");
            None
        }
    }
}
