//! Issue 3, the audit log as auditors see it: `Audit.Subscribe` replay, live follow, filters,
//! resume, stuck and lagging subscribers, who may subscribe, durability across `kill -9`, and
//! `lanyard audit tail|verify`. Every test runs a real CA over real TLS sockets.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestCa, drain_audit, lanyard_bin, write_response};
use hyper_util::rt::TokioIo;
use lanyard::api::audit::from_proto;
use lanyard::audit::{GENESIS_HASH, verify_chain};
use lanyard::ca::RolesOid;
use lanyard::client::{Credential, connect, csr_for};
use lanyard::pb::v1::{
    self as pb, admin_client::AdminClient, audit_client::AuditClient, ca_client::CaClient,
    revocation_client::RevocationClient,
};
use lanyard::spiffe::SpiffeId;
use lanyard::store::AuditRecord;
use lanyard::tls::{ServerTrust, ServerVerifier, provider};
use rcgen::KeyPair;
use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status, Streaming};

const API: &str = "spiffe://example.org/ns/prod/api";
const WEB: &str = "spiffe://example.org/ns/prod/web";
const AUDITOR: &str = "spiffe://example.org/auditor";
const ADMIN: &str = "spiffe://example.org/lanyard/admin";
const SERVER: &str = "spiffe://example.org/lanyard/server";
/// Longest wait for one live event.
const LIVE: Duration = Duration::from_secs(10);
/// The server keeps this many records for live subscribers (`audit::log::LIVE_BUFFER`); a
/// subscriber further behind must be fed from the store.
const LIVE_BUFFER: u64 = 4096;
/// HTTP/2 receive window of the "slow subscriber" channels. With the defaults (2 MiB per stream)
/// the client alone would swallow ~8000 events before the server noticed anything; with 8 KiB a
/// subscriber that stops reading backs the server's send path up after a few hundred.
const SMALL_WINDOW: u32 = 8 * 1024;

// === helpers ===

async fn subscribe(
    ch: Channel,
    from_seq: u64,
    follow: bool,
    kinds: &[&str],
    spiffe_id: &str,
) -> Result<Streaming<pb::AuditEvent>, Status> {
    AuditClient::new(ch)
        .subscribe(pb::SubscribeRequest {
            from_seq,
            follow,
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            spiffe_id: spiffe_id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The next event of a followed stream; fails if none arrives within [`LIVE`] or the stream ends.
async fn next_event(s: &mut Streaming<pb::AuditEvent>) -> AuditRecord {
    let ev = tokio::time::timeout(LIVE, s.message())
        .await
        .expect("an event arrives in time")
        .expect("the stream is healthy")
        .expect("the stream is still open");
    from_proto(ev).expect("hashes are 32 bytes")
}

/// Asserts that a followed stream stays open and silent for a while.
async fn assert_quiet(s: &mut Streaming<pb::AuditEvent>) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(400), s.message()).await {
        panic!("expected no more events, got {item:?}");
    }
}

fn seqs(rs: &[AuditRecord]) -> Vec<u64> {
    rs.iter().map(|r| r.seq).collect()
}

fn csr(id: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    csr_for(&SpiffeId::parse(id).unwrap(), &key).unwrap()
}

/// Bootstrap issuance with a join token over an existing channel (no client certificate).
async fn issue(ch: &Channel, token: &str, csr: &[u8]) -> Result<pb::IssueResponse, Status> {
    CaClient::new(ch.clone())
        .issue(pb::IssueRequest {
            csr: csr.to_vec(),
            join_token: token.into(),
            jwt: String::new(),
            ttl_seconds: 60,
            roles: vec![],
        })
        .await
        .map(|r| r.into_inner())
}

/// Renewal over an mTLS channel.
async fn renew(ch: &Channel, csr: &[u8]) -> Result<pb::IssueResponse, Status> {
    CaClient::new(ch.clone())
        .issue(pb::IssueRequest {
            csr: csr.to_vec(),
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: 60,
            roles: vec![],
        })
        .await
        .map(|r| r.into_inner())
}

/// A channel presenting the credential in `dir`, with [`SMALL_WINDOW`] HTTP/2 receive windows.
async fn small_window_channel(addr: std::net::SocketAddr, dir: &Path) -> Channel {
    let cred = Credential::load(dir, &RolesOid::default()).unwrap();
    let verifier = ServerVerifier::for_path(
        ServerTrust::Bundle(cred.bundle.clone()),
        "/lanyard/server",
        RolesOid::default(),
    );
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cred.slot().unwrap());
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(SMALL_WINDOW)
        .initial_connection_window_size(SMALL_WINDOW)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from(addr.ip().to_string()).unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .expect("connect")
}

