//! Revocation storage benchmark (issues 4 and 13): what a million live serial revocations cost
//! in sled, and whether the store shrinks back once they expire.
//!
//! Straight against `lanyard::store::SledStore` in a temp dir, no server:
//! 1. **Insert**: N serial revocations (`Write::PutRevocation`, each expiring 20 s from the start)
//!    through `Store::commit` in batches, then one `Store::flush`; time, rate, and sled's
//!    `size_on_disk` next to the bytes the files take, per live revocation; the process RSS.
//! 2. **Index rebuild**: the store closed and opened again, which loads every live revocation
//!    into the in-memory index (what a CA start pays); time and RSS after; then that process's
//!    CRL build, its time and its peak RSS during the build alone (`/proc/self/clear_refs`).
//! 3. **Check latency**: `Store::revoked_serial` (what `Revocation.Check` and every authenticated
//!    call do) for random serials, half of them revoked (hits), half never seen (misses); p50,
//!    p99, p99.9 and max.
//! 4. **Watch{since: 0}**: `Store::revocations_since(0)` turned into wire entries at once (the
//!    full scan), then `Store::revocations_page` a page of 1024 at a time, as a
//!    `Revocation.Watch` from scratch streams it.
//! 5. **CRL**: `Revocations::crl` signed by a fresh CA: the first call builds and signs it, the
//!    second is served from the per-revision cache.
//! 6. **Prune**: `Store::prune` at a time after every entry expired; time, entries pruned, and
//!    the size afterwards: right after the prune, after a flush, and after reopening the store
//!    (which compacts it when its files are mostly free space), next to the empty store.
//! 7. **Second wave**: as many revocations again, then pruned again: whether sled reuses the
//!    space the first wave freed or keeps growing.
//!
//! 8. **Over gRPC** (on unless `LANYARD_BENCH_GRPC=0`): as many revocations committed through
//!    the audit log of a real `lanyard serve` on sled (stopped, filled, started again: the
//!    start is timed), then asked from this process over TLS and tonic as agents ask:
//!    `Watch{since: 0}` until every entry arrived (twice, each on a new connection), the same
//!    and a `GetCrl` through a proxy adding a round trip, `Revocation.Check` one call at a time,
//!    `GetCrl` with tonic's default 4 MiB client limit and with Lanyard's, eight at once and
//!    the CA's peak RSS meanwhile (over its RSS before, in CRLs: the answers share the cached
//!    CRL), eight `Watch{since: 0}` at once and the CA's peak meanwhile, and a real `lanyard
//!    agent` from a join token until it is idle. CPU and RSS of each process from `/proc`.
//! 9. **On etcd** (`LANYARD_BENCH_ETCD=1`): section 8's CA on a one-member etcd
//!    (`/usr/bin/etcd`): its start (the mirror load), etcd's CPU, RSS and data dir.
//!
//! Knobs (environment; `scripts/bench-revocation` documents them too):
//! - `LANYARD_BENCH_REVOCATIONS` live revocations to insert (default 1000000)
//! - `LANYARD_BENCH_LOOKUPS`     `revoked_serial` calls to time (default 100000)
//! - `LANYARD_BENCH_BATCH`       revocations per `Store::commit` (default 1000)
//! - `LANYARD_BENCH_SECOND_WAVE` 0 skips step 7 (default 1)
//! - `LANYARD_BENCH_STORE`       0 skips steps 1-7 (default 1)
//! - `LANYARD_BENCH_GRPC`        0 skips step 8 (default 1)
//! - `LANYARD_BENCH_GRPC_CHECKS` `Revocation.Check` calls over gRPC (default 20000)
//! - `LANYARD_BENCH_RTT_MS`      round trip the proxy adds in step 8, 0: none (default 10)
//! - `LANYARD_BENCH_CRL_FETCHERS` concurrent `GetCrl` calls in step 8 (default 8)
//! - `LANYARD_BENCH_WATCHERS`    concurrent `Watch{since: 0}` in step 8, 0: none (default 8)
//! - `LANYARD_BENCH_SERVE_BIN`   the `lanyard` binary steps 8-9 serve with (default: this
//!   build's), for an A/B of two CA builds with the same clients
//! - `LANYARD_BENCH_START_COMPARE` another build's `lanyard`: before the measured start, steps
//!   8-9 start it and this build in turn over the filled store, `LANYARD_BENCH_START_ROUNDS`
//!   times (default 3), and print each start
//! - `LANYARD_BENCH_AGENT`       0: no `lanyard agent` in step 8 (default 1)
//! - `LANYARD_BENCH_AGENT_COMPARE` another build's `lanyard`, run as the agent in turn with this
//!   build's against the same CA (before/after figures from one fill)
//! - `LANYARD_BENCH_AGENT_ROUNDS` how many agents (or pairs, when comparing) step 8 runs
//!   (default 1)
//! - `LANYARD_BENCH_ETCD`        1 runs step 9 (default 0)
//!
//! It prints figures and asserts nothing.
#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]

mod common;

use std::error::Error;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_secs as cpu, http_get};
use lanyard::api::revocation::to_proto;
use lanyard::audit::AuditLog;
use lanyard::ca::{Authority, RolesOid, Serial};
use lanyard::revocation::Revocations;
use lanyard::spiffe::TrustDomain;
use lanyard::store::{RECORD_VERSION, RevocationRecord, SledStore, Store, StoreStats, Write};
use lanyard::tls::unix_now;
use rand::Rng;

