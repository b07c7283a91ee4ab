//! The launcher's verbs against the Podman CLI doing the same work: each verb of
//! `paude-launch` on a real session, timed from exec to exit, beside the `podman` commands that
//! make, start, show, stop, enter or remove the same objects.
//!
//! The raw side creates objects of its own (two networks, a volume, two containers from the
//! session's own images, both with `--init`) for create, start, stop and delete, and uses the
//! session's own containers for status, so both sides do the same engine work.
//! Rounds alternate which side goes first. The launcher's verbs find (or start) the shared
//! `podman system service` as a user's commands do; the first, untimed create builds the images.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The base image the session's agent and proxy images are built on (the Podman tests' own).
const BASE_IMAGE: &str = "localhost/paude-test-base:bookworm";
/// The longest one verb may take before the run gives up on it.
const VERB_LIMIT: Duration = Duration::from_secs(600);

/// One verb's wall-clock times, milliseconds per round, on both sides.
#[derive(Clone, Debug, Default)]
pub struct VerbTiming {
    pub verb: &'static str,
    /// The `podman` commands of the raw side, as shown in the report.
    pub raw: &'static str,
    pub launch_ms: Vec<f64>,
    pub podman_ms: Vec<f64>,
}

impl VerbTiming {
    pub fn launch_median(&self) -> Option<f64> {
        median(&self.launch_ms)
    }
    pub fn podman_median(&self) -> Option<f64> {
        median(&self.podman_ms)
    }
    /// The launcher's median over podman's.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.launch_median()? / self.podman_median()?)
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The verbs, in the order a round runs them, with the raw side's commands.
const VERBS: [(&str, &str); 6] = [
    (
        "create (images cached)",
        "network create ×2, volume create, create ×2, network connect, start",
    ),
    ("list", "ps -a"),
    ("status", "inspect agent proxy"),
    ("stop", "stop -t 5 agent proxy"),
    ("start (until ready)", "start proxy agent"),
    ("delete", "rm -f ×2, network rm ×2, volume rm"),
];

/// Where the commands run: the launcher binary and the environment both sides share.
struct Bench {
    launch: PathBuf,
    containers_conf: PathBuf,
    workspace: tempfile::TempDir,
}

impl Bench {
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir(self.workspace.path())
            .env("CONTAINERS_CONF", &self.containers_conf)
            .env("TERM", "xterm-256color")
            .env_remove("DOCKER_HOST")
            .env_remove("PAUDE_BACKEND")
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn launch(&self, args: &[&str]) -> Command {
        let mut c = self.command(&self.launch);
        c.args(args);
        c
    }

