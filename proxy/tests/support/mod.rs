//! Helpers for the integration tests: start the real paude-proxy binary on a loopback port,
//! start plain HTTP and TLS upstreams on 127.0.0.1 (TLS with a CA made at test time), and
//! speak raw HTTP or TLS through the proxy. Every blocking read has a timeout and every async
//! wait is bounded, so a hang fails the test instead of stalling the suite.

#![allow(dead_code)]

#[path = "../../../tests/require.rs"]
pub mod require;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The bound on every wait in these tests: a guard against hangs, not a measure of speed, so it
/// is generous enough for a machine busy with other builds. No passing test waits for it.
pub const T: Duration = Duration::from_secs(30);

/// Open file descriptors by kind, from `/proc/PID/fd`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FdCount {
    pub sockets: usize,
    pub pipes: usize,
    pub other: usize,
}

/// A running paude-proxy binary, killed when dropped.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    /// The read end of a stdout pipe nobody reads ([`Proxy::start_with_stalled_stdout`]), kept
    /// open so the proxy's writes block instead of failing.
    stalled_stdout: Option<std::process::ChildStdout>,
    /// The threads copying the child's stdout and stderr; they end when the child's pipes
    /// close, so joining them after exit means every line it wrote has been read.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts the binary on 127.0.0.1:0 with `args` and waits for its listening line.
    pub fn start(args: &[&str]) -> Proxy {
        Proxy::try_start(args).unwrap_or_else(|e| panic!("paude-proxy did not start: {e}"))
    }

    /// Starts the binary like [`Proxy::start`], but nobody ever reads its stdout: once the pipe
    /// is full, every write to stdout blocks (an audit log reader that stopped reading).
    pub fn start_with_stalled_stdout(args: &[&str]) -> Proxy {
        Proxy::try_start_with(args, false)
            .unwrap_or_else(|e| panic!("paude-proxy did not start: {e}"))
    }

    /// Starts the binary, returning its stderr if it exits before listening.
    pub fn try_start(args: &[&str]) -> Result<Proxy, String> {
        Proxy::try_start_with(args, true)
    }

    fn try_start_with(args: &[&str], read_stdout: bool) -> Result<Proxy, String> {
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_paude-proxy"))
            .args(listen)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the paude-proxy binary runs");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let stdout = Arc::new(Mutex::new(String::new()));
        let out_pipe = child.stdout.take().expect("stdout is piped");
        let (stalled_stdout, stdout_reader) = if read_stdout {
            let out_sink = stdout.clone();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(out_pipe).lines().map_while(Result::ok) {
                    let mut out = out_sink.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
            (None, Some(reader))
        } else {
            (Some(out_pipe), None)
        };
        let mut addr = None;
        let mut admin = None;
        let want_admin = args.contains(&"--admin-listen");
        let deadline = Instant::now() + T;
        while addr.is_none() || (want_admin && admin.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("paude-proxy listening on ") {
                        addr = Some(a.trim().parse().expect("a socket address"));
                    } else if let Some(a) = line.strip_prefix("paude-proxy admin listening on ") {
                        admin = Some(a.trim().parse().expect("a socket address"));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // Once the child is gone its pipes close: the readers have every line.
                    let _ = stderr_reader.join();
                    if let Some(reader) = stdout_reader {
                        let _ = reader.join();
                    }
                    return Err(stderr.lock().unwrap().clone());
                }
            }
        }
        Ok(Proxy {
            child,
            addr: addr.expect("address parsed"),
            admin,
            stderr,
            stdout,
            stalled_stdout,
            readers: std::iter::once(stderr_reader)
                .chain(stdout_reader)
                .collect(),
        })
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The proxy's resident memory now, in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc is mounted");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS is a number of kB")
    }

    /// Waits up to `limit` for the process to exit; its exit code, or `None` if it still runs.
    pub fn wait_exit_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait works") {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether the process has exited, without waiting.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait works").is_some()
    }

    /// Everything the proxy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The proxy's open file descriptors above its standard streams, counted by what they are.
    pub fn fds_by_kind(&self) -> FdCount {
        let mut count = FdCount::default();
        let dir =
            std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).expect("/proc is mounted");
        for entry in dir.flatten() {
            let fd: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
            if fd <= 2 {
                continue;
            }
            // A descriptor closed between the listing and the readlink is not counted.
            let Ok(link) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if link.starts_with("socket:") {
                count.sockets += 1;
            } else if link.starts_with("pipe:") {
                count.pipes += 1;
            } else {
                count.other += 1;
            }
        }
        count
    }

    /// How many serving threads (`paude-proxy-N`) the proxy process runs. Other threads, such
    /// as the blocking pool's, come and go with the work and are not counted.
    pub fn serving_threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .expect("/proc is mounted")
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
            .filter(|comm| {
                comm.trim()
                    .strip_prefix("paude-proxy-")
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            })
            .count()
    }

    /// Everything the proxy wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until stdout holds at least `n` lines.
    pub fn wait_for_stdout_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + T;
        loop {
            let lines: Vec<String> = self.stdout().lines().map(str::to_owned).collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_for_stderr(&self, needle: &str) -> bool {
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if self.stderr().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends a signal (`HUP`, `TERM`) to the proxy.
    pub fn signal(&self, sig: &str) {
        let number = match sig {
            "HUP" => libc::SIGHUP,
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            other => panic!("no such signal in these tests: {other}"),
        };
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) only sends a signal to the child this test started.
        let sent = unsafe { libc::kill(pid, number) };
        assert_eq!(sent, 0, "kill -{sig} failed");
    }

    /// Waits for the process to exit and returns its exit code; afterwards `stderr` and
    /// `stdout` hold everything the process wrote.
    pub fn wait_exit(&mut self) -> Option<i32> {
        self.wait_exit_within(T)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion (for `--check`): exit code, stdout, stderr.
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paude-proxy"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the paude-proxy binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP upstream on 127.0.0.1 that answers every request with `answer`.
pub async fn hyper_upstream<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A plain HTTP upstream on 127.0.0.1 that answers every request with its method, URI and
/// request headers in the body.
pub async fn http_upstream() -> SocketAddr {
    hyper_upstream(|req: Request<Incoming>| async move {
        let mut body = format!("upstream saw {} {}\n", req.method(), req.uri());
        for (name, value) in req.headers() {
            body.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
        }
        Response::builder()
            .header("x-upstream", "yes")
            .header("keep-alive", "timeout=5")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    })
    .await
}

/// An upstream on 127.0.0.1 that echoes every byte back.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A TLS upstream and the CA that signed its certificate.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    /// How many TLS handshakes completed.
    pub handshakes: Arc<AtomicUsize>,
}

/// A CA made now and a server configuration with a certificate it signed for `example.test`,
/// `other.test`, `git.test` and `pypi.test`.
pub struct TestCa {
    pub server: Arc<rustls::ServerConfig>,
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
}

pub fn test_ca() -> TestCa {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "paude test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let names = ["example.test", "other.test", "git.test", "pypi.test"]
        .map(str::to_owned)
        .to_vec();
    let leaf_params = rcgen::CertificateParams::new(names).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .unwrap();
    TestCa {
        server: Arc::new(config),
        ca_der: ca.der().clone(),
        ca_pem: ca.pem(),
    }
}

/// Starts a TLS server on 127.0.0.1 with a certificate for `example.test` and `other.test`
/// signed by a CA generated now; it answers one HTTP request per connection.
pub async fn tls_upstream() -> TlsUpstream {
    let ca = test_ca();
    let config = ca.server.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) = tokio::time::timeout(T, acceptor.accept(stream)).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tokio::time::timeout(T, tls.read(&mut byte)).await {
                        Ok(Ok(1)) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let body = "hello over tls";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsUpstream {
        addr,
        ca_der: ca.ca_der,
        ca_pem: ca.ca_pem,
        handshakes,
    }
}

/// Reads a response head byte by byte (so no tunnel bytes are consumed behind it).
fn read_head_blocking(stream: &mut std::net::TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Opens a CONNECT tunnel to `connect_to`, does a TLS handshake with `sni` trusting `ca`,
/// and returns the upstream's HTTP response. With `pipelined`, the ClientHello is sent in the
/// same write as the CONNECT head. Runs blocking I/O with timeouts on a blocking thread.
pub async fn tls_get(
    proxy: SocketAddr,
    connect_to: &str,
    sni: &str,
    ca: &CertificateDer<'static>,
    pipelined: bool,
) -> Result<String, String> {
    let connect_to = connect_to.to_owned();
    let sni = sni.to_owned();
    let ca = ca.clone();
    let work = tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| e.to_string())?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(sni.clone()).map_err(|e| e.to_string())?;
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let mut stream = std::net::TcpStream::connect(proxy).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(T)).unwrap();
        stream.set_write_timeout(Some(T)).unwrap();
        let mut first =
            format!("CONNECT {connect_to} HTTP/1.1\r\nHost: {connect_to}\r\n\r\n").into_bytes();
        if pipelined {
            conn.write_tls(&mut first).map_err(|e| e.to_string())?;
        }
        stream.write_all(&first).map_err(|e| e.to_string())?;
        let head = read_head_blocking(&mut stream)?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("CONNECT refused: {head}"));
        }
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let request = format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes())
            .map_err(|e| format!("tls write: {e}"))?;
        let mut out = String::new();
        tls.read_to_string(&mut out)
            .map_err(|e| format!("tls read: {e}"))?;
        Ok(out)
    });
    tokio::time::timeout(T * 2, work)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?
}

