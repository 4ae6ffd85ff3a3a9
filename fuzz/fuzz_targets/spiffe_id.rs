//! SPIFFE ID, trust domain, ID pattern and role-name parsing (`lanyard::spiffe`).
//!
//! The input is split at the first newline: the first line is parsed as an ID, a pattern, a trust
//! domain and a comma-separated role list; the rest as a second ID to match the pattern against.
//!
//! Invariants: whatever parses prints back to the input and re-parses to an equal value; an ID's
//! trust domain and path put back together are the ID; a pattern matches only IDs of its own
//! trust domain, an exact pattern only its ID, a prefix pattern only IDs strictly below it;
//! normalized roles are valid, sorted and unique.
#![no_main]

use lanyard::spiffe::{IdPattern, SpiffeId, TrustDomain, normalize_roles, validate_role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (first, second) = s.split_once('\n').unwrap_or((s, ""));

    let id = SpiffeId::parse(first).ok();
    if let Some(id) = &id {
        check_id(first, id);
    }
    let second_id = SpiffeId::parse(second).ok();
    if let Some(other) = &second_id {
        check_id(second, other);
    }

    if let Ok(pattern) = IdPattern::parse(first) {
        assert_eq!(pattern.to_string(), first);
        assert_eq!(
            IdPattern::parse(&pattern.to_string()).expect("re-parses"),
            pattern
        );
        match &pattern {
            IdPattern::Exact(e) => {
                assert_eq!(Some(e), id.as_ref());
                assert!(pattern.matches(e));
                assert_eq!(pattern.specificity(), usize::MAX);
            }
            IdPattern::Prefix(p) => {
                assert!(
                    !pattern.matches(p),
                    "a prefix pattern matched its own prefix"
                );
                if p.as_str().len() + 2 <= 2048 {
                    let below = SpiffeId::parse(&format!("{p}/x")).expect("child of a valid ID");
                    assert!(pattern.matches(&below));
                }
                assert!(pattern.specificity() < usize::MAX);
            }
        }
        if let Some(other) = &second_id
            && pattern.matches(other)
        {
            assert_eq!(other.trust_domain_name(), pattern.trust_domain_name());
            match &pattern {
                IdPattern::Exact(e) => assert_eq!(e, other),
                IdPattern::Prefix(p) => {
                    assert!(other.as_str().starts_with(&format!("{p}/")));
                    assert!(other.as_str().len() > p.as_str().len() + 1);
                }
            }
        }
    } else {
        assert!(id.is_none(), "an ID that is not a pattern: {first}");
    }

    if let Ok(td) = TrustDomain::new(first) {
        assert_eq!(td.as_str(), first);
        assert_eq!(td.to_string(), first);
        assert_eq!(td.id_string(), format!("spiffe://{first}"));
        assert!(
            SpiffeId::parse(&td.id_string()).is_err(),
            "a bare trust domain is not an ID"
        );
        if let Ok(child) = td.id("/workload") {
            assert!(child.is_in(&td));
            assert_eq!(child.trust_domain(), td);
        }
    }

    if let Ok(roles) = normalize_roles(first.split(',')) {
        for r in &roles {
            validate_role(r).expect("normalized role is valid");
        }
        assert!(
            roles.windows(2).all(|w| w[0] < w[1]),
            "roles not sorted and unique"
        );
        assert_eq!(normalize_roles(&roles).expect("idempotent"), roles);
    }
});

fn check_id(text: &str, id: &SpiffeId) {
    assert_eq!(id.as_str(), text);
    assert_eq!(id.to_string(), text);
    assert_eq!(&SpiffeId::parse(id.as_str()).expect("re-parses"), id);
    assert_eq!(
        format!("spiffe://{}{}", id.trust_domain_name(), id.path()),
        text
    );
    assert!(id.path().starts_with('/'));
    let td = TrustDomain::new(id.trust_domain_name()).expect("an ID's trust domain is valid");
    assert!(id.is_in(&td));
    assert_eq!(td.id(id.path()).expect("rebuilds"), *id);
    assert_eq!(IdPattern::parse(text), Ok(IdPattern::Exact(id.clone())));
}
