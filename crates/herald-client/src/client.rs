//! The WebSocket client for JSON v1 (`/ws`, SPEC §2).
//!
//! One [`Client`] owns one socket and is driven by its caller: nothing runs in the background.
//! Every call that waits reads the socket itself until what it waits for arrives, and keeps
//! every other frame, in arrival order, in a buffer that [`Client::next_event`] drains first.
//! Because the socket is only read inside calls, server WebSocket pings are answered (by
//! tungstenite) when the caller next reads; a caller that stops reading for longer than the
//! server's heartbeat timeout will be disconnected, as any unresponsive client would.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::encode::percent_encode;
use crate::error::ClientError;
use crate::frame::{self, Event, Frame, Message, Reply, Welcome};

/// The subprotocol asked for by default.
pub const DEFAULT_SUBPROTOCOL: &str = "herald.json.v1";

/// How long any single call waits by default (handshake, welcome, a reply, the next event).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the token goes when connecting (SPEC §2, "Authentication").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenPlacement {
    /// `Authorization: Bearer <token>` on the upgrade request.
    #[default]
    Header,
    /// `?token=<token>` (percent-encoded) appended to the URL.
    Query,
    /// A first frame `{"type":"auth","token":…}` right after the upgrade.
    FirstFrame,
}

/// How to connect. `token: None` connects without credentials (to test refusals).
#[derive(Clone)]
pub struct ConnectOptions {
    /// `ws://host:port/ws` (plain WebSocket only; this crate has no TLS).
    pub url: String,
    pub token: Option<String>,
    pub placement: TokenPlacement,
    /// Sent as `Sec-WebSocket-Protocol`; the server must then echo it.
    pub subprotocol: Option<String>,
    /// Bound on every wait of the resulting client, including the connect itself.
    pub timeout: Duration,
}

impl ConnectOptions {
    /// Header auth, subprotocol `herald.json.v1`, 10 s timeout.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            token: Some(token.into()),
            placement: TokenPlacement::Header,
            subprotocol: Some(DEFAULT_SUBPROTOCOL.to_owned()),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("placement", &self.placement)
            .field("subprotocol", &self.subprotocol)
            .field("timeout", &self.timeout)
            .finish()
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connected, welcomed JSON v1 session.
pub struct Client {
    conn: Conn,
    welcome: Welcome,
    /// Last request id used; ids are 1, 2, 3… per connection.
    last_id: u64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("welcome", &self.welcome)
            .field("buffered", &self.conn.buffered.len())
            .field("closed", &self.conn.closed)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects with the token in the `Authorization` header and returns after the welcome.
    pub async fn connect(url: &str, token: &str) -> Result<Client, ClientError> {
        Client::connect_with(ConnectOptions::new(url, token)).await
    }

    /// Connects as `opts` says and returns after the welcome. Frames that arrive before the
    /// welcome are kept for [`Client::next_event`]; an `error` frame before it is
    /// [`ClientError::Server`], a close is [`ClientError::ClosedWith`].
    pub async fn connect_with(opts: ConnectOptions) -> Result<Client, ClientError> {
        let deadline = Instant::now() + opts.timeout;
        let url = match (&opts.token, opts.placement) {
            (Some(token), TokenPlacement::Query) => with_query(&opts.url, "token", token),
            _ => opts.url.clone(),
        };
        let mut request = url.as_str().into_client_request()?;
        if let (Some(token), TokenPlacement::Header) = (&opts.token, opts.placement) {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::Protocol("token is not a valid header value".to_owned())
            })?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        if let Some(proto) = &opts.subprotocol {
            let value = HeaderValue::from_str(proto).map_err(|_| {
                ClientError::Protocol("subprotocol is not a valid header value".to_owned())
            })?;
            request.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, value);
        }

