//! Host networking for sandboxes: network slots ([`Slot`]: a namespace with a tap for QEMU, a
//! veth pair to the host and an nftables firewall), the per-slot metadata endpoint
//! ([`MetadataServer`]) and the per-slot egress services for domain rules ([`EgressServices`]:
//! a DNS resolver and a filtering proxy).
//!
//! This is the host side's one fence around `unsafe` for networking: entering namespaces
//! (`setns`, on threads of their own, never on an async runtime's workers), the tap ioctl and
//! raw netlink. Callers get names and addresses, never namespaces to enter themselves.
//!
//! Setting up a slot takes netlink requests (`rtnetlink`) and one `nft` run, where it used to
//! take about fifteen `ip`/`nft`/`sh` processes.

mod egress;
mod firewall;
mod metadata;
mod netlink;
mod netns;
mod slot;
mod tap;
mod uplink;

pub use egress::{EGRESS_IP, EgressConfig, EgressServices, EgressServicesError, OnLearned};
pub use firewall::{PROXY_PORT, is_public};
pub use metadata::{Metadata, MetadataError, MetadataServer, token_hash};
pub use netns::{enter_netns_on_exec, enter_netns_with_tap_on_exec};
pub use slot::{
    EGRESS_CHAIN, HOST_VETH_PREFIX, MAX_SLOTS, NETNS_PREFIX, NFT_TABLE, Slot, SlotError,
    SlotHandle, TAP_NAME, delete_link, delete_netns, host_addresses,
};
pub use uplink::{Uplink, default_uplink};
