//! Turns a run's samples into the summary table, the ratios, the targets and `RESULTS.md`.
//!
//! The report is plain Markdown so the same text is printed and committed. A hand-written
//! analysis below the marker line of an existing `RESULTS.md` is kept when the file is rewritten.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::driver::Results;
use crate::peers::PeerKind;
use crate::scenarios::Sample;

/// Everything below this line in `RESULTS.md` is written by hand and survives a rerun.
pub const ANALYSIS_MARKER: &str =
    "<!-- analysis: written by hand, kept when the benchmark rewrites this file -->";

/// One row of the summary: a metric's value on each peer.
struct Row {
    metric: String,
    values: BTreeMap<PeerKind, f64>,
    /// True when more is better (rates), false when less is better (latency, memory).
    higher_is_better: bool,
    decimals: usize,
}

fn rows(results: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut add =
        |metric: String, higher: bool, decimals: usize, values: BTreeMap<PeerKind, f64>| {
            rows.push(Row {
                metric,
                values,
                higher_is_better: higher,
                decimals,
            });
        };
    let each = |map: &BTreeMap<PeerKind, Sample>, f: &dyn Fn(&Sample) -> Option<f64>| {
        map.iter()
            .filter_map(|(k, s)| f(s).map(|v| (*k, v)))
            .collect::<BTreeMap<_, _>>()
    };
    for &c in &results.plan.tunnel_concurrency {
        let at: BTreeMap<PeerKind, Sample> = results
            .tunnel
            .iter()
            .filter(|((cc, _), _)| *cc == c)
            .map(|((_, k), s)| (*k, s.clone()))
            .collect();
        add(
            format!("tunnels/s, concurrency {c}"),
            true,
            0,
            each(&at, &|s| Some(s.ops_per_sec())),
        );
        add(
            format!("setup p50 µs, concurrency {c}"),
            false,
            0,
            each(&at, &|s| s.quantile_us(0.5)),
        );
        add(
            format!("setup p99 µs, concurrency {c}"),
            false,
            0,
            each(&at, &|s| s.quantile_us(0.99)),
        );
    }
    for &n in &results.plan.bulk_tunnels {
        add(
            format!("bulk GiB/s echoed, {}", tunnels(n)),
            true,
            3,
            each(&at_owned(&results.bulk, n), &|s| Some(s.gib_per_sec())),
        );
    }
    let c = results.plan.http_concurrency;
    add(
        format!("HTTP GET req/s, concurrency {c}"),
        true,
        0,
        each(&results.http, &|s| Some(s.ops_per_sec())),
    );
    add(
        format!("HTTP GET p99 µs, concurrency {c}"),
        false,
        0,
        each(&results.http, &|s| s.quantile_us(0.99)),
    );
    add(
        format!(
            "refused CONNECTs/s, concurrency {}",
            results.plan.deny_concurrency
        ),
        true,
        0,
        each(&results.deny, &|s| Some(s.ops_per_sec())),
    );
    let fc = results.plan.flood_concurrency;
    add(
        format!("tunnels/s c={fc}, no flood"),
        true,
        0,
        each(&results.flood_baseline, &|s| Some(s.ops_per_sec())),
    );
    add(
        format!(
            "tunnels/s c={fc}, {}/s denial flood",
            results.plan.flood_per_sec
        ),
        true,
        0,
        each(&results.flood_allowed, &|s| Some(s.ops_per_sec())),
    );
    add(
        "denials/s the flood achieved".into(),
        true,
        0,
        each(&results.flood_denied, &|s| Some(s.ops_per_sec())),
    );
    for &n in &results.plan.https_streams {
        add(
            format!("HTTPS download GiB/s, {}", streams(n)),
            true,
            3,
            each(&at_owned(&results.https, n), &|s| Some(s.gib_per_sec())),
        );
    }
    let c = results.plan.api_concurrency;
    add(
        format!("HTTPS API req/s, {c} keep-alive tunnels"),
        true,
        0,
        each(&results.api, &|s| Some(s.ops_per_sec())),
    );
    add(
        format!("HTTPS API p50 µs, {c} keep-alive tunnels"),
        false,
        0,
        each(&results.api, &|s| s.quantile_us(0.5)),
    );
    add(
        format!("HTTPS API p99 µs, {c} keep-alive tunnels"),
        false,
        0,
        each(&results.api, &|s| s.quantile_us(0.99)),
    );
    let every = results.plan.event_interval.as_millis();
    add(
        format!(
            "event stream: first event p50 µs (from connect), {}",
            streams(results.plan.event_streams)
        ),
        false,
        0,
        each(&results.event_connections, &|s| s.quantile_us(0.5)),
    );
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        add(
            format!("event stream: delay per event {name} µs, one every {every} ms"),
            false,
            0,
            each(&results.events, &|s| s.quantile_us(q)),
        );
    }
    for &n in &results.plan.duplex_tunnels {
        add(
            format!(
                "full-duplex GiB/s echoed, {}, 8 KiB upstream buffer",
                tunnels(n)
            ),
            true,
            3,
            each(&at_owned(&results.duplex, n), &|s| Some(s.gib_per_sec())),
        );
    }
    add(
        format!(
            "plain HTTP download GiB/s, {}",
            streams(results.plan.http_download_streams)
        ),
        true,
        3,
        each(&results.http_download, &|s| Some(s.gib_per_sec())),
    );
    let idle: BTreeMap<PeerKind, f64> = results
        .idle
        .iter()
        .filter_map(|(k, s)| s.kib_per_tunnel().map(|v| (*k, v)))
        .collect();
    add(
        format!(
            "RSS KiB per idle tunnel ({} open)",
            results.plan.idle_tunnels
        ),
        false,
        2,
        idle,
    );
    rows
}

