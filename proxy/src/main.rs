//! The paude-proxy binary: parse flags, load and validate everything before binding, then
//! either print the effective allowlist (`--check`, and with `--install-as` put the checked
//! file in place) or run the proxy. Errors end with a non-zero exit code and one clear message.

use std::process::ExitCode;

use clap::Parser;
use paude_proxy::config::{self, Cli, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paude-proxy: error: {e:#}");
            ExitCode::from(2)
        }
    }
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
    let served = runtime.block_on(paude_proxy::start(cli, loaded));
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
