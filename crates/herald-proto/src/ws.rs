//! WebSocket framing (RFC 6455), server side: decoding masked client frames and encoding
//! unmasked server frames. Pure: the connection task in `herald-server` does the I/O.
//!
//! Why our own: a server frame is the same bytes for every recipient (servers do not mask), so
//! a message is framed once ([`frame_json`]) and the very same [`Bytes`] go to every
//! subscriber with one vectored write per batch; and an idle connection holds no read or write
//! buffer at all (the caller keeps bytes only for a partial frame).

use bytes::Bytes;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(b: u8) -> Option<Self> {
        Some(match b {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Why a client's bytes cannot be read as WebSocket frames; each maps to the close code the
/// server answers with ([`FrameError::close_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not a valid frame sequence (1002).
    Protocol(&'static str),
    /// Frame or message over the configured limit (1009).
    TooLarge,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
}

impl FrameError {
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Protocol(_) => 1002,
            Self::TooLarge => crate::close::TOO_LARGE,
            Self::InvalidUtf8 => 1007,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Protocol(r) => r,
            Self::TooLarge => "frame too large",
            Self::InvalidUtf8 => "text frame is not valid UTF-8",
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for FrameError {}

/// One decoded frame: where its (already unmasked) payload lies in the buffer given to
/// [`decode_frame`], and how many bytes the whole frame took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: std::ops::Range<usize>,
    /// Bytes of the buffer this frame used (header and payload).
    pub len: usize,
}

/// Longest server frame header: 2 bytes + 8 bytes of extended length.
pub const MAX_HEADER: usize = 10;

/// Decodes the first frame of `buf`, a client's bytes: `Ok(None)` until the whole frame is
/// there. Unmasks the payload in place. `max_payload` bounds one frame's payload, checked as
/// soon as the header is read (a huge length is refused before its bytes arrive).
pub fn decode_frame(buf: &mut [u8], max_payload: usize) -> Result<Option<Frame>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol(
            "reserved bits set without an extension",
        ));
    }
    let fin = b0 & 0x80 != 0;
    let opcode =
        OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::Protocol("unknown frame opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                (u64::from_be_bytes(n), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::Protocol(
            "control frames must be final and at most 125 bytes",
        ));
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge);
    }
    let len = len as usize;
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    at += 4;
    let end = at + len;
    let Some(payload) = buf.get_mut(at..end) else {
        return Ok(None);
    };
    unmask(payload, mask);
    Ok(Some(Frame {
        fin,
        opcode,
        payload: at..end,
        len: end,
    }))
}

/// XORs `payload` with the 4-byte `mask` (RFC 6455 §5.3), eight bytes at a time.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the mask phase is still 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Writes a final, unmasked header for a `len`-byte payload at the end of `out`; returns how
/// many bytes it used (2, 4 or 10), counted from the end.
fn header_into(opcode: OpCode, len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    let b0 = 0x80 | opcode.bits();
    if len < 126 {
        out[8] = b0;
        out[9] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[6] = b0;
        out[7] = 126;
        out[8..10].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[0] = b0;
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A whole server frame (header and payload) in one buffer.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut h = [0u8; MAX_HEADER];
    let n = header_into(opcode, payload.len(), &mut h);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&h[MAX_HEADER - n..]);
    v.extend_from_slice(payload);
    Bytes::from(v)
}

/// The start of a server frame whose payload is `first` followed by `payload_len -
/// first.len()` more bytes written separately: the header and `first` in one buffer. Lets a
/// payload made of a per-connection part and a shared part be written without copying the
/// shared part (a STOMP `MESSAGE`: its `subscription` header, then the encoded-once rest).
pub fn encode_head(opcode: OpCode, payload_len: usize, first: &[u8]) -> Bytes {
    let mut h = [0u8; MAX_HEADER];
    let n = header_into(opcode, payload_len, &mut h);
    let mut v = Vec::with_capacity(n + first.len());
    v.extend_from_slice(&h[MAX_HEADER - n..]);
    v.extend_from_slice(first);
    Bytes::from(v)
}

