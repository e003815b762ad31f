//! STOMP 1.2 over WebSocket (subprotocol `v12.stomp`), one client for two servers:
//!
//! - **RabbitMQ Web-STOMP** (`rabbitmq-stomp`, PEERS.md): `CONNECT` with `login`/`passcode`
//!   guest/guest, `SUBSCRIBE` to `/topic/<key>` (RabbitMQ gives each subscriber its own
//!   auto-delete queue bound to `amq.topic` with that routing key); the publisher speaks AMQP
//!   0-9-1 to the same node: `basic.publish` to `amq.topic`, publisher confirms awaited.
//! - **Herald's own STOMP endpoint** (`herald-stomp`): `ws://…/stomp`, `CONNECT` with
//!   `Authorization:Bearer <jwt>` (the token the `herald` target puts in `?token=`),
//!   `SUBSCRIBE` to `/topic/<topic>`; published through Herald's HTTP API like `herald`.
//!
//! Both: connected = `CONNECTED` received; ready = the `RECEIPT` of a `SUBSCRIBE` carrying
//! `receipt:r` (the queue is bound, so nothing published afterwards can be missed); every
//! `MESSAGE` frame is a delivery, its send time found in the body by [`extract_ts`].
//!
//! Topic names: a bench topic `room/bench` becomes the RabbitMQ routing key `bench` (the
//! `room/` prefix dropped, any further `/` → `.`, the AMQP topic separator), so the
//! subscription is `/topic/bench` as in PEERS.md; Herald keeps `/topic/room/bench`.

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use jsonwebtoken::EncodingKey;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use super::herald::HeraldSpec;
use super::{Incoming, Publisher, Target, Ws, extract_ts};

/// The WebSocket subprotocol both servers are asked for.
pub const SUBPROTOCOL: &str = "v12.stomp";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RabbitStompSpec {
    /// `ws://127.0.0.1:port/ws` (Web-STOMP)
    pub ws_url: String,
    /// `amqp://guest:guest@127.0.0.1:port/%2f` (the publisher)
    pub amqp_url: String,
    pub login: String,
    pub passcode: String,
}

/// The RabbitMQ routing key (and `/topic/<key>` destination) of a bench topic.
pub fn routing_key(topic: &str) -> String {
    topic
        .strip_prefix("room/")
        .unwrap_or(topic)
        .replace('/', ".")
}

enum Auth {
    Login { login: String, passcode: String },
    Jwt(EncodingKey),
}

/// A STOMP subscriber for either server.
pub struct Stomp {
    ws_url: String,
    auth: Auth,
    /// RabbitMQ: topics become routing keys; Herald: topics as they are.
    rabbit: bool,
}

impl Stomp {
    pub fn rabbitmq(spec: RabbitStompSpec) -> Self {
        Self {
            ws_url: spec.ws_url,
            auth: Auth::Login {
                login: spec.login,
                passcode: spec.passcode,
            },
            rabbit: true,
        }
    }

    /// Herald's `/stomp` endpoint (`spec.ws_url` is the JSON `/ws` URL of the same server).
    pub fn herald(spec: &HeraldSpec) -> Self {
        Self {
            ws_url: herald_stomp_url(spec),
            auth: Auth::Jwt(EncodingKey::from_secret(spec.secret.as_bytes())),
            rabbit: false,
        }
    }

    fn destination(&self, topic: &str) -> String {
        if self.rabbit {
            format!("/topic/{}", routing_key(topic))
        } else {
            format!("/topic/{topic}")
        }
    }

    fn connect_frame(&self, conn: usize) -> anyhow::Result<String> {
        let auth = match &self.auth {
            Auth::Login { login, passcode } => format!("login:{login}\npasscode:{passcode}\n"),
            Auth::Jwt(key) => format!(
                "Authorization:Bearer {}\n",
                super::herald::mint_token(key, conn)?
            ),
        };
        Ok(format!(
            "CONNECT\naccept-version:1.2\nhost:/\n{auth}heart-beat:0,0\n\n\0"
        ))
    }

    fn who(&self) -> &'static str {
        if self.rabbit {
            "RabbitMQ Web-STOMP"
        } else {
            "Herald STOMP"
        }
    }
}

/// `ws://host:port/ws` → `ws://host:port/stomp`.
pub fn herald_stomp_url(spec: &HeraldSpec) -> String {
    let base = spec.ws_url.strip_suffix("/ws").unwrap_or(&spec.ws_url);
    format!("{base}/stomp")
}

fn frame_bytes(msg: &Message) -> Option<&[u8]> {
    match msg {
        Message::Binary(b) => Some(b),
        Message::Text(t) => Some(t.as_bytes()),
        _ => None,
    }
}

/// The STOMP frames in one WebSocket message (NUL-terminated; heart-beat EOLs before a
/// command skipped): each as its command and the whole frame.
fn frames(buf: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    buf.split(|&b| b == 0).filter_map(|f| {
        let start = f.iter().position(|&b| b != b'\n' && b != b'\r')?;
        let f = &f[start..];
        let end = f.iter().position(|&b| b == b'\n').unwrap_or(f.len());
        let command = f[..end].strip_suffix(b"\r").unwrap_or(&f[..end]);
        Some((command, f))
    })
}

/// Reports every `MESSAGE` frame in `buf` as a delivery.
pub fn parse_frames(buf: &[u8], on: &mut dyn FnMut(Incoming)) {
    for (command, frame) in frames(buf) {
        if command == b"MESSAGE" {
            on(Incoming::Delivery(extract_ts(frame)));
        }
    }
}

