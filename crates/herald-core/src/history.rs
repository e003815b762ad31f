//! Topic history (gapless `seq`, resume with `since`) and retained values, behind the
//! [`History`] trait, with the single-node in-memory implementation.
//!
//! A topic whose rule has `history = { size, ttl }` keeps a ring of its last `size` messages,
//! each at most `ttl` old, numbered 1, 2, 3… without gaps. A subscriber that comes back with
//! `since = n` gets every message after `n` that is still kept ([`Recovery::Complete`]), or is
//! told the gap cannot be filled ([`Recovery::Gap`]) — never a silent gap.
//!
//! A topic whose rule has `retain = true` keeps its last message, sent first (flagged
//! `retained:true`) to each new subscriber.
//!
//! Ordering is not this module's job: the caller serialises append + fanout per topic (see
//! `herald-server`'s publish path) so that seq order is delivery order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::acl::HistoryOptions;
use crate::message::Message;
use crate::topic::Topic;

/// What a resume can give.
#[derive(Debug, Clone)]
pub enum Recovery {
    /// Every message after `since`, oldest first (possibly none); `latest` is the topic's
    /// current seq.
    Complete {
        messages: Vec<Arc<Message>>,
        latest: u64,
    },
    /// Messages after `since` are no longer (or were never) kept: the client must resync.
    Gap { latest: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("history unavailable: {0}")]
    Unavailable(String),
}

/// Per-topic history and retained values.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Give `msg` the topic's next seq and keep it. Returns the message with its seq set.
    async fn append(
        &self,
        msg: Message,
        opts: HistoryOptions,
    ) -> Result<Arc<Message>, HistoryError>;
    /// Whether [`History::append`] also hands the message to the bus, in the same atomic step
    /// (a clustered history on the bus's own server does, so that seq order is delivery order
    /// whichever node publishes); the publish path then does not publish it again.
    fn publishes_on_append(&self) -> bool {
        false
    }
    /// Messages of `topic` after `since`.
    async fn since(&self, topic: &Topic, since: u64) -> Result<Recovery, HistoryError>;
    /// The topic's current seq (0 when it has none).
    async fn latest(&self, topic: &Topic) -> Result<u64, HistoryError>;
    /// Keep `msg` as the topic's retained value.
    async fn retain(&self, msg: Arc<Message>) -> Result<(), HistoryError>;
    /// The topic's retained value.
    async fn retained(&self, topic: &Topic) -> Result<Option<Arc<Message>>, HistoryError>;
}

#[derive(Debug)]
struct Ring {
    /// The seq of the last message appended.
    latest: u64,
    entries: VecDeque<(Instant, Arc<Message>)>,
}

impl Ring {
    fn expire(&mut self, opts: HistoryOptions, now: Instant) {
        while self.entries.len() > opts.size {
            self.entries.pop_front();
        }
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > opts.ttl)
        {
            self.entries.pop_front();
        }
    }
}

/// In-process history: kept until the process exits.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    // One short critical section per call, never held across an await.
    rings: Mutex<HashMap<Topic, (Ring, HistoryOptions)>>,
    retained: Mutex<HashMap<Topic, Arc<Message>>>,
}

impl MemoryHistory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drop expired entries of every topic. A ring keeps its `latest` seq even when empty, so
    /// a resume after a quiet period is answered `Gap` rather than restarting at 1.
    pub fn sweep(&self) {
        let now = Instant::now();
        for (ring, opts) in self.rings.lock().values_mut() {
            ring.expire(*opts, now);
        }
    }
}

#[async_trait]
impl History for MemoryHistory {
    async fn append(
        &self,
        mut msg: Message,
        opts: HistoryOptions,
    ) -> Result<Arc<Message>, HistoryError> {
        let now = Instant::now();
        let mut rings = self.rings.lock();
        let (ring, kept_opts) = rings.entry(msg.topic.clone()).or_insert_with(|| {
            (
                Ring {
                    latest: 0,
                    entries: VecDeque::new(),
                },
                opts,
            )
        });
        *kept_opts = opts;
        ring.latest += 1;
        msg.seq = Some(ring.latest);
        let msg = Arc::new(msg);
        ring.entries.push_back((now, msg.clone()));
        ring.expire(opts, now);
        Ok(msg)
    }

