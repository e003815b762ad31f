//! The errors of the WebSocket client ([`ClientError`]) and of the publisher ([`PublishError`]).

use tokio_tungstenite::tungstenite;

/// What can go wrong on a [`crate::Client`].
///
/// [`ClientError::Timeout`] and [`ClientError::Server`] leave the connection usable; after
/// [`ClientError::Closed`], [`ClientError::ClosedWith`] or [`ClientError::Ws`] it is gone.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket upgrade was refused or failed. `status` is the HTTP status of a refused
    /// upgrade (e.g. 401, with the server's JSON error in `body`); `None` when the response was
    /// not a valid upgrade (wrong subprotocol, missing headers…), described in `body`.
    #[error("handshake failed (status {status:?}): {body}")]
    Handshake { status: Option<u16>, body: String },
    /// The server closed the connection with this close code (before the welcome, or while a
    /// request was waiting for its reply, or under [`crate::Client::next_message`]).
    #[error("connection closed by server: {code} {reason}")]
    ClosedWith { code: u16, reason: String },
    /// The connection is closed (no close code, or the close was already reported).
    #[error("connection closed")]
    Closed,
    /// Nothing expected arrived within the configured timeout.
    #[error("timed out")]
    Timeout,
    /// The server sent something this client cannot make sense of.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server sent an `error` frame (or refused before the welcome).
    #[error("server error {code}: {message}")]
    Server { code: u16, message: String },
    /// Transport-level WebSocket error.
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
    /// A frame could not be encoded or decoded as JSON.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// What can go wrong on a [`crate::Publisher`] call.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The server answered with a non-2xx status. `code` and `message` come from its JSON
    /// `{"code","message"}` body; when the body is not that shape (a proxy's HTML page, say),
    /// `code` is the HTTP status and `message` the start of the body.
    #[error("api error {status} (code {code}): {message}")]
    Api {
        status: u16,
        code: u16,
        message: String,
    },
    /// The request could not be sent or its response not read.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// A 2xx answer whose body is not what the API documents.
    #[error("decode: {0}")]
    Decode(String),
}
