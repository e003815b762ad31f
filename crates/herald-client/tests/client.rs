//! The WebSocket client against a scripted in-test server (tokio-tungstenite on 127.0.0.1:0):
//! each test's server plays one side of SPEC §2 and asserts what the client sent.

// tungstenite's handshake callback returns `Result<Response, ErrorResponse>`; its size is theirs.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_client::{Client, ClientError, ConnectOptions, Event, TokenPlacement};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async};

type ServerWs = WebSocketStream<TcpStream>;

/// What the upgrade request carried.
#[derive(Debug)]
struct Seen {
    uri: String,
    authorization: Option<String>,
    protocol: Option<String>,
}

/// Accepts one connection on a fresh port, echoes the asked subprotocol, and runs `script`.
async fn serve_one<F, Fut>(script: F) -> (String, JoinHandle<()>)
where
    F: FnOnce(ServerWs, Seen) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let handle = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut seen = None;
        let ws = accept_hdr_async(stream, |req: &Request, mut resp: Response| {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let protocol = header("sec-websocket-protocol");
            if let Some(p) = &protocol {
                resp.headers_mut()
                    .insert("sec-websocket-protocol", p.parse().expect("header value"));
            }
            seen = Some(Seen {
                uri: req.uri().to_string(),
                authorization: header("authorization"),
                protocol,
            });
            Ok(resp)
        })
        .await
        .expect("upgrade");
        script(ws, seen.expect("request seen")).await;
    });
    (url, handle)
}

/// Refuses the upgrade with `status` and a JSON `body`.
async fn serve_refusal(status: u16, body: &'static str) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let handle = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let refused = accept_hdr_async(stream, move |_: &Request, _: Response| {
            let resp: ErrorResponse = http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .body(Some(body.to_owned()))
                .expect("response");
            Err(resp)
        })
        .await;
        assert!(refused.is_err());
    });
    (url, handle)
}

async fn finish(server: JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server script finished in time")
        .expect("server script passed");
}

fn welcome() -> Value {
    json!({"type":"welcome","conn_id":"c-1","user_id":"42","node_id":"n-1","heartbeat_ms":25000,"protocol":"herald.json.v1"})
}

fn message(topic: &str, id: &str, seq: u64) -> Value {
    json!({"type":"message","topic":topic,"event":"data_update","id":id,"seq":seq,"ts":1732345678901u64,"data":{"v":seq},"ack":true})
}

async fn send(ws: &mut ServerWs, v: Value) {
    ws.send(WsMessage::text(v.to_string()))
        .await
        .expect("server send");
}

/// The next text frame, as JSON (control frames skipped).
async fn recv(ws: &mut ServerWs) -> Value {
    loop {
        match ws
            .next()
            .await
            .expect("client still connected")
            .expect("read")
        {
            WsMessage::Text(t) => {
                return serde_json::from_str(t.as_str()).expect("client sent JSON");
            }
            WsMessage::Close(c) => panic!("client closed: {c:?}"),
            _ => {}
        }
    }
}

/// Closes with `code` and waits for the client's half of the handshake (or EOF).
async fn close_with(ws: &mut ServerWs, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    ws.close(Some(frame)).await.expect("server close");
    drain(ws).await;
}

