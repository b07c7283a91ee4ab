//! What the user asked for, validated: session names, allowlist items, resource limits and
//! image/network options, turned from raw CLI strings into typed values before anything touches
//! an engine. Nothing here does I/O: the host's directory, environment and git identity are
//! handed in by the caller, so every rule is unit-tested.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;

use crate::agents::{self, Agent};
use crate::cli::{BackendKind, CreateArgs};

/// The longest session name: it must fit in `paude-NAME-internal` and in Kubernetes names.
pub const MAX_NAME_LEN: usize = 40;

/// A validated session name: a lowercase letter, then lowercase letters, digits and dashes,
/// not ending with a dash, at most [`MAX_NAME_LEN`] characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionName(String);

impl SessionName {
    /// Checks a name given on the command line.
    pub fn parse(raw: &str) -> Result<Self> {
        let ok_chars = raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        let starts_with_letter = raw.starts_with(|c: char| c.is_ascii_lowercase());
        if raw.is_empty()
            || raw.len() > MAX_NAME_LEN
            || !ok_chars
            || !starts_with_letter
            || raw.ends_with('-')
        {
            bail!(
                "invalid session name '{raw}': use 1 to {MAX_NAME_LEN} lowercase letters, digits \
                 and dashes, starting with a letter and not ending with a dash (e.g. my-project)"
            );
        }
        Ok(SessionName(raw.to_owned()))
    }

    /// Derives a name from a directory's last component (`My_Project` becomes `my-project`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let base = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let mut name = String::new();
        for c in base.chars() {
            let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            };
            if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
                name.push(c);
            }
        }
        name.truncate(MAX_NAME_LEN);
        let name = name.trim_end_matches('-');
        SessionName::parse(name).with_context(|| {
            format!(
                "cannot derive a session name from the directory '{}': pass a NAME",
                dir.display()
            )
        })
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One `--allowed-domains` item: a special name, a group of the proxy's policies, or a pattern.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AllowItem {
    /// `all`: no domain filtering (the proxy's address guards still apply).
    All,
    /// `default`: the proxy's default groups plus the agent's own groups.
    Default,
    /// A group name known to the proxy, such as `github` or `pypi`.
    Group(String),
    /// A domain pattern: `example.com`, `.example.com` or `*.example.com`, optionally `:PORT`.
    Pattern(String),
}

impl AllowItem {
    /// Checks one item with the proxy's own grammar and group names (the proxy built into this
    /// binary reads the session's configuration with the same code), and normalises it to
    /// lowercase.
    pub fn parse(raw: &str) -> Result<Self> {
        let item = raw.trim().to_lowercase();
        match item.as_str() {
            "" => bail!(
                "empty allowed-domains item: give a group name or a domain such as .example.com"
            ),
            "all" => return Ok(AllowItem::All),
            "default" => return Ok(AllowItem::Default),
            _ => {}
        }
        let groups = embedded_groups()?;
        if groups.get(&item).is_some() {
            return Ok(AllowItem::Group(item));
        }
        if let Err(e) = paude_proxy::policy::check_item(groups, &item) {
            bail!(
                "invalid allowed-domains item '{raw}': {}; use a group name (github), a host \
                 (example.com), a domain with its subdomains (.example.com), subdomains only \
                 (*.example.com), an address or a CIDR, optionally with :PORT",
                e.message
            );
        }
        Ok(AllowItem::Pattern(item))
    }

    /// The item as the proxy's `allow` setting spells it.
    pub fn as_proxy_item(&self) -> &str {
        match self {
            AllowItem::All => "all",
            AllowItem::Default => "default",
            AllowItem::Group(g) | AllowItem::Pattern(g) => g,
        }
    }
}

impl fmt::Display for AllowItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_proxy_item())
    }
}

/// The proxy's policy groups, as compiled into the proxy this binary carries.
fn embedded_groups() -> Result<&'static paude_proxy::policy::Groups> {
    static GROUPS: std::sync::OnceLock<
        Result<paude_proxy::policy::Groups, paude_proxy::policy::PolicyError>,
    > = std::sync::OnceLock::new();
    GROUPS
        .get_or_init(paude_proxy::policy::Groups::embedded)
        .as_ref()
        .map_err(|e| {
            anyhow::anyhow!("the built-in policy groups do not parse ({e}): rebuild paude-launch")
        })
}

/// Resource limits of the agent container.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a CPU; `None` leaves CPU unlimited.
    pub cpu_millis: Option<u64>,
    /// Maximum number of processes.
    pub pids_limit: i64,
}

