//! The Redis backend: pub/sub for the bus, hashes for presence, sorted sets for history, all on
//! one standalone Redis (or a Sentinel-managed primary; not Redis Cluster: the scripts reach
//! keys they compute).
//!
//! # Layout (`P` is [`Options::prefix`], `N` a node id, `T` a topic)
//!
//! | name | kind | what |
//! |------|------|------|
//! | `P:t:T` | channel | topic messages, as their JSON v1 frame; a node subscribes while it has local subscribers (plus the linger) |
//! | `P:control` | channel | control events ([`wire::encode_control`]), every node subscribes |
//! | `P:node:N` | channel | directed events for node `N` ([`wire::encode_node_event`]) |
//! | `P:nodes` | zset | live nodes, score = expiry (Redis time, Unix ms), renewed every `presence_ttl / 3` |
//! | `P:node:N:users` | hash | user → node `N`'s connection count (absolute), expires with the node |
//! | `P:node:N:topics` | hash | topic → node `N`'s subscriber count (absolute), expires with the node |
//! | `P:hs:T` | hash | `seq`: the topic's last seq (never expires: a resume after the entries expired is a gap, never seq 1 again); `ttl`: entry ttl, ms |
//! | `P:h:T` | zset | history entries, score = seq, member = `<append ms>:<frame with "seq":N>`; at most `size`, none older than `ttl` |
//! | `P:r:T` | string | the retained frame |
//! | `P:revocations` | zset | revocations in force ([`wire::encode_control`]), score = `until` (Unix s); read by a node at start, expired ones removed on each new one |
//! | interest key | string | seed 001's counter, exactly the template's key (no prefix): sum of `P:node:*:topics[T]` over live nodes, TTL `interest.ttl`, deleted at 0 |
//!
//! Every write of presence and interest is one Lua script (`SYNC`) that also renews the
//! node's liveness; queries (`COUNT`, `ONLINE`) sum over the live nodes other than this one
//! (this node's share is read from its hub, always fresh). A history append (`APPEND`)
//! allocates the seq, stores the frame and publishes it in one script, so seq order is
//! delivery order cluster-wide ([`History::publishes_on_append`] is true). Times are Redis's
//! (`TIME`), so node clocks do not matter.
//!
//! # Tasks
//!
//! One task per node (`RedisCluster::run`) owns the pub/sub connection's sink: it applies the
//! [`Changes`] batches (SUBSCRIBE/UNSUBSCRIBE, presence writes), renews liveness and interest
//! counters, and reconnects after an outage (backoff 100 ms doubling to 5 s; then it
//! resubscribes everything `Changes::lost` returns and rewrites every local count before it
//! reports healthy again). A reader task per connection hands what arrives to the sink;
//! when the connection ends, the main task notices and reconnects. Commands (publish,
//! scripts) go over one multiplexed connection replaced on each reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::acl::HistoryOptions;
use herald_core::bus::{Bus, BusError, BusSink, ControlEvent, NodeEvent, Presence};
use herald_core::history::{History, HistoryError, Recovery};
use herald_core::hub::{Hub, Interest};
use herald_core::message::{Message, MessageBuilder};
use herald_core::topic::Topic;
use parking_lot::RwLock;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult, Script, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::local::{Batch, Changes};
use crate::{ClusterError, Options, wire};

/// Connecting, and any single command or pub/sub request, gives up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Entries per script call when a batch is large (a long script blocks Redis).
const CHUNK: usize = 500;

/// `now` in Unix ms, Redis's clock (shared by the scripts below).
const NOW: &str = "local function now_ms() local t = redis.call('TIME') \
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end\n";

