//! The agents paude-launch can run, as data: how each is installed into the agent image, how it
//! is launched inside tmux, its `--yolo` flag, the allowlist groups it needs and the host
//! environment it may see. Adding an agent means adding an entry here, never a code path.

use std::fmt;

/// One agent the launcher knows how to install and start.
#[derive(Debug, PartialEq, Eq)]
pub struct Agent {
    /// The name users pass to `--agent` and that appears in image tags and labels.
    pub name: &'static str,
    /// Shell lines run as root while building the agent image, after the common tools are in.
    pub install: &'static [&'static str],
    /// The program and fixed arguments started in the session's tmux.
    pub command: &'static [&'static str],
    /// The flag that makes the agent act without asking, added by `--yolo`.
    pub yolo_flag: Option<&'static str>,
    /// Allowlist groups the agent needs to work at all (added when `default` is allowed).
    pub domain_groups: &'static [&'static str],
    /// Groups added only when a host variable is set, as (variable, group).
    pub conditional_groups: &'static [(&'static str, &'static str)],
    /// Host environment variables passed into the agent container when they are set.
    pub passthrough_env: &'static [&'static str],
    /// Host directories (relative to the host home) mounted read-only at the same place
    /// under the agent's home, when they exist: cloud credentials the agent reads.
    pub readonly_home_mounts: &'static [&'static str],
}

/// The shell lines that make Node.js and npm available, from the base image or from Debian.
const NODE: &str = "command -v npm >/dev/null || \
     (apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*)";

/// Variables that select and authenticate Vertex AI, shared by the Google-hosted agents.
const VERTEX_ENV: [&str; 5] = [
    "CLAUDE_CODE_USE_VERTEX",
    "ANTHROPIC_VERTEX_PROJECT_ID",
    "GOOGLE_CLOUD_PROJECT",
    "CLOUD_ML_REGION",
    "GOOGLE_CLOUD_LOCATION",
];

/// Every agent, the default first.
pub const AGENTS: &[Agent] = &[
    Agent {
        name: "claude",
        install: &[
            NODE,
            "npm install -g @anthropic-ai/claude-code && npm cache clean --force",
        ],
        command: &["claude"],
        yolo_flag: Some("--dangerously-skip-permissions"),
        domain_groups: &["claude"],
        conditional_groups: &[("CLAUDE_CODE_USE_VERTEX", "vertexai")],
        passthrough_env: &[
            VERTEX_ENV[0],
            VERTEX_ENV[1],
            VERTEX_ENV[2],
            VERTEX_ENV[3],
            VERTEX_ENV[4],
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_MODEL",
        ],
        readonly_home_mounts: &[".config/gcloud"],
    },
    Agent {
        name: "gemini",
        install: &[
            NODE,
            "npm install -g @google/gemini-cli && npm cache clean --force",
        ],
        command: &["gemini"],
        yolo_flag: Some("--yolo"),
        domain_groups: &["gemini", "vertexai"],
        conditional_groups: &[],
        passthrough_env: &[
            "GEMINI_API_KEY",
            "GOOGLE_API_KEY",
            "GOOGLE_GENAI_USE_VERTEXAI",
            VERTEX_ENV[2],
            VERTEX_ENV[4],
        ],
        readonly_home_mounts: &[".config/gcloud"],
    },
    Agent {
        name: "codex",
        install: &[
            NODE,
            "npm install -g @openai/codex && npm cache clean --force",
        ],
        command: &["codex"],
        yolo_flag: Some("--dangerously-bypass-approvals-and-sandbox"),
        domain_groups: &["openai"],
        conditional_groups: &[],
        passthrough_env: &["OPENAI_API_KEY", "OPENAI_BASE_URL"],
        readonly_home_mounts: &[],
    },
    Agent {
        name: "shell",
        install: &[],
        command: &["bash", "-l"],
        yolo_flag: None,
        domain_groups: &[],
        conditional_groups: &[],
        passthrough_env: &[],
        readonly_home_mounts: &[],
    },
];

/// The agent used when `--agent` is not given.
pub const DEFAULT_AGENT: &str = "claude";

/// Finds an agent by name, or says which names exist.
pub fn find(name: &str) -> Result<&'static Agent, UnknownAgent> {
    AGENTS
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| UnknownAgent(name.to_owned()))
}

/// The error for an `--agent` value that names no agent.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownAgent(pub String);

impl fmt::Display for UnknownAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = AGENTS.iter().map(|a| a.name).collect();
        write!(
            f,
            "unknown agent '{}': choose one of {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownAgent {}

impl Agent {
    /// The groups this agent adds to `default`, given a lookup of host variables.
    pub fn groups(&self, host_env: impl Fn(&str) -> Option<String>) -> Vec<&'static str> {
        let mut groups: Vec<&'static str> = self.domain_groups.to_vec();
        for (var, group) in self.conditional_groups {
            if host_env(var).is_some_and(|v| !v.is_empty()) && !groups.contains(group) {
                groups.push(group);
            }
        }
        groups
    }

    /// The full command line started in tmux: the agent, its yolo flag, then the user's args.
    pub fn argv(&self, yolo: bool, extra: &[String]) -> Vec<String> {
        let mut argv: Vec<String> = self.command.iter().map(|s| (*s).to_owned()).collect();
        if yolo {
            if let Some(flag) = self.yolo_flag {
                argv.push(flag.to_owned());
            }
        }
        argv.extend(extra.iter().cloned());
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_agent_exists() {
        assert_eq!(find(DEFAULT_AGENT).unwrap().name, "claude");
    }

    #[test]
    fn unknown_agent_lists_the_choices() {
        let err = find("vim").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown agent 'vim': choose one of claude, gemini, codex, shell"
        );
    }

    #[test]
    fn claude_yolo_skips_permissions_and_keeps_user_args() {
        let argv = find("claude")
            .unwrap()
            .argv(true, &["-p".into(), "fix it".into()]);
        assert_eq!(
            argv,
            ["claude", "--dangerously-skip-permissions", "-p", "fix it"]
        );
    }

    #[test]
    fn shell_has_no_yolo_flag() {
        assert_eq!(find("shell").unwrap().argv(true, &[]), ["bash", "-l"]);
    }

    #[test]
    fn vertex_group_only_when_host_uses_vertex() {
        let claude = find("claude").unwrap();
        assert_eq!(claude.groups(|_| None), ["claude"]);
        let with_vertex = claude.groups(|v| (v == "CLAUDE_CODE_USE_VERTEX").then(|| "1".into()));
        assert_eq!(with_vertex, ["claude", "vertexai"]);
    }
}
