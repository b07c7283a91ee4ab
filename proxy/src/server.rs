//! The accept loop and the state every connection shares. The proxy serves from several
//! threads, each with its own current-thread runtime and its own listener socket on the same
//! address (`SO_REUSEPORT`), so a connection is accepted, decided and relayed on one thread
//! without cross-thread wake-ups. [`accept`] runs one such listener until shutdown, serving a
//! connection that opens with a CONNECT on the bare socket and any other with hyper's HTTP/1
//! server; the connection limit and the connection trackers are shared by all threads, so
//! [`drain`], called once, waits for every thread's connections and tunnels for a bounded time,
//! then closes what is left.
use std::net::SocketAddr;
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

    /// Whether `addr` is one of the proxy's own listening addresses. A listener on the
    /// unspecified address also matches its port on loopback and on the unspecified address
    /// (its interface addresses are listed in `own` already).
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified()
                        && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        })
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
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
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
