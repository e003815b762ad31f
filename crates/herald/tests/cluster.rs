//! Cluster mode (issue 5, SPEC §6): three real `herald serve` processes on one bus — the real
//! Redis (127.0.0.1:6379) and the real NATS (127.0.0.1:4222), each scenario on both — sharing
//! one PostgreSQL schema. Every cluster writes under its own random `bus.prefix`, so tests never
//! see each other's traffic on the shared servers.
//!
//! - `spans_nodes`: a publish through node C reaches a subscriber on node A; a user's tabs on
//!   different nodes each get ephemeral and durable user messages (acked, the store says so);
//!   rooms, client publishes and broadcast span nodes; the user connection limit is
//!   cluster-wide.
//! - `no_bus_traffic_without_subscriber`: messages for a topic only watched on A reach A alone
//!   (`herald_bus_messages_received_total` of B and C does not move); a topic nobody watches
//!   reaches no node; after the last subscriber leaves (and the linger), none either.
//! - `presence_disconnect_replies`: presence, online users and topic subscribers are
//!   cluster-wide; a disconnect or a revocation through B closes connections on A; a command
//!   reply through C reaches the one connection named by `conn_id` on A; an unknown node is
//!   404.
//! - `kill9_node`: after SIGKILL of A, its client reconnects to C and gets the durable messages
//!   published meanwhile; presence and subscriber counts are corrected within the presence
//!   TTL; A started again knows a revocation made while it was down and delivers again.
//! - `kill9_restart_same_id`: A killed and restarted at once under the same node id (a
//!   supervisor): the dead process's presence and subscriber counts still expire within the
//!   presence TTL.
//! - `rolling_restart_behind_nginx`: deploy/nginx/herald.conf in front of the three nodes; each
//!   node in turn gets SIGTERM and is started again on its port while a publisher sends
//!   durable user messages and history messages through nginx and three clients connected
//!   through nginx follow `reconnect`, ack and resume with `since`: no durable message lost,
//!   every history seq received.
//! - `bus_restart`: the test's own redis-server / nats-server is killed and started again on
//!   the same port: the nodes report not ready (and still deliver locally), then ready, and
//!   deliver again across nodes, without a restart of theirs.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::sync::watch;

const REDIS: &str = "redis://127.0.0.1:6379";
const NATS: &str = "nats://127.0.0.1:4222";
/// `bus.presence_ttl` of every test cluster (the minimum allowed).
const PRESENCE_TTL: Duration = Duration::from_secs(3);

/// Topic rules of every node: the defaults for inboxes, broadcast and rooms, `t/**` for plain
/// topics, `feed/*` with history.
const RULES: &str = r#"
[[topics]]
pattern = "user/{sub}/**"
subscribe = "allow"
[[topics]]
pattern = "broadcast"
subscribe = "allow"
[[topics]]
pattern = "room/*"
subscribe = "allow"
publish = "allow"
[[topics]]
pattern = "t/**"
subscribe = "allow"
[[topics]]
pattern = "feed/*"
subscribe = "allow"
history = { size = 1000, ttl = "5m" }
"#;

// ---------------------------------------------------------------------------------------------
// A cluster of three nodes
// ---------------------------------------------------------------------------------------------

struct Cluster {
    /// Nodes `a`, `b`, `c` (dropped, hence killed, before the schema).
    nodes: Vec<Server>,
    _db: PgSchema,
    bus: String,
    prefix: String,
}

impl Drop for Cluster {
    /// Kills the nodes, then removes what they left on the shared bus server (keys, streams
    /// and buckets under the cluster's prefix), best effort.
    fn drop(&mut self) {
        self.nodes.clear();
        if let Err(e) = remove_prefix(&self.bus, &self.prefix) {
            eprintln!("cleanup of {} on {}: {e}", self.prefix, self.bus);
        }
    }
}

/// Deletes every Redis key, or every JetStream stream (KV buckets included), of `prefix`.
fn remove_prefix(bus: &str, prefix: &str) -> Result<(), String> {
    let hostport = bus.split_once("://").map(|(_, r)| r).unwrap_or(bus);
    let (host, port) = hostport.rsplit_once(':').ok_or("no port in the bus url")?;
    if bus.starts_with("redis") {
        let script = "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                      redis.call('DEL', k) n = n + 1 end return n";
        let out = Command::new("redis-cli")
            .args([
                "-h",
                host,
                "-p",
                port,
                "EVAL",
                script,
                "0",
                &format!("{prefix}:*"),
            ])
            .output()
            .map_err(|e| e.to_string())?;
        return if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        };
    }
    let addr = format!("{host}:{port}");
    // A stream no test deletes: nats-server 2.9 removes the account's stream directory with
    // its last stream, and a stream another test creates at that moment fails ("could not
    // create storage directory"). An error here is "already exists".
    let _ = nats_request(
        &addr,
        "$JS.API.STREAM.CREATE.HERALD_TESTS_ANCHOR",
        r#"{"name":"HERALD_TESTS_ANCHOR","subjects":["herald.tests.anchor"],"max_msgs":1}"#,
    );
    let names = nats_request(&addr, "$JS.API.STREAM.NAMES", "{\"offset\":0}")?;
    let names: Value = serde_json::from_str(&names).map_err(|e| e.to_string())?;
    for name in names["streams"].as_array().into_iter().flatten() {
        let name = name.as_str().unwrap_or_default();
        if name.starts_with(&format!("{prefix}_")) || name.starts_with(&format!("KV_{prefix}_")) {
            nats_request(&addr, &format!("$JS.API.STREAM.DELETE.{name}"), "")?;
        }
    }
    Ok(())
}

/// One request/reply on a NATS server, in the plain text protocol: the reply's payload.
fn nats_request(addr: &str, subject: &str, payload: &str) -> Result<String, String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let request = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB _INBOX.cleanup 1\r\n\
         PUB {subject} _INBOX.cleanup {}\r\n{payload}\r\n",
        payload.len()
    );
    writer
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
        if line.starts_with("PING") {
            writer.write_all(b"PONG\r\n").map_err(|e| e.to_string())?;
        } else if line.starts_with("-ERR") {
            return Err(line.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("MSG ") {
            let len: usize = rest
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .ok_or("bad MSG line")?;
            let mut body = vec![0u8; len + 2];
            reader.read_exact(&mut body).map_err(|e| e.to_string())?;
            body.truncate(len);
            return String::from_utf8(body).map_err(|e| e.to_string());
        }
    }
}

