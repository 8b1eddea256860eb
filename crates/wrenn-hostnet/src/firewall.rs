//! The slot firewall: the nftables ruleset of a slot's namespace, applied in one `nft -f -`
//! run, and the conntrack flush that goes with a reset.
//!
//! Why `nft` and not a netlink nftables crate: the ruleset stays readable text in nft's own
//! language (what an operator sees in `nft list table`), one `nft -f` applies it as one
//! transaction, and `nft` is installed wherever the agent runs anyway. The netlink options
//! are bindings to the C `libnftnl` (another system library to build against) or young crates
//! that would need every expression of this ruleset spelled out as netlink attributes, which
//! is more code to review than the ruleset itself. One process per slot setup or reset
//! remains, down from a dozen.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use wrenn_core::{EgressPolicy, Ipv4Net};

use crate::slot::{
    EGRESS_CHAIN, GUEST_IP, METADATA_IP, METADATA_PORT, NFT_TABLE, SlotError, TAP_IP, TAP_NAME,
};

/// Every slot's veth addresses come from here; guests may not reach any of it.
pub(crate) const SLOT_NET: &str = "10.12.0.0/16";
/// Where guest DNS queries (to any address) are redirected: the resolver on the tap address.
pub(crate) const DNS_PORT: u16 = 53;
/// Where a guest's new connections to ports 80 and 443 are redirected when its policy has
/// domain rules: the filtering proxy on the tap address.
pub const PROXY_PORT: u16 = 15001;
/// Always denied to guests, whatever the egress policy or the operator says: other slots,
/// link-local (cloud metadata), loopback, "this network", IETF protocol assignments, the old
/// 6to4 relay anycast, multicast and reserved space (broadcast included).
const DENIED_ALWAYS: [&str; 9] = [
    SLOT_NET,
    "169.254.0.0/16",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "192.0.0.0/24",
    "192.88.99.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
];
/// Denied unless the operator lifts a listed range (`Uplink::allowed_ranges`): private,
/// CGNAT (cloud metadata services such as 100.100.100.200 live here) and benchmark space.
pub(crate) const PRIVATE: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "198.18.0.0/15",
];

/// Whether `ip` is outside every range a guest with the default policy is denied (the
/// always-denied ones and the private ones, whatever an operator lifted): what the host may
/// reach on a tenant's behalf, such as a registry a build names. IPv6: global unicast only.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    let v4 = match ip {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => {
                let first = v6.segments()[0];
                // Loopback, unspecified, link-local (fe80::/10), unique local (fc00::/7),
                // multicast (ff00::/8).
                return !(v6.is_loopback()
                    || v6.is_unspecified()
                    || first & 0xffc0 == 0xfe80
                    || first & 0xfe00 == 0xfc00
                    || first & 0xff00 == 0xff00);
            }
        },
    };
    !DENIED_ALWAYS
        .iter()
        .chain(PRIVATE.iter())
        .filter_map(|c| c.parse::<Ipv4Net>().ok())
        .any(|n| n.contains(v4))
}

/// What of the host a guest may never reach: its own addresses and its directly connected
/// networks, read from the host namespace whenever a slot's rules are written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostView {
    pub(crate) addrs: Vec<Ipv4Addr>,
    pub(crate) connected: Vec<Ipv4Net>,
}

impl HostView {
    /// From the host's addresses with their prefixes: loopback, link-local and the slot
    /// network are denied anyway and left out.
    pub(crate) fn new(all: &[(Ipv4Addr, u8)]) -> Self {
        let wanted = |a: &Ipv4Addr| {
            let [a0, a1, ..] = a.octets();
            !(a.is_loopback() || a.is_link_local() || (a0 == 10 && a1 == 12))
        };
        let mut addrs: Vec<Ipv4Addr> = all.iter().map(|(a, _)| *a).filter(wanted).collect();
        addrs.sort();
        addrs.dedup();
        let mut connected: Vec<Ipv4Net> = all
            .iter()
            .filter(|(a, p)| wanted(a) && *p < 32)
            .filter_map(|(a, p)| Ipv4Net::new(*a, *p))
            .collect();
        connected.sort();
        connected.dedup();
        Self { addrs, connected }
    }
}

