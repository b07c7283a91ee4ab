//! Image build contexts: the proxy and agent Dockerfiles from `images/`, the files that go with
//! them, and the hash of all inputs that tags each image so an unchanged image is never rebuilt.
//! The contexts are plain data (`ImagePlan`), so both backends build the very same bytes.
//!
//! The paude-proxy binary counts in the proxy image's hash by its build identity (see
//! [`proxy_identity`]), not by its bytes: cargo links a crate differently depending on which
//! sibling crates one invocation builds (feature unification), and a tag that followed the bytes
//! would flip between two images of the same proxy.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::agents::Agent;

/// The proxy image's Dockerfile template.
const PROXY_DOCKERFILE: &str = include_str!("../../images/proxy/Dockerfile");
/// The agent image's Dockerfile template.
const AGENT_DOCKERFILE: &str = include_str!("../../images/agent/Dockerfile");
/// The agent container's entry point script.
const AGENT_SESSION_SCRIPT: &str = include_str!("../../images/agent/paude-session");

/// The default base of both images when the proxy binary is dynamically linked.
pub const DEBIAN_BASE: &str = "docker.io/library/debian:bookworm-slim";

/// The base used for the proxy image when the paude-proxy binary is statically linked.
pub const SCRATCH: &str = "scratch";

/// One file of a build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextFile {
    /// Path inside the context, `/`-separated.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    /// The file's bytes (shared: the proxy binary is large).
    pub contents: Arc<Vec<u8>>,
    /// What the file counts as in the image hash instead of its bytes: a built binary's
    /// identity. `None` hashes the bytes.
    pub identity: Option<String>,
}

/// A local image to build: its reference, the hash of its inputs and its build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePlan {
    /// Repository part of the reference, e.g. `localhost/paude-proxy`.
    pub repository: String,
    /// Hex digest over the Dockerfile and every context file (path, mode, bytes).
    pub hash: String,
    /// The rendered Dockerfile (also present in `files` as `Dockerfile`).
    pub dockerfile: String,
    /// Every file of the build context, sorted by path, including the Dockerfile.
    pub files: Vec<ContextFile>,
}

impl ContextFile {
    /// A file that counts in the image hash by its bytes.
    pub fn new(path: &str, mode: u32, contents: Arc<Vec<u8>>) -> Self {
        ContextFile {
            path: path.to_owned(),
            mode,
            contents,
            identity: None,
        }
    }
}

impl ImagePlan {
    /// Builds a plan from a repository, a rendered Dockerfile and the other context files.
    pub fn new(repository: &str, dockerfile: String, mut files: Vec<ContextFile>) -> Self {
        files.push(ContextFile::new(
            "Dockerfile",
            0o644,
            Arc::new(dockerfile.clone().into_bytes()),
        ));
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut hasher = Sha256::new();
        for f in &files {
            hasher.update((f.path.len() as u64).to_le_bytes());
            hasher.update(f.path.as_bytes());
            hasher.update(f.mode.to_le_bytes());
            // Which of the two a file counts by is hashed too, so an identity can never pass
            // for a file holding those bytes.
            let (kind, counted) = match &f.identity {
                Some(id) => (1u8, id.as_bytes()),
                None => (0u8, f.contents.as_slice()),
            };
            hasher.update([kind]);
            hasher.update((counted.len() as u64).to_le_bytes());
            hasher.update(counted);
        }
        let hash = hex::encode(hasher.finalize());
        ImagePlan {
            repository: repository.to_owned(),
            hash,
            dockerfile,
            files,
        }
    }

    /// The tag: the first 16 hex digits of the input hash.
    pub fn tag(&self) -> &str {
        &self.hash[..16]
    }

    /// The full reference, `repository:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag())
    }
}

/// What the user's project asks of its agent image (from paude.json or devcontainer.json),
/// already stripped of everything that could weaken isolation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Customisation {
    /// Replaces `--base-image`.
    pub base: Option<String>,
    /// The project's own Dockerfile (devcontainer `build.dockerfile`), built first and used as
    /// the agent image's base.
    pub base_build: Option<ImagePlan>,
    /// Debian packages installed into the image.
    pub packages: Vec<String>,
    /// Shell commands run as root at the end of the image build.
    pub setup: Vec<String>,
    /// A command run once in the workspace at the first start (devcontainer postCreateCommand).
    pub post_create: Option<String>,
    /// Environment variables set in the agent container.
    pub env: BTreeMap<String, String>,
    /// Where the customisation came from, for messages.
    pub source: Option<String>,
}