/// Reads until the connection ends.
async fn drain(ws: &mut ServerWs) {
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test]
async fn header_auth_reply_buffering_and_close_4010() {
    let (url, server) = serve_one(|mut ws, seen| async move {
        assert_eq!(seen.uri, "/ws");
        assert_eq!(seen.authorization.as_deref(), Some("Bearer tok-1"));
        assert_eq!(seen.protocol.as_deref(), Some("herald.json.v1"));
        send(&mut ws, welcome()).await;

        let sub = recv(&mut ws).await;
        assert_eq!(sub, json!({"type":"subscribe","topic":"a/b","id":1}));
        // A message before the reply: the client must keep it for later.
        send(&mut ws, message("a/b", "m-1", 1)).await;
        send(
            &mut ws,
            json!({"type":"reply","id":1,"code":0,"message":"ok","topic":"a/b","seq":1}),
        )
        .await;

        let sub = recv(&mut ws).await;
        assert_eq!(sub, json!({"type":"subscribe","topics":["x","y"],"id":2}));
        send(
            &mut ws,
            json!({"type":"reply","id":2,"code":403,"message":"forbidden: x"}),
        )
        .await;

        assert_eq!(recv(&mut ws).await, json!({"type":"ping"}));
        send(
            &mut ws,
            json!({"type":"error","code":400,"message":"unknown type: subscrib"}),
        )
        .await;
        send(&mut ws, json!({"type":"pong"})).await;

        close_with(&mut ws, 4010, "token expired").await;
    })
    .await;

    let mut c = Client::connect(&url, "tok-1").await.expect("connect");
    assert_eq!(c.welcome().conn_id, "c-1");
    assert_eq!(c.welcome().user_id, "42");
    assert_eq!(c.welcome().heartbeat_ms, 25000);
    assert_eq!(c.welcome().protocol, "herald.json.v1");

    let r = c.subscribe(&["a/b"]).await.expect("subscribe");
    assert!(r.is_ok());
    assert_eq!(r.seq(), Some(1));
    assert_eq!(r.raw["topic"], "a/b");

    let r = c.subscribe(&["x", "y"]).await.expect("subscribe");
    assert!(!r.is_ok());
    assert_eq!(r.code, 403);
    assert_eq!(r.message, "forbidden: x");

    c.ping().await.expect("ping");

    // Buffered while waiting, returned in arrival order.
    match c.next_event().await.expect("event") {
        Event::Message(m) => {
            assert_eq!((m.topic.as_str(), m.id.as_str()), ("a/b", "m-1"));
            assert_eq!(m.seq, Some(1));
            assert!(m.ack);
            assert_eq!(m.data, json!({"v": 1}));
        }
        other => panic!("expected the buffered message, got {other:?}"),
    }
    assert_eq!(
        c.next_event().await.expect("event"),
        Event::Error {
            code: 400,
            message: "unknown type: subscrib".into()
        }
    );
    match c.next_message().await {
        Err(ClientError::ClosedWith { code: 4010, reason }) => assert_eq!(reason, "token expired"),
        other => panic!("expected ClosedWith 4010, got {other:?}"),
    }
    assert!(c.is_closed());
    assert!(matches!(c.next_event().await, Err(ClientError::Closed)));
    assert!(matches!(
        c.subscribe(&["a"]).await,
        Err(ClientError::Closed)
    ));
    c.close().await.expect("closing a closed client is fine");
    finish(server).await;
}

#[tokio::test]
async fn requests_carry_increasing_ids() {
    let expected = vec![
        json!({"type":"unsubscribe","topic":"a","id":1}),
        json!({"type":"subscribe","topic":"t","since":5,"id":2}),
        json!({"type":"publish","topic":"room/r","event":"chat","data":{"m":"hi"},"id":3}),
        json!({"type":"join_room","room":"r","id":4}),
        json!({"type":"leave_room","room":"r","id":5}),
        json!({"type":"ack","ids":["m-1","m-2"],"id":6}),
        json!({"type":"auth","token":"tok-2","id":7}),
        json!({"type":"custom","x":1,"id":8}),
    ];
    let n = expected.len();
    let (url, server) = serve_one(move |mut ws, _| async move {
        send(&mut ws, welcome()).await;
        for want in expected {
            let got = recv(&mut ws).await;
            assert_eq!(got, want);
            // Ids echoed as strings are matched too.
            let id = got["id"].as_u64().expect("numeric id").to_string();
            send(
                &mut ws,
                json!({"type":"reply","id":id,"code":0,"message":"ok","recovered":true}),
            )
            .await;
        }
        drain(&mut ws).await;
    })
    .await;

    let mut c = Client::connect(&url, "tok").await.expect("connect");
    let mut replies = vec![
        c.unsubscribe(&["a"]).await,
        c.subscribe_since("t", 5).await,
        c.publish("room/r", "chat", json!({"m": "hi"})).await,
        c.join_room("r").await,
        c.leave_room("r").await,
        c.ack(&["m-1".to_owned(), "m-2".to_owned()]).await,
        c.refresh("tok-2").await,
        c.request(json!({"type":"custom","x":1})).await,
    ];
    assert_eq!(replies.len(), n);
    for (i, r) in replies.drain(..).enumerate() {
        let r = r.expect("reply");
        assert!(r.is_ok());
        assert_eq!(r.id, json!((i + 1).to_string()));
        assert_eq!(r.recovered(), Some(true));
    }
    assert!(matches!(
        c.request(json!(["not", "an", "object"])).await,
        Err(ClientError::Protocol(_))
    ));
    c.close().await.expect("close");
    finish(server).await;
}

