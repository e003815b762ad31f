//! JSON v1 (`herald.json.v1`): one JSON object per WebSocket text frame, snake_case keys.
//!
//! Client frames are parsed in two steps: the object and its `type` first, then the fields of
//! that type, so errors are precise (`unknown type: subscrib`, `invalid subscribe: missing
//! field \`topic\``). Server frames are encoded straight into [`Bytes`]; a delivered message is
//! encoded once and the same bytes are written to every subscriber.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The subprotocol name of JSON v1.
pub const SUBPROTOCOL: &str = "herald.json.v1";

/// A parsed client request: the optional request `id` (echoed in the reply, any JSON value)
/// and the frame itself.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: Option<Value>,
    pub frame: ClientFrame,
}

/// Every client → server frame of JSON v1.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    Subscribe(Subscribe),
    Unsubscribe {
        topics: Vec<String>,
    },
    Publish {
        topic: String,
        event: String,
        data: Box<RawValue>,
    },
    JoinRoom {
        room: String,
    },
    LeaveRoom {
        room: String,
    },
    Ack {
        ids: Vec<String>,
    },
    Auth {
        token: String,
    },
    Command {
        command: String,
        trace_id: Option<String>,
        data: Box<RawValue>,
    },
    Ping,
}

impl ClientFrame {
    /// The `type` name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Subscribe(_) => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::JoinRoom { .. } => "join_room",
            ClientFrame::LeaveRoom { .. } => "leave_room",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Command { .. } => "command",
            ClientFrame::Ping => "ping",
        }
    }
}

/// A `subscribe` request: one or more topics, with resume and filtering options.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub topics: Vec<String>,
    pub since: Option<u64>,
    pub keys: Option<Vec<String>>,
    pub snapshot: bool,
}

/// Why a client frame could not be parsed. Always answered with code 400; the request `id`
/// is kept when it could be read so the error can be a `reply`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub id: Option<Value>,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeFields {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    keys: Option<Vec<String>>,
    #[serde(default)]
    snapshot: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFields {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishFields {
    topic: String,
    event: String,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomFields {
    room: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckFields {
    ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFields {
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandFields {
    command: String,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn null_raw() -> Box<RawValue> {
    // "null" is valid JSON, so this cannot fail; keep a fallback anyway rather than panic.
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| Box::<RawValue>::default())
}

/// Parse one client text frame.
pub fn parse_request(text: &str) -> Result<Request, ParseError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ParseError {
        id: None,
        message: format!("malformed JSON: {e}"),
    })?;
    let Value::Object(mut map) = value else {
        return Err(ParseError {
            id: None,
            message: "a frame must be a JSON object".into(),
        });
    };
    let id = map.remove("id");
    let err = |message: String| ParseError {
        id: id.clone(),
        message,
    };
    let kind = match map.remove("type") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(err("`type` must be a string".into())),
        None => return Err(err("missing field `type`".into())),
    };
    let frame = match kind.as_str() {
        "subscribe" => {
            let f: SubscribeFields = fields(&kind, map, &id)?;
            ClientFrame::Subscribe(Subscribe {
                topics: one_or_many(&kind, f.topic, f.topics, &id)?,
                since: f.since,
                keys: f.keys,
                snapshot: f.snapshot.unwrap_or(true),
            })
        }
        "unsubscribe" => {
            let f: TopicsFields = fields(&kind, map, &id)?;
            ClientFrame::Unsubscribe {
                topics: one_or_many(&kind, f.topic, f.topics, &id)?,
            }
        }
        "publish" => {
            let f: PublishFields = fields(&kind, map, &id)?;
            ClientFrame::Publish {
                topic: f.topic,
                event: f.event,
                data: f.data.unwrap_or_else(null_raw),
            }
        }
        "join_room" => ClientFrame::JoinRoom {
            room: fields::<RoomFields>(&kind, map, &id)?.room,
        },
        "leave_room" => ClientFrame::LeaveRoom {
            room: fields::<RoomFields>(&kind, map, &id)?.room,
        },
        "ack" => ClientFrame::Ack {
            ids: fields::<AckFields>(&kind, map, &id)?.ids,
        },
        "auth" => ClientFrame::Auth {
            token: fields::<AuthFields>(&kind, map, &id)?.token,
        },
        "command" => {
            let f: CommandFields = fields(&kind, map, &id)?;
            ClientFrame::Command {
                command: f.command,
                trace_id: f.trace_id,
                data: f.data.unwrap_or_else(null_raw),
            }
        }
        "ping" => {
            fields::<Empty>(&kind, map, &id)?;
            ClientFrame::Ping
        }
        other => return Err(err(format!("unknown type: {}", truncate(other, 64)))),
    };
    Ok(Request { id, frame })
}

fn fields<T: serde::de::DeserializeOwned>(
    kind: &str,
    map: Map<String, Value>,
    id: &Option<Value>,
) -> Result<T, ParseError> {
    serde_json::from_value(Value::Object(map)).map_err(|e| ParseError {
        id: id.clone(),
        message: format!("invalid {kind}: {e}"),
    })
}

fn one_or_many(
    kind: &str,
    one: Option<String>,
    many: Option<Vec<String>>,
    id: &Option<Value>,
) -> Result<Vec<String>, ParseError> {
    let err = |m: &str| ParseError {
        id: id.clone(),
        message: format!("invalid {kind}: {m}"),
    };
    match (one, many) {
        (Some(t), None) => Ok(vec![t]),
        (None, Some(ts)) if !ts.is_empty() => Ok(ts),
        (None, Some(_)) => Err(err("`topics` is empty")),
        (Some(_), Some(_)) => Err(err("give `topic` or `topics`, not both")),
        (None, None) => Err(err("missing field `topic` (or `topics`)")),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Server → client frames.

/// The fields of a delivered message, borrowed from wherever the message lives.
#[derive(Serialize, Debug)]
pub struct MessageFrame<'a> {
    pub topic: &'a str,
    pub event: &'a str,
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub ts: u64,
    pub data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "is_false")]
    pub ack: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub retained: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    body: T,
}

fn encode<T: Serialize>(kind: &str, body: T) -> Bytes {
    // Serializing these plain structs into a Vec cannot fail (no maps with non-string keys,
    // no failing Serialize impls); an empty frame is the harmless fallback.
    serde_json::to_vec(&Tagged { kind, body })
        .map(Bytes::from)
        .unwrap_or_default()
}

/// `{"type":"message",…}` — encode once, share the bytes with every subscriber.
pub fn encode_message(m: &MessageFrame<'_>) -> Bytes {
    encode("message", m)
}

/// The `message` frame as JSON and as the WebSocket text frame carrying it, one buffer.
pub fn encode_message_framed(m: &MessageFrame<'_>) -> crate::ws::Framed {
    crate::ws::frame_json(|v| {
        let start = v.len();
        // Cannot fail (see `encode`); an empty frame is the harmless fallback.
        if serde_json::to_writer(
            &mut *v,
            &Tagged {
                kind: "message",
                body: m,
            },
        )
        .is_err()
        {
            v.truncate(start);
        }
    })
}

/// `{"type":"welcome",…}`.
pub fn encode_welcome(conn_id: &str, user_id: &str, node_id: &str, heartbeat_ms: u64) -> Bytes {
    #[derive(Serialize)]
    struct W<'a> {
        conn_id: &'a str,
        user_id: &'a str,
        node_id: &'a str,
        heartbeat_ms: u64,
        protocol: &'a str,
    }
    encode(
        "welcome",
        W {
            conn_id,
            user_id,
            node_id,
            heartbeat_ms,
            protocol: SUBPROTOCOL,
        },
    )
}

