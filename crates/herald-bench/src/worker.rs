//! The worker process (`herald-bench worker --spec <json>`): holds up to ~15 000 subscriber
//! connections (the per-process open-files limit is 20 000) and talks to the coordinator in
//! JSON lines.
//!
//! stdout (worker → coordinator): `{"event":"progress",…}` every second while connecting, then
//! one `{"event":"ready","open":…,"failed":…,"secs":…,"first_error":…}`; afterwards one answer
//! per command. stdin (coordinator → worker), one command per line: `reset` (zero the counters
//! and histograms), `count` (deliveries, acks and times so far), `report` (the same plus the
//! latency histograms as `(value_ns, count)` pairs), `quit`.
//!
//! Durable messages (S6) are counted once per message id per connection (repeats, i.e.
//! retransmissions, are `duplicates`) and, with `ack` in the spec, acknowledged at once with the
//! target's ack frame; the ack's reply gives the ack round trip (`ack_hist`) and how many
//! messages the server newly marked acked (`acks_confirmed`).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{Semaphore, mpsc};

use crate::hist;
use crate::targets::{
    Incoming, Target, TargetSpec, Ws, herald::Herald, nats::Nats, node_ws::NodeWs, now_ns, open_ws,
    rabbitmq_stomp::Stomp, socketio::SocketIo, sockudo::Sockudo,
};

/// What one connection subscribes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicMode {
    /// No explicit subscription (S2: connect only).
    None,
    /// Every connection on this topic (S3, S4).
    Shared(String),
    /// `<prefix><connection number>`: one topic each (S1).
    PerConnection(String),
    /// `<prefix><k><suffix>` with `k = spread_index(conn, among, over)`: `among` connections,
    /// one topic each, spread evenly over the topic numbers `0 .. over` (S5: connection `i` of
    /// 10 000 watches `device/<i × 100>/telemetry` of 1 000 000).
    Spread {
        prefix: String,
        suffix: String,
        among: u64,
        over: u64,
    },
}

impl TopicMode {
    fn topic(&self, conn: usize) -> Option<String> {
        match self {
            Self::None => None,
            Self::Shared(t) => Some(t.clone()),
            Self::PerConnection(p) => Some(format!("{p}{conn}")),
            Self::Spread {
                prefix,
                suffix,
                among,
                over,
            } => Some(format!(
                "{prefix}{}{suffix}",
                spread_index(conn as u64, *among, *over)
            )),
        }
    }
}

/// The topic number watched by connection `i` of `among`, spread evenly over `0 .. over`
/// (`among ≤ over`: distinct for distinct `i`).
pub fn spread_index(i: u64, among: u64, over: u64) -> u64 {
    (u128::from(i) * u128::from(over) / u128::from(among.max(1))) as u64
}

/// The connection watching topic number `k` under [`spread_index`], if any (`i < among`).
pub fn watcher_of(k: u64, among: u64, over: u64) -> Option<u64> {
    if among == 0 || over == 0 {
        return None;
    }
    // The smallest i with i × over / among ≥ k is ceil(k × among / over).
    let i = (u128::from(k) * u128::from(among)).div_ceil(u128::from(over)) as u64;
    (i < among && spread_index(i, among, over) == k).then_some(i)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub target: TargetSpec,
    /// Connection numbers `first .. first + count` (they name users and topics).
    pub first: usize,
    pub count: usize,
    pub topic: TopicMode,
    /// Connections per loopback source address: connection `i` binds 127.0.0.(1 + i / this)
    /// when that is not 127.0.0.1 (one address has ~28 000 ephemeral ports towards one server
    /// port); 0 = never bind.
    pub per_source_ip: usize,
    /// Handshakes in flight at once (pacing against SYN/accept backlog drops).
    pub concurrency: usize,
    /// Acknowledge every durable message as soon as it arrives (S6).
    #[serde(default)]
    pub ack: bool,
}

/// The loopback source address for connection `conn`, if it must bind one.
pub fn source_ip(conn: usize, per_source_ip: usize) -> Option<IpAddr> {
    if per_source_ip == 0 {
        return None;
    }
    let k = conn / per_source_ip;
    (k > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + k.min(253) as u8)))
}

struct Shared {
    open: AtomicU64,
    closed: AtomicU64,
    delivered: AtomicU64,
    untimed: AtomicU64,
    /// Durable messages received again (same id on the same connection).
    duplicates: AtomicU64,
    acks_sent: AtomicU64,
    /// Sum of the `acked` counts of ack replies: messages the server newly marked acked.
    acks_confirmed: AtomicU64,
    /// Ack replies with a non-zero code.
    ack_errors: AtomicU64,
    /// Latest wall-clock times (ns since the epoch) of a delivery, of an ack written to the
    /// socket and of an ack reply: the end of a phase, to the nanosecond.
    last_delivery_ns: AtomicU64,
    last_ack_ns: AtomicU64,
    last_ack_reply_ns: AtomicU64,
    // Locked for one `record` per delivery, never across an `.await`.
    hist: Mutex<Histogram<u64>>,
    /// Ack sent → its reply (the server committed the ack).
    ack_hist: Mutex<Histogram<u64>>,
}

