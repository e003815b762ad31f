//! STOMP 1.2 (<https://stomp.github.io/stomp-specification-1.2.html>) over WebSocket: decoding
//! client frames and encoding server frames. Pure: the connection task does the I/O.
//!
//! # Design
//!
//! - **One WebSocket message in, every item out.** Each WebSocket message carries zero or more
//!   *whole* frames plus heart-beat EOLs before, between and after them; a frame never spans
//!   two messages (`@stomp/stompjs` sends one frame per message). So [`decode`] takes one
//!   complete buffer and there is no "need more data" state: a frame that is not closed by a
//!   NUL inside the buffer is an error ([`StompError::MissingNul`]).
//! - **Heart-beats.** Every maximal run of EOLs (`\n` or `\r\n`) between items, wherever it
//!   is (alone, before, between or after frames), yields *one* [`Incoming::Heartbeat`]; a
//!   message of a million newlines is one item, not a million.
//! - **Strict where the spec is.** Commands are case-sensitive client commands only; header
//!   escapes are exactly `\r` `\n` `\c` `\\` (anything else, or a trailing `\`, is
//!   [`StompError::BadEscape`]), except in `CONNECT`/`STOMP` frames whose headers are taken
//!   verbatim; values are not trimmed; the first `:` splits name and value. Only `SEND` may
//!   carry a body. Repeated headers are all kept, in order, and [`Frame::header`] returns the
//!   first, as §"Repeated Header Entries" says.
//! - **Linear and bounded.** Every line is looked for in a window of at most
//!   [`Limits::max_header_line`] (+ EOL) bytes and a body in at most [`Limits::max_body`] + 1,
//!   so a huge header or body is refused after reading no more than the limit, and nothing is
//!   allocated for it before the check. Nothing the input holds can panic.
//! - **Encoding once.** Server frames are built straight into bytes. A `MESSAGE` is a small
//!   per-subscriber head ([`message_head`]: `subscription`, `ack`) followed by a tail shared by
//!   every subscriber ([`message_tail`]: the other headers, `content-length`, body, NUL), so the
//!   costly part is encoded once per message and the same [`Bytes`] go to every connection.
//!
//! The body of a decoded frame is a [`Bytes`] copied once out of the input: it can then be
//! handed to a publish without another copy.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

/// The protocol version this codec speaks (the `version` header of `CONNECTED`).
pub const VERSION: &str = "1.2";

/// A heart-beat from the server: one EOL.
pub const HEARTBEAT: &[u8] = b"\n";

/// Client commands (STOMP 1.2 §"Client Frames"). Case-sensitive on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
}

impl Command {
    const ALL: [Command; 11] = [
        Command::Connect,
        Command::Stomp,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Ack,
        Command::Nack,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Disconnect,
    ];

    /// The command as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
        }
    }

    /// Whether header names and values are escaped: in every frame but `CONNECT` and `STOMP`
    /// (§"Value Encoding": "CONNECT and CONNECTED frames do not escape").
    fn escapes_headers(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp)
    }

    fn parse(line: &[u8]) -> Result<Command, StompError> {
        if let Some(c) = Command::ALL.iter().find(|c| c.as_str().as_bytes() == line) {
            return Ok(*c);
        }
        match std::str::from_utf8(line) {
            Ok(s) => Err(StompError::UnknownCommand(
                s.chars().take(UNKNOWN_COMMAND_CHARS).collect(),
            )),
            Err(_) => Err(StompError::NotUtf8),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much of an unknown command [`StompError::UnknownCommand`] keeps.
const UNKNOWN_COMMAND_CHARS: usize = 32;

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    /// In order of appearance, decoded (unescaped, except in `CONNECT`/`STOMP`). Repeated
    /// names are kept; [`Frame::header`] returns the first (§"Repeated Header Entries").
    pub headers: Vec<(String, String)>,
    /// The body (only `SEND` may have one), copied once out of the input.
    pub body: Bytes,
}

impl Frame {
    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The frame on the wire, as a client sends it: headers written as they are, in order
    /// (escaped unless `CONNECT`/`STOMP`), then the body and NUL. No `content-length` is added:
    /// include one when the body may contain NUL. Used by tests and clients; a decoded frame
    /// encodes back to a frame that decodes to itself (but for a `CONNECT`/`STOMP` value that
    /// ends in `\r`, which verbatim headers cannot carry; and escaping a raw `:` or CR may
    /// lengthen a line past [`Limits::max_header_line`]).
    pub fn encode(&self) -> Vec<u8> {
        let escaped = self.command.escapes_headers();
        let mut buf = Vec::with_capacity(64 + self.body.len());
        buf.extend_from_slice(self.command.as_str().as_bytes());
        buf.push(b'\n');
        for (name, value) in &self.headers {
            if escaped {
                push_header(&mut buf, name, value);
            } else {
                push_header_verbatim(&mut buf, name, value);
            }
        }
        buf.push(b'\n');
        buf.extend_from_slice(&self.body);
        buf.push(0);
        buf
    }
}

/// One item of a WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Frame(Frame),
    /// A run of one or more EOLs: the client is alive.
    Heartbeat,
}

