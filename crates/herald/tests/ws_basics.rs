//! The JSON v1 protocol on `/ws`: welcome, ping, implicit subscriptions, user / broadcast /
//! room fanout across several users and tabs, batch subscribe, unsubscribe, `since`.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn welcome_has_the_contract_fields_and_subprotocol_is_echoed() {
    let server = Server::start("").await;

    let token = server.token("42", 3600, json!({}));
    let mut ws = connect_with(
        &server.ws_url(),
        ConnectOpts {
            bearer: Some(&token),
            subprotocol: Some("herald.json.v1"),
            ..Default::default()
        },
    )
    .await
    .expect("handshake");
    assert_eq!(
        ws.protocol.as_deref(),
        Some("herald.json.v1"),
        "subprotocol not echoed"
    );
    let w = ws.expect_welcome("42").await;
    assert!(
        w["conn_id"].as_str().is_some_and(|c| c.starts_with("c-")),
        "conn_id: {w}"
    );
    assert!(
        w["node_id"].as_str().is_some_and(|n| !n.is_empty()),
        "node_id: {w}"
    );
    assert_eq!(w["heartbeat_ms"], 25000, "default heartbeat: {w}");
    assert_eq!(w["protocol"], "herald.json.v1", "{w}");
    ws.expect_no_message(QUIET).await;

    // Two connections get distinct conn ids.
    let other = server.connect_user("42").await;
    assert_ne!(
        other.welcome.as_ref().unwrap()["conn_id"],
        w["conn_id"],
        "conn_id must be per connection"
    );

    // Without asking for a subprotocol the connection still works (JSON v1 is the default).
    let mut plain = server.connect_user("43").await;
    plain.assert_alive().await;
}

#[tokio::test]
async fn ping_frame_and_bare_text_ping_are_answered() {
    let server = Server::start("").await;
    let mut ws = server.connect_user("42").await;

    ws.send_json(&json!({"type": "ping"})).await;
    let pong = ws.recv_json(T).await;
    assert_eq!(pong["type"], "pong", "{pong}");

    ws.send_text("ping").await;
    assert_eq!(ws.recv_text(T).await, "pong");

    // A ping with an id still works (and the connection stays usable).
    ws.assert_alive().await;
    ws.expect_no_message(QUIET).await;
}

