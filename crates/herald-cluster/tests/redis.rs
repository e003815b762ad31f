//! The Redis backend against a real Redis: the shared one on 127.0.0.1:6379 (each test under
//! its own random prefix, its keys deleted at the end), and for the restart test a private
//! `redis-server` on a free port.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use herald_cluster::redis::RedisCluster;
use herald_cluster::{ClusterError, InterestCounters, Options};
use herald_core::acl::HistoryOptions;
use herald_core::bus::{Bus, BusError, BusSink, ControlEvent, NodeEvent, Presence};
use herald_core::history::{History, HistoryError, Recovery};
use herald_core::hub::{ConnHandle, Hub, Session};
use herald_core::message::{Message, MessageBuilder};
use herald_core::queue::ConnQueue;
use herald_core::topic::Topic;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

const SHARED: &str = "redis://127.0.0.1:6379";
const WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Recorder {
    messages: Mutex<Vec<Arc<Message>>>,
    controls: Mutex<Vec<ControlEvent>>,
    node_events: Mutex<Vec<NodeEvent>>,
}

impl BusSink for Recorder {
    fn on_message(&self, msg: Arc<Message>) {
        self.messages.lock().push(msg);
    }
    fn on_control(&self, event: ControlEvent) {
        self.controls.lock().push(event);
    }
    fn on_node_event(&self, event: NodeEvent) {
        self.node_events.lock().push(event);
    }
}

impl Recorder {
    fn count(&self, topic: &str) -> usize {
        self.messages
            .lock()
            .iter()
            .filter(|m| m.topic.as_str() == topic)
            .count()
    }
}

struct Node {
    cluster: Arc<RedisCluster>,
    hub: Arc<Hub>,
    sink: Arc<Recorder>,
    shutdown: CancellationToken,
}

fn options(url: &str, prefix: &str, node: &str) -> Options {
    Options {
        url: url.into(),
        node_id: node.into(),
        prefix: prefix.into(),
        presence_ttl: Duration::from_secs(3),
        linger: Duration::from_millis(200),
        interest: None,
    }
}

async fn node(opts: Options) -> Result<Node> {
    let hub = Arc::new(Hub::new());
    let shutdown = CancellationToken::new();
    let cluster = RedisCluster::connect(opts, hub.clone(), shutdown.clone()).await?;
    hub.set_interest(cluster.clone());
    let sink = Arc::new(Recorder::default());
    cluster.attach(sink.clone());
    Ok(Node {
        cluster,
        hub,
        sink,
        shutdown,
    })
}

impl Node {
    fn connect_user(&self, user: &str) -> Arc<ConnHandle> {
        let c = Arc::new(ConnHandle::new(
            self.hub.next_conn_id(),
            user.into(),
            ConnQueue::new(64, Duration::from_secs(5)),
            Session::default(),
        ));
        self.hub.register(c.clone());
        c
    }

    /// A new connection of `user` subscribed to `topic`, once the bus delivers it here.
    async fn subscriber(&self, user: &str, topic: &str) -> Result<Arc<ConnHandle>> {
        let c = self.connect_user(user);
        let t = Topic::parse(topic)?;
        self.hub.subscribe(&c, &t, 100);
        self.cluster.watching(&t).await?;
        Ok(c)
    }
}

fn msg(topic: &str, data: &str) -> Message {
    MessageBuilder::new(
        Topic::parse(topic).expect("topic"),
        "e",
        RawValue::from_string(data.into()).expect("json"),
    )
    .build()
}

fn prefix() -> String {
    format!("test-{}", ulid::Ulid::new())
}

/// Polls `f` until it holds (the event), failing after `WAIT`.
async fn until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Like [`until`] for an async condition.
async fn until_async<F: Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn raw(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// Deletes every key under `prefix` (and the given extra keys).
async fn cleanup(prefix: &str, extra: &[String]) -> Result<()> {
    let mut c = raw(SHARED).await?;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await?;
    keys.extend(extra.iter().cloned());
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut c)
            .await?;
    }
    Ok(())
}