/// Connects to `addr` within the test timeout.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(T, TcpStream::connect(addr))
        .await
        .expect("connected within the timeout")
        .expect("the connection is accepted")
}

/// Writes all of `bytes` within the test timeout.
pub async fn send(stream: &mut TcpStream, bytes: &[u8]) {
    tokio::time::timeout(T, stream.write_all(bytes))
        .await
        .expect("written within the timeout")
        .expect("the write succeeds");
}

/// A raw CONNECT head for `target` with `behind` pipelined right after it in the same write.
pub fn connect_head(target: &str, behind: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n{behind}").into_bytes()
}

/// Sends raw bytes to the proxy and reads until the proxy closes the connection.
pub async fn raw(proxy: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect(proxy).await;
    send(&mut stream, request).await;
    let mut out = Vec::new();
    match tokio::time::timeout(T, stream.read_to_end(&mut out)).await {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => panic!(
            "the proxy kept the connection open; got {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

/// Reads one response with a content-length body from a kept-alive connection.
pub async fn read_response(stream: &mut TcpStream) -> String {
    let work = async {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if data.len() >= end + 4 + len {
                    return String::from_utf8_lossy(&data[..end + 4 + len]).into_owned();
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed mid-response: {:?}",
                String::from_utf8_lossy(&data)
            );
            data.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(T, work)
        .await
        .expect("a response within the timeout")
}

/// The flags that let tests reach upstreams on loopback under the name `name`.
pub fn loopback_pin(name: &str) -> Vec<String> {
    vec![
        "--resolve".into(),
        format!("{name}=127.0.0.1"),
        "--allow-cidr".into(),
        "127.0.0.0/8".into(),
    ]
}

/// Reads the audit log lines written so far, waiting until at least `n` are there.
pub fn audit_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line {l:?} is not JSON: {e}"))
            })
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Does a blocking HTTP GET against the admin listener.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    raw(
        admin,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// Serves the files under `root` over HTTPS on 127.0.0.1 (a dumb git HTTP server, a package
/// index): GET of a path returns the file, or 404.
pub async fn static_tls_upstream(
    root: std::path::PathBuf,
    config: Arc<rustls::ServerConfig>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let root = Arc::new(root);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let root = root.clone();
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(T, acceptor.accept(stream)).await else {
                    return;
                };
                let service = service_fn(move |req: Request<Incoming>| {
                    let root = root.clone();
                    async move {
                        let path = req.uri().path();
                        let rel = path.trim_start_matches('/').to_owned();
                        let rel = if rel.is_empty() || rel.ends_with('/') {
                            rel + "index.html"
                        } else {
                            rel
                        };
                        let safe = !rel.split('/').any(|part| part == "..");
                        let found = if safe {
                            tokio::fs::read(root.join(&rel)).await.ok()
                        } else {
                            None
                        };
                        let resp = match found {
                            Some(bytes) => {
                                let html = rel.ends_with(".html");
                                let kind = if html {
                                    "text/html"
                                } else {
                                    "application/octet-stream"
                                };
                                Response::builder()
                                    .header("content-type", kind)
                                    .body(Full::new(Bytes::from(bytes)))
                                    .unwrap()
                            }
                            None => Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// A DNS server on loopback that answers every A query with `v4` (and AAAA with no address),
/// or every query with NXDOMAIN when `v4` is `None`.
pub async fn dns_server(v4: Option<std::net::Ipv4Addr>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            // The question: labels up to the root, then type and class.
            let mut end = 12;
            while end < n && buf[end] != 0 {
                end += 1 + buf[end] as usize;
            }
            if end + 5 > n {
                continue;
            }
            let qtype = u16::from_be_bytes([buf[end + 1], buf[end + 2]]);
            let mut reply = buf[..end + 5].to_vec();
            reply[2] = 0x80 | (reply[2] & 0x01); // QR, keep RD
            reply[6..12].fill(0);
            match v4 {
                None => reply[3] = 0x80 | 0x03, // RA, NXDOMAIN
                Some(ip) => {
                    reply[3] = 0x80; // RA, NOERROR
                    if qtype == 1 {
                        reply[7] = 1; // one answer: the name, A, IN, TTL 60, 4 bytes
                        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                        reply.extend_from_slice(&ip.octets());
                    }
                }
            }
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

/// A TLS 1.3 ClientHello record built by hand, for hellos no real client here sends: `sni` is
/// written verbatim into the server_name extension (an IP literal too), or left out with
/// `None`; `extra` extensions (type, data) follow it.
pub fn handmade_client_hello(sni: Option<&str>, extra: &[(u16, &[u8])]) -> Vec<u8> {
    fn u16be(out: &mut Vec<u8>, v: usize) {
        out.extend_from_slice(&(v as u16).to_be_bytes());
    }
    let mut extensions: Vec<(u16, Vec<u8>)> = Vec::new();
    if let Some(name) = sni {
        let mut list = Vec::new();
        u16be(&mut list, name.len() + 3);
        list.push(0);
        u16be(&mut list, name.len());
        list.extend_from_slice(name.as_bytes());
        extensions.push((0x0000, list));
    }
    extensions.push((0x000a, vec![0, 2, 0x00, 0x1d])); // supported_groups: x25519
    extensions.push((0x000d, vec![0, 2, 0x08, 0x04])); // signature_algorithms: rsa_pss_sha256
    extensions.push((0x002b, vec![2, 0x03, 0x04])); // supported_versions: TLS 1.3
    let mut share = vec![0, 36, 0x00, 0x1d, 0, 32];
    share.extend([7u8; 32]);
    extensions.push((0x0033, share)); // key_share
    extensions.extend(extra.iter().map(|(t, d)| (*t, d.to_vec())));
    let mut body = vec![0x03, 0x03];
    body.extend([0x5a; 32]); // random
    body.push(0); // no legacy session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]); // TLS_AES_128_GCM_SHA256; null compression
    let mut ext_bytes = Vec::new();
    for (kind, data) in &extensions {
        u16be(&mut ext_bytes, *kind as usize);
        u16be(&mut ext_bytes, data.len());
        ext_bytes.extend_from_slice(data);
    }
    u16be(&mut body, ext_bytes.len());
    body.extend_from_slice(&ext_bytes);
    let mut record = vec![0x16, 0x03, 0x01];
    u16be(&mut record, body.len() + 4);
    record.push(1); // client_hello
    record.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&body);
    record
}

/// The first flight of a real TLS client (rustls) for `name`, with or without SNI.
pub fn rustls_client_hello(name: &str, send_sni: bool) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    config.enable_sni = send_sni;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A plain HTTP upstream on 127.0.0.1 that reads each request's whole body before answering
/// with its length, as an upload endpoint does.
pub async fn body_reading_upstream() -> SocketAddr {
    use http_body_util::BodyExt;
    hyper_upstream(|req: Request<Incoming>| async move {
        let len = match req.into_body().collect().await {
            Ok(body) => body.to_bytes().len(),
            Err(_) => 0,
        };
        Response::new(Full::new(Bytes::from(format!("got {len} bytes"))))
    })
    .await
}
