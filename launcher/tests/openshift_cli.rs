//! The real `paude-launch` binary with `--backend openshift` against the fake API server on
//! 127.0.0.1 (see `openshift_fake/`), through a kubeconfig that points at it: the `--dry-run`
//! manifests (golden files, deserialised into k8s-openapi types, and no API call at all), the
//! whole life of a session (create, list, status, allowed-domains, stop, start, delete) on plain
//! Kubernetes and on OpenShift, and the clear errors for a missing namespace, a name a cluster
//! cannot use and a delete without `--confirm`.

mod openshift_fake;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use openshift_fake::FakeApi;
use serde_json::{json, Value};

const NS: &str = "team";
const APPS: &str = "/apis/apps/v1/namespaces/team";
const CORE: &str = "/api/v1/namespaces/team";

/// A scratch home and working directory with a kubeconfig for `api` and a stand-in proxy
/// binary (its bytes only feed the image hash; no image is built from it here).
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(api: &FakeApi) -> Env {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig(NS)).unwrap();
        std::fs::write(
            dir.path().join("paude-proxy"),
            b"stand-in for the proxy binary",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("demo")).unwrap();
        Env { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Runs paude-launch with `args` in a clean environment, bounded in time.
    async fn run(&self, args: &[&str]) -> Output {
        self.run_with_input(args, &[]).await
    }

    /// Runs paude-launch with `args`, writing `input` to its stdin and then closing it.
    async fn run_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_paude-launch"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("KUBECONFIG", self.path("kubeconfig"))
            .env("PAUDE_PROXY_BIN", self.path("paude-proxy"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .current_dir(self.path("demo"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("paude-launch runs");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&input).await;
        });
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("paude-launch finished within 60 s")
            .expect("paude-launch output");
        writer.await.expect("stdin writer");
        output
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "paude-launch failed: {}\nstdout: {}",
        stderr(output),
        stdout(output)
    );
}

