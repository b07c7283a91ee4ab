//! One request: parse the target, ask the policy, then hand over to the tunnel (CONNECT) or
//! to the forwarder (absolute-form HTTP). A CONNECT that opens a connection is served on the
//! bare socket ([`connect_raw`]); one later on a keep-alive connection goes through hyper.
//! Both take the same decision path ([`open_tunnel`]). Refusals become responses through
//! [`ProxyError::response`] and are recorded once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::audit::Record;
use crate::connect::connect;
use crate::error::{ProxyError, Reason};
use crate::forward::{self, AuditedBody};
use crate::head;
use crate::host::{Host, Target};
use crate::policy::{Decision, FirstBytesRules, Via};
use crate::server::State;
use crate::tunnel;

/// The body of every response the proxy sends.
pub type Body = Either<Full<Bytes>, AuditedBody>;

/// Handles one request from `peer`.
pub async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    if req.method() == Method::CONNECT {
        Ok(connect_tunnel(state, peer, permit, req, started).await)
    } else {
        Ok(forward::forward(state, peer, req, started).await)
    }
}

/// A record for `target` before anything is known beyond the decision.
pub fn record(
    started: Instant,
    client: SocketAddr,
    method: &Method,
    host: String,
    port: u16,
    decision: Decision,
) -> Record {
    Record {
        started,
        client,
        method: Some(method_name(method)),
        host,
        port,
        resolved: None,
        decision,
        sni: None,
        bytes_up: 0,
        bytes_down: 0,
    }
}

/// The host as the audit log shows it: IPv6 literals without brackets.
pub fn host_text(host: &Host) -> String {
    match host {
        Host::Name(n) => n.to_string(),
        Host::Ip(ip) => ip.to_string(),
    }
}

