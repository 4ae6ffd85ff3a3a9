//! Policy: which identity may hold which roles, for how long. Pure functions, default deny.
//!
//! A rule maps a SPIFFE ID pattern (exact, or `/prefix/*`) to roles and a maximum ttl. The most
//! specific matching rule wins (exact beats prefix, longer prefix beats shorter), like a routing
//! table, so a narrow rule can restrict a broad one. An ID no rule matches gets nothing. A rule
//! may also allow DNS and IP names in the certificate (see [`names`]).

mod decide;
pub mod names;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;

pub use decide::{Ask, Decision, Denial, Limits, check_names, decide};
pub use names::NameRules;

use crate::spiffe::{IdError, IdPattern, SpiffeId, TrustDomain, normalize_roles};

/// Path prefix reserved for the CA's own identities (server, admin).
pub const RESERVED_PREFIX: &str = "/lanyard/";

/// Whether `id`'s path is (under) the reserved `/lanyard/` path.
pub fn is_reserved(id: &SpiffeId) -> bool {
    format!("{}/", id.path()).starts_with(RESERVED_PREFIX)
}

/// Role that authorizes admin calls.
pub const ROLE_ADMIN: &str = "lanyard:admin";
/// Role that authorizes reading the audit log.
pub const ROLE_AUDITOR: &str = "lanyard:auditor";
/// Role that authorizes approving access requests.
pub const ROLE_APPROVER: &str = "lanyard:approver";

/// A rule as written in TOML.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// `spiffe://td/path` or `spiffe://td/prefix/*`.
    pub spiffe_id: String,
    /// Roles the matching identities may hold.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Longest certificate lifetime, e.g. `"10m"`.
    #[serde(default, with = "crate::config::opt_duration")]
    pub max_ttl: Option<Duration>,
    /// DNS names the certificate may carry: exact, `*.suffix`, or templates such as
    /// `{sa}.{ns}.svc.cluster.local` bound by `id_pattern`.
    #[serde(default)]
    pub dns: Vec<String>,
    /// IP addresses the certificate may carry: exact or CIDR.
    #[serde(default)]
    pub ip: Vec<String>,
    /// Path template binding `dns` template variables to ID segments, e.g. `/ns/{ns}/sa/{sa}`.
    #[serde(default)]
    pub id_pattern: Option<String>,
}

/// Why a policy was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A rule's pattern or roles are malformed.
    #[error("policy rule {index} ({spiffe_id}): {source}")]
    Id {
        /// 1-based rule index.
        index: usize,
        /// The rule's pattern as written.
        spiffe_id: String,
        /// What is wrong.
        source: IdError,
    },
    /// A rule is for another trust domain.
    #[error("policy rule {index} ({spiffe_id}) is outside trust domain {td}")]
    ForeignDomain {
        /// 1-based rule index.
        index: usize,
        /// The pattern.
        spiffe_id: String,
        /// This CA's trust domain.
        td: String,
    },
    /// An `[[access]]` rule names a trust domain that is neither this CA's nor federated.
    #[error(
        "access rule {index} ({spiffe_id}) is outside trust domain {td} and names no [[federation]] domain"
    )]
    UnknownDomain {
        /// 1-based rule index.
        index: usize,
        /// The pattern.
        spiffe_id: String,
        /// This CA's trust domain.
        td: String,
    },
    /// A rule targets the reserved `/lanyard/` path.
    #[error("policy rule {index} ({spiffe_id}) targets the reserved path /lanyard/")]
    Reserved {
        /// 1-based rule index.
        index: usize,
        /// The pattern.
        spiffe_id: String,
    },
    /// A rule's `dns`, `ip` or `id_pattern` entry is malformed.
    #[error("policy rule {index} ({spiffe_id}): {why}")]
    Names {
        /// 1-based rule index.
        index: usize,
        /// The pattern.
        spiffe_id: String,
        /// What is wrong.
        why: String,
    },
    /// Two rules have the same pattern.
    #[error("policy has two rules for {0}")]
    Duplicate(String),
    /// A rule's max_ttl is zero or above the server's hard cap.
    #[error("policy rule {index} ({spiffe_id}): max_ttl must be between 1s and {cap:?}")]
    Ttl {
        /// 1-based rule index.
        index: usize,
        /// The pattern.
        spiffe_id: String,
        /// The server's max_cert_lifetime.
        cap: Duration,
    },
}

/// A temporary-access rule as written in TOML: which roles an identity may *request*.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessRuleSpec {
    /// `spiffe://td/path` or `spiffe://td/prefix/*`: who may receive the roles.
    pub spiffe_id: String,
    /// Roles that may be requested.
    pub roles: Vec<String>,
    /// Longest grant, e.g. `"1h"`.
    #[serde(default, with = "crate::config::opt_duration")]
    pub max_duration: Option<Duration>,
    /// Approvals needed from distinct `lanyard:approver` holders (default 1).
    #[serde(default)]
    pub approvals: Option<u32>,
}

