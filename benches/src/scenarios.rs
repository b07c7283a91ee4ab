//! One measurement: one scenario through one path for a bounded time.
//!
//! Every scenario spawns its workers on the shared runtime, runs until a deadline, and returns
//! a [`Sample`] of counts and latencies. Each operation is itself under a timeout, so a stuck
//! peer shows up as errors instead of stalling the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::client::{
    denied_connect, is_early_close, open_raw_tunnel, open_tunnel, read_head, HttpClient, Route,
    HOST,
};
use crate::procfs::CpuUse;
use crate::servers::{clock_ns, EVENTS_PATH};
use crate::tls::BenchTls;

/// The longest one operation may take before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// What one scenario run through one path produced.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Completed operations (tunnels, requests, refusals).
    pub ops: u64,
    /// Bytes echoed back (bulk scenarios only).
    pub bytes: u64,
    /// Failed operations.
    pub errors: u64,
    /// The first failure, to explain a non-zero error count.
    pub first_error: Option<String>,
    /// Measured wall time.
    pub elapsed: Duration,
    /// Per-operation latency in microseconds.
    pub latencies_us: Vec<u32>,
    /// Operations and bytes per second of each round added with [`Sample::add_round`].
    pub round_rates: Vec<(f64, f64)>,
    /// CPU time spent while it ran, when the driver metered it.
    pub cpu: CpuUse,
}

impl Sample {
    /// Adds another run of the same scenario on the same path.
    pub fn merge(&mut self, other: Sample) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
        self.cpu += other.cpu;
    }

    /// CPU microseconds per completed operation: the proxy's, and the load generator's and
    /// upstream's together.
    pub fn cpu_us_per_op(&self) -> Option<(f64, f64)> {
        (self.ops > 0 && self.cpu.machine > 0.0).then(|| {
            let per = 1e6 / self.ops as f64;
            (self.cpu.proxy * per, self.cpu.load * per)
        })
    }

    /// CPU seconds per GiB echoed: the proxy's, and the load generator's and upstream's.
    pub fn cpu_secs_per_gib(&self) -> Option<(f64, f64)> {
        (self.bytes > 0 && self.cpu.machine > 0.0).then(|| {
            let gib = self.bytes as f64 / (1u64 << 30) as f64;
            (self.cpu.proxy / gib, self.cpu.load / gib)
        })
    }

    /// The median over rounds of this sample's rate divided by `base`'s rate in the same round:
    /// rounds of the two were taken side by side, so drift of the machine between rounds
    /// cancels out of each ratio. Falls back to the ratio of the rates without rounds.
    pub fn paired_ratio(&self, base: &Sample) -> Option<f64> {
        let paired = self
            .round_rates
            .iter()
            .zip(&base.round_rates)
            .filter(|(_, b)| b.0 > 0.0)
            .map(|(r, b)| r.0 / b.0);
        median(paired).or_else(|| {
            let b = base.ops_per_sec();
            (b > 0.0).then(|| self.ops_per_sec() / b)
        })
    }

    /// How busy the whole machine was, as a share of all its CPUs.
    pub fn machine_busy(&self, cpus: usize) -> Option<f64> {
        let wall = self.elapsed.as_secs_f64();
        (self.cpu.machine > 0.0 && wall > 0.0).then(|| self.cpu.machine / (wall * cpus as f64))
    }

    /// Adds one round of the same scenario on the same path, keeping its own rate, so that a
    /// round disturbed by other work on the machine can be outvoted by the median.
    pub fn add_round(&mut self, round: Sample) {
        let secs = round.elapsed.as_secs_f64().max(1e-9);
        self.round_rates
            .push((round.ops as f64 / secs, round.bytes as f64 / secs));
        self.merge(round);
    }

    /// Operations per second: the median over rounds, or the pooled rate of a single run.
    pub fn ops_per_sec(&self) -> f64 {
        median(self.round_rates.iter().map(|r| r.0))
            .unwrap_or(self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9))
    }

    /// Bytes echoed per second in GiB: the median over rounds, or the pooled rate of one run.
    pub fn gib_per_sec(&self) -> f64 {
        let bytes = median(self.round_rates.iter().map(|r| r.1))
            .unwrap_or(self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9));
        bytes / (1u64 << 30) as f64
    }

    /// The `q`-quantile (0..=1) of the latencies, in microseconds.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() - 1) as f64 * q).round() as usize;
        Some(sorted[index] as f64)
    }

    fn record_error(&mut self, error: anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{error:#}"));
        }
    }
}

