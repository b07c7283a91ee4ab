//! The TOML config file, structure-aware: the fuzzer picks values for the file's keys (and now
//! and then a key the file does not have), which are written as TOML and loaded the way the
//! proxy loads its file. Reaches the merge and the policy compile with files that parse, which
//! raw bytes seldom do.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use paude_proxy::config::FileConfig;
use toml::{Table, Value};

#[derive(Debug, Arbitrary)]
enum Num {
    Int(i64),
    Text(String),
}

#[derive(Debug, Arbitrary)]
struct Fields {
    listen: Option<String>,
    policies: Option<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    allow_cidr: Option<Vec<String>>,
    allow_client: Option<Vec<String>>,
    resolve: Option<Vec<String>>,
    allow_opaque: Option<bool>,
    audit_log: Option<String>,
    admin_listen: Option<String>,
    log_format: Option<String>,
    watch_interval: Option<String>,
    max_connections: Option<Num>,
    header_timeout: Option<String>,
    dns_timeout: Option<String>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_header_bytes: Option<Num>,
    drain_timeout: Option<String>,
    dns_server: Option<Vec<String>>,
    worker_threads: Option<Num>,
    unknown: Option<(String, String)>,
}

fn put(table: &mut Table, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        table.insert(key.to_owned(), v);
    }
}

fn text(v: &Option<String>) -> Option<Value> {
    v.clone().map(Value::String)
}

fn list(v: &Option<Vec<String>>) -> Option<Value> {
    v.as_ref()
        .map(|items| Value::Array(items.iter().cloned().map(Value::String).collect()))
}

fn num(v: &Option<Num>) -> Option<Value> {
    v.as_ref().map(|n| match n {
        Num::Int(i) => Value::Integer(*i),
        Num::Text(s) => Value::String(s.clone()),
    })
}

fuzz_target!(|fields: Fields| {
    let f = &fields;
    let mut table = Table::new();
    put(&mut table, "listen", text(&f.listen));
    put(&mut table, "policies", text(&f.policies));
    put(&mut table, "allow", list(&f.allow));
    put(&mut table, "deny", list(&f.deny));
    put(&mut table, "allow_cidr", list(&f.allow_cidr));
    put(&mut table, "allow_client", list(&f.allow_client));
    put(&mut table, "resolve", list(&f.resolve));
    put(
        &mut table,
        "allow_opaque",
        f.allow_opaque.map(Value::Boolean),
    );
    put(&mut table, "audit_log", text(&f.audit_log));
    put(&mut table, "admin_listen", text(&f.admin_listen));
    put(&mut table, "log_format", text(&f.log_format));
    put(&mut table, "watch_interval", text(&f.watch_interval));
    put(&mut table, "max_connections", num(&f.max_connections));
    put(&mut table, "header_timeout", text(&f.header_timeout));
    put(&mut table, "dns_timeout", text(&f.dns_timeout));
    put(&mut table, "connect_timeout", text(&f.connect_timeout));
    put(&mut table, "idle_timeout", text(&f.idle_timeout));
    put(&mut table, "max_header_bytes", num(&f.max_header_bytes));
    put(&mut table, "drain_timeout", text(&f.drain_timeout));
    put(&mut table, "dns_server", list(&f.dns_server));
    put(&mut table, "worker_threads", num(&f.worker_threads));
    if let Some((key, value)) = &f.unknown {
        put(&mut table, key, Some(Value::String(value.clone())));
    }
    let Ok(rendered) = toml::to_string(&table) else {
        return;
    };
    let parsed = toml::from_str::<FileConfig>(&rendered);
    if let Some((key, _)) = &f.unknown {
        let known = KEYS.contains(&key.as_str());
        if !known {
            assert!(parsed.is_err(), "the unknown key {key:?} was accepted");
            return;
        }
    }
    if let Ok(file) = parsed {
        paude_proxy_fuzz::merge_and_compile(file);
    }
});

/// The keys the file accepts.
const KEYS: [&str; 21] = [
    "listen",
    "policies",
    "allow",
    "deny",
    "allow_cidr",
    "allow_client",
    "resolve",
    "allow_opaque",
    "audit_log",
    "admin_listen",
    "log_format",
    "watch_interval",
    "max_connections",
    "header_timeout",
    "dns_timeout",
    "connect_timeout",
    "idle_timeout",
    "max_header_bytes",
    "drain_timeout",
    "dns_server",
    "worker_threads",
];
