//! The allowlist: policy files parsed into groups, `--allow`/`--deny` items compiled into
//! one immutable [`Policy`], and the two pure questions the proxy asks it: may this target be
//! reached ([`Policy::decide`]) and may this resolved address be dialled
//! ([`Policy::check_ip`]).
//!
//! Invariant: this module does no I/O. Files are read by `config`, sockets belong to
//! `connect`; a compiled policy is swapped whole on reload and never mutated.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};
use ipnet::IpNet;
use serde::Serialize;

use crate::error::Reason;
use crate::host::{normalise_name, split_host_port, Host, Target};

/// The policy files compiled into the binary, as `(file name, text)`.
pub const EMBEDDED: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/embedded_policies.rs"));

/// A policy error with its location (`policies/pypi.txt:7` or `--allow '*'`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct PolicyError {
    pub location: String,
    pub message: String,
}

impl PolicyError {
    fn new(location: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError {
            location: location.into(),
            message: message.into(),
        }
    }
}

/// One allowlist group, as read from its file.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub path: String,
    pub description: String,
    pub aliases: Vec<String>,
    /// Each item with its line number: a pattern, or `@group` to include another group.
    pub items: Vec<(usize, String)>,
}

/// All groups known to the proxy, by name, with their aliases.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    groups: BTreeMap<String, Group>,
    aliases: HashMap<String, String>,
}

impl Groups {
    /// Parses policy files given as `(path for messages, text)`; the group name is the file
    /// stem.
    pub fn parse<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Groups, PolicyError> {
        let mut groups = Groups::default();
        for (path, text) in files {
            let group = parse_group(path, text)?;
            if group.name == "all" {
                return Err(PolicyError::new(
                    path,
                    "'all' is built in and cannot be a file",
                ));
            }
            for alias in std::iter::once(&group.name).chain(&group.aliases) {
                if let Some(other) = groups.aliases.get(alias) {
                    return Err(PolicyError::new(
                        path,
                        format!("name '{alias}' is already used by group '{other}'"),
                    ));
                }
                groups.aliases.insert(alias.clone(), group.name.clone());
            }
            groups.groups.insert(group.name.clone(), group);
        }
        Ok(groups)
    }

    /// The embedded default groups.
    pub fn embedded() -> Result<Groups, PolicyError> {
        let paths: Vec<(String, &str)> = EMBEDDED
            .iter()
            .map(|(name, text)| (format!("policies/{name}"), *text))
            .collect();
        Groups::parse(paths.iter().map(|(p, t)| (p.as_str(), *t)))
    }

    /// Looks a group up by name or alias.
    pub fn get(&self, name: &str) -> Option<&Group> {
        self.aliases.get(name).and_then(|n| self.groups.get(n))
    }

    /// Every group, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }
}

fn parse_group(path: &str, text: &str) -> Result<Group, PolicyError> {
    let file_name = path.rsplit('/').next().unwrap_or(path);
    let name = file_name
        .strip_suffix(".txt")
        .unwrap_or(file_name)
        .to_ascii_lowercase();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(PolicyError::new(
            path,
            "a group file name must be letters, digits, '-' or '_' followed by .txt",
        ));
    }
    let mut group = Group {
        name,
        path: path.to_owned(),
        description: String::new(),
        aliases: Vec::new(),
        items: Vec::new(),
    };
    for (index, line) in text.lines().enumerate() {
        let lineno = index + 1;
        let line = line.trim();
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            if let Some(aliases) = comment.strip_prefix("aliases:") {
                group.aliases.extend(
                    aliases
                        .split([',', ' '])
                        .filter(|a| !a.is_empty())
                        .map(str::to_ascii_lowercase),
                );
            } else if let Some(desc) = comment.strip_prefix("description:") {
                group.description = desc.trim().to_owned();
            }
            continue;
        }
        let item = line.split(" #").next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        if item.contains(char::is_whitespace) {
            return Err(PolicyError::new(
                format!("{path}:{lineno}"),
                format!("'{item}' has spaces: write one pattern per line"),
            ));
        }
        group.items.push((lineno, item.to_owned()));
    }
    // An empty or comment-only file is what a writer leaves for a moment, not a group: taking
    // it would silently shrink or change the allowlist on a reload.
    if group.items.is_empty() {
        return Err(PolicyError::new(
            path,
            "the file names no pattern (it is empty or holds only comments); write one pattern \
             per line, such as .example.com, or remove the file",
        ));
    }
    Ok(group)
}

