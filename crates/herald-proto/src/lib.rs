//! Herald wire protocol: types and codecs, with no I/O and no runtime.
//!
//! # Layout
//! - [`json`]: JSON v1 (`herald.json.v1`): parsing client frames into [`json::Request`] and
//!   encoding every server frame (welcome, reply, error, message, reconnect, pong) into
//!   [`bytes::Bytes`] that can be shared between connections.
//! - [`close`]: the WebSocket close codes of the protocol.
//! - [`ws`]: WebSocket framing (RFC 6455, server side): client frames decoded and unmasked in
//!   place, server frames encoded once and shared between connections.
//! - [`stomp`]: STOMP 1.2 (client frames decoded with limits; CONNECTED, MESSAGE — a
//!   per-subscription head and a shared tail —, RECEIPT, ERROR encoded). Fuzzed: `fuzz/`.
//! - [`sse`]: Server-Sent Events framing.
//!
//! Everything here is pure: bytes in, values out (and back), so it can be unit-tested and
//! fuzzed on bytes alone.

pub mod close;
pub mod json;
pub mod sse;
pub mod stomp;
pub mod ws;
