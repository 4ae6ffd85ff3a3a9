//! `[[federation]]` entries: which foreign trust domains to trust, where their bundle endpoints
//! are, and how to authenticate those endpoints. Parsed into real types at load.

use std::path::PathBuf;

use hyper::Uri;
use serde::Deserialize;

use crate::spiffe::{SpiffeId, TrustDomain};

/// One `[[federation]]` entry as written in the config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FederationSpec {
    /// The foreign trust domain, e.g. `b.example`.
    pub trust_domain: String,
    /// `https://host:port/path` of its bundle endpoint.
    pub bundle_endpoint_url: String,
    /// `https_spiffe` (default) or `https_web`.
    pub profile: Option<String>,
    /// https_spiffe: the SPIFFE ID the endpoint must present, e.g.
    /// `spiffe://b.example/lanyard/server`.
    pub endpoint_spiffe_id: Option<String>,
    /// https_spiffe: a first bundle of the foreign domain (SPIFFE JWKS or PEM), used until the
    /// first successful fetch. Not needed once a bundle was fetched or imported.
    pub initial_bundle: Option<PathBuf>,
    /// https_web: PEM file of the web PKI roots that authenticate the endpoint.
    pub ca_file: Option<PathBuf>,
    /// `host:port` of the federated domain's Lanyard CA (its gRPC API): when set, this CA
    /// follows that CA's revocations and relays them to its own workloads.
    pub revocation_server: Option<String>,
}

/// How a bundle endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// The endpoint presents an X.509-SVID with `endpoint_id`, verified against the current
    /// bundle of `endpoint_id`'s trust domain (normally the federated domain itself, seeded by
    /// `initial_bundle`).
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint must present.
        endpoint_id: SpiffeId,
        /// The first bundle to trust, until one is fetched or imported.
        initial_bundle: Option<PathBuf>,
    },
    /// The endpoint presents a web PKI certificate for the URL's host name, verified against the
    /// roots in `ca_file`.
    HttpsWeb {
        /// PEM roots.
        ca_file: PathBuf,
    },
}

/// A validated federation relationship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedDomain {
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint.
    pub url: Uri,
    /// How to authenticate the endpoint.
    pub profile: EndpointProfile,
    /// `host:port` of the domain's Lanyard CA whose revocations are relayed, if any.
    pub revocation_server: Option<String>,
}

/// Why a `[[federation]]` entry is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[[federation]] {trust_domain}: {reason}")]
pub struct FederationConfigError {
    /// The entry's trust domain, as written.
    pub trust_domain: String,
    /// What is wrong.
    pub reason: String,
}

// === impl FederatedDomain ===

impl FederatedDomain {
    /// Validates one entry; `own` is the CA's trust domain (it cannot federate with itself).
    pub fn resolve(
        spec: &FederationSpec,
        own: &TrustDomain,
    ) -> Result<Self, FederationConfigError> {
        let bad = |reason: String| FederationConfigError {
            trust_domain: spec.trust_domain.clone(),
            reason,
        };
        let trust_domain = TrustDomain::new(&spec.trust_domain).map_err(|e| bad(e.to_string()))?;
        if &trust_domain == own {
            return Err(bad("is this CA's own trust domain".into()));
        }
        let url = parse_https_url(&spec.bundle_endpoint_url).map_err(bad)?;
        let profile = match spec.profile.as_deref().unwrap_or("https_spiffe") {
            "https_spiffe" => {
                if spec.ca_file.is_some() {
                    return Err(bad("ca_file is for profile = \"https_web\"".into()));
                }
                let id = spec.endpoint_spiffe_id.as_deref().ok_or_else(|| {
                    bad("profile https_spiffe needs endpoint_spiffe_id (e.g. spiffe://<td>/lanyard/server)".into())
                })?;
                EndpointProfile::HttpsSpiffe {
                    endpoint_id: SpiffeId::parse(id).map_err(|e| bad(e.to_string()))?,
                    initial_bundle: spec.initial_bundle.clone(),
                }
            }
            "https_web" => {
                if spec.endpoint_spiffe_id.is_some() || spec.initial_bundle.is_some() {
                    return Err(bad(
                        "endpoint_spiffe_id and initial_bundle are for profile = \"https_spiffe\""
                            .into(),
                    ));
                }
                let ca_file = spec.ca_file.clone().ok_or_else(|| {
                    bad("profile https_web needs ca_file (PEM roots; no built-in web PKI roots are shipped)".into())
                })?;
                EndpointProfile::HttpsWeb { ca_file }
            }
            other => {
                return Err(bad(format!(
                    "unknown profile {other:?} (use \"https_spiffe\" or \"https_web\")"
                )));
            }
        };
        let revocation_server = match spec.revocation_server.as_deref().map(str::trim) {
            None => None,
            Some(s) => {
                let hostport = s.trim_start_matches("https://").trim_end_matches('/');
                let uri: Uri = format!("https://{hostport}")
                    .parse()
                    .map_err(|_| bad(format!("revocation_server {s:?}: use host:port")))?;
                if uri.host().is_none_or(str::is_empty) || uri.port().is_none() || uri.path() != "/"
                {
                    return Err(bad(format!("revocation_server {s:?}: use host:port")));
                }
                Some(hostport.to_string())
            }
        };
        Ok(Self {
            trust_domain,
            url,
            profile,
            revocation_server,
        })
    }

