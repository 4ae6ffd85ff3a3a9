//! One conformance suite for every `Store` backend: the same checks run against sled in a temp
//! dir and against a real single-member etcd (each check under its own key prefix).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use lanyard::audit::{AuditLog, Event, GENESIS_HASH, Kind, compute_hash, verify_chain};
use lanyard::store::{
    AccessRecord, AuditRecord, Consume, Enrollment, EtcdConfig, EtcdStore, Guard, IssuedRecord,
    RECORD_VERSION, RevocationRecord, SledStore, Store, StoreError, TokenRecord, Write,
};

fn token(id: &str, uses: u32, expires_at: i64) -> TokenRecord {
    TokenRecord {
        v: RECORD_VERSION,
        id: id.into(),
        secret_hash: [7; 32],
        spiffe_id: "spiffe://example.org/a".into(),
        roles: vec!["r".into()],
        max_ttl: 300,
        expires_at,
        uses_left: uses,
        created_by: "spiffe://example.org/admin".into(),
        revoked: None,
    }
}

fn revocation(serial: &str, id: &str, rev: u64, expires_at: i64) -> RevocationRecord {
    RevocationRecord {
        v: RECORD_VERSION,
        rev,
        serial: serial.into(),
        spiffe_id: id.into(),
        identity_rule: serial.is_empty(),
        before: 100,
        reason: "test".into(),
        revoked_at: 1,
        expires_at,
        blocked: serial.is_empty(),
        renewable: false,
        origin: String::new(),
    }
}

fn access(id: &str, state: &str, prune_at: i64) -> AccessRecord {
    AccessRecord {
        v: RECORD_VERSION,
        id: id.into(),
        spiffe_id: "spiffe://example.org/a".into(),
        roles: vec!["deploy".into()],
        duration_secs: 60,
        reason: "INC-1".into(),
        requester: "spiffe://example.org/r".into(),
        created_at: 1,
        state: state.into(),
        approvals: vec![],
        approvals_needed: 1,
        expires_at: 1000,
        granted_at: 0,
        closed_by: String::new(),
        close_reason: String::new(),
        prune_at,
    }
}

fn issued(id: &str, serial: &str) -> IssuedRecord {
    IssuedRecord {
        v: RECORD_VERSION,
        spiffe_id: id.into(),
        serial: serial.into(),
        roles: vec![],
        not_after: 50,
    }
}

/// `n` records continuing `(seq, prev)`, each with a reason of `pad` bytes.
fn records(from: u64, prev: [u8; 32], n: usize, pad: usize) -> Vec<AuditRecord> {
    let mut prev = prev;
    (0..n as u64)
        .map(|i| {
            let mut r = AuditRecord {
                v: RECORD_VERSION,
                seq: from + i,
                time_ms: 1000 + i as i64,
                kind: "issued".into(),
                actor: "lanyard".into(),
                subject: format!("spiffe://example.org/w{i}"),
                serial: String::new(),
                roles: vec![],
                not_after: 0,
                reason: "x".repeat(pad),
                claimed: String::new(),
                prev_hash: prev,
                hash: [0; 32],
            };
            r.hash = compute_hash(&r);
            prev = r.hash;
            r
        })
        .collect()
}

fn check_tokens(s: &dyn Store) {
    s.commit(
        &[],
        &[
            Write::PutToken(token("t2", 2, 1000)),
            Write::PutToken(token("tx", 1, 5)),
        ],
    )
    .unwrap();
    assert_eq!(s.token("t2").unwrap().unwrap().uses_left, 2);
    let ids: Vec<String> = s.tokens().unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["t2", "tx"]);
    assert!(matches!(s.consume_token("t2", 10).unwrap(), Consume::Won(t) if t.uses_left == 2));
    assert!(matches!(s.consume_token("t2", 10).unwrap(), Consume::Won(t) if t.uses_left == 1));
    assert_eq!(s.consume_token("t2", 10).unwrap(), Consume::AlreadyUsed);
    assert_eq!(s.token("t2").unwrap().unwrap().uses_left, 0);
    assert_eq!(s.consume_token("tx", 10).unwrap(), Consume::Expired);
    assert_eq!(s.consume_token("none", 10).unwrap(), Consume::Missing);
}

