//! Authorization of a TLS peer by SPIFFE ID and roles.
//!
//! A [`PeerRule`] is "an ID matching this pattern, holding all of these roles". An [`Authorizer`]
//! accepts a peer when any of its rules does. Trust domains are explicit: a pattern names its
//! domain, so a foreign identity is never accepted by a rule written for the local one. With a
//! [`GrantSet`] ([`Authorizer::with_grants`]), roles temporarily granted to a peer by this
//! domain's CA count as held.

use std::fmt;
use std::sync::Arc;

use super::{GrantSet, unix_now};
use crate::ca::SvidInfo;
use crate::spiffe::{IdError, IdPattern, SpiffeId, validate_role};

/// One rule: an ID pattern (or any ID of a trust domain) plus roles the peer must all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRule {
    ids: IdMatch,
    roles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum IdMatch {
    Pattern(IdPattern),
    TrustDomain(String),
}

/// A set of rules; a peer is authorized when any rule matches.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    rules: Vec<PeerRule>,
    grants: Option<Arc<GrantSet>>,
}

impl PeerRule {
    /// Peers whose ID matches `pattern` (`spiffe://td/path` or `spiffe://td/prefix/*`).
    pub fn id(pattern: &str) -> Result<Self, IdError> {
        Ok(Self {
            ids: IdMatch::Pattern(IdPattern::parse(pattern)?),
            roles: Vec::new(),
        })
    }

    /// Any peer of trust domain `td` (e.g. `example.org`).
    pub fn trust_domain(td: &str) -> Result<Self, IdError> {
        crate::spiffe::TrustDomain::new(td)?;
        Ok(Self {
            ids: IdMatch::TrustDomain(td.to_string()),
            roles: Vec::new(),
        })
    }

    /// Also requires `role`.
    pub fn with_role(mut self, role: &str) -> Result<Self, IdError> {
        validate_role(role)?;
        self.roles.push(role.to_string());
        Ok(self)
    }

    /// Parses `"<pattern> [role=<r>[,<r>...]]"`, e.g.
    /// `"spiffe://example.org/ns/prod/* role=db-read"`, or `"td:example.org"` for a whole domain.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let mut parts = s.split_whitespace();
        let first = parts.next().unwrap_or_default();
        let mut rule = match first.strip_prefix("td:") {
            Some(td) => Self::trust_domain(td)?,
            None => Self::id(first)?,
        };
        for p in parts {
            let roles = p
                .strip_prefix("role=")
                .or_else(|| p.strip_prefix("roles="))
                .ok_or_else(|| IdError::Role(p.to_string()))?;
            for r in roles.split(',').filter(|r| !r.is_empty()) {
                rule = rule.with_role(r)?;
            }
        }
        Ok(rule)
    }

    /// Whether `peer` satisfies the rule.
    pub fn matches(&self, peer: &SvidInfo) -> bool {
        self.matches_id(&peer.spiffe_id) && self.roles.iter().all(|r| peer.roles.contains(r))
    }

    fn matches_id(&self, id: &SpiffeId) -> bool {
        match &self.ids {
            IdMatch::Pattern(p) => p.matches(id),
            IdMatch::TrustDomain(td) => id.trust_domain_name() == td,
        }
    }

    /// Trust domain the rule names.
    pub fn trust_domain_name(&self) -> &str {
        match &self.ids {
            IdMatch::Pattern(p) => p.trust_domain_name(),
            IdMatch::TrustDomain(td) => td,
        }
    }
}

impl fmt::Display for PeerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ids {
            IdMatch::Pattern(p) => write!(f, "{p}")?,
            IdMatch::TrustDomain(td) => write!(f, "td:{td}")?,
        }
        if !self.roles.is_empty() {
            write!(f, " role={}", self.roles.join(","))?;
        }
        Ok(())
    }
}

impl Authorizer {
    /// An authorizer with one rule.
    pub fn new(rule: PeerRule) -> Self {
        Self {
            rules: vec![rule],
            grants: None,
        }
    }

