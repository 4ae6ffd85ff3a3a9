//! JWT/OIDC attestation: turns a signed token from a configured issuer (a Kubernetes
//! service-account token, a GitHub Actions token, any OIDC issuer) into a SPIFFE ID and a role
//! ceiling. Pure verification lives in [`jwt`] and [`mapping`]; [`keys`] fetches and refreshes
//! JWKS. Issuance asks [`Attestors::attest`] as it asks the token store for join tokens; policy
//! still decides roles and lifetime. See docs/attestation.md.

pub mod jwt;
pub mod keys;
pub mod mapping;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use self::jwt::{Alg, JwtError, Rules, Unverified};
use self::keys::{KeySet, KeySource};
use self::mapping::{Kind, MappingError, Template};
use crate::spiffe::{SpiffeId, TrustDomain, normalize_roles};

/// Defaults of the `[[attestor]]` keys.
pub mod defaults {
    use std::time::Duration;

    /// Key refresh interval.
    pub const REFRESH: Duration = Duration::from_secs(3600);
    /// Longest token age since `iat`. Kubernetes rotates projected tokens at 80 % of
    /// `expirationSeconds` (1 h by default, so at most 48 min old); GitHub's live minutes.
    pub const MAX_TOKEN_AGE: Duration = Duration::from_secs(3600);
    /// Clock skew allowed on `exp`, `nbf`, `iat`.
    pub const SKEW: Duration = Duration::from_secs(30);
    /// Algorithms accepted.
    pub const ALGORITHMS: &[&str] = &["RS256", "ES256"];
}

/// Prefix of the store key under which a used JWT's hash is kept (as a spent token record).
pub const USED_JWT_PREFIX: &str = "jwt-";

/// One `[[attestor]]` table, as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttestorSpec {
    /// Label in audit events and logs.
    pub name: String,
    /// `kubernetes`, `github` or `jwt`.
    pub kind: String,
    /// Exact `iss`.
    pub issuer: String,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// A static JWKS (air-gapped clusters); without it, OIDC discovery over HTTPS.
    pub jwks_file: Option<PathBuf>,
    /// PEM roots for discovery and JWKS fetches (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// Key refresh interval.
    #[serde(default, with = "crate::config::opt_duration")]
    pub refresh: Option<Duration>,
    /// Accepted algorithms (`RS256`, `ES256`).
    pub algorithms: Option<Vec<String>>,
    /// Longest token age since `iat`.
    #[serde(default, with = "crate::config::opt_duration")]
    pub max_token_age: Option<Duration>,
    /// Clock skew.
    #[serde(default, with = "crate::config::opt_duration")]
    pub skew: Option<Duration>,
    /// Path template relative to `spiffe://<trust_domain>/`.
    pub id_template: Option<String>,
    /// Role ceiling (empty: certificates carry no roles).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Certificate lifetime ceiling.
    #[serde(default, with = "crate::config::opt_duration")]
    pub max_ttl: Option<Duration>,
}

/// A validated attestor.
#[derive(Debug, Clone)]
pub struct AttestorConfig {
    /// Label.
    pub name: String,
    /// Claim shape.
    pub kind: Kind,
    /// Verification rules.
    pub rules: Rules,
    /// Key source.
    pub source: KeySource,
    /// Key refresh interval.
    pub refresh: Duration,
    /// ID template.
    pub template: Template,
    /// Role ceiling, normalized.
    pub roles: Vec<String>,
    /// Lifetime ceiling (already capped by `max_cert_lifetime`).
    pub max_ttl: Duration,
}

/// A bad `[[attestor]]` entry; the server refuses to start (exit 64).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[[attestor]] {name:?}: {why}")]
pub struct AttestorConfigError {
    /// The entry's name (or index).
    pub name: String,
    /// What is wrong.
    pub why: String,
}

