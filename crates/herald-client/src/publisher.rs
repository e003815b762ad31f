//! The publisher: a thin client of the server HTTP API (SPEC §4) for backend services
//! (seed 002's "notification client").

use std::fmt;
use std::time::Duration;

use reqwest::RequestBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::encode::percent_encode;
use crate::error::PublishError;

/// How long one API call may take by default.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of `POST /api/v1/publish` (and one entry of a batch).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PublishRequest {
    pub topic: String,
    pub event: String,
    pub data: Value,
    /// Idempotency key; the server generates one when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable: Option<bool>,
    /// A duration such as `"7d"` or `"30s"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl PublishRequest {
    /// A request with every optional field unset.
    pub fn new(topic: impl Into<String>, event: impl Into<String>, data: Value) -> Self {
        PublishRequest {
            topic: topic.into(),
            event: event.into(),
            data,
            id: None,
            durable: None,
            ttl: None,
            partition: None,
            trace_id: None,
        }
    }
}

/// `{id, seq?}`: the message id, and its seq on a history topic.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PublishResponse {
    pub id: String,
    #[serde(default)]
    pub seq: Option<u64>,
}

/// A user notification: sent as a durable `notification` event with this as its data.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub title: String,
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icon: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl Notification {
    pub fn new(title: impl Into<String>, body: impl Into<String>) -> Self {
        Notification {
            title: title.into(),
            body: body.into(),
            icon: None,
            link: None,
        }
    }
}

/// Publishes through the HTTP API with an API key (`Authorization: Bearer`). Cheap to clone:
/// clones share one connection pool.
#[derive(Clone)]
pub struct Publisher {
    http: reqwest::Client,
    /// Without a trailing `/`.
    base: String,
    api_key: String,
    timeout: Duration,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("base", &self.base)
            .field("api_key", &"***")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// `base_url` like `http://127.0.0.1:8080` (plain HTTP; this crate has no TLS).
    pub fn new(base_url: &str, api_key: &str) -> Publisher {
        Publisher::with_client(base_url, api_key, reqwest::Client::new())
    }

    /// The same, over a `reqwest::Client` configured by the caller.
    pub fn with_client(base_url: &str, api_key: &str, http: reqwest::Client) -> Publisher {
        Publisher {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            timeout: DEFAULT_PUBLISH_TIMEOUT,
        }
    }

    /// Bounds each call (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Publisher {
        self.timeout = timeout;
        self
    }

    /// `POST /api/v1/publish`.
    pub async fn publish(&self, req: &PublishRequest) -> Result<PublishResponse, PublishError> {
        self.post("/api/v1/publish", req).await
    }

    /// `POST /api/v1/publish/batch`: one result per request, in order (an `{id, seq?}` or an
    /// `{code, message}` each).
    pub async fn publish_batch(&self, reqs: &[PublishRequest]) -> Result<Vec<Value>, PublishError> {
        #[derive(Serialize)]
        struct Batch<'a> {
            messages: &'a [PublishRequest],
        }
        #[derive(Deserialize)]
        struct Results {
            results: Vec<Value>,
        }
        let r: Results = self
            .post("/api/v1/publish/batch", &Batch { messages: reqs })
            .await?;
        Ok(r.results)
    }

    /// `POST /api/v1/broadcast`: to every connection.
    pub async fn broadcast(
        &self,
        event: &str,
        data: Value,
    ) -> Result<PublishResponse, PublishError> {
        self.post("/api/v1/broadcast", &json!({"event": event, "data": data}))
            .await
    }

    /// `POST /api/v1/users/{user}/messages` → `{id, status}`.
    pub async fn send_to_user(
        &self,
        user: &str,
        event: &str,
        data: Value,
        durable: bool,
    ) -> Result<Value, PublishError> {
        let path = format!("/api/v1/users/{}/messages", percent_encode(user));
        self.post(
            &path,
            &json!({"event": event, "data": data, "durable": durable}),
        )
        .await
    }

    /// A durable `notification` event to `user`, with `{title, body, icon?, link?}` as data.
    pub async fn send_notification(
        &self,
        user: &str,
        n: &Notification,
    ) -> Result<Value, PublishError> {
        let data = serde_json::to_value(n).map_err(|e| PublishError::Decode(e.to_string()))?;
        self.send_to_user(user, "notification", data, true).await
    }

    /// `POST /api/v1/rooms/{room}/messages`.
    pub async fn send_to_room(
        &self,
        room: &str,
        event: &str,
        data: Value,
    ) -> Result<PublishResponse, PublishError> {
        let path = format!("/api/v1/rooms/{}/messages", percent_encode(room));
        self.post(&path, &json!({"event": event, "data": data}))
            .await
    }

    /// `GET /api/v1/users/{user}/presence` → `{online, connections}`.
    pub async fn presence(&self, user: &str) -> Result<Value, PublishError> {
        let path = format!("/api/v1/users/{}/presence", percent_encode(user));
        self.get(&path).await
    }

    /// `GET /api/v1/topics/{topic}/subscribers`, the topic percent-encoded as one segment:
    /// how many connections watch it, cluster-wide.
    pub async fn topic_subscribers(&self, topic: &str) -> Result<u64, PublishError> {
        #[derive(Deserialize)]
        struct Subscribers {
            subscribers: u64,
        }
        let path = format!("/api/v1/topics/{}/subscribers", percent_encode(topic));
        let s: Subscribers = self.get(&path).await?;
        Ok(s.subscribers)
    }

    /// `POST /api/v1/users/{user}/disconnect`: closes the user's connections with 4011.
    pub async fn disconnect_user(&self, user: &str) -> Result<Value, PublishError> {
        let path = format!("/api/v1/users/{}/disconnect", percent_encode(user));
        self.post(&path, &json!({})).await
    }

    /// `POST /api/v1/revocations` `{jti?, user?, until?}` (`until`: unix seconds).
    pub async fn revoke(
        &self,
        jti: Option<&str>,
        user: Option<&str>,
        until: Option<u64>,
    ) -> Result<Value, PublishError> {
        #[derive(Serialize)]
        struct Revocation<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            jti: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            user: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            until: Option<u64>,
        }
        self.post("/api/v1/revocations", &Revocation { jti, user, until })
            .await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, PublishError> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, PublishError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// Sends with the API key and decodes the answer: 2xx → `T`, anything else →
    /// [`PublishError::Api`].
    async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, PublishError> {
        let resp = req
            .bearer_auth(&self.api_key)
            .timeout(self.timeout)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| PublishError::Decode(format!("{e} in {}", snippet(&body))))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A non-2xx answer: the server's `{code, message}`, or the status and the start of the body.
