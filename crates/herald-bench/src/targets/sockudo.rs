//! Sockudo (Rust, Pusher protocol 7; PEERS.md). Subscribers connect to
//! `/app/<key>?protocol=7&client=herald-bench&version=0.1`, wait for
//! `pusher:connection_established`, send `{"event":"pusher:subscribe","data":{"channel":…}}` and
//! wait for `pusher_internal:subscription_succeeded`; `pusher:ping` is answered with
//! `pusher:pong`. Deliveries are events `{"event":"bench","channel":…,"data":"<payload>"}`.
//!
//! Publishing is the Pusher HTTP API, signed: `POST /apps/<id>/events` for one due message,
//! `/apps/<id>/batch_events` (at most 10 events per request, Pusher's limit) for several; the
//! query carries `auth_key`, `auth_timestamp`, `auth_version=1.0`, `body_md5` and
//! `auth_signature` = HMAC-SHA256(secret, "POST\n<path>\n<sorted query>") in hex.
//!
//! Pusher channel names allow only `[A-Za-z0-9_\-=@,.;]`: topics are mapped with [`channel`]
//! (`room/bench` → `room-bench`) on both sides.

use anyhow::bail;
use futures_util::SinkExt as _;
use hmac::{Hmac, Mac as _};
use md5::{Digest as _, Md5};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;

use super::{Incoming, Publisher, Target, Ws, extract_ts, next_text};

/// The event name the publisher uses for bench messages.
const EVENT: &str = "bench";
/// Pusher's limit of events per `batch_events` request.
const BATCH_MAX: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SockudoSpec {
    /// `ws://127.0.0.1:port/app/<key>?protocol=7&…`
    pub ws_url: String,
    /// `http://127.0.0.1:port`
    pub http_url: String,
    pub app_id: String,
    pub key: String,
    pub secret: String,
}

pub struct Sockudo {
    spec: SockudoSpec,
}

impl Sockudo {
    pub fn new(spec: SockudoSpec) -> Self {
        Self { spec }
    }
}

