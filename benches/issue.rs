//! Issuance benchmark: what a Lanyard CA sustains end to end, next to what the crypto alone costs.
//!
//! Five sections, each printed as it finishes:
//! 1. **Raw crypto**, in-process, one thread, no I/O: `ca::parse_csr` (CSR parse + signature
//!    verify) and `Authority::sign_leaf`, in µs/op, and the 2-core ceiling that implies. Also the
//!    per-request extras outside that ceiling (client-chain verify, SVID parse).
//! 2. **Group commit**: durable `AuditLog::record` appends/s with 1 writer vs many concurrent ones.
//! 3. **Renewal over mTLS** (the steady-state path): N clients, each holding its own credential and
//!    one channel, renewing in a loop.
//! 4. **Renewal as the agent does it**: the renewing clients again, each opening a new TLS
//!    connection per renewal with the certificate the previous renewal returned (the handshake
//!    and the first-call chain check included).
//! 5. **Join-token issuance**: N clients, each with its own multi-use token, on channels without a
//!    client certificate; or, with `LANYARD_BENCH_FRESH_TOKENS=1`, as the peers harness's
//!    `lanyard-token` does: every request redeems its own single-use token for its own new
//!    SPIFFE ID (minted, with the CSRs, before the clock).
//!
//! The server is the real thing: `lanyard::server::start` on 127.0.0.1:0 over a temp data dir,
//! with TLS 1.3, sled, and the durable audit log. Clients run in the same process (their own tokio
//! runtime) and share the machine's cores with the server, as they do on a loopback benchmark.
//! CSRs are generated before the clock starts (the CA only needs a valid CSR per request, and a
//! real client's keygen happens on its own machine), so client CPU is only gRPC + TLS.
//!
//! Knobs (environment; `scripts/bench-issue` documents them too):
//! - `LANYARD_BENCH_CLIENTS`   comma list of N (default `1,4,16,64`)
//! - `LANYARD_BENCH_SECS`      measured seconds per (path, N) point (default 4)
//! - `LANYARD_BENCH_WARMUP`    warm-up seconds before each point (default 1)
//! - `LANYARD_BENCH_PATHS`     `renew,token,agent` (default all three)
//! - `LANYARD_BENCH_CRYPTO_OPS` iterations per raw-crypto measurement (default 2000)
//! - `LANYARD_BENCH_AUDIT_SECS` seconds per group-commit measurement (default 2)
//! - `LANYARD_BENCH_AUDIT_WRITERS` concurrent writers in the second audit run (default 64)
//! - `LANYARD_BENCH_CLIENT_THREADS` worker threads of the client runtime (default 2)
//! - `LANYARD_BENCH_SHARED_TOKEN=1` all token clients share one multi-use token (hot key)
//! - `LANYARD_BENCH_FRESH_TOKENS=1` every token request redeems a fresh single-use token for a
//!   fresh SPIFFE ID, as the harness's `lanyard-token` does (needs `LANYARD_BENCH_REQUESTS`: the
//!   tokens are minted before the clock)
//! - `LANYARD_BENCH_FRESH_POOL` fresh tokens minted per client (default: the warm-up plus the
//!   counted requests); set it to the larger run's count in both runs of a callgrind difference,
//!   so the minting (server work too) is the same in both and cancels
//! - `LANYARD_BENCH_LOG`       a log filter (`info`): log as `lanyard serve` does, to stderr
//!   (redirect it to a file, as a service manager would), so the tracing cost is measured too;
//!   unset, nothing is logged
//! - `LANYARD_BENCH_REQUESTS`  a fixed number of requests per client per point instead of
//!   `SECS` (after `LANYARD_BENCH_WARMUP_REQUESTS`, default 5, per client): the same work every
//!   run, for `valgrind --tool=callgrind` instruction counts (run two counts and take the
//!   difference to cancel the set-up)
//! - `LANYARD_BENCH_STORE`     `etcd://host:port,...`: run the audit and end-to-end sections on
//!   etcd (a fresh key prefix per run) instead of sled; the tables then add etcd requests per
//!   issuance
#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard::audit::{AuditLog, Event, Kind};
use lanyard::ca::{Authority, LeafParams, RolesOid, parse_csr, parse_svid};
use lanyard::client::{Credential, connect, csr_for};
use lanyard::config::{Overrides, ServeSettings};
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, ca_client::CaClient};
use lanyard::spiffe::{SpiffeId, TrustDomain};
use lanyard::store::{EtcdConfig, EtcdStore, SledStore, Store};
use lanyard::tls::{Bundle, CertSlot, ServerTrust, unix_now, unix_time, verify_svid};
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

