//! The Wrenn control plane: the E2B-compatible REST API, the store, placement onto host
//! agents, sandbox timeouts and the edge proxy.

#![forbid(unsafe_code)]

pub mod agents;
mod api;
mod config;
mod error;
mod http;
mod proxy;
pub mod reaper;
mod service;
pub mod store;
pub mod tokens;

pub use config::{Config, DEFAULT_ENVD_VERSION};
pub use error::ApiError;
pub use http::{HEADER_READ_TIMEOUT, IDLE_TIMEOUT, app, serve, serve_with_idle};
pub use service::{ControlPlane, Reconciled};