impl Shared {
    fn new() -> Self {
        Self {
            open: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            untimed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            acks_sent: AtomicU64::new(0),
            acks_confirmed: AtomicU64::new(0),
            ack_errors: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            last_ack_ns: AtomicU64::new(0),
            last_ack_reply_ns: AtomicU64::new(0),
            hist: Mutex::new(hist::new_histogram()),
            ack_hist: Mutex::new(hist::new_histogram()),
        }
    }

    /// A first delivery received at `now` (ns), with its send timestamp if the payload had one.
    fn delivery(&self, now: u64, ts: Option<u64>) {
        self.delivered.fetch_add(1, Relaxed);
        self.last_delivery_ns.fetch_max(now, Relaxed);
        match ts {
            Some(ts) => hist::record(
                &mut self.hist.lock().expect("histogram lock"),
                now.saturating_sub(ts),
            ),
            None => {
                self.untimed.fetch_add(1, Relaxed);
            }
        }
    }

    fn reset(&self) {
        for c in [
            &self.delivered,
            &self.untimed,
            &self.duplicates,
            &self.acks_sent,
            &self.acks_confirmed,
            &self.ack_errors,
            &self.last_delivery_ns,
            &self.last_ack_ns,
            &self.last_ack_reply_ns,
        ] {
            c.store(0, Relaxed);
        }
        self.hist.lock().expect("histogram lock").reset();
        self.ack_hist.lock().expect("histogram lock").reset();
    }

    fn counts(&self) -> Value {
        json!({
            "open": self.open.load(Relaxed),
            "closed": self.closed.load(Relaxed),
            "delivered": self.delivered.load(Relaxed),
            "untimed": self.untimed.load(Relaxed),
            "duplicates": self.duplicates.load(Relaxed),
            "acks_sent": self.acks_sent.load(Relaxed),
            "acks_confirmed": self.acks_confirmed.load(Relaxed),
            "ack_errors": self.ack_errors.load(Relaxed),
            "last_delivery_ns": self.last_delivery_ns.load(Relaxed),
            "last_ack_ns": self.last_ack_ns.load(Relaxed),
            "last_ack_reply_ns": self.last_ack_reply_ns.load(Relaxed),
        })
    }
}

fn emit(v: Value) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

pub fn run(spec_json: &str, threads: usize) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_str(spec_json)?;
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let result = rt.block_on(async move {
        match spec.target.clone() {
            TargetSpec::Herald(h) => run_with(Arc::new(Herald::new(h)), spec).await,
            TargetSpec::Nats(n) => run_with(Arc::new(Nats::new(n)), spec).await,
            TargetSpec::NodeWs(n) => run_with(Arc::new(NodeWs::new(n)), spec).await,
            TargetSpec::SocketIo(s) => run_with(Arc::new(SocketIo::new(s)), spec).await,
            TargetSpec::Sockudo(s) => run_with(Arc::new(Sockudo::new(s)), spec).await,
            TargetSpec::RabbitStomp(s) => run_with(Arc::new(Stomp::rabbitmq(s)), spec).await,
            TargetSpec::HeraldStomp(h) => run_with(Arc::new(Stomp::herald(&h)), spec).await,
        }
    });
    // Do not wait for thousands of connection tasks to be torn down one by one.
    std::process::exit(if result.is_ok() { 0 } else { 1 })
}

async fn run_with<T: Target>(target: Arc<T>, spec: WorkerSpec) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new());
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<String>>();
    let start = Instant::now();
    for conn in spec.first..spec.first + spec.count {
        let (target, shared, sem, done) =
            (target.clone(), shared.clone(), sem.clone(), done_tx.clone());
        let topic = spec.topic.topic(conn);
        let local = source_ip(conn, spec.per_source_ip);
        let ack = spec.ack;
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let opened = tokio::time::timeout(Duration::from_secs(60), async {
                let url = target.ws_url(conn, topic.as_deref())?;
                let mut ws = open_ws(&url, local, target.subprotocol()).await?;
                target.handshake(&mut ws, conn, topic.as_deref()).await?;
                anyhow::Ok(ws)
            })
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("handshake timed out after 60 s")));
            drop(permit);
            match opened {
                Ok(ws) => {
                    shared.open.fetch_add(1, Relaxed);
                    let _ = done.send(None);
                    read_loop(&*target, ws, &shared, ack).await;
                    shared.open.fetch_sub(1, Relaxed);
                    shared.closed.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    let _ = done.send(Some(format!("{e:#}")));
                }
            }
        });
    }
    drop(done_tx);

    let (mut finished, mut failed, mut first_error) = (0usize, 0usize, None::<String>);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while finished < spec.count {
        tokio::select! {
            r = done_rx.recv() => match r {
                Some(err) => {
                    finished += 1;
                    if let Some(e) = err {
                        failed += 1;
                        first_error.get_or_insert(e);
                    }
                }
                None => break,
            },
            _ = tick.tick() => emit(json!({
                "event": "progress",
                "open": shared.open.load(Relaxed),
                "failed": failed,
            })),
        }
    }
    emit(json!({
        "event": "ready",
        "open": shared.open.load(Relaxed),
        "failed": failed,
        "secs": start.elapsed().as_secs_f64(),
        "first_error": first_error,
    }));

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "reset" => {
                shared.reset();
                emit(json!({"event": "reset"}));
            }
            "count" => {
                let mut v = shared.counts();
                v["event"] = "count".into();
                emit(v);
            }
            "report" => {
                let mut v = shared.counts();
                v["event"] = "report".into();
                v["hist"] = json!(hist::to_pairs(&shared.hist.lock().expect("histogram lock")));
                v["ack_hist"] = json!(hist::to_pairs(
                    &shared.ack_hist.lock().expect("histogram lock")
                ));
                emit(v);
            }
            _ => break,
        }
    }
    Ok(())
}

