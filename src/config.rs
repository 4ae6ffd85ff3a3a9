//! Server configuration: a TOML file (every field optional), overridden by flags and `LANYARD_*`
//! environment variables (clap reads those), merged once into typed [`ServeSettings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ca::{RolesOid, SanNames};
use crate::federation::{FederatedDomain, FederationConfigError, FederationSpec};
use crate::policy::{AccessRuleSpec, Policy, PolicyError, RuleSpec};
use crate::spiffe::TrustDomain;
use crate::store::{EtcdConfig, EtcdTls};

/// Errors loading configuration. The server exits with status 64 on any of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not valid TOML or has unknown fields.
    #[error("config {0}: {1}")]
    Parse(PathBuf, String),
    /// A required setting is missing.
    #[error("missing setting: {0}")]
    Missing(&'static str),
    /// A setting has a bad value.
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, String),
    /// The policy section is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A `[[federation]]` entry is invalid.
    #[error(transparent)]
    Federation(#[from] FederationConfigError),
    /// An `[[attestor]]` entry is invalid.
    #[error(transparent)]
    Attestor(#[from] crate::attest::AttestorConfigError),
}

/// The config file, as written. Every field is optional; see `deploy/lanyard.example.toml`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain, e.g. `example.org`.
    pub trust_domain: Option<String>,
    /// Where the CA keeps its key, credentials and sled store.
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address.
    pub listen: Option<SocketAddr>,
    /// Certificate lifetime when a request names none.
    #[serde(default, with = "opt_duration")]
    pub default_ttl: Option<Duration>,
    /// Shortest lifetime a request may ask for.
    #[serde(default, with = "opt_duration")]
    pub min_ttl: Option<Duration>,
    /// Hard cap on any certificate lifetime, whatever policy says.
    #[serde(default, with = "opt_duration")]
    pub max_cert_lifetime: Option<Duration>,
    /// How long after expiry a certificate may still renew (0 disables).
    #[serde(default, with = "opt_duration")]
    pub renewal_grace: Option<Duration>,
    /// Lifetime of the server's own serving certificate.
    #[serde(default, with = "opt_duration")]
    pub server_cert_ttl: Option<Duration>,
    /// DNS names and IP literals in the CA's own serving certificate (gRPC and bundle endpoint).
    pub server_names: Option<Vec<String>>,
    /// Lifetime of the local admin credential in `<data_dir>/admin`.
    #[serde(default, with = "opt_duration")]
    pub admin_cert_ttl: Option<Duration>,
    /// Default join token lifetime.
    #[serde(default, with = "opt_duration")]
    pub token_ttl: Option<Duration>,
    /// How long a CRL is valid (its nextUpdate).
    #[serde(default, with = "opt_duration")]
    pub crl_validity: Option<Duration>,
    /// How often expired tokens, issued-certificate records and revocations are pruned.
    #[serde(default, with = "opt_duration")]
    pub prune_interval: Option<Duration>,
    /// Refused `Ca.Issue` requests per second one source IP may have audited (0: no limit).
    pub denial_rate: Option<u32>,
    /// How many refusals a source may have at once before `denial_rate` applies.
    pub denial_burst: Option<u32>,
    /// OID of the roles extension (every arc below 2^28).
    pub roles_oid: Option<String>,
    /// A CA certificate chain (PEM, signing cert first) to use instead of a generated root.
    pub ca_cert: Option<PathBuf>,
    /// The private key (PEM, mode 0600) for `ca_cert`.
    pub ca_key: Option<PathBuf>,
    /// Key-encryption key (32 random bytes, mode 0600) that seals the CA keys in a shared
    /// store; every replica reads the same file. Required on etcd, unused on sled.
    pub kek_file: Option<PathBuf>,
    /// This replica's name in `lanyard status` (default: the host name and listen port).
    pub replica_id: Option<String>,
    /// The address other replicas, operators and agents reach this replica at, as shown in
    /// `lanyard status` (default: the listen address).
    pub advertise_address: Option<String>,
    /// How long an access request waits for approvals before it expires.
    #[serde(default, with = "opt_duration")]
    pub access_request_ttl: Option<Duration>,
    /// Shell command run on every new access request (details in `LANYARD_ACCESS_*`).
    pub access_notify_cmd: Option<String>,
    /// `http://` or `https://` URL that receives a JSON POST on every new access request.
    pub access_webhook: Option<String>,
    /// PEM roots that authenticate an `https://` webhook instead of the system's.
    pub access_webhook_ca_file: Option<PathBuf>,
    /// Policy rules; everything they do not allow is denied.
    #[serde(default)]
    pub policy: Vec<RuleSpec>,
    /// Temporary-access rules: which roles may be requested, for how long, with how many
    /// approvals.
    #[serde(default)]
    pub access: Vec<AccessRuleSpec>,
    /// Where to serve the SPIFFE bundle endpoint (HTTPS); off when absent.
    pub bundle_endpoint_listen: Option<SocketAddr>,
    /// Where to serve Prometheus metrics, `/healthz` and `/readyz` (plain HTTP); off when
    /// absent.
    pub metrics_listen: Option<SocketAddr>,
    /// The `spiffe_refresh_hint` published in the own bundle.
    #[serde(default, with = "opt_duration")]
    pub bundle_refresh_hint: Option<Duration>,
    /// How long a staged CA is published before signing switches to it (`lanyard ca rotate`).
    #[serde(default, with = "opt_duration")]
    pub ca_rotation_overlap: Option<Duration>,
    /// Federated trust domains.
    #[serde(default)]
    pub federation: Vec<FederationSpec>,
    /// JWT/OIDC attestors (`[[attestor]]`), see docs/attestation.md.
    #[serde(default)]
    pub attestor: Vec<crate::attest::AttestorSpec>,
    /// Concurrent gRPC connections in total.
    pub max_connections: Option<usize>,
    /// Concurrent gRPC connections from one source (IPv4 address or IPv6 /64).
    pub max_connections_per_source: Option<usize>,
    /// Concurrent bundle endpoint connections in total.
    pub bundle_endpoint_max_connections: Option<usize>,
    /// Concurrent bundle endpoint connections from one source.
    pub bundle_endpoint_max_connections_per_source: Option<usize>,
    /// How long a client has to finish the TLS handshake (both listeners).
    #[serde(default, with = "opt_duration")]
    pub tls_handshake_timeout: Option<Duration>,
    /// How long after the handshake a client has to start: the HTTP/2 preface (gRPC), the whole
    /// request head (bundle endpoint).
    #[serde(default, with = "opt_duration")]
    pub request_start_timeout: Option<Duration>,
    /// A gRPC connection with no request in flight for this long is closed.
    #[serde(default, with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// `etcd://host:port[,host:port...]` to share state with other replicas; sled in
    /// `data_dir` when absent.
    pub store: Option<String>,
    /// Key prefix in etcd (default `/lanyard/<trust_domain>/`).
    pub etcd_prefix: Option<String>,
    /// PEM CA bundle that verifies the etcd members (turns on TLS to etcd).
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd (with `etcd_key_file`).
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of `etcd_cert_file`.
    pub etcd_key_file: Option<PathBuf>,
}

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--trust-domain` / `LANYARD_TRUST_DOMAIN`.
    pub trust_domain: Option<String>,
    /// `--data-dir` / `LANYARD_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--listen` / `LANYARD_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--server-name` (repeatable) / `LANYARD_SERVER_NAMES` (comma-separated); replaces the
    /// file's `server_names` when non-empty.
    pub server_names: Vec<String>,
    /// `--kek-file` / `LANYARD_KEK_FILE`.
    pub kek_file: Option<PathBuf>,
    /// `--replica-id` / `LANYARD_REPLICA_ID`.
    pub replica_id: Option<String>,
    /// `--store` / `LANYARD_STORE`.
    pub store: Option<String>,
    /// `--etcd-prefix` / `LANYARD_ETCD_PREFIX`.
    pub etcd_prefix: Option<String>,
    /// `--etcd-ca-file` / `LANYARD_ETCD_CA_FILE`.
    pub etcd_ca_file: Option<PathBuf>,
    /// `--etcd-cert-file` / `LANYARD_ETCD_CERT_FILE`.
    pub etcd_cert_file: Option<PathBuf>,
    /// `--etcd-key-file` / `LANYARD_ETCD_KEY_FILE`.
    pub etcd_key_file: Option<PathBuf>,
}

/// Where the server keeps its state.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// sled in `<data_dir>/store` (one node).
    Sled,
    /// etcd, shared by every replica of the trust domain.
    Etcd(EtcdConfig),
}

/// Fully merged and validated server settings.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Where state lives: sled in the data dir, or etcd.
    pub store: StoreChoice,
    /// Listen address.
    pub listen: SocketAddr,
    /// Default certificate lifetime.
    pub default_ttl: Duration,
    /// Lifetime floor.
    pub min_ttl: Duration,
    /// Lifetime cap.
    pub max_cert_lifetime: Duration,
    /// Renewal grace after expiry.
    pub renewal_grace: Duration,
    /// Serving certificate lifetime.
    pub server_cert_ttl: Duration,
    /// DNS and IP names of the serving certificate, next to its SPIFFE ID.
    pub server_names: SanNames,
    /// Admin credential lifetime.
    pub admin_cert_ttl: Duration,
    /// Default join token lifetime.
    pub token_ttl: Duration,
    /// CRL validity.
    pub crl_validity: Duration,
    /// Interval between prune passes over expired store entries.
    pub prune_interval: Duration,
    /// Audited refusals per second per source IP; beyond it, refused unaudited (0: no limit).
    pub denial_rate: u32,
    /// Refusals a source may have at once.
    pub denial_burst: u32,
    /// How long an access request stays pending.
    pub access_request_ttl: Duration,
    /// Command run on new access requests.
    pub access_notify_cmd: Option<String>,
    /// Webhook for new access requests.
    pub access_webhook: Option<String>,
    /// Roots for an https webhook (None: the system's).
    pub access_webhook_ca_file: Option<PathBuf>,
    /// Bundle endpoint address, if served.
    pub bundle_endpoint_listen: Option<SocketAddr>,
    /// Metrics listener address (plain HTTP: `/metrics`, `/healthz`, `/readyz`), if served.
    pub metrics_listen: Option<SocketAddr>,
    /// `spiffe_refresh_hint` of the own bundle.
    pub bundle_refresh_hint: Duration,
    /// Staged-CA publication time before the signing switch.
    pub ca_rotation_overlap: Duration,
    /// Federated trust domains.
    pub federation: Vec<FederatedDomain>,
    /// JWT/OIDC attestors.
    pub attestors: Vec<crate::attest::AttestorConfig>,
    /// Connection limits and timeouts of both listeners.
    pub transport: Transport,
    /// Roles extension OID.
    pub roles_oid: RolesOid,
    /// An operator-supplied CA (cert chain, key).
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// The key-encryption key file for CA keys in a shared store.
    pub kek_file: Option<PathBuf>,
    /// This replica's name among the replicas of a shared store.
    pub replica_id: String,
    /// The address shown for this replica in `lanyard status`.
    pub advertise_address: String,
    /// The config file, watched for policy changes.
    pub config_path: Option<PathBuf>,
    /// The validated policy.
    pub policy: Policy,
}

/// Connection limits and timeouts (see `crate::net`). The caps are what is configured; the
/// server lowers them at start if the open-file limit cannot hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    /// Concurrent gRPC connections in total.
    pub max_connections: usize,
    /// Concurrent gRPC connections per source (IPv4 address or IPv6 /64).
    pub max_connections_per_source: usize,
    /// Concurrent bundle endpoint connections in total.
    pub bundle_endpoint_max_connections: usize,
    /// Concurrent bundle endpoint connections per source.
    pub bundle_endpoint_max_connections_per_source: usize,
    /// TLS handshake deadline.
    pub tls_handshake_timeout: Duration,
    /// Deadline after the handshake for the HTTP/2 preface or the bundle request head.
    pub request_start_timeout: Duration,
    /// Idle gRPC connections (no request in flight) are closed after this.
    pub idle_timeout: Duration,
}

/// Defaults, in one place so docs and the example config can be checked against them.
pub mod defaults {
    use std::time::Duration;

    /// Listen address.
    pub const LISTEN: &str = "127.0.0.1:8443";
    /// Data directory.
    pub const DATA_DIR: &str = "./lanyard-data";
    /// Default certificate lifetime.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);
    /// Lifetime floor.
    pub const MIN_TTL: Duration = Duration::from_secs(30);
    /// Lifetime cap.
    pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
    /// Renewal grace.
    pub const RENEWAL_GRACE: Duration = Duration::from_secs(3600);
    /// Serving certificate lifetime.
    pub const SERVER_CERT_TTL: Duration = Duration::from_secs(3600);
    /// Names of the serving certificate when `server_names` is not set: enough for a client on
    /// the CA's own machine (`curl --cacert bundle.pem https://localhost:...`).
    pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
    /// Admin credential lifetime.
    pub const ADMIN_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
    /// Join token lifetime.
    pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
    /// CRL validity.
    pub const CRL_VALIDITY: Duration = Duration::from_secs(5 * 60);
    /// Interval between prune passes.
    pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
    /// Audited refusals per second per source IP.
    pub const DENIAL_RATE: u32 = 20;
    /// Refusals per source at once.
    pub const DENIAL_BURST: u32 = 100;
    /// How long an access request waits for approvals.
    pub const ACCESS_REQUEST_TTL: Duration = Duration::from_secs(3600);
    /// `spiffe_refresh_hint` of the own bundle.
    pub const BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(300);
    /// How many refresh hints a staged CA is published before signing switches to it (the
    /// default `ca_rotation_overlap` is this many times `bundle_refresh_hint`).
    pub const CA_ROTATION_OVERLAP_HINTS: u32 = 3;
    /// Concurrent gRPC connections in total (an agent holds one, with its watch streams).
    pub const MAX_CONNECTIONS: usize = 8192;
    /// Concurrent gRPC connections per source: room for a large fleet behind one NAT address.
    pub const MAX_CONNECTIONS_PER_SOURCE: usize = 1024;
    /// Concurrent bundle endpoint connections in total (peers fetch at their refresh hint).
    pub const BUNDLE_ENDPOINT_MAX_CONNECTIONS: usize = 256;
    /// Concurrent bundle endpoint connections per source.
    pub const BUNDLE_ENDPOINT_MAX_CONNECTIONS_PER_SOURCE: usize = 16;
    /// TLS handshake deadline.
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Deadline after the handshake for the HTTP/2 preface or the bundle request head.
    pub const REQUEST_START_TIMEOUT: Duration = Duration::from_secs(5);
    /// Idle gRPC connection timeout.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
}

