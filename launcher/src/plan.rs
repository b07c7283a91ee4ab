//! Spec → backend-neutral `Plan`: everything a session consists of, decided once. Resource
//! names, labels, both images with their input hashes, the proxy's configuration TOML, the
//! agent's command, environment, mounts, limits and hardening. Backends only render and apply a
//! plan; they never decide any of this again.
//!
//! Invariant: this module does no I/O. The caller loads files and reads the host environment.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::agents::Agent;
use crate::cli::BackendKind;
use crate::images::{self, Customisation, ImageInputs, ImagePlan};
use crate::spec::{AllowItem, ClusterOptions, Resources, SessionName, SessionSpec};

/// The port paude-proxy listens on for the agent.
pub const PROXY_PORT: u16 = 3128;
/// The proxy's admin listener, bound to loopback inside the proxy container or pod only.
pub const PROXY_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Where the proxy reads its configuration.
pub const PROXY_CONFIG_PATH: &str = "/etc/paude-proxy/config.toml";
/// The agent's user name, uid and gid.
pub const AGENT_USER: &str = "paude";
/// The agent's numeric uid.
pub const AGENT_UID: u32 = 1000;
/// The agent's numeric gid.
pub const AGENT_GID: u32 = 1000;
/// The agent's home directory, where the session's data volume is mounted.
pub const AGENT_HOME: &str = "/home/paude";
/// The workspace path the agent and git see (a symlink to `WORKSPACE_DIR` in the image).
pub const WORKSPACE: &str = "/workspace";
/// The real workspace directory inside the data volume (the `--mount` target).
pub const WORKSPACE_DIR: &str = "/home/paude/workspace";
/// The tmux session the agent runs in.
pub const TMUX_SESSION: &str = "paude";
/// The uid and gid the proxy runs as (nobody).
pub const PROXY_UID: u32 = 65534;
/// Where the launcher puts the sanitised git identity (system-level, read-only for the agent).
pub const GITCONFIG_PATH: &str = "/etc/gitconfig";

/// Label keys put on every object of a session; sessions are found through them.
pub mod labels {
    /// The session's name.
    pub const SESSION: &str = "paude.session";
    /// What the object is for: see [`super::Role`].
    pub const ROLE: &str = "paude.role";
    /// The backend that created it.
    pub const BACKEND: &str = "paude.backend";
    /// The agent name.
    pub const AGENT: &str = "paude.agent";
    /// `volume` or the host path bind-mounted as the workspace.
    pub const WORKSPACE: &str = "paude.workspace";
    /// `true` when the agent runs with its yolo flag.
    pub const YOLO: &str = "paude.yolo";
}

/// The role of an object in a session, the value of the `paude.role` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent container, StatefulSet or pod.
    Agent,
    /// The proxy container, Deployment or pod.
    Proxy,
    /// The agent's network (Podman) or network policy (cluster).
    InternalNetwork,
    /// The proxy's outbound network.
    EgressNetwork,
    /// The workspace and home volume or claim.
    Data,
    /// The proxy's configuration (cluster ConfigMap).
    ProxyConfig,
    /// Images built for the session (cluster BuildConfig/ImageStream).
    Image,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Proxy => "proxy",
            Role::InternalNetwork => "internal-network",
            Role::EgressNetwork => "egress-network",
            Role::Data => "data",
            Role::ProxyConfig => "proxy-config",
            Role::Image => "image",
        }
    }
}

/// The names of a session's objects, derived from its name only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceNames {
    /// `paude-NAME-internal`.
    pub internal_network: String,
    /// `paude-NAME-egress`, or the user's `--egress-network` (then not owned by the session).
    pub egress_network: String,
    /// Whether the session created (and so deletes) the egress network.
    pub owns_egress_network: bool,
    /// `paude-NAME-proxy`.
    pub proxy: String,
    /// `paude-NAME-agent`.
    pub agent: String,
    /// `paude-NAME-data`.
    pub data: String,
    /// `paude-NAME`: the git remote in the user's repository.
    pub git_remote: String,
}