/// Validates every `[[attestor]]` entry (keys files and roots are read now, so a typo fails the
/// start, not the first token).
pub fn resolve_all(
    specs: &[AttestorSpec],
    max_cert_lifetime: Duration,
) -> Result<Vec<AttestorConfig>, AttestorConfigError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let err = |why: String| AttestorConfigError {
            name: if s.name.is_empty() {
                format!("#{}", i + 1)
            } else {
                s.name.clone()
            },
            why,
        };
        if s.name.is_empty()
            || !s
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(err("name must be non-empty [a-z0-9._-]".into()));
        }
        if !seen.insert(s.name.clone()) {
            return Err(err("two attestors have this name".into()));
        }
        let kind = Kind::parse(&s.kind)
            .ok_or_else(|| err(format!("kind {:?}: use kubernetes, github or jwt", s.kind)))?;
        if s.issuer.is_empty() {
            return Err(err("issuer is empty".into()));
        }
        if s.audiences.is_empty() || s.audiences.iter().any(String::is_empty) {
            return Err(err(
                "audiences must list at least one non-empty audience".into()
            ));
        }
        let source = match &s.jwks_file {
            Some(p) => {
                keys::read_file(p).map_err(err)?;
                KeySource::File(p.clone())
            }
            None => {
                if !s.issuer.starts_with("https://") {
                    return Err(err(format!(
                        "issuer {:?}: discovery needs an https:// issuer; give jwks_file otherwise",
                        s.issuer
                    )));
                }
                let roots = match &s.ca_file {
                    Some(p) => Some(keys::read_roots(p).map_err(err)?),
                    None => None,
                };
                KeySource::Discovery {
                    issuer: s.issuer.clone(),
                    roots,
                }
            }
        };
        let algorithms = match &s.algorithms {
            Some(list) => list
                .iter()
                .map(|a| {
                    Alg::parse(a).ok_or_else(|| {
                        err(format!(
                            "algorithm {a:?}: only RS256 and ES256 are supported"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => defaults::ALGORITHMS
                .iter()
                .filter_map(|a| Alg::parse(a))
                .collect(),
        };
        if algorithms.is_empty() {
            return Err(err("algorithms is empty".into()));
        }
        let refresh = s.refresh.unwrap_or(defaults::REFRESH);
        if refresh < Duration::from_secs(1) {
            return Err(err("refresh must be at least 1s".into()));
        }
        let max_age = s.max_token_age.unwrap_or(defaults::MAX_TOKEN_AGE);
        if max_age.is_zero() {
            return Err(err("max_token_age must be positive".into()));
        }
        let skew = s.skew.unwrap_or(defaults::SKEW);
        if skew > Duration::from_secs(300) {
            return Err(err("skew may be at most 5m".into()));
        }
        let template_src = match (&s.id_template, kind.default_template()) {
            (Some(t), _) => t.as_str(),
            (None, Some(d)) => d,
            (None, None) => {
                return Err(err("kind jwt needs an id_template, e.g. \"u/{sub}\"".into()));
            }
        };
        let template = Template::parse(template_src).map_err(|e| err(e.to_string()))?;
        let roles = normalize_roles(&s.roles).map_err(|e| err(e.to_string()))?;
        let max_ttl = s
            .max_ttl
            .unwrap_or(max_cert_lifetime)
            .min(max_cert_lifetime);
        if max_ttl.is_zero() {
            return Err(err("max_ttl must be positive".into()));
        }
        out.push(AttestorConfig {
            name: s.name.clone(),
            kind,
            rules: Rules {
                issuer: s.issuer.clone(),
                audiences: s.audiences.clone(),
                algorithms,
                max_age: max_age.as_secs(),
                skew: skew.as_secs(),
            },
            source,
            refresh,
            template,
            roles,
            max_ttl,
        });
    }
    Ok(out)
}

/// Why a JWT did not attest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// No attestor is configured at all.
    #[error("this CA has no [[attestor]] configured; bootstrap with a join token")]
    Disabled,
    /// No attestor trusts the token's (unverified) issuer.
    #[error("no attestor trusts issuer {0:?}")]
    UnknownIssuer(String),
    /// Verification failed.
    #[error("attestor {0}: {1}")]
    Jwt(String, JwtError),
    /// The token names a key the CA does not have, and the last key fetch failed.
    #[error("attestor {0}: no key with kid {1:?}; the last fetch of the issuer's keys failed: {2}")]
    KeysUnavailable(String, String, String),
    /// The verified claims cannot make an ID.
    #[error("attestor {0}: {1}")]
    Mapping(String, MappingError),
}

impl AttestError {
    /// Whether the token itself failed to authenticate (vs. verified claims that cannot map).
    pub fn is_unauthenticated(&self) -> bool {
        !matches!(self, Self::Mapping(..))
    }

    /// The attestor that verified the token, when it did (a mapping failure).
    pub fn attestor(&self) -> Option<&str> {
        match self {
            Self::Mapping(name, _) => Some(name),
            _ => None,
        }
    }
}

/// A verified token, mapped.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The attestor's name.
    pub attestor: String,
    /// The token's issuer.
    pub issuer: String,
    /// The derived identity.
    pub spiffe_id: SpiffeId,
    /// The attestor's role ceiling.
    pub roles: Vec<String>,
    /// The attestor's lifetime ceiling.
    pub max_ttl: Duration,
    /// The claims that made the ID, and the kind's audit extras (pod, workflow...).
    pub claims: Vec<(String, String)>,
    /// SHA-256 of the token, for replay detection.
    pub token_hash: [u8; 32],
    /// When the token stops being acceptable: `exp`, or `iat` + max_token_age if sooner
    /// (plus skew); its spent record is kept until then.
    pub expires_at: i64,
}

impl Attested {
    /// The audit reason: attestor, issuer and the claims that made the ID.
    pub fn describe(&self) -> String {
        let claims: Vec<String> = self
            .claims
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "attestor {} (issuer {}): {}",
            self.attestor,
            self.issuer,
            claims.join(" ")
        )
    }
}

struct Attestor {
    cfg: AttestorConfig,
    keys: Arc<KeySet>,
}

/// Every configured attestor, plus the in-flight guard against concurrent replays.
pub struct Attestors {
    list: Vec<Attestor>,
    trust_domain: TrustDomain,
    in_flight: Mutex<HashSet<[u8; 32]>>,
}

impl Attestors {
    /// Builds the attestors; call [`Self::spawn_refresh`] to load and refresh keys.
    pub fn new(configs: Vec<AttestorConfig>, trust_domain: TrustDomain) -> Self {
        let list = configs
            .into_iter()
            .map(|cfg| Attestor {
                keys: Arc::new(KeySet::new(cfg.source.clone(), cfg.refresh)),
                cfg,
            })
            .collect();
        Self {
            list,
            trust_domain,
            in_flight: Mutex::new(HashSet::new()),
        }
    }

    /// Starts each attestor's refresh loop (first fetch at once); abort the handles to stop.
    pub fn spawn_refresh(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.list
            .iter()
            .map(|a| {
                let keys = a.keys.clone();
                let name = a.cfg.name.clone();
                tokio::spawn(tracing::Instrument::instrument(
                    keys.run(),
                    tracing::info_span!("attestor", name),
                ))
            })
            .collect()
    }

    /// What an unverified token claims (issuer and subject), for refusal audit events; bounded.
    pub fn claimed(token: &str) -> String {
        let Ok(t) = Unverified::parse(token) else {
            return "jwt (malformed)".into();
        };
        let s = |k: &str| {
            t.claims
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        // Unverified and attacker-chosen: bounded, and no control characters that could forge
        // lines in `audit tail`.
        format!("jwt iss={} sub={}", s("iss"), s("sub"))
            .chars()
            .take(256)
            .map(|ch| if ch.is_control() { '?' } else { ch })
            .collect()
    }

    /// Verifies `token` with the attestor that trusts its issuer and maps its claims.
    pub async fn attest(&self, token: &str, now: i64) -> Result<Attested, AttestError> {
        if self.list.is_empty() {
            return Err(AttestError::Disabled);
        }
        let parsed = Unverified::parse(token).map_err(|e| AttestError::Jwt("?".into(), e))?;
        let iss = parsed.issuer().unwrap_or_default().to_string();
        let mut last = AttestError::UnknownIssuer(iss.clone());
        for a in self.list.iter().filter(|a| a.cfg.rules.issuer == iss) {
            match self.attest_with(a, parsed.clone(), token, now).await {
                Ok(ok) => return Ok(ok),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn attest_with(
        &self,
        a: &Attestor,
        parsed: Unverified,
        token: &str,
        now: i64,
    ) -> Result<Attested, AttestError> {
        let name = &a.cfg.name;
        let jwt_err = |e| AttestError::Jwt(name.clone(), e);
        let claims = match parsed.clone().verify(&a.keys.current(), &a.cfg.rules, now) {
            Err(JwtError::UnknownKey(kid)) => {
                if a.keys.refresh_for_unknown_kid(&kid).await {
                    parsed.verify(&a.keys.current(), &a.cfg.rules, now)
                } else {
                    Err(JwtError::UnknownKey(kid))
                }
            }
            other => other,
        };
        let claims = claims.map_err(|e| match (e, a.keys.last_error()) {
            (JwtError::UnknownKey(kid), Some(fetch)) => {
                AttestError::KeysUnavailable(name.clone(), kid, fetch)
            }
            (e, _) => jwt_err(e),
        })?;
        let map_err = |e| AttestError::Mapping(name.clone(), e);
        let (path, used) = a
            .cfg
            .template
            .render(a.cfg.kind, &claims)
            .map_err(map_err)?;
        let spiffe_id = SpiffeId::parse(&format!("spiffe://{}/{path}", self.trust_domain))
            .map_err(|e| {
                map_err(MappingError::BadValue(
                    "id_template".into(),
                    path.clone(),
                    e.to_string(),
                ))
            })?;
        // Past either bound the token is refused anyway, so its spent record can go then: a
        // year-long legacy token costs a record for max_token_age, not a year.
        let time = |k: &str| claims.get(k).and_then(Value::as_f64).unwrap_or(0.0) as i64;
        let rules = &a.cfg.rules;
        let expires_at =
            time("exp").min(time("iat").saturating_add(rules.max_age as i64)) + rules.skew as i64;
        Ok(Attested {
            attestor: name.clone(),
            issuer: a.cfg.rules.issuer.clone(),
            spiffe_id,
            roles: a.cfg.roles.clone(),
            max_ttl: a.cfg.max_ttl,
            claims: used,
            token_hash: Sha256::digest(token.trim().as_bytes()).into(),
            expires_at,
        })
    }

    /// Marks a token hash in flight; `None` if another request is using the same token now.
    /// The guard clears it when dropped (after that request's outcome is durable).
    pub fn claim(&self, hash: [u8; 32]) -> Option<InFlight<'_>> {
        let mut set = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(hash).then_some(InFlight { owner: self, hash })
    }
}

/// A token being used by one request (see [`Attestors::claim`]).
pub struct InFlight<'a> {
    owner: &'a Attestors,
    hash: [u8; 32],
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut set = self
            .owner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.remove(&self.hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> Result<Vec<AttestorConfig>, AttestorConfigError> {
        #[derive(Deserialize)]
        struct F {
            attestor: Vec<AttestorSpec>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        resolve_all(&f.attestor, Duration::from_secs(3600))
    }

    #[test]
    fn config_defaults_and_refusals() {
        let ok = spec(
            "[[attestor]]\nname = \"k\"\nkind = \"kubernetes\"\nissuer = \"https://k\"\naudiences = [\"lanyard\"]\n",
        )
        .unwrap();
        assert_eq!(
            ok[0].template.as_str(),
            "ns/{namespace}/sa/{serviceaccount}"
        );
        assert_eq!(ok[0].rules.algorithms, vec![Alg::Rs256, Alg::Es256]);
        assert_eq!(ok[0].rules.max_age, 3600);
        assert_eq!(ok[0].max_ttl, Duration::from_secs(3600));
        assert!(ok[0].roles.is_empty(), "no roles unless listed");
        let base = "name = \"k\"\naudiences = [\"lanyard\"]\n";
        for (bad, why) in [
            ("kind = \"spire\"\nissuer = \"https://k\"", "kind"),
            ("kind = \"kubernetes\"\nissuer = \"http://k\"", "https"),
            ("kind = \"jwt\"\nissuer = \"https://k\"", "id_template"),
            (
                "kind = \"github\"\nissuer = \"https://k\"\nalgorithms = [\"HS256\"]",
                "HS256",
            ),
            (
                "kind = \"github\"\nissuer = \"https://k\"\nalgorithms = []",
                "empty",
            ),
            (
                "kind = \"github\"\nissuer = \"https://k\"\nid_template = \"gh/static\"",
                "names no claim",
            ),
            (
                "kind = \"github\"\nissuer = \"https://k\"\njwks_file = \"/nonexistent\"",
                "jwks_file",
            ),
            (
                "kind = \"github\"\nissuer = \"https://k\"\nroles = [\"Admin\"]",
                "Admin",
            ),
            (
                "kind = \"github\"\nissuer = \"https://k\"\nskew = \"10m\"",
                "skew",
            ),
        ] {
            let e = spec(&format!("[[attestor]]\n{base}{bad}\n")).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let twice = "[[attestor]]\nname = \"k\"\nkind = \"github\"\nissuer = \"https://k\"\naudiences = [\"a\"]\n";
        assert!(spec(&format!("{twice}{twice}")).is_err());
    }
}