        let ws = match timeout_at(deadline, connect_async(request)).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Err(e)) => return Err(handshake_error(e)),
            Ok(Ok((ws, _response))) => ws,
        };
        let mut conn = Conn {
            ws,
            buffered: VecDeque::new(),
            closed: false,
            timeout: opts.timeout,
        };
        if let (Some(token), TokenPlacement::FirstFrame) = (&opts.token, opts.placement) {
            conn.send_json(&frame::auth(token), deadline).await?;
        }
        let welcome = conn
            .wait_for(deadline, |f| match f {
                Frame::Welcome(w) => Pick::Take(Ok(w)),
                Frame::Event(Event::Error { code, message }) => {
                    Pick::Take(Err(ClientError::Server { code, message }))
                }
                other => Pick::Keep(other),
            })
            .await??;
        Ok(Client {
            conn,
            welcome,
            last_id: 0,
        })
    }

    /// The server's welcome.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The bound on each wait (from [`ConnectOptions::timeout`]).
    pub fn timeout(&self) -> Duration {
        self.conn.timeout
    }

    /// Changes the bound on each later wait (e.g. a long one for a terminal subscriber).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.conn.timeout = timeout;
    }

    /// Whether the socket has ended (events may still be buffered).
    pub fn is_closed(&self) -> bool {
        self.conn.closed
    }

    /// `subscribe` one topic (`"topic"`) or several (`"topics"`); waits for the reply.
    pub async fn subscribe(&mut self, topics: &[&str]) -> Result<Reply, ClientError> {
        self.request(frame::topics_request("subscribe", topics))
            .await
    }

    /// `subscribe` with `since`: replays history after that seq (see `Reply::recovered`).
    pub async fn subscribe_since(&mut self, topic: &str, since: u64) -> Result<Reply, ClientError> {
        self.request(frame::subscribe_since(topic, since)).await
    }

    pub async fn unsubscribe(&mut self, topics: &[&str]) -> Result<Reply, ClientError> {
        self.request(frame::topics_request("unsubscribe", topics))
            .await
    }

    /// Client publish (only where the topic's ACL allows it).
    pub async fn publish(
        &mut self,
        topic: &str,
        event: &str,
        data: Value,
    ) -> Result<Reply, ClientError> {
        self.request(frame::publish(topic, event, data)).await
    }

    pub async fn join_room(&mut self, room: &str) -> Result<Reply, ClientError> {
        self.request(frame::room("join_room", room)).await
    }

    pub async fn leave_room(&mut self, room: &str) -> Result<Reply, ClientError> {
        self.request(frame::room("leave_room", room)).await
    }

    /// Acknowledges durable messages by id.
    pub async fn ack(&mut self, ids: &[String]) -> Result<Reply, ClientError> {
        self.request(frame::ack(ids)).await
    }

    /// Refreshes the session with a new token (`{"type":"auth","token"}`).
    pub async fn refresh(&mut self, token: &str) -> Result<Reply, ClientError> {
        self.request(frame::auth(token)).await
    }

    /// Sends an upstream command without waiting: its answer arrives as
    /// [`Event::CommandReply`].
    pub async fn command(
        &mut self,
        command: &str,
        trace_id: &str,
        data: Value,
    ) -> Result<(), ClientError> {
        let deadline = self.deadline();
        self.conn
            .send_json(&frame::command(command, trace_id, data), deadline)
            .await
    }

    /// Sends `frame` (a JSON object) with the next `"id"` and waits for the reply carrying it.
    /// A refusal is an `Ok(Reply)` with a non-zero code; everything else that arrives meanwhile
    /// is kept for [`Client::next_event`].
    pub async fn request(&mut self, mut frame: Value) -> Result<Reply, ClientError> {
        let Some(object) = frame.as_object_mut() else {
            return Err(ClientError::Protocol(
                "a request must be a JSON object".to_owned(),
            ));
        };
        self.last_id += 1;
        let id = self.last_id;
        object.insert("id".to_owned(), Value::from(id));
        let deadline = self.deadline();
        self.conn.send_json(&frame, deadline).await?;
        self.conn
            .wait_for(deadline, |f| match f {
                Frame::Reply(r) if r.answers(id) => Pick::Take(r),
                other => Pick::Keep(other),
            })
            .await
    }

    /// Sends a JSON `ping` and waits for the `pong`; other frames are kept for later.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        let deadline = self.deadline();
        self.conn.send_json(&frame::ping(), deadline).await?;
        self.conn
            .wait_for(deadline, |f| match f {
                Frame::Event(Event::Pong) => Pick::Take(()),
                other => Pick::Keep(other),
            })
            .await
    }

    /// Sends `text` as one text frame, unchanged (for tests of malformed input).
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        let deadline = self.deadline();
        self.conn.send(WsMessage::text(text), deadline).await
    }

    /// The next event: buffered ones first, then from the socket. When the server closes,
    /// returns [`Event::Closed`] once; later calls return [`ClientError::Closed`]. A frame
    /// that cannot be parsed is a [`ClientError::Protocol`] and does not end the connection;
    /// neither does a [`ClientError::Timeout`].
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        let deadline = self.deadline();
        self.conn.next_event(deadline).await
    }

    /// The next [`Message`], skipping every other event (pongs, replies nobody waits for,
    /// command replies, reconnect notices). An `error` frame is returned as
    /// [`ClientError::Server`], a close as [`ClientError::ClosedWith`] (or
    /// [`ClientError::Closed`] when there was no close code). The timeout covers the whole call.
    pub async fn next_message(&mut self) -> Result<Message, ClientError> {
        let deadline = self.deadline();
        loop {
            match self.conn.next_event(deadline).await? {
                Event::Message(m) => return Ok(m),
                Event::Error { code, message } => {
                    return Err(ClientError::Server { code, message });
                }
                Event::Closed { code, reason } => return Err(closed_error(code, reason)),
                Event::Reconnect { .. }
                | Event::CommandReply(_)
                | Event::Pong
                | Event::Other(_) => {}
            }
        }
    }

    /// Closes with 1000 and waits for the server's close frame (anything still arriving is
    /// dropped). Closing an already closed client is `Ok`.
    pub async fn close(mut self) -> Result<(), ClientError> {
        if self.conn.closed {
            return Ok(());
        }
        let deadline = self.deadline();
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        match timeout_at(deadline, self.conn.ws.close(Some(frame))).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Err(e)) if is_gone(&e) => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(())) => {}
        }
        loop {
            match timeout_at(deadline, self.conn.ws.next()).await {
                Err(_) => return Err(ClientError::Timeout),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) if is_gone(&e) => return Ok(()),
                Ok(Some(Err(e))) => return Err(e.into()),
                // Late frames and the server's close reply; the stream ends right after it.
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.conn.timeout
    }
}