async fn numsub(c: &mut redis::aio::MultiplexedConnection, channel: &str) -> Result<u64> {
    let r: (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(c)
        .await?;
    Ok(r.1)
}

#[tokio::test]
async fn messages_reach_only_the_nodes_that_watch_the_topic() -> Result<()> {
    let p = prefix();
    let a = node(options(SHARED, &p, "a")).await?;
    let b = node(options(SHARED, &p, "b")).await?;
    let c = node(options(SHARED, &p, "c")).await?;
    let topic = "room/r1";
    let sub = b.subscriber("u1", topic).await?;

    a.cluster.publish(Arc::new(msg(topic, "1"))).await?;
    until("b receives a's message", || b.sink.count(topic) == 1).await?;
    let got = b.sink.messages.lock()[0].clone();
    assert_eq!(got.data.get(), "1");
    // B's own publish comes back once, through its own subscription.
    b.cluster.publish(Arc::new(msg(topic, "2"))).await?;
    until("b receives its own message", || b.sink.count(topic) == 2).await?;

    // Garbage on the channel is dropped; what follows still arrives.
    let mut r = raw(SHARED).await?;
    redis::cmd("PUBLISH")
        .arg(format!("{p}:t:{topic}"))
        .arg("not json")
        .query_async::<u64>(&mut r)
        .await?;
    a.cluster.publish(Arc::new(msg(topic, "3"))).await?;
    until("b receives the message after garbage", || {
        b.sink.count(topic) == 3
    })
    .await?;

    // After the last local subscriber left and the linger ran out, b is off the channel.
    b.hub.unregister(&sub);
    let channel = format!("{p}:t:{topic}");
    until_async("b unsubscribes", WAIT, || {
        let mut r = r.clone();
        let channel = channel.clone();
        async move { numsub(&mut r, &channel).await.ok() == Some(0) }
    })
    .await?;
    a.cluster.publish(Arc::new(msg(topic, "4"))).await?;
    // A negative: give a delivery (sub-millisecond here) ample time not to happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.sink.count(topic),
        3,
        "b receives nothing once unsubscribed"
    );
    assert_eq!(a.sink.messages.lock().len(), 0, "a never had a subscriber");
    assert_eq!(c.sink.messages.lock().len(), 0, "c never had a subscriber");

    for n in [&a, &b, &c] {
        n.shutdown.cancel();
    }
    cleanup(&p, &[]).await
}

