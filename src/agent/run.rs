//! The agent's main loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tonic::Code;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::bundles::{Bundles, decode_federated, follow_bundles};
use super::crl::{Crls, follow_crls};
use super::link::{CaLink, follow};
use super::timing::{Backoff, refresh_in};
use super::{AgentConfig, AgentError, files};
use crate::ca::{SvidInfo, parse_svid};
use crate::client::{connect, csr_with_names};
use crate::pb::v1::{self as pb, ca_client::CaClient, revocation_client::RevocationClient};
use crate::spiffe::{IdPattern, SpiffeId};
use crate::tls::{Bundle, RevocationSet, ServerTrust, TlsSource, unix_now};
use crate::tokens::JoinToken;

/// Everything the agent hands to workloads at one moment.
#[derive(Clone)]
pub struct SvidState {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER private key.
    pub key_der: Vec<u8>,
    /// PEM private key.
    key_pem: String,
    /// CA certificates.
    pub bundle: Vec<CertificateDer<'static>>,
    /// Bundles of federated trust domains: name (`b.example`) → CA certificates.
    pub federated: BTreeMap<String, Vec<CertificateDer<'static>>>,
    /// The CA's revision of `bundle` + `federated` (0 when unknown, e.g. read back from files).
    pub bundle_revision: u64,
    /// The latest CRLs from the CA (DER): the signing CA's, then a retiring CA's during a
    /// rotation; empty until fetched. Shared, not copied, by every state and watcher.
    pub crls: Crls,
    /// When the agent received the certificate (milliseconds since the epoch). Renewal timing
    /// runs from here, not from notBefore, which the CA backdates for clock skew.
    pub received_at_ms: i64,
    /// What the leaf says.
    pub svid: SvidInfo,
}

