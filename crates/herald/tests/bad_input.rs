//! Required test 4: malformed frames get an error and the connection keeps working; oversized
//! frames close with 1009; an error flood closes with 4008; the server stays healthy.

mod common;

use common::*;
use serde_json::{Value, json};

fn assert_error(v: &Value, code: u16, what: &str) {
    assert_eq!(v["type"], "error", "{what}: want an error frame, got {v}");
    assert_eq!(v["code"], code, "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: error without message: {v}"
    );
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_survives() {
    let server = Server::start(
        r#"
[limits]
subscribes_per_second = 1000
"#,
    )
    .await;
    let mut ws = server.connect_user("alice").await;

    // Malformed JSON.
    for bad in [
        "{not json",
        "[1,2",
        "\"just a string",
        "{\"type\":\"subscribe\",}",
    ] {
        ws.send_text(bad).await;
        let e = ws.recv_json(T).await;
        assert_error(&e, 400, bad);
        assert!(
            e["message"].as_str().unwrap().starts_with("malformed JSON"),
            "{bad}: {e}"
        );
        ws.assert_alive().await;
    }

    // Unknown type.
    ws.send_json(&json!({"type": "subscrib", "topic": "room/x"}))
        .await;
    let e = ws.recv_json(T).await;
    assert_error(&e, 400, "unknown type");
    assert_eq!(e["message"], "unknown type: subscrib", "{e}");
    ws.assert_alive().await;

    // Missing fields (no id → error frame).
    for bad in [
        json!({"type": "subscribe"}),
        json!({"type": "join_room"}),
        json!({"type": "publish", "event": "e", "data": 1}),
        json!({"type": "ack"}),
        json!({"topic": "room/x"}),
    ] {
        ws.send_json(&bad).await;
        let e = ws.recv_json(T).await;
        assert_error(&e, 400, &bad.to_string());
        ws.assert_alive().await;
    }
    // Missing field with an id → a reply with that id.
    let r = ws.request(json!({"type": "subscribe", "id": "m1"})).await;
    assert_eq!(r["code"], 400, "{r}");

    // Binary frame.
    ws.send_binary(vec![0, 159, 146, 150]).await;
    let e = ws.recv_json(T).await;
    assert_error(&e, 400, "binary frame");
    ws.assert_alive().await;

    // Invalid topics: subscribe (reply) and publish.
    let seventeen = vec!["a"; 17].join("/");
    let long_segment = format!("room/{}", "x".repeat(65));
    let too_long = vec!["abcdefghijklmnop"; 16].join("/"); // 16 segments, 271 bytes
    let invalid = [
        "a//b",
        seventeen.as_str(),
        long_segment.as_str(),
        "room/has space",
        "",
        "/leading",
        "trailing/",
        "room/bad$char",
        too_long.as_str(),
    ];
    for topic in invalid {
        let r = ws.subscribe(topic).await;
        assert_eq!(r["code"], 400, "subscribe {topic:?}: {r}");
        assert!(
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("invalid topic")),
            "subscribe {topic:?}: {r}"
        );
    }
    let r = ws.publish("room/has space", "e", json!(1)).await;
    assert_eq!(r["code"], 400, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("invalid topic"),
        "{r}"
    );
    // Without an id: an error frame.
    ws.send_json(&json!({"type": "subscribe", "topic": "a//b"}))
        .await;
    let e = ws.recv_json(T).await;
    assert_error(&e, 400, "invalid topic without id");
    assert!(
        e["message"].as_str().unwrap().contains("invalid topic"),
        "{e}"
    );
    ws.assert_alive().await;

    // Limits: a 16-segment topic and 64-byte segments are fine.
    let sixteen = format!("room/{}", "x".repeat(64));
    ws.subscribe_ok(&sixteen).await;

    // Still fully working: subscriptions and deliveries.
    ws.join_room_ok("still-ok").await;
    let (s, b) = server
        .api_post(
            "/api/v1/rooms/still-ok/messages",
            &server.publish_key,
            &json!({"event": "e", "data": "fine"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(ws.recv_message("room/still-ok").await["data"], "fine");
}

#[tokio::test]
async fn oversized_frame_closes_1009_error_flood_closes_4008_server_stays_healthy() {
    let server = Server::start("").await;
    let mut watcher = server.connect_user("watcher").await;
    watcher.join_room_ok("after").await;

    // Oversized frame (default max_message_size 524288).
    let mut big = server.connect_user("big").await;
    let payload = json!({
        "type": "publish", "id": "p1", "topic": "room/after", "event": "big",
        "data": "x".repeat(600 * 1024)
    });
    // The server may close while we are still writing: ignore send errors.
    let _ = big.try_send_text(payload.to_string()).await;
    let (code, _) = big.expect_close(T).await;
    assert_eq!(code, 1009, "oversized frame");

    // Error flood: more than max_errors_per_minute (default 30) → 4008.
    let mut flood = server.connect_user("flood").await;
    for i in 0..40 {
        if flood
            .try_send_text(format!("{{bad json {i}"))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, _) = flood.expect_close(T).await;
    assert_eq!(code, 4008, "error flood");
    let errors = flood
        .skipped
        .iter()
        .filter(|f| f["type"] == "error")
        .count();
    assert!(
        (25..=31).contains(&errors),
        "expected about 30 errors before the 4008 close, got {errors}"
    );

    // The server is healthy and other clients are served.
    let (s, body) = server.get("/healthz").await;
    assert_eq!(s, 200, "{body}");
    let metrics = server.metrics().await;
    let errors = metric_sum(&metrics, "herald_errors_total", &[]).unwrap_or(0.0);
    assert!(
        errors >= 30.0,
        "herald_errors_total = {errors} after the flood"
    );
    let (s, b) = server
        .api_post(
            "/api/v1/rooms/after/messages",
            &server.publish_key,
            &json!({"event": "e", "data": "ok"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    // The first thing the watcher gets is this message: the oversized publish went nowhere.
    let m = watcher.recv_message("room/after").await;
    assert_eq!(m["data"], "ok");
    let mut fresh = server.connect_user("fresh").await;
    fresh.assert_alive().await;
}

#[tokio::test]
async fn max_errors_per_minute_is_configurable() {
    let server = Server::start(
        r#"
[limits]
max_errors_per_minute = 5
"#,
    )
    .await;
    let mut ws = server.connect_user("u1").await;
    for i in 0..5 {
        ws.send_text(&format!("{{bad {i}")).await;
        assert_error(&ws.recv_json(T).await, 400, "bad json");
    }
    ws.assert_alive().await;
    ws.send_text("{bad 6").await;
    let (code, _) = ws.expect_close(T).await;
    assert_eq!(code, 4008);
}
