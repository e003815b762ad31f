//! Server-Sent Events (`GET /sse?topic=a&topic=b`): the fallback for clients that cannot hold
//! a WebSocket (SPEC §3). Everything but the wire is [`crate::session`], so SSE has the same
//! authentication, ACL, limits, history, durable delivery and metrics as JSON v1.
//!
//! # The request
//! Checked before anything is allocated for the session, as a WebSocket handshake is: draining
//! node (503), per-IP connection rate (429), origin (403), a credential in the `Authorization:
//! Bearer` header or the `token`/`api_key` query parameter (401). Then the session is opened
//! (the user's connection limit: 429; implicit `user/{id}` and `broadcast`), the subscribe rate
//! limit is taken once, and every `topic` is subscribed; the first topic refused answers the
//! request with its status (400, 403, 429, 503) and a JSON body naming it. No stream starts
//! before every topic is in place.
//!
//! # Resume: event ids
//! The stream keeps, per requested topic with history, the last seq it wrote (seeded by the
//! subscribe). A message with a seq writes `id:` with all of them: `a@17,b@4` (the same format
//! as the long-poll cursor, see [`Cursor`]). The browser sends the last id back as
//! `Last-Event-ID` when it reconnects (polyfills: the `last_event_id` query parameter), and
//! each requested topic it names is subscribed with `since` = its seq: the client gets exactly
//! what it missed, or `recovered:false` when the history no longer holds it.
//!
//! # The stream
//! `retry: 1000`, `event: welcome`, one `event: subscribed` per topic, then the connection's
//! queue: retained values and resumed history (queued by the subscribes), the durable inbox
//! replay, then live messages. A message is `data:` + the JSON v1 `message` frame encoded once
//! for every subscriber (split into several `data:` lines when it holds line breaks: a
//! publisher's raw JSON may). Control frames (`command_reply`…) are `data:` too; a `reconnect`
//! frame (the node drains) becomes `retry: <after_ms>` and ends the stream, so the browser
//! comes back by itself. A close the server asks for (4009 slow consumer, 4011 disconnected or
//! revoked, 1012) and token expiry (4010) write `event: close` with `{code, reason}` and end
//! it. A comment (`: ping`) keeps idle streams alive every `limits.heartbeat_interval`.
//!
//! # One task per stream
//! The session lives in a task of its own (tracked, so the drain waits for it) that drains the
//! queue in batches, encodes each batch into one buffer and hands it to the response body
//! through a one-slot channel. hyper pulls from the body only when the socket takes more, so a
//! hand-over that waits longer than `limits.write_timeout` means the client does not read: the
//! task ends (counted as a slow consumer) and the session is unregistered, whatever hyper still
//! holds. The client leaving drops the body and the channel's receiver: the task sees it at
//! once (`Sender::closed`). What must stay true: the hub never waits on this task, and the
//! session is dropped (unregistered) however the task ends.

// Handlers return `Result<_, Response>`: the error side is a ready HTTP answer.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use herald_core::error::{Error, Origin};
use herald_core::hub::ConnHandle;
use herald_core::identity::{Authenticated, Authenticator};
use herald_core::message::Message;
use herald_core::queue::{CloseRequest, Outgoing};
use herald_core::topic::Topic;
use herald_proto::{close, sse};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::sleep_until;

use crate::api::json_error;
use crate::session::{
    self, Deliveries, Refused, Session, Subscribed, Written, bounded, close_label,
};
use crate::state::AppState;
use crate::ws::{admit_client, credential_from};

/// Queue items encoded per batch (one chunk of the response body).
const BATCH: usize = 256;
/// Batch capacity kept between bursts.
const KEEP_BATCH: usize = 16;
/// The reconnection delay announced at the start of every stream, in milliseconds.
const RETRY_MS: u64 = 1000;
/// Topics in one request, at most (each is a subscription; the limit proper is the
/// connection's subscription limit).
const MAX_TOPICS: usize = 512;