fn check_identities(s: &dyn Store) {
    let id = "spiffe://example.org/svc";
    s.commit(
        &[],
        &[
            Write::PutEnrollment(Enrollment {
                v: RECORD_VERSION,
                spiffe_id: id.into(),
                roles: vec!["r".into()],
                max_ttl: 60,
                via: "t".into(),
            }),
            Write::PutIssued(issued(id, "aa"), 100),
            Write::PutIssued(issued(id, "bb"), 300),
            Write::PutIssued(issued("spiffe://example.org/other", "cc"), 300),
        ],
    )
    .unwrap();
    assert_eq!(s.enrollment(id).unwrap().unwrap().max_ttl, 60);
    assert!(s.enrollment("spiffe://example.org/none").unwrap().is_none());
    let mut serials: Vec<String> = s
        .issued_for(id)
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    serials.sort();
    assert_eq!(serials, ["aa", "bb"]);
    assert_eq!(
        s.issued("cc").unwrap().unwrap().spiffe_id,
        "spiffe://example.org/other"
    );
    // Prune drops the issued entry whose prune time passed, and only that.
    assert_eq!(s.prune(200).unwrap(), 1);
    assert!(s.issued("aa").unwrap().is_none());
    let serials: Vec<String> = s
        .issued_for(id)
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(serials, ["bb"]);
}

fn check_revocations(s: &dyn Store) {
    let id = "spiffe://example.org/bad";
    s.commit(
        &[],
        &[
            Write::PutRevocation(revocation("s1", id, 3, 100)),
            Write::PutRevocation(revocation("s2", id, 5, 500)),
            Write::PutRevocation(revocation("", id, 4, 500)),
            Write::PutToken(token("old", 1, 50)),
            Write::PutAccess(access("a-old", "ended", 50)),
        ],
    )
    .unwrap();
    assert_eq!(s.revoked_serial("s1").unwrap().unwrap().rev, 3);
    assert!(s.revoked_serial("zz").unwrap().is_none());
    assert!(s.identity_rule(id).unwrap().unwrap().blocked);
    assert_eq!(s.identity_rules().unwrap().len(), 1);
    let revs: Vec<u64> = s
        .revocations_since(0)
        .unwrap()
        .iter()
        .map(|r| r.rev)
        .collect();
    assert_eq!(revs, [3, 4, 5]);
    let revs: Vec<u64> = s
        .revocations_since(3)
        .unwrap()
        .iter()
        .map(|r| r.rev)
        .collect();
    assert_eq!(revs, [4, 5]);
    // Re-revoking moves the entry to its new rev.
    s.commit(&[], &[Write::PutRevocation(revocation("s1", id, 9, 100))])
        .unwrap();
    let revs: Vec<u64> = s
        .revocations_since(0)
        .unwrap()
        .iter()
        .map(|r| r.rev)
        .collect();
    assert_eq!(revs, [4, 5, 9]);
    let stats = s.stats().unwrap();
    assert_eq!((stats.revoked_serials, stats.identity_rules), (2, 1));
    // s1 (100), the token (50) and the access record (50) are expired at 200.
    assert_eq!(s.prune(200).unwrap(), 3);
    assert!(s.revoked_serial("s1").unwrap().is_none());
    assert!(s.token("old").unwrap().is_none());
    assert!(s.access_all().unwrap().is_empty());
    let revs: Vec<u64> = s
        .revocations_since(0)
        .unwrap()
        .iter()
        .map(|r| r.rev)
        .collect();
    assert_eq!(revs, [4, 5]);
    assert_eq!(s.prune(200).unwrap(), 0);
}

