//! A CONNECT tunnel after the policy said yes and the upstream is connected: take the raw
//! client socket back from hyper (with any bytes it already read), run the SNI guard on the
//! first bytes, forward them, then copy both ways until either side closes, the tunnel is
//! idle too long, or shutdown ends the drain period.

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
#[cfg(not(target_os = "linux"))]
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::audit::Record;
use crate::error::Reason;
use crate::head::Rewind;
use crate::host::{Host, Target};
use crate::policy::{Decision, FirstBytesRules};
use crate::server::State;
use crate::tls::{read_client_hello, FirstBytes, HelloNames};

/// Copy buffer per direction of the portable relay (Linux uses `relay::relay`).
#[cfg(not(target_os = "linux"))]
const BUF_SIZE: usize = 32 * 1024;

/// Runs a tunnel that hyper upgraded (a CONNECT that was not the first request of its
/// connection) to completion. `_permit` holds the connection slot.
pub async fn run(
    state: Arc<State>,
    on_upgrade: OnUpgrade,
    upstream: TcpStream,
    target: Target,
    record: Record,
    rules: FirstBytesRules,
    _permit: Arc<OwnedSemaphorePermit>,
) {
    let upgraded = match tokio::time::timeout(state.core.limits.header_timeout, on_upgrade).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            tracing::debug!("upgrade failed: {e}");
            return state.finish(&record);
        }
        Err(_) => return state.finish(&record),
    };
    let (client, pipelined) = match upgraded.downcast::<TokioIo<Rewind>>() {
        Ok(parts) => {
            let (stream, mut unread) = parts.io.into_inner().into_inner();
            unread.extend_from_slice(&parts.read_buf);
            (stream, unread)
        }
        Err(_) => {
            tracing::error!("an upgraded connection was not a replayed TCP stream");
            return state.finish(&record);
        }
    };
    serve(&state, client, pipelined, upstream, target, record, rules).await;
}

/// The SNI guard: whether a tunnel to `target` may carry a ClientHello with these names.
///
/// The hello must name the CONNECT host: a different name, an IP literal or an invalid one is
/// `sni_mismatch`. A hello without SNI names no destination, so a tunnel to a named host is
/// refused (`sni_missing`) unless `--allow-no-sni`; an IP destination is named by the CONNECT
/// itself, and clients send no SNI for it. Encrypted Client Hello hides the real server name
/// behind a public one, so it is refused (`encrypted_client_hello`) unless `--allow-ech`.
pub fn sni_verdict(
    target: &Host,
    hello: &HelloNames,
    rules: FirstBytesRules,
) -> Result<(), Reason> {
    if hello.ech && !rules.allow_ech {
        return Err(Reason::EncryptedClientHello);
    }
    match &hello.sni {
        Some(name) if Host::parse(name).is_ok_and(|h| h == *target) => Ok(()),
        Some(_) => Err(Reason::SniMismatch),
        None if target.ip().is_some() || rules.allow_no_sni => Ok(()),
        None => Err(Reason::SniMissing),
    }
}

/// Runs one tunnel to completion and records it: the SNI guard on the first bytes (`first`
/// holds those already read), then the relay.
pub async fn serve(
    state: &State,
    mut client: TcpStream,
    mut first: Vec<u8>,
    mut upstream: TcpStream,
    target: Target,
    mut record: Record,
    rules: FirstBytesRules,
) {
    let metrics = &state.core.metrics;
    metrics.active_tunnels.inc();
    let limits = &state.core.limits;
    let allow_opaque = rules.allow_opaque;
    let peek = read_client_hello(
        &mut client,
        &mut first,
        allow_opaque.then_some(&upstream),
        limits.header_timeout,
    )
    .await;
    match peek {
        Ok(FirstBytes::Tls(hello)) => {
            let verdict = sni_verdict(&target.host, &hello, rules);
            record.sni = hello.sni;
            if let Err(reason) = verdict {
                let sni = record.sni.as_deref().unwrap_or("");
                tracing::info!(sni, connect = %target, "{}", refusal_hint(reason));
                record.decision = Decision {
                    allowed: false,
                    reason,
                    ..record.decision
                };
                return finish(state, &record);
            }
        }
        Ok(FirstBytes::Closed) => return finish(state, &record),
        Ok(FirstBytes::Opaque | FirstBytes::TimedOut | FirstBytes::UpstreamFirst)
            if !allow_opaque =>
        {
            record.decision = Decision {
                allowed: false,
                reason: Reason::OpaqueTunnel,
                ..record.decision
            };
            return finish(state, &record);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!("reading the first tunnel bytes failed: {e}");
            return finish(state, &record);
        }
    }
    if !first.is_empty() {
        if let Err(e) = upstream.write_all(&first).await {
            tracing::debug!("writing the first tunnel bytes upstream failed: {e}");
            return finish(state, &record);
        }
        record.bytes_up += first.len() as u64;
    }
    drop(first);
    let (up, down) = pump(
        &mut client,
        &mut upstream,
        limits.idle_timeout,
        &state.tunnel_stop,
    )
    .await;
    record.bytes_up += up;
    record.bytes_down += down;
    finish(state, &record);
}

/// What the log says about a tunnel the SNI guard closed (it gets no answer of its own).
fn refusal_hint(reason: Reason) -> &'static str {
    match reason {
        Reason::EncryptedClientHello => {
            "tunnel closed: the ClientHello carries Encrypted Client Hello, which hides the \
             server it really goes to; Chromium sends it unless started with \
             --disable-features=EncryptedClientHello, or run paude-proxy with --allow-ech"
        }
        Reason::SniMissing => {
            "tunnel closed: the ClientHello names no server (SNI) for a named host; run \
             paude-proxy with --allow-no-sni for clients that send none"
        }
        _ => "tunnel closed: the ClientHello's server name (SNI) differs from the CONNECT host",
    }
}

