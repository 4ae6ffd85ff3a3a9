//! Shared test helpers: a real CA server on 127.0.0.1:0 over a temp data dir, real TLS, real
//! gRPC. Every helper here is used by several test files; append new ones at the end.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lanyard::ca::RolesOid;
use lanyard::client::{Credential, connect, csr_for, write_credential};
use lanyard::config::{Overrides, ServeSettings};
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, ca_client::CaClient};
use lanyard::server::{Running, start};
use lanyard::spiffe::SpiffeId;
use lanyard::tls::{Bundle, ServerTrust};
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use tempfile::TempDir;
use tonic::transport::Channel;

/// The default test policy.
pub const POLICY: &str = r#"
[[policy]]
spiffe_id = "spiffe://example.org/ns/prod/*"
roles = ["db-read", "deploy"]
max_ttl = "10m"

[[policy]]
spiffe_id = "spiffe://example.org/ns/dev/*"
roles = []
max_ttl = "5m"

[[policy]]
spiffe_id = "spiffe://example.org/auditor"
roles = ["lanyard:auditor"]
max_ttl = "1h"
"#;

/// A running CA for one test.
pub struct TestCa {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub settings: ServeSettings,
    pub config_path: PathBuf,
    /// Dropping it (with the TestCa) stops the server: its shutdown sender closes.
    running: Option<Running>,
}

impl TestCa {
    /// A CA for example.org with the default test policy and a 1 s TTL floor.
    pub async fn start() -> Self {
        Self::start_with("", POLICY).await
    }

    /// A CA with extra top-level settings (TOML lines) and the given policy section.
    pub async fn start_with(extra: &str, policy: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("lanyard.toml");
        let config = format!(
            "trust_domain = \"example.org\"\nlisten = \"127.0.0.1:0\"\nmin_ttl = \"1s\"\n{extra}\n{policy}"
        );
        std::fs::write(&config_path, config).expect("write config");
        Self::start_in(dir, config_path).await
    }

    /// (Re)starts a CA over an existing data dir and config.
    pub async fn start_in(dir: TempDir, config_path: PathBuf) -> Self {
        let settings = ServeSettings::resolve(
            Some(&config_path),
            Overrides {
                data_dir: Some(dir.path().join("data")),
                ..Overrides::default()
            },
        )
        .expect("settings");
        let running = start(settings.clone()).await.expect("server starts");
        Self {
            addr: running.addr,
            dir,
            settings,
            config_path,
            running: Some(running),
        }
    }

    /// Stops the server and waits for it; returns the data dir for a restart.
    pub async fn stop(mut self) -> (TempDir, PathBuf) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown.send(true);
            let _ = r.done.await;
        }
        (self.dir, self.config_path)
    }

    /// host:port of the server.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The admin credential directory the server wrote.
    pub fn admin_dir(&self) -> PathBuf {
        self.data_dir().join("admin")
    }

    /// The CA bundle.
    pub fn bundle(&self) -> Bundle {
        Bundle::from_pem(&std::fs::read(self.admin_dir().join("bundle.pem")).unwrap()).unwrap()
    }

    /// A channel presenting the credential in `dir`.
    pub async fn channel_as(&self, dir: &Path) -> Channel {
        let cred = Credential::load(dir, &RolesOid::default()).expect("credential loads");
        connect(
            &self.server(),
            ServerTrust::Bundle(cred.bundle.clone()),
            Some(cred.slot().unwrap()),
            RolesOid::default(),
        )
        .await
        .expect("connect")
    }

    /// A channel presenting the admin credential.
    pub async fn admin_channel(&self) -> Channel {
        self.channel_as(&self.admin_dir()).await
    }

    /// A channel with no client certificate.
    pub async fn anon_channel(&self) -> Channel {
        connect(&self.server(), ServerTrust::Bundle(self.bundle()), None, RolesOid::default())
            .await
            .expect("connect")
    }

    /// Mints a token through the Admin API.
    pub async fn token(&self, spiffe_id: &str, roles: &[&str], max_ttl_secs: u32, uses: u32) -> String {
        self.try_token(spiffe_id, roles, max_ttl_secs, 0, uses).await.expect("token created")
    }

    /// Mints a token; returns the status on failure.
    pub async fn try_token(
        &self,
        spiffe_id: &str,
        roles: &[&str],
        max_ttl_secs: u32,
        expires_in_secs: u32,
        uses: u32,
    ) -> Result<String, tonic::Status> {
        let mut admin = AdminClient::new(self.admin_channel().await);
        admin
            .create_join_token(pb::CreateJoinTokenRequest {
                spiffe_id: spiffe_id.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                max_ttl_seconds: max_ttl_secs,
                expires_in_seconds: expires_in_secs,
                uses,
            })
            .await
            .map(|r| r.into_inner().token)
    }

    /// Issues with a token for `id`, from a fresh key; returns the key and the response.
    pub async fn issue(
        &self,
        token: &str,
        id: &str,
        ttl_secs: u32,
    ) -> Result<(KeyPair, pb::IssueResponse), tonic::Status> {
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&SpiffeId::parse(id).unwrap(), &key).unwrap();
        let resp = self.issue_csr(token, csr, ttl_secs).await?;
        Ok((key, resp))
    }

    /// Sends a raw CSR with a token over a channel without a client certificate.
    pub async fn issue_csr(&self, token: &str, csr: Vec<u8>, ttl_secs: u32) -> Result<pb::IssueResponse, tonic::Status> {
        let mut ca = CaClient::new(self.anon_channel().await);
        ca.issue(pb::IssueRequest {
            csr,
            join_token: token.into(),
            ttl_seconds: ttl_secs,
            roles: vec![],
        })
        .await
        .map(|r| r.into_inner())
    }

    /// Issues with a fresh token and writes the credential to `<tmp>/<name>`.
    pub async fn enroll(&self, name: &str, id: &str, roles: &[&str], ttl_secs: u32) -> PathBuf {
        let token = self.token(id, roles, 600, 1).await;
        let (key, resp) = self.issue(&token, id, ttl_secs).await.expect("issue");
        let dir = self.dir.path().join(name);
        write_response(&dir, &resp, &key);
        dir
    }

    /// Renews the credential in `dir` with a new key; writes the result back.
    pub async fn renew(&self, dir: &Path, ttl_secs: u32) -> Result<pb::IssueResponse, tonic::Status> {
        let cred = Credential::load(dir, &RolesOid::default()).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&cred.svid.spiffe_id, &key).unwrap();
        let mut ca = CaClient::new(self.channel_as(dir).await);
        let resp = ca
            .issue(pb::IssueRequest {
                csr,
                join_token: String::new(),
                ttl_seconds: ttl_secs,
                roles: vec![],
            })
            .await?
            .into_inner();
        write_response(dir, &resp, &key);
        Ok(resp)
    }
}

/// Writes an Issue response and its key as a credential directory.
pub fn write_response(dir: &Path, resp: &pb::IssueResponse, key: &KeyPair) {
    let chain: Vec<CertificateDer<'_>> = resp.cert_chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
    let bundle: Vec<CertificateDer<'_>> = resp.trust_bundle.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
    write_credential(dir, &chain, &bundle, &key.serialize_pem()).unwrap();
}

/// Path of the built `lanyard` binary.
pub fn lanyard_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lanyard"))
}