/// The median of `values`, or `None` when there are none.
pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = values.collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

async fn run_op<F, T>(sample: &mut Sample, op: F) -> Option<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    let result = match timeout(OP_TIMEOUT, op).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("operation timed out after {OP_TIMEOUT:?}")),
    };
    match result {
        Ok(value) => {
            sample.ops += 1;
            sample
                .latencies_us
                .push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
            Some(value)
        }
        Err(error) => {
            sample.record_error(error);
            // Back off briefly so a refusing peer is not hammered in a tight loop.
            tokio::time::sleep(Duration::from_millis(2)).await;
            None
        }
    }
}

async fn join_all(mut set: JoinSet<Sample>, started: Instant) -> Sample {
    let mut total = Sample::default();
    while let Some(result) = set.join_next().await {
        match result {
            Ok(sample) => total.merge(sample),
            Err(error) => total.record_error(anyhow::anyhow!("worker failed: {error}")),
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// Like [`join_all`], counting also the failures of the setup (connections opened before the
/// clock started).
async fn join_after_setup(set: JoinSet<Sample>, started: Instant, setup: Sample) -> Sample {
    let mut total = join_all(set, started).await;
    total.errors += setup.errors;
    total.first_error = total.first_error.or(setup.first_error);
    total
}

/// Tunnels per second: each worker opens a tunnel, does one echo round trip, closes it, repeats.
/// Latency is from the start of the TCP connect to the echoed ClientHello.
pub async fn tunnel_rate(
    route: Route,
    echo: SocketAddr,
    hello: Arc<[u8]>,
    concurrency: usize,
    duration: Duration,
) -> Sample {
    closed_loop(concurrency, duration, move || {
        let hello = hello.clone();
        async move { open_tunnel(route, echo, &hello).await }
    })
    .await
}

/// `concurrency` workers, each running `op` back to back until `duration` is over.
async fn closed_loop<F, Fut, T>(concurrency: usize, duration: Duration, op: F) -> Sample
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
    T: Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let op = op.clone();
        set.spawn(async move {
            let mut sample = Sample::default();
            while Instant::now() < deadline {
                run_op(&mut sample, op()).await;
            }
            sample
        });
    }
    join_all(set, started).await
}

/// Bulk throughput: `tunnels` tunnels each stream data in writes of `block` bytes to the echo
/// server while reading what comes back, for `duration` after all of them are open; the bytes
/// echoed count. The full-duplex scenario is the same against the small-buffer echo server.
pub async fn bulk(
    route: Route,
    echo: SocketAddr,
    hello: Arc<[u8]>,
    tunnels: usize,
    block: usize,
    duration: Duration,
) -> Sample {
    let mut streams = Vec::new();
    let mut setup = Sample::default();
    for _ in 0..tunnels {
        if let Some(stream) = run_op(&mut setup, open_tunnel(route, echo, &hello)).await {
            streams.push(stream);
        }
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + duration);
    let mut set = JoinSet::new();
    for stream in streams {
        set.spawn(async move {
            let mut sample = Sample::default();
            let (mut reader, mut writer) = stream.into_split();
            let send = tokio::spawn(async move {
                let block = vec![0x5a_u8; block];
                while tokio::time::timeout_at(deadline, writer.write_all(&block))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {}
            });
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
                if n == 0 {
                    // The sender half-closes at the deadline, and the echo of that close can
                    // win the race with this read's own deadline; only an earlier end is an error.
                    if tokio::time::Instant::now() < deadline {
                        sample.record_error(anyhow::anyhow!(
                            "tunnel closed during the bulk transfer"
                        ));
                    }
                    break;
                }
                sample.bytes += n as u64;
            }
            send.abort();
            sample.ops = 1;
            sample
        });
    }
    join_after_setup(set, started, setup).await
}

/// HTTPS download: `streams` TLS connections to nginx (through the path's tunnel) each GET the
/// large file over and over on one keep-alive connection for `duration` after all are open;
/// the body bytes received count.
pub async fn https_download(
    route: Route,
    nginx: SocketAddr,
    tls: Arc<BenchTls>,
    streams: usize,
    duration: Duration,
) -> Sample {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
        crate::nginx::FILE_PATH
    );
    let open = move || {
        let tls = tls.clone();
        async move { tls.connect(route, nginx).await }
    };
    downloads(open, request, streams, duration).await
}