/// Presence and interest writes, and liveness.
/// ARGV: prefix, node, presence ttl ms, interest ttl ms, leaving (0/1), user count,
/// then (user, count)…, then (topic, count, interest key or "")….
const SYNC: &str = r#"
local p, node, ttl, ittl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local nodes = p .. ':nodes'
local users = p .. ':node:' .. node .. ':users'
local topics = p .. ':node:' .. node .. ':topics'
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', nodes, '-inf', now)
if ARGV[5] == '1' then
  redis.call('ZREM', nodes, node)
  redis.call('DEL', users, topics)
else
  redis.call('ZADD', nodes, now + ttl, node)
end
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  if ARGV[i + 1] == '0' then redis.call('HDEL', users, ARGV[i])
  else redis.call('HSET', users, ARGV[i], ARGV[i + 1]) end
  i = i + 2
end
local live = nil
while i + 2 <= #ARGV do
  local topic, key = ARGV[i], ARGV[i + 2]
  if ARGV[5] ~= '1' then
    if ARGV[i + 1] == '0' then redis.call('HDEL', topics, topic)
    else redis.call('HSET', topics, topic, ARGV[i + 1]) end
  end
  if key ~= '' then
    live = live or redis.call('ZRANGEBYSCORE', nodes, '(' .. now, '+inf')
    local sum = 0
    for _, n in ipairs(live) do
      sum = sum + (tonumber(redis.call('HGET', p .. ':node:' .. n .. ':topics', topic)) or 0)
    end
    if sum > 0 then redis.call('SET', key, sum, 'PX', ittl)
    else redis.call('DEL', key) end
  end
  i = i + 3
end
if ARGV[5] ~= '1' then
  redis.call('PEXPIRE', users, ttl)
  redis.call('PEXPIRE', topics, ttl)
end
return 1
"#;

/// One field summed over the live nodes but this one. ARGV: prefix, node, hash (users|topics), field.
const COUNT: &str = r#"
local p = ARGV[1]
local sum = 0
for _, n in ipairs(redis.call('ZRANGEBYSCORE', p .. ':nodes', '(' .. now_ms(), '+inf')) do
  if n ~= ARGV[2] then
    sum = sum + (tonumber(redis.call('HGET', p .. ':node:' .. n .. ':' .. ARGV[3], ARGV[4])) or 0)
  end
end
return sum
"#;

/// Every (user, count) of the live nodes but this one (a user may repeat). ARGV: prefix, node.
const ONLINE: &str = r#"
local p = ARGV[1]
local out = {}
for _, n in ipairs(redis.call('ZRANGEBYSCORE', p .. ':nodes', '(' .. now_ms(), '+inf')) do
  if n ~= ARGV[2] then
    for _, v in ipairs(redis.call('HGETALL', p .. ':node:' .. n .. ':users')) do
      out[#out + 1] = v
    end
  end
end
return out
"#;

/// Drops the oldest entries of `h` older than `ttl` ms (entries are in time order).
const EXPIRE: &str = r#"
local function expire(h, ttl, now)
  while true do
    local first = redis.call('ZRANGE', h, 0, 0)
    if #first == 0 then return end
    local at = tonumber(string.sub(first[1], 1, string.find(first[1], ':', 1, true) - 1))
    if now - at <= ttl then return end
    redis.call('ZREMRANGEBYRANK', h, 0, 0)
  end
end
"#;

/// KEYS: meta hash, entries zset. ARGV: frame (no seq), size, ttl ms, channel. Returns the seq.
const APPEND: &str = r#"
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'ttl', ttl)
local now = now_ms()
local frame = '{"seq":' .. seq .. ',' .. string.sub(ARGV[1], 2)
redis.call('ZADD', KEYS[2], seq, now .. ':' .. frame)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[2]) + 1))
expire(KEYS[2], ttl, now)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PUBLISH', ARGV[4], frame)
return seq
"#;

