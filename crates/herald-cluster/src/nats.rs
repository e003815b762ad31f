//! The NATS backend: core NATS subjects carry the bus, JetStream (KV buckets and one stream)
//! holds what the nodes share. Needs a NATS server with JetStream (2.9 or later).
//!
//! # Layout (the operator reference)
//!
//! `p` is [`Options::prefix`] (`A-Z a-z 0-9 _ -`, so it names subjects, streams and buckets
//! as is). In subjects, a topic or node id is one token: its `.` are written `%2E` (they never
//! contain `%`). In KV keys, `<n>`, `<u>` and `<t>` are the node id, user id and topic in
//! base64url without padding.
//!
//! Core NATS subjects (nothing stored):
//! - `p.t.<topic>`: the topic's messages, each its JSON v1 frame. A node subscribes while it
//!   has local subscribers of the topic (plus [`Options::linger`]); a subscription counts as
//!   confirmed once a round trip after it (a request to `p.sync`, which nobody answers: "no
//!   responders") came back, so the server has registered it. async-nats resubscribes by
//!   itself after a reconnection.
//! - `p.control`: control events ([`crate::wire`]) for every node.
//! - `p.node.<node id>`: directed events ([`crate::wire`]) for one node, sent as requests the
//!   node answers with an empty reply: a node that is not there is NATS's "no responders",
//!   reported as [`BusError::UnknownNode`].
//!
//! JetStream:
//! - KV bucket `p_presence` (memory storage, `max_age` = [`Options::presence_ttl`]):
//!   `n.<n>` a node's liveness record (value: its id), `u.<n>.<u>` its connection count for a
//!   user, `t.<n>.<t>` its subscriber count for a topic (decimal; a count of 0 is deleted).
//!   Each node rewrites all of its entries every presence_ttl/3, so a dead node's entries
//!   expire with `max_age`; a node purges its own on start and on shutdown. A user's or a
//!   topic's count is the local hub's exact one plus a direct get per other live node (known
//!   from a watch on `n.*`); the online list reads every `u.*` entry (an ordered consumer).
//! - stream `p_history` (file storage), subjects `p.h.<topic>`: one message per history entry,
//!   its payload the frame with `"seq":N,` spliced in, with headers `Herald-Seq` (N),
//!   `Herald-Prev` (the stream sequence of entry N-1), `Herald-At` (append time, Unix ms, the
//!   appending node's clock), `Herald-Ttl` (ms) and `Herald-Size` (the topic's history
//!   options). An append publishes with `Nats-Expected-Last-Subject-Sequence` = the stream
//!   sequence of the topic's last entry: the server stores it only if nobody appended
//!   meanwhile (else the node reads the new last entry and retries), so allocating N and
//!   storing the entry are one atomic step and seqs are gapless across nodes. `since` reads
//!   the last entry, then walks back along `Herald-Prev` (one direct get per entry); an entry
//!   older than the ttl or more than `size` behind the last counts as gone. Entries are
//!   purged down to the last `size` every size/8 appends; the last entry of a topic is never
//!   removed, so its seq survives the entries' expiry (a topic keeps about `size` + size/8
//!   entries on the server, expired or not, until the stream is deleted).
//! - KV bucket `p_retained` (file storage): `<t>` → the retained message's frame.
//! - KV bucket `p_revocations` (file storage): `j.<jti>` / `u.<user>` (base64url) → a
//!   revocation in force ([`crate::wire::encode_control`]), read by a node at start; ended
//!   ones are deleted when a new one is kept.
//! - KV bucket `p_interest` (memory storage, `max_age` = the counters' ttl), only with
//!   [`Options::interest`]: seed 001's counters, key = the template's output with `:` written
//!   `.` (`ws:sub:d-9` → `ws.sub.d-9`; a character a KV key cannot hold, or a `.` that would
//!   leave an empty token, is written `=XX` in hex), value = the cluster-wide subscriber count
//!   (decimal), deleted at 0. A node writes it with compare-and-set on the key's revision
//!   (re-reading the counts on a conflict), so the last write always saw every node's count.
//!
//! The buckets' streams are created by this module (named `KV_<bucket>`, the KV convention),
//! not by async-nats' `create_key_value`, which cannot parse a 2.9 server's account info.
//!
//! # Limits
//!
//! - [`History::publishes_on_append`] is false: NATS cannot make "store entry N" and "publish
//!   it on `p.t.<topic>`" one step (a conditional JetStream publish that is refused would
//!   still reach core subscribers), so two nodes appending to one topic at the same instant
//!   may deliver N+1 before N to some subscribers.
//! - A server that restarts without its store directory loses history (seqs restart at 1)
//!   and retained values; presence and counters are rewritten by every node on reconnection.
//! - A subscription is confirmed by the server the node is connected to; in a NATS cluster,
//!   interest reaches the other servers a moment later.
//! - A message larger than the server's `max_payload` (1 MiB by default) cannot cross the
//!   bus (it is delivered on its own node only, with a warning) nor enter history (503): keep
//!   `max_payload` above `limits.max_message_size`.
//! - A request to a node that is shutting down at that very moment may go unanswered and
//!   time out (5 s) instead of "unknown node".
//! - A node that dies leaves its share in an interest counter until a node that still watches
//!   the topic rewrites it (every `refresh`) or the counter expires (`ttl`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_nats::jetstream::{self, consumer};
use async_nats::{Client, Event, HeaderMap, HeaderValue};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt as _, StreamExt};
use herald_core::acl::HistoryOptions;
use herald_core::bus::{Bus, BusError, BusSink, ControlEvent, NodeEvent, Presence};
use herald_core::history::{History, HistoryError, Recovery};
use herald_core::hub::{Hub, Interest};
use herald_core::message::{Message, MessageBuilder, now_ms};
use herald_core::topic::{Topic, is_valid_segment};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::local::{Batch, Changes};
use crate::{ClusterError, InterestCounters, Options, wire};