/// Bounds on what one frame may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Header lines per frame (the command line not counted).
    pub max_headers: usize,
    /// Bytes of one line (command or header, raw, before unescaping), EOL not counted.
    pub max_header_line: usize,
    /// Bytes of one body.
    pub max_body: usize,
}

impl Default for Limits {
    /// 64 headers, 8 KiB per line, 512 KiB of body.
    fn default() -> Self {
        Limits {
            max_headers: 64,
            max_header_line: 8 * 1024,
            max_body: 512 * 1024,
        }
    }
}

/// Why a client's bytes are not valid STOMP 1.2. Every one is fatal for the connection (the
/// server answers with an `ERROR` frame, see [`encode_error`], and closes); [`Self::message`]
/// (and `Display`) is a short single-line text for that frame's `message` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StompError {
    /// Not a client command (commands are case-sensitive); holds its first 32 characters.
    UnknownCommand(String),
    /// The command line or a header line is not UTF-8.
    NotUtf8,
    /// A header line without `:`.
    MissingColon,
    /// A header line starting with `:`.
    EmptyHeaderName,
    /// An escape other than `\r` `\n` `\c` `\\`, or a trailing `\`.
    BadEscape,
    /// A NUL before the blank line that ends the headers.
    HeadersNotTerminated,
    /// More header lines than the limit (held here).
    TooManyHeaders(usize),
    /// A line longer than the limit (held here).
    HeaderTooLong(usize),
    /// A body longer than the limit (held here).
    BodyTooLarge(usize),
    /// `content-length` is not a non-negative integer, is past the end of the input, or its
    /// body is not followed by NUL; holds which.
    BadContentLength(&'static str),
    /// The frame is not terminated by NUL within the message.
    MissingNul,
    /// A body on a frame that may not have one (every client frame but `SEND`).
    BodyNotAllowed(Command),
}

impl StompError {
    /// A short, single-line text for an `ERROR` frame's `message` header.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for StompError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // `escape_debug` keeps the text on one line whatever the client sent.
            StompError::UnknownCommand(c) => write!(f, "unknown command \"{}\"", c.escape_debug()),
            StompError::NotUtf8 => f.write_str("command and headers must be UTF-8"),
            StompError::MissingColon => f.write_str("header line without ':'"),
            StompError::EmptyHeaderName => f.write_str("header with an empty name"),
            StompError::BadEscape => f.write_str("invalid escape sequence in a header"),
            StompError::HeadersNotTerminated => {
                f.write_str("frame ends before the blank line after its headers")
            }
            StompError::TooManyHeaders(max) => write!(f, "more than {max} headers"),
            StompError::HeaderTooLong(max) => write!(f, "header line longer than {max} bytes"),
            StompError::BodyTooLarge(max) => write!(f, "body larger than {max} bytes"),
            StompError::BadContentLength(why) => write!(f, "bad content-length: {why}"),
            StompError::MissingNul => f.write_str("frame not terminated by NUL"),
            StompError::BodyNotAllowed(c) => write!(f, "{c} frames cannot have a body"),
        }
    }
}

impl std::error::Error for StompError {}

/// Decodes every item of one WebSocket message (text or binary), in order. An empty message
/// yields no item. The first error ends decoding: the whole message is refused.
pub fn decode(input: &[u8], limits: &Limits) -> Result<Vec<Incoming>, StompError> {
    let mut items = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let after_eols = skip_eols(input, pos);
        if after_eols > pos {
            items.push(Incoming::Heartbeat);
            pos = after_eols;
            continue;
        }
        let (frame, next) = decode_frame(input, pos, limits)?;
        items.push(Incoming::Frame(frame));
        pos = next;
    }
    Ok(items)
}

