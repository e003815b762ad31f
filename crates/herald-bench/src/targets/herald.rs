//! Herald: JSON v1 over WebSocket, one user per connection (an HS256 token minted per
//! connection, in the `token` query parameter), explicit `subscribe`; publishes through
//! `POST /api/v1/publish` (one message) or `/api/v1/publish/batch` (several).

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{Incoming, Publisher, Target, Ws, extract_ts};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeraldSpec {
    /// `ws://127.0.0.1:port/ws`
    pub ws_url: String,
    /// `http://127.0.0.1:port`
    pub http_url: String,
    pub secret: String,
    pub api_key: String,
}

pub struct Herald {
    spec: HeraldSpec,
    key: EncodingKey,
}

impl Herald {
    pub fn new(spec: HeraldSpec) -> Self {
        let key = EncodingKey::from_secret(spec.secret.as_bytes());
        Self { spec, key }
    }
}

/// The next text frame, failing on close or after 30 s.
async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("timed out waiting for the server")?
            .context("connection closed")??;
        match msg {
            Message::Text(t) => return Ok(t.as_str().to_owned()),
            Message::Close(c) => bail!("closed by the server: {c:?}"),
            _ => {}
        }
    }
}

impl Target for Herald {
    fn ws_url(&self, conn: usize, _topic: Option<&str>) -> anyhow::Result<String> {
        // The claims of `herald token` (herald_server::auth::dev_claims), minted here so the
        // bench does not build the server crate.
        let now = crate::results::now_unix();
        let claims = json!({
            "sub": format!("bench-{conn}"),
            "iat": now,
            "exp": now + 24 * 3600,
            "jti": format!("bench-{conn}-{}", super::now_ns()),
        });
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)?;
        Ok(format!("{}?token={token}", self.spec.ws_url))
    }

    async fn handshake(
        &self,
        ws: &mut Ws,
        _conn: usize,
        topic: Option<&str>,
    ) -> anyhow::Result<()> {
        let welcome = next_text(ws).await?;
        if !welcome.contains(r#""type":"welcome""#) {
            bail!("expected a welcome, got {welcome}");
        }
        let Some(topic) = topic else { return Ok(()) };
        let sub = json!({"type": "subscribe", "id": 1, "topic": topic}).to_string();
        ws.send(Message::text(sub)).await?;
        loop {
            let frame = next_text(ws).await?;
            if frame.contains(r#""type":"reply""#) {
                if frame.contains(r#""code":0"#) {
                    return Ok(());
                }
                bail!("subscribe refused: {frame}");
            }
        }
    }

    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming)) {
        if let Message::Text(t) = msg
            && t.as_str().contains(r#""type":"message""#)
        {
            on(Incoming::Delivery(extract_ts(t.as_bytes())));
        }
    }
}

/// Keep-alive HTTP publisher.
pub struct HeraldPublisher {
    client: reqwest::Client,
    one: String,
    batch: String,
    auth: String,
}

impl HeraldPublisher {
    pub fn new(spec: &HeraldSpec) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(4)
                .build()?,
            one: format!("{}/api/v1/publish", spec.http_url),
            batch: format!("{}/api/v1/publish/batch", spec.http_url),
            auth: format!("Bearer {}", spec.api_key),
        })
    }

    async fn post(&self, url: &str, body: Value) -> anyhow::Result<Value> {
        let res = self
            .client
            .post(url)
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body)?)
            .send()
            .await?;
        let status = res.status();
        let bytes = res.bytes().await?;
        if !status.is_success() {
            bail!("{url}: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

impl Publisher for HeraldPublisher {
    async fn publish(&mut self, topic: &str, payloads: &[String]) -> anyhow::Result<usize> {
        let msg = |p: &String| json!({"topic": topic, "event": "bench", "data": p});
        match payloads {
            [] => Ok(0),
            [one] => {
                self.post(&self.one, msg(one)).await?;
                Ok(1)
            }
            many => {
                let mut ok = 0;
                for chunk in many.chunks(1000) {
                    let body = json!({"messages": chunk.iter().map(msg).collect::<Vec<_>>()});
                    let answer = self.post(&self.batch, body).await?;
                    ok += answer["results"]
                        .as_array()
                        .map_or(0, |r| r.iter().filter(|e| e.get("id").is_some()).count());
                }
                Ok(ok)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::make_payload;

    #[test]
    fn classifies_messages() {
        let h = Herald::new(HeraldSpec {
            ws_url: "ws://127.0.0.1:1/ws".into(),
            http_url: "http://127.0.0.1:1".into(),
            secret: "s".repeat(40),
            api_key: "k".into(),
        });
        let p = make_payload(42, 100);
        let m = Message::text(format!(
            r#"{{"type":"message","topic":"room/bench","event":"bench","id":"x","ts":1,"data":"{p}"}}"#
        ));
        let mut seen = Vec::new();
        h.classify(&m, &mut |i| seen.push(i));
        assert_eq!(seen, vec![Incoming::Delivery(Some(42))]);
        let r = Message::text(r#"{"type":"reply","id":1,"code":0,"message":"ok"}"#);
        seen.clear();
        h.classify(&r, &mut |i| seen.push(i));
        assert!(seen.is_empty());
        assert!(h.ws_url(7, None).unwrap().contains("?token="));
    }
}