/// How long [`Bus::watching`] waits for a subscription, and a request for its answer.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// An append that keeps losing the compare-and-set race gives up after this.
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent KV writes when a batch or a refresh writes many counts.
const WRITES_IN_FLIGHT: usize = 64;
/// The background loop's tick (the linger's resolution; subscriptions wake it at once).
const TICK: Duration = Duration::from_millis(100);

const SEQ: &str = "Herald-Seq";
const PREV: &str = "Herald-Prev";
const AT: &str = "Herald-At";
const TTL: &str = "Herald-Ttl";
const SIZE: &str = "Herald-Size";
const EXPECTED_LAST: &str = "Nats-Expected-Last-Subject-Sequence";

/// The connection as the event callback sees it.
#[derive(Default)]
struct Link {
    /// Disconnections so far.
    drops: AtomicU64,
    /// The value of `drops` the background task last restored everything after.
    restored: AtomicU64,
    /// Whether "delivering locally" was logged during this outage.
    warned: AtomicBool,
    /// Wakes the background task on (re)connection.
    connected: Notify,
}

/// One node's Bus, Presence and History on NATS (see the module doc).
pub struct NatsCluster {
    node: String,
    /// `<n>`: the node id in KV keys.
    node_key: String,
    prefix: String,
    presence_ttl: Duration,
    client: Client,
    js: jetstream::Context,
    /// The streams this module needs, recreated after a server lost them.
    streams: Vec<stream::Config>,
    presence: kv::Store,
    retained: kv::Store,
    /// Revocations in force, for nodes that start later.
    revocations: kv::Store,
    counters: Option<(InterestCounters, kv::Store)>,
    history: stream::Stream,
    hub: Arc<Hub>,
    changes: Changes,
    sink: OnceLock<Arc<dyn BusSink>>,
    link: Arc<Link>,
    /// Liveness records seen by the watch: `<n>` → when last put.
    live: Mutex<HashMap<String, Instant>>,
    /// Per topic, the last history entry this node knows: (stream sequence, seq). A stale one
    /// only costs a refused append and a retry.
    tails: Mutex<HashMap<Topic, (u64, u64)>>,
}

fn kv_stream(bucket: String, max_age: Duration, storage: stream::StorageType) -> stream::Config {
    // What async-nats' create_key_value would create: one value per key, direct gets.
    stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    }
}

/// Creates the streams that are missing; aligns `max_age` (a changed TTL setting).
async fn ensure_streams(js: &jetstream::Context, streams: &[stream::Config]) -> Result<(), String> {
    for c in streams {
        let s = match js.get_or_create_stream(c.clone()).await {
            Ok(s) => s,
            // Another node created it between our lookup and our create ("subjects overlap
            // with an existing stream"): it exists now.
            Err(first) => js
                .get_stream(&c.name)
                .await
                .map_err(|_| format!("stream {}: {first}", c.name))?,
        };
        if s.cached_info().config.max_age != c.max_age {
            let mut updated = s.cached_info().config.clone();
            updated.max_age = c.max_age;
            if !c.max_age.is_zero() {
                // The server refuses a duplicates window longer than max_age.
                updated.duplicate_window = updated.duplicate_window.min(c.max_age);
            }
            js.update_stream(updated)
                .await
                .map_err(|e| format!("stream {}: {e}", c.name))?;
            tracing::info!(stream = %c.name, max_age = ?c.max_age, "nats: stream max_age updated");
        }
    }
    Ok(())
}

/// `s` as one subject token: `.` written `%2E`.
fn push_token(out: &mut String, s: &str) {
    for (i, part) in s.split('.').enumerate() {
        if i > 0 {
            out.push_str("%2E");
        }
        out.push_str(part);
    }
}

/// A counter key as a KV key (see the module doc).
fn counter_key(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut last = 0u8;
    for b in raw.bytes() {
        let c = if b == b':' { b'.' } else { b };
        let separator = c == b'.' && !out.is_empty() && !out.ends_with('.');
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'/') || separator {
            out.push(char::from(c));
        } else {
            let _ = write!(out, "={b:02X}");
        }
        last = b;
    }
    if out.ends_with('.') {
        out.pop();
        let _ = write!(out, "={last:02X}");
    }
    out
}

/// `u.<n>.<u>`: a node's connection count for a user.
fn user_key(node: &str, user: &str) -> String {
    format!("u.{node}.{}", B64.encode(user))
}

/// `t.<n>.<t>`: a node's subscriber count for a topic.
fn topic_key(node: &str, topic: &Topic) -> String {
    format!("t.{node}.{}", B64.encode(topic.as_str()))
}

fn header_u64(m: &StreamMessage, name: &str) -> Option<u64> {
    m.headers.get(name)?.as_str().parse().ok()
}