async fn read_loop<T: Target>(target: &T, mut ws: Ws, shared: &Shared, ack: bool) {
    let mut events = Vec::new();
    // Durable message ids seen on this connection (one user per connection).
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(Ok(msg)) = ws.next().await {
        let now = now_ns();
        target.classify(&msg, &mut |incoming| events.push(incoming));
        for incoming in events.drain(..) {
            let (out, is_ack) = match incoming {
                Incoming::Delivery(ts) => {
                    shared.delivery(now, ts);
                    (None, false)
                }
                Incoming::Durable { ts, id } => {
                    // Every copy is acked (a repeat means the first ack was late or lost).
                    let frame = if ack { target.ack(&id, now_ns()) } else { None };
                    if seen.insert(id) {
                        shared.delivery(now, ts);
                    } else {
                        shared.duplicates.fetch_add(1, Relaxed);
                    }
                    let is_ack = frame.is_some();
                    (frame, is_ack)
                }
                Incoming::AckReply { sent_ns, acked, ok } => {
                    shared.acks_confirmed.fetch_add(acked, Relaxed);
                    shared.last_ack_reply_ns.fetch_max(now, Relaxed);
                    if !ok {
                        shared.ack_errors.fetch_add(1, Relaxed);
                    }
                    if let Some(sent) = sent_ns {
                        hist::record(
                            &mut shared.ack_hist.lock().expect("histogram lock"),
                            now.saturating_sub(sent),
                        );
                    }
                    (None, false)
                }
                Incoming::Reply(m) => (Some(m), false),
            };
            if let Some(m) = out {
                if ws.send(m).await.is_err() {
                    return;
                }
                if is_ack {
                    shared.acks_sent.fetch_add(1, Relaxed);
                    shared.last_ack_ns.fetch_max(now_ns(), Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses() {
        assert_eq!(source_ip(0, 0), None);
        assert_eq!(source_ip(24_999, 25_000), None);
        assert_eq!(
            source_ip(25_000, 25_000),
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(
            source_ip(60_001, 25_000),
            Some("127.0.0.3".parse().unwrap())
        );
    }

    #[test]
    fn spread_topics() {
        // 10 000 of 1 000 000: every 100th; 3 of 10: 0, 3, 6.
        assert_eq!(spread_index(0, 10_000, 1_000_000), 0);
        assert_eq!(spread_index(9_999, 10_000, 1_000_000), 999_900);
        assert_eq!(
            (0..3).map(|i| spread_index(i, 3, 10)).collect::<Vec<_>>(),
            vec![0, 3, 6]
        );
        for (among, over) in [
            (3, 10),
            (10_000, 1_000_000),
            (7, 7),
            (1000, 100_000),
            (6, 9),
        ] {
            let watched: Vec<u64> = (0..over)
                .filter_map(|k| watcher_of(k, among, over))
                .collect();
            assert_eq!(watched, (0..among).collect::<Vec<_>>(), "{among} of {over}");
            for i in 0..among {
                assert_eq!(
                    watcher_of(spread_index(i, among, over), among, over),
                    Some(i)
                );
            }
        }
        assert_eq!(watcher_of(1, 3, 10), None);
        assert_eq!(watcher_of(5, 0, 10), None);
        let mode = TopicMode::Spread {
            prefix: "device/".into(),
            suffix: "/telemetry".into(),
            among: 10,
            over: 1000,
        };
        assert_eq!(mode.topic(3).as_deref(), Some("device/300/telemetry"));
    }

    #[test]
    fn topics() {
        assert_eq!(TopicMode::None.topic(3), None);
        assert_eq!(
            TopicMode::PerConnection("room/idle-".into())
                .topic(3)
                .as_deref(),
            Some("room/idle-3")
        );
        assert_eq!(
            TopicMode::Shared("room/bench".into()).topic(3).as_deref(),
            Some("room/bench")
        );
    }
}
