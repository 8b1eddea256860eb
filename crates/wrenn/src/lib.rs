//! The `wrenn` command as a library: each subcommand is a module with an `Args` type (clap) and
//! a `run` function, so `main.rs` only parses and dispatches.

pub mod cli;
mod progress;
pub mod up;
