//! The binary's words to people, on a pseudo-terminal and off one: `run --help` grouped into
//! common, Podman and cluster flags with examples at the end, and the warning that `--yolo`
//! does nothing for the shell agent. Nothing here needs a container engine (`--dry-run`); the
//! terminal is util-linux `script`, as in the Podman suite.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{require, run, Terminal};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(60);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_paude-launch"))
}

/// `program` in `dir` with an environment that does not steer paude-launch.
fn command(program: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir)
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env_remove("PAUDE_BACKEND")
        .env_remove("PAUDE_PROXY_BIN")
        .env_remove("TMUX");
    cmd
}

fn need_a_terminal() {
    require::require(&[require::program("script", "bsdutils")]);
}

/// Removes the terminal's styling (`ESC [ ... m`) from text.
fn plain(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// The help of `run` in its groups: common flags, Podman, cluster, then the examples.
fn check_run_help(help: &str) {
    let at = |needle: &str| {
        help.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} is not in the help:\n{help}"))
    };
    let options = at("\nOptions:\n");
    let podman = at("\nPodman options:\n");
    let cluster = at("\nCluster options (--backend openshift):\n");
    let examples = at("\nExamples:\n");
    assert!(
        options < podman && podman < cluster && cluster < examples,
        "{help}"
    );
    for flag in [
        "--agent",
        "--yolo",
        "--allowed-domains",
        "--base-image",
        "--dry-run",
    ] {
        assert!(at(flag) < podman, "{flag} is not a common flag:\n{help}");
    }
    for flag in ["--mount", "--egress-network"] {
        assert!((podman..cluster).contains(&at(flag)), "{flag}:\n{help}");
    }
    for flag in ["--namespace", "--context", "--pvc-size", "--registry"] {
        assert!((cluster..examples).contains(&at(flag)), "{flag}:\n{help}");
    }
    assert!(
        help[examples..].contains("  paude-launch run --yolo --git\n"),
        "{help}"
    );
    assert!(help.trim_end().ends_with("comes back."), "{help}");
}

#[tokio::test]
async fn run_help_groups_its_flags_and_ends_with_examples_on_a_terminal_and_off_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut off = command(bin(), dir.path());
    off.args(["run", "--help"]);
    let out = run(off, LIMIT, None).await.unwrap();
    assert!(out.success(), "{}", out.stderr);
    assert!(
        !out.stdout.contains('\x1b'),
        "styled off a terminal: {:?}",
        out.stdout
    );
    check_run_help(&out.stdout);

    need_a_terminal();
    let mut terminal = Terminal::spawn(
        command(Path::new("script"), dir.path()),
        bin(),
        &["run", "--help"],
    )
    .unwrap();
    terminal.expect("comes back.", LIMIT).await.unwrap();
    let shown = terminal.before();
    assert!(
        shown.contains("\x1b["),
        "no styling on a terminal: {shown:?}"
    );
    check_run_help(&format!("{}comes back.", plain(&shown)));
    assert_eq!(terminal.wait(LIMIT).await.unwrap(), Some(0));
}

#[tokio::test]
async fn yolo_with_the_shell_agent_warns_that_it_does_nothing_on_a_terminal_and_off_one() {
    let warning =
        "paude: warning: --yolo has no effect with --agent shell: it has no permission prompts to skip";
    let dir = tempfile::tempdir().unwrap();
    let args = ["create", "demo", "--agent", "shell", "--yolo", "--dry-run"];
    let mut off = command(bin(), dir.path());
    off.args(args);
    let out = run(off, LIMIT, None).await.unwrap();
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stderr.contains(warning), "{}", out.stderr);
    // The agent whose yolo flag exists gets no such warning.
    let mut claude = command(bin(), dir.path());
    claude.args(["create", "demo", "--agent", "claude", "--yolo", "--dry-run"]);
    let out = run(claude, LIMIT, None).await.unwrap();
    assert!(
        out.success() && !out.stderr.contains("has no effect"),
        "{}",
        out.stderr
    );

    need_a_terminal();
    let mut terminal =
        Terminal::spawn(command(Path::new("script"), dir.path()), bin(), &args).unwrap();
    terminal.expect(warning, LIMIT).await.unwrap();
    assert_eq!(terminal.wait(LIMIT).await.unwrap(), Some(0));
}