/// Load generator: `workers` tasks issue until `n` certificates have been issued in total,
/// alternating join-token bootstrap and mTLS renewal. Each call adds exactly one audit event.
/// Returns the serials.
async fn issue_many(ca: &TestCa, n: u64, workers: u64) -> Vec<String> {
    let token = ca.token(WEB, &[], 600, n as u32).await;
    let cred = ca
        .enroll(&format!("load-{}", rand::random::<u32>()), API, &[], 600)
        .await;
    let anon = ca.anon_channel().await;
    let mtls = ca.channel_as(&cred).await;
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (anon, mtls, token, counter) =
            (anon.clone(), mtls.clone(), token.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let by_token = w % 2 == 0;
            let csr = csr(if by_token { WEB } else { API });
            let mut serials = Vec::new();
            while counter.fetch_add(1, Ordering::SeqCst) < n {
                let resp = if by_token {
                    issue(&anon, &token, &csr).await
                } else {
                    renew(&mtls, &csr).await
                };
                serials.push(resp.expect("issuance succeeds under load").serial);
            }
            serials
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len() as u64, n);
    all
}

// === replay ===

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_the_start_is_ordered_gapless_and_chained() {
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 600, 2).await;
    let token_id = token.split('.').nth(1).unwrap().to_string();
    let secret = token.split('.').nth(2).unwrap().to_string();
    let (k1, first) = ca.issue(&token, API, 60).await.unwrap();
    let (_, second) = ca.issue(&token, API, 60).await.unwrap();
    let dir = ca.dir.path().join("api");
    write_response(&dir, &first, &k1);
    let renewed = ca.renew(&dir, 60).await.unwrap();
    let used_up = ca.issue(&token, API, 60).await.unwrap_err();
    assert_eq!(used_up.code(), Code::FailedPrecondition);
    let forged = ca.issue("lanyard1.not-a-token", API, 60).await.unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated);
    let t1 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    let log = drain_audit(
        subscribe(ca.admin_channel().await, 0, false, &[], "")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        seqs(&log),
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "gapless from 1"
    );
    let (next, head) = verify_chain(&log, 1, GENESIS_HASH).expect("the chain verifies");
    assert_eq!(
        (next, head),
        (log.len() as u64 + 1, log.last().unwrap().hash)
    );

    // Every decision, in the order it was made.
    let kinds: Vec<&str> = log.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "credential_issued", // the server's own serving certificate
            "credential_issued", // the local admin credential
            "server_started",
            "token_created",
            "issued",
            "issued",
            "renewed",
            "denied",
            "denied",
        ]
    );
    assert_eq!(
        (log[0].subject.as_str(), log[0].actor.as_str()),
        (SERVER, "lanyard")
    );
    assert_eq!(
        (log[1].subject.as_str(), log[1].roles.clone()),
        (ADMIN, vec!["lanyard:admin".to_string()])
    );
    assert_eq!(log[2].subject, SERVER);
    let created = &log[3];
    assert_eq!(
        (created.actor.as_str(), created.subject.as_str()),
        (ADMIN, API)
    );
    assert_eq!(created.roles, ["db-read"]);
    assert!(created.reason.contains(&token_id), "{created:?}");
    for (rec, resp) in [(&log[4], &first), (&log[5], &second)] {
        assert_eq!(rec.actor, format!("token:{token_id}"));
        assert_eq!(
            (rec.subject.as_str(), rec.serial.as_str()),
            (API, resp.serial.as_str())
        );
        assert_eq!(
            (rec.roles.clone(), rec.not_after),
            (resp.roles.clone(), resp.not_after)
        );
    }
    let r = &log[6];
    assert_eq!(
        (r.actor.as_str(), r.subject.as_str(), r.serial.as_str()),
        (API, API, renewed.serial.as_str())
    );
    assert!(
        r.reason.contains(&first.serial),
        "renewal names the cert it renewed: {r:?}"
    );
    assert_eq!(
        (log[7].actor.as_str(), log[7].subject.as_str()),
        (format!("token:{token_id}").as_str(), API)
    );
    assert!(log[7].reason.contains("already used"), "{:?}", log[7]);
    assert!(log[8].reason.contains("malformed"), "{:?}", log[8]);
    for w in log.windows(2) {
        assert!(w[0].time_ms <= w[1].time_ms, "time never goes backwards");
    }
    assert!(
        log.iter().all(|r| (t0..=t1).contains(&r.time_ms)),
        "event times are wall-clock ms"
    );
    // Secrets never reach the log.
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains(&secret) && !text.contains(&token));

    // from_seq 0 and 1 both mean the beginning; N starts at N; past the head is empty.
    let from1 = drain_audit(
        subscribe(ca.admin_channel().await, 1, false, &[], "")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(from1, log);
    let from5 = drain_audit(
        subscribe(ca.admin_channel().await, 5, false, &[], "")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(from5, log[4..]);
    let last = log.len() as u64;
    let tail = drain_audit(
        subscribe(ca.admin_channel().await, last, false, &[], "")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(tail, log[log.len() - 1..]);
    for past in [last + 1, u64::MAX] {
        let none = drain_audit(
            subscribe(ca.admin_channel().await, past, false, &[], "")
                .await
                .unwrap(),
        )
        .await;
        assert!(none.is_empty(), "from_seq {past}: {none:?}");
    }
    // A suffix verifies on its own, from its first prev_hash.
    verify_chain(&from5, 5, log[3].hash).expect("suffix verifies");
}

// === follow ===

#[tokio::test(flavor = "multi_thread")]
async fn follow_streams_new_events_as_they_happen() {
    let ca = TestCa::start().await;
    let auditor = ca
        .enroll("auditor", AUDITOR, &["lanyard:auditor"], 600)
        .await;
    let before = ca.audit_log().await;
    let head = before.last().unwrap();
    let mut stream = subscribe(ca.channel_as(&auditor).await, head.seq + 1, true, &[], "")
        .await
        .unwrap();
    assert_quiet(&mut stream).await;

    let token = ca.token(API, &[], 600, 3).await;
    let mut got = vec![next_event(&mut stream).await];
    assert_eq!(
        (got[0].seq, got[0].kind.as_str(), got[0].subject.as_str()),
        (head.seq + 1, "token_created", API)
    );
    let anon = ca.anon_channel().await;
    let csr = csr(API);
    for _ in 0..3 {
        let resp = issue(&anon, &token, &csr).await.unwrap();
        // Each event arrives before the next action: the stream is live, not batched at the end.
        let e = next_event(&mut stream).await;
        assert_eq!(
            (e.kind.as_str(), e.serial.as_str()),
            ("issued", resp.serial.as_str())
        );
        got.push(e);
    }
    assert_eq!(
        seqs(&got),
        (head.seq + 1..=head.seq + 4).collect::<Vec<_>>()
    );
    verify_chain(&got, head.seq + 1, head.hash).expect("live events continue the stored chain");
    assert_quiet(&mut stream).await;
    // The live events are exactly what the store holds.
    assert_eq!(ca.audit_log().await[head.seq as usize..], got);
}

/// The events a filtered, non-following subscription returns.
async fn filtered(ch: &Channel, kinds: &[&str], id: &str) -> Vec<AuditRecord> {
    drain_audit(subscribe(ch.clone(), 1, false, kinds, id).await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn kind_and_spiffe_id_filters_hide_everything_else() {
    let ca = TestCa::start().await;
    let api = ca.enroll("api", API, &["db-read"], 600).await;
    let web = ca.enroll("web", WEB, &[], 600).await;
    ca.renew(&api, 60).await.unwrap();
    let denied = ca.issue("lanyard1.bogus", WEB, 60).await.unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    let log = ca.audit_log().await;
    let admin = ca.admin_channel().await;
    let only = |keep: &dyn Fn(&AuditRecord) -> bool| -> Vec<AuditRecord> {
        let v: Vec<AuditRecord> = log.iter().filter(|r| keep(r)).cloned().collect();
        assert!(!v.is_empty(), "each filter below should match something");
        v
    };

    let issued = filtered(&admin, &["issued"], "").await;
    assert_eq!(issued, only(&|r| r.kind == "issued"));
    assert_eq!(issued.len(), 2);
    assert_eq!(
        filtered(&admin, &["issued", "renewed"], "").await,
        only(&|r| r.kind == "issued" || r.kind == "renewed")
    );
    let api_events = filtered(&admin, &[], API).await;
    assert_eq!(api_events, only(&|r| r.subject == API || r.actor == API));
    assert!(api_events.iter().all(|r| r.subject != WEB));
    let renewals = filtered(&admin, &["renewed"], API).await;
    assert_eq!(renewals, only(&|r| r.kind == "renewed"));
    assert_eq!(renewals.len(), 1);
    assert_eq!(
        filtered(&admin, &["denied"], "").await,
        only(&|r| r.kind == "denied")
    );
    // Filters hide events but never renumber them.
    assert!(api_events.windows(2).any(|w| w[1].seq > w[0].seq + 1));

    // Filters apply to the live part too: only WEB's renewal comes through.
    let head = log.last().unwrap().seq;
    let mut live = subscribe(admin.clone(), head + 1, true, &["renewed"], WEB)
        .await
        .unwrap();
    ca.renew(&api, 60).await.unwrap();
    let r = ca.renew(&web, 60).await.unwrap();
    let e = next_event(&mut live).await;
    assert_eq!(
        (e.kind.as_str(), e.subject.as_str(), e.serial.as_str()),
        ("renewed", WEB, r.serial.as_str())
    );
    assert_quiet(&mut live).await;
}

// === resume ===

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_subscriber_gets_every_missed_event_exactly_once() {
    let ca = TestCa::start().await;
    let auditor = ca
        .enroll("auditor", AUDITOR, &["lanyard:auditor"], 600)
        .await;
    ca.enroll("api", API, &[], 600).await;

    // Read part of the log live, then disconnect.
    let mut seen = Vec::new();
    {
        let ch = ca.channel_as(&auditor).await;
        let mut stream = subscribe(ch, 1, true, &[], "").await.unwrap();
        for _ in 0..5 {
            seen.push(next_event(&mut stream).await);
        }
    }
    let last = seen.last().unwrap().seq;
    assert_eq!(last, 5);

    // Things happen while the auditor is away.
    let anon = ca.anon_channel().await;
    let token = ca.token(WEB, &[], 600, 4).await;
    let csr = csr(WEB);
    let mut missed_serials = Vec::new();
    for _ in 0..4 {
        missed_serials.push(issue(&anon, &token, &csr).await.unwrap().serial);
    }
    let full = ca.audit_log().await;
    let head = full.last().unwrap().seq;

    // Resume from last + 1: everything after `last`, in order, exactly once, then live.
    let mut stream = subscribe(ca.channel_as(&auditor).await, last + 1, true, &[], "")
        .await
        .unwrap();
    let mut resumed = Vec::new();
    while resumed.last().is_none_or(|r: &AuditRecord| r.seq < head) {
        resumed.push(next_event(&mut stream).await);
    }
    assert_eq!(seqs(&resumed), (last + 1..=head).collect::<Vec<_>>());
    assert_quiet(&mut stream).await;
    let resumed_serials: Vec<&str> = resumed
        .iter()
        .filter(|r| r.kind == "issued")
        .map(|r| r.serial.as_str())
        .collect();
    assert!(
        missed_serials
            .iter()
            .all(|s| resumed_serials.contains(&s.as_str()))
    );
    seen.extend(resumed);
    assert_eq!(seen, full, "the two sessions together are the whole log");
    verify_chain(&seen, 1, GENESIS_HASH).unwrap();

    // And it keeps following after the catch-up.
    let more = issue(&anon, &ca.token(WEB, &[], 600, 1).await, &csr)
        .await
        .unwrap();
    let e1 = next_event(&mut stream).await;
    let e2 = next_event(&mut stream).await;
    assert_eq!((e1.seq, e1.kind.as_str()), (head + 1, "token_created"));
    assert_eq!(
        (e2.seq, e2.serial.as_str()),
        (head + 2, more.serial.as_str())
    );
}

// === slow and stuck subscribers ===

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_subscriber_never_blocks_issuance() {
    let ca = TestCa::start().await;
    // A follower that never reads. With an 8 KiB window the server can push at most a few hundred
    // events before its send path for this subscriber is full (window + one 32 KiB encode chunk
    // + the 256-slot channel), so 1000 issuances keep it backed up.
    let mut stuck = subscribe(
        small_window_channel(ca.addr, &ca.admin_dir()).await,
        1,
        true,
        &[],
        "",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let serials = tokio::time::timeout(Duration::from_secs(30), issue_many(&ca, 1000, 8))
        .await
        .expect("issuance is not blocked by a subscriber that does not read");
    let took = start.elapsed();

    // The stuck subscriber lost nothing: when it reads again it gets the whole log in order.
    let full = ca.audit_log().await;
    let mut got = Vec::new();
    while got.len() < full.len() {
        got.push(next_event(&mut stuck).await);
    }
    assert_eq!(got, full);
    verify_chain(&got, 1, GENESIS_HASH).unwrap();
    let logged: HashSet<&str> = got.iter().map(|r| r.serial.as_str()).collect();
    assert!(serials.iter().all(|s| logged.contains(s.as_str())));
    // ...and then follows live again.
    assert_quiet(&mut stuck).await;
    let r = ca
        .renew(&ca.enroll("late", API, &[], 600).await, 60)
        .await
        .unwrap();
    let tail: Vec<AuditRecord> = [
        next_event(&mut stuck).await,
        next_event(&mut stuck).await,
        next_event(&mut stuck).await,
    ]
    .into();
    assert_eq!(tail.last().unwrap().serial, r.serial);
    verify_chain(&tail, full.len() as u64 + 1, full.last().unwrap().hash).unwrap();
    eprintln!("1000 issuances with a stuck subscriber: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_subscriber_is_fed_from_the_store_without_loss() {
    let ca = Arc::new(TestCa::start().await);
    let auditor = ca
        .enroll("auditor", AUDITOR, &["lanyard:auditor"], 600)
        .await;
    let before = ca.audit_log().await;
    let head = before.last().unwrap().clone();
    let mut sub = subscribe(
        small_window_channel(ca.addr, &auditor).await,
        head.seq + 1,
        true,
        &[],
        "",
    )
    .await
    .unwrap();

    // Phase 1: the subscriber stalls while far more than the live buffer is issued. At most a
    // few hundred events can sit in its send path, so its live receiver must lag past 4096.
    let stalled = LIVE_BUFFER + 1500;
    let mut serials = issue_many(&ca, stalled, 12).await;
    // `issue_many` mints a token and enrolls a credential first: 3 more events per call.
    let phase1 = stalled + 3;

    // Phase 2: it reads slowly while issuance goes on, so it must catch up from the store and
    // then hand over to the live feed without a gap or a repeat.
    let more = 1000;
    let load = {
        let ca = ca.clone();
        tokio::spawn(async move { issue_many(&ca, more, 4).await })
    };
    let total = phase1 + more + 3;
    let mut got = Vec::with_capacity(total as usize);
    while (got.len() as u64) < total {
        got.push(next_event(&mut sub).await);
        if got.len() % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    serials.extend(load.await.unwrap());
    assert_quiet(&mut sub).await;

    assert_eq!(
        seqs(&got),
        (head.seq + 1..=head.seq + total).collect::<Vec<_>>()
    );
    verify_chain(&got, head.seq + 1, head.hash).expect("the chain verifies across the catch-up");
    assert_eq!(got, ca.audit_log().await[head.seq as usize..]);
    let logged: HashSet<&str> = got.iter().map(|r| r.serial.as_str()).collect();
    assert!(serials.iter().all(|s| logged.contains(s.as_str())));
}

// === authorization ===

#[tokio::test(flavor = "multi_thread")]
async fn only_auditors_and_admins_may_subscribe() {
    let ca = TestCa::start().await;
    for follow in [false, true] {
        let err = subscribe(ca.anon_channel().await, 1, follow, &[], "")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("client certificate"), "{err:?}");
    }
    let workload = ca.enroll("api", API, &["db-read"], 600).await;
    let err = subscribe(ca.channel_as(&workload).await, 1, true, &[], "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("lanyard:auditor"), "{err:?}");
    // The auditor identity without the role is no auditor.
    let roleless = ca.enroll("roleless", AUDITOR, &[], 600).await;
    assert!(
        Credential::load(&roleless, &RolesOid::default())
            .unwrap()
            .svid
            .roles
            .is_empty()
    );
    let err = subscribe(ca.channel_as(&roleless).await, 1, false, &[], "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let auditor = ca
        .enroll("auditor", AUDITOR, &["lanyard:auditor"], 600)
        .await;
    let got = drain_audit(
        subscribe(ca.channel_as(&auditor).await, 1, false, &[], "")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got, ca.audit_log().await);

    // A revoked auditor certificate is refused.
    let serial = Credential::load(&auditor, &RolesOid::default())
        .unwrap()
        .svid
        .serial
        .to_hex();
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Serial(serial.clone())),
            reason: "laptop lost".into(),
            lift: false,
        })
        .await
        .unwrap();
    let err = subscribe(ca.channel_as(&auditor).await, 1, false, &[], "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&serial), "{err:?}");
}

// === durability across kill -9 ===

/// A `lanyard serve` child process, SIGKILLed when dropped (also on panic).
struct ServeProcess(std::process::Child);

impl ServeProcess {
    /// Starts the real binary on 127.0.0.1:0 and waits for `<data>/serve.addr`.
    async fn start(config: &Path, data: &Path, log: &Path) -> (Self, String) {
        let addr_file = data.join("serve.addr");
        let _ = std::fs::remove_file(&addr_file);
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = std::process::Command::new(lanyard_bin())
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .env("LANYARD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut p = Self(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                return (p, a.trim().to_string());
            }
            if let Some(status) = p.0.try_wait().unwrap() {
                panic!(
                    "lanyard serve exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect_as(addr: &str, dir: Option<&Path>, bundle_dir: &Path) -> Channel {
    let bundle = Credential::load(bundle_dir, &RolesOid::default())
        .unwrap()
        .bundle;
    let slot = dir.map(|d| {
        Credential::load(d, &RolesOid::default())
            .unwrap()
            .slot()
            .unwrap()
    });
    connect(addr, ServerTrust::Bundle(bundle), slot, RolesOid::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_certificate_handed_out_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("lanyard.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\nmin_ttl = \"1s\"\n{}",
            common::POLICY
        ),
    )
    .unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("serve.log");
    let admin = data.join("admin");
    let (mut server, addr) = ServeProcess::start(&config, &data, &log).await;

    let token = AdminClient::new(connect_as(&addr, Some(&admin), &admin).await)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: "spiffe://example.org/ns/prod/*".into(),
            roles: vec![],
            max_ttl_seconds: 600,
            expires_in_seconds: 0,
            uses: 100_000,
        })
        .await
        .unwrap()
        .into_inner()
        .token;

    // Eight clients, each on its own connection, issue as fast as they can and keep every
    // serial they were handed, until the server dies under them. Half redeem the token each
    // time (a token use and a transaction in sled) for the first 150 certificates; half renew
    // on a kept mTLS connection (a journaled group, durable through the store's write-ahead
    // log alone once no token use makes the flush write sled's log too).
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for i in 0..8 {
        let ch = connect_as(&addr, None, &admin).await;
        let (token, received) = (token.clone(), received.clone());
        let (addr, admin, dir) = (
            addr.clone(),
            admin.clone(),
            tmp.path().join(format!("c{i}")),
        );
        clients.push(tokio::spawn(async move {
            let id = format!("spiffe://example.org/ns/prod/load-{i}");
            let key = KeyPair::generate().unwrap();
            let csr = csr_for(&SpiffeId::parse(&id).unwrap(), &key).unwrap();
            let ch = if i % 2 == 1 {
                let first = issue(&ch, &token, &csr).await.unwrap();
                received.lock().unwrap().push(first.serial.clone());
                write_response(&dir, &first, &key);
                connect_as(&addr, Some(&dir), &admin).await
            } else {
                ch
            };
            // Runs until the server is killed under it.
            loop {
                let r = if i % 2 == 1 {
                    renew(&ch, &csr).await
                } else if received.lock().unwrap().len() < 150 {
                    issue(&ch, &token, &csr).await
                } else {
                    break;
                };
                let Ok(r) = r else { break };
                received.lock().unwrap().push(r.serial);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.lock().unwrap().len() < 400 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    // The renewals after the token issuances stopped were made durable by the store's
    // write-ahead log alone (sled writes its own log out lazily).
    let wal_bytes: u64 = ["lanyard-wal.0", "lanyard-wal.1"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join("store").join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(
        wal_bytes > 0,
        "the renewals went through the write-ahead log"
    );
    for c in clients {
        tokio::time::timeout(Duration::from_secs(15), c)
            .await
            .expect("clients notice the crash")
            .unwrap();
    }
    let received = std::mem::take(&mut *received.lock().unwrap());
    assert!(received.len() >= 400);

    // Same data dir, new process.
    let (_server, addr) = ServeProcess::start(&config, &data, &log).await;
    let admin_ch = connect_as(&addr, Some(&admin), &admin).await;
    let after = issue(
        &connect_as(&addr, None, &admin).await,
        &token,
        &csr("spiffe://example.org/ns/prod/after"),
    )
    .await
    .expect("the restarted CA issues");
    let events = drain_audit(subscribe(admin_ch, 1, false, &[], "").await.unwrap()).await;
    assert_eq!(
        seqs(&events),
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "seq has no gaps"
    );
    verify_chain(&events, 1, GENESIS_HASH).expect("the chain verifies across the crash");
    let issued: HashSet<&str> = events
        .iter()
        .filter(|r| r.kind == "issued" || r.kind == "renewed")
        .map(|r| r.serial.as_str())
        .collect();
    let missing: Vec<&String> = received
        .iter()
        .filter(|s| !issued.contains(s.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} certificates handed out have no `issued` event: {missing:?}",
        missing.len(),
        received.len()
    );
    assert!(issued.contains(after.serial.as_str()));
    assert_eq!(
        events.iter().filter(|r| r.kind == "server_started").count(),
        2
    );
    eprintln!(
        "kill -9 after {} certificates; {} events after restart",
        received.len(),
        events.len()
    );
}

// === the CLI ===

async fn lanyard(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(lanyard_bin())
        .args(args)
        .env_remove("LANYARD_SERVER")
        .env_remove("LANYARD_CREDENTIAL")
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_export_verifies_and_tampering_is_named() {
    let ca = TestCa::start().await;
    let api = ca.enroll("api", API, &["db-read"], 600).await;
    ca.renew(&api, 60).await.unwrap();
    let server = ca.server();
    let admin = ca.admin_dir();
    let conn = [
        "--server",
        server.as_str(),
        "--credential",
        admin.to_str().unwrap(),
    ];

    let out = lanyard(&[&["audit", "tail", "--json"][..], &conn[..]].concat()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8(out.stdout).unwrap();
    let parsed: Vec<AuditRecord> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let log = ca.audit_log().await;
    assert_eq!(parsed, log, "the export is the log, one JSON object a line");
    let file = ca.dir.path().join("export.jsonl");
    std::fs::write(&file, &export).unwrap();

    let out = lanyard(&["audit", "verify", "--file", file.to_str().unwrap()]).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{} events, chain intact\n", log.len())
    );
    let out = lanyard(&[&["audit", "verify"][..], &conn[..]].concat()).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{} events, chain intact\n", log.len())
    );

    // Change one role in one line: verify fails and names that event.
    let lines: Vec<&str> = export.lines().collect();
    let victim = log
        .iter()
        .position(|r| r.kind == "issued" && r.roles == ["db-read"])
        .unwrap();
    let mut tampered = lines.clone();
    let edited = lines[victim].replace("\"db-read\"", "\"deploy\"");
    assert_ne!(edited, lines[victim]);
    tampered[victim] = &edited;
    let bad = ca.dir.path().join("tampered.jsonl");
    std::fs::write(&bad, tampered.join("\n")).unwrap();
    let out = lanyard(&["audit", "verify", "--file", bad.to_str().unwrap()]).await;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("event {} was altered", log[victim].seq)),
        "{said}"
    );

    // Drop a line: the gap is named.
    let mut gapped = lines.clone();
    gapped.remove(2);
    std::fs::write(&bad, gapped.join("\n")).unwrap();
    let out = lanyard(&["audit", "verify", "--file", bad.to_str().unwrap()]).await;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("expected seq 3, found 4"), "{said}");
}

/// `audit export --prune` deletes the archived events behind a checkpoint: subscribing below it
/// is FAILED_PRECONDITION naming the boundary, `audit verify --archive` checks archive + live log
/// as one chain, the prune is an admin-only `audit_archived` event, and a wrong archive deletes
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn cli_export_prune_deletes_archived_events_behind_a_checkpoint() {
    let ca = TestCa::start().await;
    let api = ca.enroll("api", API, &["db-read"], 600).await;
    ca.renew(&api, 60).await.unwrap();
    let before = ca.audit_log().await;
    assert!(before.len() > 4, "{before:?}");
    let server = ca.server();
    let admin = ca.admin_dir();
    let conn = [
        "--server",
        server.as_str(),
        "--credential",
        admin.to_str().unwrap(),
    ];
    let archive = ca.dir.path().join("a1.jsonl");
    let out = lanyard(
        &[
            &[
                "audit",
                "export",
                "--out",
                archive.to_str().unwrap(),
                "--through-seq",
                "3",
                "--prune",
            ][..],
            &conn[..],
        ]
        .concat(),
    )
    .await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("pruned 3 events"), "{said}");

    // Below the checkpoint: refused, naming it.
    let err = AuditClient::new(ca.admin_channel().await)
        .subscribe(pb::SubscribeRequest {
            from_seq: 2,
            follow: false,
            kinds: vec![],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("up to #3 are archived") && err.message().contains("#4"),
        "{err:?}"
    );
    // Plain verify cannot see the start of the chain any more; with the archive it can.
    let out = lanyard(&[&["audit", "verify"][..], &conn[..]].concat()).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--archive"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lanyard(
        &[
            &["audit", "verify", "--archive", archive.to_str().unwrap()][..],
            &conn[..],
        ]
        .concat(),
    )
    .await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("(3 archived,") && said.contains("chain intact"),
        "{said}"
    );

    // The prune is on the chain, by the admin.
    let mut live = AuditClient::new(ca.admin_channel().await)
        .subscribe(pb::SubscribeRequest {
            from_seq: 4,
            follow: false,
            kinds: vec![],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(ev) = live.message().await.unwrap() {
        events.push(from_proto(ev).unwrap());
    }
    verify_chain(&events, 4, before[2].hash).unwrap();
    let pruned = events.iter().find(|r| r.kind == "audit_archived").unwrap();
    assert_eq!(pruned.actor, ADMIN);
    assert!(pruned.reason.contains("up to #3"), "{pruned:?}");

    // Not an admin: refused. A hash that is not the log's: refused, audited, nothing deleted.
    let err = AuditClient::new(ca.channel_as(&api).await)
        .prune(pb::PruneRequest {
            through_seq: 4,
            hash: before[3].hash.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = AuditClient::new(ca.admin_channel().await)
        .prune(pb::PruneRequest {
            through_seq: 4,
            hash: [7; 32].to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not of this log"), "{err:?}");
    let err = AuditClient::new(ca.admin_channel().await)
        .prune(pb::PruneRequest {
            through_seq: 4,
            hash: vec![1, 2],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let after = drain_audit(
        AuditClient::new(ca.admin_channel().await)
            .subscribe(pb::SubscribeRequest {
                from_seq: 4,
                follow: false,
                kinds: vec![],
                spiffe_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(after[0].seq, 4, "event #4 is still stored");
    assert!(
        after
            .iter()
            .any(|r| r.kind == "denied" && r.reason.contains("audit prune refused")),
        "the refused prune is audited"
    );
}
