//! The checks that a running session's agent has no way out but its proxy, shared by the CNI
//! and the netavark tests: no IPv6, an `/etc/hosts` of its own, no DNS answer from any address
//! where an engine would put a DNS server, and no TCP connection to the host on IPv4 or IPv6
//! link-local (host listeners the test opens on all addresses and on the bridge's link-local
//! address count every connection they accept). A leaking session fails these checks even if
//! the launcher's own start-up check were wrong.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use super::netavark::FakeResolver;
use super::{inspect, run, Checks, Output};

/// One probe run inside the agent container.
const PROBE_LIMIT: Duration = Duration::from_secs(90);

/// The agent under test.
pub struct Agent<'a> {
    /// The agent container's name.
    pub container: &'a str,
    /// The session's internal network.
    pub internal: &'a str,
    /// The proxy's address on it.
    pub proxy_ip: &'a str,
    /// The agent's host name (the session's name).
    pub hostname: &'a str,
}

impl Agent<'_> {
    /// Runs a bash script in the agent container as its own user.
    pub async fn sh(&self, script: &str) -> Result<Output> {
        run(
            super::podman(["exec", self.container, "bash", "-c", script]),
            PROBE_LIMIT,
            None,
        )
        .await
    }

    /// The agent's address on its internal network.
    async fn address(&self) -> Result<String> {
        let info = inspect("container", self.container).await?;
        info["NetworkSettings"]["Networks"][self.internal]["IPAddress"]
            .as_str()
            .filter(|ip| !ip.is_empty())
            .map(str::to_owned)
            .with_context(|| format!("{} has no address on {}", self.container, self.internal))
    }
}

