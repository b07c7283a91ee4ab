//! End-to-end tests of the paude-proxy binary: real sockets, real clients (raw HTTP, rustls,
//! curl), upstreams started on 127.0.0.1 by the tests. Names are pinned with `--resolve`, so
//! no test resolves or dials a host outside this machine.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn args(list: &[&str], pins: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.to_string())
        .chain(pins.iter().cloned())
        .collect()
}

fn start(list: &[&str], pins: &[String]) -> Proxy {
    let all = args(list, pins);
    Proxy::start(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The defaults of the timeouts the tests shorten (README "Flags").
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Checks that what ended after `elapsed` (measured from before the timer could start) was
/// ended by the shortened timeout `flag`: not before it, and before the default it replaced
/// would have. The bound is the point here, and the gap to the default is wide enough for
/// any load.
fn closed_by_the_flag(elapsed: Duration, flag: Duration, default: Duration) {
    assert!(
        elapsed >= flag,
        "ended after {elapsed:?}, before its timeout of {flag:?}"
    );
    assert!(
        elapsed < default,
        "ended after {elapsed:?}: not by the {flag:?} timeout given but by the {default:?} default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_forwarded_with_keep_alive_and_without_hop_by_hop_headers() {
    let web = http_upstream().await;
    let allow = format!("web.test:{}", web.port());
    let proxy = start(&["--allow", &allow], &loopback_pin("web.test"));
    let mut stream = connect(proxy.addr).await;
    for path in ["/one", "/two"] {
        let request = format!(
            "GET http://WEB.test:{}{path}?q=1 HTTP/1.1\r\nHost: web.test:{}\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n\r\n",
            web.port(),
            web.port()
        );
        send(&mut stream, request.as_bytes()).await;
        let response = read_response(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains(&format!("upstream saw GET {path}?q=1")),
            "{response}"
        );
        let lower = response.to_lowercase();
        assert!(
            lower.contains("x-kept: 2"),
            "end-to-end headers pass: {response}"
        );
        for leaked in [
            "proxy-connection",
            "proxy-authorization",
            "x-secret",
            "via:",
            "x-forwarded-for",
        ] {
            assert!(
                !lower.contains(leaked),
                "{leaked} must not reach the upstream: {response}"
            );
        }
        assert_eq!(header(&response, "x-upstream"), Some("yes"));
        assert_eq!(
            header(&response, "keep-alive"),
            None,
            "hop-by-hop response header stripped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_carries_tls_end_to_end() {
    let tls = tls_upstream().await;
    let allow = format!("example.test:{}", tls.addr.port());
    let proxy = start(&["--allow", &allow], &loopback_pin("example.test"));
    let target = format!("example.test:{}", tls.addr.port());
    let body = tls_get(proxy.addr, &target, "example.test", &tls.ca_der, false)
        .await
        .unwrap();
    assert!(body.ends_with("hello over tls"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_pipelined_behind_the_connect_head_reaches_the_upstream() {
    let tls = tls_upstream().await;
    let allow = format!("example.test:{}", tls.addr.port());
    let proxy = start(&["--allow", &allow], &loopback_pin("example.test"));
    let target = format!("example.test:{}", tls.addr.port());
    let body = tls_get(proxy.addr, &target, "example.test", &tls.ca_der, true)
        .await
        .unwrap();
    assert!(body.ends_with("hello over tls"), "{body}");
    assert_eq!(tls.handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_that_differs_from_the_connect_host_closes_the_tunnel() {
    let tls = tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let allow = format!("example.test:{}", tls.addr.port());
    let mut pins = loopback_pin("example.test");
    pins.extend(["--resolve".to_owned(), "other.test=127.0.0.1".to_owned()]);
    let proxy = start(
        &["--allow", &allow, "--audit-log", audit.to_str().unwrap()],
        &pins,
    );
    let target = format!("example.test:{}", tls.addr.port());
    // The certificate is valid for other.test too, so only the guard can stop this.
    let result = tls_get(proxy.addr, &target, "other.test", &tls.ca_der, false).await;
    assert!(
        result.is_err(),
        "a fronted tunnel must not carry data: {result:?}"
    );
    assert_eq!(tls.handshakes.load(std::sync::atomic::Ordering::SeqCst), 0);
    let lines = audit_lines(&audit, 1);
    assert_eq!(lines[0]["reason"], "sni_mismatch", "{lines:?}");
    assert_eq!(lines[0]["decision"], "deny");
    assert_eq!(lines[0]["sni"], "other.test");
    // The matching name still works through the same proxy.
    let ok = tls_get(proxy.addr, &target, "EXAMPLE.test", &tls.ca_der, true)
        .await
        .unwrap();
    assert!(ok.ends_with("hello over tls"));
}

/// An upstream that echoes what it receives.
async fn opaque_exchange(proxy: std::net::SocketAddr, target: &str) -> String {
    let mut s = connect(proxy).await;
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nSSH-2.0-test\r\n");
    send(&mut s, head.as_bytes()).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let work = async {
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.ends_with(b"SSH-2.0-test\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(T, work)
        .await
        .expect("the tunnel answers or closes");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tunnels_are_refused_unless_allowed() {
    let echo = echo_upstream().await;
    let allow = format!("echo.test:{}", echo.port());
    let target = format!("echo.test:{}", echo.port());
    let strict = start(&["--allow", &allow], &loopback_pin("echo.test"));
    let out = opaque_exchange(strict.addr, &target).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        !out.contains("SSH-2.0-test"),
        "opaque bytes must not pass: {out}"
    );

    let open = start(
        &["--allow", &allow, "--allow-opaque"],
        &loopback_pin("echo.test"),
    );
    let out = opaque_exchange(open.addr, &target).await;
    assert!(
        out.ends_with("SSH-2.0-test\r\n"),
        "with --allow-opaque the bytes pass: {out}"
    );
}

/// Reads from `s` until `want` ends what arrived or the proxy closes.
async fn read_until_end(s: &mut tokio::net::TcpStream, want: &[u8]) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let work = async {
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.ends_with(want) {
                break;
            }
        }
    };
    tokio::time::timeout(T, work)
        .await
        .expect("the proxy answers or closes");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_head_split_across_writes_keeps_the_bytes_behind_it() {
    let echo = echo_upstream().await;
    let allow = format!("echo.test:{}", echo.port());
    let proxy = start(
        &["--allow", &allow, "--allow-opaque"],
        &loopback_pin("echo.test"),
    );
    let mut s = connect(proxy.addr).await;
    let head = format!("CONNECT echo.test:{} HTTP/1.1\r\nHost: echo", echo.port());
    send(&mut s, head.as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut s, b".test\r\n\r\nSSH-2.0-split\r\n").await;
    let out = read_until_end(&mut s, b"SSH-2.0-split\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("\r\n\r\nSSH-2.0-split\r\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_reads_the_same_first_or_after_a_plain_request() {
    let web = http_upstream().await;
    let allow = format!("web.test:{}", web.port());
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let proxy = start(
        &["--allow", &allow, "--audit-log", audit.to_str().unwrap()],
        &loopback_pin("web.test"),
    );
    let refused = b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n";
    let first = raw(proxy.addr, refused).await;
    let mut s = connect(proxy.addr).await;
    let get = format!(
        "GET http://web.test:{}/ HTTP/1.1\r\nHost: web.test:{}\r\n\r\n",
        web.port(),
        web.port()
    );
    send(&mut s, get.as_bytes()).await;
    read_response(&mut s).await;
    send(&mut s, refused).await;
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("the refusal closes the connection")
        .unwrap();
    let later = String::from_utf8_lossy(&out).into_owned();
    for response in [&first, &later] {
        assert!(
            response.starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{response}"
        );
        assert_eq!(header(response, "x-paude-deny"), Some("not_allowed"));
        assert_eq!(header(response, "connection"), Some("close"));
    }
    let body = |r: &str| r.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    assert_eq!(body(&first), body(&later));
    assert!(
        body(&first).unwrap().contains("--allow evil.test"),
        "{first}"
    );
    let lines = audit_lines(&audit, 3);
    let denials: Vec<_> = lines
        .iter()
        .filter(|l| l["reason"] == "not_allowed")
        .collect();
    assert_eq!(denials.len(), 2, "{lines:?}");
    assert_eq!(denials[0]["host"], denials[1]["host"]);
    assert_eq!(denials[0]["method"], denials[1]["method"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_host_gets_403_with_the_reason_and_the_flag_that_allows_it() {
    let proxy = start(&["--allow", "pypi"], &[]);
    let out = raw(
        proxy.addr,
        b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(header(&out, "x-paude-deny"), Some("not_allowed"));
    assert!(out.contains("evil.test is not on the allowlist"), "{out}");
    assert!(out.contains("--allow evil.test"), "{out}");
    let out = raw(
        proxy.addr,
        b"GET http://evil.test/x HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(header(&out, "x-paude-deny"), Some("not_allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_address_class_is_blocked_before_dialling() {
    let cases = [
        ("127.0.0.1", "loopback_address"),
        ("10.1.2.3", "private_address"),
        ("192.168.1.1", "private_address"),
        ("172.16.0.1", "private_address"),
        ("100.64.0.1", "shared_address"),
        ("169.254.169.254", "link_local_address"),
        ("224.0.0.1", "multicast_address"),
        ("0.0.0.0", "unspecified_address"),
        ("::1", "loopback_address"),
        ("::ffff:127.0.0.1", "embedded_ipv4_address"),
        ("64:ff9b::a9fe:a9fe", "embedded_ipv4_address"),
        ("2002:a9fe:a9fe::1", "embedded_ipv4_address"),
        ("2001:0:4136:e378::1", "embedded_ipv4_address"),
        ("fd00::1", "private_address"),
        ("fe80::1", "link_local_address"),
        ("ff02::1", "multicast_address"),
    ];
    let mut flags = vec!["--allow".to_owned(), ".pinned.test".to_owned()];
    for (i, (ip, _)) in cases.iter().enumerate() {
        flags.push("--resolve".into());
        flags.push(format!("h{i}.pinned.test={ip}"));
    }
    let proxy = Proxy::start(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    for (i, (ip, code)) in cases.iter().enumerate() {
        let req = format!("CONNECT h{i}.pinned.test:443 HTTP/1.1\r\nHost: x\r\n\r\n");
        let out = raw(proxy.addr, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{ip}: {out}");
        assert_eq!(header(&out, "x-paude-deny"), Some(*code), "{ip}: {out}");
        assert!(
            out.contains("--allow-cidr"),
            "{ip}: the body names the flag: {out}"
        );
        let req = format!(
            "GET http://h{i}.pinned.test/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let out = raw(proxy.addr, req.as_bytes()).await;
        assert_eq!(
            header(&out, "x-paude-deny"),
            Some(*code),
            "plain HTTP {ip}: {out}"
        );
    }
    let metadata = raw(
        proxy.addr,
        b"CONNECT h5.pinned.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(metadata.contains("metadata"), "{metadata}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literals_need_an_explicit_rule() {
    let echo = echo_upstream().await;
    let port = echo.port();
    let proxy = start(
        &[
            "--allow",
            "all",
            "--allow-opaque",
            "--allow-cidr",
            "127.0.0.0/8",
        ],
        &[],
    );
    for target in [
        format!("127.0.0.1:{port}"),
        "[::1]:443".to_owned(),
        "93.184.216.34:443".to_owned(),
    ] {
        let out = raw(proxy.addr, &connect_head(&target, "")).await;
        assert_eq!(
            header(&out, "x-paude-deny"),
            Some("ip_literal"),
            "{target}: {out}"
        );
    }
    let out = raw(
        proxy.addr,
        b"GET http://[::1]/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(header(&out, "x-paude-deny"), Some("ip_literal"), "{out}");

    let listed = format!("127.0.0.1:{port}");
    let explicit = start(
        &[
            "--allow",
            &listed,
            "--allow-opaque",
            "--allow-cidr",
            "127.0.0.0/8",
        ],
        &[],
    );
    let out = opaque_exchange(explicit.addr, &listed).await;
    assert!(out.ends_with("SSH-2.0-test\r\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_other_than_443_and_80_need_a_pattern_that_names_them() {
    let proxy = start(&["--allow", "site.test"], &loopback_pin("site.test"));
    let out = raw(
        proxy.addr,
        b"CONNECT site.test:8443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("port_not_allowed"),
        "{out}"
    );
    assert!(out.contains("--allow site.test:8443"), "{out}");
    let out = raw(
        proxy.addr,
        b"CONNECT site.test:80 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("port_not_allowed"),
        "{out}"
    );
    let out = raw(
        proxy.addr,
        b"GET http://site.test:443/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("port_not_allowed"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_400_and_431_and_the_proxy_keeps_serving() {
    let web = http_upstream().await;
    let allow = format!("web.test:{}", web.port());
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let proxy = start(
        &[
            "--allow",
            &allow,
            "--max-header-bytes",
            "8192",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
        &loopback_pin("web.test"),
    );
    let out = raw(proxy.addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    let big = format!(
        "GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20000)
    );
    let out = raw(proxy.addr, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");
    let out = raw(
        proxy.addr,
        b"GET /origin-form HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(header(&out, "x-paude-deny"), Some("bad_request"));
    let out = raw(
        proxy.addr,
        b"CONNECT no-port.test HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let big_connect = format!(
        "CONNECT web.test:443 HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20000)
    );
    let out = raw(proxy.addr, big_connect.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("header_too_large"),
        "{out}"
    );
    let ok = format!(
        "GET http://web.test:{}/still HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
        web.port()
    );
    let out = raw(proxy.addr, ok.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let lines = audit_lines(&audit, 6);
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"header_too_large"), "{reasons:?}");
    assert_eq!(
        reasons.iter().filter(|r| **r == "bad_request").count(),
        3,
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_hit_the_header_timeout() {
    let proxy = start(&["--header-timeout", "500ms"], &[]);
    let started = std::time::Instant::now();
    let mut s = connect(proxy.addr).await;
    send(&mut s, b"GET http://slow.test/ HTTP/1.1\r\nHost: sl").await;
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("the proxy closes a slow client")
        .ok();
    closed_by_the_flag(
        started.elapsed(),
        Duration::from_millis(500),
        DEFAULT_HEADER_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // A tunnel that never sends its ClientHello is closed after the same timeout.
    let mut s = connect(proxy.addr).await;
    send(
        &mut s,
        b"CONNECT github.com:443 HTTP/1.1\r\nHost: github.com\r\n\r\n",
    )
    .await;
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("closed")
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_wins_over_every_allow() {
    let web = http_upstream().await;
    let port = web.port();
    let mut pins = loopback_pin("good.site.test");
    pins.extend(["--resolve".to_owned(), "bad.site.test=127.0.0.1".to_owned()]);
    let allow = format!("*.site.test:{port}");
    let proxy = start(
        &[
            "--allow",
            &allow,
            "--allow",
            "all",
            "--deny",
            "bad.site.test",
        ],
        &pins,
    );
    let good = format!(
        "GET http://good.site.test:{port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    assert!(raw(proxy.addr, good.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    let bad = format!(
        "GET http://bad.site.test:{port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let out = raw(proxy.addr, bad.as_bytes()).await;
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("denied_by_rule"),
        "{out}"
    );
    assert!(out.contains("deny rule 'bad.site.test'"), "{out}");
}

#[test]
fn check_prints_the_allowlist_and_names_file_and_line_of_errors() {
    let (code, out, err) = run_binary(&["--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(".pypi.org") && out.contains("pypi"), "{out}");
    assert!(
        out.contains("github.com") && out.contains("policies/github.txt"),
        "{out}"
    );
    assert!(
        !out.contains("anthropic"),
        "default is vertexai + pypi + github: {out}"
    );

    let (code, out, _) = run_binary(&["--check", "--allow", "claude", "--deny", "python"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(".anthropic.com") && out.contains("deny") && out.contains(".pythonhosted.org"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mine.txt"),
        "# description: mine\nok.example.com\n\n*\n",
    )
    .unwrap();
    let policies = dir.path().to_str().unwrap();
    let (code, _, err) = run_binary(&["--check", "--policies", policies, "--allow", "mine"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("mine.txt:4: pattern '*' matches everything"),
        "{err}"
    );

    let (code, _, err) = run_binary(&["--check", "--allow", "pypy"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown group 'pypy'"), "{err}");
    let (code, _, err) = run_binary(&["--check", "--allow", ".com"]);
    assert_ne!(code, 0);
    assert!(err.contains("matches every host under 'com'"), "{err}");
    let (code, _, err) = run_binary(&["--check", "--allow-cidr", "10.0.0.0/99"]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a CIDR range"), "{err}");
}

#[test]
fn config_file_applies_flags_override_it_and_unknown_fields_fail() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "allow = ['claude']\ndeny = ['console.anthropic.com']\nheader_timeout = '3s'\n",
    )
    .unwrap();
    let (code, out, err) = run_binary(&["--check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(".anthropic.com") && out.contains("console.anthropic.com"),
        "{out}"
    );
    let (code, out, _) = run_binary(&[
        "--check",
        "--config",
        config.to_str().unwrap(),
        "--allow",
        "rust",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("crates.io") && !out.contains(".claude.ai"),
        "flags override the file: {out}"
    );
    std::fs::write(&config, "alow = ['claude']\n").unwrap();
    let (code, _, err) = run_binary(&["--check", "--config", config.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("proxy.toml") && err.contains("alow"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_policy_and_a_broken_file_keeps_the_old_one() {
    let web = http_upstream().await;
    let port = web.port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.txt");
    std::fs::write(&file, "# description: mine\nfirst.test\n").unwrap();
    let policies = dir.path().to_str().unwrap();
    let mut pins = loopback_pin("first.test");
    pins.extend(["--resolve".to_owned(), "second.test=127.0.0.1".to_owned()]);
    let proxy = start(
        &[
            "--policies",
            policies,
            "--allow",
            "mine",
            "--watch-interval",
            "0",
        ],
        &pins,
    );
    let get = |host: &str| {
        format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    };
    let code = |out: String| header(&out, "x-paude-deny").map(str::to_owned);
    assert_eq!(
        code(raw(proxy.addr, get("second.test").as_bytes()).await).as_deref(),
        Some("not_allowed")
    );

    std::fs::write(&file, format!("# description: mine\nsecond.test:{port}\n")).unwrap();
    proxy.signal("HUP");
    assert!(
        proxy.wait_for_stderr("policy reloaded (SIGHUP)"),
        "{}",
        proxy.stderr()
    );
    let out = raw(proxy.addr, get("second.test").as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        code(raw(proxy.addr, get("first.test").as_bytes()).await).as_deref(),
        Some("not_allowed")
    );

    std::fs::write(&file, "# description: mine\n*.test\n").unwrap();
    proxy.signal("HUP");
    assert!(
        proxy.wait_for_stderr("keeping the policy in force"),
        "{}",
        proxy.stderr()
    );
    assert!(
        proxy
            .stderr()
            .contains("mine.txt:2: pattern '*.test' matches every host under 'test'"),
        "{}",
        proxy.stderr()
    );
    let out = raw(proxy.addr, get("second.test").as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "the old policy stays in force: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reloads_when_policy_content_changes() {
    let web = http_upstream().await;
    let port = web.port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.txt");
    std::fs::write(&file, "# description: mine\nfirst.test\n").unwrap();
    let policies = dir.path().to_str().unwrap();
    let proxy = start(
        &[
            "--policies",
            policies,
            "--allow",
            "mine",
            "--watch-interval",
            "200ms",
        ],
        &loopback_pin("late.test"),
    );
    let get =
        format!("GET http://late.test:{port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(raw(proxy.addr, get.as_bytes())
        .await
        .starts_with("HTTP/1.1 403"));
    // Replace the file the way a ConfigMap update does: write elsewhere, then rename over.
    let staged = dir.path().join(".staged");
    std::fs::write(&staged, format!("# description: mine\nlate.test:{port}\n")).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    assert!(
        proxy.wait_for_stderr("policy reloaded (files changed)"),
        "{}",
        proxy.stderr()
    );
    assert!(raw(proxy.addr, get.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_has_one_json_line_per_request_with_every_key() {
    let web = http_upstream().await;
    let port = web.port();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let allow = format!("web.test:{port}");
    let proxy = start(
        &["--allow", &allow, "--audit-log", audit.to_str().unwrap()],
        &loopback_pin("web.test"),
    );
    let ok = format!("POST http://web.test:{port}/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    assert!(raw(proxy.addr, ok.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    raw(
        proxy.addr,
        b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let lines = audit_lines(&audit, 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let keys = [
        "ts",
        "client",
        "method",
        "host",
        "port",
        "resolved",
        "decision",
        "reason",
        "rule",
        "group",
        "sni",
        "bytes_up",
        "bytes_down",
        "duration_ms",
    ];
    for line in &lines {
        for key in keys {
            assert!(line.get(key).is_some(), "missing {key}: {line}");
        }
    }
    let allowed = lines
        .iter()
        .find(|l| l["decision"] == "allow")
        .expect("an allow line");
    assert_eq!(allowed["method"], "POST");
    assert_eq!(allowed["host"], "web.test");
    assert_eq!(allowed["resolved"], format!("127.0.0.1:{port}"));
    assert_eq!(allowed["rule"], format!("web.test:{port}"));
    assert_eq!(allowed["bytes_up"], 5);
    assert!(allowed["bytes_down"].as_u64().unwrap() > 0);
    assert!(allowed["ts"].as_str().unwrap().ends_with('Z'));
    let denied = lines
        .iter()
        .find(|l| l["decision"] == "deny")
        .expect("a deny line");
    assert_eq!(denied["reason"], "not_allowed");
    assert_eq!(denied["method"], "CONNECT");
    assert_eq!(denied["resolved"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_metrics_health_and_policy() {
    let proxy = start(&["--admin-listen", "127.0.0.1:0", "--allow", "github"], &[]);
    let admin = proxy.admin.expect("the admin address is printed");
    raw(
        proxy.addr,
        b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let metrics = admin_get(admin, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("paude_decisions_total{decision=\"deny\",reason=\"not_allowed\"} 1"),
        "{metrics}"
    );
    for name in [
        "paude_connections_total",
        "paude_active_tunnels",
        "paude_dns_duration_seconds",
        "paude_connect_duration_seconds",
        "paude_bytes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing: {metrics}");
    }
    assert!(admin_get(admin, "/healthz").await.ends_with("ok\n"));
    let policy = admin_get(admin, "/policy").await;
    let body = policy.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(json["rules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["pattern"] == "api.github.com" && r["group"] == "github"));
}

/// A DNS server on loopback that answers every query with NXDOMAIN.
async fn nxdomain_server() -> std::net::SocketAddr {
    dns_server(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_and_unreachable_upstreams_get_502() {
    let dns = nxdomain_server().await;
    let dns_flag = dns.to_string();
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let allow = format!("down.test:{closed}");
    let proxy = start(
        &[
            "--dns-server",
            &dns_flag,
            "--allow",
            "ghost.test",
            "--allow",
            &allow,
        ],
        &loopback_pin("down.test"),
    );
    let out = raw(
        proxy.addr,
        b"CONNECT ghost.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert_eq!(header(&out, "x-paude-deny"), Some("unresolvable"), "{out}");
    let out = raw(
        proxy.addr,
        format!("CONNECT down.test:{closed} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("connect_failed"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_refuses_to_connect_to_itself() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let by_name = format!("self.test:{port}");
    let proxy = Proxy::start(&[
        "--listen",
        &listen,
        "--allow",
        &by_name,
        "--allow",
        &listen,
        "--allow-cidr",
        "127.0.0.0/8",
        "--resolve",
        "self.test=127.0.0.1",
    ]);
    for target in [&by_name, &listen] {
        let out = raw(proxy.addr, &connect_head(target, "")).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert_eq!(header(&out, "x-paude-deny"), Some("proxy_address"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_client_restricts_who_may_use_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let proxy = start(
        &[
            "--allow-client",
            "10.0.0.0/8",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
        &[],
    );
    let out = raw(
        proxy.addr,
        b"CONNECT github.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        out.is_empty(),
        "a client outside --allow-client gets nothing: {out}"
    );
    let lines = audit_lines(&audit, 1);
    assert_eq!(lines[0]["reason"], "client_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut proxy = start(&["--audit-log", audit.to_str().unwrap()], &[]);
    raw(
        proxy.addr,
        b"CONNECT last.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(), Some(0), "{}", proxy.stderr());
    // The line of the last request was still buffered at SIGTERM; it must be written out.
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.contains("\"host\":\"last.test\""), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_proxy_the_worked_readme_example() {
    require::require(&[require::program("curl", "curl")]);
    let web = http_upstream().await;
    let tls = tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let web_allow = format!("web.test:{}", web.port());
    let tls_allow = format!("example.test:{}", tls.addr.port());
    let mut pins = loopback_pin("web.test");
    pins.extend(["--resolve".to_owned(), "example.test=127.0.0.1".to_owned()]);
    let proxy = start(&["--allow", &web_allow, "--allow", &tls_allow], &pins);
    let proxy_url = format!("http://{}", proxy.addr);
    let curl = |extra: Vec<String>| {
        let proxy_url = proxy_url.clone();
        async move {
            let out = tokio::time::timeout(
                T,
                tokio::process::Command::new("curl")
                    .args(["-sS", "--max-time", "20", "-i", "--proxy", &proxy_url])
                    .args(extra)
                    .output(),
            )
            .await
            .expect("curl finishes")
            .expect("curl is installed (apt-get install curl)");
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        }
    };
    let out = curl(vec![format!("http://web.test:{}/hello", web.port())]).await;
    assert!(
        out.contains("200 OK") && out.contains("upstream saw GET /hello"),
        "{out}"
    );
    let out = curl(vec![
        "--cacert".into(),
        ca.to_str().unwrap().into(),
        format!("https://example.test:{}/", tls.addr.port()),
    ])
    .await;
    assert!(out.contains("hello over tls"), "{out}");
    let out = curl(vec!["https://blocked.test/".into()]).await;
    assert!(out.contains("403"), "{out}");
    let out = curl(vec!["http://blocked.test/".into()]).await;
    assert!(
        out.contains("x-paude-deny: not_allowed") && out.contains("--allow blocked.test"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_go_to_stdout_with_a_dash_and_logs_stay_on_stderr_as_json() {
    let deny = b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n";
    let proxy = start(&["--audit-log", "-", "--log-format", "json"], &[]);
    raw(proxy.addr, deny).await;
    let lines = proxy.wait_for_stdout_lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(line["reason"], "not_allowed");
    // The audit line is the record of the refusal; stderr does not repeat it.
    assert!(!proxy.stderr().contains("\"denied\""), "{}", proxy.stderr());

    // Without an audit log, refusals are logged on stderr, as JSON lines.
    let proxy = start(&["--log-format", "json"], &[]);
    raw(proxy.addr, deny).await;
    assert!(proxy.wait_for_stderr("\"denied\""), "{}", proxy.stderr());
    let log = proxy
        .stderr()
        .lines()
        .find(|l| l.contains("\"denied\""))
        .unwrap()
        .to_owned();
    let log: serde_json::Value = serde_json::from_str(&log).expect("json logs");
    assert_eq!(log["level"], "INFO");
    assert_eq!(log["fields"]["reason"], "not_allowed", "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_urls_in_absolute_form_are_refused_with_a_hint_to_use_connect() {
    let proxy = start(&["--allow", "all"], &[]);
    let out = raw(
        proxy.addr,
        b"GET https://github.com/ HTTP/1.1\r\nHost: github.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(header(&out, "x-paude-deny"), Some("unsupported_scheme"));
    assert!(out.contains("CONNECT"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_are_closed_after_the_idle_timeout() {
    let echo = echo_upstream().await;
    let target = format!("echo.test:{}", echo.port());
    let proxy = start(
        &[
            "--allow",
            &target,
            "--allow-opaque",
            "--idle-timeout",
            "300ms",
        ],
        &loopback_pin("echo.test"),
    );
    let mut s = connect(proxy.addr).await;
    send(&mut s, &connect_head(&target, "ping")).await;
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("the idle tunnel is closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).ends_with("ping"), "{out:?}");
    closed_by_the_flag(
        started.elapsed(),
        Duration::from_millis(300),
        DEFAULT_IDLE_TIMEOUT,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_new_clients_until_a_slot_frees() {
    let echo = echo_upstream().await;
    let target = format!("echo.test:{}", echo.port());
    let proxy = start(
        &[
            "--allow",
            &target,
            "--allow-opaque",
            "--max-connections",
            "1",
        ],
        &loopback_pin("echo.test"),
    );
    let mut first = connect(proxy.addr).await;
    send(&mut first, &connect_head(&target, "hold")).await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(T, first.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The tunnel holds the only slot: a second client is not served.
    let mut second = connect(proxy.addr).await;
    send(
        &mut second,
        b"GET http://nope.test/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf))
            .await
            .is_err(),
        "the second client must wait"
    );
    drop(first);
    let n = tokio::time::timeout(T, second.read(&mut buf))
        .await
        .expect("served once the slot frees")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 403"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_through_a_tunnel_arrive_intact_and_are_counted() {
    let echo = echo_upstream().await;
    let target = format!("echo.test:{}", echo.port());
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let proxy = start(
        &[
            "--allow",
            &target,
            "--allow-opaque",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
        &loopback_pin("echo.test"),
    );
    let mut s = connect(proxy.addr).await;
    send(&mut s, &connect_head(&target, "")).await;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(T, s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    tokio::time::timeout(T * 3, r.read_to_end(&mut back))
        .await
        .expect("echoed in time")
        .unwrap();
    tokio::time::timeout(T, writer).await.unwrap().unwrap();
    assert!(
        back == payload,
        "the echoed bytes differ from the sent bytes"
    );
    let lines = audit_lines(&audit, 1);
    assert_eq!(lines[0]["bytes_up"], payload.len() as u64, "{lines:?}");
    assert_eq!(lines[0]["bytes_down"], payload.len() as u64, "{lines:?}");
    assert_eq!(lines[0]["resolved"], format!("127.0.0.1:{}", echo.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_hold_only_their_two_sockets() {
    let echo = echo_upstream().await;
    let target = format!("echo.test:{}", echo.port());
    // One serving thread, so which thread a tunnel lands on, and when a thread builds its
    // runtime, cannot change what is counted.
    let proxy = start(
        &[
            "--allow",
            &target,
            "--allow-opaque",
            "--worker-threads",
            "1",
        ],
        &loopback_pin("echo.test"),
    );
    let open_tunnel = || async {
        let mut s = connect(proxy.addr).await;
        send(&mut s, &connect_head(&target, "ping")).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"ping") {
            let n = tokio::time::timeout(T, s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        s
    };
    // A first tunnel brings the serving thread to its steady state: runtime built, pipes of
    // both directions in its pool. What is counted from here on is what tunnels hold.
    let mut tunnels = vec![open_tunnel().await];
    let before = proxy.fds_by_kind();
    for _ in 0..20 {
        tunnels.push(open_tunnel().await);
    }
    let after = proxy.fds_by_kind();
    assert_eq!(
        after.sockets - before.sockets,
        40,
        "20 idle tunnels must hold exactly their 40 sockets: before {before:?}, after {after:?}"
    );
    // Pipes are borrowed only while bytes flow, so this thread's pool never holds more than
    // one pipe per direction of the tunnel that is moving bytes, whatever the tunnel count.
    assert!(
        after.pipes <= 4 && after.other == before.other,
        "idle tunnels must hold no pipe or other descriptor: before {before:?}, after {after:?}"
    );
    drop(tunnels);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_tunnels_hold_only_their_two_sockets() {
    let echo = echo_upstream().await;
    let target = format!("echo.test:{}", echo.port());
    let proxy = start(
        &[
            "--allow",
            &target,
            "--allow-opaque",
            "--worker-threads",
            "1",
        ],
        &loopback_pin("echo.test"),
    );
    let before = proxy.fds_by_kind();
    // Eight tunnels that stream both ways for as long as the test looks at the proxy: the
    // descriptors a tunnel costs must not grow while its bytes move.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut s = connect(proxy.addr).await;
        send(&mut s, &connect_head(&target, "ping")).await;
        let (mut reader, mut writer) = s.into_split();
        let stop_writing = stop.clone();
        let write = tokio::spawn(async move {
            let block = vec![0x42u8; 64 * 1024];
            while !stop_writing.load(std::sync::atomic::Ordering::Relaxed) {
                if tokio::time::timeout(T, writer.write_all(&block))
                    .await
                    .is_err()
                {
                    panic!("a busy tunnel stopped taking bytes");
                }
            }
            writer
        });
        let read = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match tokio::time::timeout(T, reader.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return total,
                    Ok(Ok(n)) => total += n as u64,
                }
            }
        });
        streams.push((write, read));
    }
    let mut busiest = before;
    for _ in 0..50 {
        let now = proxy.fds_by_kind();
        if now.pipes + now.other + now.sockets > busiest.pipes + busiest.other + busiest.sockets {
            busiest = now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (write, read) in streams {
        let writer = tokio::time::timeout(T, write).await.unwrap().unwrap();
        drop(writer);
        let echoed = tokio::time::timeout(T * 2, read).await.unwrap().unwrap();
        assert!(echoed > 0, "a busy tunnel echoed nothing");
    }
    assert!(
        busiest.sockets - before.sockets <= 16 && busiest.pipes == before.pipes && busiest.other == before.other,
        "8 busy tunnels must hold their 16 sockets and nothing else: before {before:?}, busiest {busiest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_map_style_symlink_swap_of_the_config_file_reloads_the_policy() {
    let web = http_upstream().await;
    let port = web.port();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let write_version = |name: &str, allow: &str| {
        let version = root.join(name);
        std::fs::create_dir(&version).unwrap();
        let toml = format!(
            "allow = ['{allow}:{port}']\nresolve = ['old.test=127.0.0.1', 'new.test=127.0.0.1']\nallow_cidr = ['127.0.0.0/8']\nwatch_interval = '200ms'\n"
        );
        std::fs::write(version.join("config.toml"), toml).unwrap();
    };
    // The layout kubelet gives a mounted ConfigMap: data in a versioned directory, `..data`
    // pointing at it, and the visible file a symlink through `..data`.
    write_version("..v1", "old.test");
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.toml", root.join("config.toml")).unwrap();
    let config = root.join("config.toml");
    let proxy = Proxy::start(&["--config", config.to_str().unwrap()]);
    let get = |host: &str| {
        format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    };
    assert!(raw(proxy.addr, get("old.test").as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(raw(proxy.addr, get("new.test").as_bytes())
        .await
        .starts_with("HTTP/1.1 403"));

    write_version("..v2", "new.test");
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    assert!(
        proxy.wait_for_stderr("policy reloaded (files changed)"),
        "{}",
        proxy.stderr()
    );
    assert!(raw(proxy.addr, get("new.test").as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(raw(proxy.addr, get("old.test").as_bytes())
        .await
        .starts_with("HTTP/1.1 403"));
}

/// Runs a git command with a bounded time and no user or system configuration.
async fn git(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    let out = tokio::time::timeout(
        T * 3,
        tokio::process::Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env_remove("GIT_SSL_CAINFO")
            .env_remove("GIT_SSL_CAPATH")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .output(),
    )
    .await
    .expect("git finishes")
    .expect("git is installed (apt-get install git)");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_over_https_through_the_proxy() {
    require::require(&[require::program("git", "git")]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let served = work.path().join("served");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&served).unwrap();
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr))
    };
    ok(git(&["init", "-q", "-b", "main"], &src).await);
    std::fs::write(src.join("README"), "through the proxy\n").unwrap();
    ok(git(&["add", "README"], &src).await);
    ok(git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "first",
        ],
        &src,
    )
    .await);
    ok(git(
        &["clone", "-q", "--bare", src.to_str().unwrap(), "repo.git"],
        &served,
    )
    .await);
    ok(git(&["update-server-info"], &served.join("repo.git")).await);

    let ca = test_ca();
    let ca_file = work.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let server = static_tls_upstream(served, ca.server.clone()).await;
    let allow = format!("git.test:{}", server.port());
    let proxy = start(&["--allow", &allow], &loopback_pin("git.test"));
    let url = format!("https://git.test:{}/repo.git", server.port());
    let out = git(
        &[
            "-c",
            &format!("http.proxy=http://{}", proxy.addr),
            "-c",
            &format!("http.sslCAInfo={}", ca_file.display()),
            "clone",
            "-q",
            &url,
            "clone",
        ],
        work.path(),
    )
    .await;
    ok(out);
    let readme = std::fs::read_to_string(work.path().join("clone/README")).unwrap();
    assert_eq!(readme, "through the proxy\n");

    // The same clone from a host the policy does not name is refused by the proxy.
    let denied = format!("https://elsewhere.test:{}/repo.git", server.port());
    let out = git(
        &[
            "-c",
            &format!("http.proxy=http://{}", proxy.addr),
            "clone",
            "-q",
            &denied,
            "no",
        ],
        work.path(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_downloads_from_an_index_through_the_proxy() {
    require::require(&[require::program("python3", "python3-pip")]);
    let pip = std::process::Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        pip,
        "pip is not installed for python3, and this test needs it: install with `apt-get install \
         -y python3-pip` (or run `bash .ci/run` as root, which installs everything the tests need \
         and runs them)"
    );
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    let pkg_dir = served.join("simple/tinypkg");
    std::fs::create_dir_all(&pkg_dir).unwrap();
    std::fs::create_dir_all(served.join("files")).unwrap();
    let wheel = "tinypkg-1.0-py3-none-any.whl";
    let make_wheel = r#"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("tinypkg/__init__.py", "")
    z.writestr("tinypkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
    z.writestr("tinypkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("tinypkg-1.0.dist-info/RECORD", "")
"#;
    let wheel_path = served.join("files").join(wheel);
    let status = std::process::Command::new("python3")
        .args(["-c", make_wheel, wheel_path.to_str().unwrap()])
        .status()
        .expect("python3 is installed (apt-get install python3-pip)");
    assert!(status.success());
    std::fs::write(
        pkg_dir.join("index.html"),
        format!(
            "<!DOCTYPE html><html><body><a href=\"/files/{wheel}\">{wheel}</a></body></html>\n"
        ),
    )
    .unwrap();

    let ca = test_ca();
    let ca_file = work.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let server = static_tls_upstream(served, ca.server.clone()).await;
    let allow = format!("pypi.test:{}", server.port());
    let proxy = start(&["--allow", &allow], &loopback_pin("pypi.test"));
    let out_dir = work.path().join("out");
    let index = format!("https://pypi.test:{}/simple/", server.port());
    let proxy_url = format!("http://{}", proxy.addr);
    let out = tokio::time::timeout(
        T * 6,
        tokio::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-cache-dir",
                "--disable-pip-version-check",
            ])
            .args([
                "--index-url",
                &index,
                "--proxy",
                &proxy_url,
                "--cert",
                ca_file.to_str().unwrap(),
            ])
            .args([
                "--retries",
                "0",
                "--timeout",
                "20",
                "-d",
                out_dir.to_str().unwrap(),
                "tinypkg",
            ])
            .env("PIP_CONFIG_FILE", "/dev/null")
            .env_remove("PIP_CERT")
            .env_remove("PIP_INDEX_URL")
            .env_remove("PIP_EXTRA_INDEX_URL")
            .env_remove("PIP_FIND_LINKS")
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output(),
    )
    .await
    .expect("pip finishes")
    .expect("python3 is installed (apt-get install python3-pip)");
    assert!(
        out.status.success(),
        "pip failed (is python3-pip installed?): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out_dir.join(wheel).exists(), "the wheel was downloaded");
}

/// A listener that never accepts, with its queue filled, so new connects to it hang. Returns
/// the listener, its address and the connections that fill its queue (keep both alive).
async fn blackhole() -> (
    socket2::Socket,
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // A loopback handshake completes inside connect(2) while the queue has room; once it is
    // full, the kernel drops the SYN and connect(2) waits. So the first connect that does not
    // return at once proves the queue full, however busy the machine is.
    let fillers = tokio::task::spawn_blocking(move || {
        let mut fillers = Vec::new();
        while let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            fillers.push(s);
            assert!(
                fillers.len() < 64,
                "the listen queue of {addr} never filled"
            );
        }
        fillers
    });
    let fillers = tokio::time::timeout(T, fillers).await.unwrap().unwrap();
    (socket, addr, fillers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_answer_the_connect_gets_504() {
    let (_socket, addr, fillers) = blackhole().await;
    let allow = format!("slow.test:{}", addr.port());
    let proxy = start(
        &["--allow", &allow, "--connect-timeout", "500ms"],
        &loopback_pin("slow.test"),
    );
    let started = std::time::Instant::now();
    let out = raw(
        proxy.addr,
        format!("CONNECT {allow} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("connect_timeout"),
        "{out}"
    );
    assert!(out.contains("--connect-timeout"), "{out}");
    closed_by_the_flag(
        started.elapsed(),
        Duration::from_millis(500),
        DEFAULT_CONNECT_TIMEOUT,
    );
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_open_tunnels_after_the_drain_period() {
    let echo = echo_upstream().await;
    let target = format!("echo.test:{}", echo.port());
    let mut proxy = start(
        &[
            "--allow",
            &target,
            "--allow-opaque",
            "--drain-timeout",
            "500ms",
        ],
        &loopback_pin("echo.test"),
    );
    let mut s = connect(proxy.addr).await;
    send(&mut s, &connect_head(&target, "ping")).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"ping") {
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let started = std::time::Instant::now();
    proxy.signal("TERM");
    // The open tunnel is closed once the drain period is over, and the process exits cleanly.
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest))
        .await
        .expect("the tunnel is closed")
        .ok();
    assert_eq!(proxy.wait_exit(), Some(0), "{}", proxy.stderr());
    closed_by_the_flag(
        started.elapsed(),
        Duration::from_millis(500),
        DEFAULT_DRAIN_TIMEOUT,
    );
    assert!(
        proxy.stderr().contains("drain period over"),
        "{}",
        proxy.stderr()
    );
}

/// paude-proxy embedded as a library: `cli`'s settings served with `server::run` on the caller's
/// runtime, on a listener the caller bound. Returns the address, the shutdown token and the task.
async fn embedded_proxy(
    cli: paude_proxy::config::Cli,
) -> (
    std::net::SocketAddr,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    use paude_proxy::{audit::Audit, config, dns::Dns, server};
    use std::sync::Arc;

    let loaded = config::load(&cli).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = loaded.settings.limits.clone();
    let dns = Dns::new(&[], limits.dns_timeout).unwrap();
    let core = Arc::new(server::Core::new(loaded.policy, limits, dns, vec![addr]));
    let state = Arc::new(server::State::new(core, Audit::default()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(server::run(listener, state, shutdown.clone()));
    (addr, shutdown, serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_serves_a_listener_the_caller_bound() {
    let (addr, shutdown, serving) = embedded_proxy(paude_proxy::config::Cli {
        allow: vec!["pypi".into()],
        ..Default::default()
    })
    .await;
    let out = raw(addr, b"CONNECT evil.test:443 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(header(&out, "x-paude-deny"), Some("not_allowed"), "{out}");
    shutdown.cancel();
    tokio::time::timeout(T, serving)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_after_a_plain_request_on_the_same_connection_is_tunnelled_too() {
    let web = http_upstream().await;
    let echo = echo_upstream().await;
    let web_allow = format!("web.test:{}", web.port());
    let echo_allow = format!("echo.test:{}", echo.port());
    let mut pins = loopback_pin("web.test");
    pins.extend(["--resolve".to_owned(), "echo.test=127.0.0.1".to_owned()]);
    let proxy = start(
        &[
            "--allow",
            &web_allow,
            "--allow",
            &echo_allow,
            "--allow-opaque",
        ],
        &pins,
    );
    let mut s = connect(proxy.addr).await;
    let get = format!("GET http://{web_allow}/first HTTP/1.1\r\nHost: web.test\r\n\r\n");
    send(&mut s, get.as_bytes()).await;
    let response = read_response(&mut s).await;
    assert!(response.contains("upstream saw GET /first"), "{response}");
    // The CONNECT and the first tunnel bytes in one write, on the kept-alive connection.
    send(
        &mut s,
        format!("CONNECT {echo_allow} HTTP/1.1\r\nHost: x\r\n\r\nping").as_bytes(),
    )
    .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"ping") {
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_can_be_set_and_zero_is_refused() {
    let proxy = start(&["--worker-threads", "1"], &[]);
    let out = raw(
        proxy.addr,
        b"CONNECT nope.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(header(&out, "x-paude-deny"), Some("not_allowed"), "{out}");
    // One serving thread does all the work (the main thread and the blocking pool aside).
    assert_eq!(proxy.serving_threads(), 1);
    let (code, _, err) = run_binary(&["--check", "--worker-threads", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--worker-threads must be at least 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_the_same_port_is_refused_and_the_first_serves_every_connection() {
    // Serving threads share the port with SO_REUSEPORT; that must not let a second process in.
    let first = start(&["--allow", "pypi", "--worker-threads", "4"], &[]);
    let listen = first.addr.to_string();
    let second = Proxy::try_start(&["--listen", &listen, "--allow", "pypi"]);
    let stderr = match second {
        Ok(_) => panic!("a second proxy started on {listen}"),
        Err(stderr) => stderr,
    };
    assert!(
        stderr.contains(&format!("cannot listen on {listen}")),
        "{stderr}"
    );
    // Connections are spread over the first proxy's four listeners; every one is answered.
    for _ in 0..32 {
        let out = raw(
            first.addr,
            b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
        )
        .await;
        assert_eq!(header(&out, "x-paude-deny"), Some("not_allowed"), "{out}");
    }
}

#[tokio::test]
async fn two_embedded_proxies_on_one_thread_never_share_an_upstream_pool() {
    // Pooled upstream clients are kept per thread; each must still belong to its own proxy, or
    // one proxy would dial through the other's address checks.
    let web = http_upstream().await;
    let target = format!("web.test:{}", web.port());
    let cli = |allow_cidr: Vec<String>| paude_proxy::config::Cli {
        allow: vec![target.clone()],
        allow_cidr,
        resolve: vec!["web.test=127.0.0.1".into()],
        ..Default::default()
    };
    // This test runs on a current-thread runtime: both proxies serve on this one thread.
    let (open, stop_open, _) = embedded_proxy(cli(vec!["127.0.0.0/8".into()])).await;
    let (guarded, stop_guarded, _) = embedded_proxy(cli(Vec::new())).await;
    let get =
        format!("GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    let out = raw(open, get.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = raw(guarded, get.as_bytes()).await;
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("loopback_address"),
        "{out}"
    );
    let out = raw(open, get.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    stop_open.cancel();
    stop_guarded.cancel();
}

/// Sends SIGHUP and waits until the proxy has refused `refused` reloads in all; true if it did.
fn hup_and_wait_for_refusal(proxy: &Proxy, refused: usize) -> bool {
    proxy.signal("HUP");
    let deadline = std::time::Instant::now() + T;
    loop {
        let seen = proxy
            .stderr()
            .matches("keeping the policy in force")
            .count();
        if seen >= refused || std::time::Instant::now() > deadline {
            return seen == refused;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CONNECT to `host:443` and the reason it was refused with. `pypi.org` is pinned to
/// loopback in these tests, so "allowed by the policy" shows as `loopback_address` without
/// anything being dialled, and "not on the allowlist" as `not_allowed`.
async fn refusal_reason(proxy: std::net::SocketAddr, host: &str) -> Option<String> {
    let out = raw(proxy, &connect_head(&format!("{host}:443"), "")).await;
    header(&out, "x-paude-deny").map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_comment_only_config_never_replaces_the_policy() {
    let dns = nxdomain_server().await.to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "allow = ['only.test']\n").unwrap();
    let config_arg = config.to_str().unwrap();
    let guard = [
        "--resolve",
        "pypi.org=127.0.0.1",
        "--dns-server",
        dns.as_str(),
    ];
    let mut args = vec!["--config", config_arg, "--watch-interval", "0"];
    args.extend(guard);
    let proxy = Proxy::start(&args);
    assert_eq!(
        refusal_reason(proxy.addr, "pypi.org").await.as_deref(),
        Some("not_allowed")
    );
    // What an editor or a non-atomic writer leaves for a moment, and files that state no
    // allowlist at all: none of them is a policy.
    let not_policies = [
        "",
        "\n\n   \n",
        "# allow = ['default']\n# written later\n",
        "allow = []\n",
        "header_timeout = '10s'\n",
    ];
    for (i, text) in not_policies.iter().enumerate() {
        std::fs::write(&config, text).unwrap();
        assert!(
            hup_and_wait_for_refusal(&proxy, i + 1),
            "{text:?} must be refused: {}",
            proxy.stderr()
        );
        assert_eq!(
            refusal_reason(proxy.addr, "pypi.org").await.as_deref(),
            Some("not_allowed"),
            "after {text:?} the old allowlist stays: {}",
            proxy.stderr()
        );
    }
    assert!(
        proxy.stderr().contains("allow = [\"default\"]"),
        "the error says what to write: {}",
        proxy.stderr()
    );

    // The watcher sees a truncated file the same way.
    std::fs::write(&config, "allow = ['only.test']\n").unwrap();
    let mut args = vec!["--config", config_arg, "--watch-interval", "100ms"];
    args.extend(guard);
    let watched = Proxy::start(&args);
    std::fs::write(&config, "").unwrap();
    assert!(
        watched.wait_for_stderr("reload failed (files changed)"),
        "{}",
        watched.stderr()
    );
    assert_eq!(
        refusal_reason(watched.addr, "pypi.org").await.as_deref(),
        Some("not_allowed")
    );

    // The start refuses the same files, saying what to write.
    for text in not_policies {
        std::fs::write(&config, text).unwrap();
        let (code, _, err) = run_binary(&["--check", "--config", config_arg]);
        assert_eq!(code, 2, "{text:?} must not start: {err}");
        assert!(
            err.contains("proxy.toml") && err.contains("allow = [\"default\"]"),
            "{text:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_that_allows_nothing_is_refused_and_the_old_policy_stays() {
    let dns = nxdomain_server().await.to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.txt");
    std::fs::write(&file, "# description: mine\npypi.org\n").unwrap();
    let policies = dir.path().to_str().unwrap();
    let proxy = Proxy::start(&[
        "--policies",
        policies,
        "--allow",
        "mine",
        "--watch-interval",
        "0",
        "--resolve",
        "pypi.org=127.0.0.1",
        "--dns-server",
        &dns,
    ]);
    assert_eq!(
        refusal_reason(proxy.addr, "pypi.org").await.as_deref(),
        Some("loopback_address"),
        "allowed by the policy, refused by the address guard"
    );
    let cycle = dir.path().join("loop.txt");
    let not_policies = [
        ("mine.txt", "".to_owned()),
        ("mine.txt", "# description: mine\n# pypi.org\n".to_owned()),
        // Groups that include each other and name no pattern compile to an empty allowlist.
        ("mine.txt", "# description: mine\n@loop\n".to_owned()),
    ];
    std::fs::write(&cycle, "# description: loop\n@mine\n").unwrap();
    for (i, (name, text)) in not_policies.iter().enumerate() {
        std::fs::write(dir.path().join(name), text).unwrap();
        assert!(
            hup_and_wait_for_refusal(&proxy, i + 1),
            "{text:?} must be refused: {}",
            proxy.stderr()
        );
        assert_eq!(
            refusal_reason(proxy.addr, "pypi.org").await.as_deref(),
            Some("loopback_address"),
            "after {text:?} the old policy stays"
        );
        let (code, _, err) = run_binary(&["--check", "--policies", policies, "--allow", "mine"]);
        assert_eq!(code, 2, "{text:?} must not start: {err}");
    }
    let (_, _, err) = run_binary(&["--check", "--policies", policies, "--allow", "mine"]);
    assert!(err.contains("allows nothing"), "{err}");
    std::fs::write(&file, "").unwrap();
    let (_, _, err) = run_binary(&["--check", "--policies", policies, "--allow", "mine"]);
    assert!(
        err.contains("mine.txt") && err.contains("one pattern per line"),
        "{err}"
    );
}

#[test]
fn check_with_install_as_puts_a_valid_config_in_place_in_one_rename() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let candidate = dir.path().join("candidate.toml");
    std::fs::write(&config, "allow = ['github']\n").unwrap();
    let install = |candidate: &std::path::Path| {
        run_binary(&[
            "--check",
            "--config",
            candidate.to_str().unwrap(),
            "--install-as",
            config.to_str().unwrap(),
        ])
    };
    // A candidate the proxy would refuse changes nothing.
    for bad in ["", "allow = ['*.com']\n"] {
        std::fs::write(&candidate, bad).unwrap();
        let (code, _, err) = install(&candidate);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            "allow = ['github']\n"
        );
        assert!(candidate.exists());
    }
    // A valid one replaces it by a rename: the file in force is the candidate's inode.
    std::fs::write(&candidate, "allow = ['pypi']\n").unwrap();
    let inode = std::fs::metadata(&candidate).unwrap().ino();
    let (code, out, err) = install(&candidate);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("installed"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "allow = ['pypi']\n"
    );
    assert_eq!(std::fs::metadata(&config).unwrap().ino(), inode);
    assert!(!candidate.exists());
    // Another directory would change what a relative policies path means.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = elsewhere.path().join("c.toml");
    std::fs::write(&other, "allow = ['pypi']\n").unwrap();
    let (code, _, err) = install(&other);
    assert_eq!(code, 2);
    assert!(
        err.contains("must name a file in the directory of --config"),
        "{err}"
    );
    let (code, _, err) = run_binary(&["--install-as", config.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("--check") && err.contains("--config"), "{err}");
}

/// A port that was free a moment ago, so a test can name it in flags before the proxy binds it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_form_of_the_proxy_s_own_address_is_dialled_whatever_allow_cidr_says() {
    // A DNS server that answers 0.0.0.0, as a rebinding attacker's would.
    let dns = dns_server(Some(std::net::Ipv4Addr::UNSPECIFIED))
        .await
        .to_string();
    for listen_ip in ["127.0.0.1", "0.0.0.0", "[::]"] {
        let (port, admin_port) = (free_port(), free_port());
        let listen = format!("{listen_ip}:{port}");
        let admin = format!("127.0.0.1:{admin_port}");
        // Every way of writing "this host" a pin, a literal or a DNS answer can give.
        let forms = [
            "0.0.0.0",
            "127.0.0.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
        ];
        let mut flags: Vec<String> = [
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--allow-cidr",
            "0.0.0.0/0",
            "--allow-cidr",
            "::/0",
            "--allow-client",
            "127.0.0.0/8",
            "--allow-client",
            "::1/128",
            "--dns-server",
            &dns,
        ]
        .map(str::to_owned)
        .to_vec();
        for p in [port, admin_port] {
            flags.extend(["--allow".to_owned(), format!(".self.test:{p}")]);
            flags.extend(["--allow".to_owned(), format!("dns.test:{p}")]);
            for ip in forms {
                let literal = if ip.contains(':') {
                    format!("[{ip}]:{p}")
                } else {
                    format!("{ip}:{p}")
                };
                flags.extend(["--allow".to_owned(), literal]);
            }
        }
        for (i, ip) in forms.iter().enumerate() {
            flags.extend(["--resolve".to_owned(), format!("h{i}.self.test={ip}")]);
        }
        let proxy = Proxy::start(&flags.iter().map(String::as_str).collect::<Vec<_>>());
        for p in [port, admin_port] {
            let mut targets: Vec<String> = (0..forms.len())
                .map(|i| format!("h{i}.self.test:{p}"))
                .collect();
            targets.push(format!("dns.test:{p}"));
            for ip in forms {
                targets.push(if ip.contains(':') {
                    format!("[{ip}]:{p}")
                } else {
                    format!("{ip}:{p}")
                });
            }
            for target in &targets {
                let out = raw(proxy.addr, &connect_head(target, "")).await;
                assert_eq!(
                    header(&out, "x-paude-deny"),
                    Some("proxy_address"),
                    "listening on {listen}: CONNECT {target} must be refused: {out}"
                );
                let get = format!(
                    "GET http://{target}/policy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                );
                let out = raw(proxy.addr, get.as_bytes()).await;
                assert_eq!(
                    header(&out, "x-paude-deny"),
                    Some("proxy_address"),
                    "listening on {listen}: GET http://{target}/policy must be refused: {out}"
                );
            }
        }
    }
}

/// Sends `count` pipelined plain-HTTP requests to a host nobody allowed over one connection
/// and reads the answers as they come; returns how many 403s arrived. The host name is as long
/// as a name may be, so each refusal leaves an audit line of about 500 bytes.
async fn refusal_flood(proxy: std::net::SocketAddr, count: usize) -> usize {
    let stream = connect(proxy).await;
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let host = [
            "a".repeat(61),
            "b".repeat(61),
            "c".repeat(61),
            "flood.test".into(),
        ]
        .join(".");
        let one = format!("GET http://{host}/ HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
        for _ in 0..count / 100 {
            write.write_all(&batch).await.unwrap();
        }
        write
    });
    let needle = b"HTTP/1.1 403";
    let (mut seen, mut carry) = (0usize, Vec::new());
    let mut buf = vec![0u8; 64 * 1024];
    let work = async {
        while seen < count / 100 * 100 {
            let n = read.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed the flood after {seen} answers");
            carry.extend_from_slice(&buf[..n]);
            seen += carry.windows(needle.len()).filter(|w| w == needle).count();
            let keep = carry.len().saturating_sub(needle.len() - 1);
            carry.drain(..keep);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("the flood is answered");
    drop(writer.await.unwrap());
    seen
}

/// The value of a metric line `name` in the admin listener's exposition.
async fn metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = admin_get(admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_audit_sink_keeps_memory_bounded_and_counts_what_it_drops() {
    let proxy = Proxy::start_with_stalled_stdout(&[
        "--audit-log",
        "-",
        "--admin-listen",
        "127.0.0.1:0",
        "--worker-threads",
        "2",
    ]);
    let admin = proxy.admin.unwrap();
    // Fill the pipe and the proxy's buffers once (about 3 MB of lines, more than the pipe and
    // the audit buffer hold), so what follows measures only growth.
    assert_eq!(refusal_flood(proxy.addr, 6_400).await, 6_400);
    let before = proxy.rss_kib();
    let flood = 16_000;
    let answered = refusal_floods(proxy.addr, 4, flood / 4).await;
    assert_eq!(answered, flood, "every refusal is answered");
    let after = proxy.rss_kib();
    // 16,000 more audit lines are about 7.5 MiB: held in memory they would show here.
    assert!(
        after.saturating_sub(before) < 3 * 1024,
        "RSS grew from {before} KiB to {after} KiB while the audit sink was stalled"
    );
    let denied = metric(
        admin,
        "paude_decisions_total{decision=\"deny\",reason=\"not_allowed\"}",
    )
    .await;
    assert_eq!(denied, Some(22_400.0), "every refusal is counted");
    let dropped = metric(admin, "paude_audit_dropped_total")
        .await
        .unwrap_or(0.0);
    assert!(
        dropped > 10_000.0,
        "lines the sink could not take are counted: {dropped}"
    );
    assert!(
        proxy.wait_for_stderr("audit log is not keeping up"),
        "a dropped line is never silent: {}",
        proxy.stderr()
    );
}

/// Runs `connections` refusal floods of `each` requests at once; returns the answers seen.
async fn refusal_floods(proxy: std::net::SocketAddr, connections: usize, each: usize) -> usize {
    let floods: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(refusal_flood(proxy, each)))
        .collect();
    let mut total = 0;
    for flood in floods {
        total += flood.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_drain_timeout_while_the_audit_sink_is_stalled() {
    let mut proxy =
        Proxy::start_with_stalled_stdout(&["--audit-log", "-", "--drain-timeout", "1s"]);
    // Far more lines than the stdout pipe holds.
    assert_eq!(refusal_flood(proxy.addr, 5_000).await, 5_000);
    proxy.signal("TERM");
    assert_eq!(
        proxy.wait_exit_within(Duration::from_secs(1 + 5)),
        Some(0),
        "SIGTERM must stop the proxy within --drain-timeout plus a margin: {}",
        proxy.stderr()
    );
    assert!(
        proxy.stderr().contains("audit"),
        "the lines left unwritten are reported: {}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_retires_pooled_upstream_connections() {
    let web = http_upstream().await;
    let port = web.port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    let write = |cidrs: &str| {
        let toml = format!(
            "allow = ['web.test:{port}']\nresolve = ['web.test=127.0.0.1']\nallow_cidr = [{cidrs}]\n"
        );
        std::fs::write(&config, toml).unwrap();
    };
    write("'127.0.0.0/8'");
    // One serving thread, so every request meets the same pool.
    let proxy = Proxy::start(&[
        "--config",
        config.to_str().unwrap(),
        "--watch-interval",
        "0",
        "--worker-threads",
        "1",
    ]);
    let get = format!("GET http://web.test:{port}/ HTTP/1.1\r\nHost: web.test\r\n\r\n");
    let mut kept = connect(proxy.addr).await;
    send(&mut kept, get.as_bytes()).await;
    let out = read_response(&mut kept).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    // The reload removes the range the pooled upstream connection lives in.
    write("");
    proxy.signal("HUP");
    assert!(
        proxy.wait_for_stderr("policy reloaded (SIGHUP)"),
        "{}",
        proxy.stderr()
    );
    send(&mut kept, get.as_bytes()).await;
    let out = read_response(&mut kept).await;
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("loopback_address"),
        "the same client connection must not reuse the pooled upstream: {out}"
    );
    let mut fresh = connect(proxy.addr).await;
    send(&mut fresh, get.as_bytes()).await;
    let out = read_response(&mut fresh).await;
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("loopback_address"),
        "a new client connection must not reuse it either: {out}"
    );
}

/// Opens a tunnel to `target` with `hello` pipelined behind the CONNECT head; returns what came
/// back after the `200`: the echoed hello if the tunnel carried it, nothing if the proxy closed
/// it (as text, which is all the comparison needs).
async fn tunnel_echo(proxy: std::net::SocketAddr, target: &str, hello: &[u8]) -> String {
    let mut s = connect(proxy).await;
    let mut first = connect_head(target, "");
    first.extend_from_slice(hello);
    send(&mut s, &first).await;
    let out = read_until_end(&mut s, hello).await;
    let established = "HTTP/1.1 200 OK\r\n\r\n";
    assert!(out.starts_with(established), "{out:?}");
    out[established.len()..].to_owned()
}

/// An `encrypted_client_hello` extension as a ClientHelloOuter carries it (RFC 9849): real ECH
/// and the GREASE ECH Chromium sends look the same on the wire.
const ECH: (u16, &[u8]) = (
    0xfe0d,
    &[
        0, 0, 1, 0, 1, 0x2a, 0, 4, 1, 2, 3, 4, 0, 8, 9, 9, 9, 9, 9, 9, 9, 9,
    ],
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_whose_client_hello_does_not_name_the_connect_host_are_closed() {
    let echo = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let named = format!("echo.test:{}", echo.port());
    let literal = format!("127.0.0.1:{}", echo.port());
    let proxy = start(
        &[
            "--allow",
            &named,
            "--allow",
            &literal,
            "--audit-log",
            audit.to_str().unwrap(),
        ],
        &loopback_pin("echo.test"),
    );
    let with_sni = rustls_client_hello("echo.test", true);
    let without_sni = rustls_client_hello("echo.test", false);
    let ip_sni = handmade_client_hello(Some("127.0.0.1"), &[]);
    let handmade = handmade_client_hello(Some("echo.test"), &[]);
    let ech = handmade_client_hello(Some("echo.test"), &[ECH]);
    let cases: [(&str, &str, &[u8], Option<&str>); 7] = [
        ("a hello naming the host", &named, &with_sni, None),
        ("a handmade hello naming it", &named, &handmade, None),
        (
            "a hello without SNI",
            &named,
            &without_sni,
            Some("sni_missing"),
        ),
        ("an IP-literal SNI", &named, &ip_sni, Some("sni_mismatch")),
        (
            "an encrypted ClientHello",
            &named,
            &ech,
            Some("encrypted_client_hello"),
        ),
        // An IP destination is named by the CONNECT itself; clients send no SNI for it.
        ("no SNI to an IP literal", &literal, &without_sni, None),
        ("the same IP as SNI", &literal, &ip_sni, None),
    ];
    for (what, target, hello, refused) in cases {
        let back = tunnel_echo(proxy.addr, target, hello).await;
        match refused {
            None => assert_eq!(back, String::from_utf8_lossy(hello), "{what} must pass"),
            Some(_) => assert!(back.is_empty(), "{what} must not reach the upstream"),
        }
    }
    // Tunnels finish in any order; compare what was recorded as a sorted list.
    let lines = audit_lines(&audit, cases.len());
    let mut recorded: Vec<String> = lines
        .iter()
        .map(|l| format!("{} sni={} {}", l["host"], l["sni"], l["reason"]))
        .collect();
    recorded.sort();
    let mut expected = vec![
        r#""echo.test" sni="echo.test" "allowed""#,
        r#""echo.test" sni="echo.test" "allowed""#,
        r#""echo.test" sni=null "sni_missing""#,
        r#""echo.test" sni="127.0.0.1" "sni_mismatch""#,
        r#""echo.test" sni="echo.test" "encrypted_client_hello""#,
        r#""127.0.0.1" sni=null "allowed""#,
        r#""127.0.0.1" sni="127.0.0.1" "allowed""#,
    ];
    expected.sort();
    assert_eq!(recorded, expected);

    // Each refusal has its opt-out, for clients that need one.
    let open = start(
        &["--allow", &named, "--allow-no-sni", "--allow-ech"],
        &loopback_pin("echo.test"),
    );
    assert_eq!(
        tunnel_echo(open.addr, &named, &without_sni).await,
        String::from_utf8_lossy(&without_sni)
    );
    assert_eq!(
        tunnel_echo(open.addr, &named, &ech).await,
        String::from_utf8_lossy(&ech)
    );
    assert!(
        tunnel_echo(open.addr, &named, &ip_sni).await.is_empty(),
        "a name that differs is refused whatever the flags"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let web = http_upstream().await;
    let allow = format!("web.test:{}", web.port());
    let proxy = start(&["--allow", &allow], &loopback_pin("web.test"));
    let requests = [
        (
            format!(
                "GET http://web.test:{}/half HTTP/1.1\r\nHost: web.test\r\n\r\n",
                web.port()
            ),
            "HTTP/1.1 200",
        ),
        (
            "GET http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n\r\n".to_owned(),
            "HTTP/1.1 403",
        ),
        (
            "CONNECT nope.test:443 HTTP/1.1\r\nHost: nope.test\r\n\r\n".to_owned(),
            "HTTP/1.1 403",
        ),
    ];
    for (request, status) in requests {
        // As `nc -q` and `printf ... | nc` do: the whole request, then shutdown(SHUT_WR).
        let mut s = connect(proxy.addr).await;
        send(&mut s, request.as_bytes()).await;
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with(status), "{request:?} got {out:?}");
    }
}

/// Sends `request` the way `nc` and `sendall`-then-`recv` scripts do: all of it first, in
/// chunks as a network delivers them, giving up at the first failed write (the answer is never
/// read then), then reads the answer. Blocking I/O with timeouts, on a blocking thread.
async fn send_all_then_read(proxy: std::net::SocketAddr, request: Vec<u8>) -> String {
    let work = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
        for chunk in request.chunks(16 * 1024) {
            if let Err(e) = s.write_all(chunk) {
                return format!("the request could not be sent: {e}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => String::from_utf8_lossy(&out).into_owned(),
            Err(e) => format!("the answer could not be read: {e}"),
        }
    });
    tokio::time::timeout(T * 2, work).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_oversized_and_malformed_heads_arrive_while_the_client_is_still_sending() {
    let proxy = start(&[], &[]);
    let filler: String = (0..200 * 1024 / 20)
        .map(|i| format!("X-Fill-{i:06}: aaaaa\r\n"))
        .collect();
    let cases = [
        (
            format!("GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n{filler}\r\n"),
            "HTTP/1.1 431",
        ),
        (
            format!("CONNECT web.test:443 HTTP/1.1\r\nHost: web.test\r\n{filler}\r\n"),
            "HTTP/1.1 431",
        ),
        (
            format!("GET http://web.test/ HTTP/1.1\r\nno colon here\r\n{filler}\r\n"),
            "HTTP/1.1 400",
        ),
        (
            format!("CONNECT web.test:443 HTTP/1.1\r\nno colon here\r\n{filler}\r\n"),
            "HTTP/1.1 400",
        ),
    ];
    // The four cases run side by side, each tried 20 times in a row.
    let tries: Vec<_> = cases
        .into_iter()
        .map(|(request, status)| {
            let proxy = proxy.addr;
            tokio::spawn(async move {
                assert!(request.len() > 200 * 1024);
                let what = request[..request.find('\r').unwrap()].to_owned();
                let mut failed = 0;
                let mut first = None;
                for _ in 0..20 {
                    let out = send_all_then_read(proxy, request.clone().into_bytes()).await;
                    if !out.starts_with(status) {
                        failed += 1;
                        first.get_or_insert(out[..out.len().min(80)].to_owned());
                    }
                }
                (failed > 0)
                    .then(|| format!("{what}: {failed} of 20 did not get {status}, e.g. {first:?}"))
            })
        })
        .collect();
    let mut failures = Vec::new();
    for case in tries {
        failures.extend(case.await.unwrap());
    }
    assert!(failures.is_empty(), "200 KB heads: {failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_body_cannot_hold_a_connection_slot_forever() {
    let web = body_reading_upstream().await;
    let allow = format!("web.test:{}", web.port());
    let proxy = start(
        &[
            "--allow",
            &allow,
            "--max-connections",
            "1",
            "--body-timeout",
            "1s",
        ],
        &loopback_pin("web.test"),
    );
    // A body announced as 1,000 bytes, sent one byte every 100 ms.
    let mut slow = connect(proxy.addr).await;
    let head = format!(
        "POST http://web.test:{}/upload HTTP/1.1\r\nHost: web.test\r\nContent-Length: 1000\r\n\r\n",
        web.port()
    );
    send(&mut slow, head.as_bytes()).await;
    let trickle = tokio::spawn(async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        for _ in 0..1000 {
            if slow.write_all(b"x").await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    });
    // The only slot is held by the trickle until the body timeout cuts it off.
    let mut next = connect(proxy.addr).await;
    let get = format!(
        "POST http://web.test:{}/next HTTP/1.1\r\nHost: web.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        web.port()
    );
    send(&mut next, get.as_bytes()).await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(1 + 5), next.read_to_end(&mut out))
        .await
        .expect("the next client is served within the body timeout plus a margin")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("got 2 bytes"),
        "{out}"
    );
    let answer = tokio::time::timeout(T, trickle).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    // A body that keeps coming (1 KiB every 300 ms) may take longer than the base time: each
    // KiB earns a second.
    post_steadily(proxy.addr, web, 6).await;
    assert_eq!(
        header(&answer, "x-paude-deny"),
        Some("body_timeout"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_closes_connections_that_send_nothing() {
    let proxy = start(
        &["--admin-listen", "127.0.0.1:0", "--header-timeout", "500ms"],
        &[],
    );
    let admin = proxy.admin.unwrap();
    let mut silent = connect(admin).await;
    let mut partial = connect(admin).await;
    send(&mut partial, b"GET /metrics HTTP/1.1\r\nHost: a").await;
    for s in [&mut silent, &mut partial] {
        let mut out = Vec::new();
        tokio::time::timeout(
            Duration::from_millis(500) + Duration::from_secs(5),
            s.read_to_end(&mut out),
        )
        .await
        .expect("closed within the header timeout plus a margin")
        .ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_to_an_upstream_that_never_answers_gets_504_and_frees_its_slot() {
    // An upstream that accepts and reads, and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = silent.accept().await {
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                std::future::pending::<()>().await;
            });
        }
    });
    let web = body_reading_upstream().await;
    let (silent_allow, web_allow) = (
        format!("silent.test:{silent_port}"),
        format!("web.test:{}", web.port()),
    );
    let mut pins = loopback_pin("silent.test");
    pins.extend(loopback_pin("web.test"));
    let proxy = start(
        &[
            "--allow",
            &silent_allow,
            "--allow",
            &web_allow,
            "--max-connections",
            "1",
            "--idle-timeout",
            "1s",
        ],
        &pins,
    );

    // The only slot: answered 504 once nothing moved for the idle timeout.
    let mut waiting = connect(proxy.addr).await;
    let get = format!(
        "GET http://silent.test:{silent_port}/ HTTP/1.1\r\nHost: silent.test\r\nConnection: close\r\n\r\n"
    );
    let started = std::time::Instant::now();
    send(&mut waiting, get.as_bytes()).await;
    let mut out = Vec::new();
    tokio::time::timeout(T, waiting.read_to_end(&mut out))
        .await
        .expect("a request to a silent upstream is answered")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert_eq!(
        header(&out, "x-paude-deny"),
        Some("response_timeout"),
        "{out}"
    );
    assert!(out.contains("--idle-timeout"), "{out}");
    closed_by_the_flag(
        started.elapsed(),
        Duration::from_secs(1),
        DEFAULT_IDLE_TIMEOUT,
    );

    // A body that keeps moving (1 KiB every 300 ms, 2.4 s in all) is not cut by the 1 s idle
    // timeout, and the slot is free for it.
    post_steadily(proxy.addr, web, 8).await;
}

/// POSTs `kib` KiB to `web.test` at `web` through `proxy`, 1 KiB every 300 ms, and checks the
/// body-reading upstream got all of it.
async fn post_steadily(proxy: std::net::SocketAddr, web: std::net::SocketAddr, kib: usize) {
    let mut steady = connect(proxy).await;
    let head = format!(
        "POST http://web.test:{}/steady HTTP/1.1\r\nHost: web.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        web.port(),
        kib * 1024
    );
    send(&mut steady, head.as_bytes()).await;
    for _ in 0..kib {
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(&mut steady, &[b'y'; 1024]).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(T, steady.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let want = format!("got {} bytes", kib * 1024);
    assert!(out.ends_with(&want), "{out}");
}