fn count_of(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn unavailable(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Unavailable(e.to_string())
}

type KvWrite<'a> = BoxFuture<'a, Result<(), String>>;

/// Runs `writes` with at most [`WRITES_IN_FLIGHT`] at a time; the first error, if any.
async fn all(writes: Vec<KvWrite<'_>>) -> Result<(), String> {
    let results: Vec<_> = futures_util::stream::iter(writes)
        .buffer_unordered(WRITES_IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect()
}

impl NatsCluster {
    pub async fn connect(
        options: Options,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> Result<Arc<NatsCluster>, ClusterError> {
        let fail = |message: String| ClusterError::Connect {
            backend: "nats",
            url: options.url.clone(),
            message,
        };
        let p = options.prefix.clone();
        if p.is_empty()
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(fail(format!(
                "bus.prefix {p:?} must be A-Z a-z 0-9 _ - (it names NATS subjects and buckets)"
            )));
        }
        let link = Arc::new(Link::default());
        let events = link.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("herald {}", options.node_id))
            // 100 ms doubling to 5 s.
            .reconnect_delay_callback(|attempts| {
                let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
                Duration::from_millis(100u64.saturating_mul(2u64.saturating_pow(exp.min(10))))
                    .min(Duration::from_secs(5))
            })
            .event_callback(move |event| {
                let link = events.clone();
                async move {
                    match event {
                        Event::Disconnected => {
                            link.drops.fetch_add(1, Ordering::SeqCst);
                            tracing::warn!("nats: disconnected; reconnecting");
                        }
                        Event::Connected => link.connected.notify_one(),
                        Event::SlowConsumer(sid) => tracing::warn!(
                            sid,
                            "nats: a subscription fell behind; the client dropped messages"
                        ),
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            })
            .connect(options.url.as_str())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let mut streams = vec![
            kv_stream(
                format!("{p}_presence"),
                options.presence_ttl,
                stream::StorageType::Memory,
            ),
            kv_stream(
                format!("{p}_retained"),
                Duration::ZERO,
                stream::StorageType::File,
            ),
            kv_stream(
                format!("{p}_revocations"),
                Duration::ZERO,
                stream::StorageType::File,
            ),
            stream::Config {
                name: format!("{p}_history"),
                subjects: vec![format!("{p}.h.>")],
                allow_direct: true,
                num_replicas: 1,
                ..Default::default()
            },
        ];
        if let Some(c) = &options.interest {
            streams.push(kv_stream(
                format!("{p}_interest"),
                c.ttl,
                stream::StorageType::Memory,
            ));
        }
        ensure_streams(&js, &streams).await.map_err(fail)?;
        let bucket = |name: String| {
            let js = js.clone();
            async move {
                js.get_key_value(&name)
                    .await
                    .map_err(|e| format!("bucket {name}: {e}"))
            }
        };
        let presence = bucket(format!("{p}_presence")).await.map_err(fail)?;
        let retained = bucket(format!("{p}_retained")).await.map_err(fail)?;
        let revocations = bucket(format!("{p}_revocations")).await.map_err(fail)?;
        let counters = match &options.interest {
            Some(c) => Some((
                c.clone(),
                bucket(format!("{p}_interest")).await.map_err(fail)?,
            )),
            None => None,
        };
        let history = js
            .get_stream(format!("{p}_history"))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let this = Arc::new(NatsCluster {
            node_key: B64.encode(&options.node_id),
            node: options.node_id.clone(),
            prefix: p,
            presence_ttl: options.presence_ttl,
            client,
            js,
            streams,
            presence,
            retained,
            revocations,
            counters,
            history,
            hub,
            changes: Changes::new(options.linger),
            sink: OnceLock::new(),
            link,
            live: Mutex::new(HashMap::new()),
            tails: Mutex::new(HashMap::new()),
        });

        let control = this
            .client
            .subscribe(format!("{}.control", this.prefix))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let own = this
            .client
            .subscribe(this.node_subject(&this.node))
            .await
            .map_err(|e| fail(e.to_string()))?;
        this.sync().await.map_err(fail)?;
        // Entries left by an earlier run of this node id would count until they expire.
        this.purge_own().await.map_err(fail)?;
        this.put_node().await.map_err(fail)?;
        // The nodes already there, before the watch (below) catches up.
        for (key, _) in this.scan("n.*").await.map_err(fail)? {
            if let Some(node) = key.strip_prefix("n.") {
                this.live.lock().insert(node.to_owned(), Instant::now());
            }
        }

        tokio::spawn(this.clone().read_control(control, shutdown.clone()));
        tokio::spawn(this.clone().read_own(own, shutdown.clone()));
        tokio::spawn(this.clone().watch_nodes(shutdown.clone()));
        tokio::spawn(this.clone().run(shutdown));
        Ok(this)
    }

    fn topic_subject(&self, topic: &Topic) -> String {
        self.subject('t', topic.as_str())
    }

    fn history_subject(&self, topic: &Topic) -> String {
        self.subject('h', topic.as_str())
    }

    fn node_subject(&self, node: &str) -> String {
        let mut s = format!("{}.node.", self.prefix);
        push_token(&mut s, node);
        s
    }

    fn subject(&self, kind: char, token: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 3 + token.len() + 8);
        s.push_str(&self.prefix);
        s.push('.');
        s.push(kind);
        s.push('.');
        push_token(&mut s, token);
        s
    }

    /// A revocation is kept in `p_revocations` (key `j.<jti>` or `u.<user>`, base64url)
    /// until it ends, for nodes that start later; ended ones are deleted as new ones come.
    async fn keep_revocation(&self, event: &ControlEvent, payload: &Bytes) -> Result<(), String> {
        let ControlEvent::Revoke {
            jti, user, until, ..
        } = event
        else {
            return Ok(());
        };
        let key = match (jti, user) {
            (Some(j), _) => format!("j.{}", B64.encode(j)),
            (None, Some(u)) => format!("u.{}", B64.encode(u)),
            (None, None) => return Ok(()),
        };
        if until.is_some_and(|u| u <= herald_core::message::now_secs()) {
            return Ok(());
        }
        self.revocations
            .put(key, payload.clone())
            .await
            .map(|_| ())
            .map_err(|e| format!("keep revocation: {e}"))?;
        for (key, _) in self.stored_revocations(true).await? {
            let _ = self.revocations.delete(key).await;
        }
        Ok(())
    }

    /// The stored revocations that are still in force (`ended` false) or have ended.
    async fn stored_revocations(&self, ended: bool) -> Result<Vec<(String, ControlEvent)>, String> {
        let now = herald_core::message::now_secs();
        let mut out = Vec::new();
        for (key, value) in self.scan_in(&self.revocations, ">").await? {
            match wire::decode_control(&value) {
                Ok(e @ ControlEvent::Revoke { until, .. }) => {
                    if until.is_some_and(|u| u <= now) == ended {
                        out.push((key, e));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, key, "nats: skipping a stored revocation"),
            }
        }
        Ok(out)
    }

    fn connected(&self) -> Result<(), String> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err("not connected to the NATS server".into()),
        }
    }

    /// A round trip to the server: everything sent before (SUBs) has been processed.
    async fn sync(&self) -> Result<(), String> {
        let request = async_nats::Request::new().timeout(Some(CONFIRM_TIMEOUT));
        match self
            .client
            .send_request(format!("{}.sync", self.prefix), request)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(format!("round trip to the server: {e}")),
        }
    }

    // ---- receiving ----

    fn deliver(&self, topic: &Topic, payload: &[u8]) {
        match Message::from_json_frame(payload) {
            Ok(msg) if msg.topic == *topic => {
                if let Some(sink) = self.sink.get() {
                    sink.on_message(Arc::new(msg));
                }
            }
            Ok(msg) => tracing::warn!(
                subject = %topic, topic = %msg.topic,
                "nats: dropped a message whose topic is not its subject's"
            ),
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "nats: dropped a malformed message")
            }
        }
    }

    async fn subscribe_topic(self: &Arc<Self>, topic: &Topic) -> Result<JoinHandle<()>, String> {
        let mut sub = self
            .client
            .subscribe(self.topic_subject(topic))
            .await
            .map_err(|e| format!("subscribe {topic}: {e}"))?;
        let (this, topic) = (self.clone(), topic.clone());
        // Aborted on unsubscribe: dropping the subscriber unsubscribes on the server.
        Ok(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                this.deliver(&topic, &m.payload);
            }
        }))
    }

    async fn read_control(
        self: Arc<Self>,
        mut sub: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        while let Some(Some(m)) = shutdown.run_until_cancelled(sub.next()).await {
            match wire::decode_control(&m.payload) {
                Ok(event) => {
                    if let Some(sink) = self.sink.get() {
                        sink.on_control(event);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "nats: dropped a control event"),
            }
        }
    }

    async fn read_own(
        self: Arc<Self>,
        mut sub: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        while let Some(Some(m)) = shutdown.run_until_cancelled(sub.next()).await {
            self.node_event(m).await;
        }
        // Leaving: senders get "no responders" from now on; answer what was already on its way.
        if sub.drain().await.is_ok() {
            let drained = async {
                while let Some(m) = sub.next().await {
                    self.node_event(m).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
        }
    }

    async fn node_event(&self, m: async_nats::Message) {
        match wire::decode_node_event(m.payload) {
            Ok(event) => {
                if let Some(sink) = self.sink.get() {
                    sink.on_node_event(event);
                }
            }
            Err(e) => tracing::warn!(error = %e, "nats: dropped a node event"),
        }
        // The answer tells the sender this node exists (see send_to_node).
        if let Some(reply) = m.reply {
            let _ = self.client.publish(reply, Bytes::new()).await;
        }
    }

    /// Keeps `live` current from the liveness records. Recreates the watch when it fails or
    /// stops showing this node's own refreshes (a watch that went quiet).
    async fn watch_nodes(self: Arc<Self>, shutdown: CancellationToken) {
        let quiet = self.presence_ttl * 2 / 3;
        while !shutdown.is_cancelled() {
            match self.presence.watch_with_history("n.*").await {
                Ok(mut watch) => {
                    let started = Instant::now();
                    loop {
                        let next = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            next = tokio::time::timeout(self.presence_ttl / 3, watch.next()) => next,
                        };
                        match next {
                            Ok(Some(Ok(entry))) => {
                                let Some(node) = entry.key.strip_prefix("n.") else {
                                    continue;
                                };
                                let mut live = self.live.lock();
                                if entry.operation == Operation::Put {
                                    live.insert(node.to_owned(), Instant::now());
                                } else {
                                    live.remove(node);
                                }
                            }
                            Ok(Some(Err(e))) => {
                                tracing::debug!(error = %e, "nats: node watch failed");
                                break;
                            }
                            Ok(None) => break,
                            Err(_) => {}
                        }
                        let seen = self.live.lock().get(&self.node_key).copied();
                        let last = seen.map_or(started, |at| at.max(started));
                        if last.elapsed() > quiet {
                            tracing::debug!("nats: node watch went quiet; recreating it");
                            break;
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "nats: cannot watch the nodes yet"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Other nodes whose liveness record was put within the presence TTL.
    fn live_others(&self) -> Vec<String> {
        let mut live = self.live.lock();
        live.retain(|_, at| at.elapsed() < self.presence_ttl);
        live.keys()
            .filter(|n| **n != self.node_key)
            .cloned()
            .collect()
    }

    // ---- the background task ----

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut subs: HashMap<Topic, JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refresh_every = self.presence_ttl / 3;
        let mut next_refresh = Instant::now() + refresh_every;
        let interest_every = self.counters.as_ref().map(|(c, _)| c.refresh);
        let mut next_interest = Instant::now() + interest_every.unwrap_or_default();
        // After a failure, the next attempt waits (doubling up to 5 s): no busy retries.
        let (mut retry_at, mut backoff) = (Instant::now(), TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.changes.woken() => {}
                _ = self.link.connected.notified() => {}
                _ = tick.tick() => {}
            }
            if self.connected().is_err() || Instant::now() < retry_at {
                continue;
            }
            let drops = self.link.drops.load(Ordering::SeqCst);
            let restoring = drops != self.link.restored.load(Ordering::SeqCst);
            let mut failed = None;
            if restoring && let Err(e) = self.restore(&mut subs).await {
                failed = Some(format!("restoring after a reconnection: {e}"));
            } else {
                let batch = self.changes.take(&self.hub, Instant::now());
                if !batch.is_empty()
                    && let Err(e) = self.apply(&batch, &mut subs).await
                {
                    self.changes.retry(batch);
                    failed = Some(format!("applying local changes: {e}"));
                }
            }
            if let Some(e) = failed {
                tracing::warn!(error = %e, retry_in = ?backoff, "nats: failed; will retry");
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            backoff = TICK;
            if restoring {
                // Subscriptions and presence are back: healthy again (unless it dropped again).
                self.link.restored.store(drops, Ordering::SeqCst);
                self.link.warned.store(false, Ordering::SeqCst);
                tracing::info!("nats: reconnected; subscriptions and presence restored");
            }
            let now = Instant::now();
            if now >= next_refresh {
                next_refresh = now + refresh_every;
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "nats: presence refresh failed");
                    next_refresh = now + TICK * 5;
                }
            }
            if let Some(every) = interest_every.filter(|_| now >= next_interest) {
                next_interest = now + every;
                let topics = self.hub.topics();
                let writes = topics
                    .iter()
                    .map(|t| self.write_counter(t, true).boxed())
                    .collect();
                if let Err(e) = all(writes).await {
                    tracing::warn!(error = %e, "nats: interest counter refresh failed");
                    next_interest = now + TICK * 5;
                }
            }
        }
        for (_, reader) in subs {
            reader.abort();
        }
        if tokio::time::timeout(Duration::from_secs(3), self.leave())
            .await
            .is_err()
        {
            tracing::debug!("nats: leaving timed out");
        }
    }

    /// After a reconnection: the streams exist again, every topic of this node is subscribed,
    /// every local count is dirty (written by the next batch), the liveness record is back.
    async fn restore(
        self: &Arc<Self>,
        subs: &mut HashMap<Topic, JoinHandle<()>>,
    ) -> Result<(), String> {
        ensure_streams(&self.js, &self.streams).await?;
        // The server may have lost the history (a cached tail could even match a new
        // stream's sequence by chance).
        self.tails.lock().clear();
        let topics = self.changes.lost(&self.hub);
        for t in &topics {
            if !subs.contains_key(t) {
                let reader = self.subscribe_topic(t).await?;
                subs.insert(t.clone(), reader);
            }
        }
        self.sync().await?;
        self.changes.confirm(&topics);
        self.put_node().await
    }

    async fn apply(
        self: &Arc<Self>,
        batch: &Batch,
        subs: &mut HashMap<Topic, JoinHandle<()>>,
    ) -> Result<(), String> {
        for t in &batch.subscribe {
            if !subs.contains_key(t) {
                let reader = self.subscribe_topic(t).await?;
                subs.insert(t.clone(), reader);
            }
        }
        for t in &batch.unsubscribe {
            if let Some(reader) = subs.remove(t) {
                reader.abort();
            }
        }
        if !batch.subscribe.is_empty() {
            self.sync().await?;
            let subscribed: Vec<Topic> = batch
                .subscribe
                .iter()
                .filter(|t| subs.contains_key(*t))
                .cloned()
                .collect();
            self.changes.confirm(&subscribed);
        }
        let users = batch
            .users
            .iter()
            .map(|(u, n)| self.put_count(user_key(&self.node_key, u), *n).boxed());
        let topics = batch
            .topics
            .iter()
            .map(|(t, n)| self.put_count(topic_key(&self.node_key, t), *n).boxed());
        all(users.chain(topics).collect()).await?;
        // After this node's counts: each counter write then sees them.
        let counters = batch
            .topics
            .iter()
            .map(|(t, _)| self.write_counter(t, true).boxed())
            .collect();
        all(counters).await
    }

    /// The liveness record, and every local count again (their TTL starts over).
    async fn refresh(&self) -> Result<(), String> {
        self.put_node().await?;
        let users = self.hub.online_users();
        let topics = self.hub.topics();
        let users = users.iter().map(|(u, n)| {
            self.put_count(user_key(&self.node_key, u), *n as u64)
                .boxed()
        });
        let topics = topics.iter().filter_map(|t| {
            let n = self.hub.subscriber_count(t.as_str()) as u64;
            (n > 0).then(|| self.put_count(topic_key(&self.node_key, t), n).boxed())
        });
        all(users.chain(topics).collect()).await
    }

    /// On shutdown: this node's presence goes, the counters are rewritten without it.
    async fn leave(&self) {
        if let Err(e) = self.purge_own().await {
            tracing::debug!(error = %e, "nats: could not remove this node's presence");
            return;
        }
        let topics = self.hub.topics();
        let writes = topics
            .iter()
            .map(|t| self.write_counter(t, false).boxed())
            .collect();
        if let Err(e) = all(writes).await {
            tracing::debug!(error = %e, "nats: could not rewrite interest counters");
        }
    }

    async fn purge_own(&self) -> Result<(), String> {
        let n = &self.node_key;
        let bucket = &self.presence.name;
        for filter in [
            format!("$KV.{bucket}.n.{n}"),
            format!("$KV.{bucket}.u.{n}.>"),
            format!("$KV.{bucket}.t.{n}.>"),
        ] {
            self.presence
                .stream
                .purge()
                .filter(filter)
                .await
                .map_err(|e| format!("purge this node's presence: {e}"))?;
        }
        Ok(())
    }

    // ---- presence ----

    async fn put_node(&self) -> Result<(), String> {
        self.presence
            .put(format!("n.{}", self.node_key), self.node.clone().into())
            .await
            .map(|_| ())
            .map_err(|e| format!("liveness record: {e}"))
    }

    async fn put_count(&self, key: String, n: u64) -> Result<(), String> {
        let done = if n == 0 {
            self.presence.delete(&key).await.map_err(|e| e.to_string())
        } else {
            self.presence
                .put(&key, n.to_string().into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        done.map_err(|e| format!("presence {key}: {e}"))
    }

    /// The sum of the other live nodes' entries `key(node)`.
    async fn others(&self, key: impl Fn(&str) -> String) -> Result<u64, String> {
        self.connected()?;
        let gets = self
            .live_others()
            .into_iter()
            .map(|n| self.presence.get(key(&n)));
        let mut sum = 0;
        for value in futures_util::future::join_all(gets).await {
            if let Some(v) = value.map_err(|e| format!("presence: {e}"))? {
                sum += count_of(&v);
            }
        }
        Ok(sum)
    }

    async fn cluster_subscribers(&self, topic: &Topic, local: bool) -> Result<u64, String> {
        let others = self.others(|n| topic_key(n, topic)).await?;
        let here = if local {
            self.hub.subscriber_count(topic.as_str()) as u64
        } else {
            0
        };
        Ok(others + here)
    }

    /// Rewrites the interest counter of `topic` (if it has one) with the cluster-wide count,
    /// by compare-and-set (see the module doc). `local`: count this node's subscribers.
    async fn write_counter(&self, topic: &Topic, local: bool) -> Result<(), String> {
        let Some((counters, kv)) = &self.counters else {
            return Ok(());
        };
        let Some(raw) = counters.key_for(topic) else {
            return Ok(());
        };
        let key = counter_key(&raw);
        for _ in 0..32 {
            let entry = kv
                .entry(&key)
                .await
                .map_err(|e| format!("counter {key}: {e}"))?;
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let present = entry.is_some_and(|e| e.operation == Operation::Put);
            let n = self.cluster_subscribers(topic, local).await?;
            let written = match (n, present) {
                (0, false) => return Ok(()),
                (0, true) => kv.delete_expect_revision(&key, Some(revision)).await,
                _ => kv
                    .update(&key, n.to_string().into(), revision)
                    .await
                    .map(|_| ()),
            };
            match written {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(format!("counter {key}: {e}")),
            }
        }
        Err(format!("counter {key}: too many concurrent writers"))
    }

    /// The latest value of every presence key matching `filter` (a KV key pattern).
    async fn scan(&self, filter: &str) -> Result<Vec<(String, Bytes)>, String> {
        self.scan_in(&self.presence, filter).await
    }

    /// The latest value of every key of `bucket` matching `filter`.
    async fn scan_in(
        &self,
        bucket: &kv::Store,
        filter: &str,
    ) -> Result<Vec<(String, Bytes)>, String> {
        self.connected()?;
        let prefix = format!("$KV.{}.", bucket.name);
        // A pull consumer: it only sends what it is asked for, so nothing is pushed before the
        // reader listens (an ordered push consumer could lose its first messages that way).
        let consumer = tokio::time::timeout(
            CONFIRM_TIMEOUT,
            bucket
                .stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: format!("{prefix}{filter}"),
                    deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                    ..Default::default()
                }),
        )
        .await
        .map_err(|_| "presence scan: timed out".to_owned())?
        .map_err(|e| format!("presence scan: {e}"))?;
        // The keys' last values when the consumer was made: that many messages. Writers keep
        // writing meanwhile (liveness records every presence_ttl/3), so the stream never
        // runs dry by itself: stop after those, keeping the newest value seen per key.
        let mut left = consumer.cached_info().num_pending;
        let mut latest: HashMap<String, Option<Bytes>> = HashMap::new();
        if left > 0 {
            let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
            let mut messages = tokio::time::timeout_at(deadline, consumer.messages())
                .await
                .map_err(|_| "presence scan: timed out".to_owned())?
                .map_err(|e| format!("presence scan: {e}"))?;
            while left > 0 {
                let m = match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => return Err(format!("presence scan: {e}")),
                    Ok(None) | Err(_) => return Err("presence scan: interrupted".into()),
                };
                left -= 1;
                let deleted = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some();
                if let Some(key) = m.subject.strip_prefix(&prefix) {
                    latest.insert(key.to_owned(), (!deleted).then(|| m.payload.clone()));
                }
            }
        }
        Ok(latest
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    // ---- history ----

    async fn last_entry(&self, subject: &str) -> Result<Option<StreamMessage>, HistoryError> {
        match self.history.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Keeps the last `size` entries, every size/8 appends (readers apply `size` themselves).
    fn trim(&self, subject: String, seq: u64, size: usize) {
        let size = size as u64;
        if seq <= size || !seq.is_multiple_of((size / 8).max(1)) {
            return;
        }
        let stream = self.history.clone();
        tokio::spawn(async move {
            if let Err(e) = stream.purge().filter(subject).keep(size).await {
                tracing::debug!(error = %e, "nats: history trim failed");
            }
        });
    }
}

impl Interest for NatsCluster {
    fn watch(&self, topic: &Topic) {
        self.changes.watch(topic);
    }

    fn unwatch(&self, topic: &Topic) {
        self.changes.unwatch(topic);
    }

    fn topic_changed(&self, topic: &Topic) {
        self.changes.topic_changed(topic);
    }

    fn user_changed(&self, user: &str) {
        self.changes.user_changed(user);
    }
}

#[async_trait]
impl Bus for NatsCluster {
    fn attach(&self, sink: Arc<dyn BusSink>) {
        let _ = self.sink.set(sink);
    }

    async fn publish(&self, msg: Arc<Message>) -> Result<(), BusError> {
        // This node's subscribers get it back through its own subscription.
        let failed = if self.healthy() {
            match self
                .client
                .publish(self.topic_subject(&msg.topic), msg.json_frame().clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => Some(e),
            }
        } else {
            None
        };
        match failed {
            Some(e) => {
                tracing::warn!(topic = %msg.topic, error = %e, "nats: publish failed; delivered on this node only")
            }
            None if !self.link.warned.swap(true, Ordering::SeqCst) => {
                tracing::warn!("nats: the bus is down; publishes are delivered on this node only")
            }
            None => {}
        }
        if let Some(sink) = self.sink.get() {
            sink.on_message(msg);
        }
        Ok(())
    }

    async fn control(&self, event: ControlEvent) -> Result<(), BusError> {
        let error = if self.healthy() {
            let subject = format!("{}.control", self.prefix);
            let payload = wire::encode_control(&event);
            match self.keep_revocation(&event, &payload).await {
                Err(e) => e,
                Ok(()) => match self.client.publish(subject, payload).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e.to_string(),
                },
            }
        } else {
            "the bus is down".to_owned()
        };
        tracing::warn!(error = %error, "nats: control event applied on this node only");
        if let Some(sink) = self.sink.get() {
            sink.on_control(event);
        }
        Err(BusError::Unavailable(error))
    }

    async fn send_to_node(&self, node: &str, event: NodeEvent) -> Result<(), BusError> {
        if node == self.node {
            let sink = self
                .sink
                .get()
                .ok_or_else(|| BusError::Unavailable("bus not attached".into()))?;
            sink.on_node_event(event);
            return Ok(());
        }
        if !is_valid_segment(node) {
            return Err(BusError::UnknownNode(node.to_owned()));
        }
        if !self.healthy() {
            return Err(BusError::Unavailable("the bus is down".into()));
        }
        let request = async_nats::Request::new()
            .payload(wire::encode_node_event(&event))
            .timeout(Some(CONFIRM_TIMEOUT));
        match self
            .client
            .send_request(self.node_subject(node), request)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                Err(BusError::UnknownNode(node.to_owned()))
            }
            Err(e) => Err(BusError::Unavailable(format!("node {node}: {e}"))),
        }
    }

    async fn revocations(&self) -> Result<Vec<ControlEvent>, BusError> {
        Ok(self
            .stored_revocations(false)
            .await
            .map_err(BusError::Unavailable)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    fn healthy(&self) -> bool {
        self.client.connection_state() == State::Connected
            && self.link.drops.load(Ordering::SeqCst) == self.link.restored.load(Ordering::SeqCst)
    }

    async fn watching(&self, topic: &Topic) -> Result<(), BusError> {
        if !self.healthy() {
            // Local traffic still works; the topic is subscribed once the bus is back.
            return Ok(());
        }
        self.changes.wait_subscribed(topic, CONFIRM_TIMEOUT).await
    }
}

#[async_trait]
impl Presence for NatsCluster {
    async fn user_connections(&self, user: &str) -> Result<u64, BusError> {
        let others = self
            .others(|n| user_key(n, user))
            .await
            .map_err(BusError::Unavailable)?;
        Ok(self.hub.user_connection_count(user) as u64 + others)
    }

    async fn online(&self) -> Result<Vec<(String, u64)>, BusError> {
        let mut users: HashMap<String, u64> = self
            .hub
            .online_users()
            .into_iter()
            .map(|(u, n)| (u.to_string(), n as u64))
            .collect();
        let own = format!("u.{}.", self.node_key);
        for (key, value) in self.scan("u.>").await.map_err(BusError::Unavailable)? {
            if key.starts_with(&own) {
                continue;
            }
            let user = key
                .rsplit('.')
                .next()
                .and_then(|u| B64.decode(u).ok())
                .and_then(|u| String::from_utf8(u).ok());
            let n = count_of(&value);
            if let (Some(user), true) = (user, n > 0) {
                *users.entry(user).or_default() += n;
            }
        }
        Ok(users.into_iter().collect())
    }

    async fn topic_subscribers(&self, topic: &Topic) -> Result<u64, BusError> {
        self.cluster_subscribers(topic, true)
            .await
            .map_err(BusError::Unavailable)
    }
}

/// `msg` without its seq (its frame is encoded again without it).
fn without_seq(msg: Message) -> Message {
    let mut b = MessageBuilder::new(msg.topic, msg.event.into_string(), msg.data);
    b.id = Some(msg.id.into_string());
    b.from = msg.from.map(String::from);
    b.trace_id = msg.trace_id.map(String::from);
    b.durable = msg.durable;
    b.ts = Some(msg.ts);
    let mut m = b.build();
    m.received_at = msg.received_at;
    m
}

#[async_trait]
impl History for NatsCluster {
    async fn append(
        &self,
        mut msg: Message,
        opts: HistoryOptions,
    ) -> Result<Arc<Message>, HistoryError> {
        self.connected().map_err(HistoryError::Unavailable)?;
        if msg.seq.is_some() {
            msg = without_seq(msg);
        }
        let subject = self.history_subject(&msg.topic);
        let frame = msg.json_frame();
        let started = Instant::now();
        let mut tail = self.tails.lock().get(&msg.topic).copied();
        let mut attempt = 0u32;
        loop {
            let (prev, last) = match tail {
                Some(t) => t,
                None => match self.last_entry(&subject).await? {
                    Some(m) => (
                        m.sequence,
                        header_u64(&m, SEQ).ok_or_else(|| unavailable("entry without seq"))?,
                    ),
                    None => (0, 0),
                },
            };
            let seq = last + 1;
            let mut stored = Vec::with_capacity(frame.len() + 24);
            let _ = write!(stored, "{{\"seq\":{seq},");
            stored.extend_from_slice(frame.get(1..).unwrap_or_default());
            let stored = Bytes::from(stored);
            let mut headers = HeaderMap::new();
            headers.insert(EXPECTED_LAST, HeaderValue::from(prev));
            headers.insert(SEQ, HeaderValue::from(seq));
            headers.insert(PREV, HeaderValue::from(prev));
            headers.insert(AT, HeaderValue::from(now_ms()));
            headers.insert(TTL, HeaderValue::from(opts.ttl.as_millis() as u64));
            headers.insert(SIZE, HeaderValue::from(opts.size as u64));
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, stored.clone())
                .await
                .map_err(unavailable)?
                .await;
            match ack {
                Ok(ack) => {
                    {
                        let mut tails = self.tails.lock();
                        if tails.len() >= 100_000 {
                            tails.clear();
                        }
                        tails.insert(msg.topic.clone(), (ack.sequence, seq));
                    }
                    self.trim(subject, seq, opts.size);
                    let mut out = Message::from_json_frame(&stored).map_err(unavailable)?;
                    out.received_at = msg.received_at;
                    return Ok(Arc::new(out));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another node appended meanwhile: read the new last entry.
                    tail = None;
                    attempt += 1;
                    if started.elapsed() > APPEND_TIMEOUT {
                        return Err(unavailable("history append: too many concurrent writers"));
                    }
                    if attempt > 2 {
                        tokio::time::sleep(Duration::from_micros(100 * u64::from(attempt.min(20))))
                            .await;
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    async fn since(&self, topic: &Topic, since: u64) -> Result<Recovery, HistoryError> {
        self.connected().map_err(HistoryError::Unavailable)?;
        let subject = self.history_subject(topic);
        let Some(mut entry) = self.last_entry(&subject).await? else {
            return Ok(if since == 0 {
                Recovery::Complete {
                    messages: Vec::new(),
                    latest: 0,
                }
            } else {
                Recovery::Gap { latest: 0 }
            });
        };
        let field = |m: &StreamMessage, name| {
            header_u64(m, name).ok_or_else(|| unavailable(format!("history entry without {name}")))
        };
        let latest = field(&entry, SEQ)?;
        if since > latest {
            return Ok(Recovery::Gap { latest });
        }
        if since == latest {
            return Ok(Recovery::Complete {
                messages: Vec::new(),
                latest,
            });
        }
        // The last entry's options apply to the whole topic, as in MemoryHistory.
        let (ttl, size) = (field(&entry, TTL)?, field(&entry, SIZE)?);
        if latest - since > size {
            return Ok(Recovery::Gap { latest });
        }
        let now = now_ms();
        let mut messages = Vec::with_capacity((latest - since) as usize);
        loop {
            let seq = field(&entry, SEQ)?;
            if now.saturating_sub(field(&entry, AT)?) > ttl || seq <= since {
                return Ok(Recovery::Gap { latest });
            }
            messages.push(Arc::new(
                Message::from_json_frame(&entry.payload).map_err(unavailable)?,
            ));
            if seq == since + 1 {
                break;
            }
            entry = match self.history.direct_get(field(&entry, PREV)?).await {
                Ok(m) if m.subject.as_str() == subject => m,
                Ok(_) => return Ok(Recovery::Gap { latest }),
                // Trimmed meanwhile.
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                    return Ok(Recovery::Gap { latest });
                }
                Err(e) => return Err(unavailable(e)),
            };
        }
        messages.reverse();
        Ok(Recovery::Complete { messages, latest })
    }

    async fn latest(&self, topic: &Topic) -> Result<u64, HistoryError> {
        self.connected().map_err(HistoryError::Unavailable)?;
        match self.last_entry(&self.history_subject(topic)).await? {
            Some(m) => header_u64(&m, SEQ).ok_or_else(|| unavailable("entry without seq")),
            None => Ok(0),
        }
    }

    async fn retain(&self, msg: Arc<Message>) -> Result<(), HistoryError> {
        self.connected().map_err(HistoryError::Unavailable)?;
        self.retained
            .put(B64.encode(msg.topic.as_str()), msg.json_frame().clone())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn retained(&self, topic: &Topic) -> Result<Option<Arc<Message>>, HistoryError> {
        self.connected().map_err(HistoryError::Unavailable)?;
        let Some(frame) = self
            .retained
            .get(B64.encode(topic.as_str()))
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        Message::from_json_frame(&frame)
            .map(|m| Some(Arc::new(m)))
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_keys_are_valid_kv_keys() {
        assert_eq!(counter_key("ws:sub:d-9"), "ws.sub.d-9");
        assert_eq!(counter_key("s1.watch.d2!"), "s1.watch.d2=21");
        assert_eq!(counter_key("ws:sub:a@b"), "ws.sub.a=40b");
        assert_eq!(counter_key("k::x:"), "k.=3Ax=3A");
        assert_eq!(counter_key(":a..b."), "=3Aa.=2Eb=2E");
        assert_eq!(counter_key("a=b"), "a=3Db");
    }

    #[test]
    fn subject_tokens_escape_dots() {
        let mut s = String::new();
        push_token(&mut s, "room/a.b..c");
        assert_eq!(s, "room/a%2Eb%2E%2Ec");
    }
}
