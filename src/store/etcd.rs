//! The replicated backend: etcd v3, shared by several CA replicas.
//!
//! Reads are synchronous and served from an in-memory mirror of the small collections (tokens,
//! enrollments, issued index, revocations, access, shared values, the audit head) that one watch
//! keeps in step; the watch resumes from the last revision it applied and the mirror is rebuilt
//! by a paginated range read when etcd has compacted that revision away. Audit records are not
//! mirrored: [`Store::read_audit`] range-reads etcd.
//!
//! Writes are etcd transactions. A commit compares the audit chain head, so two replicas never
//! both append seq N ([`StoreError::HeadMoved`]), and returns only once the mirror has applied
//! its revision (read-your-writes). Every replica's commits are published on the commit feed by
//! the watch, in seq order.
//!
//! The gRPC client runs on a small runtime of its own (one thread): the trait is synchronous and
//! its callers include the audit writer thread and async handlers, and a nested `block_on` inside
//! a runtime panics. Callers hand a future to that runtime and wait on a std channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tracing::{debug, info, warn};

use super::index::RevIndex;
use super::records::{Stored, issued_with_prune_from_stored, issued_with_prune_to_stored};
use super::sled::{decode, encode, load};
use super::{
    AccessRecord, AuditRecord, Committed, Consume, Enrollment, FEED_BUFFER, Guard, IssuedRecord,
    RevocationBrief, RevocationRecord, SharedChange, Store, StoreError, StoreHealth, StoreMember,
    StoreStats, TokenRecord, Versioned, Write,
};

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::cluster_client::ClusterClient;
use pb::compare::TargetUnion;
use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;
use pb::request_op::Request as Op;
use pb::response_op::Response as OpResponse;
use pb::watch_client::WatchClient;

/// Operations etcd accepts in one transaction by default (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;
/// Keys per page of a range read. Pages are also cut by size (see `read_audit`).
const PAGE: i64 = 256;
/// Keys per page of a mirror load: mirrored values are a few hundred bytes (a page of a
/// million revocations' is ~1.7 MB), and fewer, larger pages cost etcd less per key (4,096
/// against 1,024: a CA start at a million 15 % quicker, decision 121).
const LOAD_PAGE: i64 = 4096;
/// A range holding more keys than this is read in parts (see `Inner::range_each`).
const SPLIT_ABOVE: usize = LOAD_PAGE as usize;
/// Keys a part is cut to hold, were the keys even: most parts then take one page, and etcd
/// walks each key of its index about once (it walks a request's whole range, not a page).
const PART_KEYS: usize = 3 * LOAD_PAGE as usize / 4;
/// Parts of a mirror load read at once (see `Inner::range_each`).
const LOAD_IN_FLIGHT: usize = 4;
/// Keys a mirror load holds read ahead of the part it is waiting for (two pages, ~3.5 MB of
/// revocations).
const LOAD_AHEAD: usize = 2 * LOAD_PAGE as usize;
/// Largest response the client accepts; pages stay far below it.
const MAX_RESPONSE: usize = 16 << 20;
/// How long a caller waits for the watch to apply a revision it wrote.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one operation over transient failures (with backoff, rotating endpoints).
const ATTEMPTS: u32 = 8;
/// Nonces of recent token consumptions kept in the token record, to resolve ambiguous retries.
const NONCES_KEPT: usize = 32;

/// Where the etcd cluster is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix of this trust domain's data, ending in `/`.
    pub prefix: String,
    /// Client TLS; plain HTTP/2 when `None`.
    pub tls: Option<EtcdTls>,
    /// Deadline of one request.
    pub request_timeout: Duration,
}

/// Client TLS to etcd.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA bundle that signed the members' certificates.
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM), when etcd requires client certificates.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    /// Parses `etcd://h1:2379,h2:2379` into a config with `prefix`.
    pub fn parse(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            StoreError::Backend(format!("{url:?}: expected etcd://host:port[,host:port...]"))
        })?;
        let endpoints: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty()
            || endpoints
                .iter()
                .any(|e| e.contains('/') || !e.contains(':'))
        {
            return Err(StoreError::Backend(format!(
                "{url:?}: expected etcd://host:port[,host:port...]"
            )));
        }
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self {
            endpoints,
            prefix,
            tls: None,
            request_timeout: Duration::from_secs(2),
        })
    }
}

/// The etcd-backed [`Store`].
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// Dropping it stops the client runtime (and with it the watch).
    _stop: oneshot::Sender<()>,
}

struct Inner {
    rt: tokio::runtime::Handle,
    channels: Vec<Channel>,
    /// Index of the endpoint in use; moved on to the next after a transport failure.
    current: AtomicUsize,
    /// As configured, for `health`.
    endpoints: Vec<String>,
    prefix: String,
    timeout: Duration,
    mirror: RwLock<Mirror>,
    /// Highest etcd revision the mirror has applied.
    applied: Mutex<i64>,
    applied_cv: Condvar,
    feed: broadcast::Sender<Arc<Committed>>,
    shared_tx: broadcast::Sender<SharedChange>,
    /// Test hook: this many coming transactions report a failure after etcd applied them.
    ambiguous: AtomicUsize,
    /// Whether commits write audit, revocation and issued records in the binary layout: only while
    /// every replica in the registry reads it (decision 124; see `Inner::update_layout`).
    binary: AtomicBool,
}

/// Requests sent to etcd by every store in this process (benchmarks: round trips per issuance).
static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// Mirror reloads after the watch fell behind a compaction, by every store in this process.
static RESYNCS: AtomicU64 = AtomicU64::new(0);

/// The chain head, as stored at `<prefix>audit/head`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Head {
    seq: u64,
    #[serde(with = "hex_hash")]
    hash: [u8; 32],
}

/// A token as stored in etcd: the record plus the nonces of its latest consumptions.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenEntry {
    #[serde(flatten)]
    rec: TokenRecord,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nonces: Vec<String>,
}

/// What the store reads of a replica registry entry (`crate::replicas::ReplicaInfo`).
#[derive(Deserialize)]
struct RegistryEntry {
    #[serde(default)]
    binary_records: bool,
}

/// An issued-index entry with its prune time (sled keeps that in its expiry index).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IssuedEntry {
    #[serde(flatten)]
    rec: IssuedRecord,
    prune_at: i64,
}

impl Stored for IssuedEntry {
    fn to_stored(&self) -> Vec<u8> {
        issued_with_prune_to_stored(&self.rec, self.prune_at)
    }
    fn from_stored(raw: &[u8]) -> Result<Self, String> {
        match issued_with_prune_from_stored(raw) {
            Some(r) => r.map(|(rec, prune_at)| Self { rec, prune_at }),
            None => serde_json::from_slice(raw).map_err(|e| e.to_string()),
        }
    }
}

/// The mirrored collections, each value with its etcd mod_revision.
#[derive(Default)]
struct Mirror {
    /// With their consumption nonces: a consume starts from here and must keep them.
    tokens: HashMap<String, (TokenEntry, i64)>,
    enrollments: HashMap<String, Enrollment>,
    issued: HashMap<String, (IssuedEntry, i64)>,
    issued_ids: HashMap<String, BTreeSet<String>>,
    /// Serial entries and identity rules, compactly (a million of them fit in ~100 MB), each
    /// with its mod revision as the index's `aux`.
    revoked: RevIndex,
    access: BTreeMap<String, (AccessRecord, i64)>,
    shared: BTreeMap<String, Versioned>,
    head: Option<(Head, i64)>,
    /// The archive checkpoint (last deleted seq), for `stats`.
    checkpoint: Option<u64>,
    /// Seq of the last record published on the commit feed.
    published: u64,
}