/// Where the run of EOLs starting at `pos` ends (`pos` itself when there is none).
fn skip_eols(input: &[u8], mut pos: usize) -> usize {
    loop {
        match input.get(pos..) {
            Some([b'\n', ..]) => pos += 1,
            Some([b'\r', b'\n', ..]) => pos += 2,
            _ => return pos,
        }
    }
}

/// Decodes the frame starting at `pos`; returns it and the position just past its NUL.
fn decode_frame(input: &[u8], pos: usize, limits: &Limits) -> Result<(Frame, usize), StompError> {
    let (line, mut pos) = read_line(input, pos, limits.max_header_line)?;
    let command = Command::parse(line)?;
    let escaped = command.escapes_headers();

    let mut headers = Vec::new();
    loop {
        let (line, next) = read_line(input, pos, limits.max_header_line)?;
        pos = next;
        if line.is_empty() {
            break;
        }
        if headers.len() >= limits.max_headers {
            return Err(StompError::TooManyHeaders(limits.max_headers));
        }
        headers.push(parse_header(line, escaped)?);
    }

    let content_length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| parse_content_length(v))
        .transpose()?;
    let rest = &input[pos..];
    let body_len = if command != Command::Send {
        // Nothing but the NUL may follow the headers.
        if content_length.is_some_and(|n| n > 0) {
            return Err(StompError::BodyNotAllowed(command));
        }
        match rest.first() {
            None => return Err(StompError::MissingNul),
            Some(0) => 0,
            Some(_) => return Err(StompError::BodyNotAllowed(command)),
        }
    } else if let Some(n) = content_length {
        if n > limits.max_body {
            return Err(StompError::BodyTooLarge(limits.max_body));
        }
        match rest.get(n) {
            None => {
                return Err(StompError::BadContentLength(
                    "longer than the rest of the frame",
                ));
            }
            Some(0) => n,
            Some(_) => return Err(StompError::BadContentLength("body not followed by NUL")),
        }
    } else {
        let window = &rest[..rest.len().min(limits.max_body.saturating_add(1))];
        match window.iter().position(|&b| b == 0) {
            Some(n) => n,
            None if window.len() < rest.len() => {
                return Err(StompError::BodyTooLarge(limits.max_body));
            }
            None => return Err(StompError::MissingNul),
        }
    };

    let frame = Frame {
        command,
        headers,
        body: Bytes::copy_from_slice(&rest[..body_len]),
    };
    Ok((frame, pos + body_len + 1))
}

/// The line starting at `pos` (without its EOL, `\n` or `\r\n`) and the position after the
/// EOL. Looks at no more than `max` + 2 bytes, so a huge line costs no more than the limit.
fn read_line(input: &[u8], pos: usize, max: usize) -> Result<(&[u8], usize), StompError> {
    let rest = &input[pos..];
    let window = &rest[..rest.len().min(max.saturating_add(2))];
    match window.iter().position(|&b| b == b'\n' || b == 0) {
        Some(i) if window[i] == b'\n' => {
            let line = &window[..i];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max {
                return Err(StompError::HeaderTooLong(max));
            }
            Ok((line, pos + i + 1))
        }
        Some(_) => Err(StompError::HeadersNotTerminated),
        None if window.len() < rest.len() => Err(StompError::HeaderTooLong(max)),
        None => Err(StompError::MissingNul),
    }
}

/// `name:value`, split at the first `:`, unescaped when `escaped`.
fn parse_header(line: &[u8], escaped: bool) -> Result<(String, String), StompError> {
    let line = std::str::from_utf8(line).map_err(|_| StompError::NotUtf8)?;
    let (name, value) = line.split_once(':').ok_or(StompError::MissingColon)?;
    if name.is_empty() {
        return Err(StompError::EmptyHeaderName);
    }
    if escaped {
        Ok((unescape(name)?, unescape(value)?))
    } else {
        Ok((name.to_owned(), value.to_owned()))
    }
}

/// Digits only (no sign, no spaces); a number past `usize` saturates (and is then too large).
fn parse_content_length(v: &str) -> Result<usize, StompError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StompError::BadContentLength("not a non-negative integer"));
    }
    Ok(v.bytes().fold(0usize, |n, d| {
        n.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    }))
}

fn unescape(s: &str) -> Result<String, StompError> {
    if !s.contains('\\') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('r') => '\r',
            Some('n') => '\n',
            Some('c') => ':',
            Some('\\') => '\\',
            _ => return Err(StompError::BadEscape),
        });
    }
    Ok(out)
}

fn needs_escape(b: u8) -> bool {
    matches!(b, b'\\' | b'\n' | b'\r' | b':')
}