/// One validated temporary-access rule.
#[derive(Debug, Clone)]
pub struct AccessRule {
    /// Who may receive the roles.
    pub pattern: IdPattern,
    /// Requestable roles, sorted.
    pub roles: Vec<String>,
    /// Longest grant.
    pub max_duration: Duration,
    /// Approvals needed (at least 1).
    pub approvals: u32,
}

/// One validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Which IDs it covers.
    pub pattern: IdPattern,
    /// Roles allowed, sorted.
    pub roles: Vec<String>,
    /// Longest certificate lifetime.
    pub max_ttl: Duration,
    /// DNS and IP names allowed in the certificate.
    pub names: NameRules,
}

/// A validated policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    access: Vec<AccessRule>,
}

/// The live policy, swapped atomically on reload.
#[derive(Debug, Clone, Default)]
pub struct PolicyHandle(Arc<RwLock<Arc<Policy>>>);

/// Parses rule `index`'s pattern and checks it is in `td`.
fn local_pattern(
    index: usize,
    spiffe_id: &str,
    td: &TrustDomain,
) -> Result<IdPattern, PolicyError> {
    let pattern = IdPattern::parse(spiffe_id).map_err(|source| PolicyError::Id {
        index,
        spiffe_id: spiffe_id.to_string(),
        source,
    })?;
    if pattern.trust_domain_name() != td.as_str() {
        return Err(PolicyError::ForeignDomain {
            index,
            spiffe_id: spiffe_id.to_string(),
            td: td.to_string(),
        });
    }
    Ok(pattern)
}

impl Policy {
    /// SHA-256 (hex) of the validated rules and access rules, in order: two replicas whose
    /// files differ only in comments or layout get the same value, and any change of what
    /// the policy decides changes it.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        crate::encoding::hex(&Sha256::digest(format!("{:?}", self).as_bytes()))
    }

    /// Validates rules for trust domain `td`. `default_max_ttl` applies to rules without one;
    /// `cap` is the server's hard maximum.
    pub fn from_specs(
        specs: &[RuleSpec],
        td: &TrustDomain,
        default_max_ttl: Duration,
        cap: Duration,
    ) -> Result<Self, PolicyError> {
        let mut rules: Vec<Rule> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let index = i + 1;
            let id_err = |source| PolicyError::Id {
                index,
                spiffe_id: spec.spiffe_id.clone(),
                source,
            };
            let pattern = local_pattern(index, &spec.spiffe_id, td)?;
            let (IdPattern::Exact(id) | IdPattern::Prefix(id)) = &pattern;
            if is_reserved(id) {
                return Err(PolicyError::Reserved {
                    index,
                    spiffe_id: spec.spiffe_id.clone(),
                });
            }
            let roles = normalize_roles(&spec.roles).map_err(id_err)?;
            let max_ttl = spec.max_ttl.unwrap_or(default_max_ttl.min(cap));
            if max_ttl.is_zero() || max_ttl > cap {
                return Err(PolicyError::Ttl {
                    index,
                    spiffe_id: spec.spiffe_id.clone(),
                    cap,
                });
            }
            if rules.iter().any(|r| r.pattern == pattern) {
                return Err(PolicyError::Duplicate(pattern.to_string()));
            }
            let names = NameRules::parse(&spec.dns, &spec.ip, spec.id_pattern.as_deref()).map_err(
                |why| PolicyError::Names {
                    index,
                    spiffe_id: spec.spiffe_id.clone(),
                    why,
                },
            )?;
            rules.push(Rule {
                pattern,
                roles,
                max_ttl,
                names,
            });
        }
        Ok(Self {
            rules,
            access: Vec::new(),
        })
    }

    /// Adds temporary-access rules for trust domain `td`. A rule may also name identities of a
    /// `federated` trust domain: they request access with their own domain's certificates, and
    /// this domain's services learn their grants from `Access.WatchGrants`. A grant may last at
    /// most 7 days (max_cert_lifetime bounds certificates, not grants; a certificate never
    /// outlives its grant).
    pub fn with_access(
        mut self,
        specs: &[AccessRuleSpec],
        td: &TrustDomain,
        federated: &[TrustDomain],
    ) -> Result<Self, PolicyError> {
        const MAX_GRANT: Duration = Duration::from_secs(7 * 24 * 3600);
        for (i, spec) in specs.iter().enumerate() {
            let index = i + 1;
            let id_err = |source| PolicyError::Id {
                index,
                spiffe_id: spec.spiffe_id.clone(),
                source,
            };
            let pattern = IdPattern::parse(&spec.spiffe_id).map_err(id_err)?;
            let domain = pattern.trust_domain_name();
            if domain != td.as_str() && !federated.iter().any(|f| f.as_str() == domain) {
                return Err(PolicyError::UnknownDomain {
                    index,
                    spiffe_id: spec.spiffe_id.clone(),
                    td: td.to_string(),
                });
            }
            let roles = normalize_roles(&spec.roles).map_err(id_err)?;
            let max_duration = spec.max_duration.unwrap_or(Duration::from_secs(3600));
            if max_duration.is_zero() || max_duration > MAX_GRANT {
                return Err(PolicyError::Ttl {
                    index,
                    spiffe_id: spec.spiffe_id.clone(),
                    cap: MAX_GRANT,
                });
            }
            if self.access.iter().any(|r| r.pattern == pattern) {
                return Err(PolicyError::Duplicate(format!("[[access]] {pattern}")));
            }
            self.access.push(AccessRule {
                pattern,
                roles,
                max_duration,
                approvals: spec.approvals.unwrap_or(1).max(1),
            });
        }
        Ok(self)
    }

    /// The most specific temporary-access rule matching `id`, if any.
    pub fn lookup_access(&self, id: &SpiffeId) -> Option<&AccessRule> {
        self.access
            .iter()
            .filter(|r| r.pattern.matches(id))
            .max_by_key(|r| r.pattern.specificity())
    }

    /// The most specific rule matching `id`, if any.
    pub fn lookup(&self, id: &SpiffeId) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| r.pattern.matches(id))
            .max_by_key(|r| r.pattern.specificity())
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl RuleSpec {
    /// A rule for nothing, for building one field by field (tests, examples).
    pub fn empty() -> Self {
        Self {
            spiffe_id: String::new(),
            roles: Vec::new(),
            max_ttl: None,
            dns: Vec::new(),
            ip: Vec::new(),
            id_pattern: None,
        }
    }
}