/// `elements = { ... }` of a set, or nothing for an empty one (nft refuses empty braces).
fn elements(items: impl IntoIterator<Item = String>) -> String {
    let list: Vec<String> = items.into_iter().collect();
    if list.is_empty() {
        String::new()
    } else {
        format!("\t\telements = {{ {} }}\n", list.join(", "))
    }
}

fn interval_set(name: &str, items: impl IntoIterator<Item = String>) -> String {
    format!(
        "\tset {name} {{\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\tauto-merge\n{}\t}}\n",
        elements(items)
    )
}

/// The slot firewall. `peer` is the namespace's veth address (DNAT'd to the guest).
///
/// Guest packets are judged one by one, not only when a connection starts, so a policy
/// change applies to connections already open: the next packet the guest sends on a
/// connection the new policy forbids is answered with a reset. The guest's answers to
/// connections the host opened (DNAT'd to it, so in conntrack's reply direction) pass first.
/// Egress starts closed (chain `egress` refuses everything) until [`egress_rules`] sets the
/// sandbox's policy.
///
/// The first line creates the table if missing so that the `delete` that follows always
/// succeeds: `nft -f` applies the file as one transaction, so the slot is never without rules.
pub(crate) fn ruleset(peer: Ipv4Addr, host: &HostView) -> String {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut out = format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n"
    );
    out += &interval_set("fixed", s(&DENIED_ALWAYS));
    out += &interval_set("private", s(&PRIVATE));
    out += &interval_set("lifted", []);
    out += &interval_set("host_addrs", host.addrs.iter().map(Ipv4Addr::to_string));
    out += &interval_set("connected", host.connected.iter().map(Ipv4Net::to_string));
    out += &interval_set("allow", []);
    out += &interval_set("deny", []);
    out += "\tset learned {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t}\n";
    let _ = write!(
        out,
        "\tchain refuse {{\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject with icmpx admin-prohibited\n\t}}\n\
         \tchain guard {{\n\
         \t\tip daddr @fixed counter goto refuse\n\
         \t\tip daddr @host_addrs counter goto refuse\n\
         \t\tip daddr @connected counter goto refuse\n\
         \t\tip daddr @lifted return\n\
         \t\tip daddr @private counter goto refuse\n\t}}\n\
         \tchain {EGRESS_CHAIN} {{\n\t\tcounter goto refuse\n\t}}\n\
         \tchain egress_nat {{\n\t}}\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"eth0\" ip daddr {peer} dnat ip to {GUEST_IP}\n\
         \t\tiifname \"{TAP_NAME}\" meta l4proto {{ tcp, udp }} th dport {DNS_PORT} redirect to :{DNS_PORT}\n\
         \t\tiifname \"{TAP_NAME}\" jump egress_nat\n\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"eth0\" ip saddr {GUEST_IP} masquerade\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tmeta nfproto ipv6 counter drop\n\
         \t\tiifname \"eth0\" oifname \"{TAP_NAME}\" ct state established,related accept\n\
         \t\tiifname \"eth0\" oifname \"{TAP_NAME}\" ip daddr {GUEST_IP} ct status dnat accept\n\
         \t\tiifname \"{TAP_NAME}\" ip saddr != {GUEST_IP} counter drop comment \"spoofed\"\n\
         \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" ct direction reply accept\n\
         \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" jump guard\n\
         \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" jump {EGRESS_CHAIN}\n\
         \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" accept\n\t}}\n\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy drop;\n\
         \t\tiifname \"lo\" accept\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"{TAP_NAME}\" ip saddr {GUEST_IP} ip daddr {METADATA_IP} tcp dport {METADATA_PORT} accept\n\
         \t\tiifname \"{TAP_NAME}\" ip saddr {GUEST_IP} ip daddr {TAP_IP} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept\n\
         \t\tiifname \"{TAP_NAME}\" ip saddr {GUEST_IP} ip daddr {TAP_IP} tcp dport {PROXY_PORT} accept\n\
         \t\tiifname \"{TAP_NAME}\" counter goto refuse\n\
         \t\tcounter\n\t}}\n\
         \tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n\
         \t\toifname \"eth0\" ct direction reply accept\n\
         \t\toifname \"eth0\" jump guard\n\t}}\n}}\n"
    );
    out
}

