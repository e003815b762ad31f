//! Durable delivery bookkeeping (SPEC §1 "durable"): an inbox message written to a user's
//! connection and not acked within `store.retry_after` is sent again to the user's connections,
//! at most `store.max_retries` times; then it is marked `failed` in the store (kept, and
//! replayed on the next connect like every unacked message).
//!
//! Only messages this node wrote are tracked, in memory: a restart forgets the timers but not
//! the messages (they are in the store and replayed on connect). A user who has no connection
//! here any more is forgotten too, for the same reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::hub::Hub;
use herald_core::message::Message;
use herald_core::store::Store;

use crate::metrics::Metrics;
use parking_lot::Mutex;

/// A user's unacked messages by id.
type UserEntries = HashMap<Box<str>, Entry>;

struct Entry {
    msg: Arc<Message>,
    due: Instant,
    attempts: u32,
}

/// Unacked durable messages written by this node, per user.
pub struct Inbox {
    // Held for map operations only, never across an await.
    pending: Mutex<HashMap<Arc<str>, UserEntries>>,
    retry_after: Duration,
    max_retries: u32,
}

/// What one [`Inbox::due`] pass decided.
#[derive(Default)]
pub struct Due {
    /// Send again: (user, message).
    pub resend: Vec<(Arc<str>, Arc<Message>)>,
    /// Attempts exhausted: (user, ids) to mark failed.
    pub failed: Vec<(Arc<str>, Vec<String>)>,
}

impl Inbox {
    pub fn new(retry_after: Duration, max_retries: u32) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            retry_after,
            max_retries,
        }
    }

    /// A durable message was written to one of `user`'s connections. The first write starts
    /// its timer; later writes (other tabs, retransmissions) do not reset it.
    pub fn written(&self, user: &Arc<str>, msg: &Arc<Message>) {
        let mut p = self.pending.lock();
        p.entry(user.clone())
            .or_default()
            .entry(msg.id.clone())
            .or_insert_with(|| Entry {
                msg: msg.clone(),
                due: Instant::now() + self.retry_after,
                attempts: 0,
            });
    }

    /// The user acked these ids.
    pub fn acked(&self, user: &str, ids: &[String]) {
        let mut p = self.pending.lock();
        if let Some(m) = p.get_mut(user) {
            for id in ids {
                m.remove(id.as_str());
            }
            if m.is_empty() {
                p.remove(user);
            }
        }
    }

    /// Messages unacked for this node.
    pub fn len(&self) -> usize {
        self.pending.lock().values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decide what is due at `now`. `online(user)` tells whether the user still has a
    /// connection on this node.
    pub fn due(&self, now: Instant, online: impl Fn(&str) -> bool) -> Due {
        let mut out = Due::default();
        let mut p = self.pending.lock();
        p.retain(|user, entries| {
            if !online(user) {
                return false;
            }
            let mut failed = Vec::new();
            entries.retain(|id, e| {
                if e.due > now {
                    return true;
                }
                if e.attempts < self.max_retries {
                    e.attempts += 1;
                    e.due = now + self.retry_after;
                    out.resend.push((user.clone(), e.msg.clone()));
                    true
                } else {
                    failed.push(id.to_string());
                    false
                }
            });
            if !failed.is_empty() {
                out.failed.push((user.clone(), failed));
            }
            !entries.is_empty()
        });
        out
    }

    /// One retransmission pass: resend what is due, record retries and failures in the store.
    pub async fn tick(&self, hub: &Hub, store: &dyn Store, metrics: &Metrics) {
        let due = self.due(Instant::now(), |u| hub.user_connection_count(u) > 0);
        let mut retried: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for (user, msg) in due.resend {
            let d = hub.deliver_to_user(&user, &msg);
            metrics.delivery(&d);
            retried.entry(user).or_default().push(msg.id.to_string());
        }
        for (user, ids) in retried {
            metrics.durable_retries.increment(ids.len() as u64);
            if let Err(e) = store.record_retry(&user, &ids).await {
                tracing::warn!(error = %e, %user, "could not record retries");
            }
        }
        for (user, ids) in due.failed {
            metrics.durable_failed.increment(ids.len() as u64);
            tracing::debug!(%user, count = ids.len(), "durable messages failed after retries");
            if let Err(e) = store.mark_failed(&user, &ids).await {
                tracing::warn!(error = %e, %user, "could not mark messages failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::message::MessageBuilder;
    use herald_core::topic::Topic;
    use serde_json::value::RawValue;

    fn msg(id: &str) -> Arc<Message> {
        let mut b = MessageBuilder::new(
            Topic::parse("user/u").unwrap(),
            "n",
            RawValue::from_string("1".into()).unwrap(),
        );
        b.id = Some(id.into());
        b.durable = true;
        Arc::new(b.build())
    }

    #[test]
    fn retries_then_fails_and_acks_stop_it() {
        let inbox = Inbox::new(Duration::from_secs(5), 2);
        let user: Arc<str> = "u".into();
        inbox.written(&user, &msg("a"));
        inbox.written(&user, &msg("b"));
        let t0 = Instant::now();
        assert!(
            inbox.due(t0, |_| true).resend.is_empty(),
            "nothing due before retry_after"
        );
        let d = inbox.due(t0 + Duration::from_secs(6), |_| true);
        assert_eq!(d.resend.len(), 2);
        inbox.written(&user, &msg("a")); // the retransmission's write does not reset the timer
        inbox.acked("u", &["b".to_string()]);
        let d = inbox.due(t0 + Duration::from_secs(12), |_| true);
        assert_eq!(
            d.resend.iter().map(|(_, m)| &*m.id).collect::<Vec<_>>(),
            ["a"]
        );
        let d = inbox.due(t0 + Duration::from_secs(18), |_| true);
        assert!(d.resend.is_empty());
        assert_eq!(d.failed, vec![(user.clone(), vec!["a".to_string()])]);
        assert!(inbox.is_empty());
    }

    #[test]
    fn offline_users_are_forgotten() {
        let inbox = Inbox::new(Duration::from_secs(1), 3);
        inbox.written(&"u".into(), &msg("a"));
        let d = inbox.due(Instant::now() + Duration::from_secs(2), |_| false);
        assert!(d.resend.is_empty() && d.failed.is_empty());
        assert!(inbox.is_empty());
    }
}