    /// The trust domain the endpoint's SVID belongs to (https_spiffe only).
    pub fn endpoint_trust_domain(&self) -> Option<TrustDomain> {
        match &self.profile {
            EndpointProfile::HttpsSpiffe { endpoint_id, .. } => Some(endpoint_id.trust_domain()),
            EndpointProfile::HttpsWeb { .. } => None,
        }
    }
}

/// Resolves every entry; trust domains must be unique.
pub fn resolve_all(
    specs: &[FederationSpec],
    own: &TrustDomain,
) -> Result<Vec<FederatedDomain>, FederationConfigError> {
    let mut out: Vec<FederatedDomain> = Vec::with_capacity(specs.len());
    for s in specs {
        let d = FederatedDomain::resolve(s, own)?;
        if out.iter().any(|o| o.trust_domain == d.trust_domain) {
            return Err(FederationConfigError {
                trust_domain: s.trust_domain.clone(),
                reason: "listed twice".into(),
            });
        }
        out.push(d);
    }
    Ok(out)
}

/// Parses an `https://host[:port][/path]` URL.
pub fn parse_https_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("bundle_endpoint_url {s:?}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("bundle_endpoint_url {s:?} must be an https:// URL"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("bundle_endpoint_url {s:?} has no host"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn own() -> TrustDomain {
        TrustDomain::new("a.example").unwrap()
    }

    fn spiffe_spec() -> FederationSpec {
        FederationSpec {
            trust_domain: "b.example".into(),
            bundle_endpoint_url: "https://127.0.0.1:8444/".into(),
            endpoint_spiffe_id: Some("spiffe://b.example/lanyard/server".into()),
            initial_bundle: Some("/etc/b.json".into()),
            ..FederationSpec::default()
        }
    }

    #[test]
    fn profiles_resolve() {
        let d = FederatedDomain::resolve(&spiffe_spec(), &own()).unwrap();
        assert_eq!(d.trust_domain.as_str(), "b.example");
        assert_eq!(d.url.port_u16(), Some(8444));
        assert_eq!(d.endpoint_trust_domain().unwrap().as_str(), "b.example");
        let web = FederationSpec {
            trust_domain: "c.example".into(),
            bundle_endpoint_url: "https://bundles.c.example/td".into(),
            profile: Some("https_web".into()),
            ca_file: Some("/etc/ssl/roots.pem".into()),
            ..FederationSpec::default()
        };
        let d = FederatedDomain::resolve(&web, &own()).unwrap();
        assert!(matches!(d.profile, EndpointProfile::HttpsWeb { .. }));
        assert_eq!(d.endpoint_trust_domain(), None);
    }

    #[test]
    fn bad_entries_say_why() {
        let cases: Vec<(FederationSpec, &str)> = vec![
            (
                FederationSpec {
                    trust_domain: "a.example".into(),
                    ..spiffe_spec()
                },
                "own trust domain",
            ),
            (
                FederationSpec {
                    trust_domain: "B.example".into(),
                    ..spiffe_spec()
                },
                "invalid trust domain",
            ),
            (
                FederationSpec {
                    bundle_endpoint_url: "http://b.example/".into(),
                    ..spiffe_spec()
                },
                "must be an https:// URL",
            ),
            (
                FederationSpec {
                    endpoint_spiffe_id: None,
                    ..spiffe_spec()
                },
                "needs endpoint_spiffe_id",
            ),
            (
                FederationSpec {
                    profile: Some("https_web".into()),
                    ..spiffe_spec()
                },
                "are for profile",
            ),
            (
                FederationSpec {
                    profile: Some("https_web".into()),
                    endpoint_spiffe_id: None,
                    initial_bundle: None,
                    ..spiffe_spec()
                },
                "needs ca_file",
            ),
            (
                FederationSpec {
                    profile: Some("ftp".into()),
                    ..spiffe_spec()
                },
                "unknown profile",
            ),
        ];
        for (spec, want) in cases {
            let err = FederatedDomain::resolve(&spec, &own()).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        let twice = resolve_all(&[spiffe_spec(), spiffe_spec()], &own()).unwrap_err();
        assert!(twice.to_string().contains("listed twice"));
    }

    #[test]
    fn revocation_server_is_host_and_port() {
        let with = |s: &str| FederationSpec {
            revocation_server: Some(s.into()),
            ..spiffe_spec()
        };
        let d = FederatedDomain::resolve(&with("ca.b.example:8443"), &own()).unwrap();
        assert_eq!(d.revocation_server.as_deref(), Some("ca.b.example:8443"));
        assert_eq!(
            FederatedDomain::resolve(&spiffe_spec(), &own())
                .unwrap()
                .revocation_server,
            None
        );
        for bad in ["ca.b.example", "ca.b.example:8443/x", ":8443", ""] {
            let e = FederatedDomain::resolve(&with(bad), &own()).unwrap_err();
            assert!(e.reason.contains("use host:port"), "{bad:?}: {e}");
        }
    }
}
