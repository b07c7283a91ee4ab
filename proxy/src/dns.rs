//! Name resolution with hickory-resolver: one cached resolver built at start from the system
//! configuration or from `--dns-server`, every lookup bounded by the DNS timeout. hickory's
//! builder API changes between minor releases, so it stays inside this file.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;

use crate::error::{ProxyError, Reason};

/// How many answers the resolver keeps cached.
const CACHE_SIZE: u64 = 4096;

/// The proxy's resolver.
pub struct Dns {
    resolver: TokioResolver,
    timeout: Duration,
}

impl Dns {
    /// Builds a resolver that asks `servers`, or the system's resolvers when empty. A system
    /// without a resolver configuration gets a resolver that answers nothing, so only
    /// `--resolve` pins work (an air-gapped site).
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> anyhow::Result<Dns> {
        let builder = if servers.is_empty() {
            match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                Err(e) => {
                    tracing::warn!(
                        "no system DNS configuration ({e}); only --resolve pins will resolve"
                    );
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        TokioRuntimeProvider::default(),
                    )
                }
            }
        } else {
            let name_servers = servers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(name_servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut builder = builder;
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.cache_size = CACHE_SIZE;
        opts.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns { resolver, timeout })
    }

    /// Resolves a normalised name to its addresses.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, ProxyError> {
        // A trailing dot makes the name absolute, so no search domain is appended.
        let fqdn = format!("{name}.");
        let lookup = tokio::time::timeout(self.timeout, self.resolver.lookup_ip(fqdn)).await;
        let timed_out = || {
            ProxyError::new(
                Reason::DnsTimeout,
                format!("resolving {name} took longer than {:?}", self.timeout),
            )
            .fix(format!("a longer --dns-timeout, or --resolve {name}=IP"))
        };
        match lookup {
            Err(_) | Ok(Err(NetError::Timeout)) => Err(timed_out()),
            Ok(Err(e)) => Err(unresolvable(name, &e.to_string())),
            Ok(Ok(answer)) => {
                let ips: Vec<IpAddr> = answer.iter().collect();
                if ips.is_empty() {
                    Err(unresolvable(name, "no addresses"))
                } else {
                    Ok(ips)
                }
            }
        }
    }
}

fn unresolvable(name: &str, detail: &str) -> ProxyError {
    ProxyError::new(
        Reason::Unresolvable,
        format!("{name} could not be resolved ({detail})"),
    )
    .fix(format!("--resolve {name}=IP if the name has no DNS record"))
}
