//! Plain HTTP forwarding of absolute-form requests (`GET http://host/path`). Requests go
//! through one pooled hyper client whose connector is [`connect`], so pooled connections are
//! also resolved, checked and dialled by address. Hop-by-hop headers are stripped both ways and
//! nothing identifying the client is added (no `Via`, no `X-Forwarded-For`).

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Either;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Scheme, Uri};
use hyper::{Request, Response, Version};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::audit::Record;
use crate::connect::connect;
use crate::error::{ProxyError, Reason};
use crate::handler::{explain, host_text, record, refuse, Body};
use crate::host::{Host, Target};
use crate::policy::{Decision, Policy, Via};
use crate::server::{Core, State};

/// The pooled upstream client.
pub type Client = hyper_util::client::legacy::Client<Connector, Counted>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// A thread's pooled client with the core and the policy its connections were dialled under.
struct ThreadClient {
    core: Weak<Core>,
    policy: Weak<Policy>,
    client: Client,
}

thread_local! {
    /// This thread's pooled client.
    static CLIENT: RefCell<Option<ThreadClient>> = const { RefCell::new(None) };
}

/// The pooled client of the calling thread for `core` under `policy`, built on first use.
///
/// A pooled connection is driven by a task on the runtime that opened it, so one pool shared by
/// the serving threads would send most requests to another thread and their responses back:
/// two cross-thread wake-ups per request. A client is tied to its core (limits, address
/// checks); a thread that serves another core gets a new one, never a client of another core.
/// It is also tied to the policy in force when its connections were dialled: their addresses
/// were checked against that policy only, so after a reload the thread's pool is dropped (its
/// idle connections close) and the next request dials again under the new policy.
pub fn thread_client(core: &Arc<Core>, policy: &Arc<Policy>) -> Client {
    CLIENT.with(|cell| {
        let mut cell = cell.borrow_mut();
        match &*cell {
            // The held `Weak`s keep their allocations, so the addresses cannot be reused.
            Some(held)
                if std::ptr::eq(held.core.as_ptr(), Arc::as_ptr(core))
                    && std::ptr::eq(held.policy.as_ptr(), Arc::as_ptr(policy)) =>
            {
                held.client.clone()
            }
            _ => {
                let client = client(core.clone());
                *cell = Some(ThreadClient {
                    core: Arc::downgrade(core),
                    policy: Arc::downgrade(policy),
                    client: client.clone(),
                });
                client
            }
        }
    })
}

/// Builds the pooled client around the guarded connector.
fn client(core: Arc<Core>) -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(32)
        .build(Connector { core })
}

