//! Prometheus metrics, health and readiness over plain HTTP on a separate listener
//! (`metrics_listen` for `lanyard serve`, `--metrics-listen` for `lanyard agent`; off unless set).
//!
//! Events on hot paths (issuances, audit commits, renewals) go to process-wide handles made
//! once ([`ca`], [`agent`]): an observation is an atomic add (a histogram takes a short,
//! uncontended lock), with no allocation and no lock held across an await. Gauges that need a
//! store scan or a lock (revocations, tokens, disk bytes, access requests) are computed when
//! scraped, by the [`Exporter`] of the running server or agent. Every metric is listed in
//! `docs/metrics.md`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

use crate::access::Access;
use crate::agent::SvidState;
use crate::ca::CaHandle;
use crate::encoding::hex;
use crate::federation::BundleHub;
use crate::issuance::IssueError;
use crate::net::Admission;
use crate::spiffe::TrustDomain;
use crate::store::Store;
use crate::tls::unix_now;

/// Connections the metrics listener serves at once; more wait in the accept queue. Scrapers
/// and probes open one or two.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two store scans for the scrape-time gauges: scrapes closer together
/// (several Prometheus replicas, a hurried curl loop) reuse the last scan's figures.
const MIN_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// The exposition format [`encode`] writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A static label pair.
type Label = (&'static str, &'static str);
/// A label whose value is known only at run time (a trust domain, a listener).
type DynLabel = [(&'static str, String); 1];

/// How a certificate was asked for (the `path` label of `lanyard_issuances_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuePath {
    /// Bootstrap with a join token.
    Token,
    /// Renewal over mTLS.
    Renewal,
    /// The server's own credentials (its serving certificate, the admin credential).
    Local,
    /// Bootstrap with an attested JWT (`[[attestor]]`). Last: `PATHS` is indexed by discriminant.
    Attest,
}

const PATHS: [IssuePath; 4] = [
    IssuePath::Token,
    IssuePath::Renewal,
    IssuePath::Local,
    IssuePath::Attest,
];
/// The `code` label: the gRPC code the request ended with, in lower snake case.
const CODES: [&str; 6] = [
    "ok",
    "invalid_argument",
    "unauthenticated",
    "permission_denied",
    "failed_precondition",
    "internal",
];

/// The `code` label of `lanyard_refused_calls_total`: a fixed set, whatever a client sends.
const REFUSAL_CODES: [&str; 5] = [
    "resource_exhausted",
    "unauthenticated",
    "permission_denied",
    "invalid_argument",
    "failed_precondition",
];

impl IssuePath {
    fn label(self) -> &'static str {
        match self {
            IssuePath::Token => "token",
            IssuePath::Renewal => "renewal",
            IssuePath::Local => "local",
            IssuePath::Attest => "attest",
        }
    }
}