/// `<host name>-<listen port>`: unique per replica on one host as across hosts.
fn default_replica_id(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "lanyard".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(50)
        .collect();
    format!("{host}-{}", listen.port())
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))
    }
}

impl ServeSettings {
    /// Merges the file (if any) with overrides and validates everything.
    pub fn resolve(config_path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let file = match config_path {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let td_name = overrides
            .trust_domain
            .clone()
            .or(file.trust_domain.clone())
            .ok_or(ConfigError::Missing(
                "trust_domain (--trust-domain or LANYARD_TRUST_DOMAIN)",
            ))?;
        let trust_domain = TrustDomain::new(&td_name)
            .map_err(|e| ConfigError::Invalid("trust_domain", e.to_string()))?;
        let listen = match overrides.listen.or(file.listen) {
            Some(l) => l,
            None => defaults::LISTEN
                .parse()
                .map_err(|_| ConfigError::Invalid("listen", defaults::LISTEN.into()))?,
        };
        let roles_oid = match &file.roles_oid {
            Some(s) => {
                RolesOid::parse(s).map_err(|e| ConfigError::Invalid("roles_oid", e.to_string()))?
            }
            None => RolesOid::default(),
        };
        let ca_files = match (&file.ca_cert, &file.ca_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "ca_cert/ca_key",
                    "set both or neither".into(),
                ));
            }
        };
        let max_cert_lifetime = file
            .max_cert_lifetime
            .unwrap_or(defaults::MAX_CERT_LIFETIME);
        let min_ttl = file.min_ttl.unwrap_or(defaults::MIN_TTL);
        let default_ttl = file.default_ttl.unwrap_or(defaults::DEFAULT_TTL);
        if min_ttl.is_zero() || min_ttl > default_ttl || default_ttl > max_cert_lifetime {
            return Err(ConfigError::Invalid(
                "ttl settings",
                format!(
                    "need 0 < min_ttl ({min_ttl:?}) <= default_ttl ({default_ttl:?}) <= max_cert_lifetime ({max_cert_lifetime:?})"
                ),
            ));
        }
        let server_cert_ttl = file.server_cert_ttl.unwrap_or(defaults::SERVER_CERT_TTL);
        let admin_cert_ttl = file.admin_cert_ttl.unwrap_or(defaults::ADMIN_CERT_TTL);
        for (name, v) in [
            ("server_cert_ttl", server_cert_ttl),
            ("admin_cert_ttl", admin_cert_ttl),
        ] {
            if v < Duration::from_secs(2) || v > max_cert_lifetime {
                return Err(ConfigError::Invalid(
                    name,
                    format!("{v:?} must be between 2s and max_cert_lifetime"),
                ));
            }
        }
        let server_names = if !overrides.server_names.is_empty() {
            SanNames::parse(&overrides.server_names)
        } else if let Some(names) = &file.server_names {
            SanNames::parse(names)
        } else {
            SanNames::parse(&defaults::SERVER_NAMES)
        }
        .map_err(|e| ConfigError::Invalid("server_names", e.to_string()))?;
        if server_names.len() > crate::ca::MAX_NAMES {
            return Err(ConfigError::Invalid(
                "server_names",
                format!("at most {} names", crate::ca::MAX_NAMES),
            ));
        }
        let prune_interval = file.prune_interval.unwrap_or(defaults::PRUNE_INTERVAL);
        if prune_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "prune_interval",
                format!("{prune_interval:?} must be at least 1s"),
            ));
        }
        let federation = crate::federation::resolve_all(&file.federation, &trust_domain)?;
        let policy =
            Policy::from_specs(&file.policy, &trust_domain, default_ttl, max_cert_lifetime)?
                .with_access(&file.access, &trust_domain, &federated_domains(&federation))?;
        let access_request_ttl = file
            .access_request_ttl
            .unwrap_or(defaults::ACCESS_REQUEST_TTL);
        if access_request_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "access_request_ttl",
                "must be positive".into(),
            ));
        }
        if let Some(url) = &file.access_webhook
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(
                "access_webhook",
                format!("{url:?}: must be an http:// or https:// URL"),
            ));
        }
        let bundle_refresh_hint = file
            .bundle_refresh_hint
            .unwrap_or(defaults::BUNDLE_REFRESH_HINT);
        if bundle_refresh_hint < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "bundle_refresh_hint",
                format!("{bundle_refresh_hint:?} must be at least 1s"),
            ));
        }
        let ca_rotation_overlap = match file.ca_rotation_overlap {
            Some(overlap) => overlap,
            None => bundle_refresh_hint
                .checked_mul(defaults::CA_ROTATION_OVERLAP_HINTS)
                .ok_or_else(|| {
                    ConfigError::Invalid(
                        "bundle_refresh_hint",
                        format!(
                            "{bundle_refresh_hint:?} is too large: the default ca_rotation_overlap is {} times it",
                            defaults::CA_ROTATION_OVERLAP_HINTS
                        ),
                    )
                })?,
        };
        if ca_rotation_overlap < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "ca_rotation_overlap",
                format!("{ca_rotation_overlap:?} must be at least 1s"),
            ));
        }
        let transport = resolve_transport(&file)?;
        let replica_id = match overrides.replica_id.clone().or(file.replica_id.clone()) {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 64
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(ConfigError::Invalid(
                        "replica_id",
                        format!("{id:?}: 1 to 64 characters of [A-Za-z0-9._-]"),
                    ));
                }
                id
            }
            None => default_replica_id(listen),
        };
        let store = resolve_store(&file, &overrides, &trust_domain)?;
        let attestors = crate::attest::resolve_all(&file.attestor, max_cert_lifetime)?;
        let kek_file = overrides.kek_file.clone().or(file.kek_file.clone());
        if matches!(store, StoreChoice::Etcd(_)) && kek_file.is_none() && ca_files.is_none() {
            return Err(ConfigError::Missing(
                "kek_file (--kek-file or LANYARD_KEK_FILE): replicas on etcd keep the CA key in etcd, sealed under this key; create it once with `lanyard kek generate FILE` and give every replica the same file",
            ));
        }
        Ok(Self {
            store,
            trust_domain,
            data_dir: overrides
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR)),
            listen,
            default_ttl,
            min_ttl,
            max_cert_lifetime,
            renewal_grace: file.renewal_grace.unwrap_or(defaults::RENEWAL_GRACE),
            server_cert_ttl,
            server_names,
            admin_cert_ttl,
            token_ttl: file.token_ttl.unwrap_or(defaults::TOKEN_TTL),
            crl_validity: file.crl_validity.unwrap_or(defaults::CRL_VALIDITY),
            prune_interval,
            denial_rate: file.denial_rate.unwrap_or(defaults::DENIAL_RATE),
            denial_burst: file.denial_burst.unwrap_or(defaults::DENIAL_BURST).max(1),
            access_request_ttl,
            access_notify_cmd: file.access_notify_cmd.clone(),
            access_webhook: file.access_webhook.clone(),
            access_webhook_ca_file: file.access_webhook_ca_file.clone(),
            bundle_endpoint_listen: file.bundle_endpoint_listen,
            metrics_listen: file.metrics_listen,
            bundle_refresh_hint,
            ca_rotation_overlap,
            federation,
            attestors,
            transport,
            roles_oid,
            ca_files,
            kek_file,
            replica_id,
            advertise_address: file
                .advertise_address
                .clone()
                .unwrap_or_else(|| listen.to_string()),
            config_path: config_path.map(Path::to_path_buf),
            policy,
        })
    }

    /// Re-reads only the policy from the config file (for reloads).
    pub fn reload_policy(&self) -> Result<Policy, ConfigError> {
        let Some(path) = &self.config_path else {
            return Ok(self.policy.clone());
        };
        let file = FileConfig::load(path)?;
        let policy = Policy::from_specs(
            &file.policy,
            &self.trust_domain,
            self.default_ttl,
            self.max_cert_lifetime,
        )?
        .with_access(
            &file.access,
            &self.trust_domain,
            &federated_domains(&self.federation),
        )?;
        warn_if_empty(&policy, self.config_path.as_deref());
        Ok(policy)
    }

    /// Warns when the policy has no rules, so a first `serve` without a config does not look
    /// healthy while it refuses every identity.
    pub fn warn_if_no_policy(&self) {
        warn_if_empty(&self.policy, self.config_path.as_deref());
    }
}

