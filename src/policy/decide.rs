//! The issuance decision: roles and ttl for one request, or why not.

use std::time::Duration;

use super::Policy;
use crate::ca::SanNames;
use crate::spiffe::SpiffeId;

/// Server-wide lifetime limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Lifetime when the request names none (capped by the maximum that applies).
    pub default_ttl: Duration,
    /// Shortest lifetime a request may ask for.
    pub min_ttl: Duration,
}

/// One issuance request, as policy sees it.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    /// The identity.
    pub spiffe_id: &'a SpiffeId,
    /// Roles the credential (token or enrollment) allows; policy is applied on top.
    pub ceiling_roles: &'a [String],
    /// Lifetime the credential allows, if it limits it.
    pub ceiling_ttl: Option<Duration>,
    /// Roles explicitly asked for; empty means all that are allowed.
    pub requested_roles: &'a [String],
    /// Lifetime asked for; `None` means the default.
    pub requested_ttl: Option<Duration>,
}

/// What policy grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Roles for the certificate, sorted.
    pub roles: Vec<String>,
    /// Lifetime for the certificate.
    pub ttl: Duration,
}

/// Why policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denial {
    /// No rule covers the identity.
    #[error("no policy rule allows {0}")]
    NoRule(String),
    /// A requested role is not allowed for the identity.
    #[error("role {role:?} is not allowed for {spiffe_id} (allowed: {allowed})")]
    Role {
        /// The role asked for.
        role: String,
        /// The identity.
        spiffe_id: String,
        /// What is allowed, comma-separated.
        allowed: String,
    },
    /// The requested ttl is above what policy or the credential allows.
    #[error("ttl {asked}s is above the maximum of {max}s for {spiffe_id}")]
    TtlTooLong {
        /// Seconds asked.
        asked: u64,
        /// Seconds allowed.
        max: u64,
        /// The identity.
        spiffe_id: String,
    },
    /// A DNS or IP name in the CSR is not allowed for the identity.
    #[error("name {name:?} is not allowed for {spiffe_id} (allowed: {allowed})")]
    Name {
        /// The name asked for.
        name: String,
        /// The identity.
        spiffe_id: String,
        /// What the rule allows, comma-separated.
        allowed: String,
    },
    /// The requested ttl is below the server's floor.
    #[error("ttl {asked}s is below the minimum of {min}s")]
    TtlTooShort {
        /// Seconds asked.
        asked: u64,
        /// The floor.
        min: u64,
    },
}

/// Decides roles and ttl: the intersection of policy, the credential's ceiling and the request.
pub fn decide(policy: &Policy, limits: Limits, ask: &Ask<'_>) -> Result<Decision, Denial> {
    let id = ask.spiffe_id.as_str();
    let rule = policy
        .lookup(ask.spiffe_id)
        .ok_or_else(|| Denial::NoRule(id.to_string()))?;
    let allowed: Vec<String> = rule
        .roles
        .iter()
        .filter(|r| ask.ceiling_roles.contains(r))
        .cloned()
        .collect();
    let roles = if ask.requested_roles.is_empty() {
        allowed
    } else {
        for r in ask.requested_roles {
            if !allowed.contains(r) {
                return Err(Denial::Role {
                    role: r.clone(),
                    spiffe_id: id.to_string(),
                    allowed: if allowed.is_empty() {
                        "none".into()
                    } else {
                        allowed.join(",")
                    },
                });
            }
        }
        let mut r = ask.requested_roles.to_vec();
        r.sort();
        r.dedup();
        r
    };
    let max = ask
        .ceiling_ttl
        .map_or(rule.max_ttl, |c| c.min(rule.max_ttl));
    let ttl = match ask.requested_ttl {
        None => limits.default_ttl.min(max),
        Some(t) if t > max => {
            return Err(Denial::TtlTooLong {
                asked: t.as_secs(),
                max: max.as_secs(),
                spiffe_id: id.to_string(),
            });
        }
        Some(t) if t < limits.min_ttl => {
            return Err(Denial::TtlTooShort {
                asked: t.as_secs(),
                min: limits.min_ttl.as_secs(),
            });
        }
        Some(t) => t,
    };
    Ok(Decision { roles, ttl })
}

/// Checks that the rule covering `id` allows every one of `names` (nothing is allowed without a
/// rule, and a rule without `dns`/`ip` allows no names).
pub fn check_names(policy: &Policy, id: &SpiffeId, names: &SanNames) -> Result<(), Denial> {
    if names.is_empty() {
        return Ok(());
    }
    let rule = policy
        .lookup(id)
        .ok_or_else(|| Denial::NoRule(id.to_string()))?;
    match rule.names.first_refused(id, names) {
        None => Ok(()),
        Some(name) => Err(Denial::Name {
            name,
            spiffe_id: id.to_string(),
            allowed: rule.names.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RuleSpec;
    use crate::spiffe::TrustDomain;

    fn policy() -> Policy {
        Policy::from_specs(
            &[RuleSpec {
                spiffe_id: "spiffe://example.org/ns/prod/*".into(),
                roles: vec!["db-read".into(), "deploy".into()],
                max_ttl: Some(Duration::from_secs(600)),
                ..RuleSpec::empty()
            }],
            &TrustDomain::new("example.org").unwrap(),
            Duration::from_secs(3600),
            Duration::from_secs(86400),
        )
        .unwrap()
    }

    const LIMITS: Limits = Limits {
        default_ttl: Duration::from_secs(300),
        min_ttl: Duration::from_secs(30),
    };

    #[test]
    fn intersects_policy_ceiling_and_request() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/api").unwrap();
        let ceiling = vec!["db-read".to_string(), "other".to_string()];
        let d = decide(
            &policy(),
            LIMITS,
            &Ask {
                spiffe_id: &id,
                ceiling_roles: &ceiling,
                ceiling_ttl: Some(Duration::from_secs(120)),
                requested_roles: &[],
                requested_ttl: None,
            },
        )
        .unwrap();
        assert_eq!(d.roles, vec!["db-read"]);
        assert_eq!(d.ttl.as_secs(), 120);
    }

    #[test]
    fn refuses_roles_and_ttls_out_of_bounds() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/api").unwrap();
        let all = vec!["db-read".to_string(), "deploy".to_string()];
        let ask = |roles: &'static [String], ttl| Ask {
            spiffe_id: &id,
            ceiling_roles: &all,
            ceiling_ttl: None,
            requested_roles: roles,
            requested_ttl: ttl,
        };
        let admin: &'static [String] = Box::leak(Box::new(["admin".to_string()]));
        assert!(matches!(
            decide(&policy(), LIMITS, &ask(admin, None)),
            Err(Denial::Role { .. })
        ));
        assert!(matches!(
            decide(&policy(), LIMITS, &ask(&[], Some(Duration::from_secs(601)))),
            Err(Denial::TtlTooLong { .. })
        ));
        assert!(matches!(
            decide(&policy(), LIMITS, &ask(&[], Some(Duration::from_secs(10)))),
            Err(Denial::TtlTooShort { .. })
        ));
        let other = SpiffeId::parse("spiffe://example.org/ns/dev/api").unwrap();
        assert!(matches!(
            decide(
                &policy(),
                LIMITS,
                &Ask {
                    spiffe_id: &other,
                    ..ask(&[], None)
                }
            ),
            Err(Denial::NoRule(_))
        ));
    }
}
