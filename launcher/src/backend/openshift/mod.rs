//! The OpenShift and Kubernetes backend: renders a [`Plan`] as cluster objects
//! (`manifests.rs`), applies and inspects them through kube-rs (`api.rs`) and runs commands in
//! the agent pod through the API's exec (`exec.rs`). It uses the user's kubeconfig (current
//! context and namespace, or `--context` / `--namespace`) and never shells out to `oc` or
//! `kubectl`.
//!
//! On OpenShift (no `--registry`) images are built on the cluster by binary BuildConfigs into
//! per-session ImageStreams, tagged by the plan's input hash. On plain Kubernetes `--registry`
//! names where images tagged by that hash are pulled from.

mod api;
mod exec;
mod manifests;

#[cfg(test)]
mod isolation_tests;
#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

use crate::backend::{Backend, ExecOutput, Progress, SessionInfo, SessionState};
use crate::cli::{BackendKind, Global};
use crate::images::ImagePlan;
use crate::plan::{self, Plan, ProxyConfig};
use crate::spec::SessionName;

use manifests::{File, Flavor, ImageRef, Names, Resources, Session, DRY_RUN_PROXY_HOST};

/// CPU and memory of the proxy pod: paude-proxy is small and async, this is ample.
const PROXY_MEMORY: &str = "256Mi";
const PROXY_CPU: &str = "500m";
/// How long `create` waits for an on-cluster image build and for the agent pod.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const READY_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const POLL: Duration = Duration::from_secs(2);

/// A cluster from the kubeconfig, and the namespace sessions live in.
pub struct OpenShiftBackend {
    /// The client, or why there is none (a dry run without a kubeconfig).
    client: std::result::Result<Client, String>,
    namespace: String,
}

impl OpenShiftBackend {
    /// Reads the kubeconfig (honouring `KUBECONFIG`, `--context` and `--namespace`). Contacts
    /// no cluster: a dry run works offline.
    ///
    /// A dry run also works without any kubeconfig when `--namespace` names the namespace.
    pub async fn open(global: &Global) -> Result<Self> {
        match Self::connect(global).await {
            Ok((client, namespace)) => Ok(OpenShiftBackend {
                client: Ok(client),
                namespace: global.namespace.clone().unwrap_or(namespace),
            }),
            Err(err) if global.dry_run => match &global.namespace {
                Some(namespace) => Ok(OpenShiftBackend {
                    client: Err(format!("{err:#}")),
                    namespace: namespace.clone(),
                }),
                None => Err(err.context(
                    "without a usable kubeconfig, a dry run needs the namespace: add --namespace",
                )),
            },
            Err(err) => Err(err),
        }
    }

    /// A client for the kubeconfig's context and that context's namespace.
    async fn connect(global: &Global) -> Result<(Client, String)> {
        let options = KubeConfigOptions {
            context: global.context.clone(),
            ..KubeConfigOptions::default()
        };
        let kubeconfig = Kubeconfig::read().context(
            "cannot read a kubeconfig: log in first (oc login / kubectl config use-context) or \
             point KUBECONFIG at one",
        )?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .context("cannot use the kubeconfig's context: check --context and your login")?;
        let namespace = config.default_namespace.clone();
        let client = Client::try_from(config).context("cannot set up the cluster client")?;
        Ok((client, namespace))
    }

    /// The cluster client; only a dry run without a kubeconfig has none.
    fn client(&self) -> Result<&Client> {
        self.client.as_ref().map_err(|err| anyhow::anyhow!("{err}"))
    }

