//! Required test 10 (logs): `trace_id` carried from the publish to the delivery in JSON logs;
//! secrets never logged.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn trace_id_appears_in_json_logs_for_publish_and_delivery() {
    let server = Server::builder()
        .toml(
            r#"
[log]
format = "json"
"#,
        )
        .env("RUST_LOG", "herald=debug")
        .start()
        .await;
    let mut ws = server.connect_user("u1").await;
    ws.join_room_ok("traced").await;

    let (s, b) = server
        .api_post(
            "/api/v1/publish",
            &server.publish_key,
            &json!({"topic": "room/traced", "event": "e", "data": 1, "trace_id": "t-abc"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let m = ws.recv_message("room/traced").await;
    assert_eq!(m["trace_id"], "t-abc", "{m}");

    // Wait for both log lines (the delivery may be logged after the client got it).
    let lines_with_trace = || -> Vec<String> {
        server
            .stderr_text()
            .lines()
            .filter(|l| l.contains("t-abc"))
            .map(str::to_owned)
            .collect()
    };
    let is_publish = |l: &str| l.to_lowercase().contains("publish");
    let is_delivery = |l: &str| {
        let l = l.to_lowercase();
        ["fanout", "fan out", "deliver", "sent", "dispatch"]
            .iter()
            .any(|w| l.contains(w))
    };
    eventually(T, "log lines with t-abc for publish and delivery", || {
        let lines = lines_with_trace();
        async move {
            lines.iter().any(|l| is_publish(l))
                && lines.iter().any(|l| is_delivery(l) && !is_publish(l))
        }
    })
    .await;
    let lines = lines_with_trace();
    assert!(lines.len() >= 2, "{lines:#?}");
    for l in &lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"));
        assert!(v.is_object(), "{l}");
    }

    // Every stderr line is JSON in this mode.
    for l in server
        .stderr_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        assert!(
            serde_json::from_str::<Value>(l).is_ok(),
            "non-JSON log line: {l}"
        );
    }
}

#[tokio::test]
async fn secrets_are_never_logged() {
    let server = Server::builder()
        .env("RUST_LOG", "herald=trace")
        .start()
        .await;
    let token = server.token("u1", 3600, json!({}));
    let mut ws = server.connect_token(&token, "u1").await;
    ws.join_room_ok("r").await;
    server.publish("room/r", "e", json!(1)).await;
    ws.recv_message("room/r").await;
    let (s, _) = server.api_get("/api/v1/presence", &server.admin_key).await;
    assert_eq!(s, 200);
    let (s, _) = server
        .api_post("/api/v1/publish", "wrong-key-abcdef0123", &json!({}))
        .await;
    assert_eq!(s, 401);
    ws.close().await;
    server.wait_presence("u1", 0, T).await;

    let logs = server.stderr_text() + &server.stdout_text();
    for (what, secret) in [
        ("admin key", server.admin_key.as_str()),
        ("publish key", server.publish_key.as_str()),
        ("jwt secret", server.secret.as_str()),
        ("client token", token.as_str()),
        ("wrong key", "wrong-key-abcdef0123"),
    ] {
        assert!(!logs.contains(secret), "the {what} appears in the logs");
    }
}
