//! The slot's filtering proxy at [`EGRESS_IP`](super::EGRESS_IP):[`PROXY_PORT`](super::PROXY_PORT),
//! where the slot firewall redirects the guest's new TCP connections to ports 80 and 443 when
//! its policy has domain rules.
//!
//! For each connection: the original destination (`SO_ORIGINAL_DST`), then the name in its
//! first bytes (TLS SNI on 443, HTTP `Host` on 80, see [`super::sniff`]), read within a
//! deadline and a size cap. The name counts as the destination's only if the address belongs
//! to it: the guest resolved the name to that address through the slot's resolver, or a fresh
//! lookup upstream says so; otherwise a guest could name an allowed host and connect anywhere.
//! A name that would deny counts without proof (claiming it can only hurt the guest). Denied:
//! the connection is reset. Allowed: a connection to the original destination from a socket
//! made inside the slot's namespace (so it leaves through the slot's firewall and NAT, like
//! the guest's own traffic), the bytes read so far written to it, then bytes copied both ways
//! until both sides are done. TLS is never terminated.
//!
//! Live connections are kept in a [`Registry`] with what they were judged on; a new policy
//! resets those it denies at once.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use wrenn_core::{EgressPolicy, Verdict};

use super::learned::{Learned, Lookups, answer_addresses};
use super::sniff::{MAX_SNIFF, Sniff, http_host, tls_sni};
use super::{Shared, serve_bounded};

/// Connections proxied at once per slot; more wait in the kernel's backlog.
pub(crate) const MAX_PROXIED: usize = 256;
/// Most reads spent looking for a name (each re-parses what was read: a guest dribbling one
/// byte at a time must not make that quadratic for long).
const MAX_SNIFF_READS: usize = 64;

/// Serves the proxy's listener until the task is aborted (which drops every connection).
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_bounded(listener, MAX_PROXIED, "egress proxy", move |guest, _| {
        let shared = shared.clone();
        async move { handle(guest, &shared).await }
    })
    .await;
}

/// One proxied connection, from accept to close.
async fn handle(mut guest: TcpStream, shared: &Shared) {
    let dst = match original_dst(&guest) {
        Ok(dst) if proxiable(dst) => dst,
        Ok(dst) => {
            tracing::debug!(%dst, "egress proxy: not a destination it proxies");
            return reset(&guest);
        }
        Err(error) => {
            tracing::debug!(%error, "egress proxy: no original destination");
            return reset(&guest);
        }
    };
    let (first, claimed) = match sniff(&mut guest, dst.port(), shared.cfg.first_bytes_timeout).await
    {
        Ok(read) => read,
        Err(error) => {
            tracing::debug!(%dst, %error, "egress proxy: reading the first bytes failed");
            return reset(&guest);
        }
    };
    let ip = *dst.ip();
    let believed = match &claimed {
        Some(name) => belongs(shared, name, ip).await,
        None => false,
    };
    // Registered before the policy is read: a policy set meanwhile either is the one read
    // here or finds this connection in the registry.
    let (_registered, mut kill) = shared.conns.register(ip, claimed.clone(), believed);
    let verdict = decide(&shared.policy(), ip, claimed.as_deref(), believed);
    tracing::debug!(%dst, name = ?claimed, believed, ?verdict, "egress proxy: connection");
    if verdict == Verdict::Deny {
        return reset(&guest);
    }
    let mut upstream = None;
    tokio::select! {
        _ = &mut kill => {
            tracing::debug!(%dst, name = ?claimed, "egress proxy: closed by a new policy");
        }
        done = relay(shared, &mut guest, &mut upstream, dst, &first) => match done {
            Ok(()) => return,
            Err(error) => tracing::debug!(%dst, %error, "egress proxy: connection failed"),
        },
    }
    reset(&guest);
    if let Some(upstream) = &upstream {
        reset(upstream);
    }
}

/// The verdict for a connection to `ip` that named `claimed`, which is `believed` when the
/// address belongs to it. A name that denies is taken at its word; one that would allow only
/// when believed.
pub(crate) fn decide(
    policy: &EgressPolicy,
    ip: Ipv4Addr,
    claimed: Option<&str>,
    believed: bool,
) -> Verdict {
    if claimed.is_some() && policy.verdict(ip, claimed) == Verdict::Deny {
        return Verdict::Deny;
    }
    policy.verdict(ip, claimed.filter(|_| believed))
}

