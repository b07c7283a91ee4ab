//! `paude-benches`: runs the side-by-side benchmark and writes `benches/RESULTS.md`.
//!
//! `run` builds paude-proxy in release mode (unless `--paude-bin` names a binary), runs the full
//! plan and writes the report; `smoke` runs every scenario on every path for a moment and checks
//! the harness produced sane results, without writing anything.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use paude_benches::driver::{self, Plan, Scenario, Setup};
use paude_benches::peers::PeerKind;
use paude_benches::report;
use paude_benches::verbs::workspace_dir;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark paude-proxy side by side with squid, tinyproxy and a direct connection"
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the full benchmark (about a quarter of an hour on two cores, with the launcher's verbs
    /// on Podman) and write the results file.
    Run {
        #[command(flatten)]
        common: Common,
        /// Where to write the report.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
        out: PathBuf,
    },
    /// Run every scenario on every path for a moment and check the results are sane.
    Smoke {
        #[command(flatten)]
        common: Common,
    },
    /// Serve the upstream echo server until standard input closes (used by the benchmark itself).
    #[command(hide = true)]
    EchoServer {
        /// The copy buffer: each connection reads at most this many bytes, writes them back,
        /// and reads again.
        #[arg(long, default_value_t = paude_benches::servers::ECHO_BUFFER)]
        buffer: usize,
    },
    /// Serve the bare CONNECT relay until standard input closes (used by the benchmark itself).
    #[command(hide = true)]
    BareRelay,
}

#[derive(clap::Args)]
struct Common {
    /// The paude-proxy binary to measure; by default it is built in release mode next to this one.
    #[arg(long)]
    paude_bin: Option<PathBuf>,
    /// Which paths to measure (comma-separated: direct, bare-relay, paude-proxy, squid,
    /// tinyproxy).
    #[arg(long, value_delimiter = ',', default_value = "direct,bare-relay,paude-proxy,squid,tinyproxy", value_parser = parse_peer)]
    peers: Vec<PeerKind>,
    /// Run only these scenarios (comma-separated); a partial run prints its table and does not
    /// rewrite the results file.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Rounds per scenario instead of the plan's (the denial flood keeps its own count unless
    /// this is lower), for a quick pass over the whole plan.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds one scenario runs on one peer in one round instead of the plan's.
    #[arg(long)]
    seconds: Option<f64>,
}

fn parse_peer(name: &str) -> Result<PeerKind, String> {
    PeerKind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            format!(
                "unknown peer {name:?}; use direct, bare-relay, paude-proxy, squid or tinyproxy"
            )
        })
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("paude-benches: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (mut plan, common, out) = match cli.command {
        Mode::Run { common, out } => {
            let out = common.only.is_empty().then_some(out);
            (Plan::full(), common, out)
        }
        Mode::Smoke { common } => (Plan::smoke(), common, None),
        Mode::EchoServer { buffer } => {
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            return runtime.block_on(paude_benches::servers::serve_echo_until_stdin_closes(
                buffer,
            ));
        }
        Mode::BareRelay => return paude_benches::servers::serve_bare_relay_until_stdin_closes(),
    };
    plan.only = common.only.clone();
    if let Some(rounds) = common.rounds {
        if rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        plan.rounds = rounds;
        plan.flood_rounds = plan.flood_rounds.min(rounds);
    }
    if let Some(seconds) = common.seconds {
        plan.duration = std::time::Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--seconds must be a positive number of seconds")?;
    }
    let plan_is_smoke = plan.name == "smoke";
    let paude_bin = match common.paude_bin {
        Some(path) => path,
        None if common.peers.contains(&PeerKind::Paude) => build_release("paude-proxy")?,
        None => PathBuf::new(),
    };
    let launch_bin = match plan.runs_verbs() {
        true => Some(build_release("paude-launch")?),
        false => None,
    };
    let helper_bin = std::env::current_exe().context("cannot find this executable")?;
    let setup = Setup {
        paude_bin,
        helper_bin,
        peers: common.peers,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let mut results = runtime.block_on(driver::run(plan, &setup))?;
    if let Some(launch) = launch_bin {
        // The proxy's results stand without the verbs (no Podman, a failed create): the
        // report says what went wrong instead of the run losing everything.
        match paude_benches::verbs::measure(&launch, results.plan.verb_rounds) {
            Ok(verbs) => results.verbs = verbs,
            Err(e) => {
                eprintln!("paude-benches: the launcher verbs were not measured: {e:#}");
                results.verbs_error = Some(format!("{e:#}").replace('\n', " "));
            }
        }
    }
    let text = report::render(&results, &now());
    println!("{text}");
    match out {
        Some(path) => {
            report::write_results(&path, &text)?;
            eprintln!("paude-benches: wrote {}", path.display());
        }
        None if plan_is_smoke => driver::check_sane(&results)?,
        None => eprintln!("paude-benches: partial run (--only): results file left as it was"),
    }
    Ok(())
}

/// Builds `package` (paude-proxy or paude-launch, whose binaries bear the package's name) in
/// release mode into this binary's target directory and returns the binary's path.
fn build_release(package: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let profile_dir = exe.parent().context("executable has no directory")?;
    let target_dir = profile_dir
        .parent()
        .context("executable is not in a cargo target directory")?;
    if profile_dir.file_name().and_then(|n| n.to_str()) != Some("release") {
        bail!(
            "run the benchmark in release mode (`cargo run --release -p paude-benches -- run`) \
             or name a paude-proxy binary with --paude-bin"
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("paude-benches: building {package} in release mode");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", package, "--target-dir"])
        .arg(target_dir)
        .current_dir(workspace_dir())
        .status()
        .with_context(|| format!("cannot run cargo to build {package}"))?;
    if !status.success() {
        bail!("`cargo build --release -p {package}` failed; fix the build and rerun");
    }
    Ok(profile_dir.join(package))
}

fn now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "an unknown date".into())
}
