//! The command line as parsed by clap: raw flags and arguments only. Validation and defaults
//! that need the environment live in `spec.rs`, which turns these values into a checked
//! `SessionSpec`.

use std::path::PathBuf;

use clap::builder::styling::Style;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// The help heading of flags only the Podman backend uses.
const PODMAN: &str = "Podman options";
/// The help heading of flags only the cluster backend uses.
const CLUSTER: &str = "Cluster options (--backend openshift)";

/// The examples under `run --help` and `create --help`, with a heading styled like clap's own.
fn examples(verb: &str) -> String {
    let heading = Style::new().bold().underline();
    let examples: &[(&str, &str)] = &[
        ("the default agent (claude) on this directory's session", ""),
        (
            "act without asking, and push this branch in",
            " --yolo --git",
        ),
        (
            "a plain shell on this directory itself",
            " --agent shell --mount",
        ),
        (
            "allow one more domain",
            " --allowed-domains default --allowed-domains .example.com",
        ),
        (
            "no registry here: start from a local base image",
            " --base-image localhost/debian:12 --proxy-base-image localhost/debian:12",
        ),
        (
            "the same on a cluster",
            " my-project --backend openshift --git",
        ),
        ("print what would be made, and touch nothing", " --dry-run"),
        (
            "arguments after -- go to the agent",
            " -- -p \"fix the tests\"",
        ),
    ];
    let mut out = format!("{heading}Examples:{heading:#}\n");
    for (what, args) in examples {
        out.push_str(&format!("  # {what}\n  paude-launch {verb}{args}\n"));
    }
    out.push_str("\nDetach from the agent with Ctrl-b d; `paude-launch connect NAME` comes back.");
    out
}

/// Runs AI coding agents in a container whose only way out is paude-proxy.
#[derive(Debug, Parser)]
#[command(name = "paude-launch", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    /// What to do; without one, list the sessions.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags every subcommand accepts.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Where sessions run: podman (local Podman or Docker) or openshift (an OpenShift or
    /// Kubernetes cluster from the current kubeconfig context).
    #[arg(long, global = true, env = "PAUDE_BACKEND", value_enum, default_value_t = BackendKind::Podman, hide_possible_values = true)]
    pub backend: BackendKind,
    /// Print every resource that would be created or changed, and touch nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Show each step and the engine's build output.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// The namespace (default: the kubeconfig context's namespace).
    #[arg(long, global = true, value_name = "NAMESPACE", help_heading = CLUSTER)]
    pub namespace: Option<String>,
    /// The kubeconfig context (default: the current context).
    #[arg(long, global = true, value_name = "CONTEXT", help_heading = CLUSTER)]
    pub context: Option<String>,
}

/// The engines a session can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Local Podman (or Docker) through its Docker-compatible API socket.
    Podman,
    /// An OpenShift or Kubernetes cluster from the current kubeconfig context.
    Openshift,
}

impl BackendKind {
    /// The name used on the command line and in labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Podman => "podman",
            BackendKind::Openshift => "openshift",
        }
    }
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the session if it does not exist, start it and attach to the agent.
    #[command(after_help = examples("run"))]
    Run(CreateArgs),
    /// Create and start a session without attaching.
    #[command(after_help = examples("create"))]
    Create(CreateArgs),
    /// Start a stopped session (the agent resumes in tmux).
    Start(NameArg),
    /// Stop a session; its workspace and home are kept.
    Stop(NameArg),
    /// Attach to the agent's tmux session (detach with Ctrl-b d).
    Connect(NameArg),
    /// List sessions.
    List,
    /// Show one session in detail.
    Status(NameArg),
    /// Remove every resource of a session, including its workspace volume.
    Delete(DeleteArgs),
    /// Manage the git remote that syncs with a session.
    Remote {
        #[command(subcommand)]
        action: RemoteAction,
    },
    /// Show or change the domains a running session may reach (the proxy reloads in place).
    AllowedDomains(AllowedDomainsArgs),
    /// Show what the session's proxy refused, from its audit log.
    Blocked(NameArg),
    /// Pipe stdin and stdout through a command in the agent container (git's ext:: transport).
    #[command(hide = true)]
    GitBridge(GitBridgeArgs),
}

/// A session name argument.
#[derive(Debug, Args)]
pub struct NameArg {
    /// The session's name.
    pub name: String,
}

/// `delete NAME --confirm`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The session's name.
    pub name: String,
    /// Required: deleting removes the workspace volume and everything in it.
    #[arg(long)]
    pub confirm: bool,
}

/// `remote add [--push] NAME`.
#[derive(Debug, Subcommand)]
pub enum RemoteAction {
    /// Add the git remote `paude-NAME` to the repository in the current directory.
    Add {
        /// Also initialise the session's repository and push the current branch and tags.
        #[arg(long)]
        push: bool,
        /// The session's name.
        name: String,
    },
}

/// `allowed-domains NAME [--add X]... [--remove X]...`.
#[derive(Debug, Args)]
pub struct AllowedDomainsArgs {
    /// The session's name.
    pub name: String,
    /// A group name or domain pattern to allow (repeatable).
    #[arg(long = "add", value_name = "ITEM")]
    pub add: Vec<String>,
    /// A group name or domain pattern to stop allowing (repeatable).
    #[arg(long = "remove", value_name = "ITEM")]
    pub remove: Vec<String>,
}