/// Connects to `dst` from the slot's namespace and copies both ways until both are done.
async fn relay(
    shared: &Shared,
    guest: &mut TcpStream,
    upstream: &mut Option<TcpStream>,
    dst: SocketAddrV4,
    first: &[u8],
) -> std::io::Result<()> {
    let socket = shared.ns.tcp_socket().await?;
    let stream = tokio::time::timeout(shared.cfg.connect_timeout, socket.connect(dst.into()))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let stream = upstream.insert(stream);
    stream.set_nodelay(true)?;
    stream.write_all(first).await?;
    // Half-closes are passed on: each direction ends with a shutdown of the other side.
    tokio::io::copy_bidirectional(guest, stream).await.map(drop)
}

/// Reads the first bytes of a connection to `port` until they name a host (or cannot), the
/// size cap is reached or `timeout` passes; returns them with the name.
async fn sniff(
    guest: &mut TcpStream,
    port: u16,
    timeout: Duration,
) -> std::io::Result<(Vec<u8>, Option<String>)> {
    let parse = if port == 443 { tls_sni } else { http_host };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Vec::with_capacity(2048);
    for _ in 0..MAX_SNIFF_READS {
        let mut chunk = vec![0u8; (MAX_SNIFF - buf.len()).min(4096)];
        let n = match tokio::time::timeout_at(deadline, guest.read(&mut chunk)).await {
            // Silent or closed before a name: judged by its address.
            Err(_) | Ok(Ok(0)) => break,
            Ok(n) => n?,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Sniff::Done(name) = parse(&buf) {
            return Ok((buf, name));
        }
        if buf.len() >= MAX_SNIFF {
            break;
        }
    }
    Ok((buf, None))
}

/// Whether `name` resolves to `ip`: learned from the guest's own lookups, looked up lately,
/// or (only when the name could allow what its address alone would not, and the resolver
/// would answer the guest for it: no lookup is a channel out for a locked-down guest) looked
/// up upstream now.
async fn belongs(shared: &Shared, name: &str, ip: Ipv4Addr) -> bool {
    if known(&lock(&shared.learned), &lock(&shared.lookups), name, ip) {
        return true;
    }
    let policy = shared.policy();
    let matters = policy.verdict(ip, Some(name)) == Verdict::Allow
        && policy.verdict(ip, None) == Verdict::Deny;
    if !matters || !policy.resolves(name) {
        return false;
    }
    let Ok(Ok(_permit)) =
        tokio::time::timeout(shared.cfg.upstream_timeout, shared.dns_inflight.acquire()).await
    else {
        return false;
    };
    let addrs: Vec<Ipv4Addr> = match shared.upstream.lookup_a(name).await {
        Ok(answer) => answer_addresses(&answer, name)
            .into_iter()
            .map(|(a, _)| a)
            .collect(),
        Err(error) => {
            tracing::debug!(name, error = %super::chain(&error), "egress proxy: lookup failed");
            return false;
        }
    };
    let found = addrs.contains(&ip);
    lock(&shared.lookups).put(name, addrs, Instant::now());
    found
}

/// Whether the maps already say `name` resolves to `ip`.
fn known(learned: &Learned, lookups: &Lookups, name: &str, ip: Ipv4Addr) -> bool {
    let now = Instant::now();
    learned.contains(name, ip, now) || lookups.get(name, now).is_some_and(|a| a.contains(&ip))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The destination the guest asked for, before the firewall redirected it here.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let sa = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Whether the proxy connects to `dst` at all: ports 80 and 443 (what the firewall sends
/// here), never an address that is local to the slot's namespace or special (those would
/// not leave through the slot's egress checks, which see only what goes out of `eth0`).
fn proxiable(dst: SocketAddrV4) -> bool {
    let ip = *dst.ip();
    let [a, b, ..] = ip.octets();
    matches!(dst.port(), 80 | 443)
        && !(a == 0
            || ip.is_loopback()
            || ip.is_link_local()
            || ip.is_multicast()
            || a >= 240
            // The slots' own network (`crate::firewall`'s SLOT_NET).
            || (a == 10 && b == 12))
}

/// Closes `s` with a reset (SO_LINGER 0) when it is dropped.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// The live proxied connections of a slot, with what they were judged on.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

#[derive(Debug)]
struct Tracked {
    ip: Ipv4Addr,
    claimed: Option<String>,
    believed: bool,
    kill: Option<oneshot::Sender<()>>,
}

/// A connection's place in the registry; leaving it removes the connection.
pub(crate) struct Registered<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.registry.conns).remove(&self.id);
    }
}