/// KEYS: meta hash, entries zset. ARGV: since. Returns {latest, gap (0/1), entries…}.
const SINCE: &str = r#"
local latest = tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0
local since = tonumber(ARGV[1])
if since > latest then return {latest, 1} end
if since == latest then return {latest, 0} end
expire(KEYS[2], tonumber(redis.call('HGET', KEYS[1], 'ttl')) or 0, now_ms())
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local oldest = latest + 1
if #first > 0 then oldest = tonumber(first[2]) end
if oldest > since + 1 then return {latest, 1} end
local out = {latest, 0}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  out[#out + 1] = m
end
return out
"#;

struct Scripts {
    sync: Script,
    count: Script,
    online: Script,
    append: Script,
    since: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_now = |body: &str| Script::new(&format!("{NOW}{body}"));
        let with_expire = |body: &str| Script::new(&format!("{NOW}{EXPIRE}{body}"));
        Self {
            sync: with_now(SYNC),
            count: with_now(COUNT),
            online: with_now(ONLINE),
            append: with_expire(APPEND),
            since: with_expire(SINCE),
        }
    }
}

/// One connection's pub/sub side: the sink the main task subscribes with, the reader task.
struct Session {
    sub: PubSubSink,
    reader: JoinHandle<()>,
}

/// The Bus, Presence and History of one node on Redis.
pub struct RedisCluster {
    opts: Options,
    hub: Arc<Hub>,
    client: Client,
    /// The command connection, replaced on each reconnect; `None` never once connected (a
    /// clone is a handle onto the same connection).
    conn: RwLock<Option<MultiplexedConnection>>,
    healthy: AtomicBool,
    changes: Changes,
    sink: OnceLock<Arc<dyn BusSink>>,
    scripts: Scripts,
    /// `P:t:`.
    topic_prefix: String,
    control_channel: String,
    /// `P:revocations`: revocations in force, score = `until` (Unix s).
    revocations_key: String,
    node_channel: String,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("redis: {e}"))
}

fn history_unavailable(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Unavailable(format!("redis: {e}"))
}

/// Whether `e` means the connection is gone (reconnect) rather than one command failing.
fn connection_lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error()
}

fn ms(d: Duration) -> u64 {
    d.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

async fn timed<T>(f: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    match tokio::time::timeout(IO_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "redis did not answer in time",
        ))),
    }
}

impl RedisCluster {
    /// Connects (failing fast when Redis is unreachable), subscribes the control and node
    /// channels, registers this node as live and starts the node's task.
    pub async fn connect(
        opts: Options,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ClusterError> {
        let client = Client::open(opts.url.as_str()).map_err(|e| {
            ClusterError::Url(format!(
                "{}: {e}",
                herald_core::redact::url_password(&opts.url)
            ))
        })?;
        let p = &opts.prefix;
        let this = Arc::new(Self {
            topic_prefix: format!("{p}:t:"),
            control_channel: format!("{p}:control"),
            revocations_key: format!("{p}:revocations"),
            node_channel: format!("{p}:node:{}", opts.node_id),
            changes: Changes::new(opts.linger),
            opts,
            hub,
            client,
            conn: RwLock::new(None),
            healthy: AtomicBool::new(false),
            sink: OnceLock::new(),
            scripts: Scripts::new(),
        });
        let session = this.open().await.map_err(|e| ClusterError::Connect {
            backend: "redis",
            url: herald_core::redact::url_password(&this.opts.url),
            message: e.to_string(),
        })?;
        info!(node = %this.opts.node_id, prefix = %this.opts.prefix, "cluster bus on redis");
        tokio::spawn(this.clone().run(session, shutdown));
        Ok(this)
    }

    /// A new connection pair with every channel of this node subscribed, every local count
    /// written and the node live; reports healthy.
    async fn open(self: &Arc<Self>) -> RedisResult<Session> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(IO_TIMEOUT))
            .set_response_timeout(Some(IO_TIMEOUT));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let (mut sub, stream) = timed(self.client.get_async_pubsub()).await?.split();
        let topics = self.changes.lost(&self.hub);
        let mut channels = vec![self.control_channel.clone(), self.node_channel.clone()];
        channels.extend(topics.iter().map(|t| self.topic_channel(t)));
        timed(sub.subscribe(channels)).await?;
        let reader = tokio::spawn(self.clone().read(stream));
        *self.conn.write() = Some(conn);
        self.changes.confirm(&topics);
        // Liveness, then every local count (lost() marked them all) with the interest
        // counters they feed.
        let mut session = Session { sub, reader };
        let batch = self.changes.take(&self.hub, Instant::now());
        let written = match self.forget_previous().await {
            Ok(()) => match self.sync(&[], &[], false).await {
                Ok(()) => self.apply(&mut session, &batch).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            session.reader.abort();
            self.changes.retry(batch);
            return Err(e);
        }
        self.healthy.store(true, Ordering::Release);
        Ok(session)
    }

