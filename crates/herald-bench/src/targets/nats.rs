//! NATS with its WebSocket listener (PEERS.md): subscribers speak the raw NATS text protocol
//! over WebSocket (`INFO` → `CONNECT`/`SUB`/`PING` → `PONG`, then `MSG` frames, `PING` answered
//! with `PONG`); the publisher writes `PUB` over plain TCP and confirms with `PING`/`PONG`.

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::Message;

use super::{Incoming, Publisher, Target, Ws, extract_ts};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatsSpec {
    /// `ws://127.0.0.1:port`
    pub ws_url: String,
    /// `127.0.0.1:port` (client protocol over TCP, for the publisher)
    pub tcp_addr: String,
}

pub struct Nats {
    spec: NatsSpec,
}

impl Nats {
    pub fn new(spec: NatsSpec) -> Self {
        Self { spec }
    }
}

/// Walks the protocol operations in `buf`: each `MSG <subject> <sid> [reply] <len>\r\n<payload>\r\n`
/// is a delivery; `PING` asks for a `PONG`.
pub fn parse_ops(buf: &[u8], on: &mut dyn FnMut(Incoming)) {
    let mut at = 0;
    while at < buf.len() {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return;
        };
        let line = &buf[at..at + eol];
        at += eol + 2;
        if line.starts_with(b"MSG ") {
            let len: usize = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let end = (at + len).min(buf.len());
            on(Incoming::Delivery(extract_ts(&buf[at..end])));
            at = end + 2;
        } else if line == b"PING" {
            on(Incoming::Reply(Message::binary(&b"PONG\r\n"[..])));
        }
    }
}

fn frame_bytes(msg: &Message) -> Option<&[u8]> {
    match msg {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(t.as_bytes()),
        _ => None,
    }
}

/// Waits for a frame containing `needle`, failing on close or after 30 s.
async fn wait_for(ws: &mut Ws, needle: &[u8]) -> anyhow::Result<()> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("timed out waiting for NATS")?
            .context("connection closed")??;
        if let Message::Close(c) = &msg {
            bail!("closed by NATS: {c:?}");
        }
        if let Some(b) = frame_bytes(&msg) {
            if b.windows(needle.len()).any(|w| w == needle) {
                return Ok(());
            }
            if b.starts_with(b"-ERR") {
                bail!("NATS: {}", String::from_utf8_lossy(b).trim());
            }
        }
    }
}

impl Target for Nats {
    fn ws_url(&self, _conn: usize, _topic: Option<&str>) -> anyhow::Result<String> {
        Ok(self.spec.ws_url.clone())
    }

    async fn handshake(
        &self,
        ws: &mut Ws,
        _conn: usize,
        topic: Option<&str>,
    ) -> anyhow::Result<()> {
        wait_for(ws, b"INFO").await?;
        let mut hello = String::from("CONNECT {\"verbose\":false,\"pedantic\":false}\r\n");
        if let Some(t) = topic {
            hello.push_str(&format!("SUB {t} 1\r\n"));
        }
        // The PONG proves the server processed CONNECT and SUB.
        hello.push_str("PING\r\n");
        ws.send(Message::binary(hello.into_bytes())).await?;
        wait_for(ws, b"PONG").await
    }

    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming)) {
        if let Some(b) = frame_bytes(msg) {
            parse_ops(b, on);
        }
    }
}

/// Publisher over the NATS TCP protocol.
pub struct NatsPublisher {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    buf: Vec<u8>,
    line: String,
}

impl NatsPublisher {
    pub async fn connect(spec: &NatsSpec) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(&spec.tcp_addr)
            .await
            .with_context(|| format!("cannot connect to NATS at {}", spec.tcp_addr))?;
        tcp.set_nodelay(true)?;
        let (r, w) = tcp.into_split();
        let mut p = Self {
            read: BufReader::new(r),
            write: w,
            buf: Vec::new(),
            line: String::new(),
        };
        p.read.read_line(&mut p.line).await?; // INFO
        p.write
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .await?;
        Ok(p)
    }

    /// Sends PING and reads until PONG: everything before it has been processed.
    async fn flush(&mut self) -> anyhow::Result<()> {
        self.write.write_all(b"PING\r\n").await?;
        loop {
            self.line.clear();
            if self.read.read_line(&mut self.line).await? == 0 {
                bail!("NATS closed the publisher connection");
            }
            match self.line.trim_end() {
                "PONG" => return Ok(()),
                "PING" => self.write.write_all(b"PONG\r\n").await?,
                l if l.starts_with("-ERR") => bail!("NATS: {l}"),
                _ => {}
            }
        }
    }
}

impl Publisher for NatsPublisher {
    async fn publish(&mut self, topic: &str, payloads: &[String]) -> anyhow::Result<usize> {
        self.buf.clear();
        for p in payloads {
            self.buf
                .extend_from_slice(format!("PUB {topic} {}\r\n{p}\r\n", p.len()).as_bytes());
        }
        self.write.write_all(&self.buf).await?;
        self.flush().await?;
        Ok(payloads.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::make_payload;

    #[test]
    fn parses_coalesced_messages_and_pings() {
        let p1 = make_payload(11, 100);
        let p2 = make_payload(22, 100);
        let buf = format!(
            "MSG room/bench 1 100\r\n{p1}\r\nPING\r\nMSG room/bench 1 reply.x 100\r\n{p2}\r\n+OK\r\n"
        );
        let mut seen = Vec::new();
        parse_ops(buf.as_bytes(), &mut |i| seen.push(i));
        assert_eq!(
            seen,
            vec![
                Incoming::Delivery(Some(11)),
                Incoming::Reply(Message::binary(&b"PONG\r\n"[..])),
                Incoming::Delivery(Some(22)),
            ]
        );
    }

    #[test]
    fn ignores_info_and_truncated_input() {
        let mut n = 0;
        parse_ops(
            b"INFO {\"server_id\":\"x\"}\r\nMSG a 1 5\r\nab",
            &mut |_| n += 1,
        );
        assert_eq!(n, 1); // the MSG line counts even if its payload was cut
    }
}