/// Headers that describe one hop and never cross the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// Forwards one absolute-form request.
pub async fn forward(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<hyper::body::Incoming>,
    started: Instant,
) -> Response<Body> {
    let method = req.method().clone();
    let method_text = method.as_str();
    let uri = req.uri().clone();
    // The request line as the client wrote it; only built when a refusal needs it.
    let shown = || uri.to_string();
    let authority = match (uri.scheme(), uri.authority()) {
        (Some(s), Some(a)) if *s == Scheme::HTTP => a.clone(),
        (Some(_), Some(a)) => {
            let rec = record(
                started,
                peer,
                &method,
                a.host().to_owned(),
                a.port_u16().unwrap_or(443),
                Decision::deny(Reason::UnsupportedScheme),
            );
            let err = ProxyError::new(
                Reason::UnsupportedScheme,
                "only http:// URLs are forwarded; HTTPS goes through a CONNECT tunnel (set HTTPS_PROXY)",
            );
            return refuse(&state, rec, &err, method_text, &shown());
        }
        _ => {
            let rec = record(
                started,
                peer,
                &method,
                String::new(),
                0,
                Decision::deny(Reason::BadRequest),
            );
            let err = ProxyError::new(
                Reason::BadRequest,
                "this is a proxy: send requests in absolute form (GET http://host/path) or use CONNECT",
            );
            return refuse(&state, rec, &err, method_text, &shown());
        }
    };
    let target = match Host::parse(authority.host()) {
        Ok(host) => Target {
            host,
            port: authority.port_u16().unwrap_or(80),
        },
        Err(e) => {
            let rec = record(
                started,
                peer,
                &method,
                authority.host().to_owned(),
                0,
                Decision::deny(Reason::BadRequest),
            );
            let err = ProxyError::new(Reason::BadRequest, e.to_string());
            return refuse(&state, rec, &err, method_text, &shown());
        }
    };
    let policy = state.core.policy.load_full();
    let decision = policy.decide(&target, Via::Http);
    let rec = record(
        started,
        peer,
        &method,
        host_text(&target.host),
        target.port,
        decision,
    );
    if !rec.decision.allowed {
        let err = explain(&rec.decision, &target, Via::Http);
        return refuse(&state, rec, &err, method_text, &shown());
    }

    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The Host header names the authority the client asked for, without user info.
    let host_header = match authority.port() {
        Some(p) => format!("{}:{}", authority.host(), p),
        None => authority.host().to_owned(),
    };
    match HeaderValue::from_str(&host_header) {
        Ok(v) => {
            parts.headers.insert(header::HOST, v);
        }
        Err(_) => {
            let err = ProxyError::new(
                Reason::BadRequest,
                "the request's host is not a valid Host header",
            );
            return refuse(&state, rec, &err, method_text, &shown());
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = match Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(target.to_string())
        .path_and_query(path)
        .build()
    {
        Ok(u) => u,
        Err(e) => {
            let err = ProxyError::new(
                Reason::BadRequest,
                format!("the request URL is invalid ({e})"),
            );
            return refuse(&state, rec, &err, method_text, &shown());
        }
    };
    parts.version = Version::HTTP_11;
    let up = Arc::new(AtomicU64::new(0));
    let request = Request::from_parts(
        parts,
        Counted::new(body, up.clone(), state.core.limits.body_timeout),
    );
    let idle = state.core.limits.idle_timeout;
    let pending = thread_client(&state.core, &policy).request(request);
    let Some(response) = until_idle(pending, &up, idle).await else {
        let err = ProxyError::new(
            Reason::ResponseTimeout,
            format!("the upstream sent no response for {idle:?} while nothing else moved"),
        )
        .fix("a longer --idle-timeout");
        return refuse(&state, rec, &err, method_text, &shown());
    };
    match response {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let mut rec = rec;
            rec.resolved = parts.extensions.get::<Resolved>().map(|r| r.0);
            let body = AuditedBody {
                inner: body,
                state: state.clone(),
                up,
                record: Some(rec),
            };
            Response::from_parts(parts, Either::Right(body))
        }
        Err(e) => {
            let err = find_proxy_error(&e).unwrap_or_else(|| {
                ProxyError::new(
                    Reason::UpstreamError,
                    format!("the upstream failed ({})", error_chain(&e)),
                )
            });
            refuse(&state, rec, &err, method_text, &shown())
        }
    }
}

/// Awaits `pending` (a request sent upstream, its body counted in `up`) as long as it moves:
/// `None` once a whole `idle` passed with no body byte sent and no response head, as a tunnel
/// closes when nothing moved for `idle`. Without it, a request to an upstream that never answers
/// would hold its connection and connection slot for good, since a client that gives up is not
/// noticed while the proxy waits for the upstream.
async fn until_idle<F: Future>(pending: F, up: &AtomicU64, idle: Duration) -> Option<F::Output> {
    tokio::pin!(pending);
    let mut seen = up.load(Ordering::Relaxed);
    loop {
        match tokio::time::timeout(idle, &mut pending).await {
            Ok(out) => return Some(out),
            Err(_) => {
                let now = up.load(Ordering::Relaxed);
                if now == seen {
                    return None;
                }
                seen = now;
            }
        }
    }
}

fn find_proxy_error(err: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(p) = e.downcast_ref::<ProxyError>() {
            return Some(p.clone());
        }
        current = e.source();
    }
    None
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

/// The address a pooled connection reached, attached to every response on it.
#[derive(Debug, Clone, Copy)]
struct Resolved(SocketAddr);

/// Dials pooled upstream connections through [`connect`].
#[derive(Clone)]
pub struct Connector {
    core: Arc<Core>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Upstream;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Upstream, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let core = self.core.clone();
        Box::pin(async move {
            let host = Host::parse(uri.host().unwrap_or(""))
                .map_err(|e| ProxyError::new(Reason::BadRequest, e.to_string()))?;
            let target = Target {
                host,
                port: uri.port_u16().unwrap_or(80),
            };
            let policy = core.policy.load_full();
            let (stream, addr) = connect(&core, &policy, &target).await?;
            Ok(Upstream {
                io: TokioIo::new(stream),
                addr,
            })
        })
    }
}

/// A guarded upstream connection.
pub struct Upstream {
    io: TokioIo<TcpStream>,
    addr: SocketAddr,
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new().extra(Resolved(self.addr))
    }
}

impl hyper::rt::Read for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// How many bytes of a request body buy one more second of `--body-timeout`: a body must keep
/// coming at least this fast once its base time is used up.
const BODY_BYTES_PER_SECOND: u64 = 1024;

/// The client's request body, counting the bytes sent upstream and bounded in time: it may take
/// `--body-timeout`, plus a second per [`BODY_BYTES_PER_SECOND`] received, from the moment it is
/// first read. A body trickled slower (a byte a second) fails with `body_timeout` instead of
/// holding its connection, and its connection slot, forever.
pub struct Counted {
    inner: Incoming,
    count: Arc<AtomicU64>,
    /// The base time; the deadline starts when the body is first read.
    allowed: Duration,
    deadline: Option<(tokio::time::Instant, Pin<Box<tokio::time::Sleep>>)>,
}

impl Counted {
    fn new(inner: Incoming, count: Arc<AtomicU64>, allowed: Duration) -> Counted {
        Counted {
            inner,
            count,
            allowed,
            deadline: None,
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let allowed = self.allowed;
        let this = &mut *self;
        let (started, sleep) = this.deadline.get_or_insert_with(|| {
            let now = tokio::time::Instant::now();
            (now, Box::pin(tokio::time::sleep_until(now + allowed)))
        });
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = this.count.fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    let earned = Duration::from_secs(total / BODY_BYTES_PER_SECOND);
                    sleep.as_mut().reset(*started + allowed + earned);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let err = ProxyError::new(
                        Reason::BodyTimeout,
                        format!(
                            "the request body did not arrive in time ({allowed:?}, plus a \
                             second per KiB received)"
                        ),
                    )
                    .fix("a longer --body-timeout");
                    Poll::Ready(Some(Err(err.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response body; counts bytes and writes the audit record when it is done
/// (fully sent, or dropped because either side went away).
pub struct AuditedBody {
    inner: Incoming,
    state: Arc<State>,
    up: Arc<AtomicU64>,
    record: Option<Record>,
}

impl hyper::body::Body for AuditedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let (Some(data), Some(rec)) = (frame.data_ref(), self.record.as_mut()) {
                rec.bytes_down += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AuditedBody {
    fn drop(&mut self) {
        if let Some(mut rec) = self.record.take() {
            rec.bytes_up = self.up.load(Ordering::Relaxed);
            self.state.finish(&rec);
        }
    }
}
