//! Handshake benchmark: the CPU one agent-style renewal costs the CA and the client, with a fixed
//! number of renewals (so `perf stat`/callgrind runs of it are comparable), each on a new TCP +
//! TLS 1.3 connection to a real in-process CA (sled, durable audit).
//!
//! Two ways an agent connects anew, each measured separately:
//! - `new-cert`: every renewal presents the certificate the previous one returned (what
//!   `benches/issue.rs --paths agent` and the peers' `renew-agent` do): always a full handshake,
//!   since a session speaks only for the certificate it was authenticated with;
//! - `same-cert`: reconnects that present the same certificate (an agent whose connection broke,
//!   a CLI call): the session of the previous connection is resumed.
//!
//! Prints, per mode: renewals, full/resumed handshakes (from the client's `CertSlot`), the
//! negotiated key-exchange group and cipher suite, and CPU µs per renewal for the server threads
//! and the client threads (utime + stime from /proc, by thread name).
//!
//! Knobs: `LANYARD_HS_RENEWALS` (per client, default 500), `LANYARD_HS_CLIENTS` (default 4),
//! `LANYARD_HS_MODES` (`new-cert,same-cert`).
//!
//! For instruction counts that do not depend on the machine's load, run it under callgrind with
//! one client and two renewal counts, and divide the difference by the difference in renewals
//! (set-up cancels out). Threads: 1 is main (set-up), 4 and 5 the client runtime, the others the
//! CA (its runtime, sled, the audit writer):
//! `LANYARD_HS_CLIENTS=1 LANYARD_HS_MODES=new-cert LANYARD_HS_RENEWALS=20 valgrind
//! --tool=callgrind --separate-threads=yes target/release/deps/handshake-*` (then 60).
#![allow(clippy::print_stdout, clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use lanyard::ca::RolesOid;
use lanyard::client::{Credential, connect, csr_for};
use lanyard::config::{Overrides, ServeSettings};
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, ca_client::CaClient};
use lanyard::spiffe::SpiffeId;
use lanyard::tls::{Bundle, CertSlot, ServerTrust};
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const POLICY: &str = r#"
trust_domain = "example.org"
listen = "127.0.0.1:0"
[[policy]]
spiffe_id = "spiffe://example.org/bench/*"
roles = []
max_ttl = "10m"
"#;

const CLIENT_THREAD: &str = "hs-client";

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (all threads, client threads) CPU seconds of this process.
fn cpu_secs() -> (f64, f64) {
    let tick = 0.01;
    let stat_cpu = |stat: &str| -> Option<f64> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
    };
    let all = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu(&s))
        .unwrap_or(0.0)
        * tick;
    let mut client = 0.0;
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("stat"))
            && s.contains(&format!("({CLIENT_THREAD}"))
        {
            client += stat_cpu(&s).unwrap_or(0.0) * tick;
        }
    }
    (all, client)
}

struct Agent {
    slot: Arc<CertSlot>,
    key: Vec<u8>,
    csr: Vec<u8>,
}

