//! `http://` / `https://` command targets: the envelope is POSTed as JSON and the response is
//! the reply (synchronous RPC, seed 003).
//!
//! - 2xx with a JSON body `{code?, message?, data?}`: that reply;
//! - 202 or 204 (or an empty body): the service will answer later through
//!   `POST /api/v1/replies`; the client gets nothing now (reply code 202 to the caller);
//! - any other status, or a body that is not a reply: [`UpstreamError::BadReply`] (502 to the
//!   client), except 503 (→ [`UpstreamError::Unavailable`]);
//! - no answer within the command's timeout: [`UpstreamError::Timeout`] (504);
//! - the service cannot be reached: [`UpstreamError::Unavailable`] (503).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::command::{Reply, Target, Upstream, UpstreamError};

/// The HTTP target of every command whose target is a URL.
pub struct HttpUpstream {
    client: reqwest::Client,
}

impl HttpUpstream {
    pub fn new() -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self { client })
    }
}

/// The reply code that means "answered later, through `POST /api/v1/replies`".
pub const REPLY_LATER: u16 = 202;

#[async_trait]
impl Upstream for HttpUpstream {
    async fn call(
        &self,
        target: &Target,
        envelope: Bytes,
        trace_id: &str,
        timeout: Duration,
    ) -> Result<Reply, UpstreamError> {
        let Target::Http { url } = target else {
            return Err(UpstreamError::Unavailable(format!(
                "{target:?} is not an HTTP target"
            )));
        };
        let sent = self
            .client
            .post(url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .header("x-trace-id", trace_id)
            .body(envelope)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(UpstreamError::Timeout(timeout)),
            Err(e) => return Err(UpstreamError::Unavailable(format!("{url}: {e}"))),
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) if e.is_timeout() => return Err(UpstreamError::Timeout(timeout)),
            Err(e) => return Err(UpstreamError::BadReply(format!("{url}: {e}"))),
        };
        if status.as_u16() == 503 {
            return Err(UpstreamError::Unavailable(format!("{url} answered 503")));
        }
        if !status.is_success() {
            return Err(UpstreamError::BadReply(format!("{url} answered {status}")));
        }
        if status.as_u16() == 202
            || status.as_u16() == 204
            || body.iter().all(u8::is_ascii_whitespace)
        {
            return Ok(Reply {
                code: REPLY_LATER,
                message: None,
                data: None,
            });
        }
        serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::BadReply(format!("{url}: the body is not a reply: {e}")))
    }
}
