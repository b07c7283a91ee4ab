//! The soak and abuse suite: the real binary under the loads and attacks a sandboxed agent can
//! mount, each bounded in count and in time, on loopback only. Ten thousand concurrent tunnels
//! (as many as the descriptor limit fits), a refusal flood, slowloris heads and bodies, upstream
//! resets and stalls, a stalled audit sink and SIGHUP storms during traffic. Every test checks
//! that memory stays within a bound derived from what the proxy holds (RSS before, at its peak
//! during, and after are printed), that a legitimate client is served all through the abuse,
//! and that the proxy recovers afterwards. Speeds and sizes are printed, never asserted.
//!
//! The tests run one at a time: each loads both cores and measures one proxy process.

mod support;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// One KiB, for RSS bounds written in KiB.
const KIB: u64 = 1;
/// One MiB in KiB.
const MIB: u64 = 1024 * KIB;
/// What a proxy may grow by beyond what its connections hold: allocator arenas per thread,
/// the resolver cache, metrics, the policy, audit batches in flight.
const SLACK: u64 = 32 * MIB;
/// A generous ceiling of what one open client connection holds in user space while its head is
/// read or its refusal written: a 4 KiB head buffer, hyper's read and write buffers, the task.
const PER_CONNECTION: u64 = 256 * KIB;

/// The most a bounded audit buffer holds while its sink is stalled, generously: a few MiB of
/// lines of about 500 bytes.
const AUDIT_HELD: u64 = 8 * MIB;
/// [`SLACK`] for the stalled sink, where nothing but the audit buffer and the clients'
/// connections is new after the start.
const STALLED_SLACK: u64 = 8 * MIB;

/// The tests take turns: each one loads the machine and measures one process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs one soak test on a runtime of its own, after the previous one finished.
fn soak<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    raise_descriptor_limit();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a test runtime")
        .block_on(test());
}

/// Raises this process's soft descriptor limit to its hard limit (children inherit it) and
/// returns that limit.
fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write the one struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "cannot raise the descriptor limit"
        );
    }
    limit.rlim_max
}

/// Open descriptors of a process, all kinds.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc is mounted")
        .count()
}

/// A ClientHello for `sni`, as the first flight of a TLS client: the tunnels here carry real
/// hellos so the SNI guard runs on every one, and the echo upstream sends it back.
fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// The echo upstream in a process of its own (this test binary run as the helper below), so
/// the upstream ends of thousands of tunnels do not count against this process's limit.
struct EchoProcess {
    child: Child,
    addr: SocketAddr,
}

impl EchoProcess {
    fn start() -> EchoProcess {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "soak_echo_upstream_helper",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("PAUDE_SOAK_ROLE", "echo")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the test binary runs as the echo helper");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The harness prints the test's name on the same line first.
                if let Some((_, addr)) = line.split_once("soak echo listening on ") {
                    let _ = tx.send(addr.trim().parse::<SocketAddr>().unwrap());
                }
            }
        });
        let addr = rx.recv_timeout(T).expect("the echo helper listens");
        EchoProcess { child, addr }
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the echo upstream process that [`EchoProcess`] starts. It serves until its
/// stdin closes, that is until the test that started it ends.
#[test]
#[ignore = "the echo helper process of the soak tests, started by them"]
fn soak_echo_upstream_helper() {
    if std::env::var("PAUDE_SOAK_ROLE").as_deref() != Ok("echo") {
        eprintln!("soak_echo_upstream_helper runs only as a helper process of the soak tests");
        return;
    }
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = socket.listen(4096).unwrap();
            println!("soak echo listening on {}", listener.local_addr().unwrap());
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
}

/// An upstream that reads a whole request body before it answers with the body's length, so
/// a slow body holds the request open end to end.
async fn body_upstream() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let len = match req.into_body().collect().await {
                            Ok(body) => body.to_bytes().len(),
                            Err(_) => 0,
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from(format!("read {len} bytes\n")),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that accepts and then resets every connection (a zero linger close).
async fn reset_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    addr
}

/// An upstream that accepts and then neither reads nor writes, holding every connection
/// until the test ends.
async fn stalled_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// The legitimate client's destinations and what it sends.
#[derive(Clone)]
struct Legit {
    proxy: SocketAddr,
    web: SocketAddr,
    echo: SocketAddr,
    hello: Arc<Vec<u8>>,
}

