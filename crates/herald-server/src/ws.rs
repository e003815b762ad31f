//! The JSON v1 WebSocket endpoint (`/ws`): handshake, authentication, and the connection task.
//!
//! # Handshake
//! The upgrade is checked before anything is allocated for the connection: draining node
//! (503), per-IP rate (429), origin (403), WebSocket headers (400), subprotocol (400), and a
//! credential given in the `Authorization` header or the `token`/`api_key` query parameter
//! (401 with a JSON body, no upgrade). Without a credential the connection is upgraded and must
//! send `{"type":"auth","token":…}` within `limits.auth_timeout` (else close 4001).
//!
//! # The connection task
//! One task per connection owns the socket. It waits on four things at once:
//! - a client frame (requests are handled inline; their replies go through the queue so that
//!   replies and messages leave in one order and are coalesced into one flush);
//! - the connection's [`ConnQueue`](herald_core::queue::ConnQueue), drained in batches: a
//!   batch leaves in one vectored write of frames encoded before (a message's WebSocket frame
//!   is encoded once and shared by every subscriber; see [`crate::wsio`]);
//! - the heartbeat tick: a Ping every `heartbeat_interval`; a client silent (no frame, no pong)
//!   for `heartbeat_timeout` is closed with 1001;
//! - token expiry: closed with 4010 unless an `auth` frame refreshed it.
//!
//! Writes are bounded by `limits.write_timeout`: a socket that does not drain is dropped, so a
//! client that never reads costs a bounded queue and a bounded socket buffer, never a stuck task.
//! What must stay true: the hub never waits on this task, and this task never holds a hub lock
//! across an await (it calls only the hub's synchronous methods).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt;
use herald_core::error::{Error, Origin};
use herald_core::hub::ConnHandle;
use herald_core::identity::{Authenticated, Authenticator};
use herald_core::queue::{CloseRequest, Outgoing};
use herald_core::topic::Topic;
use herald_proto::close;
use herald_proto::json::{self, ClientFrame, PONG, Request as ClientRequest, Subscribe};
use herald_proto::ws::{self as frame, FrameError, Message as WsMessage, OpCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::time::{Sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite;

use crate::api::json_error;
use crate::session::{self, Deliveries, Flow, Refused, Session, bounded, close_label};
use crate::state::AppState;
use crate::wsio::{WsError, WsSocket};

type Ws = WsSocket;
type Ctx = Session;

/// Frames written per batch (one vectored write when the socket takes them all).
const BATCH: usize = 256;
/// Batch capacity kept between bursts.
const KEEP_BATCH: usize = 16;

/// `GET /ws`.
pub async fn handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let key = match admit(&state, peer, req.headers()) {
        Ok(k) => k,
        Err(res) => return res,
    };
    let protocol = match negotiate_subprotocol(req.headers()) {
        Ok(Chosen::Json(p)) => p,
        Ok(Chosen::Stomp(p)) => return crate::stomp::accept(state, peer, req, key, Some(p)),
        Err(msg) => return json_error(StatusCode::BAD_REQUEST, msg),
    };
    let pre_auth = match handshake_credential(&state, peer, &req) {
        Ok(a) => a,
        Err(res) => return res,
    };
    let task_state = state.clone();
    upgrade(&state, peer, req, &key, protocol, move |ws| {
        run_connection(task_state, ws, pre_auth, peer)
    })
}

/// The checks of every WebSocket handshake, before anything is allocated for the connection:
/// [`admit_client`], then the WebSocket headers (400). Returns the `Sec-WebSocket-Key`.
#[allow(clippy::result_large_err)] // the refusal is the handler's answer, built once
pub(crate) fn admit(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<String, Response> {
    admit_client(state, peer, headers)?;
    check_upgrade_headers(headers).map_err(|msg| json_error(StatusCode::BAD_REQUEST, msg))
}

/// A credential given in a WebSocket handshake (`Authorization: Bearer`, `?token=`,
/// `?api_key=`), checked: `None` when there is none (the client authenticates after the
/// upgrade), 401 with a JSON body and no upgrade when it is refused.
#[allow(clippy::result_large_err)] // the refusal is the handler's answer, built once
pub(crate) fn handshake_credential(
    state: &AppState,
    peer: SocketAddr,
    req: &Request,
) -> Result<Option<Box<Authenticated>>, Response> {
    let Some(c) = credential_from(req.headers(), req.uri().query()) else {
        return Ok(None);
    };
    match state.auth.authenticate(&c) {
        Ok(a) => Ok(Some(Box::new(a))),
        Err(e) => {
            state.metrics.error("unauthenticated");
            tracing::debug!(%peer, path = req.uri().path(), error = %e, "handshake refused");
            Err(json_error(StatusCode::UNAUTHORIZED, &e.to_string()))
        }
    }
}

/// The checks of every client request (WebSocket handshake, SSE stream, poll), before
/// anything is allocated for it: draining node (503), per-IP connection rate (429), origin
/// (403).
#[allow(clippy::result_large_err)] // the refusal is the handler's answer, built once
pub(crate) fn admit_client(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), Response> {
    if state.is_draining() {
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "node draining, reconnect elsewhere",
        ));
    }
    if !state.limiters.connection(peer.ip()) {
        state.metrics.error("rate_limited");
        return Err(json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this address",
        ));
    }
    check_origin(state, headers)
}

