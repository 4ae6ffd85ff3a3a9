//! Exactly-once and one-chain guarantees across replicas: three `EtcdStore`s (each talking to a
//! different member first) over one real 3-member etcd cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use lanyard::audit::{AuditError, AuditLog, Event, GENESIS_HASH, Kind, verify_chain};
use lanyard::store::{
    AccessRecord, Consume, EtcdConfig, EtcdStore, Guard, RECORD_VERSION, Store, TokenRecord, Write,
};

fn replicas(cluster: &EtcdCluster, prefix: &str) -> Vec<Arc<EtcdStore>> {
    (0..3)
        .map(|i| {
            let cfg = EtcdConfig::parse(&cluster.url_from(i), prefix).unwrap();
            Arc::new(EtcdStore::open(cfg).unwrap())
        })
        .collect()
}

fn token(id: &str, uses: u32) -> TokenRecord {
    TokenRecord {
        v: RECORD_VERSION,
        id: id.into(),
        secret_hash: [1; 32],
        spiffe_id: "spiffe://example.org/w".into(),
        roles: vec![],
        max_ttl: 60,
        expires_at: i64::MAX,
        uses_left: uses,
        created_by: "spiffe://example.org/admin".into(),
        revoked: None,
    }
}

fn pending(id: &str) -> AccessRecord {
    AccessRecord {
        v: RECORD_VERSION,
        id: id.into(),
        spiffe_id: "spiffe://example.org/w".into(),
        roles: vec!["deploy".into()],
        duration_secs: 60,
        reason: "INC-7".into(),
        requester: "spiffe://example.org/r".into(),
        created_at: 1,
        state: "pending".into(),
        approvals: vec![],
        approvals_needed: 1,
        expires_at: i64::MAX / 2,
        granted_at: 0,
        closed_by: String::new(),
        close_reason: String::new(),
        prune_at: i64::MAX / 2,
    }
}

/// Polls `f` until it holds (the other replicas' mirrors follow within milliseconds).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn fifty_redemptions_over_three_replicas_have_one_winner() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/token/");
    stores[0]
        .commit(&[], &[Write::PutToken(token("once", 1))])
        .unwrap();
    let racers: Vec<_> = (0..50)
        .map(|n| {
            let s = stores[n % 3].clone();
            std::thread::spawn(move || s.consume_token("once", 10).unwrap())
        })
        .collect();
    let outcomes: Vec<Consume> = racers.into_iter().map(|h| h.join().unwrap()).collect();
    let won = outcomes
        .iter()
        .filter(|o| matches!(o, Consume::Won(_)))
        .count();
    let used = outcomes
        .iter()
        .filter(|o| **o == Consume::AlreadyUsed)
        .count();
    assert_eq!((won, used), (1, 49), "{outcomes:?}");
    for s in &stores {
        eventually("use visible on every replica", || {
            s.token("once").unwrap().is_some_and(|t| t.uses_left == 0)
        });
    }
}

