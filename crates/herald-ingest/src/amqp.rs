//! RabbitMQ: ingestion from queues ([`AmqpIngest`]) and `amqp:<queue>` command targets
//! ([`AmqpUpstream`]).
//!
//! # Ingestion (`[ingest.amqp]`)
//!
//! ```toml
//! [ingest.amqp]
//! url = "amqp://herald:secret@rabbit:5672/%2f?heartbeat=10"   # %2f = the default vhost
//! prefetch = 64                                # unacknowledged deliveries per queue (1..)
//! dead_letter_exchange = "herald.dead-letter"  # the default
//!
//! [[ingest.amqp.queues]]
//! name = "herald.publish"           # declared durable
//!
//! [[ingest.amqp.queues]]
//! name = "herald.orders"
//! exchange = "orders"               # declared durable, of exchange_type, and the queue bound to it
//! exchange_type = "topic"           # direct | fanout | topic (default) | headers
//! routing_keys = ["order.*.shipped"] # default: the queue name
//! ```
//!
//! **What Herald declares** (at start and after every reconnection; declaring what exists with
//! the same settings is a no-op, with *other* settings RabbitMQ refuses it: `PRECONDITION_FAILED`
//! names the queue, and Herald does not start):
//! - the dead-letter exchange `<dead_letter_exchange>` (fanout, durable) and the queue
//!   `<dead_letter_exchange>.queue` (durable) bound to it: every rejected message ends there,
//!   with RabbitMQ's `x-death` header saying from which queue and why (`rejected`);
//! - each queue, durable, with `x-dead-letter-exchange = <dead_letter_exchange>`;
//! - each `exchange` (durable; an `amq.*` exchange is the broker's own and only bound to), and
//!   a binding per routing key.
//!
//! **Messages.** The body is a publish request — the JSON of `POST /api/v1/publish`
//! (`{"topic":"room/lobby","event":"chat","data":{…}}`) — or a user message
//! (`{"user":"42","event":"notification","data":{…}}`, durable unless `"durable":false`); see
//! [`crate::map::normalize_body`]. When the body has no `id` but the AMQP `message_id` property
//! is set, it becomes the message `id`: give every durable message an id one way or the other,
//! it is what makes a redelivery harmless (see below). The AMQP `timestamp` property (seconds),
//! when set, feeds the lag gauge.
//!
//! **What happens to each delivery** (one at a time per queue, so a queue's messages are
//! published in queue order; `prefetch` bounds how many are delivered to Herald and not yet
//! acknowledged):
//! - published (stored first when durable, handed to the bus otherwise) → **acknowledged**.
//!   Never before: a gateway that stops between receiving and storing leaves the message
//!   unacknowledged, RabbitMQ redelivers it, and its id makes the copy a `duplicate` (counted,
//!   acknowledged, not delivered again);
//! - not JSON, not a publish request or user message, or refused by the publish path (topic
//!   rules, size…) → **rejected without requeue**: RabbitMQ moves it to the dead-letter queue,
//!   a warning is logged with the reason, it is counted `rejected`, and the next message flows;
//! - the store or the bus is down → kept for a back-off (1 s, doubled after each consecutive
//!   failure on the queue, at most 30 s), then **requeued** (`nack`) and counted `retried`.
//!
//! **Connection loss / broker restart.** Herald reconnects with a back-off (100 ms doubling to
//! 5 s), declares everything again and resumes consuming. The delivery being processed when the
//! connection dropped finishes first (a publish is never cut in half); its acknowledgement then
//! fails, and RabbitMQ redelivers it with everything else that was unacknowledged. Publishers
//! should send durable messages as persistent (`delivery_mode = 2`) so they survive a broker
//! restart too. [`AmqpStatus::healthy`] is false while disconnected (readiness). A dead peer
//! is noticed by TCP or by AMQP heartbeats: add `?heartbeat=<seconds>` to the URL to shorten
//! the broker's default (60 s).
//!
//! **Shutdown** (the server's shutdown token): no new delivery is taken, the one in progress
//! finishes and is settled, the connection is closed and RabbitMQ requeues what was
//! prefetched; [`AmqpIngestHandle::join`] returns then. Herald never consumes the dead-letter
//! queue: look at it, or move messages back with a shovel once fixed.
//!
//! **Metrics** (`source` = `amqp:<queue>`):
//! - `herald_ingest_messages_total{source,outcome="accepted|duplicate|rejected|retried"}`;
//! - `herald_ingest_lag_seconds{source}`: now − the message's `timestamp`, when it has one;
//! - `herald_ingest_backlog{source}`: messages ready in the queue (passive declare every 5 s).
//!
//! # Commands (`target = "amqp:<queue>"`)
//!
//! [`AmqpUpstream`] publishes each command to the default exchange with routing key `<queue>`
//! (the service declares and consumes that queue) and these properties:
//! - `reply_to`: this node's reply queue `herald.replies.<node_id>.<random>` (exclusive,
//!   deleted with the connection; a new one after a reconnection);
//! - `correlation_id`: unique per command;
//! - `expiration`: the command's timeout in milliseconds (RabbitMQ drops a command nobody took
//!   in time: the client already got its 504);
//! - `content_type = application/json`, header `trace_id`.
//!
//! The body is the envelope `{command, trace_id, user:{id, …claims}, conn_id, node_id, data}`.
//! The service answers by publishing `{"code":0,"message":"ok","data":{…}}` (all optional;
//! `code` 0 is success) to the default exchange with routing key = the `reply_to` value and
//! the same `correlation_id`. Errors: no queue of that name → 503 at once (the command is
//! published `mandatory`); no reply in time → 504; broker down → 503; a reply that is not such
//! a JSON object → 502. A reply after the timeout is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ConnectionStatus,
    Consumer, Event, ExchangeKind,
};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::command::{Reply, Target, Upstream, UpstreamError};
use crate::config::AmqpSource;
use crate::{Rejected, Submit, map};

