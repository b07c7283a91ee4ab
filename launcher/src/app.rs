//! The verbs: each subcommand as a short script over the validated spec, the plan and the
//! `Backend` trait. Everything here is backend-neutral; output for people is formatted here.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::backend::{self, Backend, Progress, SessionInfo};
use crate::cli::{AllowedDomainsArgs, Cli, Command, CreateArgs, Global, RemoteAction};
use crate::customise;
use crate::git;
use crate::images::{self, ImageInputs};
use crate::plan::{edit_allowlist, Plan, ProxyConfig};
use crate::spec::{AllowItem, HostContext, SessionName, SessionSpec};

/// Runs one invocation and returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    let global = cli.global;
    let progress = Progress {
        verbose: global.verbose,
    };
    match cli.command.unwrap_or(Command::List) {
        Command::Run(args) => run_session(&global, &args, progress).await,
        Command::Create(args) => create(&global, &args, progress).await.map(|_| 0),
        Command::Start(a) => {
            let name = SessionName::parse(&a.name)?;
            if global.dry_run {
                println!("would start session {name}");
                return Ok(0);
            }
            let backend = backend::open(&global).await?;
            backend.start(&name).await?;
            println!("session {name} is running: attach with `paude-launch connect {name}`");
            Ok(0)
        }
        Command::Stop(a) => {
            let name = SessionName::parse(&a.name)?;
            if global.dry_run {
                println!("would stop session {name}, keeping its workspace");
                return Ok(0);
            }
            backend::open(&global).await?.stop(&name).await?;
            println!(
                "session {name} is stopped; its workspace is kept (`paude-launch start {name}`)"
            );
            Ok(0)
        }
        Command::Connect(a) => {
            let name = SessionName::parse(&a.name)?;
            let backend = backend::open(&global).await?;
            connect(backend.as_ref(), &name).await.map(|_| 0)
        }
        Command::List => list(&global).await.map(|_| 0),
        Command::Status(a) => {
            let name = SessionName::parse(&a.name)?;
            let info = backend::open(&global).await?.status(&name).await?;
            print!("{}", format_status(&info, SystemTime::now()));
            Ok(0)
        }
        Command::Delete(a) => {
            let name = SessionName::parse(&a.name)?;
            if !a.confirm {
                bail!(
                    "deleting session {name} removes its workspace volume and everything in it: \
                     pull what you need (`git pull paude-{name} BRANCH`), then run \
                     `paude-launch delete {name} --confirm`"
                );
            }
            if global.dry_run {
                println!("would delete every object of session {name}, its workspace included");
                return Ok(0);
            }
            let backend = backend::open(&global).await?;
            backend.delete(&name, progress).await?;
            println!("session {name} is deleted");
            if let Ok(cwd) = std::env::current_dir() {
                match git::remove_remote(&cwd, &name) {
                    Ok(true) => println!("removed the git remote paude-{name}"),
                    Ok(false) => {}
                    Err(e) => eprintln!(
                        "paude: warning: could not remove the git remote paude-{name}: {e:#}"
                    ),
                }
            }
            Ok(0)
        }
        Command::Remote {
            action: RemoteAction::Add { push, name },
        } => {
            let name = SessionName::parse(&name)?;
            let cwd = std::env::current_dir().context("cannot read the current directory")?;
            if global.dry_run {
                let url = git::remote_url(&git::bridge_program(), &global, &name);
                println!("would add the git remote paude-{name} = {url}");
                return Ok(0);
            }
            let backend = backend::open(&global).await?;
            backend.status(&name).await?;
            let remote = git::add_remote(&cwd, &global, &name)?;
            println!("added git remote {remote}");
            if push {
                git::push(&cwd, backend.as_ref(), &name).await?;
                println!("pushed the current branch and tags to session {name}");
            }
            Ok(0)
        }
        Command::AllowedDomains(a) => allowed_domains(&global, &a).await.map(|_| 0),
        Command::Blocked(a) => {
            let name = SessionName::parse(&a.name)?;
            let backend = backend::open(&global).await?;
            backend.status(&name).await?;
            let log = backend.proxy_audit_log(&name).await?;
            print!("{}", format_blocked(&name, &log));
            Ok(0)
        }
        Command::GitBridge(a) => {
            let name = SessionName::parse(&a.name)?;
            let backend = backend::open(&global).await?;
            let code = backend.exec_piped(&name, &a.command).await?;
            Ok(i32::try_from(code).unwrap_or(1))
        }
    }
}

