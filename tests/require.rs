//! The check every test suite runs before it drives a program of the machine's: when one is
//! missing, the test fails at once and names the Debian package to install, instead of failing
//! later with a deep error or a timeout. Each crate's tests include this file with
//! `#[path = "../../tests/require.rs"] mod require;`; `.ci/run` installs every package a suite
//! names here.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A program a test drives: its name, where it may be, and the package that brings it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// The name the message shows.
    pub name: &'static str,
    /// Where it may be: absolute paths, or names searched on PATH and in the sbin directories;
    /// empty for its own name.
    pub candidates: &'static [&'static str],
    /// The Debian package that installs it.
    pub package: &'static str,
}

/// A program found by its own name on PATH (or in /usr/sbin, /sbin).
pub const fn program(name: &'static str, package: &'static str) -> Tool {
    Tool {
        name,
        candidates: &[],
        package,
    }
}

/// Fails the calling test, naming every missing tool and the packages that bring them.
pub fn require(tools: &[Tool]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(message) = missing_message(tools, &search_dirs(&path)) {
        panic!("{message}");
    }
}

/// The directories a tool is looked for in: PATH, then the sbin directories a non-login PATH
/// may lack (runc, debootstrap and squid live there on Debian).
pub fn search_dirs(path: &std::ffi::OsStr) -> Vec<PathBuf> {
    std::env::split_paths(path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .collect()
}

/// What to tell the user when some of `tools` are not in `dirs`, or `None` when all are there.
pub fn missing_message(tools: &[Tool], dirs: &[PathBuf]) -> Option<String> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| !found(t, dirs)).collect();
    if missing.is_empty() {
        return None;
    }
    let names: Vec<&str> = missing.iter().map(|t| t.name).collect();
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let (verb, them) = if missing.len() == 1 {
        ("is", "it")
    } else {
        ("are", "them")
    };
    Some(format!(
        "{} {verb} not installed, and this test needs {them}: install with \
         `apt-get install -y {}` (or run `bash .ci/run` as root, which installs everything the \
         tests need and runs them)",
        names.join(", "),
        packages.join(" ")
    ))
}

fn found(tool: &Tool, dirs: &[PathBuf]) -> bool {
    let candidates: &[&str] = match tool.candidates {
        [] => std::slice::from_ref(&tool.name),
        list => list,
    };
    candidates.iter().any(|c| {
        if c.starts_with('/') {
            Path::new(c).is_file()
        } else {
            dirs.iter().any(|d| d.join(c).is_file())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_with_its_package_and_the_ci_script() {
        let dir = std::env::temp_dir().join(format!("paude-require-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("present"), "").unwrap();
        let dirs = vec![dir.clone()];
        let present = program("present", "present-pkg");
        assert_eq!(missing_message(&[present], &dirs), None);
        let message = missing_message(&[present, program("curl", "curl")], &dirs).unwrap();
        assert_eq!(
            message,
            "curl is not installed, and this test needs it: install with `apt-get install -y \
             curl` (or run `bash .ci/run` as root, which installs everything the tests need and \
             runs them)"
        );
        let both = [program("runc", "runc"), program("podman", "podman")];
        let message = missing_message(&both, &dirs).unwrap();
        assert!(message.starts_with("runc, podman are not installed, and this test needs them: install with `apt-get install -y podman runc`"), "{message}");
        let by_path = Tool {
            name: "catatonit",
            candidates: &["/nonexistent/catatonit", "present"],
            package: "catatonit",
        };
        assert_eq!(missing_message(&[by_path], &dirs), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
