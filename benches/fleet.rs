//! Fleet benchmark: what each connected agent costs one CA.
//!
//! For each N, a real `lanyard serve` runs as its own process (so its CPU, RSS and file
//! descriptors are its own, read from `/proc`), and N agents connect to it:
//! - **in-process** (default): N instances of the library's [`lanyard::agent::Agent`] in this
//!   process, each with its own key, certificate, connection and streams — the real agent code,
//!   10,000 of which fit on a small machine;
//! - **processes** (`LANYARD_FLEET_PROCS=1`): N real `lanyard agent` processes, to cross-check
//!   the in-process figures (a few hundred fit).
//!
//! Reported: CA CPU per rotation (all CA CPU over a steady-state window divided by the renewals
//! the CA counted, so idle streams and keepalives are included), CA CPU as a share of one core,
//! CA RSS and file descriptors per connected agent (above the CA's own before any agent came),
//! TCP connections per agent, revocation and bundle fan-out latency p50/p99 (in-process only: the
//! time from the admin call to each agent's revocation set or trust bundle having the change),
//! and agent memory (per in-process agent, or the RSS of each agent process). After the summary
//! table, the CA's CPU and wake-ups per rotation by thread (tokio workers, the audit writer,
//! sled's IO pool and flusher), and the audit group commits per rotation: where a rotation's
//! CPU goes, without a profiler.
//!
//! Knobs (environment; `scripts/bench-fleet` sets them from flags):
//! - `LANYARD_FLEET_AGENTS`  comma list of N (default `100,1000`)
//! - `LANYARD_FLEET_TTL`     certificate lifetime, seconds (default 30; the CA's floor)
//! - `LANYARD_FLEET_SECS`    steady-state window, seconds (default 60)
//! - `LANYARD_FLEET_PROCS=1` run `lanyard agent` processes instead of in-process agents
//! - `LANYARD_FLEET_FANOUT`  revocations sent for the fan-out measurement (default 5)
//! - `LANYARD_FLEET_BIN`     another `lanyard` binary for the CA and agent processes (a
//!   before/after comparison against an older build)
#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cpu_secs;
use lanyard::agent::{Agent, AgentConfig};
use lanyard::ca::RolesOid;
use lanyard::client::{Credential, connect};
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, revocation_client::RevocationClient};
use lanyard::tls::ServerTrust;
use tonic::transport::Channel;

fn env<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        _ => default,
    }
}

