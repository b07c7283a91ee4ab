//! The environment of the end-to-end Podman suite: child processes under a deadline, the
//! Podman configuration and local images the suite needs, the upstream "internet" container on
//! a test-created network, and the `Checks` list that runs every check of a session and reports
//! all failures at once.
//!
//! Nothing here talks to a real external address: the base image is made locally with
//! debootstrap, and the upstream server sits on an internal network of its own that the
//! session's proxy joins through `--egress-network`.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

#[path = "../../../tests/require.rs"]
pub mod require;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

pub mod isolation;
pub mod netavark;

/// The local base image of both the agent and the proxy image in the suite.
pub const BASE_IMAGE: &str = "localhost/paude-test-base:bookworm";
/// The upstream server's image, built from `tests/podman/upstream`.
pub const UPSTREAM_IMAGE: &str = "localhost/paude-test-upstream:latest";
/// Label on every object the suite itself creates (not the sessions), for cleanup.
pub const SUITE_LABEL: &str = "paude-e2e";

/// The names the suite pins to the upstream server through `--proxy-resolve`.
pub const ALLOWED_HOST: &str = "allowed.test";
pub const DENIED_HOST: &str = "denied.test";
pub const ADDED_HOST: &str = "added.test";

/// What a finished child process left behind.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails with both streams when the process did not exit with status 0.
    pub fn ok(self, what: &str) -> Result<Output> {
        ensure!(
            self.success(),
            "{what} exited with {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout.trim(),
            self.stderr.trim()
        );
        Ok(self)
    }
}

/// Runs a command to completion, killing it when `limit` passes, optionally feeding `stdin`.
pub async fn run(mut cmd: Command, limit: Duration, stdin: Option<&[u8]>) -> Result<Output> {
    let shown = format!("{:?}", cmd.as_std());
    cmd.kill_on_drop(true)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().context("stdin was not piped")?;
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            // A child that exits without reading its input is reported through its status.
            let _ = pipe.write_all(&bytes).await;
        });
    }
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("{shown} did not finish within {limit:?}"))?
        .with_context(|| format!("cannot wait for {shown}"))?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A short suffix that keeps names of concurrent runs apart.
pub fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:06x}", (nanos ^ (std::process::id() << 12)) & 0xff_ffff)
}

/// The repository root (the workspace containing `launcher/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent directory")
        .to_path_buf()
}

/// The Podman configuration the whole suite runs under.
pub fn containers_conf() -> PathBuf {
    repo_root().join("tests/podman/containers.conf")
}

/// Every program the Podman suite drives, with the package that brings it. runc and
/// debootstrap live in /usr/sbin, which a non-login PATH may lack; Podman and
/// make-base-image.sh find them there anyway.
pub const SUITE_TOOLS: &[require::Tool] = &[
    require::program("podman", "podman"),
    require::program("runc", "runc"),
    require::program("debootstrap", "debootstrap"),
    require::program("git", "git"),
    require::program("tar", "tar"),
    require::program("script", "bsdutils"),
    require::program("tmux", "tmux"),
    // Podman's init for `--init` containers, and the CNI plugins of its networks.
    require::Tool {
        name: "catatonit",
        candidates: &[
            "/usr/libexec/podman/catatonit",
            "/usr/bin/catatonit",
            "catatonit",
        ],
        package: "catatonit",
    },
    require::Tool {
        name: "the CNI bridge plugin",
        candidates: &["/usr/lib/cni/bridge", "/opt/cni/bin/bridge"],
        package: "containernetworking-plugins",
    },
];

/// Fails with the install command when a program the suite drives is missing.
pub fn require_suite_tools() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    match require::missing_message(SUITE_TOOLS, &require::search_dirs(&path)) {
        Some(message) => bail!("{message}"),
        None => Ok(()),
    }
}

/// The paude-proxy binary built by the same `cargo test --workspace` run, which sits next to
/// this test's own `deps/` directory.
pub fn proxy_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not inside target/<profile>/deps")?;
    let bin = profile_dir.join("paude-proxy");
    ensure!(
        bin.is_file(),
        "{} does not exist: build it with `cargo build -p paude-proxy` (with the same \
         CARGO_TARGET_DIR) or run the whole suite with `cargo test --workspace`",
        bin.display()
    );
    Ok(bin)
}