#[tokio::test]
async fn control_events_reach_every_node_and_node_events_one() -> Result<()> {
    let p = prefix();
    let a = node(options(SHARED, &p, "a")).await?;
    let b = node(options(SHARED, &p, "b")).await?;
    let c = node(options(SHARED, &p, "c")).await?;
    let ev = ControlEvent::DisconnectUser { user: "u9".into() };
    a.cluster.control(ev.clone()).await?;
    for n in [&a, &b, &c] {
        until("the control event everywhere", || {
            n.sink.controls.lock().as_slice() == [ev.clone()]
        })
        .await?;
    }

    let nev = NodeEvent::ToConnection {
        conn: 42,
        frame: bytes::Bytes::from_static(b"{\"type\":\"reply\"}"),
    };
    a.cluster.send_to_node("b", nev.clone()).await?;
    until("b gets the node event", || {
        b.sink.node_events.lock().as_slice() == [nev.clone()]
    })
    .await?;
    a.cluster.send_to_node("a", nev.clone()).await?;
    assert_eq!(
        a.sink.node_events.lock().as_slice(),
        std::slice::from_ref(&nev)
    );
    assert_eq!(
        a.cluster.send_to_node("ghost", nev.clone()).await,
        Err(BusError::UnknownNode("ghost".into()))
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(c.sink.node_events.lock().is_empty());
    assert_eq!(b.sink.node_events.lock().len(), 1);

    for n in [&a, &b, &c] {
        n.shutdown.cancel();
    }
    cleanup(&p, &[]).await
}

#[tokio::test]
async fn revocations_in_force_are_kept_for_nodes_that_start_later() -> Result<()> {
    let p = prefix();
    let a = node(options(SHARED, &p, "a")).await?;
    let now = herald_core::message::now_secs();
    let live = ControlEvent::Revoke {
        jti: Some("j-1".into()),
        user: None,
        at: now,
        until: Some(now + 3600),
    };
    let ended = ControlEvent::Revoke {
        jti: None,
        user: Some("u1".into()),
        at: now - 100,
        until: Some(now - 1),
    };
    a.cluster.control(ended).await?;
    a.cluster.control(live.clone()).await?;
    // Other control events are not kept.
    a.cluster
        .control(ControlEvent::DisconnectUser { user: "u".into() })
        .await?;
    let b = node(options(SHARED, &p, "b")).await?;
    assert_eq!(b.cluster.revocations().await?, vec![live]);
    for n in [&a, &b] {
        n.shutdown.cancel();
    }
    cleanup(&p, &[]).await
}

/// A node on its own runtime, so that it can die without any cleanup (as a killed process).
struct Doomed {
    die: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

async fn doomed(opts: Options, users: &[&str], topic: &str) -> Result<Doomed> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (die, die_rx) = tokio::sync::oneshot::channel::<()>();
    let users: Vec<String> = users.iter().map(|u| u.to_string()).collect();
    let topic = topic.to_owned();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                return;
            }
        };
        rt.block_on(async move {
            let setup = async {
                let n = node(opts).await?;
                let mut conns = Vec::new();
                for u in &users {
                    conns.push(n.subscriber(u, &topic).await?);
                }
                anyhow::Ok((n, conns))
            };
            match setup.await {
                Ok(kept) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = die_rx.await;
                    // No cancel, no cleanup: the runtime drops every task as it stands.
                    drop(kept);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        rt.shutdown_background();
    });
    ready_rx.await.context("doomed node thread")??;
    Ok(Doomed { die, thread })
}

impl Doomed {
    async fn kill(self) -> Result<()> {
        let _ = self.die.send(());
        tokio::task::spawn_blocking(move || self.thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("doomed node thread panicked"))
    }
}

fn sorted(mut v: Vec<(String, u64)>) -> Vec<(String, u64)> {
    v.sort();
    v
}

