//! Herald ingestion and upstream commands (SPEC §7): the brokers backend services already run
//! feed the gateway, and clients' `command`s reach services through them.
//!
//! Sources ([`amqp`], [`redis`], [`nats`]) turn what they consume into publish requests — the
//! JSON body of `POST /api/v1/publish` — and hand each to a [`Submit`] (the server's publish
//! path). What they do with the broker's message follows the answer: acknowledged once
//! [`Submit::submit`] succeeded (the message is stored when durable, on the bus otherwise),
//! dead-lettered when it is [`Rejected::Invalid`] (never redelivered in a loop), retried later
//! when [`Rejected::Unavailable`].
//!
//! Commands ([`command`]): a client's `command` is forwarded as an [`command::Envelope`] to the
//! target the command map names (an AMQP queue, a NATS subject or an HTTP URL); the service's
//! answer comes back as a [`command::Reply`].
//!
//! [`map`] holds the pure mappings (seed 002's and seed 001's Redis channels, user messages).

pub mod command;
pub mod config;
pub mod http;
pub mod map;

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

use async_trait::async_trait;

/// What the publish path made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The message id (the publisher's or a generated one).
    pub id: String,
    /// The id was stored already: nothing was stored or delivered (redelivery of a message
    /// the gateway had stored before it could acknowledge it to the broker).
    pub duplicate: bool,
    /// The message is durable: it was stored before this answer (status `pending`).
    pub stored: bool,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Malformed, refused by the topic rules, too large…: retrying cannot help.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store or the bus is down: the same message may succeed later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// The gateway's publish path, as sources see it.
#[async_trait]
pub trait Submit: Send + Sync + 'static {
    /// Publish `body`, a publish request (the JSON of `POST /api/v1/publish`). `source` names
    /// the source in logs and metrics (`amqp:<queue>`, `redis`, `nats:<subject>`).
    async fn submit(&self, source: &str, body: &[u8]) -> Result<Submitted, Rejected>;
}
