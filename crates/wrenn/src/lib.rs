//! The `wrenn` command as a library: each subcommand is a module with an `Args` type (clap) and
//! a `run` function, so `main.rs` only parses and dispatches.

pub mod agent;
pub mod cli;
mod host;
mod progress;
pub mod server;
pub mod up;
