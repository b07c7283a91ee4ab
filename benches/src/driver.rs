//! The plan of a run and the loop that carries it out.
//!
//! All four paths are started once and stay up for the whole run. Each scenario is repeated for
//! a number of rounds, and within a round the peers take turns in a rotating order, so slow
//! drift of the machine (thermal, other work) hits every peer alike. Samples of the same
//! scenario and peer are pooled across rounds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::client::{self, Route, HOST};
use crate::hello::client_hello;
use crate::nginx::{self, Nginx};
use crate::peers::{self, Peer, PeerConfig, PeerKind};
use crate::procfs::CpuMeter;
use crate::scenarios::{self, IdleSample, Sample};
use crate::servers;
use crate::tls::BenchTls;

/// The scenarios a run can be limited to (`--only`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Tunnels,
    Bulk,
    Http,
    Denials,
    Flood,
    Idle,
    /// HTTPS download of a large file from nginx through the tunnel.
    HttpsDownload,
    /// Small HTTPS requests over long-lived keep-alive tunnels.
    Api,
    /// An HTTPS event stream: time to first event and delay per event.
    Events,
    /// Full-duplex echo against an upstream that copies 8 KiB at a time.
    Duplex,
    /// Plain-HTTP download of the large file through the forward proxy.
    HttpDownload,
    /// paude-launch's verbs on a real Podman session beside the podman CLI's.
    Verbs,
}

impl Scenario {
    /// Whether the scenario needs nginx.
    fn needs_nginx(self) -> bool {
        matches!(
            self,
            Scenario::HttpsDownload | Scenario::Api | Scenario::HttpDownload
        )
    }
}

/// How much of everything a run does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: &'static str,
    pub rounds: usize,
    /// Measured time of one scenario on one peer in one round.
    pub duration: Duration,
    pub tunnel_concurrency: Vec<usize>,
    pub bulk_tunnels: Vec<usize>,
    pub http_concurrency: usize,
    pub deny_concurrency: usize,
    /// Concurrency of the allowed tunnels measured with and without the denial flood.
    pub flood_concurrency: usize,
    pub flood_per_sec: u32,
    /// Rounds of the flood comparison, which needs more than the others to see a 10 % change.
    pub flood_rounds: usize,
    pub idle_tunnels: usize,
    /// Writes of the bulk scenario.
    pub bulk_block: usize,
    /// Parallel HTTPS downloads, one row each.
    pub https_streams: Vec<usize>,
    /// The size of the file nginx serves for the downloads.
    pub file_len: u64,
    /// Keep-alive tunnels carrying the small API requests.
    pub api_concurrency: usize,
    /// Event streams open at once, the time between two events of a stream, and the events a
    /// stream reads before it closes and a new one is opened.
    pub event_streams: usize,
    pub event_interval: Duration,
    pub events_per_stream: usize,
    /// Tunnels of the full-duplex scenario and the size of the client's writes.
    pub duplex_tunnels: Vec<usize>,
    pub duplex_block: usize,
    /// Parallel plain-HTTP downloads.
    pub http_download_streams: usize,
    /// Rounds of the launcher verbs (each creates, stops, starts and deletes a session); none
    /// in the smoke mode, which needs no container engine.
    pub verb_rounds: usize,
    /// The scenarios to run; all when empty.
    pub only: Vec<Scenario>,
}

impl Plan {
    pub fn includes(&self, scenario: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }

    /// The full benchmark: about ten minutes on two cores.
    pub fn full() -> Self {
        Plan {
            name: "full",
            rounds: 3,
            duration: Duration::from_secs(2),
            tunnel_concurrency: vec![1, 16, 256],
            bulk_tunnels: vec![1, 8],
            http_concurrency: 64,
            deny_concurrency: 16,
            flood_concurrency: 16,
            flood_per_sec: 1000,
            flood_rounds: 9,
            idle_tunnels: 10_000,
            bulk_block: 128 * 1024,
            https_streams: vec![1, 8],
            file_len: 256 << 20,
            api_concurrency: 8,
            event_streams: 8,
            event_interval: Duration::from_millis(2),
            events_per_stream: 100,
            duplex_tunnels: vec![1],
            duplex_block: 256 * 1024,
            http_download_streams: 1,
            verb_rounds: 5,
            only: Vec::new(),
        }
    }