/// First delay before reconnecting; doubled after each failed attempt.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// First delay before requeueing a message the publish path could not take (store or bus
/// down); doubled after each consecutive failure on the queue.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the queue depths are read (passive declare).
pub const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// Connecting (TCP, TLS, AMQP handshake) gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting plus declaring everything gives up after this.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// An ack, nack or reject that makes no progress for this long means a broken connection.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A clean close waits no longer than this for the broker.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection's state is checked besides its error events.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// What can stop the AMQP source or upstream from starting.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The configuration cannot work (the message names the key).
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot connect to RabbitMQ at {url}: no answer within {after:?}")]
    ConnectTimeout { url: String, after: Duration },
    /// A declaration, binding or consume the broker refused (e.g. `PRECONDITION_FAILED`: the
    /// queue exists with other arguments).
    #[error("RabbitMQ refused to {what}: {source}")]
    Broker {
        what: String,
        #[source]
        source: lapin::Error,
    },
}

fn exchange_kind(s: &str) -> Result<ExchangeKind, String> {
    Ok(match s {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        other => {
            return Err(format!(
                "ingest.amqp.queues.exchange_type: {other:?} is not direct, fanout, topic or headers"
            ));
        }
    })
}

fn short(what: &str, s: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s)
        .map_err(|_| AmqpError::Config(format!("{what} {s:?} is longer than 255 bytes")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn connect(url: &str, name: String) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(AmqpError::Connect {
            url: herald_core::redact::url_password(url),
            source,
        }),
        Err(_) => Err(AmqpError::ConnectTimeout {
            url: herald_core::redact::url_password(url),
            after: CONNECT_TIMEOUT,
        }),
    }
}

fn broker(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> AmqpError {
    let what = what.into();
    move |source| AmqpError::Broker { what, source }
}

/// Watches a connection: the returned token is cancelled when it fails (error event, or its
/// state is no longer connected), and the task returns why. Everything that waits on the
/// broker also waits on this token: lapin does not always fail what is under way when the
/// socket dies (an ack sent at that moment can wait for ever). Cancelling the token ends the
/// task.
fn watch(conn: &Connection) -> (CancellationToken, tokio::task::JoinHandle<String>) {
    let dead = CancellationToken::new();
    let mut events = Box::pin(conn.events_listener());
    let status = conn.status().clone();
    let token = dead.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        let why = loop {
            tokio::select! {
                _ = token.cancelled() => return "closed".to_owned(),
                event = events.next() => match event {
                    Some(Event::Error(e)) => break e.to_string(),
                    None => break "the connection ended".to_owned(),
                    Some(_) => {}
                },
                _ = tick.tick() => if !status.connected() {
                    break "the connection is not open any more".to_owned();
                },
            }
        };
        token.cancel();
        why
    });
    (dead, task)
}

/// Closes a connection that is still open, without waiting for a broker that does not answer.
async fn close(conn: &Connection, text: &str) {
    if conn.status().connected() {
        match tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, text.into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "closing the RabbitMQ connection"),
            Err(_) => debug!("closing the RabbitMQ connection: no answer"),
        }
    }
}

fn stalled(url: &str) -> AmqpError {
    AmqpError::ConnectTimeout {
        url: herald_core::redact::url_password(url),
        after: OPEN_TIMEOUT,
    }
}

// ---------------------------------------------------------------------------------------------
// Ingestion
// ---------------------------------------------------------------------------------------------