/// What a key under the prefix is.
enum Key<'a> {
    Token(&'a str),
    Enrollment(&'a str),
    Issued(&'a str),
    Revoked(&'a str),
    Rule(&'a str),
    Access(&'a str),
    Shared(&'a str),
    Head,
    Checkpoint,
    Record,
    Other,
}

/// Collections loaded into the mirror (everything but audit records).
const MIRRORED: [&str; 9] = [
    "tokens/",
    "enroll/",
    "issued/",
    "revoked/",
    "rules/",
    "access/",
    "shared/",
    "audit/head",
    "audit/checkpoint",
];

impl EtcdStore {
    /// Connects, loads the mirror and starts the watch. Fails when no member answers.
    pub fn open(config: EtcdConfig) -> Result<Self, StoreError> {
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("lanyard-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                let _ = rt.block_on(stop_rx);
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the etcd client: {e}")))?;
        let rt = handle_rx
            .recv()
            .map_err(|_| StoreError::Backend("etcd client runtime did not start".into()))?
            .map_err(StoreError::Backend)?;
        let channels = run(&rt, {
            let config = config.clone();
            async move { channels(&config) }
        })??;
        let inner = Arc::new(Inner {
            rt,
            channels,
            current: AtomicUsize::new(0),
            endpoints: config.endpoints.clone(),
            prefix: config.prefix.clone(),
            timeout: config.request_timeout,
            mirror: RwLock::new(Mirror::default()),
            applied: Mutex::new(0),
            applied_cv: Condvar::new(),
            feed: broadcast::channel(FEED_BUFFER).0,
            shared_tx: broadcast::channel(FEED_BUFFER).0,
            ambiguous: AtomicUsize::new(0),
            binary: AtomicBool::new(false),
        });
        let rev = inner.block({
            let i = inner.clone();
            async move { i.reload().await }
        })??;
        info!(prefix = %inner.prefix, revision = rev, "etcd store loaded");
        let i = inner.clone();
        inner.rt.spawn(async move { i.watch_loop(rev + 1).await });
        Ok(Self { inner, _stop: stop })
    }

    /// Test hook: the next `n` transactions are applied by etcd but reported to the caller as
    /// failed, as a timeout after the request was sent would be.
    #[doc(hidden)]
    pub fn danger_inject_ambiguous(&self, n: usize) {
        self.inner.ambiguous.store(n, Ordering::SeqCst);
    }

    /// Tests and diagnosis: the value of `key` (under the prefix) exactly as etcd holds it.
    #[doc(hidden)]
    pub fn raw_value(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.inner.key(key);
        let kv = self.block(|i| Box::pin(async move { i.get(key).await }))??;
        Ok(kv.map(|kv| kv.value))
    }

    /// Requests sent to etcd so far by every etcd store in this process (benchmarks: round
    /// trips per issuance).
    pub fn requests_total() -> u64 {
        REQUESTS.load(Ordering::Relaxed)
    }

    /// Times a watch fell behind an etcd compaction and the mirror was reloaded, by every etcd
    /// store in this process (status and tests).
    pub fn resyncs_total() -> u64 {
        RESYNCS.load(Ordering::Relaxed)
    }
}

/// Runs `fut` on the client runtime and waits for it from any thread (also from inside another
/// runtime, where `block_on` would panic).
fn run<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| StoreError::Unavailable("etcd client stopped".into()))
}

fn channels(config: &EtcdConfig) -> Result<Vec<Channel>, StoreError> {
    let tls = match &config.tls {
        None => None,
        Some(t) => {
            let read = |p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| StoreError::Backend(format!("cannot read {}: {e}", p.display())))
            };
            let mut c =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&t.ca_file)?));
            if let Some((cert, key)) = &t.client {
                c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            Some(c)
        }
    };
    config
        .endpoints
        .iter()
        .map(|e| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{e}"))
                .map_err(|err| StoreError::Backend(format!("etcd endpoint {e:?}: {err}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            if let Some(t) = &tls {
                ep = ep
                    .tls_config(t.clone())
                    .map_err(|err| StoreError::Backend(format!("etcd TLS {e:?}: {err}")))?;
            }
            Ok(ep.connect_lazy())
        })
        .collect()
}

// === impl Inner ===

impl Inner {
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        run(&self.rt, fut)
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }

    fn record_key(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("audit/rec/{seq:016x}"))
    }

    fn classify<'a>(&self, key: &'a [u8]) -> Key<'a> {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
        else {
            return Key::Other;
        };
        let (coll, id) = rest.split_once('/').unwrap_or((rest, ""));
        match coll {
            "tokens" => Key::Token(id),
            "enroll" => Key::Enrollment(id),
            "issued" => Key::Issued(id),
            "revoked" => Key::Revoked(id),
            "rules" => Key::Rule(id),
            "access" => Key::Access(id),
            "shared" => Key::Shared(id),
            "audit" if id == "head" => Key::Head,
            "audit" if id == "checkpoint" => Key::Checkpoint,
            "audit" if id.starts_with("rec/") => Key::Record,
            _ => Key::Other,
        }
    }

    fn channel(&self) -> Channel {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }

    /// After a transport failure: use the next member.
    fn rotate(&self) {
        if self.channels.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn kv(&self) -> KvClient<Channel> {
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        KvClient::new(self.channel()).max_decoding_message_size(MAX_RESPONSE)
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// A read, retried with backoff over transient failures (reads are idempotent).
    async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, StoreError> {
        let mut attempt = 0;
        loop {
            match self.kv().range(self.request(req.clone())).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if transient(&s) && attempt + 1 < ATTEMPTS => {
                    attempt += 1;
                    self.backoff(attempt, &s).await;
                }
                Err(s) => return Err(status_err(s)),
            }
        }
    }

    async fn backoff(&self, attempt: u32, s: &Status) {
        if attempt == 1 {
            warn!(code = ?s.code(), message = s.message(), "etcd request failed; retrying");
        } else {
            debug!(code = ?s.code(), attempt, "etcd request failed again");
        }
        self.rotate();
        let ms = (50u64 << attempt.min(5)).min(1500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// One transaction, sent once: an error may or may not have been applied (the callers
    /// resolve that from what they find stored).
    async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, Status> {
        let r = self
            .kv()
            .txn(self.request(req))
            .await
            .map(|r| r.into_inner());
        if r.is_err() {
            self.rotate();
        }
        if r.is_ok()
            && self
                .ambiguous
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Status::deadline_exceeded(
                "injected: applied, then timed out",
            ));
        }
        r
    }

    /// One key, linearizable.
    async fn get(&self, key: Vec<u8>) -> Result<Option<pb::KeyValue>, StoreError> {
        Ok(self
            .range(pb::RangeRequest {
                key,
                ..Default::default()
            })
            .await?
            .kvs
            .pop())
    }

    /// Hands every key in `[key, end)` at revision `rev` (0: latest) to `each`, in key order,
    /// page by page, so a caller holds a few pages of the range at a time, not all of it (a
    /// million revocations as key-values would be ~400 MB); returns the revision read.
    ///
    /// etcd 3.4 walks its whole index from a range's start to its end for every request, a
    /// limit or not (it counts the range), so paging a range from its start made a load
    /// quadratic: 300,000 revocations took 50 s to load, a million ~9 minutes. A range found
    /// to hold more keys than a page is therefore cut by key into parts of about
    /// [`PART_KEYS`] keys each, were the keys even (see [`split_points`]), and a part still
    /// too large is cut again: every request then walks a bounded part of the index, and the
    /// load is O(n log n) in index steps. Once the first page has fixed the revision, up to
    /// [`LOAD_IN_FLIGHT`] parts are read at once (etcd serves concurrent reads on all of its
    /// cores; one at a time, a load waited on one of them), and pages read ahead of an earlier
    /// part wait for it, at most [`LOAD_AHEAD`] keys of them.
    async fn range_each(
        &self,
        key: Vec<u8>,
        end: Vec<u8>,
        mut rev: i64,
        mut each: impl FnMut(&pb::KeyValue) -> Result<(), StoreError>,
    ) -> Result<i64, StoreError> {
        /// A part of the range, in key order with the others.
        enum Part {
            /// Not asked for yet: `[from, end)`.
            Todo(Vec<u8>, Vec<u8>),
            /// Asked for (the request's number); the part ends at `end`.
            Reading(u64, Vec<u8>),
            /// A page read, waiting for the parts before it.
            Read(Vec<pb::KeyValue>),
        }
        let mut parts = std::collections::VecDeque::from([Part::Todo(key, end)]);
        let mut reading = futures_util::stream::FuturesUnordered::new();
        let (mut asked, mut ahead) = (0u64, 0usize);
        // The last key handed on: the parts' bookkeeping is checked, not trusted, to keep order.
        let mut last: Option<Vec<u8>> = None;
        loop {
            while let Some(Part::Read(_)) = parts.front() {
                if let Some(Part::Read(kvs)) = parts.pop_front() {
                    ahead -= kvs.len();
                    let ordered = kvs.windows(2).all(|w| w[0].key < w[1].key)
                        && kvs
                            .first()
                            .is_none_or(|f| last.as_ref().is_none_or(|l| *l < f.key));
                    if !ordered {
                        return Err(StoreError::Backend(
                            "etcd range load: keys arrived out of order".into(),
                        ));
                    }
                    kvs.iter().try_for_each(&mut each)?;
                    if let Some(l) = kvs.last() {
                        last = Some(l.key.clone());
                    }
                }
            }
            if parts.is_empty() {
                return Ok(rev);
            }
            // One request until the revision is known; the earliest parts first.
            let limit = if rev == 0 { 1 } else { LOAD_IN_FLIGHT };
            for part in parts.iter_mut() {
                if !reading.is_empty() && (reading.len() >= limit || ahead >= LOAD_AHEAD) {
                    break;
                }
                if let Part::Todo(from, to) = part {
                    let req = pb::RangeRequest {
                        key: std::mem::take(from),
                        range_end: to.clone(),
                        limit: LOAD_PAGE,
                        revision: rev,
                        ..Default::default()
                    };
                    let id = asked;
                    asked += 1;
                    *part = Part::Reading(id, std::mem::take(to));
                    reading.push(async move { (id, self.range(req).await) });
                }
            }
            let Some((id, resp)) = futures_util::StreamExt::next(&mut reading).await else {
                return Err(StoreError::Backend(
                    "etcd range load: no part left to read".into(),
                ));
            };
            let resp = resp?;
            if rev == 0 {
                rev = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            let Some((at, end)) = parts.iter_mut().enumerate().find_map(|(i, p)| match p {
                Part::Reading(r, end) if *r == id => Some((i, std::mem::take(end))),
                _ => None,
            }) else {
                return Err(StoreError::Backend(
                    "etcd range load: a page lost its part".into(),
                ));
            };
            let mut rest = Vec::new();
            if let Some(last) = resp.kvs.last().filter(|_| resp.more) {
                let mut next = last.key.clone();
                next.push(0);
                // `count` is every key in the range, this page's included.
                let left = usize::try_from(resp.count)
                    .unwrap_or(0)
                    .saturating_sub(resp.kvs.len());
                let points = if left > SPLIT_ABOVE {
                    let common = next.iter().zip(&end).take_while(|(x, y)| x == y).count();
                    let digits = key_digits(resp.kvs.iter().map(|kv| kv.key.as_slice()), common);
                    split_points(&next, &end, (left / PART_KEYS + 1).min(256), &digits)
                } else {
                    Vec::new()
                };
                let mut lower = next;
                for p in points {
                    rest.push(Part::Todo(std::mem::replace(&mut lower, p.clone()), p));
                }
                rest.push(Part::Todo(lower, end));
            }
            ahead += resp.kvs.len();
            parts[at] = Part::Read(resp.kvs);
            for (i, p) in rest.into_iter().enumerate() {
                parts.insert(at + 1 + i, p);
            }
        }
    }

    /// Rebuilds the mirror from a consistent snapshot; returns its revision.
    async fn reload(&self) -> Result<i64, StoreError> {
        let mut rev = 0;
        let mut fresh = Mirror::default();
        fresh.revoked.start_load();
        for coll in MIRRORED {
            let key = self.key(coll);
            let end = prefix_end(&key);
            rev = self
                .range_each(key, end, rev, |kv| self.apply_put(&mut fresh, kv).map(drop))
                .await?;
        }
        fresh.revoked.finish_load();
        let head_seq = fresh.head.map_or(0, |(h, _)| h.seq);
        let missed = {
            let mut m = self.mirror.write().unwrap_or_else(|p| p.into_inner());
            let published = m.published;
            fresh.published = if published == 0 { head_seq } else { published };
            *m = fresh;
            self.update_layout(&m);
            published
        };
        // Records committed while the watch was away: publish them from the log.
        if missed != 0 && missed < head_seq {
            self.publish_from_log(missed + 1, head_seq).await?;
        }
        self.set_applied(rev);
        Ok(rev)
    }

    async fn publish_from_log(&self, from: u64, to: u64) -> Result<(), StoreError> {
        let mut next = from;
        while next <= to {
            let page = self.read_audit(next, 256).await?;
            if page.is_empty() {
                break;
            }
            let m = self.mirror.read().unwrap_or_else(|p| p.into_inner());
            for r in page {
                next = r.seq + 1;
                let revocations = m.revoked.range(r.seq - 1, r.seq);
                let _ = self.feed.send(Arc::new(Committed {
                    record: r,
                    revocations,
                    access: vec![],
                }));
            }
        }
        let mut m = self.mirror.write().unwrap_or_else(|p| p.into_inner());
        m.published = m.published.max(next.saturating_sub(1));
        Ok(())
    }

    /// A record as this store writes it now: binary while [`Inner::binary`] says every
    /// replica reads it, else JSON, which every release reads ([`load`] reads both).
    fn record_bytes<T: Stored + Serialize>(&self, r: &T) -> Vec<u8> {
        if self.binary.load(Ordering::Relaxed) {
            r.to_stored()
        } else {
            encode(r)
        }
    }

    /// Opens or closes the binary layout from the registry in `m`: open only while every
    /// registered replica says it reads it. A replica from before decision 124 cannot decode
    /// such a record: its watch and reloads would fail and it would answer from a mirror that
    /// no longer moves. Entries stay registered across a crash (until a clean stop or a day of
    /// silence), so a replica down for an upgrade keeps the layout closed until it is back.
    fn update_layout(&self, m: &Mirror) {
        let prefix = crate::replicas::PREFIX;
        let open = m
            .shared
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .all(|(_, v)| {
                serde_json::from_slice::<RegistryEntry>(&v.value).is_ok_and(|e| e.binary_records)
            });
        if self.binary.swap(open, Ordering::Relaxed) != open {
            info!(
                binary = open,
                "etcd record layout: {}",
                if open {
                    "every registered replica reads binary records; writing them"
                } else {
                    "a registered replica reads JSON records only; writing JSON"
                }
            );
        }
    }

    fn set_applied(&self, rev: i64) {
        let mut a = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if rev > *a {
            *a = rev;
            self.applied_cv.notify_all();
        }
    }

    /// Waits until the mirror has applied `rev` (read-your-writes).
    fn wait_applied(&self, rev: i64) -> Result<(), StoreError> {
        let a = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let (a, timeout) = self
            .applied_cv
            .wait_timeout_while(a, APPLY_TIMEOUT, |a| *a < rev)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() && *a < rev {
            return Err(StoreError::Unavailable(format!(
                "etcd watch has not delivered revision {rev} (at {})",
                *a
            )));
        }
        Ok(())
    }

    /// Applies one put to `m`; returns the audit record it carried, if any.
    fn apply_put(&self, m: &mut Mirror, kv: &pb::KeyValue) -> Result<Option<Applied>, StoreError> {
        let rev = kv.mod_revision;
        Ok(match self.classify(&kv.key) {
            Key::Token(id) => {
                let e: TokenEntry = decode(&kv.key, &kv.value)?;
                m.tokens.insert(id.to_string(), (e, rev));
                None
            }
            Key::Enrollment(id) => {
                m.enrollments
                    .insert(id.to_string(), decode(&kv.key, &kv.value)?);
                None
            }
            Key::Issued(serial) => {
                let e: IssuedEntry = load(&kv.key, &kv.value)?;
                m.issued_ids
                    .entry(e.rec.spiffe_id.clone())
                    .or_default()
                    .insert(serial.to_string());
                m.issued.insert(serial.to_string(), (e, rev));
                None
            }
            Key::Revoked(_) => {
                let r: RevocationRecord = load(&kv.key, &kv.value)?;
                m.revoked.insert_with(&r, rev);
                Some(Applied::Revocation(r))
            }
            Key::Rule(_) => {
                let r: RevocationRecord = load(&kv.key, &kv.value)?;
                m.revoked.insert_with(&r, rev);
                Some(Applied::Revocation(r))
            }
            Key::Access(id) => {
                let a: AccessRecord = decode(&kv.key, &kv.value)?;
                m.access.insert(id.to_string(), (a.clone(), rev));
                Some(Applied::Access(a))
            }
            Key::Shared(k) => {
                let v = Versioned {
                    value: kv.value.clone(),
                    version: rev as u64,
                };
                m.shared.insert(k.to_string(), v.clone());
                Some(Applied::Shared(k.to_string(), Some(v)))
            }
            Key::Head => {
                m.head = Some((decode(&kv.key, &kv.value)?, rev));
                None
            }
            Key::Checkpoint => {
                let c: Head = decode(&kv.key, &kv.value)?;
                m.checkpoint = Some(c.seq);
                None
            }
            Key::Record => Some(Applied::Record(load(&kv.key, &kv.value)?)),
            Key::Other => None,
        })
    }

    fn apply_delete(&self, m: &mut Mirror, key: &[u8]) -> Option<Applied> {
        match self.classify(key) {
            Key::Token(id) => {
                m.tokens.remove(id);
            }
            Key::Enrollment(id) => {
                m.enrollments.remove(id);
            }
            Key::Issued(serial) => {
                if let Some((e, _)) = m.issued.remove(serial)
                    && let Some(set) = m.issued_ids.get_mut(&e.rec.spiffe_id)
                {
                    set.remove(serial);
                    if set.is_empty() {
                        m.issued_ids.remove(&e.rec.spiffe_id);
                    }
                }
            }
            Key::Revoked(serial) => {
                m.revoked.remove_serial(serial);
            }
            Key::Rule(id) => {
                m.revoked.remove_rule(id);
            }
            Key::Access(id) => {
                m.access.remove(id);
            }
            Key::Shared(k) => {
                m.shared.remove(k);
                return Some(Applied::Shared(k.to_string(), None));
            }
            Key::Head => m.head = None,
            Key::Checkpoint => m.checkpoint = None,
            Key::Record | Key::Other => {}
        }
        None
    }

    /// Applies the events of one watch response, publishes what they committed, and advances
    /// the applied revision.
    fn apply_events(&self, events: &[pb::Event]) -> Result<(), StoreError> {
        let mut top = 0;
        // Per revision (= per transaction): records, revocations and access written.
        let mut txns: BTreeMap<i64, TxnChanges> = BTreeMap::new();
        let mut shared = Vec::new();
        {
            let mut m = self.mirror.write().unwrap_or_else(|p| p.into_inner());
            for ev in events {
                let Some(kv) = &ev.kv else { continue };
                top = top.max(kv.mod_revision);
                let applied = if ev.r#type == 1 {
                    self.apply_delete(&mut m, &kv.key)
                } else {
                    self.apply_put(&mut m, kv)?
                };
                let t = txns.entry(kv.mod_revision).or_default();
                match applied {
                    Some(Applied::Record(r)) => t.0.push(r),
                    Some(Applied::Revocation(r)) => t.1.push(r),
                    Some(Applied::Access(a)) => t.2.push(a),
                    Some(Applied::Shared(k, v)) => shared.push(SharedChange { key: k, value: v }),
                    None => {}
                }
            }
            if shared
                .iter()
                .any(|c| c.key.starts_with(crate::replicas::PREFIX))
            {
                self.update_layout(&m);
            }
            for (_, (mut records, revs, mut access)) in txns {
                records.sort_by_key(|r| r.seq);
                let n = records.len();
                for (i, r) in records.into_iter().enumerate() {
                    if r.seq <= m.published {
                        continue;
                    }
                    m.published = r.seq;
                    let revocations = revs.iter().filter(|x| x.rev == r.seq).cloned().collect();
                    // etcd does not say which event of a transaction wrote an access record:
                    // they ride with the transaction's last record.
                    let access = if i + 1 == n {
                        std::mem::take(&mut access)
                    } else {
                        vec![]
                    };
                    let _ = self.feed.send(Arc::new(Committed {
                        record: r,
                        revocations,
                        access,
                    }));
                }
            }
        }
        for c in shared {
            let _ = self.shared_tx.send(c);
        }
        self.set_applied(top);
        Ok(())
    }

    /// Follows every change under the prefix from `start`, forever; resyncs after compaction.
    async fn watch_loop(self: Arc<Self>, mut start: i64) {
        let mut failures = 0u32;
        loop {
            match self.watch_once(&mut start).await {
                Ok(Resync::Compacted) => {
                    warn!(
                        revision = start,
                        "etcd compacted past the watch; reloading the mirror"
                    );
                    RESYNCS.fetch_add(1, Ordering::Relaxed);
                    match self.reload().await {
                        Ok(rev) => start = rev + 1,
                        Err(e) => warn!(error = %e, "cannot reload the etcd mirror"),
                    }
                }
                Ok(Resync::Ended) => {}
                Err(s) => {
                    failures += 1;
                    self.backoff(failures.min(6), &s).await;
                    continue;
                }
            }
            failures = 0;
        }
    }

    async fn watch_once(&self, start: &mut i64) -> Result<Resync, Status> {
        let (tx, rx) = mpsc::channel(4);
        let key = self.key("");
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    range_end: prefix_end(&key),
                    key,
                    start_revision: *start,
                    progress_notify: true,
                    prev_kv: false,
                },
            )),
        };
        let _ = tx.send(create).await;
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        // Only a member that has a leader may answer: a partitioned member would serve a
        // watch that never sees new commits.
        req.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let mut stream = WatchClient::new(self.channel())
            .max_decoding_message_size(MAX_RESPONSE)
            .watch(req)
            .await?
            .into_inner();
        while let Some(resp) = stream.message().await? {
            if resp.compact_revision > 0 {
                *start = resp.compact_revision;
                return Ok(Resync::Compacted);
            }
            if resp.canceled {
                warn!(reason = %resp.cancel_reason, "etcd cancelled the watch");
                return Ok(Resync::Ended);
            }
            if !resp.events.is_empty() {
                if let Err(e) = self.apply_events(&resp.events) {
                    warn!(error = %e, "undecodable change in etcd; reloading the mirror");
                    return Ok(Resync::Compacted);
                }
                let top = resp
                    .events
                    .iter()
                    .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
                    .max()
                    .unwrap_or(0);
                *start = top + 1;
            } else if !resp.created && !resp.fragment {
                // A progress notification: everything up to it has been delivered.
                let rev = resp.header.as_ref().map_or(0, |h| h.revision);
                self.set_applied(rev);
                *start = (*start).max(rev + 1);
            }
        }
        drop(tx);
        Ok(Resync::Ended)
    }

    /// Audit records from `from`, at most `limit`, paged by count and by size.
    async fn read_audit(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        // Seqs are gapless and their keys fixed-width: the range ends at the last record wanted,
        // not at the end of the log, which etcd 3.4 would walk for every page (see
        // `range_each`).
        let end = from.max(1).checked_add(limit as u64).map_or_else(
            || prefix_end(&self.key("audit/rec/")),
            |past| self.record_key(past),
        );
        let mut out: Vec<AuditRecord> = Vec::new();
        let mut next = self.record_key(from.max(1));
        let mut page = PAGE;
        while out.len() < limit {
            let want = page.min((limit - out.len()) as i64);
            let resp = match self
                .kv()
                .range(self.request(pb::RangeRequest {
                    key: next.clone(),
                    range_end: end.clone(),
                    limit: want,
                    ..Default::default()
                }))
                .await
            {
                Ok(r) => r.into_inner(),
                // A page too large for one response: halve it.
                Err(s) if s.code() == Code::OutOfRange || s.code() == Code::ResourceExhausted => {
                    if page == 1 {
                        return Err(status_err(s));
                    }
                    page = (page / 2).max(1);
                    continue;
                }
                Err(s) if transient(&s) => {
                    self.backoff(1, &s).await;
                    continue;
                }
                Err(s) => return Err(status_err(s)),
            };
            for kv in &resp.kvs {
                out.push(load(&kv.key, &kv.value)?);
            }
            match resp.kvs.last() {
                Some(last) if resp.more => {
                    next = last.key.clone();
                    next.push(0);
                }
                _ => break,
            }
        }
        // Records below `from` were deleted only by an archival: say so instead of skipping.
        if out.first().map(|r| r.seq) != Some(from.max(1))
            && let Some(kv) = self.get(self.key("audit/checkpoint")).await?
        {
            let c: Head = decode(&kv.key, &kv.value)?;
            if from <= c.seq {
                return Err(StoreError::Archived { through: c.seq });
            }
        }
        Ok(out)
    }
}

