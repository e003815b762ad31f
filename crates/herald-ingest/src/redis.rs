//! The Redis source (`[ingest.redis]`): seed 002's and seed 001's pub/sub channels, mapped to
//! publish requests by [`crate::map::redis_channel`] (the mapping table is in [`crate::map`]).
//!
//! # What it subscribes
//!
//! | setting | subscriptions |
//! | --- | --- |
//! | `seed002 = true` (default) | `SUBSCRIBE websocket:broadcast`, `PSUBSCRIBE websocket:user:*`, `websocket:room:*`, `websocket:notification:*` (the four channel families of seed 002, nothing else under `websocket:`) |
//! | `seed001 = true` (default) | `PSUBSCRIBE ws:device:*` |
//!
//! Each message is submitted with source `redis`, one at a time, in the order Redis delivers
//! them. A message whose channel maps to nothing is ignored (debug log); one that maps to an
//! error (bad id, malformed payload) is logged and counted `rejected`, and the source goes on.
//!
//! # One delivery per message in a cluster
//!
//! Redis pub/sub gives every subscriber every message, so every node of a cluster receives
//! each one; if each node published it, subscribers would get it once per node.
//!
//! - **Durable** (`websocket:notification:*`): every node submits it with the same id (the
//!   publisher's `id`, or the deterministic [`crate::map::redis_message_id`]); the store's
//!   unique id lets exactly one node store and deliver it, the others are answered
//!   `duplicate` (counted so). A node that dies while handling it loses nothing: the
//!   other nodes store it.
//! - **Ephemeral** (everything else): the nodes elect one of them per message with
//!   `SET <election_prefix><hash>:<n> 1 NX PX 60000` (default prefix `herald:ingest:`),
//!   where `<hash>` is [`crate::map::redis_message_hash`] of the channel and payload (32 hex
//!   digits) and `<n>` counts the byte-identical messages this node has seen within the last
//!   60 s (1 for the first). The node whose `SET` succeeds submits; the others skip it.
//!   Because every node sees the same messages in the same order, the `n`-th repeat of an
//!   identical payload (seed 002's `data_update` broadcast without a timestamp, say) gets the
//!   same key on every node and is delivered once, not swallowed as a copy of the first.
//!   Keys expire after 60 s; a node keeps one counter (about 64 bytes) per distinct message
//!   of the last 60 s.
//!
//! Limits of the election, all about messages a node did not see: a node that (re)subscribes
//! while byte-identical messages keep repeating on a channel counts from 1 again and may
//! deliver one of them a second time; a repeat that only a node which missed the earlier
//! ones receives (every other node disconnected at that moment) can be skipped. When the
//! `SET` itself fails (a Redis error on a live connection), the node submits anyway: a
//! possible duplicate rather than a loss. Ordering: one node submits in channel order, but
//! consecutive messages of a channel may be won by different nodes, so in a cluster their
//! order across nodes is not guaranteed (publish over HTTP, AMQP or NATS with a `partition`
//! key when order matters).
//!
//! Two deployments taking the same channels from one Redis database must use different
//! `election_prefix`es (keys are per database, pub/sub is not).
//!
//! # Outages
//!
//! Redis pub/sub keeps nothing: what is published while a node is disconnected is lost to
//! it, and a node that falls far behind is disconnected by Redis (`client-output-buffer-limit
//! pubsub`, 32 MB by default) and loses what was buffered. The source pings every 5 s; on a lost connection it reports unhealthy
//! ([`RedisIngest::healthy`]), reconnects with backoff (100 ms doubling to 5 s) and
//! subscribes again. When the gateway cannot take a message (store or bus down,
//! [`Rejected::Unavailable`]) the node that holds it retries after 100 ms, 500 ms and 2 s
//! (counted `retried`), then drops it (logged, counted `unavailable`): nothing upstream would
//! redeliver it.
//!
//! # Metrics
//!
//! `herald_ingest_messages_total{source="redis", outcome}`: `accepted`, `duplicate`
//! (durable message another node stored first, or already stored), `rejected` (maps to an
//! error, or refused by the gateway), `retried`, `unavailable` (dropped after the retries).
//! Redis gives neither a message timestamp nor a backlog: no lag or backlog gauge.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Client, Msg, RedisError, RedisResult};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::RedisSource;
use crate::{Rejected, Submit, map};