/// Waits for a frame whose command is `command`, failing on `ERROR`, close or after 30 s.
async fn wait_for(ws: &mut Ws, command: &[u8], who: &str) -> anyhow::Result<()> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .with_context(|| format!("timed out waiting for {who}"))?
            .with_context(|| format!("{who} closed the connection"))??;
        if let Message::Close(c) = &msg {
            bail!("closed by {who}: {c:?}");
        }
        if let Some(b) = frame_bytes(&msg) {
            for (cmd, frame) in frames(b) {
                if cmd == command {
                    return Ok(());
                }
                if cmd == b"ERROR" {
                    bail!("{who}: {}", String::from_utf8_lossy(frame).trim());
                }
            }
        }
    }
}

impl Target for Stomp {
    fn ws_url(&self, _conn: usize, _topic: Option<&str>) -> anyhow::Result<String> {
        Ok(self.ws_url.clone())
    }

    fn subprotocol(&self) -> Option<&'static str> {
        Some(SUBPROTOCOL)
    }

    async fn handshake(&self, ws: &mut Ws, conn: usize, topic: Option<&str>) -> anyhow::Result<()> {
        let who = self.who();
        ws.send(Message::text(self.connect_frame(conn)?)).await?;
        wait_for(ws, b"CONNECTED", who).await?;
        let Some(topic) = topic else { return Ok(()) };
        let sub = format!(
            "SUBSCRIBE\nid:0\ndestination:{}\nack:auto\nreceipt:r\n\n\0",
            self.destination(topic)
        );
        ws.send(Message::text(sub)).await?;
        wait_for(ws, b"RECEIPT", who).await
    }

    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming)) {
        if let Some(b) = frame_bytes(msg) {
            parse_frames(b, on);
        }
    }
}

/// AMQP 0-9-1 publisher: `basic.publish` to `amq.topic` with the topic's routing key, then
/// every publisher confirm awaited (the broker routed the message to every bound queue).
pub struct AmqpPublisher {
    _conn: Connection,
    ch: Channel,
}

impl AmqpPublisher {
    pub async fn connect(spec: &RabbitStompSpec) -> anyhow::Result<Self> {
        let conn = Connection::connect(&spec.amqp_url, ConnectionProperties::default())
            .await
            .with_context(|| format!("cannot connect to RabbitMQ at {}", spec.amqp_url))?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { _conn: conn, ch })
    }
}

impl Publisher for AmqpPublisher {
    async fn publish(&mut self, topic: &str, payloads: &[String]) -> anyhow::Result<usize> {
        let key = routing_key(topic);
        let mut confirms = Vec::with_capacity(payloads.len());
        for p in payloads {
            let confirm = self
                .ch
                .basic_publish(
                    "amq.topic".into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    p.as_bytes(),
                    BasicProperties::default(),
                )
                .await?;
            confirms.push(confirm);
        }
        let mut acked = 0;
        for c in confirms {
            if c.await?.is_ack() {
                acked += 1;
            }
        }
        Ok(acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::make_payload;

    #[test]
    fn keys_and_destinations() {
        assert_eq!(routing_key("room/bench"), "bench");
        assert_eq!(routing_key("room/idle-3"), "idle-3");
        assert_eq!(routing_key("device/7/telemetry"), "device.7.telemetry");
        let spec = HeraldSpec {
            ws_url: "ws://127.0.0.1:9/ws".into(),
            http_url: "http://127.0.0.1:9".into(),
            secret: "s".into(),
            api_key: "k".into(),
        };
        let h = Stomp::herald(&spec);
        assert_eq!(h.ws_url, "ws://127.0.0.1:9/stomp");
        assert_eq!(h.destination("room/bench"), "/topic/room/bench");
        let r = Stomp::rabbitmq(RabbitStompSpec {
            ws_url: "ws://127.0.0.1:8/ws".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:7/%2f".into(),
            login: "guest".into(),
            passcode: "guest".into(),
        });
        assert_eq!(r.destination("room/bench"), "/topic/bench");
        let c = r.connect_frame(1).unwrap();
        assert!(c.starts_with("CONNECT\naccept-version:1.2\n") && c.ends_with("\n\n\0"));
        assert!(c.contains("login:guest\npasscode:guest\n"));
        assert!(
            h.connect_frame(1)
                .unwrap()
                .contains("Authorization:Bearer ey")
        );
    }

    #[test]
    fn parses_messages_receipts_and_heartbeats() {
        let p1 = make_payload(11, 100);
        let p2 = make_payload(22, 100);
        let buf = format!(
            "\nMESSAGE\nsubscription:0\ndestination:/topic/bench\nmessage-id:T_0@@1\n\
             content-length:100\n\n{p1}\0\r\nMESSAGE\r\ncontent-length:100\r\n\r\n{p2}\0\
             RECEIPT\nreceipt-id:r\n\n\0\n"
        );
        let mut seen = Vec::new();
        parse_frames(buf.as_bytes(), &mut |i| seen.push(i));
        assert_eq!(
            seen,
            vec![Incoming::Delivery(Some(11)), Incoming::Delivery(Some(22))]
        );
        let cmds: Vec<&[u8]> = frames(b"CONNECTED\nversion:1.2\n\n\0")
            .map(|f| f.0)
            .collect();
        assert_eq!(cmds, vec![&b"CONNECTED"[..]]);
        assert_eq!(frames(b"\n").count(), 0);
    }
}
