//! Control-plane domain logic without I/O: typed IDs, sandbox states and transitions, placement
//! scoring, timeout arithmetic and egress policies.
//!
//! Nothing here reads a clock, a socket or a file: callers pass the current time and the random
//! bytes in, so every rule is a plain function with plain unit tests.

#![forbid(unsafe_code)]

mod egress;
mod ids;
mod placement;
mod state;
mod timeout;

pub use egress::{
    ALL_TRAFFIC, DomainPattern, EgressError, EgressPolicy, Ipv4Net, MAX_RULES, Rule, Verdict,
};
pub use ids::{HostId, IdError, SANDBOX_ID_LEN, SandboxId, SnapshotId, TeamId, TemplateId};
pub use placement::{HostCapacity, Request as PlacementRequest, pick_host, pick_host_sampled};
pub use state::{Action, PublicState, SandboxState, TransitionError};
pub use timeout::{
    DEFAULT_TIMEOUT_SECS, Deadline, MAX_TIMEOUT_SECS, MIN_REFRESH_SECS, TimeoutError, UnixMillis,
    backstop,
};