impl PolicyHandle {
    /// A handle holding `policy`.
    pub fn new(policy: Policy) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The current policy.
    pub fn current(&self) -> Arc<Policy> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the policy for every later call.
    pub fn replace(&self, policy: Policy) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, roles: &[&str], ttl: Option<u64>) -> RuleSpec {
        RuleSpec {
            spiffe_id: id.into(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            max_ttl: ttl.map(Duration::from_secs),
            ..RuleSpec::empty()
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    const CAP: Duration = Duration::from_secs(86400);
    const DEF: Duration = Duration::from_secs(3600);

    #[test]
    fn most_specific_rule_wins() {
        let p = Policy::from_specs(
            &[
                spec("spiffe://example.org/ns/*", &["read"], None),
                spec(
                    "spiffe://example.org/ns/prod/*",
                    &["read", "deploy"],
                    Some(600),
                ),
                spec(
                    "spiffe://example.org/ns/prod/sa/api",
                    &["db-read"],
                    Some(60),
                ),
            ],
            &td(),
            DEF,
            CAP,
        )
        .unwrap();
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        assert_eq!(
            p.lookup(&id("spiffe://example.org/ns/dev/x"))
                .unwrap()
                .roles,
            vec!["read"]
        );
        assert_eq!(
            p.lookup(&id("spiffe://example.org/ns/prod/x"))
                .unwrap()
                .max_ttl
                .as_secs(),
            600
        );
        assert_eq!(
            p.lookup(&id("spiffe://example.org/ns/prod/sa/api"))
                .unwrap()
                .roles,
            vec!["db-read"]
        );
        assert!(p.lookup(&id("spiffe://example.org/other")).is_none());
    }

    #[test]
    fn rejects_bad_rules() {
        for bad in [
            vec![spec("spiffe://other.org/x", &[], None)],
            vec![spec(
                "spiffe://example.org/lanyard/admin",
                &["lanyard:admin"],
                None,
            )],
            vec![spec("spiffe://example.org/lanyard/*", &[], None)],
            vec![spec("spiffe://example.org/x", &["Bad Role"], None)],
            vec![spec("spiffe://example.org/x", &[], Some(0))],
            vec![spec("spiffe://example.org/x", &[], Some(CAP.as_secs() + 1))],
            vec![
                spec("spiffe://example.org/x", &[], None),
                spec("spiffe://example.org/x", &[], None),
            ],
        ] {
            assert!(
                Policy::from_specs(&bad, &td(), DEF, CAP).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn access_rules_may_name_federated_domains_only() {
        let spec = |id: &str| AccessRuleSpec {
            spiffe_id: id.into(),
            roles: vec!["db-admin".into()],
            max_duration: None,
            approvals: None,
        };
        let b = TrustDomain::new("b.example").unwrap();
        let p = Policy::default()
            .with_access(
                &[
                    spec("spiffe://example.org/ops/*"),
                    spec("spiffe://b.example/ops/*"),
                ],
                &td(),
                std::slice::from_ref(&b),
            )
            .unwrap();
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        assert!(
            p.lookup_access(&id("spiffe://b.example/ops/alice"))
                .is_some()
        );
        assert!(
            p.lookup_access(&id("spiffe://c.example/ops/alice"))
                .is_none()
        );
        let err = Policy::default()
            .with_access(&[spec("spiffe://c.example/ops/*")], &td(), &[b])
            .unwrap_err();
        assert!(matches!(err, PolicyError::UnknownDomain { .. }), "{err}");
    }
}
