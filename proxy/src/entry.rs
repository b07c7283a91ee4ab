//! The paude-proxy command itself: parse flags, load and validate everything before binding,
//! then either print the effective allowlist (`--check`, and with `--install-as` put the
//! checked file in place) or run the proxy. Errors end with a
//! non-zero exit code and one clear message.
//!
//! It lives in the library so that every program that carries the proxy runs exactly this
//! code: the paude-proxy binary calls [`main`], and paude-launch calls it when it is run under
//! the name `paude-proxy` (as it is in the proxy image), so the launcher's proxy and the
//! standalone one cannot behave differently.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::config::{self, Cli, LogFormat};

/// The program name under which a binary that carries the proxy acts as paude-proxy.
pub const PROGRAM: &str = "paude-proxy";

/// Runs paude-proxy with this process's arguments and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paude-proxy: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether this process was started under the name `paude-proxy` (the file name of its
/// `argv[0]`), so that a program carrying the proxy should run [`main`] instead of itself.
pub fn invoked_as_proxy() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|argv0| is_proxy_name(Path::new(&argv0)))
}

/// Whether `argv0` names paude-proxy (`paude-proxy`, `/usr/local/bin/paude-proxy`, ...).
pub fn is_proxy_name(argv0: &Path) -> bool {
    argv0.file_name().is_some_and(|name| name == PROGRAM)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let loaded = config::load(&cli)?;
    if cli.check {
        print!("{}", loaded.policy);
        println!("paude-proxy: configuration ok");
        if let (Some(dest), Some(source)) = (&cli.install_as, &cli.config) {
            config::install(source, dest)?;
            println!(
                "paude-proxy: installed {} as {}",
                source.display(),
                dest.display()
            );
        }
        return Ok(());
    }
    init_tracing(loaded.settings.log_format);
    // The control runtime: signals, reloads, admin endpoints and the audit writer. Connections
    // are served by threads `start` creates, each with a runtime of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(crate::start(cli, loaded));
    // A write to a stdout nobody reads blocks a thread of the runtime's blocking pool for good;
    // `start` has already given up on it, so the exit must not wait for it either.
    runtime.shutdown_background();
    served
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,hickory_resolver=warn,hickory_proto=warn,hickory_net=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_file_name_paude_proxy_selects_the_proxy() {
        for name in ["paude-proxy", "/usr/local/bin/paude-proxy", "./paude-proxy"] {
            assert!(is_proxy_name(Path::new(name)), "{name}");
        }
        for name in [
            "paude-launch",
            "/usr/bin/paude-proxy-old",
            "paude-proxy/x",
            "",
        ] {
            assert!(!is_proxy_name(Path::new(name)), "{name}");
        }
    }

    #[test]
    fn the_build_identity_is_a_sha256_and_in_the_long_version() {
        assert_eq!(crate::BUILD_ID.len(), 64);
        assert!(crate::BUILD_ID.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(crate::LONG_VERSION.ends_with(&format!("(build {})", crate::BUILD_ID)));
    }
}
