//! What a backend learns from the local hub and applies to the cluster server, shared by the
//! Redis and NATS backends.
//!
//! The hub calls [`Changes::watch`] / [`Changes::unwatch`] on a topic's first / last local
//! subscriber and [`Changes::topic_changed`] / [`Changes::user_changed`] on every local change.
//! Those calls only record (they run on connection tasks and must not wait); the backend's
//! task [`Changes::take`]s a [`Batch`] and applies it: subscribe at once, unsubscribe only
//! after the linger (a topic watched again meanwhile stays subscribed), counts as absolute
//! values read from the hub at that moment — so notices coalesce and are never stale.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::bus::BusError;
use herald_core::hub::Hub;
use herald_core::topic::Topic;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// What the backend must apply now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Topics to subscribe on the bus.
    pub subscribe: Vec<Topic>,
    /// Topics unwatched for longer than the linger: unsubscribe on the bus.
    pub unsubscribe: Vec<Topic>,
    /// Topics whose local subscriber count changed, with the current count (0: none left).
    pub topics: Vec<(Topic, u64)>,
    /// Users whose local connection count changed, with the current count (0: none left).
    pub users: Vec<(Arc<str>, u64)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty()
            && self.unsubscribe.is_empty()
            && self.topics.is_empty()
            && self.users.is_empty()
    }
}

#[derive(Default)]
struct Inner {
    to_subscribe: Vec<Topic>,
    /// Unwatched topics still subscribed on the bus, with when they were unwatched.
    lingering: HashMap<Topic, Instant>,
    topics: HashSet<Topic>,
    users: HashSet<Arc<str>>,
    /// Topics the bus has confirmed subscribing to.
    subscribed: HashSet<Topic>,
}

/// Local changes not yet applied to the cluster, and the bus subscriptions confirmed so far.
pub struct Changes {
    inner: Mutex<Inner>,
    linger: Duration,
    /// Wakes the backend's task when there is something to subscribe.
    wake: Notify,
    /// Wakes [`Changes::wait_subscribed`] callers when subscriptions are confirmed.
    confirmed: Notify,
}

