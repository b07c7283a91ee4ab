//! Every Kubernetes and OpenShift object of one session, built as typed values from a small
//! [`Session`] description. Pure: no I/O, no clock, no cluster. The apply code in `api.rs` and
//! the `--dry-run` printer both start from [`Manifests`], so what a user reads in the dry run is
//! exactly what would be sent.
//!
//! Invariant: the agent pod can reach nothing but the proxy Service port (no DNS, no ingress);
//! only the proxy pod talks to the outside, and only its agent pod can talk to it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    Service, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

/// The port paude-proxy serves the agent on, inside the proxy pod and on its Service.
pub const PROXY_PORT: u16 = 3128;
/// Where the proxy's ConfigMap is mounted; paude-proxy polls this file and reloads on change.
pub const PROXY_CONFIG_DIR: &str = "/etc/paude-proxy";
/// The key of the proxy configuration inside its ConfigMap.
pub const PROXY_CONFIG_KEY: &str = "config.toml";
/// The label every object of a session carries, with the session name as value.
pub const SESSION_LABEL: &str = "paude.session";
/// The label that tells the agent's objects from the proxy's.
pub const ROLE_LABEL: &str = "paude.role";
/// Role label values, the same words the plan uses for every backend.
pub const ROLE_AGENT: &str = "agent";
pub const ROLE_PROXY: &str = "proxy";
pub const ROLE_INTERNAL_NETWORK: &str = "internal-network";
pub const ROLE_EGRESS_NETWORK: &str = "egress-network";
pub const ROLE_PROXY_CONFIG: &str = "proxy-config";
pub const ROLE_DATA: &str = "data";
pub const ROLE_IMAGE: &str = "image";
/// The name of the StatefulSet's volume claim template; the PVC is `data-<statefulset>-0`.
pub const DATA_CLAIM: &str = "data";
/// Written into the agent's proxy variables by `--dry-run`, where no Service address exists
/// yet; a real create replaces it with the proxy Service's cluster IP.
pub const DRY_RUN_PROXY_HOST: &str = "PROXY_SERVICE_CLUSTER_IP";

/// Which API the cluster offers: OpenShift builds images on the cluster and assigns user IDs
/// itself; plain Kubernetes runs prebuilt images as the image's own user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenShift,
    Kubernetes,
}

/// One image a session runs: where it comes from, and on OpenShift how it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `paude-NAME-agent` or `paude-NAME-proxy`: the ImageStream and BuildConfig name.
    pub stream: String,
    /// The input hash the image is tagged with, the same tag the Podman backend uses.
    pub tag: String,
    /// The reference a pod pulls: `stream:tag` resolved through the ImageStream's local lookup
    /// on OpenShift, `REGISTRY/...:tag` on Kubernetes.
    pub pull: String,
}

/// CPU and memory for a container, as Kubernetes quantities; requests equal limits so the
/// pod is never overcommitted on a busy node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory: Option<String>,
    pub cpus: Option<String>,
}

/// A file placed read-only in the agent container (from a ConfigMap, owned by root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub contents: String,
    pub mode: i32,
}

/// Everything the manifests depend on, decided before rendering (by the plan and the cluster
/// options). Nothing in this module invents a value that is not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub name: String,
    pub namespace: String,
    pub flavor: Flavor,
    /// Labels shared by every object of the session (includes [`SESSION_LABEL`]).
    pub labels: BTreeMap<String, String>,
    pub agent_image: ImageRef,
    pub proxy_image: ImageRef,
    /// The agent's whole environment as the plan decided it, with [`DRY_RUN_PROXY_HOST`]
    /// where the proxy's address goes: only the cluster knows that address, and
    /// [`Session::manifests`] fills it in.
    pub agent_env: BTreeMap<String, String>,
    /// Arguments to the agent image's entry point (which starts them inside tmux).
    pub agent_args: Vec<String>,
    /// Files placed read-only in the agent container.
    pub agent_files: Vec<File>,
    pub workdir: String,
    /// The agent's home: the data volume is mounted here (the workspace lives inside it).
    pub home: String,
    pub agent_uid: i64,
    pub agent_gid: i64,
    pub proxy_uid: i64,
    /// Whether PID 1 must reap zombies (the pod shares its process namespace with the pause
    /// container, which does).
    pub init: bool,
    /// paude-proxy's configuration file, as the plan rendered it for a pod.
    pub proxy_config: String,
    pub resources: Resources,
    pub proxy_resources: Resources,
    pub pvc_size: String,
    pub storage_class: Option<String>,
    /// Networks outside the cluster's private ranges that the proxy may still reach (the
    /// session's `--proxy-allow-cidr`).
    pub proxy_allow_cidrs: Vec<String>,
}