/// The `source` of every submit and metric.
const SOURCE: &str = "redis";
/// Connecting, and any single command or subscription, gives up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const PING_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long an election key lives, and how long identical messages are counted together.
const ELECTION_WINDOW: Duration = Duration::from_secs(60);
/// Waits before each new attempt when the gateway answers `Unavailable`.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("ingest.redis.url {url}: {message}")]
    Url { url: String, message: String },
    #[error("ingest.redis: cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("ingest.redis: seed002 and seed001 are both off: nothing to subscribe")]
    NothingToSubscribe,
}

/// The running source: [`RedisIngest::start`] connects and spawns its task, which ends with
/// the shutdown token.
pub struct RedisIngest {
    cfg: RedisSource,
    client: Client,
    submit: Arc<dyn Submit>,
    healthy: AtomicBool,
}

/// One connection pair: the pub/sub connection and one for the election commands.
struct Session {
    sink: PubSubSink,
    stream: PubSubStream,
    conn: MultiplexedConnection,
}

impl RedisIngest {
    /// Connects and subscribes (failing fast when Redis is unreachable), then consumes until
    /// `shutdown`.
    pub async fn start(
        cfg: RedisSource,
        submit: Arc<dyn Submit>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        if !cfg.seed002 && !cfg.seed001 {
            return Err(StartError::NothingToSubscribe);
        }
        let client = Client::open(cfg.url.as_str()).map_err(|e| StartError::Url {
            url: herald_core::redact::url_password(&cfg.url),
            message: e.to_string(),
        })?;
        let this = Arc::new(Self {
            cfg,
            client,
            submit,
            healthy: AtomicBool::new(false),
        });
        let session = this.open().await.map_err(|e| StartError::Connect {
            url: herald_core::redact::url_password(&this.cfg.url),
            message: e.to_string(),
        })?;
        info!(
            url = %herald_core::redact::url_password(&this.cfg.url),
            seed002 = this.cfg.seed002,
            seed001 = this.cfg.seed001,
            "redis ingest subscribed"
        );
        tokio::spawn(this.clone().run(session, shutdown));
        Ok(this)
    }