impl std::fmt::Debug for SvidState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidState")
            .field("spiffe_id", &self.svid.spiffe_id)
            .field("serial", &self.svid.serial)
            .field("not_after", &self.svid.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A running agent.
pub struct Agent {
    cfg: AgentConfig,
    state_tx: watch::Sender<Option<Arc<SvidState>>>,
    source: Arc<TlsSource>,
    revocations: Arc<RevocationSet>,
    /// The one connection to the CA that renewals, CRL fetches and both watches share.
    link: Arc<CaLink>,
}

impl Agent {
    /// An agent that has not fetched anything yet.
    pub fn new(cfg: AgentConfig) -> Self {
        let source = TlsSource::empty(cfg.roles_oid.clone());
        // At a million revocations the set's table is 24 MB: an agent with a directory of its
        // own keeps it there, on disk, not in its memory (decision 118).
        let revocations = match cfg.cache_dir.as_ref().or(cfg.out_dir.as_ref()) {
            Some(dir) => RevocationSet::spilling_to(dir),
            None => RevocationSet::new(),
        };
        let link = CaLink::new(cfg.server.clone(), source.clone(), revocations.clone());
        Self {
            cfg,
            state_tx: watch::channel(None).0,
            source,
            revocations,
            link,
        }
    }

    /// Follows the current SVID (for the Workload API).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<SvidState>>> {
        self.state_tx.subscribe()
    }

    /// The live TLS credential (for in-process mTLS).
    pub fn source(&self) -> Arc<TlsSource> {
        self.source.clone()
    }

    /// The revocations the agent follows from the CA (for in-process peer checks).
    pub fn revocations(&self) -> Arc<RevocationSet> {
        self.revocations.clone()
    }

    /// Runs until `shutdown` says `true` or its sender is dropped (Ok), or the credential is
    /// lost for good (Err). Every phase — bootstrap retries, waiting to renew, backoff, the
    /// on-rotate hook, CA calls — ends as soon as it is told to stop: the whole run is raced
    /// against the signal, and everything it awaits is safe to drop (files are written
    /// synchronously between awaits; the hook is killed when dropped).
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let mut stop = shutdown.clone();
        tokio::select! {
            result = self.run_to_completion(shutdown) => result,
            () = stop_requested(&mut stop) => {
                info!("agent stopping");
                Ok(())
            }
        }
    }

    async fn run_to_completion(
        &self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let state = self.bootstrap().await?;
        let id = state.svid.spiffe_id.clone();
        self.publish(state).await?;
        // Aborted when this future ends or is dropped, so a stopped agent leaves nothing behind.
        // Both watches and the CRL fetches share the agent's one connection to the CA.
        let _watch_task = AbortOnDrop(self.follow_revocations());
        let (bundle_task, mut bundles) = follow_bundles(self.link.clone());
        let _bundle_task = AbortOnDrop(bundle_task);
        let (crl_task, mut crls) = follow_crls(
            self.link.clone(),
            self.revocations.clone(),
            self.current().map(|s| s.crls.clone()).unwrap_or_default(),
            self.cfg.max_backoff,
        );
        let _crl_task = AbortOnDrop(crl_task);
        self.rotate_forever(&mut shutdown, &mut bundles, &mut crls)
            .instrument(info_span!("agent", spiffe_id = %id))
            .await
    }

    async fn rotate_forever(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        bundles: &mut watch::Receiver<Option<Bundles>>,
        crls: &mut watch::Receiver<Crls>,
    ) -> Result<(), AgentError> {
        let mut backoff = Backoff::new(Duration::from_secs(1), self.cfg.max_backoff);
        let mut last_failure: Option<String> = None;
        // Woken by news on the revocation watch, not by a timer.
        let mut revocation_news = self.revocations.changes();
        let mut next = tokio::time::Instant::now() + self.next_refresh();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                Ok(()) = revocation_news.changed() => {
                    let Some(state) = self.current() else { continue };
                    let Some(why) = self.revocations.check(&state.svid) else { continue };
                    // A revoked grant revokes the certificate but not the identity: the CA lets
                    // the holder renew at once (without the roles). Anything else ends here.
                    let renewed = self.renew().await;
                    crate::metrics::agent().renewal(renewed.is_ok());
                    match renewed {
                        Ok(renewed) => {
                            info!(reason = %why, "certificate revoked but renewable; renewed");
                            self.publish(renewed).await?;
                            next = tokio::time::Instant::now() + self.next_refresh();
                            continue;
                        }
                        Err(e) => {
                            debug!(error = e.message(), "renewal after revocation refused");
                            return Err(AgentError::Revoked(why));
                        }
                    }
                }
                Ok(()) = bundles.changed() => {
                    let latest = bundles.borrow_and_update().clone();
                    if let Some(b) = latest {
                        self.apply_bundles(b).await?;
                    }
                    continue;
                }
                Ok(()) = crls.changed() => {
                    let latest = crls.borrow_and_update().clone();
                    self.apply_crls(latest).await?;
                    continue;
                }
                _ = shutdown.changed() => {
                    info!("agent stopping");
                    return Ok(());
                }
            }
            let renewed = self.renew().await;
            crate::metrics::agent().renewal(renewed.is_ok());
            match renewed {
                Ok(state) => {
                    if last_failure.take().is_some() {
                        info!("CA reachable again; certificate renewed");
                    }
                    backoff.reset();
                    self.publish(state).await?;
                    next = tokio::time::Instant::now() + self.next_refresh();
                }
                Err(e) => {
                    let Some(state) = self.current() else {
                        return Err(AgentError::Bootstrap(e.message().to_string()));
                    };
                    if let Some(fatal) = classify(&e) {
                        // Expired past the renewal grace: with a JWT file the agent attests
                        // again by itself (a revoked credential still stops it).
                        if let (AgentError::Expired(why), Some(p)) = (&fatal, &self.cfg.jwt_file) {
                            warn!(reason = %why, "certificate expired past the renewal grace; attesting again");
                            let state = self.bootstrap_with_jwt(p).await?;
                            self.publish(state).await?;
                            next = tokio::time::Instant::now() + self.next_refresh();
                            continue;
                        }
                        return Err(fatal);
                    }
                    let left = state.svid.not_after - unix_now();
                    let msg = format!("{:?}: {}", e.code(), e.message());
                    let life = (state.svid.not_after - state.svid.not_before).max(1);
                    if e.code() == Code::PermissionDenied {
                        // The CA's policy no longer allows this certificate (say, a rule was
                        // narrowed): an operator's decision, not a fault. Retried with backoff in
                        // case the policy is changed back.
                        if last_failure.as_deref() != Some(msg.as_str()) {
                            warn!(
                                expires_at = %crate::issuance::fmt_time(state.svid.not_after),
                                reason = e.message(),
                                "certificate renewal refused by the CA's policy; retrying with backoff"
                            );
                        } else {
                            debug!(reason = e.message(), "renewal refused by policy again");
                        }
                    } else if left < life / 5 {
                        error!(expires_in_s = left, error = %msg, "certificate renewal failing; certificate expires soon (or has expired)");
                    } else if last_failure.as_deref() != Some(msg.as_str()) {
                        warn!(expires_in_s = left, error = %msg, "certificate renewal failed; retrying with backoff");
                    } else {
                        debug!(error = %msg, "renewal retry failed");
                    }
                    last_failure = Some(msg);
                    next = tokio::time::Instant::now() + backoff.next_wait();
                }
            }
        }
    }

    fn current(&self) -> Option<Arc<SvidState>> {
        self.state_tx.borrow().clone()
    }

    fn next_refresh(&self) -> Duration {
        match self.current() {
            Some(s) => {
                let jitter = rand::random::<f64>() * 2.0 - 1.0;
                refresh_in(
                    now_ms(),
                    s.received_at_ms,
                    s.svid.not_after * 1000,
                    self.cfg.renew_fraction,
                    jitter,
                )
            }
            None => Duration::ZERO,
        }
    }

    /// A credential left in `out_dir` by an earlier run is reused if it can still renew;
    /// otherwise the join token is used, and the old credential is set aside under
    /// `retired/<time>/` (kept, not deleted). Without a token an unusable credential is fatal:
    /// exit 3 if revoked, 4 if expired.
    async fn bootstrap(&self) -> Result<SvidState, AgentError> {
        if let Some(dir) = &self.cfg.out_dir
            && let Some(state) = self.load_existing(dir)
        {
            info!(spiffe_id = %state.svid.spiffe_id, serial = %state.svid.serial, dir = %dir.display(), "reusing existing credential");
            self.install(&state)?;
            let unusable = match self.revalidate(&state).await {
                Ok(Some(renewed)) => return Ok(renewed),
                Ok(None) => return Ok(state),
                Err(e) => e,
            };
            if self.cfg.token.is_none() && self.cfg.jwt_file.is_none() {
                return Err(match unusable {
                    AgentError::Revoked(m) => AgentError::Revoked(format!(
                        "{m} (once the revocation is lifted, start the agent with --token <a new join token>: the revoked credential is then kept under {}/ and a new one enrolled)",
                        dir.join(files::RETIRED).display()
                    )),
                    other => other,
                });
            }
            // A token that cannot work (malformed, wrong ID) must not cost the old credential.
            match &self.cfg.jwt_file {
                Some(p) => drop(super::attest::read_jwt(p)?),
                None => drop(self.token_target()?),
            }
            let retired_to = files::retire_credential(dir).map_err(|e| {
                AgentError::Io(format!(
                    "setting the old credential in {} aside: {e}",
                    dir.display()
                ))
            })?;
            warn!(
                spiffe_id = %state.svid.spiffe_id,
                serial = %state.svid.serial,
                not_after = %crate::issuance::fmt_time(state.svid.not_after),
                reason = %unusable,
                retired_to = %retired_to.display(),
                "existing credential set aside; enrolling with the join token"
            );
        }
        if let Some(p) = &self.cfg.jwt_file {
            return self.bootstrap_with_jwt(p).await;
        }
        self.bootstrap_with_token().await
    }

    /// Attests with the JWT file (see [`super::attest`]).
    async fn bootstrap_with_jwt(&self, path: &std::path::Path) -> Result<SvidState, AgentError> {
        let (resp, key) = super::attest::issue_with_jwt(&self.cfg, path, self.ttl_secs()).await?;
        let state = self.state_from(resp, &key)?;
        info!(spiffe_id = %state.svid.spiffe_id, serial = %state.svid.serial, "attested with the JWT file");
        Ok(state)
    }

    /// Whether the installed credential `state` from an earlier run can go on: `Ok(None)` to
    /// reuse it as is, `Ok(Some(_))` when it had expired and the CA renewed it within the
    /// renewal grace, `Err` (revoked or expired) when it cannot.
    async fn revalidate(&self, state: &SvidState) -> Result<Option<SvidState>, AgentError> {
        // Do not hand a revoked credential to workloads, not even briefly: ask the CA first
        // (an unreachable CA is not a reason to stop serving a still-valid certificate).
        if let Some(why) = self.revoked_per_ca(&state.svid).await {
            return Err(AgentError::Revoked(why));
        }
        if state.svid.not_after > unix_now() {
            return Ok(None);
        }
        // Expired while the agent was down: the CA's renewal grace may still allow it.
        match self.renew().await {
            Ok(renewed) => Ok(Some(renewed)),
            Err(e) => Err(match classify(&e) {
                Some(fatal @ (AgentError::Revoked(_) | AgentError::Expired(_))) => fatal,
                _ => AgentError::Expired(format!(
                    "the certificate expired at {} and renewing it failed: {:?}: {}",
                    crate::issuance::fmt_time(state.svid.not_after),
                    e.code(),
                    e.message()
                )),
            }),
        }
    }

    /// The join token (raw and parsed) and the SPIFFE ID to ask for with it.
    fn token_target(&self) -> Result<(&str, JoinToken, SpiffeId), AgentError> {
        let raw = self.cfg.token.as_deref().ok_or_else(|| {
            AgentError::Bootstrap("no credential to renew and no --token given".into())
        })?;
        let token = JoinToken::parse(raw).map_err(|e| AgentError::Bootstrap(e.to_string()))?;
        let pattern =
            IdPattern::parse(&token.spiffe_id).map_err(|e| AgentError::Bootstrap(e.to_string()))?;
        let id = match (&self.cfg.spiffe_id, pattern) {
            (Some(s), p) => {
                let id = SpiffeId::parse(s).map_err(|e| AgentError::Bootstrap(e.to_string()))?;
                if !p.matches(&id) {
                    return Err(AgentError::Bootstrap(format!(
                        "the token is for {p}, not {id}"
                    )));
                }
                id
            }
            (None, IdPattern::Exact(id)) => id,
            (None, IdPattern::Prefix(p)) => {
                return Err(AgentError::Bootstrap(format!(
                    "the token is for any ID below {p}/; pass --spiffe-id"
                )));
            }
        };
        Ok((raw, token, id))
    }

    async fn bootstrap_with_token(&self) -> Result<SvidState, AgentError> {
        let (raw, token, id) = self.token_target()?;
        let trust = match &self.cfg.bundle {
            Some(p) => {
                let pem = std::fs::read(p)
                    .map_err(|e| AgentError::Io(format!("{}: {e}", p.display())))?;
                ServerTrust::Bundle(
                    Bundle::from_pem(&pem).map_err(|e| AgentError::Bootstrap(e.to_string()))?,
                )
            }
            None => ServerTrust::Fingerprint(token.ca_fingerprint),
        };
        let join_token = raw.trim().to_string();
        let (resp, key) = bootstrap_issue(&self.cfg, &trust, "bootstrap", |key| {
            Ok(pb::IssueRequest {
                csr: csr_with_names(&id, key, &self.cfg.names)
                    .map_err(|e| AgentError::Bootstrap(e.to_string()))?,
                join_token: join_token.clone(),
                jwt: String::new(),
                ttl_seconds: self.ttl_secs(),
                roles: vec![],
            })
        })
        .await?;
        self.state_from(resp, &key)
    }

    fn load_existing(&self, dir: &std::path::Path) -> Option<SvidState> {
        // Through `..data`: the certificate and key of one generation, never a torn pair.
        let (cert, key) = files::read_consistent(dir).ok()?;
        let bundle_pem = std::fs::read(dir.join("bundle.pem")).ok()?;
        let cred = crate::client::Credential::from_pem(dir, &cert, &key, &bundle_pem, &self.cfg.roles_oid)
            .map_err(|e| warn!(error = %e, "existing credential unusable; bootstrapping with the join token"))
            .ok()?;
        let key_pem = String::from_utf8(key).ok()?;
        let key = KeyPair::from_pem(&key_pem).ok()?;
        let svid = cred.svid;
        Some(SvidState {
            chain: cred.chain,
            key_der: key.serialize_der(),
            key_pem,
            bundle: cred.bundle.certs().to_vec(),
            federated: files::read_federated(dir),
            bundle_revision: 0,
            // Served until the CA is asked again: better than none if it cannot be reached.
            crls: Crls::read_back(files::read_crls(dir)),
            received_at_ms: ((svid.not_before + crate::issuance::BACKDATE_SECS) * 1000)
                .min(now_ms()),
            svid,
        })
    }

    /// Renews over mTLS with the installed credential and a fresh key.
    async fn renew(&self) -> Result<SvidState, tonic::Status> {
        let svid = self
            .source
            .svid()
            .ok_or_else(|| tonic::Status::failed_precondition("no credential to renew"))?;
        let key = super::keys::next_key().map_err(|e| tonic::Status::internal(e.to_string()))?;
        let csr = csr_with_names(&svid.spiffe_id, &key, &self.cfg.names)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let (channel, generation) = self
            .link
            .checkout()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let resp = CaClient::new(channel)
            .issue(pb::IssueRequest {
                csr,
                join_token: String::new(),
                jwt: String::new(),
                ttl_seconds: self.ttl_secs(),
                roles: vec![],
            })
            .await
            .inspect_err(|e| {
                if e.code() == Code::Unauthenticated {
                    self.link.refused(generation);
                }
            })?;
        let (metadata, resp, _) = resp.into_parts();
        let state = self
            .state_from(resp, &key)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.link.renewed(generation, &metadata, &state.svid);
        Ok(state)
    }

    fn ttl_secs(&self) -> u32 {
        self.cfg
            .ttl
            .map_or(0, |d| d.as_secs().min(u32::MAX as u64) as u32)
    }

    fn state_from(&self, resp: pb::IssueResponse, key: &KeyPair) -> Result<SvidState, AgentError> {
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let bundle: Vec<CertificateDer<'static>> = resp
            .trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| AgentError::Bootstrap("CA returned no certificate".into()))?;
        let svid = parse_svid(leaf, &self.cfg.roles_oid)
            .map_err(|e| AgentError::Bootstrap(e.to_string()))?;
        let federated = decode_federated(resp.federated_bundles);
        // The bundle watch may already have delivered newer bundles than this response carries.
        let (bundle, federated, bundle_revision) = match self.current() {
            Some(cur) if cur.bundle_revision > resp.bundle_revision || federated.is_none() => (
                cur.bundle.clone(),
                cur.federated.clone(),
                cur.bundle_revision,
            ),
            _ => (bundle, federated.unwrap_or_default(), resp.bundle_revision),
        };
        Ok(SvidState {
            chain,
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
            bundle,
            federated,
            bundle_revision,
            crls: Crls::default(),
            received_at_ms: now_ms(),
            svid,
        })
    }

    fn install(&self, state: &SvidState) -> Result<(), AgentError> {
        let bundle =
            Bundle::new(state.bundle.clone()).map_err(|e| AgentError::Bootstrap(e.to_string()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(state.key_der.clone()));
        self.source
            .update(state.chain.clone(), key, bundle)
            .map_err(|e| AgentError::Bootstrap(e.to_string()))?;
        self.source.set_federated(federated_tls(&state.federated));
        Ok(())
    }

    /// Installs bundles from the CA's bundle watch when they are newer and differ: TLS source,
    /// files (a new generation with the same certificate), Workload API watchers, on-rotate hook.
    async fn apply_bundles(&self, b: Bundles) -> Result<(), AgentError> {
        let Some(cur) = self.current() else {
            return Ok(());
        };
        if b.revision <= cur.bundle_revision {
            return Ok(());
        }
        if b.own == cur.bundle && b.federated == cur.federated {
            // Same content: remember the revision without waking anybody.
            self.state_tx.send_if_modified(|s| {
                if let Some(s) = s {
                    Arc::make_mut(s).bundle_revision = b.revision;
                }
                false
            });
            return Ok(());
        }
        let own = match Bundle::new(b.own.clone()) {
            Ok(own) if !b.own.is_empty() => own,
            Ok(_) | Err(_) => {
                warn!("ignoring an unusable own bundle from the CA");
                return Ok(());
            }
        };
        let mut next = (*cur).clone();
        next.bundle = b.own;
        next.federated = b.federated;
        next.bundle_revision = b.revision;
        self.source.set_bundle(own);
        self.source.set_federated(federated_tls(&next.federated));
        self.write_files(&next)?;
        info!(
            authorities = next.bundle.len(),
            federated = %next.federated.keys().cloned().collect::<Vec<_>>().join(","),
            revision = %crate::issuance::fmt_time_ms(next.bundle_revision),
            "trust bundles updated"
        );
        let svid = next.svid.clone();
        self.state_tx.send_replace(Some(Arc::new(next)));
        if let Some(cmd) = &self.cfg.on_rotate {
            run_hook(cmd, &svid, "bundle").await;
        }
        Ok(())
    }

    /// Installs CRLs from the CRL follower when they differ from the ones in hand: files (a new
    /// generation with the same certificate), Workload API watchers, then the CRL hook
    /// (`on_crl_change`, else `on_rotate`).
    async fn apply_crls(&self, crls: Crls) -> Result<(), AgentError> {
        let Some(cur) = self.current() else {
            return Ok(());
        };
        if crls.is_empty() || crls == cur.crls {
            return Ok(());
        }
        let mut next = (*cur).clone();
        next.crls = crls;
        self.write_files(&next)?;
        let next_update = next
            .crls
            .next_update()
            .ok()
            .flatten()
            .map_or_else(|| "none".to_string(), crate::issuance::fmt_time);
        let revoked = next.crls.serials();
        // A refresh that lists the same serials is routine (every few minutes): debug.
        if revoked == cur.crls.serials() {
            debug!(crls = next.crls.count(), next_update, "CRL refreshed");
        } else {
            info!(
                crls = next.crls.count(),
                revoked = revoked.len(),
                next_update,
                "CRL updated"
            );
        }
        let svid = next.svid.clone();
        self.state_tx.send_replace(Some(Arc::new(next)));
        if let Some(cmd) = self
            .cfg
            .on_crl_change
            .as_ref()
            .or(self.cfg.on_rotate.as_ref())
        {
            run_hook(cmd, &svid, "crl").await;
        }
        Ok(())
    }

    /// Writes `state` as a new generation in `out_dir`, if there is one. Then CRLs too large for
    /// a Workload API response are let go: `crl.pem` has them, the next generation links it.
    fn write_files(&self, state: &SvidState) -> Result<(), AgentError> {
        if let Some(dir) = &self.cfg.out_dir {
            let ders = state.crls.ders();
            let crl = match &ders {
                Some(ders) => files::CrlFile::Ders(ders),
                None if state.crls.is_empty() => files::CrlFile::None,
                None => files::CrlFile::Keep,
            };
            files::write_generation(
                dir,
                &state.chain,
                &state.key_pem,
                &state.bundle,
                &state.federated,
                crl,
            )
            .map_err(|e| AgentError::Io(format!("writing {}: {e}", dir.display())))?;
        }
        state.crls.release_if_over(super::MAX_RESPONSE);
        Ok(())
    }

    /// Installs a new SVID everywhere: TLS source, files, Workload API watchers, on-rotate hook.
    async fn publish(&self, mut state: SvidState) -> Result<(), AgentError> {
        self.install(&state)?;
        // The CRL follower keeps the CRLs fresh; only the first certificate (or one whose CA
        // could not be asked before) has to fetch them here. A failed fetch keeps what there is.
        state.crls = self.current().map(|c| c.crls.clone()).unwrap_or_default();
        if state.crls.is_empty() {
            state.crls = self.fetch_crls().await;
        }
        self.write_files(&state)?;
        // Nothing was published yet: this is the first certificate (from the token or reused
        // from disk), which replaces nothing, so it is not a rotation.
        let first = self.state_tx.borrow().is_none();
        info!(
            spiffe_id = %state.svid.spiffe_id,
            serial = %state.svid.serial,
            not_after = %crate::issuance::fmt_time(state.svid.not_after),
            roles = %state.svid.roles.join(","),
            "{}",
            if first { "certificate ready" } else { "certificate rotated" }
        );
        let svid = state.svid.clone();
        self.state_tx.send_replace(Some(Arc::new(state)));
        if let Some(cmd) = &self.cfg.on_rotate {
            run_hook(cmd, &svid, "rotate").await;
        }
        Ok(())
    }

    /// The agent's channel to the CA (see [`super::link`]).
    async fn ca_channel(&self) -> Result<tonic::transport::Channel, tonic::Status> {
        self.link
            .channel()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
    }

    /// Follows `Revocation.Watch` over the link, resuming from the revision in hand.
    fn follow_revocations(&self) -> tokio::task::JoinHandle<()> {
        let (set, source) = (self.revocations.clone(), self.source.clone());
        follow(self.link.clone(), "revocations", move |channel| {
            let (set, source) = (set.clone(), source.clone());
            async move {
                let mut stream = set
                    .open_watch(channel, &source)
                    .await
                    .map_err(tonic::Status::unavailable)?;
                debug!(since = set.rev(), "following revocations");
                while let Some(entry) = stream.message().await? {
                    set.apply(&entry);
                }
                Ok(())
            }
        })
    }

    /// Asks the CA whether `svid` is revoked; `None` when it is not or the CA cannot say.
    async fn revoked_per_ca(&self, svid: &SvidInfo) -> Option<String> {
        let ask = async {
            let channel = self.ca_channel().await.ok()?;
            let answer = RevocationClient::new(channel)
                .check(pb::CheckRequest {
                    serial: svid.serial.to_hex(),
                })
                .await;
            match answer {
                Ok(r) => {
                    let r = r.into_inner();
                    r.revoked.then(|| {
                        format!(
                            "certificate {} is revoked: {}",
                            svid.serial,
                            r.entry.map(|e| e.reason).unwrap_or_default()
                        )
                    })
                }
                Err(e) => classify(&e).and_then(|err| match err {
                    AgentError::Revoked(m) => Some(m),
                    _ => None,
                }),
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ask)
            .await
            .ok()
            .flatten()
    }

    async fn fetch_crls(&self) -> Crls {
        let fetch = async {
            let channel = self.ca_channel().await.ok()?;
            crate::client::crl_client(channel)
                .get_crl(pb::GetCrlRequest {})
                .await
                .ok()
                .map(|r| super::crl::answer_ders(r.into_inner()))
        };
        let ders = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        // Not taken if it does not parse: the CRL follower fetches again at once.
        Crls::new(ders)
            .inspect_err(|e| warn!(error = %e, "ignoring CRLs from the CA"))
            .unwrap_or_default()
    }
}

/// Sends a bootstrap request (join token or JWT) over a connection without a client
/// certificate, with a new key per attempt, and retries with backoff while the CA is unreachable
/// or busy (`ResourceExhausted`: the CA's per-source budget, when many agents behind one address
/// enrol at once, says "retry in a second"); a refused token stays refused. `request` builds each
/// attempt's request around its key, re-reading what may change meanwhile (the JWT file); its
/// error is final.
pub(super) async fn bootstrap_issue(
    cfg: &AgentConfig,
    trust: &ServerTrust,
    what: &'static str,
    mut request: impl FnMut(&KeyPair) -> Result<pb::IssueRequest, AgentError>,
) -> Result<(pb::IssueResponse, KeyPair), AgentError> {
    let mut backoff = Backoff::new(Duration::from_secs(1), cfg.max_backoff);
    loop {
        let key = KeyPair::generate().map_err(|e| AgentError::Bootstrap(e.to_string()))?;
        let req = request(&key)?;
        let attempt = async {
            let channel = connect(&cfg.server, trust.clone(), None, cfg.roles_oid.clone())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            CaClient::new(channel)
                .issue(req)
                .await
                .map(|r| r.into_inner())
        };
        match attempt.await {
            Ok(resp) => return Ok((resp, key)),
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::Unknown
                        | Code::ResourceExhausted
                ) =>
            {
                let wait = backoff.next_wait();
                warn!(
                    error = e.message(),
                    retry_in_s = wait.as_secs(),
                    "CA unreachable during {what}"
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                return Err(AgentError::Bootstrap(format!(
                    "{:?}: {}",
                    e.code(),
                    e.message()
                )));
            }
        }
    }
}

/// Resolves once `rx` says stop, or its sender is gone (nobody can say so any more).
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Federated bundles as `lanyard::tls` takes them; an unusable one is skipped (logged).
fn federated_tls(
    federated: &BTreeMap<String, Vec<CertificateDer<'static>>>,
) -> Vec<(String, Bundle)> {
    federated
        .iter()
        .filter_map(|(td, certs)| match Bundle::new(certs.clone()) {
            Ok(b) => Some((td.clone(), b)),
            Err(e) => {
                warn!(trust_domain = %td, error = %e, "skipping an unusable federated bundle");
                None
            }
        })
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Errors after which retrying cannot help.
fn classify(e: &tonic::Status) -> Option<AgentError> {
    let m = e.message();
    match e.code() {
        Code::FailedPrecondition if m.contains("revoked") => {
            Some(AgentError::Revoked(m.to_string()))
        }
        Code::Unauthenticated if m.contains("renewal grace") => {
            Some(AgentError::Expired(m.to_string()))
        }
        _ => None,
    }
}

/// Runs a hook with `LANYARD_SPIFFE_ID`, `LANYARD_SERIAL` and `LANYARD_EVENT` (`rotate`,
/// `bundle` or `crl`: what changed).
async fn run_hook(cmd: &str, svid: &SvidInfo, event: &str) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("LANYARD_EVENT", event)
        .env("LANYARD_SPIFFE_ID", svid.spiffe_id.as_str())
        .env("LANYARD_SERIAL", svid.serial.to_hex())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(60), child).await {
        Ok(Ok(status)) if status.success() => debug!(cmd, event, "hook succeeded"),
        Ok(Ok(status)) => warn!(cmd, event, %status, "hook failed"),
        Ok(Err(e)) => warn!(cmd, event, error = %e, "hook could not start"),
        Err(_) => warn!(cmd, event, "hook timed out after 60s"),
    }
}
