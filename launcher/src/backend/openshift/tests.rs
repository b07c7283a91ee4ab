//! Request-level tests of the cluster flows against the in-process fake API server (real HTTP
//! on 127.0.0.1): the exact calls of create, stop, start, delete, list and allowed-domains, the
//! repair path after a half-failed create, and the errors for a missing namespace or session.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde_json::Value;

use super::api::{self, BuildContext, Waits};
use super::manifests::{File, Flavor, ImageRef, Resources, Session, DRY_RUN_PROXY_HOST};

#[path = "../../../tests/openshift_fake/mod.rs"]
mod fake;
use fake::FakeApi;

const NS: &str = "team";

/// Every await in these tests is bounded, so a hang fails instead of stalling CI.
async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("the call finished within 20 s")
}

fn waits() -> Waits {
    Waits {
        poll: Duration::from_millis(10),
        build_timeout: Duration::from_secs(5),
    }
}

pub(super) fn session(flavor: Flavor) -> Session {
    let image = |role: &str| {
        let stream = format!("paude-demo-{role}");
        let tag = format!("{role}0123456789ab");
        let pull = match flavor {
            Flavor::OpenShift => format!("{stream}:{tag}"),
            Flavor::Kubernetes => format!("registry.example/team/paude-{role}:{tag}"),
        };
        ImageRef { stream, tag, pull }
    };
    Session {
        name: "demo".into(),
        namespace: NS.into(),
        flavor,
        labels: BTreeMap::from([
            ("paude.session".to_string(), "demo".to_string()),
            ("paude.agent".to_string(), "shell".to_string()),
        ]),
        agent_image: image("agent"),
        proxy_image: image("proxy"),
        agent_env: BTreeMap::from([
            ("PAUDE_SESSION".to_string(), "demo".to_string()),
            (
                "HTTP_PROXY".to_string(),
                format!("http://{DRY_RUN_PROXY_HOST}:3128"),
            ),
            (
                "HTTPS_PROXY".to_string(),
                format!("http://{DRY_RUN_PROXY_HOST}:3128"),
            ),
            (
                "http_proxy".to_string(),
                format!("http://{DRY_RUN_PROXY_HOST}:3128"),
            ),
            (
                "https_proxy".to_string(),
                format!("http://{DRY_RUN_PROXY_HOST}:3128"),
            ),
            ("NO_PROXY".to_string(), "localhost,127.0.0.1".to_string()),
            ("no_proxy".to_string(), "localhost,127.0.0.1".to_string()),
        ]),
        agent_args: vec!["bash".into(), "-l".into()],
        agent_files: vec![File {
            path: "/etc/gitconfig".into(),
            contents: "[user]\n\tname = Demo\n".into(),
            mode: 0o644,
        }],
        workdir: "/workspace".into(),
        home: "/home/paude".into(),
        agent_uid: 1000,
        agent_gid: 1000,
        proxy_uid: 65534,
        init: true,
        proxy_config: "listen = \"0.0.0.0:3128\"\nallow = [\"example.com\"]\n".into(),
        resources: Resources {
            memory: Some("4294967296".into()),
            cpus: Some("2000m".into()),
        },
        proxy_resources: Resources {
            memory: Some("256Mi".into()),
            cpus: Some("500m".into()),
        },
        pvc_size: "10Gi".into(),
        storage_class: None,
        proxy_allow_cidrs: Vec::new(),
    }
}

fn builds(session: &Session) -> Vec<BuildContext> {
    [&session.proxy_image, &session.agent_image]
        .into_iter()
        .map(|image| BuildContext {
            stream: image.stream.clone(),
            tag: image.tag.clone(),
            tar: b"a tar archive".to_vec(),
        })
        .collect()
}

const APPS: &str = "/apis/apps/v1/namespaces/team";
const CORE: &str = "/api/v1/namespaces/team";
const NET: &str = "/apis/networking.k8s.io/v1/namespaces/team";
const BUILD: &str = "/apis/build.openshift.io/v1/namespaces/team";
const IMAGE: &str = "/apis/image.openshift.io/v1/namespaces/team";

