//! Required test 8: the server HTTP API.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn publish_envelope_and_idempotent_id() {
    let server = Server::start("").await;
    let mut ws = server.connect_user("u1").await;
    ws.subscribe_ok("global/news").await;

    let before = now_millis();
    let (s, b) = server
        .api_post(
            "/api/v1/publish",
            &server.publish_key,
            &json!({"topic": "global/news", "event": "headline", "data": {"title": "hello"}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    assert!(!id.is_empty());
    let m = ws.recv_message("global/news").await;
    assert_eq!(m["event"], "headline");
    assert_eq!(m["data"], json!({"title": "hello"}));
    assert_eq!(m["id"], id.as_str());
    let ts = m["ts"].as_i64().expect("ts");
    assert!(
        (before - 5_000..=now_millis() + 5_000).contains(&ts),
        "ts {ts}"
    );
    assert!(
        m.get("ack").is_none_or(|a| a == false),
        "ephemeral publish has no ack: {m}"
    );

    // trace_id is carried to the subscriber.
    let (s, b) = server
        .api_post(
            "/api/v1/publish",
            &server.publish_key,
            &json!({"topic": "global/news", "event": "e", "data": 1, "trace_id": "t-api-1"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let m = ws.recv_message("global/news").await;
    assert_eq!(m["trace_id"], "t-api-1", "{m}");

    // A caller-supplied id is echoed and used as the message id.
    let body = json!({"topic": "global/news", "event": "e", "data": 2, "id": "order-1234"});
    let (s, b) = server
        .api_post("/api/v1/publish", &server.publish_key, &body)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["id"], "order-1234", "{b}");
    let m = ws.recv_message("global/news").await;
    assert_eq!(m["id"], "order-1234");
    // Publishing the same id again is accepted (idempotent) and echoes it.
    let (s, b) = server
        .api_post("/api/v1/publish", &server.publish_key, &body)
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["id"], "order-1234", "{b}");
}

#[tokio::test]
async fn publish_errors_keys_and_sizes() {
    let server = Server::start("").await;
    let good = json!({"topic": "global/x", "event": "e", "data": 1});

    // Missing / unknown key → 401; key without the scope → 403.
    let (s, t) = server
        .http(
            "POST",
            "/api/v1/publish",
            None,
            Some((good.to_string().into_bytes(), "application/json")),
        )
        .await;
    assert_eq!(s, 401, "{t}");
    let b: Value = serde_json::from_str(&t).expect("JSON error body");
    assert_eq!(b["code"], 401, "{b}");
    assert!(b["message"].is_string(), "{b}");
    let (s, b) = server
        .api_post("/api/v1/publish", "wrong-key-0123456789", &good)
        .await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(b["code"], 401, "{b}");
    // A client JWT is not an API key.
    let jwt = server.token("u1", 3600, json!({}));
    let (s, b) = server.api_post("/api/v1/publish", &jwt, &good).await;
    assert_eq!(s, 401, "JWT as API key: {b}");
    // Admin-only endpoints with the publish key.
    for path in ["/api/v1/presence", "/ws/stats", "/api/v1/users/u1/messages"] {
        let (s, b) = server.api_get(path, &server.publish_key).await;
        assert_eq!(s, 403, "GET {path} with a publish key: {b}");
        assert_eq!(b["code"], 403, "{b}");
    }
    for path in ["/api/v1/presence", "/ws/stats"] {
        let (s, b) = server.http("GET", path, None, None).await;
        assert_eq!(s, 401, "GET {path} without key: {b}");
    }
    // The admin key has publish too.
    let (s, b) = server
        .api_post("/api/v1/publish", &server.admin_key, &good)
        .await;
    assert_eq!(s, 200, "{b}");

    // Bad topic → 400 naming the problem.
    for topic in ["a//b", "has space", "", "x/".repeat(20).as_str()] {
        let (s, b) = server
            .api_post(
                "/api/v1/publish",
                &server.publish_key,
                &json!({"topic": topic, "event": "e", "data": 1}),
            )
            .await;
        assert_eq!(s, 400, "topic {topic:?}: {b}");
        assert_eq!(b["code"], 400, "{b}");
        assert!(
            b["message"]
                .as_str()
                .unwrap_or("")
                .contains("invalid topic"),
            "topic {topic:?}: {b}"
        );
    }
    // Malformed body / missing fields → 400.
    for body in [
        "{nope".to_owned(),
        "[]".to_owned(),
        json!({"event": "e", "data": 1}).to_string(),
        json!({"topic": 5, "event": "e", "data": 1}).to_string(),
    ] {
        let (s, t) = server
            .http(
                "POST",
                "/api/v1/publish",
                Some(&server.publish_key),
                Some((body.clone().into_bytes(), "application/json")),
            )
            .await;
        assert_eq!(s, 400, "body {body}: {t}");
        let b: Value = serde_json::from_str(&t).unwrap_or_else(|_| panic!("non-JSON error: {t}"));
        assert_eq!(b["code"], 400, "{b}");
    }
    // Body over max_message_size (524288) → 413.
    let big = json!({"topic": "global/x", "event": "e", "data": "y".repeat(600 * 1024)});
    let (s, t) = server
        .http(
            "POST",
            "/api/v1/publish",
            Some(&server.publish_key),
            Some((big.to_string().into_bytes(), "application/json")),
        )
        .await;
    assert_eq!(s, 413, "{}", &t[..t.len().min(200)]);
    let b: Value = serde_json::from_str(&t).expect("JSON 413 body");
    assert_eq!(b["code"], 413, "{b}");

    // Still healthy.
    let (s, _) = server.get("/healthz").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn batch_publish_results_in_order() {
    let server = Server::start("").await;
    let mut ws = server.connect_user("u1").await;
    ws.subscribe_ok("global/batch").await;
    let (s, b) = server
        .api_post(
            "/api/v1/publish/batch",
            &server.publish_key,
            &json!({"messages": [
                {"topic": "global/batch", "event": "e", "data": 1},
                {"topic": "a//b", "event": "e", "data": 2},
                {"topic": "global/batch", "event": "e", "data": 3, "id": "given-3"},
            ]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let results = b["results"].as_array().unwrap_or_else(|| panic!("{b}"));
    assert_eq!(results.len(), 3, "{b}");
    let id1 = results[0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{b}"))
        .to_owned();
    assert_eq!(results[1]["code"], 400, "{b}");
    assert!(results[1]["message"].is_string(), "{b}");
    assert!(results[1].get("id").is_none(), "{b}");
    assert_eq!(results[2]["id"], "given-3", "{b}");

    let m = ws.recv_message("global/batch").await;
    assert_eq!((m["data"].clone(), m["id"].clone()), (json!(1), json!(id1)));
    let m = ws.recv_message("global/batch").await;
    assert_eq!(
        (m["data"].clone(), m["id"].clone()),
        (json!(3), json!("given-3"))
    );
    ws.expect_no_message(QUIET).await;

    // Malformed batch body → 400.
    let (s, b) = server
        .api_post(
            "/api/v1/publish/batch",
            &server.publish_key,
            &json!({"nope": []}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
}

#[tokio::test]
async fn user_messages_durable_inbox_and_acks() {
    let server = Server::start("").await;

    // Online user: every connection gets it, durable by default (ack:true).
    let mut t1 = server.connect_user("u1").await;
    let mut t2 = server.connect_user("u1").await;
    let (s, b) = server
        .api_post(
            "/api/v1/users/u1/messages",
            &server.publish_key,
            &json!({"event": "notification", "data": {"n": 1}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    assert!(b["status"].is_string(), "{b}");
    for ws in [&mut t1, &mut t2] {
        let m = ws.recv_message("user/u1").await;
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["ack"], true, "durable messages carry ack:true: {m}");
    }
    // Non-durable: delivered without ack.
    let (s, b) = server
        .api_post(
            "/api/v1/users/u1/messages",
            &server.publish_key,
            &json!({"event": "toast", "data": 2, "durable": false}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let m = t1.recv_message("user/u1").await;
    assert!(m.get("ack").is_none_or(|a| a == false), "{m}");
    t2.recv_message("user/u1").await;

    // The inbox lists the durable one; ack moves it to acked.
    let (s, inbox) = server
        .api_get("/api/v1/users/u1/messages", &server.admin_key)
        .await;
    assert_eq!(s, 200, "{inbox}");
    let entry = find(&inbox, &id);
    assert_eq!(entry["topic"], "user/u1", "{entry}");
    assert_eq!(entry["event"], "notification", "{entry}");
    assert_eq!(entry["data"], json!({"n": 1}), "{entry}");
    assert!(
        entry["created_at"].is_string() || entry["created_at"].is_number(),
        "{entry}"
    );
    assert!(
        entry["status"] == "sent" || entry["status"] == "pending",
        "before ack: {entry}"
    );
    let r = t1
        .request(json!({"type": "ack", "id": "k1", "ids": [id]}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    eventually(T, "inbox status acked", || async {
        let (_, inbox) = server
            .api_get("/api/v1/users/u1/messages", &server.admin_key)
            .await;
        find(&inbox, &id)["status"] == "acked"
    })
    .await;
    let (s, acked) = server
        .api_get(
            "/api/v1/users/u1/messages?status=acked&limit=10",
            &server.admin_key,
        )
        .await;
    assert_eq!(s, 200);
    let list = acked["messages"].as_array().unwrap();
    assert!(list.iter().all(|m| m["status"] == "acked"), "{acked}");
    assert!(list.iter().any(|m| m["id"] == id.as_str()), "{acked}");
    let (_, pending) = server
        .api_get(
            "/api/v1/users/u1/messages?status=pending",
            &server.admin_key,
        )
        .await;
    assert!(
        !pending["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == id.as_str()),
        "acked message listed as pending: {pending}"
    );

    // `limit` bounds the list.
    for i in 0..3 {
        let (s, b) = server
            .api_post(
                "/api/v1/users/u1/messages",
                &server.publish_key,
                &json!({"event": "more", "data": i}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, all) = server
        .api_get("/api/v1/users/u1/messages", &server.admin_key)
        .await;
    assert_eq!(s, 200, "{all}");
    assert!(all["messages"].as_array().unwrap().len() >= 4, "{all}");
    let (s, one) = server
        .api_get("/api/v1/users/u1/messages?limit=1", &server.admin_key)
        .await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["messages"].as_array().unwrap().len(), 1, "{one}");
}

fn find(inbox: &Value, id: &str) -> Value {
    inbox["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("inbox: {inbox}"))
        .iter()
        .find(|m| m["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in inbox {inbox}"))
}

#[tokio::test]
async fn offline_durable_message_is_replayed_until_acked() {
    let server = Server::start("").await;
    let (s, b) = server
        .api_post(
            "/api/v1/users/offline/messages",
            &server.publish_key,
            &json!({"event": "missed", "data": {"k": 1}, "id": "durable-1"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["id"], "durable-1", "{b}");
    assert_eq!(b["status"], "pending", "{b}");
    let (_, pending) = server
        .api_get(
            "/api/v1/users/offline/messages?status=pending",
            &server.admin_key,
        )
        .await;
    assert_eq!(find(&pending, "durable-1")["status"], "pending");

    // First connect: welcome, then the replay.
    let mut ws = server.connect_user("offline").await;
    let m = ws.recv_message("user/offline").await;
    assert_eq!(m["id"], "durable-1");
    assert_eq!(m["event"], "missed");
    assert_eq!(m["data"], json!({"k": 1}));
    assert_eq!(m["ack"], true);
    ws.close().await;
    server.wait_presence("offline", 0, T).await;

    // Not acked: replayed again on the next connect.
    let mut ws = server.connect_user("offline").await;
    let m = ws.recv_message("user/offline").await;
    assert_eq!(m["id"], "durable-1");
    let r = ws
        .request(json!({"type": "ack", "id": "a1", "ids": ["durable-1"]}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    eventually(T, "acked", || async {
        let (_, inbox) = server
            .api_get("/api/v1/users/offline/messages", &server.admin_key)
            .await;
        find(&inbox, "durable-1")["status"] == "acked"
    })
    .await;
    ws.close().await;
    server.wait_presence("offline", 0, T).await;

    // Acked: not replayed any more.
    let mut ws = server.connect_user("offline").await;
    ws.expect_no_message(QUIET).await;
}

#[tokio::test]
async fn broadcast_and_room_messages() {
    let server = Server::start("").await;
    let mut a = server.connect_user("a").await;
    let mut b = server.connect_user("b").await;
    b.join_room_ok("general").await;

    let (s, r) = server
        .api_post(
            "/api/v1/broadcast",
            &server.publish_key,
            &json!({"event": "all", "data": 1}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let id = r["id"].as_str().expect("id");
    for ws in [&mut a, &mut b] {
        let m = ws.recv_message("broadcast").await;
        assert_eq!(m["id"], id);
        assert_eq!(m["event"], "all");
    }

    let (s, r) = server
        .api_post(
            "/api/v1/rooms/general/messages",
            &server.publish_key,
            &json!({"event": "chat", "data": {"t": "x"}}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert!(r["id"].is_string(), "{r}");
    assert_eq!(
        b.recv_message("room/general").await["data"],
        json!({"t": "x"})
    );
    a.expect_no_message(QUIET).await;

    // An invalid room name is a 400.
    let (s, r) = server
        .api_post(
            "/api/v1/rooms/bad%20room/messages",
            &server.publish_key,
            &json!({"event": "chat", "data": 1}),
        )
        .await;
    assert_eq!(s, 400, "{r}");
}

#[tokio::test]
async fn presence_and_topic_subscribers() {
    let server = Server::start("").await;
    let mut a1 = server.connect_user("alice").await;
    let mut a2 = server.connect_user("alice").await;
    let _b = server.connect_user("bob").await;

    let (s, p) = server
        .api_get("/api/v1/users/alice/presence", &server.publish_key)
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["user"], "alice", "{p}");
    assert_eq!(p["online"], true, "{p}");
    assert_eq!(p["connections"], 2, "{p}");
    let (s, p) = server
        .api_get("/api/v1/users/nobody/presence", &server.publish_key)
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["online"], false, "{p}");
    assert_eq!(p["connections"], 0, "{p}");

    let (s, p) = server.api_get("/api/v1/presence", &server.admin_key).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["online_users"], 2, "{p}");
    assert_eq!(p["connections"], 3, "{p}");
    let users = p["users"].as_array().expect("users");
    let count = |u: &str| {
        users
            .iter()
            .find(|e| e["user"] == u)
            .map(|e| e["connections"].clone())
    };
    assert_eq!(count("alice"), Some(json!(2)), "{p}");
    assert_eq!(count("bob"), Some(json!(1)), "{p}");

    // Subscribers of a topic (percent-encoded as one segment): 0 → 2 → 1 → 0.
    let topic = "global/ticker";
    let (s, body) = server
        .api_get(
            &format!("/api/v1/topics/{}/subscribers", encode_segment(topic)),
            &server.publish_key,
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["topic"], topic, "{body}");
    assert_eq!(body["subscribers"], 0, "{body}");
    a1.subscribe_ok(topic).await;
    a2.subscribe_ok(topic).await;
    server.wait_subscribers(topic, 2).await;
    a1.unsubscribe_ok(topic).await;
    server.wait_subscribers(topic, 1).await;
    a2.close().await;
    server.wait_subscribers(topic, 0).await;
    server.wait_presence("alice", 1, T).await;

    // Implicit subscriptions count too.
    assert!(server.subscribers("broadcast").await >= 2);
    assert_eq!(server.subscribers("user/bob").await, 1);

    // An invalid topic → 400.
    let (s, body) = server
        .api_get("/api/v1/topics/a%2F%2Fb/subscribers", &server.publish_key)
        .await;
    assert_eq!(s, 400, "{body}");
}

#[tokio::test]
async fn stats_metrics_health_ready() {
    let server = Server::start("").await;
    let mut a = server.connect_user("alice").await;
    let _a2 = server.connect_user("alice").await;
    let _b = server.connect_user("bob").await;
    a.join_room_ok("r1").await;
    a.subscribe_ok("global/x").await;

    let st = server.stats().await;
    assert_eq!(st["total_clients"], 3, "{st}");
    assert_eq!(st["online_users"], 2, "{st}");
    assert_eq!(st["total_rooms"], 1, "{st}");
    assert!(st["total_topics"].as_u64().is_some_and(|n| n >= 2), "{st}");
    assert!(st["uptime_secs"].is_u64(), "{st}");
    assert_eq!(
        st["node_id"],
        a.welcome.as_ref().unwrap()["node_id"],
        "stats node_id vs welcome: {st}"
    );

    // Deliver one message so the sent counter moves.
    server.publish("global/x", "e", json!(1)).await;
    a.recv_message("global/x").await;

    let text = server.metrics().await;
    for name in [
        "herald_connections",
        "herald_connections_opened_total",
        "herald_messages_sent_total",
        "herald_messages_dropped_total",
        "herald_online_users",
        "herald_subscriptions",
        "herald_errors_total",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) || l.starts_with(&format!("# TYPE {name} "))),
            "/metrics lacks {name}:\n{text}"
        );
    }
    assert_eq!(
        metric_sum(&text, "herald_connections", &[]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "herald_online_users", &[]),
        Some(2.0),
        "{text}"
    );
    assert!(metric_sum(&text, "herald_connections_opened_total", &[]).unwrap_or(0.0) >= 3.0);
    // The sent counter moves once the write completed, which may be just after the client
    // has read the frame: poll.
    eventually(T, "herald_messages_sent_total >= 1", || async {
        let text = server.metrics().await;
        metric_sum(&text, "herald_messages_sent_total", &[]).unwrap_or(0.0) >= 1.0
    })
    .await;

    let (s, t) = server.get("/healthz").await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap(),
        json!({"status": "ok"})
    );
    let (s, t) = server.get("/readyz").await;
    assert_eq!(s, 200, "{t}");
    let r: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(r["status"], "ready", "{r}");
    assert_eq!(r["bus"], "ok", "{r}");
    assert_eq!(r["store"], "ok", "{r}");
}

#[tokio::test]
async fn command_replies_reach_the_connection_or_the_user() {
    let server = Server::start("").await;
    let mut a1 = server.connect_user("alice").await;
    let mut a2 = server.connect_user("alice").await;
    let conn_id = a1.welcome.as_ref().expect("welcome")["conn_id"]
        .as_str()
        .expect("conn_id")
        .to_owned();

    // To one connection: only that tab gets it.
    let (s, body) = server
        .api_post(
            "/api/v1/replies",
            &server.publish_key,
            &json!({"command": "CALL", "trace_id": "t-1", "user": {"id": "alice", "role": "x"},
                    "conn_id": conn_id, "data": {"call_id": "c9"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body, json!({"delivered": true}));
    let r = a1.recv_json(T).await;
    assert_eq!(
        r,
        json!({"type": "command_reply", "command": "CALL", "trace_id": "t-1", "code": 0,
               "message": "success", "data": {"call_id": "c9"}})
    );
    a2.expect_no_message(QUIET).await;

    // Without conn_id: every connection of the user.
    let (s, body) = server
        .api_post(
            "/api/v1/replies",
            &server.publish_key,
            &json!({"command": "CALL", "trace_id": "t-2", "user": {"id": "alice"},
                    "code": 404, "message": "no such call"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    for ws in [&mut a1, &mut a2] {
        let r = ws.recv_json(T).await;
        assert_eq!(r["type"], "command_reply", "{r}");
        assert_eq!(r["code"], 404, "{r}");
        assert_eq!(r["message"], "no such call", "{r}");
        assert!(r.get("data").is_none(), "{r}");
    }

    // Bad input: clear errors, nothing delivered.
    let cases = [
        (
            json!({"command": "C", "trace_id": "t", "user": {"id": "alice"}, "conn_id": "x-1"}),
            400,
            "not a connection id",
        ),
        (
            json!({"command": "C", "trace_id": "t", "user": {"id": "alice"}, "conn_id": "c-n-x"}),
            400,
            "not a connection id",
        ),
        (
            json!({"command": "C", "trace_id": "t", "user": {"id": "alice"}, "code": 1000}),
            400,
            "`code` must be 0 to 999",
        ),
        (
            json!({"command": "", "trace_id": "t", "user": {"id": "alice"}}),
            400,
            "`command`",
        ),
        (
            json!({"command": "C", "user": {"id": "alice"}}),
            400,
            "trace_id",
        ),
        (
            json!({"command": "C", "trace_id": "t", "user": {"id": "alice"}, "conn_id": "c-elsewhere-1"}),
            404,
            "no node holds connection c-elsewhere-1",
        ),
    ];
    for (req, status, text) in cases {
        let (s, body) = server
            .api_post("/api/v1/replies", &server.publish_key, &req)
            .await;
        assert_eq!(s, status, "{req} → {body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains(text),
            "{req} → {body}"
        );
    }
    a1.expect_no_message(QUIET).await;
    a2.expect_no_message(QUIET).await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let server = Server::start("").await;
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/openapi.json", server.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    // Every route of the router (api.rs), with its methods.
    let routes = [
        ("/ws", &["get"][..]),
        ("/stomp", &["get"]),
        ("/api/v1/telemetry/datas/current/ws", &["get"]),
        ("/api/v1/telemetry/datas/current/keys/ws", &["get"]),
        ("/sse", &["get"]),
        ("/api/v1/poll", &["get"]),
        ("/api/v1/ack", &["post"]),
        ("/api/v1/publish", &["post"]),
        ("/api/v1/publish/batch", &["post"]),
        ("/api/v1/broadcast", &["post"]),
        ("/api/v1/users/{user}/messages", &["post", "get"]),
        ("/api/v1/rooms/{room}/messages", &["post"]),
        ("/api/v1/users/{user}/presence", &["get"]),
        ("/api/v1/presence", &["get"]),
        ("/api/v1/topics/{topic}/subscribers", &["get"]),
        ("/api/v1/users/{user}/disconnect", &["post"]),
        ("/api/v1/revocations", &["post"]),
        ("/api/v1/replies", &["post"]),
        ("/ws/stats", &["get"]),
        ("/metrics", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/demo", &["get"]),
        ("/api/v1/openapi.json", &["get"]),
    ];
    for (path, methods) in routes {
        let item = paths.get(path).unwrap_or_else(|| panic!("{path} missing"));
        for m in methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing");
        }
    }
    assert_eq!(
        paths.len(),
        routes.len(),
        "paths not served: {:?}",
        paths.keys()
    );
    // Every operation names its answers and has an id.
    for (path, item) in paths {
        for (m, op) in item.as_object().unwrap() {
            if m == "parameters" {
                continue;
            }
            assert!(op["operationId"].is_string(), "{m} {path}");
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{m} {path}"
            );
        }
    }
}