/// The transaction that gives a slot a sandbox's policy (or takes it back: `None` closes
/// egress): the allow and deny sets, the ranges the operator lifted, the learned addresses
/// forgotten, and chains `egress` and `egress_nat` rewritten. One `nft -f`, so no packet
/// sees half a policy.
pub(crate) fn egress_rules(policy: Option<&EgressPolicy>, lifted: &[Ipv4Net]) -> String {
    let t = format!("inet {NFT_TABLE}");
    let mut out = String::new();
    for set in ["allow", "deny", "lifted", "learned"] {
        let _ = writeln!(out, "flush set {t} {set}");
    }
    let _ = writeln!(out, "flush chain {t} {EGRESS_CHAIN}");
    let _ = writeln!(out, "flush chain {t} egress_nat");
    let mut add = |set: &str, nets: Vec<Ipv4Net>| {
        if !nets.is_empty() {
            let list: Vec<String> = nets.iter().map(Ipv4Net::to_string).collect();
            let _ = writeln!(out, "add element {t} {set} {{ {} }}", list.join(", "));
        }
    };
    add("lifted", lifted.to_vec());
    let Some(p) = policy.filter(|p| !p.no_internet) else {
        let _ = writeln!(out, "add rule {t} {EGRESS_CHAIN} counter goto refuse");
        return out;
    };
    add("allow", p.allow_nets().collect());
    add("deny", p.deny_nets().collect());
    let _ = writeln!(out, "add rule {t} {EGRESS_CHAIN} ip daddr @allow accept");
    if p.has_domain_rules() {
        // Names decide on 80 and 443 (the proxy reads SNI or Host); elsewhere the addresses
        // the resolver gave out for allowed names pass.
        let _ = writeln!(out, "add rule {t} {EGRESS_CHAIN} ip daddr @learned accept");
        let _ = writeln!(
            out,
            "add rule {t} egress_nat tcp dport {{ 80, 443 }} fib daddr type != local ip daddr != @allow redirect to :{PROXY_PORT}"
        );
    }
    let _ = writeln!(
        out,
        "add rule {t} {EGRESS_CHAIN} ip daddr @deny counter goto refuse"
    );
    out
}

/// Adds addresses the resolver handed out for allowed names, each for its time to live.
pub(crate) fn learned_rules(learned: &[(Ipv4Addr, Duration)]) -> String {
    let list: Vec<String> = learned
        .iter()
        .map(|(ip, ttl)| format!("{ip} timeout {}s", ttl.as_secs().max(1)))
        .collect();
    if list.is_empty() {
        return String::new();
    }
    format!(
        "add element inet {NFT_TABLE} learned {{ {} }}\n",
        list.join(", ")
    )
}

/// Replaces the host's addresses and connected networks (after they changed).
pub(crate) fn host_rules(host: &HostView) -> String {
    let t = format!("inet {NFT_TABLE}");
    let mut out = format!("flush set {t} host_addrs\nflush set {t} connected\n");
    if !host.addrs.is_empty() {
        let list: Vec<String> = host.addrs.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(out, "add element {t} host_addrs {{ {} }}", list.join(", "));
    }
    if !host.connected.is_empty() {
        let list: Vec<String> = host.connected.iter().map(Ipv4Net::to_string).collect();
        let _ = writeln!(out, "add element {t} connected {{ {} }}", list.join(", "));
    }
    out
}

/// Applies `rules` with one `nft -f -`, in the calling thread's network namespace (the child
/// starts in it).
pub(crate) fn apply(rules: &str) -> Result<(), SlotError> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let fail = |stderr: String| SlotError::Command {
        cmd: "nft -f -".into(),
        stderr,
    };
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