/// Many serial entries of the usual shape (what the in-memory index of sled keeps compactly):
/// every field reads back as written, replaced entries move to their new rev, pruning removes
/// exactly the expired ones, and a store opened again on the same data answers the same.
fn check_revocation_index(open: &dyn Fn(&str) -> Arc<dyn Store>) {
    let entry = |i: u64, rev: u64| RevocationRecord {
        v: RECORD_VERSION,
        rev,
        serial: format!("01{i:030x}"),
        spiffe_id: format!("spiffe://example.org/w{}", i % 7),
        identity_rule: false,
        before: 0,
        reason: format!("reason {}", i % 3),
        revoked_at: 1000 + i as i64,
        expires_at: 2000 + i as i64,
        blocked: false,
        renewable: i % 5 == 0,
        origin: if i % 11 == 0 {
            "b.example".into()
        } else {
            String::new()
        },
    };
    let mut expect: Vec<RevocationRecord> = (0..300).map(|i| entry(i, i + 1)).collect();
    let s = open("index");
    for chunk in expect.chunks(100) {
        let writes: Vec<Write> = chunk.iter().cloned().map(Write::PutRevocation).collect();
        s.commit(&[], &writes).unwrap();
    }
    // Re-revoked with another reason: it moves to the end.
    let again = RevocationRecord {
        reason: "again".into(),
        expires_at: 5000,
        ..entry(5, 400)
    };
    s.commit(&[], &[Write::PutRevocation(again.clone())])
        .unwrap();
    expect.remove(5);
    expect.push(again);
    let rule = RevocationRecord {
        serial: String::new(),
        identity_rule: true,
        blocked: true,
        before: 1500,
        expires_at: i64::MAX,
        ..entry(1, 401)
    };
    s.commit(&[], &[Write::PutRevocation(rule.clone())])
        .unwrap();
    expect.push(rule.clone());
    let check = |s: &dyn Store, expect: &[RevocationRecord]| {
        for e in expect.iter().filter(|e| !e.identity_rule) {
            assert_eq!(s.revoked_serial(&e.serial).unwrap().as_ref(), Some(e));
        }
        assert!(
            s.revoked_serial(&format!("01{:030x}", 999))
                .unwrap()
                .is_none()
        );
        assert_eq!(s.revocations_since(0).unwrap(), expect);
        let tail: Vec<_> = expect.iter().filter(|e| e.rev > 250).cloned().collect();
        assert_eq!(s.revocations_since(250).unwrap(), tail);
        assert_eq!(
            s.identity_rule(&rule.spiffe_id).unwrap().as_ref(),
            Some(&rule)
        );
        assert_eq!(s.stats().unwrap().revoked_serials, expect.len() - 1);
    };
    check(&*s, &expect);
    // Entries 0..100 expire before 2100.
    assert_eq!(s.prune(2100).unwrap(), 99, "100, less the re-revoked one");
    expect.retain(|e| e.expires_at >= 2100);
    check(&*s, &expect);
    drop(s);
    check(&*open("index"), &expect);
}

fn check_guards(s: &dyn Store) {
    let pending = access("req1", "pending", 10_000);
    // Guard on absence, then create.
    s.commit(
        &[],
        &[
            Write::Guard(Guard::Access {
                id: "req1".into(),
                expect: None,
            }),
            Write::PutAccess(pending.clone()),
        ],
    )
    .unwrap();
    let granted = access("req1", "granted", 10_000);
    let guarded = |expect: &AccessRecord, next: AccessRecord| {
        vec![
            Write::PutEnrollment(Enrollment {
                v: RECORD_VERSION,
                spiffe_id: "spiffe://example.org/unrelated".into(),
                roles: vec![],
                max_ttl: 1,
                via: "x".into(),
            }),
            Write::Guard(Guard::Access {
                id: "req1".into(),
                expect: Some(Box::new(expect.clone())),
            }),
            Write::PutAccess(next),
        ]
    };
    s.commit(&[], &guarded(&pending, granted.clone())).unwrap();
    // A second approver read the pending record: its guard fails and nothing is written.
    match s.commit(&[], &guarded(&pending, access("req1", "denied", 10_000))) {
        Err(StoreError::GuardFailed { writes }) => assert_eq!(writes, [1]),
        other => panic!("expected GuardFailed, got {other:?}"),
    }
    assert_eq!(s.access_all().unwrap(), [granted]);
    assert!(
        s.enrollment("spiffe://example.org/unrelated")
            .unwrap()
            .is_some()
    );
    // Identity-rule guard: absent holds until a rule lands.
    let id = "spiffe://example.org/g";
    let absent = || {
        Write::Guard(Guard::IdentityRule {
            spiffe_id: id.into(),
            expect: None,
        })
    };
    s.commit(&[], &[absent()]).unwrap();
    s.commit(&[], &[Write::PutRevocation(revocation("", id, 1, 10_000))])
        .unwrap();
    assert!(matches!(
        s.commit(&[], &[absent(), Write::PutIssued(issued(id, "ff"), 10_000)]),
        Err(StoreError::GuardFailed { .. })
    ));
    assert!(s.issued("ff").unwrap().is_none());
    // Token-absent guard (a spent JWT): holds until the record exists, then fails.
    let absent = || Write::Guard(Guard::TokenAbsent { id: "jwt-g".into() });
    s.commit(&[], &[absent(), Write::PutToken(token("jwt-g", 0, 10_000))])
        .unwrap();
    assert!(matches!(
        s.commit(&[], &[absent(), Write::PutToken(token("jwt-g", 0, 10_000))]),
        Err(StoreError::GuardFailed { writes }) if writes == [0]
    ));
}

