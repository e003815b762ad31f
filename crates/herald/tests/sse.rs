//! Server-Sent Events (`GET /sse`, SPEC §3): the real `eventsource` client run by Node
//! (`tests/node/sse_client.mjs`) for what a browser does — messages on several topics, event
//! ids, resume after the server drops the stream, durable messages and `POST /api/v1/ack`,
//! retained values — and raw HTTP (reqwest) for the wire itself: headers, framing, heartbeat
//! comments, and every refusal.

mod common;

use std::time::Duration;

use common::node::NodeClient;
use common::{Server, T, encode_segment, eventually};
use serde_json::{Value, json};

/// The test config, with `limits` (TOML lines) added to `[limits]`.
fn config(limits: &str) -> String {
    format!(
        "[limits]\nheartbeat_interval = \"200ms\"\nheartbeat_timeout = \"5s\"\n{limits}\n{TOPICS}"
    )
}

const TOPICS: &str = r#"
[[topics]]
pattern = "user/{sub}/**"
subscribe = "allow"
[[topics]]
pattern = "feed/*"
subscribe = "allow"
history = { size = 100, ttl = "10m" }
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

/// `/sse?topic=…` (topics percent-encoded).
fn sse_path(topics: &[&str]) -> String {
    format!("/sse?{}", common::topics_query(topics))
}

/// An `eventsource` client for `user` on `topics`, its `welcome` and `subscribed` events read.
/// Returns the client and the `subscribed` data, in order.
async fn eventsource(
    server: &Server,
    user: &str,
    topics: &[&str],
    env: &[(&str, &str)],
) -> (NodeClient, Vec<Value>) {
    let mut vars = vec![
        ("URL", format!("{}{}", server.http_url(), sse_path(topics))),
        ("TOKEN", server.token(user, 3600, json!({}))),
    ];
    vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    if !env.iter().any(|(k, _)| *k == "AUTH") {
        vars.push(("AUTH", "header".into()));
    }
    let mut c = NodeClient::spawn("sse_client.mjs", &vars);
    let welcome = wait_for(&mut c, "welcome").await;
    assert_eq!(welcome["data"]["user_id"], user, "{welcome}");
    let mut subscribed = Vec::new();
    for _ in topics {
        subscribed.push(wait_for(&mut c, "subscribed").await["data"].clone());
    }
    (c, subscribed)
}

/// The next line of `event`, every other line before it discarded (heartbeats, and the
/// `error` EventSource reports each time it reconnects).
async fn wait_for(c: &mut NodeClient, event: &str) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let v = c.next(left).await;
        if v["event"] == event {
            return v;
        }
    }
}

/// The next default (`message`) event's data and the id it carried (eventsource's
/// `lastEventId` is the event's own `id:`, empty when it had none).
async fn next_message(c: &mut NodeClient) -> (Value, String) {
    let m = wait_for(c, "message").await;
    let id = m["last_event_id"].as_str().unwrap_or_default().to_owned();
    (m["data"].clone(), id)
}

async fn publish_seq(server: &Server, topic: &str, n: i64) {
    server.publish(topic, "tick", json!({ "n": n })).await;
}

async fn wait_no_clients(server: &Server) {
    eventually(T, "no connection left", || async {
        server.stats().await["total_clients"] == 0
    })
    .await;
}

/// A raw SSE stream read with reqwest.
struct Raw {
    resp: reqwest::Response,
    buf: String,
}

fn raw_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

