//! STOMP 1.2 over WebSocket (SPEC §3): `/stomp`, or `/ws` with the subprotocol `v12.stomp`
//! (also `v11.stomp`, `v10.stomp`; the session speaks 1.2).
//!
//! # Mapping
//! - `CONNECT`/`STOMP`: the JWT or client key in `Authorization: Bearer …` or `passcode` (or
//!   already in the handshake, as on `/ws`); `accept-version` must include `1.2`. `CONNECTED`
//!   carries `version`, `heart-beat`, `server`, `user-name` and `session` (the `conn_id`).
//! - Destinations: `/topic/<topic>` ↔ topic `<topic>`; `/user/queue/<name>` ↔
//!   `user/{me}/<name>`, and `/user/queue` ↔ the inbox `user/{me}`. A STOMP session has no
//!   implicit subscriptions: it receives what its `SUBSCRIBE`s name. Durable messages reach
//!   the subscriptions whose topic is theirs; one that no subscription covers is not written
//!   (it stays pending in the store) and is replayed when a subscription to its topic comes.
//! - `SUBSCRIBE` takes `ack` (`auto`, `client`, `client-individual`) and Herald's own headers
//!   `since` (resume a history topic after that seq) and `snapshot` (`false`: no retained
//!   value). `ack:auto` acknowledges durable messages as they are written; the client modes
//!   put an `ack` header (the message id) on every `MESSAGE` and a durable message is acked
//!   in the store when the client `ACK`s it (`client`: cumulatively, per subscription).
//!   `NACK` leaves it pending: the retry policy sends it again.
//! - `SEND` to `/topic/<topic>` is a client publish (ACL `publish`, rate limit; header `event`,
//!   default `message`; a JSON body is the data, a `text/*` body becomes a JSON string);
//!   `SEND` to `/app/<command>` is an upstream command (header `trace-id`), whose
//!   `command_reply` comes back as a `MESSAGE` on the subscriptions to `/user/queue/replies`.
//! - `MESSAGE`: `subscription`, `destination` (the subscription's), `ack` when the
//!   subscription needs it, then the headers every subscriber shares (`message-id`,
//!   `content-type:application/json`, `event`, `ts`, `seq`, `trace-id`, `from`, `durable`,
//!   `retained`) and the data as the body. The shared part is encoded once per message
//!   ([`Message::stomp_tail`]) and written after a small per-subscription head, without a copy.
//! - `RECEIPT` for every frame that asks. Errors are fatal, as STOMP has it: `ERROR` (with
//!   `receipt-id` when the failing frame asked for a receipt) and the socket is closed:
//!   malformed frames, forbidden or invalid destinations, limits, transactions (not
//!   supported).
//! - Heart-beats: the server declares `heart-beat:<heartbeat_interval>,<heartbeat_interval>`;
//!   when the client wants them it gets an EOL every interval (besides the WebSocket Ping);
//!   anything the client sends counts as its heart-beat, and a client silent for
//!   `heartbeat_timeout` is closed (1001).
//! - Auth, ACL, limits and metrics are the JSON v1 ones ([`crate::session`]). A token cannot
//!   be refreshed over STOMP: at its expiry the session gets `ERROR` and 4010 and the client
//!   reconnects with a new one.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt;
use herald_core::error::Error;
use herald_core::identity::{Authenticated, Authenticator};
use herald_core::message::Message;
use herald_core::queue::{CloseRequest, Outgoing};
use herald_core::topic::Topic;
use herald_proto::close;
use herald_proto::stomp::{self, Command, Frame, Incoming};
use herald_proto::ws::{self as wsframe, Message as WsMessage, OpCode};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::{Sleep, sleep_until, timeout};

use crate::api::json_error;
use crate::session::{self, Deliveries, Refused, Session, bounded, close_label};
use crate::state::AppState;
use crate::ws::{
    First, admit, close_for_frame_error, first_message, handshake_credential, send_close, upgrade,
};
use crate::wsio::{WsError, WsSocket};

