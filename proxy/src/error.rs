//! The proxy's refusals and failures. [`Reason`] is the stable snake_case code that appears in
//! the `X-Paude-Deny` header, the audit log and the metrics; [`ProxyError`] carries a reason
//! with the detail a person needs. [`ProxyError::response`] is the one place that turns a
//! refusal into an HTTP answer (status, header and a plain paragraph naming the fix).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};

/// Who is at fault for a refusal; decides the status code family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something the proxy cannot serve (400, 431).
    Client,
    /// The policy refuses the destination (403).
    Policy,
    /// The destination could not be reached (502, 504).
    Upstream,
}

/// Every decision outcome, as a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Allowed,
    DeniedByRule,
    NotAllowed,
    PortNotAllowed,
    IpLiteral,
    LoopbackAddress,
    PrivateAddress,
    SharedAddress,
    LinkLocalAddress,
    MulticastAddress,
    UnspecifiedAddress,
    EmbeddedIpv4Address,
    ReservedAddress,
    ProxyAddress,
    SniMismatch,
    SniMissing,
    EncryptedClientHello,
    OpaqueTunnel,
    ClientNotAllowed,
    Unresolvable,
    DnsTimeout,
    ConnectTimeout,
    ConnectFailed,
    UpstreamError,
    ResponseTimeout,
    BadRequest,
    UnsupportedScheme,
    HeaderTooLarge,
    BodyTimeout,
}

impl Reason {
    /// Every reason, for metrics that list them all from the start.
    pub const ALL: [Reason; 29] = [
        Reason::Allowed,
        Reason::DeniedByRule,
        Reason::NotAllowed,
        Reason::PortNotAllowed,
        Reason::IpLiteral,
        Reason::LoopbackAddress,
        Reason::PrivateAddress,
        Reason::SharedAddress,
        Reason::LinkLocalAddress,
        Reason::MulticastAddress,
        Reason::UnspecifiedAddress,
        Reason::EmbeddedIpv4Address,
        Reason::ReservedAddress,
        Reason::ProxyAddress,
        Reason::SniMismatch,
        Reason::SniMissing,
        Reason::EncryptedClientHello,
        Reason::OpaqueTunnel,
        Reason::ClientNotAllowed,
        Reason::Unresolvable,
        Reason::DnsTimeout,
        Reason::ConnectTimeout,
        Reason::ConnectFailed,
        Reason::UpstreamError,
        Reason::ResponseTimeout,
        Reason::BadRequest,
        Reason::UnsupportedScheme,
        Reason::HeaderTooLarge,
        Reason::BodyTimeout,
    ];

    /// The stable code used in headers, logs and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::DeniedByRule => "denied_by_rule",
            Reason::NotAllowed => "not_allowed",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::IpLiteral => "ip_literal",
            Reason::LoopbackAddress => "loopback_address",
            Reason::PrivateAddress => "private_address",
            Reason::SharedAddress => "shared_address",
            Reason::LinkLocalAddress => "link_local_address",
            Reason::MulticastAddress => "multicast_address",
            Reason::UnspecifiedAddress => "unspecified_address",
            Reason::EmbeddedIpv4Address => "embedded_ipv4_address",
            Reason::ReservedAddress => "reserved_address",
            Reason::ProxyAddress => "proxy_address",
            Reason::SniMismatch => "sni_mismatch",
            Reason::SniMissing => "sni_missing",
            Reason::EncryptedClientHello => "encrypted_client_hello",
            Reason::OpaqueTunnel => "opaque_tunnel",
            Reason::ClientNotAllowed => "client_not_allowed",
            Reason::Unresolvable => "unresolvable",
            Reason::DnsTimeout => "dns_timeout",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::ConnectFailed => "connect_failed",
            Reason::UpstreamError => "upstream_error",
            Reason::ResponseTimeout => "response_timeout",
            Reason::BadRequest => "bad_request",
            Reason::UnsupportedScheme => "unsupported_scheme",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::BodyTimeout => "body_timeout",
        }
    }

    /// Who is at fault.
    pub fn fault(self) -> Fault {
        match self {
            Reason::BadRequest
            | Reason::UnsupportedScheme
            | Reason::HeaderTooLarge
            | Reason::BodyTimeout => Fault::Client,
            Reason::Unresolvable
            | Reason::DnsTimeout
            | Reason::ConnectTimeout
            | Reason::ConnectFailed
            | Reason::UpstreamError
            | Reason::ResponseTimeout => Fault::Upstream,
            _ => Fault::Policy,
        }
    }

    /// The HTTP status a refusal with this reason is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::Allowed => StatusCode::OK,
            Reason::DnsTimeout | Reason::ConnectTimeout | Reason::ResponseTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Reason::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            _ => match self.fault() {
                Fault::Client => StatusCode::BAD_REQUEST,
                Fault::Policy => StatusCode::FORBIDDEN,
                Fault::Upstream => StatusCode::BAD_GATEWAY,
            },
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refusal or failure with what a person needs to act on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {why}")]
pub struct ProxyError {
    pub reason: Reason,
    /// One sentence saying why, without the fix.
    pub why: String,
    /// The exact flag that would allow the request, if any.
    pub fix: Option<String>,
    /// The checked address the refusal is about, when there is one.
    pub resolved: Option<SocketAddr>,
}

