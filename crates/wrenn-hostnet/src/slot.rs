//! Network slots: one network namespace per sandbox, identical inside so one memory snapshot
//! restores into any slot.
//!
//! Inside namespace `wrenn-slot-<i>`: tap `tap0` at `169.254.0.22/30` for QEMU (the guest is
//! `169.254.0.21`), and `eth0`, one end of a veth pair whose host end is `wrv<i>`. The pair
//! carries a /31 from `10.12.0.0/16`. nftables in the namespace DNATs traffic for the
//! namespace's veth address to the guest and masquerades the guest's traffic, so the host
//! reaches envd at [`Slot::guest_endpoint`]. Deleting the namespace removes the tap, both veth
//! ends and the rules with it; that is what [`Drop`] does.
//!
//! The namespace is also the guest's firewall (table `inet wrenn`, see [`ruleset`]): the guest
//! may only send from its own address, never to the host's own addresses, other slots
//! (`10.12.0.0/16`), link-local space (cloud metadata `169.254.169.254` included), loopback,
//! multicast or reserved ranges, and never over IPv6. Inside the namespace the only thing it
//! reaches is the slot's own metadata endpoint ([`METADATA_IP`]:80, see [`crate::MetadataServer`]),
//! which lives on the namespace's loopback. Per-sandbox egress policy goes into the chain
//! [`EGRESS_CHAIN`], which the forward chain jumps to after the fixed denials; [`Slot::reset`]
//! empties it along with every other rule change and the connection tracking table.
//!
//! Shells out to `ip` and `nft` for now.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::netns::in_netns;

/// The tap QEMU attaches to, inside the namespace.
pub const TAP_NAME: &str = "tap0";
/// The guest's address in every slot.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The tap's address in every slot (the guest's gateway).
pub const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Slots are numbered below this: two addresses each in `10.12.0.0/16`.
pub const MAX_SLOTS: u32 = 1 << 15;
/// The metadata endpoint's address, on the namespace's loopback (the cloud metadata address
/// guests conventionally use; the real one is unreachable from a slot).
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The metadata endpoint's port.
pub const METADATA_PORT: u16 = 80;
/// The nftables table (family `inet`) inside each slot namespace.
pub const NFT_TABLE: &str = "wrenn";
/// The chain for a sandbox's own egress policy; empty (allow) after [`Slot::reset`].
pub const EGRESS_CHAIN: &str = "egress";
/// Prefix of slot namespace names (`wrenn-slot-<index>`).
pub const NETNS_PREFIX: &str = "wrenn-slot-";
/// Prefix of the host ends of slot veth pairs (`wrv<index>`).
pub const HOST_VETH_PREFIX: &str = "wrv";
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

