//! What keeps a Podman (or Docker) session's agent from reaching anything but its proxy, beyond
//! what the Docker-compatible API offers: which engine answers and whether its version can be
//! trusted, the internal network created through Podman's own (libpod) API with DNS off, the
//! agent's `/etc/hosts`, and the start-up check that proves the result from inside the agent.
//!
//! Why the libpod API: Podman's Docker-compatible `POST /networks/create` always turns DNS on
//! for bridge networks. With the netavark backend that puts the gateway address on the host's
//! bridge and starts aardvark-dns there, which forwards every name it does not know to the
//! host's resolvers: a DNS tunnel out of the sandbox. `POST /libpod/networks/create` takes
//! `dns_enabled: false`, and then the bridge gets no address and no DNS server runs. bollard
//! speaks only the compatible API, so the few libpod calls go through hyper on the same socket.
//!
//! Invariant: the pure parts (engine versions, request bodies, the check's arguments and the
//! reading of its output, the hosts file) do no I/O and are unit-tested here; the Podman backend
//! runs them.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use serde_json::{json, Value};

/// The libpod API version paude-launch speaks: served by Podman 4.0 and later, 5.x included.
const LIBPOD_PREFIX: &str = "/v4.0.0/libpod";
/// How long one libpod request may take.
const LIBPOD_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory of the agent's start gate: a tmpfs owned by root, so it is empty at every
/// start and only paude-launch (exec as root) can open the gate.
pub const GATE_DIR: &str = "/run/paude";
/// The file whose existence lets the agent start (see `images/agent/paude-session`).
pub const GATE_FILE: &str = "/run/paude/ready";

/// The sysctls that turn IPv6 off in the agent's network namespace, so it has no link-local
/// address and cannot reach the host's bridge over IPv6.
pub const IPV6_OFF: [&str; 2] = [
    "net.ipv6.conf.all.disable_ipv6",
    "net.ipv6.conf.default.disable_ipv6",
];

/// The check run inside the agent; its output format is described at its top.
pub const NETCHECK_SCRIPT: &str = include_str!("netcheck.sh");
/// The line the check prints last; without it the check did not run to the end.
const NETCHECK_DONE: &str = "paude-netcheck done";
/// How many addresses of the subnet the check sweeps at most (a /24 has 254).
const NETCHECK_MAX_ADDRESSES: usize = 254;

/// Where the engine's API listens, for the requests bollard cannot make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    /// A unix socket.
    Unix(PathBuf),
    /// `host:port` over plain TCP.
    Tcp(String),
}

impl ApiAddr {
    /// The address from a `DOCKER_HOST` value (`unix:///path`, `tcp://host:port`, `http://...`).
    pub fn from_docker_host(host: &str) -> Option<ApiAddr> {
        if let Some(path) = host.strip_prefix("unix://") {
            return Some(ApiAddr::Unix(PathBuf::from(path)));
        }
        let rest = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))?;
        Some(ApiAddr::Tcp(rest.trim_end_matches('/').to_owned()))
    }
}

/// The engine behind the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// Podman: answers the libpod API.
    Podman { version: String },
    /// A Docker engine (or anything else that speaks only the compatible API).
    Docker { version: String },
}

/// Sends one request to the libpod API and returns the status and the JSON body (`null` when
/// empty).
pub async fn libpod(
    addr: &ApiAddr,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let uri = format!("{LIBPOD_PREFIX}{path}");
    tokio::time::timeout(
        LIBPOD_TIMEOUT,
        libpod_inner(addr, method.clone(), &uri, body),
    )
    .await
    .with_context(|| format!("the engine did not answer {method} {uri} within 60 s"))?
    .with_context(|| format!("{method} {uri} failed"))
}

async fn libpod_inner(
    addr: &ApiAddr,
    method: Method,
    uri: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let bytes = match body {
        Some(v) => Bytes::from(serde_json::to_vec(v)?),
        None => Bytes::new(),
    };
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes))?;
    let response = match addr {
        ApiAddr::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| format!("cannot connect to {}", path.display()))?;
            send(stream, request).await?
        }
        ApiAddr::Tcp(host) => {
            let stream = tokio::net::TcpStream::connect(host)
                .await
                .with_context(|| format!("cannot connect to {host}"))?;
            send(stream, request).await?
        }
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    let value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).trim().to_owned()))
    };
    Ok((status, value))
}

impl Engine {
    /// The engine a `Server` response header names (`Libpod/4.3.1 (linux)`,
    /// `Docker/20.10.24 (linux)`), or `None` for any other value.
    pub fn from_server_header(server: &str) -> Option<Engine> {
        let product = server.split_whitespace().next()?;
        let (name, version) = product.split_once('/')?;
        if version.is_empty() {
            return None;
        }
        let version = version.to_owned();
        match name {
            "Libpod" => Some(Engine::Podman { version }),
            "Docker" => Some(Engine::Docker { version }),
            _ => None,
        }
    }
}

