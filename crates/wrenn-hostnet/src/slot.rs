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
//! The namespace is also the guest's firewall (table `inet wrenn`, see `crate::firewall`): the guest
//! may only send from its own address, never to the host's own addresses, other slots
//! (`10.12.0.0/16`), link-local space (cloud metadata `169.254.169.254` included), loopback,
//! multicast or reserved ranges, and never over IPv6. Inside the namespace the only thing it
//! reaches is the slot's own metadata endpoint ([`METADATA_IP`]:80, see [`crate::MetadataServer`]),
//! which lives on the namespace's loopback. Per-sandbox egress policy goes into the chain
//! [`EGRESS_CHAIN`], which the forward chain jumps to after the fixed denials; [`Slot::reset`]
//! empties it along with every other rule change and the connection tracking table.
//!
//! Links, addresses and routes are set over netlink (`crate::netlink`), the tap through
//! `/dev/net/tun`, the firewall with one `nft -f -` (`crate::firewall`). All of it runs on a
//! thread of its own that enters the slot's namespace and ends afterwards, so no thread of
//! the caller's runtime ever changes namespace; [`Slot::create`] and [`Slot::reset`] await it.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::path::PathBuf;

use std::time::Duration;

use wrenn_core::{EgressPolicy, Ipv4Net};

use crate::firewall::{self, HostView};
use crate::netlink::Netlink;
use crate::netns::{self, netns_path, on_own_thread, on_own_thread_async};
use crate::tap::create_tap;

/// The tap QEMU attaches to, inside the namespace.
pub const TAP_NAME: &str = "tap0";
/// The guest's address in every slot.
pub(crate) const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The tap's address in every slot (the guest's gateway).
pub(crate) const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Slots are numbered below this: two addresses each in `10.12.0.0/16`.
pub const MAX_SLOTS: u32 = 1 << 15;
/// The metadata endpoint's address, on the namespace's loopback (the cloud metadata address
/// guests conventionally use; the real one is unreachable from a slot).
pub(crate) const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The metadata endpoint's port.
pub(crate) const METADATA_PORT: u16 = 80;
/// The nftables table (family `inet`) inside each slot namespace.
pub const NFT_TABLE: &str = "wrenn";
/// The chain for a sandbox's own egress policy; empty (allow) after [`Slot::reset`].
pub const EGRESS_CHAIN: &str = "egress";
/// Prefix of slot namespace names (`wrenn-slot-<index>`).
pub const NETNS_PREFIX: &str = "wrenn-slot-";
/// Prefix of the host ends of slot veth pairs (`wrv<index>`).
pub const HOST_VETH_PREFIX: &str = "wrv";

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
    /// A step of setting up, resetting or removing the namespace failed (entering it, a
    /// netlink request, the tap, a sysctl).
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

/// Names and addresses of one slot.
#[derive(Debug, Clone)]
struct Layout {
    index: u32,
    netns: String,
    host_veth: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

/// The host end's and the namespace end's veth addresses of slot `index` (below
/// [`MAX_SLOTS`]).
pub(crate) fn slot_addresses(index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 12, 0, 0)) + 2 * index;
    (Ipv4Addr::from(base), Ipv4Addr::from(base + 1))
}

impl Layout {
    fn new(index: u32) -> Result<Self, SlotError> {
        if index >= MAX_SLOTS {
            return Err(SlotError::BadIndex(index));
        }
        let (host_ip, ns_ip) = slot_addresses(index);
        Ok(Self {
            index,
            netns: format!("{NETNS_PREFIX}{index}"),
            host_veth: format!("{HOST_VETH_PREFIX}{index}"),
            host_ip,
            ns_ip,
        })
    }

    /// Wraps an I/O error of step `what`.
    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> SlotError + use<> {
        let netns = self.netns.clone();
        move |source| SlotError::Netns {
            what,
            netns,
            source,
        }
    }
}

/// A network slot. Dropping it deletes the namespace and everything in it.
#[derive(Debug)]
pub struct Slot {
    layout: Layout,
}

/// Names a slot without owning it, for changing its egress from a task that does not hold the
/// [`Slot`]. Once the slot is gone its calls fail (there is no namespace to enter).
#[derive(Debug, Clone)]
pub struct SlotHandle {
    layout: Layout,
}

impl SlotHandle {
    /// See [`Slot::set_egress`].
    pub async fn set_egress(
        &self,
        policy: Option<&EgressPolicy>,
        lifted: &[Ipv4Net],
    ) -> Result<(), SlotError> {
        apply_in(&self.layout, firewall::egress_rules(policy, lifted)).await
    }

    /// See [`Slot::learn`].
    pub async fn learn(&self, learned: &[(Ipv4Addr, Duration)]) -> Result<(), SlotError> {
        apply_in(&self.layout, firewall::learned_rules(learned)).await
    }

    /// The namespace's bind-mounted file.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.layout.netns)
    }
}

