//! Herald cluster mode (SPEC §6): several nodes behave as one gateway on Redis or NATS.
//!
//! One object per backend implements the three seams of `herald-core`:
//! - [`Bus`]: topic messages go only to nodes with local subscribers for the topic (each node
//!   subscribes on the bus on its first local subscriber and unsubscribes [`Options::linger`]
//!   after its last), control events (revocations, disconnects) to every node, directed
//!   events to one node's own channel. A message travels as its JSON v1 `message` frame, the
//!   very bytes subscribers receive ([`Message::from_json_frame`] on arrival).
//! - [`Presence`]: each node writes its local per-user connection counts and per-topic
//!   subscriber counts (absolute values, coalesced, see [`local::Changes`]) under keys that
//!   expire with the node ([`Options::presence_ttl`]); queries sum over live nodes.
//! - [`History`]: gapless `seq` allocated on the server, history entries and retained values
//!   stored there, so a resume on any node sees every node's messages.
//!
//! Plus the interest counters of seed 001 ([`interest`]): a key per watched device that an
//! uplink can check before sending telemetry nobody watches.
//!
//! [`Message::from_json_frame`]: herald_core::message::Message::from_json_frame

pub mod interest;
pub mod local;
pub mod wire;

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use herald_core::bus::{Bus, Presence};
use herald_core::history::History;
use herald_core::hub::Hub;
use tokio_util::sync::CancellationToken;

pub use interest::InterestCounters;

/// Why a cluster backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bus.url: {0}")]
    Url(String),
    #[error("bus {backend} at {url}: {message}")]
    Connect {
        backend: &'static str,
        url: String,
        message: String,
    },
    #[error("bus.url: backend {0:?} is not compiled into this build")]
    NotCompiled(&'static str),
}

/// What every backend needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `redis://…` or `nats://…`.
    pub url: String,
    /// This node's id (a valid topic segment, unique in the cluster).
    pub node_id: String,
    /// Prefix of every key, channel, subject and bucket: the nodes of one cluster share it;
    /// two clusters on one server differ.
    pub prefix: String,
    /// A dead node's presence and subscriber counts are gone within this.
    pub presence_ttl: Duration,
    /// How long a node stays subscribed on the bus after its last local subscriber of a topic
    /// left (against subscribe/unsubscribe flapping).
    pub linger: Duration,
    /// Seed 001's interest counters; `None`: none written.
    pub interest: Option<InterestCounters>,
}

/// The three seams of one backend (the same object behind each).
pub struct Cluster {
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    pub history: Arc<dyn History>,
}

/// Connects the backend `options.url` names. Background tasks (bus reader, presence flusher,
/// reconnects) stop when `shutdown` is cancelled. Fails fast when the server is unreachable at
/// start-up; once running, outages are survived (reported by [`Bus::healthy`]).
pub async fn connect(
    options: Options,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) -> Result<Cluster, ClusterError> {
    let scheme = options.url.split("://").next().unwrap_or_default();
    match scheme {
        "redis" | "rediss" => connect_redis(options, hub, shutdown).await,
        "nats" | "tls" => connect_nats(options, hub, shutdown).await,
        _ => Err(ClusterError::Url(format!(
            "{:?} is not a redis:// or nats:// URL",
            options.url
        ))),
    }
}

/// The same object behind the three seams.
#[cfg(any(feature = "redis", feature = "nats"))]
fn seams<T: Bus + Presence + History>(c: Arc<T>) -> Cluster {
    Cluster {
        bus: c.clone(),
        presence: c.clone(),
        history: c,
    }
}

#[cfg(feature = "redis")]
async fn connect_redis(
    options: Options,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) -> Result<Cluster, ClusterError> {
    Ok(seams(
        redis::RedisCluster::connect(options, hub, shutdown).await?,
    ))
}

#[cfg(not(feature = "redis"))]
async fn connect_redis(
    _: Options,
    _: Arc<Hub>,
    _: CancellationToken,
) -> Result<Cluster, ClusterError> {
    Err(ClusterError::NotCompiled("redis"))
}

#[cfg(feature = "nats")]
async fn connect_nats(
    options: Options,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) -> Result<Cluster, ClusterError> {
    Ok(seams(
        nats::NatsCluster::connect(options, hub, shutdown).await?,
    ))
}

#[cfg(not(feature = "nats"))]
async fn connect_nats(
    _: Options,
    _: Arc<Hub>,
    _: CancellationToken,
) -> Result<Cluster, ClusterError> {
    Err(ClusterError::NotCompiled("nats"))
}
