//! The session's life on a cluster, one function per verb, over a `kube::Client`: create
//! (server-side apply of every manifest, so a repeated create repairs a half-failed one),
//! start and stop (scale to 1 and 0), delete (everything labelled with the session), list,
//! status, the proxy's allowlist and audit log, and on-cluster image builds. Everything that
//! reaches the API goes through here, so the fake-API tests see the complete conversation.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams,
};
use kube::Client;
use serde_json::{json, Value};

use super::manifests::{
    Flavor, Manifests, Names, Session, PROXY_CONFIG_KEY, ROLE_LABEL, SESSION_LABEL,
};

/// The field manager of every server-side apply: the cluster records which fields
/// paude-launch owns, and a later apply by the same manager converges them.
pub const FIELD_MANAGER: &str = "paude-launch";

/// Checks that the namespace exists, with an error that says what to do when it does not:
/// paude-launch never creates namespaces.
pub async fn ensure_namespace(client: &Client, namespace: &str) -> Result<()> {
    match Api::<Namespace>::all(client.clone()).get(namespace).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => bail!(
            "namespace {namespace:?} does not exist: ask a cluster administrator to create it, \
             or choose an existing one with --namespace (paude-launch never creates namespaces)"
        ),
        Err(kube::Error::Api(status)) if status.is_forbidden() => bail!(
            "you may not read namespace {namespace:?}: log in as a user with access to it \
             (oc login / kubectl config use-context) or choose another with --namespace"
        ),
        Err(err) => Err(err).context(format!(
            "cannot reach the cluster to check namespace {namespace:?}: check your kubeconfig \
             and that you are logged in"
        )),
    }
}

/// Tells OpenShift from plain Kubernetes by asking for the build API group.
pub async fn detect_flavor(client: &Client) -> Result<Flavor> {
    let request = http::Request::get("/apis/build.openshift.io/v1")
        .body(Vec::new())
        .context("cannot build the API discovery request")?;
    match client.request_text(request).await {
        Ok(_) => Ok(Flavor::OpenShift),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(Flavor::Kubernetes),
        Err(err) => Err(err).context("cannot discover the cluster's API groups"),
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn image_stream_resource() -> ApiResource {
    ApiResource {
        group: "image.openshift.io".into(),
        version: "v1".into(),
        api_version: "image.openshift.io/v1".into(),
        kind: "ImageStream".into(),
        plural: "imagestreams".into(),
    }
}

fn build_config_resource() -> ApiResource {
    ApiResource {
        group: "build.openshift.io".into(),
        version: "v1".into(),
        api_version: "build.openshift.io/v1".into(),
        kind: "BuildConfig".into(),
        plural: "buildconfigs".into(),
    }
}

fn build_resource() -> ApiResource {
    ApiResource {
        group: "build.openshift.io".into(),
        version: "v1".into(),
        api_version: "build.openshift.io/v1".into(),
        kind: "Build".into(),
        plural: "builds".into(),
    }
}

fn image_stream_tag_resource() -> ApiResource {
    ApiResource {
        group: "image.openshift.io".into(),
        version: "v1".into(),
        api_version: "image.openshift.io/v1".into(),
        kind: "ImageStreamTag".into(),
        plural: "imagestreamtags".into(),
    }
}

/// Whether an agent StatefulSet of this name exists: the mark of a fully created session,
/// because it is the last object `create` applies.
pub async fn session_exists(client: &Client, namespace: &str, session: &str) -> Result<bool> {
    let names = Names::new(session);
    let found = Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .get_opt(&names.agent)
        .await
        .with_context(|| format!("cannot look up session {session:?}"))?;
    Ok(found.is_some())
}

/// Applies the ImageStreams and BuildConfigs of an OpenShift session. Binary builds are
/// started separately by [`build_image`], because only they carry the build context.
pub async fn apply_build_objects(client: &Client, namespace: &str, m: &Manifests) -> Result<()> {
    for object in &m.builds {
        let resource = match object["kind"].as_str() {
            Some("ImageStream") => image_stream_resource(),
            _ => build_config_resource(),
        };
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource)
            .patch(name, &apply_params(), &Patch::Apply(object))
            .await
            .with_context(|| format!("cannot apply {} {name}", resource.kind))?;
    }
    Ok(())
}

/// Whether the ImageStream already holds an image for this input hash (then nothing is
/// rebuilt unless `--rebuild`).
pub async fn image_exists(
    client: &Client,
    namespace: &str,
    stream: &str,
    tag: &str,
) -> Result<bool> {
    let found = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        namespace,
        &image_stream_tag_resource(),
    )
    .get_opt(&format!("{stream}:{tag}"))
    .await
    .with_context(|| format!("cannot look up image {stream}:{tag}"))?;
    Ok(found.is_some())
}