/// The `Server` header of the engine's `GET /_ping`: which engine it is, without
/// `GET /version`, which Podman answers only after asking its runtimes (a third of a second).
pub async fn ping_server(addr: &ApiAddr) -> Result<Option<String>> {
    let request = Request::builder()
        .method(Method::GET)
        .uri("/_ping")
        .header(hyper::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))?;
    let exchange = async {
        match addr {
            ApiAddr::Unix(path) => {
                send(tokio::net::UnixStream::connect(path).await?, request).await
            }
            ApiAddr::Tcp(host) => send(tokio::net::TcpStream::connect(host).await?, request).await,
        }
    };
    let response = tokio::time::timeout(LIBPOD_TIMEOUT, exchange)
        .await
        .context("the engine did not answer GET /_ping within 60 s")??;
    Ok(response
        .headers()
        .get(hyper::header::SERVER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned))
}

/// One HTTP/1 exchange on a fresh connection.
async fn send<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(request).await?)
}

/// The message of a libpod error body, or the whole body.
pub fn error_message(body: &Value) -> String {
    body.get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string())
}

/// The body of `POST /libpod/networks/create` for the agent's internal network: a bridge with
/// no route out, no DNS server and no IPv6 (the Podman CLI's `--internal --disable-dns`).
pub fn internal_network_body(
    name: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Value {
    json!({
        "name": name,
        "driver": "bridge",
        "internal": true,
        "dns_enabled": false,
        "ipv6_enabled": false,
        "labels": labels,
    })
}

/// A Docker version as (major, minor, patch), from strings like `26.1.4` or `20.10.24+dfsg1`.
fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.trim().trim_start_matches('v').splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch: String = parts
        .next()
        .unwrap_or("0")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor, patch.parse().unwrap_or(0)))
}

/// Why a Docker engine of this version is refused, or `None` when its internal networks keep
/// DNS inside. Engines before 26.0.0, 25.0.4 and 23.0.11 let the embedded DNS server of an
/// internal network forward queries through the host (CVE-2024-29018).
pub fn docker_refusal(version: &str) -> Option<String> {
    let fixed = match parse_version(version) {
        Some((major, _, _)) if major >= 26 => true,
        Some((25, minor, patch)) => (minor, patch) >= (0, 4),
        Some((23, minor, patch)) => (minor, patch) >= (0, 11),
        _ => false,
    };
    (!fixed).then(|| {
        format!(
            "the Docker engine (version {version}) is too old for a sandbox: Docker before \
             26.0.0 (25.0.4 and 23.0.11 on those branches) forwards DNS queries from internal \
             networks to the host's resolvers (CVE-2024-29018), a way out that no proxy sees; \
             upgrade Docker to 26.0.0 or later, or use Podman"
        )
    })
}

/// The arguments of the start-up check after the script: self, proxy, port, the allowed route,
/// the name to query, and the addresses of the subnet to sweep (at most 254, from the start
/// of the subnet, where engines put gateways and DNS servers).
pub fn netcheck_args(
    subnet: &IpNet,
    agent: Ipv4Addr,
    proxy: IpAddr,
    port: u16,
    name: &str,
) -> Result<Vec<String>> {
    let IpNet::V4(net) = subnet else {
        bail!("the internal network's subnet {subnet} is not IPv4");
    };
    let route = format!(
        "{:08X}/{:08X}",
        u32::from_le_bytes(net.network().octets()),
        u32::from_le_bytes(net.netmask().octets())
    );
    let mut args = vec![
        agent.to_string(),
        proxy.to_string(),
        port.to_string(),
        route,
        name.to_owned(),
    ];
    args.extend(
        net.hosts()
            .filter(|a| *a != agent)
            .take(NETCHECK_MAX_ADDRESSES)
            .map(|a| a.to_string()),
    );
    Ok(args)
}

/// An IPv4 address as /proc/net/route writes it (hex, host byte order), for people.
fn route_hex(hex: &str) -> String {
    u32::from_str_radix(hex, 16)
        .map(|v| Ipv4Addr::from(v.to_le_bytes()).to_string())
        .unwrap_or_else(|_| hex.to_owned())
}

/// An address as /proc/net/if_inet6 writes it (32 hex digits), for people.
fn inet6_hex(hex: &str) -> String {
    u128::from_str_radix(hex, 16)
        .map(|v| std::net::Ipv6Addr::from(v).to_string())
        .unwrap_or_else(|_| hex.to_owned())
}