    /// The smoke mode: every scenario on every path, for a fraction of a second each.
    pub fn smoke() -> Self {
        Plan {
            name: "smoke",
            rounds: 1,
            duration: Duration::from_millis(300),
            tunnel_concurrency: vec![1, 16],
            bulk_tunnels: vec![1, 2],
            http_concurrency: 8,
            deny_concurrency: 4,
            flood_concurrency: 4,
            flood_per_sec: 200,
            flood_rounds: 1,
            idle_tunnels: 100,
            bulk_block: 128 * 1024,
            https_streams: vec![1, 2],
            file_len: 8 << 20,
            api_concurrency: 2,
            event_streams: 2,
            event_interval: Duration::from_millis(2),
            events_per_stream: 50,
            duplex_tunnels: vec![1],
            duplex_block: 256 * 1024,
            http_download_streams: 1,
            verb_rounds: 0,
            only: Vec::new(),
        }
    }

    /// Whether the run measures the launcher's verbs.
    pub fn runs_verbs(&self) -> bool {
        self.verb_rounds > 0 && self.includes(Scenario::Verbs)
    }

    /// Whether the run needs nginx (the HTTPS and plain downloads and the API requests).
    pub fn needs_nginx(&self) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s.needs_nginx())
    }
}

/// The machine the numbers were taken on.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub nofile_limit: u64,
}

/// Everything a run measured, keyed by scenario parameter and peer.
#[derive(Debug)]
pub struct Results {
    pub plan: Plan,
    pub machine: Machine,
    pub versions: BTreeMap<PeerKind, String>,
    pub tunnel: BTreeMap<(usize, PeerKind), Sample>,
    pub bulk: BTreeMap<(usize, PeerKind), Sample>,
    pub http: BTreeMap<PeerKind, Sample>,
    pub deny: BTreeMap<PeerKind, Sample>,
    pub flood_baseline: BTreeMap<PeerKind, Sample>,
    pub flood_allowed: BTreeMap<PeerKind, Sample>,
    pub flood_denied: BTreeMap<PeerKind, Sample>,
    pub idle: BTreeMap<PeerKind, IdleSample>,
    /// HTTPS downloads by number of parallel streams.
    pub https: BTreeMap<(usize, PeerKind), Sample>,
    pub api: BTreeMap<PeerKind, Sample>,
    /// Event-stream connections (latency: time to first event) and events (latency: delay).
    pub event_connections: BTreeMap<PeerKind, Sample>,
    pub events: BTreeMap<PeerKind, Sample>,
    /// Full-duplex echo against the small-buffer upstream, by number of tunnels.
    pub duplex: BTreeMap<(usize, PeerKind), Sample>,
    pub http_download: BTreeMap<PeerKind, Sample>,
    /// The launcher's verbs beside podman's (empty when not measured).
    pub verbs: Vec<crate::verbs::VerbTiming>,
    /// Why the verbs were not measured, when they were asked for and failed.
    pub verbs_error: Option<String>,
}

impl Results {
    /// Empty results of `plan` on `machine` with these peers' versions.
    pub fn new(plan: Plan, machine: Machine, versions: BTreeMap<PeerKind, String>) -> Self {
        Results {
            plan,
            machine,
            versions,
            tunnel: BTreeMap::new(),
            bulk: BTreeMap::new(),
            http: BTreeMap::new(),
            deny: BTreeMap::new(),
            flood_baseline: BTreeMap::new(),
            flood_allowed: BTreeMap::new(),
            flood_denied: BTreeMap::new(),
            idle: BTreeMap::new(),
            https: BTreeMap::new(),
            api: BTreeMap::new(),
            event_connections: BTreeMap::new(),
            events: BTreeMap::new(),
            duplex: BTreeMap::new(),
            http_download: BTreeMap::new(),
            verbs: Vec::new(),
            verbs_error: None,
        }
    }
}

