//! Server configuration and policy loading (`lanyard::config::ServeSettings::resolve` on a TOML
//! file: every setting, `[[policy]]`, `[[access]]` and `[[federation]]`), as at start-up and on a
//! policy reload.
//!
//! Invariants: accepted settings keep 0 < min_ttl <= default_ttl <= max_cert_lifetime; every
//! `[[policy]]` entry became a rule; the rule found for an exact entry's own ID is that entry's,
//! with its roles normalized and 0 < max_ttl <= max_cert_lifetime; the issuance decision for that
//! ID grants exactly those roles for min(default_ttl, max_ttl); a reload reads the same policy.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use lanyard::config::{FileConfig, Overrides, ServeSettings};
use lanyard::policy::{Ask, Limits, RESERVED_PREFIX, decide};
use lanyard::spiffe::{IdPattern, normalize_roles};
use libfuzzer_sys::fuzz_target;

/// One file per fuzzing process: `resolve` reads the config from a path, as the server does.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("lanyard-fuzz-policy-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Parse first so only TOML that gets past serde pays for the file write.
    let Ok(file) = toml::from_str::<FileConfig>(text) else {
        return;
    };
    std::fs::write(path(), data).expect("write temp config");
    let settings = match ServeSettings::resolve(Some(path()), Overrides::default()) {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(!settings.min_ttl.is_zero());
    assert!(settings.min_ttl <= settings.default_ttl);
    assert!(settings.default_ttl <= settings.max_cert_lifetime);
    assert_eq!(settings.policy.len(), file.policy.len());
    let td = &settings.trust_domain;
    let limits = Limits {
        default_ttl: settings.default_ttl,
        min_ttl: settings.min_ttl,
    };
    for spec in &file.policy {
        let pattern = IdPattern::parse(&spec.spiffe_id).expect("accepted pattern parses");
        assert_eq!(pattern.trust_domain_name(), td.as_str());
        let IdPattern::Exact(id) = &pattern else {
            continue;
        };
        assert!(!format!("{}/", id.path()).starts_with(RESERVED_PREFIX));
        let rule = settings
            .policy
            .lookup(id)
            .expect("an exact rule covers its ID");
        assert_eq!(rule.pattern, pattern);
        assert_eq!(
            rule.roles,
            normalize_roles(&spec.roles).expect("accepted roles")
        );
        assert!(!rule.max_ttl.is_zero() && rule.max_ttl <= settings.max_cert_lifetime);
        let decision = decide(
            &settings.policy,
            limits,
            &Ask {
                spiffe_id: id,
                ceiling_roles: &rule.roles,
                ceiling_ttl: None,
                requested_roles: &[],
                requested_ttl: None,
            },
        )
        .expect("the rule's own roles are granted");
        assert_eq!(decision.roles, rule.roles);
        assert_eq!(decision.ttl, settings.default_ttl.min(rule.max_ttl));
    }
    for spec in &file.access {
        if let Ok(IdPattern::Exact(id)) = IdPattern::parse(&spec.spiffe_id) {
            let rule = settings
                .policy
                .lookup_access(&id)
                .expect("an exact access rule");
            assert!(rule.approvals >= 1);
            assert!(!rule.max_duration.is_zero());
        }
    }
    let reloaded = settings.reload_policy().expect("the same file reloads");
    assert_eq!(reloaded.len(), settings.policy.len());
});
