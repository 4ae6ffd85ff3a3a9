//! Replicas on etcd against one node on sled: renewals/s, p50/p99 latency, server CPU per
//! certificate (every `lanyard serve` process, and etcd's members separately), etcd round trips
//! per certificate (etcd's own `grpc_server_handled_total` for the KV service, summed over the
//! members), then the failover stalls: a replica SIGKILLed (its clients move to the next
//! replica) and the etcd leader SIGKILLed.
//!
//! Real processes on loopback: `lanyard serve` replicas (the binary this bench is built with) and
//! a 3-member etcd from `/usr/bin/etcd`. Clients run in this process, spread round-robin over the
//! replicas, each renewing its certificate over one mTLS channel in a loop. On 2 cores this shows
//! the overhead of the shared store, not scaling.
//!
//! Knobs (environment; `scripts/bench-ha` sets them from flags):
//! - `LANYARD_BENCH_CLIENTS`  concurrent renewing clients (default 16)
//! - `LANYARD_BENCH_SECS`     measured seconds per row (default 5)
//! - `LANYARD_BENCH_WARMUP`   warm-up seconds per row (default 1)
#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cpu_secs as cpu;
use lanyard::ca::RolesOid;
use lanyard::client::{Credential, connect, csr_for};
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, ca_client::CaClient};
use lanyard::spiffe::SpiffeId;
use lanyard::tls::{Bundle, CertSlot, ServerTrust};
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::Mutex;

const ETCD: &str = "/usr/bin/etcd";
const POLICY: &str = r#"
[[policy]]
spiffe_id = "spiffe://example.org/bench/*"
roles = ["db-read"]
max_ttl = "10m"
"#;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A 3-member etcd cluster on loopback.
struct Etcd {
    members: Vec<(u16, Option<Proc>)>,
}

impl Etcd {
    fn start(dir: &Path) -> Self {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| {
                let log = std::fs::File::create(dir.join(format!("etcd{i}.log"))).unwrap();
                let child = Command::new(ETCD)
                    .args(["--name", &format!("m{i}")])
                    .arg("--data-dir")
                    .arg(dir.join(format!("m{i}.etcd")))
                    .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
                    .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
                    .args([
                        "--initial-advertise-peer-urls",
                        &format!("http://127.0.0.1:{p}"),
                    ])
                    .args(["--initial-cluster", &cluster.join(",")])
                    .args(["--initial-cluster-token", &format!("bench-{}", ports[0].0)])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start etcd (apt-get install etcd-server)");
                (*c, Some(Proc(child)))
            })
            .collect();
        let e = Self { members };
        let t0 = Instant::now();
        while e
            .members
            .iter()
            .any(|(p, _)| http_get(*p, "/health").is_none())
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "etcd did not start: {}",
                std::fs::read_to_string(dir.join("etcd0.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    fn url(&self) -> String {
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|(_, c)| c.as_ref().map(|c| c.0.id()))
            .collect()
    }

