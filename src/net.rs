//! Connection admission for the CA's listeners (gRPC and the bundle endpoint): the open-file
//! budget, per-source and total connection caps checked before the TLS handshake, backoff on
//! accept errors, the HTTP/2 preface deadline, and the idle timeout of gRPC connections.
//!
//! A connection is idle when no request is in flight on it: requests are counted by
//! [`TrackRequestsLayer`], whose guard lives until the response body ends, so a long-lived
//! watch stream that carries nothing for minutes keeps its connection. Bytes are not activity:
//! HTTP/2 PINGs flow on every healthy connection, and an attacker can send them too.
//!
//! [`TrackRequests`] also sends the response headers and trailers whose values change from one
//! response to the next (`date`, a renewal's bound serial, `grpc-message`) as never-indexed
//! HPACK literals ([`never_index`]): indexed, each new value would take a place in the
//! connection's HPACK encoder table until the table holds the peer's 4 KiB, ~10 KB of memory
//! per kept agent connection after a few dozen renewals (docs/design.md, decision 97).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{CONTENT_TYPE, DATE, HeaderMap, HeaderValue};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use crate::api::auth::ConnAuth;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Open files kept out of the connection budget: the store, the audit log, credential files,
/// outgoing federation connections, notify commands.
pub const FD_RESERVE: u64 = 256;
/// The shortest wait after a failed `accept`.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// The longest wait after repeated failed `accept`s.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Refused connections are logged at warn at most once per this interval, with a count.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connection caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Concurrent connections in total.
    pub total: usize,
    /// Concurrent connections from one source (an IPv4 address or an IPv6 /64).
    pub per_source: usize,
}

/// The open-file limits of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// The soft limit before [`raise_nofile_limit`] (None: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub soft: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the common soft limit of 1024 is far
/// below what a CA serving a fleet needs, and the hard limit is what the operator allowed.
pub fn raise_nofile_limit() -> io::Result<FdLimits> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit).map_err(io::Error::from)?;
    }
    let now = getrlimit(Resource::Nofile);
    Ok(FdLimits {
        before,
        soft: now.current,
        hard: now.maximum,
    })
}

/// Fits the configured caps of the gRPC listener and the bundle endpoint (if any) into the
/// open-file budget (`soft` minus [`FD_RESERVE`]): when they do not fit, the bundle endpoint
/// keeps at most an eighth of the budget and gRPC the rest. Per-source caps never exceed the
/// total. Returns the caps and whether anything was lowered.
pub fn fit_caps(soft: Option<u64>, grpc: Caps, bundle: Option<Caps>) -> (Caps, Option<Caps>, bool) {
    let clamp = |c: Caps| Caps {
        total: c.total.max(1),
        per_source: c.per_source.clamp(1, c.total.max(1)),
    };
    let (mut grpc, mut bundle) = (clamp(grpc), bundle.map(clamp));
    let Some(soft) = soft else {
        return (grpc, bundle, false);
    };
    let budget = usize::try_from(soft.saturating_sub(FD_RESERVE))
        .unwrap_or(usize::MAX)
        .max(2);
    let wanted = grpc.total.saturating_add(bundle.map_or(0, |b| b.total));
    if wanted <= budget {
        return (grpc, bundle, false);
    }
    if let Some(b) = bundle.as_mut() {
        b.total = b.total.min((budget / 8).max(1));
        b.per_source = b.per_source.min(b.total);
    }
    grpc.total = grpc
        .total
        .min(budget - bundle.map_or(0, |b| b.total))
        .max(1);
    grpc.per_source = grpc.per_source.min(grpc.total);
    (grpc, bundle, true)
}

/// Raises the open-file limit, logs it, and fits `grpc` and `bundle` into it (logging any cut).
pub fn prepare_caps(grpc: Caps, bundle: Option<Caps>) -> (Caps, Option<Caps>) {
    let soft = match raise_nofile_limit() {
        Ok(l) => {
            info!(
                soft = %l.soft.map_or("unlimited".to_string(), |n| n.to_string()),
                hard = %l.hard.map_or("unlimited".to_string(), |n| n.to_string()),
                before = %l.before.map_or("unlimited".to_string(), |n| n.to_string()),
                "open file limit"
            );
            l.soft
        }
        Err(e) => {
            let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            warn!(error = %e, soft = %soft.map_or("unlimited".to_string(), |n| n.to_string()), "cannot raise the open file limit");
            soft
        }
    };
    let (g, b, lowered) = fit_caps(soft, grpc, bundle);
    if lowered {
        warn!(
            open_file_limit = %soft.map_or("unlimited".to_string(), |n| n.to_string()),
            max_connections = g.total,
            max_connections_per_source = g.per_source,
            bundle_endpoint_max_connections = %b.map_or("none".to_string(), |b| b.total.to_string()),
            "connection caps lowered to fit the open file limit; raise LimitNOFILE"
        );
    }
    (g, b)
}