    /// The node's task: see the module doc.
    async fn run(self: Arc<Self>, mut session: Session, shutdown: CancellationToken) {
        loop {
            self.serve(&mut session, &shutdown).await;
            session.reader.abort();
            if shutdown.is_cancelled() {
                self.leave().await;
                self.healthy.store(false, Ordering::Release);
                // The last handle: the connection closes.
                *self.conn.write() = None;
                return;
            }
            self.healthy.store(false, Ordering::Release);
            warn!(node = %self.opts.node_id, "redis connection lost; serving local traffic, reconnecting");
            let mut backoff = BACKOFF_MIN;
            session = loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                match self.open().await {
                    Ok(s) => break s,
                    Err(e) => {
                        debug!(error = %e, "redis reconnect failed");
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            };
            info!(node = %self.opts.node_id, "redis connection back");
        }
    }

    /// Applies changes and renews TTLs until the connection is lost or `shutdown`.
    async fn serve(&self, session: &mut Session, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let liveness_every = (self.opts.presence_ttl / 3).max(TICK);
        let mut next_liveness = Instant::now() + liveness_every;
        let interest_every = self.opts.interest.as_ref().map(|i| i.refresh);
        let mut next_interest = interest_every.map(|d| Instant::now() + d);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = &mut session.reader => return,
                () = self.changes.woken() => {}
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let batch = self.changes.take(&self.hub, now);
            if !batch.is_empty()
                && let Err(e) = self.apply(session, &batch).await
            {
                warn!(error = %e, "redis: could not apply local changes; will retry");
                self.changes.retry(batch);
                if connection_lost(&e) {
                    return;
                }
            }
            if now >= next_liveness {
                next_liveness = now + liveness_every;
                let ping = timed(session.sub.ping::<Value>()).await;
                let sync = self.sync(&[], &[], false).await;
                if let Err(e) = ping.and(sync) {
                    warn!(error = %e, "redis: liveness refresh failed");
                    if connection_lost(&e) {
                        return;
                    }
                }
            }
            if let (Some(next), Some(every)) = (next_interest, interest_every)
                && now >= next
            {
                next_interest = Some(now + every);
                if let Err(e) = self.refresh_interest().await {
                    warn!(error = %e, "redis: interest counter refresh failed");
                }
            }
        }
    }

    /// Subscribes, unsubscribes and writes the counts of `batch`.
    async fn apply(&self, session: &mut Session, batch: &Batch) -> RedisResult<()> {
        if !batch.subscribe.is_empty() {
            let channels: Vec<String> = batch
                .subscribe
                .iter()
                .map(|t| self.topic_channel(t))
                .collect();
            timed(session.sub.subscribe(channels)).await?;
            self.changes.confirm(&batch.subscribe);
        }
        if !batch.unsubscribe.is_empty() {
            let channels: Vec<String> = batch
                .unsubscribe
                .iter()
                .map(|t| self.topic_channel(t))
                .collect();
            timed(session.sub.unsubscribe(channels)).await?;
        }
        if !batch.users.is_empty() || !batch.topics.is_empty() {
            self.sync(&batch.users, &batch.topics, false).await?;
        }
        Ok(())
    }

