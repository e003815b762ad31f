//! The node's shared state, and the router that applies what the bus delivers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use herald_core::acl::Acl;
use herald_core::bus::{Bus, BusSink, ControlEvent, NodeEvent, Presence};
use herald_core::history::History;
use herald_core::hub::Hub;
use herald_core::message::Message;
use herald_core::store::Store;
use herald_proto::close;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{JwtAuthenticator, Revocation};
use crate::config::Config;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::publish::OrderLocks;

/// Everything a connection task or an API handler needs. Shared as `Arc<AppState>`.
pub struct AppState {
    pub config: Config,
    pub node_id: Arc<str>,
    pub hub: Arc<Hub>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    /// The command map (`[upstream]`).
    pub commands: crate::commands::Commands,
    pub store: Arc<dyn Store>,
    pub history: Arc<dyn History>,
    /// Per-topic ordering of publishes and history resumes.
    pub order: OrderLocks,
    /// Unacked durable messages this node wrote, for retransmission.
    pub inbox: crate::inbox::Inbox,
    pub auth: Arc<JwtAuthenticator>,
    pub acl: Acl,
    pub metrics: Metrics,
    pub limiters: Limiters,
    pub started: Instant,
    /// Set when the drain starts: new WebSocket handshakes are refused with 503.
    pub draining: AtomicBool,
    /// Cancelled when the server must stop.
    pub shutdown: CancellationToken,
    /// Every connection task, so the drain can wait for them.
    pub tasks: TaskTracker,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Applies bus deliveries to the local hub.
pub struct Router {
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    /// Revocations are recorded in the authenticator so later handshakes are refused too.
    pub auth: Arc<JwtAuthenticator>,
}

impl BusSink for Router {
    fn on_message(&self, msg: Arc<Message>) {
        self.metrics.bus_messages.increment(1);
        // A durable message is an inbox message: every connection of its user gets it,
        // whatever topics that connection subscribed to.
        let d = match msg.topic.inbox_owner().filter(|_| msg.durable) {
            Some(user) => self.hub.deliver_to_user(user, &msg),
            None => self.hub.deliver(&msg),
        };
        self.metrics.delivery(&d);
        if let Some(trace_id) = msg.trace_id.as_deref() {
            tracing::debug!(trace_id, topic = %msg.topic, id = %msg.id, queued = d.queued, dropped = d.dropped, "fanout");
        }
    }

    fn on_control(&self, event: ControlEvent) {
        match event {
            ControlEvent::DisconnectUser { user } => {
                for c in self.hub.user_connections(&user) {
                    c.queue.close(close::DISCONNECTED, "disconnected by server");
                }
            }
            ControlEvent::ToUser { user, frame } => {
                for c in self.hub.user_connections(&user) {
                    c.queue.push_frame(frame.clone());
                }
            }
            ControlEvent::Revoke {
                jti,
                user,
                at,
                until,
            } => {
                self.hub.for_each_connection(|c| {
                    let s = c.session.lock();
                    let by_jti = jti.is_some() && s.jti == jti;
                    let by_user = user.as_deref() == Some(&*c.user)
                        && s.issued_at.is_none_or(|iat| iat <= at);
                    drop(s);
                    if by_jti || by_user {
                        c.queue.close(close::DISCONNECTED, "token revoked");
                    }
                });
                self.auth.revoke(Revocation {
                    jti,
                    user,
                    until,
                    at,
                });
            }
        }
    }

    fn on_node_event(&self, event: NodeEvent) {
        match event {
            NodeEvent::ToConnection { conn, frame } => {
                if let Some(c) = self.hub.connection(conn) {
                    c.queue.push_frame(frame);
                }
            }
        }
    }
}
