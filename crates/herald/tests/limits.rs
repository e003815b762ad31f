//! Required test 5: rate and count limits (subscribes/s, client publishes/min, subscriptions
//! per connection, connections per user, API ingest/s).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Sends all `reqs` at once, then collects the reply to each (in request order).
async fn pipeline(ws: &mut Ws, reqs: Vec<Value>) -> Vec<Value> {
    let ids: Vec<Value> = reqs.iter().map(|r| r["id"].clone()).collect();
    for r in &reqs {
        ws.send_json(r).await;
    }
    let mut replies: Vec<Option<Value>> = vec![None; ids.len()];
    let mut missing = ids.len();
    while missing > 0 {
        let v = ws.recv_json(T).await;
        if v["type"] != "reply" {
            continue;
        }
        let i = ids
            .iter()
            .position(|id| *id == v["id"])
            .unwrap_or_else(|| panic!("reply with unknown id: {v}"));
        assert!(replies[i].is_none(), "two replies for {}", ids[i]);
        replies[i] = Some(v);
        missing -= 1;
    }
    replies.into_iter().map(Option::unwrap).collect()
}

fn codes(replies: &[Value]) -> Vec<i64> {
    replies
        .iter()
        .map(|r| r["code"].as_i64().unwrap_or(-1))
        .collect()
}

#[tokio::test]
async fn subscribe_flood_gets_429_and_a_batch_counts_once() {
    let server = Server::start("").await;
    let mut ws = server.connect_user("u1").await;

    // One request with 20 topics counts as one subscribe (default 10/s per user).
    let topics: Vec<String> = (0..20).map(|i| format!("room/batch-{i}")).collect();
    let r = ws
        .request(json!({"type": "subscribe", "id": "batch", "topics": topics}))
        .await;
    assert_eq!(r["code"], 0, "batch of 20 topics in one request: {r}");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(|x| x["code"] == 0), "{r}");

    // 30 subscribe requests at once: about 10 pass, the rest are 429.
    let reqs = (0..30)
        .map(|i| json!({"type": "subscribe", "id": format!("s{i}"), "topic": format!("room/flood-{i}")}))
        .collect();
    let replies = pipeline(&mut ws, reqs).await;
    let c = codes(&replies);
    let ok = c.iter().filter(|&&c| c == 0).count();
    let limited = c.iter().filter(|&&c| c == 429).count();
    assert_eq!(ok + limited, 30, "only 0 and 429 expected: {c:?}");
    assert!(
        (8..=20).contains(&ok),
        "{ok} of 30 passed (10/s per user): {c:?}"
    );
    assert!(limited >= 10, "{limited} of 30 limited: {c:?}");

    ws.assert_alive().await;
}

#[tokio::test]
async fn subscribe_rate_is_per_user_and_configurable() {
    let server = Server::start(
        r#"
[limits]
subscribes_per_second = 2
"#,
    )
    .await;
    let mut a1 = server.connect_user("u1").await;
    let mut a2 = server.connect_user("u1").await;
    let mut b = server.connect_user("u2").await;

    let reqs = (0..6)
        .map(|i| json!({"type": "subscribe", "id": format!("s{i}"), "topic": format!("room/r{i}")}))
        .collect();
    let c = codes(&pipeline(&mut a1, reqs).await);
    let ok = c.iter().filter(|&&c| c == 0).count();
    assert!((1..=3).contains(&ok), "2/s: {c:?}");
    assert!(c.iter().all(|&c| c == 0 || c == 429), "{c:?}");
    // Same user, other connection: the budget is shared.
    assert_eq!(a2.subscribe("room/x").await["code"], 429, "per-user budget");
    // Another user has its own.
    b.subscribe_ok("room/x").await;
}

#[tokio::test]
async fn client_publish_flood_gets_429() {
    let server = Server::start("").await;
    let mut publisher = server.connect_user("pub").await;
    let mut listener = server.connect_user("listener").await;
    listener.join_room_ok("flood").await;

    let reqs = (0..130)
        .map(|i| json!({"type": "publish", "id": format!("p{i}"), "topic": "room/flood", "event": "e", "data": i}))
        .collect();
    let replies = pipeline(&mut publisher, reqs).await;
    let c = codes(&replies);
    let ok = c.iter().filter(|&&c| c == 0).count();
    let limited = c.iter().filter(|&&c| c == 429).count();
    assert_eq!(ok + limited, 130, "only 0 and 429 expected: {c:?}");
    assert!(
        (95..=105).contains(&ok),
        "{ok} of 130 passed (100/min per user)"
    );

    // The listener got exactly the accepted ones.
    for _ in 0..ok {
        let m = listener.recv_message("room/flood").await;
        let i = m["data"].as_u64().unwrap() as usize;
        assert_eq!(c[i], 0, "a refused publish (#{i}) was delivered");
    }
    listener.expect_no_message(QUIET).await;
    publisher.assert_alive().await;
}

