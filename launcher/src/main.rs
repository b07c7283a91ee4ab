//! The paude-launch binary: parse the command line, run the verb, map the result to an exit
//! code. Everything else lives in the library (see `lib.rs`).

use std::process::ExitCode;

use clap::Parser;
use paude_launch::{app, cli};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paude-launch: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(app::run(cli));
    // Reading stdin (attach, git bridge) parks a blocking thread that only returns on the next
    // keystroke; do not wait for it on the way out.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("paude-launch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
