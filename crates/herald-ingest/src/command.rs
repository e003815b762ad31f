//! Upstream commands (seed 003): what is forwarded to a service, what comes back, and where
//! the command map sends each command.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Where a command goes: `amqp:<queue>`, `nats:<subject>` or an `http://` / `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Amqp { queue: String },
    Nats { subject: String },
    Http { url: String },
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if let Some(queue) = s.strip_prefix("amqp:") {
            if queue.is_empty() || queue.starts_with("//") {
                return Err(format!("{s:?}: write amqp:<queue name>"));
            }
            return Ok(Target::Amqp {
                queue: queue.to_owned(),
            });
        }
        if let Some(subject) = s.strip_prefix("nats:") {
            let bad = subject.is_empty()
                || subject.starts_with("//")
                || subject.contains(char::is_whitespace)
                || subject.split('.').any(str::is_empty);
            if bad {
                return Err(format!("{s:?}: write nats:<subject>"));
            }
            return Ok(Target::Nats {
                subject: subject.to_owned(),
            });
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Target::Http { url: s.to_owned() });
        }
        Err(format!(
            "{s:?}: a target is amqp:<queue>, nats:<subject> or an http(s):// URL"
        ))
    }
}

/// The authenticated user, as forwarded: the id and the token's claims.
#[derive(Debug, Clone, Serialize)]
pub struct User<'a> {
    pub id: &'a str,
    #[serde(flatten)]
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
}

/// What a service receives: `{command, trace_id, user:{id, …claims}, conn_id, node_id, data}`.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a> {
    pub command: &'a str,
    pub trace_id: &'a str,
    pub user: User<'a>,
    pub conn_id: &'a str,
    pub node_id: &'a str,
    pub data: &'a RawValue,
}

impl Envelope<'_> {
    pub fn to_bytes(&self) -> Bytes {
        // Strings, a map of JSON values and a raw JSON value: serializing cannot fail.
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }
}

/// A service's answer: `{code?, message?, data?}` (code 0, the default, is success). Code
/// [`crate::http::REPLY_LATER`] (202), from any target, means the service answers later
/// through `POST /api/v1/replies`: the client is sent nothing now.
#[derive(Debug, Deserialize)]
pub struct Reply {
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// Why a command got no reply from its service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No answer within the timeout: the client gets 504.
    #[error("the service did not answer within {0:?}")]
    Timeout(Duration),
    /// The broker or the service cannot be reached now: 503.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The service answered something that is not a reply: 502.
    #[error("bad reply from the service: {0}")]
    BadReply(String),
}

/// Sends a command envelope to one kind of target and waits for the reply.
#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// `envelope` is [`Envelope::to_bytes`]; `target` is of this upstream's kind. A reply
    /// that arrives another way (`POST /api/v1/replies`) is not this call's business.
    async fn call(
        &self,
        target: &Target,
        envelope: Bytes,
        trace_id: &str,
        timeout: Duration,
    ) -> Result<Reply, UpstreamError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("amqp:calls").unwrap(),
            Target::Amqp {
                queue: "calls".into()
            }
        );
        assert_eq!(
            Target::parse("nats:svc.calls").unwrap(),
            Target::Nats {
                subject: "svc.calls".into()
            }
        );
        assert_eq!(
            Target::parse("https://svc/x").unwrap(),
            Target::Http {
                url: "https://svc/x".into()
            }
        );
        for bad in [
            "amqp:",
            "amqp://h/q",
            "nats:a..b",
            "nats:",
            "ftp://x",
            "calls",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn envelope_shape() {
        let mut claims = serde_json::Map::new();
        claims.insert("role".into(), "admin".into());
        let data = RawValue::from_string("{\"x\":1}".into()).unwrap();
        let e = Envelope {
            command: "CALL",
            trace_id: "t-1",
            user: User {
                id: "42",
                claims: &claims,
            },
            conn_id: "c-n1-7",
            node_id: "n1",
            data: &data,
        };
        let v: serde_json::Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"command":"CALL","trace_id":"t-1","user":{"id":"42","role":"admin"},
                               "conn_id":"c-n1-7","node_id":"n1","data":{"x":1}})
        );
    }
}
