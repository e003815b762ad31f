//! The local subscription index and fanout.
//!
//! The index maps each topic to the connections of this node subscribed to it. It is split
//! into shards by topic hash, each behind a `parking_lot::RwLock` that is only ever held for
//! a map operation or one fanout loop — never across an `.await`. Fanout takes the shard's
//! read lock, pushes the shared `Arc<Message>` into each subscriber's [`ConnQueue`] (which
//! never blocks), and releases it: publishers never wait on clients.
//!
//! The hub tells an [`Interest`] listener (the bus) when a topic gets its first local
//! subscriber and when its last one leaves, so a clustered bus only listens for topics this
//! node needs.
//!
//! Lock order, where two are held: a connection's own topic set, then a topic shard. The user
//! map and the connection map are never held together with another lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::message::Message;
use crate::queue::{ConnQueue, Push};
use crate::topic::Topic;

/// A connection id, unique within a node.
pub type ConnId = u64;

const SHARDS: usize = 64;

/// Notified when this node's interest in a topic starts or ends, and (for cluster-wide
/// presence) when a topic's or a user's local count changes. Called outside the hub's locks;
/// must not block. A change notice carries no count: the listener reads the hub's current one
/// when it gets to it, so notices may be coalesced and never go stale.
pub trait Interest: Send + Sync + 'static {
    fn watch(&self, topic: &Topic);
    fn unwatch(&self, topic: &Topic);
    /// A local subscription to `topic` was added or removed.
    fn topic_changed(&self, _topic: &Topic) {}
    /// A local connection of `user` was registered or unregistered.
    fn user_changed(&self, _user: &str) {}
}

/// Session facts of a connection that revocation and expiry checks need; updated on refresh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub jti: Option<String>,
    pub issued_at: Option<u64>,
    pub expires_at: Option<u64>,
}

/// What the hub and the rest of the node share about one connection.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: ConnId,
    pub user: Arc<str>,
    pub queue: ConnQueue,
    pub session: Mutex<Session>,
    /// Topics this connection is subscribed to (explicit and implicit).
    topics: Mutex<Vec<Topic>>,
}

impl ConnHandle {
    pub fn new(id: ConnId, user: Arc<str>, queue: ConnQueue, session: Session) -> Self {
        Self {
            id,
            user,
            queue,
            session: Mutex::new(session),
            topics: Mutex::new(Vec::new()),
        }
    }

    /// How many topics this connection is subscribed to (implicit ones included).
    pub fn subscription_count(&self) -> usize {
        self.topics.lock().len()
    }

    pub fn is_subscribed(&self, topic: &str) -> bool {
        self.topics.lock().iter().any(|t| t.as_str() == topic)
    }
}

/// Result of a fanout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Connections the message was queued for.
    pub queued: usize,
    /// Messages dropped by the full-queue policy.
    pub dropped: usize,
    /// Connections this fanout closed as slow consumers.
    pub slow_closed: usize,
    /// Messages discarded with those connections' queues.
    pub discarded: usize,
}

impl Delivery {
    fn add(&mut self, push: Push) {
        match push {
            Push::Queued => self.queued += 1,
            Push::DroppedOldest => {
                self.queued += 1;
                self.dropped += 1;
            }
            Push::Closed => {}
            Push::SlowConsumer { discarded } => {
                self.slow_closed += 1;
                self.discarded += discarded;
            }
        }
    }
}

/// Why a subscribe was not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    Added,
    AlreadySubscribed,
    LimitReached,
}

/// Point-in-time figures for `/ws/stats` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubStats {
    pub connections: usize,
    pub online_users: usize,
    pub max_connections_per_user: usize,
    pub mean_connections_per_user: f64,
    pub topics: usize,
    pub rooms: usize,
    pub subscriptions: usize,
    pub queued: usize,
}

type TopicShard = HashMap<Topic, HashMap<ConnId, Arc<ConnHandle>>>;
type ConnShard = HashMap<ConnId, Arc<ConnHandle>>;

