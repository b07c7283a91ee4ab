//! The audit line. Whatever a record holds (hosts and server names come from clients), it is
//! written as exactly one line of valid JSON, with every key the launcher's `blocked` command
//! reads, and the values read back are the values written.

#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use paude_proxy::audit::Record;
use paude_proxy::error::Reason;
use paude_proxy::policy::Decision;
use serde_json::Value;

#[derive(Debug, Arbitrary)]
struct Input {
    client: SocketAddr,
    method: Option<u8>,
    host: String,
    port: u16,
    resolved: Option<SocketAddr>,
    allowed: bool,
    reason: u8,
    rule: Option<String>,
    group: Option<String>,
    sni: Option<String>,
    bytes_up: u64,
    bytes_down: u64,
    /// Seconds since the epoch of the line's time stamp.
    at: u32,
}

const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "PATCH", "TRACE", "OTHER",
];

const KEYS: [&str; 14] = [
    "ts",
    "client",
    "method",
    "host",
    "port",
    "resolved",
    "decision",
    "reason",
    "rule",
    "group",
    "sni",
    "bytes_up",
    "bytes_down",
    "duration_ms",
];

fn opt(v: &Value, expected: Option<&str>) {
    match expected {
        Some(s) => assert_eq!(v.as_str(), Some(s)),
        None => assert!(v.is_null(), "{v} should be null"),
    }
}

fuzz_target!(|input: Input| {
    let reason = Reason::ALL[input.reason as usize % Reason::ALL.len()];
    let record = Record {
        started: Instant::now(),
        client: input.client,
        method: input.method.map(|m| METHODS[m as usize % METHODS.len()]),
        host: input.host.clone(),
        port: input.port,
        resolved: input.resolved,
        decision: Decision {
            allowed: input.allowed,
            reason,
            rule: input.rule.as_deref().map(Arc::from),
            group: input.group.as_deref().map(Arc::from),
        },
        sni: input.sni.clone(),
        bytes_up: input.bytes_up,
        bytes_down: input.bytes_down,
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(input.at.into());
    let mut out = b"earlier line\n".to_vec();
    record.encode(now, &mut out).expect("every record encodes");
    let line = &out[b"earlier line\n".len()..];
    assert_eq!(line.last(), Some(&b'\n'), "a line ends with a newline");
    assert!(
        !line[..line.len() - 1].contains(&b'\n'),
        "a line holds no other newline"
    );
    let v: Value = serde_json::from_slice(line).expect("an audit line is valid JSON");
    let obj = v.as_object().expect("an audit line is an object");
    assert_eq!(obj.len(), KEYS.len(), "{obj:?}");
    for key in KEYS {
        assert!(obj.contains_key(key), "the key {key} is missing");
    }
    let ts = v["ts"].as_str().expect("ts is text");
    assert_eq!(humantime::parse_rfc3339(ts).ok(), Some(now), "ts {ts}");
    assert_eq!(
        v["client"].as_str(),
        Some(input.client.to_string().as_str())
    );
    opt(&v["method"], record.method);
    assert_eq!(v["host"].as_str(), Some(input.host.as_str()));
    assert_eq!(v["port"].as_u64(), Some(input.port.into()));
    let resolved = input.resolved.map(|a| a.to_string());
    opt(&v["resolved"], resolved.as_deref());
    let decision = if input.allowed { "allow" } else { "deny" };
    assert_eq!(v["decision"].as_str(), Some(decision));
    assert_eq!(v["reason"].as_str(), Some(reason.code()));
    opt(&v["rule"], input.rule.as_deref());
    opt(&v["group"], input.group.as_deref());
    opt(&v["sni"], input.sni.as_deref());
    assert_eq!(v["bytes_up"].as_u64(), Some(input.bytes_up));
    assert_eq!(v["bytes_down"].as_u64(), Some(input.bytes_down));
    assert!(v["duration_ms"].as_u64().is_some());
});
