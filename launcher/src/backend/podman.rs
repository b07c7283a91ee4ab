//! The Podman backend: applies a [`Plan`] through the Docker-compatible API with bollard, so
//! the same code drives a Docker engine (plus the few libpod calls of `isolation.rs` on
//! Podman). It uses the connection `engine.rs` opens and owns the image builds and the
//! session's objects: an internal network (no route out, no DNS, the agent's only network), an
//! egress network, the proxy container on both, the agent container (started behind the
//! start-up check), and the data volume.
//!
//! Invariant: every object carries the session's labels; nothing else records that a session
//! exists.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerSummary, EndpointIpamConfig, EndpointSettings, ExecConfig,
    HostConfig, Mount as ApiMount, MountType, NetworkCreateRequest, NetworkingConfig,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder, ResizeExecOptionsBuilder, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bollard::{body_full, Docker};
use futures_util::StreamExt;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::engine::{self, Connection};
use super::isolation::{self, Engine};
use super::{hints, Backend, ExecOutput, Progress, SessionInfo, SessionState};
use crate::cli::{BackendKind, Global};
use crate::images::ImagePlan;
use crate::plan::{
    self, labels, InjectedFile, Plan, ProxyConfig, Role, AGENT_HOME, PROXY_CONFIG_PATH, PROXY_PORT,
    PROXY_UID, WORKSPACE_DIR,
};
use crate::spec::SessionName;

/// Lines of build output kept for the error message of a failed build.
const BUILD_LOG_TAIL: usize = 25;
/// Memory limit of the proxy container.
const PROXY_MEMORY: i64 = 512 << 20;
/// Where a new proxy configuration is checked before it replaces the one in force.
const PROXY_CANDIDATE_PATH: &str = "/etc/paude-proxy/candidate.toml";
/// What the proxy prints once it accepts connections.
const PROXY_LISTENING: &str = "paude-proxy listening on";
/// Process limit of the proxy container.
const PROXY_PIDS: i64 = 256;
/// How long to wait for the engine to do something it always does in a moment (start its API
/// service, run the proxy, record an exit status): a guard against an engine that never does,
/// generous enough for a machine busy with other work.
const ENGINE_WAIT: Duration = Duration::from_secs(60);

/// The Podman (or Docker) engine, connected on first use.
pub struct Podman {
    /// The connection and, when we started it, the API service process.
    conn: OnceCell<Connection>,
    /// What the running `create` made, for undoing it when it fails or is interrupted.
    made: std::sync::Mutex<Vec<Made>>,
}

/// An object a `create` made (not one it found).
#[derive(Debug, Clone)]
enum Made {
    Network(String),
    Volume(String),
    Container(String),
}

impl Podman {
    /// Creates the backend without contacting the engine (so `--dry-run` needs no engine).
    pub fn new(_global: &Global) -> Self {
        Podman {
            conn: OnceCell::new(),
            made: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The API client, connecting (or starting the API service) on first use.
    async fn docker(&self) -> Result<&Docker> {
        Ok(&self.connection().await?.docker)
    }

    /// The connection, opened on first use.
    async fn connection(&self) -> Result<&Connection> {
        self.conn.get_or_try_init(engine::connect).await
    }

    /// Refuses engines whose networks cannot keep the agent inside: Docker before the fix of
    /// its internal networks' DNS forwarding.
    async fn require_safe_engine(&self) -> Result<()> {
        if let Engine::Docker { version } = &self.connection().await?.engine {
            if let Some(why) = isolation::docker_refusal(version) {
                bail!("{why}");
            }
        }
        Ok(())
    }
}

/// Whether an API error is a 404.
fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A label filter `paude.session=NAME`, optionally with a role.
fn session_filter(name: Option<&SessionName>) -> HashMap<String, Vec<String>> {
    let label = match name {
        Some(n) => format!("{}={n}", labels::SESSION),
        None => labels::SESSION.to_owned(),
    };
    HashMap::from([("label".to_owned(), vec![label])])
}

/// A tar archive holding `files` at their absolute paths (directories included), for upload
/// to `/`.
fn files_tar(files: &[(&str, &[u8], u32)]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let rel = path.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            acc.push_str(part);
            acc.push('/');
            dirs.insert(acc.clone());
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        builder.append_data(&mut h, d, std::io::empty())?;
    }
    for (path, contents, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_size(contents.len() as u64);
        h.set_mtime(0);
        builder.append_data(&mut h, path.trim_start_matches('/'), *contents)?;
    }
    Ok(builder.into_inner()?)
}

/// The build context of an image as a tar archive.
fn context_tar(image: &ImagePlan) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for f in &image.files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(f.mode);
        h.set_size(f.contents.len() as u64);
        h.set_mtime(0);
        builder.append_data(&mut h, &f.path, f.contents.as_slice())?;
    }
    Ok(builder.into_inner()?)
}

/// The first regular file in a tar archive.
fn first_file(archive: &[u8]) -> Result<Vec<u8>> {
    let mut ar = tar::Archive::new(archive);
    for entry in ar.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut out)?;
            return Ok(out);
        }
    }
    bail!("the archive from the engine holds no file")
}