impl Slot {
    /// Creates slot `index`. A stale namespace of the same name (a crashed agent's) is removed
    /// first. On an error, or when the caller stops waiting, nothing of the slot is left.
    pub async fn create(index: u32) -> Result<Self, SlotError> {
        let layout = Layout::new(index)?;
        let err = layout.err("run the slot thread");
        // The slot is made on the worker thread, so a caller that stops waiting (its future
        // dropped) still gets it removed: the worker drops what nobody received.
        on_own_thread_async(move || async move {
            set_up(&layout).await?;
            Ok(Self { layout })
        })
        .await
        .map_err(err)?
    }

    /// Takes over the existing namespace of slot `index` (left by an agent that crashed with a
    /// VM in it) without changing anything. `None` when there is no such namespace.
    pub fn adopt(index: u32) -> Result<Option<Self>, SlotError> {
        let layout = Layout::new(index)?;
        // Checked before a `Slot` exists: dropping one would delete the namespace.
        if !netns_path(&layout.netns).exists() {
            return Ok(None);
        }
        Ok(Some(Self { layout }))
    }

    /// Returns the slot to its pristine state between sandboxes: the firewall is replaced as a
    /// whole (dropping any per-sandbox egress rules) and the connection tracking table is
    /// flushed, so no flow or NAT mapping of the previous guest survives.
    pub async fn reset(&self) -> Result<(), SlotError> {
        let layout = self.layout.clone();
        let err = self.layout.err("run the slot thread");
        on_own_thread_async(move || async move { reset(&layout).await })
            .await
            .map_err(err)?
    }

    /// Gives the slot a sandbox's egress policy, or closes egress again (`None`), in one
    /// transaction. `lifted` are the private ranges the operator allows guests to reach.
    /// Packets of open connections are judged by the new policy from their next one on.
    pub async fn set_egress(
        &self,
        policy: Option<&EgressPolicy>,
        lifted: &[Ipv4Net],
    ) -> Result<(), SlotError> {
        self.handle().set_egress(policy, lifted).await
    }

    /// Lets the guest reach addresses the resolver gave it for allowed names, each for its
    /// time to live.
    pub async fn learn(&self, learned: &[(Ipv4Addr, Duration)]) -> Result<(), SlotError> {
        self.handle().learn(learned).await
    }

    /// A handle for changing the slot's egress from elsewhere.
    pub fn handle(&self) -> SlotHandle {
        SlotHandle {
            layout: self.layout.clone(),
        }
    }

    /// Reads the host's addresses and connected networks again and replaces the slot's copy
    /// (they changed: a new address, a new interface).
    pub async fn refresh_host(&self) -> Result<(), SlotError> {
        let layout = self.layout.clone();
        let err = self.layout.err("run the slot thread");
        on_own_thread_async(move || async move {
            let host = Netlink::open().map_err(layout.err("open netlink"))?;
            let view = host_view(&layout, &host).await?;
            enter(&layout)?;
            firewall::apply(&firewall::host_rules(&view))
        })
        .await
        .map_err(err)?
    }

    /// The slot's index.
    pub fn index(&self) -> u32 {
        self.layout.index
    }

    /// The namespace name.
    pub fn netns(&self) -> &str {
        &self.layout.netns
    }

    /// The namespace's bind-mounted file, for `setns`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.layout.netns)
    }

    /// The host end of the veth pair.
    pub fn host_veth(&self) -> &str {
        &self.layout.host_veth
    }

    /// Where the host reaches `port` on the guest (DNAT'd to the guest's `169.254.0.21`).
    pub fn guest_endpoint(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.layout.ns_ip, port))
    }

    /// Where the agent reaches the slot's metadata endpoint (from inside the namespace only).
    pub fn metadata_endpoint(&self) -> SocketAddr {
        SocketAddr::from((METADATA_IP, METADATA_PORT))
    }
}

impl Drop for Slot {
    /// Blocks until the slot is gone (a few milliseconds), so the index can be used again at
    /// once; async callers that mind can drop it on a blocking thread.
    fn drop(&mut self) {
        let layout = self.layout.clone();
        let removed = on_own_thread(move || async move { tear_down(&layout).await });
        if let Err(error) = removed {
            tracing::warn!(%error, netns = %self.layout.netns, "could not delete slot namespace");
        }
    }
}

/// Makes the slot, on a thread of its own (which ends inside the new namespace); on an error
/// removes what it made.
async fn set_up(l: &Layout) -> Result<(), SlotError> {
    // Opened before the thread leaves the host's namespace: it stays there.
    let host = Netlink::open().map_err(l.err("open netlink"))?;
    // A crashed agent's leftovers: the namespace, or a host veth a half-made slot left.
    let stale_veth = matches!(host.index(&l.host_veth).await, Ok(Some(_)));
    if netns_path(&l.netns).exists() || stale_veth {
        tracing::warn!(netns = %l.netns, "removing a stale slot namespace");
        remove(l, &host).await;
    }
    let made = configure(l, &host).await;
    if made.is_err() {
        remove(l, &host).await;
    }
    made
}

