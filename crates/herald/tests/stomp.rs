//! STOMP 1.2 over WebSocket (SPEC §3), with the real `@stomp/stompjs` client run by Node
//! (`tests/node/stomp_client.mjs`) and, for what a well-behaved client never sends, raw frames
//! over a plain WebSocket.

mod common;

use std::time::{Duration, Instant};

use common::node::NodeClient;
use common::{ConnectOpts, Server, T, connect_with};
use serde_json::{Value, json};

/// A stompjs client connected as `user` (its `connected` line already read).
async fn stompjs(server: &Server, user: &str, env: &[(&str, &str)]) -> (NodeClient, Value) {
    let token = server.token(user, 3600, json!({}));
    let mut vars = vec![
        ("URL", format!("ws://{}/stomp", server.addr)),
        ("TOKEN", token),
    ];
    vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let mut c = NodeClient::spawn("stomp_client.mjs", &vars);
    let first = c.next(T).await;
    assert_eq!(first["event"], "connected", "{first}");
    (c, first)
}

/// Sends `cmd` with a receipt and waits for that receipt.
async fn with_receipt(c: &mut NodeClient, mut cmd: Value, receipt: &str) {
    cmd["receipt"] = json!(receipt);
    c.send(&cmd).await;
    let r = c.until("receipt", T).await;
    assert_eq!(r["id"], receipt);
}

async fn next_message(c: &mut NodeClient) -> Value {
    c.until("message", T).await
}