/// Logs the empty-policy warning (see [`ServeSettings::warn_if_no_policy`]).
fn warn_if_empty(policy: &Policy, config_path: Option<&Path>) {
    if !policy.is_empty() {
        return;
    }
    let config = config_path.map_or_else(|| "none".to_string(), |p| p.display().to_string());
    tracing::warn!(
        config,
        "the policy has no rules: every certificate request will be refused (only the CA's own admin and server credentials are issued); add [[policy]] rules to the config file, see docs/configuration.md"
    );
}

/// The store selection: sled unless `store` names an etcd cluster; etcd TLS options only with
/// etcd, and a client certificate only with its key and a CA.
fn resolve_store(
    file: &FileConfig,
    o: &Overrides,
    td: &TrustDomain,
) -> Result<StoreChoice, ConfigError> {
    let store = o.store.clone().or(file.store.clone());
    let prefix = o.etcd_prefix.clone().or(file.etcd_prefix.clone());
    let ca = o.etcd_ca_file.clone().or(file.etcd_ca_file.clone());
    let cert = o.etcd_cert_file.clone().or(file.etcd_cert_file.clone());
    let key = o.etcd_key_file.clone().or(file.etcd_key_file.clone());
    let Some(url) = store.filter(|s| s != "sled") else {
        if prefix.is_some() || ca.is_some() || cert.is_some() || key.is_some() {
            return Err(ConfigError::Invalid(
                "etcd_prefix/etcd_*_file",
                "set only with store = \"etcd://...\"".into(),
            ));
        }
        return Ok(StoreChoice::Sled);
    };
    let prefix = prefix.unwrap_or_else(|| format!("/lanyard/{}/", td.as_str()));
    if !prefix.starts_with('/') {
        return Err(ConfigError::Invalid(
            "etcd_prefix",
            format!("{prefix:?} must start with /"),
        ));
    }
    let mut cfg = EtcdConfig::parse(&url, &prefix).map_err(|e| match e {
        crate::store::StoreError::Backend(m) => ConfigError::Invalid("store", m),
        other => ConfigError::Invalid("store", other.to_string()),
    })?;
    cfg.tls = match (ca, cert, key) {
        (None, None, None) => None,
        (Some(ca_file), None, None) => Some(EtcdTls {
            ca_file,
            client: None,
        }),
        (Some(ca_file), Some(c), Some(k)) => Some(EtcdTls {
            ca_file,
            client: Some((c, k)),
        }),
        _ => {
            return Err(ConfigError::Invalid(
                "etcd_ca_file/etcd_cert_file/etcd_key_file",
                "a client certificate needs its key and etcd_ca_file".into(),
            ));
        }
    };
    Ok(StoreChoice::Etcd(cfg))
}