/// Every way out the check's output reports, as sentences; an error when the output is not
/// that of a check that ran to its end.
pub fn netcheck_findings(output: &str) -> Result<Vec<String>> {
    let mut findings = Vec::new();
    let mut done = false;
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == NETCHECK_DONE {
            done = true;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let finding = match words.as_slice() {
            ["leak", "ipv6", dev, addr] => format!(
                "the agent has the IPv6 address {} on {dev}: over IPv6 link-local it reaches the host",
                inet6_hex(addr)
            ),
            ["leak", "route", dev, dest, gw, mask] => format!(
                "the agent has a route to {}/{} via {} on {dev}",
                route_hex(dest),
                route_hex(mask),
                route_hex(gw)
            ),
            ["leak", "dns-udp", addr] => {
                format!("a DNS server answers the agent at {addr} (UDP port 53)")
            }
            ["leak", "dns-tcp", addr] => {
                format!("a DNS server accepts the agent's connections at {addr} (TCP port 53)")
            }
            ["leak", "host", addr] => format!(
                "{addr} answers on the agent's network: the host (or another machine) holds that \
                 address, so the agent reaches whatever listens there"
            ),
            ["unreachable", "proxy", target] => format!(
                "the agent cannot reach its proxy at {target}, so the check proves nothing"
            ),
            _ => bail!("the start-up network check printed something unexpected: {line}"),
        };
        findings.push(finding);
    }
    if !done {
        bail!(
            "the start-up network check did not finish (its output: {}): the agent image needs bash",
            output.trim()
        );
    }
    Ok(findings)
}

/// The agent's `/etc/hosts`: loopback and its own name, nothing of the host's.
pub fn hosts_file(agent: Ipv4Addr, hostname: &str) -> String {
    format!("127.0.0.1\tlocalhost\n{agent}\t{hostname}\n")
}