fn tunnels(n: usize) -> String {
    match n {
        1 => "1 tunnel".into(),
        n => format!("{n} tunnels"),
    }
}

fn streams(n: usize) -> String {
    match n {
        1 => "1 stream".into(),
        n => format!("{n} streams"),
    }
}

/// Each peer's sample at scenario parameter `param`, as a map of its own.
fn at_owned(
    samples: &BTreeMap<(usize, PeerKind), Sample>,
    param: usize,
) -> BTreeMap<PeerKind, Sample> {
    at(samples, param)
        .into_iter()
        .map(|(k, s)| (k, s.clone()))
        .collect()
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "—".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

/// A target from the issue, evaluated on this run.
pub struct Target {
    pub name: &'static str,
    pub measured: String,
    pub required: &'static str,
    pub met: Option<bool>,
}

/// Evaluates the targets; a target whose inputs are missing is neither met nor missed.
pub fn targets(results: &Results) -> Vec<Target> {
    use PeerKind::*;
    let tunnel = |c: usize, k: PeerKind| results.tunnel.get(&(c, k));
    let rate = |c: usize, k: PeerKind| tunnel(c, k).map(|s| s.ops_per_sec());
    let p50 = |k: PeerKind| tunnel(1, k).and_then(|s| s.quantile_us(0.5));
    let mut out = Vec::new();

    // The bare relay is the floor under any proxy on this machine: shown beside each target
    // it bears on, so a run shows whether a miss is paude-proxy's or the machine's.
    let floor = |value: Option<f64>, text: &dyn Fn(f64) -> String| {
        value
            .map(|v| format!("; bare relay: {}", text(v)))
            .unwrap_or_default()
    };
    let r = rate(16, Paude).zip(rate(16, Squid)).map(|(p, s)| p / s);
    let relay = rate(16, BareRelay).zip(rate(16, Squid)).map(|(b, s)| b / s);
    out.push(Target {
        name: "tunnel rate at concurrency 16 vs squid",
        measured: r
            .map(|r| format!("{r:.2}× squid{}", floor(relay, &|b| format!("{b:.2}×"))))
            .unwrap_or("—".into()),
        required: "≥ 2.5× squid",
        met: r.map(|r| r >= 2.5),
    });

    let added = p50(Paude)
        .zip(p50(Squid))
        .zip(p50(Direct))
        .map(|((p, s), d)| (p - d, s - d));
    let relay = p50(BareRelay)
        .zip(p50(Squid))
        .zip(p50(Direct))
        .map(|((b, s), d)| (b - d) / (s - d));
    out.push(Target {
        name: "added p50 setup latency at concurrency 1",
        measured: added
            .map(|(p, s)| {
                format!(
                    "+{p:.0} µs vs squid's +{s:.0} µs ({:.2} of it{})",
                    p / s,
                    floor(relay, &|b| format!("{b:.2} of it"))
                )
            })
            .unwrap_or("—".into()),
        required: "≤ ⅓ of squid's added p50",
        met: added.map(|(p, s)| p <= s / 3.0),
    });

    let bulk = |k: PeerKind| results.bulk.get(&(1, k)).map(|s| s.gib_per_sec());
    let r = bulk(Paude).zip(bulk(Direct)).map(|(p, d)| p / d);
    let relay = bulk(BareRelay).zip(bulk(Direct)).map(|(b, d)| b / d);
    out.push(Target {
        name: "bulk throughput, one tunnel, vs direct",
        measured: r
            .map(|r| format!("{r:.2}× direct{}", floor(relay, &|b| format!("{b:.2}×"))))
            .unwrap_or("—".into()),
        required: "≥ 0.9× direct",
        met: r.map(|r| r >= 0.9),
    });

    let http = |k: PeerKind| results.http.get(&k).map(|s| s.ops_per_sec());
    let r = http(Paude).zip(http(Squid)).map(|(p, s)| p / s);
    out.push(Target {
        name: "plain HTTP forwarding req/s vs squid",
        measured: r.map(|r| format!("{r:.2}× squid")).unwrap_or("—".into()),
        required: "≥ 2× squid",
        met: r.map(|r| r >= 2.0),
    });

    let idle = |k: PeerKind| results.idle.get(&k).and_then(|s| s.kib_per_tunnel());
    let r = idle(Paude).zip(idle(Squid)).map(|(p, s)| p / s);
    out.push(Target {
        name: "memory per idle tunnel vs squid",
        measured: r
            .map(|r| format!("{r:.2} of squid's"))
            .unwrap_or("—".into()),
        required: "≤ ⅓ of squid's",
        met: r.map(|r| r <= 1.0 / 3.0),
    });

    let flood_ratio = |k: PeerKind| {
        let base = results.flood_baseline.get(&k)?;
        results.flood_allowed.get(&k)?.paired_ratio(base)
    };
    let achieved = results.flood_denied.get(&Paude).map(|s| s.ops_per_sec());
    let r = flood_ratio(Paude);
    let relay = flood_ratio(BareRelay);
    let flood = results.plan.flood_per_sec;
    out.push(Target {
        name: "allowed tunnel rate under a 1,000/s denial flood",
        measured: r
            .zip(achieved)
            .map(|(r, a)| {
                format!(
                    "{:+.1}% (median of the rounds' ratios; flood achieved {a:.0}/s{})",
                    (r - 1.0) * 100.0,
                    floor(relay, &|b| format!("{:+.1}%", (b - 1.0) * 100.0))
                )
            })
            .unwrap_or("—".into()),
        required: "drop ≤ 10%",
        met: r
            .zip(achieved)
            .map(|(r, a)| r >= 0.9 && a >= 0.9 * flood as f64),
    });

    if !results.verbs.is_empty() {
        let slowest = results
            .verbs
            .iter()
            .filter_map(|v| Some((v.verb, v.ratio()?)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let complete = results.verbs.iter().all(|v| v.ratio().is_some());
        out.push(Target {
            name: "every launcher verb vs the podman CLI",
            measured: slowest
                .map(|(verb, r)| format!("slowest: {verb}, {r:.2}× podman"))
                .unwrap_or("—".into()),
            required: "≤ 1.2× podman",
            met: slowest.filter(|_| complete).map(|(_, r)| r <= 1.2),
        });
    }
    out
}

/// Renders the whole report as Markdown.
pub fn render(results: &Results, date: &str) -> String {
    let peers: Vec<PeerKind> = results.versions.keys().copied().collect();
    let mut out = String::new();
    let m = &results.machine;
    let p = &results.plan;
    let _ = writeln!(out, "# Benchmark results\n");
    let _ = writeln!(
        out,
        "Generated by `cargo run --release -p paude-benches -- run` ({} plan) on {date}.\n",
        p.name
    );
    let _ = writeln!(
        out,
        "- machine: {} CPUs, Linux {}, descriptor limit {}",
        m.cpus, m.kernel, m.nofile_limit
    );
    for (kind, version) in &results.versions {
        let _ = writeln!(out, "- {}: {version}", kind.name());
    }
    let _ = writeln!(
        out,
        "- plan: {} rounds of {:.1} s per scenario and peer, peers interleaved in rotating order \
         ({} rounds for the denial flood, each split base, flood, flood, base); rates are medians \
         over rounds, latencies pooled; load generator, upstream servers and proxies share the \
         same machine\n",
        p.rounds,
        p.duration.as_secs_f64(),
        p.flood_rounds
    );

    let rows = rows(results);
    let _ = writeln!(out, "## Results\n");
    let _ = write!(out, "| metric |");
    for k in &peers {
        let _ = write!(out, " {} |", k.name());
    }
    let _ = write!(out, "\n|---|");
    for _ in &peers {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    for row in &rows {
        let _ = write!(out, "| {} |", row.metric);
        for k in &peers {
            let _ = write!(out, " {} |", fmt(row.values.get(k).copied(), row.decimals));
        }
        out.push('\n');
    }

    let _ = writeln!(out, "\n## Ratios\n");
    let _ = writeln!(
        out,
        "Each peer's value divided by paude-proxy's and by direct's (for rates higher is better, \
         for latency and memory lower is better).\n"
    );
    let others: Vec<PeerKind> = peers
        .iter()
        .copied()
        .filter(|k| *k != PeerKind::Paude)
        .collect();
    let _ = write!(out, "| metric | better |");
    for k in &others {
        let _ = write!(out, " {} ÷ paude-proxy |", k.name());
    }
    for k in peers.iter().filter(|k| **k != PeerKind::Direct) {
        let _ = write!(out, " {} ÷ direct |", k.name());
    }
    let columns = others.len() + peers.iter().filter(|k| **k != PeerKind::Direct).count();
    let _ = writeln!(out, "\n|---|---|{}", "---:|".repeat(columns));
    for row in &rows {
        let better = if row.higher_is_better {
            "higher"
        } else {
            "lower"
        };
        let _ = write!(out, "| {} | {better} |", row.metric);
        let paude = row.values.get(&PeerKind::Paude).copied();
        let direct = row.values.get(&PeerKind::Direct).copied();
        for k in &others {
            let _ = write!(out, " {} |", ratio(row.values.get(k).copied(), paude));
        }
        for k in peers.iter().filter(|k| **k != PeerKind::Direct) {
            let _ = write!(out, " {} |", ratio(row.values.get(k).copied(), direct));
        }
        out.push('\n');
    }

    render_cpu(&mut out, results, &peers);
    render_verbs(&mut out, &results.verbs);

    let _ = writeln!(
        out,
        "\n## Targets\n\n| target | measured | required | result |\n|---|---|---|---|"
    );
    for t in targets(results) {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {verdict} |",
            t.name, t.measured, t.required
        );
    }

    let errors: Vec<String> = errors(results);
    if !errors.is_empty() {
        let _ = writeln!(out, "\n## Errors during the run\n");
        for e in errors {
            let _ = writeln!(out, "- {e}");
        }
    }
    out
}

/// The launcher's verbs beside the podman CLI doing the same work.
fn render_verbs(out: &mut String, verbs: &[crate::verbs::VerbTiming]) {
    if verbs.is_empty() {
        return;
    }
    let rounds = verbs.iter().map(|v| v.launch_ms.len()).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "\n## Launcher verbs\n\nEach `paude-launch` verb on a `shell` session beside the `podman` \
         commands doing the same engine work, wall-clock from exec to exit, median of {rounds} \
         rounds (alternating which goes first); the launcher uses the shared API service, as \
         consecutive commands of a user do.\n\n| verb | podman equivalent | paude-launch ms | \
         podman ms | paude-launch ÷ podman |\n|---|---|---:|---:|---:|"
    );
    for v in verbs {
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | {} | {} |",
            v.verb,
            v.raw,
            fmt(v.launch_median(), 1),
            fmt(v.podman_median(), 1),
            fmt(v.ratio(), 2)
        );
    }
}

/// Where the CPU went in the tunnel, bulk and refusal scenarios: the proxy's processes, the load
/// generator with the echo server, and how busy the machine was. A path whose load side and
/// proxy together keep every CPU busy cannot go faster on this machine.
fn render_cpu(out: &mut String, results: &Results, peers: &[PeerKind]) {
    let cpus = results.machine.cpus;
    let mut rows: Vec<(String, BTreeMap<PeerKind, String>)> = Vec::new();
    // One scenario's three rows: the proxy's and the load side's CPU per unit of work (from
    // `cost`), and how busy the machine was. The direct path has no proxy, so no proxy figure.
    let mut group = |labels: [String; 3],
                     samples: Vec<(PeerKind, &Sample)>,
                     cost: fn(&Sample) -> Option<(f64, f64)>,
                     decimals: usize| {
        let values = |f: &dyn Fn(&Sample) -> Option<String>| {
            samples
                .iter()
                .filter_map(|(k, s)| f(s).map(|v| (*k, v)))
                .collect::<BTreeMap<_, _>>()
        };
        let [proxy, load, busy] = labels;
        let cells = [
            values(&|s| {
                let (p, _) = cost(s)?;
                (p > 0.0).then(|| format!("{p:.decimals$}"))
            }),
            values(&|s| cost(s).map(|(_, l)| format!("{l:.decimals$}"))),
            values(&|s| s.machine_busy(cpus).map(|b| format!("{:.0} %", b * 100.0))),
        ];
        for (metric, values) in [proxy, load, busy].into_iter().zip(cells) {
            if !values.is_empty() {
                rows.push((metric, values));
            }
        }
    };
    for &c in &results.plan.tunnel_concurrency {
        group(
            [
                format!("proxy CPU µs per tunnel, concurrency {c}"),
                format!("load generator + echo CPU µs per tunnel, concurrency {c}"),
                format!("machine busy, concurrency {c}"),
            ],
            at(&results.tunnel, c),
            Sample::cpu_us_per_op,
            0,
        );
    }
    for &n in &results.plan.bulk_tunnels {
        group(
            [
                format!("proxy CPU s per GiB echoed, {n} bulk tunnel(s)"),
                format!("load generator + echo CPU s per GiB, {n} bulk tunnel(s)"),
                format!("machine busy, {n} bulk tunnel(s)"),
            ],
            at(&results.bulk, n),
            Sample::cpu_secs_per_gib,
            2,
        );
    }
    for &n in &results.plan.https_streams {
        group(
            [
                format!("proxy CPU s per GiB, HTTPS download, {}", streams(n)),
                format!(
                    "load generator + nginx CPU s per GiB, HTTPS download, {}",
                    streams(n)
                ),
                format!("machine busy, HTTPS download, {}", streams(n)),
            ],
            at(&results.https, n),
            Sample::cpu_secs_per_gib,
            2,
        );
    }
    group(
        [
            "proxy CPU µs per HTTPS API request".into(),
            "load generator + nginx CPU µs per HTTPS API request".into(),
            "machine busy, HTTPS API requests".into(),
        ],
        results.api.iter().map(|(k, s)| (*k, s)).collect(),
        Sample::cpu_us_per_op,
        0,
    );
    group(
        [
            "proxy CPU µs per event".into(),
            "load generator + event server CPU µs per event".into(),
            "machine busy, event streams".into(),
        ],
        results.events.iter().map(|(k, s)| (*k, s)).collect(),
        Sample::cpu_us_per_op,
        1,
    );
    for &n in &results.plan.duplex_tunnels {
        group(
            [
                format!("proxy CPU s per GiB echoed, full-duplex, {}", tunnels(n)),
                format!(
                    "load generator + echo CPU s per GiB, full-duplex, {}",
                    tunnels(n)
                ),
                format!("machine busy, full-duplex, {}", tunnels(n)),
            ],
            at(&results.duplex, n),
            Sample::cpu_secs_per_gib,
            2,
        );
    }
    group(
        [
            "proxy CPU s per GiB, plain HTTP download".into(),
            "load generator + nginx CPU s per GiB, plain HTTP download".into(),
            "machine busy, plain HTTP download".into(),
        ],
        results.http_download.iter().map(|(k, s)| (*k, s)).collect(),
        Sample::cpu_secs_per_gib,
        2,
    );
    group(
        [
            "proxy CPU µs per refusal".into(),
            "load generator CPU µs per refusal".into(),
            "machine busy, refusals".into(),
        ],
        results.deny.iter().map(|(k, s)| (*k, s)).collect(),
        Sample::cpu_us_per_op,
        0,
    );
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n## Where the CPU went\n\nCPU time (user and system, from `/proc`) spent during the \
         measured rounds by the proxy's processes and by the load generator with the echo server, \
         per tunnel or per GiB echoed; and the machine's busy time as a share of its {cpus} CPUs.\n"
    );
    let _ = write!(out, "| metric |");
    for k in peers {
        let _ = write!(out, " {} |", k.name());
    }
    let _ = writeln!(out, "\n|---|{}", "---:|".repeat(peers.len()));
    for (metric, values) in rows {
        let _ = write!(out, "| {metric} |");
        for k in peers {
            let _ = write!(out, " {} |", values.get(k).map_or("—", String::as_str));
        }
        out.push('\n');
    }
}

