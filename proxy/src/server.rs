//! The accept loop and the state every connection shares. The proxy serves from several
//! threads, each with its own current-thread runtime and its own listener socket on the same
//! address (`SO_REUSEPORT`), so a connection is accepted, decided and relayed on one thread
//! without cross-thread wake-ups. [`accept`] runs one such listener until shutdown, serving a
//! connection that opens with a CONNECT on the bare socket and any other with hyper's HTTP/1
//! server; the connection limit and the connection trackers are shared by all threads, so
//! [`drain`], called once, waits for every thread's connections and tunnels for a bounded time,
//! then closes what is left.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Metrics;
use crate::audit::{Audit, Record};
use crate::config::Limits;
use crate::dns::Dns;
use crate::error::Reason;
use crate::handler;
use crate::head::{self, First, Rewind};
use crate::policy::{Decision, Policy};

/// What the outbound side needs: the swappable policy, limits, resolver and metrics.
pub struct Core {
    /// The compiled policy; a reload swaps it whole, requests load it without a lock.
    pub policy: ArcSwap<Policy>,
    pub limits: Limits,
    pub dns: Dns,
    pub metrics: Metrics,
    /// The proxy's own listening addresses, refused as destinations so it cannot loop.
    own: Vec<SocketAddr>,
}

impl Core {
    pub fn new(policy: Policy, limits: Limits, dns: Dns, own: Vec<SocketAddr>) -> Core {
        Core {
            policy: ArcSwap::from_pointee(policy),
            limits,
            dns,
            metrics: Metrics::default(),
            own,
        }
    }

    /// Whether dialling `addr` would reach one of the proxy's own listeners. Addresses are
    /// compared as the kernel dials them: an IPv4-mapped or -compatible IPv6 address is its
    /// IPv4 address, and the unspecified address (`0.0.0.0`, `::`) is this host, like loopback.
    /// So "this host" on the port of a listener bound to loopback or the unspecified address is
    /// that listener, in either family; a listener on the unspecified address has its interface
    /// addresses listed in `own` already.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        reaches_own(&self.own, addr)
    }

    /// Whether a connection just made to `addr` ended at the proxy itself: the peer is one of its
    /// listeners, or an address of this machine (source and destination agree) on one of its
    /// ports. This catches what [`Core::is_own`] cannot know, such as an interface address added
    /// after the start. It costs two system calls, only when the port is one of the proxy's.
    pub fn reached_itself(&self, addr: SocketAddr, stream: &tokio::net::TcpStream) -> bool {
        reached_own(&self.own, addr, stream)
    }
}

/// [`Core::reached_itself`] over a list of own addresses.
fn reached_own(own: &[SocketAddr], addr: SocketAddr, stream: &tokio::net::TcpStream) -> bool {
    if !own.iter().any(|own| own.port() == addr.port()) {
        return false;
    }
    match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => {
            reaches_own(own, peer) || as_dialled(peer.ip()) == as_dialled(local.ip())
        }
        // A connection that cannot say where it ended is not used.
        _ => true,
    }
}

/// [`Core::is_own`] over a list of own addresses.
fn reaches_own(own: &[SocketAddr], addr: SocketAddr) -> bool {
    let ip = as_dialled(addr.ip());
    let this_host = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified();
    own.iter().any(|own| {
        let own_ip = as_dialled(own.ip());
        own.port() == addr.port() && (own_ip == ip || (this_host(ip) && this_host(own_ip)))
    })
}

/// An address as a connect(2) to it is routed: IPv4-mapped (`::ffff:a.b.c.d`) and
/// IPv4-compatible (`::a.b.c.d`, `::` included) IPv6 addresses become their IPv4 address;
/// IPv6 loopback stays what it is.
fn as_dialled(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if !v6.is_loopback() => v6.to_ipv4().map_or(ip, IpAddr::V4),
        _ => ip,
    }
}

