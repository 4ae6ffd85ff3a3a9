//! Attestation parsing (`lanyard::attest`): JWS compact tokens, JWKS documents and ID templates
//! over attacker-chosen claims.
//!
//! The input is split at the first two newlines: a token, a JWKS document, and a template whose
//! claims are the token's (unverified) claims.
//!
//! Invariants: nothing panics; a token never verifies against keys that the JWKS does not hold
//! (the fuzzer cannot forge a signature, so verification against the input's own JWKS may only
//! fail); a rendered path is a valid SPIFFE ID path with no `.`, `..` or empty segment and no
//! uppercase letter, whatever the claims.
#![no_main]

use lanyard::attest::jwt::{Alg, Rules, Unverified, parse_jwks};
use lanyard::attest::mapping::{Kind, Template};
use lanyard::spiffe::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = s.splitn(3, '\n');
    let (token, jwks, template) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let keys = parse_jwks(jwks.as_bytes()).unwrap_or_default();
    let Ok(parsed) = Unverified::parse(token) else {
        return;
    };
    let rules = Rules {
        issuer: "https://issuer".into(),
        audiences: vec!["lanyard".into()],
        algorithms: vec![Alg::Rs256, Alg::Es256],
        max_age: 3600,
        skew: 30,
    };
    let claims = parsed.claims.clone();
    // An empty key set can verify nothing.
    assert!(parsed.clone().verify(&[], &rules, 0).is_err());
    let _ = parsed.verify(&keys, &rules, 0);
    let Ok(t) = Template::parse(template) else {
        return;
    };
    for kind in [Kind::Kubernetes, Kind::Github, Kind::Jwt] {
        if let Ok((path, _)) = t.render(kind, &claims) {
            assert!(
                path.split('/')
                    .all(|seg| !seg.is_empty() && seg != "." && seg != ".."),
                "{path:?}"
            );
            assert!(!path.bytes().any(|b| b.is_ascii_uppercase()), "{path:?}");
            SpiffeId::parse(&format!("spiffe://example.org/{path}"))
                .unwrap_or_else(|e| panic!("{path:?}: {e}"));
        }
    }
});
