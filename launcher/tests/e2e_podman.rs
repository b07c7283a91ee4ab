//! End-to-end tests of paude-launch on a real Podman: the real `paude-launch` binary with the
//! `shell` agent, the real paude-proxy in its container, and checks made from inside the agent
//! container with curl, getent and bash sockets.
//!
//! The "internet" is an upstream server container on an internal network the test creates and
//! hands to the session with `--egress-network`; the test names (`allowed.test`, `denied.test`,
//! `added.test`) are pinned to it with `--proxy-resolve`, so no check can reach a real external
//! address. One session is built and exercised by `a_session_is_isolated_and_keeps_its_work`
//! (network isolation, allowlist changes, stop/start, git sync, delete); a second, short-lived
//! session, made with `run` on a pseudo-terminal, checks attaching and detaching, `connect`,
//! `--mount` and a session-owned egress network, to which no request is sent; the
//! other tests are quick and create nothing. The tests share Podman and run one at a time.
//!
//! Needs Podman, runc, debootstrap, git and tmux (`.ci/run` installs them; a missing one fails
//! the test at once, naming its package). One session runs the proxy built into paude-launch,
//! as a user's does; the other the standalone paude-proxy binary of the same build (`cargo
//! test --workspace` builds it) through `PAUDE_PROXY_BIN`.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::process::Command;
use tokio::sync::Mutex;

use support::{
    built_images, inspect, paude_images, podman_ok, run, session_objects, ApiService, BaseAlias,
    Checks, HostTmux, Output, SessionGuard, Terminal, Upstream, ADDED_HOST, ALLOWED_HOST,
    BASE_IMAGE, DENIED_HOST,
};

/// The tests share one Podman and compare its objects before and after: one at a time.
static PODMAN: Mutex<()> = Mutex::const_new(());

/// Image builds (agent image with apt-get) are the slowest step of the suite.
const CREATE_LIMIT: Duration = Duration::from_secs(900);
/// Any other paude-launch command.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);
/// One probe run inside the agent container.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// What tmux shows in its status line once attached to the agent's session `paude`.
const TMUX_STATUS: &str = "[paude]";
/// What a terminal shows before a status line is redrawn in place.
const REDRAW: &str = "\r\x1b[2K";

/// The real paude-launch binary, run with the suite's Podman configuration.
struct Launcher {
    /// `PAUDE_PROXY_BIN`: a standalone paude-proxy; without one, the proxy built into
    /// paude-launch goes into the proxy image, as it does for users.
    proxy_bin: Option<PathBuf>,
    /// A private API socket (`DOCKER_HOST`); without one, paude-launch starts its own service.
    docker_host: Option<String>,
    cwd: PathBuf,
}

impl Launcher {
    fn new(docker_host: Option<String>, cwd: &Path) -> Result<Launcher> {
        support::require_suite_tools()?;
        Ok(Launcher {
            proxy_bin: None,
            docker_host,
            cwd: cwd.to_path_buf(),
        })
    }

    /// The same launcher with the standalone paude-proxy binary of this build.
    fn with_standalone_proxy(mut self) -> Result<Launcher> {
        self.proxy_bin = Some(support::proxy_binary()?);
        Ok(self)
    }

    /// A command with the environment every child of the session needs: paude-launch itself,
    /// and git, whose `ext::` remote runs `paude-launch git-bridge` from PATH.
    fn command(&self, program: &str) -> Command {
        let bin = Path::new(env!("CARGO_BIN_EXE_paude-launch"));
        let bin_dir = bin.parent().expect("the binary has a directory");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(bin_dir.to_path_buf()).chain(std::env::split_paths(&path)),
        )
        .expect("PATH entries are joinable");
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.cwd)
            .env("PATH", path)
            .env("CONTAINERS_CONF", support::containers_conf())
            .env("TERM", "xterm-256color")
            .env_remove("TMUX")
            .env_remove("PAUDE_BACKEND")
            .env_remove("CLAUDE_CODE_USE_VERTEX");
        match &self.proxy_bin {
            Some(bin) => cmd.env("PAUDE_PROXY_BIN", bin),
            None => cmd.env_remove("PAUDE_PROXY_BIN"),
        };
        match &self.docker_host {
            Some(host) => cmd.env("DOCKER_HOST", host),
            None => cmd.env_remove("DOCKER_HOST"),
        };
        cmd
    }

    async fn run(&self, args: &[&str], limit: Duration) -> Result<Output> {
        let mut cmd = self.command(env!("CARGO_BIN_EXE_paude-launch"));
        cmd.args(args);
        run(cmd, limit, None).await
    }

    async fn ok(&self, args: &[&str], limit: Duration) -> Result<Output> {
        self.run(args, limit)
            .await?
            .ok(&format!("paude-launch {}", args.join(" ")))
    }

    async fn git(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command("git");
        cmd.args(args);
        run(cmd, COMMAND_LIMIT, None)
            .await?
            .ok(&format!("git {}", args.join(" ")))
    }
}

/// Checks that a refused command failed cleanly: a normal error status (not a panic), a
/// message naming what was wrong, no trailing period.
fn expect_refusal(out: &Output, mentions: &[&str]) -> Result<()> {
    ensure!(
        !out.success(),
        "the command succeeded; stdout: {}",
        out.stdout.trim()
    );
    ensure!(
        out.code.is_some() && out.code != Some(101) && !out.stderr.contains("panicked"),
        "the command crashed (status {:?}): {}",
        out.code,
        out.stderr.trim()
    );
    let message = out.stderr.trim();
    ensure!(!message.is_empty(), "the refusal printed no message");
    for word in mentions {
        ensure!(
            message.contains(word),
            "the message does not mention {word:?}: {message}"
        );
    }
    ensure!(
        !message.ends_with('.'),
        "the message ends with a period: {message}"
    );
    Ok(())
}

/// Creation flags shared by the tests: an agent (`shell` in all but one) on the local base
/// image.
fn create_args_for(name: &str, agent: &str) -> Vec<String> {
    [
        "create",
        name,
        "--agent",
        agent,
        "--base-image",
        BASE_IMAGE,
        "--proxy-base-image",
        BASE_IMAGE,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Creation flags of a `shell` session on the local base image.
fn base_create_args(name: &str) -> Vec<String> {
    create_args_for(name, "shell")
}

/// Replaces the value of `flag` in `args`.
fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let at = args
        .iter()
        .position(|a| a == flag)
        .expect("the flag is in the arguments");
    args[at + 1] = value.to_owned();
}

/// Off a terminal, an image build shows itself in plain lines: the build, each step, the end.
fn expect_plain_build_lines(stderr: &str) -> Result<()> {
    ensure!(
        stderr.contains("paude: building image localhost/paude-proxy:"),
        "no line announces the proxy image build: {stderr}"
    );
    ensure!(
        stderr
            .lines()
            .any(|l| l.starts_with("paude:   step 1/") && l.contains(": FROM ")),
        "no plain line for the first build step: {stderr}"
    );
    ensure!(
        built_images(stderr)
            .iter()
            .any(|r| r.starts_with("localhost/paude-proxy:")),
        "no line says the proxy image was built and how long it took: {stderr}"
    );
    ensure!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "terminal control codes in output that is not a terminal: {stderr:?}"
    );
    Ok(())
}

/// The running session under test, seen from the outside.
struct Session {
    name: String,
    agent: String,
    proxy: String,
    proxy_ip: String,
}

impl Session {
    /// Runs a bash script inside the agent container as its default user.
    async fn sh(&self, script: &str) -> Result<Output> {
        run(
            support::podman(["exec", &self.agent, "bash", "-c", script]),
            PROBE_LIMIT,
            None,
        )
        .await
    }

    /// Like `sh`, but the script must succeed.
    async fn sh_ok(&self, script: &str) -> Result<String> {
        Ok(self.sh(script).await?.ok(script)?.stdout)
    }

    /// `(StartedAt, Pid)` of a container: both change when it restarts.
    async fn started(container: &str) -> Result<(String, i64)> {
        let info = inspect("container", container).await?;
        let state = &info["State"];
        ensure!(
            state["Running"].as_bool() == Some(true),
            "{container} is not running: {state}"
        );
        Ok((
            state["StartedAt"].to_string(),
            state["Pid"].as_i64().context("no Pid in container state")?,
        ))
    }

    async fn is_running(container: &str) -> Result<bool> {
        let names = podman_ok(
            [
                "ps",
                "--format",
                "{{.Names}}",
                "--filter",
                &format!("name=^{container}$"),
            ],
            Duration::from_secs(30),
        )
        .await?;
        Ok(names.lines().any(|l| l.trim() == container))
    }
}

/// `curl` through the session's proxy (the agent's environment) for one URL: returns the exit
/// code and everything curl printed with `-i` (status line, headers, body).
async fn fetch(session: &Session, url: &str) -> Result<Output> {
    session
        .sh(&format!(
            "curl -sS -i --max-time 20 --cacert /tmp/upstream.pem '{url}'"
        ))
        .await
}

/// The URL must come back 200 from the upstream server with the given scheme and host.
async fn expect_upstream(session: &Session, url: &str, scheme: &str, host: &str) -> Result<()> {
    let out = fetch(session, url).await?;
    let marker = format!("paude-upstream scheme={scheme} host={host}");
    ensure!(
        out.success() && out.stdout.contains(&marker),
        "expected the upstream's answer ({marker}) for {url}, got status {:?}\n{}\n{}",
        out.code,
        out.stdout.trim(),
        out.stderr.trim()
    );
    Ok(())
}