/// A `podman` command under the suite's configuration: the system's Podman state (CNI), or
/// while a test holds a [`netavark::State`], that private state inside its mount namespace.
pub fn podman<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = match netavark::current() {
        Some(state) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(state.mount_namespace())
                .arg("--")
                .arg("podman")
                .env("CONTAINERS_CONF", &state.containers_conf)
                .env("CONTAINERS_STORAGE_CONF", &state.storage_conf);
            cmd
        }
        None => {
            let mut cmd = Command::new("podman");
            cmd.env("CONTAINERS_CONF", containers_conf());
            cmd
        }
    };
    cmd.args(args);
    cmd
}

/// Runs podman and returns its standard output, failing on a non-zero status.
pub async fn podman_ok<I, S>(args: I, limit: Duration) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let cmd = podman(args);
    let shown = format!("{:?}", cmd.as_std());
    Ok(run(cmd, limit, None).await?.ok(&shown)?.stdout)
}

/// `podman inspect` of one object, as JSON (the first element of podman's array).
pub async fn inspect(kind: &str, name: &str) -> Result<Value> {
    let text = podman_ok([kind, "inspect", name], Duration::from_secs(30)).await?;
    let mut all: Vec<Value> =
        serde_json::from_str(&text).with_context(|| format!("{kind} inspect {name}: {text}"))?;
    ensure!(!all.is_empty(), "{kind} inspect {name} returned nothing");
    Ok(all.swap_remove(0))
}

/// Names of containers, networks and volumes labelled `paude.session=NAME` or named
/// `paude-NAME-*`: everything a session may own.
pub async fn session_objects(name: &str) -> Result<BTreeSet<String>> {
    let label = format!("label=paude.session={name}");
    let prefix = format!("paude-{name}-");
    let limit = Duration::from_secs(30);
    let mut found = BTreeSet::new();
    let lists = [
        (
            "container",
            vec!["ps", "-a", "--format", "{{.Names}}", "--filter", &label],
        ),
        ("container", vec!["ps", "-a", "--format", "{{.Names}}"]),
        (
            "network",
            vec!["network", "ls", "--format", "{{.Name}}", "--filter", &label],
        ),
        ("network", vec!["network", "ls", "--format", "{{.Name}}"]),
        (
            "volume",
            vec!["volume", "ls", "--format", "{{.Name}}", "--filter", &label],
        ),
        ("volume", vec!["volume", "ls", "--format", "{{.Name}}"]),
    ];
    for (kind, args) in lists {
        let filtered = args.iter().any(|a| a.starts_with("label="));
        for line in podman_ok(&args, limit).await?.lines() {
            let line = line.trim();
            if !line.is_empty() && (filtered || line.starts_with(&prefix)) {
                found.insert(format!("{kind} {line}"));
            }
        }
    }
    Ok(found)
}

/// Image references (`repo:tag`) whose repository starts with `localhost/paude-` but are not
/// the suite's own test images.
pub async fn paude_images() -> Result<BTreeSet<String>> {
    let text = podman_ok(
        ["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
        Duration::from_secs(30),
    )
    .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("localhost/paude-") && !l.starts_with("localhost/paude-test-"))
        .map(str::to_owned)
        .collect())
}

