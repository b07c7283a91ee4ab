//! The load generator's wire primitives: open a guarded tunnel, be refused, send a keep-alive GET.
//!
//! Each primitive speaks raw HTTP/1.1 over a real loopback socket, either straight to the
//! upstream (the direct path) or through a proxy, so the four paths differ only in what sits
//! between the load generator and the upstream servers.

use std::net::SocketAddr;

use anyhow::{bail, ensure, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The allowed host every path tunnels to and fetches from (pinned to 127.0.0.1 in each peer).
pub const HOST: &str = "bench.test";
/// A host no peer allows: CONNECTs to it measure the cost of a refusal.
pub const DENIED_HOST: &str = "denied.test";

/// How the load generator reaches the upstream servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Straight to the upstream server: the physical limit.
    Direct,
    /// Through the proxy listening at this address.
    Proxy(SocketAddr),
}

/// Opens a tunnel to the echo server and completes one echo round trip of `hello`, the
/// ClientHello that paude-proxy inspects. Returns the open tunnel.
pub async fn open_tunnel(
    route: Route,
    echo: SocketAddr,
    hello: &[u8],
) -> anyhow::Result<TcpStream> {
    let mut stream;
    let mut leftover = Vec::new();
    match route {
        Route::Direct => {
            stream = connect(echo).await?;
        }
        Route::Proxy(proxy) => {
            stream = connect(proxy).await?;
            let port = echo.port();
            let request = format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let head = read_head(&mut stream, &mut leftover).await?;
            ensure!(
                head.status == 200,
                "proxy answered CONNECT with status {}",
                head.status
            );
        }
    }
    stream.write_all(hello).await?;
    let mut echoed = vec![0u8; hello.len()];
    let from_leftover = leftover.len().min(echoed.len());
    echoed[..from_leftover].copy_from_slice(&leftover[..from_leftover]);
    stream
        .read_exact(&mut echoed[from_leftover..])
        .await
        .context("tunnel closed before the ClientHello came back")?;
    ensure!(
        echoed == hello,
        "tunnel echoed different bytes than it was sent"
    );
    Ok(stream)
}

/// Opens a connection to `upstream`, straight or through a proxy's CONNECT tunnel, and returns
/// it as soon as the tunnel is up, before any byte of the upstream's protocol has been sent.
pub async fn open_raw_tunnel(route: Route, upstream: SocketAddr) -> anyhow::Result<TcpStream> {
    match route {
        Route::Direct => connect(upstream).await,
        Route::Proxy(proxy) => {
            let mut stream = connect(proxy).await?;
            let port = upstream.port();
            let request = format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut leftover = Vec::new();
            let head = read_head(&mut stream, &mut leftover).await?;
            ensure!(
                head.status == 200,
                "proxy answered CONNECT with status {}",
                head.status
            );
            ensure!(
                leftover.is_empty(),
                "proxy sent bytes behind its CONNECT answer before the client spoke"
            );
            Ok(stream)
        }
    }
}

/// Asks the proxy for a tunnel to the denied host and returns the refusal's status code.
pub async fn denied_connect(proxy: SocketAddr) -> anyhow::Result<u16> {
    let mut stream = connect(proxy).await?;
    let request = format!("CONNECT {DENIED_HOST}:443 HTTP/1.1\r\nHost: {DENIED_HOST}:443\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let head = read_head(&mut stream, &mut Vec::new()).await?;
    ensure!(
        (400..500).contains(&head.status),
        "proxy answered a CONNECT to a denied host with status {}",
        head.status
    );
    Ok(head.status)
}

/// A keep-alive HTTP client connection that reconnects when the other side closes it.
pub struct HttpClient {
    target: SocketAddr,
    request: Vec<u8>,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    /// How many times the peer closed the connection and a new one had to be opened.
    pub reconnects: u64,
}

impl HttpClient {
    pub fn new(route: Route, origin: SocketAddr) -> Self {
        let port = origin.port();
        let (target, request) = match route {
            Route::Direct => (
                origin,
                format!("GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
            ),
            Route::Proxy(proxy) => (
                proxy,
                format!("GET http://{HOST}:{port}/ HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
            ),
        };
        Self {
            target,
            request: request.into_bytes(),
            stream: None,
            buf: Vec::new(),
            reconnects: 0,
        }
    }

    /// Sends one GET and reads the whole response. A reused connection that the peer closed
    /// before answering is retried once on a fresh one, as browsers and HTTP libraries do.
    pub async fn get(&mut self) -> anyhow::Result<()> {
        let reused = self.stream.is_some();
        match self.try_get().await {
            Err(error) if reused && self.buf.is_empty() && is_early_close(&error) => {
                self.stream = None;
                self.reconnects += 1;
                self.try_get().await
            }
            result => result,
        }
    }

    async fn try_get(&mut self) -> anyhow::Result<()> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                self.buf.clear();
                self.stream.insert(connect(self.target).await?)
            }
        };
        stream.write_all(&self.request).await?;
        let head = read_head(stream, &mut self.buf).await?;
        ensure!(
            head.status == 200,
            "GET answered with status {}",
            head.status
        );
        let length = head
            .content_length
            .context("response has no Content-Length")?;
        while self.buf.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            ensure!(n > 0, "connection closed in the middle of a response body");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.buf.drain(..length);
        if head.close {
            self.stream = None;
            self.reconnects += 1;
        }
        Ok(())
    }
}

/// Whether `error` says the other side closed the connection before a response began.
pub fn is_early_close(error: &anyhow::Error) -> bool {
    error.to_string() == EARLY_CLOSE
        || error.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            )
        })
}

const EARLY_CLOSE: &str = "connection closed before a complete response head";

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What the load generator needs of a response head.
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Reads one response head; `buf` holds bytes already read and keeps the bytes that follow it.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Head> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) =
            response.parse(buf).context("malformed response head")?
        {
            let mut content_length = None;
            let mut close = response.version == Some(0);
            for header in response.headers.iter() {
                let value = String::from_utf8_lossy(header.value).to_ascii_lowercase();
                if header.name.eq_ignore_ascii_case("content-length") {
                    content_length = Some(value.trim().parse().context("bad Content-Length")?);
                } else if header.name.eq_ignore_ascii_case("connection")
                    || header.name.eq_ignore_ascii_case("proxy-connection")
                {
                    close = value.contains("close") || (close && !value.contains("keep-alive"));
                }
            }
            let status = response.code.context("response head has no status")?;
            buf.drain(..len);
            return Ok(Head {
                status,
                content_length,
                close,
            });
        }
        if buf.len() > 64 * 1024 {
            bail!("response head longer than 64 KiB");
        }
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "{EARLY_CLOSE}");
        buf.extend_from_slice(&chunk[..n]);
    }
}
