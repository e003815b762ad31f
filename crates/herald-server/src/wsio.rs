//! A server WebSocket over the raw TCP socket: the I/O half of [`herald_proto::ws`].
//!
//! What it keeps per connection is the point (PERFORMANCE.md S1, S3):
//! - no read buffer while idle: a readable socket is read into a stack scratch buffer, frames
//!   are decoded from it in place, and only the bytes of an unfinished frame are kept;
//! - no write buffer at all: frames are already encoded (a message's frame is encoded once and
//!   shared by every subscriber), and a batch leaves in one vectored write.

use std::io::{self, IoSlice};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use herald_proto::ws::{FrameError, Message, OpCode, Reader, encode, encode_close};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Bytes read per `read` call.
const READ_CHUNK: usize = 4096;
/// Frames per vectored write (well under every platform's `IOV_MAX`).
const IOV: usize = 64;

/// Why reading failed.
#[derive(Debug)]
pub enum WsError {
    Io(io::Error),
    /// The client broke the framing rules; answer with `close_code()`.
    Frame(FrameError),
}

impl From<io::Error> for WsError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<FrameError> for WsError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

/// The server end of one WebSocket connection.
pub struct WsSocket {
    tcp: TcpStream,
    /// Received bytes not yet decoded: only ever an unfinished frame, or frames that came in
    /// the same read as the message just returned. Unallocated while idle.
    pending: Vec<u8>,
    reader: Reader,
    max_message: usize,
}

impl WsSocket {
    /// `early` holds bytes the HTTP layer read past the upgrade request (a client may send its
    /// first frame right behind the handshake).
    pub fn new(tcp: TcpStream, early: Bytes, max_message: usize) -> Self {
        Self {
            tcp,
            pending: early.to_vec(),
            reader: Reader::default(),
            max_message,
        }
    }

    /// The next message or control frame; `Ok(None)` when the client closed the TCP
    /// connection. Cancel-safe: bytes read are kept before any await, so dropping the future
    /// (another `select!` branch won) loses nothing. The future is a reference and no more:
    /// readiness is polled through the socket's own waker slot.
    pub async fn next(&mut self) -> Result<Option<Message>, WsError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, WsError>> {
        loop {
            if !self.pending.is_empty() {
                let (msg, used) = self.reader.read(&mut self.pending, self.max_message)?;
                self.pending.drain(..used);
                if self.pending.is_empty() {
                    // Give the allocation back: idle connections hold no buffer.
                    self.pending = Vec::new();
                }
                if let Some(m) = msg {
                    return Poll::Ready(Ok(Some(m)));
                }
            }
            ready!(self.tcp.poll_read_ready(cx))?;
            let mut scratch = [0u8; READ_CHUNK];
            let n = match self.tcp.try_read(&mut scratch) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(n) => n,
                // Readiness was cleared: the next poll_read_ready registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            };
            if !self.pending.is_empty() {
                self.pending.extend_from_slice(&scratch[..n]);
                continue;
            }
            // The usual case: decode straight from the scratch buffer.
            let (msg, used) = self.reader.read(&mut scratch[..n], self.max_message)?;
            self.pending.extend_from_slice(&scratch[used..n]);
            if let Some(m) = msg {
                return Poll::Ready(Ok(Some(m)));
            }
        }
    }

    /// Writes whole frames, in order, with as few system calls as the socket allows. Like
    /// [`WsSocket::next`], the future holds no more than its position in `frames`.
    pub async fn write_frames(&mut self, frames: &[Bytes]) -> io::Result<()> {
        let mut at = (0, 0);
        std::future::poll_fn(|cx| self.poll_write_frames(cx, frames, &mut at)).await
    }

    /// Writes `frames` from `at` (frame index, offset in it) on; `at` records the progress.
    fn poll_write_frames(
        &mut self,
        cx: &mut Context<'_>,
        frames: &[Bytes],
        at: &mut (usize, usize),
    ) -> Poll<io::Result<()>> {
        let (idx, off) = at;
        loop {
            while *idx < frames.len() && frames[*idx].len() == *off {
                *idx += 1;
                *off = 0;
            }
            if *idx == frames.len() {
                return Poll::Ready(Ok(()));
            }
            let mut slices = [IoSlice::new(&[]); IOV];
            let mut k = 0;
            for (slot, f) in slices.iter_mut().zip(&frames[*idx..]) {
                *slot = IoSlice::new(if k == 0 { &f[*off..] } else { &f[..] });
                k += 1;
            }
            match self.tcp.try_write_vectored(&slices[..k]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(mut n) => {
                    while n > 0 && *idx < frames.len() {
                        let left = frames[*idx].len() - *off;
                        if n >= left {
                            n -= left;
                            *idx += 1;
                            *off = 0;
                        } else {
                            *off += n;
                            n = 0;
                        }
                    }
                }
                // Readiness was cleared: wait until the socket drains.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// One JSON text frame (replies and other per-connection frames; shared messages come
    /// framed already).
    pub async fn send_text(&mut self, json: &[u8]) -> io::Result<()> {
        self.write_frames(&[encode(OpCode::Text, json)]).await
    }

    pub async fn send_ping(&mut self) -> io::Result<()> {
        self.write_frames(&[Bytes::from_static(&[0x89, 0])]).await
    }

    pub async fn send_pong(&mut self, payload: &[u8]) -> io::Result<()> {
        self.write_frames(&[encode(OpCode::Pong, payload)]).await
    }

    /// Sends a close frame and ends our side of the TCP stream.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        self.write_frames(&[encode_close(code, reason)]).await?;
        self.tcp.shutdown().await
    }
}
