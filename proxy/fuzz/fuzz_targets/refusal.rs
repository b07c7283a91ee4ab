//! Refusals as the client gets them. For any reason, target text (a bad CONNECT target is
//! echoed as the client sent it), explanation and fix, the bare-socket answer is one
//! well-formed HTTP/1.1 response whose status, `x-paude-deny` code and content length agree
//! with the refusal, and hyper's answer carries the same status and code. Explanations built
//! from a decision and refusals of blocked addresses name a fix that is a real flag value.

#![no_main]

use std::future::Future;
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use paude_proxy::error::{ProxyError, Reason};
use paude_proxy::handler::explain;
use paude_proxy::host::Target;
use paude_proxy::policy::{Decision, Via};

#[derive(Debug, Arbitrary)]
struct Input {
    reason: u8,
    why: String,
    fix: Option<String>,
    resolved: Option<SocketAddr>,
    method: String,
    target: String,
    addr: SocketAddr,
    connect: bool,
}

/// Parses a raw answer and checks it against the refusal it renders.
fn check_raw(err: &ProxyError, bytes: &[u8], method: &str, target: &str) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("not a complete response head: {other:?}"),
    };
    assert_eq!(resp.version, Some(1));
    assert_eq!(resp.code, Some(err.reason.status().as_u16()));
    let header = |name: &str| {
        let found: Vec<&[u8]> = resp
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect();
        assert_eq!(found.len(), 1, "one {name} header");
        std::str::from_utf8(found[0]).expect("header values are text")
    };
    assert_eq!(header("x-paude-deny"), err.reason.code());
    assert_eq!(header("connection"), "close");
    let body = &bytes[len..];
    let length: usize = header("content-length").parse().expect("a number");
    assert_eq!(length, body.len(), "content-length counts the body");
    let body = std::str::from_utf8(body).expect("the body is text");
    assert!(body.ends_with('\n'));
    assert!(body.contains(method) && body.contains(target), "{body:?}");
    assert!(body.contains(&err.why), "{body:?}");
    if let Some(fix) = &err.fix {
        assert!(body.contains(fix.as_str()), "{body:?}");
    }
}

fn check(err: &ProxyError, method: &str, target: &str) {
    check_raw(err, &err.raw_response(method, target), method, target);
    let resp = err.response(method, target);
    assert_eq!(resp.status(), err.reason.status());
    assert_eq!(
        resp.headers().get("x-paude-deny").map(|v| v.as_bytes()),
        Some(err.reason.code().as_bytes())
    );
    let raw = err.raw_response(method, target);
    let raw_body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| &raw[at + 4..])
        .expect("a head ends with a blank line");
    assert_eq!(
        full_body(resp.into_body()),
        raw_body,
        "both answers say the same"
    );
}

/// The bytes of a full body, which is ready at once.
fn full_body(body: Full<Bytes>) -> Vec<u8> {
    let mut collect = std::pin::pin!(body.collect());
    let mut cx = Context::from_waker(Waker::noop());
    match collect.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(c)) => c.to_bytes().to_vec(),
        _ => panic!("a full body is ready at once"),
    }
}

fuzz_target!(|input: Input| {
    let reason = Reason::ALL[input.reason as usize % Reason::ALL.len()];
    if reason == Reason::Allowed {
        return;
    }
    let mut err = ProxyError::new(reason, input.why.clone());
    if let Some(fix) = &input.fix {
        err = err.fix(fix.clone());
    }
    if let Some(at) = input.resolved {
        err = err.at(at);
    }
    check(&err, &input.method, &input.target);

    // A refused address names its class and the exact CIDR that would allow it.
    let blocked = ProxyError::blocked_address(reason, &input.target, input.addr);
    check(&blocked, "CONNECT", &input.target);
    assert_eq!(blocked.resolved, Some(input.addr));
    match (&blocked.fix, reason) {
        (None, Reason::ProxyAddress) => {}
        (Some(fix), _) if reason != Reason::ProxyAddress => {
            let cidr = fix
                .strip_prefix("--allow-cidr ")
                .expect("the fix is --allow-cidr");
            let net: ipnet::IpNet = cidr.parse().expect("the fix names a CIDR");
            assert!(
                net.contains(&input.addr.ip()),
                "{cidr} does not cover {}",
                input.addr
            );
        }
        (fix, _) => panic!("{reason}: unexpected fix {fix:?}"),
    }

    // A denying decision explained for a target a client named.
    let via = if input.connect {
        Via::Connect
    } else {
        Via::Http
    };
    if let Ok(target) = Target::parse(&input.target, Some(via.default_port())) {
        let explained = explain(&Decision::deny(reason), &target, via);
        assert_eq!(explained.reason, reason);
        let shown = target.to_string();
        check(&explained, "CONNECT", &shown);
        if let Some(fix) = &explained.fix {
            let item = fix.strip_prefix("--allow ").expect("the fix is --allow");
            let again =
                Target::parse(item, Some(via.default_port())).expect("the fix names the target");
            assert_eq!(again, target, "the fix {fix:?} names another target");
        }
    }
});
