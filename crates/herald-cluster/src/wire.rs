//! What travels between nodes besides topic messages (those are their JSON v1 frame, see
//! [`herald_core::message::Message::from_json_frame`]): control events for every node and
//! directed events for one node. Pure: no I/O.
//!
//! - A control event is a small JSON object tagged by `k` (`disconnect`, `to_user`, `revoke`).
//! - A node event is binary: `C`, the connection id (8 bytes, big-endian), then the frame
//!   exactly as the connection will write it.

use bytes::{BufMut, Bytes, BytesMut};
use herald_core::bus::{ControlEvent, NodeEvent};
use serde::{Deserialize, Serialize};

/// Bytes from another node that are not an event of this version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad bus event: {0}")]
pub struct WireError(String);

#[derive(Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
enum Control {
    Disconnect {
        user: String,
    },
    ToUser {
        user: String,
        /// The frame's JSON text.
        frame: String,
    },
    Revoke {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jti: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
    },
}

pub fn encode_control(event: &ControlEvent) -> Bytes {
    let c = match event.clone() {
        ControlEvent::DisconnectUser { user } => Control::Disconnect { user },
        ControlEvent::ToUser { user, frame } => Control::ToUser {
            user,
            frame: String::from_utf8_lossy(&frame).into_owned(),
        },
        ControlEvent::Revoke {
            jti,
            user,
            at,
            until,
        } => Control::Revoke {
            jti,
            user,
            at,
            until,
        },
    };
    // Plain strings and numbers: serializing cannot fail.
    serde_json::to_vec(&c).map(Bytes::from).unwrap_or_default()
}

pub fn decode_control(bytes: &[u8]) -> Result<ControlEvent, WireError> {
    let c: Control = serde_json::from_slice(bytes).map_err(|e| WireError(e.to_string()))?;
    Ok(match c {
        Control::Disconnect { user } => ControlEvent::DisconnectUser { user },
        Control::ToUser { user, frame } => ControlEvent::ToUser {
            user,
            frame: Bytes::from(frame),
        },
        Control::Revoke {
            jti,
            user,
            at,
            until,
        } => ControlEvent::Revoke {
            jti,
            user,
            at,
            until,
        },
    })
}

const TO_CONNECTION: u8 = b'C';

pub fn encode_node_event(event: &NodeEvent) -> Bytes {
    match event {
        NodeEvent::ToConnection { conn, frame } => {
            let mut b = BytesMut::with_capacity(9 + frame.len());
            b.put_u8(TO_CONNECTION);
            b.put_u64(*conn);
            b.put_slice(frame);
            b.freeze()
        }
    }
}

pub fn decode_node_event(bytes: Bytes) -> Result<NodeEvent, WireError> {
    match bytes.first() {
        Some(&TO_CONNECTION) if bytes.len() >= 9 => {
            let mut id = [0u8; 8];
            id.copy_from_slice(&bytes[1..9]);
            Ok(NodeEvent::ToConnection {
                conn: u64::from_be_bytes(id),
                frame: bytes.slice(9..),
            })
        }
        Some(&tag) => Err(WireError(format!(
            "node event tag {tag:#04x}, {} bytes",
            bytes.len()
        ))),
        None => Err(WireError("empty node event".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_events_round_trip() {
        for e in [
            ControlEvent::DisconnectUser { user: "u1".into() },
            ControlEvent::ToUser {
                user: "u1".into(),
                frame: Bytes::from_static(b"{\"type\":\"command_reply\"}"),
            },
            ControlEvent::Revoke {
                jti: Some("j".into()),
                user: None,
                at: 5,
                until: Some(9),
            },
            ControlEvent::Revoke {
                jti: None,
                user: Some("u".into()),
                at: 5,
                until: None,
            },
        ] {
            assert_eq!(decode_control(&encode_control(&e)).unwrap(), e);
        }
        assert!(decode_control(b"{\"k\":\"reboot\"}").is_err());
        assert!(decode_control(b"").is_err());
    }

    #[test]
    fn node_events_round_trip() {
        let e = NodeEvent::ToConnection {
            conn: 0x0102_0304_0506_0708,
            frame: Bytes::from_static(b"{\"type\":\"reply\"}"),
        };
        assert_eq!(decode_node_event(encode_node_event(&e)).unwrap(), e);
        assert!(decode_node_event(Bytes::new()).is_err());
        assert!(decode_node_event(Bytes::from_static(b"C123")).is_err());
        assert!(decode_node_event(Bytes::from_static(b"X123456789")).is_err());
    }
}
