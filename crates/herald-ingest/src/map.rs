//! Pure mappings from what brokers carry to publish requests (the JSON body of
//! `POST /api/v1/publish`).
//!
//! - A broker message (AMQP, NATS) is a publish request `{topic, event, data, …}` as is, or a
//!   **user message** `{user, event, data, id?, durable?, trace_id?}` — the body of
//!   `POST /api/v1/users/{user}/messages` plus `user` — which becomes a publish to
//!   `user/{user}`, durable unless `durable:false` ([`normalize_body`]).
//! - Seed 002's and seed 001's Redis channels ([`redis_channel`]): the table below.
//!
//! # Redis channels (seed 002, seed 001)
//!
//! | channel | publish request |
//! | --- | --- |
//! | `websocket:broadcast` | topic `broadcast`, ephemeral |
//! | `websocket:user:{id}` | topic `user/{id}`, ephemeral (`durable:false`) |
//! | `websocket:room:{room}` | topic `room/{room}`, ephemeral (`websocket:room:chat:room001` → `room/chat:room001`: `:` is allowed in a segment) |
//! | `websocket:notification:{id}` | topic `user/{id}`, **durable** (stored in the user's inbox, replayed until acked) |
//! | `ws:device:{deviceID}` | topic `device/{deviceID}/telemetry`, ephemeral, event `telemetry` |
//!
//! Seed 002's payload is a JSON object `{type, content, id?, trace_id? or traceId?, …}`:
//! `event` = `type` (`"message"` when absent), `data` = `content` as is (`null` when absent),
//! `id` = `id`, `trace_id` = `trace_id` (or `traceId`, seed 003's spelling). Every other field
//! (`from`, `from_name`, `to`, `room`, `data`, `timestamp`…) is ignored. Seed 001's payload
//! (`{device_id, tenant_id, timestamp, data}`) becomes `data` whole: as is when it is JSON,
//! else as a JSON string.
//!
//! `{id}`, `{room}` and `{deviceID}` must each be one topic segment (1–64 bytes of
//! `A-Za-z0-9_.:@-`). That, a seed 002 payload that is not a JSON object or whose `type`,
//! `id` or `trace_id` is not a string, and a seed 001 payload that is not UTF-8 are errors
//! (the source logs, counts and drops the message). Any other channel is not ours (`None`).
//!
//! **Ids.** Every node of a cluster subscribes to these channels, so every node receives each
//! message. A durable notification without an `id` gets a deterministic one,
//! [`redis_message_id`]: `r-` + the FNV-1a 128-bit hash of the channel and the payload bytes,
//! the same on every node and every build. Each node submits it with that id, and the store's
//! unique id lets exactly one of them store and deliver it (the others get `duplicate`). The
//! flip side: a byte-identical notification published again to the same user (no `id`, no
//! changing `timestamp`) is a duplicate too, for as long as the store keeps the first — give
//! such messages an `id` or a `timestamp`. Ephemeral messages carry no derived id (their ids
//! are the gateway's own, so a client that dedupes by id never drops a legitimate repeat):
//! the Redis source elects one node per message instead (see `crate::redis`), keyed by
//! [`redis_message_hash`].

use herald_core::topic::is_valid_segment;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The publish request a broker message stands for. Errors say what is wrong (the message is
/// then dead-lettered).
pub fn normalize_body(body: &[u8]) -> Result<Vec<u8>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Value::Object(mut m) = v else {
        return Err("the body must be a JSON object (a publish request or a user message)".into());
    };
    match (m.contains_key("topic"), m.remove("user")) {
        (true, None) => Ok(body.to_vec()),
        (true, Some(_)) => Err("give `topic` or `user`, not both".into()),
        (false, Some(Value::String(user))) => {
            let mut out = Map::new();
            out.insert("topic".into(), Value::String(format!("user/{user}")));
            if !m.contains_key("durable") {
                out.insert("durable".into(), Value::Bool(true));
            }
            out.extend(m);
            serde_json::to_vec(&Value::Object(out)).map_err(|e| e.to_string())
        }
        (false, Some(_)) => Err("`user` must be a string".into()),
        (false, None) => {
            Err("the body needs `topic` (a publish request) or `user` (a user message)".into())
        }
    }
}

