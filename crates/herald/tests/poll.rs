//! Long polling (`GET /api/v1/poll`, SPEC §3) over real HTTP: history since a seq answered at
//! once, a waiting poll answered by a publish, the cursor carried across polls with nothing
//! missed or repeated (also under a concurrent publisher), durable messages until acked,
//! the per-user connection limit, server-side ends (disconnect, drain), and bad parameters.

mod common;

use std::time::{Duration, Instant};

use common::{Server, T, encode_segment, eventually, topics_query};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[limits]
subscribes_per_second = 1000
max_connections_per_user = 2
[[topics]]
pattern = "user/{sub}/**"
subscribe = "allow"
[[topics]]
pattern = "feed/*"
subscribe = "allow"
history = { size = 1000, ttl = "10m" }
[[topics]]
pattern = "live/*"
subscribe = "allow"
[[topics]]
pattern = "device/*/telemetry"
subscribe = "allow"
retain = true
[[topics]]
pattern = "secret/*"
subscribe = "deny"
"#;

/// `GET /api/v1/poll?{query}` with `token` as bearer: status and JSON body.
async fn poll(server: &Server, token: &str, query: &str) -> (u16, Value) {
    let (s, text) = server
        .http("GET", &format!("/api/v1/poll?{query}"), Some(token), None)
        .await;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (s, body)
}

/// A poll that must answer 200.
async fn poll_ok(server: &Server, token: &str, query: &str) -> Value {
    let (s, b) = poll(server, token, query).await;
    assert_eq!(s, 200, "poll {query}: {b}");
    assert!(b["messages"].is_array(), "{b}");
    b
}

/// (topic, seq) of each message.
fn seqs(answer: &Value) -> Vec<(String, u64)> {
    answer["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["topic"].as_str().expect("topic").to_owned(),
                m["seq"].as_u64().expect("seq"),
            )
        })
        .collect()
}

async fn publish_n(server: &Server, topic: &str, n: i64) {
    server.publish(topic, "tick", json!({ "n": n })).await;
}

async fn wait_no_clients(server: &Server) {
    eventually(T, "no connection left", || async {
        server.stats().await["total_clients"] == 0
    })
    .await;
}