impl Cluster {
    /// Three nodes on `bus`, a fresh PostgreSQL schema and a random prefix. `store_extra` goes
    /// into `[store]`; `extra` is more TOML (sections other than server, bus and store).
    async fn start(bus: &str, store_extra: &str, extra: &str) -> Cluster {
        let db = PgSchema::new();
        let keys = Keys::random();
        let prefix = format!("t{}", random_hex(8));
        let config = |id: &str| {
            format!(
                "[server]\nnode_id = \"{id}\"\ndrain_spread = \"300ms\"\nshutdown_grace = \"3s\"\n\
                 [bus]\nurl = \"{bus}\"\nprefix = \"{prefix}\"\npresence_ttl = \"{}s\"\nlinger = \"200ms\"\n\
                 [store]\nurl = \"{}\"\n{store_extra}\n{extra}\n{RULES}",
                PRESENCE_TTL.as_secs(),
                db.url
            )
        };
        let start = |id: &str| Server::builder().keys(&keys).toml(&config(id)).start();
        let (a, b, c) = tokio::join!(start("a"), start("b"), start("c"));
        let cluster = Cluster {
            nodes: vec![a, b, c],
            _db: db,
            bus: bus.to_owned(),
            prefix,
        };
        for n in &cluster.nodes {
            eventually(T, "node ready", || n.is_ready()).await;
        }
        cluster
    }

    fn a(&self) -> &Server {
        &self.nodes[0]
    }
    fn b(&self) -> &Server {
        &self.nodes[1]
    }
    fn c(&self) -> &Server {
        &self.nodes[2]
    }
}

/// The node's `herald_bus_messages_received_total`.
async fn bus_received(node: &Server) -> f64 {
    metric_sum(
        &node.metrics().await,
        "herald_bus_messages_received_total",
        &[],
    )
    .unwrap_or(0.0)
}

async fn inbox(node: &Server, user: &str, status: &str) -> Vec<Value> {
    let (s, v) = node
        .api_get(
            &format!("/api/v1/users/{user}/messages?status={status}&limit=1000"),
            &node.admin_key,
        )
        .await;
    assert_eq!(s, 200, "inbox of {user}: {v}");
    v["messages"].as_array().cloned().unwrap_or_default()
}

fn ids_of(messages: &[Value]) -> BTreeSet<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

/// A durable message to `user` through `node`, with the publisher's own `id`.
async fn publish_durable(node: &Server, user: &str, id: &str, data: Value) {
    let (s, b) = node
        .api_post(
            &format!("/api/v1/users/{user}/messages"),
            &node.publish_key,
            &json!({"id": id, "event": "n", "data": data}),
        )
        .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("pending")), "{b}");
}

async fn ack(ws: &mut Ws, ids: &[&str]) -> Value {
    let rid = ws.next_id();
    let r = ws
        .request(json!({"type": "ack", "id": rid, "ids": ids}))
        .await;
    assert_eq!(r["code"], 0, "ack {ids:?}: {r}");
    r
}