/// The key per-source caps count by: an IPv4 address, or the /64 of an IPv6 address (one host
/// usually holds a whole /64). IPv4-mapped IPv6 addresses count as their IPv4 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The listener holds its total cap of connections.
    Total,
    /// The source holds its per-source cap of connections.
    PerSource,
}

/// Counts a listener's open connections, in total and per source, from accept to close.
#[derive(Debug)]
pub struct Admission {
    listener: &'static str,
    caps: Caps,
    open: Mutex<Open>,
    refusals: Mutex<RefusalLog>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

#[derive(Debug, Default)]
struct RefusalLog {
    last_warned: Option<Instant>,
    since: u64,
}

/// One admitted connection; dropping it (when the connection closes) frees its place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    source: IpAddr,
}

/// The number of requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` when the last request ended.
    last_end_ms: AtomicU64,
}

/// One request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

/// What a [`Conn`] tells the server about itself: the inner stream's connect info (for
/// `tonic::Request::peer_certs` and `remote_addr`), its request counter, and its
/// authentication state (put in every request as `Arc<ConnAuth>`).
#[derive(Debug, Clone)]
pub struct ConnInfo<I> {
    /// The inner stream's connect info.
    pub inner: I,
    activity: Arc<Activity>,
    auth: Arc<ConnAuth>,
}

/// An admitted gRPC connection: replays the HTTP/2 preface read by [`read_preface`], holds its
/// [`Permit`], and fails its next read once no request has been in flight for `idle`.
pub struct Conn<S> {
    inner: S,
    replayed: usize,
    activity: Arc<Activity>,
    auth: Arc<ConnAuth>,
    idle: Duration,
    idle_check: Pin<Box<Sleep>>,
    _permit: Permit,
}

/// Backoff for a failing `accept` (EMFILE, ENFILE, ENOBUFS…): doubles from 5 ms to 1 s, reset by
/// the next success, so a listener out of file descriptors neither spins nor floods the log.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
    last_error: Option<io::ErrorKind>,
    failures: u64,
}

/// Why a connection was closed before it sent its HTTP/2 preface.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrefaceError {
    /// The client sent nothing (or too little) within the deadline.
    #[error("no HTTP/2 preface within {0:?}")]
    TimedOut(Duration),
    /// The client sent something that is not HTTP/2.
    #[error("not an HTTP/2 connection")]
    NotHttp2,
    /// Reading failed (including the client closing the connection).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Counts requests per connection for the idle timeout: insert outermost, so every request of a
/// [`Conn`] holds an [`InFlight`] until its response body has ended (or is dropped). `I` is the
/// inner connect info of the [`Conn`]s served, put back in the request for tonic, beside the
/// connection's `Arc<ConnAuth>`.
pub struct TrackRequestsLayer<I>(PhantomData<fn() -> I>);

/// The service [`TrackRequestsLayer`] makes.
#[derive(Debug)]
pub struct TrackRequests<S, I> {
    inner: S,
    _info: PhantomData<fn() -> I>,
}

/// A response body holding its request's [`InFlight`] until the body ends.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: Pin<Box<B>>,
    in_flight: Option<InFlight>,
}

/// Response header names whose values come from a small fixed set: HPACK indexing them costs a
/// few table entries per connection, once, and saves their bytes on every later response.
const INDEXED_HEADERS: [&str; 2] = ["content-type", "grpc-status"];

