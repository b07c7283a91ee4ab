//! The connection to the container engine: `DOCKER_HOST`, a running system socket, or the
//! shared API service paude-launch starts and consecutive commands reuse.
//!
//! Why a shared service: Podman has no daemon, and its API needs `podman system service`.
//! Starting one per command costs 110–150 ms, most of a `list` or `status`. So the first command
//! starts one on a socket private to the user and to the Podman state it runs in (the
//! `CONTAINERS_*`, `XDG_*`, `HOME`, `TMPDIR` and `PATH` it sees: a command with another
//! configuration gets another service), and the next commands use it.
//!
//! Invariant: the service never outlives its usefulness by more than [`SERVICE_IDLE`]. It is
//! started with `--time`, so Podman stops it that long after its last connection closed; a
//! command using it pings it more often than that, so it stays up while any command needs it,
//! and a command killed outright (kill -9, OOM) stops pinging with the rest of the process.

use std::hash::Hasher;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bollard::{ClientVersion, Docker};

use super::isolation::{self, ApiAddr, Engine};

/// The API version spoken: the newest Podman 4 serves, which Docker engines also accept.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// Seconds an API request may take (image builds stream, so this bounds silence, not length).
const API_TIMEOUT_SECS: u64 = 900;
/// How long the shared API service stays up after its last command left.
pub const SERVICE_IDLE: Duration = Duration::from_secs(10);
/// How often a command pings the shared service to keep it up: well inside [`SERVICE_IDLE`].
const KEEP_UP_EVERY: Duration = Duration::from_secs(3);
/// How long to wait for the API service to answer: generous enough for a busy machine.
const SERVICE_WAIT: Duration = Duration::from_secs(60);
// A ping lost or late must not let the service stop under a running command.
const _: () = assert!(KEEP_UP_EVERY.as_secs() * 2 < SERVICE_IDLE.as_secs());
/// The prefix of the shared service's directory: `paude-engine-UID-KEY`.
pub const SERVICE_DIR_PREFIX: &str = "paude-engine-";

/// An open API connection.
pub struct Connection {
    /// The bollard client.
    pub docker: Docker,
    /// The same API's address, for the libpod requests bollard cannot make.
    pub addr: ApiAddr,
    /// Which engine answered.
    pub engine: Engine,
    /// The task that keeps the shared service up while this command runs.
    _keep_up: Option<KeepUp>,
}

/// Pings the shared service until dropped.
struct KeepUp(tokio::task::JoinHandle<()>);

impl Drop for KeepUp {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Connection {
    /// A connection to an engine that answered a ping; asks which engine it is, from the
    /// ping's `Server` header when it names one.
    async fn new(docker: Docker, addr: ApiAddr, keep_up: Option<KeepUp>) -> Result<Connection> {
        let named = isolation::ping_server(&addr)
            .await
            .ok()
            .flatten()
            .as_deref()
            .and_then(Engine::from_server_header);
        let engine = match named {
            Some(engine) => engine,
            None => {
                let version = docker
                    .version()
                    .await
                    .context("the engine answered a ping but not GET /version")?
                    .version
                    .unwrap_or_default();
                // Only Podman serves the libpod API; a Docker engine answers 404.
                let podman = matches!(
                    isolation::libpod(&addr, hyper::Method::GET, "/_ping", None).await,
                    Ok((200, _))
                );
                if podman {
                    Engine::Podman { version }
                } else {
                    Engine::Docker { version }
                }
            }
        };
        Ok(Connection {
            docker,
            addr,
            engine,
            _keep_up: keep_up,
        })
    }
}

/// Whether a client answers a ping within a few seconds.
async fn answers(docker: &Docker) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(5), docker.ping()).await,
        Ok(Ok(_))
    )
}

/// A client of the unix socket at `path` if it answers.
async fn answering(path: &Path) -> Option<Docker> {
    if !path.exists() {
        return None;
    }
    let url = format!("unix://{}", path.display());
    let docker = Docker::connect_with_unix(&url, API_TIMEOUT_SECS, &API_VERSION).ok()?;
    answers(&docker).await.then_some(docker)
}

/// Finds an API socket that answers, or starts (or reuses) the shared `podman system service`.
pub async fn connect() -> Result<Connection> {
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        let docker = if host.starts_with("unix://") {
            Docker::connect_with_unix(&host, API_TIMEOUT_SECS, &API_VERSION)
        } else {
            Docker::connect_with_http(&host, API_TIMEOUT_SECS, &API_VERSION)
        }
        .with_context(|| format!("cannot use DOCKER_HOST={host}: fix or unset it"))?;
        if !answers(&docker).await {
            bail!("the engine at DOCKER_HOST={host} does not answer: start it, or unset DOCKER_HOST to let paude-launch start podman's API service");
        }
        let addr = ApiAddr::from_docker_host(&host).with_context(|| {
            format!("cannot use DOCKER_HOST={host}: paude-launch speaks to unix:// and tcp:// addresses")
        })?;
        return Connection::new(docker, addr, None).await;
    }
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("XDG_RUNTIME_DIR") {
        candidates.push(PathBuf::from(format!("{dir}/podman/podman.sock")));
    }
    candidates.push(PathBuf::from("/run/podman/podman.sock"));
    for path in &candidates {
        if let Some(docker) = answering(path).await {
            return Connection::new(docker, ApiAddr::Unix(path.clone()), None).await;
        }
    }
    shared_service(&candidates).await
}