/// The WebSocket subprotocols that choose STOMP, preferred first.
pub const SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];
/// Where command replies are delivered.
const REPLIES: &str = "/user/queue/replies";
/// Frames written per batch.
const BATCH: usize = 256;
/// Durable ids remembered per subscription awaiting the client's `ACK`.
const MAX_PENDING_ACKS: usize = 4096;
/// Headers and header line length accepted in a client frame.
const MAX_HEADERS: usize = 64;
const MAX_HEADER_LINE: usize = 8 * 1024;

/// `GET /stomp`.
pub async fn handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let key = match admit(&state, peer, req.headers()) {
        Ok(k) => k,
        Err(res) => return res,
    };
    let protocol = match asked_subprotocols(req.headers()) {
        None => None,
        Some(asked) => match SUBPROTOCOLS.iter().find(|p| asked.contains(p)) {
            Some(p) => Some(*p),
            None => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported subprotocol (supported on /stomp: v12.stomp, v11.stomp, v10.stomp)",
                );
            }
        },
    };
    accept(state, peer, req, key, protocol)
}

/// The subprotocols a handshake asks for, `None` when it names none.
pub(crate) fn asked_subprotocols(h: &HeaderMap) -> Option<Vec<&str>> {
    let asked: Vec<&str> = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    (!asked.is_empty()).then_some(asked)
}

/// Upgrades a handshake that chose STOMP (on `/stomp`, or on `/ws` by subprotocol). A
/// credential in the handshake is checked here (401, no upgrade); without one, `CONNECT`
/// must carry it.
pub(crate) fn accept(
    state: Arc<AppState>,
    peer: SocketAddr,
    req: Request,
    key: String,
    protocol: Option<&'static str>,
) -> Response {
    let pre_auth = match handshake_credential(&state, peer, &req) {
        Ok(a) => a,
        Err(res) => return res,
    };
    let task_state = state.clone();
    upgrade(&state, peer, req, &key, protocol, move |ws| {
        run(task_state, ws, pre_auth, peer)
    })
}

/// A fatal error: `ERROR`, then the socket is closed with `code`.
struct Fatal {
    message: String,
    receipt: Option<String>,
    code: u16,
    /// The `herald_errors_total` kind of the error (empty: none, the server ended it).
    kind: &'static str,
}

impl Fatal {
    fn new(message: impl Into<String>, code: u16, kind: &'static str) -> Self {
        Self {
            message: message.into(),
            receipt: None,
            code,
            kind,
        }
    }

    /// The server ends the session (revocation, slow consumer, token expiry, drain): no
    /// client error to count.
    fn server_close(message: String, code: u16) -> Self {
        Self::new(message, code, "")
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(message, close::POLICY, "malformed_frame")
    }

    fn from_error(e: &Error) -> Self {
        let code = match e {
            Error::TooLarge(_) => close::TOO_LARGE,
            Error::Unauthenticated(_) => close::UNAUTHENTICATED,
            _ => close::POLICY,
        };
        Self::new(format!("{} {e}", e.code()), code, e.kind())
    }

