//! The Rust client crate (`herald_client::Client` and `Publisher`) against the real binary.

mod common;

use std::time::Duration;

use common::*;
use herald_client::{
    Client, ClientError, ConnectOptions, Event, PublishError, PublishRequest, Publisher,
    TokenPlacement,
};
use serde_json::json;

#[tokio::test]
async fn client_and_publisher_round_trip() {
    let server = Server::start("").await;
    let publisher = Publisher::new(&server.http_url(), &server.publish_key);

    // Every token placement gets a welcome.
    let token = server.token("alice", 3600, json!({}));
    let mut clients = Vec::new();
    for placement in [
        TokenPlacement::Header,
        TokenPlacement::Query,
        TokenPlacement::FirstFrame,
    ] {
        let mut opts = ConnectOptions::new(server.ws_url(), token.clone());
        opts.placement = placement;
        opts.timeout = T;
        let c = Client::connect_with(opts)
            .await
            .unwrap_or_else(|e| panic!("{placement:?}: {e}"));
        assert_eq!(c.welcome().user_id, "alice");
        assert_eq!(c.welcome().protocol, "herald.json.v1");
        clients.push(c);
    }
    let mut c = clients.remove(0);

    let r = c.subscribe(&["global/news", "user/bob/x"]).await.unwrap();
    assert_eq!(r.code, 403, "{:?}", r.raw);
    assert!(r.raw["results"][0]["code"] == 0, "{:?}", r.raw);
    assert!(c.join_room("lobby").await.unwrap().is_ok());

    let mut req = PublishRequest::new("global/news", "headline", json!({"t": 1}));
    req.id = Some("client-test-1".into());
    req.trace_id = Some("t-client".into());
    let resp = publisher.publish(&req).await.expect("publish");
    assert_eq!(resp.id, "client-test-1");
    let m = c.next_message().await.expect("message");
    assert_eq!(m.topic, "global/news");
    assert_eq!(m.id, "client-test-1");
    assert_eq!(m.trace_id.as_deref(), Some("t-client"));
    assert_eq!(m.data, json!({"t": 1}));

    publisher
        .send_to_room("lobby", "chat", json!("hi"))
        .await
        .expect("room message");
    assert_eq!(c.next_message().await.unwrap().topic, "room/lobby");

    let sent = publisher
        .send_to_user("alice", "notification", json!({"n": 1}), true)
        .await
        .expect("user message");
    let m = c.next_message().await.unwrap();
    assert_eq!(m.topic, "user/alice");
    assert!(m.ack, "durable message: {m:?}");
    assert_eq!(json!(m.id), sent["id"]);
    assert!(c.ack(std::slice::from_ref(&m.id)).await.unwrap().is_ok());

    assert_eq!(publisher.topic_subscribers("global/news").await.unwrap(), 1);
    assert_eq!(publisher.presence("alice").await.unwrap()["connections"], 3);

    // Errors map to PublishError::Api with the server's code.
    match publisher.disconnect_user("alice").await {
        Err(PublishError::Api {
            status: 403,
            code: 403,
            ..
        }) => {}
        other => panic!("disconnect with a publish key: {other:?}"),
    }
    match publisher
        .publish(&PublishRequest::new("a//b", "e", json!(1)))
        .await
    {
        Err(PublishError::Api {
            status: 400,
            message,
            ..
        }) => {
            assert!(message.contains("invalid topic"), "{message}")
        }
        other => panic!("invalid topic: {other:?}"),
    }

    // Revocation through the admin publisher closes the client with 4011.
    let admin = Publisher::new(&server.http_url(), &server.admin_key);
    admin
        .revoke(None, Some("alice"), None)
        .await
        .expect("revoke");
    match c.next_message().await {
        Err(ClientError::ClosedWith { code: 4011, .. }) => {}
        other => panic!("after revocation: {other:?}"),
    }
}

#[tokio::test]
async fn client_sees_refusals_errors_and_drain() {
    let mut server = Server::start("").await;

    let bad = server.token("u1", -3600, json!({}));
    match Client::connect(&server.ws_url(), &bad).await {
        Err(ClientError::Handshake {
            status: Some(401),
            body,
        }) => {
            assert!(body.contains("401"), "{body}")
        }
        other => panic!("expired token: {other:?}"),
    }

    let mut c = Client::connect(&server.ws_url(), &server.token("u1", 3600, json!({})))
        .await
        .expect("connect");
    c.set_timeout(T);
    c.send_text("{nope").await.unwrap();
    match c.next_event().await.unwrap() {
        Event::Error { code: 400, message } => assert!(message.starts_with("malformed JSON")),
        other => panic!("{other:?}"),
    }
    c.ping().await.expect("still alive");

    server.signal(libc::SIGTERM);
    match c.next_event().await.unwrap() {
        Event::Reconnect { reason, .. } => assert_eq!(reason, "node draining"),
        other => panic!("want reconnect, got {other:?}"),
    }
    match c.next_event().await.unwrap() {
        Event::Closed {
            code: Some(1012), ..
        } => {}
        other => panic!("want close 1012, got {other:?}"),
    }
    let status = server.wait_exit(Duration::from_secs(6)).await;
    assert!(status.success());
}