/// The node's connections and their subscriptions.
pub struct Hub {
    hasher: RandomState,
    topics: Box<[RwLock<TopicShard>]>,
    conns: Box<[RwLock<ConnShard>]>,
    users: Mutex<HashMap<Arc<str>, Vec<ConnId>>>,
    interest: OnceLock<Arc<dyn Interest>>,
    next_id: AtomicU64,
    subscriptions: AtomicUsize,
    topic_count: AtomicUsize,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscriptions", &self.subscriptions)
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            topics: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            conns: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            users: Mutex::new(HashMap::new()),
            interest: OnceLock::new(),
            next_id: AtomicU64::new(1),
            subscriptions: AtomicUsize::new(0),
            topic_count: AtomicUsize::new(0),
        }
    }

    /// Set the listener told about first/last local subscribers (the bus). Once.
    pub fn set_interest(&self, interest: Arc<dyn Interest>) {
        let _ = self.interest.set(interest);
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn topic_shard(&self, topic: &str) -> &RwLock<TopicShard> {
        &self.topics[(self.hasher.hash_one(topic) as usize) % SHARDS]
    }

    fn conn_shard(&self, id: ConnId) -> &RwLock<ConnShard> {
        &self.conns[(id as usize) % SHARDS]
    }

    /// Add a connection. Returns how many local connections its user now has.
    pub fn register(&self, conn: Arc<ConnHandle>) -> usize {
        self.conn_shard(conn.id)
            .write()
            .insert(conn.id, conn.clone());
        let n = {
            let mut users = self.users.lock();
            let list = users.entry(conn.user.clone()).or_default();
            list.push(conn.id);
            list.len()
        };
        if let Some(i) = self.interest.get() {
            i.user_changed(&conn.user);
        }
        n
    }

    /// Remove a connection and all its subscriptions.
    pub fn unregister(&self, conn: &ConnHandle) {
        let topics = std::mem::take(&mut *conn.topics.lock());
        for t in &topics {
            self.remove_from_topic(t, conn.id);
        }
        self.conn_shard(conn.id).write().remove(&conn.id);
        {
            let mut users = self.users.lock();
            if let Some(list) = users.get_mut(&conn.user) {
                list.retain(|id| *id != conn.id);
                if list.is_empty() {
                    users.remove(&conn.user);
                }
            }
        }
        if let Some(i) = self.interest.get() {
            i.user_changed(&conn.user);
        }
    }

    /// Subscribe `conn` to `topic`. `limit` caps the connection's total topic count.
    pub fn subscribe(
        &self,
        conn: &Arc<ConnHandle>,
        topic: &Topic,
        limit: usize,
    ) -> SubscribeOutcome {
        let mut mine = conn.topics.lock();
        if mine.iter().any(|t| t == topic) {
            return SubscribeOutcome::AlreadySubscribed;
        }
        if mine.len() >= limit {
            return SubscribeOutcome::LimitReached;
        }
        mine.push(topic.clone());
        let first = {
            let mut shard = self.topic_shard(topic.as_str()).write();
            let subs = shard.entry(topic.clone()).or_default();
            subs.insert(conn.id, conn.clone());
            subs.len() == 1
        };
        drop(mine);
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        if first {
            self.topic_count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(i) = self.interest.get() {
            if first {
                i.watch(topic);
            }
            i.topic_changed(topic);
        }
        SubscribeOutcome::Added
    }

    /// Unsubscribe; returns whether the connection was subscribed.
    pub fn unsubscribe(&self, conn: &ConnHandle, topic: &str) -> bool {
        let removed = {
            let mut mine = conn.topics.lock();
            mine.iter()
                .position(|t| t.as_str() == topic)
                .map(|pos| mine.swap_remove(pos))
        };
        match removed {
            Some(t) => {
                self.remove_from_topic(&t, conn.id);
                true
            }
            None => false,
        }
    }

    fn remove_from_topic(&self, topic: &Topic, id: ConnId) {
        let last = {
            let mut shard = self.topic_shard(topic.as_str()).write();
            match shard.get_mut(topic.as_str()) {
                Some(subs) => {
                    if subs.remove(&id).is_none() {
                        return;
                    }
                    if subs.is_empty() {
                        shard.remove(topic.as_str());
                        true
                    } else {
                        false
                    }
                }
                None => return,
            }
        };
        self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        if last {
            self.topic_count.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(i) = self.interest.get() {
            if last {
                i.unwatch(topic);
            }
            i.topic_changed(topic);
        }
    }

    /// The topics this node has local subscribers for (what a clustered bus listens to).
    pub fn topics(&self) -> Vec<Topic> {
        let mut all = Vec::with_capacity(self.topic_count.load(Ordering::Relaxed));
        for shard in self.topics.iter() {
            all.extend(shard.read().keys().cloned());
        }
        all
    }

    /// Queue `msg` for every local subscriber of its topic. Never blocks on a client.
    pub fn deliver(&self, msg: &Arc<Message>) -> Delivery {
        let mut d = Delivery::default();
        let shard = self.topic_shard(msg.topic.as_str()).read();
        if let Some(subs) = shard.get(msg.topic.as_str()) {
            for conn in subs.values() {
                d.add(conn.queue.push_message(msg.clone()));
            }
        }
        d
    }

    /// Queue `msg` for every local connection of `user` (durable inbox delivery: every tab
    /// of the user gets it, whatever it subscribed to).
    pub fn deliver_to_user(&self, user: &str, msg: &Arc<Message>) -> Delivery {
        let mut d = Delivery::default();
        for conn in self.user_connections(user) {
            d.add(conn.queue.push_message(msg.clone()));
        }
        d
    }

    /// Local subscribers of a topic.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.topic_shard(topic)
            .read()
            .get(topic)
            .map_or(0, HashMap::len)
    }

    pub fn connection(&self, id: ConnId) -> Option<Arc<ConnHandle>> {
        self.conn_shard(id).read().get(&id).cloned()
    }

    /// The local connections of a user.
    pub fn user_connections(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        let ids: Vec<ConnId> = self.users.lock().get(user).cloned().unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.connection(id))
            .collect()
    }

    pub fn user_connection_count(&self, user: &str) -> usize {
        self.users.lock().get(user).map_or(0, Vec::len)
    }

    /// Online users and their local connection counts.
    pub fn online_users(&self) -> Vec<(Arc<str>, usize)> {
        self.users
            .lock()
            .iter()
            .map(|(u, c)| (u.clone(), c.len()))
            .collect()
    }

    /// Call `f` for every local connection (shard by shard; `f` must not call back into the
    /// hub's connection map).
    pub fn for_each_connection(&self, mut f: impl FnMut(&Arc<ConnHandle>)) {
        for shard in self.conns.iter() {
            for c in shard.read().values() {
                f(c);
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.iter().map(|s| s.read().len()).sum()
    }

    pub fn stats(&self) -> HubStats {
        let (online, max, total_user_conns) = {
            let users = self.users.lock();
            let max = users.values().map(Vec::len).max().unwrap_or(0);
            let total: usize = users.values().map(Vec::len).sum();
            (users.len(), max, total)
        };
        let mut rooms = 0;
        for shard in self.topics.iter() {
            rooms += shard
                .read()
                .keys()
                .filter(|t| t.as_str().starts_with("room/"))
                .count();
        }
        let mut queued = 0;
        self.for_each_connection(|c| queued += c.queue.len());
        HubStats {
            connections: self.connection_count(),
            online_users: online,
            max_connections_per_user: max,
            mean_connections_per_user: if online == 0 {
                0.0
            } else {
                total_user_conns as f64 / online as f64
            },
            topics: self.topic_count.load(Ordering::Relaxed),
            rooms,
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            queued,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageBuilder;
    use crate::queue::Outgoing;
    use serde_json::value::RawValue;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);
    impl Interest for Recorder {
        fn watch(&self, t: &Topic) {
            self.0.lock().push(format!("+{t}"));
        }
        fn unwatch(&self, t: &Topic) {
            self.0.lock().push(format!("-{t}"));
        }
    }

    fn conn(hub: &Hub, user: &str) -> Arc<ConnHandle> {
        let c = Arc::new(ConnHandle::new(
            hub.next_conn_id(),
            user.into(),
            ConnQueue::new(16, Duration::from_secs(5)),
            Session::default(),
        ));
        hub.register(c.clone());
        c
    }

    fn queued(c: &ConnHandle) -> usize {
        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        match c.queue.poll_drain(&mut cx, &mut out, usize::MAX) {
            Poll::Ready(_) | Poll::Pending => out
                .iter()
                .filter(|o| matches!(o, Outgoing::Message(_)))
                .count(),
        }
    }

    fn msg(topic: &str) -> Arc<Message> {
        Arc::new(
            MessageBuilder::new(
                Topic::parse(topic).unwrap(),
                "e",
                RawValue::from_string("1".into()).unwrap(),
            )
            .build(),
        )
    }

    #[test]
    fn fanout_reaches_only_subscribers_and_interest_follows() {
        let hub = Hub::new();
        let rec = Arc::new(Recorder::default());
        hub.set_interest(rec.clone());
        let a = conn(&hub, "a");
        let b = conn(&hub, "b");
        let t = Topic::parse("x/y").unwrap();
        assert_eq!(hub.subscribe(&a, &t, 10), SubscribeOutcome::Added);
        assert_eq!(
            hub.subscribe(&a, &t, 10),
            SubscribeOutcome::AlreadySubscribed
        );
        assert_eq!(hub.subscribe(&b, &t, 10), SubscribeOutcome::Added);
        assert_eq!(hub.subscriber_count("x/y"), 2);
        let d = hub.deliver(&msg("x/y"));
        assert_eq!(d.queued, 2);
        assert_eq!(hub.deliver(&msg("x/z")).queued, 0);
        assert_eq!(queued(&a), 1);
        assert!(hub.unsubscribe(&a, "x/y"));
        assert!(!hub.unsubscribe(&a, "x/y"));
        hub.unregister(&b);
        assert_eq!(hub.subscriber_count("x/y"), 0);
        assert_eq!(*rec.0.lock(), vec!["+x/y".to_string(), "-x/y".to_string()]);
        assert_eq!(hub.stats().subscriptions, 0);
        assert_eq!(hub.stats().topics, 0);
    }

    #[test]
    fn users_and_limits() {
        let hub = Hub::new();
        let a1 = conn(&hub, "a");
        let _a2 = conn(&hub, "a");
        assert_eq!(hub.user_connection_count("a"), 2);
        assert_eq!(hub.user_connections("a").len(), 2);
        let t1 = Topic::parse("t1").unwrap();
        let t2 = Topic::parse("t2").unwrap();
        assert_eq!(hub.subscribe(&a1, &t1, 1), SubscribeOutcome::Added);
        assert_eq!(hub.subscribe(&a1, &t2, 1), SubscribeOutcome::LimitReached);
        let s = hub.stats();
        assert_eq!(
            (s.connections, s.online_users, s.max_connections_per_user),
            (2, 1, 2)
        );
        hub.unregister(&a1);
        assert_eq!(hub.user_connection_count("a"), 1);
    }
}