    fn receipt(mut self, frame: &Frame) -> Self {
        self.receipt = frame.header("receipt").map(str::to_owned);
        self
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AckMode {
    Auto,
    Client,
    ClientIndividual,
}

/// One `SUBSCRIBE`.
struct Sub {
    id: Box<str>,
    destination: Box<str>,
    topic: Topic,
    ack: AckMode,
    /// Durable ids written and not yet acknowledged (client modes), oldest first.
    pending: VecDeque<Box<str>>,
}

/// The connection's STOMP state.
struct Conn {
    session: Session,
    subs: Vec<Sub>,
    /// The client wants heart-beats from us.
    send_heartbeats: bool,
    deliveries: Deliveries,
}

async fn run(
    state: Arc<AppState>,
    mut ws: WsSocket,
    pre_auth: Option<Box<Authenticated>>,
    peer: SocketAddr,
) {
    let Some(mut conn) = Box::pin(connect(&state, &mut ws, pre_auth)).await else {
        return;
    };
    tracing::debug!(%peer, conn_id = conn.session.conn_id, user = %conn.session.conn.user, "stomp connected");
    let reason = connection_loop(&state, &mut ws, &mut conn).await;
    state.metrics.connection_closed(reason);
    tracing::debug!(conn_id = conn.session.conn_id, reason, "stomp disconnected");
}

fn limits(state: &AppState) -> stomp::Limits {
    stomp::Limits {
        max_headers: MAX_HEADERS,
        max_header_line: MAX_HEADER_LINE,
        max_body: state.config.limits.max_message_size,
    }
}

/// Writes `ERROR` and closes; errors are irrelevant now.
async fn fail(state: &AppState, ws: &mut WsSocket, f: Fatal) {
    if !f.kind.is_empty() {
        state.metrics.error(f.kind);
    }
    let frame = stomp::encode_error(&f.message, f.receipt.as_deref(), &f.message);
    let limit = state.config.limits.write_timeout;
    let _ = Box::pin(timeout(limit, ws.send_text(&frame))).await;
    send_close(ws, f.code, "", limit).await;
}

/// The `CONNECT` exchange, within `auth_timeout`. `None`: the connection was closed here.
async fn connect(
    state: &Arc<AppState>,
    ws: &mut WsSocket,
    pre_auth: Option<Box<Authenticated>>,
) -> Option<Conn> {
    let limits_ = &state.config.limits;
    let deadline = Instant::now() + limits_.auth_timeout;
    let frame = loop {
        let bytes = match first_message(state, ws, deadline).await {
            First::Data(WsMessage::Text(t)) => t.into_bytes(),
            First::Data(WsMessage::Binary(b)) => b,
            First::Data(_) | First::Gone => return None,
            First::Timeout => {
                let f = Fatal::new(
                    "authentication timeout: send CONNECT first",
                    close::UNAUTHENTICATED,
                    "unauthenticated",
                );
                fail(state, ws, f).await;
                return None;
            }
            First::Close(code) => {
                send_close(ws, code.unwrap_or(close::NORMAL), "", limits_.write_timeout).await;
                return None;
            }
        };
        let items = match stomp::decode(&bytes, &limits(state)) {
            Ok(items) => items,
            Err(e) => {
                fail(state, ws, Fatal::bad(e.to_string())).await;
                return None;
            }
        };
        let mut frames = items.into_iter().filter_map(|i| match i {
            Incoming::Frame(f) => Some(f),
            Incoming::Heartbeat => None,
        });
        match (frames.next(), frames.next()) {
            (None, _) => continue,
            (Some(f), None) => break f,
            (Some(_), Some(_)) => {
                let f = Fatal::bad("send CONNECT alone and wait for CONNECTED");
                fail(state, ws, f).await;
                return None;
            }
        }
    };
    if !matches!(frame.command, Command::Connect | Command::Stomp) {
        let f = Fatal::new(
            format!("send CONNECT first (got {})", frame.command.as_str()),
            close::UNAUTHENTICATED,
            "unauthenticated",
        );
        fail(state, ws, f.receipt(&frame)).await;
        return None;
    }
    let accepts_12 = frame
        .header("accept-version")
        .is_some_and(|v| v.split(',').any(|v| v.trim() == stomp::VERSION));
    if !accepts_12 {
        let f = Fatal::bad("unsupported protocol version: this server speaks STOMP 1.2");
        fail(state, ws, f.receipt(&frame)).await;
        return None;
    }
    let client_hb = match frame.header("heart-beat") {
        None => (0, 0),
        Some(v) => match stomp::parse_heart_beat(v) {
            Some(hb) => hb,
            None => {
                let f = Fatal::bad(format!("malformed heart-beat header: {v}"));
                fail(state, ws, f.receipt(&frame)).await;
                return None;
            }
        },
    };
    let credential = frame
        .header("Authorization")
        .or_else(|| frame.header("authorization"))
        .and_then(crate::auth::bearer_token)
        .or_else(|| frame.header("passcode").filter(|p| !p.is_empty()));
    let auth = match (credential, pre_auth) {
        (Some(c), _) => match state.auth.authenticate(c) {
            Ok(a) => a,
            Err(e) => {
                let f = Fatal::new(e.to_string(), close::UNAUTHENTICATED, "unauthenticated");
                fail(state, ws, f.receipt(&frame)).await;
                return None;
            }
        },
        (None, Some(a)) => *a,
        (None, None) => {
            let f = Fatal::new(
                "authentication required: Authorization: Bearer <token> or passcode",
                close::UNAUTHENTICATED,
                "unauthenticated",
            );
            fail(state, ws, f.receipt(&frame)).await;
            return None;
        }
    };
    let session = match session::open(state, auth, session::Transport::Stomp).await {
        Ok(s) => s,
        Err(Refused::TooManyConnections) => {
            // Counted as a close (`too_many_connections`) by the session, as on `/ws`.
            let f = Fatal::server_close(
                "too many connections for this user".into(),
                close::TOO_MANY_CONNECTIONS,
            );
            fail(state, ws, f).await;
            return None;
        }
    };
    let interval = limits_.heartbeat_interval.as_millis() as u64;
    let heart_beat = format!("{interval},{interval}");
    let server = concat!("herald/", env!("CARGO_PKG_VERSION"));
    let connected = stomp::encode_connected(&[
        ("version", stomp::VERSION),
        ("heart-beat", &heart_beat),
        ("server", server),
        ("user-name", &session.conn.user),
        ("session", &session.conn_id),
    ]);
    if bounded(limits_.write_timeout, ws.send_text(&connected))
        .await
        .map_or(true, |r| r.is_err())
    {
        return None;
    }
    Some(Conn {
        session,
        subs: Vec::new(),
        send_heartbeats: client_hb.1 > 0,
        deliveries: Deliveries::default(),
    })
}

/// The main loop; returns why the connection ended (a metric label).
async fn connection_loop(state: &Arc<AppState>, ws: &mut WsSocket, c: &mut Conn) -> &'static str {
    let limits = &state.config.limits;
    let mut last_seen = Instant::now();
    let mut next_ping = Instant::now() + limits.heartbeat_interval;
    let due = |next_ping: Instant, expiry: Option<Instant>| {
        expiry.map_or(next_ping, |e| e.min(next_ping))
    };
    let mut timer: Pin<Box<Sleep>> = Box::pin(sleep_until(due(next_ping, c.session.expiry).into()));
    let queue_conn = c.session.conn.clone();
    let mut batch: Vec<Outgoing> = Vec::new();
    loop {
        tokio::select! {
            msg = ws.next() => {
                let msg = match msg {
                    Ok(None) | Err(WsError::Io(_)) => return "client",
                    Err(WsError::Frame(e)) => {
                        return close_for_frame_error(state, ws, &e, limits.write_timeout).await;
                    }
                    Ok(Some(m)) => m,
                };
                last_seen = Instant::now();
                let bytes = match msg {
                    WsMessage::Text(t) => t.into_bytes(),
                    WsMessage::Binary(b) => b,
                    WsMessage::Ping(p) => {
                        if bounded(limits.write_timeout, ws.send_pong(&p)).await.map_or(true, |r| r.is_err()) {
                            return "write_error";
                        }
                        continue;
                    }
                    WsMessage::Pong => continue,
                    WsMessage::Close(code) => {
                        send_close(ws, code.unwrap_or(close::NORMAL), "", limits.write_timeout).await;
                        return "client";
                    }
                };
                match Box::pin(handle_message(state, c, &bytes)).await {
                    Ok(Next::Continue) => {}
                    Ok(Next::Disconnect) => {
                        flush_now(state, ws, c, &mut batch).await;
                        send_close(ws, close::NORMAL, "", limits.write_timeout).await;
                        return "client";
                    }
                    Err(f) => {
                        flush_now(state, ws, c, &mut batch).await;
                        let label = if f.code == close::POLICY { "policy" } else { "server" };
                        fail(state, ws, f).await;
                        return label;
                    }
                }
            }
            close = queue_conn.queue.drain(&mut batch, BATCH) => {
                if !batch.is_empty() {
                    match bounded(limits.write_timeout, write_batch(state, ws, c, &mut batch)).await {
                        Ok(Ok(None)) => {}
                        Ok(Ok(Some(f))) => {
                            fail(state, ws, f).await;
                            return "server_restart";
                        }
                        Ok(Err(_)) => return "write_error",
                        Err(_) => {
                            state.metrics.slow_consumers.increment(1);
                            return "write_timeout";
                        }
                    }
                }
                if let Some(CloseRequest { code, reason }) = close {
                    fail(state, ws, Fatal::server_close(reason.into_owned(), code)).await;
                    return close_label(code);
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if c.session.expiry.is_some_and(|e| now >= e) {
                    fail(state, ws, Fatal::server_close("token expired".into(), close::TOKEN_EXPIRED)).await;
                    return "token_expired";
                }
                if now >= next_ping {
                    if last_seen.elapsed() >= limits.heartbeat_timeout {
                        send_close(ws, close::GOING_AWAY, "heartbeat timeout", limits.write_timeout).await;
                        return "heartbeat_timeout";
                    }
                    let mut frames = vec![Bytes::from_static(&[0x89, 0])];
                    if c.send_heartbeats {
                        frames.push(wsframe::encode(OpCode::Text, stomp::HEARTBEAT));
                    }
                    if bounded(limits.write_timeout, ws.write_frames(&frames)).await.map_or(true, |r| r.is_err()) {
                        return "write_error";
                    }
                    next_ping = now + limits.heartbeat_interval;
                }
                timer.as_mut().reset(due(next_ping, c.session.expiry).into());
            }
        }
    }
}

/// Writes what is already queued (e.g. receipts before an `ERROR`), bounded.
async fn flush_now(state: &AppState, ws: &mut WsSocket, c: &mut Conn, batch: &mut Vec<Outgoing>) {
    let queue_conn = c.session.conn.clone();
    if queue_conn
        .queue
        .drain(batch, usize::MAX)
        .now_or_never()
        .is_some()
        && !batch.is_empty()
    {
        let limit = state.config.limits.write_timeout;
        let _ = Box::pin(timeout(limit, write_batch(state, ws, c, batch))).await;
    }
}

enum Next {
    Continue,
    Disconnect,
}

/// Every frame of one WebSocket message, in order.
async fn handle_message(state: &Arc<AppState>, c: &mut Conn, bytes: &[u8]) -> Result<Next, Fatal> {
    let items = stomp::decode(bytes, &limits(state)).map_err(|e| {
        let too_large = matches!(e, stomp::StompError::BodyTooLarge(_));
        if too_large {
            Fatal::new(e.to_string(), close::TOO_LARGE, "too_large")
        } else {
            Fatal::bad(e.to_string())
        }
    })?;
    for item in items {
        let Incoming::Frame(frame) = item else {
            continue;
        };
        let next = handle_frame(state, c, &frame)
            .await
            .map_err(|f| f.receipt(&frame))?;
        if let Next::Disconnect = next {
            return Ok(next);
        }
        if let Some(r) = frame.header("receipt") {
            c.session.conn.queue.push_frame(stomp::encode_receipt(r));
        }
    }
    Ok(Next::Continue)
}

fn required<'a>(frame: &'a Frame, name: &str) -> Result<&'a str, Fatal> {
    frame
        .header(name)
        .ok_or_else(|| Fatal::bad(format!("{} needs a {name} header", frame.command.as_str())))
}