/// The host part of a compiled pattern.
#[derive(Debug, Clone)]
enum HostPattern {
    /// Exactly this name.
    Exact(Box<str>),
    /// Exactly this IP literal.
    Ip(IpAddr),
    /// This domain and every subdomain (`.example.com`).
    Domain(Box<str>),
    /// A glob over the whole name (`*.example.com`, `*-aiplatform.googleapis.com`).
    Glob(Box<str>),
}

/// Parses one pattern: `host`, `.domain`, a glob with `*`, or an IP literal, each with an
/// optional `:PORT`. Returns the normalised text and the pattern.
fn parse_pattern(text: &str) -> Result<(String, HostPattern, Option<u16>), String> {
    let text = text.trim();
    let (host, port) = split_host_port(text).map_err(|e| e.to_string())?;
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("pattern '{text}' has an invalid port '{p}'"))?,
        ),
    };
    let everything = || format!("pattern '{text}' matches everything");
    let host_pattern = if let Ok(Host::Ip(ip)) = Host::parse(host) {
        HostPattern::Ip(ip)
    } else if let Some(domain) = host.strip_prefix('.') {
        if domain.is_empty() {
            return Err(everything());
        }
        let domain = normalise_name(domain).map_err(|e| format!("pattern '{text}': {e}"))?;
        if domain.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "pattern '{text}': '{domain}' is an IP address, not a domain; to allow that address write '{domain}'"
            ));
        }
        if !domain.contains('.') {
            return Err(format!(
                "pattern '{text}' matches every host under '{domain}'; name a registered domain such as '.example.{domain}'"
            ));
        }
        HostPattern::Domain(domain.into_owned().into_boxed_str())
    } else if host.contains(['*', '?', '[', ']', '{', '}']) {
        if host.contains(['?', '[', ']', '{', '}']) {
            return Err(format!(
                "pattern '{text}': only '*' is supported as a wildcard"
            ));
        }
        let trimmed = host.strip_suffix('.').unwrap_or(host);
        let mut labels = Vec::new();
        for label in trimmed.split('.') {
            if label.contains('*') {
                let label = label.to_ascii_lowercase();
                if label.is_empty()
                    || !label.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || b == b'-'
                            || b == b'_'
                            || b == b'*'
                    })
                {
                    return Err(format!("pattern '{text}' is not a valid host pattern"));
                }
                labels.push(label);
            } else {
                let label = normalise_name(label).map_err(|e| format!("pattern '{text}': {e}"))?;
                labels.push(label.into_owned());
            }
        }
        let literal_tail = labels.iter().rev().take_while(|l| !l.contains('*')).count();
        match literal_tail {
            0 => return Err(everything()),
            1 => {
                return Err(format!(
                    "pattern '{text}' matches every host under '{}'; name a registered domain such as '*.example.{}'",
                    labels[labels.len() - 1],
                    labels[labels.len() - 1]
                ))
            }
            _ => {}
        }
        HostPattern::Glob(labels.join(".").into_boxed_str())
    } else {
        let name = normalise_name(host).map_err(|e| format!("pattern '{text}': {e}"))?;
        HostPattern::Exact(name.into_owned().into_boxed_str())
    };
    let shown = match (&host_pattern, port) {
        (HostPattern::Exact(h) | HostPattern::Glob(h), p) => with_port(h, p),
        (HostPattern::Domain(d), p) => with_port(&format!(".{d}"), p),
        (HostPattern::Ip(ip), p) => with_port(&Host::Ip(*ip).to_string(), p),
    };
    Ok((shown, host_pattern, port))
}