/// Parses a memory size such as `512m`, `8g`, `8Gi` or a plain byte count.
pub fn parse_memory(raw: &str) -> Result<u64> {
    let s = raw.trim().to_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let s = s.strip_suffix('i').unwrap_or(s);
    let (digits, mult) = match s.char_indices().last() {
        Some((i, 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'm')) => (&s[..i], 1 << 20),
        Some((i, 'g')) => (&s[..i], 1 << 30),
        Some((i, 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&b| b >= 6 << 20);
    bytes.with_context(|| {
        format!("invalid --memory '{raw}': give a size of at least 6m, such as 512m or 8g")
    })
}

/// Parses a CPU count such as `2` or `0.5` into thousandths of a CPU.
pub fn parse_cpus(raw: &str) -> Result<u64> {
    let cpus: f64 = raw
        .trim()
        .parse()
        .ok()
        .filter(|c: &f64| c.is_finite() && *c >= 0.01 && *c <= 1024.0)
        .with_context(|| {
            format!("invalid --cpus '{raw}': give a number of CPUs between 0.01 and 1024, such as 2 or 0.5")
        })?;
    Ok((cpus * 1000.0).round() as u64)
}

/// A `--proxy-resolve HOST=IP` pin.
pub fn parse_resolve(raw: &str) -> Result<(String, IpAddr)> {
    let parsed = raw.split_once('=').and_then(|(host, ip)| {
        let host = host.trim().to_lowercase();
        let ip: IpAddr = ip.trim().parse().ok()?;
        (!host.is_empty() && !host.contains(char::is_whitespace)).then_some((host, ip))
    });
    parsed.with_context(|| {
        format!("invalid --proxy-resolve '{raw}': use HOST=IP, such as example.test=10.89.0.5")
    })
}

/// Options that only the image builds use.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOptions {
    /// The agent image's base.
    pub base_image: String,
    /// The proxy image's base; `None` lets the launcher choose from the binary's linkage.
    pub proxy_base_image: Option<String>,
    /// An extra CA bundle trusted during builds and inside the agent.
    pub ca_bundle: Option<PathBuf>,
    /// Rebuild even when the input hash matches an existing image.
    pub rebuild: bool,
}

/// Options of the cluster backend.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterOptions {
    /// Size of the workspace volume claim, in Kubernetes quantity syntax.
    pub pvc_size: String,
    /// Storage class of the claim; `None` uses the cluster's default.
    pub storage_class: Option<String>,
    /// Registry for images on plain Kubernetes.
    pub registry: Option<String>,
}

/// What the host contributes to a session: directory, environment, home and git identity.
#[derive(Debug, Clone, Default)]
pub struct HostContext {
    /// The current directory (default session name, `--mount` source, git repository).
    pub cwd: PathBuf,
    /// The host's environment variables.
    pub env: BTreeMap<String, String>,
    /// The host user's home directory.
    pub home: Option<PathBuf>,
    /// `user.name` and `user.email` from the host's git configuration, if set.
    pub git_identity: Option<(String, String)>,
    /// Home-relative directories that exist on the host (for the agent's read-only mounts).
    pub existing_home_dirs: Vec<String>,
}

/// A validated request for one session, ready to be planned.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// The session's name.
    pub name: SessionName,
    /// Where it runs.
    pub backend: BackendKind,
    /// The agent it runs.
    pub agent: &'static Agent,
    /// Whether the agent runs with its yolo flag.
    pub yolo: bool,
    /// The allowlist items as given (empty means `default`).
    pub allowed: Vec<AllowItem>,
    /// Extra arguments for the agent.
    pub agent_args: Vec<String>,
    /// Whether to set up git sync after creation.
    pub git: bool,
    /// The host directory bind-mounted as the workspace, with `--mount`.
    pub mount: Option<PathBuf>,
    /// Agent limits.
    pub resources: Resources,
    /// Image options.
    pub images: ImageOptions,
    /// Name pins for the session's proxy.
    pub proxy_resolve: Vec<(String, IpAddr)>,
    /// Networks the session's proxy may reach despite the address guard.
    pub proxy_allow_cidr: Vec<IpNet>,
    /// An existing network for the proxy's outbound side (Podman).
    pub egress_network: Option<String>,
    /// Cluster options.
    pub cluster: ClusterOptions,
    /// Host context at the time of the request.
    pub host: HostContext,
}