async fn handle_frame(state: &Arc<AppState>, c: &mut Conn, frame: &Frame) -> Result<Next, Fatal> {
    match frame.command {
        Command::Subscribe => subscribe(state, c, frame).await.map(|()| Next::Continue),
        Command::Unsubscribe => {
            let id = required(frame, "id")?;
            let Some(pos) = c.subs.iter().position(|s| &*s.id == id) else {
                return Err(Fatal::bad(format!("no subscription with id {id}")));
            };
            let sub = c.subs.remove(pos);
            if !c.subs.iter().any(|s| s.topic == sub.topic) {
                state.hub.unsubscribe(&c.session.conn, sub.topic.as_str());
            }
            Ok(Next::Continue)
        }
        Command::Send => send(state, c, frame).await.map(|()| Next::Continue),
        Command::Ack | Command::Nack => {
            let id = required(frame, "id")?;
            let acked = take_pending(c, id);
            if frame.command == Command::Ack && !acked.is_empty() {
                let ids: Vec<String> = acked.into_iter().map(String::from).collect();
                c.session
                    .ack(state, &ids)
                    .await
                    .map_err(|e| Fatal::from_error(&e))?;
            }
            Ok(Next::Continue)
        }
        Command::Begin | Command::Commit | Command::Abort => Err(Fatal::new(
            "transactions are not supported",
            close::POLICY,
            "bad_request",
        )),
        Command::Disconnect => {
            if let Some(r) = frame.header("receipt") {
                c.session.conn.queue.push_frame(stomp::encode_receipt(r));
            }
            Ok(Next::Disconnect)
        }
        Command::Connect | Command::Stomp => Err(Fatal::bad("already connected")),
    }
}

