//! The durable inbox on the memory store: every tab of the user gets an inbox message whatever
//! it subscribed to; a backlog larger than the send queue never locks the user out; duplicate
//! ids are flagged and delivered once. Retransmission, failure and replay are exercised on
//! every store, this one included, in `durable_sql.rs`.

mod common;

use std::time::Duration;

use common::Server;
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn inbox_messages_below_user_reach_every_tab() {
    let server = Server::start("").await;
    let mut tab1 = server.connect_user("carol").await;
    let mut tab2 = server.connect_user("carol").await;
    // Only tab1 subscribes to the sub-topic explicitly; the durable message is an inbox
    // message, so both tabs get it.
    tab1.subscribe("user/carol/orders").await;
    let (s, body) = server
        .api_post(
            "/api/v1/publish",
            &server.publish_key,
            &json!({"topic": "user/carol/orders", "event": "order", "data": {"n": 1}, "durable": true}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    for tab in [&mut tab1, &mut tab2] {
        let m = tab.recv_message("user/carol/orders").await;
        assert_eq!(m["ack"], true, "{m}");
        assert_eq!(m["data"]["n"], 1, "{m}");
        tab.expect_no_message(QUIET).await;
    }
}

#[tokio::test]
async fn a_backlog_larger_than_the_queue_is_replayed_in_turns() {
    let server = Server::start("[limits]\nsend_queue = 4\n").await;
    for i in 0..10 {
        let (s, body) = server
            .api_post(
                "/api/v1/users/dave/messages",
                &server.publish_key,
                &json!({"event": "n", "data": {"i": i}}),
            )
            .await;
        assert_eq!(s, 200, "{body}");
    }
    // Each connect replays at most one queue's worth, oldest first; acked ones are not
    // replayed again, so three connects drain all ten in order.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let mut ws = server.connect_user("dave").await;
        let mut ids = Vec::new();
        for _ in 0..4 {
            if seen.len() == 10 {
                break;
            }
            let m = ws.recv_message("user/dave").await;
            ids.push(m["id"].as_str().expect("id").to_owned());
            seen.push(m["data"]["i"].as_i64().expect("i"));
        }
        let id = ws.next_id();
        let r = ws
            .request(json!({"type": "ack", "id": id, "ids": ids}))
            .await;
        assert_eq!(r["code"], 0, "{r}");
        ws.assert_alive().await;
    }
    assert_eq!(seen, (0..10).collect::<Vec<i64>>());
}

#[tokio::test]
async fn a_duplicate_id_is_flagged_and_delivered_once() {
    let server = Server::start("").await;
    let mut ws = server.connect_user("erin").await;
    let body = json!({"event": "n", "data": {}, "id": "order-77"});
    let (s, first) = server
        .api_post("/api/v1/users/erin/messages", &server.publish_key, &body)
        .await;
    assert_eq!(
        (s, first["status"].as_str()),
        (200, Some("pending")),
        "{first}"
    );
    let (s, second) = server
        .api_post("/api/v1/users/erin/messages", &server.publish_key, &body)
        .await;
    assert_eq!(
        (s, second["status"].as_str()),
        (200, Some("duplicate")),
        "{second}"
    );
    let publish =
        json!({"topic": "user/erin", "event": "n", "data": {}, "id": "order-77", "durable": true});
    let (s, third) = server
        .api_post("/api/v1/publish", &server.publish_key, &publish)
        .await;
    assert_eq!(
        (s, third["status"].as_str()),
        (200, Some("duplicate")),
        "{third}"
    );
    let m = ws.recv_message("user/erin").await;
    assert_eq!(m["id"], "order-77");
    ws.expect_no_message(QUIET).await;
}

#[tokio::test]
async fn every_api_error_is_json() {
    let server = Server::start("").await;
    // Wrong method, bad query string, unknown path.
    let client = reqwest::Client::new();
    let base = server.http_url();
    let r = client
        .delete(format!("{base}/api/v1/publish"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 405);
    let v: serde_json::Value = r.json().await.expect("405 body is JSON");
    assert_eq!(v["code"], 405);
    let r = client
        .get(format!("{base}/api/v1/users/u/messages?limit=lots"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.json().await.expect("400 body is JSON");
    assert_eq!(v["code"], 400);
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let r = client
        .get(format!("{base}/nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 404);
    let v: serde_json::Value = r.json().await.expect("404 body is JSON");
    assert_eq!(v["code"], 404);
}