    async fn since(&self, topic: &Topic, since: u64) -> Result<Recovery, HistoryError> {
        let now = Instant::now();
        let mut rings = self.rings.lock();
        let Some((ring, opts)) = rings.get_mut(topic.as_str()) else {
            // Nothing was ever published here (since this process started): only `since = 0`
            // is complete.
            return Ok(if since == 0 {
                Recovery::Complete {
                    messages: Vec::new(),
                    latest: 0,
                }
            } else {
                Recovery::Gap { latest: 0 }
            });
        };
        ring.expire(*opts, now);
        let latest = ring.latest;
        if since > latest {
            // The client saw a seq this history never issued (e.g. before a restart).
            return Ok(Recovery::Gap { latest });
        }
        if since == latest {
            return Ok(Recovery::Complete {
                messages: Vec::new(),
                latest,
            });
        }
        // The oldest kept seq must be at most since + 1 for the gap to be fillable.
        let oldest = ring
            .entries
            .front()
            .and_then(|(_, m)| m.seq)
            .unwrap_or(latest + 1);
        if oldest > since + 1 {
            return Ok(Recovery::Gap { latest });
        }
        let messages = ring
            .entries
            .iter()
            .filter(|(_, m)| m.seq.is_some_and(|s| s > since))
            .map(|(_, m)| m.clone())
            .collect();
        Ok(Recovery::Complete { messages, latest })
    }

    async fn latest(&self, topic: &Topic) -> Result<u64, HistoryError> {
        Ok(self
            .rings
            .lock()
            .get(topic.as_str())
            .map_or(0, |(r, _)| r.latest))
    }

    async fn retain(&self, msg: Arc<Message>) -> Result<(), HistoryError> {
        self.retained.lock().insert(msg.topic.clone(), msg);
        Ok(())
    }

    async fn retained(&self, topic: &Topic) -> Result<Option<Arc<Message>>, HistoryError> {
        Ok(self.retained.lock().get(topic.as_str()).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageBuilder;
    use serde_json::value::RawValue;
    use std::time::Duration;

    fn msg(topic: &str, n: u32) -> Message {
        MessageBuilder::new(
            Topic::parse(topic).unwrap(),
            "e",
            RawValue::from_string(n.to_string()).unwrap(),
        )
        .build()
    }

    fn seqs(r: &Recovery) -> Vec<u64> {
        match r {
            Recovery::Complete { messages, .. } => messages.iter().filter_map(|m| m.seq).collect(),
            Recovery::Gap { .. } => panic!("gap"),
        }
    }

    #[tokio::test]
    async fn gapless_seq_and_resume() {
        let h = MemoryHistory::new();
        let opts = HistoryOptions {
            size: 3,
            ttl: Duration::from_secs(60),
        };
        let t = Topic::parse("room/a").unwrap();
        for i in 1..=5 {
            let m = h.append(msg("room/a", i), opts).await.unwrap();
            assert_eq!(m.seq, Some(i as u64));
        }
        assert_eq!(h.latest(&t).await.unwrap(), 5);
        assert_eq!(seqs(&h.since(&t, 2).await.unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(&h.since(&t, 4).await.unwrap()), vec![5]);
        assert_eq!(seqs(&h.since(&t, 5).await.unwrap()), Vec::<u64>::new());
        assert!(
            matches!(h.since(&t, 1).await.unwrap(), Recovery::Gap { latest: 5 }),
            "seq 2 was evicted"
        );
        assert!(
            matches!(h.since(&t, 9).await.unwrap(), Recovery::Gap { latest: 5 }),
            "from the future"
        );
        let other = Topic::parse("room/b").unwrap();
        assert!(matches!(
            h.since(&other, 0).await.unwrap(),
            Recovery::Complete { latest: 0, .. }
        ));
        assert!(matches!(
            h.since(&other, 3).await.unwrap(),
            Recovery::Gap { latest: 0 }
        ));
    }

    #[tokio::test]
    async fn ttl_expires_entries() {
        let h = MemoryHistory::new();
        let opts = HistoryOptions {
            size: 10,
            ttl: Duration::from_millis(20),
        };
        let t = Topic::parse("room/a").unwrap();
        h.append(msg("room/a", 1), opts).await.unwrap();
        std::thread::sleep(Duration::from_millis(40));
        h.append(msg("room/a", 2), opts).await.unwrap();
        assert!(matches!(
            h.since(&t, 0).await.unwrap(),
            Recovery::Gap { latest: 2 }
        ));
        assert_eq!(seqs(&h.since(&t, 1).await.unwrap()), vec![2]);
    }

    #[tokio::test]
    async fn retained_keeps_the_last() {
        let h = MemoryHistory::new();
        let t = Topic::parse("device/d/telemetry").unwrap();
        assert!(h.retained(&t).await.unwrap().is_none());
        h.retain(Arc::new(msg("device/d/telemetry", 1)))
            .await
            .unwrap();
        h.retain(Arc::new(msg("device/d/telemetry", 2)))
            .await
            .unwrap();
        assert_eq!(h.retained(&t).await.unwrap().unwrap().data.get(), "2");
    }
}