#[tokio::test]
async fn presence_sums_over_live_nodes_and_a_dead_node_expires() -> Result<()> {
    let p = prefix();
    let ttl = Duration::from_millis(1500);
    let mut oa = options(SHARED, &p, "a");
    oa.presence_ttl = ttl;
    let mut ob = options(SHARED, &p, "b");
    ob.presence_ttl = ttl;
    let mut od = options(SHARED, &p, "d");
    od.presence_ttl = ttl;
    let a = node(oa).await?;
    let b = node(ob).await?;
    let topic = "room/p";
    let t = Topic::parse(topic)?;
    let _a1 = a.subscriber("u1", topic).await?;
    let _a2 = a.subscriber("u1", topic).await?;
    let _b1 = b.subscriber("u1", topic).await?;
    let _b2 = b.connect_user("u2");

    // Local counts are exact at once; the other node's share arrives with its next batch.
    assert!(a.cluster.user_connections("u1").await? >= 2);
    until_async("u1 has 3 connections seen from a", WAIT, || async {
        a.cluster.user_connections("u1").await.ok() == Some(3)
    })
    .await?;
    until_async("u1 has 3 connections seen from b", WAIT, || async {
        b.cluster.user_connections("u1").await.ok() == Some(3)
    })
    .await?;
    assert_eq!(b.cluster.user_connections("u2").await?, 1);
    until_async("u2 seen from a", WAIT, || async {
        a.cluster.user_connections("u2").await.ok() == Some(1)
    })
    .await?;
    assert_eq!(a.cluster.user_connections("nobody").await?, 0);
    assert_eq!(a.cluster.topic_subscribers(&t).await?, 3);
    assert_eq!(
        sorted(a.cluster.online().await?),
        vec![("u1".into(), 3), ("u2".into(), 1)]
    );

    // A third node that dies without a word: its share is gone within the presence TTL.
    let d = doomed(od, &["u1", "u3"], topic).await?;
    until_async("d's connections seen from a", WAIT, || async {
        a.cluster.user_connections("u1").await.ok() == Some(4)
    })
    .await?;
    // (d's batches may split its two subscribers: wait for the second.)
    until_async("u3 seen from a", WAIT, || async {
        a.cluster.topic_subscribers(&t).await.ok() == Some(5)
    })
    .await?;
    assert_eq!(
        sorted(a.cluster.online().await?),
        vec![("u1".into(), 4), ("u2".into(), 1), ("u3".into(), 1)]
    );
    let killed = tokio::time::Instant::now();
    d.kill().await?;
    until_async("d's share expires", ttl * 2, || async {
        a.cluster.user_connections("u1").await.ok() == Some(3)
    })
    .await?;
    assert!(killed.elapsed() <= ttl + Duration::from_millis(300));
    assert_eq!(a.cluster.topic_subscribers(&t).await?, 3);
    assert_eq!(
        sorted(a.cluster.online().await?),
        vec![("u1".into(), 3), ("u2".into(), 1)]
    );

    // A node that shuts down removes its share at once; a departing connection too.
    a.hub.unregister(&_a2);
    until_async("a's count drops", WAIT, || async {
        b.cluster.user_connections("u1").await.ok() == Some(2)
    })
    .await?;
    b.shutdown.cancel();
    until_async("b's share is gone", Duration::from_millis(1000), || async {
        a.cluster.user_connections("u1").await.ok() == Some(1)
    })
    .await?;
    assert_eq!(a.cluster.online().await?, vec![("u1".into(), 1)]);

    a.shutdown.cancel();
    // The shut-down nodes leave nothing behind (the dead one's keys expire by themselves).
    let mut r = raw(SHARED).await?;
    until_async("a removed its keys", WAIT, || {
        let mut r = r.clone();
        let pat = format!("{p}:node:a:*");
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pat)
                .query_async(&mut r)
                .await
                .unwrap_or_default();
            keys.is_empty()
        }
    })
    .await?;
    let live: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{p}:nodes"))
        .arg(0)
        .arg(-1)
        .query_async(&mut r)
        .await?;
    assert!(!live.contains(&"a".to_string()) && !live.contains(&"b".to_string()));
    cleanup(&p, &[]).await
}

#[tokio::test]
async fn interest_counters_hold_the_cluster_wide_count() -> Result<()> {
    let p = prefix();
    let interest = InterestCounters::new(
        "device/{id}/telemetry",
        &format!("{p}-ws:sub:{{id}}"),
        Duration::from_secs(3),
        Duration::from_millis(300),
    )?;
    let key = format!("{p}-ws:sub:d1");
    let ttl = Duration::from_millis(1500);
    let mk = |n: &str| {
        let mut o = options(SHARED, &p, n);
        o.interest = Some(interest.clone());
        o.presence_ttl = ttl;
        o
    };
    let a = node(mk("a")).await?;
    let b = node(mk("b")).await?;
    let topic = "device/d1/telemetry";
    let mut r = raw(SHARED).await?;
    let get = |r: &redis::aio::MultiplexedConnection| {
        let mut r = r.clone();
        let key = key.clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<u64>>(&mut r)
                .await
                .ok()
                .flatten()
        }
    };
    let a1 = a.subscriber("u1", topic).await?;
    let a2 = a.subscriber("u2", topic).await?;
    let b1 = b.subscriber("u3", topic).await?;
    // Not a counted topic.
    let _other = a.subscriber("u1", "device/d1/status").await?;
    until_async("counter = 3", WAIT, || async { get(&r).await == Some(3) }).await?;
    let pttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut r).await?;
    assert!(pttl > 0 && pttl <= 3000, "pttl {pttl}");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}-ws:sub:*"))
        .query_async(&mut r)
        .await?;
    assert_eq!(keys, vec![key.clone()]);

    // A node that dies: the others' refresh drops its share once its liveness lapses.
    let d = doomed(mk("d"), &["u4", "u5"], topic).await?;
    until_async("counter = 5", WAIT, || async { get(&r).await == Some(5) }).await?;
    d.kill().await?;
    until_async("counter back to 3", ttl * 3, || async {
        get(&r).await == Some(3)
    })
    .await?;

    b.hub.unregister(&b1);
    until_async("counter = 2", WAIT, || async { get(&r).await == Some(2) }).await?;
    a.hub.unregister(&a1);
    a.hub.unregister(&a2);
    until_async("counter deleted at 0", WAIT, || async {
        get(&r).await.is_none()
    })
    .await?;

    // A node shutting down takes its share with it.
    let _b2 = b.subscriber("u6", topic).await?;
    let _a3 = a.subscriber("u7", topic).await?;
    until_async("counter = 2 again", WAIT, || async {
        get(&r).await == Some(2)
    })
    .await?;
    a.shutdown.cancel();
    until_async("counter = 1 after a left", WAIT, || async {
        get(&r).await == Some(1)
    })
    .await?;
    b.shutdown.cancel();
    until_async("counter deleted after b left", WAIT, || async {
        get(&r).await.is_none()
    })
    .await?;
    cleanup(&p, &[key]).await
}