impl ResourceNames {
    /// The names for a session, with an optional user-supplied egress network.
    pub fn new(name: &SessionName, egress_network: Option<&str>) -> Self {
        let base = format!("paude-{name}");
        ResourceNames {
            internal_network: format!("{base}-internal"),
            egress_network: egress_network
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{base}-egress")),
            owns_egress_network: egress_network.is_none(),
            proxy: format!("{base}-proxy"),
            agent: format!("{base}-agent"),
            data: format!("{base}-data"),
            git_remote: base,
        }
    }
}

/// The settings written to the proxy's `config.toml` (paude-proxy's flags in snake_case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// Where the proxy listens for the agent. The backend fills in the real address.
    pub listen: String,
    /// The admin listener: loopback inside the proxy container only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// `-`: audit events go to stdout, which the engine keeps as the container log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<String>,
    /// Groups and patterns the agent may reach.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Name pins, `HOST=IP`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolve: Vec<String>,
    /// Networks exempted from the address guard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidr: Vec<String>,
    /// Clients allowed to use the proxy. The backend fills in the agent's network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_client: Vec<String>,
}

impl ProxyConfig {
    /// Renders the TOML file the proxy reads.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("the proxy config is plain strings and lists");
        format!("# Written by paude-launch; `paude-launch allowed-domains` edits it.\n{body}")
    }

    /// Parses a TOML file written by [`ProxyConfig::to_toml`].
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).context("the session's proxy configuration is not valid TOML")
    }

    /// A copy listening on `ip` and serving only clients in `clients`.
    pub fn bound_to(&self, ip: IpAddr, clients: &[IpNet]) -> Self {
        let mut cfg = self.clone();
        cfg.listen = std::net::SocketAddr::new(ip, PROXY_PORT).to_string();
        cfg.allow_client = clients.iter().map(ToString::to_string).collect();
        cfg
    }
}

/// A bind mount from the host into the agent container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The host path.
    pub source: PathBuf,
    /// The path in the container.
    pub target: String,
    /// Whether the agent may only read it.
    pub read_only: bool,
}

/// A file the launcher places in a container before its first start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFile {
    /// Absolute path in the container.
    pub path: String,
    /// Contents.
    pub contents: String,
    /// Unix permission bits; owned by root, so the agent cannot change it.
    pub mode: u32,
}

/// How the agent container is locked down. Every backend applies all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Numeric user the process runs as (never root).
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Drop every Linux capability.
    pub drop_all_capabilities: bool,
    /// Set no_new_privs, so setuid binaries cannot regain privileges.
    pub no_new_privileges: bool,
    /// Run a minimal init as PID 1 that reaps zombies and forwards signals.
    pub init: bool,
}

/// Everything about the agent container.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPlan {
    /// The container's command after the entry point: the agent argv started in tmux.
    pub argv: Vec<String>,
    /// Environment without the proxy variables (see [`Plan::agent_env`]).
    pub env: BTreeMap<String, String>,
    /// Host paths mounted in (only what the user asked for and the agent's read-only creds).
    pub mounts: Vec<Mount>,
    /// Files placed in the container before the first start.
    pub files: Vec<InjectedFile>,
    /// Limits.
    pub resources: Resources,
    /// Lockdown.
    pub hardening: Hardening,
}

/// The whole session, decided.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The session's name.
    pub name: SessionName,
    /// Where it runs.
    pub backend: BackendKind,
    /// The agent.
    pub agent: &'static Agent,
    /// Object names.
    pub names: ResourceNames,
    /// Labels common to every object (the backend adds `paude.role`).
    pub labels: BTreeMap<String, String>,
    /// The proxy image.
    pub proxy_image: ImagePlan,
    /// The agent image.
    pub agent_image: ImagePlan,
    /// The project's own Dockerfile (devcontainer `build`), built before the agent image,
    /// which uses it as its base.
    pub base_build: Option<ImagePlan>,
    /// Rebuild images even when present.
    pub rebuild: bool,
    /// The proxy's configuration before the backend binds it to an address.
    pub proxy: ProxyConfig,
    /// The agent container.
    pub agent_container: AgentPlan,
    /// Whether to set up git sync after creation.
    pub git: bool,
    /// Cluster-only options.
    pub cluster: ClusterOptions,
    /// Messages for the user about choices made (e.g. ignored customisation keys).
    pub warnings: Vec<String>,
}

