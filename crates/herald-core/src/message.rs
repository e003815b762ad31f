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
}