impl Changes {
    pub fn new(linger: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            linger,
            wake: Notify::new(),
            confirmed: Notify::new(),
        }
    }

    pub fn watch(&self, topic: &Topic) {
        let mut i = self.inner.lock();
        // Still subscribed from before the linger ran out: nothing to do on the bus.
        if i.lingering.remove(topic).is_none() {
            i.to_subscribe.push(topic.clone());
            drop(i);
            self.wake.notify_one();
        }
    }

    pub fn unwatch(&self, topic: &Topic) {
        self.inner
            .lock()
            .lingering
            .insert(topic.clone(), Instant::now());
    }

    pub fn topic_changed(&self, topic: &Topic) {
        self.inner.lock().topics.insert(topic.clone());
    }

    pub fn user_changed(&self, user: &str) {
        let mut i = self.inner.lock();
        if !i.users.contains(user) {
            i.users.insert(user.into());
        }
    }

    /// Resolves when [`Changes::watch`] recorded a topic to subscribe.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Everything to apply at `now`. Counts are read from `hub` now.
    pub fn take(&self, hub: &Hub, now: Instant) -> Batch {
        let mut i = self.inner.lock();
        let subscribe = std::mem::take(&mut i.to_subscribe);
        let linger = self.linger;
        let mut unsubscribe = Vec::new();
        i.lingering.retain(|t, since| {
            if now.duration_since(*since) < linger {
                return true;
            }
            unsubscribe.push(t.clone());
            false
        });
        for t in &unsubscribe {
            i.subscribed.remove(t);
        }
        let topics = std::mem::take(&mut i.topics);
        let users = std::mem::take(&mut i.users);
        drop(i);
        Batch {
            subscribe,
            unsubscribe,
            topics: topics
                .into_iter()
                .map(|t| {
                    let n = hub.subscriber_count(t.as_str()) as u64;
                    (t, n)
                })
                .collect(),
            users: users
                .into_iter()
                .map(|u| {
                    let n = hub.user_connection_count(&u) as u64;
                    (u, n)
                })
                .collect(),
        }
    }

    /// Put back what could not be applied (the server was down), to retry with the next batch.
    pub fn retry(&self, batch: Batch) {
        let mut i = self.inner.lock();
        i.to_subscribe.extend(batch.subscribe);
        let now = Instant::now();
        for t in batch.unsubscribe {
            // Unsubscribe again unless it was watched again meanwhile; `now - linger` makes
            // the next `take` pick it up at once.
            let since = now.checked_sub(self.linger).unwrap_or(now);
            i.lingering.entry(t).or_insert(since);
        }
        i.topics.extend(batch.topics.into_iter().map(|(t, _)| t));
        i.users.extend(batch.users.into_iter().map(|(u, _)| u));
    }

    /// The bus now delivers these topics to this node.
    pub fn confirm(&self, topics: &[Topic]) {
        let mut i = self.inner.lock();
        i.subscribed.extend(topics.iter().cloned());
        drop(i);
        self.confirmed.notify_waiters();
    }

    /// The connection to the server was lost: nothing is subscribed until it is back.
    /// Returns the topics to subscribe again (every one this node watches or lingers on).
    pub fn lost(&self, hub: &Hub) -> Vec<Topic> {
        let mut i = self.inner.lock();
        i.subscribed.clear();
        i.to_subscribe.clear();
        let mut all = hub.topics();
        all.extend(i.lingering.keys().cloned());
        // Every local count must be rewritten too (the server may have lost them).
        i.topics.extend(all.iter().cloned());
        for (u, _) in hub.online_users() {
            i.users.insert(u);
        }
        all
    }

    pub fn is_subscribed(&self, topic: &Topic) -> bool {
        self.inner.lock().subscribed.contains(topic)
    }

    /// Resolves once the bus delivers `topic` to this node, or fails after `timeout`.
    pub async fn wait_subscribed(&self, topic: &Topic, timeout: Duration) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.confirmed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_subscribed(topic) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(BusError::Unavailable(format!(
                    "the bus did not confirm the subscription to {topic} within {timeout:?}"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn unsubscribes_only_after_the_linger_and_not_when_watched_again() {
        let hub = Hub::new();
        let c = Changes::new(Duration::from_secs(2));
        let now = Instant::now();
        c.watch(&t("a"));
        c.watch(&t("b"));
        let b = c.take(&hub, now);
        assert_eq!(b.subscribe, vec![t("a"), t("b")]);
        c.confirm(&b.subscribe);
        c.unwatch(&t("a"));
        c.unwatch(&t("b"));
        // `a` comes back within the linger: still subscribed, nothing to do.
        c.watch(&t("a"));
        assert!(c.take(&hub, Instant::now()).is_empty());
        let later = Instant::now() + Duration::from_secs(3);
        let b = c.take(&hub, later);
        assert_eq!(b.unsubscribe, vec![t("b")]);
        assert!(b.subscribe.is_empty());
        assert!(c.is_subscribed(&t("a")) && !c.is_subscribed(&t("b")));
    }

    #[test]
    fn counts_are_read_when_taken_and_failed_batches_come_back() {
        let hub = Hub::new();
        let c = Changes::new(Duration::from_secs(1));
        c.user_changed("u1");
        c.user_changed("u1");
        c.topic_changed(&t("x"));
        let b = c.take(&hub, Instant::now());
        assert_eq!(b.users, vec![(Arc::from("u1"), 0)]);
        assert_eq!(b.topics, vec![(t("x"), 0)]);
        c.retry(b);
        let b = c.take(&hub, Instant::now());
        assert_eq!(b.users.len(), 1);
        assert_eq!(b.topics.len(), 1);
        assert!(c.take(&hub, Instant::now()).is_empty());
    }

    #[tokio::test]
    async fn waiters_wake_on_confirmation_or_time_out() {
        let c = Arc::new(Changes::new(Duration::from_secs(1)));
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_subscribed(&t("a"), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.confirm(&[t("a")]);
        assert!(waiter.await.unwrap().is_ok());
        let err = c
            .wait_subscribed(&t("never"), Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not confirm"));
    }
}
