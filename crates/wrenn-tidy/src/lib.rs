//! Repository checks, run as `cargo test -p wrenn-tidy` (see `tests/tidy.rs`).
