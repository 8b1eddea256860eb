//! The host agent's microVM runtime, as a library: accelerator choice ([`accel`]), guest
//! images ([`image`]), QEMU VMs ([`vm`]), template snapshots and restores ([`snapshot`]),
//! network slots ([`slot`]) and the envd lifecycle client ([`envd`]).

pub mod accel;
pub mod envd;
pub mod image;
pub mod slot;
pub mod snapshot;
pub mod vm;
