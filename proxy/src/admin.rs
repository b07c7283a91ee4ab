//! The admin listener (off unless `--admin-listen` is given) and the metrics it serves:
//! `/metrics` in Prometheus text format, `/healthz`, and `/policy` (the effective allowlist as
//! JSON). Counters are created once at start and indexed by reason, so recording a decision is
//! one atomic increment.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Reason;
use crate::server::Core;

type Labels = [(&'static str, &'static str); 2];

/// The proxy's metrics.
pub struct Metrics {
    registry: Registry,
    connections: Counter,
    decisions: Vec<Counter>,
    bytes_up: Counter,
    bytes_down: Counter,
    pub active_tunnels: Gauge,
    dns: Histogram,
    connect: Histogram,
    reload_ok: Counter,
    reload_error: Counter,
    /// Audit lines that could not be written (the sink did not keep up, or a write failed).
    pub audit_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("paude");
        let connections = Counter::default();
        registry.register(
            "connections",
            "Client connections accepted",
            connections.clone(),
        );
        let family = Family::<Labels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by outcome and reason",
            family.clone(),
        );
        let decisions = Reason::ALL
            .iter()
            .map(|r| {
                let decision = if *r == Reason::Allowed {
                    "allow"
                } else {
                    "deny"
                };
                family
                    .get_or_create(&[("decision", decision), ("reason", r.code())])
                    .clone()
            })
            .collect();
        let bytes = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register("bytes", "Bytes relayed, by direction", bytes.clone());
        let bytes_up = bytes.get_or_create(&[("direction", "up")]).clone();
        let bytes_down = bytes.get_or_create(&[("direction", "down")]).clone();
        let active_tunnels = Gauge::default();
        registry.register(
            "active_tunnels",
            "CONNECT tunnels open now",
            active_tunnels.clone(),
        );
        let dns = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register("dns_duration_seconds", "DNS lookup latency", dns.clone());
        let connect = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "connect_duration_seconds",
            "Upstream TCP connect latency",
            connect.clone(),
        );
        let reloads = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by result",
            reloads.clone(),
        );
        let reload_ok = reloads.get_or_create(&[("result", "ok")]).clone();
        let reload_error = reloads.get_or_create(&[("result", "error")]).clone();
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit lines not written because the audit sink did not keep up or failed",
            audit_dropped.clone(),
        );
        Metrics {
            registry,
            connections,
            decisions,
            bytes_up,
            bytes_down,
            active_tunnels,
            dns,
            connect,
            reload_ok,
            reload_error,
            audit_dropped,
        }
    }
}

impl Metrics {
    pub fn connection(&self) {
        self.connections.inc();
    }

    pub fn decision(&self, reason: Reason, up: u64, down: u64) {
        // `Reason::ALL` lists the reasons in declaration order, so the discriminant indexes it.
        self.decisions[reason as usize].inc();
        self.bytes_up.inc_by(up);
        self.bytes_down.inc_by(down);
    }

    pub fn observe_dns(&self, d: Duration) {
        self.dns.observe(d.as_secs_f64());
    }

    pub fn observe_connect(&self, d: Duration) {
        self.connect.observe(d.as_secs_f64());
    }

    pub fn reload(&self, ok: bool) {
        if ok {
            self.reload_ok.inc()
        } else {
            self.reload_error.inc()
        };
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }
}

/// Serves the admin endpoints until `shutdown` fires.
pub async fn serve(listener: TcpListener, core: Arc<Core>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let core = core.clone();
        let header_timeout = core.limits.header_timeout;
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let core = core.clone();
                async move { Ok::<_, Infallible>(route(&core, req)) }
            });
            // The same header timeout as the proxy listener, so a connection that sends
            // nothing (or half a head) cannot stay open.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(core: &Core, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            core.metrics.encode(),
        ),
        "/healthz" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_owned(),
        ),
        "/policy" => {
            let policy = core.policy.load();
            let json = serde_json::json!({
                "rules": policy.entries(),
                "allow_cidr": policy.allow_cidrs().iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                "allow_opaque": policy.allow_opaque,
                "allow_no_sni": policy.allow_no_sni,
                "allow_ech": policy.allow_ech,
            });
            (StatusCode::OK, "application/json", format!("{json:#}\n"))
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the admin listener serves /metrics, /healthz and /policy\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