/// The image references a `--dry-run` of create prints (`image REF (what)` lines).
pub fn images_of_dry_run(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("image "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Removes every object of a session by label and name, whatever the launcher left; used by
/// the suite's cleanup so a failed run does not leak into the next one.
pub fn force_remove_session(name: &str) {
    let label = format!("label=paude.session={name}");
    let script = format!(
        "podman ps -aq --filter {label} | xargs -r podman rm -f -t 0; \
         podman ps -aq --filter name=^paude-{name}- | xargs -r podman rm -f -t 0; \
         podman volume ls -q --filter {label} | xargs -r podman volume rm -f; \
         podman volume ls -q --filter name=^paude-{name}- | xargs -r podman volume rm -f; \
         podman network ls -q --filter {label} | xargs -r podman network rm -f; \
         podman network ls -q --filter name=^paude-{name}- | xargs -r podman network rm -f"
    );
    blocking_cleanup(&script);
}

/// Runs a cleanup script synchronously (from `Drop`), bounded by coreutils `timeout`, against
/// the Podman state [`podman`] uses.
fn blocking_cleanup(script: &str) {
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg("120");
    match netavark::current() {
        Some(state) => cmd
            .args(["nsenter", &state.mount_namespace(), "--"])
            .env("CONTAINERS_CONF", &state.containers_conf)
            .env("CONTAINERS_STORAGE_CONF", &state.storage_conf),
        None => cmd.env("CONTAINERS_CONF", containers_conf()),
    };
    let status = cmd
        .args(["sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(err) = status {
        eprintln!("cleanup failed to run: {err}");
    }
}

/// Makes the local base image (idempotent) and builds the upstream image (cached layers).
pub async fn prepare_images() -> Result<()> {
    require_suite_tools()?;
    let script = repo_root().join("tests/podman/make-base-image.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(BASE_IMAGE)
        .env("CONTAINERS_CONF", containers_conf());
    run(cmd, Duration::from_secs(600), None)
        .await?
        .ok("tests/podman/make-base-image.sh")?;
    let context = repo_root().join("tests/podman/upstream");
    let context = context.to_str().context("non-UTF-8 repository path")?;
    podman_ok(
        ["build", "-q", "-t", UPSTREAM_IMAGE, context],
        Duration::from_secs(600),
    )
    .await
    .context("building the upstream server image")?;
    Ok(())
}

/// The suite's "internet": one upstream server on an internal network of its own.
pub struct Upstream {
    pub network: String,
    pub container: String,
    pub subnet: String,
    pub ip: String,
}

impl Upstream {
    /// Creates the network (subnet chosen by Podman) and starts the server on it.
    pub async fn start(suffix: &str) -> Result<Upstream> {
        let network = format!("paude-e2e-net-{suffix}");
        let container = format!("paude-e2e-up-{suffix}");
        let mut upstream = Upstream {
            network: network.clone(),
            container: container.clone(),
            subnet: String::new(),
            ip: String::new(),
        };
        let limit = Duration::from_secs(60);
        let label = format!("{SUITE_LABEL}=1");
        // No DNS server either: with netavark one would forward names to the host's resolvers.
        podman_ok(
            [
                "network",
                "create",
                "--internal",
                "--disable-dns",
                "--label",
                &label,
                &network,
            ],
            limit,
        )
        .await?;
        let net = inspect("network", &network).await?;
        upstream.subnet = net["subnets"][0]["subnet"]
            .as_str()
            .context("network inspect shows no subnet")?
            .to_owned();
        podman_ok(
            [
                "run",
                "-d",
                "--name",
                &container,
                "--label",
                &label,
                "--network",
                &network,
                UPSTREAM_IMAGE,
            ],
            limit,
        )
        .await?;
        let info = inspect("container", &container).await?;
        upstream.ip = info["NetworkSettings"]["Networks"][&network]["IPAddress"]
            .as_str()
            .filter(|ip| !ip.is_empty())
            .with_context(|| format!("the upstream has no address on {network}"))?
            .to_owned();
        // The server prints one line once both listeners are bound.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if upstream.log().await?.contains("listening on 80 and 443") {
                return Ok(upstream);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the upstream server did not start: {}",
                    upstream.log().await?
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Everything the server logged: one `request scheme=S host=H path=P` line per request.
    pub async fn log(&self) -> Result<String> {
        podman_ok(["logs", &self.container], Duration::from_secs(30)).await
    }

    /// The server's certificate, for `curl --cacert` inside the agent.
    pub async fn certificate(&self) -> Result<String> {
        podman_ok(
            ["exec", &self.container, "cat", "/srv/cert.pem"],
            Duration::from_secs(30),
        )
        .await
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        blocking_cleanup(&format!(
            "podman rm -f -t 0 {c}; podman network rm -f {n}",
            c = self.container,
            n = self.network
        ));
    }
}

/// Removes a session's objects when dropped, so a failing run leaves nothing behind.
pub struct SessionGuard(pub String);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        force_remove_session(&self.0);
    }
}

/// A `podman system service` on a private socket for the duration of a test, so the many
/// paude-launch commands of a session share one API server (`DOCKER_HOST`).
pub struct ApiService {
    child: tokio::process::Child,
    pub docker_host: String,
    socket: PathBuf,
}

impl ApiService {
    /// The service under the configuration [`podman`] uses: the suite's, or while a test
    /// holds a [`netavark::State`], that private state's.
    pub async fn start(suffix: &str) -> Result<ApiService> {
        ApiService::start_cmd(suffix, |_| {}).await
    }

    /// The service under another Podman configuration than the suite's.
    pub async fn start_with(suffix: &str, containers_conf: &Path) -> Result<ApiService> {
        ApiService::start_cmd(suffix, |cmd| {
            cmd.env("CONTAINERS_CONF", containers_conf);
        })
        .await
    }

    async fn start_cmd(suffix: &str, configure: impl FnOnce(&mut Command)) -> Result<ApiService> {
        let socket = PathBuf::from(format!("/tmp/paude-e2e-{suffix}.sock"));
        let _ = std::fs::remove_file(&socket);
        let uri = format!("unix://{}", socket.display());
        let mut cmd = podman(["system", "service", "--time=0", &uri]);
        configure(&mut cmd);
        let child = cmd
            .kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start podman system service")?;
        let service = ApiService {
            child,
            docker_host: uri,
            socket,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !service.socket.exists() {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "podman system service did not create {}",
                service.socket.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(service)
    }
}

impl Drop for ApiService {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Every check of a test, run one after another; failures are collected so one run reports
/// all broken behaviours, and the test fails at the end if any check failed.
#[derive(Default)]
pub struct Checks {
    failures: Vec<String>,
    passed: usize,
}

impl Checks {
    pub fn record(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                eprintln!("ok    {name}");
            }
            Err(err) => {
                eprintln!("FAIL  {name}: {err:#}");
                self.failures.push(format!("{name}: {err:#}"));
            }
        }
    }

    pub fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} checks failed:\n- {}",
            self.failures.len(),
            self.failures.len() + self.passed,
            self.failures.join("\n- ")
        );
    }
}

/// An interactive command on a pseudo-terminal (util-linux `script`), typed into and read from
/// like a person would: for `run` and `connect`, which attach to the agent's tmux.
pub struct Terminal {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    /// What was printed and not yet matched.
    seen: Vec<u8>,
    /// What stood before the last match.
    consumed: Vec<u8>,
}

impl Terminal {
    /// Starts `program args...` under `script`, with `base`'s environment and directory, on a
    /// terminal of 200 columns and 50 rows (a pseudo-terminal has no size of its own).
    pub fn spawn(mut base: Command, program: &Path, args: &[&str]) -> Result<Terminal> {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let line = std::iter::once(quote(&program.to_string_lossy()))
            .chain(args.iter().map(|a| quote(a)))
            .collect::<Vec<_>>()
            .join(" ");
        let line = format!("stty cols 200 rows 50; exec {line}");
        base.args(["-qfec", &line, "/dev/null"])
            .kill_on_drop(true)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = base.spawn().context("cannot start script (util-linux)")?;
        let stdin = child.stdin.take().context("stdin was not piped")?;
        let stdout = child.stdout.take().context("stdout was not piped")?;
        Ok(Terminal {
            child,
            stdin,
            stdout,
            seen: Vec::new(),
            consumed: Vec::new(),
        })
    }

    /// Reads the terminal until `needle` appears in what was printed since the last match.
    pub async fn expect(&mut self, needle: &str, limit: Duration) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(at) = find(&self.seen, needle.as_bytes()) {
                self.consumed = self.seen.drain(..at + needle.len()).take(at).collect();
                return Ok(());
            }
            let read = tokio::time::timeout_at(deadline, self.stdout.read(&mut buf))
                .await
                .with_context(|| {
                    format!(
                        "{needle:?} did not appear within {limit:?}; the terminal showed: {}",
                        String::from_utf8_lossy(&self.seen)
                    )
                })??;
            ensure!(
                read > 0,
                "the terminal closed before {needle:?} appeared: {}",
                String::from_utf8_lossy(&self.seen)
            );
            self.seen.extend_from_slice(&buf[..read]);
        }
    }

    /// What was printed before the text the last `expect` matched.
    pub fn before(&self) -> String {
        String::from_utf8_lossy(&self.consumed).into_owned()
    }

    /// Reads up to the end of the current line and returns what stood before it.
    pub async fn line(&mut self, limit: Duration) -> Result<String> {
        self.expect("\n", limit).await?;
        Ok(self.before().trim_end().to_owned())
    }

    /// Types bytes into the terminal.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stdin.write_all(bytes).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Detaches from the agent's tmux with its prefix and `d`, as a person would, and waits for
    /// tmux to confirm. Keys that arrive while tmux is still busy redrawing may not take; they
    /// are typed again until tmux confirms or `limit` passes, instead of guessing a pause.
    pub async fn detach(&mut self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.send(b"\x02d").await?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait = Duration::from_secs(5).min(left);
            match self.expect("[detached", wait).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => continue,
            }
        }
    }

    /// Waits for the command to exit and returns its status code.
    pub async fn wait(mut self, limit: Duration) -> Result<Option<i32>> {
        use tokio::io::AsyncReadExt;
        // Keep draining the terminal so the command never blocks on a full pipe.
        let mut stdout = self.stdout;
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink).await;
        });
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| format!("the command did not exit within {limit:?}"))??;
        drain.abort();
        Ok(status.code())
    }
}

