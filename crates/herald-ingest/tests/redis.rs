//! The Redis source against a real Redis: the shared one on 127.0.0.1:6379 (or
//! `HERALD_TEST_REDIS_URL`), and for the restart test a private `redis-server` on a free port.
//!
//! Seed channel names are fixed, so every test uses random ids, rooms and devices inside them
//! (`websocket:user:u-<ulid>`) and its own election prefix; every source in this process
//! receives every test's messages, so assertions look only at calls carrying the test's own
//! markers.

#![cfg(feature = "redis")]

mod recording;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use herald_ingest::config::RedisSource;
use herald_ingest::map::redis_message_id;
use herald_ingest::redis::{RedisIngest, StartError};
use herald_ingest::{Rejected, Submitted};
use recording::{Recorder, counter, install_metrics, until};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

fn shared_url() -> String {
    std::env::var("HERALD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn ulid() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}

fn source(url: &str, prefix: &str) -> RedisSource {
    RedisSource {
        url: url.to_owned(),
        seed002: true,
        seed001: true,
        election_prefix: prefix.to_owned(),
    }
}

/// A source on the shared Redis under a fresh election prefix.
async fn start(
    recorder: Arc<Recorder>,
    prefix: &str,
) -> Result<(Arc<RedisIngest>, CancellationToken)> {
    let shutdown = CancellationToken::new();
    let ingest = RedisIngest::start(source(&shared_url(), prefix), recorder, shutdown.clone())
        .await
        .context("start the redis source")?;
    Ok((ingest, shutdown))
}

struct Publisher(redis::aio::MultiplexedConnection);

impl Publisher {
    async fn new(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        Ok(Self(client.get_multiplexed_async_connection().await?))
    }

    /// PUBLISH; returns how many subscribers received it.
    async fn publish(&mut self, channel: &str, payload: impl AsRef<[u8]>) -> Result<i64> {
        Ok(redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload.as_ref())
            .query_async(&mut self.0)
            .await?)
    }

    async fn json(&mut self, channel: &str, payload: &Value) -> Result<i64> {
        self.publish(channel, serde_json::to_vec(payload)?).await
    }

    async fn del_prefix(&mut self, prefix: &str) -> Result<()> {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut self.0)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut self.0).await?;
        }
        Ok(())
    }
}

