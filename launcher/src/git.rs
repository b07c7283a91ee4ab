//! Git sync between the user's repository and a session: the `paude-NAME` remote whose `ext::`
//! transport runs `paude-launch git-bridge` (an exec in the agent container, the same on every
//! backend), the repository setup inside the container, and the first push.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::backend::Backend;
use crate::cli::Global;
use crate::plan::WORKSPACE;
use crate::spec::SessionName;

/// Escapes one word for git's `ext::` command line (`%` and space are special there).
fn ext_escape(word: &str) -> String {
    word.replace('%', "%%").replace(' ', "% ")
}

/// The program git should run for the bridge: `paude-launch` when that name on PATH is this very
/// executable, otherwise this executable's absolute path (so the remote works from any shell).
pub fn bridge_program() -> String {
    let Ok(me) = std::env::current_exe() else {
        return "paude-launch".to_owned();
    };
    let me = me.canonicalize().unwrap_or(me);
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("paude-launch"))
            .find(|p| p.is_file())
    });
    match on_path.and_then(|p| p.canonicalize().ok()) {
        Some(p) if p == me => "paude-launch".to_owned(),
        _ => me.display().to_string(),
    }
}

/// The URL of the `paude-NAME` remote. It names the backend and, when the user chose them, the
/// cluster namespace and kubeconfig context, so that git reaches the same session later from any
/// shell, whatever the kubeconfig's current context is by then.
pub fn remote_url(program: &str, global: &Global, name: &SessionName) -> String {
    let mut cluster = String::new();
    for (flag, value) in [
        ("namespace", &global.namespace),
        ("context", &global.context),
    ] {
        if let Some(value) = value {
            cluster.push_str(&format!(" --{flag} {}", ext_escape(value)));
        }
    }
    format!(
        "ext::{} git-bridge --backend {}{cluster} {name} -- %S {WORKSPACE}",
        ext_escape(program),
        global.backend.as_str()
    )
}

/// Runs git in `dir` and returns its trimmed stdout, or an error with git's own message.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run git: install git (e.g. apt-get install git)")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The host's git identity (`user.name`, `user.email`), if both are set.
pub fn host_identity(dir: &Path) -> Option<(String, String)> {
    let name = git(dir, &["config", "--get", "user.name"]).ok()?;
    let email = git(dir, &["config", "--get", "user.email"]).ok()?;
    (!name.is_empty() && !email.is_empty()).then_some((name, email))
}

/// The top of the repository containing `dir`, or a clear error.
pub fn repo_root(dir: &Path) -> Result<PathBuf> {
    git(dir, &["rev-parse", "--show-toplevel"])
        .map(PathBuf::from)
        .map_err(|_| {
            anyhow::anyhow!(
                "'{}' is not inside a git repository: run `git init` and commit first, or leave out --git",
                dir.display()
            )
        })
}

/// Adds (or updates) the `paude-NAME` remote in the repository at `dir`, allowing the `ext::`
/// transport in that repository's own configuration only.
pub fn add_remote(dir: &Path, global: &Global, name: &SessionName) -> Result<String> {
    let root = repo_root(dir)?;
    let remote = format!("paude-{name}");
    let url = remote_url(&bridge_program(), global, name);
    let exists = git(&root, &["remote"])?.lines().any(|r| r == remote);
    if exists {
        git(&root, &["remote", "set-url", &remote, &url])?;
    } else {
        git(&root, &["remote", "add", &remote, &url])?;
    }
    git(
        &root,
        &["config", "--local", "protocol.ext.allow", "always"],
    )?;
    Ok(remote)
}

