//! The `Backend` trait every engine implements, the session summary it reports, and the factory
//! that picks a backend from `--backend`. A backend only renders and applies a [`Plan`]: names,
//! labels, images, proxy configuration, environment and hardening are decided in `plan.rs`.
//!
//! Invariants every backend keeps:
//! - Sessions are found through the `paude.session` / `paude.role` labels (see
//!   [`crate::plan::labels`]) on the engine's own objects; there is no local state file.
//! - The agent can reach nothing but its proxy's port 3128: no other route out, no DNS that
//!   forwards outside, no access to the proxy's admin listener.
//! - Every error says what happened and what to do next (lowercase, no trailing period), and a
//!   failed call leaves what existed before untouched.

use std::time::SystemTime;

use anyhow::Result;
use async_trait::async_trait;

use crate::cli::{BackendKind, Global};
use crate::plan::Plan;
use crate::progress::{BuildProgress, Mode};
use crate::spec::SessionName;

pub mod engine;
pub mod hints;
pub mod isolation;
pub mod openshift;
pub mod podman;

/// The state of a session as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Agent and proxy are running.
    Running,
    /// Agent and proxy are stopped; the data volume is kept.
    Stopped,
    /// Only part of the session runs; the text says what.
    Degraded(String),
    /// Objects of the session are missing (a create was interrupted, a container removed):
    /// the text says what. Creating the session again finishes it and keeps its volume.
    Incomplete(String),
}

impl SessionState {
    /// A short word for tables.
    pub fn label(&self) -> &str {
        match self {
            SessionState::Running => "running",
            SessionState::Stopped => "stopped",
            SessionState::Degraded(_) => "degraded",
            SessionState::Incomplete(_) => "incomplete",
        }
    }
}

/// How an incomplete session is finished, for every message that meets one: the create
/// converges, so nothing suggests a delete (which would take the workspace with it).
pub fn finish_hint(name: &impl std::fmt::Display) -> String {
    format!(
        "finish it with `paude-launch create {name}` and the options it was made with; its \
         workspace volume is kept"
    )
}

/// One session as `list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session's name.
    pub name: SessionName,
    /// The backend it runs on.
    pub backend: BackendKind,
    /// Running, stopped or degraded.
    pub state: SessionState,
    /// The agent's name (from the `paude.agent` label).
    pub agent: String,
    /// The proxy's current allowlist, read from its live configuration.
    pub allowlist: Vec<String>,
    /// When the session was created, if the engine knows.
    pub created: Option<SystemTime>,
    /// Further lines for `status`, as (what, value): images, addresses, volume, workspace.
    pub details: Vec<(String, String)>,
}

/// The output of a command run in the agent container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code.
    pub code: i64,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

/// Progress lines for slow steps, on stderr; details only with `-v`.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Whether `-v` was given.
    pub verbose: bool,
}

impl Progress {
    /// A step the user waits for ("building image ...").
    pub fn step(&self, msg: impl AsRef<str>) {
        eprintln!("paude: {}", msg.as_ref());
    }

    /// A detail shown only with `-v` (engine build output, API calls).
    pub fn detail(&self, msg: impl AsRef<str>) {
        if self.verbose {
            eprintln!("  {}", msg.as_ref());
        }
    }

    /// Starts showing the build of an image on stderr (see [`crate::progress`]).
    pub fn build(&self, reference: &str) -> BuildProgress<std::io::Stderr> {
        let width = crossterm::terminal::size().map_or(0, |(columns, _)| usize::from(columns));
        BuildProgress::start(
            std::io::stderr(),
            Mode::for_stderr(self.verbose),
            width,
            reference,
            std::time::Instant::now(),
        )
    }
}