    /// The session's cluster description, from the plan: nothing here is decided again.
    fn session(&self, plan: &Plan) -> Result<Session> {
        let name = plan.name.to_string();
        manifests::check_name(&name)?;
        if let Some(mount) = plan
            .agent_container
            .mounts
            .iter()
            .find(|m| m.target == plan::WORKSPACE_DIR)
        {
            bail!(
                "--mount {} is not available on a cluster, which cannot see this machine's \
                 files: use --git to sync the repository instead",
                mount.source.display()
            );
        }
        if let Some(base) = &plan.base_build {
            bail!(
                "the project's devcontainer build ({}) cannot be built on a cluster yet: build \
                 that image locally, push it to a registry the cluster can pull from, and name \
                 it in devcontainer.json's `image` (or paude.json's `base`) instead",
                base.reference()
            );
        }
        let registry = plan.cluster.registry.as_deref();
        let flavor = match registry {
            Some(_) => Flavor::Kubernetes,
            None => Flavor::OpenShift,
        };
        let image = |image: &ImagePlan, role: &str| {
            let stream = format!("paude-{name}-{role}");
            let tag = image.tag().to_string();
            let pull = match registry {
                Some(registry) => format!(
                    "{}/{}:{tag}",
                    registry.trim_end_matches('/'),
                    image
                        .repository
                        .rsplit('/')
                        .next()
                        .unwrap_or(&image.repository)
                ),
                None => format!("{stream}:{tag}"),
            };
            ImageRef { stream, tag, pull }
        };
        let resources = &plan.agent_container.resources;
        let hardening = &plan.agent_container.hardening;
        Ok(Session {
            name: name.clone(),
            namespace: self.namespace.clone(),
            flavor,
            labels: plan.labels.clone(),
            agent_image: image(&plan.agent_image, "agent"),
            proxy_image: image(&plan.proxy_image, "proxy"),
            agent_env: plan.agent_env(DRY_RUN_PROXY_HOST),
            agent_args: plan.agent_container.argv.clone(),
            agent_files: plan
                .agent_container
                .files
                .iter()
                .map(|f| File {
                    path: f.path.clone(),
                    contents: f.contents.clone(),
                    mode: f.mode as i32,
                })
                .collect(),
            workdir: plan::WORKSPACE.into(),
            home: plan::AGENT_HOME.into(),
            agent_uid: hardening.uid.into(),
            agent_gid: hardening.gid.into(),
            proxy_uid: plan::PROXY_UID.into(),
            init: hardening.init,
            proxy_config: plan.proxy.to_toml(),
            resources: Resources {
                memory: (resources.memory_bytes > 0)
                    .then(|| memory_quantity(resources.memory_bytes)),
                cpus: resources.cpu_millis.map(|m| format!("{m}m")),
            },
            proxy_resources: Resources {
                memory: Some(PROXY_MEMORY.into()),
                cpus: Some(PROXY_CPU.into()),
            },
            pvc_size: plan.cluster.pvc_size.clone(),
            storage_class: plan.cluster.storage_class.clone(),
            proxy_allow_cidrs: plan.proxy.allow_cidr.clone(),
        })
    }

    /// Host paths the plan would mount read-only (agent credentials): a cluster cannot see
    /// them, so the user is told they are left out.
    fn warn_unmounted(plan: &Plan, progress: Progress) {
        for mount in &plan.agent_container.mounts {
            progress.step(format!(
                "warning: {} is not copied to the cluster (host paths cannot be mounted there)",
                mount.source.display()
            ));
        }
    }

    fn names(&self, name: &SessionName) -> Names {
        Names::new(&name.to_string())
    }
}

/// A byte count as a Kubernetes quantity, in the largest binary unit that divides it.
fn memory_quantity(bytes: u64) -> String {
    for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// A tar archive of an image's build context, the Dockerfile at its root.
fn context_tar(image: &ImagePlan) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for file in &image.files {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.contents.len() as u64);
        header.set_mode(file.mode);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, &file.path, file.contents.as_slice())
            .with_context(|| format!("cannot pack {} into the build context", file.path))?;
    }
    builder
        .into_inner()
        .context("cannot finish the build context archive")
}

fn state_of(row: &api::SessionRow) -> SessionState {
    match row.state.as_str() {
        "running" => SessionState::Running,
        "stopped" => SessionState::Stopped,
        other => SessionState::Degraded(format!("agent pod is {other}")),
    }
}

impl OpenShiftBackend {
    async fn info(&self, row: api::SessionRow) -> Result<SessionInfo> {
        let name = SessionName::parse(&row.name)?;
        let allowlist = match api::proxy_config(self.client()?, &self.namespace, &row.name).await {
            Ok(toml) => ProxyConfig::from_toml(&toml)?.allow,
            Err(_) => Vec::new(),
        };
        let names = self.names(&name);
        let created = row
            .created
            .map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64));
        Ok(SessionInfo {
            name,
            backend: BackendKind::Openshift,
            state: state_of(&row),
            agent: row.agent.clone(),
            allowlist,
            created,
            details: vec![
                ("namespace".into(), self.namespace.clone()),
                ("agent pod".into(), names.agent_pod),
                (
                    "proxy".into(),
                    format!("Deployment and Service {}", names.proxy),
                ),
                ("volume claim".into(), names.data_claim),
            ],
        })
    }
}

