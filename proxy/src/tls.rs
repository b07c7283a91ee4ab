//! TLS ClientHello inspection for the SNI guard. The first bytes of a tunnel are fed to
//! rustls's [`Acceptor`], which parses the ClientHello without answering it; the raw bytes are
//! kept so they can be forwarded unchanged. This is also where a later TLS-interception step
//! would hand the parsed hello to a rustls server for chosen destinations.

use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// TLS record type of a handshake, the first byte of every ClientHello.
const HANDSHAKE: u8 = 0x16;
/// The most ClientHello bytes the guard buffers before giving up on parsing.
const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a tunnel turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// A complete ClientHello, with its server name if it carried one.
    Tls { sni: Option<String> },
    /// Bytes that are not a TLS ClientHello.
    Opaque,
    /// The client closed the tunnel without sending anything.
    Closed,
    /// The upstream spoke first (a server-first protocol); only possible with opaque allowed.
    UpstreamFirst,
    /// The client sent nothing within the timeout.
    TimedOut,
}

/// Reads from `client` into `buf` (which may already hold pipelined bytes) until a whole
/// ClientHello is parsed or the bytes cannot be one. With `upstream` given, an upstream that
/// becomes readable before the client sends anything ends the wait.
pub async fn read_client_hello(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    upstream: Option<&TcpStream>,
    timeout: Duration,
) -> std::io::Result<FirstBytes> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut hello = HelloParser::default();
    loop {
        if let Some(first) = hello.push(buf) {
            return Ok(first);
        }
        let before = buf.len();
        buf.reserve(4096);
        let read = async {
            match (upstream, before) {
                (Some(up), 0) => tokio::select! {
                    r = client.read_buf(buf) => r.map(Some),
                    r = up.readable() => r.map(|_| None),
                },
                _ => client.read_buf(buf).await.map(Some),
            }
        };
        match tokio::time::timeout_at(deadline, read).await {
            Err(_) if before == 0 => return Ok(FirstBytes::TimedOut),
            Err(_) => return Ok(FirstBytes::Opaque),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Ok(FirstBytes::UpstreamFirst),
            Ok(Ok(Some(0))) if before == 0 => return Ok(FirstBytes::Closed),
            Ok(Ok(Some(0))) => return Ok(FirstBytes::Opaque),
            Ok(Ok(Some(_))) => {}
        }
    }
}

/// The ClientHello parse of [`read_client_hello`] without the socket: fed the growing buffer
/// after every read, it says what the bytes are as soon as that is known. Separate so any bytes
/// in any split can be fed to it (the fuzz targets do).
#[derive(Default)]
pub struct HelloParser {
    acceptor: Acceptor,
    /// How many bytes of the buffer the acceptor has taken.
    fed: usize,
}

impl HelloParser {
    /// Takes the bytes of `buf` not fed yet (`buf` holds every byte so far, as read) and returns
    /// what they are, or `None` while a ClientHello may still be arriving.
    pub fn push(&mut self, buf: &[u8]) -> Option<FirstBytes> {
        let first = *buf.first()?;
        if first != HANDSHAKE {
            return Some(FirstBytes::Opaque);
        }
        while self.fed < buf.len() {
            match self.acceptor.read_tls(&mut &buf[self.fed..]) {
                Ok(n) => self.fed += n,
                Err(_) => return Some(FirstBytes::Opaque),
            }
        }
        match self.acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                Some(FirstBytes::Tls { sni })
            }
            Ok(None) if buf.len() < MAX_HELLO => None,
            Ok(None) | Err(_) => Some(FirstBytes::Opaque),
        }
    }
}