impl Legit {
    /// The proxy flags that allow and pin the legitimate destinations.
    fn flags(web: SocketAddr, echo: SocketAddr) -> Vec<String> {
        vec![
            "--allow".into(),
            format!("web.test:{}", web.port()),
            "--allow".into(),
            format!("echo.test:{}", echo.port()),
            "--resolve".into(),
            "web.test=127.0.0.1".into(),
            "--resolve".into(),
            "echo.test=127.0.0.1".into(),
            "--allow-cidr".into(),
            "127.0.0.0/8".into(),
        ]
    }

    fn new(proxy: SocketAddr, web: SocketAddr, echo: SocketAddr) -> Legit {
        Legit {
            proxy,
            web,
            echo,
            hello: Arc::new(client_hello("echo.test")),
        }
    }

    /// A plain GET through the proxy on a fresh connection.
    async fn get(&self) -> Result<(), String> {
        let request = format!(
            "GET http://web.test:{}/legit HTTP/1.1\r\nHost: web.test:{}\r\nConnection: close\r\n\r\n",
            self.web.port(),
            self.web.port()
        );
        let work = async {
            let mut s = TcpStream::connect(self.proxy)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)
                .await
                .map_err(|e| format!("read: {e}"))?;
            let out = String::from_utf8_lossy(&out);
            if out.starts_with("HTTP/1.1 200") && out.contains("upstream saw GET") {
                Ok(())
            } else {
                Err(format!("GET answered {out:?}"))
            }
        };
        tokio::time::timeout(T, work)
            .await
            .map_err(|_| "GET timed out".to_owned())?
    }

    /// Opens a tunnel to the echo upstream with a ClientHello and reads the hello back; the
    /// tunnel stays open while the stream is held.
    async fn tunnel(&self) -> Result<TcpStream, String> {
        let work = async {
            let mut s = TcpStream::connect(self.proxy)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut first = format!(
                "CONNECT echo.test:{} HTTP/1.1\r\nHost: echo.test\r\n\r\n",
                self.echo.port()
            )
            .into_bytes();
            first.extend_from_slice(&self.hello);
            s.write_all(&first)
                .await
                .map_err(|e| format!("write: {e}"))?;
            let established = b"HTTP/1.1 200 OK\r\n\r\n";
            let mut got = vec![0u8; established.len() + self.hello.len()];
            s.read_exact(&mut got)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if &got[..established.len()] != established
                || got[established.len()..] != self.hello[..]
            {
                return Err(format!(
                    "the tunnel answered {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
            Ok(s)
        };
        tokio::time::timeout(T, work)
            .await
            .map_err(|_| "tunnel timed out".to_owned())?
    }

    /// One round of what a legitimate client does: a plain request and a tunnel.
    async fn round(&self) -> Result<(), String> {
        self.get().await?;
        drop(self.tunnel().await?);
        Ok(())
    }
}

/// A legitimate client that keeps making requests while the abuse runs.
struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Prober {
    fn start(legit: &Legit) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let legit = legit.clone();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failures) = (0, Vec::new());
            // At least one round, however short the abuse.
            loop {
                match legit.round().await {
                    Ok(()) => ok += 1,
                    Err(e) => failures.push(e),
                }
                if flag.load(Ordering::SeqCst) {
                    return (ok, failures);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Prober { stop, task }
    }

    /// Stops the client and checks that it was served every time.
    async fn served(self, during: &str) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failures) = tokio::time::timeout(T * 3, self.task)
            .await
            .expect("the legitimate client finishes its round")
            .expect("the legitimate client does not panic");
        assert!(
            failures.is_empty(),
            "the legitimate client was not served during {during}: {} of {} rounds failed, first: {}",
            failures.len(),
            failures.len() + ok,
            failures[0]
        );
        ok
    }
}