fn finish(state: &State, record: &Record) {
    state.core.metrics.active_tunnels.dec();
    state.finish(record);
}

/// Relays both ways (`relay::relay`, one pooled buffer per flowing direction) until both sides have closed, either side fails, nothing
/// moved for `idle`, or `stop` fires. Returns the bytes sent up (client to upstream) and down.
#[cfg(target_os = "linux")]
async fn pump(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    stop: &CancellationToken,
) -> (u64, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};

    use crate::relay::relay;

    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let to_upstream = relay(client, upstream, &up);
    let to_client = relay(upstream, client, &down);
    tokio::pin!(to_upstream, to_client);
    let (mut up_done, mut down_done) = (false, false);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
    let mut seen = 0u64;
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut to_upstream, if !up_done => {
                up_done = true;
                if let Err(e) = r {
                    tracing::debug!("relaying to the upstream failed: {e}");
                    break;
                }
            }
            r = &mut to_client, if !down_done => {
                down_done = true;
                if let Err(e) = r {
                    tracing::debug!("relaying to the client failed: {e}");
                    break;
                }
            }
            _ = ticks.tick() => {
                let total = up.load(Ordering::Relaxed) + down.load(Ordering::Relaxed);
                if total == seen {
                    tracing::debug!("tunnel idle for {idle:?}: closing");
                    break;
                }
                seen = total;
            }
            _ = stop.cancelled() => break,
        }
    }
    (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed))
}

#[cfg(not(target_os = "linux"))]
async fn pump(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    stop: &CancellationToken,
) -> (u64, u64) {
    pump_copy(client, upstream, idle, stop).await
}

#[cfg(not(target_os = "linux"))]
/// Copies both ways through user-space buffers until both sides have closed, nothing moved
/// for `idle`, or `stop` fires. Returns the bytes sent up (client to upstream) and down.
async fn pump_copy(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    stop: &CancellationToken,
) -> (u64, u64) {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let mut up_buf = vec![0u8; BUF_SIZE];
    let mut down_buf = vec![0u8; BUF_SIZE];
    let (mut up, mut down) = (0u64, 0u64);
    let (mut client_open, mut upstream_open) = (true, true);
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    while client_open || upstream_open {
        tokio::select! {
            r = cr.read(&mut up_buf), if client_open => match r {
                Ok(0) | Err(_) => {
                    client_open = false;
                    let _ = uw.shutdown().await;
                }
                Ok(n) => {
                    if uw.write_all(&up_buf[..n]).await.is_err() {
                        break;
                    }
                    up += n as u64;
                }
            },
            r = ur.read(&mut down_buf), if upstream_open => match r {
                Ok(0) | Err(_) => {
                    upstream_open = false;
                    let _ = cw.shutdown().await;
                }
                Ok(n) => {
                    if cw.write_all(&down_buf[..n]).await.is_err() {
                        break;
                    }
                    down += n as u64;
                }
            },
            _ = &mut sleep => {
                tracing::debug!("tunnel idle for {idle:?}: closing");
                break;
            }
            _ = stop.cancelled() => break,
        }
        sleep.as_mut().reset(tokio::time::Instant::now() + idle);
    }
    (up, down)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the guard for a tunnel to `target` whose hello names `sni` (with ECH if `ech`).
    fn check(target: &str, sni: Option<&str>, ech: bool, rules: FirstBytesRules, expected: &str) {
        let hello = HelloNames {
            sni: sni.map(str::to_owned),
            ech,
        };
        let got = sni_verdict(&Host::parse(target).unwrap(), &hello, rules);
        let got = got.err().map_or("allowed", Reason::code);
        assert_eq!(got, expected, "{target} sni={sni:?} ech={ech} {rules:?}");
    }

    #[test]
    fn the_hello_must_name_the_connect_host() {
        let strict = FirstBytesRules::default();
        check("example.com", Some("example.com"), false, strict, "allowed");
        check(
            "example.com",
            Some("EXAMPLE.com."),
            false,
            strict,
            "allowed",
        );
        check(
            "example.com",
            Some("other.com"),
            false,
            strict,
            "sni_mismatch",
        );
        check(
            "example.com",
            Some("127.0.0.1"),
            false,
            strict,
            "sni_mismatch",
        );
        check("example.com", Some("a..b"), false, strict, "sni_mismatch");
        check("example.com", Some(""), false, strict, "sni_mismatch");
        check("example.com", None, false, strict, "sni_missing");
        check(
            "example.com",
            Some("example.com"),
            true,
            strict,
            "encrypted_client_hello",
        );
        check("203.0.113.7", None, false, strict, "allowed");
        check("203.0.113.7", Some("203.0.113.7"), false, strict, "allowed");
        check(
            "203.0.113.7",
            Some("example.com"),
            false,
            strict,
            "sni_mismatch",
        );
        check(
            "[2001:db8::1]",
            Some("2001:db8::1"),
            false,
            strict,
            "allowed",
        );
        let open = FirstBytesRules {
            allow_no_sni: true,
            allow_ech: true,
            ..strict
        };
        check("example.com", None, false, open, "allowed");
        check("example.com", Some("example.com"), true, open, "allowed");
        check("example.com", Some("other.com"), true, open, "sni_mismatch");
        check(
            "example.com",
            Some("127.0.0.1"),
            false,
            open,
            "sni_mismatch",
        );
    }
}