/// The Pusher channel for a bench topic: characters Pusher does not allow become `-`.
pub fn channel(topic: &str) -> String {
    topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-=@,.;".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The `event` name of a Pusher frame, found without parsing the whole JSON (the payload sits
/// in `data`, which never holds an `"event"` key in the bench).
pub fn event_name(frame: &str) -> Option<&str> {
    let at = frame.find("\"event\"")? + "\"event\"".len();
    let rest = frame[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    rest.split('"').next()
}

const PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;

/// Reads frames until one has the event `want`, answering pings and failing on `pusher:error`.
async fn until(ws: &mut Ws, want: &str) -> anyhow::Result<String> {
    loop {
        let frame = next_text(ws, "Sockudo").await?;
        match event_name(&frame) {
            Some(e) if e == want => return Ok(frame),
            Some("pusher:ping") => ws.send(Message::text(PONG)).await?,
            Some("pusher:error") => bail!("Sockudo: {frame}"),
            _ => {}
        }
    }
}

impl Target for Sockudo {
    fn ws_url(&self, _conn: usize, _topic: Option<&str>) -> anyhow::Result<String> {
        Ok(self.spec.ws_url.clone())
    }

    async fn handshake(
        &self,
        ws: &mut Ws,
        _conn: usize,
        topic: Option<&str>,
    ) -> anyhow::Result<()> {
        until(ws, "pusher:connection_established").await?;
        let Some(topic) = topic else { return Ok(()) };
        let sub = json!({"event": "pusher:subscribe", "data": {"channel": channel(topic)}});
        ws.send(Message::text(sub.to_string())).await?;
        until(ws, "pusher_internal:subscription_succeeded").await?;
        Ok(())
    }

    fn classify(&self, msg: &Message, on: &mut dyn FnMut(Incoming)) {
        let Message::Text(t) = msg else { return };
        match event_name(t.as_str()) {
            Some("pusher:ping") => on(Incoming::Reply(Message::text(PONG))),
            Some(e) if e.starts_with("pusher:") || e.starts_with("pusher_internal:") => {}
            Some(_) => on(Incoming::Delivery(extract_ts(t.as_bytes()))),
            None => {}
        }
    }
}

/// Lower-case hex MD5 of `body` (`body_md5`).
pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

/// HMAC-SHA256 hex of `"<method>\n<path>\n<query>"` with `secret`; `query` must already be the
/// parameters sorted by name, `k=v` joined with `&`, without `auth_signature`.
pub fn signature(secret: &str, method: &str, path: &str, query: &str) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256>>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(format!("{method}\n{path}\n{query}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The full signed query string of `POST <path>` with `body` at `timestamp` (Unix seconds).
pub fn signed_query(key: &str, secret: &str, path: &str, body: &[u8], timestamp: u64) -> String {
    // Already in name order: auth_key < auth_timestamp < auth_version < body_md5.
    let query = format!(
        "auth_key={key}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={}",
        body_md5(body)
    );
    let sig = signature(secret, "POST", path, &query);
    format!("{query}&auth_signature={sig}")
}

/// Signed keep-alive publisher over the Pusher HTTP API.
pub struct SockudoPublisher {
    client: reqwest::Client,
    http_url: String,
    key: String,
    secret: String,
    events_path: String,
    batch_path: String,
}

impl SockudoPublisher {
    pub fn new(spec: &SockudoSpec) -> anyhow::Result<Self> {
        Ok(Self {
            client: super::http_client()?,
            http_url: spec.http_url.trim_end_matches('/').to_owned(),
            key: spec.key.clone(),
            secret: spec.secret.clone(),
            events_path: format!("/apps/{}/events", spec.app_id),
            batch_path: format!("/apps/{}/batch_events", spec.app_id),
        })
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<()> {
        let body = serde_json::to_vec(body)?;
        let query = signed_query(
            &self.key,
            &self.secret,
            path,
            &body,
            crate::results::now_unix(),
        );
        let url = format!("{}{path}?{query}", self.http_url);
        let res = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            bail!("{path}: HTTP {status}: {text}");
        }
        res.bytes().await?;
        Ok(())
    }
}

impl Publisher for SockudoPublisher {
    async fn publish(&mut self, topic: &str, payloads: &[String]) -> anyhow::Result<usize> {
        let channel = channel(topic);
        match payloads {
            [] => Ok(0),
            [one] => {
                let body = json!({"name": EVENT, "channel": channel, "data": one});
                self.post(&self.events_path, &body).await?;
                Ok(1)
            }
            many => {
                let mut ok = 0;
                for chunk in many.chunks(BATCH_MAX) {
                    let batch: Vec<Value> = chunk
                        .iter()
                        .map(|p| json!({"name": EVENT, "channel": channel, "data": p}))
                        .collect();
                    self.post(&self.batch_path, &json!({ "batch": batch }))
                        .await?;
                    ok += chunk.len();
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

    /// The worked example of Pusher's HTTP API reference ("Worked authentication example").
    #[test]
    fn signs_like_the_pusher_documentation() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let query = signed_query(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "/apps/3/events",
            body,
            1_353_088_179,
        );
        assert_eq!(
            query,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn maps_topics_to_pusher_channels() {
        assert_eq!(channel("room/bench"), "room-bench");
        assert_eq!(channel("room/idle-17"), "room-idle-17");
        assert_eq!(channel("a_b=c@d,e.f;g"), "a_b=c@d,e.f;g");
        assert_eq!(channel("é x"), "--x");
    }

    #[test]
    fn finds_event_names() {
        assert_eq!(
            event_name(
                r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#
            ),
            Some("pusher:connection_established")
        );
        assert_eq!(
            event_name(r#"{"channel":"room-bench", "event" : "bench","data":"x"}"#),
            Some("bench")
        );
        assert_eq!(event_name(r#"{"data":"x"}"#), None);
        assert_eq!(event_name(r#"{"event":"#), None);
    }

    #[test]
    fn classifies_deliveries_pings_and_control_events() {
        let t = Sockudo::new(SockudoSpec {
            ws_url: "ws://127.0.0.1:9/app/k?protocol=7".into(),
            http_url: "http://127.0.0.1:9".into(),
            app_id: "a".into(),
            key: "k".into(),
            secret: "s".into(),
        });
        let p = make_payload(55, 100);
        let mut seen = Vec::new();
        for f in [
            format!(r#"{{"event":"bench","channel":"room-bench","data":"{p}"}}"#),
            r#"{"event":"pusher:ping","data":{}}"#.to_owned(),
            r#"{"event":"pusher_internal:subscription_succeeded","channel":"room-bench"}"#
                .to_owned(),
            r#"{"event":"pusher:pong","data":{}}"#.to_owned(),
        ] {
            t.classify(&Message::text(f), &mut |i| seen.push(i));
        }
        assert_eq!(
            seen,
            vec![
                Incoming::Delivery(Some(55)),
                Incoming::Reply(Message::text(PONG)),
            ]
        );
    }
}