#[tokio::test]
async fn two_approvers_on_two_replicas_one_winner() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/access/");
    let logs: Vec<AuditLog> = stores
        .iter()
        .map(|s| AuditLog::start(s.clone() as Arc<dyn Store>).unwrap())
        .collect();
    let req = pending("req");
    logs[0]
        .record(
            Event::new(Kind::AccessRequested, "spiffe://example.org/r"),
            vec![Write::PutAccess(req.clone())],
        )
        .await
        .unwrap();
    eventually("request on replica 1", || {
        stores[1].access_all().unwrap().len() == 1
    });
    let approve = |log: &AuditLog, approver: &str| {
        let mut granted = req.clone();
        granted.state = "granted".into();
        granted.closed_by = approver.into();
        let log = log.clone();
        let approver = approver.to_string();
        let req = req.clone();
        async move {
            log.record(
                Event::new(Kind::AccessGranted, approver),
                vec![
                    Write::Guard(Guard::Access {
                        id: "req".into(),
                        expect: Some(Box::new(req)),
                    }),
                    Write::PutAccess(granted),
                ],
            )
            .await
        }
    };
    let (a, b) = tokio::join!(approve(&logs[0], "alice"), approve(&logs[1], "bob"));
    let winners = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{a:?} {b:?}");
    let loser = if a.is_ok() { &b } else { &a };
    assert!(matches!(loser, Err(AuditError::Conflict)), "{loser:?}");
    let winner = if a.is_ok() { "alice" } else { "bob" };
    for s in &stores {
        eventually("one grant everywhere", || {
            s.access_all().unwrap()[0].closed_by == winner
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_append_one_gapless_chain() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/chain/");
    let logs: Vec<AuditLog> = stores
        .iter()
        .map(|s| AuditLog::start(s.clone() as Arc<dyn Store>).unwrap())
        .collect();
    // A follower on replica 2 must see every replica's records, in order.
    let mut live = logs[2].live();
    let (groups0, events0) = AuditLog::commit_counters();
    let trips0 = EtcdStore::requests_total();
    const PER: usize = 100;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (r, log) in logs.iter().enumerate() {
        for n in 0..PER {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.record(
                    Event::new(Kind::Renewed, format!("replica-{r}"))
                        .subject(format!("spiffe://example.org/w{n}")),
                    vec![],
                )
                .await
                .unwrap()
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let (groups1, events1) = AuditLog::commit_counters();
    let trips1 = EtcdStore::requests_total();
    let all = stores[1].read_audit(1, 10_000).unwrap();
    assert_eq!(all.len(), 3 * PER);
    verify_chain(&all, 1, GENESIS_HASH).unwrap();
    for a in &acked {
        assert_eq!(
            &all[a.seq as usize - 1],
            a,
            "acknowledged record missing or changed"
        );
    }
    let mut seen = 0;
    while seen < 3 * PER {
        let c = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("live feed stalled")
            .unwrap();
        seen += 1;
        assert_eq!(c.record.seq, seen as u64, "live feed out of order");
    }
    eprintln!(
        "3 replicas x {PER} appends: {:?}, {} events in {} groups (factor {:.1}), {:.2} etcd requests per event",
        elapsed,
        events1 - events0,
        groups1 - groups0,
        (events1 - events0) as f64 / (groups1 - groups0).max(1) as f64,
        (trips1 - trips0) as f64 / (3 * PER) as f64,
    );
}

#[tokio::test]
async fn ambiguous_failures_neither_duplicate_nor_lose() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/ambiguous/");
    stores[0]
        .commit(&[], &[Write::PutToken(token("multi", 3))])
        .unwrap();
    // The consume is applied, but the caller hears a timeout: the nonce shows it was ours.
    stores[1].danger_inject_ambiguous(1);
    assert!(
        matches!(stores[1].consume_token("multi", 10).unwrap(), Consume::Won(t) if t.uses_left == 3)
    );
    eventually("exactly one use spent", || {
        stores[2]
            .token("multi")
            .unwrap()
            .is_some_and(|t| t.uses_left == 2)
    });
    // The same for an audit append: recorded once, acknowledged.
    let log = AuditLog::start(stores[2].clone() as Arc<dyn Store>).unwrap();
    log.record(Event::new(Kind::ServerStarted, "lanyard"), vec![])
        .await
        .unwrap();
    stores[2].danger_inject_ambiguous(1);
    let rec = log
        .record(Event::new(Kind::PolicyReloaded, "lanyard"), vec![])
        .await
        .unwrap();
    let next = log
        .record(Event::new(Kind::ServerStarted, "lanyard"), vec![])
        .await
        .unwrap();
    assert_eq!((rec.seq, next.seq), (2, 3));
    let all = stores[0].read_audit(1, 100).unwrap();
    assert_eq!(all.len(), 3);
    verify_chain(&all, 1, GENESIS_HASH).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_loses_no_acknowledged_append() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/leader/");
    let logs: Vec<AuditLog> = stores
        .iter()
        .map(|s| AuditLog::start(s.clone() as Arc<dyn Store>).unwrap())
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (r, log) in logs.iter().enumerate() {
        let (log, stop) = (log.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed, mut worst) = (Vec::new(), 0, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                match log
                    .record(Event::new(Kind::Renewed, format!("replica-{r}")), vec![])
                    .await
                {
                    Ok(rec) => acked.push(rec),
                    Err(_) => failed += 1,
                }
                worst = worst.max(t.elapsed());
            }
            (acked, failed, worst)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut acked = Vec::new();
    let (mut failed, mut worst) = (0, Duration::ZERO);
    for w in writers {
        let (a, f, s) = w.await.unwrap();
        acked.extend(a);
        failed += f;
        worst = worst.max(s);
    }
    let survivor = (leader + 1) % 3;
    let all = stores[survivor].read_audit(1, 100_000).unwrap();
    verify_chain(&all, 1, GENESIS_HASH).unwrap();
    for a in &acked {
        assert_eq!(&all[a.seq as usize - 1], a, "acknowledged append lost");
    }
    eprintln!(
        "leader {leader} killed: {} acknowledged, {failed} failed, chain {} long, worst append {worst:?}",
        acked.len(),
        all.len()
    );
    assert!(acked.len() > 10);
}

/// `lanyard serve --store etcd://...` keeps its audit chain in etcd under the trust domain's
/// default prefix, where another replica's store reads it.
#[test]
fn serve_with_store_etcd_writes_its_chain_to_etcd() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("serve.log");
    // The CA key goes to etcd, sealed under a key-encryption key.
    let kek = dir.path().join("kek");
    lanyard::ca::Kek::generate(&kek).unwrap();
    let mut cmd = common::lanyard_cmd();
    cmd.args([
        "serve",
        "--trust-domain",
        "example.org",
        "--listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(&data)
    .args(["--store", &cluster.url_from(0)])
    .arg("--kek-file")
    .arg(&kek)
    .env("LANYARD_LOG", "warn");
    let _serve = common::ChildGuard::spawn("lanyard serve", &mut cmd, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("serve.addr").exists() {
        assert!(
            Instant::now() < deadline,
            "serve did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !data.join("store").exists(),
        "no sled store with --store etcd"
    );
    let cfg = EtcdConfig::parse(&cluster.url_from(0), "/lanyard/example.org/").unwrap();
    let other = EtcdStore::open(cfg).unwrap();
    let chain = other.read_audit(1, 1000).unwrap();
    verify_chain(&chain, 1, GENESIS_HASH).unwrap();
    assert!(
        chain.iter().any(|r| r.kind == "server_started"),
        "{:?}",
        chain.iter().map(|r| &r.kind).collect::<Vec<_>>()
    );
}

/// A replica whose watch was away while etcd compacted past it reloads its copy and publishes
/// the records it missed, in order.
#[tokio::test]
async fn a_replica_resyncs_after_compaction() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let port0 = cluster.members[0].client_port;
    // Replica A talks to member 0 only; B to the others.
    let a = Arc::new(
        EtcdStore::open(
            EtcdConfig::parse(&format!("etcd://127.0.0.1:{port0}"), "/ha/compact/").unwrap(),
        )
        .unwrap(),
    );
    let b_url = format!(
        "etcd://127.0.0.1:{},127.0.0.1:{}",
        cluster.members[1].client_port, cluster.members[2].client_port
    );
    let b = Arc::new(EtcdStore::open(EtcdConfig::parse(&b_url, "/ha/compact/").unwrap()).unwrap());
    let log_a = AuditLog::start(a.clone() as Arc<dyn Store>).unwrap();
    let log_b = AuditLog::start(b.clone() as Arc<dyn Store>).unwrap();
    log_a
        .record(Event::new(Kind::ServerStarted, "a"), vec![])
        .await
        .unwrap();
    let mut live_a = log_a.live();
    cluster.kill(0);
    let revoked = lanyard::store::RevocationRecord {
        v: RECORD_VERSION,
        rev: 0,
        serial: "0a0b".into(),
        spiffe_id: "spiffe://example.org/w".into(),
        identity_rule: false,
        before: 0,
        reason: "while away".into(),
        revoked_at: 1,
        expires_at: i64::MAX / 2,
        blocked: false,
        renewable: false,
        origin: String::new(),
    };
    for n in 0..20 {
        let writes = if n == 10 {
            vec![Write::PutRevocation(revoked.clone())]
        } else {
            vec![]
        };
        log_b
            .record(Event::new(Kind::Renewed, "b"), writes)
            .await
            .unwrap();
    }
    let resyncs = EtcdStore::resyncs_total();
    cluster.compact(1);
    cluster.restart(0);
    eventually("A sees the revocation made while it was away", || {
        a.revoked_serial("0a0b").unwrap().is_some()
    });
    for seq in 2..=21 {
        let c = tokio::time::timeout(Duration::from_secs(10), live_a.recv())
            .await
            .expect("missed records published")
            .unwrap();
        assert_eq!(c.record.seq, seq);
        assert_eq!(c.revocations.len(), usize::from(seq == 12), "seq {seq}");
    }
    assert!(
        EtcdStore::resyncs_total() > resyncs,
        "the watch went through a resync"
    );
    // A appends after B's records: one chain.
    let rec = log_a
        .record(Event::new(Kind::ServerStarted, "a"), vec![])
        .await
        .unwrap();
    assert_eq!(rec.seq, 22);
    verify_chain(&b.read_audit(1, 100).unwrap(), 1, GENESIS_HASH).unwrap();
}

/// A JWT presented to three replicas at once is spent once: each replica's commit writes the
/// spent-token record behind `Guard::TokenAbsent`, so exactly one commit per JWT wins and the
/// others fail their guard (a plain `PutToken` would let all three overwrite and succeed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_jwt_is_spent_once_across_three_replicas() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/jwt/");
    let logs: Vec<AuditLog> = stores
        .iter()
        .map(|s| AuditLog::start(s.clone() as Arc<dyn Store>).unwrap())
        .collect();
    for round in 0..10 {
        let id = format!("jwt-{round:02}");
        let spend = |log: &AuditLog| {
            let log = log.clone();
            let mut spent = token(&id, 0);
            spent.id = id.clone();
            async move {
                log.record(
                    Event::new(Kind::Issued, "attestor:ci"),
                    vec![
                        Write::Guard(Guard::TokenAbsent {
                            id: spent.id.clone(),
                        }),
                        Write::PutToken(spent),
                    ],
                )
                .await
            }
        };
        let (a, b, c) = tokio::join!(spend(&logs[0]), spend(&logs[1]), spend(&logs[2]));
        let results = [a, b, c];
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        assert!(
            results
                .iter()
                .filter(|r| r.is_err())
                .all(|r| matches!(r, Err(AuditError::Conflict))),
            "{results:?}"
        );
    }
    let all = stores[1].read_audit(1, 100).unwrap();
    assert_eq!(all.len(), 10, "one issuance per JWT on the chain");
    verify_chain(&all, 1, GENESIS_HASH).unwrap();
}

/// `Store::health` on the 3-member cluster: every member with its client URL, the leader that
/// etcd's own HTTP gateway names, a raft term, a database size and no alarms.
#[test]
fn health_names_the_members_and_the_leader() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/health/");
    let h = stores[2].health().unwrap();
    assert_eq!(h.members.len(), 3, "{h:?}");
    let mut urls: Vec<String> = h
        .members
        .iter()
        .flat_map(|m| {
            m.client_urls
                .iter()
                .map(|u| u.trim_start_matches("http://").to_string())
        })
        .collect();
    urls.sort();
    let mut want = cluster.endpoints();
    want.sort();
    assert_eq!(urls, want, "{h:?}");
    let leader_at = cluster.leader().expect("a leader");
    let leader = h
        .members
        .iter()
        .find(|m| m.id == h.leader)
        .expect("leader is a member");
    assert!(
        leader.client_urls[0].ends_with(&cluster.endpoints()[leader_at]),
        "{h:?} vs member {leader_at}"
    );
    assert!(h.raft_term > 0 && h.size_bytes > 0, "{h:?}");
    assert!(h.alarms.is_empty(), "{h:?}");
    assert!(h.location.contains("prefix /ha/health/"), "{h:?}");
}

/// A 60-use token redeemed 60 times at once over three replicas (a fleet bootstrapping from one
/// token): every redemption wins its use. A lost compare to a racer that took a use is progress,
/// not a failed attempt, so the last racers do not run out of attempts (they used to, past ~32).
#[test]
fn sixty_redemptions_of_a_sixty_use_token_all_win() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let stores = replicas(&cluster, "/ha/multi/");
    stores[0]
        .commit(&[], &[Write::PutToken(token("fleet", 60))])
        .unwrap();
    let racers: Vec<_> = (0..60)
        .map(|n| {
            let s = stores[n % 3].clone();
            std::thread::spawn(move || s.consume_token("fleet", 10))
        })
        .collect();
    let outcomes: Vec<_> = racers.into_iter().map(|h| h.join().unwrap()).collect();
    let won = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Consume::Won(_))))
        .count();
    assert_eq!(won, 60, "{outcomes:?}");
    eventually("every use spent", || {
        stores[1]
            .token("fleet")
            .unwrap()
            .is_some_and(|t| t.uses_left == 0)
    });
}

