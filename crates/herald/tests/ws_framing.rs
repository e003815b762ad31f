//! WebSocket framing (our own RFC 6455 codec, `herald_proto::ws` + `herald-server/src/wsio.rs`)
//! driven over a raw TCP socket, byte by byte where it matters: a frame sent right behind the
//! handshake, fragmented messages with a ping between the fragments, frames split across
//! writes and several in one write, the three length forms, and the framing errors (unmasked,
//! bad UTF-8, reserved bits, bad close) that must close with the right code and never hurt
//! the server.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => v.push(0x80 | n as u8),
        n if n <= 65535 => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&MASK);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    v
}

fn text(s: &str) -> Vec<u8> {
    frame(true, 0x1, s.as_bytes())
}

/// A raw client: the handshake written by hand, server frames parsed by hand.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Opens `/ws` with `token`, writing `after` in the same packet as the request.
    async fn open(server: &Server, user: &str, after: &[u8]) -> Raw {
        let addr = server.http_url().trim_start_matches("http://").to_owned();
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let token = server.token(user, 3600, json!({}));
        let mut req = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .into_bytes();
        req.extend_from_slice(after);
        tcp.write_all(&req).await.unwrap();
        let mut raw = Raw {
            tcp,
            buf: Vec::new(),
        };
        let head = raw.read_until_headers().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // RFC 6455's own example key and accept value.
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        raw
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout(T, self.tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("nothing from the server within {T:?}"),
        }
    }

    async fn read_until_headers(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + 4);
                return head;
            }
            assert!(self.fill().await, "closed during the handshake");
        }
    }

    /// The next server frame: (opcode, payload); `None` when the server closed TCP.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are never masked");
                assert_ne!(self.buf[0] & 0x80, 0, "server frames are final");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(n) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((op, payload));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn next_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Some((0x1, p)) => return serde_json::from_slice(&p).unwrap(),
                Some((0x9, _)) => continue,
                other => panic!("want a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame; returns its code.
    async fn close_code(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some((0x8, p)) => return u16::from_be_bytes([p[0], p[1]]),
                Some(_) => continue,
                None => panic!("TCP closed without a close frame"),
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }
}

#[tokio::test]
async fn frames_behind_the_handshake_fragments_and_split_writes() {
    let server = Server::start("").await;

    // A ping in the same packet as the upgrade request: bytes the HTTP layer read past the
    // request must reach the WebSocket reader.
    let mut raw = Raw::open(&server, "alice", &frame(true, 0x9, b"early")).await;
    let welcome = raw.next_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(raw.next().await, Some((0xA, b"early".to_vec())));

    // A subscribe in three fragments with a ping between them.
    let req = r#"{"type":"subscribe","id":1,"topic":"room/frag"}"#.as_bytes();
    let mut bytes = frame(false, 0x1, &req[..10]);
    bytes.extend(frame(true, 0x9, b"mid"));
    bytes.extend(frame(false, 0x0, &req[10..30]));
    bytes.extend(frame(true, 0x0, &req[30..]));
    raw.send(&bytes).await;
    assert_eq!(raw.next().await, Some((0xA, b"mid".to_vec())));
    let reply = raw.next_json().await;
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["code"], 0, "{reply}");

    // A frame written one byte at a time, then two frames in one write.
    for b in text(r#"{"type":"ping","id":2}"#) {
        raw.send(&[b]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(raw.next_json().await["type"], "pong");
    let mut two = text(r#"{"type":"ping","id":3}"#);
    two.extend(text(r#"{"type":"ping","id":4}"#));
    raw.send(&two).await;
    assert_eq!(raw.next_json().await["type"], "pong");
    assert_eq!(raw.next_json().await["type"], "pong");

    // Messages in the 16-bit and 64-bit length forms, both ways.
    for size in [300usize, 70_000] {
        let data = "x".repeat(size);
        let publish =
            json!({"type":"publish","id":5,"topic":"room/frag","event":"big","data":data});
        raw.send(&text(&publish.to_string())).await;
        let mut got_reply = false;
        let mut got_message = false;
        while !(got_reply && got_message) {
            let v = raw.next_json().await;
            match v["type"].as_str() {
                Some("reply") => {
                    assert_eq!(v["code"], 0, "{v}");
                    got_reply = true;
                }
                Some("message") => {
                    assert_eq!(v["data"].as_str().map(str::len), Some(size));
                    got_message = true;
                }
                _ => panic!("unexpected {v}"),
            }
        }
    }

    // A clean close is answered with a close frame carrying the same code.
    raw.send(&frame(true, 0x8, &1000u16.to_be_bytes())).await;
    assert_eq!(raw.close_code().await, 1000);
    assert_eq!(raw.next().await, None, "the server ends the TCP stream");
}

#[tokio::test]
async fn framing_errors_close_with_their_code_and_the_server_stays_up() {
    let server = Server::start("").await;
    let unmasked = {
        let mut f = text(r#"{"type":"ping"}"#);
        f[1] &= 0x7f;
        f.drain(2..6);
        f
    };
    let reserved = {
        let mut f = text(r#"{"type":"ping"}"#);
        f[0] |= 0x40;
        f
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", unmasked, 1002),
        ("reserved bit", reserved, 1002),
        ("unknown opcode", frame(true, 0x3, b"x"), 1002),
        ("invalid UTF-8", frame(true, 0x1, &[0x7b, 0xc3, 0x28]), 1007),
        ("continuation first", frame(true, 0x0, b"x"), 1002),
        ("fragmented ping", frame(false, 0x9, b"x"), 1002),
        (
            "close with code 1005",
            frame(true, 0x8, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "frame over the limit",
            {
                let mut f = vec![0x81, 0xff];
                f.extend_from_slice(&(u64::MAX / 2).to_be_bytes());
                f.extend_from_slice(&MASK);
                f
            },
            1009,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut raw = Raw::open(&server, "bob", &[]).await;
        assert_eq!(raw.next_json().await["type"], "welcome");
        raw.send(&bytes).await;
        assert_eq!(raw.close_code().await, code, "{what}");
    }
    // Nothing leaked or broke: a normal client still works and no connection is left.
    let mut ws = server.connect_user("carol").await;
    ws.send_json(&json!({"type":"ping","id":9})).await;
    assert_eq!(ws.recv_json(T).await["type"], "pong");
    eventually(T, "only carol connected", || async {
        server.stats().await["total_clients"] == 1
    })
    .await;
    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "herald_errors_total",
            &[("kind", "malformed_frame")]
        )
        .is_some_and(|n| n >= 7.0),
        "protocol errors counted"
    );
}