fn calls(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The calls of applying the proxy side and the agent, the tail of every create.
fn apply_calls() -> Vec<String> {
    calls(&[
        &format!("PATCH {NET}/networkpolicies/paude-demo-agent-egress"),
        &format!("PATCH {NET}/networkpolicies/paude-demo-proxy-ingress"),
        &format!("PATCH {CORE}/configmaps/paude-demo-proxy"),
        &format!("PATCH {CORE}/services/paude-demo-proxy"),
        &format!("PATCH {APPS}/deployments/paude-demo-proxy"),
        &format!("PATCH {CORE}/configmaps/paude-demo-agent-files"),
        &format!("PATCH {APPS}/statefulsets/paude-demo-agent"),
    ])
}

#[tokio::test]
async fn create_on_openshift_builds_then_applies_isolation_first_with_server_side_apply() {
    let api = FakeApi::start(&[NS], true).await;
    let client = api.client(NS).await;
    let session = session(Flavor::OpenShift);
    bounded(api::create(
        &client,
        &session,
        &builds(&session),
        false,
        waits(),
    ))
    .await
    .expect("create succeeds");

    let mut expected = calls(&[
        "GET /api/v1/namespaces/team",
        &format!("GET {APPS}/statefulsets/paude-demo-agent"),
        &format!("PATCH {IMAGE}/imagestreams/paude-demo-proxy"),
        &format!("PATCH {BUILD}/buildconfigs/paude-demo-proxy"),
        &format!("PATCH {IMAGE}/imagestreams/paude-demo-agent"),
        &format!("PATCH {BUILD}/buildconfigs/paude-demo-agent"),
        &format!("GET {IMAGE}/imagestreamtags/paude-demo-proxy:proxy0123456789ab"),
        &format!("POST {BUILD}/buildconfigs/paude-demo-proxy/instantiatebinary"),
        &format!("GET {BUILD}/builds/paude-demo-proxy-1"),
        &format!("GET {IMAGE}/imagestreamtags/paude-demo-agent:agent0123456789ab"),
        &format!("POST {BUILD}/buildconfigs/paude-demo-agent/instantiatebinary"),
        &format!("GET {BUILD}/builds/paude-demo-agent-2"),
    ]);
    expected.extend(apply_calls());
    let requests = api.requests();
    let seen: Vec<String> = requests.iter().map(|r| r.call()).collect();
    assert_eq!(seen, expected);

    for request in requests.iter().filter(|r| r.method == "PATCH") {
        assert_eq!(
            request.content_type, "application/apply-patch+yaml",
            "{}",
            request.path
        );
        assert!(
            request.query.contains("fieldManager=paude-launch")
                && request.query.contains("force=true"),
            "server-side apply with our field manager: {} ?{}",
            request.path,
            request.query
        );
    }
    let upload = requests.iter().find(|r| r.method == "POST").unwrap();
    assert_eq!(upload.content_type, "application/octet-stream");
    assert_eq!(
        upload.body["bytes"], 13,
        "the build context is uploaded as is"
    );

    // The agent is handed the proxy as the Service's cluster IP, never as a name to resolve.
    let service = api
        .object(&format!("{CORE}/services"), "paude-demo-proxy")
        .unwrap();
    let ip = service["spec"]["clusterIP"].as_str().unwrap().to_string();
    let agent = api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .unwrap();
    let env = &agent["spec"]["template"]["spec"]["containers"][0]["env"];
    let proxy_vars: Vec<&Value> = env
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["name"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .ends_with("_proxy")
        })
        .collect();
    assert_eq!(proxy_vars.len(), 6);
    for var in proxy_vars {
        let name = var["name"].as_str().unwrap();
        let want = if name.eq_ignore_ascii_case("no_proxy") {
            "localhost,127.0.0.1".to_string()
        } else {
            format!("http://{ip}:3128")
        };
        assert_eq!(var["value"], want.as_str(), "{name}");
    }
}

