//! Seed 001's telemetry compatibility endpoints through the real binary
//! (crates/herald-server/src/telemetry.rs, docs/TELEMETRY.md): the exact first frames of the
//! seed, the latest value at once, bare pushes with `systime`, `keys`, `pong`, refusals, the
//! seed-001 envelope from Redis `ws:device:{id}`, and the cluster's `ws:sub:{deviceID}` counter.

mod common;

use common::*;
use serde_json::{Value, json};

const CURRENT: &str = "/api/v1/telemetry/datas/current/ws";
const KEYS: &str = "/api/v1/telemetry/datas/current/keys/ws";

/// Operators may watch any device; the device topics keep their last value.
const RULES: &str = r#"
[[topics]]
pattern = "user/{sub}/**"
subscribe = "allow"
[[topics]]
pattern = "device/*/telemetry"
subscribe = { roles = ["operator"] }
retain = true
"#;

fn url(server: &Server, path: &str) -> String {
    format!("ws://{}{path}", server.addr)
}

fn device() -> String {
    format!("d-{}", random_hex(6))
}

fn operator_token(server: &Server, user: &str) -> String {
    server.token(user, 3600, json!({"roles": ["operator"]}))
}

/// Connects to `path` without a handshake credential and sends `first` as the first frame.
async fn open(server: &Server, path: &str, first: &Value) -> Ws {
    let mut ws = connect(&url(server, path), None)
        .await
        .unwrap_or_else(|e| panic!("connect {path}: {e:?}"));
    ws.send_json(first).await;
    ws
}

/// Expects the error frame `{"code":code,"message":…}` then a close with `close`; returns the
/// message.
async fn expect_refusal(ws: &mut Ws, code: u16, close: u16) -> String {
    let e = ws.recv_json(T).await;
    assert_eq!(e["code"], code, "error frame: {e}");
    assert_eq!(
        e.as_object().map(|o| o.len()),
        Some(2),
        "only code and message: {e}"
    );
    let message = e["message"].as_str().expect("message").to_owned();
    let (c, _) = ws.expect_close(T).await;
    assert_eq!(c, close, "close code after {e}");
    message
}