/// `server.allowed_origins` (when set) against the request's `Origin` (403).
#[allow(clippy::result_large_err)] // the refusal is the handler's answer, built once
pub(crate) fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let origins = &state.config.server.allowed_origins;
    if !origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if let Some(o) = origin
            && !origins.iter().any(|a| a == o)
        {
            return Err(json_error(StatusCode::FORBIDDEN, "origin not allowed"));
        }
    }
    Ok(())
}

/// Answers 101 and runs `task` on the upgraded socket, in a task tracked for the drain.
pub(crate) fn upgrade<F, Fut>(
    state: &AppState,
    peer: SocketAddr,
    mut req: Request,
    key: &str,
    protocol: Option<&'static str>,
    task: F,
) -> Response
where
    F: FnOnce(WsSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let on_upgrade = hyper::upgrade::on(&mut req);
    let max = state.config.limits.max_message_size;
    state.tasks.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "upgrade failed");
                return;
            }
        };
        // Our accept loop serves plain TCP sockets, so this always succeeds.
        let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(p) => p,
            Err(_) => {
                tracing::warn!(%peer, "upgraded connection is not a TCP socket");
                return;
            }
        };
        task(WsSocket::new(parts.io.into_inner(), parts.read_buf, max)).await;
    });

    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&tungstenite::handshake::derive_accept_key(key.as_bytes()))
    {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    res
}

fn check_upgrade_headers(h: &HeaderMap) -> Result<String, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err("expected a WebSocket upgrade request");
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err("unsupported WebSocket version (need 13)");
    }
    h.get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or("missing Sec-WebSocket-Key")
}

/// What a `/ws` handshake chose.
enum Chosen {
    /// JSON v1 (`herald.json.v1` asked for, or no subprotocol at all).
    Json(Option<&'static str>),
    /// STOMP (`v12.stomp`, `v11.stomp` or `v10.stomp`, and not `herald.json.v1`).
    Stomp(&'static str),
}

/// `herald.json.v1` when asked for (or nothing asked), else a STOMP subprotocol; any other
/// list is refused.
fn negotiate_subprotocol(h: &HeaderMap) -> Result<Chosen, &'static str> {
    let Some(asked) = crate::stomp::asked_subprotocols(h) else {
        return Ok(Chosen::Json(None));
    };
    if asked.contains(&json::SUBPROTOCOL) {
        return Ok(Chosen::Json(Some(json::SUBPROTOCOL)));
    }
    match crate::stomp::SUBPROTOCOLS
        .iter()
        .find(|p| asked.contains(p))
    {
        Some(p) => Ok(Chosen::Stomp(p)),
        None => Err(
            "unsupported subprotocol (supported: herald.json.v1, v12.stomp, v11.stomp, v10.stomp)",
        ),
    }
}

/// The credential of a handshake: `Authorization: Bearer`, then `?token=`, then `?api_key=`.
pub(crate) fn credential_from(h: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(t) = crate::auth::bearer_token(v)
    {
        return Some(t.to_owned());
    }
    let query = query?;
    let mut api_key = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned();
        match k {
            "token" if !v.is_empty() => return Some(v),
            "api_key" if !v.is_empty() => api_key = Some(v),
            _ => {}
        }
    }
    api_key
}

/// Send a close frame, bounded by the write timeout; errors are irrelevant now.
pub(crate) async fn send_close(ws: &mut Ws, code: u16, reason: &str, limit: Duration) {
    // Boxed: once per connection, and kept out of every connection's own future.
    let _ = Box::pin(timeout(limit, ws.close(code, reason))).await;
}