/// The durable ids an `ACK`/`NACK` of `id` covers: that one (`client-individual`), or every
/// one up to it on its subscription (`client`). Empty when `id` is not awaiting an ack (an
/// ephemeral message, or one acked already).
fn take_pending(c: &mut Conn, id: &str) -> Vec<Box<str>> {
    for sub in &mut c.subs {
        let Some(pos) = sub.pending.iter().position(|p| &**p == id) else {
            continue;
        };
        return match sub.ack {
            AckMode::Client => sub.pending.drain(..=pos).collect(),
            _ => sub.pending.remove(pos).into_iter().collect(),
        };
    }
    Vec::new()
}

/// The topic of a destination, for this user.
fn destination_topic(dest: &str, user: &str) -> Result<Topic, Fatal> {
    let raw = if let Some(t) = dest.strip_prefix("/topic/") {
        t.to_owned()
    } else if dest == "/user/queue" {
        format!("user/{user}")
    } else if let Some(name) = dest.strip_prefix("/user/queue/") {
        format!("user/{user}/{name}")
    } else {
        return Err(Fatal::new(
            format!(
                "404 unknown destination {dest} (subscribe to /topic/<topic>, /user/queue or /user/queue/<name>)"
            ),
            close::POLICY,
            "bad_request",
        ));
    };
    Topic::parse(&raw).map_err(|e| Fatal::from_error(&Error::Topic(e)))
}