const POLICY: &str = r#"
trust_domain = "example.org"
listen = "127.0.0.1:0"
[[policy]]
spiffe_id = "spiffe://example.org/bench/*"
roles = ["db-read", "deploy"]
max_ttl = "10m"
"#;

struct Knobs {
    /// `etcd://...` to benchmark on etcd; sled when `None`.
    store: Option<String>,
    clients: Vec<usize>,
    secs: f64,
    warmup: f64,
    renew: bool,
    token: bool,
    agent: bool,
    crypto_ops: usize,
    audit_secs: f64,
    audit_writers: usize,
    client_threads: usize,
    shared_token: bool,
    /// Each token request redeems its own single-use token for a new identity.
    fresh_tokens: bool,
    /// Fresh tokens minted per client (at least the warm-up plus the counted requests).
    fresh_pool: usize,
    /// Requests per client per point (0: run for `secs`).
    requests: usize,
    /// Warm-up requests per client before the counted ones (with `requests`).
    warmup_requests: usize,
}

fn env<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        _ => default,
    }
}

impl Knobs {
    fn from_env() -> Self {
        let clients: String = env("LANYARD_BENCH_CLIENTS", "1,4,16,64".to_string());
        let paths: String = env("LANYARD_BENCH_PATHS", "renew,token,agent".to_string());
        Self {
            clients: clients
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .expect("LANYARD_BENCH_CLIENTS is a comma list of numbers")
                })
                .collect(),
            secs: env("LANYARD_BENCH_SECS", 4.0),
            warmup: env("LANYARD_BENCH_WARMUP", 1.0),
            renew: paths.split(',').any(|p| p.trim() == "renew"),
            token: paths.split(',').any(|p| p.trim() == "token"),
            agent: paths.split(',').any(|p| p.trim() == "agent"),
            crypto_ops: env("LANYARD_BENCH_CRYPTO_OPS", 2000usize).max(1),
            audit_secs: env("LANYARD_BENCH_AUDIT_SECS", 2.0),
            audit_writers: env("LANYARD_BENCH_AUDIT_WRITERS", 64usize).max(1),
            client_threads: env("LANYARD_BENCH_CLIENT_THREADS", 2usize).max(1),
            shared_token: env("LANYARD_BENCH_SHARED_TOKEN", 0u8) != 0,
            fresh_tokens: env("LANYARD_BENCH_FRESH_TOKENS", 0u8) != 0,
            fresh_pool: env("LANYARD_BENCH_FRESH_POOL", 0usize),
            requests: env("LANYARD_BENCH_REQUESTS", 0usize),
            warmup_requests: env("LANYARD_BENCH_WARMUP_REQUESTS", 5usize),
            store: std::env::var("LANYARD_BENCH_STORE")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Name of the client runtime's threads, so their CPU time can be told apart from the server's.
const CLIENT_THREAD: &str = "bench-client";

/// CPU seconds (user + system) used so far by this process's live threads, split into
/// (all threads, client threads). From /proc: clock ticks of 10 ms, plenty over seconds.
fn cpu_secs() -> (f64, f64) {
    let tick = 0.01;
    let (mut all, mut client) = (0.0, 0.0);
    if let Ok(s) = std::fs::read_to_string("/proc/self/stat") {
        all = stat_cpu(&s).unwrap_or(0.0) * tick;
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let Ok(s) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            if s.contains(&format!("({CLIENT_THREAD}")) {
                client += stat_cpu(&s).unwrap_or(0.0) * tick;
            }
        }
    }
    (all, client)
}