/// Answers a client that broke the framing rules: 1009 for a frame or message over
/// `max_message_size`, 1002 or 1007 for the rest. Returns the metric label.
pub(crate) async fn close_for_frame_error(
    state: &AppState,
    ws: &mut Ws,
    e: &FrameError,
    limit: Duration,
) -> &'static str {
    let (kind, label) = match e {
        FrameError::TooLarge => ("too_large", "too_large"),
        _ => ("malformed_frame", "protocol_error"),
    };
    state.metrics.error(kind);
    send_close(ws, e.close_code(), e.reason(), limit).await;
    label
}

/// What the wait for a client's first data message gave ([`first_message`]).
pub(crate) enum First {
    Data(WsMessage),
    /// The deadline passed: the caller refuses the connection its own way.
    Timeout,
    /// The client sent a Close (its code): the caller answers it.
    Close(Option<u16>),
    /// The connection is gone or was closed here (a framing error is answered with
    /// 1002/1007/1009 and counted).
    Gone,
}

/// Waits until `deadline` for the client's first Text or Binary message, answering Pings and
/// skipping Pongs meanwhile: the common start of every WebSocket transport's handshake
/// frame (JSON v1 `auth`, STOMP `CONNECT`, the telemetry first frame).
pub(crate) async fn first_message(state: &AppState, ws: &mut Ws, deadline: Instant) -> First {
    let limit = state.config.limits.write_timeout;
    loop {
        match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Err(_) => return First::Timeout,
            Ok(Err(WsError::Frame(e))) => {
                close_for_frame_error(state, ws, &e, limit).await;
                return First::Gone;
            }
            Ok(Ok(None)) | Ok(Err(WsError::Io(_))) => return First::Gone,
            Ok(Ok(Some(WsMessage::Ping(p)))) => {
                if bounded(limit, ws.send_pong(&p))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return First::Gone;
                }
            }
            Ok(Ok(Some(WsMessage::Pong))) => {}
            Ok(Ok(Some(WsMessage::Close(code)))) => return First::Close(code),
            Ok(Ok(Some(m))) => return First::Data(m),
        }
    }
}

/// First-frame authentication, within `auth_timeout`. On failure the connection is closed
/// with 4001 here.
async fn authenticate_first_frame(state: &AppState, ws: &mut Ws) -> Option<Authenticated> {
    let limits = &state.config.limits;
    let deadline = Instant::now() + limits.auth_timeout;
    let text = match first_message(state, ws, deadline).await {
        First::Data(WsMessage::Text(t)) => t,
        First::Timeout => {
            send_close(
                ws,
                close::UNAUTHENTICATED,
                "authentication timeout",
                limits.write_timeout,
            )
            .await;
            return None;
        }
        First::Gone => return None,
        First::Data(_) | First::Close(_) => {
            send_close(
                ws,
                close::UNAUTHENTICATED,
                "authenticate first",
                limits.write_timeout,
            )
            .await;
            return None;
        }
    };
    let reason = match json::parse_request(&text) {
        Ok(ClientRequest {
            frame: ClientFrame::Auth { token },
            ..
        }) => match state.auth.authenticate(&token) {
            Ok(a) => return Some(a),
            Err(e) => e.to_string(),
        },
        Ok(_) => "authenticate first".to_owned(),
        Err(e) => e.message,
    };
    state.metrics.error("unauthenticated");
    send_close(ws, close::UNAUTHENTICATED, &reason, limits.write_timeout).await;
    None
}

/// The connection task. What it holds while the connection lives is what every idle
/// connection costs, so the one-off work (authentication, registration, welcome, inbox
/// replay) runs in a boxed future of its own and only the loop's state remains.
async fn run_connection(
    state: Arc<AppState>,
    mut ws: Ws,
    pre_auth: Option<Box<Authenticated>>,
    peer: SocketAddr,
) {
    let Some(mut ctx) = Box::pin(open_session(&state, &mut ws, pre_auth, peer)).await else {
        return;
    };
    let reason = connection_loop(&state, &mut ws, &mut ctx).await;
    state.metrics.connection_closed(reason);
    tracing::debug!(conn_id = ctx.conn_id, user = %ctx.conn.user, reason, "disconnected");
}

