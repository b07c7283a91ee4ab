//! The proxy image's tag does not depend on how cargo built paude-proxy. One cargo invocation
//! links a crate with the union of the features every crate it builds asks of a shared
//! dependency, so `cargo build -p paude-proxy` and a build of the whole workspace produce
//! different paude-proxy binaries from the same sources. paude-launch tags the proxy image with
//! the build identity those binaries carry, so both give the same image, and so does the proxy
//! built into paude-launch. A statically linked paude-proxy still gets its `scratch` image.
//!
//! These tests run cargo themselves, in this workspace's target directory (whose build lock
//! cargo does not hold while tests run), offline and with the committed lock file; a build
//! made here is found up to date by the next one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launcher/ has a parent")
        .to_path_buf()
}

/// `target/debug`, where this test binary's own build put paude-launch and paude-proxy.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its path");
    exe.parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .to_path_buf()
}

/// The target directory that holds `profile_dir()`.
fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("the profile directory is inside the target directory")
        .to_path_buf()
}

/// Runs cargo with `args` in the workspace, as this test's own build did: same target
/// directory, no network, the committed lock file, and none of the variables cargo sets for a
/// test process.
fn cargo(args: &[&str], rustflags: Option<&str>) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace())
        .args(args)
        .args(["--offline", "--locked", "--quiet", "--target-dir"])
        .arg(target_dir());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&key.as_str())
        {
            command.env_remove(&key);
        }
    }
    if let Some(flags) = rustflags {
        command.env("RUSTFLAGS", flags);
    }
    let out = command.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The proxy image paude-launch would build with `proxy_bin` (`None`: the proxy built in),
/// from its dry run: `(reference, base)`.
fn proxy_image(proxy_bin: Option<&Path>) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_paude-launch"));
    command
        .current_dir(dir.path())
        .args(["create", "demo", "--agent", "shell", "--dry-run"])
        .env_remove("PAUDE_BACKEND");
    match proxy_bin {
        Some(bin) => command.env("PAUDE_PROXY_BIN", bin),
        None => command.env_remove("PAUDE_PROXY_BIN"),
    };
    let out = command.output().expect("paude-launch runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout
        .lines()
        .skip_while(|l| !l.starts_with("image localhost/paude-proxy:"));
    let reference = lines
        .next()
        .and_then(|l| l.strip_prefix("image "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no proxy image in the dry run:\n{stdout}"))
        .to_owned();
    let base = lines
        .next()
        .and_then(|l| l.trim().strip_prefix("from:"))
        .unwrap_or_else(|| panic!("no base of the proxy image:\n{stdout}"))
        .trim()
        .to_owned();
    (reference, base)
}

/// What `--version` says of a paude-proxy binary (or of paude-launch run as paude-proxy).
fn long_version(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("the binary runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds paude-proxy with `args`, returns a copy of the binary it made, and puts back the
/// `target/debug/paude-proxy` and `paude-launch` this test's own build made, for the tests
/// that run after it.
fn built_copy(args: &[&str], name: &str, keep: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let ours = ["paude-proxy", "paude-launch"].map(|bin| profile_dir().join(bin));
    let saved = ours.clone().map(|path| std::fs::read(&path).ok());
    cargo(args, None);
    let copy = keep.join(name);
    std::fs::copy(&ours[0], &copy).expect("cargo built paude-proxy");
    for (path, bytes) in ours.iter().zip(saved) {
        if let Some(bytes) = bytes {
            // A new file, not a write through the link cargo made to its own output.
            let _ = std::fs::remove_file(path);
            std::fs::write(path, bytes).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    copy
}

#[test]
fn the_proxy_image_tag_does_not_depend_on_the_crates_built_beside_the_proxy() {
    let keep = tempfile::tempdir().unwrap();
    // paude-proxy alone, then beside paude-launch: the second links the proxy's dependencies
    // with the features paude-launch asks for too.
    let alone = built_copy(&["build", "-p", "paude-proxy"], "alone", keep.path());
    let beside = built_copy(
        &["build", "-p", "paude-proxy", "-p", "paude-launch"],
        "beside",
        keep.path(),
    );
    let alone_bytes = std::fs::read(&alone).unwrap();
    let beside_bytes = std::fs::read(&beside).unwrap();
    assert_ne!(
        alone_bytes, beside_bytes,
        "the two builds are byte for byte the same, so this test shows nothing: build the \
         proxy beside a crate that unifies other features into its dependencies"
    );
    let version = long_version(&alone);
    assert!(version.contains("(build "), "{version}");
    assert_eq!(version, long_version(&beside));

    // This test's own paude-launch, built by `cargo test`, carries the proxy too, and runs as
    // it under that name.
    let as_proxy = keep.path().join("paude-proxy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_paude-launch"), &as_proxy).unwrap();
    assert_eq!(long_version(&as_proxy), version);

    let built_in = proxy_image(None);
    assert_eq!(proxy_image(Some(&alone)), built_in);
    assert_eq!(proxy_image(Some(&beside)), built_in);
    assert!(
        built_in.0.starts_with("localhost/paude-proxy:"),
        "{built_in:?}"
    );
}

#[test]
fn a_statically_linked_proxy_gets_a_scratch_image_of_its_own() {
    let host = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc names its host")
        .to_owned();
    assert!(
        host.ends_with("-linux-gnu"),
        "static glibc builds are tested on linux-gnu: {host}"
    );
    // The README's static build: glibc linked in, for an explicit target.
    let flags = match std::env::var("RUSTFLAGS") {
        Ok(f) if !f.trim().is_empty() => format!("{f} -C target-feature=+crt-static"),
        _ => "-C target-feature=+crt-static".to_owned(),
    };
    cargo(
        &["build", "-p", "paude-proxy", "--target", &host],
        Some(&flags),
    );
    let bin = target_dir().join(&host).join("debug/paude-proxy");
    let check = Command::new(&bin).arg("--check").output().expect("runs");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let (reference, base) = proxy_image(Some(&bin));
    assert_eq!(base, "scratch");
    let (dynamic, dynamic_base) = proxy_image(None);
    assert_ne!(reference, dynamic, "a static build is another build");
    assert_ne!(dynamic_base, "scratch");
}