/// The objects of one session in the order they are applied: isolation first, so the agent
/// pod never runs for a moment without its NetworkPolicy.
#[derive(Debug, Clone)]
pub struct Manifests {
    pub agent_policy: NetworkPolicy,
    pub proxy_policy: NetworkPolicy,
    pub proxy_config: ConfigMap,
    pub agent_files: ConfigMap,
    pub proxy_service: Service,
    pub proxy: Deployment,
    pub agent: StatefulSet,
    /// OpenShift only: ImageStreams and binary BuildConfigs (untyped: k8s-openapi has no
    /// OpenShift types), in apply order.
    pub builds: Vec<Value>,
}

/// Object names of a session, in one place so create, delete, status and the tests agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub agent: String,
    pub agent_pod: String,
    pub proxy: String,
    pub data_claim: String,
    pub agent_files: String,
    pub agent_policy: String,
    pub proxy_policy: String,
}

impl Names {
    pub fn new(session: &str) -> Self {
        let agent = format!("paude-{session}-agent");
        Names {
            agent_pod: format!("{agent}-0"),
            data_claim: format!("{DATA_CLAIM}-{agent}-0"),
            agent_files: format!("paude-{session}-agent-files"),
            agent_policy: format!("paude-{session}-agent-egress"),
            proxy_policy: format!("paude-{session}-proxy-ingress"),
            proxy: format!("paude-{session}-proxy"),
            agent,
        }
    }
}

/// Kubernetes limits the pod name of a StatefulSet (`paude-NAME-agent-0` plus a revision
/// hash label of 11 characters) to 63 characters, which bounds the session name.
pub const MAX_SESSION_NAME: usize = 40;

/// Checks that a session name can name cluster objects (DNS-1123 labels): a clear error
/// before anything is sent.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if !ok_chars || !ok_ends || name.len() > MAX_SESSION_NAME {
        anyhow::bail!(
            "session name {name:?} cannot name cluster objects: use at most {MAX_SESSION_NAME} \
             lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
    }
    Ok(())
}