/// The loaded inputs of both images.
#[derive(Debug, Clone)]
pub struct ImageInputs {
    /// The paude-proxy binary: this paude-launch itself (it is paude-proxy when run under that
    /// name) or the one `PAUDE_PROXY_BIN` names.
    pub proxy_binary: Arc<Vec<u8>>,
    /// What the binary counts as in the proxy image's hash (see [`proxy_identity`]).
    pub proxy_identity: String,
    /// Whether that binary needs no dynamic loader (then `scratch` is a valid base).
    pub proxy_is_static: bool,
    /// The extra CA bundle, if any.
    pub ca_bundle: Option<Arc<Vec<u8>>>,
}

/// The proxy image for a base (or the automatic choice when `base` is `None`).
pub fn proxy_image(inputs: &ImageInputs, base: Option<&str>, debian_base: &str) -> ImagePlan {
    let base = match base {
        Some(b) => b,
        None if inputs.proxy_is_static => SCRATCH,
        None => debian_base,
    };
    let dockerfile = PROXY_DOCKERFILE.replace("{{BASE}}", base);
    let files = vec![ContextFile {
        identity: Some(inputs.proxy_identity.clone()),
        ..ContextFile::new("paude-proxy", 0o755, inputs.proxy_binary.clone())
    }];
    ImagePlan::new("localhost/paude-proxy", dockerfile, files)
}

/// The marker paude-proxy's `--version` text puts before its build identity.
const BUILD_MARKER: &[u8] = b"(build ";