/// The `status` line of the internal network from its libpod or compatible inspect output.
pub fn network_facts(name: &str, libpod: Option<&Value>, compat_internal: Option<bool>) -> String {
    let mut facts = Vec::new();
    let internal = libpod
        .and_then(|n| n["internal"].as_bool())
        .or(compat_internal);
    facts.push(match internal {
        Some(true) => "internal".to_owned(),
        Some(false) => "NOT internal".to_owned(),
        None => "internal: unknown".to_owned(),
    });
    match libpod.and_then(|n| n["dns_enabled"].as_bool()) {
        Some(false) => facts.push("DNS off".to_owned()),
        Some(true) => facts.push("DNS ON".to_owned()),
        None => facts.push("DNS: the engine's embedded server".to_owned()),
    }
    if let Some(subnets) = libpod.and_then(|n| n["subnets"].as_array()) {
        for s in subnets {
            let subnet = s["subnet"].as_str().unwrap_or("?");
            match s["gateway"].as_str() {
                Some(gw) if !gw.is_empty() => facts.push(format!("subnet {subnet}, gateway {gw}")),
                _ => facts.push(format!("subnet {subnet}, no gateway")),
            }
        }
    }
    format!("{name} ({})", facts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ping_server_header_names_the_engine_and_its_version() {
        assert_eq!(
            Engine::from_server_header("Libpod/4.3.1 (linux)"),
            Some(Engine::Podman {
                version: "4.3.1".into()
            })
        );
        assert_eq!(
            Engine::from_server_header("Docker/20.10.24+dfsg1 (linux)"),
            Some(Engine::Docker {
                version: "20.10.24+dfsg1".into()
            })
        );
        for other in ["", "nginx/1.22.1", "Docker/", "Libpod", "Docker (linux)"] {
            assert_eq!(Engine::from_server_header(other), None, "{other}");
        }
    }

    #[test]
    fn docker_before_the_dns_fix_is_refused_with_the_minimum_version() {
        for old in ["20.10.24+dfsg1", "23.0.10", "24.0.9", "25.0.3", "garbage"] {
            let why = docker_refusal(old).unwrap_or_else(|| panic!("{old} was accepted"));
            assert!(
                why.contains("26.0.0") && why.contains("CVE-2024-29018"),
                "{why}"
            );
            assert!(why.contains(old), "{why}");
            assert!(!why.ends_with('.'));
        }
        for fixed in [
            "26.0.0", "26.1.4", "27.3.1", "28.2.2", "25.0.4", "25.0.5", "23.0.11",
        ] {
            assert_eq!(docker_refusal(fixed), None, "{fixed} was refused");
        }
    }

    #[test]
    fn docker_host_values_become_api_addresses() {
        assert_eq!(
            ApiAddr::from_docker_host("unix:///run/podman/podman.sock"),
            Some(ApiAddr::Unix("/run/podman/podman.sock".into()))
        );
        assert_eq!(
            ApiAddr::from_docker_host("tcp://127.0.0.1:2375"),
            Some(ApiAddr::Tcp("127.0.0.1:2375".into()))
        );
        assert_eq!(ApiAddr::from_docker_host("ssh://host"), None);
    }

    #[test]
    fn the_internal_network_is_created_without_dns() {
        let labels = std::collections::HashMap::from([("paude.session".into(), "demo".into())]);
        let body = internal_network_body("paude-demo-internal", &labels);
        assert_eq!(body["internal"], true);
        assert_eq!(body["dns_enabled"], false);
        assert_eq!(body["ipv6_enabled"], false);
        assert_eq!(body["labels"]["paude.session"], "demo");
    }

    #[test]
    fn the_check_sweeps_the_subnet_but_the_agent() {
        let net: IpNet = "10.89.3.0/24".parse().unwrap();
        let args = netcheck_args(
            &net,
            "10.89.3.3".parse().unwrap(),
            "10.89.3.2".parse().unwrap(),
            3128,
            "paude-demo-agent",
        )
        .unwrap();
        assert_eq!(
            args[..5],
            [
                "10.89.3.3",
                "10.89.3.2",
                "3128",
                "0003590A/00FFFFFF",
                "paude-demo-agent"
            ]
        );
        let swept = &args[5..];
        assert_eq!(swept.len(), 253);
        assert_eq!(swept[0], "10.89.3.1");
        assert!(!swept.contains(&"10.89.3.3".to_owned()));
        assert_eq!(swept.last().unwrap(), "10.89.3.254");
        let big: IpNet = "10.0.0.0/16".parse().unwrap();
        let args = netcheck_args(
            &big,
            "10.0.0.9".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            3128,
            "x",
        )
        .unwrap();
        assert_eq!(args.len() - 5, 254);
        let v6: IpNet = "fd00::/64".parse().unwrap();
        assert!(netcheck_args(
            &v6,
            "10.0.0.9".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            3128,
            "x"
        )
        .is_err());
    }

    #[test]
    fn the_check_output_becomes_sentences() {
        assert!(netcheck_findings("paude-netcheck done\n")
            .unwrap()
            .is_empty());
        let out = "leak ipv6 eth0 fe8000000000000090e883fffe270516\n\
                   leak route eth0 00000000 0101590A 00000000\n\
                   leak dns-udp 10.89.1.1\n\
                   leak dns-tcp 127.0.0.11\n\
                   leak host 10.89.1.1\n\
                   unreachable proxy 10.89.1.2:3128\n\
                   paude-netcheck done\n";
        let found = netcheck_findings(out).unwrap();
        assert_eq!(found.len(), 6);
        assert!(
            found[0].contains("fe80::90e8:83ff:fe27:516 on eth0"),
            "{}",
            found[0]
        );
        assert!(
            found[1].contains("0.0.0.0/0.0.0.0 via 10.89.1.1"),
            "{}",
            found[1]
        );
        assert!(found[2].contains("10.89.1.1 (UDP port 53)"));
        assert!(found[3].contains("127.0.0.11 (TCP port 53)"));
        assert!(found[4].starts_with("10.89.1.1 answers"));
        assert!(found[5].contains("10.89.1.2:3128"));
    }

    #[test]
    fn a_check_that_did_not_finish_or_printed_nonsense_is_an_error() {
        assert!(netcheck_findings("").is_err());
        assert!(netcheck_findings("leak host 10.0.0.1\n").is_err());
        assert!(netcheck_findings("bash: not found\npaude-netcheck done\n").is_err());
    }

    #[test]
    fn the_hosts_file_holds_loopback_and_the_agent_only() {
        assert_eq!(
            hosts_file("10.89.0.3".parse().unwrap(), "demo"),
            "127.0.0.1\tlocalhost\n10.89.0.3\tdemo\n"
        );
    }

    #[test]
    fn status_names_the_network_facts() {
        let libpod = json!({"internal": true, "dns_enabled": false,
                            "subnets": [{"subnet": "10.89.0.0/24"}]});
        assert_eq!(
            network_facts("paude-demo-internal", Some(&libpod), None),
            "paude-demo-internal (internal, DNS off, subnet 10.89.0.0/24, no gateway)"
        );
        let weak = json!({"internal": true, "dns_enabled": true,
                          "subnets": [{"subnet": "10.89.1.0/24", "gateway": "10.89.1.1"}]});
        assert!(network_facts("n", Some(&weak), None)
            .contains("DNS ON, subnet 10.89.1.0/24, gateway 10.89.1.1"));
        assert_eq!(
            network_facts("n", None, Some(true)),
            "n (internal, DNS: the engine's embedded server)"
        );
    }
}