#[tokio::test]
async fn create_skips_builds_whose_image_tag_exists_unless_rebuild() {
    let api = FakeApi::start(&[NS], true).await;
    let client = api.client(NS).await;
    let session = session(Flavor::OpenShift);
    bounded(api::create(
        &client,
        &session,
        &builds(&session),
        false,
        waits(),
    ))
    .await
    .unwrap();
    bounded(api::delete(&client, NS, "demo", true))
        .await
        .unwrap();
    // Same inputs again: the deleted streams took their tags along, so it builds again.
    api.take_calls();
    bounded(api::create(
        &client,
        &session,
        &builds(&session),
        false,
        waits(),
    ))
    .await
    .unwrap();
    let posts = api
        .take_calls()
        .into_iter()
        .filter(|c| c.starts_with("POST"))
        .count();
    assert_eq!(posts, 2);

    // A repair run after a failure keeps the images that are there.
    bounded(api::delete(&client, NS, "demo", true))
        .await
        .unwrap();
    api.fail_once("PATCH", &format!("{APPS}/statefulsets/paude-demo-agent"));
    let _ = bounded(api::create(
        &client,
        &session,
        &builds(&session),
        false,
        waits(),
    ))
    .await;
    api.take_calls();
    bounded(api::create(
        &client,
        &session,
        &builds(&session),
        false,
        waits(),
    ))
    .await
    .unwrap();
    let posts = api
        .take_calls()
        .into_iter()
        .filter(|c| c.starts_with("POST"))
        .count();
    assert_eq!(posts, 0, "existing image tags are reused");
}

#[tokio::test]
async fn create_on_kubernetes_uses_prebuilt_images_and_no_build_api() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    let session = session(Flavor::Kubernetes);
    bounded(api::create(&client, &session, &[], false, waits()))
        .await
        .expect("create succeeds");
    let mut expected = calls(&[
        "GET /api/v1/namespaces/team",
        &format!("GET {APPS}/statefulsets/paude-demo-agent"),
    ]);
    expected.extend(apply_calls());
    assert_eq!(api.take_calls(), expected);
    let agent = api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .unwrap();
    assert_eq!(
        agent["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/team/paude-agent:agent0123456789ab"
    );
}

#[tokio::test]
async fn create_after_a_half_failed_create_repairs_instead_of_failing() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    let session = session(Flavor::Kubernetes);
    api.fail_once("PATCH", &format!("{APPS}/deployments/paude-demo-proxy"));
    let err = bounded(api::create(&client, &session, &[], false, waits()))
        .await
        .expect_err("the injected failure stops create");
    assert!(
        format!("{err:#}").contains("cannot apply Deployment paude-demo-proxy"),
        "{err:#}"
    );
    // Half there: policies, ConfigMap and Service exist, no agent.
    assert!(api
        .object(&format!("{NET}/networkpolicies"), "paude-demo-agent-egress")
        .is_some());
    assert!(api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .is_none());
    let ip_before = api
        .object(&format!("{CORE}/services"), "paude-demo-proxy")
        .unwrap()["spec"]["clusterIP"]
        .clone();
    api.take_calls();

    bounded(api::create(&client, &session, &[], false, waits()))
        .await
        .expect("a second create repairs the session");
    let mut expected = calls(&[
        "GET /api/v1/namespaces/team",
        &format!("GET {APPS}/statefulsets/paude-demo-agent"),
    ]);
    expected.extend(apply_calls());
    assert_eq!(api.take_calls(), expected);
    let service = api
        .object(&format!("{CORE}/services"), "paude-demo-proxy")
        .unwrap();
    assert_eq!(
        service["spec"]["clusterIP"], ip_before,
        "the Service keeps its address"
    );
    assert!(api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .is_some());

    // Now the session is whole, and a third create is refused.
    let err = bounded(api::create(&client, &session, &[], false, waits()))
        .await
        .expect_err("duplicate create");
    assert!(format!("{err}").contains("already exists"), "{err}");
}