/// Samples a process's RSS every 50 ms and keeps the peak.
struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssPeak {
    fn start(pid: u32) -> RssPeak {
        let peak = Arc::new(AtomicU64::new(rss_of(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                p.fetch_max(rss_of(pid), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssPeak { peak, stop }
    }

    fn peak(&self, pid: u32) -> u64 {
        self.peak.fetch_max(rss_of(pid), Ordering::SeqCst);
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The RSS of a process in KiB, or 0 once it is gone.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Checks the peak RSS against its bound and prints the measurements.
fn report_memory(test: &str, before: u64, peak: u64, after: u64, bound: u64) {
    println!(
        "soak {test}: RSS before {before} KiB, peak {peak} KiB (+{} KiB), after {after} KiB; bound +{bound} KiB",
        peak.saturating_sub(before)
    );
    assert!(
        peak.saturating_sub(before) <= bound,
        "{test}: RSS grew from {before} KiB to {peak} KiB, more than the {bound} KiB that what it holds explains"
    );
}

/// What a test measures around its abuse: the proxy's RSS and sockets at the start, and the
/// peak RSS while it runs.
struct Watch {
    test: &'static str,
    before: u64,
    sockets: usize,
    peak: RssPeak,
}

impl Watch {
    /// Serves a legitimate round first, so the proxy is in its steady state, then measures.
    async fn start(test: &'static str, proxy: &Proxy, legit: &Legit) -> Watch {
        legit.round().await.expect("the proxy serves");
        Watch {
            test,
            before: proxy.rss_kib(),
            sockets: proxy.fds_by_kind().sockets,
            peak: RssPeak::start(proxy.pid()),
        }
    }

    /// After the abuse: every socket it opened is closed, a legitimate round is served, and the
    /// peak RSS grew by at most `bound` KiB. Only `pooled` idle upstream connections may stay
    /// open, as many as plain requests ran at once (the forward pool keeps them for reuse).
    async fn recovered(self, proxy: &Proxy, legit: &Legit, pooled: usize, bound: u64) {
        let most = self.sockets + pooled + 4;
        let released = eventually(T * 3, || proxy.fds_by_kind().sockets <= most).await;
        assert!(
            released,
            "{}: the proxy still holds sockets after the abuse: {:?} (before: {})",
            self.test,
            proxy.fds_by_kind(),
            self.sockets
        );
        legit
            .round()
            .await
            .unwrap_or_else(|e| panic!("{}: not served after the abuse: {e}", self.test));
        let after = proxy.rss_kib();
        let peak = self.peak.peak(proxy.pid());
        report_memory(self.test, self.before, peak, after, bound);
    }
}

/// Waits until `ready` holds, up to `within`.
async fn eventually(within: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ready()
}

/// Runs `count` jobs with at most `width` at once; returns how many failed and the first
/// failure.
async fn run_many<F, Fut>(count: usize, width: usize, job: F) -> (usize, Option<String>)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let (mut failed, mut first) = (0, None);
    for i in 0..count {
        if set.len() >= width {
            if let Some(Ok(Err(e))) = set.join_next().await {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        set.spawn(job(i));
    }
    while let Some(r) = set.join_next().await {
        if let Ok(Err(e)) = r {
            failed += 1;
            first.get_or_insert(e);
        }
    }
    (failed, first)
}

/// A refused CONNECT on a fresh connection: the 403 arrives and the proxy closes.
async fn refused_connect(proxy: SocketAddr) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect(proxy)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if out.starts_with(b"HTTP/1.1 403") {
            Ok(())
        } else {
            Err(format!(
                "refusal answered {:?}",
                String::from_utf8_lossy(&out)
            ))
        }
    };
    tokio::time::timeout(T, work)
        .await
        .map_err(|_| "refusal timed out".to_owned())?
}

/// Four refused plain requests on one kept-alive connection (hyper's path).
async fn refused_gets(proxy: SocketAddr) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect(proxy)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        for _ in 0..4 {
            s.write_all(b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n")
                .await
                .map_err(|e| format!("write: {e}"))?;
            let response = read_response(&mut s).await;
            if !response.starts_with("HTTP/1.1 403") {
                return Err(format!("refusal answered {response:?}"));
            }
        }
        Ok(())
    };
    tokio::time::timeout(T, work)
        .await
        .map_err(|_| "refusals timed out".to_owned())?
}

/// `n` refused plain requests for `host` pipelined on one kept-alive connection: the cheapest
/// way for a client to make the proxy write audit lines.
async fn refused_pipelined(proxy: SocketAddr, host: &str, n: usize) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect(proxy)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n");
        s.write_all(request.repeat(n).as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        // Responses end where their content-length says; read until all `n` are in.
        let mut data = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut answered = 0;
        let mut at = 0;
        while answered < n {
            let got = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if got == 0 {
                return Err(format!("closed after {answered} of {n} refusals"));
            }
            data.extend_from_slice(&buf[..got]);
            while let Some(end) = data[at..].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[at..at + end]).to_lowercase();
                if !head.starts_with("http/1.1 403") {
                    return Err(format!("refusal answered {head:?}"));
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or("a refusal without content-length")?;
                if data.len() < at + end + 4 + len {
                    break;
                }
                at += end + 4 + len;
                answered += 1;
            }
        }
        Ok(())
    };
    tokio::time::timeout(T, work)
        .await
        .map_err(|_| "refusals timed out".to_owned())?
}

fn start_proxy(web: SocketAddr, echo: SocketAddr, extra: &[&str]) -> Proxy {
    let mut args = Legit::flags(web, echo);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&args)
}

/// The serving threads every soak proxy runs with, so what is held does not depend on the
/// machine's CPU count.
const THREADS: &str = "2";
/// Tunnels opened at once while thousands are set up.
const SETUP_WIDTH: usize = 32;

#[test]
fn ten_thousand_concurrent_tunnels_relay_and_release_their_descriptors() {
    soak(|| async {
        let limit = raise_descriptor_limit() as usize;
        let web = http_upstream().await;
        let echo = EchoProcess::start();
        let proxy = start_proxy(
            web,
            echo.addr,
            &[
                "--worker-threads",
                THREADS,
                "--max-connections",
                "10100",
                "--audit-log",
                "/dev/null",
            ],
        );
        let legit = Legit::new(proxy.addr, web, echo.addr);
        // Warm up: both serving threads built, their pools filled as far as traffic fills them.
        for _ in 0..8 {
            legit.round().await.expect("the proxy serves");
        }
        // Each tunnel holds two sockets in the proxy (its relay buffers are memory, not
        // descriptors). Besides them it needs what it holds at rest, the sockets of the tunnels
        // being set up at once, and the legitimate client's four sockets.
        let at_rest = open_fds(proxy.pid());
        let reserve = SETUP_WIDTH * 2 * 2 + 8;
        let own = open_fds(std::process::id());
        let fits = ((limit.saturating_sub(at_rest + reserve)) / 2)
            .min(limit.saturating_sub(own + 64))
            .min(10_000);
        println!(
            "soak tunnels: descriptor limit {limit}; the proxy holds {at_rest} at rest and keeps \
             {reserve} in reserve, so {fits} tunnels of two sockets fit (10000 wanted)"
        );
        assert!(
            fits >= 1000,
            "a descriptor limit of {limit} fits only {fits} tunnels"
        );

        let watch = Watch::start("tunnels", &proxy, &legit).await;
        let before = watch.before;
        let prober = Prober::start(&legit);
        let opened = Arc::new(Mutex::new(Vec::with_capacity(fits)));
        let started = Instant::now();
        let (failed, first) = {
            let opened = opened.clone();
            let legit = legit.clone();
            run_many(fits, SETUP_WIDTH, move |_| {
                let legit = legit.clone();
                let opened = opened.clone();
                async move {
                    let s = legit.tunnel().await?;
                    opened.lock().unwrap().push(s);
                    Ok(())
                }
            })
            .await
        };
        let setup = started.elapsed();
        assert_eq!(
            failed, 0,
            "{failed} of {fits} tunnels failed; first: {first:?}"
        );
        let mut tunnels = std::mem::take(&mut *opened.lock().unwrap());
        assert_eq!(tunnels.len(), fits);
        let held = proxy.fds_by_kind();
        assert!(
            held.sockets >= 2 * fits,
            "{fits} open tunnels hold {} sockets in all, fewer than two each",
            held.sockets
        );
        // Every tunnel still relays: a second round trip on each, all of them open at once.
        let started_ping = Instant::now();
        let mut set = JoinSet::new();
        for (i, mut s) in tunnels.drain(..).enumerate() {
            set.spawn(async move {
                let msg = format!("ping {i:05}\n");
                let mut got = vec![0u8; msg.len()];
                let r = tokio::time::timeout(T * 3, async {
                    s.write_all(msg.as_bytes()).await?;
                    s.read_exact(&mut got).await
                })
                .await;
                match r {
                    Ok(Ok(_)) if got == msg.as_bytes() => Ok(s),
                    other => Err(format!("tunnel {i} did not echo: {other:?}")),
                }
            });
        }
        while let Some(r) = set.join_next().await {
            tunnels.push(r.expect("no panic").expect("every tunnel relays"));
        }
        let ping = started_ping.elapsed();
        let during = proxy.rss_kib();
        let rounds = prober.served("ten thousand open tunnels").await;
        println!(
            "soak tunnels: {fits} tunnels set up in {:.1} s ({:.0}/s), all pinged in {:.1} s; RSS with \
             them open {during} KiB ({:.2} KiB per tunnel); {rounds} legitimate rounds served meanwhile",
            setup.as_secs_f64(),
            fits as f64 / setup.as_secs_f64(),
            ping.as_secs_f64(),
            during.saturating_sub(before) as f64 / fits as f64
        );

        drop(tunnels);
        // A tunnel holds its two sockets and its task (an idle tunnel's relay buffers are back in the pool);
        // 16 KiB each is generous.
        watch
            .recovered(&proxy, &legit, 1, SLACK + fits as u64 * 16 * KIB)
            .await;
    });
}

#[test]
fn a_refusal_flood_keeps_memory_bounded_and_legitimate_clients_served() {
    soak(|| async {
        const FLOOD: usize = 21_000;
        const WIDTH: usize = 32;
        let web = http_upstream().await;
        let echo = echo_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let proxy = start_proxy(
            web,
            echo,
            &[
                "--worker-threads",
                THREADS,
                "--audit-log",
                log.to_str().unwrap(),
            ],
        );
        let legit = Legit::new(proxy.addr, web, echo);
        let watch = Watch::start("refusal flood", &proxy, &legit).await;
        let prober = Prober::start(&legit);
        let started = Instant::now();
        let addr = proxy.addr;
        // Three refused CONNECTs on fresh connections to one connection of four refused GETs:
        // seven refusals in four jobs.
        let (failed, first) = run_many(FLOOD / 7 * 4, WIDTH, move |i| async move {
            if i % 4 == 3 {
                refused_gets(addr).await
            } else {
                refused_connect(addr).await
            }
        })
        .await;
        let took = started.elapsed();
        assert_eq!(failed, 0, "refusals went unanswered; first: {first:?}");
        let refusals = FLOOD / 7 * 7;
        let rounds = prober.served("a refusal flood").await;
        println!(
            "soak refusal flood: {refusals} refusals from {WIDTH} clients in {:.1} s ({:.0}/s); \
             {rounds} legitimate rounds served meanwhile",
            took.as_secs_f64(),
            refusals as f64 / took.as_secs_f64()
        );
        // Every refusal is in the audit log once the writer catches up.
        let logged = eventually(T, || {
            std::fs::read_to_string(&log)
                .map(|t| t.matches("\"reason\":\"not_allowed\"").count())
                .unwrap_or(0)
                >= refusals
        })
        .await;
        assert!(logged, "not every refusal reached the audit log");
        watch
            .recovered(&proxy, &legit, 1, SLACK + WIDTH as u64 * PER_CONNECTION)
            .await;
    });
}

/// A client that sends the first `at_once` of `bytes` at once, then the rest one byte every
/// `every`, until the proxy closes the connection (EOF, a reset, or an answer and EOF).
/// Fails if the connection is still open after `within`, or took every byte.
async fn trickle(
    proxy: SocketAddr,
    bytes: &[u8],
    at_once: usize,
    every: Duration,
    within: Duration,
) -> Result<(), String> {
    let mut s = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(&bytes[..at_once])
        .await
        .map_err(|e| format!("write: {e}"))?;
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    for (sent, byte) in bytes[at_once..].iter().enumerate() {
        let read = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                r = s.read(&mut buf) => Some(r),
                _ = tokio::time::sleep(every) => None,
            }
        })
        .await;
        match read {
            Err(_) => {
                return Err(format!(
                    "a client trickling one byte per {every:?} is still served after {within:?} ({sent} bytes)"
                ))
            }
            Ok(Some(Ok(0)) | Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(_)) | None) => {}
        }
        if s.write_all(&[*byte]).await.is_err() {
            return Ok(());
        }
    }
    Err(format!("all {} trickled bytes were taken", bytes.len()))
}