/// The proxy must refuse a plain-HTTP request with 403 and an `X-Paude-Deny` reason.
async fn expect_forward_denied(session: &Session, url: &str) -> Result<()> {
    let out = fetch(session, url).await?;
    let head = out.stdout.split("\r\n\r\n").next().unwrap_or_default();
    let status_403 = head
        .lines()
        .next()
        .is_some_and(|l| l.starts_with("HTTP/") && l.contains(" 403"));
    let reason = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-paude-deny:"));
    ensure!(
        status_403 && reason.is_some_and(|l| l.len() > "x-paude-deny:".len() + 1),
        "expected the proxy's 403 with X-Paude-Deny for {url}, got status {:?}\n{}\n{}",
        out.code,
        out.stdout.trim(),
        out.stderr.trim()
    );
    Ok(())
}

/// The proxy must refuse a CONNECT (an https URL) with 403.
async fn expect_connect_denied(session: &Session, url: &str) -> Result<()> {
    let out = session
        .sh(&format!(
            "curl -sS --max-time 20 --cacert /tmp/upstream.pem -o /dev/null \
             -w '%{{http_connect}}' '{url}'"
        ))
        .await?;
    ensure!(
        !out.success() && out.stdout.trim() == "403",
        "expected the proxy to answer the CONNECT for {url} with 403, got status {:?}, \
         connect code {:?}: {}",
        out.code,
        out.stdout.trim(),
        out.stderr.trim()
    );
    Ok(())
}

/// A connection that does not use the proxy must fail to connect (curl's status 7, or 28 when
/// the connection attempt times out) and reach nothing.
async fn expect_direct_failure(session: &Session, url: &str) -> Result<()> {
    let out = session
        .sh(&format!(
            "curl --noproxy '*' --globoff -sS -k --max-time 5 -o - '{url}'"
        ))
        .await?;
    ensure!(
        matches!(out.code, Some(7 | 28)) && !out.stdout.contains("paude-upstream"),
        "a direct connection to {url} did not fail to connect: status {:?}\n{}\n{}",
        out.code,
        out.stdout.trim(),
        out.stderr.trim()
    );
    Ok(())
}