/// Next close code; the stream ending without a close frame is a panic.
async fn close_code(ws: &mut Ws, timeout: Duration) -> u16 {
    ws.expect_close(timeout).await.0
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

async fn spans_nodes(bus: &str) {
    let cluster = Cluster::start(bus, "", "[limits]\nmax_connections_per_user = 2").await;
    let (a, b, c) = (cluster.a(), cluster.b(), cluster.c());

    // A subscriber on A, a publish through C. The subscribe reply means the bus delivers the
    // topic to A, so no waiting is needed.
    let mut amy = a.connect_user("amy").await;
    amy.subscribe_ok("t/x").await;
    let id = c.publish("t/x", "e", json!({"n": 1})).await;
    let m = amy.recv_message("t/x").await;
    assert_eq!(
        (m["id"].as_str(), &m["data"]),
        (Some(id.as_str()), &json!({"n": 1}))
    );

    // A user's tabs on A and B: an ephemeral message to the inbox topic through C…
    let mut tab_a = a.connect_user("ted").await;
    let mut tab_b = b.connect_user("ted").await;
    let id = c.publish("user/ted", "note", json!("to every tab")).await;
    for tab in [&mut tab_a, &mut tab_b] {
        let m = tab.recv_message("user/ted").await;
        assert_eq!(m["id"], id.as_str(), "{m}");
        assert!(m.get("ack").is_none(), "ephemeral: no ack flag: {m}");
    }
    // …and a durable one, stored before the 200, delivered to both, acked once.
    publish_durable(c, "ted", "ted-1", json!({"k": 1})).await;
    for tab in [&mut tab_a, &mut tab_b] {
        let m = tab.recv_message("user/ted").await;
        assert_eq!(
            (m["id"].as_str(), m["ack"].as_bool()),
            (Some("ted-1"), Some(true)),
            "{m}"
        );
    }
    let r = ack(&mut tab_b, &["ted-1"]).await;
    assert_eq!(r["acked"], 1, "{r}");
    // Acked already (through B): nothing changes, and A forgets its retransmission timer.
    let r = ack(&mut tab_a, &["ted-1"]).await;
    assert_eq!(r["acked"], 0, "{r}");
    assert_eq!(
        ids_of(&inbox(a, "ted", "acked").await),
        BTreeSet::from(["ted-1".to_owned()])
    );

    // Rooms: members on A and B, a publish through C, then a client publish from A.
    let mut ron = b.connect_user("ron").await;
    amy.join_room_ok("r1").await;
    ron.join_room_ok("r1").await;
    let (s, body) = c
        .api_post(
            "/api/v1/rooms/r1/messages",
            &c.publish_key,
            &json!({"event": "chat", "data": "hello room"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    for ws in [&mut amy, &mut ron] {
        assert_eq!(ws.recv_message("room/r1").await["data"], "hello room");
    }
    let r = amy.publish("room/r1", "chat", json!("from amy")).await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(amy.recv_message("room/r1").await["data"], "from amy");
    assert_eq!(ron.recv_message("room/r1").await["data"], "from amy");

    // Broadcast through B reaches connections on every node.
    let mut cat = c.connect_user("cat").await;
    let (s, body) = b
        .api_post(
            "/api/v1/broadcast",
            &b.publish_key,
            &json!({"event": "maintenance", "data": {"at": "22:00"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    for ws in [&mut amy, &mut tab_a, &mut tab_b, &mut ron, &mut cat] {
        let m = ws.recv_message("broadcast").await;
        assert_eq!(m["data"]["at"], "22:00", "{m}");
    }

    // The user connection limit (2) counts every node: a third connection through C is
    // closed with 4029, as on one node (tests/limits.rs).
    let token = a.token("lim", 3600, json!({}));
    let lim_a = a.connect_token(&token, "lim").await;
    let _lim_b = b.connect_token(&token, "lim").await;
    c.wait_presence("lim", 2, T).await;
    let mut third = connect(&c.ws_url(), Some(&token))
        .await
        .expect("the upgrade itself succeeds");
    match third.next_frame(T).await {
        Some(Frame::Close(Some((code, _)))) => assert_eq!(code, 4029),
        other => panic!("third connection of lim: want close 4029 first, got {other:?}"),
    }
    c.wait_presence("lim", 2, T).await;
    // One closed on A frees a slot for C.
    lim_a.close().await;
    c.wait_presence("lim", 1, T).await;
    let mut lim_c = c.connect_token(&token, "lim").await;
    lim_c.assert_alive().await;
}

async fn no_bus_traffic_without_subscriber(bus: &str) {
    const N: usize = 20;
    let cluster = Cluster::start(bus, "", "").await;
    let (a, b, c) = (cluster.a(), cluster.b(), cluster.c());
    let mut sub = a.connect_user("watcher").await;
    sub.subscribe_ok("t/watched").await;
    let before = [
        bus_received(a).await,
        bus_received(b).await,
        bus_received(c).await,
    ];

    for n in 0..N {
        c.publish("t/watched", "tick", json!({"n": n})).await;
    }
    // Nobody watches this one anywhere.
    for n in 0..N {
        b.publish("t/nobody", "tick", json!({"n": n})).await;
    }
    for n in 0..N {
        assert_eq!(sub.recv_message("t/watched").await["data"]["n"], n);
    }
    eventually(T, "A counted N bus messages", || async {
        bus_received(a).await >= before[0] + N as f64
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let after = [
        bus_received(a).await,
        bus_received(b).await,
        bus_received(c).await,
    ];
    assert_eq!(
        after,
        [before[0] + N as f64, before[1], before[2]],
        "bus messages received by a, b, c (before: {before:?}): only A watches t/watched, \
         nobody t/nobody"
    );

    // The last subscriber leaves: after the linger, A unsubscribes on the bus and the topic's
    // messages reach no node either. (Each probe publishes one message and allows it 100 ms.)
    sub.unsubscribe_ok("t/watched").await;
    c.wait_subscribers("t/watched", 0).await;
    eventually(T, "A stops receiving t/watched from the bus", || async {
        let n = bus_received(a).await;
        c.publish("t/watched", "probe", json!(null)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        bus_received(a).await == n
    })
    .await;
    let before = [
        bus_received(a).await,
        bus_received(b).await,
        bus_received(c).await,
    ];
    for n in 0..N {
        c.publish("t/watched", "tick", json!({"n": n})).await;
    }
    tokio::time::sleep(QUIET).await;
    let after = [
        bus_received(a).await,
        bus_received(b).await,
        bus_received(c).await,
    ];
    assert_eq!(after, before, "no node watches t/watched any more");
    sub.expect_no_message(QUIET).await;
}

async fn presence_disconnect_replies(bus: &str) {
    let cluster = Cluster::start(bus, "", "").await;
    let (a, b, c) = (cluster.a(), cluster.b(), cluster.c());

    // pat: two tabs on A, one on B.
    let mut pa1 = a.connect_user("pat").await;
    let mut pa2 = a.connect_user("pat").await;
    let mut pb = b.connect_user("pat").await;
    for node in [a, b, c] {
        node.wait_presence("pat", 3, T).await;
    }
    let (s, p) = c.api_get("/api/v1/presence", &c.admin_key).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        (&p["online_users"], &p["connections"], &p["users"]),
        (
            &json!(1),
            &json!(3),
            &json!([{"user": "pat", "connections": 3}])
        ),
        "{p}"
    );
    pa1.subscribe_ok("t/watch").await;
    pb.subscribe_ok("t/watch").await;
    for node in [a, b, c] {
        node.wait_subscribers("t/watch", 2).await;
        node.wait_subscribers("user/pat", 3).await;
    }

    // A command reply through C to the connection on A named by its conn_id: that connection
    // gets it, the user's other tabs do not.
    let conn_id = pa1.welcome.as_ref().unwrap()["conn_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(conn_id.starts_with("c-a-"), "{conn_id}");
    let reply = |conn_id: Option<&str>| {
        let mut body = json!({
            "command": "CALL", "trace_id": "t-1", "user": {"id": "pat"},
            "code": 0, "message": "success", "data": {"call_id": "c9"},
        });
        if let Some(id) = conn_id {
            body["conn_id"] = json!(id);
        }
        body
    };
    let (s, r) = c
        .api_post("/api/v1/replies", &c.publish_key, &reply(Some(&conn_id)))
        .await;
    assert_eq!((s, &r), (200, &json!({"delivered": true})), "{r}");
    let got = pa1.recv_json(T).await;
    assert_eq!(
        got,
        json!({"type": "command_reply", "command": "CALL", "trace_id": "t-1", "code": 0,
               "message": "success", "data": {"call_id": "c9"}})
    );
    pa2.expect_no_message(QUIET).await;
    pb.expect_no_message(QUIET).await;
    // Without conn_id: every connection of the user, on every node.
    let (s, r) = b
        .api_post("/api/v1/replies", &b.publish_key, &reply(None))
        .await;
    assert_eq!(s, 200, "{r}");
    for ws in [&mut pa1, &mut pa2, &mut pb] {
        let got = ws.recv_json(T).await;
        assert_eq!(
            (&got["type"], &got["trace_id"]),
            (&json!("command_reply"), &json!("t-1"))
        );
    }
    // A node nobody runs: 404 (Redis: PUBLISH reached no subscriber of its channel; NATS:
    // the directed request had no responders).
    let (s, r) = c
        .api_post("/api/v1/replies", &c.publish_key, &reply(Some("c-zz-1")))
        .await;
    assert_eq!(s, 404, "{r}");
    assert!(r["message"].as_str().unwrap().contains("c-zz-1"), "{r}");
    pa1.expect_no_message(QUIET).await;

    // Disconnect through B closes the user's connections on A (and B) with 4011.
    let (s, r) = b
        .api_post("/api/v1/users/pat/disconnect", &b.admin_key, &json!({}))
        .await;
    assert_eq!((s, &r["disconnected"]), (200, &json!(3)), "{r}");
    for ws in [&mut pa1, &mut pa2, &mut pb] {
        assert_eq!(close_code(ws, T).await, 4011);
    }
    c.wait_presence("pat", 0, T).await;
    c.wait_subscribers("t/watch", 0).await;

    // A revocation through C closes a connection on A within a second (SPEC §5).
    let mut rev = a.connect_user("rev").await;
    let (s, r) = c
        .api_post("/api/v1/revocations", &c.admin_key, &json!({"user": "rev"}))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(close_code(&mut rev, Duration::from_secs(1)).await, 4011);
}

async fn kill9_node(bus: &str) {
    let mut cluster = Cluster::start(bus, "", "").await;
    // A token of "rv" issued before the revocation below.
    let rv_old = cluster.a().token("rv", 3600, json!({}));
    // kim: one tab on A, one on B, both watching t/k. Nobody acks until the end, so every
    // durable message stays unacked and must be replayed where the A tab reconnects.
    let mut kim_a = cluster.a().connect_user("kim").await;
    let mut kim_b = cluster.b().connect_user("kim").await;
    kim_a.subscribe_ok("t/k").await;
    kim_b.subscribe_ok("t/k").await;
    cluster.c().wait_presence("kim", 2, T).await;
    cluster.c().wait_subscribers("t/k", 2).await;
    publish_durable(cluster.c(), "kim", "kim-1", json!(1)).await;
    for ws in [&mut kim_a, &mut kim_b] {
        assert_eq!(ws.recv_message("user/kim").await["id"], "kim-1");
    }

    cluster.nodes[0].kill9().await;
    let killed = Instant::now();
    assert!(
        kim_a.expect_close_or_end(T).await.is_err(),
        "a SIGKILLed node sends no close frame"
    );
    let (b, c) = (cluster.b(), cluster.c());
    // Published while the A tab is away.
    publish_durable(c, "kim", "kim-2", json!(2)).await;
    publish_durable(b, "kim", "kim-3", json!(3)).await;
    for id in ["kim-2", "kim-3"] {
        assert_eq!(kim_b.recv_message("user/kim").await["id"], id);
    }
    // Revoked while A is down.
    let (s, r) = c
        .api_post("/api/v1/revocations", &c.admin_key, &json!({"user": "rv"}))
        .await;
    assert_eq!(s, 200, "{r}");

    // The A tab reconnects to C: everything unacked is replayed there, oldest first.
    let mut kim_c = c.connect_user("kim").await;
    let mut replayed = Vec::new();
    for _ in 0..3 {
        let m = kim_c.recv_message("user/kim").await;
        assert_eq!(m["ack"], true, "{m}");
        replayed.push(m["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(replayed, ["kim-1", "kim-2", "kim-3"]);
    let r = ack(&mut kim_c, &["kim-1", "kim-2", "kim-3"]).await;
    assert_eq!(r["acked"], 3, "{r}");
    assert_eq!(inbox(b, "kim", "acked").await.len(), 3);

    // The dead node's share of presence and subscriber counts expires with its TTL: kim has
    // B and C, t/k has B.
    let bound = PRESENCE_TTL + Duration::from_secs(2);
    for node in [b, c] {
        eventually(bound, "presence of kim without A's share", || async {
            node.presence("kim").await == 2
        })
        .await;
        eventually(bound, "t/k without A's subscriber", || async {
            node.subscribers("t/k").await == 1
        })
        .await;
    }
    let corrected = killed.elapsed();
    assert!(corrected <= bound, "presence corrected after {corrected:?}");
    eprintln!("kill9_node({bus}): presence corrected {corrected:?} after SIGKILL");

    // A back on its port: it knows the revocation made while it was down, sees the cluster's
    // presence, and delivers both ways again.
    cluster.nodes[0].restart().await;
    let (a, b, c) = (cluster.a(), cluster.b(), cluster.c());
    eventually(T, "restarted A ready", || a.is_ready()).await;
    match connect(&a.ws_url(), Some(&rv_old)).await {
        Err(e) => assert_eq!(e.status, 401, "{e:?}"),
        Ok(mut ws) => panic!(
            "revoked token accepted by the restarted node: {:?}",
            ws.next_frame(T).await
        ),
    }
    a.wait_presence("kim", 2, T).await;
    let mut kim_a = a.connect_user("kim").await;
    kim_a.subscribe_ok("t/k").await;
    kim_c.subscribe_ok("t/k").await;
    b.publish("t/k", "e", json!("after")).await;
    assert_eq!(kim_a.recv_message("t/k").await["data"], "after");
    assert_eq!(kim_c.recv_message("t/k").await["data"], "after");
    c.wait_presence("kim", 3, T).await;
}

/// A node killed and restarted at once under the same id (a supervisor), within the presence
/// TTL of its predecessor's entries: the dead process's counts must still expire.
async fn kill9_restart_same_id(bus: &str) {
    let mut cluster = Cluster::start(bus, "", "").await;
    let mut kim_a = cluster.a().connect_user("kim").await;
    let mut kim_b = cluster.b().connect_user("kim").await;
    kim_a.subscribe_ok("t/k").await;
    kim_b.subscribe_ok("t/k").await;
    cluster.c().wait_presence("kim", 2, T).await;
    cluster.c().wait_subscribers("t/k", 2).await;

    cluster.nodes[0].kill9().await;
    let killed = Instant::now();
    cluster.nodes[0].restart().await;
    let (a, b, c) = (cluster.a(), cluster.b(), cluster.c());
    eventually(T, "restarted A ready", || a.is_ready()).await;
    let bound = PRESENCE_TTL + Duration::from_secs(2);
    for node in [a, b, c] {
        eventually(
            bound,
            "presence of kim without the dead A's share",
            || async { node.presence("kim").await == 1 },
        )
        .await;
        eventually(bound, "t/k without the dead A's subscriber", || async {
            node.subscribers("t/k").await == 1
        })
        .await;
    }
    let corrected = killed.elapsed();
    assert!(corrected <= bound, "presence corrected after {corrected:?}");
    eprintln!("kill9_restart_same_id({bus}): presence corrected {corrected:?} after SIGKILL");
    // The restarted A delivers: its new subscriber gets a publish through C.
    let mut kim_a = a.connect_user("kim").await;
    kim_a.subscribe_ok("t/k").await;
    c.publish("t/k", "e", json!("again")).await;
    assert_eq!(kim_a.recv_message("t/k").await["data"], "again");
    assert_eq!(kim_b.recv_message("t/k").await["data"], "again");
}

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

/// The shipped deploy/nginx/herald.conf, with its upstream node addresses and its listen
/// address replaced; nothing else changes.
fn render_nginx_conf(nodes: &[std::net::SocketAddr], listen_port: u16) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx/herald.conf");
    let shipped = std::fs::read_to_string(&path).expect("read deploy/nginx/herald.conf");
    let mut out = String::new();
    let mut in_upstream = false;
    let mut servers = 0;
    let mut listens = 0;
    for line in shipped.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        if t.starts_with("upstream herald {") {
            in_upstream = true;
        } else if in_upstream && t.starts_with('}') {
            in_upstream = false;
        }
        if in_upstream && t.starts_with("server ") {
            // `server ADDRESS PARAMETERS;`: the address replaced, the parameters kept.
            let params = t["server ".len()..].split_once(' ').map_or(";", |(_, p)| p);
            let addr = nodes
                .get(servers)
                .expect("more upstream servers than nodes");
            out.push_str(&format!("{indent}server {addr} {params}\n"));
            servers += 1;
            continue;
        }
        if t.starts_with("listen ") {
            out.push_str(&format!("{indent}listen 127.0.0.1:{listen_port};\n"));
            listens += 1;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert_eq!(
        servers,
        nodes.len(),
        "the shipped upstream lists {servers} nodes"
    );
    assert_eq!(listens, 1, "the shipped server block has one listen line");
    out
}

/// nginx as a child process (one process, `master_process off`, so a SIGKILL leaves nothing
/// behind), with every path inside its temporary directory.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn binary() -> PathBuf {
        let sbin = PathBuf::from("/usr/sbin/nginx");
        if sbin.exists() {
            sbin
        } else {
            PathBuf::from("nginx")
        }
    }

    async fn start(nodes: &[std::net::SocketAddr]) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        for attempt in 0.. {
            let port = free_port();
            std::fs::write(
                dir.path().join("herald.conf"),
                render_nginx_conf(nodes, port),
            )
            .expect("write herald.conf");
            let main = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 include {d}/herald.conf;\n}}\n"
            );
            std::fs::write(dir.path().join("nginx.conf"), main).expect("write nginx.conf");
            let mut child = Command::new(Nginx::binary())
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nginx (is it installed? .ci/run installs it)");
            let deadline = Instant::now() + T;
            loop {
                if port_open(port).await {
                    return Nginx { child, port, dir };
                }
                if let Some(status) = child.try_wait().expect("try_wait") {
                    let log =
                        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                    // Someone took the port meanwhile: try another.
                    if log.contains("Address already in use") && attempt < 3 {
                        break;
                    }
                    panic!("nginx exited with {status}:\n{log}");
                }
                assert!(Instant::now() < deadline, "nginx did not listen on {port}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!()
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether a new WebSocket connection through nginx is welcomed by node `node_id`.
    async fn welcomed_by(&self, token: &str, node_id: &str) -> bool {
        let Ok(mut ws) = connect(&self.ws_url(), Some(token)).await else {
            return false;
        };
        let welcomed = match ws.next_frame(T).await {
            Some(Frame::Json(w)) => w["type"] == "welcome" && w["node_id"] == node_id,
            _ => false,
        };
        ws.close().await;
        welcomed
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.error_log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- nginx error.log (last 60 lines) ----\n{}\n---- end nginx ----",
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}

/// POST through nginx: the status and body, or the transport error.
async fn post(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let resp = http
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// What happened when, for the report of a failure: client connections, drains, restarts.
#[derive(Clone)]
struct Timeline(Arc<(Instant, Mutex<Vec<String>>)>);

impl Timeline {
    fn new() -> Timeline {
        Timeline(Arc::new((Instant::now(), Mutex::new(Vec::new()))))
    }
    fn log(&self, what: String) {
        let at = self.0.0.elapsed().as_millis();
        self.0.1.lock().unwrap().push(format!("{at:>6} ms  {what}"));
    }
    fn text(&self) -> String {
        self.0.1.lock().unwrap().join("\n")
    }
}

/// What one roaming client saw.
#[derive(Default, Debug)]
struct Seen {
    /// The nodes it was welcomed by, in order.
    nodes: Vec<String>,
    /// Subscribed to the feed at least once.
    subscribed: bool,
    /// Durable message ids received (deduplicated) and those whose ack was answered.
    durable: BTreeSet<String>,
    acked: BTreeSet<String>,
    /// Durable deliveries counted with repeats (retransmissions, replays).
    durable_deliveries: usize,
    /// Feed seqs received, with the publisher's counter of each.
    seqs: BTreeMap<u64, i64>,
    duplicate_seqs: usize,
    /// Feed messages that arrived after a higher seq.
    out_of_order: usize,
    /// Feed messages that arrived before the reply to a resume (the replayed gap).
    replayed: usize,
    resumes: usize,
    /// Close codes and ends of stream.
    ends: Vec<String>,
    connect_failures: usize,
    /// Anything that breaks the contract (a refused resume, a refused ack…).
    errors: Vec<String>,
}

impl Seen {
    /// The highest seq up to which nothing is missing.
    fn contiguous(&self) -> u64 {
        let mut s = 0;
        while self.seqs.contains_key(&(s + 1)) {
            s += 1;
        }
        s
    }
}

/// A client behind nginx for the rolling restart: connects (retrying), subscribes to the feed
/// resuming from what it has, acks every durable message, leaves on `reconnect` after
/// `after_ms` (plus `away` — a slow client), reconnects on a close or a cut, until `stop`.
async fn roam(
    name: &'static str,
    url: String,
    token: String,
    away: Duration,
    seen: Arc<Mutex<Seen>>,
    timeline: Timeline,
    mut stop: watch::Receiver<bool>,
) {
    let mut req = 0u64;
    while !*stop.borrow() {
        let mut ws = match connect(&url, Some(&token)).await {
            Ok(ws) => ws,
            Err(e) => {
                timeline.log(format!("{name}: connect failed: {e:?}"));
                seen.lock().unwrap().connect_failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match ws.next_frame(T).await {
            Some(Frame::Json(w)) if w["type"] == "welcome" => {
                timeline.log(format!("{name}: welcome {}", w["conn_id"]));
                seen.lock()
                    .unwrap()
                    .nodes
                    .push(w["node_id"].as_str().unwrap_or("?").to_owned())
            }
            other => {
                timeline.log(format!("{name}: before welcome: {other:?}"));
                // Reached a node as it began draining: try again.
                seen.lock()
                    .unwrap()
                    .ends
                    .push(format!("before welcome: {other:?}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let since = seen.lock().unwrap().contiguous();
        req += 1;
        let sub_id = format!("s{req}");
        let sub = json!({"type": "subscribe", "id": sub_id, "topic": "feed/x", "since": since});
        if ws.try_send_text(sub.to_string()).await.is_err() {
            continue;
        }
        let mut resumed = false;
        let mut acks: HashMap<String, String> = HashMap::new();
        let mut leave_at: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            let wait = match leave_at {
                Some(t) if Instant::now() >= t => break,
                Some(t) => t - Instant::now(),
                None => Duration::from_millis(200),
            };
            let frame = tokio::select! {
                f = ws.next_frame(wait) => f,
                _ = stop.changed() => break,
            };
            let v = match frame {
                None | Some(Frame::Ping | Frame::Pong) => continue,
                Some(Frame::Json(v)) => v,
                Some(Frame::Close(c)) => {
                    timeline.log(format!("{name}: close {c:?}"));
                    seen.lock().unwrap().ends.push(format!("close {c:?}"));
                    break;
                }
                Some(other) => {
                    timeline.log(format!("{name}: {other:?}"));
                    seen.lock().unwrap().ends.push(format!("{other:?}"));
                    break;
                }
            };
            // An ack to send, decided under the lock and sent after it.
            let mut to_send = None;
            {
                let mut s = seen.lock().unwrap();
                match v["type"].as_str() {
                    Some("message") if v["topic"] == "feed/x" => {
                        let seq = v["seq"].as_u64().unwrap_or(0);
                        if s.seqs.keys().next_back().is_some_and(|&last| seq < last) {
                            s.out_of_order += 1;
                        }
                        if s.seqs
                            .insert(seq, v["data"]["i"].as_i64().unwrap_or(-1))
                            .is_some()
                        {
                            s.duplicate_seqs += 1;
                        }
                        if !resumed {
                            s.replayed += 1;
                        }
                    }
                    Some("message") if v["ack"] == true => {
                        let id = v["id"].as_str().unwrap_or_default().to_owned();
                        s.durable_deliveries += 1;
                        s.durable.insert(id.clone());
                        req += 1;
                        let rid = format!("a{req}");
                        acks.insert(rid.clone(), id.clone());
                        to_send = Some(json!({"type": "ack", "id": rid, "ids": [id]}));
                    }
                    Some("message") => {}
                    Some("reply") if v["id"] == sub_id.as_str() => {
                        resumed = true;
                        s.resumes += 1;
                        s.subscribed = true;
                        if v["code"] != 0 || v["recovered"] != true {
                            s.errors.push(format!("resume since {since}: {v}"));
                        }
                    }
                    Some("reply") => match acks.remove(v["id"].as_str().unwrap_or_default()) {
                        Some(id) if v["code"] == 0 => {
                            s.acked.insert(id);
                        }
                        Some(id) => s.errors.push(format!("ack {id}: {v}")),
                        None => s.errors.push(format!("unexpected reply {v}")),
                    },
                    Some("reconnect") => {
                        timeline.log(format!("{name}: {v}"));
                        let after = Duration::from_millis(v["after_ms"].as_u64().unwrap_or(0));
                        leave_at.get_or_insert(Instant::now() + after);
                    }
                    _ => s.errors.push(format!("unexpected frame {v}")),
                }
            }
            if let Some(frame) = to_send {
                let _ = ws.try_send_text(frame.to_string()).await;
            }
        }
        timeline.log(format!("{name}: leaves"));
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close()).await;
        if !*stop.borrow() {
            tokio::time::sleep(away).await;
        }
    }
}

/// What the publisher sent through nginx.
#[derive(Default, Debug)]
struct Sent {
    /// Durable ids answered 200 (`pending` or, after a retry, `duplicate`).
    durable: BTreeSet<String>,
    /// Feed publishes answered 200: the publisher's counter → seq.
    feed: BTreeMap<i64, u64>,
    /// Answers other than 200 and transport errors, each retried.
    failures: Vec<String>,
}

/// Publishes one durable message to `user` and one feed message every `every`, through nginx,
/// until `stop`; a failed publish is retried with the same body (and durable id).
async fn publisher(
    base: String,
    key: String,
    user: &'static str,
    every: Duration,
    sent: Arc<Mutex<Sent>>,
    stop: watch::Receiver<bool>,
) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut tick = tokio::time::interval(every);
    let mut i = 0i64;
    while !*stop.borrow() {
        tick.tick().await;
        i += 1;
        let jobs = [
            (
                format!("{base}/api/v1/users/{user}/messages"),
                json!({"id": format!("m-{i}"), "event": "n", "data": {"i": i}}),
            ),
            (
                format!("{base}/api/v1/publish"),
                json!({"topic": "feed/x", "event": "tick", "data": {"i": i}}),
            ),
        ];
        for (k, (url, body)) in jobs.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match post(&http, url, &key, body).await {
                    Ok((200, answer)) => {
                        let mut s = sent.lock().unwrap();
                        if k == 0 {
                            s.durable.insert(format!("m-{i}"));
                        } else {
                            s.feed.insert(i, answer["seq"].as_u64().unwrap_or(0));
                        }
                        break;
                    }
                    other => {
                        sent.lock()
                            .unwrap()
                            .failures
                            .push(format!("{url} #{i}: {other:?}"));
                        assert!(Instant::now() < deadline, "publish #{i} kept failing");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }
}

async fn rolling_restart_behind_nginx(bus: &str) {
    const USER: &str = "rol";
    let mut cluster = Cluster::start(bus, "retry_after = \"1s\"\nmax_retries = 10", "").await;
    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.addr).collect();
    let nginx = Nginx::start(&addrs).await;
    let started = Instant::now();
    let timeline = Timeline::new();

    // The shipped config blocks /metrics and proxies the rest.
    let (s, _) = cluster.a().get("/healthz").await;
    assert_eq!(s, 200);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let status = |path: &'static str| {
        let http = http.clone();
        let url = format!("{}{path}", nginx.http_url());
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(status("/readyz").await.ok(), Some(200));
    assert_eq!(status("/metrics").await.ok(), Some(403));

    // Three tabs of one user through nginx (one per node with least_conn); the third one
    // stays away 500 ms before each reconnect, so its resumes must replay what it missed.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut seen = Vec::new();
    let mut clients = Vec::new();
    for k in 0..3 {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        let away = if k == 2 {
            Duration::from_millis(500)
        } else {
            Duration::ZERO
        };
        clients.push(tokio::spawn(roam(
            ["tab0", "tab1", "tab2 (slow)"][k],
            nginx.ws_url(),
            cluster.a().token(USER, 3600, json!({})),
            away,
            s,
            timeline.clone(),
            stop_rx.clone(),
        )));
    }
    eventually(T, "every client subscribed to the feed", || async {
        seen.iter().all(|s| s.lock().unwrap().subscribed)
    })
    .await;
    let first_nodes: BTreeSet<String> = seen
        .iter()
        .map(|s| s.lock().unwrap().nodes[0].clone())
        .collect();

    let sent = Arc::new(Mutex::new(Sent::default()));
    let (pub_stop_tx, pub_stop_rx) = watch::channel(false);
    let publishing = tokio::spawn(publisher(
        nginx.http_url(),
        cluster.a().publish_key.clone(),
        USER,
        Duration::from_millis(20),
        sent.clone(),
        pub_stop_rx,
    ));
    let published = || sent.lock().unwrap().feed.len();
    let progress = |from: usize| {
        let sent = sent.clone();
        async move {
            eventually(T, "the publisher goes on", || {
                let n = sent.lock().unwrap().feed.len();
                async move { n >= from + 15 }
            })
            .await
        }
    };
    progress(0).await;

    // Each node in turn: SIGTERM (drain: reconnect, 1012), exit 0, start again on its port,
    // ready, and the publisher makes progress before the next one.
    let probe_token = cluster.a().token("probe", 3600, json!({}));
    let mut restarts = Vec::new();
    for i in 0..3 {
        let t0 = Instant::now();
        let id = ["a", "b", "c"][i];
        let node = &mut cluster.nodes[i];
        timeline.log(format!("test: SIGTERM {id}"));
        node.signal(libc::SIGTERM);
        let status = node.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "node {i} exit status {status:?}");
        let drained = t0.elapsed();
        timeline.log(format!("test: {id} exited"));
        node.restart().await;
        timeline.log(format!("test: {id} restarted"));
        let node: &Server = node;
        eventually(T, "restarted node ready", || node.is_ready()).await;
        // The runbook (docs/CLUSTER.md): before the next node, wait until nginx sends new
        // connections to this one again (at most its fail_timeout after the restart).
        eventually(T, "nginx routes to the restarted node", || {
            nginx.welcomed_by(&probe_token, id)
        })
        .await;
        timeline.log(format!("test: nginx routes to {id} again"));
        restarts.push((drained, t0.elapsed()));
        progress(published()).await;
    }
    pub_stop_tx.send(true).unwrap();
    publishing.await.expect("publisher");
    let sent = Arc::try_unwrap(sent).unwrap().into_inner().unwrap();
    let last_seq = sent.feed.values().copied().max().unwrap();
    assert_eq!(
        sent.feed.values().copied().collect::<BTreeSet<_>>().len(),
        sent.feed.len(),
        "every feed publish got its own seq"
    );

    // Every client ends with every feed seq 1..=last; the tabs together received and acked
    // every durable message.
    let expected_seqs: BTreeSet<u64> = (1..=last_seq).collect();
    let caught_up = || {
        let durable_ok = {
            let all: Vec<_> = seen.iter().map(|s| s.lock().unwrap()).collect();
            let received: BTreeSet<&String> = all.iter().flat_map(|s| s.durable.iter()).collect();
            let acked: BTreeSet<&String> = all.iter().flat_map(|s| s.acked.iter()).collect();
            sent.durable
                .iter()
                .all(|id| received.contains(id) && acked.contains(id))
        };
        let feed_ok = seen.iter().all(|s| {
            let s = s.lock().unwrap();
            expected_seqs.iter().all(|q| s.seqs.contains_key(q))
        });
        async move { durable_ok && feed_ok }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !caught_up().await {
        if Instant::now() > deadline {
            let a = cluster.a();
            let unacked: Vec<Value> = [
                inbox(a, USER, "pending").await,
                inbox(a, USER, "sent").await,
                inbox(a, USER, "failed").await,
            ]
            .concat();
            for (k, s) in seen.iter().enumerate() {
                let s = s.lock().unwrap();
                let missing: Vec<u64> = expected_seqs
                    .iter()
                    .filter(|q| !s.seqs.contains_key(q))
                    .copied()
                    .collect();
                eprintln!("client {k}: missing seqs {missing:?}; {s:?}");
            }
            eprintln!("timeline:\n{}", timeline.text());
            panic!(
                "clients did not catch up; store not acked: {:?}",
                unacked
                    .iter()
                    .map(|m| (&m["id"], &m["status"]))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(true).unwrap();
    for c in clients {
        c.await.expect("client task");
    }

    // The store agrees: every durable message acked, nothing else left.
    let a = cluster.a();
    eventually(T, "the store has every durable message acked", || async {
        ids_of(&inbox(a, USER, "acked").await) == sent.durable
    })
    .await;
    for status in ["pending", "sent", "failed"] {
        assert_eq!(inbox(a, USER, status).await.len(), 0, "{status}");
    }

    let seen: Vec<Seen> = seen
        .into_iter()
        .map(|s| Arc::try_unwrap(s).unwrap().into_inner().unwrap())
        .collect();
    if seen
        .iter()
        .any(|s| !s.errors.is_empty() || !s.ends.is_empty())
    {
        eprintln!("rolling({bus}) timeline:\n{}", timeline.text());
    }
    for (k, s) in seen.iter().enumerate() {
        assert!(s.errors.is_empty(), "client {k}: {:?}", s.errors);
        // What each seq carried is what the publisher was told.
        for (i, seq) in &sent.feed {
            assert_eq!(s.seqs.get(seq), Some(i), "client {k}: seq {seq}");
        }
        assert!(s.resumes >= 2, "client {k} resumed {} times", s.resumes);
        eprintln!(
            "rolling({bus}) client {k}: nodes {:?}, resumes {}, replayed {}, out of order {}, \
             duplicate seqs {}, durable deliveries {} for {} ids, ends {:?}, connect failures {}",
            s.nodes,
            s.resumes,
            s.replayed,
            s.out_of_order,
            s.duplicate_seqs,
            s.durable_deliveries,
            s.durable.len(),
            s.ends,
            s.connect_failures
        );
    }
    // The slow tab was away while messages were published: its resumes replayed them.
    assert!(
        seen[2].replayed > 0,
        "the slow client's resumes replayed nothing"
    );
    assert!(
        first_nodes.len() >= 2,
        "clients all started on {first_nodes:?}"
    );
    eprintln!(
        "rolling({bus}): {} durable + {} feed messages (last seq {last_seq}), publish retries {} \
         {:?}, restarts (drained, ready) {restarts:?}, total {:?}",
        sent.durable.len(),
        sent.feed.len(),
        sent.failures.len(),
        sent.failures.iter().take(5).collect::<Vec<_>>(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// The bus restarted
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum BusKind {
    Redis,
    Nats,
}

/// The test's own redis-server or nats-server, on a port of its own (never the shared ones).
struct OwnBus {
    kind: BusKind,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnBus {
    async fn start(kind: BusKind) -> OwnBus {
        let mut bus = OwnBus {
            kind,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        bus.spawn().await;
        bus
    }

    async fn spawn(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .expect("log file");
        let mut cmd = match self.kind {
            BusKind::Redis => {
                let mut c = Command::new("redis-server");
                c.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--daemonize", "no", "--dir"])
                .arg(dir);
                c
            }
            BusKind::Nats => {
                let mut c = Command::new("nats-server");
                c.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
                    .arg(dir.join("js"));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn the bus server");
        self.child = Some(child);
        eventually(T, "the bus server listens", || port_open(self.port)).await;
    }

    fn url(&self) -> String {
        match self.kind {
            BusKind::Redis => format!("redis://127.0.0.1:{}", self.port),
            BusKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBus {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("server.log"));
            eprintln!(
                "---- {:?} server log ----\n{}",
                self.kind,
                log.unwrap_or_default()
            );
        }
    }
}

async fn readyz(node: &Server) -> (u16, String) {
    node.get("/readyz").await
}

async fn bus_restart(kind: BusKind) {
    let mut own = OwnBus::start(kind).await;
    let cluster = Cluster::start(&own.url(), "", "").await;
    let (a, b, c) = (cluster.a(), cluster.b(), cluster.c());
    let mut sub = a.connect_user("rita").await;
    sub.subscribe_ok("t/r").await;
    c.publish("t/r", "e", json!("before")).await;
    assert_eq!(sub.recv_message("t/r").await["data"], "before");
    c.wait_presence("rita", 1, T).await;

    let t0 = Instant::now();
    own.kill();
    for node in [a, b, c] {
        eventually(T, "not ready while the bus is down", || async {
            readyz(node).await.0 == 503
        })
        .await;
        let (_, body) = readyz(node).await;
        assert!(body.contains("\"bus\":\"down\""), "{body}");
        // Up for local traffic: the process answers, connections stay.
        assert_eq!(node.get("/healthz").await.0, 200);
    }
    let noticed = t0.elapsed();
    // Local traffic goes on: a publish through A reaches A's subscriber.
    sub.assert_alive().await;
    a.publish("t/r", "e", json!("local")).await;
    assert_eq!(sub.recv_message("t/r").await["data"], "local");

    own.spawn().await;
    let t1 = Instant::now();
    for node in [a, b, c] {
        eventually(Duration::from_secs(15), "ready again", || async {
            readyz(node).await.0 == 200
        })
        .await;
    }
    let recovered = t1.elapsed();
    // Delivering again, on the subscription made before the outage, without any restart.
    c.publish("t/r", "e", json!("after")).await;
    assert_eq!(sub.recv_message("t/r").await["data"], "after");
    // A's presence is written again (the restarted server forgot it).
    c.wait_presence("rita", 1, T).await;
    // New subscriptions work too.
    let mut sam = b.connect_user("sam").await;
    sam.subscribe_ok("t/s").await;
    a.publish("t/s", "e", json!("new")).await;
    assert_eq!(sam.recv_message("t/s").await["data"], "new");
    eprintln!(
        "bus_restart({kind:?}): not ready after {noticed:?}, ready again {recovered:?} after the restart"
    );
}

// ---------------------------------------------------------------------------------------------
// On both buses
// ---------------------------------------------------------------------------------------------

macro_rules! on_both_buses {
    ($($scenario:ident),* $(,)?) => {
        mod redis {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(REDIS).await
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bus_restart() {
                super::bus_restart(BusKind::Redis).await
            }
        }
        mod nats {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(NATS).await
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bus_restart() {
                super::bus_restart(BusKind::Nats).await
            }
        }
    };
}

on_both_buses!(
    spans_nodes,
    no_bus_traffic_without_subscriber,
    presence_disconnect_replies,
    kill9_node,
    kill9_restart_same_id,
    rolling_restart_behind_nginx,
);