/// Where the paude-proxy binary is and which peers to include.
#[derive(Clone, Debug)]
pub struct Setup {
    pub paude_bin: PathBuf,
    /// The `paude-benches` binary, which serves the echo server in a process of its own.
    pub helper_bin: PathBuf,
    pub peers: Vec<PeerKind>,
}

/// The peers in the order they take their turn in `round`.
fn rotation(peers: &[PeerKind], round: usize) -> Vec<PeerKind> {
    let mut order = peers.to_vec();
    if !order.is_empty() {
        let shift = round % order.len();
        order.rotate_left(shift);
    }
    order
}

fn machine(nofile_limit: u64) -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Machine {
        cpus,
        kernel,
        nofile_limit,
    }
}

/// Descriptors a proxy keeps for its listener, logs, libraries and the tunnels of other scenarios
/// still closing when the idle scenario starts.
const IDLE_RESERVE: u64 = 200;

/// Raises the descriptor limit so the idle scenario's tunnels fit (the peers inherit it).
fn raise_nofile(wanted: u64) -> u64 {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        if hard < wanted {
            // Only root may raise the hard limit; if that fails, the soft limit is raised to the hard one.
            let _ = rlimit::Resource::NOFILE.set(wanted, wanted);
        }
    }
    rlimit::increase_nofile_limit(wanted).unwrap_or(0)
}