/// Why a slot could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The index is out of range.
    #[error("slot index {0} is not below {MAX_SLOTS}")]
    BadIndex(u32),
    /// A command failed.
    #[error("{cmd} failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its error output.
        stderr: String,
    },
    /// Entering the namespace or a netlink request failed.
    #[error("{what} in {netns}")]
    Netns {
        /// What was being done.
        what: &'static str,
        /// The namespace.
        netns: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A network slot. Dropping it deletes the namespace and everything in it.
#[derive(Debug)]
pub struct Slot {
    index: u32,
    netns: String,
    host_veth: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

impl Slot {
    /// Creates slot `index`. A stale namespace of the same name (a crashed agent's) is removed
    /// first.
    pub fn create(index: u32) -> Result<Self, SlotError> {
        let slot = Self::named(index)?;
        if slot.netns_path().exists() {
            tracing::warn!(netns = %slot.netns, "removing a stale slot namespace");
            slot.remove();
        }
        // From here on, a failure drops `slot`, which deletes whatever was created.
        let ns = slot.netns.as_str();
        let (host, peer) = (slot.host_ip.to_string(), slot.ns_ip.to_string());
        ip(&["netns", "add", ns])?;
        // Before any link exists, so the `default` IPv6 setting covers tap0 and eth0: guests get
        // no IPv6 at all rather than a second address family to filter.
        run(
            Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward && \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && \
                 echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
            ]),
            None,
        )?;
        ip(&[
            "link",
            "add",
            &slot.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])?;
        ip(&["addr", "add", &format!("{host}/31"), "dev", &slot.host_veth])?;
        ip(&["link", "set", &slot.host_veth, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{METADATA_IP}/32"),
            "dev",
            "lo",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{peer}/31"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "tuntap", "add", TAP_NAME, "mode", "tap"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{TAP_IP}/30"),
            "dev",
            TAP_NAME,
        ])?;
        ip(&["-n", ns, "link", "set", TAP_NAME, "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &host])?;
        slot.apply_rules()?;
        Ok(slot)
    }

    /// Takes over the existing namespace of slot `index` (left by an agent that crashed with a
    /// VM in it) without changing anything. `None` when there is no such namespace.
    pub fn adopt(index: u32) -> Result<Option<Self>, SlotError> {
        if index >= MAX_SLOTS {
            return Err(SlotError::BadIndex(index));
        }
        // Checked before a `Slot` exists: dropping one would try to delete the namespace.
        if !Path::new("/run/netns")
            .join(format!("{NETNS_PREFIX}{index}"))
            .exists()
        {
            return Ok(None);
        }
        Self::named(index).map(Some)
    }

    /// Returns the slot to its pristine state between sandboxes: the firewall is replaced as a
    /// whole (dropping any per-sandbox egress rules) and the connection tracking table is
    /// flushed, so no flow or NAT mapping of the previous guest survives.
    pub fn reset(&self) -> Result<(), SlotError> {
        self.apply_rules()?;
        self.flush_conntrack()
    }

    /// Installs (or atomically replaces) the slot's nftables table.
    fn apply_rules(&self) -> Result<(), SlotError> {
        let rules = ruleset(self.ns_ip, &host_addresses());
        run(
            Command::new("ip").args(["netns", "exec", &self.netns, "nft", "-f", "-"]),
            Some(&rules),
        )
    }

    /// Deletes every conntrack entry in the namespace (`conntrack -F` without the tool): an
    /// `IPCTNL_MSG_CT_DELETE` with no tuple flushes the table of the socket's namespace.
    fn flush_conntrack(&self) -> Result<(), SlotError> {
        let err = |what: &'static str| {
            let netns = self.netns.clone();
            move |source| SlotError::Netns {
                what,
                netns,
                source,
            }
        };
        in_netns(&self.netns_path(), ctnetlink_flush)
            .map_err(err("enter namespace"))?
            .map_err(err("flush conntrack"))
    }

    fn named(index: u32) -> Result<Self, SlotError> {
        if index >= MAX_SLOTS {
            return Err(SlotError::BadIndex(index));
        }
        let base = u32::from(Ipv4Addr::new(10, 12, 0, 0)) + 2 * index;
        Ok(Slot {
            index,
            netns: format!("{NETNS_PREFIX}{index}"),
            host_veth: format!("{HOST_VETH_PREFIX}{index}"),
            host_ip: Ipv4Addr::from(base),
            ns_ip: Ipv4Addr::from(base + 1),
        })
    }

    /// The slot's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The namespace name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The namespace's bind-mounted file, for `setns`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// The host end of the veth pair.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// Where the host reaches `port` on the guest (DNAT'd to [`GUEST_IP`]).
    pub fn guest_endpoint(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ns_ip, port))
    }

    /// Where the agent reaches the slot's metadata endpoint (from inside the namespace only).
    pub fn metadata_endpoint(&self) -> SocketAddr {
        SocketAddr::from((METADATA_IP, METADATA_PORT))
    }

    fn remove(&self) {
        // Deleting the namespace destroys the tap, the veth pair (both ends) and its rules.
        if let Err(err) = ip(&["netns", "del", &self.netns]) {
            tracing::warn!(%err, netns = %self.netns, "could not delete slot namespace");
        }
        // A host end left behind by a partial setup (namespace creation failed after it).
        if std::path::Path::new("/sys/class/net")
            .join(&self.host_veth)
            .exists()
        {
            let _ = ip(&["link", "del", &self.host_veth]);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.remove();
    }
}

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

/// The host namespace's own IPv4 addresses, outside the ranges denied anyway.
fn host_addresses() -> Vec<Ipv4Addr> {
    let Ok(out) = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let mut addrs: Vec<Ipv4Addr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        // Loopback, link-local and the slot network are denied as whole ranges already.
        .filter(|a: &Ipv4Addr| {
            let [a0, a1, ..] = a.octets();
            !(a.is_loopback() || a.is_link_local() || (a0 == 10 && a1 == 12))
        })
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Flushes the conntrack table of the calling thread's network namespace over netlink.
fn ctnetlink_flush() -> std::io::Result<()> {
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

fn ip(args: &[&str]) -> Result<(), SlotError> {
    run(Command::new("ip").args(args), None)
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<(), SlotError> {
    let fail = |cmd: &Command, stderr: String| SlotError::Command {
        cmd: format!("{cmd:?}"),
        stderr,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| fail(cmd, e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| fail(cmd, e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(cmd, e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            cmd,
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}
