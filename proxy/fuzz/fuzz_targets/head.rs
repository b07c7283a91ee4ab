//! The first request head of a connection, as the bare-socket CONNECT path reads it: any bytes
//! are classified (CONNECT, plain HTTP for hyper, malformed) without a panic, the answer does
//! not depend on how the bytes were split across reads, and a CONNECT's authority goes on
//! through the target parser as the handler takes it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use paude_proxy::head::{classify, First};
use paude_proxy::host::Target;

/// The default `--max-header-bytes`.
const MAX_HEAD: usize = 65536;
/// The read sizes the split feed cycles through: single bytes, odd sizes, a page.
const SPLITS: [usize; 6] = [1, 3, 17, 64, 509, 4096];

/// Feeds `data` the way `read_first` sees it, `chunk` bytes more at a time.
fn fed(data: &[u8], mut chunk: impl FnMut() -> usize) -> Option<First> {
    let mut buf = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = chunk().min(data.len() - at);
        buf.extend_from_slice(&data[at..at + n]);
        at += n;
        if let Some(first) = classify(&mut buf, MAX_HEAD) {
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
    if data.len() < MAX_HEAD {
        match (&whole, &split) {
            // Split bytes stop at the same head; what follows it is the rest either way, up to
            // the end of the read that completed it.
            (
                Some(First::Connect {
                    authority: a,
                    rest: r,
                }),
                Some(First::Connect {
                    authority: b,
                    rest: s,
                }),
            ) => {
                assert_eq!(a, b);
                assert!(r.starts_with(s), "the bytes behind the head were lost");
            }
            (Some(First::Http { read: a }), Some(First::Http { read: b })) => {
                assert!(
                    a.starts_with(b),
                    "plain HTTP is replayed from its first byte"
                );
            }
            (a, b) => assert_eq!(a, b, "the split changed the answer"),
        }
    }
    if let Some(First::Connect { authority, rest }) = whole {
        let head = data.len() - rest.len();
        assert!(
            data[..head].ends_with(b"\n"),
            "a complete head ends with its blank line"
        );
        if let Ok(target) = Target::parse(&authority, None) {
            let again = Target::parse(&target.to_string(), None);
            assert_eq!(
                again.as_ref(),
                Ok(&target),
                "{authority:?} is not normal after one parse"
            );
        }
    }
});