#[tokio::test]
async fn stompjs_subscribes_receives_sends_and_acks() {
    let server = Server::start("").await;
    let (mut c, connected) = stompjs(&server, "alice", &[]).await;
    let h = &connected["headers"];
    assert_eq!(h["version"], "1.2");
    assert_eq!(h["user-name"], "alice");
    assert!(h["server"].as_str().unwrap().starts_with("herald/"), "{h}");
    assert!(h["session"].as_str().unwrap().starts_with("c-"), "{h}");
    assert_eq!(h["heart-beat"], "25000,25000");

    // A topic, and a user queue with client-individual acks.
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"s1","destination":"/topic/room/lobby"}),
        "r1",
    )
    .await;
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"s2","destination":"/user/queue/orders","headers":{"ack":"client-individual"}}),
        "r2",
    )
    .await;

    // A JSON v1 client on the same topic.
    let mut json_client = server.connect_user("bob").await;
    let r = json_client
        .request(json!({"type":"subscribe","topic":"room/lobby","id":"1"}))
        .await;
    assert_eq!(r["code"], 0, "{r}");

    // Published through the HTTP API: both receive the same message.
    let id = server
        .publish("room/lobby", "chat", json!({"text": "hello", "n": 1}))
        .await;
    let m = next_message(&mut c).await;
    let mh = &m["headers"];
    assert_eq!(mh["subscription"], "s1");
    assert_eq!(mh["destination"], "/topic/room/lobby");
    assert_eq!(mh["message-id"], id.as_str());
    assert_eq!(mh["content-type"], "application/json");
    assert_eq!(mh["event"], "chat");
    assert!(
        mh.get("ack").is_none(),
        "ack:auto needs no ack header: {mh}"
    );
    let body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"text": "hello", "n": 1}));
    let jm = json_client.recv_message("room/lobby").await;
    assert_eq!(jm["id"], id.as_str());
    assert_eq!(jm["data"], body);

    // SEND to a room is a client publish: the JSON client gets it, and so does the sender.
    with_receipt(
        &mut c,
        json!({"op":"send","destination":"/topic/room/lobby","body":"{\"text\":\"hi from stomp\"}",
               "headers":{"content-type":"application/json","event":"chat"}}),
        "r3",
    )
    .await;
    let jm = json_client.recv_message("room/lobby").await;
    assert_eq!(jm["data"], json!({"text": "hi from stomp"}));
    assert_eq!(jm["from"], "alice");
    assert_eq!(jm["event"], "chat");
    let m = next_message(&mut c).await;
    assert_eq!(m["headers"]["message-id"], jm["id"]);
    assert_eq!(m["headers"]["from"], "alice");

    // A text body becomes a JSON string.
    c.send(
        &json!({"op":"send","destination":"/topic/room/lobby","body":"plain words",
                   "headers":{"content-type":"text/plain"}}),
    )
    .await;
    let jm = json_client.recv_message("room/lobby").await;
    assert_eq!(jm["data"], "plain words");
    assert_eq!(jm["event"], "message");

    // A durable message to the user queue: ack header, pending until the client ACKs it.
    let (status, body) = server
        .api_post(
            "/api/v1/publish",
            &server.publish_key,
            &json!({"topic":"user/alice/orders","event":"order","data":{"order":7},"durable":true,"id":"order-7"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m = loop {
        let m = next_message(&mut c).await;
        if m["headers"]["subscription"] == "s2" {
            break m;
        }
    };
    assert_eq!(m["headers"]["destination"], "/user/queue/orders");
    assert_eq!(m["headers"]["ack"], "order-7");
    assert_eq!(m["headers"]["durable"], "true");
    assert_eq!(
        inbox_status(&server, "alice", "order-7", "sent").await,
        "sent",
        "written, not acked yet"
    );
    with_receipt(&mut c, json!({"op":"ack","message_id":"order-7"}), "r4").await;
    assert_eq!(
        inbox_status(&server, "alice", "order-7", "acked").await,
        "acked"
    );

    // Unsubscribe: nothing more on s1.
    with_receipt(&mut c, json!({"op":"unsubscribe","id":"s1"}), "r5").await;
    server.publish("room/lobby", "chat", json!(2)).await;
    json_client.recv_message("room/lobby").await;
    c.send(&json!({"op":"subscribe","id":"s3","destination":"/topic/room/other"}))
        .await;
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"s4","destination":"/topic/room/probe"}),
        "r6",
    )
    .await;
    server.publish("room/probe", "p", json!(0)).await;
    let m = next_message(&mut c).await;
    assert_eq!(
        m["headers"]["subscription"], "s4",
        "nothing for s1 after UNSUBSCRIBE"
    );

    c.send(&json!({"op":"disconnect"})).await;
    let closed = c.until("closed", T).await;
    assert_eq!(closed["code"], 1000);

    // Counted by transport.
    let text = server.metrics().await;
    let opened = |t| {
        common::metric_sum(
            &text,
            "herald_connections_opened_total",
            &[("transport", t)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(opened("stomp"), 1.0, "{text}");
    assert_eq!(opened("json"), 1.0, "{text}");
    assert_eq!(opened("sse"), 0.0, "{text}");
}

/// The store's status of one durable message, once it is `want` (or whatever it is after
/// `T`: the assertion then shows it).
async fn inbox_status(server: &Server, user: &str, id: &str, want: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let (status, body) = server
            .api_get(&format!("/api/v1/users/{user}/messages"), &server.admin_key)
            .await;
        assert_eq!(status, 200, "{body}");
        let now = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["status"].as_str().unwrap().to_owned());
        match now {
            Some(s) if s == want || Instant::now() > deadline => return s,
            None if Instant::now() > deadline => panic!("{id} not in {user}'s inbox: {body}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn forbidden_destinations_get_an_error_frame_then_the_socket_closes() {
    let server = Server::start("").await;
    for (dest, expect) in [
        ("/topic/user/bob/secrets", "403"),
        ("/queue/anything", "404 unknown destination"),
        ("/topic/bad topic", "400"),
    ] {
        let (mut c, _) = stompjs(&server, "alice", &[]).await;
        c.send(&json!({"op":"subscribe","id":"s1","destination":dest,"receipt":"r1"}))
            .await;
        let e = c.until("error", T).await;
        let msg = e["headers"]["message"].as_str().unwrap();
        assert!(msg.starts_with(expect), "{dest}: {msg}");
        assert_eq!(e["headers"]["receipt-id"], "r1", "{e}");
        c.until("closed", T).await;
    }
    // SEND where the ACL has no publish.
    let (mut c, _) = stompjs(&server, "alice", &[]).await;
    c.send(&json!({"op":"send","destination":"/topic/broadcast","body":"{}"}))
        .await;
    let e = c.until("error", T).await;
    assert!(
        e["headers"]["message"].as_str().unwrap().starts_with("403"),
        "{e}"
    );
    c.until("closed", T).await;
    // The server still serves.
    let (mut c, _) = stompjs(&server, "alice", &[]).await;
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"s1","destination":"/topic/broadcast"}),
        "ok",
    )
    .await;
}

