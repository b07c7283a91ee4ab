//! The paths under test and the processes behind them.
//!
//! paude-proxy, squid and tinyproxy are each started with a generated configuration in their
//! own temporary directory: listening on 127.0.0.1 only, caching off, logs off or into that
//! directory, and the same policy (allow `bench.test` and its subdomains, CONNECT only to the
//! echo server's port, `bench.test` pinned to 127.0.0.1, everything else refused). The direct
//! path has no process at all. The bare relay (`paude-benches bare-relay`, see
//! [`crate::servers::serve_bare_relay_until_stdin_closes`]) is no product but a floor: a
//! CONNECT relay with nothing but the relay and a bare refusal, measured on the tunnel, refusal
//! and flood scenarios. Processes are
//! killed when their [`Peer`] is dropped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::{Route, HOST};

/// One of the paths the benchmark compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerKind {
    Direct,
    /// The least a CONNECT relay can do: the floor under every proxy on this machine.
    BareRelay,
    Paude,
    Squid,
    Tinyproxy,
}

impl PeerKind {
    pub const ALL: [PeerKind; 5] = [
        PeerKind::Direct,
        PeerKind::BareRelay,
        PeerKind::Paude,
        PeerKind::Squid,
        PeerKind::Tinyproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Direct => "direct",
            PeerKind::BareRelay => "bare-relay",
            PeerKind::Paude => "paude-proxy",
            PeerKind::Squid => "squid",
            PeerKind::Tinyproxy => "tinyproxy",
        }
    }

    /// Whether this path is a filtering proxy, so its idle memory is measured too; the bare
    /// relay carries tunnels and refuses, the direct path carries tunnels and plain HTTP.
    pub fn is_proxy(self) -> bool {
        !matches!(self, PeerKind::Direct | PeerKind::BareRelay)
    }

    /// Whether this path carries plain HTTP requests (the direct path and the proxies).
    pub fn forwards_http(self) -> bool {
        self != PeerKind::BareRelay
    }

    /// Whether this path answers CONNECTs, and so refuses (the refusal and flood scenarios).
    pub fn refuses(self) -> bool {
        self != PeerKind::Direct
    }
}

/// What every peer needs to know to be configured alike.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The paude-proxy binary (built in release for real runs).
    pub paude_bin: PathBuf,
    /// The `paude-benches` binary, which serves the bare relay.
    pub helper_bin: PathBuf,
    pub echo: SocketAddr,
    pub origin: SocketAddr,
    /// The other upstream ports on 127.0.0.1 every proxy must let tunnels and requests reach
    /// (the small-buffer echo server, nginx's two ports, the event-stream server).
    pub extra_ports: Vec<u16>,
    /// How many simultaneous connections each proxy must accept (the idle test's tunnel count
    /// plus headroom).
    pub max_connections: usize,
}

/// A running peer: the route the load generator takes through it and the process behind it.
pub struct Peer {
    pub kind: PeerKind,
    pub route: Route,
    pub version: String,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

impl Peer {
    /// The process to measure the memory of, if this path has one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Fails if the peer's process has exited, with the tail of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited with {status}; its log says:\n{}",
                    self.kind.name(),
                    self.log_tail()
                );
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let mut out = String::new();
        for name in ["stderr.log", "cache.log", "tinyproxy.log"] {
            if let Ok(text) = std::fs::read_to_string(dir.path().join(name)) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(15)..];
                let _ = writeln!(out, "--- {name}\n{}", tail.join("\n"));
            }
        }
        out
    }
}

/// Starts the peer of `kind` and waits until it accepts connections.
pub async fn start(kind: PeerKind, config: &PeerConfig) -> anyhow::Result<Peer> {
    match kind {
        PeerKind::Direct => Ok(Peer {
            kind,
            route: Route::Direct,
            version: "no proxy".into(),
            child: None,
            dir: None,
        }),
        PeerKind::BareRelay => {
            let relay = crate::servers::spawn_helper(
                &config.helper_bin,
                &["bare-relay"],
                crate::servers::RELAY_BANNER,
            )
            .await?;
            Ok(Peer {
                kind,
                route: Route::Proxy(relay.addr),
                version: "CONNECT relay without policy, DNS, checks or logs (a floor)".into(),
                child: Some(relay.child),
                dir: None,
            })
        }
        PeerKind::Paude => start_paude(config).await,
        PeerKind::Squid => start_squid(config).await,
        PeerKind::Tinyproxy => start_tinyproxy(config).await,
    }
}