impl SessionSpec {
    /// Validates `create`/`run` arguments against the host context.
    pub fn from_args(args: &CreateArgs, backend: BackendKind, host: HostContext) -> Result<Self> {
        let name = match &args.name {
            Some(n) => SessionName::parse(n)?,
            None => SessionName::from_dir(&host.cwd)?,
        };
        let agent = agents::find(&args.agent)?;
        let allowed = args
            .allowed_domains
            .iter()
            .map(|i| AllowItem::parse(i))
            .collect::<Result<Vec<_>>>()?;
        let resources = Resources {
            memory_bytes: parse_memory(&args.memory)?,
            cpu_millis: args.cpus.as_deref().map(parse_cpus).transpose()?,
            pids_limit: if args.pids_limit > 0 {
                args.pids_limit
            } else {
                bail!(
                    "invalid --pids-limit {}: give a positive number of processes, such as 2048",
                    args.pids_limit
                )
            },
        };
        let proxy_resolve = args
            .proxy_resolve
            .iter()
            .map(|r| parse_resolve(r))
            .collect::<Result<Vec<_>>>()?;
        let proxy_allow_cidr = args
            .proxy_allow_cidr
            .iter()
            .map(|c| {
                c.parse::<IpNet>().with_context(|| {
                    format!("invalid --proxy-allow-cidr '{c}': use a network such as 10.89.0.0/24")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if args.base_image.trim().is_empty() {
            bail!(
                "empty --base-image: name an image such as docker.io/library/debian:bookworm-slim"
            );
        }
        if let Some(path) = &args.ca_bundle {
            if path.as_os_str().is_empty() {
                bail!("empty --ca-bundle: give the path of a PEM file");
            }
        }
        if let Some(net) = &args.egress_network {
            if backend != BackendKind::Podman {
                bail!("--egress-network only applies to the podman backend");
            }
            if net.trim().is_empty() {
                bail!("empty --egress-network: name an existing network");
            }
        }
        Ok(SessionSpec {
            name,
            backend,
            agent,
            yolo: args.yolo,
            allowed,
            agent_args: args.agent_args.clone(),
            git: args.git,
            mount: args.mount.then(|| host.cwd.clone()),
            resources,
            images: ImageOptions {
                base_image: args.base_image.trim().to_owned(),
                proxy_base_image: args.proxy_base_image.clone(),
                ca_bundle: args.ca_bundle.clone(),
                rebuild: args.rebuild,
            },
            proxy_resolve,
            proxy_allow_cidr,
            egress_network: args.egress_network.clone(),
            cluster: ClusterOptions {
                pvc_size: args.pvc_size.clone(),
                storage_class: args.storage_class.clone(),
                registry: args.registry.clone(),
            },
            host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for n in ["a", "my-project", "p1", &"x".repeat(MAX_NAME_LEN)] {
            assert_eq!(SessionName::parse(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn bad_names_are_refused_with_advice() {
        for n in [
            "",
            "My",
            "1abc",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "a b",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            let err = SessionName::parse(n).unwrap_err().to_string();
            assert!(err.starts_with("invalid session name"), "{n}: {err}");
        }
    }

    #[test]
    fn names_derive_from_directories() {
        let n = SessionName::from_dir(Path::new("/home/u/My_Cool.Project")).unwrap();
        assert_eq!(n.as_str(), "my-cool-project");
        let err = SessionName::from_dir(Path::new("/")).unwrap_err();
        assert!(format!("{err:#}").contains("pass a NAME"));
        let err = SessionName::from_dir(Path::new("/src/42")).unwrap_err();
        assert!(format!("{err:#}").contains("pass a NAME"));
    }

    #[test]
    fn allow_items_are_classified() {
        assert_eq!(AllowItem::parse("ALL").unwrap(), AllowItem::All);
        assert_eq!(AllowItem::parse("default").unwrap(), AllowItem::Default);
        assert_eq!(
            AllowItem::parse("github").unwrap(),
            AllowItem::Group("github".into())
        );
        for p in [
            "example.com",
            ".example.com",
            "*.example.com",
            "api.example.com:8443",
            // Patterns the proxy documents, which an older launcher grammar refused.
            "*-aiplatform.googleapis.com",
            "[2001:db8::1]:443",
            "intranet.",
        ] {
            assert_eq!(
                AllowItem::parse(p).unwrap(),
                AllowItem::Pattern(p.into()),
                "{p}"
            );
        }
        assert_eq!(
            AllowItem::parse(" Example.COM ").unwrap(),
            AllowItem::Pattern("example.com".into())
        );
    }

    #[test]
    fn bad_allow_items_are_refused() {
        for p in [
            "",
            "https://example.com",
            "example.com/path",
            "exa mple.com",
            "example..com",
            "example.com:0",
            "example.com:99999",
            "*",
            ".com",
            "*.com",
        ] {
            assert!(AllowItem::parse(p).is_err(), "{p}");
        }
        // A typo'd group is refused here, before any image is built, with the groups to
        // choose from.
        let err = AllowItem::parse("githu").unwrap_err().to_string();
        assert!(err.contains("unknown group 'githu'"), "{err}");
        assert!(err.contains("github"), "{err}");
    }

    #[test]
    fn the_launcher_accepts_exactly_the_items_the_proxy_accepts() {
        let groups = paude_proxy::policy::Groups::embedded().unwrap();
        let corpus = [
            "github",
            "githu",
            "pypi",
            "example.com",
            ".example.com",
            "*.example.com",
            "*-aiplatform.googleapis.com",
            "intranet.",
            "intranet",
            "[2001:db8::1]:443",
            "10.0.0.0/8",
            "192.0.2.1",
            "example.com:443",
            "example.com:0",
            "*",
            ".com",
            "exa mple.com",
            "https://example.com",
            "example.com/x",
            "a..b",
            "*.*.example.com",
        ];
        for item in corpus {
            assert_eq!(
                AllowItem::parse(item).is_ok(),
                paude_proxy::policy::check_item(&groups, item).is_ok(),
                "{item}"
            );
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
        assert_eq!(parse_memory("8g").unwrap(), 8 << 30);
        assert_eq!(parse_memory("8Gi").unwrap(), 8 << 30);
        assert_eq!(parse_memory("8GB").unwrap(), 8 << 30);
        assert_eq!(parse_memory("10485760").unwrap(), 10 << 20);
        for bad in ["", "g", "-1g", "1k", "lots"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_counts() {
        assert_eq!(parse_cpus("2").unwrap(), 2000);
        assert_eq!(parse_cpus("0.5").unwrap(), 500);
        for bad in ["0", "-1", "nan", "inf", "two"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolve_pins() {
        assert_eq!(
            parse_resolve("Allowed.test=10.0.0.5").unwrap(),
            ("allowed.test".into(), "10.0.0.5".parse().unwrap())
        );
        for bad in ["allowed.test", "=1.2.3.4", "a=b", "a=1.2.3"] {
            assert!(parse_resolve(bad).is_err(), "{bad}");
        }
    }

    fn args(name: &str) -> CreateArgs {
        CreateArgs {
            name: Some(name.into()),
            agent: "shell".into(),
            memory: "8g".into(),
            pids_limit: 2048,
            base_image: "docker.io/library/debian:bookworm-slim".into(),
            pvc_size: "10Gi".into(),
            ..CreateArgs::default()
        }
    }

    #[test]
    fn spec_from_args() {
        let mut a = args("demo");
        a.allowed_domains = vec!["default".into(), ".example.com".into()];
        a.proxy_allow_cidr = vec!["10.89.0.0/24".into()];
        a.mount = true;
        let host = HostContext {
            cwd: "/src/demo".into(),
            ..HostContext::default()
        };
        let spec = SessionSpec::from_args(&a, BackendKind::Podman, host).unwrap();
        assert_eq!(spec.name.as_str(), "demo");
        assert_eq!(spec.agent.name, "shell");
        assert_eq!(
            spec.allowed,
            [
                AllowItem::Default,
                AllowItem::Pattern(".example.com".into())
            ]
        );
        assert_eq!(spec.mount, Some(PathBuf::from("/src/demo")));
        assert_eq!(spec.resources.memory_bytes, 8 << 30);
    }

    #[test]
    fn spec_refuses_bad_input() {
        let host = HostContext::default();
        let mut a = args("demo");
        a.agent = "vim".into();
        assert!(SessionSpec::from_args(&a, BackendKind::Podman, host.clone()).is_err());
        let mut a = args("demo");
        a.pids_limit = 0;
        assert!(SessionSpec::from_args(&a, BackendKind::Podman, host.clone()).is_err());
        let mut a = args("demo");
        a.egress_network = Some("net".into());
        let err = SessionSpec::from_args(&a, BackendKind::Openshift, host.clone()).unwrap_err();
        assert!(err
            .to_string()
            .contains("only applies to the podman backend"));
        let mut a = args("demo");
        a.proxy_allow_cidr = vec!["10.0.0.0/99".into()];
        assert!(SessionSpec::from_args(&a, BackendKind::Podman, host).is_err());
    }
}