/// The CA's process-wide event metrics.
pub struct CaMetrics {
    issuances: Family<[Label; 2], Counter>,
    /// `issued[path][code]`: the same counters as `issuances`, reachable without a lookup.
    issued: [[Counter; CODES.len()]; PATHS.len()],
    issuance_seconds: Family<[Label; 1], Histogram>,
    issuance_hist: [Histogram; PATHS.len()],
    audit_group_size: Histogram,
    audit_commit_seconds: Histogram,
    audit_flush_seconds: Histogram,
    federation_refresh_errors: Family<DynLabel, Counter>,
    federation_refreshes: Family<DynLabel, Counter>,
    /// Refused gRPC calls by code (every call, every service; over-budget ones included).
    refused_calls: Family<[Label; 1], Counter>,
    refused: [Counter; REFUSAL_CODES.len()],
    /// When each federated domain's bundle was last fetched successfully (unix seconds).
    federation_fetched_at: Mutex<HashMap<String, i64>>,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl CaMetrics {
    fn new() -> Self {
        let issuances = Family::<[Label; 2], Counter>::default();
        let issued = PATHS.map(|p| {
            CODES.map(|c| {
                issuances
                    .get_or_create(&[("path", p.label()), ("code", c)])
                    .clone()
            })
        });
        let issuance_seconds =
            Family::<[Label; 1], Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let issuance_hist = PATHS.map(|p| {
            issuance_seconds
                .get_or_create(&[("path", p.label())])
                .clone()
        });
        let refused_calls = Family::<[Label; 1], Counter>::default();
        let refused = REFUSAL_CODES.map(|c| refused_calls.get_or_create(&[("code", c)]).clone());
        Self {
            refused_calls,
            refused,
            issuances,
            issued,
            issuance_seconds,
            issuance_hist,
            // 1 .. 1024 (the writer's largest group).
            audit_group_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            audit_commit_seconds: latency_histogram(),
            audit_flush_seconds: latency_histogram(),
            federation_refresh_errors: Family::default(),
            federation_refreshes: Family::default(),
            federation_fetched_at: Mutex::default(),
        }
    }

    /// Counts one issuance request on `path` that ended with `result`, `started` when it came in.
    pub fn issuance<T>(&self, path: IssuePath, started: Instant, result: &Result<T, IssueError>) {
        let code = match result {
            Ok(_) => 0,
            // `Missing` comes only from admin verbs, never from an issuance.
            Err(IssueError::BadRequest(_) | IssueError::Missing(_)) => 1,
            Err(IssueError::Unauthenticated(_)) => 2,
            Err(IssueError::Denied(_)) => 3,
            Err(IssueError::Precondition(_)) => 4,
            Err(IssueError::Internal(_)) => 5,
        };
        let p = path as usize;
        self.issued[p][code].inc();
        self.issuance_hist[p].observe(started.elapsed().as_secs_f64());
    }

    /// Counts one refused gRPC call (any service) that ended with `code`; codes that are not
    /// refusals are ignored.
    pub fn refused_call(&self, code: tonic::Code) {
        let i = match code {
            tonic::Code::ResourceExhausted => 0,
            tonic::Code::Unauthenticated => 1,
            tonic::Code::PermissionDenied => 2,
            tonic::Code::InvalidArgument => 3,
            tonic::Code::FailedPrecondition => 4,
            _ => return,
        };
        self.refused[i].inc();
    }

    /// Records one audit group commit: `events` in the group, the whole commit (transaction and
    /// flush) and the flush (fsync) alone.
    pub fn audit_commit(&self, events: usize, commit: Duration, flush: Duration) {
        self.audit_group_size.observe(events as f64);
        self.audit_commit_seconds.observe(commit.as_secs_f64());
        self.audit_flush_seconds.observe(flush.as_secs_f64());
    }

    /// Records a federated bundle refresh of `td`: fetched and installed, or failed.
    pub fn federation_refresh(&self, td: &TrustDomain, ok: bool) {
        let label = [("trust_domain", td.to_string())];
        if ok {
            self.federation_refreshes.get_or_create(&label).inc();
            lock(&self.federation_fetched_at).insert(td.to_string(), unix_now());
        } else {
            self.federation_refresh_errors.get_or_create(&label).inc();
        }
    }

    /// Makes `td`'s refresh counters appear (at zero) before its first refresh.
    pub fn federation_configured(&self, td: &TrustDomain) {
        let label = [("trust_domain", td.to_string())];
        let _ = self.federation_refreshes.get_or_create(&label);
        let _ = self.federation_refresh_errors.get_or_create(&label);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "lanyard_issuances",
            "Issuance requests by path (token, renewal, local) and result code",
            self.issuances.clone(),
        );
        r.register_with_unit(
            "lanyard_issuance_duration",
            "Time from an issuance request's arrival to its answer (checks, signing, audit commit)",
            Unit::Seconds,
            self.issuance_seconds.clone(),
        );
        r.register(
            "lanyard_refused_calls",
            "Refused gRPC calls of every service by code (resource_exhausted: over the source's refusal budget)",
            self.refused_calls.clone(),
        );
        r.register(
            "lanyard_audit_group_size",
            "Audit events committed together in one transaction and one fsync",
            self.audit_group_size.clone(),
        );
        r.register_with_unit(
            "lanyard_audit_commit_duration",
            "Time to commit one audit group: the store transaction and its flush",
            Unit::Seconds,
            self.audit_commit_seconds.clone(),
        );
        r.register_with_unit(
            "lanyard_audit_flush_duration",
            "Time of the flush (fsync) part of one audit group commit",
            Unit::Seconds,
            self.audit_flush_seconds.clone(),
        );
        r.register(
            "lanyard_federation_refreshes",
            "Successful refreshes of a federated trust domain's bundle",
            self.federation_refreshes.clone(),
        );
        r.register(
            "lanyard_federation_refresh_errors",
            "Failed refreshes of a federated trust domain's bundle (fetch, content or storage)",
            self.federation_refresh_errors.clone(),
        );
    }
}

