//! Seed 001's telemetry compatibility endpoints (SPEC §3): a browser watches one device's
//! telemetry and receives bare JSON objects, exactly as the system Herald replaces served them.
//!
//! - `GET /api/v1/telemetry/datas/current/ws`: every field of each update.
//! - `GET /api/v1/telemetry/datas/current/keys/ws`: only the fields named in `keys`.
//!
//! # Frames
//! Client → server, first text frame, within `limits.auth_timeout`:
//!
//! ```json
//! {"device_id":"d-1","token":"<jwt>"}
//! {"device_id":"d-1","api_key":"<client key>"}
//! {"device_id":"d-1","keys":["temperature","humidity"],"token":"<jwt>"}
//! ```
//!
//! Unknown fields are ignored. The credential is `token`, else `api_key`, else the one given in
//! the handshake (`Authorization: Bearer`, `?token=`, `?api_key=`, as on `/ws`; a bad one there
//! is refused with HTTP 401 before the upgrade). `keys` is required and non-empty on the keys
//! endpoint, optional on the other (there an empty list means every field); at most
//! [`MAX_KEYS`] non-empty strings. A bare text `ping` before the first frame is answered `pong`
//! and the wait goes on.
//!
//! Server → client: the device's latest value at once (the retained message of
//! `device/{device_id}/telemetry`, which needs `retain = true` on that topic's rule; without
//! one nothing is sent first), then every update, each as one text frame:
//!
//! ```json
//! {"temperature":25.5,"humidity":60,"systime":"2025-01-20T10:30:00Z"}
//! ```
//!
//! After the first frame, every text or binary frame is answered with the text frame `pong`.
//!
//! # From a message to a frame
//! - The seed-001 envelope (data an object with a `device_id` field and an object field
//!   `data`, as `ws:device:{deviceID}` on Redis carries it): the inner `data`'s fields;
//!   `systime` from the envelope's `timestamp` (Unix seconds, or milliseconds when over 10^12;
//!   a fraction of a second is kept as milliseconds), else from the message's `ts`.
//! - Any other object: its own fields; `systime` from the message's `ts`.
//! - Anything else (number, string, array, null): `{"value":<data>,"systime":…}`.
//!
//! Fields keep the publisher's order (a repeated name keeps its last value); a field named
//! `systime` is replaced by ours, which comes last. With `keys`, only those fields are kept,
//! and an update holding none of them is not sent at all. `systime` is RFC 3339 in UTC:
//! `2025-01-20T10:30:00Z` for a whole second, `2025-01-20T10:30:00.123Z` otherwise.
//!
//! Each connection renders its own frame (no encode-once cache): the design point of seed 001
//! is millions of devices with few viewers each, so a message has one or two telemetry
//! readers, and `keys` makes their frames differ anyway.
//!
//! # Refusals
//! Before anything is subscribed, a refusal is one text frame `{"code":…,"message":…}` and a
//! close: 400 bad first frame (not JSON, no `device_id`, a `device_id` that is not one topic
//! segment, bad `keys`) and 403 topic forbidden → close 1008; 401 (no credential, refused
//! credential, no first frame in time) → 4001; 429 too many connections for the user → 4029,
//! subscribe rate → 1008; 503 bus or history unavailable → 1011.
//!
//! # The connection
//! Everything else is `/ws`'s: the handshake checks ([`crate::ws::admit`]), the session (the
//! user connection limit, revocation and server-side disconnect 4011, token expiry 4010; no
//! implicit subscriptions: the socket carries its device's data only), the ACL and the
//! subscribe through [`Session::subscribe`] (so the cluster's interest counter
//! `ws:sub:{deviceID}` counts these viewers), the heartbeat (a Ping every
//! `heartbeat_interval`, 1001 after `heartbeat_timeout` of silence; browsers answer Pings by
//! themselves), bounded writes, the metrics. What a user's other connections receive (inbox
//! messages, command replies) is skipped here. A draining node's `reconnect` becomes a close
//! 1012 after its `after_ms`, since these clients know no `reconnect` frame.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use bytes::Bytes;
use herald_core::error::{Error, Origin};
use herald_core::hub::ConnHandle;
use herald_core::identity::{Authenticated, Authenticator};
use herald_core::message::Message;
use herald_core::queue::{CloseRequest, Outgoing};
use herald_core::topic::{Topic, is_valid_segment};
use herald_proto::close;
use herald_proto::ws::{self as frame, Message as WsMessage, OpCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::{Sleep, sleep_until};

use crate::session::{self, Deliveries, Refused, Session, bounded, close_label};
use crate::state::AppState;
use crate::ws::{
    First, admit, close_for_frame_error, first_message, handshake_credential, send_close, upgrade,
};
use crate::wsio::{WsError, WsSocket};

/// `keys` entries at most.
pub const MAX_KEYS: usize = 64;
/// Bytes of one `keys` entry at most.
const MAX_KEY_LEN: usize = 256;
/// Queue items written per batch.
const BATCH: usize = 64;
/// Close code for refused input (RFC 6455 "policy violation").
const POLICY_VIOLATION: u16 = 1008;
/// Close code for a backend failure (RFC 6455 "internal error").
const INTERNAL_ERROR: u16 = 1011;
/// Latest representable `systime` (9999-12-31T23:59:59.999Z), in Unix milliseconds.
const MAX_SYSTIME_MS: u64 = 253_402_300_799_999;

/// Which of the two endpoints a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/api/v1/telemetry/datas/current/ws`: `keys` optional.
    Current,
    /// `/api/v1/telemetry/datas/current/keys/ws`: `keys` required.
    Keys,
}

