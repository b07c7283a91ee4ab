//! An in-memory Kubernetes/OpenShift API server for tests, served over real HTTP on
//! 127.0.0.1. It keeps objects per collection, answers server-side apply, merge patches of
//! `/scale`, get, list with label selectors, delete and binary builds the way the API server
//! does for the calls paude-launch makes, and records every request so a test can assert the
//! exact conversation. Failures can be injected per request to test the repair paths.
//!
//! It is shared by the backend's own unit tests and the tests that drive the real binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// Exec over WebSocket (the Kubernetes remote command protocol, v5 with v4 fallback) for a few
/// stand-in programs: `cat` echoes stdin to stdout until stdin closes, `printf TEXT` writes
/// TEXT to stdout and `err` to stderr, `exit N` ends with exit code N.
mod exec {
    use futures_util::{SinkExt, StreamExt};
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use serde_json::json;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    const STDIN: u8 = 0;
    const STDOUT: u8 = 1;
    const STDERR: u8 = 2;
    const STATUS: u8 = 3;
    const CLOSE: u8 = 255;

    fn decode(value: &str) -> String {
        let bytes = value.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else if bytes[i] == b'+' {
                out.push(b' ');
                i += 1;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    pub fn upgrade(req: &mut Request<Incoming>, query: &str) -> Response<Full<Bytes>> {
        let argv: Vec<String> = query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .filter(|(k, _)| *k == "command")
            .map(|(_, v)| decode(v))
            .collect();
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| derive_accept_key(k.as_bytes()))
            .unwrap_or_default();
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let protocol = if offered.contains("v5.channel.k8s.io") {
            "v5.channel.k8s.io"
        } else {
            "v4.channel.k8s.io"
        };
        let upgrading = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrading.await else {
                return;
            };
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            run(ws, argv).await;
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", key)
            .header("sec-websocket-protocol", protocol)
            .body(Full::new(Bytes::new()))
            .expect("upgrade response")
    }

    fn frame(channel: u8, data: &[u8]) -> Message {
        let mut bytes = vec![channel];
        bytes.extend_from_slice(data);
        Message::binary(bytes)
    }

    async fn run<S>(mut ws: WebSocketStream<S>, argv: Vec<String>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut code = 0;
        match argv.first().map(String::as_str) {
            Some("cat") => {
                while let Some(Ok(message)) = ws.next().await {
                    let Message::Binary(data) = message else {
                        continue;
                    };
                    match data.first() {
                        Some(&STDIN) => {
                            let _ = ws.send(frame(STDOUT, &data[1..])).await;
                        }
                        Some(&CLOSE) if data.get(1) == Some(&STDIN) => break,
                        _ => {}
                    }
                }
            }
            Some("printf") => {
                let text = argv.get(1).cloned().unwrap_or_default();
                let _ = ws.send(frame(STDOUT, text.as_bytes())).await;
                let _ = ws.send(frame(STDERR, b"err")).await;
            }
            Some("exit") => code = argv.get(1).and_then(|c| c.parse().ok()).unwrap_or(1),
            _ => code = 127,
        }
        let status = if code == 0 {
            json!({"metadata": {}, "status": "Success"})
        } else {
            json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                   "message": format!("command terminated with non-zero exit code: {code}"),
                   "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
        };
        let _ = ws.send(frame(STATUS, status.to_string().as_bytes())).await;
        let _ = ws.close(None).await;
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    /// `METHOD path` — the form the tests compare conversations in.
    pub fn call(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct State {
    namespaces: Vec<String>,
    openshift: bool,
    /// Collection path (e.g. `/apis/apps/v1/namespaces/ns/statefulsets`) → name → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    log: Vec<Recorded>,
    /// (method, path) pairs to answer once with a 500.
    failures: Vec<(String, String)>,
    build_phase: String,
    pod_logs: BTreeMap<String, String>,
    next_ip: u8,
    next_build: u32,
}

/// A running fake API server.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

impl FakeApi {
    /// Starts a fake that knows the given namespaces; `openshift` makes it serve the build and
    /// image API groups.
    pub async fn start(namespaces: &[&str], openshift: bool) -> FakeApi {
        let state = Arc::new(Mutex::new(State {
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            openshift,
            build_phase: "Complete".into(),
            next_ip: 10,
            ..State::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server on 127.0.0.1");
        let addr = listener.local_addr().expect("fake API address");
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        FakeApi { state, addr }
    }

    /// A kubeconfig that points at this fake, with `namespace` as the context's namespace.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
             http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: \
             tester\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: tester\n  \
             user:\n    token: test-token\n",
            self.addr
        )
    }

    /// A kube client for this fake, for tests that call the backend's functions directly.
    pub async fn client(&self, namespace: &str) -> kube::Client {
        let kubeconfig: kube::config::Kubeconfig =
            serde_saphyr::from_str(&self.kubeconfig(namespace)).expect("parse the fake kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kube config for the fake API");
        kube::Client::try_from(config).expect("kube client for the fake API")
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().log.clone()
    }

    /// `METHOD path` of every request so far, in order, then forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        let mut state = self.state.lock().unwrap();
        let calls = state.log.iter().map(Recorded::call).collect();
        state.log.clear();
        calls
    }

    /// Makes the next `method path` request fail with a 500.
    pub fn fail_once(&self, method: &str, path: &str) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push((method.into(), path.into()));
    }

    /// The phase the next binary builds end in (`Complete` or `Failed`).
    pub fn set_build_phase(&self, phase: &str) {
        self.state.lock().unwrap().build_phase = phase.into();
    }

    /// The log text served for a pod.
    pub fn set_pod_log(&self, pod: &str, log: &str) {
        self.state
            .lock()
            .unwrap()
            .pod_logs
            .insert(pod.into(), log.into());
    }

    /// The stored object at `collection/name`, if any.
    pub fn object(&self, collection: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(collection)
            .and_then(|c| c.get(name))
            .cloned()
    }

    /// Inserts or replaces an object directly, as a controller would (pods, status).
    pub fn put(&self, collection: &str, object: Value) {
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        self.state
            .lock()
            .unwrap()
            .objects
            .entry(collection.into())
            .or_default()
            .insert(name, object);
    }

    /// How many objects the fake holds, over all collections.
    pub fn object_count(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .objects
            .values()
            .map(BTreeMap::len)
            .sum()
    }

    /// `collection/name` of every stored object.
    pub fn object_paths(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .iter()
            .flat_map(|(c, objects)| objects.keys().map(move |n| format!("{c}/{n}")))
            .collect()
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    respond(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn respond(code: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("fake API response")
}

fn text(body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("fake API response")
}

/// Whether an object's labels satisfy a selector of `key`, `key=value` and `key!=value` terms.
fn matches(object: &Value, selector: &str) -> bool {
    let labels = &object["metadata"]["labels"];
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((key, value)) = term.split_once("!=") {
            labels[key].as_str() != Some(value)
        } else if let Some((key, value)) = term.split_once('=') {
            labels[key].as_str() == Some(value.trim_start_matches('='))
        } else {
            !labels[term].is_null()
        }
    })
}

/// What the StatefulSet controller reports once its pods run: every wanted replica ready.
fn play_statefulset_controller(object: &mut Value) {
    let wanted = object["spec"]["replicas"].as_i64().unwrap_or(1);
    object["status"] = json!({"replicas": wanted, "readyReplicas": wanted});
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (key, value) in fields {
                if value.is_null() {
                    target.as_object_mut().unwrap().remove(key);
                } else {
                    merge(&mut target[key], value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%21", "!")
                .replace("%2F", "/")
                .replace('+', " ")
        })
    })
}

async fn handle(state: Arc<Mutex<State>>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path().ends_with("/exec") {
        let query = req.uri().query().unwrap_or_default().to_string();
        state.lock().unwrap().log.push(Recorded {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: query.clone(),
            content_type: String::new(),
            body: Value::Null,
        });
        return exec::upgrade(&mut req, &query);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let raw = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = if content_type.contains("json") || content_type.contains("yaml") {
        serde_json::from_slice(&raw).unwrap_or(Value::Null)
    } else {
        json!({ "bytes": raw.len() })
    };
    let mut state = state.lock().unwrap();
    state.log.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: body.clone(),
    });
    if let Some(i) = state
        .failures
        .iter()
        .position(|(m, p)| *m == method.as_str() && *p == path)
    {
        state.failures.remove(i);
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected failure",
        );
    }

    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Discovery of the OpenShift build group.
    if segments == ["apis", "build.openshift.io", "v1"] {
        return if state.openshift {
            respond(
                StatusCode::OK,
                json!({"kind": "APIResourceList", "groupVersion": "build.openshift.io/v1", "resources": []}),
            )
        } else {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        };
    }
    // Namespaces.
    if segments.len() == 4 && segments[..3] == ["api", "v1", "namespaces"] {
        let ns = segments[3];
        return if state.namespaces.iter().any(|n| n == ns) {
            respond(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
        } else {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("namespaces \"{ns}\" not found"),
            )
        };
    }
    // Namespaced resources: /api/v1/namespaces/NS/PLURAL[/NAME[/SUB]] or
    // /apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME[/SUB]].
    let prefix = match segments.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return status(StatusCode::NOT_FOUND, "NotFound", "unknown path"),
    };
    if segments.len() < prefix + 3 || segments[prefix] != "namespaces" {
        return status(StatusCode::NOT_FOUND, "NotFound", "unknown path");
    }
    let ns = segments[prefix + 1].to_string();
    let plural = segments[prefix + 2].to_string();
    if !state.namespaces.contains(&ns) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("namespaces \"{ns}\" not found"),
        );
    }
    if !state.openshift && (path.contains("openshift.io")) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let collection = segments[..prefix + 3].join("/");
    let collection = format!("/{collection}");
    let name = segments
        .get(prefix + 3)
        .map(|s| s.replace("%3A", ":").replace("%3a", ":"));
    let sub = segments.get(prefix + 4).map(|s| s.to_string());

    match (method, name, sub) {
        (Method::GET, None, None) => {
            let selector = query_param(&query, "labelSelector").unwrap_or_default();
            let items: Vec<Value> = state
                .objects
                .get(&collection)
                .map(|c| {
                    c.values()
                        .filter(|o| matches(o, &selector))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            respond(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        (Method::GET, Some(name), None) => {
            match state.objects.get(&collection).and_then(|c| c.get(&name)) {
                Some(object) => respond(StatusCode::OK, object.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                ),
            }
        }
        (Method::GET, Some(name), Some(sub)) if sub == "log" => {
            let log = state.pod_logs.get(&name).cloned().unwrap_or_default();
            text(&log)
        }
        (Method::PATCH, Some(name), None) if content_type == "application/apply-patch+yaml" => {
            if query_param(&query, "fieldManager").as_deref() != Some("paude-launch") {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "fieldManager is required",
                );
            }
            let mut object = body;
            let previous = state
                .objects
                .get(&collection)
                .and_then(|c| c.get(&name))
                .cloned();
            let uid = previous
                .as_ref()
                .map(|p| p["metadata"]["uid"].clone())
                .unwrap_or_else(|| json!(format!("uid-{name}")));
            object["metadata"]["uid"] = uid;
            object["metadata"]["creationTimestamp"] = previous
                .as_ref()
                .map(|p| p["metadata"]["creationTimestamp"].clone())
                .unwrap_or_else(|| json!("2026-01-01T00:00:00Z"));
            if let Some(previous_status) = previous.as_ref().map(|p| p["status"].clone()) {
                if !previous_status.is_null() {
                    object["status"] = previous_status;
                }
            }
            if plural == "services" {
                let ip = match previous
                    .as_ref()
                    .and_then(|p| p["spec"]["clusterIP"].as_str())
                {
                    Some(ip) => ip.to_string(),
                    None => {
                        state.next_ip += 1;
                        format!("172.30.0.{}", state.next_ip)
                    }
                };
                object["spec"]["clusterIP"] = json!(ip);
            }
            if plural == "statefulsets" {
                play_statefulset_controller(&mut object);
            }
            state
                .objects
                .entry(collection)
                .or_default()
                .insert(name, object.clone());
            respond(StatusCode::OK, object)
        }
        (Method::PATCH, Some(name), None) if content_type == "application/merge-patch+json" => {
            match state
                .objects
                .get_mut(&collection)
                .and_then(|c| c.get_mut(&name))
            {
                Some(object) => {
                    merge(object, &body);
                    respond(StatusCode::OK, object.clone())
                }
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                ),
            }
        }
        (Method::PATCH, Some(name), Some(sub)) if sub == "scale" => {
            let replicas = body["spec"]["replicas"].clone();
            match state
                .objects
                .get_mut(&collection)
                .and_then(|c| c.get_mut(&name))
            {
                Some(object) => {
                    object["spec"]["replicas"] = replicas.clone();
                    if plural == "statefulsets" {
                        play_statefulset_controller(object);
                    }
                    respond(
                        StatusCode::OK,
                        json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                               "metadata": {"name": name, "namespace": ns},
                               "spec": {"replicas": replicas}}),
                    )
                }
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                ),
            }
        }
        (Method::DELETE, Some(name), None) => {
            if plural == "imagestreams" {
                // The API server deletes a stream's tags with it.
                let tags = collection.replace("/imagestreams", "/imagestreamtags");
                if let Some(tags) = state.objects.get_mut(&tags) {
                    tags.retain(|tag, _| !tag.starts_with(&format!("{name}:")));
                }
            }
            match state
                .objects
                .get_mut(&collection)
                .and_then(|c| c.remove(&name))
            {
                Some(object) => respond(StatusCode::OK, object),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                ),
            }
        }
        (Method::POST, Some(name), Some(sub)) if sub == "instantiatebinary" => {
            let exists = state
                .objects
                .get(&collection)
                .is_some_and(|c| c.contains_key(&name));
            if !exists {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("buildconfigs \"{name}\" not found"),
                );
            }
            state.next_build += 1;
            let build_name = format!("{name}-{}", state.next_build);
            let phase = state.build_phase.clone();
            if phase == "Complete" {
                // The build pushed its image: the ImageStream now has the output tag.
                let output = state.objects[&collection][&name]["spec"]["output"]["to"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let tags = format!("/apis/image.openshift.io/v1/namespaces/{ns}/imagestreamtags");
                let tag = json!({
                    "apiVersion": "image.openshift.io/v1", "kind": "ImageStreamTag",
                    "metadata": {"name": output, "namespace": ns},
                });
                state.objects.entry(tags).or_default().insert(output, tag);
            }
            let build = json!({
                "apiVersion": "build.openshift.io/v1", "kind": "Build",
                "metadata": {"name": build_name, "namespace": ns,
                             "labels": {"openshift.io/build-config.name": name}},
                "status": {"phase": phase},
            });
            let builds = collection.replace("/buildconfigs", "/builds");
            state
                .objects
                .entry(builds)
                .or_default()
                .insert(build_name.clone(), build.clone());
            state
                .pod_logs
                .entry(build_name)
                .or_insert_with(|| "STEP 1/2: FROM base\nerror: package not found".into());
            respond(StatusCode::CREATED, build)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not served by the fake API",
        ),
    }
}