impl Registry {
    /// Adds a connection; the receiver fires when a new policy denies it.
    fn register(
        &self,
        ip: Ipv4Addr,
        claimed: Option<String>,
        believed: bool,
    ) -> (Registered<'_>, oneshot::Receiver<()>) {
        let (kill, killed) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tracked = Tracked {
            ip,
            claimed,
            believed,
            kill: Some(kill),
        };
        lock(&self.conns).insert(id, tracked);
        (Registered { registry: self, id }, killed)
    }

    /// Judges every live connection by `policy` again and closes those it denies; returns
    /// how many. A name not believed before is believed if the maps now say so.
    pub(crate) fn reevaluate(
        &self,
        policy: &EgressPolicy,
        learned: &Mutex<Learned>,
        lookups: &Mutex<Lookups>,
    ) -> usize {
        let mut conns = lock(&self.conns);
        let (learned, lookups) = (lock(learned), lock(lookups));
        let mut closed = 0;
        for t in conns.values_mut() {
            let believed = t.believed
                || t.claimed
                    .as_deref()
                    .is_some_and(|n| known(&learned, &lookups, n, t.ip));
            if decide(policy, t.ip, t.claimed.as_deref(), believed) == Verdict::Deny
                && let Some(kill) = t.kill.take()
            {
                let _ = kill.send(());
                closed += 1;
            }
        }
        closed
    }

    /// Closes every live connection; returns how many.
    pub(crate) fn close_all(&self) -> usize {
        let mut conns = lock(&self.conns);
        conns
            .values_mut()
            .filter_map(|t| t.kill.take())
            .map(|kill| {
                let _ = kill.send(());
            })
            .count()
    }

    /// How many connections are live.
    pub(crate) fn len(&self) -> usize {
        lock(&self.conns).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressPolicy::parse(true, &s(allow), &s(deny)).unwrap()
    }

    const X: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

    #[test]
    fn a_name_allows_only_when_believed_and_denies_always() {
        let locked = policy(&["allowed.test"], &["0.0.0.0/0"]);
        assert_eq!(
            decide(&locked, X, Some("allowed.test"), true),
            Verdict::Allow
        );
        assert_eq!(
            decide(&locked, X, Some("allowed.test"), false),
            Verdict::Deny
        );
        assert_eq!(decide(&locked, X, None, false), Verdict::Deny);
        let open = policy(&[], &["denied.test"]);
        assert_eq!(decide(&open, X, Some("denied.test"), false), Verdict::Deny);
        assert_eq!(decide(&open, X, Some("denied.test"), true), Verdict::Deny);
        assert_eq!(decide(&open, X, Some("other.test"), false), Verdict::Allow);
        assert_eq!(decide(&open, X, None, false), Verdict::Allow);
        // An allowed CIDR wins over a denied name, as allow wins over deny.
        let cidr = policy(&["203.0.113.0/24"], &["denied.test"]);
        assert_eq!(decide(&cidr, X, Some("denied.test"), false), Verdict::Allow);
    }

    #[test]
    fn only_ordinary_destinations_on_web_ports_are_proxied() {
        let at = |ip: [u8; 4], port| SocketAddrV4::new(Ipv4Addr::from(ip), port);
        assert!(proxiable(at([203, 0, 113, 10], 443)));
        assert!(proxiable(at([198, 51, 100, 1], 80)));
        for dst in [
            at([203, 0, 113, 10], 22),
            at([169, 254, 0, 22], 15001),
            at([169, 254, 169, 254], 80),
            at([127, 0, 0, 1], 80),
            at([10, 12, 0, 3], 443),
            at([0, 0, 0, 0], 80),
            at([224, 0, 0, 1], 80),
            at([255, 255, 255, 255], 443),
        ] {
            assert!(!proxiable(dst), "{dst}");
        }
    }

    #[test]
    fn reevaluation_closes_only_what_the_new_policy_denies() {
        let reg = Registry::default();
        let (learned, lookups) = (
            Mutex::new(Learned::default()),
            Mutex::new(Lookups::default()),
        );
        let (_a, mut a) = reg.register(X, Some("allowed.test".into()), true);
        let (_b, mut b) = reg.register(Ipv4Addr::new(198, 51, 100, 7), None, false);
        assert_eq!(reg.len(), 2);
        let p = policy(&["198.51.100.0/24"], &["allowed.test"]);
        assert_eq!(reg.reevaluate(&p, &learned, &lookups), 1);
        assert!(a.try_recv().is_ok());
        assert!(b.try_recv().is_err());
        // Closed once only.
        assert_eq!(reg.reevaluate(&p, &learned, &lookups), 0);
        drop(_a);
        assert_eq!(reg.len(), 1);
    }
}