/// Parses the `systime` format: RFC 3339 in UTC, `YYYY-MM-DDTHH:MM:SSZ` or
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, into Unix milliseconds; panics on anything else.
fn systime_ms(v: &Value) -> i64 {
    let s = v["systime"]
        .as_str()
        .unwrap_or_else(|| panic!("no systime string: {v}"));
    let shape_ok =
        s.ends_with('Z') && (s.len() == 20 || (s.len() == 24 && s.as_bytes()[19] == b'.'));
    assert!(
        shape_ok,
        "systime is not RFC 3339 UTC with 0 or 3 fraction digits: {s:?}"
    );
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("systime {s:?} is not RFC 3339: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Publishes `data` to the device's topic through the API; returns the wall-clock window
/// (Unix ms) the publish happened in.
async fn publish(server: &Server, device: &str, data: Value) -> (i64, i64) {
    let before = now_millis();
    server
        .publish(&format!("device/{device}/telemetry"), "telemetry", data)
        .await;
    (before, now_millis())
}

/// The next push, checked to be `expected` plus a `systime` within a second of `at`.
async fn expect_push(ws: &mut Ws, expected: Value, at: (i64, i64)) -> Value {
    let mut v = ws.recv_json(T).await;
    let t = systime_ms(&v);
    assert!(
        t >= at.0 - 1000 && t <= at.1 + 1000,
        "systime {} not within a second of the publish ({at:?}): {v}",
        v["systime"]
    );
    let pushed = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("systime");
    }
    assert_eq!(v, expected, "pushed fields");
    pushed
}

#[tokio::test]
async fn current_endpoint_sends_the_latest_value_then_every_update() {
    let server = Server::start(RULES).await;
    let d = device();
    let at = publish(&server, &d, json!({"temperature": 25.5, "humidity": 60})).await;

    // Seed 001's first frame, exactly.
    let token = operator_token(&server, "alice");
    let mut ws = open(&server, CURRENT, &json!({"device_id": d, "token": token})).await;
    // The latest value at once (the retained message), as a bare object.
    expect_push(&mut ws, json!({"temperature": 25.5, "humidity": 60}), at).await;

    // Every update, in order; a publisher field named systime is replaced.
    let at = publish(&server, &d, json!({"temperature": 25.6, "humidity": 61})).await;
    expect_push(&mut ws, json!({"temperature": 25.6, "humidity": 61}), at).await;
    let at = publish(&server, &d, json!({"temperature": 25.7, "systime": "x"})).await;
    expect_push(&mut ws, json!({"temperature": 25.7}), at).await;
    // Not an object: {"value": …}.
    let at = publish(&server, &d, json!(42)).await;
    expect_push(&mut ws, json!({"value": 42}), at).await;

    // Heartbeats: "ping" and any other text frame are answered with a bare "pong".
    for text in ["ping", "hello", "{\"type\":\"ping\"}"] {
        ws.send_text(text).await;
        assert_eq!(ws.recv_text(T).await, "pong", "answer to {text:?}");
    }

    // Another device's data and the user's inbox messages never reach this socket.
    publish(&server, &device(), json!({"temperature": 1})).await;
    let (s, b) = server
        .api_post(
            "/api/v1/users/alice/messages",
            &server.publish_key,
            &json!({"event": "n", "data": {"title": "hi"}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    ws.expect_no_message(QUIET).await;
    let at = publish(&server, &d, json!({"temperature": 26})).await;
    expect_push(&mut ws, json!({"temperature": 26}), at).await;

    // A device with no value yet: nothing first, then the first update.
    let fresh = device();
    let mut ws2 = open(
        &server,
        CURRENT,
        &json!({"device_id": fresh, "token": token}),
    )
    .await;
    server
        .wait_subscribers(&format!("device/{fresh}/telemetry"), 1)
        .await;
    ws2.expect_no_message(QUIET).await;
    let at = publish(&server, &fresh, json!({"on": true})).await;
    expect_push(&mut ws2, json!({"on": true}), at).await;

    // A closed socket leaves the topic.
    ws2.close().await;
    server
        .wait_subscribers(&format!("device/{fresh}/telemetry"), 0)
        .await;
}

#[tokio::test]
async fn api_keys_and_handshake_credentials() {
    let key = format!("dashboard-key-{}", random_hex(12));
    let server = Server::start(&format!(
        "{RULES}\n[[auth.client_keys]]\nkey = \"{key}\"\nuser = \"dashboard\"\nroles = [\"operator\"]\n"
    ))
    .await;
    let d = device();
    let at = publish(&server, &d, json!({"temperature": 20})).await;

    // {"device_id","api_key"}: seed 001's other first frame.
    let mut ws = open(&server, CURRENT, &json!({"device_id": d, "api_key": key})).await;
    expect_push(&mut ws, json!({"temperature": 20}), at).await;
    // The keys endpoint takes an api_key too.
    let mut wk = open(
        &server,
        KEYS,
        &json!({"device_id": d, "keys": ["temperature"], "api_key": key}),
    )
    .await;
    expect_push(&mut wk, json!({"temperature": 20}), at).await;

    // The credential in the handshake (Authorization: Bearer, ?token=); the first frame then
    // only names the device.
    let token = operator_token(&server, "bob");
    let mut wb = connect(&url(&server, CURRENT), Some(&token))
        .await
        .expect("bearer");
    wb.send_json(&json!({"device_id": d})).await;
    expect_push(&mut wb, json!({"temperature": 20}), at).await;
    let mut wq = connect(&format!("{}?token={token}", url(&server, KEYS)), None)
        .await
        .expect("?token=");
    wq.send_json(&json!({"device_id": d, "keys": ["temperature"]}))
        .await;
    expect_push(&mut wq, json!({"temperature": 20}), at).await;

    // A bad handshake credential is refused before the upgrade, as on /ws.
    let refused = connect(&url(&server, CURRENT), Some("not-a-token"))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(refused.json()["code"], 401);

    let at = publish(&server, &d, json!({"temperature": 21, "humidity": 5})).await;
    expect_push(&mut ws, json!({"temperature": 21, "humidity": 5}), at).await;
    expect_push(&mut wk, json!({"temperature": 21}), at).await;
    expect_push(&mut wb, json!({"temperature": 21, "humidity": 5}), at).await;
    expect_push(&mut wq, json!({"temperature": 21}), at).await;
}

#[tokio::test]
async fn keys_endpoint_sends_only_the_named_fields() {
    let server = Server::start(RULES).await;
    let d = device();
    let at = publish(
        &server,
        &d,
        json!({"temperature": 25.5, "humidity": 60, "pressure": 1013}),
    )
    .await;
    let token = operator_token(&server, "carol");
    // Seed 001's keys frame, exactly.
    let mut ws = open(
        &server,
        KEYS,
        &json!({"device_id": d, "keys": ["temperature", "humidity"], "token": token}),
    )
    .await;
    // Also on the plain endpoint, keys filter when given.
    let mut wc = open(
        &server,
        CURRENT,
        &json!({"device_id": d, "keys": ["pressure"], "token": token}),
    )
    .await;
    let first = expect_push(&mut ws, json!({"temperature": 25.5, "humidity": 60}), at).await;
    assert!(first.get("pressure").is_none(), "{first}");
    expect_push(&mut wc, json!({"pressure": 1013}), at).await;

    // An update holding none of the keys is not pushed at all.
    let at = publish(&server, &d, json!({"pressure": 1014, "voltage": 3.3})).await;
    expect_push(&mut wc, json!({"pressure": 1014}), at).await;
    ws.expect_no_message(QUIET).await;
    // A partial update: only what it has.
    let at = publish(&server, &d, json!({"humidity": 61, "pressure": 1015})).await;
    expect_push(&mut ws, json!({"humidity": 61}), at).await;
    expect_push(&mut wc, json!({"pressure": 1015}), at).await;
    let at = publish(
        &server,
        &d,
        json!({"humidity": 62, "wind": 3, "temperature": 26}),
    )
    .await;
    expect_push(&mut ws, json!({"humidity": 62, "temperature": 26}), at).await;
    expect_no_more(&mut wc).await;
}

/// Nothing but Pings for a moment.
async fn expect_no_more(ws: &mut Ws) {
    ws.expect_no_message(QUIET).await;
}

#[tokio::test]
async fn refusals_send_an_error_frame_then_close() {
    let server = Server::start(&format!("{RULES}\n[limits]\nauth_timeout = \"700ms\"\n")).await;
    let d = device();
    let operator = operator_token(&server, "op");
    let viewer = server.token("viewer", 3600, json!({}));

    // A device the user may not watch: 403, close 1008.
    let mut ws = open(&server, CURRENT, &json!({"device_id": d, "token": viewer})).await;
    let m = expect_refusal(&mut ws, 403, 1008).await;
    assert!(m.contains(&format!("device/{d}/telemetry")), "{m}");

    // Bad first frames: 400, close 1008.
    let bad: Vec<(&str, Value)> = vec![
        (CURRENT, json!("not json")),
        (CURRENT, json!({"token": operator})),
        (CURRENT, json!({"device_id": "", "token": operator})),
        (CURRENT, json!({"device_id": "a/b", "token": operator})),
        (CURRENT, json!({"device_id": 7, "token": operator})),
        (KEYS, json!({"device_id": d, "token": operator})),
        (KEYS, json!({"device_id": d, "keys": [], "token": operator})),
        (
            KEYS,
            json!({"device_id": d, "keys": "temperature", "token": operator}),
        ),
        (
            KEYS,
            json!({"device_id": d, "keys": ["a", ""], "token": operator}),
        ),
        (
            KEYS,
            json!({"device_id": d, "keys": [1], "token": operator}),
        ),
        (
            KEYS,
            json!({"device_id": d, "keys": (0..65).map(|i| format!("k{i}")).collect::<Vec<_>>(), "token": operator}),
        ),
    ];
    for (path, first) in &bad {
        let mut ws = connect(&url(&server, path), None).await.expect("connect");
        match first {
            // Raw text, not a JSON string literal.
            Value::String(s) => ws.send_text(s).await,
            v => ws.send_json(v).await,
        }
        let m = expect_refusal(&mut ws, 400, 1008).await;
        assert!(!m.is_empty(), "{path} {first}");
    }

    // Credentials: bad token, expired token, none at all: 401, close 4001.
    let expired = server.token("op", -3600, json!({"roles": ["operator"]}));
    for first in [
        json!({"device_id": d, "token": "garbage"}),
        json!({"device_id": d, "token": expired}),
        json!({"device_id": d, "api_key": "unknown-key-0123456789"}),
        json!({"device_id": d}),
    ] {
        let mut ws = open(&server, CURRENT, &first).await;
        expect_refusal(&mut ws, 401, 4001).await;
    }
    // No first frame within auth_timeout: 401, close 4001.
    let mut ws = connect(&url(&server, CURRENT), None)
        .await
        .expect("connect");
    let m = expect_refusal(&mut ws, 401, 4001).await;
    assert!(m.contains("timeout"), "{m}");

    // The server still serves the next client.
    let mut ok = open(
        &server,
        CURRENT,
        &json!({"device_id": d, "token": operator}),
    )
    .await;
    server
        .wait_subscribers(&format!("device/{d}/telemetry"), 1)
        .await;
    let at = publish(&server, &d, json!({"temperature": 1})).await;
    expect_push(&mut ok, json!({"temperature": 1}), at).await;
    ok.send_text("ping").await;
    assert_eq!(ok.recv_text(T).await, "pong");

    let metrics = server.metrics().await;
    let count =
        |kind: &str| metric_sum(&metrics, "herald_errors_total", &[("kind", kind)]).unwrap_or(0.0);
    assert!(count("forbidden") >= 1.0, "{metrics}");
    assert!(count("bad_request") >= bad.len() as f64, "{metrics}");
    assert!(count("unauthenticated") >= 5.0, "{metrics}");
}

async fn redis_publish(channel: &str, payload: &Value) {
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connect");
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload.to_string())
        .query_async(&mut c)
        .await
        .expect("PUBLISH");
}

#[tokio::test]
async fn seed001_envelope_from_redis_is_pushed_as_its_inner_fields() {
    let prefix = format!("herald:ingest:t{}:", random_hex(6));
    let server = Server::start(&format!(
        "{RULES}\n[ingest.redis]\nurl = \"redis://127.0.0.1:6379\"\nelection_prefix = \"{prefix}\"\n"
    ))
    .await;
    let d = device();
    let token = operator_token(&server, "dan");
    let mut ws = open(&server, CURRENT, &json!({"device_id": d, "token": token})).await;
    let mut wk = open(
        &server,
        KEYS,
        &json!({"device_id": d, "keys": ["humidity"], "token": token}),
    )
    .await;
    server
        .wait_subscribers(&format!("device/{d}/telemetry"), 2)
        .await;

    // Seed 001 §4.2's message, published by an uplink on ws:device:{deviceID}.
    let envelope = json!({
        "device_id": d,
        "tenant_id": "t-1",
        "timestamp": 1737369000,
        "data": {"temperature": 25.5, "humidity": 60}
    });
    redis_publish(&format!("ws:device:{d}"), &envelope).await;
    let v = ws.recv_json(T).await;
    assert_eq!(
        v,
        json!({"temperature": 25.5, "humidity": 60, "systime": "2025-01-20T10:30:00Z"})
    );
    let v = wk.recv_json(T).await;
    assert_eq!(
        v,
        json!({"humidity": 60, "systime": "2025-01-20T10:30:00Z"})
    );

    // A timestamp in milliseconds keeps them; none at all: the time Herald received it.
    let mut e = envelope.clone();
    e["timestamp"] = json!(1737369005123i64);
    e["data"] = json!({"temperature": 25.6});
    redis_publish(&format!("ws:device:{d}"), &e).await;
    let v = ws.recv_json(T).await;
    assert_eq!(
        v,
        json!({"temperature": 25.6, "systime": "2025-01-20T10:30:05.123Z"})
    );
    wk.expect_no_message(QUIET).await;
    let mut e = envelope.clone();
    e.as_object_mut().expect("object").remove("timestamp");
    let before = now_millis();
    redis_publish(&format!("ws:device:{d}"), &e).await;
    expect_push(
        &mut ws,
        json!({"temperature": 25.5, "humidity": 60}),
        (before, now_millis()),
    )
    .await;
    expect_push(&mut wk, json!({"humidity": 60}), (before, now_millis())).await;

    // The last one is the device's current value for the next viewer.
    let mut late = open(
        &server,
        KEYS,
        &json!({"device_id": d, "keys": ["temperature"], "token": token}),
    )
    .await;
    expect_push(
        &mut late,
        json!({"temperature": 25.5}),
        (before, now_millis()),
    )
    .await;
}

/// `GET key` on the local Redis (`None`: no such key).
async fn redis_get(key: &str) -> Option<String> {
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connect");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("GET")
}

/// Deletes the keys a test cluster left under `prefix` (best effort).
async fn redis_remove_prefix(prefix: &str) {
    let Ok(client) = redis::Client::open("redis://127.0.0.1:6379") else {
        return;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
    }
}

#[tokio::test]
async fn the_interest_counter_counts_telemetry_viewers() {
    let db = PgSchema::new();
    let prefix = format!("t{}", random_hex(8));
    let server = Server::start(&format!(
        "[bus]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\npresence_ttl = \"3s\"\nlinger = \"200ms\"\n\
         [store]\nurl = \"{}\"\n{RULES}",
        db.url
    ))
    .await;
    eventually(T, "node ready", || server.is_ready()).await;
    let d = device();
    let key = format!("ws:sub:{d}");
    assert_eq!(redis_get(&key).await, None, "nobody watches {d} yet");

    let token = operator_token(&server, "erin");
    let mut ws = open(&server, CURRENT, &json!({"device_id": d, "token": token})).await;
    eventually(T, "ws:sub counter = 1", || {
        let key = key.clone();
        async move { redis_get(&key).await.as_deref() == Some("1") }
    })
    .await;
    let mut wk = open(
        &server,
        KEYS,
        &json!({"device_id": d, "keys": ["t"], "token": token}),
    )
    .await;
    eventually(T, "ws:sub counter = 2", || {
        let key = key.clone();
        async move { redis_get(&key).await.as_deref() == Some("2") }
    })
    .await;

    // Published through the cluster's bus, delivered to both.
    let at = publish(&server, &d, json!({"t": 1, "u": 2})).await;
    expect_push(&mut ws, json!({"t": 1, "u": 2}), at).await;
    expect_push(&mut wk, json!({"t": 1}), at).await;

    ws.close().await;
    eventually(T, "ws:sub counter = 1", || {
        let key = key.clone();
        async move { redis_get(&key).await.as_deref() == Some("1") }
    })
    .await;
    wk.close().await;
    eventually(T, "ws:sub counter gone", || {
        let key = key.clone();
        async move { matches!(redis_get(&key).await.as_deref(), None | Some("0")) }
    })
    .await;
    drop(server);
    redis_remove_prefix(&prefix).await;
}

#[tokio::test]
async fn server_side_closes_token_expiry_and_drain() {
    let mut server = Server::start(&format!("{RULES}\n[server]\ndrain_spread = \"300ms\"\n")).await;
    let d = device();

    // Disconnected by the server API: 4011, like /ws.
    let token = operator_token(&server, "frank");
    let mut ws = open(&server, CURRENT, &json!({"device_id": d, "token": token})).await;
    server
        .wait_subscribers(&format!("device/{d}/telemetry"), 1)
        .await;
    let (s, b) = server
        .api_post(
            "/api/v1/users/frank/disconnect",
            &server.admin_key,
            &json!({}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(ws.expect_close(T).await.0, 4011);

    // A token that expires: 4010 at its exp (these clients cannot refresh).
    let short = server.token("gina", 2, json!({"roles": ["operator"]}));
    let mut ws = open(
        &server,
        KEYS,
        &json!({"device_id": d, "keys": ["t"], "token": short}),
    )
    .await;
    assert_eq!(ws.expect_close(T).await.0, 4010);
    assert!(ws.skipped.is_empty(), "{:?}", ws.skipped);

    // Drain: no JSON v1 `reconnect` frame (these clients do not know it), a close 1012.
    let mut a = open(
        &server,
        CURRENT,
        &json!({"device_id": d, "token": operator_token(&server, "h1")}),
    )
    .await;
    let mut b = open(
        &server,
        KEYS,
        &json!({"device_id": d, "keys": ["t"], "token": operator_token(&server, "h2")}),
    )
    .await;
    server
        .wait_subscribers(&format!("device/{d}/telemetry"), 2)
        .await;
    server.signal(libc::SIGTERM);
    for ws in [&mut a, &mut b] {
        let (code, _) = ws.expect_close(T).await;
        assert_eq!(code, 1012);
        assert!(
            ws.skipped.is_empty(),
            "nothing but the close: {:?}",
            ws.skipped
        );
    }
    assert!(server.wait_exit(T).await.success());
}

#[tokio::test]
async fn the_user_connection_limit_applies() {
    let server = Server::start(&format!(
        "{RULES}\n[limits]\nmax_connections_per_user = 1\n"
    ))
    .await;
    let d = device();
    let token = operator_token(&server, "ivy");
    let mut first = open(&server, CURRENT, &json!({"device_id": d, "token": token})).await;
    server
        .wait_subscribers(&format!("device/{d}/telemetry"), 1)
        .await;
    let mut second = open(&server, CURRENT, &json!({"device_id": d, "token": token})).await;
    let m = expect_refusal(&mut second, 429, 4029).await;
    assert_eq!(m, "too many connections for this user");
    first.send_text("ping").await;
    assert_eq!(first.recv_text(T).await, "pong");
}