fn with_port(host: &str, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// One rule of a compiled policy, as shown by `--check` and `/policy`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// `allow` or `deny`.
    pub action: &'static str,
    /// The normalised pattern (`all` for no domain filtering).
    pub pattern: Arc<str>,
    /// The group the pattern came from, or null for a pattern given directly.
    pub group: Option<Arc<str>>,
    /// Where it was written (`policies/pypi.txt:3`, `--allow`).
    pub source: String,
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: Arc<str>,
    group: Option<Arc<str>>,
    port: Option<u16>,
}

/// Rules indexed for lookups that do not allocate.
#[derive(Debug, Default)]
struct RuleSet {
    rules: Vec<Rule>,
    exact: HashMap<Box<str>, Vec<usize>>,
    ips: HashMap<IpAddr, Vec<usize>>,
    domains: HashMap<Box<str>, Vec<usize>>,
    globs: Vec<(GlobMatcher, usize)>,
    /// The rule that allows every name (`all`), if given.
    all: Option<usize>,
}

impl RuleSet {
    fn add(&mut self, host: HostPattern, rule: Rule) -> Result<(), String> {
        let index = self.rules.len();
        match host {
            HostPattern::Exact(h) => self.exact.entry(h).or_default().push(index),
            HostPattern::Ip(ip) => self.ips.entry(ip).or_default().push(index),
            HostPattern::Domain(d) => self.domains.entry(d).or_default().push(index),
            HostPattern::Glob(g) => {
                let glob = GlobBuilder::new(&g)
                    .literal_separator(false)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| format!("pattern '{g}': {e}"))?;
                self.globs.push((glob.compile_matcher(), index));
            }
        }
        self.rules.push(rule);
        Ok(())
    }

    /// Calls `f` with every rule whose host part matches, stopping when it returns true.
    fn any(&self, host: &Host, mut f: impl FnMut(&Rule) -> bool) -> bool {
        let mut check = |indices: Option<&Vec<usize>>| {
            indices.is_some_and(|v| v.iter().any(|i| f(&self.rules[*i])))
        };
        match host {
            Host::Ip(ip) => check(self.ips.get(ip)),
            Host::Name(name) => {
                if check(self.exact.get(&**name)) {
                    return true;
                }
                let mut rest: &str = name;
                loop {
                    if check(self.domains.get(rest)) {
                        return true;
                    }
                    match rest.split_once('.') {
                        Some((_, tail)) => rest = tail,
                        None => break,
                    }
                }
                if self
                    .globs
                    .iter()
                    .any(|(g, i)| g.is_match(&**name) && f(&self.rules[*i]))
                {
                    return true;
                }
                self.all.is_some_and(|i| f(&self.rules[i]))
            }
        }
    }
}

/// How a request reaches its target; decides the default port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A CONNECT tunnel: port 443 unless a pattern names another.
    Connect,
    /// Plain HTTP forwarding: port 80 unless a pattern names another.
    Http,
}

impl Via {
    pub fn default_port(self) -> u16 {
        match self {
            Via::Connect => 443,
            Via::Http => 80,
        }
    }
}

/// The outcome of [`Policy::decide`], logged once as the audit event.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    pub rule: Option<Arc<str>>,
    pub group: Option<Arc<str>>,
}

impl Decision {
    fn allow(rule: &Rule) -> Self {
        Decision {
            allowed: true,
            reason: Reason::Allowed,
            rule: Some(rule.pattern.clone()),
            group: rule.group.clone(),
        }
    }

    /// A refusal that no rule names.
    pub fn deny(reason: Reason) -> Self {
        Decision::deny_by(reason, None)
    }

