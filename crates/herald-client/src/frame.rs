//! JSON v1 frames (SPEC §2): parsing what the server sends into [`Frame`], and building what
//! the client sends. Pure: no sockets, unit-tested on strings.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use crate::error::ClientError;

/// The first frame after a good authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub conn_id: String,
    pub user_id: String,
    pub node_id: String,
    pub heartbeat_ms: u64,
    pub protocol: String,
}

/// The answer to a request that carried an `id`. A refusal (`code` ≠ 0) is still a `Reply`:
/// check [`Reply::is_ok`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub id: Value,
    pub code: u16,
    pub message: String,
    /// The whole frame, for the extra fields (`seq`, `recovered`, `topic`, …).
    pub raw: Value,
}

impl Reply {
    /// `code == 0`.
    pub fn is_ok(&self) -> bool {
        self.code == 0
    }

    /// The `seq` of a subscribe reply on a history topic, or of a publish reply.
    pub fn seq(&self) -> Option<u64> {
        self.raw.get("seq").and_then(Value::as_u64)
    }

    /// `recovered` of a subscribe reply that had `since`.
    pub fn recovered(&self) -> Option<bool> {
        self.raw.get("recovered").and_then(Value::as_bool)
    }

    /// Whether this reply answers the request we sent with `id` (the server echoes the id as we
    /// sent it; a string form of the same number is accepted too).
    pub(crate) fn answers(&self, id: u64) -> bool {
        match &self.id {
            Value::Number(n) => n.as_u64() == Some(id),
            Value::String(s) => s.parse::<u64>().ok() == Some(id),
            _ => false,
        }
    }
}

/// A published message delivered to a subscriber (the envelope of SPEC §1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub topic: String,
    pub event: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub ts: u64,
    #[serde(default)]
    pub data: Value,
    /// Durable message: acknowledge it with [`crate::Client::ack`].
    #[serde(default)]
    pub ack: bool,
    /// The retained "current value", sent first at subscribe.
    #[serde(default)]
    pub retained: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The sender; a non-string `from` (an object, say) is kept as its compact JSON text.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub from: Option<String>,
}

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

/// What [`crate::Client::next_event`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Message(Message),
    /// An `error` frame: the connection stays open.
    Error {
        code: u16,
        message: String,
    },
    /// The server asks the client to come back later (drain, restart); a close follows.
    Reconnect {
        reason: String,
        after_ms: u64,
    },
    /// The answer to [`crate::Client::command`], as sent (`command`, `trace_id`, `code`, …).
    CommandReply(Value),
    Pong,
    /// The connection ended; `code` is the close code when the server sent one.
    Closed {
        code: Option<u16>,
        reason: String,
    },
    /// Anything else: unknown frame types, replies nobody waits for, non-JSON text (as a
    /// JSON string).
    Other(Value),
}

/// One frame from the server, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Welcome(Welcome),
    Reply(Reply),
    Event(Event),
}

impl Frame {
    /// Parses one text frame. A bare `pong` (the answer to a bare `ping`) is [`Event::Pong`];
    /// other non-JSON text is [`Event::Other`] holding the text. A frame of a known type with
    /// missing or mistyped fields is a [`ClientError::Protocol`].
    pub fn parse(text: &str) -> Result<Frame, ClientError> {
        if text.trim() == "pong" {
            return Ok(Frame::Event(Event::Pong));
        }
        match serde_json::from_str::<Value>(text) {
            Ok(value) => Frame::from_value(value),
            Err(_) => Ok(Frame::Event(Event::Other(Value::String(text.to_owned())))),
        }
    }

    /// Classifies an already decoded frame by its `type`.
    pub fn from_value(value: Value) -> Result<Frame, ClientError> {
        let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
        let frame = match kind {
            "welcome" => Frame::Welcome(fields(kind, &value)?),
            "reply" => {
                let f: ReplyFields = fields(kind, &value)?;
                Frame::Reply(Reply {
                    id: f.id,
                    code: f.code,
                    message: f.message,
                    raw: value,
                })
            }
            "message" => Frame::Event(Event::Message(fields(kind, &value)?)),
            "error" => {
                let f: ErrorFields = fields(kind, &value)?;
                Frame::Event(Event::Error {
                    code: f.code,
                    message: f.message,
                })
            }
            "reconnect" => {
                let f: ReconnectFields = fields(kind, &value)?;
                Frame::Event(Event::Reconnect {
                    reason: f.reason,
                    after_ms: f.after_ms,
                })
            }
            "command_reply" => Frame::Event(Event::CommandReply(value)),
            "pong" => Frame::Event(Event::Pong),
            _ => Frame::Event(Event::Other(value)),
        };
        Ok(frame)
    }