/// Uploads a build context (a tar archive with a Dockerfile at its root) to the BuildConfig
/// `stream` and waits until the build completes; a failed build reports the end of its log.
pub async fn build_image(
    client: &Client,
    namespace: &str,
    stream: &str,
    context_tar: Vec<u8>,
    poll: Duration,
    timeout: Duration,
) -> Result<()> {
    let request = http::Request::post(format!(
        "/apis/build.openshift.io/v1/namespaces/{namespace}/buildconfigs/{stream}/instantiatebinary"
    ))
    .header(http::header::CONTENT_TYPE, "application/octet-stream")
    .body(context_tar)
    .context("cannot build the image upload request")?;
    let build: Value = client
        .request(request)
        .await
        .with_context(|| format!("cannot start the on-cluster build of {stream}"))?;
    let Some(build_name) = build["metadata"]["name"].as_str() else {
        bail!("the cluster started a build of {stream} but did not name it");
    };
    let builds =
        Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &build_resource());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let current = builds
            .get(build_name)
            .await
            .with_context(|| format!("cannot follow build {build_name}"))?;
        let phase = current.data["status"]["phase"].as_str().unwrap_or("New");
        match phase {
            "Complete" => return Ok(()),
            "Failed" | "Error" | "Cancelled" => {
                let log = builds_log(client, namespace, build_name).await;
                bail!(
                    "image build {build_name} {}: last lines of its log:\n{log}\n\
                     (see the whole log with: oc logs build/{build_name} -n {namespace})",
                    phase.to_lowercase()
                );
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "image build {build_name} did not finish in {}s: check it with \
                 oc describe build/{build_name} -n {namespace}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(poll).await;
    }
}

async fn builds_log(client: &Client, namespace: &str, build: &str) -> String {
    let request = http::Request::get(format!(
        "/apis/build.openshift.io/v1/namespaces/{namespace}/builds/{build}/log"
    ))
    .body(Vec::new());
    let text = match request {
        Ok(request) => client.request_text(request).await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Applies the proxy side (policies, ConfigMap, Service, Deployment) and returns the proxy
/// Service's cluster IP, the address the agent is given.
pub async fn apply_proxy(client: &Client, namespace: &str, m: &Manifests) -> Result<String> {
    let pp = apply_params();
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), namespace);
    for policy in [&m.agent_policy, &m.proxy_policy] {
        let name = policy.metadata.name.clone().unwrap_or_default();
        policies
            .patch(&name, &pp, &Patch::Apply(policy))
            .await
            .with_context(|| format!("cannot apply NetworkPolicy {name}"))?;
    }
    let name = m.proxy_config.metadata.name.clone().unwrap_or_default();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(&name, &pp, &Patch::Apply(&m.proxy_config))
        .await
        .with_context(|| format!("cannot apply ConfigMap {name}"))?;
    let service = Api::<Service>::namespaced(client.clone(), namespace)
        .patch(&name, &pp, &Patch::Apply(&m.proxy_service))
        .await
        .with_context(|| format!("cannot apply Service {name}"))?;
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch(&name, &pp, &Patch::Apply(&m.proxy))
        .await
        .with_context(|| format!("cannot apply Deployment {name}"))?;
    match service.spec.and_then(|spec| spec.cluster_ip) {
        Some(ip) if ip.parse::<std::net::IpAddr>().is_ok() => Ok(ip),
        other => bail!(
            "the proxy Service {name} got no cluster IP ({other:?}): paude needs a ClusterIP \
             Service to hand the agent its proxy address"
        ),
    }
}

