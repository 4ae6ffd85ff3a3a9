//! SPIFFE bundle parsing (`lanyard::federation::SpiffeBundle::decode_any`): a JWKS document or a
//! PEM file of CA certificates, as fetched from a federated domain's bundle endpoint or imported
//! by an admin.
//!
//! Invariants: an accepted bundle holds 1 to 64 authorities, each a CA certificate webpki takes
//! as a trust anchor; it encodes, and the encoding decodes to an equal bundle (authorities in
//! order, sequence, refresh hint); its PEM reads back to the same authorities.
#![no_main]

use lanyard::federation::SpiffeBundle;
use lanyard::federation::bundle::MAX_AUTHORITIES;
use lanyard::spiffe::TrustDomain;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").expect("trust domain");
    let bundle = match SpiffeBundle::decode_any(td.clone(), data) {
        Ok(b) => b,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(bundle.trust_domain(), &td);
    let n = bundle.authorities().len();
    assert!((1..=MAX_AUTHORITIES).contains(&n), "{n} authorities");
    bundle
        .to_tls_bundle()
        .expect("authorities are trust anchors");

    let doc = bundle.encode().expect("an accepted bundle encodes");
    let back = SpiffeBundle::decode(td.clone(), doc.as_bytes()).expect("own encoding decodes");
    assert_eq!(back, bundle, "encode/decode changed the bundle");

    let pem = SpiffeBundle::from_pem(td, bundle.to_pem().as_bytes()).expect("own PEM reads back");
    assert_eq!(pem.authorities(), bundle.authorities());
    assert_eq!(
        bundle.concatenated_der().len(),
        bundle.authorities().iter().map(|c| c.len()).sum::<usize>()
    );
});