async fn subscribe(state: &Arc<AppState>, c: &mut Conn, frame: &Frame) -> Result<(), Fatal> {
    let id = required(frame, "id")?;
    let dest = required(frame, "destination")?;
    if c.subs.iter().any(|s| &*s.id == id) {
        return Err(Fatal::bad(format!("subscription id {id} is in use")));
    }
    let ack = match frame.header("ack").unwrap_or("auto") {
        "auto" => AckMode::Auto,
        "client" => AckMode::Client,
        "client-individual" => AckMode::ClientIndividual,
        other => return Err(Fatal::bad(format!("unknown ack mode {other}"))),
    };
    let since = match frame.header("since") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| Fatal::bad(format!("since must be a seq number, got {v}")))?,
        ),
    };
    let snapshot = match frame.header("snapshot") {
        None | Some("true") => true,
        Some("false") => false,
        Some(v) => {
            return Err(Fatal::bad(format!(
                "snapshot must be true or false, got {v}"
            )));
        }
    };
    let topic = destination_topic(dest, &c.session.conn.user)?;
    c.session
        .may_subscribe(state)
        .map_err(|e| Fatal::from_error(&e))?;
    // Listed before the subscribe, so what it queues (retained value, history) finds it.
    c.subs.push(Sub {
        id: id.into(),
        destination: dest.into(),
        topic: topic.clone(),
        ack,
        pending: VecDeque::new(),
    });
    if let Err(e) = c
        .session
        .subscribe(state, topic.as_str(), since, snapshot)
        .await
    {
        c.subs.pop();
        return Err(Fatal::from_error(&e));
    }
    // Durable messages of this topic not acked yet: the subscription is where they can go.
    if Topic::user(&c.session.conn.user).is_ok_and(|inbox| {
        topic == inbox || topic.as_str().starts_with(&format!("{}/", inbox.as_str()))
    }) {
        c.session.replay_inbox(state, Some(&topic)).await;
    }
    Ok(())
}