/// Authenticates (unless the handshake did), opens the session (registration, the user's
/// connection limit, implicit subscriptions), welcomes, and queues the durable inbox replay.
/// `None`: the connection was closed here.
async fn open_session(
    state: &Arc<AppState>,
    ws: &mut Ws,
    pre_auth: Option<Box<Authenticated>>,
    peer: SocketAddr,
) -> Option<Ctx> {
    let limits = &state.config.limits;
    let auth = match pre_auth {
        Some(a) => *a,
        None => authenticate_first_frame(state, ws).await?,
    };
    let session = match session::open(state, auth, session::Transport::Json).await {
        Ok(s) => s,
        Err(Refused::TooManyConnections) => {
            send_close(
                ws,
                close::TOO_MANY_CONNECTIONS,
                "too many connections for this user",
                limits.write_timeout,
            )
            .await;
            return None;
        }
    };
    let welcome = json::encode_welcome(
        &session.conn_id,
        &session.conn.user,
        &state.node_id,
        limits.heartbeat_interval.as_millis() as u64,
    );
    if bounded(limits.write_timeout, ws.send_text(&welcome))
        .await
        .map_or(true, |r| r.is_err())
    {
        return None;
    }
    tracing::debug!(%peer, conn_id = session.conn_id, user = %session.conn.user, "connected");
    session.replay_inbox(state, None).await;
    Some(session)
}

/// The main loop; returns why the connection ended (a metric label).
async fn connection_loop(state: &Arc<AppState>, ws: &mut Ws, ctx: &mut Ctx) -> &'static str {
    let limits = &state.config.limits;
    let mut last_seen = Instant::now();
    // One timer per connection for both the heartbeat and the token expiry: it fires at
    // whichever comes first.
    let mut next_ping = Instant::now() + limits.heartbeat_interval;
    let due = |next_ping: Instant, expiry: Option<Instant>| {
        expiry.map_or(next_ping, |e| e.min(next_ping))
    };
    let mut timer: Pin<Box<Sleep>> = Box::pin(sleep_until(due(next_ping, ctx.expiry).into()));
    let conn = ctx.conn.clone();
    let mut batch: Vec<Outgoing> = Vec::new();
    let mut recent_durable = Deliveries::default();
    loop {
        tokio::select! {
            frame = ws.next() => {
                let frame = match frame {
                    Ok(None) => return "client",
                    Err(WsError::Frame(e)) => {
                        return close_for_frame_error(state, ws, &e, limits.write_timeout).await;
                    }
                    Err(WsError::Io(_)) => return "client",
                    Ok(Some(f)) => f,
                };
                last_seen = Instant::now();
                let flow = match frame {
                    // Boxed: requests are rare and their futures large; the idle connection's
                    // own future stays small.
                    WsMessage::Text(t) => Box::pin(handle_text(state, ctx, &t)).await,
                    WsMessage::Binary(_) => reject(state, ctx, None, Error::BadRequest("binary frames are not supported by herald.json.v1".into())),
                    WsMessage::Close(code) => {
                        // Echo the close (RFC 6455 §5.5.1), then end.
                        send_close(ws, code.unwrap_or(close::NORMAL), "", limits.write_timeout).await;
                        return "client";
                    }
                    WsMessage::Ping(p) => {
                        if bounded(limits.write_timeout, ws.send_pong(&p)).await.map_or(true, |r| r.is_err()) {
                            return "write_error";
                        }
                        Flow::Continue
                    }
                    // Pongs only prove liveness.
                    WsMessage::Pong => Flow::Continue,
                };
                if let Flow::Close(code, reason) = flow {
                    // The replies already queued (e.g. the errors that led here) go out first.
                    if conn.queue.drain(&mut batch, usize::MAX).now_or_never().is_some() && !batch.is_empty() {
                        let _ = Box::pin(timeout(limits.write_timeout, write_batch(state, ws, &conn, &mut batch, &mut recent_durable))).await;
                    }
                    send_close(ws, code, &reason, limits.write_timeout).await;
                    return if code == close::POLICY { "policy" } else { "server" };
                }
                if ctx.expiry_changed {
                    ctx.expiry_changed = false;
                    timer.as_mut().reset(due(next_ping, ctx.expiry).into());
                }
            }
            close = conn.queue.drain(&mut batch, BATCH) => {
                if !batch.is_empty() {
                    let write = write_batch(state, ws, &conn, &mut batch, &mut recent_durable);
                    match bounded(limits.write_timeout, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return "write_error",
                        Err(_) => {
                            state.metrics.slow_consumers.increment(1);
                            return "write_timeout";
                        }
                    }
                }
                if let Some(CloseRequest { code, reason }) = close {
                    send_close(ws, code, &reason, limits.write_timeout).await;
                    return close_label(code);
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if ctx.expiry.is_some_and(|e| now >= e) {
                    send_close(ws, close::TOKEN_EXPIRED, "token expired", limits.write_timeout).await;
                    return "token_expired";
                }
                if now >= next_ping {
                    if last_seen.elapsed() >= limits.heartbeat_timeout {
                        send_close(ws, close::GOING_AWAY, "heartbeat timeout", limits.write_timeout).await;
                        return "heartbeat_timeout";
                    }
                    if bounded(limits.write_timeout, ws.send_ping()).await.map_or(true, |r| r.is_err()) {
                        return "write_error";
                    }
                    next_ping = now + limits.heartbeat_interval;
                }
                timer.as_mut().reset(due(next_ping, ctx.expiry).into());
            }
        }
    }
}

