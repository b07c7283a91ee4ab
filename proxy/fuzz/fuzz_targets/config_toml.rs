//! The TOML config file as text: any bytes parse into the file's settings or fail with a
//! message, and whatever parses merges and compiles, or fails, without a panic; a merged
//! result keeps the invariants downstream code relies on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use paude_proxy::config::FileConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        paude_proxy_fuzz::merge_and_compile(file);
    }
});