    /// Rewrites the interest counter of every local topic that has one.
    async fn refresh_interest(&self) -> RedisResult<()> {
        let topics = self.interest_topics(true);
        self.sync(&[], &topics, false).await
    }

    /// Local topics with an interest counter, with their local counts (`with_counts`) or 0.
    fn interest_topics(&self, with_counts: bool) -> Vec<(Topic, u64)> {
        let Some(interest) = &self.opts.interest else {
            return Vec::new();
        };
        self.hub
            .topics()
            .into_iter()
            .filter(|t| interest.key_for(t).is_some())
            .map(|t| {
                let n = if with_counts {
                    self.hub.subscriber_count(t.as_str()) as u64
                } else {
                    0
                };
                (t, n)
            })
            .collect()
    }

    /// Runs `SYNC` (in chunks): liveness, absolute counts, interest counters.
    async fn sync(
        &self,
        users: &[(Arc<str>, u64)],
        topics: &[(Topic, u64)],
        leaving: bool,
    ) -> RedisResult<()> {
        let mut conn = self.command_conn()?;
        let interest_ttl = self.opts.interest.as_ref().map_or(1, |i| ms(i.ttl));
        let mut users = users.chunks(CHUNK);
        let mut topics = topics.chunks(CHUNK);
        loop {
            let (u, t) = (
                users.next().unwrap_or_default(),
                topics.next().unwrap_or_default(),
            );
            let mut inv = self.scripts.sync.prepare_invoke();
            inv.arg(&self.opts.prefix)
                .arg(&self.opts.node_id)
                .arg(ms(self.opts.presence_ttl))
                .arg(interest_ttl)
                .arg(u8::from(leaving))
                .arg(u.len());
            for (user, n) in u {
                inv.arg(&**user).arg(*n);
            }
            for (topic, n) in t {
                let key = self.opts.interest.as_ref().and_then(|i| i.key_for(topic));
                inv.arg(topic.as_str()).arg(*n).arg(key.unwrap_or_default());
            }
            inv.invoke_async::<Value>(&mut conn).await?;
            if users.len() == 0 && topics.len() == 0 {
                return Ok(());
            }
        }
    }

    /// Best effort, on shutdown: this node's presence goes, its interest shares with it.
    /// Removes what an earlier process with this node id left (one killed and restarted
    /// within `presence_ttl` would otherwise keep its counts alive through this one's
    /// renewals), with the interest counters it fed; the batch that follows rewrites every
    /// local count.
    async fn forget_previous(&self) -> RedisResult<()> {
        let mut conn = self.command_conn()?;
        let left: Vec<String> = timed(
            redis::cmd("HKEYS")
                .arg(format!(
                    "{}:node:{}:topics",
                    self.opts.prefix, self.opts.node_id
                ))
                .query_async(&mut conn),
        )
        .await?;
        let topics: Vec<(Topic, u64)> = left
            .iter()
            .filter_map(|t| Topic::parse(t).ok())
            .map(|t| (t, 0))
            .collect();
        self.sync(&[], &topics, true).await
    }

    async fn leave(&self) {
        let topics = self.interest_topics(false);
        if let Err(e) = timed(self.sync(&[], &topics, true)).await {
            warn!(error = %e, "redis: could not remove this node's presence");
        }
    }

