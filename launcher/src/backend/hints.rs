//! What an engine's own error text means for the user. Podman (and Docker) answer a base image
//! that cannot be pulled, or a runtime that cannot apply the default ulimits, with text from
//! deep in their stack (`initializing source docker://...`, `error setting rlimit type 7:
//! operation not permitted`); these functions turn such failures into errors that name the
//! cause and the flag or file that fixes it, and leave every other error as it was.

use anyhow::anyhow;

use crate::images::ImagePlan;

/// Where the README explains the ulimit fix.
const ULIMIT_FIX: &str = "see \"Troubleshooting\" in README.md";

/// The error for a failed image build: a base image that cannot be pulled, the ulimits, or
/// else the engine's reason with the last lines of the build log.
pub fn build_failed(image: &ImagePlan, why: &str, log: &[String]) -> anyhow::Error {
    let reference = image.reference();
    // The engine's reason may end with a newline; the message goes on after it.
    let why = why.trim();
    if let Some(detail) = rlimit_detail(why).or_else(|| log.iter().find_map(|l| rlimit_detail(l))) {
        return anyhow!("building image {reference} failed: {}", ulimits(&detail));
    }
    if is_pull_failure(why) {
        let base = image
            .dockerfile
            .lines()
            .find_map(|l| l.strip_prefix("FROM "))
            .unwrap_or("?");
        return anyhow!(
            "building image {reference} failed: its base image {base} is not on this machine \
             and cannot be pulled ({why}): name base images that are already here with \
             --base-image IMAGE (the agent's) and --proxy-base-image IMAGE (the proxy's; not \
             needed for a static paude-proxy, which uses scratch), see `podman images`, or make \
             the registry reachable"
        );
    }
    anyhow!(
        "building image {reference} failed: {why}\nlast lines of the build log:\n  {}\n\
         rerun with -v for the whole log; behind a TLS-intercepting proxy pass --ca-bundle FILE",
        log.join("\n  ")
    )
}

/// Adds what to do to an error whose cause is a runtime that cannot apply the default
/// ulimits; any other error is returned unchanged.
pub fn explain(err: anyhow::Error) -> anyhow::Error {
    let text = format!("{err:#}");
    if text.contains("default_ulimits") {
        return err;
    }
    match rlimit_detail(&text) {
        Some(detail) => err.context(ulimits(&detail)),
        None => err,
    }
}

/// The ulimit message: what failed and the containers.conf setting that fixes it.
fn ulimits(detail: &str) -> String {
    // SAFETY: getrlimit only writes the struct it is given.
    let hard = unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        (libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0).then_some(limit.rlim_max)
    };
    let within = match hard {
        Some(h) if h != libc::RLIM_INFINITY => format!(" (the hard nofile limit here is {h})"),
        _ => String::new(),
    };
    format!(
        "the container runtime cannot apply Podman's default ulimits ({detail}): give Podman \
         a containers.conf whose default_ulimits fit this host's hard limits{within}, e.g. \
         default_ulimits = [\"nofile=10000:10000\", \"nproc=4096:4096\"] as in \
         tests/podman/containers.conf, and point CONTAINERS_CONF at it (restart a running \
         `podman system service` with it); {ULIMIT_FIX}"
    )
}

/// The runtime's own words when it could not set a resource limit, e.g. `error setting
/// rlimit type 7: operation not permitted`.
fn rlimit_detail(text: &str) -> Option<String> {
    // The last one: runc wraps it as `error setting rlimits for ready process: error setting
    // rlimit type 7: ...`.
    let at = text.rfind("error setting rlimit")?;
    let rest = &text[at..];
    let end = rest
        .find(": OCI")
        .or_else(|| rest.find('\n'))
        .unwrap_or(rest.len());
    Some(rest[..end].trim().to_owned())
}

/// Whether a build failed because its base image could not be pulled: Podman's
/// `initializing source docker://...`, `pinging container registry`, or Docker's pull errors.
fn is_pull_failure(why: &str) -> bool {
    [
        "initializing source",
        "pinging container registry",
        "pull access denied",
        "manifest unknown",
        "error pulling image",
        "unable to pull",
        "failed to resolve source metadata",
    ]
    .iter()
    .any(|marker| why.contains(marker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::ContextFile;
    use std::sync::Arc;

    fn image(base: &str) -> ImagePlan {
        ImagePlan::new(
            "localhost/paude-proxy",
            format!("FROM {base}\nCOPY paude-proxy /usr/local/bin/paude-proxy\n"),
            vec![ContextFile::new(
                "paude-proxy",
                0o755,
                Arc::new(b"x".to_vec()),
            )],
        )
    }

    /// What Podman 4.3 reports here when the registry cannot be reached.
    const PODMAN_PULL: &str = "creating build container: initializing source \
        docker://127.0.0.1:1/debian:bookworm-slim: pinging container registry 127.0.0.1:1: \
        Get \"https://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused";

    /// What runc reports when it may not raise RLIMIT_NOFILE to Podman's default.
    const RUNC_RLIMIT: &str = "runc: runc create failed: unable to start container process: \
        error during container init: error setting rlimits for ready process: error setting \
        rlimit type 7: operation not permitted: OCI permission denied";

    #[test]
    fn an_unpullable_base_names_both_base_image_flags() {
        // Through the Docker-compatible API the reason ends with a newline.
        let why = format!("Docker stream error: {PODMAN_PULL}\n");
        let err = build_failed(&image("127.0.0.1:1/debian:bookworm-slim"), &why, &[]);
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text:?}");
        for needle in [
            "base image 127.0.0.1:1/debian:bookworm-slim is not on this machine",
            "--base-image IMAGE",
            "--proxy-base-image IMAGE",
            "connection refused",
        ] {
            assert!(text.contains(needle), "{needle:?} missing: {text}");
        }
        assert!(!text.contains("--ca-bundle"), "{text}");
        assert!(!text.ends_with('.'));
    }

    #[test]
    fn the_rlimit_error_points_to_the_containers_conf_fix() {
        for err in [
            build_failed(&image("b"), "exit status 1", &[RUNC_RLIMIT.to_owned()]),
            explain(anyhow!("{RUNC_RLIMIT}").context("cannot start container paude-x-proxy")),
        ] {
            let text = format!("{err:#}");
            for needle in [
                "cannot apply Podman's default ulimits",
                "(error setting rlimit type 7: operation not permitted)",
                "default_ulimits",
                "CONTAINERS_CONF",
                "Troubleshooting\" in README.md",
            ] {
                assert!(text.contains(needle), "{needle:?} missing: {text}");
            }
        }
        // Explaining twice adds nothing.
        let once = explain(anyhow!("{RUNC_RLIMIT}"));
        let text = format!("{once:#}");
        assert_eq!(format!("{:#}", explain(once)), text);
    }

    #[test]
    fn other_errors_are_left_as_they_were() {
        let err = explain(anyhow!("no session named demo: see `paude-launch list`"));
        assert_eq!(
            format!("{err:#}"),
            "no session named demo: see `paude-launch list`"
        );
        let text = build_failed(&image("b"), "exit status 100", &["E: oops".into()]).to_string();
        assert!(
            text.contains("exit status 100") && text.contains("E: oops"),
            "{text}"
        );
        assert!(text.contains("--ca-bundle"), "{text}");
    }
}