/// The first position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A tag of the suite's base image that only one test uses, so that an image built from it
/// (the proxy image, which builds in seconds) is built again by that test and its build output
/// can be checked. Dropped, it removes the tag and the images recorded with [`BaseAlias::built`].
pub struct BaseAlias {
    pub image: String,
    built: Vec<String>,
}

impl BaseAlias {
    pub async fn new(suffix: &str) -> Result<BaseAlias> {
        let image = format!("localhost/paude-test-base:e2e-{suffix}");
        podman_ok(["tag", BASE_IMAGE, &image], Duration::from_secs(60)).await?;
        Ok(BaseAlias {
            image,
            built: Vec::new(),
        })
    }

    /// Records an image built from this base, to be removed with it.
    pub fn built(&mut self, reference: &str) {
        self.built.push(reference.to_owned());
    }
}

impl Drop for BaseAlias {
    fn drop(&mut self) {
        // Without -f: an image still in use (a session that outlived its test) is left alone.
        let mut script = String::new();
        for image in self.built.iter().chain([&self.image]) {
            script.push_str(&format!("podman rmi {image}; "));
        }
        blocking_cleanup(&script);
    }
}

/// The image references a paude-launch run says it built (`paude: built image REF in ...`).
pub fn built_images(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.split("paude: built image ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// A tmux server of the host's own on a private socket, so that paude-launch can be run
/// "inside tmux" (`TMUX`) as a user of tmux would run it. Dropped, the server is killed.
pub struct HostTmux {
    socket: String,
    /// The value of `TMUX` for a program running inside it.
    pub env: String,
}

impl HostTmux {
    pub async fn start(suffix: &str) -> Result<HostTmux> {
        let socket = format!("paude-e2e-{suffix}");
        let tmux = |args: &[&str]| {
            let mut cmd = Command::new("tmux");
            cmd.args(["-L", &socket, "-f", "/dev/null"]).args(args);
            cmd
        };
        run(
            tmux(&["new-session", "-d", "-s", "outer"]),
            Duration::from_secs(30),
            None,
        )
        .await?
        .ok("tmux new-session")?;
        let mut server = HostTmux {
            socket: socket.clone(),
            env: String::new(),
        };
        server.env = run(
            tmux(&["display-message", "-p", "#{socket_path},#{pid},0"]),
            Duration::from_secs(30),
            None,
        )
        .await?
        .ok("tmux display-message")?
        .stdout
        .trim()
        .to_owned();
        Ok(server)
    }
}

impl Drop for HostTmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