async fn configure(l: &Layout, host: &Netlink) -> Result<(), SlotError> {
    let view = host_view(l, host).await?;
    let ns = netns::create_and_enter(&l.netns).map_err(l.err("create the namespace"))?;
    // From here on this thread is inside the slot's namespace.
    // Before any link exists, so the `default` IPv6 setting covers tap0 and eth0: guests get
    // no IPv6 at all rather than a second address family to filter.
    for (file, value) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"),
        ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"),
    ] {
        std::fs::write(file, value).map_err(l.err("set a sysctl"))?;
    }
    create_tap(TAP_NAME).map_err(l.err("create the tap"))?;
    let inside = Netlink::open().map_err(l.err("open netlink"))?;
    host.add_veth(&l.host_veth, "eth0", ns.as_fd())
        .await
        .map_err(l.err("create the veth pair"))?;
    let veth = host
        .existing(&l.host_veth)
        .await
        .map_err(l.err("find the host veth"))?;
    host.add_address(veth, l.host_ip, 31)
        .await
        .map_err(l.err("address the host veth"))?;
    host.set_up(veth)
        .await
        .map_err(l.err("bring the host veth up"))?;
    for (link, addr, prefix) in [
        ("lo", METADATA_IP, 32),
        ("eth0", l.ns_ip, 31),
        (TAP_NAME, TAP_IP, 30),
    ] {
        let index = inside.existing(link).await.map_err(l.err("find a link"))?;
        inside
            .add_address(index, addr, prefix)
            .await
            .map_err(l.err("add an address"))?;
        inside
            .set_up(index)
            .await
            .map_err(l.err("bring a link up"))?;
    }
    inside
        .add_default_route(l.host_ip)
        .await
        .map_err(l.err("add the default route"))?;
    firewall::apply(&firewall::ruleset(l.ns_ip, &view))
}

/// What of the host the guest may not reach, read from the host's namespace (`host` must
/// have been opened there).
async fn host_view(l: &Layout, host: &Netlink) -> Result<HostView, SlotError> {
    let addrs = host
        .ipv4_addresses()
        .await
        .map_err(l.err("list host addresses"))?;
    Ok(HostView::new(&addrs))
}

/// Replaces the firewall and flushes conntrack, on a thread of its own.
async fn reset(l: &Layout) -> Result<(), SlotError> {
    let host = Netlink::open().map_err(l.err("open netlink"))?;
    let view = host_view(l, &host).await?;
    enter(l)?;
    firewall::apply(&firewall::ruleset(l.ns_ip, &view))?;
    firewall::flush_conntrack().map_err(l.err("flush conntrack"))
}

/// Moves the calling thread (one of its own) into the slot's namespace.
fn enter(l: &Layout) -> Result<(), SlotError> {
    let ns = File::open(netns_path(&l.netns)).map_err(l.err("open the namespace"))?;
    netns::enter(&ns).map_err(l.err("enter the namespace"))
}

/// Applies an nft transaction inside the slot's namespace, on a thread of its own.
async fn apply_in(l: &Layout, rules: String) -> Result<(), SlotError> {
    if rules.is_empty() {
        return Ok(());
    }
    let layout = l.clone();
    let err = l.err("run the slot thread");
    on_own_thread_async(move || async move {
        enter(&layout)?;
        firewall::apply(&rules)
    })
    .await
    .map_err(err)?
}

/// Deletes the slot, on a thread of its own.
async fn tear_down(l: &Layout) -> Result<(), SlotError> {
    let host = Netlink::open().map_err(l.err("open netlink"))?;
    remove(l, &host).await;
    Ok(())
}

/// Deletes the host veth (which takes its peer and so the namespace's end with it at once,
/// where the namespace itself may go later) and the namespace's name, which destroys the tap
/// and the rules once nothing uses the namespace. Failures are logged: removal goes as far as
/// it can.
async fn remove(l: &Layout, host: &Netlink) {
    if let Err(error) = host.delete_link(&l.host_veth).await {
        tracing::warn!(%error, veth = %l.host_veth, "could not delete a slot's veth");
    }
    if let Err(error) = netns::delete_netns_now(&l.netns) {
        tracing::warn!(%error, netns = %l.netns, "could not delete slot namespace");
    }
}

/// Deletes the network namespace `name` (its bind mount under `/run/netns`), as the agent
/// does for slots a crashed run left. No such namespace is no error.
pub async fn delete_netns(name: &str) -> std::io::Result<()> {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || netns::delete_netns_now(&name))
        .await
        .map_err(std::io::Error::other)?
}

/// Deletes host link `name` (a slot's veth end; its peer goes with it). No such link is no
/// error. Runs on the caller's runtime: the request needs no other namespace.
pub async fn delete_link(name: &str) -> std::io::Result<()> {
    Netlink::open()?.delete_link(name).await.map(drop)
}