/// Counts since start (the same events as the metrics, for tests and status pages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmqpStats {
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: u64,
    pub retried: u64,
    /// Successful reconnections after a lost connection.
    pub reconnects: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    duplicate: AtomicU64,
    rejected: AtomicU64,
    retried: AtomicU64,
    reconnects: AtomicU64,
}

/// State shared by the supervisor, the queue workers and [`AmqpStatus`].
struct Shared {
    cfg: AmqpSource,
    submit: Arc<dyn Submit>,
    shutdown: CancellationToken,
    /// The current connection's status; `None` between connections. Short critical sections,
    /// no `.await` inside.
    connection: Mutex<Option<ConnectionStatus>>,
    /// Last queue depth read per queue (short critical sections).
    backlog: Mutex<BTreeMap<String, u64>>,
    counters: Counters,
}

/// The RabbitMQ source: started by [`AmqpIngest::start`].
pub struct AmqpIngest;

/// A running RabbitMQ source.
pub struct AmqpIngestHandle {
    status: AmqpStatus,
    task: tokio::task::JoinHandle<()>,
}

/// Health and figures of a running RabbitMQ source (cheap to clone).
#[derive(Clone)]
pub struct AmqpStatus(Arc<Shared>);

impl AmqpIngest {
    /// Connects, declares the topology and starts consuming every configured queue. Fails if
    /// the configuration is wrong, the broker cannot be reached or refuses a declaration;
    /// later connection losses are retried for ever (until `shutdown`).
    pub async fn start(
        cfg: AmqpSource,
        submit: Arc<dyn Submit>,
        shutdown: CancellationToken,
    ) -> Result<AmqpIngestHandle, AmqpError> {
        cfg.check().map_err(AmqpError::Config)?;
        let shared = Arc::new(Shared {
            cfg,
            submit,
            shutdown,
            connection: Mutex::new(None),
            backlog: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
        });
        let session = Session::open(&shared).await?;
        info!(
            url = %herald_core::redact::url_password(&shared.cfg.url),
            queues = ?shared.cfg.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
            "RabbitMQ ingestion started"
        );
        let task = tokio::spawn(supervise(shared.clone(), session));
        Ok(AmqpIngestHandle {
            status: AmqpStatus(shared),
            task,
        })
    }
}

impl AmqpIngestHandle {
    pub fn status(&self) -> AmqpStatus {
        self.status.clone()
    }

    /// Connected and consuming (readiness).
    pub fn healthy(&self) -> bool {
        self.status.healthy()
    }

    pub fn stats(&self) -> AmqpStats {
        self.status.stats()
    }

    /// Waits until the source stopped after `shutdown` was cancelled: deliveries in progress
    /// finished (acknowledged or requeued) and the connection closed.
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            warn!(error = %e, "the RabbitMQ ingestion task failed");
        }
    }
}

impl AmqpStatus {
    /// Connected and consuming (readiness).
    pub fn healthy(&self) -> bool {
        lock(&self.0.connection)
            .as_ref()
            .is_some_and(|s| s.connected())
    }

    pub fn stats(&self) -> AmqpStats {
        let c = &self.0.counters;
        AmqpStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            duplicate: c.duplicate.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Messages ready in `queue` at the last poll (every [`BACKLOG_EVERY`]).
    pub fn backlog(&self, queue: &str) -> Option<u64> {
        lock(&self.0.backlog).get(queue).copied()
    }
}

/// Keeps a session running; after a connection loss, reconnects with a back-off until it
/// works or `shutdown` is cancelled.
async fn supervise(shared: Arc<Shared>, mut session: Session) {
    loop {
        let lost = session.run(&shared).await;
        *lock(&shared.connection) = None;
        let Some(why) = lost else {
            info!("RabbitMQ ingestion stopped");
            return;
        };
        warn!(reason = %why, "RabbitMQ ingestion: connection lost, reconnecting");
        let mut delay = RECONNECT_MIN;
        session = loop {
            let opened = tokio::select! {
                _ = shared.shutdown.cancelled() => {
                    info!("RabbitMQ ingestion stopped");
                    return;
                }
                opened = async {
                    tokio::time::sleep(delay).await;
                    Session::open(&shared).await
                } => opened,
            };
            match opened {
                Ok(s) => break s,
                Err(e) => {
                    delay = (delay * 2).min(RECONNECT_MAX);
                    warn!(error = %e, retry_in = ?delay, "RabbitMQ ingestion: reconnection failed");
                }
            }
        };
        shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        info!("RabbitMQ ingestion: reconnected, consuming again");
    }
}

/// One connection's worth of consuming: a task per queue (each on its own channel, with its
/// own prefetch) and the backlog poller.
struct Session {
    conn: Connection,
    workers: JoinSet<(String, End)>,
    poller: tokio::task::JoinHandle<()>,
    /// Tells the workers to stop after the delivery in progress.
    stop: CancellationToken,
    /// Cancelled when the connection fails ([`watch`]); `watcher` then says why.
    dead: CancellationToken,
    watcher: tokio::task::JoinHandle<String>,
}

/// Why a queue worker returned.
enum End {
    Stopped,
    Lost(String),
}

impl Session {
    async fn open(shared: &Arc<Shared>) -> Result<Session, AmqpError> {
        tokio::time::timeout(OPEN_TIMEOUT, Session::try_open(shared))
            .await
            .unwrap_or_else(|_| Err(stalled(&shared.cfg.url)))
    }