#[tokio::test]
async fn create_in_a_missing_namespace_says_so_and_sends_nothing_else() {
    let api = FakeApi::start(&["other"], false).await;
    let client = api.client(NS).await;
    let err = bounded(api::create(
        &client,
        &session(Flavor::Kubernetes),
        &[],
        false,
        waits(),
    ))
    .await
    .expect_err("namespace team does not exist");
    let message = format!("{err}");
    assert!(
        message.contains("namespace \"team\" does not exist"),
        "{message}"
    );
    assert!(message.contains("--namespace"), "{message}");
    assert_eq!(api.take_calls(), calls(&["GET /api/v1/namespaces/team"]));
    assert_eq!(api.object_count(), 0);
}

#[tokio::test]
async fn failed_build_reports_the_end_of_its_log_and_creates_no_workload() {
    let api = FakeApi::start(&[NS], true).await;
    let client = api.client(NS).await;
    api.set_build_phase("Failed");
    let session = session(Flavor::OpenShift);
    let err = bounded(api::create(
        &client,
        &session,
        &builds(&session),
        false,
        waits(),
    ))
    .await
    .expect_err("the build fails");
    let message = format!("{err}");
    assert!(
        message.contains("image build paude-demo-proxy-1 failed"),
        "{message}"
    );
    assert!(message.contains("error: package not found"), "{message}");
    assert!(api
        .object(&format!("{APPS}/deployments"), "paude-demo-proxy")
        .is_none());
    assert!(api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .is_none());
}

#[tokio::test]
async fn stop_and_start_scale_the_agent_and_proxy_and_keep_the_volume() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    bounded(api::create(
        &client,
        &session(Flavor::Kubernetes),
        &[],
        false,
        waits(),
    ))
    .await
    .unwrap();
    api.take_calls();

    bounded(api::scale(&client, NS, "demo", 0)).await.unwrap();
    assert_eq!(
        api.take_calls(),
        calls(&[
            &format!("GET {APPS}/statefulsets/paude-demo-agent"),
            &format!("PATCH {APPS}/statefulsets/paude-demo-agent/scale"),
            &format!("PATCH {APPS}/deployments/paude-demo-proxy/scale"),
        ])
    );
    let agent = api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .unwrap();
    assert_eq!(agent["spec"]["replicas"], 0);
    assert!(
        agent["spec"]["volumeClaimTemplates"].is_array(),
        "the claim template stays"
    );
    let row = bounded(api::status(&client, NS, "demo")).await.unwrap();
    assert_eq!(row.state, "stopped");
    api.take_calls();

    bounded(api::scale(&client, NS, "demo", 1)).await.unwrap();
    assert_eq!(
        api.take_calls(),
        calls(&[
            &format!("GET {APPS}/statefulsets/paude-demo-agent"),
            &format!("PATCH {APPS}/deployments/paude-demo-proxy/scale"),
            &format!("PATCH {APPS}/statefulsets/paude-demo-agent/scale"),
        ])
    );
    for request in api.requests() {
        assert_eq!(request.content_type, "application/merge-patch+json");
    }
    let proxy = api
        .object(&format!("{APPS}/deployments"), "paude-demo-proxy")
        .unwrap();
    assert_eq!(proxy["spec"]["replicas"], 1);

    let err = bounded(api::scale(&client, NS, "nosuch", 1))
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("no session \"nosuch\""), "{err}");
}