/// The host facts a session needs, read once.
fn host_context(agent_home_dirs: &[&str]) -> Result<HostContext> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let home = env.get("HOME").map(PathBuf::from);
    let existing_home_dirs = home
        .as_ref()
        .map(|h| {
            agent_home_dirs
                .iter()
                .filter(|d| h.join(d).is_dir())
                .map(|d| (*d).to_owned())
                .collect()
        })
        .unwrap_or_default();
    Ok(HostContext {
        git_identity: git::host_identity(&cwd),
        cwd,
        env,
        home,
        existing_home_dirs,
    })
}

/// The paude-proxy binary of the proxy image and its identity: the one `PAUDE_PROXY_BIN` names
/// when set (a standalone build, e.g. a static one for a `scratch` image), else this very
/// paude-launch, which is paude-proxy when run under that name. No binary is looked up next to
/// paude-launch or on PATH: one that was built from other sources would silently run instead.
pub fn proxy_binary() -> Result<(Vec<u8>, String)> {
    if let Some(p) = std::env::var_os("PAUDE_PROXY_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "PAUDE_PROXY_BIN points to '{}', which is not a file: build one with \
                 `cargo build --release -p paude-proxy`, or unset it to use the proxy built into \
                 paude-launch",
                p.display()
            );
        }
        let bytes = std::fs::read(&p)
            .with_context(|| format!("cannot read the paude-proxy binary '{}'", p.display()))?;
        let identity = images::proxy_identity(&bytes);
        return Ok((bytes, identity));
    }
    // The running binary itself, even if its file was replaced since it started.
    let bytes = std::fs::read("/proc/self/exe")
        .or_else(|_| std::fs::read(std::env::current_exe()?))
        .context("cannot read this paude-launch binary, which is the proxy image's paude-proxy")?;
    Ok((bytes, images::builtin_proxy_identity()))
}

/// Loads the image inputs: the proxy binary and the optional CA bundle.
fn load_inputs(spec: &SessionSpec) -> Result<ImageInputs> {
    let (bytes, identity) = proxy_binary()?;
    let ca_bundle = match &spec.images.ca_bundle {
        Some(path) => Some(Arc::new(read_ca_bundle(path)?)),
        None => None,
    };
    Ok(ImageInputs {
        proxy_is_static: images::elf_is_static(&bytes),
        proxy_binary: Arc::new(bytes),
        proxy_identity: identity,
        ca_bundle,
    })
}

/// Reads a PEM CA bundle, refusing files that hold no certificate.
fn read_ca_bundle(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read --ca-bundle '{}'", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----") {
        bail!(
            "--ca-bundle '{}' holds no PEM certificate: give a file with \
             -----BEGIN CERTIFICATE----- blocks",
            path.display()
        );
    }
    Ok(bytes)
}

/// Validates and plans a `create`/`run` request.
fn plan_session(global: &Global, args: &CreateArgs) -> Result<Plan> {
    let agent = crate::agents::find(&args.agent)?;
    let host = host_context(agent.readonly_home_mounts)?;
    let spec = SessionSpec::from_args(args, global.backend, host)?;
    let inputs = load_inputs(&spec)?;
    let (custom, custom_warnings) = customise::load(&spec.host.cwd)?;
    let plan = Plan::new(&spec, &inputs, &custom);
    if let Some(source) = &custom.source {
        eprintln!("paude: customising the agent image from {source}");
        for cmd in &custom.setup {
            eprintln!("paude: {source} setup runs during the image build: {cmd}");
        }
    }
    for w in custom_warnings.iter().chain(&plan.warnings) {
        eprintln!("paude: warning: {w}");
    }
    Ok(plan)
}