/// `GET /sse`.
pub async fn handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let auth = match admit(&state, peer, req.headers(), req.uri().query()) {
        Ok(a) => a,
        Err(res) => return res,
    };
    let params = match Params::parse(req.uri().query(), req.headers()) {
        Ok(p) => p,
        Err(msg) => return bad_request(&state, &msg),
    };
    let session = match session::open(&state, auth, session::Transport::Sse).await {
        Ok(s) => s,
        Err(Refused::TooManyConnections) => return too_many_connections(),
    };
    // From here on the session exists: its end is counted once, whichever way it ends.
    let mut ended = Ended::new(&state, "refused");
    let resume = |topic: &str| params.resume.get(topic);
    let subscribed = match subscribe_all(&state, &session, &params.topics, resume, |_| true).await {
        Ok(s) => s,
        Err(res) => return res,
    };

    // The event id starts with every requested history topic's position, so that a reconnect
    // before the first message still resumes each of them.
    let mut ids = Cursor::default();
    for s in &subscribed {
        if let Some(seq) = s.seq
            && has_history(&state, &s.topic)
        {
            ids.raise(s.topic.as_str(), seq);
        }
    }
    let preamble = preamble(&state, &session, &subscribed, &mut ids);
    tracing::debug!(%peer, conn_id = session.conn_id, user = %session.conn.user, topics = subscribed.len(), "sse stream opened");

    // One slot: the task hands over a batch only once hyper has taken the previous one.
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    ended.label = "client";
    let stream = Stream {
        state: state.clone(),
        session,
        tx,
        ids,
        ended,
    };
    state.tasks.spawn(stream.run(preamble));

    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|b| b.map(Ok::<Bytes, Infallible>))
    }));
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx: do not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// The checks of every SSE or poll request, before a session is opened: draining node (503),
/// per-IP connection rate (429), origin (403), and a good credential (401).
pub(crate) fn admit(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Authenticated, Response> {
    admit_client(state, peer, headers)?;
    authenticate(state, headers, query)
}

/// The user credential of an SSE, poll or ack request: `Authorization: Bearer`, then
/// `?token=`, then `?api_key=` (401 when missing or refused).
pub(crate) fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Authenticated, Response> {
    let Some(credential) = credential_from(headers, query) else {
        state.metrics.error("unauthenticated");
        return Err(json_error(
            StatusCode::UNAUTHORIZED,
            "missing credential (Authorization: Bearer <token>, or the token or api_key query parameter)",
        ));
    };
    state.auth.authenticate(&credential).map_err(|e| {
        state.metrics.error("unauthenticated");
        json_error(StatusCode::UNAUTHORIZED, &format!("unauthenticated: {e}"))
    })
}

pub(crate) fn bad_request(state: &AppState, msg: &str) -> Response {
    state.metrics.error("bad_request");
    json_error(StatusCode::BAD_REQUEST, msg)
}

pub(crate) fn too_many_connections() -> Response {
    json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many connections for this user",
    )
}

/// The core error as an HTTP answer (status = [`Error::code`]), `context` (e.g. the topic)
/// leading the message.
pub(crate) fn error_response(state: &AppState, e: &Error, context: Option<&str>) -> Response {
    state.metrics.error(e.kind());
    match e.origin() {
        Origin::Client => tracing::debug!(error = %e, context, "request refused"),
        Origin::Backend => tracing::warn!(error = %e, context, "request failed"),
        Origin::Internal => tracing::error!(error = %e, context, "request failed"),
    }
    let status = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match context {
        Some(c) => format!("{c}: {e}"),
        None => e.to_string(),
    };
    json_error(status, &message)
}

/// Whether `topic` keeps a history (its messages carry a seq, and `since` can resume it).
pub(crate) fn has_history(state: &AppState, topic: &Topic) -> bool {
    state.acl.options(topic).history.is_some()
}

/// Subscribes `topics` (already deduplicated) for a session about to stream or answer: the
/// subscribe rate limit once, then each topic with `since(topic)` (ignored for topics without
/// history: there is nothing to resume) and `snapshot(topic)`. The first refusal is the HTTP
/// answer, naming its topic.
pub(crate) async fn subscribe_all(
    state: &AppState,
    session: &Session,
    topics: &[String],
    since: impl Fn(&str) -> Option<u64>,
    snapshot: impl Fn(&str) -> bool,
) -> Result<Vec<Subscribed>, Response> {
    if topics.is_empty() {
        return Ok(Vec::new());
    }
    session
        .may_subscribe(state)
        .map_err(|e| error_response(state, &e, None))?;
    let mut out = Vec::with_capacity(topics.len());
    for raw in topics {
        let since = Topic::parse(raw)
            .ok()
            .filter(|t| has_history(state, t))
            .and_then(|_| since(raw));
        let s = session
            .subscribe(state, raw, since, snapshot(raw))
            .await
            .map_err(|e| error_response(state, &e, Some(&format!("topic {raw:?}"))))?;
        out.push(s);
    }
    Ok(out)
}

/// A subscribe result as JSON: `{topic, seq?, recovered?}`.
pub(crate) fn subscribed_json(s: &Subscribed) -> Value {
    let mut m = Map::new();
    m.insert("topic".into(), Value::String(s.topic.as_str().to_owned()));
    if let Some(seq) = s.seq {
        m.insert("seq".into(), json!(seq));
    }
    if let Some(r) = s.recovered {
        m.insert("recovered".into(), Value::Bool(r));
    }
    Value::Object(m)
}