#[test]
fn slowloris_heads_are_cut_at_the_header_timeout_while_others_are_served() {
    soak(|| async {
        const SLOW: usize = 400;
        let web = http_upstream().await;
        let echo = echo_upstream().await;
        let proxy = start_proxy(
            web,
            echo,
            &["--worker-threads", THREADS, "--header-timeout", "2s"],
        );
        let legit = Legit::new(proxy.addr, web, echo);
        let watch = Watch::start("slowloris heads", &proxy, &legit).await;
        let prober = Prober::start(&legit);
        let addr = proxy.addr;
        let started = Instant::now();
        // Half trickle a CONNECT head (the bare-socket path), half a plain request head
        // (hyper's), one byte every 100 ms; the 2 s header timeout must cut every one.
        let (failed, first) = run_many(SLOW, SLOW, move |i| async move {
            let start: &[u8] = if i % 2 == 0 {
                b"CONNECT echo.test:443 HTTP/1.1\r\nX-Slow: "
            } else {
                b"GET http://web.test/ HTTP/1.1\r\nX-Slow: "
            };
            // 300 bytes at 100 ms each would take 30 s.
            let mut head = start.to_vec();
            head.resize(start.len() + 300, b'a');
            trickle(addr, &head, 0, Duration::from_millis(100), T * 2).await
        })
        .await;
        let took = started.elapsed();
        assert_eq!(failed, 0, "slow heads were not cut; first: {first:?}");
        let rounds = prober.served("slowloris heads").await;
        println!(
            "soak slowloris heads: {SLOW} slow heads all cut within {:.1} s; {rounds} legitimate \
             rounds served meanwhile",
            took.as_secs_f64()
        );
        watch
            .recovered(&proxy, &legit, 1, SLACK + SLOW as u64 * PER_CONNECTION)
            .await;
    });
}