fn check_audit(s: &dyn Store) {
    assert!(s.audit_head().unwrap().is_none());
    assert!(s.read_audit(1, 10).unwrap().is_empty());
    let first = records(1, GENESIS_HASH, 5, 10);
    s.commit(&first, &[]).unwrap();
    s.flush().unwrap();
    assert_eq!(s.audit_head().unwrap(), Some((5, first[4].hash)));
    assert_eq!(s.read_audit(2, 2).unwrap(), first[1..3]);
    assert_eq!(s.read_audit(4, 100).unwrap(), first[3..]);
    // A record that does not continue the head is refused and nothing is written.
    let gap = records(7, first[4].hash, 1, 0);
    assert!(matches!(
        s.commit(&gap, &[]),
        Err(StoreError::OutOfOrder { .. } | StoreError::HeadMoved)
    ));
    let fork = records(5, first[3].hash, 1, 0);
    assert!(
        s.commit(&fork, &[]).is_err(),
        "a second seq 5 must be refused"
    );
    assert_eq!(s.audit_head().unwrap().unwrap().0, 5);
    assert_eq!(s.stats().unwrap().audit, 5);
}

/// Archival: records an archive holds are deleted behind a checkpoint; reads below it say so,
/// the head and the chain from the checkpoint on are untouched, and mismatches delete nothing.
fn check_archive(s: &dyn Store) {
    let all = records(1, GENESIS_HASH, 6, 10);
    s.commit(&all, &[]).unwrap();
    s.flush().unwrap();
    assert_eq!(s.audit_checkpoint().unwrap(), None);
    let mismatch = |r: Result<usize, StoreError>| {
        assert!(matches!(r, Err(StoreError::ArchiveMismatch(_))), "{r:?}");
    };
    mismatch(s.truncate_audit(3, all[2].prev_hash)); // not this log's hash
    mismatch(s.truncate_audit(6, all[5].hash)); // the head stays
    mismatch(s.truncate_audit(9, all[5].hash)); // past the head
    assert_eq!(
        s.read_audit(1, 10).unwrap(),
        all,
        "a refused prune deletes nothing"
    );
    assert_eq!(s.truncate_audit(3, all[2].hash).unwrap(), 3);
    assert_eq!(s.audit_checkpoint().unwrap(), Some((3, all[2].hash)));
    assert_eq!(s.audit_head().unwrap(), Some((6, all[5].hash)));
    for from in [0, 1, 3] {
        match s.read_audit(from, 10) {
            Err(e @ StoreError::Archived { through: 3 }) => {
                assert!(e.to_string().contains("read from #4"), "{e}");
            }
            other => panic!("read from {from}: expected Archived, got {other:?}"),
        }
    }
    let live = s.read_audit(4, 10).unwrap();
    assert_eq!(live, all[3..]);
    verify_chain(&live, 4, all[2].hash).unwrap();
    assert_eq!(s.stats().unwrap().audit, 3);
    let h = s.health().unwrap();
    assert!(h.size_bytes > 0 && !h.location.is_empty(), "{h:?}");
    mismatch(s.truncate_audit(2, all[1].hash)); // already archived
    // The log goes on from the head; a second archival moves the checkpoint.
    s.commit(&records(7, all[5].hash, 1, 0), &[]).unwrap();
    s.flush().unwrap();
    assert_eq!(s.truncate_audit(5, all[4].hash).unwrap(), 2);
    assert_eq!(s.audit_checkpoint().unwrap(), Some((5, all[4].hash)));
    assert_eq!(s.read_audit(6, 10).unwrap().len(), 2);
}

/// More than 4 MiB of audit records (gRPC's default message limit) come back whole.
fn check_large_audit(s: &dyn Store) {
    let all = records(1, GENESIS_HASH, 2200, 2048);
    for chunk in all.chunks(100) {
        s.commit(chunk, &[]).unwrap();
    }
    s.flush().unwrap();
    let read = s.read_audit(1, 5000).unwrap();
    assert_eq!(read.len(), 2200);
    let bytes: usize = read.iter().map(|r| r.reason.len()).sum();
    assert!(bytes > 4 << 20, "{bytes} bytes");
    verify_chain(&read, 1, GENESIS_HASH).unwrap();
    assert_eq!(s.read_audit(2199, 10).unwrap().len(), 2);
}