/// Each peer's sample at scenario parameter `param` (a concurrency or a tunnel count).
fn at(samples: &BTreeMap<(usize, PeerKind), Sample>, param: usize) -> Vec<(PeerKind, &Sample)> {
    samples
        .iter()
        .filter(|((p, _), _)| *p == param)
        .map(|((_, k), s)| (*k, s))
        .collect()
}

fn errors(results: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |what: String, s: &Sample| {
        if s.errors > 0 {
            out.push(format!(
                "{what}: {} of {} failed, first: {}",
                s.errors,
                s.ops + s.errors,
                s.first_error.as_deref().unwrap_or("?")
            ));
        }
    };
    for ((c, k), s) in &results.tunnel {
        note(format!("{} tunnels c={c}", k.name()), s);
    }
    for ((n, k), s) in &results.bulk {
        note(format!("{} bulk x{n}", k.name()), s);
    }
    for ((n, k), s) in &results.https {
        note(format!("{} HTTPS download x{n}", k.name()), s);
    }
    for ((n, k), s) in &results.duplex {
        note(format!("{} full-duplex x{n}", k.name()), s);
    }
    for (label, map) in [
        ("http", &results.http),
        ("denials", &results.deny),
        ("flood baseline", &results.flood_baseline),
        ("flood allowed", &results.flood_allowed),
        ("flood denied", &results.flood_denied),
        ("HTTPS API", &results.api),
        ("event stream", &results.event_connections),
        ("plain HTTP download", &results.http_download),
    ] {
        for (k, s) in map {
            note(format!("{} {label}", k.name()), s);
        }
    }
    for (k, s) in &results.idle {
        if s.opened < s.requested {
            out.push(format!(
                "{} idle: opened {} of {}, first error: {}",
                k.name(),
                s.opened,
                s.requested,
                s.first_error.as_deref().unwrap_or("?")
            ));
        }
    }
    if let Some(e) = &results.verbs_error {
        out.push(format!("launcher verbs not measured: {e}"));
    }
    out
}