/// `{"type":"reply","id":…,"code":…,"message":…, …extra}`; `extra` must be a JSON object's
/// fields (e.g. `topic`, `seq`, `recovered`, `results`).
pub fn encode_reply(
    id: &Value,
    code: u16,
    message: &str,
    extra: Option<&Map<String, Value>>,
) -> Bytes {
    #[derive(Serialize)]
    struct R<'a> {
        id: &'a Value,
        code: u16,
        message: &'a str,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        extra: Option<&'a Map<String, Value>>,
    }
    encode(
        "reply",
        R {
            id,
            code,
            message,
            extra,
        },
    )
}

/// `{"type":"command_reply","command":…,"trace_id":…,"code":…,"message":…,"data":…}`: a
/// service's answer to an upstream command (SPEC §2, §7).
pub fn encode_command_reply(
    command: &str,
    trace_id: &str,
    code: u16,
    message: &str,
    data: Option<&RawValue>,
) -> Bytes {
    #[derive(Serialize)]
    struct R<'a> {
        command: &'a str,
        trace_id: &'a str,
        code: u16,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawValue>,
    }
    encode(
        "command_reply",
        R {
            command,
            trace_id,
            code,
            message,
            data,
        },
    )
}

/// `{"type":"error","code":…,"message":…}` — for failed requests that carried no `id`.
pub fn encode_error(code: u16, message: &str) -> Bytes {
    #[derive(Serialize)]
    struct E<'a> {
        code: u16,
        message: &'a str,
    }
    encode("error", E { code, message })
}

/// `{"type":"reconnect","reason":…,"after_ms":…}`.
pub fn encode_reconnect(reason: &str, after_ms: u64) -> Bytes {
    #[derive(Serialize)]
    struct R<'a> {
        reason: &'a str,
        after_ms: u64,
    }
    encode("reconnect", R { reason, after_ms })
}