/// Applies the agent's files and its StatefulSet (the last object of a create).
pub async fn apply_agent(client: &Client, namespace: &str, m: &Manifests) -> Result<()> {
    let files = m.agent_files.metadata.name.clone().unwrap_or_default();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(&files, &apply_params(), &Patch::Apply(&m.agent_files))
        .await
        .with_context(|| format!("cannot apply ConfigMap {files}"))?;
    let name = m.agent.metadata.name.clone().unwrap_or_default();
    Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .patch(&name, &apply_params(), &Patch::Apply(&m.agent))
        .await
        .with_context(|| format!("cannot apply StatefulSet {name}"))?;
    Ok(())
}

/// Scales the session's proxy and agent to `replicas` (0 = stop, 1 = start); the PVC stays.
/// Stopping scales the agent first, starting scales the proxy first, so the agent never runs
/// without its proxy.
pub async fn scale(client: &Client, namespace: &str, session: &str, replicas: i32) -> Result<()> {
    let names = Names::new(session);
    if !session_exists(client, namespace, session).await? {
        bail!(no_such_session(session, namespace));
    }
    let patch = Patch::Merge(json!({ "spec": { "replicas": replicas } }));
    let pp = PatchParams::default();
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), namespace);
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    if replicas == 0 {
        statefulsets.patch_scale(&names.agent, &pp, &patch).await?;
        deployments.patch_scale(&names.proxy, &pp, &patch).await?;
    } else {
        deployments.patch_scale(&names.proxy, &pp, &patch).await?;
        statefulsets.patch_scale(&names.agent, &pp, &patch).await?;
    }
    Ok(())
}

pub fn no_such_session(session: &str, namespace: &str) -> String {
    format!(
        "no session {session:?} in namespace {namespace:?}: see the sessions with \
         paude-launch list --backend openshift"
    )
}

/// Deletes every object of the session, workloads first and NetworkPolicies last so the
/// agent is isolated until it is gone. Objects already missing are not an error, so a delete
/// that was interrupted can be repeated.
pub async fn delete(
    client: &Client,
    namespace: &str,
    session: &str,
    openshift: bool,
) -> Result<()> {
    let names = Names::new(session);
    let selector = format!("{SESSION_LABEL}={session}");
    let dp = DeleteParams::foreground();
    let c = || client.clone();
    let mut found = false;
    found |= gone(
        Api::<StatefulSet>::namespaced(c(), namespace)
            .delete(&names.agent, &dp)
            .await,
    )?;
    found |= gone(
        Api::<Deployment>::namespaced(c(), namespace)
            .delete(&names.proxy, &dp)
            .await,
    )?;
    found |= gone(
        Api::<Service>::namespaced(c(), namespace)
            .delete(&names.proxy, &dp)
            .await,
    )?;
    let maps = Api::<ConfigMap>::namespaced(c(), namespace);
    found |= gone(maps.delete(&names.agent_files, &dp).await)?;
    found |= gone(maps.delete(&names.proxy, &dp).await)?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(c(), namespace);
    for claim in claims
        .list(&ListParams::default().labels(&selector))
        .await?
    {
        let name = claim.metadata.name.unwrap_or_default();
        found |= gone(claims.delete(&name, &dp).await)?;
    }
    if openshift {
        let configs =
            Api::<DynamicObject>::namespaced_with(c(), namespace, &build_config_resource());
        let builds = Api::<DynamicObject>::namespaced_with(c(), namespace, &build_resource());
        for config in configs
            .list(&ListParams::default().labels(&selector))
            .await?
        {
            let name = config.metadata.name.unwrap_or_default();
            // Builds carry their BuildConfig's name, not the session's labels.
            let of_config = format!("openshift.io/build-config.name={name}");
            for build in builds
                .list(&ListParams::default().labels(&of_config))
                .await?
            {
                gone(
                    builds
                        .delete(&build.metadata.name.unwrap_or_default(), &dp)
                        .await,
                )?;
            }
            found |= gone(configs.delete(&name, &dp).await)?;
        }
        let streams =
            Api::<DynamicObject>::namespaced_with(c(), namespace, &image_stream_resource());
        for stream in streams
            .list(&ListParams::default().labels(&selector))
            .await?
        {
            found |= gone(
                streams
                    .delete(&stream.metadata.name.unwrap_or_default(), &dp)
                    .await,
            )?;
        }
    }
    let policies = Api::<NetworkPolicy>::namespaced(c(), namespace);
    found |= gone(policies.delete(&names.agent_policy, &dp).await)?;
    found |= gone(policies.delete(&names.proxy_policy, &dp).await)?;
    if !found {
        bail!(no_such_session(session, namespace));
    }
    Ok(())
}