/// Marks every value in `headers` but [`INDEXED_HEADERS`] as sensitive, which h2 encodes as a
/// never-indexed literal instead of inserting it in the connection's HPACK table; and, in a
/// response head (one with a `content-type`), adds a `date` so hyper does not add its own
/// (indexed) one. An HPACK encoder table is as large as the peer allows (tonic's 4 KiB), and
/// every distinct value inserted stays until evicted: `date` changes every second and a
/// renewal's bound serial every renewal, so a kept agent connection's table fills after a few
/// dozen renewals. The cost is ~30 bytes per response on the wire.
pub fn never_index(headers: &mut HeaderMap) {
    if headers.contains_key(CONTENT_TYPE) && !headers.contains_key(DATE) {
        headers.insert(DATE, http_date(time::OffsetDateTime::now_utc()));
    }
    for (name, value) in headers.iter_mut() {
        if !INDEXED_HEADERS.contains(&name.as_str()) {
            value.set_sensitive(true);
        }
    }
}

/// `at` as an HTTP date (RFC 9110 IMF-fixdate, always UTC).
fn http_date(at: time::OffsetDateTime) -> HeaderValue {
    const IMF_FIXDATE: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    at.to_offset(time::UtcOffset::UTC)
        .format(IMF_FIXDATE)
        .ok()
        .and_then(|s| HeaderValue::from_str(&s).ok())
        .unwrap_or_else(|| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

/// Reads the 24-byte HTTP/2 client preface within `timeout`; a connection that does not send it
/// is not handed to the server.
pub async fn read_preface<S>(io: &mut S, timeout: Duration) -> Result<(), PrefaceError>
where
    S: AsyncRead + Unpin,
{
    let mut got = [0u8; 24];
    match tokio::time::timeout(timeout, io.read_exact(&mut got)).await {
        Err(_) => Err(PrefaceError::TimedOut(timeout)),
        Ok(Err(e)) => Err(PrefaceError::Io(e)),
        Ok(Ok(_)) if &got != H2_PREFACE => Err(PrefaceError::NotHttp2),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Locks `m` even if a panicking thread poisoned it: the counters stay consistent because no
/// update can be left half done.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === impl Admission ===

impl Admission {
    /// Admission for `listener` (a name for the log) with `caps`.
    pub fn new(listener: &'static str, caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            listener,
            caps,
            open: Mutex::default(),
            refusals: Mutex::default(),
        })
    }

    /// The caps in force.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        lock(&self.open).total
    }

    /// Admits a connection from `peer`, or says why not (and logs it, at most one warning per
    /// 10 s with the count of refusals since the last).
    pub fn try_admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refusal> {
        let source = source_key(peer);
        let refused = {
            let mut open = lock(&self.open);
            let from_source = open.by_source.get(&source).copied().unwrap_or(0);
            if open.total >= self.caps.total {
                Some(Refusal::Total)
            } else if from_source >= self.caps.per_source {
                Some(Refusal::PerSource)
            } else {
                open.total += 1;
                open.by_source.insert(source, from_source + 1);
                None
            }
        };
        match refused {
            None => Ok(Permit {
                admission: self.clone(),
                source,
            }),
            Some(why) => {
                self.log_refusal(peer, why);
                Err(why)
            }
        }
    }

    fn log_refusal(&self, peer: IpAddr, why: Refusal) {
        let mut log = lock(&self.refusals);
        log.since += 1;
        let now = Instant::now();
        if log
            .last_warned
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY)
        {
            warn!(
                listener = self.listener,
                source = %peer,
                reason = ?why,
                refused = log.since,
                max_connections = self.caps.total,
                max_connections_per_source = self.caps.per_source,
                "connections refused: over the connection cap"
            );
            log.last_warned = Some(now);
            log.since = 0;
        } else {
            debug!(listener = self.listener, source = %peer, reason = ?why, "connection refused");
        }
    }

    fn release(&self, source: IpAddr) {
        let mut open = lock(&self.open);
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&source);
            }
        }
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.source);
    }
}

// === impl Activity ===

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        })
    }

    /// Starts a request.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the connection becomes idle if nothing starts: `None` while a request is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::SeqCst));
        Some(self.born + last + idle)
    }
}

// === impl InFlight ===