/// `git-bridge NAME -- CMD...`.
#[derive(Debug, Args)]
pub struct GitBridgeArgs {
    /// The session's name.
    pub name: String,
    /// The command git asks for, run in the agent container.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Everything `create` and `run` accept.
#[derive(Debug, Args, Clone, Default)]
pub struct CreateArgs {
    /// Session name (default: derived from the current directory's name).
    pub name: Option<String>,
    /// The agent to run: claude, gemini, codex or shell.
    #[arg(long, default_value = crate::agents::DEFAULT_AGENT)]
    pub agent: String,
    /// Let the agent act without asking for permission (its network stays filtered).
    #[arg(long)]
    pub yolo: bool,
    /// A group (default, all, claude, pypi, github, ...) or a domain pattern (example.com,
    /// .example.com, *.example.com) to allow; repeatable. Without `default` the list replaces
    /// the default allowlist.
    #[arg(long = "allowed-domains", value_name = "ITEM")]
    pub allowed_domains: Vec<String>,
    /// Add the git remote paude-NAME and push the current branch and tags into the session.
    #[arg(long)]
    pub git: bool,
    /// Bind-mount the current directory as the workspace instead of using the session volume.
    #[arg(long, help_heading = PODMAN)]
    pub mount: bool,
    /// Rebuild the images even when their inputs did not change.
    #[arg(long)]
    pub rebuild: bool,
    /// Memory limit of the agent (e.g. 4g, 512m).
    #[arg(long, default_value = "8g")]
    pub memory: String,
    /// CPU limit of the agent (e.g. 2, 0.5); unlimited when not given.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Maximum number of processes in the agent container.
    #[arg(long, default_value_t = 2048)]
    pub pids_limit: i64,
    /// Base image of the agent image.
    #[arg(
        long,
        value_name = "IMAGE",
        default_value = "docker.io/library/debian:bookworm-slim"
    )]
    pub base_image: String,
    /// Base image of the proxy image (default: scratch for a static paude-proxy, else Debian).
    #[arg(long, value_name = "IMAGE")]
    pub proxy_base_image: Option<String>,
    /// An extra CA bundle (PEM) trusted during image builds and inside the agent.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// Pin a name for the session's proxy, like curl's --resolve (repeatable).
    #[arg(long, value_name = "HOST=IP")]
    pub proxy_resolve: Vec<String>,
    /// Let the session's proxy reach addresses in this network (repeatable).
    #[arg(long, value_name = "CIDR")]
    pub proxy_allow_cidr: Vec<String>,
    /// Attach the proxy's outbound side to this existing network instead of creating one.
    #[arg(long, value_name = "NAME", help_heading = PODMAN)]
    pub egress_network: Option<String>,
    /// Size of the workspace volume claim.
    #[arg(long, value_name = "SIZE", default_value = "10Gi", help_heading = CLUSTER)]
    pub pvc_size: String,
    /// Storage class of the workspace volume claim.
    #[arg(long, value_name = "CLASS", help_heading = CLUSTER)]
    pub storage_class: Option<String>,
    /// Kubernetes without OpenShift builds: the registry images are pushed to and pulled from.
    #[arg(long, value_name = "REGISTRY", help_heading = CLUSTER)]
    pub registry: Option<String>,
    /// Arguments passed to the agent.
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_help_groups_common_podman_and_cluster_flags_then_examples() {
        let mut cli = Cli::command();
        // Building propagates the global flags into the subcommands, as parsing does.
        cli.build();
        let run = cli.find_subcommand_mut("run").unwrap();
        let help = run.render_help().to_string();
        let at = |needle: &str| {
            help.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} missing:\n{help}"))
        };
        let (podman, cluster, examples) = (
            at("\nPodman options:"),
            at(&format!("\n{CLUSTER}:")),
            at("\nExamples:"),
        );
        assert!(
            at("\nOptions:") < podman && podman < cluster && cluster < examples,
            "{help}"
        );
        for common in [
            "--agent",
            "--yolo",
            "--allowed-domains",
            "--base-image",
            "--dry-run",
        ] {
            assert!(
                at(common) < podman,
                "{common} is not with the common flags:\n{help}"
            );
        }
        for flag in ["--egress-network", "--mount"] {
            assert!((podman..cluster).contains(&at(flag)), "{flag}:\n{help}");
        }
        for flag in [
            "--pvc-size",
            "--storage-class",
            "--registry",
            "--namespace",
            "--context",
        ] {
            assert!((cluster..examples).contains(&at(flag)), "{flag}:\n{help}");
        }
        assert!(
            help[examples..].contains("paude-launch run --yolo --git"),
            "{help}"
        );
    }

    #[test]
    fn bare_invocation_means_list() {
        let cli = Cli::try_parse_from(["paude-launch"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.global.backend, BackendKind::Podman);
    }

    #[test]
    fn run_takes_agent_args_after_double_dash() {
        let cli = Cli::try_parse_from([
            "paude-launch",
            "run",
            "demo",
            "--yolo",
            "--allowed-domains",
            "default",
            "--allowed-domains",
            ".example.com",
            "--",
            "-p",
            "refactor",
        ])
        .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.name.as_deref(), Some("demo"));
        assert!(args.yolo);
        assert_eq!(args.allowed_domains, ["default", ".example.com"]);
        assert_eq!(args.agent_args, ["-p", "refactor"]);
    }

    #[test]
    fn global_flags_work_after_the_verb() {
        let cli =
            Cli::try_parse_from(["paude-launch", "list", "--backend", "openshift", "-v"]).unwrap();
        assert_eq!(cli.global.backend, BackendKind::Openshift);
        assert!(cli.global.verbose);
    }

    #[test]
    fn git_bridge_is_parsed() {
        let cli = Cli::try_parse_from([
            "paude-launch",
            "git-bridge",
            "--backend",
            "podman",
            "demo",
            "--",
            "git-upload-pack",
            "/workspace",
        ])
        .unwrap();
        let Some(Command::GitBridge(args)) = cli.command else {
            panic!("expected git-bridge")
        };
        assert_eq!(args.command, ["git-upload-pack", "/workspace"]);
    }
}
