//! The first request head of a connection, read on the bare socket. A CONNECT (what almost
//! every client connection of a sandbox is) is then served entirely in the connection's own
//! task, without hyper, an upgrade hand-off or a second task; anything else goes to hyper with
//! the bytes already read replayed in front ([`Rewind`]).
//!
//! Both paths close with a lingering close ([`Linger`]): the answer is followed by a FIN, then
//! what the client still sends is read and thrown away for a bounded time and size before the
//! socket closes. Closing a socket with unread input sends a reset, and a client still sending
//! (a 200 KB head refused with 431) would lose the answer to it, as nginx's lingering close
//! avoids too.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::Limits;
use crate::error::Reason;

/// The most headers a CONNECT head may carry.
const MAX_HEADERS: usize = 64;

/// What the first bytes of a connection are.
#[derive(Debug, PartialEq, Eq)]
pub enum First {
    /// A complete CONNECT head for `authority`; `rest` holds the bytes behind it.
    Connect { authority: String, rest: Vec<u8> },
    /// Not a CONNECT: hyper serves it, starting with `read`.
    Http { read: Vec<u8> },
    /// A CONNECT head that is malformed or too large.
    Malformed(Reason),
    /// The client closed, failed or timed out before a complete CONNECT head.
    Gone,
}

/// The request line's first bytes that make a connection a bare-socket CONNECT.
const CONNECT: &[u8] = b"CONNECT ";

/// Reads until the connection is known not to start with a CONNECT, or its CONNECT head is
/// complete. Bounded by the header timeout and the header size limit.
pub async fn read_first(stream: &mut TcpStream, limits: &Limits) -> First {
    let deadline = tokio::time::Instant::now() + limits.header_timeout;
    let mut buf = Vec::with_capacity(4096);
    loop {
        if let Some(first) = classify(&mut buf, limits.max_header_bytes) {
            return first;
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                return if buf.is_empty() || buf.starts_with(CONNECT) {
                    First::Gone
                } else {
                    First::Http { read: buf }
                };
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// What the bytes read so far (`buf`) make of a connection's start, or `None` while more are
/// needed. The decision [`read_first`] takes after every read, without the socket, so it can be
/// fed any bytes in any split (the fuzz targets do). Takes the bytes out of `buf` once it decides.
pub fn classify(buf: &mut Vec<u8>, max_header_bytes: usize) -> Option<First> {
    let prefix = buf.len().min(CONNECT.len());
    if buf[..prefix] != CONNECT[..prefix] {
        return Some(First::Http {
            read: std::mem::take(buf),
        });
    }
    if buf.len() >= CONNECT.len() {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let authority = req.path.unwrap_or("").to_owned();
                let rest = buf.split_off(len);
                buf.clear();
                return Some(First::Connect { authority, rest });
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Some(First::Malformed(Reason::HeaderTooLarge))
            }
            Err(_) => return Some(First::Malformed(Reason::BadRequest)),
        }
    }
    if buf.len() >= max_header_bytes {
        return Some(First::Malformed(Reason::HeaderTooLarge));
    }
    None
}

/// A lingering close ends when the client has sent nothing for this long.
const LINGER_IDLE: Duration = Duration::from_secs(2);
/// A lingering close ends after this long whatever the client does.
const LINGER_TOTAL: Duration = Duration::from_secs(5);
/// A lingering close ends after reading this much.
const LINGER_BYTES: usize = 1024 * 1024;

/// A lingering close in progress: the write side is shut, input is drained and dropped until the
/// client closes, goes quiet for [`LINGER_IDLE`], or [`LINGER_TOTAL`] or [`LINGER_BYTES`] is
/// reached.
pub struct Linger {
    shut: bool,
    drained: usize,
    until: Instant,
    quiet: Pin<Box<Sleep>>,
}

impl Linger {
    fn new() -> Linger {
        let now = Instant::now();
        Linger {
            shut: false,
            drained: 0,
            until: now + LINGER_TOTAL,
            quiet: Box::pin(tokio::time::sleep_until(now + LINGER_IDLE)),
        }
    }

    /// Shuts the write side of `stream` (once), then drains it; ready when the close may go
    /// ahead.
    fn poll(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<()> {
        if !self.shut {
            // A failed shutdown (the client already reset the connection) ends the linger.
            if ready!(Pin::new(&mut *stream).poll_shutdown(cx)).is_err() {
                return Poll::Ready(());
            }
            self.shut = true;
        }
        let mut scratch = [0u8; 8192];
        while self.drained < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    self.drained += buf.filled().len();
                    let quiet_until = (Instant::now() + LINGER_IDLE).min(self.until);
                    self.quiet.as_mut().reset(quiet_until);
                }
                // The client closed (or failed): nothing more can arrive.
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return self.quiet.as_mut().poll(cx),
            }
        }
        Poll::Ready(())
    }
}

/// Closes a connection the proxy refused: shuts the write side after the answer, then lingers
/// if the client may still be sending. With `expect_more` (a head that was too large or
/// malformed, or bytes pipelined behind a refused request) it always lingers; otherwise only if
/// input is already waiting.
pub async fn linger_close(stream: &mut TcpStream, expect_more: bool) {
    let mut linger = Linger::new();
    if !expect_more {
        let _ = stream.shutdown().await;
        linger.shut = true;
        let mut probe = [0u8; 1];
        match stream.try_read(&mut probe) {
            Ok(n) if n > 0 => linger.drained = n,
            _ => return,
        }
    }
    poll_fn(|cx| linger.poll(stream, cx)).await;
}

/// A TCP stream with bytes already read replayed in front of it. When hyper shuts it down (the
/// connection ends), it closes with a lingering close.
pub struct Rewind {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
    linger: Option<Linger>,
}

impl Rewind {
    pub fn new(prefix: Vec<u8>, inner: TcpStream) -> Rewind {
        Rewind {
            prefix,
            pos: 0,
            inner,
            linger: None,
        }
    }

    /// The stream and the replayed bytes nobody read yet.
    pub fn into_inner(self) -> (TcpStream, Vec<u8>) {
        let rest = self.prefix[self.pos..].to_vec();
        (self.inner, rest)
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                // Replayed completely: give the memory back.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let linger = this.linger.get_or_insert_with(Linger::new);
        linger.poll(&mut this.inner, cx).map(Ok)
    }
}
