//! The bounded per-connection send queue and the slow-consumer policy (SPEC §9).
//!
//! Fanout never waits on a client: publishers call [`ConnQueue::push_message`], which never
//! blocks and never awaits. The connection task drains the queue in batches and writes them
//! with one flush. The whole full-queue policy lives in [`ConnQueue::push_message`]:
//!
//! - below `capacity`, every message is queued;
//! - when the queue is full, the oldest *ephemeral* message in it is dropped to make room (or
//!   the new one, if it is ephemeral and the queue holds none), and the drop is counted;
//! - durable messages and control frames (replies, errors, reconnect) are never dropped; they
//!   may take the queue past `capacity`, up to twice it;
//! - a queue that has been full with no progress by the writer for `slow_timeout`, or that
//!   reaches twice its capacity, is closed with 4009 (slow consumer): its content is discarded
//!   (durable messages stay in the store and are replayed on the next connect).
//!
//! Memory: an idle queue holds an empty `VecDeque` (no allocation) and no waker clone beyond
//! the one registered by the connection task.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_proto::close;
use parking_lot::Mutex;

use crate::message::Message;

/// One item waiting to be written to a connection.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A published message; the connection encodes it (once per protocol, shared).
    Message(Arc<Message>),
    /// A message replayed from history for this connection: never dropped (a resume is
    /// all-or-nothing, see [`ConnQueue::push_replay`]).
    Replay(Arc<Message>),
    /// A topic's retained value, sent to this connection alone at subscribe (flagged
    /// `retained` by the encoding); never dropped.
    Retained(Arc<Message>),
    /// A ready control frame for this connection only (reply, error, welcome, reconnect…).
    Frame(Bytes),
}

/// Why and how the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: Cow<'static, str>,
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Queued, but an older ephemeral message was dropped to make room (or the new one was
    /// dropped because the queue holds nothing droppable).
    DroppedOldest,
    /// The queue is closing; the message was discarded.
    Closed,
    /// This push found the queue persistently full and closed it with 4009, discarding
    /// this many queued messages (plus the pushed one).
    SlowConsumer {
        discarded: usize,
    },
}

#[derive(Debug)]
struct Inner {
    items: VecDeque<Outgoing>,
    /// How many of `items` are droppable (ephemeral messages).
    ephemeral: usize,
    waker: Option<Waker>,
    close: Option<CloseRequest>,
    /// When the queue was first found full since the writer last made progress.
    full_since: Option<Instant>,
    dropped: u64,
    /// Per resumed topic, the last seq its replay held: a live copy arriving after the replay
    /// was queued (a cluster's bus may lag behind the history read) is skipped. An entry
    /// goes with the topic's first later message. Empty except just after a resume.
    floors: Vec<(crate::topic::Topic, u64)>,
}

/// Resumed topics remembered at once, at most (the oldest is forgotten first).
const MAX_FLOORS: usize = 64;

/// A bounded multi-producer, single-consumer queue of frames for one connection.
#[derive(Debug)]
pub struct ConnQueue {
    // parking_lot mutex: held only for a push or a drain, never across an await.
    inner: Mutex<Inner>,
    capacity: usize,
    slow_timeout: Duration,
}