fn main() -> Result<(), Box<dyn Error>> {
    if let Ok(path) = std::env::var("LANYARD_BENCH_OPEN_ONLY") {
        return open_only(Path::new(&path));
    }
    if let Ok(n) = std::env::var("LANYARD_BENCH_COMMITS") {
        return issuance_commits(n.parse()?);
    }
    let n: usize = knob("LANYARD_BENCH_REVOCATIONS", 1_000_000)?;
    let lookups: usize = knob("LANYARD_BENCH_LOOKUPS", 100_000)?;
    let batch: usize = knob("LANYARD_BENCH_BATCH", 1000)?.max(1);
    let second_wave = knob("LANYARD_BENCH_SECOND_WAVE", 1u8)? != 0;
    let grpc = knob("LANYARD_BENCH_GRPC", 1u8)? != 0;
    let grpc_checks: usize = knob("LANYARD_BENCH_GRPC_CHECKS", 20_000)?;
    let etcd = knob("LANYARD_BENCH_ETCD", 0u8)? != 0;
    if knob("LANYARD_BENCH_STORE", 1u8)? == 0 {
        return served(n, grpc_checks, grpc, etcd);
    }
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("store");
    println!(
        "revocation storage benchmark: {n} serial revocations, batches of {batch}, {lookups} lookups"
    );
    println!("store: sled in {}", path.display());

    // Created, flushed and opened again: what an empty store keeps on disk.
    let store = SledStore::open(&path)?;
    store.flush()?;
    drop(store);
    let store = SledStore::open(&path)?;
    let empty = dir_size(&path).0;
    report("empty store", &store.stats()?, &path);

    // 1. Insert.
    let (serials, expires_at, inserted) = insert(&store, n, batch, 0)?;
    let t = Instant::now();
    store.flush()?;
    let flushed = t.elapsed();
    println!(
        "\n1. insert: {n} revocations in {} ({:.0}/s), then flush in {}",
        secs(inserted),
        n as f64 / inserted.as_secs_f64(),
        secs(flushed)
    );
    let full = store.stats()?;
    report("after insert + flush", &full, &path);
    if n > 0 {
        println!(
            "   {:.0} bytes on disk per live revocation (size_on_disk / entries); {:.0} in files",
            full.disk_bytes as f64 / n as f64,
            dir_size(&path).0 as f64 / n as f64
        );
    }
    println!("   {}", rss());

    // 2. Index rebuild: a CA start, in a fresh process (so its RSS is the store's alone).
    drop(store);
    println!("\n2. open in a fresh process (loads the revocation index):");
    let out = std::process::Command::new(std::env::current_exe()?)
        .env("LANYARD_BENCH_OPEN_ONLY", &path)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let store = Arc::new(SledStore::open(&path)?);

    // 2. Check latency.
    let mut rng = rand::rng();
    let queries: Vec<(bool, String)> = (0..lookups)
        .map(|i| {
            if i % 2 == 0 && n > 0 {
                (true, serials[rng.random_range(0..n)].clone())
            } else {
                (false, Serial::random().to_hex())
            }
        })
        .collect();
    let (mut hits, mut misses) = (Vec::new(), Vec::new());
    let mut wrong = 0;
    let t = Instant::now();
    for (revoked, serial) in &queries {
        let q = Instant::now();
        let found = store.revoked_serial(serial)?.is_some();
        let took = q.elapsed();
        if found != *revoked {
            wrong += 1;
        }
        if *revoked {
            hits.push(took)
        } else {
            misses.push(took)
        }
    }
    let total = t.elapsed();
    println!(
        "\n3. Store::revoked_serial: {lookups} lookups in {} ({:.0}/s, one thread){}",
        secs(total),
        lookups as f64 / total.as_secs_f64(),
        if wrong > 0 {
            format!(", {wrong} WRONG ANSWERS")
        } else {
            String::new()
        }
    );
    check_latencies(&mut hits, &mut misses);

    // 4. Watch{since: 0}: the whole store in wire form, first as one snapshot (the full scan),
    // then a page at a time as a `Revocation.Watch` from 0 now streams it (each page sent before
    // the next is read).
    reset_peak_rss();
    let t = Instant::now();
    let entries: Vec<_> = store
        .revocations_since(0)?
        .into_iter()
        .map(to_proto)
        .collect();
    println!(
        "\n4. full scan (revocations_since(0) as wire entries): {} entries in {}; {}",
        entries.len(),
        secs(t.elapsed()),
        rss()
    );
    drop(entries);
    reset_peak_rss();
    let t = Instant::now();
    let (mut sent, mut streamed) = (0, 0usize);
    loop {
        let page = store.revocations_page(sent, 1024)?;
        let Some(last) = page.last() else { break };
        sent = last.rev;
        streamed += page.into_iter().map(to_proto).count();
    }
    println!(
        "   Watch{{since: 0}} a page of 1024 at a time: {streamed} entries in {}; {}",
        secs(t.elapsed()),
        rss()
    );

    // 5. CRL, signed by a fresh CA: built once, then served from the cache.
    {
        let ca_dir = tempfile::tempdir()?;
        let td = TrustDomain::new("example.org")?;
        let authority = Authority::load_or_create(ca_dir.path(), &td, RolesOid::default())?;
        let shared: Arc<dyn Store> = store.clone();
        let revocations = Revocations::new(
            AuditLog::start(shared)?,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        );
        // The peak below is this build's alone: the insert and the Watch snapshot peaked higher.
        reset_peak_rss();
        let t = Instant::now();
        let der = revocations.crl(&authority, Duration::from_secs(3600))?;
        let built = t.elapsed();
        let peak = peak_rss_kib();
        let t = Instant::now();
        let again = revocations.crl(&authority, Duration::from_secs(3600))?;
        let cached = t.elapsed();
        println!(
            "\n5. CRL: {} bytes built and signed in {}; from the cache in {}{}; {}",
            der.len(),
            secs(built),
            us(cached),
            if Arc::ptr_eq(&der, &again) {
                ""
            } else {
                " (NOT THE CACHED ONE)"
            },
            rss()
        );
        println!(
            "   peak RSS of this process while building it (after the steps above): {:.1} MiB",
            peak as f64 / 1024.0
        );
    }

    // 6. Prune, at an instant after every entry expired (no need to wait for the clock).
    let t = Instant::now();
    let pruned = store.prune(expires_at + 1)?;
    let took = t.elapsed();
    println!(
        "\n6. Store::prune: {pruned} entries pruned in {} ({:.0}/s)",
        secs(took),
        pruned as f64 / took.as_secs_f64()
    );
    report("right after prune", &store.stats()?, &path);
    store.flush()?;
    report("after prune + flush", &store.stats()?, &path);
    drop(store);
    let t = Instant::now();
    let store = SledStore::open(&path)?;
    report(
        &format!("after reopening (with compaction) in {}", secs(t.elapsed())),
        &store.stats()?,
        &path,
    );
    let files = dir_size(&path).0;
    println!(
        "   files {files} bytes: {:.2}x the empty store's {empty} bytes",
        files as f64 / empty.max(1) as f64
    );

    // 7. A second wave of as many revocations: does the store grow again, or reuse the space the
    //    first wave freed?
    if second_wave && n > 0 {
        let (_, expires_at, inserted) = insert(&store, n, batch, n as u64)?;
        store.flush()?;
        println!(
            "\n7. second wave: {n} more revocations in {} ({:.0}/s)",
            secs(inserted),
            n as f64 / inserted.as_secs_f64()
        );
        report("after the second wave", &store.stats()?, &path);
        let t = Instant::now();
        let pruned = store.prune(expires_at + 1)?;
        let took = t.elapsed();
        store.flush()?;
        report(
            &format!("after pruning it ({pruned} entries in {})", secs(took)),
            &store.stats()?,
            &path,
        );
    }
    drop(store);
    served(n, grpc_checks, grpc, etcd)
}

