//! The envelope a subscriber receives (SPEC §1 "Envelope").
//!
//! A [`Message`] is built once per publish, shared as `Arc<Message>` through the bus, the hub
//! and every connection queue, and encoded at most once per wire protocol: the first
//! connection that writes it fills the cache and every other one reuses the same bytes.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use herald_proto::json::{MessageFrame, encode_message, encode_message_framed};
use herald_proto::ws::Framed;
use serde_json::value::RawValue;

use crate::topic::Topic;

/// One published message.
#[derive(Debug)]
pub struct Message {
    pub topic: Topic,
    /// The publisher's own type name (`notification`, `alarm`, `chat`…).
    pub event: Box<str>,
    /// Stable id: the publisher's, or a generated ULID.
    pub id: Box<str>,
    /// Sequence number on history topics.
    pub seq: Option<u64>,
    /// Publish time, Unix milliseconds.
    pub ts: u64,
    pub data: Box<RawValue>,
    /// The publishing user, for client publishes.
    pub from: Option<Box<str>>,
    pub trace_id: Option<Box<str>>,
    /// Durable user-inbox message: delivered with `ack:true`, never dropped from a queue.
    pub durable: bool,
    /// When this node received it (for the publish-to-write latency histogram).
    pub received_at: Instant,
    encoded: OnceLock<Framed>,
    /// The shared part of its STOMP `MESSAGE` frame, encoded by the first STOMP subscriber.
    stomp: OnceLock<Bytes>,
}

/// Fields of a new message; [`MessageBuilder::build`] fills the rest.
#[derive(Debug)]
pub struct MessageBuilder {
    pub topic: Topic,
    pub event: String,
    pub data: Box<RawValue>,
    pub id: Option<String>,
    pub seq: Option<u64>,
    pub from: Option<String>,
    pub trace_id: Option<String>,
    pub durable: bool,
    pub ts: Option<u64>,
}

impl MessageBuilder {
    pub fn new(topic: Topic, event: impl Into<String>, data: Box<RawValue>) -> Self {
        Self {
            topic,
            event: event.into(),
            data,
            id: None,
            seq: None,
            from: None,
            trace_id: None,
            durable: false,
            ts: None,
        }
    }

    pub fn build(self) -> Message {
        Message {
            topic: self.topic,
            event: self.event.into_boxed_str(),
            id: self.id.unwrap_or_else(new_id).into_boxed_str(),
            seq: self.seq,
            ts: self.ts.unwrap_or_else(now_ms),
            data: self.data,
            from: self.from.map(String::into_boxed_str),
            trace_id: self.trace_id.map(String::into_boxed_str),
            durable: self.durable,
            received_at: Instant::now(),
            encoded: OnceLock::new(),
            stomp: OnceLock::new(),
        }
    }
}

impl Message {
    /// The JSON v1 `message` frame, encoded on first use and shared afterwards.
    pub fn json_frame(&self) -> &Bytes {
        &self.encoded().json
    }

    /// The same frame as a WebSocket text frame (header included), sharing the buffer of
    /// [`Message::json_frame`]: every WebSocket subscriber writes these very bytes.
    pub fn ws_frame(&self) -> &Bytes {
        &self.encoded().frame
    }

    fn encoded(&self) -> &Framed {
        self.encoded
            .get_or_init(|| encode_message_framed(&self.frame(false)))
    }

    /// The JSON v1 frame flagged `retained:true` (sent once per new subscriber; not cached).
    pub fn json_frame_retained(&self) -> Bytes {
        encode_message(&self.frame(true))
    }

    /// What every STOMP subscriber's `MESSAGE` frame shares (see
    /// [`herald_proto::stomp::message_tail`]): headers `message-id`, `content-type`, `event`,
    /// `ts`, and `seq`, `trace-id`, `from`, `durable` when set; the body is `data`. Encoded on
    /// first use and shared afterwards.
    pub fn stomp_tail(&self) -> &Bytes {
        self.stomp.get_or_init(|| self.encode_stomp_tail(false))
    }

    /// The same, flagged `retained:true` (sent once per new subscriber; not cached).
    pub fn stomp_tail_retained(&self) -> Bytes {
        self.encode_stomp_tail(true)
    }

    fn encode_stomp_tail(&self, retained: bool) -> Bytes {
        let ts = self.ts.to_string();
        let seq = self.seq.map(|s| s.to_string());
        let mut h: Vec<(&str, &str)> = Vec::with_capacity(9);
        h.push(("message-id", &self.id));
        h.push(("content-type", "application/json"));
        h.push(("event", &self.event));
        h.push(("ts", &ts));
        if let Some(seq) = &seq {
            h.push(("seq", seq));
        }
        if let Some(t) = &self.trace_id {
            h.push(("trace-id", t));
        }
        if let Some(f) = &self.from {
            h.push(("from", f));
        }
        if self.durable {
            h.push(("durable", "true"));
        }
        if retained {
            h.push(("retained", "true"));
        }
        herald_proto::stomp::message_tail(&h, self.data.get().as_bytes())
    }