static CA: LazyLock<CaMetrics> = LazyLock::new(CaMetrics::new);

/// The CA's process-wide event metrics.
pub fn ca() -> &'static CaMetrics {
    &CA
}

/// The agent's process-wide event metrics.
pub struct AgentMetrics {
    renewals: Family<[Label; 1], Counter>,
    renewal_ok: Counter,
    renewal_failed: Counter,
    last_renewal: Gauge,
    last_renewal_success: Gauge,
    workload_connections: Gauge,
    workload_streams: Gauge,
    /// The Workload API's connection slots and how many there are, once it serves.
    workload_slots: OnceLock<(Arc<Semaphore>, usize)>,
}

impl AgentMetrics {
    fn new() -> Self {
        let renewals = Family::<[Label; 1], Counter>::default();
        let renewal_ok = renewals.get_or_create(&[("result", "success")]).clone();
        let renewal_failed = renewals.get_or_create(&[("result", "failure")]).clone();
        Self {
            renewals,
            renewal_ok,
            renewal_failed,
            last_renewal: Gauge::default(),
            last_renewal_success: Gauge::default(),
            workload_connections: Gauge::default(),
            workload_streams: Gauge::default(),
            workload_slots: OnceLock::new(),
        }
    }

    /// Records a renewal attempt and its result.
    pub fn renewal(&self, ok: bool) {
        if ok {
            self.renewal_ok.inc();
        } else {
            self.renewal_failed.inc();
        }
        self.last_renewal.set(unix_now());
        self.last_renewal_success.set(i64::from(ok));
    }

    /// The Workload API's connection slots (`max` of them): open connections are those taken.
    pub fn workload_slots(&self, slots: Arc<Semaphore>, max: usize) {
        let _ = self.workload_slots.set((slots, max));
    }

    /// Counts an open Workload API stream until the guard is dropped.
    pub fn workload_stream(&'static self) -> StreamGuard {
        self.workload_streams.inc();
        StreamGuard(&self.workload_streams)
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "lanyard_agent_renewals",
            "Renewal attempts by result (success, failure)",
            self.renewals.clone(),
        );
        r.register_with_unit(
            "lanyard_agent_last_renewal_timestamp",
            "When the last renewal attempt ended (unix time; 0 before the first)",
            Unit::Seconds,
            self.last_renewal.clone(),
        );
        r.register(
            "lanyard_agent_last_renewal_success",
            "1 if the last renewal attempt succeeded, 0 if it failed or none was made",
            self.last_renewal_success.clone(),
        );
        r.register(
            "lanyard_agent_workload_api_connections",
            "Open Workload API client connections",
            self.workload_connections.clone(),
        );
        r.register(
            "lanyard_agent_workload_api_streams",
            "Open Workload API watch streams (FetchX509SVID, FetchX509Bundles)",
            self.workload_streams.clone(),
        );
    }
}

/// An open Workload API stream; dropping it uncounts it.
#[derive(Debug)]
pub struct StreamGuard(&'static Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

static AGENT: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

/// The agent's process-wide event metrics.
pub fn agent() -> &'static AgentMetrics {
    &AGENT
}

/// What the metrics listener serves: the exposition, and readiness.
pub trait Exporter: Send + Sync + 'static {
    /// The exposition text, with scrape-time gauges computed first.
    fn render(self: Arc<Self>) -> Pin<Box<dyn Future<Output = String> + Send>>;
    /// Whether the process is ready for work; `Err` says why not.
    fn ready(&self) -> Result<(), String>;
}

