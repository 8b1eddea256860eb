//! Asking the upstream resolver, from the host's network namespace.
//!
//! The tasks that call this run on the agent's runtime, whose threads never leave the host's
//! namespace, so the sockets made here are the host's: a guest's query reaches upstream
//! through the host's own routing, never the slot's.
//!
//! A guest's query is not passed on as it came: upstream gets a fresh message with a random
//! ID, the one question, the RD and CD bits and, when the guest sent EDNS, an OPT record
//! with its payload size (at most [`MAX_UDP_PAYLOAD`]) and DO bit, and nothing else, so no
//! other section a guest filled reaches upstream. An answer counts only when it comes from
//! the upstream address (a connected socket), carries that ID and echoes that question.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

/// Largest UDP payload advertised upstream (the DNS flag day 2020 value).
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;
/// Receive buffer for UDP answers: larger ones are cut and fail to parse.
const UDP_BUFFER: usize = 4096;

/// Why upstream gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("talking to upstream")]
    Io(#[from] std::io::Error),
    #[error("encoding the upstream query")]
    Encode(#[source] hickory_proto::ProtoError),
    #[error("upstream sent a malformed answer: {0}")]
    Malformed(&'static str),
}

/// How a query travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// An answer: as upstream sent it, and parsed.
pub(crate) struct Answer {
    pub(crate) raw: Vec<u8>,
    pub(crate) message: Message,
}

/// The upstream resolver.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    pub(crate) timeout: Duration,
}

impl Upstream {
    /// Asks upstream the question of `guest` (already checked to hold exactly one).
    pub(crate) async fn forward(
        &self,
        guest: &Message,
        transport: Transport,
    ) -> Result<Answer, UpstreamError> {
        let query = clean_query(guest);
        self.exchange(&query, transport).await
    }

    /// Looks up the A records of `name` (UDP, then TCP if the answer was truncated).
    pub(crate) async fn lookup_a(&self, name: &str) -> Result<Message, UpstreamError> {
        let name =
            Name::from_ascii(name).map_err(|_| UpstreamError::Malformed("not a domain name"))?;
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(hickory_proto::op::Query::query(name, RecordType::A));
        let answer = self.exchange(&query, Transport::Udp).await?;
        if answer.message.metadata.truncation {
            return Ok(self.exchange(&query, Transport::Tcp).await?.message);
        }
        Ok(answer.message)
    }

    async fn exchange(
        &self,
        query: &Message,
        transport: Transport,
    ) -> Result<Answer, UpstreamError> {
        let bytes = query.to_vec().map_err(UpstreamError::Encode)?;
        let deadline = Instant::now() + self.timeout;
        let raw = match transport {
            Transport::Udp => self.udp(&bytes, query, deadline).await?,
            Transport::Tcp => self.tcp(&bytes, deadline).await?,
        };
        let message =
            Message::from_vec(&raw).map_err(|_| UpstreamError::Malformed("undecodable"))?;
        check(query, &message)?;
        Ok(Answer { raw, message })
    }

    async fn udp(
        &self,
        bytes: &[u8],
        query: &Message,
        deadline: Instant,
    ) -> Result<Vec<u8>, UpstreamError> {
        let local: SocketAddr = match self.addr {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local).await?;
        sock.connect(self.addr).await?;
        sock.send(bytes).await?;
        let mut buf = vec![0u8; UDP_BUFFER];
        loop {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .map_err(|_| UpstreamError::Timeout)??;
            // Stray datagrams (another ID: a late answer, or a guess) are skipped, not fatal.
            let raw = &buf[..n];
            if let Ok(m) = Message::from_vec(raw)
                && check(query, &m).is_ok()
            {
                return Ok(raw.to_vec());
            }
        }
    }

    async fn tcp(&self, bytes: &[u8], deadline: Instant) -> Result<Vec<u8>, UpstreamError> {
        let io = async {
            let mut stream = TcpStream::connect(self.addr).await?;
            let len =
                u16::try_from(bytes.len()).map_err(|_| std::io::Error::other("query too long"))?;
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(bytes);
            stream.write_all(&framed).await?;
            let len = stream.read_u16().await?;
            let mut raw = vec![0u8; usize::from(len)];
            stream.read_exact(&mut raw).await?;
            Ok::<_, std::io::Error>(raw)
        };
        Ok(tokio::time::timeout_at(deadline, io)
            .await
            .map_err(|_| UpstreamError::Timeout)??)
    }
}

/// The query sent upstream for `guest`'s question.
fn clean_query(guest: &Message) -> Message {
    let mut query = Message::query();
    query.metadata.recursion_desired = guest.metadata.recursion_desired;
    query.metadata.checking_disabled = guest.metadata.checking_disabled;
    query.add_queries(guest.queries.first().cloned());
    if let Some(theirs) = &guest.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(theirs.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        edns.set_dnssec_ok(theirs.flags().dnssec_ok);
        query.set_edns(edns);
    }
    query
}

/// Whether `answer` answers `query`: a response with its ID and its question.
fn check(query: &Message, answer: &Message) -> Result<(), UpstreamError> {
    if answer.metadata.id != query.metadata.id {
        return Err(UpstreamError::Malformed("another ID"));
    }
    if answer.metadata.message_type != MessageType::Response
        || answer.metadata.op_code != OpCode::Query
    {
        return Err(UpstreamError::Malformed("not a query response"));
    }
    let same = match (query.queries.first(), answer.queries.as_slice()) {
        (Some(q), [a]) => {
            q.query_type() == a.query_type()
                && q.query_class() == a.query_class()
                && q.name().eq_ignore_root_case(a.name())
        }
        _ => false,
    };
    if !same {
        return Err(UpstreamError::Malformed("another question"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use hickory_proto::op::Query;
    use hickory_proto::rr::Record;

    use super::*;

    fn guest_query() -> Message {
        let mut m = Message::new(77, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_str("Allowed.Test.").unwrap(),
            RecordType::A,
        ));
        // Data a guest might try to smuggle upstream in the other sections.
        m.add_additional(Record::from_rdata(
            Name::from_str("x.test.").unwrap(),
            1,
            hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(203, 0, 113, 1)),
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(4096).set_dnssec_ok(true);
        m.set_edns(edns);
        m
    }

    #[test]
    fn upstream_gets_only_the_question() {
        let q = clean_query(&guest_query());
        assert_ne!(q.metadata.id, 77, "a fresh ID (1 in 65536 it is the same)");
        assert!(q.metadata.recursion_desired);
        assert_eq!(q.queries.len(), 1);
        assert!(q.additionals.is_empty() && q.answers.is_empty() && q.authorities.is_empty());
        let edns = q.edns.as_ref().unwrap();
        assert_eq!(edns.max_payload(), MAX_UDP_PAYLOAD);
        assert!(edns.flags().dnssec_ok);
        let mut plain = guest_query();
        plain.edns = None;
        assert!(clean_query(&plain).edns.is_none());
    }

    #[test]
    fn answers_must_match_the_query() {
        let q = clean_query(&guest_query());
        let mut a = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
        a.add_queries(q.queries.clone());
        assert!(check(&q, &a).is_ok());
        let mut other_id = a.clone();
        other_id.metadata.id = q.metadata.id.wrapping_add(1);
        assert!(check(&q, &other_id).is_err());
        let mut other_q = a.clone();
        other_q.queries[0].set_name(Name::from_str("denied.test.").unwrap());
        assert!(check(&q, &other_q).is_err());
        let mut not_response = a.clone();
        not_response.metadata.message_type = MessageType::Query;
        assert!(check(&q, &not_response).is_err());
        let mut two = a;
        two.add_queries(q.queries.clone());
        assert!(check(&q, &two).is_err());
    }
}
