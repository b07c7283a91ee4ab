//! The audit log: one JSON object per line for every connection or request, written by a
//! background task so request handling never waits on the disk. Each [`Record`] is finished
//! exactly once, which also feeds the metrics.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::config::AuditTarget;
use crate::policy::Decision;

/// What happened to one CONNECT tunnel or one forwarded request.
#[derive(Debug)]
pub struct Record {
    pub started: Instant,
    pub client: SocketAddr,
    pub method: Option<&'static str>,
    pub host: String,
    pub port: u16,
    pub resolved: Option<SocketAddr>,
    pub decision: Decision,
    pub sni: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The JSON line; its keys are a contract with the launcher's `blocked` command.
#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    client: String,
    method: Option<&'a str>,
    host: &'a str,
    port: u16,
    resolved: Option<String>,
    decision: &'static str,
    reason: &'static str,
    rule: Option<&'a str>,
    group: Option<&'a str>,
    sni: Option<&'a str>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
}

/// The sending side of the audit log; cheap to clone, a no-op when the log is off.
#[derive(Clone, Default)]
pub struct Audit {
    tx: Option<mpsc::UnboundedSender<String>>,
}

impl Audit {
    /// Opens the audit target and starts its writer task.
    pub async fn open(target: Option<&AuditTarget>) -> anyhow::Result<Audit> {
        let Some(target) = target else {
            return Ok(Audit::default());
        };
        let (tx, rx) = mpsc::unbounded_channel();
        match target {
            AuditTarget::Stdout => {
                tokio::spawn(write_lines(rx, tokio::io::stdout()));
            }
            AuditTarget::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot open the audit log {}: {e}", path.display())
                    })?;
                tokio::spawn(write_lines(rx, file));
            }
        }
        Ok(Audit { tx: Some(tx) })
    }

    /// Writes one record as a JSON line.
    pub fn write(&self, record: &Record) {
        let Some(tx) = &self.tx else { return };
        let line = Line {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            client: record.client.to_string(),
            method: record.method,
            host: &record.host,
            port: record.port,
            resolved: record.resolved.map(|a| a.to_string()),
            decision: if record.decision.allowed {
                "allow"
            } else {
                "deny"
            },
            reason: record.decision.reason.code(),
            rule: record.decision.rule.as_deref(),
            group: record.decision.group.as_deref(),
            sni: record.sni.as_deref(),
            bytes_up: record.bytes_up,
            bytes_down: record.bytes_down,
            duration_ms: record.started.elapsed().as_millis() as u64,
        };
        match serde_json::to_string(&line) {
            Ok(mut text) => {
                text.push('\n');
                let _ = tx.send(text);
            }
            Err(e) => tracing::error!("cannot encode an audit line: {e}"),
        }
    }
}

async fn write_lines(mut rx: mpsc::UnboundedReceiver<String>, out: impl AsyncWrite + Unpin) {
    let mut out = BufWriter::new(out);
    while let Some(line) = rx.recv().await {
        let mut result = out.write_all(line.as_bytes()).await;
        // Batch whatever is already queued, then flush so a reader sees whole lines promptly.
        while let (Ok(()), Ok(more)) = (&result, rx.try_recv()) {
            result = out.write_all(more.as_bytes()).await;
        }
        if let Err(e) = result.and(out.flush().await) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}