/// The connection limits and timeouts, checked: caps at least 1, timeouts at least 100 ms.
fn resolve_transport(file: &FileConfig) -> Result<Transport, ConfigError> {
    let count = |name: &'static str, v: Option<usize>, default: usize| match v.unwrap_or(default) {
        0 => Err(ConfigError::Invalid(name, "must be at least 1".into())),
        n => Ok(n),
    };
    let time = |name: &'static str, v: Option<Duration>, default: Duration| {
        let v = v.unwrap_or(default);
        if v < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                name,
                format!("{v:?} must be at least 100ms"),
            ));
        }
        Ok(v)
    };
    Ok(Transport {
        max_connections: count(
            "max_connections",
            file.max_connections,
            defaults::MAX_CONNECTIONS,
        )?,
        max_connections_per_source: count(
            "max_connections_per_source",
            file.max_connections_per_source,
            defaults::MAX_CONNECTIONS_PER_SOURCE,
        )?,
        bundle_endpoint_max_connections: count(
            "bundle_endpoint_max_connections",
            file.bundle_endpoint_max_connections,
            defaults::BUNDLE_ENDPOINT_MAX_CONNECTIONS,
        )?,
        bundle_endpoint_max_connections_per_source: count(
            "bundle_endpoint_max_connections_per_source",
            file.bundle_endpoint_max_connections_per_source,
            defaults::BUNDLE_ENDPOINT_MAX_CONNECTIONS_PER_SOURCE,
        )?,
        tls_handshake_timeout: time(
            "tls_handshake_timeout",
            file.tls_handshake_timeout,
            defaults::TLS_HANDSHAKE_TIMEOUT,
        )?,
        request_start_timeout: time(
            "request_start_timeout",
            file.request_start_timeout,
            defaults::REQUEST_START_TIMEOUT,
        )?,
        idle_timeout: time("idle_timeout", file.idle_timeout, defaults::IDLE_TIMEOUT)?,
    })
}