/// `create`: plan, build images, create and start; then git sync with `--git`.
async fn create(global: &Global, args: &CreateArgs, progress: Progress) -> Result<SessionName> {
    let plan = plan_session(global, args)?;
    let backend = backend::open(global).await?;
    if global.dry_run {
        print!("{}", backend.render(&plan)?);
        return Ok(plan.name);
    }
    create_planned(global, backend.as_ref(), &plan, progress).await?;
    println!(
        "session {} is running: attach with `paude-launch connect {}`",
        plan.name, plan.name
    );
    Ok(plan.name)
}

/// Creates a planned session that must not exist yet, then sets up git when asked.
async fn create_planned(
    global: &Global,
    backend: &dyn Backend,
    plan: &Plan,
    progress: Progress,
) -> Result<()> {
    let incomplete = match backend.status(&plan.name).await {
        Ok(info) => match info.state {
            backend::SessionState::Incomplete(why) => Some(why),
            _ => None,
        },
        Err(_) => Some(String::new()),
    };
    if incomplete.is_none() {
        bail!(
            "session {} already exists: attach with `paude-launch connect {}` or remove it with \
             `paude-launch delete {} --confirm`",
            plan.name,
            plan.name,
            plan.name
        );
    }
    if let Some(why) = incomplete.filter(|w| !w.is_empty()) {
        progress.step(format!(
            "session {} is incomplete ({why}); finishing it, its workspace volume is kept",
            plan.name
        ));
    }
    backend.ensure_images(plan, progress).await?;
    // An interrupt (Ctrl-C, SIGTERM, SIGHUP) during the create makes it stop at its next step
    // and remove what it made, instead of leaving half a session; a kill -9 cannot be caught,
    // and the next create finishes what it left.
    let guard = crate::interrupt::guard();
    let created = backend.create(plan, progress).await;
    drop(guard);
    if crate::interrupt::was_fired() {
        bail!(
            "interrupted: what this create made was removed; run it again to create session {}",
            plan.name
        );
    }
    created?;
    if plan.git {
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        let remote = git::add_remote(&cwd, global, &plan.name)?;
        progress.step(format!("pushing the current branch and tags to {remote}"));
        git::push(&cwd, backend, &plan.name).await?;
    }
    Ok(())
}

/// `run`: create the session unless it exists, start it if stopped, then attach.
async fn run_session(global: &Global, args: &CreateArgs, progress: Progress) -> Result<i32> {
    let backend = backend::open(global).await?;
    if global.dry_run {
        let plan = plan_session(global, args)?;
        print!("{}", backend.render(&plan)?);
        return Ok(0);
    }
    let name = match &args.name {
        Some(n) => SessionName::parse(n)?,
        None => SessionName::from_dir(
            &std::env::current_dir().context("cannot read the current directory")?,
        )?,
    };
    // An existing session is resumed as it was created; only a new one needs a plan (and so
    // the image inputs).
    match backend.status(&name).await {
        Ok(info) if matches!(info.state, backend::SessionState::Incomplete(_)) => {
            let plan = plan_session(global, args)?;
            create_planned(global, backend.as_ref(), &plan, progress).await?;
        }
        Ok(info) => {
            if info.state != backend::SessionState::Running {
                progress.step(format!("starting session {name}"));
                backend.start(&name).await?;
            }
        }
        Err(_) => {
            let plan = plan_session(global, args)?;
            create_planned(global, backend.as_ref(), &plan, progress).await?;
        }
    }
    connect(backend.as_ref(), &name).await?;
    Ok(0)
}

/// Attaches to a running session.
async fn connect(backend: &dyn Backend, name: &SessionName) -> Result<()> {
    let info = backend.status(name).await?;
    if info.state != backend::SessionState::Running {
        bail!(
            "session {name} is {}: start it with `paude-launch start {name}`",
            info.state.label()
        );
    }
    // Attaching hands the terminal to tmux; without one there is nothing to attach, and waiting
    // would hang a script forever.
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!(
            "cannot attach to session {name}: this is not a terminal; run `paude-launch connect \
             {name}` from an interactive shell (the session keeps running meanwhile)"
        );
    }
    let inner = session_tmux_prefix(backend, name).await;
    let outer = host_tmux_prefix().await;
    eprintln!("{}", attach_hint(name, &inner, outer.as_deref()));
    backend.connect(name).await
}

