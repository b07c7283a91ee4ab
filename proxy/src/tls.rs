//! TLS ClientHello inspection for the SNI guard. The first bytes of a tunnel are fed to
//! rustls's [`Acceptor`], which parses the ClientHello without answering it; the raw bytes are
//! kept so they can be forwarded unchanged. This is also where a later TLS-interception step
//! would hand the parsed hello to a rustls server for chosen destinations.
//!
//! rustls reports a server name only when it is a valid DNS name, so a hello whose SNI is an IP
//! literal or garbage would look like one without SNI. [`hello_names`] therefore reads the
//! server name exactly as sent, and whether the hello carries Encrypted Client Hello (whose
//! inner, real server name the proxy cannot read), from the same bytes rustls accepted.

use std::borrow::Cow;
use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// TLS record type of a handshake, the first byte of every ClientHello.
const HANDSHAKE: u8 = 0x16;
/// The most ClientHello bytes the guard buffers before giving up on parsing.
const MAX_HELLO: usize = 64 * 1024;

/// Extension types that encrypt the real server name: `encrypted_client_hello` of RFC 9849
/// (0xfe0d) and of its drafts (0xfe08 to 0xfe0c, 0xff02), and the older `encrypted_server_name`
/// (0xffce).
const ENCRYPTED_NAME_EXTENSIONS: [u16; 8] = [
    0xfe0d, 0xfe0c, 0xfe0b, 0xfe0a, 0xfe09, 0xfe08, 0xff02, 0xffce,
];

/// What the SNI guard reads from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloNames {
    /// The server_name extension's host name as sent (an IP literal or an invalid name
    /// included; empty when the extension names no host); `None` without the extension.
    pub sni: Option<String>,
    /// Whether the hello carries Encrypted Client Hello (real or GREASE: they look the same).
    pub ech: bool,
}

/// What the first bytes of a tunnel turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// A complete ClientHello: its server name as sent, and whether it carries ECH.
    Tls(HelloNames),
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
            // rustls accepted a complete hello; read the names from the same bytes.
            Ok(Some(_)) => Some(match hello_names(buf) {
                Some(names) => FirstBytes::Tls(names),
                None => FirstBytes::Opaque,
            }),
            Ok(None) if buf.len() < MAX_HELLO => None,
            Ok(None) | Err(_) => Some(FirstBytes::Opaque),
        }
    }
}

/// Reads the server name and the ECH flag from the TLS records at the start of `bytes` (the
/// ClientHello may span several records); `None` if they do not hold a complete, well-formed
/// ClientHello.
pub fn hello_names(bytes: &[u8]) -> Option<HelloNames> {
    let message = handshake_message(bytes)?;
    let mut hello = Reader(message.get(4..)?);
    hello.take(2 + 32)?; // legacy_version, random
    let session_id = hello.u8()?;
    hello.take(session_id.into())?;
    let suites = hello.u16()?;
    hello.take(suites.into())?;
    let compression = hello.u8()?;
    hello.take(compression.into())?;
    let mut names = HelloNames {
        sni: None,
        ech: false,
    };
    if hello.0.is_empty() {
        return Some(names); // No extensions at all (TLS 1.0 style).
    }
    let length = hello.u16()?;
    let mut extensions = Reader(hello.take(length.into())?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let length = extensions.u16()?;
        let data = extensions.take(length.into())?;
        if kind == 0 {
            names.sni = Some(server_name(data));
        } else if ENCRYPTED_NAME_EXTENSIONS.contains(&kind) {
            names.ech = true;
        }
    }
    Some(names)
}

/// The ClientHello message at the start of `bytes`, joined across TLS records if it is
/// fragmented (borrowed when one record holds it, as it almost always does).
fn handshake_message(bytes: &[u8]) -> Option<Cow<'_, [u8]>> {
    let (first, mut rest) = handshake_record(bytes)?;
    if let Some(whole) = whole_hello(first)? {
        return Some(Cow::Borrowed(&first[..whole]));
    }
    let mut joined = first.to_vec();
    loop {
        if joined.len() > MAX_HELLO {
            return None;
        }
        let (payload, tail) = handshake_record(rest)?;
        rest = tail;
        joined.extend_from_slice(payload);
        if let Some(whole) = whole_hello(&joined)? {
            joined.truncate(whole);
            return Some(Cow::Owned(joined));
        }
    }
}

