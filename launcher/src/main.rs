//! The paude-launch binary: parse the command line, run the verb, map the result to an exit
//! code. Everything else lives in the library (see `lib.rs`). Run under the name
//! `paude-proxy`, as it is in the proxy image, the binary is paude-proxy instead: the proxy
//! library's own command, untouched.

use std::process::ExitCode;

use clap::Parser;
use paude_launch::{app, backend, cli};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    if paude_proxy::entry::invoked_as_proxy() {
        return paude_proxy::entry::main();
    }
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paude-launch: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = app::run(cli) => result.map(|code| ExitCode::from(u8::try_from(code).unwrap_or(1))),
            code = interrupted() => Ok(code),
        }
    });
    // Reading stdin (attach, git bridge) parks a blocking thread that only returns on the next
    // keystroke; do not wait for it on the way out.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paude-launch: error: {:#}", backend::hints::explain(e));
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGINT, SIGTERM or SIGHUP and returns the shell's exit code for it. Returning drops
/// the verb that was running, and with it everything it started for the duration of the command
/// (a `podman system service` of its own, its socket directory), which a default signal death
/// would leave behind. A session's containers are never touched by this.
async fn interrupted() -> ExitCode {
    let kinds = [
        (SignalKind::interrupt(), 130),
        (SignalKind::terminate(), 143),
        (SignalKind::hangup(), 129),
    ];
    let mut streams = Vec::new();
    for (kind, code) in kinds {
        match signal(kind) {
            Ok(stream) => streams.push((stream, code)),
            // Without a handler the default action (exit) still applies; nothing to wait for.
            Err(_) => continue,
        }
    }
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let code = next_signal(&mut streams).await;
    if paude_launch::interrupt::guarded() {
        // The verb undoes what it was making and ends; a second signal ends it at once.
        eprintln!(
            "paude-launch: interrupted; undoing the unfinished create (interrupt again to leave \
             it as it is)"
        );
        paude_launch::interrupt::fire();
        let code = next_signal(&mut streams).await;
        eprintln!("paude-launch: interrupted again; the session is left as it is");
        return ExitCode::from(code);
    }
    eprintln!("paude-launch: interrupted; the session is left as it was");
    ExitCode::from(code)
}

/// The exit code of the next signal of `streams`.
async fn next_signal(streams: &mut [(tokio::signal::unix::Signal, u8)]) -> u8 {
    let waits = streams.iter_mut().map(|(stream, code)| {
        let code = *code;
        Box::pin(async move {
            stream.recv().await;
            code
        })
    });
    futures_util::future::select_all(waits).await.0
}