    /// KV requests handled so far, summed over the live members.
    fn kv_requests(&self) -> f64 {
        self.members
            .iter()
            .filter(|(_, c)| c.is_some())
            .filter_map(|(p, _)| http_get(*p, "/metrics"))
            .flat_map(|m| {
                m.lines()
                    .filter(|l| {
                        l.starts_with("grpc_server_handled_total")
                            && l.contains("grpc_service=\"etcdserverpb.KV\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    fn leader(&self) -> Option<usize> {
        self.members.iter().position(|(p, c)| {
            c.is_some()
                && http_get(*p, "/metrics")
                    .is_some_and(|m| m.lines().any(|l| l == "etcd_server_is_leader 1"))
        })
    }
}

/// The response to `GET path` on 127.0.0.1:`port`, if its status is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    common::http_get(port, path)
        .filter(|out| out.lines().next().is_some_and(|l| l.contains(" 200 ")))
}

/// The replicas of one row.
struct Replicas {
    procs: Vec<Option<Proc>>,
    addrs: Vec<String>,
    admin: PathBuf,
}

impl Replicas {
    async fn start(dir: &Path, n: usize, store: Option<(&str, &str)>) -> Self {
        let kek = dir.join("kek");
        if !kek.exists() {
            lanyard::ca::Kek::generate(&kek).unwrap();
        }
        let config = dir.join("lanyard.toml");
        let store_lines = store
            .map(|(s, prefix)| {
                format!(
                    "store = \"{s}\"\netcd_prefix = \"{prefix}\"\nkek_file = \"{}\"\n",
                    kek.display()
                )
            })
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"example.org\"\nlisten = \"127.0.0.1:0\"\n{store_lines}{POLICY}"
            ),
        )
        .unwrap();
        let mut procs = Vec::new();
        let mut datas = Vec::new();
        for i in 0..n {
            let data = dir.join(format!("r{i}"));
            let log = std::fs::File::create(dir.join(format!("r{i}.log"))).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_lanyard"))
                .args(["serve", "--config"])
                .arg(&config)
                .arg("--data-dir")
                .arg(&data)
                .args(["--replica-id", &format!("r{i}")])
                .env("LANYARD_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            procs.push(Some(Proc(child)));
            datas.push(data);
        }
        let mut addrs = Vec::new();
        for d in &datas {
            let t0 = Instant::now();
            let addr = loop {
                if let Ok(a) = std::fs::read_to_string(d.join("serve.addr")) {
                    break a.trim().to_string();
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "replica did not start"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            addrs.push(addr);
        }
        Self {
            procs,
            addrs,
            admin: datas[0].join("admin"),
        }
    }

    fn cpu(&self) -> f64 {
        self.procs.iter().flatten().map(|p| cpu(p.0.id())).sum()
    }
}

/// One renewing client: its credential, and the replica it talks to (moved on failure).
struct Client {
    csr: Vec<u8>,
    bundle: Bundle,
    slot: Arc<CertSlot>,
    channel: Mutex<(usize, tonic::transport::Channel)>,
}

async fn enroll(r: &Replicas, n: usize) -> Vec<Arc<Client>> {
    let oid = RolesOid::default();
    let admin = Credential::load(&r.admin, &oid).unwrap();
    let bundle = admin.bundle.clone();
    let ch = connect(
        &r.addrs[0],
        ServerTrust::Bundle(bundle.clone()),
        Some(admin.slot().unwrap()),
        oid.clone(),
    )
    .await
    .unwrap();
    let token = AdminClient::new(ch)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: "spiffe://example.org/bench/*".into(),
            roles: vec![],
            max_ttl_seconds: 600,
            expires_in_seconds: 3600,
            uses: n as u32,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut out = Vec::new();
    for i in 0..n {
        let replica = i % r.addrs.len();
        let id = SpiffeId::parse(&format!("spiffe://example.org/bench/c{i}")).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&id, &key).unwrap();
        let anon = connect(
            &r.addrs[replica],
            ServerTrust::Bundle(bundle.clone()),
            None,
            oid.clone(),
        )
        .await
        .unwrap();
        let resp = CaClient::new(anon)
            .issue(pb::IssueRequest {
                csr: csr.clone(),
                join_token: token.clone(),
                ttl_seconds: 600,
                roles: vec![],
                jwt: String::new(),
            })
            .await
            .unwrap()
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
        .unwrap();
        let channel = connect(
            &r.addrs[replica],
            ServerTrust::Bundle(bundle.clone()),
            Some(slot.clone()),
            oid.clone(),
        )
        .await
        .unwrap();
        out.push(Arc::new(Client {
            csr,
            bundle: bundle.clone(),
            slot,
            channel: Mutex::new((replica, channel)),
        }));
    }
    out
}

/// Renews in a loop until `stop`; on an error moves to the next replica in `addrs`. Records
/// (finish time, latency µs) of each success.
async fn renew_loop(
    c: Arc<Client>,
    addrs: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, u64)> {
    let mut out = Vec::new();
    let mut ca = CaClient::new(c.channel.lock().await.1.clone());
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            ca.issue(pb::IssueRequest {
                csr: c.csr.clone(),
                join_token: String::new(),
                ttl_seconds: 300,
                roles: vec![],
                jwt: String::new(),
            }),
        )
        .await;
        match r {
            Ok(Ok(_)) => out.push((Instant::now(), t0.elapsed().as_micros() as u64)),
            _ => {
                // Fail over: the next replica (what an agent given several addresses does).
                let mut ch = c.channel.lock().await;
                let next = (ch.0 + 1) % addrs.len();
                if let Ok(channel) = connect(
                    &addrs[next],
                    ServerTrust::Bundle(c.bundle.clone()),
                    Some(c.slot.clone()),
                    RolesOid::default(),
                )
                .await
                {
                    *ch = (next, channel.clone());
                    ca = CaClient::new(channel);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    out
}

struct Row {
    label: String,
    rate: f64,
    p50: f64,
    p99: f64,
    server_us: f64,
    etcd_us: f64,
    round_trips: f64,
}

async fn measure(label: &str, r: &Replicas, etcd: Option<&Etcd>, clients: &[Arc<Client>]) -> Row {
    let secs: f64 = env("LANYARD_BENCH_SECS", 5.0);
    let warmup: f64 = env("LANYARD_BENCH_WARMUP", 1.0);
    let stop = Arc::new(AtomicBool::new(false));
    let addrs = Arc::new(r.addrs.clone());
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| tokio::spawn(renew_loop(c.clone(), addrs.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let from = Instant::now();
    let etcd_pids = etcd.map(Etcd::pids).unwrap_or_default();
    let (cpu0, ecpu0) = (r.cpu(), etcd_pids.iter().map(|p| cpu(*p)).sum::<f64>());
    let kv0 = etcd.map_or(0.0, Etcd::kv_requests);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let until = Instant::now();
    let (cpu1, ecpu1) = (r.cpu(), etcd_pids.iter().map(|p| cpu(*p)).sum::<f64>());
    let kv1 = etcd.map_or(0.0, Etcd::kv_requests);
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(
            t.await
                .unwrap()
                .into_iter()
                .filter(|(at, _)| *at >= from && *at <= until)
                .map(|(_, l)| l),
        );
    }
    lat.sort_unstable();
    let n = lat.len().max(1) as f64;
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(f64::NAN, |v| *v as f64 / 1000.0)
    };
    Row {
        label: label.into(),
        rate: lat.len() as f64 / (until - from).as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        server_us: (cpu1 - cpu0) * 1e6 / n,
        etcd_us: (ecpu1 - ecpu0) * 1e6 / n,
        round_trips: (kv1 - kv0) / n,
    }
}

/// Runs the clients, SIGKILLs something at `kill`, and returns the longest time any client went
/// without a renewal after it, and how long the slowest client took to renew again at all.
async fn stall(r: &Replicas, clients: &[Arc<Client>], kill: impl FnOnce()) -> (Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let addrs = Arc::new(r.addrs.clone());
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| tokio::spawn(renew_loop(c.clone(), addrs.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at = Instant::now();
    kill();
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut longest_gap, mut slowest_back) = (Duration::ZERO, Duration::ZERO);
    for t in tasks {
        let done = t.await.unwrap();
        let mut last = done
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .map_or(at, |(t, _)| *t);
        let back = done
            .iter()
            .find(|(t, _)| *t > at)
            .map_or(Duration::from_secs(8), |(t, _)| *t - at);
        slowest_back = slowest_back.max(back);
        for (t, _) in done.iter().filter(|(t, _)| *t > at) {
            longest_gap = longest_gap.max(*t - last);
            last = *t;
        }
    }
    (longest_gap, slowest_back)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = env("LANYARD_BENCH_CLIENTS", 16);
    if !Path::new(ETCD).exists() {
        println!("bench-ha: {ETCD} is missing (apt-get install etcd-server)");
        return;
    }
    println!(
        "== replicas on etcd vs one node on sled: {n} clients renewing over mTLS, {} s per row ==",
        env("LANYARD_BENCH_SECS", 5.0)
    );
    println!(
        "  {:<14} {:>10} {:>8} {:>8} {:>14} {:>12} {:>14}",
        "setup", "certs/s", "p50 ms", "p99 ms", "lanyard CPU", "etcd CPU", "etcd KV calls"
    );
    println!(
        "  {:<14} {:>10} {:>8} {:>8} {:>14} {:>12} {:>14}",
        "", "", "", "", "µs/cert", "µs/cert", "per cert"
    );
    let print = |row: &Row| {
        println!(
            "  {:<14} {:>10.0} {:>8.2} {:>8.2} {:>14.0} {:>12.0} {:>14.2}",
            row.label, row.rate, row.p50, row.p99, row.server_us, row.etcd_us, row.round_trips
        );
    };
    {
        let dir = tempfile::tempdir().unwrap();
        let r = Replicas::start(dir.path(), 1, None).await;
        let clients = enroll(&r, n).await;
        print(&measure("sled, 1 node", &r, None, &clients).await);
    }
    let edir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(edir.path());
    let mut last = None;
    for k in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        // A fresh prefix per row: each row starts with an empty store (and its own KEK).
        let url = etcd.url();
        let prefix = format!("/bench-{k}/");
        let r = Replicas::start(dir.path(), k, Some((&url, &prefix))).await;
        let clients = enroll(&r, n).await;
        print(&measure(&format!("etcd, {k} repl."), &r, Some(&etcd), &clients).await);
        last = Some((dir, r, clients));
    }
    let (_dir, mut r, clients) = last.unwrap();
    println!("\n== failover (3 replicas, {n} clients moving to the next replica on an error) ==");
    let victim = r.procs[0].take();
    let (gap, back) = stall(&r, &clients, move || drop(victim)).await;
    println!(
        "  replica SIGKILLed: longest gap between renewals {:.0} ms; slowest client renewing again after {:.0} ms",
        gap.as_secs_f64() * 1e3,
        back.as_secs_f64() * 1e3
    );
    let leader = etcd.leader().expect("an etcd leader");
    let (gap, back) = stall(&r, &clients, || {
        etcd.members[leader].1.take();
    })
    .await;
    println!(
        "  etcd leader SIGKILLed: longest gap between renewals {:.0} ms; slowest client renewing again after {:.0} ms",
        gap.as_secs_f64() * 1e3,
        back.as_secs_f64() * 1e3
    );
}