/// What a waiting call does with a frame: take it (the wait is over) or keep it for later.
enum Pick<T> {
    Take(T),
    Keep(Frame),
}

/// The socket and what has been read from it but not yet handed out.
struct Conn {
    ws: Ws,
    /// Events read while waiting for something else, in arrival order. Protocol errors are
    /// kept in place too, so [`Client::next_event`] reports them where they happened.
    buffered: VecDeque<Result<Event, ClientError>>,
    /// The socket has ended (close frame, EOF or a fatal error): never read or write it again.
    closed: bool,
    timeout: Duration,
}

impl Conn {
    async fn send_json(&mut self, value: &Value, deadline: Instant) -> Result<(), ClientError> {
        let text = serde_json::to_string(value)?;
        self.send(WsMessage::text(text), deadline).await
    }

    async fn send(&mut self, msg: WsMessage, deadline: Instant) -> Result<(), ClientError> {
        if self.closed {
            return Err(ClientError::Closed);
        }
        match timeout_at(deadline, self.ws.send(msg)).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(e)) if is_gone(&e) => {
                self.closed = true;
                Err(ClientError::Closed)
            }
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Buffered events first, then the socket.
    async fn next_event(&mut self, deadline: Instant) -> Result<Event, ClientError> {
        match self.buffered.pop_front() {
            Some(buffered) => buffered,
            None => self.read_frame(deadline).await.map(Frame::into_event),
        }
    }