    /// Connected and subscribed (false while reconnecting and after shutdown).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// A new connection pair with every subscription confirmed by Redis; reports healthy.
    async fn open(&self) -> RedisResult<Session> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(IO_TIMEOUT))
            .set_response_timeout(Some(IO_TIMEOUT));
        let conn = timed(
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await?;
        let (mut sink, stream) = timed(self.client.get_async_pubsub()).await?.split();
        if self.cfg.seed002 {
            timed(sink.subscribe("websocket:broadcast")).await?;
            timed(sink.psubscribe(&[
                "websocket:user:*",
                "websocket:room:*",
                "websocket:notification:*",
            ]))
            .await?;
        }
        if self.cfg.seed001 {
            timed(sink.psubscribe("ws:device:*")).await?;
        }
        self.healthy.store(true, Ordering::Release);
        Ok(Session { sink, stream, conn })
    }

    /// The source's task: consume, and reconnect after an outage, until `shutdown`.
    async fn run(self: Arc<Self>, mut session: Session, shutdown: CancellationToken) {
        let mut elector = Elector::default();
        loop {
            self.serve(&mut session, &mut elector, &shutdown).await;
            self.healthy.store(false, Ordering::Release);
            if shutdown.is_cancelled() {
                return;
            }
            warn!(
                "redis ingest: connection lost; reconnecting (messages published meanwhile are lost to this node)"
            );
            let mut backoff = BACKOFF_MIN;
            session = loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                match self.open().await {
                    Ok(s) => break s,
                    Err(e) => {
                        debug!(error = %e, "redis ingest: reconnect failed");
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            };
            info!("redis ingest: connection back, subscribed again");
        }
    }

    /// Handles messages until the connection is lost (the stream ends or a ping fails) or
    /// `shutdown`. One message at a time: the order of a channel is kept on this node.
    async fn serve(
        &self,
        session: &mut Session,
        elector: &mut Elector,
        shutdown: &CancellationToken,
    ) {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                m = session.stream.next() => match m {
                    Some(m) => self.handle(&m, &mut session.conn, elector, shutdown).await,
                    None => return,
                },
                _ = ping.tick() => {
                    elector.prune(Instant::now());
                    if let Err(e) = timed(session.sink.ping::<String>()).await {
                        warn!(error = %e, "redis ingest: ping failed");
                        return;
                    }
                }
            }
        }
    }

    async fn handle(
        &self,
        msg: &Msg,
        conn: &mut MultiplexedConnection,
        elector: &mut Elector,
        shutdown: &CancellationToken,
    ) {
        let channel = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        let body = match map::redis_channel(channel, payload, self.cfg.seed002, self.cfg.seed001) {
            None => {
                debug!(%channel, "redis ingest: not a channel Herald maps; ignored");
                return;
            }
            Some(Err(e)) => {
                warn!(%channel, error = %e, "redis ingest: dropped a message");
                count("rejected");
                return;
            }
            Some(Ok(body)) => body,
        };
        if !map::redis_channel_durable(channel) {
            let hash = map::redis_message_hash(channel, payload);
            let key = elector.key(&self.cfg.election_prefix, hash, Instant::now());
            let won = timed(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ELECTION_WINDOW.as_millis() as u64)
                    .query_async::<Option<String>>(conn),
            )
            .await;
            match won {
                Ok(Some(_)) => {}
                Ok(None) => {
                    debug!(%channel, %key, "redis ingest: another node takes this message");
                    return;
                }
                Err(e) => warn!(
                    %channel, error = %e,
                    "redis ingest: election failed; submitting anyway (another node may too)"
                ),
            }
        }
        self.submit(channel, &body, shutdown).await;
    }

    /// Submits, retrying while the gateway is unavailable (see the module doc).
    async fn submit(&self, channel: &str, body: &[u8], shutdown: &CancellationToken) {
        let mut delays = RETRY_DELAYS.iter();
        loop {
            match self.submit.submit(SOURCE, body).await {
                Ok(s) => {
                    count(if s.duplicate { "duplicate" } else { "accepted" });
                    return;
                }
                Err(Rejected::Invalid(e)) => {
                    warn!(%channel, error = %e, "redis ingest: the gateway refused a message");
                    count("rejected");
                    return;
                }
                Err(Rejected::Unavailable(e)) => {
                    let Some(delay) = delays.next() else {
                        error!(%channel, error = %e, "redis ingest: dropped a message: the gateway stayed unavailable");
                        count("unavailable");
                        return;
                    };
                    count("retried");
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            error!(%channel, error = %e, "redis ingest: dropped a message at shutdown: the gateway is unavailable");
                            count("unavailable");
                            return;
                        }
                        () = tokio::time::sleep(*delay) => {}
                    }
                }
            }
        }
    }
}

/// Counts byte-identical ephemeral messages, so the `n`-th repeat gets the same election key
/// on every node. Owned by the source's task.
#[derive(Default)]
struct Elector {
    seen: HashMap<u128, (u32, Instant)>,
}

impl Elector {
    fn key(&mut self, prefix: &str, hash: u128, now: Instant) -> String {
        let (n, last) = self.seen.entry(hash).or_insert((0, now));
        if now.duration_since(*last) >= ELECTION_WINDOW {
            *n = 0;
        }
        *n = n.saturating_add(1);
        *last = now;
        format!("{prefix}{hash:032x}:{n}")
    }

    fn prune(&mut self, now: Instant) {
        self.seen
            .retain(|_, (_, last)| now.duration_since(*last) < ELECTION_WINDOW);
    }
}

fn count(outcome: &'static str) {
    metrics::counter!("herald_ingest_messages_total", "source" => SOURCE, "outcome" => outcome)
        .increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_messages_are_numbered_within_the_window() {
        let mut e = Elector::default();
        let t0 = Instant::now();
        assert_eq!(e.key("p:", 1, t0), format!("p:{:032x}:1", 1));
        assert_eq!(
            e.key("p:", 1, t0 + Duration::from_secs(1)),
            format!("p:{:032x}:2", 1)
        );
        assert_eq!(
            e.key("p:", 2, t0 + Duration::from_secs(1)),
            format!("p:{:032x}:1", 2)
        );
        // 59 s after the previous one: still counted; 60 s of silence: back to 1.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(e.key("p:", 1, t1), format!("p:{:032x}:3", 1));
        assert_eq!(
            e.key("p:", 1, t1 + ELECTION_WINDOW),
            format!("p:{:032x}:1", 1)
        );
        e.prune(t1 + ELECTION_WINDOW + Duration::from_secs(1));
        assert_eq!(e.seen.len(), 1);
        e.prune(t1 + 2 * ELECTION_WINDOW);
        assert!(e.seen.is_empty());
    }
}
