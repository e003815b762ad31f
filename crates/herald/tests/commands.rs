//! Upstream commands (SPEC §7) with HTTP targets: a service written here answers over real
//! HTTP. The AMQP and NATS targets are tested in `ingest_brokers.rs`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A tiny HTTP service: `/echo` answers the envelope back as `data`, `/later` answers 202,
/// `/slow` answers after 2 s, `/bad` answers something that is not a reply, `/fail` 500.
async fn service() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then Content-Length bytes of body.
                let (head_end, len) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (pos + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let body = &buf[head_end..head_end + len];
                let (status, out) = match path.as_str() {
                    "/echo" => {
                        let env: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                        let trace = head
                            .lines()
                            .find_map(|l| {
                                l.to_lowercase()
                                    .strip_prefix("x-trace-id:")
                                    .map(|v| v.trim().to_owned())
                            })
                            .unwrap_or_default();
                        (
                            "200 OK",
                            json!({"code": 0, "data": {"envelope": env, "trace_header": trace}})
                                .to_string(),
                        )
                    }
                    "/later" => ("202 Accepted", String::new()),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        ("200 OK", json!({"code": 0}).to_string())
                    }
                    "/bad" => ("200 OK", "not json".to_owned()),
                    "/coded" => (
                        "200 OK",
                        json!({"code": 409, "message": "call already running"}).to_string(),
                    ),
                    _ => ("500 Internal Server Error", String::new()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                    out.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (port, task)
}

async fn next_command_reply(ws: &mut Ws) -> Value {
    loop {
        let v = ws.recv_json(T).await;
        if v["type"] == "command_reply" {
            return v;
        }
    }
}

#[tokio::test]
async fn commands_round_trip_through_an_http_service() {
    let (port, _svc) = service().await;
    // A port nothing listens on, for "unavailable".
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = Server::start(&format!(
        r#"
[upstream]
timeout = "5s"
[upstream.commands.ECHO]
target = "http://127.0.0.1:{port}/echo"
[upstream.commands.LATER]
target = "http://127.0.0.1:{port}/later"
[upstream.commands.SLOW]
target = "http://127.0.0.1:{port}/slow"
timeout = "300ms"
[upstream.commands.BAD]
target = "http://127.0.0.1:{port}/bad"
[upstream.commands.FAIL]
target = "http://127.0.0.1:{port}/fail"
[upstream.commands.CODED]
target = "http://127.0.0.1:{port}/coded"
[upstream.commands.DOWN]
target = "http://127.0.0.1:{closed}/x"
"#
    ))
    .await;
    let mut ws = server
        .connect_user_with("alice", json!({"role": "agent"}))
        .await;
    let conn_id = ws.welcome.as_ref().unwrap()["conn_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let node_id = ws.welcome.as_ref().unwrap()["node_id"].clone();

    // The service gets the envelope; the client the reply, then the service's answer.
    let r = ws
        .request(json!({"type": "command", "id": "c1", "command": "ECHO",
                        "trace_id": "t-1", "data": {"n": 7}}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(r["trace_id"], "t-1", "{r}");
    let cr = next_command_reply(&mut ws).await;
    assert_eq!(cr["command"], "ECHO", "{cr}");
    assert_eq!(cr["trace_id"], "t-1", "{cr}");
    assert_eq!(cr["code"], 0, "{cr}");
    assert_eq!(cr["message"], "success", "{cr}");
    let env = &cr["data"]["envelope"];
    assert_eq!(env["command"], "ECHO", "{cr}");
    assert_eq!(env["trace_id"], "t-1", "{cr}");
    assert_eq!(env["user"]["id"], "alice", "{cr}");
    assert_eq!(env["user"]["role"], "agent", "{cr}");
    assert_eq!(env["conn_id"], conn_id.as_str(), "{cr}");
    assert_eq!(env["node_id"], node_id, "{cr}");
    assert_eq!(env["data"], json!({"n": 7}), "{cr}");
    assert_eq!(cr["data"]["trace_header"], "t-1", "{cr}");

    // No trace id: one is generated and used throughout.
    let r = ws
        .request(json!({"type": "command", "id": "c2", "command": "ECHO", "data": null}))
        .await;
    let trace = r["trace_id"]
        .as_str()
        .expect("generated trace id")
        .to_owned();
    assert_eq!(trace.len(), 26, "{r}");
    let cr = next_command_reply(&mut ws).await;
    assert_eq!(cr["trace_id"], trace.as_str(), "{cr}");

    // A service's own error code is passed on.
    ws.request(
        json!({"type": "command", "id": "c3", "command": "CODED", "trace_id": "t-3", "data": {}}),
    )
    .await;
    let cr = next_command_reply(&mut ws).await;
    assert_eq!(
        (cr["code"].clone(), cr["message"].clone()),
        (json!(409), json!("call already running")),
        "{cr}"
    );

    // Unknown command: 404 at once, nothing else.
    let r = ws
        .request(json!({"type": "command", "id": "c4", "command": "NOPE", "trace_id": "t-4", "data": {}}))
        .await;
    assert_eq!(r["code"], 404, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("unknown command: NOPE"),
        "{r}"
    );

    // Timeout, bad answer, failure, unreachable: 504, 502, 502, 503 — with the trace id.
    for (cmd, code) in [("SLOW", 504), ("BAD", 502), ("FAIL", 502), ("DOWN", 503)] {
        let trace = format!("t-{cmd}");
        let r = ws
            .request(json!({"type": "command", "id": cmd, "command": cmd, "trace_id": trace, "data": {}}))
            .await;
        assert_eq!(r["code"], 0, "{r}");
        let cr = next_command_reply(&mut ws).await;
        assert_eq!(cr["code"], code, "{cmd}: {cr}");
        assert_eq!(cr["trace_id"], trace.as_str(), "{cmd}: {cr}");
    }

    // 202: the service answers later through the server API.
    ws.request(
        json!({"type": "command", "id": "c5", "command": "LATER", "trace_id": "t-5", "data": {}}),
    )
    .await;
    ws.expect_no_message(QUIET).await;
    let (s, body) = server
        .api_post(
            "/api/v1/replies",
            &server.publish_key,
            &json!({"command": "LATER", "trace_id": "t-5", "user": {"id": "alice"},
                    "conn_id": conn_id, "data": {"done": true}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let cr = next_command_reply(&mut ws).await;
    assert_eq!(cr["trace_id"], "t-5", "{cr}");
    assert_eq!(cr["data"], json!({"done": true}), "{cr}");

    // Bad input: a clear error, the connection stays.
    let r = ws
        .request(json!({"type": "command", "id": "c6", "command": "", "data": {}}))
        .await;
    assert_eq!(r["code"], 400, "{r}");
    let r = ws
        .request(json!({"type": "command", "id": "c7", "command": "ECHO", "trace_id": "bad\u{1}", "data": {}}))
        .await;
    assert_eq!(r["code"], 400, "{r}");
    let r = ws
        .request(json!({"type": "command", "id": "c8", "command": "ECHO", "trace_id": "t-8", "data": {}}))
        .await;
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(next_command_reply(&mut ws).await["trace_id"], "t-8");
}

#[test]
fn a_command_map_that_cannot_work_is_refused_by_the_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(
        &path,
        "[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n\
         [upstream.commands.CALL]\ntarget = \"nats:svc.calls\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "upstream.commands.CALL.target is a nats: target, which needs upstream.nats_url"
        ),
        "{err}"
    );
}

/// A NATS worker and an AMQP worker written here answer commands routed through the binary.
#[tokio::test]
async fn commands_round_trip_through_nats_and_amqp_workers() {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let subject = format!("herald.test.cmd.{}", random_hex(6));
    let queue = format!("herald.test.cmd.{}", random_hex(6));

    // NATS worker: answers with the envelope's trace id and user.
    let nc = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let mut sub = nc.subscribe(subject.clone()).await.unwrap();
    nc.flush().await.unwrap();
    let nats_worker = {
        let nc = nc.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let env: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                if let Some(reply) = m.reply {
                    let body = json!({"code": 0, "data": {"via": "nats", "trace_id": env["trace_id"], "user": env["user"]["id"]}});
                    let _ = nc.publish(reply, body.to_string().into()).await;
                }
            }
        })
    };

    // AMQP worker: consumes the queue, replies to reply_to with the correlation id.
    let conn = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let amqp_worker = {
        let ch = ch.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let env: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                let _ = d.ack(BasicAckOptions::default()).await;
                let (Some(reply_to), Some(corr)) = (
                    d.properties.reply_to().clone(),
                    d.properties.correlation_id().clone(),
                ) else {
                    continue;
                };
                let body = json!({"code": 0, "data": {"via": "amqp", "trace_id": env["trace_id"], "user": env["user"]["id"]}});
                let _ = ch
                    .basic_publish(
                        "".into(),
                        reply_to.as_str().into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        BasicProperties::default().with_correlation_id(corr),
                    )
                    .await;
            }
        })
    };

    let server = Server::start(&format!(
        r#"
[upstream]
amqp_url = "{amqp_url}"
nats_url = "nats://127.0.0.1:4222"
timeout = "5s"
[upstream.commands.VIA_NATS]
target = "nats:{subject}"
[upstream.commands.VIA_AMQP]
target = "amqp:{queue}"
[upstream.commands.NOBODY]
target = "nats:{subject}.nobody"
"#
    ))
    .await;
    let mut ws = server.connect_user("bob").await;
    for (cmd, via) in [("VIA_NATS", "nats"), ("VIA_AMQP", "amqp")] {
        for n in 0..3 {
            let trace = format!("t-{via}-{n}");
            let r = ws
                .request(json!({"type": "command", "id": trace, "command": cmd, "trace_id": trace, "data": {"n": n}}))
                .await;
            assert_eq!(r["code"], 0, "{r}");
            let cr = next_command_reply(&mut ws).await;
            assert_eq!(cr["trace_id"], trace.as_str(), "{cr}");
            assert_eq!(cr["code"], 0, "{cr}");
            assert_eq!(
                cr["data"],
                json!({"via": via, "trace_id": trace, "user": "bob"}),
                "{cr}"
            );
        }
    }
    // Nobody listens on the subject: 503 at once.
    ws.request(
        json!({"type": "command", "id": "x", "command": "NOBODY", "trace_id": "t-x", "data": {}}),
    )
    .await;
    let cr = next_command_reply(&mut ws).await;
    assert_eq!(
        (cr["trace_id"].clone(), cr["code"].clone()),
        (json!("t-x"), json!(503)),
        "{cr}"
    );

    nats_worker.abort();
    amqp_worker.abort();
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}
