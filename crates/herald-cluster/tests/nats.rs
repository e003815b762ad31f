//! The NATS backend against a real NATS server with JetStream: `HERALD_TEST_NATS_URL`
//! (default `nats://127.0.0.1:4222`), every test under its own random prefix, its streams
//! deleted afterwards. The restart test runs its own `nats-server` on a free port.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream;
use futures_util::FutureExt as _;
use herald_cluster::nats::NatsCluster;
use herald_cluster::{InterestCounters, Options};
use herald_core::acl::HistoryOptions;
use herald_core::bus::{Bus, BusError, BusSink, ControlEvent, NodeEvent, Presence};
use herald_core::history::{History, Recovery};
use herald_core::hub::{ConnHandle, Hub, Session};
use herald_core::message::{Message, MessageBuilder};
use herald_core::queue::ConnQueue;
use herald_core::topic::Topic;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

fn url() -> String {
    std::env::var("HERALD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn t(s: &str) -> Topic {
    Topic::parse(s).unwrap()
}

fn msg(topic: &str, n: u32) -> Message {
    MessageBuilder::new(t(topic), "e", RawValue::from_string(n.to_string()).unwrap()).build()
}

/// What the bus delivered to one node.
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
    fn data(&self, topic: &str) -> Vec<String> {
        self.messages
            .lock()
            .iter()
            .filter(|m| m.topic.as_str() == topic)
            .map(|m| m.data.get().to_owned())
            .collect()
    }
}

struct Node {
    bus: Arc<NatsCluster>,
    hub: Arc<Hub>,
    sink: Arc<Recorder>,
    token: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

struct Setup {
    url: String,
    prefix: String,
    ttl: Duration,
    linger: Duration,
    interest: Option<InterestCounters>,
}

impl Setup {
    fn new(prefix: &str) -> Self {
        Self {
            url: url(),
            prefix: prefix.to_owned(),
            ttl: Duration::from_secs(15),
            linger: Duration::from_millis(200),
            interest: None,
        }
    }

    fn options(&self, id: &str) -> Options {
        Options {
            url: self.url.clone(),
            node_id: id.to_owned(),
            prefix: self.prefix.clone(),
            presence_ttl: self.ttl,
            linger: self.linger,
            interest: self.interest.clone(),
        }
    }

    async fn node(&self, id: &str) -> anyhow::Result<Node> {
        let hub = Arc::new(Hub::new());
        let token = CancellationToken::new();
        let bus = NatsCluster::connect(self.options(id), hub.clone(), token.clone()).await?;
        hub.set_interest(bus.clone());
        let sink = Arc::new(Recorder::default());
        bus.attach(sink.clone());
        Ok(Node {
            bus,
            hub,
            sink,
            token,
        })
    }
}

impl Node {
    fn connect(&self, user: &str) -> Arc<ConnHandle> {
        let conn = Arc::new(ConnHandle::new(
            self.hub.next_conn_id(),
            user.into(),
            ConnQueue::new(64, Duration::from_secs(5)),
            Session::default(),
        ));
        self.hub.register(conn.clone());
        conn
    }

    /// Subscribes `conn` like the server does: hub first, then wait for the bus.
    async fn subscribe(&self, conn: &Arc<ConnHandle>, topic: &str) -> anyhow::Result<()> {
        self.hub.subscribe(conn, &t(topic), 100);
        self.bus.watching(&t(topic)).await?;
        Ok(())
    }
}

/// Polls `check` until it holds or `within` passes.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn delete_streams(url: &str, prefix: &str) {
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let js = jetstream::new(client);
    keep_anchor(&js).await;
    for s in [
        format!("KV_{prefix}_presence"),
        format!("KV_{prefix}_retained"),
        format!("KV_{prefix}_revocations"),
        format!("KV_{prefix}_interest"),
        format!("{prefix}_history"),
    ] {
        let _ = js.delete_stream(s).await;
    }
}

