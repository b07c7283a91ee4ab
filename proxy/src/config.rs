//! Configuration in two stages: raw flags ([`Cli`]) and the TOML file ([`FileConfig`]) are
//! merged (flags win) and validated into typed [`Settings`]; the policy files are read and
//! compiled into a [`Policy`]. After [`load`] returns no code sees a raw string. The same
//! [`load`] runs at start, on SIGHUP and when the watched files change.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::{Groups, Policy, PolicySettings};

/// paude-proxy: a filtering HTTP CONNECT and forward proxy with domain allowlists, SSRF,
/// IP-literal and SNI guards, and a JSON audit log.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "paude-proxy", version, long_version = crate::LONG_VERSION, about, long_about = None)]
pub struct Cli {
    /// Address to listen on [default: 127.0.0.1:3128]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Load policy groups from DIR (*.txt) instead of the embedded ones
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// Allow a group, an alias, `default`, `all` or a pattern (repeatable) [default: default]
    #[arg(long, value_name = "ITEM")]
    pub allow: Vec<String>,
    /// Deny a group or a pattern; deny wins over every allow (repeatable)
    #[arg(long, value_name = "ITEM")]
    pub deny: Vec<String>,
    /// Permit destinations in this range despite the address guard (repeatable)
    #[arg(long, value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Only serve clients from this range (repeatable) [default: anyone]
    #[arg(long, value_name = "CIDR")]
    pub allow_client: Vec<String>,
    /// Pin HOST to IP instead of asking DNS, like curl's --resolve (repeatable)
    #[arg(long, value_name = "HOST=IP")]
    pub resolve: Vec<String>,
    /// Allow tunnels whose first bytes are not a TLS ClientHello
    #[arg(long)]
    pub allow_opaque: bool,
    /// Allow TLS tunnels to a named host whose ClientHello carries no server name (SNI)
    #[arg(long)]
    pub allow_no_sni: bool,
    /// Allow TLS tunnels whose ClientHello carries Encrypted Client Hello (ECH), whose real
    /// server name the proxy cannot check
    #[arg(long)]
    pub allow_ech: bool,
    /// Write one JSON line per connection or request to PATH, or to stdout with `-`
    #[arg(long, value_name = "PATH|-")]
    pub audit_log: Option<String>,
    /// Serve /metrics, /healthz and /policy on ADDR [default: off]
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Read settings from a TOML file; flags override it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate everything, print the effective allowlist and exit
    #[arg(long)]
    pub check: bool,
    /// With --check: once the checks pass, rename the --config file to PATH (same directory),
    /// so a proxy watching PATH never reads a half-written file
    #[arg(long, value_name = "PATH", requires_all = ["check", "config"])]
    pub install_as: Option<PathBuf>,
    /// Log format on stderr [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Reload when the config file or policy directory changes; 0 turns it off [default: 2s]
    #[arg(long, value_name = "DURATION")]
    pub watch_interval: Option<String>,
    /// Maximum concurrent client connections, tunnels included [default: 4096]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Time a client has to send a complete request head [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub header_timeout: Option<String>,
    /// Time a DNS lookup may take [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub dns_timeout: Option<String>,
    /// Time an upstream TCP connect may take [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Close a tunnel after this long without traffic either way [default: 5m]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Time a forwarded request body may take, plus a second per KiB received [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub body_timeout: Option<String>,
    /// Largest request head accepted, in bytes, at least 8192 [default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// How long shutdown waits for open connections and tunnels [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Ask this DNS server (IP:PORT) instead of the system's resolvers (repeatable)
    #[arg(long, value_name = "ADDR")]
    pub dns_server: Vec<SocketAddr>,
    /// Serving threads, each accepting on its own socket of the listen port [default: one per CPU]
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
}