/// What every engine does for paude-launch. The doc of each method is the specification both
/// backends follow; the end-to-end and fake-API tests check them.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Renders every object `create` would make for `plan`, as text a person can review
    /// (Podman: a readable list of images, networks, containers and volume with their settings;
    /// cluster: every manifest as YAML). Contacts no engine and changes nothing.
    fn render(&self, plan: &Plan) -> Result<String>;

    /// Makes sure both images of `plan` exist under their hash tags: builds each missing one
    /// from its context (or every one with `plan.rebuild`), reporting progress. A failed build
    /// returns an error that includes the last lines of the build log.
    async fn ensure_images(&self, plan: &Plan, progress: Progress) -> Result<()>;

    /// Creates every object of the session and starts it: networks or network policies, the
    /// data volume, the proxy (its configuration bound to its address, reachable only by the
    /// agent), then the agent (with [`Plan::agent_env`] for the proxy's address, mounts, files,
    /// limits and hardening). Create converges: objects a killed or failed create left, or a
    /// container removed since, are kept (the data volume with the work in it above all) and
    /// what is missing is made from the plan. Errors with "session NAME already exists" when
    /// the session is complete. A create that fails removes what it made itself, and only
    /// that; so does one interrupted ([`crate::interrupt`]), at its next step. Images must
    /// already exist (see [`Backend::ensure_images`]).
    async fn create(&self, plan: &Plan, progress: Progress) -> Result<()>;

    /// Starts a stopped session (proxy first, then agent); a running session is left as is.
    /// Errors with "no session named NAME" when it does not exist.
    async fn start(&self, name: &SessionName) -> Result<()>;

    /// Stops a session (agent first, then proxy), keeping its data volume.
    async fn stop(&self, name: &SessionName) -> Result<()>;

    /// Removes every object labelled with the session, data volume included, and networks it
    /// created. After it, nothing of the session is left. Unknown name: "no session named NAME".
    async fn delete(&self, name: &SessionName, progress: Progress) -> Result<()>;

    /// Every session on this engine (or namespace), sorted by name.
    async fn list(&self) -> Result<Vec<SessionInfo>>;

    /// One session. Unknown name: an error "no session named NAME" that suggests `list`.
    async fn status(&self, name: &SessionName) -> Result<SessionInfo>;

    /// Attaches the caller's terminal to the agent's tmux session `paude` with a real TTY
    /// (raw mode, window size, detach with Ctrl-b d) and returns when the user detaches.
    async fn connect(&self, name: &SessionName) -> Result<()>;

    /// Runs `argv` in the agent container as the agent user in the workspace, piping this
    /// process's stdin and stdout to it byte for byte (no TTY; stderr to our stderr), and
    /// returns its exit code. The git bridge uses this; stdout must carry nothing else.
    async fn exec_piped(&self, name: &SessionName, argv: &[String]) -> Result<i64>;

    /// Runs `argv` in the agent container as the agent user and returns its output.
    async fn exec_capture(&self, name: &SessionName, argv: &[String]) -> Result<ExecOutput>;

    /// The proxy's current configuration file (TOML written by [`crate::plan::ProxyConfig`]).
    async fn proxy_config(&self, name: &SessionName) -> Result<String>;

    /// Replaces the proxy's configuration file and makes the running proxy reload it in place
    /// (no restart of the proxy or the agent; open connections survive). A configuration the
    /// proxy would refuse (unknown group, bad pattern) is an error and changes nothing.
    async fn update_proxy_config(&self, name: &SessionName, toml: &str) -> Result<()>;

    /// The proxy's audit log: JSON lines as paude-proxy wrote them to stdout, oldest first.
    async fn proxy_audit_log(&self, name: &SessionName) -> Result<String>;
}

/// Opens the backend chosen by `--backend`. Opening must not contact the engine (`--dry-run`
/// renders without one); a backend connects on the first call that needs it.
pub async fn open(global: &Global) -> Result<Box<dyn Backend>> {
    match global.backend {
        BackendKind::Podman => Ok(Box::new(podman::Podman::new(global))),
        BackendKind::Openshift => Ok(Box::new(openshift::OpenShiftBackend::open(global).await?)),
    }
}
