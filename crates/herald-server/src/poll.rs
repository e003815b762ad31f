//! Long polling (`GET /api/v1/poll`) and the HTTP ack (`POST /api/v1/ack`): the last-resort
//! transport for clients that can hold neither a WebSocket nor an event stream (seed 000's
//! HTTP fallback). Everything but the wire is [`crate::session`].
//!
//! # One poll
//! A poll is a short-lived connection: the same checks as a WebSocket handshake (draining 503,
//! per-IP rate 429, origin 403, credential 401), then a session is opened — registered in the
//! hub with the implicit `user/{id}` and `broadcast`, counted against the user's connection
//! limit while it waits (429). It acknowledges the `ack` ids first (so they are not replayed),
//! subscribes each `topic` (with `since` from the cursor for history topics; the retained
//! value only for a topic the cursor does not name yet), queues the durable inbox replay, then
//! waits until the queue holds something or `timeout` passes, drains it and answers:
//!
//! ```json
//! {"messages":[…JSON v1 message objects…],"cursor":"a@17,b@4",
//!  "subscriptions":[{"topic":"a","seq":17,"recovered":true}],"events":[…]}
//! ```
//!
//! `messages` are the JSON v1 `message` frames each message encoded once for every
//! subscriber, joined as they are (never re-serialised), deduplicated by id within the answer
//! (a durable message can be queued by the inbox replay and live). `events` holds JSON control
//! frames addressed to the session (`command_reply`, `reconnect` when the node drains) and a
//! `close` event when the server ended the session (`{"type":"close","code":4011,…}`, or 4010
//! when the token expired during the wait); it is left out when empty.
//!
//! # The cursor
//! `cursor` names every requested topic as `topic@seq` (the SSE event id format, see
//! [`Cursor`]): for a history topic the highest seq known (from the messages, else the
//! subscribe's), for any other topic 0 (it only records that the client has had the retained
//! value). Passed back as `since`, it makes the next poll return exactly what was published
//! on history topics in between. Messages of topics without history published while no poll
//! is waiting are not kept: use history topics or durable inbox messages for what must not be
//! missed. Durable messages come back in every poll until acked (`ack=` or `POST /api/v1/ack`).

// Handlers return `Result<_, Response>`: the error side is a ready HTTP answer.
#![allow(clippy::result_large_err)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use herald_core::error::Error;
use herald_core::queue::{CloseRequest, Outgoing};
use herald_proto::close;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::json;

use crate::api::json_error;
use crate::session::{self, Deliveries, Refused, Subscribed};
use crate::sse::{
    Cursor, Ended, admit, authenticate, bad_request, error_response, has_history, push_topic,
    query_pairs, subscribed_json, too_many_connections,
};
use crate::state::AppState;

/// `timeout` when the request gives none, in seconds.
const DEFAULT_TIMEOUT: u64 = 25;
/// The longest `timeout` accepted, in seconds.
const MAX_TIMEOUT: u64 = 60;
/// Ids in one ack, at most.
const MAX_ACK_IDS: usize = 1000;

/// What a poll asks for.
#[derive(Debug)]
struct Params {
    /// Deduplicated, in request order.
    topics: Vec<String>,
    since: Cursor,
    timeout: Duration,
    acks: Vec<String>,
}

impl Params {
    fn parse(query: Option<&str>) -> Result<Params, String> {
        let mut topics = Vec::new();
        let mut since = None;
        let mut timeout = None;
        let mut acks = Vec::new();
        for (k, v) in query_pairs(query)? {
            match k.as_str() {
                "topic" => push_topic(&mut topics, v)?,
                "since" if since.is_some() => return Err("since given twice".into()),
                "since" => since = Some(v),
                "timeout" if timeout.is_some() => return Err("timeout given twice".into()),
                "timeout" => {
                    let t: u64 = v
                        .parse()
                        .ok()
                        .filter(|t| *t <= MAX_TIMEOUT)
                        .ok_or_else(|| {
                            format!("timeout must be whole seconds from 0 to {MAX_TIMEOUT}: {v:?}")
                        })?;
                    timeout = Some(t);
                }
                "ack" if v.is_empty() => return Err("empty ack id".into()),
                "ack" => {
                    if acks.len() >= MAX_ACK_IDS {
                        return Err(format!("too many ack ids (at most {MAX_ACK_IDS})"));
                    }
                    acks.push(v);
                }
                // Credentials, cache busters…
                _ => {}
            }
        }
        let since = match since {
            None => Cursor::default(),
            Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                let [topic] = topics.as_slice() else {
                    return Err(
                        "a bare since (a seq) needs exactly one topic; use the cursor (topic@seq,…)"
                            .into(),
                    );
                };
                let seq = s
                    .parse()
                    .map_err(|_| format!("since is out of range: {s:?}"))?;
                let mut c = Cursor::default();
                c.raise(topic, seq);
                c
            }
            Some(s) => Cursor::parse(&s).map_err(|e| format!("malformed since: {e}"))?,
        };
        Ok(Params {
            topics,
            since,
            timeout: Duration::from_secs(timeout.unwrap_or(DEFAULT_TIMEOUT)),
            acks,
        })
    }
}