impl ProxyError {
    pub fn new(reason: Reason, why: impl Into<String>) -> Self {
        ProxyError {
            reason,
            why: why.into(),
            fix: None,
            resolved: None,
        }
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    pub fn at(mut self, addr: SocketAddr) -> Self {
        self.resolved = Some(addr);
        self
    }

    /// The refusal of an address the guard blocks, naming its class and the flag.
    pub fn blocked_address(reason: Reason, host: &str, addr: SocketAddr) -> Self {
        let ip = addr.ip();
        let class = match reason {
            Reason::LoopbackAddress => "a loopback address",
            Reason::PrivateAddress => "a private network address",
            Reason::SharedAddress => "a carrier-grade NAT (shared) address",
            Reason::LinkLocalAddress if is_metadata(ip) => "the link-local cloud metadata address",
            Reason::LinkLocalAddress => "a link-local address",
            Reason::MulticastAddress => "a multicast or broadcast address",
            Reason::UnspecifiedAddress => "the unspecified address",
            Reason::EmbeddedIpv4Address => {
                "an IPv6 address that embeds an IPv4 address (mapped, NAT64, 6to4 or Teredo)"
            }
            Reason::ProxyAddress => "the proxy's own address",
            _ => "a reserved address",
        };
        let err = ProxyError::new(reason, format!("{host} resolves to {ip}, {class}")).at(addr);
        if reason == Reason::ProxyAddress {
            err
        } else {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            err.fix(format!("--allow-cidr {ip}/{prefix}"))
        }
    }

    /// The paragraph a refusal is answered with: what, why, and the flag that allows it.
    fn body(&self, method: &str, target: &str) -> String {
        let verb = match self.reason.fault() {
            Fault::Upstream => "could not reach",
            _ => "refused",
        };
        let mut body = format!("paude-proxy {verb} {method} {target}: {}.", self.why);
        match &self.fix {
            Some(fix) => body.push_str(&format!(" To allow it, run paude-proxy with {fix}.")),
            None if self.reason == Reason::ProxyAddress => body.push_str(" No flag allows this."),
            None => {}
        }
        body.push('\n');
        body
    }

    /// The same answer as [`ProxyError::response`] as raw HTTP/1.1 bytes, for the CONNECT
    /// path that runs on the bare socket; it always closes the connection.
    pub fn raw_response(&self, method: &str, target: &str) -> Vec<u8> {
        let status = self.reason.status();
        let body = self.body(method, target);
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-paude-deny: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.reason.code(),
            body.len(),
        )
        .into_bytes()
    }

    /// The one mapping from a refusal to the answer the client gets.
    pub fn response(&self, method: &str, target: &str) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body(method, target))));
        *resp.status_mut() = self.reason.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            "x-paude-deny",
            header::HeaderValue::from_static(self.reason.code()),
        );
        resp
    }
}

/// Whether an address is the well-known cloud metadata endpoint.
fn is_metadata(ip: IpAddr) -> bool {
    ip == IpAddr::from([169, 254, 169, 254])
        || ip == IpAddr::from([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_in_declaration_order() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason}");
        }
        let codes: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len(), "codes are unique");
    }
}