/// `KEY=VALUE` strings from a map.
fn env_list(env: &BTreeMap<String, String>) -> Vec<String> {
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Labels as the API wants them.
fn label_map(l: BTreeMap<String, String>) -> HashMap<String, String> {
    l.into_iter().collect()
}

/// The agent's sysctls that turn IPv6 off, when this machine has IPv6 at all (with IPv6
/// disabled at boot the sysctls do not exist, and the agent has no IPv6 anyway; the start-up
/// check proves it either way).
fn ipv6_off() -> Option<HashMap<String, String>> {
    std::path::Path::new("/proc/sys/net/ipv6")
        .exists()
        .then(|| {
            isolation::IPV6_OFF
                .iter()
                .map(|k| ((*k).to_owned(), "1".to_owned()))
                .collect()
        })
}

/// The address the proxy gets on the internal network: the second host of its subnet (the
/// first is the bridge's gateway address).
pub fn proxy_address(subnet: &IpNet) -> Result<IpAddr> {
    subnet
        .hosts()
        .nth(1)
        .with_context(|| format!("the internal network's subnet {subnet} is too small"))
}

/// The proxy's MAC address on the internal network, fixed by its address there: locally
/// administered, unicast, `02:50:` then the four bytes of the IPv4 address (so unique on the
/// subnet).
pub fn proxy_mac(ip: IpAddr) -> String {
    let octets = match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    format!(
        "02:50:{:02x}:{:02x}:{:02x}:{:02x}",
        octets[0], octets[1], octets[2], octets[3]
    )
}

/// Renders the readable `--dry-run` description of a plan.
pub fn render_plan(plan: &Plan) -> String {
    let n = &plan.names;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "session {} on podman (agent {}, nothing below is created with --dry-run)",
        plan.name, plan.agent.name
    ));
    line(String::new());
    let base = plan.base_build.iter().map(|b| ("project base", b));
    for (what, img) in base.chain([("proxy", &plan.proxy_image), ("agent", &plan.agent_image)]) {
        line(format!("image {} ({what})", img.reference()));
        line(format!(
            "  from:    {}",
            img.dockerfile
                .lines()
                .find_map(|l| l.strip_prefix("FROM "))
                .unwrap_or("?")
        ));
        let files: Vec<_> = img.files.iter().map(|f| f.path.as_str()).collect();
        line(format!("  context: {}", files.join(", ")));
        line(format!(
            "  build:   {}",
            if plan.rebuild {
                "always (--rebuild)"
            } else {
                "only if the tag is missing"
            }
        ));
    }
    line(format!(
        "network {} (internal: no route out, DNS off, no address on the host; the agent's only network)",
        n.internal_network
    ));
    if n.owns_egress_network {
        line(format!(
            "network {} (outbound side of the proxy)",
            n.egress_network
        ));
    } else {
        line(format!(
            "network {} (existing, used for the proxy's outbound side, not deleted with the session)",
            n.egress_network
        ));
    }
    line(format!(
        "volume {} (mounted at {AGENT_HOME}: workspace {WORKSPACE_DIR} and home)",
        n.data
    ));
    line(format!("container {}", n.proxy));
    line(format!("  image:     {}", plan.proxy_image.reference()));
    line(format!(
        "  networks:  {} (address .2 of its subnet, port {PROXY_PORT}), {}",
        n.internal_network, n.egress_network
    ));
    line(format!(
        "  user:      {PROXY_UID}, all capabilities dropped, no-new-privileges"
    ));
    line(format!("  config:    {PROXY_CONFIG_PATH}"));
    for l in plan.proxy.to_toml().lines() {
        line(format!("    {l}"));
    }
    line(
        "    (listen and allow_client are set to the internal address and subnet at creation)"
            .to_owned(),
    );
    let a = &plan.agent_container;
    line(format!("container {}", n.agent));
    line(format!("  image:     {}", plan.agent_image.reference()));
    line(format!(
        "  network:   {} only, IPv6 off, /etc/hosts: localhost and itself",
        n.internal_network
    ));
    line(
        "  start:     the agent waits until a check from inside its container finds no way out \
         but the proxy"
            .to_owned(),
    );
    line(format!(
        "  command:   {} (in tmux session paude)",
        shlex::try_join(a.argv.iter().map(String::as_str)).unwrap_or_default()
    ));
    line(format!(
        "  user:      {}:{}, all capabilities dropped, no-new-privileges, init",
        a.hardening.uid, a.hardening.gid
    ));
    line(format!(
        "  limits:    memory {} MiB, cpus {}, pids {}",
        a.resources.memory_bytes >> 20,
        a.resources
            .cpu_millis
            .map(|m| format!("{}", m as f64 / 1000.0))
            .unwrap_or_else(|| "unlimited".to_owned()),
        a.resources.pids_limit
    ));
    let env = plan.agent_env("PROXY_IP");
    for (k, v) in &env {
        let shown = if plan.agent.passthrough_env.contains(&k.as_str()) {
            "(from the host)"
        } else {
            v.as_str()
        };
        line(format!("  env:       {k}={shown}"));
    }
    line(format!("  volume:    {} at {AGENT_HOME}", n.data));
    for m in &a.mounts {
        line(format!(
            "  mount:     {} at {} ({})",
            m.source.display(),
            m.target,
            if m.read_only {
                "read-only"
            } else {
                "read-write"
            }
        ));
    }
    for f in &a.files {
        line(format!(
            "  file:      {} (root-owned, mode {:o})",
            f.path, f.mode
        ));
    }
    if plan.git {
        line(format!(
            "git remote {} in the current repository, then push of the current branch and tags",
            n.git_remote
        ));
    }
    out
}

/// The session's containers, by role.
struct Found {
    /// The proxy container summary, if present.
    proxy: Option<ContainerSummary>,
    /// The agent container summary, if present.
    agent: Option<ContainerSummary>,
}

impl Found {
    /// Which container is missing, for an incomplete session.
    fn missing(&self) -> Option<&'static str> {
        match (&self.proxy, &self.agent) {
            (Some(_), Some(_)) => None,
            (None, None) => Some("it has no proxy and no agent container"),
            (None, _) => Some("the proxy container is missing"),
            (_, None) => Some("the agent container is missing"),
        }
    }
}

/// Whether a container summary reports a running container.
fn is_running(c: &ContainerSummary) -> bool {
    c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
}