/// Removes the `paude-NAME` remote from the repository at `dir` when it is a bridge remote;
/// returns whether one was removed. Outside a repository this does nothing.
pub fn remove_remote(dir: &Path, name: &SessionName) -> Result<bool> {
    let Ok(root) = repo_root(dir) else {
        return Ok(false);
    };
    let remote = format!("paude-{name}");
    match git(&root, &["remote", "get-url", &remote]) {
        Ok(url) if url.starts_with("ext::") && url.contains(" git-bridge ") => {
            git(&root, &["remote", "remove", &remote])?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Prepares the session's repository (init, `receive.denyCurrentBranch updateInstead`, the
/// current branch checked out) and pushes the current branch and tags into it; then sets the
/// container's `origin` to the host repository's origin when that is a network URL.
pub async fn push(dir: &Path, backend: &dyn Backend, name: &SessionName) -> Result<()> {
    let root = repo_root(dir)?;
    let branch = git(&root, &["symbolic-ref", "--short", "HEAD"]).map_err(|_| {
        anyhow::anyhow!("HEAD is detached: check out a branch before pushing to the session")
    })?;
    git(&root, &["rev-parse", "--verify", "HEAD"]).map_err(|_| {
        anyhow::anyhow!("branch '{branch}' has no commits yet: commit something first")
    })?;
    let origin = git(&root, &["remote", "get-url", "origin"]).ok();
    let setup = format!(
        "set -e; cd {WORKSPACE}; git init -q; \
         git config receive.denyCurrentBranch updateInstead; \
         git rev-parse --verify -q HEAD >/dev/null || git symbolic-ref HEAD refs/heads/{}",
        shlex::try_quote(&branch).context("branch name cannot be quoted")?
    );
    run_in_session(backend, name, &setup).await?;

    let remote = format!("paude-{name}");
    let refspec = format!("HEAD:refs/heads/{branch}");
    git(&root, &["push", "-q", &remote, &refspec])?;
    git(&root, &["push", "-q", "--tags", &remote])?;

    if let Some(url) = origin.filter(|u| u.contains("://") || u.contains('@')) {
        let quoted = shlex::try_quote(&url).context("origin URL cannot be quoted")?;
        let cmd = format!(
            "cd {WORKSPACE}; git remote remove origin 2>/dev/null; git remote add origin {quoted}"
        );
        run_in_session(backend, name, &cmd).await?;
    }
    Ok(())
}

/// Runs a shell snippet in the agent container and fails with its stderr if it fails.
async fn run_in_session(backend: &dyn Backend, name: &SessionName, script: &str) -> Result<()> {
    let argv = ["sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let out = backend.exec_capture(name, &argv).await?;
    if out.code != 0 {
        bail!(
            "preparing the repository in session {name} failed (exit {}): {}",
            out.code,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::BackendKind;

    fn global(backend: BackendKind) -> Global {
        Global {
            backend,
            dry_run: false,
            verbose: false,
            namespace: None,
            context: None,
        }
    }

    #[test]
    fn remote_url_uses_the_ext_transport() {
        let name = SessionName::parse("demo").unwrap();
        assert_eq!(
            remote_url("paude-launch", &global(BackendKind::Podman), &name),
            "ext::paude-launch git-bridge --backend podman demo -- %S /workspace"
        );
        assert_eq!(
            remote_url(
                "/opt/my tools/paude-launch",
                &global(BackendKind::Openshift),
                &name
            ),
            "ext::/opt/my% tools/paude-launch git-bridge --backend openshift demo -- %S /workspace"
        );
    }

    #[test]
    fn remote_url_keeps_the_chosen_namespace_and_context() {
        let name = SessionName::parse("demo").unwrap();
        let mut g = global(BackendKind::Openshift);
        g.namespace = Some("team-a".into());
        g.context = Some("prod cluster".into());
        assert_eq!(
            remote_url("paude-launch", &g, &name),
            "ext::paude-launch git-bridge --backend openshift --namespace team-a \
             --context prod% cluster demo -- %S /workspace"
        );
    }

    #[test]
    fn add_then_remove_remote_in_a_real_repository() {
        crate::require::require(&[crate::require::program("git", "git")]);
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q"]).expect("git runs");
        let name = SessionName::parse("demo").unwrap();
        assert_eq!(
            add_remote(dir.path(), &global(BackendKind::Podman), &name).unwrap(),
            "paude-demo"
        );
        let url = git(dir.path(), &["remote", "get-url", "paude-demo"]).unwrap();
        assert!(
            url.starts_with("ext::")
                && url.ends_with(" git-bridge --backend podman demo -- %S /workspace"),
            "{url}"
        );
        assert_eq!(
            git(dir.path(), &["config", "--local", "protocol.ext.allow"]).unwrap(),
            "always"
        );
        // Adding again updates instead of failing.
        add_remote(dir.path(), &global(BackendKind::Podman), &name).unwrap();
        assert!(remove_remote(dir.path(), &name).unwrap());
        assert!(!remove_remote(dir.path(), &name).unwrap());
        // A user's own remote of the same name is left alone.
        git(
            dir.path(),
            &[
                "remote",
                "add",
                "paude-demo",
                "https://example.invalid/x.git",
            ],
        )
        .unwrap();
        assert!(!remove_remote(dir.path(), &name).unwrap());
    }

    #[test]
    fn outside_a_repository_git_setup_says_so() {
        crate::require::require(&[crate::require::program("git", "git")]);
        let dir = tempfile::tempdir().unwrap();
        let err = repo_root(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not inside a git repository"), "{err}");
        let name = SessionName::parse("demo").unwrap();
        assert!(!remove_remote(dir.path(), &name).unwrap());
    }

    #[test]
    fn ext_escapes_percent() {
        assert_eq!(ext_escape("a%b c"), "a%%b% c");
    }
}
