//! The TOML config file as text: any bytes parse into the file's settings or fail with a
//! message (a file that states no allowlist is refused), and whatever parses merges and
//! compiles, or fails, without a panic; a merged result keeps the invariants downstream code
//! relies on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

use paude_proxy::config::{parse_config_file, Cli};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Parsed as the proxy parses its file: a file that states no allowlist is refused.
    if let Ok(file) = parse_config_file(Path::new("fuzz.toml"), text, &Cli::default()) {
        assert!(!file.allow.is_empty(), "a file without an allowlist was accepted");
        paude_proxy_fuzz::merge_and_compile(file);
    }
});