impl Session {
    fn labels_with_role(&self, role: &str) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert(SESSION_LABEL.into(), self.name.clone());
        labels.insert(ROLE_LABEL.into(), role.into());
        labels
    }

    fn selector(&self, role: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (SESSION_LABEL.to_string(), self.name.clone()),
            (ROLE_LABEL.to_string(), role.to_string()),
        ])
    }

    fn meta(&self, name: &str, role: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels_with_role(role)),
            ..ObjectMeta::default()
        }
    }

    /// A pod template's metadata. On OpenShift the annotation makes the image names
    /// (`stream:tag`) resolve through the namespace's ImageStreams for this workload too.
    fn pod_meta(&self, role: &str) -> ObjectMeta {
        ObjectMeta {
            labels: Some(self.labels_with_role(role)),
            annotations: (self.flavor == Flavor::OpenShift).then(|| {
                BTreeMap::from([(
                    "alpha.image.policy.openshift.io/resolve-names".to_string(),
                    "*".to_string(),
                )])
            }),
            ..ObjectMeta::default()
        }
    }

    /// Builds every object; `proxy_host` is the proxy Service's cluster IP (or
    /// [`DRY_RUN_PROXY_HOST`] in a dry run).
    pub fn manifests(&self, proxy_host: &str) -> Manifests {
        Manifests {
            agent_policy: self.agent_policy(),
            proxy_policy: self.proxy_policy(),
            proxy_config: self.proxy_config_map(),
            agent_files: self.agent_files_map(),
            proxy_service: self.proxy_service(),
            proxy: self.proxy_deployment(),
            agent: self.agent_statefulset(proxy_host),
            builds: match self.flavor {
                Flavor::OpenShift => self.build_objects(),
                Flavor::Kubernetes => Vec::new(),
            },
        }
    }

    /// The agent pod: no ingress at all, and egress only to its proxy pod's port. No rule
    /// admits port 53, so the agent cannot resolve or tunnel anything through DNS.
    pub fn agent_policy(&self) -> NetworkPolicy {
        let names = Names::new(&self.name);
        NetworkPolicy {
            metadata: self.meta(&names.agent_policy, ROLE_INTERNAL_NETWORK),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(self.selector(ROLE_AGENT)),
                    ..LabelSelector::default()
                }),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ingress: Some(Vec::new()),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(self.selector(ROLE_PROXY)),
                            ..LabelSelector::default()
                        }),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp_port(PROXY_PORT)]),
                }]),
            }),
        }
    }

    /// The proxy pod: accepts connections only from its own agent pod on the proxy port (the
    /// admin listener is on loopback and has no port here), and may reach DNS and the public
    /// internet. Private ranges are excluded as a second wall behind paude-proxy's own check,
    /// except for the networks the session explicitly allows.
    pub fn proxy_policy(&self) -> NetworkPolicy {
        let names = Names::new(&self.name);
        let dns_ports = [53, 5353]
            .into_iter()
            .flat_map(|port| {
                ["UDP", "TCP"]
                    .into_iter()
                    .map(move |protocol| NetworkPolicyPort {
                        port: Some(IntOrString::Int(port)),
                        protocol: Some(protocol.into()),
                        ..NetworkPolicyPort::default()
                    })
            })
            .collect();
        let mut internet = vec![
            ip_block("0.0.0.0/0", PRIVATE_V4),
            ip_block("::/0", PRIVATE_V6),
        ];
        internet.extend(
            self.proxy_allow_cidrs
                .iter()
                .map(|cidr| ip_block(cidr, &[])),
        );
        NetworkPolicy {
            metadata: self.meta(&names.proxy_policy, ROLE_EGRESS_NETWORK),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(self.selector(ROLE_PROXY)),
                    ..LabelSelector::default()
                }),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(self.selector(ROLE_AGENT)),
                            ..LabelSelector::default()
                        }),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp_port(PROXY_PORT)]),
                }]),
                egress: Some(vec![
                    NetworkPolicyEgressRule {
                        to: Some(vec![NetworkPolicyPeer {
                            namespace_selector: Some(LabelSelector::default()),
                            ..NetworkPolicyPeer::default()
                        }]),
                        ports: Some(dns_ports),
                    },
                    NetworkPolicyEgressRule {
                        to: Some(internet),
                        ports: None,
                    },
                ]),
            }),
        }
    }

    pub fn proxy_config_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(&Names::new(&self.name).proxy, ROLE_PROXY_CONFIG),
            data: Some(BTreeMap::from([(
                PROXY_CONFIG_KEY.to_string(),
                self.proxy_config.clone(),
            )])),
            ..ConfigMap::default()
        }
    }

    pub fn proxy_service(&self) -> Service {
        Service {
            metadata: self.meta(&Names::new(&self.name).proxy, ROLE_PROXY),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(self.selector(ROLE_PROXY)),
                ports: Some(vec![ServicePort {
                    name: Some("proxy".into()),
                    port: PROXY_PORT.into(),
                    target_port: Some(IntOrString::Int(PROXY_PORT.into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    pub fn proxy_deployment(&self) -> Deployment {
        let names = Names::new(&self.name);
        let container = Container {
            name: "proxy".into(),
            image: Some(self.proxy_image.pull.clone()),
            ports: Some(vec![ContainerPort {
                name: Some("proxy".into()),
                container_port: PROXY_PORT.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            readiness_probe: Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(PROXY_PORT.into()),
                    ..TCPSocketAction::default()
                }),
                period_seconds: Some(5),
                ..Probe::default()
            }),
            resources: Some(requirements(&self.proxy_resources)),
            security_context: Some(SecurityContext {
                read_only_root_filesystem: Some(true),
                ..container_hardening()
            }),
            volume_mounts: Some(vec![VolumeMount {
                name: "config".into(),
                mount_path: PROXY_CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        };
        Deployment {
            metadata: self.meta(&names.proxy, ROLE_PROXY),
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                selector: LabelSelector {
                    match_labels: Some(self.selector(ROLE_PROXY)),
                    ..LabelSelector::default()
                },
                // One proxy at a time: two would split the audit log the user reads.
                strategy: Some(DeploymentStrategy {
                    type_: Some("Recreate".into()),
                    ..DeploymentStrategy::default()
                }),
                template: PodTemplateSpec {
                    metadata: Some(self.pod_meta(ROLE_PROXY)),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        // A ConfigMap mounted as a directory (never with subPath) is updated in
                        // place by the kubelet, and paude-proxy reloads the changed file.
                        volumes: Some(vec![Volume {
                            name: "config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: names.proxy.clone(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        }]),
                        ..self.pod_hardening(self.proxy_uid, self.proxy_uid, false)
                    }),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    /// The files of the agent container, one key each (the key is the path with `/` as `_`).
    pub fn agent_files_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(&Names::new(&self.name).agent_files, ROLE_AGENT),
            data: Some(
                self.agent_files
                    .iter()
                    .map(|f| (file_key(&f.path), f.contents.clone()))
                    .collect(),
            ),
            ..ConfigMap::default()
        }
    }

    pub fn agent_statefulset(&self, proxy_host: &str) -> StatefulSet {
        let names = Names::new(&self.name);
        let env: Vec<EnvVar> = self
            .agent_env
            .iter()
            .map(|(name, value)| env_var(name, &value.replace(DRY_RUN_PROXY_HOST, proxy_host)))
            .collect();
        let mut mounts = vec![
            VolumeMount {
                name: DATA_CLAIM.into(),
                mount_path: self.home.clone(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "credentials".into(),
                mount_path: "/credentials".into(),
                ..VolumeMount::default()
            },
        ];
        mounts.extend(self.agent_files.iter().map(|f| VolumeMount {
            name: "files".into(),
            mount_path: f.path.clone(),
            sub_path: Some(file_key(&f.path)),
            read_only: Some(true),
            ..VolumeMount::default()
        }));
        let container = Container {
            name: "agent".into(),
            image: Some(self.agent_image.pull.clone()),
            args: Some(self.agent_args.clone()),
            env: Some(env),
            working_dir: Some(self.workdir.clone()),
            resources: Some(requirements(&self.resources)),
            security_context: Some(container_hardening()),
            volume_mounts: Some(mounts),
            ..Container::default()
        };
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(DATA_CLAIM.into()),
                labels: Some(self.labels_with_role(ROLE_DATA)),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: self.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(self.pvc_size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        };
        StatefulSet {
            metadata: self.meta(&names.agent, ROLE_AGENT),
            spec: Some(StatefulSetSpec {
                replicas: Some(1),
                service_name: Some(names.agent.clone()),
                selector: LabelSelector {
                    match_labels: Some(self.selector(ROLE_AGENT)),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(self.pod_meta(ROLE_AGENT)),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        // Credentials live in RAM only: never on a node's disk, never in a
                        // PVC snapshot, gone when the pod stops.
                        volumes: Some(vec![
                            Volume {
                                name: "credentials".into(),
                                empty_dir: Some(EmptyDirVolumeSource {
                                    medium: Some("Memory".into()),
                                    size_limit: Some(Quantity("64Mi".into())),
                                }),
                                ..Volume::default()
                            },
                            Volume {
                                name: "files".into(),
                                config_map: Some(ConfigMapVolumeSource {
                                    name: names.agent_files.clone(),
                                    items: Some(
                                        self.agent_files
                                            .iter()
                                            .map(|f| KeyToPath {
                                                key: file_key(&f.path),
                                                path: file_key(&f.path),
                                                mode: Some(f.mode),
                                            })
                                            .collect(),
                                    ),
                                    ..ConfigMapVolumeSource::default()
                                }),
                                ..Volume::default()
                            },
                        ]),
                        share_process_namespace: self.init.then_some(true),
                        termination_grace_period_seconds: Some(10),
                        ..self.pod_hardening(self.agent_uid, self.agent_gid, true)
                    }),
                },
                volume_claim_templates: Some(vec![claim]),
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }
    }

    /// Pod-level hardening shared by both pods. On OpenShift the security context constraints
    /// assign the user and group from the namespace's range, so none is fixed here; on plain
    /// Kubernetes the agent runs as the image's `paude` user and owns its volume.
    fn pod_hardening(&self, uid: i64, gid: i64, owns_volume: bool) -> PodSpec {
        let fixed_user = self.flavor == Flavor::Kubernetes;
        PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: fixed_user.then_some(uid),
                run_as_group: fixed_user.then_some(gid),
                fs_group: (fixed_user && owns_volume).then_some(gid),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }
    }

    /// ImageStreams with local lookup (so a pod can name `stream:tag`) and binary Docker
    /// builds that push into them, one pair per image.
    fn build_objects(&self) -> Vec<Value> {
        let mut objects = Vec::new();
        for image in [&self.proxy_image, &self.agent_image] {
            let metadata = json!({
                "name": image.stream,
                "namespace": self.namespace,
                "labels": self.labels_with_role(ROLE_IMAGE),
            });
            objects.push(json!({
                "apiVersion": "image.openshift.io/v1",
                "kind": "ImageStream",
                "metadata": metadata,
                "spec": { "lookupPolicy": { "local": true } },
            }));
            objects.push(json!({
                "apiVersion": "build.openshift.io/v1",
                "kind": "BuildConfig",
                "metadata": metadata,
                "spec": {
                    "runPolicy": "Serial",
                    "source": { "type": "Binary", "binary": {} },
                    "strategy": { "type": "Docker", "dockerStrategy": {} },
                    "output": {
                        "to": {
                            "kind": "ImageStreamTag",
                            "name": format!("{}:{}", image.stream, image.tag),
                        },
                    },
                    "resources": {
                        "limits": { "memory": "2Gi" },
                    },
                },
            }));
        }
        objects
    }
}

/// IPv4 ranges that are never "the internet": private, shared, link-local (cloud metadata),
/// loopback.
const PRIVATE_V4: &[&str] = &[
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
];
/// IPv6 unique-local and link-local ranges.
const PRIVATE_V6: &[&str] = &["fc00::/7", "fe80::/10"];

fn ip_block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.into(),
            except: (!except.is_empty()).then(|| except.iter().map(|c| c.to_string()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn tcp_port(port: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port.into())),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// A ConfigMap key for a file path: `/etc/gitconfig` → `etc_gitconfig`.
fn file_key(path: &str) -> String {
    path.trim_start_matches('/').replace('/', "_")
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn container_hardening() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

fn requirements(resources: &Resources) -> ResourceRequirements {
    let mut amounts = BTreeMap::new();
    if let Some(memory) = &resources.memory {
        amounts.insert("memory".to_string(), Quantity(memory.clone()));
    }
    if let Some(cpus) = &resources.cpus {
        amounts.insert("cpu".to_string(), Quantity(cpus.clone()));
    }
    let amounts = (!amounts.is_empty()).then_some(amounts);
    ResourceRequirements {
        requests: amounts.clone(),
        limits: amounts,
        ..ResourceRequirements::default()
    }
}

impl Manifests {
    /// Every object as `serde_json::Value`, in apply order (k8s-openapi writes `apiVersion`
    /// and `kind` itself).
    pub fn objects(&self) -> anyhow::Result<Vec<Value>> {
        let mut objects = self.builds.clone();
        objects.push(serde_json::to_value(&self.agent_policy)?);
        objects.push(serde_json::to_value(&self.proxy_policy)?);
        objects.push(serde_json::to_value(&self.proxy_config)?);
        objects.push(serde_json::to_value(&self.agent_files)?);
        objects.push(serde_json::to_value(&self.proxy_service)?);
        objects.push(serde_json::to_value(&self.proxy)?);
        objects.push(serde_json::to_value(&self.agent)?);
        Ok(objects)
    }

    /// The `--dry-run` output: one YAML document per object, in apply order.
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        for object in self.objects()? {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(&object)?);
        }
        Ok(out)
    }
}
