//! The publisher against a canned in-test HTTP/1.1 server on 127.0.0.1:0 that records the
//! one request it gets and answers a fixed response.

use std::time::Duration;

use herald_client::{Notification, PublishError, PublishRequest, Publisher};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug)]
struct Recorded {
    method: String,
    path: String,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// Serves one request, answering `status` with the JSON `reply`; returns what was asked.
async fn serve_http(status: u16, reply: &'static str) -> (String, JoinHandle<Recorded>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let handle = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed mid-request");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).expect("ascii head");
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().expect("request line").split(' ');
        let method = request_line.next().expect("method").to_owned();
        let path = request_line.next().expect("path").to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().expect("content-length"))
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "connection closed mid-body");
            body.extend_from_slice(&chunk[..n]);
        }
        let response = format!(
            "HTTP/1.1 {status} Canned\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        sock.write_all(response.as_bytes()).await.expect("write");
        sock.shutdown().await.expect("shutdown");
        Recorded {
            method,
            path,
            headers,
            body,
        }
    });
    (base, handle)
}

async fn recorded(server: JoinHandle<Recorded>) -> Recorded {
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server finished in time")
        .expect("server passed")
}

#[tokio::test]
async fn publish_sends_api_key_and_body() {
    let (base, server) = serve_http(200, r#"{"id":"01J","seq":3}"#).await;
    let p = Publisher::new(&base, "key-1");
    let req = PublishRequest {
        durable: Some(true),
        ..PublishRequest::new("device/d-9/telemetry", "data_update", json!({"t": 21.5}))
    };
    let resp = p.publish(&req).await.expect("publish");
    assert_eq!(resp.id, "01J");
    assert_eq!(resp.seq, Some(3));

    let r = recorded(server).await;
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/api/v1/publish");
    assert_eq!(r.header("authorization"), Some("Bearer key-1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        json!({"topic":"device/d-9/telemetry","event":"data_update","data":{"t":21.5},"durable":true})
    );
}

#[tokio::test]
async fn topic_is_one_encoded_path_segment() {
    let (base, server) =
        serve_http(200, r#"{"topic":"device/d-9/telemetry","subscribers":2}"#).await;
    let p = Publisher::new(&format!("{base}/"), "key-1");
    assert_eq!(
        p.topic_subscribers("device/d-9/telemetry")
            .await
            .expect("subscribers"),
        2
    );
    let r = recorded(server).await;
    assert_eq!(r.method, "GET");
    assert_eq!(
        r.path,
        "/api/v1/topics/device%2Fd-9%2Ftelemetry/subscribers"
    );
    assert_eq!(r.header("authorization"), Some("Bearer key-1"));
}

#[tokio::test]
async fn forbidden_json_error_maps_to_api_error() {
    let (base, server) = serve_http(
        403,
        r#"{"code":403,"message":"api key lacks scope publish"}"#,
    )
    .await;
    let p = Publisher::new(&base, "weak");
    match p.broadcast("alarm", json!({})).await {
        Err(PublishError::Api {
            status: 403,
            code: 403,
            message,
        }) => assert_eq!(message, "api key lacks scope publish"),
        other => panic!("expected Api 403, got {other:?}"),
    }
    let r = recorded(server).await;
    assert_eq!(r.path, "/api/v1/broadcast");
    assert_eq!(r.json(), json!({"event":"alarm","data":{}}));
}

#[tokio::test]
async fn non_json_error_keeps_status() {
    let (base, server) = serve_http(502, "bad gateway").await;
    let p = Publisher::new(&base, "k");
    match p.presence("42").await {
        Err(PublishError::Api {
            status: 502,
            code: 502,
            message,
        }) => assert_eq!(message, "bad gateway"),
        other => panic!("expected Api 502, got {other:?}"),
    }
    let r = recorded(server).await;
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("GET", "/api/v1/users/42/presence")
    );
}

#[tokio::test]
async fn notification_is_durable_to_the_user_inbox() {
    let (base, server) = serve_http(200, r#"{"id":"n-1","status":"pending"}"#).await;
    let p = Publisher::new(&base, "k");
    let n = Notification {
        link: Some("/orders/7".into()),
        ..Notification::new("Order shipped", "#7 is on its way")
    };
    let resp = p.send_notification("u 1", &n).await.expect("notify");
    assert_eq!(resp, json!({"id":"n-1","status":"pending"}));
    let r = recorded(server).await;
    assert_eq!(r.path, "/api/v1/users/u%201/messages");
    assert_eq!(
        r.json(),
        json!({"event":"notification","durable":true,
               "data":{"title":"Order shipped","body":"#7 is on its way","link":"/orders/7"}})
    );
}

#[tokio::test]
async fn batch_results_in_order() {
    let (base, server) = serve_http(
        200,
        r#"{"results":[{"id":"a","seq":1},{"code":400,"message":"bad topic"}]}"#,
    )
    .await;
    let p = Publisher::new(&base, "k");
    let reqs = [
        PublishRequest::new("t/1", "e", json!(1)),
        PublishRequest::new("bad topic", "e", json!(2)),
    ];
    let results = p.publish_batch(&reqs).await.expect("batch");
    assert_eq!(results.len(), 2);
    assert_eq!(results[1]["code"], 400);
    let r = recorded(server).await;
    assert_eq!(r.path, "/api/v1/publish/batch");
    assert_eq!(
        r.json(),
        json!({"messages":[{"topic":"t/1","event":"e","data":1},{"topic":"bad topic","event":"e","data":2}]})
    );
}

#[tokio::test]
async fn room_revoke_and_disconnect_paths() {
    let (base, server) = serve_http(200, r#"{"id":"r-1"}"#).await;
    let p = Publisher::new(&base, "k");
    let resp = p
        .send_to_room("chat:room001", "chat", json!({"m":"hi"}))
        .await
        .expect("room");
    assert_eq!(resp.id, "r-1");
    let r = recorded(server).await;
    assert_eq!(r.path, "/api/v1/rooms/chat%3Aroom001/messages");
    assert_eq!(r.json(), json!({"event":"chat","data":{"m":"hi"}}));

    let (base, server) = serve_http(200, r#"{"revoked":true}"#).await;
    let p = Publisher::new(&base, "k");
    p.revoke(None, Some("42"), Some(1_900_000_000))
        .await
        .expect("revoke");
    let r = recorded(server).await;
    assert_eq!(r.path, "/api/v1/revocations");
    assert_eq!(r.json(), json!({"user":"42","until":1_900_000_000u64}));

    let (base, server) = serve_http(200, r#"{"disconnected":2}"#).await;
    let p = Publisher::new(&base, "k");
    let resp = p.disconnect_user("42").await.expect("disconnect");
    assert_eq!(resp["disconnected"], 2);
    let r = recorded(server).await;
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/api/v1/users/42/disconnect")
    );
}

#[tokio::test]
async fn unexpected_success_body_is_decode_error() {
    let (base, server) = serve_http(200, r#"{"unexpected":true}"#).await;
    let p = Publisher::new(&base, "k");
    assert!(matches!(
        p.publish(&PublishRequest::new("t", "e", Value::Null)).await,
        Err(PublishError::Decode(_))
    ));
    recorded(server).await;
}

#[tokio::test]
async fn unreachable_server_is_http_error() {
    // A port that was free a moment ago: nothing listens there now.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let p = Publisher::new(&format!("http://127.0.0.1:{port}"), "k");
    assert!(matches!(p.presence("42").await, Err(PublishError::Http(_))));
}
