//! RabbitMQ ingestion and `amqp:` command targets against the real broker on 127.0.0.1:5672.
//!
//! Every test uses its own random queue, exchange and dead-letter exchange names and deletes
//! them at the end (also when it fails: [`Cleanup`]).
//!
//! Connection loss is real, two ways (the shared broker itself is never restarted):
//! - [`Proxy`], a TCP relay owned by the test, between the source and the shared broker:
//!   `cut()` closes both sockets of every relayed connection — RabbitMQ sees its client go away
//!   (and requeues what was unacknowledged), the client sees the broker go away — and refuses
//!   new connections until `restore()`. Fast, so used for the exact-once and mid-stream tests.
//! - [`PrivateBroker`], a RabbitMQ node of the test's own (the installed `rabbitmq-server`,
//!   its own port, node name and data directory; about 4 s to boot): killed with SIGKILL and
//!   started again on the same data, a real broker crash and restart.
#![cfg(feature = "amqp")]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use herald_ingest::amqp::{AmqpIngest, AmqpIngestHandle, AmqpUpstream};
use herald_ingest::command::{Target, Upstream, UpstreamError};
use herald_ingest::config::{AmqpQueue, AmqpSource};
use herald_ingest::{Rejected, Submit, Submitted};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const BROKER: &str = "127.0.0.1:5672";
const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WAIT: Duration = Duration::from_secs(15);

fn name(kind: &str) -> String {
    format!(
        "herald-test.{kind}.{}",
        ulid::Ulid::new().to_string().to_lowercase()
    )
}

// ---------------------------------------------------------------------------------------------
// The publish path, recorded
// ---------------------------------------------------------------------------------------------

/// What the test's publish path answers for one call.
enum Answer {
    /// Stored (idempotent by id: a second time, a duplicate).
    Ok,
    Invalid,
    Unavailable,
    /// Wait for the test to send, then as `Ok`.
    Hold(oneshot::Receiver<()>),
}

struct Call {
    source: String,
    body: Value,
    at: Instant,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// The "store": ids accepted.
    stored: HashSet<String>,
    /// Bodies accepted, in order (duplicates not repeated: what users would get).
    delivered: Vec<Value>,
    /// Answers for the successive calls with an id; `Ok` when none is left.
    script: HashMap<String, VecDeque<Answer>>,
}