/// The store's share of an issuance, for `valgrind --tool=callgrind` (instruction counts do not
/// depend on the machine's load): `n` commits shaped like one renewal's (its audit record and
/// its issued-certificate index entry), each flushed as a lone issuance's group commit is. Run
/// it with two values of `n`: the difference divided by the difference of `n` is the cost of
/// one commit + flush, without the store's opening.
fn issuance_commits(n: u64) -> Result<(), Box<dyn Error>> {
    use lanyard::store::{AuditRecord, IssuedRecord};
    let tmp = tempfile::tempdir()?;
    let store = SledStore::open(&tmp.path().join("store"))?;
    let now = unix_now();
    for seq in 1..=n {
        let serial = Serial::random().to_hex();
        let id = format!("spiffe://example.org/ns/prod/workload-{}", seq % 1000);
        let record = AuditRecord {
            v: RECORD_VERSION,
            seq,
            time_ms: now * 1000 + seq as i64,
            kind: "issued".into(),
            actor: id.clone(),
            subject: id.clone(),
            serial: serial.clone(),
            roles: vec!["web".into()],
            not_after: now + 300,
            reason: "renewal".into(),
            claimed: String::new(),
            prev_hash: [seq as u8; 32],
            hash: [(seq + 1) as u8; 32],
        };
        let issued = IssuedRecord {
            v: RECORD_VERSION,
            spiffe_id: id,
            serial,
            roles: vec!["web".into()],
            not_after: now + 300,
        };
        store.commit(&[record], &[Write::PutIssued(issued, now + 330)])?;
        store.flush()?;
    }
    println!("{n} issuance commits");
    Ok(())
}

/// What a CA start pays, in this (fresh) process: opening the store at `path`, then a CRL.
fn open_only(path: &Path) -> Result<(), Box<dyn Error>> {
    let t = Instant::now();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(path)?);
    println!(
        "   {} entries in {}; {}",
        store.stats()?.revoked_serials,
        secs(t.elapsed()),
        rss()
    );
    let ca_dir = tempfile::tempdir()?;
    let td = TrustDomain::new("example.org")?;
    let authority = Authority::load_or_create(ca_dir.path(), &td, RolesOid::default())?;
    let revocations = Revocations::new(
        AuditLog::start(store)?,
        Duration::from_secs(60),
        Duration::from_secs(3600),
    );
    // The peak of the build alone, over what holding the index costs.
    reset_peak_rss();
    let t = Instant::now();
    let der = revocations.crl(&authority, Duration::from_secs(3600))?;
    println!(
        "   then a CRL ({} bytes) in {}; {}",
        der.len(),
        secs(t.elapsed()),
        rss()
    );
    println!(
        "   CA peak RSS during the CRL build: {:.1} MiB",
        peak_rss_kib() as f64 / 1024.0
    );
    Ok(())
}