/// What one transaction wrote: audit records, revocations, access records.
type TxnChanges = (Vec<AuditRecord>, Vec<RevocationRecord>, Vec<AccessRecord>);

enum Applied {
    Record(AuditRecord),
    Revocation(RevocationRecord),
    Access(AccessRecord),
    Shared(String, Option<Versioned>),
}

enum Resync {
    Compacted,
    Ended,
}

// === impl Store for EtcdStore ===

impl EtcdStore {
    fn mirror(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        self.inner.mirror.read().unwrap_or_else(|p| p.into_inner())
    }

    fn block<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Inner>) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
    ) -> Result<T, StoreError> {
        self.inner.block(f(self.inner.clone()))
    }

    /// Puts of a commit's writes, and the compares of its guards (with their write index).
    fn write_ops(
        &self,
        writes: &[Write],
        m: &Mirror,
        ops: &mut Vec<pb::RequestOp>,
        compares: &mut Vec<(usize, pb::Compare)>,
        failed: &mut Vec<usize>,
    ) {
        let i = &self.inner;
        for (n, w) in writes.iter().enumerate() {
            match w {
                Write::PutToken(t) => {
                    let e = TokenEntry {
                        rec: t.clone(),
                        nonces: vec![],
                    };
                    ops.push(put(i.key(&format!("tokens/{}", t.id)), encode(&e)));
                }
                Write::PutEnrollment(e) => {
                    ops.push(put(i.key(&format!("enroll/{}", e.spiffe_id)), encode(e)));
                }
                Write::PutIssued(rec, prune_at) => {
                    let e = IssuedEntry {
                        rec: rec.clone(),
                        prune_at: *prune_at,
                    };
                    ops.push(put(
                        i.key(&format!("issued/{}", rec.serial)),
                        i.record_bytes(&e),
                    ));
                }
                Write::PutRevocation(r) => {
                    let key = if r.identity_rule {
                        i.key(&format!("rules/{}", r.spiffe_id))
                    } else {
                        i.key(&format!("revoked/{}", r.serial))
                    };
                    ops.push(put(key, i.record_bytes(r)));
                }
                Write::PutAccess(a) => {
                    ops.push(put(i.key(&format!("access/{}", a.id)), encode(a)));
                }
                Write::Guard(g) => {
                    let (key, current) = match g {
                        Guard::Access { id, expect } => (
                            i.key(&format!("access/{id}")),
                            match (m.access.get(id), expect) {
                                (Some((now, rev)), Some(e)) if now == e.as_ref() => Some(*rev),
                                (None, None) => Some(0),
                                _ => None,
                            },
                        ),
                        Guard::IdentityRule { spiffe_id, expect } => (
                            i.key(&format!("rules/{spiffe_id}")),
                            match (m.revoked.rule_with(spiffe_id), expect) {
                                (Some((now, rev)), Some(e)) if now == e.as_ref() => Some(*rev),
                                (None, None) => Some(0),
                                _ => None,
                            },
                        ),
                        // Absent in the mirror: etcd checks it was never created since.
                        Guard::TokenAbsent { id } => (
                            i.key(&format!("tokens/{id}")),
                            (!m.tokens.contains_key(id)).then_some(0),
                        ),
                    };
                    match current {
                        // Unchanged in the mirror: etcd checks it is still that revision.
                        Some(rev) => compares.push((n, mod_is(key, rev))),
                        None => failed.push(n),
                    }
                }
            }
        }
    }

    /// Reads the stored head and waits for the mirror to have it.
    fn sync_head(&self) -> Result<Option<(Head, i64)>, StoreError> {
        let key = self.inner.key("audit/head");
        let kv = self.block(|i| Box::pin(async move { i.get(key).await }))??;
        match kv {
            None => Ok(None),
            Some(kv) => {
                self.inner.wait_applied(kv.mod_revision)?;
                Ok(Some((decode(&kv.key, &kv.value)?, kv.mod_revision)))
            }
        }
    }
}