/// Required test 1: user A with two tabs, user B with one.
#[tokio::test]
async fn two_users_three_connections_user_broadcast_room_and_forbidden() {
    let server = Server::start("").await;
    let mut a1 = server.connect_user("alice").await;
    let mut a2 = server.connect_user("alice").await;
    let mut b1 = server.connect_user("bob").await;
    server.wait_presence("alice", 2, T).await;

    // A user message reaches both of A's tabs (implicit `user/alice`) and not B.
    let (s, body) = server
        .api_post(
            "/api/v1/users/alice/messages",
            &server.publish_key,
            &json!({"event": "notification", "data": {"title": "hi A"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    for tab in [&mut a1, &mut a2] {
        let m = tab.recv_message("user/alice").await;
        assert_eq!(m["event"], "notification", "{m}");
        assert_eq!(m["data"], json!({"title": "hi A"}), "{m}");
        assert_eq!(m["id"], id.as_str(), "{m}");
    }
    b1.expect_no_message(QUIET).await;

    // A broadcast reaches all three.
    let (s, body) = server
        .api_post(
            "/api/v1/broadcast",
            &server.publish_key,
            &json!({"event": "maintenance", "data": {"in_min": 5}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(body["id"].is_string(), "broadcast answer: {body}");
    for ws in [&mut a1, &mut a2, &mut b1] {
        let m = ws.recv_message("broadcast").await;
        assert_eq!(m["event"], "maintenance", "{m}");
        assert_eq!(m["data"], json!({"in_min": 5}), "{m}");
    }

    // A room joined by A-tab1 and B: API room messages and client publishes from B reach
    // both; A-tab2 (same user, did not join) gets nothing.
    a1.join_room_ok("lobby").await;
    b1.join_room_ok("lobby").await;
    let (s, body) = server
        .api_post(
            "/api/v1/rooms/lobby/messages",
            &server.publish_key,
            &json!({"event": "chat", "data": {"text": "from api"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    for ws in [&mut a1, &mut b1] {
        let m = ws.recv_message("room/lobby").await;
        assert_eq!(m["event"], "chat", "{m}");
        assert_eq!(m["data"]["text"], "from api", "{m}");
    }

    let r = b1
        .publish("room/lobby", "chat", json!({"text": "from bob"}))
        .await;
    assert_eq!(r["code"], 0, "client publish to a room: {r}");
    let m = a1.recv_message("room/lobby").await;
    assert_eq!(m["event"], "chat", "{m}");
    assert_eq!(m["data"]["text"], "from bob", "{m}");
    a2.expect_no_message(QUIET).await;

    // Forbidden: A may not subscribe to B's topics, and then receives nothing from there.
    let r = a1.subscribe("user/bob/notifications").await;
    assert_eq!(r["code"], 403, "{r}");
    assert_eq!(r["message"], "forbidden: user/bob/notifications", "{r}");
    b1.subscribe_ok("user/bob/notifications").await;
    server
        .publish("user/bob/notifications", "secret", json!({"x": 1}))
        .await;
    // Positive control: B gets it (skipping a possible echo of B's own room publish).
    loop {
        let m = b1.recv_json(T).await;
        if m["topic"] == "room/lobby" {
            continue;
        }
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["topic"], "user/bob/notifications", "{m}");
        break;
    }
    a1.expect_no_message(QUIET).await;
    a2.expect_no_message(QUIET).await;
}

#[tokio::test]
async fn client_publish_needs_publish_permission_and_is_delivered_with_envelope() {
    let server = Server::start("").await;
    let mut a = server.connect_user("alice").await;
    let mut b = server.connect_user("bob").await;
    a.join_room_ok("chat:room001").await;
    b.join_room_ok("chat:room001").await;

    let before = now_millis();
    let r = a
        .publish("room/chat:room001", "chat", json!({"text": "yo"}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    let m = b.recv_message("room/chat:room001").await;
    assert_eq!(m["event"], "chat");
    assert_eq!(m["data"], json!({"text": "yo"}));
    assert!(m["id"].as_str().is_some_and(|s| !s.is_empty()), "id: {m}");
    let ts = m["ts"].as_i64().unwrap_or_else(|| panic!("ts in ms: {m}"));
    assert!(
        (before - 5_000..=now_millis() + 5_000).contains(&ts),
        "ts {ts} is not a current unix-ms timestamp"
    );

    // Subscribe-only topics refuse client publishes.
    for topic in ["global/news", "user/alice/notes", "broadcast"] {
        let r = a.publish(topic, "x", json!({})).await;
        assert_eq!(r["code"], 403, "client publish to {topic}: {r}");
        assert_eq!(r["message"], format!("forbidden: {topic}"), "{r}");
    }
    b.expect_no_message(QUIET).await;
}

/// Required test 9: batch subscribe with one forbidden topic, unsubscribe, `since`.
#[tokio::test]
async fn batch_subscribe_with_a_forbidden_topic_unsubscribe_and_since() {
    let server = Server::start("").await;
    let mut a = server.connect_user("alice").await;

    let r = a
        .request(json!({
            "type": "subscribe", "id": "b1",
            "topics": ["global/news", "user/bob/notifications", "user/alice/notifications"]
        }))
        .await;
    assert_eq!(r["code"], 403, "first failing code: {r}");
    let results = r["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results: {r}"));
    assert_eq!(results.len(), 3, "{r}");
    assert_eq!(results[0]["topic"], "global/news");
    assert_eq!(results[0]["code"], 0, "{r}");
    assert_eq!(results[1]["topic"], "user/bob/notifications");
    assert_eq!(results[1]["code"], 403, "{r}");
    assert_eq!(
        results[1]["message"], "forbidden: user/bob/notifications",
        "{r}"
    );
    assert_eq!(results[2]["topic"], "user/alice/notifications");
    assert_eq!(results[2]["code"], 0, "{r}");

    // The allowed ones deliver; the forbidden one does not.
    server
        .publish("user/bob/notifications", "n", json!(1))
        .await;
    server.publish("global/news", "n", json!(2)).await;
    server
        .publish("user/alice/notifications", "n", json!(3))
        .await;
    let m = a.recv_message("global/news").await;
    assert_eq!(m["data"], 2);
    let m = a.recv_message("user/alice/notifications").await;
    assert_eq!(m["data"], 3);
    a.expect_no_message(QUIET).await;

    // An all-allowed batch has code 0.
    let r = a
        .request(json!({"type": "subscribe", "id": "b2", "topics": ["global/a", "global/b"]}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(r["message"], "ok", "{r}");

    // Unsubscribe stops delivery (and other subscriptions keep working).
    let r = a
        .request(json!({"type": "unsubscribe", "id": "u1", "topic": "global/news"}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    server.publish("global/news", "n", json!(4)).await;
    server.publish("global/a", "n", json!(5)).await;
    let m = a.recv_message("global/a").await;
    assert_eq!(
        m["data"], 5,
        "global/news must not be delivered after unsubscribe"
    );
    a.expect_no_message(QUIET).await;

    // Batch unsubscribe.
    let r = a
        .request(json!({"type": "unsubscribe", "id": "u2", "topics": ["global/a", "global/b"]}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    server.publish("global/a", "n", json!(6)).await;
    server.publish("global/b", "n", json!(7)).await;
    a.expect_no_message(QUIET).await;

    // `since` on a topic without history: accepted, recovered:false, then live messages.
    let r = a
        .request(json!({"type": "subscribe", "id": "s1", "topic": "global/ticker", "since": 5}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(r["recovered"], false, "{r}");
    server
        .publish("global/ticker", "tick", json!({"p": 1}))
        .await;
    let m = a.recv_message("global/ticker").await;
    assert_eq!(m["data"], json!({"p": 1}));
}

#[tokio::test]
async fn leave_room_stops_delivery() {
    let server = Server::start("").await;
    let mut a = server.connect_user("alice").await;
    a.join_room_ok("r1").await;
    server
        .api_post(
            "/api/v1/rooms/r1/messages",
            &server.publish_key,
            &json!({"event": "e", "data": 1}),
        )
        .await;
    assert_eq!(a.recv_message("room/r1").await["data"], 1);

    let r = a
        .request(json!({"type": "leave_room", "id": "l1", "room": "r1"}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    let (s, b) = server
        .api_post(
            "/api/v1/rooms/r1/messages",
            &server.publish_key,
            &json!({"event": "e", "data": 2}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    a.expect_no_message(QUIET).await;
}