/// Inserts `n` live serial revocations expiring in an hour, `batch` per commit, with revs
/// after `first_rev`. Returns their serials, their expiry and the time it took.
fn insert(
    store: &SledStore,
    n: usize,
    batch: usize,
    first_rev: u64,
) -> Result<(Vec<String>, i64, Duration), Box<dyn Error>> {
    let start = unix_now();
    // Far enough ahead that none expires during the run (the CRL cache would rebuild); prune
    // is given a time past it.
    let expires_at = start + 3600;
    let mut serials = Vec::with_capacity(n);
    let mut writes = Vec::with_capacity(batch);
    let t = Instant::now();
    for i in 0..n {
        let serial = Serial::random().to_hex();
        writes.push(Write::PutRevocation(RevocationRecord {
            v: RECORD_VERSION,
            rev: first_rev + i as u64 + 1,
            serial: serial.clone(),
            spiffe_id: format!("spiffe://example.org/ns/prod/workload-{}", i % 10_000),
            identity_rule: false,
            before: 0,
            reason: "benchmark".into(),
            revoked_at: start,
            expires_at,
            blocked: false,
            renewable: false,
            origin: String::new(),
        }));
        serials.push(serial);
        if writes.len() == batch {
            store.commit(&[], &writes)?;
            writes.clear();
        }
    }
    if !writes.is_empty() {
        store.commit(&[], &writes)?;
    }
    Ok((serials, expires_at, t.elapsed()))
}

/// The process's resident set now and at its peak.
fn rss() -> String {
    rss_of("/proc/self/status")
}

/// The resident set now and at its peak of the process whose status file is `status`, and
/// what of it is the process's own (anonymous) and what is mapped files (its code, shared).
fn rss_of(status: &str) -> String {
    let status = std::fs::read_to_string(status).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    format!(
        "RSS {} (peak {}; anonymous {}, file-backed {})",
        field("VmRSS:"),
        field("VmHWM:"),
        field("RssAnon:"),
        field("RssFile:")
    )
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (Linux `clear_refs` value 5), so
/// the next `peak_rss_kib` is one step's own peak.
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        println!("   (cannot reset the peak RSS: {e}; the peaks below include earlier steps)");
    }
}

/// The process's peak RSS (VmHWM) in KiB; 0 when unknown.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn knob<T: FromStr>(name: &str, default: T) -> Result<T, Box<dyn Error>>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .map_err(|e| format!("{name}={v}: {e}").into()),
        Err(_) => Ok(default),
    }
}

fn report(when: &str, s: &StoreStats, path: &Path) {
    let (apparent, allocated) = dir_size(path);
    println!(
        "   {when}: {} revoked serials, sled size_on_disk {}, files {} ({} allocated)",
        s.revoked_serials,
        mib(s.disk_bytes),
        mib(apparent),
        mib(allocated)
    );
}

/// Apparent and allocated bytes of every file under `path`.
fn dir_size(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(path) else {
        return total;
    };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            let (a, b) = dir_size(&e.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + m.len(), total.1 + m.blocks() * 512);
        }
    }
    total
}

/// The latency lines of a lookup run: all lookups, then the hits and the misses apart.
fn check_latencies(hits: &mut [Duration], misses: &mut [Duration]) {
    let mut all: Vec<Duration> = hits.iter().chain(misses.iter()).copied().collect();
    latency("all", &mut all);
    latency("hits (revoked)", hits);
    latency("misses (not revoked)", misses);
}

fn latency(label: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        return;
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "   {label:<22} n={:<7} mean {}  p50 {}  p99 {}  p99.9 {}  max {}",
        samples.len(),
        us(mean),
        us(at(0.50)),
        us(at(0.99)),
        us(at(0.999)),
        us(samples[samples.len() - 1])
    );
}

