//! Host names and targets as the proxy compares them. A [`Host`] is either a normalised DNS
//! name (lower case, IDNA/punycode, no trailing dot, only `a-z 0-9 - _ .`) or an IP literal;
//! a [`Target`] adds the port. Everything after the parser sees only these types, so no rule
//! can be bypassed by case, a trailing dot, Unicode look-alikes or brackets.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use idna::AsciiDenyList;

/// Longest DNS name we accept, in bytes, without the trailing dot.
const MAX_NAME_LEN: usize = 253;

/// Why a host or an authority could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("'{0}' is not a valid host name")]
    Invalid(String),
    #[error("'{0}' has no port")]
    MissingPort(String),
    #[error("'{0}' has an invalid port")]
    InvalidPort(String),
}

/// A normalised destination host: a DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower case ASCII with no trailing dot.
    Name(Box<str>),
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
}

impl Host {
    /// Parses and normalises a host as it appears in a request (IPv6 literals may be
    /// bracketed).
    pub fn parse(raw: &str) -> Result<Host, HostError> {
        if raw.is_empty() {
            return Err(HostError::Empty);
        }
        if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return inner
                .parse::<std::net::Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| HostError::Invalid(raw.to_owned()));
        }
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        let name = normalise_name(raw)?;
        // IDNA maps full-width digits and full stops to ASCII, so a name can come out as an
        // IP literal (`１.２.３.４`): it is one, and is compared and refused as one.
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        Ok(Host::Name(name.into_owned().into_boxed_str()))
    }

    /// The IP address of a literal host.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(_) => None,
        }
    }

    /// The DNS name of a named host.
    pub fn name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// Lower-cases, IDNA-encodes and strips one trailing dot from a DNS name, then checks that
/// only host-name characters remain. Borrows when the name is already normal.
pub fn normalise_name(raw: &str) -> Result<Cow<'_, str>, HostError> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    let ascii = idna::domain_to_ascii_cow(trimmed.as_bytes(), AsciiDenyList::URL)
        .map_err(|_| HostError::Invalid(raw.to_owned()))?;
    let valid = ascii.len() <= MAX_NAME_LEN
        && ascii.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(HostError::Invalid(raw.to_owned()));
    }
    Ok(ascii)
}

/// A destination: a normalised host and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl Target {
    /// Parses `host:port`, `[v6]:port`, or a bare host when `default_port` is given.
    pub fn parse(authority: &str, default_port: Option<u16>) -> Result<Target, HostError> {
        let (host, port) = split_host_port(authority)?;
        let port = match (port, default_port) {
            (Some(p), _) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| HostError::InvalidPort(authority.to_owned()))?,
            (None, Some(d)) => d,
            (None, None) => return Err(HostError::MissingPort(authority.to_owned())),
        };
        Ok(Target {
            host: Host::parse(host)?,
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Splits an authority into its host part (brackets kept) and its optional port text.
pub fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), HostError> {
    if authority.is_empty() {
        return Err(HostError::Empty);
    }
    if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| HostError::Invalid(authority.to_owned()))?;
        let (host, rest) = authority.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or_else(|| HostError::Invalid(authority.to_owned())),
        };
    }
    match authority.rsplit_once(':') {
        // A bare IPv6 address without brackets has several colons and no port.
        Some((host, _)) if host.contains(':') => Ok((authority, None)),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((authority, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, ()>) {
        let got = Host::parse(input).map(|h| h.to_string()).map_err(|_| ());
        assert_eq!(got.as_deref().map_err(|_| ()), expected, "input {input:?}");
    }

    #[test]
    fn names_are_normalised() {
        check("Example.COM", Ok("example.com"));
        check("example.com.", Ok("example.com"));
        check("bücher.example", Ok("xn--bcher-kva.example"));
        check("BÜCHER.example.", Ok("xn--bcher-kva.example"));
        check("[::1]", Ok("[::1]"));
        check("127.0.0.1", Ok("127.0.0.1"));
        check("a..b", Err(()));
        check("a b.com", Err(()));
        check("evil.com/x", Err(()));
        check("", Err(()));
        check(".", Err(()));
    }

    #[test]
    fn ip_literals_spelled_in_full_width_digits_are_ip_literals() {
        // IDNA maps full-width digits and full stops to ASCII, so these come out of name
        // normalisation as IP literals; as names they would slip past the IP-literal rule.
        for (raw, ip) in [
            ("１２７.０.０.１", "127.0.0.1"),
            ("１.２.３.４", "1.2.3.4"),
            ("８．８．８．８", "8.8.8.8"),
            ("１.２.３.４.", "1.2.3.4"),
        ] {
            assert_eq!(Host::parse(raw), Ok(Host::Ip(ip.parse().unwrap())), "{raw}");
        }
        let t = Target::parse("１.２.３.４:443", None).unwrap();
        assert_eq!(t.host.ip(), Some(IpAddr::from([1, 2, 3, 4])));
    }

    #[test]
    fn authorities_split_on_the_last_colon_outside_brackets() {
        let t = Target::parse("[::1]:8443", None).unwrap();
        assert_eq!(t.port, 8443);
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(Target::parse("a.com", Some(80)).unwrap().port, 80);
        assert!(Target::parse("a.com", None).is_err());
        assert!(Target::parse("a.com:0", None).is_err());
        assert!(Target::parse("a.com:99999", None).is_err());
        assert!(Target::parse("[::1]x", None).is_err());
    }
}
