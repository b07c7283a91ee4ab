//! paude-proxy: a filtering egress proxy (HTTP CONNECT tunnels and plain HTTP forwarding)
//! that lets a sandbox reach only allowlisted hosts.
//!
//! A request takes four hops, and the modules follow them:
//!
//! - [`server`]: accept loop, connection limit, graceful shutdown; the shared [`server::Core`].
//!   [`start`] runs one accept loop per serving thread, each on its own current-thread runtime
//!   and its own `SO_REUSEPORT` listener, so a connection never changes thread.
//! - [`head`]: the first request head on the bare socket; a CONNECT is served right there.
//! - [`handler`]: one request: parse the target ([`host`]), ask the [`policy`], then
//!   [`tunnel`] for CONNECT or [`forward`] for absolute-form HTTP.
//! - [`tunnel`]: the SNI guard ([`tls`]) on the first bytes, then the relay both ways
//!   ([`relay`], on Linux: pooled buffers borrowed while bytes flow).
//! - [`forward`]: the pooled HTTP/1 client, hop-by-hop header stripping.
//! - [`connect`]: the only outbound socket: resolve once ([`dns`]), check every address, dial
//!   the checked address.
//!
//! Around them: [`config`] (flags and TOML into typed settings), [`error`] (reason codes and
//! the one refusal-to-response mapping), [`audit`] (JSON lines), [`admin`] (metrics, health,
//! policy), [`reload`] (SIGHUP and the file watcher). [`start`] wires them up for the binary;
//! programs that embed the proxy can call [`server::run`] with a listener of their own.
//! [`entry`] is the whole command (`main`), shared by the binary and paude-launch, and
//! [`BUILD_ID`] names what went into this build.

pub mod admin;
pub mod audit;
pub mod config;
pub mod connect;
pub mod dns;
pub mod entry;
pub mod error;
pub mod forward;
pub mod handler;
pub mod head;
pub mod host;
pub mod ifaddrs;
pub mod policy;
#[cfg(target_os = "linux")]
pub mod relay;
pub mod reload;
pub mod server;
pub mod tls;
pub mod tunnel;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::config::{Cli, Loaded};
use crate::dns::Dns;
use crate::reload::Reloader;
use crate::server::{Core, State};

include!(concat!(env!("OUT_DIR"), "/build_id.rs"));

/// How many accepted-but-unserved connections the kernel may queue on each proxy listener (the
/// kernel caps it at `net.core.somaxconn`). The 1,024 of tokio's `TcpListener::bind` overflowed
/// in the benchmark's bursts of 256 simultaneous tunnel setups on two busy cores, turning
/// queued connections into one-second SYN retransmits.
const LISTEN_BACKLOG: u32 = 4096;

/// The least time the audit log gets to write its last lines at shutdown.
const AUDIT_CLOSE_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(1);

/// Binds one listener per serving thread on `addr`, all sharing the port through
/// `SO_REUSEPORT` so the kernel spreads connections over the threads.
///
/// `SO_REUSEPORT` would also let a second proxy started by the same user on the same port
/// silently take half the connections; a probe bind without it first makes a port that anyone
/// already listens on an error, as it is without sharing. Port 0 is resolved by the probe, so
/// every listener gets the same port.
fn bind_proxy_listeners(
    addr: std::net::SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |reuse_port: bool| -> std::io::Result<tokio::net::TcpSocket> {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // A restarted proxy can bind again while old connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(reuse_port)?;
        Ok(socket)
    };
    let probe = socket(false)?;
    probe.bind(addr)?;
    let addr = probe.local_addr()?;
    drop(probe);
    (0..count)
        .map(|_| {
            let socket = socket(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)?.into_std()
        })
        .collect()
}

