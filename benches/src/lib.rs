//! The side-by-side benchmark of paude-proxy against squid, tinyproxy and a direct connection.
//!
//! Module map, in the order a run uses them:
//! - [`hello`]: the TLS ClientHello every tunnel sends as its first flight.
//! - [`servers`]: the upstream echo/sink server and the plain HTTP origin, both on 127.0.0.1.
//! - [`peers`]: finds, configures, starts and stops paude-proxy, squid, tinyproxy and the bare
//!   relay (a floor: a CONNECT relay with nothing else).
//! - [`client`]: the load generator's wire primitives (CONNECT, echo round trip, keep-alive GET).
//! - [`scenarios`]: one measurement of one scenario through one path.
//! - [`driver`]: the plan (full or smoke) and the interleaved loop over scenarios and peers.
//! - [`procfs`]: memory and CPU time of the processes under test, from `/proc`.
//! - [`report`]: the summary table, ratios, targets and `RESULTS.md`.
//!
//! Invariant: every socket the benchmark opens or dials is on 127.0.0.1.

pub mod client;
pub mod driver;
pub mod hello;
pub mod peers;
pub mod procfs;
pub mod report;
pub mod scenarios;
pub mod servers;
