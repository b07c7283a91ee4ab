//! The audit log: one JSON object per line for every connection or request, written out by a
//! background task in batches so request handling never waits on the disk. Each [`Record`] is
//! finished exactly once, which also feeds the metrics.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

impl Record {
    /// Appends the record as one JSON line (newline included) stamped `now`: the one rendering
    /// of an audit line. On an error `out` is left as it was.
    pub fn encode(&self, now: SystemTime, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let line = Line {
            ts: humantime::format_rfc3339_millis(now).to_string(),
            client: self.client.to_string(),
            method: self.method,
            host: &self.host,
            port: self.port,
            resolved: self.resolved.map(|a| a.to_string()),
            decision: if self.decision.allowed {
                "allow"
            } else {
                "deny"
            },
            reason: self.decision.reason.code(),
            rule: self.decision.rule.as_deref(),
            group: self.decision.group.as_deref(),
            sni: self.sni.as_deref(),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: self.started.elapsed().as_millis() as u64,
        };
        let len = out.len();
        if let Err(e) = serde_json::to_writer(&mut *out, &line) {
            out.truncate(len);
            return Err(e);
        }
        out.push(b'\n');
        Ok(())
    }
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

/// How often buffered audit lines are written out.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this large is written out at once instead of waiting for the next tick.
const FLUSH_AT: usize = 64 * 1024;

/// Lines waiting to be written, and the writer task's doorbell.
struct Sink {
    buf: Mutex<Vec<u8>>,
    full: Notify,
    closing: CancellationToken,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The producing side of the audit log; cheap to clone, a no-op when the log is off.
///
/// Requests append their line to a shared buffer (an uncontended lock, no task wake-up) and a
/// writer task writes the buffer out every 100 ms, or at once when it grows large; so the
/// request path never waits on the disk and never wakes another thread per line.
#[derive(Clone, Default)]
pub struct Audit {
    sink: Option<Arc<Sink>>,
}

impl Audit {
    /// Opens the audit target and starts its writer task.
    pub async fn open(target: Option<&AuditTarget>) -> anyhow::Result<Audit> {
        let Some(target) = target else {
            return Ok(Audit::default());
        };
        let sink = Arc::new(Sink {
            buf: Mutex::new(Vec::with_capacity(FLUSH_AT)),
            full: Notify::new(),
            closing: CancellationToken::new(),
            writer: Mutex::new(None),
        });
        let writer = match target {
            AuditTarget::Stdout => tokio::spawn(write_out(sink.clone(), tokio::io::stdout())),
            AuditTarget::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot open the audit log {}: {e}", path.display())
                    })?;
                tokio::spawn(write_out(sink.clone(), file))
            }
        };
        *lock(&sink.writer) = Some(writer);
        Ok(Audit { sink: Some(sink) })
    }

    /// Whether audit lines are written anywhere.
    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// Writes every line still buffered and stops the writer; called once at shutdown.
    pub async fn close(&self) {
        let Some(sink) = &self.sink else { return };
        sink.closing.cancel();
        let writer = lock(&sink.writer).take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }

    /// Appends one record as a JSON line.
    pub fn write(&self, record: &Record) {
        let Some(sink) = &self.sink else { return };
        let full = {
            let mut buf = lock(&sink.buf);
            if let Err(e) = record.encode(SystemTime::now(), &mut buf) {
                tracing::error!("cannot encode an audit line: {e}");
                return;
            }
            buf.len() >= FLUSH_AT
        };
        if full {
            sink.full.notify_one();
        }
    }
}

/// Locks a mutex, recovering the data if a panicking holder poisoned it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn write_out(sink: Arc<Sink>, out: impl AsyncWrite + Unpin) {
    let mut out = out;
    let mut pending = Vec::with_capacity(FLUSH_AT);
    loop {
        let closing = tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => false,
            _ = sink.full.notified() => false,
            _ = sink.closing.cancelled() => true,
        };
        // Swap buffers under the lock; write outside it.
        std::mem::swap(&mut *lock(&sink.buf), &mut pending);
        if !pending.is_empty() {
            let result = async {
                out.write_all(&pending).await?;
                out.flush().await
            }
            .await;
            if let Err(e) = result {
                tracing::error!("cannot write the audit log: {e}");
            }
            pending.clear();
        }
        if closing {
            return;
        }
    }
}