async fn send(state: &Arc<AppState>, c: &mut Conn, frame: &Frame) -> Result<(), Fatal> {
    let dest = required(frame, "destination")?;
    let data = body_data(frame)?;
    if let Some(command) = dest.strip_prefix("/app/") {
        let trace_id = frame.header("trace-id").map(str::to_owned);
        c.session
            .command(state, command, trace_id, &data)
            .map_err(|e| Fatal::from_error(&e))?;
        return Ok(());
    }
    let Some(topic) = dest.strip_prefix("/topic/") else {
        return Err(Fatal::new(
            format!("403 cannot SEND to {dest} (send to /topic/<topic> or /app/<command>)"),
            close::POLICY,
            "forbidden",
        ));
    };
    let event = frame.header("event").unwrap_or("message").to_owned();
    crate::publish::check_token("event", &event).map_err(|e| Fatal::from_error(&e))?;
    c.session
        .publish(state, topic.to_owned(), event, data)
        .await
        .map_err(|e| Fatal::from_error(&e))?;
    Ok(())
}

/// A `SEND` body as message data: JSON as is (`application/json`, or no `content-type` and a
/// body that parses), a text body as a JSON string, nothing as `null`.
fn body_data(frame: &Frame) -> Result<Box<RawValue>, Fatal> {
    let ct = frame.header("content-type");
    let body = &frame.body[..];
    let text = || std::str::from_utf8(body).map_err(|_| Fatal::bad("400 the body must be UTF-8"));
    let is_json = ct.is_some_and(|t| t.starts_with("application/json"));
    if body.is_empty() && (ct.is_none() || is_json) {
        return RawValue::from_string("null".into()).map_err(|e| Fatal::bad(e.to_string()));
    }
    if is_json || ct.is_none() {
        let text = text()?;
        match serde_json::from_str::<Box<RawValue>>(text) {
            Ok(v) => return Ok(v),
            Err(e) if is_json => {
                return Err(Fatal::bad(format!("400 body is not JSON: {e}")));
            }
            Err(_) => {}
        }
    }
    if ct.is_none_or(|t| t.starts_with("text/")) {
        let s = serde_json::to_string(&Value::String(text()?.to_owned()))
            .map_err(|e| Fatal::bad(e.to_string()))?;
        return RawValue::from_string(s).map_err(|e| Fatal::bad(e.to_string()));
    }
    Err(Fatal::bad(format!(
        "400 unsupported content-type {} (use application/json or text/*)",
        ct.unwrap_or("")
    )))
}

/// One `MESSAGE` for `sub`: the WebSocket header and the per-subscription head in one small
/// buffer, then the shared tail.
fn push_message(frames: &mut Vec<Bytes>, sub: &Sub, id: &str, tail: Bytes) {
    let ack = (sub.ack != AckMode::Auto).then_some(id);
    let mut head = stomp::message_head(&sub.id, ack);
    head.extend_from_slice(b"destination:");
    head.extend_from_slice(stomp::escape(&sub.destination).as_bytes());
    head.push(b'\n');
    frames.push(wsframe::encode_head(
        OpCode::Text,
        head.len() + tail.len(),
        &head,
    ));
    frames.push(tail);
}