    fn deny_by(reason: Reason, rule: Option<&Rule>) -> Self {
        Decision {
            allowed: false,
            reason,
            rule: rule.map(|r| r.pattern.clone()),
            group: rule.and_then(|r| r.group.clone()),
        }
    }
}

/// The settings a policy is compiled from (everything that a reload may change).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySettings {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub allow_cidr: Vec<IpNet>,
    pub allow_client: Vec<IpNet>,
    pub resolve: Vec<(String, IpAddr)>,
    pub allow_opaque: bool,
    pub allow_no_sni: bool,
    pub allow_ech: bool,
}

/// A compiled, immutable policy.
#[derive(Debug)]
pub struct Policy {
    allow: RuleSet,
    deny: RuleSet,
    allow_cidr: Vec<IpNet>,
    allow_client: Vec<IpNet>,
    pins: HashMap<Box<str>, IpAddr>,
    pub allow_opaque: bool,
    /// Tunnels to a named host may carry a ClientHello without SNI.
    pub allow_no_sni: bool,
    /// Tunnels may carry a ClientHello with Encrypted Client Hello.
    pub allow_ech: bool,
    entries: Vec<Entry>,
}

/// Checks one allowlist item (`all`, a group name, a pattern, an IP literal or CIDR) exactly as
/// `--allow` reads it, against `groups`: the one grammar shared by the proxy and anything that
/// writes its configuration (paude-launch checks `--allowed-domains` with it), so the two can
/// never accept different items.
pub fn check_item(groups: &Groups, item: &str) -> Result<(), PolicyError> {
    Policy::compile(
        groups,
        &PolicySettings {
            allow: vec![item.to_owned()],
            ..PolicySettings::default()
        },
    )
    .map(|_| ())
}

impl Policy {
    /// Compiles the settings against the known groups.
    pub fn compile(groups: &Groups, settings: &PolicySettings) -> Result<Policy, PolicyError> {
        let mut policy = Policy {
            allow: RuleSet::default(),
            deny: RuleSet::default(),
            allow_cidr: settings.allow_cidr.clone(),
            allow_client: settings.allow_client.clone(),
            pins: HashMap::new(),
            allow_opaque: settings.allow_opaque,
            allow_no_sni: settings.allow_no_sni,
            allow_ech: settings.allow_ech,
            entries: Vec::new(),
        };
        let default_items = ["default".to_owned()];
        let allow_items: &[String] = if settings.allow.is_empty() {
            &default_items
        } else {
            &settings.allow
        };
        for item in allow_items {
            policy.add_item("allow", item, groups)?;
        }
        if policy.allow.rules.is_empty() {
            return Err(PolicyError::new(
                format!("--allow '{}'", allow_items.join("' --allow '")),
                "the allowlist allows nothing (its groups include each other and name no \
                 pattern); add patterns to a group, or allow another one such as default",
            ));
        }
        for item in &settings.deny {
            policy.add_item("deny", item, groups)?;
        }
        for (name, ip) in &settings.resolve {
            let name = normalise_name(name)
                .map_err(|e| PolicyError::new(format!("--resolve '{name}={ip}'"), e.to_string()))?;
            policy.pins.insert(name.into_owned().into_boxed_str(), *ip);
        }
        Ok(policy)
    }

    fn add_item(
        &mut self,
        action: &'static str,
        item: &str,
        groups: &Groups,
    ) -> Result<(), PolicyError> {
        let location = format!("--{action} '{item}'");
        let lower = item.trim().to_ascii_lowercase();
        if lower == "all" {
            return self.add_all(action, None, format!("--{action}"));
        }
        if let Some(group) = groups.get(&lower) {
            let mut seen = HashSet::new();
            return self.add_group(action, group, groups, &mut seen);
        }
        if is_group_like(&lower) {
            let known: Vec<String> = groups
                .iter()
                .map(|g| g.name.clone())
                .chain(["all".to_owned()])
                .collect();
            return Err(PolicyError::new(
                location,
                format!(
                    "unknown group '{lower}'; known groups are {}; to name a single-label host write '{lower}.'",
                    known.join(", ")
                ),
            ));
        }
        self.add_pattern(action, item, None, format!("--{action}"))
            .map_err(|message| PolicyError::new(location, message))
    }