#[tokio::test]
async fn delete_removes_every_object_of_the_session_and_nothing_else() {
    let api = FakeApi::start(&[NS], true).await;
    let client = api.client(NS).await;
    let demo = session(Flavor::OpenShift);
    let mut other = session(Flavor::OpenShift);
    other.name = "other".into();
    other.labels.insert("paude.session".into(), "other".into());
    other.agent_image.stream = "paude-other-agent".into();
    other.proxy_image.stream = "paude-other-proxy".into();
    bounded(api::create(
        &client,
        &other,
        &builds(&other),
        false,
        waits(),
    ))
    .await
    .unwrap();
    let before = api.object_paths();
    bounded(api::create(&client, &demo, &builds(&demo), false, waits()))
        .await
        .unwrap();
    // The StatefulSet controller makes the claim from the template; the fake plays it.
    let claim = &api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .unwrap()["spec"]["volumeClaimTemplates"][0];
    let mut claim = claim.clone();
    claim["metadata"]["name"] = "data-paude-demo-agent-0".into();
    api.put(&format!("{CORE}/persistentvolumeclaims"), claim);
    api.take_calls();

    bounded(api::delete(&client, NS, "demo", true))
        .await
        .unwrap();
    let deletes: Vec<String> = api
        .take_calls()
        .into_iter()
        .filter(|c| c.starts_with("DELETE"))
        .collect();
    assert_eq!(
        deletes,
        calls(&[
            &format!("DELETE {APPS}/statefulsets/paude-demo-agent"),
            &format!("DELETE {APPS}/deployments/paude-demo-proxy"),
            &format!("DELETE {CORE}/services/paude-demo-proxy"),
            &format!("DELETE {CORE}/configmaps/paude-demo-agent-files"),
            &format!("DELETE {CORE}/configmaps/paude-demo-proxy"),
            &format!("DELETE {CORE}/persistentvolumeclaims/data-paude-demo-agent-0"),
            &format!("DELETE {BUILD}/builds/paude-demo-agent-4"),
            &format!("DELETE {BUILD}/buildconfigs/paude-demo-agent"),
            &format!("DELETE {BUILD}/builds/paude-demo-proxy-3"),
            &format!("DELETE {BUILD}/buildconfigs/paude-demo-proxy"),
            &format!("DELETE {IMAGE}/imagestreams/paude-demo-agent"),
            &format!("DELETE {IMAGE}/imagestreams/paude-demo-proxy"),
            &format!("DELETE {NET}/networkpolicies/paude-demo-agent-egress"),
            &format!("DELETE {NET}/networkpolicies/paude-demo-proxy-ingress"),
        ])
    );
    assert_eq!(
        api.object_paths(),
        before,
        "exactly the other session is left"
    );

    let err = bounded(api::delete(&client, NS, "demo", true))
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("no session \"demo\""), "{err}");
}

#[tokio::test]
async fn list_finds_sessions_by_label_and_reports_their_state() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    assert!(bounded(api::list(&client, NS)).await.unwrap().is_empty());
    bounded(api::create(
        &client,
        &session(Flavor::Kubernetes),
        &[],
        false,
        waits(),
    ))
    .await
    .unwrap();
    api.take_calls();
    let rows = bounded(api::list(&client, NS)).await.unwrap();
    let listed = api.requests();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].path, format!("{APPS}/statefulsets"));
    assert!(
        listed[0]
            .query
            .contains("labelSelector=paude.session%2Cpaude.role%3Dagent"),
        "{}",
        listed[0].query
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].name, "demo");
    assert_eq!(rows[0].agent, "shell");
    assert_eq!(rows[0].state, "running");
}

#[tokio::test]
async fn allowed_domains_changes_only_the_config_map() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    let session = session(Flavor::Kubernetes);
    bounded(api::create(&client, &session, &[], false, waits()))
        .await
        .unwrap();
    let agent_before = api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent");
    let proxy_before = api.object(&format!("{APPS}/deployments"), "paude-demo-proxy");
    api.take_calls();

    let config = "listen = \"0.0.0.0:3128\"\nallow = [\"example.com\", \"pypi.org\"]\n";
    bounded(api::set_proxy_config(&client, NS, "demo", config))
        .await
        .unwrap();
    let patch = api.requests();
    assert_eq!(patch[0].content_type, "application/merge-patch+json");
    assert_eq!(patch[0].body["data"]["config.toml"], config);
    assert_eq!(
        api.take_calls(),
        calls(&[&format!("PATCH {CORE}/configmaps/paude-demo-proxy")])
    );
    assert_eq!(
        bounded(api::proxy_config(&client, NS, "demo"))
            .await
            .unwrap(),
        config
    );
    assert_eq!(
        api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent"),
        agent_before
    );
    let map = api
        .object(&format!("{CORE}/configmaps"), "paude-demo-proxy")
        .unwrap();
    assert_eq!(
        map["metadata"]["labels"]["paude.session"], "demo",
        "labels stay"
    );
    let err = bounded(api::set_proxy_config(&client, NS, "nosuch", config))
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("no session \"nosuch\""), "{err}");
    assert_eq!(
        api.object(&format!("{APPS}/deployments"), "paude-demo-proxy"),
        proxy_before
    );
}

