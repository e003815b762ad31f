//! Herald client: a WebSocket client for the JSON v1 protocol (`/ws`, SPEC §2) and a
//! publisher for the server HTTP API (SPEC §4). Used by the integration tests, the `herald`
//! CLI (`subscribe`, `publish`) and the load generator in `bench/`.
//!
//! # Layout
//! - [`client`]: [`Client`], one connected session. It owns its socket and is driven by the
//!   caller (no background task): connect → welcome → requests with increasing ids, each
//!   waiting for its `reply`; frames that arrive meanwhile are buffered in order and handed
//!   out by [`Client::next_event`] / [`Client::next_message`].
//! - [`frame`]: the JSON v1 frames, pure: server text → [`frame::Frame`] ([`Welcome`],
//!   [`Reply`] or an [`Event`]), and the request bodies the client sends.
//! - [`publisher`]: [`Publisher`], `reqwest` calls to `/api/v1/…` with an API key; non-2xx
//!   JSON errors become [`PublishError::Api`].
//! - [`encode`]: percent-encoding of one URL component (topics in paths, tokens in queries).
//! - [`error`]: [`ClientError`] and [`PublishError`].
//!
//! Plain `ws://` and `http://` only: the crate is built without TLS on purpose.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::ClientError> {
//! use herald_client::Client;
//! let mut c = Client::connect("ws://127.0.0.1:8080/ws", "jwt…").await?;
//! let reply = c.subscribe(&["device/d-9/telemetry"]).await?;
//! assert!(reply.is_ok());
//! let msg = c.next_message().await?;
//! println!("{} {} {}", msg.topic, msg.event, msg.data);
//! # Ok(()) }
//! ```

pub mod client;
pub mod encode;
pub mod error;
pub mod frame;
pub mod publisher;

pub use client::{Client, ConnectOptions, DEFAULT_SUBPROTOCOL, DEFAULT_TIMEOUT, TokenPlacement};
pub use encode::percent_encode;
pub use error::{ClientError, PublishError};
pub use frame::{Event, Message, Reply, Welcome};
pub use publisher::{Notification, PublishRequest, PublishResponse, Publisher};