    fn add_all(
        &mut self,
        action: &'static str,
        group: Option<&Arc<str>>,
        source: String,
    ) -> Result<(), PolicyError> {
        let set = if action == "allow" {
            &mut self.allow
        } else {
            &mut self.deny
        };
        let pattern: Arc<str> = Arc::from("all");
        if set.all.is_none() {
            set.all = Some(set.rules.len());
            set.rules.push(Rule {
                pattern: pattern.clone(),
                group: group.cloned(),
                port: None,
            });
        }
        self.entries.push(Entry {
            action,
            pattern,
            group: group.cloned(),
            source,
        });
        Ok(())
    }

    fn add_group(
        &mut self,
        action: &'static str,
        group: &Group,
        groups: &Groups,
        seen: &mut HashSet<String>,
    ) -> Result<(), PolicyError> {
        if !seen.insert(group.name.clone()) {
            return Ok(());
        }
        let name: Arc<str> = Arc::from(group.name.as_str());
        for (line, item) in &group.items {
            let location = format!("{}:{line}", group.path);
            if let Some(reference) = item.strip_prefix('@') {
                let reference = reference.to_ascii_lowercase();
                if reference == "all" {
                    self.add_all(action, Some(&name), location)?;
                    continue;
                }
                let included = groups.get(&reference).ok_or_else(|| {
                    PolicyError::new(&location, format!("'@{reference}' names no known group"))
                })?;
                self.add_group(action, included, groups, seen)?;
                continue;
            }
            self.add_pattern(action, item, Some(&name), location.clone())
                .map_err(|message| PolicyError::new(location, message))?;
        }
        Ok(())
    }

    fn add_pattern(
        &mut self,
        action: &'static str,
        text: &str,
        group: Option<&Arc<str>>,
        source: String,
    ) -> Result<(), String> {
        let (shown, host, port) = parse_pattern(text)?;
        let pattern: Arc<str> = Arc::from(shown);
        let rule = Rule {
            pattern: pattern.clone(),
            group: group.cloned(),
            port,
        };
        let set = if action == "allow" {
            &mut self.allow
        } else {
            &mut self.deny
        };
        set.add(host, rule)?;
        self.entries.push(Entry {
            action,
            pattern,
            group: group.cloned(),
            source,
        });
        Ok(())
    }

    /// Decides whether a target may be reached. Deny rules win over every allow; IP literals
    /// need an explicit rule (`all` does not cover them); a pattern without a port allows only
    /// the default port of the method.
    pub fn decide(&self, target: &Target, via: Via) -> Decision {
        let mut denied = None;
        self.deny.any(&target.host, |r| {
            let hit = r.port.is_none_or(|p| p == target.port);
            if hit {
                denied = Some(r.clone());
            }
            hit
        });
        if let Some(rule) = denied {
            return Decision::deny_by(Reason::DeniedByRule, Some(&rule));
        }
        let mut allowed = None;
        let mut wrong_port = None;
        let default_port = via.default_port();
        self.allow.any(&target.host, |r| {
            if r.port.unwrap_or(default_port) == target.port {
                allowed = Some(Decision::allow(r));
                true
            } else {
                wrong_port.get_or_insert_with(|| r.clone());
                false
            }
        });
        match (allowed, wrong_port) {
            (Some(decision), _) => decision,
            (None, Some(rule)) => Decision::deny_by(Reason::PortNotAllowed, Some(&rule)),
            (None, None) if target.host.ip().is_some() => Decision::deny(Reason::IpLiteral),
            (None, None) => Decision::deny(Reason::NotAllowed),
        }
    }

