//! Topic history and retained values: gapless `seq`, resume with `since` (`recovered:true`
//! with exactly the missed messages, or `recovered:false` beyond the window), the retained
//! value first to new subscribers, and publish order = seq order under concurrent publishers.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::{Value, json};

const RULES: &str = r#"
[[topics]]
pattern = "room/*"
subscribe = "allow"
publish = "allow"
history = { size = 100, ttl = "10m" }
[[topics]]
pattern = "small/*"
subscribe = "allow"
history = { size = 10, ttl = "10m" }
[[topics]]
pattern = "device/*/telemetry"
subscribe = "allow"
retain = true
"#;

/// Subscribe to `topic` with `since` and collect the `n` replayed messages (some may arrive
/// before the reply): the reply and the messages in arrival order.
async fn resume(ws: &mut common::Ws, topic: &str, since: u64, n: usize) -> (Value, Vec<Value>) {
    let id = ws.next_id();
    let (reply, early) = ws
        .request_with_others(json!({"type": "subscribe", "id": id, "topic": topic, "since": since}))
        .await;
    let mut got: Vec<Value> = early
        .into_iter()
        .filter(|f| f["type"] == "message")
        .collect();
    while got.len() < n {
        got.push(ws.recv_message(topic).await);
    }
    (reply, got)
}

/// Subscribe with `since` and expect `recovered:false` at `latest`, with nothing replayed.
async fn expect_not_recovered(ws: &mut common::Ws, topic: &str, since: u64, latest: u64) {
    let (r, early) = resume(ws, topic, since, 0).await;
    assert_eq!(
        (
            r["code"].as_i64(),
            r["recovered"].as_bool(),
            r["seq"].as_u64()
        ),
        (Some(0), Some(false), Some(latest)),
        "{r}"
    );
    assert!(early.is_empty(), "nothing may be replayed: {early:?}");
    ws.expect_no_message(Duration::from_millis(300)).await;
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn resume_gets_exactly_the_missed_messages_in_order() {
    let server = Server::start(RULES).await;
    let mut ws = server.connect_user("fay").await;
    let r = ws.subscribe("room/live").await;
    assert_eq!(
        (r["code"].as_i64(), r["seq"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    server.publish("room/live", "tick", json!({"n": 0})).await;
    let first = ws.recv_message("room/live").await;
    assert_eq!(first["seq"], 1, "{first}");
    ws.close().await;

    // Missed while away: 50 messages.
    for n in 1..=50 {
        server.publish("room/live", "tick", json!({"n": n})).await;
    }
    let mut ws = server.connect_user("fay").await;
    let (reply, got) = resume(&mut ws, "room/live", 1, 50).await;
    assert_eq!(reply["code"], 0, "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["seq"], 51, "{reply}");
    assert_eq!(seqs(&got), (2..=51).collect::<Vec<u64>>());
    let ns: Vec<i64> = got
        .iter()
        .map(|m| m["data"]["n"].as_i64().expect("n"))
        .collect();
    assert_eq!(ns, (1..=50).collect::<Vec<i64>>());
    ws.expect_no_message(Duration::from_millis(300)).await;

    // Live messages continue the sequence.
    server.publish("room/live", "tick", json!({"n": 51})).await;
    assert_eq!(ws.recv_message("room/live").await["seq"], 52);
}

#[tokio::test]
async fn a_gap_older_than_the_history_is_reported_not_hidden() {
    let server = Server::start(RULES).await;
    for n in 1..=30 {
        server.publish("small/t", "tick", json!({"n": n})).await;
    }
    let mut ws = server.connect_user("gus").await;
    expect_not_recovered(&mut ws, "small/t", 5, 30).await;

    // Within the window (the last 10: seq 21..30) it is complete.
    let mut ws2 = server.connect_user("gus").await;
    let (r, got) = resume(&mut ws2, "small/t", 25, 5).await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(seqs(&got), vec![26, 27, 28, 29, 30]);

    // A seq this history never issued (e.g. from before a restart) is a gap too.
    let id = ws2.next_id();
    let r = ws2
        .request(json!({"type": "subscribe", "id": id, "topic": "small/t", "since": 99}))
        .await;
    assert_eq!(r["recovered"], false, "{r}");
}

#[tokio::test]
async fn retained_value_comes_first_then_live_updates() {
    let server = Server::start(RULES).await;
    server
        .publish("device/d-9/telemetry", "telemetry", json!({"t": 20}))
        .await;
    server
        .publish("device/d-9/telemetry", "telemetry", json!({"t": 21}))
        .await;
    let mut ws = server.connect_user("hal").await;
    let (reply, early) = {
        let id = ws.next_id();
        ws.request_with_others(
            json!({"type": "subscribe", "id": id, "topic": "device/d-9/telemetry"}),
        )
        .await
    };
    assert_eq!(reply["code"], 0, "{reply}");
    let retained = match early.into_iter().find(|f| f["type"] == "message") {
        Some(m) => m,
        None => ws.recv_message("device/d-9/telemetry").await,
    };
    assert_eq!(retained["retained"], true, "{retained}");
    assert_eq!(retained["data"]["t"], 21, "the last value: {retained}");
    server
        .publish("device/d-9/telemetry", "telemetry", json!({"t": 22}))
        .await;
    let live = ws.recv_message("device/d-9/telemetry").await;
    assert_eq!(live["data"]["t"], 22);
    assert!(live.get("retained").is_none(), "{live}");

    // snapshot:false skips the retained value.
    let mut ws2 = server.connect_user("hal").await;
    let id = ws2.next_id();
    let r = ws2
        .request(json!({"type": "subscribe", "id": id, "topic": "device/d-9/telemetry", "snapshot": false}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    ws2.expect_no_message(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn concurrent_publishers_yield_gapless_increasing_seq() {
    let server = Server::start(RULES).await;
    let mut ws = server.connect_user("ida").await;
    ws.subscribe("room/busy").await;
    let mut tasks = Vec::new();
    for p in 0..8 {
        let url = server.http_url();
        let key = server.publish_key.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..25 {
                let r = client
                    .post(format!("{url}/api/v1/publish"))
                    .bearer_auth(&key)
                    .json(&json!({"topic": "room/busy", "event": "e", "data": {"p": p, "i": i}}))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(r.status().as_u16(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let mut seqs = Vec::new();
    let mut last_i = [-1i64; 8];
    for _ in 0..200 {
        let m = ws.recv_message("room/busy").await;
        seqs.push(m["seq"].as_u64().expect("seq"));
        // Each publisher's own messages arrive in its publish order.
        let p = m["data"]["p"].as_u64().expect("p") as usize;
        let i = m["data"]["i"].as_i64().expect("i");
        assert!(i > last_i[p], "publisher {p}: {i} after {}", last_i[p]);
        last_i[p] = i;
    }
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_resume_larger_than_the_queue_says_recovered_false_instead_of_dropping() {
    let server = Server::start(&format!("{RULES}\n[limits]\nsend_queue = 8\n")).await;
    for n in 1..=30 {
        server.publish("room/big", "tick", json!({"n": n})).await;
    }
    // 30 missed messages cannot be queued whole on an 8-slot queue: the client is told, and
    // gets none of them rather than a silently truncated run.
    let mut ws = server.connect_user("joe").await;
    expect_not_recovered(&mut ws, "room/big", 0, 30).await;

    // A gap that fits is recovered whole.
    let mut ws = server.connect_user("joe").await;
    let (r, got) = resume(&mut ws, "room/big", 26, 4).await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(seqs(&got), vec![27, 28, 29, 30]);
}