#[tokio::test]
async fn query_token_without_subprotocol() {
    let (url, server) = serve_one(|mut ws, seen| async move {
        assert_eq!(seen.uri, "/ws?token=a%20b%2Bc");
        assert_eq!(seen.authorization, None);
        assert_eq!(seen.protocol, None);
        send(&mut ws, welcome()).await;
        drain(&mut ws).await;
    })
    .await;
    let opts = ConnectOptions {
        placement: TokenPlacement::Query,
        subprotocol: None,
        ..ConnectOptions::new(url, "a b+c")
    };
    let c = Client::connect_with(opts).await.expect("connect");
    c.close().await.expect("close");
    finish(server).await;
}

#[tokio::test]
async fn first_frame_auth_and_frames_before_welcome() {
    let (url, server) = serve_one(|mut ws, seen| async move {
        assert_eq!(seen.authorization, None);
        assert_eq!(recv(&mut ws).await, json!({"type":"auth","token":"tok-ff"}));
        send(&mut ws, json!({"type":"future_thing"})).await;
        send(&mut ws, welcome()).await;
        // The durable replay that follows the welcome.
        send(&mut ws, message("user/42", "d-1", 3)).await;
        drain(&mut ws).await;
    })
    .await;
    let opts = ConnectOptions {
        placement: TokenPlacement::FirstFrame,
        ..ConnectOptions::new(url, "tok-ff")
    };
    let mut c = Client::connect_with(opts).await.expect("connect");
    assert_eq!(
        c.next_event().await.expect("event"),
        Event::Other(json!({"type":"future_thing"}))
    );
    let m = c.next_message().await.expect("replayed message");
    assert_eq!(m.id, "d-1");
    c.close().await.expect("close");
    finish(server).await;
}