    /// Checks a resolved address against the guard; `--allow-cidr` ranges override it.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Reason> {
        if self.allow_cidr.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match address_class(ip) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Whether a client may use the proxy at all.
    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.allow_client.is_empty() || self.allow_client.iter().any(|net| net.contains(&ip))
    }

    /// The address a name is pinned to with `--resolve`.
    pub fn pin(&self, name: &str) -> Option<IpAddr> {
        self.pins.get(name).copied()
    }

    /// The effective rules, in the order they were given.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The `--allow-cidr` ranges.
    pub fn allow_cidrs(&self) -> &[IpNet] {
        &self.allow_cidr
    }

    /// What the first bytes of a tunnel opened under this policy may be.
    pub fn first_bytes(&self) -> FirstBytesRules {
        FirstBytesRules {
            allow_opaque: self.allow_opaque,
            allow_no_sni: self.allow_no_sni,
            allow_ech: self.allow_ech,
        }
    }
}

/// The rules for a tunnel's first bytes, taken from the policy in force when it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirstBytesRules {
    /// Bytes that are not a TLS ClientHello may pass (`--allow-opaque`).
    pub allow_opaque: bool,
    /// A ClientHello without SNI may go to a named host (`--allow-no-sni`).
    pub allow_no_sni: bool,
    /// A ClientHello with Encrypted Client Hello may pass (`--allow-ech`).
    pub allow_ech: bool,
}

impl fmt::Display for Policy {
    /// The effective allowlist as `--check` prints it: one rule per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            let group = e.group.as_deref().unwrap_or("-");
            writeln!(
                f,
                "{:<5} {:<48} {:<10} {}",
                e.action, e.pattern, group, e.source
            )?;
        }
        for net in &self.allow_cidr {
            writeln!(
                f,
                "{:<5} {:<48} {:<10} --allow-cidr",
                "cidr",
                net.to_string(),
                "-"
            )?;
        }
        for net in &self.allow_client {
            writeln!(
                f,
                "{:<5} {:<48} {:<10} --allow-client",
                "client",
                net.to_string(),
                "-"
            )?;
        }
        let mut pins: Vec<_> = self.pins.iter().collect();
        pins.sort();
        for (name, ip) in pins {
            writeln!(
                f,
                "{:<5} {:<48} {:<10} --resolve",
                "pin",
                format!("{name}={ip}"),
                "-"
            )?;
        }
        Ok(())
    }
}

/// Whether an `--allow` item looks like a group name rather than a host pattern.
fn is_group_like(item: &str) -> bool {
    !item.is_empty() && !item.contains(['.', ':', '*', '[']) && item.parse::<IpAddr>().is_err()
}

/// The class of an address the guard refuses, or `None` for a public unicast address.
pub fn address_class(ip: IpAddr) -> Option<Reason> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<Reason> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => Reason::UnspecifiedAddress,
        (127, _, _) => Reason::LoopbackAddress,
        (10, _, _) | (192, 168, _) => Reason::PrivateAddress,
        (172, b, _) if (16..32).contains(&b) => Reason::PrivateAddress,
        (100, b, _) if (64..128).contains(&b) => Reason::SharedAddress,
        (169, 254, _) => Reason::LinkLocalAddress,
        (224..=239, _, _) => Reason::MulticastAddress,
        (255, 255, 255) if ip.is_broadcast() => Reason::MulticastAddress,
        (240..=255, _, _) => Reason::ReservedAddress,
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Reason::ReservedAddress,
        (198, 18 | 19, _) => Reason::ReservedAddress,
        _ => return None,
    })
}