fn rejected() -> u64 {
    counter(
        "herald_ingest_messages_total",
        &[("source", "redis"), ("outcome", "rejected")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_seed_channel_produces_the_documented_request() -> Result<()> {
    let recorder = Recorder::new();
    let prefix = format!("test:{}:", ulid());
    let (_ingest, shutdown) = start(recorder.clone(), &prefix).await?;
    let mut p = Publisher::new(&shared_url()).await?;
    let m = ulid();
    let user = format!("u-{m}");
    let room = format!("chat:r-{m}");
    let device = format!("d-{m}");

    // Seed 002's examples, with a marker in each.
    p.json(
        "websocket:broadcast",
        &json!({"type":"data_update","content":{"entity":"user","action":"create","m":m},
                "timestamp":1732345678,"from":"admin-api"}),
    )
    .await?;
    p.json(
        &format!("websocket:user:{user}"),
        &json!({"type":"chat","content":{"text":"Hello","m":m},"traceId":"t-user"}),
    )
    .await?;
    p.json(
        &format!("websocket:room:{room}"),
        &json!({"type":"room_message","content":{"text":"有新用户加入","m":m},"id":format!("room-{m}")}),
    )
    .await?;
    let notification = serde_json::to_vec(
        &json!({"type":"notification","content":{"title":"系统通知","body":"您的订单已发货","m":m},
                "trace_id":"t-n"}),
    )?;
    let channel = format!("websocket:notification:{user}");
    p.publish(&channel, &notification).await?;
    // Seed 001's telemetry: the payload is the data, as is; text that is not JSON is a string.
    let telemetry = json!({"device_id":device,"tenant_id":"t1","timestamp":1234567890,
                           "data":{"temperature":25.5,"humidity":60}});
    p.json(&format!("ws:device:{device}"), &telemetry).await?;
    p.publish(&format!("ws:device:{device}"), format!("raw {m}"))
        .await?;
    // Not ours: another websocket:* channel, seed 001's interest key channel.
    p.json(
        &format!("websocket:other:{m}"),
        &json!({"type":"x","content":m}),
    )
    .await?;
    p.json(&format!("ws:sub:{device}"), &json!({"m":m})).await?;
    // A last message: once it is in, everything before it was handled.
    p.json(
        &format!("websocket:user:{user}"),
        &json!({"type":"last","content":m}),
    )
    .await?;

    recorder
        .wait("the last message", WAIT, |calls| {
            calls
                .iter()
                .any(|c| c.body["event"] == "last" && c.body["data"] == m)
        })
        .await;
    let calls = recorder.calls_with(&m);
    let bodies: Vec<&Value> = calls.iter().map(|c| &c.body).collect();
    assert!(calls.iter().all(|c| c.source == "redis"));
    let expected = [
        json!({"topic":"broadcast","event":"data_update","durable":false,
               "data":{"entity":"user","action":"create","m":m}}),
        json!({"topic":format!("user/{user}"),"event":"chat","durable":false,
               "data":{"text":"Hello","m":m},"trace_id":"t-user"}),
        json!({"topic":format!("room/{room}"),"event":"room_message","durable":false,
               "data":{"text":"有新用户加入","m":m},"id":format!("room-{m}")}),
        json!({"topic":format!("user/{user}"),"event":"notification","durable":true,
               "data":{"title":"系统通知","body":"您的订单已发货","m":m},"trace_id":"t-n",
               "id":redis_message_id(&channel, &notification)}),
        json!({"topic":format!("device/{device}/telemetry"),"event":"telemetry",
               "durable":false,"data":telemetry}),
        json!({"topic":format!("device/{device}/telemetry"),"event":"telemetry",
               "durable":false,"data":format!("raw {m}")}),
        json!({"topic":format!("user/{user}"),"event":"last","durable":false,"data":m}),
    ];
    assert_eq!(bodies, expected.iter().collect::<Vec<_>>());
    shutdown.cancel();
    p.del_prefix(&prefix).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_counted_and_the_source_goes_on() -> Result<()> {
    install_metrics();
    // The gateway refuses "refuse", is down for "down", and down once for "flaky" — for this
    // test's messages only (every source in this process, and in any other test process on
    // this Redis, receives them).
    let m = ulid();
    let mine = m.clone();
    let flaky_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = flaky_seen.clone();
    let recorder = Recorder::answering(move |body| {
        if body["data"] != mine.as_str() {
            return None;
        }
        match body["event"].as_str() {
            Some("refuse") => Some(Err(Rejected::Invalid("forbidden topic".into()))),
            Some("down") => Some(Err(Rejected::Unavailable("store down".into()))),
            Some("flaky") if !seen.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                Some(Err(Rejected::Unavailable("store down".into())))
            }
            Some("flaky") => Some(Ok(Submitted {
                id: "flaky".into(),
                duplicate: false,
                stored: false,
            })),
            _ => None,
        }
    });
    let prefix = format!("test:{}:", ulid());
    let (ingest, shutdown) = start(recorder.clone(), &prefix).await?;
    let mut p = Publisher::new(&shared_url()).await?;
    let user = format!("websocket:user:u-{m}");

    let rejected_before = rejected();
    p.publish(&user, format!("not json {m}")).await?;
    p.publish(&user, b"[1,2,3]").await?;
    p.json(
        &format!("websocket:room:bad room {m}"),
        &json!({"content":m}),
    )
    .await?;
    p.publish(&format!("ws:device:d-{m}"), [0xffu8, 0xfe, 0x00])
        .await?;
    p.json(&user, &json!({"type":"refuse","content":m})).await?;
    p.json(&user, &json!({"type":"flaky","content":m})).await?;
    p.json(&user, &json!({"type":"after","content":m})).await?;

    // "flaky" twice (refused once, then taken), then the next message.
    let calls = recorder.wait_marker(&m, 4, WAIT).await;
    let events: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.body["event"].as_str())
        .collect();
    assert_eq!(events, ["refuse", "flaky", "flaky", "after"]);
    // 4 malformed + 1 refused: at least those (other tests' sources count theirs).
    assert!(rejected() >= rejected_before + 5, "{}", rejected());
    assert!(
        counter(
            "herald_ingest_messages_total",
            &[("source", "redis"), ("outcome", "retried")]
        ) >= 1
    );

    // A message the gateway never takes: three retries (100 ms, 500 ms, 2 s), then dropped.
    let unavailable_before = counter(
        "herald_ingest_messages_total",
        &[("source", "redis"), ("outcome", "unavailable")],
    );
    let started = Instant::now();
    p.json(&user, &json!({"type":"down","content":m})).await?;
    p.json(&user, &json!({"type":"after down","content":m}))
        .await?;
    recorder
        .wait("the message after the outage", WAIT, |calls| {
            calls
                .iter()
                .any(|c| c.body["event"] == "after down" && c.body["data"] == m)
        })
        .await;
    let downs = recorder
        .calls_with(&m)
        .iter()
        .filter(|c| c.body["event"] == "down")
        .count();
    assert_eq!(downs, 4, "one attempt and three retries");
    assert!(started.elapsed() >= Duration::from_millis(2600));
    assert!(
        counter(
            "herald_ingest_messages_total",
            &[("source", "redis"), ("outcome", "unavailable")]
        ) > unavailable_before
    );
    assert!(ingest.healthy());
    shutdown.cancel();
    p.del_prefix(&prefix).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_deliver_each_message_once() -> Result<()> {
    // Two nodes of one deployment: same election prefix, one store of durable ids.
    let a = Recorder::new();
    let b = a.sharing_store();
    let prefix = format!("test:{}:", ulid());
    let (_na, sa) = start(a.clone(), &prefix).await?;
    let (_nb, sb) = start(b.clone(), &prefix).await?;
    let mut p = Publisher::new(&shared_url()).await?;
    let m = ulid();
    let user = format!("u-{m}");

    let mut expected = Vec::new();
    for i in 0..60 {
        let (channel, content) = match i % 4 {
            0 => (format!("websocket:user:{user}"), json!({"i":i,"m":m})),
            1 => (format!("websocket:room:chat:{m}"), json!({"i":i,"m":m})),
            2 => ("websocket:broadcast".to_owned(), json!({"i":i,"m":m})),
            _ => (format!("ws:device:d-{m}"), json!({"i":i,"m":m})),
        };
        let payload = if channel.starts_with("ws:device:") {
            content.clone()
        } else {
            json!({"type":"e","content":content})
        };
        let receivers = p.json(&channel, &payload).await?;
        assert!(receivers >= 2, "both nodes subscribed: {receivers}");
        expected.push(i);
    }
    // Byte-identical messages (seed 002's data_update without a timestamp), three times.
    let same = json!({"type":"data_update","content":{"entity":"user","same":m}});
    for _ in 0..3 {
        p.json(&format!("websocket:user:{user}"), &same).await?;
    }
    // A durable notification: both nodes submit it, the shared store keeps one. Once both
    // have it, both have handled everything before it.
    p.json(
        &format!("websocket:notification:{user}"),
        &json!({"type":"notification","content":{"last":m}}),
    )
    .await?;
    for r in [&a, &b] {
        r.wait("the notification", WAIT, |calls| {
            calls.iter().any(|c| c.body["data"]["last"] == m)
        })
        .await;
    }

    let all: Vec<Value> = a
        .calls_with(&m)
        .into_iter()
        .chain(b.calls_with(&m))
        .map(|c| c.body)
        .collect();
    let mut numbered: Vec<i64> = all
        .iter()
        .filter_map(|b| b["data"]["i"].as_i64().or(b["data"]["data"]["i"].as_i64()))
        .collect();
    numbered.sort_unstable();
    assert_eq!(numbered, expected, "each ephemeral message exactly once");
    let same_count = all.iter().filter(|b| b["data"]["same"] == m).count();
    assert_eq!(same_count, 3, "identical messages are not swallowed");
    let notifications = all.iter().filter(|b| b["data"]["last"] == m).count();
    assert_eq!(
        notifications, 2,
        "the durable one is submitted by both nodes"
    );
    let won_by_a = a.calls_with(&m).len() - 1;
    let won_by_b = b.calls_with(&m).len() - 1;
    eprintln!("ephemeral messages taken: node a {won_by_a}, node b {won_by_b}");
    sa.cancel();
    sb.cancel();
    p.del_prefix(&prefix).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_notification_is_stored_once_across_nodes() -> Result<()> {
    // Both nodes submit it with the same derived id: the store keeps the first, the other
    // is answered `duplicate`.
    let a = Recorder::new();
    let b = a.sharing_store();
    let prefix = format!("test:{}:", ulid());
    let (_na, sa) = start(a.clone(), &prefix).await?;
    let (_nb, sb) = start(b.clone(), &prefix).await?;
    let mut p = Publisher::new(&shared_url()).await?;
    let m = ulid();
    let channel = format!("websocket:notification:u-{m}");
    let payload = serde_json::to_vec(&json!({"type":"notification","content":{"m":m}}))?;
    p.publish(&channel, &payload).await?;
    let ca = a.wait_marker(&m, 1, WAIT).await;
    let cb = b.wait_marker(&m, 1, WAIT).await;
    let id = redis_message_id(&channel, &payload);
    assert_eq!(ca[0].body["id"], id);
    assert_eq!(cb[0].body["id"], id);
    sa.cancel();
    sb.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_resubscribes_after_a_redis_restart() -> Result<()> {
    let port = free_port()?;
    let url = format!("redis://127.0.0.1:{port}");
    let mut server = Server::start(port).await?;
    let recorder = Recorder::new();
    let shutdown = CancellationToken::new();
    let ingest = RedisIngest::start(source(&url, "r:"), recorder.clone(), shutdown.clone()).await?;
    assert!(ingest.healthy());
    let mut p = Publisher::new(&url).await?;
    p.json("websocket:user:u1", &json!({"type":"before","content":1}))
        .await?;
    recorder.wait_marker("before", 1, WAIT).await;

    server.kill();
    until("the source to notice the outage", WAIT, || {
        !ingest.healthy()
    })
    .await;
    let _server = Server::start(port).await?;
    until("the source to reconnect", WAIT, || ingest.healthy()).await;
    let mut p = Publisher::new(&url).await?;
    let receivers = p
        .json("websocket:user:u1", &json!({"type":"after","content":2}))
        .await?;
    assert_eq!(receivers, 1, "subscribed again");
    recorder.wait_marker("after", 1, WAIT).await;
    shutdown.cancel();
    until("the source to stop", WAIT, || !ingest.healthy()).await;
    Ok(())
}

#[tokio::test]
async fn start_fails_fast() -> Result<()> {
    let port = free_port()?;
    let started = Instant::now();
    let r = RedisIngest::start(
        source(&format!("redis://:secret@127.0.0.1:{port}"), "x:"),
        Recorder::new(),
        CancellationToken::new(),
    )
    .await;
    match r {
        Err(StartError::Connect { url, .. }) => assert!(!url.contains("secret"), "{url}"),
        Err(e) => bail!("wrong error: {e}"),
        Ok(_) => bail!("connected to nothing"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    let mut off = source(&shared_url(), "x:");
    off.seed001 = false;
    off.seed002 = false;
    let r = RedisIngest::start(off, Recorder::new(), CancellationToken::new()).await;
    assert!(matches!(r, Err(StartError::NothingToSubscribe)));
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A private redis-server (killed on drop).
struct Server {
    child: Child,
}

impl Server {
    async fn start(port: u16) -> Result<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-server")?;
        let server = Self { child };
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        loop {
            if Publisher::new(&url).await.is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("redis-server on {port} did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
