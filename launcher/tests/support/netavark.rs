//! The suite's second Podman: the netavark network backend (Debian's `netavark` and
//! `aardvark-dns`) in a Podman state of its own, so it never shares networks, containers or
//! images with the system's CNI state, and three things that make its DNS assertions able to
//! fail and keep every packet on this machine:
//!
//! - a mount namespace in which `/etc/resolv.conf` names only a fake resolver of the test's own
//!   on a loopback address; every Podman command and the API service of a netavark test run
//!   inside it, so aardvark-dns, if it ever forwards, forwards to that resolver, which logs the
//!   query and answers with a documentation address;
//! - an iptables chain (mangle FORWARD) that drops and counts anything from the state's subnets
//!   to outside them; a test fails if it counted anything;
//! - images copied from the system state (`podman save | podman load`), so nothing is built
//!   under the fake resolver (Podman would give build containers public fallback resolvers).
//!
//! While a [`State`] is active, [`super::podman`] and the suite's cleanups use it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::process::Command;

use super::run;

/// Where the state lives; kept between runs so images are copied once.
const ROOT: &str = "/var/tmp/paude-e2e-netavark";
/// The network of builds and `podman run` without `--network` (never used by sessions).
const DEFAULT_SUBNET: &str = "10.139.0.0/24";
/// Where netavark picks the subnets of new networks: sessions and the test's upstream.
const SUBNET_POOL: &str = "10.140.0.0/16";
/// The address the fake resolver answers every query with (TEST-NET-2, never dialled).
pub const FAKE_ANSWER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// The state in use, if a netavark test holds one.
static CURRENT: Mutex<Option<Arc<State>>> = Mutex::new(None);

/// The active netavark state, for [`super::podman`].
pub fn current() -> Option<Arc<State>> {
    CURRENT
        .lock()
        .expect("the state lock is not poisoned")
        .clone()
}

/// The private Podman state and the mount namespace its commands run in.
pub struct State {
    pub containers_conf: PathBuf,
    pub storage_conf: PathBuf,
    /// The process holding the mount namespace.
    holder_pid: u32,
}

impl State {
    /// The `nsenter` argument that enters the namespace with the fake resolv.conf.
    pub fn mount_namespace(&self) -> String {
        format!("--mount=/proc/{}/ns/mnt", self.holder_pid)
    }
}

/// Everything a netavark test runs under; dropping it removes the guard and the namespace.
pub struct Active {
    holder: std::process::Child,
    pub resolver: FakeResolver,
    guard: String,
    resolv_conf: PathBuf,
}