/// Plain-HTTP download through the path's forward proxy (absolute-form requests) or straight
/// from nginx: like [`https_download`] without TLS.
pub async fn http_download(
    route: Route,
    nginx: SocketAddr,
    streams: usize,
    duration: Duration,
) -> Sample {
    let port = nginx.port();
    let path = crate::nginx::FILE_PATH;
    let (target, request) = match route {
        Route::Direct => (
            nginx,
            format!("GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
        ),
        Route::Proxy(proxy) => (
            proxy,
            format!("GET http://{HOST}:{port}{path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
        ),
    };
    // A forward proxy is spoken to directly: no tunnel, the connection is the request's.
    let open = move || open_raw_tunnel(Route::Direct, target);
    downloads(open, request, streams, duration).await
}

/// Opens `streams` connections with `open` (before the clock starts), then runs one download
/// loop on each until `duration` has passed and adds up what they read. A connection the server
/// or proxy closes after a response is replaced by a new one, within the measured time.
async fn downloads<F, Fut, S>(
    open: F,
    request: String,
    streams: usize,
    duration: Duration,
) -> Sample
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<S>> + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut setup = Sample::default();
    let mut first = Vec::new();
    for _ in 0..streams {
        if let Some(stream) = run_op(&mut setup, open()).await {
            first.push(stream);
        }
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + duration);
    let request: Arc<[u8]> = request.into_bytes().into();
    let mut set = JoinSet::new();
    for stream in first {
        let (request, open) = (request.clone(), open.clone());
        set.spawn(async move {
            let mut sample = Sample::default();
            let mut stream = Some(stream);
            while tokio::time::Instant::now() < deadline {
                let current = match stream.take() {
                    Some(s) => s,
                    None => match tokio::time::timeout_at(deadline, open()).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(error)) => {
                            sample.record_error(error);
                            break;
                        }
                        Err(_) => break,
                    },
                };
                match download(current, &request, deadline, &mut sample).await {
                    Ok(kept) => stream = kept,
                    Err(error) => {
                        sample.record_error(error);
                        break;
                    }
                }
            }
            sample.ops = 1;
            sample
        });
    }
    join_after_setup(set, started, setup).await
}

/// GETs the file again and again on `stream`, counting body bytes, until `deadline` (then
/// returns the stream) or until a response says the connection closes after it (then returns
/// none, for the caller to open a new one).
async fn download<S>(
    mut stream: S,
    request: &[u8],
    deadline: tokio::time::Instant,
    sample: &mut Sample,
) -> anyhow::Result<Option<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    for served in 0u64.. {
        let head = match tokio::time::timeout_at(deadline, async {
            stream.write_all(request).await?;
            stream.flush().await?;
            read_head(&mut stream, &mut buf).await
        })
        .await
        {
            // A reused connection the other side closed without saying so: open a new one,
            // as HTTP clients do.
            Ok(Err(error)) if served > 0 && buf.is_empty() && is_early_close(&error) => {
                return Ok(None)
            }
            Ok(head) => head?,
            Err(_) => return Ok(Some(stream)),
        };
        ensure!(
            head.status == 200,
            "GET answered with status {}",
            head.status
        );
        let mut left = head
            .content_length
            .context("response has no Content-Length")?;
        let early = buf.len().min(left);
        buf.drain(..early);
        left -= early;
        sample.bytes += early as u64;
        while left > 0 {
            let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(n) => n?,
                Err(_) => return Ok(Some(stream)),
            };
            ensure!(n > 0, "connection closed in the middle of the download");
            let n = n.min(left);
            left -= n;
            sample.bytes += n as u64;
        }
        if head.close {
            return Ok(None);
        }
    }
    Ok(None)
}

/// The request an agent's API call sends: a small JSON body.
fn api_request() -> Vec<u8> {
    let body = format!(
        r#"{{"model":"bench","max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "b".repeat(900)
    );
    format!(
        "POST {} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        crate::nginx::API_PATH,
        body.len()
    )
    .into_bytes()
}