    /// Also counts the roles `grants` says a peer holds temporarily (foreign identities' grants,
    /// followed from the CA with [`GrantSet::follow`]).
    pub fn with_grants(mut self, grants: Arc<GrantSet>) -> Self {
        self.grants = Some(grants);
        self
    }

    /// Adds a rule.
    pub fn or(mut self, rule: PeerRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Parses one rule per string.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, IdError> {
        Ok(Self {
            rules: rules
                .iter()
                .map(|r| PeerRule::parse(r.as_ref()))
                .collect::<Result<_, _>>()?,
            grants: None,
        })
    }

    /// Whether `peer` is authorized; `Err` says why not.
    pub fn check(&self, peer: &SvidInfo) -> Result<(), String> {
        let granted = self
            .grants
            .as_ref()
            .map(|g| g.roles_for(&peer.spiffe_id, unix_now()))
            .unwrap_or_default();
        let with_grants;
        let peer = if granted.iter().any(|r| !peer.roles.contains(r)) {
            let mut p = peer.clone();
            p.roles.extend(granted);
            p.roles.sort_unstable();
            p.roles.dedup();
            with_grants = p;
            &with_grants
        } else {
            peer
        };
        if self.rules.iter().any(|r| r.matches(peer)) {
            return Ok(());
        }
        let rules: Vec<String> = self.rules.iter().map(ToString::to_string).collect();
        Err(format!(
            "peer {} (roles: {}) matches no rule ({})",
            peer.spiffe_id,
            if peer.roles.is_empty() {
                "none".into()
            } else {
                peer.roles.join(",")
            },
            if rules.is_empty() {
                "no rules: deny all".into()
            } else {
                rules.join(" | ")
            }
        ))
    }

    /// Whether any rule names trust domain `td`: a peer of a foreign domain is never accepted
    /// (nor even verified) unless one does.
    pub fn names_trust_domain(&self, td: &str) -> bool {
        self.rules.iter().any(|r| r.trust_domain_name() == td)
    }

    /// Trust domains the rules name.
    pub fn trust_domains(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.rules.iter().map(PeerRule::trust_domain_name).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Serial;

    fn peer(id: &str, roles: &[&str]) -> SvidInfo {
        SvidInfo {
            spiffe_id: SpiffeId::parse(id).unwrap(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            serial: Serial::from_bytes(&[1]),
            not_before: 0,
            not_after: 0,
        }
    }

    #[test]
    fn id_and_roles_must_both_match() {
        let a = Authorizer::parse(&["spiffe://example.org/ns/prod/* role=db-read"]).unwrap();
        assert!(
            a.check(&peer("spiffe://example.org/ns/prod/api", &["db-read", "x"]))
                .is_ok()
        );
        assert!(
            a.check(&peer("spiffe://example.org/ns/prod/api", &["deploy"]))
                .is_err()
        );
        assert!(
            a.check(&peer("spiffe://example.org/ns/dev/api", &["db-read"]))
                .is_err()
        );
        assert!(
            a.check(&peer("spiffe://other.org/ns/prod/api", &["db-read"]))
                .is_err()
        );
    }

    #[test]
    fn trust_domain_rules_and_alternatives() {
        let a = Authorizer::new(PeerRule::parse("td:b.example").unwrap())
            .or(PeerRule::id("spiffe://a.example/svc").unwrap());
        assert!(a.check(&peer("spiffe://b.example/anything", &[])).is_ok());
        assert!(a.check(&peer("spiffe://a.example/svc", &[])).is_ok());
        assert!(a.check(&peer("spiffe://a.example/other", &[])).is_err());
        assert_eq!(a.trust_domains(), vec!["a.example", "b.example"]);
        assert!(a.names_trust_domain("b.example") && !a.names_trust_domain("c.example"));
        assert!(
            Authorizer::default()
                .check(&peer("spiffe://a.example/svc", &[]))
                .is_err()
        );
        assert!(PeerRule::parse("spiffe://a.example/x bogus").is_err());
    }
}