/// The key of the Podman state this process would use: what `podman` reads from its
/// environment to find its configuration and storage, and which `podman` PATH finds.
fn state_key() -> u64 {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .filter(|(k, _)| {
            ["CONTAINERS_", "STORAGE_", "PODMAN_", "BUILDAH_"]
                .iter()
                .any(|p| k.starts_with(p))
                || [
                    "XDG_CONFIG_HOME",
                    "XDG_DATA_HOME",
                    "XDG_RUNTIME_DIR",
                    "HOME",
                    "TMPDIR",
                    "PATH",
                ]
                .contains(&k.as_str())
        })
        .collect();
    vars.sort();
    // FNV-1a: the key names a directory, so it must be the same in every build.
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    for (k, v) in &vars {
        hash.write(k.as_bytes());
        hash.write(&[0]);
        hash.write(v.as_bytes());
        hash.write(&[0]);
    }
    hash.finish()
}

/// A 64-bit FNV-1a hash.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The shared service's directory for this user and Podman state, made if missing: a
/// directory of this user's with mode 0700 (never one another user made to catch the socket).
fn service_dir() -> Result<PathBuf> {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("{SERVICE_DIR_PREFIX}{uid}-{:016x}", state_key()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot create '{}' for the podman socket: make '{}' writable or set TMPDIR \
                     to a directory that is",
                    dir.display(),
                    base.display()
                )
            })
        }
    }
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("cannot read '{}'", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        bail!(
            "'{}' is not a directory only this user can open (owner {}, mode {:o}): remove it, \
             then run the command again",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(dir)
}

/// An exclusive lock on the service directory, released on drop: one command at a time
/// checks for the service and starts it.
struct DirLock(std::fs::File);

impl DirLock {
    async fn take(dir: &Path) -> Result<DirLock> {
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open '{}'", path.display()))?;
        let deadline = tokio::time::Instant::now() + SERVICE_WAIT;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns; no memory is shared.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(DirLock(file));
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "another paude-launch has held '{}' for {} s: wait for it to finish, or \
                     remove the directory if no paude-launch runs",
                    path.display(),
                    SERVICE_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: as in `take`.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The shared service's connection: the one running for this state, or a new one.
async fn shared_service(tried: &[PathBuf]) -> Result<Connection> {
    let dir = service_dir()?;
    let socket = dir.join("podman.sock");
    // Most commands find it running: no lock needed to use it.
    let docker = match answering(&socket).await {
        Some(docker) => docker,
        None => {
            let _lock = DirLock::take(&dir).await?;
            match answering(&socket).await {
                Some(docker) => docker,
                None => start_service(&dir, &socket, tried).await?,
            }
        }
    };
    let keep_up = {
        let docker = docker.clone();
        KeepUp(tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEEP_UP_EVERY).await;
                let _ = tokio::time::timeout(KEEP_UP_EVERY, docker.ping()).await;
            }
        }))
    };
    Connection::new(docker, ApiAddr::Unix(socket), Some(keep_up)).await
}

/// Starts `podman system service --time=IDLE` on `socket` (the caller holds the directory's
/// lock) and waits for it to answer. The service runs in a session of its own: it and the
/// container runtimes it spawns must not share our controlling terminal, whose mode they would
/// reset while `run` attaches to the agent.
async fn start_service(dir: &Path, socket: &Path, tried: &[PathBuf]) -> Result<Docker> {
    let _ = std::fs::remove_file(socket);
    let url = format!("unix://{}", socket.display());
    let log_path = dir.join("service.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create '{}'", log_path.display()))?;
    let mut command = tokio::process::Command::new("podman");
    command.args([
        "system",
        "service",
        &format!("--time={}", SERVICE_IDLE.as_secs()),
        &url,
    ]);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "no container engine API answered (tried {}) and podman could not be started ({e}): \
                 install podman (e.g. apt-get install podman), or set DOCKER_HOST to a running engine",
                tried.join(", ")
            );
        }
    };
    let deadline = tokio::time::Instant::now() + SERVICE_WAIT;
    loop {
        if let Some(docker) = answering(socket).await {
            return Ok(docker);
        }
        let log = || {
            std::fs::read_to_string(&log_path)
                .map(|l| l.trim().to_owned())
                .unwrap_or_default()
        };
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "`podman system service` exited ({status}) before answering on {url}: {}; fix \
                 what it says, or set DOCKER_HOST to a running engine",
                log()
            );
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            bail!(
                "`podman system service` did not answer on {url} within {} s ({}): run \
                 `podman system service --time=0 {url}` yourself to see why, or set DOCKER_HOST",
                SERVICE_WAIT.as_secs(),
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_key_is_the_same_in_every_build() {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.write(b"a");
        // The published FNV-1a 64 value of "a".
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
    }
}