/// Small HTTPS requests over long-lived keep-alive tunnels, as an agent's API traffic:
/// `concurrency` TLS connections to nginx (opened before the clock starts) each POST a 1 KiB
/// JSON body and read a 2 KiB answer, back to back. Latency is per request.
pub async fn api(
    route: Route,
    nginx: SocketAddr,
    tls: Arc<BenchTls>,
    concurrency: usize,
    duration: Duration,
) -> Sample {
    let request: Arc<[u8]> = api_request().into();
    let mut setup = Sample::default();
    let mut open = Vec::new();
    for _ in 0..concurrency {
        if let Some(stream) = run_op(&mut setup, tls.connect(route, nginx)).await {
            open.push(stream);
        }
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for mut stream in open {
        let request = request.clone();
        set.spawn(async move {
            let mut sample = Sample::default();
            let mut buf = Vec::new();
            while Instant::now() < deadline {
                let answered = run_op(&mut sample, async {
                    stream.write_all(&request).await?;
                    stream.flush().await?;
                    read_response(&mut stream, &mut buf).await
                })
                .await;
                if answered.is_none() {
                    // The connection is in an unknown state: the rest of the round is lost.
                    break;
                }
            }
            sample
        });
    }
    join_after_setup(set, started, setup).await
}

/// One API request on a new HTTPS connection: checks that a path carries TLS to nginx.
pub async fn api_request_once(
    route: Route,
    nginx: SocketAddr,
    tls: &BenchTls,
) -> anyhow::Result<()> {
    let mut stream = tls.connect(route, nginx).await?;
    stream.write_all(&api_request()).await?;
    stream.flush().await?;
    let length = read_response(&mut stream, &mut Vec::new()).await?;
    ensure!(
        length == crate::nginx::API_BODY_LEN,
        "the API answer has {length} bytes, not {}",
        crate::nginx::API_BODY_LEN
    );
    Ok(())
}

/// Reads one whole response (head and Content-Length body); returns the body's length.
async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> anyhow::Result<usize> {
    let head = read_head(stream, buf).await?;
    ensure!(
        head.status == 200,
        "request answered with status {}",
        head.status
    );
    let length = head
        .content_length
        .context("response has no Content-Length")?;
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < length {
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed in the middle of a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..length);
    Ok(length)
}

/// An event stream, as a model API streams its answer: `streams` workers each open an HTTPS
/// connection to the event-stream server, read `events` events (one every few milliseconds),
/// close and start over, until `duration` is over. Returns the connections' sample, whose
/// latency is the time to the first event (from the TCP connect, through the tunnel and the
/// TLS handshake), and the events' sample, whose latency is each event's delivery delay (from
/// the server's write to the client's read).
pub async fn event_stream(
    route: Route,
    server: SocketAddr,
    tls: Arc<BenchTls>,
    streams: usize,
    events: usize,
    duration: Duration,
) -> (Sample, Sample) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + duration);
    let mut set = JoinSet::new();
    for _ in 0..streams {
        let tls = tls.clone();
        set.spawn(async move {
            let mut connections = Sample::default();
            let mut delivered = Sample::default();
            while tokio::time::Instant::now() < deadline {
                let one = read_events(route, server, &tls, events, deadline, &mut delivered);
                match timeout(OP_TIMEOUT, one).await {
                    Ok(Ok(Some(first))) => {
                        connections.ops += 1;
                        connections
                            .latencies_us
                            .push(first.as_micros().min(u32::MAX as u128) as u32);
                    }
                    // The round ended before this connection's first event: not a failure.
                    Ok(Ok(None)) => {}
                    Ok(Err(error)) => connections.record_error(error),
                    Err(_) => connections.record_error(anyhow::anyhow!(
                        "an event stream stalled for {OP_TIMEOUT:?}"
                    )),
                }
            }
            (connections, delivered)
        });
    }
    let (mut connections, mut delivered) = (Sample::default(), Sample::default());
    while let Some(result) = set.join_next().await {
        match result {
            Ok((c, d)) => {
                connections.merge(c);
                delivered.merge(d);
            }
            Err(error) => connections.record_error(anyhow::anyhow!("worker failed: {error}")),
        }
    }
    connections.elapsed = started.elapsed();
    delivered.elapsed = connections.elapsed;
    (connections, delivered)
}

/// One event-stream connection: returns the time from its start to its first event once
/// `events` events arrived or `deadline` passed (none if no event came before it), having
/// recorded each event's delay in `delivered`.
async fn read_events(
    route: Route,
    server: SocketAddr,
    tls: &BenchTls,
    events: usize,
    deadline: tokio::time::Instant,
    delivered: &mut Sample,
) -> anyhow::Result<Option<Duration>> {
    let start = Instant::now();
    let mut stream = tls.connect(route, server).await?;
    let request =
        format!("GET {EVENTS_PATH} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::new();
    let head = read_head(&mut stream, &mut buf).await?;
    ensure!(
        head.status == 200,
        "event stream answered with status {}",
        head.status
    );
    let mut first = None;
    let mut seen = 0;
    let mut chunk = [0u8; 16 * 1024];
    while seen < events {
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let now = clock_ns();
            let event = std::str::from_utf8(&buf[..end]).context("event is not UTF-8")?;
            let sent: u64 = event
                .split("\"sent_ns\":")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse().ok())
                .context("event carries no send time")?;
            delivered.ops += 1;
            delivered
                .latencies_us
                .push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
            first.get_or_insert_with(|| start.elapsed());
            buf.drain(..end + 2);
            seen += 1;
        }
        if seen >= events {
            break;
        }
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(n) => n?,
            Err(_) => break,
        };
        ensure!(n > 0, "event stream closed by the server");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(first)
}