/// tmux's default prefix key, which the agent's session uses unless its home holds a
/// `.tmux.conf` that changes it.
const DEFAULT_TMUX_PREFIX: &str = "C-b";

/// The prefix key of the agent's tmux session, as tmux names it (`C-b`).
async fn session_tmux_prefix(backend: &dyn Backend, name: &SessionName) -> String {
    let argv = ["tmux", "display-message", "-p", "-t", "paude", "#{prefix}"].map(str::to_owned);
    let asked = tokio::time::timeout(Duration::from_secs(10), backend.exec_capture(name, &argv));
    match asked.await {
        Ok(Ok(out)) if out.code == 0 => tmux_key(&String::from_utf8_lossy(&out.stdout)),
        _ => None,
    }
    .unwrap_or_else(|| DEFAULT_TMUX_PREFIX.to_owned())
}

/// The prefix key of the user's own tmux, when paude-launch runs inside one (`$TMUX`).
async fn host_tmux_prefix() -> Option<String> {
    if std::env::var_os("TMUX").is_none_or(|t| t.is_empty()) {
        return None;
    }
    let asked = tokio::process::Command::new("tmux")
        .args(["display-message", "-p", "#{prefix}"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let known = match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(out)) if out.status.success() => tmux_key(&String::from_utf8_lossy(&out.stdout)),
        _ => None,
    };
    // Inside a tmux that does not answer, its prefix is most likely the default one.
    Some(known.unwrap_or_else(|| DEFAULT_TMUX_PREFIX.to_owned()))
}

/// A key as tmux printed it, or `None` when there is none (`None`, empty).
fn tmux_key(printed: &str) -> Option<String> {
    let key = printed.trim();
    (!key.is_empty() && key != "None").then(|| key.to_owned())
}