/// A reopened store loads every revocation of a collection far larger than a page (etcd ranges
/// are read in parts cut by key once they hold many pages, several parts at once: decisions 107
/// and 121), in rev order, and reads the audit log back whole a bounded range at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_loads_every_revocation_of_a_large_collection() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let cfg = EtcdConfig::parse(&cluster.url_from(0), "/big/").unwrap();
    let store: Arc<dyn Store> = Arc::new(EtcdStore::open(cfg.clone()).unwrap());
    let log = AuditLog::start(store.clone()).unwrap();
    let now = lanyard::tls::unix_now();
    let mut serials = Vec::new();
    // 12,000 entries in 120 events: three times the size at which a range is halved.
    for e in 0..120u32 {
        let writes: Vec<Write> = (0..100u32)
            .map(|i| {
                // Serials whose first digit varies, unlike the CA's (which all start 01): the
                // load's first cut then spreads them over parts read at once, so this checks
                // that the parts come back in key order.
                let serial = lanyard::ca::Serial::from_bytes(&rand::random::<[u8; 16]>()).to_hex();
                serials.push(serial.clone());
                Write::PutRevocation(lanyard::store::RevocationRecord {
                    v: RECORD_VERSION,
                    rev: 0,
                    serial,
                    spiffe_id: format!("spiffe://example.org/w{}", (e * 100 + i) % 7),
                    identity_rule: false,
                    before: 0,
                    reason: "bulk".into(),
                    revoked_at: now,
                    expires_at: now + 600,
                    blocked: false,
                    renewable: false,
                    origin: String::new(),
                })
            })
            .collect();
        log.record(
            Event::new(Kind::Revoked, "spiffe://example.org/admin"),
            writes,
        )
        .await
        .unwrap();
    }
    drop(log);

    let again = EtcdStore::open(cfg).unwrap();
    assert_eq!(again.stats().unwrap().revoked_serials, serials.len());
    for s in &serials {
        assert!(again.revoked_serial(s).unwrap().is_some(), "{s} loaded");
    }
    let all = again.revocations_since(0).unwrap();
    assert_eq!(all.len(), serials.len());
    assert!(all.windows(2).all(|w| w[0].rev <= w[1].rev), "rev order");
    // The audit log, read back in bounded ranges: every record, gapless, one chain.
    let records = again.read_audit(1, 1000).unwrap();
    assert_eq!(records.len(), 120);
    assert!(
        records
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == i as u64 + 1)
    );
    verify_chain(&records, 1, GENESIS_HASH).unwrap();
    assert_eq!(again.read_audit(50, 10).unwrap().len(), 10);
    assert_eq!(again.read_audit(115, 10).unwrap().len(), 6);
}

