//! The paude-proxy binary. Everything it does is [`paude_proxy::entry::main`], which programs
//! that carry the proxy (paude-launch) run too.

fn main() -> std::process::ExitCode {
    paude_proxy::entry::main()
}