fn v6_class(ip: Ipv6Addr) -> Option<Reason> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(Reason::UnspecifiedAddress);
    }
    if ip.is_loopback() {
        return Some(Reason::LoopbackAddress);
    }
    Some(match s {
        // IPv4-mapped (::ffff:0:0/96) and IPv4-compatible (::/96) addresses.
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Reason::EmbeddedIpv4Address,
        // NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48).
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => Reason::EmbeddedIpv4Address,
        // 6to4 (2002::/16) and Teredo (2001::/32).
        [0x2002, ..] | [0x2001, 0, ..] => Reason::EmbeddedIpv4Address,
        [0x2001, 0xdb8, ..] | [0x100, 0, 0, 0, ..] => Reason::ReservedAddress,
        [x, ..] if x & 0xfe00 == 0xfc00 => Reason::PrivateAddress,
        [x, ..] if x & 0xffc0 == 0xfe80 => Reason::LinkLocalAddress,
        [x, ..] if x & 0xffc0 == 0xfec0 => Reason::PrivateAddress,
        [x, ..] if x & 0xff00 == 0xff00 => Reason::MulticastAddress,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        let settings = PolicySettings {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Policy::compile(&Groups::embedded().unwrap(), &settings).unwrap()
    }

    /// Checks one target against a policy: `expected` is the reason code.
    fn check(p: &Policy, target: &str, via: Via, expected: &str) {
        let t = Target::parse(target, None).unwrap();
        assert_eq!(p.decide(&t, via).reason.code(), expected, "target {target}");
    }

    #[test]
    fn domain_rules_match_on_label_boundaries() {
        let p = policy(&[".foo.com", "*.bar.com", "baz.com", "*-ai.goo.com"], &[]);
        check(&p, "foo.com:443", Via::Connect, "allowed");
        check(&p, "a.b.foo.com:443", Via::Connect, "allowed");
        check(&p, "a.zfoo.com:443", Via::Connect, "not_allowed");
        check(&p, "zfoo.com:443", Via::Connect, "not_allowed");
        check(&p, "bar.com:443", Via::Connect, "not_allowed");
        check(&p, "x.bar.com:443", Via::Connect, "allowed");
        check(&p, "evilbar.com:443", Via::Connect, "not_allowed");
        check(&p, "baz.com:443", Via::Connect, "allowed");
        check(&p, "a.baz.com:443", Via::Connect, "not_allowed");
        check(&p, "us-ai.goo.com:443", Via::Connect, "allowed");
        check(&p, "ai.goo.com:443", Via::Connect, "not_allowed");
    }

    #[test]
    fn ports_default_per_method() {
        let p = policy(&["a.com", "b.com:8443"], &[]);
        check(&p, "a.com:443", Via::Connect, "allowed");
        check(&p, "a.com:80", Via::Connect, "port_not_allowed");
        check(&p, "a.com:80", Via::Http, "allowed");
        check(&p, "a.com:443", Via::Http, "port_not_allowed");
        check(&p, "b.com:8443", Via::Connect, "allowed");
        check(&p, "b.com:443", Via::Connect, "port_not_allowed");
    }

    #[test]
    fn deny_wins_and_ip_literals_need_explicit_rules() {
        let p = policy(&["all", "10.1.2.3:8080"], &["bad.example.com", ".evil.com"]);
        check(&p, "good.example.com:443", Via::Connect, "allowed");
        check(&p, "bad.example.com:443", Via::Connect, "denied_by_rule");
        check(&p, "x.evil.com:443", Via::Connect, "denied_by_rule");
        check(&p, "1.2.3.4:443", Via::Connect, "ip_literal");
        check(&p, "[::1]:443", Via::Connect, "ip_literal");
        check(&p, "10.1.2.3:8080", Via::Connect, "allowed");
    }

    #[test]
    fn all_does_not_cover_ip_literals_spelled_in_full_width_digits() {
        let p = policy(&["all"], &[]);
        check(&p, "１.２.３.４:443", Via::Connect, "ip_literal");
        check(&p, "８．８．８．８:80", Via::Http, "ip_literal");
        let named = policy(&["1.2.3.4"], &[]);
        check(&named, "１.２.３.４:443", Via::Connect, "allowed");
    }

    #[test]
    fn groups_and_aliases_expand() {
        let p = policy(&["python"], &[]);
        check(&p, "files.pythonhosted.org:443", Via::Connect, "allowed");
        let d = policy(&[], &[]);
        check(&d, "github.com:443", Via::Connect, "allowed");
        check(
            &d,
            "us-central1-aiplatform.googleapis.com:443",
            Via::Connect,
            "allowed",
        );
        check(&d, "api.anthropic.com:443", Via::Connect, "not_allowed");
    }

    #[test]
    fn patterns_that_match_everything_are_rejected() {
        for bad in ["*", "*.com", ".com", "*example.com", ".", "*.*"] {
            let err = Policy::compile(
                &Groups::default(),
                &PolicySettings {
                    allow: vec![bad.to_owned()],
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(err.message.contains("matches every"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_domain_pattern_over_an_ip_address_is_an_error() {
        // `.1.2.3.4` can never match: the host 1.2.3.4 is an IP literal, not a name under it.
        for bad in [".1.2.3.4", ".0.1.2.3:343", ".１.２.３.４"] {
            let err = Policy::compile(
                &Groups::default(),
                &PolicySettings {
                    allow: vec![bad.to_owned()],
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(err.message.contains("is an IP address"), "{bad}: {err}");
        }
    }

    #[test]
    fn file_errors_name_file_and_line() {
        let groups = Groups::parse([(
            "dir/mine.txt",
            "# description: x\nok.example.com\n\n*.com\n",
        )])
        .unwrap();
        let err = Policy::compile(
            &groups,
            &PolicySettings {
                allow: vec!["mine".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "dir/mine.txt:4: pattern '*.com' matches every host under 'com'; name a registered domain such as '*.example.com'");
    }

    #[test]
    fn files_and_allowlists_that_name_nothing_are_refused() {
        for text in [
            "",
            "\n  \n",
            "# description: x\n# aliases: y\n",
            "  # a.com\n",
        ] {
            let err = Groups::parse([("dir/x.txt", text)]).unwrap_err();
            assert_eq!(err.location, "dir/x.txt", "{text:?}");
            assert!(err.message.contains("names no pattern"), "{text:?}: {err}");
        }
        let cycle = Groups::parse([("d/a.txt", "@b\n"), ("d/b.txt", "@a\n")]).unwrap();
        let err = Policy::compile(
            &cycle,
            &PolicySettings {
                allow: vec!["a".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.location, "--allow 'a'");
        assert!(err.message.contains("allows nothing"), "{err}");
    }

    #[test]
    fn address_classes() {
        let cases = [
            ("127.0.0.1", Some("loopback_address")),
            ("10.0.0.1", Some("private_address")),
            ("172.31.0.1", Some("private_address")),
            ("172.32.0.1", None),
            ("192.168.1.1", Some("private_address")),
            ("100.64.0.1", Some("shared_address")),
            ("169.254.169.254", Some("link_local_address")),
            ("224.0.0.1", Some("multicast_address")),
            ("255.255.255.255", Some("multicast_address")),
            ("0.0.0.0", Some("unspecified_address")),
            ("8.8.8.8", None),
            ("::1", Some("loopback_address")),
            ("::", Some("unspecified_address")),
            ("::ffff:127.0.0.1", Some("embedded_ipv4_address")),
            ("64:ff9b::a00:1", Some("embedded_ipv4_address")),
            ("2002:a00:1::", Some("embedded_ipv4_address")),
            ("2001:0:4136:e378::1", Some("embedded_ipv4_address")),
            ("fd00::1", Some("private_address")),
            ("fe80::1", Some("link_local_address")),
            ("ff02::1", Some("multicast_address")),
            ("2606:4700::1", None),
        ];
        for (ip, expected) in cases {
            let got = address_class(ip.parse().unwrap()).map(Reason::code);
            assert_eq!(got, expected, "{ip}");
        }
    }
}
