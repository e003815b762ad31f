//! Socket.IO 4.8 (`bench/peers/socketio/server.js`), spoken directly over the WebSocket
//! transport (`/socket.io/?EIO=4&transport=websocket`): Engine.IO v4 packets carrying Socket.IO
//! v5 packets, one per text frame.
//!
//! Handshake: the server opens with `0{"sid":…,"pingInterval":25000,…}`; the client connects
//! to the default namespace with `40` and gets `40{"sid":…}`; it subscribes with
//! `420["subscribe","<room>"]` (ack id 0) and waits for the ack `430[{"ok":true}]`.
//! Deliveries are events `42["message","<payload>"]`. The server pings with `2` and drops a
//! client that does not answer `3` within pingTimeout. Publishing is the shared
//! `POST /publish` ([`super::node_ws::JsonPublisher`]).

use anyhow::bail;
use futures_util::SinkExt as _;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use super::{Incoming, Target, Ws, extract_ts, next_text};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketIoSpec {
    /// `ws://127.0.0.1:port/socket.io/?EIO=4&transport=websocket`
    pub ws_url: String,
    /// `http://127.0.0.1:port`
    pub http_url: String,
}

pub struct SocketIo {
    spec: SocketIoSpec,
}

impl SocketIo {
    pub fn new(spec: SocketIoSpec) -> Self {
        Self { spec }
    }
}