#[async_trait]
impl Backend for OpenShiftBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Openshift
    }

    fn render(&self, plan: &Plan) -> Result<String> {
        let session = self.session(plan)?;
        session.manifests(DRY_RUN_PROXY_HOST).to_yaml()
    }

    async fn ensure_images(&self, plan: &Plan, progress: Progress) -> Result<()> {
        let session = self.session(plan)?;
        api::ensure_namespace(self.client()?, &self.namespace).await?;
        let cluster = api::detect_flavor(self.client()?).await?;
        match (session.flavor, cluster) {
            (Flavor::OpenShift, Flavor::Kubernetes) => bail!(
                "this cluster has no OpenShift build API: push the images to a registry the \
                 cluster can pull from and name it with --registry"
            ),
            (Flavor::Kubernetes, _) => {
                progress.step(format!(
                    "using prebuilt images {} and {}",
                    session.proxy_image.pull, session.agent_image.pull
                ));
                return Ok(());
            }
            (Flavor::OpenShift, Flavor::OpenShift) => {}
        }
        let m = session.manifests(DRY_RUN_PROXY_HOST);
        api::apply_build_objects(self.client()?, &self.namespace, &m).await?;
        for (image, built) in [
            (&plan.proxy_image, &session.proxy_image),
            (&plan.agent_image, &session.agent_image),
        ] {
            let exists =
                api::image_exists(self.client()?, &self.namespace, &built.stream, &built.tag)
                    .await?;
            if exists && !plan.rebuild {
                progress.detail(format!("image {} is up to date", built.pull));
                continue;
            }
            progress.step(format!("building image {} on the cluster", built.pull));
            api::build_image(
                self.client()?,
                &self.namespace,
                &built.stream,
                context_tar(image)?,
                POLL,
                BUILD_TIMEOUT,
            )
            .await?;
        }
        Ok(())
    }

    async fn create(&self, plan: &Plan, progress: Progress) -> Result<()> {
        let session = self.session(plan)?;
        Self::warn_unmounted(plan, progress);
        progress.step(format!(
            "creating session {} in namespace {}",
            session.name, self.namespace
        ));
        let waits = api::Waits {
            poll: POLL,
            build_timeout: BUILD_TIMEOUT,
        };
        // Images were made by ensure_images; create applies the session's objects.
        api::create(self.client()?, &session, &[], false, waits).await?;
        progress.step("waiting for the agent pod to be ready");
        api::wait_ready(
            self.client()?,
            &self.namespace,
            &session.name,
            POLL,
            READY_TIMEOUT,
        )
        .await
    }

    async fn start(&self, name: &SessionName) -> Result<()> {
        api::scale(self.client()?, &self.namespace, &name.to_string(), 1).await?;
        api::wait_ready(
            self.client()?,
            &self.namespace,
            &name.to_string(),
            POLL,
            READY_TIMEOUT,
        )
        .await
    }

    async fn stop(&self, name: &SessionName) -> Result<()> {
        api::scale(self.client()?, &self.namespace, &name.to_string(), 0).await
    }

    async fn delete(&self, name: &SessionName, progress: Progress) -> Result<()> {
        progress.step(format!(
            "deleting every object of session {name} in namespace {}",
            self.namespace
        ));
        let openshift = api::detect_flavor(self.client()?).await? == Flavor::OpenShift;
        api::delete(
            self.client()?,
            &self.namespace,
            &name.to_string(),
            openshift,
        )
        .await
    }

    async fn list(&self) -> Result<Vec<SessionInfo>> {
        let mut sessions = Vec::new();
        for row in api::list(self.client()?, &self.namespace).await? {
            sessions.push(self.info(row).await?);
        }
        Ok(sessions)
    }

    async fn status(&self, name: &SessionName) -> Result<SessionInfo> {
        let row = api::status(self.client()?, &self.namespace, &name.to_string()).await?;
        self.info(row).await
    }

    async fn connect(&self, name: &SessionName) -> Result<()> {
        let argv = vec![
            "/usr/local/bin/paude-session".to_string(),
            "attach".to_string(),
        ];
        exec::interactive(
            self.client()?,
            &self.namespace,
            &self.names(name).agent_pod,
            &argv,
        )
        .await
    }

    async fn exec_piped(&self, name: &SessionName, argv: &[String]) -> Result<i64> {
        exec::piped(
            self.client()?,
            &self.namespace,
            &self.names(name).agent_pod,
            argv,
        )
        .await
    }

    async fn exec_capture(&self, name: &SessionName, argv: &[String]) -> Result<ExecOutput> {
        let (code, stdout, stderr) = exec::capture(
            self.client()?,
            &self.namespace,
            &self.names(name).agent_pod,
            argv,
        )
        .await?;
        Ok(ExecOutput {
            code,
            stdout,
            stderr,
        })
    }

    async fn proxy_config(&self, name: &SessionName) -> Result<String> {
        api::proxy_config(self.client()?, &self.namespace, &name.to_string()).await
    }

    async fn update_proxy_config(&self, name: &SessionName, toml: &str) -> Result<()> {
        api::set_proxy_config(self.client()?, &self.namespace, &name.to_string(), toml).await
    }

    async fn proxy_audit_log(&self, name: &SessionName) -> Result<String> {
        api::proxy_log(self.client()?, &self.namespace, &name.to_string()).await
    }
}

#[cfg(test)]
mod unit {
    #[test]
    fn memory_is_written_in_the_largest_binary_unit() {
        assert_eq!(super::memory_quantity(8 << 30), "8Gi");
        assert_eq!(super::memory_quantity(1536 << 20), "1536Mi");
        assert_eq!(super::memory_quantity(1000), "1000");
    }
}