fn seqs(r: &Recovery) -> Vec<u64> {
    match r {
        Recovery::Complete { messages, .. } => messages.iter().filter_map(|m| m.seq).collect(),
        Recovery::Gap { latest } => panic!("gap (latest {latest})"),
    }
}

fn has_seq_in_frame(m: &Message, seq: u64) -> bool {
    let v: serde_json::Value = serde_json::from_slice(m.json_frame()).unwrap_or_default();
    v["seq"] == seq && v["type"] == "message"
}

#[tokio::test]
async fn history_seq_is_gapless_across_concurrent_nodes() -> Result<()> {
    let p = prefix();
    let a = node(options(SHARED, &p, "a")).await?;
    let b = node(options(SHARED, &p, "b")).await?;
    let c = node(options(SHARED, &p, "c")).await?;
    let topic = "room/h";
    let t = Topic::parse(topic)?;
    // A subscriber on c gets every append, in seq order, through the append's own publish.
    let _s = c.subscriber("u", topic).await?;
    let opts = HistoryOptions {
        size: 1000,
        ttl: Duration::from_secs(60),
    };
    let mut tasks = Vec::new();
    for n in [&a, &b, &c] {
        let h = n.cluster.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..50 {
                let m = h.append(msg("room/h", &i.to_string()), opts).await?;
                anyhow::ensure!(m.seq.is_some_and(|s| has_seq_in_frame(&m, s)));
                got.push(m.seq.unwrap_or(0));
            }
            anyhow::Ok(got)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    assert_eq!(all, (1..=150).collect::<Vec<u64>>());
    assert_eq!(a.cluster.latest(&t).await?, 150);
    let r = b.cluster.since(&t, 0).await?;
    assert_eq!(seqs(&r), (1..=150).collect::<Vec<u64>>());
    if let Recovery::Complete { messages, latest } = &r {
        assert_eq!(*latest, 150);
        assert!(
            messages
                .iter()
                .all(|m| has_seq_in_frame(m, m.seq.unwrap_or(0)))
        );
    }
    until("c receives all 150", || c.sink.count(topic) == 150).await?;
    let delivered: Vec<u64> = c
        .sink
        .messages
        .lock()
        .iter()
        .filter_map(|m| m.seq)
        .collect();
    assert_eq!(
        delivered,
        (1..=150).collect::<Vec<u64>>(),
        "delivery order is seq order"
    );
    assert!(a.sink.messages.lock().is_empty() && b.sink.messages.lock().is_empty());
    for n in [&a, &b, &c] {
        n.shutdown.cancel();
    }
    cleanup(&p, &[]).await
}

/// `MemoryHistory`'s own tests, against Redis.
#[tokio::test]
async fn history_resume_semantics_match_memory_history() -> Result<()> {
    let p = prefix();
    let a = node(options(SHARED, &p, "a")).await?;
    let b = node(options(SHARED, &p, "b")).await?;
    let opts = HistoryOptions {
        size: 3,
        ttl: Duration::from_secs(60),
    };
    let t = Topic::parse("room/a")?;
    for i in 1..=5u64 {
        let n = if i % 2 == 0 { &a } else { &b };
        let m = n
            .cluster
            .append(msg("room/a", &i.to_string()), opts)
            .await?;
        assert_eq!(m.seq, Some(i));
    }
    assert_eq!(a.cluster.latest(&t).await?, 5);
    assert_eq!(seqs(&a.cluster.since(&t, 2).await?), vec![3, 4, 5]);
    assert_eq!(seqs(&b.cluster.since(&t, 4).await?), vec![5]);
    assert_eq!(seqs(&a.cluster.since(&t, 5).await?), Vec::<u64>::new());
    let r = a.cluster.since(&t, 2).await?;
    if let Recovery::Complete { messages, latest } = &r {
        assert_eq!(*latest, 5);
        assert_eq!(messages[0].data.get(), "3");
    }
    assert!(
        matches!(a.cluster.since(&t, 1).await?, Recovery::Gap { latest: 5 }),
        "seq 2 was evicted"
    );
    assert!(
        matches!(a.cluster.since(&t, 9).await?, Recovery::Gap { latest: 5 }),
        "from the future"
    );
    let other = Topic::parse("room/b")?;
    assert!(matches!(
        a.cluster.since(&other, 0).await?,
        Recovery::Complete { latest: 0, .. }
    ));
    assert!(matches!(
        a.cluster.since(&other, 3).await?,
        Recovery::Gap { latest: 0 }
    ));
    assert_eq!(a.cluster.latest(&other).await?, 0);

    // TTL: an entry older than the ttl is gone, the seq goes on.
    let short = HistoryOptions {
        size: 10,
        ttl: Duration::from_millis(100),
    };
    let tt = Topic::parse("room/ttl")?;
    a.cluster.append(msg("room/ttl", "1"), short).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.cluster.append(msg("room/ttl", "2"), short).await?;
    assert!(matches!(
        a.cluster.since(&tt, 0).await?,
        Recovery::Gap { latest: 2 }
    ));
    assert_eq!(seqs(&a.cluster.since(&tt, 1).await?), vec![2]);
    // Every entry expired: latest stays, the resume is a gap, the next seq is 3.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(
        a.cluster.since(&tt, 1).await?,
        Recovery::Gap { latest: 2 }
    ));
    assert!(matches!(
        a.cluster.since(&tt, 2).await?,
        Recovery::Complete { latest: 2, .. }
    ));
    assert_eq!(a.cluster.latest(&tt).await?, 2);
    let m = b.cluster.append(msg("room/ttl", "3"), short).await?;
    assert_eq!(m.seq, Some(3));

    // A message that already had a seq gets the topic's, once.
    let mut pre = msg("room/seq", "1");
    pre.seq = Some(77);
    let m = a.cluster.append(pre, opts).await?;
    assert_eq!(m.seq, Some(1));
    assert!(has_seq_in_frame(&m, 1));
    assert_eq!(
        seqs(&b.cluster.since(&Topic::parse("room/seq")?, 0).await?),
        vec![1]
    );

    // Retained: round trip, last one wins, absent is None.
    let rt = Topic::parse("device/d/telemetry")?;
    assert!(a.cluster.retained(&rt).await?.is_none());
    a.cluster
        .retain(Arc::new(msg("device/d/telemetry", "1")))
        .await?;
    b.cluster
        .retain(Arc::new(msg("device/d/telemetry", "{\"v\":2}")))
        .await?;
    let got = a.cluster.retained(&rt).await?.context("retained")?;
    assert_eq!(got.data.get(), "{\"v\":2}");
    assert_eq!(got.topic, rt);

    a.shutdown.cancel();
    b.shutdown.cancel();
    cleanup(&p, &[]).await
}

