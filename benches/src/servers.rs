//! The upstream side of every path: an echo/sink server for tunnels and a plain HTTP origin.
//!
//! Both listen on 127.0.0.1 ephemeral ports and are shared by all four paths, so every peer
//! talks to exactly the same upstream. They are deliberately minimal so that they cost the same
//! whichever peer is in front of them.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use paude_proxy::relay::relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A server task that stops when this handle is dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the echo/sink server: every byte a connection sends comes back on it, copied through
/// a buffer of `buffer` bytes (one read, one write, repeat).
pub async fn start_echo(buffer: usize) -> anyhow::Result<Server> {
    serve(move |stream| async move {
        let _ = echo(stream, buffer).await;
    })
    .await
}

/// Starts the HTTP origin: every request gets a small keep-alive `200 OK`.
pub async fn start_origin() -> anyhow::Result<Server> {
    serve(|stream| async move {
        let _ = answer_requests(stream).await;
    })
    .await
}

async fn serve<F, Fut>(handle: F) -> anyhow::Result<Server>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // A deep accept backlog, so 256 concurrent connects are queued rather than dropped.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("cannot bind a loopback port for an upstream server")?;
    let listener: TcpListener = socket.listen(4096)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream));
                }
                // Running out of descriptors must not end the server: wait and accept again.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    });
    Ok(Server { addr, task })
}

/// The echo server's copy buffer in the tunnel and bulk scenarios.
pub const ECHO_BUFFER: usize = 64 * 1024;
/// The small-buffer echo server's: an upstream that reads and writes 8 KiB at a time.
pub const SMALL_ECHO_BUFFER: usize = 8 * 1024;

async fn echo(mut stream: TcpStream, buffer: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; buffer];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// Nanoseconds on the clock event stamps are taken on. The event-stream server runs inside the
/// load generator, so sender and receiver read the same clock and a stamp's age is the event's
/// delivery delay.
pub fn clock_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// The path the event-stream server answers on.
pub const EVENTS_PATH: &str = "/v1/stream";

/// Starts the event-stream server: HTTPS (certificate for `bench.test`), one `text/event-stream`
/// response per connection with a small event every `interval`, as a model API streams tokens.
/// Each event carries the time it was written ([`clock_ns`]); the stream ends when the client
/// closes.
pub async fn start_event_stream(
    tls: std::sync::Arc<rustls::ServerConfig>,
    interval: std::time::Duration,
) -> anyhow::Result<Server> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let _ = event_stream(acceptor, stream, interval).await;
        }
    })
    .await
}

async fn event_stream(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    interval: std::time::Duration,
) -> anyhow::Result<()> {
    let mut tls = acceptor.accept(stream).await?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "client closed before its request head ended");
        head.extend_from_slice(&chunk[..n]);
    }
    tls.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
    )
    .await?;
    tls.flush().await?;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 0u64.. {
        ticker.tick().await;
        let event = format!(
            "id: {seq}\nevent: content_block_delta\ndata: {{\"type\":\"text_delta\",\"sent_ns\":{},\"text\":\" a few tokens\"}}\n\n",
            clock_ns()
        );
        tls.write_all(event.as_bytes()).await?;
        tls.flush().await?;
    }
    Ok(())
}

const BODY: &[u8] = b"hello, bench\n";

async fn answer_requests(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let status = request
            .parse(&buf)
            .context("origin got a malformed request")?;
        let httparse::Status::Complete(head_len) = status else {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            continue;
        };
        let keep_alive = wants_keep_alive(&request);
        buf.drain(..head_len);
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
            BODY.len()
        );
        let mut out = response.into_bytes();
        out.extend_from_slice(BODY);
        stream.write_all(&out).await?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn wants_keep_alive(request: &httparse::Request) -> bool {
    let connection = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    if request.version == Some(0) {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    }
}

/// A server of this benchmark running in a child process of its own (`paude-benches
/// echo-server` or `paude-benches bare-relay`), killed when dropped.
///
/// Every idle tunnel holds one descriptor in the load generator and one in the echo server, and
/// a process may hold at most `ulimit -Hn` descriptors: keeping the echo server out of the load
/// generator's process lets both ends of 10,000 tunnels fit. Its own process also lets the
/// benchmark account its CPU time apart from the load generator's.
pub struct HelperProcess {
    pub addr: SocketAddr,
    pub child: tokio::process::Child,
}