/// utime + stime, in ticks, from a /proc stat line (fields 14 and 15; the name may hold spaces).
fn stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let knobs = Knobs::from_env();
    if let Ok(filter) = std::env::var("LANYARD_BENCH_LOG")
        && !filter.trim().is_empty()
    {
        let filter = lanyard::telemetry::parse_filter(&filter, "LANYARD_BENCH_LOG", "info")
            .expect("LANYARD_BENCH_LOG is a log filter");
        lanyard::telemetry::init(lanyard::telemetry::LogFormat::Plain, filter, false);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "lanyard issuance benchmark: {cpus} CPUs, load average {} (1/5/15 min)",
        loadavg()
    );
    let ceiling = crypto(&knobs);
    // The server's runtime as `lanyard serve` builds it.
    let server_rt = lanyard::server::tune_runtime(&mut tokio::runtime::Builder::new_multi_thread())
        .enable_all()
        .build()
        .expect("server runtime");
    server_rt.block_on(audit(&knobs));
    if !knobs.clients.is_empty() && (knobs.renew || knobs.token || knobs.agent) {
        end_to_end(&knobs, &server_rt, ceiling);
    }
    println!("\nload average at the end: {} (1/5/15 min)", loadavg());
}

// ---------------------------------------------------------------------------------------------
// 1. Raw crypto