/// `GET /api/v1/poll`.
pub async fn handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let auth = match admit(&state, peer, req.headers(), req.uri().query()) {
        Ok(a) => a,
        Err(res) => return res,
    };
    let params = match Params::parse(req.uri().query()) {
        Ok(p) => p,
        Err(msg) => return bad_request(&state, &msg),
    };
    let session = match session::open(&state, auth, session::Transport::Poll).await {
        Ok(s) => s,
        Err(Refused::TooManyConnections) => return too_many_connections(),
    };
    // Dropped with this future when the client leaves mid-wait: counted as the client's.
    let mut ended = Ended::new(&state, "client");

    if !params.acks.is_empty()
        && let Err(e) = session.ack(&state, &params.acks).await
    {
        ended.label = "refused";
        return error_response(&state, &e, Some("ack"));
    }
    let since = |topic: &str| params.since.get(topic);
    let snapshot = |topic: &str| !params.since.contains(topic);
    let subscribed =
        match crate::sse::subscribe_all(&state, &session, &params.topics, since, snapshot).await {
            Ok(s) => s,
            Err(res) => {
                ended.label = "refused";
                return res;
            }
        };
    session.replay_inbox(&state, None).await;

    // Wait for the first item (or the timeout, or the token's expiry), then take all that is
    // queued at that moment.
    let conn = session.conn.clone();
    let mut batch: Vec<Outgoing> = Vec::new();
    let deadline = Instant::now() + params.timeout;
    let deadline = session.expiry.map_or(deadline, |e| e.min(deadline));
    let drain = conn.queue.drain(&mut batch, usize::MAX);
    let close = if params.timeout.is_zero() {
        drain.now_or_never().flatten()
    } else {
        tokio::time::timeout_at(deadline.into(), drain)
            .await
            .ok()
            .flatten()
    };
    let expired =
        batch.is_empty() && close.is_none() && session.expiry.is_some_and(|e| Instant::now() >= e);

    let answer = Answer::build(&state, &conn, &subscribed, batch, close.as_ref(), expired);
    ended.label = match (&close, expired) {
        (Some(c), _) => session::close_label(c.code),
        (None, true) => "token_expired",
        (None, false) => "poll_answered",
    };
    tracing::debug!(conn_id = session.conn_id, user = %session.conn.user, messages = answer.messages, "poll answered");
    let mut res = Response::new(Body::from(answer.body));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A poll's answer body.
struct Answer {
    body: Bytes,
    messages: usize,
}