    async fn try_open(shared: &Arc<Shared>) -> Result<Session, AmqpError> {
        let cfg = &shared.cfg;
        let conn = connect(&cfg.url, "herald-ingest".into()).await?;
        let (dead, watcher) = watch(&conn);
        // Dropped on an error below: ends the watcher.
        let guard = dead.clone().drop_guard();
        let setup = conn
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        declare_topology(&setup, cfg).await?;

        // Every consumer first, then the tasks: a failure halfway leaves no task behind (the
        // dropped consumers and connection give their deliveries back to RabbitMQ).
        let mut consumers = Vec::new();
        let mut depths = Vec::new();
        for q in &cfg.queues {
            let name = short("queue", &q.name)?;
            let ch = conn
                .create_channel()
                .await
                .map_err(broker("open a channel"))?;
            ch.basic_qos(cfg.prefetch, BasicQosOptions { global: false })
                .await
                .map_err(broker(format!("set prefetch on queue {}", q.name)))?;
            let tag = format!("herald-ingest-{}", herald_core::message::new_id());
            let consumer = ch
                .basic_consume(
                    name.clone(),
                    short("consumer tag", &tag)?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(broker(format!("consume queue {}", q.name)))?;
            let source = format!("amqp:{}", q.name);
            depths.push((
                name,
                metrics::gauge!("herald_ingest_backlog", "source" => source.clone()),
            ));
            consumers.push((q.name.clone(), source, consumer));
        }
        let stop = CancellationToken::new();
        let mut workers = JoinSet::new();
        for (queue, source, consumer) in consumers {
            let worker = Worker::new(
                shared.clone(),
                queue.clone(),
                source,
                stop.clone(),
                dead.clone(),
            );
            workers.spawn(async move { (queue, worker.run(consumer).await) });
        }
        let poller = tokio::spawn(poll_backlog(shared.clone(), setup, depths));
        *lock(&shared.connection) = Some(conn.status().clone());
        guard.disarm();
        Ok(Session {
            conn,
            workers,
            poller,
            stop,
            dead,
            watcher,
        })
    }

    /// Runs until a worker loses its consumer (connection or channel lost, consumer cancelled
    /// by the broker) or `shutdown`; then stops the other workers, waits for the deliveries in
    /// progress and closes the connection (RabbitMQ requeues what is unacknowledged). Returns
    /// why it ended, `None` on shutdown.
    async fn run(mut self, shared: &Shared) -> Option<String> {
        let lost = tokio::select! {
            _ = shared.shutdown.cancelled() => None,
            why = &mut self.watcher => Some(why.unwrap_or_else(|e| e.to_string())),
            ended = self.workers.join_next() => Some(match ended {
                Some(Ok((queue, End::Lost(why)))) => format!("queue {queue}: {why}"),
                Some(Ok((queue, End::Stopped))) => format!("queue {queue}: worker stopped"),
                Some(Err(e)) => format!("a queue worker failed: {e}"),
                None => "no queue to consume".to_owned(),
            }),
        };
        debug!(reason = ?lost, "RabbitMQ ingestion session ending");
        // Healthy no more, even while the workers finish.
        *lock(&shared.connection) = None;
        self.stop.cancel();
        // A publish in progress is never cut short: what the publish path did decides what the
        // message became. If the connection is gone, its acknowledgement fails and RabbitMQ
        // redelivers it (a duplicate by its id).
        while let Some(ended) = self.workers.join_next().await {
            if let Ok((queue, End::Lost(why))) = ended {
                debug!(queue = %queue, reason = %why, "queue worker ended");
            }
        }
        self.poller.abort();
        close(&self.conn, "herald-ingest closing").await;
        self.dead.cancel();
        lost
    }
}

/// Declares the dead-letter exchange and queue, the configured exchanges and queues, and the
/// bindings.
async fn declare_topology(ch: &Channel, cfg: &AmqpSource) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let dlx = short("dead-letter exchange", &cfg.dead_letter_exchange)?;
    let dlq = short(
        "dead-letter queue",
        &format!("{}.queue", cfg.dead_letter_exchange),
    )?;
    ch.exchange_declare(
        dlx.clone(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await
    .map_err(broker(format!("declare the dead-letter exchange {dlx}")))?;
    ch.queue_declare(
        dlq.clone(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .map_err(broker(format!("declare the dead-letter queue {dlq}")))?;
    ch.queue_bind(
        dlq.clone(),
        dlx.clone(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(broker(format!("bind {dlq} to {dlx}")))?;

    for q in &cfg.queues {
        let name = short("queue", &q.name)?;
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(cfg.dead_letter_exchange.as_str().into()),
        );
        ch.queue_declare(name.clone(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(broker(format!(
                "declare queue {name} (durable, x-dead-letter-exchange = {dlx}; if it exists \
                 with other arguments, delete it or use another name)"
            )))?;
        let Some(exchange) = &q.exchange else {
            continue;
        };
        let ex = short("exchange", exchange)?;
        if !exchange.starts_with("amq.") {
            let kind = exchange_kind(&q.exchange_type).map_err(AmqpError::Config)?;
            ch.exchange_declare(ex.clone(), kind, durable, FieldTable::default())
                .await
                .map_err(broker(format!(
                    "declare exchange {ex} ({}, durable)",
                    q.exchange_type
                )))?;
        }
        let keys = if q.routing_keys.is_empty() {
            std::slice::from_ref(&q.name)
        } else {
            &q.routing_keys[..]
        };
        for key in keys {
            ch.queue_bind(
                name.clone(),
                ex.clone(),
                short("routing key", key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!("bind {name} to {ex} with key {key:?}")))?;
        }
    }
    Ok(())
}

/// Reads the depth of each queue every [`BACKLOG_EVERY`] (ends with the session, or when the
/// channel breaks: a deleted queue also cancels its consumer, which reopens the session).
async fn poll_backlog(
    shared: Arc<Shared>,
    ch: Channel,
    queues: Vec<(ShortString, metrics::Gauge)>,
) {
    let mut tick = tokio::time::interval(BACKLOG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (queue, gauge) in &queues {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match ch
                .queue_declare(queue.clone(), passive, FieldTable::default())
                .await
            {
                Ok(q) => {
                    let n = u64::from(q.message_count());
                    gauge.set(n as f64);
                    lock(&shared.backlog).insert(queue.to_string(), n);
                }
                Err(e) => {
                    debug!(queue = %queue, error = %e, "RabbitMQ backlog poll failed");
                    return;
                }
            }
        }
    }
}

/// Consumes one queue, one delivery at a time.
struct Worker {
    shared: Arc<Shared>,
    queue: String,
    source: String,
    /// Delay before requeueing after the last `Unavailable`; `None` after a success.
    retry_delay: Option<Duration>,
    stop: CancellationToken,
    /// The connection failed.
    dead: CancellationToken,
    accepted: metrics::Counter,
    duplicate: metrics::Counter,
    rejected: metrics::Counter,
    retried: metrics::Counter,
    lag: metrics::Gauge,
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        queue: String,
        source: String,
        stop: CancellationToken,
        dead: CancellationToken,
    ) -> Self {
        let count = |outcome: &'static str| metrics::counter!("herald_ingest_messages_total", "source" => source.clone(), "outcome" => outcome);
        Worker {
            accepted: count("accepted"),
            duplicate: count("duplicate"),
            rejected: count("rejected"),
            retried: count("retried"),
            lag: metrics::gauge!("herald_ingest_lag_seconds", "source" => source.clone()),
            shared,
            queue,
            source,
            retry_delay: None,
            stop,
            dead,
        }
    }

    async fn run(mut self, mut consumer: Consumer) -> End {
        loop {
            // Between deliveries, a stop wins; a delivery in progress always finishes.
            let next = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return End::Stopped,
                _ = self.dead.cancelled() => return End::Lost("the connection failed".into()),
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return End::Lost(e.to_string()),
                None => return End::Lost("the broker cancelled the consumer".into()),
            };
            if let Err(why) = self.process(delivery).await {
                return End::Lost(why);
            }
        }
        // Dropping the consumer cancels it and closes its channel: RabbitMQ requeues the
        // deliveries prefetched and not acknowledged.
    }

    /// Publishes one delivery and settles it with the broker. `Err`: the channel is gone.
    async fn process(&mut self, d: Delivery) -> Result<(), String> {
        if let Some(ts) = d.properties.timestamp() {
            self.lag.set((now_secs() - *ts as f64).max(0.0));
        }
        let message_id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned());
        let body = match map::normalize_body(&d.data) {
            Ok(body) => with_message_id(body, message_id.as_deref()),
            Err(why) => {
                warn!(queue = %self.queue, message_id = ?message_id, reason = %why,
                      "malformed message: dead-lettered");
                self.count(&self.rejected, &self.shared.counters.rejected);
                let reject = d.acker.reject(BasicRejectOptions { requeue: false });
                return self.settle("reject", reject).await;
            }
        };
        match self.shared.submit.submit(&self.source, &body).await {
            Ok(done) => {
                self.retry_delay = None;
                if done.duplicate {
                    debug!(queue = %self.queue, id = %done.id, redelivered = d.redelivered,
                           "duplicate message (already stored): acknowledged");
                    self.count(&self.duplicate, &self.shared.counters.duplicate);
                } else {
                    self.count(&self.accepted, &self.shared.counters.accepted);
                }
                self.settle("ack", d.acker.ack(BasicAckOptions::default()))
                    .await
            }
            Err(Rejected::Invalid(why)) => {
                self.retry_delay = None;
                warn!(queue = %self.queue, message_id = ?message_id, reason = %why,
                      "message refused by the publish path: dead-lettered");
                self.count(&self.rejected, &self.shared.counters.rejected);
                let reject = d.acker.reject(BasicRejectOptions { requeue: false });
                self.settle("reject", reject).await
            }
            Err(Rejected::Unavailable(why)) => {
                let delay = self
                    .retry_delay
                    .map_or(RETRY_MIN, |d| (d * 2).min(RETRY_MAX));
                self.retry_delay = Some(delay);
                warn!(queue = %self.queue, message_id = ?message_id, reason = %why,
                      requeue_in = ?delay, "cannot publish now: will requeue");
                self.count(&self.retried, &self.shared.counters.retried);
                // Holding the delivery (rather than requeueing at once) is what keeps a
                // store outage from turning into a redelivery loop.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stop.cancelled() => {}
                }
                let nack = d.acker.nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                });
                self.settle("requeue", nack).await
            }
        }
    }

    /// Waits for an ack, nack or reject to be sent, unless the connection fails first.
    async fn settle(
        &self,
        what: &str,
        sent: impl Future<Output = lapin::Result<bool>>,
    ) -> Result<(), String> {
        tokio::select! {
            biased;
            r = sent => match r {
                Ok(true) => Ok(()),
                // The acker was poisoned: its channel had already failed.
                Ok(false) => Err(format!("cannot {what} the delivery: the channel is closed")),
                Err(e) => Err(format!("cannot {what} the delivery: {e}")),
            },
            _ = self.dead.cancelled() => {
                Err(format!("cannot {what} the delivery: the connection failed"))
            }
            _ = tokio::time::sleep(SETTLE_TIMEOUT) => {
                Err(format!("cannot {what} the delivery: no progress in {SETTLE_TIMEOUT:?}"))
            }
        }
    }

    fn count(&self, metric: &metrics::Counter, counter: &AtomicU64) {
        metric.increment(1);
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The AMQP `message_id` as the message `id` when the body has none (the body is a JSON object:
/// [`map::normalize_body`] made sure).
fn with_message_id(body: Vec<u8>, message_id: Option<&str>) -> Vec<u8> {
    let Some(id) = message_id.filter(|id| !id.is_empty()) else {
        return body;
    };
    let Ok(mut m) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
    else {
        return body;
    };
    if m.contains_key("id") {
        return body;
    }
    m.insert("id".into(), id.into());
    serde_json::to_vec(&m).unwrap_or(body)
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

type Waiter = oneshot::Sender<Result<Reply, UpstreamError>>;

/// `amqp:<queue>` command targets, with this node's reply queue.
pub struct AmqpUpstream {
    url: String,
    node_id: String,
    shutdown: CancellationToken,
    /// What calls publish on; `None` while disconnected. Short critical sections.
    link: Mutex<Option<Link>>,
    /// Calls waiting for their reply, by correlation id. Short critical sections.
    pending: Mutex<HashMap<String, Waiter>>,
    next: AtomicU64,
    /// Makes correlation ids unique across restarts of the node.
    prefix: String,
}

#[derive(Clone)]
struct Link {
    /// Publisher confirms on: a command to a queue that does not exist comes back at once.
    channel: Channel,
    reply_to: ShortString,
    status: ConnectionStatus,
    /// Cancelled when the connection fails ([`watch`]).
    dead: CancellationToken,
}

/// One connection's worth of the upstream, owned by its supervising task.
struct Live {
    conn: Connection,
    replies: Consumer,
    dead: CancellationToken,
    watcher: tokio::task::JoinHandle<String>,
}

/// Removes a pending call when the call ends, however it ends (reply, timeout, error, or the
/// caller dropping the future): nothing stays in the map.
struct PendingGuard<'a> {
    pending: &'a Mutex<HashMap<String, Waiter>>,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

impl AmqpUpstream {
    /// Connects and declares this node's reply queue; fails if the broker cannot be reached.
    /// Afterwards, reconnects by itself (calls meanwhile answer `Unavailable`) until
    /// `shutdown`.
    pub async fn connect(
        url: &str,
        node_id: &str,
        shutdown: CancellationToken,
    ) -> Result<Arc<AmqpUpstream>, AmqpError> {
        let this = Arc::new(AmqpUpstream {
            url: url.to_owned(),
            node_id: node_id.to_owned(),
            shutdown,
            link: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            prefix: herald_core::message::new_id(),
        });
        let live = this.open().await?;
        tokio::spawn(this.clone().supervise(live));
        Ok(this)
    }

    /// Connected (readiness).
    pub fn healthy(&self) -> bool {
        lock(&self.link)
            .as_ref()
            .is_some_and(|l| l.status.connected())
    }

    /// Calls waiting for a reply.
    pub fn pending(&self) -> usize {
        lock(&self.pending).len()
    }

    /// This node's current reply queue.
    pub fn reply_queue(&self) -> Option<String> {
        lock(&self.link).as_ref().map(|l| l.reply_to.to_string())
    }

    async fn open(&self) -> Result<Live, AmqpError> {
        tokio::time::timeout(OPEN_TIMEOUT, self.try_open())
            .await
            .unwrap_or_else(|_| Err(stalled(&self.url)))
    }

    async fn try_open(&self) -> Result<Live, AmqpError> {
        let conn = connect(&self.url, format!("herald-upstream {}", self.node_id)).await?;
        let (dead, watcher) = watch(&conn);
        // Dropped on an error below: ends the watcher.
        let guard = dead.clone().drop_guard();
        let channel = conn
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker("enable publisher confirms"))?;
        let reply_to = short(
            "reply queue",
            &format!(
                "herald.replies.{}.{}",
                self.node_id,
                herald_core::message::new_id()
            ),
        )?;
        let rch = conn
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        rch.queue_declare(reply_to.clone(), opts, FieldTable::default())
            .await
            .map_err(broker(format!("declare the reply queue {reply_to}")))?;
        let consume = BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..Default::default()
        };
        let replies = rch
            .basic_consume(
                reply_to.clone(),
                "herald-replies".into(),
                consume,
                FieldTable::default(),
            )
            .await
            .map_err(broker(format!("consume the reply queue {reply_to}")))?;
        *lock(&self.link) = Some(Link {
            channel,
            reply_to,
            status: conn.status().clone(),
            dead: dead.clone(),
        });
        guard.disarm();
        Ok(Live {
            conn,
            replies,
            dead,
            watcher,
        })
    }

    /// Routes replies; after a connection loss, fails the calls waiting (their reply queue
    /// is gone) and reconnects with a back-off, until `shutdown`.
    async fn supervise(self: Arc<Self>, mut live: Live) {
        loop {
            let lost = loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break None,
                    why = &mut live.watcher => break Some(why.unwrap_or_else(|e| e.to_string())),
                    next = live.replies.next() => match next {
                        Some(Ok(d)) => self.route(d),
                        Some(Err(e)) => break Some(e.to_string()),
                        None => break Some("the reply consumer was cancelled".to_owned()),
                    },
                }
            };
            *lock(&self.link) = None;
            // Their reply queue is gone with the connection: no reply can reach them now.
            for (_, waiter) in lock(&self.pending).drain() {
                let _ = waiter.send(Err(UpstreamError::Unavailable(
                    "the connection to RabbitMQ was lost".into(),
                )));
            }
            close(&live.conn, "herald-upstream closing").await;
            live.dead.cancel();
            drop(live);
            let Some(why) = lost else {
                return;
            };
            warn!(reason = %why, "RabbitMQ upstream: connection lost, reconnecting");
            let mut delay = RECONNECT_MIN;
            live = loop {
                let opened = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    opened = async {
                        tokio::time::sleep(delay).await;
                        self.open().await
                    } => opened,
                };
                match opened {
                    Ok(opened) => break opened,
                    Err(e) => {
                        delay = (delay * 2).min(RECONNECT_MAX);
                        warn!(error = %e, retry_in = ?delay, "RabbitMQ upstream: reconnection failed");
                    }
                }
            };
            info!("RabbitMQ upstream: reconnected");
        }
    }