    fn podman(&self, args: &[&str]) -> Command {
        let mut c = self.command(Path::new("podman"));
        c.args(args);
        c
    }
}

/// Runs `cmd` and returns its wall-clock time in milliseconds, or why it failed.
fn timed(what: &str, mut cmd: Command) -> Result<f64> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if !status.success() {
                let out = child.wait_with_output()?;
                bail!(
                    "{what} failed ({status}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            // Its standard error is read after its exit: the verbs write a few lines at most.
            return Ok(ms);
        }
        if started.elapsed() > VERB_LIMIT {
            let _ = child.kill();
            bail!("{what} did not end within {} s", VERB_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Runs `cmd` untimed and fails with its output if it fails.
fn ok(what: &str, mut cmd: Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The raw side's objects of one round.
struct Raw {
    internal: String,
    egress: String,
    volume: String,
    proxy: String,
    agent: String,
}

impl Raw {
    fn new(round: usize) -> Raw {
        let base = format!("paude-benchraw-{}-{round}", std::process::id());
        Raw {
            internal: format!("{base}-internal"),
            egress: format!("{base}-egress"),
            volume: format!("{base}-data"),
            proxy: format!("{base}-proxy"),
            agent: format!("{base}-agent"),
        }
    }

    /// The podman commands creating and starting what a session has.
    fn create(&self, b: &Bench, images: &(String, String)) -> Vec<Command> {
        let mount = format!("{}:/workspace", self.volume);
        vec![
            b.podman(&[
                "network",
                "create",
                "--internal",
                "--disable-dns",
                &self.internal,
            ]),
            b.podman(&["network", "create", &self.egress]),
            b.podman(&["volume", "create", &self.volume]),
            b.podman(&[
                "create",
                "--init",
                "--name",
                &self.proxy,
                "--network",
                &self.egress,
                &images.1,
                "sleep",
                "infinity",
            ]),
            b.podman(&["network", "connect", &self.internal, &self.proxy]),
            b.podman(&[
                "create",
                "--init",
                "--name",
                &self.agent,
                "--network",
                &self.internal,
                "-v",
                &mount,
                &images.0,
                "sleep",
                "infinity",
            ]),
            b.podman(&["start", &self.proxy, &self.agent]),
        ]
    }

    fn delete(&self, b: &Bench) -> Vec<Command> {
        vec![
            b.podman(&["rm", "-f", "-t", "0", &self.agent, &self.proxy]),
            b.podman(&["network", "rm", &self.internal, &self.egress]),
            b.podman(&["volume", "rm", &self.volume]),
        ]
    }
}

/// Runs the commands one after another; their total time.
fn timed_all(what: &str, cmds: Vec<Command>) -> Result<f64> {
    cmds.into_iter().map(|c| timed(what, c)).sum()
}

/// Measures every verb over `rounds` rounds. `launch` is the paude-launch binary.
pub fn measure(launch: &Path, rounds: usize) -> Result<Vec<VerbTiming>> {
    let containers_conf = std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("tests/podman/containers.conf"));
    let bench = Bench {
        launch: launch.to_path_buf(),
        containers_conf,
        workspace: tempfile::tempdir()?,
    };
    let script = workspace_dir().join("tests/podman/make-base-image.sh");
    let mut make = bench.command(Path::new("bash"));
    make.arg(&script).arg(BASE_IMAGE);
    ok("tests/podman/make-base-image.sh", make)?;

    let name = format!("benchverbs{}", std::process::id());
    let create_args = [
        "create",
        name.as_str(),
        "--agent",
        "shell",
        "--base-image",
        BASE_IMAGE,
        "--proxy-base-image",
        BASE_IMAGE,
    ];
    let delete_args = ["delete", name.as_str(), "--confirm"];
    eprintln!("paude-benches: verbs: building the session's images (untimed)");
    ok("paude-launch create", bench.launch(&create_args))?;
    let image = |role: &str| {
        ok(
            "podman inspect",
            bench.podman(&[
                "inspect",
                "--format",
                "{{.Image}}",
                &format!("paude-{name}-{role}"),
            ]),
        )
    };
    let images = (image("agent")?, image("proxy")?);
    ok("paude-launch delete", bench.launch(&delete_args))?;

    let mut timings: Vec<VerbTiming> = VERBS
        .iter()
        .map(|(verb, raw)| VerbTiming {
            verb,
            raw,
            ..VerbTiming::default()
        })
        .collect();
    let agent = format!("paude-{name}-agent");
    let proxy = format!("paude-{name}-proxy");
    let result = (|| -> Result<()> {
        for round in 0..rounds {
            let raw = Raw::new(round);
            // Each verb: (launcher, raw) closures measured in this round's order.
            type Side<'a> = Box<dyn Fn() -> Result<f64> + 'a>;
            let sides: Vec<(Side, Side)> = vec![
                (
                    Box::new(|| timed("paude-launch create", bench.launch(&create_args))),
                    Box::new(|| timed_all("podman create", raw.create(&bench, &images))),
                ),
                (
                    Box::new(|| timed("paude-launch list", bench.launch(&["list"]))),
                    Box::new(|| timed("podman ps", bench.podman(&["ps", "-a"]))),
                ),
                (
                    Box::new(|| timed("paude-launch status", bench.launch(&["status", &name]))),
                    Box::new(|| {
                        timed("podman inspect", bench.podman(&["inspect", &agent, &proxy]))
                    }),
                ),
                (
                    Box::new(|| timed("paude-launch stop", bench.launch(&["stop", &name]))),
                    Box::new(|| {
                        timed(
                            "podman stop",
                            bench.podman(&["stop", "-t", "5", &raw.agent, &raw.proxy]),
                        )
                    }),
                ),
                (
                    Box::new(|| timed("paude-launch start", bench.launch(&["start", &name]))),
                    Box::new(|| {
                        timed(
                            "podman start",
                            bench.podman(&["start", &raw.proxy, &raw.agent]),
                        )
                    }),
                ),
                (
                    Box::new(|| timed("paude-launch delete", bench.launch(&delete_args))),
                    Box::new(|| timed_all("podman rm", raw.delete(&bench))),
                ),
            ];
            for (timing, (launch_side, raw_side)) in timings.iter_mut().zip(&sides) {
                let (l, p) = if round % 2 == 0 {
                    let l = launch_side()?;
                    (l, raw_side()?)
                } else {
                    let p = raw_side()?;
                    (launch_side()?, p)
                };
                eprintln!(
                    "paude-benches: verbs round {}: {:<26} paude-launch {l:>8.1} ms, podman {p:>8.1} ms",
                    round + 1,
                    timing.verb
                );
                timing.launch_ms.push(l);
                timing.podman_ms.push(p);
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = bench.launch(&delete_args).output();
        for round in 0..rounds {
            for c in Raw::new(round).delete(&bench) {
                let _ = { c }.output();
            }
        }
    }
    result.map(|()| timings)
}

/// The workspace root (the directory above this crate).
pub fn workspace_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_of_the_medians() {
        let t = VerbTiming {
            verb: "list",
            raw: "ps -a",
            launch_ms: vec![9.0, 6.0, 30.0],
            podman_ms: vec![20.0, 30.0, 40.0, 10.0],
        };
        assert_eq!(t.launch_median(), Some(9.0));
        assert_eq!(t.podman_median(), Some(25.0));
        assert_eq!(t.ratio(), Some(9.0 / 25.0));
        assert_eq!(VerbTiming::default().ratio(), None);
    }
}
