//! The upstream side of every path: an echo/sink server for tunnels and a plain HTTP origin.
//!
//! Both listen on 127.0.0.1 ephemeral ports and are shared by all four paths, so every peer
//! talks to exactly the same upstream. They are deliberately minimal so that they cost the same
//! whichever peer is in front of them.

use std::net::SocketAddr;

use anyhow::Context;
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

/// Starts the echo/sink server: every byte a connection sends comes back on it.
pub async fn start_echo() -> anyhow::Result<Server> {
    serve(|stream| async move {
        let _ = echo(stream).await;
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

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
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

/// The echo server running in a child process of its own (`paude-benches echo-server`).
///
/// Every idle tunnel holds one descriptor in the load generator and one in the echo server, and
/// a process may hold at most `ulimit -Hn` descriptors: keeping the echo server out of the load
/// generator's process lets both ends of 10,000 tunnels fit.
pub struct EchoProcess {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
}

/// Starts `helper echo-server` and waits for the address it prints.
pub async fn spawn_echo_process(helper: &std::path::Path) -> anyhow::Result<EchoProcess> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(helper)
        .arg("echo-server")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start the echo server {}", helper.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("echo server stdout was not captured")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .context("the echo server did not print its address within 10 s")??
        .context("the echo server exited before printing its address")?;
    let addr = line
        .strip_prefix(ECHO_BANNER)
        .and_then(|rest| rest.trim().parse().ok())
        .with_context(|| format!("the echo server printed {line:?} instead of its address"))?;
    Ok(EchoProcess {
        addr,
        _child: child,
    })
}

const ECHO_BANNER: &str = "paude-benches echo listening on ";

/// The body of `paude-benches echo-server`: serve until standard input closes (the parent died
/// or dropped its handle), so the server never outlives the run.
pub async fn serve_echo_until_stdin_closes() -> anyhow::Result<()> {
    let server = start_echo().await?;
    println!("{ECHO_BANNER}{}", server.addr);
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    stdin.read_to_end(&mut sink).await?;
    Ok(())
}
