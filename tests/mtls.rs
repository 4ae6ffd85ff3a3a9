//! Issue 5 item 4 and issue 4 item 4: `lanyard::tls` between two real services in one process —
//! a tokio-rustls echo server built from `server_config` and clients built from `client_config`,
//! each following its credential directory with `TlsSource::from_dir`, against a real CA on
//! loopback. Authorization by SPIFFE ID and role, refusal of foreign CAs and trust domains,
//! revocation pushed by `Revocation.Watch` within one second, and rotation without rebuilding
//! any config.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{EchoServer, TestCa, poll_until};
use lanyard::ca::{RolesOid, SvidInfo, parse_svid};
use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient, revoke_request::Target};
use lanyard::tls::{Authorizer, RevocationSet, TlsSource, client_config, server_config};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const DB: &str = "spiffe://example.org/ns/prod/db";
const API: &str = "spiffe://example.org/ns/prod/api";
const API2: &str = "spiffe://example.org/ns/prod/api2";
const WEB: &str = "spiffe://example.org/ns/prod/web";
const DEV: &str = "spiffe://example.org/ns/dev/api";
const OTHER_API: &str = "spiffe://other.org/ns/prod/api";
/// What the database server accepts.
const DB_RULE: &str = "spiffe://example.org/ns/prod/* role=db-read";
/// How often `TlsSource::from_dir` looks at the files.
const POLL: Duration = Duration::from_millis(200);
/// Certificates outlive every test here.
const TTL: u32 = 300;

// === the two services ===

/// What a client learned from one successful call.
#[derive(Debug)]
struct Call {
    /// The server's SVID, from the handshake.
    server: SvidInfo,
    /// The client ID and serial the server saw, from its greeting.
    seen_id: String,
    seen_serial: String,
}

/// Connects, handshakes, reads the greeting and checks one echo. Any failure (handshake, first
/// read: in TLS 1.3 a client learns that the server refused its certificate only when it
/// reads) is an `Err` with the reason.
async fn call(addr: SocketAddr, config: &Arc<ClientConfig>) -> Result<Call, String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The name is not checked: the server is authenticated by its SPIFFE ID.
        let name = ServerName::try_from("db.invalid").unwrap();
        let tls = TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let server = parse_svid(&leaf, &RolesOid::default()).map_err(|e| e.to_string())?;
        let mut conn = BufReader::new(tls);
        conn.write_all(b"ping\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut greeting = String::new();
        match conn.read_line(&mut greeting).await {
            Ok(0) => return Err("first read: connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("first read: {e}")),
        }
        let mut echo = String::new();
        conn.read_line(&mut echo)
            .await
            .map_err(|e| format!("echo: {e}"))?;
        assert_eq!(echo, "ping\n", "the server echoes");
        let mut words = greeting.split_whitespace().skip(1);
        Ok(Call {
            server,
            seen_id: words.next().unwrap_or_default().to_string(),
            seen_serial: words.next().unwrap_or_default().to_string(),
        })
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A client config for the credential in `dir`, accepting only the database server.
async fn client_for(dir: &Path, revocations: Option<Arc<RevocationSet>>) -> Arc<ClientConfig> {
    let source = TlsSource::from_dir(dir, RolesOid::default(), POLL)
        .await
        .unwrap();
    Arc::new(client_config(&source, Authorizer::parse(&[DB]).unwrap(), revocations).unwrap())
}

/// The serial in a credential directory.
fn serial_of(dir: &Path) -> String {
    common::dir_svid(dir).unwrap().serial.to_hex()
}

/// A copy of credential directory `src` whose bundle also trusts `extra` (PEM).
fn with_extra_bundle(src: &Path, dst: &Path, extra: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut bundle = std::fs::read(src.join("bundle.pem")).unwrap();
    bundle.extend(std::fs::read(extra).unwrap());
    std::fs::write(dst.join("bundle.pem"), bundle).unwrap();
    dst.to_path_buf()
}

/// The example.org CA, the database server's credential and the server itself.
struct World {
    ca: TestCa,
    db_dir: PathBuf,
    db_source: Arc<TlsSource>,
    server: EchoServer,
}

impl World {
    async fn start(revocations: Option<Arc<RevocationSet>>) -> Self {
        let ca = TestCa::start().await;
        let db_dir = ca.enroll("db", DB, &[], TTL).await;
        let db_source = TlsSource::from_dir(&db_dir, RolesOid::default(), POLL)
            .await
            .unwrap();
        let config = server_config(
            &db_source,
            Authorizer::parse(&[DB_RULE]).unwrap(),
            revocations,
        )
        .unwrap();
        let server = EchoServer::start(config, db_source.clone()).await;
        Self {
            ca,
            db_dir,
            db_source,
            server,
        }
    }

    /// Expects `config`'s call to be refused by the server; returns the server's reason.
    async fn expect_refused(&self, config: &Arc<ClientConfig>) -> String {
        let before = self.server.event_count();
        let err = call(self.server.addr, config)
            .await
            .expect_err("the server must refuse this client");
        match self.server.next_event(before).await {
            Err(reason) => {
                eprintln!("refused; client saw {err:?}; server: {reason}");
                reason
            }
            Ok(svid) => panic!("the server accepted {}", svid.spiffe_id),
        }
    }
}

/// Revokes `serial` through the Revocation API as the CA's admin.
async fn revoke_serial(ca: &TestCa, serial: &str, reason: &str) {
    let mut admin = RevocationClient::new(ca.admin_channel().await);
    admin
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial.to_string())),
            reason: reason.into(),
            lift: false,
        })
        .await
        .expect("admin revokes");
}