    /// A handle on the command connection.
    fn command_conn(&self) -> RedisResult<MultiplexedConnection> {
        self.conn.read().clone().ok_or_else(|| {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "not connected",
            ))
        })
    }

    fn topic_channel(&self, topic: &Topic) -> String {
        let mut s = String::with_capacity(self.topic_prefix.len() + topic.as_str().len());
        s.push_str(&self.topic_prefix);
        s.push_str(topic.as_str());
        s
    }

    fn key(&self, kind: &str, topic: &Topic) -> String {
        format!("{}:{kind}:{}", self.opts.prefix, topic.as_str())
    }

    /// The reader task of one connection: hands what arrives to the sink until it ends.
    async fn read(self: Arc<Self>, mut stream: PubSubStream) {
        while let Some(m) = stream.next().await {
            let Some(sink) = self.sink.get() else {
                continue;
            };
            let channel = m.get_channel_name();
            let payload = m.get_payload_bytes();
            if channel.starts_with(&self.topic_prefix) {
                match Message::from_json_frame(payload) {
                    Ok(msg) => sink.on_message(Arc::new(msg)),
                    Err(e) => warn!(%channel, error = %e, "redis: dropped a malformed message"),
                }
            } else if channel == self.control_channel {
                match wire::decode_control(payload) {
                    Ok(ev) => sink.on_control(ev),
                    Err(e) => warn!(%channel, error = %e, "redis: dropped a control event"),
                }
            } else if channel == self.node_channel {
                match wire::decode_node_event(Bytes::copy_from_slice(payload)) {
                    Ok(ev) => sink.on_node_event(ev),
                    Err(e) => warn!(%channel, error = %e, "redis: dropped a node event"),
                }
            }
        }
    }

    /// PUBLISH, returning the receiver count.
    /// Keeps a revocation in `P:revocations` until it ends (for nodes that start later) and
    /// publishes it, in one transaction.
    async fn publish_revocation(&self, payload: &[u8], until: u64) -> RedisResult<u64> {
        if !self.healthy() {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "reconnecting",
            )));
        }
        let mut conn = self.command_conn()?;
        let now = herald_core::message::now_secs();
        let (receivers,): (u64,) = timed(
            redis::pipe()
                .atomic()
                .zrembyscore(&self.revocations_key, "-inf", now)
                .ignore()
                .zadd(&self.revocations_key, payload, until)
                .ignore()
                .publish(&self.control_channel, payload)
                .query_async(&mut conn),
        )
        .await?;
        Ok(receivers)
    }

    async fn publish_raw(&self, channel: &str, payload: &[u8]) -> RedisResult<u64> {
        if !self.healthy() {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "reconnecting",
            )));
        }
        let mut conn = self.command_conn()?;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
    }
}

impl Interest for RedisCluster {
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
impl Bus for RedisCluster {
    fn attach(&self, sink: Arc<dyn BusSink>) {
        let _ = self.sink.set(sink);
    }

    async fn publish(&self, msg: Arc<Message>) -> Result<(), BusError> {
        // Local subscribers get it back through this node's own subscription.
        let channel = self.topic_channel(&msg.topic);
        if let Err(e) = self.publish_raw(&channel, msg.json_frame()).await {
            warn!(topic = %msg.topic, error = %e, "redis: publish failed; delivering locally only");
            if let Some(sink) = self.sink.get() {
                sink.on_message(msg);
            }
        }
        Ok(())
    }

    async fn control(&self, event: ControlEvent) -> Result<(), BusError> {
        let payload = wire::encode_control(&event);
        let sent = match &event {
            ControlEvent::Revoke {
                until: Some(until), ..
            } => self.publish_revocation(&payload, *until).await,
            _ => self.publish_raw(&self.control_channel, &payload).await,
        };
        match sent {
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(error = %e, "redis: control event applied locally only");
                if let Some(sink) = self.sink.get() {
                    sink.on_control(event);
                }
                Err(unavailable(e))
            }
        }
    }