/// Feed a drained batch to the socket and flush once.
async fn write_batch(
    state: &AppState,
    ws: &mut Ws,
    conn: &ConnHandle,
    batch: &mut Vec<Outgoing>,
    deliveries: &mut Deliveries,
) -> std::io::Result<()> {
    let mut written = deliveries.start(state);
    let mut frames: Vec<Bytes> = Vec::with_capacity(batch.len());
    for item in batch.drain(..) {
        let frame = match item {
            Outgoing::Message(m) => {
                if !deliveries.admit(state, conn, &m, &mut written) {
                    continue;
                }
                m.ws_frame().clone()
            }
            Outgoing::Replay(m) => {
                Deliveries::replayed(&mut written);
                m.ws_frame().clone()
            }
            Outgoing::Retained(m) => frame::encode(OpCode::Text, &m.json_frame_retained()),
            Outgoing::Frame(f) => frame::encode(OpCode::Text, &f),
        };
        frames.push(frame);
    }
    ws.write_frames(&frames).await?;
    if batch.capacity() > KEEP_BATCH {
        // An idle connection keeps no burst-sized buffer.
        *batch = Vec::new();
    }
    Deliveries::written(state, conn, written);
    Ok(())
}

/// Answer a failed request: a `reply` when it had an id, else an `error` frame. Counts the
/// error and closes with 4008 when the client keeps sending bad frames.
fn reject(state: &AppState, ctx: &mut Ctx, id: Option<&Value>, err: Error) -> Flow {
    state.metrics.error(err.kind());
    if err.origin() != Origin::Client {
        tracing::warn!(conn_id = ctx.conn_id, error = %err, "request failed");
    }
    let frame = match id {
        Some(id) => json::encode_reply(id, err.code(), &err.to_string(), None),
        None => json::encode_error(err.code(), &err.to_string()),
    };
    ctx.conn.queue.push_frame(frame);
    ctx.count_abuse(state, &err)
}

fn reply_ok(ctx: &Ctx, id: Option<&Value>, extra: Option<&Map<String, Value>>) {
    if let Some(id) = id {
        ctx.conn
            .queue
            .push_frame(json::encode_reply(id, 0, "ok", extra));
    }
}

