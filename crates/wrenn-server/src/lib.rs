//! The Wrenn control plane: the E2B-compatible REST API, the store, placement onto host
//! agents, sandbox timeouts, reconciliation with the agents and the edge proxy.

#![forbid(unsafe_code)]

pub mod agents;
mod api;
mod config;
mod create;
mod error;
mod fork;
pub mod hosts;
mod http;
mod lifecycle;
mod network;
mod proxy;
pub mod reaper;
pub mod reconcile;
mod service;
mod snapshots;
pub mod store;
mod template_info;
mod templates;
mod timing;
pub mod tokens;

pub use config::{Config, DEFAULT_ENVD_VERSION};
pub use create::{IDEMPOTENCY_TTL, IdempotencyKey};
pub use error::ApiError;
pub use http::{HEADER_READ_TIMEOUT, IDLE_TIMEOUT, app, serve, serve_with_idle};
pub use reconcile::Reconciled;
pub use service::ControlPlane;