    async fn send_to_node(&self, node: &str, event: NodeEvent) -> Result<(), BusError> {
        if node == self.opts.node_id {
            let sink = self
                .sink
                .get()
                .ok_or_else(|| BusError::Unavailable("bus not attached".into()))?;
            sink.on_node_event(event);
            return Ok(());
        }
        let channel = format!("{}:node:{node}", self.opts.prefix);
        match self
            .publish_raw(&channel, &wire::encode_node_event(&event))
            .await
        {
            Ok(0) => Err(BusError::UnknownNode(node.to_owned())),
            Ok(_) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn revocations(&self) -> Result<Vec<ControlEvent>, BusError> {
        let mut conn = self.command_conn().map_err(unavailable)?;
        let now = herald_core::message::now_secs();
        let kept: Vec<Vec<u8>> = timed(
            redis::cmd("ZRANGEBYSCORE")
                .arg(&self.revocations_key)
                .arg(format!("({now}"))
                .arg("+inf")
                .query_async(&mut conn),
        )
        .await
        .map_err(unavailable)?;
        Ok(kept
            .iter()
            .filter_map(|p| match wire::decode_control(p) {
                Ok(e) => Some(e),
                Err(e) => {
                    warn!(error = %e, "redis: skipping a stored revocation");
                    None
                }
            })
            .collect())
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    async fn watching(&self, topic: &Topic) -> Result<(), BusError> {
        if !self.healthy() {
            // Local traffic still flows; the topic is subscribed on reconnect.
            return Ok(());
        }
        self.changes
            .wait_subscribed(topic, Duration::from_secs(5))
            .await
    }
}

#[async_trait]
impl Presence for RedisCluster {
    async fn user_connections(&self, user: &str) -> Result<u64, BusError> {
        let local = self.hub.user_connection_count(user) as u64;
        let mut conn = self.command_conn().map_err(unavailable)?;
        let others: u64 = self
            .scripts
            .count
            .arg(&self.opts.prefix)
            .arg(&self.opts.node_id)
            .arg("users")
            .arg(user)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(local + others)
    }

    async fn online(&self) -> Result<Vec<(String, u64)>, BusError> {
        let mut conn = self.command_conn().map_err(unavailable)?;
        // Flat: user, count, user, count…
        let others: Vec<String> = self
            .scripts
            .online
            .arg(&self.opts.prefix)
            .arg(&self.opts.node_id)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut all: HashMap<String, u64> = HashMap::new();
        for (u, n) in self.hub.online_users() {
            *all.entry(u.to_string()).or_default() += n as u64;
        }
        for pair in others.chunks_exact(2) {
            *all.entry(pair[0].clone()).or_default() += pair[1].parse::<u64>().unwrap_or(0);
        }
        Ok(all.into_iter().filter(|(_, n)| *n > 0).collect())
    }

    async fn topic_subscribers(&self, topic: &Topic) -> Result<u64, BusError> {
        let local = self.hub.subscriber_count(topic.as_str()) as u64;
        let mut conn = self.command_conn().map_err(unavailable)?;
        let others: u64 = self
            .scripts
            .count
            .arg(&self.opts.prefix)
            .arg(&self.opts.node_id)
            .arg("topics")
            .arg(topic.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(local + others)
    }
}

/// A history entry as stored: `<ms>:<frame>`.
fn entry_frame(entry: &[u8]) -> &[u8] {
    match entry.iter().position(|b| *b == b':') {
        Some(i) => &entry[i + 1..],
        None => entry,
    }
}

#[async_trait]
impl History for RedisCluster {
    async fn append(
        &self,
        msg: Message,
        opts: HistoryOptions,
    ) -> Result<Arc<Message>, HistoryError> {
        // The seq is spliced in front: the frame must not carry one already.
        let msg = if msg.seq.is_some() {
            let mut b = MessageBuilder::new(msg.topic, msg.event.into_string(), msg.data);
            b.id = Some(msg.id.into_string());
            b.ts = Some(msg.ts);
            b.from = msg.from.map(String::from);
            b.trace_id = msg.trace_id.map(String::from);
            b.durable = msg.durable;
            b.build()
        } else {
            msg
        };
        let frame = msg.json_frame();
        if frame.first() != Some(&b'{') {
            return Err(HistoryError::Unavailable(
                "message frame is not an object".into(),
            ));
        }
        let mut conn = self.command_conn().map_err(history_unavailable)?;
        let seq: u64 = self
            .scripts
            .append
            .key(self.key("hs", &msg.topic))
            .key(self.key("h", &msg.topic))
            .arg(&frame[..])
            .arg(opts.size)
            .arg(ms(opts.ttl))
            .arg(self.topic_channel(&msg.topic))
            .invoke_async(&mut conn)
            .await
            .map_err(history_unavailable)?;
        let mut spliced = Vec::with_capacity(frame.len() + 28);
        spliced.extend_from_slice(b"{\"seq\":");
        spliced.extend_from_slice(seq.to_string().as_bytes());
        spliced.push(b',');
        spliced.extend_from_slice(&frame[1..]);
        let out = Message::from_json_frame(&spliced).map_err(history_unavailable)?;
        let out = Arc::new(out);
        if !self.healthy() {
            // Published, but this node's own subscription is down: its subscribers get it here.
            if let Some(sink) = self.sink.get() {
                sink.on_message(out.clone());
            }
        }
        Ok(out)
    }

    fn publishes_on_append(&self) -> bool {
        true
    }

    async fn since(&self, topic: &Topic, since: u64) -> Result<Recovery, HistoryError> {
        let mut conn = self.command_conn().map_err(history_unavailable)?;
        let reply: Vec<Value> = self
            .scripts
            .since
            .key(self.key("hs", topic))
            .key(self.key("h", topic))
            .arg(since)
            .invoke_async(&mut conn)
            .await
            .map_err(history_unavailable)?;
        let mut it = reply.into_iter();
        let (Some(Value::Int(latest)), Some(Value::Int(gap))) = (it.next(), it.next()) else {
            return Err(HistoryError::Unavailable(
                "redis: unexpected reply to since".into(),
            ));
        };
        let latest = latest.max(0) as u64;
        if gap != 0 {
            return Ok(Recovery::Gap { latest });
        }
        let mut messages = Vec::with_capacity(it.len());
        for v in it {
            let Value::BulkString(entry) = v else {
                return Err(HistoryError::Unavailable(
                    "redis: unexpected history entry".into(),
                ));
            };
            match Message::from_json_frame(entry_frame(&entry)) {
                Ok(m) => messages.push(Arc::new(m)),
                Err(e) => warn!(%topic, error = %e, "redis: skipped a malformed history entry"),
            }
        }
        Ok(Recovery::Complete { messages, latest })
    }

    async fn latest(&self, topic: &Topic) -> Result<u64, HistoryError> {
        let mut conn = self.command_conn().map_err(history_unavailable)?;
        let seq: Option<u64> = redis::cmd("HGET")
            .arg(self.key("hs", topic))
            .arg("seq")
            .query_async(&mut conn)
            .await
            .map_err(history_unavailable)?;
        Ok(seq.unwrap_or(0))
    }

    async fn retain(&self, msg: Arc<Message>) -> Result<(), HistoryError> {
        let mut conn = self.command_conn().map_err(history_unavailable)?;
        redis::cmd("SET")
            .arg(self.key("r", &msg.topic))
            .arg(&msg.json_frame()[..])
            .query_async::<()>(&mut conn)
            .await
            .map_err(history_unavailable)
    }

    async fn retained(&self, topic: &Topic) -> Result<Option<Arc<Message>>, HistoryError> {
        let mut conn = self.command_conn().map_err(history_unavailable)?;
        let frame: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key("r", topic))
            .query_async(&mut conn)
            .await
            .map_err(history_unavailable)?;
        match frame {
            None => Ok(None),
            Some(f) => match Message::from_json_frame(&f) {
                Ok(m) => Ok(Some(Arc::new(m))),
                Err(e) => {
                    warn!(%topic, error = %e, "redis: malformed retained value ignored");
                    Ok(None)
                }
            },
        }
    }
}