impl Active {
    /// Packets the guard dropped so far: anything from the test's subnets to outside them.
    pub fn escaped_packets(&self) -> Result<u64> {
        let out = std::process::Command::new("iptables")
            .args(["-t", "mangle", "-L", &self.guard, "-n", "-v", "-x"])
            .output()
            .context("cannot run iptables")?;
        ensure!(
            out.status.success(),
            "iptables -L {} failed: {}",
            self.guard,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        *CURRENT.lock().expect("the state lock is not poisoned") = None;
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_file(&self.resolv_conf);
        for args in [
            vec!["-t", "mangle", "-D", "FORWARD", "-j", &self.guard],
            vec!["-t", "mangle", "-F", &self.guard],
            vec!["-t", "mangle", "-X", &self.guard],
        ] {
            let _ = std::process::Command::new("iptables")
                .args(args)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Fails at once, naming the packages to install, when netavark, aardvark-dns or a tool the
/// guard and the fake resolver use is missing.
pub fn require_netavark() -> Result<()> {
    use super::require::{program, require, Tool};
    require(&[
        Tool {
            name: "netavark",
            candidates: &["/usr/lib/podman/netavark"],
            package: "netavark",
        },
        Tool {
            name: "aardvark-dns",
            candidates: &["/usr/lib/podman/aardvark-dns"],
            package: "aardvark-dns",
        },
        program("iptables", "iptables"),
        program("nsenter", "util-linux"),
        program("unshare", "util-linux"),
    ]);
    Ok(())
}

/// Writes `contents` to `path` unless it already holds exactly that (runs share the files).
fn write_if_changed(path: &Path, contents: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(contents) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Opens the netavark state: writes its configuration, starts the fake resolver, the mount
/// namespace and the guard, copies `images` from the system state when missing, and makes it
/// the state [`super::podman`] uses until the returned value is dropped.
pub async fn activate(suffix: &str, images: &[String]) -> Result<Active> {
    require_netavark()?;
    let root = PathBuf::from(ROOT);
    for dir in ["storage", "run", "tmp", "networks"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let storage_conf = root.join("storage.conf");
    write_if_changed(
        &storage_conf,
        &format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{ROOT}/storage\"\nrunroot = \"{ROOT}/run\"\n"
        ),
    )?;
    // The runtime and limits of tests/podman/containers.conf, the netavark backend, and
    // directories and subnets of its own so it never meets the CNI state.
    let containers_conf = root.join("containers.conf");
    write_if_changed(
        &containers_conf,
        &format!(
            "[containers]\n\
             default_ulimits = [\"nofile=10000:10000\", \"nproc=4096:4096\"]\n\
             [engine]\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             tmp_dir = \"{ROOT}/tmp\"\n\
             [network]\n\
             network_backend = \"netavark\"\n\
             network_config_dir = \"{ROOT}/networks\"\n\
             default_subnet = \"{DEFAULT_SUBNET}\"\n\
             default_subnet_pools = [{{\"base\" = \"{SUBNET_POOL}\", \"size\" = 24}}]\n"
        ),
    )?;

    let resolver = FakeResolver::start(suffix).await?;
    let resolv_conf = root.join(format!("resolv-{suffix}.conf"));
    std::fs::write(&resolv_conf, format!("nameserver {}\n", resolver.addr))?;
    let mut holder = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" /etc/resolv.conf && echo ready && exec sleep infinity")
        .arg("sh")
        .arg(&resolv_conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start unshare (util-linux)")?;
    let stdout = holder.stdout.take().context("stdout was not piped")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    if line.trim() != "ready" {
        let _ = holder.kill();
        let out = holder.wait_with_output()?;
        bail!(
            "the mount namespace with the fake resolv.conf did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let guard = format!("PAUDE-E2E-{suffix}");
    let state = Arc::new(State {
        containers_conf,
        storage_conf,
        holder_pid: holder.id(),
    });
    *CURRENT.lock().expect("the state lock is not poisoned") = Some(state.clone());
    let active = Active {
        holder,
        resolver,
        guard: guard.clone(),
        resolv_conf,
    };
    let inside = run(
        {
            let mut cmd = Command::new("nsenter");
            cmd.args([&state.mount_namespace(), "--", "cat", "/etc/resolv.conf"]);
            cmd
        },
        Duration::from_secs(10),
        None,
    )
    .await?
    .ok("reading resolv.conf inside the namespace")?;
    ensure!(
        inside.stdout.contains(&active.resolver.addr.to_string()),
        "resolv.conf inside the namespace is not the fake one: {}",
        inside.stdout
    );

    let mut rules = vec![vec!["-t", "mangle", "-N", &guard]];
    for subnet in [SUBNET_POOL, DEFAULT_SUBNET] {
        rules.push(vec![
            "-t", "mangle", "-A", &guard, "-s", subnet, "!", "-d", subnet, "-j", "DROP",
        ]);
    }
    rules.push(vec!["-t", "mangle", "-I", "FORWARD", "1", "-j", &guard]);
    for args in rules {
        let mut cmd = Command::new("iptables");
        cmd.args(&args);
        run(cmd, Duration::from_secs(30), None)
            .await?
            .ok(&format!("iptables {}", args.join(" ")))?;
    }

    load_images(&state, images).await?;
    Ok(active)
}

/// Copies the images the netavark state lacks from the system state.
async fn load_images(state: &State, images: &[String]) -> Result<()> {
    let mut missing = Vec::new();
    for image in images {
        let exists = run(
            super::podman(["image", "exists", image]),
            Duration::from_secs(30),
            None,
        )
        .await?;
        if !exists.success() {
            missing.push(image.clone());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "copying {} from the system's Podman state",
        missing.join(", ")
    );
    let mut cmd = Command::new("bash");
    cmd.args([
        "-o",
        "pipefail",
        "-c",
        "env -u CONTAINERS_STORAGE_CONF CONTAINERS_CONF=\"$1\" podman save -m \"${@:4}\" | \
         nsenter \"$2\" -- env CONTAINERS_CONF=\"$3\" CONTAINERS_STORAGE_CONF=\"$0\" podman load -q",
    ])
    .arg(&state.storage_conf)
    .arg(super::containers_conf())
    .arg(state.mount_namespace())
    .arg(&state.containers_conf)
    .args(&missing);
    run(cmd, Duration::from_secs(600), None)
        .await?
        .ok("podman save | podman load into the netavark state")?;
    Ok(())
}

/// A DNS server of the test's own on a loopback address: logs every query's name and answers
/// each with [`FAKE_ANSWER`].
pub struct FakeResolver {
    pub addr: Ipv4Addr,
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeResolver {
    async fn start(suffix: &str) -> Result<FakeResolver> {
        // An address of 127.0.0.0/8 of this run's own, so concurrent runs never share port 53.
        let n = u32::from_str_radix(suffix, 16).unwrap_or(1) & 0xffff;
        let addr = Ipv4Addr::new(127, 53, (n >> 8) as u8, (n & 0xff).max(1) as u8);
        let socket = tokio::net::UdpSocket::bind((addr, 53))
            .await
            .with_context(|| format!("cannot bind the fake resolver to {addr}:53"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
                let Some((name, question_end)) = question(&buf[..len]) else {
                    continue;
                };
                seen.lock()
                    .expect("the log lock is not poisoned")
                    .push(name);
                let mut reply = buf[..question_end].to_vec();
                // A response, recursion available, one answer, no other records.
                reply[2] = 0x81;
                reply[3] = 0x80;
                reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&FAKE_ANSWER.octets());
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        Ok(FakeResolver { addr, log, task })
    }

    /// Every name asked so far.
    pub fn queries(&self) -> BTreeSet<String> {
        self.log
            .lock()
            .expect("the log lock is not poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for FakeResolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The name of a DNS query's single question and where the question ends.
fn question(msg: &[u8]) -> Option<(String, usize)> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(msg.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let end = at + 4;
    (end <= msg.len()).then(|| (labels.join("."), end))
}

/// Waits a moment for a query that may still be on its way, then returns the names asked.
pub async fn settled_queries(resolver: &FakeResolver) -> BTreeSet<String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    resolver.queries()
}