fn us(d: Duration) -> String {
    format!("{:.1}µs", d.as_secs_f64() * 1e6)
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

// === 8 and 9: the same scale behind a real `lanyard serve`, over gRPC, on sled and on etcd ===

/// Where Debian's `etcd-server` puts etcd.
const ETCD: &str = "/usr/bin/etcd";

/// The agent's policy in the served CA (section 8's `lanyard agent`).
const POLICY: &str = r#"
[[policy]]
spiffe_id = "spiffe://example.org/bench/*"
roles = []
max_ttl = "10m"
"#;

/// Sections 8 (sled, on unless `LANYARD_BENCH_GRPC=0`) and 9 (etcd, with `LANYARD_BENCH_ETCD=1`):
/// `n` live revocations in a real `lanyard serve` process, asked over TLS and gRPC as agents and
/// operators ask.
fn served(n: usize, checks: usize, grpc: bool, etcd: bool) -> Result<(), Box<dyn Error>> {
    if !grpc && !etcd {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if grpc {
        println!(
            "\n8. over gRPC: {n} live revocations in a real `lanyard serve` on sled (TLS, tonic, loopback)"
        );
        rt.block_on(served_run(n, checks, None))?;
    }
    if etcd {
        if !Path::new(ETCD).exists() {
            println!("\n9. on etcd: {ETCD} is missing (apt-get install etcd-server): skipped");
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let etcd = Etcd::start(dir.path())?;
        println!(
            "\n9. on etcd: {n} live revocations in a real `lanyard serve` on a one-member etcd ({ETCD}, data in {})",
            dir.path().display()
        );
        println!("   etcd empty: {}", etcd.footprint());
        rt.block_on(served_run(n, checks, Some(&etcd)))?;
        println!("   etcd at the end: {}", etcd.footprint());
    }
    Ok(())
}

/// One served run: a CA started once (it creates its keys and admin credential) and stopped,
/// `n` revocations committed to its store through the audit log (as `Revoke` commits them, a
/// batch per event), then the CA started again (the measured start: store opened, revocation
/// index loaded) and asked.
async fn served_run(n: usize, checks: usize, etcd: Option<&Etcd>) -> Result<(), Box<dyn Error>> {
    use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient};
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let config = tmp.path().join("lanyard.toml");
    let mut toml = "trust_domain = \"example.org\"\nlisten = \"127.0.0.1:0\"\n".to_string();
    if let Some(e) = etcd {
        let kek = tmp.path().join("kek");
        lanyard::ca::Kek::generate(&kek)?;
        toml += &format!(
            "store = \"{}\"\netcd_prefix = \"/bench/\"\nkek_file = \"{}\"\n",
            e.url(),
            kek.display()
        );
    }
    toml += POLICY;
    std::fs::write(&config, toml)?;
    Serve::start(&config, &data, tmp.path()).await?.0.stop()?;

    // etcd takes at most 128 operations per transaction (a commit of the audit record, its head
    // and the entries): 100 revocations per event there.
    let per_event = if etcd.is_some() { 100 } else { 1000 };
    let store: Arc<dyn Store> = match etcd {
        None => Arc::new(SledStore::open(&data.join("store"))?),
        Some(e) => Arc::new(lanyard::store::EtcdStore::open(
            lanyard::store::EtcdConfig::parse(&e.url(), "/bench/")?,
        )?),
    };
    let t = Instant::now();
    let serials = fill(store.clone(), n, per_event).await?;
    println!(
        "   filled through the audit log: {n} revocations in {} events of {per_event} in {} ({:.0}/s)",
        n.div_ceil(per_event),
        secs(t.elapsed()),
        n as f64 / t.elapsed().as_secs_f64()
    );
    if let Some(e) = etcd {
        println!(
            "   etcd after the fill: db_size {} ({:.0} bytes per revocation); {}",
            mib(store.stats()?.disk_bytes),
            store.stats()?.disk_bytes as f64 / n.max(1) as f64,
            e.footprint()
        );
    }
    // The audit writer's thread lets go of the store a moment after the log's last handle.
    let t = Instant::now();
    while Arc::strong_count(&store) > 1 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(store);

    // etcd's CPU since `c0` (taken before a start), as the start lines print it.
    let etcd_cpu_since = |c0: Option<f64>| {
        c0.map_or(String::new(), |c0| {
            format!(
                ", etcd CPU {:.2}s",
                etcd.map_or(0.0, |e| cpu(e.child.id())) - c0
            )
        })
    };
    // Starts of another build and this one in turn, over the same store (an A/B of the load).
    if let Some(other) = std::env::var_os("LANYARD_BENCH_START_COMPARE") {
        let this = serve_bin();
        for round in 1..=knob("LANYARD_BENCH_START_ROUNDS", 3usize)? {
            for (name, bin) in [("compared", &other), ("this", &this)] {
                let etcd_cpu = etcd.map(|e| cpu(e.child.id()));
                let (serve, took) = Serve::start_bin(bin, &config, &data, tmp.path()).await?;
                println!(
                    "   start #{round}, {name} build: {}; CA CPU {:.2}s{}",
                    secs(took),
                    cpu(serve.pid()),
                    etcd_cpu_since(etcd_cpu),
                );
                serve.stop()?;
            }
        }
    }

    // The measured start.
    let etcd_cpu = etcd.map(|e| cpu(e.child.id()));
    let (serve, took) = Serve::start(&config, &data, tmp.path()).await?;
    println!(
        "   CA start (process spawned until it listens: store opened, index loaded) {}; CA CPU {:.2}s{}; CA {}",
        secs(took),
        cpu(serve.pid()),
        etcd_cpu_since(etcd_cpu),
        serve.rss()
    );
    let oid = RolesOid::default();
    let admin = lanyard::client::Credential::load(&data.join("admin"), &oid)?;
    let connect = |identity: bool| {
        lanyard::client::connect(
            &serve.addr,
            lanyard::tls::ServerTrust::Bundle(admin.bundle.clone()),
            if identity { admin.slot().ok() } else { None },
            oid.clone(),
        )
    };

    // Watch{since: 0}, on a new connection each time (an agent that starts from nothing).
    for round in 1..=2 {
        let channel = connect(true).await?;
        let (cpu0, me0) = (cpu(serve.pid()), cpu(std::process::id()));
        let t = Instant::now();
        let mut stream = RevocationClient::new(channel)
            .watch(pb::WatchRequest { since: 0 })
            .await?
            .into_inner();
        let (mut got, mut bytes, mut first) = (0usize, 0usize, None);
        while got < n {
            let e = match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                Ok(Ok(Some(e))) => e,
                Ok(Ok(None)) => return Err(format!("the watch ended after {got} entries").into()),
                Ok(Err(s)) => return Err(format!("the watch failed after {got}: {s}").into()),
                Err(_) => return Err(format!("the watch stalled after {got} entries").into()),
            };
            first.get_or_insert_with(|| t.elapsed());
            if e.reason == "benchmark" {
                got += 1;
            }
            bytes += prost::Message::encoded_len(&e);
        }
        let took = t.elapsed();
        println!(
            "   Watch{{since: 0}} #{round}: {got} entries ({} of messages) in {} (first after {}); CA CPU {:.2}s, client CPU {:.2}s",
            mib(bytes as u64),
            secs(took),
            us(first.unwrap_or_default()),
            cpu(serve.pid()) - cpu0,
            cpu(std::process::id()) - me0
        );
    }
    println!("   CA after the watches: {}", serve.rss());

    // The same through a proxy that adds a round trip (no bandwidth limit): what HTTP/2 flow
    // control lets through when the client's window, not the CA or the link, is the limit.
    let rtt = Duration::from_millis(knob("LANYARD_BENCH_RTT_MS", 10u64)?);
    if !rtt.is_zero() {
        let far = delay_proxy(serve.addr.clone(), rtt / 2).await?;
        let far_channel = |identity: bool| {
            lanyard::client::connect(
                &far,
                lanyard::tls::ServerTrust::Bundle(admin.bundle.clone()),
                if identity { admin.slot().ok() } else { None },
                oid.clone(),
            )
        };
        let t = Instant::now();
        let mut stream = RevocationClient::new(far_channel(true).await?)
            .watch(pb::WatchRequest { since: 0 })
            .await?
            .into_inner();
        let (mut got, mut bytes) = (0usize, 0usize);
        let limit = Duration::from_secs(60);
        while got < n && t.elapsed() < limit {
            match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                Ok(Ok(Some(e))) => {
                    got += 1;
                    bytes += prost::Message::encoded_len(&e);
                }
                _ => break,
            }
        }
        let took = t.elapsed();
        println!(
            "   Watch{{since: 0}} over a {} ms round trip: {got} of {n} entries in {} ({:.1} MiB/s of messages)",
            rtt.as_millis(),
            secs(took),
            bytes as f64 / took.as_secs_f64() / (1024.0 * 1024.0)
        );
        drop(stream);
        let t = Instant::now();
        let answer = tokio::time::timeout(
            limit,
            RevocationClient::new(far_channel(false).await?)
                .max_decoding_message_size(lanyard::codec::MAX_CRL_RESPONSE)
                .get_crl(pb::GetCrlRequest {}),
        )
        .await;
        println!(
            "   GetCrl over a {} ms round trip: {} in {}",
            rtt.as_millis(),
            match answer {
                Ok(Ok(r)) => format!("{} bytes", r.into_inner().der.len()),
                Ok(Err(s)) => format!("failed ({:?})", s.code()),
                Err(_) => "not done".into(),
            },
            secs(t.elapsed())
        );
    }

    // Check, one call at a time on a kept connection: half revoked serials, half never seen.
    let channel = connect(true).await?;
    let mut client = RevocationClient::new(channel);
    let mut rng = rand::rng();
    let (mut hits, mut misses, mut wrong) = (Vec::new(), Vec::new(), 0);
    let cpu0 = cpu(serve.pid());
    let t = Instant::now();
    for i in 0..checks {
        let revoked = i % 2 == 0 && n > 0;
        let serial = if revoked {
            serials[rng.random_range(0..n)].clone()
        } else {
            Serial::random().to_hex()
        };
        let q = Instant::now();
        let answer = client
            .check(pb::CheckRequest { serial })
            .await?
            .into_inner();
        let took = q.elapsed();
        if answer.revoked != revoked {
            wrong += 1;
        }
        if revoked { &mut hits } else { &mut misses }.push(took);
    }
    let total = t.elapsed();
    println!(
        "   Revocation.Check over gRPC: {checks} calls, one at a time on one connection, in {} ({:.0}/s); CA CPU {:.0} µs per call{}",
        secs(total),
        checks as f64 / total.as_secs_f64(),
        (cpu(serve.pid()) - cpu0) * 1e6 / checks.max(1) as f64,
        if wrong > 0 {
            format!(", {wrong} WRONG ANSWERS")
        } else {
            String::new()
        }
    );
    check_latencies(&mut hits, &mut misses);

    // GetCrl: as a client with tonic's default decode limit, then with Lanyard's.
    let anon = connect(false).await?;
    let t = Instant::now();
    match RevocationClient::new(anon.clone())
        .get_crl(pb::GetCrlRequest {})
        .await
    {
        Ok(r) => println!(
            "   GetCrl, client with tonic's default 4 MiB decode limit: {} bytes in {}",
            r.into_inner().der.len(),
            secs(t.elapsed())
        ),
        Err(s) => println!(
            "   GetCrl, client with tonic's default 4 MiB decode limit: refused by the client after {}: {:?} {}",
            secs(t.elapsed()),
            s.code(),
            s.message()
        ),
    }
    for round in ["first", "again"] {
        let cpu0 = cpu(serve.pid());
        let t = Instant::now();
        let crl = RevocationClient::new(anon.clone())
            .max_decoding_message_size(lanyard::codec::MAX_CRL_RESPONSE)
            .get_crl(pb::GetCrlRequest {})
            .await?
            .into_inner();
        println!(
            "   GetCrl ({round}), limit {}: {} bytes in {}; CA CPU {:.3}s",
            mib(lanyard::codec::MAX_CRL_RESPONSE as u64),
            crl.der.len(),
            secs(t.elapsed()),
            cpu(serve.pid()) - cpu0
        );
    }
    // Several at once, each on its own connection (agents fetching after a revocation): the CA's
    // memory while they are in flight. Each answer shares the cached CRL (decision 116): the
    // peak over the CA's resident set before is what N callers at once cost.
    let fetchers: usize = knob("LANYARD_BENCH_CRL_FETCHERS", 8)?;
    reset_peak_rss_of(serve.pid());
    let before = serve.rss();
    let before_kib = status_kib(serve.pid(), "VmRSS:");
    let cpu0 = cpu(serve.pid());
    let t = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..fetchers {
        let channel = connect(false).await?;
        calls.spawn(async move {
            RevocationClient::new(channel)
                .max_decoding_message_size(lanyard::codec::MAX_CRL_RESPONSE)
                .get_crl(pb::GetCrlRequest {})
                .await
                .map(|r| r.into_inner().der.len())
        });
    }
    let mut sizes = Vec::new();
    while let Some(r) = calls.join_next().await {
        sizes.push(r??);
    }
    let size = sizes.first().copied().unwrap_or(0);
    let peak = status_kib(serve.pid(), "VmHWM:");
    println!(
        "   {fetchers} GetCrl at once: {size} bytes each, all in {}; CA CPU {:.3}s; CA before {before}, after {}",
        secs(t.elapsed()),
        cpu(serve.pid()) - cpu0,
        serve.rss()
    );
    println!(
        "   {fetchers} GetCrl at once: CA peak {} MiB, {} MiB over its RSS before = {:.2} CRLs ({} bytes each)",
        peak / 1024,
        peak.saturating_sub(before_kib) / 1024,
        peak.saturating_sub(before_kib) as f64 * 1024.0 / size.max(1) as f64,
        size
    );
    // Watch{since: 0} from several new agents at once: what each stream in flight holds in the
    // CA (a page of entries and the encoded messages HTTP/2 has not sent yet), not the store.
    let watchers: usize = knob("LANYARD_BENCH_WATCHERS", 8)?;
    if watchers > 0 {
        reset_peak_rss_of(serve.pid());
        let before = serve.rss();
        let before_kib = status_kib(serve.pid(), "VmRSS:");
        let cpu0 = cpu(serve.pid());
        let t = Instant::now();
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..watchers {
            let mut client = RevocationClient::new(connect(true).await?);
            streams.spawn(async move {
                let mut stream = client
                    .watch(pb::WatchRequest { since: 0 })
                    .await?
                    .into_inner();
                let mut got = 0usize;
                while got < n {
                    match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                        Ok(Ok(Some(e))) if e.reason == "benchmark" => got += 1,
                        Ok(Ok(Some(_))) => {}
                        Ok(Ok(None)) | Err(_) => break,
                        Ok(Err(s)) => return Err(s),
                    }
                }
                Ok::<_, tonic::Status>(got)
            });
        }
        let mut got = Vec::new();
        while let Some(r) = streams.join_next().await {
            got.push(r??);
        }
        let peak = status_kib(serve.pid(), "VmHWM:");
        println!(
            "   {watchers} Watch{{since: 0}} at once: {} of {n} entries each, all in {}; CA CPU {:.2}s; CA before {before}, after {}; peak {} MiB over before ({:.1} MiB per stream)",
            got.iter().min().copied().unwrap_or(0),
            secs(t.elapsed()),
            cpu(serve.pid()) - cpu0,
            serve.rss(),
            peak.saturating_sub(before_kib) / 1024,
            peak.saturating_sub(before_kib) as f64 / 1024.0 / watchers as f64
        );
    }
    if etcd.is_none() && knob("LANYARD_BENCH_AGENT", 1u8)? != 0 {
        // With another build to compare, the two agents run in turn against this one CA.
        let other = std::env::var_os("LANYARD_BENCH_AGENT_COMPARE").map(std::path::PathBuf::from);
        let mut bins = Vec::new();
        for _ in 0..knob("LANYARD_BENCH_AGENT_ROUNDS", 1u32)? {
            bins.extend(other.clone().map(|o| (o, "the other build")));
            bins.push((agent_bin(), "this build"));
        }
        for (i, (bin, which)) in bins.iter().enumerate() {
            if other.is_some() {
                println!("   agent #{}, {which} ({}):", i + 1, bin.display());
            }
            let dir = tmp.path().join(format!("agent{i}"));
            std::fs::create_dir_all(&dir)?;
            agent_run(&serve, connect(true).await?, &dir, n, bin).await?;
        }
    }
    serve.stop()?;
    Ok(())
}