    /// The frame as an [`Event`], for frames nobody is waiting for: a welcome or a reply
    /// becomes [`Event::Other`] with its JSON.
    pub(crate) fn into_event(self) -> Event {
        match self {
            Frame::Event(e) => e,
            Frame::Reply(r) => Event::Other(r.raw),
            Frame::Welcome(w) => Event::Other(json!({
                "type": "welcome",
                "conn_id": w.conn_id,
                "user_id": w.user_id,
                "node_id": w.node_id,
                "heartbeat_ms": w.heartbeat_ms,
                "protocol": w.protocol,
            })),
        }
    }
}

fn fields<T: for<'de> Deserialize<'de>>(kind: &str, value: &Value) -> Result<T, ClientError> {
    T::deserialize(value).map_err(|e| ClientError::Protocol(format!("bad {kind} frame: {e}")))
}

#[derive(Deserialize)]
struct ReplyFields {
    #[serde(default)]
    id: Value,
    code: u16,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct ErrorFields {
    code: u16,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct ReconnectFields {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    after_ms: u64,
}

// Client → server frames, without the `id` (the client adds it when it waits for a reply).

/// `subscribe` / `unsubscribe`: one topic as `topic`, several as `topics`.
pub(crate) fn topics_request(kind: &str, topics: &[&str]) -> Value {
    match topics {
        [one] => json!({"type": kind, "topic": one}),
        many => json!({"type": kind, "topics": many}),
    }
}

pub(crate) fn subscribe_since(topic: &str, since: u64) -> Value {
    json!({"type": "subscribe", "topic": topic, "since": since})
}

pub(crate) fn publish(topic: &str, event: &str, data: Value) -> Value {
    json!({"type": "publish", "topic": topic, "event": event, "data": data})
}

pub(crate) fn room(kind: &str, room: &str) -> Value {
    json!({"type": kind, "room": room})
}

pub(crate) fn ack(ids: &[String]) -> Value {
    json!({"type": "ack", "ids": ids})
}

pub(crate) fn auth(token: &str) -> Value {
    json!({"type": "auth", "token": token})
}

pub(crate) fn command(command: &str, trace_id: &str, data: Value) -> Value {
    json!({"type": "command", "command": command, "trace_id": trace_id, "data": data})
}

pub(crate) fn ping() -> Value {
    json!({"type": "ping"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str) -> Event {
        match Frame::parse(text) {
            Ok(Frame::Event(e)) => e,
            other => panic!("expected an event from {text}, got {other:?}"),
        }
    }

    #[test]
    fn welcome() {
        let f = Frame::parse(
            r#"{"type":"welcome","conn_id":"c-1","user_id":"42","node_id":"n-1","heartbeat_ms":25000,"protocol":"herald.json.v1"}"#,
        )
        .expect("parse");
        assert_eq!(
            f,
            Frame::Welcome(Welcome {
                conn_id: "c-1".into(),
                user_id: "42".into(),
                node_id: "n-1".into(),
                heartbeat_ms: 25000,
                protocol: "herald.json.v1".into(),
            })
        );
        // And back to an event with every field, when nobody waits for it.
        let Event::Other(v) = f.into_event() else {
            panic!("welcome should become Other")
        };
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["heartbeat_ms"], 25000);
    }

    #[test]
    fn welcome_missing_field_is_protocol_error() {
        let r = Frame::parse(r#"{"type":"welcome","conn_id":"c-1"}"#);
        assert!(matches!(r, Err(ClientError::Protocol(m)) if m.contains("welcome")));
    }

    #[test]
    fn reply_keeps_extra_fields() {
        let Frame::Reply(r) = Frame::parse(
            r#"{"type":"reply","id":"1","code":0,"message":"ok","topic":"device/d-9/telemetry","seq":1041,"recovered":true}"#,
        )
        .expect("parse") else {
            panic!("not a reply")
        };
        assert!(r.is_ok());
        assert_eq!(r.id, json!("1"));
        assert!(r.answers(1));
        assert!(!r.answers(2));
        assert_eq!(r.seq(), Some(1041));
        assert_eq!(r.recovered(), Some(true));
        assert_eq!(r.raw["topic"], "device/d-9/telemetry");
    }

    #[test]
    fn reply_refused() {
        let Frame::Reply(r) = Frame::parse(
            r#"{"type":"reply","id":2,"code":403,"message":"forbidden: user/43/notifications"}"#,
        )
        .expect("parse") else {
            panic!("not a reply")
        };
        assert!(!r.is_ok());
        assert_eq!(r.code, 403);
        assert!(r.answers(2));
        assert_eq!(r.seq(), None);
        assert_eq!(r.message, "forbidden: user/43/notifications");
    }

    #[test]
    fn message_full_and_minimal() {
        let e = event(
            r#"{"type":"message","topic":"user/42","event":"notification","id":"01JD","seq":17,"ts":1732345678901,"data":{"title":"t"},"ack":true,"retained":true,"trace_id":"t-1","from":"7"}"#,
        );
        assert_eq!(
            e,
            Event::Message(Message {
                topic: "user/42".into(),
                event: "notification".into(),
                id: "01JD".into(),
                seq: Some(17),
                ts: 1732345678901,
                data: json!({"title": "t"}),
                ack: true,
                retained: true,
                trace_id: Some("t-1".into()),
                from: Some("7".into()),
            })
        );

        let Event::Message(m) =
            event(r#"{"type":"message","topic":"broadcast","event":"e","id":"x","ts":1}"#)
        else {
            panic!("not a message")
        };
        assert_eq!(m.seq, None);
        assert_eq!(m.data, Value::Null);
        assert!(!m.ack && !m.retained);
        assert_eq!(m.trace_id, None);
        assert_eq!(m.from, None);
    }

    #[test]
    fn message_from_object_kept_as_json_text() {
        let Event::Message(m) = event(
            r#"{"type":"message","topic":"room/a","event":"chat","id":"x","ts":1,"from":{"user_id":"7"}}"#,
        ) else {
            panic!("not a message")
        };
        assert_eq!(m.from.as_deref(), Some(r#"{"user_id":"7"}"#));
    }

    #[test]
    fn message_missing_topic_is_protocol_error() {
        let r = Frame::parse(r#"{"type":"message","event":"e","id":"x","ts":1}"#);
        assert!(matches!(r, Err(ClientError::Protocol(_))));
    }

    #[test]
    fn other_server_frames() {
        assert_eq!(
            event(r#"{"type":"error","code":400,"message":"unknown type: subscrib"}"#),
            Event::Error {
                code: 400,
                message: "unknown type: subscrib".into()
            }
        );
        assert_eq!(
            event(r#"{"type":"reconnect","reason":"node draining","after_ms":1200}"#),
            Event::Reconnect {
                reason: "node draining".into(),
                after_ms: 1200
            }
        );
        let cr = r#"{"type":"command_reply","command":"CALL","trace_id":"t-1","code":0,"message":"success","data":{"call_id":"c"}}"#;
        assert_eq!(
            event(cr),
            Event::CommandReply(serde_json::from_str(cr).expect("json"))
        );
        assert_eq!(event(r#"{"type":"pong"}"#), Event::Pong);
        assert_eq!(event("pong"), Event::Pong);
        assert_eq!(
            event(r#"{"type":"future_thing","x":1}"#),
            Event::Other(json!({"type": "future_thing", "x": 1}))
        );
        assert_eq!(event("not json"), Event::Other(json!("not json")));
    }

    #[test]
    fn requests() {
        assert_eq!(
            topics_request("subscribe", &["a/b"]),
            json!({"type": "subscribe", "topic": "a/b"})
        );
        assert_eq!(
            topics_request("unsubscribe", &["a", "b"]),
            json!({"type": "unsubscribe", "topics": ["a", "b"]})
        );
        assert_eq!(
            subscribe_since("t", 9),
            json!({"type": "subscribe", "topic": "t", "since": 9})
        );
        assert_eq!(
            publish("room/a", "chat", json!({"m": 1})),
            json!({"type": "publish", "topic": "room/a", "event": "chat", "data": {"m": 1}})
        );
        assert_eq!(
            room("join_room", "r1"),
            json!({"type": "join_room", "room": "r1"})
        );
        assert_eq!(
            ack(&["a".into(), "b".into()]),
            json!({"type": "ack", "ids": ["a", "b"]})
        );
        assert_eq!(auth("tok"), json!({"type": "auth", "token": "tok"}));
        assert_eq!(
            command("CALL", "t-1", json!({})),
            json!({"type": "command", "command": "CALL", "trace_id": "t-1", "data": {}})
        );
        assert_eq!(ping(), json!({"type": "ping"}));
    }
}