impl HelperProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Starts `helper <subcommand>` and waits for the `<banner><address>` line it prints.
pub async fn spawn_helper(
    helper: &std::path::Path,
    args: &[&str],
    banner: &str,
) -> anyhow::Result<HelperProcess> {
    use tokio::io::AsyncBufReadExt;
    let subcommand = args.first().copied().unwrap_or_default();
    let mut child = tokio::process::Command::new(helper)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start `{} {subcommand}`", helper.display()))?;
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("`{subcommand}` stdout was not captured"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .with_context(|| format!("`{subcommand}` did not print its address within 10 s"))??
        .with_context(|| format!("`{subcommand}` exited before printing its address"))?;
    let addr = line
        .strip_prefix(banner)
        .and_then(|rest| rest.trim().parse().ok())
        .with_context(|| format!("`{subcommand}` printed {line:?} instead of its address"))?;
    Ok(HelperProcess { addr, child })
}

/// Starts the echo server in a process of its own, copying through `buffer` bytes.
pub async fn spawn_echo_process(
    helper: &std::path::Path,
    buffer: usize,
) -> anyhow::Result<HelperProcess> {
    spawn_helper(
        helper,
        &["echo-server", "--buffer", &buffer.to_string()],
        ECHO_BANNER,
    )
    .await
}

const ECHO_BANNER: &str = "paude-benches echo listening on ";
pub const RELAY_BANNER: &str = "paude-benches bare relay listening on ";

/// The body of `paude-benches echo-server`: serve until standard input closes (the parent died
/// or dropped its handle), so the server never outlives the run.
pub async fn serve_echo_until_stdin_closes(buffer: usize) -> anyhow::Result<()> {
    let server = start_echo(buffer).await?;
    announce(ECHO_BANNER, server.addr)?;
    wait_for_stdin_to_close().await
}

fn announce(banner: &str, addr: SocketAddr) -> anyhow::Result<()> {
    use std::io::Write as _;
    println!("{banner}{addr}");
    std::io::stdout().flush()?;
    Ok(())
}

async fn wait_for_stdin_to_close() -> anyhow::Result<()> {
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    stdin.read_to_end(&mut sink).await?;
    Ok(())
}

/// The body of `paude-benches bare-relay`: the least work a CONNECT proxy can do, as a floor
/// to measure paude-proxy against. It reads the CONNECT head, refuses any host but the
/// benchmark's with a bare `403`, dials 127.0.0.1 at the requested port, answers `200` and
/// relays bytes both ways with paude-proxy's relay loop; no policy, no name resolution, no address or
/// SNI checks, no logs, no limits. It is built like paude-proxy (one current-thread runtime per
/// CPU, each with its own `SO_REUSEPORT` listener), so the gap between the two is what
/// paude-proxy's guards cost, and the gap between it and the direct path is what any proxy hop
/// costs on this machine.
pub fn serve_bare_relay_until_stdin_closes() -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listeners = control.block_on(async {
        let mut listeners = Vec::with_capacity(threads);
        let mut addr = SocketAddr::from(([127, 0, 0, 1], 0));
        for _ in 0..threads {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            let listener = socket.listen(4096)?;
            addr = listener.local_addr()?;
            listeners.push(listener.into_std()?);
        }
        anyhow::Ok(listeners)
    })?;
    announce(RELAY_BANNER, listeners[0].local_addr()?)?;
    for listener in listeners {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(async move {
                                let _ = bare_relay(stream).await;
                            });
                        }
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                    }
                }
            })
        });
    }
    control.block_on(wait_for_stdin_to_close())
}

async fn bare_relay(mut client: TcpStream) -> anyhow::Result<()> {
    client.set_nodelay(true)?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = client.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "client closed before its request head ended");
        head.extend_from_slice(&chunk[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(head.len() < 64 * 1024, "request head too large");
    };
    let text = std::str::from_utf8(&head[..end])?;
    let mut words = text.split_whitespace();
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    // A CONNECT names host:port; a plain request names http://host:port/path, whose first
    // request line is rewritten to origin form (the least a forward proxy must do), after which
    // the connection is relayed as it is: every connection of the benchmark talks to one origin.
    let (authority, rewritten) = match (method, target.strip_prefix("http://")) {
        ("CONNECT", _) => (target, None),
        (_, Some(rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let path = if path.is_empty() { "/" } else { path };
            let line_end = text.find("\r\n").context("request head has no line end")?;
            let version = text[..line_end].rsplit(' ').next().unwrap_or("HTTP/1.1");
            let mut out = format!("{method} {path} {version}").into_bytes();
            out.extend_from_slice(&head[line_end..]);
            (authority, Some(out))
        }
        _ => anyhow::bail!("neither a CONNECT nor an absolute-form request"),
    };
    let (host, port) = authority
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .context("the request names no host with a port")?;
    // The cheapest refusal there is: one comparison, one short answer, close.
    if host != crate::client::HOST {
        client
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    upstream.set_nodelay(true)?;
    match rewritten {
        Some(request) => upstream.write_all(&request).await?,
        None => {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            if head.len() > end {
                upstream.write_all(&head[end..]).await?;
            }
        }
    }
    // paude-proxy's own relay loop, so the floor moves bytes exactly as the product does.
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (to_upstream, to_client) = tokio::join!(
        relay(&client, &upstream, &up),
        relay(&upstream, &client, &down)
    );
    to_upstream?;
    to_client?;
    Ok(())
}
