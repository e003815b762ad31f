//! Herald: JSON v1 over WebSocket, one user per connection (an HS256 token minted per
//! connection, in the `token` query parameter), explicit `subscribe`; publishes through
//! `POST /api/v1/publish` (one message) or `/api/v1/publish/batch` (several).
//!
//! Also what S5 and S6 need of Herald's HTTP API ([`HeraldApi`]): raw batch bodies built
//! without a JSON tree, user inbox messages, the inbox listing and `/metrics`; and durable
//! messages with their `ack` frames on the subscriber side.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::SinkExt as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{Incoming, Publisher, Target, Ws, extract_ts, next_text};

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

impl Target for Herald {
    fn ws_url(&self, conn: usize, _topic: Option<&str>) -> anyhow::Result<String> {
        let token = mint_token(&self.key, conn)?;
        Ok(format!("{}?token={token}", self.spec.ws_url))
    }

    async fn handshake(
        &self,
        ws: &mut Ws,
        _conn: usize,
        topic: Option<&str>,
    ) -> anyhow::Result<()> {
        let welcome = next_text(ws, "Herald").await?;
        if !welcome.contains(r#""type":"welcome""#) {
            bail!("expected a welcome, got {welcome}");
        }
        let Some(topic) = topic else { return Ok(()) };
        let sub = json!({"type": "subscribe", "id": 1, "topic": topic}).to_string();
        ws.send(Message::text(sub)).await?;
        loop {
            let frame = next_text(ws, "Herald").await?;
            if frame.contains(r#""type":"reply""#) {
                if frame.contains(r#""code":0"#) {
                    return Ok(());
                }
                bail!("subscribe refused: {frame}");
            }
        }
    }

    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming)) {
        let Message::Text(t) = msg else { return };
        let text = t.as_str();
        if text.contains(r#""type":"message""#) {
            let ts = extract_ts(t.as_bytes());
            match text
                .contains(r#""ack":true"#)
                .then(|| durable_id(text))
                .flatten()
            {
                Some(id) => on(Incoming::Durable { ts, id }),
                None => on(Incoming::Delivery(ts)),
            }
        } else if text.contains(r#""type":"reply""#)
            && text.contains(ACK_ID_PREFIX)
            && let Some(reply) = ack_reply(text)
        {
            on(reply);
        }
    }

    fn ack(&self, id: &str, sent_ns: u64) -> Option<Message> {
        Some(Message::text(ack_frame(id, sent_ns)))
    }
}

/// The token of connection `conn` (user `bench-<conn>`): the claims of `herald token`
/// (herald_server::auth::dev_claims), minted here so the bench does not build the server crate.
pub fn mint_token(key: &EncodingKey, conn: usize) -> anyhow::Result<String> {
    let now = crate::results::now_unix();
    let claims = json!({
        "sub": format!("bench-{conn}"),
        "iat": now,
        "exp": now + 24 * 3600,
        "jti": format!("bench-{conn}-{}", super::now_ns()),
    });
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        key,
    )?)
}

/// Request ids of our acks: `ack-<send time, ns since the epoch>` (echoed in the reply).
const ACK_ID_PREFIX: &str = "\"ack-";

/// `{"type":"ack","id":"ack-<sent_ns>","ids":[id]}` (PROTOCOL.md `ack`).
pub fn ack_frame(id: &str, sent_ns: u64) -> String {
    json!({"type": "ack", "id": format!("ack-{sent_ns}"), "ids": [id]}).to_string()
}

/// The message id of a delivered durable message (`"ack":true`), if the frame is one.
pub fn durable_id(frame: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Durable {
        id: String,
        #[serde(default)]
        ack: bool,
    }
    serde_json::from_str::<Durable>(frame)
        .ok()
        .filter(|d| d.ack)
        .map(|d| d.id)
}