    /// Reads the socket (never the buffer) until `pick` takes a frame, buffering the ones it
    /// keeps back. A close while waiting is buffered as
    /// [`Event::Closed`] (so `next_event` still sees it after what came before) and returned as
    /// an error.
    async fn wait_for<T>(
        &mut self,
        deadline: Instant,
        mut pick: impl FnMut(Frame) -> Pick<T>,
    ) -> Result<T, ClientError> {
        loop {
            let frame = match self.read_frame(deadline).await {
                Ok(frame) => frame,
                Err(ClientError::Protocol(m)) => {
                    self.buffered.push_back(Err(ClientError::Protocol(m)));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let other = match pick(frame) {
                Pick::Take(found) => return Ok(found),
                Pick::Keep(other) => other,
            };
            match other.into_event() {
                Event::Closed { code, reason } => {
                    self.buffered.push_back(Ok(Event::Closed {
                        code,
                        reason: reason.clone(),
                    }));
                    return Err(closed_error(code, reason));
                }
                event => self.buffered.push_back(Ok(event)),
            }
        }
    }

    /// Reads one frame from the socket. The end of the connection, however it happens, is
    /// `Event::Closed` once, then `ClientError::Closed`. Cancel-safe: tungstenite keeps a
    /// partly read frame in its buffer, so a timeout loses nothing.
    async fn read_frame(&mut self, deadline: Instant) -> Result<Frame, ClientError> {
        if self.closed {
            return Err(ClientError::Closed);
        }
        loop {
            let next = timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout)?;
            let msg = match next {
                Some(Ok(msg)) => msg,
                None => {
                    self.closed = true;
                    return Ok(closed_frame(None, "connection ended"));
                }
                Some(Err(e)) => {
                    self.closed = true;
                    return match e {
                        e if is_gone(&e) => Ok(closed_frame(None, &e.to_string())),
                        e => Err(e.into()),
                    };
                }
            };
            match msg {
                WsMessage::Text(text) => return Frame::parse(text.as_str()),
                WsMessage::Binary(bytes) => {
                    return match std::str::from_utf8(&bytes) {
                        Ok(text) => Frame::parse(text),
                        Err(_) => Err(ClientError::Protocol(
                            "binary frame that is not UTF-8 text".to_owned(),
                        )),
                    };
                }
                WsMessage::Close(close) => {
                    self.closed = true;
                    // tungstenite has queued our half of the closing handshake; push it out
                    // now, since we will not touch the socket again. Best effort: the server
                    // may already be gone.
                    let _ = timeout_at(deadline, self.ws.flush()).await;
                    return Ok(match close {
                        Some(cf) => closed_frame(Some(u16::from(cf.code)), cf.reason.as_str()),
                        None => closed_frame(None, ""),
                    });
                }
                // Control frames: tungstenite answers pings itself.
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
            }
        }
    }
}

fn closed_frame(code: Option<u16>, reason: &str) -> Frame {
    Frame::Event(Event::Closed {
        code,
        reason: reason.to_owned(),
    })
}

fn closed_error(code: Option<u16>, reason: String) -> ClientError {
    match code {
        Some(code) => ClientError::ClosedWith { code, reason },
        None => ClientError::Closed,
    }
}

/// Errors that just mean "the connection is over".
fn is_gone(e: &tungstenite::Error) -> bool {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => true,
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => true,
        tungstenite::Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Maps a failed upgrade: a non-101 answer keeps its status and body.
fn handshake_error(e: tungstenite::Error) -> ClientError {
    match e {
        tungstenite::Error::Http(response) => ClientError::Handshake {
            status: Some(response.status().as_u16()),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        },
        tungstenite::Error::Protocol(p) => ClientError::Handshake {
            status: None,
            body: p.to_string(),
        },
        other => ClientError::Ws(other),
    }
}

/// Appends `key=value` (value percent-encoded) to `url`'s query.
fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={}", percent_encode(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_token_appended_and_encoded() {
        assert_eq!(
            with_query("ws://h:1/ws", "token", "a.b c"),
            "ws://h:1/ws?token=a.b%20c"
        );
        assert_eq!(
            with_query("ws://h:1/ws?x=1", "token", "t+/="),
            "ws://h:1/ws?x=1&token=t%2B%2F%3D"
        );
    }

    #[test]
    fn options_defaults_and_masked_debug() {
        let o = ConnectOptions::new("ws://h/ws", "secret");
        assert_eq!(o.placement, TokenPlacement::Header);
        assert_eq!(o.subprotocol.as_deref(), Some("herald.json.v1"));
        assert_eq!(o.timeout, Duration::from_secs(10));
        assert_eq!(o.token.as_deref(), Some("secret"));
        let dbg = format!("{o:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
    }

    #[test]
    fn closed_error_mapping() {
        assert!(matches!(
            closed_error(Some(4010), "expired".into()),
            ClientError::ClosedWith { code: 4010, ref reason } if reason == "expired"
        ));
        assert!(matches!(
            closed_error(None, String::new()),
            ClientError::Closed
        ));
    }
}