    /// Hands a reply to the call waiting for it.
    fn route(&self, d: Delivery) {
        let Some(id) = d.properties.correlation_id() else {
            debug!("RabbitMQ upstream: reply without correlation_id dropped");
            return;
        };
        let Some(waiter) = lock(&self.pending).remove(id.as_str()) else {
            debug!(correlation_id = %id, "RabbitMQ upstream: late or unknown reply dropped");
            return;
        };
        let reply = serde_json::from_slice::<Reply>(&d.data)
            .map_err(|e| UpstreamError::BadReply(format!("not a reply object: {e}")));
        let _ = waiter.send(reply);
    }
}

#[async_trait]
impl Upstream for AmqpUpstream {
    async fn call(
        &self,
        target: &Target,
        envelope: Bytes,
        trace_id: &str,
        timeout: Duration,
    ) -> Result<Reply, UpstreamError> {
        let Target::Amqp { queue } = target else {
            return Err(UpstreamError::Unavailable(format!(
                "{target:?} is not an AMQP target"
            )));
        };
        let deadline = Instant::now() + timeout;
        let queue = ShortString::try_new(queue.as_str()).map_err(|_| {
            UpstreamError::Unavailable(format!("queue name {queue:?} is longer than 255 bytes"))
        })?;
        let link = lock(&self.link)
            .clone()
            .filter(|l| l.status.connected())
            .ok_or_else(|| {
                UpstreamError::Unavailable("not connected to RabbitMQ (reconnecting)".into())
            })?;

        let id = format!(
            "{}.{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id.clone(), tx);
        let _guard = PendingGuard {
            pending: &self.pending,
            id: id.clone(),
        };

        let mut headers = FieldTable::default();
        headers.insert("trace_id".into(), AMQPValue::LongString(trace_id.into()));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(id.into())
            .with_reply_to(link.reply_to.clone())
            .with_expiration(timeout.as_millis().to_string().into())
            .with_timestamp(now_secs() as u64)
            .with_headers(headers);
        let publish = async {
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            link.channel
                .basic_publish("".into(), queue.clone(), options, &envelope, props)
                .await?
                .await
        };
        let confirmed = tokio::select! {
            biased;
            r = tokio::time::timeout_at(deadline, publish) => r,
            _ = link.dead.cancelled() => {
                return Err(UpstreamError::Unavailable(
                    "the connection to RabbitMQ was lost".into(),
                ));
            }
        };
        match confirmed {
            Err(_) => return Err(UpstreamError::Timeout(timeout)),
            Ok(Err(e)) => {
                if !link.channel.status().connected() && !link.dead.is_cancelled() {
                    // The connection may be fine but this channel is not: start afresh.
                    warn!(error = %e, "RabbitMQ upstream: the publishing channel failed");
                    link.dead.cancel();
                }
                return Err(UpstreamError::Unavailable(format!(
                    "cannot publish to queue {queue}: {e}"
                )));
            }
            Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                return Err(UpstreamError::Unavailable(format!(
                    "no queue {queue} on RabbitMQ (is the service running?)"
                )));
            }
            Ok(Ok(Confirmation::Nack(None))) => {
                return Err(UpstreamError::Unavailable(format!(
                    "RabbitMQ refused the command for queue {queue}"
                )));
            }
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(UpstreamError::Unavailable(
                "the connection to RabbitMQ was lost".into(),
            )),
            Err(_) => Err(UpstreamError::Timeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AmqpQueue;

    fn source(queues: Vec<AmqpQueue>) -> AmqpSource {
        AmqpSource {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefetch: 8,
            dead_letter_exchange: "herald.dead-letter".into(),
            queues,
        }
    }

    fn queue(name: &str) -> AmqpQueue {
        AmqpQueue {
            name: name.into(),
            exchange: None,
            exchange_type: "topic".into(),
            routing_keys: vec![],
        }
    }

    #[test]
    fn config_checks_name_the_key() {
        assert!(source(vec![queue("a"), queue("b")]).check().is_ok());
        let err = |cfg: AmqpSource| cfg.check().unwrap_err();
        assert!(err(source(vec![])).contains("ingest.amqp.queues"));
        assert!(err(source(vec![queue("a"), queue("a")])).contains("twice"));
        assert!(err(source(vec![queue("amq.x")])).contains("ingest.amqp.queues.name"));
        assert!(err(source(vec![queue(&"q".repeat(256))])).contains("255"));
        let mut q = queue("a");
        q.exchange = Some("ex".into());
        q.exchange_type = "round-robin".into();
        assert!(err(source(vec![q])).contains("exchange_type"));
        let mut s = source(vec![queue("a")]);
        s.prefetch = 0;
        assert!(err(s).contains("prefetch"));
        let mut s = source(vec![queue("a")]);
        s.url = "http://x".into();
        assert!(err(s).contains("ingest.amqp.url"));
    }

    #[test]
    fn message_id_fills_a_missing_id() {
        let b = with_message_id(br#"{"topic":"t"}"#.to_vec(), Some("m-1"));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, serde_json::json!({"topic":"t","id":"m-1"}));
        let b = br#"{"topic":"t","id":"own"}"#.to_vec();
        assert_eq!(with_message_id(b.clone(), Some("m-1")), b);
        assert_eq!(with_message_id(b.clone(), None), b);
    }
}
