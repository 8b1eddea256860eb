//! Host networking for sandboxes: network slots ([`Slot`]: a namespace with a tap for QEMU, a
//! veth pair to the host and an nftables firewall) and the per-slot metadata endpoint
//! ([`MetadataServer`]).
//!
//! This is the host side's one fence around `unsafe` for networking: entering namespaces
//! (`setns`, on threads of their own, never on an async runtime's workers) and raw netlink.
//! Callers get names and addresses, never file descriptors or namespaces to enter themselves.

mod metadata;
mod netns;
mod slot;

pub use metadata::{Metadata, MetadataError, MetadataServer, token_hash};
pub use netns::enter_netns_on_exec;
pub use slot::{
    EGRESS_CHAIN, GUEST_IP, HOST_VETH_PREFIX, MAX_SLOTS, METADATA_IP, METADATA_PORT, NETNS_PREFIX,
    NFT_TABLE, Slot, SlotError, TAP_IP, TAP_NAME,
};