/// Plain HTTP forwarding: `concurrency` keep-alive connections each send GETs back to back.
pub async fn http(
    route: Route,
    origin: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Sample {
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        set.spawn(async move {
            let mut sample = Sample::default();
            let mut client = HttpClient::new(route, origin);
            while Instant::now() < deadline {
                if run_op(&mut sample, client.get()).await.is_none() {
                    client = HttpClient::new(route, origin);
                }
            }
            sample
        });
    }
    join_all(set, started).await
}

/// Denial cost: `concurrency` workers ask for tunnels to the denied host as fast as refused.
pub async fn denials(proxy: SocketAddr, concurrency: usize, duration: Duration) -> Sample {
    closed_loop(concurrency, duration, move || denied_connect(proxy)).await
}

/// Allowed tunnel rate at `concurrency` while a paced flood of `per_sec` denied CONNECTs hits
/// the same proxy. Returns the allowed tunnels' sample and the flood's.
pub async fn tunnel_rate_under_flood(
    route: Route,
    echo: SocketAddr,
    hello: Arc<[u8]>,
    concurrency: usize,
    per_sec: u32,
    duration: Duration,
) -> (Sample, Sample) {
    let Route::Proxy(proxy) = route else {
        return (
            tunnel_rate(route, echo, hello, concurrency, duration).await,
            Sample::default(),
        );
    };
    let flood = tokio::spawn(async move {
        let started = Instant::now();
        let deadline = started + duration;
        let mut ticker = tokio::time::interval(Duration::from_secs(1) / per_sec.max(1));
        let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
        let mut set = JoinSet::new();
        while Instant::now() < deadline {
            ticker.tick().await;
            // A flood that cannot get a slot is dropped rather than queued: the pacing stays honest.
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                continue;
            };
            set.spawn(async move {
                let mut sample = Sample::default();
                run_op(&mut sample, denied_connect(proxy)).await;
                drop(permit);
                sample
            });
        }
        join_all(set, started).await
    });
    let allowed = tunnel_rate(route, echo, hello, concurrency, duration).await;
    let flood = flood.await.unwrap_or_default();
    (allowed, flood)
}

/// What the idle scenario found.
#[derive(Clone, Debug, Default)]
pub struct IdleSample {
    pub requested: usize,
    pub opened: usize,
    pub errors: u64,
    pub first_error: Option<String>,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

impl IdleSample {
    pub fn kib_per_tunnel(&self) -> Option<f64> {
        (self.opened > 0).then(|| {
            self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.opened as f64
        })
    }
}

/// Idle cost: opens `count` guarded tunnels, leaves them idle, and measures the resident memory
/// of the peer's processes before and after.
pub async fn idle(
    route: Route,
    echo: SocketAddr,
    hello: Arc<[u8]>,
    count: usize,
    pid: u32,
) -> anyhow::Result<IdleSample> {
    let mut result = IdleSample {
        requested: count,
        ..IdleSample::default()
    };
    result.rss_before_kib = crate::procfs::tree_rss_kib(pid)?;
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = JoinSet::new();
    for _ in 0..count {
        let hello = hello.clone();
        let permit = gate.clone().acquire_owned().await?;
        set.spawn(async move {
            let mut sample = Sample::default();
            let stream = run_op(&mut sample, open_tunnel(route, echo, &hello)).await;
            drop(permit);
            (stream, sample)
        });
    }
    let mut streams = Vec::with_capacity(count);
    while let Some(joined) = set.join_next().await {
        let (stream, sample) = joined?;
        result.errors += sample.errors;
        if result.first_error.is_none() {
            result.first_error = sample.first_error;
        }
        streams.extend(stream);
    }
    result.opened = streams.len();
    // Let the peer settle (deferred allocations, buffer trimming) before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    result.rss_after_kib = crate::procfs::tree_rss_kib(pid)?;
    drop(streams);
    Ok(result)
}