/// Feeds a drained batch to the socket. `Some(fatal)`: a frame asks the session to end (the
/// node drains).
async fn write_batch(
    state: &AppState,
    ws: &mut WsSocket,
    c: &mut Conn,
    batch: &mut Vec<Outgoing>,
) -> std::io::Result<Option<Fatal>> {
    let mut written = c.deliveries.start(state);
    let mut frames: Vec<Bytes> = Vec::with_capacity(batch.len() * 2);
    let mut auto_acks: Vec<String> = Vec::new();
    let mut end = None;
    for item in batch.drain(..) {
        match item {
            Outgoing::Message(m) | Outgoing::Replay(m) => {
                if !c.subs.iter().any(|s| s.topic == m.topic) {
                    continue;
                }
                if !c.deliveries.admit(state, &c.session.conn, &m, &mut written) {
                    continue;
                }
                deliver(&mut c.subs, &m, m.stomp_tail(), &mut frames, &mut auto_acks);
            }
            Outgoing::Retained(m) => {
                let tail = m.stomp_tail_retained();
                deliver(&mut c.subs, &m, &tail, &mut frames, &mut auto_acks);
            }
            Outgoing::Frame(f) if f.first() == Some(&b'{') => {
                if let Some(fatal) = control_frame(&c.subs, &f, &mut frames) {
                    end = Some(fatal);
                    break;
                }
            }
            Outgoing::Frame(f) => frames.push(wsframe::encode(OpCode::Text, &f)),
        }
    }
    ws.write_frames(&frames).await?;
    Deliveries::written(state, &c.session.conn, written);
    if !auto_acks.is_empty() {
        let store = state.store.clone();
        let user = c.session.conn.user.clone();
        state.inbox.acked(&user, &auto_acks);
        state.tasks.spawn(async move {
            if let Err(e) = store.ack(&user, &auto_acks).await {
                tracing::warn!(error = %e, "could not ack durable messages of an ack:auto subscription");
            }
        });
    }
    Ok(end)
}

/// `m` on every subscription to its topic.
fn deliver(
    subs: &mut [Sub],
    m: &Arc<Message>,
    tail: &Bytes,
    frames: &mut Vec<Bytes>,
    auto_acks: &mut Vec<String>,
) {
    let mut auto_acked = false;
    for sub in subs.iter_mut().filter(|s| s.topic == m.topic) {
        push_message(frames, sub, &m.id, tail.clone());
        if !m.durable {
            continue;
        }
        if sub.ack == AckMode::Auto {
            if !auto_acked {
                auto_acks.push(m.id.to_string());
                auto_acked = true;
            }
        } else if !sub.pending.iter().any(|p| *p == m.id) {
            if sub.pending.len() == MAX_PENDING_ACKS {
                // Forgotten here, still pending in the store: retransmitted by the retry policy.
                sub.pending.pop_front();
            }
            sub.pending.push_back(m.id.clone());
        }
    }
}

/// A JSON v1 control frame queued by the rest of the server, in STOMP terms: a
/// `command_reply` becomes a `MESSAGE` on the subscriptions to [`REPLIES`]; a `reconnect`
/// (the node drains) ends the session with `ERROR` and 1012.
fn control_frame(subs: &[Sub], json: &[u8], frames: &mut Vec<Bytes>) -> Option<Fatal> {
    let v: Value = serde_json::from_slice(json).ok()?;
    match v.get("type").and_then(Value::as_str) {
        Some("command_reply") => {
            let trace_id = v.get("trace_id").and_then(Value::as_str).unwrap_or("");
            let command = v.get("command").and_then(Value::as_str).unwrap_or("");
            let code = v
                .get("code")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .to_string();
            let id = format!("reply-{trace_id}");
            let tail = stomp::message_tail(
                &[
                    ("message-id", &id),
                    ("content-type", "application/json"),
                    ("event", "command_reply"),
                    ("command", command),
                    ("trace-id", trace_id),
                    ("code", &code),
                ],
                json,
            );
            let mut any = false;
            for sub in subs.iter().filter(|s| &*s.destination == REPLIES) {
                push_message(frames, sub, &id, tail.clone());
                any = true;
            }
            if !any {
                tracing::debug!(
                    trace_id,
                    command,
                    "command reply dropped: no subscription to {REPLIES}"
                );
            }
            None
        }
        Some("reconnect") => {
            let after = v.get("after_ms").and_then(Value::as_u64).unwrap_or(0);
            Some(Fatal::server_close(
                format!("node draining: reconnect (after {after} ms)"),
                close::SERVICE_RESTART,
            ))
        }
        _ => None,
    }
}
