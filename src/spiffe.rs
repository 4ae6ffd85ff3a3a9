//! SPIFFE IDs, trust domains, ID patterns and role names: parsed once, at the edge.

use std::fmt;

/// Why a SPIFFE ID, pattern or role name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The string does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The trust domain is empty or has characters outside `[a-z0-9.-_]`.
    #[error(
        "{0:?} has an invalid trust domain (allowed: lowercase letters, digits, '.', '-', '_')"
    )]
    TrustDomain(String),
    /// A path segment is empty, `.` or `..`, or has characters outside `[A-Za-z0-9.-_]`.
    #[error(
        "{0:?} has an invalid path (segments of letters, digits, '.', '-', '_'; no empty, '.' or '..' segment)"
    )]
    Path(String),
    /// The ID carries a query, fragment, port or user info.
    #[error("{0:?} must not carry a query, fragment, port or user info")]
    Extra(String),
    /// The ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
    /// A role name does not match `[a-z0-9][a-z0-9._:-]{0,63}`.
    #[error(
        "{0:?} is not a valid role name (1-64 chars of [a-z0-9._:-], starting with a letter or digit)"
    )]
    Role(String),
}

/// A validated trust domain name, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A validated SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    td_len: usize,
}

/// A SPIFFE ID or a `spiffe://td/prefix/*` pattern matching every ID below the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID whose path starts with `prefix` + `/` (the prefix itself does not match).
    Prefix(SpiffeId),
}

/// Checks a role name against `[a-z0-9][a-z0-9._:-]{0,63}`.
pub fn validate_role(role: &str) -> Result<(), IdError> {
    let ok = !role.is_empty()
        && role.len() <= 64
        && role
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && role.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b':' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(IdError::Role(role.chars().take(80).collect()))
    }
}

/// Validates role names, then sorts and de-duplicates them.
pub fn normalize_roles<I, S>(roles: I) -> Result<Vec<String>, IdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = Vec::new();
    for r in roles {
        let r = r.as_ref().trim();
        validate_role(r)?;
        out.push(r.to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, IdError> {
        let valid = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if valid {
            Ok(Self(name.to_string()))
        } else {
            Err(IdError::TrustDomain(name.to_string()))
        }
    }

    /// The name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain as a SPIFFE ID string, `spiffe://example.org`.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }

    /// Builds an ID in this trust domain from a path that starts with `/`.
    pub fn id(&self, path: &str) -> Result<SpiffeId, IdError> {
        SpiffeId::parse(&format!("spiffe://{}{}", self.0, path))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parses and validates a SPIFFE ID per the SPIFFE-ID specification. An ID must have a path:
    /// Lanyard never issues a certificate for a bare trust domain.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > 2048 {
            return Err(IdError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdError::Scheme(s.to_string()))?;
        if rest.contains(['?', '#', '@', ':']) {
            return Err(IdError::Extra(s.to_string()));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => return Err(IdError::Path(s.to_string())),
        };
        TrustDomain::new(td).map_err(|_| IdError::TrustDomain(s.to_string()))?;
        let segments_ok = path[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        });
        if !segments_ok {
            return Err(IdError::Path(s.to_string()));
        }
        Ok(Self {
            full: s.to_string(),
            td_len: td.len(),
        })
    }

    /// The whole ID, `spiffe://td/path`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain name.
    pub fn trust_domain_name(&self) -> &str {
        &self.full["spiffe://".len().."spiffe://".len() + self.td_len]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_string())
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.full["spiffe://".len() + self.td_len..]
    }

    /// Whether this ID is in `td`.
    pub fn is_in(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// === impl IdPattern ===

impl IdPattern {
    /// Parses `spiffe://td/path` (exact) or `spiffe://td/prefix/*` (below the prefix).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        match s.strip_suffix("/*") {
            Some(prefix) => Ok(Self::Prefix(SpiffeId::parse(prefix)?)),
            None => Ok(Self::Exact(SpiffeId::parse(s)?)),
        }
    }

    /// Whether `id` matches the pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(e) => e == id,
            Self::Prefix(p) => id
                .as_str()
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }

    /// How specific the pattern is: exact beats any prefix, a longer prefix beats a shorter one.
    pub fn specificity(&self) -> usize {
        match self {
            Self::Exact(_) => usize::MAX,
            Self::Prefix(p) => p.as_str().len(),
        }
    }

    /// The trust domain the pattern lives in.
    pub fn trust_domain_name(&self) -> &str {
        match self {
            Self::Exact(id) | Self::Prefix(id) => id.trust_domain_name(),
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Prefix(id) => write!(f, "{id}/*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/api").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/api");
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "http://example.org/x",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://Example.org/x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org:8080/a",
            "spiffe://user@example.org/a",
            "spiffe:///a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn prefix_patterns_match_below_prefix_only() {
        let p = IdPattern::parse("spiffe://example.org/ns/prod/*").unwrap();
        assert!(p.matches(&SpiffeId::parse("spiffe://example.org/ns/prod/sa/api").unwrap()));
        assert!(!p.matches(&SpiffeId::parse("spiffe://example.org/ns/prod").unwrap()));
        assert!(!p.matches(&SpiffeId::parse("spiffe://example.org/ns/production/x").unwrap()));
    }

    #[test]
    fn roles_are_validated_sorted_and_deduplicated() {
        assert_eq!(
            normalize_roles(["deploy", "db-read", "deploy"]).unwrap(),
            vec!["db-read", "deploy"]
        );
        assert!(normalize_roles(["Admin"]).is_err());
        assert!(normalize_roles(["-x"]).is_err());
        assert!(normalize_roles([&"a".repeat(65)]).is_err());
        assert!(normalize_roles(["lanyard:admin"]).is_ok());
    }
}