/// The allowlist a session starts with: `default` (or nothing) brings the agent's groups along.
pub fn effective_allowlist(
    items: &[AllowItem],
    agent: &Agent,
    host_env: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let items: Vec<AllowItem> = if items.is_empty() {
        vec![AllowItem::Default]
    } else {
        items.to_vec()
    };
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    };
    for item in &items {
        push(item.as_proxy_item());
        if *item == AllowItem::Default {
            for g in agent.groups(&host_env) {
                push(g);
            }
        }
    }
    out
}

/// Applies `allowed-domains --add/--remove` to a session's current list.
pub fn edit_allowlist(
    current: &[String],
    add: &[AllowItem],
    remove: &[AllowItem],
) -> Result<Vec<String>> {
    let mut list = current.to_vec();
    for item in remove {
        let s = item.as_proxy_item();
        let Some(pos) = list.iter().position(|c| c == s) else {
            bail!(
                "'{s}' is not in the session's allowlist ({}): nothing was changed",
                current.join(", ")
            );
        };
        list.remove(pos);
    }
    for item in add {
        let s = item.as_proxy_item();
        if !list.iter().any(|c| c == s) {
            list.push(s.to_owned());
        }
    }
    if list.is_empty() {
        bail!(
            "removing every item would leave the proxy with its built-in default list: \
             add the items you want first; nothing was changed"
        );
    }
    Ok(list)
}

/// Renders the sanitised git identity: name and email only, no credential helpers.
pub fn gitconfig(identity: Option<&(String, String)>) -> String {
    let quote = |s: &str| {
        let escaped: String = s
            .chars()
            .filter(|c| !c.is_control())
            .flat_map(|c| match c {
                '\\' => vec!['\\', '\\'],
                '"' => vec!['\\', '"'],
                c => vec![c],
            })
            .collect();
        format!("\"{escaped}\"")
    };
    let mut out = String::from(
        "# Written by paude-launch: the host's git identity only, never its credentials.\n",
    );
    if let Some((name, email)) = identity {
        out.push_str(&format!(
            "[user]\n\tname = {}\n\temail = {}\n",
            quote(name),
            quote(email)
        ));
    }
    out.push_str(&format!(
        "[safe]\n\tdirectory = {WORKSPACE}\n\tdirectory = {WORKSPACE_DIR}\n\
         [init]\n\tdefaultBranch = main\n"
    ));
    out
}

impl Plan {
    /// Plans a session from a validated spec, loaded image inputs and the project's
    /// customisation.
    pub fn new(spec: &SessionSpec, inputs: &ImageInputs, custom: &Customisation) -> Plan {
        let host_env = |k: &str| spec.host.env.get(k).cloned();
        let names = ResourceNames::new(&spec.name, spec.egress_network.as_deref());
        let mut labels = BTreeMap::new();
        labels.insert(labels::SESSION.to_owned(), spec.name.to_string());
        labels.insert(labels::BACKEND.to_owned(), spec.backend.as_str().to_owned());
        labels.insert(labels::AGENT.to_owned(), spec.agent.name.to_owned());
        labels.insert(
            labels::WORKSPACE.to_owned(),
            spec.mount
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "volume".to_owned()),
        );
        labels.insert(labels::YOLO.to_owned(), spec.yolo.to_string());

        let proxy = ProxyConfig {
            listen: format!("0.0.0.0:{PROXY_PORT}"),
            admin_listen: Some(PROXY_ADMIN_LISTEN.to_owned()),
            audit_log: Some("-".to_owned()),
            allow: effective_allowlist(&spec.allowed, spec.agent, host_env),
            resolve: spec
                .proxy_resolve
                .iter()
                .map(|(h, ip)| format!("{h}={ip}"))
                .collect(),
            allow_cidr: spec
                .proxy_allow_cidr
                .iter()
                .map(ToString::to_string)
                .collect(),
            allow_client: Vec::new(),
        };