/// Everything a connection handler shares.
pub struct State {
    pub core: Arc<Core>,
    pub audit: Audit,
    /// The connection limit, shared by every serving thread.
    connections: Arc<Semaphore>,
    /// Connection tasks of every serving thread (a first CONNECT's tunnel runs in one).
    conns: TaskTracker,
    /// CONNECT tunnels outlive hyper's connection futures, so they are tracked here.
    pub tunnels: TaskTracker,
    /// Fires when the drain period is over and remaining tunnels must close.
    pub tunnel_stop: CancellationToken,
}

impl State {
    pub fn new(core: Arc<Core>, audit: Audit) -> State {
        State {
            connections: Arc::new(Semaphore::new(core.limits.max_connections)),
            conns: TaskTracker::new(),
            core,
            audit,
            tunnels: TaskTracker::new(),
            tunnel_stop: CancellationToken::new(),
        }
    }

    /// Finishes a record: counts it and writes its audit line. Called once per record.
    pub fn finish(&self, record: &Record) {
        self.core
            .metrics
            .decision(record.decision.reason, record.bytes_up, record.bytes_down);
        // A denial is logged once: in the audit log when there is one, else on stderr, so a
        // flood of refusals does not also flood the log.
        if !record.decision.allowed && !self.audit.is_on() {
            tracing::info!(
                client = %record.client,
                host = %record.host,
                port = record.port,
                reason = record.decision.reason.code(),
                "denied"
            );
        }
        self.audit.write(record);
    }
}

/// Serves `listener` on the caller's runtime until `shutdown` fires, then drains: the whole
/// proxy in one call, for programs that embed it with a listener of their own (the binary uses
/// [`accept`] on several threads and [`drain`] once instead).
pub async fn run(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let accepted = accept(listener, state.clone(), shutdown).await;
    drain(&state).await;
    accepted
}

/// Accepts on `listener` until `shutdown` fires, spawning each connection on the calling
/// thread's runtime; the caller keeps that runtime running until [`drain`] has returned.
pub async fn accept(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limits = &state.core.limits;
    let mut builder = http1::Builder::new();
    // A client may shut down its sending side once its request is complete (`nc -q`,
    // `printf ... | nc`); HTTP/1.1 lets it, so the answer still goes out (half_close).
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .half_close(true)
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        state.core.metrics.connection();
        if !state.core.policy.load().client_allowed(peer.ip()) {
            state.finish(&Record {
                started: Instant::now(),
                client: peer,
                method: None,
                host: String::new(),
                port: 0,
                resolved: None,
                decision: Decision::deny(Reason::ClientNotAllowed),
                sni: None,
                bytes_up: 0,
                bytes_down: 0,
            });
            continue;
        }
        // Wait for a slot after accepting: every thread's listener has its own queue, so a
        // thread waiting for a slot before accepting could leave a connection queued on its
        // listener while the freed slot goes to another thread. This way a thread holds at
        // most one accepted connection beyond the limit.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = state.connections.clone().acquire_owned() => permit?,
        };
        let _ = stream.set_nodelay(true);
        let conn_state = state.clone();
        let builder = builder.clone();
        let stop = shutdown.clone();
        state.conns.spawn(async move {
            let accepted = Instant::now();
            let mut stream = stream;
            let first = tokio::select! {
                first = head::read_first(&mut stream, &conn_state.core.limits) => first,
                _ = stop.cancelled() => return,
            };
            match first {
                // The common case runs here, in this task, on the bare socket.
                First::Connect { authority, rest } => {
                    handler::connect_raw(conn_state, peer, stream, authority, rest, accepted).await
                }
                First::Malformed(reason) => {
                    handler::malformed_connect(&conn_state, peer, stream, reason, accepted).await
                }
                First::Gone => {}
                First::Http { read } => {
                    let io = Rewind::new(read, stream);
                    serve_http(
                        conn_state,
                        &builder,
                        peer,
                        Arc::new(permit),
                        io,
                        stop,
                        accepted,
                    )
                    .await;
                    return;
                }
            }
            drop(permit);
        });
    }
    Ok(())
}