/// Log output format on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The TOML config file: the flags' settings in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub policies: Option<PathBuf>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub allow_cidr: Vec<String>,
    #[serde(default)]
    pub allow_client: Vec<String>,
    #[serde(default)]
    pub resolve: Vec<String>,
    pub allow_opaque: Option<bool>,
    pub allow_no_sni: Option<bool>,
    pub allow_ech: Option<bool>,
    pub audit_log: Option<String>,
    pub admin_listen: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub watch_interval: Option<String>,
    pub max_connections: Option<usize>,
    pub header_timeout: Option<String>,
    pub dns_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub drain_timeout: Option<String>,
    #[serde(default)]
    pub dns_server: Vec<SocketAddr>,
    pub worker_threads: Option<usize>,
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

/// Resource limits; all have defaults and all are configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub dns_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Time a forwarded request body may take to arrive, extended as it arrives.
    pub body_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub policies: Option<PathBuf>,
    pub policy: PolicySettings,
    pub audit_log: Option<AuditTarget>,
    pub admin_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub watch_interval: Duration,
    pub limits: Limits,
    pub dns_servers: Vec<SocketAddr>,
    /// Serving threads; `None` means one per CPU.
    pub worker_threads: Option<usize>,
    /// The config file, kept so reloads and the watcher can read it again.
    pub config_file: Option<PathBuf>,
}

/// Everything a start or a reload produces.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub groups: Groups,
    pub policy: Policy,
}

/// Reads the config file and the policy files, merges flags over the file and compiles the
/// policy. Nothing is bound or started.
pub fn load(cli: &Cli) -> anyhow::Result<Loaded> {
    let file = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            parse_config_file(path, &text, cli)?
        }
        None => FileConfig::default(),
    };
    let settings = merge(cli, file)?;
    let groups = read_groups(settings.policies.as_deref())?;
    let policy = Policy::compile(&groups, &settings.policy)?;
    Ok(Loaded {
        settings,
        groups,
        policy,
    })
}

/// Parses the config file. A file that states no allowlist (empty, only comments, no `allow`
/// key or an empty list, and no `--allow` flag) is refused: it is what a non-atomic writer
/// leaves for a moment, and taking it would fall back to the `default` groups, widening a
/// narrower allowlist on a reload.
pub fn parse_config_file(path: &Path, text: &str, cli: &Cli) -> anyhow::Result<FileConfig> {
    let what_to_write = "write the settings, at least the allowlist, e.g. allow = [\"default\"]";
    let has_setting = text.lines().any(|line| {
        let line = line.trim();
        !line.is_empty() && !line.starts_with('#')
    });
    if !has_setting {
        bail!(
            "{} is empty or holds only comments, which is not a configuration; {what_to_write}",
            path.display()
        );
    }
    let file = toml::from_str::<FileConfig>(text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message().trim_end()))?;
    if file.allow.is_empty() && cli.allow.is_empty() {
        bail!(
            "{} names no allow rule (no allow key, or an empty list); {what_to_write}, or \
             pass --allow",
            path.display()
        );
    }
    Ok(file)
}

/// Puts a checked config file in place of `dest` with one rename(2), so a proxy that watches or
/// re-reads `dest` sees the old file or the new one, never a partly written one. Both must be in
/// the same directory: a relative `policies` path keeps its meaning, and the rename cannot cross
/// file systems.
pub fn install(source: &Path, dest: &Path) -> anyhow::Result<()> {
    let dir = |p: &Path| {
        p.parent()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            })
            .and_then(|d| d.canonicalize().ok())
    };
    if dir(source).is_none() || dir(source) != dir(dest) {
        bail!(
            "--install-as {} must name a file in the directory of --config {}",
            dest.display(),
            source.display()
        );
    }
    std::fs::rename(source, dest).with_context(|| {
        format!(
            "cannot install {} as {}; nothing was changed",
            source.display(),
            dest.display()
        )
    })
}