/// Finds `name` on PATH or in the sbin directories Debian installs daemons to.
pub fn find_program(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not installed; install it with `apt-get install {package}`")
}

fn temp_dir(kind: PeerKind) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("paude-bench-{}-", kind.name()))
        .tempdir()
        .context("cannot create a temporary directory for a peer")?;
    // squid and tinyproxy drop privileges and must still write their logs here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(std::fs::File::create(dir.join(name))?))
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

async fn version_of(program: &Path, flag: &str) -> String {
    match Command::new(program).arg(flag).output().await {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("unknown")
                .trim()
                .to_string()
        }
        _ => "unknown version".into(),
    }
}

async fn start_paude(config: &PeerConfig) -> anyhow::Result<Peer> {
    let bin = &config.paude_bin;
    if !bin.is_file() {
        bail!(
            "paude-proxy binary not found at {}; build it with `cargo build --release -p paude-proxy` \
             (or `cargo build -p paude-proxy` for the smoke test)",
            bin.display()
        );
    }
    let dir = temp_dir(PeerKind::Paude)?;
    let limit = config.max_connections.to_string();
    let mut command = Command::new(bin);
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--allow", HOST, "--allow", &format!(".{HOST}")])
        .args(["--allow", &format!("{HOST}:{}", config.echo.port())])
        .args(["--allow", &format!("{HOST}:{}", config.origin.port())])
        .args(
            config
                .extra_ports
                .iter()
                .flat_map(|port| ["--allow".to_string(), format!("{HOST}:{port}")]),
        )
        .args(["--resolve", &format!("{HOST}=127.0.0.1")])
        .args(["--allow-cidr", "127.0.0.0/8"])
        .arg("--audit-log")
        .arg(dir.path().join("audit.log"))
        .args(["--max-connections", &limit])
        .args(["--idle-timeout", "600s"])
        // Every name the benchmark uses is pinned or denied; a stray lookup must not leave the machine.
        .args(["--dns-server", "127.0.0.1:9"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log_file(dir.path(), "stdout.log")?)
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stderr = child
        .stderr
        .take()
        .context("paude-proxy stderr was not captured")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let addr = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("paude-proxy listening on ").nth(1) {
                let addr: SocketAddr = rest.trim().parse().context("unparsable listen address")?;
                return Ok(addr);
            }
            seen.push(line);
        }
        bail!("paude-proxy exited before it was listening")
    })
    .await
    .context("paude-proxy did not print its listen address within 15 s")?
    .with_context(|| {
        format!(
            "paude-proxy failed to start; it printed:\n{}",
            seen.join("\n")
        )
    })?;
    // Keep draining stderr into the log so a chatty proxy never blocks on a full pipe.
    let mut log = tokio::fs::File::create(dir.path().join("stderr.log")).await?;
    tokio::spawn(async move {
        let mut rest = lines.into_inner();
        let _ = tokio::io::copy(&mut rest, &mut log).await;
    });
    let version = version_of(bin, "--version").await;
    Ok(Peer {
        kind: PeerKind::Paude,
        route: Route::Proxy(addr),
        version,
        child: Some(child),
        dir: Some(dir),
    })
}