/// Answers a refusal: records it and builds the response.
pub fn refuse(
    state: &State,
    mut record: Record,
    err: &ProxyError,
    method: &str,
    shown: &str,
) -> Response<Body> {
    record.decision.allowed = false;
    record.decision.reason = err.reason;
    record.resolved = record.resolved.or(err.resolved);
    state.finish(&record);
    let mut response = err.response(method, shown);
    if method == "CONNECT" {
        // Bytes pipelined behind a refused CONNECT (a ClientHello) must not be read as the
        // next request, so the connection ends with the refusal.
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    response.map(Either::Left)
}

/// The refusal a denying decision stands for, with the flag that would allow it.
pub fn explain(decision: &Decision, target: &Target, via: Via) -> ProxyError {
    let host = &target.host;
    let port = target.port;
    let default = via.default_port();
    let suggested = if port == default {
        host.to_string()
    } else {
        target.to_string()
    };
    let method = match via {
        Via::Connect => "CONNECT",
        Via::Http => "plain HTTP",
    };
    let rule = decision.rule.as_deref().unwrap_or("");
    let origin = match decision.group.as_deref() {
        Some(g) => format!("group '{g}'"),
        None => "a --deny flag".to_owned(),
    };
    match decision.reason {
        Reason::DeniedByRule => ProxyError::new(
            decision.reason,
            format!("{host} matches the deny rule '{rule}' from {origin}; deny rules win over every allow, so remove that rule to allow it"),
        ),
        Reason::PortNotAllowed => ProxyError::new(
            decision.reason,
            format!("port {port} is not allowed for {host}: {method} goes to port {default} unless a pattern names the port"),
        )
        .fix(format!("--allow {target}")),
        Reason::IpLiteral => ProxyError::new(
            decision.reason,
            format!("{host} is an IP literal, and IP destinations are refused unless listed explicitly"),
        )
        .fix(format!("--allow {suggested}")),
        _ => ProxyError::new(decision.reason, format!("{host} is not on the allowlist"))
            .fix(format!("--allow {suggested}")),
    }
}

/// A CONNECT that passed the policy and reached its upstream: what either CONNECT path needs to
/// answer `200` and run the tunnel.
struct Opened {
    target: Target,
    upstream: TcpStream,
    record: Record,
    rules: FirstBytesRules,
}

/// A CONNECT that was refused: the record to finish, the error to answer with, and the target as
/// the response names it.
struct Refused {
    record: Record,
    error: ProxyError,
    shown: String,
}

/// The one decision path of every CONNECT, whichever way it arrived: parse the target, ask the
/// policy, then resolve, check and dial the checked address.
async fn open_tunnel(
    state: &State,
    peer: SocketAddr,
    authority: &str,
    started: Instant,
) -> Result<Opened, Box<Refused>> {
    let target = match Target::parse(authority, None) {
        Ok(t) => t,
        Err(e) => {
            return Err(Box::new(Refused {
                record: record(
                    started,
                    peer,
                    &Method::CONNECT,
                    authority.to_owned(),
                    0,
                    Decision::deny(Reason::BadRequest),
                ),
                error: ProxyError::new(
                    Reason::BadRequest,
                    format!("the CONNECT target is not host:port ({e})"),
                ),
                shown: authority.to_owned(),
            }))
        }
    };
    let policy = state.core.policy.load_full();
    let decision = policy.decide(&target, Via::Connect);
    let mut rec = record(
        started,
        peer,
        &Method::CONNECT,
        host_text(&target.host),
        target.port,
        decision,
    );
    if !rec.decision.allowed {
        let error = explain(&rec.decision, &target, Via::Connect);
        let shown = target.to_string();
        return Err(Box::new(Refused {
            record: rec,
            error,
            shown,
        }));
    }
    match connect(&state.core, &policy, &target).await {
        Ok((upstream, addr)) => {
            rec.resolved = Some(addr);
            Ok(Opened {
                target,
                upstream,
                record: rec,
                rules: policy.first_bytes(),
            })
        }
        Err(error) => Err(Box::new(Refused {
            record: rec,
            error,
            shown: target.to_string(),
        })),
    }
}

/// A CONNECT later on a keep-alive connection: hyper answers `200` and hands the upgraded
/// connection to a tunnel task.
async fn connect_tunnel(
    state: Arc<State>,
    peer: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
    mut req: Request<Incoming>,
    started: Instant,
) -> Response<Body> {
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let opened = match open_tunnel(&state, peer, authority, started).await {
        Ok(o) => o,
        Err(r) => return refuse(&state, r.record, &r.error, "CONNECT", &r.shown),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnel_state = state.clone();
    state.tunnels.spawn(async move {
        tunnel::run(
            tunnel_state,
            on_upgrade,
            opened.upstream,
            opened.target,
            opened.record,
            opened.rules,
            permit,
        )
        .await;
    });
    Response::new(Either::Left(Full::new(Bytes::new())))
}

/// A static name for the audit log; uncommon methods are logged as `OTHER`.
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// The answer to a request refused on the bare socket: recorded, written, then the connection
/// closes with a lingering close (`expect_more`: the client is likely still sending). The write
/// is bounded so a client that does not read cannot hold the task.
async fn refuse_raw(
    state: &State,
    client: &mut TcpStream,
    mut record: Record,
    err: &ProxyError,
    shown: &str,
    expect_more: bool,
) {
    record.decision.allowed = false;
    record.decision.reason = err.reason;
    record.resolved = record.resolved.or(err.resolved);
    state.finish(&record);
    let bytes = err.raw_response("CONNECT", shown);
    let written =
        tokio::time::timeout(state.core.limits.header_timeout, client.write_all(&bytes)).await;
    if matches!(written, Ok(Ok(()))) {
        head::linger_close(client, expect_more).await;
    }
}

/// A CONNECT that opened the connection, served without hyper: decide, connect, answer
/// `200`, then run the tunnel in this same task. `rest` holds the bytes the client sent
/// behind the CONNECT head (a pipelined ClientHello).
pub async fn connect_raw(
    state: Arc<State>,
    peer: SocketAddr,
    mut client: TcpStream,
    authority: String,
    rest: Vec<u8>,
    started: Instant,
) {
    let opened = match open_tunnel(&state, peer, &authority, started).await {
        Ok(o) => o,
        Err(r) => {
            let pipelined = !rest.is_empty();
            return refuse_raw(&state, &mut client, r.record, &r.error, &r.shown, pipelined).await;
        }
    };
    let established = tokio::time::timeout(
        state.core.limits.header_timeout,
        client.write_all(b"HTTP/1.1 200 OK\r\n\r\n"),
    )
    .await;
    if !matches!(established, Ok(Ok(()))) {
        return state.finish(&opened.record);
    }
    tunnel::serve(
        &state,
        client,
        rest,
        opened.upstream,
        opened.target,
        opened.record,
        opened.rules,
    )
    .await;
}

/// A CONNECT head that could not be parsed or was too large, answered on the bare socket.
pub async fn malformed_connect(
    state: &State,
    peer: SocketAddr,
    mut client: TcpStream,
    reason: Reason,
    started: Instant,
) {
    let rec = record(
        started,
        peer,
        &Method::CONNECT,
        String::new(),
        0,
        Decision::deny(reason),
    );
    let err = match reason {
        Reason::HeaderTooLarge => {
            ProxyError::new(reason, "the request head is larger than the limit")
                .fix("a larger --max-header-bytes")
        }
        _ => ProxyError::new(reason, "the request head is not valid HTTP/1.1"),
    };
    // The head was cut off where it stopped being valid or fitting: the rest is still coming.
    refuse_raw(state, &mut client, rec, &err, "-", true).await;
}
