//! The audit log: one JSON object per line for every connection or request, written out by a
//! background task in batches so request handling never waits on the disk. Each [`Record`] is
//! finished exactly once, which also feeds the metrics.
//!
//! Lines wait in a buffer of at most [`MAX_BUFFERED`] bytes. When the sink does not keep up
//! (a stdout pipe nobody reads, a full disk), new lines are dropped, counted in
//! `paude_audit_dropped_total` and reported on stderr once a second. Requests never wait for
//! the log: blocking them would turn a slow log reader into an outage of every client (the
//! buffer is shared) and let a stalled sink hold the shutdown. Every decision, refusals
//! included, is still counted in `paude_decisions_total`, so a dropped line is never a silent
//! loss.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
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
/// The most bytes of lines held for the writer (about 7,000 lines); more are dropped. The
/// writer holds at most as much again while it writes.
pub const MAX_BUFFERED: usize = 2 * 1024 * 1024;
/// How often dropped lines are reported on stderr at most.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Lines waiting to be written, and the writer task's doorbell.
struct Sink {
    buf: Mutex<Vec<u8>>,
    full: Notify,
    closing: CancellationToken,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Lines that were not written: `paude_audit_dropped_total`.
    dropped: Counter,
    /// Dropped lines not reported on stderr yet.
    unreported: AtomicU64,
    /// When the next report of dropped lines may be logged, in milliseconds since `opened`.
    next_report: AtomicU64,
    opened: Instant,
    /// Lines the writer is writing now (a stalled write keeps them).
    in_flight: AtomicU64,
}

impl Sink {
    /// Counts `lines` that will never be written and reports them, at most once a second.
    fn drop_lines(&self, lines: u64) {
        self.dropped.inc_by(lines);
        self.unreported.fetch_add(lines, Ordering::Relaxed);
        let now = self.opened.elapsed().as_millis() as u64;
        let next = self.next_report.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_report
                .compare_exchange(
                    next,
                    now + REPORT_EVERY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.report();
        }
    }

    /// Logs the dropped lines not reported yet, if any.
    fn report(&self) {
        let lines = self.unreported.swap(0, Ordering::Relaxed);
        if lines > 0 {
            let noun = if lines == 1 { "line" } else { "lines" };
            tracing::error!(
                dropped = lines,
                "the audit log is not keeping up: {lines} {noun} dropped (decisions are still \
                 counted in paude_decisions_total, lost lines in paude_audit_dropped_total); \
                 make its reader keep up, or write it to a file with --audit-log PATH"
            );
        }
    }
}

/// How many lines a buffer of complete lines holds.
fn lines_in(buf: &[u8]) -> u64 {
    buf.iter().filter(|b| **b == b'\n').count() as u64
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
    /// Opens the audit target and starts its writer task; lines that cannot be written are
    /// counted in `dropped`.
    pub async fn open(target: Option<&AuditTarget>, dropped: Counter) -> anyhow::Result<Audit> {
        let Some(target) = target else {
            return Ok(Audit::default());
        };
        Ok(match target {
            AuditTarget::Stdout => Audit::writing_to(tokio::io::stdout(), dropped),
            AuditTarget::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot open the audit log {}: {e}", path.display())
                    })?;
                Audit::writing_to(file, dropped)
            }
        })
    }

    /// An audit log whose writer task writes to `out`.
    fn writing_to(out: impl AsyncWrite + Unpin + Send + 'static, dropped: Counter) -> Audit {
        let sink = Arc::new(Sink {
            buf: Mutex::new(Vec::with_capacity(FLUSH_AT)),
            full: Notify::new(),
            closing: CancellationToken::new(),
            writer: Mutex::new(None),
            dropped,
            unreported: AtomicU64::new(0),
            next_report: AtomicU64::new(0),
            opened: Instant::now(),
            in_flight: AtomicU64::new(0),
        });
        *lock(&sink.writer) = Some(tokio::spawn(write_out(sink.clone(), out)));
        Audit { sink: Some(sink) }
    }

    /// Whether audit lines are written anywhere.
    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// Writes every line still buffered and stops the writer; called once at shutdown. A sink
    /// that does not take the lines `within` that time is given up on, so a stalled reader
    /// cannot hold the exit; what was not written is counted and reported.
    pub async fn close(&self, within: Duration) {
        let Some(sink) = &self.sink else { return };
        sink.closing.cancel();
        let writer = lock(&sink.writer).take();
        if let Some(mut writer) = writer {
            if tokio::time::timeout(within, &mut writer).await.is_err() {
                writer.abort();
                let lost = lines_in(&lock(&sink.buf)) + sink.in_flight.load(Ordering::Relaxed);
                sink.dropped.inc_by(lost);
                tracing::error!(
                    "the audit log did not take its last {lost} lines within {within:?} (its \
                     reader stopped reading); exiting without them"
                );
            }
        }
        sink.report();
    }

    /// Appends one record as a JSON line; false if the line was dropped because the sink is not
    /// keeping up (it is counted and reported).
    pub fn write(&self, record: &Record) -> bool {
        let Some(sink) = &self.sink else { return true };
        let written = {
            let mut buf = lock(&sink.buf);
            let before = buf.len();
            let encoded =
                before < MAX_BUFFERED && record.encode(SystemTime::now(), &mut buf).is_ok();
            // The line is kept only if it fits whole, its newline included.
            if encoded && buf.len() <= MAX_BUFFERED {
                Some(buf.len() >= FLUSH_AT)
            } else {
                buf.truncate(before);
                None
            }
        };
        match written {
            Some(full) => {
                if full {
                    sink.full.notify_one();
                }
                true
            }
            None => {
                sink.drop_lines(1);
                false
            }
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
            let lines = lines_in(&pending);
            sink.in_flight.store(lines, Ordering::Relaxed);
            let result = async {
                out.write_all(&pending).await?;
                out.flush().await
            }
            .await;
            sink.in_flight.store(0, Ordering::Relaxed);
            if let Err(e) = result {
                tracing::error!("cannot write the audit log: {e}");
                sink.drop_lines(lines);
            }
            pending.clear();
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose reader stopped reading: every write waits forever.
    struct Stalled;

    impl AsyncWrite for Stalled {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    fn refusal() -> Record {
        Record {
            started: Instant::now(),
            client: SocketAddr::from(([127, 0, 0, 1], 40000)),
            method: Some("CONNECT"),
            host: "flood.test".into(),
            port: 443,
            resolved: None,
            decision: Decision::deny(crate::error::Reason::NotAllowed),
            sni: None,
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    #[tokio::test]
    async fn a_stalled_sink_holds_a_bounded_buffer_counts_drops_and_does_not_hold_close() {
        let dropped = Counter::default();
        let audit = Audit::writing_to(Stalled, dropped.clone());
        let sink = audit.sink.clone().unwrap();
        let mut written = 0u64;
        for _ in 0..50_000 {
            if audit.write(&refusal()) {
                written += 1;
            }
            // Let the writer take a batch now and then, as it would between requests.
            if written % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert!(lock(&sink.buf).len() <= MAX_BUFFERED);
        assert_eq!(
            dropped.get(),
            50_000 - written,
            "every line not taken is counted"
        );
        assert!(dropped.get() > 0);
        let closed = tokio::time::timeout(
            Duration::from_secs(10),
            audit.close(Duration::from_millis(100)),
        )
        .await;
        assert!(closed.is_ok(), "close gives up on a stalled sink");
        assert_eq!(
            dropped.get(),
            50_000,
            "lines left unwritten at the end are counted too"
        );
    }
}