/// The trust domains of the `[[federation]]` entries.
fn federated_domains(federation: &[FederatedDomain]) -> Vec<TrustDomain> {
    federation.iter().map(|d| d.trust_domain.clone()).collect()
}

/// Parses `"5m"`, `"1h30m"`, `"30s"` (humantime) into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e} (examples: 30s, 5m, 1h)"))
}

/// serde helper for optional humantime durations.
pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Deserializes an optional duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| super::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On etcd the CA key is sealed in the store: a replica without a KEK is refused before it
    /// binds anything. The HA deploy examples resolve.
    #[test]
    fn etcd_replicas_need_a_kek_and_the_ha_examples_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "trust_domain = \"example.org\"\nstore = \"etcd://127.0.0.1:2379\"\n",
        )
        .unwrap();
        let e = ServeSettings::resolve(Some(&p), Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("kek_file"), "{e}");
        let s = ServeSettings::resolve(
            Some(&p),
            Overrides {
                kek_file: Some(dir.path().join("kek")),
                replica_id: Some("ca-1".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(s.replica_id, "ca-1");
        assert!(
            ServeSettings::resolve(
                Some(&p),
                Overrides {
                    kek_file: Some(dir.path().join("kek")),
                    replica_id: Some("no spaces".into()),
                    ..Overrides::default()
                },
            )
            .is_err()
        );
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let s = ServeSettings::resolve(
            Some(&root.join("deploy/systemd/lanyard-ha.example.toml")),
            Overrides::default(),
        )
        .unwrap();
        assert!(matches!(s.store, StoreChoice::Etcd(_)));
        assert_eq!(s.replica_id, "ca-1");
        assert_eq!(s.advertise_address, "ca-1.example.org:8443");
        // The Kubernetes ConfigMap's lanyard.toml.
        let manifest =
            std::fs::read_to_string(root.join("deploy/kubernetes/ha/lanyard-ha.yaml")).unwrap();
        let start = manifest.find("lanyard.toml: |\n").unwrap() + "lanyard.toml: |\n".len();
        let body: String = manifest[start..]
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let p = dir.path().join("k8s.toml");
        std::fs::write(&p, body).unwrap();
        let s = ServeSettings::resolve(Some(&p), Overrides::default()).unwrap();
        assert!(matches!(s.store, StoreChoice::Etcd(_)));
        assert!(s.kek_file.is_some());
    }

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/lanyard.example.toml");
        let s = ServeSettings::resolve(Some(&path), Overrides::default()).unwrap();
        assert_eq!(s.default_ttl, defaults::DEFAULT_TTL);
        assert_eq!(s.min_ttl, defaults::MIN_TTL);
        assert_eq!(s.max_cert_lifetime, defaults::MAX_CERT_LIFETIME);
        assert_eq!(s.renewal_grace, defaults::RENEWAL_GRACE);
        assert_eq!(s.server_cert_ttl, defaults::SERVER_CERT_TTL);
        assert_eq!(
            s.server_names,
            SanNames::parse(&defaults::SERVER_NAMES).unwrap()
        );
        assert_eq!(s.admin_cert_ttl, defaults::ADMIN_CERT_TTL);
        assert_eq!(s.token_ttl, defaults::TOKEN_TTL);
        assert_eq!(s.crl_validity, defaults::CRL_VALIDITY);
        assert_eq!(s.access_request_ttl, defaults::ACCESS_REQUEST_TTL);
        assert_eq!(s.bundle_refresh_hint, defaults::BUNDLE_REFRESH_HINT);
        assert_eq!(
            s.ca_rotation_overlap,
            defaults::BUNDLE_REFRESH_HINT * defaults::CA_ROTATION_OVERLAP_HINTS
        );
        assert_eq!(s.bundle_endpoint_listen, None);
        assert_eq!(s.metrics_listen, None);
        assert!(s.federation.is_empty());
        assert_eq!(s.prune_interval, defaults::PRUNE_INTERVAL);
        assert_eq!(s.listen.to_string(), defaults::LISTEN);
        assert_eq!(s.roles_oid, RolesOid::default());
        assert_eq!(
            s.transport,
            Transport {
                max_connections: defaults::MAX_CONNECTIONS,
                max_connections_per_source: defaults::MAX_CONNECTIONS_PER_SOURCE,
                bundle_endpoint_max_connections: defaults::BUNDLE_ENDPOINT_MAX_CONNECTIONS,
                bundle_endpoint_max_connections_per_source:
                    defaults::BUNDLE_ENDPOINT_MAX_CONNECTIONS_PER_SOURCE,
                tls_handshake_timeout: defaults::TLS_HANDSHAKE_TIMEOUT,
                request_start_timeout: defaults::REQUEST_START_TIMEOUT,
                idle_timeout: defaults::IDLE_TIMEOUT,
            }
        );
        assert!(!s.policy.is_empty());
        assert!(matches!(s.store, StoreChoice::Sled));
    }

    #[test]
    fn etcd_store_is_selected_with_a_per_domain_prefix() {
        let o = Overrides {
            trust_domain: Some("example.org".into()),
            store: Some("etcd://10.0.0.1:2379,10.0.0.2:2379".into()),
            kek_file: Some("/etc/lanyard/kek".into()),
            ..Overrides::default()
        };
        let s = ServeSettings::resolve(None, o).unwrap();
        let StoreChoice::Etcd(c) = s.store else {
            panic!("expected etcd")
        };
        assert_eq!(c.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(c.prefix, "/lanyard/example.org/");
        assert!(c.tls.is_none());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for bad in [
            "trust_domain = \"example.org\"\nbogus = 1\n",
            "trust_domain = \"Example.org\"\n",
            "trust_domain = \"example.org\"\ndefault_ttl = \"5 parsecs\"\n",
            "trust_domain = \"example.org\"\nroles_oid = \"2.25.340282366920938463463374607431768211455\"\n",
            "trust_domain = \"example.org\"\nmin_ttl = \"10m\"\n",
            "trust_domain = \"example.org\"\nprune_interval = \"0s\"\n",
            "trust_domain = \"example.org\"\nbundle_refresh_hint = \"0s\"\n",
            "trust_domain = \"example.org\"\nmax_connections_per_source = 0\n",
            "trust_domain = \"example.org\"\nidle_timeout = \"0s\"\n",
            "trust_domain = \"example.org\"\nmax_connections = -1\n",
            "trust_domain = \"example.org\"\n[[federation]]\ntrust_domain = \"b.example\"\nbundle_endpoint_url = \"http://b/\"\nendpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"\n",
            "trust_domain = \"example.org\"\n[[policy]]\nspiffe_id = \"spiffe://other.org/x\"\n",
            "trust_domain = \"example.org\"\nstore = \"postgres://x:1\"\n",
            "trust_domain = \"example.org\"\nstore = \"etcd://\"\n",
            "trust_domain = \"example.org\"\netcd_ca_file = \"ca.pem\"\n",
            "trust_domain = \"example.org\"\nstore = \"etcd://a:1\"\netcd_cert_file = \"c.pem\"\n",
            "trust_domain = \"example.org\"\nstore = \"etcd://a:1\"\netcd_prefix = \"rel/\"\n",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(
                ServeSettings::resolve(Some(&p), Overrides::default()).is_err(),
                "{bad}"
            );
        }
        assert!(matches!(
            ServeSettings::resolve(None, Overrides::default()),
            Err(ConfigError::Missing(_))
        ));
    }

    /// Found writing the `policy` fuzz target: the default ca_rotation_overlap (3 x the hint)
    /// overflowed `Duration` and panicked instead of refusing the config.
    #[test]
    fn refresh_hint_too_large_for_the_default_overlap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let huge =
            "trust_domain = \"example.org\"\nbundle_refresh_hint = \"7000000000000000000s\"\n";
        std::fs::write(&p, huge).unwrap();
        assert!(matches!(
            ServeSettings::resolve(Some(&p), Overrides::default()),
            Err(ConfigError::Invalid("bundle_refresh_hint", _))
        ));
        // With the overlap set explicitly nothing needs multiplying.
        std::fs::write(&p, format!("{huge}ca_rotation_overlap = \"15m\"\n")).unwrap();
        ServeSettings::resolve(Some(&p), Overrides::default()).unwrap();
    }
}