/// `GET /api/v1/telemetry/datas/current/ws`.
pub async fn current_handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    handshake(state, peer, req, Endpoint::Current)
}

/// `GET /api/v1/telemetry/datas/current/keys/ws`.
pub async fn keys_handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    handshake(state, peer, req, Endpoint::Keys)
}

/// The `/ws` handshake checks, the optional handshake credential, then the upgrade. No
/// subprotocol is negotiated (seed-001 clients ask for none).
fn handshake(state: Arc<AppState>, peer: SocketAddr, req: Request, endpoint: Endpoint) -> Response {
    let key = match admit(&state, peer, req.headers()) {
        Ok(k) => k,
        Err(res) => return res,
    };
    let pre_auth = match handshake_credential(&state, peer, &req) {
        Ok(a) => a,
        Err(res) => return res,
    };
    let task_state = state.clone();
    upgrade(&state, peer, req, &key, None, move |ws| {
        run_connection(task_state, ws, pre_auth, endpoint, peer)
    })
}

/// The first frame, as seed 001 defines it.
#[derive(Deserialize)]
struct FirstFrame {
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    keys: Option<Vec<String>>,
}

/// What the connection watches.
struct Watch {
    topic: Topic,
    /// The fields to keep; `None`: all.
    keys: Option<Box<[Box<str>]>>,
}

/// A refusal before the subscription: the `{"code","message"}` frame and the close code.
struct Refusal {
    code: u16,
    message: String,
    close: u16,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Refusal {
        Refusal {
            code: 400,
            message: message.into(),
            close: POLICY_VIOLATION,
        }
    }

    fn unauthenticated(message: impl Into<String>) -> Refusal {
        Refusal {
            code: 401,
            message: message.into(),
            close: close::UNAUTHENTICATED,
        }
    }

    /// A core error (subscribe): its code, and the close that goes with it.
    fn from_error(e: &Error) -> Refusal {
        let code = e.code();
        Refusal {
            code,
            message: e.to_string(),
            close: match code {
                401 => close::UNAUTHENTICATED,
                500.. => INTERNAL_ERROR,
                _ => POLICY_VIOLATION,
            },
        }
    }

    /// Writes the error frame, then closes. Both bounded by the write timeout.
    async fn send(self, state: &AppState, ws: &mut WsSocket) {
        let limit = state.config.limits.write_timeout;
        let body = serde_json::json!({ "code": self.code, "message": self.message }).to_string();
        if bounded(limit, ws.send_text(body.as_bytes()))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            send_close(ws, self.close, close_reason(&self.message), limit).await;
        }
    }
}