/// Counts a session's end in `herald_connections_closed_total{reason}` exactly once, when
/// dropped: whoever ends the session sets `label` first.
pub(crate) struct Ended {
    state: Arc<AppState>,
    pub label: &'static str,
}

impl Ended {
    pub(crate) fn new(state: &Arc<AppState>, label: &'static str) -> Self {
        Self {
            state: state.clone(),
            label,
        }
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.state.metrics.connection_closed(self.label);
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// The decoded `key=value` pairs of a query string (`+` is a space, as in HTML forms).
pub(crate) fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_encoding::percent_decode_str(&s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| "query parameter is not UTF-8".to_owned())
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Adds `topic` to `topics` unless it is there already; refuses past [`MAX_TOPICS`].
pub(crate) fn push_topic(topics: &mut Vec<String>, topic: String) -> Result<(), String> {
    if !topics.contains(&topic) {
        if topics.len() >= MAX_TOPICS {
            return Err(format!("too many topics (at most {MAX_TOPICS})"));
        }
        topics.push(topic);
    }
    Ok(())
}

/// What an SSE request asks for.
struct Params {
    /// Deduplicated, in request order.
    topics: Vec<String>,
    resume: Cursor,
}

impl Params {
    fn parse(query: Option<&str>, headers: &HeaderMap) -> Result<Self, String> {
        let mut topics = Vec::new();
        let mut query_id = None;
        for (k, v) in query_pairs(query)? {
            match k.as_str() {
                "topic" => push_topic(&mut topics, v)?,
                "last_event_id" => query_id = Some(v),
                // Credentials, cache busters of polyfills…
                _ => {}
            }
        }
        let header_id = match headers.get("last-event-id") {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| "Last-Event-ID is not ASCII".to_owned())?
                    .to_owned(),
            ),
            None => None,
        };
        let resume = match header_id.or(query_id) {
            Some(id) => Cursor::parse(&id).map_err(|e| format!("malformed Last-Event-ID: {e}"))?,
            None => Cursor::default(),
        };
        Ok(Params { topics, resume })
    }
}

/// A resume position: per topic, the last seq seen. Written `topic@seq` entries joined by
/// commas — the SSE event id and the long-poll cursor. A topic may contain `@` (an entry is
/// split at its last one) but never a comma.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Cursor(Vec<(String, u64)>);

impl Cursor {
    /// Parses `a@17,b@4`; empty (or blank) is the empty cursor. A topic named twice keeps its
    /// last seq.
    pub(crate) fn parse(s: &str) -> Result<Cursor, String> {
        let mut c = Cursor::default();
        let s = s.trim();
        if s.is_empty() {
            return Ok(c);
        }
        for entry in s.split(',') {
            let entry = entry.trim();
            let (topic, seq) = entry
                .rsplit_once('@')
                .ok_or_else(|| format!("{entry:?} is not topic@seq"))?;
            let topic = Topic::parse(topic).map_err(|e| format!("{entry:?}: {e}"))?;
            let seq: u64 = seq
                .parse()
                .map_err(|_| format!("{entry:?}: the seq is not a number"))?;
            c.set(topic.as_str(), seq);
        }
        Ok(c)
    }

    pub(crate) fn get(&self, topic: &str) -> Option<u64> {
        self.0.iter().find(|(t, _)| t == topic).map(|(_, s)| *s)
    }

    pub(crate) fn contains(&self, topic: &str) -> bool {
        self.0.iter().any(|(t, _)| t == topic)
    }

    fn set(&mut self, topic: &str, seq: u64) {
        match self.0.iter_mut().find(|(t, _)| t == topic) {
            Some(e) => e.1 = seq,
            None => self.0.push((topic.to_owned(), seq)),
        }
    }

    /// Sets `topic`'s seq to `seq` when higher (adding the topic when missing).
    pub(crate) fn raise(&mut self, topic: &str, seq: u64) {
        match self.0.iter_mut().find(|(t, _)| t == topic) {
            Some(e) => e.1 = e.1.max(seq),
            None => self.0.push((topic.to_owned(), seq)),
        }
    }