async fn enroll(
    server: &str,
    bundle: &Bundle,
    admin: &AdminClient<tonic::transport::Channel>,
    i: usize,
) -> Agent {
    let id = SpiffeId::parse(&format!("spiffe://example.org/bench/a{i}")).unwrap();
    let token = admin
        .clone()
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: id.to_string(),
            roles: vec![],
            max_ttl_seconds: 600,
            expires_in_seconds: 3600,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let key = KeyPair::generate().unwrap();
    let csr = csr_for(&id, &key).unwrap();
    let anon = connect(
        server,
        ServerTrust::Bundle(bundle.clone()),
        None,
        RolesOid::default(),
    )
    .await
    .unwrap();
    let resp = CaClient::new(anon)
        .issue(pb::IssueRequest {
            csr: csr.clone(),
            join_token: token,
            jwt: String::new(),
            ttl_seconds: 600,
            roles: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let slot = CertSlot::new();
    let agent = Agent {
        slot,
        key: key.serialize_der(),
        csr,
    };
    install(&agent, resp);
    agent
}

fn install(a: &Agent, resp: pb::IssueResponse) {
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    a.slot
        .set(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(a.key.clone())),
        )
        .unwrap();
}

/// One renewal on a new connection; with `keep_cert`, the slot keeps its certificate.
async fn renew(server: &str, bundle: &Bundle, a: &Agent, keep_cert: bool) {
    let channel = connect(
        server,
        ServerTrust::Bundle(bundle.clone()),
        Some(a.slot.clone()),
        RolesOid::default(),
    )
    .await
    .expect("connect");
    let resp = CaClient::new(channel)
        .issue(pb::IssueRequest {
            csr: a.csr.clone(),
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: 600,
            roles: vec![],
        })
        .await
        .expect("renewal")
        .into_inner();
    if !keep_cert {
        install(a, resp);
    }
}

fn main() {
    let renewals: usize = env("LANYARD_HS_RENEWALS", 500);
    let clients: usize = env("LANYARD_HS_CLIENTS", 4);
    let modes: String = env("LANYARD_HS_MODES", "new-cert,same-cert".to_string());
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanyard.toml");
    std::fs::write(&config, POLICY).unwrap();
    let settings = ServeSettings::resolve(
        Some(&config),
        Overrides {
            data_dir: Some(dir.path().join("data")),
            ..Overrides::default()
        },
    )
    .unwrap();
    let running = server_rt
        .block_on(lanyard::server::start(settings))
        .unwrap();
    let server = running.addr.to_string();
    let admin = Credential::load(&dir.path().join("data/admin"), &RolesOid::default()).unwrap();
    let bundle = admin.bundle.clone();
    println!(
        "lanyard handshake benchmark: {clients} clients x {renewals} renewals, each on a new connection"
    );
    println!(
        "  {:<10} {:>9} {:>6} {:>8} {:>8} {:>24} {:>14} {:>14} {:>9}",
        "mode",
        "renewals",
        "full",
        "resumed",
        "group",
        "suite",
        "server µs/op",
        "client µs/op",
        "ops/s"
    );
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let keep_cert = match mode {
            "new-cert" => false,
            "same-cert" => true,
            other => panic!("unknown mode {other}"),
        };
        let agents: Vec<Arc<Agent>> = client_rt.block_on(async {
            let admin_ch = connect(
                &server,
                ServerTrust::Bundle(bundle.clone()),
                Some(admin.slot().unwrap()),
                RolesOid::default(),
            )
            .await
            .unwrap();
            let admin_client = AdminClient::new(admin_ch);
            let mut v = Vec::new();
            for i in 0..clients {
                let a = enroll(
                    &server,
                    &bundle,
                    &admin_client,
                    i + 1000 * usize::from(keep_cert),
                )
                .await;
                // Warm-up: one renewal (a full handshake) each.
                renew(&server, &bundle, &a, keep_cert).await;
                v.push(Arc::new(a));
            }
            v
        });
        let before: Vec<_> = agents.iter().map(|a| a.slot.stats()).collect();
        let (cpu0, client0) = cpu_secs();
        let t0 = Instant::now();
        client_rt.block_on(async {
            let tasks: Vec<_> = agents
                .iter()
                .map(|a| {
                    let (a, server, bundle) = (a.clone(), server.clone(), bundle.clone());
                    tokio::spawn(async move {
                        for _ in 0..renewals {
                            renew(&server, &bundle, &a, keep_cert).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let secs = t0.elapsed().as_secs_f64();
        let (cpu1, client1) = cpu_secs();
        let ops = (clients * renewals) as f64;
        let (mut full, mut resumed) = (0, 0);
        for (a, b) in agents.iter().zip(&before) {
            let s = a.slot.stats();
            full += s.full - b.full;
            resumed += s.resumed - b.resumed;
        }
        let last = agents[0].slot.stats();
        let group = last
            .last_group
            .map_or("-".to_string(), |g| format!("{g:?}"));
        let suite = last
            .last_suite
            .map_or("-".to_string(), |s| format!("{s:?}"));
        let client = client1 - client0;
        let server = (cpu1 - cpu0) - client;
        println!(
            "  {mode:<10} {:>9} {full:>6} {resumed:>8} {group:>8} {suite:>24} {:>14.0} {:>14.0} {:>9.0}",
            ops as usize,
            server * 1e6 / ops,
            client * 1e6 / ops,
            ops / secs
        );
    }
    let _ = running.shutdown.send(true);
}
