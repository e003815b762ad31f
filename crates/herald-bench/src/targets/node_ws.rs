//! The hand-written Node `ws` broadcast server (`bench/peers/node-ws/server.js`): subscribers
//! connect to `/?topic=<topic>` (registered when the upgrade completes: the open handshake is
//! the confirmation), deliveries are text frames `{"topic":…,"data":"<payload>"}`; the server
//! pings every 25 s and tungstenite answers. Publishing is `POST /publish` with
//! `{"topic":…,"payloads":[…]}` (every due message in one request), shared with the
//! Socket.IO peer ([`JsonPublisher`]).

use anyhow::bail;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{Incoming, Publisher, Target, Ws, extract_ts};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeWsSpec {
    /// `ws://127.0.0.1:port/`
    pub ws_url: String,
    /// `http://127.0.0.1:port`
    pub http_url: String,
}

pub struct NodeWs {
    spec: NodeWsSpec,
}

impl NodeWs {
    pub fn new(spec: NodeWsSpec) -> Self {
        Self { spec }
    }
}

/// `base` with `?topic=<percent-encoded topic>` when there is a topic.
pub fn subscribe_url(base: &str, topic: Option<&str>) -> String {
    match topic {
        Some(t) => format!("{base}?topic={}", utf8_percent_encode(t, NON_ALPHANUMERIC)),
        None => base.to_owned(),
    }
}

impl Target for NodeWs {
    fn ws_url(&self, _conn: usize, topic: Option<&str>) -> anyhow::Result<String> {
        Ok(subscribe_url(&self.spec.ws_url, topic))
    }

    async fn handshake(
        &self,
        _ws: &mut Ws,
        _conn: usize,
        _topic: Option<&str>,
    ) -> anyhow::Result<()> {
        // The server adds the socket to its topic in the tick that writes the 101 response.
        Ok(())
    }

    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming)) {
        // The server sends nothing but deliveries.
        if let Message::Text(t) = msg {
            on(Incoming::Delivery(extract_ts(t.as_bytes())));
        }
    }
}

/// Keep-alive HTTP publisher for the Node peers: `POST <http_url>/publish` with
/// `{"topic":…,"payloads":[…]}`.
pub struct JsonPublisher {
    client: reqwest::Client,
    url: String,
}

impl JsonPublisher {
    pub fn new(http_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: super::http_client()?,
            url: format!("{}/publish", http_url.trim_end_matches('/')),
        })
    }
}

/// How many payloads the server says it published (`{"published": n}`).
pub fn published_count(answer: &Value) -> usize {
    answer["published"].as_u64().unwrap_or(0) as usize
}

impl Publisher for JsonPublisher {
    async fn publish(&mut self, topic: &str, payloads: &[String]) -> anyhow::Result<usize> {
        if payloads.is_empty() {
            return Ok(0);
        }
        let body = json!({"topic": topic, "payloads": payloads});
        let res = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body)?)
            .send()
            .await?;
        let status = res.status();
        let bytes = res.bytes().await?;
        if !status.is_success() {
            bail!(
                "{}: HTTP {status}: {}",
                self.url,
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(published_count(&serde_json::from_slice(&bytes)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::make_payload;

    #[test]
    fn urls_carry_the_topic() {
        let t = NodeWs::new(NodeWsSpec {
            ws_url: "ws://127.0.0.1:9/".into(),
            http_url: "http://127.0.0.1:9".into(),
        });
        assert_eq!(
            t.ws_url(0, Some("room/bench")).unwrap(),
            "ws://127.0.0.1:9/?topic=room%2Fbench"
        );
        assert_eq!(t.ws_url(0, None).unwrap(), "ws://127.0.0.1:9/");
    }

    #[test]
    fn every_text_frame_is_a_delivery() {
        let t = NodeWs::new(NodeWsSpec {
            ws_url: "ws://127.0.0.1:9/".into(),
            http_url: "http://127.0.0.1:9".into(),
        });
        let p = make_payload(77, 100);
        let mut seen = Vec::new();
        t.classify(
            &Message::text(format!(r#"{{"topic":"room/bench","data":"{p}"}}"#)),
            &mut |i| seen.push(i),
        );
        t.classify(&Message::Ping(Vec::new().into()), &mut |i| seen.push(i));
        assert_eq!(seen, vec![Incoming::Delivery(Some(77))]);
    }

    #[test]
    fn reads_the_published_count() {
        assert_eq!(
            published_count(&json!({"published": 3, "subscribers": 10})),
            3
        );
        assert_eq!(published_count(&json!({})), 0);
    }
}