/// Turns a delete answer into "it existed", treating not-found as already gone.
fn gone<T>(result: kube::Result<T>) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// What `list` and `status` show of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub name: String,
    /// `running`, `starting` or `stopped`.
    pub state: String,
    pub agent: String,
    /// Seconds since the Unix epoch.
    pub created: Option<i64>,
}

/// The sessions in the namespace, found by the labels on their StatefulSets (no state is kept
/// anywhere else).
pub async fn list(client: &Client, namespace: &str) -> Result<Vec<SessionRow>> {
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{SESSION_LABEL},{ROLE_LABEL}=agent")))
        .await
        .with_context(|| format!("cannot list sessions in namespace {namespace:?}"))?;
    let mut rows: Vec<SessionRow> = statefulsets.into_iter().map(|s| row(&s)).collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// One session's row, or a clear error when it does not exist.
pub async fn status(client: &Client, namespace: &str, session: &str) -> Result<SessionRow> {
    let names = Names::new(session);
    Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .get_opt(&names.agent)
        .await?
        .map(|s| row(&s))
        .ok_or_else(|| anyhow::anyhow!(no_such_session(session, namespace)))
}

fn row(statefulset: &StatefulSet) -> SessionRow {
    let labels: BTreeMap<String, String> = statefulset.metadata.labels.clone().unwrap_or_default();
    let wanted = statefulset
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = statefulset
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let state = match (wanted, ready) {
        (0, _) => "stopped",
        (_, 0) => "starting",
        _ => "running",
    };
    SessionRow {
        name: labels.get(SESSION_LABEL).cloned().unwrap_or_default(),
        state: state.into(),
        agent: labels.get("paude.agent").cloned().unwrap_or_default(),
        created: statefulset
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
    }
}

/// The proxy configuration the session runs with now.
pub async fn proxy_config(client: &Client, namespace: &str, session: &str) -> Result<String> {
    let names = Names::new(session);
    let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(&names.proxy)
        .await?
        .ok_or_else(|| anyhow::anyhow!(no_such_session(session, namespace)))?;
    map.data
        .and_then(|mut data| data.remove(PROXY_CONFIG_KEY))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "ConfigMap {} has no {PROXY_CONFIG_KEY}: repair the session with \
                 paude-launch create {session} --backend openshift",
                names.proxy
            )
        })
}

/// Replaces the proxy's configuration. Only the ConfigMap's data changes (a merge patch, so
/// its labels and everything else stay): the kubelet updates the mounted file and
/// paude-proxy reloads it, so neither pod restarts.
pub async fn set_proxy_config(
    client: &Client,
    namespace: &str,
    session: &str,
    config: &str,
) -> Result<()> {
    let names = Names::new(session);
    let patch = Patch::Merge(json!({ "data": { PROXY_CONFIG_KEY: config } }));
    match Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(&names.proxy, &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            bail!(no_such_session(session, namespace))
        }
        Err(err) => Err(err).with_context(|| format!("cannot update ConfigMap {}", names.proxy)),
    }
}