#[tokio::test]
async fn heart_beats_both_ways() {
    let server =
        Server::start("[limits]\nheartbeat_interval = \"300ms\"\nheartbeat_timeout = \"1s\"\n")
            .await;
    // The client asks for heart-beats every 300 ms and sends its own.
    let (mut c, connected) =
        stompjs(&server, "alice", &[("HB_IN", "300"), ("HB_OUT", "300")]).await;
    assert_eq!(connected["headers"]["heart-beat"], "300,300");
    let start = Instant::now();
    let mut beats = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        let v = c.next(T).await;
        match v["event"].as_str() {
            Some("heartbeat") => beats += 1,
            Some("heartbeat_lost") | Some("closed") | Some("error") => {
                panic!("connection lost: {v}")
            }
            _ => {}
        }
    }
    // ~8 in 2.5 s; the connection outlived heartbeat_timeout several times.
    assert!(beats >= 4, "{beats} heart-beats in 2.5 s");
}

#[tokio::test]
async fn passcode_and_the_ws_path_with_a_stomp_subprotocol() {
    let server = Server::start("").await;
    let token = server.token("carol", 3600, json!({}));
    let mut c = NodeClient::spawn(
        "stomp_client.mjs",
        &[
            ("URL", format!("ws://{}/ws", server.addr)),
            ("TOKEN", token.clone()),
            ("AUTH", "passcode".into()),
        ],
    );
    let first = c.next(T).await;
    assert_eq!(first["event"], "connected", "{first}");
    assert_eq!(first["headers"]["user-name"], "carol");
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"inbox","destination":"/user/queue"}),
        "r",
    )
    .await;
    let (status, _) = server
        .api_post(
            "/api/v1/users/carol/messages",
            &server.publish_key,
            &json!({"event":"note","data":{"x":1},"durable":false}),
        )
        .await;
    assert_eq!(status, 200);
    let m = next_message(&mut c).await;
    assert_eq!(m["headers"]["destination"], "/user/queue");
    assert_eq!(m["headers"]["event"], "note");

    // A bad token: ERROR, then closed.
    let mut c = NodeClient::spawn(
        "stomp_client.mjs",
        &[
            ("URL", format!("ws://{}/stomp", server.addr)),
            ("TOKEN", "not-a-token".into()),
        ],
    );
    let e = c.until("error", T).await;
    assert!(
        e["headers"]["message"].as_str().unwrap().contains("token"),
        "{e}"
    );
    let closed = c.until("closed", T).await;
    assert_eq!(closed["code"], 4001);
}