/// One serving thread: a current-thread runtime that accepts on its own listener and serves
/// those connections until the drain is over.
struct ServingThread {
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl ServingThread {
    fn spawn(
        index: usize,
        listener: std::net::TcpListener,
        state: Arc<State>,
        shutdown: CancellationToken,
        drained: CancellationToken,
    ) -> anyhow::Result<ServingThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a serving thread's runtime")?;
        let thread = std::thread::Builder::new()
            .name(format!("paude-proxy-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    let accepted = server::accept(listener, state, shutdown).await;
                    // Connections accepted here are served by this runtime: keep it running
                    // until the drain is over.
                    drained.cancelled().await;
                    accepted
                })
            })
            .context("cannot start a serving thread")?;
        Ok(ServingThread { thread })
    }

    fn join(self) -> anyhow::Result<()> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("a serving thread panicked"))?
    }
}

/// Binds the listeners, prints their addresses, serves until SIGTERM or SIGINT, reloads on
/// SIGHUP and when the watched files change, then drains. Runs on the control runtime (signals,
/// reloads, admin endpoints, audit writer); connections are served by `--worker-threads` serving
/// threads of their own.
pub async fn start(cli: Cli, loaded: Loaded) -> anyhow::Result<()> {
    let settings = loaded.settings;
    let threads = settings.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let listeners = bind_proxy_listeners(settings.listen, threads).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another program, perhaps another paude-proxy, holds that port; stop it or \
             choose another address with --listen)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot listen on {}: {e}{hint}", settings.listen)
    })?;
    let local = listeners[0].local_addr()?;
    let admin = match settings.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the admin endpoints"))?,
        ),
        None => None,
    };
    let mut own = vec![local];
    if let Some(a) = &admin {
        own.push(a.local_addr()?);
    }
    let own = ifaddrs::own_addresses(&own);
    let dns = Dns::new(&settings.dns_servers, settings.limits.dns_timeout)?;
    let core = Arc::new(Core::new(loaded.policy, settings.limits.clone(), dns, own));
    let audit = Audit::open(
        settings.audit_log.as_ref(),
        core.metrics.audit_dropped.clone(),
    )
    .await?;
    let state = Arc::new(State::new(core.clone(), audit.clone()));
    let shutdown = CancellationToken::new();

    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let watch_interval = settings.watch_interval;
    // Made before the listening line below: the watcher's baseline is the content as loaded.
    let reloader = Arc::new(Reloader::new(cli, core.clone(), settings));
    tokio::spawn(reloader.clone().watch(watch_interval, shutdown.clone()));
    {
        let shutdown = shutdown.clone();
        let reloader = reloader.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => {
                        let r = reloader.clone();
                        let _ = tokio::task::spawn_blocking(move || r.reload("SIGHUP")).await;
                    }
                }
            }
            shutdown.cancel();
        });
    }

    eprintln!("paude-proxy listening on {local}");
    if let Some(admin) = admin {
        eprintln!("paude-proxy admin listening on {}", admin.local_addr()?);
        tokio::spawn(admin::serve(admin, core.clone(), shutdown.clone()));
    }
    let drained = CancellationToken::new();
    let mut serving = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        let started = ServingThread::spawn(
            index,
            listener,
            state.clone(),
            shutdown.clone(),
            drained.clone(),
        );
        match started {
            Ok(thread) => serving.push(thread),
            Err(e) => {
                shutdown.cancel();
                drained.cancel();
                return Err(e);
            }
        }
    }
    shutdown.cancelled().await;
    let stop_by = tokio::time::Instant::now() + core.limits.drain_timeout;
    server::drain(&state).await;
    drained.cancel();
    let mut served = Ok(());
    for thread in serving {
        if let Err(e) = thread.join() {
            served = Err(e);
        }
    }
    // Lines of the last requests are still buffered: write them before exiting, within what is
    // left of the drain period (at least a moment), so a stalled audit reader cannot hold the
    // exit.
    let left = stop_by.saturating_duration_since(tokio::time::Instant::now());
    audit.close(left.max(AUDIT_CLOSE_AT_LEAST)).await;
    served
}
