//! Request-level tests of the cluster flows against the in-process fake API server (real HTTP
//! on 127.0.0.1): the exact calls of create, stop, start, delete, list and allowed-domains, the
//! repair path after a half-failed create, and the errors for a missing namespace or session.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde_json::Value;

use super::api::{self, BuildContext, Waits};
use super::manifests::{Flavor, ImageRef, Resources, Session};

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
        agent_env: vec![("PAUDE_AGENT".into(), "shell".into())],
        agent_command: vec![
            "tmux".into(),
            "new-session".into(),
            "-A".into(),
            "-s".into(),
            "paude".into(),
        ],
        workdir: "/workspace".into(),
        home: "/home/paude".into(),
        uid: 1000,
        proxy_config: "listen = \"0.0.0.0:3128\"\nallow = [\"example.com\"]\n".into(),
        resources: Resources {
            memory: Some("4Gi".into()),
            cpus: Some("2".into()),
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
        &format!("PATCH {APPS}/statefulsets/paude-demo-agent"),
    ])
}

#[tokio::test]
async fn create_on_openshift_builds_then_applies_isolation_first_with_server_side_apply() {
    let api = FakeApi::start(&[NS], true).await;
    let client = api.client(NS).await;
    let session = session(Flavor::OpenShift);
    bounded(api::create(&client, &session, &builds(&session), false, waits()))
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
        assert_eq!(request.content_type, "application/apply-patch+yaml", "{}", request.path);
        assert!(
            request.query.contains("fieldManager=paude-launch") && request.query.contains("force=true"),
            "server-side apply with our field manager: {} ?{}",
            request.path,
            request.query
        );
    }
    let upload = requests.iter().find(|r| r.method == "POST").unwrap();
    assert_eq!(upload.content_type, "application/octet-stream");
    assert_eq!(upload.body["bytes"], 13, "the build context is uploaded as is");

    // The agent is handed the proxy as the Service's cluster IP, never as a name to resolve.
    let service = api.object(&format!("{CORE}/services"), "paude-demo-proxy").unwrap();
    let ip = service["spec"]["clusterIP"].as_str().unwrap().to_string();
    let agent = api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent").unwrap();
    let env = &agent["spec"]["template"]["spec"]["containers"][0]["env"];
    let proxy_vars: Vec<&Value> = env
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().to_lowercase().ends_with("_proxy"))
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
    bounded(api::create(&client, &session, &builds(&session), false, waits()))
        .await
        .unwrap();
    bounded(api::delete(&client, NS, "demo", true)).await.unwrap();
    // Same inputs again: the deleted streams took their tags along, so it builds again.
    api.take_calls();
    bounded(api::create(&client, &session, &builds(&session), false, waits()))
        .await
        .unwrap();
    let posts = api.take_calls().into_iter().filter(|c| c.starts_with("POST")).count();
    assert_eq!(posts, 2);

    // A repair run after a failure keeps the images that are there.
    bounded(api::delete(&client, NS, "demo", true)).await.unwrap();
    api.fail_once("PATCH", &format!("{APPS}/statefulsets/paude-demo-agent"));
    let _ = bounded(api::create(&client, &session, &builds(&session), false, waits())).await;
    api.take_calls();
    bounded(api::create(&client, &session, &builds(&session), false, waits()))
        .await
        .unwrap();
    let posts = api.take_calls().into_iter().filter(|c| c.starts_with("POST")).count();
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
    let agent = api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent").unwrap();
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
    assert!(format!("{err:#}").contains("cannot apply Deployment paude-demo-proxy"), "{err:#}");
    // Half there: policies, ConfigMap and Service exist, no agent.
    assert!(api.object(&format!("{NET}/networkpolicies"), "paude-demo-agent-egress").is_some());
    assert!(api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent").is_none());
    let ip_before = api.object(&format!("{CORE}/services"), "paude-demo-proxy").unwrap()["spec"]["clusterIP"].clone();
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
    let service = api.object(&format!("{CORE}/services"), "paude-demo-proxy").unwrap();
    assert_eq!(service["spec"]["clusterIP"], ip_before, "the Service keeps its address");
    assert!(api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent").is_some());

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
    let err = bounded(api::create(&client, &session(Flavor::Kubernetes), &[], false, waits()))
        .await
        .expect_err("namespace team does not exist");
    let message = format!("{err}");
    assert!(message.contains("namespace \"team\" does not exist"), "{message}");
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
    let err = bounded(api::create(&client, &session, &builds(&session), false, waits()))
        .await
        .expect_err("the build fails");
    let message = format!("{err}");
    assert!(message.contains("image build paude-demo-proxy-1 failed"), "{message}");
    assert!(message.contains("error: package not found"), "{message}");
    assert!(api.object(&format!("{APPS}/deployments"), "paude-demo-proxy").is_none());
    assert!(api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent").is_none());
}

#[tokio::test]
async fn stop_and_start_scale_the_agent_and_proxy_and_keep_the_volume() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    bounded(api::create(&client, &session(Flavor::Kubernetes), &[], false, waits()))
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
    let agent = api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent").unwrap();
    assert_eq!(agent["spec"]["replicas"], 0);
    assert!(agent["spec"]["volumeClaimTemplates"].is_array(), "the claim template stays");
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
    let proxy = api.object(&format!("{APPS}/deployments"), "paude-demo-proxy").unwrap();
    assert_eq!(proxy["spec"]["replicas"], 1);

    let err = bounded(api::scale(&client, NS, "nosuch", 1)).await.unwrap_err();
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
    bounded(api::create(&client, &other, &builds(&other), false, waits()))
        .await
        .unwrap();
    let before = api.object_paths();
    bounded(api::create(&client, &demo, &builds(&demo), false, waits()))
        .await
        .unwrap();
    // The StatefulSet controller makes the claim from the template; the fake plays it.
    let claim = &api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent").unwrap()["spec"]
        ["volumeClaimTemplates"][0];
    let mut claim = claim.clone();
    claim["metadata"]["name"] = "data-paude-demo-agent-0".into();
    api.put(&format!("{CORE}/persistentvolumeclaims"), claim);
    api.take_calls();

    bounded(api::delete(&client, NS, "demo", true)).await.unwrap();
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
    assert_eq!(api.object_paths(), before, "exactly the other session is left");

    let err = bounded(api::delete(&client, NS, "demo", true)).await.unwrap_err();
    assert!(format!("{err}").contains("no session \"demo\""), "{err}");
}

#[tokio::test]
async fn list_finds_sessions_by_label_and_reports_their_state() {
    let api = FakeApi::start(&[NS], false).await;
    let client = api.client(NS).await;
    assert!(bounded(api::list(&client, NS)).await.unwrap().is_empty());
    bounded(api::create(&client, &session(Flavor::Kubernetes), &[], false, waits()))
        .await
        .unwrap();
    api.take_calls();
    let rows = bounded(api::list(&client, NS)).await.unwrap();
    let listed = api.requests();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].path, format!("{APPS}/statefulsets"));
    assert!(
        listed[0].query.contains("labelSelector=paude.session%2Cpaude.role%3Dagent"),
        "{}",
        listed[0].query
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].name, "demo");
    assert_eq!(rows[0].agent, "shell");
    assert_eq!(rows[0].state, "starting", "no pod is ready yet");
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
    bounded(api::set_proxy_config(&client, &session, config))
        .await
        .unwrap();
    assert_eq!(
        api.take_calls(),
        calls(&[&format!("PATCH {CORE}/configmaps/paude-demo-proxy")])
    );
    assert_eq!(
        bounded(api::proxy_config(&client, NS, "demo")).await.unwrap(),
        config
    );
    assert_eq!(api.object(&format!("{APPS}/statefulsets"), "paude-demo-agent"), agent_before);
    assert_eq!(api.object(&format!("{APPS}/deployments"), "paude-demo-proxy"), proxy_before);
}
