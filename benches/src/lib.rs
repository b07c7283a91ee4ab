//! The side-by-side benchmark of paude-proxy against squid, tinyproxy and a direct connection.
//!
//! Module map, in the order a run uses them:
//! - [`hello`]: the TLS ClientHello every tunnel sends as its first flight.
//! - [`servers`]: the upstream echo servers (64 KiB and 8 KiB copy buffers), the plain HTTP
//!   origin and the HTTPS event-stream server, all on 127.0.0.1.
//! - [`tls`]: the run's test CA, its certificate for the benchmark host, the rustls client.
//! - [`nginx`]: nginx as the HTTPS and plain-HTTP origin of the downloads and API requests.
//! - [`peers`]: finds, configures, starts and stops paude-proxy, squid, tinyproxy and the bare
//!   relay (a floor: a CONNECT relay with nothing else).
//! - [`client`]: the load generator's wire primitives (CONNECT, echo round trip, keep-alive GET).
//! - [`scenarios`]: one measurement of one scenario through one path.
//! - [`driver`]: the plan (full or smoke) and the interleaved loop over scenarios and peers.
//! - [`procfs`]: memory and CPU time of the processes under test, from `/proc`.
//! - [`verbs`]: the launcher's verbs on a real Podman session beside the podman CLI's.
//! - [`report`]: the summary table, ratios, targets and `RESULTS.md`.
//!
//! Invariant: every socket the benchmark opens or dials is on 127.0.0.1 (the verbs' containers
//! sit on networks the run creates, and nothing in them dials out).

pub mod client;
pub mod driver;
pub mod hello;
pub mod nginx;
pub mod peers;
pub mod procfs;
pub mod report;
pub mod scenarios;
pub mod servers;
pub mod tls;
pub mod verbs;
