//! paude-proxy: a filtering egress proxy (HTTP CONNECT tunnels and plain HTTP forwarding)
//! that lets a sandbox reach only allowlisted hosts.
//!
//! A request takes four hops, and the modules follow them:
//!
//! - [`server`]: accept loop, connection limit, graceful shutdown; the shared [`server::Core`].
//! - [`head`]: the first request head on the bare socket; a CONNECT is served right there.
//! - [`handler`]: one request: parse the target ([`host`]), ask the [`policy`], then
//!   [`tunnel`] for CONNECT or [`forward`] for absolute-form HTTP.
//! - [`tunnel`]: the SNI guard ([`tls`]) on the first bytes, then a zero-copy relay both ways
//!   (`splice`, on Linux).
//! - [`forward`]: the pooled HTTP/1 client, hop-by-hop header stripping.
//! - [`connect`]: the only outbound socket: resolve once ([`dns`]), check every address, dial
//!   the checked address.
//!
//! Around them: [`config`] (flags and TOML into typed settings), [`error`] (reason codes and
//! the one refusal-to-response mapping), [`audit`] (JSON lines), [`admin`] (metrics, health,
//! policy), [`reload`] (SIGHUP and the file watcher). [`start`] wires them up for the binary;
//! tests can also call [`server::run`] with a listener bound to port 0.

pub mod admin;
pub mod audit;
pub mod config;
pub mod connect;
pub mod dns;
pub mod error;
pub mod forward;
pub mod handler;
pub mod head;
pub mod host;
pub mod ifaddrs;
pub mod policy;
pub mod reload;
pub mod server;
#[cfg(target_os = "linux")]
pub mod splice;
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

/// How many accepted-but-unserved connections the kernel may queue on the proxy listener (the
/// kernel caps it at `net.core.somaxconn`). The 1,024 of tokio's `TcpListener::bind` overflowed
/// in the benchmark's bursts of 256 simultaneous tunnel setups on two busy cores, turning
/// queued connections into one-second SYN retransmits.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the proxy listener with [`LISTEN_BACKLOG`] and address reuse (a restarted proxy can bind
/// again while old connections linger in TIME_WAIT).
fn bind_proxy_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds the listeners, prints their addresses, serves until SIGTERM or SIGINT, reloads on
/// SIGHUP and when the watched files change, then drains.
pub async fn start(cli: Cli, loaded: Loaded) -> anyhow::Result<()> {
    let settings = loaded.settings;
    let listener = bind_proxy_listener(settings.listen)
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let local = listener.local_addr()?;
    let admin = match settings.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the admin endpoints"))?,
        ),
        None => None,
    };
    let mut listeners = vec![local];
    if let Some(a) = &admin {
        listeners.push(a.local_addr()?);
    }
    let own = ifaddrs::own_addresses(&listeners);
    let dns = Dns::new(&settings.dns_servers, settings.limits.dns_timeout)?;
    let core = Arc::new(Core::new(loaded.policy, settings.limits.clone(), dns, own));
    let audit = Audit::open(settings.audit_log.as_ref()).await?;
    let state = Arc::new(State::new(core.clone(), audit.clone()));
    let shutdown = CancellationToken::new();

    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let watch_interval = settings.watch_interval;
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
    let served = server::run(listener, state, shutdown).await;
    // Lines of the last requests are still buffered: write them before exiting.
    audit.close().await;
    served
}