/// Compares `actual` with the golden file `launcher/tests/golden/NAME`; with
/// `PAUDE_UPDATE_GOLDEN=1` it rewrites the file instead (review the diff before committing).
fn check_golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("PAUDE_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; create it with PAUDE_UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs; if the change is intended, rerun with PAUDE_UPDATE_GOLDEN=1 and review it",
        path.display()
    );
}

/// Deserialises every YAML document back into its k8s-openapi type and checks it equals the
/// object that was rendered, so the golden file is exactly what the API would receive.
fn check_round_trip(yaml: &str, m: &super::manifests::Manifests) {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::{ConfigMap, Service};
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("the dry run is valid YAML");
    let mut policies = Vec::new();
    let mut maps = Vec::new();
    let mut untyped = Vec::new();
    for doc in &docs {
        match doc["kind"].as_str().unwrap() {
            "NetworkPolicy" => {
                policies.push(serde_json::from_value::<NetworkPolicy>(doc.clone()).unwrap())
            }
            "ConfigMap" => maps.push(serde_json::from_value::<ConfigMap>(doc.clone()).unwrap()),
            "Service" => assert_eq!(
                serde_json::from_value::<Service>(doc.clone()).unwrap(),
                m.proxy_service
            ),
            "Deployment" => assert_eq!(
                serde_json::from_value::<Deployment>(doc.clone()).unwrap(),
                m.proxy
            ),
            "StatefulSet" => assert_eq!(
                serde_json::from_value::<StatefulSet>(doc.clone()).unwrap(),
                m.agent
            ),
            "ImageStream" | "BuildConfig" => untyped.push(doc.clone()),
            other => panic!("unexpected kind {other} in the dry run"),
        }
    }
    assert_eq!(
        policies,
        vec![m.agent_policy.clone(), m.proxy_policy.clone()]
    );
    assert_eq!(maps, vec![m.proxy_config.clone(), m.agent_files.clone()]);
    assert_eq!(untyped, m.builds);
    assert_eq!(docs.len(), 7 + m.builds.len());
}

#[test]
fn openshift_manifests_match_the_golden_file_and_deserialise_into_k8s_types() {
    let m = session(Flavor::OpenShift).manifests(DRY_RUN_PROXY_HOST);
    let yaml = m.to_yaml().unwrap();
    check_round_trip(&yaml, &m);
    check_golden("openshift-manifests.yaml", &yaml);
}

#[test]
fn kubernetes_manifests_match_the_golden_file_and_deserialise_into_k8s_types() {
    let m = session(Flavor::Kubernetes).manifests(DRY_RUN_PROXY_HOST);
    let yaml = m.to_yaml().unwrap();
    check_round_trip(&yaml, &m);
    check_golden("kubernetes-manifests.yaml", &yaml);
}

#[test]
fn agent_pod_is_hardened_and_keeps_credentials_in_memory() {
    for flavor in [Flavor::OpenShift, Flavor::Kubernetes] {
        let m = session(flavor).manifests("172.30.0.9");
        let pod = m.agent.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.enable_service_links, Some(false));
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let fixed = flavor == Flavor::Kubernetes;
        assert_eq!(
            psc.run_as_user.is_some(),
            fixed,
            "OpenShift assigns the uid itself"
        );
        let container = &pod.containers[0];
        let sc = container.security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
        let limits = container.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["memory"].0, "4294967296");
        let credentials = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "credentials")
            .unwrap();
        assert_eq!(
            credentials.empty_dir.unwrap().medium.as_deref(),
            Some("Memory")
        );
        let env = container.env.clone().unwrap();
        let proxy = env.iter().find(|e| e.name == "HTTPS_PROXY").unwrap();
        assert_eq!(proxy.value.as_deref(), Some("http://172.30.0.9:3128"));
        assert!(
            !env.iter().any(|e| e
                .value
                .as_deref()
                .unwrap_or_default()
                .contains(DRY_RUN_PROXY_HOST)),
            "the placeholder is always replaced"
        );
    }
}