impl Store for EtcdStore {
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.mirror().tokens.get(id).map(|(t, _)| t.rec.clone()))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out: Vec<TokenRecord> = self
            .mirror()
            .tokens
            .values()
            .map(|(t, _)| t.rec.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn consume_token(&self, id: &str, now: i64) -> Result<Consume, StoreError> {
        let key = self.inner.key(&format!("tokens/{id}"));
        // Start from the mirror (the transaction's compare catches a stale copy, and its failure
        // branch returns the current record); a token the mirror does not have yet (created a
        // moment ago on another replica) is read linearizably.
        let mirrored = self.mirror().tokens.get(id).map(|(e, rev)| pb::KeyValue {
            key: key.clone(),
            mod_revision: *rev,
            value: encode(e),
            ..Default::default()
        });
        let mut kv = match mirrored {
            Some(kv) => Some(kv),
            None => {
                let key = key.clone();
                self.block(|i| Box::pin(async move { i.get(key).await }))??
            }
        };
        let mut pending: Option<String> = None;
        // Attempts that made no progress. A compare lost to a racer that took a use is progress
        // (uses only go down), so N concurrent redemptions of an N-use token all finish instead
        // of the last ones running out of attempts.
        let mut attempt = 0;
        let mut uses_seen: Option<u32> = None;
        while attempt < ATTEMPTS * 4 {
            let Some(cur) = kv.take() else {
                return Ok(Consume::Missing);
            };
            let entry: TokenEntry = decode(&cur.key, &cur.value)?;
            if uses_seen.is_none_or(|u| entry.rec.uses_left >= u) {
                attempt += 1;
            }
            uses_seen = Some(entry.rec.uses_left);
            // An earlier attempt that reported failure may have been applied after all.
            if let Some(n) = &pending
                && entry.nonces.contains(n)
            {
                self.inner.wait_applied(cur.mod_revision)?;
                let mut before = entry.rec;
                before.uses_left += 1;
                return Ok(Consume::Won(before));
            }
            if entry.rec.uses_left == 0 {
                return Ok(Consume::AlreadyUsed);
            }
            if entry.rec.expires_at <= now {
                return Ok(Consume::Expired);
            }
            let nonce = crate::encoding::hex(&rand::random::<[u8; 12]>());
            let mut after = entry.clone();
            after.rec.uses_left -= 1;
            after.nonces.push(nonce.clone());
            let excess = after.nonces.len().saturating_sub(NONCES_KEPT);
            after.nonces.drain(..excess);
            let txn = pb::TxnRequest {
                compare: vec![mod_is(key.clone(), cur.mod_revision)],
                success: vec![put(key.clone(), encode(&after))],
                failure: vec![range_op(key.clone())],
            };
            match self.block(|i| Box::pin(async move { i.txn(txn).await }))? {
                Ok(r) if r.succeeded => {
                    self.inner
                        .wait_applied(r.header.map_or(0, |h| h.revision))?;
                    return Ok(Consume::Won(entry.rec));
                }
                Ok(r) => kv = first_kv(r),
                Err(s) => {
                    // Ambiguous: re-read and decide from the nonce.
                    pending = Some(nonce);
                    debug!(code = ?s.code(), attempt, "token consume ambiguous; re-reading");
                    std::thread::sleep(Duration::from_millis(20 << attempt.min(5)));
                    let key = key.clone();
                    kv = self.block(|i| Box::pin(async move { i.get(key).await }))??;
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "token {id}: too many conflicting attempts"
        )))
    }

    fn enrollment(&self, spiffe_id: &str) -> Result<Option<Enrollment>, StoreError> {
        Ok(self.mirror().enrollments.get(spiffe_id).cloned())
    }

    fn issued_for(&self, spiffe_id: &str) -> Result<Vec<IssuedRecord>, StoreError> {
        let m = self.mirror();
        Ok(m.issued_ids
            .get(spiffe_id)
            .into_iter()
            .flatten()
            .filter_map(|s| m.issued.get(s).map(|(e, _)| e.rec.clone()))
            .collect())
    }

    fn issued(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        Ok(self.mirror().issued.get(serial).map(|(e, _)| e.rec.clone()))
    }

    fn revoked_serial(&self, serial: &str) -> Result<Option<RevocationRecord>, StoreError> {
        Ok(self.mirror().revoked.serial(serial))
    }

    fn identity_rule(&self, spiffe_id: &str) -> Result<Option<RevocationRecord>, StoreError> {
        Ok(self.mirror().revoked.rule(spiffe_id))
    }

    fn identity_rules(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        Ok(self.mirror().revoked.rules())
    }

    fn access_all(&self) -> Result<Vec<AccessRecord>, StoreError> {
        Ok(self
            .mirror()
            .access
            .values()
            .map(|(a, _)| a.clone())
            .collect())
    }

    fn revocations_since(&self, since: u64) -> Result<Vec<RevocationRecord>, StoreError> {
        Ok(self.mirror().revoked.since(since))
    }

    fn revocations_page(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<RevocationRecord>, StoreError> {
        Ok(self.mirror().revoked.page(since, limit))
    }

    fn for_each_revocation(&self, f: &mut dyn FnMut(&RevocationBrief)) -> Result<(), StoreError> {
        super::index::walk(|g| g(&self.mirror().revoked), f);
        Ok(())
    }

    fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        Ok(self.mirror().head.map(|(h, _)| (h.seq, h.hash)))
    }

    fn read_audit(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.block(|i| Box::pin(async move { i.read_audit(from, limit).await }))?
    }

    fn truncate_audit(&self, through_seq: u64, hash: [u8; 32]) -> Result<usize, StoreError> {
        let i = &self.inner;
        let (rec_key, cp_key) = (i.record_key(through_seq), i.key("audit/checkpoint"));
        let (k1, k2) = (rec_key.clone(), cp_key.clone());
        let (at, cp) = self.block(|i| {
            Box::pin(async move { Ok::<_, StoreError>((i.get(k1).await?, i.get(k2).await?)) })
        })??;
        let at_rec: Option<AuditRecord> =
            at.as_ref().map(|kv| load(&kv.key, &kv.value)).transpose()?;
        let checkpoint: Option<Head> = cp
            .as_ref()
            .map(|kv| decode(&kv.key, &kv.value))
            .transpose()?;
        super::check_truncation(
            through_seq,
            hash,
            at_rec.as_ref(),
            self.audit_head()?,
            checkpoint.map(|c| (c.seq, c.hash)),
        )?;
        let head = Head {
            seq: through_seq,
            hash,
        };
        // One transaction: the checkpoint moves and the records go together, and only if neither
        // the record nor the checkpoint changed since read (two replicas pruning at once).
        let txn = pb::TxnRequest {
            compare: vec![
                mod_is(rec_key, at.map_or(0, |kv| kv.mod_revision)),
                mod_is(cp_key.clone(), cp.map_or(0, |kv| kv.mod_revision)),
            ],
            success: vec![
                put(cp_key, encode(&head)),
                pb::RequestOp {
                    request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                        key: i.record_key(0),
                        range_end: i.record_key(through_seq + 1),
                        ..Default::default()
                    })),
                },
            ],
            failure: vec![],
        };
        let r = self
            .block(|i| Box::pin(async move { i.txn(txn).await }))?
            .map_err(status_err)?;
        if !r.succeeded {
            return Err(StoreError::ArchiveMismatch(
                "the log's checkpoint moved while pruning (another replica pruned); re-run the export"
                    .into(),
            ));
        }
        // Read-your-writes: `stats` counts from the mirror's checkpoint.
        i.wait_applied(r.header.as_ref().map_or(0, |h| h.revision))?;
        let deleted = r.responses.into_iter().find_map(|op| match op.response {
            Some(OpResponse::ResponseDeleteRange(d)) => Some(d.deleted),
            _ => None,
        });
        Ok(deleted.unwrap_or(0).max(0) as usize)
    }

    fn audit_checkpoint(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let key = self.inner.key("audit/checkpoint");
        let kv = self.block(|i| Box::pin(async move { i.get(key).await }))??;
        Ok(kv
            .map(|kv| decode::<Head>(&kv.key, &kv.value))
            .transpose()?
            .map(|h| (h.seq, h.hash)))
    }

    fn commit(&self, records: &[AuditRecord], writes: &[Write]) -> Result<(), StoreError> {
        if records.is_empty() && writes.is_empty() {
            return Ok(());
        }
        let i = &self.inner;
        let head_key = i.key("audit/head");
        let mut ops = Vec::with_capacity(records.len() + writes.len() + 1);
        let mut guards = Vec::new();
        let mut failed = Vec::new();
        let mut compares = Vec::new();
        let head_rev = {
            let m = self.mirror();
            if let Some(first) = records.first() {
                let (seq, hash, rev) =
                    m.head.map_or((0, crate::audit::GENESIS_HASH, 0), |(h, r)| {
                        (h.seq, h.hash, r)
                    });
                if first.seq != seq + 1 || first.prev_hash != hash {
                    drop(m);
                    // Our view or the writer's is behind: catch the mirror up, then re-sequence.
                    self.sync_head()?;
                    return Err(StoreError::HeadMoved);
                }
                compares.push(mod_is(head_key.clone(), rev));
            }
            self.write_ops(writes, &m, &mut ops, &mut guards, &mut failed);
            m.head.map_or(0, |(_, r)| r)
        };
        if !failed.is_empty() {
            return Err(StoreError::GuardFailed { writes: failed });
        }
        for r in records {
            ops.push(put(i.record_key(r.seq), i.record_bytes(r)));
        }
        if let Some(last) = records.last() {
            let head = Head {
                seq: last.seq,
                hash: last.hash,
            };
            ops.push(put(head_key.clone(), encode(&head)));
        }
        if ops.len() > MAX_TXN_OPS {
            return Err(StoreError::Backend(format!(
                "commit of {} keys exceeds etcd's {MAX_TXN_OPS} per transaction",
                ops.len()
            )));
        }
        let mut failure = vec![range_op(head_key.clone())];
        failure.extend(guards.iter().map(|(_, c)| range_op(c.key.clone())));
        compares.extend(guards.iter().map(|(_, c)| c.clone()));
        let txn = pb::TxnRequest {
            compare: compares,
            success: ops,
            failure,
        };
        for attempt in 0..ATTEMPTS {
            let t = txn.clone();
            match self.block(|i| Box::pin(async move { i.txn(t).await }))? {
                Ok(r) if r.succeeded => {
                    return i.wait_applied(r.header.map_or(0, |h| h.revision));
                }
                Ok(r) => {
                    // Which compare failed: a guard whose key moved, else the head.
                    let mut kvs = r.responses.into_iter().map(|op| match op.response {
                        Some(OpResponse::ResponseRange(rr)) => rr.kvs.into_iter().next(),
                        _ => None,
                    });
                    let head_now = kvs.next().flatten();
                    let failed: Vec<usize> = guards
                        .iter()
                        .zip(kvs)
                        .filter(|((_, c), kv)| {
                            kv.as_ref().map_or(0, |kv| kv.mod_revision) != compared_rev(c)
                        })
                        .map(|((n, _), _)| *n)
                        .collect();
                    if !failed.is_empty() {
                        return Err(StoreError::GuardFailed { writes: failed });
                    }
                    if let Some(kv) = head_now {
                        i.wait_applied(kv.mod_revision)?;
                    }
                    return Err(StoreError::HeadMoved);
                }
                Err(s) => {
                    // Ambiguous: the head says whether our records went in.
                    debug!(code = ?s.code(), attempt, "etcd commit ambiguous; re-reading the head");
                    std::thread::sleep(Duration::from_millis(20 << attempt.min(5)));
                    let key = head_key.clone();
                    let kv = self.block(|i| Box::pin(async move { i.get(key).await }))??;
                    let now_rev = kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    match (records.last(), &kv) {
                        (Some(last), Some(kv)) => {
                            let h: Head = decode(&kv.key, &kv.value)?;
                            if h.seq == last.seq && h.hash == last.hash {
                                return i.wait_applied(kv.mod_revision);
                            }
                            if now_rev != head_rev {
                                i.wait_applied(now_rev)?;
                                return Err(StoreError::HeadMoved);
                            }
                        }
                        (Some(_), None) => {}
                        // Puts only: repeating them is harmless.
                        (None, _) => {}
                    }
                }
            }
        }
        Err(StoreError::Unavailable(
            "etcd commit failed repeatedly".into(),
        ))
    }

    fn flush(&self) -> Result<(), StoreError> {
        // An etcd transaction is durable (raft-committed) once it returns.
        Ok(())
    }

    fn prune(&self, now: i64) -> Result<usize, StoreError> {
        let i = &self.inner;
        let expired: Vec<(Vec<u8>, i64)> = {
            let m = self.mirror();
            let tokens = m
                .tokens
                .iter()
                .filter(|(_, (t, _))| t.rec.expires_at < now)
                .map(|(k, (_, r))| (i.key(&format!("tokens/{k}")), *r));
            let issued = m
                .issued
                .iter()
                .filter(|(_, (e, _))| e.prune_at < now)
                .map(|(k, (_, r))| (i.key(&format!("issued/{k}")), *r));
            let revoked = m.revoked.expired(now).into_iter().map(|(rule, k, r)| {
                let coll = if rule { "rules" } else { "revoked" };
                (i.key(&format!("{coll}/{k}")), r)
            });
            let access = m
                .access
                .iter()
                .filter(|(_, (a, _))| a.prune_at < now)
                .map(|(k, (_, r))| (i.key(&format!("access/{k}")), *r));
            tokens.chain(issued).chain(revoked).chain(access).collect()
        };
        let mut pruned = 0;
        let mut top = 0;
        // Each delete is guarded by the revision seen, so a record renewed meanwhile (on any
        // replica) survives. A batch whose guard fails is redone key by key.
        for batch in expired.chunks(MAX_TXN_OPS / 2) {
            let txn = |b: &[(Vec<u8>, i64)]| pb::TxnRequest {
                compare: b.iter().map(|(k, r)| mod_is(k.clone(), *r)).collect(),
                success: b.iter().map(|(k, _)| delete_op(k.clone())).collect(),
                failure: vec![],
            };
            let t = txn(batch);
            let r = self.block(|i| Box::pin(async move { i.txn(t).await }))?;
            match r {
                Ok(r) if r.succeeded => {
                    pruned += batch.len();
                    top = top.max(r.header.map_or(0, |h| h.revision));
                }
                _ => {
                    for one in batch {
                        let t = txn(std::slice::from_ref(one));
                        if let Ok(r) = self.block(|i| Box::pin(async move { i.txn(t).await }))?
                            && r.succeeded
                        {
                            pruned += 1;
                            top = top.max(r.header.map_or(0, |h| h.revision));
                        }
                    }
                }
            }
        }
        if top > 0 {
            i.wait_applied(top)?;
        }
        Ok(pruned)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let db = self.block(|i| {
            Box::pin(async move {
                REQUESTS.fetch_add(1, Ordering::Relaxed);
                MaintenanceClient::new(i.channel())
                    .status(i.request(pb::StatusRequest {}))
                    .await
                    .map(|r| r.into_inner().db_size)
            })
        })?;
        let m = self.mirror();
        Ok(StoreStats {
            tokens: m.tokens.len(),
            issued: m.issued.len(),
            revoked_serials: m.revoked.serial_count(),
            identity_rules: m.revoked.rule_count(),
            audit: m.head.map_or(0, |(h, _)| h.seq as usize) - m.checkpoint.unwrap_or(0) as usize,
            disk_bytes: db.unwrap_or(0).max(0) as u64,
        })
    }

    fn health(&self) -> Result<StoreHealth, StoreError> {
        let (status, alarms, members) = self
            .block(|i| {
                Box::pin(async move {
                    REQUESTS.fetch_add(3, Ordering::Relaxed);
                    let mut m = MaintenanceClient::new(i.channel());
                    let status = m
                        .status(i.request(pb::StatusRequest {}))
                        .await?
                        .into_inner();
                    let alarms = m
                        .alarm(i.request(pb::AlarmRequest::default()))
                        .await?
                        .into_inner();
                    let members = ClusterClient::new(i.channel())
                        .member_list(i.request(pb::MemberListRequest {}))
                        .await?
                        .into_inner();
                    Ok::<_, Status>((status, alarms, members))
                })
            })?
            .map_err(status_err)?;
        let alarm_name = |a: i32| match a {
            1 => "NOSPACE".to_string(),
            2 => "CORRUPT".to_string(),
            n => format!("alarm {n}"),
        };
        Ok(StoreHealth {
            location: format!(
                "{} prefix {}",
                self.inner.endpoints.join(","),
                self.inner.prefix
            ),
            size_bytes: status.db_size.max(0) as u64,
            members: members
                .members
                .into_iter()
                .map(|m| StoreMember {
                    id: m.id,
                    name: m.name,
                    client_urls: m.client_ur_ls,
                })
                .collect(),
            leader: status.leader,
            raft_term: status.raft_term,
            alarms: alarms
                .alarms
                .into_iter()
                .filter(|a| a.alarm != 0)
                .map(|a| format!("{:x}: {}", a.member_id, alarm_name(a.alarm)))
                .collect(),
            binary_records: self.inner.binary.load(Ordering::Relaxed),
        })
    }

    fn shared_get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.mirror().shared.get(key).cloned())
    }

    fn shared_put(&self, key: &str, value: &[u8], expect: Option<u64>) -> Result<bool, StoreError> {
        let k = self.inner.key(&format!("shared/{key}"));
        let txn = pb::TxnRequest {
            compare: vec![mod_is(k.clone(), expect.unwrap_or(0) as i64)],
            success: vec![put(k.clone(), value.to_vec())],
            failure: vec![],
        };
        for attempt in 0..ATTEMPTS {
            let t = txn.clone();
            match self.block(|i| Box::pin(async move { i.txn(t).await }))? {
                Ok(r) => {
                    if r.succeeded {
                        self.inner
                            .wait_applied(r.header.map_or(0, |h| h.revision))?;
                    }
                    return Ok(r.succeeded);
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20 << attempt.min(5)));
                    let key = k.clone();
                    let kv = self.block(|i| Box::pin(async move { i.get(key).await }))??;
                    match kv {
                        // Our value, written since the version we expected: it went in.
                        Some(kv) if kv.value == value && Some(kv.mod_revision as u64) != expect => {
                            self.inner.wait_applied(kv.mod_revision)?;
                            return Ok(true);
                        }
                        Some(kv) if Some(kv.mod_revision as u64) != expect => return Ok(false),
                        None if expect.is_some() => return Ok(false),
                        _ => {}
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "shared {key}: etcd write failed repeatedly"
        )))
    }

    fn shared_delete(&self, key: &str, expect: Option<u64>) -> Result<bool, StoreError> {
        let k = self.inner.key(&format!("shared/{key}"));
        let txn = pb::TxnRequest {
            compare: expect
                .map(|v| mod_is(k.clone(), v as i64))
                .into_iter()
                .collect(),
            success: vec![delete_op(k)],
            failure: vec![],
        };
        let r = self
            .block(|i| Box::pin(async move { i.txn(txn).await }))?
            .map_err(status_err)?;
        let deleted = r.succeeded
            && r.responses.iter().any(|op| {
                matches!(&op.response, Some(OpResponse::ResponseDeleteRange(d)) if d.deleted > 0)
            });
        if deleted {
            self.inner
                .wait_applied(r.header.map_or(0, |h| h.revision))?;
        }
        Ok(deleted)
    }

    fn shared_list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self
            .mirror()
            .shared
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn shared_changes(&self) -> broadcast::Receiver<SharedChange> {
        self.inner.shared_tx.subscribe()
    }

    fn commit_feed(&self) -> Option<broadcast::Sender<Arc<Committed>>> {
        Some(self.inner.feed.clone())
    }

    fn max_commit_ops(&self) -> usize {
        MAX_TXN_OPS
    }
}