impl Drop for InFlight {
    fn drop(&mut self) {
        // The end time first, so whoever sees the count reach zero also sees when.
        let ms = u64::try_from(self.0.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_end_ms.store(ms, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

// === impl Conn ===

impl<S> Conn<S> {
    /// Wraps a stream whose HTTP/2 preface has been read; it closes after `idle` without
    /// requests.
    pub fn new(inner: S, permit: Permit, idle: Duration) -> Self {
        let activity = Activity::new();
        let first = activity.born + idle;
        Self {
            inner,
            replayed: 0,
            activity,
            auth: Arc::new(ConnAuth::new()),
            idle,
            idle_check: Box::pin(tokio::time::sleep_until(first.into())),
            _permit: permit,
        }
    }

    /// Whether the idle timeout has passed; otherwise re-arms the timer (registering the waker).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.activity.idle_deadline(self.idle) {
                Some(at) if at <= now => return true,
                Some(at) => self.idle_check.as_mut().reset(at.into()),
                None => self.idle_check.as_mut().reset((now + self.idle).into()),
            }
        }
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_idle(cx) {
            debug!(idle = ?this.idle, "closing idle connection");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle",
            )));
        }
        if this.replayed < H2_PREFACE.len() {
            let rest = &H2_PREFACE[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Conn<S> {
    type ConnectInfo = ConnInfo<S::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            inner: self.inner.connect_info(),
            activity: self.activity.clone(),
            auth: self.auth.clone(),
        }
    }
}

// === impl AcceptBackoff ===

impl AcceptBackoff {
    /// Records a failed `accept` on `listener`; returns how long to wait before the next.
    pub fn failed(&mut self, listener: &'static str, error: &io::Error) -> Duration {
        let wait = self.next.unwrap_or(BACKOFF_MIN);
        self.next = Some((wait * 2).min(BACKOFF_MAX));
        self.failures += 1;
        if self.last_error != Some(error.kind()) {
            warn!(listener, %error, retry_in = ?wait, "accept failed");
            self.last_error = Some(error.kind());
        } else {
            debug!(listener, %error, retry_in = ?wait, failures = self.failures, "accept failed again");
        }
        wait
    }

    /// Records a successful `accept`.
    pub fn succeeded(&mut self, listener: &'static str) {
        if self.failures > 0 {
            info!(listener, failures = self.failures, "accepting again");
        }
        *self = Self::default();
    }
}

// === impl TrackRequestsLayer ===

impl<I> TrackRequestsLayer<I> {
    /// A layer for connections whose inner connect info is `I`.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<I> Default for TrackRequestsLayer<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> Clone for TrackRequestsLayer<I> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<I> std::fmt::Debug for TrackRequestsLayer<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrackRequestsLayer")
    }
}

impl<S, I> tower::Layer<S> for TrackRequestsLayer<I> {
    type Service = TrackRequests<S, I>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackRequests {
            inner,
            _info: PhantomData,
        }
    }
}

// === impl TrackRequests ===

impl<S: Clone, I> Clone for TrackRequests<S, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _info: PhantomData,
        }
    }
}

impl<S, I, B, RB> tower::Service<Request<B>> for TrackRequests<S, I>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    type Response = Response<Tracked<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The inner connect info goes back where tonic looks for it (`peer_certs`,
        // `remote_addr`).
        let in_flight = match req.extensions_mut().remove::<ConnInfo<I>>() {
            Some(info) => {
                req.extensions_mut().insert(info.inner);
                req.extensions_mut().insert(info.auth);
                Some(info.activity.begin())
            }
            None => None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            never_index(resp.headers_mut());
            Ok(resp.map(|inner| Tracked {
                inner: Box::pin(inner),
                in_flight,
            }))
        })
    }
}