    fn frame(&self, retained: bool) -> MessageFrame<'_> {
        MessageFrame {
            topic: self.topic.as_str(),
            event: &self.event,
            id: &self.id,
            seq: self.seq,
            ts: self.ts,
            data: &self.data,
            from: self.from.as_deref(),
            trace_id: self.trace_id.as_deref(),
            ack: self.durable,
            retained,
        }
    }
}

/// Why bytes from another node are not a message frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a message frame: {0}")]
pub struct FrameDecodeError(String);

/// The owned fields of a JSON v1 `message` frame, as another node sent it.
#[derive(serde::Deserialize)]
struct OwnedFrame {
    #[serde(rename = "type")]
    kind: String,
    topic: String,
    event: String,
    id: String,
    #[serde(default)]
    seq: Option<u64>,
    ts: u64,
    data: Box<RawValue>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    ack: bool,
}

impl Message {
    /// A message from its JSON v1 `message` frame, as it travels between nodes: the bus
    /// carries the very bytes subscribers receive, so a node decodes the fields it routes on
    /// and keeps the bytes as the frame's encoding (`ack:true` marks a durable message).
    pub fn from_json_frame(json: &[u8]) -> Result<Message, FrameDecodeError> {
        let f: OwnedFrame =
            serde_json::from_slice(json).map_err(|e| FrameDecodeError(e.to_string()))?;
        if f.kind != "message" {
            return Err(FrameDecodeError(format!("type {:?}", f.kind)));
        }
        let topic = Topic::parse(&f.topic).map_err(|e| FrameDecodeError(e.to_string()))?;
        let encoded = OnceLock::new();
        let _ = encoded.set(herald_proto::ws::frame_json(|v| v.extend_from_slice(json)));
        Ok(Message {
            topic,
            event: f.event.into_boxed_str(),
            id: f.id.into_boxed_str(),
            seq: f.seq,
            ts: f.ts,
            data: f.data,
            from: f.from.map(String::into_boxed_str),
            trace_id: f.trace_id.map(String::into_boxed_str),
            durable: f.ack,
            received_at: Instant::now(),
            encoded,
            stomp: OnceLock::new(),
        })
    }
}

/// A new message id: a ULID (time-ordered, 26 characters).
pub fn new_id() -> String {
    ulid::Ulid::new().to_string()
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now, in Unix seconds.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_once_and_shares() {
        let data = RawValue::from_string("{\"a\":1}".into()).unwrap();
        let m = MessageBuilder::new(Topic::parse("a/b").unwrap(), "e", data).build();
        let a = m.json_frame().clone();
        let b = m.json_frame().clone();
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same encoded bytes are shared");
        let ws = m.ws_frame();
        assert_eq!(
            &ws[ws.len() - a.len()..],
            &a[..],
            "the text frame wraps the same JSON"
        );
        assert_eq!(ws[0], 0x81);
        assert_eq!(m.id.len(), 26);
        let v: serde_json::Value = serde_json::from_slice(&m.json_frame_retained()).unwrap();
        assert_eq!(v["retained"], true);
    }

    #[test]
    fn a_frame_decodes_to_the_same_message_and_keeps_its_bytes() {
        let data = RawValue::from_string("{\"a\":[1,2]}".into()).unwrap();
        let mut b = MessageBuilder::new(Topic::parse("user/u1/x").unwrap(), "e", data);
        b.seq = Some(7);
        b.from = Some("u2".into());
        b.trace_id = Some("t".into());
        b.durable = true;
        let m = b.build();
        let d = Message::from_json_frame(m.json_frame()).unwrap();
        assert_eq!(d.topic, m.topic);
        assert_eq!(
            (&*d.event, &*d.id, d.seq, d.ts),
            (&*m.event, &*m.id, m.seq, m.ts)
        );
        assert_eq!(d.data.get(), m.data.get());
        assert_eq!(d.from.as_deref(), Some("u2"));
        assert_eq!(d.trace_id.as_deref(), Some("t"));
        assert!(d.durable);
        assert_eq!(d.json_frame(), m.json_frame());
        assert_eq!(d.ws_frame(), m.ws_frame());
        // A seq spliced in front (as a clustered history does) is read too.
        let data = RawValue::from_string("1".into()).unwrap();
        let plain = MessageBuilder::new(Topic::parse("a/b").unwrap(), "e", data).build();
        let mut spliced = b"{\"seq\":9,".to_vec();
        spliced.extend_from_slice(&plain.json_frame()[1..]);
        assert_eq!(Message::from_json_frame(&spliced).unwrap().seq, Some(9));
        for bad in [&b"{"[..], b"{\"type\":\"reply\"}", b"[]"] {
            assert!(Message::from_json_frame(bad).is_err());
        }
        let wrong = br#"{"type":"welcome","topic":"a","event":"e","id":"i","ts":1,"data":1}"#;
        assert!(Message::from_json_frame(wrong).is_err());
        let bad_topic =
            br#"{"type":"message","topic":"a//b","event":"e","id":"i","ts":1,"data":1}"#;
        assert!(Message::from_json_frame(bad_topic).is_err());
    }
}