/// A close frame with `code` and `reason` (cut to fit the 125-byte control payload at a
/// character boundary).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut p = Vec::with_capacity(2 + cut);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Close, &p)
}

/// The code of a client's close payload (`None` when it carries none). A malformed payload
/// (one byte, a code that may not be sent, a reason that is not UTF-8) is a protocol error.
pub fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close payload of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !allowed {
                return Err(FrameError::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// Serializes into a buffer with room for the frame header in front, then writes the header
/// there: the JSON and its text frame share one allocation. `write` fills the JSON.
pub fn frame_json(write: impl FnOnce(&mut Vec<u8>)) -> Framed {
    let mut v = Vec::with_capacity(MAX_HEADER + 128);
    v.resize(MAX_HEADER, 0);
    write(&mut v);
    let len = v.len() - MAX_HEADER;
    let mut h = [0u8; MAX_HEADER];
    let n = header_into(OpCode::Text, len, &mut h);
    v[MAX_HEADER - n..MAX_HEADER].copy_from_slice(&h[MAX_HEADER - n..]);
    let all = Bytes::from(v);
    Framed {
        frame: all.slice(MAX_HEADER - n..),
        json: all.slice(MAX_HEADER..),
    }
}

/// A JSON frame and the WebSocket text frame carrying it, two views of one buffer.
#[derive(Debug, Clone, Default)]
pub struct Framed {
    /// Header and payload: what a WebSocket connection writes.
    pub frame: Bytes,
    /// The JSON alone (other transports, tests).
    pub json: Bytes,
}

/// A whole client message, or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The client's close code, if it sent one.
    Close(Option<u16>),
}

/// Reads client messages out of received bytes, joining fragments; holds only the fragments
/// of an unfinished message (nothing while idle).
#[derive(Debug, Default)]
pub struct Reader {
    partial: Option<(OpCode, Vec<u8>)>,
}

impl Reader {
    /// The next message in `buf`, and how many bytes of `buf` were used (fragments of an
    /// unfinished message are used up even when no message is complete yet: drop them from
    /// `buf`). `max_message` bounds a frame and a joined message alike.
    pub fn read(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
    ) -> Result<(Option<Message>, usize), FrameError> {
        let mut used = 0;
        loop {
            let Some(f) = decode_frame(&mut buf[used..], max_message)? else {
                return Ok((None, used));
            };
            let payload = &buf[used + f.payload.start..used + f.payload.end];
            used += f.len;
            let done = match (f.opcode, self.partial.as_mut()) {
                (OpCode::Ping, _) => Message::Ping(payload.to_vec()),
                (OpCode::Pong, _) => Message::Pong,
                (OpCode::Close, _) => Message::Close(close_code(payload)?),
                (OpCode::Text | OpCode::Binary, Some(_)) => {
                    return Err(FrameError::Protocol(
                        "new message before the fragmented one ended",
                    ));
                }
                (OpCode::Continuation, None) => {
                    return Err(FrameError::Protocol("continuation frame without a message"));
                }
                (OpCode::Text | OpCode::Binary, None) if !f.fin => {
                    self.partial = Some((f.opcode, payload.to_vec()));
                    continue;
                }
                (OpCode::Continuation, Some((_, joined))) => {
                    if joined.len() + payload.len() > max_message {
                        return Err(FrameError::TooLarge);
                    }
                    joined.extend_from_slice(payload);
                    if !f.fin {
                        continue;
                    }
                    let Some((kind, joined)) = self.partial.take() else {
                        continue;
                    };
                    data_message(kind, joined)?
                }
                (kind, None) => data_message(kind, payload.to_vec())?,
            };
            return Ok((Some(done), used));
        }
    }
}

fn data_message(kind: OpCode, bytes: Vec<u8>) -> Result<Message, FrameError> {
    if kind == OpCode::Binary {
        return Ok(Message::Binary(bytes));
    }
    String::from_utf8(bytes)
        .map(Message::Text)
        .map_err(|_| FrameError::InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_and_the_rest_make_the_whole_frame() {
        for total in [5usize, 125, 126, 300, 65535, 70000] {
            let payload: Vec<u8> = (0..total).map(|i| i as u8).collect();
            let mut split = encode_head(OpCode::Text, total, &payload[..3]).to_vec();
            split.extend_from_slice(&payload[3..]);
            assert_eq!(split, encode(OpCode::Text, &payload).to_vec(), "{total}");
        }
    }

    /// A client frame: masked with `mask`.
    fn client(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n <= 65535 => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    #[test]
    fn decodes_masked_frames_of_every_length_form() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buf = client(0x1, true, &payload, [0x12, 0x34, 0x56, 0x78]);
            let total = buf.len();
            let f = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
            assert_eq!(f.opcode, OpCode::Text);
            assert!(f.fin);
            assert_eq!(f.len, total);
            assert_eq!(&buf[f.payload], &payload[..], "len {len}");
        }
    }

    #[test]
    fn waits_for_the_whole_frame() {
        let full = client(0x1, true, b"hello world", [1, 2, 3, 4]);
        for cut in 0..full.len() {
            let mut part = full[..cut].to_vec();
            assert_eq!(decode_frame(&mut part, 1024), Ok(None), "cut at {cut}");
        }
        // Two frames back to back: the first is reported with its length.
        let mut two = full.clone();
        two.extend_from_slice(&client(0x9, true, b"p", [9, 9, 9, 9]));
        let f = decode_frame(&mut two, 1024).unwrap().unwrap();
        assert_eq!(f.len, full.len());
        let g = decode_frame(&mut two[f.len..], 1024).unwrap().unwrap();
        assert_eq!(g.opcode, OpCode::Ping);
    }

    #[test]
    fn refuses_bad_frames() {
        let mut unmasked = vec![0x81, 0x01, b'a'];
        assert_eq!(
            decode_frame(&mut unmasked, 10).unwrap_err().close_code(),
            1002
        );
        let mut rsv = client(0x1, true, b"a", [0; 4]);
        rsv[0] |= 0x40;
        assert!(matches!(
            decode_frame(&mut rsv, 10),
            Err(FrameError::Protocol(_))
        ));
        let mut op = client(0x3, true, b"a", [0; 4]);
        assert!(decode_frame(&mut op, 10).is_err());
        let mut frag_ping = client(0x9, false, b"a", [0; 4]);
        assert!(decode_frame(&mut frag_ping, 10).is_err());
        let mut long_ping = client(0x9, true, &[0; 126], [0; 4]);
        assert!(decode_frame(&mut long_ping, 1000).is_err());
        // Too large is known from the header alone, before the payload arrives.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert_eq!(decode_frame(&mut huge, 1 << 20), Err(FrameError::TooLarge));
        let mut big = client(0x2, true, &[0; 2000], [0; 4]);
        assert_eq!(decode_frame(&mut big[..8], 1999), Err(FrameError::TooLarge));
    }

    #[test]
    fn encodes_server_frames() {
        assert_eq!(&encode(OpCode::Text, b"hi")[..], &[0x81, 2, b'h', b'i']);
        assert_eq!(&encode(OpCode::Ping, b"")[..], &[0x89, 0]);
        let mid = encode(OpCode::Text, &[b'x'; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 1, 44]);
        assert_eq!(mid.len(), 304);
        let big = encode(OpCode::Binary, &vec![0; 70000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(&big[2..10], &70000u64.to_be_bytes());
    }

    #[test]
    fn close_frames() {
        let c = encode_close(4009, "slow consumer");
        assert_eq!(&c[..4], &[0x88, 15, 0x0F, 0xA9]);
        assert_eq!(&c[4..], b"slow consumer");
        let long = "é".repeat(100);
        let c = encode_close(1000, &long);
        assert!(c.len() <= 127);
        assert!(std::str::from_utf8(&c[4..]).is_ok());
        assert_eq!(close_code(&[]), Ok(None));
        assert_eq!(close_code(&[0x03, 0xE8, b'o', b'k']), Ok(Some(1000)));
        assert!(close_code(&[0x03]).is_err());
        assert!(close_code(&[0x03, 0xED]).is_err(), "1005 may not be sent");
        assert_eq!(
            close_code(&[0x03, 0xE8, 0xFF]),
            Err(FrameError::InvalidUtf8)
        );
    }

    #[test]
    fn framed_json_shares_one_buffer() {
        for len in [3usize, 125, 126, 65535, 65536] {
            let f = frame_json(|v| v.extend(std::iter::repeat_n(b'a', len)));
            assert_eq!(f.json.len(), len);
            assert_eq!(&f.frame[f.frame.len() - len..], &f.json[..]);
            assert_eq!(f.frame, encode(OpCode::Text, &f.json), "len {len}");
        }
    }

    #[test]
    fn unmask_round_trips_at_every_length() {
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut v = orig.clone();
            unmask(&mut v, [0xA1, 0xB2, 0xC3, 0xD4]);
            for (i, b) in v.iter().enumerate() {
                assert_eq!(*b, orig[i] ^ [0xA1, 0xB2, 0xC3, 0xD4][i % 4]);
            }
            unmask(&mut v, [0xA1, 0xB2, 0xC3, 0xD4]);
            assert_eq!(v, orig);
        }
    }

    #[test]
    fn reader_joins_fragments_and_passes_control_frames_between() {
        let mut buf = client(0x1, false, b"hel", [1, 2, 3, 4]);
        buf.extend(client(0x9, true, b"ping", [5, 6, 7, 8]));
        buf.extend(client(0x0, false, b"lo ", [0; 4]));
        buf.extend(client(0x0, true, "wörld".as_bytes(), [9, 8, 7, 6]));
        buf.extend(client(0x8, true, &[0x03, 0xE8], [1, 1, 1, 1]));
        let mut r = Reader::default();
        let mut at = 0;
        let mut got = Vec::new();
        while let (Some(m), used) = r.read(&mut buf[at..], 100).unwrap() {
            at += used;
            got.push(m);
        }
        assert_eq!(at, buf.len());
        assert_eq!(
            got,
            vec![
                Message::Ping(b"ping".to_vec()),
                Message::Text("hello wörld".into()),
                Message::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn reader_reports_fragments_used_while_waiting() {
        let first = client(0x1, false, b"ab", [0; 4]);
        let mut buf = first.clone();
        buf.extend(&client(0x0, true, b"cd", [0; 4])[..3]);
        let mut r = Reader::default();
        assert_eq!(r.read(&mut buf, 100).unwrap(), (None, first.len()));
        let mut rest = client(0x0, true, b"cd", [0; 4]);
        assert_eq!(
            r.read(&mut rest, 100).unwrap().0,
            Some(Message::Text("abcd".into()))
        );
    }

    #[test]
    fn reader_refuses_bad_sequences() {
        let mut r = Reader::default();
        let mut cont = client(0x0, true, b"x", [0; 4]);
        assert!(r.read(&mut cont, 100).is_err());
        let mut r = Reader::default();
        let mut two = client(0x1, false, b"a", [0; 4]);
        two.extend(client(0x1, true, b"b", [0; 4]));
        assert!(r.read(&mut two, 100).is_err());
        let mut r = Reader::default();
        let mut big = client(0x2, false, &[0; 60], [0; 4]);
        big.extend(client(0x0, true, &[0; 60], [0; 4]));
        assert_eq!(r.read(&mut big, 100), Err(FrameError::TooLarge));
        let mut r = Reader::default();
        let mut bad = client(0x1, true, &[0xC3, 0x28], [0; 4]);
        assert_eq!(r.read(&mut bad, 100), Err(FrameError::InvalidUtf8));
    }
}