const BROADCAST: &str = "websocket:broadcast";
const USER: &str = "websocket:user:";
const ROOM: &str = "websocket:room:";
const NOTIFICATION: &str = "websocket:notification:";
const DEVICE: &str = "ws:device:";

/// The publish request a message on one of seed 002's or seed 001's Redis channels stands for
/// (the table in the module doc). `None`: the channel is not one of them, or its seed is off.
pub fn redis_channel(
    channel: &str,
    payload: &[u8],
    seed002: bool,
    seed001: bool,
) -> Option<Result<Vec<u8>, String>> {
    if seed002 {
        let target = if channel == BROADCAST {
            Some(Ok(("broadcast".to_owned(), false)))
        } else {
            [
                (USER, "user id", "user/", false),
                (ROOM, "room", "room/", false),
                (NOTIFICATION, "user id", "user/", true),
            ]
            .into_iter()
            .find_map(|(prefix, what, topic, durable)| {
                let rest = channel.strip_prefix(prefix)?;
                Some(segment(what, rest).map(|s| (format!("{topic}{s}"), durable)))
            })
        };
        if let Some(target) = target {
            return Some(
                target
                    .and_then(|(topic, durable)| seed002_request(channel, topic, durable, payload)),
            );
        }
    }
    if seed001 && let Some(device) = channel.strip_prefix(DEVICE) {
        return Some(segment("device id", device).and_then(|d| device_request(d, payload)));
    }
    None
}

/// Whether [`redis_channel`] maps `channel` to a durable message (`websocket:notification:*`).
pub fn redis_channel_durable(channel: &str) -> bool {
    channel.starts_with(NOTIFICATION)
}

/// FNV-1a, 128 bits, over the channel's length (8 bytes, little endian), the channel and the
/// payload: the same message gives the same hash on every node, build and platform.
pub fn redis_message_hash(channel: &str, payload: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let len = u64::try_from(channel.len())
        .unwrap_or(u64::MAX)
        .to_le_bytes();
    [&len[..], channel.as_bytes(), payload]
        .into_iter()
        .flatten()
        .fold(OFFSET, |h, b| (h ^ u128::from(*b)).wrapping_mul(PRIME))
}

/// The id of a durable notification that came without one: `r-` + 32 hex digits of
/// [`redis_message_hash`].
pub fn redis_message_id(channel: &str, payload: &[u8]) -> String {
    format!("r-{:032x}", redis_message_hash(channel, payload))
}

/// `s` when it is one topic segment.
fn segment<'a>(what: &str, s: &'a str) -> Result<&'a str, String> {
    if is_valid_segment(s) {
        return Ok(s);
    }
    let shown: String = s.chars().take(64).collect();
    let more = if shown.len() < s.len() { "…" } else { "" };
    Err(format!(
        "the {what} in the channel, {shown:?}{more}, is not a topic segment \
         (1 to 64 bytes of A-Za-z0-9_.:@-)"
    ))
}

/// Seed 002's payload: the fields Herald reads (the others are ignored).
#[derive(Deserialize)]
struct Seed002<'a> {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default, rename = "traceId")]
    trace_id_camel: Option<String>,
}

/// A publish request (the fields the mappings fill).
#[derive(Serialize)]
struct Request<'a> {
    topic: &'a str,
    event: &'a str,
    /// `None` is written `null`.
    data: Option<&'a RawValue>,
    durable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

fn seed002_request(
    channel: &str,
    topic: String,
    durable: bool,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let p: Seed002<'_> = serde_json::from_slice(payload).map_err(|e| {
        format!("the payload is not a seed 002 message (a JSON object {{type, content, …}}): {e}")
    })?;
    let id = match p.id {
        Some(id) => Some(id),
        None if durable => Some(redis_message_id(channel, payload)),
        None => None,
    };
    let request = Request {
        topic: &topic,
        event: p.kind.as_deref().unwrap_or("message"),
        data: p.content,
        durable,
        id,
        trace_id: p.trace_id.or(p.trace_id_camel),
    };
    serde_json::to_vec(&request).map_err(|e| e.to_string())
}

