//! The worker process (`herald-bench worker --spec <json>`): holds up to ~15 000 subscriber
//! connections (the per-process open-files limit is 20 000) and talks to the coordinator in
//! JSON lines.
//!
//! stdout (worker → coordinator): `{"event":"progress",…}` every second while connecting, then
//! one `{"event":"ready","open":…,"failed":…,"secs":…,"first_error":…}`; afterwards one answer
//! per command. stdin (coordinator → worker), one command per line: `reset` (zero the delivery
//! counter and histogram), `count` (deliveries so far), `report` (deliveries and the latency
//! histogram as `(value_ns, count)` pairs), `quit`.

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
    socketio::SocketIo, sockudo::Sockudo,
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
}

impl TopicMode {
    fn topic(&self, conn: usize) -> Option<String> {
        match self {
            Self::None => None,
            Self::Shared(t) => Some(t.clone()),
            Self::PerConnection(p) => Some(format!("{p}{conn}")),
        }
    }
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
    // Locked for one `record` per delivery, never across an `.await`.
    hist: Mutex<Histogram<u64>>,
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
        }
    });
    // Do not wait for thousands of connection tasks to be torn down one by one.
    std::process::exit(if result.is_ok() { 0 } else { 1 })
}

async fn run_with<T: Target>(target: Arc<T>, spec: WorkerSpec) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        open: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        untimed: AtomicU64::new(0),
        hist: Mutex::new(hist::new_histogram()),
    });
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<String>>();
    let start = Instant::now();
    for conn in spec.first..spec.first + spec.count {
        let (target, shared, sem, done) =
            (target.clone(), shared.clone(), sem.clone(), done_tx.clone());
        let topic = spec.topic.topic(conn);
        let local = source_ip(conn, spec.per_source_ip);
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let opened = tokio::time::timeout(Duration::from_secs(60), async {
                let url = target.ws_url(conn, topic.as_deref())?;
                let mut ws = open_ws(&url, local).await?;
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
                    read_loop(&*target, ws, &shared).await;
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
        let counts = || {
            json!({
                "open": shared.open.load(Relaxed),
                "closed": shared.closed.load(Relaxed),
                "delivered": shared.delivered.load(Relaxed),
                "untimed": shared.untimed.load(Relaxed),
            })
        };
        match line.trim() {
            "reset" => {
                shared.delivered.store(0, Relaxed);
                shared.untimed.store(0, Relaxed);
                shared.hist.lock().expect("histogram lock").reset();
                emit(json!({"event": "reset"}));
            }
            "count" => {
                let mut v = counts();
                v["event"] = "count".into();
                emit(v);
            }
            "report" => {
                let mut v = counts();
                v["event"] = "report".into();
                v["hist"] = json!(hist::to_pairs(&shared.hist.lock().expect("histogram lock")));
                emit(v);
            }
            _ => break,
        }
    }
    Ok(())
}

async fn read_loop<T: Target>(target: &T, mut ws: Ws, shared: &Shared) {
    let mut replies = Vec::new();
    while let Some(Ok(msg)) = ws.next().await {
        let now = now_ns();
        target.classify(&msg, &mut |incoming| match incoming {
            Incoming::Delivery(ts) => {
                shared.delivered.fetch_add(1, Relaxed);
                match ts {
                    Some(ts) => hist::record(
                        &mut shared.hist.lock().expect("histogram lock"),
                        now.saturating_sub(ts),
                    ),
                    None => {
                        shared.untimed.fetch_add(1, Relaxed);
                    }
                }
            }
            Incoming::Reply(m) => replies.push(m),
        });
        for m in replies.drain(..) {
            if ws.send(m).await.is_err() {
                return;
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