#[tokio::test]
async fn refused_upgrade_is_handshake_error_with_body() {
    let (url, server) = serve_refusal(401, r#"{"code":401,"message":"invalid token"}"#).await;
    match Client::connect(&url, "bad").await {
        Err(ClientError::Handshake {
            status: Some(401),
            body,
        }) => assert!(body.contains("invalid token"), "body: {body}"),
        other => panic!("expected a 401 handshake error, got {other:?}"),
    }
    finish(server).await;
}

#[tokio::test]
async fn close_before_welcome() {
    let (url, server) = serve_one(|mut ws, _| async move {
        close_with(&mut ws, 4001, "auth timeout").await;
    })
    .await;
    match Client::connect(&url, "tok").await {
        Err(ClientError::ClosedWith { code: 4001, reason }) => assert_eq!(reason, "auth timeout"),
        other => panic!("expected ClosedWith 4001, got {other:?}"),
    }
    finish(server).await;
}

#[tokio::test]
async fn error_before_welcome_is_server_error() {
    let (url, server) = serve_one(|mut ws, _| async move {
        send(
            &mut ws,
            json!({"type":"error","code":401,"message":"bad token"}),
        )
        .await;
        close_with(&mut ws, 4001, "unauthenticated").await;
    })
    .await;
    match Client::connect(&url, "tok").await {
        Err(ClientError::Server { code: 401, message }) => assert_eq!(message, "bad token"),
        other => panic!("expected Server 401, got {other:?}"),
    }
    finish(server).await;
}

#[tokio::test]
async fn close_while_waiting_for_reply() {
    let (url, server) = serve_one(|mut ws, _| async move {
        send(&mut ws, welcome()).await;
        assert_eq!(recv(&mut ws).await["type"], "join_room");
        send(&mut ws, message("room/r", "m-9", 9)).await;
        close_with(&mut ws, 4011, "disconnected by server").await;
    })
    .await;
    let mut c = Client::connect(&url, "tok").await.expect("connect");
    match c.join_room("r").await {
        Err(ClientError::ClosedWith { code: 4011, .. }) => {}
        other => panic!("expected ClosedWith 4011, got {other:?}"),
    }
    assert!(c.is_closed());
    // What came before the close is still delivered, then the close itself, once.
    assert!(matches!(c.next_event().await, Ok(Event::Message(m)) if m.id == "m-9"));
    assert_eq!(
        c.next_event().await.expect("closed event"),
        Event::Closed {
            code: Some(4011),
            reason: "disconnected by server".into()
        }
    );
    assert!(matches!(c.next_event().await, Err(ClientError::Closed)));
    assert!(matches!(c.send_text("x").await, Err(ClientError::Closed)));
    finish(server).await;
}

#[tokio::test]
async fn timeout_leaves_connection_usable() {
    let (url, server) = serve_one(|mut ws, _| async move {
        send(&mut ws, welcome()).await;
        assert_eq!(recv(&mut ws).await["id"], 1);
        // No answer until the client pings: then the late reply, then the pong.
        assert_eq!(recv(&mut ws).await, json!({"type":"ping"}));
        send(
            &mut ws,
            json!({"type":"reply","id":1,"code":0,"message":"ok"}),
        )
        .await;
        send(&mut ws, json!({"type":"pong"})).await;
        drain(&mut ws).await;
    })
    .await;
    let opts = ConnectOptions {
        timeout: Duration::from_millis(300),
        ..ConnectOptions::new(url, "tok")
    };
    let mut c = Client::connect_with(opts).await.expect("connect");
    assert!(matches!(
        c.subscribe(&["slow"]).await,
        Err(ClientError::Timeout)
    ));
    assert!(matches!(c.next_event().await, Err(ClientError::Timeout)));
    c.set_timeout(Duration::from_secs(10));
    c.ping().await.expect("ping after a timeout");
    // The late reply nobody waits for any more.
    match c.next_event().await.expect("event") {
        Event::Other(v) => assert_eq!(v["id"], 1),
        other => panic!("expected the late reply as Other, got {other:?}"),
    }
    c.close().await.expect("close");
    finish(server).await;
}

#[tokio::test]
async fn bad_frames_pings_commands_and_reconnect() {
    let (url, server) = serve_one(|mut ws, _| async move {
        send(&mut ws, welcome()).await;
        // A WebSocket ping must be answered while the client reads.
        ws.send(WsMessage::Ping(Bytes::from_static(b"hb")))
            .await
            .expect("ping");
        ws.send(WsMessage::text(r#"{"type":"message","topic":"t"}"#))
            .await
            .expect("bad frame");
        send(&mut ws, message("t", "m-1", 1)).await;
        match ws.next().await.expect("open").expect("read") {
            WsMessage::Pong(p) => assert_eq!(&p[..], b"hb"),
            other => panic!("expected the pong first, got {other:?}"),
        }

        match ws.next().await.expect("open").expect("read") {
            WsMessage::Text(t) => assert_eq!(t.as_str(), "not json"),
            other => panic!("expected raw text, got {other:?}"),
        }
        send(&mut ws, json!({"type":"error","code":400,"message":"bad json"})).await;

        assert_eq!(
            recv(&mut ws).await,
            json!({"type":"command","command":"CALL","trace_id":"t-1","data":{"to":"7"}})
        );
        send(
            &mut ws,
            json!({"type":"command_reply","command":"CALL","trace_id":"t-1","code":0,"message":"success","data":{}}),
        )
        .await;
        send(&mut ws, json!({"type":"error","code":429,"message":"rate limited"})).await;
        send(&mut ws, json!({"type":"reconnect","reason":"node draining","after_ms":1200})).await;
        close_with(&mut ws, 1012, "restart").await;
    })
    .await;

    let mut c = Client::connect(&url, "tok").await.expect("connect");
    assert!(matches!(
        c.next_event().await,
        Err(ClientError::Protocol(_))
    ));
    assert_eq!(c.next_message().await.expect("message").id, "m-1");

    c.send_text("not json").await.expect("send raw");
    assert_eq!(
        c.next_event().await.expect("event"),
        Event::Error {
            code: 400,
            message: "bad json".into()
        }
    );
    c.command("CALL", "t-1", json!({"to": "7"}))
        .await
        .expect("command");
    match c.next_event().await.expect("event") {
        Event::CommandReply(v) => assert_eq!(v["trace_id"], "t-1"),
        other => panic!("expected a command reply, got {other:?}"),
    }
    assert!(matches!(
        c.next_message().await,
        Err(ClientError::Server { code: 429, .. })
    ));
    assert_eq!(
        c.next_event().await.expect("event"),
        Event::Reconnect {
            reason: "node draining".into(),
            after_ms: 1200
        }
    );
    assert_eq!(
        c.next_event().await.expect("event"),
        Event::Closed {
            code: Some(1012),
            reason: "restart".into()
        }
    );
    finish(server).await;
}