impl Podman {
    /// The containers labelled with the session.
    async fn containers(&self, name: Option<&SessionName>) -> Result<Vec<ContainerSummary>> {
        let docker = self.docker().await?;
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&session_filter(name))
            .build();
        docker
            .list_containers(Some(opts))
            .await
            .context("cannot list containers")
    }

    /// The session's containers, or "no session named NAME" when it has none.
    async fn find(&self, name: &SessionName) -> Result<Found> {
        let all = self.containers(Some(name)).await?;
        let role = |r: Role| {
            all.iter()
                .find(|c| {
                    c.labels
                        .as_ref()
                        .and_then(|l| l.get(labels::ROLE))
                        .map(String::as_str)
                        == Some(r.as_str())
                })
                .cloned()
        };
        let found = Found {
            proxy: role(Role::Proxy),
            agent: role(Role::Agent),
        };
        if found.proxy.is_none() && found.agent.is_none() && !self.any_object(name).await? {
            bail!("no session named {name}: see `paude-launch list`");
        }
        Ok(found)
    }

    /// Whether any object (container, network, volume) carries the session's label.
    async fn any_object(&self, name: &SessionName) -> Result<bool> {
        let docker = self.docker().await?;
        if !self.containers(Some(name)).await?.is_empty() {
            return Ok(true);
        }
        let nets = docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::new()
                    .filters(&session_filter(Some(name)))
                    .build(),
            ))
            .await?;
        if !nets.is_empty() {
            return Ok(true);
        }
        let vols = docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new()
                    .filters(&session_filter(Some(name)))
                    .build(),
            ))
            .await?;
        Ok(!vols.volumes.unwrap_or_default().is_empty())
    }

    /// Builds one image from its context, streaming the engine's output; `no_cache` builds
    /// every step afresh.
    async fn build(&self, image: &ImagePlan, no_cache: bool, progress: Progress) -> Result<()> {
        let docker = self.docker().await?;
        let reference = image.reference();
        let mut shown = progress.build(&reference);
        let tar = context_tar(image)?;
        let build_labels = HashMap::from([("paude.image-hash".to_owned(), image.hash.clone())]);
        let opts = BuildImageOptionsBuilder::new()
            .dockerfile("Dockerfile")
            .t(&reference)
            .rm(true)
            .forcerm(true)
            // `--rebuild` means fresh packages: no step may come from the layer cache.
            .nocache(no_cache)
            .labels(&build_labels)
            .build();
        let mut stream = docker.build_image(opts, None, Some(body_full(tar.into())));
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut failure = None;
        // The status line's clock moves on while a step is silent.
        let mut clock = tokio::time::interval(Duration::from_secs(1));
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = clock.tick() => {
                    shown.tick(Instant::now());
                    continue;
                }
            };
            let Some(item) = item else { break };
            match item {
                Ok(info) => {
                    if let Some(s) = &info.stream {
                        for l in s.lines().filter(|l| !l.trim().is_empty()) {
                            shown.line(l, Instant::now());
                            if tail.len() == BUILD_LOG_TAIL {
                                tail.pop_front();
                            }
                            tail.push_back(l.to_owned());
                        }
                    }
                    if let Some(detail) = info.error_detail {
                        failure = detail.message;
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(why) = failure {
            shown.finish(false, Instant::now());
            let log: Vec<String> = tail.into_iter().collect();
            return Err(hints::build_failed(image, &why, &log));
        }
        if docker.inspect_image(&reference).await.is_err() {
            shown.finish(false, Instant::now());
            bail!("building image {reference} reported success but the image is missing: rerun with -v");
        }
        shown.finish(true, Instant::now());
        Ok(())
    }

    /// Creates the session's objects; the caller removes them again if this fails.
    async fn create_objects(&self, plan: &Plan, progress: Progress) -> Result<()> {
        let docker = self.docker().await?;
        let n = &plan.names;
        progress.step(format!(
            "creating networks and volume of session {}",
            plan.name
        ));
        // The agent's side has no route out (`internal`) and, on Podman, no DNS server and no
        // address on the host (see isolation.rs); the proxy's outbound side has a route out.
        let mut networks = Vec::new();
        if self.network_exists(&n.internal_network).await? {
            // Left by an earlier create of this session: kept.
        } else if let Engine::Podman { .. } = self.connection().await?.engine {
            self.create_internal_network(plan).await?;
            self.record(Made::Network(n.internal_network.clone()));
        } else {
            networks.push((&n.internal_network, true, Role::InternalNetwork));
        }
        if n.owns_egress_network && !self.network_exists(&n.egress_network).await? {
            networks.push((&n.egress_network, false, Role::EgressNetwork));
        }
        for (name, internal, role) in networks {
            self.record(Made::Network(name.clone()));
            docker
                .create_network(NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".to_owned()),
                    internal: Some(internal),
                    labels: Some(label_map(plan.labels_for(role))),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("cannot create network {name}"))?;
        }
        let internal = docker
            .inspect_network(&n.internal_network, None)
            .await
            .with_context(|| format!("cannot inspect network {}", n.internal_network))?;
        let subnet: IpNet = internal
            .ipam
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().find_map(|c| c.subnet))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("network {} reports no usable subnet", n.internal_network))?;
        let proxy_ip = proxy_address(&subnet)?;
        if docker.inspect_volume(&n.data).await.is_err() {
            self.record(Made::Volume(n.data.clone()));
            docker
                .create_volume(VolumeCreateRequest {
                    name: Some(n.data.clone()),
                    labels: Some(label_map(plan.labels_for(Role::Data))),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("cannot create volume {}", n.data))?;
        }

        crate::interrupt::check()?;
        progress.step(format!(
            "starting proxy {} at {proxy_ip}:{PROXY_PORT}",
            n.proxy
        ));
        let endpoints = HashMap::from([
            (
                n.internal_network.clone(),
                EndpointSettings {
                    ipam_config: Some(EndpointIpamConfig {
                        ipv4_address: Some(proxy_ip.to_string()),
                        ..Default::default()
                    }),
                    // The same MAC at every run: a restarted proxy gets a new veth, and with
                    // a new MAC the agent's neighbour entry would point at the old one for
                    // tens of seconds.
                    mac_address: Some(proxy_mac(proxy_ip)),
                    ..Default::default()
                },
            ),
            (n.egress_network.clone(), EndpointSettings::default()),
        ]);
        let proxy_body = ContainerCreateBody {
            image: Some(plan.proxy_image.reference()),
            labels: Some(label_map(plan.labels_for(Role::Proxy))),
            user: Some(format!("{PROXY_UID}:{PROXY_UID}")),
            host_config: Some(HostConfig {
                network_mode: Some(n.internal_network.clone()),
                cap_drop: Some(vec!["ALL".to_owned()]),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                memory: Some(PROXY_MEMORY),
                pids_limit: Some(PROXY_PIDS),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(endpoints),
            }),
            ..Default::default()
        };
        let proxy = self.container_running(plan, &n.proxy).await?;
        if proxy.is_none() {
            self.record(Made::Container(n.proxy.clone()));
            docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::new().name(&n.proxy).build()),
                    proxy_body,
                )
                .await
                .with_context(|| format!("cannot create container {}", n.proxy))?;
        }
        if proxy != Some(true) {
            // A new container has no configuration, nor has one a create killed before it was
            // written; an existing one may hold allowlist edits and is kept as it is.
            if proxy.is_none() || self.read_proxy_config(&n.proxy).await.is_err() {
                let config = plan.proxy.bound_to(proxy_ip, &[subnet]).to_toml();
                self.upload(&n.proxy, &[(PROXY_CONFIG_PATH, config.as_bytes(), 0o644)])
                    .await?;
            }
            self.start_proxy(&n.proxy).await?;
        }

        crate::interrupt::check()?;
        progress.step(format!("starting agent {}", n.agent));
        let a = &plan.agent_container;
        let mut mounts = vec![ApiMount {
            target: Some(AGENT_HOME.to_owned()),
            source: Some(n.data.clone()),
            typ: Some(MountType::VOLUME),
            ..Default::default()
        }];
        for m in &a.mounts {
            mounts.push(ApiMount {
                target: Some(m.target.clone()),
                source: Some(m.source.display().to_string()),
                typ: Some(MountType::BIND),
                read_only: Some(m.read_only),
                ..Default::default()
            });
        }
        let agent_body = ContainerCreateBody {
            image: Some(plan.agent_image.reference()),
            cmd: Some(a.argv.clone()),
            env: Some(env_list(&plan.agent_env(&proxy_ip.to_string()))),
            user: Some(format!("{}:{}", a.hardening.uid, a.hardening.gid)),
            hostname: Some(plan.name.to_string()),
            labels: Some(label_map(plan.labels_for(Role::Agent))),
            host_config: Some(HostConfig {
                network_mode: Some(n.internal_network.clone()),
                cap_drop: a
                    .hardening
                    .drop_all_capabilities
                    .then(|| vec!["ALL".to_owned()]),
                security_opt: a
                    .hardening
                    .no_new_privileges
                    .then(|| vec!["no-new-privileges".to_owned()]),
                init: Some(a.hardening.init),
                pids_limit: Some(a.resources.pids_limit),
                memory: i64::try_from(a.resources.memory_bytes).ok(),
                nano_cpus: a
                    .resources
                    .cpu_millis
                    .and_then(|m| i64::try_from(m * 1_000_000).ok()),
                mounts: Some(mounts),
                sysctls: ipv6_off(),
                // The start gate: empty at every start, writable only by root.
                tmpfs: Some(HashMap::from([(
                    isolation::GATE_DIR.to_owned(),
                    "rw,nosuid,nodev,noexec,size=64k,mode=0755".to_owned(),
                )])),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    n.internal_network.clone(),
                    EndpointSettings::default(),
                )])),
            }),
            ..Default::default()
        };
        let running = self.container_running(plan, &n.agent).await?;
        if running.is_none() {
            self.record(Made::Container(n.agent.clone()));
            docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::new().name(&n.agent).build()),
                    agent_body,
                )
                .await
                .with_context(|| format!("cannot create container {}", n.agent))?;
        }
        if running != Some(true) {
            // Also into a stopped agent a killed create left: it may not have them yet.
            let files: Vec<(&str, &[u8], u32)> = a
                .files
                .iter()
                .map(|f: &InjectedFile| (f.path.as_str(), f.contents.as_bytes(), f.mode))
                .collect();
            self.upload(&n.agent, &files).await?;
        }
        if running != Some(true) {
            docker
                .start_container(&n.agent, None)
                .await
                .with_context(|| format!("cannot start container {}", n.agent))?;
        }
        crate::interrupt::check()?;
        let took = self.check_and_release(&plan.name).await?;
        progress.step(format!(
            "checked that the agent's only way out is its proxy ({} ms)",
            took.as_millis()
        ));
        Ok(())
    }

    /// Removes what the running create made (and only that), newest first.
    async fn undo_create(&self) -> Result<()> {
        let made: Vec<Made> = std::mem::take(&mut *self.made.lock().expect("made list"));
        let docker = self.docker().await?;
        let mut errors = Vec::new();
        // Containers before the volume and networks they use.
        for m in made.iter().rev() {
            let result = match m {
                Made::Container(c) => docker
                    .remove_container(
                        c,
                        Some(RemoveContainerOptionsBuilder::new().force(true).build()),
                    )
                    .await
                    .map(|_| ()),
                Made::Volume(v) => {
                    docker
                        .remove_volume(
                            v,
                            Some(RemoveVolumeOptionsBuilder::new().force(true).build()),
                        )
                        .await
                }
                Made::Network(n) => docker.remove_network(n).await,
            };
            if let Err(e) = result {
                if !is_not_found(&e) {
                    errors.push(format!("{m:?}: {e}"));
                }
            }
        }
        if !errors.is_empty() {
            bail!("could not remove {}", errors.join("; "));
        }
        Ok(())
    }

    /// Notes an object this create made, before asking for it (so an interrupt while the
    /// engine makes it still removes it).
    fn record(&self, made: Made) {
        self.made.lock().expect("made list").push(made);
    }

    /// Whether a network exists.
    async fn network_exists(&self, name: &str) -> Result<bool> {
        match self.docker().await?.inspect_network(name, None).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot inspect network {name}")),
        }
    }

    /// Whether a container of the session runs (`Some(true)`), exists stopped (`Some(false)`)
    /// or is missing. (Listed, not inspected: Podman reports states in an inspect that the
    /// API's schema does not know, such as `stopped`.)
    async fn container_running(&self, plan: &Plan, name: &str) -> Result<Option<bool>> {
        let all = self.containers(Some(&plan.name)).await?;
        let wanted = format!("/{name}");
        Ok(all
            .iter()
            .find(|c| {
                c.names
                    .as_ref()
                    .is_some_and(|n| n.iter().any(|n| n == name || *n == wanted))
            })
            .map(is_running))
    }

    /// Creates the agent's internal network through the libpod API: internal, DNS off, no
    /// IPv6. The compatible API cannot turn Podman's DNS server off.
    async fn create_internal_network(&self, plan: &Plan) -> Result<()> {
        let conn = self.connection().await?;
        let name = &plan.names.internal_network;
        let body = isolation::internal_network_body(
            name,
            &label_map(plan.labels_for(Role::InternalNetwork)),
        );
        let (status, reply) = isolation::libpod(
            &conn.addr,
            hyper::Method::POST,
            "/networks/create",
            Some(&body),
        )
        .await
        .with_context(|| format!("cannot create network {name}"))?;
        if !(200..300).contains(&status) {
            bail!(
                "cannot create network {name}: podman answered {status}: {}",
                isolation::error_message(&reply)
            );
        }
        if reply["dns_enabled"].as_bool() != Some(false)
            || reply["internal"].as_bool() != Some(true)
        {
            bail!(
                "podman created network {name} with DNS on or a route out ({reply}): this podman \
                 ignores --disable-dns, so the agent would have a way out; upgrade podman"
            );
        }
        Ok(())
    }

    /// The start-up check: proves from inside the running agent container that nothing but the
    /// proxy answers (see netcheck.sh), then writes the agent's /etc/hosts and opens the gate
    /// the agent waits behind. On a leak it stops the session and fails with what leaked.
    /// Returns how long it took.
    async fn check_and_release(&self, name: &SessionName) -> Result<Duration> {
        let started = tokio::time::Instant::now();
        let docker = self.docker().await?;
        let agent = format!("paude-{name}-agent");
        let internal = format!("paude-{name}-internal");
        let info = docker
            .inspect_container(&agent, None)
            .await
            .with_context(|| format!("cannot inspect {agent}"))?;
        let endpoint = info
            .network_settings
            .and_then(|s| s.networks)
            .and_then(|mut nets| nets.remove(&internal))
            .with_context(|| format!("{agent} is not on {internal}"))?;
        let agent_ip: std::net::Ipv4Addr = endpoint
            .ip_address
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("{agent} has no IPv4 address on {internal}"))?;
        let prefix = endpoint.ip_prefix_len.unwrap_or(24);
        let subnet: IpNet = format!("{agent_ip}/{prefix}")
            .parse::<IpNet>()
            .map(|n| n.trunc())
            .with_context(|| format!("{agent} reports a bad prefix length {prefix}"))?;
        let proxy_ip = proxy_address(&subnet)?;
        let mut argv = vec![
            "bash".to_owned(),
            "-c".to_owned(),
            isolation::NETCHECK_SCRIPT.to_owned(),
            "paude-netcheck".to_owned(),
        ];
        argv.extend(isolation::netcheck_args(
            &subnet, agent_ip, proxy_ip, PROXY_PORT, &agent,
        )?);
        let user = format!("{}:{}", plan::AGENT_UID, plan::AGENT_GID);
        let (exec_id, exec) = self
            .exec_in(&agent, &user, None, &argv, false, false)
            .await?;
        let out = self.collect(&exec_id, exec).await?;
        let findings = isolation::netcheck_findings(&String::from_utf8_lossy(&out.stdout));
        let refusal = match findings {
            Ok(found) if found.is_empty() => None,
            Ok(found) => Some(format!(
                "the start-up check found a way out of session {name} other than its proxy:\n  - {}",
                found.join("\n  - ")
            )),
            Err(e) => Some(format!("{e:#}")),
        };
        if let Some(why) = refusal {
            let _ = self.stop(name).await;
            bail!(
                "{why}\nthe session was stopped before the agent ran; this engine's network setup \
                 does not isolate the agent (see the README's verified engines), so fix it before \
                 `paude-launch start {name}`"
            );
        }
        let hosts = isolation::hosts_file(agent_ip, &name.to_string());
        let argv: Vec<String> = [
            "sh",
            "-c",
            "printf '%s' \"$1\" > /etc/hosts && mkdir -p \"$2\" && : > \"$3\"",
            "paude-release",
            &hosts,
            isolation::GATE_DIR,
            isolation::GATE_FILE,
        ]
        .map(str::to_owned)
        .to_vec();
        let (exec_id, exec) = self
            .exec_in(&agent, "0:0", None, &argv, false, false)
            .await?;
        let out = self.collect(&exec_id, exec).await?;
        if out.code != 0 {
            let _ = self.stop(name).await;
            bail!(
                "cannot prepare the agent of session {name} ({}): the session was stopped",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(started.elapsed())
    }

    /// Copies files into a container (created or running) at their absolute paths.
    async fn upload(&self, container: &str, files: &[(&str, &[u8], u32)]) -> Result<()> {
        let docker = self.docker().await?;
        let tar = files_tar(files)?;
        docker
            .upload_to_container(
                container,
                Some(UploadToContainerOptionsBuilder::new().path("/").build()),
                body_full(tar.into()),
            )
            .await
            .with_context(|| format!("cannot copy files into container {container}"))
    }

    /// How many times the proxy's log says it listens: one more than before a start means
    /// this run listens (a container's log spans all its runs).
    async fn listening_lines(&self, container: &str) -> usize {
        let logs = self.logs(container, true, true).await.unwrap_or_default();
        logs.matches(PROXY_LISTENING).count()
    }

    /// Starts the (stopped) proxy container and waits until this run prints its listening
    /// line; fails with its log if it exits.
    async fn start_proxy(&self, container: &str) -> Result<()> {
        let before = self.listening_lines(container).await;
        self.docker()
            .await?
            .start_container(container, None)
            .await
            .with_context(|| format!("cannot start {container}"))?;
        self.wait_for_proxy(container, before).await
    }

    /// Waits until the proxy's log holds more than `before` listening lines; fails with its log
    /// if it exits.
    async fn wait_for_proxy(&self, container: &str, before: usize) -> Result<()> {
        let docker = self.docker().await?;
        let deadline = tokio::time::Instant::now() + ENGINE_WAIT;
        loop {
            let logs = self.logs(container, true, true).await.unwrap_or_default();
            if logs.matches(PROXY_LISTENING).count() > before {
                return Ok(());
            }
            crate::interrupt::check()?;
            let inspect = docker.inspect_container(container, None).await?;
            let running = inspect
                .state
                .as_ref()
                .and_then(|s| s.running)
                .unwrap_or(false);
            if !running || tokio::time::Instant::now() > deadline {
                let tail: Vec<&str> = logs.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "the proxy {container} {}; its log:\n  {}",
                    if running {
                        format!(
                            "did not report listening within {} s",
                            ENGINE_WAIT.as_secs()
                        )
                    } else {
                        "exited".to_owned()
                    },
                    tail.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A container's log as text.
    async fn logs(&self, container: &str, stdout: bool, stderr: bool) -> Result<String> {
        let docker = self.docker().await?;
        let opts = LogsOptionsBuilder::new()
            .stdout(stdout)
            .stderr(stderr)
            .build();
        let mut stream = docker.logs(container, Some(opts));
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk.with_context(|| format!("cannot read the log of {container}"))? {
                LogOutput::StdOut { message }
                | LogOutput::StdErr { message }
                | LogOutput::Console { message } => out.extend_from_slice(&message),
                LogOutput::StdIn { .. } => {}
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The running agent container's name, or an error saying how to start it.
    async fn running_agent(&self, name: &SessionName) -> Result<String> {
        let found = self.find(name).await?;
        match found.agent {
            Some(c) if is_running(&c) => Ok(format!("paude-{name}-agent")),
            Some(_) => {
                bail!("session {name} is stopped: start it with `paude-launch start {name}`")
            }
            None => bail!(
                "session {name} has no agent container: {}",
                super::finish_hint(name)
            ),
        }
    }

    /// The proxy container's name, or an error when it is missing.
    async fn proxy_container(&self, name: &SessionName) -> Result<String> {
        let found = self.find(name).await?;
        if found.proxy.is_none() {
            bail!(
                "session {name} has no proxy container: {}",
                super::finish_hint(name)
            );
        }
        Ok(format!("paude-{name}-proxy"))
    }

    /// Reads the proxy's configuration file from its container.
    async fn read_proxy_config(&self, container: &str) -> Result<String> {
        let docker = self.docker().await?;
        let opts = DownloadFromContainerOptionsBuilder::new()
            .path(PROXY_CONFIG_PATH)
            .build();
        let mut stream = docker.download_from_container(container, Some(opts));
        let mut archive = Vec::new();
        while let Some(chunk) = stream.next().await {
            archive.extend_from_slice(
                &chunk.with_context(|| format!("cannot read the configuration of {container}"))?,
            );
        }
        let bytes = first_file(&archive)?;
        String::from_utf8(bytes).context("the proxy configuration is not UTF-8")
    }

    /// Summarises one session from its containers.
    async fn info(&self, name: SessionName, found: &Found) -> SessionInfo {
        let state = match (&found.proxy, &found.agent) {
            (Some(p), Some(a)) if is_running(p) && is_running(a) => SessionState::Running,
            (Some(p), Some(a)) if !is_running(p) && !is_running(a) => SessionState::Stopped,
            (Some(_), Some(a)) if is_running(a) => {
                SessionState::Degraded("the proxy is not running".to_owned())
            }
            (Some(_), Some(_)) => SessionState::Degraded("the agent is not running".to_owned()),
            _ => SessionState::Incomplete(found.missing().unwrap_or_default().to_owned()),
        };
        let any = found.agent.as_ref().or(found.proxy.as_ref());
        let label = |k: &str| {
            any.and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get(k))
                .cloned()
                .unwrap_or_default()
        };
        let created = any
            .and_then(|c| c.created)
            .and_then(|s| u64::try_from(s).ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        let allowlist = match &found.proxy {
            Some(_) => match self.read_proxy_config(&format!("paude-{name}-proxy")).await {
                Ok(text) => ProxyConfig::from_toml(&text)
                    .map(|c| c.allow)
                    .unwrap_or_else(|_| vec!["?".to_owned()]),
                Err(_) => vec!["?".to_owned()],
            },
            None => Vec::new(),
        };
        let mut details = Vec::new();
        if let Some(p) = &found.proxy {
            let addr = p
                .network_settings
                .as_ref()
                .and_then(|s| s.networks.as_ref())
                .and_then(|nets| nets.get(&format!("paude-{name}-internal")))
                .and_then(|e| e.ip_address.clone())
                .filter(|ip| !ip.is_empty())
                .map(|ip| format!("{ip}:{PROXY_PORT}"))
                .unwrap_or_else(|| "-".to_owned());
            details.push(("proxy".to_owned(), addr));
            details.push((
                "proxy image".to_owned(),
                p.image.clone().unwrap_or_default(),
            ));
        }
        if let Some(a) = &found.agent {
            details.push((
                "agent image".to_owned(),
                a.image.clone().unwrap_or_default(),
            ));
        }
        details.push(("workspace".to_owned(), label(labels::WORKSPACE)));
        details.push(("volume".to_owned(), format!("paude-{name}-data")));
        details.push(("yolo".to_owned(), label(labels::YOLO)));
        details.push(("connect".to_owned(), format!("paude-launch connect {name}")));
        SessionInfo {
            name,
            backend: BackendKind::Podman,
            state,
            agent: label(labels::AGENT),
            allowlist,
            created,
            details,
        }
    }

    /// The `status` lines on isolation: the internal network's facts and the agent's IPv6.
    async fn network_details(&self, name: &SessionName, found: &Found) -> Vec<(String, String)> {
        let Ok(conn) = self.connection().await else {
            return Vec::new();
        };
        let internal = format!("paude-{name}-internal");
        let libpod = match conn.engine {
            Engine::Podman { .. } => {
                match isolation::libpod(
                    &conn.addr,
                    hyper::Method::GET,
                    &format!("/networks/{internal}/json"),
                    None,
                )
                .await
                {
                    Ok((200, v)) => Some(v),
                    _ => None,
                }
            }
            Engine::Docker { .. } => None,
        };
        let compat_internal = match &libpod {
            Some(_) => None,
            None => conn
                .docker
                .inspect_network(&internal, None)
                .await
                .ok()
                .and_then(|n| n.internal),
        };
        let engine = match &conn.engine {
            Engine::Podman { version } => format!("podman {version}"),
            Engine::Docker { version } => format!("docker {version}"),
        };
        let mut details = vec![
            ("engine".to_owned(), engine),
            (
                "network".to_owned(),
                isolation::network_facts(&internal, libpod.as_ref(), compat_internal),
            ),
        ];
        // The engines do not report sysctls in their inspect output, so the agent's IPv6 is
        // read from inside it, like the start-up check does.
        let ipv6 = match &found.agent {
            Some(a) if is_running(a) => {
                let argv = ["cat", "/proc/net/if_inet6"].map(str::to_owned);
                match self.exec_capture(name, &argv).await {
                    Ok(out) => {
                        let text = String::from_utf8_lossy(&out.stdout).into_owned();
                        let addrs: Vec<&str> = text
                            .lines()
                            .filter(|l| !l.trim_end().ends_with(" lo"))
                            .filter_map(|l| l.split_whitespace().last())
                            .collect();
                        if addrs.is_empty() {
                            "off".to_owned()
                        } else {
                            format!("ON ({})", addrs.join(", "))
                        }
                    }
                    Err(_) => "unknown (the agent did not answer)".to_owned(),
                }
            }
            _ => "checked at every start".to_owned(),
        };
        details.push(("agent ipv6".to_owned(), ipv6));
        details
    }

    /// Runs a command in the running agent container, attached as asked.
    async fn exec(
        &self,
        name: &SessionName,
        argv: &[String],
        stdin: bool,
        tty: bool,
    ) -> Result<(String, StartExecResults)> {
        let container = self.running_agent(name).await?;
        let user = format!("{}:{}", plan::AGENT_UID, plan::AGENT_GID);
        self.exec_in(&container, &user, Some(WORKSPACE_DIR), argv, stdin, tty)
            .await
    }

    /// Runs a command in a running container as `user`, attached as asked.
    async fn exec_in(
        &self,
        container: &str,
        user: &str,
        workdir: Option<&str>,
        argv: &[String],
        stdin: bool,
        tty: bool,
    ) -> Result<(String, StartExecResults)> {
        let docker = self.docker().await?;
        let mut env = vec![];
        if tty {
            env.push(format!(
                "TERM={}",
                std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".to_owned())
            ));
        }
        let exec = docker
            .create_exec(
                container,
                ExecConfig {
                    attach_stdin: Some(stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(tty),
                    cmd: Some(argv.to_vec()),
                    user: Some(user.to_owned()),
                    working_dir: workdir.map(str::to_owned),
                    env: Some(env),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("cannot run a command in {container}"))?;
        let started = docker
            .start_exec(
                &exec.id,
                Some(StartExecOptions {
                    detach: false,
                    tty,
                    output_capacity: None,
                }),
            )
            .await
            .with_context(|| format!("cannot run a command in {container}"))?;
        Ok((exec.id, started))
    }

    /// Collects the output of an attached exec and its exit code.
    async fn collect(&self, exec_id: &str, started: StartExecResults) -> Result<ExecOutput> {
        let StartExecResults::Attached { mut output, .. } = started else {
            bail!("the engine did not attach to the command's streams");
        };
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(chunk) = output.next().await {
            match chunk.context("the connection to the container broke")? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    stdout.extend_from_slice(&message)
                }
                LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                LogOutput::StdIn { .. } => {}
            }
        }
        Ok(ExecOutput {
            code: self.exit_code(exec_id).await?,
            stdout,
            stderr,
        })
    }

    /// The exit code of a finished exec. The engine records it a moment after the output
    /// ends, later on a busy machine; the bound is for an engine that never does.
    async fn exit_code(&self, exec_id: &str) -> Result<i64> {
        let docker = self.docker().await?;
        let deadline = tokio::time::Instant::now() + ENGINE_WAIT;
        loop {
            let inspect = docker.inspect_exec(exec_id).await?;
            if inspect.running != Some(true) {
                return Ok(inspect.exit_code.unwrap_or(1));
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the command in the container did not report its exit status within {} s: \
                     check the engine with `podman ps`",
                    ENGINE_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Puts the terminal into raw mode until dropped.
struct RawMode;

impl RawMode {
    /// Enables raw mode when stdin is a terminal.
    fn enable() -> Option<RawMode> {
        crossterm::terminal::enable_raw_mode().ok().map(|_| RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

#[async_trait]
impl Backend for Podman {
    fn kind(&self) -> BackendKind {
        BackendKind::Podman
    }

    fn render(&self, plan: &Plan) -> Result<String> {
        Ok(render_plan(plan))
    }

    async fn ensure_images(&self, plan: &Plan, progress: Progress) -> Result<()> {
        self.require_safe_engine().await?;
        let docker = self.docker().await?;
        let images = plan
            .base_build
            .iter()
            .chain([&plan.proxy_image, &plan.agent_image]);
        for image in images {
            let reference = image.reference();
            if !plan.rebuild && docker.inspect_image(&reference).await.is_ok() {
                progress.detail(format!("image {reference} is up to date"));
                continue;
            }
            self.build(image, plan.rebuild, progress).await?;
        }
        Ok(())
    }

    async fn create(&self, plan: &Plan, progress: Progress) -> Result<()> {
        self.require_safe_engine().await?;
        let existing = self.containers(Some(&plan.name)).await?;
        if existing.len() >= 2 {
            bail!(
                "session {} already exists: attach with `paude-launch connect {}` or remove it with `paude-launch delete {} --confirm`",
                plan.name, plan.name, plan.name
            );
        }
        if !plan.names.owns_egress_network {
            let docker = self.docker().await?;
            if let Err(e) = docker
                .inspect_network(&plan.names.egress_network, None)
                .await
            {
                if is_not_found(&e) {
                    bail!(
                        "the egress network {} does not exist: create it with `podman network create {}` or leave out --egress-network",
                        plan.names.egress_network, plan.names.egress_network
                    );
                }
                return Err(e).context("cannot inspect the egress network");
            }
        }
        self.made.lock().expect("made list").clear();
        if let Err(e) = self.create_objects(plan, progress).await {
            progress.step("creation failed; removing what this create made");
            let _ = self.undo_create().await;
            return Err(e);
        }
        Ok(())
    }

    async fn start(&self, name: &SessionName) -> Result<()> {
        self.require_safe_engine().await?;
        let found = self.find(name).await?;
        let docker = self.docker().await?;
        let (Some(proxy), Some(agent)) = (&found.proxy, &found.agent) else {
            bail!(
                "session {name} is incomplete ({}): {}",
                found.missing().unwrap_or_default(),
                super::finish_hint(name)
            );
        };
        if !is_running(proxy) {
            self.start_proxy(&format!("paude-{name}-proxy")).await?;
        }
        if !is_running(agent) {
            let c = format!("paude-{name}-agent");
            docker
                .start_container(&c, None)
                .await
                .with_context(|| format!("cannot start {c}"))?;
        }
        // Every start is checked, a running agent's too: its gate may still be closed (the
        // container was started by other means), and the engine may have changed since.
        let took = self.check_and_release(name).await?;
        Progress { verbose: false }.step(format!(
            "checked that the agent's only way out is its proxy ({} ms)",
            took.as_millis()
        ));
        Ok(())
    }

    async fn stop(&self, name: &SessionName) -> Result<()> {
        let found = self.find(name).await?;
        let docker = self.docker().await?;
        for (role, c) in [("agent", &found.agent), ("proxy", &found.proxy)] {
            if c.as_ref().is_some_and(is_running) {
                let cname = format!("paude-{name}-{role}");
                docker
                    .stop_container(
                        &cname,
                        Some(StopContainerOptionsBuilder::new().t(5).build()),
                    )
                    .await
                    .with_context(|| format!("cannot stop {cname}"))?;
            }
        }
        Ok(())
    }

    async fn delete(&self, name: &SessionName, progress: Progress) -> Result<()> {
        if !self.any_object(name).await? {
            bail!("no session named {name}: see `paude-launch list`");
        }
        progress.step(format!("removing session {name}"));
        self.remove_all(name).await
    }

    async fn list(&self) -> Result<Vec<SessionInfo>> {
        let all = self.containers(None).await?;
        let mut by_name: BTreeMap<String, Found> = BTreeMap::new();
        for c in all {
            let Some(labels) = c.labels.clone() else {
                continue;
            };
            let (Some(session), Some(role)) =
                (labels.get(labels::SESSION), labels.get(labels::ROLE))
            else {
                continue;
            };
            let entry = by_name.entry(session.clone()).or_insert(Found {
                proxy: None,
                agent: None,
            });
            if role == Role::Proxy.as_str() {
                entry.proxy = Some(c);
            } else if role == Role::Agent.as_str() {
                entry.agent = Some(c);
            }
        }
        // A create killed before its containers leaves only networks and a volume: listed too,
        // as incomplete.
        let docker = self.docker().await?;
        let nets = docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::new()
                    .filters(&session_filter(None))
                    .build(),
            ))
            .await
            .context("cannot list networks")?;
        let vols = docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new()
                    .filters(&session_filter(None))
                    .build(),
            ))
            .await
            .context("cannot list volumes")?;
        let other_labels = nets.into_iter().filter_map(|n| n.labels).chain(
            vols.volumes
                .unwrap_or_default()
                .into_iter()
                .map(|v| v.labels),
        );
        for l in other_labels {
            if let Some(session) = l.get(labels::SESSION) {
                by_name.entry(session.clone()).or_insert(Found {
                    proxy: None,
                    agent: None,
                });
            }
        }
        let mut out = Vec::new();
        for (name, found) in by_name {
            let Ok(name) = SessionName::parse(&name) else {
                continue;
            };
            out.push(self.info(name, &found).await);
        }
        Ok(out)
    }

    async fn status(&self, name: &SessionName) -> Result<SessionInfo> {
        let found = self.find(name).await?;
        let mut info = self.info(name.clone(), &found).await;
        info.details
            .extend(self.network_details(name, &found).await);
        Ok(info)
    }

    async fn connect(&self, name: &SessionName) -> Result<()> {
        let argv = vec![
            "/usr/local/bin/paude-session".to_owned(),
            "attach".to_owned(),
        ];
        let (exec_id, started) = self.exec(name, &argv, true, true).await?;
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        else {
            bail!("the engine did not attach to the agent's terminal");
        };
        let docker = self.docker().await?;
        let resize = |(w, h): (u16, u16)| {
            docker.resize_exec(
                &exec_id,
                ResizeExecOptionsBuilder::new()
                    .w(i32::from(w))
                    .h(i32::from(h))
                    .build(),
            )
        };
        let _raw = RawMode::enable();
        if let Ok(size) = crossterm::terminal::size() {
            let _ = resize(size).await;
        }
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        let stdin_pump = tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let _ = input.flush().await;
                    }
                }
            }
        });
        let mut stdout = tokio::io::stdout();
        // Podman keeps an attached TTY stream open after the command exits, so the exec's
        // state is polled too: detaching from tmux ends the command and with it this loop.
        let mut poll = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                chunk = output.next() => match chunk {
                    Some(Ok(out)) => {
                        stdout.write_all(&out.into_bytes()).await?;
                        stdout.flush().await?;
                    }
                    Some(Err(e)) => return Err(anyhow!(e).context("the connection to the agent broke")),
                    None => break,
                },
                _ = poll.tick() => {
                    if docker.inspect_exec(&exec_id).await.map(|i| i.running == Some(false)).unwrap_or(true) {
                        break;
                    }
                }
                _ = winch.recv() => {
                    if let Ok(size) = crossterm::terminal::size() {
                        let _ = resize(size).await;
                    }
                }
            }
        }
        stdin_pump.abort();
        Ok(())
    }

    async fn exec_piped(&self, name: &SessionName, argv: &[String]) -> Result<i64> {
        let (exec_id, started) = self.exec(name, argv, true, false).await?;
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        else {
            bail!("the engine did not attach to the command's streams");
        };
        let stdin_pump = tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 65536];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        let _ = input.flush().await;
                    }
                }
            }
            let _ = input.shutdown().await;
        });
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        while let Some(chunk) = output.next().await {
            match chunk.context("the connection to the agent container broke")? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    stdout.write_all(&message).await?;
                    stdout.flush().await?;
                }
                LogOutput::StdErr { message } => {
                    stderr.write_all(&message).await?;
                }
                LogOutput::StdIn { .. } => {}
            }
        }
        stdin_pump.abort();
        self.exit_code(&exec_id).await
    }

    async fn exec_capture(&self, name: &SessionName, argv: &[String]) -> Result<ExecOutput> {
        let (exec_id, started) = self.exec(name, argv, false, false).await?;
        self.collect(&exec_id, started).await
    }

    async fn proxy_config(&self, name: &SessionName) -> Result<String> {
        let container = self.proxy_container(name).await?;
        self.read_proxy_config(&container).await
    }

    async fn update_proxy_config(&self, name: &SessionName, toml: &str) -> Result<()> {
        let found = self.find(name).await?;
        let running = found.proxy.as_ref().is_some_and(is_running);
        let container = self.proxy_container(name).await?;
        if running {
            // The proxy itself checks the candidate first, so a configuration it would refuse
            // never replaces the one in force, and renames it over the file in force: the
            // archive API rewrites a file in place, which the running proxy's watcher could
            // read half-written. Root runs it because the configuration directory is root's,
            // and the proxy's own user must not be able to change its configuration.
            self.upload(
                &container,
                &[(PROXY_CANDIDATE_PATH, toml.as_bytes(), 0o644)],
            )
            .await?;
            let argv: Vec<String> = [
                "/usr/local/bin/paude-proxy",
                "--check",
                "--config",
                PROXY_CANDIDATE_PATH,
                "--install-as",
                PROXY_CONFIG_PATH,
            ]
            .map(str::to_owned)
            .to_vec();
            let (exec_id, started) = self
                .exec_in(&container, "0:0", None, &argv, false, false)
                .await?;
            let out = self.collect(&exec_id, started).await?;
            if out.code != 0 {
                bail!(
                    "the proxy refused the new allowlist, nothing was changed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        } else {
            // Nothing reads the file of a stopped proxy until it starts.
            self.upload(&container, &[(PROXY_CONFIG_PATH, toml.as_bytes(), 0o644)])
                .await?;
        }
        if running {
            let docker = self.docker().await?;
            docker
                .kill_container(
                    &container,
                    Some(KillContainerOptionsBuilder::new().signal("SIGHUP").build()),
                )
                .await
                .with_context(|| format!("cannot signal {container} to reload"))?;
        }
        Ok(())
    }

    async fn proxy_audit_log(&self, name: &SessionName) -> Result<String> {
        let container = self.proxy_container(name).await?;
        self.logs(&container, true, false).await
    }
}

impl Podman {
    /// Removes every container, volume and network labelled with the session.
    async fn remove_all(&self, name: &SessionName) -> Result<()> {
        let docker = self.docker().await?;
        let mut errors = Vec::new();
        for c in self.containers(Some(name)).await? {
            if let Some(id) = c.id {
                if let Err(e) = docker
                    .remove_container(
                        &id,
                        Some(
                            RemoveContainerOptionsBuilder::new()
                                .force(true)
                                .v(true)
                                .build(),
                        ),
                    )
                    .await
                {
                    if !is_not_found(&e) {
                        errors.push(format!("container {id}: {e}"));
                    }
                }
            }
        }
        let vols = docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new()
                    .filters(&session_filter(Some(name)))
                    .build(),
            ))
            .await?;
        for v in vols.volumes.unwrap_or_default() {
            if let Err(e) = docker
                .remove_volume(
                    &v.name,
                    Some(RemoveVolumeOptionsBuilder::new().force(true).build()),
                )
                .await
            {
                if !is_not_found(&e) {
                    errors.push(format!("volume {}: {e}", v.name));
                }
            }
        }
        let nets = docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::new()
                    .filters(&session_filter(Some(name)))
                    .build(),
            ))
            .await?;
        for net in nets {
            let Some(net_name) = net.name else { continue };
            if let Err(e) = docker.remove_network(&net_name).await {
                if !is_not_found(&e) {
                    errors.push(format!("network {net_name}: {e}"));
                }
            }
        }
        if !errors.is_empty() {
            bail!(
                "some objects of session {name} could not be removed: {}; run the delete again",
                errors.join("; ")
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_gets_the_second_host_address() {
        let net: IpNet = "10.89.3.0/24".parse().unwrap();
        assert_eq!(proxy_address(&net).unwrap().to_string(), "10.89.3.2");
        let tiny: IpNet = "10.0.0.0/32".parse().unwrap();
        assert!(proxy_address(&tiny).is_err());
    }

    #[test]
    fn the_proxy_mac_is_fixed_by_its_address() {
        let ip: IpAddr = "10.89.3.2".parse().unwrap();
        assert_eq!(proxy_mac(ip), "02:50:0a:59:03:02");
        assert_ne!(proxy_mac(ip), proxy_mac("10.89.4.2".parse().unwrap()));
    }

    #[test]
    fn files_tar_has_parent_directories() {
        let tar = files_tar(&[("/etc/paude-proxy/config.toml", b"x = 1", 0o644)]).unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        let paths: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            paths,
            ["etc/", "etc/paude-proxy/", "etc/paude-proxy/config.toml"]
        );
        assert_eq!(first_file(&tar).unwrap(), b"x = 1");
    }

    #[test]
    fn dry_run_names_every_object_and_hides_secrets() {
        use crate::cli::CreateArgs;
        use crate::images::{Customisation, ImageInputs};
        use crate::spec::{HostContext, SessionSpec};
        let args = CreateArgs {
            name: Some("demo".into()),
            agent: "claude".into(),
            memory: "4g".into(),
            pids_limit: 512,
            base_image: "localhost/base".into(),
            pvc_size: "10Gi".into(),
            git: true,
            ..CreateArgs::default()
        };
        let mut host = HostContext {
            cwd: "/src/demo".into(),
            ..HostContext::default()
        };
        host.env
            .insert("ANTHROPIC_API_KEY".into(), "sk-secret-value".into());
        let spec = SessionSpec::from_args(&args, BackendKind::Podman, host).unwrap();
        let inputs = ImageInputs {
            proxy_binary: std::sync::Arc::new(b"bin".to_vec()),
            proxy_identity: "paude-proxy build test".into(),
            proxy_is_static: true,
            ca_bundle: None,
        };
        let plan = Plan::new(&spec, &inputs, &Customisation::default());
        let text = render_plan(&plan);
        for needle in [
            "network paude-demo-internal (internal",
            "network paude-demo-egress",
            "volume paude-demo-data",
            "container paude-demo-proxy",
            "container paude-demo-agent",
            "image localhost/paude-proxy:",
            "image localhost/paude-agent-claude:",
            "from:    scratch",
            "allow = [\"default\", \"claude\"]",
            "HTTPS_PROXY=http://PROXY_IP:3128",
            "ANTHROPIC_API_KEY=(from the host)",
            "limits:    memory 4096 MiB, cpus unlimited, pids 512",
            "git remote paude-demo",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("sk-secret-value"));
    }

    #[test]
    fn label_filter() {
        let name = SessionName::parse("demo").unwrap();
        assert_eq!(session_filter(Some(&name))["label"], ["paude.session=demo"]);
        assert_eq!(session_filter(None)["label"], ["paude.session"]);
    }
}
