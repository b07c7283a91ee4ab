//! Two things the library includes from `OUT_DIR`:
//!
//! - `embedded_policies.rs`: the repository's `policies/*.txt` as `(file name,
//!   include_str!(path))` pairs that `policy::EMBEDDED` includes, so a group file added to
//!   `policies/` is compiled in without touching the code.
//! - `build_id.rs`: the build identity, a SHA-256 over everything that decides what this build
//!   of paude-proxy does: its sources, build script and manifest, the policies, the workspace
//!   manifest (profiles) and `Cargo.lock`, the profile, target, Rust flags and compiler. It
//!   depends on nothing a sibling crate can change, such as the features a workspace build
//!   unifies for shared dependencies, so two builds of the same inputs carry the same identity
//!   even when their bytes differ. paude-launch tags the proxy image with it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let policies = manifest_dir.join("../policies");
    let policy_files = policy_files(&policies);
    write_embedded_policies(&policy_files, &out_dir.join("embedded_policies.rs"));
    write_build_id(&manifest_dir, &policy_files, &out_dir.join("build_id.rs"));
}

/// The `*.txt` files of the policies directory, sorted.
fn policy_files(dir: &Path) -> Vec<PathBuf> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read the policies directory {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    names.sort();
    names
}

fn write_embedded_policies(files: &[PathBuf], dest: &Path) {
    let mut out = String::from("&[\n");
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("policy file names are UTF-8");
        let full = path.canonicalize().expect("policy file exists");
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            full.display().to_string()
        )
        .expect("writing to a String");
    }
    out.push_str("]\n");
    std::fs::write(dest, out).expect("OUT_DIR is writable");
}

fn write_build_id(manifest_dir: &Path, policy_files: &[PathBuf], dest: &Path) {
    let mut hasher = Sha256::new();
    let mut add = |label: &str, bytes: &[u8]| {
        hasher.update((label.len() as u64).to_le_bytes());
        hasher.update(label.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    let mut sources = Vec::new();
    walk(&manifest_dir.join("src"), &mut sources);
    sources.sort();
    let workspace = manifest_dir.join("..");
    let files = sources
        .iter()
        .map(|p| (p.clone(), true))
        .chain([
            (manifest_dir.join("build.rs"), true),
            (manifest_dir.join("Cargo.toml"), true),
            // Absent when the crate is built outside this workspace.
            (workspace.join("Cargo.toml"), false),
            (workspace.join("Cargo.lock"), false),
        ])
        .chain(policy_files.iter().map(|p| (p.clone(), true)));
    for (path, required) in files {
        println!("cargo:rerun-if-changed={}", path.display());
        // Paths relative to the crate, so that every clone of the same sources agrees.
        let label = path
            .strip_prefix(manifest_dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        match std::fs::read(&path) {
            Ok(bytes) => add(&label, &bytes),
            Err(e) if required => panic!("cannot read {}: {e}", path.display()),
            Err(_) => add(&label, b"(absent)"),
        }
    }
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("src").display()
    );
    for key in [
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_CFG_TARGET_FEATURE",
    ] {
        add(key, std::env::var(key).unwrap_or_default().as_bytes());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(&rustc)
        .arg("-vV")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    add("rustc -vV", &version);
    let id: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let code = format!(
        "/// The build identity: a SHA-256 over this build's sources, policies, lock file, profile,\n\
         /// target, Rust flags and compiler (see `build.rs`).\n\
         pub const BUILD_ID: &str = {id:?};\n\
         /// What `--version` prints after the name: the version and the build identity. Programs\n\
         /// that carry paude-proxy find the identity in a binary's bytes by this text.\n\
         pub const LONG_VERSION: &str = \"{version} (build {id})\";\n"
    );
    std::fs::write(dest, code).expect("OUT_DIR is writable");
}

/// Every file below `dir`, recursively.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read the source directory {}: {e}", dir.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}
