//! The only place that opens outbound sockets. A target is resolved once (an IP literal as is,
//! a `--resolve` pin, or DNS), every candidate address is checked against the proxy's own
//! addresses (in the form the kernel dials them) and the guard, and only a checked
//! `SocketAddr` is dialled, so no second resolution can slip in a different address (DNS
//! rebinding). A connection that still ended at the proxy itself is dropped.
//!
//! Invariant: nothing here calls `TcpStream::connect` with a host name.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::net::TcpStream;

use crate::error::{ProxyError, Reason};
use crate::host::{Host, Target};
use crate::policy::Policy;
use crate::server::Core;

/// Resolves, checks and dials a target; returns the stream and the address it reached.
pub async fn connect(
    core: &Core,
    policy: &Policy,
    target: &Target,
) -> Result<(TcpStream, SocketAddr), ProxyError> {
    let ips: Vec<IpAddr> = match &target.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => match policy.pin(name) {
            Some(ip) => vec![ip],
            None => {
                let started = Instant::now();
                let result = core.dns.lookup(name).await;
                core.metrics.observe_dns(started.elapsed());
                result?
            }
        },
    };
    for ip in &ips {
        let addr = SocketAddr::new(*ip, target.port);
        if core.is_own(addr) {
            return Err(ProxyError::blocked_address(
                Reason::ProxyAddress,
                &target.host.to_string(),
                addr,
            ));
        }
        if let Err(reason) = policy.check_ip(*ip) {
            return Err(ProxyError::blocked_address(
                reason,
                &target.host.to_string(),
                addr,
            ));
        }
    }
    let timeout = core.limits.connect_timeout;
    let mut last = None;
    for ip in ips {
        let addr = SocketAddr::new(ip, target.port);
        let started = Instant::now();
        let attempt = tokio::time::timeout(timeout, TcpStream::connect(addr)).await;
        core.metrics.observe_connect(started.elapsed());
        match attempt {
            Ok(Ok(stream)) => {
                if core.reached_itself(addr, &stream) {
                    return Err(ProxyError::blocked_address(
                        Reason::ProxyAddress,
                        &target.host.to_string(),
                        addr,
                    ));
                }
                // Small writes (TLS handshakes, request heads) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => {
                last = Some(
                    ProxyError::new(
                        Reason::ConnectFailed,
                        format!("connecting to {addr} failed ({e})"),
                    )
                    .at(addr),
                )
            }
            Err(_) => {
                last = Some(
                    ProxyError::new(
                        Reason::ConnectTimeout,
                        format!("connecting to {addr} took longer than {timeout:?}"),
                    )
                    .fix("a longer --connect-timeout")
                    .at(addr),
                )
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        ProxyError::new(
            Reason::Unresolvable,
            format!("{} has no addresses", target.host),
        )
    }))
}