/// Carries out `plan` on the peers of `setup` and returns all samples.
pub async fn run(plan: Plan, setup: &Setup) -> anyhow::Result<Results> {
    // Each idle tunnel costs a proxy two descriptors (client and upstream side); the peers
    // inherit this process's limit.
    let nofile = raise_nofile((plan.idle_tunnels as u64) * 2 + IDLE_RESERVE);
    let mut plan = plan;
    let fit = (nofile.saturating_sub(IDLE_RESERVE) / 2) as usize;
    if fit < plan.idle_tunnels {
        eprintln!(
            "bench: the descriptor limit (ulimit -Hn) is {nofile}: a proxy fits only {fit} idle tunnels, not {}",
            plan.idle_tunnels
        );
        plan.idle_tunnels = fit;
    }

    let echo = servers::spawn_echo_process(&setup.helper_bin, servers::ECHO_BUFFER).await?;
    let small_echo =
        servers::spawn_echo_process(&setup.helper_bin, servers::SMALL_ECHO_BUFFER).await?;
    let origin = servers::start_origin().await?;
    let tls = Arc::new(BenchTls::new().context("cannot make the benchmark's test CA")?);
    let nginx = match plan.needs_nginx() {
        true => Some(
            nginx::start(&tls, plan.file_len)
                .await
                .context("cannot start nginx, the HTTPS origin")?,
        ),
        false => None,
    };
    let events = servers::start_event_stream(tls.server.clone(), plan.event_interval).await?;
    let mut upstream_pids: Vec<u32> = [echo.pid(), small_echo.pid()]
        .into_iter()
        .flatten()
        .collect();
    upstream_pids.extend(nginx.as_ref().and_then(Nginx::pid));
    let meter = CpuMeter { upstream_pids };
    let mut ports = vec![small_echo.addr.port(), events.addr.port()];
    if let Some(nginx) = &nginx {
        ports.extend([nginx.tls.port(), nginx.plain.port()]);
    }
    let config = PeerConfig {
        paude_bin: setup.paude_bin.clone(),
        helper_bin: setup.helper_bin.clone(),
        echo: echo.addr,
        origin: origin.addr,
        extra_ports: ports,
        max_connections: plan.idle_tunnels + 1024,
    };
    let mut running: BTreeMap<PeerKind, Peer> = BTreeMap::new();
    for kind in &setup.peers {
        let peer = peers::start(*kind, &config)
            .await
            .with_context(|| format!("cannot start {}", kind.name()))?;
        running.insert(*kind, peer);
    }
    let hello: Arc<[u8]> = client_hello(HOST).into();

    for peer in running.values() {
        check_path(peer, echo.addr, origin.addr, &hello).await?;
        if let Some(nginx) = &nginx {
            check_https(peer, nginx, &tls).await?;
        }
    }

    let versions = running
        .iter()
        .map(|(k, p)| (*k, p.version.clone()))
        .collect();
    let mut results = Results::new(plan.clone(), machine(nofile), versions);
    let kinds: Vec<PeerKind> = running.keys().copied().collect();
    let proxies: Vec<PeerKind> = kinds.iter().copied().filter(|k| k.is_proxy()).collect();
    let refusers: Vec<PeerKind> = kinds.iter().copied().filter(|k| k.refuses()).collect();
    let http_paths: Vec<PeerKind> = kinds
        .iter()
        .copied()
        .filter(|k| k.forwards_http())
        .collect();
    let d = plan.duration;

    if plan.includes(Scenario::Tunnels) {
        for &c in &plan.tunnel_concurrency {
            for round in 0..plan.rounds {
                for kind in rotation(&kinds, round) {
                    let peer = alive(&mut running, kind)?;
                    let run = scenarios::tunnel_rate(peer.route, echo.addr, hello.clone(), c, d);
                    let sample = metered(&meter, peer.pid(), run).await;
                    progress(
                        &format!("tunnels c={c}"),
                        kind,
                        round,
                        &sample,
                        sample.ops_per_sec(),
                        "tunnels/s",
                    );
                    results
                        .tunnel
                        .entry((c, kind))
                        .or_default()
                        .add_round(sample);
                }
            }
        }
    }
    if plan.includes(Scenario::Bulk) {
        for &n in &plan.bulk_tunnels {
            for round in 0..plan.rounds {
                for kind in rotation(&kinds, round) {
                    let peer = alive(&mut running, kind)?;
                    let run = scenarios::bulk(
                        peer.route,
                        echo.addr,
                        hello.clone(),
                        n,
                        plan.bulk_block,
                        d,
                    );
                    let sample = metered(&meter, peer.pid(), run).await;
                    progress(
                        &format!("bulk x{n}"),
                        kind,
                        round,
                        &sample,
                        sample.gib_per_sec(),
                        "GiB/s",
                    );
                    results.bulk.entry((n, kind)).or_default().add_round(sample);
                }
            }
        }
    }
    if plan.includes(Scenario::Http) {
        for round in 0..plan.rounds {
            for kind in rotation(&http_paths, round) {
                let peer = alive(&mut running, kind)?;
                let run = scenarios::http(peer.route, origin.addr, plan.http_concurrency, d);
                let sample = metered(&meter, peer.pid(), run).await;
                progress("http", kind, round, &sample, sample.ops_per_sec(), "req/s");
                results.http.entry(kind).or_default().add_round(sample);
            }
        }
    }
    if plan.includes(Scenario::Denials) {
        for round in 0..plan.rounds {
            for kind in rotation(&refusers, round) {
                let peer = alive(&mut running, kind)?;
                let Route::Proxy(addr) = peer.route else {
                    continue;
                };
                let run = scenarios::denials(addr, plan.deny_concurrency, d);
                let sample = metered(&meter, peer.pid(), run).await;
                progress(
                    "denials",
                    kind,
                    round,
                    &sample,
                    sample.ops_per_sec(),
                    "refusals/s",
                );
                results.deny.entry(kind).or_default().add_round(sample);
            }
        }
    }
    if plan.includes(Scenario::Flood) {
        // Baseline and flood alternate in half-length slices, in the order base, flood, flood,
        // base, so a machine that speeds up or slows down during the round affects both alike.
        let half = d / 2;
        for round in 0..plan.flood_rounds {
            for kind in rotation(&refusers, round) {
                let peer = alive(&mut running, kind)?;
                let route = peer.route;
                let c = plan.flood_concurrency;
                let mut base = Sample::default();
                let mut allowed = Sample::default();
                let mut denied = Sample::default();
                for flooded in [false, true, true, false] {
                    if flooded {
                        let (a, f) = scenarios::tunnel_rate_under_flood(
                            route,
                            echo.addr,
                            hello.clone(),
                            c,
                            plan.flood_per_sec,
                            half,
                        )
                        .await;
                        allowed.merge(a);
                        denied.merge(f);
                    } else {
                        base.merge(
                            scenarios::tunnel_rate(route, echo.addr, hello.clone(), c, half).await,
                        );
                    }
                }
                progress(
                    "flood baseline",
                    kind,
                    round,
                    &base,
                    base.ops_per_sec(),
                    "tunnels/s",
                );
                progress(
                    "flood allowed",
                    kind,
                    round,
                    &allowed,
                    allowed.ops_per_sec(),
                    "tunnels/s",
                );
                progress(
                    "flood denied",
                    kind,
                    round,
                    &denied,
                    denied.ops_per_sec(),
                    "refusals/s",
                );
                results
                    .flood_baseline
                    .entry(kind)
                    .or_default()
                    .add_round(base);
                results
                    .flood_allowed
                    .entry(kind)
                    .or_default()
                    .add_round(allowed);
                results
                    .flood_denied
                    .entry(kind)
                    .or_default()
                    .add_round(denied);
            }
        }
    }
    if plan.includes(Scenario::HttpsDownload) {
        let nginx = nginx.as_ref().context("nginx is not running")?;
        for &n in &plan.https_streams {
            let (addr, tls) = (nginx.tls, tls.clone());
            let samples = interleaved(
                &plan,
                &kinds,
                &mut running,
                &meter,
                &format!("https x{n}"),
                ("GiB/s", Sample::gib_per_sec),
                |route| scenarios::https_download(route, addr, tls.clone(), n, d),
            )
            .await?;
            for (kind, sample) in samples {
                results.https.insert((n, kind), sample);
            }
        }
    }
    if plan.includes(Scenario::Api) {
        let nginx = nginx.as_ref().context("nginx is not running")?;
        let (addr, c) = (nginx.tls, plan.api_concurrency);
        results.api = interleaved(
            &plan,
            &kinds,
            &mut running,
            &meter,
            "api",
            ("req/s", Sample::ops_per_sec),
            |route| scenarios::api(route, addr, tls.clone(), c, d),
        )
        .await?;
    }
    if plan.includes(Scenario::Events) {
        for round in 0..plan.rounds {
            for kind in rotation(&kinds, round) {
                let peer = alive(&mut running, kind)?;
                let run = scenarios::event_stream(
                    peer.route,
                    events.addr,
                    tls.clone(),
                    plan.event_streams,
                    plan.events_per_stream,
                    d,
                );
                let before = meter.read(peer.pid());
                let (connections, mut delivered) = run.await;
                delivered.cpu = meter.read(peer.pid()) - before;
                let p50 = delivered.quantile_us(0.5).unwrap_or(f64::NAN);
                progress(
                    "events",
                    kind,
                    round,
                    &connections,
                    p50,
                    "µs event delay p50",
                );
                results
                    .event_connections
                    .entry(kind)
                    .or_default()
                    .add_round(connections);
                results.events.entry(kind).or_default().add_round(delivered);
            }
        }
    }
    if plan.includes(Scenario::Duplex) {
        for &n in &plan.duplex_tunnels {
            let (addr, block, hello) = (small_echo.addr, plan.duplex_block, hello.clone());
            let samples = interleaved(
                &plan,
                &kinds,
                &mut running,
                &meter,
                &format!("duplex x{n}"),
                ("GiB/s", Sample::gib_per_sec),
                |route| scenarios::bulk(route, addr, hello.clone(), n, block, d),
            )
            .await?;
            for (kind, sample) in samples {
                results.duplex.insert((n, kind), sample);
            }
        }
    }
    if plan.includes(Scenario::HttpDownload) {
        let nginx = nginx.as_ref().context("nginx is not running")?;
        let (addr, n) = (nginx.plain, plan.http_download_streams);
        results.http_download = interleaved(
            &plan,
            &kinds,
            &mut running,
            &meter,
            "http download",
            ("GiB/s", Sample::gib_per_sec),
            |route| scenarios::http_download(route, addr, n, d),
        )
        .await?;
    }
    if plan.includes(Scenario::Idle) {
        for kind in proxies {
            let peer = alive(&mut running, kind)?;
            let pid = peer.pid().context("a proxy peer has no process id")?;
            let route = peer.route;
            let sample =
                scenarios::idle(route, echo.addr, hello.clone(), plan.idle_tunnels, pid).await?;
            eprintln!(
                "bench: idle {:<12} {} of {} tunnels open, rss {} -> {} KiB{}",
                kind.name(),
                sample.opened,
                sample.requested,
                sample.rss_before_kib,
                sample.rss_after_kib,
                sample
                    .first_error
                    .as_deref()
                    .map(|e| format!(" (first error: {e})"))
                    .unwrap_or_default()
            );
            results.idle.insert(kind, sample);
            // Let the closed tunnels drain before the next peer is measured.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for kind in kinds {
        alive(&mut running, kind)?;
    }
    Ok(results)
}

/// Runs one scenario through each of `kinds` for the plan's rounds, the peers taking turns in
/// rotating order, each run metered; prints each run's `value` and returns each peer's rounds.
async fn interleaved<F, Fut>(
    plan: &Plan,
    kinds: &[PeerKind],
    running: &mut BTreeMap<PeerKind, Peer>,
    meter: &CpuMeter,
    label: &str,
    (unit, value): (&str, fn(&Sample) -> f64),
    mut scenario: F,
) -> anyhow::Result<BTreeMap<PeerKind, Sample>>
where
    F: FnMut(Route) -> Fut,
    Fut: std::future::Future<Output = Sample>,
{
    let mut samples: BTreeMap<PeerKind, Sample> = BTreeMap::new();
    for round in 0..plan.rounds {
        for kind in rotation(kinds, round) {
            let peer = alive(running, kind)?;
            let sample = metered(meter, peer.pid(), scenario(peer.route)).await;
            progress(label, kind, round, &sample, value(&sample), unit);
            samples.entry(kind).or_default().add_round(sample);
        }
    }
    Ok(samples)
}

/// Runs one measurement and records the CPU time spent during it.
async fn metered(
    meter: &CpuMeter,
    proxy_pid: Option<u32>,
    run: impl std::future::Future<Output = Sample>,
) -> Sample {
    let before = meter.read(proxy_pid);
    let mut sample = run.await;
    sample.cpu = meter.read(proxy_pid) - before;
    sample
}

fn alive(running: &mut BTreeMap<PeerKind, Peer>, kind: PeerKind) -> anyhow::Result<&mut Peer> {
    let peer = running
        .get_mut(&kind)
        .with_context(|| format!("{} is not running", kind.name()))?;
    peer.check_alive()?;
    Ok(peer)
}

/// One tunnel, one GET and one refusal through `peer`, so a misconfigured peer fails the run at
/// once with a clear message instead of producing a table of errors.
async fn check_path(
    peer: &Peer,
    echo: std::net::SocketAddr,
    origin: std::net::SocketAddr,
    hello: &[u8],
) -> anyhow::Result<()> {
    let name = peer.kind.name();
    let limit = Duration::from_secs(10);
    tokio::time::timeout(limit, client::open_tunnel(peer.route, echo, hello))
        .await
        .with_context(|| format!("{name}: a tunnel to the echo server timed out"))?
        .with_context(|| format!("{name}: cannot open a tunnel to the echo server"))?;
    if peer.kind.forwards_http() {
        tokio::time::timeout(limit, client::HttpClient::new(peer.route, origin).get())
            .await
            .with_context(|| format!("{name}: a GET to the origin timed out"))?
            .with_context(|| format!("{name}: cannot GET from the origin"))?;
    }
    if let Route::Proxy(addr) = peer.route {
        tokio::time::timeout(limit, client::denied_connect(addr))
            .await
            .with_context(|| format!("{name}: a denied CONNECT timed out"))?
            .with_context(|| format!("{name}: does not refuse a CONNECT to a denied host"))?;
    }
    Ok(())
}

/// One HTTPS request to nginx through `peer`, so a path that cannot carry TLS to nginx fails
/// the run at once.
async fn check_https(peer: &Peer, nginx: &Nginx, tls: &BenchTls) -> anyhow::Result<()> {
    let name = peer.kind.name();
    tokio::time::timeout(
        Duration::from_secs(10),
        scenarios::api_request_once(peer.route, nginx.tls, tls),
    )
    .await
    .with_context(|| format!("{name}: an HTTPS request to nginx timed out"))?
    .with_context(|| format!("{name}: cannot make an HTTPS request to nginx"))
}

fn progress(scenario: &str, kind: PeerKind, round: usize, sample: &Sample, value: f64, unit: &str) {
    let errors = match (&sample.first_error, sample.errors) {
        (Some(first), n) if n > 0 => format!(" ({n} errors, first: {first})"),
        _ => String::new(),
    };
    eprintln!(
        "bench: {scenario:<15} {:<12} round {round}: {value:>10.2} {unit}{errors}",
        kind.name()
    );
}

/// Checks that a smoke run produced sane, non-zero results for every peer and scenario.
pub fn check_sane(results: &Results) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut idle_problems = Vec::new();
    let mut check = |what: String, sample: Option<&Sample>, need_bytes: bool| match sample {
        None => problems.push(format!("{what}: no sample")),
        Some(s) if s.ops == 0 => problems.push(format!(
            "{what}: no completed operation ({:?})",
            s.first_error
        )),
        Some(s) if need_bytes && s.bytes == 0 => problems.push(format!("{what}: no bytes echoed")),
        Some(s) if s.errors > 0 => problems.push(format!(
            "{what}: {} errors, first: {:?}",
            s.errors, s.first_error
        )),
        Some(_) => {}
    };
    for kind in results.versions.keys().copied() {
        let name = kind.name();
        let on = |scenario| results.plan.includes(scenario);
        for &c in results
            .plan
            .tunnel_concurrency
            .iter()
            .filter(|_| on(Scenario::Tunnels))
        {
            check(
                format!("{name} tunnels c={c}"),
                results.tunnel.get(&(c, kind)),
                false,
            );
        }
        for &n in results
            .plan
            .bulk_tunnels
            .iter()
            .filter(|_| on(Scenario::Bulk))
        {
            check(
                format!("{name} bulk x{n}"),
                results.bulk.get(&(n, kind)),
                true,
            );
        }
        if on(Scenario::Http) && kind.forwards_http() {
            check(format!("{name} http"), results.http.get(&kind), false);
        }
        if kind.refuses() && on(Scenario::Denials) {
            check(format!("{name} denials"), results.deny.get(&kind), false);
        }
        if kind.refuses() && on(Scenario::Flood) {
            check(
                format!("{name} flood baseline"),
                results.flood_baseline.get(&kind),
                false,
            );
            check(
                format!("{name} flood allowed"),
                results.flood_allowed.get(&kind),
                false,
            );
            check(
                format!("{name} flood denied"),
                results.flood_denied.get(&kind),
                false,
            );
        }
        for &n in results
            .plan
            .https_streams
            .iter()
            .filter(|_| on(Scenario::HttpsDownload))
        {
            check(
                format!("{name} HTTPS download x{n}"),
                results.https.get(&(n, kind)),
                true,
            );
        }
        if on(Scenario::Api) {
            check(format!("{name} HTTPS API"), results.api.get(&kind), false);
        }
        if on(Scenario::Events) {
            check(
                format!("{name} event stream connections"),
                results.event_connections.get(&kind),
                false,
            );
            check(
                format!("{name} event stream events"),
                results.events.get(&kind),
                false,
            );
        }
        for &n in results
            .plan
            .duplex_tunnels
            .iter()
            .filter(|_| on(Scenario::Duplex))
        {
            check(
                format!("{name} full-duplex x{n}"),
                results.duplex.get(&(n, kind)),
                true,
            );
        }
        if on(Scenario::HttpDownload) {
            check(
                format!("{name} plain HTTP download"),
                results.http_download.get(&kind),
                true,
            );
        }
        if kind.is_proxy() && on(Scenario::Idle) {
            match results.idle.get(&kind) {
                Some(idle) if idle.opened == idle.requested && idle.rss_after_kib > 0 => {}
                other => idle_problems.push(format!("{name} idle: {other:?}")),
            }
        }
    }
    problems.extend(idle_problems);
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "the benchmark harness produced unusable results:\n{}",
            problems.join("\n")
        )
    }
}