    /// Raises a topic this cursor already tracks; `false` when it tracks no such topic.
    pub(crate) fn advance(&mut self, topic: &str, seq: u64) -> bool {
        match self.0.iter_mut().find(|(t, _)| t == topic) {
            Some(e) => {
                e.1 = e.1.max(seq);
                true
            }
            None => false,
        }
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (t, s)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(t);
            out.push('@');
            out.push_str(&s.to_string());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// A message event; advances the event id when the message has a seq on a tracked topic.
fn put_message(out: &mut BytesMut, ids: &mut Cursor, m: &Message, frame: &[u8]) {
    let id = match m.seq {
        Some(seq) if ids.advance(m.topic.as_str(), seq) => Some(ids.encode()),
        _ => None,
    };
    sse::put_event(out, None, id.as_deref(), frame);
}

fn put_close(out: &mut BytesMut, code: u16, reason: &str) {
    let data = json!({ "code": code, "reason": reason }).to_string();
    sse::put_event(out, Some("close"), None, data.as_bytes());
}

/// `after_ms` when `frame` is a JSON v1 `reconnect` frame.
fn reconnect_after(frame: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        #[serde(default)]
        after_ms: u64,
    }
    match serde_json::from_slice::<Frame>(frame) {
        Ok(f) if f.kind == "reconnect" => Some(f.after_ms),
        _ => None,
    }
}

/// `retry`, `welcome`, and one `subscribed` per topic (each history topic's carries the
/// event id, so the position is known before the first message).
fn preamble(
    state: &AppState,
    session: &Session,
    subscribed: &[Subscribed],
    ids: &mut Cursor,
) -> Bytes {
    let mut out = BytesMut::with_capacity(256);
    sse::put_retry(&mut out, RETRY_MS);
    let welcome = json!({
        "conn_id": session.conn_id,
        "user_id": &*session.conn.user,
        "node_id": &*state.node_id,
        "heartbeat_ms": state.config.limits.heartbeat_interval.as_millis() as u64,
    });
    sse::put_event(
        &mut out,
        Some("welcome"),
        None,
        welcome.to_string().as_bytes(),
    );
    for s in subscribed {
        let id = (s.seq.is_some() && ids.contains(s.topic.as_str())).then(|| ids.encode());
        sse::put_event(
            &mut out,
            Some("subscribed"),
            id.as_deref(),
            subscribed_json(s).to_string().as_bytes(),
        );
    }
    out.freeze()
}

// ---------------------------------------------------------------------------------------------
// The stream task
// ---------------------------------------------------------------------------------------------

/// One SSE stream: owns the session until the task ends.
struct Stream {
    state: Arc<AppState>,
    session: Session,
    tx: mpsc::Sender<Bytes>,
    /// The event id: per requested history topic, the last seq written.
    ids: Cursor,
    ended: Ended,
}

impl Stream {
    async fn run(mut self, preamble: Bytes) {
        let label = self.serve(preamble).await;
        self.ended.label = label;
        tracing::debug!(conn_id = self.session.conn_id, user = %self.session.conn.user, reason = label, "sse stream ended");
    }

    /// Hands `bytes` to the response body within the write timeout; `Err(label)` when the
    /// stream must end. A timeout counts a slow consumer unless that was counted already: the
    /// stream was ending anyway (`last`), or the queue overflowed meanwhile (its 4009 is
    /// counted by the fanout).
    async fn send(&self, bytes: Bytes, last: bool) -> Result<(), &'static str> {
        let limit = self.state.config.limits.write_timeout;
        match bounded(limit, self.tx.send(bytes)).await {
            Ok(Ok(())) => Ok(()),
            // The body was dropped: the client left.
            Ok(Err(_)) => Err("client"),
            Err(()) => {
                if !last && !self.session.conn.queue.is_closing() {
                    self.state.metrics.slow_consumers.increment(1);
                }
                Err("write_timeout")
            }
        }
    }