/// Decision 124: a store writes audit, revocation and issued records in the binary layout only while
/// every registered replica says it reads them (an entry from an older release, or one that
/// does not decode, keeps JSON); it reads both layouts, and a replica that followed by watch
/// and one loaded afresh agree on records of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_turn_binary_only_while_every_registered_replica_reads_them() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let cfg = EtcdConfig::parse(&cluster.url_from(0), "/layout/").unwrap();
    let store = Arc::new(EtcdStore::open(cfg.clone()).unwrap());
    let follower = EtcdStore::open(cfg.clone()).unwrap();
    let entry = |id: &str, binary: Option<bool>| {
        let mut e = serde_json::json!({
            "id": id, "address": "10.0.0.1:8443", "policy_sha256": "00",
            "heartbeat": lanyard::tls::unix_now(), "started_at": 1, "version": "0.1.0",
        });
        if let Some(b) = binary {
            e["binary_records"] = b.into();
        }
        serde_json::to_vec(&e).unwrap()
    };
    // One replica of this release and one from before the field existed.
    assert!(
        store
            .shared_put("replicas/new", &entry("new", Some(true)), None)
            .unwrap()
    );
    assert!(
        store
            .shared_put("replicas/old", &entry("old", None), None)
            .unwrap()
    );
    let log = AuditLog::start(store.clone() as Arc<dyn Store>).unwrap();
    let now = lanyard::tls::unix_now();
    let mut seq = 0u64;
    let mut revoke = async |store: &EtcdStore| {
        let serial = lanyard::ca::Serial::from_bytes(&rand::random::<[u8; 16]>()).to_hex();
        let rec = lanyard::store::RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial: serial.clone(),
            spiffe_id: "spiffe://example.org/w".into(),
            identity_rule: false,
            before: 0,
            reason: "layout".into(),
            revoked_at: now,
            expires_at: now + 600,
            blocked: false,
            renewable: false,
            origin: String::new(),
        };
        let issued = lanyard::store::IssuedRecord {
            v: RECORD_VERSION,
            spiffe_id: "spiffe://example.org/w".into(),
            serial: serial.clone(),
            roles: vec!["db".into()],
            not_after: now + 600,
        };
        log.record(
            Event::new(Kind::Revoked, "spiffe://example.org/admin"),
            vec![
                Write::PutIssued(issued, now + 900),
                Write::PutRevocation(rec),
            ],
        )
        .await
        .unwrap();
        seq += 1;
        let value = store
            .raw_value(&format!("revoked/{serial}"))
            .unwrap()
            .unwrap();
        let record = store
            .raw_value(&format!("audit/rec/{seq:016x}"))
            .unwrap()
            .unwrap();
        let issued = store
            .raw_value(&format!("issued/{serial}"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (value[0] == b'{', issued[0] == b'{'),
            (record[0] == b'{', record[0] == b'{'),
            "all three records in one layout"
        );
        // What `lanyard status` shows of the store: the layout it writes now.
        assert_eq!(store.health().unwrap().binary_records, value[0] != b'{');
        (serial, value[0] != b'{')
    };
    let (json, binary) = revoke(&store).await;
    assert!(!binary, "an older replica is registered: JSON");

    // The old replica comes back upgraded: every entry now reads binary.
    let v = store.shared_get("replicas/old").unwrap().unwrap().version;
    assert!(
        store
            .shared_put("replicas/old", &entry("old", Some(true)), Some(v))
            .unwrap()
    );
    let (bin, binary) = revoke(&store).await;
    assert!(binary, "every registered replica reads binary");

    // An entry that says false, or does not decode, closes it again.
    let v = store.shared_get("replicas/old").unwrap().unwrap().version;
    assert!(
        store
            .shared_put("replicas/old", &entry("old", Some(false)), Some(v))
            .unwrap()
    );
    assert!(!revoke(&store).await.1, "binary_records: false");
    let v = store.shared_get("replicas/old").unwrap().unwrap().version;
    assert!(
        store
            .shared_put("replicas/old", b"not json", Some(v))
            .unwrap()
    );
    assert!(!revoke(&store).await.1, "an undecodable entry");
    let v = store.shared_get("replicas/old").unwrap().unwrap().version;
    assert!(store.shared_delete("replicas/old", Some(v)).unwrap());
    assert!(revoke(&store).await.1, "the entry deleted (a clean stop)");

    // Both layouts are read: by the replica that followed by watch, and by a fresh load.
    let fresh = EtcdStore::open(cfg).unwrap();
    for s in [&json, &bin] {
        let want = store.revoked_serial(s).unwrap().expect("revoked");
        eventually("the follower has both", || {
            follower.revoked_serial(s).unwrap().as_ref() == Some(&want)
        });
        assert_eq!(fresh.revoked_serial(s).unwrap(), Some(want));
        let issued = store.issued(s).unwrap().expect("issued");
        assert_eq!(follower.issued(s).unwrap().as_ref(), Some(&issued));
        assert_eq!(fresh.issued(s).unwrap(), Some(issued));
    }
    assert_eq!(fresh.revocations_since(0).unwrap().len(), 5);
    let records = fresh.read_audit(1, 100).unwrap();
    assert_eq!(records.len(), 5);
    verify_chain(&records, 1, GENESIS_HASH).unwrap();
    assert_eq!(records, follower.read_audit(1, 100).unwrap());
}