/// One Engine.IO packet (with the Socket.IO packet inside a `4` message), as far as the bench
/// needs to tell them apart. String fields borrow the JSON that follows the header.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `0{…}`: Engine.IO open (sid, pingInterval, pingTimeout, maxPayload).
    Open(&'a str),
    /// `1`: Engine.IO close.
    Close,
    /// `2`: server ping, to be answered with `3`.
    Ping,
    /// `40{…}` (or `40/nsp,{…}`): namespace connected.
    Connect(&'a str),
    /// `41`: namespace disconnected.
    Disconnect,
    /// `42[…]` or `42<id>[…]`: an event (arguments array).
    Event { id: Option<u64>, args: &'a str },
    /// `43<id>[…]`: the ack of our event `id`.
    Ack { id: u64, args: &'a str },
    /// `44{…}`: namespace connection refused.
    ConnectError(&'a str),
    /// Anything else (pong, upgrade, noop, binary events).
    Other,
}

/// Splits `[/nsp,][id]rest` (what follows a Socket.IO packet type).
fn nsp_id_rest(s: &str) -> (Option<u64>, &str) {
    let s = if s.starts_with('/') {
        s.split_once(',').map_or("", |(_, rest)| rest)
    } else {
        s
    };
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    (s[..digits].parse().ok(), &s[digits..])
}

/// Parses one text frame of the WebSocket transport.
pub fn parse_packet(frame: &str) -> Packet<'_> {
    let mut chars = frame.char_indices();
    let Some((_, engine)) = chars.next() else {
        return Packet::Other;
    };
    match engine {
        '0' => Packet::Open(&frame[1..]),
        '1' => Packet::Close,
        '2' => Packet::Ping,
        '4' => {
            let Some((at, kind)) = chars.next() else {
                return Packet::Other;
            };
            let (id, rest) = nsp_id_rest(&frame[at + kind.len_utf8()..]);
            match kind {
                '0' => Packet::Connect(rest),
                '1' => Packet::Disconnect,
                '2' => Packet::Event { id, args: rest },
                '3' => match id {
                    Some(id) => Packet::Ack { id, args: rest },
                    None => Packet::Other,
                },
                '4' => Packet::ConnectError(rest),
                _ => Packet::Other,
            }
        }
        _ => Packet::Other,
    }
}

/// The frame that emits `subscribe` with `room` and asks for ack 0.
pub fn subscribe_frame(room: &str) -> anyhow::Result<String> {
    Ok(format!(
        "420{}",
        serde_json::to_string(&("subscribe", room))?
    ))
}

const PONG: &str = "3";

/// Reads frames until `want` accepts one, answering pings and failing on refusals.
async fn until(ws: &mut Ws, what: &str, want: impl Fn(&Packet<'_>) -> bool) -> anyhow::Result<()> {
    loop {
        let frame = next_text(ws, "Socket.IO").await?;
        let p = parse_packet(&frame);
        if want(&p) {
            return Ok(());
        }
        match p {
            Packet::Ping => ws.send(Message::text(PONG)).await?,
            Packet::ConnectError(e) => bail!("Socket.IO refused the connection: {e}"),
            Packet::Close | Packet::Disconnect => bail!("Socket.IO disconnected us ({what})"),
            _ => {}
        }
    }
}

impl Target for SocketIo {
    fn ws_url(&self, _conn: usize, _topic: Option<&str>) -> anyhow::Result<String> {
        Ok(self.spec.ws_url.clone())
    }

    async fn handshake(
        &self,
        ws: &mut Ws,
        _conn: usize,
        topic: Option<&str>,
    ) -> anyhow::Result<()> {
        let open = next_text(ws, "Socket.IO").await?;
        if !matches!(parse_packet(&open), Packet::Open(_)) {
            bail!("expected an Engine.IO open packet, got {open}");
        }
        ws.send(Message::text("40")).await?;
        until(ws, "connect", |p| matches!(p, Packet::Connect(_))).await?;
        let Some(room) = topic else { return Ok(()) };
        ws.send(Message::text(subscribe_frame(room)?)).await?;
        until(ws, "subscribe", |p| matches!(p, Packet::Ack { id: 0, .. })).await
    }

    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming)) {
        let Message::Text(t) = msg else { return };
        match parse_packet(t.as_str()) {
            Packet::Event { .. } => on(Incoming::Delivery(extract_ts(t.as_bytes()))),
            Packet::Ping => on(Incoming::Reply(Message::text(PONG))),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::make_payload;

    #[test]
    fn parses_engine_io_and_socket_io_packets() {
        let open = r#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        assert_eq!(parse_packet(open), Packet::Open(&open[1..]));
        assert_eq!(parse_packet("2"), Packet::Ping);
        assert_eq!(parse_packet("3"), Packet::Other);
        assert_eq!(parse_packet("1"), Packet::Close);
        assert_eq!(parse_packet(""), Packet::Other);
        assert_eq!(parse_packet("4"), Packet::Other);
        assert_eq!(parse_packet("4é"), Packet::Other);
        assert_eq!(
            parse_packet(r#"40{"sid":"wZX3oN0bSVIhsaknAAAI"}"#),
            Packet::Connect(r#"{"sid":"wZX3oN0bSVIhsaknAAAI"}"#)
        );
        assert_eq!(
            parse_packet(r#"40/admin,{"sid":"x"}"#),
            Packet::Connect(r#"{"sid":"x"}"#)
        );
        assert_eq!(parse_packet("41"), Packet::Disconnect);
        assert_eq!(
            parse_packet(r#"430[{"ok":true}]"#),
            Packet::Ack {
                id: 0,
                args: r#"[{"ok":true}]"#
            }
        );
        assert_eq!(
            parse_packet(r#"4312["x"]"#),
            Packet::Ack {
                id: 12,
                args: r#"["x"]"#
            }
        );
        assert_eq!(
            parse_packet(r#"42["message","a"]"#),
            Packet::Event {
                id: None,
                args: r#"["message","a"]"#
            }
        );
        assert_eq!(
            parse_packet(r#"42/chat,7["m"]"#),
            Packet::Event {
                id: Some(7),
                args: r#"["m"]"#
            }
        );
        assert_eq!(
            parse_packet(r#"44{"message":"Invalid namespace"}"#),
            Packet::ConnectError(r#"{"message":"Invalid namespace"}"#)
        );
    }

    #[test]
    fn subscribe_frame_is_an_event_with_ack_zero() {
        let f = subscribe_frame("room/bench").unwrap();
        assert_eq!(f, r#"420["subscribe","room/bench"]"#);
        assert_eq!(
            parse_packet(&f),
            Packet::Event {
                id: Some(0),
                args: r#"["subscribe","room/bench"]"#
            }
        );
    }

    #[test]
    fn classifies_deliveries_and_pings() {
        let t = SocketIo::new(SocketIoSpec {
            ws_url: "ws://127.0.0.1:9/socket.io/?EIO=4&transport=websocket".into(),
            http_url: "http://127.0.0.1:9".into(),
        });
        let p = make_payload(99, 100);
        let mut seen = Vec::new();
        t.classify(
            &Message::text(format!(r#"42["message","{p}"]"#)),
            &mut |i| seen.push(i),
        );
        t.classify(&Message::text("2"), &mut |i| seen.push(i));
        t.classify(&Message::text(r#"430[{"ok":true}]"#), &mut |i| seen.push(i));
        assert_eq!(
            seen,
            vec![
                Incoming::Delivery(Some(99)),
                Incoming::Reply(Message::text("3")),
            ]
        );
    }
}
