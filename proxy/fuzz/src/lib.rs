//! What the config targets share: a parsed config file merged as the proxy merges it, the
//! invariants a merged [`Settings`] promises checked, and its policy compiled against the
//! embedded groups (a `policies` directory in the file is not read: the fuzz targets do no
//! file I/O).

use paude_proxy::config::{merge, Cli, FileConfig};
use paude_proxy::policy::{Groups, Policy};

/// Merges `file` under no flags and checks what `load` promises downstream code.
pub fn merge_and_compile(file: FileConfig) {
    let Ok(settings) = merge(&Cli::default(), file) else {
        return;
    };
    let limits = &settings.limits;
    assert!(limits.max_header_bytes >= 8192, "{limits:?}");
    assert!(limits.max_connections >= 1, "{limits:?}");
    for d in [
        limits.header_timeout,
        limits.dns_timeout,
        limits.connect_timeout,
        limits.idle_timeout,
    ] {
        assert!(!d.is_zero(), "a zero timeout was accepted: {limits:?}");
    }
    assert_ne!(settings.worker_threads, Some(0));
    for net in settings
        .policy
        .allow_cidr
        .iter()
        .chain(&settings.policy.allow_client)
    {
        assert_eq!(*net, net.trunc(), "CIDRs are stored truncated");
    }
    let groups = Groups::embedded().expect("the embedded groups parse");
    if let Ok(policy) = Policy::compile(&groups, &settings.policy) {
        let _ = policy.to_string();
        for (name, ip) in &settings.policy.resolve {
            if let Ok(normal) = paude_proxy::host::normalise_name(name) {
                assert_eq!(
                    policy.pin(&normal),
                    Some(*ip),
                    "the pin of {name:?} is lost"
                );
            }
        }
    }
}
