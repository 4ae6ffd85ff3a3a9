//! Join-token parsing (`lanyard::tokens::JoinToken::parse`) and secret matching.
//!
//! Invariants: an accepted token prints back to exactly the trimmed input (the encoding is
//! canonical, so two strings never name the same token), re-parses to the same fields, matches
//! its own secret hash and no other, and its `Debug` never shows the secret.
#![no_main]

use lanyard::tokens::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(token) = JoinToken::parse(s) else {
        return;
    };
    let printed = token.to_token_string();
    assert_eq!(printed, s.trim(), "accepted a non-canonical token");
    let again = JoinToken::parse(&printed).expect("printed token parses");
    assert_eq!(again.id, token.id);
    assert_eq!(again.ca_fingerprint, token.ca_fingerprint);
    assert_eq!(again.spiffe_id, token.spiffe_id);
    assert_eq!(again.secret_hash(), token.secret_hash());

    let hash = token.secret_hash();
    assert!(token.matches(&hash));
    let mut other = hash;
    other[31] ^= 1;
    assert!(!token.matches(&other));

    let secret = printed.split('.').nth(2).expect("five parts");
    assert!(!format!("{token:?}").contains(secret));
});