async fn handle_text(state: &Arc<AppState>, ctx: &mut Ctx, text: &str) -> Flow {
    if text == "ping" {
        ctx.conn.queue.push_frame(Bytes::from_static(b"pong"));
        return Flow::Continue;
    }
    let req = match json::parse_request(text) {
        Ok(r) => r,
        Err(e) => {
            state.metrics.error("malformed_frame");
            let frame = match &e.id {
                Some(id) => json::encode_reply(id, 400, &e.message, None),
                None => json::encode_error(400, &e.message),
            };
            ctx.conn.queue.push_frame(frame);
            return ctx.count_abuse(state, &Error::BadRequest(e.message));
        }
    };
    let id = req.id.as_ref();
    let result = match req.frame {
        ClientFrame::Subscribe(s) => return subscribe(state, ctx, id, s).await,
        ClientFrame::Unsubscribe { topics } => ctx.unsubscribe(state, &topics).map(|()| None),
        ClientFrame::JoinRoom { room } => match Topic::room(&room) {
            Ok(t) => {
                return subscribe_topics(state, ctx, id, vec![t.as_str().to_owned()], None, true)
                    .await;
            }
            Err(e) => Err(Error::Topic(e)),
        },
        ClientFrame::LeaveRoom { room } => match Topic::room(&room) {
            Ok(t) => {
                state.hub.unsubscribe(&ctx.conn, t.as_str());
                Ok(None)
            }
            Err(e) => Err(Error::Topic(e)),
        },
        ClientFrame::Publish { topic, event, data } => ctx
            .publish(state, topic, event, data)
            .await
            .map(|(id, seq)| {
                let mut extra = Map::new();
                extra.insert("message_id".into(), Value::String(id));
                if let Some(seq) = seq {
                    extra.insert("seq".into(), json!(seq));
                }
                Some(extra)
            }),
        ClientFrame::Ack { ids } => ctx
            .ack(state, &ids)
            .await
            .map(|n| Some(obj(json!({ "acked": n })))),
        ClientFrame::Auth { token } => ctx
            .refresh(state, &token)
            .map(|exp| exp.map(|e| obj(json!({ "expires_at": e })))),
        ClientFrame::Command {
            command,
            trace_id,
            data,
        } => ctx
            .command(state, &command, trace_id, &data)
            .map(|trace_id| Some(obj(json!({ "trace_id": trace_id })))),
        ClientFrame::Ping => {
            ctx.conn
                .queue
                .push_frame(Bytes::from_static(PONG.as_bytes()));
            return Flow::Continue;
        }
    };
    match result {
        Ok(extra) => {
            reply_ok(ctx, id, extra.as_ref());
            Flow::Continue
        }
        Err(e) => reject(state, ctx, id, e),
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn subscribe(state: &Arc<AppState>, ctx: &mut Ctx, id: Option<&Value>, s: Subscribe) -> Flow {
    subscribe_topics(state, ctx, id, s.topics, s.since, s.snapshot).await
}

/// Subscribe to each topic (ACL, limits, history, retained), answering one reply for the
/// request: for one topic its own fields; for a batch, code 0 when all succeeded (else the
/// first failing code) and per-topic `results` in order.
async fn subscribe_topics(
    state: &Arc<AppState>,
    ctx: &mut Ctx,
    id: Option<&Value>,
    topics: Vec<String>,
    since: Option<u64>,
    snapshot: bool,
) -> Flow {
    if let Err(e) = ctx.may_subscribe(state) {
        return reject(state, ctx, id, e);
    }
    let mut results = Vec::with_capacity(topics.len());
    for raw in &topics {
        results.push(subscribe_one(state, ctx, raw, since, snapshot).await);
    }
    if topics.len() == 1 {
        return match results.pop() {
            Some(Ok(extra)) => {
                reply_ok(ctx, id, Some(&extra));
                Flow::Continue
            }
            Some(Err(e)) => reject(state, ctx, id, e),
            None => Flow::Continue,
        };
    }
    let mut list = Vec::with_capacity(results.len());
    let mut first: Option<(u16, String)> = None;
    let mut flow = Flow::Continue;
    for (raw, r) in topics.iter().zip(results) {
        match r {
            Ok(mut extra) => {
                extra.insert("code".into(), json!(0));
                extra.insert("message".into(), json!("ok"));
                list.push(Value::Object(extra));
            }
            Err(e) => {
                state.metrics.error(e.kind());
                if let Flow::Close(c, m) = ctx.count_abuse(state, &e) {
                    flow = Flow::Close(c, m);
                }
                first.get_or_insert_with(|| (e.code(), e.to_string()));
                list.push(json!({ "topic": raw, "code": e.code(), "message": e.to_string() }));
            }
        }
    }
    let mut extra = Map::new();
    extra.insert("results".into(), Value::Array(list));
    let (code, message) = first.unwrap_or((0, "ok".to_owned()));
    match id {
        Some(id) => {
            ctx.conn
                .queue
                .push_frame(json::encode_reply(id, code, &message, Some(&extra)));
        }
        None if code != 0 => {
            ctx.conn
                .queue
                .push_frame(json::encode_error(code, &message));
        }
        None => {}
    }
    flow
}

/// One topic of a subscribe, as JSON v1 reply fields.
async fn subscribe_one(
    state: &AppState,
    ctx: &Ctx,
    raw: &str,
    since: Option<u64>,
    snapshot: bool,
) -> Result<Map<String, Value>, Error> {
    let s = ctx.subscribe(state, raw, since, snapshot).await?;
    let mut extra = Map::new();
    extra.insert("topic".into(), Value::String(s.topic.as_str().to_owned()));
    if let Some(seq) = s.seq {
        extra.insert("seq".into(), json!(seq));
    }
    if let Some(r) = s.recovered {
        extra.insert("recovered".into(), Value::Bool(r));
    }
    Ok(extra)
}