#[tokio::test]
async fn an_unreachable_server_fails_fast() -> Result<()> {
    let port = free_port()?;
    let started = std::time::Instant::now();
    let r = RedisCluster::connect(
        options(&format!("redis://:secret@127.0.0.1:{port}"), "x", "a"),
        Arc::new(Hub::new()),
        CancellationToken::new(),
    )
    .await;
    match r {
        Err(ClusterError::Connect { url, .. }) => {
            assert!(!url.contains("secret"), "the password is not shown: {url}")
        }
        Err(e) => bail!("wrong error {e}"),
        Ok(_) => bail!("connected to nothing"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Server {
    child: Child,
}

impl Server {
    async fn start(port: u16) -> Result<Self> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-server")?;
        let url = format!("redis://127.0.0.1:{port}");
        until_async("redis-server to accept", WAIT, || {
            let url = url.clone();
            async move { raw(&url).await.is_ok() }
        })
        .await?;
        Ok(Self { child })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn nodes_survive_a_redis_restart() -> Result<()> {
    let port = free_port()?;
    let url = format!("redis://127.0.0.1:{port}");
    let mut server = Server::start(port).await?;
    let p = prefix();
    let a = node(options(&url, &p, "a")).await?;
    let b = node(options(&url, &p, "b")).await?;
    let topic = "room/r";
    let _sub = b.subscriber("u1", topic).await?;
    a.cluster.publish(Arc::new(msg(topic, "1"))).await?;
    until("delivery before the restart", || b.sink.count(topic) == 1).await?;
    assert!(a.cluster.healthy() && b.cluster.healthy());

    server.stop();
    until("both see the outage", || {
        !a.cluster.healthy() && !b.cluster.healthy()
    })
    .await?;
    // Down: publishes still reach this node's own subscribers, control events apply locally
    // (and say 503), history says unavailable, a new subscriber is not kept waiting.
    a.cluster.publish(Arc::new(msg(topic, "\"local\""))).await?;
    assert_eq!(a.sink.count(topic), 1, "delivered locally");
    let ev = ControlEvent::DisconnectUser { user: "x".into() };
    assert!(matches!(
        a.cluster.control(ev.clone()).await,
        Err(BusError::Unavailable(_))
    ));
    assert_eq!(a.sink.controls.lock().as_slice(), [ev]);
    let opts = HistoryOptions {
        size: 10,
        ttl: Duration::from_secs(60),
    };
    assert!(matches!(
        a.cluster.append(msg(topic, "\"h\""), opts).await,
        Err(HistoryError::Unavailable(_))
    ));
    assert!(a.cluster.user_connections("u1").await.is_err());
    let _late = a.subscriber("u2", "room/late").await?;

    let _server = Server::start(port).await?;
    until_async("both reconnect", Duration::from_secs(10), || async {
        a.cluster.healthy() && b.cluster.healthy()
    })
    .await?;
    // Subscriptions are back (b's from before, a's made during the outage)...
    a.cluster.publish(Arc::new(msg(topic, "2"))).await?;
    until("delivery after the restart", || b.sink.count(topic) == 2).await?;
    b.cluster.publish(Arc::new(msg("room/late", "3"))).await?;
    until("a's outage subscription works", || {
        a.sink.count("room/late") == 1
    })
    .await?;
    // ...and presence was rewritten.
    assert_eq!(a.cluster.user_connections("u1").await?, 1);
    assert_eq!(b.cluster.user_connections("u2").await?, 1);
    let m = a.cluster.append(msg(topic, "\"h\""), opts).await?;
    assert_eq!(m.seq, Some(1), "the new server starts empty");
    until("the history message", || b.sink.count(topic) == 3).await?;

    a.shutdown.cancel();
    b.shutdown.cancel();
    Ok(())
}
