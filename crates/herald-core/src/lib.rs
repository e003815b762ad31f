//! Herald core: the parts of the gateway that do not touch the network.
//!
//! # Layout
//! - [`topic`]: the topic grammar ([`topic::Topic`] is always valid once built).
//! - [`acl`]: ordered topic rules (subscribe / publish permissions and per-topic options).
//! - [`identity`]: who a connection is, and the [`identity::Authenticator`] trait.
//! - [`message`]: the envelope subscribers receive, encoded once per protocol and shared.
//! - [`queue`]: the bounded per-connection send queue and its slow-consumer policy.
//! - [`hub`]: the sharded subscription index and local fanout.
//! - [`bus`]: the [`bus::Bus`] and [`bus::Presence`] traits the cluster plugs into, and their
//!   in-memory single-node implementations.
//! - [`history`]: topic history (gapless `seq`, resume with `since`) and retained values.
//! - [`store`]: the [`store::Store`] trait (durable user inboxes) and its in-memory implementation.
//! - [`error`]: the one error type and its mapping to protocol codes.
//! - [`redact`]: passwords out of URLs that are logged or answered.
//! - [`duration`]: human durations (`"10s"`, `"5m"`) for configuration.
//!
//! Data flows: publish → [`bus::Bus::publish`] → (every node watching the topic)
//! [`hub::Hub::deliver`] → [`queue::ConnQueue`] of each local subscriber → the connection task
//! in `herald-server`, which writes the shared encoded frame to its socket.

pub mod acl;
pub mod bus;
pub mod duration;
pub mod error;
pub mod history;
pub mod hub;
pub mod identity;
pub mod message;
pub mod queue;
pub mod redact;
pub mod store;
pub mod topic;