#[tokio::test]
async fn subscriptions_per_connection_limit() {
    let server = Server::start(
        r#"
[limits]
max_subscriptions_per_connection = 5
subscribes_per_second = 1000
"#,
    )
    .await;
    let mut ws = server.connect_user("u1").await;
    let mut c = Vec::new();
    for i in 0..8 {
        let r = ws.subscribe(&format!("room/s{i}")).await;
        if r["code"] == 429 {
            assert!(
                r["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("subscriptions"),
                "429 must name subscriptions: {r}"
            );
        }
        c.push(r["code"].as_i64().unwrap());
    }
    // 5 slots; the two implicit subscriptions may or may not count against them.
    let ok = c.iter().take_while(|&&x| x == 0).count();
    assert!((3..=5).contains(&ok), "codes {c:?}");
    assert!(c[ok..].iter().all(|&x| x == 429), "codes {c:?}");

    // Unsubscribing frees a slot.
    ws.unsubscribe_ok("room/s0").await;
    ws.subscribe_ok("room/s-new").await;
    assert_eq!(ws.subscribe("room/s-newer").await["code"], 429);

    // Another connection has its own budget.
    let mut other = server.connect_user("u1").await;
    other.subscribe_ok("room/s0").await;
}

#[tokio::test]
async fn default_subscription_limit_is_512_per_connection() {
    let server = Server::start("").await;
    let mut ws = server.connect_user("u1").await;
    let topics: Vec<String> = (0..520).map(|i| format!("room/t{i}")).collect();
    let r = ws
        .request(json!({"type": "subscribe", "id": "big", "topics": topics}))
        .await;
    assert_eq!(r["code"], 429, "first failing code: {}", r["message"]);
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 520);
    let ok = results.iter().filter(|x| x["code"] == 0).count();
    assert!((510..=512).contains(&ok), "{ok} of 520 accepted");
    assert!(
        results[ok..].iter().all(|x| x["code"] == 429),
        "the ones over the limit are 429"
    );
}

#[tokio::test]
async fn eleventh_connection_of_a_user_is_closed_with_4029() {
    let server = Server::start("").await;
    let token = server.token("many", 3600, json!({}));
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(server.connect_token(&token, "many").await);
    }
    server.wait_presence("many", 10, T).await;

    let mut eleventh = connect(&server.ws_url(), Some(&token))
        .await
        .expect("the upgrade itself succeeds");
    match eleventh.next_frame(T).await {
        Some(Frame::Close(Some((code, _)))) => assert_eq!(code, 4029),
        other => panic!("11th connection: want close 4029 before anything else, got {other:?}"),
    }
    server.wait_presence("many", 10, T).await;
    // Another user is unaffected.
    server.connect_user("someone-else").await;

    // Closing one frees a slot.
    conns.pop().unwrap().close().await;
    server.wait_presence("many", 9, T).await;
    let mut again = server.connect_token(&token, "many").await;
    again.assert_alive().await;
    for ws in &mut conns {
        ws.assert_alive().await;
    }
}

#[tokio::test]
async fn api_ingest_beyond_the_node_rate_gets_http_429() {
    let server = Server::start(
        r#"
[limits]
ingest_per_second = 50
"#,
    )
    .await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut last_429 = None;
    for i in 0..200 {
        let (s, b) = server
            .api_post(
                "/api/v1/publish",
                &server.publish_key,
                &json!({"topic": "global/ingest", "event": "e", "data": i}),
            )
            .await;
        if s == 429 {
            last_429 = Some(b);
        }
        statuses.push(s);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(ok + limited, 200, "only 200 and 429 expected: {statuses:?}");
    let allowed = 50.0 + 50.0 * elapsed + 5.0;
    assert!(
        ok >= 45 && (ok as f64) <= allowed,
        "{ok} accepted in {elapsed:.2}s at 50/s"
    );
    assert!(limited >= 50, "{limited} limited in {elapsed:.2}s");
    let body = last_429.unwrap();
    assert_eq!(body["code"], 429, "429 body: {body}");

    // It recovers once the rate allows it again.
    eventually(Duration::from_secs(3), "publish accepted again", || async {
        let (s, _) = server
            .api_post(
                "/api/v1/publish",
                &server.publish_key,
                &json!({"topic": "global/ingest", "event": "e", "data": "later"}),
            )
            .await;
        s == 200
    })
    .await;
}
