//! The seams a cluster plugs into: [`Bus`] (message routing between nodes) and [`Presence`]
//! (who is online, cluster-wide), with their single-node in-memory implementations.
//!
//! A bus carries three kinds of traffic:
//! - topic messages, delivered to every node that watches the topic ([`Bus::publish`]); a node
//!   watches exactly the topics it has local subscribers for (the hub calls
//!   [`Interest::watch`] / [`Interest::unwatch`]);
//! - control events for every node: revocations and user disconnects ([`Bus::control`]);
//! - directed events for one node's own channel, such as a reply for a connection held there
//!   ([`Bus::send_to_node`]).
//!
//! What arrives from the bus is handed to a [`BusSink`] (the server's router).

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::hub::{ConnId, Hub, Interest};
use crate::message::Message;
use crate::topic::Topic;

/// A bus failure. Publishers see it as 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("unknown node: {0}")]
    UnknownNode(String),
}

/// An event every node applies to its local connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// Close every connection of this user with 4011.
    DisconnectUser { user: String },
    /// Queue a ready frame (JSON) on every connection of this user (a command reply that
    /// names no connection).
    ToUser { user: String, frame: Bytes },
    /// Revoke a token id and/or a user's tokens issued at or before `at` (Unix seconds),
    /// until `until` (Unix seconds; `None`: the configured default).
    Revoke {
        jti: Option<String>,
        user: Option<String>,
        at: u64,
        until: Option<u64>,
    },
}

/// An event for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A ready frame for one local connection.
    ToConnection { conn: ConnId, frame: Bytes },
}

/// Receives what the bus delivers to this node.
pub trait BusSink: Send + Sync + 'static {
    fn on_message(&self, msg: Arc<Message>);
    fn on_control(&self, event: ControlEvent);
    fn on_node_event(&self, event: NodeEvent);
}

/// Routes messages between the nodes of a cluster.
#[async_trait]
pub trait Bus: Interest {
    /// Where deliveries for this node go. Called once, before any traffic.
    fn attach(&self, sink: Arc<dyn BusSink>);
    /// Deliver to every node watching `msg.topic`, this one included.
    async fn publish(&self, msg: Arc<Message>) -> Result<(), BusError>;
    /// Deliver a control event to every node, this one included.
    async fn control(&self, event: ControlEvent) -> Result<(), BusError>;
    /// Deliver an event to one node's own channel.
    async fn send_to_node(&self, node: &str, event: NodeEvent) -> Result<(), BusError>;
    /// Whether the bus is reachable now (for `/readyz`).
    fn healthy(&self) -> bool;
    /// Resolves once the bus delivers `topic` to this node (after the hub's
    /// [`Interest::watch`]), so a subscriber is only told "subscribed" when messages published
    /// anywhere in the cluster will reach it. Immediate on a single node.
    async fn watching(&self, _topic: &Topic) -> Result<(), BusError> {
        Ok(())
    }
    /// The revocations made on any node that are still in force (`until` in the future), for
    /// a node that starts after them: a clustered bus keeps each [`ControlEvent::Revoke`] it
    /// carries (with `until` set) until it ends. None on a single node.
    async fn revocations(&self) -> Result<Vec<ControlEvent>, BusError> {
        Ok(Vec::new())
    }
}

/// Cluster-wide presence: connection counts per user.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// The user's connection count across the cluster, including connections just registered.
    async fn user_connections(&self, user: &str) -> Result<u64, BusError>;
    /// Online users with their connection counts.
    async fn online(&self) -> Result<Vec<(String, u64)>, BusError>;
    /// Subscribers of a topic across the cluster.
    async fn topic_subscribers(&self, topic: &Topic) -> Result<u64, BusError>;
}

/// The single-node bus: a publish is a direct call into the local sink.
pub struct MemoryBus {
    node_id: String,
    sink: OnceLock<Arc<dyn BusSink>>,
}

impl MemoryBus {
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            sink: OnceLock::new(),
        }
    }

    fn sink(&self) -> Result<&Arc<dyn BusSink>, BusError> {
        self.sink
            .get()
            .ok_or_else(|| BusError::Unavailable("bus not attached".into()))
    }
}

impl Interest for MemoryBus {
    // One node: every publish reaches the local hub, which ignores topics nobody watches.
    fn watch(&self, _topic: &Topic) {}
    fn unwatch(&self, _topic: &Topic) {}
}

#[async_trait]
impl Bus for MemoryBus {
    fn attach(&self, sink: Arc<dyn BusSink>) {
        let _ = self.sink.set(sink);
    }

    async fn publish(&self, msg: Arc<Message>) -> Result<(), BusError> {
        self.sink()?.on_message(msg);
        Ok(())
    }

    async fn control(&self, event: ControlEvent) -> Result<(), BusError> {
        self.sink()?.on_control(event);
        Ok(())
    }

    async fn send_to_node(&self, node: &str, event: NodeEvent) -> Result<(), BusError> {
        if node != self.node_id {
            return Err(BusError::UnknownNode(node.to_owned()));
        }
        self.sink()?.on_node_event(event);
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.sink.get().is_some()
    }
}

/// Single-node presence: the local hub is the whole cluster.
pub struct MemoryPresence {
    hub: Arc<Hub>,
}

impl MemoryPresence {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn user_connections(&self, user: &str) -> Result<u64, BusError> {
        Ok(self.hub.user_connection_count(user) as u64)
    }

    async fn online(&self) -> Result<Vec<(String, u64)>, BusError> {
        Ok(self
            .hub
            .online_users()
            .into_iter()
            .map(|(u, n)| (u.to_string(), n as u64))
            .collect())
    }

    async fn topic_subscribers(&self, topic: &Topic) -> Result<u64, BusError> {
        Ok(self.hub.subscriber_count(topic.as_str()) as u64)
    }
}