fn api_error(status: u16, body: &[u8]) -> PublishError {
    #[derive(Deserialize)]
    struct ApiError {
        code: u16,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => PublishError::Api {
            status,
            code: e.code,
            message: e.message,
        },
        Err(_) => PublishError::Api {
            status,
            code: status,
            message: snippet(body),
        },
    }
}

/// The first 200 characters of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_request_skips_unset_fields() {
        let r = PublishRequest::new("device/d-9/telemetry", "data_update", json!({"t": 21.5}));
        assert_eq!(
            serde_json::to_value(&r).expect("serialize"),
            json!({"topic": "device/d-9/telemetry", "event": "data_update", "data": {"t": 21.5}})
        );
    }

    #[test]
    fn publish_request_all_fields() {
        let r = PublishRequest {
            id: Some("m-1".into()),
            durable: Some(true),
            ttl: Some("7d".into()),
            partition: Some("p".into()),
            trace_id: Some("t-1".into()),
            ..PublishRequest::new("user/42", "notification", Value::Null)
        };
        assert_eq!(
            serde_json::to_value(&r).expect("serialize"),
            json!({
                "topic": "user/42", "event": "notification", "data": null, "id": "m-1",
                "durable": true, "ttl": "7d", "partition": "p", "trace_id": "t-1"
            })
        );
    }

    #[test]
    fn notification_data() {
        let mut n = Notification::new("Hi", "there");
        assert_eq!(
            serde_json::to_value(&n).expect("serialize"),
            json!({"title": "Hi", "body": "there"})
        );
        n.link = Some("/x".into());
        assert_eq!(
            serde_json::to_value(&n).expect("serialize"),
            json!({"title": "Hi", "body": "there", "link": "/x"})
        );
    }

    #[test]
    fn response_seq_optional() {
        let r: PublishResponse = serde_json::from_str(r#"{"id":"a"}"#).expect("decode");
        assert_eq!(
            r,
            PublishResponse {
                id: "a".into(),
                seq: None
            }
        );
        let r: PublishResponse =
            serde_json::from_str(r#"{"id":"a","seq":4,"extra":1}"#).expect("decode");
        assert_eq!(r.seq, Some(4));
    }

    #[test]
    fn api_errors() {
        assert!(matches!(
            api_error(403, br#"{"code":403,"message":"forbidden"}"#),
            PublishError::Api { status: 403, code: 403, ref message } if message == "forbidden"
        ));
        assert!(matches!(
            api_error(502, b"<html>bad gateway</html>"),
            PublishError::Api { status: 502, code: 502, ref message } if message.contains("bad gateway")
        ));
    }

    #[test]
    fn base_url_trailing_slash_and_masked_key() {
        let p = Publisher::new("http://h:1/", "k-secret");
        assert_eq!(p.url("/api/v1/publish"), "http://h:1/api/v1/publish");
        assert!(!format!("{p:?}").contains("k-secret"));
    }
}