/// Revokes a throwaway certificate and waits until `set` has it: proof its watch is live.
async fn wait_until_following(ca: &TestCa, set: &RevocationSet) {
    let decoy = ca
        .enroll("decoy", "spiffe://example.org/ns/prod/decoy", &[], TTL)
        .await;
    let decoy_svid = common::dir_svid(&decoy).unwrap();
    revoke_serial(ca, &decoy_svid.serial.to_hex(), "warm-up").await;
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        set.check(&decoy_svid)
    })
    .await
    .expect("the revocation watch delivers a revocation");
}

// === authorization ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_with_the_role_is_accepted_and_both_sides_see_each_others_id() {
    let w = World::start(None).await;
    let api_dir = w.ca.enroll("api", API, &["db-read"], TTL).await;
    let client = client_for(&api_dir, None).await;

    let before = w.server.event_count();
    let c = call(w.server.addr, &client).await.expect("accepted");
    assert_eq!(
        c.server.spiffe_id.as_str(),
        DB,
        "client sees the server's ID"
    );
    assert_eq!(c.server.serial.to_hex(), serial_of(&w.db_dir));
    assert_eq!(c.seen_id, API, "server sees the client's ID");
    assert_eq!(c.seen_serial, serial_of(&api_dir));
    let seen = w.server.next_event(before).await.expect("handshake ok");
    assert_eq!(
        seen.roles,
        vec!["db-read"],
        "server sees the client's roles"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_without_the_role_or_outside_the_pattern_is_refused() {
    let w = World::start(None).await;
    // Right namespace, wrong role.
    let web = w.ca.enroll("web", WEB, &["deploy"], TTL).await;
    let reason = w.expect_refused(&client_for(&web, None).await).await;
    assert!(
        reason.contains(WEB) && reason.contains("matches no rule"),
        "{reason}"
    );
    // Right namespace, no roles at all.
    let bare = w.ca.enroll("bare", API2, &[], TTL).await;
    let reason = w.expect_refused(&client_for(&bare, None).await).await;
    assert!(
        reason.contains(API2) && reason.contains("roles: none"),
        "{reason}"
    );
    // Outside spiffe://example.org/ns/prod/* (the dev policy allows no roles).
    let token = w.ca.token(DEV, &[], TTL, 1).await;
    let (key, resp) = w.ca.issue(&token, DEV, TTL).await.unwrap();
    let dev = w.ca.dir.path().join("dev");
    common::write_response(&dev, &resp, &key);
    let reason = w.expect_refused(&client_for(&dev, None).await).await;
    assert!(reason.contains(DEV), "{reason}");
    // And a client with the role still gets in.
    let api = w.ca.enroll("api", API, &["db-read"], TTL).await;
    call(w.server.addr, &client_for(&api, None).await)
        .await
        .expect("accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_from_another_ca_or_trust_domain_are_refused() {
    let w = World::start(None).await;
    let ours = w.ca.dir.path().join("db").join("bundle.pem");

    // Another CA claiming the same trust domain, issuing the same ID with the same role. The
    // client also trusts our CA, so the refusal is the server's.
    let rogue = TestCa::start().await;
    let rogue_api = rogue.enroll("api", API, &["db-read"], TTL).await;
    let dir = with_extra_bundle(&rogue_api, &w.ca.dir.path().join("rogue-api"), &ours);
    let reason = w.expect_refused(&client_for(&dir, None).await).await;
    // Both CAs have the same name, so webpki finds ours and the signature does not verify.
    assert!(
        reason.contains("certificate chain rejected")
            && (reason.contains("not issued by a trusted CA")
                || reason.contains("InvalidSignatureForPublicKey")),
        "{reason}"
    );

    // Another trust domain with its own CA.
    let other = TestCa::start_with_full_config(
        "trust_domain = \"other.org\"\nmin_ttl = \"1s\"\n\
         [[policy]]\nspiffe_id = \"spiffe://other.org/ns/prod/*\"\nroles = [\"db-read\"]\nmax_ttl = \"10m\"\n",
    )
    .await;
    let other_api = other.enroll("api", OTHER_API, &["db-read"], TTL).await;
    let dir = with_extra_bundle(&other_api, &w.ca.dir.path().join("other-api"), &ours);
    let other_client = client_for(&dir, None).await;
    let reason = w.expect_refused(&other_client).await;
    assert!(reason.contains("unknown issuer"), "{reason}");

    // A server that trusts the other domain's CA too still refuses its IDs: the rule names
    // example.org.
    let other_bundle = other.admin_dir().join("bundle.pem");
    let db2 = with_extra_bundle(&w.db_dir, &w.ca.dir.path().join("db2"), &other_bundle);
    let src = TlsSource::from_dir(&db2, RolesOid::default(), POLL)
        .await
        .unwrap();
    let cfg = server_config(&src, Authorizer::parse(&[DB_RULE]).unwrap(), None).unwrap();
    let server2 = EchoServer::start(cfg, src).await;
    assert!(call(server2.addr, &other_client).await.is_err());
    match server2.next_event(0).await {
        Err(reason) => assert!(
            reason.contains(OTHER_API) && reason.contains("matches no rule"),
            "{reason}"
        ),
        Ok(s) => panic!("accepted {}", s.spiffe_id),
    }

    // And the client side: our API client refuses a server from the rogue CA.
    let rogue_db = rogue.enroll("db", DB, &[], TTL).await;
    let src = TlsSource::from_dir(&rogue_db, RolesOid::default(), POLL)
        .await
        .unwrap();
    let cfg = server_config(&src, Authorizer::parse(&[DB_RULE]).unwrap(), None).unwrap();
    let rogue_server = EchoServer::start(cfg, src).await;
    let api = w.ca.enroll("api", API, &["db-read"], TTL).await;
    let err = call(rogue_server.addr, &client_for(&api, None).await)
        .await
        .expect_err("the client refuses a server from another CA");
    assert!(
        err.starts_with("handshake:") && err.contains("certificate chain rejected"),
        "{err}"
    );
}

// === revocation (issue 4 item 4) ===

/// Calls with `client` every 50 ms from `revoked_at` until the server refuses it; fails unless
/// that happens within one second. Returns the server's reason.
async fn refused_within_one_second(
    server: &EchoServer,
    client: &Arc<ClientConfig>,
    revoked_at: Instant,
) -> String {
    let before = loop {
        let before = server.event_count();
        match call(server.addr, client).await {
            Err(_) => break before,
            Ok(_) => {
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "revoked client still accepted after {:?}",
                    revoked_at.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let took = revoked_at.elapsed();
    eprintln!("revoked client refused {took:?} after Revoke returned");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    match server.next_event(before).await {
        Err(reason) => reason,
        Ok(s) => panic!("accepted {}", s.spiffe_id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_refuses_a_revoked_client_within_one_second() {
    let revocations = RevocationSet::new();
    let w = World::start(Some(revocations.clone())).await;
    let watch = revocations.follow(w.ca.server(), w.db_source.clone());
    wait_until_following(&w.ca, &revocations).await;

    let api = w.ca.enroll("api", API, &["db-read"], TTL).await;
    let api2 = w.ca.enroll("api2", API2, &["db-read"], TTL).await;
    let web = w.ca.enroll("web", WEB, &["db-read"], TTL).await;
    let (api_client, api2_client, web_client) = (
        client_for(&api, None).await,
        client_for(&api2, None).await,
        client_for(&web, None).await,
    );
    for c in [&api_client, &api2_client, &web_client] {
        call(w.server.addr, c)
            .await
            .expect("accepted before revocation");
    }
    let mut admin = RevocationClient::new(w.ca.admin_channel().await);

    // By serial.
    let serial = serial_of(&api);
    admin
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial.clone())),
            reason: "test: stolen".into(),
            lift: false,
        })
        .await
        .expect("admin revokes a serial");
    let reason = refused_within_one_second(&w.server, &api_client, Instant::now()).await;
    assert!(
        reason.contains(&serial) && reason.contains("revoked") && reason.contains("stolen"),
        "{reason}"
    );

    // By identity.
    admin
        .revoke(pb::RevokeRequest {
            target: Some(Target::SpiffeId(API2.into())),
            reason: "test: decommissioned".into(),
            lift: false,
        })
        .await
        .expect("admin revokes an identity");
    let reason = refused_within_one_second(&w.server, &api2_client, Instant::now()).await;
    // The CA streams the identity rule and an entry per live certificate of it; either names it.
    assert!(
        (reason.contains(API2) || reason.contains(&serial_of(&api2)))
            && reason.contains("revoked")
            && reason.contains("decommissioned"),
        "{reason}"
    );

    // Nobody else: another client is still welcome.
    call(w.server.addr, &web_client)
        .await
        .expect("an unrevoked client is still accepted");
    watch.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_refuses_a_revoked_server_within_one_second() {
    let w = World::start(None).await;
    let api = w.ca.enroll("api", API, &["db-read"], TTL).await;
    let api_source = TlsSource::from_dir(&api, RolesOid::default(), POLL)
        .await
        .unwrap();
    let revocations = RevocationSet::new();
    let watch = revocations.follow(w.ca.server(), api_source.clone());
    wait_until_following(&w.ca, &revocations).await;
    let client = Arc::new(
        client_config(
            &api_source,
            Authorizer::parse(&[DB]).unwrap(),
            Some(revocations.clone()),
        )
        .unwrap(),
    );
    call(w.server.addr, &client)
        .await
        .expect("accepted before revocation");

    let serial = serial_of(&w.db_dir);
    revoke_serial(&w.ca, &serial, "test: server key leaked").await;
    let revoked_at = Instant::now();
    let err = loop {
        match call(w.server.addr, &client).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "revoked server still accepted after {:?}",
                    revoked_at.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let took = revoked_at.elapsed();
    eprintln!("revoked server refused {took:?} after Revoke returned: {err}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        err.starts_with("handshake:") && err.contains("revoked"),
        "{err}"
    );
    watch.abort();
}

// === rotation ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_handshakes_use_rotated_certificates_without_rebuilding_configs() {
    let w = World::start(None).await;
    let api = w.ca.enroll("api", API, &["db-read"], TTL).await;
    let client = client_for(&api, None).await;
    let first = call(w.server.addr, &client).await.expect("accepted");
    let old_client = serial_of(&api);
    let old_server = serial_of(&w.db_dir);
    assert_eq!(first.seen_serial, old_client);

    // The client's credential is renewed on disk (new key, new serial).
    let renewed = w.ca.renew(&api, TTL).await.expect("renews");
    assert_ne!(renewed.serial, old_client);
    let started = Instant::now();
    loop {
        let c = call(w.server.addr, &client).await.expect("still accepted");
        if c.seen_serial == renewed.serial {
            break;
        }
        assert_eq!(
            c.seen_serial, old_client,
            "only the old or the new certificate"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the server never saw the client's new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("client rotation picked up after {:?}", started.elapsed());

    // The server's credential is renewed on disk.
    let renewed = w.ca.renew(&w.db_dir, TTL).await.expect("renews");
    assert_ne!(renewed.serial, old_server);
    let started = Instant::now();
    loop {
        let c = call(w.server.addr, &client).await.expect("still accepted");
        assert_eq!(c.server.spiffe_id.as_str(), DB);
        if c.server.serial.to_hex() == renewed.serial {
            break;
        }
        assert_eq!(c.server.serial.to_hex(), old_server);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the client never saw the server's new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("server rotation picked up after {:?}", started.elapsed());
}