/// A stream no test deletes. nats-server 2.9 removes the account's stream directory with its
/// last stream, and a stream created by another test at that moment fails ("could not create
/// storage directory", seen on a fresh machine where these tests' streams were the only
/// ones): with this one kept, the directory never empties.
async fn keep_anchor(js: &jetstream::Context) {
    let _ = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "HERALD_TESTS_ANCHOR".into(),
            subjects: vec!["herald.tests.anchor".into()],
            max_messages: 1,
            ..Default::default()
        })
        .await;
}

/// Runs `test` under a fresh prefix on the shared server, then deletes its streams (also when
/// it fails).
async fn isolated<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let prefix = format!("t{}", ulid::Ulid::new());
    let outcome = AssertUnwindSafe(test(prefix.clone())).catch_unwind().await;
    delete_streams(&url(), &prefix).await;
    match outcome {
        Ok(result) => result.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[tokio::test]
async fn messages_reach_only_nodes_with_subscribers() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let (a, b, c) = (s.node("a").await?, s.node("b").await?, s.node("c").await?);
        // `..` would be an empty subject token without the escaping.
        let topic = "device/d..1/telemetry";
        let bob = b.connect("bob");
        b.subscribe(&bob, topic).await?;
        // A subscriber of a topic whose subject token differs only by the escaping.
        let carol = c.connect("carol");
        c.subscribe(&carol, "device/d/telemetry").await?;
        for i in 0..20 {
            a.bus.publish(Arc::new(msg(topic, i))).await?;
        }
        let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        eventually(
            "b gets all 20, in order",
            Duration::from_secs(5),
            || async { b.sink.data(topic).len() >= 20 },
        )
        .await?;
        assert_eq!(b.sink.data(topic), expected);
        // The publisher has no subscriber: nothing comes back to it; c watches another topic.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(a.sink.messages.lock().len(), 0, "a has no subscribers");
        assert_eq!(
            c.sink.messages.lock().len(),
            0,
            "c has no subscribers of it"
        );

        // A node's own subscribers get its publish once, through the bus.
        let alice = a.connect("alice");
        a.subscribe(&alice, topic).await?;
        a.bus.publish(Arc::new(msg(topic, 100))).await?;
        eventually("both get 100", Duration::from_secs(5), || async {
            a.sink.data(topic).len() == 1 && b.sink.data(topic).len() == 21
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            a.sink.data(topic),
            vec!["100"],
            "exactly once on the publisher"
        );
        let frame = a.sink.messages.lock()[0].json_frame().clone();
        assert!(
            frame.starts_with(b"{\"type\":\"message\""),
            "the JSON v1 frame travels"
        );

        // b's last subscriber leaves: after the linger, b is unsubscribed on the bus.
        assert!(b.hub.unsubscribe(&bob, topic));
        tokio::time::sleep(s.linger + Duration::from_millis(400)).await;
        a.bus.publish(Arc::new(msg(topic, 101))).await?;
        eventually("a gets 101", Duration::from_secs(5), || async {
            a.sink.data(topic).len() == 2
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            b.sink.data(topic).len(),
            21,
            "b unsubscribed after the linger"
        );
        assert!(a.bus.healthy() && b.bus.healthy() && c.bus.healthy());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_topic_watched_again_within_the_linger_stays_subscribed() {
    isolated(|p| async move {
        let mut s = Setup::new(&p);
        s.linger = Duration::from_secs(2);
        let (a, b) = (s.node("a").await?, s.node("b").await?);
        let conn = b.connect("bob");
        b.subscribe(&conn, "room/r").await?;
        b.hub.unsubscribe(&conn, "room/r");
        // Within the linger: still subscribed, so watching answers at once.
        b.subscribe(&conn, "room/r").await?;
        a.bus.publish(Arc::new(msg("room/r", 1))).await?;
        eventually("b gets it", Duration::from_secs(5), || async {
            b.sink.data("room/r") == vec!["1"]
        })
        .await
    })
    .await
}

#[tokio::test]
async fn revocations_in_force_are_kept_for_nodes_that_start_later() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let a = s.node("a").await?;
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
        a.bus.control(ended).await?;
        a.bus.control(live.clone()).await?;
        a.bus
            .control(ControlEvent::DisconnectUser { user: "u".into() })
            .await?;
        let b = s.node("b").await?;
        assert_eq!(b.bus.revocations().await?, vec![live]);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn control_and_node_events() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let (a, b, c) = (
            s.node("a").await?,
            s.node("node.b").await?,
            s.node("c").await?,
        );
        let event = ControlEvent::DisconnectUser { user: "u1".into() };
        a.bus.control(event.clone()).await?;
        eventually(
            "every node, the sender included",
            Duration::from_secs(5),
            || async {
                [&a, &b, &c]
                    .iter()
                    .all(|n| n.sink.controls.lock().len() == 1)
            },
        )
        .await?;
        for n in [&a, &b, &c] {
            assert_eq!(n.sink.controls.lock()[0], event);
        }

        let ev = NodeEvent::ToConnection {
            conn: 7,
            frame: bytes::Bytes::from_static(b"{\"type\":\"reply\"}"),
        };
        a.bus.send_to_node("node.b", ev.clone()).await?;
        assert_eq!(
            *b.sink.node_events.lock(),
            vec![ev.clone()],
            "answered: delivered"
        );
        a.bus.send_to_node("a", ev.clone()).await?;
        assert_eq!(*a.sink.node_events.lock(), vec![ev.clone()]);
        assert!(c.sink.node_events.lock().is_empty());
        for ghost in ["ghost", "bad node", ">"] {
            let e = a.bus.send_to_node(ghost, ev.clone()).await.unwrap_err();
            assert_eq!(e, BusError::UnknownNode(ghost.into()));
        }
        // A node that left is unknown too (once its tasks are done: a request racing its
        // shutdown may go unanswered and time out).
        let c_bus = c.bus.clone();
        drop(c);
        // Its tasks are gone when only this test and its hub hold it.
        eventually("c stopped", Duration::from_secs(5), || async {
            Arc::strong_count(&c_bus) == 2
        })
        .await?;
        assert_eq!(
            a.bus.send_to_node("c", ev.clone()).await,
            Err(BusError::UnknownNode("c".into()))
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn presence_sums_over_the_nodes() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let (a, b, c) = (s.node("a").await?, s.node("b").await?, s.node("c").await?);
        let a1 = a.connect("u1");
        let _a2 = a.connect("u1");
        let b1 = b.connect("u1");
        let _b2 = b.connect("u:2/é");
        a.subscribe(&a1, "room/x").await?;
        b.subscribe(&b1, "room/x").await?;
        eventually(
            "u1 has 3 connections, seen from c",
            Duration::from_secs(5),
            || async { c.bus.user_connections("u1").await.ok() == Some(3) },
        )
        .await?;
        assert_eq!(a.bus.user_connections("u1").await?, 3);
        assert_eq!(b.bus.user_connections("u:2/é").await?, 1);
        assert_eq!(c.bus.user_connections("nobody").await?, 0);
        assert_eq!(c.bus.topic_subscribers(&t("room/x")).await?, 2);
        assert_eq!(a.bus.topic_subscribers(&t("room/x")).await?, 2);
        let mut online = c.bus.online().await?;
        online.sort();
        assert_eq!(online, vec![("u1".into(), 3), ("u:2/é".into(), 1)]);
        let mut online = a.bus.online().await?;
        online.sort();
        assert_eq!(online, vec![("u1".into(), 3), ("u:2/é".into(), 1)]);

        // Counts are absolute and follow the hubs.
        b.hub.unregister(&b1);
        eventually("u1 down to 2", Duration::from_secs(5), || async {
            c.bus.user_connections("u1").await.ok() == Some(2)
                && c.bus.topic_subscribers(&t("room/x")).await.ok() == Some(1)
        })
        .await?;
        // A node that shuts down takes its presence along at once.
        drop(a);
        eventually("a's share gone", Duration::from_secs(5), || async {
            c.bus.user_connections("u1").await.ok() == Some(0)
                && c.bus.topic_subscribers(&t("room/x")).await.ok() == Some(0)
        })
        .await?;
        let online = c.bus.online().await?;
        assert_eq!(online, vec![("u:2/é".into(), 1)]);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_crashed_node_disappears_within_the_presence_ttl() {
    isolated(|p| async move {
        let mut s = Setup::new(&p);
        s.ttl = Duration::from_secs(3);
        let a = s.node("a").await?;
        // The node that will crash runs on its own runtime: shutting that runtime down drops
        // its tasks and its connection without any cleanup, as a killed process would.
        let crash = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let options = s.options("doomed");
        let started = crash.spawn(async move {
            let hub = Arc::new(Hub::new());
            let bus = NatsCluster::connect(options, hub.clone(), CancellationToken::new()).await?;
            hub.set_interest(bus.clone());
            let node = Node {
                bus,
                hub,
                sink: Arc::new(Recorder::default()),
                token: CancellationToken::new(),
            };
            let c1 = node.connect("ghost");
            let _c2 = node.connect("ghost");
            node.subscribe(&c1, "room/x").await?;
            // Outlive the test: the runtime is shut down under it.
            std::future::pending::<()>().await;
            anyhow::Ok(())
        });
        eventually(
            "the doomed node's presence",
            Duration::from_secs(5),
            || async {
                a.bus.user_connections("ghost").await.ok() == Some(2)
                    && a.bus.topic_subscribers(&t("room/x")).await.ok() == Some(1)
            },
        )
        .await?;
        // Wait past a refresh so the entries are at most a third of the TTL old.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!started.is_finished(), "the doomed node is running");
        tokio::task::spawn_blocking(move || crash.shutdown_background()).await?;
        let crashed = Instant::now();
        assert_eq!(
            a.bus.user_connections("ghost").await?,
            2,
            "no cleanup ran: the entries stay until they expire"
        );
        eventually(
            "the crashed node's presence expires",
            s.ttl + Duration::from_secs(2),
            || async {
                a.bus.user_connections("ghost").await.ok() == Some(0)
                    && a.bus.topic_subscribers(&t("room/x")).await.ok() == Some(0)
                    && a.bus.online().await.is_ok_and(|o| o.is_empty())
            },
        )
        .await?;
        let gone = crashed.elapsed();
        assert!(
            gone <= s.ttl + Duration::from_millis(500),
            "gone after {gone:?}"
        );
        Ok(())
    })
    .await
}

fn seqs(r: &Recovery) -> Vec<u64> {
    match r {
        Recovery::Complete { messages, .. } => messages.iter().filter_map(|m| m.seq).collect(),
        Recovery::Gap { .. } => panic!("gap"),
    }
}

#[tokio::test]
async fn history_seq_is_gapless_when_nodes_append_at_once() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let nodes = [s.node("a").await?, s.node("b").await?, s.node("c").await?];
        let opts = HistoryOptions {
            size: 1000,
            ttl: Duration::from_secs(60),
        };
        let appends = nodes.iter().enumerate().flat_map(|(n, node)| {
            (0..50).map(move |i| {
                let bus = node.bus.clone();
                async move { bus.append(msg("room/h", (n * 100 + i) as u32), opts).await }
            })
        });
        let appended = futures_util::future::join_all(appends).await;
        let mut seqs_seen = Vec::new();
        for m in appended {
            let m = m?;
            let seq = m.seq.context("seq set")?;
            let frame = std::str::from_utf8(m.json_frame())?;
            ensure!(
                frame.starts_with(&format!("{{\"seq\":{seq},")),
                "frame {frame}"
            );
            seqs_seen.push(seq);
        }
        seqs_seen.sort();
        assert_eq!(
            seqs_seen,
            (1..=150).collect::<Vec<_>>(),
            "each seq exactly once"
        );
        let topic = t("room/h");
        assert_eq!(nodes[1].bus.latest(&topic).await?, 150);
        let all = nodes[2].bus.since(&topic, 0).await?;
        assert_eq!(seqs(&all), (1..=150).collect::<Vec<_>>());
        // Every stored entry decodes with its seq and data.
        if let Recovery::Complete { messages, latest } = all {
            assert_eq!(latest, 150);
            let mut data: Vec<String> = messages.iter().map(|m| m.data.get().to_owned()).collect();
            data.sort();
            data.dedup();
            assert_eq!(data.len(), 150);
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn since_and_latest_follow_the_memory_history() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let (a, b) = (s.node("a").await?, s.node("b").await?);
        let opts = HistoryOptions {
            size: 3,
            ttl: Duration::from_secs(60),
        };
        let topic = t("room/a");
        for i in 1..=5 {
            // Alternate the appending node: the seq is the cluster's.
            let node = if i % 2 == 0 { &a } else { &b };
            let m = node.bus.append(msg("room/a", i), opts).await?;
            assert_eq!(m.seq, Some(i as u64));
        }
        assert_eq!(a.bus.latest(&topic).await?, 5);
        assert_eq!(seqs(&b.bus.since(&topic, 2).await?), vec![3, 4, 5]);
        assert_eq!(seqs(&a.bus.since(&topic, 4).await?), vec![5]);
        assert_eq!(seqs(&a.bus.since(&topic, 5).await?), Vec::<u64>::new());
        assert!(
            matches!(a.bus.since(&topic, 1).await?, Recovery::Gap { latest: 5 }),
            "seq 2 was evicted"
        );
        assert!(
            matches!(a.bus.since(&topic, 9).await?, Recovery::Gap { latest: 5 }),
            "from the future"
        );
        if let Recovery::Complete { messages, .. } = a.bus.since(&topic, 3).await? {
            assert_eq!(messages[0].data.get(), "4");
            assert_eq!(messages[1].data.get(), "5");
        }
        let other = t("room/b");
        assert_eq!(a.bus.latest(&other).await?, 0);
        assert!(matches!(
            a.bus.since(&other, 0).await?,
            Recovery::Complete { latest: 0, .. }
        ));
        assert!(matches!(
            a.bus.since(&other, 3).await?,
            Recovery::Gap { latest: 0 }
        ));

        // Many more appends than `size`: still exactly the last 3 (entries are trimmed on the
        // server in steps, readers never see more).
        for i in 6..=40 {
            a.bus.append(msg("room/a", i), opts).await?;
        }
        assert_eq!(seqs(&b.bus.since(&topic, 37).await?), vec![38, 39, 40]);
        assert!(matches!(
            b.bus.since(&topic, 36).await?,
            Recovery::Gap { latest: 40 }
        ));

        // A message that already had a seq is renumbered, not duplicated.
        let mut with_seq = msg("room/a", 41);
        with_seq.seq = Some(999);
        let m = a.bus.append(with_seq, opts).await?;
        assert_eq!(m.seq, Some(41));
        assert_eq!(
            Message::from_json_frame(m.json_frame())?.seq,
            Some(41),
            "the frame carries the new seq"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn expired_entries_are_a_gap_and_the_seq_survives_them() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let (a, b) = (s.node("a").await?, s.node("b").await?);
        let opts = HistoryOptions {
            size: 10,
            ttl: Duration::from_millis(300),
        };
        let topic = t("room/a");
        a.bus.append(msg("room/a", 1), opts).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.bus.append(msg("room/a", 2), opts).await?;
        assert!(matches!(
            a.bus.since(&topic, 0).await?,
            Recovery::Gap { latest: 2 }
        ));
        assert_eq!(seqs(&a.bus.since(&topic, 1).await?), vec![2]);
        // Everything expired: a resume is a gap, and numbering goes on.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(matches!(
            b.bus.since(&topic, 1).await?,
            Recovery::Gap { latest: 2 }
        ));
        assert!(matches!(
            b.bus.since(&topic, 2).await?,
            Recovery::Complete { latest: 2, .. }
        ));
        assert_eq!(a.bus.latest(&topic).await?, 2);
        let m = b.bus.append(msg("room/a", 3), opts).await?;
        assert_eq!(m.seq, Some(3));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn retained_round_trip() {
    isolated(|p| async move {
        let s = Setup::new(&p);
        let (a, b) = (s.node("a").await?, s.node("b").await?);
        let topic = t("device/d:9/telemetry");
        assert!(b.bus.retained(&topic).await?.is_none());
        a.bus
            .retain(Arc::new(msg("device/d:9/telemetry", 1)))
            .await?;
        let second = Arc::new(msg("device/d:9/telemetry", 2));
        b.bus.retain(second.clone()).await?;
        let kept = a.bus.retained(&topic).await?.context("kept")?;
        assert_eq!(kept.data.get(), "2");
        assert_eq!(kept.id, second.id);
        assert_eq!(kept.json_frame(), second.json_frame());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn interest_counters_hold_the_cluster_wide_count() {
    isolated(|p| async move {
        let mut s = Setup::new(&p);
        s.interest = Some(InterestCounters::new(
            "device/{deviceID}/telemetry",
            "ws:sub:{deviceID}",
            Duration::from_secs(2),
            Duration::from_millis(500),
        )?);
        let (a, b) = (s.node("a").await?, s.node("b").await?);
        let kv = jetstream::new(async_nats::connect(url()).await?)
            .get_key_value(format!("{p}_interest"))
            .await?;
        let value = |key: &'static str| {
            let kv = kv.clone();
            async move {
                kv.get(key)
                    .await
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            }
        };
        let topic = "device/d-1/telemetry";
        let (a1, a2, b1) = (a.connect("u1"), a.connect("u2"), b.connect("u3"));
        // All at once from both nodes: the compare-and-set keeps the last write right.
        let (r1, r2, r3) = tokio::join!(
            a.subscribe(&a1, topic),
            a.subscribe(&a2, topic),
            b.subscribe(&b1, topic)
        );
        r1?;
        r2?;
        r3?;
        eventually("ws.sub.d-1 = 3", Duration::from_secs(5), || async {
            value("ws.sub.d-1").await.as_deref() == Some("3")
        })
        .await?;
        // Past its 2 s TTL: still there, rewritten while watched.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(value("ws.sub.d-1").await.as_deref(), Some("3"));
        // Other topics have no counter.
        let other = a.connect("u4");
        a.subscribe(&other, "device/d-1/status").await?;
        b.hub.unsubscribe(&b1, topic);
        eventually("ws.sub.d-1 = 2", Duration::from_secs(5), || async {
            value("ws.sub.d-1").await.as_deref() == Some("2")
        })
        .await?;
        a.hub.unsubscribe(&a1, topic);
        a.hub.unsubscribe(&a2, topic);
        eventually(
            "ws.sub.d-1 deleted at 0",
            Duration::from_secs(5),
            || async { value("ws.sub.d-1").await.is_none() },
        )
        .await?;
        let mut keys = kv.keys().await?;
        use futures_util::StreamExt as _;
        assert!(keys.next().await.is_none(), "no other counter");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn connecting_to_nothing_fails_fast() {
    let mut s = Setup::new("never");
    s.url = format!("nats://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let e = s.node("a").await.err().expect("no server");
    assert!(e.to_string().contains("bus nats at"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    s.url = url();
    s.prefix = "bad.prefix".into();
    let e = s.node("a").await.err().expect("bad prefix");
    assert!(e.to_string().contains("bus.prefix"), "{e}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// This test's own `nats-server` (never the shared one).
struct Server {
    port: u16,
    child: tokio::process::Child,
}

impl Server {
    async fn start(port: u16, dir: &std::path::Path) -> anyhow::Result<Server> {
        let child = tokio::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("nats-server")?;
        eventually("nats-server listens", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await?;
        Ok(Server { port, child })
    }

    async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

#[tokio::test]
async fn nodes_recover_when_the_server_restarts() {
    let base = std::env::temp_dir().join(format!("herald-nats-{}", ulid::Ulid::new()));
    let port = free_port();
    let server = Server::start(port, &base.join("1")).await.unwrap();
    let mut s = Setup::new("restart");
    s.url = format!("nats://127.0.0.1:{}", server.port);
    let result = async {
        let (a, b) = (s.node("a").await?, s.node("b").await?);
        let topic = "room/r";
        let (alice, bob) = (a.connect("alice"), b.connect("bob"));
        a.subscribe(&alice, topic).await?;
        b.subscribe(&bob, topic).await?;
        let opts = HistoryOptions {
            size: 10,
            ttl: Duration::from_secs(60),
        };
        a.bus.append(msg(topic, 1), opts).await?;
        a.bus.publish(Arc::new(msg(topic, 1))).await?;
        eventually("a and b get 1", Duration::from_secs(5), || async {
            a.sink.data(topic) == vec!["1"] && b.sink.data(topic) == vec!["1"]
        })
        .await?;

        // Down: both notice, local traffic still flows.
        server.kill().await?;
        eventually("unhealthy", Duration::from_secs(5), || async {
            !a.bus.healthy() && !b.bus.healthy()
        })
        .await?;
        a.bus.publish(Arc::new(msg(topic, 2))).await?;
        assert_eq!(a.sink.data(topic), vec!["1", "2"], "delivered on a itself");
        assert!(matches!(
            a.bus
                .control(ControlEvent::DisconnectUser { user: "x".into() })
                .await,
            Err(BusError::Unavailable(_))
        ));
        assert_eq!(a.sink.controls.lock().len(), 1, "applied locally");
        assert!(a.bus.user_connections("bob").await.is_err());
        // A subscriber arriving during the outage is not kept waiting.
        let late = b.connect("late");
        b.subscribe(&late, "room/late").await?;

        // Back with its store: same subscriptions, same history.
        let server = Server::start(port, &base.join("1")).await?;
        eventually("healthy again", Duration::from_secs(10), || async {
            a.bus.healthy() && b.bus.healthy()
        })
        .await?;
        a.bus.publish(Arc::new(msg(topic, 3))).await?;
        a.bus.publish(Arc::new(msg("room/late", 4))).await?;
        eventually(
            "b gets 3 and the late topic",
            Duration::from_secs(5),
            || async {
                b.sink.data(topic) == vec!["1", "3"] && b.sink.data("room/late") == vec!["4"]
            },
        )
        .await?;
        assert_eq!(
            a.bus.append(msg(topic, 5), opts).await?.seq,
            Some(2),
            "history kept"
        );

        // Back without its store: streams are recreated, presence is written again.
        server.kill().await?;
        eventually("unhealthy", Duration::from_secs(5), || async {
            !a.bus.healthy()
        })
        .await?;
        let server = Server::start(port, &base.join("2")).await?;
        eventually("healthy again", Duration::from_secs(10), || async {
            a.bus.healthy() && b.bus.healthy()
        })
        .await?;
        eventually("presence rewritten", Duration::from_secs(10), || async {
            a.bus.user_connections("bob").await.ok() == Some(1)
                && a.bus.topic_subscribers(&t(topic)).await.ok() == Some(2)
        })
        .await?;
        a.bus.publish(Arc::new(msg(topic, 6))).await?;
        eventually("b gets 6", Duration::from_secs(5), || async {
            b.sink.data(topic) == vec!["1", "3", "6"]
        })
        .await?;
        assert_eq!(
            a.bus.append(msg(topic, 7), opts).await?.seq,
            Some(1),
            "a server without its store has no history"
        );
        b.bus.retain(Arc::new(msg(topic, 8))).await?;
        assert!(a.bus.retained(&t(topic)).await?.is_some());
        server.kill().await?;
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&base);
    result.unwrap();
}

#[tokio::test]
async fn a_changed_presence_ttl_updates_the_bucket() {
    isolated(|p| async move {
        let mut s = Setup::new(&p);
        drop(s.node("a").await?);
        s.ttl = Duration::from_secs(5);
        let _a = s.node("a").await?;
        let js = jetstream::new(async_nats::connect(url()).await?);
        let mut stream = js.get_stream(format!("KV_{p}_presence")).await?;
        assert_eq!(stream.info().await?.config.max_age, Duration::from_secs(5));
        Ok(())
    })
    .await
}