impl Answer {
    fn build(
        state: &AppState,
        conn: &herald_core::hub::ConnHandle,
        subscribed: &[Subscribed],
        batch: Vec<Outgoing>,
        close: Option<&CloseRequest>,
        expired: bool,
    ) -> Answer {
        // Every requested topic, at the subscribe's position (0 without history).
        let mut cursor = Cursor::default();
        for s in subscribed {
            let seq = if has_history(state, &s.topic) {
                s.seq.unwrap_or(0)
            } else {
                0
            };
            cursor.raise(s.topic.as_str(), seq);
        }

        let mut deliveries = Deliveries::default();
        let mut written = deliveries.start(state);
        let mut seen: HashSet<Box<str>> = HashSet::new();
        let mut messages: Vec<Bytes> = Vec::with_capacity(batch.len());
        let mut events: Vec<Bytes> = Vec::new();
        for item in batch {
            let (m, frame) = match item {
                Outgoing::Message(m) => {
                    if seen.contains(&m.id) || !deliveries.admit(state, conn, &m, &mut written) {
                        continue;
                    }
                    let f = m.json_frame().clone();
                    (m, f)
                }
                Outgoing::Replay(m) => {
                    if seen.contains(&m.id) {
                        continue;
                    }
                    Deliveries::replayed(&mut written);
                    let f = m.json_frame().clone();
                    (m, f)
                }
                Outgoing::Retained(m) => {
                    let f = m.json_frame_retained();
                    (m, f)
                }
                Outgoing::Frame(f) => {
                    // Only JSON objects may go into the answer as they are.
                    if serde_json::from_slice::<IgnoredAny>(&f).is_ok() && f.first() == Some(&b'{')
                    {
                        events.push(f);
                    }
                    continue;
                }
            };
            seen.insert(m.id.clone());
            if let Some(seq) = m.seq
                && has_history(state, &m.topic)
            {
                cursor.advance(m.topic.as_str(), seq);
            }
            messages.push(frame);
        }
        if let Some(c) = close {
            events.push(event_close(c.code, &c.reason));
        }
        if expired {
            events.push(event_close(close::TOKEN_EXPIRED, "token expired"));
        }
        Deliveries::written(state, conn, written);

        let subscriptions: Vec<_> = subscribed.iter().map(subscribed_json).collect();
        let cursor = serde_json::to_string(&cursor.encode()).unwrap_or_else(|_| "\"\"".into());
        let subscriptions = serde_json::to_string(&subscriptions).unwrap_or_else(|_| "[]".into());
        let size = messages
            .iter()
            .chain(&events)
            .map(|b| b.len() + 1)
            .sum::<usize>()
            + cursor.len()
            + subscriptions.len()
            + 64;
        let mut out = BytesMut::with_capacity(size);
        out.put_slice(b"{\"messages\":");
        put_array(&mut out, &messages);
        out.put_slice(b",\"cursor\":");
        out.put_slice(cursor.as_bytes());
        out.put_slice(b",\"subscriptions\":");
        out.put_slice(subscriptions.as_bytes());
        if !events.is_empty() {
            out.put_slice(b",\"events\":");
            put_array(&mut out, &events);
        }
        out.put_u8(b'}');
        Answer {
            body: out.freeze(),
            messages: messages.len(),
        }
    }
}

/// `[a,b,…]` from ready JSON values.
fn put_array(out: &mut BytesMut, items: &[Bytes]) {
    out.put_u8(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(item);
    }
    out.put_u8(b']');
}

fn event_close(code: u16, reason: &str) -> Bytes {
    Bytes::from(json!({ "type": "close", "code": code, "reason": reason }).to_string())
}

/// `POST /api/v1/ack` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckReq {
    ids: Vec<String>,
}

/// `POST /api/v1/ack`: acknowledges durable messages for the user of the credential (a user
/// token or client API key, as for `/sse` — not a server API key). Needs no open session.
pub async fn ack(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let auth = match authenticate(&state, &parts.headers, parts.uri.query()) {
        Ok(a) => a,
        Err(res) => return res,
    };
    let limit = state.config.limits.max_message_size;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            state.metrics.error("too_large");
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body larger than {limit} bytes"),
            );
        }
    };
    let req: AckReq = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return bad_request(&state, &format!("invalid body: {e}")),
    };
    if req.ids.is_empty() || req.ids.len() > MAX_ACK_IDS {
        return bad_request(&state, &format!("ids must hold 1 to {MAX_ACK_IDS} ids"));
    }
    let user = &auth.identity.user_id;
    state.inbox.acked(user, &req.ids);
    match state.store.ack(user, &req.ids).await {
        Ok(n) => Json(json!({ "acked": n })).into_response(),
        Err(e) => error_response(&state, &Error::Store(e), Some("ack")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        let p = Params::parse(Some("topic=a&since=4&timeout=0&ack=x&ack=y")).unwrap();
        assert_eq!(p.topics, ["a"]);
        assert_eq!(p.since.get("a"), Some(4));
        assert_eq!(p.timeout, Duration::ZERO);
        assert_eq!(p.acks, ["x", "y"]);
        let p = Params::parse(Some("topic=a&topic=b&topic=a&since=a%401%2Cb%402")).unwrap();
        assert_eq!(p.topics, ["a", "b"]);
        assert_eq!(p.since.encode(), "a@1,b@2");
        assert_eq!(p.timeout, Duration::from_secs(DEFAULT_TIMEOUT));
        assert!(Params::parse(None).unwrap().topics.is_empty());
    }

    #[test]
    fn bad_parameters() {
        for q in [
            "timeout=61",
            "timeout=-1",
            "timeout=1.5",
            "topic=a&topic=b&since=3",
            "since=3",
            "topic=a&since=a@x",
            "topic=a&since=nope",
            "ack=",
            "timeout=1&timeout=2",
        ] {
            assert!(Params::parse(Some(q)).is_err(), "{q} should be refused");
        }
    }
}