#[test]
fn slowloris_bodies_are_cut_and_free_their_connection_slots() {
    soak(|| async {
        const SLOW: usize = 64;
        let web = http_upstream().await;
        let echo = echo_upstream().await;
        let body = body_upstream().await;
        let allow_body = format!("body.test:{}", body.port());
        let slots = (SLOW + 4).to_string();
        let proxy = start_proxy(
            web,
            echo,
            &[
                "--worker-threads",
                THREADS,
                "--header-timeout",
                "2s",
                "--max-connections",
                &slots,
                "--allow",
                &allow_body,
                "--resolve",
                "body.test=127.0.0.1",
            ],
        );
        let legit = Legit::new(proxy.addr, web, echo);
        let watch = Watch::start("slowloris bodies", &proxy, &legit).await;
        let prober = Prober::start(&legit);
        let addr = proxy.addr;
        let port = body.port();
        let started = Instant::now();
        // The trickled bodies: one byte a second, far slower than any real upload.
        let (failed, first) = run_many(SLOW, SLOW, move |_| async move {
            let head = format!(
                "POST http://body.test:{port}/upload HTTP/1.1\r\nHost: body.test:{port}\r\nContent-Length: 1000000\r\n\r\n"
            );
            let mut bytes = head.clone().into_bytes();
            bytes.resize(head.len() + 1000, b'x');
            trickle(addr, &bytes, head.len(), Duration::from_secs(1), T * 3).await
        })
        .await;
        let took = started.elapsed();
        assert_eq!(failed, 0, "slow bodies were not cut; first: {first:?}");
        let rounds = prober.served("slowloris bodies").await;
        println!(
            "soak slowloris bodies: {SLOW} bodies trickled at 1 byte/s all cut within {:.1} s; \
             {rounds} legitimate rounds served meanwhile",
            took.as_secs_f64()
        );
        watch
            .recovered(&proxy, &legit, 1, SLACK + SLOW as u64 * PER_CONNECTION)
            .await;
    });
}