/// A close reason fits in a control frame (123 bytes); cut on a character boundary.
fn close_reason(message: &str) -> &str {
    let mut end = message.len().min(120);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Checks the first frame: the device's topic, the keys and the credential.
fn parse_first_frame(text: &str, endpoint: Endpoint) -> Result<(Watch, Option<String>), Refusal> {
    let f: FirstFrame = serde_json::from_str(text).map_err(|e| {
        Refusal::bad(format!(
            "the first frame must be a JSON object {{\"device_id\":…,\"token\":…}}: {e}"
        ))
    })?;
    let device = match f.device_id.as_deref() {
        None | Some("") => return Err(Refusal::bad("device_id is required")),
        Some(d) => d,
    };
    if !is_valid_segment(device) {
        return Err(Refusal::bad(format!(
            "device_id {device:?} is not a valid topic segment (1-64 characters of A-Z a-z 0-9 _ . : @ -)"
        )));
    }
    let topic = Topic::parse(&format!("device/{device}/telemetry")).map_err(|e| Refusal {
        code: 400,
        message: e.to_string(),
        close: POLICY_VIOLATION,
    })?;
    let keys = match (f.keys, endpoint) {
        (None, Endpoint::Keys) => return Err(Refusal::bad("keys is required on this endpoint")),
        (None, Endpoint::Current) => None,
        (Some(k), Endpoint::Current) if k.is_empty() => None,
        (Some(k), _) if k.is_empty() => return Err(Refusal::bad("keys must not be empty")),
        (Some(k), _) if k.len() > MAX_KEYS => {
            return Err(Refusal::bad(format!(
                "keys: at most {MAX_KEYS} field names"
            )));
        }
        (Some(k), _) => {
            if k.iter().any(|k| k.is_empty() || k.len() > MAX_KEY_LEN) {
                return Err(Refusal::bad(format!(
                    "keys: every field name must be 1-{MAX_KEY_LEN} bytes"
                )));
            }
            Some(k.into_iter().map(String::into_boxed_str).collect())
        }
    };
    let credential = [f.token, f.api_key]
        .into_iter()
        .flatten()
        .find(|c| !c.is_empty());
    Ok((Watch { topic, keys }, credential))
}

/// The connection task: the one-off part (first frame, session, subscribe) boxed, then the
/// loop.
async fn run_connection(
    state: Arc<AppState>,
    mut ws: WsSocket,
    pre_auth: Option<Box<Authenticated>>,
    endpoint: Endpoint,
    peer: SocketAddr,
) {
    let Some((session, watch)) = Box::pin(open(&state, &mut ws, pre_auth, endpoint, peer)).await
    else {
        return;
    };
    let reason = connection_loop(&state, &mut ws, &session, &watch).await;
    state.metrics.connection_closed(reason);
    tracing::debug!(conn_id = session.conn_id, user = %session.conn.user, topic = %watch.topic, reason, "telemetry disconnected");
}

/// Reads the first frame (within `auth_timeout`), authenticates, opens the session and
/// subscribes the device's topic (the retained value is queued by the subscribe). `None`:
/// the connection was refused and closed here.
async fn open(
    state: &Arc<AppState>,
    ws: &mut WsSocket,
    pre_auth: Option<Box<Authenticated>>,
    endpoint: Endpoint,
    peer: SocketAddr,
) -> Option<(Session, Watch)> {
    let text = first_text(state, ws).await?;
    let (watch, credential) = match parse_first_frame(&text, endpoint) {
        Ok(x) => x,
        Err(r) => {
            state.metrics.error("bad_request");
            r.send(state, ws).await;
            return None;
        }
    };
    let auth = match (credential, pre_auth) {
        (Some(c), _) => match state.auth.authenticate(&c) {
            Ok(a) => a,
            Err(e) => {
                state.metrics.error("unauthenticated");
                Refusal::unauthenticated(e.to_string())
                    .send(state, ws)
                    .await;
                return None;
            }
        },
        (None, Some(a)) => *a,
        (None, None) => {
            state.metrics.error("unauthenticated");
            Refusal::unauthenticated("token or api_key is required")
                .send(state, ws)
                .await;
            return None;
        }
    };
    let session = match session::open(state, auth, session::Transport::Telemetry).await {
        Ok(s) => s,
        // Counted by `session::open` (connections closed, `too_many_connections`), as on /ws.
        Err(Refused::TooManyConnections) => {
            Refusal {
                code: 429,
                message: "too many connections for this user".into(),
                close: close::TOO_MANY_CONNECTIONS,
            }
            .send(state, ws)
            .await;
            return None;
        }
    };
    let subscribed = match session.may_subscribe(state) {
        Ok(()) => {
            session
                .subscribe(state, watch.topic.as_str(), None, true)
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = subscribed {
        state.metrics.error(e.kind());
        if e.origin() != Origin::Client {
            tracing::warn!(conn_id = session.conn_id, error = %e, "telemetry subscribe failed");
        }
        Refusal::from_error(&e).send(state, ws).await;
        state.metrics.connection_closed("refused");
        return None;
    }
    tracing::debug!(%peer, conn_id = session.conn_id, user = %session.conn.user, topic = %watch.topic, "telemetry connected");
    Some((session, watch))
}

/// The first text frame (answering Pings and a bare `ping` meanwhile). `None`: the
/// connection was closed here (timeout 4001, a close, a framing error, a binary frame).
async fn first_text(state: &AppState, ws: &mut WsSocket) -> Option<String> {
    let limits = &state.config.limits;
    let deadline = Instant::now() + limits.auth_timeout;
    loop {
        match first_message(state, ws, deadline).await {
            First::Timeout => {
                state.metrics.error("unauthenticated");
                Refusal::unauthenticated("authentication timeout")
                    .send(state, ws)
                    .await;
                return None;
            }
            First::Gone => return None,
            First::Data(WsMessage::Text(t)) if t == "ping" => {
                if !write_ok(limits.write_timeout, ws.send_text(b"pong")).await {
                    return None;
                }
            }
            First::Data(WsMessage::Text(t)) => return Some(t),
            First::Close(code) => {
                send_close(ws, code.unwrap_or(close::NORMAL), "", limits.write_timeout).await;
                return None;
            }
            First::Data(_) => {
                state.metrics.error("bad_request");
                Refusal::bad("the first frame must be a JSON text frame")
                    .send(state, ws)
                    .await;
                return None;
            }
        }
    }
}

/// A bounded write that succeeded.
async fn write_ok<F: Future<Output = std::io::Result<()>>>(limit: Duration, fut: F) -> bool {
    bounded(limit, fut).await.is_ok_and(|r| r.is_ok())
}

/// The main loop (the shape of `/ws`'s, see [`crate::ws`]): client frames answered `pong`,
/// the queue drained and rendered, one timer for the heartbeat, the token expiry and a drain's
/// deferred close. Returns why the connection ended (a metric label).
async fn connection_loop(
    state: &Arc<AppState>,
    ws: &mut WsSocket,
    session: &Session,
    watch: &Watch,
) -> &'static str {
    let limits = &state.config.limits;
    let mut last_seen = Instant::now();
    let mut next_ping = Instant::now() + limits.heartbeat_interval;
    // Set when the node drains: close 1012 then (the client reconnects to another node).
    let mut leave_at: Option<Instant> = None;
    let due = |next_ping: Instant, expiry: Option<Instant>, leave: Option<Instant>| {
        [expiry, leave]
            .into_iter()
            .flatten()
            .fold(next_ping, Instant::min)
    };
    let mut timer: Pin<Box<Sleep>> =
        Box::pin(sleep_until(due(next_ping, session.expiry, leave_at).into()));
    let conn = session.conn.clone();
    let mut batch: Vec<Outgoing> = Vec::new();
    let mut deliveries = Deliveries::default();
    loop {
        tokio::select! {
            frame = ws.next() => {
                let frame = match frame {
                    Ok(None) | Err(WsError::Io(_)) => return "client",
                    Err(WsError::Frame(e)) => {
                        return close_for_frame_error(state, ws, &e, limits.write_timeout).await;
                    }
                    Ok(Some(f)) => f,
                };
                last_seen = Instant::now();
                let written = match frame {
                    // Seed 001: "the client sends anything (e.g. ping), the server answers pong".
                    WsMessage::Text(_) | WsMessage::Binary(_) => {
                        write_ok(limits.write_timeout, ws.send_text(b"pong")).await
                    }
                    WsMessage::Ping(p) => write_ok(limits.write_timeout, ws.send_pong(&p)).await,
                    WsMessage::Pong => true,
                    WsMessage::Close(code) => {
                        send_close(ws, code.unwrap_or(close::NORMAL), "", limits.write_timeout).await;
                        return "client";
                    }
                };
                if !written {
                    return "write_error";
                }
            }
            close = conn.queue.drain(&mut batch, BATCH) => {
                if !batch.is_empty() {
                    let (frames, leave_after) = render_batch(state, &conn, watch, &mut batch, &mut deliveries);
                    if !frames.is_empty() {
                        match bounded(limits.write_timeout, ws.write_frames(&frames)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return "write_error",
                            Err(_) => {
                                state.metrics.slow_consumers.increment(1);
                                return "write_timeout";
                            }
                        }
                    }
                    if let Some(after) = leave_after {
                        let at = Instant::now() + after;
                        leave_at = Some(leave_at.map_or(at, |l| l.min(at)));
                        timer.as_mut().reset(due(next_ping, session.expiry, leave_at).into());
                    }
                }
                if let Some(CloseRequest { code, reason }) = close {
                    send_close(ws, code, &reason, limits.write_timeout).await;
                    return close_label(code);
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if session.expiry.is_some_and(|e| now >= e) {
                    send_close(ws, close::TOKEN_EXPIRED, "token expired", limits.write_timeout).await;
                    return "token_expired";
                }
                if leave_at.is_some_and(|l| now >= l) {
                    send_close(ws, close::SERVICE_RESTART, "server restart", limits.write_timeout).await;
                    return "server_restart";
                }
                if now >= next_ping {
                    if last_seen.elapsed() >= limits.heartbeat_timeout {
                        send_close(ws, close::GOING_AWAY, "heartbeat timeout", limits.write_timeout).await;
                        return "heartbeat_timeout";
                    }
                    if !write_ok(limits.write_timeout, ws.send_ping()).await {
                        return "write_error";
                    }
                    next_ping = now + limits.heartbeat_interval;
                }
                timer.as_mut().reset(due(next_ping, session.expiry, leave_at).into());
            }
        }
    }
}

/// Renders a drained batch into text frames, with the delivery bookkeeping. Returns the
/// frames and, when a draining node's `reconnect` was among the items, its `after_ms`.
fn render_batch(
    state: &AppState,
    conn: &ConnHandle,
    watch: &Watch,
    batch: &mut Vec<Outgoing>,
    deliveries: &mut Deliveries,
) -> (Vec<Bytes>, Option<Duration>) {
    let mut written = deliveries.start(state);
    let mut frames = Vec::with_capacity(batch.len());
    let mut leave_after = None;
    for item in batch.drain(..) {
        match item {
            Outgoing::Message(m) => {
                // Only the device's topic: a user's inbox messages reach every connection of
                // the user, this one included, and are for the others.
                if m.topic != watch.topic {
                    continue;
                }
                let Some(f) = render(&m, watch.keys.as_deref()) else {
                    continue;
                };
                if deliveries.admit(state, conn, &m, &mut written) {
                    frames.push(f);
                }
            }
            Outgoing::Replay(m) | Outgoing::Retained(m) => {
                if m.topic != watch.topic {
                    continue;
                }
                if let Some(f) = render(&m, watch.keys.as_deref()) {
                    frames.push(f);
                }
            }
            Outgoing::Frame(f) => {
                if let Some(after) = reconnect_after(&f) {
                    leave_after = Some(leave_after.map_or(after, |a: Duration| a.min(after)));
                }
            }
        }
    }
    Deliveries::written(state, conn, written);
    (frames, leave_after)
}

/// `after_ms` of a JSON v1 `reconnect` frame (a draining node's); `None` for any other frame.
fn reconnect_after(frame: &[u8]) -> Option<Duration> {
    #[derive(Deserialize)]
    struct Reconnect<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(default)]
        after_ms: u64,
    }
    let r: Reconnect = serde_json::from_slice(frame).ok()?;
    (r.kind == "reconnect").then(|| Duration::from_millis(r.after_ms))
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// The text frame pushed for `m` (see the module doc); `None` when `keys` leaves no field.
fn render(m: &Message, keys: Option<&[Box<str>]>) -> Option<Bytes> {
    let json = render_json(m.data.get(), m.ts, keys)?;
    Some(frame::encode(OpCode::Text, &json))
}

/// The pushed object for message data `data` published at `ts` (Unix ms).
fn render_json(data: &str, ts: u64, keys: Option<&[Box<str>]>) -> Option<Vec<u8>> {
    let kept =
        |name: &str| name != "systime" && keys.is_none_or(|k| k.iter().any(|k| &**k == name));
    let mut out = Vec::with_capacity(data.len() + 48);
    out.push(b'{');
    let mut any = false;
    let systime_ms = match serde_json::from_str::<Fields>(data) {
        Ok(Fields(outer)) => {
            let (fields, at) = match envelope(&outer) {
                Some((inner, at)) => (inner, at.unwrap_or(ts)),
                None => (outer, ts),
            };
            for (name, value) in fields.iter().filter(|(n, _)| kept(n)) {
                push_field(&mut out, name, value.get())?;
                any = true;
            }
            at
        }
        // Not an object: a scalar or an array.
        Err(_) => {
            if kept("value") {
                push_field(&mut out, "value", data)?;
                any = true;
            }
            ts
        }
    };
    if !any && keys.is_some() {
        return None;
    }
    out.extend_from_slice(b"\"systime\":\"");
    out.extend_from_slice(rfc3339(systime_ms).as_bytes());
    out.extend_from_slice(b"\"}");
    Some(out)
}

/// `"name":value,` into `out`.
fn push_field(out: &mut Vec<u8>, name: &str, value: &str) -> Option<()> {
    serde_json::to_writer(&mut *out, name).ok()?;
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
    out.push(b',');
    Some(())
}

/// The seed-001 envelope `{device_id, tenant_id, timestamp, data:{…}}`: the inner fields,
/// and the time `timestamp` gives (Unix ms) when it is a usable number.
fn envelope<'a>(outer: &[Field<'a>]) -> Option<(Vec<Field<'a>>, Option<u64>)> {
    let get = |name: &str| outer.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    get("device_id")?;
    let inner = get("data")?;
    if !inner.get().trim_start().starts_with('{') {
        return None;
    }
    let Fields(fields) = serde_json::from_str(inner.get()).ok()?;
    Some((fields, get("timestamp").and_then(timestamp_ms)))
}

