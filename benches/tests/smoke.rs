//! The benchmark's smoke mode, run as a test: every scenario on every path for a moment.
//!
//! It starts the real `paude-benches` binary, which starts the real peers (paude-proxy from this
//! workspace, squid, tinyproxy) and the upstream servers (the echo servers, nginx, the event
//! stream) on 127.0.0.1, and checks the harness produced sane, non-zero results for each. It
//! never asserts on speed.

use std::path::PathBuf;
use std::time::Duration;

#[path = "../../tests/require.rs"]
mod require;

/// The paude-proxy binary `cargo test --workspace` builds next to this test's directory.
fn paude_proxy_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test runs from target/<profile>/deps");
    let bin = profile_dir.join("paude-proxy");
    assert!(
        bin.is_file(),
        "paude-proxy binary not found at {}; build it with `cargo build -p paude-proxy` \
         (`cargo test --workspace` builds it)",
        bin.display()
    );
    bin
}

const PEERS: &str = "direct,bare-relay,paude-proxy,squid,tinyproxy";

#[tokio::test]
async fn smoke_mode_measures_every_scenario_on_every_path() {
    require::require(&[
        require::program("squid", "squid"),
        require::program("tinyproxy", "tinyproxy"),
        require::program("unshare", "util-linux"),
    ]);
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_paude-benches"));
    command
        .args(["smoke", "--peers", PEERS, "--paude-bin"])
        .arg(paude_proxy_bin())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the smoke run finished within 120 s")
        .expect("paude-benches ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "smoke run failed:\n{stderr}\n{stdout}"
    );

    // The report has one column per path and a number in every cell of the rows every path
    // takes part in: the tunnel rate and each scenario of the traffic agents make.
    let header = stdout
        .lines()
        .find(|l| l.starts_with("| metric | direct |"))
        .expect("results table header");
    for peer in PEERS.split(',') {
        assert!(header.contains(peer), "no column for {peer}: {header}");
    }
    for metric in [
        "tunnels/s, concurrency 1 |",
        "HTTPS download GiB/s, 1 stream |",
        "HTTPS download GiB/s, 2 streams |",
        "HTTPS API req/s, 2 keep-alive tunnels |",
        "event stream: first event p50 µs (from connect), 2 streams |",
        "event stream: delay per event p50 µs, one every 2 ms |",
        "full-duplex GiB/s echoed, 1 tunnel, 8 KiB upstream buffer |",
        "plain HTTP download GiB/s, 1 stream |",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {metric}")))
            .unwrap_or_else(|| panic!("no row {metric:?} in:\n{stdout}"));
        let cells: Vec<f64> = row
            .split('|')
            .skip(2)
            .filter(|c| !c.trim().is_empty())
            .map(|c| {
                c.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("non-numeric cell in {row}"))
            })
            .collect();
        assert_eq!(cells.len(), PEERS.split(',').count(), "{row}");
        assert!(cells.iter().all(|v| *v > 0.0), "{row}");
    }

    // CPU time was metered on every path: the machine was busy during each measurement.
    for metric in [
        "machine busy, concurrency 16 |",
        "machine busy, HTTPS download, 1 stream |",
        "machine busy, HTTPS API requests |",
        "machine busy, event streams |",
        "machine busy, full-duplex, 1 tunnel |",
        "machine busy, plain HTTP download |",
    ] {
        let busy = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {metric}")))
            .unwrap_or_else(|| panic!("no row {metric:?} in the CPU table:\n{stdout}"));
        let cells: Vec<&str> = busy.split('|').skip(2).map(str::trim).collect();
        assert!(
            cells
                .iter()
                .take(PEERS.split(',').count())
                .all(|c| c.ends_with('%')),
            "{busy}"
        );
    }
}