/// Image tags are hashes of the image inputs (Dockerfiles, the proxy binary); the golden files
/// hold `<hash>` in their place so that they check the manifests, not the image recipes.
fn without_hashes(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    let bytes = yaml.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            .count();
        if run == 16 && i > 0 && bytes[i - 1] == b':' {
            out.push_str("<hash>");
            i += run;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

fn check_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("PAUDE_UPDATE_GOLDEN").is_some() {
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

/// Every document deserialises into its k8s-openapi type without losing a field.
fn check_typed(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("the dry run is valid YAML");
    for doc in &docs {
        let back = match doc["kind"].as_str().expect("every document has a kind") {
            "NetworkPolicy" => {
                serde_json::to_value(serde_json::from_value::<NetworkPolicy>(doc.clone()).unwrap())
            }
            "ConfigMap" => {
                serde_json::to_value(serde_json::from_value::<ConfigMap>(doc.clone()).unwrap())
            }
            "Service" => {
                serde_json::to_value(serde_json::from_value::<Service>(doc.clone()).unwrap())
            }
            "Deployment" => {
                serde_json::to_value(serde_json::from_value::<Deployment>(doc.clone()).unwrap())
            }
            "StatefulSet" => {
                serde_json::to_value(serde_json::from_value::<StatefulSet>(doc.clone()).unwrap())
            }
            "ImageStream" | "BuildConfig" => Ok(doc.clone()),
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(
            &back.unwrap(),
            doc,
            "a field was lost in the typed round trip"
        );
    }
    docs
}

#[tokio::test]
async fn dry_run_prints_every_openshift_manifest_and_calls_no_api() {
    let api = FakeApi::start(&[NS], true).await;
    let env = Env::new(&api);
    let output = env
        .run(&[
            "create",
            "demo",
            "--agent",
            "shell",
            "--backend",
            "openshift",
            "--dry-run",
        ])
        .await;
    assert_ok(&output);
    let yaml = stdout(&output);
    let docs = check_typed(&yaml);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ImageStream",
            "BuildConfig",
            "ImageStream",
            "BuildConfig",
            "NetworkPolicy",
            "NetworkPolicy",
            "ConfigMap",
            "ConfigMap",
            "Service",
            "Deployment",
            "StatefulSet"
        ]
    );
    check_golden("openshift-dry-run.yaml", &without_hashes(&yaml));
    assert!(
        api.requests().is_empty(),
        "a dry run sends nothing: {:?}",
        api.requests()
    );
}

#[tokio::test]
async fn dry_run_with_a_registry_prints_kubernetes_manifests() {
    let api = FakeApi::start(&[NS], false).await;
    let env = Env::new(&api);
    let output = env
        .run(&[
            "create",
            "demo",
            "--agent",
            "shell",
            "--backend",
            "openshift",
            "--dry-run",
            "--registry",
            "registry.example/team",
            "--pvc-size",
            "20Gi",
            "--storage-class",
            "fast",
            "--namespace",
            "elsewhere",
        ])
        .await;
    assert_ok(&output);
    let yaml = stdout(&output);
    check_typed(&yaml);
    check_golden("kubernetes-dry-run.yaml", &without_hashes(&yaml));
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn a_session_lives_and_dies_on_kubernetes() {
    let api = FakeApi::start(&[NS], false).await;
    let env = Env::new(&api);
    // The pod the StatefulSet controller would start, ready.
    api.put(
        &format!("{CORE}/pods"),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "paude-demo-agent-0", "namespace": NS,
                            "labels": {"paude.session": "demo", "paude.role": "agent"}},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let k8s = [
        "--backend",
        "openshift",
        "--registry",
        "registry.example/team",
    ];
    let create: Vec<&str> = ["create", "demo", "--agent", "shell"]
        .iter()
        .chain(&k8s)
        .copied()
        .collect();
    let output = env.run(&create).await;
    assert_ok(&output);
    let agent = api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .expect("agent applied");
    assert_eq!(
        agent["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .0,
        "registry.example/team/paude-agent-shell"
    );

    let status = env.run(&["status", "demo", "--backend", "openshift"]).await;
    assert_ok(&status);
    assert!(stdout(&status).contains("running"), "{}", stdout(&status));

    let list = env.run(&["list", "--backend", "openshift"]).await;
    assert_ok(&list);
    assert!(stdout(&list).contains("demo"), "{}", stdout(&list));

    let add = env
        .run(&[
            "allowed-domains",
            "demo",
            "--add",
            "pypi.org",
            "--backend",
            "openshift",
        ])
        .await;
    assert_ok(&add);
    let config = api
        .object(&format!("{CORE}/configmaps"), "paude-demo-proxy")
        .unwrap();
    assert!(config["data"]["config.toml"]
        .as_str()
        .unwrap()
        .contains("pypi.org"));

    assert_ok(&env.run(&["stop", "demo", "--backend", "openshift"]).await);
    let agent = api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .unwrap();
    assert_eq!(agent["spec"]["replicas"], 0);
    assert_ok(&env.run(&["start", "demo", "--backend", "openshift"]).await);
    let agent = api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .unwrap();
    assert_eq!(agent["spec"]["replicas"], 1);

    let refused = env.run(&["delete", "demo", "--backend", "openshift"]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--confirm"),
        "{}",
        stderr(&refused)
    );
    assert!(api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .is_some());

    assert_ok(
        &env.run(&["delete", "demo", "--confirm", "--backend", "openshift"])
            .await,
    );
    let left: Vec<String> = api
        .object_paths()
        .into_iter()
        .filter(|p| !p.ends_with("/pods/paude-demo-agent-0"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn create_on_openshift_builds_both_images_on_the_cluster() {
    let api = FakeApi::start(&[NS], true).await;
    let env = Env::new(&api);
    api.put(
        &format!("{CORE}/pods"),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "paude-demo-agent-0", "namespace": NS},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let output = env
        .run(&[
            "create",
            "demo",
            "--agent",
            "shell",
            "--backend",
            "openshift",
        ])
        .await;
    assert_ok(&output);
    let uploads: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/instantiatebinary"))
        .collect();
    assert_eq!(uploads.len(), 2, "both images are built");
    assert!(uploads[0].path.contains("/buildconfigs/paude-demo-proxy/"));
    assert!(uploads[1].path.contains("/buildconfigs/paude-demo-agent/"));
    for upload in &uploads {
        assert!(
            upload.body["bytes"].as_u64().unwrap() > 1024,
            "a tar archive is uploaded"
        );
    }
    let agent = api
        .object(&format!("{APPS}/statefulsets"), "paude-demo-agent")
        .unwrap();
    let image = agent["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert!(image.starts_with("paude-demo-agent:"), "{image}");
}

#[tokio::test]
async fn create_in_a_missing_namespace_fails_clearly_and_creates_nothing() {
    let api = FakeApi::start(&["other"], true).await;
    let env = Env::new(&api);
    let output = env
        .run(&[
            "create",
            "demo",
            "--agent",
            "shell",
            "--backend",
            "openshift",
        ])
        .await;
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("namespace \"team\" does not exist"), "{err}");
    assert!(err.contains("--namespace"), "{err}");
    assert_eq!(api.object_count(), 0);
    assert!(
        api.requests().iter().all(|r| r.method == "GET"),
        "{:?}",
        api.requests()
    );
}

#[tokio::test]
async fn bad_session_names_are_refused_before_any_api_call() {
    let api = FakeApi::start(&[NS], true).await;
    let env = Env::new(&api);
    for bad in ["x".repeat(41), "Demo".to_string(), "de_mo".to_string()] {
        let output = env
            .run(&["create", &bad, "--agent", "shell", "--backend", "openshift"])
            .await;
        assert!(!output.status.success(), "{bad} was accepted");
        assert!(
            stderr(&output).contains("session name"),
            "{}",
            stderr(&output)
        );
    }
    assert!(api.requests().is_empty(), "{:?}", api.requests());
}

#[tokio::test]
async fn git_bridge_pipes_bytes_through_the_api_exec_and_returns_the_exit_code() {
    let api = FakeApi::start(&[NS], false).await;
    let env = Env::new(&api);
    // Every byte value, many times over: git's pack protocol is binary.
    let input: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let output = env
        .run_with_input(
            &["git-bridge", "--backend", "openshift", "demo", "--", "cat"],
            &input,
        )
        .await;
    assert_ok(&output);
    assert!(
        output.stdout == input,
        "stdout differs from stdin ({} bytes back)",
        output.stdout.len()
    );
    let exec = api
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/exec"))
        .expect("an exec");
    assert_eq!(exec.path, format!("{CORE}/pods/paude-demo-agent-0/exec"));
    assert!(exec.query.contains("stdin=true"), "{}", exec.query);
    assert!(!exec.query.contains("tty=true"), "{}", exec.query);

    let failed = env
        .run(&[
            "git-bridge",
            "--backend",
            "openshift",
            "demo",
            "--",
            "exit",
            "5",
        ])
        .await;
    assert_eq!(failed.status.code(), Some(5), "{}", stderr(&failed));
}

#[tokio::test]
async fn dry_run_needs_no_kubeconfig_when_the_namespace_is_given() {
    let api = FakeApi::start(&[NS], true).await;
    let env = Env::new(&api);
    std::fs::remove_file(env.path("kubeconfig")).unwrap();
    let args = [
        "create",
        "demo",
        "--agent",
        "shell",
        "--backend",
        "openshift",
        "--dry-run",
    ];
    let output = env
        .run(&[&args[..], &["--namespace", "team"]].concat())
        .await;
    assert_ok(&output);
    check_golden("openshift-dry-run.yaml", &without_hashes(&stdout(&output)));

    let output = env.run(&args).await;
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("add --namespace") && err.contains("kubeconfig"),
        "{err}"
    );

    let output = env.run(&["list", "--backend", "openshift"]).await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("cannot read a kubeconfig"),
        "{}",
        stderr(&output)
    );
}