/// After every accept loop has stopped: lets open connections and tunnels finish for up to the
/// drain timeout, then tells the rest to close and waits briefly for them.
pub async fn drain(state: &State) {
    let limits = &state.core.limits;
    tracing::info!(
        "shutting down: draining connections for up to {:?}",
        limits.drain_timeout
    );
    state.conns.close();
    state.tunnels.close();
    let drained = async {
        tokio::join!(state.conns.wait(), state.tunnels.wait());
    };
    if tokio::time::timeout(limits.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!("drain period over: closing the remaining connections and tunnels");
    }
    state.tunnel_stop.cancel();
    // Tunnels run in connection tasks (a first CONNECT) or in tracked tasks (a later one).
    let closed = async {
        tokio::join!(state.conns.wait(), state.tunnels.wait());
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), closed).await;
}

/// Serves a connection that did not start with a CONNECT with hyper: plain HTTP requests, and
/// later CONNECTs on the same keep-alive connection through hyper's upgrade.
async fn serve_http(
    state: Arc<State>,
    builder: &http1::Builder,
    peer: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
    io: Rewind,
    stop: CancellationToken,
    accepted: Instant,
) {
    let service_state = state.clone();
    let service =
        service_fn(move |req| handler::handle(service_state.clone(), peer, permit.clone(), req));
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            // Finish the request in flight, then close instead of keeping alive.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, "connection ended: {e}");
        // hyper answered a malformed or oversized head itself (400/431); the audit log still
        // gets its line.
        let reason = if e.is_parse_too_large() {
            Some(Reason::HeaderTooLarge)
        } else if e.is_parse() {
            Some(Reason::BadRequest)
        } else {
            None
        };
        if let Some(reason) = reason {
            state.finish(&Record {
                started: accepted,
                client: peer,
                method: None,
                host: String::new(),
                port: 0,
                resolved: None,
                decision: Decision::deny(reason),
                sni: None,
                bytes_up: 0,
                bytes_down: 0,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks whether dialling `addr` reaches a proxy listening on `own`.
    fn check(own: &[&str], addr: &str, expected: bool) {
        let own: Vec<SocketAddr> = own.iter().map(|a| a.parse().unwrap()).collect();
        let got = reaches_own(&own, addr.parse().unwrap());
        assert_eq!(got, expected, "{addr} with listeners {own:?}");
    }

    #[test]
    fn every_form_of_this_host_on_a_listener_port_is_the_proxy() {
        for own in [
            ["127.0.0.1:3128"],
            ["0.0.0.0:3128"],
            ["[::]:3128"],
            ["[::1]:3128"],
        ] {
            for addr in [
                "127.0.0.1:3128",
                "127.0.0.2:3128",
                "0.0.0.0:3128",
                "[::]:3128",
                "[::1]:3128",
                "[::ffff:127.0.0.1]:3128",
                "[::ffff:0.0.0.0]:3128",
                "[::127.0.0.1]:3128",
            ] {
                check(&own, addr, true);
            }
            check(&own, "127.0.0.1:3129", false);
            check(&own, "[::ffff:127.0.0.1]:80", false);
            check(&own, "203.0.113.7:3128", false);
        }
        // A listener on one interface address is that address, in any spelling.
        let own = ["192.0.2.2:3128"];
        check(&own, "192.0.2.2:3128", true);
        check(&own, "[::ffff:192.0.2.2]:3128", true);
        check(&own, "127.0.0.1:3128", false);
        check(&own, "192.0.2.3:3128", false);
    }

    #[tokio::test]
    async fn a_connection_that_ended_on_this_machine_at_a_proxy_port_is_the_proxy() {
        // The proxy believes it listens on 192.0.2.77 only (as if 127.0.0.1 had been added
        // after the start): only the connection itself can tell.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let own = [SocketAddr::new([192, 0, 2, 77].into(), addr.port())];
        assert!(!reaches_own(&own, addr));
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(reached_own(&own, addr, &stream));
        let elsewhere = [SocketAddr::new([192, 0, 2, 77].into(), addr.port() ^ 1)];
        assert!(!reached_own(&elsewhere, addr, &stream));
    }
}
