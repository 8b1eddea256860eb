//! The host agent's microVM runtime, as a library: accelerator choice ([`accel`]), QEMU VMs
//! ([`vm`]) booting the guest images of `wrenn-image` in the network slots of `wrenn-hostnet`,
//! template snapshots and restores ([`snapshot`]) and the envd lifecycle client ([`envd`]);
//! slot and pre-started QEMU pools ([`pool`]), and on-disk VM records for crash recovery
//! ([`state`]); the traffic proxy into sandboxes ([`proxy`]).

pub mod accel;
pub mod envd;
pub mod memdiff;
pub mod observe;
pub mod pool;
pub mod proxy;
pub mod rpc;
pub mod sandbox;
pub mod snapshot;
pub mod state;
pub mod template;
pub mod vm;