/// A real `lanyard agent` against the CA holding `n` revocations: how long until it holds a
/// certificate and has written the whole CRL to `crl.pem`, and what it costs (its revocation
/// watch from 0 and its CRL follower both run at start).
async fn agent_run(
    serve: &Serve,
    admin: tonic::transport::Channel,
    dir: &Path,
    n: usize,
    bin: &Path,
) -> Result<(), Box<dyn Error>> {
    use lanyard::pb::v1::{self as pb, admin_client::AdminClient};
    let token = AdminClient::new(admin)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: "spiffe://example.org/bench/agent".into(),
            roles: vec![],
            max_ttl_seconds: 600,
            expires_in_seconds: 3600,
            uses: 1,
        })
        .await?
        .into_inner()
        .token;
    let out = dir.join("agent");
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let t = Instant::now();
    let mut agent = Serve {
        child: Some(
            std::process::Command::new(bin)
                .args(["agent", "--server", &serve.addr, "--token", &token, "--out"])
                .arg(&out)
                .env("LANYARD_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()?,
        ),
        addr: String::new(),
    };
    // The PEM of a CRL listing all `n` entries is over 36 bytes each.
    let (mut cert_at, mut crl_at) = (None, None);
    while crl_at.is_none() && t.elapsed() < Duration::from_secs(180) {
        if cert_at.is_none() && out.join("cert.pem").exists() {
            cert_at = Some(t.elapsed());
        }
        if std::fs::metadata(out.join("crl.pem")).is_ok_and(|m| m.len() > 36 * n as u64) {
            crl_at = Some(t.elapsed());
        }
        if agent
            .child
            .as_mut()
            .map(|c| c.try_wait())
            .transpose()?
            .flatten()
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let when = |d: Option<Duration>| d.map_or("not within 180 s".to_string(), secs);
    println!(
        "   lanyard agent from a join token: certificate after {}, the whole CRL in crl.pem ({}) after {}; agent CPU {:.2}s, {}",
        when(cert_at),
        mib(std::fs::metadata(out.join("crl.pem")).map_or(0, |m| m.len())),
        when(crl_at),
        cpu(agent.pid()),
        agent.rss()
    );
    // Then until it is idle (its revocation watch caught up, its CRL follower settled): CPU and
    // memory every 5 s, for at most a minute.
    let mut last = cpu(agent.pid());
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = cpu(agent.pid());
        println!(
            "   ... after {}: agent CPU {now:.2}s, {}",
            secs(t.elapsed()),
            agent.rss()
        );
        if now - last < 0.05 {
            break;
        }
        last = now;
    }
    if crl_at.is_none() {
        println!(
            "   agent log: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
    }
    Ok(())
}

/// The `lanyard` binary section 8 runs as the agent: this build's.
fn agent_bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_lanyard").into()
}

