//! The ClientHello inspection of the SNI guard. Any first tunnel bytes are classified (a
//! hello with its server name, or opaque) without a panic or a hang, the answer does not depend
//! on how the bytes were split across reads, and the SNI comparison with the CONNECT host runs
//! on whatever name a hello carries.

#![no_main]

use libfuzzer_sys::fuzz_target;
use paude_proxy::host::Host;
use paude_proxy::tls::{FirstBytes, HelloNames, HelloParser};

/// The read sizes the split feed cycles through.
const SPLITS: [usize; 5] = [1, 5, 64, 517, 4096];

fn fed(data: &[u8], mut chunk: impl FnMut() -> usize) -> Option<FirstBytes> {
    let mut parser = HelloParser::default();
    let mut at = 0;
    while at < data.len() {
        at += chunk().min(data.len() - at);
        if let Some(first) = parser.push(&data[..at]) {
            return Some(first);
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let whole = fed(data, || usize::MAX);
    let mut i = 0;
    let split = fed(data, || {
        i += 1;
        SPLITS[i % SPLITS.len()]
    });
    match (&whole, &split) {
        // A split can decide earlier (a complete hello in a prefix, then more bytes behind it);
        // it must never decide differently once the whole hello is there.
        (Some(FirstBytes::Tls(a)), Some(FirstBytes::Tls(b))) => assert_eq!(a, b),
        (Some(FirstBytes::Opaque), Some(FirstBytes::Opaque)) | (None, None) => {}
        (Some(FirstBytes::Opaque), Some(FirstBytes::Tls(_))) => {}
        (a, b) => panic!("whole bytes gave {a:?}, split bytes gave {b:?}"),
    }
    if let Some(FirstBytes::Tls(HelloNames {
        sni: Some(name), ..
    })) = &whole
    {
        // What the tunnel compares with the CONNECT host.
        if let Ok(host) = Host::parse(name) {
            assert_eq!(Host::parse(&host.to_string()).as_ref(), Ok(&host));
        }
    }
});
