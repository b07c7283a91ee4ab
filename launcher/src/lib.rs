//! paude-launch: runs AI coding agents in a container whose only way out is paude-proxy.
//!
//! Module map: `cli` (flags as parsed) → `spec` (validated request) → `plan` (everything
//! decided, pure) with `agents` (agents as data) and `images` (build contexts and input
//! hashes) and `customise` (paude.json / devcontainer.json) → `backend` (the `Backend` trait; `podman`, `openshift`) applies a plan; `app` runs
//! the verbs; `git` syncs the user's repository with a session; `progress` shows image builds. `main.rs` only parses the
//! command line and maps the result to an exit code.

pub mod agents;
pub mod app;
pub mod backend;
pub mod cli;
pub mod customise;
pub mod git;
pub mod images;
pub mod interrupt;
pub mod plan;
pub mod progress;
pub mod spec;

#[cfg(test)]
#[path = "../../tests/require.rs"]
mod require;
