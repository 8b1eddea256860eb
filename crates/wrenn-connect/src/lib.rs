//! A small Connect protocol server layer on axum, prost and pbjson.
//!
//! It serves unary, server-streaming and client-streaming procedures over HTTP/1.1 and h2c with
//! both codecs the Connect protocol defines: JSON (`application/json`,
//! `application/connect+json`) and binary protobuf (`application/proto`,
//! `application/connect+proto`). It honours `Connect-Timeout-Ms` (the handler, or the stream,
//! ends with `deadline_exceeded`), accepts gzip-compressed requests, bounds message sizes and
//! writes Connect error bodies and end-of-stream messages.
//!
//! Handlers get a [`RequestContext`] with the request's headers and extensions, so services can
//! read protocol headers such as `Keepalive-Ping-Interval` and what middleware put there.
//!
//! Why our own layer: envd needs per-request access to headers and to its own process lifetimes
//! (a `Connect-Timeout-Ms` on `Start` bounds the process, not just the call), keepalives are
//! application messages, and the messages are prost types shared with the rest of the
//! workspace; the `connectrpc` crate brings its own message library instead.

mod client;
mod envelope;
mod error;
mod keepalive;
mod server;

pub use client::{Client, ClientError};
pub use envelope::{Decoder, Envelope, EnvelopeError, FLAG_COMPRESSED, FLAG_END_STREAM, encode};
pub use error::{Code, ConnectError, WireError};
pub use keepalive::with_keepalive;
pub use server::{BoxStream, Codec, DEFAULT_MAX_MESSAGE_BYTES, Message, RequestContext, RpcRouter};

/// The header that sets the keepalive cadence of server streams (seconds).
pub const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";
/// The header that sets the call's deadline (milliseconds).
pub const TIMEOUT_HEADER: &str = "connect-timeout-ms";