async fn start_squid(config: &PeerConfig) -> anyhow::Result<Peer> {
    let squid = find_program("squid", "squid")?;
    let dir = temp_dir(PeerKind::Squid)?;
    let d = dir.path().display();
    let port = free_port()?;
    std::fs::write(dir.path().join("hosts"), format!("127.0.0.1 {HOST}\n"))?;
    let conf = format!(
        "# Generated by paude-benches: the same policy as paude-proxy, no cache, no access log.\n\
         http_port 127.0.0.1:{port}\n\
         acl allowed_domains dstdomain .{HOST}\n\
         acl SSL_ports port 443 {echo} {extra}\n\
         acl CONNECT method CONNECT\n\
         http_access deny CONNECT !SSL_ports\n\
         http_access allow allowed_domains\n\
         http_access deny all\n\
         cache deny all\n\
         cache_mem 0 MB\n\
         access_log none\n\
         cache_store_log none\n\
         cache_log {d}/cache.log\n\
         pid_filename none\n\
         coredump_dir {d}\n\
         hosts_file {d}/hosts\n\
         dns_nameservers 127.0.0.1\n\
         max_filedescriptors {fds}\n\
         shutdown_lifetime 0 seconds\n\
         forwarded_for delete\n\
         via off\n",
        echo = config.echo.port(),
        extra = ports_list(&config.extra_ports, " "),
        fds = config.max_connections * 2 + 1024,
    );
    let conf_path = dir.path().join("squid.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(&squid)
        .arg("-N")
        .arg("-f")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(log_file(dir.path(), "stdout.log")?)
        .stderr(log_file(dir.path(), "stderr.log")?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", squid.display()))?;
    let version = version_of(&squid, "-v").await;
    proxy_peer(PeerKind::Squid, port, version, child, dir).await
}

async fn start_tinyproxy(config: &PeerConfig) -> anyhow::Result<Peer> {
    let tinyproxy = find_program("tinyproxy", "tinyproxy")?;
    let unshare = find_program("unshare", "util-linux")?;
    let dir = temp_dir(PeerKind::Tinyproxy)?;
    let d = dir.path().display();
    let port = free_port()?;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.1 {HOST}\n"))?;
    let host_re = HOST.replace('.', "\\.");
    std::fs::write(dir.path().join("filter"), format!("^(.+\\.)?{host_re}$\n"))?;
    let conf = format!(
        "# Generated by paude-benches: the same policy as paude-proxy, log only critical errors.\n\
         User nobody\n\
         Group nogroup\n\
         Port {port}\n\
         Listen 127.0.0.1\n\
         Timeout 600\n\
         MaxClients {max}\n\
         LogFile \"{d}/tinyproxy.log\"\n\
         LogLevel Critical\n\
         PidFile \"{d}/tinyproxy.pid\"\n\
         Allow 127.0.0.1\n\
         Filter \"{d}/filter\"\n\
         FilterType ere\n\
         FilterURLs Off\n\
         FilterDefaultDeny Yes\n\
         ConnectPort 443\n\
         ConnectPort {echo}\n\
         {extra}\
         DisableViaHeader Yes\n",
        max = config.max_connections,
        echo = config.echo.port(),
        extra = config
            .extra_ports
            .iter()
            .map(|port| format!("ConnectPort {port}\n"))
            .collect::<String>(),
    );
    let conf_path = dir.path().join("tinyproxy.conf");
    std::fs::write(&conf_path, conf)?;
    // tinyproxy resolves through the system resolver only: give it a private /etc/hosts that
    // pins the benchmark host, in a mount namespace of its own so the machine's file is untouched.
    let child = Command::new(&unshare)
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" /etc/hosts && exec \"$2\" -d -c \"$3\"")
        .arg("sh")
        .arg(&hosts)
        .arg(&tinyproxy)
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(log_file(dir.path(), "stdout.log")?)
        .stderr(log_file(dir.path(), "stderr.log")?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start tinyproxy in its own mount namespace")?;
    let version = version_of(&tinyproxy, "-v").await;
    proxy_peer(PeerKind::Tinyproxy, port, version, child, dir).await
}

fn ports_list(ports: &[u16], separator: &str) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(separator)
}

/// A proxy peer started on `127.0.0.1:port`, returned once it accepts connections.
async fn proxy_peer(
    kind: PeerKind,
    port: u16,
    version: String,
    child: Child,
    dir: tempfile::TempDir,
) -> anyhow::Result<Peer> {
    let mut peer = Peer {
        kind,
        route: Route::Proxy(SocketAddr::from(([127, 0, 0, 1], port))),
        version,
        child: Some(child),
        dir: Some(dir),
    };
    wait_listening(&mut peer).await?;
    Ok(peer)
}

async fn wait_listening(peer: &mut Peer) -> anyhow::Result<()> {
    let Route::Proxy(addr) = peer.route else {
        return Ok(());
    };
    let start = Instant::now();
    loop {
        peer.check_alive()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "{} is not listening on {addr} after 20 s; its log says:\n{}",
                peer.kind.name(),
                peer.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