/// The proxy's audit log (JSON lines on its stdout).
pub async fn proxy_log(client: &Client, namespace: &str, session: &str) -> Result<String> {
    let names = Names::new(session);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let selector = format!("{SESSION_LABEL}={session},{ROLE_LABEL}=proxy");
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    let Some(pod) = list.items.into_iter().next() else {
        bail!(
            "the proxy of session {session:?} is not running (Deployment {}): start it with \
             paude-launch start {session} --backend openshift",
            names.proxy
        );
    };
    let name = pod.metadata.name.unwrap_or_default();
    pods.logs(&name, &LogParams::default())
        .await
        .with_context(|| format!("cannot read the proxy log of pod {name}"))
}

/// Waits until the agent pod is ready and its StatefulSet counts it, so that `status` right
/// after reports the session running; reports the pod's waiting reason on timeout.
pub async fn wait_ready(
    client: &Client,
    namespace: &str,
    session: &str,
    poll: Duration,
    timeout: Duration,
) -> Result<()> {
    let names = Names::new(session);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let counted = statefulsets
            .get_opt(&names.agent)
            .await?
            .and_then(|s| s.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            >= 1;
        let pod = pods.get_opt(&names.agent_pod).await?;
        let ready = counted
            && pod
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let reason = pod
                .and_then(|p| p.status)
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.into_iter().next())
                .and_then(|c| c.state)
                .and_then(|s| s.waiting)
                .and_then(|w| w.reason)
                .unwrap_or_else(|| "not scheduled yet".into());
            bail!(
                "the agent pod {} is not ready after {}s ({reason}): see why with \
                 kubectl describe pod {} -n {namespace}",
                names.agent_pod,
                timeout.as_secs(),
                names.agent_pod
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// A build context for one image of the session, for on-cluster builds.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The ImageStream and BuildConfig name.
    pub stream: String,
    /// The input hash the image is tagged with.
    pub tag: String,
    /// A tar archive with the Dockerfile at its root.
    pub tar: Vec<u8>,
}

/// How long create waits for builds, and how often it looks.
#[derive(Debug, Clone, Copy)]
pub struct Waits {
    pub poll: Duration,
    pub build_timeout: Duration,
}

/// Creates a session: checks the namespace, builds missing images (OpenShift), then applies
/// isolation, the proxy and finally the agent. Every object goes through server-side apply,
/// so running `create` again after a failure part-way converges instead of failing on what
/// already exists; only a session whose agent exists already is refused.
pub async fn create(
    client: &Client,
    session: &Session,
    builds: &[BuildContext],
    rebuild: bool,
    waits: Waits,
) -> Result<()> {
    let namespace = &session.namespace;
    ensure_namespace(client, namespace).await?;
    if session_exists(client, namespace, &session.name).await? {
        bail!(
            "session {:?} already exists in namespace {namespace:?}: attach with paude-launch \
             connect {} --backend openshift, or delete it first",
            session.name,
            session.name
        );
    }
    let proxy_side = session.manifests(super::manifests::DRY_RUN_PROXY_HOST);
    if session.flavor == Flavor::OpenShift {
        apply_build_objects(client, namespace, &proxy_side).await?;
        for build in builds {
            if rebuild || !image_exists(client, namespace, &build.stream, &build.tag).await? {
                build_image(
                    client,
                    namespace,
                    &build.stream,
                    build.tar.clone(),
                    waits.poll,
                    waits.build_timeout,
                )
                .await?;
            }
        }
    }
    let proxy_ip = apply_proxy(client, namespace, &proxy_side).await?;
    apply_agent(client, namespace, &session.manifests(&proxy_ip)).await
}
