//! Policy files and `--allow`/`--deny` items. Any text as a group file (beside the embedded
//! groups, which it may include) parses and compiles or fails with a message, never a panic;
//! every rule that compiles allows the host it names, denies it once the same group is a deny
//! list, and prints as a pattern that compiles to itself again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use paude_proxy::host::Target;
use paude_proxy::policy::{Groups, Policy, PolicySettings, Via, EMBEDDED};

/// The group the fuzzed file defines.
const NAME: &str = "fuzzed";

fn compile(groups: &Groups, allow: &[&str], deny: &[&str]) -> Option<Policy> {
    let settings = PolicySettings {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    Policy::compile(groups, &settings).ok()
}

/// The host and port a printed pattern names, where it names exactly one.
fn named_target(pattern: &str) -> Option<Target> {
    if pattern == "all" || pattern.contains('*') {
        return None;
    }
    let exact = pattern.strip_prefix('.').unwrap_or(pattern);
    Target::parse(exact, Some(443)).ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = format!("policies/{NAME}.txt");
    let files = EMBEDDED
        .iter()
        .map(|(name, text)| (format!("policies/{name}"), *text))
        .chain([(path, text)])
        .collect::<Vec<_>>();
    let Ok(groups) = Groups::parse(files.iter().map(|(p, t)| (p.as_str(), *t))) else {
        return;
    };
    // The file's own lines as items too, the way `--allow` takes them.
    for line in text.lines().take(8) {
        if let Some(p) = compile(&groups, &[line], &[]) {
            let _ = p.to_string();
        }
    }
    let Some(allowing) = compile(&groups, &[NAME], &[]) else {
        return;
    };
    let _ = allowing.to_string();
    let denying = compile(&groups, &["all"], &[NAME]).expect("what allows compiles as a deny too");
    for entry in allowing.entries() {
        let pattern = &*entry.pattern;
        // Printed patterns are normal: compiled alone they print the same. A single-label
        // name is printed without the trailing dot that keeps it from reading as a group.
        let item = if pattern.contains(['.', ':', '*', '[']) || pattern == "all" {
            pattern.to_owned()
        } else {
            format!("{pattern}.")
        };
        let alone = compile(&Groups::default(), &[&item], &[])
            .unwrap_or_else(|| panic!("the printed pattern {item:?} does not compile"));
        if pattern != "all" {
            assert_eq!(
                &*alone.entries()[0].pattern,
                pattern,
                "{item:?} is not normal"
            );
        }
        if let Some(target) = named_target(pattern) {
            let allowed = allowing.decide(&target, Via::Connect);
            assert!(
                allowed.allowed,
                "{pattern:?} does not allow {target}: {allowed:?}"
            );
            let denied = denying.decide(&target, Via::Connect);
            assert!(
                !denied.allowed,
                "{pattern:?} as a deny rule lets {target} through"
            );
        }
    }
});