/// The reply to one of our acks (`{"type":"reply","id":"ack-…","code":0,…,"acked":1}`).
pub fn ack_reply(frame: &str) -> Option<Incoming> {
    #[derive(Deserialize)]
    struct Reply {
        id: String,
        code: i64,
        #[serde(default)]
        acked: u64,
    }
    let r: Reply = serde_json::from_str(frame).ok()?;
    let sent = r.id.strip_prefix("ack-")?;
    Some(Incoming::AckReply {
        sent_ns: sent.parse().ok(),
        acked: r.acked,
        ok: r.code == 0,
    })
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
            client: super::http_client()?,
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

/// A `/api/v1/publish/batch` body: one entry per topic, all with the same `event` and the
/// same `data` (a JSON string: `data` must be ASCII without `"` or `\\`, as
/// [`crate::targets::make_payload`] makes it). Built as text: S5 sends a million entries and
/// the generator shares the server's two cores.
pub fn batch_body<T: std::fmt::Display>(
    topics: impl IntoIterator<Item = T>,
    event: &str,
    data: &str,
) -> String {
    use std::fmt::Write as _;
    let mut body = String::with_capacity(64 * 1024);
    body.push_str(r#"{"messages":["#);
    for (i, topic) in topics.into_iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r#"{"topic":""#);
        let _ = write!(body, "{topic}");
        body.push_str(r#"","event":""#);
        body.push_str(event);
        body.push_str(r#"","data":""#);
        body.push_str(data);
        body.push_str(r#""}"#);
    }
    body.push_str("]}");
    body
}

/// What a batch answer says: entries accepted (with an `id`), entries refused, the first
/// refusal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Per entry, in order: accepted?
    pub accepted: Vec<bool>,
}

pub fn parse_batch_answer(bytes: &[u8]) -> anyhow::Result<BatchOutcome> {
    #[derive(Deserialize)]
    struct Entry {
        id: Option<serde::de::IgnoredAny>,
        code: Option<i64>,
        message: Option<String>,
    }
    #[derive(Deserialize)]
    struct Answer {
        results: Vec<Entry>,
    }
    let a: Answer = serde_json::from_slice(bytes).context("batch answer is not {results:[…]}")?;
    let mut out = BatchOutcome::default();
    for e in a.results {
        let ok = e.id.is_some();
        out.accepted.push(ok);
        if ok {
            out.ok += 1;
        } else {
            out.failed += 1;
            out.first_error.get_or_insert_with(|| {
                format!(
                    "{}: {}",
                    e.code.unwrap_or(0),
                    e.message.as_deref().unwrap_or("")
                )
            });
        }
    }
    Ok(out)
}

/// The sum of every series of metric `name` in a Prometheus text exposition (all label sets),
/// `None` when there is none.
pub fn prom_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue; // another metric with this prefix
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Herald's HTTP API for S5 and S6: a keep-alive client sized for `concurrency` requests in
/// flight.
#[derive(Clone)]
pub struct HeraldApi {
    client: reqwest::Client,
    base: String,
    auth: String,
}

impl HeraldApi {
    pub fn new(spec: &HeraldSpec, concurrency: usize) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(concurrency.max(1))
                .tcp_nodelay(true)
                .build()?,
            base: spec.http_url.clone(),
            auth: format!("Bearer {}", spec.api_key),
        })
    }

    /// POSTs `body` to `path`; the answer's bytes on HTTP 2xx, else an error with the answer.
    pub async fn post(&self, path: &str, body: String) -> anyhow::Result<Bytes> {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        self.send(path, req).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let req = self.client.get(format!("{}{path}", self.base));
        self.send(path, req).await
    }

    /// Sends `req` with the API key; the answer's bytes on HTTP 2xx, else an error with them.
    async fn send(&self, path: &str, req: reqwest::RequestBuilder) -> anyhow::Result<Bytes> {
        let res = req.header("authorization", &self.auth).send().await?;
        let status = res.status();
        let bytes = res.bytes().await?;
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(bytes)
    }

    /// `POST /api/v1/publish/batch`.
    pub async fn publish_batch(&self, body: String) -> anyhow::Result<BatchOutcome> {
        parse_batch_answer(&self.post("/api/v1/publish/batch", body).await?)
    }

    /// `POST /api/v1/users/{user}/messages` (durable by default); the answer's `status`.
    pub async fn user_message(&self, user: &str, body: String) -> anyhow::Result<String> {
        let path = format!(
            "/api/v1/users/{}/messages",
            percent_encoding::utf8_percent_encode(user, percent_encoding::NON_ALPHANUMERIC)
        );
        let v: Value = serde_json::from_slice(&self.post(&path, body).await?)?;
        Ok(v["status"].as_str().unwrap_or("").to_owned())
    }

    /// The ids of `user`'s inbox messages with this `status` (at most 1000, the API's limit).
    pub async fn inbox_ids(&self, user: &str, status: &str) -> anyhow::Result<Vec<String>> {
        let path = format!(
            "/api/v1/users/{}/messages?status={status}&limit=1000",
            percent_encoding::utf8_percent_encode(user, percent_encoding::NON_ALPHANUMERIC)
        );
        let v: Value = serde_json::from_slice(&self.get(&path).await?)?;
        let messages = v["messages"]
            .as_array()
            .with_context(|| format!("{path}: no messages array"))?;
        Ok(messages
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let bytes = self.get("/metrics").await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
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

    #[test]
    fn durable_messages_and_ack_replies() {
        let h = Herald::new(HeraldSpec {
            ws_url: "ws://127.0.0.1:1/ws".into(),
            http_url: "http://127.0.0.1:1".into(),
            secret: "s".repeat(40),
            api_key: "k".into(),
        });
        let p = make_payload(42, 100);
        let m = Message::text(format!(
            r#"{{"type":"message","topic":"user/bench-1","event":"bench","id":"s6-9","ts":1,"data":"{p}","ack":true}}"#
        ));
        let mut seen = Vec::new();
        h.classify(&m, &mut |i| seen.push(i));
        assert_eq!(
            seen,
            vec![Incoming::Durable {
                ts: Some(42),
                id: "s6-9".into()
            }]
        );
        // The ack frame round-trips through the reply.
        let Some(Message::Text(ack)) = h.ack("s6-9", 1_795_398_000_000_000_000) else {
            panic!("no ack frame");
        };
        let v: Value = serde_json::from_str(ack.as_str()).unwrap();
        assert_eq!(v["type"], "ack");
        assert_eq!(v["ids"], json!(["s6-9"]));
        let reply = format!(
            r#"{{"type":"reply","id":{},"code":0,"message":"ok","acked":1}}"#,
            v["id"]
        );
        seen.clear();
        h.classify(&Message::text(reply), &mut |i| seen.push(i));
        assert_eq!(
            seen,
            vec![Incoming::AckReply {
                sent_ns: Some(1_795_398_000_000_000_000),
                acked: 1,
                ok: true
            }]
        );
        // A refused ack, and other replies.
        assert_eq!(
            ack_reply(r#"{"type":"reply","id":"ack-5","code":503,"message":"store unavailable"}"#),
            Some(Incoming::AckReply {
                sent_ns: Some(5),
                acked: 0,
                ok: false
            })
        );
        seen.clear();
        h.classify(
            &Message::text(r#"{"type":"reply","id":1,"code":0,"message":"ok"}"#),
            &mut |i| seen.push(i),
        );
        assert!(seen.is_empty());
        assert_eq!(
            durable_id(r#"{"type":"message","id":"x","ack":false}"#),
            None
        );
    }

    #[test]
    fn batch_bodies_and_answers() {
        let p = make_payload(7, 40);
        let topics = [
            "device/0/telemetry".to_owned(),
            "device/1/telemetry".to_owned(),
        ];
        let body = batch_body(topics.iter().map(String::as_str), "telemetry", &p);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 2);
        assert_eq!(v["messages"][1]["topic"], "device/1/telemetry");
        assert_eq!(v["messages"][0]["data"], p.as_str());
        assert_eq!(v["messages"][0]["event"], "telemetry");
        let empty: Value = serde_json::from_str(&batch_body::<&str>([], "e", "d")).unwrap();
        assert_eq!(empty, json!({"messages": []}));

        let answer = br#"{"results":[{"id":"a"},{"code":400,"message":"invalid topic"},{"id":"b","status":"duplicate"}]}"#;
        let o = parse_batch_answer(answer).unwrap();
        assert_eq!((o.ok, o.failed), (2, 1));
        assert_eq!(o.accepted, vec![true, false, true]);
        assert_eq!(o.first_error.as_deref(), Some("400: invalid topic"));
        assert!(parse_batch_answer(b"{}").is_err());
    }

    #[test]
    fn prometheus_sums() {
        let text = "# HELP herald_topics x\n# TYPE herald_topics gauge\nherald_topics 12\n\
                    herald_topics_total 99\n\
                    herald_messages_dropped_total{reason=\"queue_full\"} 3\n\
                    herald_messages_dropped_total{reason=\"slow_consumer\"} 4\n";
        assert_eq!(prom_sum(text, "herald_topics"), Some(12.0));
        assert_eq!(prom_sum(text, "herald_messages_dropped_total"), Some(7.0));
        assert_eq!(prom_sum(text, "herald_subscriptions"), None);
    }
}
