//! What every client transport shares: a session's registration in the hub and its
//! requests, whatever the wire.
//!
//! JSON v1 ([`crate::ws`]), STOMP ([`crate::stomp`]), SSE ([`crate::sse`]), long polling
//! ([`crate::poll`]) and the telemetry endpoints ([`crate::telemetry`]) each own their socket
//! and their encoding; authentication, the user connection limit, implicit subscriptions,
//! the ACL, subscribe with history/retained/resume, client publishes, commands, acks, token
//! refresh, the abuse counter and the delivery bookkeeping (durable `sent` marks,
//! retransmission, publish-to-write latency) are here, once, so every transport behaves the
//! same (SPEC §3: "the same auth, ACL, limits and metrics as JSON v1").

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use herald_core::acl::Action;
use herald_core::error::Error;
use herald_core::history::Recovery;
use herald_core::hub::{ConnHandle, Session as HubSession, SubscribeOutcome};
use herald_core::identity::{Authenticated, Authenticator, Identity};
use herald_core::message::{Message, MessageBuilder, now_secs};
use herald_core::queue::ConnQueue;
use herald_core::topic::Topic;
use herald_proto::close;
use serde_json::value::RawValue;
use tokio::time::Sleep;

use crate::publish::{PublishRequest, publish};
use crate::state::AppState;

/// Durable messages replayed on connect, at most.
const REPLAY_LIMIT: usize = 1000;

/// Unregisters the connection however its task ends.
struct Registration {
    state: Arc<AppState>,
    conn: Arc<ConnHandle>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.state.hub.unregister(&self.conn);
    }
}

/// What handling a client request asks the connection loop to do next.
pub enum Flow {
    Continue,
    Close(u16, String),
}

/// One authenticated client session, registered in the hub until dropped.
pub struct Session {
    pub conn: Arc<ConnHandle>,
    /// Unregisters the connection from the hub when the session is dropped.
    _registration: Registration,
    /// Claims and roles for ACL checks; replaced on refresh.
    pub identity: Identity,
    /// `c-<node>-<n>`: what `POST /api/v1/replies` and the command envelope name.
    pub conn_id: String,
    /// Token expiry (`None`: never).
    pub expiry: Option<Instant>,
    /// Set by [`Session::refresh`]: the loop re-arms its timer.
    pub expiry_changed: bool,
    errors_window_start: Instant,
    errors_in_window: u32,
}

/// Why [`open`] refused a session.
#[derive(Debug)]
pub enum Refused {
    /// Over `limits.max_connections_per_user` (close 4029 / HTTP 429).
    TooManyConnections,
}

/// The client transports, for the metrics and their session's implicit subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// JSON v1 on `/ws`.
    Json,
    Stomp,
    Sse,
    Poll,
    Telemetry,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::Json,
        Transport::Stomp,
        Transport::Sse,
        Transport::Poll,
        Transport::Telemetry,
    ];

    /// The `transport` label of `herald_connections_opened_total`.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Json => "json",
            Transport::Stomp => "stomp",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
            Transport::Telemetry => "telemetry",
        }
    }

    /// Whether its sessions hold the implicit subscriptions (`user/{id}`, `broadcast`). STOMP
    /// sessions receive what their `SUBSCRIBE`s name; a telemetry socket its device only.
    fn implicit(self) -> bool {
        matches!(self, Transport::Json | Transport::Sse | Transport::Poll)
    }
}

/// Registers a session for `auth`, checks the user's connection limit (cluster-wide) and,
/// for the transports that have them, subscribes the user's inbox and `broadcast` (confirmed
/// by the bus before this returns, so nothing published afterwards on any node can miss the
/// session).
pub async fn open(
    state: &Arc<AppState>,
    auth: Authenticated,
    transport: Transport,
) -> Result<Session, Refused> {
    let limits = &state.config.limits;
    let user = auth.identity.user_id.clone();
    let id = state.hub.next_conn_id();
    let conn = Arc::new(ConnHandle::new(
        id,
        user.clone(),
        ConnQueue::new(limits.send_queue, limits.slow_consumer_timeout),
        HubSession {
            jti: auth.jti.clone(),
            issued_at: auth.issued_at,
            expires_at: auth.expires_at,
        },
    ));
    state.hub.register(conn.clone());
    let registration = Registration {
        state: state.clone(),
        conn: conn.clone(),
    };
    state.metrics.connection_opened(transport.label());

    // The user connection limit counts every node's connections (cluster-wide presence).
    let count = match state.presence.user_connections(&user).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "presence unavailable; using the local count");
            state.hub.user_connection_count(&user) as u64
        }
    };
    if count > limits.max_connections_per_user as u64 {
        state.metrics.connection_closed("too_many_connections");
        return Err(Refused::TooManyConnections);
    }

    if transport.implicit() {
        // Valid by construction: the authenticator only admits user ids that are topic
        // segments.
        let implicit = Topic::user(&user).into_iter().chain([Topic::broadcast()]);
        for topic in implicit {
            state
                .hub
                .subscribe(&conn, &topic, subscription_limit(state));
            // In a cluster: the session only starts once the bus delivers these here.
            if let Err(e) = state.bus.watching(&topic).await {
                tracing::warn!(error = %e, %topic, "bus subscription not confirmed; messages from other nodes may be late");
            }
        }
    }

    Ok(Session {
        conn_id: format!("c-{}-{id}", state.node_id),
        conn,
        _registration: registration,
        identity: auth.identity,
        expiry: auth.expires_at.map(expiry_instant),
        expiry_changed: false,
        errors_window_start: Instant::now(),
        errors_in_window: 0,
    })
}