/// Flushes the conntrack table of the calling thread's network namespace over netlink
/// (`conntrack -F` without the tool): an `IPCTNL_MSG_CT_DELETE` with no tuple flushes the table
/// of the socket's namespace.
pub(crate) fn flush_conntrack() -> std::io::Result<()> {
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16 bytes) + nfgenmsg (family AF_UNSPEC: every family, version 0, res_id 0).
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&20u32.to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    // SAFETY: the kernel's netlink address; zeroed is valid (pid 0 = the kernel, no groups).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `msg` and `addr` are valid for the lengths given for the duration of the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The ack is an NLMSG_ERROR whose error field (after the 16-byte header) is 0 or -errno.
    let n = n as usize;
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        // ENOENT: the table was already empty.
        if errno != 0 && errno != -libc::ENOENT {
            return Err(std::io::Error::from_raw_os_error(-errno));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> HostView {
        HostView::new(&[
            (Ipv4Addr::new(198, 51, 100, 1), 30),
            (Ipv4Addr::LOCALHOST, 8),
            (Ipv4Addr::new(169, 254, 1, 1), 16),
            (Ipv4Addr::new(10, 12, 0, 1), 31),
            (Ipv4Addr::new(10, 13, 0, 1), 32),
            (Ipv4Addr::new(198, 51, 100, 1), 30),
        ])
    }

    #[test]
    fn the_host_view_skips_what_is_denied_anyway() {
        let v = view();
        assert_eq!(
            v.addrs,
            [Ipv4Addr::new(10, 13, 0, 1), Ipv4Addr::new(198, 51, 100, 1)]
        );
        assert_eq!(v.connected, ["198.51.100.0/30".parse().unwrap()]);
    }

    #[test]
    fn the_ruleset_replaces_itself_in_one_transaction_and_starts_closed() {
        let rules = ruleset(Ipv4Addr::new(10, 12, 0, 3), &view());
        let lines: Vec<&str> = rules.lines().collect();
        assert_eq!(lines[0], "table inet wrenn");
        assert_eq!(lines[1], "delete table inet wrenn");
        assert!(rules.contains("ip daddr 10.12.0.3 dnat ip to 169.254.0.21"));
        assert!(rules.contains("elements = { 10.13.0.1, 198.51.100.1 }"));
        assert!(rules.contains("elements = { 198.51.100.0/30 }"));
        assert!(rules.contains("chain egress {\n\t\tcounter goto refuse\n\t}"));
        let empty = ruleset(Ipv4Addr::new(10, 12, 0, 3), &HostView::default());
        assert!(!empty.contains("elements = {  }"));
    }

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressPolicy::parse(true, &s(allow), &s(deny)).unwrap()
    }

    #[test]
    fn egress_rules_follow_the_policy() {
        let closed = egress_rules(None, &[]);
        assert!(closed.contains("add rule inet wrenn egress counter goto refuse"));
        let off = EgressPolicy::parse(false, &[], &[]).unwrap();
        assert!(egress_rules(Some(&off), &[]).contains("egress counter goto refuse"));

        let open = egress_rules(
            Some(&EgressPolicy::open()),
            &["10.99.0.0/16".parse().unwrap()],
        );
        assert!(open.contains("add element inet wrenn lifted { 10.99.0.0/16 }"));
        assert!(!open.contains("redirect"));
        assert!(!open.contains("goto refuse\nadd rule inet wrenn egress counter"));

        let named = egress_rules(
            Some(&policy(&["203.0.113.10", "allowed.test"], &["0.0.0.0/0"])),
            &[],
        );
        assert!(named.contains("add element inet wrenn allow { 203.0.113.10/32 }"));
        assert!(named.contains("add element inet wrenn deny { 0.0.0.0/0 }"));
        assert!(named.contains("redirect to :15001"));
        assert!(named.contains("ip daddr @learned accept"));
        let allow_at = named.find("ip daddr @allow accept").unwrap();
        let deny_at = named.find("ip daddr @deny").unwrap();
        assert!(allow_at < deny_at, "an allow wins over a deny");
    }

    #[test]
    fn learned_addresses_expire() {
        let r = learned_rules(&[(Ipv4Addr::new(203, 0, 113, 10), Duration::from_secs(60))]);
        assert_eq!(
            r,
            "add element inet wrenn learned { 203.0.113.10 timeout 60s }\n"
        );
        assert!(learned_rules(&[]).is_empty());
    }

    #[test]
    fn public_addresses_are_outside_every_denied_range() {
        for ip in ["198.51.100.72", "8.8.8.8", "2001:db8::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.99.0.10",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "10.12.0.3",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
