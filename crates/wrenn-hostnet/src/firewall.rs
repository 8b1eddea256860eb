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

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use crate::slot::{
    EGRESS_CHAIN, GUEST_IP, METADATA_IP, METADATA_PORT, NFT_TABLE, SlotError, TAP_NAME,
};

/// Every slot's veth addresses come from here; guests may not reach any of it.
const SLOT_NET: &str = "10.12.0.0/16";
/// Always denied to guests, whatever the egress policy: other slots, link-local (cloud
/// metadata), loopback, "this network", multicast and reserved space.
const DENIED_ALWAYS: [&str; 6] = [
    SLOT_NET,
    "169.254.0.0/16",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The slot firewall. `peer` is the namespace's veth address (DNAT'd to the guest);
/// `host_addrs` are the host's own IPv4 addresses, which guests may never reach.
///
/// The first line creates the table if missing so that the `delete` that follows always
/// succeeds: `nft -f` applies the file as one transaction, so the slot is never without rules.
pub(crate) fn ruleset(peer: Ipv4Addr, host_addrs: &[Ipv4Addr]) -> String {
    let denied = DENIED_ALWAYS.join(", ");
    let host_set = if host_addrs.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = host_addrs.iter().map(Ipv4Addr::to_string).collect();
        format!("\t\telements = {{ {} }}\n", list.join(", "))
    };
    format!(
        "table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tset host_addrs {{\n\t\ttype ipv4_addr\n\t\tflags interval\n{host_set}\t}}\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"eth0\" ip daddr {peer} dnat ip to {GUEST_IP}\n\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"eth0\" ip saddr {GUEST_IP} masquerade\n\t}}\n\
         \tchain {EGRESS_CHAIN} {{\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tmeta nfproto ipv6 counter drop\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"eth0\" oifname \"{TAP_NAME}\" ip daddr {GUEST_IP} ct status dnat accept\n\
         \t\tiifname \"{TAP_NAME}\" ip saddr != {GUEST_IP} counter drop comment \"spoofed\"\n\
         \t\tiifname \"{TAP_NAME}\" ip daddr {{ {denied} }} counter drop comment \"denied\"\n\
         \t\tiifname \"{TAP_NAME}\" ip daddr @host_addrs counter drop comment \"host\"\n\
         \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" jump {EGRESS_CHAIN}\n\
         \t\tiifname \"{TAP_NAME}\" oifname \"eth0\" accept\n\t}}\n\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy drop;\n\
         \t\tiifname \"lo\" accept\n\
         \t\tct state established,related accept\n\
         \t\tiifname \"{TAP_NAME}\" ip saddr {GUEST_IP} ip daddr {METADATA_IP} tcp dport {METADATA_PORT} accept\n\
         \t\tcounter\n\t}}\n}}\n"
    )
}

/// The host's own addresses worth a rule: those outside the ranges denied anyway (loopback,
/// link-local, the slot network), sorted and without repeats.
pub(crate) fn host_addresses(mut all: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    all.retain(|a| {
        let [a0, a1, ..] = a.octets();
        !(a.is_loopback() || a.is_link_local() || (a0 == 10 && a1 == 12))
    });
    all.sort();
    all.dedup();
    all
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

    #[test]
    fn the_host_set_skips_what_is_denied_anyway() {
        let got = host_addresses(vec![
            Ipv4Addr::new(192, 0, 2, 7),
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(169, 254, 1, 1),
            Ipv4Addr::new(10, 12, 0, 1),
            Ipv4Addr::new(10, 13, 0, 1),
            Ipv4Addr::new(192, 0, 2, 7),
        ]);
        assert_eq!(
            got,
            [Ipv4Addr::new(10, 13, 0, 1), Ipv4Addr::new(192, 0, 2, 7)]
        );
    }

    #[test]
    fn the_ruleset_replaces_itself_in_one_transaction() {
        let rules = ruleset(Ipv4Addr::new(10, 12, 0, 3), &[Ipv4Addr::new(192, 0, 2, 7)]);
        let lines: Vec<&str> = rules.lines().collect();
        assert_eq!(lines[0], "table inet wrenn");
        assert_eq!(lines[1], "delete table inet wrenn");
        assert!(rules.contains("ip daddr 10.12.0.3 dnat ip to 169.254.0.21"));
        assert!(rules.contains("elements = { 192.0.2.7 }"));
        assert!(!ruleset(Ipv4Addr::new(10, 12, 0, 3), &[]).contains("elements"));
    }
}