/// Merges the flags over a parsed config file (flags win) and validates the result; the pure
/// step of [`load`] between reading the file and reading the policy files.
pub fn merge(cli: &Cli, file: FileConfig) -> anyhow::Result<Settings> {
    let base = cli
        .config
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let pick =
        |flag: &Vec<String>, file: Vec<String>| if flag.is_empty() { file } else { flag.clone() };
    let duration =
        |name: &str, flag: &Option<String>, file: Option<String>, default: Duration| match flag
            .clone()
            .or(file)
        {
            Some(text) => parse_duration(name, &text),
            None => Ok(default),
        };
    let audit_log = match cli.audit_log.clone().or(file.audit_log) {
        None => None,
        Some(s) if s == "-" => Some(AuditTarget::Stdout),
        Some(s) if s.is_empty() => bail!("--audit-log needs a path or '-' for stdout"),
        Some(s) => Some(AuditTarget::File(PathBuf::from(s))),
    };
    let max_header_bytes = cli
        .max_header_bytes
        .or(file.max_header_bytes)
        .unwrap_or(65536);
    if max_header_bytes < 8192 {
        bail!("--max-header-bytes {max_header_bytes} is too small; use at least 8192");
    }
    let worker_threads = cli.worker_threads.or(file.worker_threads);
    if worker_threads == Some(0) {
        bail!("--worker-threads must be at least 1");
    }
    let max_connections = cli.max_connections.or(file.max_connections).unwrap_or(4096);
    if max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let limits = Limits {
        max_connections,
        header_timeout: duration(
            "header-timeout",
            &cli.header_timeout,
            file.header_timeout,
            Duration::from_secs(10),
        )?,
        dns_timeout: duration(
            "dns-timeout",
            &cli.dns_timeout,
            file.dns_timeout,
            Duration::from_secs(5),
        )?,
        connect_timeout: duration(
            "connect-timeout",
            &cli.connect_timeout,
            file.connect_timeout,
            Duration::from_secs(10),
        )?,
        idle_timeout: duration(
            "idle-timeout",
            &cli.idle_timeout,
            file.idle_timeout,
            Duration::from_secs(300),
        )?,
        body_timeout: duration(
            "body-timeout",
            &cli.body_timeout,
            file.body_timeout,
            Duration::from_secs(60),
        )?,
        max_header_bytes,
        drain_timeout: duration(
            "drain-timeout",
            &cli.drain_timeout,
            file.drain_timeout,
            Duration::from_secs(10),
        )?,
    };
    for (name, d) in [
        ("header-timeout", limits.header_timeout),
        ("dns-timeout", limits.dns_timeout),
        ("connect-timeout", limits.connect_timeout),
        ("idle-timeout", limits.idle_timeout),
        ("body-timeout", limits.body_timeout),
    ] {
        if d.is_zero() {
            bail!("--{name} must be longer than 0");
        }
    }
    let resolve = pick(&cli.resolve, file.resolve)
        .iter()
        .map(|item| parse_pin(item))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let policy = PolicySettings {
        allow: pick(&cli.allow, file.allow),
        deny: pick(&cli.deny, file.deny),
        allow_cidr: parse_cidrs("allow-cidr", &pick(&cli.allow_cidr, file.allow_cidr))?,
        allow_client: parse_cidrs("allow-client", &pick(&cli.allow_client, file.allow_client))?,
        resolve,
        allow_opaque: cli.allow_opaque || file.allow_opaque.unwrap_or(false),
        allow_no_sni: cli.allow_no_sni || file.allow_no_sni.unwrap_or(false),
        allow_ech: cli.allow_ech || file.allow_ech.unwrap_or(false),
    };
    Ok(Settings {
        listen: cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3128))),
        policies: cli
            .policies
            .clone()
            .or_else(|| file.policies.map(|p| base.join(p))),
        policy,
        audit_log,
        admin_listen: cli.admin_listen.or(file.admin_listen),
        log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
        watch_interval: duration(
            "watch-interval",
            &cli.watch_interval,
            file.watch_interval,
            Duration::from_secs(2),
        )?,
        limits,
        dns_servers: if cli.dns_server.is_empty() {
            file.dns_server
        } else {
            cli.dns_server.clone()
        },
        worker_threads,
        config_file: cli.config.clone(),
    })
}

fn parse_duration(name: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        anyhow::anyhow!("--{name} '{text}' is not a duration ({e}); write e.g. 500ms, 10s or 5m")
    })
}