impl Raw {
    /// `GET path` with `headers`; `Err((status, body))` when not 200.
    async fn open(
        server: &Server,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Raw, (u16, Value)> {
        let mut req = raw_client().get(format!("{}{}", server.http_url(), path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tokio::time::timeout(T, req.send())
            .await
            .expect("no answer")
            .expect("request");
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            return Err((status, body));
        }
        Ok(Raw {
            resp,
            buf: String::new(),
        })
    }

    async fn open_ok(server: &Server, path: &str, headers: &[(&str, &str)]) -> Raw {
        match Raw::open(server, path, headers).await {
            Ok(r) => r,
            Err((s, b)) => panic!("GET {path}: {s} {b}"),
        }
    }

    /// Reads until the text received holds `needle`; returns everything up to its end and
    /// keeps the rest.
    async fn until(&mut self, needle: &str) -> String {
        loop {
            if let Some(i) = self.buf.find(needle) {
                let rest = self.buf.split_off(i + needle.len());
                return std::mem::replace(&mut self.buf, rest);
            }
            let chunk = tokio::time::timeout(T, self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} within {T:?}; got {:?}", self.buf))
                .expect("read the stream")
                .unwrap_or_else(|| panic!("stream ended before {needle:?}; got {:?}", self.buf));
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    /// The next event block (up to its blank line), heartbeat comments skipped.
    async fn next_event(&mut self) -> String {
        loop {
            let block = self.until("\n\n").await;
            if !block.starts_with(':') && !block.trim().is_empty() {
                return block;
            }
        }
    }

    /// Reads until the stream ends; what was left.
    async fn until_end(&mut self) -> String {
        while let Some(chunk) = tokio::time::timeout(T, self.resp.chunk())
            .await
            .expect("stream did not end")
            .expect("read the stream")
        {
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
        std::mem::take(&mut self.buf)
    }
}

/// The `data:` lines of an event block joined, parsed as JSON.
fn data_of(block: &str) -> Value {
    let data: Vec<&str> = block
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    serde_json::from_str(&data.join("\n")).unwrap_or_else(|e| panic!("{e}: {block:?}"))
}

fn field<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    block
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

#[tokio::test]
async fn eventsource_gets_messages_on_two_topics_with_event_ids() {
    let server = Server::start(&config("")).await;
    // Token in the query string.
    let (mut a, subscribed) = eventsource(
        &server,
        "ann",
        &["feed/news", "live/scores"],
        &[("AUTH", "query")],
    )
    .await;
    assert_eq!(subscribed[0], json!({"topic": "feed/news", "seq": 0}));
    assert_eq!(subscribed[1], json!({"topic": "live/scores"}));
    // Token in the Authorization header (through eventsource's `fetch` option).
    let (mut b, _) = eventsource(&server, "ben", &["feed/news"], &[("AUTH", "header")]).await;

    let id = server
        .publish("feed/news", "headline", json!({"title": "one"}))
        .await;
    let (m, last_id) = next_message(&mut a).await;
    assert_eq!(
        (&m["type"], &m["topic"], &m["event"], &m["id"], &m["seq"]),
        (
            &json!("message"),
            &json!("feed/news"),
            &json!("headline"),
            &json!(id),
            &json!(1)
        ),
        "{m}"
    );
    assert_eq!(m["data"], json!({"title": "one"}));
    assert_eq!(last_id, "feed/news@1");
    let (m, last_id) = next_message(&mut b).await;
    assert_eq!(
        (m["seq"].as_u64(), last_id.as_str()),
        (Some(1), "feed/news@1")
    );

    // A topic without history: no seq, and no `id:` (the stream's last id stays as it was).
    server
        .publish("live/scores", "goal", json!({"home": 1}))
        .await;
    let (m, last_id) = next_message(&mut a).await;
    assert_eq!(m["topic"], "live/scores", "{m}");
    assert!(m.get("seq").is_none(), "{m}");
    assert_eq!(last_id, "");

    // A publisher's raw JSON with line breaks arrives whole (several `data:` lines).
    let body = "{\"topic\":\"feed/news\",\"event\":\"multi\",\"data\":{\n  \"a\": 1,\r\n  \"b\": [2,\n3]\n}}";
    let (s, answer) = server
        .http(
            "POST",
            "/api/v1/publish",
            Some(&server.publish_key),
            Some((body.as_bytes().to_vec(), "application/json")),
        )
        .await;
    assert_eq!(s, 200, "{answer}");
    let (m, last_id) = next_message(&mut a).await;
    assert_eq!(m["data"], json!({"a": 1, "b": [2, 3]}), "{m}");
    assert_eq!(last_id, "feed/news@2");

    drop(a);
    drop(b);
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn eventsource_resumes_exactly_what_it_missed_after_the_server_drops_it() {
    let server = Server::start(&config("")).await;
    let (mut c, _) = eventsource(&server, "cleo", &["feed/a", "feed/b"], &[]).await;
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let mut record = |m: &Value| {
        let seq = m["seq"].as_u64().expect("seq");
        match m["topic"].as_str() {
            Some("feed/a") => got_a.push(seq),
            Some("feed/b") => got_b.push(seq),
            _ => panic!("unexpected message {m}"),
        }
    };
    publish_seq(&server, "feed/a", 1).await;
    publish_seq(&server, "feed/a", 2).await;
    publish_seq(&server, "feed/b", 1).await;
    let mut last_id = String::new();
    for _ in 0..3 {
        let (m, id) = next_message(&mut c).await;
        record(&m);
        last_id = id;
    }
    assert_eq!(last_id, "feed/a@2,feed/b@1");

    // The server drops the stream; messages are published while the client is away.
    let (s, b) = server
        .api_post(
            "/api/v1/users/cleo/disconnect",
            &server.admin_key,
            &json!({}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let close = wait_for(&mut c, "close").await;
    assert_eq!(close["data"]["code"], 4011, "{close}");
    server.wait_presence("cleo", 0, T).await;
    publish_seq(&server, "feed/a", 3).await;
    publish_seq(&server, "feed/b", 2).await;
    publish_seq(&server, "feed/a", 4).await;

    // EventSource reconnects by itself (`retry: 1000`) with the last id.
    let req = wait_for(&mut c, "request").await;
    assert_eq!(req["last_event_id"], "feed/a@2,feed/b@1", "{req}");
    let sa = wait_for(&mut c, "subscribed").await;
    let sb = wait_for(&mut c, "subscribed").await;
    assert_eq!(
        sa["data"],
        json!({"topic": "feed/a", "seq": 4, "recovered": true})
    );
    assert_eq!(
        sb["data"],
        json!({"topic": "feed/b", "seq": 2, "recovered": true})
    );
    for _ in 0..3 {
        let (m, _) = next_message(&mut c).await;
        record(&m);
    }
    publish_seq(&server, "feed/b", 3).await;
    let (m, id) = next_message(&mut c).await;
    record(&m);
    last_id = id;
    assert_eq!(
        got_a,
        [1, 2, 3, 4],
        "feed/a in order, none missed or repeated"
    );
    assert_eq!(got_b, [1, 2, 3], "feed/b in order, none missed or repeated");
    assert_eq!(last_id, "feed/a@4,feed/b@3");

    // The client process dies; a new one resumes with the last id (given here as the query
    // parameter polyfills use).
    drop(c);
    server.wait_presence("cleo", 0, T).await;
    publish_seq(&server, "feed/a", 5).await;
    let path = format!(
        "{}&last_event_id={}",
        sse_path(&["feed/a", "feed/b"]),
        encode_segment(&last_id)
    );
    let mut vars = vec![
        ("URL", format!("{}{}", server.http_url(), path)),
        ("TOKEN", server.token("cleo", 3600, json!({}))),
        ("AUTH", "header".to_owned()),
    ];
    let mut c = NodeClient::spawn("sse_client.mjs", &vars);
    let (m, id) = next_message(&mut c).await;
    assert_eq!(
        (m["topic"].as_str(), m["seq"].as_u64()),
        (Some("feed/a"), Some(5)),
        "{m}"
    );
    assert_eq!(id, "feed/a@5,feed/b@3");
    publish_seq(&server, "feed/b", 4).await;
    let (m, _) = next_message(&mut c).await;
    assert_eq!(
        (m["topic"].as_str(), m["seq"].as_u64()),
        (Some("feed/b"), Some(4)),
        "{m}"
    );
    drop(c);

    // The same with the Last-Event-ID header on a fresh client.
    server.wait_presence("cleo", 0, T).await;
    publish_seq(&server, "feed/a", 6).await;
    vars[0].1 = format!("{}{}", server.http_url(), sse_path(&["feed/a", "feed/b"]));
    vars.push(("LAST_EVENT_ID", "feed/a@5,feed/b@4".to_owned()));
    let mut c = NodeClient::spawn("sse_client.mjs", &vars);
    let req = wait_for(&mut c, "request").await;
    assert_eq!(req["last_event_id"], "feed/a@5,feed/b@4");
    let (m, id) = next_message(&mut c).await;
    assert_eq!(
        (m["topic"].as_str(), m["seq"].as_u64()),
        (Some("feed/a"), Some(6)),
        "{m}"
    );
    assert_eq!(id, "feed/a@6,feed/b@4");
    drop(c);
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn durable_messages_arrive_with_ack_and_the_http_ack_acks_them() {
    let server = Server::start(&config("")).await;
    // One waiting before the client connects (replayed), one published live.
    let (s, b) = server
        .api_post(
            "/api/v1/users/dora/messages",
            &server.publish_key,
            &json!({"event": "order", "data": {"n": 1}, "id": "ord-1"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (mut c, _) = eventsource(&server, "dora", &[], &[]).await;
    let (m, _) = next_message(&mut c).await;
    assert_eq!(
        (m["id"].as_str(), m["ack"].as_bool()),
        (Some("ord-1"), Some(true)),
        "{m}"
    );
    let (s, b) = server
        .api_post(
            "/api/v1/publish",
            &server.publish_key,
            &json!({"topic": "user/dora", "event": "order", "data": {"n": 2}, "id": "ord-2", "durable": true}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (m, _) = next_message(&mut c).await;
    assert_eq!(
        (m["id"].as_str(), m["ack"].as_bool()),
        (Some("ord-2"), Some(true)),
        "{m}"
    );

    // Acked over HTTP with the user's own token.
    let token = server.token("dora", 3600, json!({}));
    let (s, b) = server
        .api_post(
            "/api/v1/ack",
            &token,
            &json!({"ids": ["ord-1", "ord-2", "unknown"]}),
        )
        .await;
    assert_eq!((s, &b), (200, &json!({"acked": 2})));
    let (s, inbox) = server
        .api_get("/api/v1/users/dora/messages", &server.admin_key)
        .await;
    assert_eq!(s, 200, "{inbox}");
    let statuses: Vec<(&str, &str)> = inbox["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses.len(), 2, "{inbox}");
    assert!(statuses.iter().all(|(_, s)| *s == "acked"), "{inbox}");
    // Acked: not replayed to the next stream.
    drop(c);
    let bearer = format!("Bearer {token}");
    let mut raw = Raw::open_ok(&server, "/sse", &[("authorization", &bearer)]).await;
    raw.until("event: welcome").await;
    let seen = raw.until(": ping\n\n").await;
    assert!(!seen.contains("ord-"), "{seen}");

    // The ack endpoint's refusals.
    let (s, b) = server
        .api_post("/api/v1/ack", &token, &json!({"ids": []}))
        .await;
    assert_eq!((s, b["code"].as_u64()), (400, Some(400)), "{b}");
    let (s, b) = server
        .api_post("/api/v1/ack", &token, &json!({"id": "x"}))
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, b) = server
        .api_post("/api/v1/ack", &server.publish_key, &json!({"ids": ["x"]}))
        .await;
    assert_eq!(
        (s, b["code"].as_u64()),
        (401, Some(401)),
        "a server API key is not a user: {b}"
    );
    let (s, _) = server
        .http(
            "POST",
            "/api/v1/ack",
            None,
            Some((b"{\"ids\":[\"x\"]}".to_vec(), "application/json")),
        )
        .await;
    assert_eq!(s, 401);
    drop(raw);
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn the_retained_value_comes_first() {
    let server = Server::start(&config("")).await;
    server
        .publish("device/d-1/telemetry", "telemetry", json!({"t": 20}))
        .await;
    server
        .publish("device/d-1/telemetry", "telemetry", json!({"t": 21}))
        .await;
    let (mut c, _) = eventsource(&server, "eve", &["device/d-1/telemetry"], &[]).await;
    let (m, _) = next_message(&mut c).await;
    assert_eq!(
        (m["retained"].as_bool(), &m["data"]),
        (Some(true), &json!({"t": 21})),
        "{m}"
    );
    server
        .publish("device/d-1/telemetry", "telemetry", json!({"t": 22}))
        .await;
    let (m, _) = next_message(&mut c).await;
    assert_eq!(m["data"], json!({"t": 22}), "{m}");
    assert!(m.get("retained").is_none(), "{m}");
    // The heartbeat comment reaches the real client too.
    wait_for(&mut c, "heartbeat").await;
    drop(c);
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn the_wire_headers_framing_and_heartbeat() {
    let server = Server::start(&config("")).await;
    let token = server.token("finn", 3600, json!({}));
    let path = format!("{}&token={token}", sse_path(&["feed/x", "live/y"]));
    let mut raw = Raw::open_ok(&server, &path, &[]).await;
    let h = raw.resp.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");

    assert_eq!(raw.next_event().await, "retry: 1000\n\n");
    let welcome = raw.next_event().await;
    assert_eq!(field(&welcome, "event"), Some("welcome"));
    let w = data_of(&welcome);
    assert_eq!(w["user_id"], "finn", "{w}");
    assert_eq!(w["heartbeat_ms"], 200, "{w}");
    assert!(
        w["conn_id"].as_str().is_some_and(|c| c.starts_with("c-")),
        "{w}"
    );
    assert!(w["node_id"].is_string(), "{w}");
    let s1 = raw.next_event().await;
    assert_eq!(field(&s1, "event"), Some("subscribed"));
    assert_eq!(
        field(&s1, "id"),
        Some("feed/x@0"),
        "the position is known at once"
    );
    assert_eq!(data_of(&s1), json!({"topic": "feed/x", "seq": 0}));
    let s2 = raw.next_event().await;
    assert_eq!(data_of(&s2), json!({"topic": "live/y"}));

    // Idle: heartbeat comments.
    raw.until(": ping\n\n").await;
    raw.until(": ping\n\n").await;

    server.publish("feed/x", "e", json!({"k": "v"})).await;
    let m = raw.next_event().await;
    assert_eq!(field(&m, "id"), Some("feed/x@1"), "{m:?}");
    assert_eq!(
        field(&m, "event"),
        None,
        "messages are default events: {m:?}"
    );
    assert_eq!(data_of(&m)["data"], json!({"k": "v"}));

    // A token that expires ends the stream with `event: close` 4010.
    let short = server.token("finn", 1, json!({}));
    let mut raw2 = Raw::open_ok(&server, &format!("/sse?token={short}"), &[]).await;
    let rest = raw2.until_end().await;
    let close = rest
        .split("\n\n")
        .find(|b| field(b, "event") == Some("close"))
        .unwrap_or_else(|| panic!("no close event: {rest:?}"));
    assert_eq!(
        data_of(close),
        json!({"code": 4010, "reason": "token expired"})
    );

    drop(raw);
    wait_no_clients(&server).await;
}

#[tokio::test]
async fn refusals_are_http_errors_before_any_stream() {
    let server = Server::start(&config("max_connections_per_user = 1")).await;
    let token = server.token("gil", 3600, json!({}));
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let expect = |r: Result<Raw, (u16, Value)>, status: u16, what: &str| match r {
        Ok(_) => panic!("{what}: a stream started"),
        Err((s, b)) => {
            assert_eq!(
                (s, b["code"].as_u64()),
                (status, Some(status as u64)),
                "{what}: {b}"
            );
            b["message"].as_str().unwrap_or_default().to_owned()
        }
    };
    expect(
        Raw::open(&server, "/sse?topic=feed/a", &[]).await,
        401,
        "no credential",
    );
    expect(
        Raw::open(&server, "/sse?topic=feed/a&token=nope", &[]).await,
        401,
        "bad token",
    );
    let other = common::jwt_hs256(
        "another-secret-entirely-0123456789",
        &common::claims("gil", 60, json!({})),
    );
    expect(
        Raw::open(
            &server,
            "/sse",
            &[("authorization", &format!("Bearer {other}"))],
        )
        .await,
        401,
        "token signed with another key",
    );
    let msg = expect(
        Raw::open(&server, &sse_path(&["feed/a", "secret/x"]), &auth).await,
        403,
        "forbidden topic",
    );
    assert!(msg.contains("secret/x"), "{msg}");
    let msg = expect(
        Raw::open(&server, &sse_path(&["feed//a"]), &auth).await,
        400,
        "bad topic",
    );
    assert!(msg.contains("feed//a"), "{msg}");
    expect(
        Raw::open(
            &server,
            &sse_path(&["feed/a"]),
            &[auth[0], ("last-event-id", "feed/a")],
        )
        .await,
        400,
        "Last-Event-ID without @seq",
    );
    expect(
        Raw::open(
            &server,
            &sse_path(&["feed/a"]),
            &[auth[0], ("last-event-id", "feed/a@x")],
        )
        .await,
        400,
        "Last-Event-ID with a bad seq",
    );
    expect(
        Raw::open(
            &server,
            &format!("{}&last_event_id=%2C", sse_path(&["feed/a"])),
            &auth,
        )
        .await,
        400,
        "malformed last_event_id",
    );
    // No session was left behind by any refusal.
    assert_eq!(server.stats().await["total_clients"], 0);

    // Per-user connection limit.
    let first = Raw::open_ok(&server, &sse_path(&["feed/a"]), &auth).await;
    expect(
        Raw::open(&server, "/sse", &auth).await,
        429,
        "second connection",
    );
    drop(first);
    wait_no_clients(&server).await;
    let again = Raw::open_ok(&server, "/sse", &auth).await;
    drop(again);
    wait_no_clients(&server).await;

    // Every session opened was closed once: the refused topics and Last-Event-ID never
    // opened one (checked before), the two streams and the one over the limit did.
    let metrics = server.metrics().await;
    let count = |key: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let closed = |reason: &str| {
        count(&format!(
            "herald_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(
        (
            count("herald_connections_opened_total{transport=\"sse\"}"),
            closed("client"),
            closed("too_many_connections"),
            closed("refused"),
        ),
        (5, 2, 1, 2),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_draining_node_ends_the_stream_with_retry() {
    let mut server = Server::start(&config("")).await;
    let token = server.token("hank", 3600, json!({}));
    let mut raw = Raw::open_ok(&server, &format!("/sse?token={token}"), &[]).await;
    raw.until("event: welcome").await;
    let started = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    // The node's `reconnect` becomes the browser's reconnection delay, and the stream ends.
    let rest = raw.until_end().await;
    let retry = rest
        .split("\n\n")
        .filter_map(|b| field(b, "retry"))
        .last()
        .unwrap_or_else(|| panic!("no retry: {rest:?}"));
    assert!(retry.parse::<u64>().is_ok(), "{rest:?}");
    assert!(!rest.contains("event: close"), "{rest:?}");
    let status = server.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the drain waited for the stream: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_is_dropped() {
    let server = Server::start(&config(
        "write_timeout = \"500ms\"\nsend_queue = 16\nslow_consumer_timeout = \"200ms\"",
    ))
    .await;
    let token = server.token("ida", 3600, json!({}));
    // A raw socket that sends the request and never reads the answer.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET /sse?topic=live%2Fbig&token={token} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, req.as_bytes())
        .await
        .unwrap();
    server.wait_subscribers("live/big", 1).await;
    let blob = "x".repeat(64 * 1024);
    for n in 0..400 {
        server
            .publish("live/big", "blob", json!({"n": n, "blob": blob}))
            .await;
        if server.stats().await["total_clients"] == 0 {
            break;
        }
    }
    eventually(
        Duration::from_secs(10),
        "the stuck stream is dropped",
        || async { server.stats().await["total_clients"] == 0 },
    )
    .await;
    let metrics = server.metrics().await;
    assert!(
        !metrics.contains("herald_slow_consumers_total 0\n"),
        "counted as a slow consumer: {metrics}"
    );
    drop(tcp);
}