#[tokio::test]
async fn durable_messages_wait_for_a_subscription_then_ack_modes_apply() {
    let server = Server::start("").await;
    for id in ["d-1", "d-2", "d-3"] {
        let (status, body) = server
            .api_post(
                "/api/v1/users/dave/messages",
                &server.publish_key,
                &json!({"event":"n","data":{"id":id},"id":id}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // Connected, not subscribed: nothing is written, all stay pending.
    let (mut c, _) = stompjs(&server, "dave", &[]).await;
    tokio::time::sleep(common::QUIET).await;
    assert_eq!(
        inbox_status(&server, "dave", "d-1", "pending").await,
        "pending"
    );
    // ack:client — the replay comes with the subscription; one ACK covers everything before.
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"in","destination":"/user/queue","headers":{"ack":"client"}}),
        "r",
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let m = next_message(&mut c).await;
        assert_eq!(m["headers"]["ack"], m["headers"]["message-id"]);
        ids.push(m["headers"]["message-id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids, ["d-1", "d-2", "d-3"]);
    with_receipt(&mut c, json!({"op":"ack","message_id":"d-2"}), "a").await;
    assert_eq!(inbox_status(&server, "dave", "d-1", "acked").await, "acked");
    assert_eq!(inbox_status(&server, "dave", "d-2", "acked").await, "acked");
    assert_eq!(inbox_status(&server, "dave", "d-3", "sent").await, "sent");
    c.send(&json!({"op":"disconnect"})).await;
    c.until("closed", T).await;

    // ack:auto — written means acknowledged.
    let (mut c, _) = stompjs(&server, "dave", &[]).await;
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"in","destination":"/user/queue"}),
        "r",
    )
    .await;
    let m = next_message(&mut c).await;
    assert_eq!(m["headers"]["message-id"], "d-3");
    assert!(m["headers"].get("ack").is_none());
    assert_eq!(inbox_status(&server, "dave", "d-3", "acked").await, "acked");
}

#[tokio::test]
async fn resume_a_history_topic_with_since_and_get_the_retained_value() {
    let server = Server::start(
        r#"[[topics]]
pattern = "room/*"
subscribe = "allow"
publish = "allow"
history = { size = 100, ttl = "10m" }
[[topics]]
pattern = "global/**"
subscribe = "allow"
retain = true
"#,
    )
    .await;
    for n in 1..=5 {
        server.publish("room/h", "e", json!(n)).await;
    }
    server
        .publish("global/status", "s", json!({"up": true}))
        .await;
    let (mut c, _) = stompjs(&server, "erin", &[]).await;
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"h","destination":"/topic/room/h","headers":{"since":"3"}}),
        "r",
    )
    .await;
    for seq in [4, 5] {
        let m = next_message(&mut c).await;
        assert_eq!(m["headers"]["seq"], seq.to_string());
        assert_eq!(m["body"], seq.to_string());
    }
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"g","destination":"/topic/global/status"}),
        "r2",
    )
    .await;
    let m = next_message(&mut c).await;
    assert_eq!(m["headers"]["retained"], "true");
    assert_eq!(m["headers"]["subscription"], "g");
}

#[tokio::test]
async fn unknown_commands_and_transactions_are_errors() {
    let server = Server::start("").await;
    let (mut c, _) = stompjs(&server, "frank", &[]).await;
    c.send(&json!({"op":"send","destination":"/app/NOPE","body":"{}"}))
        .await;
    let e = c.until("error", T).await;
    assert!(
        e["headers"]["message"].as_str().unwrap().starts_with("404"),
        "{e}"
    );
    c.until("closed", T).await;
}

// ---------------------------------------------------------------------------------------------
// Raw frames: what a real client never sends.
// ---------------------------------------------------------------------------------------------