impl State {
    fn calls_for(&self, id: &str) -> Vec<&Call> {
        self.calls.iter().filter(|c| c.body["id"] == id).collect()
    }
    fn delivered_ids(&self) -> Vec<String> {
        self.delivered
            .iter()
            .map(|b| b["id"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

/// A [`Submit`] that records every call, stores ids like the durable store does (a known id is
/// a duplicate) and answers what the test scripted.
struct Recorder {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Recorder {
            state: Mutex::default(),
            changed: watch::channel(0).0,
        })
    }

    fn script(&self, id: &str, answers: Vec<Answer>) {
        self.state
            .lock()
            .unwrap()
            .script
            .insert(id.to_owned(), answers.into());
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Waits (no polling: woken by every call) until `cond` holds.
    async fn wait(&self, what: &str, cond: impl Fn(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        let deadline = Instant::now() + WAIT;
        loop {
            if cond(&self.state()) {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let s = self.state();
                panic!(
                    "timed out waiting for {what}: {} calls, delivered {:?}",
                    s.calls.len(),
                    s.delivered_ids()
                );
            }
        }
    }
}

#[async_trait]
impl Submit for Recorder {
    async fn submit(&self, source: &str, body: &[u8]) -> Result<Submitted, Rejected> {
        let body: Value =
            serde_json::from_slice(body).map_err(|e| Rejected::Invalid(e.to_string()))?;
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        let answer = {
            let mut s = self.state();
            s.calls.push(Call {
                source: source.to_owned(),
                body: body.clone(),
                at: Instant::now(),
            });
            s.script.get_mut(&id).and_then(VecDeque::pop_front)
        };
        self.changed.send_modify(|n| *n += 1);
        let answer = match answer {
            Some(Answer::Hold(release)) => {
                let _ = release.await;
                Answer::Ok
            }
            Some(a) => a,
            None => Answer::Ok,
        };
        let result = match answer {
            Answer::Invalid => Err(Rejected::Invalid("refused by the test".into())),
            Answer::Unavailable => Err(Rejected::Unavailable("store down (test)".into())),
            Answer::Ok | Answer::Hold(_) => {
                let mut s = self.state();
                let duplicate = !s.stored.insert(id.clone());
                if !duplicate {
                    s.delivered.push(body);
                }
                Ok(Submitted {
                    id,
                    duplicate,
                    stored: false,
                })
            }
        };
        self.changed.send_modify(|n| *n += 1);
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Broker helpers
// ---------------------------------------------------------------------------------------------

/// The test's own connection to the broker (publishing, checking, cleaning up).
struct Broker {
    _conn: Connection,
    ch: Channel,
}

impl Broker {
    async fn connect() -> Result<Broker> {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .context("RabbitMQ on 127.0.0.1:5672")?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Broker { _conn: conn, ch })
    }

    /// Publishes a persistent message and waits for the broker's confirm.
    async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        self.ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                props.with_delivery_mode(2),
            )
            .await?
            .await?;
        Ok(())
    }

    async fn publish_json(&self, queue: &str, body: Value) -> Result<()> {
        let body = serde_json::to_vec(&body)?;
        self.publish("", queue, &body, BasicProperties::default())
            .await
    }

    /// Messages ready in `queue` (passive declare: neither creates nor changes it).
    async fn ready(&self, queue: &str) -> Result<u32> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .ch
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        Ok(q.message_count())
    }

    async fn consumers(&self, queue: &str) -> Result<u32> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .ch
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        Ok(q.consumer_count())
    }

    async fn eventually_ready(&self, queue: &str, n: u32) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.ready(queue).await?;
            if got == n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "queue {queue}: {got} ready, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Deletes the test's queues and exchanges when dropped, even after a failed assertion.
#[derive(Default)]
struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    /// The ingest's dead-letter exchange and queue.
    fn dlx(&mut self, dlx: &str) {
        self.exchanges.push(dlx.to_owned());
        self.queues.push(format!("{dlx}.queue"));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // Drop cannot await: a thread with its own runtime does the deleting.
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(b) = Broker::connect().await else {
                    return;
                };
                for q in queues {
                    let _ =
                        b.ch.queue_delete(q.into(), QueueDeleteOptions::default())
                            .await;
                }
                for e in exchanges {
                    let _ =
                        b.ch.exchange_delete(e.into(), ExchangeDeleteOptions::default())
                            .await;
                }
            });
        });
        let _ = done.join();
    }
}

fn source(url: &str, dlx: &str, prefetch: u16, queues: Vec<AmqpQueue>) -> AmqpSource {
    AmqpSource {
        url: url.to_owned(),
        prefetch,
        dead_letter_exchange: dlx.to_owned(),
        queues,
    }
}

fn queue(name: &str) -> AmqpQueue {
    AmqpQueue {
        name: name.to_owned(),
        exchange: None,
        exchange_type: "topic".into(),
        routing_keys: vec![],
    }
}

/// Poll `cond` until it holds (for state only readable by asking: counters, health).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Cancels the source and waits for it to finish (connection closed).
async fn stop(handle: AmqpIngestHandle, shutdown: &CancellationToken) {
    shutdown.cancel();
    tokio::time::timeout(WAIT, handle.join())
        .await
        .expect("the source stops");
}

// ---------------------------------------------------------------------------------------------
// A TCP relay the test can cut
// ---------------------------------------------------------------------------------------------

struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    /// Cancelled to close every relayed connection; replaced by a fresh one at each cut.
    kill: Arc<Mutex<CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let kill = Arc::new(Mutex::new(CancellationToken::new()));
        let (up2, kill2) = (up.clone(), kill.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound); // "broker down": closed before the AMQP handshake
                    continue;
                }
                let kill = kill2.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(BROKER).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = kill.cancelled() => {} // both sockets dropped: closed on both sides
                    }
                });
            }
        });
        Ok(Proxy {
            port,
            up,
            kill,
            task,
        })
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Closes every relayed connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let old = std::mem::replace(&mut *self.kill.lock().unwrap(), CancellationToken::new());
        old.cancel();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A RabbitMQ node started by the test (see the file's doc). `HERALD_TEST_RABBITMQ_SERVER`
/// names the `rabbitmq-server` script if it is not at the Debian/Ubuntu path.
struct PrivateBroker {
    dir: std::path::PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    async fn start() -> Result<PrivateBroker> {
        let free = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let id = ulid::Ulid::new().to_string().to_lowercase();
        let dir = std::env::temp_dir().join(format!("herald-rabbitmq-{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut b = PrivateBroker {
            dir,
            node: format!("herald-test-{id}@localhost"),
            port: free()?,
            dist_port: free()?,
            child: None,
        };
        b.boot().await?;
        Ok(b)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (on the same data as before, if any) and waits for its AMQP port.
    async fn boot(&mut self) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let script = std::env::var("HERALD_TEST_RABBITMQ_SERVER")
            .unwrap_or_else(|_| "/usr/lib/rabbitmq/bin/rabbitmq-server".into());
        let d = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("server.out"))?;
        let child = std::process::Command::new(&script)
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            // Not the system's rabbitmq.conf (it sets the shared broker's listener).
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {script} (set HERALD_TEST_RABBITMQ_SERVER)"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .map(drop)
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the private RabbitMQ did not start: see {}",
                self.dir.join("server.out").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// SIGKILL to the whole node (script and Erlang VM): a crash, nothing shut down cleanly.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = format!("-{}", child.id());
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &group])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill.lock().unwrap().cancel();
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Ingestion
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_messages_are_submitted_once_and_acked() -> Result<()> {
    let (q, ex, dlx) = (name("q"), name("ex"), name("dlx"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    cleanup.exchanges.push(ex.clone());
    cleanup.dlx(&dlx);

    let rec = Recorder::new();
    let shutdown = CancellationToken::new();
    let mut cfg_q = queue(&q);
    cfg_q.exchange = Some(ex.clone());
    cfg_q.routing_keys = vec!["orders.*".into()];
    let handle = AmqpIngest::start(
        source(URL, &dlx, 8, vec![cfg_q]),
        rec.clone(),
        shutdown.clone(),
    )
    .await?;
    assert!(handle.healthy());

    let b = Broker::connect().await?;
    // Through the configured exchange and binding, with a timestamp 3 s old (lag).
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        - 3;
    let p = json!({"topic":"room/a","event":"e","data":1,"id":"p-1"});
    b.publish(
        &ex,
        "orders.shipped",
        &serde_json::to_vec(&p)?,
        BasicProperties::default().with_timestamp(ts),
    )
    .await?;
    // A user message, straight to the queue.
    b.publish_json(
        &q,
        json!({"user":"42","event":"n","data":{"a":1},"id":"u-1"}),
    )
    .await?;
    // No id in the body, an AMQP message_id instead.
    b.publish(
        "",
        &q,
        br#"{"topic":"room/b","event":"e","data":2}"#,
        BasicProperties::default().with_message_id("m-1".into()),
    )
    .await?;

    rec.wait("3 messages", |s| s.delivered.len() == 3).await;
    {
        let s = rec.state();
        assert_eq!(s.calls.len(), 3);
        assert!(s.calls.iter().all(|c| c.source == format!("amqp:{q}")));
        assert_eq!(s.delivered[0], p);
        assert_eq!(
            s.delivered[1],
            json!({"topic":"user/42","durable":true,"event":"n","data":{"a":1},"id":"u-1"})
        );
        assert_eq!(
            s.delivered[2],
            json!({"topic":"room/b","event":"e","data":2,"id":"m-1"})
        );
    }
    eventually("3 accepted", || handle.stats().accepted == 3).await;

    // Stopping closes the connection: anything not acknowledged would be back in the queue.
    let status = handle.status();
    stop(handle, &shutdown).await;
    assert!(!status.healthy());
    assert_eq!(b.ready(&q).await?, 0, "all three were acknowledged");
    assert_eq!(b.consumers(&q).await?, 0);
    assert_eq!(rec.state().calls.len(), 3, "each submitted once");
    let st = status.stats();
    assert_eq!(
        (st.accepted, st.duplicate, st.rejected, st.retried),
        (3, 0, 0, 0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_next_one_flows() -> Result<()> {
    let (q, dlx) = (name("q"), name("dlx"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    cleanup.dlx(&dlx);

    let rec = Recorder::new();
    rec.script("bad-1", vec![Answer::Invalid]);
    let shutdown = CancellationToken::new();
    let handle = AmqpIngest::start(
        source(URL, &dlx, 8, vec![queue(&q)]),
        rec.clone(),
        shutdown.clone(),
    )
    .await?;

    let b = Broker::connect().await?;
    b.publish("", &q, b"this is not JSON {", BasicProperties::default())
        .await?;
    b.publish_json(&q, json!({"topic":"room/a","event":"e","id":"bad-1"}))
        .await?;
    b.publish_json(&q, json!({"topic":"room/a","event":"e","id":"good-1"}))
        .await?;

    rec.wait("good-1", |s| s.delivered_ids() == ["good-1"])
        .await;
    eventually("2 rejected", || handle.stats().rejected == 2).await;
    let status = handle.status();
    stop(handle, &shutdown).await;

    assert_eq!(b.ready(&q).await?, 0);
    // Not redelivered in a loop: the malformed one never reached the publish path, the refused
    // one reached it once.
    {
        let s = rec.state();
        assert_eq!(s.calls.len(), 2);
        assert_eq!(s.calls_for("bad-1").len(), 1);
    }
    let st = status.stats();
    assert_eq!((st.accepted, st.rejected, st.retried), (1, 2, 0));

    // Both are in the dead-letter queue, in order, with RabbitMQ's x-death record.
    let dlq = format!("{dlx}.queue");
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let got =
            b.ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await?
                .context("a dead-lettered message")?;
        let headers = got
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let death = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => match a.as_slice().first() {
                Some(AMQPValue::FieldTable(t)) => t.clone(),
                other => anyhow::bail!("x-death holds {other:?}"),
            },
            other => anyhow::bail!("x-death is {other:?}"),
        };
        let field = |k: &str| match death.inner().get(k) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            _ => String::new(),
        };
        assert_eq!(
            (field("reason"), field("queue")),
            ("rejected".into(), q.clone())
        );
        bodies.push(String::from_utf8(got.delivery.data)?);
    }
    assert_eq!(bodies[0], "this is not JSON {");
    assert!(bodies[1].contains("bad-1"));
    assert_eq!(b.ready(&dlq).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_requeued_after_a_backoff_then_acked() -> Result<()> {
    let (q, dlx) = (name("q"), name("dlx"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    cleanup.dlx(&dlx);

    let rec = Recorder::new();
    rec.script("r-1", vec![Answer::Unavailable, Answer::Unavailable]);
    let shutdown = CancellationToken::new();
    let handle = AmqpIngest::start(
        source(URL, &dlx, 8, vec![queue(&q)]),
        rec.clone(),
        shutdown.clone(),
    )
    .await?;
    let b = Broker::connect().await?;
    b.publish_json(
        &q,
        json!({"topic":"user/7","event":"e","durable":true,"id":"r-1"}),
    )
    .await?;

    rec.wait("r-1 stored", |s| s.delivered_ids() == ["r-1"])
        .await;
    eventually("accepted", || handle.stats().accepted == 1).await;
    {
        let s = rec.state();
        let calls = s.calls_for("r-1");
        assert_eq!(calls.len(), 3, "two refusals, then stored");
        // 1 s, then 2 s (doubled) between attempts: no spinning.
        let (gap1, gap2) = (calls[1].at - calls[0].at, calls[2].at - calls[1].at);
        assert!(gap1 >= Duration::from_millis(950), "{gap1:?}");
        assert!(gap2 >= Duration::from_millis(1950), "{gap2:?}");
        assert!(gap2 < Duration::from_secs(5), "{gap2:?}");
    }
    let status = handle.status();
    stop(handle, &shutdown).await;
    assert_eq!(b.ready(&q).await?, 0);
    let st = status.stats();
    assert_eq!((st.accepted, st.retried, st.rejected), (1, 2, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_what_is_in_flight_and_queue_order_is_kept() -> Result<()> {
    let (q, dlx) = (name("q"), name("dlx"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    cleanup.dlx(&dlx);

    let rec = Recorder::new();
    let (release, held) = oneshot::channel();
    rec.script("o-0", vec![Answer::Hold(held)]);
    let shutdown = CancellationToken::new();
    let handle = AmqpIngest::start(
        source(URL, &dlx, 2, vec![queue(&q)]),
        rec.clone(),
        shutdown.clone(),
    )
    .await?;
    let b = Broker::connect().await?;
    let ids: Vec<String> = (0..6).map(|i| format!("o-{i}")).collect();
    for id in &ids {
        b.publish_json(&q, json!({"topic":"room/o","event":"e","id":id}))
            .await?;
    }
    rec.wait("o-0 in progress", |s| s.calls.len() == 1).await;
    // Prefetch 2: two delivered to the source (one in progress, one waiting), four ready.
    b.eventually_ready(&q, 4).await?;
    // The backlog gauge sees the same at its next poll (every 5 s).
    let status = handle.status();
    eventually("backlog 4", || status.backlog(&q) == Some(4)).await;
    assert_eq!(rec.state().calls.len(), 1, "one at a time per queue");

    let _ = release.send(());
    rec.wait("6 messages", |s| s.delivered.len() == 6).await;
    {
        let s = rec.state();
        let called: Vec<&str> = s
            .calls
            .iter()
            .filter_map(|c| c.body["id"].as_str())
            .collect();
        assert_eq!(called, ids, "queue order");
    }
    stop(handle, &shutdown).await;
    assert_eq!(b.ready(&q).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_in_progress_when_the_connection_dies_is_redelivered_and_stored_once()
-> Result<()> {
    let (q, dlx) = (name("q"), name("dlx"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    cleanup.dlx(&dlx);

    let proxy = Proxy::start().await?;
    let rec = Recorder::new();
    let (release, held) = oneshot::channel();
    rec.script("x-1", vec![Answer::Hold(held)]);
    let shutdown = CancellationToken::new();
    let handle = AmqpIngest::start(
        source(&proxy.url(), &dlx, 8, vec![queue(&q)]),
        rec.clone(),
        shutdown.clone(),
    )
    .await?;
    let b = Broker::connect().await?;
    b.publish_json(
        &q,
        json!({"topic":"user/9","event":"e","durable":true,"id":"x-1"}),
    )
    .await?;
    rec.wait("x-1 in progress", |s| s.calls.len() == 1).await;

    // The connection dies while x-1 is being stored.
    proxy.cut();
    eventually("unhealthy", || !handle.healthy()).await;
    // RabbitMQ took the unacknowledged delivery back.
    b.eventually_ready(&q, 1).await?;

    // The store step completes (x-1 is stored); its ack cannot reach the broker.
    let _ = release.send(());
    eventually("x-1 accepted", || handle.stats().accepted == 1).await;
    // Published while the source cannot connect.
    b.publish_json(
        &q,
        json!({"topic":"user/9","event":"e","durable":true,"id":"x-2"}),
    )
    .await?;

    proxy.restore();
    rec.wait("x-1 redelivered and x-2", |s| {
        s.calls_for("x-1").len() == 2 && s.delivered.len() == 2
    })
    .await;
    eventually("duplicate counted", || handle.stats().duplicate == 1).await;
    assert!(handle.healthy());
    assert_eq!(
        rec.state().delivered_ids(),
        ["x-1", "x-2"],
        "x-1 stored once"
    );
    let status = handle.status();
    stop(handle, &shutdown).await;
    assert_eq!(b.ready(&q).await?, 0);
    let st = status.stats();
    assert_eq!(
        (st.accepted, st.duplicate, st.reconnects, st.rejected),
        (2, 1, 1, 0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_after_connection_losses_mid_stream_and_nothing_is_lost() -> Result<()>
{
    let (q, dlx) = (name("q"), name("dlx"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    cleanup.dlx(&dlx);

    let proxy = Proxy::start().await?;
    let rec = Recorder::new();
    let shutdown = CancellationToken::new();
    let handle = AmqpIngest::start(
        source(&proxy.url(), &dlx, 16, vec![queue(&q)]),
        rec.clone(),
        shutdown.clone(),
    )
    .await?;

    const N: usize = 300;
    // A publisher that keeps going through the outages (straight to the broker).
    let publisher = {
        let q = q.clone();
        tokio::spawn(async move {
            let b = Broker::connect().await?;
            for i in 0..N {
                b.publish_json(
                    &q,
                    json!({"topic":"room/s","event":"e","id":format!("s-{i}")}),
                )
                .await?;
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            anyhow::Ok(())
        })
    };

    rec.wait("50 messages", |s| s.delivered.len() >= 50).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await; // the outage lasts a while
    proxy.restore();
    rec.wait("150 messages", |s| s.delivered.len() >= 150).await;
    proxy.cut();
    proxy.restore();
    publisher.await??;
    rec.wait("all messages", |s| s.delivered.len() == N).await;

    let calls = {
        let s = rec.state();
        let got: HashSet<String> = s.delivered_ids().into_iter().collect();
        assert_eq!(got.len(), N, "each message stored once");
        assert!((0..N).all(|i| got.contains(&format!("s-{i}"))));
        s.calls.len()
    };
    eventually("counted", || {
        let st = handle.stats();
        st.accepted as usize == N && (st.accepted + st.duplicate) as usize == calls
    })
    .await;
    let st = handle.stats();
    assert_eq!(st.reconnects, 2);
    eprintln!(
        "{N} messages, {calls} submits ({} redelivered duplicates), {} reconnects",
        st.duplicate, st.reconnects
    );
    stop(handle, &shutdown).await;
    let b = Broker::connect().await?;
    assert_eq!(b.ready(&q).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_broker_crash_and_restart_loses_nothing_unacknowledged() -> Result<()> {
    let mut broker = PrivateBroker::start().await?;
    let (q, dlx) = (name("q"), name("dlx"));
    let rec = Recorder::new();
    let (release, held) = oneshot::channel();
    rec.script("k-3", vec![Answer::Hold(held)]);
    let shutdown = CancellationToken::new();
    let handle = AmqpIngest::start(
        source(&broker.url(), &dlx, 4, vec![queue(&q)]),
        rec.clone(),
        shutdown.clone(),
    )
    .await?;
    let url = broker.url();
    let publish = |from: usize, to: usize| {
        let (url, q) = (url.clone(), q.clone());
        async move {
            // Persistent, confirmed by the broker: on its disk before the crash.
            let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            for i in from..to {
                let body = serde_json::to_vec(
                    &json!({"topic":"user/5","event":"e","durable":true,"id":format!("k-{i}")}),
                )?;
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            }
            conn.close(200, "done".into()).await?;
            anyhow::Ok(())
        }
    };
    publish(0, 10).await?;
    // k-0..k-2 stored and acknowledged, k-3 being stored, the next ones prefetched or ready.
    rec.wait("k-3 in progress", |s| s.calls.len() == 4).await;

    broker.kill();
    eventually("unhealthy", || !handle.healthy()).await;
    let _ = release.send(()); // k-3 is stored; its ack has nowhere to go
    eventually("k-3 accepted", || handle.stats().accepted == 4).await;

    broker.boot().await?;
    eventually("reconnected", || handle.healthy()).await;
    publish(10, 20).await?;
    rec.wait("all 20", |s| s.delivered.len() == 20).await;

    let calls = {
        let s = rec.state();
        let got: HashSet<String> = s.delivered_ids().into_iter().collect();
        assert_eq!(got.len(), 20, "each stored once");
        assert!(
            s.calls_for("k-3").len() >= 2,
            "k-3 redelivered after the restart"
        );
        s.calls.len()
    };
    eventually("counted", || {
        let st = handle.stats();
        st.accepted == 20 && (st.accepted + st.duplicate) as usize == calls
    })
    .await;
    assert_eq!(handle.stats().reconnects, 1);
    eprintln!("broker restart: 20 messages, {calls} submits");
    stop(handle, &shutdown).await;
    let conn = Connection::connect(&broker.url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ready = ch
        .queue_declare(q.as_str().into(), passive, FieldTable::default())
        .await?;
    assert_eq!(ready.message_count(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_fast() -> Result<()> {
    // Nothing listens on this port.
    let port = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let t = Instant::now();
    let err = AmqpIngest::start(
        source(&url, "unused", 8, vec![queue("unused")]),
        Recorder::new(),
        CancellationToken::new(),
    )
    .await
    .err()
    .context("no broker")?;
    assert!(err.to_string().contains("cannot connect"), "{err}");
    let err = AmqpUpstream::connect(&url, "n1", CancellationToken::new())
        .await
        .err()
        .context("no broker")?;
    assert!(err.to_string().contains("cannot connect"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // A queue that exists with other arguments: the broker refuses, the source does not start.
    let (q, dlx) = (name("q"), name("dlx"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    cleanup.dlx(&dlx);
    let b = Broker::connect().await?;
    b.ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await?;
    let err = AmqpIngest::start(
        source(URL, &dlx, 8, vec![queue(&q)]),
        Recorder::new(),
        CancellationToken::new(),
    )
    .await
    .err()
    .context("conflicting queue")?;
    let msg = err.to_string();
    assert!(msg.contains(&q) && msg.contains("PRECONDITION"), "{msg}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// A service: consumes `queue`, and answers each command with what `answer` makes of the
/// envelope and its `trace_id` header (`None`: no answer), to `reply_to`, same
/// `correlation_id`.
async fn worker(
    queue: &str,
    answer: impl Fn(Value, String) -> Option<Vec<u8>> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let b = Broker::connect().await?;
    b.ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer =
        b.ch.basic_consume(
            queue.into(),
            "worker".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let envelope: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
            let header = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get("trace_id") {
                    Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                })
                .unwrap_or_default();
            let (Some(reply_to), Some(corr)) = (
                d.properties.reply_to().clone(),
                d.properties.correlation_id().clone(),
            ) else {
                continue;
            };
            let Some(body) = answer(envelope, header) else {
                continue;
            };
            let props = BasicProperties::default().with_correlation_id(corr);
            let _ = b.publish("", reply_to.as_str(), &body, props).await;
        }
    }))
}

fn envelope(command: &str, trace_id: &str, data: Value) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "command": command, "trace_id": trace_id, "user": {"id":"42","role":"admin"},
            "conn_id": "c-n1-1", "node_id": "n1", "data": data,
        }))
        .unwrap_or_default(),
    )
}

fn echo(envelope: Value, header: String) -> Option<Vec<u8>> {
    serde_json::to_vec(&json!({"code":0,"message":"ok","data":{
        "trace_id": envelope["trace_id"], "header_trace_id": header,
        "command": envelope["command"], "user": envelope["user"], "echo": envelope["data"],
    }}))
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_round_trip_through_a_worker_with_trace_ids() -> Result<()> {
    let q = name("svc");
    let mut cleanup = Cleanup::default();
    cleanup.queues.push(q.clone());
    let _worker = worker(&q, echo).await?;
    let shutdown = CancellationToken::new();
    let up = AmqpUpstream::connect(URL, "n1", shutdown.clone()).await?;
    assert!(up.healthy());
    assert!(
        up.reply_queue()
            .unwrap_or_default()
            .starts_with("herald.replies.n1.")
    );

    // Concurrent calls: each reply reaches its own caller.
    let target = Target::Amqp { queue: q.clone() };
    let calls = (0..20).map(|i| {
        let (up, target) = (up.clone(), target.clone());
        async move {
            let trace = format!("t-{i}");
            let env = envelope("CALL", &trace, json!({"i": i}));
            let reply = up.call(&target, env, &trace, Duration::from_secs(5)).await;
            (i, trace, reply)
        }
    });
    for (i, trace, reply) in futures_util::future::join_all(calls).await {
        let reply = reply?;
        assert_eq!(reply.code, 0);
        assert_eq!(reply.message.as_deref(), Some("ok"));
        let data: Value = serde_json::from_str(reply.data.context("data")?.get())?;
        assert_eq!(data["trace_id"], trace.as_str());
        assert_eq!(data["header_trace_id"], trace.as_str());
        assert_eq!(data["command"], "CALL");
        assert_eq!(data["user"], json!({"id":"42","role":"admin"}));
        assert_eq!(data["echo"], json!({"i": i}));
    }
    assert_eq!(up.pending(), 0);
    shutdown.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeouts_bad_replies_and_missing_queues() -> Result<()> {
    let (silent, garbage) = (name("silent"), name("garbage"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.extend([silent.clone(), garbage.clone()]);
    let b = Broker::connect().await?;
    // A queue nobody consumes.
    b.ch.queue_declare(
        silent.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _garbage = worker(&garbage, |_, _| Some(b"not a reply".to_vec())).await?;
    let shutdown = CancellationToken::new();
    let up = AmqpUpstream::connect(URL, "n1", shutdown.clone()).await?;

    // No answer: a timeout, and nothing left waiting.
    let t = Instant::now();
    let timeout = Duration::from_millis(300);
    let r = up
        .call(
            &Target::Amqp {
                queue: silent.clone(),
            },
            envelope("SLOW", "t-slow", json!(null)),
            "t-slow",
            timeout,
        )
        .await;
    assert!(
        matches!(r, Err(UpstreamError::Timeout(d)) if d == timeout),
        "{r:?}"
    );
    assert!(t.elapsed() >= timeout && t.elapsed() < Duration::from_secs(2));
    assert_eq!(up.pending(), 0);
    // The command expires with its timeout (it was published a moment after the call began):
    // RabbitMQ drops it, a late worker does not get it.
    b.eventually_ready(&silent, 0).await?;

    // A caller that gives up (its future dropped) leaves nothing behind either.
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        up.call(
            &Target::Amqp {
                queue: silent.clone(),
            },
            envelope("SLOW", "t-2", json!(null)),
            "t-2",
            Duration::from_secs(10),
        ),
    )
    .await;
    assert!(dropped.is_err());
    assert_eq!(up.pending(), 0);

    // Not a reply.
    let r = up
        .call(
            &Target::Amqp {
                queue: garbage.clone(),
            },
            envelope("X", "t-3", json!(null)),
            "t-3",
            Duration::from_secs(5),
        )
        .await;
    assert!(matches!(r, Err(UpstreamError::BadReply(_))), "{r:?}");

    // No such queue: unavailable at once (mandatory publish returned), not a timeout.
    let t = Instant::now();
    let r = up
        .call(
            &Target::Amqp {
                queue: name("nobody"),
            },
            envelope("X", "t-4", json!(null)),
            "t-4",
            Duration::from_secs(5),
        )
        .await;
    assert!(
        matches!(r, Err(UpstreamError::Unavailable(ref m)) if m.contains("no queue")),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(up.pending(), 0);
    shutdown.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_fail_fast_while_the_broker_is_away_and_work_after() -> Result<()> {
    let (svc, silent) = (name("svc"), name("silent"));
    let mut cleanup = Cleanup::default();
    cleanup.queues.extend([svc.clone(), silent.clone()]);
    let _worker = worker(&svc, echo).await?;
    let b = Broker::connect().await?;
    b.ch.queue_declare(
        silent.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let proxy = Proxy::start().await?;
    let shutdown = CancellationToken::new();
    let up = AmqpUpstream::connect(&proxy.url(), "n2", shutdown.clone()).await?;
    let call = |queue: &str, timeout: Duration| {
        let (up, target) = (
            up.clone(),
            Target::Amqp {
                queue: queue.to_owned(),
            },
        );
        async move {
            up.call(&target, envelope("CALL", "t-r", json!(1)), "t-r", timeout)
                .await
        }
    };
    call(&svc, Duration::from_secs(5)).await?;
    let first_reply_queue = up.reply_queue();

    // A call waiting for its reply when the connection dies fails at once, not at its timeout.
    let t = Instant::now();
    let waiting = tokio::spawn(call(&silent, Duration::from_secs(10)));
    eventually("the call is waiting", || up.pending() == 1).await;
    proxy.cut();
    let r = waiting.await?;
    assert!(matches!(r, Err(UpstreamError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    eventually("unhealthy", || !up.healthy()).await;
    let r = call(&svc, Duration::from_secs(5)).await;
    assert!(matches!(r, Err(UpstreamError::Unavailable(_))), "{r:?}");

    proxy.restore();
    eventually("reconnected", || up.healthy()).await;
    assert_ne!(up.reply_queue(), first_reply_queue, "a new reply queue");
    let reply = call(&svc, Duration::from_secs(5)).await?;
    let data: Value = serde_json::from_str(reply.data.context("data")?.get())?;
    assert_eq!(data["trace_id"], "t-r");
    assert_eq!(up.pending(), 0);
    shutdown.cancel();
    Ok(())
}