/// STOMP 1.2 header escaping: `\` → `\\`, LF → `\n`, CR → `\r`, `:` → `\c`. Borrows when
/// there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            ':' => out.push_str("\\c"),
            _ => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn push_escaped(buf: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b':' => buf.extend_from_slice(b"\\c"),
            _ => buf.push(b),
        }
    }
}

/// `<escaped name>:<escaped value>\n`.
fn push_header(buf: &mut Vec<u8>, name: &str, value: &str) {
    push_escaped(buf, name);
    buf.push(b':');
    push_escaped(buf, value);
    buf.push(b'\n');
}

/// `<name>:<value>\n`, as they are (`CONNECT`, `STOMP`, `CONNECTED`).
fn push_header_verbatim(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    buf.push(b':');
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// `CONNECTED` with `headers` written verbatim (§"Value Encoding": `CONNECTED` is not
/// escaped): the caller passes server-chosen values (`version`, `heart-beat`, `server`,
/// `session`) that hold no LF, CR or (in names) `:`.
pub fn encode_connected(headers: &[(&str, &str)]) -> Bytes {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(b"CONNECTED\n");
    for (name, value) in headers {
        push_header_verbatim(&mut buf, name, value);
    }
    buf.extend_from_slice(b"\n\0");
    Bytes::from(buf)
}

/// `RECEIPT` for the frame whose `receipt` header was `receipt_id`.
pub fn encode_receipt(receipt_id: &str) -> Bytes {
    let mut buf = Vec::with_capacity(24 + receipt_id.len());
    buf.extend_from_slice(b"RECEIPT\n");
    push_header(&mut buf, "receipt-id", receipt_id);
    buf.extend_from_slice(b"\n\0");
    Bytes::from(buf)
}

/// `ERROR` with `message` (escaped, so a newline in it cannot break the frame),
/// `content-type:text/plain`, `content-length`, `receipt-id` when the failing frame asked for
/// a receipt, and `body`.
pub fn encode_error(message: &str, receipt_id: Option<&str>, body: &str) -> Bytes {
    let mut buf = Vec::with_capacity(96 + message.len() + body.len());
    buf.extend_from_slice(b"ERROR\n");
    push_header(&mut buf, "message", message);
    buf.extend_from_slice(b"content-type:text/plain\n");
    push_header(&mut buf, "content-length", &body.len().to_string());
    if let Some(id) = receipt_id {
        push_header(&mut buf, "receipt-id", id);
    }
    buf.push(b'\n');
    buf.extend_from_slice(body.as_bytes());
    buf.push(0);
    Bytes::from(buf)
}

/// The per-subscriber start of a `MESSAGE`: `MESSAGE\nsubscription:<id>\n` and, for a
/// subscription with client acks, `ack:<id>\n`. Followed by a [`message_tail`] it is one
/// complete frame.
pub fn message_head(subscription: &str, ack: Option<&str>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(32 + subscription.len() + ack.map_or(0, str::len));
    buf.extend_from_slice(b"MESSAGE\n");
    push_header(&mut buf, "subscription", subscription);
    if let Some(ack) = ack {
        push_header(&mut buf, "ack", ack);
    }
    buf
}

/// The part of a `MESSAGE` shared by every subscriber: `headers` (escaped; e.g.
/// `destination`, `message-id`, `content-type`), `content-length` (always added from `body`;
/// a `content-length` in `headers` is skipped, as it could contradict the body), the blank
/// line, the body and NUL.
pub fn message_tail(headers: &[(&str, &str)], body: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(64 + body.len());
    for (name, value) in headers {
        if *name != "content-length" {
            push_header(&mut buf, name, value);
        }
    }
    push_header(&mut buf, "content-length", &body.len().to_string());
    buf.push(b'\n');
    buf.extend_from_slice(body);
    buf.push(0);
    Bytes::from(buf)
}

/// Parses a `heart-beat` header value `cx,cy` into `(cx, cy)` in ms; `None` when malformed
/// (anything but two unsigned decimal integers separated by one comma).
pub fn parse_heart_beat(v: &str) -> Option<(u64, u64)> {
    let (cx, cy) = v.split_once(',')?;
    Some((parse_ms(cx)?, parse_ms(cy)?))
}

fn parse_ms(s: &str) -> Option<u64> {
    // `u64::from_str` would also take a leading `+`.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// STOMP heart-beat negotiation (§"Heart-beating"): given the client's `(cx, cy)` and the
/// server's `(sx, sy)`, returns `(server_sends_every_ms, server_expects_every_ms)`, 0 = none.
/// The server sends every `max(sx, cy)` when both are non-zero, and expects something from
/// the client every `max(sy, cx)` when both are non-zero.
pub fn negotiate_heart_beat(client: (u64, u64), server: (u64, u64)) -> (u64, u64) {
    let (cx, cy) = client;
    let (sx, sy) = server;
    let every = |a: u64, b: u64| if a == 0 || b == 0 { 0 } else { a.max(b) };
    (every(sx, cy), every(sy, cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_default(input: &[u8]) -> Result<Vec<Incoming>, StompError> {
        decode(input, &Limits::default())
    }

    /// The single frame of `input`.
    fn one(input: &[u8]) -> Frame {
        match decode_default(input).as_deref() {
            Ok([Incoming::Frame(f)]) => f.clone(),
            other => panic!("expected one frame, got {other:?}"),
        }
    }

    fn err(input: &[u8]) -> StompError {
        match decode_default(input) {
            Err(e) => e,
            Ok(items) => panic!("expected an error, got {items:?}"),
        }
    }

    #[test]
    fn send_frame() {
        let f = one(b"SEND\ndestination:/topic/a\ncontent-type:text/plain\n\nhello\0");
        assert_eq!(f.command, Command::Send);
        assert_eq!(f.header("destination"), Some("/topic/a"));
        assert_eq!(f.header("content-type"), Some("text/plain"));
        assert_eq!(f.header("nope"), None);
        assert_eq!(&f.body[..], b"hello");
    }

    #[test]
    fn every_command_and_crlf() {
        for c in Command::ALL {
            let input = format!("{}\r\nreceipt:r1\r\n\r\n\0", c.as_str());
            let f = one(input.as_bytes());
            assert_eq!(f.command, c);
            assert_eq!(f.header("receipt"), Some("r1"));
            assert!(f.body.is_empty());
        }
    }

    #[test]
    fn values_not_trimmed_and_first_colon_splits() {
        let f = one(b"SEND\ndestination: /a \nx:a:b\\cc\n\n\0");
        assert_eq!(f.header("destination"), Some(" /a "));
        assert_eq!(f.header("x"), Some("a:b:c"));
    }

    #[test]
    fn escapes_decode() {
        let f = one(b"SUBSCRIBE\nid:a\\cb\\nc\\rd\\\\e\nk\\cey:v\n\n\0");
        assert_eq!(f.header("id"), Some("a:b\nc\rd\\e"));
        assert_eq!(f.header("k:ey"), Some("v"));
    }

    #[test]
    fn bad_escapes() {
        assert_eq!(err(b"SEND\nx:a\\tb\n\n\0"), StompError::BadEscape);
        assert_eq!(err(b"SEND\nx:ab\\\n\n\0"), StompError::BadEscape);
        assert_eq!(err(b"SEND\nx\\t:ab\n\n\0"), StompError::BadEscape);
    }

    #[test]
    fn connect_headers_are_verbatim() {
        let f = one(b"CONNECT\naccept-version:1.2\nhost:h\nlogin:a\\cb\npasscode:p\\t\n\n\0");
        assert_eq!(f.command, Command::Connect);
        assert_eq!(f.header("login"), Some("a\\cb"));
        assert_eq!(f.header("passcode"), Some("p\\t"));
        let f = one(b"STOMP\npasscode:x\\y\n\n\0");
        assert_eq!(f.command, Command::Stomp);
        assert_eq!(f.header("passcode"), Some("x\\y"));
    }

    #[test]
    fn content_length_body_with_nul() {
        let f = one(b"SEND\ndestination:/a\ncontent-length:5\n\na\0b\0c\0");
        assert_eq!(&f.body[..], b"a\0b\0c");
        let f = one(b"SEND\ncontent-length:0\n\n\0");
        assert!(f.body.is_empty());
    }

    #[test]
    fn wrong_content_length() {
        // Longer than the input.
        assert!(matches!(
            err(b"SEND\ncontent-length:10\n\nabc\0"),
            StompError::BadContentLength(_)
        ));
        // Exactly the rest: no room for the NUL.
        assert!(matches!(
            err(b"SEND\ncontent-length:4\n\nabc\0"),
            StompError::BadContentLength(_)
        ));
        // Shorter: the byte after the body is not NUL.
        assert!(matches!(
            err(b"SEND\ncontent-length:2\n\nabc\0"),
            StompError::BadContentLength(_)
        ));
        for bad in ["abc", "", "-1", "+3", " 3", "3 ", "0x3"] {
            let input = format!("SEND\ncontent-length:{bad}\n\nabc\0");
            assert!(
                matches!(err(input.as_bytes()), StompError::BadContentLength(_)),
                "{bad:?}"
            );
        }
        // Past usize: too large, not a panic.
        assert_eq!(
            err(b"SEND\ncontent-length:99999999999999999999999999999\n\nabc\0"),
            StompError::BodyTooLarge(Limits::default().max_body)
        );
    }

    #[test]
    fn missing_nul() {
        assert_eq!(
            err(b"SEND\ndestination:/a\n\nhello"),
            StompError::MissingNul
        );
        assert_eq!(err(b"SEND\ndestination:/a\n\n"), StompError::MissingNul);
        assert_eq!(err(b"SEND\ndestination:/a\n"), StompError::MissingNul);
        assert_eq!(err(b"SEND"), StompError::MissingNul);
        assert_eq!(err(b"SUBSCRIBE\nid:1\n\n"), StompError::MissingNul);
        // The second frame of the message is cut.
        assert_eq!(err(b"SEND\n\na\0SEND\n\nb"), StompError::MissingNul);
        // A lone CR is not an EOL.
        assert_eq!(err(b"SEND\n\na\0\r"), StompError::MissingNul);
    }

    #[test]
    fn nul_inside_headers() {
        assert_eq!(err(b"DISCONNECT\n\0"), StompError::HeadersNotTerminated);
        assert_eq!(err(b"CONNECT\0"), StompError::HeadersNotTerminated);
        assert_eq!(err(b"SEND\nx:y\0\n\n\0"), StompError::HeadersNotTerminated);
    }

    #[test]
    fn heartbeats() {
        assert_eq!(decode_default(b"").unwrap(), vec![]);
        assert_eq!(decode_default(b"\n").unwrap(), vec![Incoming::Heartbeat]);
        assert_eq!(decode_default(b"\r\n").unwrap(), vec![Incoming::Heartbeat]);
        // One item per run of EOLs.
        assert_eq!(
            decode_default(b"\n\r\n\n").unwrap(),
            vec![Incoming::Heartbeat]
        );
        let items = decode_default(b"\nSEND\n\na\0\r\n\nSEND\n\nb\0\n").unwrap();
        let kinds: Vec<_> = items
            .iter()
            .map(|i| match i {
                Incoming::Frame(f) => std::str::from_utf8(&f.body).unwrap_or("?"),
                Incoming::Heartbeat => "hb",
            })
            .collect();
        assert_eq!(kinds, ["hb", "a", "hb", "b", "hb"]);
    }

    #[test]
    fn several_frames_in_one_message() {
        let items = decode_default(
            b"SUBSCRIBE\nid:0\ndestination:/a\n\n\0SEND\ndestination:/a\n\nx\0DISCONNECT\nreceipt:9\n\n\0",
        )
        .unwrap();
        let commands: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Incoming::Frame(f) => Some(f.command),
                Incoming::Heartbeat => None,
            })
            .collect();
        assert_eq!(
            commands,
            [Command::Subscribe, Command::Send, Command::Disconnect]
        );
    }

    #[test]
    fn header_count_limit() {
        let limits = Limits {
            max_headers: 3,
            ..Limits::default()
        };
        assert!(decode(b"SEND\na:1\nb:2\nc:3\n\n\0", &limits).is_ok());
        assert_eq!(
            decode(b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0", &limits),
            Err(StompError::TooManyHeaders(3))
        );
    }

    #[test]
    fn header_line_limit() {
        let limits = Limits {
            max_header_line: 8,
            ..Limits::default()
        };
        // Exactly 8 bytes, with either EOL.
        assert!(decode(b"SEND\nabc:1234\n\n\0", &limits).is_ok());
        assert!(decode(b"SEND\r\nabc:1234\r\n\r\n\0", &limits).is_ok());
        assert_eq!(
            decode(b"SEND\nabc:12345\n\n\0", &limits),
            Err(StompError::HeaderTooLong(8))
        );
        assert_eq!(
            decode(b"SEND\nabc:12345\r\n\n\0", &limits),
            Err(StompError::HeaderTooLong(8))
        );
        // A huge line without EOL is refused after looking at the limit only.
        let mut huge = b"SEND\nx:".to_vec();
        huge.resize(10 << 20, b'a');
        assert_eq!(decode(&huge, &limits), Err(StompError::HeaderTooLong(8)));
        // The command line counts too.
        assert_eq!(
            decode(b"UNSUBSCRIBE\n\n\0", &limits),
            Err(StompError::HeaderTooLong(8))
        );
    }

    #[test]
    fn body_limit() {
        let limits = Limits {
            max_body: 4,
            ..Limits::default()
        };
        assert!(decode(b"SEND\n\nabcd\0", &limits).is_ok());
        assert_eq!(
            decode(b"SEND\n\nabcde\0", &limits),
            Err(StompError::BodyTooLarge(4))
        );
        assert!(decode(b"SEND\ncontent-length:4\n\nab\0d\0", &limits).is_ok());
        assert_eq!(
            decode(b"SEND\ncontent-length:5\n\nab\0de\0", &limits),
            Err(StompError::BodyTooLarge(4))
        );
        let mut huge = b"SEND\n\n".to_vec();
        huge.resize(10 << 20, b'a');
        assert_eq!(decode(&huge, &limits), Err(StompError::BodyTooLarge(4)));
    }

    #[test]
    fn body_only_on_send() {
        assert_eq!(
            err(b"SUBSCRIBE\nid:1\ndestination:/a\n\nbody\0"),
            StompError::BodyNotAllowed(Command::Subscribe)
        );
        assert_eq!(
            err(b"ACK\nid:1\ncontent-length:2\n\nab\0"),
            StompError::BodyNotAllowed(Command::Ack)
        );
        assert!(decode_default(b"ACK\nid:1\ncontent-length:0\n\n\0").is_ok());
    }

    #[test]
    fn repeated_header_first_wins() {
        let f = one(b"SEND\nfoo:first\nfoo:second\n\n\0");
        assert_eq!(f.header("foo"), Some("first"));
        assert_eq!(f.headers.len(), 2);
        // content-length too.
        let f = one(b"SEND\ncontent-length:1\ncontent-length:3\n\na\0");
        assert_eq!(&f.body[..], b"a");
    }

    #[test]
    fn unknown_commands() {
        assert_eq!(
            err(b"send\n\n\0"),
            StompError::UnknownCommand("send".into())
        );
        assert_eq!(
            err(b"MESSAGE\n\n\0"),
            StompError::UnknownCommand("MESSAGE".into())
        );
        assert_eq!(
            err(b"\rSEND\n\n\0"),
            StompError::UnknownCommand("\rSEND".into())
        );
        let long = "X".repeat(100) + "\n\n\0";
        assert_eq!(
            err(long.as_bytes()),
            StompError::UnknownCommand("X".repeat(UNKNOWN_COMMAND_CHARS))
        );
    }

    #[test]
    fn not_utf8() {
        assert_eq!(err(b"SEND\nx:\xff\xfe\n\n\0"), StompError::NotUtf8);
        assert_eq!(err(b"\xffSEND\n\n\0"), StompError::NotUtf8);
        // The body may be anything.
        assert_eq!(&one(b"SEND\n\n\xff\xfe\0").body[..], b"\xff\xfe");
    }

    #[test]
    fn bad_header_lines() {
        assert_eq!(err(b"SEND\nnocolon\n\n\0"), StompError::MissingColon);
        assert_eq!(err(b"SEND\n:v\n\n\0"), StompError::EmptyHeaderName);
        // An empty value is fine.
        assert_eq!(one(b"SEND\nk:\n\n\0").header("k"), Some(""));
    }

    #[test]
    fn error_messages_are_one_line() {
        let errors = [
            StompError::UnknownCommand("a\nb\rc\0".into()),
            StompError::NotUtf8,
            StompError::MissingColon,
            StompError::EmptyHeaderName,
            StompError::BadEscape,
            StompError::HeadersNotTerminated,
            StompError::TooManyHeaders(64),
            StompError::HeaderTooLong(8192),
            StompError::BodyTooLarge(1),
            StompError::BadContentLength("not a non-negative integer"),
            StompError::MissingNul,
            StompError::BodyNotAllowed(Command::Subscribe),
        ];
        for e in errors {
            let m = e.message();
            assert!(!m.is_empty() && !m.contains(['\n', '\r', '\0']), "{m:?}");
        }
        assert_eq!(
            StompError::BodyNotAllowed(Command::Subscribe).message(),
            "SUBSCRIBE frames cannot have a body"
        );
        assert_eq!(
            StompError::MissingNul.to_string(),
            "frame not terminated by NUL"
        );
    }

    #[test]
    fn escape_cases() {
        assert!(matches!(escape("plain"), Cow::Borrowed("plain")));
        assert_eq!(escape("a:b\nc\rd\\é"), "a\\cb\\nc\\rd\\\\é");
    }

    #[test]
    fn encode_connected_is_verbatim() {
        let b = encode_connected(&[("version", VERSION), ("heart-beat", "0,0"), ("x", "a:b")]);
        assert_eq!(
            &b[..],
            b"CONNECTED\nversion:1.2\nheart-beat:0,0\nx:a:b\n\n\0"
        );
    }

    #[test]
    fn encode_receipt_escapes() {
        assert_eq!(
            &encode_receipt("r:1")[..],
            b"RECEIPT\nreceipt-id:r\\c1\n\n\0"
        );
    }

    #[test]
    fn encode_error_frame() {
        let body = "the frame was:\nSEND\n";
        let b = encode_error("bad\nthing: x", Some("r1"), body);
        let expected = format!(
            "ERROR\nmessage:bad\\nthing\\c x\ncontent-type:text/plain\ncontent-length:{}\nreceipt-id:r1\n\n{body}\0",
            body.len()
        );
        assert_eq!(&b[..], expected.as_bytes());
        // content-length equals the body's length in bytes (not chars).
        let b = encode_error("m", None, "é");
        assert_eq!(
            &b[..],
            "ERROR\nmessage:m\ncontent-type:text/plain\ncontent-length:2\n\né\0".as_bytes()
        );
    }

    #[test]
    fn message_head_and_tail() {
        let mut frame = message_head("sub:0", Some("a1"));
        frame.extend_from_slice(&message_tail(
            &[
                ("destination", "/topic/a"),
                ("message-id", "m\n1"),
                ("content-length", "999"),
            ],
            b"x\0y",
        ));
        assert_eq!(
            frame,
            b"MESSAGE\nsubscription:sub\\c0\nack:a1\ndestination:/topic/a\nmessage-id:m\\n1\ncontent-length:3\n\nx\0y\0"
        );
        assert_eq!(
            message_head("s", None),
            b"MESSAGE\nsubscription:s\n".to_vec()
        );
        // The same bytes, relabelled as a client SEND, decode with the headers back.
        let send = [b"SEND".as_slice(), &frame[b"MESSAGE".len()..]].concat();
        let f = one(&send);
        assert_eq!(f.header("subscription"), Some("sub:0"));
        assert_eq!(f.header("message-id"), Some("m\n1"));
        assert_eq!(&f.body[..], b"x\0y");
    }

    #[test]
    fn frame_encode_round_trips() {
        let inputs: [&[u8]; 4] = [
            b"SEND\ndestination:/a\\c\\n\\\\\ncontent-length:3\n\na\0b\0",
            b"CONNECT\naccept-version:1.2\nlogin:a\\b\n\n\0",
            b"SUBSCRIBE\nid:0\nx:a:b\n\n\0",
            b"DISCONNECT\r\nreceipt:1\r\n\r\n\0",
        ];
        for input in inputs {
            let f = one(input);
            assert_eq!(one(&f.encode()), f);
        }
    }

    #[test]
    fn heart_beat_parse() {
        assert_eq!(parse_heart_beat("0,0"), Some((0, 0)));
        assert_eq!(parse_heart_beat("10000,5000"), Some((10000, 5000)));
        for bad in [
            "", ",", "1", "1,", ",1", "a,1", "1,2,3", "+1,2", " 1,2", "1, 2", "-1,2",
        ] {
            assert_eq!(parse_heart_beat(bad), None, "{bad:?}");
        }
        assert_eq!(parse_heart_beat("99999999999999999999999,1"), None);
    }

    #[test]
    fn heart_beat_negotiation() {
        // Client sends every 10 s and wants every 5 s; server can send every 20 s and wants
        // every 1 s.
        assert_eq!(
            negotiate_heart_beat((10_000, 5_000), (20_000, 1_000)),
            (20_000, 10_000)
        );
        assert_eq!(negotiate_heart_beat((0, 0), (10_000, 10_000)), (0, 0));
        assert_eq!(negotiate_heart_beat((10_000, 10_000), (0, 0)), (0, 0));
        assert_eq!(negotiate_heart_beat((0, 4_000), (5_000, 5_000)), (5_000, 0));
        assert_eq!(negotiate_heart_beat((4_000, 0), (5_000, 5_000)), (0, 5_000));
    }
}