// === impl Tracked ===

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut polled = self.inner.as_mut().poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.in_flight = None;
        }
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            never_index(trailers);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(total: usize, per_source: usize) -> Caps {
        Caps { total, per_source }
    }

    #[test]
    fn caps_fit_the_open_file_budget() {
        // Plenty of descriptors: nothing changes.
        let (g, b, lowered) = fit_caps(Some(65_536), caps(8192, 1024), Some(caps(256, 16)));
        assert_eq!(
            (g, b, lowered),
            (caps(8192, 1024), Some(caps(256, 16)), false)
        );
        // The common 1024: 768 to share, an eighth of it at most for the bundle endpoint.
        let (g, b, lowered) = fit_caps(Some(1024), caps(8192, 1024), Some(caps(256, 16)));
        assert!(lowered);
        assert_eq!(b, Some(caps(96, 16)));
        assert_eq!(g, caps(672, 672));
        // Without a bundle endpoint gRPC gets the whole budget.
        assert_eq!(fit_caps(Some(1024), caps(8192, 64), None).0, caps(768, 64));
        // Unlimited, and per-source above total.
        assert_eq!(fit_caps(None, caps(10, 50), None).0, caps(10, 10));
        // Absurdly low limits still leave one connection each.
        let (g, b, _) = fit_caps(Some(10), caps(8192, 1024), Some(caps(256, 16)));
        assert!(g.total >= 1 && b.is_some_and(|b| b.total >= 1));
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn admission_caps_per_source_and_total_and_frees_on_drop() {
        let adm = Admission::new("test", caps(3, 2));
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        let a = adm.try_admit(one).unwrap();
        let _b = adm.try_admit(one).unwrap();
        assert_eq!(adm.try_admit(one).unwrap_err(), Refusal::PerSource);
        let _c = adm.try_admit(two).unwrap();
        assert_eq!(adm.try_admit(two).unwrap_err(), Refusal::Total);
        assert_eq!(adm.open(), 3);
        drop(a);
        assert_eq!(adm.open(), 2);
        let _d = adm.try_admit(one).unwrap();
    }

    #[test]
    fn accept_backoff_doubles_caps_and_resets() {
        let mut b = AcceptBackoff::default();
        let e = io::Error::from_raw_os_error(24);
        let waits: Vec<_> = (0..10).map(|_| b.failed("test", &e)).collect();
        assert_eq!(waits[0], BACKOFF_MIN);
        assert_eq!(waits[1], BACKOFF_MIN * 2);
        assert_eq!(*waits.last().unwrap(), BACKOFF_MAX);
        b.succeeded("test");
        assert_eq!(b.failed("test", &e), BACKOFF_MIN);
    }

    #[tokio::test]
    async fn conn_replays_the_preface_and_closes_only_when_no_request_is_in_flight() {
        let adm = Admission::new("test", caps(1, 1));
        let (_client, server) = tokio::io::duplex(64);
        let permit = adm.try_admit("192.0.2.1".parse().unwrap()).unwrap();
        let idle = Duration::from_millis(300);
        let mut conn = Conn::new(server, permit, idle);
        let mut preface = [0u8; 24];
        conn.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, H2_PREFACE);
        let request = conn.activity.begin();
        let mut buf = [0u8; 8];
        // Three idle timeouts with a quiet request in flight: still open.
        let read = tokio::time::timeout(idle * 3, conn.read(&mut buf)).await;
        assert!(read.is_err(), "closed under a request in flight: {read:?}");
        drop(request);
        let ended = Instant::now();
        let err = tokio::time::timeout(idle * 4, conn.read(&mut buf))
            .await
            .expect("closed once idle")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(ended.elapsed() >= idle - Duration::from_millis(20));
        drop(conn);
        assert_eq!(adm.open(), 0, "closing frees the permit");
    }

    #[test]
    fn changing_header_values_are_never_indexed_and_a_response_gets_a_date() {
        let mut head = HeaderMap::new();
        head.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        head.insert("lanyard-connection-bound", HeaderValue::from_static("0a1b"));
        never_index(&mut head);
        assert!(!head[CONTENT_TYPE].is_sensitive());
        assert!(head["lanyard-connection-bound"].is_sensitive());
        let date = head[DATE].clone();
        assert!(date.is_sensitive());
        // hyper keeps a date that is there, so its own (indexed) one is never added.
        assert_eq!(date.to_str().unwrap().len(), 29, "{date:?}");
        assert!(date.to_str().unwrap().ends_with(" GMT"));
        // Trailers: the status stays indexed, a message does not, and no date is added.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("revoked"));
        never_index(&mut trailers);
        assert!(!trailers["grpc-status"].is_sensitive());
        assert!(trailers["grpc-message"].is_sensitive());
        assert!(!trailers.contains_key(DATE));
    }

    #[test]
    fn http_dates_are_imf_fixdate() {
        let at = time::macros::datetime!(1994-11-06 08:49:37 UTC);
        assert_eq!(http_date(at), "Sun, 06 Nov 1994 08:49:37 GMT");
        let at = time::macros::datetime!(2026-12-07 07:05:09 +01:00);
        assert_eq!(http_date(at), "Mon, 07 Dec 2026 06:05:09 GMT");
    }

    #[test]
    fn nofile_soft_limit_is_raised_to_the_hard_limit() {
        let l = raise_nofile_limit().unwrap();
        assert_eq!(l.soft, l.hard);
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current, now.maximum);
    }
}