/// Every check that the agent's only way out is its proxy; `canary` is a name of this run that
/// nobody may ever be asked for, and `resolver` the fake resolver that would see it.
pub async fn no_way_out(
    checks: &mut Checks,
    agent: &Agent<'_>,
    canary: &str,
    resolver: Option<&FakeResolver>,
) {
    checks.record(
        "the agent has no IPv6 address, so IPv6 link-local cannot reach the host",
        async {
            let out = agent
                .sh("cat /proc/net/if_inet6 2>/dev/null; echo end")
                .await?;
            ensure!(
                out.success() && out.stdout.trim() == "end",
                "the agent has IPv6 addresses:\n{}",
                out.stdout
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "the agent's /etc/hosts holds loopback and the agent only, nothing of the host",
        async {
            let hosts = agent
                .sh("cat /etc/hosts")
                .await?
                .ok("cat /etc/hosts")?
                .stdout;
            let lines: Vec<Vec<&str>> = hosts
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .filter(|w| !w.is_empty() && !w[0].starts_with('#'))
                .collect();
            let ip = agent.address().await?;
            let expected = vec![
                vec!["127.0.0.1", "localhost"],
                vec![ip.as_str(), agent.hostname],
            ];
            ensure!(lines == expected, "/etc/hosts of the agent:\n{hosts}");
            Ok(())
        }
        .await,
    );
    checks.record(
        "no address answers the agent's DNS queries and no query reaches a resolver",
        dns_has_no_answer(agent, canary, resolver).await,
    );
    checks.record(
        "no TCP connection from the agent reaches the host, on IPv4 or on IPv6 link-local",
        host_is_unreachable(agent).await,
    );
}

/// A DNS query for `canary` (type A) with bash's /dev/udp to every resolver of resolv.conf,
/// the first address of the subnet (where engines put gateways and their DNS servers) and the
/// proxy; prints `answered A` for a reply and `tcp-open A` for an open TCP port 53.
const DNS_PROBE: &str = r#"
canary=$1; shift
q='\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00'
IFS=. read -ra labels <<< "$canary"
for l in "${labels[@]}"; do q+=$(printf '\\x%02x' "${#l}")$l; done
q+='\x00\x00\x01\x00\x01'
for ns in $(awk '/^nameserver/ {print $2}' /etc/resolv.conf) "$@"; do
  reply=$(timeout 3 bash -c "exec 3<>/dev/udp/$ns/53 && printf '$q' >&3 && head -c 2 <&3 | od -An -tx1" 2>/dev/null)
  [ -n "$reply" ] && echo "answered $ns"
  timeout 3 bash -c "exec 3<>/dev/tcp/$ns/53" 2>/dev/null && echo "tcp-open $ns"
done
echo probe-done
"#;

async fn dns_has_no_answer(
    agent: &Agent<'_>,
    canary: &str,
    resolver: Option<&FakeResolver>,
) -> Result<()> {
    let out = agent.sh(&format!("getent hosts {canary}")).await?;
    // Status 2: the name was not found (not a missing tool or a crash).
    ensure!(
        out.code == Some(2),
        "the agent resolved {canary} (status {:?}): {}",
        out.code,
        out.stdout.trim()
    );
    let net = inspect("network", agent.internal).await?;
    let subnet: ipnet::Ipv4Net = net["subnets"][0]["subnet"]
        .as_str()
        .context("the internal network shows no subnet")?
        .parse()?;
    let first = subnet
        .hosts()
        .next()
        .context("the subnet has no host")?
        .to_string();
    let script = format!("{DNS_PROBE}\n");
    let out = run(
        super::podman([
            "exec",
            agent.container,
            "bash",
            "-c",
            &script,
            "probe",
            canary,
            &first,
            agent.proxy_ip,
        ]),
        PROBE_LIMIT,
        None,
    )
    .await?
    .ok("the DNS probe")?;
    ensure!(
        out.stdout.contains("probe-done"),
        "the probe did not run: {}",
        out.stdout
    );
    ensure!(
        !out.stdout.contains("answered") && !out.stdout.contains("tcp-open"),
        "a DNS server is reachable from the agent:\n{}",
        out.stdout
    );
    if let Some(resolver) = resolver {
        let asked = super::netavark::settled_queries(resolver).await;
        ensure!(
            !asked.iter().any(|q| q.contains(canary)),
            "the agent's query for {canary} reached the host's resolver (a DNS path out): \
             it saw {asked:?}"
        );
    }
    Ok(())
}

/// A listener on the host that counts the connections it accepts.
struct Listener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    fn start(std: std::net::TcpListener) -> Result<Listener> {
        std.set_nonblocking(true)?;
        let port = std.local_addr()?.port();
        let listener = tokio::net::TcpListener::from_std(std)?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Ok(Listener {
            port,
            accepted,
            task,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The link-local address and index of a host interface.
async fn link_local(interface: &str) -> Result<(Ipv6Addr, u32)> {
    let index: u32 = std::fs::read_to_string(format!("/sys/class/net/{interface}/ifindex"))
        .with_context(|| format!("the host has no interface {interface}"))?
        .trim()
        .parse()?;
    // A fresh bridge's address is tentative for a moment (duplicate address detection).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args([
            "-6", "-o", "addr", "show", "dev", interface, "scope", "link",
        ]);
        let out = run(cmd, Duration::from_secs(10), None)
            .await?
            .ok("ip -6 addr")?;
        let addr = out
            .stdout
            .lines()
            .filter(|l| !l.contains("tentative"))
            .find_map(|l| {
                let word = l.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
                word.split('/').next()?.parse::<Ipv6Addr>().ok()
            });
        if let Some(addr) = addr {
            return Ok((addr, index));
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the bridge {interface} has no IPv6 link-local address: {}",
            out.stdout
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn host_is_unreachable(agent: &Agent<'_>) -> Result<()> {
    let net = inspect("network", agent.internal).await?;
    let bridge = net["network_interface"]
        .as_str()
        .context("the internal network names no bridge interface")?
        .to_owned();
    let subnet: ipnet::Ipv4Net = net["subnets"][0]["subnet"]
        .as_str()
        .context("the internal network shows no subnet")?
        .parse()?;
    let v4 = Listener::start(std::net::TcpListener::bind("0.0.0.0:0")?)?;
    let (ll, index) = link_local(&bridge).await?;
    let v6 = Listener::start(std::net::TcpListener::bind(SocketAddrV6::new(
        ll, 0, 0, index,
    ))?)?;
    // Every IPv4 address of the host and the first address of the subnet.
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["-4", "-o", "addr", "show"]);
    let out = run(cmd, Duration::from_secs(10), None)
        .await?
        .ok("ip -4 addr")?;
    let mut targets: Vec<String> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|a| a.split('/').next())
        .filter(|a| !a.starts_with("127."))
        .map(|a| format!("{a}/{}", v4.port))
        .collect();
    if let Some(first) = subnet.hosts().next() {
        targets.push(format!("{first}/{}", v4.port));
    }
    targets.push(format!("{ll}%eth0/{}", v6.port));
    let script = targets
        .iter()
        .map(|t| {
            format!(
                "timeout 5 bash -c 'exec 3<>/dev/tcp/{t}' 2>/dev/null && echo 'connected {t}'; "
            )
        })
        .collect::<String>()
        + "echo probe-done";
    let out = agent.sh(&script).await?.ok("the host probe")?;
    ensure!(
        out.stdout.contains("probe-done"),
        "the probe did not run: {}",
        out.stdout
    );
    let accepted = v4.accepted.load(Ordering::SeqCst) + v6.accepted.load(Ordering::SeqCst);
    ensure!(
        !out.stdout.contains("connected") && accepted == 0,
        "the agent reached a listener on the host ({accepted} accepted; tried {targets:?}):\n{}",
        out.stdout
    );
    Ok(())
}

/// `status` must show the internal network as internal, with DNS off, and its subnet.
pub async fn status_shows_the_network(status: &str, internal: &str) -> Result<()> {
    let net = inspect("network", internal).await?;
    let subnet = net["subnets"][0]["subnet"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let line = status
        .lines()
        .find(|l| l.starts_with("network:"))
        .with_context(|| format!("status shows no network line:\n{status}"))?;
    for fact in [internal, "internal", "DNS off", subnet.as_str()] {
        ensure!(
            line.contains(fact),
            "the network line lacks {fact:?}: {line}"
        );
    }
    let ipv6 = status
        .lines()
        .find(|l| l.starts_with("agent ipv6:"))
        .with_context(|| format!("status shows no agent ipv6 line:\n{status}"))?;
    ensure!(ipv6.trim_end().ends_with("off"), "{ipv6}");
    Ok(())
}
