//! Topic ACL: the defaults without `[[topics]]`, and configured ordered rules with `{claim}`
//! placeholders (string and array claims), `*`, `**` and role conditions.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn default_rules_without_topics_config() {
    let server = Server::start(
        r#"
[limits]
subscribes_per_second = 1000
"#,
    )
    .await;
    let mut ws = server
        .connect_user_with("alice", json!({"org_id": "7"}))
        .await;

    let allowed = [
        "user/alice/notifications",
        "user/alice/a/b/c",
        "broadcast",
        "global/news",
        "global/a/b",
        "org/7/terminals/status",
        "room/lobby",
    ];
    for topic in allowed {
        let r = ws.subscribe(topic).await;
        assert_eq!(r["code"], 0, "subscribe {topic}: {r}");
    }
    let denied = [
        "user/bob",
        "user/bob/notifications",
        "org/8/terminals/status",
        "room/lobby/nested",
        "device/d-9/telemetry",
        "admin/stats",
        "task/t-1/summary",
    ];
    for topic in denied {
        let r = ws.subscribe(topic).await;
        assert_eq!(r["code"], 403, "subscribe {topic}: {r}");
        assert_eq!(r["message"], format!("forbidden: {topic}"), "{r}");
    }

    // Client publish: rooms only.
    let r = ws.publish("room/lobby", "chat", json!("hi")).await;
    assert_eq!(r["code"], 0, "{r}");
    for topic in [
        "global/news",
        "org/7/x",
        "user/alice/notifications",
        "broadcast",
    ] {
        let r = ws.publish(topic, "e", json!(1)).await;
        assert_eq!(r["code"], 403, "client publish to {topic}: {r}");
    }

    // Delivery follows the grants: org/7 yes, org/8 (denied) no.
    server
        .publish("org/8/terminals/status", "s", json!(8))
        .await;
    server
        .publish("org/7/terminals/status", "s", json!(7))
        .await;
    loop {
        let m = ws.recv_json(T).await;
        if m["topic"] == "room/lobby" {
            continue; // the echo of our own room publish, if the server sends it
        }
        assert_eq!(m["topic"], "org/7/terminals/status", "{m}");
        assert_eq!(m["data"], 7);
        break;
    }
    ws.expect_no_message(QUIET).await;

    // Without an org_id claim, org topics are denied.
    let mut no_org = server.connect_user("bob").await;
    let r = no_org.subscribe("org/7/terminals/status").await;
    assert_eq!(r["code"], 403, "{r}");
}

const RULES: &str = r#"
[limits]
subscribes_per_second = 1000

[[topics]]
pattern = "user/{sub}/**"
subscribe = "allow"

[[topics]]
pattern = "ops/**"
subscribe = { roles = ["admin"] }

[[topics]]
pattern = "ops/public"
subscribe = "allow"

[[topics]]
pattern = "team/{teams}/chat"
subscribe = "allow"
publish = "allow"

[[topics]]
pattern = "device/*/telemetry"
subscribe = "allow"

[[topics]]
pattern = "room/*"
subscribe = "allow"
publish = "allow"
"#;

#[tokio::test]
async fn configured_rules_first_match_placeholders_roles() {
    let server = Server::start(RULES).await;
    let mut user = server
        .connect_user_with("u1", json!({"teams": ["red", "blue"], "roles": ["viewer"]}))
        .await;
    let mut admin = server
        .connect_user_with("boss", json!({"roles": ["viewer", "admin"]}))
        .await;

    let cases = [
        ("user/u1/inbox", 0),
        ("user/u2/inbox", 403),
        // Rule order: `ops/**` (admins) matches before `ops/public` (allow).
        ("ops/public", 403),
        ("ops/deploys", 403),
        ("team/red/chat", 0),
        ("team/blue/chat", 0),
        ("team/green/chat", 403),
        ("device/d-9/telemetry", 0),
        ("device/d-9/config", 403),
        ("room/lobby", 0),
        // Configured rules replace the defaults: no implicit grant for global/**.
        ("global/news", 403),
    ];
    for (topic, code) in cases {
        let r = user.subscribe(topic).await;
        assert_eq!(r["code"], code, "u1 subscribe {topic}: {r}");
        if code == 403 {
            assert_eq!(r["message"], format!("forbidden: {topic}"), "{r}");
        }
    }
    for topic in ["ops/deploys", "ops/public"] {
        let r = admin.subscribe(topic).await;
        assert_eq!(r["code"], 0, "admin subscribe {topic}: {r}");
    }

    // Publish permissions from the rules.
    let r = user.publish("team/red/chat", "chat", json!("hi")).await;
    assert_eq!(r["code"], 0, "{r}");
    let r = user.publish("team/green/chat", "chat", json!("hi")).await;
    assert_eq!(r["code"], 403, "{r}");
    let r = user
        .publish("device/d-9/telemetry", "t", json!({"v": 1}))
        .await;
    assert_eq!(
        r["code"], 403,
        "subscribe-only rule must refuse publish: {r}"
    );

    // Deliveries follow the grants.
    server
        .publish("ops/deploys", "deploy", json!({"v": 2}))
        .await;
    let m = admin.recv_message("ops/deploys").await;
    assert_eq!(m["data"], json!({"v": 2}));
    server
        .publish("device/d-9/telemetry", "t", json!({"temp": 21}))
        .await;
    loop {
        let m = user.recv_json(T).await;
        if m["topic"] == "team/red/chat" {
            continue; // echo of u1's own publish, if any
        }
        assert_eq!(m["topic"], "device/d-9/telemetry", "{m}");
        break;
    }
    user.expect_no_message(QUIET).await;
}