/// A tmux key as people write it: `C-b` → `Ctrl-b`, `M-a` → `Alt-a`.
fn key_name(key: &str) -> String {
    let mut rest = key;
    let mut out = String::new();
    loop {
        if let Some(r) = rest.strip_prefix("C-") {
            out.push_str("Ctrl-");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("M-") {
            out.push_str("Alt-");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("S-") {
            out.push_str("Shift-");
            rest = r;
        } else {
            out.push_str(rest);
            return out;
        }
    }
}

/// What `connect` says before it hands the terminal to the agent's tmux: the keys that detach.
/// Inside the user's own tmux with the same prefix, that tmux takes the first prefix, so the
/// agent's is reached by pressing it twice (tmux's default `send-prefix` binding).
pub fn attach_hint(name: &SessionName, inner: &str, outer: Option<&str>) -> String {
    let key = key_name(inner);
    let keys = match outer {
        Some(outer) if outer == inner => format!(
            "detach with {key} {key} d (you are inside tmux: {key} d alone would detach your own)"
        ),
        Some(outer) => format!(
            "detach with {key} d (your own tmux's prefix is {}, so {key} reaches the agent's)",
            key_name(outer)
        ),
        None => format!("detach with {key} d"),
    };
    format!(
        "paude: attaching to session {name}: {keys}; the agent keeps working, and \
         `paude-launch connect {name}` comes back"
    )
}

/// `list`: the table, or a hint when there is nothing.
async fn list(global: &Global) -> Result<()> {
    let sessions = backend::open(global).await?.list().await?;
    if sessions.is_empty() {
        println!(
            "no sessions on {}: start one with `paude-launch run`",
            global.backend.as_str()
        );
    } else {
        print!("{}", format_list(&sessions, SystemTime::now()));
        for s in &sessions {
            if let backend::SessionState::Incomplete(why) = &s.state {
                println!(
                    "session {} is incomplete ({why}): {}",
                    s.name,
                    backend::finish_hint(&s.name)
                );
            }
        }
    }
    Ok(())
}

/// `allowed-domains`: print, or edit and reload in place.
async fn allowed_domains(global: &Global, a: &AllowedDomainsArgs) -> Result<()> {
    let name = SessionName::parse(&a.name)?;
    let add = parse_items(&a.add)?;
    let remove = parse_items(&a.remove)?;
    let backend = backend::open(global).await?;
    let running = backend.status(&name).await?.state == backend::SessionState::Running;
    let mut cfg = ProxyConfig::from_toml(&backend.proxy_config(&name).await?)?;
    if add.is_empty() && remove.is_empty() {
        for item in &cfg.allow {
            println!("{item}");
        }
        return Ok(());
    }
    let new = edit_allowlist(&cfg.allow, &add, &remove)?;
    if global.dry_run {
        println!(
            "would set the allowlist of session {name} to: {}",
            new.join(", ")
        );
        return Ok(());
    }
    cfg.allow = new;
    backend.update_proxy_config(&name, &cfg.to_toml()).await?;
    println!(
        "session {name} now allows: {} ({})",
        cfg.allow.join(", "),
        if running {
            "the proxy reloaded; the agent keeps running"
        } else {
            "the session is not running: its proxy reads this when it starts"
        }
    );
    Ok(())
}

/// Parses `--add`/`--remove` items.
fn parse_items(raw: &[String]) -> Result<Vec<AllowItem>> {
    raw.iter().map(|r| AllowItem::parse(r)).collect()
}

/// A duration as people read an age: `45s`, `12m`, `3h`, `2d`.
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// The `list` table: name, backend, state, agent, allowlist, age.
pub fn format_list(sessions: &[SessionInfo], now: SystemTime) -> String {
    let header = ["NAME", "BACKEND", "STATE", "AGENT", "ALLOWLIST", "AGE"];
    let rows: Vec<[String; 6]> = sessions
        .iter()
        .map(|s| {
            [
                s.name.to_string(),
                s.backend.as_str().to_owned(),
                s.state.label().to_owned(),
                s.agent.clone(),
                s.allowlist.join(","),
                s.created
                    .and_then(|c| now.duration_since(c).ok())
                    .map(format_age)
                    .unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// The `status` text.
pub fn format_status(info: &SessionInfo, now: SystemTime) -> String {
    let mut out = format!(
        "session:     {}\nbackend:     {}\nstate:       {}\nagent:       {}\nallowlist:   {}\n",
        info.name,
        info.backend.as_str(),
        match &info.state {
            backend::SessionState::Degraded(why) => format!("degraded ({why})"),
            backend::SessionState::Incomplete(why) => {
                format!("incomplete ({why}): {}", backend::finish_hint(&info.name))
            }
            s => s.label().to_owned(),
        },
        info.agent,
        info.allowlist.join(", "),
    );
    if let Some(age) = info.created.and_then(|c| now.duration_since(c).ok()) {
        out.push_str(&format!("age:         {}\n", format_age(age)));
    }
    for (k, v) in &info.details {
        out.push_str(&format!("{:<13}{v}\n", format!("{k}:")));
    }
    out
}

/// One audit event of paude-proxy, as far as `blocked` needs it.
#[derive(Debug, Deserialize)]
struct AuditEvent {
    #[serde(default)]
    ts: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    reason: Option<String>,
}

/// The `blocked` report: every refused request, oldest first, with the hint to allow a host.
pub fn format_blocked(name: &SessionName, log: &str) -> String {
    let denied: Vec<AuditEvent> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<AuditEvent>(l.trim()).ok())
        .filter(|e| e.decision == "deny")
        .collect();
    if denied.is_empty() {
        return format!("the proxy of session {name} has refused nothing so far\n");
    }
    let mut out = String::new();
    for e in &denied {
        let target = match e.port {
            Some(p) => format!("{}:{p}", e.host),
            None => e.host.clone(),
        };
        out.push_str(&format!(
            "{}  {:<7} {:<40} {}\n",
            e.ts,
            e.method,
            target,
            e.reason.as_deref().unwrap_or("-")
        ));
    }
    out.push_str(&format!(
        "{} refused; allow a host with `paude-launch allowed-domains {name} --add HOST`\n",
        denied.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SessionState;
    use crate::cli::BackendKind;

    fn info(name: &str, state: SessionState) -> SessionInfo {
        SessionInfo {
            name: SessionName::parse(name).unwrap(),
            backend: BackendKind::Podman,
            state,
            agent: "shell".into(),
            allowlist: vec!["default".into(), "github".into()],
            created: Some(SystemTime::UNIX_EPOCH),
            details: vec![("proxy".into(), "10.89.0.2:3128".into())],
        }
    }

    #[test]
    fn list_table_is_aligned() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(7200);
        let table = format_list(
            &[
                info("alpha", SessionState::Running),
                info("a-much-longer-name", SessionState::Stopped),
            ],
            now,
        );
        assert_eq!(
            table,
            "NAME                BACKEND  STATE    AGENT  ALLOWLIST       AGE\n\
             alpha               podman   running  shell  default,github  2h\n\
             a-much-longer-name  podman   stopped  shell  default,github  2h\n"
        );
    }

    #[test]
    fn status_shows_details_and_why_degraded() {
        let s = format_status(
            &info("demo", SessionState::Degraded("proxy missing".into())),
            SystemTime::UNIX_EPOCH + Duration::from_secs(30),
        );
        assert!(s.contains("state:       degraded (proxy missing)\n"), "{s}");
        assert!(s.contains("proxy:       10.89.0.2:3128\n"), "{s}");
        assert!(s.contains("age:         30s\n"), "{s}");
    }

    #[test]
    fn the_attach_hint_names_the_detach_keys_for_plain_and_nested_tmux() {
        let name = SessionName::parse("demo").unwrap();
        let plain = attach_hint(&name, "C-b", None);
        assert!(plain.contains("detach with Ctrl-b d;"), "{plain}");
        assert!(plain.contains("`paude-launch connect demo`"), "{plain}");
        let nested = attach_hint(&name, "C-b", Some("C-b"));
        assert!(nested.contains("detach with Ctrl-b Ctrl-b d ("), "{nested}");
        let other = attach_hint(&name, "C-b", Some("C-a"));
        assert!(other.contains("detach with Ctrl-b d (your own tmux's prefix is Ctrl-a"));
        assert!(attach_hint(&name, "M-a", None).contains("detach with Alt-a d;"));
        assert_eq!(key_name("C-M-x"), "Ctrl-Alt-x");
        assert_eq!(tmux_key("C-b\n").as_deref(), Some("C-b"));
        assert_eq!(tmux_key("None\n"), None);
        assert_eq!(tmux_key(""), None);
    }

    #[test]
    fn ages() {
        assert_eq!(format_age(Duration::from_secs(59)), "59s");
        assert_eq!(format_age(Duration::from_secs(61)), "1m");
        assert_eq!(format_age(Duration::from_secs(3 * 86400)), "3d");
    }

    #[test]
    fn blocked_lists_only_denials() {
        let name = SessionName::parse("demo").unwrap();
        let log = concat!(
            r#"{"ts":"2026-01-01T00:00:00Z","client":"10.0.0.3:5","method":"CONNECT","host":"evil.test","port":443,"decision":"deny","reason":"not_allowed"}"#,
            "\n",
            r#"{"ts":"2026-01-01T00:00:01Z","method":"GET","host":"ok.test","port":80,"decision":"allow"}"#,
            "\nnot json\n"
        );
        let out = format_blocked(&name, log);
        assert!(out.contains("CONNECT evil.test:443"), "{out}");
        assert!(out.contains("not_allowed"));
        assert!(!out.contains("ok.test"));
        assert!(out.contains("1 refused"));
        assert_eq!(
            format_blocked(&name, ""),
            "the proxy of session demo has refused nothing so far\n"
        );
    }

    #[test]
    fn ca_bundle_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("paude-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "hello").unwrap();
        let err = read_ca_bundle(&bad).unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let good = dir.join("good.pem");
        std::fs::write(
            &good,
            "-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(read_ca_bundle(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