/// A TCP proxy on loopback to `target` that holds every chunk `delay` in each direction: a
/// round trip of twice that, with no bandwidth limit. Returns its address.
async fn delay_proxy(target: String, delay: Duration) -> Result<String, Box<dyn Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delayed_pipe(cr, sw, delay));
            tokio::spawn(delayed_pipe(sr, cw, delay));
        }
    });
    Ok(addr)
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
}

/// Commits `n` serial revocations through an audit log over `store`, `per_event` per event,
/// eight events in flight (the writer groups them); returns their serials.
async fn fill(
    store: Arc<dyn Store>,
    n: usize,
    per_event: usize,
) -> Result<Vec<String>, Box<dyn Error>> {
    use lanyard::audit::{Event, Kind};
    let log = AuditLog::start(store)?;
    let now = unix_now();
    let mut serials = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    for start in (0..n).step_by(per_event.max(1)) {
        let writes: Vec<Write> = (start..(start + per_event).min(n))
            .map(|i| {
                let serial = Serial::random().to_hex();
                serials.push(serial.clone());
                Write::PutRevocation(RevocationRecord {
                    v: RECORD_VERSION,
                    rev: 0,
                    serial,
                    spiffe_id: format!("spiffe://example.org/ns/prod/workload-{}", i % 10_000),
                    identity_rule: false,
                    before: 0,
                    reason: "benchmark".into(),
                    revoked_at: now,
                    expires_at: now + 3600,
                    blocked: false,
                    renewable: false,
                    origin: String::new(),
                })
            })
            .collect();
        let log = log.clone();
        pending.spawn(async move {
            log.record(
                Event::new(Kind::Revoked, "spiffe://example.org/lanyard/admin").reason("benchmark"),
                writes,
            )
            .await
            .map(drop)
        });
        while pending.len() >= 8 {
            if let Some(r) = pending.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        r??;
    }
    Ok(serials)
}

/// The `lanyard` binary steps 8-9 serve with: `LANYARD_BENCH_SERVE_BIN` (another build of the
/// CA for an A/B run: the same bench binary, so the same clients), else this build's.
fn serve_bin() -> std::ffi::OsString {
    std::env::var_os("LANYARD_BENCH_SERVE_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_lanyard").into())
}

