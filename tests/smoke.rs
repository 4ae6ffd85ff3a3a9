//! A first end-to-end check of the helpers: token → issue → renew.

mod common;

use common::TestCa;

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