fn check_shared(s: &dyn Store) {
    let mut changes = s.shared_changes();
    assert!(s.shared_get("ca/active").unwrap().is_none());
    assert!(s.shared_put("ca/active", b"one", None).unwrap());
    assert!(
        !s.shared_put("ca/active", b"two", None).unwrap(),
        "must not exist"
    );
    let v1 = s.shared_get("ca/active").unwrap().unwrap();
    assert_eq!(v1.value, b"one");
    assert_ne!(v1.version, 0);
    assert!(
        !s.shared_put("ca/active", b"two", Some(v1.version + 1000))
            .unwrap()
    );
    assert!(s.shared_put("ca/active", b"two", Some(v1.version)).unwrap());
    let v2 = s.shared_get("ca/active").unwrap().unwrap();
    assert_eq!(v2.value, b"two");
    assert_ne!(v2.version, v1.version);
    assert!(s.shared_put("ca/next", b"n", None).unwrap());
    assert!(s.shared_put("cb", b"x", None).unwrap());
    let keys: Vec<String> = s
        .shared_list("ca/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["ca/active", "ca/next"]);
    assert!(!s.shared_delete("ca/next", Some(1)).unwrap());
    assert!(s.shared_delete("ca/next", None).unwrap());
    assert!(!s.shared_delete("ca/next", None).unwrap());
    assert!(s.shared_get("ca/next").unwrap().is_none());
    let seen: Vec<(String, Option<Vec<u8>>)> = std::iter::from_fn(|| changes.try_recv().ok())
        .map(|c| (c.key, c.value.map(|v| v.value)))
        .collect();
    let want: Vec<(String, Option<Vec<u8>>)> = vec![
        ("ca/active".into(), Some(b"one".to_vec())),
        ("ca/active".into(), Some(b"two".to_vec())),
        ("ca/next".into(), Some(b"n".to_vec())),
        ("cb".into(), Some(b"x".to_vec())),
        ("ca/next".into(), None),
    ];
    assert_eq!(seen, want);
}

/// The audit log's live feed carries each record with the revocations and access records it
/// committed.
async fn check_feed(s: Arc<dyn Store>) {
    let log = AuditLog::start(s.clone()).unwrap();
    let mut live = log.live();
    let rec = log
        .record(
            Event::new(Kind::Revoked, "spiffe://example.org/admin"),
            vec![
                Write::PutRevocation(revocation("ab", "spiffe://example.org/a", 0, 10_000)),
                Write::PutAccess(access("q", "revoked", 10_000)),
            ],
        )
        .await
        .unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), live.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.record, rec);
    assert_eq!(c.revocations.len(), 1);
    assert_eq!(c.revocations[0].rev, rec.seq);
    assert_eq!(c.access.len(), 1);
    assert_eq!(s.revoked_serial("ab").unwrap().unwrap().rev, rec.seq);
    // A guard that fails fails only its own event.
    let stale = Write::Guard(Guard::Access {
        id: "q".into(),
        expect: None,
    });
    let (a, b) = tokio::join!(
        log.record(Event::new(Kind::AccessApproved, "x"), vec![stale]),
        log.record(Event::new(Kind::AccessDenied, "y"), vec![]),
    );
    assert!(
        matches!(a, Err(lanyard::audit::AuditError::Conflict)),
        "{a:?}"
    );
    let b = b.unwrap();
    let all = s.read_audit(1, 100).unwrap();
    assert_eq!(all.last().unwrap(), &b);
    verify_chain(&all, 1, GENESIS_HASH).unwrap();
    // A subscriber replays from the store.
    let mut sub = log.subscribe(1);
    assert_eq!(sub.next(false).await.unwrap().unwrap(), rec);
}

async fn run_all(open: impl Fn(&str) -> Arc<dyn Store>) {
    check_revocation_index(&open);
    check_tokens(&*open("tokens"));
    check_identities(&*open("identities"));
    check_revocations(&*open("revocations"));
    check_guards(&*open("guards"));
    check_audit(&*open("audit"));
    check_archive(&*open("archive"));
    check_large_audit(&*open("large"));
    check_shared(&*open("shared"));
    check_feed(open("feed")).await;
}

#[tokio::test]
async fn sled_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run_all(|name| Arc::new(SledStore::open(&dir.path().join(name)).unwrap()) as Arc<dyn Store>)
        .await;
}

#[tokio::test]
async fn etcd_conforms() {
    let Some(cluster) = common::etcd::EtcdCluster::start(1) else {
        return;
    };
    run_all(|name| {
        let cfg =
            EtcdConfig::parse(&cluster.url_from(0), &format!("/conformance/{name}/")).unwrap();
        Arc::new(EtcdStore::open(cfg).unwrap()) as Arc<dyn Store>
    })
    .await;
}