/// `{"type":"pong"}`.
pub const PONG: &str = r#"{"type":"pong"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, ParseError> {
        parse_request(s)
    }

    #[test]
    fn subscribe_single_and_batch() {
        let r = parse(r#"{"type":"subscribe","id":1,"topic":"a/b"}"#).unwrap();
        assert_eq!(r.id, Some(Value::from(1)));
        let ClientFrame::Subscribe(s) = r.frame else {
            panic!()
        };
        assert_eq!(s.topics, vec!["a/b"]);
        assert!(s.snapshot);
        let r = parse(r#"{"type":"subscribe","id":"x","topics":["a","b"],"since":4,"keys":["t"],"snapshot":false}"#)
            .unwrap();
        let ClientFrame::Subscribe(s) = r.frame else {
            panic!()
        };
        assert_eq!(s.topics, vec!["a", "b"]);
        assert_eq!(s.since, Some(4));
        assert_eq!(s.keys, Some(vec!["t".to_string()]));
        assert!(!s.snapshot);
    }

    #[test]
    fn errors_are_precise_and_keep_the_id() {
        let e = parse("{nope").unwrap_err();
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        assert_eq!(e.id, None);
        let e = parse(r#"{"type":"subscrib","id":7}"#).unwrap_err();
        assert_eq!(e.message, "unknown type: subscrib");
        assert_eq!(e.id, Some(Value::from(7)));
        let e = parse(r#"{"type":"subscribe","id":7}"#).unwrap_err();
        assert!(e.message.contains("missing field `topic`"), "{}", e.message);
        let e = parse(r#"{"type":"publish","topic":"a"}"#).unwrap_err();
        assert!(
            e.message.contains("invalid publish") && e.message.contains("event"),
            "{}",
            e.message
        );
        let e = parse(r#"{"type":"ping","bogus":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
        assert!(parse("[]").is_err());
        assert!(
            parse(r#"{"id":1}"#)
                .unwrap_err()
                .message
                .contains("missing field `type`")
        );
        assert!(parse(r#"{"type":5}"#).is_err());
        assert!(parse(r#"{"type":"subscribe","topics":[]}"#).is_err());
        assert!(parse(r#"{"type":"subscribe","topic":"a","topics":["b"]}"#).is_err());
        assert!(parse(r#"{"type":"subscribe","topic":"a","since":-1}"#).is_err());
    }

    #[test]
    fn other_frames() {
        assert!(matches!(
            parse(r#"{"type":"ping"}"#).unwrap().frame,
            ClientFrame::Ping
        ));
        let p = parse(r#"{"type":"publish","topic":"room/a","event":"chat","data":{"x":[1,2]}}"#)
            .unwrap();
        let ClientFrame::Publish { data, .. } = p.frame else {
            panic!()
        };
        assert_eq!(data.get(), r#"{"x":[1,2]}"#);
        let ClientFrame::Ack { ids } = parse(r#"{"type":"ack","ids":["a","b"]}"#).unwrap().frame
        else {
            panic!()
        };
        assert_eq!(ids.len(), 2);
        assert!(matches!(
            parse(r#"{"type":"join_room","room":"r"}"#).unwrap().frame,
            ClientFrame::JoinRoom { .. }
        ));
        assert!(matches!(
            parse(r#"{"type":"auth","token":"t"}"#).unwrap().frame,
            ClientFrame::Auth { .. }
        ));
        let c = parse(r#"{"type":"command","command":"CALL","trace_id":"t-1"}"#).unwrap();
        let ClientFrame::Command { data, .. } = c.frame else {
            panic!()
        };
        assert_eq!(data.get(), "null");
    }

    #[test]
    fn encodes_server_frames() {
        let data = RawValue::from_string(r#"{"title":"hi"}"#.into()).unwrap();
        let m = encode_message(&MessageFrame {
            topic: "user/42",
            event: "notification",
            id: "01J",
            seq: Some(17),
            ts: 5,
            data: &data,
            from: None,
            trace_id: Some("t-1"),
            ack: true,
            retained: false,
        });
        let v: Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["seq"], 17);
        assert_eq!(v["data"]["title"], "hi");
        assert_eq!(v["ack"], true);
        assert!(v.get("retained").is_none() && v.get("from").is_none());

        let w: Value = serde_json::from_slice(&encode_welcome("c-1", "42", "n1", 25000)).unwrap();
        assert_eq!(w["protocol"], SUBPROTOCOL);
        let mut extra = Map::new();
        extra.insert("recovered".into(), Value::Bool(false));
        let r: Value =
            serde_json::from_slice(&encode_reply(&Value::from("1"), 0, "ok", Some(&extra)))
                .unwrap();
        assert_eq!(r["id"], "1");
        assert_eq!(r["recovered"], false);
        let e: Value = serde_json::from_slice(&encode_error(400, "bad")).unwrap();
        assert_eq!(e["type"], "error");
        let rc: Value = serde_json::from_slice(&encode_reconnect("node draining", 12)).unwrap();
        assert_eq!(rc["after_ms"], 12);
    }
}