/// The first key of the failure branch's range read.
fn first_kv(r: pb::TxnResponse) -> Option<pb::KeyValue> {
    r.responses.into_iter().find_map(|op| match op.response {
        Some(OpResponse::ResponseRange(rr)) => rr.kvs.into_iter().next(),
        _ => None,
    })
}

/// `key`'s mod_revision is `rev` (0: the key does not exist).
fn mod_is(key: Vec<u8>, rev: i64) -> pb::Compare {
    pb::Compare {
        result: 0,
        target: 2,
        key,
        target_union: Some(TargetUnion::ModRevision(rev)),
        range_end: vec![],
    }
}

fn compared_rev(c: &pb::Compare) -> i64 {
    match c.target_union {
        Some(TargetUnion::ModRevision(r)) => r,
        _ => -1,
    }
}

fn put(key: Vec<u8>, value: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestPut(pb::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn delete_op(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
            key,
            ..Default::default()
        })),
    }
}

fn range_op(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestRange(pb::RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// Up to `k - 1` keys strictly between `a` and `b` (`a < b`), ascending and about evenly
/// spaced, reading what follows their common prefix as a fraction whose digits are `digits`
/// (sorted, distinct: the bytes the range's keys are seen to use; all 256 when unknown); none
/// when the two are too close to split.
///
/// Digits matter for keys that use a few byte values: hex serials use 16 of 256, so cuts spaced
/// by byte value put nearly every key in one or two parts, and a load read them one page at a
/// time; in base 16 the parts hold about as many keys each.
fn split_points(a: &[u8], b: &[u8], k: usize, digits: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let base = digits.len() as u128;
    if base < 2 || k < 2 {
        return out;
    }
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // As many digits as fit in 120 bits (15 of base 256).
    let (mut width, mut span) = (0usize, 1u128);
    while let Some(next) = span.checked_mul(base).filter(|s| *s <= 1 << 120) {
        span = next;
        width += 1;
    }
    // A byte that is not a digit reads as the next digit up (`base` past the last), which keeps
    // the fractions in key order.
    let rank = |x: u8| digits.partition_point(|d| *d < x) as u128;
    let fraction = |x: &[u8]| {
        (0..width).fold(0u128, |v, i| {
            v * base + x.get(common + i).map_or(0, |c| rank(*c))
        })
    };
    let (from, to) = (fraction(a), fraction(b));
    if to <= from {
        return out;
    }
    let step = (to - from) / k as u128;
    for i in 1..k as u128 {
        let mut v = from + step * i;
        let mut tail = vec![digits[0]; width];
        for d in tail.iter_mut().rev() {
            *d = digits[(v % base) as usize];
            v /= base;
        }
        while tail.last() == Some(&digits[0]) {
            tail.pop();
        }
        let mut key = a[..common].to_vec();
        key.extend_from_slice(&tail);
        if key.as_slice() > a && key.as_slice() < b && out.last().is_none_or(|l| *l < key) {
            out.push(key);
        }
    }
    out
}

/// The bytes `keys` use after their first `skip`, sorted, as [`split_points`]' digits; every
/// byte value when they use fewer than two.
fn key_digits<'a>(keys: impl Iterator<Item = &'a [u8]>, skip: usize) -> Vec<u8> {
    let mut seen = [false; 256];
    for k in keys {
        for b in k.iter().skip(skip) {
            seen[usize::from(*b)] = true;
        }
    }
    let digits: Vec<u8> = (0..=255u8).filter(|b| seen[usize::from(*b)]).collect();
    if digits.len() < 2 {
        (0..=255u8).collect()
    } else {
        digits
    }
}

/// The smallest key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Failures worth a retry on another member or a little later.
fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown
    )
}