#[test]
fn upstream_resets_and_stalls_are_contained() {
    soak(|| async {
        const RESETS: usize = 1_000;
        const STALLS: usize = 200;
        let web = http_upstream().await;
        let echo = echo_upstream().await;
        let reset = reset_upstream().await;
        let stall = stalled_upstream().await;
        let proxy = start_proxy(
            web,
            echo,
            &[
                "--worker-threads",
                THREADS,
                "--idle-timeout",
                "2s",
                "--allow",
                &format!("reset.test:{}", reset.port()),
                "--allow",
                &format!("stall.test:{}", stall.port()),
                "--resolve",
                "reset.test=127.0.0.1",
                "--resolve",
                "stall.test=127.0.0.1",
                "--allow-opaque",
            ],
        );
        let legit = Legit::new(proxy.addr, web, echo);
        let watch = Watch::start("upstreams", &proxy, &legit).await;
        let prober = Prober::start(&legit);
        let addr = proxy.addr;
        let hello = Arc::new(client_hello("reset.test"));
        let started = Instant::now();

        // Resets: a tunnel whose upstream resets is closed; a plain request gets a 502.
        let (rport, h) = (reset.port(), hello.clone());
        let (failed, first) = run_many(RESETS, 16, move |i| {
            let h = h.clone();
            async move {
                let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let mut req = if i % 2 == 0 {
                    format!("CONNECT reset.test:{rport} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
                } else {
                    format!("GET http://reset.test:{rport}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .into_bytes()
                };
                if i % 2 == 0 {
                    req.extend_from_slice(&h);
                }
                s.write_all(&req).await.map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                match tokio::time::timeout(T, s.read_to_end(&mut out)).await {
                    Err(_) => Err("a reset upstream left the client hanging".to_owned()),
                    Ok(_) if i % 2 == 1 && !out.starts_with(b"HTTP/1.1 502") => Err(format!(
                        "a reset upstream answered {:?}",
                        String::from_utf8_lossy(&out)
                    )),
                    Ok(_) => Ok(()),
                }
            }
        })
        .await;
        assert_eq!(failed, 0, "resets were not contained; first: {first:?}");

        // Stalls: tunnels to an upstream that never reads, each pushed 1 MiB (more than the
        // kernel buffers between them), must not buffer in the proxy and are closed once idle.
        let sport = stall.port();
        let (failed, first) = run_many(STALLS, STALLS, move |_| async move {
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            s.write_all(
                format!("CONNECT stall.test:{sport} HTTP/1.1\r\nHost: x\r\n\r\nSSH-2.0-stall\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
            let chunk = vec![b's'; 64 * 1024];
            let push = async {
                for _ in 0..16 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            };
            // The push stalls once the buffers are full; the idle timeout then closes it.
            let _ = tokio::time::timeout(T, push).await;
            let mut buf = vec![0u8; 4096];
            let closed = tokio::time::timeout(T, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            closed.map_err(|_| "a stalled tunnel was never closed".to_owned())
        })
        .await;
        assert_eq!(failed, 0, "stalls were not contained; first: {first:?}");
        // Plain requests to a stalled upstream whose clients give up: the proxy lets go too.
        let (failed, first) = run_many(STALLS, STALLS, move |_| async move {
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            s.write_all(
                format!("GET http://stall.test:{sport}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok(())
        })
        .await;
        assert_eq!(failed, 0, "{first:?}");
        let took = started.elapsed();
        let rounds = prober.served("upstream resets and stalls").await;
        println!(
            "soak upstreams: {RESETS} resets, {STALLS} stalled tunnels pushed 1 MiB each and \
             {STALLS} abandoned requests to a stalled upstream in {:.1} s; {rounds} legitimate \
             rounds served meanwhile",
            took.as_secs_f64()
        );
        // Once the stalled tunnels are gone their relay buffers are back in the pools (two
        // threads, at most 32 buffers of 64 KiB each): what remains is what any connection holds.
        watch
            .recovered(
                &proxy,
                &legit,
                1,
                SLACK + 2 * STALLS as u64 * PER_CONNECTION,
            )
            .await;
    });
}

#[test]
fn a_stalled_audit_sink_bounds_memory_and_sigterm_still_exits() {
    soak(|| async {
        // Enough refusals that their lines, were they all held, would be twice the bound.
        const FLOOD: usize = 100_000;
        const WIDTH: usize = 32;
        const PIPELINED: usize = 50;
        let web = http_upstream().await;
        let echo = echo_upstream().await;
        let mut args = Legit::flags(web, echo);
        args.extend(
            [
                "--worker-threads",
                THREADS,
                "--audit-log",
                "-",
                "--drain-timeout",
                "2s",
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proxy = Proxy::start_with_stalled_stdout(&args);
        let legit = Legit::new(proxy.addr, web, echo);
        let watch = Watch::start("stalled audit sink", &proxy, &legit).await;
        let prober = Prober::start(&legit);
        let addr = proxy.addr;
        let started = Instant::now();
        // Refusals until the count or the time bound is reached, pipelined and for the longest
        // name a host may have, so each leaves a long audit line: a proxy that makes a client
        // wait for a stalled sink answers fewer in the time.
        let label = "a".repeat(60);
        let host = format!("{label}.{label}.{label}.{label}.dn.test");
        let answered = Arc::new(AtomicUsize::new(0));
        let stop_at = Instant::now() + Duration::from_secs(60);
        let count = answered.clone();
        let (failed, first) = run_many(FLOOD / PIPELINED, WIDTH, move |_| {
            let count = count.clone();
            let host = host.clone();
            async move {
                if Instant::now() > stop_at {
                    return Ok(());
                }
                refused_pipelined(addr, &host, PIPELINED).await?;
                count.fetch_add(PIPELINED, Ordering::Relaxed);
                Ok(())
            }
        })
        .await;
        let took = started.elapsed();
        assert_eq!(failed, 0, "refusals went unanswered; first: {first:?}");
        let rounds = prober.served("a stalled audit sink").await;
        let refusals = answered.load(Ordering::Relaxed);
        println!(
            "soak stalled audit sink: {refusals} refusals answered in {:.1} s ({:.0}/s) while \
             nobody read the audit log; {rounds} legitimate rounds served meanwhile",
            took.as_secs_f64(),
            refusals as f64 / took.as_secs_f64()
        );
        // While the sink is stalled the proxy holds the audit lines it buffers (the pipe takes
        // only 64 KiB) and its clients' connections; beyond that nothing may grow, however many
        // refusals it answers.
        watch
            .recovered(
                &proxy,
                &legit,
                1,
                STALLED_SLACK + AUDIT_HELD + WIDTH as u64 * PER_CONNECTION,
            )
            .await;
        proxy.signal("TERM");
        let code = proxy.wait_exit();
        assert_eq!(
            code,
            Some(0),
            "with a stalled audit sink SIGTERM must still drain and exit 0 (2 s drain)"
        );
        assert!(proxy.exited());
    });
}

#[test]
fn sighup_storms_during_traffic_never_refuse_an_allowed_request() {
    soak(|| async {
        const SIGNALS: usize = 400;
        const WIDTH: usize = 8;
        let web = http_upstream().await;
        let echo = echo_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("proxy.toml");
        // Two policies that both allow the legitimate destinations; the storm swaps them.
        let version = |extra: &str| {
            format!(
                "allow = ['web.test:{}', 'echo.test:{}'{extra}]\nresolve = ['web.test=127.0.0.1', 'echo.test=127.0.0.1']\nallow_cidr = ['127.0.0.0/8']\nwatch_interval = '0'\n",
                web.port(),
                echo.port()
            )
        };
        let write = |text: &str| {
            // Atomically, as a careful writer does: the storm is about signals, not torn files.
            let tmp = dir.path().join(".proxy.toml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &config).unwrap();
        };
        write(&version(""));
        let proxy = Proxy::start(&[
            "--config",
            config.to_str().unwrap(),
            "--worker-threads",
            THREADS,
        ]);
        let legit = Legit::new(proxy.addr, web, echo);
        let watch = Watch::start("SIGHUP storm", &proxy, &legit).await;
        let prober = Prober::start(&legit);
        let traffic_stop = Arc::new(AtomicBool::new(false));
        let mut traffic = JoinSet::new();
        for _ in 0..WIDTH {
            let legit = legit.clone();
            let stop = traffic_stop.clone();
            traffic.spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    legit.round().await?;
                    n += 1;
                }
                Ok::<_, String>(n)
            });
        }
        let pid = proxy.pid() as libc::pid_t;
        let started = Instant::now();
        for i in 0..SIGNALS {
            if i % 20 == 0 {
                write(&version(if i % 40 == 0 { ", 'extra.test'" } else { "" }));
            }
            // SAFETY: kill sends a signal to the proxy this test started.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        traffic_stop.store(true, Ordering::SeqCst);
        let mut served = 0;
        while let Some(r) = traffic.join_next().await {
            served += r
                .expect("no panic")
                .unwrap_or_else(|e| panic!("an allowed request failed during the storm: {e}"));
        }
        let rounds = prober.served("a SIGHUP storm").await;
        println!(
            "soak SIGHUP storm: {SIGNALS} SIGHUPs in {:.1} s with {} rounds of traffic; {rounds} \
             legitimate rounds served meanwhile",
            took.as_secs_f64(),
            served
        );
        watch
            .recovered(
                &proxy,
                &legit,
                WIDTH + 1,
                SLACK + (WIDTH as u64 + 1) * 2 * PER_CONNECTION,
            )
            .await;
        // And a real change still takes effect, by signal, after the storm.
        std::fs::write(
            &config,
            format!(
                "allow = ['echo.test:{}']\nresolve = ['web.test=127.0.0.1', 'echo.test=127.0.0.1']\nallow_cidr = ['127.0.0.0/8']\nwatch_interval = '0'\n",
                echo.port()
            ),
        )
        .unwrap();
        proxy.signal("HUP");
        let mut refused = false;
        for _ in 0..100 {
            if legit.get().await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(refused, "a reload after the storm did not take effect");
        drop(
            legit
                .tunnel()
                .await
                .expect("the tunnel destination stays allowed"),
        );
    });
}