/// A Unix timestamp in seconds (a fraction allowed), or in milliseconds when over 10^12, as
/// Unix ms; `None` when negative, not a number or past year 9999.
fn timestamp_ms(raw: &RawValue) -> Option<u64> {
    let n: serde_json::Number = serde_json::from_str(raw.get()).ok()?;
    let ms = if let Some(i) = n.as_u64() {
        if i > 1_000_000_000_000 {
            i
        } else {
            i.checked_mul(1000)?
        }
    } else {
        let f = n.as_f64()?;
        if !f.is_finite() || f < 0.0 {
            return None;
        }
        let ms = if f > 1e12 { f } else { f * 1000.0 };
        ms.round() as u64
    };
    (ms <= MAX_SYSTIME_MS).then_some(ms)
}

/// Unix milliseconds as RFC 3339 UTC: `2025-01-20T10:30:00Z`, or `…00.123Z` (exactly three
/// digits) when the time is not a whole second.
pub fn rfc3339(ms: u64) -> String {
    use time::format_description::BorrowedFormatItem;
    use time::macros::format_description;
    const WHOLE: &[BorrowedFormatItem<'_>] =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    const MILLIS: &[BorrowedFormatItem<'_>] =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let ms = ms.min(MAX_SYSTIME_MS);
    let format = if ms.is_multiple_of(1000) {
        WHOLE
    } else {
        MILLIS
    };
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format).ok())
        // Unreachable: `MAX_SYSTIME_MS` is within year 9999, which the format can write.
        .unwrap_or_else(|| "9999-12-31T23:59:59.999Z".to_owned())
}

