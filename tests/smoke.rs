//! First end-to-end checks: token → issue → renew, and the order `serve` starts in (every
//! port bound before anything is written; a data dir in use named as such).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::Path;

use common::{POLICY, TestCa};
use lanyard::config::{Overrides, ServeSettings};
use lanyard::server::{ServeError, start};

#[tokio::test(flavor = "multi_thread")]
async fn token_issue_renew_round_trip() {
    let ca = TestCa::start().await;
    let dir = ca
        .enroll("api", "spiffe://example.org/ns/prod/api", &["db-read"], 60)
        .await;
    let renewed = ca.renew(&dir, 30).await.expect("renews");
    assert_eq!(renewed.spiffe_id, "spiffe://example.org/ns/prod/api");
    assert_eq!(renewed.roles, vec!["db-read"]);
    assert!(renewed.not_after - renewed.not_before <= 60);
}

/// Settings for a CA in `dir/data` from a config with `extra` lines.
fn settings(dir: &Path, extra: &str) -> ServeSettings {
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!("trust_domain = \"example.org\"\n{extra}\n{POLICY}"),
    )
    .unwrap();
    ServeSettings::resolve(
        Some(&config),
        Overrides {
            data_dir: Some(dir.join("data")),
            ..Overrides::default()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_leaves_no_state_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for extra in [
        format!("listen = \"{port}\""),
        format!("listen = \"127.0.0.1:0\"\nbundle_endpoint_listen = \"{port}\""),
        format!("listen = \"127.0.0.1:0\"\nmetrics_listen = \"{port}\""),
    ] {
        let s = settings(tmp.path(), &extra);
        let err = match start(s).await {
            Ok(_) => panic!("{extra}: started on a port in use"),
            Err(e) => e,
        };
        assert!(
            matches!(err, ServeError::Bind(at, _) if at == port),
            "{extra}: {err}"
        );
        assert!(
            !tmp.path().join("data").exists(),
            "{extra}: a failed start left a data dir (CA key, admin credential, audit log) behind"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_in_use_is_named_as_such() {
    let ca = TestCa::start().await;
    let mut s = settings(ca.dir.path(), "listen = \"127.0.0.1:0\"");
    s.data_dir = ca.data_dir();
    let err = match start(s).await {
        Ok(_) => panic!("two servers on one data dir"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains(&format!(
            "data dir {} is in use by another lanyard serve",
            ca.data_dir().display()
        )),
        "{err}"
    );
    // The running server is unaffected.
    ca.enroll("api", "spiffe://example.org/ns/prod/api", &[], 60)
        .await;
}