/// The CA's gauges, computed when scraped.
struct CaGauges {
    audit_head: Gauge,
    revoked_serials: Gauge,
    identity_rules: Gauge,
    access_pending: Gauge,
    access_grants: Gauge,
    tokens: Gauge,
    issued: Gauge,
    disk_bytes: Gauge,
    ca_not_after: Family<[(&'static str, String); 2], Gauge>,
    bundle_age: Family<DynLabel, Gauge>,
    connections: Family<DynLabel, Gauge>,
}

/// The running CA's exporter.
pub struct CaExporter {
    registry: Registry,
    gauges: CaGauges,
    store: Arc<dyn Store>,
    cas: CaHandle,
    bundles: Arc<BundleHub>,
    access: Arc<Access>,
    listeners: Vec<(&'static str, Arc<Admission>)>,
    /// When the store was last scanned; held during a scan, so concurrent scrapes share one.
    last_scan: tokio::sync::Mutex<Option<Instant>>,
}

impl CaExporter {
    /// An exporter over the running CA's parts; `listeners` are the admissions whose open
    /// connections to count.
    pub fn new(
        store: Arc<dyn Store>,
        cas: CaHandle,
        bundles: Arc<BundleHub>,
        access: Arc<Access>,
        listeners: Vec<(&'static str, Arc<Admission>)>,
    ) -> Arc<Self> {
        let mut registry = Registry::default();
        register_build_info(&mut registry);
        ca().register(&mut registry);
        let gauges = CaGauges {
            audit_head: Gauge::default(),
            revoked_serials: Gauge::default(),
            identity_rules: Gauge::default(),
            access_pending: Gauge::default(),
            access_grants: Gauge::default(),
            tokens: Gauge::default(),
            issued: Gauge::default(),
            disk_bytes: Gauge::default(),
            ca_not_after: Family::default(),
            bundle_age: Family::default(),
            connections: Family::default(),
        };
        let g = &gauges;
        let r = &mut registry;
        r.register(
            "lanyard_audit_head_seq",
            "Sequence number of the newest audit record",
            g.audit_head.clone(),
        );
        r.register(
            "lanyard_revoked_serials",
            "Live serial revocations (not yet pruned)",
            g.revoked_serials.clone(),
        );
        r.register(
            "lanyard_identity_rules",
            "Live identity rules (revocations by SPIFFE ID)",
            g.identity_rules.clone(),
        );
        r.register(
            "lanyard_access_requests_pending",
            "Access requests waiting for approval",
            g.access_pending.clone(),
        );
        r.register(
            "lanyard_access_grants_active",
            "Temporary access grants in force",
            g.access_grants.clone(),
        );
        r.register(
            "lanyard_join_tokens",
            "Join tokens in the store (not yet pruned)",
            g.tokens.clone(),
        );
        r.register(
            "lanyard_issued_certificates",
            "Issued certificates still indexed (not yet pruned)",
            g.issued.clone(),
        );
        r.register_with_unit(
            "lanyard_store_disk",
            "Size of the store on disk, as sled reports it",
            Unit::Bytes,
            g.disk_bytes.clone(),
        );
        r.register_with_unit(
            "lanyard_ca_not_after_timestamp",
            "notAfter of each CA certificate in force (unix time), by role (active, staged, retiring) and SHA-256 fingerprint",
            Unit::Seconds,
            g.ca_not_after.clone(),
        );
        r.register_with_unit(
            "lanyard_federation_bundle_age",
            "Time since a federated domain's bundle was last fetched successfully by this process",
            Unit::Seconds,
            g.bundle_age.clone(),
        );
        r.register(
            "lanyard_open_connections",
            "Open connections by listener (grpc, bundle_endpoint)",
            g.connections.clone(),
        );
        Arc::new(Self {
            registry,
            gauges,
            store,
            cas,
            bundles,
            access,
            listeners,
            last_scan: tokio::sync::Mutex::new(None),
        })
    }

    async fn refresh(&self) {
        let mut last_scan = self.last_scan.lock().await;
        if last_scan.is_none_or(|at| at.elapsed() >= MIN_SCAN_INTERVAL) {
            self.scan_store().await;
            *last_scan = Some(Instant::now());
        }
        drop(last_scan);
        self.refresh_cheap();
    }

    /// The gauges that need a store scan or the access service's lock.
    async fn scan_store(&self) {
        let g = &self.gauges;
        let (pending, grants) = self.access.counts().await;
        g.access_pending.set(pending as i64);
        g.access_grants.set(grants as i64);
        let store = self.store.clone();
        // sled's size_on_disk walks the directory: keep it off the runtime's threads.
        let scanned =
            tokio::task::spawn_blocking(move || (store.stats(), store.audit_head())).await;
        match scanned {
            Ok((Ok(stats), head)) => {
                g.revoked_serials.set(stats.revoked_serials as i64);
                g.identity_rules.set(stats.identity_rules as i64);
                g.tokens.set(stats.tokens as i64);
                g.issued.set(stats.issued as i64);
                g.disk_bytes
                    .set(i64::try_from(stats.disk_bytes).unwrap_or(i64::MAX));
                if let Ok(h) = head {
                    g.audit_head.set(h.map_or(0, |(seq, _)| seq as i64));
                }
            }
            Ok((Err(e), _)) => warn!(error = %e, "metrics: cannot read store statistics"),
            Err(e) => warn!(error = %e, "metrics: store statistics task failed"),
        }
    }

    /// The gauges read from memory.
    fn refresh_cheap(&self) {
        let g = &self.gauges;
        let set = self.cas.current();
        g.ca_not_after.clear();
        let roles = [
            ("active", Some(set.active())),
            ("staged", set.staged()),
            ("retiring", set.retiring()),
        ];
        for (role, ca) in roles {
            if let Some(ca) = ca {
                g.ca_not_after
                    .get_or_create(&[
                        ("role", role.to_string()),
                        ("fingerprint", hex(&ca.fingerprint())),
                    ])
                    .set(ca.not_after());
            }
        }
        let now = unix_now();
        g.bundle_age.clear();
        let held = self.bundles.current();
        for (td, fetched) in lock(&ca().federation_fetched_at).iter() {
            if held.federated.keys().any(|t| t.to_string() == *td) {
                g.bundle_age
                    .get_or_create(&[("trust_domain", td.clone())])
                    .set((now - fetched).max(0));
            }
        }
        for (name, admission) in &self.listeners {
            g.connections
                .get_or_create(&[("listener", (*name).to_string())])
                .set(admission.open() as i64);
        }
    }
}

impl Exporter for CaExporter {
    fn render(self: Arc<Self>) -> Pin<Box<dyn Future<Output = String> + Send>> {
        Box::pin(async move {
            self.refresh().await;
            to_text(&self.registry)
        })
    }

    fn ready(&self) -> Result<(), String> {
        // The listener starts once the CA serves.
        Ok(())
    }
}

/// The agent's exporter: its event metrics plus what its current SVID says.
pub struct AgentExporter {
    registry: Registry,
    state: watch::Receiver<Option<Arc<SvidState>>>,
    not_after: Gauge,
    bundle_revision: Gauge,
    ready: Gauge,
}

impl AgentExporter {
    /// An exporter following the agent's `state`.
    pub fn new(state: watch::Receiver<Option<Arc<SvidState>>>) -> Arc<Self> {
        let mut registry = Registry::default();
        register_build_info(&mut registry);
        agent().register(&mut registry);
        let not_after = Gauge::default();
        let bundle_revision = Gauge::default();
        let ready = Gauge::default();
        registry.register_with_unit(
            "lanyard_agent_certificate_not_after_timestamp",
            "notAfter of the certificate the agent holds (unix time; 0 before the first)",
            Unit::Seconds,
            not_after.clone(),
        );
        registry.register(
            "lanyard_agent_bundle_revision",
            "The CA's revision of the trust bundles the agent holds (0 when unknown)",
            bundle_revision.clone(),
        );
        registry.register(
            "lanyard_agent_ready",
            "1 while the agent holds a certificate that has not expired, else 0",
            ready.clone(),
        );
        Arc::new(Self {
            registry,
            state,
            not_after,
            bundle_revision,
            ready,
        })
    }
}

impl Exporter for AgentExporter {
    fn render(self: Arc<Self>) -> Pin<Box<dyn Future<Output = String> + Send>> {
        Box::pin(async move {
            let current = self.state.borrow().clone();
            if let Some(s) = &current {
                self.not_after.set(s.svid.not_after);
                self.bundle_revision
                    .set(i64::try_from(s.bundle_revision).unwrap_or(i64::MAX));
            }
            self.ready.set(i64::from(self.ready().is_ok()));
            if let Some((slots, max)) = agent().workload_slots.get() {
                agent()
                    .workload_connections
                    .set(max.saturating_sub(slots.available_permits()) as i64);
            }
            to_text(&self.registry)
        })
    }

    fn ready(&self) -> Result<(), String> {
        match &*self.state.borrow() {
            None => Err("no certificate yet".into()),
            Some(s) if s.svid.not_after <= unix_now() => Err("the certificate has expired".into()),
            Some(_) => Ok(()),
        }
    }
}

/// Registers `lanyard_build_info{version}`, so dashboards can tell versions apart.
fn register_build_info(r: &mut Registry) {
    r.register(
        "lanyard_build",
        "The running Lanyard version",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
}

fn to_text(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    if let Err(e) = encode(&mut out, registry) {
        warn!(error = %e, "metrics encoding failed");
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Binds the metrics listener at `at`.
pub async fn bind(at: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(at).await
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` turns true;
/// then closes every connection it has open and returns (the exporter holds the CA's store, so
/// nothing of it outlives the server).
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<dyn Exporter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = accept(&listener, &slots) => a,
            () = crate::server::stopped(&mut shutdown) => break,
        };
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
        let Some((tcp, peer, slot)) = accepted else {
            continue;
        };
        let exporter = exporter.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| answer(exporter.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection failed"),
                Err(_) => debug!(%peer, "metrics connection closed after the time limit"),
                Ok(Ok(())) => {}
            }
        });
    }
    connections.shutdown().await;
}

/// Waits for a free connection slot, then for a connection; `None` after a failed accept.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((tcp, peer)) => Some((tcp, peer, slot)),
        Err(e) => {
            debug!(error = %e, "metrics accept failed");
            // Out of file descriptors and the like: let the condition pass.
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

async fn answer(
    exporter: Arc<dyn Exporter>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
            head,
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, exporter.render().await, head),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into(), head),
        "/readyz" => match exporter.ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into(), head),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
                head,
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
            head,
        ),
    })
}

fn reply(
    status: StatusCode,
    content_type: &str,
    body: String,
    head: bool,
) -> Response<Full<Bytes>> {
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn each_issuance_outcome_lands_on_its_own_series() {
        let m = CaMetrics::new();
        let mut r = Registry::default();
        m.register(&mut r);
        let t = Instant::now();
        m.issuance(IssuePath::Renewal, t, &Ok::<(), IssueError>(()));
        m.issuance::<()>(IssuePath::Token, t, &Err(IssueError::Denied("x".into())));
        m.issuance::<()>(IssuePath::Token, t, &Err(IssueError::Denied("y".into())));
        let text = to_text(&r);
        let series =
            |p: &str, c: &str| format!("lanyard_issuances_total{{path=\"{p}\",code=\"{c}\"}}");
        assert_eq!(value(&text, &series("renewal", "ok")), Some(1.0));
        assert_eq!(
            value(&text, &series("token", "permission_denied")),
            Some(2.0)
        );
        assert_eq!(value(&text, &series("token", "ok")), Some(0.0));
        assert_eq!(
            value(
                &text,
                "lanyard_issuance_duration_seconds_count{path=\"token\"}"
            ),
            Some(2.0)
        );
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    }

    #[test]
    fn an_agent_without_a_certificate_is_not_ready() {
        let (tx, rx) = watch::channel(None);
        let exporter = AgentExporter::new(rx);
        assert!(exporter.ready().is_err());
        drop(tx);
    }
}
