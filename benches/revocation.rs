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
//! Knobs (environment; `scripts/bench-revocation` documents them too):
//! - `LANYARD_BENCH_REVOCATIONS` live revocations to insert (default 1000000)
//! - `LANYARD_BENCH_LOOKUPS`     `revoked_serial` calls to time (default 100000)
//! - `LANYARD_BENCH_BATCH`       revocations per `Store::commit` (default 1000)
//! - `LANYARD_BENCH_SECOND_WAVE` 0 skips step 5 (default 1)
//!
//! It prints figures and asserts nothing.
#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::error::Error;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let mut all: Vec<Duration> = hits.iter().chain(&misses).copied().collect();
    latency("all", &mut all);
    latency("hits (revoked)", &mut hits);
    latency("misses (not revoked)", &mut misses);

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
    Ok(())
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
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    format!("RSS {} (peak {})", field("VmRSS:"), field("VmHWM:"))
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