fn status_err(s: Status) -> StoreError {
    if transient(&s) {
        StoreError::Unavailable(format!("etcd: {}", s.message()))
    } else {
        StoreError::Backend(format!("etcd {:?}: {}", s.code(), s.message()))
    }
}

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::encoding::hex(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(D::Error::custom("expected 64 hex characters"));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(D::Error::custom)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_endpoints() {
        let c = EtcdConfig::parse("etcd://a:2379, b:2380", "/lanyard/x").unwrap();
        assert_eq!(c.endpoints, ["a:2379", "b:2380"]);
        assert_eq!(c.prefix, "/lanyard/x/");
        for bad in ["http://a:1", "etcd://", "etcd://a", "etcd://a:1/x"] {
            assert!(EtcdConfig::parse(bad, "/p/").is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b");
    }

    #[test]
    fn hex_keys_are_cut_into_parts_of_about_the_same_size() {
        // A load's view: the first page of a collection of hex serials read, the rest to cut.
        let prefix = b"/p/revoked/";
        let end = prefix_end(prefix);
        let mut keys: Vec<Vec<u8>> = (0..16_000)
            .map(|_| {
                let mut k = prefix.to_vec();
                k.extend(format!("{:032x}", rand::random::<u128>()).bytes());
                k
            })
            .collect();
        keys.sort();
        let (page, rest) = keys.split_at(1024);
        let mut next = page[1023].clone();
        next.push(0);
        let common = next.iter().zip(&end).take_while(|(x, y)| x == y).count();
        let digits = key_digits(page.iter().map(Vec::as_slice), common);
        assert_eq!(digits, b"/0123456789abcdef");
        let points = split_points(&next, &end, 8, &digits);
        assert_eq!(points.len(), 7);
        let mut counts = [0usize; 8];
        for k in rest {
            counts[points.partition_point(|p| p <= k)] += 1;
        }
        let mean = rest.len() / 8;
        assert!(
            counts.iter().all(|c| *c > mean / 2 && *c < mean * 2),
            "{counts:?}"
        );
    }

    #[test]
    fn split_points_lie_strictly_between_in_order() {
        // A whole collection, in halves: the cut is under its prefix, halfway through the byte.
        let all: Vec<u8> = (0..=255).collect();
        let end = prefix_end(b"/p/revoked/");
        assert_eq!(
            split_points(b"/p/revoked/", &end, 2, &all),
            vec![b"/p/revoked/\x80".to_vec()]
        );
        assert_eq!(split_points(b"a", b"c", 2, &all), vec![b"b".to_vec()]);
        assert_eq!(split_points(b"/p/revoked/", &end, 256, &all).len(), 255);
        // Adjacent keys have none between them.
        assert!(split_points(b"a", b"a\0", 4, &all).is_empty());
        assert!(split_points(b"b", b"a", 4, &all).is_empty());
        let mut rng = rand::rng();
        for _ in 0..10_000 {
            let len = |r: &mut rand::rngs::ThreadRng| rand::Rng::random_range(r, 0..20);
            let a: Vec<u8> = (0..len(&mut rng))
                .map(|_| rand::random::<u8>() % 4)
                .collect();
            let b: Vec<u8> = (0..len(&mut rng))
                .map(|_| rand::random::<u8>() % 4)
                .collect();
            let (a, b) = if a < b { (a, b) } else { (b, a) };
            if a == b {
                continue;
            }
            let k = rand::Rng::random_range(&mut rng, 2..300);
            // Every byte, or a few (some of the keys' bytes are then not digits).
            let digits = if rand::random::<bool>() {
                all.clone()
            } else {
                key_digits([[1u8, 2].as_slice(), &[3]].into_iter(), 0)
            };
            let points = split_points(&a, &b, k, &digits);
            assert!(points.len() < k);
            let mut prev = a.clone();
            for p in points.iter().chain([&b]) {
                assert!(prev < *p, "{a:?} .. {points:?} .. {b:?}");
                prev = p.clone();
            }
        }
    }
}