/// Per-connection subscription limit as the hub counts it (the two implicit topics on top).
fn subscription_limit(state: &AppState) -> usize {
    state.config.limits.max_subscriptions_per_connection + 2
}

/// Unix seconds → the `Instant` it falls at.
pub fn expiry_instant(exp: u64) -> Instant {
    let now = now_secs();
    Instant::now() + Duration::from_secs(exp.saturating_sub(now))
}

/// What a subscribe to one topic gave.
#[derive(Debug, Clone)]
pub struct Subscribed {
    pub topic: Topic,
    /// The topic's latest seq, when it has history or `since` was given.
    pub seq: Option<u64>,
    /// With `since`: whether every missed message was queued.
    pub recovered: Option<bool>,
}

impl Session {
    /// Queues the user's durable inbox: everything not yet acked, oldest first, at most one
    /// queue's worth per call (so a backlog can never make the replay itself close the
    /// connection as a slow consumer; the rest follows on the next connect). With `only`,
    /// just the messages of that topic (a STOMP subscription replays what it covers).
    pub async fn replay_inbox(&self, state: &AppState, only: Option<&Topic>) {
        let replay_limit = REPLAY_LIMIT.min(state.config.limits.send_queue);
        match state.store.undelivered(&self.conn.user, replay_limit).await {
            Ok(records) => {
                for r in records {
                    if only.is_some_and(|t| t.as_str() != r.topic) {
                        continue;
                    }
                    let Ok(topic) = Topic::parse(&r.topic) else {
                        continue;
                    };
                    let mut b = MessageBuilder::new(topic, r.event, r.data);
                    b.id = Some(r.id);
                    b.trace_id = r.trace_id;
                    b.durable = true;
                    b.ts = Some(r.created_at);
                    self.conn.queue.push_message(Arc::new(b.build()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, user = %self.conn.user, "inbox replay failed; it will be retried on the next connect")
            }
        }
    }

    /// Counts bad input towards the abuse limit (refusals such as 403 or 429 do not); past
    /// `limits.max_errors_per_minute` the connection is to be closed with 4008.
    pub fn count_abuse(&mut self, state: &AppState, err: &Error) -> Flow {
        if !matches!(
            err,
            Error::BadRequest(_) | Error::Topic(_) | Error::TooLarge(_)
        ) {
            return Flow::Continue;
        }
        let now = Instant::now();
        if now.duration_since(self.errors_window_start) >= Duration::from_secs(60) {
            self.errors_window_start = now;
            self.errors_in_window = 0;
        }
        self.errors_in_window += 1;
        if self.errors_in_window > state.config.limits.max_errors_per_minute {
            return Flow::Close(close::POLICY, "too many bad frames".into());
        }
        Flow::Continue
    }

    /// The subscribe rate limit, checked once per subscribe request.
    pub fn may_subscribe(&self, state: &AppState) -> Result<(), Error> {
        if state.limiters.subscribe(&self.conn.user) {
            Ok(())
        } else {
            Err(Error::RateLimited("too many subscribe requests"))
        }
    }

    /// One topic of a subscribe (ACL, limits, history, retained). Under the topic's ordering
    /// lock (when it has history or a retained value, or `since` is given): subscribe in the
    /// hub, then queue the missed history (or the retained value, when `snapshot`), so that
    /// live messages can only follow them.
    pub async fn subscribe(
        &self,
        state: &AppState,
        raw: &str,
        since: Option<u64>,
        snapshot: bool,
    ) -> Result<Subscribed, Error> {
        let topic = Topic::parse(raw)?;
        if !state.acl.allows(Action::Subscribe, &topic, &self.identity) {
            return Err(Error::Forbidden(topic.as_str().to_owned()));
        }
        let options = state.acl.options(&topic);
        let ordered = since.is_some() || options.history.is_some() || options.retain;
        let _guard = if ordered {
            Some(state.order.lock(topic.as_str()).await)
        } else {
            None
        };
        let limit = subscription_limit(state);
        if state.hub.subscribe(&self.conn, &topic, limit) == SubscribeOutcome::LimitReached {
            return Err(Error::TooManySubscriptions(limit - 2));
        }
        // In a cluster, "subscribed" means messages published on any node reach this one; and
        // the history is read only once that holds, so nothing falls between the two.
        if let Err(e) = state.bus.watching(&topic).await {
            state.hub.unsubscribe(&self.conn, topic.as_str());
            return Err(e.into());
        }
        let mut out = Subscribed {
            topic: topic.clone(),
            seq: None,
            recovered: None,
        };
        match since {
            Some(since) => {
                let (latest, recovered) = match state.history.since(&topic, since).await? {
                    // All of the missed messages are queued, or none and the client is told.
                    Recovery::Complete { messages, latest } => (
                        latest,
                        messages.is_empty() || self.conn.queue.push_replay(&messages),
                    ),
                    Recovery::Gap { latest } => (latest, false),
                };
                // Without history on this topic nothing was kept: only `since` = current is
                // whole.
                out.seq = Some(latest);
                out.recovered = Some(recovered && (options.history.is_some() || since == latest));
            }
            None => {
                if options.history.is_some() {
                    out.seq = Some(state.history.latest(&topic).await?);
                }
                if options.retain
                    && snapshot
                    && let Some(m) = state.history.retained(&topic).await?
                {
                    self.conn.queue.push_retained(m);
                }
            }
        }
        Ok(out)
    }

    /// Leaves topics; the user inbox cannot be left (durable delivery relies on it).
    pub fn unsubscribe(&self, state: &AppState, topics: &[String]) -> Result<(), Error> {
        let inbox = Topic::user(&self.conn.user).ok();
        if let Some(t) = topics
            .iter()
            .find(|t| inbox.as_ref().is_some_and(|i| i.as_str() == t.as_str()))
        {
            return Err(Error::BadRequest(format!(
                "cannot unsubscribe from the user inbox {t}"
            )));
        }
        for t in topics {
            state.hub.unsubscribe(&self.conn, t);
        }
        Ok(())
    }

    /// A client publish (ACL `publish`, rate limit, never durable) through the one publish
    /// path. Returns the message id and seq.
    pub async fn publish(
        &self,
        state: &Arc<AppState>,
        topic: String,
        event: String,
        data: Box<RawValue>,
    ) -> Result<(String, Option<u64>), Error> {
        if !state.limiters.client_publish(&self.conn.user) {
            return Err(Error::RateLimited("too many client publishes"));
        }
        let parsed = Topic::parse(&topic)?;
        if !state.acl.allows(Action::Publish, &parsed, &self.identity) {
            return Err(Error::Forbidden(parsed.as_str().to_owned()));
        }
        let req = PublishRequest {
            topic,
            event: Some(event),
            data: Some(data),
            durable: Some(false),
            ..PublishRequest::default()
        };
        let p = publish(state, req, Some(&self.conn.user)).await?;
        Ok((p.id, p.seq))
    }

    /// A `command`: forwarded to its service in a task of its own (see `commands`), whose
    /// reply reaches this connection as a `command_reply` frame. Returns the `trace_id`
    /// (generated when the client gave none). Commands count against
    /// `limits.client_publishes_per_minute`.
    pub fn command(
        &self,
        state: &Arc<AppState>,
        command: &str,
        trace_id: Option<String>,
        data: &RawValue,
    ) -> Result<String, Error> {
        crate::publish::check_token("command", command)?;
        let trace_id = match trace_id {
            Some(t) => {
                crate::publish::check_token("trace_id", &t)?;
                t
            }
            None => herald_core::message::new_id(),
        };
        if !state.limiters.client_publish(&self.conn.user) {
            return Err(Error::RateLimited("too many client publishes and commands"));
        }
        let forward = state.commands.prepare(
            command,
            trace_id.clone(),
            data,
            &self.identity,
            &self.conn_id,
            &state.node_id,
            &self.conn,
        )?;
        tracing::debug!(%trace_id, command, user = %self.conn.user, "command forwarded");
        state.tasks.spawn(forward.run());
        Ok(trace_id)
    }

    /// Acknowledges durable messages; returns how many the store acked.
    pub async fn ack(&self, state: &AppState, ids: &[String]) -> Result<usize, Error> {
        state.inbox.acked(&self.conn.user, ids);
        state
            .store
            .ack(&self.conn.user, ids)
            .await
            .map_err(Error::Store)
    }

    /// A token refresh: the same user's new token extends the session. Returns its expiry.
    pub fn refresh(&mut self, state: &AppState, token: &str) -> Result<Option<u64>, Error> {
        let a = state.auth.authenticate(token)?;
        if a.identity.user_id != self.conn.user {
            return Err(Error::Conflict("token is for another user".into()));
        }
        *self.conn.session.lock() = HubSession {
            jti: a.jti.clone(),
            issued_at: a.issued_at,
            expires_at: a.expires_at,
        };
        self.identity = a.identity;
        self.expiry = a.expires_at.map(expiry_instant);
        self.expiry_changed = true;
        Ok(a.expires_at)
    }
}

/// Delivery bookkeeping of one connection, shared by every transport's writer: which durable
/// messages to write again, and what to record once a batch is written.
///
/// Durable ids this connection wrote recently are remembered with when: the replay at connect
/// and a live delivery of the same new message can race (both are queued), and a
/// retransmission must still go out, so a durable id is written again only after half a retry
/// interval.
#[derive(Default)]
pub struct Deliveries {
    recent: HashMap<Box<str>, Instant>,
}

/// What one written batch held (see [`Deliveries::admit`] and [`Deliveries::written`]).
#[derive(Default)]
pub struct Written {
    messages: u64,
    oldest: Option<Instant>,
    durable_ids: Vec<String>,
}

impl Deliveries {
    /// Call before encoding a batch: forgets old entries.
    pub fn start(&mut self, state: &AppState) -> Written {
        if self.recent.len() > 1024 {
            let store = &state.config.store;
            let keep = store.retry_after * (store.max_retries + 1);
            let now = Instant::now();
            self.recent.retain(|_, at| now.duration_since(*at) < keep);
        }
        Written::default()
    }

    /// Whether to write `m` (a live or retransmitted message) in this batch; counts it when
    /// so. `false`: a durable message written less than half a retry interval ago.
    pub fn admit(
        &mut self,
        state: &AppState,
        conn: &ConnHandle,
        m: &Arc<Message>,
        w: &mut Written,
    ) -> bool {
        if m.durable {
            let now = Instant::now();
            if self
                .recent
                .get(&m.id)
                .is_some_and(|at| now.duration_since(*at) < state.config.store.retry_after / 2)
            {
                return false;
            }
            self.recent.insert(m.id.clone(), now);
            w.durable_ids.push(m.id.to_string());
            state.inbox.written(&conn.user, m);
        } else {
            // Publish-to-write latency is measured on live messages only: replays and
            // retransmissions are old by design.
            w.oldest = Some(w.oldest.map_or(m.received_at, |o| o.min(m.received_at)));
        }
        w.messages += 1;
        true
    }

    /// Counts a message replayed from history (written unconditionally).
    pub fn replayed(w: &mut Written) {
        w.messages += 1;
    }

    /// Call once the batch is written: metrics, and the durable ids marked `sent` in the
    /// store (in a task: the connection goes on writing while the store groups this with
    /// other status changes; order with a later `ack` does not matter, `sent` only applies
    /// to rows still `pending`).
    pub fn written(state: &AppState, conn: &ConnHandle, w: Written) {
        if w.messages > 0 {
            state.metrics.sent.increment(w.messages);
            if let Some(t) = w.oldest {
                state
                    .metrics
                    .publish_to_write
                    .record(t.elapsed().as_secs_f64());
            }
        }
        if !w.durable_ids.is_empty() {
            let store = state.store.clone();
            let user = conn.user.clone();
            let ids = w.durable_ids;
            state.tasks.spawn(async move {
                if let Err(e) = store.mark_sent(&user, &ids).await {
                    tracing::warn!(error = %e, "could not mark durable messages sent");
                }
            });
        }
    }
}

/// The metric label for a close the server asked for.
pub fn close_label(code: u16) -> &'static str {
    match code {
        close::SLOW_CONSUMER => "slow_consumer",
        close::DISCONNECTED => "disconnected",
        close::SERVICE_RESTART => "server_restart",
        close::TOKEN_EXPIRED => "token_expired",
        _ => "server",
    }
}

/// `fut` bounded by `limit`, without a timer when it completes on its first poll: a socket
/// write almost always does, and arming and cancelling a timer per delivery showed in the
/// fanout profile. Only a write that has to wait for the socket gets the deadline (boxed, so
/// an idle connection's future does not carry it).
pub fn bounded<F: Future>(limit: Duration, fut: F) -> Bounded<F> {
    Bounded {
        fut,
        limit,
        deadline: None,
    }
}

pin_project_lite::pin_project! {
    pub struct Bounded<F> {
        #[pin]
        fut: F,
        limit: Duration,
        deadline: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future> Future for Bounded<F> {
    /// `Err(())`: the limit passed first.
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let limit = *this.limit;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        deadline.as_mut().poll(cx).map(|()| Err(()))
    }
}