fn parse_pin(item: &str) -> anyhow::Result<(String, IpAddr)> {
    let (host, ip) = item
        .split_once('=')
        .with_context(|| format!("--resolve '{item}' must be HOST=IP"))?;
    let ip = ip.trim().trim_start_matches('[').trim_end_matches(']');
    let ip = ip
        .parse::<IpAddr>()
        .map_err(|_| anyhow::anyhow!("--resolve '{item}': '{ip}' is not an IP address"))?;
    Ok((host.trim().to_owned(), ip))
}

fn parse_cidrs(name: &str, items: &[String]) -> anyhow::Result<Vec<IpNet>> {
    items
        .iter()
        .map(|item| {
            let item = item.trim();
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    anyhow::anyhow!("--{name} '{item}' is not a CIDR range such as 10.0.0.0/8")
                })
        })
        .collect()
}

/// Reads the groups from a directory (every `*.txt` not starting with a dot, symlinks
/// followed) or, without one, the embedded files.
pub fn read_groups(dir: Option<&Path>) -> anyhow::Result<Groups> {
    let Some(dir) = dir else {
        return Ok(Groups::embedded()?);
    };
    let files = policy_files(dir)?;
    let mut texts = Vec::with_capacity(files.len());
    for path in files {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the policy file {}", path.display()))?;
        texts.push((path.display().to_string(), text));
    }
    if texts.is_empty() {
        bail!("{}: no policy files (*.txt) found", dir.display());
    }
    Ok(Groups::parse(
        texts.iter().map(|(p, t)| (p.as_str(), t.as_str())),
    )?)
}

fn policy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the policy directory {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".txt") && !n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A fingerprint of the content of the config file and the policy files, so the watcher
/// notices edits and ConfigMap symlink swaps alike (content, not inodes).
pub fn fingerprint(config: Option<&Path>, policies: Option<&Path>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut add = |path: &Path| {
        path.hash(&mut hasher);
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().to_string().hash(&mut hasher),
        }
    };
    if let Some(c) = config {
        add(c);
    }
    if let Some(dir) = policies {
        match policy_files(dir) {
            Ok(files) => files.iter().for_each(|f| add(f)),
            Err(_) => add(dir),
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let cli = Cli {
            allow: vec!["pypi".into()],
            header_timeout: Some("3s".into()),
            ..Default::default()
        };
        let file: FileConfig = toml::from_str(
            "allow = ['github']\ndeny = ['evil.com']\nheader_timeout = '7s'\nresolve = ['a.test=127.0.0.1']\n",
        )
        .unwrap();
        let s = merge(&cli, file).unwrap();
        assert_eq!(s.policy.allow, vec!["pypi"]);
        assert_eq!(s.policy.deny, vec!["evil.com"]);
        assert_eq!(s.limits.header_timeout, Duration::from_secs(3));
        assert_eq!(
            s.policy.resolve,
            vec![("a.test".to_owned(), IpAddr::from([127, 0, 0, 1]))]
        );
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 3128)));
    }

    #[test]
    fn a_config_file_that_states_no_allowlist_is_refused() {
        let path = Path::new("/etc/p/proxy.toml");
        let none = Cli::default();
        for text in [
            "",
            " \n\n",
            "# allow = ['x']\n",
            "allow = []\n",
            "listen = '127.0.0.1:1'\n",
        ] {
            let err = parse_config_file(path, text, &none)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("/etc/p/proxy.toml ") && err.contains("allow = [\"default\"]"),
                "{text:?}: {err}"
            );
        }
        assert!(parse_config_file(path, "allow = ['github']\n", &none).is_ok());
        // The allowlist may come from the flags instead.
        let flags = Cli {
            allow: vec!["github".into()],
            ..Default::default()
        };
        assert!(parse_config_file(path, "listen = '127.0.0.1:1'\n", &flags).is_ok());
        assert!(parse_config_file(path, "# only comments\n", &flags).is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("alow = ['x']").is_err());
        let bad = Cli {
            allow_cidr: vec!["10.0.0.0/33".into()],
            ..Default::default()
        };
        assert!(merge(&bad, FileConfig::default()).is_err());
        let bad = Cli {
            resolve: vec!["a.test".into()],
            ..Default::default()
        };
        assert!(merge(&bad, FileConfig::default()).is_err());
    }
}