impl ConnQueue {
    pub fn new(capacity: usize, slow_timeout: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                ephemeral: 0,
                waker: None,
                close: None,
                full_since: None,
                dropped: 0,
                floors: Vec::new(),
            }),
            capacity: capacity.max(1),
            slow_timeout,
        }
    }

    /// Queue a published message, applying the full-queue policy (see the module doc).
    pub fn push_message(&self, msg: Arc<Message>) -> Push {
        let mut g = self.inner.lock();
        if g.close.is_some() {
            return Push::Closed;
        }
        if !g.floors.is_empty()
            && let Some(seq) = msg.seq
            && let Some(pos) = g.floors.iter().position(|(t, _)| *t == msg.topic)
        {
            if seq <= g.floors[pos].1 {
                // Already queued by the replay.
                return Push::Queued;
            }
            g.floors.swap_remove(pos);
        }
        let durable = msg.durable;
        let mut outcome = Push::Queued;
        if g.items.len() >= self.capacity {
            let now = Instant::now();
            let since = *g.full_since.get_or_insert(now);
            if now.duration_since(since) >= self.slow_timeout || g.items.len() >= self.capacity * 2
            {
                let discarded =
                    Self::close_locked(&mut g, close::SLOW_CONSUMER, "slow consumer") + 1;
                let waker = g.waker.take();
                drop(g);
                wake(waker);
                return Push::SlowConsumer { discarded };
            }
            if !durable {
                g.dropped += 1;
                if g.ephemeral == 0 {
                    // Nothing droppable queued: the new ephemeral message is the oldest we may drop.
                    return Push::DroppedOldest;
                }
                if let Some(pos) = g.items.iter().position(is_ephemeral) {
                    g.items.remove(pos);
                    g.ephemeral -= 1;
                }
                outcome = Push::DroppedOldest;
            }
        }
        if !durable {
            g.ephemeral += 1;
        }
        g.items.push_back(Outgoing::Message(msg));
        let waker = g.waker.take();
        drop(g);
        wake(waker);
        outcome
    }

    /// Queue a resume's messages, all or nothing: they are never dropped once queued, so the
    /// answer `recovered:true` stays true. Refused (returns false, nothing queued) when the
    /// queue is closing or they would take it past twice its capacity: the caller then answers
    /// `recovered:false` and the client resyncs.
    ///
    /// Live messages of the same topic queued meanwhile (on a cluster, what other nodes
    /// published while the history was read) keep the order: those the replay holds too are
    /// dropped, and the replay goes before the later ones. The connection's own task runs the
    /// resume, so none of them has been written yet.
    pub fn push_replay(&self, msgs: &[Arc<Message>]) -> bool {
        let mut g = self.inner.lock();
        if g.close.is_some() || g.items.len() + msgs.len() > self.capacity * 2 {
            return false;
        }
        let mut insert_at = g.items.len();
        if let Some(first) = msgs.first() {
            let upto = msgs.iter().filter_map(|m| m.seq).max();
            let mut i = 0;
            while i < g.items.len() {
                let (same_topic, replayed) = match &g.items[i] {
                    Outgoing::Message(m) if m.topic == first.topic => {
                        (true, m.seq.is_some() && m.seq <= upto)
                    }
                    _ => (false, false),
                };
                if replayed {
                    if let Some(Outgoing::Message(m)) = g.items.remove(i)
                        && !m.durable
                    {
                        g.ephemeral -= 1;
                    }
                    continue;
                }
                if same_topic {
                    insert_at = insert_at.min(i);
                }
                i += 1;
            }
        }
        if let Some(first) = msgs.first()
            && let Some(upto) = msgs.iter().filter_map(|m| m.seq).max()
        {
            g.floors.retain(|(t, _)| *t != first.topic);
            if g.floors.len() >= MAX_FLOORS {
                g.floors.remove(0);
            }
            g.floors.push((first.topic.clone(), upto));
        }
        let tail = g.items.split_off(insert_at);
        g.items.extend(msgs.iter().cloned().map(Outgoing::Replay));
        g.items.extend(tail);
        let waker = g.waker.take();
        drop(g);
        wake(waker);
        true
    }

    /// Queue a topic's retained value for this connection (at subscribe). Never dropped, like
    /// a control frame.
    pub fn push_retained(&self, msg: Arc<Message>) -> Push {
        self.push_control(Outgoing::Retained(msg))
    }

    /// Queue a control frame. Never dropped; a client that makes the queue reach twice its
    /// capacity with requests it does not read the answers to is closed as a slow consumer.
    pub fn push_frame(&self, frame: Bytes) -> Push {
        self.push_control(Outgoing::Frame(frame))
    }

    fn push_control(&self, item: Outgoing) -> Push {
        let mut g = self.inner.lock();
        if g.close.is_some() {
            return Push::Closed;
        }
        if g.items.len() >= self.capacity * 2 {
            let discarded = Self::close_locked(&mut g, close::SLOW_CONSUMER, "slow consumer");
            let waker = g.waker.take();
            drop(g);
            wake(waker);
            return Push::SlowConsumer { discarded };
        }
        g.items.push_back(item);
        let waker = g.waker.take();
        drop(g);
        wake(waker);
        Push::Queued
    }

    /// Ask the connection to close with `code`. Frames already queued are still written first
    /// (so a `reconnect` queued before a 1012 arrives before it). The first request wins.
    pub fn close(&self, code: u16, reason: impl Into<Cow<'static, str>>) {
        let mut g = self.inner.lock();
        if g.close.is_none() {
            g.close = Some(CloseRequest {
                code,
                reason: reason.into(),
            });
        }
        let waker = g.waker.take();
        drop(g);
        wake(waker);
    }

    /// Discard the queued messages and request the close; returns how many messages were
    /// discarded (durable ones included: they stay in the store).
    fn close_locked(g: &mut Inner, code: u16, reason: &'static str) -> usize {
        let discarded = g
            .items
            .iter()
            .filter(|i| {
                matches!(
                    i,
                    Outgoing::Message(_) | Outgoing::Replay(_) | Outgoing::Retained(_)
                )
            })
            .count();
        g.dropped += discarded as u64;
        g.items.clear();
        g.ephemeral = 0;
        g.close = Some(CloseRequest {
            code,
            reason: Cow::Borrowed(reason),
        });
        discarded
    }

    /// Move up to `max` queued items into `out`. Ready when at least one item was moved, or
    /// when the queue is closing and empty (then yields the close request).
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        out: &mut Vec<Outgoing>,
        max: usize,
    ) -> Poll<Option<CloseRequest>> {
        let mut g = self.inner.lock();
        if g.items.is_empty() {
            if let Some(c) = &g.close {
                return Poll::Ready(Some(c.clone()));
            }
            match &g.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => g.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let n = g.items.len().min(max.max(1));
        let mut ephemeral_drained = 0;
        for item in g.items.drain(..n) {
            ephemeral_drained += usize::from(is_ephemeral(&item));
            out.push(item);
        }
        g.ephemeral -= ephemeral_drained;
        if g.items.is_empty() {
            // Release a large burst's buffer once the queue is idle again.
            if g.items.capacity() > 64 {
                g.items = VecDeque::new();
            }
        }
        g.full_since = None;
        Poll::Ready(None)
    }

    /// Wait until items can be drained (see [`ConnQueue::poll_drain`]).
    pub async fn drain(&self, out: &mut Vec<Outgoing>, max: usize) -> Option<CloseRequest> {
        std::future::poll_fn(|cx| self.poll_drain(cx, out, max)).await
    }

    pub fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages dropped by the policy so far.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().dropped
    }

    pub fn is_closing(&self) -> bool {
        self.inner.lock().close.is_some()
    }
}