        let mut env = BTreeMap::new();
        for var in spec.agent.passthrough_env {
            if let Some(v) = host_env(var) {
                env.insert((*var).to_owned(), v);
            }
        }
        for (k, v) in &custom.env {
            env.insert(k.clone(), v.clone());
        }
        if let Some(cmd) = &custom.post_create {
            env.insert("PAUDE_POST_CREATE".to_owned(), cmd.clone());
        }
        env.insert("PAUDE_SESSION".to_owned(), spec.name.to_string());

        let mut mounts = Vec::new();
        if let Some(dir) = &spec.mount {
            mounts.push(Mount {
                source: dir.clone(),
                target: WORKSPACE_DIR.to_owned(),
                read_only: false,
            });
        }
        if let Some(home) = &spec.host.home {
            for rel in spec.agent.readonly_home_mounts {
                if spec.host.existing_home_dirs.iter().any(|d| d == rel) {
                    mounts.push(Mount {
                        source: home.join(rel),
                        target: format!("{AGENT_HOME}/{rel}"),
                        read_only: true,
                    });
                }
            }
        }

        // The image's entry point starts this command inside tmux.
        let argv = spec.agent.argv(spec.yolo, &spec.agent_args);

        let mut warnings = Vec::new();
        if spec.yolo && spec.allowed.contains(&AllowItem::All) {
            warnings.push(
                "--yolo with --allowed-domains all lets the agent send your files anywhere"
                    .to_owned(),
            );
        }
        if spec.yolo && spec.agent.yolo_flag.is_none() {
            warnings.push(format!(
                "--yolo has no effect with --agent {}: it has no permission prompts to skip",
                spec.agent.name
            ));
        }