    /// The stream's life; returns why it ended (a metric label).
    async fn serve(&mut self, preamble: Bytes) -> &'static str {
        let state = self.state.clone();
        let limits = &state.config.limits;
        if let Err(label) = self.send(preamble, false).await {
            return label;
        }
        self.session.replay_inbox(&state, None).await;
        let conn = self.session.conn.clone();
        let expiry = self.session.expiry;
        let mut batch: Vec<Outgoing> = Vec::new();
        let mut deliveries = Deliveries::default();
        // One timer for the heartbeat and the token expiry; the heartbeat is due only after
        // `heartbeat_interval` without a write.
        let mut last_write = Instant::now();
        let due = |last_write: Instant| {
            let ping = last_write + limits.heartbeat_interval;
            expiry.map_or(ping, |e| e.min(ping))
        };
        let mut timer = Box::pin(sleep_until(due(last_write).into()));
        loop {
            tokio::select! {
                _ = self.tx.closed() => return "client",
                close = conn.queue.drain(&mut batch, BATCH) => {
                    let mut out = BytesMut::new();
                    let (written, reconnect) =
                        self.encode_batch(&conn, &mut batch, &mut deliveries, &mut out);
                    // Why the stream ends after this batch, if it does.
                    let mut ended = reconnect.then_some("reconnect");
                    if let Some(CloseRequest { code, reason }) = close {
                        put_close(&mut out, code, &reason);
                        ended = Some(close_label(code));
                    }
                    if batch.capacity() > KEEP_BATCH {
                        // An idle stream keeps no burst-sized buffer.
                        batch = Vec::new();
                    }
                    if !out.is_empty() {
                        if let Err(label) = self.send(out.freeze(), ended.is_some()).await {
                            // A stream ending anyway keeps the reason it ended for.
                            return ended.unwrap_or(label);
                        }
                        last_write = Instant::now();
                    }
                    Deliveries::written(&state, &conn, written);
                    if let Some(label) = ended {
                        return label;
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if expiry.is_some_and(|e| now >= e) {
                        let mut out = BytesMut::new();
                        put_close(&mut out, close::TOKEN_EXPIRED, "token expired");
                        // Ending anyway: a failed write changes nothing.
                        let _ = self.send(out.freeze(), true).await;
                        return "token_expired";
                    }
                    if now >= last_write + limits.heartbeat_interval {
                        if let Err(label) = self.send(Bytes::from_static(b": ping\n\n"), false).await {
                            return label;
                        }
                        last_write = now;
                    }
                    timer.as_mut().reset(due(last_write).into());
                }
            }
        }
    }

    /// Encodes a drained batch into `out`. Returns the delivery bookkeeping and whether a
    /// `reconnect` frame was met (then `retry: <after_ms>` ends `out`).
    fn encode_batch(
        &mut self,
        conn: &ConnHandle,
        batch: &mut Vec<Outgoing>,
        deliveries: &mut Deliveries,
        out: &mut BytesMut,
    ) -> (Written, bool) {
        let state = &self.state;
        let mut written = deliveries.start(state);
        let mut reconnect = None;
        for item in batch.drain(..) {
            match item {
                Outgoing::Message(m) => {
                    if deliveries.admit(state, conn, &m, &mut written) {
                        put_message(out, &mut self.ids, &m, m.json_frame());
                    }
                }
                Outgoing::Replay(m) => {
                    Deliveries::replayed(&mut written);
                    put_message(out, &mut self.ids, &m, m.json_frame());
                }
                Outgoing::Retained(m) => {
                    put_message(out, &mut self.ids, &m, &m.json_frame_retained());
                }
                Outgoing::Frame(f) => match reconnect_after(&f) {
                    Some(after) => reconnect = Some(after),
                    None => sse::put_event(out, None, None, &f),
                },
            }
        }
        if let Some(after) = reconnect {
            sse::put_retry(out, after);
        }
        (written, reconnect.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_last_at() {
        let c = Cursor::parse("a@17, room/x@y@4").unwrap();
        assert_eq!(c.get("a"), Some(17));
        assert_eq!(c.get("room/x@y"), Some(4));
        assert_eq!(c.encode(), "a@17,room/x@y@4");
        assert_eq!(Cursor::parse("").unwrap(), Cursor::default());
        assert_eq!(Cursor::parse("   ").unwrap(), Cursor::default());
    }

    #[test]
    fn malformed_cursors_are_refused() {
        for bad in [
            "a", "a@", "a@x", "@3", "a//b@3", "a@1,,b@2", "a@-1", "a@1 b@2",
        ] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn advance_only_moves_tracked_topics_forward() {
        let mut c = Cursor::default();
        c.raise("a", 5);
        assert!(c.advance("a", 7));
        assert!(c.advance("a", 6));
        assert!(!c.advance("b", 1));
        assert_eq!(c.encode(), "a@7");
    }

    #[test]
    fn reconnect_frames_are_recognised() {
        let f = herald_proto::json::encode_reconnect("node draining", 1200);
        assert_eq!(reconnect_after(&f), Some(1200));
        assert_eq!(reconnect_after(br#"{"type":"command_reply"}"#), None);
        assert_eq!(reconnect_after(b"pong"), None);
    }

    #[test]
    fn query_pairs_decode_percent_and_plus() {
        let q = query_pairs(Some("topic=room%2Fa&topic=b+c&flag&x=%40")).unwrap();
        assert_eq!(
            q,
            vec![
                ("topic".into(), "room/a".into()),
                ("topic".into(), "b c".into()),
                ("flag".into(), "".into()),
                ("x".into(), "@".into()),
            ]
        );
        assert!(query_pairs(Some("topic=%ff")).is_err());
    }
}