/// The payload of the TLS handshake record at the start of `bytes`, and the bytes after it.
fn handshake_record(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    if bytes.len() < 5 || bytes[0] != HANDSHAKE {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    let payload = bytes.get(5..5 + length)?;
    Some((payload, &bytes[5 + length..]))
}

/// Handshake bytes seen so far: `Some(Some(n))` when they hold a whole ClientHello of `n`
/// bytes, `Some(None)` when it goes on in the next record, `None` when they are no ClientHello.
fn whole_hello(message: &[u8]) -> Option<Option<usize>> {
    match message {
        [] => Some(None),
        [kind, ..] if *kind != 1 => None,
        [_, a, b, c, ..] => {
            let whole = 4 + (usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c));
            Some((message.len() >= whole).then_some(whole))
        }
        _ => Some(None),
    }
}

/// The host name of a server_name extension (its first `host_name` entry), as sent.
fn server_name(data: &[u8]) -> String {
    let mut list = Reader(data);
    let entries = list.u16().and_then(|length| list.take(length.into()));
    let mut entries = Reader(entries.unwrap_or_default());
    while let Some(kind) = entries.u8() {
        let Some(name) = entries.u16().and_then(|length| entries.take(length.into())) else {
            break;
        };
        if kind == 0 {
            return String::from_utf8_lossy(name).into_owned();
        }
    }
    String::new()
}

/// Big-endian reads from a byte slice that fail instead of running past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `data` behind a big-endian length of `width` bytes.
    fn prefixed(width: usize, data: &[u8]) -> Vec<u8> {
        let mut out = data.len().to_be_bytes()[8 - width..].to_vec();
        out.extend_from_slice(data);
        out
    }

    /// The handshake message of a ClientHello with these extensions (type, data).
    fn hello_message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = [
            [3u8, 3].as_slice(),
            &[9; 32],
            &[0],
            &[0, 2, 0x13, 1],
            &[1, 0],
        ]
        .concat();
        let list: Vec<u8> = extensions
            .iter()
            .flat_map(|(kind, data)| [kind.to_be_bytes().to_vec(), prefixed(2, data)].concat())
            .collect();
        body.extend(prefixed(2, &list));
        [vec![1], prefixed(3, &body)].concat()
    }

    /// `message` in TLS handshake records of at most `chunk` bytes each.
    fn records(message: &[u8], chunk: usize) -> Vec<u8> {
        message
            .chunks(chunk)
            .flat_map(|part| [vec![HANDSHAKE, 3, 1], prefixed(2, part)].concat())
            .collect()
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        (
            0,
            prefixed(2, &[vec![0], prefixed(2, name.as_bytes())].concat()),
        )
    }

    fn check(bytes: &[u8], sni: Option<&str>, ech: bool) {
        let expected = HelloNames {
            sni: sni.map(str::to_owned),
            ech,
        };
        assert_eq!(hello_names(bytes), Some(expected));
    }

    #[test]
    fn names_are_read_as_sent() {
        let message = hello_message(&[sni("example.test"), (0x000a, vec![0, 2, 0, 0x1d])]);
        check(&records(&message, 1 << 14), Some("example.test"), false);
        check(
            &records(&hello_message(&[(0x000a, vec![0, 2, 0, 0x1d])]), 1 << 14),
            None,
            false,
        );
        let message = hello_message(&[sni("127.0.0.1")]);
        check(&records(&message, 1 << 14), Some("127.0.0.1"), false);
        let message = hello_message(&[sni("a..b"), (0xfe0d, vec![0, 0, 1, 0, 1, 7])]);
        check(&records(&message, 1 << 14), Some("a..b"), true);
        let message = hello_message(&[(0xffce, vec![1, 2])]);
        check(&records(&message, 1 << 14), None, true);
        // A server_name extension that names no host names nothing usable.
        let message = hello_message(&[(0, vec![0, 3, 9, 0, 0])]);
        check(&records(&message, 1 << 14), Some(""), false);
    }

    #[test]
    fn a_hello_split_over_records_is_joined() {
        let message = hello_message(&[sni("example.test"), (0xfe0d, vec![0])]);
        for chunk in [1, 3, 4, 5, 17, message.len() - 1] {
            check(&records(&message, chunk), Some("example.test"), true);
        }
    }

    #[test]
    fn anything_short_of_a_whole_hello_is_none() {
        let bytes = records(&hello_message(&[sni("example.test")]), 40);
        for end in 0..bytes.len() {
            assert_eq!(hello_names(&bytes[..end]), None, "{end} bytes");
        }
        let mut server_hello = hello_message(&[]);
        server_hello[0] = 2;
        assert_eq!(hello_names(&records(&server_hello, 1 << 14)), None);
        // An extension list that runs past its end.
        let mut message = hello_message(&[sni("example.test")]);
        let last = message.len() - 1;
        message.truncate(last);
        message[3] -= 1;
        assert_eq!(hello_names(&records(&message, 1 << 14)), None);
    }
}