/// A `lanyard serve` process (the binary this bench is built with, or
/// `LANYARD_BENCH_SERVE_BIN`); killed on drop.
struct Serve {
    child: Option<std::process::Child>,
    addr: String,
}

impl Serve {
    /// Starts it over `data` and waits until it listens; returns it and how long that took.
    async fn start(
        config: &Path,
        data: &Path,
        logs: &Path,
    ) -> Result<(Self, Duration), Box<dyn Error>> {
        Self::start_bin(&serve_bin(), config, data, logs).await
    }

    /// [`Serve::start`] with the `lanyard` binary at `bin`.
    async fn start_bin(
        bin: &std::ffi::OsStr,
        config: &Path,
        data: &Path,
        logs: &Path,
    ) -> Result<(Self, Duration), Box<dyn Error>> {
        let _ = std::fs::remove_file(data.join("serve.addr"));
        let log_path = logs.join("serve.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let t = Instant::now();
        let child = std::process::Command::new(bin)
            .args(["serve", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env("LANYARD_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut serve = Self {
            child: Some(child),
            addr: String::new(),
        };
        loop {
            if let Ok(a) = std::fs::read_to_string(data.join("serve.addr"))
                && !a.trim().is_empty()
            {
                serve.addr = a.trim().to_string();
                return Ok((serve, t.elapsed()));
            }
            let exited = match serve.child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if exited.is_some() || t.elapsed() > Duration::from_secs(600) {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("lanyard serve did not start ({exited:?}): {log}").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    fn rss(&self) -> String {
        rss_of(&format!("/proc/{}/status", self.pid()))
    }

    /// Stops it with SIGTERM (a graceful shutdown) and waits.
    fn stop(mut self) -> Result<(), Box<dyn Error>> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let t = Instant::now();
        while child.try_wait()?.is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("lanyard serve did not stop within 30 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A one-member etcd on loopback; killed on drop.
struct Etcd {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Self, Box<dyn Error>> {
        let free = || -> Result<u16, Box<dyn Error>> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (port, peer) = (free()?, free()?);
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = std::process::Command::new(ETCD)
            .args(["--name", "m0", "--data-dir"])
            .arg(dir.join("m0.etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("m0=http://127.0.0.1:{peer}"),
                // A million revocations and their history take more than the 2 GiB default.
                "--quota-backend-bytes",
                "8589934592",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        let etcd = Self {
            child,
            port,
            dir: dir.join("m0.etcd"),
        };
        let t = Instant::now();
        while !http_get(port, "/health").is_some_and(|h| h.contains("\"health\":\"true\"")) {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "etcd did not start: {}",
                    std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(etcd)
    }

    fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    /// etcd's RSS and its data dir on disk.
    fn footprint(&self) -> String {
        format!(
            "etcd {}, data dir {}",
            rss_of(&format!("/proc/{}/status", self.child.id())),
            mib(dir_size(&self.dir).0)
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` field (`VmRSS:`, `VmHWM:`) of process `pid`'s status file, in KiB; 0 when unknown.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets process `pid`'s peak RSS (see [`reset_peak_rss`]).
fn reset_peak_rss_of(pid: u32) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        println!("   (cannot reset the CA's peak RSS: {e}; its peak includes earlier steps)");
    }
}