/// Times `ops` calls of `f`, returns µs/op.
fn time_op(ops: usize, mut f: impl FnMut()) -> f64 {
    // A short warm-up, so caches and lazy tables are filled.
    for _ in 0..ops.div_ceil(10) {
        f();
    }
    let t = Instant::now();
    for _ in 0..ops {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / ops as f64
}

/// Returns the 2-core (all-core) ceiling in issuances/s.
fn crypto(k: &Knobs) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let td = TrustDomain::new("example.org").expect("td");
    let oid = RolesOid::default();
    let authority =
        Authority::load_or_create(&dir.path().join("ca"), &td, oid.clone()).expect("CA");
    let id = SpiffeId::parse("spiffe://example.org/bench/crypto").expect("id");
    let key = KeyPair::generate().expect("key");
    let csr = csr_for(&id, &key).expect("csr");
    let now = unix_now();
    let params = LeafParams {
        names: Default::default(),
        spiffe_id: id.clone(),
        roles: vec!["db-read".into()],
        not_before: now - 30,
        not_after: now + 300,
    };
    let valid = parse_csr(&csr, &td).expect("csr verifies");
    let leaf = authority
        .sign_leaf(&valid.public_key, &params)
        .expect("signs");
    let bundle = Bundle::new(vec![authority.root().clone()]).expect("bundle");
    let chain = vec![leaf.der.clone()];

    let n = k.crypto_ops;
    let verify = time_op(n, || {
        std::hint::black_box(parse_csr(std::hint::black_box(&csr), &td).expect("csr"));
    });
    let sign = time_op(n, || {
        std::hint::black_box(
            authority
                .sign_leaf(&valid.public_key, &params)
                .expect("sign"),
        );
    });
    let both = time_op(n, || {
        let c = parse_csr(std::hint::black_box(&csr), &td).expect("csr");
        std::hint::black_box(authority.sign_leaf(&c.public_key, &params).expect("sign"));
    });
    let chain_verify = time_op(n, || {
        std::hint::black_box(
            verify_svid(
                &chain,
                &bundle,
                unix_time(now),
                webpki::KeyUsage::client_auth(),
                &oid,
            )
            .expect("verifies"),
        );
    });
    let svid = time_op(n, || {
        std::hint::black_box(parse_svid(&leaf.der, &oid).expect("parses"));
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let per_core = 1e6 / both;
    // The issue's target is stated for 2 cores: within 1.25x of this ceiling.
    let two_core = 2.0 * per_core;
    println!("\n== raw crypto, in-process, 1 thread, no I/O ({n} ops each) ==");
    println!("  parse_csr (parse + CSR signature verify) {verify:>8.1} µs/op");
    println!("  Authority::sign_leaf (build + sign + DER) {sign:>7.1} µs/op");
    println!(
        "  parse_csr + sign_leaf (one issuance)      {both:>7.1} µs/op  = {per_core:>7.0}/s per core"
    );
    println!(
        "  implied 2-core ceiling {two_core:.0}/s; target (ceiling / 1.25) {:.0}/s{}",
        two_core / 1.25,
        if cpus == 2.0 {
            String::new()
        } else {
            format!("; this machine has {cpus} cores: {:.0}/s", per_core * cpus)
        }
    );
    println!("  extras per request, outside that ceiling:");
    println!("    verify_svid (client chain, renewal auth) {chain_verify:>6.1} µs/op");
    println!("    parse_svid (read back the issued leaf)   {svid:>6.1} µs/op");
    println!("  (the \"ceiling\" column below is issuances/s over the 2-core ceiling)");
    two_core
}

// ---------------------------------------------------------------------------------------------
// 2. Group commit

async fn audit(k: &Knobs) {
    println!("\n== durable audit appends (AuditLog::record: hash chain + sled commit + flush) ==");
    for writers in [1, k.audit_writers] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = match &k.store {
            None => Arc::new(SledStore::open(dir.path()).expect("store")),
            Some(url) => {
                let prefix = format!("/lanyard-bench/{}/audit-{writers}/", std::process::id());
                Arc::new(
                    EtcdStore::open(EtcdConfig::parse(url, &prefix).expect("url")).expect("etcd"),
                )
            }
        };
        let log = AuditLog::start(store).expect("log");
        let (groups0, events0) = AuditLog::commit_counters();
        let requests0 = EtcdStore::requests_total();
        let deadline = Instant::now() + Duration::from_secs_f64(k.audit_secs);
        let start = Instant::now();
        let (cpu0, _) = cpu_secs();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let e =
                            Event::new(Kind::Renewed, format!("spiffe://example.org/bench/w{w}"))
                                .subject(format!("spiffe://example.org/bench/w{w}"))
                                .serial("01aabbccddeeff00112233445566778899")
                                .roles(vec!["db-read".into()])
                                .not_after(unix_now() + 300)
                                .reason("benchmark");
                        log.record(e, vec![]).await.expect("append");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("writer");
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_secs().0 - cpu0;
        println!(
            "  {writers:>3} writer(s): {:>8.0} appends/s, {:>5.0} µs latency each, {:>5.1} µs CPU per append ({total} appends in {secs:.2}s)",
            total as f64 / secs,
            secs * 1e6 * writers as f64 / total.max(1) as f64,
            cpu * 1e6 / total.max(1) as f64
        );
        let (groups1, events1) = AuditLog::commit_counters();
        println!(
            "       {:.1} events per group commit{}",
            (events1 - events0) as f64 / (groups1 - groups0).max(1) as f64,
            if k.store.is_some() {
                format!(
                    ", {:.3} etcd requests per append",
                    (EtcdStore::requests_total() - requests0) as f64 / total.max(1) as f64
                )
            } else {
                String::new()
            }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3 + 4. End to end over gRPC

struct Client {
    channel: Channel,
    csr: Vec<u8>,
    token: String,
    /// Fresh-token clients: one (CSR, single-use token) per request, taken in order.
    jobs: Vec<(Vec<u8>, String)>,
    next_job: std::sync::atomic::AtomicUsize,
    /// Renewing clients: what reconnecting as an agent does needs.
    agent: Option<AgentCredential>,
}

/// A renewing client's credential, as an agent holds it: it connects anew for each renewal and
/// presents the certificate the previous renewal returned (always for the same key, whose CSR is
/// made once).
struct AgentCredential {
    server: String,
    bundle: Bundle,
    slot: Arc<CertSlot>,
    key: Vec<u8>,
}

fn end_to_end(k: &Knobs, server_rt: &tokio::runtime::Runtime, ceiling: f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("lanyard.toml");
    std::fs::write(&config, POLICY).expect("config");
    let settings = ServeSettings::resolve(
        Some(&config),
        Overrides {
            data_dir: Some(dir.path().join("data")),
            store: k.store.clone(),
            etcd_prefix: k
                .store
                .as_ref()
                .map(|_| format!("/lanyard-bench/{}/serve/", std::process::id())),
            ..Overrides::default()
        },
    )
    .expect("settings");
    let running = server_rt
        .block_on(lanyard::server::start(settings))
        .expect("server starts");
    let server = running.addr.to_string();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(k.client_threads)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
        .expect("client runtime");
    let max_n = k.clients.iter().copied().max().unwrap_or(1);
    let admin_dir = dir.path().join("data/admin");
    println!(
        "\n== end to end: gRPC over TLS 1.3 on loopback, in-process server (sled + durable audit), {} client threads ==",
        k.client_threads
    );
    println!("  setting up {max_n} clients ...");
    let (renewers, tokeners) = client_rt.block_on(setup(k, &server, &admin_dir, max_n));
    if k.renew {
        println!(
            "\n  renewal over mTLS (each client: own credential, one channel, renews in a loop)"
        );
        header();
        for &n in &k.clients {
            let r = client_rt.block_on(run_point(k, &renewers[..n]));
            r.print(n, ceiling);
        }
    }
    if k.agent {
        println!(
            "\n  renewal as the agent does it (a new TLS connection per renewal, presenting the certificate the last one returned)"
        );
        header();
        for &n in &k.clients {
            let r = client_rt.block_on(run_point_with(k, &renewers[..n], true));
            r.print(n, ceiling);
        }
    }
    if k.token {
        let what = if k.fresh_tokens {
            "a fresh single-use token and SPIFFE ID per request"
        } else if k.shared_token {
            "one shared multi-use token"
        } else {
            "one multi-use token per client"
        };
        println!("\n  join-token issuance ({what}, channel without client cert)");
        header();
        for &n in &k.clients {
            let r = client_rt.block_on(run_point(k, &tokeners[..n]));
            r.print(n, ceiling);
        }
    }
    drop(renewers);
    drop(tokeners);
    client_rt.shutdown_timeout(Duration::from_secs(1));
    let _ = running.shutdown.send(true);
    let _ = server_rt.block_on(running.done);
}

async fn setup(
    k: &Knobs,
    server: &str,
    admin_dir: &Path,
    n: usize,
) -> (Vec<Arc<Client>>, Vec<Arc<Client>>) {
    let oid = RolesOid::default();
    let admin = Credential::load(admin_dir, &oid).expect("admin credential");
    let bundle = admin.bundle.clone();
    let admin_ch = connect(
        server,
        ServerTrust::Bundle(bundle.clone()),
        Some(admin.slot().expect("slot")),
        oid.clone(),
    )
    .await
    .expect("admin connect");
    let admin_client = AdminClient::new(admin_ch);
    let token = |spiffe_id: String, uses: u32| {
        let mut c = admin_client.clone();
        async move {
            c.create_join_token(pb::CreateJoinTokenRequest {
                spiffe_id,
                roles: vec!["db-read".into()],
                max_ttl_seconds: 600,
                expires_in_seconds: 3600,
                uses,
            })
            .await
            .expect("token")
            .into_inner()
            .token
        }
    };
    let shared = token("spiffe://example.org/bench/*".into(), u32::MAX).await;
    let mut renewers = Vec::with_capacity(n);
    let mut tokeners = Vec::with_capacity(n);
    for i in 0..n {
        // Enroll a renewing client with a one-use token.
        let id = SpiffeId::parse(&format!("spiffe://example.org/bench/r{i}")).expect("id");
        let enroll = token(id.to_string(), 1).await;
        let key = KeyPair::generate().expect("key");
        let csr = csr_for(&id, &key).expect("csr");
        let anon = connect(
            server,
            ServerTrust::Bundle(bundle.clone()),
            None,
            oid.clone(),
        )
        .await
        .expect("connect");
        let resp = CaClient::new(anon)
            .issue(pb::IssueRequest {
                csr: csr.clone(),
                join_token: enroll,
                jwt: String::new(),
                ttl_seconds: 600,
                roles: vec![],
            })
            .await
            .expect("enrollment")
            .into_inner();
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let slot = CertSlot::new();
        slot.set(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("slot");
        let channel = connect(
            server,
            ServerTrust::Bundle(bundle.clone()),
            Some(slot.clone()),
            oid.clone(),
        )
        .await
        .expect("mTLS connect");
        renewers.push(Arc::new(Client {
            channel,
            csr,
            token: String::new(),
            jobs: Vec::new(),
            next_job: Default::default(),
            agent: Some(AgentCredential {
                server: server.to_string(),
                bundle: bundle.clone(),
                slot,
                key: key.serialize_der(),
            }),
        }));

        // A token client: its own identity under the prefix and its own multi-use token.
        let id = SpiffeId::parse(&format!("spiffe://example.org/bench/t{i}")).expect("id");
        let key = KeyPair::generate().expect("key");
        let csr = csr_for(&id, &key).expect("csr");
        let tok = if k.shared_token {
            shared.clone()
        } else {
            token(id.to_string(), u32::MAX).await
        };
        // The harness's lanyard-token: a new identity and a single-use token for every request.
        let mut jobs = Vec::new();
        if k.fresh_tokens && k.token {
            assert!(
                k.requests > 0,
                "LANYARD_BENCH_FRESH_TOKENS needs LANYARD_BENCH_REQUESTS"
            );
            for j in 0..(k.warmup_requests + k.requests).max(k.fresh_pool) {
                let id =
                    SpiffeId::parse(&format!("spiffe://example.org/bench/f{i}-{j}")).expect("id");
                let key = KeyPair::generate().expect("key");
                jobs.push((
                    csr_for(&id, &key).expect("csr"),
                    token(id.to_string(), 1).await,
                ));
            }
        }
        let channel = connect(
            server,
            ServerTrust::Bundle(bundle.clone()),
            None,
            oid.clone(),
        )
        .await
        .expect("connect");
        tokeners.push(Arc::new(Client {
            channel,
            csr,
            token: tok,
            jobs,
            next_job: Default::default(),
            agent: None,
        }));
    }
    (renewers, tokeners)
}

struct Point {
    /// Process CPU seconds during the measured window: all threads, and the clients' share.
    cpu: f64,
    client_cpu: f64,
    /// Mean events per audit group commit (one fsync each).
    per_group: f64,
    /// etcd requests during the window (0 on sled).
    etcd_requests: u64,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
    lat_us: Vec<u64>,
}

fn header() {
    println!(
        "  {:>4}  {:>12}  {:>8}  {:>8}  {:>8}  {:>11}  {:>11}  {:>9}  {:>6}",
        "N",
        "issuances/s",
        "p50 ms",
        "p99 ms",
        "ceiling",
        "server CPU",
        "client CPU",
        "events",
        "errors"
    );
    println!(
        "  {:>4}  {:>12}  {:>8}  {:>8}  {:>8}  {:>11}  {:>11}  {:>9}",
        "", "", "", "", "", "µs/issuance", "µs/issuance", "per fsync"
    );
}

impl Point {
    fn print(&self, n: usize, ceiling: f64) {
        let pct = |q: f64| -> f64 {
            if self.lat_us.is_empty() {
                return f64::NAN;
            }
            let i =
                ((self.lat_us.len() as f64 * q).ceil() as usize).clamp(1, self.lat_us.len()) - 1;
            self.lat_us[i] as f64 / 1000.0
        };
        let rate = self.ok as f64 / self.secs;
        let per = |cpu: f64| cpu * 1e6 / self.ok.max(1) as f64;
        println!(
            "  {n:>4}  {rate:>12.0}  {:>8.2}  {:>8.2}  {:>7.1}%  {:>11.0}  {:>11.0}  {:>9.1}  {:>6}",
            pct(0.50),
            pct(0.99),
            100.0 * rate / ceiling,
            per(self.cpu - self.client_cpu),
            per(self.client_cpu),
            self.per_group,
            self.errors
        );
        if self.etcd_requests > 0 {
            println!(
                "        etcd: {:.2} requests per issuance",
                self.etcd_requests as f64 / self.ok.max(1) as f64
            );
        }
        if let Some(e) = &self.first_error {
            println!("        first error: {e}");
        }
    }
}

async fn run_point(k: &Knobs, clients: &[Arc<Client>]) -> Point {
    run_point_with(k, clients, false).await
}

/// One renewal as an agent makes it: a new connection with the current certificate; the new
/// certificate replaces it.
async fn agent_renewal(
    a: &AgentCredential,
    req: pb::IssueRequest,
) -> Result<tonic::Response<pb::IssueResponse>, tonic::Status> {
    let channel = connect(
        &a.server,
        ServerTrust::Bundle(a.bundle.clone()),
        Some(a.slot.clone()),
        RolesOid::default(),
    )
    .await
    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let resp = CaClient::new(channel).issue(req).await?;
    let chain: Vec<CertificateDer<'static>> = resp
        .get_ref()
        .cert_chain
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect();
    a.slot
        .set(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(a.key.clone())),
        )
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(resp)
}

/// With `reconnect`, each renewal is an [`agent_renewal`].
async fn run_point_with(k: &Knobs, clients: &[Arc<Client>], reconnect: bool) -> Point {
    if k.requests > 0 {
        return run_counted(k, clients, reconnect).await;
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(k.warmup);
    let until = measure_from + Duration::from_secs_f64(k.secs);
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut ca = CaClient::new(c.channel.clone());
                let mut lat = Vec::new();
                let (mut errors, mut first_error) = (0usize, None);
                loop {
                    let t0 = Instant::now();
                    if t0 >= until {
                        break;
                    }
                    let r = one_request(&c, &mut ca, reconnect).await;
                    if t0 < measure_from {
                        continue;
                    }
                    match r {
                        Ok(_) => lat.push(t0.elapsed().as_micros() as u64),
                        Err(e) => {
                            errors += 1;
                            first_error
                                .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                        }
                    }
                }
                (lat, errors, first_error)
            })
        })
        .collect();
    // CPU time over the measured window only (the warm-up is excluded).
    tokio::time::sleep_until(measure_from.into()).await;
    let (cpu0, client0) = cpu_secs();
    let (groups0, events0) = AuditLog::commit_counters();
    let requests0 = EtcdStore::requests_total();
    tokio::time::sleep_until(until.into()).await;
    let (cpu1, client1) = cpu_secs();
    let (groups1, events1) = AuditLog::commit_counters();
    let etcd_requests = EtcdStore::requests_total() - requests0;
    let mut p = Point {
        cpu: cpu1 - cpu0,
        client_cpu: client1 - client0,
        per_group: (events1 - events0) as f64 / (groups1 - groups0).max(1) as f64,
        etcd_requests,
        ok: 0,
        errors: 0,
        first_error: None,
        secs: k.secs,
        lat_us: Vec::new(),
    };
    for t in tasks {
        let (lat, errors, first) = t.await.expect("client task");
        p.ok += lat.len();
        p.lat_us.extend(lat);
        p.errors += errors;
        if p.first_error.is_none() {
            p.first_error = first;
        }
    }
    p.lat_us.sort_unstable();
    p
}

/// One client request of a point: a renewal on the kept channel, an agent-style renewal, or a
/// token issuance.
async fn one_request(
    c: &Client,
    ca: &mut CaClient<Channel>,
    reconnect: bool,
) -> Result<tonic::Response<pb::IssueResponse>, tonic::Status> {
    let (csr, join_token) = if c.jobs.is_empty() {
        (c.csr.clone(), c.token.clone())
    } else {
        let j = c
            .next_job
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (csr, token) = c.jobs.get(j).expect("a fresh token per request");
        (csr.clone(), token.clone())
    };
    let req = pb::IssueRequest {
        csr,
        join_token,
        jwt: String::new(),
        ttl_seconds: 300,
        roles: vec![],
    };
    match (&c.agent, reconnect) {
        (Some(a), true) => agent_renewal(a, req).await,
        _ => ca.issue(req).await,
    }
}

/// [`run_point_with`] for a fixed number of requests per client (`LANYARD_BENCH_REQUESTS`).
async fn run_counted(k: &Knobs, clients: &[Arc<Client>], reconnect: bool) -> Point {
    let warm = Arc::new(tokio::sync::Barrier::new(clients.len() + 1));
    let go = Arc::new(tokio::sync::Barrier::new(clients.len() + 1));
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            let (c, warm, go) = (c.clone(), warm.clone(), go.clone());
            let (warmup, requests) = (k.warmup_requests, k.requests);
            tokio::spawn(async move {
                let mut ca = CaClient::new(c.channel.clone());
                for _ in 0..warmup {
                    let _ = one_request(&c, &mut ca, reconnect).await;
                }
                warm.wait().await;
                go.wait().await;
                let mut lat = Vec::with_capacity(requests);
                let (mut errors, mut first_error) = (0usize, None);
                for _ in 0..requests {
                    let t0 = Instant::now();
                    match one_request(&c, &mut ca, reconnect).await {
                        Ok(_) => lat.push(t0.elapsed().as_micros() as u64),
                        Err(e) => {
                            errors += 1;
                            first_error
                                .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                        }
                    }
                }
                (lat, errors, first_error)
            })
        })
        .collect();
    warm.wait().await;
    let (cpu0, client0) = cpu_secs();
    let (groups0, events0) = AuditLog::commit_counters();
    let requests0 = EtcdStore::requests_total();
    let start = Instant::now();
    go.wait().await;
    let mut p = Point {
        cpu: 0.0,
        client_cpu: 0.0,
        per_group: 0.0,
        etcd_requests: 0,
        ok: 0,
        errors: 0,
        first_error: None,
        secs: 0.0,
        lat_us: Vec::new(),
    };
    for t in tasks {
        let (lat, errors, first) = t.await.expect("client task");
        p.ok += lat.len();
        p.lat_us.extend(lat);
        p.errors += errors;
        if p.first_error.is_none() {
            p.first_error = first;
        }
    }
    p.secs = start.elapsed().as_secs_f64();
    let (cpu1, client1) = cpu_secs();
    let (groups1, events1) = AuditLog::commit_counters();
    p.cpu = cpu1 - cpu0;
    p.client_cpu = client1 - client0;
    p.per_group = (events1 - events0) as f64 / (groups1 - groups0).max(1) as f64;
    p.etcd_requests = EtcdStore::requests_total() - requests0;
    p.lat_us.sort_unstable();
    p
}