#[tokio::test]
async fn history_since_a_seq_is_answered_at_once() {
    let server = Server::start(CONFIG).await;
    let token = server.token("amy", 3600, json!({}));
    for n in 1..=5 {
        publish_n(&server, "feed/a", n).await;
    }
    let started = Instant::now();
    let b = poll_ok(&server, &token, "topic=feed%2Fa&since=2&timeout=25").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let ms = b["messages"].as_array().unwrap();
    assert_eq!(
        ms.iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!(
        (
            &ms[0]["type"],
            &ms[0]["topic"],
            &ms[0]["event"],
            &ms[0]["data"]
        ),
        (
            &json!("message"),
            &json!("feed/a"),
            &json!("tick"),
            &json!({"n": 3})
        )
    );
    assert_eq!(b["cursor"], "feed/a@5");
    assert_eq!(
        b["subscriptions"],
        json!([{"topic": "feed/a", "seq": 5, "recovered": true}])
    );
    assert!(b.get("events").is_none(), "{b}");

    // Beyond the history: told, not hidden.
    let b = poll_ok(&server, &token, "topic=feed%2Fa&since=99&timeout=0").await;
    assert_eq!(
        b["subscriptions"],
        json!([{"topic": "feed/a", "seq": 5, "recovered": false}])
    );
    assert_eq!(b["cursor"], "feed/a@5");
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn a_waiting_poll_is_answered_by_a_publish_promptly() {
    let server = std::sync::Arc::new(Server::start(CONFIG).await);
    let token = server.token("bo", 3600, json!({}));
    let waiting = {
        let (server, token) = (server.clone(), token.clone());
        tokio::spawn(async move {
            let b = poll_ok(&server, &token, "topic=feed%2Fa&topic=live%2Fx&timeout=20").await;
            (b, Instant::now())
        })
    };
    // The poll is registered and subscribed: it counts as a connection while it waits.
    server.wait_subscribers("live/x", 1).await;
    assert_eq!(server.presence("bo").await, 1);
    let published = Instant::now();
    server.publish("live/x", "goal", json!({"home": 1})).await;
    let (b, answered) = tokio::time::timeout(T, waiting)
        .await
        .expect("the poll was not answered")
        .expect("poll task");
    assert!(
        answered.duration_since(published) < Duration::from_secs(2),
        "answered {:?} after the publish",
        answered.duration_since(published)
    );
    let ms = b["messages"].as_array().unwrap();
    assert_eq!(ms.len(), 1, "{b}");
    assert_eq!(
        (&ms[0]["topic"], &ms[0]["data"]),
        (&json!("live/x"), &json!({"home": 1}))
    );
    assert_eq!(b["cursor"], "feed/a@0,live/x@0");
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn timeout_zero_answers_at_once_and_a_timeout_answers_empty() {
    let server = Server::start(CONFIG).await;
    let token = server.token("cy", 3600, json!({}));
    let started = Instant::now();
    let b = poll_ok(&server, &token, "topic=feed%2Fa&timeout=0").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        b,
        json!({"messages": [], "cursor": "feed/a@0", "subscriptions": [{"topic": "feed/a", "seq": 0}]})
    );

    let started = Instant::now();
    let b = poll_ok(
        &server,
        &token,
        "topic=feed%2Fa&since=feed%2Fa%400&timeout=1",
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(b["messages"], json!([]));
    // No topic at all: only the implicit inbox and broadcast.
    let b = poll_ok(&server, &token, "timeout=0").await;
    assert_eq!(
        b,
        json!({"messages": [], "cursor": "", "subscriptions": []})
    );
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn the_cursor_carries_polls_over_with_nothing_missed_or_repeated() {
    let server = Server::start(CONFIG).await;
    let token = server.token("dee", 3600, json!({}));
    let topics = topics_query(&["feed/a", "feed/b", "device/d-1/telemetry"]);
    server
        .publish("device/d-1/telemetry", "t", json!({"t": 20}))
        .await;

    // First poll: no cursor yet; the retained value comes with it.
    let b = poll_ok(&server, &token, &format!("{topics}&timeout=0")).await;
    let ms = b["messages"].as_array().unwrap();
    assert_eq!(ms.len(), 1, "{b}");
    assert_eq!(
        (&ms[0]["retained"], &ms[0]["data"]),
        (&json!(true), &json!({"t": 20}))
    );
    let mut cursor = b["cursor"].as_str().unwrap().to_owned();
    assert_eq!(cursor, "feed/a@0,feed/b@0,device/d-1/telemetry@0");

    // Published between polls: the next poll with the cursor gets exactly those (and not the
    // retained value again).
    let mut got: Vec<(String, u64)> = Vec::new();
    for n in 1..=3 {
        publish_n(&server, "feed/a", n).await;
    }
    publish_n(&server, "feed/b", 1).await;
    publish_n(&server, "feed/b", 2).await;
    for round in 0..2 {
        let q = format!("{topics}&since={}&timeout=5", encode_segment(&cursor));
        let b = poll_ok(&server, &token, &q).await;
        got.extend(seqs(&b));
        cursor = b["cursor"].as_str().unwrap().to_owned();
        if round == 0 {
            assert_eq!(cursor, "feed/a@3,feed/b@2,device/d-1/telemetry@0", "{b}");
            assert_eq!(
                b["subscriptions"],
                json!([
                    {"topic": "feed/a", "seq": 3, "recovered": true},
                    {"topic": "feed/b", "seq": 2, "recovered": true},
                    {"topic": "device/d-1/telemetry"},
                ])
            );
            publish_n(&server, "feed/a", 4).await;
        }
    }
    let q = format!("{topics}&since={}&timeout=0", encode_segment(&cursor));
    let b = poll_ok(&server, &token, &q).await;
    assert_eq!(b["messages"], json!([]), "nothing new: {b}");
    let want: Vec<(String, u64)> = [("feed/a", 1), ("feed/a", 2), ("feed/a", 3)]
        .into_iter()
        .chain([("feed/b", 1), ("feed/b", 2), ("feed/a", 4)])
        .map(|(t, s)| (t.to_owned(), s))
        .collect();
    assert_eq!(got, want);

    // A bare seq with one topic is the same as its cursor.
    let b = poll_ok(&server, &token, "topic=feed%2Fa&since=3&timeout=0").await;
    assert_eq!(seqs(&b), [("feed/a".to_owned(), 4)]);
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn a_poll_loop_under_a_concurrent_publisher_sees_every_message_once() {
    let server = std::sync::Arc::new(Server::start(CONFIG).await);
    let token = server.token("eli", 3600, json!({}));
    const N: u64 = 40;
    let publisher = {
        let server = server.clone();
        tokio::spawn(async move {
            for n in 1..=N as i64 {
                let topic = if n % 2 == 0 { "feed/b" } else { "feed/a" };
                publish_n(&server, topic, n).await;
                if n % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }
        })
    };
    let topics = topics_query(&["feed/a", "feed/b"]);
    let mut cursor = String::new();
    let mut a = Vec::new();
    let mut b = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (a.len() + b.len()) < N as usize {
        assert!(Instant::now() < deadline, "a={a:?} b={b:?}");
        let q = if cursor.is_empty() {
            // Start from the beginning of the history.
            format!("{topics}&since=feed%2Fa%400%2Cfeed%2Fb%400&timeout=2")
        } else {
            format!("{topics}&since={}&timeout=2", encode_segment(&cursor))
        };
        let answer = poll_ok(&server, &token, &q).await;
        for (t, s) in seqs(&answer) {
            if t == "feed/a" { a.push(s) } else { b.push(s) }
        }
        cursor = answer["cursor"].as_str().unwrap().to_owned();
    }
    publisher.await.expect("publisher");
    assert_eq!(a, (1..=N / 2).collect::<Vec<_>>(), "feed/a");
    assert_eq!(b, (1..=N / 2).collect::<Vec<_>>(), "feed/b");
    let q = format!("{topics}&since={}&timeout=0", encode_segment(&cursor));
    assert_eq!(poll_ok(&server, &token, &q).await["messages"], json!([]));
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn durable_messages_come_back_until_acked() {
    let server = std::sync::Arc::new(Server::start(CONFIG).await);
    let token = server.token("fay", 3600, json!({}));
    for (id, n) in [("d-1", 1), ("d-2", 2)] {
        let (s, b) = server
            .api_post(
                "/api/v1/users/fay/messages",
                &server.publish_key,
                &json!({"event": "order", "data": {"n": n}, "id": id}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let ids = |b: &Value| -> Vec<String> {
        b["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["ack"], true, "{m}");
                m["id"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let b = poll_ok(&server, &token, "timeout=0").await;
    assert_eq!(ids(&b), ["d-1", "d-2"]);
    // Not acked: given again.
    let b = poll_ok(&server, &token, "timeout=0").await;
    assert_eq!(ids(&b), ["d-1", "d-2"]);
    let b = poll_ok(&server, &token, "timeout=0&ack=d-1").await;
    assert_eq!(ids(&b), ["d-2"]);
    let b = poll_ok(&server, &token, "timeout=0&ack=d-2").await;
    assert_eq!(ids(&b), Vec::<String>::new());

    // A durable message published while a poll waits answers it, once.
    let waiting = {
        let (server, token) = (server.clone(), token.clone());
        tokio::spawn(async move { poll_ok(&server, &token, "timeout=20").await })
    };
    server.wait_presence("fay", 1, T).await;
    let (s, r) = server
        .api_post(
            "/api/v1/users/fay/messages",
            &server.publish_key,
            &json!({"event": "order", "data": {"n": 3}, "id": "d-3"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let b = tokio::time::timeout(T, waiting)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(ids(&b), ["d-3"]);
    let b = poll_ok(&server, &token, "timeout=0&ack=d-3").await;
    assert_eq!(ids(&b), Vec::<String>::new());

    let (s, inbox) = server
        .api_get("/api/v1/users/fay/messages", &server.admin_key)
        .await;
    assert_eq!(s, 200, "{inbox}");
    let records = inbox["messages"].as_array().unwrap();
    assert_eq!(records.len(), 3, "{inbox}");
    assert!(records.iter().all(|r| r["status"] == "acked"), "{inbox}");
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn a_waiting_poll_is_a_connection_and_ends_with_the_server() {
    let server = std::sync::Arc::new(Server::start(CONFIG).await);
    let token = server.token("gus", 3600, json!({}));
    let spawn_poll = || {
        let (server, token) = (server.clone(), token.clone());
        tokio::spawn(async move { poll(&server, &token, "topic=live%2Fx&timeout=20").await })
    };
    let p1 = spawn_poll();
    let p2 = spawn_poll();
    server.wait_presence("gus", 2, T).await;
    assert_eq!(server.stats().await["total_clients"], 2);
    // max_connections_per_user = 2: a third is refused.
    let (s, b) = poll(&server, &token, "timeout=0").await;
    assert_eq!((s, b["code"].as_u64()), (429, Some(429)), "{b}");

    // Disconnected by the server API: both answer at once, saying why.
    let (s, r) = server
        .api_post(
            "/api/v1/users/gus/disconnect",
            &server.admin_key,
            &json!({}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    for p in [p1, p2] {
        let (s, b) = tokio::time::timeout(T, p)
            .await
            .expect("answered")
            .expect("task");
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["messages"], json!([]), "{b}");
        assert_eq!(
            b["events"],
            json!([{"type": "close", "code": 4011, "reason": "disconnected by server"}])
        );
    }
    wait_no_clients(&server).await;
    // Each session's end is counted once, by reason.
    poll_ok(&server, &token, "timeout=0").await;
    let metrics = server.metrics().await;
    let closed = |reason: &str| -> u64 {
        let key = format!("herald_connections_closed_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        (
            closed("disconnected"),
            closed("too_many_connections"),
            closed("poll_answered")
        ),
        (2, 1, 1),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_draining_node_answers_waiting_polls_with_reconnect() {
    let mut server = Server::start(CONFIG).await;
    let token = server.token("hal", 3600, json!({}));
    let url = format!("{}/api/v1/poll?timeout=20", server.http_url());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let waiting = tokio::spawn(client.get(url).bearer_auth(&token).send());
    server.wait_presence("hal", 1, T).await;
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let resp = tokio::time::timeout(T, waiting)
        .await
        .expect("answered")
        .expect("task")
        .expect("response");
    assert_eq!(resp.status().as_u16(), 200);
    let b: Value = resp.json().await.expect("json");
    assert_eq!(b["events"][0]["type"], "reconnect", "{b}");
    assert!(b["events"][0]["after_ms"].is_u64(), "{b}");
    let status = server.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bad_requests_are_refused_with_json_errors() {
    let server = Server::start(CONFIG).await;
    let token = server.token("ivy", 3600, json!({}));
    let cases: &[(&str, u16, &str)] = &[
        ("topic=feed%2Fa&timeout=61", 400, "timeout"),
        ("topic=feed%2Fa&timeout=soon", 400, "timeout"),
        ("topic=feed%2Fa&since=feed%2Fa%40x", 400, "since"),
        ("topic=feed%2Fa&since=yesterday", 400, "since"),
        (
            "topic=feed%2Fa&topic=feed%2Fb&since=3",
            400,
            "exactly one topic",
        ),
        ("topic=feed%2F%2Fa", 400, "feed//a"),
        ("topic=feed%2Fa%2B", 400, "feed/a+"),
        ("topic=secret%2Fx", 403, "secret/x"),
        ("topic=user%2Fsomeone-else", 403, "user/someone-else"),
        ("ack=", 400, "ack"),
    ];
    for (q, status, mention) in cases {
        let (s, b) = poll(&server, &token, &format!("{q}&timeout=0")).await;
        assert_eq!(
            (s, b["code"].as_u64()),
            (*status, Some(*status as u64)),
            "{q}: {b}"
        );
        let msg = b["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(mention),
            "{q}: {msg:?} should mention {mention:?}"
        );
    }
    // Credentials: none, bad, a server API key (not a user).
    let (s, b) = server.get("/api/v1/poll?timeout=0").await;
    assert_eq!(s, 401, "{b}");
    let (s, b) = poll(&server, "not-a-token", "timeout=0").await;
    assert_eq!((s, b["code"].as_u64()), (401, Some(401)), "{b}");
    let (s, _) = poll(&server, &server.admin_key, "timeout=0").await;
    assert_eq!(s, 401);
    // The token in the query string works too.
    let (s, b) = server
        .get(&format!("/api/v1/poll?timeout=0&token={token}"))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(server.stats().await["total_clients"], 0);
}
