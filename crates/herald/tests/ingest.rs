//! Ingestion through the real binary (SPEC §7): what a backend publishes on seed 002's / seed
//! 001's Redis channels and on NATS subjects reaches WebSocket clients as documented
//! (crates/herald-ingest/src/map.rs). Uses the local Redis and NATS; ids are random per test.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn redis_publish(channel: &str, payload: &Value) {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload.to_string())
        .query_async(&mut c)
        .await
        .unwrap();
}

/// The next `message` frame.
async fn next_message(ws: &mut Ws) -> Value {
    loop {
        let v = ws.recv_json(T).await;
        if v["type"] == "message" {
            return v;
        }
    }
}

#[tokio::test]
async fn seed_redis_channels_reach_clients() {
    let prefix = format!("herald:ingest:t{}:", random_hex(6));
    let server = Server::start(&format!(
        r#"
[ingest.redis]
url = "redis://127.0.0.1:6379"
election_prefix = "{prefix}"

[[topics]]
pattern = "user/{{sub}}/**"
subscribe = "allow"
[[topics]]
pattern = "broadcast"
subscribe = "allow"
[[topics]]
pattern = "room/*"
subscribe = "allow"
[[topics]]
pattern = "device/*/telemetry"
subscribe = "allow"
"#
    ))
    .await;
    let user = format!("u-{}", random_hex(4));
    let room = format!("chat:{}", random_hex(4));
    let device = format!("d-{}", random_hex(4));
    let mut ws = server.connect_user(&user).await;
    ws.subscribe_ok(&format!("room/{room}")).await;
    ws.subscribe_ok(&format!("device/{device}/telemetry")).await;

    // websocket:user:{id} → user/{id}, ephemeral; event = type, data = content.
    redis_publish(
        &format!("websocket:user:{user}"),
        &json!({"type": "chat", "content": {"text": "hi"}, "from": "x", "traceId": "tr-1"}),
    )
    .await;
    let m = next_message(&mut ws).await;
    assert_eq!(m["topic"], format!("user/{user}"), "{m}");
    assert_eq!(m["event"], "chat", "{m}");
    assert_eq!(m["data"], json!({"text": "hi"}), "{m}");
    assert_eq!(m["trace_id"], "tr-1", "{m}");
    assert!(m.get("ack").is_none(), "ephemeral: {m}");

    // websocket:room:{room} → room/{room}.
    redis_publish(
        &format!("websocket:room:{room}"),
        &json!({"type": "chat", "content": "to the room"}),
    )
    .await;
    let m = next_message(&mut ws).await;
    assert_eq!(m["topic"], format!("room/{room}"), "{m}");
    assert_eq!(m["data"], "to the room", "{m}");

    // websocket:broadcast → broadcast.
    redis_publish(
        "websocket:broadcast",
        &json!({"type": "maintenance", "content": {"at": "22:00"}, "id": format!("b-{user}")}),
    )
    .await;
    let m = next_message(&mut ws).await;
    assert_eq!(m["topic"], "broadcast", "{m}");
    assert_eq!(m["event"], "maintenance", "{m}");
    assert_eq!(m["id"], format!("b-{user}"), "{m}");

    // ws:device:{deviceID} → device/{deviceID}/telemetry, the payload as data.
    let payload =
        json!({"device_id": device, "tenant_id": "t1", "timestamp": 1, "data": {"temp": 21.5}});
    redis_publish(&format!("ws:device:{device}"), &payload).await;
    let m = next_message(&mut ws).await;
    assert_eq!(m["topic"], format!("device/{device}/telemetry"), "{m}");
    assert_eq!(m["event"], "telemetry", "{m}");
    assert_eq!(m["data"], payload, "{m}");

    // websocket:notification:{id} → durable: stored, delivered with ack, replayed until acked.
    redis_publish(
        &format!("websocket:notification:{user}"),
        &json!({"type": "notification", "content": {"title": "shipped"}}),
    )
    .await;
    let m = next_message(&mut ws).await;
    assert_eq!(m["topic"], format!("user/{user}"), "{m}");
    assert_eq!(m["ack"], true, "{m}");
    let id = m["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("r-"), "a derived id: {m}");
    ws.close().await;
    let mut again = server.connect_user(&user).await;
    let m = next_message(&mut again).await;
    assert_eq!(m["id"], id.as_str(), "replayed on the next connect: {m}");
    let r = again
        .request(json!({"type": "ack", "id": "a1", "ids": [id]}))
        .await;
    assert_eq!(r["acked"], 1, "{r}");

    // A malformed payload is dropped and counted; the next message still flows.
    redis_publish(&format!("websocket:user:{user}"), &json!("not an object")).await;
    redis_publish(
        &format!("websocket:user:{user}"),
        &json!({"type": "after", "content": 1}),
    )
    .await;
    let m = next_message(&mut again).await;
    assert_eq!(m["event"], "after", "{m}");
}

#[tokio::test]
async fn nats_subjects_carry_publish_requests() {
    let subject = format!("herald.test.{}", random_hex(6));
    let server = Server::start(&format!(
        r#"
[ingest.nats]
url = "nats://127.0.0.1:4222"
subjects = ["{subject}.>"]
"#
    ))
    .await;
    let user = format!("u-{}", random_hex(4));
    let mut ws = server.connect_user(&user).await;
    let nc = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();

    // A publish request, and a user message (durable) with a reply subject.
    nc.publish(
        format!("{subject}.a"),
        json!({"topic": format!("user/{user}"), "event": "e1", "data": 1, "durable": false})
            .to_string()
            .into(),
    )
    .await
    .unwrap();
    let m = next_message(&mut ws).await;
    assert_eq!(
        (m["event"].clone(), m["data"].clone()),
        (json!("e1"), json!(1)),
        "{m}"
    );

    let reply = nc
        .request(
            format!("{subject}.b"),
            json!({"user": user, "event": "n", "data": {"x": 2}, "id": format!("n-{user}")})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(answer["id"], format!("n-{user}"), "{answer}");
    let m = next_message(&mut ws).await;
    assert_eq!(m["ack"], true, "{m}");
    assert_eq!(m["id"], format!("n-{user}"), "{m}");

    // Refused: a clear answer on the reply subject, and the next one still flows.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        nc.request(format!("{subject}.c"), "{\"topic\":\"a//b\"}".into()),
    )
    .await
    .unwrap()
    .unwrap();
    let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(answer["code"], 400, "{answer}");
    nc.publish(
        format!("{subject}.d"),
        json!({"topic": format!("user/{user}"), "event": "e2", "durable": false})
            .to_string()
            .into(),
    )
    .await
    .unwrap();
    let m = next_message(&mut ws).await;
    assert_eq!(m["event"], "e2", "{m}");
}

mod amqp {
    use super::*;
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    const N: usize = 300;

    async fn channel() -> lapin::Channel {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        conn.create_channel().await.unwrap()
    }

    async fn put(ch: &lapin::Channel, queue: &str, body: &Value) {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    /// Ready messages in `queue` (passive declare).
    async fn ready(ch: &lapin::Channel, queue: &str) -> u32 {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
    }

    #[tokio::test]
    async fn queue_messages_reach_clients_poison_is_dead_lettered_and_a_kill_loses_nothing() {
        let db = PgSchema::new();
        let queue = format!("herald.test.{}", random_hex(6));
        let dlx = format!("{queue}.dlx");
        let config = format!(
            r#"
[store]
url = "{}"
[ingest.amqp]
url = "{URL}"
prefetch = 16
dead_letter_exchange = "{dlx}"
[[ingest.amqp.queues]]
name = "{queue}"
"#,
            db.url
        );
        let mut server = Server::builder().toml(&config).start().await;
        let ch = channel().await;
        let user = format!("u-{}", random_hex(4));
        let mut ws = server.connect_user(&user).await;

        // A publish request and a user message reach the client.
        put(
            &ch,
            &queue,
            &json!({"topic": format!("user/{user}"), "event": "e1", "data": 1, "durable": false}),
        )
        .await;
        let m = next_message(&mut ws).await;
        assert_eq!(m["event"], "e1", "{m}");
        put(
            &ch,
            &queue,
            &json!({"user": user, "event": "n", "data": {"k": 1}, "id": format!("m-{user}-0")}),
        )
        .await;
        let m = next_message(&mut ws).await;
        assert_eq!(
            (m["id"].clone(), m["ack"].clone()),
            (json!(format!("m-{user}-0")), json!(true)),
            "{m}"
        );

        // Poison: not JSON, and a refused topic → the dead-letter queue; the next flows.
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"not json",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        put(&ch, &queue, &json!({"topic": "a//b", "event": "x"})).await;
        put(
            &ch,
            &queue,
            &json!({"topic": format!("user/{user}"), "event": "after", "durable": false}),
        )
        .await;
        let m = next_message(&mut ws).await;
        assert_eq!(m["event"], "after", "{m}");
        let dead = format!("{dlx}.queue");
        eventually(T, "both poison messages dead-lettered", || async {
            ready(&ch, &dead).await == 2
        })
        .await;
        ws.close().await;

        // 300 durable messages on the queue, the gateway killed -9 while it takes them (as
        // soon as the first is delivered: the broker still holds most of them, some are
        // unacknowledged in the gateway), then started again: every message stored exactly
        // once, none lost.
        let mut watcher = server.connect_user(&user).await;
        for i in 1..=N {
            put(
                &ch,
                &queue,
                &json!({"user": user, "event": "n", "data": i, "id": format!("m-{user}-{i}")}),
            )
            .await;
        }
        loop {
            let m = next_message(&mut watcher).await;
            if m["id"]
                .as_str()
                .is_some_and(|id| id != format!("m-{user}-0"))
            {
                break;
            }
        }
        server.kill9().await;
        let left = ready(&ch, &queue).await;
        assert!(
            left > 0,
            "the kill came after the queue drained: nothing was tested"
        );
        server.restart().await;
        eventually(
            Duration::from_secs(20),
            "the queue drained after the restart",
            || async { ready(&ch, &queue).await == 0 },
        )
        .await;
        let mut seen = std::collections::BTreeSet::new();
        let mut ws = server.connect_user(&user).await;
        // Acking as they come: the replay at connect is bounded, the rest follows on reconnects.
        for _ in 0..5 {
            loop {
                let v =
                    match tokio::time::timeout(Duration::from_millis(500), ws.recv_json(T)).await {
                        Ok(v) => v,
                        Err(_) => break,
                    };
                if v["type"] == "message" {
                    let id = v["id"].as_str().unwrap().to_owned();
                    ws.send_json(&json!({"type": "ack", "ids": [id]})).await;
                    seen.insert(id);
                }
            }
            if seen.len() >= N {
                break;
            }
            ws.close().await;
            ws = server.connect_user(&user).await;
        }
        let expected: std::collections::BTreeSet<String> =
            (1..=N).map(|i| format!("m-{user}-{i}")).collect();
        assert!(
            expected.is_subset(&seen),
            "missing: {:?}",
            expected.difference(&seen).collect::<Vec<_>>()
        );
        let (s, body) = server
            .api_get(
                &format!("/api/v1/users/{user}/messages?limit=1000"),
                &server.admin_key,
            )
            .await;
        assert_eq!(s, 200, "{body}");
        let rows = body["messages"].as_array().unwrap();
        let ids: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
        let unique: std::collections::BTreeSet<&str> = ids.iter().copied().collect();
        assert_eq!(ids.len(), unique.len(), "one row per id");
        assert_eq!(ids.len(), N + 1, "the earlier user message and the {N}");

        for q in [queue.as_str(), dead.as_str()] {
            let _ = ch
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(dlx.as_str().into(), Default::default())
            .await;
    }
}