        Plan {
            name: spec.name.clone(),
            backend: spec.backend,
            agent: spec.agent,
            names,
            labels,
            proxy_image: images::proxy_image(
                inputs,
                spec.images.proxy_base_image.as_deref(),
                images::DEBIAN_BASE,
            ),
            agent_image: images::agent_image(spec.agent, &spec.images.base_image, inputs, custom),
            base_build: custom.base_build.clone(),
            rebuild: spec.images.rebuild,
            proxy,
            agent_container: AgentPlan {
                argv,
                env,
                mounts,
                files: vec![InjectedFile {
                    path: GITCONFIG_PATH.to_owned(),
                    contents: gitconfig(spec.host.git_identity.as_ref()),
                    mode: 0o644,
                }],
                resources: spec.resources.clone(),
                hardening: Hardening {
                    uid: AGENT_UID,
                    gid: AGENT_GID,
                    drop_all_capabilities: true,
                    no_new_privileges: true,
                    init: true,
                },
            },
            git: spec.git,
            cluster: spec.cluster.clone(),
            warnings,
        }
    }

    /// The agent's full environment once the proxy's address is known: the plan's variables
    /// plus `HTTP_PROXY`/`HTTPS_PROXY` in both cases and `NO_PROXY` for loopback only.
    pub fn agent_env(&self, proxy_host: &str) -> BTreeMap<String, String> {
        let url = format!("http://{proxy_host}:{PROXY_PORT}");
        let mut env = self.agent_container.env.clone();
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.insert(k.to_owned(), url.clone());
        }
        for k in ["NO_PROXY", "no_proxy"] {
            env.insert(k.to_owned(), "localhost,127.0.0.1".to_owned());
        }
        env
    }

    /// The labels of one object: the common ones plus its role.
    pub fn labels_for(&self, role: Role) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.insert(labels::ROLE.to_owned(), role.as_str().to_owned());
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents;
    use crate::cli::CreateArgs;
    use crate::spec::HostContext;
    use std::sync::Arc;

    fn inputs() -> ImageInputs {
        ImageInputs {
            proxy_binary: Arc::new(b"proxy".to_vec()),
            proxy_identity: "paude-proxy build test".into(),
            proxy_is_static: true,
            ca_bundle: None,
        }
    }

    fn args(agent: &str) -> CreateArgs {
        CreateArgs {
            name: Some("demo".into()),
            agent: agent.into(),
            memory: "4g".into(),
            pids_limit: 512,
            base_image: "localhost/paude-test-base:bookworm".into(),
            pvc_size: "10Gi".into(),
            ..CreateArgs::default()
        }
    }

    fn plan_with(a: CreateArgs, host: HostContext) -> Plan {
        let spec = SessionSpec::from_args(&a, BackendKind::Podman, host).unwrap();
        Plan::new(&spec, &inputs(), &Customisation::default())
    }

    fn host() -> HostContext {
        HostContext {
            cwd: "/src/demo".into(),
            ..HostContext::default()
        }
    }

    #[test]
    fn names_and_labels() {
        let plan = plan_with(args("shell"), host());
        assert_eq!(plan.names.internal_network, "paude-demo-internal");
        assert_eq!(plan.names.egress_network, "paude-demo-egress");
        assert!(plan.names.owns_egress_network);
        assert_eq!(plan.names.proxy, "paude-demo-proxy");
        assert_eq!(plan.names.agent, "paude-demo-agent");
        assert_eq!(plan.names.data, "paude-demo-data");
        assert_eq!(plan.names.git_remote, "paude-demo");
        let l = plan.labels_for(Role::Proxy);
        assert_eq!(l["paude.session"], "demo");
        assert_eq!(l["paude.role"], "proxy");
        assert_eq!(l["paude.backend"], "podman");
        assert_eq!(l["paude.agent"], "shell");
        assert_eq!(l["paude.workspace"], "volume");
    }

    #[test]
    fn user_egress_network_is_not_owned() {
        let mut a = args("shell");
        a.egress_network = Some("testnet".into());
        let plan = plan_with(a, host());
        assert_eq!(plan.names.egress_network, "testnet");
        assert!(!plan.names.owns_egress_network);
    }

    #[test]
    fn proxy_config_toml() {
        let mut a = args("shell");
        a.allowed_domains = vec!["allowed.test".into()];
        a.proxy_resolve = vec!["allowed.test=10.89.7.2".into()];
        a.proxy_allow_cidr = vec!["10.89.7.0/24".into()];
        let plan = plan_with(a, host());
        let bound = plan.proxy.bound_to(
            "10.89.9.2".parse().unwrap(),
            &["10.89.9.0/24".parse().unwrap()],
        );
        assert_eq!(
            bound.to_toml(),
            "# Written by paude-launch; `paude-launch allowed-domains` edits it.\n\
             listen = \"10.89.9.2:3128\"\n\
             admin_listen = \"127.0.0.1:9090\"\n\
             audit_log = \"-\"\n\
             allow = [\"allowed.test\"]\n\
             resolve = [\"allowed.test=10.89.7.2\"]\n\
             allow_cidr = [\"10.89.7.0/24\"]\n\
             allow_client = [\"10.89.9.0/24\"]\n"
        );
        assert_eq!(ProxyConfig::from_toml(&bound.to_toml()).unwrap(), bound);
    }

    #[test]
    fn default_allowlist_brings_the_agents_groups() {
        let claude = agents::find("claude").unwrap();
        assert_eq!(
            effective_allowlist(&[], claude, |_| None),
            ["default", "claude"]
        );
        let vertex = |k: &str| (k == "CLAUDE_CODE_USE_VERTEX").then(|| "1".to_owned());
        assert_eq!(
            effective_allowlist(&[], claude, vertex),
            ["default", "claude", "vertexai"]
        );
        let items = [
            AllowItem::Default,
            AllowItem::Pattern(".example.com".into()),
        ];
        assert_eq!(
            effective_allowlist(&items, claude, |_| None),
            ["default", "claude", ".example.com"]
        );
        // Without `default` the user's list replaces the defaults entirely.
        let items = [AllowItem::Group("vertexai".into())];
        assert_eq!(effective_allowlist(&items, claude, |_| None), ["vertexai"]);
    }

    #[test]
    fn allowlist_edits() {
        let cur = vec!["default".to_owned(), "claude".to_owned()];
        let add = [AllowItem::Pattern(".example.com".into())];
        assert_eq!(
            edit_allowlist(&cur, &add, &[]).unwrap(),
            ["default", "claude", ".example.com"]
        );
        assert_eq!(
            edit_allowlist(&cur, &[], &[AllowItem::Default]).unwrap(),
            ["claude"]
        );
        let err = edit_allowlist(&cur, &[], &[AllowItem::Group("github".into())]).unwrap_err();
        assert!(err
            .to_string()
            .contains("'github' is not in the session's allowlist"));
        let all = [AllowItem::Default, AllowItem::Group("claude".into())];
        let err = edit_allowlist(&cur, &[], &all).unwrap_err();
        assert!(err.to_string().contains("built-in default list"));
    }

    #[test]
    fn agent_env_has_the_proxy_in_both_cases() {
        let mut h = host();
        h.env.insert("ANTHROPIC_API_KEY".into(), "k".into());
        h.env.insert("SECRET_UNRELATED".into(), "s".into());
        let plan = plan_with(args("claude"), h);
        let env = plan.agent_env("10.89.9.2");
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            assert_eq!(env[k], "http://10.89.9.2:3128");
        }
        assert_eq!(env["NO_PROXY"], "localhost,127.0.0.1");
        assert_eq!(env["no_proxy"], "localhost,127.0.0.1");
        assert_eq!(env["ANTHROPIC_API_KEY"], "k");
        assert!(!env.contains_key("SECRET_UNRELATED"));
    }

    #[test]
    fn agent_command_and_hardening() {
        let mut a = args("claude");
        a.yolo = true;
        a.agent_args = vec!["-p".into(), "task".into()];
        let plan = plan_with(a, host());
        assert_eq!(
            plan.agent_container.argv,
            ["claude", "--dangerously-skip-permissions", "-p", "task"]
        );
        let h = &plan.agent_container.hardening;
        assert_eq!((h.uid, h.gid), (1000, 1000));
        assert!(h.drop_all_capabilities && h.no_new_privileges && h.init);
        assert_eq!(plan.agent_container.resources.pids_limit, 512);
        assert_eq!(plan.agent_container.resources.memory_bytes, 4 << 30);
    }

    #[test]
    fn mounts_only_what_was_asked() {
        let plan = plan_with(args("claude"), host());
        assert!(plan.agent_container.mounts.is_empty());
        let mut a = args("claude");
        a.mount = true;
        let mut h = host();
        h.home = Some("/home/u".into());
        h.existing_home_dirs = vec![".config/gcloud".into()];
        let plan = plan_with(a, h);
        assert_eq!(
            plan.agent_container.mounts,
            [
                Mount {
                    source: "/src/demo".into(),
                    target: "/home/paude/workspace".into(),
                    read_only: false
                },
                Mount {
                    source: "/home/u/.config/gcloud".into(),
                    target: "/home/paude/.config/gcloud".into(),
                    read_only: true
                },
            ]
        );
    }

    #[test]
    fn gitconfig_carries_identity_only() {
        let id = ("Ann \"A\" Dev".to_owned(), "ann@example.com".to_owned());
        let cfg = gitconfig(Some(&id));
        assert!(cfg.contains("name = \"Ann \\\"A\\\" Dev\""), "{cfg}");
        assert!(cfg.contains("email = \"ann@example.com\""));
        assert!(!cfg.contains("[credential"));
        assert!(cfg.contains("directory = /workspace"));
    }

    #[test]
    fn yolo_with_an_agent_that_has_no_yolo_flag_warns_that_it_does_nothing() {
        let mut a = args("shell");
        a.yolo = true;
        let plan = plan_with(a, host());
        assert_eq!(
            plan.warnings,
            ["--yolo has no effect with --agent shell: it has no permission prompts to skip"]
        );
        assert_eq!(plan.agent_container.argv, ["bash", "-l"]);
        let mut a = args("claude");
        a.yolo = true;
        assert!(plan_with(a, host()).warnings.is_empty());
    }

    #[test]
    fn yolo_with_all_warns() {
        let mut a = args("claude");
        a.yolo = true;
        a.allowed_domains = vec!["all".into()];
        let plan = plan_with(a, host());
        assert_eq!(plan.warnings.len(), 1);
    }
}