/// What a paude-proxy binary counts as in the proxy image's hash: `paude-proxy build ID` with
/// the build identity it carries (a SHA-256 over its sources, policies, lock file, profile,
/// target, Rust flags and compiler, fixed by its build script), found in its bytes after the
/// `(build ` of its `--version` text. Two builds of the same inputs agree however cargo
/// unified their dependencies' features. A binary without one (not built from this
/// workspace) counts by the SHA-256 of its bytes.
pub fn proxy_identity(bytes: &[u8]) -> String {
    let found = bytes
        .windows(BUILD_MARKER.len() + 65)
        .filter(|w| w.starts_with(BUILD_MARKER) && w[w.len() - 1] == b')')
        .map(|w| &w[BUILD_MARKER.len()..w.len() - 1])
        .find(|id| id.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    match found {
        Some(id) => format!("paude-proxy build {}", String::from_utf8_lossy(id)),
        None => format!("sha256 {}", hex::encode(Sha256::digest(bytes))),
    }
}

/// The identity of the proxy built into this paude-launch.
pub fn builtin_proxy_identity() -> String {
    format!("paude-proxy build {}", paude_proxy::BUILD_ID)
}

/// The agent image for one agent on a base, with the project's customisation.
pub fn agent_image(
    agent: &Agent,
    base: &str,
    inputs: &ImageInputs,
    custom: &Customisation,
) -> ImagePlan {
    let built_base = custom.base_build.as_ref().map(ImagePlan::reference);
    let base = built_base
        .as_deref()
        .or(custom.base.as_deref())
        .unwrap_or(base);
    let ca_env = if inputs.ca_bundle.is_some() {
        "ENV NODE_EXTRA_CA_CERTS=/etc/paude/ca-bundle.crt"
    } else {
        "# No extra CA bundle was given."
    };
    let dockerfile = AGENT_DOCKERFILE
        .replace("{{BASE}}", base)
        .replace("{{CA_ENV}}", ca_env);
    let files = vec![
        ContextFile::new(
            "ca-bundle.crt",
            0o644,
            inputs.ca_bundle.clone().unwrap_or_default(),
        ),
        ContextFile::new(
            "install.sh",
            0o644,
            Arc::new(install_script(agent, custom).into_bytes()),
        ),
        ContextFile::new(
            "paude-session",
            0o755,
            Arc::new(AGENT_SESSION_SCRIPT.as_bytes().to_vec()),
        ),
    ];
    ImagePlan::new(
        &format!("localhost/paude-agent-{}", agent.name),
        dockerfile,
        files,
    )
}

/// The root script that installs the project's packages, the agent and the project's setup.
fn install_script(agent: &Agent, custom: &Customisation) -> String {
    let mut script =
        String::from("# Installs the agent and the project's additions (run as root).\n");
    if !custom.packages.is_empty() {
        let quoted =
            shlex::try_join(custom.packages.iter().map(String::as_str)).unwrap_or_default();
        script.push_str(&format!(
            "apt-get update\napt-get install -y --no-install-recommends {quoted}\nrm -rf /var/lib/apt/lists/*\n"
        ));
    }
    for line in agent.install {
        script.push_str(line);
        script.push('\n');
    }
    for line in &custom.setup {
        script.push_str(line);
        script.push('\n');
    }
    script
}

/// Whether an ELF executable is statically linked (has no program interpreter).
pub fn elf_is_static(bytes: &[u8]) -> bool {
    match goblin::elf::Elf::parse(bytes) {
        Ok(elf) => elf.interpreter.is_none(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents;

    fn inputs() -> ImageInputs {
        ImageInputs {
            proxy_binary: Arc::new(b"binary".to_vec()),
            proxy_identity: "paude-proxy build test".into(),
            proxy_is_static: true,
            ca_bundle: None,
        }
    }

    #[test]
    fn static_proxy_uses_scratch_and_dynamic_uses_debian() {
        let img = proxy_image(&inputs(), None, "debian:bookworm-slim");
        assert!(img.dockerfile.contains("FROM scratch\n"));
        let mut dynamic = inputs();
        dynamic.proxy_is_static = false;
        let img = proxy_image(&dynamic, None, "debian:bookworm-slim");
        assert!(img.dockerfile.contains("FROM debian:bookworm-slim\n"));
        let img = proxy_image(&dynamic, Some("localhost/base"), "debian:bookworm-slim");
        assert!(img.dockerfile.contains("FROM localhost/base\n"));
    }

    #[test]
    fn tag_changes_with_every_input() {
        let shell = agents::find("shell").unwrap();
        let custom = Customisation::default();
        let a = agent_image(shell, "base", &inputs(), &custom);
        assert_eq!(a, agent_image(shell, "base", &inputs(), &custom));
        assert_eq!(a.tag().len(), 16);
        assert!(a.reference().starts_with("localhost/paude-agent-shell:"));
        let other_base = agent_image(shell, "other", &inputs(), &custom);
        assert_ne!(a.tag(), other_base.tag());
        let mut with_ca = inputs();
        with_ca.ca_bundle = Some(Arc::new(b"PEM".to_vec()));
        let ca = agent_image(shell, "base", &with_ca, &custom);
        assert_ne!(a.tag(), ca.tag());
        assert!(ca.dockerfile.contains("NODE_EXTRA_CA_CERTS"));
        let custom = Customisation {
            packages: vec!["jq".into()],
            ..Customisation::default()
        };
        assert_ne!(
            a.tag(),
            agent_image(shell, "base", &inputs(), &custom).tag()
        );
        // The proxy binary counts by its identity: other bytes of the same build keep the tag,
        // another build changes it.
        let mut other_bytes = inputs();
        other_bytes.proxy_binary = Arc::new(b"binary2".to_vec());
        assert_eq!(
            proxy_image(&inputs(), None, "d").tag(),
            proxy_image(&other_bytes, None, "d").tag()
        );
        let mut other_build = inputs();
        other_build.proxy_identity = "paude-proxy build other".into();
        assert_ne!(
            proxy_image(&inputs(), None, "d").tag(),
            proxy_image(&other_build, None, "d").tag()
        );
    }

    #[test]
    fn a_proxy_binary_is_known_by_the_build_identity_it_carries() {
        let id = "0123456789abcdef".repeat(4);
        let binary = format!("\x7fELF...paude-proxy 0.1.0 (build {id})...").into_bytes();
        assert_eq!(proxy_identity(&binary), format!("paude-proxy build {id}"));
        // The same build linked differently carries the same identity.
        let relinked = format!("other bytes (build {id}) more").into_bytes();
        assert_eq!(proxy_identity(&binary), proxy_identity(&relinked));
        // Without a well-formed identity, the bytes are what counts.
        for other in [
            b"no marker at all".to_vec(),
            format!("(build {})", "g".repeat(64)).into_bytes(),
            format!("(build {}", "a".repeat(64)).into_bytes(),
        ] {
            let counted = proxy_identity(&other);
            assert!(counted.starts_with("sha256 "), "{counted}");
            assert_ne!(counted, proxy_identity(b"different bytes"));
        }
        assert_eq!(
            builtin_proxy_identity(),
            format!("paude-proxy build {}", paude_proxy::BUILD_ID)
        );
    }

    #[test]
    fn install_script_has_packages_agent_then_setup() {
        let claude = agents::find("claude").unwrap();
        let custom = Customisation {
            packages: vec!["jq".into(), "ripgrep".into()],
            setup: vec!["echo done".into()],
            ..Customisation::default()
        };
        let script = install_script(claude, &custom);
        let pkgs = script
            .find("install -y --no-install-recommends jq ripgrep")
            .unwrap();
        let agent = script.find("@anthropic-ai/claude-code").unwrap();
        let setup = script.find("echo done").unwrap();
        assert!(pkgs < agent && agent < setup, "{script}");
    }

    #[test]
    fn context_is_sorted_and_contains_the_dockerfile() {
        let img = agent_image(
            agents::find("shell").unwrap(),
            "b",
            &inputs(),
            &Customisation::default(),
        );
        let paths: Vec<_> = img.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            ["Dockerfile", "ca-bundle.crt", "install.sh", "paude-session"]
        );
    }

    #[test]
    fn non_elf_is_not_static() {
        assert!(!elf_is_static(b"#!/bin/sh\n"));
    }
}