#[test]
fn session_names_that_cannot_name_cluster_objects_are_refused() {
    use super::manifests::check_name;
    for good in ["demo", "a", "my-project-2", &"x".repeat(40)] {
        check_name(good).unwrap();
    }
    for bad in [
        "Demo",
        "-demo",
        "demo-",
        "de_mo",
        "de.mo",
        "",
        &"x".repeat(41),
    ] {
        let err = check_name(bad).unwrap_err().to_string();
        assert!(err.contains("cannot name cluster objects"), "{bad}: {err}");
    }
}

#[tokio::test]
async fn exec_captures_output_and_the_exit_code_through_the_api() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    let argv = vec!["printf".to_string(), "hello world".to_string()];
    let (code, out, err) = bounded(super::exec::capture(
        &client,
        NS,
        "paude-demo-agent-0",
        &argv,
    ))
    .await
    .expect("exec succeeds");
    assert_eq!(
        (code, out.as_slice(), err.as_slice()),
        (0, &b"hello world"[..], &b"err"[..])
    );
    let argv = vec!["exit".to_string(), "3".to_string()];
    let (code, _, _) = bounded(super::exec::capture(
        &client,
        NS,
        "paude-demo-agent-0",
        &argv,
    ))
    .await
    .expect("exec succeeds");
    assert_eq!(code, 3);
    let requests = api.requests();
    assert_eq!(
        requests[0].path,
        format!("{CORE}/pods/paude-demo-agent-0/exec")
    );
    assert!(
        requests[0].query.contains("container=agent"),
        "{}",
        requests[0].query
    );
    assert!(
        requests[0].query.contains("command=printf&command=hello"),
        "{}",
        requests[0].query
    );
}

#[tokio::test]
async fn blocked_reads_the_proxy_pods_log() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    let err = bounded(api::proxy_log(&client, NS, "demo"))
        .await
        .unwrap_err();
    assert!(
        format!("{err}").contains("proxy of session \"demo\" is not running"),
        "{err}"
    );
    api.put(
        &format!("{CORE}/pods"),
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "paude-demo-proxy-5d8f-x2", "namespace": NS,
                         "labels": {"paude.session": "demo", "paude.role": "proxy"}}}),
    );
    let line = r#"{"host":"evil.example","decision":"deny"}"#;
    api.set_pod_log("paude-demo-proxy-5d8f-x2", line);
    api.take_calls();
    assert_eq!(
        bounded(api::proxy_log(&client, NS, "demo")).await.unwrap(),
        line
    );
    assert_eq!(
        api.take_calls(),
        calls(&[
            &format!("GET {CORE}/pods"),
            &format!("GET {CORE}/pods/paude-demo-proxy-5d8f-x2/log"),
        ])
    );
}

#[tokio::test]
async fn waiting_for_the_agent_names_the_pods_reason_on_timeout() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    bounded(api::create(
        &client,
        &session(Flavor::Kubernetes),
        &[],
        false,
        waits(),
    ))
    .await
    .unwrap();
    api.put(
        &format!("{CORE}/pods"),
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "paude-demo-agent-0", "namespace": NS},
            "status": {"containerStatuses": [{"name": "agent", "ready": false, "restartCount": 0,
                "image": "x", "imageID": "", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}}),
    );
    let err = bounded(api::wait_ready(
        &client,
        NS,
        "demo",
        Duration::from_millis(10),
        Duration::from_millis(50),
    ))
    .await
    .unwrap_err();
    assert!(format!("{err}").contains("ImagePullBackOff"), "{err}");
}