fn is_ephemeral(item: &Outgoing) -> bool {
    matches!(item, Outgoing::Message(m) if !m.durable)
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageBuilder;
    use crate::topic::Topic;
    use serde_json::value::RawValue;

    fn msg(n: u32, durable: bool) -> Arc<Message> {
        let data = RawValue::from_string(n.to_string()).unwrap();
        let mut b = MessageBuilder::new(Topic::parse("t").unwrap(), "e", data);
        b.durable = durable;
        Arc::new(b.build())
    }

    fn data_of(o: &Outgoing) -> String {
        match o {
            Outgoing::Message(m) | Outgoing::Replay(m) | Outgoing::Retained(m) => {
                m.data.get().to_string()
            }
            Outgoing::Frame(b) => String::from_utf8_lossy(b).into_owned(),
        }
    }

    fn drain_now(q: &ConnQueue) -> (Vec<Outgoing>, Option<CloseRequest>) {
        let mut out = Vec::new();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        match q.poll_drain(&mut cx, &mut out, usize::MAX) {
            Poll::Ready(c) => (out, c),
            Poll::Pending => (out, None),
        }
    }

    #[test]
    fn drops_oldest_ephemeral_when_full() {
        let q = ConnQueue::new(3, Duration::from_secs(60));
        for i in 0..3 {
            assert_eq!(q.push_message(msg(i, false)), Push::Queued);
        }
        assert_eq!(q.push_message(msg(3, false)), Push::DroppedOldest);
        assert_eq!(q.dropped(), 1);
        let (items, close) = drain_now(&q);
        assert_eq!(
            items.iter().map(data_of).collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        assert!(close.is_none());
    }

    #[test]
    fn durable_and_frames_are_never_dropped() {
        let q = ConnQueue::new(2, Duration::from_secs(60));
        q.push_message(msg(0, true));
        q.push_message(msg(1, false));
        assert_eq!(q.push_message(msg(2, true)), Push::Queued); // over capacity: durable kept
        assert_eq!(q.push_message(msg(3, false)), Push::DroppedOldest);
        let (items, _) = drain_now(&q);
        // ephemeral 1 was dropped for 3; durable 0 and 2 survive.
        assert_eq!(
            items.iter().map(data_of).collect::<Vec<_>>(),
            ["0", "2", "3"]
        );
    }

    #[test]
    fn persistently_full_queue_closes_with_4009() {
        let q = ConnQueue::new(2, Duration::ZERO);
        q.push_message(msg(0, false));
        q.push_message(msg(1, false));
        assert_eq!(
            q.push_message(msg(2, false)),
            Push::SlowConsumer { discarded: 3 }
        );
        assert_eq!(q.push_message(msg(3, false)), Push::Closed);
        let (items, close) = drain_now(&q);
        assert!(items.is_empty());
        assert_eq!(close.unwrap().code, close::SLOW_CONSUMER);
    }

    #[test]
    fn progress_resets_the_slow_timer() {
        let q = ConnQueue::new(1, Duration::from_millis(50));
        q.push_message(msg(0, false));
        assert_eq!(q.push_message(msg(1, false)), Push::DroppedOldest);
        let _ = drain_now(&q);
        std::thread::sleep(Duration::from_millis(60));
        q.push_message(msg(2, false));
        assert_eq!(
            q.push_message(msg(3, false)),
            Push::DroppedOldest,
            "timer restarted after progress"
        );
    }

    #[test]
    fn close_flushes_queued_frames_first() {
        let q = ConnQueue::new(4, Duration::from_secs(1));
        q.push_frame(Bytes::from_static(b"reconnect"));
        q.close(1012, "restart");
        q.close(4011, "ignored: first wins");
        let (items, close) = drain_now(&q);
        assert_eq!(items.len(), 1);
        assert!(close.is_none());
        let (items, close) = drain_now(&q);
        assert!(items.is_empty());
        assert_eq!(close.unwrap().code, 1012);
    }

    #[test]
    fn replay_is_all_or_nothing_and_never_dropped() {
        let q = ConnQueue::new(2, Duration::from_secs(60));
        let five: Vec<_> = (0..5).map(|i| msg(i, false)).collect();
        assert!(!q.push_replay(&five), "more than twice the capacity");
        assert!(q.is_empty());
        assert!(q.push_replay(&five[..3]));
        assert_eq!(q.push_message(msg(9, false)), Push::DroppedOldest);
        let (items, _) = drain_now(&q);
        // The replayed three survive; the new ephemeral one was the droppable one.
        assert_eq!(
            items.iter().map(data_of).collect::<Vec<_>>(),
            ["0", "1", "2"]
        );
    }

    #[test]
    fn a_replay_goes_before_later_live_messages_and_drops_their_copies() {
        let seq_msg = |topic: &str, seq: u64| {
            let data = RawValue::from_string(format!("\"{topic}{seq}\"")).unwrap();
            let mut b = MessageBuilder::new(Topic::parse(topic).unwrap(), "e", data);
            b.seq = Some(seq);
            Arc::new(b.build())
        };
        let q = ConnQueue::new(16, Duration::from_secs(60));
        // Queued while the history was read: a copy of seq 3, seq 4, and another topic.
        q.push_frame(Bytes::from_static(b"f"));
        q.push_message(seq_msg("t", 3));
        q.push_message(seq_msg("u", 1));
        q.push_message(seq_msg("t", 4));
        let replay: Vec<_> = (1..=3).map(|s| seq_msg("t", s)).collect();
        assert!(q.push_replay(&replay));
        let (items, _) = drain_now(&q);
        assert_eq!(
            items.iter().map(data_of).collect::<Vec<_>>(),
            ["f", "\"u1\"", "\"t1\"", "\"t2\"", "\"t3\"", "\"t4\""]
        );
        assert!(matches!(items[2], Outgoing::Replay(_)));
        // A copy arriving after the replay (the bus lagging behind the history read) is
        // skipped; the next later one passes, and so does everything after it.
        q.push_message(seq_msg("t", 2));
        q.push_message(seq_msg("t", 5));
        q.push_message(seq_msg("t", 6));
        let (items, _) = drain_now(&q);
        assert_eq!(
            items.iter().map(data_of).collect::<Vec<_>>(),
            ["\"t5\"", "\"t6\""]
        );
        // The dropped copy was ephemeral: the droppable count still matches the queue.
        for i in 0..16 {
            q.push_message(msg(i, false));
        }
        assert_eq!(q.len(), 16);
    }

    #[tokio::test]
    async fn drain_wakes_on_push() {
        let q = Arc::new(ConnQueue::new(8, Duration::from_secs(1)));
        let q2 = q.clone();
        let h = tokio::spawn(async move {
            let mut out = Vec::new();
            q2.drain(&mut out, 16).await;
            out.len()
        });
        tokio::task::yield_now().await;
        q.push_frame(Bytes::from_static(b"x"));
        assert_eq!(h.await.unwrap(), 1);
    }
}