/// Writes `report` to `path`, keeping the hand-written analysis of the file it replaces.
pub fn write_results(path: &Path, report: &str) -> anyhow::Result<()> {
    let kept = std::fs::read_to_string(path)
        .ok()
        .and_then(|old| {
            old.split_once(ANALYSIS_MARKER)
                .map(|(_, rest)| rest.to_string())
        })
        .unwrap_or_else(|| "\n\n## Analysis\n\nNot written yet.\n".into());
    let text = format!("{report}\n{ANALYSIS_MARKER}{kept}");
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{render, targets};
    use crate::driver::{Machine, Plan, Results};
    use crate::peers::PeerKind::{self, *};
    use crate::procfs::CpuUse;
    use crate::scenarios::{IdleSample, Sample};

    /// A one-second sample of `ops` operations, `bytes` bytes and a constant latency.
    fn sample(ops: u64, bytes: u64, latency_us: u32) -> Sample {
        Sample {
            ops,
            bytes,
            elapsed: Duration::from_secs(1),
            latencies_us: vec![latency_us; ops.min(100) as usize],
            ..Sample::default()
        }
    }

    /// Results where paude-proxy's figures are `paude` and squid's are `squid`, in the order
    /// (tunnels/s at c=16, p50 µs at c=1, bulk bytes/s, HTTP req/s, KiB per idle tunnel,
    /// tunnels/s under the flood); direct is fixed.
    fn results(paude: [f64; 6], squid: [f64; 6]) -> Results {
        let machine = Machine {
            cpus: 2,
            kernel: "test".into(),
            nofile_limit: 1024,
        };
        let versions = [Direct, Paude, Squid]
            .into_iter()
            .map(|k| (k, "test".into()))
            .collect();
        let mut r = Results::new(Plan::smoke(), machine, versions);
        let direct = [10_000.0, 100.0, 1e9, 50_000.0, 0.0, 0.0];
        for (kind, v) in [(Direct, direct), (Paude, paude), (Squid, squid)] {
            r.tunnel.insert((16, kind), sample(v[0] as u64, 0, 1));
            r.tunnel.insert((1, kind), sample(1000, 0, v[1] as u32));
            r.bulk.insert((1, kind), sample(1, v[2] as u64, 1));
            r.http.insert(kind, sample(v[3] as u64, 0, 1));
            if kind != Direct {
                let kib = (v[4] * 1000.0) as u64;
                r.idle.insert(
                    kind,
                    IdleSample {
                        requested: 1000,
                        opened: 1000,
                        rss_after_kib: kib,
                        ..Default::default()
                    },
                );
                r.flood_baseline.insert(kind, sample(1000, 0, 1));
                r.flood_allowed.insert(kind, sample(v[5] as u64, 0, 1));
                r.flood_denied
                    .insert(kind, sample(r.plan.flood_per_sec as u64, 0, 1));
            }
        }
        r
    }

    fn verdicts(r: &Results) -> Vec<Option<bool>> {
        targets(r).into_iter().map(|t| t.met).collect()
    }

    #[test]
    fn every_target_is_met_exactly_at_its_threshold() {
        // 2.5× squid's rate; +50 µs added against squid's +150; 0.9× direct; 2× squid's
        // requests; a third of squid's memory; the flood costs exactly 10 %.
        let r = results(
            [2500.0, 150.0, 0.9e9, 2000.0, 3.0, 900.0],
            [1000.0, 250.0, 0.5e9, 1000.0, 9.0, 500.0],
        );
        assert_eq!(verdicts(&r), vec![Some(true); 6]);
    }

    #[test]
    fn every_target_is_missed_just_past_its_threshold() {
        let r = results(
            [2400.0, 160.0, 0.8e9, 1900.0, 3.2, 880.0],
            [1000.0, 250.0, 0.5e9, 1000.0, 9.0, 500.0],
        );
        assert_eq!(verdicts(&r), vec![Some(false); 6]);
    }

    #[test]
    fn the_cpu_table_and_the_bare_relay_floor_are_reported() {
        let mut r = results(
            [2000.0, 250.0, 0.6e9, 2000.0, 3.0, 900.0],
            [1000.0, 400.0, 0.5e9, 1000.0, 9.0, 500.0],
        );
        r.versions.insert(BareRelay, "floor".into());
        r.tunnel.insert((16, BareRelay), sample(2200, 0, 1));
        r.tunnel.insert((1, BareRelay), sample(1000, 0, 200));
        let paude = r.tunnel.get_mut(&(16, Paude)).unwrap();
        paude.cpu = CpuUse {
            proxy: 0.25,
            load: 0.5,
            machine: 1.5,
        };
        let text = render(&r, "today");
        assert!(
            text.contains("| proxy CPU µs per tunnel, concurrency 16 | — | — | 125 | — |"),
            "{text}"
        );
        assert!(text.contains("| machine busy, concurrency 16 | — | — | 75 % | — |"));
        // 2,200/s against squid's 1,000/s; +100 µs against squid's +300 µs.
        assert!(text.contains("2.00× squid; bare relay: 2.20×"), "{text}");
        assert!(
            text.contains("(0.50 of it; bare relay: 0.33 of it)"),
            "{text}"
        );
    }

    #[test]
    fn the_flood_is_judged_on_the_rounds_taken_side_by_side() {
        let rounds = |rates: &[f64]| {
            let mut s = Sample::default();
            for &r in rates {
                s.add_round(sample(r as u64, 0, 1));
            }
            s
        };
        // The machine slows down over the run; within two of three rounds the flood costs
        // 5 %, and one flood slice was disturbed by something else.
        let base = rounds(&[10_000.0, 6_000.0, 8_000.0]);
        let flooded = rounds(&[9_500.0, 5_700.0, 6_000.0]);
        let ratio = flooded.paired_ratio(&base).unwrap();
        assert!((ratio - 0.95).abs() < 1e-9, "{ratio}");
        // Comparing the medians of the rates instead would have reported 6,000 ÷ 8,000.
        let medians = flooded.ops_per_sec() / base.ops_per_sec();
        assert!((medians - 0.75).abs() < 1e-9, "{medians}");
    }

    #[test]
    fn a_missing_peer_leaves_its_targets_unmeasured_and_the_report_still_renders() {
        let mut r = results(
            [2500.0, 150.0, 0.9e9, 2000.0, 3.0, 900.0],
            [1000.0, 250.0, 0.5e9, 1000.0, 9.0, 500.0],
        );
        let squid_only = |k: &PeerKind| *k == Squid;
        r.tunnel.retain(|(_, k), _| !squid_only(k));
        r.http.retain(|k, _| !squid_only(k));
        r.idle.retain(|k, _| !squid_only(k));
        r.versions.retain(|k, _| !squid_only(k));
        let v = verdicts(&r);
        assert_eq!(v[0], None, "tunnel rate needs squid");
        assert_eq!(v[2], Some(true), "bulk compares with direct only");
        assert_eq!(v[3], None, "HTTP needs squid");
        assert!(render(&r, "today").contains("| tunnel rate at concurrency 16 vs squid | — |"));
    }
}