/// Polls until `url` answers from the upstream, for changes the proxy applies by reloading.
async fn eventually_upstream(session: &Session, url: &str, host: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let result = expect_upstream(session, url, "http", host).await;
        if result.is_ok() || tokio::time::Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls until `url` is refused by the proxy.
async fn eventually_denied(session: &Session, url: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let result = expect_forward_denied(session, url).await;
        if result.is_ok() || tokio::time::Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// All checks of one session: network isolation first, then changes, then the lifecycle.
async fn exercise_session(
    checks: &mut Checks,
    launcher: &Launcher,
    upstream: &Upstream,
    create_args: &[String],
    repo: &Path,
    alias: &mut BaseAlias,
) -> Result<()> {
    let name = create_args[1].clone();
    let args: Vec<&str> = create_args.iter().map(String::as_str).collect();
    let created = launcher.ok(&args, CREATE_LIMIT).await?;
    eprintln!("create printed:\n{}{}", created.stdout, created.stderr);
    built_images(&created.stderr)
        .iter()
        .for_each(|r| alias.built(r));
    checks.record(
        "off a terminal, an image build shows each step on a plain line",
        expect_plain_build_lines(&created.stderr),
    );

    let agent = format!("paude-{name}-agent");
    let proxy = format!("paude-{name}-proxy");
    let internal = format!("paude-{name}-internal");
    let agent_info = inspect("container", &agent).await?;
    let env: Vec<String> = agent_info["Config"]["Env"]
        .as_array()
        .context("agent container has no Config.Env")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let env_value = |key: &str| {
        env.iter()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
    };
    let http_proxy = env_value("HTTP_PROXY").context("the agent has no HTTP_PROXY")?;
    let proxy_ip = http_proxy
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix(":3128"))
        .with_context(|| format!("HTTP_PROXY is not http://IP:3128: {http_proxy}"))?
        .to_owned();
    let session = Session {
        name: name.clone(),
        agent: agent.clone(),
        proxy: proxy.clone(),
        proxy_ip,
    };

    checks.record(
        "the session's objects exist with their contract names and labels",
        async {
            let objects = session_objects(&name).await?;
            for expected in [
                format!("container {agent}"),
                format!("container {proxy}"),
                format!("network {internal}"),
                format!("volume paude-{name}-data"),
            ] {
                ensure!(
                    objects.contains(&expected),
                    "missing {expected}; found {objects:?}"
                );
            }
            ensure!(
                !objects.contains(&format!("network paude-{name}-egress")),
                "an egress network was created although --egress-network was given: {objects:?}"
            );
            let net = inspect("network", &internal).await?;
            ensure!(
                net["internal"].as_bool() == Some(true),
                "{internal} is not internal: {net}"
            );
            for container in [&agent, &proxy] {
                let info = inspect("container", container).await?;
                ensure!(
                    info["Config"]["Labels"]["paude.session"].as_str() == Some(name.as_str()),
                    "{container} lacks the label paude.session={name}"
                );
            }
            let agent_nets: Vec<String> = agent_info["NetworkSettings"]["Networks"]
                .as_object()
                .context("agent has no networks")?
                .keys()
                .cloned()
                .collect();
            ensure!(
                agent_nets == [internal.clone()],
                "the agent must be on {internal} only, is on {agent_nets:?}"
            );
            let proxy_info = inspect("container", &proxy).await?;
            let proxy_nets = &proxy_info["NetworkSettings"]["Networks"];
            ensure!(
                proxy_nets[&internal]["IPAddress"].as_str() == Some(session.proxy_ip.as_str()),
                "HTTP_PROXY names {} but the proxy's address on {internal} is {}",
                session.proxy_ip,
                proxy_nets[&internal]["IPAddress"]
            );
            ensure!(
                proxy_nets.get(&upstream.network).is_some(),
                "the proxy is not on the egress network {}: {proxy_nets}",
                upstream.network
            );
            Ok(())
        }
        .await,
    );

    checks.record(
        "the agent gets the proxy in both cases and NO_PROXY for loopback",
        async {
            for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                ensure!(
                    env_value(key).as_deref() == Some(http_proxy.as_str()),
                    "{key} is {:?}, expected {http_proxy}",
                    env_value(key)
                );
            }
            for key in ["NO_PROXY", "no_proxy"] {
                let value = env_value(key).unwrap_or_default();
                let items: Vec<&str> = value.split(',').map(str::trim).collect();
                ensure!(
                    items.contains(&"localhost") && items.contains(&"127.0.0.1"),
                    "{key} is {value:?}, expected localhost,127.0.0.1"
                );
            }
            Ok(())
        }
        .await,
    );

    checks.record(
        "the agent runs as uid 1000 without capabilities or new privileges, in tmux",
        async {
            let out = session
                .sh_ok(
                    "id -u; echo $HOME; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs):' \
                     /proc/1/status; tmux has-session -t paude && echo tmux-ok",
                )
                .await?;
            ensure!(out.starts_with("1000\n/home/paude\n"), "user: {out}");
            for cap in ["CapEff", "CapPrm", "CapBnd"] {
                ensure!(
                    out.contains(&format!("{cap}:\t0000000000000000")),
                    "{cap} is not empty: {out}"
                );
            }
            ensure!(
                out.contains("NoNewPrivs:\t1"),
                "no-new-privileges is off: {out}"
            );
            ensure!(out.contains("tmux-ok"), "no tmux session paude: {out}");
            let info = inspect("container", &agent).await?;
            let mounts = info["Mounts"].as_array().context("no Mounts")?;
            let binds: Vec<&serde_json::Value> = mounts
                .iter()
                .filter(|m| m["Type"].as_str() == Some("bind"))
                .filter(|m| {
                    // The host's git identity may be copied in, read-only.
                    !(m["Destination"]
                        .as_str()
                        .is_some_and(|d| d.ends_with(".gitconfig"))
                        && m["RW"].as_bool() == Some(false))
                })
                .collect();
            ensure!(binds.is_empty(), "the agent has host mounts: {binds:?}");
            Ok(())
        }
        .await,
    );

    checks.record(
        "the host's git identity is in the agent read-only, without credential helpers or keys",
        async {
            let out = session
                .sh_ok(
                    "cd /tmp && git config user.name; git config user.email; \
                     git config --get-all credential.helper || echo no-helper; \
                     for f in /etc/gitconfig $HOME/.gitconfig; do \
                       [ -e \"$f\" ] && [ -w \"$f\" ] && echo \"writable $f\"; done; \
                     ls -A $HOME/.ssh 2>/dev/null | sed 's/^/ssh-file /'; true",
                )
                .await?;
            ensure!(
                out == "host\nhost@paude.test\nno-helper\n",
                "git configuration seen by the agent: {out:?}"
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "the resource limits given to create are applied to the agent",
        async {
            let info = inspect("container", &agent).await?;
            let host = &info["HostConfig"];
            ensure!(
                host["Memory"].as_i64() == Some(1 << 30),
                "memory limit: {}",
                host["Memory"]
            );
            ensure!(
                host["PidsLimit"].as_i64() == Some(512),
                "pids limit: {}",
                host["PidsLimit"]
            );
            ensure!(
                host["NanoCpus"].as_i64() == Some(1_500_000_000),
                "cpu limit: {}",
                host["NanoCpus"]
            );
            Ok(())
        }
        .await,
    );

    // The upstream's certificate, for curl's --cacert inside the agent.
    let cert = upstream.certificate().await?;
    run(
        support::podman(["exec", "-i", &agent, "sh", "-c", "cat > /tmp/upstream.pem"]),
        PROBE_LIMIT,
        Some(cert.as_bytes()),
    )
    .await?
    .ok("copying the upstream certificate into the agent")?;

    checks.record(
        "an allowed host answers through the proxy over http",
        eventually_upstream(&session, "http://allowed.test/hello", ALLOWED_HOST).await,
    );
    checks.record(
        "an allowed host answers through the proxy over https (CONNECT)",
        expect_upstream(&session, "https://allowed.test/tls", "https", ALLOWED_HOST).await,
    );
    checks.record(
        "a denied host gets the proxy's 403 with X-Paude-Deny over http",
        expect_forward_denied(&session, "http://denied.test/").await,
    );
    checks.record(
        "a denied host gets the proxy's 403 for CONNECT",
        expect_connect_denied(&session, "https://denied.test/").await,
    );
    let direct_http = format!("http://{}/", upstream.ip);
    let direct_https = format!("https://{}/", upstream.ip);
    checks.record(
        "a direct connection that bypasses the proxy fails",
        async {
            expect_direct_failure(&session, &direct_http).await?;
            expect_direct_failure(&session, &direct_https).await
        }
        .await,
    );
    checks.record(
        "a direct IPv6 connection fails",
        expect_direct_failure(&session, "http://[2001:db8::1]/").await,
    );
    checks.record(
        "a CONNECT to an allowed host carrying a denied host's TLS name is refused",
        async {
            // curl sends `CONNECT allowed.test:443` and then a ClientHello for denied.test.
            let out = session
                .sh("curl -sS --max-time 20 --cacert /tmp/upstream.pem \
                     --connect-to denied.test:443:allowed.test:443 https://denied.test/fronted")
                .await?;
            ensure!(
                !out.success() && !out.stdout.contains("paude-upstream"),
                "the fronted request got through: {}",
                out.stdout.trim()
            );
            Ok(())
        }
        .await,
    );
    no_way_out_but_the_proxy(checks, launcher, &session, &internal, None).await;
    checks.record(
        "the metadata address fails directly and gets 403 through the proxy",
        async {
            expect_direct_failure(&session, "http://169.254.169.254/latest/meta-data/").await?;
            expect_forward_denied(&session, "http://169.254.169.254/latest/meta-data/").await?;
            expect_connect_denied(&session, "https://169.254.169.254/").await
        }
        .await,
    );
    checks.record(
        "the proxy's admin port is unreachable from the agent",
        async {
            // The admin listener exists (on the proxy's loopback), so its absence from the
            // agent's view is isolation, not a missing listener.
            run(
                support::podman([
                    "exec",
                    &session.proxy,
                    "bash",
                    "-c",
                    "exec 3<>/dev/tcp/127.0.0.1/9090",
                ]),
                PROBE_LIMIT,
                None,
            )
            .await?
            .ok("connecting to the admin port inside the proxy container")?;
            let ip = &session.proxy_ip;
            expect_direct_failure(&session, &format!("http://{ip}:9090/")).await?;
            // Through the proxy, loopback and the proxy's own address are refused too.
            for target in ["127.0.0.1:9090", &format!("{ip}:9090")] {
                let out = session
                    .sh(&format!(
                        "curl -sS -i --max-time 20 --noproxy '' -x http://{ip}:3128 \
                         http://{target}/"
                    ))
                    .await?;
                ensure!(
                    out.stdout
                        .lines()
                        .next()
                        .is_some_and(|l| l.contains(" 403")),
                    "the proxy did not refuse {target}: {}\n{}",
                    out.stdout.trim(),
                    out.stderr.trim()
                );
            }
            Ok(())
        }
        .await,
    );

    checks.record(
        "allowed-domains --add and --remove take effect without restarting anything",
        async {
            let url = "http://added.test/after-add";
            expect_forward_denied(&session, url).await?;
            let agent_before = Session::started(&session.agent).await?;
            let proxy_before = Session::started(&session.proxy).await?;
            launcher
                .ok(
                    &["allowed-domains", &name, "--add", ADDED_HOST],
                    COMMAND_LIMIT,
                )
                .await?;
            eventually_upstream(&session, url, ADDED_HOST).await?;
            let listed = launcher
                .ok(&["allowed-domains", &name], COMMAND_LIMIT)
                .await?
                .stdout;
            ensure!(
                listed.contains(ADDED_HOST) && listed.contains(ALLOWED_HOST),
                "allowed-domains does not list both hosts: {listed}"
            );
            launcher
                .ok(
                    &["allowed-domains", &name, "--remove", ADDED_HOST],
                    COMMAND_LIMIT,
                )
                .await?;
            eventually_denied(&session, url).await?;
            expect_upstream(&session, "http://allowed.test/still", "http", ALLOWED_HOST).await?;
            ensure!(
                Session::started(&session.agent).await? == agent_before,
                "the agent container restarted"
            );
            ensure!(
                Session::started(&session.proxy).await? == proxy_before,
                "the proxy container restarted instead of reloading"
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "a bad allowed-domains item is refused and changes nothing",
        async {
            let before = launcher
                .ok(&["allowed-domains", &name], COMMAND_LIMIT)
                .await?
                .stdout;
            let bad = "not a domain!";
            let out = launcher
                .run(&["allowed-domains", &name, "--add", bad], COMMAND_LIMIT)
                .await?;
            expect_refusal(&out, &[bad])?;
            let after = launcher
                .ok(&["allowed-domains", &name], COMMAND_LIMIT)
                .await?
                .stdout;
            ensure!(before == after, "the list changed:\n{before}\n---\n{after}");
            Ok(())
        }
        .await,
    );
    checks.record(
        "blocked lists what the proxy refused",
        async {
            let out = launcher.ok(&["blocked", &name], COMMAND_LIMIT).await?;
            ensure!(
                out.stdout.contains(DENIED_HOST),
                "blocked does not show {DENIED_HOST}: {}",
                out.stdout
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "refused requests never reached the upstream",
        async {
            let log = upstream.log().await?;
            ensure!(
                log.contains(&format!("host={ALLOWED_HOST}")),
                "the upstream saw no allowed request: {log}"
            );
            ensure!(
                !log.contains(&format!("host={DENIED_HOST}")),
                "a denied request reached the upstream: {log}"
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "list, a bare paude-launch and status show the session",
        async {
            let listed = launcher.ok(&["list"], COMMAND_LIMIT).await?.stdout;
            ensure!(
                listed.contains(&name),
                "list does not show {name}: {listed}"
            );
            let bare = launcher.ok(&[], COMMAND_LIMIT).await?.stdout;
            ensure!(
                bare.contains(&name),
                "a bare paude-launch does not list {name}: {bare}"
            );
            let status = launcher.ok(&["status", &name], COMMAND_LIMIT).await?.stdout;
            ensure!(
                status.contains(&name),
                "status does not show {name}: {status}"
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "a second create with the same name is refused and changes nothing",
        async {
            let before = inspect("container", &agent).await?["Id"].clone();
            let out = launcher.run(&args, COMMAND_LIMIT).await?;
            expect_refusal(&out, &[&name])?;
            let after = inspect("container", &agent).await?["Id"].clone();
            ensure!(before == after, "the agent container was replaced");
            Ok(())
        }
        .await,
    );

    checks.record(
        "workspace and home files survive stop and start, and status follows the state",
        async {
            session
                .sh_ok(
                    "echo kept-in-workspace > /workspace/keep.txt && \
                     echo kept-in-home > /home/paude/.keep",
                )
                .await?;
            // An allowlist change made while running must survive the restart too (checked
            // below, once the agent is back).
            launcher
                .ok(
                    &["allowed-domains", &name, "--add", ADDED_HOST],
                    COMMAND_LIMIT,
                )
                .await?;
            launcher.ok(&["stop", &name], COMMAND_LIMIT).await?;
            ensure!(
                !Session::is_running(&agent).await?,
                "the agent still runs after stop"
            );
            // A stopped session's allowlist is checked as strictly as a running one's: a
            // typo'd group is refused and stores nothing, so the next start cannot fail on it.
            let before = launcher
                .ok(&["allowed-domains", &name], COMMAND_LIMIT)
                .await?
                .stdout;
            let typo = launcher
                .run(&["allowed-domains", &name, "--add", "githu"], COMMAND_LIMIT)
                .await?;
            expect_refusal(&typo, &["unknown group 'githu'", "github"])?;
            let after = launcher
                .ok(&["allowed-domains", &name], COMMAND_LIMIT)
                .await?
                .stdout;
            ensure!(
                before == after,
                "a refused item changed the stopped session's allowlist: {before:?} -> {after:?}"
            );
            let good = launcher
                .ok(&["allowed-domains", &name, "--add", "pypi"], COMMAND_LIMIT)
                .await?;
            ensure!(
                !good.stdout.contains("reloaded") && good.stdout.contains("when it starts"),
                "allowed-domains on a stopped session claims a reload: {}",
                good.stdout
            );
            launcher
                .ok(
                    &["allowed-domains", &name, "--remove", "pypi"],
                    COMMAND_LIMIT,
                )
                .await?;
            let status = launcher.ok(&["status", &name], COMMAND_LIMIT).await?.stdout;
            ensure!(
                status.to_lowercase().contains("stopped") && !status.contains("running"),
                "status after stop: {status}"
            );
            launcher.ok(&["start", &name], COMMAND_LIMIT).await?;
            ensure!(
                Session::is_running(&agent).await?,
                "the agent does not run after start"
            );
            let status = launcher.ok(&["status", &name], COMMAND_LIMIT).await?.stdout;
            ensure!(
                status.to_lowercase().contains("running"),
                "status after start: {status}"
            );
            let out = session
                .sh_ok("cat /workspace/keep.txt /home/paude/.keep")
                .await?;
            ensure!(
                out == "kept-in-workspace\nkept-in-home\n",
                "files after restart: {out:?}"
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "after stop and start the agent is back in tmux and its allowlist, with changes, holds",
        async {
            session.sh_ok("tmux has-session -t paude").await?;
            eventually_upstream(&session, "http://allowed.test/after-restart", ALLOWED_HOST)
                .await?;
            eventually_upstream(&session, "http://added.test/after-restart", ADDED_HOST)
                .await
                .context("the allowlist change made before stop was lost")?;
            launcher
                .ok(
                    &["allowed-domains", &name, "--remove", ADDED_HOST],
                    COMMAND_LIMIT,
                )
                .await?;
            eventually_denied(&session, "http://added.test/removed-again").await
        }
        .await,
    );

    checks.record(
        "after the user's own `podman restart` of the proxy the agent reaches it at once",
        async {
            let mac = |info: serde_json::Value| {
                info["NetworkSettings"]["Networks"][&internal]["MacAddress"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            let before = mac(inspect("container", &proxy).await?);
            support::podman_ok(["restart", "-t", "2", proxy.as_str()], COMMAND_LIMIT).await?;
            let restarted = tokio::time::Instant::now();
            ensure!(
                mac(inspect("container", &proxy).await?) == before && !before.is_empty(),
                "the proxy's MAC on {internal} changed across a restart (was {before})"
            );
            // The proxy needs a moment to listen again; a stale neighbour entry would keep the
            // agent out for tens of seconds. The bound is generous; the time is reported.
            let bound = Duration::from_secs(5);
            loop {
                let out = session
                    .sh("curl -sS -i --max-time 2 http://allowed.test/after-podman-restart")
                    .await?;
                if out.success() && out.stdout.contains("paude-upstream") {
                    break;
                }
                ensure!(
                    restarted.elapsed() < bound,
                    "the agent could not reach its restarted proxy within {} s: {}",
                    bound.as_secs(),
                    out.stderr.trim()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!(
                "the agent reached its restarted proxy {} ms after `podman restart` returned",
                restarted.elapsed().as_millis()
            );
            Ok(())
        }
        .await,
    );

    checks.record(
        "git round trip: push in, commit in the container, pull back",
        git_round_trip(launcher, &session, repo).await,
    );

    checks.record(
        "--dry-run on stop, allowed-domains and delete changes nothing",
        async {
            let objects = session_objects(&name).await?;
            let agent_before = Session::started(&agent).await?;
            let proxy_before = Session::started(&proxy).await?;
            let list_before = launcher
                .ok(&["allowed-domains", &name], COMMAND_LIMIT)
                .await?
                .stdout;
            for verb in [
                vec!["stop", name.as_str(), "--dry-run"],
                vec!["allowed-domains", &name, "--add", ADDED_HOST, "--dry-run"],
                vec!["delete", &name, "--confirm", "--dry-run"],
            ] {
                launcher.ok(&verb, COMMAND_LIMIT).await?;
            }
            let list_after = launcher
                .ok(&["allowed-domains", &name], COMMAND_LIMIT)
                .await?
                .stdout;
            ensure!(
                list_before == list_after,
                "the allowlist changed: {list_after}"
            );
            expect_forward_denied(&session, "http://added.test/dry-run").await?;
            ensure!(
                session_objects(&name).await? == objects,
                "the session's objects changed"
            );
            ensure!(
                Session::started(&agent).await? == agent_before
                    && Session::started(&proxy).await? == proxy_before,
                "a container was stopped or restarted"
            );
            Ok(())
        }
        .await,
    );
    checks.record(
        "delete without --confirm is refused and changes nothing",
        async {
            let before = session_objects(&name).await?;
            let out = launcher.run(&["delete", &name], COMMAND_LIMIT).await?;
            expect_refusal(&out, &["--confirm"])?;
            let after = session_objects(&name).await?;
            ensure!(before == after, "objects changed: {before:?} -> {after:?}");
            ensure!(Session::is_running(&agent).await?, "the agent was stopped");
            Ok(())
        }
        .await,
    );
    checks.record(
        "start refuses a session whose network leaks, and stops it",
        start_refuses_a_leak(launcher, &session, &internal).await,
    );
    checks.record(
        "delete --confirm leaves no container, network or volume",
        async {
            launcher
                .ok(&["delete", &name, "--confirm"], COMMAND_LIMIT)
                .await?;
            let left = session_objects(&name).await?;
            ensure!(left.is_empty(), "left behind: {left:?}");
            podman_ok(
                ["network", "exists", &upstream.network],
                Duration::from_secs(30),
            )
            .await
            .context("delete removed the --egress-network, which the session does not own")?;
            let out = launcher.run(&["status", &name], COMMAND_LIMIT).await?;
            expect_refusal(&out, &[&name])
        }
        .await,
    );
    Ok(())
}

/// The isolation checks of a running session (support/isolation.rs) and its `status` facts.
async fn no_way_out_but_the_proxy(
    checks: &mut Checks,
    launcher: &Launcher,
    session: &Session,
    internal: &str,
    resolver: Option<&support::netavark::FakeResolver>,
) {
    let agent = support::isolation::Agent {
        container: &session.agent,
        internal,
        proxy_ip: &session.proxy_ip,
        hostname: &session.name,
    };
    let canary = format!("paude-canary-{}.test", session.name);
    support::isolation::no_way_out(checks, &agent, &canary, resolver).await;
    checks.record(
        "status shows the internal network's facts: internal, DNS off, its subnet",
        async {
            let status = launcher
                .ok(&["status", &session.name], COMMAND_LIMIT)
                .await?
                .stdout;
            support::isolation::status_shows_the_network(&status, internal).await
        }
        .await,
    );
}

/// A DNS server that answers every query with an error, for a stranger on a session's network.
const ROGUE_DNS: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print("rogue listening", flush=True)
while True:
    query, peer = s.recvfrom(512)
    s.sendto(query[:2] + b"\x81\x83" + query[4:], peer)
"#;

/// Puts a DNS server on the session's internal network (what a netavark gateway or any other
/// machine on the subnet would be), then `start` must refuse with what it found and leave the
/// session stopped; without the stranger the session starts again.
async fn start_refuses_a_leak(
    launcher: &Launcher,
    session: &Session,
    internal: &str,
) -> Result<()> {
    let name = &session.name;
    let rogue = format!("paude-e2e-rogue-{name}");
    let label = format!("{}=1", support::SUITE_LABEL);
    // The last address of the subnet: the engine hands out the first ones, and the proxy's is
    // free while it is stopped.
    let net = inspect("network", internal).await?;
    let subnet: ipnet::Ipv4Net = net["subnets"][0]["subnet"]
        .as_str()
        .context("the internal network shows no subnet")?
        .parse()?;
    let rogue_ip = subnet
        .hosts()
        .last()
        .context("the subnet has no host")?
        .to_string();
    launcher.ok(&["stop", name], COMMAND_LIMIT).await?;
    let result = async {
        podman_ok(
            [
                "run",
                "-d",
                "--name",
                &rogue,
                "--label",
                &label,
                "--network",
                internal,
                "--ip",
                &rogue_ip,
                "--entrypoint",
                "python3",
                support::UPSTREAM_IMAGE,
                "-c",
                ROGUE_DNS,
            ],
            COMMAND_LIMIT,
        )
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !podman_ok(["logs", &rogue], COMMAND_LIMIT)
            .await?
            .contains("rogue listening")
        {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the rogue DNS server did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = launcher.run(&["start", name], COMMAND_LIMIT).await?;
        expect_refusal(&out, &["way out", "DNS server answers", &rogue_ip, name])?;
        ensure!(
            !Session::is_running(&session.agent).await?
                && !Session::is_running(&session.proxy).await?,
            "the leaking session was left running"
        );
        Ok(())
    }
    .await;
    let _ = podman_ok(["rm", "-f", "-t", "0", &rogue], COMMAND_LIMIT).await;
    result?;
    launcher.ok(&["start", name], COMMAND_LIMIT).await?;
    ensure!(
        Session::is_running(&session.agent).await?,
        "the session did not start again"
    );
    Ok(())
}

/// Pushes a host repository into the session, commits inside the agent, pulls the commit back.
async fn git_round_trip(launcher: &Launcher, session: &Session, repo: &Path) -> Result<()> {
    let name = &session.name;
    std::fs::write(repo.join("notes.txt"), "from the host\n")?;
    launcher.git(&["add", "notes.txt"]).await?;
    launcher.git(&["commit", "-q", "-m", "host commit"]).await?;
    launcher
        .ok(&["remote", "add", "--push", name], COMMAND_LIMIT)
        .await?;
    let remote = format!("paude-{name}");
    let url = launcher.git(&["remote", "get-url", &remote]).await?.stdout;
    ensure!(url.starts_with("ext::"), "remote {remote} is {url}");
    let inside = session
        .sh_ok("cd /workspace && git log -1 --format=%s && cat notes.txt")
        .await?;
    ensure!(
        inside == "host commit\nfrom the host\n",
        "the workspace after push: {inside:?}"
    );
    session
        .sh_ok(
            "cd /workspace && echo 'from the agent' >> notes.txt && \
             git -c user.name=agent -c user.email=agent@paude.test commit -q -am 'agent commit'",
        )
        .await?;
    launcher.git(&["pull", "-q", &remote, "main"]).await?;
    let notes = std::fs::read_to_string(repo.join("notes.txt"))?;
    ensure!(
        notes == "from the host\nfrom the agent\n",
        "the host's file after pull: {notes:?}"
    );
    let subject = launcher.git(&["log", "-1", "--format=%s"]).await?.stdout;
    ensure!(subject.trim() == "agent commit", "last commit: {subject}");
    Ok(())
}

/// A git repository on the host with one commit on `main`, the session's working directory.
async fn host_repo(dir: &Path, launcher: &Launcher) -> Result<()> {
    launcher.git(&["init", "-q", "-b", "main"]).await?;
    launcher.git(&["config", "user.name", "host"]).await?;
    // A credential helper the agent must never see.
    launcher
        .git(&["config", "credential.helper", "store"])
        .await?;
    launcher
        .git(&["config", "user.email", "host@paude.test"])
        .await?;
    std::fs::write(dir.join("README.txt"), "a project\n")?;
    launcher.git(&["add", "README.txt"]).await?;
    launcher.git(&["commit", "-q", "-m", "first"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_isolated_and_keeps_its_work() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        support::prepare_images().await?;
        let suffix = support::unique_suffix();
        let name = format!("e2e-{suffix}");
        // A proxy base of this test's own, so that its proxy image is built (and shown) anew.
        let mut alias = BaseAlias::new(&suffix).await?;
        let _guard = SessionGuard(name.clone());
        let upstream = Upstream::start(&suffix).await?;
        let service = ApiService::start(&suffix).await?;
        let dir = tempfile::tempdir()?;
        // This session runs the standalone paude-proxy; the other one the built-in proxy.
        let launcher = Launcher::new(Some(service.docker_host.clone()), dir.path())?
            .with_standalone_proxy()?;
        host_repo(dir.path(), &launcher).await?;
        let mut args = base_create_args(&name);
        set_flag(&mut args, "--proxy-base-image", &alias.image);
        for host in [ALLOWED_HOST, DENIED_HOST, ADDED_HOST] {
            args.push("--proxy-resolve".into());
            args.push(format!("{host}={}", upstream.ip));
        }
        args.extend([
            "--proxy-allow-cidr".into(),
            upstream.subnet.clone(),
            "--egress-network".into(),
            upstream.network.clone(),
            "--allowed-domains".into(),
            ALLOWED_HOST.into(),
            "--memory".into(),
            "1g".into(),
            "--pids-limit".into(),
            "512".into(),
            "--cpus".into(),
            "1.5".into(),
        ]);
        exercise_session(
            &mut checks,
            &launcher,
            &upstream,
            &args,
            dir.path(),
            &mut alias,
        )
        .await
    }
    .await;
    checks.record("the session was created and exercised", result);
    checks.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_attaches_and_a_mounted_session_with_its_own_egress_network_is_removed() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        support::prepare_images().await?;
        let suffix = support::unique_suffix();
        let name = format!("e2e-mnt-{suffix}");
        let mut alias = BaseAlias::new(&suffix).await?;
        let _guard = SessionGuard(name.clone());
        let service = ApiService::start(&suffix).await?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("host.txt"), "written on the host\n")?;
        // The proxy built into paude-launch, as after `cargo install --path launcher`.
        let launcher = Launcher::new(Some(service.docker_host.clone()), dir.path())?;
        let mut args = base_create_args(&name);
        // `run`, the quick start's one command: create, start and attach.
        args[0] = "run".into();
        set_flag(&mut args, "--proxy-base-image", &alias.image);
        args.extend([
            "--mount".into(),
            "--allowed-domains".into(),
            ALLOWED_HOST.into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let bin = Path::new(env!("CARGO_BIN_EXE_paude-launch"));
        let mut terminal = Terminal::spawn(launcher.command("script"), bin, &args)?;
        checks.record(
            "on a terminal, an image build is one status line with its step and time so far",
            async {
                terminal
                    .expect(
                        &format!("{REDRAW}paude: building image localhost/paude-proxy ["),
                        CREATE_LIMIT,
                    )
                    .await?;
                terminal.expect("s] step 1/", CREATE_LIMIT).await?;
                terminal
                    .expect(
                        &format!("{REDRAW}paude: built image localhost/paude-proxy:"),
                        CREATE_LIMIT,
                    )
                    .await?;
                let line = terminal.line(PROBE_LIMIT).await?;
                alias.built(&format!(
                    "localhost/paude-proxy:{}",
                    line.split_whitespace().next().unwrap_or_default()
                ));
                ensure!(line.contains(" in "), "no build time in {line:?}");
                Ok(())
            }
            .await,
        );
        checks.record(
            "before attaching, run says how to detach",
            terminal
                .expect(
                    &format!("paude: attaching to session {name}: detach with Ctrl-b d;"),
                    CREATE_LIMIT,
                )
                .await,
        );
        terminal.expect(TMUX_STATUS, CREATE_LIMIT).await?;
        checks.record(
            "run creates the session and lands in the agent's tmux; detaching keeps it",
            async {
                terminal.send(b"echo marker-$((6*7))\r").await?;
                terminal.expect("marker-42", PROBE_LIMIT).await?;
                terminal.expect("$ ", PROBE_LIMIT).await?;
                terminal.detach(PROBE_LIMIT).await?;
                let code = terminal.wait(PROBE_LIMIT).await?;
                ensure!(code == Some(0), "run exited with {code:?} after detaching");
                ensure!(
                    Session::is_running(&format!("paude-{name}-agent")).await?,
                    "the agent stopped when the terminal detached"
                );
                Ok(())
            }
            .await,
        );
        checks.record(
            "connect re-attaches to the same tmux session",
            async {
                let mut terminal =
                    Terminal::spawn(launcher.command("script"), bin, &["connect", &name])?;
                // The shell's earlier output is still on the redrawn screen.
                terminal.expect("marker-42", PROBE_LIMIT).await?;
                terminal.detach(PROBE_LIMIT).await?;
                let code = terminal.wait(PROBE_LIMIT).await?;
                ensure!(
                    code == Some(0),
                    "connect exited with {code:?} after detaching"
                );
                Ok(())
            }
            .await,
        );
        checks.record(
            "connect from inside the user's own tmux names the nested detach keys",
            async {
                let outer = HostTmux::start(&suffix).await?;
                let mut command = launcher.command("script");
                command.env("TMUX", &outer.env);
                let mut terminal = Terminal::spawn(command, bin, &["connect", &name])?;
                terminal
                    .expect(
                        &format!(
                            "paude: attaching to session {name}: detach with Ctrl-b Ctrl-b d \
                             (you are inside tmux: Ctrl-b d alone would detach your own)"
                        ),
                        PROBE_LIMIT,
                    )
                    .await?;
                terminal.expect("marker-42", PROBE_LIMIT).await?;
                // This terminal is not really inside the outer tmux: Ctrl-b d reaches the agent's.
                terminal.detach(PROBE_LIMIT).await?;
                let code = terminal.wait(PROBE_LIMIT).await?;
                ensure!(code == Some(0), "connect exited with {code:?}");
                Ok(())
            }
            .await,
        );
        checks.record(
            "connect without a terminal refuses at once instead of hanging",
            async {
                let out = launcher.run(&["connect", &name], COMMAND_LIMIT).await?;
                expect_refusal(&out, &[&name, "not a terminal"])
            }
            .await,
        );
        let agent = format!("paude-{name}-agent");
        let proxy = format!("paude-{name}-proxy");
        let egress = format!("paude-{name}-egress");
        let session = Session {
            name: name.clone(),
            agent: agent.clone(),
            proxy: proxy.clone(),
            proxy_ip: String::new(),
        };

        checks.record(
            "the session's own egress network joins the proxy, not the agent",
            async {
                let objects = session_objects(&name).await?;
                ensure!(
                    objects.contains(&format!("network {egress}")),
                    "no {egress}: {objects:?}"
                );
                let proxy_info = inspect("container", &proxy).await?;
                ensure!(
                    proxy_info["NetworkSettings"]["Networks"]
                        .get(&egress)
                        .is_some(),
                    "the proxy is not on {egress}"
                );
                let agent_info = inspect("container", &agent).await?;
                ensure!(
                    agent_info["NetworkSettings"]["Networks"]
                        .get(&egress)
                        .is_none(),
                    "the agent is on {egress}"
                );
                // The egress network's gateway is this machine: the agent must not reach it.
                let net = inspect("network", &egress).await?;
                let gateway = net["subnets"][0]["gateway"]
                    .as_str()
                    .context("the egress network has no gateway")?
                    .to_owned();
                expect_direct_failure(&session, &format!("http://{gateway}/")).await
            }
            .await,
        );
        checks.record(
            "--mount shows the current directory to the agent as its workspace",
            async {
                let seen = session.sh_ok("cat /workspace/host.txt").await?;
                ensure!(seen == "written on the host\n", "the agent sees {seen:?}");
                Ok(())
            }
            .await,
        );
        checks.record(
            "delete --confirm removes the session's own egress network and keeps the host's files",
            async {
                launcher
                    .ok(&["delete", &name, "--confirm"], COMMAND_LIMIT)
                    .await?;
                let left = session_objects(&name).await?;
                ensure!(left.is_empty(), "left behind: {left:?}");
                ensure!(
                    dir.path().join("host.txt").is_file(),
                    "delete removed the host's host.txt"
                );
                Ok(())
            }
            .await,
        );
        Ok(())
    }
    .await;
    checks.record("the mounted session was created and exercised", result);
    checks.finish();
}

/// Runs `args` and, once its progress prints a line containing `stage`, sends it `signal`;
/// returns everything it printed on stderr and whether the signal was sent.
async fn signal_at_stage(
    launcher: &Launcher,
    args: &[String],
    stage: &str,
    signal: &str,
) -> Result<(String, bool)> {
    use tokio::io::AsyncBufReadExt;
    let mut child = launcher
        .command(env!("CARGO_BIN_EXE_paude-launch"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id().context("paude-launch has no pid")?;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let mut seen = String::new();
    let mut sent = false;
    let read = async {
        while let Some(line) = lines.next_line().await? {
            seen.push_str(&line);
            seen.push('\n');
            if !sent && line.contains(stage) {
                let ok = std::process::Command::new("kill")
                    .args([&format!("-{signal}"), &pid.to_string()])
                    .status()?
                    .success();
                ensure!(ok, "kill -{signal} {pid} failed");
                sent = true;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(CREATE_LIMIT, read)
        .await
        .context("paude-launch did not end")??;
    child.wait().await?;
    Ok((seen, sent))
}

/// After a fault, `list`, `status` and `create` agree: the session is absent from all, or
/// listed and shown as it is; then the create (or, for a complete session, a start) finishes
/// it, and the agent reaches the upstream through its proxy.
async fn converges(launcher: &Launcher, args: &[String], name: &str) -> Result<()> {
    let status = launcher.run(&["status", name], COMMAND_LIMIT).await?;
    let list = launcher.ok(&["list"], COMMAND_LIMIT).await?.stdout;
    let listed = list
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name));
    ensure!(
        status.success() == listed,
        "list and status disagree about {name}: status {:?} ({}{}), list:\n{list}",
        status.code,
        status.stdout,
        status.stderr
    );
    let complete = status.success() && !status.stdout.contains("incomplete");
    if status.stdout.contains("incomplete") {
        ensure!(
            status
                .stdout
                .contains(&format!("paude-launch create {name}"))
                && list.contains(&format!("paude-launch create {name}")),
            "status and list of an incomplete session do not name the create that finishes \
             it:\n{}\n{list}",
            status.stdout
        );
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if complete {
        launcher.ok(&["start", name], COMMAND_LIMIT).await?;
    } else {
        launcher.ok(&args, CREATE_LIMIT).await?;
    }
    let state = launcher.ok(&["status", name], COMMAND_LIMIT).await?.stdout;
    ensure!(
        state.contains("state:       running"),
        "after the repair: {state}"
    );
    let session = Session {
        name: name.to_owned(),
        agent: format!("paude-{name}-agent"),
        proxy: format!("paude-{name}-proxy"),
        proxy_ip: String::new(),
    };
    eventually_upstream(&session, "http://allowed.test/after-repair", ALLOWED_HOST).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_interrupts_and_removed_containers_never_leave_a_stuck_session() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        support::prepare_images().await?;
        let suffix = support::unique_suffix();
        let name = format!("e2e-fault-{suffix}");
        let _guard = SessionGuard(name.clone());
        let upstream = Upstream::start(&suffix).await?;
        let service = ApiService::start(&suffix).await?;
        let dir = tempfile::tempdir()?;
        let launcher = Launcher::new(Some(service.docker_host.clone()), dir.path())?;
        let mut args = base_create_args(&name);
        args.extend([
            "--proxy-resolve".into(),
            format!("{ALLOWED_HOST}={}", upstream.ip),
            "--proxy-allow-cidr".into(),
            upstream.subnet.clone(),
            "--egress-network".into(),
            upstream.network.clone(),
            "--allowed-domains".into(),
            ALLOWED_HOST.into(),
        ]);
        // The images first, so that every create below reaches its stages at once.
        let str_args: Vec<&str> = args.iter().map(String::as_str).collect();
        launcher.ok(&str_args, CREATE_LIMIT).await?;
        launcher.ok(&["delete", &name, "--confirm"], COMMAND_LIMIT).await?;

        checks.record(
            "Ctrl-C during create removes what it made",
            async {
                let (stderr, sent) =
                    signal_at_stage(&launcher, &args, "starting proxy", "INT").await?;
                ensure!(sent, "create never reached its proxy stage:\n{stderr}");
                let left = session_objects(&name).await?;
                ensure!(
                    left.is_empty(),
                    "an interrupted create left {left:?}:\n{stderr}"
                );
                ensure!(
                    stderr.contains("removed"),
                    "the interrupted create does not say what it did:\n{stderr}"
                );
                converges(&launcher, &args, &name).await?;
                launcher.ok(&["delete", &name, "--confirm"], COMMAND_LIMIT).await?;
                Ok(())
            }
            .await,
        );
        for stage in ["creating networks", "starting proxy", "starting agent"] {
            checks.record(
                &format!("kill -9 of create at \"{stage}\" leaves a session the verbs agree on, and create finishes it"),
                async {
                    let (stderr, sent) = signal_at_stage(&launcher, &args, stage, "KILL").await?;
                    ensure!(sent, "create never reached \"{stage}\":\n{stderr}");
                    converges(&launcher, &args, &name).await?;
                    launcher.ok(&["delete", &name, "--confirm"], COMMAND_LIMIT).await?;
                    let left = session_objects(&name).await?;
                    ensure!(left.is_empty(), "delete left {left:?}");
                    Ok(())
                }
                .await,
            );
        }
        checks.record(
            "a removed agent or proxy container is re-created and the workspace is kept",
            async {
                launcher.ok(&str_args, CREATE_LIMIT).await?;
                let agent = format!("paude-{name}-agent");
                let proxy = format!("paude-{name}-proxy");
                support::podman_ok(
                    ["exec", agent.as_str(), "sh", "-c", "echo mine > /workspace/work.txt"],
                    COMMAND_LIMIT,
                )
                .await?;
                for removed in [&agent, &proxy] {
                    support::podman_ok(["rm", "-f", removed.as_str()], COMMAND_LIMIT).await?;
                    let start = launcher.run(&["start", &name], COMMAND_LIMIT).await?;
                    ensure!(
                        !start.success()
                            && start.stderr.contains(&format!("paude-launch create {name}"))
                            && start.stderr.contains("volume is kept")
                            && !start.stderr.contains("delete"),
                        "start of a session without {removed}: {}",
                        start.stderr
                    );
                    converges(&launcher, &args, &name).await?;
                    let work = support::podman_ok(
                        ["exec", agent.as_str(), "cat", "/workspace/work.txt"],
                        COMMAND_LIMIT,
                    )
                    .await?;
                    ensure!(work == "mine\n", "the workspace after re-creating {removed}: {work:?}");
                }
                Ok(())
            }
            .await,
        );
        Ok(())
    }
    .await;
    checks.record("the fault sequences ran", result);
    checks.finish();
}

/// The pids of `podman system service` processes serving a socket under `dir`.
async fn services_under(dir: &Path) -> Result<Vec<String>> {
    let out = support::run(
        {
            let mut c = Command::new("pgrep");
            c.args(["-f", &format!("system service .*{}/", dir.display())]);
            c
        },
        COMMAND_LIMIT,
        None,
    )
    .await?;
    Ok(out.stdout.split_whitespace().map(str::to_owned).collect())
}

/// The shared service directories paude-launch made under `tmp`, each checked to be this
/// user's alone.
fn service_dirs(tmp: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(tmp)?.flatten() {
        if e.file_name().to_string_lossy().starts_with("paude-engine-") {
            let mode = e.metadata()?.permissions().mode() & 0o777;
            ensure!(mode == 0o700, "{} has mode {mode:o}", e.path().display());
            dirs.push(e.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Waits until no API service runs under `tmp`: the idle period plus slack for a busy machine.
async fn services_stop(tmp: &Path, why: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = services_under(tmp).await?;
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{why}, but its API service still runs a minute later: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_api_service_serves_consecutive_commands_and_stops_when_idle() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        if Path::new("/run/podman/podman.sock").exists() {
            eprintln!("a system API socket exists, which paude-launch uses instead of its own");
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        // A TMPDIR of the test's own: its services are the only ones under it.
        let tmp = tempfile::tempdir()?;
        // No DOCKER_HOST: paude-launch starts the shared `podman system service`.
        let launcher = Launcher::new(None, dir.path())?;
        let list = |conf: Option<&Path>| {
            let mut cmd = launcher.command(env!("CARGO_BIN_EXE_paude-launch"));
            cmd.arg("list")
                .env("TMPDIR", tmp.path())
                .env_remove("XDG_RUNTIME_DIR");
            if let Some(conf) = conf {
                cmd.env("CONTAINERS_CONF", conf);
            }
            cmd
        };
        support::run(list(None), COMMAND_LIMIT, None)
            .await?
            .ok("paude-launch list")?;
        let first = services_under(tmp.path()).await?;
        ensure!(first.len() == 1, "one service after one command: {first:?}");
        ensure!(
            service_dirs(tmp.path())?.len() == 1,
            "one service directory"
        );
        support::run(list(None), COMMAND_LIMIT, None)
            .await?
            .ok("a second paude-launch list")?;
        let second = services_under(tmp.path()).await?;
        ensure!(
            second == first,
            "the second command did not reuse the service: {first:?}, then {second:?}"
        );
        // Another Podman configuration is another state: it gets a service of its own.
        let other = tmp.path().join("other-containers.conf");
        std::fs::copy(support::containers_conf(), &other)?;
        support::run(list(Some(&other)), COMMAND_LIMIT, None)
            .await?
            .ok("paude-launch list under another CONTAINERS_CONF")?;
        let both = services_under(tmp.path()).await?;
        ensure!(
            both.len() == 2 && both.contains(&first[0]),
            "a second configuration shares the first one's service: {both:?}"
        );
        ensure!(
            service_dirs(tmp.path())?.len() == 2,
            "two service directories"
        );
        services_stop(tmp.path(), "the last command ended").await?;

        // kill -9 lands while the service starts: a closed terminal or an OOM kill. A verb can
        // end before the service is seen; then it is tried again.
        let mut killed = false;
        for _ in 0..20 {
            let mut child = list(None)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let deadline = tokio::time::Instant::now() + COMMAND_LIMIT;
            while tokio::time::Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    break;
                }
                if !services_under(tmp.path()).await?.is_empty() {
                    child.start_kill()?;
                    child.wait().await?;
                    killed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if killed {
                break;
            }
            let _ = child.wait().await;
            services_stop(tmp.path(), "a command ended").await?;
        }
        ensure!(killed, "paude-launch never ran long enough to be killed");
        services_stop(tmp.path(), "paude-launch was killed").await?;
        // The stale socket of the stopped service is no obstacle to the next command.
        support::run(list(None), COMMAND_LIMIT, None)
            .await?
            .ok("paude-launch list after a killed one")?;
        services_stop(tmp.path(), "the last command ended").await
    }
    .await;
    checks.record(
        "the shared API service is reused and never outlives its commands",
        result,
    );
    checks.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_creates_nothing() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        support::prepare_images().await?;
        let name = format!("e2e-dry-{}", support::unique_suffix());
        let _guard = SessionGuard(name.clone());
        let dir = tempfile::tempdir()?;
        // No DOCKER_HOST: paude-launch finds or starts the Podman API service itself.
        let launcher = Launcher::new(None, dir.path())?;
        let images_before = paude_images().await?;
        let mut args = base_create_args(&name);
        args.extend(["--allowed-domains".into(), ALLOWED_HOST.into()]);
        args.push("--dry-run".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = launcher.ok(&args, COMMAND_LIMIT).await?;
        for object in ["agent", "proxy", "internal", "egress", "data"] {
            let full = format!("paude-{name}-{object}");
            ensure!(
                out.stdout.contains(&full),
                "the dry run does not mention {full}:\n{}",
                out.stdout
            );
        }
        let left = session_objects(&name).await?;
        ensure!(left.is_empty(), "the dry run created {left:?}");
        let images_after = paude_images().await?;
        // Only the images this plan names: other work on a shared machine builds images too.
        let planned = support::images_of_dry_run(&out.stdout);
        ensure!(
            !planned.is_empty(),
            "the dry run names no image:\n{}",
            out.stdout
        );
        let new: Vec<&String> = images_after
            .difference(&images_before)
            .filter(|i| planned.iter().any(|p| i.starts_with(&format!("{p} "))))
            .collect();
        ensure!(new.is_empty(), "the dry run built images: {new:?}");
        // The standalone paude-proxy of this build and the one built into paude-launch differ
        // in their bytes but not in what they are: the proxy image is the same.
        let standalone = Launcher::new(None, dir.path())?.with_standalone_proxy()?;
        let again = standalone.ok(&args, COMMAND_LIMIT).await?;
        let proxy_image = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("image localhost/paude-proxy:"))
                .map(str::to_owned)
        };
        ensure!(
            proxy_image(&out.stdout).is_some()
                && proxy_image(&out.stdout) == proxy_image(&again.stdout),
            "the built-in and the standalone proxy give different proxy images:\n{}\n---\n{}",
            out.stdout,
            again.stdout
        );
        Ok(())
    }
    .await;
    checks.record(
        "--dry-run prints the session's objects and creates nothing",
        result,
    );
    checks.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let suffix = support::unique_suffix();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let launcher = match Launcher::new(None, dir.path()) {
        Ok(launcher) => launcher,
        Err(err) => panic!("{err:#}"),
    };
    let unknown = format!("e2e-none-{suffix}");
    let _guard = SessionGuard(unknown.clone());

    let too_long = format!("e2e-{}", "x".repeat(40));
    for bad in [
        "Bad_Name",
        "UPPER",
        "trailing-",
        "9lives",
        "has.dot",
        &too_long,
    ] {
        checks.record(
            &format!("create refuses the bad name {bad:?}"),
            async {
                let args = base_create_args(bad);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = launcher.run(&args, COMMAND_LIMIT).await?;
                expect_refusal(&out, &[bad])?;
                let left = session_objects(bad).await?;
                ensure!(left.is_empty(), "created {left:?}");
                Ok(())
            }
            .await,
        );
    }
    let fresh = format!("e2e-bad-{suffix}");
    checks.record(
        "create refuses an unknown agent",
        async {
            let args = create_args_for(&fresh, "no-such-agent");
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = launcher.run(&args, COMMAND_LIMIT).await?;
            expect_refusal(&out, &["no-such-agent"])?;
            let left = session_objects(&fresh).await?;
            ensure!(left.is_empty(), "created {left:?}");
            Ok(())
        }
        .await,
    );
    for (what, extra, mention) in [
        (
            "a bad allowed-domains item",
            ["--allowed-domains", "not a domain!"],
            "not a domain!",
        ),
        ("a bad memory limit", ["--memory", "lots"], "lots"),
    ] {
        checks.record(
            &format!("create refuses {what}"),
            async {
                let mut args = base_create_args(&fresh);
                args.extend(extra.map(str::to_owned));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = launcher.run(&args, COMMAND_LIMIT).await?;
                expect_refusal(&out, &[mention])?;
                let left = session_objects(&fresh).await?;
                ensure!(left.is_empty(), "created {left:?}");
                Ok(())
            }
            .await,
        );
    }
    let verbs: [&[&str]; 7] = [
        &["start"],
        &["stop"],
        &["status"],
        &["blocked"],
        &["allowed-domains"],
        &["allowed-domains", "--add", "example.test"],
        &["delete", "--confirm"],
    ];
    for verb in verbs {
        let mut args = vec![verb[0], unknown.as_str()];
        args.extend(&verb[1..]);
        checks.record(
            &format!("{} refuses an unknown session", args.join(" ")),
            async {
                let out = launcher.run(&args, COMMAND_LIMIT).await?;
                expect_refusal(&out, &[&unknown])?;
                let left = session_objects(&unknown).await?;
                ensure!(left.is_empty(), "created {left:?}");
                Ok(())
            }
            .await,
        );
    }
    checks.record(
        "delete without --confirm is refused",
        async {
            let out = launcher.run(&["delete", &unknown], COMMAND_LIMIT).await?;
            expect_refusal(&out, &["--confirm"])
        }
        .await,
    );
    checks.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_netavark_session_has_no_way_out() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        support::netavark::require_netavark()?;
        support::prepare_images().await?;
        let suffix = support::unique_suffix();
        let name = format!("e2e-nv-{suffix}");
        let dir = tempfile::tempdir()?;
        let mut args = base_create_args(&name);
        args.extend(["--allowed-domains".into(), ALLOWED_HOST.into()]);

        // The session's images, made in the system's state when missing there and copied over:
        // nothing is built under the netavark state's fake resolver.
        let system = Launcher::new(None, dir.path())?;
        let mut dry = args.clone();
        dry.push("--dry-run".into());
        let dry: Vec<&str> = dry.iter().map(String::as_str).collect();
        let mut images = support::images_of_dry_run(&system.ok(&dry, COMMAND_LIMIT).await?.stdout);
        ensure!(images.len() == 2, "the dry run names no images: {images:?}");
        let mut have_all = true;
        for image in &images {
            have_all &= run(
                support::podman(["image", "exists", image]),
                COMMAND_LIMIT,
                None,
            )
            .await?
            .success();
        }
        if !have_all {
            let prep = format!("e2e-nvprep-{suffix}");
            let _prep_guard = SessionGuard(prep.clone());
            let mut prep_args = base_create_args(&prep);
            prep_args.extend(["--allowed-domains".into(), ALLOWED_HOST.into()]);
            let prep_args: Vec<&str> = prep_args.iter().map(String::as_str).collect();
            system.ok(&prep_args, CREATE_LIMIT).await?;
            system
                .ok(&["delete", &prep, "--confirm"], COMMAND_LIMIT)
                .await?;
        }
        images.extend([BASE_IMAGE.to_owned(), support::UPSTREAM_IMAGE.to_owned()]);

        let active = support::netavark::activate(&suffix, &images).await?;
        let backend = podman_ok(
            ["info", "--format", "{{.Host.NetworkBackend}}"],
            COMMAND_LIMIT,
        )
        .await?;
        ensure!(
            backend.trim() == "netavark",
            "the private state runs {backend}"
        );
        let _guard = SessionGuard(name.clone());
        let upstream = Upstream::start(&suffix).await?;
        let service = ApiService::start(&suffix).await?;
        let launcher = Launcher::new(Some(service.docker_host.clone()), dir.path())?;
        for host in [ALLOWED_HOST, DENIED_HOST] {
            args.push("--proxy-resolve".into());
            args.push(format!("{host}={}", upstream.ip));
        }
        args.extend([
            "--proxy-allow-cidr".into(),
            upstream.subnet.clone(),
            "--egress-network".into(),
            upstream.network.clone(),
        ]);
        let create: Vec<&str> = args.iter().map(String::as_str).collect();
        let created = launcher.ok(&create, CREATE_LIMIT).await?;
        eprintln!("create printed:\n{}{}", created.stdout, created.stderr);

        let agent = format!("paude-{name}-agent");
        let proxy = format!("paude-{name}-proxy");
        let internal = format!("paude-{name}-internal");
        let proxy_ip = inspect("container", &proxy).await?["NetworkSettings"]["Networks"]
            [&internal]["IPAddress"]
            .as_str()
            .context("the proxy has no address on the internal network")?
            .to_owned();
        let session = Session {
            name: name.clone(),
            agent: agent.clone(),
            proxy: proxy.clone(),
            proxy_ip: proxy_ip.clone(),
        };
        checks.record(
            "on netavark the proxy still answers and still refuses",
            async {
                expect_upstream(
                    &session,
                    "http://allowed.test/netavark",
                    "http",
                    ALLOWED_HOST,
                )
                .await?;
                expect_forward_denied(&session, "http://denied.test/").await
            }
            .await,
        );
        no_way_out_but_the_proxy(
            &mut checks,
            &launcher,
            &session,
            &internal,
            Some(&active.resolver),
        )
        .await;
        checks.record(
            "start refuses a session whose network leaks, and stops it",
            start_refuses_a_leak(&launcher, &session, &internal).await,
        );
        checks.record(
            "delete --confirm leaves nothing of the session in the netavark state",
            async {
                launcher
                    .ok(&["delete", &name, "--confirm"], COMMAND_LIMIT)
                    .await?;
                let left = session_objects(&name).await?;
                ensure!(left.is_empty(), "left behind: {left:?}");
                Ok(())
            }
            .await,
        );
        checks.record(
            "no packet left the test's subnets and the fake resolver was never asked",
            async {
                let escaped = active.escaped_packets()?;
                ensure!(
                    escaped == 0,
                    "the guard dropped {escaped} packets leaving the test's subnets"
                );
                let asked = support::netavark::settled_queries(&active.resolver).await;
                ensure!(
                    asked.is_empty(),
                    "the fake resolver was asked for {asked:?}"
                );
                Ok(())
            }
            .await,
        );
        drop(service);
        drop(upstream);
        drop(_guard);
        drop(active);
        Ok(())
    }
    .await;
    checks.record("the netavark session was created and exercised", result);
    checks.finish();
}

/// A Docker engine of this machine's own (Debian's docker.io) on private directories and a
/// private socket, with no bridge and no iptables rules, so it touches neither the host's
/// network nor Podman; stopped and removed when dropped.
struct Dockerd {
    child: tokio::process::Child,
    dir: PathBuf,
    host: String,
}

impl Dockerd {
    async fn start(suffix: &str) -> Result<Dockerd> {
        support::require::require(&[
            support::require::program("dockerd", "docker.io"),
            support::require::program("containerd", "containerd"),
        ]);
        let dir = PathBuf::from(format!("/var/tmp/paude-e2e-docker-{suffix}"));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("docker.sock");
        let host = format!("unix://{}", socket.display());
        let child = Command::new("dockerd")
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--pidfile={}", dir.join("docker.pid").display()))
            .args(["-H", &host])
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .arg("--log-level=error")
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start dockerd")?;
        let dockerd = Dockerd { child, dir, host };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if socket.exists() {
                let docker = bollard::Docker::connect_with_unix(
                    &dockerd.host,
                    10,
                    bollard::API_DEFAULT_VERSION,
                )?;
                if docker.ping().await.is_ok() {
                    return Ok(dockerd);
                }
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "dockerd did not answer on {} within 60 s",
                dockerd.host
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn client(&self) -> Result<bollard::Docker> {
        Ok(bollard::Docker::connect_with_unix(
            &self.host,
            30,
            bollard::API_DEFAULT_VERSION,
        )?)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM lets dockerd stop its containerd; then whatever is left goes.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            for _ in 0..100 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_engine_whose_internal_dns_forwards_is_refused() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        let suffix = support::unique_suffix();
        let dockerd = Dockerd::start(&suffix).await?;
        let docker = dockerd.client()?;
        let version = docker.version().await?.version.unwrap_or_default();
        let dir = tempfile::tempdir()?;
        let launcher = Launcher::new(Some(dockerd.host.clone()), dir.path())?;
        let name = format!("e2e-dk-{suffix}");
        let mut args = base_create_args(&name);
        args.extend(["--allowed-domains".into(), ALLOWED_HOST.into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        checks.record(
            &format!("create on Docker {version} is refused, naming the fixed versions and why"),
            async {
                let out = launcher.run(&args, COMMAND_LIMIT).await?;
                expect_refusal(&out, &["26.0.0", "CVE-2024-29018", &version, "Podman"])
            }
            .await,
        );
        checks.record(
            "start on that engine is refused the same way",
            async {
                let out = launcher.run(&["start", &name], COMMAND_LIMIT).await?;
                expect_refusal(&out, &["26.0.0", "CVE-2024-29018"])
            }
            .await,
        );
        checks.record(
            "the refused engine got no image, network, volume or container",
            async {
                let images = docker.list_images(None::<bollard::query_parameters::ListImagesOptions>).await?;
                let networks: Vec<String> = docker
                    .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
                    .await?
                    .into_iter()
                    .filter_map(|n| n.name)
                    .filter(|n| !["bridge", "host", "none"].contains(&n.as_str()))
                    .collect();
                let volumes = docker.list_volumes(None::<bollard::query_parameters::ListVolumesOptions>).await?;
                let containers = docker
                    .list_containers(Some(
                        bollard::query_parameters::ListContainersOptionsBuilder::new()
                            .all(true)
                            .build(),
                    ))
                    .await?;
                ensure!(
                    images.is_empty()
                        && networks.is_empty()
                        && volumes.volumes.unwrap_or_default().is_empty()
                        && containers.is_empty(),
                    "the engine holds images {images:?}, networks {networks:?}, containers {containers:?}"
                );
                let listed = launcher.ok(&["list"], COMMAND_LIMIT).await?;
                ensure!(
                    !listed.stdout.contains(&name),
                    "list shows the refused session: {}",
                    listed.stdout
                );
                Ok(())
            }
            .await,
        );
        Ok(())
    }
    .await;
    checks.record("the Docker engine was started and asked", result);
    checks.finish();
}

/// A port on 127.0.0.1 that was just free: nothing listens there.
fn closed_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `args` off a terminal and on one, and checks both runs fail with one message that
/// mentions every word of `mentions`, create nothing, and, on the terminal, start that message
/// on a line of its own (after the build's status line was cleared).
async fn expect_refusal_on_and_off_a_terminal(
    checks: &mut Checks,
    launcher: &Launcher,
    name: &str,
    args: &[String],
    mentions: &[&str],
) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    checks.record(
        "off a terminal: the error names the cause and the fix, and nothing is created",
        async {
            let out = launcher.run(&args, CREATE_LIMIT).await?;
            expect_refusal(&out, mentions)?;
            let left = session_objects(name).await?;
            ensure!(left.is_empty(), "left behind: {left:?}");
            Ok(())
        }
        .await,
    );
    checks.record(
        "on a terminal: the same error, on a clean line",
        async {
            let bin = Path::new(env!("CARGO_BIN_EXE_paude-launch"));
            let mut terminal = Terminal::spawn(launcher.command("script"), bin, &args)?;
            terminal
                .expect("paude-launch: error: ", CREATE_LIMIT)
                .await?;
            let before = terminal.before();
            ensure!(
                before.is_empty() || before.ends_with('\n') || before.ends_with(REDRAW),
                "the error does not start a line of its own: {before:?}"
            );
            let message = terminal.line(COMMAND_LIMIT).await?;
            for word in mentions {
                ensure!(
                    message.contains(word),
                    "the message does not mention {word:?}: {message}"
                );
            }
            let code = terminal.wait(COMMAND_LIMIT).await?;
            ensure!(code == Some(1), "exited with {code:?}");
            let left = session_objects(name).await?;
            ensure!(left.is_empty(), "left behind: {left:?}");
            Ok(())
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpullable_base_image_names_both_base_image_flags() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        let suffix = support::unique_suffix();
        let name = format!("e2e-pull-{suffix}");
        let _guard = SessionGuard(name.clone());
        let service = ApiService::start(&suffix).await?;
        let dir = tempfile::tempdir()?;
        let launcher = Launcher::new(Some(service.docker_host.clone()), dir.path())?;
        // A registry on loopback that nothing serves: the pull fails at once, and no request
        // leaves the machine.
        let registry = format!("127.0.0.1:{}", closed_port()?);
        let base = format!("{registry}/debian:bookworm-slim");
        let mut args = base_create_args(&name);
        set_flag(&mut args, "--base-image", &base);
        set_flag(&mut args, "--proxy-base-image", &base);
        let mentions = [
            base.as_str(),
            "cannot be pulled",
            "--base-image IMAGE",
            "--proxy-base-image IMAGE",
        ];
        expect_refusal_on_and_off_a_terminal(&mut checks, &launcher, &name, &args, &mentions).await;
        Ok(())
    }
    .await;
    checks.record("the unpullable base was tried", result);
    checks.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_cannot_apply_the_ulimits_points_to_the_containers_conf_fix() {
    let _podman = PODMAN.lock().await;
    let mut checks = Checks::default();
    let result = async {
        support::prepare_images().await?;
        let suffix = support::unique_suffix();
        let name = format!("e2e-ulimit-{suffix}");
        let _guard = SessionGuard(name.clone());
        // Podman's configuration asks for more open files than the kernel allows anyone
        // (fs.nr_open), as Podman's default asks for more than a low hard limit allows: runc
        // fails the same way on every machine.
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")?
            .trim()
            .parse()?;
        let conf = std::fs::read_to_string(support::containers_conf())?;
        ensure!(
            conf.contains("\"nofile=10000:10000\""),
            "the suite's containers.conf changed"
        );
        let too_many = format!("\"nofile={0}:{0}\"", nr_open + 1);
        let dir = tempfile::tempdir()?;
        let bad = dir.path().join("containers.conf");
        std::fs::write(&bad, conf.replace("\"nofile=10000:10000\"", &too_many))?;
        let service = ApiService::start_with(&suffix, &bad).await?;
        let launcher = Launcher::new(Some(service.docker_host.clone()), dir.path())?;
        let args = base_create_args(&name);
        let mentions = [
            "error setting rlimit",
            "cannot apply Podman's default ulimits",
            "default_ulimits",
            "CONTAINERS_CONF",
            "\"Troubleshooting\" in README.md",
        ];
        expect_refusal_on_and_off_a_terminal(&mut checks, &launcher, &name, &args, &mentions).await;
        Ok(())
    }
    .await;
    checks.record("the session was tried under the impossible ulimits", result);
    checks.finish();
}