/// One field of a JSON object: its name (borrowed unless it had escapes) and raw value.
type Field<'a> = (Cow<'a, str>, &'a RawValue);

/// A JSON object's fields in document order, a repeated name keeping its last value.
struct Fields<'a>(Vec<Field<'a>>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut fields: Vec<Field<'de>> = Vec::new();
                while let Some(Name(name)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((name, value));
                }
                dedupe(&mut fields);
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Keeps the last of fields with the same name (at its own position), as a JSON object
/// decoder would.
fn dedupe(fields: &mut Vec<Field<'_>>) {
    let n = fields.len();
    let keep: Vec<bool> = if n <= 16 {
        // Small objects (the usual telemetry): no map.
        (0..n)
            .map(|i| !fields[i + 1..].iter().any(|(k, _)| *k == fields[i].0))
            .collect()
    } else {
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(n);
        for (i, (k, _)) in fields.iter().enumerate() {
            last.insert(k, i);
        }
        if last.len() == n {
            return;
        }
        (0..n)
            .map(|i| last.get(&*fields[i].0) == Some(&i))
            .collect()
    };
    if keep.iter().all(|k| *k) {
        return;
    }
    let mut i = 0;
    fields.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pushed(data: Value, ts: u64, keys: Option<&[&str]>) -> Option<Value> {
        let keys: Option<Vec<Box<str>>> = keys.map(|k| k.iter().map(|s| (*s).into()).collect());
        let out = render_json(&data.to_string(), ts, keys.as_deref())?;
        Some(serde_json::from_slice(&out).expect("valid JSON"))
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_737_369_000_000), "2025-01-20T10:30:00Z");
        assert_eq!(rfc3339(1_737_369_005_123), "2025-01-20T10:30:05.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn envelope_gives_inner_fields_and_its_time() {
        let env = json!({"device_id":"d-1","tenant_id":"t","timestamp":1_737_369_000u64,
            "data":{"temperature":25.5,"humidity":60,"systime":"old"}});
        let v = pushed(env.clone(), 5, None).unwrap();
        assert_eq!(
            v,
            json!({"temperature":25.5,"humidity":60,"systime":"2025-01-20T10:30:00Z"})
        );
        // Milliseconds, fractions, and no usable timestamp.
        let mut e = env.clone();
        e["timestamp"] = json!(1_737_369_000_250u64);
        assert_eq!(
            pushed(e, 5, None).unwrap()["systime"],
            "2025-01-20T10:30:00.250Z"
        );
        let mut e = env.clone();
        e["timestamp"] = json!(1_737_369_000.5);
        assert_eq!(
            pushed(e, 5, None).unwrap()["systime"],
            "2025-01-20T10:30:00.500Z"
        );
        for bad in [json!(-1), json!("yesterday"), json!(1e300)] {
            let mut e = env.clone();
            e["timestamp"] = bad;
            assert_eq!(
                pushed(e, 1_000, None).unwrap()["systime"],
                "1970-01-01T00:00:01Z"
            );
        }
    }

    #[test]
    fn plain_objects_scalars_and_keys() {
        let v = pushed(json!({"a":1,"b":{"c":2}}), 1_000, None).unwrap();
        assert_eq!(
            v,
            json!({"a":1,"b":{"c":2},"systime":"1970-01-01T00:00:01Z"})
        );
        // Without device_id (or with a non-object data) it is not the envelope.
        let v = pushed(json!({"data":{"x":1}}), 0, None).unwrap();
        assert_eq!(v["data"], json!({"x":1}));
        let v = pushed(json!({"device_id":"d","data":5}), 0, None).unwrap();
        assert_eq!(v["data"], 5);
        assert_eq!(
            pushed(json!(42), 0, None).unwrap(),
            json!({"value":42,"systime":"1970-01-01T00:00:00Z"})
        );
        assert_eq!(
            pushed(json!([1, 2]), 0, None).unwrap()["value"],
            json!([1, 2])
        );
        let v = pushed(json!({"a":1,"b":2,"c":3}), 0, Some(&["c", "a", "z"])).unwrap();
        assert_eq!(v, json!({"a":1,"c":3,"systime":"1970-01-01T00:00:00Z"}));
        assert!(pushed(json!({"b":2}), 0, Some(&["a"])).is_none());
        assert!(pushed(json!(1), 0, Some(&["a"])).is_none());
        assert!(pushed(json!(1), 0, Some(&["value"])).is_some());
    }

    #[test]
    fn order_escapes_and_duplicates() {
        let out = render_json(r#"{"z":1,"a\"b":2,"z":3,"m":4}"#, 0, None).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a\"b":2,"z":3,"m":4,"systime":"1970-01-01T00:00:00Z"}"#
        );
        let many: String = (0..40).map(|i| format!("\"k{}\":{i},", i % 20)).collect();
        let out = render_json(&format!("{{{}\"end\":0}}", many), 0, None).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 22);
        assert_eq!(v["k3"], 23);
    }

    #[test]
    fn first_frames() {
        let ok = |t: &str, e| parse_first_frame(t, e).map_err(|r| (r.code, r.message, r.close));
        let (w, c) = ok(r#"{"device_id":"d-1","token":"t"}"#, Endpoint::Current).unwrap();
        assert_eq!(
            (w.topic.as_str(), c.as_deref()),
            ("device/d-1/telemetry", Some("t"))
        );
        assert!(w.keys.is_none());
        let (_, c) = ok(r#"{"device_id":"d-1","api_key":"k"}"#, Endpoint::Current).unwrap();
        assert_eq!(c.as_deref(), Some("k"));
        let (w, c) = ok(r#"{"device_id":"d-1","keys":["t","h"]}"#, Endpoint::Keys).unwrap();
        assert_eq!(w.keys.unwrap().len(), 2);
        assert!(c.is_none());
        let bad = |t: &str, e| ok(t, e).err().expect("refused");
        assert_eq!(bad("hello", Endpoint::Current).0, 400);
        assert_eq!(bad("[]", Endpoint::Current).0, 400);
        assert_eq!(
            bad(r#"{"device_id":7,"token":"t"}"#, Endpoint::Current).1,
            "the first frame must be a JSON object {\"device_id\":…,\"token\":…}: \
             invalid type: integer `7`, expected a string at line 1 column 14"
        );
        assert_eq!(
            bad(r#"{"token":"t"}"#, Endpoint::Current).1,
            "device_id is required"
        );
        assert!(
            bad(r#"{"device_id":"a/b"}"#, Endpoint::Current)
                .1
                .contains("segment")
        );
        assert!(
            bad(r#"{"device_id":"d"}"#, Endpoint::Keys)
                .1
                .contains("keys is required")
        );
        assert!(
            bad(r#"{"device_id":"d","keys":[]}"#, Endpoint::Keys)
                .1
                .contains("empty")
        );
        assert!(
            bad(r#"{"device_id":"d","keys":[""]}"#, Endpoint::Keys)
                .1
                .contains("1-256")
        );
        assert_eq!(
            bad(r#"{"device_id":"d","keys":"t"}"#, Endpoint::Keys).2,
            1008
        );
        let many =
            serde_json::to_string(&(0..65).map(|i| i.to_string()).collect::<Vec<_>>()).unwrap();
        assert!(
            bad(
                &format!(r#"{{"device_id":"d","keys":{many}}}"#),
                Endpoint::Keys
            )
            .1
            .contains("64")
        );
        let (w, _) = ok(r#"{"device_id":"d","keys":[]}"#, Endpoint::Current).unwrap();
        assert!(w.keys.is_none());
        assert_eq!(
            reconnect_after(br#"{"type":"reconnect","reason":"x","after_ms":7}"#),
            Some(Duration::from_millis(7))
        );
        assert_eq!(reconnect_after(br#"{"type":"pong"}"#), None);
        assert_eq!(close_reason(&"é".repeat(100)).len(), 120);
    }
}
