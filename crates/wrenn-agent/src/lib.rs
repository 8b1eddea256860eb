//! The host agent's microVM runtime, as a library: accelerator choice ([`accel`]), QEMU VMs
//! ([`vm`]) booting the guest images of `wrenn-image` in the network slots of `wrenn-hostnet`,
//! each QEMU jailed ([`jail`]: own uid, seccomp, cgroup, mount namespace, descriptors),
//! template snapshots and restores ([`snapshot`]) and the envd lifecycle client ([`envd`]);
//! slot and pre-started QEMU pools ([`pool`]), the one on-disk record per sandbox directory
//! ([`record`]) and the crash-recovery scan over them ([`state`]); the traffic proxy into
//! sandboxes ([`proxy`]). The [`controller`] owns the sandbox table and drives a
//! [`runtime::Runtime`] ([`qemu`] is the real one); [`agent`] is the host facade over it,
//! served by [`rpc`]; [`surface`] is the one listener for the RPC and the proxy, with who may
//! use it (a root-only Unix socket, or TCP with the host's secret).

pub mod accel;
mod agent;
pub mod build;
pub mod builds;
pub mod controller;
pub mod envd;
mod fault;
pub mod host;
pub mod hotpool;
pub mod jail;
mod memdiff;
mod observe;
pub mod pool;
pub mod proxy;
pub mod qemu;
pub mod record;
pub mod rpc;
pub mod runtime;
pub mod sandbox;
pub mod shared;
pub mod snapshot;
pub mod snapshots;
pub mod state;
pub mod surface;
pub mod template;
pub mod vm;

pub use agent::Agent;

/// An error with its causes, `outer: inner: ...`, for logs and RPC messages (the causes are
/// kept in `source()`, never repeated in a variant's text).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