async fn raw(server: &Server) -> common::Ws {
    connect_with(
        &format!("ws://{}/ws", server.addr),
        ConnectOpts {
            subprotocol: Some("v12.stomp"),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|f| panic!("handshake refused: {} {}", f.status, f.body))
}

/// The `ERROR` frame's `message` header, then the close.
async fn expect_error(ws: &mut common::Ws) -> String {
    let text = ws.recv_text(T).await;
    assert!(text.starts_with("ERROR\n"), "{text:?}");
    assert!(text.ends_with('\0'), "{text:?}");
    let message = text
        .lines()
        .find_map(|l| l.strip_prefix("message:"))
        .unwrap_or_else(|| panic!("no message header: {text:?}"))
        .to_owned();
    ws.expect_close(T).await;
    message
}

async fn raw_connected(server: &Server, user: &str) -> common::Ws {
    let mut ws = raw(server).await;
    let token = server.token(user, 3600, json!({}));
    ws.send_text(&format!(
        "CONNECT\naccept-version:1.2\nhost:h\nAuthorization:Bearer {token}\n\n\0"
    ))
    .await;
    let text = ws.recv_text(T).await;
    assert!(text.starts_with("CONNECTED\n"), "{text:?}");
    ws
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_never_crash_or_hang_the_server() {
    let server = Server::start("").await;
    let huge_header = format!(
        "SEND\ndestination:/topic/room/a\nx:{}\n\n{{}}\0",
        "v".repeat(20_000)
    );
    let many_headers = format!(
        "SEND\ndestination:/topic/room/a\n{}\n{{}}\0",
        (0..100).map(|i| format!("h{i}:v\n")).collect::<String>()
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing NUL",
            "SEND\ndestination:/topic/room/a\n\n{}".into(),
            "NUL",
        ),
        (
            "bad escape",
            "SUBSCRIBE\nid:1\ndestination:/topic/room\\ta\n\n\0".into(),
            "escape",
        ),
        ("huge header", huge_header, "longer than"),
        ("too many headers", many_headers, "more than"),
        (
            "content-length too long",
            "SEND\ndestination:/topic/room/a\ncontent-length:50\n\n{}\0".into(),
            "content-length",
        ),
        (
            "content-length not a number",
            "SEND\ndestination:/topic/room/a\ncontent-length:two\n\n{}\0".into(),
            "content-length",
        ),
        (
            "no NUL after content-length",
            "SEND\ndestination:/topic/room/a\ncontent-length:1\n\n{}\0".into(),
            "content-length",
        ),
        ("unknown command", "FROB\n\n\0".into(), "unknown command"),
        (
            "body on SUBSCRIBE",
            "SUBSCRIBE\nid:1\ndestination:/topic/room/a\n\nbody\0".into(),
            "body",
        ),
        (
            "no id",
            "SUBSCRIBE\ndestination:/topic/room/a\n\n\0".into(),
            "id header",
        ),
        (
            "transaction",
            "BEGIN\ntransaction:t\n\n\0".into(),
            "transactions",
        ),
        (
            "second CONNECT",
            "CONNECT\naccept-version:1.2\n\n\0".into(),
            "already connected",
        ),
        (
            "bad JSON body",
            "SEND\ndestination:/topic/room/a\ncontent-type:application/json\n\n{nope\0".into(),
            "400",
        ),
    ];
    for (what, frame, expect) in cases {
        let mut ws = raw_connected(&server, "gina").await;
        let started = Instant::now();
        ws.send_text(&frame).await;
        let message = expect_error(&mut ws).await;
        assert!(message.contains(expect), "{what}: {message}");
        assert!(started.elapsed() < T, "{what}: answered late");
    }

    // Before CONNECT: no credential, wrong version, not CONNECT, garbage.
    for (what, frame, expect) in [
        (
            "no credential",
            "CONNECT\naccept-version:1.2\n\n\0",
            "authentication required",
        ),
        ("1.0 only", "CONNECT\naccept-version:1.0\n\n\0", "1.2"),
        (
            "SEND first",
            "SEND\ndestination:/topic/a\n\n\0",
            "CONNECT first",
        ),
        ("garbage", "\u{1}\u{2}\u{3}", "not terminated by NUL"),
        ("garbage frame", "\u{1}\u{2}\u{3}\n\n\0", "unknown command"),
    ] {
        let mut ws = raw(&server).await;
        ws.send_text(frame).await;
        let message = expect_error(&mut ws).await;
        assert!(message.contains(expect), "{what}: {message}");
    }

    // A body over max_message_size is refused by the WebSocket layer already (1009); one
    // under it but with a larger content-length is a content-length error (above).
    let mut ws = raw_connected(&server, "gina").await;
    ws.send_text(&format!(
        "SEND\ndestination:/topic/room/a\n\n\"{}\"\0",
        "x".repeat(600 * 1024)
    ))
    .await;
    let (code, _) = ws.expect_close(T).await;
    assert_eq!(code, 1009);

    // Still serving, and no connection left behind.
    let mut ws = raw_connected(&server, "gina").await;
    ws.send_text("SUBSCRIBE\nid:1\ndestination:/topic/room/a\nreceipt:ok\n\n\0")
        .await;
    let text = ws.recv_text(T).await;
    assert_eq!(text, "RECEIPT\nreceipt-id:ok\n\n\0");
    drop(ws);
    common::eventually(T, "all STOMP connections gone", || async {
        server.stats().await["total_clients"] == 0
    })
    .await;
}

/// An HTTP command service answering every request `{"code":0,"data":{"envelope":…}}`.
async fn echo_service() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() < pos + 4 + len {
                        continue;
                    }
                    let env: Value =
                        serde_json::from_slice(&buf[pos + 4..pos + 4 + len]).unwrap_or_default();
                    let out = json!({"code": 0, "data": {"envelope": env}}).to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                        out.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    return;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn app_commands_reply_on_the_replies_queue() {
    let port = echo_service().await;
    let server = Server::start(&format!(
        "[upstream.commands.ECHO]\ntarget = \"http://127.0.0.1:{port}/echo\"\n"
    ))
    .await;
    let (mut c, connected) = stompjs(&server, "hank", &[]).await;
    with_receipt(
        &mut c,
        json!({"op":"subscribe","id":"rep","destination":"/user/queue/replies"}),
        "r",
    )
    .await;
    with_receipt(
        &mut c,
        json!({"op":"send","destination":"/app/ECHO","body":"{\"call\":42}",
               "headers":{"content-type":"application/json","trace-id":"t-stomp-1"}}),
        "s",
    )
    .await;
    let m = next_message(&mut c).await;
    let h = &m["headers"];
    assert_eq!(h["subscription"], "rep");
    assert_eq!(h["destination"], "/user/queue/replies");
    assert_eq!(h["command"], "ECHO");
    assert_eq!(h["trace-id"], "t-stomp-1");
    assert_eq!(h["code"], "0");
    let body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["type"], "command_reply");
    let env = &body["data"]["envelope"];
    assert_eq!(env["command"], "ECHO");
    assert_eq!(env["user"]["id"], "hank");
    assert_eq!(env["data"], json!({"call": 42}));
    assert_eq!(env["conn_id"], connected["headers"]["session"]);
}

#[tokio::test]
async fn the_user_limit_and_server_side_closes_come_as_error_frames() {
    let server = Server::start("[limits]\nmax_connections_per_user = 1\n").await;
    let mut first = raw_connected(&server, "ivy").await;

    // A second session of the user: ERROR, then 4029.
    let mut ws = raw(&server).await;
    let token = server.token("ivy", 3600, json!({}));
    ws.send_text(&format!(
        "CONNECT\naccept-version:1.2\nAuthorization:Bearer {token}\n\n\0"
    ))
    .await;
    let text = ws.recv_text(T).await;
    assert!(text.starts_with("ERROR\n"), "{text:?}");
    assert!(text.contains("too many connections"), "{text:?}");
    let (code, _) = ws.expect_close(T).await;
    assert_eq!(code, 4029);

    // Disconnected through the server API: ERROR, then 4011.
    let (status, body) = server
        .api_post(
            "/api/v1/users/ivy/disconnect",
            &server.admin_key,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = first.recv_text(T).await;
    assert!(text.starts_with("ERROR\n"), "{text:?}");
    let (code, _) = first.expect_close(T).await;
    assert_eq!(code, 4011);
}