/// Resident set size of `pid`, bytes.
fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// A size line of `/proc/<pid>/status` (`VmRSS:`, `RssAnon:`, `RssFile:`), bytes.
fn status_bytes(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Open file descriptors of `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One thread of a process: its name (`comm`), nanoseconds on a CPU (`schedstat`) and voluntary
/// context switches (each one a sleep, so the next run on a CPU is a wake-up).
struct ThreadStat {
    name: String,
    cpu_ns: u64,
    wakes: u64,
}

/// Every thread of `pid`, by thread id.
fn threads(pid: u32) -> std::collections::BTreeMap<u32, ThreadStat> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let cpu_ns = read("schedstat")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let wakes = read("status")
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.insert(
            tid,
            ThreadStat {
                name: read("comm").trim().to_string(),
                cpu_ns,
                wakes,
            },
        );
    }
    out
}

/// A thread's group: its name without a trailing number (`sled-io-3` → `sled-io`), so a pool
/// of threads is one line.
fn thread_group(name: &str) -> String {
    name.trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches(['-', '_', ' '])
        .to_string()
}

/// CA CPU (µs) and voluntary context switches per rotation by thread group between two
/// [`threads`] snapshots, largest first; a thread that started in between counts from zero.
fn per_thread(
    before: &std::collections::BTreeMap<u32, ThreadStat>,
    after: &std::collections::BTreeMap<u32, ThreadStat>,
    rotations: f64,
) -> Vec<ThreadShare> {
    let mut groups: std::collections::BTreeMap<String, ThreadShare> = Default::default();
    for (tid, a) in after {
        let (cpu0, wakes0) = before.get(tid).map_or((0, 0), |b| (b.cpu_ns, b.wakes));
        let g = groups
            .entry(thread_group(&a.name))
            .or_insert_with(|| ThreadShare {
                group: thread_group(&a.name),
                threads: 0,
                us_per_rotation: 0.0,
                wakes_per_rotation: 0.0,
            });
        g.threads += 1;
        g.us_per_rotation += a.cpu_ns.saturating_sub(cpu0) as f64 / 1e3 / rotations;
        g.wakes_per_rotation += a.wakes.saturating_sub(wakes0) as f64 / rotations;
    }
    let mut v: Vec<ThreadShare> = groups
        .into_values()
        .filter(|g| g.us_per_rotation >= 0.05 || g.wakes_per_rotation >= 0.005)
        .collect();
    v.sort_by(|a, b| b.us_per_rotation.total_cmp(&a.us_per_rotation));
    v
}

/// One thread group's share of the CA's CPU per rotation.
struct ThreadShare {
    group: String,
    threads: usize,
    us_per_rotation: f64,
    wakes_per_rotation: f64,
}

/// Established TCP connections to local port `port` (the CA's side of each connection).
fn connections_to(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
                continue;
            };
            let lport = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if lport == Some(port) && *state == "01" {
                n += 1;
            }
        }
    }
    n
}

fn raise_nofile() {
    let _ = lanyard::net::raise_nofile_limit();
}

/// The `lanyard` binary for the CA and agent processes.
fn lanyard_bin() -> PathBuf {
    std::env::var_os("LANYARD_FLEET_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_lanyard")),
        PathBuf::from,
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Issuances the CA counted (`lanyard_issuances_total`, all labels).
async fn issuances(metrics: u16) -> f64 {
    metric_sum(metrics, "lanyard_issuances_total").await
}

/// The sum of every sample of the CA's metric `name` (all labels); NaN if unreadable.
async fn metric_sum(metrics: u16, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", metrics)).await else {
        return f64::NAN;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Ca {
    child: Child,
    port: u16,
    metrics: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ca(n: usize) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (free_port(), free_port());
    let config = dir.path().join("lanyard.toml");
    // Caps above the fleet, so the benchmark measures cost, not admission: every agent here
    // comes from 127.0.0.1, one source, which also has one budget of calls in flight
    // (`denial_burst`: a call holds a unit until it succeeds), sized for a whole fleet too.
    let cap = (n * 2 + 64).max(8192);
    std::fs::write(
        &config,
        format!(
            r#"
trust_domain = "example.org"
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{metrics}"
min_ttl = "30s"
max_connections = {cap}
max_connections_per_source = {cap}
denial_burst = {cap}
denial_rate = {cap}
[[policy]]
spiffe_id = "spiffe://example.org/fleet/*"
max_ttl = "10m"
"#
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let child = Command::new(lanyard_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .env("LANYARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start lanyard serve");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || Credential::load(&data.join("admin"), &RolesOid::default()).is_err()
    {
        assert!(t.elapsed() < Duration::from_secs(30), "CA did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ca {
        child,
        port,
        metrics,
        data,
        _dir: dir,
    }
}

async fn admin(ca: &Ca) -> Channel {
    let oid = RolesOid::default();
    let cred = Credential::load(&ca.data.join("admin"), &oid).unwrap();
    connect(
        &format!("127.0.0.1:{}", ca.port),
        ServerTrust::Bundle(cred.bundle.clone()),
        Some(cred.slot().unwrap()),
        oid,
    )
    .await
    .unwrap()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// How long after a revocation the fleet's CRL fetches are over (the agent waits 1 s, then a
/// random part of 2 s), with a margin.
const CRL_SETTLED: Duration = Duration::from_millis(3500);

struct Row {
    n: usize,
    mode: &'static str,
    cpu_per_rotation_ms: f64,
    core_share: f64,
    rotations: f64,
    ca_rss_per_agent_kb: f64,
    /// CA RSS growth during the steady window per rotation (store and audit records).
    ca_rss_per_rotation_kb: f64,
    ca_fds_per_agent: f64,
    conns_per_agent: f64,
    revocation: (f64, f64),
    bundle: (f64, f64),
    agent_mem_mb: f64,
    ready_s: f64,
    /// The steady window's commits and per-thread breakdown.
    window: Steady,
}

fn main() {
    raise_nofile();
    let agents: Vec<usize> = env::<String>("LANYARD_FLEET_AGENTS", "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let ttl: u64 = env("LANYARD_FLEET_TTL", 30);
    let secs: u64 = env("LANYARD_FLEET_SECS", 60);
    let procs: u8 = env("LANYARD_FLEET_PROCS", 0);
    let fanout: usize = env("LANYARD_FLEET_FANOUT", 5);
    println!(
        "lanyard fleet benchmark: {} agents, {ttl}s certificates, {secs}s window, {}",
        agents
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        if procs == 1 {
            "agent processes"
        } else {
            "in-process agents"
        }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for n in agents {
        let row = if procs == 1 {
            rt.block_on(run_processes(n, ttl, secs))
        } else {
            rt.block_on(run_in_process(n, ttl, secs, fanout))
        };
        print_row(&row, ttl);
        rows.push(row);
    }
    println!(
        "\n| N | agents | CA CPU/rotation | CA CPU (1 core) | CA RSS/agent | CA fds/agent | conns/agent | revocation p50/p99 | bundle p50/p99 | agent memory |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} ms | {:.1} % | {:.1} KiB | {:.2} | {:.2} | {} | {} | {:.2} MiB |",
            r.n,
            r.mode,
            r.cpu_per_rotation_ms,
            r.core_share * 100.0,
            r.ca_rss_per_agent_kb,
            r.ca_fds_per_agent,
            r.conns_per_agent,
            ms_pair(r.revocation),
            ms_pair(r.bundle),
            r.agent_mem_mb,
        );
    }
    // Where the CA's CPU per rotation goes, by thread (after the summary table, which
    // scripts/bench reads by its header): each thread's CPU time and its voluntary context
    // switches (each a sleep, so a wake-up to come) per rotation, and the audit group commits
    // per rotation (below 1 when commits carry several renewals).
    println!(
        "\nCA threads per rotation (CPU from /proc/<pid>/task/*/schedstat, wake-ups = voluntary context switches):"
    );
    println!("| N | CA thread | threads | µs/rotation | wake-ups/rotation |");
    println!("|---:|---|---:|---:|---:|");
    for r in &rows {
        for t in &r.window.threads {
            println!(
                "| {} | {} | {} | {:.1} | {:.2} |",
                r.n, t.group, t.threads, t.us_per_rotation, t.wakes_per_rotation
            );
        }
        let (us, wakes) = r.window.threads.iter().fold((0.0, 0.0), |(u, w), t| {
            (u + t.us_per_rotation, w + t.wakes_per_rotation)
        });
        println!(
            "| {} | all (audit commits/rotation {:.2}) | | {us:.1} | {wakes:.2} |",
            r.n, r.window.commits_per_rotation
        );
    }
}

fn ms_pair((a, b): (f64, f64)) -> String {
    if a.is_nan() {
        "n/a".into()
    } else {
        format!("{:.0}/{:.0} ms", a * 1e3, b * 1e3)
    }
}

fn print_row(r: &Row, ttl: u64) {
    // What 10,000 agents with 5-minute certificates would cost at this per-rotation figure.
    let at_10k = 10_000.0 / 150.0 * r.cpu_per_rotation_ms / 1e3;
    println!(
        "N={} ({}): ready in {:.1}s; {} rotations; CA CPU {:.3} ms/rotation ({:.1} % of a core at {ttl}s certs; ~{:.1} % for 10,000 agents at 5 min); CA RSS {:.1} KiB/agent connected, +{:.2} KiB per rotation after; CA fds {:.2}/agent; {:.2} connections/agent; revocation fan-out {}; bundle fan-out {}; agent memory {:.2} MiB",
        r.n,
        r.mode,
        r.ready_s,
        r.rotations,
        r.cpu_per_rotation_ms,
        r.core_share * 100.0,
        at_10k * 100.0,
        r.ca_rss_per_agent_kb,
        r.ca_rss_per_rotation_kb,
        r.ca_fds_per_agent,
        r.conns_per_agent,
        ms_pair(r.revocation),
        ms_pair(r.bundle),
        r.agent_mem_mb,
    );
}

async fn token(admin: &Channel, n: usize) -> String {
    AdminClient::new(admin.clone())
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: "spiffe://example.org/fleet/*".into(),
            roles: vec![],
            max_ttl_seconds: 0,
            expires_in_seconds: 3600,
            uses: n as u32,
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// What the CA did over the steady-state window.
struct Steady {
    /// All CA CPU over the window ÷ the renewals it counted, ms (NaN without renewals).
    per_rotation_ms: f64,
    /// CA CPU ÷ wall time (share of one core).
    core_share: f64,
    rotations: f64,
    /// Audit group commits (one transaction and one fdatasync each) per rotation.
    commits_per_rotation: f64,
    /// The CA's CPU and wake-ups per rotation by thread group.
    threads: Vec<ThreadShare>,
}

/// Measures the CA over `secs` of steady state.
async fn steady(ca: &Ca, secs: u64) -> Steady {
    const COMMITS: &str = "lanyard_audit_group_size_count";
    let pid = ca.child.id();
    let (c0, i0, g0) = (
        cpu_secs(pid),
        issuances(ca.metrics).await,
        metric_sum(ca.metrics, COMMITS).await,
    );
    let t0_threads = threads(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (c1, i1, g1) = (
        cpu_secs(pid),
        issuances(ca.metrics).await,
        metric_sum(ca.metrics, COMMITS).await,
    );
    let t1_threads = threads(pid);
    let wall = t0.elapsed().as_secs_f64();
    let rotations = i1 - i0;
    // No renewal in the window (certificates longer than twice the window): only the idle
    // cost (the share of a core) means anything; per rotation is NaN, not a made-up figure.
    let (per_rotation_ms, commits_per_rotation, threads) = if rotations >= 1.0 {
        (
            (c1 - c0) / rotations * 1e3,
            (g1 - g0) / rotations,
            per_thread(&t0_threads, &t1_threads, rotations),
        )
    } else {
        (f64::NAN, f64::NAN, Vec::new())
    };
    Steady {
        per_rotation_ms,
        core_share: (c1 - c0) / wall,
        rotations,
        commits_per_rotation,
        threads,
    }
}

async fn run_in_process(n: usize, ttl: u64, secs: u64, fanout: usize) -> Row {
    let ca = start_ca(n);
    let admin = admin(&ca).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = ca.child.id();
    let (rss0, fds0) = (rss(pid), fds(pid));
    let me = std::process::id();
    let my_rss0 = rss(me);
    let token = token(&admin, n).await;
    let server = format!("127.0.0.1:{}", ca.port);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let mut fleet = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = AgentConfig {
            token: Some(token.clone()),
            spiffe_id: Some(format!("spiffe://example.org/fleet/a{i}")),
            ttl: Some(Duration::from_secs(ttl)),
            ..AgentConfig::new(server.clone())
        };
        let agent = Agent::new(cfg);
        let state = agent.subscribe();
        let revocations = agent.revocations();
        let stop = stop_rx.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = agent.run(stop).await {
                println!("agent {i} stopped: {e}");
            }
        });
        fleet.push((state, revocations, task));
        // Enrolment is not what is measured: in waves, so the CA is not a join-token storm
        // (and one source stays within its budget of calls in flight).
        if i % 50 == 49 {
            for (state, _, _) in &mut fleet[i - 49..=i] {
                let _ = state.wait_for(|s| s.is_some()).await;
            }
        }
    }
    for (state, _, _) in &mut fleet {
        let _ = state.wait_for(|s| s.is_some()).await;
    }
    let ready_s = t.elapsed().as_secs_f64();
    // One lifetime for the fleet to spread out and every stream to settle.
    tokio::time::sleep(Duration::from_secs(ttl.min(30))).await;
    let settled = rss(pid);
    let window = steady(&ca, secs).await;
    let rotations = window.rotations;
    // Per agent: connected and enrolled (its connection, streams, enrollment and first
    // records), before the steady window adds renewal records.
    let ca_rss_per_agent_kb = settled.saturating_sub(rss0) as f64 / 1024.0 / n as f64;
    let ca_rss_per_rotation_kb = rss(pid).saturating_sub(settled) as f64 / 1024.0 / rotations;
    let ca_fds_per_agent = fds(pid).saturating_sub(fds0) as f64 / n as f64;
    let conns_per_agent = connections_to(ca.port).saturating_sub(1) as f64 / n as f64;
    let agent_mem_mb = rss(me).saturating_sub(my_rss0) as f64 / 1024.0 / 1024.0 / n as f64;

    // Revocation fan-out: an identity nobody in the fleet holds, so every agent keeps running.
    let mut rev_lat = Vec::new();
    for k in 0..fanout {
        let waiting: Vec<_> = fleet
            .iter()
            .map(|(_, set, _)| {
                let mut ch = set.changes();
                ch.borrow_and_update();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(30), ch.changed()).await;
                    Instant::now()
                })
            })
            .collect();
        let sent = Instant::now();
        RevocationClient::new(admin.clone())
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::SpiffeId(format!(
                    "spiffe://example.org/elsewhere/x{k}"
                ))),
                reason: "fleet benchmark".into(),
                lift: false,
            })
            .await
            .unwrap();
        for w in waiting {
            rev_lat.push((w.await.unwrap() - sent).as_secs_f64());
        }
        // Each revocation on its own: after the push, every agent fetches the new CRL 1-3 s
        // later (spread); the next measurement starts once those have settled.
        tokio::time::sleep(CRL_SETTLED).await;
    }
    // Bundle fan-out: a new federated bundle.
    let before: Vec<u64> = fleet
        .iter()
        .map(|(s, _, _)| s.borrow().as_ref().map_or(0, |s| s.bundle_revision))
        .collect();
    let waiting: Vec<_> = fleet
        .iter()
        .zip(before)
        .map(|((s, _, _), b)| {
            let mut s = s.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    s.wait_for(|s| s.as_ref().is_some_and(|s| s.bundle_revision > b)),
                )
                .await;
                Instant::now()
            })
        })
        .collect();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let sent = Instant::now();
    AdminClient::new(admin.clone())
        .import_bundle(pb::ImportBundleRequest {
            trust_domain: "b.example".into(),
            bundle: root.pem().into_bytes(),
        })
        .await
        .unwrap();
    let mut bundle_lat = Vec::new();
    for w in waiting {
        bundle_lat.push((w.await.unwrap() - sent).as_secs_f64());
    }
    let _ = stop_tx.send(true);
    for (_, _, task) in fleet {
        let _ = task.await;
    }
    Row {
        n,
        mode: "in-process",
        cpu_per_rotation_ms: window.per_rotation_ms,
        core_share: window.core_share,
        rotations,
        ca_rss_per_agent_kb,
        ca_rss_per_rotation_kb,
        ca_fds_per_agent,
        conns_per_agent,
        revocation: (pct(&mut rev_lat, 0.5), pct(&mut rev_lat, 0.99)),
        bundle: (pct(&mut bundle_lat, 0.5), pct(&mut bundle_lat, 0.99)),
        agent_mem_mb,
        ready_s,
        window,
    }
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

async fn run_processes(n: usize, ttl: u64, secs: u64) -> Row {
    let ca = start_ca(n);
    let admin = admin(&ca).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = ca.child.id();
    let (rss0, fds0) = (rss(pid), fds(pid));
    let token = token(&admin, n).await;
    let server = format!("127.0.0.1:{}", ca.port);
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::with_capacity(n));
    for i in 0..n {
        let out = dir.path().join(format!("a{i}"));
        procs.0.push(
            Command::new(lanyard_bin())
                .args(["agent", "--server", &server, "--token", &token])
                .args(["--spiffe-id", &format!("spiffe://example.org/fleet/a{i}")])
                .args(["--ttl", &format!("{ttl}s")])
                .arg("--out")
                .arg(&out)
                .env("LANYARD_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start lanyard agent"),
        );
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ready = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let k = (0..n)
            .filter(|i| ready_dir(&dir.path().join(format!("a{i}"))))
            .count();
        ready.store(k as u64, Ordering::Relaxed);
        if k == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(ttl.min(30))).await;
    let settled = rss(pid);
    let window = steady(&ca, secs).await;
    let rotations = window.rotations;
    // Per agent: connected and enrolled (its connection, streams, enrollment and first
    // records), before the steady window adds renewal records.
    let ca_rss_per_agent_kb = settled.saturating_sub(rss0) as f64 / 1024.0 / n as f64;
    let ca_rss_per_rotation_kb = rss(pid).saturating_sub(settled) as f64 / 1024.0 / rotations;
    let ca_fds_per_agent = fds(pid).saturating_sub(fds0) as f64 / n as f64;
    let conns_per_agent = connections_to(ca.port).saturating_sub(1) as f64 / n as f64;
    let mean_mib = |key: &str| {
        procs
            .0
            .iter()
            .map(|c| status_bytes(c.id(), key) as f64)
            .sum::<f64>()
            / n as f64
            / 1024.0
            / 1024.0
    };
    let agent_mem_mb = mean_mib("VmRSS:");
    println!(
        "  {} of {n} agent processes ready",
        ready.load(Ordering::Relaxed)
    );
    // Most of an agent's RSS is the binary's code, mapped from the page cache and shared by
    // every agent on a host; its own memory is the anonymous part.
    println!(
        "  agent process RSS {agent_mem_mb:.2} MiB: anonymous {:.2} MiB, file-backed {:.2} MiB (the binary's code, shared by every agent on a host)",
        mean_mib("RssAnon:"),
        mean_mib("RssFile:")
    );
    Row {
        n,
        mode: "processes",
        cpu_per_rotation_ms: window.per_rotation_ms,
        core_share: window.core_share,
        rotations,
        ca_rss_per_agent_kb,
        ca_rss_per_rotation_kb,
        ca_fds_per_agent,
        conns_per_agent,
        revocation: (f64::NAN, f64::NAN),
        bundle: (f64::NAN, f64::NAN),
        agent_mem_mb,
        ready_s,
        window,
    }
}

fn ready_dir(dir: &Path) -> bool {
    dir.join("cert.pem").exists()
}