fn device_request(device: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    let as_string;
    let data = match serde_json::from_slice::<&RawValue>(payload) {
        Ok(raw) => raw,
        Err(_) => {
            let text = std::str::from_utf8(payload)
                .map_err(|e| format!("the payload is neither JSON nor UTF-8 text: {e}"))?;
            let json = serde_json::to_string(text).map_err(|e| e.to_string())?;
            as_string = RawValue::from_string(json).map_err(|e| e.to_string())?;
            &*as_string
        }
    };
    let request = Request {
        topic: &format!("device/{device}/telemetry"),
        event: "telemetry",
        data: Some(data),
        durable: false,
        id: None,
        trace_id: None,
    };
    serde_json::to_vec(&request).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn norm(v: Value) -> Result<Value, String> {
        normalize_body(&serde_json::to_vec(&v).unwrap())
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn publish_requests_pass_and_user_messages_become_durable_publishes() {
        let p = json!({"topic":"room/a","event":"e","data":1});
        assert_eq!(norm(p.clone()).unwrap(), p);
        assert_eq!(
            norm(json!({"user":"42","event":"n","data":{"a":1},"id":"m-1"})).unwrap(),
            json!({"topic":"user/42","durable":true,"event":"n","data":{"a":1},"id":"m-1"})
        );
        assert_eq!(
            norm(json!({"user":"42","durable":false})).unwrap()["durable"],
            false
        );
        assert!(
            norm(json!({"user":"42","topic":"x"}))
                .unwrap_err()
                .contains("not both")
        );
        assert!(norm(json!({"user":42})).unwrap_err().contains("string"));
        assert!(
            norm(json!({"event":"e"}))
                .unwrap_err()
                .contains("needs `topic`")
        );
        assert!(norm(json!([1])).unwrap_err().contains("JSON object"));
        assert!(normalize_body(b"{").unwrap_err().contains("not JSON"));
    }
}

#[cfg(test)]
mod redis_channel_tests {
    use super::*;
    use serde_json::json;

    fn map(channel: &str, payload: &[u8]) -> Option<Result<Value, String>> {
        redis_channel(channel, payload, true, true)
            .map(|r| r.map(|b| serde_json::from_slice(&b).unwrap()))
    }

    fn ok(channel: &str, payload: Value) -> Value {
        map(channel, &serde_json::to_vec(&payload).unwrap())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn seed_002_channels() {
        let p = json!({"type":"data_update","content":{"entity":"user","action":"create"},
                       "timestamp":1732345678,"from":"admin-api","data":{"x":1}});
        assert_eq!(
            ok("websocket:broadcast", p.clone()),
            json!({"topic":"broadcast","event":"data_update",
                   "data":{"entity":"user","action":"create"},"durable":false})
        );
        assert_eq!(
            ok("websocket:user:123", p.clone()),
            json!({"topic":"user/123","event":"data_update",
                   "data":{"entity":"user","action":"create"},"durable":false})
        );
        assert_eq!(
            ok(
                "websocket:room:chat:room001",
                json!({"type":"room_message","content":{"text":"有新用户加入"},"id":"m-1","traceId":"t-9"})
            ),
            json!({"topic":"room/chat:room001","event":"room_message","data":{"text":"有新用户加入"},
                   "durable":false,"id":"m-1","trace_id":"t-9"})
        );
        let n =
            json!({"type":"notification","content":{"title":"系统通知","body":"您的订单已发货"}});
        let bytes = serde_json::to_vec(&n).unwrap();
        let v = ok("websocket:notification:123", n.clone());
        assert_eq!(
            v,
            json!({"topic":"user/123","event":"notification",
                   "data":{"title":"系统通知","body":"您的订单已发货"},"durable":true,
                   "id": redis_message_id("websocket:notification:123", &bytes)})
        );
        // The derived id is stable and depends on the channel and on every payload byte.
        let id = v["id"].as_str().unwrap();
        assert!(id.starts_with("r-") && id.len() == 34, "{id}");
        assert_eq!(ok("websocket:notification:123", n.clone())["id"], v["id"]);
        assert_ne!(ok("websocket:notification:124", n.clone())["id"], v["id"]);
        let mut other = bytes.clone();
        other.push(b' ');
        assert_ne!(
            redis_message_id("websocket:notification:123", &other),
            redis_message_id("websocket:notification:123", &bytes)
        );
        // A publisher id wins; trace_id wins over traceId.
        assert_eq!(
            ok(
                "websocket:notification:123",
                json!({"type":"n","id":"n-1","trace_id":"a","traceId":"b"})
            ),
            json!({"topic":"user/123","event":"n","data":null,"durable":true,"id":"n-1","trace_id":"a"})
        );
        // Defaults: event "message", data null; a string content is kept.
        assert_eq!(
            ok("websocket:user:u.1@x", json!({})),
            json!({"topic":"user/u.1@x","event":"message","data":null,"durable":false})
        );
        assert_eq!(
            ok(
                "websocket:user:7",
                json!({"type":"join_room","content":"chat:room001"})
            )["data"],
            "chat:room001"
        );
    }

    #[test]
    fn content_is_kept_byte_for_byte() {
        let raw = br#"{"type":"t","content":{"big":123456789012345678901234567890,"f":1.10}}"#;
        let out = redis_channel("websocket:broadcast", raw, true, false)
            .unwrap()
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains(r#""data":{"big":123456789012345678901234567890,"f":1.10}"#),
            "{out}"
        );
    }

    #[test]
    fn seed_001_channel() {
        let p = json!({"device_id":"d-9","tenant_id":"t","timestamp":1234567890,
                       "data":{"temperature":25.5,"humidity":60}});
        assert_eq!(
            ok("ws:device:d-9", p.clone()),
            json!({"topic":"device/d-9/telemetry","event":"telemetry","data":p,"durable":false})
        );
        assert_eq!(map("ws:device:d-9", b" 42\n").unwrap().unwrap()["data"], 42);
        assert_eq!(
            map("ws:device:d-9", b"25.5C not json").unwrap().unwrap()["data"],
            "25.5C not json"
        );
        assert_eq!(map("ws:device:d-9", b"").unwrap().unwrap()["data"], "");
        assert!(
            map("ws:device:d-9", &[0xff, 0xfe])
                .unwrap()
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn errors_and_other_channels() {
        for (channel, payload, needle) in [
            ("websocket:user:", &b"{}"[..], "user id"),
            ("websocket:user:a/b", b"{}", "not a topic segment"),
            ("websocket:room:a b", b"{}", "room"),
            ("websocket:notification:", b"{}", "user id"),
            ("ws:device:", b"{}", "device id"),
            ("ws:device:d/1", b"{}", "device id"),
            ("websocket:broadcast", b"not json", "not a seed 002 message"),
            ("websocket:broadcast", b"[1,2]", "not a seed 002 message"),
            (
                "websocket:broadcast",
                b"{\"type\":5}",
                "not a seed 002 message",
            ),
            ("websocket:user:1", b"{\"id\":5}", "not a seed 002 message"),
            (
                "websocket:user:1",
                b"{\"trace_id\":[]}",
                "not a seed 002 message",
            ),
        ] {
            let e = map(channel, payload).unwrap().unwrap_err();
            assert!(e.contains(needle), "{channel}: {e}");
        }
        let long = format!("websocket:user:{}", "u".repeat(65));
        assert!(map(&long, b"{}").unwrap().unwrap_err().contains('…'));
        // Not ours.
        for channel in [
            "websocket:broadcast:x",
            "websocket:other:1",
            "websocket:users:1",
            "ws:sub:d-9",
            "ws:devices:d-9",
            "herald:t:room/a",
        ] {
            assert!(map(channel, b"{}").is_none(), "{channel}");
        }
        // A seed switched off is not ours either.
        assert!(redis_channel("websocket:broadcast", b"{}", false, true).is_none());
        assert!(redis_channel("ws:device:d", b"{}", true, false).is_none());
        assert!(redis_channel_durable("websocket:notification:1"));
        assert!(!redis_channel_durable("websocket:user:1"));
    }

    #[test]
    fn fnv_1a_128_reference_values() {
        // The reference FNV-1a 128 of "" and "a", through the same fold (no length prefix).
        let fnv = |bytes: &[u8]| {
            bytes
                .iter()
                .fold(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d_u128, |h, b| {
                    (h ^ u128::from(*b)).wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b)
                })
        };
        assert_eq!(fnv(b""), 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d);
        assert_eq!(fnv(b"a"), 0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964);
        // redis_message_hash is that fold over len(channel) as 8 bytes LE, channel, payload.
        let mut input = 1u64.to_le_bytes().to_vec();
        input.extend_from_slice(b"cpayload");
        assert_eq!(redis_message_hash("c", b"payload"), fnv(&input));
        assert_ne!(
            redis_message_hash("ab", b"c"),
            redis_message_hash("a", b"bc")
        );
    }
}
