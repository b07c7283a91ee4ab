//! Commands in the agent pod through the API's exec (WebSocket), with no `oc` or `kubectl`:
//! an interactive TTY for `connect` (raw mode, window size, tmux's own detach keys), stdin and
//! stdout piped byte for byte for the git bridge, and captured output for checks.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::{Api, AttachParams, AttachedProcess, TerminalSize};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The exit code an exec ended with, read from the API's final status message.
fn exit_code(status: Option<Status>) -> i64 {
    let Some(status) = status else {
        return 0;
    };
    if status.status.as_deref() == Some("Success") {
        return 0;
    }
    status
        .details
        .and_then(|d| d.causes)
        .into_iter()
        .flatten()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))
        .and_then(|c| c.message.and_then(|m| m.parse().ok()))
        .unwrap_or(1)
}

async fn start(
    client: &Client,
    namespace: &str,
    pod: &str,
    argv: &[String],
    params: &AttachParams,
) -> Result<AttachedProcess> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .exec(pod, argv.to_vec(), params)
        .await
        .with_context(|| {
            format!(
                "cannot run a command in pod {pod}: is the session running? start it with \
                 paude-launch start --backend openshift"
            )
        })
}

/// Runs `argv` with this process's stdin and stdout piped through, stderr to our stderr.
pub async fn piped(client: &Client, namespace: &str, pod: &str, argv: &[String]) -> Result<i64> {
    let params = AttachParams::default()
        .container("agent")
        .stdin(true)
        .stdout(true)
        .stderr(true);
    let mut process = start(client, namespace, pod, argv, &params).await?;
    let mut remote_in = process.stdin().context("the exec has no stdin")?;
    let mut remote_out = process.stdout().context("the exec has no stdout")?;
    let mut remote_err = process.stderr().context("the exec has no stderr")?;
    let status = process
        .take_status()
        .context("the exec reports no status")?;
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let copied = tokio::io::copy(&mut stdin, &mut remote_in).await;
        // Closing our side tells the remote command that its input ended.
        let _ = remote_in.shutdown().await;
        copied
    });
    let output = async {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut remote_out, &mut stdout).await?;
        stdout.flush().await
    };
    let errors = async {
        let mut stderr = tokio::io::stderr();
        tokio::io::copy(&mut remote_err, &mut stderr).await
    };
    let (out, err) = tokio::join!(output, errors);
    out.context("cannot pass the command's output through")?;
    err.context("cannot pass the command's errors through")?;
    input.abort();
    let code = exit_code(status.await);
    process.join().await.context("the exec connection failed")?;
    Ok(code)
}

/// Runs `argv` and returns its exit code, stdout and stderr.
pub async fn capture(
    client: &Client,
    namespace: &str,
    pod: &str,
    argv: &[String],
) -> Result<(i64, Vec<u8>, Vec<u8>)> {
    let params = AttachParams::default().container("agent");
    let mut process = start(client, namespace, pod, argv, &params).await?;
    let mut out = process.stdout().context("the exec has no stdout")?;
    let mut err = process.stderr().context("the exec has no stderr")?;
    let status = process
        .take_status()
        .context("the exec reports no status")?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (a, b) = tokio::join!(out.read_to_end(&mut stdout), err.read_to_end(&mut stderr));
    a.context("cannot read the command's output")?;
    b.context("cannot read the command's errors")?;
    let code = exit_code(status.await);
    process.join().await.context("the exec connection failed")?;
    Ok((code, stdout, stderr))
}

/// Restores the terminal when `connect` ends, however it ends.
struct RawMode;

impl RawMode {
    fn enable() -> Result<RawMode> {
        crossterm::terminal::enable_raw_mode().context(
            "cannot put the terminal in raw mode: connect needs an interactive terminal",
        )?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn terminal_size() -> Option<TerminalSize> {
    crossterm::terminal::size()
        .ok()
        .map(|(width, height)| TerminalSize { width, height })
}

/// Attaches this terminal to `argv` (the agent's tmux) with a real TTY until it exits or the
/// user detaches with tmux's keys (Ctrl-b d). Window size changes follow the local terminal.
pub async fn interactive(
    client: &Client,
    namespace: &str,
    pod: &str,
    argv: &[String],
) -> Result<()> {
    let params = AttachParams::interactive_tty().container("agent");
    let mut process = start(client, namespace, pod, argv, &params).await?;
    let mut remote_in = process.stdin().context("the exec has no stdin")?;
    let mut remote_out = process.stdout().context("the exec has no stdout")?;
    let mut sizes = process
        .terminal_size()
        .context("the exec has no terminal")?;
    let raw = RawMode::enable()?;
    if let Some(size) = terminal_size() {
        let _ = sizes.try_send(size);
    }
    let resize = tokio::spawn(async move {
        let mut signals =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        loop {
            match signals.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => tokio::time::sleep(Duration::from_millis(500)).await,
            }
            if let Some(size) = terminal_size() {
                if sizes.try_send(size).is_err() && sizes.is_closed() {
                    return;
                }
            }
        }
    });
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut remote_in).await;
    });
    let mut stdout = tokio::io::stdout();
    let copied = tokio::io::copy(&mut remote_out, &mut stdout).await;
    let _ = stdout.flush().await;
    input.abort();
    resize.abort();
    drop(raw);
    copied.context("the connection to the agent's terminal broke")?;
    let joined = process.join().await;
    if let Err(err) = joined {
        bail!("the connection to the agent's terminal ended with an error: {err}");
    }
    Ok(())
}
