//! CONNECT targets and host normalisation. For any text: parsing never panics, a parsed host
//! or target printed and parsed again is the same (normalising twice changes nothing), a name
//! holds only the characters and lengths a DNS name may, and no name reads as an IP literal
//! (which would slip past the rule that IP destinations need a rule naming them).

#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use paude_proxy::host::{normalise_name, split_host_port, Host, Target};

fn check_host(host: &Host, input: &str) {
    let shown = host.to_string();
    assert_eq!(
        Host::parse(&shown).as_ref(),
        Ok(host),
        "{input:?} normalised to {shown:?}, which parses to something else"
    );
    if let Host::Name(name) = host {
        assert!(
            !name.is_empty() && name.len() <= 253,
            "{input:?} gave {name:?}"
        );
        for label in name.split('.') {
            assert!(
                !label.is_empty() && label.len() <= 63,
                "{input:?} gave {name:?}"
            );
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'_'),
                "{input:?} gave {name:?}"
            );
        }
        assert!(
            name.parse::<IpAddr>().is_err(),
            "{input:?} normalised to the name {name:?}, which is an IP literal"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(host) = Host::parse(text) {
        check_host(&host, text);
    }
    if let Ok(name) = normalise_name(text) {
        let again = normalise_name(&name).expect("a normal name stays valid");
        assert_eq!(again, name, "normalising {text:?} twice changed it");
    }
    for default in [None, Some(443)] {
        if let Ok(target) = Target::parse(text, default) {
            assert_ne!(target.port, 0, "{text:?} gave port 0");
            check_host(&target.host, text);
            let shown = target.to_string();
            assert_eq!(
                Target::parse(&shown, None).as_ref(),
                Ok(&target),
                "{text:?} normalised to {shown:?}, which parses to something else"
            );
        }
    }
    if let Ok((host, port)) = split_host_port(text) {
        assert!(text.starts_with(host), "the host part comes first");
        if let Some(port) = port {
            assert!(text.ends_with(port), "the port part comes last");
        }
    }
});
